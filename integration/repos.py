"""Real source trees for workloads: Django 5.2.17 unpacked from its wheel
(downloaded once with pip and cached in the checkout's git-ignored ``.data``),
or, when the package index cannot be reached, a generated tree of about
3,600 small importable modules. Used by the demo and the benchmarks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, ".data")  # git-ignored cache
WHEELS = os.path.join(DATA, "wheels")

DJANGO = "django==5.2.17"
# Django's own runtime dependencies, only so that the import step can run;
# they are unpacked outside the filesystem under test.
DJANGO_DEPS = ("asgiref==3.13.0", "sqlparse==0.6.1")


def pip_download(spec: str) -> str | None:
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
    wheel = pip_download(DJANGO)
    deps = [pip_download(d) for d in DJANGO_DEPS] if wheel else []
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
