"""The sandbox: one DeltaFS mount plus the processes working in it, with one
atomic checkpoint and rollback for both.

Checkpoint, the critical path: stop every live process (ptrace), freeze the
filesystem layer (every write a stopped process issued has been answered by
the FUSE daemon, so it is in the layer), fork a template of every process,
resume them. The memory deltas are written afterwards by DeltaCR's
background threads.

Rollback: stop every live process, drain what they left in their output
pipes (it belongs to the abandoned branch), switch the filesystem, then
restore each process that existed in the target state from its checkpoint
and end every process that did not exist then. A process that exited after
the target state comes back. If the filesystem switch fails nothing has
changed; if a process cannot be restored after the switch, it is ended and
the error says so: the sandbox is then in the target state without that
process, never a mix of two states.
"""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

import deltacr
import deltafs

from .errors import DeltaBoxError, NameInUse, RollbackFailed, SandboxStopped, UnknownState


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
    stop_ms: float  # stopping every process
    freeze_ms: float  # the filesystem checkpoint and the templates' forks, side by side
    resume_ms: float


@dataclass
class RollbackReport:
    id: int
    ms: float
    fs_ms: float
    pids: dict[str, int | None]  # name -> live pid after the rollback (None: not running)
    paths: dict[str, str] = field(default_factory=dict)  # name -> "fast" | "slow"


def read_until(fd: int, buf: bytes, marker: bytes | str, timeout: float,
               name: str = "process") -> tuple[bytes, bytes]:
    """Read ``fd`` until ``buf`` holds ``marker``: returns (everything up to
    and including it, the rest)."""
    if isinstance(marker, str):
        marker = marker.encode()
    deadline = time.monotonic() + timeout
    while marker not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{name}: no {marker!r} within {timeout} s; got {buf[-300:]!r}")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError(f"{name}: output closed before {marker!r}; got {buf[-300:]!r}")
            buf += chunk
    i = buf.index(marker) + len(marker)
    return buf[:i], buf[i:]


class Proc:
    """A process started in the sandbox. Its pipes stay the caller's across
    rollbacks; ``pid`` follows the live process (a rollback gives a new one)."""

    def __init__(self, name: str, argv: list[str], popen: subprocess.Popen[bytes],
                 cr: deltacr.ProcessCheckpointer) -> None:
        self.name = name
        self.argv = argv
        self._popen = popen
        self._cr = cr
        assert popen.stdin is not None and popen.stdout is not None
        self.stdin: IO[bytes] = popen.stdin
        self.stdout: IO[bytes] = popen.stdout
        self._buf = b""

    @property
    def pid(self) -> int | None:
        return self._cr.live_pid if self.alive else None

    @property
    def alive(self) -> bool:
        return self._cr.state in ("running", "stopped")

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.stdin.write(data)
        self.stdin.flush()

    def expect(self, marker: bytes | str, timeout: float = 30.0) -> bytes:
        """Read the output up to and including ``marker``; returns it."""
        out, self._buf = read_until(self.stdout.fileno(), self._buf, marker, timeout, self.name)
        return out

    def _drain(self) -> None:
        """Throw away output nobody read yet: it came from a discarded branch."""
        self._buf = b""
        fd = self.stdout.fileno()
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
        try:
            while True:
                try:
                    if not os.read(fd, 65536):
                        break
                except BlockingIOError:
                    break
        finally:
            fcntl.fcntl(fd, fcntl.F_SETFL, fl)


