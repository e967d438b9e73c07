"""Several programs at once on one mount: the daemon serves requests from a
bounded busy-wait loop (see ``deltafs.fuseops.configure_request_spin``), so
check that interleaved requests from many processes are all answered, each
exactly once, and that control requests (checkpoints) still get through while
the load runs."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

from .conftest import Env

# Each worker owns a directory: it creates, rewrites, renames, appends to and
# deletes files there, reading every file back after changing it; it exits
# non-zero at the first read that does not match what it wrote.
WORKER = r"""
import os, sys
root, wid, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
d = os.path.join(root, f"w{wid}")
os.makedirs(d)
def check(path, want):
    with open(path, "rb") as f:
        got = f.read()
    if got != want:
        sys.exit(f"worker {wid}: {path} reads {got[:40]!r}, wrote {want[:40]!r}")
for r in range(rounds):
    p = os.path.join(d, f"f{r % 7}")
    data = f"{wid}:{r}:".encode() * (1 + r % 50)
    with open(p, "wb") as f:
        f.write(data)
    check(p, data)
    with open(p, "ab") as f:
        f.write(b"+")
    check(p, data + b"+")
    q = os.path.join(d, f"g{r % 5}")
    os.replace(p, q)
    check(q, data + b"+")
    os.stat(d)
    if r % 3 == 0:
        os.unlink(q)
        if os.path.exists(q):
            sys.exit(f"worker {wid}: {q} still there after unlink")
    sorted(os.listdir(d))
"""

WORKERS = 4
ROUNDS = 300


def _expected(wid: int) -> dict[str, bytes]:
    """What worker ``wid``'s directory holds once it is done (its own logic, replayed)."""
    files: dict[str, bytes] = {}
    for r in range(ROUNDS):
        data = f"{wid}:{r}:".encode() * (1 + r % 50) + b"+"
        files[f"g{r % 5}"] = data
        if r % 3 == 0:
            del files[f"g{r % 5}"]
    return files


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_many_processes_at_once_with_checkpoints_under_load(env: Env) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(env.mnt), str(w), str(ROUNDS)],
                              stderr=subprocess.PIPE, text=True)
             for w in range(WORKERS)]
    slowest = 0.0
    checkpoints = 0
    try:
        while any(p.poll() is None for p in procs):
            t = time.perf_counter()
            env.m.checkpoint("under load")
            slowest = max(slowest, time.perf_counter() - t)
            checkpoints += 1
            time.sleep(0.02)
        for w, p in enumerate(procs):
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, f"worker {w} failed: {err[-2000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert checkpoints >= 3, "the load ended before it could be checkpointed: make it longer"
    # the request loop lets the control socket in between bursts
    assert slowest < 2.0, f"a checkpoint under load took {slowest:.2f} s"
    for w in range(WORKERS):
        d = env.mnt / f"w{w}"
        got = {p.name: p.read_bytes() for p in d.iterdir()}
        assert got == _expected(w), f"worker {w}'s files differ from what it wrote"
    final = env.m.checkpoint("done")
    want = _digest(env.mnt)
    for w in range(WORKERS):
        (env.mnt / f"w{w}" / "g1").write_bytes(b"after")
    env.m.rollback(final)
    assert _digest(env.mnt) == want
