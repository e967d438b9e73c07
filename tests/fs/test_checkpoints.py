"""Checkpoint, rollback, the tree, durability and the kernel's caches."""

from __future__ import annotations

import hashlib
import mmap
import os
import signal
import time
from pathlib import Path

import pytest

import deltafs

from .conftest import Env


def tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "L:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "D"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_rollback_to_sibling_branch_and_forward_again(env: Env) -> None:
    m, mnt = env.m, env.mnt
    (mnt / "f").write_text("root")
    c0 = m.checkpoint("c0")
    (mnt / "f").write_text("branch A")
    (mnt / "a-only").write_text("a")
    ca = m.checkpoint("A")
    m.rollback(c0)
    assert (mnt / "f").read_text() == "root" and not (mnt / "a-only").exists()
    (mnt / "f").write_text("branch B")
    os.rename(mnt / "src", mnt / "src-b")
    cb = m.checkpoint("B")
    m.rollback(ca)
    assert (mnt / "f").read_text() == "branch A" and (mnt / "a-only").read_text() == "a"
    assert (mnt / "src/pkg/mod.py").exists() and not (mnt / "src-b").exists()
    m.rollback(cb)
    assert (mnt / "f").read_text() == "branch B" and not (mnt / "a-only").exists()
    assert (mnt / "src-b/pkg/mod.py").read_text() == "X = 1\n"
    tree = {c.id: c for c in m.list()}
    assert tree[ca].parent == c0 and tree[cb].parent == c0 and tree[c0].parent == 1
    assert tree[cb].current and not tree[ca].current
    assert [tree[i].label for i in (c0, ca, cb)] == ["c0", "A", "B"]


def test_unsaved_changes_discarded_and_caches_not_stale(env: Env) -> None:
    m, mnt = env.m, env.mnt
    c = m.checkpoint()
    before = tree_digest(mnt)
    # Fill the kernel caches with the new state, then roll back under them.
    (mnt / "README").write_text("changed")
    (mnt / "new").write_text("new")
    os.unlink(mnt / "empty")
    os.mkdir(mnt / "nd")
    os.chmod(mnt / "src/pkg/mod.py", 0o600)
    assert (mnt / "README").read_text() == "changed" and (mnt / "new").exists()
    assert not (mnt / "ghost").exists()  # cache a negative entry ...
    c2 = m.checkpoint()
    (mnt / "ghost").write_text("boo")  # ... that a later state fills
    m.rollback(c)
    assert tree_digest(mnt) == before
    assert os.stat(mnt / "src/pkg/mod.py").st_mode & 0o777 == 0o644
    assert (mnt / "README").read_text() == "base readme\n"
    assert not (mnt / "new").exists() and (mnt / "empty").exists()
    m.rollback(c2)
    assert (mnt / "README").read_text() == "changed" and not (mnt / "ghost").exists()


def test_cached_directory_listings_follow_rollback(env: Env) -> None:
    # The kernel keeps directory listings cached between walks: a rollback
    # must drop exactly the listings that differ, also where the directory
    # itself is one of the base's.
    m, mnt = env.m, env.mnt
    d = mnt / "src/pkg"
    before = sorted(os.listdir(d))
    c1 = m.checkpoint()
    (d / "new.py").write_text("n")
    os.unlink(d / "mod.py")
    assert sorted(os.listdir(d)) == sorted(set(before) - {"mod.py"} | {"new.py"})
    c2 = m.checkpoint()
    for _ in range(2):  # the second pass reads the kernel's cache
        m.rollback(c1)
        assert sorted(os.listdir(d)) == before and sorted(os.listdir(d)) == before
        assert sorted(os.listdir(mnt)) == sorted(os.listdir(env.base))
        m.rollback(c2)
        assert sorted(os.listdir(d)) == sorted(set(before) - {"mod.py"} | {"new.py"})
        assert (d / "new.py").read_text() == "n" and not (d / "mod.py").exists()


