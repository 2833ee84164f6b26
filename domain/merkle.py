"""The ledger as a transparency log: RFC 9162 Merkle tree math over C2SP tlog-tiles storage.

Every stored event is a leaf: `leaf_hash` of the event's stored record bytes, RFC 9162 section
2.1.1 (`SHA-256(0x00 || data)`; inner nodes `SHA-256(0x01 || left || right)`), and leaf index
i is the event at log position i + 1 (positions count from 1, leaves from 0). This module is
pure: it never opens a file or a database. Storage hands it a `read(level, index)` callable and
stores the `dict` of tile contents that `append` returns; everything else (roots, subtree
hashes, inclusion and consistency proofs, the static export's file list) is computed here.

Why tiles are the stored form, rather than every node of the tree or a compact range: the
C2SP tlog-tiles format (https://c2sp.org/tlog-tiles) is what witnesses and monitors fetch, so
storing exactly its tiles makes the export a copy (a partial tile is a prefix of the stored
one), and a tile of 256 hashes keeps the number of stored records per leaf at 1/256 while a
proof still needs only one tile per level (O(log n) reads). The price is that a node strictly
between two tile levels is not stored: it is recomputed from the tile below, at most 127
hashes for one node and at most 255 for one tile's worth of them.

Tile (level L, index N) holds, in order, the hashes of the complete subtrees of height 8L
whose positions are 256N .. 256N + 255, that is `MTH(D[(256N + i) * 256**L : (256N + i + 1) *
256**L])`. Level 0 holds the leaf hashes; a hash enters level L + 1 only when the level-L tile
below it is full (the spec forbids hashing a partial tile into the level above). A tree of
size s therefore stores `s // 256**L` hashes at level L: that count is how every function
here knows what exists, and nothing else about the tree is stored.

Its errors (`ProofError`, `TileError`) live in domain/errors.py with every other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from imageledger.domain.errors import ProofError, TileError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MAX_ENTRY_SIZE",
    "TILE_HEIGHT",
    "TILE_WIDTH",
    "CompactRange",
    "ProofError",
    "TileError",
    "TileRead",
    "TileRef",
    "Tiles",
    "aligned",
    "append",
    "consistency_proof_size",
    "entries_path",
    "entry_bundle",
    "inclusion_proof_size",
    "leaf_hash",
    "node_hash",
    "tile_path",
    "tiles_for_size",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
"""Bytes of one hash (SHA-256): a stored tile is a multiple of it."""

TILE_HEIGHT = 8
"""tlog-tiles fixes the tile height at 8; it is a constant, not a parameter, so that what is
stored is always what the spec serves."""

TILE_WIDTH = 1 << TILE_HEIGHT
"""Hashes in a full tile (256, 8,192 bytes)."""

_FULL_TILE_BYTES = TILE_WIDTH * HASH_SIZE
_MAX_LEVEL = 63  # tlog-tiles: `<L>` is between 0 and 63

EMPTY_ROOT = hashlib.sha256(b"").digest()
"""MTH({}) of RFC 9162 2.1.1: the root of the empty tree (a checkpoint of size 0 carries it)."""

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"


TileRead = Callable[[int, int], bytes]
"""`read(level, index)`: the stored bytes of that tile (concatenated 32-byte hashes, possibly
fewer than 256 of them), or b"" when the tile is not stored."""


@dataclass(frozen=True, order=True, slots=True)
class TileRef:
    """One tile as the tlog-tiles export names it: `width` is 256 for a full tile, less for
    the partial one (which is the first `width` hashes of the stored tile)."""

    level: int
    index: int
    width: int

    @property
    def path(self) -> str:
        return tile_path(self.level, self.index, self.width)


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 leaf hash; the 0x00 prefix keeps a leaf from ever passing for an inner node."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 inner node hash (0x01 prefix)."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


# --- paths and the tiles of a tree -----------------------------------------------------------


def _index_path(index: int) -> str:
    """`<N>` of tlog-tiles: three-digit groups, all but the last prefixed with "x", so that a
    directory and a file never share a name when the tiles are served from a file system."""
    if index < 0:
        raise ValueError(f"tile index {index} is negative")
    groups = [f"{index % 1000:03d}"]
    index //= 1000
    while index:
        groups.append(f"x{index % 1000:03d}")
        index //= 1000
    return "/".join(reversed(groups))


def _width_suffix(width: int) -> str:
    if not 1 <= width <= TILE_WIDTH:
        raise ValueError(f"tile width {width} is not between 1 and {TILE_WIDTH}")
    return "" if width == TILE_WIDTH else f".p/{width}"


def tile_path(level: int, index: int, width: int = TILE_WIDTH) -> str:
    """The tlog-tiles path of a hash tile, relative to the log's prefix: `tile/<L>/<N>[.p/<W>]`."""
    if not 0 <= level <= _MAX_LEVEL:
        raise ValueError(f"tile level {level} is not between 0 and {_MAX_LEVEL}")
    return f"tile/{level}/{_index_path(index)}{_width_suffix(width)}"


