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
those and nothing else (``deltafs.fuseops.invalidate``).

Durability: every operation is one LMDB transaction that reaches the OS at
once, so ``kill -9`` of the daemon loses nothing that was written; the
blobs and the index are flushed to disk when a checkpoint is taken, before
its id is returned, with one journal commit on ext4/XFS
(``deltafs.durability``). ``checkpoint(durable=False)`` returns after the
freeze and leaves that flush to a background task (``sync()`` waits for
it): a caller that cannot afford the disk on its critical path (the
sandbox) still gets a checkpoint that survives a crash of the daemon, and
one that survives a power cut a few milliseconds later. Caveats: writes through a writable
``mmap`` are not tracked specially (they reach us via the kernel like any
write), base xattrs are not imported, and the base must not change while a
store uses it.
"""

from .client import Mount, default_store, force_unmount, mount
from .errors import (AlreadyMountedError, BaseMissingError, DaemonError, DeltaFSError, FSError,
                     NotAMountError, StoreCorruptError, StoreLockedError, UnknownCheckpointError)
from .view import CheckpointInfo, Diff

__all__ = [
    "AlreadyMountedError", "BaseMissingError", "CheckpointInfo", "DaemonError", "DeltaFSError",
    "Diff", "FSError", "Mount", "NotAMountError", "StoreCorruptError", "StoreLockedError",
    "UnknownCheckpointError", "default_store", "force_unmount", "mount",
]
