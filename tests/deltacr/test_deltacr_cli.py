"""The deltacr command line and its background daemon, as a script uses them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from deltacr_helpers import Lab, is_alive, tracer_of


def deltacr(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "deltacr.cli", *args], capture_output=True, text=True,
                         env=env, timeout=120)
    if ok:
        assert res.returncode == 0, f"deltacr {' '.join(args)}: {res.stdout}{res.stderr}"
    return res


def test_check_reports_backends(cli_env: dict[str, str]) -> None:
    res = deltacr(cli_env, "check")
    assert "fork injection" in res.stdout and "dirty-tracking backend:" in res.stdout
    assert "soft-dirty" in res.stdout  # says whether soft-dirty works (it does not on our machines)


def test_cli_session_survives_rollbacks(lab: Lab, cli_env: dict[str, str]) -> None:
    r = lab.repl("x = 'first'; big = bytearray(16 << 20)")
    pid = str(r.pid)
    assert r.pid not in (os.getpid(), os.getppid())
    lab.daemons.append(r.pid)
    out = deltacr(cli_env, "attach", pid, "--max-templates", "3").stdout
    assert f"attached to pid {pid}" in out
    c1 = deltacr(cli_env, "checkpoint", pid, "--label", "one").stdout
    assert c1 == "1\n"
    r.run("x = 'second'; big[7] = 7")
    c2 = deltacr(cli_env, "checkpoint", pid, "--label", "two").stdout.strip()
    r.run("x = 'third'")
    live = deltacr(cli_env, "rollback", pid, "1").stdout
    assert live.strip().isdigit() and int(live) != r.pid
    assert r.eval("x, big[7], os.getpid()") == ("first", 0, int(live))
    # naming the session by its live pid: the error names the session's pid
    for args in (["checkpoint", live.strip()], ["attach", live.strip()]):
        res = deltacr(cli_env, *args, ok=False)
        assert res.returncode == 1 and res.stdout == "", res.stderr
        assert f"pid {live.strip()} is the live process of the deltacr session {pid}" in res.stderr, res.stderr
        assert f"`deltacr status {pid}`" in res.stderr and "Traceback" not in res.stderr
    # a frozen copy is not a process to attach either, and is named so
    tpl = json.loads(deltacr(cli_env, "status", pid, "--json").stdout)["templates"]["1"]
    res = deltacr(cli_env, "attach", str(tpl), ok=False)
    assert res.returncode == 1 and "a frozen copy (a checkpoint" in res.stderr and f"session is named {pid}" in res.stderr
    # the original pid still names the session
    live2 = int(deltacr(cli_env, "rollback", pid, c2).stdout)
    assert r.eval("x, big[7]") == ("second", 7)
    rows = json.loads(deltacr(cli_env, "list", pid, "--json").stdout)
    assert [(row["id"], row["parent"], row["label"]) for row in rows] == [(1, None, "one"), (2, 1, "two")]
    assert [row["current"] for row in rows] == [False, True]
    assert [row["depth"] for row in rows] == [1, 1]  # both forked from the attached process
    st = json.loads(deltacr(cli_env, "status", pid, "--json").stdout)
    assert st["pid"] == r.pid and st["live_pid"] == live2 and st["state"] == "running"
    table = deltacr(cli_env, "list", pid).stdout
    assert "one" in table and "two" in table and "depth" in table.splitlines()[0]
    # inspect reads the delta the daemon wrote
    deltacr(cli_env, "status", pid)
    store = st["store"]
    deadline = time.monotonic() + 20
    path = os.path.join(store, "deltas", "2.delta")
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    ins = deltacr(cli_env, "inspect", path).stdout
    assert "checkpoint      2 (parent 1)" in ins and "checksums ok" in ins
    # errors: clear message, exit 1, nothing changed
    bad = deltacr(cli_env, "rollback", pid, "42", ok=False)
    assert bad.returncode == 1 and "has no checkpoint 42" in bad.stderr and bad.stdout == ""
    again = deltacr(cli_env, "attach", pid, ok=False)
    assert again.returncode == 1 and "already attached" in again.stderr
    assert r.eval("x") == "second"
    deltacr(cli_env, "detach", pid)
    lab.daemons.remove(r.pid)
    assert tracer_of(live2) == 0 and r.eval("x") == "second"
    gone = deltacr(cli_env, "status", pid, ok=False)
    assert gone.returncode == 1 and f"deltacr attach {pid}" in gone.stderr


def test_cli_refuses_missing_pid(cli_env: dict[str, str]) -> None:
    res = deltacr(cli_env, "attach", "999999999", ok=False)
    assert res.returncode == 1 and "does not exist" in res.stderr


def test_daemon_death_leaves_the_process_running(lab: Lab, cli_env: dict[str, str]) -> None:
    r = lab.repl("x = 1")
    pid = str(r.pid)
    lab.daemons.append(r.pid)
    deltacr(cli_env, "attach", pid)
    deltacr(cli_env, "checkpoint", pid)
    r.run("x = 2")
    deltacr(cli_env, "checkpoint", pid)
    st = json.loads(deltacr(cli_env, "status", pid, "--json").stdout)
    templates = list(st["templates"].values())
    lab.daemon_pids.append(st["daemon_pid"])
    os.kill(st["daemon_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (any(is_alive(t) for t in templates) or tracer_of(r.pid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(is_alive(t) for t in templates), "templates must die with the daemon"
    assert tracer_of(r.pid) == 0
    assert r.eval("x + 40") == 42
    lab.daemons.remove(r.pid)


def test_reattach_after_daemon_death_keeps_the_old_deltas(lab: Lab, cli_env: dict[str, str]) -> None:
    r = lab.repl("x = 1")
    pid = str(r.pid)
    lab.daemons.append(r.pid)
    deltacr(cli_env, "attach", pid)
    deltacr(cli_env, "checkpoint", pid)
    assert deltacr(cli_env, "checkpoint", pid).stdout == "2\n"
    st = json.loads(deltacr(cli_env, "status", pid, "--json").stdout)
    waited = subprocess.run([sys.executable, "-c", "import sys; from deltacr.client import Client; "
                                  f"Client({pid}).wait_background()"], env=cli_env, timeout=60)
    assert waited.returncode == 0
    old = open(os.path.join(st["store"], "deltas", "2.delta"), "rb").read()
    os.kill(st["daemon_pid"], signal.SIGKILL)
    lab.daemon_pids.append(st["daemon_pid"])
    deadline = time.monotonic() + 10
    while tracer_of(r.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    # a new session for the same process, in the same store: ids go on, old files stay
    deltacr(cli_env, "attach", pid)
    assert deltacr(cli_env, "checkpoint", pid).stdout == "3\n"
    assert open(os.path.join(st["store"], "deltas", "2.delta"), "rb").read() == old
    assert r.eval("x") == 1


def test_pfn_slow_path_leaves_a_page_of_a_private_file_mapping_that_was_only_read_to_the_file(
        lab: Lab, cli_env: dict[str, str], tmp_path: object) -> None:
    # Such a page is the file's: the fast path shows the file as it is. The
    # pfn tracker once put it in a delta (its frame appeared), and the slow
    # path wrote that content back as private memory: stale once the file
    # changed (found by an audit through the CLI).
    path = os.path.join(str(tmp_path), "private.bin")
    with open(path, "wb") as f:
        f.write(b"A" * 16384)
    r = lab.repl(f"import mmap; fp = open({path!r}, 'rb'); "
                 "MP = mmap.mmap(fp.fileno(), 0, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)")
    pid = str(r.pid)
    lab.daemons.append(r.pid)
    deltacr(cli_env, "attach", pid, "--max-templates", "2", "--backend", "pfn")
    deltacr(cli_env, "checkpoint", pid)
    r.run("MP[8192:8196] = b'PPPP'")  # a written page: private from now on
    assert r.eval("bytes(MP[0:4])") == b"AAAA"  # only read: the file's page
    deltacr(cli_env, "checkpoint", pid)
    with open(path, "r+b") as f:
        f.write(b"BBBB")
    assert r.eval("bytes(MP[0:4])") == b"BBBB"
    c3 = deltacr(cli_env, "checkpoint", pid).stdout.strip()
    deltacr(cli_env, "checkpoint", pid)
    deltacr(cli_env, "checkpoint", pid)  # two templates kept: c3's is gone
    time.sleep(0.5)
    deltacr(cli_env, "rollback", pid, c3)
    rows = {row["id"]: row for row in json.loads(deltacr(cli_env, "list", pid, "--json").stdout)}
    assert rows[int(c3)]["current"]
    assert r.eval("bytes(MP[0:4])") == b"BBBB", "the slow path brought back the file as it was"
    assert r.eval("bytes(MP[8192:8196])") == b"PPPP"
