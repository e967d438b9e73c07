"""DeltaBox end-to-end benchmark (issue 4): the paper's agent tree-search
workload replayed on a real repository, side by side with the baselines, in
one run.

    .venv/bin/python bench/bench_deltabox.py [--quick] [--inference S] [--expansions N]

The workload: an unpacked SymPy 1.14.0 wheel (Django 5.2.17 as a fallback)
worked on by a bash shell and a Python REPL (``import sympy`` done before the
search starts). A trace is generated once from ``--seed``: ``N`` expansions
(default 100) and ``round(N * 0.49)`` rollbacks (49 per 100), each rollback to
an arbitrary earlier node of the tree (uniform over every node made so far,
not only the parent). An expansion = simulated inference (``--inference``
seconds of sleep), then append a small function to 1-3 .py files (chosen by
the seeded RNG from a pool), run ``python -c 'ast.parse(...)'`` + ``grep -c``
on them in the shell (and bump a shell counter), and in the REPL bump a
counter, ``exec`` the new function out of each patched file and call it, and
do a little SymPy arithmetic; then checkpoint. The SAME trace is replayed on:

- ``floor``     no snapshots: the same expansions, never checkpoint or roll back;
- ``copytree``  checkpoint = copytree of the working tree; rollback = copy it
                back, restart bash + the REPL, replay their commands from the root;
- ``git``       checkpoint = ``git add -A && git commit``; rollback = ``git reset
                --hard`` + ``git clean -fdx``, restart + replay;
- ``overlayfs`` kernel overlayfs; checkpoint = ``cp -a`` of the upper dir;
                rollback = umount, restore the upper copy, mount, restart + replay;
- ``deltabox``  ``deltabox.Sandbox`` with the shell and the REPL inside.

After every rollback each configuration is checked: the sha256 of every pool
file equals what the trace says for the target node, and the REPL's and the
shell's counters equal the node's depth. Verification time is excluded from
the end-to-end time; DeltaBox's final ``wait_background()`` is included.

Prints tables, writes ``bench/results/deltabox-<run>.json`` / ``.md`` / ``.png``
(run = ``inf0``, ``inf1``, ... or ``quick``) and merges every non-quick run
into ``bench/results/deltabox.json`` / ``deltabox.md`` / ``deltabox.png``.
Runs as root (FUSE, ptrace, overlayfs). Python bytecode goes to a
``PYTHONPYCACHEPREFIX`` outside the trees, warmed before the search, so a
restarted REPL imports SymPy from warm bytecode (kind to the baselines).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import (RESULTS, count_files, django_tree, file_create_us,  # noqa: E402
                           machine_info, slow_disk_warning, summary, table, verdict, write_json)
from deltabox.repos import pip_download  # noqa: E402
from deltabox.sandbox import read_until  # noqa: E402

pc = time.perf_counter

# Targets from issue 4.
CKPT_P50_MS = 4.0  # DeltaBox checkpoint critical path
ROLLBACK_P50_MS = 4.0
E2E_RATIO = 1.05  # at 1 s inference
SPEEDUP = 30.0  # DeltaBox rollback vs copytree + replay

SYMPY = "sympy==1.14.0"
SYMPY_DEPS = ("mpmath==1.3.0",)
MAX_TEMPLATES = 128  # the Sandbox's default; a run with another value is named -mtN
BARE_FORK_PROBES = 30  # steps replayed on the floor after its run, each followed by a bare fork of the REPL
POOL_FILES = 40  # files the trace may patch
MAX_POOL_FILE = 40_000  # bytes: keep ast.parse cheap

PY = sys.executable
SHELL_CHECK = (f"{PY} -I -S -c 'import ast,sys; [ast.parse(open(f).read()) for f in sys.argv[1:]]'")

REPL_HELPER = '''
def _bench_touch(k, files):
    global counter
    counter += 1
    got = []
    for f in files:
        s = open(f).read()
        g = {}
        exec(s[s.index("# bench-patch %d\\n" % k):], g)
        got.append(g["_bench_patch_%d" % k](1))
    return counter, got, sympy.Integer(k) ** 2 + sympy.Rational(1, 3)

def _bench_fork():
    import os, time
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    ms = (time.perf_counter() - t) * 1e3
    os.waitpid(pid, 0)
    print("FORK %.4f" % ms)
'''


# -- the trace ---------------------------------------------------------------------

@dataclass
class Step:
    k: int  # expansion number, makes node k
    parent: int  # node it expands
    rollback_to: int | None  # roll back to this node first (None: continue from k - 1)
    files: list[str]

    def snippet(self) -> str:
        return f"\n\n# bench-patch {self.k}\ndef _bench_patch_{self.k}(x=1):\n    return x + {self.k}\n"

    def shell_cmd(self) -> str:
        fs = " ".join(self.files)
        return f"N=$((N+1)); {SHELL_CHECK} {fs} && grep -c 'def ' {fs}"

    def repl_cmd(self) -> str:
        return f"print(_bench_touch({self.k}, {self.files!r}))"


@dataclass
class Trace:
    seed: int
    expansions: int
    pool: list[str]
    steps: list[Step]
    parent: dict[int, int | None] = field(default_factory=dict)

    @classmethod
    def make(cls, seed: int, expansions: int, candidates: list[str]) -> "Trace":
        rng = random.Random(seed)
        pool = sorted(rng.sample(candidates, min(POOL_FILES, len(candidates))))
        n_rb = round(expansions * 49 / 100)
        rb_at = set(rng.sample(range(2, expansions + 1), min(n_rb, max(0, expansions - 1))))
        steps: list[Step] = []
        parent: dict[int, int | None] = {0: None}
        cur = 0
        for k in range(1, expansions + 1):
            rb = None
            if k in rb_at:
                rb = rng.choice([n for n in range(k) if n != cur])
                cur = rb
            files = rng.sample(pool, rng.randint(1, 3))
            steps.append(Step(k, cur, rb, files))
            parent[k] = cur
            cur = k
        return cls(seed, expansions, pool, steps, parent)

    def path(self, node: int) -> list[int]:
        """Expansions from the root to ``node`` (excluding the root)."""
        out = []
        while node:
            out.append(node)
            node = self.parent[node]  # type: ignore[assignment]
        return out[::-1]

    def expected(self, node: int, base: dict[str, bytes]) -> dict[str, str]:
        content = dict(base)
        for k in self.path(node):
            st = self.steps[k - 1]
            for f in st.files:
                content[f] += st.snippet().encode()
        return {f: hashlib.sha256(c).hexdigest() for f, c in content.items()}


# -- processes for the baselines ---------------------------------------------------

class SimpleProc:
    """bash or the REPL for the baselines: pipes, stderr joins stdout (the same
    shape as ``deltabox.Proc``)."""

    def __init__(self, argv: list[str], cwd: str, env: dict[str, str], name: str) -> None:
        self.name = name
        self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                      start_new_session=True)
        assert self.popen.stdin and self.popen.stdout
        self.stdin = self.popen.stdin
        self.stdout = self.popen.stdout
        self._buf = b""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def send(self, data: str) -> None:
        self.stdin.write(data.encode())
        self.stdin.flush()

    def expect(self, marker: str, timeout: float = 60.0) -> bytes:
        out, self._buf = read_until(self.stdout.fileno(), self._buf, marker, timeout, self.name)
        return out

    def kill(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)  # its own session: bash's children too
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.stdin, self.stdout):
            try:
                f.close()
            except OSError:
                pass


_seq = 0


def ask(p: Any, cmd: str, lang: str, timeout: float = 60.0) -> str:
    """Run one command line in bash or the REPL; returns its output."""
    global _seq
    _seq += 1
    tag = f"@@{_seq}@@"
    if lang == "sh":
        p.send(f"{cmd}\necho '{tag}'\n")
    else:
        p.send(f"{cmd}\nprint('{tag}')\n")
    out = p.expect(tag + "\n", timeout=timeout).decode(errors="replace")
    return out[: -len(tag) - 1]


def code_state() -> dict[str, str]:
    """A hash of the code under test (deltafs/, deltacr/, integration/): it may
    change under the benchmark, other people work in this checkout."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {}
    for pkg in ("deltafs", "deltacr", "integration"):
        h = hashlib.sha256()
        for f in sorted(glob.glob(os.path.join(repo, pkg, "*.py"))):
            with open(f, "rb") as fh:
                h.update(os.path.basename(f).encode() + b"\0" + fh.read())
        out[pkg] = h.hexdigest()[:16]
    return out


