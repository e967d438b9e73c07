"""The ``deltabox`` command line: named sandboxes hosted by a background daemon."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from . import _cgroup, _proc, errors
from .daemon import workdir_of
from .sandbox import check_name
from .errors import DeltaBoxError, NameInUse, NotAnswering, SandboxStopped

USAGE = """\
deltabox run [--base DIR] [--name NAME] -- CMD...
deltabox checkpoint NAME [--label TEXT]
deltabox rollback NAME ID
deltabox list NAME [--json]
deltabox diff NAME A [B]
deltabox drop NAME ID
deltabox stop NAME
deltabox demo [--branches N] [--depth N]"""


# How long a request that should be instant (status, stop) waits for the
# daemon: a stopped (SIGSTOP) or hung daemon still accepts connections (the
# kernel queues them), then never answers.
ANSWER_S = 5.0


def _read_record(name: str) -> dict[str, Any] | None:
    """The daemon's ``sandbox.json``: None if there is none (or it cannot be
    parsed), {} if it holds no object."""
    try:
        with open(os.path.join(workdir_of(name), "sandbox.json")) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else {}


def _not_running(name: str) -> SandboxStopped:
    if os.path.exists(os.path.join(workdir_of(name), "sandbox.json")):
        # its record stays when the daemon was killed: so may its processes and mount
        return SandboxStopped(f"the daemon of sandbox {name!r} is gone (killed or crashed); what it "
                              f"left (processes, the mount) may still run: 'deltabox stop {name}' ends "
                              f"it, then 'deltabox run --base DIR --name {name} -- CMD' starts afresh")
    return SandboxStopped(f"no running sandbox named {name!r}: start one with "
                          f"'deltabox run --base DIR --name {name} -- CMD'")


def _daemon_stopped(name: str) -> str | None:
    """Why the daemon cannot answer, if it is stopped (SIGSTOP) or gone;
    None while it runs (a long operation, a slow-path rollback)."""
    rec = _read_record(name)
    if not rec:
        return None
    ident = rec.get("daemon")
    if not _proc.is_same(ident, rec.get("boot", ""), _proc.boot_id()):
        return "is gone"
    st = _proc.stat(int(ident[0]))  # type: ignore[index]  # is_same checked its shape
    return "is stopped (SIGSTOP, ^Z)" if st is not None and st.state in "tT" else None


def _call(sandbox: str, op: str, timeout: float | None = None, **args: Any) -> Any:
    """One request; ``timeout`` None waits as long as the daemon works on it,
    but not for a daemon that is stopped or gone (checked every second)."""
    name = sandbox
    path = os.path.join(workdir_of(name), "control.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout if timeout is not None else 1.0)
    try:
        s.connect(path)
    except TimeoutError:
        s.close()
        raise NotAnswering(f"the daemon of sandbox {name!r} did not take the connection within "
                           f"{timeout or 1.0:g} s (stopped or hung): 'deltabox stop {name}' ends it") from None
    except OSError:
        s.close()
        raise _not_running(name) from None
    with s:
        buf = b""
        s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        while not buf.endswith(b"\n"):
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                why = (f"did not answer within {timeout:g} s (stopped or hung)" if timeout is not None
                       else _daemon_stopped(name))
                if why is None:
                    continue
                raise NotAnswering(f"the daemon of sandbox {name!r} {why}: 'deltabox stop {name}' "
                                   "ends it") from None
            if not chunk:
                raise SandboxStopped(f"the daemon of sandbox {name!r} hung up")
            buf += chunk
    res = json.loads(buf)
    if not res["ok"]:
        cls = getattr(errors, res.get("kind", ""), DeltaBoxError)
        raise cls(res["error"])
    return res["result"]


def _running(name: str) -> bool:
    try:
        _call(name, "status", timeout=ANSWER_S)
        return True
    except SandboxStopped:
        return False


@contextlib.contextmanager
def _creating(name: str, timeout: float = 120.0) -> Iterator[None]:
    """Hold the name's lock (``create.lock`` in its directory, which stays
    as the stores do) while a run looks for the sandbox and creates it."""
    os.makedirs(workdir_of(name), exist_ok=True)
    fd = os.open(os.path.join(workdir_of(name), "create.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise NotAnswering(f"another 'deltabox run' has been creating sandbox {name!r} for "
                                       f"{timeout:g} s; try again once it is done") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)


def _start(name: str, base: str) -> None:
    workdir = workdir_of(name)
    rec = os.path.join(workdir, "sandbox.json")
    if os.path.exists(rec):
        # A daemon that died left its record: clean up after it first.
        _stop_dead(name)
    for leftover in ("root", "store", "procs"):
        shutil.rmtree(os.path.join(workdir, leftover), ignore_errors=True)
    os.makedirs(workdir, exist_ok=True)
    r, w = os.pipe()
    with open(os.path.join(workdir, "daemon.log"), "ab") as log:
        subprocess.Popen([sys.executable, "-m", "deltabox.daemon", name, "--base",
                          os.path.abspath(base), "--ready-fd", str(w)], pass_fds=(w,),
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.readline().decode().strip()
    if msg != "ok":
        raise DeltaBoxError(msg or f"the sandbox daemon failed; see {workdir}/daemon.log")


def _stop_dead(name: str) -> None:
    """Clean up after a daemon that is gone: end its processes, unmount.

    The record may be old (written before a reboot, or long ago): a pid in
    it is killed only if it still names the same process, same boot and
    same start time (see ``_proc``); a record without those names none."""
    workdir = workdir_of(name)
    rec = _read_record(name)
    if rec is None:
        return
    now = _proc.boot_id()
    procs = rec.get("procs")
    made = rec.get("sessions")
    made = {s for s in made if isinstance(s, int)} if isinstance(made, list) else set()
    held: set[int] = set()
    for ident in [rec.get("daemon"), *(procs.values() if isinstance(procs, dict) else ())]:
        if _proc.is_same(ident, rec.get("boot", ""), now):
            st = _proc.stat(int(ident[0]))  # type: ignore[index]
            if st is not None and st.session in made:
                held.add(st.session)
            _proc.send_signal(int(ident[0]), signal.SIGKILL)  # type: ignore[index]
    # the mount point is where this name's sandbox mounts, whatever the record says
    root = os.path.join(workdir, "root")
    if rec.get("boot") == now:
        cg = rec.get("cgroup")
        if _cgroup.is_ours(cg):
            _cgroup.Group(cg).remove()  # everything started in the sandbox, setsid or not
        _end_sessions(held, made - held, root)
    import deltafs

    try:
        deltafs.Mount(root).unmount(lazy=True)
    except deltafs.DeltaFSError:
        deltafs.force_unmount(root)
    for f in ("sandbox.json", "control.sock"):
        try:
            os.unlink(os.path.join(workdir, f))
        except FileNotFoundError:
            pass


def _end_sessions(held: set[int], unheld: set[int], root: str) -> None:
    """SIGKILL what the sandbox's processes started after its daemon died:
    the other members of their sessions (each process was spawned in its
    own; commands, background jobs and orphans stay in it unless they call
    setsid). ``held``: sessions the record lists and a process it names
    still holds (same boot, same start time) -- the kernel hands a
    session's id to no one else while any member lives, so every member is
    the sandbox's. ``unheld``: listed sessions whose named process is gone
    (a REPL ends when the daemon's end closes its stdin); the id could in
    principle have been reused since, so there only members working under
    the sandbox's root go. Never the caller's own session (a stop typed in
    the sandbox's shell). Rounds, as a member may fork while we kill."""
    me, mine = os.getpid(), os.getsid(0)
    for _round in range(20):
        left = [st.pid for st in _proc.session_members((held | unheld) - {mine})
                if st.pid != me and (st.session in held or _proc.cwd_under(st.pid, root))]
        if not left:
            return
        for pid in left:
            _proc.send_signal(pid, signal.SIGKILL)
        time.sleep(0.01)


def _stop(name: str) -> None:
    """Stop the sandbox: through its daemon, or after it if it is gone."""
    workdir = workdir_of(name)
    try:
        running = _running(name)
        if running:
            _call(name, "stop", timeout=ANSWER_S)
    except NotAnswering:
        # As after a daemon that died: stopping ends the sandbox, so what
        # only the daemon holds (the state tree, the templates) goes anyway.
        _stop_dead(name)
        print(f"deltabox: the daemon of sandbox {name!r} did not answer within {ANSWER_S:g} s (stopped or "
              "hung): killed it and the processes its record still names, and unmounted the sandbox",
              file=sys.stderr)
        return
    if running:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and os.path.exists(os.path.join(workdir, "sandbox.json")):
            time.sleep(0.02)
    elif os.path.exists(os.path.join(workdir, "sandbox.json")):
        _stop_dead(name)
    else:
        raise SandboxStopped(f"no sandbox named {name!r} is running")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="deltabox", usage=USAGE)
    sub = p.add_subparsers(dest="cmd", required=True, prog="deltabox")  # not USAGE as a prefix
    r = sub.add_parser("run")
    r.add_argument("--base")
    r.add_argument("--name", default="default")
    r.add_argument("--proc", help="name of the process in the sandbox")
    r.add_argument("argv", nargs=argparse.REMAINDER)
    c = sub.add_parser("checkpoint")
    c.add_argument("name")
    c.add_argument("--label", default="")
    rb = sub.add_parser("rollback")
    rb.add_argument("name")
    rb.add_argument("id", type=int)
    ls = sub.add_parser("list")
    ls.add_argument("name")
    ls.add_argument("--json", action="store_true")
    d = sub.add_parser("diff")
    d.add_argument("name")
    d.add_argument("a", type=int)
    d.add_argument("b", type=int, nargs="?")
    dr = sub.add_parser("drop")
    dr.add_argument("name")
    dr.add_argument("id", type=int)
    s = sub.add_parser("stop")
    s.add_argument("name")
    dm = sub.add_parser("demo")
    dm.add_argument("--branches", type=int, default=3)
    dm.add_argument("--depth", type=int, default=4)
    a = p.parse_args(argv)
    try:
        return _run(a)
    except DeltaBoxError as e:
        print(f"deltabox: {e}", file=sys.stderr)
        return 1


def _run(a: argparse.Namespace) -> int:
    if a.cmd == "run":
        cmd = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
        if not cmd:
            raise DeltaBoxError("nothing to run: deltabox run [--base DIR] [--name NAME] -- CMD...")
        check_name(a.name)  # before anything is created
        if a.proc is not None:
            check_name(a.proc, "process")
        created = False
        # two runs creating the same name at once: one wins, one is told
        with _creating(a.name) if a.base else contextlib.nullcontext():
            if not _running(a.name):
                if not a.base:
                    if os.path.exists(os.path.join(workdir_of(a.name), "sandbox.json")):
                        raise _not_running(a.name)
                    raise DeltaBoxError(f"sandbox {a.name!r} does not exist: give --base DIR to create it")
                _start(a.name, a.base)
                created = True
            elif a.base:
                raise NameInUse(f"a sandbox named {a.name!r} is already running; run without --base to "
                                "start another process in it, or pick another --name")
        try:
            res = _call(a.name, "spawn", argv=cmd, proc=a.proc)
        except BaseException as e:
            if not created:
                raise  # the sandbox and its other processes go on
            # a sandbox with no process in it, which a retry would find "already running"
            _stop(a.name)
            if isinstance(e, DeltaBoxError):
                raise type(e)(f"{e} (the sandbox {a.name!r} this run created was stopped again)") from e
            raise
        print(f"sandbox {a.name}: {res['name']} pid {res['pid']} in {res['root']} (output: {res['log']})")
    elif a.cmd == "checkpoint":
        print(_call(a.name, "checkpoint", label=a.label)["id"])
    elif a.cmd == "rollback":
        res = _call(a.name, "rollback", id=a.id)
        for n, pid in sorted(res["pids"].items()):
            print(f"{n} {pid if pid else 'ended'}")
    elif a.cmd == "list":
        states = _call(a.name, "list")
        if a.json:
            print(json.dumps(states, indent=1))
        else:
            print(f"{'ID':>5} {'PARENT':>6}  {'CREATED':19}  {'PROCESSES':24} LABEL")
            for st in states:
                when = datetime.datetime.fromtimestamp(st["created"]).strftime("%Y-%m-%d %H:%M:%S")
                procs = ",".join(sorted(st["processes"])) or "-"
                mark = "  <- current" if st["current"] else ""
                print(f"{st['id']:>5} {st['parent'] or '-':>6}  {when}  {procs:24} {st['label']}{mark}")
    elif a.cmd == "diff":
        df = _call(a.name, "diff", a=a.a, b=a.b)
        for tag, key in (("A", "added"), ("M", "modified"), ("D", "deleted")):
            for path in df[key]:
                print(f"{tag} {path}")
    elif a.cmd == "drop":
        _call(a.name, "drop", id=a.id)
    elif a.cmd == "stop":
        _stop(a.name)
    elif a.cmd == "demo":
        from .demo import run

        return run(a.branches, a.depth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