def test_open_fd_across_rollback_reads_rolled_back_content(env: Env) -> None:
    m, mnt = env.m, env.mnt
    (mnt / "f").write_text("version one")
    c = m.checkpoint()
    (mnt / "f").write_text("version two, longer")
    (mnt / "gone").write_text("only after")
    with open(mnt / "f", "rb") as f, open(mnt / "gone", "rb") as g:
        assert f.read() == b"version two, longer"
        m.rollback(c)
        f.seek(0)
        assert f.read() == b"version one"
        with pytest.raises(OSError):  # its file does not exist in this state
            g.seek(0)
            g.read()


def test_checkpoint_contains_every_returned_write(env: Env) -> None:
    m, mnt = env.m, env.mnt
    fd = os.open(mnt / "log", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"first;")
        c = m.checkpoint()  # no close, no fsync before it
        os.write(fd, b"second;")
    finally:
        os.close(fd)
    m.rollback(c)
    assert (mnt / "log").read_bytes() == b"first;"


def test_writes_through_a_shared_mmap_are_in_the_checkpoint_and_stay_out_of_a_rollback(
        env: Env) -> None:
    # The kernel holds pages written through a shared mapping back (write()
    # goes through at once); a checkpoint must contain them, and a rollback
    # must not receive the discarded state's pages afterwards.
    size = 4 << 20
    p = env.mnt / "mapped.bin"
    p.write_bytes(b"A" * size)
    env.m.checkpoint()
    with open(p, "r+b") as f, mmap.mmap(f.fileno(), size) as mm:
        for off in range(0, size, 4096):
            mm[off:off + 1] = b"B"
        want = bytes(mm[:])
        c = env.m.checkpoint()
        for off in range(0, size, 4096):
            mm[off:off + 1] = b"C"
        env.m.rollback(c)
        assert bytes(mm[:]) == want, "the mapping shows the discarded state's pages"
    assert p.read_bytes() == want
    env.m.rollback(c)
    assert p.read_bytes() == want


@pytest.mark.parametrize("change", ["chmod", "touch", "rename", "link", "setxattr"])
@pytest.mark.parametrize("after_rollback", [False, True])
def test_a_write_after_a_metadata_change_never_reaches_the_checkpoint(
        env: Env, change: str, after_rollback: bool) -> None:
    # A metadata change makes a new version of the file's record in the live
    # layer; its content still belongs to the checkpoint's layer and must be
    # copied up by the next write, not written in place.
    m, mnt = env.m, env.mnt
    (mnt / "f").write_bytes(b"ORIGINAL")
    c = m.checkpoint()
    if after_rollback:
        m.rollback(c)
    target = mnt / "f"
    if change == "chmod":
        os.chmod(target, 0o600)
    elif change == "touch":
        os.utime(target, (1, 2))
    elif change == "rename":
        target = mnt / "f2"
        os.rename(mnt / "f", target)
    elif change == "link":
        target = mnt / "f2"
        os.link(mnt / "f", target)
    else:
        os.setxattr(target, "user.tag", b"1")
    fd = os.open(target, os.O_WRONLY)
    try:
        os.pwrite(fd, b"XX", 0)
    finally:
        os.close(fd)
    assert target.read_bytes() == b"XXIGINAL"
    m.rollback(c)
    assert (mnt / "f").read_bytes() == b"ORIGINAL", "the write went into the checkpoint"
    (mnt / "f").unlink()  # and deleting the file now must not delete the checkpoint's content
    m.rollback(c)
    assert (mnt / "f").read_bytes() == b"ORIGINAL"


