"""Every refusal: a clear error naming the pid, and nothing changed."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from typing import Any, Callable, Iterator

import pytest

from deltacr import (AlreadyTraced, MultiThreaded, NoSuchCheckpoint, NoSuchProcess, NotPermitted,
                     ProcessCheckpointer, ProcessIsZombie)
from deltacr_helpers import ROOT, Lab, tracer_of


def _free_pid() -> int:
    pid_max = int(open("/proc/sys/kernel/pid_max").read())
    for pid in range(pid_max - 1, 1, -1):
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    raise AssertionError("no free pid")


def test_pid_that_does_not_exist(store: str) -> None:
    pid = _free_pid()
    with pytest.raises(NoSuchProcess, match=f"pid {pid} does not exist"):
        ProcessCheckpointer(pid, store)


def test_zombie(lab: Lab, store: str) -> None:
    # our own child that exited and was not reaped yet
    p = subprocess.Popen(["true"])
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
    try:
        with pytest.raises(ProcessIsZombie, match=f"pid {p.pid} is a zombie"):
            ProcessCheckpointer(p.pid, store)
    finally:
        p.wait()


def test_already_traced_and_nothing_changed(lab: Lab, store: str) -> None:
    r = lab.repl("x = 5")
    first = lab.checkpointer(r.pid, store)
    cid = first.checkpoint().id
    with pytest.raises(AlreadyTraced, match=f"pid {r.pid} is already traced by pid"):
        ProcessCheckpointer(r.pid, store + "2")
    # the first session is intact
    r.run("x = 6")
    first.rollback(cid)
    assert r.eval("x") == 5


def test_multithreaded_process_is_refused_untouched(lab: Lab, store: str) -> None:
    r = lab.repl("import threading; ev = threading.Event(); t = threading.Thread(target=ev.wait); t.start()")
    with pytest.raises(MultiThreaded, match=rf"pid {r.pid} has 2 threads: fork\(\) copies only the calling thread"):
        ProcessCheckpointer(r.pid, store)
    assert tracer_of(r.pid) == 0
    assert r.eval("threading.active_count()") == 2
    r.run("ev.set(); t.join()")
    deadline = time.monotonic() + 5  # join() returns a moment before the kernel thread is gone
    while len(os.listdir(f"/proc/{r.pid}/task")) > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    cp = lab.checkpointer(r.pid, store)  # single-threaded again: fine
    assert cp.checkpoint().id == 1


def test_kernel_thread_is_not_permitted(store: str) -> None:
    kthreads = []
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[6]) & 0x00200000:
                kthreads.append(int(p))
        except OSError:  # exited meanwhile
            continue
    if not kthreads:
        pytest.skip("no kernel thread visible in this pid namespace")
    with pytest.raises(NotPermitted, match="kernel thread"):
        ProcessCheckpointer(kthreads[0], store)


@pytest.fixture
def as_nobody(tmp_path: object) -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """Run the system python3 as the unprivileged user nobody, with a copy of
    the package it can read: the checkout may sit in a directory nobody
    cannot enter (mktemp -d, /root), and the venv's interpreter with it."""
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip("no system python3 that an unprivileged user can run")
    pkg_root = tempfile.mkdtemp(prefix="deltacr-pkg-")
    shutil.copytree(os.path.join(ROOT, "deltacr"), os.path.join(pkg_root, "deltacr"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    for dirpath, _dirs, files in os.walk(pkg_root):
        os.chmod(dirpath, 0o755)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([python, *args], capture_output=True, text=True, timeout=60, user=65534,
                              group=65534, cwd="/", env={"PYTHONPATH": pkg_root, **(env or {})})
    try:
        yield run
    finally:
        shutil.rmtree(pkg_root, ignore_errors=True)


def test_other_users_process_is_not_permitted(lab: Lab, as_nobody: Callable[..., Any]) -> None:
    r = lab.repl("x = 1")
    code = ("import sys, tempfile\n"
            "from deltacr import ProcessCheckpointer, NotPermitted\n"
            "with tempfile.TemporaryDirectory() as d:\n"
            "    try:\n        ProcessCheckpointer(%d, d, backend='compare')\n"
            "    except NotPermitted as e:\n        print('refused:', e); sys.exit(0)\n"
            "sys.exit(3)\n") % r.pid
    res = as_nobody("-c", code)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"pid {r.pid}" in res.stdout and "EPERM" in res.stdout
    assert tracer_of(r.pid) == 0 and r.eval("x") == 1


def test_unprivileged_cli_refusals_are_errors_not_tracebacks(lab: Lab, as_nobody: Callable[..., Any]) -> None:
    r = lab.repl("x = 1")
    with tempfile.TemporaryDirectory(prefix="deltacr-root-") as top:  # pytest's tmp_path: nobody cannot enter
        os.chmod(top, 0o755)
        run_dir = os.path.join(top, "run")  # root's, like /run/deltacr
        os.makedirs(run_dir, mode=0o755)
        secret = os.path.join(top, "1.delta")
        with open(secret, "wb") as f:
            f.write(b"x" * 100)
        os.chmod(secret, 0o600)
        cases = [
            (["attach", str(r.pid)], f"pid {r.pid}: cannot write the daemon's log {run_dir}/{r.pid}.log"),
            (["inspect", secret], f"delta file {secret} cannot be read: Permission denied"),
            (["inspect", top], f"delta file {top} cannot be read: Is a directory"),
        ]
        for argv, message in cases:
            res = as_nobody("-m", "deltacr.cli", *argv, env={"DELTACR_RUN_DIR": run_dir})
            assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
            assert res.stderr.startswith(f"deltacr: {message}"), res.stderr
    assert tracer_of(r.pid) == 0 and r.eval("x") == 1


def test_unknown_checkpoint_id_changes_nothing(lab: Lab, store: str) -> None:
    r = lab.repl("x = 1")
    cp = lab.checkpointer(r.pid, store)
    cp.checkpoint()
    live = cp.live_pid
    r.run("x = 2")
    with pytest.raises(NoSuchCheckpoint, match=r"has no checkpoint 99 \(known: 1\)"):
        cp.rollback(99)
    assert cp.live_pid == live and r.eval("x") == 2


def test_unavailable_backend_is_refused(lab: Lab, store: str) -> None:
    r = lab.repl("x = 1")
    from deltacr import DeltaCRError, available_backends
    if "soft-dirty" in available_backends():
        pytest.skip("this kernel has soft-dirty")
    # soft-dirty accepts clear_refs here but never sets the bit: using it would lose writes
    with pytest.raises(DeltaCRError, match="'soft-dirty' does not work on this machine"):
        ProcessCheckpointer(r.pid, store, backend="soft-dirty")
    assert tracer_of(r.pid) == 0 and r.eval("x") == 1
