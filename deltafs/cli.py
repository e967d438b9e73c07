"""The ``deltafs`` command line."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import asdict

from .client import Mount, default_store, force_unmount, mount
from .errors import DeltaFSError
from .mounts import is_dead

USAGE = """\
deltafs MOUNTPOINT [--base DIR] [--store DIR] [--foreground] [-o OPTIONS]
deltafs checkpoint MOUNTPOINT [--label TEXT] [--durable]
deltafs rollback MOUNTPOINT ID
deltafs list MOUNTPOINT [--json]
deltafs diff MOUNTPOINT A [B]
deltafs drop MOUNTPOINT ID
deltafs unmount MOUNTPOINT"""

COMMANDS = {"checkpoint", "rollback", "list", "diff", "drop", "unmount"}


def _mount(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="deltafs", usage=USAGE)
    p.add_argument("mountpoint")
    p.add_argument("--base", help="read-only base directory (default: the mount point's contents)")
    p.add_argument("--store", help="index and data (default: /var/lib/deltafs/NAME-HASH)")
    p.add_argument("--foreground", action="store_true", help="serve in this process")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="FUSE mount options, e.g. allow_other")
    a = p.parse_args(argv)
    opts = [o for group in a.options for o in group.split(",") if o]
    store = a.store or default_store(a.mountpoint)
    if a.foreground:
        from .daemon import serve

        return serve(a.mountpoint, store, a.base, opts, None)
    mount(a.mountpoint, base=a.base, store=store, options=opts)
    return 0


def _command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="deltafs", usage=USAGE)
    sub = p.add_subparsers(dest="cmd", required=True, prog="deltafs")  # not USAGE as a prefix
    c = sub.add_parser("checkpoint")
    c.add_argument("mountpoint")
    c.add_argument("--label", default="")
    c.add_argument("--durable", action="store_true",
                   help="return once the checkpoint is on disk (survives a power cut), not only committed")
    r = sub.add_parser("rollback")
    r.add_argument("mountpoint")
    r.add_argument("id", type=int)
    ls = sub.add_parser("list")
    ls.add_argument("mountpoint")
    ls.add_argument("--json", action="store_true")
    d = sub.add_parser("diff")
    d.add_argument("mountpoint")
    d.add_argument("a", type=int)
    d.add_argument("b", type=int, nargs="?")
    dr = sub.add_parser("drop")
    dr.add_argument("mountpoint")
    dr.add_argument("id", type=int)
    u = sub.add_parser("unmount")
    u.add_argument("mountpoint")
    a = p.parse_args(argv)
    with Mount(a.mountpoint) as m:
        if a.cmd == "checkpoint":
            print(m.checkpoint(a.label, durable=a.durable))
        elif a.cmd == "rollback":
            m.rollback(a.id)
        elif a.cmd == "list":
            cps = m.list()
            if a.json:
                print(json.dumps([asdict(x) for x in cps], indent=1))
            else:
                print(f"{'ID':>6} {'PARENT':>6}  {'CREATED':19}  LABEL")
                for x in cps:
                    when = datetime.datetime.fromtimestamp(x.created_ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")
                    mark = "  <- live state" if x.current else ""
                    print(f"{x.id:>6} {x.parent or '-':>6}  {when}  {x.label}{mark}")
        elif a.cmd == "diff":
            df = m.diff(a.a, a.b)
            for tag, paths in (("A", df.added), ("M", df.modified), ("D", df.deleted)):
                for path in paths:
                    print(f"{tag} {path}")
        elif a.cmd == "drop":
            m.drop(a.id)
        elif a.cmd == "unmount":
            if is_dead(m.mountpoint):  # killed: nothing to flush, the store is as it died
                force_unmount(m.mountpoint)
                print(f"deltafs: the daemon of {m.mountpoint} was dead: the mount is detached; its "
                      f"store {m.store} keeps every checkpoint (mount again to use it)", file=sys.stderr)
            else:
                m.unmount()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in COMMANDS:
            return _command(argv)
        return _mount(argv)
    except DeltaFSError as e:
        print(f"deltafs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
