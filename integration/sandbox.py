"""The sandbox: one DeltaFS mount plus the processes working in it, with one
atomic checkpoint and rollback for both.

Checkpoint, the critical path: stop every live process (ptrace); each
one's template is forked as soon as it is stopped; once all are stopped the
filesystem layer is frozen (every write a stopped process issued has been
answered by the FUSE daemon, so it is in the layer); then they resume
(a :class:`deltacr.Gate` holds them). Off the critical path, in the
background: DeltaCR writes the memory deltas and DeltaFS flushes the frozen
layer to disk (a DeltaFS checkpoint returns once committed, so it survives a
crash of the DeltaFS daemon at once, and on disk a few ms later;
``wait_background()`` waits for both).

A state holds the sandbox's processes, not what they started (a template
is a fork of one process): restored while it ran a command, bash finds no
child and goes on as if the command had ended (DeltaCR does not resume a
template then: its spare would be the child a wait blocks on).

Rollback: stop every process; each process of the target state is made
ready (forked from its template) while the filesystem switches, side by
side. Making a process ready usually forks nothing: each template's
*spare*, a child DeltaCR forked from it while the sandbox was idle, is
taken (a fork of the benchmark's 55 MB REPL costs about 3 ms, taking a
spare under 1 ms); a template without one is forked as before. A process
that exited after the target state comes back. Once the files are
switched: what the processes started (commands, background jobs: in no
state; stopped with SIGSTOP before the switch, SIGCONT if it fails) is
killed, the processes that did not exist in the target state are ended,
what is left in the pipes is drained (output nobody read, input the
processes did not read yet: both belong to the abandoned branch; a command
queued behind a running one must not run in the restored state), and the
new processes run. If the filesystem switch fails, the prepared processes
are thrown away and every old one resumes, the ones that were to end too:
nothing changed. If a process cannot be restored after the switch, it is
ended and the error says so: the sandbox is then in the target state
without that process, never a mix of two states.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO

import deltacr
import deltafs
from deltafs.mounts import canonical, is_dead, top_mount

from . import _cgroup, _proc
from .errors import (BadName, DeltaBoxError, FilesUnavailable, NameInUse, NoAnswer, OutputClosed, OutsideSandbox,
                     ProcessError, RollbackFailed, SandboxStopped, UnknownState)


@dataclass(frozen=True)
class StateInfo:
    """One node of the state tree."""

    id: int
    parent: int | None
    label: str
    created: float
    current: bool
    fs_checkpoint: int
    processes: dict[str, int]  # name -> DeltaCR checkpoint id, for those alive then
    critical_ms: float


@dataclass
class CheckpointReport:
    id: int
    critical_ms: float  # what the caller waited for
    stop_ms: float  # until every process was stopped (each one's template fork starts then)
    freeze_ms: float  # the filesystem layer freeze, while the forks run
    resume_ms: float  # the rest: until the last template was forked and every process runs again
    # the longest template fork (the kernel copying a process's page tables,
    # about 3 ms for a 55 MB REPL here): the floor under critical_ms
    fork_ms: float = 0.0
    depth: int = 0  # the longest fork chain behind a template taken (forks cost more the longer it is)


@dataclass
class RollbackReport:
    id: int
    ms: float
    fs_ms: float  # until the files were switched (the processes are forked from their templates meanwhile)
    pids: dict[str, int | None]  # name -> live pid after the rollback (None: not running)
    # name -> "spare" (the template's pre-forked child), "fast" (forked from
    # the template now) or "slow" (an older template plus memory deltas)
    paths: dict[str, str] = field(default_factory=dict)


# A name becomes a path component (the CLI's /var/lib/deltabox/NAME, a
# process's store and log): letters, digits, '.', '_', '-', not starting with
# '.' or '-' (no '..', no hidden file, no option look-alike), short enough
# for a Unix socket path under the workdir.
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")


def check_name(name: str, what: str = "sandbox") -> str:
    """``name`` if it is a safe plain name, else BadName saying what is allowed."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise BadName(f"{what} name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
                      "starting with a letter, digit or '_' (it becomes a directory name)")
    return name


