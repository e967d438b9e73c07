"""POSIX behaviour a build or test workload relies on, on a real mount."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

import deltafs
from deltafs.index import INO, Index
from deltafs.records import u64

from .conftest import Env, make_base, teardown

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4


def renameat2(a: Path, b: Path, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, bytes(a), AT_FDCWD, bytes(b), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def blob_count(e: Env) -> int:
    return len(os.listdir(e.store / "blobs"))


def test_base_is_visible_and_reads_do_not_copy_up(env: Env) -> None:
    m = env.mnt
    assert (m / "README").read_text() == "base readme\n"
    assert (m / "src/pkg/data.bin").read_bytes() == (env.base / "src/pkg/data.bin").read_bytes()
    assert os.readlink(m / "mod-link") == "src/pkg/mod.py"
    assert (m / "mod-link").read_text() == "X = 1\n"
    assert (m / "empty").read_bytes() == b""
    with open(m / "README", "r+b") as f:  # opened for write, not written
        assert f.read() == b"base readme\n"
    assert blob_count(env) == 0
    (m / "README").write_text("new\n")
    assert blob_count(env) == 1
    assert (env.base / "README").read_text() == "base readme\n", "the base is never written"


def test_files_write_truncate_append(env: Env) -> None:
    p = env.mnt / "f"
    p.write_bytes(b"hello world")
    with open(p, "ab") as f:
        f.write(b"!!")
    assert p.read_bytes() == b"hello world!!"
    os.truncate(p, 5)
    assert p.read_bytes() == b"hello"
    os.truncate(p, 8)
    assert p.read_bytes() == b"hello\0\0\0"
    with open(p, "r+b") as f:
        f.seek(100000)
        f.write(b"x")
    assert p.stat().st_size == 100001
    p.write_bytes(b"short")  # O_TRUNC
    assert p.read_bytes() == b"short"
    big = os.urandom(3 << 20)
    (env.mnt / "big").write_bytes(big)
    assert (env.mnt / "big").read_bytes() == big


def test_umask_modes_and_setattr(env: Env) -> None:
    old = os.umask(0o022)
    try:
        (env.mnt / "f").write_text("x")
        os.mkdir(env.mnt / "d", 0o777)
    finally:
        os.umask(old)
    assert stat.S_IMODE((env.mnt / "f").stat().st_mode) == 0o644
    assert stat.S_IMODE((env.mnt / "d").stat().st_mode) == 0o755
    os.chmod(env.mnt / "f", 0o600)
    os.chown(env.mnt / "f", 1234, 5678)
    os.utime(env.mnt / "f", ns=(1_000_000_000, 2_000_000_000))
    st = (env.mnt / "f").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 1234, 5678)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000, 2_000_000_000)
    os.chmod(env.mnt / "README", 0o400)  # metadata change of a base file
    assert stat.S_IMODE((env.mnt / "README").stat().st_mode) == 0o400
    assert (env.mnt / "README").read_text() == "base readme\n"


def test_directories_and_nlink(env: Env) -> None:
    m = env.mnt
    n0 = os.stat(m).st_nlink
    os.mkdir(m / "a")
    os.mkdir(m / "a/b")
    assert os.stat(m).st_nlink == n0 + 1
    assert os.stat(m / "a").st_nlink == 3
    with pytest.raises(OSError) as ei:
        os.rmdir(m / "a")
    assert ei.value.errno == errno.ENOTEMPTY
    with pytest.raises(FileExistsError):
        os.mkdir(m / "a")
    os.rmdir(m / "a/b")
    os.rmdir(m / "a")
    assert os.stat(m).st_nlink == n0
    with pytest.raises(IsADirectoryError):
        os.unlink(m / "src")
    with pytest.raises(NotADirectoryError):
        os.rmdir(m / "README")


def test_rename_directory_from_base_with_contents(env: Env) -> None:
    m = env.mnt
    ino = (m / "src/pkg/mod.py").stat().st_ino
    os.mkdir(m / "lib")
    os.rename(m / "src", m / "lib/src2")
    assert not (m / "src").exists()
    assert (m / "lib/src2/pkg/mod.py").read_text() == "X = 1\n"
    assert (m / "lib/src2/pkg/mod.py").stat().st_ino == ino
    assert sorted(os.listdir(m / "lib/src2/pkg")) == ["data.bin", "mod.py"]
    assert os.stat(m / "lib").st_nlink == 3
    (m / "lib/src2/pkg/mod.py").write_text("X = 2\n")
    os.rename(m / "lib/src2", m / "src")
    assert (m / "src/pkg/mod.py").read_text() == "X = 2\n"


def test_rename_files_and_flags(env: Env) -> None:
    m = env.mnt
    (m / "a").write_text("A")
    (m / "b").write_text("B")
    with pytest.raises(FileExistsError):
        renameat2(m / "a", m / "b", RENAME_NOREPLACE)
    renameat2(m / "a", m / "b", RENAME_EXCHANGE)
    assert ((m / "a").read_text(), (m / "b").read_text()) == ("B", "A")
    os.rename(m / "a", m / "b")  # replace
    assert not (m / "a").exists() and (m / "b").read_text() == "B"
    os.mkdir(m / "d1")
    os.mkdir(m / "d2")
    (m / "d2/x").write_text("x")
    with pytest.raises(OSError) as ei:
        os.rename(m / "d1", m / "d2")
    assert ei.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    os.rename(m / "d2", m / "d1")  # onto an empty directory
    assert (m / "d1/x").read_text() == "x" and not (m / "d2").exists()
    with pytest.raises(IsADirectoryError):
        os.rename(m / "b", m / "d1")
    with pytest.raises(NotADirectoryError):
        os.rename(m / "d1", m / "b")


def test_rename_whiteout_is_refused_not_ignored(env: Env) -> None:
    # A whiteout at the old name is what overlayfs-on-overlayfs and some
    # container tools ask for; a plain rename instead would silently lie.
    m = env.mnt
    (m / "a").write_text("A")
    for flags in (RENAME_WHITEOUT, RENAME_WHITEOUT | RENAME_NOREPLACE):
        with pytest.raises(OSError) as ei:
            renameat2(m / "a", m / "b", flags)
        assert ei.value.errno == errno.EINVAL
        assert (m / "a").read_text() == "A" and not (m / "b").exists()


def test_hard_links_across_copy_up(env: Env) -> None:
    m = env.mnt
    a, b = m / "README", m / "README.link"
    assert a.stat().st_nlink == 2 and a.stat().st_ino == b.stat().st_ino
    with open(b, "a") as f:
        f.write("more\n")
    assert a.read_text() == "base readme\nmore\n"
    assert a.stat().st_ino == b.stat().st_ino and a.stat().st_nlink == 2
    env.m.checkpoint()
    os.link(a, m / "third")
    assert b.stat().st_nlink == 3
    (m / "third").write_text("all\n")
    assert a.read_text() == b.read_text() == "all\n"
    os.unlink(a)
    assert b.stat().st_nlink == 2
    with pytest.raises(PermissionError):
        os.link(m / "src", m / "dirlink")


def test_symlink_fifo_xattr_statfs(env: Env) -> None:
    m = env.mnt
    os.symlink("../target", m / "ln")
    assert os.readlink(m / "ln") == "../target"
    assert stat.S_ISLNK(os.lstat(m / "ln").st_mode)
    os.mkfifo(m / "fifo")
    assert stat.S_ISFIFO(os.stat(m / "fifo").st_mode)
    os.setxattr(m / "README", "user.k", b"v1")
    os.setxattr(m / "README", "user.j", b"")
    assert os.getxattr(m / "README", "user.k") == b"v1"
    assert sorted(os.listxattr(m / "README")) == ["user.j", "user.k"]
    os.removexattr(m / "README", "user.k")
    with pytest.raises(OSError) as ei:
        os.getxattr(m / "README", "user.k")
    assert ei.value.errno == errno.ENODATA
    s = os.statvfs(m)
    assert s.f_bsize > 0 and s.f_blocks > 0


def test_extended_attributes_of_the_base_are_imported(tmp_path: Path) -> None:
    base, mnt = tmp_path / "base", tmp_path / "mnt"
    base.mkdir()
    mnt.mkdir()
    make_base(base)
    os.setxattr(base / "README", "user.tag", b"hard-linked")  # README.link is the same inode
    os.setxattr(base / "src/pkg", "user.dir", b"\0binary\xff")
    os.setxattr(base, "user.root", b"r")
    m = deltafs.mount(str(mnt), base=str(base), store=str(tmp_path / "store"))
    try:
        assert os.getxattr(mnt / "README", "user.tag") == b"hard-linked"
        assert os.getxattr(mnt / "README.link", "user.tag") == b"hard-linked"
        assert os.listxattr(mnt / "src/pkg") == ["user.dir"]
        assert os.getxattr(mnt / "src/pkg", "user.dir") == b"\0binary\xff"
        assert os.getxattr(mnt, "user.root") == b"r"
        assert os.listxattr(mnt / "mod-link", follow_symlinks=False) == []
        assert os.listxattr(mnt / "empty") == []
        c = m.checkpoint()
        os.removexattr(mnt / "README", "user.tag")
        assert os.listxattr(mnt / "README.link") == []
        m.rollback(c)
        assert os.getxattr(mnt / "README", "user.tag") == b"hard-linked"
        assert os.getxattr(base / "README", "user.tag") == b"hard-linked", "the base is never written"
    finally:
        teardown(mnt, m)


def test_unlinked_open_file_stays_readable(env: Env) -> None:
    p = env.mnt / "tmp"
    p.write_bytes(b"data")
    fd = os.open(p, os.O_RDWR)
    try:
        os.unlink(p)
        assert not p.exists()
        os.pwrite(fd, b"DATA!", 0)
        assert os.pread(fd, 10, 0) == b"DATA!"
    finally:
        os.close(fd)


def test_unlinked_open_base_file_stays_readable_and_fstat_works(env: Env) -> None:
    p = env.mnt / "src/pkg/data.bin"
    want = (env.base / "src/pkg/data.bin").read_bytes()
    fd = os.open(p, os.O_RDONLY)
    try:
        os.unlink(p)
        assert not p.exists()
        assert os.fstat(fd).st_size == len(want) and os.fstat(fd).st_nlink == 0
        assert os.pread(fd, len(want) + 1, 0) == want
    finally:
        os.close(fd)
    assert (env.base / "src/pkg/data.bin").read_bytes() == want  # the base is never written


def test_an_unlinked_open_file_stays_readable_and_writable_across_rollbacks(env: Env) -> None:
    # a TemporaryFile: in no checkpoint, its holder keeps its content
    f = tempfile.TemporaryFile(dir=env.mnt)
    try:
        f.write(b"x" * 100000)
        f.flush()
        c = env.m.checkpoint()
        os.pwrite(f.fileno(), b"after", 0)
        env.m.rollback(c)
        assert os.pread(f.fileno(), 200000, 0) == b"after" + b"x" * 99995
        assert os.fstat(f.fileno()).st_size == 100000 and os.fstat(f.fileno()).st_nlink == 0
        os.pwrite(f.fileno(), b"again", 100000)
        env.m.rollback(c)  # twice: the layer of the first one is gone by now
        env.m.drop(c)
        assert os.pread(f.fileno(), 200000, 0) == b"after" + b"x" * 99995 + b"again"
    finally:
        f.close()
    # unlinked after the checkpoint: rolled back, it has its name again, and
    # the descriptor reads that state's version
    p = env.mnt / "named"
    p.write_bytes(b"checkpointed")
    c = env.m.checkpoint()
    fd = os.open(p, os.O_RDWR)
    try:
        os.unlink(p)
        os.pwrite(fd, b"CHANGED", 0)
        env.m.rollback(c)
        assert p.read_bytes() == b"checkpointed"
        assert os.pread(fd, 100, 0) == b"checkpointed" and os.fstat(fd).st_nlink == 1
    finally:
        os.close(fd)


def test_an_unlinked_open_file_never_reaches_the_index(env: Env) -> None:
    # Changed through its descriptor after the unlink (also after a rollback
    # made the daemon re-resolve the content it keeps open), an unlinked
    # file must stay out of the index: written there, no one would free it.
    p = env.mnt / "f"
    p.write_bytes(b"one")
    c = env.m.checkpoint()
    assert p.read_bytes() == b"one"
    env.m.rollback(c)
    fd = os.open(p, os.O_RDWR)
    try:
        ino = os.fstat(fd).st_ino
        os.unlink(p)
        os.pwrite(fd, b"two!", 0)
        os.ftruncate(fd, 2)
        os.fchmod(fd, 0o600)
        st = os.fstat(fd)
        assert os.pread(fd, 10, 0) == b"tw" and st.st_nlink == 0 and st.st_size == 2
    finally:
        os.close(fd)
    env.m.checkpoint()
    store = env.m.store
    env.m.unmount()
    idx = Index(os.path.join(store, "index"))
    try:
        idx.load()
        with idx.begin() as txn:
            r = idx.visible(txn, INO, u64(ino))
        assert r is None or not r[1], "the unlinked inode was written to the index"
    finally:
        idx.close()


def test_more_open_files_than_the_daemon_keeps_open(env: Env) -> None:
    # The daemon keeps the content of a few hundred files open between
    # requests and closes the least recently used: every file must still
    # read back, be written, checkpointed and rolled back right.
    d = env.mnt / "many"
    d.mkdir()
    n = 700
    for i in range(n):
        (d / f"f{i}").write_bytes(b"v1 %d" % i)
    fds = [os.open(d / f"f{i}", os.O_RDWR) for i in range(0, n, 7)]
    try:
        c = env.m.checkpoint()
        for i in range(n):
            assert (d / f"f{i}").read_bytes() == b"v1 %d" % i
        for k, fd in enumerate(fds):
            os.pwrite(fd, b"v2", 0)
        for i in range(1, n, 2):
            (d / f"f{i}").write_bytes(b"second %d" % i)
        for i in range(n):
            want = b"second %d" % i if i % 2 else (b"v2 %d" % i if i % 7 == 0 else b"v1 %d" % i)
            assert (d / f"f{i}").read_bytes() == want, i
            assert (d / f"f{i}").stat().st_size == len(want)
        env.m.rollback(c)
        for i in range(n):
            assert (d / f"f{i}").read_bytes() == b"v1 %d" % i
        for fd in fds:  # descriptors from before the rollback read the rolled-back content
            assert os.pread(fd, 20, 0).startswith(b"v1 ")
    finally:
        for fd in fds:
            os.close(fd)


def test_readdir_large_directory_is_complete_and_stable(env: Env) -> None:
    d = env.mnt / "many"
    d.mkdir()
    names = {f"f{i:04d}" for i in range(1500)}
    for n in names:
        (d / n).write_bytes(b"")
    assert set(os.listdir(d)) == names
    # Deleting while iterating must not skip or repeat the others.
    seen = []
    with os.scandir(d) as it:
        for i, e in enumerate(it):
            seen.append(e.name)
            if i == 10:
                for n in sorted(names)[-100:]:
                    os.unlink(d / n)
    assert len(seen) == len(set(seen))
    kept = names - set(sorted(names)[-100:])
    assert kept <= set(seen)


SYS_getdents64 = {"x86_64": 217, "aarch64": 61}[os.uname().machine]


def getdents(path: Path, start: int) -> list[tuple[int, int, str]]:
    """The raw listing of ``path`` from offset ``start`` as (ino, offset,
    name): what readdir(3) sees, "." and ".." included."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    out = []
    try:
        os.lseek(fd, start, os.SEEK_SET)
        buf = ctypes.create_string_buffer(1 << 16)
        while True:
            n = _libc.syscall(SYS_getdents64, fd, buf, len(buf))
            if n < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            if n == 0:
                return out
            pos = 0
            while pos < n:
                ino, off, reclen = struct.unpack_from("<QqH", buf.raw, pos)
                name = buf.raw[pos + 19:pos + reclen].split(b"\0", 1)[0]
                out.append((ino, off, name.decode()))
                pos += reclen
    finally:
        os.close(fd)


