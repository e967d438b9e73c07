"""Mounting the way users do: over a directory, in the foreground, shared
with other users, and killed at a random moment under load."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import deltafs
from deltafs.fuseops import INODE_HANDLES_AVAILABLE
from deltafs.mounts import top_mount

from .conftest import Env, teardown
from .test_checkpoints import tree_digest


def test_mount_over_a_directory_makes_its_contents_the_base(tmp_path: Path) -> None:
    d = tmp_path / "project"
    d.mkdir()
    (d / "main.py").write_text("print('hi')\n")
    m = deltafs.mount(str(d), store=str(tmp_path / "store"))
    try:
        assert (d / "main.py").read_text() == "print('hi')\n"
        c = m.checkpoint()
        (d / "main.py").write_text("broken")
        (d / "junk").write_text("x")
        m.rollback(c)
        assert (d / "main.py").read_text() == "print('hi')\n" and not (d / "junk").exists()
        (d / "kept").write_text("live")
        m.unmount()
        assert sorted(os.listdir(d)) == ["main.py"], "the directory underneath is never written"
        m = deltafs.mount(str(d), store=str(tmp_path / "store"))
        assert (d / "kept").read_text() == "live"
    finally:
        teardown(d, m)


def test_foreground_mode_serves_until_unmounted(tmp_path: Path) -> None:
    mnt, base = tmp_path / "mnt", tmp_path / "base"
    mnt.mkdir()
    base.mkdir()
    (base / "f").write_text("fg")
    proc = subprocess.Popen([sys.executable, "-m", "deltafs.cli", str(mnt), "--base", str(base),
                             "--store", str(tmp_path / "store"), "--foreground"])
    try:
        deadline = time.monotonic() + 30
        while top_mount(str(mnt)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (mnt / "f").read_text() == "fg"
        r = subprocess.run([sys.executable, "-m", "deltafs.cli", "unmount", str(mnt)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        teardown(mnt, None)


def test_allow_other_lets_another_user_work_with_kernel_permission_checks(tmp_path: Path) -> None:
    # pytest's own temp root is private to root: use a directory others may enter.
    top = Path(tempfile.mkdtemp(prefix="deltafs-shared-"))
    os.chmod(top, 0o755)
    mnt, base = top / "mnt", top / "base"
    mnt.mkdir()
    base.mkdir()
    (base / "shared").mkdir(mode=0o777)
    os.chmod(base / "shared", 0o777)
    (base / "rootonly").write_text("secret")
    os.chmod(base / "rootonly", 0o600)
    m = deltafs.mount(str(mnt), base=str(base), store=str(tmp_path / "store"),
                      options=["allow_other"])
    try:
        assert "default_permissions" in _options(mnt)
        def as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                   *cmd], capture_output=True, text=True, timeout=30)
        r = as_nobody("sh", "-c", f"echo hi > {mnt}/shared/mine && cat {mnt}/shared/mine")
        assert r.returncode == 0 and r.stdout == "hi\n", r.stderr
        st = os.stat(mnt / "shared/mine")
        assert (st.st_uid, st.st_gid) == (65534, 65534)
        r = as_nobody("cat", f"{mnt}/rootonly")
        assert r.returncode != 0 and "Permission denied" in r.stderr
        r = as_nobody("touch", f"{mnt}/not-allowed")
        assert r.returncode != 0 and "Permission denied" in r.stderr
    finally:
        teardown(mnt, m)
        shutil.rmtree(top, ignore_errors=True)


def _options(mnt: Path) -> set[str]:
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == str(mnt):
                return set(fields[3].split(","))
    raise AssertionError(f"{mnt} is not mounted")


def test_appends_after_a_rollback_land_at_the_real_end(tmp_path: Path) -> None:
    # O_APPEND writes at the size the kernel holds for the file; after a
    # rollback that size is the discarded branch's until the kernel asks for
    # the attributes again (default_permissions makes it ask at open).
    mnt, base = tmp_path / "mnt", tmp_path / "base"
    mnt.mkdir()
    base.mkdir()
    (base / "log").write_bytes(b"base\n")
    m = deltafs.mount(str(mnt), base=str(base), store=str(tmp_path / "store"))
    try:
        assert "default_permissions" in _options(mnt)
        log = mnt / "log"
        c = m.checkpoint()
        subprocess.run(["sh", "-c", f"printf 'discarded branch, longer\\n' >> {log}"], check=True)
        m.rollback(c)
        subprocess.run(["sh", "-c", f"printf 'shell\\n' >> {log}"], check=True)
        assert log.read_bytes() == b"base\nshell\n"
        c2 = m.checkpoint()
        with open(log, "ab") as f:
            f.write(b"python, also discarded\n")
        m.rollback(c2)
        with open(log, "ab") as f:
            f.write(b"python\n")
        m.rollback(c)  # to a shorter state, then longer again
        with open(log, "ab") as f:
            f.write(b"again\n")
        assert log.read_bytes() == b"base\nagain\n"
    finally:
        teardown(mnt, m)


WRITER = r"""
import hashlib, json, os, sys
import deltafs
mnt, out = sys.argv[1], sys.argv[2]
m = deltafs.Mount(mnt)
i = 0
with open(out, "a") as log:
    while True:
        i += 1
        for k in range(5):
            with open(os.path.join(mnt, f"f{(i + k) % 13}"), "wb") as f:
                f.write(os.urandom(100 * ((i * 7 + k) % 50)))
        if i % 3 == 0:
            os.rename(os.path.join(mnt, f"f{i % 13}"), os.path.join(mnt, f"r{i % 5}"))
        try:
            cid = m.checkpoint()
        except deltafs.DaemonError:
            break
        digest = {}
        for n in sorted(os.listdir(mnt)):
            with open(os.path.join(mnt, n), "rb") as f:
                digest[n] = hashlib.sha256(f.read()).hexdigest()
        log.write(json.dumps([cid, digest]) + "\n")
        log.flush()
