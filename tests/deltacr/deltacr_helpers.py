"""Helpers for deltacr tests: real processes, one teardown path.

Targets are started through a *nursery*: a small subreaper process that double
forks the target (so the target is not a child of the test, like a process
someone else started) and reaps every orphan of its tree. Teardown, in one
place: close every checkpointer / detach every daemon, then SIGTERM the
nurseries (they kill their process group and reap it), then SIGKILL whatever
is left of their groups, then reap our own zombies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from deltacr import _sys
from deltacr.client import Client
from deltacr.procfs import zombie_children
from deltacr.tracer import ProcessCheckpointer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NURSERY = r"""
import os, signal, sys, ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(36, 1, 0, 0, 0)                       # PR_SET_CHILD_SUBREAPER
r, w = os.pipe()
mid = os.fork()
if mid == 0:                                      # intermediate: fork the target, exit
    pid = os.fork()
    if pid == 0:
        os.close(r); os.close(w)
        err = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(err, 2)
        os.execvp(sys.argv[2], sys.argv[2:])
    os.write(w, b"%d\n" % pid)
    os._exit(0)
os.close(w)
target = int(os.read(r, 64))
os.close(r)
os.waitpid(mid, 0)
sys.stderr.write("%d\n" % target); sys.stderr.flush()
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
stopping = False
def term(*_):
    global stopping
    stopping = True
    me = os.getpid()
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            try:
                if os.getpgid(int(name)) == me:
                    os.kill(int(name), signal.SIGKILL)
            except OSError:
                pass
signal.signal(signal.SIGTERM, term)
while True:
    try:
        os.wait()
    except ChildProcessError:
        if stopping:
            break
        time.sleep(0.05)
        try:
            os.kill(target, 0)
        except ProcessLookupError:
            pass
    except InterruptedError:
        pass