def rss_mb(pid: int | None) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, TypeError):
        pass
    return None


# -- configurations ------------------------------------------------------------------

class Config:
    """One way of running the search. ``root`` is where the tree is seen."""

    name = "?"
    snapshots = True

    def __init__(self, tmp: str, pristine: str, env: dict[str, str]) -> None:
        self.dir = os.path.join(tmp, self.name)
        os.makedirs(self.dir)
        self.pristine = pristine
        self.env = env
        self.root = ""
        self.sh: Any = None
        self.py: Any = None

    # processes (the baselines start their own; DeltaBox spawns in the sandbox)
    def _start(self) -> tuple[float, float]:
        """Start bash and the REPL (import sympy); returns (total ms, REPL ms)."""
        t0 = pc()
        self.sh = SimpleProc(["bash", "--norc", "--noprofile"], self.root, self.env, "bash")
        self.py = SimpleProc([PY, "-u", "-q", "-i"], self.root, self.env, "python")
        t1 = pc()
        init_procs(self.sh, self.py)
        return (pc() - t0) * 1e3, (pc() - t1) * 1e3

    def _stop_procs(self) -> None:
        for p in (self.sh, self.py):
            if p is not None:
                p.kill()
        self.sh = self.py = None

    def setup(self) -> None:
        raise NotImplementedError

    def checkpoint(self, node: int) -> dict[str, float]:
        raise NotImplementedError

    def rollback(self, node: int, replay: list[Step]) -> dict[str, Any]:
        raise NotImplementedError

    def wait_background(self) -> None:
        pass

    def close(self) -> None:
        self._stop_procs()


def init_procs(sh: Any, py: Any) -> None:
    ask(sh, "N=0; echo ready", "sh")
    ask(py, "import sys; sys.ps1 = sys.ps2 = ''", "py")
    out = ask(py, "import sympy; counter = 0; exec(" + repr(REPL_HELPER) + "); print('sympy', sympy.__version__)",
              "py", timeout=300)
    if "sympy" not in out:
        raise RuntimeError(f"the REPL could not import sympy: {out[-500:]}")


class Floor(Config):
    name = "floor"
    snapshots = False

    def setup(self) -> None:
        self.root = os.path.join(self.dir, "work")
        shutil.copytree(self.pristine, self.root, symlinks=True)
        self._start()


