"""The store directory: made by the first mount that uses it, and removed
again when that mount fails, so that a typo (a missing base, a bad option, a
mount point already in use) leaves no empty store with a ``daemon.log``
behind. A store that existed before the attempt is never removed.
"""

from __future__ import annotations

import fcntl
import os
import shutil


def make_store(store: str) -> bool:
    """Make ``store`` (and its parents); True if this call created it. One
    ``mkdir`` decides, so of two attempts at once only one owns it."""
    os.makedirs(os.path.dirname(os.path.abspath(store)), exist_ok=True)
    try:
        os.mkdir(store, 0o700)
    except FileExistsError:
        return False
    return True


def remove_new_store(store: str) -> None:
    """Remove a store that a failed mount created, unless a daemon holds its
    lock: another mount of the same store, started meanwhile, that got
    further (the failed attempt's own daemon has exited or closed it)."""
    try:
        fd = os.open(os.path.join(store, "lock"), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = -1
    try:
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
        shutil.rmtree(store, ignore_errors=True)
    finally:
        if fd >= 0:
            os.close(fd)