def test_diff_and_drop(env: Env) -> None:
    m, mnt = env.m, env.mnt
    c0 = m.checkpoint()
    (mnt / "added").write_text("x")
    (mnt / "README").write_text("mod")
    os.unlink(mnt / "empty")
    c1 = m.checkpoint()
    d = m.diff(c0, c1)
    # README.link is a hard link to README: it changed too
    assert d.added == ["/added"] and d.deleted == ["/empty"]
    assert d.modified == ["/README", "/README.link"]
    (mnt / "live-only").write_text("y")
    assert m.diff(c1).added == ["/live-only"]
    blobs_before = len(os.listdir(env.store / "blobs"))
    m.rollback(c0)
    m.drop(c1)
    assert c1 not in {c.id for c in m.list()}
    assert len(os.listdir(env.store / "blobs")) < blobs_before
    with pytest.raises(deltafs.UnknownCheckpointError):
        m.rollback(c1)
    # Dropping an interior checkpoint keeps its descendants intact.
    (mnt / "a").write_text("a")
    ca = m.checkpoint()
    (mnt / "b").write_text("b")
    cb = m.checkpoint()
    m.drop(ca)
    m.rollback(c0)
    m.rollback(cb)
    assert (mnt / "a").read_text() == "a" and (mnt / "b").read_text() == "b"
    assert {c.id: c.parent for c in m.list()}[cb] == c0


def test_diff_reports_a_directory_whose_own_metadata_changed(env: Env) -> None:
    # Only what was done to the directory itself counts: a new entry changes
    # its mtime, ctime, size and (for a subdirectory) nlink, and is reported
    # as the entry.
    m, mnt = env.m, env.mnt
    for d in ("tagged", "busy", "quiet"):
        os.mkdir(mnt / d)
    os.setxattr(mnt / "quiet", "user.k", b"same")
    c0 = m.checkpoint()
    os.chmod(mnt / "src", 0o700)
    os.chown(mnt / "src/pkg", 1234, 5678)
    os.setxattr(mnt / "tagged", "user.tag", b"x")
    (mnt / "busy/new").write_text("n")
    os.mkdir(mnt / "busy/sub")
    os.setxattr(mnt / "quiet", "user.k", b"same")  # a new version, the same values
    c1 = m.checkpoint()
    d = m.diff(c0, c1)
    assert d.modified == ["/src", "/src/pkg", "/tagged"]
    assert d.added == ["/busy/new", "/busy/sub"] and d.deleted == []
    os.chmod(mnt, 0o700)
    assert m.diff(c1).modified == ["/"]


def test_deep_tree_of_checkpoints(env: Env) -> None:
    m, mnt = env.m, env.mnt
    ids = []
    for i in range(60):
        (mnt / f"f{i % 7}").write_text(str(i))
        ids.append(m.checkpoint())
    for i in (3, 59, 0, 31, 45):
        m.rollback(ids[i])
        for k in range(7):
            last = max((j for j in range(i + 1) if j % 7 == k), default=None)
            p = mnt / f"f{k}"
            if last is None:
                assert not p.exists()
            else:
                assert p.read_text() == str(last)


def test_remount_resumes_tree_and_live_state(env: Env) -> None:
    m, mnt = env.m, env.mnt
    (mnt / "kept").write_text("checkpointed")
    c = m.checkpoint("before remount")
    (mnt / "live").write_text("live, unsaved")
    with open(mnt / "kept", "a") as f:
        f.write(" + live")
    m.unmount()
    assert not (mnt / "kept").exists()
    env.remount()
    assert (mnt / "live").read_text() == "live, unsaved"
    assert (mnt / "kept").read_text() == "checkpointed + live"
    assert any(x.id == c and x.label == "before remount" for x in env.m.list())
    env.m.rollback(c)
    assert (mnt / "kept").read_text() == "checkpointed" and not (mnt / "live").exists()


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "flushed-in-background"])
def test_kill_9_then_every_checkpoint_reads_back_bit_exact(env: Env, durable: bool) -> None:
    # durable=False (the sandbox's way): the daemon answers before the disk
    # flush; a crash of the daemon right after must lose nothing either.
    m, mnt = env.m, env.mnt
    digests = {}
    for i in range(5):
        (mnt / f"data{i}").write_bytes(os.urandom(5000 * (i + 1)))
        (mnt / "README").write_text(f"round {i}")
        if i == 2:
            os.rename(mnt / "src", mnt / "src2")
        c = m.checkpoint(f"r{i}", durable=durable)
        digests[c] = tree_digest(mnt)
    (mnt / "live").write_bytes(b"z" * 10000)
    os.kill(m.status()["pid"], signal.SIGKILL)
    time.sleep(0.2)
    with pytest.raises(deltafs.DaemonError):
        m.checkpoint()
    env.remount()  # the dead mount is detached and the store reopened
    # a flush the dead daemon left pending was done by the new one at mount
    with open(os.path.join(env.m.store, "flush.pending"), "rb") as f:
        assert f.read() == b"0"
    live = tree_digest(mnt)
    assert live["live"] == hashlib.sha256(b"z" * 10000).hexdigest()
    for c, want in digests.items():
        env.m.rollback(c)
        assert tree_digest(mnt) == want, f"checkpoint {c} changed across the crash"