class ReplayConfig(Config):
    """Restore the files somehow, then restart both processes and replay
    their commands from the root to the target node."""

    def save_fs(self, node: int) -> None:
        raise NotImplementedError

    def restore_fs(self, node: int) -> None:
        raise NotImplementedError

    def checkpoint(self, node: int) -> dict[str, float]:
        t0 = pc()
        self.save_fs(node)
        return {"ms": (pc() - t0) * 1e3}

    def rollback(self, node: int, replay: list[Step]) -> dict[str, Any]:
        t0 = pc()
        self._stop_procs()
        t1 = pc()
        self.restore_fs(node)
        t2 = pc()
        restart_ms, repl_ms = self._start()
        t3 = pc()
        for st in replay:
            ask(self.sh, st.shell_cmd(), "sh")
            ask(self.py, st.repl_cmd(), "py")
        t4 = pc()
        return {"ms": (t4 - t0) * 1e3, "kill_ms": (t1 - t0) * 1e3, "fs_ms": (t2 - t1) * 1e3,
                "restart_ms": restart_ms, "repl_import_ms": repl_ms,
                "replay_ms": (t4 - t3) * 1e3, "replayed": len(replay)}


class CopyTree(ReplayConfig):
    name = "copytree"

    def setup(self) -> None:
        self.root = os.path.join(self.dir, "work")
        self.snaps = os.path.join(self.dir, "snaps")
        os.makedirs(self.snaps)
        shutil.copytree(self.pristine, self.root, symlinks=True)
        self._start()
        self.save_fs(0)

    def save_fs(self, node: int) -> None:
        shutil.copytree(self.root, os.path.join(self.snaps, str(node)), symlinks=True)

    def restore_fs(self, node: int) -> None:
        shutil.rmtree(self.root)
        shutil.copytree(os.path.join(self.snaps, str(node)), self.root, symlinks=True)


class Git(ReplayConfig):
    name = "git"

    def _git(self, *args: str) -> str:
        r = subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost",
                            "-c", "gc.auto=0", "-c", "core.fsmonitor=false", *args],
                           cwd=self.root, capture_output=True, text=True, check=False)
        if r.returncode:
            raise RuntimeError(f"git {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def setup(self) -> None:
        self.root = os.path.join(self.dir, "work")
        shutil.copytree(self.pristine, self.root, symlinks=True)
        self._git("init", "-q")
        self.commits: dict[int, str] = {}
        self._start()
        self.save_fs(0)

    def save_fs(self, node: int) -> None:
        self._git("add", "-A")
        self._git("commit", "-q", "--no-verify", "--allow-empty", "-m", f"node {node}")
        self.commits[node] = self._git("rev-parse", "HEAD").strip()

    def restore_fs(self, node: int) -> None:
        self._git("reset", "-q", "--hard", self.commits[node])
        self._git("clean", "-fdxq")


class Overlay(ReplayConfig):
    name = "overlayfs"

    def setup(self) -> None:
        self.lower = os.path.join(self.dir, "lower")
        shutil.copytree(self.pristine, self.lower, symlinks=True)
        self.upper = os.path.join(self.dir, "upper")
        self.work = os.path.join(self.dir, "ovl-work")
        self.root = os.path.join(self.dir, "mnt")
        self.snaps = os.path.join(self.dir, "snaps")
        for d in (self.upper, self.work, self.root, self.snaps):
            os.makedirs(d)
        self.mounted = False
        self._mount()
        self._start()
        self.save_fs(0)

    def _mount(self) -> None:
        r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            f"lowerdir={self.lower},upperdir={self.upper},workdir={self.work}",
                            self.root], capture_output=True, text=True, check=False)
        if r.returncode:
            raise RuntimeError(f"mount -t overlay: {r.stderr.strip()}")
        self.mounted = True

    def _umount(self) -> None:
        if self.mounted:
            if subprocess.run(["umount", self.root], capture_output=True, check=False).returncode:
                subprocess.run(["umount", "-l", self.root], capture_output=True, check=False)
            self.mounted = False

    def save_fs(self, node: int) -> None:
        subprocess.run(["cp", "-a", self.upper, os.path.join(self.snaps, str(node))], check=True)

    def restore_fs(self, node: int) -> None:
        self._umount()
        shutil.rmtree(self.upper)
        shutil.rmtree(self.work)
        subprocess.run(["cp", "-a", os.path.join(self.snaps, str(node)), self.upper], check=True)
        os.makedirs(self.work)
        self._mount()

    def close(self) -> None:
        try:
            self._stop_procs()
        finally:
            self._umount()


