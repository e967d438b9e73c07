"""DeltaCR benchmark: checkpoint and rollback latency against process size and
dirty fraction, slow-path replay throughput, side by side with a bare fork of a
process of the same size and a full copy of its memory.

    .venv/bin/python bench/bench_deltacr.py            # full run (a few minutes)
    .venv/bin/python bench/bench_deltacr.py --quick    # fewer sizes/iterations

Prints a table; writes JSON to bench/results/deltacr.json (or --out) and the
table to deltacr.md beside it.

The target is a Python process holding a bytearray of SIZE bytes with every page
touched (RSS = SIZE + interpreter); "dirty f" makes it write one byte in a
fraction f of those pages, then the benchmark checkpoints (critical path: stop,
dirty scan, injected fork, fd offsets, resume) and waits for the background
delta. Rollback = fast path to the newest checkpoint (fork from its template,
registers, offsets, re-arm dirty tracking, kill the old process). Spare = the
same with the template's spare child, forked before the rollback is asked for
(``spares=True``, the default; the benchmark waits for it). In-place =
the experimental ``rollback(in_place=True)`` after the same dirtying: the live
process keeps its pid and gets back only the pages that changed. Bare fork =
os.fork() timed inside a process of the same size. Full copy = reading all of
the target's private memory through /proc/PID/mem (the least a full dump must
do). CRIU is probed and reported; on our machines it does not work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench._common import machine_info  # noqa: E402
from deltacr import ProcessCheckpointer  # noqa: E402
from deltacr.check import check, probe_criu  # noqa: E402
from deltacr.procfs import read_maps  # noqa: E402

TARGET = r"""
import os, sys, time
n = int(sys.argv[1])
buf = bytearray(n)
buf[::4096] = b"\x01" * len(range(0, n, 4096))
v = 1
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "dirty":
        f = float(cmd[1])
        if f > 0:
            k = max(1, round(1 / f))
            v = (v + 1) % 250 + 2
            buf[::4096 * k] = bytes([v]) * len(range(0, n, 4096 * k))
        print("ok", flush=True)
    elif cmd[0] == "fork":
        t = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        dt = time.perf_counter() - t
        os.waitpid(pid, 0)
        print(dt * 1e3, flush=True)
    elif cmd[0] == "ping":
        print("pong", flush=True)
