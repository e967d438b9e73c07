"""A cgroup (v2) per sandbox: the set of every process its processes started.

Sessions are what the sandbox falls back to, and a process can leave its
session (``setsid``, every daemon does): it then escaped rollbacks, which
must end what an abandoned branch started, and ``stop``. A cgroup cannot be
left without root's help: a child is born in its parent's cgroup, whatever
it does after. So each sandbox makes one (a child of the cgroup this process
is in, in the cgroup2 hierarchy, named ``deltabox-...``), its processes join
it before they run their program, and its members are read from
``cgroup.procs`` (zombies are not listed) instead of walking /proc.
``cgroup.kill`` (Linux 5.14) ends them all at once, also after the daemon
that made the cgroup died.

No cgroup2 mount, or one this process may not write (a container, no root):
``create`` returns None and the sandbox goes by sessions (see ``_proc``).
No controller is enabled, so the cgroup limits nothing and costs nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

PREFIX = "deltabox-"

# Run by /bin/sh in a new process: join the cgroup whose cgroup.procs is $0
# (the spawn wrapper then becomes the program: same pid, born in the cgroup,
# and so is all it starts).
JOIN_ONLY = 'echo 0 > "$0"'
JOIN = JOIN_ONLY + ' || exit 126; exec "$@"'


def _mine() -> str | None:
    """The directory of this process's cgroup in a cgroup2 mount, if any."""
    try:
        with open("/proc/self/cgroup") as f:
            path = next((ln.strip()[3:] for ln in f if ln.startswith("0::")), None)
        with open("/proc/self/mountinfo") as f:
            mounts = [ln.split() for ln in f]
    except OSError:
        return None
    if path is None:
        return None
    for fields in mounts:
        # id parent dev root mountpoint options [optional...] - fstype source superoptions
        try:
            fstype = fields[fields.index("-") + 1]
        except (ValueError, IndexError):
            continue
        root, point = fields[3], fields[4]
        if fstype != "cgroup2":
            continue
        rel = os.path.relpath(path, root)
        if rel.startswith(".."):
            continue  # this mount shows another part of the tree
        return os.path.normpath(os.path.join(point, rel))
    return None


def is_ours(path: object) -> bool:
    """Does ``path`` (from a record) look like a cgroup a sandbox made?"""
    return (isinstance(path, str) and os.path.isabs(path)
            and os.path.basename(path).startswith(PREFIX)
            and os.path.exists(os.path.join(path, "cgroup.procs")))


class Group:
    def __init__(self, path: str) -> None:
        self.path = path
        self.procs = os.path.join(path, "cgroup.procs")

    @classmethod
    def create(cls, tag: str) -> "Group | None":
        parent = _mine()
        if parent is None:
            return None
        name = PREFIX + "".join(c if c.isalnum() or c in "._-" else "_" for c in tag)[:80]
        for n in range(100):
            path = os.path.join(parent, name if n == 0 else f"{name}.{n}")
            try:
                os.mkdir(path)
            except FileExistsError:
                continue
            except OSError:
                return None  # read-only, not permitted, too deep: go by sessions
            group = cls(path)
            # Made is not joinable (a threaded parent, a delegation without
            # write access above): a process joins it once, or sessions it is.
            probe = subprocess.run(["/bin/sh", "-c", JOIN_ONLY, group.procs], capture_output=True, check=False)
            if probe.returncode != 0:
                group.remove()
                return None
            return group
        return None

    def held(self, pid: int) -> bool:
        """Was ``pid`` in this cgroup (or one below it)? A zombie, not listed
        as a member any more, still names it in /proc (with " (deleted)"
        once it is gone)."""
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                path = next((ln.strip()[3:] for ln in f if ln.startswith("0::")), "")
        except OSError:
            return False
        return os.path.basename(self.path) in path.removesuffix(" (deleted)").split("/")

    def _dirs(self) -> list[str]:
        """This cgroup and those made below it (a sandbox inside the
        sandbox), deepest first."""
        out: list[str] = []
        todo = [self.path]
        while todo:
            d = todo.pop()
            out.append(d)
            try:
                todo += [e.path for e in os.scandir(d) if e.is_dir(follow_symlinks=False)]
            except FileNotFoundError:
                pass
        return out[::-1]

    def members(self) -> set[int]:
        out: set[int] = set()
        for d in self._dirs():
            try:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    out |= {int(x) for x in f.read().split()}
            except FileNotFoundError:
                pass
        return out

    def kill(self, timeout: float = 5.0) -> bool:
        """SIGKILL every member and wait until none is left; True if so.
        This process, if it is one (`deltabox stop` typed in the sandbox),
        first moves out, to the cgroup above."""
        me = os.getpid()
        if me in self.members():
            try:
                with open(os.path.join(os.path.dirname(self.path), "cgroup.procs"), "w") as f:
                    f.write(str(me))
            except OSError:
                pass  # then one by one, sparing this process
        if me not in self.members():
            try:
                with open(os.path.join(self.path, "cgroup.kill"), "w") as f:
                    f.write("1")  # the cgroups below too
            except FileNotFoundError:
                return True
            except OSError:  # before Linux 5.14: one by one, in rounds (a member may fork)
                pass
        deadline = time.monotonic() + timeout
        while True:
            left = self.members() - {me}
            if not left:
                return True
            if time.monotonic() > deadline:
                return False
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.005)

    def remove(self) -> bool:
        """Kill what is left and delete the cgroup (and those below it);
        True if it is gone."""
        if not self.kill():
            return False
        for d in self._dirs():
            for _ in range(200):  # a member that just died may still be leaving it
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.005)
            else:
                return False
        return True