class DeltaBoxConfig(Config):
    name = "deltabox"
    hugepages = True

    def __init__(self, tmp: str, pristine: str, env: dict[str, str], max_templates: int) -> None:
        super().__init__(tmp, pristine, env)
        self.max_templates = max_templates
        self.sb: Any = None
        self.states: dict[int, int] = {}

    def setup(self) -> None:
        from deltabox import Sandbox
        base = os.path.join(self.dir, "base")
        shutil.copytree(self.pristine, base, symlinks=True)
        self.sb = Sandbox(base, workdir=os.path.join(self.dir, "sb"), max_templates=self.max_templates,
                          hugepages=self.hugepages)
        self.root = self.sb.root
        self.sh = self.sb.spawn(["bash", "--norc", "--noprofile"], name="bash", env=self.env)
        self.py = self.sb.spawn([PY, "-u", "-q", "-i"], name="python", env=self.env)
        init_procs(self.sh, self.py)
        self.states[0] = self.sb.checkpoint("root").id

    def checkpoint(self, node: int) -> dict[str, float]:
        t0 = pc()
        r = self.sb.checkpoint(f"n{node}")
        ms = (pc() - t0) * 1e3
        self.states[node] = r.id
        # every timing the report carries (its fields have changed while this was written)
        got = {k: float(v) for k, v in vars(r).items() if k.endswith("_ms")}
        return {"ms": ms, **got, "depth": int(getattr(r, "depth", 0))}

    def rollback(self, node: int, replay: list[Step]) -> dict[str, Any]:
        t0 = pc()
        r = self.sb.rollback(self.states[node])
        ms = (pc() - t0) * 1e3
        got = {k: float(v) for k, v in vars(r).items() if k.endswith("_ms")}
        return {"ms": ms, "reported_ms": r.ms, **got, "paths": dict(getattr(r, "paths", {})),
                "pids": dict(r.pids)}

    def wait_background(self) -> None:
        self.sb.wait_background(300)

    def close(self) -> None:
        if self.sb is not None:
            self.sb.close()  # ends bash + the REPL and their templates, unmounts
        self.sh = self.py = None


class DeltaBox4kConfig(DeltaBoxConfig):
    """DeltaBox with the huge-page keeper off (deltacr.hugepages): what it buys."""

    name = "deltabox-4k"
    hugepages = False


# -- the search --------------------------------------------------------------------

def expand(cfg: Config, st: Step) -> dict[str, float]:
    t0 = pc()
    for f in st.files:
        with open(os.path.join(cfg.root, f), "a") as fh:
            fh.write(st.snippet())
    t1 = pc()
    out = ask(cfg.sh, st.shell_cmd(), "sh")
    t2 = pc()
    if "Error" in out:
        raise RuntimeError(f"{cfg.name}: expansion {st.k}: shell said {out[-400:]}")
    out = ask(cfg.py, st.repl_cmd(), "py")
    if "Error" in out or "Traceback" in out:
        raise RuntimeError(f"{cfg.name}: expansion {st.k}: REPL said {out[-400:]}")
    t3 = pc()
    return {"patch_ms": (t1 - t0) * 1e3, "shell_ms": (t2 - t1) * 1e3, "repl_ms": (t3 - t2) * 1e3}


def verify(cfg: Config, trace: Trace, node: int, base: dict[str, bytes]) -> list[str]:
    bad: list[str] = []
    want = trace.expected(node, base)
    for f, h in want.items():
        with open(os.path.join(cfg.root, f), "rb") as fh:
            if hashlib.sha256(fh.read()).hexdigest() != h:
                bad.append(f"node {node}: {f} content differs from the trace")
    depth = len(trace.path(node))
    out = ask(cfg.py, "print('CTR', counter)", "py")
    m = re.search(r"CTR (\d+)", out)
    if not m or int(m.group(1)) != depth:
        bad.append(f"node {node}: REPL counter {m.group(1) if m else out[-200:]!r}, expected {depth}")
    out = ask(cfg.sh, 'echo "CTR $N"', "sh")
    m = re.search(r"CTR (\d+)", out)
    if not m or int(m.group(1)) != depth:
        bad.append(f"node {node}: shell counter {m.group(1) if m else out[-200:]!r}, expected {depth}")
    return bad


def search(cfg: Config, trace: Trace, base: dict[str, bytes], inference: float) -> dict[str, Any]:
    ck: list[dict[str, float]] = []
    rb: list[dict[str, Any]] = []
    act_ms: list[float] = []
    act_parts: dict[str, list[float]] = {}
    failures: list[str] = []
    bare_forks: list[float] = []
    verify_s = 0.0
    t0 = pc()
    for st in trace.steps:
        if st.rollback_to is not None and cfg.snapshots:
            rb.append(cfg.rollback(st.rollback_to, [trace.steps[k - 1] for k in trace.path(st.rollback_to)]))
            rb[-1]["to"] = st.rollback_to
            tv = pc()
            failures += verify(cfg, trace, st.rollback_to, base)
            verify_s += pc() - tv
        if inference:
            time.sleep(inference)
        ta = pc()
        parts = expand(cfg, st)
        act_ms.append((pc() - ta) * 1e3)
        for k, v in parts.items():
            act_parts.setdefault(k, []).append(v)
        if cfg.snapshots:
            ck.append(cfg.checkpoint(st.k))
    tb = pc()
    cfg.wait_background()
    bg_s = pc() - tb
    e2e = pc() - t0 - verify_s
    # a final check on the last node (the floor: its own accumulated state)
    tv = pc()
    if cfg.snapshots:
        failures += verify(cfg, trace, trace.expansions, base)
    verify_s += pc() - tv
    if not cfg.snapshots:
        # After the timed run (a fork write-protects the REPL's memory, which
        # would slow the floor down): the REPL's own fork() where the others
        # checkpoint, after the shell's and the REPL's commands of a step --
        # the floor under any fork-based checkpoint of this REPL.
        for st in trace.steps[:BARE_FORK_PROBES]:
            ask(cfg.sh, st.shell_cmd(), "sh")
            ask(cfg.py, st.repl_cmd(), "py")
            m = re.search(r"FORK ([0-9.]+)", ask(cfg.py, "_bench_fork()", "py"))
            if m:
                bare_forks.append(float(m.group(1)))
    return {"e2e_s": e2e, "verify_s": verify_s, "final_wait_background_s": bg_s,
            "inference_s": inference * len(trace.steps), "action_ms": summary(act_ms),
            "action_parts_ms": {k: summary(v) for k, v in act_parts.items()},
            "checkpoints": ck, "rollbacks": rb, "failures": failures, "repl_bare_fork_ms": bare_forks,
            "repl_rss_mb": rss_mb(cfg.py.pid if cfg.py else None),
            "hugepages": ({n: p._cr.status()["hugepages"] for n, p in cfg.sb.procs.items()}
                          if isinstance(cfg, DeltaBoxConfig) else None)}