def test_background_flush_then_sync_and_a_durable_checkpoint(env: Env) -> None:
    m, mnt = env.m, env.mnt
    ids = []
    for i in range(20):
        (mnt / f"f{i}").write_bytes(os.urandom(20000))
        ids.append(m.checkpoint(f"lazy {i}", durable=False))
    assert m.sync() >= 0.0
    (mnt / "last").write_text("durable")
    c = m.checkpoint("durable", durable=True)
    assert {x.id for x in m.list()} >= set(ids) | {c}
    m.rollback(ids[4])
    assert sorted(p.name for p in mnt.iterdir() if p.name.startswith("f")) == sorted(f"f{i}" for i in range(5))
    assert not (mnt / "last").exists()


def blob_bytes(e: Env) -> int:
    d = e.store / "blobs"
    return sum((d / n).stat().st_size for n in os.listdir(d))


def test_drop_frees_what_only_the_dropped_checkpoint_used(env: Env) -> None:
    # A's versions that its child replaced or deleted are garbage once A is
    # dropped; those the child kept, renamed, re-stamped or re-linked are not.
    m, mnt = env.m, env.mnt
    mb = 1 << 20
    data = {n: os.urandom(mb) for n in ("big", "gone", "kept", "linked", "untouched")}
    for n, b in data.items():
        (mnt / n).write_bytes(b)
    os.link(mnt / "linked", mnt / "linked2")
    a = m.checkpoint("A")
    big2 = os.urandom(mb)
    (mnt / "big").write_bytes(big2)
    os.unlink(mnt / "gone")
    os.chmod(mnt / "kept", 0o600)
    os.rename(mnt / "kept", mnt / "kept2")
    os.unlink(mnt / "linked2")
    b = m.checkpoint("B")
    want = tree_digest(mnt)
    assert blob_bytes(env) == 6 * mb
    m.drop(a)
    assert blob_bytes(env) == 4 * mb, "the dropped checkpoint's replaced blobs were kept"
    (mnt / "big").write_bytes(os.urandom(mb))  # the live layer now replaces B's big
    m.rollback(b)
    assert tree_digest(mnt) == want
    assert (mnt / "big").read_bytes() == big2 and (mnt / "kept2").read_bytes() == data["kept"]
    assert os.stat(mnt / "kept2").st_mode & 0o777 == 0o600
    assert (mnt / "linked").read_bytes() == data["linked"] and os.stat(mnt / "linked").st_nlink == 1
    assert (mnt / "untouched").read_bytes() == data["untouched"]
    # the child is the live layer: it replaced big, so B's big goes with B
    (mnt / "big").write_bytes(b"small")
    m.drop(b)
    assert blob_bytes(env) == 3 * mb + len(b"small")
    env.m.unmount()
    env.remount()  # the next mount's sweep finds nothing of the survivors to delete
    assert (mnt / "kept2").read_bytes() == data["kept"] and (mnt / "big").read_bytes() == b"small"
    assert (mnt / "untouched").read_bytes() == data["untouched"]


def test_drop_keeps_the_content_of_an_unlinked_file_still_open(env: Env) -> None:
    m, mnt = env.m, env.mnt
    data = os.urandom(100000)
    (mnt / "f").write_bytes(data)
    a = m.checkpoint()
    m.unmount()
    env.remount()  # the daemon has no content of f open
    with open(mnt / "f", "rb") as f:
        os.unlink(mnt / "f")
        env.m.drop(a)  # the live layer deleted f: A's blob is its last copy
        assert f.read() == data
