"""Dirty-page tracking backends: which pages did the process write since the
previous checkpoint?

* ``uffd-wp`` (default where the kernel has it, Linux >= 6.7): a userfaultfd
  created *inside* the target by an injected syscall (close-on-exec, at a high
  fd number), taken by the tracer with ``pidfd_getfd``, every private writable
  mapping registered for async write-protect. ``PAGEMAP_SCAN`` with
  ``PM_SCAN_WP_MATCHING`` returns the written ranges and write-protects them
  again atomically, while the process is stopped. Memory that is not
  registered (a new, moved, grown or re-created mapping) shows up in a second
  scan for pages without ``PAGE_IS_WPALLOWED``; it is then registered and
  counted wholly dirty once. A process forked from a template has no
  registration (fork drops it): a rollback re-arms tracking with a new
  userfaultfd.
* ``soft-dirty``: pagemap bit 55 and ``clear_refs``; only where the kernel has
  CONFIG_MEM_SOFT_DIRTY (not on our x86_64 machines, never on arm64).
* ``pfn``: no tracking at all while the process runs: the frozen templates
  of two checkpoints are compared frame by frame in the background (see
  :class:`PfnTracker`). Cheapest critical path and rollback; needs root.
* ``compare``: no kernel help; the background writer hashes every page of the
  frozen template and compares with the parent checkpoint's hashes. Works
  everywhere, costs a full read of the process memory per checkpoint (off the
  critical path).

Known limit of uffd-wp: an anonymous page dropped with MADV_DONTNEED and never
written again is not reported (the kernel drops its marker). Only the slow
path can be affected (the fast path forks the exact template).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Callable, Protocol

from . import _sys
from .procfs import Vma, nofile_limit

RunSyscall = Callable[..., int]  # run(nr, *args) -> signed result, in the stopped tracee


def tracked(v: Vma) -> bool:
    """Mappings whose content a checkpoint owns: private, writable, not vdso/vvar."""
    return v.private and v.writable and not v.special


@dataclass
class DirtySet:
    """Written ranges [start, end) since the previous collect; None = unknown:
    the background writer finds them by comparing page frames with the parent's
    template (``by_pfn``) or page contents with the parent's hashes."""

    ranges: list[tuple[int, int]] | None = field(default_factory=list)
    by_pfn: bool = False


class DirtyTracker(Protocol):
    name: str
    prepares: bool  # prepare() arms something in a spare (setup() costs on a critical path)

    def setup(self, pid: int, run: RunSyscall, get_vmas: Callable[[], list[Vma]]) -> None:
        """(Re)arm tracking of a stopped process; all its pages count clean after.
        ``get_vmas()`` gives its mappings (only called when needed)."""

    def collect(self, pid: int, run: RunSyscall, get_vmas: Callable[[], list[Vma]]) -> DirtySet:
        """While the process is stopped: ranges written since the last collect/setup.
        ``get_vmas()`` reads /proc/PID/maps (only called when needed)."""

    def give_back(self, dirty: DirtySet) -> None:
        """A collect whose checkpoint was not taken after all (the fork
        failed, the process turned out multi-threaded): its ranges count
        written again, so that the next collect still returns them."""

    def teardown(self, pid: int | None, run: RunSyscall | None) -> None:
        """Release kernel resources (and the fd inside the process if it is stopped)."""

    def prepare(self, pid: int, run: RunSyscall, get_vmas: Callable[[], list[Vma]]) -> object | None:
        """Arm tracking ahead of time in a stopped process that is not tracked
        yet (a template's spare); ``adopt()`` switches to it when it becomes the
        live process. What it returns holds no resource of ours: an unused one
        is simply dropped. None: nothing worth preparing (``setup()`` is cheap
        for this backend)."""

    def adopt(self, prepared: object) -> None:
        """Track the process ``prepared`` was made for; its pages count clean."""


class _NothingToPrepare:
    prepares = False

    def give_back(self, dirty: DirtySet) -> None:
        return None  # collect() changed nothing

    def prepare(self, pid: int, run: RunSyscall, get_vmas: Callable[[], list[Vma]]) -> object | None:
        return None

    def adopt(self, prepared: object) -> None:
        return None