def entries_path(index: int, width: int = TILE_WIDTH) -> str:
    """The tlog-tiles path of an entry bundle (the leaves of level-0 tile `index`)."""
    return f"tile/entries/{_index_path(index)}{_width_suffix(width)}"


MAX_ENTRY_SIZE = 0xFFFF
"""The largest leaf an entry bundle can carry: tlog-tiles prefixes each entry with a
big-endian uint16 length. A record above it can be logged and proven, but not exported."""


def entry_bundle(entries: Iterable[bytes]) -> bytes:
    """An entry bundle of tlog-tiles: each entry (the bytes whose `leaf_hash` is the leaf)
    prefixed with its length as a big-endian uint16. A partial bundle is built from fewer
    entries, like a partial tile; an entry too long for the prefix is a ValueError, never a
    truncated length that a client would misparse."""
    out = bytearray()
    for number, entry in enumerate(entries):
        if len(entry) > MAX_ENTRY_SIZE:
            raise ValueError(
                f"entry {number} of the bundle is {len(entry)} bytes; a bundle holds at most "
                f"{MAX_ENTRY_SIZE}"
            )
        out += len(entry).to_bytes(2, "big")
        out += entry
    return bytes(out)


def _level_tiles(count: int, since: int) -> Iterator[tuple[int, int]]:
    """(index, width) of the tiles of one level holding `count` hashes, less those that a
    level holding `since` hashes already had (full tiles never change; a partial tile of
    another width is another file)."""
    full, rest = divmod(count, TILE_WIDTH)
    old_full, old_rest = divmod(since, TILE_WIDTH)
    for index in range(min(old_full, full), full):
        yield index, TILE_WIDTH
    if rest and (full, rest) != (old_full, old_rest):
        yield full, rest


def tiles_for_size(size: int, since: int = 0) -> Iterator[TileRef]:
    """The hash tiles that a tree of `size` leaves serves, level by level, full tiles first;
    with `since`, only those a tree of size `since` did not serve (an incremental export).

    Per level L the tree holds `size // 256**L` hashes: that many // 256 full tiles and, if
    the remainder is not 0, one partial tile of that width. No empty tile is listed (the spec
    forbids serving one), so the empty tree has no tiles. A generator because the list of a
    large log is long (n / 256 level-0 tiles) and an export only walks it.
    """
    if size < 0 or since < 0:
        raise ValueError(f"tree sizes {since} and {size} must not be negative")
    if since > size:
        raise ValueError(f"size {since} is beyond size {size}: a log never shrinks")
    level = 0
    while size >> (TILE_HEIGHT * level):
        count = size >> (TILE_HEIGHT * level)
        old = since >> (TILE_HEIGHT * level)
        for index, width in _level_tiles(count, old):
            yield TileRef(level, index, width)
        level += 1


# --- reading the tree from tiles ------------------------------------------------------------


def _split(data: bytes, start: int, count: int) -> list[bytes]:
    return [data[i * HASH_SIZE : (i + 1) * HASH_SIZE] for i in range(start, start + count)]


