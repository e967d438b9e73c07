"""Hypothesis stateful test: DeltaFS against a real directory as the oracle.

Random sequences of file operations, checkpoints and rollbacks to any earlier
checkpoint run on both. Each operation must succeed or fail the same way on
both (same errno); every third step and at the end both trees must agree on
names, types, modes, sizes, contents, link counts and symlink targets. The oracle keeps a
full copy (``cp -a``, hard links preserved) per checkpoint.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, rule,
                                 run_state_machine_as_test)

import deltafs

from .conftest import make_base, teardown

NAMES = ["a", "b", "c", "src", "pkg", "README"]
PATHS = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
DATA = st.binary(max_size=300) | st.sampled_from([b"", b"x" * 70000])


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        names = sorted(dirnames + filenames)
        out[os.path.relpath(dirpath, root)] = ("listing", names)
        for n in names:
            p = os.path.join(dirpath, n)
            s = os.lstat(p)
            key = os.path.relpath(p, root)
            kind = stat.S_IFMT(s.st_mode)
            if stat.S_ISREG(s.st_mode):
                with open(p, "rb") as f:
                    body: Any = f.read()
            elif stat.S_ISLNK(s.st_mode):
                body = os.readlink(p)
            else:
                body = None
            out[key] = (kind, stat.S_IMODE(s.st_mode), s.st_nlink,
                        s.st_size if not stat.S_ISDIR(s.st_mode) else None, body)
    return out


class Harness:
    """One mount shared by every example: each starts by rolling back to the
    base checkpoint, which is itself what is under test."""

    def __init__(self, tmp: Path, handles: bool) -> None:
        self.tmp = tmp
        self.handles = handles
        self.base = tmp / "base"
        self.mnt = tmp / "mnt"
        self.base.mkdir()
        self.mnt.mkdir()
        make_base(self.base)
        (self.base / "src" / "a").write_text("a")
        # DELTAFS_HANDLES=1: the daemon answers OPEN and OPENDIR with handles,
        # as it does with a stock pyfuse3, instead of leaving opens to the
        # kernel; DELTAFS_SPIN_US=0: and takes every request through trio
        env = {"DELTAFS_HANDLES": "1", "DELTAFS_SPIN_US": "0"} if handles else {}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            self.m = deltafs.mount(str(self.mnt), base=str(self.base), store=str(tmp / "store"))
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        assert self.m.status()["kernel_opens"] is not handles


@pytest.fixture(scope="module", params=["kernel-opens", "handles"])
def harness(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Harness]:
    h = Harness(tmp_path_factory.mktemp("stateful"), handles=request.param == "handles")
    try:
        yield h
    finally:
        teardown(h.mnt, h.m)


class FSMachine(RuleBasedStateMachine):
    h: Harness
    steps = 0

    @initialize()
    def start(self) -> None:
        self.h.m.rollback(1)
        self.fs = self.h.mnt
        self.oracle = self.h.tmp / "oracle"
        self.copies = self.h.tmp / "copies"
        for d in (self.oracle, self.copies):
            shutil.rmtree(d, ignore_errors=True)
        self.copies.mkdir()
        subprocess.run(["cp", "-a", str(self.h.base), str(self.oracle)], check=True)
        self.checkpoints: list[int] = [1]
        subprocess.run(["cp", "-a", str(self.oracle), str(self.copies / "1")], check=True)

    def both(self, fn: Callable[[Path], Any]) -> None:
        results = []
        for root in (self.oracle, self.fs):
            try:
                fn(root)
                results.append(None)
            except OSError as e:
                results.append(e.errno)
        assert results[0] == results[1], f"oracle errno {results[0]}, deltafs errno {results[1]}"

    @rule(path=PATHS, data=DATA, append=st.booleans())
    def write(self, path: str, data: bytes, append: bool) -> None:
        # os.open + os.write, as a shell's ">>" does: Python's open() would
        # fstat the file first, which refreshes what the kernel knows of it
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)

        def op(root: Path) -> None:
            fd = os.open(root / path, flags, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        self.both(op)

    @rule(path=PATHS, size=st.integers(0, 100000))
    def truncate(self, path: str, size: int) -> None:
        self.both(lambda r: os.truncate(r / path, size))

    @rule(path=PATHS, off=st.integers(0, 80000), data=st.binary(min_size=1, max_size=100))
    def pwrite(self, path: str, off: int, data: bytes) -> None:
        def op(root: Path) -> None:
            fd = os.open(root / path, os.O_WRONLY)
            try:
                os.pwrite(fd, data, off)
            finally:
                os.close(fd)
        self.both(op)

    @rule(path=PATHS)
    def mkdir(self, path: str) -> None:
        self.both(lambda r: os.mkdir(r / path))

    @rule(path=PATHS)
    def unlink(self, path: str) -> None:
        self.both(lambda r: os.unlink(r / path))

    @rule(path=PATHS)
    def rmdir(self, path: str) -> None:
        self.both(lambda r: os.rmdir(r / path))

    @rule(src=PATHS, dst=PATHS)
    def rename(self, src: str, dst: str) -> None:
        self.both(lambda r: os.rename(r / src, r / dst))

    @rule(src=PATHS, dst=PATHS)
    def link(self, src: str, dst: str) -> None:
        self.both(lambda r: os.link(r / src, r / dst, follow_symlinks=False))

    @rule(path=PATHS, dest=st.sampled_from(["a", "../b", "/nowhere"]))
    def symlink(self, path: str, dest: str) -> None:
        self.both(lambda r: os.symlink(dest, r / path))

    @rule(path=PATHS, mode=st.sampled_from([0o644, 0o600, 0o755, 0o700]))
    def chmod(self, path: str, mode: int) -> None:
        self.both(lambda r: os.chmod(r / path, mode, follow_symlinks=False)
                  if not os.path.islink(r / path) else None)

    @rule()
    def checkpoint(self) -> None:
        cid = self.h.m.checkpoint()
        subprocess.run(["cp", "-a", str(self.oracle), str(self.copies / str(cid))], check=True)
        self.checkpoints.append(cid)

    @rule(data=st.data())
    def rollback(self, data: st.DataObject) -> None:
        cid = data.draw(st.sampled_from(self.checkpoints))
        self.h.m.rollback(cid)
        shutil.rmtree(self.oracle)
        subprocess.run(["cp", "-a", str(self.copies / str(cid)), str(self.oracle)], check=True)

    # Comparing stats every file, and a stat makes the kernel fetch the
    # attributes a rollback invalidated: compared after every step, the
    # machine could never see an operation use stale ones (an append after a
    # rollback did, at the discarded branch's size). So: every third step,
    # and at the end.
    @rule(data=st.data(), path=PATHS, tail=st.binary(min_size=1, max_size=50))
    def rollback_then_append(self, data: st.DataObject, path: str, tail: bytes) -> None:
        # Nothing may look at the file between the two: an append right after
        # a rollback must use the rolled-back size, not one the kernel kept.
        self.rollback(data)

        def op(root: Path) -> None:
            fd = os.open(root / path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, tail)
            finally:
                os.close(fd)
        self.both(op)

    @invariant()
    def same_tree(self) -> None:
        FSMachine.steps += 1
        self.n = getattr(self, "n", 0) + 1
        if hasattr(self, "oracle") and self.n % 3 == 0:
            assert snapshot(self.fs) == snapshot(self.oracle)

    def teardown(self) -> None:
        if hasattr(self, "oracle"):
            assert snapshot(self.fs) == snapshot(self.oracle)


def test_deltafs_matches_a_real_directory(harness: Harness) -> None:
    FSMachine.h = harness
    FSMachine.steps = 0
    examples = int(os.environ.get("DELTAFS_EXAMPLES", "100"))
    if harness.handles:  # the fallback path: a lighter run
        examples = max(1, examples // 3)
    run_state_machine_as_test(FSMachine, settings=settings(
        max_examples=examples, stateful_step_count=30, deadline=None,
        suppress_health_check=list(HealthCheck)))
    assert FSMachine.steps >= examples * 5, "the machine ran too few steps to mean anything"
