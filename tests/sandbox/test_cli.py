"""The deltabox CLI: named sandboxes in a background daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deltafs.mounts import top_mount


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deltabox.cli", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def name(tmp_path: Path) -> Iterator[str]:
    n = f"t{uuid.uuid4().hex[:8]}"
    try:
        yield n
    finally:
        cli("stop", n)
        subprocess.run(["rm", "-rf", f"/var/lib/deltabox/{n}"], check=False)


def test_run_checkpoint_rollback_list_stop(tmp_path: Path, name: str) -> None:
    base = tmp_path / "repo"
    base.mkdir()
    (base / "f").write_text("v1")
    script = "i=0; while true; do i=$((i+1)); echo $i > c.tmp; mv c.tmp counter; sleep 0.05; done"
    r = cli("run", "--base", str(base), "--name", name, "--", "bash", "-c", script)
    assert r.returncode == 0, r.stderr
    root = Path(f"/var/lib/deltabox/{name}/root")
    time.sleep(0.5)
    before = int((root / "counter").read_text())
    r = cli("checkpoint", name, "--label", "first")
    assert r.returncode == 0 and r.stdout.strip().isdigit(), r.stderr
    sid = r.stdout.strip()
    after = int((root / "counter").read_text())
    time.sleep(1.0)
    high = int((root / "counter").read_text())
    assert high > after + 5, "the loop kept running after the checkpoint"
    r = cli("rollback", name, sid)
    assert r.returncode == 0, r.stderr
    n = int((root / "counter").read_text())
    assert before <= n <= after + 4 < high, "the loop goes on from the checkpoint's count"
    r = cli("list", name, "--json")
    states = json.loads(r.stdout)
    assert states[0]["label"] == "first" and states[0]["current"]
    r = cli("run", "--base", str(base), "--name", name, "--", "true")
    assert r.returncode != 0 and "already running" in r.stderr
    r = cli("rollback", name, "77")
    assert r.returncode != 0 and "no state 77" in r.stderr
    r = cli("stop", name)
    assert r.returncode == 0, r.stderr
    assert top_mount(str(root)) is None
    r = cli("checkpoint", name)
    assert r.returncode != 0 and "no running sandbox" in r.stderr


def _ended(pid: int) -> bool:
    """Gone, or a zombie (an orphan's new parent may be this very process:
    a subreaper once a test made it one); ours is reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    if state != "Z":
        return False
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return True


