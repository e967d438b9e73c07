"""Putting a stopped process's non-memory state back: fd table and offsets,
working directory, signal mask. All syscalls are injected with ``run`` on the
tracer thread; strings travel through a scratch page mapped in the process for
the duration of one call.
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

from . import _sys
from .errors import NoSuchProcess
from .procfs import FdPos, cwd as current_cwd, read_fd_positions, signal_mask

RunSyscall = Callable[..., int]
T = TypeVar("T")

AT_FDCWD = -100


def with_scratch(pid: int, run: RunSyscall, data: bytes, nr: int,
                 make_args: Callable[[int], tuple[int, ...]]) -> int:
    """Map a scratch page in pid, put data in it, run syscall nr with
    make_args(address), unmap the page. Returns the syscall's result."""
    size = _sys.PAGE_SIZE
    if len(data) > size:
        return -36  # ENAMETOOLONG
    addr = run(_sys.SYS_mmap, 0, size, _sys.PROT_READ | _sys.PROT_WRITE,
               _sys.MAP_PRIVATE | _sys.MAP_ANONYMOUS, -1, 0)
    if -4096 < addr < 0:
        return addr
    try:
        with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
            mem.seek(addr)
            mem.write(data)
        return run(nr, *make_args(addr))
    finally:
        run(_sys.SYS_munmap, addr, size)


def open_in(pid: int, run: RunSyscall, path: str, flags: int) -> int:
    """Injected openat(path, flags) in pid: the new fd, or -errno."""
    flags &= ~(os.O_CREAT | os.O_TRUNC | os.O_EXCL)  # reopen what exists, never create or truncate
    return with_scratch(pid, run, os.fsencode(path) + b"\0", _sys.SYS_openat, lambda a: (AT_FDCWD, a, flags, 0))


def reopen(pid: int, run: RunSyscall, f: FdPos) -> int:
    """Open f.path again in pid with f's flags, at fd number f.fd."""
    fd = open_in(pid, run, f.path, f.flags)
    if fd < 0:
        return fd
    if fd != f.fd:
        res = run(_sys.SYS_dup3, fd, f.fd, f.flags & os.O_CLOEXEC)
        run(_sys.SYS_close, fd)
        if res < 0:
            return res
    return f.fd


F_SETFD = 2
FD_CLOEXEC = 1
# The status flags of an open file that change what the program can do with
# it (/proc/PID/fdinfo shows them; O_LARGEFILE, which the kernel adds to
# every open on 64-bit, is left out).
OPEN_MODE_FLAGS = (os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_SYNC | os.O_DSYNC | os.O_NOATIME
                   | os.O_DIRECT | os.O_PATH)


def _opened_otherwise(cur: FdPos, want: FdPos) -> bool:
    """Is the regular file at this fd open with other status flags than the
    checkpoint's (the fd was closed and the file opened again: read-only
    where the checkpoint had it for appending, say)? Then it is reopened."""
    return cur.regular and want.regular and bool((cur.flags ^ want.flags) & OPEN_MODE_FLAGS)


def restore_fds(pid: int, run: RunSyscall, fds: list[FdPos], whole_table: bool, keep: int | None) -> list[str]:
    """Put regular files' offsets back (injected lseek). With ``whole_table``
    (slow path, in place) also reopen regular files that are missing, point
    elsewhere or are open with other status flags (:data:`OPEN_MODE_FLAGS`),
    set close-on-exec where only it differs, and close fds the checkpoint did
    not have (except ``keep``, the tracker's own fd). Returns warnings for
    what could not be restored."""
    warnings: list[str] = []
    have = {f.fd: f for f in read_fd_positions(pid)} if whole_table else {}
    for f in fds:
        if whole_table and f.fd != keep:
            cur = have.get(f.fd)
            if cur is None or cur.path != f.path or _opened_otherwise(cur, f):
                if not f.regular:
                    warnings.append(f"fd {f.fd} ({f.path}) is not a regular file and was not open in the "
                                    "process restored from: it cannot be reopened")
                    continue
                fd = reopen(pid, run, f)
                if fd < 0:
                    warnings.append(f"fd {f.fd}: reopening {f.path} failed: {os.strerror(-fd)}")
                    continue
            elif (cur.flags ^ f.flags) & os.O_CLOEXEC:  # a flag of the fd, not of the open file: no reopen
                res = run(_sys.SYS_fcntl, f.fd, F_SETFD, FD_CLOEXEC if f.flags & os.O_CLOEXEC else 0)
                if res < 0:
                    warnings.append(f"fd {f.fd}: setting close-on-exec failed: {os.strerror(-res)}")
        if f.regular:
            res = run(_sys.SYS_lseek, f.fd, f.pos, os.SEEK_SET)
            if res < 0:
                warnings.append(f"fd {f.fd}: lseek to {f.pos} failed: {os.strerror(-res)}")
    if whole_table:
        want = {f.fd for f in fds}
        for fd in have:
            if fd not in want and fd != keep:
                run(_sys.SYS_close, fd)
    return warnings


SIG_SETMASK = 2


def revalidate_files(pid: int, fds: list[FdPos]) -> None:
    """stat() every regular file the restored process has open, before it
    runs: after the caller switched its files (a DeltaFS rollback), the
    kernel may still hold a file's size from the discarded state, and an
    O_APPEND write would land there; a stat makes it fetch the attributes
    again (one request per file on FUSE, nothing elsewhere)."""
    for f in fds:
        if f.regular:
            try:
                os.stat(f"/proc/{pid}/fd/{f.fd}")
            except OSError:
                pass


def restore_cwd_and_mask(pid: int, run: RunSyscall, cwd: str, sigmask: int) -> list[str]:
    """Injected chdir(cwd) and rt_sigprocmask(SIG_SETMASK, sigmask), each
    only where /proc shows the process's differs: each costs three injected
    syscalls (a scratch page mapped and unmapped), 0.6 ms together here, and
    the process forked from an ancestor's template mostly has both already.
    (A cwd that /proc names by ``cwd`` is the directory ``chdir(cwd)`` would
    reach: a removed or moved one reads differently.)"""
    warnings: list[str] = []
    if cwd and _unless_unreadable(current_cwd, pid) != cwd:
        res = with_scratch(pid, run, os.fsencode(cwd) + b"\0", _sys.SYS_chdir, lambda a: (a,))
        if res < 0:
            warnings.append(f"chdir({cwd}) failed: {os.strerror(-res)}")
    if _unless_unreadable(signal_mask, pid) != sigmask:
        res = with_scratch(pid, run, sigmask.to_bytes(8, "little"), _sys.SYS_rt_sigprocmask,
                           lambda a: (SIG_SETMASK, a, 0, 8))
        if res < 0:
            warnings.append(f"rt_sigprocmask failed: {os.strerror(-res)}")
    return warnings


def _unless_unreadable(read: Callable[[int], T], pid: int) -> T | None:
    """What /proc shows, or None when it cannot be read (then the injected
    call is made anyway and reports the problem)."""
    try:
        return read(pid)
    except (NoSuchProcess, OSError, KeyError, ValueError):
        return None
