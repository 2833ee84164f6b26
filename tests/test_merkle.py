"""The transparency log's math (domain/merkle.py) against RFC 9162 and C2SP tlog-tiles: the
transparency-dev proof vectors, a naive recursive MTH/PATH/PROOF written straight from RFC
9162 2.1, trees built by the appender in random batches (across the 256 and 65,536 tile
boundaries), and the tile paths and tile sets the spec gives as examples."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imageledger.domain import merkle
from imageledger.domain.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    MAX_ENTRY_SIZE,
    ProofError,
    TileError,
    TileRef,
    Tiles,
    append,
    consistency_proof_size,
    entries_path,
    entry_bundle,
    inclusion_proof_size,
    leaf_hash,
    node_hash,
    tile_path,
    tiles_for_size,
    verify_consistency,
    verify_inclusion,
)

# The shared test vectors beside the repository (../shared/vectors/rfc6962) when they are
# there; else the copy kept with the tests (tests/fixtures/rfc6962: the same files, unchanged,
# with their licence), so that a clone anywhere runs them too.
_SHARED = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "rfc6962"
VECTORS = _SHARED if _SHARED.is_dir() else Path(__file__).parent / "fixtures" / "rfc6962"

# --- the transparency-dev vectors ------------------------------------------------------------


def _b64(value: str | None) -> bytes:
    return base64.b64decode(value) if value else b""


def _vectors(kind: str) -> list[tuple[str, dict[str, Any]]]:
    found = sorted((VECTORS / kind).rglob("*.json"))
    return [(str(p.relative_to(VECTORS)), json.loads(p.read_text())) for p in found]


INCLUSION = _vectors("inclusion")
CONSISTENCY = _vectors("consistency")


def _check_inclusion(case: dict[str, Any]) -> None:
    verify_inclusion(
        case["leafIdx"],
        case["treeSize"],
        _b64(case["leafHash"]),
        [_b64(p) for p in case["proof"] or []],
        _b64(case["root"]),
    )


def _check_consistency(case: dict[str, Any]) -> None:
    verify_consistency(
        case["size1"],
        case["size2"],
        [_b64(p) for p in case["proof"] or []],
        _b64(case["root1"]),
        _b64(case["root2"]),
    )


def test_vector_counts() -> None:
    """The vectors are there: a missing directory must not pass as zero cases."""
    assert len(INCLUSION) == 98
    assert len(CONSISTENCY) == 98
    for cases in (INCLUSION, CONSISTENCY):
        assert sum(not c["wantErr"] for _, c in cases) > 0
        assert sum(bool(c["wantErr"]) for _, c in cases) > 0


@pytest.mark.parametrize(("name", "case"), INCLUSION, ids=[n for n, _ in INCLUSION])
def test_inclusion_vector(name: str, case: dict[str, Any]) -> None:
    if case["wantErr"]:
        with pytest.raises(ProofError):
            _check_inclusion(case)
    else:
        _check_inclusion(case)


@pytest.mark.parametrize(("name", "case"), CONSISTENCY, ids=[n for n, _ in CONSISTENCY])
def test_consistency_vector(name: str, case: dict[str, Any]) -> None:
    if case["wantErr"]:
        with pytest.raises(ProofError):
            _check_consistency(case)
    else:
        _check_consistency(case)


# The leaf inputs of RFC 6962's reference tests (transparency-dev testonly.LeafInputs), from
# which the numbered vectors' happy paths were made: our generator must give those proofs.
RFC_LEAVES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]


def _store_of(hashes: list[bytes]) -> dict[tuple[int, int], bytes]:
    store: dict[tuple[int, int], bytes] = {}
    store.update(append(0, hashes, _reader(store)))
    return store


def _reader(store: dict[tuple[int, int], bytes]) -> Callable[[int, int], bytes]:
    return lambda level, index: store.get((level, index), b"")


def test_generator_gives_the_vectors_happy_paths() -> None:
    tiles = Tiles(_reader(_store_of([leaf_hash(d) for d in RFC_LEAVES])))
    checked = 0
    for _, case in INCLUSION:
        if case["wantErr"] or case["treeSize"] > len(RFC_LEAVES):
            continue
        index, size = case["leafIdx"], case["treeSize"]
        if _b64(case["leafHash"]) != leaf_hash(RFC_LEAVES[index]):
            continue  # a vector over other leaves
        assert tiles.root(size) == _b64(case["root"])
        assert tiles.inclusion_proof(index, size) == [_b64(p) for p in case["proof"] or []]
        checked += 1
    for _, case in CONSISTENCY:
        size1, size2 = case["size1"], case["size2"]
        if case["wantErr"] or size2 > len(RFC_LEAVES) or size1 == size2:
            continue
        assert tiles.root(size1) == _b64(case["root1"])
        assert tiles.root(size2) == _b64(case["root2"])
        assert tiles.consistency_proof(size1, size2) == [_b64(p) for p in case["proof"] or []]
        checked += 1
    assert checked >= 8


# --- the naive model: RFC 9162 2.1 written as defined --------------------------------------

MAX_LEAVES = 70_000
LEAVES = [leaf_hash(b"event %d" % i) for i in range(MAX_LEAVES)]


@cache
def mth(lo: int, hi: int) -> bytes:
    """MTH(D[lo:hi]) by the recursive definition (memoized: the leaves are fixed)."""
    n = hi - lo
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return LEAVES[lo]
    k = 1 << ((n - 1).bit_length() - 1)
    return node_hash(mth(lo, lo + k), mth(lo + k, hi))


def naive_path(m: int, lo: int, hi: int) -> list[bytes]:
    n = hi - lo
    if n == 1:
        return []
    k = 1 << ((n - 1).bit_length() - 1)
    if m < k:
        return [*naive_path(m, lo, lo + k), mth(lo + k, hi)]
    return [*naive_path(m - k, lo + k, hi), mth(lo, lo + k)]


def naive_subproof(m: int, lo: int, hi: int, whole: bool) -> list[bytes]:
    n = hi - lo
    if m == n:
        return [] if whole else [mth(lo, hi)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return [*naive_subproof(m, lo, lo + k, whole), mth(lo + k, hi)]
    return [*naive_subproof(m - k, lo + k, hi, False), mth(lo, lo + k)]


class Store:
    """Tiles in a dict, as the ledger will keep them in LMDB, built only through `append`."""

    def __init__(self) -> None:
        self.tiles: dict[tuple[int, int], bytes] = {}
        self.size = 0
        self.reads = 0

    def read(self, level: int, index: int) -> bytes:
        self.reads += 1
        return self.tiles.get((level, index), b"")

    def append(self, count: int) -> dict[tuple[int, int], bytes]:
        writes = append(self.size, LEAVES[self.size : self.size + count], self.read)
        for key, value in writes.items():
            # append-only: a write extends what was stored, never rewrites it
            assert value.startswith(self.tiles.get(key, b""))
        self.tiles.update(writes)
        self.size += count
        return writes


def _flipped(value: bytes, at: int) -> bytes:
    return value[:at] + bytes([value[at] ^ 0x01]) + value[at + 1 :]


def _check_tiles_are_the_spec(store: Store) -> None:
    """Exactly the tiles the spec serves for this size, each holding what the spec says."""
    size = store.size
    refs = list(tiles_for_size(size))
    assert {(r.level, r.index) for r in refs} == set(store.tiles)
    for ref in refs:
        span = 256**ref.level
        first = ref.index * 256
        want = b"".join(mth((first + i) * span, (first + i + 1) * span) for i in range(ref.width))
        assert store.tiles[(ref.level, ref.index)] == want, ref


def _check_proofs(store: Store, data: st.DataObject, rounds: int) -> None:
    size = store.size
    tiles = Tiles(store.read)
    for _ in range(rounds):
        index = data.draw(st.integers(0, size - 1), label="index")
        at = data.draw(st.integers(1, size), label="tree size")
        index = min(index, at - 1)
        root = tiles.root(at)
        assert root == mth(0, at)
        proof = tiles.inclusion_proof(index, at)
        assert proof == naive_path(index, 0, at)
        assert len(proof) == inclusion_proof_size(index, at)
        verify_inclusion(index, at, LEAVES[index], proof, root)
        for i, value in enumerate(proof):
            bad = list(proof)
            bad[i] = _flipped(value, data.draw(st.integers(0, HASH_SIZE - 1), label="byte"))
            with pytest.raises(ProofError):
                verify_inclusion(index, at, LEAVES[index], bad, root)
        with pytest.raises(ProofError):
            verify_inclusion(index, at, _flipped(LEAVES[index], 0), proof, root)
        if at > 1:
            other = (index + data.draw(st.integers(1, at - 1), label="shift")) % at
            with pytest.raises(ProofError):
                verify_inclusion(other, at, LEAVES[index], proof, root)
        wrong = data.draw(st.integers(index + 1, size), label="size")
        if wrong != at:
            with pytest.raises(ProofError):
                verify_inclusion(index, wrong, LEAVES[index], proof, mth(0, wrong))

        size1 = data.draw(st.integers(1, at), label="size1")
        consistency = tiles.consistency_proof(size1, at)
        assert consistency == naive_subproof(size1, 0, at, True)
        assert len(consistency) == consistency_proof_size(size1, at)
        verify_consistency(size1, at, consistency, mth(0, size1), root)
        for i, value in enumerate(consistency):
            bad = list(consistency)
            bad[i] = _flipped(value, data.draw(st.integers(0, HASH_SIZE - 1), label="byte"))
            with pytest.raises(ProofError):
                verify_consistency(size1, at, bad, mth(0, size1), root)
        if size1 < at:
            with pytest.raises(ProofError):
                verify_consistency(size1, at, consistency, _flipped(mth(0, size1), 5), root)
            with pytest.raises(ProofError):
                verify_consistency(size1, at, consistency, mth(0, size1), _flipped(root, 7))
            other1 = data.draw(st.integers(1, at), label="size1'")
            if other1 != size1:
                with pytest.raises(ProofError):
                    verify_consistency(other1, at, consistency, mth(0, other1), root)
            other2 = data.draw(st.integers(size1, size), label="size2'")
            if other2 != at:
                with pytest.raises(ProofError):
                    verify_consistency(size1, other2, consistency, mth(0, size1), mth(0, other2))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.integers(1, 300), min_size=1, max_size=6), data=st.data())
def test_small_trees_match_the_model(batches: list[int], data: st.DataObject) -> None:
    store = Store()
    for count in batches:
        store.append(count)
        assert Tiles(store.read).root(store.size) == mth(0, store.size)
    _check_tiles_are_the_spec(store)
    tiles = Tiles(store.read)
    for height in range(store.size.bit_length()):
        for index in range(min(store.size >> height, 3)):
            assert tiles.subtree(height, index) == mth(index << height, (index + 1) << height)
        last = (store.size >> height) - 1
        assert tiles.subtree(height, last) == mth(last << height, (last + 1) << height)
    _check_proofs(store, data, rounds=3)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    first=st.integers(60_000, 65_535),
    batches=st.lists(st.integers(1, 1_500), min_size=1, max_size=4),
    data=st.data(),
)
def test_large_trees_across_the_level_2_boundary(
    first: int, batches: list[int], data: st.DataObject
) -> None:
    store = Store()
    store.append(first)
    for count in batches:
        store.append(min(count, MAX_LEAVES - store.size))
    if store.size < 65_537:
        store.append(65_537 - store.size)
    assert Tiles(store.read).root(store.size) == mth(0, store.size)
    _check_tiles_are_the_spec(store)
    tiles = Tiles(store.read)
    for height in range(store.size.bit_length()):
        last = (store.size >> height) - 1
        assert tiles.subtree(height, last) == mth(last << height, (last + 1) << height)
    _check_proofs(store, data, rounds=2)


def test_every_proof_of_small_trees(big: Store) -> None:
    """Exhaustively, every leaf and every pair of sizes up to 80 (all shapes of a tree's
    right border below a tile), from tiles holding 70,000 leaves."""
    tiles = Tiles(big.read)
    for size in range(1, 81):
        root = tiles.root(size)
        assert root == mth(0, size)
        for index in range(size):
            proof = tiles.inclusion_proof(index, size)
            assert proof == naive_path(index, 0, size)
            verify_inclusion(index, size, LEAVES[index], proof, root)
        for size1 in range(1, size + 1):
            proof = tiles.consistency_proof(size1, size)
            assert proof == naive_subproof(size1, 0, size, True)
            assert len(proof) == consistency_proof_size(size1, size)
            verify_consistency(size1, size, proof, mth(0, size1), root)


def test_batches_do_not_change_the_tiles() -> None:
    one, many = Store(), Store()
    one.append(66_000)
    for count in (1, 254, 1, 256, 65_000, 24, 464):
        many.append(count)
    assert many.size == one.size
    assert many.tiles == one.tiles


def test_a_full_tile_reaches_the_level_above_and_only_then() -> None:
    store = Store()
    writes = store.append(255)
    assert set(writes) == {(0, 0)}
    writes = store.append(1)
    assert set(writes) == {(0, 0), (1, 0)}
    assert writes[(1, 0)] == mth(0, 256)
    writes = store.append(1)
    assert set(writes) == {(0, 1)}


# --- costs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big() -> Store:
    store = Store()
    store.append(MAX_LEAVES)
    return store


@pytest.mark.parametrize("size", [1, 255, 256, 257, 65_535, 65_536, 65_537, 69_999, 70_000])
def test_costs_are_logarithmic(big: Store, size: int) -> None:
    """One tile per level for a root, two for a proof; at most a tile's worth of hashes per
    level (3 levels at 70,000): never anything proportional to the size."""
    levels = 3
    tiles = Tiles(big.read)
    assert tiles.root(size) == mth(0, size)
    assert tiles.reads <= levels
    assert tiles.hashes <= levels * 255 + 24
    for index in {0, size // 2, size - 1}:
        tiles = Tiles(big.read)
        assert tiles.inclusion_proof(index, size) == naive_path(index, 0, size)
        assert tiles.reads <= 2 * levels
        assert tiles.hashes <= 2 * levels * 255 + 24
    for size1 in {1, size // 3 or 1, size - 1 or 1}:
        tiles = Tiles(big.read)
        assert tiles.consistency_proof(size1, size) == naive_subproof(size1, 0, size, True)
        assert tiles.reads <= 2 * levels + 1
        assert tiles.hashes <= 3 * levels * 255 + 24


def test_appending_reads_one_tile_per_level(big: Store) -> None:
    store = Store()
    store.append(MAX_LEAVES - 1_000)
    store.reads = 0
    store.append(1_000)
    assert store.reads <= 3
    assert store.tiles == big.tiles


# --- errors ---------------------------------------------------------------------------------


def test_a_store_out_of_step_with_its_size_is_refused(big: Store) -> None:
    with pytest.raises(TileError, match="tile 0/273"):
        append(70_001, [LEAVES[0]], big.read)  # the partial tile holds 112, not 113
    with pytest.raises(TileError, match="larger than the stored"):
        Tiles(big.read).root(70_001)
    with pytest.raises(TileError, match="whole number"):
        Tiles(lambda level, index: b"x" * 33).root(1)


def test_generators_refuse_impossible_requests(big: Store) -> None:
    tiles = Tiles(big.read)
    for call in (
        lambda: tiles.inclusion_proof(5, 5),
        lambda: tiles.inclusion_proof(0, 0),
        lambda: tiles.consistency_proof(0, 5),
        lambda: tiles.consistency_proof(6, 5),
        lambda: tiles.root(-1),
        lambda: append(0, [b"short"], big.read),
    ):
        with pytest.raises(ValueError):
            call()
    assert tiles.root(0) == EMPTY_ROOT
    assert tiles.consistency_proof(7, 7) == []


def test_verifiers_say_what_is_wrong() -> None:
    leaf = LEAVES[0]
    with pytest.raises(ProofError, match="not in a tree of size 1"):
        verify_inclusion(1, 1, leaf, [], leaf)
    with pytest.raises(ProofError, match="has 1 hashes; leaf 0 of 1 needs 0"):
        verify_inclusion(0, 1, leaf, [leaf], leaf)
    with pytest.raises(ProofError, match="leaf hash is 3 bytes"):
        verify_inclusion(0, 1, b"abc", [], b"abc")
    with pytest.raises(ProofError, match="does not lead to the root"):
        verify_inclusion(0, 1, leaf, [], LEAVES[1])
    with pytest.raises(ProofError, match="never shrinks"):
        verify_consistency(2, 1, [], leaf, leaf)
    with pytest.raises(ProofError, match="empty tree"):
        verify_consistency(0, 0, [], EMPTY_ROOT, EMPTY_ROOT)
    with pytest.raises(ProofError, match="has 1 hashes; 3 to 5 needs 4"):
        verify_consistency(3, 5, [leaf], mth(0, 3), mth(0, 5))
    for error in (ProofError, TileError):
        assert issubclass(error, ValueError)


def test_leaf_and_node_hashes_are_rfc_9162() -> None:
    # SHA-256("") and the first RFC 6962 test leaf (empty input: SHA-256(0x00))
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert leaf_hash(b"").hex() == (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    )
    assert node_hash(LEAVES[0], LEAVES[1]) == mth(0, 2)


# --- tlog-tiles paths and tile sets ---------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "path"),
    [
        ((0, 1234067), "tile/0/x001/x234/067"),
        ((0, 0), "tile/0/000"),
        ((1, 5, 17), "tile/1/005.p/17"),
        ((2, 999), "tile/2/999"),
        ((2, 1000), "tile/2/x001/000"),
        ((0, 1_000_000, 255), "tile/0/x001/x000/000.p/255"),
        ((63, 1, 1), "tile/63/001.p/1"),
    ],
)
def test_tile_path(args: tuple[int, ...], path: str) -> None:
    assert tile_path(*args) == path


def test_entries_path_and_bad_coordinates() -> None:
    assert entries_path(1234067) == "tile/entries/x001/x234/067"
    assert entries_path(273, 112) == "tile/entries/273.p/112"
    assert TileRef(1, 1, 17).path == "tile/1/001.p/17"
    for bad in ((64, 0), (-1, 0), (0, -1), (0, 0, 0), (0, 0, 257)):
        with pytest.raises(ValueError):
            tile_path(*bad)


def test_tiles_for_size_spec_examples() -> None:
    # "a tree of size 70,000 will be represented by 273 full level 0 tiles, one partial level
    # 0 tile of width 112, one full level 1 tile, one partial level 1 tile of width 17, and one
    # partial level 2 tile of width 1"
    refs = list(tiles_for_size(70_000))
    assert refs[:273] == [TileRef(0, i, 256) for i in range(273)]
    assert refs[273:] == [
        TileRef(0, 273, 112),
        TileRef(1, 0, 256),
        TileRef(1, 1, 17),
        TileRef(2, 0, 1),
    ]
    # "a tree of size 256 will be represented by a full level 0 tile and a partial level 1
    # tile of width 1"
    assert list(tiles_for_size(256)) == [TileRef(0, 0, 256), TileRef(1, 0, 1)]
    assert list(tiles_for_size(0)) == []


def _spans() -> Iterator[tuple[int, int]]:
    yield from [(0, 1), (1, 2), (255, 256), (256, 257), (300, 70_000), (65_535, 65_536)]
    yield from [(70_000, 70_000), (0, 70_000), (69_888, 70_000)]


@pytest.mark.parametrize(("since", "size"), list(_spans()))
def test_tiles_since_are_the_new_ones(since: int, size: int) -> None:
    new = list(tiles_for_size(size, since))
    assert set(new) == set(tiles_for_size(size)) - set(tiles_for_size(since))


def test_entry_bundle() -> None:
    assert entry_bundle([b"", b"ab", b"\x00" * 300]) == (
        b"\x00\x00" + b"\x00\x02ab" + b"\x01\x2c" + b"\x00" * 300
    )
    assert entry_bundle([b"x" * MAX_ENTRY_SIZE])[:2] == b"\xff\xff"
    with pytest.raises(ValueError, match="entry 1 of the bundle is 65536 bytes"):
        entry_bundle([b"", b"x" * (MAX_ENTRY_SIZE + 1)])


_hashes = st.binary(min_size=0, max_size=40) | st.binary(min_size=32, max_size=32)


@settings(max_examples=200, deadline=None)
@given(
    a=st.integers(-2, 2**64),
    b=st.integers(-2, 2**64),
    proof=st.lists(_hashes, max_size=70),
    x=_hashes,
    y=_hashes,
)
def test_verifiers_fail_only_with_proof_error(
    a: int, b: int, proof: list[bytes], x: bytes, y: bytes
) -> None:
    """Whatever a peer sends, a verifier answers None or ProofError, never another error."""
    with contextlib.suppress(ProofError):
        verify_inclusion(a, b, x, proof, y)
    with contextlib.suppress(ProofError):
        verify_consistency(a, b, proof, x, y)


def _naive_range_root(leaves: list[bytes]) -> bytes:
    if not leaves:
        return merkle.EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return merkle.node_hash(_naive_range_root(leaves[:k]), _naive_range_root(leaves[k:]))


@given(st.integers(0, 600), st.data())
@settings(max_examples=60, deadline=None)
def test_a_compact_range_folds_any_stretch_with_its_aligned_neighbours_into_the_root(
    n: int, data: st.DataObject
) -> None:
    """What an export carries: the subtrees left of its leaves, the leaves, the subtrees right
    of them; folded in order they give the tree's root, and the subtrees are aligned."""
    leaves = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(n)]
    begin = data.draw(st.integers(0, n))
    end = data.draw(st.integers(begin, n))

    def subtree(height: int, index: int) -> bytes:
        return _naive_range_root(leaves[index << height : (index + 1) << height])

    folded = merkle.CompactRange()
    for height, index in merkle.aligned(0, begin):
        folded.append(subtree(height, index), height)
    for leaf in leaves[begin:end]:
        folded.append(leaf)
    for height, index in merkle.aligned(end, n):
        assert (index << height) % (1 << height) == 0
        folded.append(subtree(height, index), height)
    assert folded.size == n
    assert folded.root() == _naive_range_root(leaves)


def test_a_compact_range_refuses_a_misaligned_subtree() -> None:
    folded = merkle.CompactRange()
    folded.append(merkle.leaf_hash(b"a"))
    with pytest.raises(ProofError):
        folded.append(merkle.leaf_hash(b"b"), 1)  # a pair cannot start at leaf 1
