"""Bad input: a clear message, a non-zero exit, and nothing lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import deltafs
from deltafs.mounts import top_mount

from .conftest import Env


def deltafs_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deltafs.cli", *args], capture_output=True,
                          text=True, timeout=60)


def test_checkpoint_and_rollback_through_the_cli(env: Env) -> None:
    (env.mnt / "f").write_text("one")
    r = deltafs_cli("checkpoint", str(env.mnt), "--label", "cli")
    assert r.returncode == 0 and r.stdout.strip().isdigit(), r.stderr
    cid = r.stdout.strip()
    (env.mnt / "f").write_text("two")
    assert deltafs_cli("rollback", str(env.mnt), cid).returncode == 0
    assert (env.mnt / "f").read_text() == "one"
    r = deltafs_cli("list", str(env.mnt), "--json")
    assert r.returncode == 0 and '"label": "cli"' in r.stdout
    r = deltafs_cli("diff", str(env.mnt), "1", cid)
    assert r.returncode == 0 and "A /f" in r.stdout.splitlines()
    r = deltafs_cli("checkpoint", str(env.mnt), "--durable")  # returns once on disk
    assert r.returncode == 0 and int(r.stdout) > int(cid), r.stderr


def test_unknown_checkpoint_id(env: Env) -> None:
    (env.mnt / "f").write_text("keep me")
    r = deltafs_cli("rollback", str(env.mnt), "4242")
    assert r.returncode != 0 and "no checkpoint 4242" in r.stderr
    assert (env.mnt / "f").read_text() == "keep me", "a failed rollback must change nothing"
    r = deltafs_cli("drop", str(env.mnt), "4242")
    assert r.returncode != 0 and "no checkpoint 4242" in r.stderr


def test_path_that_is_not_a_deltafs_mount(tmp_path: Path) -> None:
    r = deltafs_cli("checkpoint", str(tmp_path))
    assert r.returncode != 0 and "is not a DeltaFS mount" in r.stderr
    r = deltafs_cli("list", "/proc")
    assert r.returncode != 0 and "is not a DeltaFS mount (it is a proc mount)" in r.stderr


def test_store_in_use_by_another_mount(env: Env, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    r = deltafs_cli(str(other), "--base", str(env.base), "--store", str(env.store))
    assert r.returncode != 0 and "in use by DeltaFS daemon" in r.stderr
    assert (env.mnt / "README").read_text() == "base readme\n"


def test_missing_base_directory(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    r = deltafs_cli(str(tmp_path / "mnt"), "--base", str(tmp_path / "nope"),
                    "--store", str(tmp_path / "s"))
    assert r.returncode != 0 and "base directory" in r.stderr and "nope" in r.stderr
    assert not (tmp_path / "s").exists(), "the failed mount left the store it created"


def test_store_inside_the_mount_point_or_the_base_is_refused(tmp_path: Path) -> None:
    # The daemon would serve its own index (and statfs of the store would
    # ask the daemon itself: a hang).
    d = tmp_path / "project"
    d.mkdir()
    (d / "keep").write_text("x")
    r = deltafs_cli(str(d), "--store", str(d / ".store"))
    assert r.returncode != 0 and "is inside the mount point" in r.stderr, r.stderr
    base, mnt = tmp_path / "base", tmp_path / "mnt"
    base.mkdir()
    mnt.mkdir()
    r = deltafs_cli(str(mnt), "--base", str(base), "--store", str(base / "s"))
    assert r.returncode != 0 and "is inside the base directory" in r.stderr, r.stderr
    with pytest.raises(deltafs.StorePlacementError):
        deltafs.mount(str(d), store=str(d / "sub" / "store"))


def test_mount_point_already_mounted(env: Env, tmp_path: Path) -> None:
    r = deltafs_cli(str(env.mnt), "--base", str(env.base), "--store", str(tmp_path / "s2"))
    assert r.returncode != 0 and "already has a DeltaFS mounted" in r.stderr
    assert (env.mnt / "README").read_text() == "base readme\n"
    assert not (tmp_path / "s2").exists(), "the failed mount left the store it created"


def test_a_bad_mount_option_is_named_and_leaves_nothing(env: Env, tmp_path: Path) -> None:
    mnt = tmp_path / "other"
    mnt.mkdir()
    for fg in ([], ["--foreground"]):
        r = deltafs_cli(str(mnt), "--base", str(env.base), "--store", str(tmp_path / "s3"),
                        "-o", "ro,bogus_opt", *fg)
        assert r.returncode != 0 and "does not understand" in r.stderr, r.stderr
        assert "ro,bogus_opt" in r.stderr
        assert not (tmp_path / "s3").exists(), "the failed mount left the store it created"
    # an existing store is left as it was, and mounts again
    (env.mnt / "kept").write_text("live")
    env.m.unmount()
    before = sorted(os.listdir(env.store))
    r = deltafs_cli(str(env.mnt), "--base", str(env.base), "--store", str(env.store),
                    "-o", "bogus_opt")
    assert r.returncode != 0 and "bogus_opt" in r.stderr
    assert sorted(os.listdir(env.store)) == before
    env.remount()
    assert (env.mnt / "kept").read_text() == "live"


def test_store_with_another_base_is_refused(env: Env, tmp_path: Path) -> None:
    env.m.unmount()
    other = tmp_path / "otherbase"
    other.mkdir()
    r = deltafs_cli(str(env.mnt), "--base", str(other), "--store", str(env.store))
    assert r.returncode != 0 and "was made from base" in r.stderr
    env.remount()
    assert (env.mnt / "README").read_text() == "base readme\n"


def test_unmount_of_a_mount_in_use_is_refused_and_changes_nothing(env: Env) -> None:
    # as umount(8): a writer with a file open keeps its mount (a lazy detach
    # would cut it off: ENOTCONN, its data lost)
    fd = os.open(env.mnt / "busy", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        r = deltafs_cli("unmount", str(env.mnt))
        assert r.returncode != 0 and "is in use" in r.stderr, r.stderr
        with pytest.raises(deltafs.MountBusyError):
            env.m.unmount()
        os.write(fd, b"still here")
    finally:
        os.close(fd)
    assert (env.mnt / "busy").read_bytes() == b"still here"
    r = deltafs_cli("unmount", str(env.mnt))
    assert r.returncode == 0, r.stderr
    env.remount()
    assert (env.mnt / "busy").read_bytes() == b"still here"


def test_unmount_of_a_dead_mount_detaches_it(env: Env) -> None:
    os.kill(env.m.status()["pid"], signal.SIGKILL)
    time.sleep(0.2)
    r = deltafs_cli("unmount", str(env.mnt))
    assert r.returncode == 0 and "was dead" in r.stderr, r.stderr
    assert top_mount(str(env.mnt)) is None or top_mount(str(env.mnt)).fstype != "fuse.deltafs"
    env.remount()
    assert (env.mnt / "README").read_text() == "base readme\n"


def test_a_daemon_that_dies_at_start_is_reported_with_its_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The log is in the store that the failed mount removes: its words go
    # into the error instead of a path that no longer exists.
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'boom: an import failed' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    (tmp_path / "mnt").mkdir()
    with pytest.raises(deltafs.DaemonError, match="status 3: boom: an import failed"):
        deltafs.mount(str(tmp_path / "mnt"), base=str(tmp_path), store=str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()
