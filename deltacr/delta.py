"""The on-disk memory delta of one checkpoint: versioned and checksummed.

A delta holds what changed between a checkpoint and its parent: the complete
mapping layout of the checkpoint (so a restore can add, remove, grow and
re-protect mappings and move the program break) and the content of every page
written since the parent, plus every page of a mapping that is new since the
parent. Pages that are all zero are stored as zero runs without data.

Layout (all integers little-endian)::

    offset  size  field
    ------  ----  ---------------------------------------------------------
    0       8     magic b"DCRDELTA"
    8       2     format version (FORMAT_VERSION, independent of the package)
    10      2     flags: bit 0 = BASE (root checkpoint: layout only, no pages)
    12      4     page size
    16      8     checkpoint id
    24      8     parent checkpoint id (0 = none)
    32      8     program break (end of [heap]; 0 = no heap)
    40      4     number of mappings (M)
    44      4     number of page runs (R)
    48      8     bytes of page data
    56      8     reserved (0)
    64      ...   M mapping records:
                    u64 start, u64 end, u64 file offset, u8 prot (r=1 w=2 x=4),
                    u8 flags (bit 0 private), u16 path length L, u32 reserved,
                    u64 device (os.makedev), u64 inode of the mapped file (0 for
                    anonymous memory; version 2 on, version 1 has neither),
                    L bytes of path (UTF-8, surrogateescape)
    ...     ...   R page runs:
                    u64 address, u32 page count N, u8 kind (0 data, 1 zero),
                    3 bytes reserved, u32 CRC-32 of the data (0 for zero runs),
                    then N * page size bytes of data for kind 0
    end-16  16    trailer: magic b"DCREND\\0\\0", u32 CRC-32 of the 64-byte header,
                    u32 CRC-32 of everything between header and trailer

Version 2 added the device and inode: the slow path tells a mapping of one
file from a mapping of another that was put at the same address under the
same name (see :func:`same_backing`). Version 1 files are still read (device
and inode 0: unknown). Readers check both magics, the version, the header and body checksums (or, on
the replay path, each run's own checksum as its data is read), and cap every
count by the file's size before trusting it.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator, NamedTuple, Protocol

from .errors import DeltaFormatError

MAGIC = b"DCRDELTA"
TRAILER_MAGIC = b"DCREND\0\0"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
FLAG_BASE = 1
KIND_DATA = 0
KIND_ZERO = 1

_HEADER = struct.Struct("<8sHHIQQQIIQQ")
_VMA_V1 = struct.Struct("<QQQBBHI")
_VMA = struct.Struct("<QQQBBHIQQ")
_RUN = struct.Struct("<QIB3xI")
_TRAILER = struct.Struct("<8sII")
assert _HEADER.size == 64 and _TRAILER.size == 16


# Named tuples, not frozen dataclasses, for the two records a delta holds
# thousands of: a slow-path restore parses every delta on its path, and
# building a frozen dataclass costs several times more.
class MapRecord(NamedTuple):
    start: int
    end: int
    offset: int
    prot: int
    private: bool
    path: str
    dev: int = 0  # of the mapped file (os.makedev); 0: anonymous, or unknown (a version 1 file)
    inode: int = 0

    @property
    def special(self) -> bool:
        return self.path in ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]")


class Backed(Protocol):
    """What a mapping is made of: a /proc maps line (procfs.Vma) or a
    recorded one (MapRecord)."""

    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def private(self) -> bool: ...
    @property
    def path(self) -> str: ...
    @property
    def dev(self) -> int: ...
    @property
    def inode(self) -> int: ...


def is_anonymous(path: str) -> bool:
    """No file behind it ("", [heap], [stack], [anon:name]...): its offset means nothing."""
    return path == "" or path.startswith("[")


def same_backing(a: Backed, b: Backed) -> bool:
    """Do two overlapping mappings put the same thing at the same addresses?
    Both private or both shared, and both anonymous or the same file (path,
    and device and inode where both are known) at the same file offset for
    each address. Protections do not count (mprotect changes them in place).
    A range whose backing changed between two checkpoints is recorded wholly
    in the newer one's delta and mapped again by the slow path."""
    if a.private != b.private or a.path != b.path:
        return False
    if is_anonymous(a.path):
        return True
    if a.inode and b.inode and (a.dev, a.inode) != (b.dev, b.inode):
        return False
    return a.start - a.offset == b.start - b.offset


class Run(NamedTuple):
    addr: int
    npages: int
    kind: int
    crc: int
    data_offset: int  # where the data starts in the file (kind 0)


@dataclass
class DeltaInfo:
    version: int
    flags: int
    page_size: int
    checkpoint_id: int
    parent_id: int
    brk: int
    data_bytes: int
    maps: list[MapRecord] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    file_size: int = 0

    @property
    def pages(self) -> int:
        return sum(r.npages for r in self.runs)

    @property
    def zero_pages(self) -> int:
        return sum(r.npages for r in self.runs if r.kind == KIND_ZERO)


