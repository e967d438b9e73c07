"""Spares: a rollback to a checkpoint whose template has a pre-forked child
uses that child instead of forking on the critical path. It must restore
exactly what a fork would, survive the spare being killed, and leave no
process behind when templates are evicted or the session ends."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from deltacr import ProcessCheckpointer, RollbackResult, available_backends
from deltacr_helpers import RSEQ_SETUP, Lab, Repl, flatten, is_alive, memory_image


def _wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(is_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    return [p for p in pids if is_alive(p)]


@pytest.mark.parametrize("backend", available_backends())
def test_rollback_uses_the_spare_and_restores_what_a_fork_would(lab: Lab, store: str, backend: str) -> None:
    r = lab.repl("d = {'k': 1}; big = bytearray(os.urandom(1 << 20)) * 8; h = hash(bytes(big))")
    r.run(RSEQ_SETUP)
    rseq = r.eval("RSEQ")
    cp = lab.checkpointer(r.pid, store, backend=backend, rehydrate=False)
    c1 = cp.checkpoint("one").id
    r.run("d['k'] = 2; big[:4] = b'WXYZ'")
    c2 = cp.checkpoint("two").id
    r.run("d.clear(); big[:] = bytes(len(big))")
    cp.wait_background()
    spares = {int(c): p for c, p in cp.status()["spares"].items()}
    assert set(spares) == {c1, c2}
    assert all(is_alive(p) for p in spares.values())

    templates = {int(c): int(p) for c, p in cp.status()["templates"].items()}

    def used_the_spare(res: RollbackResult, cid: int) -> bool:
        if backend == "uffd-wp":  # the spare runs: its tracking was armed ahead of time
            return res.pid == spares[cid]
        # the template runs and its spare, an identical frozen child, takes its place
        return res.pid == templates[cid] and int(cp.status()["templates"][str(cid)]) == spares[cid]

    res = cp.rollback(c1)
    assert res.path == "fast" and res.spare and used_the_spare(res, c1)
    assert r.eval("d, hash(bytes(big)) == h") == ({"k": 1}, True)
    res = cp.rollback(c2)  # its spare was made long ago: still there
    assert res.spare and used_the_spare(res, c2)
    assert r.eval("d['k'], bytes(big[:4])") == (2, b"WXYZ")

    # dirty tracking was armed in the spare (ahead of time for uffd-wp): the
    # next delta holds what changed since, so the slow path rebuilds it
    r.run("d['k'] = 7; big[8:12] = b'QQQQ'")
    c3 = cp.checkpoint("three").id
    cp.wait_background()
    assert cp.evict(c3)
    cp.rollback(c1)
    slow = cp.rollback(c3)
    assert slow.path == "slow" and slow.base == c2
    assert r.eval("d['k'], bytes(big[:4]), bytes(big[8:12])") == (7, b"WXYZ", b"QQQQ")

    # the same checkpoint again, once with a new spare, once forked: same memory
    r.run("d['k'] = 3")
    cp.wait_background()
    with_spare = cp.rollback(c2, resume=False)
    assert with_spare.spare
    image_spare = flatten(memory_image(with_spare.pid), rseq)
    cp.resume()
    cp.spares = False
    forked = cp.rollback(c2, resume=False)
    assert forked.path == "fast" and not forked.spare
    image_fork = flatten(memory_image(forked.pid), rseq)
    cp.resume()
    assert image_spare.keys() == image_fork.keys()
    diff = [hex(a) for a in image_fork if image_fork[a] != image_spare[a]]
    assert diff == [], f"{len(diff)} pages differ, first {diff[:5]}"
    assert r.eval("d['k'], bytes(big[:4])") == (2, b"WXYZ")


def test_a_killed_spare_is_replaced_by_a_fork(lab: Lab, store: str) -> None:
    r = lab.repl("x = 'first'")
    cp = lab.checkpointer(r.pid, store)
    c1 = cp.checkpoint().id
    r.run("x = 'second'")
    cp.wait_background()
    spare = int(cp.status()["spares"][str(c1)])
    os.kill(spare, signal.SIGKILL)
    assert _wait_gone([spare]) == []
    res = cp.rollback(c1)
    assert res.path == "fast" and not res.spare and res.pid != spare
    assert r.eval("x") == "first"
    cp.wait_background()  # a new spare for c1
    assert int(cp.status()["spares"][str(c1)]) not in (spare, res.pid)


def test_spares_go_with_their_templates(lab: Lab, store: str) -> None:
    r = lab.repl("x = 0")
    cp = lab.checkpointer(r.pid, store, max_templates=2)
    seen: set[int] = set()
    for i in range(6):
        r.run(f"x = {i}")
        cp.checkpoint()
        cp.wait_background()
        st = cp.status()
        assert set(st["spares"]) <= set(st["templates"])
        seen |= {int(p) for p in st["spares"].values()}
    st = cp.status()
    kept = {int(p) for p in st["spares"].values()}
    assert len(kept) == 2 and len(seen) == 6
    assert _wait_gone(sorted(seen - kept)) == [], "an evicted template's spare must die with it"
    cp.detach()
    assert _wait_gone(sorted(kept)) == []
    assert r.eval("x") == 5


def test_a_spare_that_was_sent_a_signal_is_not_used(lab: Lab, store: str) -> None:
    # A signal sent to the process group reaches the waiting spares too; it
    # was meant for the process of that moment, not for a later rollback.
    r = lab.repl("import signal; got = []; signal.signal(signal.SIGUSR1, lambda *a: got.append(1))")
    cp = lab.checkpointer(r.pid, store)
    c1 = cp.checkpoint().id
    cp.wait_background()
    spare = int(cp.status()["spares"][str(c1)])
    os.kill(spare, signal.SIGUSR1)
    res = cp.rollback(c1)
    assert not res.spare and res.pid != spare
    assert r.eval("got") == []
    assert _wait_gone([spare]) == []


def test_the_first_rollback_to_a_checkpoint_resumes_its_template(lab: Lab, store: str) -> None:
    """With a spare and nothing armed ahead of time (pfn, compare), the first
    rollback to a checkpoint resumes the template itself and its spare (an
    identical frozen child) becomes the template: the restored process has
    one fork fewer behind it, and so has every checkpoint taken from it (a
    fork costs more the longer that chain, docs/deltacr.md). Later rollbacks
    to it use spares as usual, so its template does not sink deeper."""
    backend = "pfn" if "pfn" in available_backends() else "compare"
    r = lab.repl("x = 0; big = bytearray(os.urandom(1 << 20))")
    r.run(RSEQ_SETUP)
    rseq = r.eval("RSEQ")
    cp = lab.checkpointer(r.pid, store, backend=backend, rehydrate=False)
    depth = lambda: {c.id: c.depth for c in cp.list()}  # noqa: E731
    c1 = cp.checkpoint("one").id
    template = int(cp.status()["templates"][str(c1)])
    r.run("x = 1; big[:2] = b'01'")
    cp.wait_background()  # c1's spare is there, its delta on disk
    res = cp.rollback(c1)
    assert res.spare and res.pid == template and r.eval("x, bytes(big[:2]) != b'01'") == (0, True)
    c2 = cp.checkpoint("two").id
    assert depth()[c1] == 2 and depth()[c2] == 2  # a spare would have made c2 3
    r.run("x = 2")
    cp.wait_background()
    res = cp.rollback(c1)
    assert res.spare and res.pid != int(cp.status()["templates"][str(c1)]) and r.eval("x") == 0
    c3 = cp.checkpoint("three").id
    assert depth()[c1] == 2 and depth()[c3] == 4
    # the template c1 has now (a former spare) restores what the first did
    cp.wait_background()
    a = cp.rollback(c1, resume=False)
    image_a = flatten(memory_image(a.pid), rseq)
    cp.resume()
    cp.spares = False
    b = cp.rollback(c1, resume=False)
    assert not b.spare
    image_b = flatten(memory_image(b.pid), rseq)
    cp.resume()
    assert image_a.keys() == image_b.keys()
    assert [hex(k) for k in image_a if image_a[k] != image_b[k]] == []
    assert r.eval("x") == 0


def test_an_abandoned_rollback_leaves_the_template_and_its_spare_as_they_were(lab: Lab, store: str) -> None:
    from deltacr import Gate, RestoreFailed
    backend = "pfn" if "pfn" in available_backends() else "compare"
    r = lab.repl("x = 'one'")
    cp = lab.checkpointer(r.pid, store, backend=backend, rehydrate=False)
    c1 = cp.checkpoint().id
    r.run("x = 'two'")
    cp.wait_background()
    st = cp.status()
    template, spare = int(st["templates"][str(c1)]), int(st["spares"][str(c1)])
    gate = Gate()
    stopped, fut = cp.rollback_gated(c1, gate)
    stopped.wait()
    gate.open(False)  # the caller gives up: the old process goes on
    with pytest.raises(RestoreFailed, match="abandoned"):
        fut.result()
    assert r.eval("x") == "two"
    st = cp.status()
    assert (int(st["templates"][str(c1)]), int(st["spares"][str(c1)])) == (template, spare)
    assert is_alive(template) and is_alive(spare)
    res = cp.rollback(c1)  # and both still restore c1
    assert res.spare and r.eval("x") == "one"


def test_an_abandoned_rollback_leaves_the_old_process_its_file_offsets(lab: Lab, store: str,
                                                                        tmp_path: Path) -> None:
    # The restored process shares the open file descriptions of files open
    # since before the checkpoint with the old one: setting its offsets moved
    # the old process's too, and an abandoned rollback must put them back.
    from deltacr import Gate, RestoreFailed
    data = tmp_path / "data"
    data.write_bytes(bytes(range(256)) * 64)
    r = lab.repl(f"f = open({str(data)!r}, 'rb', buffering=0); f.read(100)")
    cp = lab.checkpointer(r.pid, store, rehydrate=False)
    c1 = cp.checkpoint().id
    r.run("f.read(5000)")
    cp.wait_background()
    for _ in range(2):  # with its spare, then (spares off) forked from the template
        gate = Gate()
        stopped, fut = cp.rollback_gated(c1, gate)
        stopped.wait()
        gate.open(False)
        with pytest.raises(RestoreFailed, match="abandoned"):
            fut.result()
        assert r.eval("f.tell()") == 5100, "the old process's offset moved"
        cp.spares = False
    assert cp.rollback(c1).pid == cp.live_pid and r.eval("f.tell()") == 100


def _resumable_session(lab: Lab, store: str) -> tuple[Repl, ProcessCheckpointer, int, int]:
    """A REPL (x = 'one') under a backend whose spares are not armed ahead
    of time, its first checkpoint and that checkpoint's template pid."""
    backend = "pfn" if "pfn" in available_backends() else "compare"
    r = lab.repl("x = 'one'")
    cp = lab.checkpointer(r.pid, store, backend=backend, rehydrate=False)
    c1 = cp.checkpoint().id
    return r, cp, c1, int(cp.status()["templates"][str(c1)])


