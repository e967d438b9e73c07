"""Background work of a checkpoint: write its memory delta from the frozen template.

Runs off the critical path, on the background thread: it only reads
``/proc/TEMPLATE/maps`` and ``/proc/TEMPLATE/mem`` (no ptrace calls), so it never
disturbs the tracer thread.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Callable

from ._sys import PAGE_SIZE
from .delta import DeltaWriter, MapRecord, same_backing
from .dirty import DirtySet, tracked
from .procfs import Vma, read_maps
from .replay import intersect, merge, subtract

CHUNK = 1 << 20


def layout_of(vmas: list[Vma]) -> list[MapRecord]:
    return [MapRecord(v.start, v.end, v.offset, v.prot, v.private, v.path, v.dev, v.inode) for v in vmas]


def fresh_ranges(layout: list[MapRecord], parent: list[MapRecord] | None) -> list[tuple[int, int]]:
    """Parts of mappings that did not exist, identically, at the parent: recorded
    wholly. (A new MAP_SHARED mapping is recorded too, so that the slow path can
    recreate it, as a private copy; shared memory itself is not checkpointed.)"""
    out: list[tuple[int, int]] = []
    for m in layout:
        if m.special:
            continue
        if parent is None:
            out.append((m.start, m.end))
            continue
        same = [(p.start, p.end) for p in parent if p.prot == m.prot and same_backing(p, m)]
        out += subtract([(m.start, m.end)], same)
    return merge(out)


@dataclass
class DeltaJob:
    cid: int
    parent: int | None
    template: int
    dirty: DirtySet
    path: str
    parent_template: int | None = None  # held alive by the pool until this job is done


@dataclass
class DeltaResult:
    layout: list[MapRecord]
    brk: int
    size: int
    pages: int
    hashes: dict[int, bytes] | None = None
    cwd: str = ""
    sigmask: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def _read(fd: int, addr: int, n: int, buf: bytearray) -> memoryview:
    mv = memoryview(buf)[:n]
    got = 0
    while got < n:
        k = os.preadv(fd, [mv[got:]], addr + got)
        if k <= 0:
            raise OSError(f"short read of template memory at {addr + got:#x}")
        got += k
    return mv


def write_delta(job: DeltaJob, parent_layout: list[MapRecord] | None,
                parent_hashes: dict[int, bytes] | None, pause: Callable[[], None]) -> DeltaResult:
    """Write job's delta. ``pause()`` is called often: it blocks while the tracer
    thread is on a critical path (so this thread does not hold the GIL then) and
    raises to cancel."""
    from .procfs import cwd, signal_mask
    pause()
    vmas = read_maps(job.template)
    layout = layout_of(vmas)
    brk = max((m.end for m in layout if m.path == "[heap]"), default=0)  # the heap may be split
    res = DeltaResult(layout, brk, 0, 0, cwd=cwd(job.template), sigmask=signal_mask(job.template))
    base = job.parent is None
    pause()
    writer = DeltaWriter(job.path, checkpoint_id=job.cid, parent_id=job.parent or 0, brk=brk,
                         maps=layout, page_size=PAGE_SIZE, base=base)
    try:
        buf = bytearray(CHUNK)
        fd = os.open(f"/proc/{job.template}/mem", os.O_RDONLY)
        try:
            tracked_ranges = [(v.start, v.end) for v in vmas if tracked(v)]
            if job.dirty.ranges is None and not job.dirty.by_pfn:
                # content compare: hash every tracked page, keep those that differ
                hashes: dict[int, bytes] = {}
                parent_h = parent_hashes if parent_hashes is not None else {}
                for s, e in merge(tracked_ranges):
                    pos = s
                    while pos < e:
                        pause()
                        n = min(CHUNK, e - pos)
                        mv = _read(fd, pos, n, buf)
                        run_start = -1
                        for off in range(0, n, PAGE_SIZE):
                            if off % (64 * PAGE_SIZE) == 0:
                                pause()
                            d = hashlib.blake2b(mv[off:off + PAGE_SIZE], digest_size=8).digest()
                            a = pos + off
                            hashes[a] = d
                            changed = not base and parent_h.get(a) != d
                            if changed and run_start < 0:
                                run_start = off
                            elif not changed and run_start >= 0:
                                writer.add(pos + run_start, mv[run_start:off])
                                res.pages += (off - run_start) // PAGE_SIZE
                                run_start = -1
                        if run_start >= 0:
                            writer.add(pos + run_start, mv[run_start:n])
                            res.pages += (n - run_start) // PAGE_SIZE
                        pos += n
                res.hashes = hashes
                todo = [] if base else subtract(fresh_ranges(layout, parent_layout), tracked_ranges)
            elif base:
                todo = []
            elif job.dirty.by_pfn:
                from .dirty import pfn_changed
                if job.parent_template is not None:
                    changed = pfn_changed(job.parent_template, job.template, merge(tracked_ranges))
                else:  # no witness left: record every tracked page
                    changed = tracked_ranges
                todo = merge(changed + fresh_ranges(layout, parent_layout))
            else:
                todo = merge(intersect(job.dirty.ranges, tracked_ranges) + fresh_ranges(layout, parent_layout))
            for s, e in todo:
                pos = s
                while pos < e:
                    pause()
                    n = min(CHUNK, e - pos)
                    writer.add(pos, _read(fd, pos, n, buf), pause)
                    res.pages += n // PAGE_SIZE
                    pos += n
        finally:
            os.close(fd)
        res.size = writer.close()
    except BaseException:
        writer.abort()
        raise
    return res
