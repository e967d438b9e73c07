"""Slow-path restore: rebuild a checkpoint in a process forked from an older
template by replaying mapping changes and page deltas.

For each delta on the path from the ancestor to the target, in order:

1. move the program break to the delta's (``brk``; the heap is never
   mmapped/munmapped by hand, so the kernel's idea of the break stays right);
2. ``munmap`` what is mapped now but not in the delta's layout, and what is
   backed by something else than the layout says (file or anonymous, shared
   or private, which file at which offset: :func:`deltacr.delta.same_backing`;
   see :func:`reconcile` for which differences count);
3. ``mmap(MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS)`` what the layout has and the
   process lacks (new mappings are recorded wholly in the delta, so an anonymous
   mapping with their content is bit-identical); a shared mapping of a file
   that is still there is mapped again from the file, as the fast path's
   template has it; other shared memory comes back as a private copy;
4. ``mprotect`` where protections differ;
5. write the recorded pages through ``/proc/PID/mem`` (zero runs inside a
   mapping created in step 3 are skipped: they are already zero; nothing is
   ever written into shared memory). Pages are
   written once, from the newest delta that has them (see :func:`plan`),
   straight from the mapped delta files, each run's checksum checked (a
   long run's on a second thread while it is written).
   A delta whose layout equals the one before it is not reconciled again.

All syscalls are injected by the caller-supplied ``run`` on the tracer thread.
"""

from __future__ import annotations

import bisect
import mmap
import os
import stat
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from . import _sys
from .delta import KIND_ZERO, Backed, DeltaInfo, MapRecord, Run, is_anonymous, same_backing
from .errors import DeltaFormatError, RestoreFailed
from .procfs import Vma, read_maps, start_brk
from .dirty import RunSyscall
from .restore import open_in

T = TypeVar("T", Vma, MapRecord)

Interval = tuple[int, int]
BIG_RUN = 1 << 20  # bytes: a run this long has its checksum taken while it is written