class Tiles:
    """The tree as stored tiles, read through `read(level, index)`.

    Meant to live for one read transaction: the tiles read are cached, so the root and the
    proofs of one request share their reads. Tiles only ever grow (a log is append-only and a
    complete subtree's hash never changes), so a cached tile is never wrong, only possibly
    short: a request that needs more hashes than the cached copy holds reads the tile again.
    `reads` and `hashes` count the calls to `read` and the hashes computed, for the cost
    checks: O(log n) reads and O(log n) tiles' worth of hashes, never O(n). Measured at
    1,000,000 leaves (3 tile levels): a root reads 3 tiles and hashes at most ~500 times; a
    proof reads at most 5 tiles and hashes at most ~1,000 times (2 x 255 per tile level at
    worst: a leaf's siblings inside a tile cost 1 + 3 + ... + 127 = 247, the right border's
    span as much again), about 0.5 ms in CPython.
    """

    def __init__(self, read: TileRead) -> None:
        self._read = read
        self._cache: dict[tuple[int, int], bytes] = {}
        self.reads = 0
        self.hashes = 0

    def _tile(self, level: int, index: int, need: int) -> bytes:
        """Tile (level, index) holding at least `need` hashes."""
        data = self._cache.get((level, index))
        if data is None or len(data) < need * HASH_SIZE:
            data = self._read(level, index)
            self.reads += 1
            if len(data) % HASH_SIZE or len(data) > _FULL_TILE_BYTES:
                raise TileError(
                    f"tile {level}/{index} is {len(data)} bytes, not a whole number of "
                    f"{HASH_SIZE}-byte hashes up to {TILE_WIDTH}"
                )
            if len(data) < need * HASH_SIZE:
                raise TileError(
                    f"tile {level}/{index} holds {len(data) // HASH_SIZE} hashes, {need} needed:"
                    " the tree asked for is larger than the stored one"
                )
            self._cache[(level, index)] = data
        return data

    def _reduce(self, hashes: list[bytes]) -> bytes:
        """The root of a perfect subtree given its 2**r bottom hashes."""
        while len(hashes) > 1:
            self.hashes += len(hashes) // 2
            hashes = [node_hash(hashes[i], hashes[i + 1]) for i in range(0, len(hashes), 2)]
        return hashes[0]

    def subtree(self, height: int, index: int) -> bytes:
        """The hash of the complete subtree of `height` whose leaves are
        index * 2**height .. (index + 1) * 2**height - 1 (height 0: a leaf hash).

        It is stored only when `height` is a multiple of 8; otherwise it is hashed up from the
        2**(height % 8) hashes of the tile level below, which always lie in one tile because
        they are aligned to their own (smaller than 256) count.
        """
        if height < 0 or index < 0:
            raise ValueError(f"subtree ({height}, {index}): height and index must not be negative")
        level, rest = divmod(height, TILE_HEIGHT)
        tile, offset = divmod(index << rest, TILE_WIDTH)
        count = 1 << rest
        data = self._tile(level, tile, offset + count)
        return self._reduce(_split(data, offset, count))

    def _span(self, lo: int, hi: int) -> bytes:
        """MTH(D[lo:hi]) for a node of the RFC 9162 tree (lo aligned to the largest power of
        two below hi - lo, as every node of a tree rooted at 0 is): its perfect subtrees from
        the largest, folded from the right, which is what the recursive definition unrolls to.
        """
        n = hi - lo
        pieces: list[bytes] = []
        for height in range(n.bit_length() - 1, -1, -1):
            if n >> height & 1:
                if lo % (1 << height):
                    raise ValueError(f"range {lo}..{hi} is not a node of the tree")
                pieces.append(self.subtree(height, lo >> height))
                lo += 1 << height
        result = pieces.pop()
        while pieces:
            result = node_hash(pieces.pop(), result)
            self.hashes += 1
        return result

    def root(self, size: int) -> bytes:
        """MTH of the first `size` leaves (RFC 9162 2.1.1); EMPTY_ROOT for 0.

        At most one tile per level is read (the perfect subtrees of a size's binary
        decomposition that fall between two tile levels all lie in that level's rightmost
        tile), and at most 255 hashes per level are computed.
        """
        if size < 0:
            raise ValueError(f"tree size {size} is negative")
        if size == 0:
            return EMPTY_ROOT
        return self._span(0, size)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """PATH(index, D[0:size]) of RFC 9162 2.1.3.1, leaf side first (the order
        `verify_inclusion` consumes).

        The recursion walks down from the root: each step keeps the half that holds the leaf
        and records the other half's hash. A left half is always a perfect subtree; a right
        half can be a partial span only before the first step to the left (below it
        everything is perfect), so a proof costs one span and O(log n) subtrees.
        """
        if not 0 <= index < size:
            raise ValueError(f"leaf {index} is not in a tree of size {size}")
        path: list[bytes] = []
        lo, hi = 0, size
        while hi - lo > 1:
            k = 1 << ((hi - lo - 1).bit_length() - 1)  # the largest power of 2 below hi - lo
            if index < lo + k:
                path.append(self._span(lo + k, hi))
                hi = lo + k
            else:
                path.append(self.subtree(k.bit_length() - 1, lo // k))
                lo += k
        path.reverse()
        return path

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        """PROOF(size1, D[0:size2]) of RFC 9162 2.1.4.1 (SUBPROOF unrolled), in its order.

        Defined for 0 < size1 <= size2 (empty when equal): a proof from the empty tree proves
        nothing and RFC 9162 gives none, so asking for one is an error rather than [].
        """
        if not 0 < size1 <= size2:
            raise ValueError(f"no consistency proof from size {size1} to size {size2}")
        path: list[bytes] = []
        lo, hi, m, whole = 0, size2, size1, True
        while True:
            if m == hi - lo:
                if not whole:
                    path.append(self._span(lo, hi))
                break
            k = 1 << ((hi - lo - 1).bit_length() - 1)
            if m <= k:
                path.append(self._span(lo + k, hi))
                hi = lo + k
            else:
                path.append(self.subtree(k.bit_length() - 1, lo // k))
                lo += k
                m -= k
                whole = False
        path.reverse()
        return path


# --- appending ------------------------------------------------------------------------------


def _tile_root(data: bytes) -> bytes:
    hashes = _split(data, 0, TILE_WIDTH)
    while len(hashes) > 1:
        hashes = [node_hash(hashes[i], hashes[i + 1]) for i in range(0, len(hashes), 2)]
    return hashes[0]


def append(size: int, leaf_hashes: Iterable[bytes], read: TileRead) -> dict[tuple[int, int], bytes]:
    """The tile writes that appending `leaf_hashes` to a tree of `size` leaves needs: the new
    full contents of every tile that changes, keyed (level, index).

    Only the rightmost tile of each level is read (the one the new hashes continue), and it
    must hold exactly the hashes `size` says (else TileError: a store out of step with its
    size must not be extended). A tile that becomes full adds its root, a height-8 subtree, to
    the level above: 255 hashes per 256 leaves at level 0 and 1/256 of that per level up, so
    about one hash per leaf amortized and O(log n) tiles' worth at worst. Each written value
    extends what was stored (a prefix is never rewritten), so writing the dict in any order
    inside the caller's transaction is safe.
    """
    if size < 0:
        raise ValueError(f"tree size {size} is negative")
    new = list(leaf_hashes)
    for value in new:
        if len(value) != HASH_SIZE:
            raise ValueError(f"a leaf hash is {len(value)} bytes, not {HASH_SIZE}")
    writes: dict[tuple[int, int], bytes] = {}
    level = 0
    while new:
        stored = size >> (TILE_HEIGHT * level)  # hashes at this level before the append
        tile, offset = divmod(stored, TILE_WIDTH)
        data = read(level, tile) if offset else b""
        if len(data) != offset * HASH_SIZE:
            raise TileError(
                f"tile {level}/{tile} is {len(data)} bytes; a tree of size {size} has "
                f"{offset} hashes ({offset * HASH_SIZE} bytes) there"
            )
        above: list[bytes] = []
        start = 0
        while start < len(new):
            take = min(TILE_WIDTH - offset, len(new) - start)
            data += b"".join(new[start : start + take])
            writes[(level, tile)] = data
            if len(data) == _FULL_TILE_BYTES:
                above.append(_tile_root(data))
            start += take
            tile, offset, data = tile + 1, 0, b""
        new = above
        level += 1
    return writes


# --- compact ranges: a stretch of leaves with the subtrees around it ---------------------------


def aligned(begin: int, end: int) -> list[tuple[int, int]]:
    """The leaves begin .. end - 1 as the fewest complete subtrees aligned to their own size,
    left to right, each as (height, index): what an export carries for the leaves it does not
    list, so that a verifier can fold the rest into the root."""
    if not 0 <= begin <= end:
        raise ValueError(f"no leaves {begin} .. {end}")
    found = []
    while begin < end:
        height = (begin & -begin).bit_length() - 1 if begin else (end - begin).bit_length() - 1
        while begin + (1 << height) > end:
            height -= 1
        found.append((height, begin >> height))
        begin += 1 << height
    return found


class CompactRange:
    """A tree's leaves from 0, held as the hashes of its complete aligned subtrees (at most
    one per height): what a streaming verifier needs to fold a million leaves into a root in
    O(log n) memory. `append` takes a subtree aligned at the current end (a leaf: height 0)."""

    def __init__(self) -> None:
        self.size = 0
        self._stack: list[tuple[int, bytes]] = []  # (height, hash), heights decreasing

    def append(self, value: bytes, height: int = 0) -> None:
        if self.size % (1 << height):
            raise ProofError(f"a subtree of height {height} cannot start at leaf {self.size}")
        if self._stack and self._stack[-1][0] < height:
            raise ProofError(f"a subtree of height {height} follows a smaller one")
        _check_hash("a subtree hash", value)
        self.size += 1 << height
        self._stack.append((height, value))
        while len(self._stack) >= 2 and self._stack[-2][0] == self._stack[-1][0]:
            (level, left), (_, right) = self._stack[-2], self._stack[-1]
            self._stack[-2:] = [(level + 1, node_hash(left, right))]

    def root(self) -> bytes:
        """MTH of the leaves appended (RFC 9162: the subtrees folded from the right)."""
        if not self._stack:
            return EMPTY_ROOT
        value = self._stack[-1][1]
        for _height, left in reversed(self._stack[:-1]):
            value = node_hash(left, value)
        return value


# --- verification (RFC 9162 2.1.3.2 and 2.1.4.2) --------------------------------------------


def _check_hash(what: str, value: bytes) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{what} is {len(value)} bytes, not {HASH_SIZE}")


def inclusion_proof_size(index: int, size: int) -> int:
    """Hashes in the inclusion proof of leaf `index` in a tree of `size`: one per level below
    the node where the paths to `index` and to the last leaf part (those siblings exist on
    both sides), then one left sibling per 1 bit of the index above it (the right border
    has no right siblings)."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of size {size}")
    inner = (index ^ (size - 1)).bit_length()
    return inner + (index >> inner).bit_count()


def consistency_proof_size(size1: int, size2: int) -> int:
    """Hashes in the consistency proof from `size1` to `size2` (0 < size1 <= size2), counted
    by the index walk of RFC 9162 2.1.4.2 itself: one hash per step until sn reaches 0, plus
    the seed, which the verifier supplies (first_hash) when size1 is a power of two."""
    if not 0 < size1 <= size2:
        raise ValueError(f"no consistency proof from size {size1} to size {size2}")
    if size1 == size2:
        return 0
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    steps = 0
    while sn:
        if fn & 1 or fn == sn:
            while not (fn & 1 or fn == 0):
                fn, sn = fn >> 1, sn >> 1
        fn, sn = fn >> 1, sn >> 1
        steps += 1
    seed = 0 if size1 & (size1 - 1) == 0 else 1
    return seed + steps


def verify_inclusion(
    leaf_index: int, tree_size: int, leaf_hash: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """Raise ProofError unless `proof` shows `leaf_hash` at `leaf_index` in the tree of
    `tree_size` whose root is `root` (RFC 9162 2.1.3.2, step by step).

    The proof's length is checked first against the one the sizes call for, only to say
    plainly what is wrong: the RFC's walk would fail such a proof anyway. The leaf hash must
    be 32 bytes: with an empty proof the walk compares it to the root directly, and a short
    "hash" equal to a short root would otherwise pass. The tree size is not bound by the
    proof (a proof for one size can verify for another of the same shape): it is the root,
    taken from a checkpoint signed with its size, that binds it.
    """
    if leaf_index < 0 or tree_size < 0:
        raise ProofError(f"leaf {leaf_index} and tree size {tree_size} must not be negative")
    # 1. leaf_index >= tree_size fails.
    if leaf_index >= tree_size:
        raise ProofError(f"leaf {leaf_index} is not in a tree of size {tree_size}")
    _check_hash("the leaf hash", leaf_hash)
    _check_hash("the root", root)
    for position, value in enumerate(proof):
        _check_hash(f"proof hash {position}", value)
    want = inclusion_proof_size(leaf_index, tree_size)
    if len(proof) != want:
        raise ProofError(
            f"the proof has {len(proof)} hashes; leaf {leaf_index} of {tree_size} needs {want}"
        )
    # 2., 3.
    fn, sn, r = leaf_index, tree_size - 1, leaf_hash
    # 4.
    for p in proof:
        if sn == 0:  # a.
            raise ProofError("the proof goes on past the root")
        if fn & 1 or fn == sn:  # b.
            r = node_hash(p, r)
            while not (fn & 1 or fn == 0):
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1  # c.
    # 5.
    if sn != 0:
        raise ProofError("the proof stops short of the root")
    if r != root:
        raise ProofError(f"the proof of leaf {leaf_index} does not lead to the root of {tree_size}")


def verify_consistency(
    size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes
) -> None:
    """Raise ProofError unless `proof` shows that the tree of `size2` with `root2` extends the
    tree of `size1` with `root1` (RFC 9162 2.1.4.2, step by step).

    Around the RFC's algorithm (which assumes 0 < size1 < size2), the cases the
    transparency-dev vectors pin: size1 > size2 fails; size1 == 0 fails, even to size 0 (the
    empty tree is a prefix of every tree, so such a proof says nothing, and RFC 9162 defines
    none); equal sizes need an empty proof and equal roots, compared as given (the vectors
    accept equal roots that are not 32 bytes long: no hashing is involved).
    """
    if size1 < 0 or size2 < 0:
        raise ProofError(f"tree sizes {size1} and {size2} must not be negative")
    if size1 > size2:
        raise ProofError(f"size {size1} is beyond size {size2}: a log never shrinks")
    if size1 == 0:
        raise ProofError("a consistency proof from the empty tree proves nothing")
    if size1 == size2:
        if proof:
            raise ProofError(f"equal sizes need an empty proof, not {len(proof)} hashes")
        if root1 != root2:
            raise ProofError(f"two different roots for the same size {size1}")
        return
    _check_hash("the first root", root1)
    _check_hash("the second root", root2)
    for position, value in enumerate(proof):
        _check_hash(f"proof hash {position}", value)
    want = consistency_proof_size(size1, size2)
    if len(proof) != want:
        raise ProofError(f"the proof has {len(proof)} hashes; {size1} to {size2} needs {want}")
    # 1.
    if not proof:
        raise ProofError("the proof is empty")
    # 2.
    path = list(proof)
    if size1 & (size1 - 1) == 0:
        path.insert(0, root1)
    # 3.
    fn, sn = size1 - 1, size2 - 1
    # 4.
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    # 5.
    fr = sr = path[0]
    # 6.
    for c in path[1:]:
        if sn == 0:  # a.
            raise ProofError("the proof goes on past the second root")
        if fn & 1 or fn == sn:  # b.
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not (fn & 1 or fn == 0):
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1  # c.
    # 7.
    if sn != 0:
        raise ProofError("the proof stops short of the second root")
    if fr != root1:
        raise ProofError(f"the proof does not lead to the root of size {size1}")
    if sr != root2:
        raise ProofError(f"the proof does not lead to the root of size {size2}")
