"""The sandbox with a real bash and a real Python REPL on a real DeltaFS."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import deltabox
import deltacr
import deltafs
from deltafs.mounts import top_mount


@pytest.fixture
def base(tmp_path: Path) -> Path:
    b = tmp_path / "repo"
    (b / "pkg").mkdir(parents=True)
    (b / "pkg" / "__init__.py").write_text("VALUE = 0\n")
    (b / "README").write_text("repo\n")
    return b


@pytest.fixture
def sb(base: Path, tmp_path: Path) -> Iterator[deltabox.Sandbox]:
    s = deltabox.Sandbox(str(base), workdir=str(tmp_path / "work"))
    try:
        yield s
    finally:
        s.close()
        assert top_mount(s.root) is None, "the sandbox left its mount behind"


def start_shells(sb: deltabox.Sandbox) -> tuple[deltabox.Proc, deltabox.Proc]:
    sh = sb.spawn(["bash", "--norc", "--noprofile"], name="sh")
    py = sb.spawn(["python3", "-u", "-q", "-i"], name="py",
                  env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    sh.send("echo ready\n")
    sh.expect("ready\n")
    py.send("import sys; sys.ps1 = ''; sys.ps2 = ''; print('ready')\n")
    py.expect("ready\n")
    return sh, py


def ask(p: deltabox.Proc, cmd: str) -> str:
    marker = f"__end{random.randrange(10**9)}__"
    if p.argv[0].startswith("python"):
        p.send(f"{cmd}\nprint({marker!r})\n")
    else:
        p.send(f"{cmd}; echo {marker}\n")
    out = p.expect(marker + "\n").decode()
    return out[: -len(marker) - 1].strip()


def test_tree_of_states_with_rollbacks_to_arbitrary_nodes(sb: deltabox.Sandbox) -> None:
    sh, py = start_shells(sb)
    root = Path(sb.root)
    expected: dict[int, int] = {}
    parent_value = {0: 0}
    ids: list[int] = []
    rng = random.Random(7)
    value = 0
    for step in range(22):
        if ids and step % 3 == 2:
            target = rng.choice(ids)
            sb.rollback(target)
            value = expected[target]
        value = value * 3 + step + 1
        ask(sh, f"N={value}; cd {root}; echo VALUE = {value} > pkg/__init__.py")
        ask(py, f"n = {value}; blob = bytearray(b'%d' * 100000)" % (value % 10))
        ids.append(sb.checkpoint(f"step {step}").id)
        expected[ids[-1]] = value
    del parent_value
    for target in rng.sample(ids, 12) + [ids[0], ids[-1]]:
        r = sb.rollback(target)
        v = expected[target]
        assert r.pids["sh"] and r.pids["py"]
        assert ask(sh, "echo $N") == str(v)
        assert ask(py, "print(n, blob[:3], len(blob))") == f"{v} bytearray(b'{v % 10}{v % 10}{v % 10}') 100000"
        assert (root / "pkg/__init__.py").read_text() == f"VALUE = {v}\n"
        assert ask(py, f"import importlib, pkg; print(pkg.VALUE)") == str(v)
        ask(py, "sys.modules.pop('pkg', None)")
    states = {s.id: s for s in sb.states()}
    assert len(states) == 22 and states[ids[-1]].processes.keys() == {"sh", "py"}


def test_rollback_while_a_command_runs_in_the_shell(sb: deltabox.Sandbox) -> None:
    sh, py = start_shells(sb)
    ask(sh, f"cd {sb.root}; X=before")
    s = sb.checkpoint("idle").id
    sh.send("sleep 3; echo late > late.txt; echo finished\n")
    time.sleep(0.3)
    sb.rollback(s)
    assert ask(sh, "echo $X") == "before"
    time.sleep(3.2)
    assert not (Path(sb.root) / "late.txt").exists(), "the abandoned command must not run on"
    assert ask(sh, "echo alive") == "alive"


def test_processes_started_after_end_and_exited_ones_come_back(sb: deltabox.Sandbox) -> None:
    sh, _py = start_shells(sb)
    ask(sh, "A=1")
    s1 = sb.checkpoint().id
    late = sb.spawn(["python3", "-u", "-q", "-i"], name="late")
    late.send("print('hi')\n")
    late.expect("hi\n")
    sh.send("exit\n")
    deadline = time.monotonic() + 10
    while sh.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not sh.alive
    s2 = sb.checkpoint().id
    assert "sh" not in {s.id: s for s in sb.states()}[s2].processes
    r = sb.rollback(s1)
    assert r.pids["late"] is None and not late.alive
    assert sh.alive and ask(sh, "echo $A") == "1"
    r = sb.rollback(s2)
    assert late.alive and not sh.alive


def test_sending_to_a_process_that_ended_says_so(sb: deltabox.Sandbox) -> None:
    sh, _py = start_shells(sb)
    s = sb.checkpoint().id
    sh.send("exit 7\n")
    deadline = time.monotonic() + 10
    while sh.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(deltabox.ProcessError, match=r"process 'sh' has ended \(status 7\).*roll back"):
        sh.send("echo lost\n")
    late = sb.spawn(["bash"], name="late")
    sb.rollback(s)  # ends 'late': it did not exist then
    with pytest.raises(deltabox.ProcessError, match="process 'late' has ended"):
        late.send("echo lost\n")
    assert ask(sh, "echo back") == "back"


def test_kill_9_of_a_sandbox_process_then_rollback_brings_it_back(sb: deltabox.Sandbox) -> None:
    sh, py = start_shells(sb)
    ask(py, "x = 41")
    s = sb.checkpoint().id
    assert py.pid is not None
    os.kill(py.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while py.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not py.alive
    sb.rollback(s)
    assert ask(py, "print(x + 1)") == "42"


def test_bad_input(sb: deltabox.Sandbox, base: Path) -> None:
    start_shells(sb)
    with pytest.raises(deltabox.UnknownState, match="no state 99"):
        sb.rollback(99)
    with pytest.raises(deltabox.NameInUse):
        sb.spawn(["bash"], name="sh")
    s = sb.checkpoint().id
    sb.close()
    with pytest.raises(deltabox.SandboxStopped):
        sb.rollback(s)
    with pytest.raises(deltabox.DeltaBoxError, match="not a directory"):
        deltabox.Sandbox(str(base / "nope"))


def _threads(pid: int | None) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("Threads:")[1].split()[0])


def test_a_multi_threaded_process_is_named_and_its_checkpoint_refused(sb: deltabox.Sandbox) -> None:
    sh, py = start_shells(sb)
    ask(py, "import threading; ev = threading.Event(); t = threading.Thread(target=ev.wait); t.start()")
    with pytest.raises(deltabox.ProcessError, match="process 'py' .*more than one thread") as ei:
        sb.checkpoint()
    assert isinstance(ei.value.__cause__, deltacr.MultiThreaded)
    assert "resume()" not in str(ei.value), "DeltaCR's advice is for its own callers"
    assert sb.states() == []
    ask(py, "ev.set(); t.join()")
    deadline = time.monotonic() + 5
    while _threads(py.pid) > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ask(sh, "echo alive") == "alive"
    assert sb.checkpoint().id == 1, "once back to one thread it checkpoints"


def test_after_the_files_daemon_died_each_call_says_to_stop_the_sandbox(sb: deltabox.Sandbox) -> None:
    start_shells(sb)
    s = sb.checkpoint().id
    assert sb.fs.pid is not None
    os.kill(sb.fs.pid, signal.SIGKILL)
    while os.path.exists(f"/proc/{sb.fs.pid}") and "State:\tZ" not in Path(f"/proc/{sb.fs.pid}/status").read_text():
        time.sleep(0.01)  # gone, or our zombie
    calls = {"checkpoint": sb.checkpoint, "diff": lambda: sb.diff(s), "rollback": lambda: sb.rollback(s),
             "drop": lambda: sb.drop(s), "wait_background": sb.wait_background}
    for what, call in calls.items():
        with pytest.raises(deltabox.FilesUnavailable, match="stop the sandbox") as ei:
            call()
        assert isinstance(ei.value.__cause__, deltafs.DeltaFSError), what
        assert "mount again" not in str(ei.value), what
    sb.close()  # no error: detaching the dead mount is all there is to do
    assert top_mount(sb.root) is None


def test_a_rollback_whose_files_cannot_be_switched_changes_nothing(sb: deltabox.Sandbox) -> None:
    # The processes are forked from their templates while the files switch;
    # when the switch fails, those are thrown away and the old ones go on.
    sh, py = start_shells(sb)
    ask(py, "x = 'old'")
    ask(sh, "V=old; echo old > f")
    s = sb.checkpoint().id
    ask(py, "x = 'new'")
    ask(sh, "V=new; echo new > f")
    pids = (sh.pid, py.pid)
    sb.fs.drop(sb.states()[-1].fs_checkpoint)  # behind the sandbox's back
    with pytest.raises(deltabox.RollbackFailed, match="nothing changed"):
        sb.rollback(s)
    assert (sh.pid, py.pid) == pids
    assert ask(py, "print(x)") == "new"
    assert ask(sh, "echo $V; cat f") == "new\nnew"
    assert sb.current == s  # the state tree is untouched too


def _quiet_repl(sb: deltabox.Sandbox) -> deltabox.Proc:
    """A Python REPL without prompts, sys and os imported."""
    py = sb.spawn(["python3", "-u", "-q", "-i"], name="py", env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    py.send("import sys, os; sys.ps1 = ''; sys.ps2 = ''; print('ready')\n")
    py.expect("ready\n")
    return py


def _evict_by_later_states(sb: deltabox.Sandbox, py: deltabox.Proc) -> None:
    """Four states more: with max_templates=2 the earlier ones (not the
    root) lose their templates and come back through the slow path."""
    for i in range(4):
        ask(py, f"y = {i}")
        sb.checkpoint(f"later {i}")
        sb.wait_background()


def test_slow_path_rollback_reopens_files_of_the_target_state(base: Path, tmp_path: Path) -> None:
    # With few templates a state comes back through DeltaCR's slow path, which
    # reopens the files its process had open by path: in the target state's
    # files (they exist only there), so only once the files are switched.
    (base / "data.txt").write_text("abcdefgh")
    with deltabox.Sandbox(str(base), workdir=str(tmp_path / "w2"), max_templates=2) as sb:
        py = _quiet_repl(sb)
        sb.checkpoint("root")
        ask(py, "f = open('data.txt'); f.read(3)")
        a = sb.checkpoint("file open").id
        ask(py, "f.close(); os.unlink('data.txt')")
        _evict_by_later_states(sb, py)
        r = sb.rollback(a)
        assert r.paths["py"] == "slow"
        assert ask(py, "print(f.read())") == "defgh"


def test_slow_path_rollback_to_a_state_without_a_file_the_base_had_open(base: Path, tmp_path: Path) -> None:
    # The slow path forks an older template, which may hold a file the
    # target state no longer has: in the switched files that fd's file
    # cannot be looked at (DeltaFS says ESTALE); it must simply be closed.
    (base / "gone.txt").write_text("abcdefgh")
    with deltabox.Sandbox(str(base), workdir=str(tmp_path / "w3"), max_templates=2) as sb:
        py = _quiet_repl(sb)
        ask(py, "g = open('gone.txt'); g.read(2)")
        sb.checkpoint("root: file open")
        ask(py, "g.close(); os.unlink('gone.txt'); x = 'b'")
        b = sb.checkpoint("file gone").id
        _evict_by_later_states(sb, py)
        r = sb.rollback(b)
        assert r.paths["py"] == "slow"
        assert ask(py, "print(x, g.closed, os.path.exists('gone.txt'))") == "b True False"


def test_files_held_open_in_append_mode_across_a_rollback(sb: deltabox.Sandbox) -> None:
    # The restored processes write through descriptors opened before the
    # checkpoint. O_APPEND writes at the size the kernel holds for the file,
    # which a rollback makes stale: the rollback must make the kernel fetch
    # it again, or the log gets a hole of NUL bytes.
    sh, py = start_shells(sb)
    log = Path(sb.root) / "log"
    ask(py, "import os; fd = os.open('log', os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644); "
            "os.write(fd, b'py start\\n')")
    ask(sh, "exec 3>>log; echo 'sh start' >&3")
    s1 = sb.checkpoint("short log").id
    ask(py, "os.write(fd, b'py: a long line of a branch that is thrown away\\n')")
    ask(sh, "echo 'sh: another line of that branch' >&3")
    sb.checkpoint("long log")
    sb.rollback(s1)
    ask(py, "os.write(fd, b'py after\\n')")
    ask(sh, "echo 'sh after' >&3")
    assert log.read_bytes() == b"py start\nsh start\npy after\nsh after\n"


@pytest.mark.parametrize("bad", ["../../x", "/", ".", "..", "a/b", "", ".hidden", "-rf", "x" * 65, "a b"])
def test_process_names_that_could_escape_are_refused(sb: deltabox.Sandbox, bad: str) -> None:
    with pytest.raises(deltabox.BadName, match="not allowed"):
        sb.spawn(["true"], name=bad)
    assert not sb.procs
    assert sorted(os.listdir(sb.store)) == ["fs"], "nothing was created for it"


def _stats() -> Iterator[tuple[str, list[str]]]:
    """(pid, the fields of /proc/PID/stat after the command: state, ppid,
    pgrp, session, ...) of every process, zombies too."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            yield pid, Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue


def _children() -> dict[int, str]:
    """This process's children, zombies too: pid -> state and command line."""
    me = str(os.getpid())
    out = {}
    for pid, fields in _stats():
        if fields[1] == me:
            try:
                out[int(pid)] = f"{fields[0]} {Path(f'/proc/{pid}/cmdline').read_bytes()!r}"
            except OSError:
                continue
    return out


def test_a_command_that_exits_at_once_gets_one_clear_error_and_leaves_nothing(sb: deltabox.Sandbox) -> None:
    # Popen starts it before DeltaCR attaches: what DeltaCR meets then is an
    # exiting process, a zombie, or one that exits during the attach
    before = _children()
    for _ in range(10):
        # (no status when DeltaCR's tracer reaped it in the attach: it keeps none)
        with pytest.raises(deltabox.ProcessError, match=r"^true exited( \(status 0\))? before it could be "
                                                         "traced; a sandbox process must keep running"):
            sb.spawn(["true"])
    with pytest.raises(deltabox.ProcessError, match=r"exit 3' exited \(status 3\)"):
        sb.spawn(["sh", "-c", "exit 3"])
    with pytest.raises(deltabox.ProcessError, match="cannot start /nonexistent in the sandbox: No such file"):
        sb.spawn(["/nonexistent"])
    assert not sb.procs
    assert {pid: what for pid, what in _children().items() if pid not in before} == {}
    assert not os.listdir(os.path.join(sb.store, "procs")), "no store for a process that never ran"
    deadline = time.monotonic() + 2  # a closed session's threads end within 0.1 s
    while [t for t in threading.enumerate() if t.name.startswith("deltacr-")] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [t.name for t in threading.enumerate() if t.name.startswith("deltacr-")] == []
    sh = sb.spawn(["bash"], name="true-1")  # the names are free again
    assert ask(sh, "echo ok") == "ok"