class CompareTracker(_NothingToPrepare):
    """Content-compare fallback: nothing to do while the process is stopped."""

    name = "compare"

    def setup(self, pid: int, run: RunSyscall, get_vmas: Callable[[], list[Vma]]) -> None:
        return None

    def collect(self, pid: int, run: RunSyscall, get_vmas: Callable[[], list[Vma]]) -> DirtySet:
        return DirtySet(ranges=None)

    def teardown(self, pid: int | None, run: RunSyscall | None) -> None:
        return None


class PfnTracker(_NothingToPrepare):
    """Templates as copy-on-write witnesses: nothing at all on the critical path.

    Right after the injected fork, the template and the process map the very
    same physical pages. A page the process writes later gets a new frame
    (copy on write). So the pages written between checkpoints P and C are
    exactly those whose frame in C's template differs from the frame at the
    same address in P's template -- both frozen, so the background writer
    compares their /proc/PID/pagemap entries at leisure. No userfaultfd, no
    write-protect pass, nothing to re-arm after a rollback (a process forked
    from a template shares its frames). A page dropped with MADV_DONTNEED shows
    up too (frame gone). Needs CAP_SYS_ADMIN (frame numbers are hidden
    otherwise) and the parent's template alive until the delta is written (the
    pool holds it); without it the delta records every page.
    """

    name = "pfn"

    def setup(self, pid: int, run: RunSyscall, get_vmas: Callable[[], list[Vma]]) -> None:
        return None

    def collect(self, pid: int, run: RunSyscall, get_vmas: Callable[[], list[Vma]]) -> DirtySet:
        return DirtySet(ranges=None, by_pfn=True)

    def teardown(self, pid: int | None, run: RunSyscall | None) -> None:
        return None


# pagemap entry bits that identify the page: frame/swap entry (0-54), file/shared (61),
# swapped (62), present (63). Soft-dirty, exclusive and uffd-wp bits differ between
# the processes sharing a frame and are masked out.
PAGEMAP_IDENTITY = ((1 << 55) - 1) | (1 << 61) | (1 << 62) | (1 << 63)


_HELD, _FILE = (1 << 63) | (1 << 62), 1 << 61  # present or swapped; file page (or shared)


def _file_page_now(a: int, b: int) -> bool:
    """B maps a page of the file (a page of a private file mapping that was
    read, never written) where A had no private page: its content is the
    file's, not the process's. The fast path shows the file as it is; a
    delta holding the page would bring back the file as it was (a file
    changed since showed stale). A private page of A, resident or swapped
    out, dropped back to the file (MADV_DONTNEED) still counts as changed."""
    return bool(b & _FILE) and not (a & _HELD and not a & _FILE)


