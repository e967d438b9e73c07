"""Huge pages: the checkpointer collapses memory the process wrote since its
last fork into transparent huge pages (its template forks then copy page
tables in batches). It must not change a byte of any checkpoint, also
through a delta written after a collapse, must leave memory a template shares
alone (no bigger deltas), and must respect a process that opted out."""

from __future__ import annotations

import pytest

from deltacr import available_backends
from deltacr.check import _thp_setting, check
from deltacr_helpers import RSEQ_SETUP, Lab, flatten, memory_image

MB = 1 << 20

pytestmark = pytest.mark.skipif(not check().can_collapse,
                                reason="this kernel cannot collapse another process's memory "
                                       "(see `deltacr check`)")

# With THP "always" the kernel maps fresh memory huge by itself: write the
# buffer in 4 KiB pages first, so that only the keeper can make it huge.
SMALL_FIRST = _thp_setting() == "always"


def huge_kb(pid: int, addr: int) -> int:
    """AnonHugePages of the mapping of pid that contains addr (2 MiB mapped whole)."""
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= addr < end
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    raise AssertionError(f"no mapping of pid {pid} holds {addr:#x}")


def buffer(name: str, opt_out: bool = False, holes: bool = False) -> str:
    """REPL code: a 16 MiB private anonymous buffer, written (every 16th page
    left a hole with ``holes``); its address in NAME_addr."""
    code = f"import ctypes; {name} = mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS); "
    if opt_out or SMALL_FIRST:
        code += f"{name}.madvise(mmap.MADV_NOHUGEPAGE); "
    code += f"{name}.write(os.urandom(16 << 20)); "
    if holes:
        code += f"[{name}.madvise(mmap.MADV_DONTNEED, i, 4096) for i in range(0, 16 << 20, 16 * 4096)]; "
    if SMALL_FIRST and not opt_out:
        code += f"{name}.madvise(mmap.MADV_HUGEPAGE); "
    return code + f"{name}_addr = ctypes.addressof(ctypes.c_char.from_buffer({name}))"


def collapsed(cp) -> int:  # type: ignore[no-untyped-def]
    return int(cp.status()["hugepages"]["collapsed"])


@pytest.mark.parametrize("backend", available_backends())
def test_written_memory_is_collapsed_and_every_checkpoint_stays_exact(lab: Lab, store: str, backend: str) -> None:
    r = lab.repl()
    r.run(RSEQ_SETUP)
    rseq = r.eval("RSEQ")
    cp = lab.checkpointer(r.pid, store, backend=backend, rehydrate=False)
    r.run(buffer("m", holes=True))
    addr = r.eval("m_addr")
    cp.wait_background()
    # 16 MiB at any alignment holds at least 7 whole huge pages; the holes
    # (1 page in 16) do not stop a collapse, they come back as zeros
    assert huge_kb(cp.live_pid, addr) >= 7 * 2048, cp.status()["hugepages"]
    assert collapsed(cp) >= 7
    h1 = r.eval("hash(bytes(m))")
    c1 = cp.checkpoint("one").id
    before = collapsed(cp)
    r.run("m[100:104] = b'ABCD'; m[9 << 20] = 7")
    c2 = cp.checkpoint("two").id
    cp.wait_background()
    two = [c for c in cp.list() if c.id == c2][0]
    # memory c1's template shares was not copied into new huge pages: the
    # delta holds the two pages written and what the interpreter touched
    assert two.delta_bytes < 2 * MB, two
    assert collapsed(cp) == before
    r.run("m[:] = bytes(range(256)) * (1 << 16)")  # all rewritten: exclusive again, collapsed again
    cp.wait_background()
    assert collapsed(cp) >= before + 7
    assert huge_kb(cp.live_pid, addr) >= 7 * 2048
    r.run("m[5 << 20] = 9")
    c3 = cp.checkpoint("three").id  # its delta was read from collapsed memory

    assert cp.rollback(c1).path == "fast"
    assert r.eval("hash(bytes(m))") == h1
    assert cp.rollback(c2).path == "fast"
    assert r.eval("bytes(m[100:104]), m[9 << 20]") == (b"ABCD", 7)
    # fast path and slow path (c1's template plus the deltas of c2 and c3)
    # give the same bytes
    fast = cp.rollback(c3, resume=False)
    assert fast.path == "fast"
    image_fast = flatten(memory_image(fast.pid), rseq)
    cp.resume()
    cp.wait_background()
    assert cp.evict(c3) and cp.evict(c2)
    slow = cp.rollback(c3, resume=False)
    assert slow.path == "slow" and slow.base == c1
    image_slow = flatten(memory_image(slow.pid), rseq)
    cp.resume()
    assert image_fast.keys() == image_slow.keys()
    diff = [hex(a) for a in image_fast if image_fast[a] != image_slow[a]]
    assert diff == [], f"{len(diff)} pages differ, first {diff[:5]}"
    assert r.eval("m[5 << 20], bytes(m[100:104]), m[4097]") == (9, b"defg", 4097 % 256)


def test_a_process_that_opted_out_keeps_small_pages(lab: Lab, store: str) -> None:
    r = lab.repl()
    cp = lab.checkpointer(r.pid, store, backend="compare", rehydrate=False)
    r.run(buffer("no", opt_out=True))
    r.run(buffer("yes"))
    cp.wait_background()
    assert huge_kb(cp.live_pid, r.eval("yes_addr")) >= 7 * 2048, cp.status()["hugepages"]  # the pass ran
    assert huge_kb(cp.live_pid, r.eval("no_addr")) == 0
    assert cp.status()["hugepages"]["refused"] >= 7


def test_hugepages_false_leaves_memory_alone(lab: Lab, store: str) -> None:
    r = lab.repl()
    cp = lab.checkpointer(r.pid, store, backend="compare", rehydrate=False, hugepages=False)
    r.run(buffer("m"))
    cp.wait_background()
    cp.checkpoint("one")
    assert cp.status()["hugepages"] is None
    if not SMALL_FIRST:  # with "always", khugepaged may collapse it on its own
        assert huge_kb(cp.live_pid, r.eval("m_addr")) == 0


def test_wait_background_does_not_wait_for_a_stopped_process(lab: Lab, store: str) -> None:
    import time
    r = lab.repl()
    cp = lab.checkpointer(r.pid, store, backend="pfn" if "pfn" in available_backends() else "compare",
                          rehydrate=False)
    r.run(buffer("m"))
    cp.stop()  # held stopped by its caller: the keeper must not be waited for
    try:
        t = time.monotonic()
        cp.wait_background(timeout=20)
        assert time.monotonic() - t < 5
    finally:
        cp.resume()
    cp.wait_background()
    assert huge_kb(cp.live_pid, r.eval("m_addr")) >= 7 * 2048  # and it catches up once it runs
