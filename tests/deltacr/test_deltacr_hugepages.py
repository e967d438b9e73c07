"""Huge pages: the checkpointer collapses memory the process wrote since its
last fork into transparent huge pages (its template forks then copy page
tables in batches). It must not change a byte of any checkpoint, must leave
memory a template shares alone (no bigger deltas), and must respect a process
that opted out."""

from __future__ import annotations

import pytest

from deltacr import available_backends
from deltacr.check import check
from deltacr_helpers import RSEQ_SETUP, Lab, flatten, memory_image

MB = 1 << 20

pytestmark = pytest.mark.skipif(not check().can_collapse,
                                reason="this kernel cannot collapse memory through process_madvise "
                                       "(see `deltacr check`)")


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


BUFFER = ("import ctypes; {name} = mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS); {opt}{name}.write(os.urandom(16 << 20)); "
          "{name}_addr = ctypes.addressof(ctypes.c_char.from_buffer({name}))")


@pytest.mark.parametrize("backend", available_backends())
def test_written_memory_is_collapsed_and_every_checkpoint_stays_exact(lab: Lab, store: str, backend: str) -> None:
    r = lab.repl()
    r.run(RSEQ_SETUP)
    rseq = r.eval("RSEQ")
    cp = lab.checkpointer(r.pid, store, backend=backend, rehydrate=False)
    r.run(BUFFER.format(name="m", opt=""))
    addr = r.eval("m_addr")
    cp.wait_background()
    # 16 MiB at any alignment holds at least 7 whole huge pages
    assert huge_kb(cp.live_pid, addr) >= 7 * 2048, cp.status()["hugepages"]
    h1 = r.eval("hash(bytes(m))")
    c1 = cp.checkpoint("one").id
    before = cp.status()["hugepages"]["collapsed"]
    r.run("m[100:104] = b'ABCD'; m[9 << 20] = 7")
    c2 = cp.checkpoint("two").id
    cp.wait_background()
    two = [c for c in cp.list() if c.id == c2][0]
    # memory the template of c1 shares was not copied into new huge pages:
    # the delta holds the two pages written and what the interpreter touched
    assert two.delta_bytes < 2 * MB, two
    assert cp.status()["hugepages"]["collapsed"] == before
    r.run("m[:] = bytes(16 << 20)")  # all rewritten: exclusive again, collapsed again
    cp.wait_background()
    assert huge_kb(cp.live_pid, addr) >= 7 * 2048
    assert cp.status()["hugepages"]["collapsed"] >= before + 7

    assert cp.rollback(c1).path == "fast"
    assert r.eval("hash(bytes(m))") == h1
    # the fast path and the slow path (c1's template plus c2's delta) give
    # the same bytes
    fast = cp.rollback(c2, resume=False)
    assert fast.path == "fast"
    image_fast = flatten(memory_image(fast.pid), rseq)
    cp.resume()
    assert cp.evict(c2)
    slow = cp.rollback(c2, resume=False)
    assert slow.path == "slow" and slow.base == c1
    image_slow = flatten(memory_image(slow.pid), rseq)
    cp.resume()
    assert image_fast.keys() == image_slow.keys()
    diff = [hex(a) for a in image_fast if image_fast[a] != image_slow[a]]
    assert diff == [], f"{len(diff)} pages differ, first {diff[:5]}"
    assert r.eval("bytes(m[100:104]), m[9 << 20]") == (b"ABCD", 7)

def test_a_process_that_opted_out_keeps_small_pages(lab: Lab, store: str) -> None:
    r = lab.repl()
    cp = lab.checkpointer(r.pid, store, backend="compare", rehydrate=False)
    r.run(BUFFER.format(name="no", opt="no.madvise(mmap.MADV_NOHUGEPAGE); "))
    r.run(BUFFER.format(name="yes", opt=""))
    cp.wait_background()
    assert huge_kb(cp.live_pid, r.eval("yes_addr")) >= 7 * 2048, cp.status()["hugepages"]  # the pass ran
    assert huge_kb(cp.live_pid, r.eval("no_addr")) == 0


def test_hugepages_false_leaves_memory_alone(lab: Lab, store: str) -> None:
    r = lab.repl()
    cp = lab.checkpointer(r.pid, store, backend="compare", rehydrate=False, hugepages=False)
    r.run(BUFFER.format(name="m", opt=""))
    cp.wait_background()
    cp.checkpoint("one")
    assert huge_kb(cp.live_pid, r.eval("m_addr")) == 0
    assert cp.status()["hugepages"] is None