def pfn_changed(pid_a: int, pid_b: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sub-ranges whose pagemap identity differs between two processes.

    Compares 4 KiB blocks of pagemap entries (memcmp), then 256-byte
    sub-blocks, and only then single entries: the Python work follows the
    pages that differ (worst case: one changed page in every 32)."""
    import array
    ps = _sys.PAGE_SIZE
    out: list[tuple[int, int]] = []
    fa = os.open(f"/proc/{pid_a}/pagemap", os.O_RDONLY)
    fb = os.open(f"/proc/{pid_b}/pagemap", os.O_RDONLY)
    block, sub = 512, 32
    try:
        for start, end in ranges:
            pos = start
            while pos < end:
                n = min((end - pos) // ps, 1 << 18)
                off = pos // ps * 8
                ra = os.pread(fa, n * 8, off)
                rb = os.pread(fb, n * 8, off)
                if ra != rb:
                    ea = array.array("Q", ra)
                    eb = array.array("Q", rb)
                    for i in range(0, n, block):
                        if ra[i * 8:(i + block) * 8] == rb[i * 8:(i + block) * 8]:
                            continue
                        for j in range(i, min(n, i + block), sub):
                            if ra[j * 8:(j + sub) * 8] == rb[j * 8:(j + sub) * 8]:
                                continue
                            for k in range(j, min(n, j + sub)):
                                if (ea[k] ^ eb[k]) & PAGEMAP_IDENTITY and not _file_page_now(ea[k], eb[k]):
                                    a = pos + k * ps
                                    if out and out[-1][1] == a:
                                        out[-1] = (out[-1][0], a + ps)
                                    else:
                                        out.append((a, a + ps))
                pos += n * ps
    finally:
        os.close(fa)
        os.close(fb)
    return out


_copy_buffers: dict[int, tuple[bytearray, bytearray]] = {}


def copy_pages(src: int, dst: int, ranges: list[tuple[int, int]]) -> int:
    """Make dst's memory equal src's over ranges; pages that already hold the
    same bytes are not written (a write would break their sharing for nothing).
    Batches of up to 1024 segments move with one process_vm_readv/writev
    each; what process_vm_writev refuses (read-only pages) goes through
    /proc/PID/mem. Returns the bytes written."""
    import threading
    ps = _sys.PAGE_SIZE
    budget = 1 << 22
    bufs = _copy_buffers.get(threading.get_ident())
    if bufs is None:  # fresh buffers cost a page fault per page: keep them per thread
        bufs = _copy_buffers[threading.get_ident()] = (bytearray(budget), bytearray(budget))
    sbuf, dbuf = bufs
    total = 0
    mem = -1
    # split into segments of at most `budget` bytes, then batch them
    segs: list[tuple[int, int]] = []
    for s, e in ranges:
        for a in range(s, e, budget):
            segs.append((a, min(budget, e - a)))
    try:
        i = 0
        while i < len(segs):
            batch: list[tuple[int, int]] = []
            size = 0
            while i < len(segs) and size + segs[i][1] <= budget and len(batch) < _sys.IOV_MAX:
                batch.append(segs[i])
                size += segs[i][1]
                i += 1
            if _sys.process_vm_gather(src, batch, sbuf) != size or _sys.process_vm_gather(dst, batch, dbuf) != size:
                raise OSError(f"short read of pid {src} or {dst} near {batch[0][0]:#x}")
            smv, dmv = memoryview(sbuf), memoryview(dbuf)
            if smv[:size] == dmv[:size]:
                continue
            diff: list[tuple[int, int, int]] = []  # (addr, offset in buffer, length)
            off = 0
            for a, n in batch:
                for p in range(0, n, ps):
                    if smv[off + p:off + p + ps] != dmv[off + p:off + p + ps]:
                        if diff and diff[-1][0] + diff[-1][2] == a + p and diff[-1][1] + diff[-1][2] == off + p:
                            diff[-1] = (diff[-1][0], diff[-1][1], diff[-1][2] + ps)
                        else:
                            diff.append((a + p, off + p, ps))
                off += n
            packed = bytearray(sum(k for _, _, k in diff))
            pos = 0
            for _, o, k in diff:
                packed[pos:pos + k] = smv[o:o + k]
                pos += k
            wrote = _sys.process_vm_gather(dst, [(a, k) for a, _, k in diff], packed, write=True) \
                if packed else 0
            total += wrote
            if wrote < len(packed):  # read-only page: FOLL_FORCE through /proc/PID/mem
                if mem < 0:
                    mem = os.open(f"/proc/{dst}/mem", os.O_RDWR)
                pos = 0
                for a, _, k in diff:
                    if pos + k > wrote:
                        skip = max(0, wrote - pos)
                        done = skip
                        while done < k:
                            done += os.pwrite(mem, memoryview(packed)[pos + done:pos + k], a + done)
                        total += k - skip
                    pos += k
    finally:
        if mem >= 0:
            os.close(mem)
    return total


class _Carried:
    """For trackers whose collect() re-arms tracking (the written pages
    count clean after it): what give_back() returns is added to the next
    collect. Re-arming from scratch (setup, adopt) drops it: the process's
    state then is the new base."""

    _carry: list[tuple[int, int]] = []

    def give_back(self, dirty: DirtySet) -> None:
        if dirty.ranges:
            self._carry = self._carry + dirty.ranges

    def _take_carry(self) -> list[tuple[int, int]]:
        carry, self._carry = self._carry, []
        return carry


class SoftDirtyTracker(_Carried, _NothingToPrepare):
    """pagemap soft-dirty bit (needs CONFIG_MEM_SOFT_DIRTY and PAGEMAP_SCAN)."""

    name = "soft-dirty"

    def _clear(self, pid: int) -> None:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("4")

    def setup(self, pid: int, run: RunSyscall, get_vmas: Callable[[], list[Vma]]) -> None:
        self._clear(pid)
        self._carry = []

    def collect(self, pid: int, run: RunSyscall, get_vmas: Callable[[], list[Vma]]) -> DirtySet:
        out = self._take_carry()
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
        try:
            for v in get_vmas():
                if tracked(v):
                    out += [(s, e) for s, e, _ in _sys.pagemap_scan(
                        fd, v.start, v.end, flags=0, category_mask=_sys.PAGE_IS_SOFT_DIRTY,
                        return_mask=_sys.PAGE_IS_SOFT_DIRTY)]
        finally:
            os.close(fd)
        self._clear(pid)
        return DirtySet(out)

    def teardown(self, pid: int | None, run: RunSyscall | None) -> None:
        return None


class UffdWpTracker(_Carried):
    """PAGEMAP_SCAN + userfaultfd async write-protect.

    A collect is two ioctls over the whole address space when the layout of
    unregistered memory did not change: one scan that returns the written pages
    of registered mappings and write-protects them again (unregistered mappings
    are skipped by the kernel), one that lists the memory that is *not*
    registered. Only when that list changed (a new, moved, grown or re-created
    mapping) are /proc/PID/maps read and the newcomers registered and counted
    wholly dirty.
    """

    name = "uffd-wp"
    prepares = True
    FEATURES = _sys.UFFD_FEATURE_WP_ASYNC | _sys.UFFD_FEATURE_WP_UNPOPULATED
    TOP = (1 << 47) - _sys.PAGE_SIZE  # x86_64 user address space end (4-level paging)

    def __init__(self) -> None:
        self.uffd: int | None = None  # our copy (pidfd_getfd)
        self.pagemap: int | None = None
        self.target_fd: int | None = None  # the fd number inside the tracee
        self.untrackable: list[tuple[int, int]] = []
        self._unregistered: list[tuple[int, int]] | None = None

    def _close_ours(self) -> None:
        for fd in (self.uffd, self.pagemap):
            if fd is not None:
                os.close(fd)
        self.uffd = self.pagemap = None
        self._unregistered = None

    def setup(self, pid: int, run: RunSyscall, get_vmas: Callable[[], list[Vma]]) -> None:
        self._close_ours()
        self.adopt(self._arm(pid, run, get_vmas))

    def prepare(self, pid: int, run: RunSyscall, get_vmas: Callable[[], list[Vma]]) -> object | None:
        # a spare inherited the session's fd number from its template: the uffd goes there
        return self._arm(pid, run, get_vmas) if self.target_fd is not None else None

    def adopt(self, prepared: object) -> None:
        assert isinstance(prepared, _Armed)
        self._close_ours()
        self._carry = []
        # the registration lives in the process's memory map, not in our
        # descriptors: take the uffd and pagemap again now (a spare must not
        # hold descriptors of ours while it waits: 128 spares would be 256)
        pidfd = _sys.pidfd_open(prepared.pid)
        try:
            self.uffd = _sys.pidfd_getfd(pidfd, prepared.target_fd)
        finally:
            os.close(pidfd)
        self.pagemap = os.open(f"/proc/{prepared.pid}/pagemap", os.O_RDONLY)
        self.target_fd = prepared.target_fd
        self.untrackable, self._unregistered = prepared.untrackable, prepared.unregistered

    def _arm(self, pid: int, run: RunSyscall, get_vmas: Callable[[], list[Vma]]) -> "_Armed":
        """A uffd in pid (at our fd number), registered for write-protect on
        every private writable mapping, every page write-protected."""
        fd = run(_sys.SYS_userfaultfd, _sys.O_CLOEXEC | _sys.O_NONBLOCK)
        if fd == -errno.EPERM:
            fd = run(_sys.SYS_userfaultfd, _sys.O_CLOEXEC | _sys.O_NONBLOCK | _sys.UFFD_USER_MODE_ONLY)
        if fd < 0:
            raise OSError(-fd, f"userfaultfd() in pid {pid}: {os.strerror(-fd)}")
        if self.target_fd is None:
            high = run(_sys.SYS_fcntl, fd, _sys.F_DUPFD_CLOEXEC, max(3, nofile_limit(pid) - 8))
        else:  # replaces (and closes) the copy a template handed down, tied to the old mm
            high = run(_sys.SYS_dup3, fd, self.target_fd, _sys.O_CLOEXEC)
        run(_sys.SYS_close, fd)
        if high < 0:
            raise OSError(-high, f"moving the userfaultfd of pid {pid} to a high fd: {os.strerror(-high)}")
        pidfd = _sys.pidfd_open(pid)
        try:
            uffd = _sys.pidfd_getfd(pidfd, high)
        finally:
            os.close(pidfd)
        pagemap = -1
        try:
            _sys.uffdio_api(uffd, self.FEATURES)
            pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
            untrackable: list[tuple[int, int]] = []
            for v in get_vmas():
                if tracked(v):
                    _register(uffd, v.start, v.end, untrackable)
            _scan_written(pagemap)  # write-protect everything: the current state is the base
            return _Armed(pid, high, untrackable, _scan_unregistered(pagemap))
        finally:
            os.close(uffd)
            if pagemap >= 0:
                os.close(pagemap)

    def collect(self, pid: int, run: RunSyscall, get_vmas: Callable[[], list[Vma]]) -> DirtySet:
        if self.uffd is None:
            return DirtySet(ranges=None)
        assert self.pagemap is not None
        out = self._take_carry() + _scan_written(self.pagemap) + self.untrackable
        unreg = _scan_unregistered(self.pagemap)
        if unreg != self._unregistered:
            # Something appeared that is not registered: register the private
            # writable mappings among it; they count wholly dirty once.
            from .replay import intersect
            tracked_ranges = [(v.start, v.end) for v in get_vmas() if tracked(v)]
            known = set(self.untrackable)
            for s, e in tracked_ranges:
                if (s, e) in known or not intersect([(s, e)], unreg):
                    continue
                out.append((s, e))
                if _register(self.uffd, s, e, self.untrackable):
                    _scan_written(self.pagemap, s, e)
            self._unregistered = _scan_unregistered(self.pagemap)
        return DirtySet(out)

    def teardown(self, pid: int | None, run: RunSyscall | None) -> None:
        self._close_ours()
        if run is not None and self.target_fd is not None:
            run(_sys.SYS_close, self.target_fd)
        self.target_fd = None


@dataclass
class _Armed:
    """uffd-wp tracking armed in a process not yet tracked (see prepare())."""

    pid: int
    target_fd: int  # the uffd's number inside the process
    untrackable: list[tuple[int, int]]
    unregistered: list[tuple[int, int]]


def _register(uffd: int, start: int, end: int, untrackable: list[tuple[int, int]]) -> bool:
    try:
        _sys.uffdio_register_wp(uffd, start, end - start)
        return True
    except OSError:
        untrackable.append((start, end))
        return False


def _scan_written(pagemap: int, start: int = 0, end: int = 0) -> list[tuple[int, int]]:
    return [(s, e) for s, e, _ in _sys.pagemap_scan(
        pagemap, start, end or UffdWpTracker.TOP, flags=_sys.PM_SCAN_WP_MATCHING,
        category_mask=_sys.PAGE_IS_WRITTEN, return_mask=_sys.PAGE_IS_WRITTEN)]


def _scan_unregistered(pagemap: int) -> list[tuple[int, int]]:
    return [(s, e) for s, e, _ in _sys.pagemap_scan(
        pagemap, 0, UffdWpTracker.TOP, flags=0, category_mask=_sys.PAGE_IS_WPALLOWED,
        inverted=_sys.PAGE_IS_WPALLOWED, return_mask=_sys.PAGE_IS_WPALLOWED)]


BACKENDS = ("uffd-wp", "pfn", "soft-dirty", "compare")


def make_tracker(name: str) -> DirtyTracker:
    if name == "uffd-wp":
        return UffdWpTracker()
    if name == "soft-dirty":
        return SoftDirtyTracker()
    if name == "pfn":
        return PfnTracker()
    if name == "compare":
        return CompareTracker()
    raise ValueError(f"unknown dirty-tracking backend {name!r}: choose one of {', '.join(BACKENDS)}")