"""


def test_kill_9_at_a_random_moment_under_load(tmp_path: Path) -> None:
    """Checkpoints whose id was returned survive, whatever the daemon was
    doing when it died; the live state afterwards is readable."""
    import json

    mnt, base = tmp_path / "mnt", tmp_path / "base"
    mnt.mkdir()
    base.mkdir()
    store = tmp_path / "store"
    m = deltafs.mount(str(mnt), base=str(base), store=str(store))
    log = tmp_path / "log.jsonl"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(mnt), str(log)])
    try:
        time.sleep(random.uniform(1.0, 2.5))
        os.kill(m.status()["pid"], signal.SIGKILL)
        writer.wait(timeout=60)
        m.close()
        m = deltafs.mount(str(mnt), base=str(base), store=str(store))
        tree_digest(mnt)  # the live state is readable
        records = [json.loads(x) for x in log.read_text().splitlines()]
        assert len(records) >= 3, "the writer made too few checkpoints to test anything"
        for cid, want in records:
            m.rollback(cid)
            got = {n: v for n, v in tree_digest(mnt).items()}
            assert got == want, f"checkpoint {cid} differs after the crash"
    finally:
        if writer.poll() is None:
            writer.kill()
        teardown(mnt, m)


def test_the_kernel_opens_files_and_lists_directories_from_its_cache(env: Env) -> None:
    # The setup installs the deltafs build of pyfuse3 (third_party/); with a
    # stock one every open() and every directory listing costs a request.
    assert INODE_HANDLES_AVAILABLE, "pyfuse3 is the stock build: run ./run.sh to set up"
    assert env.m.status()["kernel_opens"] is True


BURST = r"""
import os, sys
root = sys.argv[1]
os.mkdir(os.path.join(root, "burst"))
for i in range(400):
    with open(os.path.join(root, "burst", f"f{i}"), "w") as f:
        f.write(f"content {i}\n")
for i in range(0, 400, 3):
    os.unlink(os.path.join(root, "burst", f"f{i}"))
os.rename(os.path.join(root, "burst"), os.path.join(root, "moved"))
"""


def test_answered_changes_survive_kill_9_once_the_daemon_is_idle(tmp_path: Path) -> None:
    """The daemon commits requests that come back to back together (group
    commit), before it waits for more: a burst of changes that a program
    finished survives a kill -9 of the daemon right after."""
    mnt, base = tmp_path / "mnt", tmp_path / "base"
    mnt.mkdir()
    base.mkdir()
    store = tmp_path / "store"
    m = deltafs.mount(str(mnt), base=str(base), store=str(store))
    try:
        pid = m.status()["pid"]  # asked first: a control request commits the batch
        subprocess.run([sys.executable, "-c", BURST, str(mnt)], check=True, timeout=60)
        want = tree_digest(mnt)
        os.kill(pid, signal.SIGKILL)
        m.close()
        m = deltafs.mount(str(mnt), base=str(base), store=str(store))
        assert tree_digest(mnt) == want
        assert len(os.listdir(mnt / "moved")) == 400 - len(range(0, 400, 3))
    finally:
        teardown(mnt, m)