@pytest.mark.parametrize("cwd", ["/tmp", "..", "pkg/../..", "up", "{root}/../.."])
def test_a_working_directory_outside_the_sandbox_is_refused(sb: deltabox.Sandbox, cwd: str) -> None:
    os.symlink("/tmp", os.path.join(sb.root, "up"))  # a link inside leading out
    before = _children()
    with pytest.raises(deltabox.OutsideSandbox, match="outside the sandbox root"):
        sb.spawn(["sleep", "100"], cwd=cwd.format(root=sb.root))
    assert not sb.procs and {pid for pid in _children() if pid not in before} == set()


def test_a_working_directory_inside_the_sandbox_is_taken(sb: deltabox.Sandbox) -> None:
    sh = sb.spawn(["bash"], name="sh", cwd="pkg")
    assert ask(sh, "pwd") == os.path.join(os.path.realpath(sb.root), "pkg")
    sh2 = sb.spawn(["bash"], name="sh2", cwd=os.path.join(sb.root, "pkg"))
    assert ask(sh2, "cat __init__.py") == "VALUE = 0"


def test_default_process_names_are_safe(sb: deltabox.Sandbox) -> None:
    p = sb.spawn(["/bin/cat"])
    assert p.name == "cat-1"
    sb.spawn(["cat"], name="cat-3")  # a given name that looks generated
    assert [sb.spawn(["cat"]).name for _ in range(2)] == ["cat-4", "cat-5"]
    with pytest.raises(deltabox.ProcessError, match="nothing to start"):
        sb.spawn([])


