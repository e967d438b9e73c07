"""Client of the deltacr daemon: the same operations as ProcessCheckpointer,
over the daemon's unix socket. Used by the CLI."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

from . import errors
from .daemon import run_dir, socket_path
from .errors import AlreadyTraced, DaemonError, DeltaCRError, NotAttached, NotPermitted
from .procfs import deltacr_session
from .session import CheckpointInfo
from .tracer import CheckpointResult, RollbackResult, already_in_session, refuse_untraceable


class Client:
    """Talk to the daemon that traces session ``pid`` (the pid given to attach)."""

    def __init__(self, pid: int, timeout: float = 120.0) -> None:
        self.pid = pid
        self.path = socket_path(pid)
        self.timeout = timeout

    def _call(self, op: str, **args: Any) -> Any:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            try:
                s.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError):
                raise NotAttached(self._not_attached()) from None
            except PermissionError:
                raise NotPermitted(f"pid {self.pid}: the deltacr daemon's socket {self.path} is not open to this "
                                   "user: run as root, or as the user who attached") from None
            s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                try:
                    chunk = s.recv(65536)
                except ConnectionError:
                    chunk = b""
                if not chunk:
                    raise DaemonError(f"pid {self.pid}: the daemon closed the connection during {op!r}; "
                                      f"check `deltacr status {self.pid}`")
                buf += chunk
        finally:
            s.close()
        reply = json.loads(buf)
        if reply["ok"]:
            return reply["result"]
        cls = getattr(errors, reply.get("type", ""), DeltaCRError)
        if not (isinstance(cls, type) and issubclass(cls, DeltaCRError)):
            cls = DeltaCRError
        raise cls(reply["error"])

    def _not_attached(self) -> str:
        session = deltacr_session(self.pid)
        if session is not None and session[0] != self.pid:  # named by its live pid
            return already_in_session(self.pid, *session)
        return (f"pid {self.pid}: no deltacr daemon is tracing it (no {self.path}); "
                f"run `deltacr attach {self.pid}` first")

    def ping(self) -> dict[str, Any]:
        return self._call("ping")  # type: ignore[no-any-return]

    def checkpoint(self, label: str = "") -> CheckpointResult:
        return CheckpointResult(**self._call("checkpoint", label=label))

    def stop(self) -> float:
        return float(self._call("stop"))

    def capture(self, label: str = "") -> int:
        return int(self._call("capture", label=label))

    def resume(self) -> float:
        return float(self._call("resume"))

    def rollback(self, cid: int, in_place: bool = False) -> RollbackResult:
        return RollbackResult(**self._call("rollback", id=int(cid), in_place=in_place))

    def list(self) -> list[CheckpointInfo]:
        return [CheckpointInfo(**d) for d in self._call("list")]

    def status(self) -> dict[str, Any]:
        return self._call("status")  # type: ignore[no-any-return]

    def wait_background(self, timeout: float | None = None) -> None:
        self._call("wait_background", timeout=timeout)

    def evict(self, cid: int) -> bool:
        return bool(self._call("evict", id=int(cid)))

    def detach(self) -> None:
        self._call("detach")


def attach(pid: int, store: str | None = None, max_templates: int = 8, backend: str = "auto",
           timeout: float = 30.0, spares: bool = True, hugepages: bool = True) -> Client:
    """Start a daemon tracing pid; returns once it is attached (or raises why not)."""
    client = Client(pid)
    try:
        info = client.ping()
        raise AlreadyTraced(f"pid {pid} is already attached by deltacr daemon {info['daemon_pid']}; "
                            f"use it, or `deltacr detach {pid}` first")
    except (NotAttached, DaemonError, NotPermitted):  # no session this user can see: the checks below say more
        pass
    refuse_untraceable(pid)  # fail fast, before a daemon starts
    r, w = os.pipe()
    cmd = [sys.executable, "-c", "import sys; from deltacr.daemon import main; sys.exit(main())", "--pid", str(pid), "--max-templates", str(max_templates),
           "--backend", backend, "--ready-fd", str(w)]
    if store:
        cmd += ["--store", store]
    if not spares:
        cmd.append("--no-spares")
    if not hugepages:
        cmd.append("--no-hugepages")
    log_dir = run_dir()
    log_path = os.path.join(log_dir, f"{pid}.log")
    try:
        os.makedirs(log_dir, exist_ok=True)
        log = open(log_path, "ab")
    except OSError as e:  # the daemon's socket goes there too
        raise DaemonError(f"pid {pid}: cannot write the daemon's log {log_path} ({e.strerror}); run as root, "
                          "or set DELTACR_RUN_DIR to a directory this user can write") from None
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        _spawn_detached(cmd, env, log.fileno(), w)
    finally:
        os.close(w)
        log.close()
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
    if not data:
        raise DaemonError(f"pid {pid}: the deltacr daemon exited without attaching; see {log_path}")
    reply = json.loads(data)
    if not reply["ok"]:
        cls = getattr(errors, reply.get("type", ""), DeltaCRError)
        raise cls(reply["error"])
    return client


def _spawn_detached(cmd: list[str], env: dict[str, str], log_fd: int, keep_fd: int) -> None:
    """Double fork: the daemon is not our child (nobody here will wait for it);
    it is reparented to the nearest subreaper or init, in a session of its own."""
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.setsid()
            if os.fork() == 0:
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(log_fd, 1)
                os.dup2(log_fd, 2)
                os.set_inheritable(keep_fd, True)
                os.closerange(3, keep_fd)
                os.closerange(keep_fd + 1, 65536)
                os.execve(cmd[0], cmd, env)
        finally:
            os._exit(0)
    os.waitpid(child, 0)