def subtract(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """Parts of intervals a not covered by intervals b (both [start, end))."""
    b = sorted(b)
    out: list[Interval] = []
    for s, e in sorted(a):
        cur = s
        for bs, be in b:
            if be <= cur:
                continue
            if bs >= e:
                break
            if bs > cur:
                out.append((cur, bs))
            cur = max(cur, be)
            if cur >= e:
                break
        if cur < e:
            out.append((cur, e))
    return out


def merge(ranges: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def intersect(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """Intersection of two lists of intervals."""
    a, b = merge(a), merge(b)
    out: list[Interval] = []
    i = j = 0
    while i < len(a) and j < len(b):
        s = max(a[i][0], b[j][0])
        e = min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _is_heap(path: str) -> bool:
    return path == "[heap]"


@dataclass
class ReplayStats:
    bytes_written: int = 0  # page data written into the process
    zero_bytes: int = 0
    syscalls: int = 0
    delta_bytes: int = 0  # page data in the replayed deltas (superseded pages included)


def _overlaps(m: Backed, others: Sequence[Backed], ends: list[int]) -> Iterator[tuple[Interval, Backed]]:
    """The mappings of ``others`` (sorted, disjoint; ``ends`` their ends) that
    overlap m, each with the part of m it covers."""
    i = bisect.bisect_right(ends, m.start)
    while i < len(others) and others[i].start < m.end:
        o = others[i]
        yield (max(o.start, m.start), min(o.end, m.end)), o
        i += 1


def _open_mapped_file(pid: int, run: RunSyscall, m: MapRecord, stats: ReplayStats) -> int:
    """Open in pid the regular file that m maps shared, if it is still there
    under its name (and is the same file, where the record has its device
    and inode): read-write when it can be (mprotect may add PROT_WRITE to a
    shared mapping later only if its file was opened for writing), read-only
    when m is not writable. The fd, or -1."""
    if is_anonymous(m.path) or not m.path.startswith("/") or m.path.endswith(" (deleted)"):
        return -1  # shared anonymous memory, memfd, SysV shm: no file to map again
    try:
        st = os.stat(f"/proc/{pid}/root{m.path}")  # the name as the process resolves it
    except OSError:
        return -1
    if not stat.S_ISREG(st.st_mode) or (m.inode and (st.st_dev, st.st_ino) != (m.dev, m.inode)):
        return -1
    stats.syscalls += 3
    fd = open_in(pid, run, m.path, os.O_RDWR | os.O_CLOEXEC)
    if fd < 0 and not m.prot & _sys.PROT_WRITE:
        stats.syscalls += 3
        fd = open_in(pid, run, m.path, os.O_RDONLY | os.O_CLOEXEC)
    return fd if fd >= 0 else -1


def reconcile(pid: int, run: RunSyscall, target: list[MapRecord], brk: int, stats: ReplayStats,
              before: list[MapRecord] | None = None) -> list[Interval]:
    """Make pid's layout match ``target``; returns the ranges mapped fresh
    (anonymous, private, all zero).

    A range is kept or mapped again by what backs it (:func:`same_backing`),
    not by its addresses alone. ``before`` is the layout recorded just
    before ``target`` (the previous delta's, or the base checkpoint's; None:
    pid's own). A range whose backing changed since is recorded wholly in
    the target's delta: it is mapped again, anonymous and private, and the
    delta fills it. Where the record shows no change the process's private
    memory is kept even when its backing differs: a template re-made by an
    earlier slow path holds private copies of what that one could not map
    again, and their content is the checkpoint's.

    Shared memory is kept only where it is the very mapping wanted: anything
    else would have the delta's pages written through it, into its file
    (the pages are never written into shared memory: :func:`replay`). A
    shared file mapping the target has and pid lacks is mapped again from
    the file, shared: the fast path keeps the template's, which shows the
    file as it is now (shared memory is not checkpointed). Where the file is
    gone or replaced, or the memory was shared anonymous, the range comes
    back as a private copy of its recorded content."""

    def sc(nr: int, *args: int, what: str) -> int:
        stats.syscalls += 1
        res = run(nr, *args)
        if -4096 < res < 0:
            raise RestoreFailed(f"pid {pid}: slow-path restore: {what} failed: {os.strerror(-res)}")
        return res

    cur = read_maps(pid)
    # The heap may be split into several [heap] vmas (uffd registration splits it).
    want_brk = brk or max((m.end for m in target if _is_heap(m.path)), default=0) or start_brk(pid)
    have_brk = max((v.end for v in cur if _is_heap(v.path)), default=0) or start_brk(pid)
    if want_brk != have_brk:
        got = sc(_sys.SYS_brk, want_brk, what="brk")
        if got != want_brk:
            raise RestoreFailed(f"pid {pid}: slow-path restore: brk({want_brk:#x}) gave {got:#x}")
        cur = read_maps(pid)

    def plain(items: Sequence[T]) -> list[T]:  # the heap moves with brk alone
        return [v for v in items if not v.special and not _is_heap(v.path)]

    mine, want = plain(cur), plain(target)
    old: Sequence[Backed] = plain(before) if before is not None else mine
    mine_ends, old_ends = [v.end for v in mine], [m.end for m in old]
    keep: list[Interval] = []
    files: dict[int, int] = {}  # index in want -> fd in pid of the file to map shared again
    try:
        for i, m in enumerate(want):
            same = [r for r, v in _overlaps(m, mine, mine_ends) if same_backing(v, m)]
            if not m.private and subtract([(m.start, m.end)], same):
                fd = _open_mapped_file(pid, run, m, stats)
                if fd >= 0:
                    files[i] = fd
                    keep += same
                    continue
            unchanged = [r for r, o in _overlaps(m, old, old_ends) if same_backing(o, m)]
            private = [r for r, v in _overlaps(m, mine, mine_ends) if v.private]
            keep += same + intersect(unchanged, private)
        keep = merge(keep)
        for s, e in merge(subtract([(v.start, v.end) for v in mine], keep)):
            sc(_sys.SYS_munmap, s, e - s, what=f"munmap {s:#x}-{e:#x}")
        fresh: list[Interval] = []
        for i, m in enumerate(want):
            fd = files.get(i, -1)
            for s, e in subtract([(m.start, m.end)], keep):
                if fd >= 0:
                    flags, off = _sys.MAP_FIXED | _sys.MAP_SHARED, m.offset + (s - m.start)
                else:
                    flags, off = _sys.MAP_FIXED | _sys.MAP_PRIVATE | _sys.MAP_ANONYMOUS, 0
                    fresh.append((s, e))
                got = sc(_sys.SYS_mmap, s, e - s, m.prot, flags, fd, off, what=f"mmap {s:#x}-{e:#x}")
                if got != s:
                    raise RestoreFailed(f"pid {pid}: slow-path restore: mmap at {s:#x} landed at {got:#x}")
    finally:  # an fd the program never opened must not stay in it
        for fd in files.values():
            stats.syscalls += 1
            run(_sys.SYS_close, fd)
    # protections
    cur = read_maps(pid)
    for m in target:
        if m.special:
            continue
        for v in cur:
            if v.end <= m.start or v.start >= m.end or v.prot == m.prot:
                continue
            s, e = max(v.start, m.start), min(v.end, m.end)
            sc(_sys.SYS_mprotect, s, e - s, m.prot, what=f"mprotect {s:#x}-{e:#x}")
    return fresh


class _Cover:
    """A growing set of disjoint intervals, with "which parts of [s, e) are new"."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add_uncovered(self, s: int, e: int) -> list[Interval]:
        """Add [s, e); return the parts that were not covered before."""
        i = bisect.bisect_right(self.ends, s)  # first interval ending after s
        out: list[Interval] = []
        cur = s
        j = i
        while j < len(self.starts) and self.starts[j] < e:
            if self.starts[j] > cur:
                out.append((cur, self.starts[j]))
            cur = max(cur, self.ends[j])
            j += 1
        if cur < e:
            out.append((cur, e))
        ns = min(s, self.starts[i]) if i < j else s
        ne = max(e, self.ends[j - 1]) if i < j else e
        self.starts[i:j] = [ns]
        self.ends[i:j] = [ne]
        return out


@dataclass
class _Task:
    path: str
    run: Run
    page_size: int
    needed: list[Interval]


def plan(deltas: list[tuple[str, DeltaInfo]], final: list[MapRecord], shared: list[Interval]) -> list[_Task]:
    """Which part of which run ends up in the process: the newest delta wins,
    pages outside the final layout are dropped, and so are pages where the
    process has shared memory (``shared``): written there they would land in
    a file, or in memory the templates share. Runs entirely superseded by a
    newer delta are never read.

    A page of an older delta is also dropped where any newer delta's layout
    did not map that address: the memory was unmapped then (a heap trimmed
    by brk, an arena munmapped) and what is there now was mapped afresh --
    zero, or recorded by a newer delta. (Writing the old page there was a
    bug: a heap trimmed at one checkpoint and grown again by the next got
    stale pages back, and glibc's malloc found its lists corrupted.)"""
    cover = _Cover()
    tasks: list[_Task] = []
    keep = subtract(merge([(m.start, m.end) for m in final if not m.special]), shared)
    for path, info in reversed(deltas):
        keep = intersect(keep, merge([(m.start, m.end) for m in info.maps if not m.special]))
        for r in info.runs:
            s, e = r.addr, r.addr + r.npages * info.page_size
            new = cover.add_uncovered(s, e)
            if new:
                new = intersect(new, keep)
            if new:
                tasks.append(_Task(path, r, info.page_size, new))
    tasks.sort(key=lambda t: (t.path, t.run.data_offset))
    return tasks


def apply_planned(pid: int, run: RunSyscall | None, tasks: list[_Task], fresh: list[Interval],
                  stats: ReplayStats) -> None:
    """Write the planned pages into pid through /proc/PID/mem.

    Each delta file is mapped; every contributing run's CRC-32 is checked on
    the mapping and its needed parts are written straight from it. Zero runs
    are skipped inside mappings the replay created (already zero).

    Measured here: the cost is the copy-on-write fault of each page shared
    with the base template (about 0.5-0.9 GB/s written). Having the process
    pread() the data itself (injected) was slower (1.7 ms per MiB). A reader
    thread feeding this one through a queue (until 2026-11-26) cost more than
    it overlapped when a REPL's deltas hold thousands of small runs: 102 ms
    against 45 ms of writes for 23 MB in 2,000 runs.
    """
    chunk = 1 << 22
    zeros = memoryview(bytes(chunk))
    fresh = merge(fresh)
    files: dict[str, tuple[mmap.mmap, memoryview]] = {}
    pool = ThreadPoolExecutor(1, thread_name_prefix="deltacr-replay-crc")
    mem = os.open(f"/proc/{pid}/mem", os.O_RDWR)
    try:
        for t in tasks:
            if t.run.kind == KIND_ZERO:
                for s, e in t.needed:
                    for a, b in (subtract([(s, e)], fresh) if fresh else [(s, e)]):
                        pos = a
                        while pos < b:
                            k = min(b - pos, chunk)
                            _pwrite_all(mem, zeros[:k], pos, pid)
                            pos += k
                        stats.zero_bytes += b - a
                continue
            if t.path not in files:
                with open(t.path, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
                files[t.path] = (mm, memoryview(mm))
            view = files[t.path][1]
            n = t.run.npages * t.page_size
            if t.run.data_offset + n > len(view):
                raise DeltaFormatError(f"{t.path}: short read in run at {t.run.addr:#x}")
            data = view[t.run.data_offset:t.run.data_offset + n]
            crc: Future[int] | None = None
            try:
                # a long run's checksum on another thread while its pages are
                # written (both release the GIL); a bad one fails the restore
                # all the same, and the half-written process is thrown away
                if n >= BIG_RUN:
                    crc = pool.submit(zlib.crc32, data)
                elif zlib.crc32(data) != t.run.crc:
                    raise _corrupt(t)
                for a, b in t.needed:
                    _pwrite_all(mem, data[a - t.run.addr:b - t.run.addr], a, pid)
                    stats.bytes_written += b - a
                if crc is not None and crc.result() != t.run.crc:
                    raise _corrupt(t)
            finally:
                if crc is not None:
                    crc.result()  # the view stays valid until the other thread is done with it
                data.release()
    finally:
        os.close(mem)
        pool.shutdown()
        for mm, view in files.values():
            view.release()
            try:
                mm.close()
            except BufferError:  # a slice still held by an error's traceback: closed when freed
                pass


def _corrupt(t: _Task) -> DeltaFormatError:
    return DeltaFormatError(f"{t.path}: checksum mismatch in run at {t.run.addr:#x}: the file is corrupt")


def _pwrite_all(fd: int, data: memoryview, addr: int, pid: int) -> None:
    done = 0
    while done < len(data):
        try:
            n = os.pwrite(fd, data[done:], addr + done)
        except OSError as e:
            raise RestoreFailed(
                f"pid {pid}: writing {len(data) - done} bytes at {addr + done:#x}: {e.strerror}") from None
        if n <= 0:
            raise RestoreFailed(f"pid {pid}: short write at {addr + done:#x}")
        done += n


def replay(pid: int, run: RunSyscall, deltas: list[tuple[str, DeltaInfo]],
           base_layout: list[MapRecord] | None) -> ReplayStats:
    """Reconcile the layout delta by delta, then write each page once: its
    content in the newest delta that has it (a mapping that appears in a delta
    is recorded wholly there, so no older page can be needed inside it).
    ``base_layout``: the layout recorded for the checkpoint whose template pid
    was forked from (None if its delta is not written)."""
    stats = ReplayStats()
    fresh: list[Interval] = []
    prev: tuple[int, list[MapRecord] | None] = (-1, base_layout)
    for _path, info in deltas:
        if (info.brk, info.maps) != prev:  # the same layout as the delta before: reconciled already
            fresh += reconcile(pid, run, info.maps, info.brk, stats, prev[1])
        prev = (info.brk, info.maps)
    if deltas:
        stats.delta_bytes = sum(info.data_bytes for _p, info in deltas)
        shared = [(v.start, v.end) for v in read_maps(pid) if not v.private]
        apply_planned(pid, run, plan(deltas, deltas[-1][1].maps, shared), fresh, stats)
    return stats