def read_until(fd: int, buf: bytes, marker: bytes | str, timeout: float,
               name: str = "process", alive: Callable[[], bool] | None = None) -> tuple[bytes, bytes]:
    """Read ``fd`` until ``buf`` holds ``marker``: returns (everything up to
    and including it, the rest). ``alive``: is the writer still running?
    Its output then never closes (frozen forks of it hold the pipe too), so
    once it says no and the pipe is empty, that is the end of the output."""
    if isinstance(marker, str):
        marker = marker.encode()
    deadline = time.monotonic() + timeout
    while marker not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise NoAnswer(f"{name}: no {marker!r} within {timeout} s; got {buf[-300:]!r}")
        ended = alive is not None and not alive()  # before the look: output it wrote is in the pipe
        r, _, _ = select.select([fd], [], [], 0 if ended else left if alive is None else min(left, 0.05))
        if r:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise OutputClosed(f"{name}: output closed before {marker!r}; got {buf[-300:]!r}")
            buf += chunk
        elif ended:
            raise OutputClosed(f"{name}: the process ended before it printed {marker!r}; got {buf[-300:]!r}")
    i = buf.index(marker) + len(marker)
    return buf[:i], buf[i:]


def _check_program(argv: list[str], cwd: str, env: dict[str, str] | None) -> None:
    """Raise what exec would (FileNotFoundError, PermissionError) for a
    program that cannot start: behind the cgroup's /bin/sh the error would
    otherwise be that shell's exit status."""
    prog = argv[0]
    if "/" in prog:
        path: str | None = os.path.join(cwd, prog)
    else:
        path = shutil.which(prog, path=os.pathsep.join(os.get_exec_path(env)))
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), prog)
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), prog)


def _wait_exec(popen: subprocess.Popen[bytes], before: bytes, timeout: float = 10.0) -> None:
    """Wait until the process runs the program (its command line is not the
    wrapper's any more) or has ended: attached in between, DeltaCR would
    set up on the shell's memory and see an exec. A zombie's command line
    reads empty."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # not poll(): its status is for _reap to report
        try:
            with open(f"/proc/{popen.pid}/cmdline", "rb") as f:
                if f.read() != before:
                    return
        except OSError:
            return
        time.sleep(0.0002)


def _reap_ours(procs: list[_proc.Stat], group: _cgroup.Group | None, timeout: float = 1.0) -> None:
    """Reap the processes of a closed sandbox that end as zombies of this
    process: ``procs`` (killed; the same pid with another start time is
    someone else's) and, with a cgroup, every zombie child that was in it.
    One whose parent is still exiting comes to us a moment later."""
    me = os.getpid()
    left = {st.pid: st.starttime for st in procs}
    deadline = time.monotonic() + timeout
    quiet = 0
    while time.monotonic() < deadline and quiet < 3:
        reaped = False
        for pid in _proc.children(me):
            cur = _proc.stat(pid)
            if cur is None or cur.state != "Z":
                continue
            if left.get(pid) == cur.starttime or (group is not None and group.held(pid)):
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                reaped = True
        for pid, start in list(left.items()):
            cur = _proc.stat(pid)
            if cur is None or cur.starttime != start:
                del left[pid]
            elif (cur.ppid != me and cur.ppid not in left
                  and (parent := _proc.stat(cur.ppid)) is not None and parent.state not in "ZX"):
                del left[pid]  # a live parent outside: its to wait for
        quiet = 0 if reaped or left else quiet + 1
        time.sleep(0.005)


class Proc:
    """A process started in the sandbox. Its pipes stay the caller's across
    rollbacks; ``pid`` follows the live process (a rollback gives a new one)."""

    def __init__(self, name: str, argv: list[str], popen: subprocess.Popen[bytes],
                 cr: deltacr.ProcessCheckpointer, stdin: IO[bytes], stdin_reader: int,
                 others: Callable[[], bool] = lambda: False) -> None:
        self.name = name
        self.argv = argv
        self._popen = popen
        self._cr = cr
        assert popen.stdout is not None
        self.stdin = stdin
        self.stdout: IO[bytes] = popen.stdout
        # Our own read end of the stdin pipe, a separate open file description
        # (O_NONBLOCK there does not touch the process's end): a rollback
        # empties the pipe through it, input sent to the abandoned branch.
        self._stdin_reader = stdin_reader
        self._buf = b""
        self.sid = popen.pid  # start_new_session: its own session, which its children share
        # does anything the sandbox's processes started still run (and may
        # hold the output pipe, as a server a launcher left behind)?
        self._others = others

    @property
    def pid(self) -> int | None:
        return self._cr.live_pid if self.alive else None

    @property
    def alive(self) -> bool:
        return self._cr.state in ("running", "stopped")

    def send(self, data: bytes | str) -> None:
        """Write to the process's stdin; ProcessError if it has ended. (A
        write to the pipe would not fail: our own read end keeps it open.)"""
        if not self.alive:
            status = self._cr.exit_status
            how = _how(None if status is None else os.waitstatus_to_exitcode(status))
            raise ProcessError(f"process {self.name!r} has ended{how}, so nothing reads what is sent to it: "
                               "roll back to a state in which it ran to bring it back")
        if isinstance(data, str):
            data = data.encode()
        self.stdin.write(data)
        self.stdin.flush()

    def expect(self, marker: bytes | str, timeout: float = 30.0) -> bytes:
        """Read the output up to and including ``marker``; returns it."""
        out, self._buf = read_until(self.stdout.fileno(), self._buf, marker, timeout, self.name,
                                    lambda: self.alive or self._others())
        return out

    def _drain(self) -> None:
        """Throw away output nobody read yet and input the process did not
        read yet: both belong to a discarded branch (queued commands would
        otherwise run in the restored state)."""
        self._buf = b""
        fd = self.stdout.fileno()
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
        try:
            _read_all(fd)
        finally:
            fcntl.fcntl(fd, fcntl.F_SETFL, fl)
        _read_all(self._stdin_reader)


def _read_all(fd: int) -> None:
    """Read a non-blocking descriptor until it is empty (or closed)."""
    while True:
        try:
            if not os.read(fd, 65536):
                return
        except BlockingIOError:
            return


# spawn() returns once the new process first waits for something (input,
# a child, a reply of the files: state S), as a shell or a REPL does within
# milliseconds, or after SETTLE_S. A command that exits before it ever waits
# (``true``) is then refused every time, whether it ended before DeltaCR
# could attach (a race: Popen starts it first) or just after; one that
# computes for longer than SETTLE_S is taken as it is.
SETTLE_S = 0.25


def _how(returncode: int | None) -> str:
    """How a process ended, Popen's way (negative: a signal), for a message."""
    return ("" if returncode is None else f" (status {returncode})" if returncode >= 0
            else f" (killed by signal {-returncode})")


