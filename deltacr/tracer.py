"""ProcessCheckpointer: checkpoint and roll back one running process, in-process.

Threads. Every ptrace call for the session happens on one dedicated *tracer
thread* (the kernel lets only the attaching thread trace); public methods post a
closure to it and wait. Between operations the tracer thread services the live
process: it passes signals on, keeps job-control stops with PTRACE_LISTEN and
notices an exit. A *watcher thread* blocks in ``waitid(WNOWAIT)`` on the live
process and wakes the tracer thread the moment there is an event (a traced
process sits in a signal-delivery stop until its tracer acts); the tracer
thread also polls, every 0.5-20 ms, as a fallback.
A *background thread* writes memory deltas from frozen templates; it only
reads /proc and never traces.

Phases. ``stop()`` interrupts the process; ``capture(label)`` collects dirty
ranges, injects ``fork()`` (the stopped child is the template) and records
registers and fd offsets; ``resume()`` lets it run. ``checkpoint()`` does all
three and reports the critical-path time; the delta is written afterwards
(``wait_background()``).
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, TypeVar

from . import _sys, inject
from .check import check
from .delta import DeltaInfo, MapRecord, read_delta
from .dirty import DirtyTracker, copy_pages, make_tracker, pfn_changed
from .errors import (AlreadyTraced, DeltaCRError, InjectionFailed, MultiThreaded, NoSuchProcess,
                     NotAttached, NotPermitted, ProcessGone, ProcessIsZombie, RestoreFailed)
from .hugepages import HugePageKeeper
from .procfs import (PF_KTHREAD, FdPos, Vma, children_of, deltacr_session, descendants, fd_offsets,
                     read_fd_positions, read_maps, read_stat, read_status, signal_pending, thread_count, tracer_pid,
                     zombie_children)
from .replay import ReplayStats, merge, reconcile, replay
from .restore import restore_cwd_and_mask, restore_fds, revalidate_files
from .session import Checkpoint, CheckpointInfo, Session, default_store
from .templates import TemplatePool
from .writer import DeltaJob, layout_of, write_delta

T = TypeVar("T")

LIVE_OPTIONS = _sys.PTRACE_O_TRACEEXEC  # see an execve: the address space changes under us
TEMPLATE_OPTIONS = _sys.PTRACE_O_EXITKILL
REAP_BATCH = 8  # dead templates (zombies of the live process) tolerated before reaping them from inside it
SPARE_QUIET = 0.01  # s without a command before spares are forked (a fork cannot be interrupted)
AFTER_DELAY = 0.0003  # s a command's left-over work waits for its caller to take the answer
AFTER_MAX_DEFER = 0.05  # s it waits at most for the callers on critical paths to be done


@dataclass
class CheckpointResult:
    """What ``checkpoint()`` did; times in milliseconds."""

    id: int
    critical_ms: float
    stop_ms: float
    capture_ms: float
    resume_ms: float


@dataclass
class RollbackResult:
    id: int
    pid: int
    path: str  # "fast" (forked from the template), "slow" (replayed) or "in-place" (same pid)
    ms: float
    replayed_bytes: int = 0  # page data written into the process by the slow path
    delta_bytes: int = 0  # page data held by the replayed deltas (newer deltas supersede older pages)
    base: int | None = None  # the ancestor whose template the slow path forked
    warnings: list[str] = field(default_factory=list)
    spare: bool = False  # fast path without a fork: the template's spare child, forked ahead of time


def already_in_session(pid: int, session: int, daemon: int) -> str:
    """Why pid, traced by the deltacr daemon of ``session``, cannot be
    attached again, and which pid to name instead: after a rollback the
    live process has a new pid, but the session keeps the one given to
    attach."""
    if session == pid:
        return (f"pid {pid} is already attached by deltacr daemon {daemon}; use it (`deltacr status {pid}`), "
                f"or `deltacr detach {pid}` first")
    try:
        # the daemon's live process is stopped only during an operation
        # (a Python caller may keep it stopped: then this says "frozen" too)
        frozen = read_stat(pid).state == "t"
    except NoSuchProcess:
        frozen = False
    if frozen:
        return (f"pid {pid} is stopped and traced by the deltacr session {session} (daemon {daemon}): a "
                f"frozen copy (a checkpoint's template or spare), not a process to attach; the session is "
                f"named {session} (`deltacr status {session}`, `deltacr list {session}`)")
    return (f"pid {pid} is the live process of the deltacr session {session} (daemon {daemon}) since a rollback; "
            f"a session keeps the pid given to attach as its name: use {session} "
            f"(`deltacr status {session}`, `deltacr detach {session}`)")


def refuse_untraceable(pid: int) -> None:
    """Raise the matching DeltaCRError if pid cannot be checkpointed. Changes nothing.

    (A multi-threaded process is refused again after attaching, when the thread
    count is re-read with the process stopped.)"""
    if pid <= 0:
        raise NoSuchProcess(f"pid {pid} is not a valid process id")
    if pid == os.getpid():
        raise NotPermitted(f"pid {pid} is this process itself: a process cannot trace itself")
    st = read_stat(pid)
    if st.state in ("Z", "X"):
        raise ProcessIsZombie(
            f"pid {pid} is a zombie: it has exited and waits for its parent ({st.ppid}) to reap it; "
            "there is nothing left to checkpoint")
    if st.flags & PF_KTHREAD:
        raise NotPermitted(f"pid {pid} is a kernel thread: the kernel does not allow tracing it")
    status = read_status(pid)
    tracer = int(status.get("TracerPid", "0"))
    if tracer:
        session = deltacr_session(pid)
        if session is not None:
            raise AlreadyTraced(already_in_session(pid, *session))
        try:  # name the tracing process, not its tracing thread
            tracer = int(read_status(tracer).get("Tgid", tracer))
            with open(f"/proc/{tracer}/comm") as f:
                comm = f.read().strip()
        except (NoSuchProcess, OSError, ValueError):
            comm = "?"
        raise AlreadyTraced(
            f"pid {pid} is already traced by pid {tracer} ({comm}); a process has one tracer: "
            "detach that one first")
    n = int(status.get("Threads", "1"))
    if n > 1:
        raise MultiThreaded(
            f"pid {pid} has {n} threads: fork() copies only the calling thread, so a template "
            f"would silently lose the other {n - 1}; deltacr checkpoints single-threaded processes only")


def _perms(m: MapRecord) -> str:
    return "".join(c if m.prot & b else "-" for c, b in (("r", 1), ("w", 2), ("x", 4))) + ("p" if m.private else "s")


@dataclass
class _Spare:
    pid: int
    armed: object | None  # dirty tracking prepared in it (DirtyTracker.prepare)


class _CriticalSections:
    """Counts callers on a critical path anywhere in this process; while any
    is, every session's background writer pauses (it competes for the CPUs
    and the GIL with the forks and ptrace calls the caller waits for)."""

    def __init__(self) -> None:
        self._n = 0
        self._lock = threading.Lock()
        self.idle = threading.Event()
        self.idle.set()

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            self._n += 1
            self.idle.clear()
        try:
            yield
        finally:
            with self._lock:
                self._n -= 1
                if self._n == 0:
                    self.idle.set()


critical = _CriticalSections()
critical.__doc__ = """``with deltacr.critical():`` pauses the background delta writers of
every session in this process (used around an atomic sandbox checkpoint or
rollback)."""


class Gate:
    """Holds processes stopped until every part of a larger checkpoint or
    rollback (other processes, a filesystem) is done: ``open(ok)`` lets them
    go; ``ok=False`` means "abandon" (a gated rollback then puts the previous
    process back)."""

    TIMEOUT = 60.0  # a caller that died must not keep its processes stopped forever

    def __init__(self) -> None:
        self._ev = threading.Event()
        self.ok = True

    def open(self, ok: bool = True) -> None:
        self.ok = ok
        self._ev.set()

    def wait(self) -> bool:
        """True: go on; False: abandon (also when nobody opened it in TIMEOUT s)."""
        return self.ok if self._ev.wait(self.TIMEOUT) else False


class Stopped(threading.Event):
    """Set once a gated operation's process is stopped; ``error`` is set
    first if it could not be (it exited, ...)."""

    error: BaseException | None = None


class _TracerThread(threading.Thread):
    """The only thread that makes ptrace calls for a session."""

    def __init__(self, name: str, idle: Callable[[], bool], quiet: threading.Event,
                 watching: Callable[[], bool]) -> None:
        super().__init__(name=name, daemon=True)
        self.q: queue.Queue[tuple[Callable[[], Any], Future[Any], bool] | None] = queue.Queue()
        self.idle = idle
        self.quiet = quiet  # cleared while a command runs: the background thread pauses
        self.watching = watching  # is there a running process to service?
        self.tick = 0.005
        self.last_command = time.monotonic()
        self.answered = self.last_command  # when the last command (not a posted item) was answered
        # work a command leaves for after its caller has the answer; it runs
        # before the next command, so every command sees it done (see run())
        self.after: list[Callable[[], None]] = []

    def call(self, fn: Callable[[], T]) -> T:
        if threading.current_thread() is self:
            return fn()
        return self.submit(fn).result()

    def submit(self, fn: Callable[[], T]) -> "Future[T]":
        fut: Future[T] = Future()
        self.q.put((fn, fut, False))
        return fut

    def post(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on this thread, nobody waiting for it (servicing the
        process, evictions): unlike a command, it does not first run the
        left-over work of the last one."""
        self.q.put((fn, Future(), True))

    def stop(self) -> None:
        self.q.put(None)

    def run(self) -> None:
        try:  # the waits for a stop poll in sub-100 us sleeps: let them be that short
            _sys.set_timer_slack(1000)
        except OSError:
            pass
        while True:
            try:
                # Work the last command left for later waits until its caller
                # has had a moment to take the answer: blocking here frees the
                # GIL for it (run at once, that work kept the caller waiting
                # for the GIL: measured 0.5 ms of a sandbox checkpoint).
                item = self.q.get(timeout=AFTER_DELAY if self.after else self.tick)
            except queue.Empty:
                if self.after:
                    # Not while a caller is on a critical path (a sandbox
                    # waits for its other processes' forks): this thread's
                    # Python would hold the GIL the threads it waits for need
                    # as their forks return. A command runs it first anyway.
                    if (not critical.idle.is_set()
                            and time.monotonic() - self.answered < AFTER_MAX_DEFER):
                        continue
                    self._run_after()
                    continue
                busy = False
                try:
                    busy = self.idle()
                except Exception:  # noqa: BLE001 - servicing must go on
                    busy = False
                if busy:
                    self.tick = 0.0005
                elif self.watching():  # the watcher thread wakes us for events: this is a fallback
                    self.tick = min(self.tick * 2, 0.02)
                else:  # nothing runs (process gone or stopped): housekeeping only
                    self.tick = 0.25
                continue
            if item is None:
                self._run_after()
                return
            fn, fut, posted = item
            if not posted:
                self._run_after()  # before the next command, whatever it is
            if not fut.set_running_or_notify_cancel():
                continue
            self.quiet.clear()
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)
            finally:
                self.quiet.set()
                self.last_command = time.monotonic()
                if not posted:
                    self.answered = self.last_command
                self.tick = 0.0005  # after a command, look at the (maybe new) process soon

    def _run_after(self) -> None:
        while self.after:
            self.after.pop(0)()