@pytest.mark.parametrize("handles", [False, True], ids=["kernel-opens", "handles"])
def test_readdir_lists_dot_and_dotdot_and_resumes_at_every_offset(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handles: bool) -> None:
    base, mnt = tmp_path / "base", tmp_path / "mnt"
    base.mkdir()
    mnt.mkdir()
    make_base(base)
    if handles:
        monkeypatch.setenv("DELTAFS_HANDLES", "1")
    m = deltafs.mount(str(mnt), base=str(base), store=str(tmp_path / "store"))
    try:
        assert m.status()["kernel_opens"] is not handles
        ls = subprocess.run(["ls", "-a", str(mnt / "src")], capture_output=True, text=True,
                            check=True)
        assert ls.stdout.split() == [".", "..", "pkg"]
        d = mnt / "src/pkg"
        for i in range(20):
            (d / f"f{i}").write_text("x")
        for _ in range(2):  # the second time from the kernel's cache, if it keeps one
            full = getdents(d, 0)
            assert [e[2] for e in full[:2]] == [".", ".."]
            assert full[0][0] == d.stat().st_ino and full[1][0] == (mnt / "src").stat().st_ino
            assert sorted(e[2] for e in full[2:]) == sorted(os.listdir(d))
            assert len({e[1] for e in full}) == len(full), "two entries share an offset"
            for i, (_ino, off, _name) in enumerate(full):
                assert getdents(d, off) == full[i + 1:], f"resumed after {full[i][2]!r}"
        root = getdents(mnt, 0)
        assert [e[2] for e in root[:2]] == [".", ".."]
        assert root[0][0] == root[1][0] == mnt.stat().st_ino
    finally:
        teardown(mnt, m)


