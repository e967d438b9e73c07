"""The view on a real store, without FUSE: what a failed commit leaves."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from deltafs.daemon import Filesystem
from deltafs.index import INO, Index
from deltafs.records import u64
from deltafs.view import ROOT


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
