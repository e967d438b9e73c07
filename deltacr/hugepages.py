"""Keep the live process's private memory in huge folios, so that forking its
templates costs less.

A template checkpoint is a ``fork()``, and fork copies the page-table entry of
every private page the process has touched: that copy is most of a
checkpoint's critical path (2-4 ms for a 55 MB SymPy REPL). For pages of a
*large* folio the kernel copies the entries of the whole folio as one batch
(one reference-count update instead of one per page), and it goes on doing so
after copy-on-write has broken a 2 MiB mapping into 4 KiB entries: the folio
stays large while any of its pages is mapped. Measured on our machines (a
throwaway script, a SymPy REPL forking 20 times with its children alive and
work between the forks): ``os.fork()`` 2.0 -> 1.3 ms p50 once its heap was
collapsed into huge pages, and after 100 forks still 2.3-2.6 against 3.6-3.8
ms.

The :class:`HugePageKeeper` thread collapses (``MADV_COLLAPSE`` through
``process_madvise``: from outside, while the process runs, nothing injected)
each 2 MiB-aligned range of the live process's private anonymous memory whose
pages are populated (at least 7/8 of them, the others never touched) and
*exclusive* (pagemap bit 56: mapped by no template). An exclusive page was
written after the process's last fork, so it belongs to the next delta
anyway: a collapse adds nothing to a delta and copies nothing a template
still shares. Memory that is shared with a template stays as it is until the
process writes it again. Ranges under uffd-wp tracking collapse only once all
their pages were written (the kernel refuses otherwise), which again adds
nothing. A process that asked for no huge pages (``MADV_NOHUGEPAGE``) gets
none: the kernel refuses those ranges (EINVAL; not retried until the process
forks again); a range refused for want of a free huge page or because it was
busy is retried at the next pass. ``MADV_COLLAPSE`` ignores the system's THP
setting, so the checkpointer starts no keeper where it is ``never`` (see
``deltacr check``).

When: never while a command runs, a caller is on a critical path or the
process is stopped; a pass after attach, whenever the process's resident
memory has grown by 2 MiB since the last pass, and every few seconds
besides. A pass stops as soon as the process forks (its candidates are shared
from then on) and is made again. The kernel may compact memory
to find a huge page (0.7-8 ms of CPU per range measured here): that is
background CPU, like writing deltas. ``wait()`` returns once no pass is due.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

from . import _sys
from .procfs import Vma, read_maps


def _pmd_size() -> int:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 << 20


HUGE = _pmd_size()
PAGES = HUGE // _sys.PAGE_SIZE
MIN_PRESENT = PAGES * 7 // 8  # a collapse fills the holes: cap what it may add
PRESENT_EXCLUSIVE = 0x81  # top byte of a pagemap entry: bit 63 present, bit 56 exclusively mapped
POLL = 0.05  # s between looks at the process's resident memory
READ_RANGES = 64  # huge-page ranges of pagemap read at a time (256 KiB): a big reservation is read in pieces
PERIOD = 3.0  # s: a pass even without growth (memory rewritten in place becomes exclusive again)


def collapsible(v: Vma) -> bool:
    """Private, writable, anonymous memory (the heap included, the stack not)."""
    return v.private and v.writable and (v.path == "" or v.path == "[heap]")


def _huge_already(pagemap_fd: int, start: int, end: int) -> set[int]:
    """Ranges in [start, end) that one huge page already maps."""
    try:
        regions = _sys.pagemap_scan(pagemap_fd, start, end, flags=0, category_mask=_sys.PAGE_IS_HUGE,
                                    return_mask=_sys.PAGE_IS_HUGE)
    except OSError:  # no PAGEMAP_SCAN (Linux < 6.7): collapsing a huge page again is a quick no-op
        return set()
    return {a for s, e, _ in regions for a in range(-(-s // HUGE) * HUGE, e - HUGE + 1, HUGE)}


def candidates(pid: int, vmas: list[Vma]) -> list[int]:
    """Start addresses of the huge-page ranges worth collapsing in pid (see the
    module docstring). Reads /proc/PID/pagemap."""
    out: list[int] = []
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pm:
        for v in vmas:
            if not collapsible(v):
                continue
            start = -(-v.start // HUGE) * HUGE
            end = v.end // HUGE * HUGE
            if end <= start:
                continue
            huge = _huge_already(pm.fileno(), start, end)
            for piece in range(start, end, READ_RANGES * HUGE):
                n = min(end - piece, READ_RANGES * HUGE) // _sys.PAGE_SIZE
                flags = os.pread(pm.fileno(), n * 8, piece // _sys.PAGE_SIZE * 8)[7::8]  # each entry's top byte
                for i in range(0, len(flags) - PAGES + 1, PAGES):
                    chunk = flags[i:i + PAGES]
                    good = chunk.count(PRESENT_EXCLUSIVE)
                    at = piece + i * _sys.PAGE_SIZE
                    if good >= MIN_PRESENT and good + chunk.count(0) == PAGES and at not in huge:
                        out.append(at)
    return out


def anon_resident(pid: int) -> int:
    """Resident bytes not backed by a file (statm: resident - shared)."""
    with open(f"/proc/{pid}/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * _sys.PAGE_SIZE


@dataclass
class KeeperStats:
    passes: int = 0
    collapsed: int = 0  # huge pages made
    refused: int = 0  # collapses the kernel refused (busy, no huge page free, opted out)
    disabled: str | None = None  # why the keeper stopped for good


class HugePageKeeper(threading.Thread):
    """The keeper of one traced process. ``live_pid()`` names the process to
    work on (None: none runs); ``quiet()`` says whether the tracer is idle
    enough for background work. ``forget()`` after every fork of the live
    process (its memory is then shared with a template)."""

    def __init__(self, name: str, live_pid: Callable[[], int | None], quiet: Callable[[], bool]) -> None:
        super().__init__(name=name, daemon=True)
        self._live_pid = live_pid
        self._quiet = quiet
        self._wake = threading.Event()
        self._cv = threading.Condition()
        self._asked = 0  # wait() calls made ...
        self._answered = 0  # ... and how many of them a finished pass (or no process) has answered
        self._closing = False
        self._due = True  # growth or time call for a pass; the first comes right after attach
        self._epoch = 0
        self._refused: set[int] = set()  # ranges the kernel refused since the last fork (in _refused_epoch)
        self._refused_epoch = 0
        self._resident_at_pass = 0
        self._last_pass = 0.0
        self.stats = KeeperStats()

    def forget(self) -> None:
        self._epoch += 1

    def wait(self, timeout: float = 30.0) -> bool:
        """Until a pass made after this call is over (memory rewritten in
        place is collapsed by then too), or the timeout: False."""
        with self._cv:
            self._asked += 1
            want = self._asked
            self._wake.set()
            return self._cv.wait_for(lambda: self._answered >= want, timeout)

    def _settle(self, asked: int) -> None:
        with self._cv:
            self._answered = max(self._answered, asked)
            self._cv.notify_all()

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=10)

    def run(self) -> None:
        try:
            while not self._closing:
                self._wake.wait(POLL)
                self._wake.clear()
                with self._cv:
                    asked = self._asked  # answered by the pass that starts now, not by one under way
                pid = self._live_pid()
                if self._closing:
                    break
                if pid is None or self.stats.disabled:
                    self._due = False
                    self._settle(asked)
                    continue
                try:
                    resident = anon_resident(pid)
                except (OSError, ValueError, IndexError):
                    self._settle(asked)  # gone: nothing to do until there is a new live process
                    continue
                if resident - self._resident_at_pass >= HUGE or time.monotonic() - self._last_pass >= PERIOD:
                    self._due = True
                if (self._due or asked > self._answered) and self._quiet() and self._pass(pid):
                    self._due = False
                    self._last_pass = time.monotonic()
                    self._resident_at_pass = resident
                    self._settle(asked)
        except Exception as e:  # noqa: BLE001 - a bug here must not go unseen, nor stop checkpoints
            self.stats.disabled = f"the huge-page keeper failed: {e!r}"
        finally:
            self._settle(1 << 62)  # nobody waits for a keeper that has stopped

    def _pass(self, pid: int) -> bool:
        """One pass over pid's memory; False if it stopped for a command (or a
        fork) and must be made again."""
        epoch = self._epoch  # a fork after this makes the candidates shared: stop then
        try:
            pidfd = _sys.pidfd_open(pid)
        except OSError:
            return True
        try:
            try:
                todo = candidates(pid, read_maps(pid))
            except OSError:  # it exited
                return True
            self.stats.passes += 1
            if self._refused_epoch != epoch:
                self._refused, self._refused_epoch = set(), epoch
            refused = self._refused
            for start in todo:
                if start in refused:
                    continue
                live = self._live_pid()
                if live is not None and live != pid:  # replaced by a rollback: its memory is gone
                    return True
                if live is None or self._closing or not self._quiet() or self._epoch != epoch:
                    return False
                try:
                    _sys.process_madvise(pidfd, start, HUGE, _sys.MADV_COLLAPSE)
                    self.stats.collapsed += 1
                except OSError as e:
                    if e.errno == errno.ESRCH:
                        return True
                    if e.errno in (errno.EPERM, errno.ENOSYS):  # `deltacr check` would have said so
                        self.stats.disabled = (f"the kernel refuses MADV_COLLAPSE through process_madvise "
                                               f"({os.strerror(e.errno)}): templates fork 4 KiB pages")
                        return True
                    self.stats.refused += 1
                    if e.errno == errno.EINVAL:  # not allowed there (an opt-out): not again before a fork
                        refused.add(start)
                    # else busy or no huge page free now (EAGAIN, ENOMEM, EBUSY): the next pass retries
            return True
        finally:
            os.close(pidfd)
