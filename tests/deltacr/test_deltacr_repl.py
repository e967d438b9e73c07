"""Checkpoint and roll back a live Python REPL through the in-process API."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from deltacr import DeltaCRError, MultiThreaded, available_backends
from deltacr.delta import read_delta
from deltacr.procfs import read_stat

from deltacr_helpers import (LIBC_SETUP, RSEQ_SETUP, Lab, flatten, is_alive, memory_image, tracer_of,
                             zombies_of)

BACKENDS = available_backends()  # uffd-wp here, plus the content-compare fallback everywhere


@pytest.mark.parametrize("backend", BACKENDS)
def test_repl_state_comes_back(lab: Lab, store: str, backend: str) -> None:
    r = lab.repl("d = {'a': 1, 'nested': {'k': [1, 2, 3]}}; l = list(range(1000)); "
                 "big = bytearray(os.urandom(1 << 20)) * 40; h = hash(bytes(big))")
    # started by someone else: a double fork under a subreaper, not our child
    assert read_stat(r.pid).ppid not in (os.getpid(), 1)
    cp = lab.checkpointer(r.pid, store, backend=backend)
    assert cp.backend == backend
    c1 = cp.checkpoint("start").id
    r.run("d['a'] = 2; d['new'] = 'x'; l.append(-1); big[123456:123460] = b'ZZZZ'; del l[0:10]")
    c2 = cp.checkpoint("changed").id
    r.run("d.clear(); l = None; big[:] = bytes(len(big))")

    res = cp.rollback(c1)
    assert res.path == "fast"
    assert res.pid != r.pid and cp.live_pid == res.pid and cp.pid == r.pid
    assert r.eval("d") == {"a": 1, "nested": {"k": [1, 2, 3]}}
    assert r.eval("len(l), l[0], l[-1]") == (1000, 0, 999)
    assert r.eval("hash(bytes(big)) == h")

    res2 = cp.rollback(c2)
    assert r.eval("d['a'], d['new'], len(l), l[-1], l[0]") == (2, "x", 991, -1, 10)
    assert r.eval("bytes(big[123456:123460])") == b"ZZZZ"
    assert r.eval("os.getpid()") == res2.pid
    # SIGKILLed at the rollback (it can never run again); its exit completes asynchronously
    deadline = time.monotonic() + 5
    while is_alive(res.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not is_alive(res.pid), "the replaced live process must be gone"


def test_split_phases_report_critical_and_background_time(lab: Lab, store: str) -> None:
    r = lab.repl("x = 1")
    cp = lab.checkpointer(r.pid, store)
    cp.stop()
    assert os.path.exists(f"/proc/self/task/{tracer_of(r.pid)}"), "traced by our tracer thread"
    cid = cp.capture("phased")
    cp.resume()
    assert r.eval("x") == 1
    res = cp.checkpoint("second")
    assert res.critical_ms > 0 and res.critical_ms >= res.capture_ms
    cp.wait_background()
    rows = {c.id: c for c in cp.list()}
    assert rows[cid].label == "phased" and rows[res.id].parent == cid
    assert rows[res.id].delta_state == "written" and rows[res.id].background_ms > 0
    info = read_delta(os.path.join(store, "deltas", f"{res.id}.delta"))
    assert info.checkpoint_id == res.id and info.parent_id == cid
    assert any(m.path == "[heap]" for m in info.maps)


def test_slow_path_restores_the_vector_registers(lab: Lab, store: str) -> None:
    # A process stopped mid-computation has live SSE/AVX registers, which
    # PTRACE_GETREGS does not cover; the slow path forks an older template,
    # so it must put the checkpoint's own back (missing that corrupted
    # memcpy/malloc after about one slow restore in 40).
    from deltacr import _sys
    r = lab.repl("x = 1")
    cp = lab.checkpointer(r.pid, store, max_templates=8)
    cp.checkpoint("root")
    xmm15 = slice(160 + 15 * 16, 160 + 16 * 16)  # in the XSAVE legacy area
    pattern = bytes(range(16))
    cp.stop()
    pid = cp.status()["live_pid"]

    def mark() -> None:  # XMM15 is dead while the REPL waits in read() (caller-saved)
        st = bytearray(_sys.ptrace_get_xstate(pid))
        st[xmm15] = pattern
        _sys.ptrace_set_xstate(pid, bytes(st))
    cp._tracer.call(mark)
    cid = cp.capture("marked")
    cp.resume()
    r.run("x = 2")
    cp.checkpoint("after")
    cp.wait_background()
    assert cp.evict(cid)
    res = cp.rollback(cid, resume=False)
    assert res.path == "slow"
    got = cp._tracer.call(lambda: _sys.ptrace_get_xstate(res.pid))
    cp.resume()
    assert got[xmm15] == pattern
    assert r.eval("x") == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_slow_path_memory_unmapped_then_mapped_again_comes_back_zero(lab: Lab, store: str,
                                                                     backend: str) -> None:
    # A region written at checkpoint 2, unmapped at 3, mapped again (never
    # written) at 4: the slow path to 4 must not put checkpoint 2's pages back.
    r = lab.repl(LIBC_SETUP + "; N = 256 << 10")
    cp = lab.checkpointer(r.pid, store, backend=backend, max_templates=8)
    cp.checkpoint("root")
    r.run("A = libc.mmap(None, N, RW, FLAGS, -1, 0); ctypes.memset(A, 0x41, N)")
    c2 = cp.checkpoint("written").id
    r.run("libc.munmap(A, N)")
    c3 = cp.checkpoint("unmapped").id
    r.run("B = libc.mmap(A, N, RW, FLAGS | NOREPLACE, -1, 0)")  # the same place
    assert r.eval("B == A")
    c4 = cp.checkpoint("mapped again").id
    r.run("ctypes.memset(B, 0x42, N)")
    cp.wait_background()
    for c in (c4, c3, c2):
        assert cp.evict(c)
    res = cp.rollback(c4)
    assert res.path == "slow" and res.base == 1
    assert r.eval("ctypes.string_at(B, N) == bytes(N)"), "stale pages of an unmapped region came back"


def test_a_corrupt_delta_fails_the_slow_path_and_changes_nothing(lab: Lab, store: str) -> None:
    r = lab.repl("big = bytearray(1 << 20)")
    cp = lab.checkpointer(r.pid, store)
    cp.checkpoint("root")
    r.run("big[:] = b'A' * len(big); x = 'saved'")
    c2 = cp.checkpoint("written").id
    r.run("x = 'live'")
    cp.wait_background()
    assert cp.evict(c2)
    path = os.path.join(store, "deltas", f"{c2}.delta")
    run = next(u for u in read_delta(path).runs if u.kind == 0 and u.npages)
    with open(path, "r+b") as f:  # one flipped byte inside a page of data
        f.seek(run.data_offset + 100)
        b = f.read(1)
        f.seek(run.data_offset + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    pid = cp.live_pid
    with pytest.raises(DeltaCRError, match="checksum mismatch"):
        cp.rollback(c2)
    assert cp.live_pid == pid and r.eval("x") == "live"  # the process as it was, and it runs
    assert cp.rollback(1).path == "fast" and r.eval("'x' in dir()") is False


@pytest.mark.parametrize("backend", BACKENDS)
def test_slow_path_is_bit_identical_to_fast_path(lab: Lab, store: str, backend: str) -> None:
    r = lab.repl("a = bytearray(8 << 20); a[::4096] = b'a' * (len(a) // 4096); keep = []")
    r.run(RSEQ_SETUP)
    rseq = r.eval("RSEQ")
    cp = lab.checkpointer(r.pid, store, backend=backend, max_templates=8, rehydrate=False)
    cp.checkpoint("root")
    r.run("a[::8192] = b'b' * (len(a) // 8192); m = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE); m[:5] = b'hello'; "
          "keep.append(bytearray(os.urandom(3 << 20)))")
    c2 = cp.checkpoint("two").id
    r.run("m[100:105] = b'world'; del keep[0]; s = 'x' * 5_000_000; d = {i: str(i) for i in range(20000)}")
    c3 = cp.checkpoint("three").id
    r.run("del s, d; a[:] = b'z' * len(a); m.close()")
    cp.wait_background()

    # compare before the processes run: the kernel writes into a running
    # process's rseq area (current cpu) on its own
    fast = cp.rollback(c3, resume=False)
    assert fast.path == "fast"
    image_fast = flatten(memory_image(fast.pid), rseq)
    cp.resume()
    assert cp.evict(c3) and cp.evict(c2)
    slow = cp.rollback(c3, resume=False)
    assert slow.path == "slow" and slow.base == 1 and slow.replayed_bytes > 0
    image_slow = flatten(memory_image(slow.pid), rseq)
    cp.resume()
    assert image_fast.keys() == image_slow.keys()
    diff = [hex(a) for a in image_fast if image_fast[a] != image_slow[a]]
    assert diff == [], f"{len(diff)} pages differ, first {diff[:5]}"
    assert r.eval("bytes(m[:5]), bytes(m[100:105]), len(s), d[19999], a[4096], a[8192]") == (
        b"hello", b"world", 5_000_000, "19999", ord("a"), ord("b"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_map_and_unmap_large_buffers_between_checkpoints(lab: Lab, store: str, backend: str) -> None:
    r = lab.repl("bufs = {}")
    cp = lab.checkpointer(r.pid, store, backend=backend, max_templates=2, rehydrate=False)
    ids = [cp.checkpoint("empty").id]
    r.run("bufs['a'] = mmap.mmap(-1, 32 << 20, flags=mmap.MAP_PRIVATE); bufs['a'][-7:] = b'a-tail!'")
    ids.append(cp.checkpoint("a mapped").id)
    r.run("bufs['b'] = mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE); bufs['b'][:3] = b'bbb'; bufs['a'].close(); del bufs['a']")
    ids.append(cp.checkpoint("a unmapped, b mapped").id)
    r.run("bufs['b'].close(); bufs.clear(); bufs['c'] = bytearray(b'c' * (24 << 20))")
    ids.append(cp.checkpoint("c").id)
    cp.wait_background()
    # max_templates=2: only the root and the newest keep templates; others take the slow path
    expect = {ids[0]: [], ids[1]: ["a"], ids[2]: ["b"], ids[3]: ["c"]}
    for cid in [ids[1], ids[3], ids[2], ids[0], ids[1], ids[2]]:
        cp.rollback(cid)
        assert sorted(r.eval("list(bufs)")) == expect[cid]
        if cid == ids[1]:
            assert r.eval("bytes(bufs['a'][-7:])") == b"a-tail!"
        if cid == ids[2]:
            assert r.eval("bytes(bufs['b'][:3]), len(bufs['b'])") == (b"bbb", 16 << 20)
        if cid == ids[3]:
            assert r.eval("bufs['c'].count(b'c')") == 24 << 20


def test_file_offsets_are_restored_fast_and_slow(lab: Lab, store: str, tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "data.bin")
    data = bytes(range(256)) * 64
    with open(path, "wb") as f:
        f.write(data)
    r = lab.repl(f"g = open({path!r}, 'rb', buffering=0); first = g.read(10)")
    cp = lab.checkpointer(r.pid, store, max_templates=2, rehydrate=False)
    c1 = cp.checkpoint("g at 10").id
    r.run(f"g.read(100); h = open({path!r}, 'rb', buffering=0); h.seek(7)")
    c2 = cp.checkpoint("g at 110, h opened at 7").id
    r.run("g.read(1000); h.read(1000); h2 = h")
    # fast path: the template shares g's open file description; the offset is put back
    cp.rollback(c1)
    assert r.eval("g.tell(), g.read(5)") == (10, data[10:15])
    # two more checkpoints push c2's template out (the root stays): slow path
    cp.checkpoint()
    cp.checkpoint()
    cp.wait_background()
    assert cp.template_pid(c2) is None
    res = cp.rollback(c2)
    assert res.path == "slow" and res.warnings == []
    # h was opened after the root: the slow path reopens it at its offset
    assert r.eval("g.read(3), h.read(3)") == (data[110:113], data[7:10])
    assert r.eval("os.path.samefile(f'/proc/self/fd/{h.fileno()}', %r)" % path)


def test_slow_path_reopens_a_file_whose_open_flags_changed(lab: Lab, store: str, tmp_path: object) -> None:
    # The fd number and the file are the same at both checkpoints, the open
    # flags are not: the slow path must not keep the base's read-only fd.
    path = os.path.join(str(tmp_path), "log.txt")
    with open(path, "wb") as f:
        f.write(b"abc")
    r = lab.repl(f"P = {path!r}; fd = os.open(P, os.O_RDONLY); g = os.open(P, os.O_RDONLY)")
    cp = lab.checkpointer(r.pid, store, max_templates=8, rehydrate=False)
    cp.checkpoint("read-only, both close-on-exec")
    r.run("os.close(fd); fd2 = os.open(P, os.O_WRONLY | os.O_APPEND); os.set_inheritable(g, True)")
    assert r.eval("fd2 == fd")
    c2 = cp.checkpoint("fd appends, g inherited by exec").id
    r.run("os.close(fd2); fd2 = os.open(P, os.O_RDONLY)")
    cp.wait_background()
    assert cp.evict(c2)
    res = cp.rollback(c2)
    assert res.path == "slow" and res.warnings == []
    assert r.eval("os.write(fd2, b'def')") == 3
    with open(path, "rb") as f:
        assert f.read() == b"abcdef"

    def flags(fd: int) -> int:
        with open(f"/proc/{res.pid}/fdinfo/{fd}") as f:
            return int(f.read().split("flags:")[1].split()[0], 8)
    fd, g = r.eval("fd2, g")
    assert flags(fd) & (os.O_ACCMODE | os.O_APPEND) == os.O_WRONLY | os.O_APPEND
    assert flags(g) & (os.O_ACCMODE | os.O_CLOEXEC) == os.O_RDONLY
    assert r.eval("os.get_inheritable(g), os.read(g, 3)") == (True, b"abc")


def test_tree_of_checkpoints_rollback_to_any_node(lab: Lab, store: str) -> None:
    r = lab.repl("state = []; blob = bytearray(4 << 20)")
    cp = lab.checkpointer(r.pid, store, max_templates=4)
    rnd = random.Random(1234)
    expected: dict[int, list[int]] = {}
    cur: list[int] = []
    cid = cp.checkpoint("root").id
    expected[cid] = []
    for step in range(14):
        if step % 3 == 2:  # branch: go back to a random earlier node first
            back = rnd.choice(sorted(expected))
            cp.rollback(back)
            cur = list(expected[back])
            assert r.eval("state") == cur
        v = rnd.randrange(1000)
        cur = cur + [v]
        r.run(f"state.append({v}); blob[{v} * 4096] = {v % 256}")
        cid = cp.checkpoint(f"step {step}").id
        expected[cid] = list(cur)
    assert len(expected) >= 10
    cp.wait_background()
    order = sorted(expected)
    rnd.shuffle(order)
    paths = set()
    for node in order:
        res = cp.rollback(node)
        paths.add(res.path)
        assert r.eval("state") == expected[node], f"checkpoint {node} via the {res.path} path"
        assert r.eval("[blob[v * 4096] for v in state]") == [v % 256 for v in expected[node]]
    assert paths == {"fast", "slow"}
    tree = {c.id: c.parent for c in cp.list()}
    assert sum(1 for p in tree.values() if p is None) == 1


def test_list_reports_the_forks_behind_each_template(lab: Lab, store: str) -> None:
    """Every fork in a template's ancestry makes forks from it dearer (the
    kernel links each mapping to every ancestor's anon_vma): ``depth`` shows
    it. A fast-path rollback adds one fork (the restored process), a
    checkpoint one more; the slow path counts from the template it forked."""
    r = lab.repl("x = 0")
    cp = lab.checkpointer(r.pid, store)
    depth = lambda: {c.id: c.depth for c in cp.list()}  # noqa: E731
    c1 = cp.checkpoint().id
    r.run("x = 1")
    c2 = cp.checkpoint().id
    assert depth() == {c1: 1, c2: 1}  # both forked from the attached process
    cp.rollback(c2)
    r.run("x = 2")
    c3 = cp.checkpoint().id
    cp.rollback(c3)
    c4 = cp.checkpoint().id
    assert depth()[c3] == 3 and depth()[c4] == 5
    cp.wait_background()
    assert cp.evict(c3) and cp.evict(c4)
    res = cp.rollback(c4)  # slow: forked from c2's template (depth 1), c4's template re-made from it
    assert res.path == "slow" and res.base == c2 and r.eval("x") == 2
    c5 = cp.checkpoint().id
    assert depth()[c4] == 3 and depth()[c5] == 3


def test_rollback_revives_an_exited_process(lab: Lab, store: str) -> None:
    r = lab.repl("x = 'alive'")
    cp = lab.checkpointer(r.pid, store)
    cid = cp.checkpoint().id
    r.send("os._exit(3)\n")
    for _ in range(200):
        if cp.status()["state"] == "gone":
            break
        time.sleep(0.01)
    assert cp.status()["state"] == "gone"
    cp.rollback(cid)
    assert r.eval("x") == "alive"


def test_detach_leaves_the_process_running_untraced(lab: Lab, store: str) -> None:
    r = lab.repl("x = 41")
    fds_before = sorted(os.listdir(f"/proc/{r.pid}/fd"))
    cp = lab.checkpointer(r.pid, store)
    cp.checkpoint()
    c2 = cp.checkpoint().id
    tpls = list(cp.status()["templates"].values())
    live = cp.rollback(c2).pid
    cp.detach()
    assert tracer_of(live) == 0
    assert r.eval("x + 1") == 42
    assert r.eval("os.getpid()") == live
    # (with pfn or compare a rollback may resume c2's template itself: that one lives on)
    assert not any(is_alive(t) for t in tpls if t != live), "templates must die on detach"
    # the descriptors it had before we attached, no more: the userfaultfd we
    # planted at a high number is closed on detach
    assert sorted(os.listdir(f"/proc/{live}/fd")) == fds_before
    assert not any("userfaultfd" in os.readlink(f"/proc/{live}/fd/{fd}") for fd in os.listdir(f"/proc/{live}/fd"))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("pfn", "compare")])
def test_memory_dropped_with_madvise_comes_back_as_zero(lab: Lab, store: str, backend: str) -> None:
    # MADV_DONTNEED zeroes anonymous memory without a write: uffd-wp cannot see
    # it (a documented limit); frame comparison and content comparison do.
    r = lab.repl("m = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE); m[:] = b'q' * len(m)")
    cp = lab.checkpointer(r.pid, store, backend=backend, rehydrate=False)
    cp.checkpoint("full of q")
    r.run("m.madvise(mmap.MADV_DONTNEED)")
    c2 = cp.checkpoint("dropped").id
    r.run("m[:] = b'w' * len(m)")
    cp.wait_background()
    assert cp.evict(c2)
    assert cp.rollback(c2).path == "slow"
    assert r.eval("m[:].count(0)") == 1 << 20


def test_checkpoints_on_both_sides_of_an_execve(lab: Lab, store: str) -> None:
    r = lab.repl("before = 'old program'")
    cp = lab.checkpointer(r.pid, store)
    c1 = cp.checkpoint("before exec").id
    r.send("os.execv(sys.executable, [sys.executable, '-i', '-u', '-q', '-S'])\n")
    r.run("import os; after = 'new program'")
    c2 = cp.checkpoint("after exec").id
    r.run("after = 'changed'")
    cp.rollback(c1)
    assert r.eval("before") == "old program"
    cp.rollback(c2)
    assert r.eval("after") == "new program"
    c3 = cp.checkpoint("after exec, again").id
    r.run("after = 'changed again'")
    cp.wait_background()
    cp.rollback(c3)
    assert r.eval("after") == "new program"


@pytest.mark.skipif("pfn" not in BACKENDS, reason="in-place rollback compares page frames (needs root)")
def test_in_place_rollback_keeps_the_pid_and_matches_the_fast_path(lab: Lab, store: str, tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "f.bin")
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * 16)
    r = lab.repl(f"a = bytearray(6 << 20); a[::4096] = b'a' * (len(a) // 4096); g = open({path!r}, 'rb', 0)")
    r.run(RSEQ_SETUP)
    rseq = r.eval("RSEQ")
    r.run("g.read(5); os.chdir('/tmp')")
    cp = lab.checkpointer(r.pid, store)
    c1 = cp.checkpoint().id
    r.run("a[::8192] = b'z' * (len(a) // 8192); big = bytearray(os.urandom(5 << 20)); g.read(100); "
          "h = open(__file__ if '__file__' in dir() else '/etc/hostname'); os.chdir('/'); "
          "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1}); d = {i: i for i in range(50000)}")
    cp.wait_background()
    res = cp.rollback(c1, in_place=True, resume=False)
    assert res.path == "in-place" and res.pid == cp.live_pid == r.pid
    image_in_place = flatten(memory_image(res.pid), rseq)
    cp.resume()
    assert r.eval("a[4096], a[8192], 'big' in dir(), 'd' in dir(), g.tell(), os.getcwd()") == (
        ord("a"), ord("a"), False, False, 5, "/tmp")
    assert r.eval("signal.pthread_sigmask(signal.SIG_BLOCK, [])") == set()
    in_place_pid = res.pid
    fast = cp.rollback(c1, resume=False)
    assert fast.path == "fast" and fast.pid != in_place_pid
    image_fast = flatten(memory_image(fast.pid), rseq)
    cp.resume()
    assert image_in_place.keys() == image_fast.keys()
    diff = [hex(a) for a in image_fast if image_fast[a] != image_in_place[a]]
    assert diff == [], f"{len(diff)} pages differ, first {diff[:5]}"


def test_evicted_templates_do_not_pile_up_as_zombies(lab: Lab, store: str) -> None:
    # A Python REPL never reaps children it does not know about; the templates
    # deltacr kills are its children, so deltacr reaps them from inside it
    # (in batches), and all of them when it lets the process go.
    from deltacr.tracer import REAP_BATCH
    r = lab.repl("x = 0")
    cp = lab.checkpointer(r.pid, store, max_templates=2)

    def zombies() -> list[int]:
        return zombies_of({r.pid})

    for i in range(3 * REAP_BATCH):
        r.run(f"x = {i}")
        cp.checkpoint()
        cp.wait_background()
        assert len(zombies()) <= 2 * REAP_BATCH  # bounded, not one per checkpoint
    cp.detach()
    deadline = time.monotonic() + 5
    while zombies() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert zombies() == []
    assert r.eval("x") == 3 * REAP_BATCH - 1


def test_replaced_processes_do_not_pile_up_as_zombies_of_templates(lab: Lab, store: str) -> None:
    # A replaced live process is mostly a child of a template, which is
    # frozen and never waits: reaped from inside the template while the
    # tracer is idle, the template's registers, vector registers and pending
    # signals left as they were (audit: 6 x (rollback 1; rollback 5) with one
    # template left 16 zombies under the root template).
    from deltacr import _sys
    from deltacr.procfs import signal_pending
    r = lab.repl("x = 0")
    cp = lab.checkpointer(r.pid, store, max_templates=1, spares=False)  # spares: their forks move registers
    c1 = cp.checkpoint("root").id
    r.run("x = 1")
    c2 = cp.checkpoint("one").id
    cp.wait_background()
    root = cp.template_pid(c1)
    assert root is not None and cp.template_pid(c2) is None

    def frozen_state() -> tuple[bytes, bytes]:
        return _sys.ptrace_getregs(root).to_bytes(), _sys.ptrace_get_xstate(root)
    for _ in range(6):
        assert cp.rollback(c1).path == "fast" and r.eval("x") == 0
        assert cp.rollback(c2).path == "slow" and r.eval("x") == 1
    # The last rollback forks the root (a fork moves the registers of the
    # process it is injected into); the state after it is what the reaping
    # of the process it replaces must leave alone.
    old = cp.rollback(c1).pid
    assert read_stat(old).ppid == root
    res, before = cp._tracer.call(lambda: (cp._rollback(c2), frozen_state()))
    assert res.path == "slow" and r.eval("x") == 1
    deadline = time.monotonic() + 10
    while (zombies_of({root}) or os.path.exists(f"/proc/{old}")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert zombies_of({root}) == [] and not os.path.exists(f"/proc/{old}")
    assert cp.template_pid(c1) == root
    assert cp._tracer.call(frozen_state) == before
    assert not signal_pending(root), "the SIGCHLDs of the reaped children must not stay pending"
    assert cp.rollback(c1).path == "fast" and r.eval("x") == 0


def test_templates_killed_from_outside_fall_back_to_the_slow_path_then_fail_clearly(lab: Lab, store: str) -> None:
    # A pkill that matches the program matches the frozen copies too
    from deltacr import RestoreFailed
    r = lab.repl("x = 1")
    cp = lab.checkpointer(r.pid, store, spares=False)
    c1 = cp.checkpoint("one").id
    r.run("x = 2")
    c2 = cp.checkpoint("two").id
    r.run("x = 3")
    cp.wait_background()
    _kill_and_wait(cp.template_pid(c2))
    res = cp.rollback(c2)
    assert res.path == "slow" and r.eval("x") == 2
    assert any("killed from outside" in w for w in cp.warnings)
    _kill_and_wait(cp.template_pid(c1))
    with pytest.raises(RestoreFailed, match="no frozen copy of it or of an ancestor is left"):
        cp.rollback(c1)


def _kill_and_wait(pid: int | None) -> None:
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while read_stat(pid).state != "Z" and time.monotonic() < deadline:  # our tracee: a zombie until we wait
        time.sleep(0.01)


def test_restored_processes_that_exit_by_themselves_do_not_stay_zombies(lab: Lab, store: str) -> None:
    # A restored process is a child of a template, which never waits: one
    # that exits on its own is reaped from inside the template, like the
    # ones DeltaCR kills (audit: 4 rollbacks + exits left 4 zombies).
    r = lab.repl("x = 0")
    cp = lab.checkpointer(r.pid, store)
    c1 = cp.checkpoint("root").id
    lives = []
    for _ in range(3):
        lives.append(cp.rollback(c1).pid)
        r.send("os._exit(3)\n")
        deadline = time.monotonic() + 5
        while cp.status()["state"] != "gone" and time.monotonic() < deadline:
            time.sleep(0.02)
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") for p in lives) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [p for p in lives if os.path.exists(f"/proc/{p}")] == [], "exited processes stay zombies"
    assert cp.rollback(c1).path == "fast" and r.eval("x") == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_checkpoint_refused_for_threads_loses_no_written_page(lab: Lab, store: str, backend: str) -> None:
    # The refusal comes after the dirty pages were collected (the threads
    # are counted during the fork, off the critical path): the next
    # checkpoint's delta must still hold what was written before it.
    r = lab.repl("import threading; a = bytearray(4 << 20)")
    cp = lab.checkpointer(r.pid, store, backend=backend, max_templates=8, rehydrate=False)
    root = cp.checkpoint("root").id
    r.run("a[::4096] = b'w' * (len(a) // 4096); ev = threading.Event(); t = threading.Thread(target=ev.wait); t.start()")
    with pytest.raises(MultiThreaded, match=rf"pid {r.pid} .*now has 2 threads"):
        cp.checkpoint("refused")
    r.run("ev.set(); t.join()")
    deadline = time.monotonic() + 5
    while int(open(f"/proc/{r.pid}/status").read().split("Threads:")[1].split()[0]) > 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    after = cp.checkpoint("after").id
    cp.wait_background()
    assert cp.evict(after)
    r.run("a[:] = bytes(len(a))")
    res = cp.rollback(after)
    assert res.path == "slow" and res.base == root
    assert r.eval("a.count(b'w')") == (4 << 20) // 4096


def test_signals_sent_during_checkpoints_all_arrive_and_fail_none(lab: Lab, store: str) -> None:
    # A signal that reaches the process while a checkpoint runs in it (a
    # shell's SIGCHLD, a ^C) must not be lost, and one that arrives while the
    # injected fork copies the page tables (fork() then gives up with
    # ERESTARTNOINTR) must not fail the checkpoint. Real-time signals queue,
    # and Python's wakeup fd gets one byte per delivery: an exact count.
    r = lab.repl("import os, select, signal; rd, wr = os.pipe(); os.set_blocking(wr, False); os.set_blocking(rd, False); "
                 "big = bytearray(32 << 20); big[::4096] = b'x' * (len(big) // 4096); "
                 "signal.signal(signal.SIGRTMIN, lambda *a: None); signal.set_wakeup_fd(wr)")
    cp = lab.checkpointer(r.pid, store, rehydrate=False)
    sent = 0
    for _ in range(15):  # one just before each checkpoint: it arrives during the stop
        os.kill(r.pid, signal.SIGRTMIN)
        sent += 1
        cp.checkpoint()
        time.sleep(0.005)
    stop = threading.Event()
    pumped = [0]

    def pump() -> None:  # and a storm, while checkpoints run back to back
        while not stop.is_set():
            os.kill(r.pid, signal.SIGRTMIN)
            pumped[0] += 1
            time.sleep(0.0003)
    t = threading.Thread(target=pump)
    t.start()
    try:
        for _ in range(25):
            cp.checkpoint()
    finally:
        stop.set()
        t.join()
    deadline = time.monotonic() + 5
    got = 0
    while got < sent + pumped[0] and time.monotonic() < deadline:
        got += r.eval("(lambda b: b.count(bytes([int(signal.SIGRTMIN)])))(os.read(rd, 1 << 20) "
                      "if select.select([rd], [], [], 0)[0] else b'')")
        time.sleep(0.05)
    assert got == sent + pumped[0], f"{sent + pumped[0]} signals sent, {got} delivered"


def test_a_signal_that_came_during_a_checkpoint_interrupts_a_blocked_read(lab: Lab, store: str) -> None:
    # ^C while the REPL waits for input, in the middle of a checkpoint: it
    # must interrupt the read() at once, as without us, not when the next
    # line comes (and then eat that line). SIGUSR1 stands in for SIGINT.
    r = lab.repl("import signal; signal.signal(signal.SIGUSR1, signal.default_int_handler)")
    cp = lab.checkpointer(r.pid, store, rehydrate=False)
    cp.checkpoint()
    cp.stop()  # stopped in its read(); the signal waits until we let it run
    os.kill(r.pid, signal.SIGUSR1)
    cp.capture("signal pending")  # the injected fork meets the signal first
    cp.resume()
    deadline = time.monotonic() + 5
    while "KeyboardInterrupt" not in r.stderr_text():
        assert time.monotonic() < deadline, "the read() went on waiting: the signal's EINTR was lost"
        time.sleep(0.01)
    assert r.eval("1 + 1") == 2, "the next input is read as usual"
    # a handler that asks for restarts (SA_RESTART) gets one, and nothing breaks
    r.run("signal.signal(signal.SIGUSR2, lambda *a: None); signal.siginterrupt(signal.SIGUSR2, False)")
    cp.stop()
    os.kill(r.pid, signal.SIGUSR2)
    cp.capture("restarting")
    cp.resume()
    assert r.eval("2 + 2") == 4
