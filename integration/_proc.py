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
from dataclasses import dataclass


@dataclass(frozen=True)
class Stat:
    pid: int
    state: str  # R, S, D, T, t, Z, ...
    ppid: int
    session: int
    start: int  # clock ticks since boot


def stat(pid: int) -> Stat | None:
    """The process's stat line, None if it does not exist (or is being reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):  # ESRCH while it is being reaped
        return None
    rest = data[data.rindex(")") + 2:].split()
    return Stat(pid, rest[0], int(rest[1]), int(rest[3]), int(rest[19]))


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def all_stats() -> list[Stat]:
    """Every process (one pass over /proc)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = stat(int(name))
            if st is not None:
                out.append(st)
    return out


def identity(pid: int | None) -> list[int] | None:
    """[pid, start time] to record for ``is_same``, None if it is gone."""
    st = stat(pid) if pid else None
    return [st.pid, st.start] if st is not None else None


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
    return st is not None and st.start == start and st.state != "Z"
