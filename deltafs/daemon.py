"""The DeltaFS daemon: one process per mount, serving FUSE and the control
socket on one trio loop.

Start-up order matters: the base is opened before the mount covers it, the
store is locked before the index is opened (two daemons on one store would
corrupt each other's live layer), and the parent process is told "ready"
only once the kernel has the mount, so that ``deltafs MOUNTPOINT`` returns
with the filesystem usable. The control protocol is one JSON object per line
each way over ``STORE/control.sock``.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio

from .base import import_base
from .blobs import Blobs
from .durability import Flusher, PendingFlag, syncfs
from .errors import (AlreadyMountedError, BaseMissingError, DaemonError, DeltaFSError, StoreCorruptError,
                     StoreLockedError, StorePlacementError, UnknownCheckpointError)
from .fuseops import INODE_HANDLES_AVAILABLE, Operations, configure_request_spin, invalidate
from .index import BLOB, Index
from .records import from_u64
from .mounts import FSTYPE, SOURCE_PREFIX, canonical, ensure_fusectl, is_dead, top_mount
from .store import make_store, remove_new_store
from .view import View

log = logging.getLogger("deltafs")
WRITE_BACK_DELAY = 0.005  # s
INLINE_FLUSH_FILES = 16  # a durable checkpoint flushes this few files on the loop itself,
INLINE_FLUSH_BYTES = 1 << 20  # when this little was written to them


class Filesystem:
    """A store opened for one mount: the view plus the control operations."""

    def __init__(self, store: str, base_fd: int, base_desc: str) -> None:
        self.store = store
        self.lock_fd = _lock(store)
        self.idx = Index(os.path.join(store, "index"))
        self.blobs = Blobs(store, base_fd)
        self.view = View(self.idx, self.blobs)
        self.flusher = Flusher(store, self.blobs.dir_fd, os.path.join(store, "index", "data.mdb"))
        self._written = trio.Event()
        self.view.on_written = self._written.set
        self.nursery: trio.Nursery | None = None  # set while serving
        # Checkpoints taken with durable=False: committed (they survive a crash
        # of this daemon, the kernel holds their pages) but not yet flushed to
        # the disk. One background task flushes them, all pending at once.
        self._lazy: set[int] = set()
        self._lazy_pending = False
        self._flushing = False
        self._flushed = trio.Event()
        self._flushed.set()
        self._flush_error = ""
        self._unflushed = PendingFlag(os.path.join(store, "flush.pending"))
        if self.idx.is_new():
            with self.idx.begin(write=True) as txn:
                self.idx.initialise(txn)
                txn.put(b"base", base_desc.encode(), db=self.idx.meta)
            self.idx.load()
            self.idx.set_live(1)  # the base's records belong to checkpoint 1
            with self.idx.begin(write=True) as txn:
                import_base(self.view, txn, base_fd)
            self.idx.set_live(2)
            self.view.clear_caches()
            self.idx.sync()
            self._unflushed.clear()
        else:
            if self._unflushed.was_set:
                # the last daemon died with checkpoints committed but not flushed
                syncfs(store)
                self._unflushed.clear()
            self.idx.load()
            self.blobs.delete(self.view.collect())
            self._sweep_blobs()
            self.view.recover_sizes()
            with self.idx.begin() as txn:
                was = bytes(txn.get(b"base", db=self.idx.meta) or b"").decode()
            if was != base_desc:
                raise StoreCorruptError(
                    f"the store {store} was made from base {was}, not {base_desc}: "
                    "mount it with the same --base, or use another --store")

    def _sweep_blobs(self) -> None:
        """Delete blob files that no layer owns (left by a crash between a
        rollback and the deletion of the discarded layer's blobs)."""
        owned = set()
        with self.idx.begin() as txn:
            for lid in self.idx.layers:
                owned.update(from_u64(p) for t, p in self.idx.changes(txn, lid) if t == BLOB)
        stray = [b for b in (int(n, 16) for n in os.listdir(self.blobs.dir)) if b not in owned]
        self.blobs.delete(stray)

    async def control(self, req: dict[str, Any]) -> Any:
        self.view.commit_batch()
        try:
            return await self._control(req)
        finally:
            self.view.commit_batch()

    def _batch_lost(self, e: BaseException) -> None:
        """Answered operations could not be committed: the kernel, our memory
        and the index disagree now. Stop the way kill -9 would (the case a
        mount recovers from): the store holds every checkpoint and the live
        state before the batch."""
        log.critical("committing a batch of answered operations failed (%s): stopping as if killed; "
                     "the store keeps the state before them. Free the disk and mount again with "
                     "the same store", e)
        logging.shutdown()
        os._exit(75)

    async def _control(self, req: dict[str, Any]) -> Any:
        op = req.get("op")
        view = self.view
        if op == "checkpoint":
            t0 = time.perf_counter()
            nbytes = view.unsynced_bytes
            cid, unsynced = view.checkpoint(str(req.get("label") or ""))
            t1 = time.perf_counter()
            if req.get("durable", False):  # as the client: committed is the default
                if self._lazy_pending or self._flushing:
                    # this checkpoint shares blobs with the pending ones: all go together
                    self._queue_flush(unsynced)
                    await self.sync()
                elif len(unsynced) <= INLINE_FLUSH_FILES and nbytes <= INLINE_FLUSH_BYTES:
                    # a short flush (about 0.4 ms here for one file) costs
                    # less than the hop to a worker thread and back; a long
                    # one would stall every request meanwhile
                    self._flush_job(unsynced)()
                else:
                    await trio.to_thread.run_sync(self._flush_job(unsynced))
            else:
                self._queue_flush(unsynced)
            t2 = time.perf_counter()
            return {"id": cid, "ms": (t2 - t0) * 1e3, "freeze_ms": (t1 - t0) * 1e3,
                    "sync_ms": (t2 - t1) * 1e3, "synced_files": len(unsynced)}
        if op == "rollback":
            t0 = time.perf_counter()
            changed = view.rollback(_cid(req.get("id")))
            t1 = time.perf_counter()
            n = await trio.to_thread.run_sync(invalidate, changed)
            t2 = time.perf_counter()
            if self.nursery is not None:
                self.nursery.start_soon(self._collect)
            return {"invalidated": n, "ms": (t2 - t0) * 1e3, "switch_ms": (t1 - t0) * 1e3,
                    "invalidate_ms": (t2 - t1) * 1e3}
        if op == "sync":
            t0 = time.perf_counter()
            await self.sync()
            return {"ms": (time.perf_counter() - t0) * 1e3}
        if op == "list":
            return [asdict(c) for c in view.checkpoints()]
        if op == "diff":
            b = req.get("b")
            return asdict(view.diff(_cid(req.get("a")), None if b is None else _cid(b)))
        if op == "drop":
            view.drop(_cid(req.get("id")))
            return None
        if op == "status":
            return {"store": self.store, "live_layer": self.idx.live, "pid": os.getpid(),
                    "layers": len(self.idx.layers), "kernel_opens": view.inode_handles}
        if op == "unmount":
            try:
                await self.sync()
            except DeltaFSError:
                pass  # close() tries the flush once more
            return None
        raise DeltaFSError(f"unknown control operation {op!r}")

    async def _collect(self) -> None:
        """Delete the layer a rollback discarded, after the caller has its
        answer. A crash before this runs is finished by the next mount."""
        await trio.sleep(0)
        garbage = self.view.collect()
        if garbage:
            await trio.to_thread.run_sync(self.blobs.delete, garbage)

    async def write_back(self) -> None:
        """Shortly after files are written, persist their sizes and start
        their write-out to disk. The kernel opens and closes files without
        telling us, so there is no close to hook this on; a checkpoint then
        has less left to wait for."""
        while True:
            await self._written.wait()
            await trio.sleep(WRITE_BACK_DELAY)  # batch what a burst of writes touches
            self._written = trio.Event()
            self.view.on_written = self._written.set
            try:
                self.view.write_back(self.flusher.start_writeback)
            except Exception:  # only an optimisation: a checkpoint flushes all the same
                log.exception("background write-back failed")
            self.view.commit_batch()

    def _flush_job(self, blobs: set[int]) -> Callable[[], None]:
        """Making ``blobs`` and the index durable, to run here or in a worker
        thread; the descriptors are taken now, on the loop, which owns them."""
        return functools.partial(self.flusher.flush, self.view.blob_fds(blobs), self.idx.sync)

    def _queue_flush(self, unsynced: set[int]) -> None:
        if not self._lazy_pending and not self._flushing:
            # A crash of this daemon before the flush is done leaves this
            # flag set: the next mount then flushes the whole store's filesystem.
            self._unflushed.set()
        self._lazy |= unsynced
        self._lazy_pending = True
        if not self._flushing:
            self._start_drain()

    def _start_drain(self) -> None:
        if self.nursery is None:
            return
        self._flushing = True
        if self._flushed.is_set():
            self._flushed = trio.Event()
        self.nursery.start_soon(self._drain_flushes)

    async def _drain_flushes(self) -> None:
        try:
            while self._lazy_pending:
                blobs, self._lazy, self._lazy_pending = self._lazy, set(), False
                try:
                    await trio.to_thread.run_sync(self._flush_job(blobs))
                except BaseException as e:  # also cancellation: close() flushes what is left
                    self._lazy |= blobs
                    self._lazy_pending = True
                    if not isinstance(e, Exception):
                        raise
                    log.error("flushing checkpoints to disk: %s", e)
                    self._flush_error = f"flushing checkpoints to disk failed: {e}"
                    return  # the next sync() or checkpoint tries again
            self._unflushed.clear()
        finally:
            self._flushing = False
            self._flushed.set()

    async def sync(self) -> None:
        """Return once every checkpoint taken so far is on disk; a flush that
        failed is tried again, and its error raised if it fails again."""
        self._flush_error = ""
        while self._lazy_pending or self._flushing:
            if not self._flushing:
                self._start_drain()
            await self._flushed.wait()
            if self._flush_error:
                err, self._flush_error = self._flush_error, ""
                raise DeltaFSError(err + "; the checkpoints are intact until the machine crashes; "
                                   "call sync again once the disk is back")

    def close(self) -> None:
        self.view.flush_dirty()
        self.view.commit_batch()
        if self._lazy:  # lazily committed checkpoints the background task did not reach
            self._flush_job(self._lazy)()
            self._lazy = set()
        self.idx.sync()
        self._unflushed.clear()
        self._unflushed.close()
        self.idx.close()
        self.flusher.close()
        self.blobs.close()
        os.close(self.lock_fd)


def _raise_fd_limit() -> int:
    """Raise the soft limit on descriptors to the hard one: the daemon keeps
    the content of recently used files open and flushes a checkpoint's files
    through one descriptor each. Returns how many contents to keep open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return 512
    return max(16, min(512, soft // 8))


def _cid(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        raise UnknownCheckpointError(f"{v!r} is not a checkpoint id: ids are the numbers "
                                     "'deltafs checkpoint' printed") from None


def _lock(store: str) -> int:
    fd = os.open(os.path.join(store, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StoreLockedError(f"the store {store} is in use by DeltaFS daemon pid {holder}: "
                               "unmount that mount first, or use another --store") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


async def _serve_client(fs: Filesystem, stream: trio.SocketStream, done: trio.Event) -> None:
    buf = b""
    async with stream:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    req = json.loads(line)
                    res = {"ok": True, "result": await fs.control(req)}
                except DeltaFSError as e:
                    res = {"ok": False, "kind": type(e).__name__, "error": str(e)}
                except Exception as e:  # report, keep serving
                    log.exception("control request failed")
                    res = {"ok": False, "kind": "DaemonError", "error": f"{type(e).__name__}: {e}"}
                await stream.send_all(json.dumps(res).encode() + b"\n")
                if req.get("op") == "unmount" and res["ok"]:
                    done.set()


def _listen(sock_path: str) -> socket.socket:
    try:
        os.unlink(sock_path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sock_path)
    os.chmod(sock_path, 0o600)
    s.listen(16)
    return s


async def _run(fs: Filesystem, sock: socket.socket) -> None:
    done = trio.Event()
    listener = trio.socket.from_stdlib_socket(sock)
    async with trio.open_nursery() as nursery:
        fs.nursery = nursery

        async def fuse_main() -> None:
            await pyfuse3.main()
            done.set()  # unmounted from outside (umount, fusermount3 -u)

        async def accept() -> None:
            sl = trio.SocketListener(listener)
            while True:
                stream = await sl.accept()
                nursery.start_soon(_serve_client, fs, stream, done)

        async def signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as it:
                async for _ in it:
                    done.set()

        nursery.start_soon(fuse_main)
        nursery.start_soon(accept)
        nursery.start_soon(signals)
        nursery.start_soon(fs.write_back)
        await done.wait()
        nursery.cancel_scope.cancel()


def serve(mountpoint: str, store: str, base: str | None, options: list[str],
          ready_fd: int | None) -> int:
    """Mount and serve until unmounted. Reports start-up errors on
    ``ready_fd`` (one line, ``ok`` or the message) when given."""
    fs = None
    sock = None
    mounted = created = False
    try:
        mp = canonical(mountpoint)
        if is_dead(mp):
            subprocess.run(["umount", "-l", mp], check=False, capture_output=True)
        m = top_mount(mp)
        if m is not None and m.fstype == FSTYPE:
            raise AlreadyMountedError(f"{mountpoint} already has a DeltaFS mounted (store "
                                      f"{m.source[len(SOURCE_PREFIX):]}): "
                                      f"run 'deltafs unmount {mountpoint}' first")
        if not os.path.isdir(mp):
            raise BaseMissingError(f"the mount point {mountpoint} is not a directory")
        base_path = os.path.realpath(base) if base else mp
        store_path = os.path.realpath(store)
        for inside, what in ((mp, "the mount point"), (base_path, "the base directory")):
            if store_path == inside or store_path.startswith(inside.rstrip("/") + "/"):
                raise StorePlacementError(f"the store {store} is inside {what} {inside}: the daemon would "
                                       "serve its own index; put the store elsewhere (--store DIR)")
        try:
            base_fd = os.open(base_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise BaseMissingError(f"the base directory {base} cannot be opened: {e.strerror}; "
                                   "give an existing directory with --base") from e
        st = os.fstat(base_fd)
        created = make_store(store)
        fs = Filesystem(store, base_fd, f"{base_path} (dev {st.st_dev} ino {st.st_ino})")
        fs.view.files_max = _raise_fd_limit()
        opts = set(pyfuse3.default_options)
        opts |= {f"fsname={SOURCE_PREFIX}{store}", "subtype=deltafs", "default_permissions"}
        opts |= set(options)
        sock = _listen(os.path.join(store, "control.sock"))
        handles = os.environ.get("DELTAFS_HANDLES") == "1" or not INODE_HANDLES_AVAILABLE
        if not INODE_HANDLES_AVAILABLE:
            log.warning("stock pyfuse3: every open and directory listing costs a request "
                        "to this daemon; ./run.sh installs the deltafs build of pyfuse3")
        configure_request_spin()
        ensure_fusectl()  # lets clients skip a round trip at checkpoints (Mount._write_back_mapped)
        if hasattr(pyfuse3, "set_before_wait") and os.environ.get("DELTAFS_BATCH", "1") != "0":
            # group commit: the request loop commits the batch before it waits
            fs.view.batching = True
            fs.view.on_batch_lost = fs._batch_lost
            pyfuse3.set_before_wait(fs.view.commit_batch)
        try:
            pyfuse3.init(Operations(fs.view, store, inode_handles=not handles), mp, opts)
        except RuntimeError as e:
            if options and "fuse_session_new" in str(e):  # libfuse says no more than that
                raise DaemonError(
                    f"cannot mount {mountpoint}: libfuse does not understand one of the "
                    f"options given with -o ({','.join(options)}); see 'man mount.fuse3' for "
                    "the options it knows") from e
            raise
        mounted = True
    except (DeltaFSError, OSError, RuntimeError) as e:
        if fs is not None:
            fs.close()
        if sock is not None:
            sock.close()
            os.unlink(os.path.join(store, "control.sock"))
        if created:
            remove_new_store(store)
        msg = str(e) if isinstance(e, DeltaFSError) else f"cannot mount {mountpoint}: {e}"
        if ready_fd is not None:
            os.write(ready_fd, msg.encode() + b"\n")
            os.close(ready_fd)
        else:
            print(f"deltafs: {msg}", file=sys.stderr)
        return 1
    if ready_fd is not None:
        os.write(ready_fd, b"ok\n")
        os.close(ready_fd)
    try:
        trio.run(_run, fs, sock)
    finally:
        if mounted:
            pyfuse3.close(unmount=True)
        fs.close()
        try:
            os.unlink(os.path.join(store, "control.sock"))
        except FileNotFoundError:
            pass
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deltafs-daemon")
    p.add_argument("mountpoint")
    p.add_argument("--store", required=True)
    p.add_argument("--base")
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("--ready-fd", type=int)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s deltafs[%(process)d] %(message)s")
    opts = [o for group in a.options for o in group.split(",") if o]
    return serve(a.mountpoint, a.store, a.base, opts, a.ready_fd)


if __name__ == "__main__":
    sys.exit(main())