def test_inode_numbers_stable_across_checkpoint_and_rollback(env: Env) -> None:
    m = env.mnt
    (m / "f").write_text("1")
    ino = (m / "f").stat().st_ino
    base_ino = (m / "README").stat().st_ino
    c = env.m.checkpoint()
    (m / "f").write_text("2")
    (m / "README").write_text("changed")
    assert (m / "f").stat().st_ino == ino and (m / "README").stat().st_ino == base_ino
    env.m.rollback(c)
    assert (m / "f").stat().st_ino == ino and (m / "README").stat().st_ino == base_ino
    assert (m / "f").read_text() == "1"



def test_copy_up_of_a_sparse_file_keeps_its_holes(env: Env) -> None:
    # a 1-byte write into a checkpointed 1 GiB sparse file copies its data,
    # not 1 GiB of zeros
    p = env.mnt / "sparse"
    with open(p, "wb") as f:
        f.truncate(1 << 30)
        f.seek((1 << 30) - 3)
        f.write(b"end")
    env.m.checkpoint()
    with open(p, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"X")
    used = sum(os.stat(e.path).st_blocks for e in os.scandir(env.store / "blobs")) * 512
    assert used < 10 << 20, f"{used} bytes of blobs for a sparse file"
    with open(p, "rb") as f:
        assert os.fstat(f.fileno()).st_size == 1 << 30
        f.seek((1 << 20) - 1)
        assert f.read(2) == b"\0X"
        f.seek((1 << 30) - 4)
        assert f.read() == b"\0end"


