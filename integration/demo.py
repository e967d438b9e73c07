"""``deltabox demo``: a small agent tree search in a sandbox.

The sandbox is a DeltaFS mount over an unpacked Django 5.2.17 (or a
generated repository when Django cannot be downloaded) with a bash shell and
a Python REPL working in it. The "agent" expands the best node of the tree a
few times: roll back to it (files AND both processes), let the shell patch a
file, let the REPL import the patched module and score it, checkpoint. Some
patches are buggy; the search keeps the best branch, backtracks to any node
and branches again. At the end it prints the state tree and a timing table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

from .repos import django_tree
from .sandbox import Proc, Sandbox


@dataclass
class Node:
    state: int
    parent: int | None
    label: str
    score: int


def _ask(p: Proc, line: str, marker: str) -> str:
    p.send(line)
    return p.expect(marker + "\n").decode()[: -len(marker) - 1].strip()


def run(branches: int = 3, depth: int = 4) -> int:
    work = tempfile.mkdtemp(prefix="deltabox-demo-")
    try:
        print("Preparing the repository ...", flush=True)
        info = django_tree(os.path.join(work, "repo"), os.path.join(work, "deps"))
        if info["fallback"]:
            target, module = "genpkg/p0/m1.py", "genpkg.p0.m1"
        else:
            target, module = "django/utils/text.py", "django.utils.text"
        print(f"Repository: {info['source']}, {info['files']} files")
        with Sandbox(os.path.join(work, "repo"), workdir=os.path.join(work, "sandbox")) as sb:
            env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1",
                       PYTHONPATH=os.path.join(work, "deps"))
            sh = sb.spawn(["bash", "--norc", "--noprofile"], name="bash", env=env)
            py = sb.spawn([sys.executable, "-u", "-q", "-i"], name="python", env=env)
            _ask(sh, "echo ok\n", "ok")
            _ask(py, "import sys, importlib; sys.ps1 = sys.ps2 = ''; print('ok')\n", "ok")
            print(f"Sandbox at {sb.root}: bash pid {sh.pid}, python pid {py.pid}\n")

            def score() -> int:
                # The REPL keeps state across the search: a counter of how
                # many evaluations this branch of the REPL has done.
                out = _ask(py, f"evals = globals().get('evals', 0) + 1; sys.modules.pop({module!r}, None); "
                               f"m = importlib.import_module({module!r}); "
                               "print(sum(1 for i in range(50) if getattr(m, f'demo_{i}', lambda: -1)() == i)); "
                               "print('done')\n", "done")
                return int(out.splitlines()[-1])

            ck: list[float] = []
            rb: list[float] = []
            root = Node(sb.checkpoint("root").id, None, "root", score())
            nodes = [root]
            best = root
            for level in range(depth):
                children = []
                for b in range(branches):
                    r = sb.rollback(best.state)
                    rb.append(r.ms)
                    k = best.score
                    good = (b + level) % 3 != 1
                    body = f"return {k}" if good else f"return {k} + 1  # off by one"
                    _ask(sh, f"printf '\\n\\ndef demo_{k}():\\n    {body}\\n' >> {target}; "
                             "echo patched\n", "patched")
                    s = score()
                    c = sb.checkpoint(f"L{level + 1}.{b + 1}: demo_{k} {'ok' if good else 'buggy'}")
                    ck.append(c.critical_ms)
                    children.append(Node(c.id, best.state, "", s))
                nodes += children
                best = max(children, key=lambda n: (n.score, -n.state))
                print(f"level {level + 1}: tried {branches} patches, scores "
                      f"{[c.score for c in children]}; keep state {best.state}")
            r = sb.rollback(best.state)
            rb.append(r.ms)
            final = score()
            evals = _ask(py, "print(evals); print('done')\n", "done").splitlines()[-1]
            diff = sb.diff(root.state)
            print(f"\nBack at the best leaf {best.state}: score {final}, the REPL there has done "
                  f"{evals} evaluations (its own branch's history); changed since root: "
                  f"{diff.modified + diff.added}\n")
            print("State tree:")
            for st in sb.states():
                mark = "  <- current" if st.current else ""
                print(f"  {st.id:>3}  parent {str(st.parent or '-'):>3}  {st.label}{mark}")
            sb.wait_background()
            print("\nTiming (ms; the caller's critical path, files + bash + python):")
            print(f"  {'operation':<12}{'count':>7}{'median':>10}{'max':>10}")
            for name, xs in (("checkpoint", ck), ("rollback", rb)):
                print(f"  {name:<12}{len(xs):>7}{statistics.median(xs):>10.2f}{max(xs):>10.2f}")
            return 0 if final == best.score else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deltabox demo")
    p.add_argument("--branches", type=int, default=3)
    p.add_argument("--depth", type=int, default=4)
    a = p.parse_args(argv)
    t = time.perf_counter()
    rc = run(a.branches, a.depth)
    print(f"\nDemo finished in {time.perf_counter() - t:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
