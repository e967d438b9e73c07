"""The records stored in the index, and their byte encodings.

Every value is a fixed little-endian struct followed by a variable tail, so a
record decodes with one ``struct.unpack_from``. The format version of the
whole store is kept in the index's ``meta`` table (``FORMAT``); bump it when
any layout here changes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

FORMAT = 1

# Inode flags.
F_OWNED = 1  # the blob was created in the same layer as this record version
F_BASE = 2  # the content is the base file at the relative path in ``tail``

NO_BLOB = -1

_INODE = struct.Struct("<IIIIQQqqqqIQ")
_LAYER = struct.Struct("<QIq")
U64 = struct.Struct(">Q")  # big-endian in keys so that byte order is numeric order

# Layer flags.
L_FROZEN = 1  # a checkpoint: never written again
L_DROPPED = 2  # dropped by the user: kept only while descendants need it


def clamp_time(ns: int) -> int:
    """Nanoseconds as an int64 holds them (1677-2262): later or earlier
    times are clamped, as the kernel clamps them to what a filesystem
    stores, rather than failing the write."""
    return max(-(1 << 63), min(ns, (1 << 63) - 1))


@dataclass(slots=True)
class Inode:
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    rdev: int = 0
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    blob: int = NO_BLOB
    flags: int = 0
    parent: int = 0  # directories only: the directory that holds it
    tail: bytes = b""  # symlink target, or the base-relative path (F_BASE)
    layer: int = 0  # which layer this version was read from (not stored)

    def encode(self) -> bytes:
        return (
            _INODE.pack(
                self.mode,
                self.uid,
                self.gid,
                self.nlink,
                self.rdev,
                self.size,
                self.atime_ns,
                self.mtime_ns,
                self.ctime_ns,
                self.blob,
                self.flags,
                self.parent,
            )
            + self.tail
        )

    @classmethod
    def decode(cls, ino: int, layer: int, raw: bytes) -> "Inode":
        f = _INODE.unpack_from(raw)
        return cls(ino, f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10], f[11],
                   bytes(raw[_INODE.size:]), layer)

    def copy(self) -> "Inode":
        # dataclasses.replace re-runs __init__ through keyword arguments:
        # ten times slower, on the path of every namespace change
        return Inode(self.ino, self.mode, self.uid, self.gid, self.nlink, self.rdev, self.size,
                     self.atime_ns, self.mtime_ns, self.ctime_ns, self.blob, self.flags,
                     self.parent, self.tail, self.layer)


@dataclass(slots=True)
class Layer:
    id: int
    parent: int  # 0 for the root layer
    flags: int
    created_ns: int
    label: str = ""
    children: set[int] = field(default_factory=set)

    @property
    def frozen(self) -> bool:
        return bool(self.flags & L_FROZEN)

    @property
    def dropped(self) -> bool:
        return bool(self.flags & L_DROPPED)

    def encode(self) -> bytes:
        return _LAYER.pack(self.parent, self.flags, self.created_ns) + self.label.encode()

    @classmethod
    def decode(cls, lid: int, raw: bytes) -> "Layer":
        parent, flags, created = _LAYER.unpack_from(raw)
        return cls(lid, parent, flags, created, bytes(raw[_LAYER.size:]).decode())


def u64(n: int) -> bytes:
    return U64.pack(n)


def from_u64(b: bytes) -> int:
    return U64.unpack(b)[0]