# -- the repository ------------------------------------------------------------------

def prepare_tree(tmp: str) -> dict[str, Any]:
    """Unpack SymPy (+ mpmath outside the tree); Django if SymPy cannot be had."""
    tree, deps = os.path.join(tmp, "pristine"), os.path.join(tmp, "deps")
    wheel = pip_download(SYMPY)
    dep_wheels = [pip_download(d) for d in SYMPY_DEPS] if wheel else []
    if wheel and all(dep_wheels):
        for w, dest in [(wheel, tree)] + [(d, deps) for d in dep_wheels]:
            os.makedirs(dest, exist_ok=True)
            with zipfile.ZipFile(w) as z:  # type: ignore[arg-type]
                z.extractall(dest)
        for d in glob.glob(os.path.join(tree, "*.dist-info")):
            shutil.rmtree(d)
        pkg = "sympy"
        source = f"{SYMPY} wheel ({os.path.basename(wheel)}), deps {', '.join(SYMPY_DEPS)}"
    else:
        print("WARNING: no SymPy wheel; falling back to Django 5.2.17", file=sys.stderr)
        info = django_tree(tree, deps)
        if info["fallback"]:
            raise RuntimeError("neither SymPy nor Django could be had: no real repository")
        pkg, source = "django", info["source"]
    cands = []
    for dirpath, _dirs, files in os.walk(os.path.join(tree, pkg)):
        for f in files:
            p = os.path.join(dirpath, f)
            if f.endswith(".py") and 2000 <= os.path.getsize(p) <= MAX_POOL_FILE:
                cands.append(os.path.relpath(p, tree))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _s, fs in os.walk(tree) for f in fs)
    return {"tree": tree, "deps": deps, "package": pkg, "source": source,
            "files": count_files(tree), "mb": size / 2**20, "candidates": sorted(cands)}


# -- reporting ---------------------------------------------------------------------

ORDER = ["floor", "deltabox", "deltabox-4k", "overlayfs", "git", "copytree"]


def col(xs: list[dict[str, Any]], key: str) -> list[float]:
    return [x[key] for x in xs if key in x]


def analyse(report: dict[str, Any]) -> dict[str, Any]:
    res = report["results"]
    floor = res.get("floor", {}).get("e2e_s")
    out: dict[str, Any] = {}
    for name, r in res.items():
        if "error" in r:
            out[name] = {"error": r["error"]}
            continue
        a: dict[str, Any] = {"checkpoint_ms": summary(col(r["checkpoints"], "ms")),
                             "rollback_ms": summary(col(r["rollbacks"], "ms")),
                             "e2e_s": r["e2e_s"], "e2e_ratio": r["e2e_s"] / floor if floor else None,
                             "failures": len(r["failures"]), "action_ms": r["action_ms"]}
        ck_keys = sorted({k for x in r["checkpoints"] for k in x if k.endswith("_ms")} - {"ms"})
        rb_keys = sorted({k for x in r["rollbacks"] for k in x
                          if k.endswith("_ms") or k == "replayed"} - {"ms"})
        a["checkpoint_parts"] = [k for k in ck_keys if k != "critical_ms"]
        a["rollback_parts"] = [k for k in rb_keys if k not in ("reported_ms", "replayed")]
        for k in ck_keys:
            a[f"checkpoint_{k}"] = summary(col(r["checkpoints"], k))
        for k in rb_keys:
            a[f"rollback_{k}"] = summary(col(r["rollbacks"], k))
        if r.get("repl_bare_fork_ms"):
            a["repl_bare_fork_ms"] = summary(r["repl_bare_fork_ms"])
        by_depth: dict[str, list[dict[str, Any]]] = {}
        for x in r["checkpoints"]:
            if x.get("depth"):
                lo = (x["depth"] - 1) // 4 * 4 + 1
                by_depth.setdefault(f"{lo}-{lo + 3}", []).append(x)
        if by_depth:
            a["fork_by_depth"] = {k: {"n": len(v), "fork_p50": summary(col(v, "fork_ms")).get("p50"),
                                      "critical_p50": summary(col(v, "critical_ms")).get("p50")}
                                  for k, v in sorted(by_depth.items(), key=lambda kv: int(kv[0].split("-")[0]))}
        paths = [p for x in r["rollbacks"] for p in x.get("paths", {}).values()]
        if paths:
            a["rollback_paths"] = {p: paths.count(p) for p in sorted(set(paths))}
        out[name] = a
    return out


