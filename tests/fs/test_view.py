"""The view on a real store, without FUSE: what a failed commit leaves."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyfuse3
import pytest

from deltafs.daemon import Filesystem
from deltafs.fuseops import Operations
from deltafs.index import INO, Index
from deltafs.records import u64
from deltafs.view import ROOT, View


def test_a_transaction_that_cannot_commit_loses_no_file(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # An unlink whose transaction fails after the file's inode was dropped
    # (here: the parent's update hits a full disk) must leave the file as it
    # was: still named, its content and unflushed size intact, its blob on disk.
    (tmp_path / "base").mkdir()
    (tmp_path / "store").mkdir()
    base_fd = os.open(tmp_path / "base", os.O_RDONLY | os.O_DIRECTORY)
    fs = Filesystem(str(tmp_path / "store"), base_fd, "test base")
    try:
        v = fs.view
        v.inode_handles = True  # the mode in which an unlink also keeps the content open
        rec = v.make(ROOT, b"keep", stat.S_IFREG | 0o644, 0, 0)
        v.write(v.content(rec.ino), 0, b"precious" * 1000)
        v.flush_dirty()
        v.write(v.content(rec.ino), 0, b"PRECIOUS" * 1001)  # a size still only in memory
        want = b"PRECIOUS" * 1001
        real_put = Index.put

        def full_disk(self: Index, txn: object, table: bytes, key: bytes, value: bytes) -> None:
            if table == INO and key == u64(ROOT):  # the parent's update, after the drop
                raise OSError(errno.ENOSPC, "No space left on device")
            real_put(self, txn, table, key, value)

        monkeypatch.setattr(Index, "put", full_disk)
        with pytest.raises(OSError):
            v.unlink(ROOT, b"keep", want_dir=False)
        monkeypatch.undo()
        found = v.lookup(ROOT, b"keep")
        assert found is not None and found.ino == rec.ino and found.nlink == 1
        assert rec.ino not in v.orphans and not v.content(rec.ino).orphan
        assert v.getattr(rec.ino).size == len(want)
        assert v.read(v.content(rec.ino), 0, 1 << 20) == want
        v.flush_dirty()
        blob = v.getattr(rec.ino).blob
        assert os.path.exists(os.path.join(str(tmp_path / "store"), "blobs", v.blobs.name(blob)))
        v.unlink(ROOT, b"keep", want_dir=False)  # and once the disk has room, it goes
        assert v.lookup(ROOT, b"keep") is None
    finally:
        fs.close()
        os.close(base_fd)


def _open_view(tmp_path: Path) -> tuple[Filesystem, int]:
    (tmp_path / "base").mkdir(exist_ok=True)
    (tmp_path / "store").mkdir(exist_ok=True)
    base_fd = os.open(tmp_path / "base", os.O_RDONLY | os.O_DIRECTORY)
    return Filesystem(str(tmp_path / "store"), base_fd, "test base"), base_fd


@contextmanager
def _reopened(tmp_path: Path) -> Iterator[View]:
    """The store in tmp_path, opened (again, after a crash or a clean close), closed after."""
    fs, base_fd = _open_view(tmp_path)
    try:
        yield fs.view
    finally:
        fs.close()
        os.close(base_fd)


def _crash(fs: Filesystem, base_fd: int) -> None:
    """What kill -9 leaves: what was committed, not the open batch."""
    fs.view.idx.env.sync(True)
    if fs.view._batch is not None:
        fs.view._batch.abort()
        fs.view._batch = None
    fs.close()
    os.close(base_fd)


def test_a_batch_of_operations_is_atomic_per_operation_and_durable_once_committed(
        tmp_path: Path) -> None:
    # Group commit: operations share one open transaction, each in its own
    # child; a failing one leaves the others, reads see the batch before it
    # commits, and a store opened again sees exactly what was committed.
    fs, base_fd = _open_view(tmp_path)
    try:
        v = fs.view
        v.batching = True
        d = v.make(ROOT, b"d", stat.S_IFDIR | 0o755, 0, 0)
        v.make(d.ino, b"inside", stat.S_IFREG | 0o644, 0, 0)
        with pytest.raises(OSError) as e:
            v.unlink(ROOT, b"d", want_dir=True)  # not empty: this child aborts alone
        assert e.value.errno == errno.ENOTEMPTY
        v.make(ROOT, b"after", stat.S_IFREG | 0o644, 0, 0)
        assert v._batch is not None, "the operations were not batched"
        assert v.lookup(d.ino, b"inside") is not None and v.lookup(ROOT, b"after") is not None
        v.commit_batch()
        assert v._batch is None
        v.make(ROOT, b"uncommitted", stat.S_IFREG | 0o644, 0, 0)  # a crash loses this one
    finally:
        _crash(fs, base_fd)
    with _reopened(tmp_path) as v:
        d2 = v.lookup(ROOT, b"d")
        assert d2 is not None and v.lookup(d2.ino, b"inside") is not None
        assert v.lookup(ROOT, b"after") is not None
        assert v.lookup(ROOT, b"uncommitted") is None


def test_a_crash_keeps_a_prefix_of_the_operations_even_with_content_written_at_once(
        tmp_path: Path) -> None:
    # Content goes to blob files at once, the index in batches: a write
    # commits the batch first, so a crash never keeps a write and loses a
    # rename answered before it.
    fs, base_fd = _open_view(tmp_path)
    try:
        v = fs.view
        f = v.make(ROOT, b"journal", stat.S_IFREG | 0o644, 0, 0)
        v.write(v.content(f.ino), 0, b"one;")
        v.make(ROOT, b"a", stat.S_IFREG | 0o644, 0, 0)
        v.batching = True
        v.rename(ROOT, b"a", ROOT, b"b", 0)
        v.write(v.content(f.ino), 4, b"two;")  # after the rename: the rename must survive with it
        v.make(ROOT, b"later", stat.S_IFREG | 0o644, 0, 0)
        v.flush_dirty()
    finally:
        _crash(fs, base_fd)
    with _reopened(tmp_path) as v:
        assert v.lookup(ROOT, b"a") is None and v.lookup(ROOT, b"b") is not None
        assert v.lookup(ROOT, b"later") is None
        j = v.lookup(ROOT, b"journal")
        assert j is not None and v.read(v.content(j.ino), 0, 100) == b"one;two;"


def test_a_batch_that_cannot_commit_stops_everything_and_loses_no_file(tmp_path: Path) -> None:
    # The requests of a batch were answered before it commits; if the commit
    # fails (a full disk), the daemon stops as a crash would (on_batch_lost)
    # and the store keeps the state before the batch: nothing the batch
    # doomed is deleted.
    fs, base_fd = _open_view(tmp_path)
    try:
        v = fs.view
        keep = v.make(ROOT, b"keep", stat.S_IFREG | 0o644, 0, 0)
        v.write(v.content(keep.ino), 0, b"precious" * 100)
        v.flush_dirty()
        blob = v.getattr(keep.ino).blob
        lost: list[BaseException] = []
        v.on_batch_lost = lost.append
        v.batching = True
        v.unlink(ROOT, b"keep", want_dir=False)
        v.make(ROOT, b"new", stat.S_IFREG | 0o644, 0, 0)

        class FullDisk:
            def __init__(self, txn: object) -> None:
                self.txn = txn

            def commit(self) -> None:
                self.txn.abort()  # type: ignore[attr-defined]
                raise OSError(errno.ENOSPC, "No space left on device")

        v._batch = FullDisk(v._batch)
        with pytest.raises(OSError):
            v.commit_batch()
        assert len(lost) == 1 and isinstance(lost[0], OSError)
        assert os.path.exists(os.path.join(str(tmp_path / "store"), "blobs", v.blobs.name(blob)))
    finally:
        v.dirty.clear()
        fs.close()
        os.close(base_fd)
    with _reopened(tmp_path) as v:
        found = v.lookup(ROOT, b"keep")
        assert found is not None and found.ino == keep.ino
        assert v.lookup(ROOT, b"new") is None
        assert v.read(v.content(keep.ino), 0, 1 << 20) == b"precious" * 100


async def test_dot_and_dotdot_in_a_listing_are_not_lookups(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel takes no reference from "." and ".." in a READDIRPLUS answer
    # and so sends no FORGET for them: counted, the directory and its parent
    # would never be forgotten (an rmdir'd one would stay an orphan for good).
    with _reopened(tmp_path) as v:
        d = v.make(ROOT, b"d", stat.S_IFDIR | 0o755, 0, 0)
        f = v.make(d.ino, b"f", stat.S_IFREG | 0o644, 0, 0)
        ops = Operations(v, str(tmp_path), inode_handles=True)
        listed: list[bytes] = []

        def reply(token: object, name: bytes, attr: object, off: int) -> bool:
            listed.append(name)
            return True

        monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
        await ops.readdir(d.ino, 0, None)
        assert listed == [b".", b"..", b"f"]
        assert v.nlookup == {f.ino: 1}
