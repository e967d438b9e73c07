"""DeltaFS benchmark (issue 2): checkpoint/rollback latency, per-operation
latency against history depth, and a small-file workload on a real Django
tree, side by side with the native directory and kernel overlayfs, in one run.

    .venv/bin/python bench/bench_deltafs.py [--quick] [--parts 1,2,3]

Prints one table per part and writes ``bench/results/deltafs.json`` (and the
same tables as ``deltafs.md``). Runs as root (FUSE, overlayfs, drop_caches).

Parts 1 and 2 share one DeltaFS mount whose history is grown in steps
(depth 1 -> 10 -> 100 -> 1,000 checkpoints); every layer of that history
modifies a few files, so the index really holds many versions (four "hot"
files get a new version in every layer). Part 3 mounts afresh per repetition.

Caveats: a noisy 2-core VM shared with other work; microsecond figures are
the caller's view (Python ``os`` calls, ``time.perf_counter``), so they
include about 1 us of interpreter overhead on every filesystem alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deltafs  # noqa: E402
from deltafs.mounts import FSTYPE, top_mount  # noqa: E402

from bench._common import (RESULTS, django_tree, file_create_us, machine_info,  # noqa: E402
                           median, slow_disk_warning, summary, table, verdict, write_json)

pc = time.perf_counter

# Targets from issue 2.
CKPT_P50_MS = 1.0
ROLLBACK_P50_MS = 3.0  # with up to 100 changed files
DEPTH_RATIO = 1.2
READ_RATIO = 2.0
WRITE_RATIO = 3.0

POOL = 1000  # files part 1 changes
BIG = 1000  # entries of the readdir directory
HOT = 4  # files of big/ rewritten in every layer of the history
ROTATE = 2  # further files of big/ rewritten per layer, round robin


@dataclass
class Config:
    quick: bool
    depths: list[int]
    changed: list[int]
    reps: dict[int, int]  # changed files -> repetitions
    op_samples: int
    create_samples: int
    readdir_samples: int
    workload_reps: int
    branches: int
    rounds: int

    @classmethod
    def make(cls, quick: bool) -> "Config":
        if quick:
            return cls(True, [1, 10, 100], [1, 100, 1000], {1: 8, 100: 8, 1000: 4},
                       200, 100, 10, 1, 100, 4)
        return cls(False, [1, 10, 100, 1000], [1, 100, 1000], {1: 40, 100: 40, 1000: 20},
                   1000, 200, 40, 3, 1000, 20)


# -- mounts: everything this run mounts, and the one way each is taken down ------

@dataclass
class Rig:
    """Owns every mount of the run. ``close()`` (called from the single
    ``finally`` in ``main``) takes down whatever is still up; the normal flow
    calls the same ``unmount_*`` methods."""

    tmp: str
    fuse: dict[str, deltafs.Mount] = field(default_factory=dict)
    overlays: list[str] = field(default_factory=list)
    incidents: list[dict[str, Any]] = field(default_factory=list)

    def mount_deltafs(self, mnt: str, base: str, store: str) -> deltafs.Mount:
        os.makedirs(mnt, exist_ok=True)
        m = deltafs.mount(mnt, base=base, store=store)
        self.fuse[mnt] = m
        return m

    def unmount_deltafs(self, mnt: str) -> None:
        m = self.fuse.pop(mnt, None)
        pid = m.pid if m is not None else None
        if m is not None:
            try:
                pid = m.status()["pid"]
                m.unmount(timeout=30)
            except Exception as e:  # keep the evidence, then the forceful path
                log = _tail(os.path.join(m.store, "daemon.log"))
                print(f"  (clean unmount of {mnt} failed: {e}; forcing)\n"
                      f"  daemon.log tail:\n{log}", file=sys.stderr)
                self.incidents.append({"mount": mnt, "pid": pid, "error": str(e),
                                       "daemon_log_tail": log})
            finally:
                m.close()
        top = top_mount(mnt)
        if top is not None and top.fstype == FSTYPE:
            subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
        if pid:
            _kill_and_reap(pid)

    def mount_overlay(self, lower: str, upper: str, work: str, mnt: str) -> None:
        for d in (upper, work, mnt):
            os.makedirs(d, exist_ok=True)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={lower},upperdir={upper},workdir={work}", mnt],
                       check=True, capture_output=True, text=True)
        self.overlays.append(mnt)

    def unmount_overlay(self, mnt: str) -> None:
        if mnt in self.overlays:
            self.overlays.remove(mnt)
        if subprocess.run(["umount", mnt], check=False, capture_output=True).returncode:
            subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)

    def close(self) -> None:
        for mnt in list(self.fuse):
            self.unmount_deltafs(mnt)
        for mnt in list(self.overlays):
            self.unmount_overlay(mnt)


def _tail(path: str, n: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except OSError as e:
        return f"(cannot read {path}: {e})"


def code_state() -> dict[str, str]:
    """git HEAD and a hash of deltafs/*.py: the code under test may change
    while the benchmark runs (a daemon loads it when it starts)."""
    import hashlib
    h = hashlib.sha256()
    d = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deltafs")
    for name in sorted(os.listdir(d)):
        if name.endswith(".py"):
            with open(os.path.join(d, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(d),
                          capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "deltafs"],
                           cwd=os.path.dirname(d), capture_output=True, text=True,
                           check=False).stdout.split()
    return {"git_head": head, "deltafs_sha256": h.hexdigest()[:16],
            "deltafs_uncommitted": " ".join(dirty[1::2])}


def _kill_and_reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:  # the daemon is our child (deltafs.mount starts it): do not leave a zombie
        for _ in range(100):
            if os.waitpid(pid, os.WNOHANG)[0]:
                break
            time.sleep(0.01)
    except ChildProcessError:
        pass


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def daemon_cpu(pid: int) -> float:
    """User + system CPU seconds the daemon has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drop_dentries() -> None:
    """Evict dentries and inodes (echo 2 > drop_caches): the next stat of a
    file on FUSE must ask the daemon again (a lookup)."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")


# -- the trees ----------------------------------------------------------------------

def pool_content(i: int, tag: str) -> bytes:
    return (f"{tag} pool file {i}\n" * 8).encode()


def big_content(i: int, tag: str) -> bytes:
    return (f"{tag} big {i:04d}\n").encode().ljust(100, b".")


def make_layer_base(base: str) -> None:
    """The base of the part 1/2 mount: pool/ (files part 1 changes), big/ (a
    1,000-entry directory), hist/ (grows by one file per layer), new/."""
    for d in ("pool", "big", "hist", "new"):
        os.makedirs(os.path.join(base, d))
    for i in range(POOL):
        with open(os.path.join(base, "pool", f"p{i:04d}"), "wb") as f:
            f.write(pool_content(i, "base"))
    for i in range(BIG):
        with open(os.path.join(base, "big", f"f{i:04d}"), "wb") as f:
            f.write(big_content(i, "base"))


def overwrite(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_all(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- part 1: checkpoint and rollback latency ------------------------------------------

@dataclass
class History:
    """The growing history of the part 1/2 mount."""

    m: deltafs.Mount
    mnt: str
    depth: int = 1  # checkpoints in the live chain; the base is checkpoint 1
    tip: int = 1
    layers_made: int = 0
    grow_s: float = 0.0

    def grow(self, to_depth: int) -> None:
        t0 = pc()
        while self.depth < to_depth:
            k = self.layers_made
            for h in range(HOT):
                overwrite(os.path.join(self.mnt, "big", f"f{h:04d}"), big_content(h, f"L{k}"))
            for j in range(ROTATE):
                i = HOT + (k * ROTATE + j) % (BIG - HOT)
                overwrite(os.path.join(self.mnt, "big", f"f{i:04d}"), big_content(i, f"L{k}"))
            with open(os.path.join(self.mnt, "hist", f"h{k:05d}"), "wb") as f:
                f.write(b"layer %d\n" % k)
            self.tip = self.m.checkpoint(f"history {k}")
            self.depth += 1
            self.layers_made += 1
        self.grow_s += pc() - t0


def part1_cell(h: History, n: int, reps: int) -> dict[str, Any]:
    """At the current depth, ``reps`` times: write ``n`` pool files and time
    a rollback to the tip (unsaved changes discarded); write them again, time
    a checkpoint, time a rollback to the tip across it, and drop it so the
    depth stays put. Reads back three files after each rollback (stale-read
    check through the kernel's caches)."""
    mnt, m, target = h.mnt, h.m, h.tip
    paths = [os.path.join(mnt, "pool", f"p{i:04d}") for i in range(n)]
    probe = sorted({0, n // 2, n - 1})
    ck, rb_unsaved, rb_ckpt, drop, write_ms = [], [], [], [], []
    d_ck, d_rb, inval = [], [], []
    stale: list[str] = []
    parts_ms: dict[str, list[float]] = {}  # the daemon's own breakdown, when it gives one
    ck_parts: dict[str, list[float]] = {}

    def write_all(tag: str) -> None:
        t0 = pc()
        for i, p in enumerate(paths):
            overwrite(p, pool_content(i, tag))
        write_ms.append((pc() - t0) * 1e3 / n)

    def check(when: str) -> None:
        for i in probe:
            if read_all(paths[i]) != pool_content(i, "base"):
                stale.append(f"depth {h.depth}, n {n}, {when}: pool/p{i:04d}")

    for r in range(reps):
        write_all(f"u{r}")
        t0 = pc()
        res = m.rollback(target)
        rb_unsaved.append((pc() - t0) * 1e3)
        d_rb.append(res["ms"])
        inval.append(res["invalidated"])
        for key in ("switch_ms", "invalidate_ms"):
            if key in res:
                parts_ms.setdefault(key, []).append(res[key])
        check(f"rep {r} after rollback of unsaved changes")

        write_all(f"c{r}")
        timed = getattr(m, "checkpoint_timed", None)  # same round trip, plus the daemon's split
        t0 = pc()
        if timed is not None:
            got = timed(f"bench {n}")
            cid = int(got["id"])
        else:
            got, cid = {}, m.checkpoint(f"bench {n}")
        ck.append((pc() - t0) * 1e3)
        for key in ("ms", "freeze_ms", "sync_ms"):
            if key in got:
                ck_parts.setdefault(key, []).append(got[key])
        if hasattr(m, "sync"):
            m.sync()  # its background flush done before the next rep (not timed)
        t0 = pc()
        res = m.rollback(target)
        rb_ckpt.append((pc() - t0) * 1e3)
        d_rb.append(res["ms"])
        check(f"rep {r} after rollback across a checkpoint")
        t0 = pc()
        m.drop(cid)
        drop.append((pc() - t0) * 1e3)
    # For information: the same checkpoint with durable=True (returns once on
    # disk: survives a power cut, not only kill -9 of the daemon), on half as
    # many reps.
    durable: list[float] = []
    for r in range((reps + 1) // 2 if hasattr(m, "sync") else 0):
        write_all(f"l{r}")
        t0 = pc()
        got = m.checkpoint_timed(f"durable {n}", durable=True)
        durable.append((pc() - t0) * 1e3)
        ck_parts.setdefault("durable_sync_ms", []).append(got["sync_ms"])
        m.rollback(target)
        m.drop(int(got["id"]))
    return {
        "depth": h.depth, "changed": n, "reps": reps,
        "checkpoint_ms": summary(ck),
        "checkpoint_durable_ms": summary(durable) if durable else None,
        "rollback_unsaved_ms": summary(rb_unsaved),
        "rollback_across_checkpoint_ms": summary(rb_ckpt),
        "daemon_rollback_ms": summary(d_rb),
        "invalidated": summary(inval),
        "drop_ms": summary(drop),
        "write_ms_per_file": summary(write_ms),
        "stale_reads": stale,
        "daemon_rollback_unsaved_breakdown_ms": {k: summary(v) for k, v in parts_ms.items()},
        "daemon_checkpoint_breakdown_ms": {k: summary(v) for k, v in ck_parts.items()},
    }


# -- part 2: per-operation latency -----------------------------------------------

def _open_read(p: str) -> None:
    fd = os.open(p, os.O_RDONLY)
    os.read(fd, 4096)
    os.close(fd)


def _timed(fn: Callable[[str], Any], items: Iterable[str]) -> list[float]:
    xs = []
    for it in items:
        t0 = pc()
        fn(it)
        xs.append((pc() - t0) * 1e6)
    return xs


def measure_ops(root: str, samples: int, creates: int, readdirs: int, tag: str
                ) -> dict[str, list[float]]:
    """One round of: stat (cold and warm), open+read+close, create, unlink
    and readdir of the 1,000-entry ``big/``; microseconds per operation."""
    big = os.path.join(root, "big")
    paths = [os.path.join(big, f"f{i:04d}") for i in range(BIG)]
    out: dict[str, list[float]] = {}
    drop_dentries()  # a first pass warms the daemon's side (index pages) ...
    for p in paths:
        os.stat(p)
    drop_dentries()  # ... then the kernel forgets again: each sample is one lookup
    os.stat(big)
    out["stat (cold: lookup)"] = _timed(os.stat, paths)
    warm = paths[::BIG // 50][:50]
    for p in warm:
        os.stat(p)
    out["stat (warm)"] = _timed(os.stat, (warm * samples)[:samples])
    rot = paths[HOT::max(1, (BIG - HOT) // 100)][:100]
    for p in rot:
        _open_read(p)
    out["open+read+close"] = _timed(_open_read, (rot * samples)[:samples])
    hot = paths[:HOT]
    for p in hot:
        _open_read(p)
    out["open+read+close (hot file)"] = _timed(_open_read, (hot * samples)[:samples])
    new = [os.path.join(root, "new", f"{tag}-{i:04d}") for i in range(creates)]

    def create(p: str) -> None:
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))

    out["create"] = _timed(create, new)
    out["unlink"] = _timed(os.unlink, new)
    n = len(os.listdir(big))
    if n != BIG:
        raise RuntimeError(f"{big} lists {n} entries, not {BIG}")
    out[f"readdir ({BIG} entries)"] = _timed(os.listdir, [big] * readdirs)
    return out


def interleaved(targets: dict[str, str], cfg: Config) -> dict[str, dict[str, Any]]:
    """``measure_ops`` on every target in ``cfg.rounds`` rounds, the order
    rotating each round, so that the machine's noise hits all alike."""
    raw: dict[str, dict[str, list[float]]] = {k: {} for k in targets}
    names = list(targets)
    for r in range(cfg.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            got = measure_ops(targets[k], cfg.op_samples // cfg.rounds,
                              cfg.create_samples // cfg.rounds,
                              max(1, cfg.readdir_samples // cfg.rounds), f"{k}-{r}")
            for op, xs in got.items():
                raw[k].setdefault(op, []).extend(xs)
    return {k: {op: summary(xs) for op, xs in ops.items()} for k, ops in raw.items()}


def part2_branches(h: History, branches: int, cfg: Config) -> dict[str, Any]:
    """Tree search: ``branches`` times, from the tip checkpoint T, modify the
    same four files, checkpoint, and roll back to T (each branch stays in the
    tree). The live view then sees T's versions of those files while every
    sibling branch wrote a newer version of the same keys. Measured against
    four control files of the same mount with the same history otherwise,
    interleaved."""
    branched = [os.path.join(h.mnt, "big", f"f{i:04d}") for i in range(500, 504)]
    control = [os.path.join(h.mnt, "big", f"f{i:04d}") for i in range(600, 604)]
    target = h.tip
    expect = [read_all(p) for p in branched]
    t0 = pc()
    for b in range(branches):
        for i, p in enumerate(branched):
            overwrite(p, big_content(500 + i, f"B{b}"))
        h.m.checkpoint(f"branch {b}")
        h.m.rollback(target)
    build_s = pc() - t0
    stale = [p for p, want in zip(branched, expect) if read_all(p) != want]
    raw: dict[str, dict[str, list[float]]] = {"control": {}, "branched": {}}
    for r in range(cfg.rounds * 2):
        for kind, paths in (("control", control), ("branched", branched))[::1 if r % 2 else -1]:
            ops = raw[kind]
            for p in paths:
                _open_read(p)
            ops.setdefault("open+read+close", []).extend(
                _timed(_open_read, (paths * 50)[:cfg.op_samples // cfg.rounds]))
            for _ in range(5):
                drop_dentries()
                os.stat(os.path.dirname(paths[0]))
                ops.setdefault("stat (cold: lookup)", []).extend(_timed(os.stat, paths))
    return {"branches": branches, "files": len(branched), "depth": h.depth, "build_s": build_s,
            "control": {op: summary(xs) for op, xs in raw["control"].items()},
            "branched": {op: summary(xs) for op, xs in raw["branched"].items()},
            "unexpected_content": stale}


# -- part 3: the small-file workload ----------------------------------------------

def workload_steps(py: str, deps: str, data: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(name, kind, command): a str is run by bash, a list directly."""
    code = f"import sys; sys.path[:0] = ['.', {deps!r}]; " + data["import"]
    tops = " ".join(data["top"])
    return [
        ("find", "read", "find . -type f | wc -l"),
        ("grep -r", "read", "LC_ALL=C grep -r 'def ' . 2>/dev/null | wc -l"),
        ("compileall", "write", [py, "-m", "compileall", "-q", "."]),
        ("import", "read", [py, "-I", "-c", code]),
        ("rm -rf", "write", f"rm -rf {tops}"),
    ]


def run_step(cmd: Any, cwd: str) -> tuple[float, str]:
    argv = ["bash", "-c", cmd] if isinstance(cmd, str) else cmd
    t0 = pc()
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=900, check=False)
    dt = pc() - t0
    if r.returncode:
        raise RuntimeError(f"{argv} in {cwd} failed ({r.returncode}): {r.stderr[-1500:]}")
    return dt, r.stdout.strip()


def part3(rig: Rig, cfg: Config, tree: str, deps: str, data: dict[str, Any]
          ) -> dict[str, Any]:
    steps = workload_steps(sys.executable, deps, data)
    kinds = ["native", "overlayfs", "deltafs"]
    times: dict[str, dict[str, list[float]]] = {k: {s[0]: [] for s in steps} for k in kinds}
    extra: dict[str, dict[str, list[float]]] = {k: {"setup": [], "first find": [],
                                                    "first grep -r": []} for k in kinds}
    daemon: dict[str, list[float]] = {s[0]: [] for s in steps}
    checks: dict[str, list[dict[str, str]]] = {k: [] for k in kinds}
    work = os.path.join(rig.tmp, "p3")
    failures: list[dict[str, Any]] = []
    for rep in range(cfg.workload_reps):
        order = kinds[rep % 3:] + kinds[:rep % 3]
        for kind in order:
            base = os.path.join(work, f"{kind}-{rep}")
            os.makedirs(base)
            pid = None
            t0 = pc()
            if kind == "native":
                root = os.path.join(base, "tree")
                shutil.copytree(tree, root, symlinks=True)
            elif kind == "overlayfs":
                root = os.path.join(base, "mnt")
                rig.mount_overlay(tree, os.path.join(base, "upper"), os.path.join(base, "work"),
                                  root)
            else:
                root = os.path.join(base, "mnt")
                m = rig.mount_deltafs(root, tree, os.path.join(base, "store"))
                pid = m.status()["pid"]
            extra[kind]["setup"].append(pc() - t0)
            done = {name: len(times[kind][name]) for name, _k, _c in steps}
            try:
                # Warm every filesystem the same way: one untimed pass of the
                # two read steps (recorded as the "first" pass).
                for name, _k, cmd in steps[:2]:
                    extra[kind][f"first {name}"].append(run_step(cmd, root)[0])
                check: dict[str, str] = {}
                for name, _k, cmd in steps:
                    c0 = daemon_cpu(pid) if pid else 0.0
                    dt, out = run_step(cmd, root)
                    times[kind][name].append(dt)
                    if pid:
                        daemon[name].append(daemon_cpu(pid) - c0)
                    check[name] = out
                    if name == "compileall":
                        check["pyc files"] = run_step(
                            "find . -name '*.pyc' | wc -l", root)[1]
                check["left after rm"] = str(len(os.listdir(root)))
                checks[kind].append(check)
            except Exception as e:  # keep going: report the failure, drop the partial rep
                log = _tail(os.path.join(base, "store", "daemon.log")) if pid else ""
                print(f"  part 3 rep {rep + 1} {kind} FAILED: {e}\n{log}", file=sys.stderr)
                failures.append({"rep": rep, "fs": kind, "error": str(e),
                                 "daemon_alive": bool(pid) and os.path.exists(f"/proc/{pid}"),
                                 "daemon_log_tail": log})
                for name, n in done.items():
                    del times[kind][name][n:]
                    if kind == "deltafs":
                        del daemon[name][n:]
                continue
            finally:
                if kind == "overlayfs":
                    rig.unmount_overlay(root)
                elif kind == "deltafs":
                    rig.unmount_deltafs(root)
                shutil.rmtree(base, ignore_errors=True)
            print(f"  part 3 rep {rep + 1}/{cfg.workload_reps} {kind}: "
                  + ", ".join(f"{s} {times[kind][s][-1]:.2f}s" for s, _k, _c in steps),
                  flush=True)
    res: dict[str, Any] = {"steps": {}, "extra": {}, "checks": checks, "failures": failures,
                           "daemon_cpu_s": {s: median(v) for s, v in daemon.items() if v},
                           "runs": {k: len(times[k][steps[0][0]]) for k in kinds}}
    for name, kind, _cmd in steps:
        nat = median(times["native"][name])
        row: dict[str, Any] = {"kind": kind, "target": READ_RATIO if kind == "read" else WRITE_RATIO}
        for k in kinds:
            row[k] = {"median_s": median(times[k][name]), "runs_s": times[k][name]}
        row["ratio_deltafs"] = row["deltafs"]["median_s"] / nat
        row["ratio_overlayfs"] = row["overlayfs"]["median_s"] / nat
        row["pass"] = row["ratio_deltafs"] <= row["target"]
        res["steps"][name] = row
    for k in kinds:
        res["extra"][k] = {n: {"median_s": median(v), "runs_s": v} for n, v in extra[k].items()}
    # The three filesystems must agree on what the workload saw.
    agree = {}
    for key in checks["native"][0] if checks["native"] else []:
        vals = {k: sorted({c.get(key, "?") for c in checks[k]}) for k in kinds}
        agree[key] = {"same": len({tuple(v) for v in vals.values()}) == 1, "values": vals}
    res["agreement"] = agree
    return res


# -- the run ---------------------------------------------------------------------

def run(cfg: Config, parts: set[int], rig: Rig, report: dict[str, Any]) -> None:
    tmp = rig.tmp
    if parts & {1, 2}:
        base = os.path.join(tmp, "layers-base")
        make_layer_base(base)
        mnt, store = os.path.join(tmp, "layers-mnt"), os.path.join(tmp, "layers-store")
        m = rig.mount_deltafs(mnt, base, store)
        h = History(m, mnt)
        p1: list[dict[str, Any]] = []
        p2: dict[str, Any] = {}
        deep = max(cfg.depths)
        for depth in cfg.depths:
            h.grow(depth)
            print(f"depth {h.depth} (history built in {h.grow_s:.1f} s so far)", flush=True)
            if 2 in parts and depth == deep:
                print(f"part 2: per-operation latency, native / overlayfs / deltafs depth 1 "
                      f"(a second mount) / deltafs depth {deep}, interleaved", flush=True)
                native = os.path.join(tmp, "layers-native")
                shutil.copytree(base, native)
                ov = os.path.join(tmp, "layers-ovl")
                shallow = os.path.join(tmp, "shallow-mnt")
                rig.mount_overlay(base, ov + "-upper", ov + "-work", ov)
                rig.mount_deltafs(shallow, base, os.path.join(tmp, "shallow-store"))
                try:
                    got = interleaved({"native": native, "overlayfs": ov,
                                       "deltafs_depth1": shallow,
                                       f"deltafs_depth{deep}": mnt}, cfg)
                finally:
                    rig.unmount_overlay(ov)
                    rig.unmount_deltafs(shallow)
                p2.update(got)
                m.rollback(h.tip)  # discard the ops' traces (new/ dir churn)
            if 1 in parts:
                for n in cfg.changed:
                    t0 = pc()
                    cell = part1_cell(h, n, cfg.reps[n])
                    p1.append(cell)
                    print(f"  part 1 depth {h.depth} changed {n}: checkpoint p50 "
                          f"{cell['checkpoint_ms']['p50']:.2f} ms, rollback p50 "
                          f"{cell['rollback_unsaved_ms']['p50']:.2f} / "
                          f"{cell['rollback_across_checkpoint_ms']['p50']:.2f} ms "
                          f"({pc() - t0:.1f} s)", flush=True)
        if 2 in parts:
            print(f"part 2b: {cfg.branches} sibling branches off the tip", flush=True)
            p2["branches"] = part2_branches(h, cfg.branches, cfg)
        listed = m.list()
        report["history"] = {"depth": h.depth, "layers_made": h.layers_made,
                             "checkpoints_listed": len(listed), "grow_s": h.grow_s,
                             "status": m.status()}
        rig.unmount_deltafs(mnt)
        if 1 in parts:
            report["part1"] = p1
        if 2 in parts:
            report["part2"] = p2
    if 3 in parts:
        src = os.path.join(tmp, "src")
        tree, deps = os.path.join(src, "tree"), os.path.join(src, "deps")
        data = django_tree(tree, deps)
        report["data"] = data
        print(f"part 3: small-file workload on {data['source']}: {data['files']} files",
              flush=True)
        report["part3"] = part3(rig, cfg, tree, deps, data)


def render(report: dict[str, Any], cfg: Config) -> str:
    out: list[str] = []
    misses: list[str] = []
    if "part1" in report:
        rows = []
        for c in report["part1"]:
            ok = c["checkpoint_ms"]["p50"] <= CKPT_P50_MS
            if not ok:
                misses.append(f"checkpoint p50 {c['checkpoint_ms']['p50']:.2f} ms > "
                              f"{CKPT_P50_MS} ms at depth {c['depth']}, {c['changed']} files")
            split = c.get("daemon_checkpoint_breakdown_ms", {})
            rows.append([c["depth"], c["changed"], c["reps"], c["checkpoint_ms"]["p50"],
                         c["checkpoint_ms"]["p99"], f"<= {CKPT_P50_MS:g}", verdict(ok),
                         split.get("freeze_ms", {}).get("p50"),
                         (c.get("checkpoint_durable_ms") or {}).get("p50"),
                         (c.get("checkpoint_durable_ms") or {}).get("p99"),
                         split.get("durable_sync_ms", {}).get("p50"),
                         c["drop_ms"]["p50"], c["write_ms_per_file"]["p50"]])
        out.append(table("Part 1a: checkpoint latency (ms, Mount.checkpoint after writing N "
                         "files: returns once committed, survives kill -9 of the daemon, flushed "
                         "to disk in the background; the durable columns, for information: "
                         "checkpoint(durable=True), which returns once on disk)",
                         ["depth", "files changed", "reps", "p50", "p99", "target p50", "result",
                          "daemon freeze p50", "durable p50", "durable p99", "daemon sync p50 (durable)",
                          "drop p50", "write ms/file"],
                         rows))
        rows = []
        for c in report["part1"]:
            a, b = c["rollback_unsaved_ms"], c["rollback_across_checkpoint_ms"]
            ok = None
            if c["changed"] <= 100:
                ok = max(a["p50"], b["p50"]) <= ROLLBACK_P50_MS
                if not ok:
                    misses.append(f"rollback p50 {a['p50']:.2f}/{b['p50']:.2f} ms > "
                                  f"{ROLLBACK_P50_MS} ms at depth {c['depth']}, "
                                  f"{c['changed']} files")
            if c["stale_reads"]:
                misses.append(f"STALE READS after rollback: {c['stale_reads'][:3]}")
            rows.append([c["depth"], c["changed"], a["p50"], a["p99"], b["p50"], b["p99"],
                         c["daemon_rollback_ms"]["p50"], c["invalidated"]["p50"],
                         f"<= {ROLLBACK_P50_MS:g}" if ok is not None else "-", verdict(ok),
                         len(c["stale_reads"])])
        out.append(table("Part 1b: rollback latency (ms, Mount.rollback to the checkpoint "
                         "before the N changes)",
                         ["depth", "files changed", "unsaved p50", "unsaved p99",
                          "across ckpt p50", "across ckpt p99", "daemon p50", "invalidated",
                          "target p50", "result", "stale reads"], rows))
    if "part2" in report:
        p2 = report["part2"]
        deep = max(cfg.depths)
        dk = f"deltafs_depth{deep}"
        rows = []
        for op in p2["native"]:
            d1, dn = p2["deltafs_depth1"][op], p2.get(dk, {}).get(op)
            ratio = dn["p50"] / d1["p50"] if dn else None
            ok = ratio <= DEPTH_RATIO if ratio is not None else None
            if ok is False:
                misses.append(f"{op}: depth {deep} / depth 1 = {ratio:.2f}x > {DEPTH_RATIO}x")
            rows.append([op, p2["native"][op]["p50"], p2["overlayfs"][op]["p50"], d1["p50"],
                         d1["p99"], dn["p50"] if dn else None, dn["p99"] if dn else None,
                         f"{ratio:.2f}x" if ratio is not None else None,
                         f"<= {DEPTH_RATIO:g}x", verdict(ok)])
        out.append(table(f"Part 2: per-operation latency (us; p50 unless marked)",
                         ["operation", "native", "overlayfs", "deltafs d1", "d1 p99",
                          f"deltafs d{deep}", f"d{deep} p99", f"d{deep}/d1 (p50)", "target",
                          "result"], rows))
    if "part2" in report and "branches" in report["part2"]:
        b = report["part2"]["branches"]
        rows = []
        for op in b["control"]:
            x, y = b["control"][op], b["branched"][op]
            ratio = y["p50"] / x["p50"]
            ok = ratio <= DEPTH_RATIO
            if not ok:
                misses.append(f"{op} of a file written in {b['branches']} sibling branches: "
                              f"{ratio:.2f}x a control file > {DEPTH_RATIO}x")
            rows.append([op, x["p50"], x["p99"], y["p50"], y["p99"], f"{ratio:.2f}x",
                         f"<= {DEPTH_RATIO:g}x", verdict(ok)])
        if b["unexpected_content"]:
            misses.append(f"STALE/UNEXPECTED content after branching: {b['unexpected_content']}")
        out.append(table(f"Part 2b: tree search, {b['files']} files rewritten in each of "
                         f"{b['branches']} sibling branches of one checkpoint (us, depth "
                         f"{b['depth']})",
                         ["operation", "control p50", "control p99",
                          "branched p50", "branched p99", "branched/control", "target",
                          "result"], rows))
    if "part3" in report:
        p3 = report["part3"]
        rows = []
        for name, r in p3["steps"].items():
            if not r["pass"]:
                misses.append(f"workload {name}: deltafs {r['ratio_deltafs']:.2f}x native > "
                              f"{r['target']:g}x")
            rows.append([name, r["kind"], r["native"]["median_s"], r["overlayfs"]["median_s"],
                         f"{r['ratio_overlayfs']:.2f}x", r["deltafs"]["median_s"],
                         f"{r['ratio_deltafs']:.2f}x", f"<= {r['target']:g}x",
                         verdict(r["pass"]), p3["daemon_cpu_s"].get(name)])
        src = report["data"]["source"]
        out.append(table(f"Part 3: small-file workload, {report['data']['files']} files "
                         f"({src}); median of {cfg.workload_reps} (s)",
                         ["step", "kind", "native", "overlayfs", "ovl/native", "deltafs",
                          "deltafs/native", "target", "result", "daemon CPU s"], rows))
        ex = p3["extra"]
        rows = [[n, ex["native"][n]["median_s"], ex["overlayfs"][n]["median_s"],
                 ex["deltafs"][n]["median_s"]] for n in ex["native"]]
        out.append(table("Part 3 (info): setup and the first, untimed-warm-up pass (s)",
                         ["", "native", "overlayfs", "deltafs"], rows))
        bad = [k for k, v in p3["agreement"].items() if not v["same"]]
        line = ("outputs agree on all three: " + ", ".join(
            f"{k}={v['values']['native']}" for k, v in p3["agreement"].items()))
        if bad:
            line = "OUTPUTS DIFFER: " + "; ".join(
                f"{k}: {p3['agreement'][k]['values']}" for k in bad)
            misses.append(line)
        out.append(line + "\n")
    if report.get("incidents"):
        misses.append(f"{len(report['incidents'])} DeltaFS mount(s) could not be unmounted "
                      "cleanly (daemon gone?): see 'incidents' in the JSON")
    if report.get("part3", {}).get("failures"):
        misses.append(f"{len(report['part3']['failures'])} workload repetition(s) failed: "
                      "see part3.failures in the JSON")
    if (warning := slow_disk_warning(report["machine"])) is not None:
        misses.append(warning)
    if report.get("code_start") != report.get("code_end"):
        misses.append(f"WARNING: deltafs/ changed during the run ({report.get('code_start')} -> "
                      f"{report.get('code_end')}): daemons started at different times ran "
                      "different code")
    report["misses"] = misses
    out.append("### Misses\n\n" + ("\n".join(f"- {m}" for m in misses) if misses else "none")
               + "\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="fewer repetitions, depth up to 100: a smoke run")
    ap.add_argument("--parts", default="1,2,3", help="which parts to run (default 1,2,3)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/deltafs.json; "
                    "--quick writes deltafs-quick.json)")
    ap.add_argument("--dir", default="/var/tmp",
                    help="where to work: trees, stores, mounts (default /var/tmp, the main disk)")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_deltafs: run as root (FUSE, overlayfs, drop_caches)", file=sys.stderr)
        return 2
    cfg = Config.make(a.quick)
    parts = {int(p) for p in a.parts.split(",") if p}
    out = a.out or os.path.join(RESULTS, "deltafs-quick.json" if a.quick else "deltafs.json")
    report: dict[str, Any] = {"benchmark": "deltafs", "machine": machine_info(),
                              "config": vars(cfg) | {"parts": sorted(parts), "dir": a.dir},
                              "targets": {"checkpoint_p50_ms": CKPT_P50_MS,
                                          "rollback_p50_ms_100_files": ROLLBACK_P50_MS,
                                          "depth1000_over_depth1": DEPTH_RATIO,
                                          "read_heavy_over_native": READ_RATIO,
                                          "write_heavy_over_native": WRITE_RATIO}}
    signal.signal(signal.SIGTERM, _on_sigterm)
    tmp = tempfile.mkdtemp(prefix="bench-deltafs-", dir=a.dir)
    rig = Rig(tmp)
    t0 = pc()
    report["code_start"] = code_state()
    report["machine"]["file_create_us_start"] = file_create_us(tmp)
    try:
        run(cfg, parts, rig, report)
        report["machine"]["file_create_us_end"] = file_create_us(tmp)
    finally:
        rig.close()
        shutil.rmtree(tmp, ignore_errors=True)
        report["incidents"] = rig.incidents
    report["code_end"] = code_state()
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["wall_s"] = pc() - t0
    text = render(report, cfg)
    print()
    print(text)
    print(f"wall time {report['wall_s']:.0f} s; load average at start "
          f"{report['machine']['loadavg_start'][0]:.2f}, end {report['machine']['loadavg_end'][0]:.2f}")
    write_json(out, report)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        m = report["machine"]
        f.write(f"# DeltaFS benchmark\n\n{m['date']}, commit {m['git_commit'][:12]}, kernel "
                f"{m['kernel']}, {m['cpu_count']} CPUs ({m['cpu_model']}), "
                f"{'quick' if cfg.quick else 'full'} run, {report['wall_s']:.0f} s\n\n{text}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