def _breakdown(dname: str, d: dict[str, Any], report: dict[str, Any]) -> list[str]:
    """The critical-path parts, the fork by chain depth and the restore paths
    of one DeltaBox configuration."""
    out: list[str] = []
    items = [("checkpoint, caller", "checkpoint_ms"),
             ("checkpoint critical_ms (reported)", "checkpoint_critical_ms")]
    items += [(f"  {k} (CheckpointReport)", f"checkpoint_{k}") for k in d["checkpoint_parts"]]
    items += [("rollback, caller", "rollback_ms"), ("rollback ms (reported)", "rollback_reported_ms")]
    items += [(f"  {k} (RollbackReport)", f"rollback_{k}") for k in d["rollback_parts"]]
    rows = [[label, d.get(key, {}).get("mean"), d.get(key, {}).get("p50"), d.get(key, {}).get("p99"),
             d.get(key, {}).get("max")] for label, key in items]
    out.append(table(f"{dname} breakdown (ms)", ["", "mean", "p50", "p99", "max"], rows))
    chain = d.get("fork_by_depth")
    if chain:
        out.append(table(f"{dname}: template fork by fork-chain depth (the deepest template of each "
                         "checkpoint; deltacr Checkpoint.depth)",
                         ["depth", "checkpoints", "fork_ms p50", "critical_ms p50"],
                         [[k, v["n"], v["fork_p50"], v["critical_p50"]] for k, v in chain.items()]))
    r = report["results"][dname]
    out.append(f"{dname}: process restore paths over all rollbacks (bash + python): "
               f"{d.get('rollback_paths')}; max_templates {report['config']['max_templates']}; REPL RSS "
               f"{r.get('repl_rss_mb') or 0:.0f} MB; final wait_background {r['final_wait_background_s']:.2f} s "
               f"(inside e2e); huge-page keeper: {r.get('hugepages')}\n")
    return out


def render(report: dict[str, Any]) -> str:
    an = report["analysis"]
    cfg = report["config"]
    inf = cfg["inference"]
    misses: list[str] = []
    out: list[str] = []
    rows = []
    for name in ORDER:
        if name not in an:
            continue
        a = an[name]
        if "error" in a:
            rows.append([name] + ["-"] * 9 + [f"ERROR: {a['error'][:80]}"])
            continue
        c, r = a["checkpoint_ms"], a["rollback_ms"]
        rows.append([name, c.get("mean"), c.get("p50"), c.get("p99"), r.get("mean"), r.get("p50"),
                     r.get("p99"), a["e2e_s"], f"{a['e2e_ratio']:.3f}x" if a["e2e_ratio"] else "-",
                     a["action_ms"]["p50"], a["failures"]])
    out.append(table(f"End to end: {cfg['expansions']} expansions, {cfg['rollbacks']} rollbacks, "
                     f"inference {inf:g} s, seed {cfg['seed']} (ms; caller-measured; e2e in s)",
                     ["config", "ckpt mean", "ckpt p50", "ckpt p99", "rollback mean",
                      "rollback p50", "rollback p99", "e2e s", "e2e / floor", "expansion p50 ms",
                      "check failures"], rows))
    for dname in ("deltabox", "deltabox-4k"):
        d = an.get(dname)
        if d and "error" not in d:
            out += _breakdown(dname, d, report)
    d = an.get("deltabox")
    rows = []
    for name in ORDER:
        r = report["results"].get(name)
        if not r or "error" in r:
            continue
        ap = r["action_parts_ms"]
        rows.append([name, r["action_ms"]["p50"], r["action_ms"]["mean"], ap["patch_ms"]["p50"],
                     ap["shell_ms"]["p50"], ap["repl_ms"]["p50"], r["e2e_s"] - r["inference_s"]])
    out.append(table("Expansion cost (ms; the agent's own work, no snapshot work)",
                     ["config", "p50", "mean", "patch files p50", "shell cmd p50", "REPL cmd p50",
                      "e2e minus inference (s)"], rows))
    rows = []
    for name in ("overlayfs", "git", "copytree"):
        a = an.get(name)
        if not a or "error" in a:
            continue
        g = lambda k: a.get(k, {}).get("p50")  # noqa: E731
        rows.append([name, g("rollback_ms"), g("rollback_kill_ms"), g("rollback_fs_ms"),
                     g("rollback_restart_ms"), g("rollback_repl_import_ms"), g("rollback_replay_ms"),
                     a.get("rollback_replayed", {}).get("mean")])
    if rows:
        out.append(table("Baseline rollback breakdown (ms, p50)",
                         ["config", "total", "kill", "files", "restart bash+REPL",
                          "of which REPL start+import sympy", "replay", "mean cmds replayed"], rows))
    # targets
    rows = []
    if d and "error" not in d:
        for what, key, limit in (("checkpoint critical path p50", "checkpoint_critical_ms", CKPT_P50_MS),
                                 ("rollback p50 (caller)", "rollback_ms", ROLLBACK_P50_MS)):
            v = d[key]["p50"]
            ok = v <= limit
            rows.append([f"DeltaBox {what}", f"{v:.2f} ms", f"<= {limit:g} ms", verdict(ok)])
            if not ok:
                misses.append(f"DeltaBox {what} {v:.2f} ms > {limit:g} ms")
        bare = an.get("floor", {}).get("repl_bare_fork_ms", {}).get("p50")
        if bare:
            v = d["checkpoint_critical_ms"]["p50"]
            rows.append(["  context: the REPL's own fork() p50 (floor run, same step)", f"{bare:.2f} ms",
                         "-", f"checkpoint = {v / bare:.2f}x it"])
        ratio = d["e2e_ratio"]
        ok = (ratio <= E2E_RATIO) if (ratio and inf >= 1) else None
        rows.append(["DeltaBox end-to-end / floor", f"{ratio:.3f}x" if ratio else "-",
                     f"<= {E2E_RATIO:g}x at 1 s inference",
                     verdict(ok) if inf >= 1 else f"- (inference {inf:g} s)"])
        if ok is False:
            misses.append(f"DeltaBox end-to-end {ratio:.3f}x the floor > {E2E_RATIO:g}x")
        c = an.get("copytree")
        if c and "error" not in c:
            sp = c["rollback_ms"]["p50"] / d["rollback_ms"]["p50"]
            spm = c["rollback_ms"]["mean"] / d["rollback_ms"]["mean"]
            ok = sp >= SPEEDUP
            rows.append(["rollback speedup vs copytree + replay (p50; mean)",
                         f"{sp:.0f}x; {spm:.0f}x", f">= {SPEEDUP:g}x", verdict(ok)])
            if not ok:
                misses.append(f"rollback only {sp:.1f}x faster than copytree + replay")
    out.append(table("Targets (issue 4)", ["target", "measured", "target", "result"], rows))
    for name, r in report["results"].items():
        if r.get("failures"):
            misses.append(f"{name}: {len(r['failures'])} CORRECTNESS FAILURES, first: {r['failures'][:3]}")
        if "error" in r:
            misses.append(f"{name}: ERROR {r['error'][:300]}")
    if (warning := slow_disk_warning(report["machine"])) is not None:
        misses.append(warning)
    if report.get("code_start") != report.get("code_end"):
        misses.append(f"WARNING: the code under test changed during the run ({report.get('code_start')} "
                      f"-> {report.get('code_end')})")
    report["misses"] = misses
    out.append("### Misses\n\n" + ("\n".join(f"- {m}" for m in misses) if misses else "none") + "\n")
    return "\n".join(out)


