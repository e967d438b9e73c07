"""The background daemon that traces one process for the CLI.

``deltacr attach PID`` starts one daemon per traced process (its own session,
``setsid``), which owns a :class:`~deltacr.tracer.ProcessCheckpointer` and
answers requests on a unix socket ``$DELTACR_RUN_DIR/<PID>.sock`` (default
``/run/deltacr``). Protocol: one JSON object per line each way; a request is
``{"op": NAME, ...arguments}``, a reply ``{"ok": true, "result": ...}`` or
``{"ok": false, "type": ERROR_CLASS, "error": MESSAGE}``.

The daemon is a child subreaper (orphaned descendants come back to it and are
reaped). Templates carry PTRACE_O_EXITKILL, so if the daemon dies they die with
it and the live process, detached by the kernel, keeps running. On SIGTERM or
``detach`` it kills the templates and detaches cleanly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socketserver
import sys
import threading
from typing import Any

from .errors import DeltaCRError, NotAttached
from .tracer import ProcessCheckpointer

DEFAULT_RUN_DIR = "/run/deltacr"


def run_dir() -> str:
    return os.environ.get("DELTACR_RUN_DIR") or DEFAULT_RUN_DIR  # set but empty: the default


def socket_path(pid: int) -> str:
    return os.path.join(run_dir(), f"{pid}.sock")


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    if isinstance(x, list):
        return [_jsonable(i) for i in x]
    return x


class Daemon:
    def __init__(self, cp: ProcessCheckpointer, path: str) -> None:
        self.cp = cp
        self.path = path
        self.done = threading.Event()
        self.lock = threading.Lock()

    def handle(self, req: dict[str, Any]) -> Any:
        op = req.get("op")
        cp = self.cp
        if self.done.is_set():
            raise NotAttached(f"pid {cp.pid}: the session was detached; run `deltacr attach {cp.pid}` again")
        if op == "ping":
            return {"daemon_pid": os.getpid(), "pid": cp.pid}
        if op == "checkpoint":
            return cp.checkpoint(str(req.get("label", "")))
        if op == "rollback":
            return cp.rollback(int(req["id"]), in_place=bool(req.get("in_place", False)))
        if op == "list":
            return cp.list()
        if op == "status":
            st = cp.status()
            st["daemon_pid"] = os.getpid()
            st["socket"] = self.path
            return st
        if op == "stop":
            return cp.stop()
        if op == "capture":
            return cp.capture(str(req.get("label", "")))
        if op == "resume":
            return cp.resume()
        if op == "wait_background":
            cp.wait_background(req.get("timeout"))
            return None
        if op == "evict":
            return cp.evict(int(req["id"]))
        if op == "detach":
            cp.detach()
            self.done.set()
            try:  # gone before we answer: a following command gets a clean "not attached"
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            return None
        raise DeltaCRError(f"pid {cp.pid}: unknown request {op!r}")

    def serve(self, ready_fd: int | None) -> None:
        daemon = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                for line in self.rfile:
                    try:
                        req = json.loads(line)
                        with daemon.lock:
                            result = daemon.handle(req)
                        reply = {"ok": True, "result": _jsonable(result)}
                    except DeltaCRError as e:
                        reply = {"ok": False, "type": type(e).__name__, "error": str(e)}
                    except Exception as e:  # noqa: BLE001 - reported to the client
                        reply = {"ok": False, "type": "DeltaCRError", "error": f"{type(e).__name__}: {e}"}
                    self.wfile.write(json.dumps(reply).encode() + b"\n")
                    self.wfile.flush()

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        server = Server(self.path, Handler)
        os.chmod(self.path, 0o600)
        threading.Thread(target=server.serve_forever, name="deltacr-server", daemon=True).start()
        if ready_fd is not None:
            os.write(ready_fd, json.dumps({"ok": True, "daemon_pid": os.getpid(), "store": self.cp.store,
                                           "backend": self.cp.backend}).encode())
            os.close(ready_fd)
        try:
            while not self.done.wait(0.1):
                if self.cp.state == "closed":
                    break
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            server.shutdown()
            server.server_close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="deltacr-daemon")
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--store")
    ap.add_argument("--max-templates", type=int, default=8)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--no-spares", dest="spares", action="store_false")
    ap.add_argument("--no-hugepages", dest="hugepages", action="store_false")
    ap.add_argument("--socket")
    ap.add_argument("--ready-fd", type=int)
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    ready = a.ready_fd
    try:
        cp = ProcessCheckpointer(a.pid, a.store, a.max_templates, a.backend, reap_orphans=True, spares=a.spares,
                                 hugepages=a.hugepages)
    except DeltaCRError as e:
        if ready is not None:
            os.write(ready, json.dumps({"ok": False, "type": type(e).__name__, "error": str(e)}).encode())
        print(f"deltacr daemon: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - reported to the waiting CLI
        if ready is not None:
            os.write(ready, json.dumps({"ok": False, "type": "DeltaCRError",
                                        "error": f"{type(e).__name__}: {e}"}).encode())
        raise
    d = Daemon(cp, a.socket or socket_path(a.pid))

    def on_term(signum: int, frame: object) -> None:
        d.done.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        d.serve(ready)
    finally:
        cp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
