"""DeltaFS: a checkpointable copy-on-write filesystem in userspace.

A mount is a tree of layers. The live layer on top takes every write; a
checkpoint freezes it and pushes an empty one (no copy, no walk: one synced
LMDB transaction); a rollback discards the live layer and puts a new empty
one on top of any frozen checkpoint, so the checkpoints form a tree and
rolling forward again works. The read-only base directory is checkpoint 1.

All metadata lives in one LMDB index as *versioned keys*: ``what + layer id``
(``deltafs.index``). Layer ids only grow along a chain, so the visible
version of a name or an inode is one B-tree seek plus a short backwards scan
to the first version written by an ancestor of the live layer: resolving a
name costs the same with 1,000 checkpoints as with one. Content is kept in
whole-file blobs; a file is copied up on its first write in a layer, never on
a read-only open (``deltafs.blobs``). The filesystem is inode-centric
(``deltafs.view``): directory renames are O(1) whatever the directory holds,
hard links keep their link count across copy-up, inode numbers are stable
for a file's whole life, across checkpoints and rollbacks.

The kernel's entry, attribute and page caches stay on with long timeouts.
Each layer logs which keys it wrote, so a rollback knows exactly which
entries and inodes differ between the old and the new view and invalidates
those and nothing else (``deltafs.fuseops.invalidate``), and the cached
listing of every directory whose entries differ.

FUSE in Python costs tens of microseconds per request, so the fastest
request is the one the kernel never sends. With the deltafs build of pyfuse3
(``third_party/``, installed by ``run.sh``) the daemon answers the first
OPEN and OPENDIR with ENOSYS: from then on the kernel opens files and
directories itself and keeps directory listings in its page cache, and reads
and writes name the inode. A second ``find`` over a tree then costs no
request at all, and ``grep -r`` no request per file once its pages and
attributes are cached. The daemon keeps each file's content open from its
first read or write until the kernel forgets the inode (a few hundred at
most, least recently used closed first); without a close to hook, a
background task persists the sizes of written files and starts their
write-out to disk a few milliseconds after the writes. Since the daemon
cannot know whether an unlinked file is still open somewhere, each one stays
readable (and its content open) until the kernel forgets it. Directory
offsets are hashes of the names, so a listing resumed after changes neither
skips nor repeats an entry. With a stock pyfuse3, or ``DELTAFS_HANDLES=1``,
the daemon keeps file and directory handles instead. The same build lets
the daemon wait up to 50 us for the next request after answering one
(``fuseops.configure_request_spin``): a program that waits for each answer
(``rm -rf``, a ``stat`` walk) sends it a few tens of microseconds later, and
going back through trio's scheduler and ``epoll_wait`` in between costs more
than the request.

Durability: every operation is one LMDB transaction, nested in a batch
that the request loop commits (reaching the OS) before it waits for more
requests, or after a burst of 64: ``kill -9`` of the daemon loses at most
the operations of the last few milliseconds, never a part of one, and the
live state is then the one before them (``View._write``; 15 us per
commit saved on every file of an ``rm -rf``). Content goes to the blob
files at once, so a write or a truncation commits the batch first: what a
crash keeps is a prefix of the operations. ``fsync``, checkpoints and every
control request commit the batch first; a batch that cannot be committed
(a full disk) stops the daemon as ``kill -9`` would. A
checkpoint returns once its layer is frozen and committed -- it survives a
crash of the daemon, the crash this project promises to survive -- and a
background task flushes the blobs and the index to disk with one journal
commit on ext4/XFS (``deltafs.durability``) a few milliseconds later, so
it survives a power cut too; ``sync()`` waits for that, and
``checkpoint(durable=True)`` (``deltafs checkpoint --durable``) returns only
once it is done. A mount after a crash that left a flush pending flushes
the store's filesystem first. (Decision: until 2026-11-26 the disk flush
was on the checkpoint's path by default, 0.5-10 ms of it; the sandbox never
waited for it, and neither did the crash model of issue 2, which is kill -9
of the daemon.) Pages written through a shared ``mmap`` are held back by
the kernel; ``Mount.checkpoint`` and ``Mount.rollback`` have it write them
back first (``syncfs``), so that a checkpoint contains them and a rollback
never receives the discarded state's pages later. Caveat: the base must
not change while a store uses it.
"""

from .client import Mount, default_store, force_unmount, mount
from .errors import (AlreadyMountedError, BaseMissingError, DaemonError, DeltaFSError, FSError,
                     MountBusyError, NotAMountError, StoreCorruptError, StoreLockedError,
                     StorePlacementError, UnknownCheckpointError)
from .view import CheckpointInfo, Diff

__all__ = [
    "AlreadyMountedError", "BaseMissingError", "CheckpointInfo", "DaemonError", "DeltaFSError",
    "Diff", "FSError", "Mount", "MountBusyError", "NotAMountError", "StoreCorruptError", "StoreLockedError",
    "StorePlacementError",
    "UnknownCheckpointError", "default_store", "force_unmount", "mount",
]
