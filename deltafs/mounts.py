"""Finding DeltaFS mounts: the kernel's mount table is the registry.

The daemon mounts with ``fsname=deltafs:STORE`` and ``subtype=deltafs``, so
``/proc/self/mountinfo`` shows type ``fuse.deltafs`` and the store path as
the source. The control socket lives in the store. Nothing else has to be
kept in sync with the set of mounts.
"""

from __future__ import annotations

import errno
import os
import subprocess
from dataclasses import dataclass

from .errors import NotAMountError

FSTYPE = "fuse.deltafs"
SOURCE_PREFIX = "deltafs:"
FUSECTL = "/sys/fs/fuse/connections"  # the FUSE control filesystem: per-connection counters


@dataclass(frozen=True, slots=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) + 0 and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mount_table() -> list[MountEntry]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            rfields = right.split()
            if len(fields) < 5 or len(rfields) < 2:
                continue
            out.append(MountEntry(_unescape(fields[4]), rfields[0], _unescape(rfields[1])))
    return out


def top_mount(path: str) -> MountEntry | None:
    """The mount on top of the stack at exactly ``path``, if any."""
    found = None
    for m in mount_table():
        if m.mountpoint == path:
            found = m
    return found


def canonical(path: str) -> str:
    """An absolute path without following the last component: a dead FUSE
    mount cannot be stat()ed, so realpath of the parent only."""
    path = os.path.abspath(path)
    head, tail = os.path.split(path)
    return os.path.join(os.path.realpath(head), tail) if tail else path


def store_of(mountpoint: str) -> str:
    """The store of the DeltaFS mounted at ``mountpoint``."""
    mp = canonical(mountpoint)
    m = top_mount(mp)
    if m is None or m.fstype != FSTYPE or not m.source.startswith(SOURCE_PREFIX):
        what = "nothing is mounted there" if m is None else f"it is a {m.fstype} mount"
        raise NotAMountError(f"{mountpoint} is not a DeltaFS mount ({what}); "
                             f"mount one with 'deltafs {mountpoint}'")
    return m.source[len(SOURCE_PREFIX):]


def is_dead(mountpoint: str) -> bool:
    """A DeltaFS mount whose daemon is gone (kill -9): the kernel answers
    ENOTCONN until it is unmounted."""
    try:
        os.statvfs(mountpoint)  # stat() may be answered from the kernel's cache
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def ensure_fusectl() -> bool:
    """Mount the FUSE control filesystem if it is not (root only; the
    kernel's fusectl module, usually loaded with fuse). True if it is there."""
    if any(m.fstype == "fusectl" for m in mount_table()):
        return True
    r = subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], capture_output=True, check=False)
    return r.returncode == 0
