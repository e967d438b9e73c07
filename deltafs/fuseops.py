"""The pyfuse3 request handlers: a thin translation onto ``View``.

Handlers run on the trio loop and call the view directly: an LMDB read costs
about a microsecond and an unsynced write transaction a few, much less than
a thread hop would. Errors become ``FUSEError`` in exactly one place
(``_errors``). Timeouts are long and negative lookups are cached, because a
rollback invalidates exactly the entries and inodes that changed
(``invalidate``).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from .errors import FSError
from .index import ENT, INO
from .records import Inode, from_u64
from .view import DOTDOT_OFFSET, OpenData, View

log = logging.getLogger("deltafs")

TIMEOUT = 300.0
T = TypeVar("T")


def _errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from e
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def attrs(rec: Inode) -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    a.st_ino = rec.ino
    a.generation = 0
    a.entry_timeout = TIMEOUT
    a.attr_timeout = TIMEOUT
    a.st_mode = rec.mode
    a.st_nlink = rec.nlink
    a.st_uid = rec.uid
    a.st_gid = rec.gid
    a.st_rdev = rec.rdev
    a.st_size = rec.size
    a.st_blksize = 4096
    a.st_blocks = (rec.size + 511) // 512
    a.st_atime_ns = rec.atime_ns
    a.st_mtime_ns = rec.mtime_ns
    a.st_ctime_ns = rec.ctime_ns
    return a


def _negative() -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    a.st_ino = 0
    a.entry_timeout = TIMEOUT
    return a


# The deltafs build of pyfuse3 (see ``third_party/``) passes the inode where
# the kernel sends a handle of 0, which it does once OPEN or OPENDIR answered
# ENOSYS. Then the kernel opens files and directories without asking us (no
# OPEN, RELEASE, OPENDIR, RELEASEDIR: half the requests of a grep), keeps
# their pages cached (FOPEN_KEEP_CACHE) and directory listings too
# (FOPEN_CACHE_DIR), so a second walk of a tree costs no request at all.
# With a stock pyfuse3 we keep file and directory handles (as we do when
# DELTAFS_HANDLES=1 asks for them, which the tests use to cover that path).
INODE_HANDLES_AVAILABLE: bool = getattr(pyfuse3, "HANDLE_ZERO_PASSES_INODE", False)

# The deltafs build of pyfuse3 can also wait a little for the next request
# after answering one, instead of going back through trio's scheduler and
# epoll: a program that waits for each answer (rm -rf, a grep over a tree
# whose attributes the kernel must fetch again) sends its next request some
# 10-40 us later. Measured on the Django tree, rm -rf: 1.05-1.17 s without,
# 0.54-0.76 s with 50 us. The wait is bounded (then the normal path, and at
# most REQUEST_BURST requests in a row) and lets go of the GIL.
REQUEST_SPIN_US = 50
REQUEST_BURST = 64


def configure_request_spin() -> None:
    """Turn the wait on (``DELTAFS_SPIN_US`` overrides the time; 0 turns it
    off). A stock pyfuse3 has no such wait: nothing to do."""
    spin = getattr(pyfuse3, "set_request_spin", None)
    if spin is None:
        return
    try:
        us = int(os.environ.get("DELTAFS_SPIN_US", REQUEST_SPIN_US))
    except ValueError:
        log.warning("DELTAFS_SPIN_US=%r is not a number of microseconds: using %d",
                    os.environ["DELTAFS_SPIN_US"], REQUEST_SPIN_US)
        us = REQUEST_SPIN_US
    spin(us * 1000, REQUEST_BURST if us > 0 else 0)


class Operations(pyfuse3.Operations):
    enable_writeback_cache = False  # every write() must reach us before it returns

    def __init__(self, view: View, statfs_path: str, inode_handles: bool) -> None:
        super().__init__()
        self.inode_handles = inode_handles
        # without OPEN, O_TRUNC must reach us as a SETATTR: the patched
        # pyfuse3 then turns off atomic O_TRUNC
        self.no_open_support = inode_handles
        self.view = view
        # a descriptor opened before the mount: the store might sit under it
        # one day, and statvfs() of a path there would ask this very daemon
        self.statfs_fd = os.open(statfs_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.handles: dict[int, OpenData] = {}
        self.dirs: dict[int, int] = {}  # directory handle -> inode (stock pyfuse3 only)
        self.next_fh = 1
        view.inode_handles = inode_handles

    def _fh(self) -> int:
        fh = self.next_fh
        self.next_fh += 1
        return fh

    def _entry(self, rec: Inode) -> pyfuse3.EntryAttributes:
        """``rec`` handed to the kernel as an entry: one more lookup of it."""
        if self.inode_handles:
            self.view.looked_up(rec.ino)
        return attrs(rec)

    @_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        rec = self.view.lookup(parent_inode, name)
        return self._entry(rec) if rec is not None else _negative()

    @_errors
    async def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return attrs(self.view.getattr(inode))

    @_errors
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any
                      ) -> pyfuse3.EntryAttributes:
        rec = self.view.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
        )
        return attrs(rec)

    @_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return self.view.readlink(inode)

    @_errors
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
                    ) -> pyfuse3.EntryAttributes:
        return self._entry(self.view.make(parent_inode, name, mode & ~ctx.umask, ctx.uid, ctx.gid,
                                          rdev))

    @_errors
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any
                    ) -> pyfuse3.EntryAttributes:
        mode = stat.S_IFDIR | (stat.S_IMODE(mode) & ~ctx.umask)
        return self._entry(self.view.make(parent_inode, name, mode, ctx.uid, ctx.gid))

    @_errors
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any
                      ) -> pyfuse3.EntryAttributes:
        return self._entry(self.view.make(parent_inode, name, stat.S_IFLNK | 0o777, ctx.uid,
                                          ctx.gid, target=target))

    @_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self.view.unlink(parent_inode, name, want_dir=False)

    @_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self.view.unlink(parent_inode, name, want_dir=True)

    @_errors
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        self.view.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_errors
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
                   ) -> pyfuse3.EntryAttributes:
        return self._entry(self.view.link(inode, new_parent_inode, new_name))

    def _content(self, fh: int) -> OpenData:
        return self.view.content(fh) if self.inode_handles else self.handles[fh]

    @_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if self.inode_handles:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # once: the kernel stops asking
        od = self.view.acquire(inode)
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            # libfuse asks for atomic O_TRUNC: the kernel leaves it to us.
            try:
                self.view.truncate(inode, 0)
            except BaseException:
                self.view.release(od)
                raise
        fh = self._fh()
        self.handles[fh] = od
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_errors
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        mode = stat.S_IFREG | (stat.S_IMODE(mode) & ~ctx.umask)
        rec = self.view.make(parent_inode, name, mode, ctx.uid, ctx.gid)
        if self.inode_handles:
            # handle 0: reads and writes will name the inode; a RELEASE (sent
            # while no OPEN has yet been refused) has nothing to do
            return pyfuse3.FileInfo(fh=0, keep_cache=True), self._entry(rec)
        od = self.view.acquire(rec.ino)
        fh = self._fh()
        self.handles[fh] = od
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), attrs(rec)

    @_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.view.read(self._content(fh), off, size)

    @_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return self.view.write(self._content(fh), off, buf)

    async def flush(self, fh: int) -> None:
        # ENOSYS once makes the kernel stop sending FLUSH on every close():
        # one round trip less per open file. Writes are synchronous (no
        # writeback cache), so there is never anything to flush; the size and
        # mtime that writes changed are persisted on release and checkpoint.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        od = self._content(fh)
        if not od.orphan and od.epoch == self.view.epoch:
            self.view.flush_dirty(od.ino)
        # A dup: a copy-up by another handle may swap od.fd meanwhile.
        fd = os.dup(od.fd) if od.fd >= 0 else -1
        self.view.commit_batch()
        await trio.to_thread.run_sync(_sync_file_and_index, fd, self.view.idx.sync)

    @_errors
    async def release(self, fh: int) -> None:
        if fh:
            self.view.release(self.handles.pop(fh))

    @_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        if self.inode_handles:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # once: the kernel stops asking
        fh = self._fh()
        self.dirs[fh] = inode
        return fh

    @_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        ino = fh if self.inode_handles else self.dirs[fh]
        for off, name, rec in self.view.readdir_from(ino, start_id):
            if not pyfuse3.readdir_reply(token, name, attrs(rec), off):
                break
            # the kernel takes no reference from "." and ".." in a READDIRPLUS
            # answer (fuse_direntplus_link skips them) and so never forgets them
            if self.inode_handles and off > DOTDOT_OFFSET:
                self.view.looked_up(rec.ino)

    @_errors
    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    @_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.view.commit_batch()
        await trio.to_thread.run_sync(self.view.idx.sync)

    @_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = os.fstatvfs(self.statfs_fd)
        d = pyfuse3.StatvfsData()
        for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                  "f_ffree", "f_favail", "f_namemax"):
            setattr(d, k, getattr(s, k))
        return d

    @_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        self.view.setxattr(inode, name, value)

    @_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return self.view.getxattr(inode, name)

    @_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return self.view.listxattr(inode)

    @_errors
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        self.view.removexattr(inode, name)

    async def forget(self, inode_list: Any) -> None:
        # Inodes live in the index; only their open content is ours to close.
        if self.inode_handles:
            for ino, n in inode_list:
                try:
                    self.view.forget(ino, n)
                except Exception:  # no reply to carry an error: log, keep serving
                    log.exception("forget(%d) failed", ino)


def _sync_file_and_index(fd: int, sync_index: Callable[[], None]) -> None:
    """fsync(2) off the trio loop: the disk flush would stall every request."""
    try:
        if fd >= 0:
            os.fdatasync(fd)
    finally:
        if fd >= 0:
            os.close(fd)
    sync_index()


def invalidate(changed: list[tuple[bytes, bytes]]) -> int:
    """Tell the kernel to forget what a rollback changed. Runs in a worker
    thread: the calls block until the kernel is done, while the loop keeps
    serving the requests that the invalidation may trigger."""
    n = 0
    inodes = {from_u64(prefix) for table, prefix in changed if table == INO}
    # A directory whose entries differ has a stale cached listing, even where
    # its own record did not change: invalidating the inode drops its pages.
    inodes |= {from_u64(prefix[:8]) for table, prefix in changed if table == ENT}
    for table, prefix in changed:
        if table == ENT:
            n += _quietly(pyfuse3.invalidate_entry, from_u64(prefix[:8]), prefix[8:-1])
    for ino in sorted(inodes):
        n += _quietly(pyfuse3.invalidate_inode, ino)
    return n


def _quietly(fn: Callable[..., None], *args: Any) -> int:
    try:
        fn(*args)
    except OSError as e:
        if e.errno != errno.ENOENT:  # the kernel never cached it: nothing to do
            raise FSError(e.errno or errno.EIO, f"cache invalidation failed: {e}") from e
        return 0
    return 1
