"""Helpers shared by the benchmarks: statistics, tables, machine info, JSON,
and the workload trees (re-exported from ``deltabox.repos``).

Nothing here mounts anything: each benchmark owns its mounts and takes them
down in its own single ``finally``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from deltabox.repos import DJANGO, DJANGO_DEPS, REPO, count_files, django_tree, generate_tree

RESULTS = os.path.join(REPO, "bench", "results")
__all__ = ["DJANGO", "DJANGO_DEPS", "count_files", "django_tree", "generate_tree"]


# -- statistics ----------------------------------------------------------------

def percentile(xs: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(xs: Sequence[float]) -> dict[str, Any]:
    """p50/p99/mean/min/max of ``xs`` (whatever unit they are in) plus n."""
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "p50": percentile(xs, 50), "p99": percentile(xs, 99),
            "mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs)}


def median(xs: Sequence[float]) -> float:
    return percentile(xs, 50)


# -- output ------------------------------------------------------------------

def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table (also valid Markdown)."""
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(r, widths))) + " |"
    out = [f"### {title}", "", line(cells[0]),
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out) + "\n"


def _cell(c: Any) -> str:
    if c is None:
        return "-"
    if isinstance(c, float):
        if c != c:
            return "nan"
        if abs(c) >= 100:
            return f"{c:.0f}"
        if abs(c) >= 10:
            return f"{c:.1f}"
        if abs(c) >= 1:
            return f"{c:.2f}"
        return f"{c:.3f}"
    return str(c)


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "MISS")


def write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


# -- machine ---------------------------------------------------------------------

SLOW_CREATE_US = 200.0


def file_create_us(parent: str, n: int = 200) -> float:
    """Median microseconds to create (and close) an empty file in a new
    directory under ``parent``. Normally 10-30 us here; on an ext4 without a
    journal, after mass deletions (a benchmark's rm -rf, dropped stores),
    creating files near them costs 0.1-1 ms each for a long while (perf: the
    inode allocator in ``recently_deleted``): every figure that creates
    files is then off, native and FUSE alike."""
    d = tempfile.mkdtemp(prefix="create-probe-", dir=parent)
    times = []
    try:
        for i in range(n):
            t = time.perf_counter()
            os.close(os.open(os.path.join(d, f"f{i}"), os.O_CREAT | os.O_WRONLY, 0o644))
            times.append((time.perf_counter() - t) * 1e6)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return median(times)


def slow_disk_warning(machine: dict[str, Any]) -> str | None:
    """A line for the report's misses when ``file_create_us`` measured a slow
    disk at the start or the end of the run (``machine['file_create_us_*']``)."""
    slow = {k: v for k in ("file_create_us_start", "file_create_us_end")
            if (v := machine.get(k)) is not None and v > SLOW_CREATE_US}
    if not slow:
        return None
    return ("WARNING: the disk was slow to create files (" + ", ".join(
        f"{k[len('file_create_us_'):]} of the run {v:.0f} us per file" for k, v in slow.items())
        + "; normally 10-30 us, see bench/_common.file_create_us): figures that create files "
        "are off, on every filesystem")


def machine_info() -> dict[str, Any]:
    def sh(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                                  check=False).stdout.strip()
        except OSError:
            return ""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    dirty = sh("git", "status", "--porcelain", "--untracked-files=no")
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "mem_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "git_commit": sh("git", "rev-parse", "HEAD"),
        "git_dirty": bool(dirty),
        "loadavg_start": os.getloadavg(),
    }


