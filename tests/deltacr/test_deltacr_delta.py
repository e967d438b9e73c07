"""The delta file format: round trip, versioning, corruption caught."""

from __future__ import annotations

import os

import pytest

from deltacr import DeltaFormatError
from deltacr.delta import FORMAT_VERSION, MapRecord, DeltaWriter, iter_run_data, read_delta

PS = 4096


def _write(path: str) -> list[MapRecord]:
    maps = [MapRecord(0x10000, 0x20000, 0, 3, True, ""), MapRecord(0x40000, 0x41000, 0x2000, 5, True, "/lib/x.so",
                                                               os.makedev(259, 1), 1 << 40)]
    w = DeltaWriter(path, checkpoint_id=7, parent_id=3, brk=0x30000, maps=maps, page_size=PS)
    page = bytes(range(256)) * 16
    w.add(0x10000, page + bytes(PS) * 2 + page)  # data, zero, zero, data
    w.close()
    return maps


def test_round_trip(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "7.delta")
    maps = _write(path)
    info = read_delta(path)
    assert (info.version, info.checkpoint_id, info.parent_id, info.brk) == (FORMAT_VERSION, 7, 3, 0x30000)
    assert info.maps == maps
    assert [(r.addr, r.npages, r.kind) for r in info.runs] == [(0x10000, 1, 0), (0x11000, 2, 1), (0x13000, 1, 0)]
    chunks = list(iter_run_data(path, info.runs, PS))
    assert [(a, d is None, n) for a, d, n in chunks] == [(0x10000, False, PS), (0x11000, True, 2 * PS),
                                                        (0x13000, False, PS)]
    assert not os.path.exists(path + ".tmp")


@pytest.mark.parametrize("where", ["header", "body", "trailer"])
def test_corruption_is_detected(tmp_path: object, where: str) -> None:
    path = os.path.join(str(tmp_path), "7.delta")
    _write(path)
    size = os.path.getsize(path)
    off = {"header": 20, "body": 64 + 40 + 100, "trailer": size - 10}[where]
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(DeltaFormatError, match=path):
        read_delta(path)


def test_truncated_and_foreign_files(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "7.delta")
    _write(path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(DeltaFormatError, match="truncated"):
        read_delta(path)
    other = os.path.join(str(tmp_path), "x")
    with open(other, "wb") as f:
        f.write(b"\x7fELF" + bytes(200))
    with pytest.raises(DeltaFormatError, match="not a deltacr delta file"):
        read_delta(other)


def test_newer_format_version_is_refused(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "7.delta")
    _write(path)
    with open(path, "r+b") as f:
        f.seek(8)
        f.write((FORMAT_VERSION + 1).to_bytes(2, "little"))
    with pytest.raises(DeltaFormatError, match="format version"):
        read_delta(path)


def test_version_1_files_are_still_read(tmp_path: object) -> None:
    # version 1 had no device and inode in its mapping records: read as 0 (unknown)
    import zlib
    from deltacr import delta
    path = os.path.join(str(tmp_path), "7.delta")
    p = b"/lib/x.so"
    body = delta._VMA_V1.pack(0x40000, 0x41000, 0x2000, 5, 1, len(p), 0) + p
    body += delta._RUN.pack(0x40000, 1, delta.KIND_ZERO, 0)
    header = delta._HEADER.pack(delta.MAGIC, 1, 0, PS, 7, 3, 0, 1, 1, 0, 0)
    with open(path, "wb") as f:
        f.write(header + body + delta._TRAILER.pack(delta.TRAILER_MAGIC, zlib.crc32(header), zlib.crc32(body)))
    info = read_delta(path)
    assert info.version == 1 and info.maps == [MapRecord(0x40000, 0x41000, 0x2000, 5, True, "/lib/x.so", 0, 0)]
    assert [(r.addr, r.kind) for r in info.runs] == [(0x40000, delta.KIND_ZERO)]
