"""Syscall injection into a stopped tracee ("swap, run, restore").

All functions here make ptrace calls: call them only from the thread that
attached to the tracee.

How an injection works: the tracee is in a ptrace-stop. We take a copy of the
registers we will restore later, point ``rip`` at a ``syscall`` instruction
(bytes ``0f 05``; we find one in the vDSO, which every process has and which a
fork keeps at the same address), put the syscall number and arguments in
``rax, rdi, rsi, rdx, r10, r8, r9``, set ``orig_rax = -1`` so the kernel does
not apply its own syscall-restart logic to our registers, and single-step:
the tracee executes exactly the one instruction and traps. ``rax`` then holds
the result.

Syscall restart. A process stopped inside a blocking syscall (a REPL waiting in
``read()``) shows ``rax`` = -ERESTARTSYS/-ERESTARTNOINTR/-ERESTARTNOHAND: it must
resume with ``rip -= 2`` and ``rax = orig_rax`` so the syscall runs again; for
-ERESTART_RESTARTBLOCK with ``rax = restart_syscall``. Restoring raw saved
registers after an injection leaks the -512 to userspace (the kernel's own fixup
runs only on the signal path). :func:`resumable_regs` applies the fix; every
process forked from a template needs it too.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable

from . import _sys
from ._sys import Regs, signed
from .errors import InjectionFailed, ProcessGone

_STOP_SIGNALS = (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


def find_syscall_insn(pid: int) -> int:
    """Address of a ``syscall`` instruction in pid's vDSO."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if line.rstrip().endswith("[vdso]"):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                break
        else:
            raise InjectionFailed(f"pid {pid} has no [vdso] mapping: cannot find a syscall instruction")
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        mem.seek(lo)
        code = mem.read(hi - lo)
    idx = code.find(b"\x0f\x05")
    if idx < 0:
        raise InjectionFailed(f"pid {pid}: no syscall instruction in its vDSO")
    return lo + idx


def resumable_regs(regs: Regs) -> Regs:
    """Registers to resume with so that an interrupted syscall restarts."""
    r = regs.copy()
    if signed(r.orig_rax) >= 0:
        err = -signed(r.rax)
        if err in (_sys.ERESTARTSYS, _sys.ERESTARTNOINTR, _sys.ERESTARTNOHAND):
            r.rax = r.orig_rax
            r.rip -= 2
        elif err == _sys.ERESTART_RESTARTBLOCK:
            r.rax = _sys.SYS_restart_syscall
            r.rip -= 2
    return r


def continue_regs(regs: Regs, pending: list[int]) -> Regs:
    """Registers to let a stopped process go on with. With signals to send
    it again (``pending``, other than the job-control stop), the registers
    as the stop found them: a syscall that the stop interrupted (a read()
    waiting for input) then ends with EINTR or restarts as the signal's
    handler asks (SA_RESTART), as if it had never been stopped -- the kernel
    decides that when it delivers the signal. Without, it restarts."""
    if any(sig != signal.SIGSTOP for sig in pending):
        return regs
    return resumable_regs(regs)


def _gone(pid: int, status: int) -> ProcessGone:
    if os.WIFSIGNALED(status):
        how = f"was killed by signal {os.WTERMSIG(status)}"
    else:
        how = f"exited with status {os.WEXITSTATUS(status)}"
    return ProcessGone(f"pid {pid} {how}")


def seize(pid: int, options: int) -> None:
    _sys.ptrace(_sys.PTRACE_SEIZE, pid, 0, options)


def set_options(pid: int, options: int) -> None:
    _sys.ptrace(_sys.PTRACE_SETOPTIONS, pid, 0, options)


def interrupt(pid: int, execs: list[int] | None = None) -> list[int]:
    """Stop a running seized tracee. Returns signals that arrived meanwhile
    (suppressed here; re-send them with :func:`resume`). An execve seen on the
    way (PTRACE_EVENT_EXEC) is appended to ``execs``."""
    pending: list[int] = []
    _sys.ptrace(_sys.PTRACE_INTERRUPT, pid)
    while True:
        status = _wait_stop(pid)
        if status is None:
            return pending  # in a trace stop whose event someone else collected
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            raise _gone(pid, status)
        sig = os.WSTOPSIG(status)
        event = status >> 16
        if event == _sys.PTRACE_EVENT_STOP:
            if sig in _STOP_SIGNALS:
                # It was in a job-control stop (SIGSTOP, ^Z): it must be again
                # when we let it go (resume() sends the stop first).
                pending.append(signal.SIGSTOP)
            return pending
        if event == 0 and sig != signal.SIGTRAP:
            pending.append(sig)
        if event == _sys.PTRACE_EVENT_EXEC and execs is not None:
            execs.append(pid)
        _sys.ptrace(_sys.PTRACE_CONT, pid, 0, 0)


