"""The daemon behind the ``deltabox`` CLI: hosts one named Sandbox.

Layout of ``/var/lib/deltabox/NAME`` (the sandbox's workdir): ``root/`` the
mount point the processes work in, ``store/`` the DeltaFS and DeltaCR
stores, ``sandbox.json`` what a later ``deltabox stop`` needs even if this
daemon died (the boot id, its pid and the live pids, each with its start
time so that a stale record kills nothing else, and the session each
process was spawned in, where what it starts goes), ``control.sock``, and per
process ``procs/NAME.log`` with everything it printed. A process's stdin is
a pipe the daemon keeps open, so programs that read stdin do not see EOF.

Requests are JSON lines, one at a time per sandbox (a lock): the sandbox
operations block (ptrace, LMDB syncs) and are short.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import traceback
from dataclasses import asdict
from typing import Any

from . import _proc
from .errors import DeltaBoxError
from .sandbox import Proc, Sandbox, check_name

STATE_ROOT = "/var/lib/deltabox"


def workdir_of(name: str) -> str:
    """The sandbox's directory; BadName for a name that is not a plain one
    (``../x`` or ``/`` would make the CLI clear and mount someone else's)."""
    return os.path.join(STATE_ROOT, check_name(name))


def write_record(workdir: str, rec: dict[str, Any]) -> None:
    tmp = os.path.join(workdir, "sandbox.json.tmp")
    with open(tmp, "w") as f:
        json.dump(rec, f)
    os.replace(tmp, os.path.join(workdir, "sandbox.json"))


class Host:
    def __init__(self, name: str, base: str, workdir: str) -> None:
        self.name = name
        self.base = base
        self.workdir = workdir
        self.lock = threading.Lock()
        self.sb = Sandbox(base, workdir=workdir)
        self.boot = _proc.boot_id()
        # read once: save() must work also after the files' daemon died
        self.fs_daemon = _proc.identity(self.sb.fs.status()["pid"])
        self.pumps: list[threading.Thread] = []
        self.done = threading.Event()
        self.save()

    def save(self) -> None:
        # Processes as [pid, start time] of this boot: a later 'deltabox
        # stop' kills only what still is the same process (pids are reused).
        write_record(self.workdir, {
            "name": self.name, "base": self.base, "root": self.sb.root, "boot": self.boot,
            "daemon": _proc.identity(os.getpid()),
            "fs_daemon": self.fs_daemon,
            "procs": {n: _proc.identity(p.pid) for n, p in self.sb.procs.items()},
            # each process's own session, made at spawn: what it starts is in it
            "sessions": sorted({p.sid for p in self.sb.procs.values()}),
            # every process they started, also one that left its session
            "cgroup": self.sb.cgroup,
        })

    def _pump(self, p: Proc, log_path: str) -> None:
        # Copies output to the log; a rollback's drain races with it harmlessly.
        with open(log_path, "ab", buffering=0) as log:
            fd = p.stdout.fileno()
            while not self.done.is_set():
                try:
                    chunk = os.read(fd, 65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                log.write(chunk)

    def handle(self, req: dict[str, Any]) -> Any:
        op = req.get("op")
        # answered without waiting for an operation under way (a slow-path
        # rollback, a long diff): `deltabox stop` would take silence for a
        # hung daemon and kill it
        if op == "status":
            return {"name": self.name, "root": self.sb.root, "base": self.base,
                    "procs": {n: {"pid": p.pid, "alive": p.alive} for n, p in list(self.sb.procs.items())},
                    "current": self.sb.current, "pid": os.getpid()}
        if op == "stop":
            self.done.set()
            return None
        with self.lock:
            if op == "spawn":
                p = self.sb.spawn(list(req["argv"]), name=req.get("proc"), cwd=req.get("cwd", "."))
                os.makedirs(os.path.join(self.workdir, "procs"), exist_ok=True)
                log = os.path.join(self.workdir, "procs", f"{p.name}.log")
                t = threading.Thread(target=self._pump, args=(p, log), daemon=True)
                t.start()
                self.pumps.append(t)
                self.save()
                return {"name": p.name, "pid": p.pid, "root": self.sb.root, "log": log}
            if op == "checkpoint":
                return asdict(self.sb.checkpoint(str(req.get("label") or "")))
            if op == "rollback":
                try:
                    return asdict(self.sb.rollback(int(req["id"])))
                finally:  # also after a failed one: the live pids may have changed
                    self.save()
            if op == "list":
                return [asdict(s) for s in self.sb.states()]
            if op == "diff":
                b = req.get("b")
                return asdict(self.sb.diff(int(req["a"]), None if b is None else int(b)))
            if op == "drop":
                self.sb.drop(int(req["id"]))
                return None
        raise DeltaBoxError(f"unknown request {op!r}")


def serve(name: str, base: str, ready_fd: int) -> int:
    workdir = workdir_of(name)
    os.makedirs(workdir, exist_ok=True)
    try:
        host = Host(name, base, workdir)
    except Exception as e:  # noqa: BLE001 - reported to the starter
        os.write(ready_fd, f"{e}\n".encode())
        os.close(ready_fd)
        return 1
    sock_path = os.path.join(workdir, "control.sock")
    try:
        os.unlink(sock_path)
    except FileNotFoundError:
        pass

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                try:
                    res = {"ok": True, "result": host.handle(json.loads(line))}
                except DeltaBoxError as e:
                    res = {"ok": False, "kind": type(e).__name__, "error": str(e)}
                except Exception as e:  # noqa: BLE001 - report, keep serving
                    traceback.print_exc()
                    kind = "DeltaBoxError"
                    res = {"ok": False, "kind": kind, "error": f"{type(e).__name__}: {e}"}
                self.wfile.write(json.dumps(res).encode() + b"\n")
                self.wfile.flush()
                if host.done.is_set():
                    return

    server = socketserver.ThreadingUnixStreamServer(sock_path, Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: host.done.set())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    os.write(ready_fd, b"ok\n")
    os.close(ready_fd)
    try:
        host.done.wait()
    finally:
        server.shutdown()
        server.server_close()
        try:
            with host.lock:  # after the operation under way, if any (stop does not wait for it)
                host.sb.close()
        finally:
            for f in ("control.sock", "sandbox.json"):
                try:
                    os.unlink(os.path.join(workdir, f))
                except FileNotFoundError:
                    pass
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deltabox-daemon")
    p.add_argument("name")
    p.add_argument("--base", required=True)
    p.add_argument("--ready-fd", type=int, required=True)
    a = p.parse_args(argv)
    return serve(a.name, a.base, a.ready_fd)


if __name__ == "__main__":
    sys.exit(main())
