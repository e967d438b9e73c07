"""The sandbox's cgroup on its own: a member that ends the cgroup survives."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from deltabox import _cgroup


def test_a_member_that_kills_the_cgroup_moves_out_first_and_survives() -> None:
    # `deltabox stop` typed in the sandbox's shell after its daemon died:
    # the stop must finish its cleanup, not die with the rest
    g = _cgroup.Group.create(f"test-{os.getpid()}")
    if g is None:
        pytest.skip("no writable cgroup2 here")
    try:
        other = subprocess.Popen(["/bin/sh", "-c", _cgroup.JOIN, g.procs, "sleep", "313"])
        code = (f"import sys; sys.path[:0] = {sys.path!r}; from deltabox import _cgroup; "
                f"g = _cgroup.Group({g.path!r}); print(g.remove(), flush=True)")
        killer = subprocess.run(["/bin/sh", "-c", _cgroup.JOIN, g.procs, sys.executable, "-c", code],
                                capture_output=True, text=True, timeout=30)
        assert killer.returncode == 0 and killer.stdout.strip() == "True", killer
        assert other.wait(timeout=5) == -9
        assert not os.path.exists(g.path)
    finally:
        if os.path.exists(g.path):
            g.remove()
