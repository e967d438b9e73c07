"""The ``deltacr`` command line. Scripts rely on exactly this interface:

    deltacr check
    deltacr attach PID [--store DIR] [--max-templates N] [--backend B] [--no-spares] [--no-hugepages]
    deltacr checkpoint PID [--label TEXT]      prints the new id alone on one line
    deltacr rollback PID ID [--in-place]       prints the live pid
    deltacr list PID [--json]
    deltacr status PID [--json]
    deltacr detach PID
    deltacr inspect FILE [--runs]

Exit status: 0 on success, 1 when deltacr refused or failed (the reason on
stderr), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from .check import check
from .client import Client, attach
from .delta import format_info, read_delta
from .errors import DeltaCRError
from .session import DEFAULT_STORE_ROOT


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="deltacr", description="Checkpoint and roll back a running process.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="what this kernel allows; exit 0 when checkpointing can work")
    a = sub.add_parser("attach", help="start tracing PID in a background daemon")
    a.add_argument("pid", type=int)
    a.add_argument("--store", help=f"where deltas go (default {DEFAULT_STORE_ROOT}/<pid>-<starttime>)")
    a.add_argument("--max-templates", type=int, default=8,
                   help="frozen processes kept (LRU; the root is pinned); default 8")
    a.add_argument("--backend", default="auto", choices=["auto", "uffd-wp", "pfn", "soft-dirty", "compare"])
    a.add_argument("--no-spares", dest="spares", action="store_false",
                   help="do not keep a pre-forked child per template (rollbacks then fork on their critical "
                        "path; half the frozen processes)")
    a.add_argument("--no-hugepages", dest="hugepages", action="store_false",
                   help="leave the process's memory in 4 KiB pages (by default the daemon collapses memory "
                        "the process wrote into transparent huge pages, which makes template forks cheaper)")
    c = sub.add_parser("checkpoint", help="checkpoint PID; prints the new id")
    c.add_argument("pid", type=int)
    c.add_argument("--label", default="")
    r = sub.add_parser("rollback", help="roll PID back to checkpoint ID; prints the live pid")
    r.add_argument("pid", type=int)
    r.add_argument("id", type=int)
    r.add_argument("--in-place", action="store_true",
                   help="experimental: restore the live process itself (same pid, copies only changed pages)")
    lst = sub.add_parser("list", help="the checkpoint tree of PID")
    lst.add_argument("pid", type=int)
    lst.add_argument("--json", action="store_true")
    s = sub.add_parser("status", help="the session of PID")
    s.add_argument("pid", type=int)
    s.add_argument("--json", action="store_true")
    d = sub.add_parser("detach", help="kill the templates; PID runs on untraced")
    d.add_argument("pid", type=int)
    i = sub.add_parser("inspect", help="read and verify a delta file")
    i.add_argument("file")
    i.add_argument("--runs", action="store_true", help="also list every page run")
    return ap


def _run(a: argparse.Namespace) -> int:
    if a.cmd == "check":
        report = check(use_cache=False)
        print(report.format())
        return 0 if report.can_checkpoint else 1
    if a.cmd == "attach":
        cl = attach(a.pid, a.store, a.max_templates, a.backend, spares=a.spares, hugepages=a.hugepages)
        st = cl.status()
        print(f"attached to pid {a.pid}: daemon {st['daemon_pid']}, backend {st['backend']}, store {st['store']}")
        for w in st["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
        return 0
    if a.cmd == "inspect":
        print(format_info(a.file, read_delta(a.file), runs=a.runs))
        return 0
    cl = Client(a.pid)
    if a.cmd == "checkpoint":
        print(cl.checkpoint(a.label).id)
    elif a.cmd == "rollback":
        res = cl.rollback(a.id, in_place=a.in_place)
        for w in res.warnings:
            print(f"warning: {w}", file=sys.stderr)
        print(res.pid)
    elif a.cmd == "list":
        rows = cl.list()
        if a.json:
            print(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
        else:
            print(f"{'id':>4} {'parent':>6}  {'':1} {'template':8} {'depth':>5} {'delta':>10} {'crit ms':>8}  "
                  f"{'created':19}  label")
            for r in rows:
                created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created))
                delta = f"{r.delta_bytes}" if r.delta_state == "written" else r.delta_state
                print(f"{r.id:>4} {r.parent or '-':>6}  {'*' if r.current else ' '} "
                      f"{'yes' if r.template else 'no':8} {r.depth:>5} {delta:>10} {r.critical_ms:8.2f}  "
                      f"{created}  {r.label}")
    elif a.cmd == "status":
        st = cl.status()
        if a.json:
            print(json.dumps(st, indent=1))
        else:
            for k, v in st.items():
                print(f"{k:14} {v}")
    elif a.cmd == "detach":
        cl.detach()
        print(f"detached from pid {a.pid}")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        return _run(a)
    except DeltaCRError as e:
        print(f"deltacr: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