def plot(runs: dict[str, dict[str, Any]], path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return (f"no plot: matplotlib unavailable ({e}); "
                ".venv/bin/pip install -e '.[bench]' installs it")
    keys = list(runs)
    fig, axes = plt.subplots(len(keys), 3, figsize=(15, 4 * len(keys)), squeeze=False)
    for row, key in zip(axes, keys):
        an = runs[key]["analysis"]
        names = [n for n in ORDER if n in an and "error" not in an[n]]
        snaps = [n for n in names if n != "floor"]
        for ax, what in ((row[0], "checkpoint_ms"), (row[1], "rollback_ms")):
            p50 = [an[n][what].get("p50", 0) for n in snaps]
            p99 = [an[n][what].get("p99", 0) for n in snaps]
            x = range(len(snaps))
            ax.bar([i - 0.2 for i in x], p50, 0.4, label="p50")
            ax.bar([i + 0.2 for i in x], p99, 0.4, label="p99")
            ax.set_xticks(list(x), snaps)
            ax.set_yscale("log")
            ax.set_ylim(bottom=0.5)
            ax.axhline(CKPT_P50_MS, color="red", ls="--", label="4 ms target (DeltaBox p50)")
            ax.set_ylabel("ms (log)")
            ax.set_title(f"{what.split('_')[0]} ({key})")
            ax.legend()
        ratios = [an[n]["e2e_ratio"] for n in names]
        row[2].bar(names, ratios, color="tab:green")
        row[2].axhline(E2E_RATIO, color="red", ls="--", label=f"{E2E_RATIO}x target")
        row[2].set_ylabel("end-to-end / floor")
        row[2].set_title(f"end to end ({key})")
        row[2].legend()
        for ax in row:
            ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def merge_runs() -> None:
    """Every non-quick run's JSON into deltabox.json / .md / .png."""
    runs = {}
    files = glob.glob(os.path.join(RESULTS, "deltabox-inf*.json"))
    # the plain runs (inf0, inf1) first, variants (-n, -mt, subsets) after
    for p in sorted(files, key=lambda p: ("-" in os.path.basename(p)[len("deltabox-"):], p)):
        with open(p) as f:
            runs[os.path.basename(p)[len("deltabox-"):-len(".json")]] = json.load(f)
    if not runs:
        return
    write_json(os.path.join(RESULTS, "deltabox.json"), {"benchmark": "deltabox", "runs": runs})
    with open(os.path.join(RESULTS, "deltabox.md"), "w") as f:
        f.write("# DeltaBox end-to-end benchmark (issue 4)\n\n")
        for key, r in runs.items():
            m, c = r["machine"], r["config"]
            f.write(f"## Run {key}: {c['expansions']} expansions, {c['rollbacks']} rollbacks, "
                    f"inference {c['inference']:g} s\n\n{m['date']}, commit {m['git_commit'][:12]}"
                    f"{' (dirty tree)' if m.get('git_dirty') else ''}, kernel {m['kernel']}, "
                    f"{m['cpu_count']} CPUs, repo {r['data']['source']} ({r['data']['files']} files, "
                    f"{r['data']['mb']:.0f} MB), wall {r['wall_s']:.0f} s, load {m['loadavg_start'][0]:.2f}"
                    f" -> {m['loadavg_end'][0]:.2f}\n\n"
                    f"Command: `{r['command']}`\n\n{r['text']}\n")
    err = plot(runs, os.path.join(RESULTS, "deltabox.png"))
    if err:
        print(err)


# -- main --------------------------------------------------------------------------

def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 expansions, inference 0")
    ap.add_argument("--expansions", type=int, default=None, help="expansions per trajectory (100)")
    ap.add_argument("--inference", type=float, default=None, help="simulated inference s (0)")
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--max-templates", type=int, default=MAX_TEMPLATES,
                    help=f"DeltaBox Sandbox max_templates ({MAX_TEMPLATES}, its default)")
    ap.add_argument("--configs", default=",".join(ORDER), help=f"subset of {','.join(ORDER)}")
    ap.add_argument("--dir", default="/var/tmp",
                    help="where to work: trees, stores, mounts, snapshots (default /var/tmp, the main disk)")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_deltabox: run as root (FUSE, ptrace, overlayfs)", file=sys.stderr)
        return 2
    expansions = a.expansions or (20 if a.quick else 100)
    inference = a.inference if a.inference is not None else 0.0
    configs = [c for c in a.configs.split(",") if c]
    if "floor" not in configs:
        configs.insert(0, "floor")
    run_key = "quick" if a.quick else f"inf{inference:g}"
    if a.expansions and not a.quick:
        run_key += f"-n{expansions}"
    if a.max_templates != MAX_TEMPLATES:
        run_key += f"-mt{a.max_templates}"
    if set(configs) != set(ORDER):
        run_key += "-" + "+".join(c for c in ORDER if c in configs)
    out = os.path.join(RESULTS, f"deltabox-{run_key}.json")
    signal.signal(signal.SIGTERM, _on_sigterm)
    report: dict[str, Any] = {"benchmark": "deltabox", "machine": machine_info(),
                              "command": " ".join([os.path.relpath(sys.executable, os.getcwd())] + sys.argv),
                              "results": {}}
    tmp = tempfile.mkdtemp(prefix="bench-deltabox-", dir=a.dir)
    t_start = pc()
    report["code_start"] = code_state()
    report["machine"]["file_create_us_start"] = file_create_us(tmp)
    try:
        data = prepare_tree(tmp)
        trace = Trace.make(a.seed, expansions, data["candidates"])
        n_rb = sum(1 for s in trace.steps if s.rollback_to is not None)
        depths = [len(trace.path(s.rollback_to)) for s in trace.steps if s.rollback_to is not None]
        report["data"] = {k: v for k, v in data.items() if k != "candidates"}
        report["config"] = {"expansions": expansions, "rollbacks": n_rb, "inference": inference,
                            "seed": a.seed, "max_templates": a.max_templates, "configs": configs,
                            "pool": trace.pool, "quick": a.quick,
                            "rollback_target_depth": summary(depths),
                            "trace": [asdict(s) for s in trace.steps]}
        print(f"repo: {data['source']}: {data['files']} files, {data['mb']:.0f} MB; trace seed "
              f"{a.seed}: {expansions} expansions, {n_rb} rollbacks (target depth mean "
              f"{summary(depths).get('mean', 0):.1f}), inference {inference:g} s; configs "
              f"{', '.join(configs)}", flush=True)
        base = {}
        for f in trace.pool:
            with open(os.path.join(data["tree"], f), "rb") as fh:
                base[f] = fh.read()
        env = dict(os.environ, PYTHONPATH=data["deps"],
                   PYTHONPYCACHEPREFIX=os.path.join(tmp, "pycache"), PYTHONUNBUFFERED="1")
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        for name in configs:
            cls = {"floor": Floor, "copytree": CopyTree, "git": Git, "overlayfs": Overlay,
                   "deltabox": DeltaBoxConfig, "deltabox-4k": DeltaBox4kConfig}[name]
            cfg = (cls(tmp, data["tree"], env, a.max_templates) if issubclass(cls, DeltaBoxConfig)  # type: ignore[call-arg]
                   else cls(tmp, data["tree"], env))
            t0 = pc()
            try:  # the one teardown path of this configuration
                cfg.setup()
                setup_s = pc() - t0
                print(f"{name}: set up in {setup_s:.1f} s; searching ...", flush=True)
                r = search(cfg, trace, base, inference)
                r["setup_s"] = setup_s
                report["results"][name] = r
                ck = [x["ms"] for x in r["checkpoints"]]
                rb = [x["ms"] for x in r["rollbacks"]]
                print(f"{name}: e2e {r['e2e_s']:.1f} s, checkpoint p50 "
                      f"{summary(ck).get('p50', float('nan')):.2f} ms, rollback p50 "
                      f"{summary(rb).get('p50', float('nan')):.2f} ms, "
                      f"{len(r['failures'])} check failures", flush=True)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - report it, go on with the others
                import traceback
                traceback.print_exc()
                report["results"][name] = {"error": f"{type(e).__name__}: {e}"}
            finally:
                try:
                    cfg.close()
                except Exception as e:  # noqa: BLE001
                    print(f"{name}: close failed: {e}", file=sys.stderr)
                    report["results"].setdefault(name, {})["close_error"] = str(e)
                if os.path.isdir(cfg.dir):
                    shutil.rmtree(cfg.dir, ignore_errors=True)  # snapshots: GBs for copytree
        report["machine"]["file_create_us_end"] = file_create_us(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["code_end"] = code_state()
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["wall_s"] = pc() - t_start
    report["analysis"] = analyse(report)
    text = render(report)
    report["text"] = text
    print()
    print(text)
    print(f"ran: {report['command']}; wall {report['wall_s']:.0f} s; load average "
          f"{report['machine']['loadavg_start'][0]:.2f} -> {report['machine']['loadavg_end'][0]:.2f}")
    write_json(out, report)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(f"# DeltaBox end-to-end benchmark ({run_key})\n\nCommand: `{report['command']}`\n\n{text}")
    err = plot({run_key: report}, os.path.splitext(out)[0] + ".png")
    if err:
        print(err)
    if not a.quick:
        merge_runs()
    print(f"wrote {out} (+ .md, .png)" + ("" if a.quick else "; merged into bench/results/deltabox.json/.md/.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
