"""Making a checkpoint durable with as few disk flushes as possible.

A checkpoint is on disk when the content of every blob written since the
last one, the index (LMDB's ``data.mdb``) and their metadata (sizes, new
names) are. The obvious way, ``fdatasync`` per blob then ``fsync`` of the
index, commits the filesystem journal and flushes the disk cache once per
file: measured here 13 ms for 100 files, 90 ms for 1,000. ``syncfs`` does it
once, but also waits for every unrelated dirty page on the filesystem
(measured: 443 ms with 1 GiB written elsewhere).

Facts about ext4 and XFS that give a third way: their journal is global, so
committing it for one inode commits every metadata change made before; and
the commit is written behind a cache flush, so data written to the device
before it is durable once the commit is. So: ``sync_file_range`` (write and
wait, no flush) on each blob and on the index, then a small write to a
marker file and ``fsync`` of the marker: one journal commit and one cache
flush for the whole checkpoint (measured: 1.1 ms for 100 files, 8 ms for
1,000). On any other filesystem the obvious way is used.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Callable

from .mounts import mount_table

_libc = ctypes.CDLL(None, use_errno=True)
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4
_WRITE_AND_WAIT = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER

GLOBAL_JOURNAL = {"ext4", "xfs"}


def fs_type(path: str) -> str:
    """The type of the filesystem holding ``path`` (longest mount prefix)."""
    path = os.path.realpath(path)
    best, kind = "", ""
    for m in mount_table():
        mp = m.mountpoint.rstrip("/") or "/"
        if (path == mp or path.startswith(mp + "/") or mp == "/") and len(mp) >= len(best):
            best, kind = mp, m.fstype
    return kind


def syncfs(path: str) -> None:
    """Flush the whole filesystem holding ``path`` (used once, at the mount
    after a crash that left checkpoints not yet flushed)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}")
    finally:
        os.close(fd)


def _range(fd: int, flags: int) -> None:
    if _sync_file_range(fd, 0, 0, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"sync_file_range: {os.strerror(err)}")


class PendingFlag:
    """One byte in ``STORE/flush.pending``: ``1`` while checkpoints are
    committed but not yet on disk. Set and cleared with ``pwrite`` on a
    descriptor kept open, because creating and deleting a marker file costs
    0.3-1 ms here, on the path of every checkpoint that does not wait for the
    disk (the default). A crash of the daemon keeps the byte (the kernel has
    it): the next mount sees it
    and flushes the store's filesystem. A missing or empty file (a store
    written by an older daemon that used the file's existence) reads as set."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.was_set = os.pread(self.fd, 1, 0) != b"0"

    def set(self) -> None:
        os.pwrite(self.fd, b"1", 0)

    def clear(self) -> None:
        os.pwrite(self.fd, b"0", 0)

    def close(self) -> None:
        os.close(self.fd)


class Flusher:
    def __init__(self, store: str, blob_dir_fd: int, index_file: str) -> None:
        self.kind = fs_type(store)
        self.journaled = self.kind in GLOBAL_JOURNAL
        self.blob_dir_fd = blob_dir_fd
        self.index_fd = os.open(index_file, os.O_RDONLY | os.O_CLOEXEC)
        self.marker = os.open(os.path.join(store, "durable.marker"),
                              os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.count = 0

    def flush(self, fds: list[int], sync_index: Callable[[], None]) -> None:
        """Make the blobs open as ``fds`` and the index durable, the blobs
        first; closes ``fds``."""
        try:
            if not fds:
                sync_index()  # one fdatasync: nothing else to order
            elif self.journaled:
                # start every write-out, then wait: the I/O overlaps
                for fd in fds + [self.index_fd]:
                    _range(fd, SYNC_FILE_RANGE_WRITE)
                for fd in fds + [self.index_fd]:
                    _range(fd, _WRITE_AND_WAIT)
                self.count += 1
                os.pwrite(self.marker, struct.pack("<Q", self.count), 0)
                os.fsync(self.marker)
            else:
                for fd in fds:
                    os.fdatasync(fd)
                os.fsync(self.blob_dir_fd)
                sync_index()
        finally:
            for fd in fds:
                os.close(fd)

    def start_writeback(self, fd: int) -> None:
        """Start writing a closed blob to disk now (no wait, no flush)."""
        if self.journaled:
            try:
                _range(fd, SYNC_FILE_RANGE_WRITE)
            except OSError:
                pass  # only an optimisation: the checkpoint's flush still runs

    def close(self) -> None:
        os.close(self.marker)
        os.close(self.index_fd)