class DeltaWriter:
    """Stream a delta to ``path`` (written to a temporary name, fsynced, renamed)."""

    def __init__(self, path: str, *, checkpoint_id: int, parent_id: int, brk: int,
                 maps: list[MapRecord], page_size: int, base: bool = False) -> None:
        self.path = path
        self.tmp = path + ".tmp"
        self.f: BinaryIO = open(self.tmp, "wb")
        self.page_size = page_size
        self.zero = bytes(page_size)
        self.nruns = 0
        self.data_bytes = 0
        self.body_crc = 0
        self._hdr = dict(checkpoint_id=checkpoint_id, parent_id=parent_id, brk=brk,
                         flags=FLAG_BASE if base else 0, nmaps=len(maps))
        self.f.write(bytes(_HEADER.size))
        for m in maps:
            p = m.path.encode("utf-8", "surrogateescape")
            self._body(_VMA.pack(m.start, m.end, m.offset, m.prot, 1 if m.private else 0, len(p), 0,
                                 m.dev, m.inode) + p)

    def _body(self, data: bytes | memoryview) -> None:
        self.body_crc = zlib.crc32(data, self.body_crc)
        self.f.write(data)

    def _run(self, addr: int, npages: int, data: memoryview | None) -> None:
        if data is None:
            self._body(_RUN.pack(addr, npages, KIND_ZERO, 0))
        else:
            self._body(_RUN.pack(addr, npages, KIND_DATA, zlib.crc32(data)))
            self._body(data)
            self.data_bytes += len(data)
        self.nruns += 1

    def add(self, addr: int, data: bytes | bytearray | memoryview,
            pause: Callable[[], None] | None = None) -> None:
        """Add whole pages starting at addr; all-zero pages become zero runs."""
        mv = memoryview(data)
        ps = self.page_size
        n = len(mv) // ps
        i = 0
        while i < n:
            if pause is not None:
                pause()
            zero = mv[i * ps:(i + 1) * ps] == self.zero
            j = i + 1
            while j < n and (mv[j * ps:(j + 1) * ps] == self.zero) == zero:
                j += 1
            self._run(addr + i * ps, j - i, None if zero else mv[i * ps:j * ps])
            i = j

    def close(self) -> int:
        """Finish: header, trailer, fsync, rename. Returns the file size."""
        h = self._hdr
        header = _HEADER.pack(MAGIC, FORMAT_VERSION, h["flags"], self.page_size, h["checkpoint_id"],
                              h["parent_id"], h["brk"], h["nmaps"], self.nruns, self.data_bytes, 0)
        self.f.write(_TRAILER.pack(TRAILER_MAGIC, zlib.crc32(header), self.body_crc))
        self.f.seek(0)
        self.f.write(header)
        self.f.flush()
        os.fsync(self.f.fileno())
        size = self.f.seek(0, os.SEEK_END)
        self.f.close()
        os.rename(self.tmp, self.path)
        dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return size

    def abort(self) -> None:
        self.f.close()
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


def read_delta(path: str, *, verify: bool = True) -> DeltaInfo:
    """Parse a delta's header, mapping table and run index.

    With ``verify`` the body checksum is checked too (reads the whole file).
    """
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DeltaFormatError(f"delta file {path} does not exist") from None
    except OSError as e:  # a directory, a store of another user
        raise DeltaFormatError(f"delta file {path} cannot be read: {e.strerror}; name a file "
                               "<store>/deltas/<id>.delta that this user can read") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < _HEADER.size + _TRAILER.size:
            raise DeltaFormatError(f"{path}: {size} bytes is too short for a delta file (truncated?)")
        # Mapped, not read: the run headers sit between the runs' data, and a
        # slow-path restore parses many deltas without reading their data
        # (a buffered file re-read from the kernel after each seek past a run).
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm, memoryview(mm) as mv:
            return _parse(path, mv, size, verify)