def test_a_template_that_had_other_children_is_not_resumed(lab: Lab, store: str) -> None:
    # Resumed, it would find a child it never forked (a process restored
    # from it earlier, now killed): its spare runs instead.
    r, cp, c1, template = _resumable_session(lab, store)
    cp.spares = False
    first = cp.rollback(c1)  # forked from the template: its child
    assert not first.spare
    cp.spares = True
    r.run("x = 'two'")
    cp.wait_background()
    spare = int(cp.status()["spares"][str(c1)])
    res = cp.rollback(c1)
    assert res.spare and res.pid == spare and int(cp.status()["templates"][str(c1)]) == template
    assert r.eval("x") == "one"
    assert _children(res.pid) == [], "the restored process must have no child it did not fork"


def test_a_template_the_slow_path_forked_from_is_not_resumed(lab: Lab, store: str) -> None:
    r, cp, c1, template = _resumable_session(lab, store)
    r.run("x = 'two'")
    c2 = cp.checkpoint().id
    cp.wait_background()
    assert cp.evict(c2)
    slow = cp.rollback(c2)  # forked from c1's template: its child
    assert slow.path == "slow" and slow.base == c1 and r.eval("x") == "two"
    cp.wait_background()
    res = cp.rollback(c1)  # the first rollback to c1, with a spare
    assert res.spare and res.pid != template and r.eval("x") == "one"
    assert _children(res.pid) == [], "the restored process must have no child it did not fork"


def _children(pid: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == pid]


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return -1
