"""Import a base directory into the first layer of a new store.

The base is walked once, when the store is created: every file gets a stable
inode number and a record pointing at its path in the base (content is read
from there until the file is first written). Hard links inside the base stay
hard links. The base is never written; it must not change while a store uses
it (a file that disappeared from it reads as EIO). Extended attributes are
imported with the files, POSIX ACLs excepted (the mount does not enable FUSE
ACL support, so the kernel would never ask for them).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

from .index import ENT, XAT, Index
from .records import F_BASE, NO_BLOB, Inode, clamp_time, u64
from .view import ROOT, View


def import_base(view: View, txn: Any, base_fd: int) -> int:
    """Write the base's records into the live layer of ``txn``; returns how
    many entries were imported."""
    idx: Index = view.idx
    seen: dict[tuple[int, int], Inode] = {}
    links: dict[int, int] = {}
    st = os.fstat(base_fd)
    root = _record(ROOT, st, 0, b"")
    root.nlink = 2
    recs: dict[int, Inode] = {ROOT: root}
    _import_xattrs(idx, txn, ROOT, base_fd)
    count = 0
    stack: list[tuple[int, bytes]] = [(ROOT, b"")]
    while stack:
        dino, rel = stack.pop()
        dfd = os.open(rel or b".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=base_fd)
        try:
            with os.scandir(dfd) as it:
                entries = sorted(it, key=lambda e: e.name)
            for e in entries:
                name = os.fsencode(e.name)
                path = rel + b"/" + name if rel else name
                est = os.stat(e.name, dir_fd=dfd, follow_symlinks=False)
                key = (est.st_dev, est.st_ino)
                if stat.S_ISDIR(est.st_mode) or key not in seen:
                    ino = idx.next_id(txn, b"next_ino")
                    target = os.readlink(e.name, dir_fd=dfd) if stat.S_ISLNK(est.st_mode) else ""
                    rec = _record(ino, est, dino, path)
                    if stat.S_ISLNK(est.st_mode):
                        rec.tail = os.fsencode(target)
                        rec.size = len(rec.tail)
                        rec.flags = 0
                    recs[ino] = rec
                    # a path through the directory's descriptor: the xattr
                    # calls take no dir_fd, and the base's path may be covered
                    _import_xattrs(idx, txn, ino, b"/proc/self/fd/%d/%s" % (dfd, name))
                    if not stat.S_ISDIR(est.st_mode):
                        seen[key] = rec
                else:
                    rec = seen[key]
                links[rec.ino] = links.get(rec.ino, 0) + 1
                idx.put(txn, ENT, u64(dino) + name + b"\0", u64(rec.ino))
                count += 1
                if stat.S_ISDIR(est.st_mode):
                    recs[dino].nlink += 1
                    rec.nlink = 2
                    stack.append((rec.ino, path))
        finally:
            os.close(dfd)
    for ino, rec in recs.items():
        if not stat.S_ISDIR(rec.mode):
            rec.nlink = links[ino]  # only the links inside the base count
        view._put_inode(txn, rec)
    return count


def _import_xattrs(idx: Index, txn: Any, ino: int, where: int | bytes) -> None:
    """Copy the extended attributes of ``where`` (a descriptor, or a path
    whose last component is not followed) to inode ``ino``."""
    follow = isinstance(where, int)  # a descriptor names the file itself
    try:
        names = os.listxattr(where, follow_symlinks=follow)
    except OSError as e:
        if e.errno == errno.ENOTSUP:  # the base's filesystem has none
            return
        raise
    for name in names:
        if name.startswith("system.posix_acl_"):
            continue
        try:
            value = os.getxattr(where, name, follow_symlinks=follow)
        except OSError as e:
            if e.errno == errno.ENODATA:  # removed since it was listed
                continue
            raise
        idx.put(txn, XAT, u64(ino) + os.fsencode(name) + b"\0", b"\1" + value)


def _record(ino: int, st: os.stat_result, parent: int, path: bytes) -> Inode:
    is_reg = stat.S_ISREG(st.st_mode)
    is_dir = stat.S_ISDIR(st.st_mode)
    return Inode(
        ino, st.st_mode, st.st_uid, st.st_gid, 1, st.st_rdev if not (is_reg or is_dir) else 0,
        st.st_size if is_reg else 0, clamp_time(st.st_atime_ns), clamp_time(st.st_mtime_ns),
        clamp_time(st.st_ctime_ns), NO_BLOB,
        F_BASE if is_reg and st.st_size else 0, parent if is_dir else 0, path if is_reg else b"")
