"""A bash over pipes: variables, functions and the working directory come back."""

from __future__ import annotations

import os
import signal
import time

from deltacr_helpers import Lab


def test_bash_variables_functions_and_cwd(lab: Lab, store: str, tmp_path: object) -> None:
    base = str(tmp_path)
    os.makedirs(os.path.join(base, "a"))
    os.makedirs(os.path.join(base, "b"))
    sh = lab.shell()
    sh.run(f"cd {base}/a; X=one; greet() {{ echo hello-$1; }}; declare -a ARR=(1 2 3)")
    cp = lab.checkpointer(sh.pid, store, max_templates=2, rehydrate=False)
    c1 = cp.checkpoint("in a").id
    sh.run(f"cd {base}/b; X=two; greet() {{ echo bye-$1; }}; ARR+=(4); unset -v ARR[0]; Y=new")
    # a child process runs fine while traced (bash forks/execs, gets SIGCHLD)
    assert sh.run("ls / >/dev/null && echo ran-$(echo sub)") == "ran-sub"
    c2 = cp.checkpoint("in b").id
    sh.run("cd /; X=three")

    cp.rollback(c1)
    assert sh.run("pwd; echo $X; greet w; echo ${ARR[@]}; echo Y=${Y-unset}") == \
        f"{base}/a\none\nhello-w\n1 2 3\nY=unset"
    cp.rollback(c2)
    assert sh.run("pwd; echo $X $Y; greet w; echo ${ARR[@]}") == f"{base}/b\ntwo new\nbye-w\n2 3 4"

    # slow path: cwd comes back through an injected chdir
    cp.rollback(c1)
    cp.checkpoint()
    cp.checkpoint()
    cp.wait_background()
    assert cp.template_pid(c2) is None
    res = cp.rollback(c2)
    assert res.path == "slow"
    assert sh.run("pwd; echo $X $Y; greet w") == f"{base}/b\ntwo new\nbye-w"
    assert os.readlink(f"/proc/{res.pid}/cwd") == f"{base}/b"


def test_signal_mask_is_restored(lab: Lab, store: str) -> None:
    r = lab.repl("signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})")
    cp = lab.checkpointer(r.pid, store, max_templates=2, rehydrate=False)
    c1 = cp.checkpoint("USR1 blocked").id
    r.run("signal.pthread_sigmask(signal.SIG_SETMASK, {signal.SIGUSR2})")
    cp.checkpoint()
    cp.checkpoint()
    cp.wait_background()
    cp.rollback(c1)
    assert r.eval("sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))") == [10]


def test_reap_orphans_reaps_what_a_rollback_orphaned_and_nothing_else(store: str) -> None:
    # The host (this test) starts bash itself and is the subreaper, as the sandbox does.
    import subprocess
    import time

    from deltacr import ProcessCheckpointer
    from deltacr_helpers import Shell, is_alive

    bash = subprocess.Popen(["bash", "--norc", "--noprofile"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    other = subprocess.Popen(["sh", "-c", "sleep 0.3; exit 7"], start_new_session=True)  # the host's own child: not deltacr's business
    cp = None
    try:
        sh = Shell(bash, bash.pid, bash.stdin, bash.stdout)  # type: ignore[arg-type]
        cp = ProcessCheckpointer(bash.pid, store, reap_orphans=True)
        c1 = cp.checkpoint().id
        bg = int(sh.run("sleep 0.5 & echo $!"))
        cp.rollback(c1)  # the old bash dies; its background sleep is orphaned to us
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (os.path.exists(f"/proc/{bg}") or other.poll() is None):
            time.sleep(0.02)
        assert not os.path.exists(f"/proc/{bg}"), "the orphaned background job was not reaped"
        assert other.wait(timeout=5) == 7, "deltacr must not steal the host's own children's exit status"
        assert sh.run("echo still-here") == "still-here"
        assert is_alive(cp.live_pid or 0)
    finally:
        if cp is not None:
            cp.close(kill_live=True)
        for p in (bash, other):
            try:
                os.killpg(p.pid, 9)  # both lead their own process group
            except (ProcessLookupError, PermissionError):
                pass
            p.wait(timeout=5)


def test_a_job_control_stop_outlasts_attach_checkpoint_and_comes_back_with_its_state(lab: Lab, store: str) -> None:
    # kill -STOP (or ^Z) stops a process; tracing it must not start it again
    r = lab.repl("x = 1")
    os.kill(r.pid, signal.SIGSTOP)
    wait_state(r.pid, "T")
    cr = lab.checkpointer(r.pid, store)
    time.sleep(0.1)
    assert proc_state(r.pid) in "Tt", "attach let a stopped process run"
    c = cr.checkpoint("while stopped").id
    time.sleep(0.1)
    assert proc_state(r.pid) in "Tt", "a checkpoint let a stopped process run"
    os.kill(r.pid, signal.SIGCONT)
    assert r.eval("x") == 1
    r.run("x = 2")
    running = cr.checkpoint("running").id
    # back to the state captured while stopped: stopped again, as CRIU restores it
    live = cr.rollback(c).pid
    assert live == cr.live_pid
    wait_state(live, "Tt")
    time.sleep(0.1)
    assert proc_state(live) in "Tt", "the restored process runs: it was stopped when captured"
    os.kill(live, signal.SIGCONT)
    assert r.eval("x") == 1
    # and a state captured running comes back running, also from a stopped process
    os.kill(live, signal.SIGSTOP)
    wait_state(live, "Tt")
    assert cr.rollback(running).path in ("fast", "spare")
    assert r.eval("x") == 2
    # the slow path too
    os.kill(cr.live_pid, signal.SIGSTOP)
    wait_state(cr.live_pid, "Tt")  # a SIGSTOP still queued is not a stop yet (see docs/deltacr.md)
    c2 = cr.checkpoint("stopped again").id
    os.kill(cr.live_pid, signal.SIGCONT)
    r.run("x = 3")
    cr.wait_background()
    assert cr.evict(c2)
    res = cr.rollback(c2)
    assert res.path == "slow"
    wait_state(res.pid, "Tt")
    os.kill(res.pid, signal.SIGCONT)
    assert r.eval("x") == 2


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def wait_state(pid: int, want: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while proc_state(pid) not in want:
        assert time.monotonic() < deadline, f"pid {pid} never reached state {want}"
        time.sleep(0.01)
