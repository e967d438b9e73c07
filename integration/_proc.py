"""What the sandbox reads from /proc, in one place.

Facts this relies on (proc(5)):

- ``/proc/PID/stat``: after the command name in parentheses (which may
  itself hold spaces and parentheses, so split after the *last* ')') come
  state, ppid, pgrp, session, ...; ``starttime`` is field 22, in clock ticks
  since boot. A pid is reused, but never by two processes with the same
  start time in one boot: (boot id, pid, start time) names one process.
- ``/proc/sys/kernel/random/boot_id`` changes at every boot; start times
  restart with it, so a record from another boot names no process.
- A session keeps its id (the pid of the process that called setsid) while
  any member lives, even after the leader is gone: the kernel does not hand
  that pid out again until then. Zombies still show their session.
"""

from __future__ import annotations

import os

from deltacr.errors import NoSuchProcess
# the same facts DeltaCR reads, None or 0 where the process is gone
from deltacr.procfs import ProcStat as Stat
from deltacr.procfs import children_of as children
from deltacr.procfs import read_stat, tracer_pid
from deltacr.procfs import thread_count as _thread_count


def stat(pid: int) -> Stat | None:
    """The process's stat line, None if it does not exist (or is being reaped)."""
    try:
        return read_stat(pid)
    except NoSuchProcess:
        return None


def tracer(pid: int) -> int:
    """The thread tracing ``pid`` (0: none, or gone)."""
    try:
        return tracer_pid(pid)
    except NoSuchProcess:
        return 0


def thread_count(pid: int) -> int:
    """Threads of ``pid`` (0 if it is gone)."""
    try:
        return _thread_count(pid)
    except NoSuchProcess:
        return 0


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def identity(pid: int | None) -> list[int] | None:
    """[pid, start time] to record for ``is_same``, None if it is gone."""
    st = stat(pid) if pid else None
    return [st.pid, st.starttime] if st is not None else None


def is_same(rec: object, boot: str, now_boot: str) -> bool:
    """Does ``rec`` (from ``identity``, written in boot ``boot``) still name a
    live process? Anything malformed or from another boot names none."""
    if boot != now_boot or not isinstance(rec, list) or len(rec) != 2:
        return False
    try:
        pid, start = int(rec[0]), int(rec[1])
    except (TypeError, ValueError):
        return False
    st = stat(pid)
    return st is not None and st.starttime == start and st.state != "Z"


def session_members(sessions: set[int]) -> list[Stat]:
    """Every live process (not a zombie) in one of ``sessions``."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = stat(int(name))
            if st is not None and st.session in sessions and st.state != "Z":
                out.append(st)
    return out


def cwd_under(pid: int, root: str) -> bool:
    """Is the working directory of ``pid`` ``root`` or below it?"""
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return cwd == root or cwd.startswith(root.rstrip("/") + "/")


def send_signal(pid: int, sig: int) -> None:
    """kill(), for a process that may be gone already."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def untraced_descendants(roots: list[int], sessions: set[int], exclude: set[int] = frozenset(),  # type: ignore[assignment]
                         known: set[int] | None = None) -> list[Stat]:
    """Every process below ``roots`` (children, their children, ...) that
    belongs to one of ``sessions``, is not a zombie, not in ``exclude`` and
    not traced by this process -- in a sandbox: what its processes started,
    as opposed to its processes themselves and DeltaCR's templates and
    spares, which this process traces (forks of a traced process made with
    CLONE_PTRACE are traced from birth, so no race with a fork under way). Parents come before their children.

    ``known`` caches the pids found to be traced by us (updated in place):
    a sandbox has up to hundreds of templates among its processes' and our
    own children, and one /proc read fewer each keeps this off a rollback's
    critical path. A cached pid that died and was reused within one call to
    the next would be missed (left running), never wrongly killed."""
    mine = _our_threads()
    known = set() if known is None else known
    out: list[Stat] = []
    seen: set[int] = set(roots)
    todo = list(roots)
    while todo:
        for c in children(todo.pop(0)):
            if c in seen:
                continue
            seen.add(c)
            if c in known or c in exclude:
                continue
            st = stat(c)
            if st is None or st.session not in sessions or st.state == "Z":
                continue
            if _traced_by_us(c, mine, known):
                continue
            out.append(st)
            todo.append(c)
    known &= seen
    return out


def untraced_members(members: set[int], exclude: set[int] = frozenset(),  # type: ignore[assignment]
                     known: set[int] | None = None) -> list[Stat]:
    """``untraced_descendants`` for a sandbox whose processes are in a
    cgroup of their own (``_cgroup``): its ``members`` but those in
    ``exclude``, the zombies and the ones this process traces. ``known``
    as there (a cached pid no longer listed is dropped at the next call;
    one reused in between by a new member is missed, as there)."""
    mine = _our_threads()
    known = set() if known is None else known
    known &= members
    out: list[Stat] = []
    for pid in sorted(members - exclude - known):
        st = stat(pid)
        if st is None or st.state == "Z" or _traced_by_us(pid, mine, known):
            continue
        out.append(st)
    return out


def _our_threads() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def _traced_by_us(pid: int, mine: set[int], known: set[int]) -> bool:
    """By one of our threads (TracerPid is the tracer thread's id); not the
    state: a template just forked runs until its first stop. Noted in
    ``known``: DeltaCR's templates, spares and processes being restored stay
    so for life."""
    if tracer(pid) in mine:
        known.add(pid)
        return True
    return False
