"""Reading a process's state from /proc: status, memory layout, fd offsets."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from .errors import NoSuchProcess

SPECIAL_VMAS = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]")


@dataclass(frozen=True)
class Vma:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str  # e.g. "rw-p"
    offset: int
    path: str
    dev: int = 0  # os.makedev(major, minor) of the mapped file; 0 for anonymous memory
    inode: int = 0

    @property
    def prot(self) -> int:
        return (1 if self.perms[0] == "r" else 0) | (2 if self.perms[1] == "w" else 0) | (
            4 if self.perms[2] == "x" else 0)

    @property
    def private(self) -> bool:
        return self.perms[3] == "p"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def special(self) -> bool:
        return self.path in SPECIAL_VMAS

    @property
    def anonymous(self) -> bool:
        return self.path == "" or self.path.startswith("[")

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ProcStat:
    pid: int
    state: str
    ppid: int
    pgrp: int
    starttime: int
    flags: int
    session: int = 0


@dataclass(frozen=True)
class FdPos:
    """An open fd: what it points to and, for regular files, the offset of its
    open file description (shared with templates, so recorded at checkpoint)."""

    fd: int
    pos: int
    flags: int
    path: str
    regular: bool = False


PF_KTHREAD = 0x00200000


def read_small(path: str) -> bytes:
    """A small /proc file in one read, without Python's file objects (a
    rollback reads a few dozen of them on its critical path). Raises
    FileNotFoundError or ProcessLookupError when the process is gone."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 65536)
    finally:
        os.close(fd)


def read_stat(pid: int) -> ProcStat:
    try:
        data = read_small(f"/proc/{pid}/stat").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):  # ESRCH while it is being reaped
        raise NoSuchProcess(f"pid {pid} does not exist: check the pid (ps -p {pid})") from None
    rest = data[data.rindex(")") + 2:].split()
    return ProcStat(pid=pid, state=rest[0], ppid=int(rest[1]), pgrp=int(rest[2]),
                    flags=int(rest[6]), starttime=int(rest[19]), session=int(rest[3]))