def test_input_queued_for_the_abandoned_branch_is_discarded(sb: deltabox.Sandbox) -> None:
    sh, py = start_shells(sb)
    ask(sh, f"cd {sb.root}")
    ask(py, f"os = __import__('os'); os.chdir({sb.root!r})")
    s1 = sb.checkpoint().id
    sh.send("sleep 1\n")  # busy: what follows waits unread in the pipe
    sh.send("echo x > queued.txt\n")
    py.send("import time; time.sleep(1)\n")
    py.send("open('queued_py.txt', 'w').write('x')\n")
    time.sleep(0.3)
    sb.rollback(s1)
    time.sleep(1.5)
    assert ask(sh, "echo alive") == "alive" and ask(py, "print('alive')") == "alive"
    assert not (Path(sb.root) / "queued.txt").exists(), "bash ran input sent before the rollback"
    assert not (Path(sb.root) / "queued_py.txt").exists(), "the REPL ran input sent before the rollback"


def test_a_failed_rollback_leaves_processes_started_after_the_state_running(sb: deltabox.Sandbox) -> None:
    sh, py = start_shells(sb)
    s = sb.checkpoint().id
    late = sb.spawn(["python3", "-u", "-q", "-i"], name="pylate")
    late.send("import sys; sys.ps1 = ''; x = 7; print('ready')\n")
    late.expect("ready\n")
    sb.checkpoint()
    sb.fs.drop(sb._state(s).fs_checkpoint)  # behind the sandbox's back: the switch fails
    pid = late.pid
    with pytest.raises(deltabox.RollbackFailed, match="nothing changed"):
        sb.rollback(s)
    assert late.alive and late.pid == pid
    assert ask(late, "print(x)") == "7"


