"""Helpers shared by the benchmarks: statistics, tables, machine info, JSON,
and the workload trees (a real Django tree, or a generated stand-in).

Nothing here mounts anything: each benchmark owns its mounts and takes them
down in its own single ``finally``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, ".data")  # git-ignored cache
WHEELS = os.path.join(DATA, "wheels")
RESULTS = os.path.join(REPO, "bench", "results")

DJANGO = "django==5.2.17"
# Django's own runtime dependencies, only so that the import step can run;
# they are unpacked outside the filesystem under test.
DJANGO_DEPS = ("asgiref==3.13.0", "sqlparse==0.6.1")


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


# -- workload trees -----------------------------------------------------------------

def _pip_download(spec: str) -> str | None:
    """The cached wheel for ``spec`` (name==version), downloading it once."""
    name, _, version = spec.partition("==")
    want = f"{name.replace('-', '_')}-{version}-"
    os.makedirs(WHEELS, exist_ok=True)
    for f in sorted(os.listdir(WHEELS)):
        if f.lower().startswith(want.lower()) and f.endswith(".whl"):
            return os.path.join(WHEELS, f)
    pip = os.path.join(os.path.dirname(sys.executable), "pip")
    r = subprocess.run([pip, "download", "--no-deps", "-q", "-d", WHEELS, spec],
                       capture_output=True, text=True, timeout=300, check=False)
    if r.returncode != 0:
        sys.stderr.write(f"pip download {spec} failed:\n{r.stderr[-2000:]}\n")
        return None
    for f in sorted(os.listdir(WHEELS)):
        if f.lower().startswith(want.lower()) and f.endswith(".whl"):
            return os.path.join(WHEELS, f)
    return None


def _unzip(wheel: str, dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        z.extractall(dest)


def count_files(root: str) -> int:
    return sum(len(files) for _d, _s, files in os.walk(root))


def django_tree(dest: str, deps_dir: str) -> dict[str, Any]:
    """Unpack Django 5.2.17 into ``dest`` (and its two runtime dependencies
    into ``deps_dir``). Falls back to a generated tree, loudly, when the wheel
    cannot be had. Returns what the workload needs to know about the tree."""
    wheel = _pip_download(DJANGO)
    deps = [_pip_download(d) for d in DJANGO_DEPS] if wheel else []
    if wheel and all(deps):
        _unzip(wheel, dest)
        for d in deps:
            assert d is not None
            _unzip(d, deps_dir)
        return {
            "source": f"{DJANGO} wheel ({os.path.basename(wheel)}), deps "
                      + ", ".join(DJANGO_DEPS),
            "fallback": False,
            "files": count_files(dest),
            "import": ("import django; from django.conf import settings; "
                       "settings.configure(INSTALLED_APPS=['django.contrib.contenttypes',"
                       "'django.contrib.auth','django.contrib.admin']); django.setup(); "
                       "import django.db.models, django.contrib.admin, django.test, "
                       "django.forms; print(django.get_version(), "
                       "len([m for m in sys.modules if m.startswith('django')]))"),
            "top": sorted(os.listdir(dest)),
        }
    banner = "=" * 78
    sys.stderr.write(f"{banner}\nWARNING: could not download {DJANGO} (or its deps); the "
                     "workload runs on a GENERATED tree of small .py files instead.\n"
                     f"{banner}\n")
    generate_tree(dest)
    return {"source": "GENERATED fallback tree (Django download failed)", "fallback": True,
            "files": count_files(dest),
            "import": ("import genpkg, genpkg.p0.m0, genpkg.p1.s1.m1, genpkg.p2.s2.m2; "
                       "print('genpkg', len([m for m in sys.modules if m.startswith('genpkg')]))"),
            "top": sorted(os.listdir(dest))}


def generate_tree(dest: str, packages: int = 40, subs: int = 6, modules: int = 15) -> None:
    """About 3,600 small importable .py files in nested packages."""
    root = os.path.join(dest, "genpkg")
    os.makedirs(root)
    with open(os.path.join(root, "__init__.py"), "w") as f:
        f.write('"""Generated stand-in for the Django tree."""\n')
    for p in range(packages):
        pdir = os.path.join(root, f"p{p}")
        os.makedirs(pdir)
        with open(os.path.join(pdir, "__init__.py"), "w") as f:
            f.write(f"NAME = 'p{p}'\n")
        for s in range(subs):
            sdir = os.path.join(pdir, f"s{s}")
            os.makedirs(sdir)
            with open(os.path.join(sdir, "__init__.py"), "w") as f:
                f.write("")
            for m in range(modules):
                with open(os.path.join(sdir if m else pdir, f"m{m}.py"), "a") as f:
                    for k in range(8):
                        f.write(f"def f{k}(x, y={k}):\n    return x * y + {p + s + m}\n\n")