def read_status(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(f"pid {pid} does not exist: check the pid (ps -p {pid})") from None
    out = {}
    for line in lines:
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def thread_count(pid: int) -> int:
    try:
        # procfs counts a process's threads in the link count of its task
        # directory (2 + threads): one stat, where a listing costs ten times more
        n = os.stat(f"/proc/{pid}/task").st_nlink - 2
        return n if n >= 1 else len(os.listdir(f"/proc/{pid}/task"))
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(f"pid {pid} does not exist") from None


def tracer_pid(pid: int) -> int:
    """The thread tracing ``pid`` (0: none). One read: a rollback asks for
    it on its critical path."""
    try:
        data = read_small(f"/proc/{pid}/status")
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(f"pid {pid} does not exist") from None
    i = data.find(b"\nTracerPid:")
    return int(data[i + 11:data.index(b"\n", i + 1)]) if i >= 0 else 0


# A deltacr daemon runs as `python -c "...deltacr.daemon..." --pid SESSION ...`
# (client.attach starts it so); SESSION is the pid given to attach, the
# session's name for its whole life, whatever the live pid is after rollbacks.
DAEMON_MARK = "deltacr.daemon"


def deltacr_session(pid: int) -> tuple[int, int] | None:
    """If pid is traced by a deltacr daemon: (the session's pid, the daemon's
    pid). None when it is not traced, or by something else."""
    try:
        tracer = tracer_pid(pid)  # the tracing thread's id
        if not tracer:
            return None
        daemon = int(read_status(tracer).get("Tgid", tracer))
        with open(f"/proc/{daemon}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
        if not any(DAEMON_MARK in a for a in argv):
            return None
        return int(argv[argv.index("--pid") + 1]), daemon
    except (NoSuchProcess, OSError, ValueError, IndexError):  # gone meanwhile, or not our command line
        return None


def signal_mask(pid: int) -> int:
    return int(read_status(pid)["SigBlk"], 16)


def signal_pending(pid: int) -> bool:
    """Is a signal pending for pid, its own or its thread group's? True too
    when that cannot be read (the caller then treats pid as unusable)."""
    try:
        st = read_status(pid)
        return any(int(st.get(k, "1"), 16) for k in ("SigPnd", "ShdPnd"))
    except (NoSuchProcess, OSError, ValueError):
        return True


def read_maps(pid: int) -> list[Vma]:
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(f"pid {pid} does not exist") from None
    vmas = []
    for line in data.decode(errors="surrogateescape").splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        lo, _, hi = parts[0].partition("-")
        major, _, minor = parts[3].partition(":")
        vmas.append(Vma(int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16),
                        parts[5] if len(parts) > 5 else "", os.makedev(int(major, 16), int(minor, 16)),
                        int(parts[4])))
    return vmas


def read_fd_positions(pid: int) -> list[FdPos]:
    """Every open fd of pid; offsets and flags for regular files.

    On the critical path: pipes, sockets and anon inodes are recognised by
    their link text alone; only paths are stat()ed.
    """
    out = []
    base = f"/proc/{pid}/fd/"
    try:
        names = os.listdir(base)
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(f"pid {pid} does not exist") from None
    for name in names:
        fd = int(name)
        try:
            path = os.readlink(base + name)
            regular = path[:1] == "/" and not path.startswith("/dev/") and _is_regular(base + name)
            if not regular:
                out.append(FdPos(fd, 0, 0, path, False))
                continue
            pos, flags = _fdinfo(pid, name)
        except (FileNotFoundError, ProcessLookupError):
            continue
        out.append(FdPos(fd, pos, flags, path, True))
    out.sort(key=lambda p: p.fd)
    return out


def _fdinfo(pid: int, fd: str) -> tuple[int, int]:
    """(offset, open flags) of an fd, from "pos:\t<n>\nflags:\t0<octal>\n..."."""
    lines = read_small(f"/proc/{pid}/fdinfo/{fd}").split(b"\n", 2)
    return int(lines[0].split()[1]), int(lines[1].split()[1], 8)


def _is_regular(fd_link: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(fd_link).st_mode)
    except (FileNotFoundError, ProcessLookupError):
        raise
    except OSError:
        # The file's own filesystem cannot answer: a DeltaFS that has just
        # switched to a state without this file says ESTALE. A path-named
        # fd is a file almost always; if not, its lseek fails with a warning.
        return True


def fd_offsets(pid: int) -> dict[int, int]:
    """The offset of every open fd of ``pid`` (0 for pipes and sockets),
    from /proc alone: no stat of the files, which may sit on a filesystem
    that is busy switching (a sandbox's rollback reads them meanwhile)."""
    out: dict[int, int] = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(f"pid {pid} does not exist") from None
    for name in names:
        try:
            out[int(name)] = _fdinfo(pid, name)[0]
        except OSError:
            continue  # closed meanwhile
    return out


def start_brk(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read().decode(errors="replace")
    return int(data[data.rindex(")") + 2:].split()[44])


def cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(f"pid {pid} does not exist") from None


def nofile_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return 1 << 20 if soft == "unlimited" else int(soft)
    return 1024


def descendants(pid: int) -> set[int]:
    """Every live descendant of pid (one pass over /proc)."""
    kids: dict[int, list[int]] = {}
    for st in _all_stats():
        kids.setdefault(st.ppid, []).append(st.pid)
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def children_of(pid: int) -> list[int]:
    """The children of every thread of ``pid`` (CONFIG_PROC_CHILDREN; a scan
    of /proc where the kernel lacks it)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return []
    out: list[int] = []
    for tid in tids:
        try:
            out += [int(c) for c in read_small(f"/proc/{pid}/task/{tid}/children").split()]
        except FileNotFoundError:
            if os.path.exists(f"/proc/{pid}/task/{tid}"):
                return [st.pid for st in _all_stats() if st.ppid == pid]
        except ProcessLookupError:
            pass
    return out


def _all_stats() -> list[ProcStat]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                out.append(read_stat(int(name)))
            except (NoSuchProcess, ValueError, IndexError, OSError):
                pass
    return out


def zombie_children(pid: int) -> list[int]:
    """Zombie children of pid (scans /proc: CONFIG_PROC_CHILDREN may be off)."""
    return [st.pid for st in _all_stats() if st.ppid == pid and st.state == "Z"]