def _exited(cmd: str, returncode: int | None, cause: BaseException | None) -> ProcessError:
    err = ProcessError(f"{cmd} exited{_how(returncode)} before it could be traced; a sandbox process must keep "
                       "running: start a shell or a REPL and send it short commands")
    err.__cause__ = cause
    return err


def _reap(popen: subprocess.Popen[bytes], timeout: float) -> tuple[bool, int | None]:
    """(has it exited, its returncode: None if a tracer of ours reaped it
    first, where Popen.wait() would report 0)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid, status = os.waitpid(popen.pid, os.WNOHANG)
        except ChildProcessError:
            popen.returncode = -1  # reaped: Popen must not wait for the pid again
            return True, None
        if pid:
            popen.returncode = os.waitstatus_to_exitcode(status)
            return True, popen.returncode
        if time.monotonic() > deadline:
            return False, None
        time.sleep(0.001)


def _untraced(cmd: str, popen: subprocess.Popen[bytes], e: BaseException) -> BaseException:
    """End a process DeltaCR could not attach to; returns the error to raise.

    A command that exits at once is usually gone before DeltaCR attaches,
    which then says so in whatever words the moment gave: the kernel refuses
    PTRACE_SEIZE of an exiting process (EPERM: "run as root"), or it is a
    zombie, or it exits during the attach. The reason to report is that it
    exited."""
    exited, code = _reap(popen, 1.0)  # an exiting process is reapable within a moment
    if exited:
        return _exited(cmd, code, e)
    popen.kill()
    popen.wait()
    if isinstance(e, deltacr.MultiThreaded):
        err = ProcessError(f"{cmd} runs more than one thread, so it cannot run in a sandbox (a state holds "
                           "a fork() of each process and fork() copies only one thread); it was ended")
    elif isinstance(e, deltacr.DeltaCRError):
        err = ProcessError(f"{cmd} could not be traced ({e}); it was ended")
    else:
        return e
    err.__cause__ = e
    return err


def _exited_at_start(cmd: str, popen: subprocess.Popen[bytes],
                     cr: deltacr.ProcessCheckpointer) -> ProcessError | None:
    """Wait until the traced process settles (see SETTLE_S); if it exited
    first, close its tracing and return the error to raise. Its tracer
    reaps it, and so has its status."""
    deadline = time.monotonic() + SETTLE_S
    while cr.state != "gone" and time.monotonic() < deadline + 5:
        st = _proc.stat(popen.pid)  # exiting (Z, gone): the tracer sees it a moment later
        if st is not None and st.state not in "ZX" and (st.state in "ST" or time.monotonic() > deadline):
            return None
        time.sleep(0.0005)
    status = cr.exit_status
    cr.close(kill_live=True)
    _gone, code = _reap(popen, 5.0)
    return _exited(cmd, code if status is None else os.waitstatus_to_exitcode(status), None)


def _checkpoint_error(p: "Proc", e: BaseException) -> BaseException:
    """DeltaCR's refusal to capture ``p`` in the sandbox's terms (its own
    words name DeltaCR's session, not the sandbox's process). Anything else
    goes on as it is."""
    if not isinstance(e, deltacr.DeltaCRError):
        return e
    who = f"process {p.name!r} (pid {p.pid})"
    if isinstance(e, deltacr.MultiThreaded):
        err = ProcessError(
            f"{who} runs more than one thread: a state holds a fork() of each process and fork() copies "
            "only one thread, so no state was taken and the sandbox goes on unchanged; checkpoint again "
            "once it is back to one thread, or roll back to a state from before it started them")
    else:
        err = ProcessError(f"{who} could not be checkpointed ({e}); no state was taken and the sandbox "
                           "goes on unchanged")
    err.__cause__ = e
    return err


class Sandbox:
    """A DeltaFS mount over ``base`` plus the processes started in it.

    Use as a context manager: leaving it ends every process it started and
    unmounts, also on error. ``workdir`` holds the mount point and the stores
    (default: a fresh temporary directory, removed on close).
    ``max_templates`` bounds the frozen process copies kept per process
    (copy-on-write: each costs the pages its process changed since); a state
    whose template was evicted restores through DeltaCR's slow path. 128
    covers a search of 100 expansions without eviction.

    ``backend`` is DeltaCR's dirty-page tracking; "auto" takes "pfn" where
    page frame numbers are visible (root): it puts nothing on the critical
    path of a checkpoint or a rollback (uffd-wp costs a scan per checkpoint
    and a re-arm per restored process: about 0.6 and 1.6 ms for a 55 MB
    REPL, timed while profiling); otherwise DeltaCR's own default."""

    def __init__(self, base: str, *, workdir: str | None = None, max_templates: int = 128,
                 options: tuple[str, ...] = (), backend: str = "auto", hugepages: bool = True) -> None:
        if not os.path.isdir(base):
            raise DeltaBoxError(f"the base {base} is not a directory: give the repository to work on")
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="deltabox-")
        self.root = os.path.join(self.workdir, "root")
        self.store = os.path.join(self.workdir, "store")
        os.makedirs(self.root, exist_ok=True)
        os.makedirs(self.store, exist_ok=True)
        self.max_templates = max_templates
        if backend == "auto" and deltacr.check().pfn_visible:
            backend = "pfn"
        self.backend = backend
        self.hugepages = hugepages  # see deltacr.hugepages
        self.procs: dict[str, Proc] = {}
        self._killed: list[_proc.Stat] = []  # processes we killed, until reaped or gone
        self._deltacr_pids: set[int] = set()  # see _proc.untraced_descendants
        self._states: dict[int, StateInfo] = {}
        self.current: int | None = None
        self._next_id = 1
        self.closed = False
        try:
            self.fs = deltafs.mount(self.root, base=base, store=os.path.join(self.store, "fs"),
                                    options=options)
        except deltafs.DeltaFSError as e:
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            raise DeltaBoxError(f"cannot mount the sandbox's files over {base}: {e}") from e
        # None where cgroups cannot be made: what the processes start is then
        # found by session, which setsid leaves
        self._group = _cgroup.Group.create(f"{os.path.basename(self.workdir)}-{os.getpid()}")

    @property
    def cgroup(self) -> str | None:
        """The cgroup that holds the sandbox's processes and all they start
        (None: none could be made here; then they are found by session)."""
        return self._group.path if self._group is not None else None

    # -- processes -------------------------------------------------------------

    def spawn(self, argv: list[str], name: str | None = None, cwd: str = ".",
              env: dict[str, str] | None = None) -> Proc:
        """Start ``argv`` with its cwd inside the sandbox (``cwd`` relative
        to the root, or an absolute path under it), stdin/stdout as pipes
        (stderr joins stdout), and start tracing it."""
        self._require_open()
        if not argv:
            raise ProcessError("nothing to start: give the command and its arguments, e.g. ['bash']")
        if name is None:
            name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(argv[0])).lstrip(".-")
            stem, n = name[:50] or "proc", len(self.procs) + 1
            while f"{stem}-{n}" in self.procs:  # a name the caller gave may look generated
                n += 1
            name = f"{stem}-{n}"
        check_name(name, "process")
        if name in self.procs:
            how = ("already runs" if self.procs[name].alive else
                   "ended, and a rollback to a state in which it ran brings it back")
            raise NameInUse(f"a process named {name!r} {how} in this sandbox: pick another name")
        # resolved (.., symlinks): a process started outside the root works
        # on files no checkpoint holds and no rollback puts back
        root = os.path.realpath(self.root)
        where = os.path.realpath(os.path.join(root, cwd))
        if os.path.commonpath([root, where]) != root:
            raise OutsideSandbox(f"the working directory {cwd!r} resolves to {where}, outside the sandbox "
                                 f"root {root}: give a path inside it (a relative one is taken from the root)")
        cmd = shlex.join(argv)[:200]
        r, w = os.pipe()  # the stdin pipe (both ends close-on-exec: only the process gets it, as fd 0)
        reader = -1
        try:
            reader = os.open(f"/proc/self/fd/{r}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            # through the cgroup's /bin/sh, which becomes the program
            run = list(argv) if self._group is None else ["/bin/sh", "-c", _cgroup.JOIN, self._group.procs, *argv]
            try:
                if self._group is not None:
                    _check_program(argv, where, env)
                popen = subprocess.Popen(run, stdin=r, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, cwd=where,
                                         env=env, start_new_session=True)
                if self._group is not None:
                    _wait_exec(popen, b"\0".join(os.fsencode(x) for x in run) + b"\0")
            except OSError as e:
                raise ProcessError(f"cannot start {cmd} in the sandbox: {e.strerror}"
                                   f"{f' ({e.filename})' if e.filename else ''}: check the command "
                                   "and the working directory") from e
        except BaseException:
            os.close(w)
            if reader >= 0:
                os.close(reader)
            raise
        finally:
            os.close(r)
        store = os.path.join(self.store, "procs", name)
        err: BaseException | None
        try:
            cr = deltacr.ProcessCheckpointer(popen.pid, store, max_templates=self.max_templates,
                                             reap_orphans=True, backend=self.backend, hugepages=self.hugepages)
        except BaseException as e:
            err = _untraced(cmd, popen, e)  # ends it
        else:
            err = _exited_at_start(cmd, popen, cr)  # ends what is left of it
        if err is not None:
            os.close(w)
            os.close(reader)
            assert popen.stdout is not None
            popen.stdout.close()
            shutil.rmtree(store, ignore_errors=True)  # the name is free again
            raise err
        proc = Proc(name, list(argv), popen, cr, os.fdopen(w, "wb"), reader, self._started_something)
        self.procs[name] = proc
        return proc

    # -- states ----------------------------------------------------------------

    def checkpoint(self, label: str = "") -> CheckpointReport:
        """One state for the files and every live process, atomically."""
        self._require_open()
        leftovers: list[tuple[Proc, int]] = []
        try:
            with self._api("checkpoint"), deltacr.critical():
                return self._checkpoint(label, leftovers)
        finally:
            # Templates of a checkpoint that failed belong to no state: drop
            # them (outside the critical section: eviction waits for the
            # background delta writers, which pause during it).
            for p, cid in leftovers:
                try:
                    p._cr.evict(cid)
                except deltacr.DeltaCRError:
                    pass

    def _checkpoint(self, label: str, leftovers: list[tuple[Proc, int]]) -> CheckpointReport:
        t0 = time.perf_counter()
        gate = deltacr.Gate()
        # the slowest fork (the biggest process) sets the pace: start it first
        live = sorted((p for p in self.procs.values() if p.alive), key=lambda p: -p._cr.last_capture_ms)
        pending = [(p, *p._cr.checkpoint_gated(label, gate)) for p in live]
        taking: list[tuple[Proc, Future[int]]] = []
        fs_id: int | None = None
        try:
            for p, stopped, fut in pending:
                stopped.wait()
                if isinstance(stopped.error, deltacr.ProcessGone):
                    continue  # it exited just now: not part of this state
                if stopped.error is not None:
                    raise _checkpoint_error(p, stopped.error)
                taking.append((p, fut))
            t_stop = time.perf_counter()
            # Every process is stopped, so every write it issued has been
            # answered by DeltaFS: freeze the files now, while the templates
            # fork. The layer reaches the disk in the background.
            fs_id = self.fs.checkpoint(label, durable=False)
            t_fs = time.perf_counter()
        except BaseException:
            gate.open(False)
            for p, _s, fut in pending:
                if fut.exception() is None:  # our error is the one to report
                    leftovers.append((p, fut.result()))
            if fs_id is not None:
                self._drop_fs_quietly(fs_id)
            raise
        gate.open(True)
        caps: dict[str, int] = {}
        errors: list[BaseException] = []
        fork_ms = 0.0
        depth = 0
        for p, fut in taking:
            try:
                caps[p.name] = fut.result()
                fork_ms = max(fork_ms, p._cr.last_fork_ms)
                depth = max(depth, p._cr.last_depth)
            except Exception as e:  # noqa: BLE001 - the first one is raised below
                errors.append(_checkpoint_error(p, e))
        t_res = time.perf_counter()
        if errors:
            leftovers += [(p, caps[p.name]) for p, _f in taking if p.name in caps]
            self._drop_fs_quietly(fs_id)
            raise errors[0]
        sid = self._next_id
        self._next_id += 1
        crit = (t_res - t0) * 1e3
        self._states[sid] = StateInfo(sid, self.current, label, time.time(), False, fs_id, caps, crit)
        self.current = sid
        return CheckpointReport(sid, crit, (t_stop - t0) * 1e3, (t_fs - t_stop) * 1e3,
                                (t_res - t_fs) * 1e3, fork_ms, depth)

    def _drop_fs_quietly(self, fs_id: int) -> None:
        try:
            self.fs.drop(fs_id)
        except deltafs.DeltaFSError:
            pass  # a checkpoint nobody refers to: it costs an empty layer

    # -- what the sandbox's processes started ----------------------------------

    def _sessions(self) -> set[int]:
        return {p.sid for p in self.procs.values()}

    def _descendants(self, known: set[int] | None = None) -> list[_proc.Stat]:
        """Every process the sandbox's processes started (and theirs, also
        orphans adopted by this process, a subreaper, and those that left
        the session: in the sandbox's cgroup where it has one), not
        DeltaCR's."""
        live = {p._cr.live_pid for p in self.procs.values() if p.alive and p._cr.live_pid}
        known = self._deltacr_pids if known is None else known
        if self._group is not None:
            return _proc.untraced_members(self._group.members(), live, known)
        return _proc.untraced_descendants([*live, os.getpid()], self._sessions(), live, known)

    def _started_something(self) -> bool:
        """Does anything the processes started still run? (For ``expect`` on
        any thread: works on a copy of the shared cache.)"""
        return bool(self._descendants(set(self._deltacr_pids)))

    def _members(self) -> list[_proc.Stat]:
        """Every process of the sandbox now: its processes, DeltaCR's frozen
        ones and what they started (as far as sessions tell, without a
        cgroup)."""
        pids = {p._cr.live_pid for p in self.procs.values() if p.alive and p._cr.live_pid}
        pids |= self._group.members() if self._group is not None else self._deltacr_pids
        pids |= {d.pid for d in self._descendants()}
        pids |= {c for pid in list(pids) for c in _proc.children(pid)}  # zombies: in no cgroup
        return [st for st in map(_proc.stat, sorted(pids)) if st is not None]

    def _hold_descendants(self) -> list[_proc.Stat]:
        """SIGSTOP every descendant until none is left running (one may fork
        while we look), waiting for each to really stop: a stopped process
        has no write to the files under way. Call with the sandbox's own
        processes stopped."""
        held: dict[int, _proc.Stat] = {}
        for _round in range(10):
            new = [d for d in self._descendants() if d.pid not in held]
            if not new:
                break
            for d in new:
                _proc.send_signal(d.pid, signal.SIGSTOP)
                held[d.pid] = d
            deadline = time.monotonic() + 2.0
            for d in new:
                while time.monotonic() < deadline:
                    cur = _proc.stat(d.pid)
                    if cur is None or cur.state in "tTZX":
                        break
                    time.sleep(0.0002)
        return list(held.values())

    def _kill(self, procs: list[_proc.Stat]) -> None:
        for d in procs:
            _proc.send_signal(d.pid, signal.SIGKILL)
        self._killed += procs
        self._reap_killed()

    def _reap_killed(self, wait: float = 0.0) -> None:
        """Reap what we killed that became our zombie (an orphan we adopted);
        a zombie of a sandbox process is reaped with it by DeltaCR."""
        deadline = time.monotonic() + wait
        while True:
            left = []
            for d in self._killed:
                cur = _proc.stat(d.pid)
                if cur is None or cur.starttime != d.starttime:
                    continue  # gone (or the pid was reused)
                if cur.state == "Z" and cur.ppid == os.getpid():
                    try:
                        os.waitpid(d.pid, os.WNOHANG)
                    except ChildProcessError:
                        pass
                    continue
                left.append(d)
            self._killed = left
            if not left or time.monotonic() >= deadline:
                return
            time.sleep(0.002)

    def rollback(self, state: int) -> RollbackReport:
        """Files and processes exactly as they were in ``state``."""
        self._require_open()
        st = self._state(state)
        with self._api(f"rollback to state {state}"), deltacr.critical():
            return self._rollback(st)

    def _rollback(self, st: StateInfo) -> RollbackReport:
        state = st.id
        t0 = time.perf_counter()
        # Processes that did not exist in that state are stopped, not killed
        # yet: if the files cannot be switched they go on as if nothing
        # happened. Stopped, they write nothing more into the files.
        leaving: list[Proc] = []
        for p in self.procs.values():
            if p.name not in st.processes and p.alive:
                try:
                    p._cr.stop()
                    leaving.append(p)
                except deltacr.DeltaCRError:
                    pass  # it exited just now: nothing to end
        # Each process of the target state is stopped and prepared (forked
        # from its template) by its tracer; it runs only once the files are
        # switched and the pipes drained.
        gate = deltacr.Gate()
        back = [p for p in self.procs.values() if p.name in st.processes]
        pending = [(p, *p._cr.rollback_gated(st.processes[p.name], gate)) for p in back]
        held: list[_proc.Stat] = []
        ended: list[str] = []
        try:
            for _p, stopped, _f in pending:
                stopped.wait()
                if stopped.error is not None and not isinstance(stopped.error, deltacr.ProcessGone):
                    raise stopped.error  # it may still be running: no switch under it
            # A process that started threads cannot be held still (ptrace
            # stopped its main thread only) and cannot be checkpointed; it is
            # being replaced or ended anyway: end it before the files switch,
            # so that none of its threads writes into the restored ones.
            for p in back + leaving:
                pid = p._cr.live_pid
                if pid and _proc.thread_count(pid) > 1:
                    _proc.send_signal(pid, signal.SIGKILL)
                    ended.append(p.name)
            # What the processes started (a command running in bash, a
            # background job) is not in any state: stopped now, killed once
            # the files switched, so that it writes nothing into them.
            held = self._hold_descendants()
            self.fs.rollback(st.fs_checkpoint)
        except BaseException as e:
            gate.open(False)  # each process goes back to what it was
            for _p, _s, f in pending:
                f.exception()
            for d in held:
                _proc.send_signal(d.pid, signal.SIGCONT)
            for p in leaving:
                try:
                    p._cr.resume()
                except deltacr.DeltaCRError:
                    pass
            if isinstance(e, deltafs.DeltaFSError) and not self._files_dead(e):
                but = (f", except that {', '.join(ended)} (running threads, which a rollback cannot "
                       "hold still) had been ended") if ended else ""
                raise RollbackFailed(f"the files could not be rolled back to state {state} ({e}); "
                                     f"nothing changed{but}") from e
            raise
        try:
            self._kill(held)
            # Every process is stopped and the files are switched: what is
            # left in the pipes belongs to the abandoned branch.
            for p in self.procs.values():
                p._drain()
        finally:  # the files are switched: the new processes must run, whatever happens here
            t_fs = time.perf_counter()
            gate.open(True)
        for p in leaving:
            self._end(p, stopped=True)
        pids: dict[str, int | None] = {p.name: None for p in self.procs.values()}
        paths: dict[str, str] = {}
        failed: list[str] = []
        for p, _s, f in pending:
            try:
                r = f.result()
            except Exception as e:  # noqa: BLE001 - reported below
                self._end(p, stopped=True)
                failed.append(f"{p.name}: {e}")
            else:
                pids[p.name], paths[p.name] = r.pid, "spare" if r.spare else r.path
        self.current = state
        if failed:
            raise RollbackFailed(f"the sandbox is in state {state}, but these processes could not be "
                                 f"restored and were ended: {'; '.join(failed)}")
        return RollbackReport(state, (time.perf_counter() - t0) * 1e3, (t_fs - t0) * 1e3, pids, paths)

    def _end(self, p: Proc, stopped: bool = False) -> None:
        """Kill the live process of ``p``, keeping its templates: a rollback
        to a state where it lived brings it back."""
        pid = p._cr.live_pid
        if not (p.alive and pid):
            return
        _proc.send_signal(pid, signal.SIGKILL)
        if stopped:
            try:
                p._cr.resume()  # lets the tracer see the death
            except deltacr.DeltaCRError:
                pass
        deadline = time.monotonic() + 5
        while p.alive and time.monotonic() < deadline:
            time.sleep(0.0005)

    def _state(self, sid: int) -> StateInfo:
        try:
            return self._states[int(sid)]
        except (KeyError, ValueError):
            raise UnknownState(f"no state {sid!r} in this sandbox: the states are "
                               f"{sorted(self._states) or 'none yet (take a checkpoint first)'}") from None

    def states(self) -> list[StateInfo]:
        return [StateInfo(s.id, s.parent, s.label, s.created, s.id == self.current, s.fs_checkpoint,
                          dict(s.processes), s.critical_ms)
                for s in sorted(self._states.values(), key=lambda s: s.id)]

    def diff(self, a: int, b: int | None = None) -> deltafs.Diff:
        """Files added, modified and deleted between two states (b: live)."""
        self._require_open()
        fa, fb = self._state(a).fs_checkpoint, None if b is None else self._state(b).fs_checkpoint
        with self._api("diff"):
            return self.fs.diff(fa, fb)

    def drop(self, state: int) -> None:
        """Forget a state: its filesystem checkpoint is dropped; its process
        templates go when the process checkpointers evict them."""
        self._require_open()
        st = self._state(state)
        with self._api(f"drop of state {state}"):
            self.fs.drop(st.fs_checkpoint)
        del self._states[st.id]
        for s in list(self._states.values()):
            if s.parent == st.id:
                self._states[s.id] = StateInfo(s.id, st.parent, s.label, s.created, s.current,
                                               s.fs_checkpoint, s.processes, s.critical_ms)
        if self.current == st.id:
            self.current = st.parent

    def wait_background(self, timeout: float | None = 60.0) -> None:
        """Wait until every state so far is fully written: memory deltas and
        the files' layers on disk."""
        with self._api("wait for the background writes"):
            for p in self.procs.values():
                p._cr.wait_background(timeout)
            self.fs.sync()

    # -- lifetime --------------------------------------------------------------

    def _require_open(self) -> None:
        if self.closed:
            raise SandboxStopped("this sandbox was stopped: create a new one")

    def _files_dead(self, e: deltafs.DeltaFSError) -> bool:
        """Did ``e`` come from the DeltaFS daemon behind the mount dying?
        (Its pid, not a stat of the mount: a stat of a mount whose daemon
        hangs would hang too.)"""
        if self.fs.pid is None:
            return is_dead(self.root)
        # a daemon that hung up is often still dying
        deadline = time.monotonic() + (1.0 if isinstance(e, deltafs.DaemonError) else 0.0)
        while True:
            st = _proc.stat(self.fs.pid)
            if st is None or st.state in "ZX":
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    @contextmanager
    def _api(self, doing: str) -> Iterator[None]:
        """The API boundary: what DeltaFS and DeltaCR raise leaves as a
        DeltaBoxError (theirs is the ``__cause__``): their advice -- mount
        again with the same store, call resume() -- names steps a sandbox
        user cannot take, or that the sandbox took already."""
        try:
            yield
        except deltafs.DeltaFSError as e:
            if self._files_dead(e):
                raise FilesUnavailable(
                    f"the {doing} failed: the sandbox's files at {self.root} cannot be reached, their "
                    "DeltaFS daemon died; nothing more can be checkpointed or rolled back: stop the sandbox "
                    "(close(), or `deltabox stop NAME`) and create a new one") from e
            raise DeltaBoxError(f"the {doing} failed in the sandbox's files ({e})") from e
        except deltacr.DeltaCRError as e:
            raise ProcessError(f"the {doing} failed in one of the sandbox's processes ({e})") from e

    def close(self) -> None:
        """End every process this sandbox started, drop their templates and
        unmount. Idempotent; runs every step even if one fails."""
        if self.closed:
            return
        self.closed = True
        errors: list[str] = []
        # Stopped first, so that they start nothing more while what they
        # started is killed (a killed parent's children come to us: again).
        for p in self.procs.values():
            if p.alive:
                try:
                    p._cr.stop()
                except deltacr.DeltaCRError:
                    pass
        for _round in range(10):
            left = self._descendants()
            if not left:
                break
            self._kill(left)
            time.sleep(0.005)
        # Every process of the sandbox (DeltaCR's are stopped, and fork no
        # more), to reap those that end as our zombies: a template's or a
        # restored process's parent dies with it, and its orphans come to
        # us (a subreaper) once nobody else is left to wait for them.
        everyone = self._members()
        for p in self.procs.values():
            try:
                p._cr.close(kill_live=True)
            except Exception as e:  # noqa: BLE001 - keep cleaning up
                errors.append(f"{p.name}: {e}")
            try:
                p._popen.kill()
            except ProcessLookupError:
                pass
            try:
                p._popen.wait(timeout=5)
            except (subprocess.TimeoutExpired, ChildProcessError):
                pass
            for f in (p.stdin, p.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            os.close(p._stdin_reader)
        self._reap_killed(wait=5.0)
        if self._group is not None and not self._group.remove():
            errors.append(f"processes of the sandbox outlived SIGKILL (in {self._group.path})")
        _reap_ours(everyone, self._group)
        try:
            self.fs.unmount(lazy=True)  # everything it started is ended: nothing to wait for
        except deltafs.DeltaFSError as e:
            # its daemon died (or hangs): detaching the mount is all there is
            # to do, and that is not the caller's failure
            deltafs.force_unmount(self.root)
            if top_mount(canonical(self.root)) is not None:
                errors.append(f"the mount {self.root} stays ({e}): detach it with `umount -l {self.root}`")
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise DeltaBoxError("stopping the sandbox: " + "; ".join(errors))

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
