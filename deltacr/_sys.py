"""Every raw system call, ctypes structure and kernel constant deltacr uses.

The rest of the package calls the typed wrappers below and never touches ctypes
or errno itself. Each wrapper raises ``OSError(errno, strerror)`` on failure,
like the functions of the :mod:`os` module.

Some facts about the kernel interfaces used here (x86_64, Linux >= 6.7):

* ptrace: only the thread that attached may issue requests on a tracee. We use
  ``PTRACE_SEIZE`` (no SIGSTOP sent at attach) and ``PTRACE_INTERRUPT`` to stop.
  A seized tracee's auto-attached fork child starts in ``PTRACE_EVENT_STOP``.
* ``PTRACE_O_EXITKILL`` kills a tracee when the tracer exits: we set it on
  templates only, so that templates die with the daemon and the live process
  keeps running.
* userfaultfd write-protect in async mode + ``PAGEMAP_SCAN`` (see
  Documentation/admin-guide/mm/pagemap.rst) report the pages written since the
  previous scan and write-protect them again, atomically.
* soft-dirty (pagemap bit 55) needs ``CONFIG_MEM_SOFT_DIRTY``; writing ``4`` to
  ``clear_refs`` is accepted even when the bit never sets, so it must be probed
  by doing the real thing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from typing import Sequence

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# --- syscall numbers (x86_64) ---------------------------------------------------
SYS_read = 0
SYS_pread64 = 17
SYS_openat = 257
SYS_close = 3
SYS_lseek = 8
SYS_mmap = 9
SYS_mprotect = 10
SYS_munmap = 11
SYS_brk = 12
SYS_rt_sigprocmask = 14
SYS_mremap = 25
SYS_clone = 56
SYS_fork = 57
SYS_wait4 = 61
SYS_fcntl = 72
SYS_dup3 = 292
SYS_chdir = 80
SYS_restart_syscall = 219
SYS_userfaultfd = 323
SYS_pidfd_open = 434
SYS_pidfd_getfd = 438
SYS_process_madvise = 440

MADV_COLLAPSE = 25

CLONE_PTRACE = 0x2000

# --- errno values the kernel uses for syscall restart (never seen by userspace) --
ERESTARTSYS = 512
ERESTARTNOINTR = 513
ERESTARTNOHAND = 514
ERESTART_RESTARTBLOCK = 516

# --- ptrace ---------------------------------------------------------------------
PTRACE_PEEKDATA = 2
PTRACE_CONT = 7
PTRACE_KILL = 8
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208

PTRACE_O_TRACEFORK = 0x02
PTRACE_O_TRACEEXEC = 0x10
PTRACE_O_EXITKILL = 0x100000

PTRACE_EVENT_FORK = 1
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_STOP = 128

WALL = 0x40000000  # __WALL
WNOHANG = os.WNOHANG

# --- mmap -----------------------------------------------------------------------
PROT_READ = 1
PROT_WRITE = 2
PROT_EXEC = 4
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20

F_DUPFD_CLOEXEC = 1030
O_CLOEXEC = 0o2000000
O_NONBLOCK = 0o4000

# --- userfaultfd / pagemap scan ---------------------------------------------------
UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_REGISTER_MODE_WP = 1 << 1

PAGEMAP_SCAN = 0xC0606610
PM_SCAN_WP_MATCHING = 1
PM_SCAN_CHECK_WPASYNC = 2
PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_HUGE = 1 << 6  # mapped by one PMD (a transparent huge page)
PAGE_IS_SOFT_DIRTY = 1 << 7

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1


class Regs(ctypes.Structure):
    """``struct user_regs_struct`` of x86_64 (PTRACE_GETREGS / SETREGS)."""

    _fields_ = [
        (name, ctypes.c_ulonglong)
        for name in (
            "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax "
            "rip cs eflags rsp ss fs_base gs_base ds es fs gs"
        ).split()
    ]

    def copy(self) -> "Regs":
        new = Regs()
        ctypes.memmove(ctypes.byref(new), ctypes.byref(self), ctypes.sizeof(Regs))
        return new

    def to_bytes(self) -> bytes:
        return bytes(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Regs":
        if len(data) != ctypes.sizeof(cls):
            raise ValueError(f"register blob has {len(data)} bytes, expected {ctypes.sizeof(cls)}")
        return cls.from_buffer_copy(data)


def signed(value: int) -> int:
    """An unsigned 64-bit register value as a signed integer."""
    return value - (1 << 64) if value >= 1 << 63 else value


def unsigned(value: int) -> int:
    return value & 0xFFFFFFFFFFFFFFFF


def _err() -> OSError:
    e = ctypes.get_errno()
    return OSError(e, os.strerror(e))


_ptrace = _libc.ptrace
_ptrace.restype = ctypes.c_long
_ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]


def ptrace(request: int, pid: int, addr: int = 0, data: int | ctypes.c_void_p | None = 0) -> int:
    ctypes.set_errno(0)
    res = _ptrace(request, pid, ctypes.c_void_p(addr), data if isinstance(data, ctypes.c_void_p) else ctypes.c_void_p(data))
    if res == -1 and ctypes.get_errno() != 0:
        raise _err()
    return res


def ptrace_getregs(pid: int) -> Regs:
    regs = Regs()
    ptrace(PTRACE_GETREGS, pid, 0, ctypes.cast(ctypes.byref(regs), ctypes.c_void_p))
    return regs


def ptrace_setregs(pid: int, regs: Regs) -> None:
    ptrace(PTRACE_SETREGS, pid, 0, ctypes.cast(ctypes.byref(regs), ctypes.c_void_p))


PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
NT_X86_XSTATE = 0x202
XSTATE_MAX = 16384  # the XSAVE area: 576 bytes + AVX (256), AVX-512 (~2 KiB), AMX (8 KiB)


def ptrace_get_xstate(pid: int) -> bytes:
    """The tracee's x87/SSE/AVX state (the XSAVE area): not part of
    PTRACE_GETREGS, and live whenever the process was stopped mid-computation."""
    buf = ctypes.create_string_buffer(XSTATE_MAX)
    iov = _IoVec(ctypes.addressof(buf), XSTATE_MAX)
    ptrace(PTRACE_GETREGSET, pid, NT_X86_XSTATE, ctypes.cast(ctypes.byref(iov), ctypes.c_void_p))
    return buf.raw[:iov.iov_len]


def ptrace_set_xstate(pid: int, data: bytes) -> None:
    buf = ctypes.create_string_buffer(data, len(data))
    iov = _IoVec(ctypes.addressof(buf), len(data))
    ptrace(PTRACE_SETREGSET, pid, NT_X86_XSTATE, ctypes.cast(ctypes.byref(iov), ctypes.c_void_p))


def ptrace_geteventmsg(pid: int) -> int:
    msg = ctypes.c_ulong(0)
    ptrace(PTRACE_GETEVENTMSG, pid, 0, ctypes.cast(ctypes.byref(msg), ctypes.c_void_p))
    return msg.value


def waitpid(pid: int, options: int = 0) -> tuple[int, int]:
    """waitpid with __WALL (tracees may be clones); retries EINTR."""
    while True:
        try:
            return os.waitpid(pid, options | WALL)
        except InterruptedError:
            continue


_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _sys(nr: int, *args: int) -> int:
    res = _syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    if res == -1:
        raise _err()
    return res


def pidfd_open(pid: int) -> int:
    return _sys(SYS_pidfd_open, pid, 0)


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    return _sys(SYS_pidfd_getfd, pidfd, targetfd, 0)


def userfaultfd(flags: int) -> int:
    return _sys(SYS_userfaultfd, flags)


_ioctl = _libc.ioctl
_ioctl.restype = ctypes.c_int
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def ioctl_buf(fd: int, request: int, buf: ctypes.Array) -> int:  # type: ignore[type-arg]
    res = _ioctl(fd, request, ctypes.cast(buf, ctypes.c_void_p))
    if res == -1:
        raise _err()
    return res


def uffdio_api(uffd: int, features: int) -> int:
    """UFFDIO_API handshake; returns the features the kernel granted."""
    buf = (ctypes.c_uint64 * 3)(UFFD_API, features, 0)
    ioctl_buf(uffd, UFFDIO_API, buf)
    return int(buf[1])


def uffdio_register_wp(uffd: int, start: int, length: int) -> None:
    buf = (ctypes.c_uint64 * 4)(start, length, UFFDIO_REGISTER_MODE_WP, 0)
    ioctl_buf(uffd, UFFDIO_REGISTER, buf)


def pagemap_scan(
    pagemap_fd: int,
    start: int,
    end: int,
    *,
    flags: int,
    category_mask: int,
    category_anyof_mask: int = 0,
    return_mask: int,
    inverted: int = 0,
    max_regions: int = 4096,
) -> list[tuple[int, int, int]]:
    """PAGEMAP_SCAN over [start, end): list of (start, end, categories) regions.

    Loops until the kernel's ``walk_end`` reaches ``end`` (one call fills at most
    ``max_regions`` regions).
    """
    vec = _scan_vec(max_regions)
    out: list[tuple[int, int, int]] = []
    arg = (ctypes.c_uint64 * 12)()
    pos = start
    while pos < end:
        arg[:] = [96, flags, pos, end, 0, ctypes.addressof(vec), max_regions, 0,
                  0, category_mask, category_anyof_mask, return_mask]
        arg[7] = 0  # max_pages: no limit
        arg[8] = inverted  # category_inverted
        n = ioctl_buf(pagemap_fd, PAGEMAP_SCAN, arg)
        for i in range(n):
            out.append((int(vec[3 * i]), int(vec[3 * i + 1]), int(vec[3 * i + 2])))
        walk_end = int(arg[4])
        if walk_end <= pos:
            break
        pos = walk_end
    return out


_scan_vecs: dict[int, ctypes.Array] = {}  # type: ignore[type-arg]


def _scan_vec(n: int) -> ctypes.Array:  # type: ignore[type-arg]
    """A reusable page_region buffer per size and thread (allocating 96 KiB per call costs)."""
    import threading
    key = (threading.get_ident(), n)
    buf = _scan_vecs.get(key)  # type: ignore[call-overload]
    if buf is None:
        buf = _scan_vecs[key] = (ctypes.c_uint64 * (3 * n))()  # type: ignore[index]
    return buf


_prctl = _libc.prctl
_prctl.restype = ctypes.c_int
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def prctl(option: int, arg2: int = 0) -> None:
    if _prctl(option, arg2, 0, 0, 0) == -1:
        raise _err()


def set_child_subreaper() -> None:
    prctl(PR_SET_CHILD_SUBREAPER, 1)


PR_SET_TIMERSLACK = 29


def set_timer_slack(ns: int) -> None:
    """For the calling thread: how late the kernel may wake a sleep (default 50 us)."""
    prctl(PR_SET_TIMERSLACK, ns)


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_pvr = _libc.process_vm_readv
_pvr.restype = ctypes.c_ssize_t
_pvr.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]


def process_vm_readv(pid: int, addr: int, buf: bytearray | memoryview) -> int:
    """Read len(buf) bytes at addr of pid into buf; returns bytes read."""
    n = len(buf)
    cbuf = (ctypes.c_char * n).from_buffer(buf)
    local = _IoVec(ctypes.addressof(cbuf), n)
    remote = _IoVec(addr, n)
    res = _pvr(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    del cbuf
    if res == -1:
        raise _err()
    return res


_pvw = _libc.process_vm_writev
_pvw.restype = ctypes.c_ssize_t
_pvw.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]

IOV_MAX = 1024


def process_vm_gather(pid: int, segments: list[tuple[int, int]], buf: bytearray, write: bool = False) -> int:
    """Read (or write) pid's memory segments [(addr, len), ...] into (from) buf,
    packed back to back, in as few process_vm_readv/writev calls as possible.
    Returns bytes transferred (may stop short at an unmapped or, for writes,
    read-only page: the caller falls back to /proc/PID/mem)."""
    total = sum(n for _, n in segments)
    if total > len(buf):
        raise ValueError("buffer too small")
    base = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    done = 0
    fn = _pvw if write else _pvr
    for i in range(0, len(segments), IOV_MAX):
        part = segments[i:i + IOV_MAX]
        n = sum(k for _, k in part)
        local = _IoVec(base + done, n)
        remote = (_IoVec * len(part))(*[_IoVec(a, k) for a, k in part])
        res = fn(pid, ctypes.byref(local), 1, remote, len(part), 0)
        if res == -1:
            raise _err()
        done += res
        if res != n:
            break
    return done


def process_madvise(pidfd: int, addr: int, length: int, advice: int) -> int:
    """madvise() on another process's memory (one range); returns bytes advised."""
    iov = _IoVec(addr, length)
    return _sys(SYS_process_madvise, pidfd, ctypes.addressof(iov), 1, advice, 0)


def pack_u64s(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}Q", *values)


def sigset_to_int(values: Sequence[int]) -> int:
    mask = 0
    for s in values:
        mask |= 1 << (s - 1)
    return mask