def _wait_stop(pid: int) -> int | None:
    """Wait for the next event of a tracee that was asked to stop. Seen here,
    rarely: a PTRACE_INTERRUPT sent right after PTRACE_SEIZE, while the process
    is finishing an execve, never produces a stop. So poll: re-send the
    interrupt when nothing came for a second, and accept a trace stop that
    /proc shows but whose wait event was taken already (returns None)."""
    t0 = last = time.monotonic()
    delay = 0.00002
    while True:
        wpid, status = _sys.waitpid(pid, _sys.WNOHANG)
        if wpid:
            return status
        now = time.monotonic()
        if now - t0 > 0.05:
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError):  # gone, or being reaped as we read
                state = b"X"
            if state == b"t" and now - t0 > 0.2:
                return None
            if now - last > 1.0:
                last = now
                try:
                    _sys.ptrace(_sys.PTRACE_INTERRUPT, pid)
                except OSError:
                    pass
        time.sleep(delay)
        if now - t0 > 0.002:  # a stop takes ~0.1 ms: poll finely until it is overdue
            delay = min(delay * 2, 0.002)


def _resend(pid: int, pending: list[int]) -> None:
    """Signals suppressed while the tracee was stopped for us go to it now."""
    for sig in pending:
        try:
            os.kill(pid, sig)
        except OSError:  # gone, or its real-time signal queue is full: that one is lost
            pass


def resume(pid: int, regs: Regs | None, pending: list[int] = []) -> None:  # noqa: B006
    """Set regs (if given) and let the tracee run; re-send pending signals,
    before it runs: a stop among them then takes effect before any of its
    instructions (the tracer's service() keeps it with PTRACE_LISTEN)."""
    if regs is not None:
        _sys.ptrace_setregs(pid, regs)
    _resend(pid, pending)
    _sys.ptrace(_sys.PTRACE_CONT, pid, 0, 0)


# A syscall that a signal interrupted before it did anything returns one of
# these; the kernel's exit path would rewind and run it again once the signal
# is handled, but our next PTRACE_SETREGS (orig_rax -1) tells it to leave the
# registers alone, so it is ours to run again. fork() above all: it gives up
# with ERESTARTNOINTR when a signal is pending as it starts, one that came
# between leaving the ptrace stop and the syscall instruction.
_RESTART = {512, 513, 514, 516}  # ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK
RESTARTS = 8


def _arrived(pid: int, status: int, syscall_addr: int, pending: list[int] | None) -> Regs | None:
    """One stop while single-stepping the injected syscall instruction: the
    registers after it once it ran (its trap), else None -- step again.

    A signal sent to the process meanwhile stops it (a signal-delivery
    stop): stepping on suppresses it, so it goes to ``pending`` (when given)
    for the caller to send again before it lets the process go. A SIGTRAP
    before the instruction ran is someone else's: dropped, as service()
    drops every SIGTRAP."""
    if os.WIFEXITED(status) or os.WIFSIGNALED(status):
        raise _gone(pid, status)
    sig = os.WSTOPSIG(status)
    if (status >> 16) != 0:  # a group stop or an interrupt: nothing to keep
        return None
    if sig == signal.SIGTRAP:
        regs = _sys.ptrace_getregs(pid)
        if regs.rip == syscall_addr + 2:
            return regs
        if regs.rip != syscall_addr:
            raise InjectionFailed(
                f"pid {pid}: injected syscall trapped at {regs.rip:#x}, expected {syscall_addr + 2:#x}")
        return None
    if pending is not None:
        pending.append(sig)
    return None


def _step(pid: int, syscall_addr: int, pending: list[int] | None = None) -> Regs:
    """Single-step the syscall instruction; returns the registers after it."""
    while True:
        _sys.ptrace(_sys.PTRACE_SINGLESTEP, pid, 0, 0)
        _, status = _sys.waitpid(pid)
        regs = _arrived(pid, status, syscall_addr, pending)
        if regs is not None:
            return regs


def syscall(pid: int, base: Regs, syscall_addr: int, nr: int, *args: int,
            pending: list[int] | None = None) -> int:
    """Run one syscall in the stopped tracee; returns its (signed) result.

    The tracee's registers are left changed: the caller restores them.
    Signals that arrive meanwhile go to ``pending`` (see :func:`_arrived`);
    without it they are dropped (a template's: it never runs them).
    """
    regs = base.copy()
    regs.rax = nr
    regs.orig_rax = _sys.unsigned(-1)
    regs.rip = syscall_addr
    for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
        setattr(regs, name, _sys.unsigned(value))
    for _ in range(RESTARTS):
        _sys.ptrace_setregs(pid, regs)
        res = signed(_step(pid, syscall_addr, pending).rax)
        if -res not in _RESTART:
            return res
    raise InjectionFailed(f"pid {pid}: injected syscall {nr} was interrupted by signals {RESTARTS} times in a row")