"""

MB = 1 << 20
SLOW_REPS = 7  # slow-path rollbacks per size (3 at 1 GB)


class Target:
    def __init__(self, size: int) -> None:
        self.p = subprocess.Popen([sys.executable, "-S", "-u", "-c", TARGET, str(size)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, start_new_session=True)
        assert self.readline() == "ready"

    def readline(self) -> str:
        assert self.p.stdout is not None
        line = self.p.stdout.readline().decode().strip()
        if not line:
            raise RuntimeError("benchmark target died")
        return line

    def cmd(self, text: str) -> str:
        assert self.p.stdin is not None
        self.p.stdin.write(text.encode() + b"\n")
        self.p.stdin.flush()
        return self.readline()

    def kill(self) -> None:
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.p.wait()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def full_copy_ms(pid: int) -> tuple[float, int]:
    """Read every private mapping of pid through /proc/PID/mem."""
    buf = bytearray(4 * MB)
    total = 0
    t = time.perf_counter()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for v in read_maps(pid):
            if v.special or not v.private or not v.perms.startswith("r"):
                continue
            pos = v.start
            while pos < v.end:
                n = min(len(buf), v.end - pos)
                mem.seek(pos)
                total += mem.readinto(memoryview(buf)[:n]) or 0
                pos += n
    return (time.perf_counter() - t) * 1e3, total


def _ended(pid: int) -> bool:
    """Gone or a zombie (its memory is freed then)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def bench_size(size: int, fractions: list[float], iters: int, store_root: str, backend: str,
               hugepages: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"size_mb": size // MB, "backend": backend, "hugepages": hugepages, "by_dirty": {}}
    tgt = Target(size)
    store = tempfile.mkdtemp(prefix="deltacr-bench-", dir=store_root)
    cp = None
    try:
        forks = [float(tgt.cmd("fork")) for _ in range(max(5, iters))]
        out["bare_fork_ms_p50"] = statistics.median(forks)
        out["bare_fork_ms_p99"] = pct(forks, 99)
        copy_ms, copied = full_copy_ms(tgt.p.pid)
        out["full_copy_ms"] = copy_ms
        out["full_copy_bytes"] = copied
        cp = ProcessCheckpointer(tgt.p.pid, store, max_templates=4, rehydrate=False, backend=backend,
                                 spares=False, hugepages=hugepages)
        cp.wait_background()  # the huge-page keeper's first pass
        if hugepages:  # the same bare fork, of the process as the keeper left it
            forks = [float(tgt.cmd("fork")) for _ in range(max(5, iters))]
            out["huge_fork_ms_p50"] = statistics.median(forks)
            out["hugepages_stats"] = cp.status()["hugepages"]
        cp.checkpoint("warm-up")
        cp.wait_background()
        for f in fractions:
            crit: list[float] = []
            bg: list[float] = []
            dbytes: list[int] = []
            for _ in range(iters):
                tgt.cmd(f"dirty {f}")
                res = cp.checkpoint(f"dirty {f}")
                crit.append(res.critical_ms)
                cp.wait_background()
                row = cp.list()[-1]
                bg.append(row.background_ms)
                dbytes.append(row.delta_bytes)
            last = cp.list()[-1].id
            rb: list[float] = []
            cp.spares = False
            for _ in range(iters):
                r = cp.rollback(last)
                assert r.path == "fast" and not r.spare
                rb.append(r.ms)
                assert tgt.cmd("ping") == "pong"
            cp.spares = True
            rb_spare: list[float] = []
            for _ in range(iters):
                cp.wait_background()  # the spare is forked while the caller does something else
                r = cp.rollback(last)
                assert r.path == "fast" and r.spare
                rb_spare.append(r.ms)
                assert tgt.cmd("ping") == "pong"
            cp.spares = False
            inplace: list[float] = []
            for _ in range(iters):
                tgt.cmd(f"dirty {f}")
                r = cp.rollback(last, in_place=True)
                assert r.path == "in-place", r.path
                inplace.append(r.ms)
                assert tgt.cmd("ping") == "pong"
            out["by_dirty"][str(f)] = {
                "in_place_rollback_ms_p50": statistics.median(inplace),
                "in_place_rollback_ms_p99": pct(inplace, 99),
                "checkpoint_ms_p50": statistics.median(crit), "checkpoint_ms_p99": pct(crit, 99),
                "rollback_ms_p50": statistics.median(rb), "rollback_ms_p99": pct(rb, 99),
                "spare_rollback_ms_p50": statistics.median(rb_spare), "spare_rollback_ms_p99": pct(rb_spare, 99),
                "background_ms_p50": statistics.median(bg), "delta_bytes_p50": statistics.median(dbytes),
            }
        # slow path: two fully dirty checkpoints on top of the root, templates evicted
        tgt.cmd("dirty 1")
        a = cp.checkpoint("slow-a").id
        tgt.cmd("dirty 1")
        b = cp.checkpoint("slow-b").id
        cp.wait_background()
        base = cp.list()[-3].id  # a's parent: the checkpoint rolled back to last, template kept
        assert cp.template_pid(base) is not None
        cp.evict(a)
        cp.evict(b)
        # each rollback to b takes the slow path again (no template is made
        # for b: rehydrate=False): the median of a few, one sample is noise
        slow: list[float] = []
        for _ in range(3 if size >= 1024 * MB else SLOW_REPS):
            replaced = cp.live_pid
            r = cp.rollback(b)
            assert r.path == "slow" and tgt.cmd("ping") == "pong"
            slow.append(r.ms)
            # the next one starts once the replaced process has freed its
            # memory (1 GB takes a while): not measuring that teardown
            cp.wait_background()
            gone_by = time.monotonic() + 30
            while replaced and time.monotonic() < gone_by and not _ended(replaced):
                time.sleep(0.01)
        ms = statistics.median(slow)
        out["slow_path_ms"] = ms
        out["slow_path_ms_runs"] = slow
        out["slow_path_replayed_bytes"] = r.replayed_bytes
        out["slow_path_delta_bytes"] = r.delta_bytes
        out["slow_path_gb_per_s"] = r.delta_bytes / (ms / 1e3) / 1e9
        out["slow_path_written_gb_per_s"] = r.replayed_bytes / (ms / 1e3) / 1e9
        out["slow_path_deltas"] = 2
    finally:
        if cp is not None:
            cp.close(kill_live=True)
        tgt.kill()
        shutil.rmtree(store, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="10 MB and 100 MB only, 5 iterations")
    ap.add_argument("--iters", type=int)
    ap.add_argument("--sizes", help="comma-separated sizes in MB (default 10,100,1024)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "deltacr.json"))
    ap.add_argument("--store", default=tempfile.gettempdir(), help="where deltas are written")
    ap.add_argument("--backends", help="comma-separated dirty-tracking backends, each optionally with /4k "
                    "(huge-page keeper off) (default: uffd-wp, pfn and pfn/4k where available)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_deltacr: needs root (ptrace of arbitrary processes)", file=sys.stderr)
        return 1
    sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else ([10, 100] if a.quick else [10, 100, 1024])
    iters = a.iters or (5 if a.quick else 20)
    fractions = [0.0, 0.01, 0.1, 1.0]
    report = check()
    from deltacr import available_backends
    have = available_backends()
    backends = a.backends.split(",") if a.backends else (
        [b for b in ("uffd-wp", "pfn", "pfn/4k") if b.split("/")[0] in have] or [have[0]])
    criu = probe_criu()
    results: dict[str, Any] = {
        "machine": machine_info(),
        "default_backend": report.backend, "backends": backends, "iterations": iters, "criu": {"ok": criu.ok, "detail": criu.detail},
        "sizes": [],
    }
    t0 = time.perf_counter()
    for backend in backends:
        for mb in sizes:
            n = iters if mb < 1024 else max(3, iters // 4)
            print(f"... {backend}: {mb} MB, {n} iterations per point", file=sys.stderr, flush=True)
            name, _, pages = backend.partition("/")
            results["sizes"].append(bench_size(mb * MB, fractions, n, a.store, name, hugepages=pages != "4k"))
    results["wall_s"] = time.perf_counter() - t0
    results["machine"]["loadavg_end"] = os.getloadavg()
    lines: list[str] = []

    def emit(line: str = "") -> None:  # the table goes to stdout and to the .md
        lines.append(line)
        sys.stdout.write(line + "\n")

    m = results["machine"]
    emit(f"DeltaCR benchmark, {m['date']}, commit {m['git_commit'][:12]}{' (dirty tree)' if m['git_dirty'] else ''}, "
          f"load average {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}, {results['wall_s']:.0f} s")
    emit(f"\nDeltaCR benchmark  kernel {platform.release()}, {os.cpu_count()} cpus, default backend "
          f"{report.backend}, {iters} iterations (1 GB: fewer); times in ms, 'x fork' = ratio to the bare fork "
          "of the process before attach; 'fork huge' = the same fork once the huge-page keeper has collapsed its "
          "memory; '/4k' = keeper off")
    hdr = (f"{'backend':>7} {'size':>6} {'dirty':>6} | {'ckpt p50':>8} {'p99':>7} {'x fork':>6} | {'rollbk p50':>10} {'p99':>7} "
           f"{'x fork':>6} | {'spare p50':>9} {'p99':>6} {'x fork':>6} | {'in-place':>8} | {'bg ms':>7} {'delta MB':>8} | {'fork p50':>8} "
           f"{'fork huge':>9} {'full copy':>9}")
    emit(hdr)
    emit("-" * len(hdr))
    for s in results["sizes"]:
        fork = s["bare_fork_ms_p50"]
        name = s["backend"] + ("" if s.get("hugepages", True) else "/4k")
        huge = f"{s['huge_fork_ms_p50']:9.2f}" if "huge_fork_ms_p50" in s else f"{'-':>9}"
        for f, d in s["by_dirty"].items():  # noqa: B007
            emit(f"{name:>7} {s['size_mb']:>4}MB {float(f) * 100:>5.0f}% | {d['checkpoint_ms_p50']:8.2f} "
                  f"{d['checkpoint_ms_p99']:7.2f} {d['checkpoint_ms_p50'] / fork:6.2f} | "
                  f"{d['rollback_ms_p50']:10.2f} {d['rollback_ms_p99']:7.2f} {d['rollback_ms_p50'] / fork:6.2f} | "
                  f"{d['spare_rollback_ms_p50']:9.2f} {d['spare_rollback_ms_p99']:6.2f} "
                  f"{d['spare_rollback_ms_p50'] / fork:6.2f} | "
                  f"{d['in_place_rollback_ms_p50']:8.2f} | "
                  f"{d['background_ms_p50']:7.1f} {d['delta_bytes_p50'] / MB:8.1f} | {fork:8.2f} {huge} "
                  f"{s['full_copy_ms']:7.1f}ms")
    emit("\nslow path (fork the root's template, replay 2 fully dirty deltas; median of 7 rollbacks, 3 at 1 GB):")
    for s in results["sizes"]:
        name = s["backend"] + ("" if s.get("hugepages", True) else "/4k")
        runs = s.get("slow_path_ms_runs") or [s["slow_path_ms"]]
        emit(f"  {name:>7} {s['size_mb']:>5} MB: {s['slow_path_ms']:8.1f} ms ({min(runs):.1f}-{max(runs):.1f}), "
             f"{s['slow_path_delta_bytes'] / MB:8.1f} MB of "
              f"delta replayed ({s['slow_path_gb_per_s']:.2f} GB/s), {s['slow_path_replayed_bytes'] / MB:8.1f} MB "
              f"written into the process ({s['slow_path_written_gb_per_s']:.2f} GB/s)")
    emit(f"\nCRIU baseline: {'works' if criu.ok else 'not available'} ({criu.detail}); "
          "Debian's criu 3.17.1 fails `criu check` on this kernel (vdso: Unexpected rt vDSO area bounds), "
          "so the full memory copy above stands in for it.")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)
    md = os.path.splitext(a.out)[0] + ".md"
    with open(md, "w") as f:
        f.write("```\n" + "\n".join(lines) + "\n```\n")
    sys.stdout.write(f"\nwrote {a.out} and {md} ({results['wall_s']:.0f} s)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