def _with_token(token: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and token.encode() in (d / "cmdline").read_bytes():
                if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(int(d.name))
        except OSError:
            pass
    return out


def test_kill_9_of_the_daemon_then_clean_stop(tmp_path: Path, name: str) -> None:
    base = tmp_path / "repo"
    base.mkdir()
    # what the process starts stays behind when the daemon dies: a background
    # job, an orphan (its parent subshell gone) and a daemon of its own
    # session (setsid) -- stop ends them too
    token = f"10{os.getpid() % 1000:03d}.25"
    script = (f"sleep {token} & (sleep {token} &); setsid sleep {token} & "
              "cd sub && exec python3 -u -i -q")
    (base / "sub").mkdir()
    try:
        r = cli("run", "--base", str(base), "--name", name, "--", "bash", "-c", script)
        assert r.returncode == 0, r.stderr
        assert cli("checkpoint", name).returncode == 0
        rec = json.loads(Path(f"/var/lib/deltabox/{name}/sandbox.json").read_text())
        procs = [int(p[0]) for p in rec["procs"].values() if p]
        deadline = time.monotonic() + 5
        while len(started := _with_token(token)) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(started) == 3, started
        os.kill(rec["daemon"][0], signal.SIGKILL)
        time.sleep(0.3)
        for args in (["list", name], ["checkpoint", name], ["run", "--name", name, "--", "bash"]):
            r = cli(*args)
            assert r.returncode == 1 and f"'deltabox stop {name}' ends it" in r.stderr, (args, r.stderr)
            assert "is gone" in r.stderr and "Traceback" not in r.stderr
        r = cli("stop", name)
        assert r.returncode == 0, r.stderr
        assert top_mount(rec["root"]) is None, "no mount left behind"
        for pid in procs:
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
        assert _with_token(token) == [], "what the sandbox's process started is ended too"
        assert os.path.isdir(f"/var/lib/deltabox/{name}/store/fs/index"), "the store stays intact"
    finally:
        for pid in _with_token(token):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("args", [["--name", "../../../tmp/x/trav"], ["--name", "/"], ["--name", ".."],
                                  ["--name", "ok", "--proc", "../p"], ["--name", "ok", "--proc", "."]])
def test_names_that_could_escape_are_refused(tmp_path: Path, args: list[str]) -> None:
    victim = tmp_path / "x" / "trav"
    (victim / "store").mkdir(parents=True)
    (victim / "store" / "keep").write_text("precious")
    base = tmp_path / "repo"
    base.mkdir()
    r = cli("run", "--base", str(base), *args, "--", "sleep", "100")
    assert r.returncode == 1 and "not allowed" in r.stderr, r.stderr
    assert (victim / "store" / "keep").read_text() == "precious"
    assert not os.path.exists("/var/lib/deltabox/ok"), "a bad --proc is refused before the sandbox starts"
    for cmd in (["checkpoint", "../x"], ["stop", "/"], ["list", ".."]):
        r = cli(*cmd)
        assert r.returncode == 1 and "not allowed" in r.stderr, r.stderr


def test_stop_after_a_stale_record_kills_no_unrelated_process(tmp_path: Path, name: str) -> None:
    # A record left by a daemon that died long ago (or before a reboot) names
    # pids that may belong to anything by now: they are not killed, nor
    # their sessions. The bystander has a session of its own, with a child.
    bystander = subprocess.Popen(["bash", "-c", "sleep 100 & wait"], start_new_session=True)
    try:
        workdir = Path(f"/var/lib/deltabox/{name}")
        workdir.mkdir(parents=True)
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        start = int(Path(f"/proc/{bystander.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        sessions = [bystander.pid]
        kids = Path(f"/proc/{bystander.pid}/task/{bystander.pid}/children")
        deadline = time.monotonic() + 5
        while not kids.read_text().split() and time.monotonic() < deadline:
            time.sleep(0.01)
        child = [int(p) for p in kids.read_text().split()]
        assert len(child) == 1
        for rec in ({"boot": boot, "daemon": [bystander.pid, start + 1], "procs": {"sh": [bystander.pid, 5]},
                     "sessions": sessions},
                    {"boot": "another-boot", "daemon": [bystander.pid, start], "procs": {},
                     "sessions": sessions},
                    {"daemon": bystander.pid, "procs": {"sh": bystander.pid}}):  # an older format
            (workdir / "sandbox.json").write_text(json.dumps(rec))
            r = cli("stop", name)
            assert r.returncode == 0, r.stderr
            assert bystander.poll() is None, f"stop killed an unrelated process after {rec}"
            assert os.path.exists(f"/proc/{child[0]}"), f"stop killed an unrelated session after {rec}"
            assert not (workdir / "sandbox.json").exists()
        # the same process, same boot: that one is the sandbox's and goes,
        # with what it started (its session, which the record lists)
        (workdir / "sandbox.json").write_text(json.dumps(
            {"boot": boot, "procs": {"sh": [bystander.pid, start]}, "sessions": sessions}))
        assert cli("stop", name).returncode == 0
        assert bystander.wait(timeout=10) == -signal.SIGKILL
        deadline = time.monotonic() + 5
        while not _ended(child[0]) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _ended(child[0]), "the sandbox process's child is ended too"
    finally:
        try:
            os.killpg(bystander.pid, signal.SIGKILL)  # its own group: the child too
        except ProcessLookupError:
            pass
        bystander.kill()
        bystander.wait()


def test_a_run_whose_command_fails_stops_the_sandbox_it_created(tmp_path: Path, name: str) -> None:
    base = tmp_path / "repo"
    base.mkdir()
    root = f"/var/lib/deltabox/{name}/root"
    for cmd, error in ((["/nonexistent"], "cannot start /nonexistent"), (["true"], "true exited")):
        r = cli("run", "--base", str(base), "--name", name, "--", *cmd)
        assert r.returncode == 1 and error in r.stderr and "stopped again" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert top_mount(root) is None, "no mount left behind"
        assert not os.path.exists(f"/var/lib/deltabox/{name}/sandbox.json")
        r = cli("list", name)
        assert r.returncode == 1 and "no running sandbox" in r.stderr, r.stderr
    r = cli("run", "--base", str(base), "--name", name, "--", "sleep", "100")  # the retry
    assert r.returncode == 0, r.stderr
    # a failed run in a sandbox that runs already leaves it (and its process) alone
    r = cli("run", "--name", name, "--", "/nonexistent")
    assert r.returncode == 1 and "stopped again" not in r.stderr, r.stderr
    assert cli("checkpoint", name).returncode == 0
    assert top_mount(root) is not None


def _dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_stop_of_a_daemon_that_does_not_answer_times_out_and_cleans_up(tmp_path: Path, name: str) -> None:
    base = tmp_path / "repo"
    base.mkdir()
    r = cli("run", "--base", str(base), "--name", name, "--", "bash")
    assert r.returncode == 0, r.stderr
    rec = json.loads(Path(f"/var/lib/deltabox/{name}/sandbox.json").read_text())
    daemon, procs = rec["daemon"][0], [p[0] for p in rec["procs"].values()]
    os.kill(daemon, signal.SIGSTOP)
    try:
        for args in (["list", name], ["diff", name, "1"]):  # no time limit of their own: not forever
            t0 = time.monotonic()
            r = cli(*args)
            assert r.returncode == 1 and "is stopped" in r.stderr and f"'deltabox stop {name}'" in r.stderr, r.stderr
            assert time.monotonic() - t0 < 10
        t0 = time.monotonic()
        r = cli("stop", name)
        assert r.returncode == 0, r.stderr
        assert "did not answer within 5 s" in r.stderr and time.monotonic() - t0 < 30
        assert top_mount(rec["root"]) is None, "no mount left behind"
        deadline = time.monotonic() + 5
        while not all(_dead(p) for p in [daemon, *procs]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert all(_dead(p) for p in [daemon, *procs])
    finally:
        if not _dead(daemon):
            os.kill(daemon, signal.SIGCONT)  # the fixture's stop can then reach it


def test_drop_forgets_a_state(tmp_path: Path, name: str) -> None:
    base = tmp_path / "repo"
    base.mkdir()
    assert cli("run", "--base", str(base), "--name", name, "--", "bash").returncode == 0
    first, second = (cli("checkpoint", name, "--label", label).stdout.strip() for label in ("a", "b"))
    r = cli("drop", name, first)
    assert r.returncode == 0, r.stderr
    states = json.loads(cli("list", name, "--json").stdout)
    assert [(s["id"], s["parent"]) for s in states] == [(int(second), None)]
    r = cli("drop", name, first)
    assert r.returncode == 1 and f"no state {first}" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert cli("rollback", name, second).returncode == 0


def test_two_runs_creating_one_name_at_once_give_one_sandbox_and_a_clear_error(tmp_path: Path, name: str) -> None:
    base = tmp_path / "repo"
    base.mkdir()
    cmd = [sys.executable, "-m", "deltabox.cli", "run", "--base", str(base), "--name", name, "--", "bash"]
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [(p.wait(timeout=120), *p.communicate()) for p in runs]
    assert sorted(rc for rc, _o, _e in outs) == [0, 1], outs
    loser = next(e for rc, _o, e in outs if rc == 1)
    assert f"a sandbox named {name!r} is already running" in loser, loser
    assert cli("checkpoint", name).returncode == 0  # the winner's sandbox is whole
    rows = json.loads(cli("list", name, "--json").stdout)
    assert [sorted(r["processes"]) for r in rows] == [["bash-1"]]