def _session_members(sb: deltabox.Sandbox) -> list[str]:
    """What runs in the sandbox's sessions besides DeltaCR's stopped processes."""
    sids = {p.sid for p in sb.procs.values()}
    out = []
    for pid, fields in _stats():
        if int(fields[3]) in sids and fields[0] not in "tZ":
            try:
                out.append(f"{pid} {Path(f'/proc/{pid}/comm').read_text().strip()}")
            except OSError:
                continue
    return out


def test_a_rollback_ends_what_the_processes_started(sb: deltabox.Sandbox) -> None:
    sh, py = start_shells(sb)
    ask(sh, f"cd {sb.root}")
    s1 = sb.checkpoint().id
    ask(sh, "{ (sleep 1.5; echo late > bg.txt) & }")  # a background job
    ask(sh, "( (sleep 1.5; echo orphan > orphan.txt) & )")  # its parent exits: adopted by us
    # a daemon: its own session, its parent gone (found by the sandbox's cgroup)
    ask(sh, "( setsid sh -c 'sleep 1.5; echo daemon > daemon.txt' < /dev/null > /dev/null 2>&1 & )")
    sh.send("sleep 1.5; echo fg > fg.txt\n")  # a foreground command, running during the rollback
    time.sleep(0.3)
    sb.rollback(s1)
    # stopped before the files switched, killed after: gone once their exit is through
    deadline = time.monotonic() + 3.0
    while (left := [m for m in _session_members(sb) if not m.endswith(("bash", "python3"))]) \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    assert left == []
    time.sleep(1.6)
    for f in ("bg.txt", "orphan.txt", "fg.txt", "daemon.txt"):
        assert not (Path(sb.root) / f).exists(), f"{f}: a process of the abandoned branch wrote it"
    assert ask(sh, "echo alive") == "alive"
    assert sb.checkpoint().id  # nothing left that bash waits for