def checked_syscall(pid: int, base: Regs, syscall_addr: int, nr: int, *args: int, what: str = "") -> int:
    res = syscall(pid, base, syscall_addr, nr, *args)
    if -4096 < res < 0:
        raise InjectionFailed(
            f"pid {pid}: injected {what or f'syscall {nr}'} failed: {os.strerror(-res)}")
    return res


def fork(pid: int, base: Regs, syscall_addr: int, during: Callable[[], None] | None = None,
         pending: list[int] | None = None) -> int:
    """Inject a fork: ``clone(CLONE_PTRACE | SIGCHLD)``.

    Returns the child's pid; the child is traced and left in its initial
    PTRACE_EVENT_STOP, an exact copy-on-write image of the tracee. CLONE_PTRACE
    rather than fork() with PTRACE_O_TRACEFORK: the child is traced all the
    same, and the parent skips the PTRACE_EVENT_FORK stop (one round trip
    through the tracer less). The child's argument registers are the
    clone's; nobody runs it with them (a restore sets a checkpoint's).
    ``during`` (which must not raise) runs on the calling thread while the
    tracee copies its page tables -- the longest step of a checkpoint, so
    reads of /proc that need the tracee stopped cost nothing there.
    Signals that arrive meanwhile go to ``pending`` (see :func:`_arrived`).
    """
    regs = base.copy()
    regs.rax = _sys.SYS_clone
    regs.rdi = _sys.CLONE_PTRACE | signal.SIGCHLD
    regs.rsi = regs.rdx = regs.r10 = regs.r8 = 0  # same stack, no tid pointers, no TLS
    regs.orig_rax = _sys.unsigned(-1)
    regs.rip = syscall_addr
    child = 0
    for attempt in range(RESTARTS):
        _sys.ptrace_setregs(pid, regs)
        _sys.ptrace(_sys.PTRACE_SINGLESTEP, pid, 0, 0)
        if during is not None and attempt == 0:
            during()
        while True:
            _, status = _sys.waitpid(pid)
            if os.WIFSTOPPED(status) and (status >> 16) == _sys.PTRACE_EVENT_FORK:
                child = _sys.ptrace_geteventmsg(pid)  # PTRACE_O_TRACEFORK set on it by someone
                _sys.ptrace(_sys.PTRACE_SINGLESTEP, pid, 0, 0)
                continue
            after = _arrived(pid, status, syscall_addr, pending)
            if after is not None:
                break
            _sys.ptrace(_sys.PTRACE_SINGLESTEP, pid, 0, 0)
        res = signed(after.rax)
        if -res in _RESTART and not child:
            continue  # a signal came while it copied: fork again (the signal is in pending)
        if res < 0:
            raise InjectionFailed(f"pid {pid}: injected fork() failed: {os.strerror(-res)}")
        child = child or res
        break
    else:
        raise InjectionFailed(f"pid {pid}: the injected fork() was interrupted by signals {RESTARTS} times in a row")
    while True:
        _, status = _sys.waitpid(child)
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            raise InjectionFailed(f"pid {pid}: the forked child {child} died before its first stop")
        if os.WIFSTOPPED(status):
            return child


def kill_and_reap(pid: int) -> None:
    """SIGKILL a tracee and collect its exit (tracer side)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:
        while True:
            _, status = _sys.waitpid(pid)
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                return
    except ChildProcessError:
        return


def detach(pid: int, pending: list[int] = []) -> None:  # noqa: B006
    """Detach a stopped tracee and let it run."""
    _sys.ptrace(_sys.PTRACE_DETACH, pid, 0, 0)
    _resend(pid, pending)


def service(pid: int) -> tuple[str, int]:
    """Handle at most one pending event of a running tracee, without blocking.

    Returns ("none"|"handled"|"exec"|"exited", status). Signals are passed on;
    stray SIGTRAPs from our own single-steps are dropped; job-control stops are
    kept with PTRACE_LISTEN.
    """
    try:
        wpid, status = _sys.waitpid(pid, _sys.WNOHANG)
    except ChildProcessError:
        return "exited", 0
    if wpid == 0:
        return "none", 0
    if os.WIFEXITED(status) or os.WIFSIGNALED(status):
        return "exited", status
    sig = os.WSTOPSIG(status)
    event = status >> 16
    try:
        if event == _sys.PTRACE_EVENT_STOP:
            if sig in _STOP_SIGNALS:
                _sys.ptrace(_sys.PTRACE_LISTEN, pid, 0, 0)
            else:
                _sys.ptrace(_sys.PTRACE_CONT, pid, 0, 0)
        elif event == 0:
            _sys.ptrace(_sys.PTRACE_CONT, pid, 0, 0 if sig == signal.SIGTRAP else sig)
        else:
            _sys.ptrace(_sys.PTRACE_CONT, pid, 0, 0)
    except ProcessLookupError:
        pass
    return ("exec" if event == _sys.PTRACE_EVENT_EXEC else "handled"), status
