"""The live view: POSIX filesystem semantics over the versioned index.

The view is inode-centric, like a local filesystem and unlike overlayfs: a
directory entry maps ``(parent ino, name)`` to an inode number, and an inode
record carries the attributes and where the content is (a blob, a base file,
or nothing for an empty file). So a directory rename is one entry removed and
one added, whatever the directory holds; hard links are two entries naming
one inode, and copy-up replaces the inode's content in place, so ``nlink``
and inode numbers survive it. Inode numbers are never reused.

Every mutation is one LMDB write transaction into the live layer. The only
state kept outside the index is what a write() changes at high rate: the size
and mtime of files being written (``dirty``), persisted a few milliseconds
after the writes (``write_back``), on fsync, when the content is closed and
before a checkpoint; and the open content per inode (``files``), shared by
every handle of that inode so that a copy-up is seen by all.

A rollback bumps ``epoch``: an open content descriptor from before it is
re-resolved on its next use, so a handle held across a rollback reads the
rolled-back content, or fails with ESTALE when its file does not exist there.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .blobs import Blobs
from .errors import FSError, UnknownCheckpointError
from .index import ENT, INO, XAT, Index
from .records import F_BASE, F_OWNED, L_DROPPED, L_FROZEN, NO_BLOB, Inode, Layer, clamp_time, from_u64, u64

ROOT = 1
log = logging.getLogger("deltafs")
_CACHE_MAX = 200_000  # entries per cache; past that, lookups go to the index
_BATCH_MAX = 256  # operations per group commit at most (a burst of requests is 64)
_FILES_MAX = 512  # open contents kept for inode-named requests; the least recent go first
_LISTINGS_MAX = 16  # directory listings kept while a reader pages through them
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2  # renameat2(2) flags


# ``.`` and ``..`` come first in every listing, at offsets of their own
# below those of the names: resuming after either never skips an entry.
DOT_OFFSET, DOTDOT_OFFSET = 1, 2


def _offset(name: bytes) -> int:
    """A directory offset that names the entry, not its position: a
    listing resumed after deletions or insertions (also by another process,
    also in the kernel's cache) neither skips nor repeats the entries that
    stayed. Above ``DOTDOT_OFFSET`` and below 2**63, as off_t wants; stable
    for the daemon's life. Two names of one directory colliding in 63 bits
    is left to chance."""
    return DOTDOT_OFFSET + 1 + hash(name) % ((1 << 63) - DOTDOT_OFFSET - 1)


@dataclass(slots=True)
class OpenData:
    """The content of one inode as its open handles see it."""

    ino: int
    fd: int  # -1: the file has no content yet (empty, never written)
    owner: int  # the live layer id if fd is a blob that layer may write, else 0
    epoch: int
    blob: int = NO_BLOB  # the blob behind fd when the live layer owns it
    refs: int = 0
    orphan: bool = False  # unlinked while open: lives only in ``fd``
    kept: bool = False  # held for requests that name the inode (``View.content``)


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    id: int
    parent: int | None
    label: str
    created_ns: int
    current: bool  # the live state descends directly from this checkpoint


@dataclass(frozen=True, slots=True)
class Diff:
    added: list[str]
    modified: list[str]
    deleted: list[str]


def _entry_key(parent: int, name: bytes) -> bytes:
    return u64(parent) + name + b"\0"


class View:
    def __init__(self, index: Index, blobs: Blobs) -> None:
        self.idx = index
        self.blobs = blobs
        self.dirty: dict[int, Inode] = {}
        self._icache: dict[int, Inode] = {}
        self._ecache: dict[tuple[int, bytes], int] = {}
        # (offset, name, inode) per directory, in offset order: the kernel
        # pages through a listing a few dozen entries per request
        self._listings: dict[int, list[tuple[int, bytes, int]]] = {}
        self._pending: dict[Any, Any] | None = None
        self._doomed: list[int] | None = None
        self._undo: list[Callable[[], None]] | None = None
        # group commit (see _write): the open outer transaction and what its
        # operations leave to do once it commits
        self.batching = False
        self._txn: Any = None  # the write transaction of the operation in progress
        self._batch: Any = None
        self._batch_ops = 0
        self._batch_doomed: list[int] = []  # blobs to delete once the batch is committed
        self.on_batch_lost: Callable[[BaseException], None] | None = None
        self.files: dict[int, OpenData] = {}
        self.orphans: dict[int, Inode] = {}  # unlinked while open: fstat still works
        # True when the kernel opens files without telling us (no OPEN and
        # RELEASE requests; reads and writes name the inode): we cannot know
        # whether an unlinked inode is still open, so each one stays an
        # orphan, with its content open, until the kernel forgets the inode.
        self.inode_handles = False
        # ... and so we count, as the kernel does, how many times each inode
        # was handed to it (lookups, creations, listing entries): a FORGET
        # may arrive late, after a new lookup, and only the one that brings
        # the count to zero means the kernel is done with the inode.
        self.nlookup: dict[int, int] = {}
        self.epoch = 0
        self.unsynced: set[int] = set()  # blobs written since the last checkpoint
        self.unsynced_bytes = 0  # how much was written to them
        self.files_max = _FILES_MAX
        # Inodes written since the last ``write_back``, and who to tell when
        # the first one is: the daemon then starts their write-out to disk
        # soon after, so that the next checkpoint has less to wait for.
        self.written: set[int] = set()
        self.on_written: Callable[[], None] | None = None

    # -- reading ---------------------------------------------------------------

    # -- caches ------------------------------------------------------------------
    # Decoded inodes and resolved entries of the live view, in memory: a hit
    # costs a dict lookup whatever the index holds. A write transaction drops
    # the keys it touches at once and fills them in only after it commits;
    # nothing is cached from inside a write transaction (it could abort); a
    # rollback or a merge of layers clears everything.

    @contextmanager
    def _write(self) -> Iterator[Any]:
        pending: dict[Any, Any] = {}
        self._pending = pending
        # Blobs to delete and in-memory changes to take back: a transaction
        # that fails to commit (a full disk) must leave every file as it was.
        doomed: list[int] = []
        undo: list[Callable[[], None]] = []
        self._doomed, self._undo = doomed, undo
        outer = self._batch
        if outer is None and self.batching:
            outer = self._batch = self.idx.begin(write=True)
        try:
            if outer is None:
                with self.idx.begin(write=True) as txn:
                    self._txn = txn
                    yield txn
            else:
                with self.idx.env.begin(write=True, parent=outer) as txn:
                    self._txn = txn
                    yield txn
        except BaseException:
            for fn in reversed(undo):
                fn()
            raise
        finally:
            self._pending = self._txn = None
            self._doomed, self._undo = None, None
        if outer is None:
            if doomed:
                self.blobs.delete(doomed)
        else:
            self._batch_doomed.extend(doomed)
            self._batch_ops += 1
        for key, val in pending.items():
            cache = self._icache if isinstance(key, int) else self._ecache
            if val is not None and len(cache) < _CACHE_MAX:
                cache[key] = val
        if outer is not None and self._batch_ops >= _BATCH_MAX:
            self.commit_batch()

    @contextmanager
    def _read(self) -> Iterator[Any]:
        """A transaction to read in: the operation's own (inside ``_write``),
        the open batch, whose changes are not committed yet, or a read-only one."""
        if self._txn is not None:
            yield self._txn
        elif self._batch is not None:
            yield self._batch
        else:
            with self.idx.begin() as txn:
                yield txn

    def _write_alone(self) -> Any:
        """A top-level write transaction (checkpoints, rollbacks, merges):
        the batch is committed first, LMDB has one writer."""
        self.commit_batch()
        return self.idx.begin(write=True)

    def commit_batch(self) -> None:
        """Commit the operations batched so far. If that fails (a full disk),
        the operations were answered already and ids, descriptors and the
        kernel's caches have moved on with them: nothing can be taken back
        safely, so ``on_batch_lost`` (the daemon: stop as if killed, the
        store keeps the state before the batch) is called, then the error
        raised."""
        txn = self._batch
        if txn is None:
            return
        self._batch = None
        doomed, self._batch_doomed = self._batch_doomed, []
        self._batch_ops = 0
        try:
            txn.commit()
        except BaseException as e:
            if self.on_batch_lost is not None:
                self.on_batch_lost(e)
            raise
        if doomed:
            try:
                self.blobs.delete(doomed)
            except OSError as e:  # garbage only: the next mount sweeps it
                log.warning("deleting %d unused blobs failed: %s", len(doomed), e)

    def _before_data(self) -> None:
        """Content goes to blob files at once, the index in batches: commit
        the batch before content changes, so that a crash keeps a prefix of
        the operations (never a write without the rename that came before it)."""
        if self._batch is not None:
            self.commit_batch()

    def _touch(self, key: Any, val: Any) -> None:
        if isinstance(key, int):
            cache: dict[Any, Any] = self._icache
        else:
            cache = self._ecache
            self._listings.pop(key[0], None)
        cache.pop(key, None)
        if self._pending is not None:
            self._pending[key] = val

    def clear_caches(self) -> None:
        self._icache.clear()
        self._ecache.clear()
        self._listings.clear()

    def inode(self, txn: Any, ino: int) -> Inode | None:
        d = self.dirty.get(ino)
        if d is not None:
            return d
        rec = self._icache.get(ino)
        if rec is not None:
            return rec
        r = self.idx.visible(txn, INO, u64(ino))
        if r is None or not r[1]:
            return self.orphans.get(ino)
        rec = Inode.decode(ino, r[0], r[1])
        if self._pending is None and len(self._icache) < _CACHE_MAX:
            self._icache[ino] = rec
        return rec

    def must(self, txn: Any, ino: int) -> Inode:
        rec = self.inode(txn, ino)
        if rec is None:
            raise FSError(errno.ESTALE)
        return rec

    def entry(self, txn: Any, parent: int, name: bytes) -> int:
        """The inode ``name`` names in ``parent``, 0 if none."""
        key = (parent, name)
        ino = self._ecache.get(key)
        if ino is not None:
            return ino
        r = self.idx.visible(txn, ENT, _entry_key(parent, name))
        ino = from_u64(r[1]) if r is not None and r[1] else 0
        if self._pending is None and len(self._ecache) < _CACHE_MAX:
            self._ecache[key] = ino
        return ino

    def _put_entry(self, txn: Any, parent: int, name: bytes, ino: int) -> None:
        self._touch((parent, name), ino)
        self.idx.put(txn, ENT, _entry_key(parent, name), u64(ino))

    def _remove_entry(self, txn: Any, parent: int, name: bytes) -> None:
        self._touch((parent, name), 0)
        self.idx.remove(txn, ENT, _entry_key(parent, name))

    def getattr(self, ino: int) -> Inode:
        # what inode() would answer from memory, without a transaction
        rec = self.dirty.get(ino) or self._icache.get(ino)
        if rec is not None:
            return rec
        with self._read() as txn:
            return self.must(txn, ino)

    def lookup(self, parent: int, name: bytes) -> Inode | None:
        with self._read() as txn:
            p = self.must(txn, parent)
            if not stat.S_ISDIR(p.mode):
                raise FSError(errno.ENOTDIR)
            if name == b".":
                return p
            if name == b"..":
                return self.must(txn, p.parent or ROOT)
            if len(name) > 255:
                raise FSError(errno.ENAMETOOLONG)
            ino = self.entry(txn, parent, name)
            return self.inode(txn, ino) if ino else None

    def _entries(self, txn: Any, parent: int, anc: set[int] | None = None) -> Iterator[tuple[bytes, int]]:
        for rest, _lid, val in self.idx.scan_visible(txn, ENT, u64(parent), anc):
            if val:
                yield rest[:-1], from_u64(val)

    def readdir_from(self, ino: int, after: int) -> Iterator[tuple[int, bytes, Inode]]:
        """The entries of directory ``ino`` past offset ``after`` (0: all),
        as (offset, name, inode), in offset order: ``.`` and ``..`` first,
        as ext4 and overlayfs list them (``..`` of the root is the root)."""
        with self._read() as txn:
            if after < DOTDOT_OFFSET:
                d = self._dir(txn, ino)
                if after < DOT_OFFSET:
                    yield DOT_OFFSET, b".", d
                yield DOTDOT_OFFSET, b"..", self.must(txn, d.parent or ROOT)
            entries = self._listings.get(ino)
            if entries is None:
                d = self.must(txn, ino)
                if not stat.S_ISDIR(d.mode):
                    raise FSError(errno.ENOTDIR)
                entries = sorted((_offset(name), name, child)
                                 for name, child in self._entries(txn, ino))
                if len(self._listings) >= _LISTINGS_MAX:
                    del self._listings[next(iter(self._listings))]
                self._listings[ino] = entries
            for off, name, child in entries[bisect.bisect_right(entries, (after, b"\xff" * 256)):]:
                rec = self.inode(txn, child)
                if rec is not None:
                    yield off, name, rec

    def readlink(self, ino: int) -> bytes:
        rec = self.getattr(ino)
        if not stat.S_ISLNK(rec.mode):
            raise FSError(errno.EINVAL)
        return rec.tail

    # -- namespace changes -----------------------------------------------------

    def _put_inode(self, txn: Any, rec: Inode) -> None:
        d = self.dirty.pop(rec.ino, None)
        if d is not None and self._undo is not None:  # the size written since: keep it on abort
            self._undo.append(lambda: self.dirty.setdefault(rec.ino, d))
        if rec.ino in self.orphans:
            # unlinked but open: its attributes live in memory until it is
            # closed (forgotten); written to the index it would never be freed
            self.orphans[rec.ino] = rec
            return
        if rec.layer != self.idx.live:
            # A new version of a record another layer wrote (a chmod, a
            # rename, a link after a checkpoint): its blob stays that layer's,
            # frozen. Owned, the next write would go into the checkpoint.
            rec.flags &= ~F_OWNED
            rec.layer = self.idx.live
        self._touch(rec.ino, rec.copy())
        self.idx.put(txn, INO, u64(rec.ino), rec.encode())

    def _drop_inode(self, txn: Any, rec: Inode) -> None:
        assert self._doomed is not None and self._undo is not None, "inside _write() only"
        ino, dirty = rec.ino, self.dirty.pop(rec.ino, None)
        self._touch(ino, None)
        self.idx.remove(txn, INO, u64(ino))
        od = self.files.get(ino)
        owned = rec.flags & F_OWNED and rec.layer == self.idx.live and rec.blob != NO_BLOB
        opened = None
        if od is None and owned and self.inode_handles:
            # the blob is deleted below: keep its content for a process that may hold it open
            od = opened = OpenData(ino, self.blobs.open(rec.blob, write=True), self.idx.live,
                                   self.epoch, blob=rec.blob, kept=True)
            self.files[ino] = od
        was_orphan = od.orphan if od is not None else False
        had = self.orphans.get(ino)

        def undo() -> None:
            if dirty is not None:
                self.dirty[ino] = dirty
            if opened is not None:
                os.close(opened.fd)
                if self.files.get(ino) is opened:
                    del self.files[ino]
            elif od is not None:
                od.orphan = was_orphan
            if had is None:
                self.orphans.pop(ino, None)
            else:
                self.orphans[ino] = had
        self._undo.append(undo)
        if od is not None or self.inode_handles:
            if od is not None:
                od.orphan = True
            rec.nlink = 0
            self.orphans[ino] = rec
        if owned:
            # Created in the live layer, so no checkpoint can refer to it;
            # an open descriptor keeps the data alive until it is closed.
            # Deleted once the transaction has committed.
            self._doomed.append(rec.blob)

    def _dir(self, txn: Any, ino: int) -> Inode:
        d = self.must(txn, ino).copy()
        if not stat.S_ISDIR(d.mode):
            raise FSError(errno.ENOTDIR)
        return d

    def make(self, parent: int, name: bytes, mode: int, uid: int, gid: int,
             rdev: int = 0, target: bytes = b"") -> Inode:
        """Create a file, directory, symlink or special file."""
        if len(name) > 255:
            raise FSError(errno.ENAMETOOLONG)
        with self._write() as txn:
            p = self._dir(txn, parent)
            if self.entry(txn, parent, name):
                raise FSError(errno.EEXIST)
            now = time.time_ns()
            is_dir = stat.S_ISDIR(mode)
            if p.mode & stat.S_ISGID:
                gid = p.gid
                if is_dir:
                    mode |= stat.S_ISGID
            ino = self.idx.next_id(txn, b"next_ino")
            rec = Inode(ino, mode, uid, gid, 2 if is_dir else 1, rdev, len(target),
                        now, now, now, NO_BLOB, 0, parent if is_dir else 0, target)
            self._put_inode(txn, rec)
            self._put_entry(txn, parent, name, ino)
            p.mtime_ns = p.ctime_ns = now
            if is_dir:
                p.nlink += 1
            self._put_inode(txn, p)
            return rec

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        if len(name) > 255:
            raise FSError(errno.ENAMETOOLONG)
        with self._write() as txn:
            rec = self.must(txn, ino).copy()
            if stat.S_ISDIR(rec.mode):
                raise FSError(errno.EPERM)
            p = self._dir(txn, parent)
            if self.entry(txn, parent, name):
                raise FSError(errno.EEXIST)
            now = time.time_ns()
            rec.nlink += 1
            rec.ctime_ns = now
            self._put_inode(txn, rec)
            self._put_entry(txn, parent, name, ino)
            p.mtime_ns = p.ctime_ns = now
            self._put_inode(txn, p)
            return rec

    def _is_empty(self, txn: Any, ino: int) -> bool:
        for _ in self._entries(txn, ino):
            return False
        return True

    def unlink(self, parent: int, name: bytes, want_dir: bool) -> None:
        with self._write() as txn:
            p = self._dir(txn, parent)
            ino = self.entry(txn, parent, name)
            if not ino:
                raise FSError(errno.ENOENT)
            rec = self.must(txn, ino).copy()
            is_dir = stat.S_ISDIR(rec.mode)
            if want_dir and not is_dir:
                raise FSError(errno.ENOTDIR)
            if not want_dir and is_dir:
                raise FSError(errno.EISDIR)
            if is_dir and not self._is_empty(txn, ino):
                raise FSError(errno.ENOTEMPTY)
            now = time.time_ns()
            self._remove_entry(txn, parent, name)
            self._unref(txn, rec, now)
            p.mtime_ns = p.ctime_ns = now
            if is_dir:
                p.nlink -= 1
            self._put_inode(txn, p)

    def _unref(self, txn: Any, rec: Inode, now: int) -> None:
        """One name of ``rec`` is gone: drop the inode with its last name."""
        if stat.S_ISDIR(rec.mode) or rec.nlink <= 1:
            self._drop_inode(txn, rec)
        else:
            rec.nlink -= 1
            rec.ctime_ns = now
            self._put_inode(txn, rec)

    def rename(self, p1: int, n1: bytes, p2: int, n2: bytes, flags: int) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            # RENAME_WHITEOUT (the only other flag the kernel passes on) asks
            # for a whiteout at the old name; we have none to show, and doing
            # the plain rename instead would lie: refuse, as overlayfs does
            # on layers without whiteout support
            raise FSError(errno.EINVAL)
        noreplace, exchange = flags & RENAME_NOREPLACE, flags & RENAME_EXCHANGE
        if len(n2) > 255:
            raise FSError(errno.ENAMETOOLONG)
        with self._write() as txn:
            recs: dict[int, Inode] = {}

            def get(ino: int) -> Inode:
                if ino not in recs:
                    recs[ino] = self.must(txn, ino).copy()
                return recs[ino]

            d1, d2 = get(p1), get(p2)
            if not (stat.S_ISDIR(d1.mode) and stat.S_ISDIR(d2.mode)):
                raise FSError(errno.ENOTDIR)
            src = self.entry(txn, p1, n1)
            if not src:
                raise FSError(errno.ENOENT)
            dst = self.entry(txn, p2, n2)
            if dst and noreplace:
                raise FSError(errno.EEXIST)
            if exchange and not dst:
                raise FSError(errno.ENOENT)
            s = get(src)
            s_dir = stat.S_ISDIR(s.mode)
            now = time.time_ns()
            gone: Inode | None = None
            if exchange:
                t = get(dst)
                self._put_entry(txn, p1, n1, dst)
                self._put_entry(txn, p2, n2, src)
                if p1 != p2:
                    for moved, frm, to in ((s, d1, d2), (t, d2, d1)):
                        if stat.S_ISDIR(moved.mode):
                            moved.parent = to.ino
                            frm.nlink -= 1
                            to.nlink += 1
                t.ctime_ns = now
            else:
                if dst == src:
                    return  # two names of one inode: POSIX says do nothing
                if dst:
                    t = get(dst)
                    t_dir = stat.S_ISDIR(t.mode)
                    if s_dir and not t_dir:
                        raise FSError(errno.ENOTDIR)
                    if t_dir and not s_dir:
                        raise FSError(errno.EISDIR)
                    if t_dir and not self._is_empty(txn, dst):
                        raise FSError(errno.ENOTEMPTY)
                    gone = t
                    if t_dir:
                        d2.nlink -= 1
                self._put_entry(txn, p2, n2, src)
                self._remove_entry(txn, p1, n1)
                if s_dir and p1 != p2:
                    s.parent = p2
                    d1.nlink -= 1
                    d2.nlink += 1
            s.ctime_ns = now
            for d in (d1, d2):
                d.mtime_ns = d.ctime_ns = now
            for rec in recs.values():
                if rec is not gone:
                    self._put_inode(txn, rec)
            if gone is not None:
                self._unref(txn, gone, now)

    # -- attributes ------------------------------------------------------------

    def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, ctime_ns: int | None = None) -> Inode:
        if size is not None:
            self.truncate(ino, size)
        with self._write() as txn:
            rec = self.must(txn, ino).copy()
            if mode is not None:
                rec.mode = stat.S_IFMT(rec.mode) | stat.S_IMODE(mode)
            if uid is not None:
                rec.uid = uid
            if gid is not None:
                rec.gid = gid
            if atime_ns is not None:
                rec.atime_ns = clamp_time(atime_ns)
            if mtime_ns is not None:
                rec.mtime_ns = clamp_time(mtime_ns)
            rec.ctime_ns = ctime_ns if ctime_ns is not None else time.time_ns()
            self._put_inode(txn, rec)
            return rec

    def truncate(self, ino: int, size: int) -> None:
        rec = self.getattr(ino)
        if stat.S_ISDIR(rec.mode):
            raise FSError(errno.EISDIR)
        if not stat.S_ISREG(rec.mode):
            raise FSError(errno.EINVAL)
        od = self.acquire(ino)
        try:
            self._writable(od, min(size, rec.size))
            self._before_data()
            os.ftruncate(od.fd, size)
            self.unsynced.add(od.blob)
            d = self._dirty(ino)
            d.size = size
            d.mtime_ns = d.ctime_ns = time.time_ns()
            self.flush_dirty(ino)
        finally:
            self.release(od)

    # -- xattrs ----------------------------------------------------------------

    def getxattr(self, ino: int, name: bytes) -> bytes:
        with self._read() as txn:
            self.must(txn, ino)
            r = self.idx.visible(txn, XAT, u64(ino) + name + b"\0")
            if r is None or not r[1]:
                raise FSError(errno.ENODATA)
            return bytes(r[1][1:])

    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        if name.startswith(b"system.posix_acl_"):
            # ACLs need the kernel to enforce them (FUSE_POSIX_ACL), which
            # this filesystem does not ask for: stored, they would be shown
            # and ignored. Refused, as by a filesystem mounted noacl.
            raise FSError(errno.EOPNOTSUPP)
        with self._write() as txn:
            rec = self.must(txn, ino).copy()
            self.idx.put(txn, XAT, u64(ino) + name + b"\0", b"\1" + value)
            rec.ctime_ns = time.time_ns()
            self._put_inode(txn, rec)

    def listxattr(self, ino: int) -> list[bytes]:
        with self._read() as txn:
            self.must(txn, ino)
            return [rest[:-1] for rest, _l, v in self.idx.scan_visible(txn, XAT, u64(ino)) if v]

    def removexattr(self, ino: int, name: bytes) -> None:
        with self._write() as txn:
            rec = self.must(txn, ino).copy()
            key = u64(ino) + name + b"\0"
            r = self.idx.visible(txn, XAT, key)
            if r is None or not r[1]:
                raise FSError(errno.ENODATA)
            self.idx.remove(txn, XAT, key)
            rec.ctime_ns = time.time_ns()
            self._put_inode(txn, rec)

    # -- content ---------------------------------------------------------------

    def _source(self, rec: Inode) -> tuple[int, int, int]:
        """Open ``rec``'s content: (fd, owner, owned blob)."""
        live = self.idx.live
        if rec.flags & F_BASE:
            return self.blobs.open_base(rec.tail), 0, NO_BLOB
        if rec.blob == NO_BLOB:
            return -1, 0, NO_BLOB
        owned = bool(rec.flags & F_OWNED) and rec.layer == live
        fd = self.blobs.open(rec.blob, write=owned)
        return fd, live if owned else 0, rec.blob if owned else NO_BLOB

    def acquire(self, ino: int) -> OpenData:
        od = self.files.get(ino)
        if od is not None:
            self._fresh(od)
        else:
            rec = self.getattr(ino)
            if stat.S_ISDIR(rec.mode):
                raise FSError(errno.EISDIR)
            fd, owner, blob = self._source(rec)
            # an orphan without open content: never write it back to the index
            od = OpenData(ino, fd, owner, self.epoch, blob=blob, orphan=ino in self.orphans)
            self.files[ino] = od
        od.refs += 1
        return od

    def release(self, od: OpenData) -> None:
        od.refs -= 1
        if od.refs <= 0 and not od.kept:
            self._close(od)

    def content(self, ino: int) -> OpenData:
        """The open content of ``ino`` for a request that names the inode
        rather than a handle. It stays open until ``forget(ino)``, or until
        it is the least recently used of too many."""
        od = self.files.pop(ino, None)
        if od is not None:
            self.files[ino] = od  # dicts keep order: most recent last
            od.kept = True
            return od
        od = self.acquire(ino)
        od.refs -= 1
        od.kept = True
        if len(self.files) > self.files_max:
            # close a batch of the least recent; a bounded scan, since held
            # orphans (which cannot be reopened) may sit in front
            spare = [o for o in itertools.islice(self.files.values(), 128)
                     if o.refs <= 0 and not o.orphan]
            for o in spare[:64]:
                self._close(o)
        return od

    def looked_up(self, ino: int) -> None:
        """The kernel was handed ``ino`` once more (see ``nlookup``)."""
        self.nlookup[ino] = self.nlookup.get(ino, 0) + 1

    def forget(self, ino: int, n: int) -> None:
        """The kernel forgets ``n`` of its lookups of ``ino``; at zero it
        dropped the inode and no process holds it open any more."""
        left = self.nlookup.pop(ino, 0) - n
        if left > 0:
            self.nlookup[ino] = left
            return
        od = self.files.get(ino)
        if od is not None and od.refs <= 0:
            self._close(od)
        self.orphans.pop(ino, None)

    def _close(self, od: OpenData) -> None:
        if not od.orphan:
            self.flush_dirty(od.ino)
        if od.fd >= 0:
            os.close(od.fd)
        if self.files.get(od.ino) is od:
            del self.files[od.ino]
            if not self.inode_handles:
                self.orphans.pop(od.ino, None)

    def _fresh(self, od: OpenData) -> None:
        """Re-resolve content opened before a rollback."""
        if od.epoch == self.epoch:
            return
        if od.orphan and od.ino in self.orphans:
            od.epoch = self.epoch  # in no state (see rollback): the same content
            return
        rec = self.getattr(od.ino)  # ESTALE if it does not exist in this state
        fd, owner, blob = self._source(rec)
        if od.fd >= 0:
            os.close(od.fd)
        od.fd, od.owner, od.blob, od.epoch = fd, owner, blob, self.epoch
        od.orphan = od.ino in self.orphans

    def read(self, od: OpenData, off: int, size: int) -> bytes:
        self._fresh(od)
        if od.fd < 0:
            return b""
        return os.pread(od.fd, size, off)

    def _dirty(self, ino: int) -> Inode:
        d = self.dirty.get(ino)
        if d is None:
            d = self.getattr(ino).copy()
            self.dirty[ino] = d
        return d

    def write(self, od: OpenData, off: int, buf: bytes) -> int:
        self._fresh(od)
        if od.owner != self.idx.live:
            self._writable(od, None)
        self._before_data()
        n = os.pwrite(od.fd, buf, off)
        self.unsynced.add(od.blob)
        self.unsynced_bytes += n
        if not self.written and self.on_written is not None:
            self.on_written()
        self.written.add(od.ino)
        d = self.orphans.get(od.ino) if od.orphan else self._dirty(od.ino)
        if d is not None:
            if off + n > d.size:
                d.size = off + n
            d.mtime_ns = d.ctime_ns = time.time_ns()
        return n

    def _writable(self, od: OpenData, keep: int | None) -> None:
        """Copy-up: give ``od`` a blob of the live layer holding the first
        ``keep`` bytes of its content (all of it when None)."""
        if od.owner == self.idx.live:
            return
        with self._write() as txn:
            rec = None if od.orphan else self.must(txn, od.ino).copy()
            size = rec.size if rec is not None else (os.fstat(od.fd).st_size if od.fd >= 0 else 0)
            if keep is not None:
                size = min(size, keep)
            blob = self.idx.next_id(txn, b"next_blob")
            fd = self.blobs.create(blob, od.fd if od.fd >= 0 else None, size)
            if rec is not None:
                rec.blob, rec.flags, rec.tail = blob, F_OWNED, b""
                rec.layer = self.idx.live  # this layer's blob: owned (see _put_inode)
                self._put_inode(txn, rec)
                self.idx.own_blob(txn, blob)
            else:
                self.blobs.delete([blob])
                blob = NO_BLOB
        if od.fd >= 0:
            os.close(od.fd)
        od.fd, od.owner, od.blob = fd, self.idx.live, blob

    def recover_sizes(self) -> int:
        """After a crash, the size of a file written in the live layer may
        not have reached the index (it is persisted on release, not per
        write), while its blob holds every write that returned. Take the
        blob's length as the truth; returns how many records were fixed."""
        fixed = 0
        with self._write() as txn:
            for table, prefix in list(self.idx.changes(txn, self.idx.live)):
                if table != INO:
                    continue
                rec = self.inode(txn, from_u64(prefix))
                if rec is not None:
                    rec = rec.copy()
                if rec is None or rec.layer != self.idx.live or not rec.flags & F_OWNED:
                    continue
                try:
                    size = os.stat(self.blobs.name(rec.blob), dir_fd=self.blobs.dir_fd).st_size
                except FileNotFoundError:
                    continue
                if size != rec.size:
                    rec.size = size
                    self._put_inode(txn, rec)
                    fixed += 1
        return fixed

    def flush_dirty(self, ino: int | None = None) -> None:
        self._flush_dirty(list(self.dirty) if ino is None else [ino])

    def _flush_dirty(self, inos: list[int]) -> None:
        inos = [i for i in inos if i in self.dirty]
        if not inos:
            return
        with self._write() as txn:
            for i in inos:
                self._put_inode(txn, self.dirty[i])

    def blob_fds(self, blobs: set[int]) -> list[int]:
        """A descriptor of each of ``blobs`` that still exists, for the
        caller to flush and close: a dup of the one open in ``files`` where
        there is one (much cheaper than opening it by name)."""
        open_fds = {od.blob: od.fd for od in self.files.values()
                    if od.blob in blobs and od.fd >= 0 and not od.orphan}
        fds: list[int] = []
        try:
            for b in sorted(blobs):
                fd = open_fds.get(b)
                if fd is not None:
                    fds.append(os.dup(fd))
                    continue
                try:
                    fds.append(self.blobs.open(b, write=False))
                except FileNotFoundError:
                    pass  # deleted since: nothing refers to it
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def write_back(self, start: Callable[[int], None]) -> None:
        """For the files written since the last call: persist their sizes
        and pass the descriptor of each written blob to ``start`` (which
        starts its write-out to disk)."""
        inos, self.written = self.written, set()
        self._flush_dirty(list(inos))
        for ino in inos:
            od = self.files.get(ino)
            if od is not None and od.fd >= 0 and od.blob in self.unsynced and not od.orphan:
                start(od.fd)

    # -- checkpoints -----------------------------------------------------------

    def checkpoint(self, label: str) -> tuple[int, set[int]]:
        """Freeze the live layer and push an empty one. Returns the new
        checkpoint's id and the blobs written since the last checkpoint; the
        caller makes those and the index durable (before answering, or in
        the background for ``durable=False``)."""
        self.flush_dirty()
        idx = self.idx
        with self._write_alone() as txn:
            old = idx.layers[idx.live]
            old.flags |= L_FROZEN
            old.label = label
            old.created_ns = time.time_ns()
            new = Layer(idx.next_id(txn, b"next_layer"), old.id, 0, old.created_ns)
            idx.put_layer(txn, old)
            idx.put_layer(txn, new)
            txn.put(b"live", u64(new.id), db=idx.meta)
        idx.layers[new.id] = new
        old.children.add(new.id)
        idx.push_live(new.id)
        unsynced, self.unsynced = self.unsynced, set()
        self.unsynced_bytes = 0
        unsynced.discard(NO_BLOB)  # orphans: nothing to keep
        return old.id, unsynced

    def checkpoint_layer(self, cid: int) -> Layer:
        lay = self.idx.layers.get(cid)
        if lay is None or not lay.frozen or lay.dropped:
            raise UnknownCheckpointError(
                f"no checkpoint {cid}: run 'deltafs list MOUNTPOINT' to see the checkpoints")
        return lay

    def rollback(self, cid: int) -> list[tuple[bytes, bytes]]:
        """Make the live state an empty layer on top of checkpoint ``cid``.
        Returns what differs between the old and the new view, as
        ``(table, prefix)``, for the kernel's caches. The discarded live
        layer is only marked dropped here: ``collect()`` deletes its keys
        and blobs later, off the critical path (or at the next mount)."""
        self.checkpoint_layer(cid)
        idx = self.idx
        old = idx.layers[idx.live]
        old_chain, new_chain = set(idx.chain(old.id)), set(idx.chain(cid))
        changed: set[tuple[bytes, bytes]] = set()
        with self._write_alone() as txn:
            for lid in old_chain ^ new_chain:
                changed.update(c for c in idx.changes(txn, lid) if c[0] != b"b")
            old.flags |= L_DROPPED
            idx.put_layer(txn, old)
            new = Layer(idx.next_id(txn, b"next_layer"), cid, 0, time.time_ns())
            idx.put_layer(txn, new)
            txn.put(b"live", u64(new.id), db=idx.meta)
        idx.layers[new.id] = new
        idx.layers[cid].children.add(new.id)
        idx.set_live(new.id)
        self.dirty.clear()
        # An unlinked file still open belongs to no state: its holder keeps
        # its content (as it keeps a pipe's), unless the target state has
        # the inode under a name: then that version is what it reads.
        if self.orphans:
            with idx.begin() as txn:
                for ino in [i for i in self.orphans if (r := idx.visible(txn, INO, u64(i))) and r[1]]:
                    del self.orphans[ino]
        self.unsynced.clear()
        self.unsynced_bytes = 0
        self.clear_caches()
        self.epoch += 1
        for od in self.files.values():
            # an unlinked file's own copy (its blob was deleted at the unlink:
            # only this descriptor holds it) stays writable in place
            private = od.orphan and od.ino in self.orphans and od.owner == old.id
            od.owner = new.id if private else 0
        return sorted(changed)

    def drop(self, cid: int) -> None:
        lay = self.checkpoint_layer(cid)
        lay.flags |= L_DROPPED
        with self._write() as txn:
            self.idx.put_layer(txn, lay)
        self.blobs.delete(self.collect())

    def collect(self) -> list[int]:
        """Free dropped layers: delete a leaf, merge one with a single child
        into that child; a layer with several children stays until they go.
        Returns the blobs that nothing refers to any more, for the caller to
        delete."""
        idx = self.idx
        garbage: list[int] = []
        merged = False
        progress = True
        while progress:
            progress = False
            for lay in [x for x in idx.layers.values() if x.dropped]:
                if len(lay.children) > 1:
                    continue
                with self._write_alone() as txn:
                    if not lay.children:
                        blobs = idx.delete_layer_keys(txn, lay.id)
                    else:
                        (cid,) = lay.children
                        child = idx.layers[cid]
                        blobs = idx.merge_layer_into(txn, lay.id, cid)
                        child.parent = lay.parent
                        idx.put_layer(txn, child)
                        merged = True
                        if lay.parent:
                            idx.layers[lay.parent].children.add(cid)
                if lay.parent:
                    idx.layers[lay.parent].children.discard(lay.id)
                del idx.layers[lay.id]
                garbage.extend(blobs)
                progress = True
        if merged:
            idx.set_live(idx.live)
            self.clear_caches()  # merged versions now carry other layer ids
        # an unlinked file may still be open without its content opened here
        # yet (the kernel opens files itself), also one a rollback discarded
        # the layer of: keep its blob for it; owned by no layer, the next
        # mount's sweep deletes it. One whose content is open needs no file.
        unopened = {rec.blob for ino, rec in self.orphans.items()
                    if (od := self.files.get(ino)) is None or od.fd < 0}
        return [b for b in garbage if b not in unopened]

    def _shown_parent(self, lid: int) -> int | None:
        p = self.idx.layers[lid].parent
        while p and self.idx.layers[p].dropped:
            p = self.idx.layers[p].parent
        return p or None

    def checkpoints(self) -> list[CheckpointInfo]:
        current = self._shown_parent(self.idx.live)
        return [CheckpointInfo(lay.id, self._shown_parent(lay.id), lay.label, lay.created_ns,
                               lay.id == current)
                for lay in sorted(self.idx.layers.values(), key=lambda x: x.id)
                if lay.frozen and not lay.dropped]

    def diff(self, a: int, b: int | None) -> Diff:
        self.checkpoint_layer(a)
        if b is not None:
            self.checkpoint_layer(b)
        self.flush_dirty()
        idx = self.idx
        va = set(idx.chain(a))
        vb = set(idx.chain(b if b is not None else idx.live))
        sa, sb = sorted(va), sorted(vb)
        added: list[str] = []
        modified: list[str] = []
        deleted: list[str] = []

        def inode(txn: Any, ino: int, anc: set[int]) -> tuple[int, Inode] | None:
            chain = sa if anc is va else sb
            r = idx.visible(txn, INO, u64(ino), anc, chain[-1], chain)
            return (r[0], Inode.decode(ino, r[0], r[1])) if r and r[1] else None

        def xattrs(txn: Any, ino: int, anc: set[int]) -> dict[bytes, bytes]:
            return {rest: bytes(v) for rest, _l, v in idx.scan_visible(txn, XAT, u64(ino), anc)
                    if v}

        def dir_changed(txn: Any, xa: int, ra: tuple[int, Inode], xb: int,
                        rb: tuple[int, Inode]) -> bool:
            """Whether a directory's own metadata differs. Its mtime, ctime,
            nlink and size follow its entries, which the walk reports: a
            directory counts as modified only for what was done to it (a
            chmod, a chown, an xattr), which needs a new version of it."""
            if xa == xb and ra[0] == rb[0]:
                return False
            a_, b_ = ra[1], rb[1]
            return ((a_.mode, a_.uid, a_.gid) != (b_.mode, b_.uid, b_.gid)
                    or xattrs(txn, xa, va) != xattrs(txn, xb, vb))

        def walk_all(txn: Any, ino: int, anc: set[int], path: str, out: list[str]) -> None:
            for name, child in self._entries(txn, ino, anc):
                p = path + "/" + name.decode(errors="surrogateescape")
                out.append(p)
                got = inode(txn, child, anc)
                if got and stat.S_ISDIR(got[1].mode):
                    walk_all(txn, child, anc, p, out)

        def walk(txn: Any, ia: int, ib: int, path: str) -> None:
            ea = dict(self._entries(txn, ia, va))
            eb = dict(self._entries(txn, ib, vb))
            for name in sorted(ea.keys() | eb.keys()):
                p = path + "/" + name.decode(errors="surrogateescape")
                xa, xb = ea.get(name), eb.get(name)
                ra = inode(txn, xa, va) if xa else None
                rb = inode(txn, xb, vb) if xb else None
                if ra is None and rb is None:
                    continue
                if ra is None:
                    assert rb is not None and xb is not None
                    added.append(p)
                    if stat.S_ISDIR(rb[1].mode):
                        walk_all(txn, xb, vb, p, added)
                elif rb is None:
                    assert xa is not None
                    deleted.append(p)
                    if stat.S_ISDIR(ra[1].mode):
                        walk_all(txn, xa, va, p, deleted)
                else:
                    assert xa is not None and xb is not None
                    da, db_ = stat.S_ISDIR(ra[1].mode), stat.S_ISDIR(rb[1].mode)
                    if da and db_:
                        if dir_changed(txn, xa, ra, xb, rb):
                            modified.append(p)
                        walk(txn, xa, xb, p)
                    elif xa != xb or ra[0] != rb[0]:
                        modified.append(p)

        with self._read() as txn:
            ra, rb = inode(txn, ROOT, va), inode(txn, ROOT, vb)
            if ra is not None and rb is not None and dir_changed(txn, ROOT, ra, ROOT, rb):
                modified.append("/")
            walk(txn, ROOT, ROOT, "")
        return Diff(sorted(added), sorted(modified), sorted(deleted))