"""


@dataclass
class Target:
    """A process under test, talked to over pipes (they survive rollbacks)."""

    nursery: subprocess.Popen  # type: ignore[type-arg]
    pid: int
    stdin: Any
    stdout: Any
    errlog: str = ""
    marker: int = 0
    pending: bytes = b""

    def stderr_text(self) -> str:
        with open(self.errlog, errors="replace") as f:
            return f.read().replace(">>> ", "").replace("... ", "")

    def send(self, text: str) -> None:
        self.stdin.write(text.encode())
        self.stdin.flush()

    def _readline(self, deadline: float) -> str:
        """One line from the raw pipe, without blocking past the deadline (a
        stuck process must fail the test, not hang it: templates keep the pipe
        open, so there is no EOF when the process dies)."""
        import select
        fd = self.stdout.fileno()
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"no answer from pid {self.pid}; "
                                   f"got {self.pending!r}; stderr: {self.stderr_text()[-2000:]}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError(f"pid {self.pid}'s stdout closed; got {self.pending!r}; "
                               f"stderr: {self.stderr_text()[-2000:]}")
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return line.decode(errors="replace")

    def _until(self, mark: str, timeout: float = 20.0) -> str:
        out = []
        deadline = time.monotonic() + timeout
        while True:
            line = self._readline(deadline)
            if line == mark:
                return "\n".join(out)
            out.append(line)


class Repl(Target):
    def run(self, code: str) -> str:
        """Run code (single-line statements) in the REPL; returns what it printed."""
        self.marker += 1
        mark = f"@@{self.marker}@@"
        self.send(code + f"\nprint({mark!r})\n")
        return self._until(mark)

    def eval(self, expr: str) -> Any:
        out = self.run(f"print(repr(({expr})))")
        if not out:
            raise AssertionError(f"REPL printed nothing for {expr!r}; stderr: {self.stderr_text()[-2000:]}")
        return eval(out)  # noqa: S307 - our own REPL's repr


class Shell(Target):
    def run(self, cmd: str) -> str:
        self.marker += 1
        mark = f"@@{self.marker}@@"
        self.send(cmd + f"\necho '{mark}'\n")
        return self._until(mark)


@dataclass
class Lab:
    """Everything a test started; torn down in one place."""

    nurseries: list[subprocess.Popen] = field(default_factory=list)  # type: ignore[type-arg]
    checkpointers: list[ProcessCheckpointer] = field(default_factory=list)
    daemons: list[int] = field(default_factory=list)  # session pids attached through the CLI/daemon
    daemon_pids: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)  # every pid spawned
    logs: list[str] = field(default_factory=list)

    def spawn(self, argv: list[str], kind: type[Target] = Target) -> Any:
        import tempfile
        errlog = tempfile.NamedTemporaryFile(prefix="deltacr-target-", suffix=".err", delete=False).name
        self.logs.append(errlog)
        p = subprocess.Popen([sys.executable, "-c", NURSERY, errlog, *argv], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.nurseries.append(p)
        assert p.stderr is not None
        pid = int(p.stderr.readline())
        self.targets.append(pid)
        return kind(p, pid, p.stdin, p.stdout, errlog=errlog)

    def repl(self, setup: str = "") -> Repl:
        r: Repl = self.spawn([sys.executable, "-i", "-u", "-q", "-S"], Repl)
        r.run("import os, sys, mmap, signal")
        if setup:
            r.run(setup)
        return r

    def shell(self) -> Shell:
        return self.spawn(["bash", "--norc", "--noprofile"], Shell)  # type: ignore[no-any-return]

    def checkpointer(self, pid: int, store: str, **kw: Any) -> ProcessCheckpointer:
        cp = ProcessCheckpointer(pid, store, **kw)
        self.checkpointers.append(cp)
        return cp

    def teardown(self) -> None:
        for cp in self.checkpointers:
            try:
                cp.close(kill_live=True)
            except Exception:  # noqa: BLE001 - keep tearing down
                pass
        for pid in self.daemons:
            try:
                st = Client(pid, timeout=10).status()
                self.daemon_pids.append(st["daemon_pid"])
                Client(pid, timeout=10).detach()
            except Exception:  # noqa: BLE001
                pass
        for dpid in self.daemon_pids + _daemons_for(self.daemons + self.targets):
            _wait_gone(dpid, 5.0, kill=True)
        for p in self.nurseries:
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=10)
            except Exception:  # noqa: BLE001
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            for f in (p.stdin, p.stdout, p.stderr):
                try:
                    if f:
                        f.close()
                except OSError:
                    pass
        reap_zombies()
        for log in self.logs:
            try:
                os.unlink(log)
            except FileNotFoundError:
                pass


def _daemons_for(targets: list[int]) -> list[int]:
    """Daemon processes still running for these session pids (whatever
    happened to the sessions): the last line of defence against a leak."""
    want = {str(t) for t in targets}
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any("deltacr.daemon" in a for a in argv) and "--pid" in argv:
            i = argv.index("--pid")
            if i + 1 < len(argv) and argv[i + 1] in want:
                found.append(int(name))
    return found


def _wait_gone(pid: int, timeout: float, kill: bool) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap_zombies()
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.02)
    if kill:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def reap_zombies() -> None:
    for z in zombie_children(os.getpid()):
        try:
            os.waitpid(z, os.WNOHANG)
        except ChildProcessError:
            pass


def zombies_of(parents: set[int]) -> list[int]:
    """Zombies whose parent is one of ``parents``."""
    out = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] == "Z" and int(fields[1]) in parents:
            out.append(int(name))
    return out


def is_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):  # gone, or reaped while we read
        return False


def tracer_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


def memory_image(pid: int) -> dict[tuple[int, int, str], bytes]:
    """Content of every private mapping of a stopped process, keyed by page range
    and permissions (vdso/vvar excluded): what 'bit-identical' compares."""
    from deltacr.procfs import read_maps
    out: dict[tuple[int, int, str], bytes] = {}
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for v in read_maps(pid):
            if v.special or not v.private:
                continue
            mem.seek(v.start)
            out[(v.start, v.end, v.perms)] = mem.read(v.end - v.start)
    return out


# libc's mmap/munmap in a REPL: to place memory at an address of the test's choosing
LIBC_SETUP = ("import ctypes; libc = ctypes.CDLL(None, use_errno=True); libc.mmap.restype = ctypes.c_void_p; "
              "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, "
              "ctypes.c_int, ctypes.c_long]; libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]; "
              "RW = 3; FLAGS = 0x02 | 0x20; SHARED = 0x01; NOREPLACE = 0x100000")  # MAP_PRIVATE | MAP_ANONYMOUS

RSEQ_SETUP = ("import ctypes; _libc = ctypes.CDLL(None); _libc.pthread_self.restype = ctypes.c_void_p; "
              "RSEQ = _libc.pthread_self() + ctypes.c_long.in_dll(_libc, '__rseq_offset').value")


def flatten(image: dict[tuple[int, int, str], bytes], rseq: int = 0) -> dict[int, tuple[str, bytes]]:
    """Per page: (perms, content), so that vma splits/merges do not matter.

    The 32-byte rseq area at ``rseq`` is blanked: the kernel rewrites its cpu
    fields whenever the thread returns to user mode (even for one injected
    instruction), so it is not part of the state a checkpoint can freeze.
    """
    ps = _sys.PAGE_SIZE
    out = {}
    for (s, e, perms), data in image.items():
        for off in range(0, e - s, ps):
            page = data[off:off + ps]
            a = s + off
            if rseq and a <= rseq < a + ps:
                i = rseq - a
                page = page[:i] + bytes(32) + page[i + 32:]
            out[a] = (perms[:3], page)
    return out