def _parse(path: str, mv: memoryview, size: int, verify: bool) -> DeltaInfo:
    header = bytes(mv[:_HEADER.size])  # copies: no view may outlive the mapping (a raise keeps locals)
    (magic, version, flags, page_size, ck, parent, brk, nmaps, nruns, data_bytes,
     _r) = _HEADER.unpack(header)
    if magic != MAGIC:
        raise DeltaFormatError(f"{path}: not a deltacr delta file (bad magic {magic!r})")
    if version not in READABLE_VERSIONS:
        raise DeltaFormatError(f"{path}: format version {version}, this deltacr reads "
                               f"{', '.join(map(str, READABLE_VERSIONS))}")
    tmagic, hcrc, bcrc = _TRAILER.unpack(mv[size - _TRAILER.size:])
    if tmagic != TRAILER_MAGIC:
        raise DeltaFormatError(f"{path}: trailer missing: the file is truncated or was not finished")
    if zlib.crc32(header) != hcrc:
        raise DeltaFormatError(f"{path}: header checksum mismatch: the file is corrupt")
    body_end = size - _TRAILER.size
    if nmaps > size // _VMA_V1.size or nruns > size // _RUN.size or page_size not in (4096, 16384, 65536):
        raise DeltaFormatError(f"{path}: counts in the header exceed the file size: corrupt")
    info = DeltaInfo(version, flags, page_size, ck, parent, brk, data_bytes, file_size=size)
    pos = _HEADER.size
    crc = 0
    vma = _VMA if version >= 2 else _VMA_V1
    vma_unpack, run_unpack, vsize, rsize = vma.unpack_from, _RUN.unpack_from, vma.size, _RUN.size
    maps, runs = info.maps, info.runs
    for _ in range(nmaps):
        if pos + vsize > body_end:
            raise DeltaFormatError(f"{path}: mapping table truncated")
        start, end, off, prot, mflags, plen, _x, *ident = vma_unpack(mv, pos)
        if plen > 4096 or pos + vsize + plen > body_end:
            raise DeltaFormatError(f"{path}: mapping path of {plen} bytes: corrupt")
        p = bytes(mv[pos + vsize:pos + vsize + plen])  # a copy: no view may outlive the mapping
        if verify:
            crc = zlib.crc32(mv[pos:pos + vsize + plen], crc)
        maps.append(MapRecord(start, end, off, prot, bool(mflags & 1), p.decode("utf-8", "surrogateescape"),
                              *ident))
        pos += vsize + plen
    for _ in range(nruns):
        if pos + rsize > body_end:
            raise DeltaFormatError(f"{path}: run table truncated")
        addr, npages, kind, rcrc = run_unpack(mv, pos)
        if verify:
            crc = zlib.crc32(mv[pos:pos + rsize], crc)
        pos += rsize
        runs.append(Run(addr, npages, kind, rcrc, pos))
        if kind == KIND_DATA:
            n = npages * page_size
            if pos + n > body_end:
                raise DeltaFormatError(f"{path}: run at {addr:#x} runs past the end of the file")
            if verify:
                crc = zlib.crc32(mv[pos:pos + n], crc)
            pos += n
        elif kind != KIND_ZERO:
            raise DeltaFormatError(f"{path}: unknown run kind {kind}")
    if pos != body_end:
        raise DeltaFormatError(f"{path}: {body_end - pos} unexpected bytes before the trailer")
    if verify and crc != bcrc:
        raise DeltaFormatError(f"{path}: body checksum mismatch: the file is corrupt")
    return info


def iter_run_data(path: str, runs: list[Run], page_size: int, chunk: int = 1 << 22
                  ) -> Iterator[tuple[int, memoryview | None, int]]:
    """Yield (address, data or None for zeros, length) per run piece, checking
    each data run's CRC-32."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        for r in runs:
            n = r.npages * page_size
            if r.kind == KIND_ZERO:
                yield r.addr, None, n
                continue
            crc = 0
            done = 0
            while done < n:
                k = min(chunk, n - done)
                mv = memoryview(buf)[:k]
                got = f.readinto(mv) if f.seek(r.data_offset + done) >= 0 else 0
                if got != k:
                    raise DeltaFormatError(f"{path}: short read in run at {r.addr:#x}")
                crc = zlib.crc32(mv, crc)
                yield r.addr + done, mv, k
                done += k
            if crc != r.crc:
                raise DeltaFormatError(f"{path}: checksum mismatch in run at {r.addr:#x}: the file is corrupt")


def format_info(path: str, info: DeltaInfo, *, runs: bool = False) -> str:
    lines = [
        f"delta file      {path}",
        f"format version  {info.version}" + ("  (BASE: layout only)" if info.flags & FLAG_BASE else ""),
        f"checkpoint      {info.checkpoint_id} (parent {info.parent_id or '-'})",
        f"page size       {info.page_size}",
        f"program break   {info.brk:#x}",
        f"mappings        {len(info.maps)}",
        f"page runs       {len(info.runs)}: {info.pages} pages, {info.zero_pages} zero, "
        f"{info.data_bytes} data bytes",
        f"file size       {info.file_size} bytes; checksums ok",
        "",
        "mappings:",
    ]
    for m in info.maps:
        prot = "".join(c if m.prot & b else "-" for c, b in (("r", 1), ("w", 2), ("x", 4)))
        lines.append(f"  {m.start:012x}-{m.end:012x} {prot}{'p' if m.private else 's'} {m.offset:08x} {m.path}")
    if runs:
        lines.append("runs:")
        for r in info.runs:
            lines.append(f"  {r.addr:012x} {r.npages:6d} pages {'zero' if r.kind == KIND_ZERO else 'data'}")
    return "\n".join(lines)
