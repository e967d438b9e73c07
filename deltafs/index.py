"""The LMDB index: versioned keys over a tree of layers.

Every piece of filesystem metadata is a *versioned key*: a prefix naming the
thing (``parent ino + name`` for a directory entry, ``ino`` for an inode,
``ino + xattr name`` for an extended attribute) followed by the 8-byte
big-endian id of the layer that wrote that version. Layer ids only grow, and
a layer is always created after its parent, so along any chain of layers the
newest version has the largest id. Resolving a key against the live chain is
therefore one ``set_range`` to ``prefix + live id`` and a short backwards scan
that stops at the first version whose layer is an ancestor (a set lookup):
the cost depends on how many layers wrote *that* key, never on how many
checkpoints exist.

An empty value is a tombstone (a whiteout for entries, a deleted inode, a
removed xattr). A layer also logs which prefixes it wrote (table ``chg``) so
that a rollback can tell the kernel exactly what changed, and so that a layer
can be deleted or merged without scanning the whole index.

The environment runs with ``sync=False``: a committed transaction reaches the
OS at once (it survives ``kill -9`` of the daemon) and the store is flushed to
disk with ``fsync`` only when a checkpoint is taken (``sync()``): that is what
makes a checkpoint durable without syncing on every write. Not with
``writemap``, although its commits are faster (7 us instead of 19 us for three
puts, measured here): a full disk then kills the daemon with SIGBUS instead of
failing the one operation with an error.
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Iterator
from typing import Any

import lmdb

from .errors import StoreCorruptError
from .records import FORMAT, L_FROZEN, NO_BLOB, Inode, Layer, from_u64, u64

ENT, INO, XAT, BLOB = b"e", b"i", b"x", b"b"
_MAP_SIZE = 1 << 38  # sparse: only what is written uses disk
_SCAN_VERSIONS = 4


class Index:
    """Versioned key-value tables over the layer tree, backed by LMDB."""

    def __init__(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        try:
            self.env = lmdb.open(path, max_dbs=8, map_size=_MAP_SIZE, sync=False,
                                 metasync=False, readahead=False, max_readers=64)
        except lmdb.Error as e:
            raise StoreCorruptError(f"cannot open the index at {path}: {e}; "
                                    "the store is damaged or not a DeltaFS store") from e
        self.dbs = {
            ENT: self.env.open_db(b"ent"),
            INO: self.env.open_db(b"ino"),
            XAT: self.env.open_db(b"xat"),
        }
        self.chg = self.env.open_db(b"chg")
        self.lay = self.env.open_db(b"lay")
        self.meta = self.env.open_db(b"meta")
        self.layers: dict[int, Layer] = {}
        self.live = 0
        self.anc: set[int] = set()  # the live layer and all its ancestors
        self.anc_sorted: list[int] = []

    # -- setup ---------------------------------------------------------------

    def is_new(self) -> bool:
        with self.env.begin(db=self.meta) as txn:
            return txn.get(b"format") is None

    def initialise(self, txn: Any) -> None:
        """Write the meta records and the first two layers: 1 = the base
        checkpoint, 2 = the live layer on top of it."""
        now = time.time_ns()
        txn.put(b"format", str(FORMAT).encode(), db=self.meta)
        txn.put(b"next_ino", u64(2), db=self.meta)
        txn.put(b"next_blob", u64(1), db=self.meta)
        txn.put(b"next_layer", u64(3), db=self.meta)
        txn.put(b"live", u64(2), db=self.meta)
        base = Layer(1, 0, L_FROZEN, now, "base")
        live = Layer(2, 1, 0, now)
        txn.put(u64(1), base.encode(), db=self.lay)
        txn.put(u64(2), live.encode(), db=self.lay)

    def load(self) -> None:
        with self.env.begin() as txn:
            fmt = txn.get(b"format", db=self.meta)
            if fmt is None:
                raise StoreCorruptError("the index has no format record: not a DeltaFS store")
            if int(fmt) != FORMAT:
                raise StoreCorruptError(f"the store has format {int(fmt)}, this DeltaFS reads "
                                        f"format {FORMAT}: use the matching version")
            live = txn.get(b"live", db=self.meta)
            self.layers = {}
            for k, v in txn.cursor(db=self.lay):
                lid = from_u64(k)
                self.layers[lid] = Layer.decode(lid, v)
        if live is None or from_u64(live) not in self.layers:
            raise StoreCorruptError("the index names no live layer: the store is damaged")
        for lay in self.layers.values():
            if lay.parent:
                if lay.parent not in self.layers:
                    raise StoreCorruptError(f"layer {lay.id} names a missing parent {lay.parent}")
                self.layers[lay.parent].children.add(lay.id)
        self.set_live(from_u64(live))

    def set_live(self, lid: int) -> None:
        self.live = lid
        anc = set()
        while lid:
            anc.add(lid)
            lid = self.layers[lid].parent
        self.anc = anc
        self.anc_sorted = sorted(anc)

    def push_live(self, lid: int) -> None:
        """A new live layer on top of the current one (a checkpoint)."""
        self.live = lid
        self.anc.add(lid)
        self.anc_sorted.append(lid)

    def chain(self, lid: int) -> list[int]:
        """``lid`` and its ancestors, newest first."""
        out = []
        while lid:
            out.append(lid)
            lid = self.layers[lid].parent
        return out

    def next_id(self, txn: Any, name: bytes) -> int:
        n = from_u64(txn.get(name, db=self.meta))
        txn.put(name, u64(n + 1), db=self.meta)
        return n

    def begin(self, write: bool = False) -> Any:
        return self.env.begin(write=write)

    def sync(self) -> None:
        self.env.sync(True)

    def close(self) -> None:
        self.env.close()

    # -- versioned reads -------------------------------------------------------

    def visible(self, txn: Any, table: bytes, prefix: bytes,
                anc: set[int] | None = None, top: int | None = None,
                anc_sorted: list[int] | None = None) -> tuple[int, bytes] | None:
        """The newest version of ``prefix`` in the chain ``anc`` (default: the
        live chain) as ``(layer, value)``, or None if no layer of it wrote one.

        Versions written by other branches (siblings in a tree search) can sit
        between two ancestors; instead of stepping over them one by one, a
        miss seeks straight to the next older ancestor, so the cost is one seek
        per gap in the chain that holds foreign versions, not per version."""
        if anc is None:
            anc, top, anc_sorted = self.anc, self.live, self.anc_sorted
        assert top is not None
        cur = txn.cursor(db=self.dbs[table])
        plen = len(prefix)
        target = top
        while True:
            key = prefix + u64(target)
            if cur.set_range(key):
                if cur.key() == key:
                    return target, cur.value()
                if not cur.prev():
                    return None
            elif not cur.last():
                return None
            k = cur.key()
            if len(k) != plen + 8 or k[:plen] != prefix:
                return None
            lid = from_u64(k[plen:])
            if lid in anc:
                return lid, cur.value()
            if anc_sorted is None:
                anc_sorted = sorted(anc)
            i = bisect.bisect_left(anc_sorted, lid) - 1
            if i < 0:
                return None
            target = anc_sorted[i]

    def scan_visible(self, txn: Any, table: bytes, prefix: bytes,
                     anc: set[int] | None = None) -> Iterator[tuple[bytes, int, bytes]]:
        """Every key under ``prefix`` as ``(rest, layer, value)``, newest
        visible version only, tombstones included, in key order. ``rest`` is
        the key between ``prefix`` and the layer id."""
        if anc is None:
            anc, top, anc_sorted = self.anc, self.live, self.anc_sorted
        else:
            anc_sorted = sorted(anc)
            top = anc_sorted[-1]
        cur = txn.cursor(db=self.dbs[table])
        if not cur.set_range(prefix):
            return
        plen = len(prefix)
        while True:
            k = cur.key()
            if k[:plen] != prefix:
                return
            rest = k[plen:-8]
            group = prefix + rest
            # Walk a few versions; a key rewritten in many layers is resolved
            # with a seek instead, so a listing never grows with history.
            best: tuple[bytes, int, bytes] | None = None
            for _ in range(_SCAN_VERSIONS):
                lid = from_u64(k[-8:])
                if lid in anc:
                    best = (rest, lid, cur.value())  # ascending ids: the last ancestor wins
                if not cur.next():
                    if best is not None:
                        yield best
                    return
                k = cur.key()
                if k[:-8] != group:
                    break
            else:
                found = self.visible(txn, table, group, anc, top, anc_sorted)
                best = (rest, found[0], found[1]) if found else None
                if not cur.set_range(group + b"\xff" * 9):
                    if best is not None:
                        yield best
                    return
            if best is not None:
                yield best

    # -- versioned writes (always into the live layer) -------------------------

    def put(self, txn: Any, table: bytes, prefix: bytes, value: bytes) -> None:
        txn.put(prefix + u64(self.live), value, db=self.dbs[table])
        txn.put(u64(self.live) + table + prefix, b"", db=self.chg)

    def remove(self, txn: Any, table: bytes, prefix: bytes) -> None:
        """Hide ``prefix`` in the live view: a tombstone if an older layer of
        the chain still has a version, else just drop the live layer's own."""
        key = prefix + u64(self.live)
        db = self.dbs[table]
        txn.delete(key, db=db)
        below = self.visible(txn, table, prefix)
        if below is not None and below[1] != b"":
            txn.put(key, b"", db=db)
            txn.put(u64(self.live) + table + prefix, b"", db=self.chg)

    def own_blob(self, txn: Any, blob: int) -> None:
        txn.put(u64(self.live) + BLOB + u64(blob), b"", db=self.chg)

    def changes(self, txn: Any, lid: int) -> Iterator[tuple[bytes, bytes]]:
        """What layer ``lid`` wrote, as ``(table, prefix)``; table BLOB gives
        the blobs it owns."""
        cur = txn.cursor(db=self.chg)
        p = u64(lid)
        if not cur.set_range(p):
            return
        for k in cur.iternext(values=False):
            if k[:8] != p:
                break
            yield k[8:9], k[9:]

    # -- layer records ---------------------------------------------------------

    def put_layer(self, txn: Any, lay: Layer) -> None:
        txn.put(u64(lay.id), lay.encode(), db=self.lay)

    def delete_layer_keys(self, txn: Any, lid: int) -> list[int]:
        """Delete every version written by ``lid`` and its change log; return
        the blobs it owned (the caller deletes their files after commit)."""
        blobs = []
        for table, prefix in list(self.changes(txn, lid)):
            if table == BLOB:
                blobs.append(from_u64(prefix))
            else:
                txn.delete(prefix + u64(lid), db=self.dbs[table])
            txn.delete(u64(lid) + table + prefix, db=self.chg)
        txn.delete(u64(lid), db=self.lay)
        return blobs

    def merge_layer_into(self, txn: Any, src: int, dst: int) -> list[int]:
        """Move every version of ``src`` that ``dst`` does not override into
        ``dst`` (dst is src's only child, so it sees exactly the same).
        Returns the blobs of ``src`` that no version refers to any more (the
        caller deletes their files after commit): those of records that
        ``dst`` replaced or deleted."""
        owned: list[int] = []
        inodes: list[bytes] = []
        for table, prefix in list(self.changes(txn, src)):
            txn.delete(u64(src) + table + prefix, db=self.chg)
            if table == BLOB:
                owned.append(from_u64(prefix))
                continue
            txn.put(u64(dst) + table + prefix, b"", db=self.chg)
            if table == INO:
                inodes.append(prefix)
            db = self.dbs[table]
            old = prefix + u64(src)
            val = txn.get(old, db=db)
            txn.delete(old, db=db)
            if val is not None and txn.get(prefix + u64(dst), db=db) is None:
                txn.put(prefix + u64(dst), val, db=db)
        # A blob is made for one inode, in the layer that writes that inode's
        # record, and later layers only carry it on in their versions of the
        # record (a chmod, a rename, a new link: one record per inode, hard
        # links included). So the inodes src wrote are the only ones whose
        # versions can still name its blobs; what none names is garbage.
        used = {blob for prefix in inodes for blob in self._blobs_named(txn, prefix)}
        garbage: list[int] = []
        for blob in owned:
            if blob in used:
                txn.put(u64(dst) + BLOB + u64(blob), b"", db=self.chg)
            else:
                garbage.append(blob)
        txn.delete(u64(src), db=self.lay)
        return garbage

    def _blobs_named(self, txn: Any, prefix: bytes) -> Iterator[int]:
        """The blob of every stored version of inode record ``prefix``, in
        any layer: as many as the layers that wrote this inode."""
        cur = txn.cursor(db=self.dbs[INO])
        if not cur.set_range(prefix):
            return
        for k, v in cur:
            if len(k) != len(prefix) + 8 or k[:len(prefix)] != prefix:
                return
            if v:
                blob = Inode.decode(0, 0, v).blob
                if blob != NO_BLOB:
                    yield blob
