"""The README's main job, until the sandbox lands: a small tree search over a
real repository on DeltaFS.

An "agent" tries several patches of a Django tree (or a generated stand-in
when Django cannot be downloaded), runs a real check in a bash shell for
each, rolls back to any earlier node of the tree, keeps the best branch and
branches again from there. It prints the checkpoint tree and a timing table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import deltafs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Node:
    cid: int
    parent: int | None
    label: str
    score: int


def _repo(workdir: str) -> tuple[str, str, str]:
    """(tree, file to patch, module to import) for the demo repository."""
    sys.path.insert(0, REPO_ROOT)
    from bench._common import django_tree  # the cached wheel, or a generated tree

    tree = os.path.join(workdir, "repo")
    deps = os.path.join(workdir, "deps")
    info = django_tree(tree, deps)
    if info["fallback"]:
        return tree, "genpkg/p0/m1.py", "genpkg.p0.m1"
    return tree, "django/utils/text.py", "django.utils.text"


def _check(shell: subprocess.Popen[str], mnt: str, module: str) -> int:
    """Run the 'test suite' of the demo in the shell: import the patched
    module and count how many of the demo's helper functions work."""
    script = (f"cd {mnt} && python3 -c 'import {module} as m; "
              "print(sum(1 for i in range(5) if getattr(m, f\"demo_{i}\", lambda: 0)() == i))' "
              "2>/dev/null || echo 0\n")
    assert shell.stdin is not None and shell.stdout is not None
    shell.stdin.write(script + "echo __done__\n")
    shell.stdin.flush()
    out = []
    while True:
        line = shell.stdout.readline()
        if not line or line.strip() == "__done__":
            break
        out.append(line.strip())
    return int(out[-1]) if out and out[-1].isdigit() else 0


def run(branches: int, depth: int) -> int:
    workdir = tempfile.mkdtemp(prefix="deltabox-demo-")
    mnt = os.path.join(workdir, "mnt")
    os.mkdir(mnt)
    m: deltafs.Mount | None = None
    shell: subprocess.Popen[str] | None = None
    try:
        print("Preparing the repository ...", flush=True)
        tree, target, module = _repo(workdir)
        t0 = time.perf_counter()
        m = deltafs.mount(mnt, base=tree, store=os.path.join(workdir, "store"))
        print(f"Mounted DeltaFS over {tree} ({sum(len(f) for _, _, f in os.walk(tree))} files) "
              f"at {mnt} in {(time.perf_counter() - t0) * 1e3:.0f} ms\n")
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=os.path.join(workdir, "deps"))
        shell = subprocess.Popen(["bash"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, cwd=mnt, env=env)
        ck_ms: list[float] = []
        rb_ms: list[float] = []

        def checkpoint(label: str) -> int:
            t = time.perf_counter()
            cid = m.checkpoint(label)  # type: ignore[union-attr]
            ck_ms.append((time.perf_counter() - t) * 1e3)
            return cid

        def rollback(cid: int) -> None:
            t = time.perf_counter()
            m.rollback(cid)  # type: ignore[union-attr]
            rb_ms.append((time.perf_counter() - t) * 1e3)

        root = Node(checkpoint("root"), None, "root", _check(shell, mnt, module))
        nodes = [root]
        best = root
        path = os.path.join(mnt, target)
        for level in range(depth):
            children = []
            for b in range(branches):
                rollback(best.cid)  # back to the node we expand, from wherever we are
                # The "agent action": append one helper; some attempts are buggy.
                k = best.score
                good = (b + level) % 3 != 1
                body = f"return {k}" if good else f"return {k} + 1  # off by one"
                with open(path, "a") as f:
                    f.write(f"\n\ndef demo_{k}():\n    {body}\n")
                score = _check(shell, mnt, module)
                node = Node(checkpoint(f"L{level + 1} try {b + 1}: demo_{k} "
                                       f"{'ok' if good else 'buggy'}"), best.cid, "", score)
                children.append(node)
            nodes.extend(children)
            best = max(children, key=lambda n: (n.score, -n.cid))
            print(f"level {level + 1}: tried {branches} patches, scores "
                  f"{[c.score for c in children]}, keep checkpoint {best.cid}")
        rollback(best.cid)
        final = _check(shell, mnt, module)
        diff = m.diff(root.cid)
        print(f"\nRolled back to the best leaf {best.cid}: score {final}; "
              f"changed since root: {diff.modified + diff.added}\n")
        print("Checkpoint tree (deltafs list):")
        for c in m.list():
            mark = "  <- live" if c.current else ""
            print(f"  {c.id:>4}  parent {str(c.parent or '-'):>4}  {c.label}{mark}")
        print("\nTiming (ms, measured by the caller through the Python API):")
        print(f"  {'operation':<12}{'count':>7}{'median':>10}{'max':>10}")
        for name, xs in (("checkpoint", ck_ms), ("rollback", rb_ms)):
            print(f"  {name:<12}{len(xs):>7}{statistics.median(xs):>10.2f}{max(xs):>10.2f}")
        return 0 if final == best.score else 1
    finally:
        if shell is not None:
            shell.kill()
            shell.wait()
        if m is not None:
            try:
                m.unmount()
            except deltafs.DeltaFSError:
                deltafs.force_unmount(mnt)
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deltabox demo")
    p.add_argument("--branches", type=int, default=3)
    p.add_argument("--depth", type=int, default=4)
    a = p.parse_args(argv)
    return run(a.branches, a.depth)


if __name__ == "__main__":
    sys.exit(main())