class Sandbox:
    """A DeltaFS mount over ``base`` plus the processes started in it.

    Use as a context manager: leaving it ends every process it started and
    unmounts, also on error. ``workdir`` holds the mount point and the stores
    (default: a fresh temporary directory, removed on close).
    ``max_templates`` bounds the frozen process copies kept per process
    (copy-on-write: each costs the pages its process changed since); a state
    whose template was evicted restores through DeltaCR's slow path. 128
    covers a search of 100 expansions without eviction."""

    def __init__(self, base: str, *, workdir: str | None = None, max_templates: int = 128,
                 options: tuple[str, ...] = ()) -> None:
        if not os.path.isdir(base):
            raise DeltaBoxError(f"the base {base} is not a directory: give the repository to work on")
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="deltabox-")
        self.root = os.path.join(self.workdir, "root")
        self.store = os.path.join(self.workdir, "store")
        os.makedirs(self.root, exist_ok=True)
        os.makedirs(self.store, exist_ok=True)
        self.max_templates = max_templates
        self.procs: dict[str, Proc] = {}
        self._states: dict[int, StateInfo] = {}
        self.current: int | None = None
        self._next_id = 1
        self.closed = False
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="deltabox")
        self.fs = deltafs.mount(self.root, base=base, store=os.path.join(self.store, "fs"),
                                options=options)

    # -- processes -------------------------------------------------------------

    def spawn(self, argv: list[str], name: str | None = None, cwd: str = ".",
              env: dict[str, str] | None = None) -> Proc:
        """Start ``argv`` with its cwd inside the sandbox, stdin/stdout as
        pipes (stderr joins stdout), and start tracing it."""
        self._require_open()
        name = name or f"{os.path.basename(argv[0])}-{len(self.procs) + 1}"
        if name in self.procs:
            raise NameInUse(f"a process named {name!r} already runs in this sandbox: pick another name")
        popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, cwd=os.path.join(self.root, cwd),
                                 env=env, start_new_session=True)
        try:
            cr = deltacr.ProcessCheckpointer(popen.pid, os.path.join(self.store, "procs", name),
                                             max_templates=self.max_templates, reap_orphans=True)
        except BaseException:
            popen.kill()
            popen.wait()
            raise
        proc = Proc(name, list(argv), popen, cr)
        self.procs[name] = proc
        return proc

    # -- states ----------------------------------------------------------------

    def _all(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        """``fn`` on every item at once (each process has its own tracer
        thread, so their ptrace work overlaps); returns results or the
        exceptions raised, in order."""
        def call(x: Any) -> Any:
            try:
                return fn(x)
            except Exception as e:  # noqa: BLE001 - returned to the caller
                return e
        if len(items) <= 1:
            return [call(x) for x in items]
        return list(self._pool.map(call, items))

    def checkpoint(self, label: str = "") -> CheckpointReport:
        """One state for the files and every live process, atomically."""
        self._require_open()
        t0 = time.perf_counter()
        live = [p for p in self.procs.values() if p.alive]
        stopped: list[Proc] = []
        errors: list[Exception] = []
        for p, r in zip(live, self._all(lambda p: p._cr.stop(), live)):
            if isinstance(r, deltacr.ProcessGone):
                continue  # it exited just now: not part of this state
            if isinstance(r, Exception):
                errors.append(r)
            else:
                stopped.append(p)
        t_stop = time.perf_counter()
        try:
            if errors:
                raise errors[0]
            # Everything is stopped: freezing the files and forking the
            # templates touch disjoint things, so they run side by side.
            jobs: list[Any] = [None, *stopped]
            res = self._all(lambda p: self.fs.checkpoint(label) if p is None
                            else p._cr.capture(label), jobs)
            for r in res:
                if isinstance(r, Exception):
                    raise r
            fs_id = int(res[0])
            caps = {p.name: int(r) for p, r in zip(stopped, res[1:])}
            t_cap = time.perf_counter()
        finally:
            self._all(lambda p: p._cr.resume() if p.alive else None, stopped)
            t_res = time.perf_counter()
        sid = self._next_id
        self._next_id += 1
        crit = (t_res - t0) * 1e3
        self._states[sid] = StateInfo(sid, self.current, label, time.time(), False, fs_id, caps, crit)
        self.current = sid
        return CheckpointReport(sid, crit, (t_stop - t0) * 1e3, (t_cap - t_stop) * 1e3,
                                (t_res - t_cap) * 1e3)

    def rollback(self, state: int) -> RollbackReport:
        """Files and processes exactly as they were in ``state``."""
        self._require_open()
        st = self._state(state)
        t0 = time.perf_counter()
        # Processes that did not exist in that state end first, while still
        # running (a stopped tracee's death goes unnoticed until resumed);
        # whatever they write now lands in the layer being discarded.
        for p in self.procs.values():
            if p.name not in st.processes:
                self._end(p)
        alive = [p for p in self.procs.values() if p.alive]
        stopped = [p for p, r in zip(alive, self._all(lambda p: p._cr.stop(), alive))
                   if not isinstance(r, Exception)]
        for p in self.procs.values():
            p._drain()
        try:
            self.fs.rollback(st.fs_checkpoint)
        except deltafs.DeltaFSError as e:
            for p in stopped:
                p._cr.resume()
            raise RollbackFailed(f"the files could not be rolled back to state {state} ({e}); "
                                 "nothing changed") from e
        t_fs = time.perf_counter()
        pids: dict[str, int | None] = {}
        paths: dict[str, str] = {}
        failed: list[str] = []
        back = [p for p in self.procs.values() if p.name in st.processes]
        for p in self.procs.values():
            pids.setdefault(p.name, None)  # ended above unless restored below
        for p, r in zip(back, self._all(lambda p: p._cr.rollback(st.processes[p.name]), back)):
            if isinstance(r, Exception):
                self._end(p, stopped=True)
                failed.append(f"{p.name}: {r}")
            else:
                pids[p.name], paths[p.name] = r.pid, r.path
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
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
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
        return self.fs.diff(self._state(a).fs_checkpoint,
                            None if b is None else self._state(b).fs_checkpoint)

    def drop(self, state: int) -> None:
        """Forget a state: its filesystem checkpoint is dropped; its process
        templates go when the process checkpointers evict them."""
        self._require_open()
        st = self._state(state)
        self.fs.drop(st.fs_checkpoint)
        del self._states[st.id]
        for s in list(self._states.values()):
            if s.parent == st.id:
                self._states[s.id] = StateInfo(s.id, st.parent, s.label, s.created, s.current,
                                               s.fs_checkpoint, s.processes, s.critical_ms)
        if self.current == st.id:
            self.current = st.parent

    def wait_background(self, timeout: float | None = 60.0) -> None:
        for p in self.procs.values():
            p._cr.wait_background(timeout)

    # -- lifetime --------------------------------------------------------------

    def _require_open(self) -> None:
        if self.closed:
            raise SandboxStopped("this sandbox was stopped: create a new one")

    def close(self) -> None:
        """End every process this sandbox started, drop their templates and
        unmount. Idempotent; runs every step even if one fails."""
        if self.closed:
            return
        self.closed = True
        errors: list[str] = []
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
        try:
            self.fs.unmount()
        except deltafs.DeltaFSError as e:
            errors.append(f"unmount: {e}")
            deltafs.force_unmount(self.root)
        self._pool.shutdown(wait=False)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise DeltaBoxError("stopping the sandbox: " + "; ".join(errors))

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
