"""Fixtures that mount a real DeltaFS and always take it down again."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import deltafs
from deltafs.mounts import top_mount


@dataclass
class Env:
    base: Path
    mnt: Path
    store: Path
    m: deltafs.Mount

    def remount(self) -> None:
        self.m = deltafs.mount(str(self.mnt), base=str(self.base), store=str(self.store))


def make_base(base: Path) -> None:
    (base / "src" / "pkg").mkdir(parents=True)
    (base / "src" / "pkg" / "mod.py").write_text("X = 1\n")
    (base / "src" / "pkg" / "data.bin").write_bytes(os.urandom(70000))
    (base / "README").write_text("base readme\n")
    (base / "empty").write_bytes(b"")
    os.link(base / "README", base / "README.link")
    os.symlink("src/pkg/mod.py", base / "mod-link")


def teardown(mnt: Path, m: deltafs.Mount | None) -> None:
    """One path for every way a test can end: ask nicely, then force."""
    pid = None
    if m is not None:
        pid = m.pid
        try:
            pid = m.status()["pid"]
            m.unmount(timeout=15)
        except Exception:
            pass
        m.close()
    top = top_mount(str(mnt))
    if top is not None and top.fstype == "fuse.deltafs":
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    base, mnt, store = tmp_path / "base", tmp_path / "mnt", tmp_path / "store"
    base.mkdir()
    mnt.mkdir()
    make_base(base)
    e = Env(base, mnt, store, deltafs.mount(str(mnt), base=str(base), store=str(store)))
    try:
        yield e
    finally:
        teardown(mnt, e.m)
        shutil.rmtree(tmp_path, ignore_errors=True)
