"""MAP_SHARED file mappings across a slow-path restore.

Shared memory is not checkpointed: a template shares it with the process, so
a fast-path rollback keeps the file mapping as fork kept it, showing the
file as it is now. The slow path must give the same, and must never write a
delta's pages into a file: a range whose backing changed between the base
template and the checkpoint (file or anonymous, shared or private, which
file, which offset) is mapped again, not written over.
"""

from __future__ import annotations

import os

from deltacr.procfs import read_maps

from deltacr_helpers import LIBC_SETUP, RSEQ_SETUP, Lab, flatten, memory_image

N = 1 << 20


def _file(tmp_path: object, fill: bytes) -> str:
    path = os.path.join(str(tmp_path), "shared.bin")
    with open(path, "wb") as f:
        f.write(fill * N)
    return path


def _content(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _maps_at(pid: int, addr: int) -> list[tuple[str, str]]:
    return [(v.perms, v.path) for v in read_maps(pid) if v.start < addr + N and v.end > addr]


def test_slow_path_maps_private_memory_again_where_the_base_had_a_shared_file(
        lab: Lab, store: str, tmp_path: object) -> None:
    # The audit's reproduction: the base template maps the file shared at A,
    # the checkpoint has private memory full of 'Z' at A. Replaying the
    # delta's pages through the base's mapping wrote them into the file.
    path = _file(tmp_path, b"S")
    r = lab.repl(LIBC_SETUP + f"; N = {N}; fd = os.open({path!r}, os.O_RDWR); "
                 "A = libc.mmap(None, N, RW, SHARED, fd, 0)")
    r.run(RSEQ_SETUP)
    rseq = r.eval("RSEQ")
    cp = lab.checkpointer(r.pid, store, max_templates=8, rehydrate=False)
    cp.checkpoint("the file at A")
    r.run("libc.munmap(A, N); B = libc.mmap(A, N, RW, FLAGS | NOREPLACE, -1, 0); ctypes.memset(B, 0x5a, N)")
    assert r.eval("B == A")
    a = r.eval("A")
    c2 = cp.checkpoint("private 'Z' at A").id
    r.run("ctypes.memset(A, 0x59, N)")
    cp.wait_background()

    fast = cp.rollback(c2, resume=False)
    image_fast = flatten(memory_image(fast.pid), rseq)
    maps_fast = _maps_at(fast.pid, a)
    cp.resume()
    assert cp.evict(c2)
    slow = cp.rollback(c2, resume=False)
    assert slow.path == "slow" and slow.base == 1
    image_slow = flatten(memory_image(slow.pid), rseq)
    maps_slow = _maps_at(slow.pid, a)
    cp.resume()

    assert _content(path) == b"S" * N, "the slow path wrote into the file"
    assert maps_fast == maps_slow == [("rw-p", "")]
    diff = [hex(p) for p in image_fast if image_fast[p] != image_slow.get(p)]
    assert image_fast.keys() == image_slow.keys() and diff == [], f"{len(diff)} pages differ, first {diff[:5]}"
    assert r.eval("ctypes.string_at(A, N) == b'Z' * N")


def test_slow_path_maps_the_file_itself_where_the_checkpoint_had_it_shared(
        lab: Lab, store: str, tmp_path: object) -> None:
    # The other way round: the base has private memory at A, the checkpoint
    # the file shared. The fast path shows the file as it is now and writes
    # reach it; so must the slow path -- and the restore itself writes nothing.
    path = _file(tmp_path, b"S")
    r = lab.repl(LIBC_SETUP + f"; N = {N}; fd = os.open({path!r}, os.O_RDWR); "
                 "A = libc.mmap(None, N, RW, FLAGS, -1, 0); ctypes.memset(A, 0x50, N)")
    a = r.eval("A")
    cp = lab.checkpointer(r.pid, store, max_templates=8, rehydrate=False)
    cp.checkpoint("private 'P' at A")
    r.run("libc.munmap(A, N); B = libc.mmap(A, N, RW, SHARED | NOREPLACE, fd, 0)")
    assert r.eval("B == A")
    c2 = cp.checkpoint("the file at A").id
    r.run("ctypes.memset(A, 0x57, N)")  # shared memory: the file is 'W' now, whatever is rolled back
    cp.wait_background()
    assert cp.rollback(c2).path == "fast" and r.eval("ctypes.string_at(A, 4)") == b"WWWW"
    assert cp.evict(c2)
    slow = cp.rollback(c2, resume=False)
    assert slow.path == "slow" and slow.base == 1
    assert _maps_at(slow.pid, a) == [("rw-s", path)]
    cp.resume()
    assert _content(path) == b"W" * N, "the slow path wrote into the file"
    assert r.eval("ctypes.string_at(A, N) == b'W' * N")
    r.run("ctypes.memset(A, 0x58, 1)")
    assert _content(path)[:2] == b"XW", "a write to the restored mapping must reach the file"

