"""The ledger as a transparency log: its Merkle tree's tiles and its signed checkpoints, in the
ledger's own LMDB environment.

Every stored event is a leaf: the hash of its log record exactly as the log keeps it
(docs/FORMAT.md; never a re-encoding), position p being leaf p - 1. The tree is stored as the
C2SP tlog-tiles hash tiles (`domain.merkle`), folded in the same write transaction as the
events it covers (`TreeStore.attach`), so that no committed event is ever outside it; an
append costs about one hash per leaf and rewrites the rightmost tile of each level it reaches.

Databases (beside the log, namespaced like it):

- ``imageledger.tiles``: level (1 byte) + tile index (8 bytes, big-endian) + chunk (1 byte) -> 16
  of the tile's hashes (`_CHUNK`);
- ``imageledger.audit``: ``origin`` -> the log's origin (UTF-8), fixed the first time the log
  is signed (the tree's size is read off its tiles: `TreeStore.size`);
- ``imageledger.checkpoints``: tree size (8 bytes, big-endian) -> the signed checkpoint note
  (UTF-8), every one ever signed, so that any two can be proven consistent later.

The tiles are derived data (a replay of the log rebuilds them: `replay`); the origin and the
checkpoints are not: they are what was published, and nothing here rewrites them.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import lmdb

from imageledger.domain import merkle
from imageledger.domain.errors import LedgerCorruptError
from imageledger.domain.ports import TreeReplay
from imageledger.storage.lmdbenv import LedgerEnv

TILES_DB: Final = "imageledger.tiles"
AUDIT_DB: Final = "imageledger.audit"
CHECKPOINTS_DB: Final = "imageledger.checkpoints"
_U64: Final = struct.Struct(">Q")
_ORIGIN: Final = b"origin"

Records = Callable[[lmdb.Transaction, int], Iterator[tuple[int, bytes]]]
"""(position, stored record) of the log after a position, read in a transaction."""


def _tile_key(level: int, index: int) -> bytes:
    return bytes([level]) + _U64.pack(index)


_CHUNK: Final = 16 * merkle.HASH_SIZE
"""A tile is stored as chunks of 16 hashes (512 bytes, key: the tile's key + the chunk's
number): an append rewrites only the chunk its leaves extend, a small value inside an LMDB
page. Stored whole, the rightmost level-0 tile (up to 8 KiB, LMDB overflow pages) was copied
by every append: ~0.2 ms of a durable use + release (~1.5 ms)."""


def _put_tile(
    txn: lmdb.Transaction, db: Any, level: int, index: int, data: bytes, kept: int
) -> None:
    """Store tile (level, index) whose first `kept` bytes are stored already (a tile only
    grows): the chunks from the one holding byte `kept` on."""
    key = _tile_key(level, index)
    for start in range(kept // _CHUNK * _CHUNK, len(data), _CHUNK):
        txn.put(key + bytes([start // _CHUNK]), data[start : start + _CHUNK], db=db)


def _get_tile(txn: lmdb.Transaction, db: Any, level: int, index: int) -> bytes:
    key = _tile_key(level, index)
    cursor: Any = txn.cursor(db=db)
    if not cursor.set_range(key):
        return b""
    parts: list[bytes] = []
    for found, value in cursor:
        if found[:9] != key:
            break
        if len(found) != 10 or found[9] != len(parts):
            msg = f"the audit tile {level}/{index} is stored out of order"
            raise LedgerCorruptError(msg)
        parts.append(bytes(value))
    return b"".join(parts)


def new_origin() -> str:
    """A log's origin: unique (128 random bits) and stable (stored once). The tlog-checkpoint
    spec asks for a schema-less URL-like name without spaces or '+'."""
    return f"imageledger.invalid/{secrets.token_hex(16)}"


class _Digest:
    """SHA-256 over tiles given level by level in index order, one running hash per level,
    so a replay that completes tiles of several levels at once digests them in key order."""

    def __init__(self) -> None:
        self.levels: dict[int, Any] = {}

    def add(self, level: int, index: int, data: bytes) -> None:
        hasher = self.levels.get(level)
        if hasher is None:
            hasher = self.levels[level] = hashlib.sha256()
        hasher.update(_tile_key(level, index) + _U64.pack(len(data)) + data)

    def hexdigest(self) -> str:
        total = hashlib.sha256()
        for level in sorted(self.levels):
            total.update(self.levels[level].digest())
        return total.hexdigest()


class TreeStore:
    """The tree's tiles, the log's origin and its checkpoints (see the module docstring)."""

    def __init__(self, env: LedgerEnv) -> None:
        """The tree of the ledger `env`. A ledger opened read-only that never had one (made
        before the audit log existed, and not written since) reads as an empty tree."""
        self.env = env
        names = [TILES_DB, AUDIT_DB, CHECKPOINTS_DB]
        if env.config.readonly and not env.exists(*names):
            names = []
        handles = env.dbs(names)
        self.present = bool(handles)
        found: list[Any] = handles if handles else [None, None, None]
        self._tiles, self._audit, self._checkpoints = found

    # ------------------------------------------------------------------ folding

    def fold(self, txn: lmdb.Transaction, records: Records) -> None:
        """Add to the tree, in the append's transaction `txn`, every log record it does not
        hold yet: the ones just appended, and on a ledger's first append since it was made by
        a version without the audit log (or by one that does not keep it) the whole history
        before them. A tree larger than the log is damage, reported, never extended."""
        size = self.size(txn)
        hashes: list[bytes] = []
        for position, record in records(txn, size):
            if position != size + len(hashes) + 1:
                msg = (
                    f"the log's entry {position} does not follow the audit tree's "
                    f"{size + len(hashes)} leaves (`imageledger rebuild` replays it)"
                )
                raise LedgerCorruptError(msg)
            hashes.append(merkle.leaf_hash(record))
        if not hashes:
            return
        writes = merkle.append(size, hashes, self._reader(txn))
        for (level, index), data in writes.items():
            stored = size >> (merkle.TILE_HEIGHT * level)  # hashes at this level before
            kept = stored - index * merkle.TILE_WIDTH
            kept = min(max(kept, 0), merkle.TILE_WIDTH) * merkle.HASH_SIZE
            _put_tile(txn, self._tiles, level, index, data, kept)

    def _reader(self, txn: lmdb.Transaction) -> merkle.TileRead:
        tiles = self._tiles

        def read(level: int, index: int) -> bytes:
            if tiles is None:
                return b""
            return _get_tile(txn, tiles, level, index)

        return read

    # ------------------------------------------------------------------ reading

    def size(self, txn: lmdb.Transaction) -> int:
        """The tree's size, read off its last level-0 chunk: nothing else is stored for it, so
        an append writes one chunk (and a chunk above at every 256th leaf), nothing more."""
        if not self.present:
            return 0
        cursor: Any = txn.cursor(db=self._tiles)
        found = cursor.prev() if cursor.set_range(b"\x01") else cursor.last()
        if not found:
            return 0
        key, value = cursor.item()
        if key[0] != 0:
            return 0
        if len(key) != 10 or len(value) % merkle.HASH_SIZE or len(value) > _CHUNK:
            msg = "the audit tree's last level-0 tile is not stored as tiles are"
            raise LedgerCorruptError(msg)
        index, chunk = _U64.unpack(key[1:9])[0], key[9]
        return int(index * merkle.TILE_WIDTH + chunk * 16 + len(value) // merkle.HASH_SIZE)

    def tile(self, txn: lmdb.Transaction, level: int, index: int) -> bytes:
        """The stored hashes of tile (level, index): b"" when there is none."""
        return self._reader(txn)(level, index)

    def tiles(self, txn: lmdb.Transaction) -> merkle.Tiles:
        """The stored tree, read in `txn` (roots and proofs)."""
        return merkle.Tiles(self._reader(txn))

    def stored_tiles(self, txn: lmdb.Transaction) -> Iterator[tuple[int, int, bytes]]:
        """(level, index, hashes) of every stored tile, level by level, in index order."""
        if not self.present:
            return
        cursor: Any = txn.cursor(db=self._tiles)
        current: tuple[int, int] | None = None
        parts: list[bytes] = []
        for key, value in cursor:
            if len(key) != 10:
                msg = f"an audit tile key is {len(key)} bytes, not 10"
                raise LedgerCorruptError(msg)
            tile = (key[0], _U64.unpack(key[1:9])[0])
            if tile != current:
                if current is not None:
                    yield current[0], current[1], b"".join(parts)
                current, parts = tile, []
            parts.append(bytes(value))
        if current is not None:
            yield current[0], current[1], b"".join(parts)

    def origin(self, txn: lmdb.Transaction) -> str | None:
        if not self.present:
            return None
        value = txn.get(_ORIGIN, db=self._audit)
        return None if value is None else bytes(value).decode("utf-8", "replace")

    def ensure_origin(self) -> str:
        """The log's origin, made and stored the first time it is asked for."""
        with self.env.read() as txn:
            found = self.origin(txn)
        if found is not None:
            return found
        made = new_origin().encode()

        def put(txn: lmdb.Transaction) -> None:
            txn.put(_ORIGIN, made, db=self._audit, overwrite=False)  # the first one stays

        self.env.write(put)
        with self.env.read() as txn:
            stored = self.origin(txn)
        assert stored is not None
        return stored

    def checkpoints(self, txn: lmdb.Transaction) -> Iterator[tuple[int, bytes]]:
        """(size, signed note) of every kept checkpoint, smallest size first."""
        if not self.present:
            return
        cursor: Any = txn.cursor(db=self._checkpoints)
        for key, value in cursor:
            if len(key) != 8:
                msg = f"a checkpoint key is {len(key)} bytes, not 8"
                raise LedgerCorruptError(msg)
            yield _U64.unpack(key)[0], bytes(value)

    def last_checkpoint(self, txn: lmdb.Transaction) -> tuple[int, bytes] | None:
        if not self.present:
            return None
        cursor: Any = txn.cursor(db=self._checkpoints)
        if not cursor.last():
            return None
        key, value = cursor.item()
        return _U64.unpack(key)[0], bytes(value)

    def keep_checkpoint(self, size: int, note: bytes, expect_last: int | None) -> bool:
        """Store the checkpoint signed at `size`, if the last one kept is still the one at
        `expect_last` (None: none) — another process may have signed meanwhile: then False,
        and the caller decides again."""
        stored = False

        def put(txn: lmdb.Transaction) -> None:
            nonlocal stored
            last = self.last_checkpoint(txn)
            if (last[0] if last is not None else None) != expect_last:
                return
            txn.put(_U64.pack(size), note, db=self._checkpoints)
            stored = True

        self.env.write(put)
        return stored

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        with self.env.read() as txn:
            yield txn

    # ------------------------------------------------------------------ replaying

    def replay(
        self,
        records: Records,
        *,
        at_sizes: Iterable[int] = (),
        repair: bool = False,
        progress: Callable[[int], None] | None = None,
        replayer: TreeReplayer | None = None,
    ) -> TreeReplay:
        """The tree recomputed from every record of the log and compared with the stored
        tiles (the first position that differs is named), in memory that does not grow with
        the log: a full tile is compared and dropped once complete, only the rightmost tile of
        each level is kept. The roots at `at_sizes` are recorded on the way (checkpoints are
        checked against them). With `replayer`, the records it was given already (a rebuild
        feeds it the records it reads for the views: `TreeReplayer.add`) are not read again:
        the replay goes on after them. With `repair`, stored tiles that differ are replaced
        by the log's (a `rebuild`), in one write transaction that replays the log again.
        """
        if replayer is None:
            replayer = TreeReplayer(self, at_sizes, progress)
        with self.env.read() as txn:
            result = replayer.finish(txn, records)
        if repair and result.digest != result.stored_digest:
            self._rewrite(records)
        return result

    def replayer(self) -> TreeReplayer:
        """A replay to feed the log's records as they are read (`TreeReplayer.add`), then
        finish with `replay`."""
        return TreeReplayer(self)

    def _rewrite(self, records: Records) -> None:
        """Replace the stored tiles with the log's, in one write transaction (appends wait)."""

        def rewrite(txn: lmdb.Transaction) -> None:
            txn.drop(self._tiles, delete=False)
            mine: dict[tuple[int, int], bytes] = {}
            size = 0
            batch: list[bytes] = []

            def read(level: int, index: int) -> bytes:
                return mine.get((level, index), b"")

            for _position, record in records(txn, 0):
                batch.append(merkle.leaf_hash(record))
                if len(batch) == 4096:
                    mine.update(merkle.append(size, batch, read))
                    size += len(batch)
                    batch = []
            mine.update(merkle.append(size, batch, read))
            size += len(batch)
            for (level, index), data in sorted(mine.items()):
                _put_tile(txn, self._tiles, level, index, data, 0)

        self.env.write(rewrite)