class ProcessCheckpointer:
    """Checkpoint/rollback of one single-threaded process, traced by this process.

    ``pid`` keeps naming the session after rollbacks change the live pid
    (``live_pid``). ``max_templates`` bounds the frozen processes kept (see
    :mod:`deltacr.templates` for the eviction policy). ``backend`` is one of
    "auto" (what ``deltacr check`` picks: uffd-wp here), "uffd-wp", "pfn",
    "soft-dirty", "compare" (see :mod:`deltacr.dirty`). ``reap_orphans`` makes this
    process a child subreaper and reaps the descendants of the processes a
    rollback replaced when they exit (never the host's own children).

    ``spares``: while the tracer is idle, fork each template once more and
    keep that stopped child as the template's *spare*; a rollback to the
    checkpoint then uses the spare instead of forking on its critical path
    (a fork costs what the process's page tables cost: 3 ms for a 55 MB
    REPL, 20 ms at 1 GB) and a new spare is forked afterwards. The price: up
    to twice as many frozen processes (a spare shares all its memory with
    its template; it costs page tables) and one fork of background CPU per
    checkpoint and per rollback. ``wait_background()`` also waits for them.

    ``hugepages``: a keeper thread collapses the memory the live process
    wrote since its last fork into transparent huge pages, from outside and
    never during an operation, so that the next template fork copies page
    tables in batches (see :mod:`deltacr.hugepages`; off where ``deltacr
    check`` says the kernel cannot, or the administrator set THP to never).
    """

    def __init__(self, pid: int, store_dir: str | None = None, max_templates: int = 8,
                 backend: str = "auto", reap_orphans: bool = False, rehydrate: bool = True,
                 spares: bool = True, hugepages: bool = True) -> None:
        refuse_untraceable(pid)
        if max_templates < 1:
            raise DeltaCRError(f"pid {pid}: --max-templates must be at least 1 (the root keeps one)")
        st = read_stat(pid)
        self.pid = pid
        self.store = store_dir or default_store(pid, st.starttime)
        os.makedirs(os.path.join(self.store, "deltas"), exist_ok=True)
        self.backend = check().backend if backend == "auto" else backend
        from .check import available_backends
        if self.backend not in available_backends():
            raise DeltaCRError(
                f"pid {pid}: dirty-tracking backend {self.backend!r} does not work on this machine "
                f"(see `deltacr check`); available: {', '.join(available_backends())}")
        self.tracker: DirtyTracker = make_tracker(self.backend)
        self.session = Session(pid, self.store)
        self.session.next_id = Session.next_free_id(self.store)  # never overwrite an earlier session's deltas
        self.pool = TemplatePool(max_templates)
        self.rehydrate = rehydrate
        self.spares = spares
        self._live_depth = 0  # forks between the attached process and the live one (Checkpoint.depth)
        self._spares: dict[int, _Spare] = {}  # checkpoint id -> a stopped child of its template, ready to run
        self._no_spare: set[int] = set()  # forking a spare failed there: do not retry in a loop
        # checkpoints whose template has had a child other than its current
        # spare (a restored process, a dead spare: resumed, it would find a
        # child it never forked) or was resumed already (see _may_resume_template)
        self._used: set[int] = set()
        self.live_pid: int | None = pid
        self.state = "attaching"  # running | stopped | gone | closed
        self.exit_status: int | None = None
        self.current: int | None = None
        self.warnings: list[str] = []
        self._regs: _sys.Regs | None = None
        self._pending: list[int] = []
        self._syscall_addr = 0
        self._dying: set[int] = set()
        self._execs: list[int] = []  # the live process called execve since we last looked
        self._orphans: set[int] = set()  # descendants of replaced processes, reaped when they exit
        self._dead_templates: set[int] = set()  # killed templates whose parent still has to reap them
        self._dead_children: set[int] = set()  # killed children of templates and spares, to reap inside them
        self._retiring: list[int] = []  # replaced live processes, still stopped, to kill when idle
        self._unfinished: list[Callable[[], None]] = []  # captures to record once the process runs
        self.last_capture_ms = 0.0  # the last capture's time (fork and all): callers start the slowest first
        self.last_fork_ms = 0.0  # of which the injected fork() (the kernel copying page tables)
        self.last_depth = 0  # and the fork chain behind the template it made (Checkpoint.depth)
        self._lock = threading.RLock()
        self._layouts: dict[int, list[MapRecord]] = {}
        self._hashes: dict[int, dict[int, bytes]] = {}
        self._done: dict[int, threading.Event] = {}
        self._cancel = False
        self._reap = reap_orphans
        self._last_slow = 0.0
        if reap_orphans:
            _sys.set_child_subreaper()
        self._quiet = threading.Event()
        self._quiet.set()
        self._tracer = _TracerThread(f"deltacr-tracer-{pid}", self._idle, self._quiet,
                                     lambda: self.state == "running")
        self._tracer.start()
        self._bg_q: queue.Queue[DeltaJob | None] = queue.Queue()
        self._bg = threading.Thread(target=self._bg_main, name=f"deltacr-bg-{pid}", daemon=True)
        try:
            self._tracer.call(self._attach)
        except BaseException:
            self._tracer.stop()
            self._tracer.join()
            raise
        self._bg.start()
        self._keeper: HugePageKeeper | None = None
        if hugepages and check().can_collapse:
            self._keeper = HugePageKeeper(f"deltacr-hugepages-{pid}", self._keeper_pid, self._background_may_run)
            self._keeper.start()
        self._watcher = threading.Thread(target=self._watch, name=f"deltacr-watch-{pid}", daemon=True)
        self._watcher.start()

    def _keeper_pid(self) -> int | None:
        """The process the huge-page keeper works on: none while it is stopped
        (an operation, or a caller holding it stopped)."""
        return self.live_pid if self.state == "running" else None

    def _tracer_idle(self) -> bool:
        """Nothing is asked of the tracer, nobody is on a critical path, and
        no command came for a moment (its caller may send the next one)."""
        return (self._tracer.q.empty() and critical.idle.is_set()
                and time.monotonic() - self._tracer.last_command > SPARE_QUIET)

    def _background_may_run(self) -> bool:
        """The huge-page keeper's test: the tracer idle, no command running,
        the process running."""
        return self._quiet.is_set() and self.state == "running" and self._tracer_idle()

    def _watch(self) -> None:
        """Wake the tracer thread the moment the running process has an event
        for us (a signal-delivery stop to pass on, an exit): a traced process
        waits in such a stop until we act, so a poll interval would delay
        every signal it gets (bash gets a SIGCHLD per command it runs). The
        wait peeks (WNOWAIT); the tracer thread consumes the event."""
        while not self._cancel:
            pid = self.live_pid
            if self.state != "running" or pid is None:
                # stopped: an operation is under way, soon over; gone: maybe for good
                time.sleep(0.005 if self.state == "stopped" else 0.1)
                continue
            try:
                r = os.waitid(os.P_PID, pid, os.WEXITED | os.WSTOPPED | os.WNOWAIT | _sys.WALL)
            except ChildProcessError:  # not our tracee any more (replaced, detached)
                time.sleep(0.005)
                continue
            except InterruptedError:
                continue
            if r is None or self._cancel:
                continue
            serviced = threading.Event()

            def service() -> None:
                try:
                    self._idle()
                finally:
                    serviced.set()
            self._tracer.post(service)
            serviced.wait(1.0)
            if pid != self.live_pid or self.state != "running":
                continue
            # the event may stay (a stop of a process that is not the live one
            # any more, one only a command consumes): do not spin on it
            time.sleep(0.0002)

    # ------------------------------------------------------------------ tracer side
    def _run_in(self, pid: int, base: _sys.Regs, addr: int = 0) -> Callable[..., int]:
        addr = addr or self._syscall_addr
        # Signals that reach the live process while we inject go out again
        # when it resumes (see inject._arrived); a template's are dropped.
        pending = self._pending if pid == self.live_pid else None

        def run(nr: int, *args: int) -> int:
            return inject.syscall(pid, base, addr, nr, *args, pending=pending)
        return run

    def _attach(self) -> None:
        pid = self.pid
        try:
            inject.seize(pid, LIVE_OPTIONS)
        except PermissionError:
            raise NotPermitted(
                f"pid {pid}: the kernel refused PTRACE_SEIZE (EPERM): it belongs to another user, "
                "is protected (Yama ptrace_scope, no_new_privs), or is already traced; run as root "
                "or as the process's owner") from None
        except ProcessLookupError:
            raise NoSuchProcess(f"pid {pid} exited before we could attach") from None
        try:
            self._pending = inject.interrupt(pid)
            n = thread_count(pid)
            if n > 1:
                raise MultiThreaded(
                    f"pid {pid} has {n} threads: fork() copies only the calling thread, so a template "
                    f"would lose the other {n - 1}; deltacr checkpoints single-threaded processes only")
            self._syscall_addr = inject.find_syscall_insn(pid)
            regs = _sys.ptrace_getregs(pid)
            try:
                self.tracker.setup(pid, self._run_in(pid, regs), lambda: read_maps(pid))
            except (OSError, InjectionFailed) as e:
                self.warnings.append(f"{self.tracker.name} tracking unavailable for pid {pid} ({e}); "
                                     "using content compare")
                self.tracker.teardown(None, None)
                self.backend = "compare"
                self.tracker = make_tracker("compare")
            inject.resume(pid, inject.continue_regs(regs, self._pending), self._pending)
            self._pending = []
            self.state = "running"
        except BaseException:
            try:
                inject.detach(pid, self._pending)
            except OSError:
                pass
            raise

    def _reap_dying(self) -> None:
        """Collect killed processes that have exited (no wait)."""
        for p in list(self._dying):
            try:
                wpid, _ = _sys.waitpid(p, _sys.WNOHANG)
            except ChildProcessError:
                wpid = p
            if wpid:
                self._dying.discard(p)

    def _idle(self) -> bool:
        busy = False
        if self._retiring and critical.idle.is_set():
            while self._retiring:
                self._retire(self._retiring.pop())
        if self.state == "running" and self.live_pid is not None:
            for _ in range(32):
                what, status = inject.service(self.live_pid)
                if what == "none":
                    break
                busy = True
                if what == "exec":
                    self._execs.append(self.live_pid)
                if what == "exited":
                    self.state = "gone"
                    self.exit_status = status
                    # a child of a template (restored by a rollback) stays its
                    # zombie: reaped from inside it, as the ones we kill
                    self._dead_children.add(self.live_pid)
                    break
        self._reap_dying()
        if not busy and self._dead_children and self._tracer_idle():
            busy = self._reap_in_templates()
        now = time.monotonic()
        if now - self._last_slow > 1.0:
            self._last_slow = now
            for cid, tpid in self.pool.items():
                self._template_alive(cid, tpid)
            if self._reap and self._orphans:
                for z in zombie_children(os.getpid()):
                    if z in self._orphans:
                        self._orphans.discard(z)
                        try:
                            os.waitpid(z, os.WNOHANG)
                        except ChildProcessError:
                            pass
            # reaped by init, or never ours: forget them (a pid is reused)
            self._orphans = {p for p in self._orphans if os.path.exists(f"/proc/{p}")}
        if not busy and self._tracer_idle():
            busy = self._make_spare()
        return busy

    def _make_spare(self) -> bool:
        """Fork a spare for the most recently used template that has none.
        True if it tried (there may be more to make), False if none is missing."""
        if not self.spares or self._cancel or self.state in ("closed", "attaching"):
            return False
        with self._lock:
            todo = [(c, t) for c, t in reversed(self.pool.items())
                    if c not in self._spares and c not in self._no_spare]
        if not todo:
            return False
        cid, tpl = todo[0]
        ck = self.session.checkpoints[cid]
        spare = 0
        try:
            spare = inject.fork(tpl, ck.registers, ck.syscall_addr)
            inject.set_options(spare, TEMPLATE_OPTIONS)  # dies with the tracer, like its template
            sp = _Spare(spare, None)
            if self._tracer.q.empty():  # else a command waits: wait_background() or the rollback arms it
                self._arm(cid, sp)
        except (DeltaCRError, OSError) as e:
            if spare:
                inject.kill_and_reap(spare)
                self._orphan(spare)
                self._used.add(cid)  # a dead child of the template
            self._no_spare.add(cid)
            self.warnings.append(f"no spare for checkpoint {cid} (template {tpl}): {e}; "
                                 "its rollbacks fork on the critical path")
            return True
        with self._lock:
            self._spares[cid] = sp
        return True

    def _vmas(self, cid: int, pid: int) -> Callable[[], list[Vma]]:
        """The mappings of pid, a fresh fork of checkpoint cid's template: the
        checkpoint's recorded layout when the delta writer has read it."""
        with self._lock:
            layout = self._layouts.get(cid)
        if layout:
            return lambda: [Vma(m.start, m.end, _perms(m), m.offset, m.path, m.dev, m.inode) for m in layout]
        return lambda: read_maps(pid)

    def _arm(self, cid: int, sp: _Spare) -> None:
        ck = self.session.checkpoints[cid]
        sp.armed = self.tracker.prepare(sp.pid, self._run_in(sp.pid, ck.registers, ck.syscall_addr),
                                        self._vmas(cid, sp.pid))

    def _arm_spares(self) -> None:
        """Prepare tracking in spares forked while a command was waiting."""
        with self._lock:
            todo = [(c, sp) for c, sp in self._spares.items() if sp.armed is None]
        for cid, sp in todo:
            try:
                self._arm(cid, sp)
            except (DeltaCRError, OSError):
                pass  # the rollback arms tracking itself

    def _template_alive(self, cid: int, tpid: int) -> bool:
        """Is the template still there? One killed from outside (a kill or a
        pkill that matched it: it runs the same program as the process) is
        dropped, so that its checkpoint restores through the slow path."""
        try:
            wpid, _ = _sys.waitpid(tpid, _sys.WNOHANG)
        except ChildProcessError:
            wpid = tpid
        if not wpid:
            return True
        with self._lock:
            self.pool.remove(cid)
        self._kill_spare(cid)
        self.warnings.append(f"template {tpid} of checkpoint {cid} was killed from outside (a kill or pkill "
                             "that matched it?): that checkpoint now restores through the slow path")
        return False

    def _take_spare(self, cid: int) -> _Spare | None:
        """The spare of checkpoint cid, if it has a usable one: alive, and
        with no signal pending. A signal sent to the process group while it
        waited (Ctrl-C, kill 0) was meant for the process of that moment; a
        process forked now would not have it."""
        with self._lock:
            spare = self._spares.pop(cid, None)
        if spare is None:
            return None
        self._used.add(cid)  # whatever happens now, the template will have had a child besides a spare
        if self.spares:
            try:
                wpid, _ = _sys.waitpid(spare.pid, _sys.WNOHANG)
            except ChildProcessError:
                wpid = -1
            if wpid == 0 and not signal_pending(spare.pid):  # still in its stop, nothing sent to it
                return spare
        self._drop_spare(spare, wait=True)  # killed, signalled, or spares were switched off
        return None

    def _own_children(self, pid: int) -> list[int]:
        """Children of ``pid`` that are its own (a command a shell waits for),
        not templates or spares of ours: those are traced by this thread."""
        me = threading.get_native_id()
        with self._lock:
            ours = {tpid for _c, tpid in self.pool.items()} | {sp.pid for sp in self._spares.values()}
        out = []
        for c in children_of(pid):
            if c in ours or c in self._dying or c in self._dead_templates:
                continue
            # a zombie counts: a command that ended during the stop, not yet
            # waited for; restored, the process will wait for it
            try:
                if tracer_pid(c) == me:
                    continue
            except NoSuchProcess:
                continue  # reaped meanwhile: nobody waits for it
            out.append(c)
        return out

    def _may_resume_template(self, cid: int, tpl: int) -> bool:
        """Can a rollback to cid resume the template itself, its spare (an
        identical frozen child) taking its place? Then the restored process
        has one fork fewer behind it than the spare would, and so has every
        checkpoint taken from it (a fork costs more the more forks stand
        behind the process: docs/deltacr.md, Fork chains). Only the first
        rollback to a checkpoint does it: the template is one fork deeper
        after, and resuming again and again would sink it further; and only
        while the template's one child is that spare (a process restored
        from it before, or a spare that died, would become a child the
        resumed program never forked). And only
        with a backend that arms nothing in spares ahead of time (pfn,
        compare: the template would have to be armed on the critical path
        otherwise), when no pending delta reads the template and nothing
        was sent to it. Not either when the process had children of its own
        then (a shell running a command): resumed, it would find its
        template's spare as its only child and a wait(-1) for the command
        would block on that spare for ever; restored from the spare, it has
        no child, and the wait returns (ECHILD) as if the command was over."""
        if self.tracker.prepares:
            return False
        if self.session.checkpoints[cid].had_children:
            return False
        with self._lock:
            if not self.pool.idle(cid):
                return False
        try:
            wpid, _ = _sys.waitpid(tpl, _sys.WNOHANG)
        except ChildProcessError:
            return False
        return wpid == 0 and not signal_pending(tpl)

    def _kill_spare(self, cid: int) -> None:
        self._no_spare.discard(cid)
        self._used.add(cid)
        with self._lock:
            spare = self._spares.pop(cid, None)
        if spare is not None:
            self._drop_spare(spare, wait=False)

    def _drop_spare(self, spare: _Spare, wait: bool) -> None:
        if wait:
            inject.kill_and_reap(spare.pid)
        else:
            try:
                os.kill(spare.pid, signal.SIGKILL)
                self._dying.add(spare.pid)
            except ProcessLookupError:
                pass
        self._orphan(spare.pid)

    def _orphan(self, pid: int) -> None:
        """A killed spare (or a failed rollback's process) stays a zombie of
        its template: reaped from inside it when idle
        (:meth:`_reap_in_templates`); once the template is gone, of the
        subreaper: reaped then."""
        self._dead_children.add(pid)
        if self._reap:
            self._orphans.add(pid)

    def _retire(self, pid: int) -> None:
        """SIGKILL a replaced live process. With reap_orphans, first note its
        descendants: when they exit they come back to us (subreaper) and are
        reaped -- and only they, not the host's own children."""
        if self._reap:
            self._orphans |= descendants(pid)
        try:
            os.kill(pid, signal.SIGKILL)
            self._dying.add(pid)
            # mostly a child of a template, which never waits: reaped from
            # inside it later (not added to _orphans: the process attached
            # to may be the host's own child, and those are the host's to reap)
            self._dead_children.add(pid)
        except ProcessLookupError:
            pass

    def _require_open(self) -> None:
        if self.state in ("closed", "attaching"):
            raise NotAttached(f"pid {self.pid}: the session is closed; attach again")

    def _stop(self) -> float:
        t = time.perf_counter()
        self._require_open()
        if self.state == "stopped":
            return 0.0
        if self.state == "gone" or self.live_pid is None:
            raise ProcessGone(f"pid {self.pid}: the live process has exited; roll back to a checkpoint "
                              f"to bring it back (`deltacr list {self.pid}`)")
        try:
            self._pending = inject.interrupt(self.live_pid, self._execs)
        except ProcessGone:
            self.state = "gone"
            raise
        self._regs = _sys.ptrace_getregs(self.live_pid)
        self.state = "stopped"
        if self._execs:
            # A new program: new vDSO, new memory. Find a syscall instruction
            # again and re-arm tracking (the next delta records the new layout wholly).
            self._execs.clear()
            self._syscall_addr = inject.find_syscall_insn(self.live_pid)
            self.tracker.teardown(None, None)
            try:
                live = self.live_pid
                self.tracker.setup(live, self._run_in(live, self._regs), lambda: read_maps(live))
            except (OSError, InjectionFailed) as e:
                self.warnings.append(f"re-arming dirty tracking after execve in pid {self.live_pid}: {e}")
        return (time.perf_counter() - t) * 1e3

    def _capture(self, label: str, defer: bool = False) -> tuple[int, float]:
        """Fork the template and read what cannot wait (fd offsets move as
        soon as the process runs). With ``defer``, the rest -- reading the
        vector registers (from the template: a fork copies them), recording
        the checkpoint, queueing its delta -- waits in ``self._unfinished``
        until ``_resume()`` has let the process go."""
        t = time.perf_counter()
        if self.state != "stopped" or self.live_pid is None or self._regs is None:
            raise DeltaCRError(f"pid {self.pid}: capture() needs a stopped process: call stop() first")
        live, regs = self.live_pid, self._regs
        stopped = signal.SIGSTOP in self._pending  # how interrupt() notes a job-control stop
        dirty = self.tracker.collect(live, self._run_in(live, regs), lambda: read_maps(live))
        got: dict[str, Any] = {}

        def during() -> None:  # the process is stopped in fork(): its offsets do not move
            try:
                # Counted here, off the critical path: a stopped process
                # starts no thread, and a fork of a multi-threaded one
                # (its other threads not copied) is thrown away below.
                n = thread_count(live)
                if n > 1:
                    raise MultiThreaded(f"pid {live} (session {self.pid}) now has {n} threads: fork() copies "
                                        "only the calling thread; no checkpoint taken: checkpoint again once "
                                        "it is back to one thread")
                got["fds"] = read_fd_positions(live)
                got["kids"] = self._own_children(live)
            except BaseException as e:  # noqa: BLE001 - raised once the fork is over
                got["error"] = e
        tf = time.perf_counter()
        try:
            tpl = inject.fork(live, regs, self._syscall_addr, during, self._pending)
        except BaseException:
            self.tracker.give_back(dirty)
            raise
        self.last_fork_ms = (time.perf_counter() - tf) * 1e3
        if self._keeper is not None:
            self._keeper.forget()  # the live process's memory is shared with the template now
        inject.set_options(tpl, TEMPLATE_OPTIONS)  # now: it must die with us, whatever happens next
        if "error" in got:
            inject.kill_and_reap(tpl)
            self._dead_templates.add(tpl)
            self.tracker.give_back(dirty)
            raise got["error"]
        fds: list[FdPos] = got["fds"]
        waits = bool(got["kids"])
        with self._lock:
            cid = self.session.new_id()
        parent, created, depth = self.current, time.time(), self._live_depth + 1
        self.last_depth = depth

        def finish() -> None:
            try:
                xstate = _sys.ptrace_get_xstate(tpl)
            except OSError as e:  # no XSAVE: the slow path then keeps the base template's vector registers
                xstate = b""
                if not any("vector registers" in w for w in self.warnings):
                    self.warnings.append(f"pid {live}: the vector registers cannot be read ({e}); a slow-path "
                                         "restore of a process stopped mid-computation may go wrong")
            self._record(cid, parent, created, label, regs, fds, xstate, tpl, dirty, depth, waits, stopped)
        if defer:
            self._unfinished.append(finish)
        else:
            finish()
        self.last_capture_ms = (time.perf_counter() - t) * 1e3
        return cid, self.last_capture_ms

    def _finish_captures(self) -> None:
        while self._unfinished:
            self._unfinished.pop(0)()

    def _finish_later(self) -> None:
        """Record the captures of a command once its caller has the answer
        (the tracer thread runs this before its next command; readers on
        other threads wait for it with ``_settle()``)."""
        def finish() -> None:
            try:
                self._finish_captures()
            except Exception as e:  # noqa: BLE001 - nothing to raise it to any more
                self._unfinished.clear()
                self.warnings.append(f"pid {self.pid}: recording a checkpoint failed: {e}")
        self._tracer.after.append(finish)

    def _settle(self) -> None:
        """Wait until the tracer thread has finished what its last command
        left for later (a checkpoint's record), when called from elsewhere."""
        if self._tracer.is_alive() and threading.current_thread() is not self._tracer:
            self._tracer.call(lambda: None)

    def _record(self, cid: int, parent: int | None, created: float, label: str, regs: _sys.Regs,
                fds: list[FdPos], xstate: bytes, tpl: int, dirty: Any, depth: int,
                had_children: bool = False, stopped: bool = False) -> None:
        with self._lock:
            ck = Checkpoint(cid, parent, label, created, regs.to_bytes(), fds,
                            syscall_addr=self._syscall_addr, xstate=xstate, depth=depth,
                            had_children=had_children, stopped=stopped)
            self.session.checkpoints[cid] = ck
            self.pool.add(cid, tpl, root=parent is None)
            self._done[cid] = threading.Event()
            witness = None
            if dirty.by_pfn and ck.parent is not None:
                witness = self.pool.pid(ck.parent)
                if witness is not None:
                    self.pool.hold(ck.parent)
            self.current = cid
        self._bg_q.put(DeltaJob(cid, ck.parent, tpl, dirty, self.session.delta_path(cid), witness))

    def _resume(self, finish: bool = True) -> float:
        t = time.perf_counter()
        if self.state != "stopped" or self.live_pid is None:
            return 0.0
        assert self._regs is not None
        if len(self._dead_templates) >= REAP_BATCH:  # batched: one injection costs ~0.1 ms
            try:
                self._reap_dead_templates(self.live_pid, self._regs)
            except (DeltaCRError, OSError) as e:  # never keep the process stopped over a zombie
                self.warnings.append(f"reaping dead templates in pid {self.live_pid}: {e}")
        try:
            inject.resume(self.live_pid, inject.continue_regs(self._regs, self._pending), self._pending)
        except ProcessLookupError:
            # SIGKILLed while stopped (it ends a ptrace-stopped tracee without
            # running it): "running" lets the service loop reap it like any exit
            pass
        finally:  # a template taken just before is a checkpoint even if the process died since
            if finish:
                self._finish_captures()
        self._pending = []
        self.state = "running"
        return (time.perf_counter() - t) * 1e3

    def _reap_dead_templates(self, live: int, regs: _sys.Regs) -> None:
        """A killed template stays a zombie until its parent -- usually the live
        process, which does not know it has that child -- waits for it. Wait for
        it from inside the parent (injected wait4) while the parent is stopped."""
        for parent, zombies in self._zombies(self._dead_templates).items():
            if parent != live:  # reparented: its new parent (a subreaper, init) reaps it
                self._dead_templates.difference_update(zombies)
                continue
            self._wait_in(self._run_in(live, regs), zombies, self._dead_templates)

    def _reap_in_templates(self) -> bool:
        """Reap the zombies of templates and spares. A process we killed
        whose parent is one (a replaced live process, a dead spare, a failed
        rollback's process) stays a zombie: a frozen process never waits,
        and long tree searches would run out of pids. Called when the tracer
        is idle, so no operation waits for it: per parent, the registers
        saved, an injected wait4 per zombie, the registers put back exactly.
        Nothing else of the frozen image changes: wait4 writes no memory
        (NULL status and rusage), a syscall keeps the vector registers, and
        the kernel's rewrite of the rseq area's cpu fields on the return to
        user mode happens at every injection into a template (a spare's
        fork too). The child's death queued a SIGCHLD for the parent (queued
        although ignored, since the parent is traced); the injection steps
        past its delivery, which discards it: the image had neither that
        child nor that signal. A process forked from the template would not
        inherit a pending signal anyway, and a template that had a child
        besides its spare is never resumed itself. True if it reaped."""
        if not self._dead_children:
            return False
        with self._lock:
            frozen = {t: c for c, t in self.pool.items()}
            frozen.update({sp.pid: c for c, sp in self._spares.items()})
        did = False
        for parent, zombies in self._zombies(self._dead_children).items():
            cid = frozen.get(parent)
            if cid is None:  # not frozen by us: the attached process's parent, or a subreaper/init
                self._dead_children.difference_update(zombies)
                continue
            did = True
            try:
                saved = _sys.ptrace_getregs(parent)
                try:
                    run = self._run_in(parent, saved, self.session.checkpoints[cid].syscall_addr)
                    self._wait_in(run, zombies, self._dead_children)
                finally:
                    _sys.ptrace_setregs(parent, saved)
            except (DeltaCRError, OSError) as e:  # the template died meanwhile, say: its zombies go elsewhere
                self._dead_children.difference_update(zombies)
                self.warnings.append(f"reaping {zombies} inside the template {parent} of checkpoint {cid}: {e}")
        return did

    def _zombies(self, pids: set[int]) -> dict[int, list[int]]:
        """Of ``pids`` (processes we killed), those that wait as zombies for
        their parent, by parent. The gone are dropped from ``pids``; one the
        tracer has not collected yet stays for later (its parent cannot reap
        it before the tracer has)."""
        out: dict[int, list[int]] = {}
        for pid in list(pids):
            if pid in self._dying:
                try:
                    if _sys.waitpid(pid, _sys.WNOHANG)[0]:
                        self._dying.discard(pid)
                except ChildProcessError:
                    self._dying.discard(pid)
                if pid in self._dying:
                    continue
            try:
                st = read_stat(pid)
            except NoSuchProcess:
                pids.discard(pid)
                continue
            if st.state == "Z":
                out.setdefault(st.ppid, []).append(pid)
        return out

    @staticmethod
    def _wait_in(run: Callable[..., int], zombies: list[int], pids: set[int]) -> None:
        """Reap zombies from inside their stopped parent (``run`` injects
        there): wait4(pid, NULL, WNOHANG | __WALL, NULL) each."""
        for z in zombies:
            res = run(_sys.SYS_wait4, z, 0, os.WNOHANG | _sys.WALL, 0)
            if res == z or res < 0:
                pids.discard(z)

    def _evict(self) -> None:
        with self._lock:
            victims = self.pool.to_evict()
        for cid, tpid in victims:
            self._kill_spare(cid)
            # no waiting: tearing down a big template's memory takes a while; the idle loop reaps it
            try:
                os.kill(tpid, signal.SIGKILL)
                self._dying.add(tpid)
                self._dead_templates.add(tpid)
            except ProcessLookupError:
                pass

    def _put_offsets_back(self, pid: int, saved: dict[int, int]) -> None:
        """lseek the stopped live process's fds whose offset moved back to
        ``saved`` (see fd_offsets)."""
        assert self._regs is not None
        run = self._run_in(pid, self._regs)
        for fd, pos in fd_offsets(pid).items():
            if fd in saved and saved[fd] != pos:
                run(_sys.SYS_lseek, fd, saved[fd], os.SEEK_SET)

    def _set_fds(self, pid: int, run: Callable[..., int], ck: Checkpoint, slow: bool) -> list[str]:
        return restore_fds(pid, run, ck.fds, slow, getattr(self.tracker, "target_fd", None))

    def _rollback_in_place(self, cid: int, resume: bool) -> RollbackResult | None:
        """Restore the live process itself to checkpoint cid: copy back only the
        pages whose frame differs from the template's, reconcile the layout, fds,
        cwd, signal mask and registers. Same pid; cost follows the pages that
        changed, not the process size. None when it does not apply (no
        template, process gone, an execve since, frame numbers hidden)."""
        t0 = time.perf_counter()
        with self._lock:
            ck = self.session.get(cid)
            tpl = self.pool.pid(cid)
        if tpl is None or self.live_pid is None or self.state not in ("running", "stopped") \
                or ck.syscall_addr != self._syscall_addr or not check().pfn_visible:
            return None
        live = self.live_pid
        self._stop()
        if ck.syscall_addr != self._syscall_addr:  # an execve was noticed just now
            self._resume()
            return None
        assert self._regs is not None
        regs = ck.registers
        run = self._run_in(live, self._regs)
        layout = layout_of(read_maps(tpl))
        stats = ReplayStats()
        try:
            reconcile(live, run, layout, 0, stats)
            changed = pfn_changed(tpl, live, merge([(m.start, m.end) for m in layout
                                                    if m.private and not m.special]))
            copied = copy_pages(tpl, live, changed)
            with self._lock:
                cwd, sigmask = ck.cwd, ck.sigmask
            if not cwd:  # the background thread has not read them yet: take them from the template
                from .procfs import cwd as read_cwd, signal_mask
                cwd, sigmask = read_cwd(tpl), signal_mask(tpl)
            warnings = self._set_fds(live, run, ck, slow=True)
            warnings += restore_cwd_and_mask(live, run, cwd, sigmask)
            revalidate_files(live, ck.fds)
            if ck.xstate:
                _sys.ptrace_set_xstate(live, ck.xstate)
        except BaseException:
            # the process is half restored: it cannot continue as it was
            os.kill(live, signal.SIGKILL)
            self._dying.add(live)
            self.state = "gone"
            raise
        with self._lock:
            self._regs = regs
            # as on the fork paths: the signals sent to the state that is
            # gone go with it; stopped or not as when captured (see _resume)
            self._pending = [signal.SIGSTOP] if ck.stopped else []
            self.current = cid
            self.pool.touch(cid)
        if resume:
            self._resume()
        else:
            _sys.ptrace_setregs(live, regs)
        return RollbackResult(cid, live, "in-place", (time.perf_counter() - t0) * 1e3, copied, 0, None, warnings)

    def _rollback(self, cid: int, resume: bool = True, in_place: bool = False,
                  gate: Gate | None = None, stopped: Stopped | None = None) -> RollbackResult:
        t0 = time.perf_counter()
        try:
            self._require_open()
            if in_place:
                r = self._rollback_in_place(cid, resume)
                if r is not None:
                    return r
            with self._lock:
                ck = self.session.get(cid)
                tpl = self.pool.pid(cid)
            if tpl is not None and not self._template_alive(cid, tpl):
                tpl = None
            old = self.live_pid if self.state in ("running", "stopped") else None
            if old is not None and self.state == "running":
                try:
                    self._stop()
                except ProcessGone:
                    old = None  # it exited just now: restored like any other
        except BaseException as e:
            if stopped is not None:
                stopped.error = e
            raise
        finally:
            if stopped is not None:
                stopped.set()
        regs = ck.registers
        warnings: list[str] = []
        new = 0
        spare = False
        ready: _Spare | None = None
        swap = False  # the template itself is resumed; its spare becomes the template
        replayed = delta_bytes = depth = 0
        base_id: int | None = None
        old_offsets: dict[int, int] = {}
        try:
            addr = ck.syscall_addr
            if tpl is not None:
                first = cid not in self._used  # _take_spare marks it
                ready = self._take_spare(cid)
                spare = ready is not None
                swap = ready is not None and first and self._may_resume_template(cid, tpl)
                if swap:
                    new, depth = tpl, ck.depth
                else:
                    self._used.add(cid)  # the template gets a child now, whatever happens next
                    try:
                        new = ready.pid if ready is not None else inject.fork(tpl, regs, addr)
                    except ProcessLookupError:  # killed from outside just now: the next try takes the slow path
                        self._template_alive(cid, tpl)
                        raise RestoreFailed(f"pid {self.pid}: the frozen copy of checkpoint {cid} (pid {tpl}) "
                                            "was killed from outside just now (a kill or pkill that matched "
                                            "it?): roll back again, the next rollback restores it from an "
                                            "older copy") from None
                    depth = ck.depth + 1
                inject.set_options(new, LIVE_OPTIONS)
                run = self._run_in(new, regs, addr)
                if old is not None:
                    # The offsets below move open file descriptions the old
                    # process may share (files open since before cid): if
                    # the rollback fails or is abandoned, it gets its own
                    # back. From /proc alone: a gated caller switches its
                    # files meanwhile.
                    old_offsets = fd_offsets(old)
                warnings += self._set_fds(new, run, ck, slow=False)
                path = "fast"
            else:
                path = "slow"
                chain = self.session.ancestors(cid)
                with self._lock:
                    held = [(c, self.pool.pid(c)) for c in chain if c in self.pool]
                base_id = next((c for c, t in held if t is not None and self._template_alive(c, t)), None)
                if base_id is None:
                    raise RestoreFailed(f"pid {self.pid}: checkpoint {cid} cannot be restored: no frozen copy "
                                        "of it or of an ancestor is left (killed from outside? a kill or "
                                        "pkill that matches the program matches them too)")
                todo = list(reversed(chain[:chain.index(base_id)]))
                deltas: list[tuple[str, DeltaInfo]] = []
                for c in todo:
                    self._done[c].wait()
                    cc = self.session.checkpoints[c]
                    if cc.delta_state != "written":
                        raise RestoreFailed(f"pid {self.pid}: the delta of checkpoint {c} could not be "
                                            f"written ({cc.delta_error}); checkpoint {cid} is unrestorable")
                    p = self.session.delta_path(c)
                    deltas.append((p, read_delta(p, verify=False)))
                base_pid = self.pool.pid(base_id)
                assert base_pid is not None
                with self._lock:  # the base's recorded layout, once its delta is written
                    base_layout = self._layouts.get(base_id)
                base_vdso = [m for m in base_layout or [] if m.path == "[vdso]"]
                want_vdso = [m for m in deltas[-1][1].maps if m.path == "[vdso]"]
                if base_vdso and want_vdso and base_vdso[0].start != want_vdso[0].start:
                    raise RestoreFailed(
                        f"pid {self.pid}: checkpoint {cid} was taken after an execve that followed checkpoint "
                        f"{base_id}, the nearest one with a template: a new program cannot be rebuilt from the old "
                        "one; keep more templates (--max-templates) to restore it")
                addr = self.session.checkpoints[base_id].syscall_addr
                self._used.add(base_id)  # its template gets a child: never resume it
                new = inject.fork(base_pid, regs, addr)
                depth = self.session.checkpoints[base_id].depth + 1
                inject.set_options(new, LIVE_OPTIONS)
                run = self._run_in(new, regs, addr)
                stats = replay(new, run, deltas, base_layout)
                replayed = stats.bytes_written
                delta_bytes = stats.delta_bytes
                if ck.xstate:  # the base template's vector registers are not this checkpoint's
                    _sys.ptrace_set_xstate(new, ck.xstate)
            # Past the gate the caller's other parts (a filesystem switch) are
            # done: paths (cwd, files to reopen) resolve in the right files.
            if gate is not None and not gate.wait():
                raise RestoreFailed(f"pid {self.pid}: the rollback to checkpoint {cid} was abandoned "
                                    "by its caller; the process is as it was")
            if path == "slow":
                warnings += restore_cwd_and_mask(new, run, ck.cwd, ck.sigmask)
                warnings += self._set_fds(new, run, ck, slow=True)
                if self.rehydrate:
                    tnew = inject.fork(new, regs, addr)
                    inject.set_options(tnew, TEMPLATE_OPTIONS)
                    with self._lock:
                        self.pool.add(cid, tnew)
                        self.pool.mark_durable(cid)
                        self._used.discard(cid)  # a new template, without children
                        self.session.checkpoints[cid].depth = depth + 1
            try:
                if ready is not None and ready.armed is not None:
                    self.tracker.adopt(ready.armed)
                else:  # on the fast path the checkpoint's layout is the new process's: no maps to read
                    self.tracker.setup(new, run, self._vmas(cid, new) if path == "fast" else lambda: read_maps(new))
            except (OSError, InjectionFailed) as e:
                warnings.append(f"dirty tracking could not be re-armed in pid {new}: {e}")
            revalidate_files(new, ck.fds)
            if resume:
                inject.resume(new, inject.resumable_regs(regs), [signal.SIGSTOP] if ck.stopped else [])
            else:
                _sys.ptrace_setregs(new, regs)
        except BaseException:
            if swap and ready is not None:
                # The template was only prepared (registers and offsets are
                # set again by every restore; its memory is untouched): it
                # stays the template, its spare stays its spare.
                try:
                    inject.set_options(tpl, TEMPLATE_OPTIONS)
                except OSError:
                    pass
                with self._lock:
                    self._spares[cid] = ready
                    self._used.discard(cid)  # as it was: a first rollback may still resume it
                new = 0
            if new:
                inject.kill_and_reap(new)
                self._orphan(new)  # a child of a frozen template: its zombie waits for that one
            if old is not None:
                if gate is not None and gate.wait():
                    # The caller went on (its files are switched): the old
                    # process must not run in them. It ends; the error says why.
                    self._retire(old)
                    self.state = "gone"
                else:
                    if old_offsets and self._regs is not None:
                        try:
                            self._put_offsets_back(old, old_offsets)
                        except (OSError, DeltaCRError) as e:
                            self.warnings.append(f"pid {old}: putting its file offsets back after a "
                                                 f"failed rollback failed: {e}")
                    self._resume()
            raise
        if old is not None:
            # It stays stopped until retired: once no caller is on a critical
            # path (its teardown takes CPU time the new processes need now)
            self._retiring.append(old)
        with self._lock:
            if swap:
                assert ready is not None
                if self.pool.replace(cid, ready.pid):
                    self.session.checkpoints[cid].depth = depth + 1
                else:  # cannot happen (the pool changes on this thread only): do not leak it
                    inject.kill_and_reap(ready.pid)
                self._used.add(cid)  # resumed once: its template is one fork deeper now
            self._syscall_addr = addr
            self._execs.clear()
            self._live_depth = depth
            self.live_pid = new
            self.state = "running" if resume else "stopped"
            if self._keeper is not None:
                self._keeper.forget()
            self._regs = regs
            # stopped as it was when captured: resume() sends the stop first
            self._pending = [signal.SIGSTOP] if ck.stopped and not resume else []
            self.current = cid
            self.pool.touch(cid)
        self._evict()
        return RollbackResult(cid, new, path, (time.perf_counter() - t0) * 1e3, replayed, delta_bytes, base_id,
                              warnings, spare)

    def _close(self, kill_live: bool) -> None:
        if self.state == "closed":
            return
        spares = [s.pid for s in self._spares.values()]
        for s in list(self._spares.values()):  # before their templates: nothing gets reparented alive
            self._drop_spare(s, wait=True)
        self._spares.clear()
        while self._retiring:
            self._retire(self._retiring.pop())
        live = self.live_pid
        if live is not None and self.state in ("running", "stopped"):
            try:
                if self.state == "running":
                    self._stop()
                assert self._regs is not None
                if kill_live:
                    self.tracker.teardown(None, None)
                    self._retire(live)
                else:
                    for _cid, tpid in self.pool.items():
                        inject.kill_and_reap(tpid)
                        self._dead_templates.add(tpid)
                    if self._dead_templates:  # leave no zombie behind in the process we let go
                        self._reap_dead_templates(live, self._regs)
                    self.tracker.teardown(live, self._run_in(live, self._regs))
                    _sys.ptrace_setregs(live, inject.continue_regs(self._regs, self._pending))
                    inject.detach(live, self._pending)
            except (DeltaCRError, OSError):
                pass
        else:
            self.tracker.teardown(None, None)
        for _cid, tpid in self.pool.items():
            inject.kill_and_reap(tpid)
        for s in spares:  # templates gone: a spare's zombie is ours if we are a subreaper
            try:
                os.waitpid(s, os.WNOHANG)
            except ChildProcessError:
                pass
        deadline = time.monotonic() + 5
        while self._dying and time.monotonic() < deadline:
            self._reap_dying()
            time.sleep(0.001)
        self.state = "closed"

    # ------------------------------------------------------------------ background side
    def _pause(self) -> None:
        if self._cancel:
            raise DeltaCRError(f"pid {self.pid}: session closed while writing a delta")
        self._quiet.wait()
        critical.idle.wait()

    def _bg_main(self) -> None:
        while True:
            job = self._bg_q.get()
            if job is None:
                self._bg_q.task_done()
                return
            self._quiet.wait()  # never start while the tracer is on a critical path
            critical.idle.wait()
            t = time.perf_counter()
            ck = self.session.checkpoints[job.cid]
            try:
                with self._lock:
                    parent_layout = self._layouts.get(job.parent) if job.parent is not None else None
                    parent_hashes = self._hashes.get(job.parent) if job.parent is not None else None
                res = write_delta(job, parent_layout, parent_hashes, self._pause)
                with self._lock:
                    self._layouts[job.cid] = res.layout
                    if res.hashes is not None:
                        self._hashes[job.cid] = res.hashes
                    ck.cwd, ck.sigmask, ck.brk = res.cwd, res.sigmask, res.brk
                    ck.delta_bytes, ck.delta_pages = res.size, res.pages
                    ck.delta_state = "written"
                    self.pool.mark_durable(job.cid)
            except Exception as e:  # noqa: BLE001 - recorded on the checkpoint
                ck.delta_state = "failed"
                ck.delta_error = str(e)
            if job.parent_template is not None and job.parent is not None:
                with self._lock:
                    self.pool.release(job.parent)
            ck.background_ms = (time.perf_counter() - t) * 1e3
            try:
                with self._lock:
                    data = self.session.snapshot(self.current, self.live_pid)
                self.session.write(data)  # fsync outside the lock: a slow disk must not stall a checkpoint
            except OSError as e:
                self.warnings.append(f"saving the session of pid {self.pid}: {e}")
            if not self._cancel and ck.delta_state == "written":
                self._tracer.post(self._evict)  # before waiters go on: they must see it done
            self._done[job.cid].set()
            self._bg_q.task_done()

    # ------------------------------------------------------------------ public API
    def stop(self) -> float:
        """Stop the live process (ptrace-stop). Returns milliseconds taken."""
        return self._tracer.call(self._stop)

    def checkpoint_gated(self, label: str, gate: Gate) -> tuple[Stopped, "Future[int]"]:
        """Stop, capture, then keep the process stopped until ``gate`` opens:
        a checkpoint of several processes plus a filesystem, all frozen at one
        instant. Returns (set once the process is stopped -- or could not be,
        see the future --, the future checkpoint id). The checkpoint is taken
        even when the gate opens with ok=False; the caller ignores it."""
        stopped = Stopped()

        def op() -> int:
            try:
                self._stop()
            except BaseException as e:
                stopped.error = e
                raise
            finally:
                stopped.set()
            try:
                cid, _ = self._capture(label, defer=True)
            except BaseException:
                self._resume()
                raise
            try:
                gate.wait()
            finally:
                self._finish_later()  # even if the resume fails: the template is a checkpoint
                self._resume(finish=False)
            return cid
        return stopped, self._tracer.submit(op)

    def rollback_gated(self, cid: int, gate: Gate) -> tuple[Stopped, "Future[RollbackResult]"]:
        """``rollback(cid)`` in steps: stop the live process (the event is set
        then), fork the restored one (and replay its memory on the slow path),
        then wait for ``gate``. open(True): it is finished (cwd and files
        reopened by path on the slow path only now, so they resolve in the
        caller's switched filesystem) and runs; the previous process is killed
        once no caller is on a critical path. open(False): it is thrown away
        and the previous one resumes, unchanged. A failure after the gate
        opened ends the previous process instead (it must not run in the
        switched files); the error says so."""
        stopped = Stopped()
        return stopped, self._tracer.submit(lambda: self._rollback(int(cid), gate=gate, stopped=stopped))

    def capture(self, label: str = "") -> int:
        """Take a checkpoint of the stopped process; returns its id."""
        return self._tracer.call(lambda: self._capture(label))[0]

    def resume(self) -> float:
        """Let the stopped process run again. Returns milliseconds taken."""
        return self._tracer.call(self._resume)

    def checkpoint(self, label: str = "") -> CheckpointResult:
        """stop + capture + resume, timed on the tracer thread (the critical path)."""
        def op() -> CheckpointResult:
            t = time.perf_counter()
            s = self._stop()
            try:
                cid, c = self._capture(label, defer=True)
            finally:
                self._finish_later()
                r = self._resume(finish=False)
            crit = (time.perf_counter() - t) * 1e3  # the process runs again: the rest is off its path

            def note() -> None:
                if cid in self.session.checkpoints:
                    self.session.checkpoints[cid].critical_ms = crit
            self._tracer.after.append(note)
            return CheckpointResult(cid, crit, s, c, r)
        return self._tracer.call(op)

    def rollback(self, cid: int, resume: bool = True, in_place: bool = False) -> RollbackResult:
        """Replace the live process by the state of checkpoint ``cid`` (its pid is
        in the result). With ``resume=False`` the new process stays stopped until
        ``resume()`` (e.g. to roll back several processes atomically).

        ``in_place=True`` (experimental) restores the live process itself when
        the checkpoint still has its template: only pages that differ are copied
        back, the pid stays; kernel state outside memory/fds/cwd/signal mask/
        registers (signal handlers, children, timers) is *not* rolled back.
        Falls back to the fork path when it does not apply."""
        return self._tracer.call(lambda: self._rollback(int(cid), resume, in_place))

    def wait_background(self, timeout: float | None = None) -> None:
        """Wait until every delta queued so far is written (or failed), the
        template evictions that made possible have happened and every
        template has its spare, and no huge-page pass is due (see
        :mod:`deltacr.hugepages`)."""
        self._settle()
        self._wait_deltas(timeout)
        if self._tracer.is_alive() and threading.current_thread() is not self._tracer:
            def fill() -> None:  # evictions posted by those writes have run too; then the spares
                while self._make_spare():
                    pass
                self._arm_spares()
            self._tracer.call(fill)
            if self._keeper is not None:
                self._keeper.wait(timeout if timeout is not None else 30.0)

    def _wait_deltas(self, timeout: float | None) -> None:
        for ev in list(self._done.values()):
            if not ev.wait(timeout):
                raise DeltaCRError(f"pid {self.pid}: background delta writing did not finish in {timeout} s")

    def list(self) -> list[CheckpointInfo]:
        self._settle()
        with self._lock:
            return [CheckpointInfo(c.id, c.parent, c.label, c.created, c.id in self.pool, c.id == self.current,
                                   c.delta_state, c.delta_bytes, c.delta_pages, c.critical_ms, c.background_ms,
                                   c.depth)
                    for c in sorted(self.session.checkpoints.values(), key=lambda c: c.id)]

    def status(self) -> dict[str, Any]:
        self._settle()
        with self._lock:
            return {
                "pid": self.pid,
                "live_pid": self.live_pid,
                "state": self.state,
                "backend": self.backend,
                "store": self.store,
                "checkpoints": len(self.session.checkpoints),
                "current": self.current,
                "templates": {str(c): p for c, p in self.pool.items()},
                "spares": {str(c): s.pid for c, s in list(self._spares.items())},
                "max_templates": self.pool.max_templates,
                "warnings": list(self.warnings),
                "hugepages": asdict(self._keeper.stats) if self._keeper is not None else None,
            }

    def template_pid(self, cid: int) -> int | None:
        self._settle()
        with self._lock:
            return self.pool.pid(cid)

    def evict(self, cid: int) -> bool:
        """Drop checkpoint cid's template now (after its delta is written); the
        next rollback to it takes the slow path. False if it is pinned (root)."""
        self._settle()
        with self._lock:
            self.session.get(cid)  # NoSuchCheckpoint for an unknown id
        self._wait_deltas(None)  # a pending delta may still read this template

        def op() -> bool:
            with self._lock:
                if cid == self.pool.root or cid not in self.pool:
                    return False
                if self.session.checkpoints[cid].delta_state != "written":
                    return False
                tpid = self.pool.remove(cid)
            assert tpid is not None
            self._kill_spare(cid)
            inject.kill_and_reap(tpid)
            self._dead_templates.add(tpid)
            return True
        return self._tracer.call(op)

    def detach(self) -> None:
        """Kill the templates and let the process run on untraced."""
        self.close(kill_live=False)

    def close(self, kill_live: bool = False) -> None:
        """Kill every template; detach the live process (or kill it). Idempotent."""
        if not self._tracer.is_alive():
            return
        self._cancel = True
        self._bg_q.put(None)
        self._bg.join(timeout=30)
        if self._keeper is not None:
            self._keeper.close()
        self._tracer.call(lambda: self._close(kill_live))
        self._tracer.stop()
        self._tracer.join()
        try:
            self.session.save(self.current, self.live_pid)
        except OSError:
            pass

    def __enter__(self) -> "ProcessCheckpointer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