def test_without_a_cgroup_a_rollback_and_close_end_what_the_processes_started(
        base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A machine where no cgroup can be made (a container): found by session
    monkeypatch.setattr(deltabox.sandbox._cgroup.Group, "create", classmethod(lambda cls, tag: None))
    sb = deltabox.Sandbox(str(base), workdir=str(tmp_path / "w"))
    try:
        assert sb.cgroup is None
        sh = sb.spawn(["bash"], name="sh")
        ask(sh, f"cd {sb.root}")
        s1 = sb.checkpoint().id
        ask(sh, "{ (sleep 1.5; echo late > bg.txt) & }")
        ask(sh, "( (sleep 1.5; echo orphan > orphan.txt) & )")
        time.sleep(0.2)
        sb.rollback(s1)
        time.sleep(1.6)
        for f in ("bg.txt", "orphan.txt"):
            assert not (Path(sb.root) / f).exists(), f"{f}: a process of the abandoned branch wrote it"
        ask(sh, "{ sleep 310 & }")
        sids = {p.sid for p in sb.procs.values()}
    finally:
        sb.close()
    assert _members_of(sids) == [], "close() left processes of the sandbox behind"


def _members_of(sids: set[int]) -> list[str]:
    """Every process (zombies too) in one of the sessions ``sids``."""
    return [pid for pid, fields in _stats() if int(fields[3]) in sids]


@pytest.mark.parametrize("backend", ["pfn", "uffd-wp"])
def test_a_state_taken_while_bash_runs_a_command_restores_a_shell_that_goes_on(
        base: Path, tmp_path: Path, backend: str) -> None:
    # The state holds bash, not its command: restored, bash must not wait
    # for a child that no longer exists (with pfn the first rollback would
    # resume the template, whose spare would be the child it waits on).
    sb = deltabox.Sandbox(str(base), workdir=str(tmp_path / "w"), backend=backend)
    try:
        sh = sb.spawn(["bash"], name="sh")
        assert ask(sh, "echo up") == "up"
        sh.send("sleep 0.5; echo done > after.txt\n")
        time.sleep(0.2)
        s = sb.checkpoint().id
        time.sleep(0.6)
        assert ask(sh, "cat after.txt") == "done"
        for _ in range(2):  # the first rollback to a state and a later one take different paths
            sb.rollback(s)
            assert ask(sh, "echo alive") == "alive", "the restored bash hangs"
            assert (Path(sb.root) / "after.txt").read_text() == "done\n"  # the list went on
    finally:
        sb.close()


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _zombie_children() -> list[int]:
    return [pid for pid, what in _children().items() if what.startswith("Z ")]


def test_closed_sandboxes_leave_no_zombies_in_their_caller(base: Path, tmp_path: Path) -> None:
    # Templates, spares, restored processes and the files' daemon end as
    # orphans of the caller (DeltaCR makes it a subreaper): close reaps them
    before = set(_zombie_children())
    for i in range(4):
        with deltabox.Sandbox(str(base), workdir=str(tmp_path / f"w{i}")) as sb:
            sh, py = start_shells(sb)
            s1 = sb.checkpoint().id
            for j in range(3):
                ask(sh, f"echo {j} > f")
                ask(py, f"x = {j}")
                sb.checkpoint()
                sb.rollback(s1)
    time.sleep(0.3)
    assert set(_zombie_children()) - before == set()


def _daemons() -> list[str]:
    return [pid for pid in filter(str.isdigit, os.listdir("/proc")) if _cmdline(pid) == b"sleep\x00309\x00"]


def test_close_ends_what_the_processes_started(base: Path, tmp_path: Path) -> None:
    sb = deltabox.Sandbox(str(base), workdir=str(tmp_path / "w3"))
    try:
        sh = sb.spawn(["bash", "-c", "sleep 307 & (sleep 308 &) ; (setsid sleep 309 &) ; wait"], name="sh")
        deadline = time.monotonic() + 10
        sleeping = lambda: sorted(m.split()[1] for m in _session_members(sb))  # noqa: E731
        while sleeping() != ["bash", "sleep", "sleep"] and time.monotonic() < deadline:
            time.sleep(0.02)
        sids = {p.sid for p in sb.procs.values()}
        assert sleeping() == ["bash", "sleep", "sleep"], _session_members(sb)
        while not _daemons() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _daemons(), "the setsid'd sleep did not start"
    finally:
        sb.close()
    assert _members_of(sids) == [], "close() left processes of the sandbox (or their zombies) behind"
    assert _daemons() == [], "close() left a process that left its session (setsid) behind"
    assert not os.path.exists(sb.cgroup or "/nonexistent"), "the sandbox's cgroup stays"
    del sh


def test_a_command_that_ended_during_the_checkpoint_is_not_waited_for_after_a_rollback(
        sb: deltabox.Sandbox) -> None:
    # A child that exited but was not waited for yet (a zombie) when the state
    # was taken: restored, the process waits for it; it must not find a
    # DeltaCR spare as its child instead and block on it.
    _sh, py = start_shells(sb)
    ask(py, "import os; pid = os.fork() or os._exit(0)")
    time.sleep(0.3)  # the child is a zombie now
    s = sb.checkpoint().id
    sb.wait_background()  # nothing reads the template: the first rollback may resume it
    sb.rollback(s)
    out = ask(py, "import signal\n"
                  "def _late(*a): raise TimeoutError('blocked')\n\n"
                  "_ = signal.signal(signal.SIGALRM, _late); _ = signal.alarm(3)\n"
                  "try:\n    print(os.wait())\nexcept (ChildProcessError, TimeoutError) as e:\n    print(type(e).__name__)\n\n"
                  "_ = signal.alarm(0)")
    assert out == "ChildProcessError", f"os.wait() in the restored REPL: {out}"


def test_a_rollback_restores_a_process_that_started_threads(sb: deltabox.Sandbox) -> None:
    # It cannot be checkpointed any more (fork copies one thread); a rollback
    # to a state before its threads is the way back, and none of its threads
    # outlives it (the rollback ends it before the files switch: ptrace holds
    # one thread only).
    _sh, py = start_shells(sb)
    s = sb.checkpoint().id
    py.send("import threading\n"
            "def _w():\n    while True:\n        with open('t.txt', 'a') as f: f.write('x')\n\n"
            "threading.Thread(target=_w, daemon=True).start(); print('started')\n")
    py.expect("started\n")
    time.sleep(0.3)
    assert (Path(sb.root) / "t.txt").exists()
    with pytest.raises(deltabox.ProcessError, match="more than one thread"):
        sb.checkpoint()
    sb.rollback(s)
    time.sleep(0.5)
    assert not (Path(sb.root) / "t.txt").exists(), "a thread of the abandoned branch wrote into the restored files"
    assert ask(py, "print(threading.active_count() if 'threading' in dir() else 1)") == "1"


def test_expect_reports_silence_and_an_ended_process_as_sandbox_errors(sb: deltabox.Sandbox) -> None:
    sh, _py = start_shells(sb)
    sh.send("echo partial\n")
    with pytest.raises(deltabox.NoAnswer, match="never-printed") as e:
        sh.expect("never-printed", timeout=0.3)
    assert isinstance(e.value, TimeoutError)  # what callers caught before
    sh.send("exit\n")
    with pytest.raises(deltabox.OutputClosed):
        sh.expect("never-printed", timeout=5)
    # once a state holds a frozen fork of it, the output pipe never closes:
    # its end is known from the process, at once, not after the timeout
    sb.checkpoint()
    _py.send("print('last words'); import sys; sys.exit(3)\n")
    t0 = time.monotonic()
    with pytest.raises(deltabox.OutputClosed, match="ended before it printed.*last words"):
        _py.expect("never-printed", timeout=20)
    assert time.monotonic() - t0 < 5


def test_expect_waits_for_what_an_ended_process_left_running(sb: deltabox.Sandbox) -> None:
    # a launcher that exits and leaves a server that prints "ready" later
    sh, _py = start_shells(sb)
    sb.checkpoint()  # a frozen fork of bash holds the pipe from now on
    sh.send("(sleep 0.5; echo ready) & exit\n")
    assert sh.expect("ready", timeout=10).endswith(b"ready")
    with pytest.raises(deltabox.OutputClosed):  # and once that is gone too, the end is known
        sh.expect("never-printed", timeout=10)


def test_a_cgroup_made_inside_the_sandbox_is_ended_and_removed(base: Path, tmp_path: Path) -> None:
    sb = deltabox.Sandbox(str(base), workdir=str(tmp_path / "w"))
    try:
        if sb.cgroup is None:
            pytest.skip("no writable cgroup2 here: the session fallback is tested on its own")
        sh = sb.spawn(["bash"], name="sh")
        s1 = sb.checkpoint().id
        sub = os.path.join(sb.cgroup, "inner")
        ask(sh, f"mkdir {sub} && {{ sh -c 'echo 0 > {sub}/cgroup.procs; exec sleep 311' & }}")
        deadline = time.monotonic() + 5
        while not _cmd_is(b"sleep\x00311\x00") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _cmd_is(b"sleep\x00311\x00")
        sb.rollback(s1)  # what the shell started is in no state, also in a cgroup of its own
        deadline = time.monotonic() + 5
        while _cmd_is(b"sleep\x00311\x00") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _cmd_is(b"sleep\x00311\x00") == []
        ask(sh, f"{{ sh -c 'echo 0 > {sub}/cgroup.procs; exec sleep 312' & }}")
        cg = sb.cgroup
    finally:
        sb.close()  # raised when the cgroup could not be removed
    assert not os.path.exists(cg) and _cmd_is(b"sleep\x00312\x00") == []


def _cmd_is(cmdline: bytes) -> list[str]:
    return [pid for pid in filter(str.isdigit, os.listdir("/proc")) if _cmdline(pid) == cmdline]


def _state(pid: int | None) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _until_state(pid: int | None, want: str) -> None:
    deadline = time.monotonic() + 5
    while _state(pid) not in want:
        assert time.monotonic() < deadline, f"pid {pid} never reached state {want}"
        time.sleep(0.01)


def test_a_process_stopped_when_checkpointed_comes_back_stopped(sb: deltabox.Sandbox) -> None:
    sh, py = start_shells(sb)
    ask(py, "x = 1")
    os.kill(py.pid, signal.SIGSTOP)  # kill -STOP by the user, or ^Z
    _until_state(py.pid, "Tt")
    stopped = sb.checkpoint("py stopped").id
    # resumed with its stop sent again, it re-enters the stop at once (state
    # R for that instant): stopped again, and staying so
    _until_state(py.pid, "Tt")
    time.sleep(0.1)
    assert _state(py.pid) in "Tt", "the checkpoint let it run"
    os.kill(py.pid, signal.SIGCONT)
    ask(py, "x = 2")
    running = sb.checkpoint("py running").id
    sb.rollback(stopped)
    _until_state(py.pid, "Tt")
    time.sleep(0.1)
    assert _state(py.pid) in "Tt", "restored running, though it was stopped in that state"
    assert ask(sh, "echo up") == "up"
    os.kill(py.pid, signal.SIGCONT)
    assert ask(py, "print(x)") == "1"
    os.kill(py.pid, signal.SIGSTOP)
    _until_state(py.pid, "Tt")
    sb.rollback(running)
    assert ask(py, "print(x)") == "2", "a state captured running comes back running"