class TreeReplayer:
    """The audit tree recomputed from the log's records as they are fed to it, in position
    order, in one read transaction or several (`TreeStore.replay`). A tile is compared with
    the stored one in the transaction that completes it (a complete tile never changes: the
    log only grows, and one rebuild at a time rewrites tiles); the stored tree's size and
    digest are read in the transaction that finishes the replay, which reads the rest of the
    log in the same snapshot."""

    def __init__(
        self,
        tree: TreeStore,
        at_sizes: Iterable[int] = (),
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self._tree = tree
        self._wanted = set(at_sizes)
        self._progress = progress
        self.result = TreeReplay()
        self._mine: dict[tuple[int, int], bytes] = {}
        self._differ: list[int] = []  # first differing positions
        self._replayed = _Digest()
        self._expected = 1  # the next position
        self._stopped = False  # at a gap in the log: nothing after it is a leaf

    def _read(self, level: int, index: int) -> bytes:
        return self._mine.get((level, index), b"")

    def add(self, txn: lmdb.Transaction, records: Iterable[tuple[int, bytes]]) -> None:
        """Fold `records` ((position, stored record), the next ones of the log, read in
        `txn`) into the tree."""
        if self._stopped:
            return
        stored = functools.partial(self._tree.tile, txn)
        result, wanted, batch = self.result, self._wanted, []
        leaf = merkle.leaf_hash
        for position, record in records:
            if position != self._expected:
                result.first_bad = self._expected
                result.problem = (
                    f"the log has no entry {self._expected} (the next one is {position}): "
                    "an event was deleted"
                )
                self._stopped = True
                break
            batch.append(leaf(record))
            self._expected += 1
            if len(batch) == 4096 or result.size + len(batch) in wanted:
                self._flush(batch, stored)
                batch = []
                if self._progress is not None:
                    self._progress(result.size)
        self._flush(batch, stored)

    def _flush(self, batch: list[bytes], stored: merkle.TileRead) -> None:
        if not batch:
            return
        result = self.result
        writes = merkle.append(result.size, batch, self._read)
        self._mine.update(writes)
        result.size += len(batch)
        full = merkle.TILE_WIDTH * merkle.HASH_SIZE
        for (level, index), data in sorted(writes.items()):
            if len(data) == full:  # complete: compare, digest, forget
                self._compare(stored, level, index, data)
                self._replayed.add(level, index, data)
                del self._mine[(level, index)]
        if result.size in self._wanted:
            result.roots[result.size] = merkle.Tiles(self._read).root(result.size)

    def _compare(self, stored: merkle.TileRead, level: int, index: int, data: bytes) -> None:
        """Record the first position `data` (tile level/index, replayed) disagrees with the
        stored tile at: the exact leaf at level 0, the tile's first leaf above."""
        found = stored(level, index)
        if found == data:
            return
        span = 1 << (merkle.TILE_HEIGHT * level)
        size = merkle.HASH_SIZE
        for i in range(0, len(data), size):
            if found[i : i + size] != data[i : i + size]:
                self._differ.append((index * merkle.TILE_WIDTH + i // size) * span + 1)
                return
        self._differ.append((index * merkle.TILE_WIDTH + len(data) // size) * span + 1)

    def finish(self, txn: lmdb.Transaction, records: Records) -> TreeReplay:
        """Fold the rest of the log (after the records added so far), read in `txn`, and
        compare the whole tree with the one stored as `txn` sees it."""
        self.add(txn, records(txn, self._expected - 1))
        result = self.result
        tree = self._tree
        stored_size = tree.size(txn)
        stored = _Digest()
        for level, index, data in tree.stored_tiles(txn):
            stored.add(level, index, data)
        result.stored_digest = stored.hexdigest()
        if 0 in self._wanted:
            result.roots[0] = merkle.EMPTY_ROOT
        reader = functools.partial(tree.tile, txn)
        for (level, index), data in sorted(self._mine.items()):  # the partial tiles
            self._compare(reader, level, index, data)
            self._replayed.add(level, index, data)
        result.digest = self._replayed.hexdigest()
        if self._differ and result.first_bad is None:
            result.first_bad = min(self._differ)
            result.problem = (
                f"the stored event at position {result.first_bad} is not the one the "
                "audit tree recorded when it was appended"
            )
        if stored_size != result.size and result.first_bad is None:
            result.first_bad = min(stored_size, result.size) + 1
            result.problem = (
                f"the audit tree holds {stored_size} leaves, the log {result.size} events"
            )
        return result


class _AuditState:
    """`AuditState` over one read transaction."""

    def __init__(self, tree: TreeStore, txn: lmdb.Transaction, records: Records) -> None:
        self._tree = tree
        self._txn = txn
        self._records = records
        self._size = tree.size(txn)

    @property
    def size(self) -> int:
        return self._size

    def tiles(self) -> merkle.Tiles:
        return self._tree.tiles(self._txn)

    def checkpoints(self) -> list[tuple[int, bytes]]:
        return list(self._tree.checkpoints(self._txn))

    def last_checkpoint(self) -> tuple[int, bytes] | None:
        return self._tree.last_checkpoint(self._txn)

    def record(self, position: int) -> bytes:
        for found, record in self._records(self._txn, position - 1):
            if found == position:
                return record
            break
        msg = f"the log has no entry {position}"
        raise LedgerCorruptError(msg)


class LedgerAudit:
    """The ledger as the audit service sees it (the domain's `AuditLog` port): the tree
    store, and the log's stored records (`records()` gives the reader: it makes the
    ledger's application, which only the audit's reading commands need)."""

    def __init__(
        self,
        tree: TreeStore,
        records: Callable[[], Records],
        head: Callable[[], int],
        catch_up: Callable[[], None] | None,
    ) -> None:
        """`catch_up` gives a ledger made before the audit log its tree (None: a home opened
        read only, whose tree is what it is); it runs before the tree is first read."""
        self.tree = tree
        self._records = records
        self._head = head
        self._catch_up = catch_up

    def _caught_up(self) -> None:
        if self._catch_up is not None:
            self._catch_up()
            self._catch_up = None

    def origin(self) -> str:
        return self.tree.ensure_origin()

    def head(self) -> int:
        return self._head()

    @contextmanager
    def audit_state(self) -> Iterator[_AuditState]:
        self._caught_up()
        records = self._records()
        with self.tree.read() as txn:
            yield _AuditState(self.tree, txn, records)

    def keep_checkpoint(self, size: int, note: bytes, expect_last: int | None) -> bool:
        return self.tree.keep_checkpoint(size, note, expect_last)

    def replay(self, at_sizes: Sequence[int]) -> TreeReplay:
        self._caught_up()
        return self.tree.replay(self._records(), at_sizes=at_sizes)

    def export_tiles(self, directory: str, size: int, note: str) -> int:
        from imageledger.storage.tlogexport import export_tiles

        origin = self.origin()
        return export_tiles(self.tree, self._records(), Path(directory), origin, size, note).files

    def entries(self, first: int, last: int) -> Iterator[tuple[int, bytes, dict[str, Any]]]:
        from imageledger.storage.ledgerformat import record_fields

        records = self._records()
        with self.tree.read() as txn:
            for position, record in records(txn, first - 1):
                if position > last:
                    break
                yield position, record, record_fields(record)