def test_names_longer_than_255_bytes_are_refused_everywhere(env: Env) -> None:
    (env.mnt / "src").exists()
    target = env.mnt / "t"
    target.write_bytes(b"x")
    for n in (256, 600):
        long = env.mnt / ("n" * n)
        for op in (lambda: os.link(target, long), lambda: os.stat(long), lambda: long.write_bytes(b""),
                   lambda: os.mkdir(long), lambda: os.rename(target, long)):
            with pytest.raises(OSError) as e:
                op()
            assert e.value.errno == errno.ENAMETOOLONG
    assert sorted(os.listdir(env.mnt / "src")) == sorted(os.listdir(env.base / "src"))


def test_times_beyond_2262_are_clamped_not_an_error(env: Env) -> None:
    p = env.mnt / "future"
    p.write_bytes(b"")
    os.utime(p, ns=(1 << 64, 1 << 64))  # year 2554
    assert os.stat(p).st_mtime_ns == (1 << 63) - 1
    os.utime(p, ns=(0, -(1 << 64)))
    assert os.stat(p).st_mtime_ns == -(1 << 63)


def test_a_base_with_times_beyond_2262_mounts(tmp_path: Path) -> None:
    base, mnt = tmp_path / "base", tmp_path / "mnt"
    base.mkdir()
    mnt.mkdir()
    (base / "future").write_bytes(b"f")
    os.utime(base / "future", ns=(1 << 63, 1 << 63))  # ext4 stores up to 2446
    m = deltafs.mount(str(mnt), base=str(base), store=str(tmp_path / "store"))
    try:
        assert os.stat(mnt / "future").st_mtime_ns == (1 << 63) - 1
        assert (mnt / "future").read_bytes() == b"f"
    finally:
        teardown(mnt, m)


def test_posix_acls_are_refused_not_stored_and_ignored(env: Env) -> None:
    p = env.mnt / "acl"
    p.write_bytes(b"")
    # user::rw- user:1001:--- group::r-- mask::r-- other::r--
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, perm, i) for t, perm, i in
                                          [(1, 6, 0xFFFFFFFF), (2, 0, 1001), (4, 4, 0xFFFFFFFF),
                                           (0x10, 4, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF)])
    with pytest.raises(OSError) as e:
        os.setxattr(p, "system.posix_acl_access", acl)
    assert e.value.errno == errno.EOPNOTSUPP
    assert "system.posix_acl_access" not in os.listxattr(p)
