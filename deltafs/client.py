"""The Python API: mount a DeltaFS and drive a mounted one.

``mount()`` starts the daemon and returns once the mount is live; ``Mount``
talks to a running daemon over its control socket, keeping one connection
open so that a checkpoint costs one round trip.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from typing import Any

from . import errors
from .errors import DaemonError, DeltaFSError, MountBusyError, NotAMountError
from .mounts import FUSECTL, canonical, is_dead, store_of, top_mount
from .store import make_store, remove_new_store
from .view import CheckpointInfo, Diff

DEFAULT_STORE_ROOT = "/var/lib/deltafs"
_libc = ctypes.CDLL(None, use_errno=True)


def default_store(mountpoint: str) -> str:
    """``/var/lib/deltafs/<name>-<hash of the absolute mount point>``: one
    store per mount point, outside the mount, stable across remounts."""
    mp = canonical(mountpoint)
    tag = hashlib.sha256(mp.encode()).hexdigest()[:12]
    name = os.path.basename(mp.rstrip("/")) or "root"
    return os.path.join(DEFAULT_STORE_ROOT, f"{name}-{tag}")


def mount(mountpoint: str, base: str | None = None, store: str | None = None,
          options: Iterable[str] = (), timeout: float = 60.0) -> "Mount":
    """Mount a DeltaFS at ``mountpoint`` with a daemon in the background.

    Without ``base`` the directory's current contents become the read-only
    base. Mounting again with the same store resumes its checkpoints and live
    state."""
    if "," in (store or ""):
        raise DeltaFSError("the store path may not contain a comma (it is a mount option)")
    store = os.path.abspath(store) if store else default_store(mountpoint)
    log_path = os.path.join(store, "daemon.log")
    created = make_store(store)
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "deltafs.daemon", canonical(mountpoint), "--store", store,
           "--ready-fd", str(w)]
    if base:
        cmd += ["--base", base]
    for o in options:
        cmd += ["-o", o]
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                pass_fds=(w,), start_new_session=True)
    os.close(w)
    deadline = time.monotonic() + timeout
    msg = b""
    with os.fdopen(r, "rb") as rf:
        while not msg.endswith(b"\n"):
            chunk = rf.read(1)
            if not chunk:
                break
            msg += chunk
            if time.monotonic() > deadline:
                break
    text = msg.decode(errors="replace").strip()
    if text != "ok":
        proc.wait(timeout=10)
        if not text:
            text = f"the daemon exited with status {proc.returncode}; see {log_path}"
            if created:  # the log goes with the store: say what it says
                with open(log_path, "rb") as logf:
                    tail = logf.read()[-2000:].decode(errors="replace").strip()
                text = f"the daemon exited with status {proc.returncode}: {tail}"
        if created:
            remove_new_store(store)
        raise _error_from_message(text)
    return Mount(mountpoint, pid=proc.pid)


def _error_from_message(text: str) -> DeltaFSError:
    # The daemon reports start-up errors as text; map the common ones back.
    for cls, marker in ((errors.StoreLockedError, "in use by"),
                        (errors.StorePlacementError, "is inside"),
                        (errors.AlreadyMountedError, "already has a DeltaFS"),
                        (errors.BaseMissingError, "base directory"),
                        (errors.BaseMissingError, "not a directory"),
                        (errors.StoreCorruptError, "store")):
        if marker in text:
            return cls(text)
    return DaemonError(text)


class Mount:
    """A live DeltaFS mount, driven through its daemon."""

    def __init__(self, mountpoint: str, pid: int | None = None) -> None:
        self.mountpoint = canonical(mountpoint)
        self.store = store_of(self.mountpoint)
        self.pid = pid
        self._sock: socket.socket | None = None
        self._buf = b""

    def _call(self, op: str, **args: Any) -> Any:
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(os.path.join(self.store, "control.sock"))
            except OSError as e:
                s.close()
                if is_dead(self.mountpoint):
                    raise DaemonError(f"the DeltaFS daemon of {self.mountpoint} is dead; mount "
                                      "again with the same store to recover") from e
                raise DaemonError(f"cannot reach the DeltaFS daemon of {self.mountpoint}: {e}") from e
            self._sock = s
        try:
            self._sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            while b"\n" not in self._buf:
                data = self._sock.recv(65536)
                if not data:
                    raise ConnectionResetError("connection closed")
                self._buf += data
        except OSError as e:
            self.close()
            raise DaemonError(f"the DeltaFS daemon of {self.mountpoint} hung up ({e}); if it "
                              "died, mount again with the same store to recover") from e
        line, self._buf = self._buf.split(b"\n", 1)
        res = json.loads(line)
        if not res["ok"]:
            cls = getattr(errors, res.get("kind", ""), DaemonError)
            if not (isinstance(cls, type) and issubclass(cls, DeltaFSError)):
                cls = DaemonError
            raise cls(res["error"])
        return res["result"]

    def checkpoint(self, label: str = "", durable: bool = False) -> int:
        """Freeze the current files as a new checkpoint; returns its id as
        soon as the layer is frozen and committed: it survives a crash of the
        daemon (kill -9), and reaches the disk in the background a few
        milliseconds later (``sync()`` waits for that). ``durable=True``
        returns only once it is on disk (it survives a power cut)."""
        return int(self.checkpoint_timed(label, durable)["id"])

    def checkpoint_timed(self, label: str = "", durable: bool = False) -> dict[str, Any]:
        """``checkpoint`` with the daemon's timings: ``id``, ``ms`` (all of
        it), ``freeze_ms`` (the layer switch), ``sync_ms`` (making it durable)."""
        self._write_back_mapped()
        return dict(self._call("checkpoint", label=label, durable=durable))

    def _write_back_mapped(self) -> None:
        """Have the kernel send the daemon the pages written through shared
        mmaps (the only writes it holds back: write() goes through at once),
        so that a checkpoint contains them and a rollback does not receive
        the discarded state's pages later. syncfs() can return before the
        daemon has read the WRITE requests it queued (seen here: 1 run in 4
        without what follows), so while the connection has requests in
        flight (fusectl's count; unknown counts as some) a STATFS, which the
        kernel always sends, goes after them: the daemon answers requests in
        order. syncfs() of a mount with nothing dirty costs a few us, the
        STATFS a round trip (70-300 us here, more when the daemon slept)."""
        try:
            fd = os.open(self.mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return  # a dead or foreign mount: the control request says what is wrong
        try:
            if _libc.syncfs(fd) == 0 and _requests_in_flight(os.fstat(fd).st_dev) != 0:
                os.fstatvfs(fd)
        except OSError:
            pass  # as above
        finally:
            os.close(fd)

    def sync(self) -> float:
        """Wait until every checkpoint is on disk (see ``checkpoint()``);
        returns the milliseconds waited."""
        return float(self._call("sync")["ms"])

    def rollback(self, cid: int) -> dict[str, Any]:
        """Make the mount show exactly checkpoint ``cid``; unsaved changes are
        discarded, every checkpoint stays available."""
        self._write_back_mapped()
        return dict(self._call("rollback", id=cid))

    def list(self) -> list[CheckpointInfo]:
        return [CheckpointInfo(**c) for c in self._call("list")]

    def diff(self, a: int, b: int | None = None) -> Diff:
        return Diff(**self._call("diff", a=a, b=b))

    def drop(self, cid: int) -> None:
        self._call("drop", id=cid)

    def status(self) -> dict[str, Any]:
        return dict(self._call("status"))

    def unmount(self, timeout: float = 30.0, lazy: bool = False) -> None:
        """Flush and unmount; returns once the mount is gone. A mount that a
        process still uses (a file open in it, a working directory in it) is
        refused with MountBusyError and stays as it was, as umount(8) does;
        ``lazy`` detaches it anyway (those processes then get ENOTCONN)."""
        pid = self.status()["pid"]
        if lazy:
            self._call("unmount")  # the daemon flushes, then detaches the mount
        else:
            self.sync()  # the checkpoints reach the disk while the mount is still whole
            if _libc.umount2(self.mountpoint.encode(), 0) != 0:
                err = ctypes.get_errno()
                if err == errno.EBUSY:
                    raise MountBusyError(
                        f"{self.mountpoint} is in use: a process has a file open or its working "
                        f"directory in it (`fuser -vm {self.mountpoint}` lists them); end or move "
                        "them and unmount again")
                raise DaemonError(f"cannot unmount {self.mountpoint}: {os.strerror(err)}")
            # the daemon sees its session end, flushes what is left and exits
        self.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = top_mount(self.mountpoint)
            gone = m is None or not m.source.endswith(self.store)
            if gone and not _alive(pid):
                _reap_if_ours(pid)
                return
            time.sleep(0.01)
        raise DaemonError(f"{self.mountpoint} did not unmount within {timeout} s")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buf = b""

    def __enter__(self) -> "Mount":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _requests_in_flight(dev: int) -> int:
    """Requests of the FUSE connection of ``dev`` not answered yet, from the
    fusectl filesystem (the daemon mounts it when it can); -1 if unknown."""
    if os.major(dev) != 0:
        return -1
    try:
        fd = os.open(f"{FUSECTL}/{os.minor(dev)}/waiting", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1
    try:
        return int(os.read(fd, 32) or b"-1")
    except (OSError, ValueError):
        return -1
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _reap_if_ours(pid: int) -> None:
    """The daemon detaches from whoever mounted, but in a child subreaper
    (a DeltaBox sandbox is one) it comes back as that process's child: its
    zombie is then ours to collect."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):  # gone, or reaped as we read
        return
    if ppid != os.getpid():
        return
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:  # a zombie whose other threads still exit is not reapable yet
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:
            return
        time.sleep(0.002)


def force_unmount(mountpoint: str) -> None:
    """Lazily detach a mount whose daemon is dead or stuck."""
    subprocess.run(["umount", "-l", canonical(mountpoint)], check=False, capture_output=True)


__all__ = ["mount", "Mount", "default_store", "force_unmount", "NotAMountError"]
