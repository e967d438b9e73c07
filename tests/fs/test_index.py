"""The versioned index on a real LMDB: resolution against any chain of a
random layer tree must equal a walk down that chain."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from deltafs.index import ENT, Index
from deltafs.records import Layer, u64

NAMES = [b"a", b"ab", b"b", b"c"]


@settings(max_examples=60, deadline=None)
@given(parents=st.lists(st.integers(0, 10 ** 6), min_size=1, max_size=40),
       writes=st.lists(st.tuples(st.integers(0, 10 ** 6), st.sampled_from(NAMES),
                                 st.none() | st.integers(1, 99)), max_size=200))
def test_visible_and_scan_equal_a_walk_down_the_chain(
        tmp_path_factory: object, parents: list[int], writes: list[tuple[int, bytes, int | None]]
) -> None:
    d = Path(tmp_path_factory.mktemp("idx"))  # type: ignore[attr-defined]
    idx = Index(str(d))
    with idx.begin(write=True) as txn:
        idx.initialise(txn)
    idx.load()
    for i, p in enumerate(parents):
        lid = 3 + i
        parent = sorted(idx.layers)[p % len(idx.layers)]  # always an older layer
        idx.layers[lid] = Layer(lid, parent, 0, 0)
    ids = sorted(idx.layers)
    truth: dict[int, dict[bytes, bytes]] = {lid: {} for lid in ids}
    with idx.begin(write=True) as txn:
        for at, name, val in writes:
            lid = ids[at % len(ids)]
            idx.set_live(lid)
            value = b"" if val is None else u64(val)
            idx.put(txn, ENT, u64(7) + name + b"\0", value)
            truth[lid][name] = value
    for lid in ids:
        idx.set_live(lid)
        want = {}
        for n in NAMES:
            for layer in idx.chain(lid):  # newest first: the first writer wins
                if n in truth[layer]:
                    want[n] = truth[layer][n]
                    break
        with idx.begin() as txn:
            for n in NAMES:
                got = idx.visible(txn, ENT, u64(7) + n + b"\0")
                assert (got[1] if got else None) == want.get(n)
            listed = {r[:-1]: v for r, _l, v in idx.scan_visible(txn, ENT, u64(7))}
            assert listed == want
    idx.close()
