"""The views' tables in the ledger's LMDB environment (the `ViewTxn` port on LMDB).

Two namespaces of tables, ``views.a.*`` and ``views.b.*``; ``views.active`` says which one is
live. The live one is folded in the same write transaction as the events that change it (see
`attach`), so views and log always agree and a reader in any process sees a write as soon as
it returns. A rebuild fills the spare namespace in batches while appends go on, catches up and
flips the pointer in one final transaction: readers never see a half-built view.

Values are plain data packed canonically (msgpack with map keys sorted at every depth), so equal
views are equal bytes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from typing import TYPE_CHECKING, Any, Final, cast

import lmdb
import msgpack

from imageledger.domain.errors import LedgerCorruptError
from imageledger.domain.log import get_logger
from imageledger.storage.lmdbenv import LedgerEnv, as_damage

if TYPE_CHECKING:  # a query loads no eventsourcing (see `domain.history`)
    from eventsourcing.persistence import Notification

    from imageledger.projections.runner import MemoryView
    from imageledger.storage.ledger import LMDBApplicationRecorder

log = get_logger(__name__)

NAMESPACES: Final = ("a", "b")
_ACTIVE: Final = b"views.active"
_CHECKPOINTS: Final = "views.checkpoints"
_POSITION: Final = struct.Struct(">Q")
MAX_SHARE: Final = 0.4
"""The most disk view checkpoints may take, as a share of the log's (see `ViewCheckpoints`)."""


def packer() -> Callable[[Any], bytes]:
    """A packer for one run of writes (a flush, a bulk load): msgpack's module-level `packb`
    builds a Packer per value, and a Packer is not thread-safe, so each run gets its own.

    msgpack of a plain value. Canonical because the folds build every record with a fixed
    key order (literals, never from a set) and lists they sort; rebuild --verify and the
    model test check that live and rebuilt views are the same bytes. Aware datetimes become
    MessagePack timestamps (one encoding per instant), which the C unpacker turns back into
    UTC datetimes by itself."""
    return cast(Callable[[Any], bytes], msgpack.Packer(use_bin_type=True, datetime=True).pack)


def unpack(data: bytes) -> Any:
    """A stored view value. Bytes msgpack cannot read (a damaged page: LMDB keeps no
    checksums) are a `LedgerCorruptError`, which the transaction boundary (`lmdbenv`) turns
    into one naming the ledger; the reader (`views.ViewState`) checks the values' shape."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, timestamp=3)
    except Exception as e:  # ExtraData, FormatError, StackError, UnicodeDecodeError, ...
        raise _undecodable(e) from e


def _undecodable(error: Exception) -> LedgerCorruptError:
    text = " ".join(str(error).split())[:80]
    return LedgerCorruptError(f"a view record cannot be decoded ({type(error).__name__}: {text})")


_UNPACK = unpack


class LMDBViewTxn:
    """One transaction over one namespace's tables.

    Writes are buffered (decoded) until `flush()`, so a batch of events that touches the same
    record many times (a manifest pulled under many names) decodes and encodes it once."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any]) -> None:
        self.txn = txn
        self.dbs = dbs
        self._dirty: dict[tuple[str, bytes], Any] = {}
        self._deleted = object()

    def get(self, table: str, key: bytes) -> Any:
        buffered = self._dirty.get((table, key), None)
        if buffered is not None:
            return None if buffered is self._deleted else buffered
        data = self.txn.get(key, db=self.dbs[table])
        return None if data is None else unpack(cast(bytes, data))

    def put(self, table: str, key: bytes, value: Any) -> None:
        self._dirty[table, key] = value

    def delete(self, table: str, key: bytes) -> None:
        self._dirty[table, key] = self._deleted

    def flush(self) -> None:
        """Write the buffered changes into the transaction (before any scan, and at the end)."""
        encode = packer()
        for (table, key), value in self._dirty.items():
            if value is self._deleted:
                self.txn.delete(key, db=self.dbs[table])
            else:
                self.txn.put(key, encode(value), db=self.dbs[table])
        self._dirty.clear()

    def scan(
        self, table: str, *, prefix: bytes = b"", reverse: bool = False
    ) -> Iterator[tuple[bytes, Any]]:
        # py-lmdb's C iterators and one bound unpacker: list() of 10,000 references is one scan.
        decode = _UNPACK
        for key, value in self.scan_encoded(table, prefix=prefix, reverse=reverse):
            yield key, decode(value)

    def scan_encoded(
        self, table: str, *, prefix: bytes = b"", reverse: bool = False
    ) -> Iterator[tuple[bytes, bytes]]:
        if self._dirty:
            self.flush()
        cursor: Any = self.txn.cursor(db=self.dbs[table])
        if reverse:
            if prefix:
                upper = _successor(prefix)
                found = cursor.set_range(upper) if upper else False
                positioned = cursor.prev() if found else cursor.last()
            else:
                positioned = cursor.last()
            rows = cursor.iterprev() if positioned else iter(())
        else:
            rows = cursor.iternext() if cursor.set_range(prefix) else iter(())
        if not prefix:
            yield from rows
            return
        for key, value in rows:
            if not key.startswith(prefix):
                return
            yield key, value

    decode = staticmethod(unpack)


class MemoryViewTxn:
    """A `ViewTxn` over view records held in memory (a replay's `MemoryView.records()`): the
    views as they were at a past position (`LedgerStore.at`). Rows are encoded as the stored
    views encode them, so that readers that keep what they built from a row's bytes
    (`ViewState.handles`) behave as over LMDB."""

    def __init__(self, tables: dict[str, dict[bytes, Any]]) -> None:
        self.tables = tables
        self._encode = packer()

    def get(self, table: str, key: bytes) -> Any:
        return self.tables.get(table, {}).get(key)

    def put(self, table: str, key: bytes, value: Any) -> None:
        msg = "a past state of the views is read only"
        raise TypeError(msg)

    def delete(self, table: str, key: bytes) -> None:
        msg = "a past state of the views is read only"
        raise TypeError(msg)

    def scan(
        self, table: str, *, prefix: bytes = b"", reverse: bool = False
    ) -> Iterator[tuple[bytes, Any]]:
        rows = self.tables.get(table, {})
        for key in sorted((k for k in rows if k.startswith(prefix)), reverse=reverse):
            yield key, rows[key]

    def scan_encoded(
        self, table: str, *, prefix: bytes = b"", reverse: bool = False
    ) -> Iterator[tuple[bytes, bytes]]:
        for key, value in self.scan(table, prefix=prefix, reverse=reverse):
            yield key, self._encode(value)

    decode = staticmethod(unpack)


def _successor(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with `prefix` (None if none)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


class LMDBViews:
    """The view tables of one ledger; `tables` names them (the projection's TABLES).

    `recorder` gives the recorder of the ledger's log, for what reads the log (history, the
    head, rebuilds) or folds into the views (appends): it is asked only then, so that the
    views can be read without making the application that keeps the log (and loading
    eventsourcing: see `storage.eventstore`)."""

    def __init__(
        self,
        env: LedgerEnv,
        tables: Sequence[str],
        recorder: Callable[[], LMDBApplicationRecorder],
        views_format: int,
        log_db: str,
    ) -> None:
        """`log_db` names the log's database (the checkpoints' disk is measured against it)."""
        self.env = env
        self._recorder = recorder
        self.tables = tuple(tables)
        self.checkpoints = ViewCheckpoints(env, views_format, log_db, self._log_record)
        names = [f"views.{ns}.{table}" for ns in NAMESPACES for table in self.tables]
        meta, *handles = env.dbs(["views.meta", *names])
        self._meta = meta
        by_name = dict(zip(names, handles, strict=True))
        self._dbs = {
            ns: {table: by_name[f"views.{ns}.{table}"] for table in self.tables}
            for ns in NAMESPACES
        }

    def active(self, txn: lmdb.Transaction) -> str:
        value = txn.get(_ACTIVE, db=self._meta)
        if value is None:
            return "a"
        if value not in (b"a", b"b"):
            msg = f"the live views' namespace is {bytes(value)[:16]!r}, not a or b"
            raise LedgerCorruptError(msg)
        return cast(bytes, value).decode()

    def damage(self, error: LedgerCorruptError) -> BaseException:
        """`error` (damage found in what this ledger stores) naming the ledger."""
        return as_damage(self.env.path, error)

    def spare(self) -> str:
        with self.env.read() as txn:
            return "b" if self.active(txn) == "a" else "a"

    def in_txn(self, txn: lmdb.Transaction, namespace: str | None = None) -> LMDBViewTxn:
        return LMDBViewTxn(txn, self._dbs[namespace or self.active(txn)])

    @contextmanager
    def read(self) -> Iterator[LMDBViewTxn]:
        """A consistent snapshot of the live views."""
        with self.env.read() as txn:
            yield self.in_txn(txn)

    def load(self, namespace: str, tables: dict[str, dict[bytes, Any]]) -> None:
        """Write rows in bulk: encoded and sorted per table, then handed to LMDB's C loop in
        one call per table (appended outright when the table is empty, as it is when a
        rebuild writes its records)."""

        def load(txn: lmdb.Transaction) -> None:
            encode = packer()
            for table, rows in tables.items():
                if not rows:
                    continue
                db = self._dbs[namespace][table]
                items = sorted([(key, encode(value)) for key, value in rows.items()])
                empty = txn.stat(db)["entries"] == 0
                cursor: Any = txn.cursor(db=db)
                cursor.putmulti(items, dupdata=False, overwrite=True, append=empty)

        self.env.write(load)

    def clear(self, namespace: str) -> None:
        def drop(txn: lmdb.Transaction) -> None:
            for db in self._dbs[namespace].values():
                txn.drop(db, delete=False)

        self.env.write(drop)

    def _log_record(self, txn: lmdb.Transaction, position: int) -> bytes | None:
        for found, record in self._recorder().records_after(txn, position - 1):
            return record if found == position else None
        return None

    def log_at(self, view: LMDBViewTxn, positions: Iterable[int]) -> list[Notification]:
        """The log entries at `positions`, in the snapshot `view` reads."""
        return list(self._recorder().entries_at(view.txn, positions))

    def head(self) -> int:
        return self._recorder().max_notification_id() or 0

    def read_log(self, after: int, limit: int) -> Sequence[Notification]:
        return self._recorder().select_notifications(after, limit, inclusive_of_start=False)

    def finish(
        self,
        namespace: str,
        after: int,
        fold: Callable[[LMDBViewTxn, list[Notification]], None],
        *,
        activate: bool,
    ) -> dict[str, tuple[str, str]]:
        """In one transaction: fold the log entries after `after` into `namespace`, compare its
        digests with the live views', and (if `activate`) make it the live namespace and clear
        the old one. Returns {table: (live digest, rebuilt digest)}."""

        def finish(txn: lmdb.Transaction) -> dict[str, tuple[str, str]]:
            view = self.in_txn(txn, namespace)
            fold(view, list(self._recorder().entries_after(txn, after)))
            view.flush()
            live = self.active(txn)
            compared = {
                table: (
                    self._digest(txn, self._dbs[live][table]),
                    self._digest(txn, self._dbs[namespace][table]),
                )
                for table in self.tables
            }
            if activate and namespace != live:
                txn.put(_ACTIVE, namespace.encode(), db=self._meta)
                for db in self._dbs[live].values():
                    txn.drop(db, delete=False)
            return compared

        return self.env.write(finish)

    def digests(self) -> dict[str, str]:
        """Each live table's digest (`_digest`), in one snapshot."""
        with self.env.read() as txn:
            live = self._dbs[self.active(txn)]
            return {table: self._digest(txn, live[table]) for table in self.tables}

    @staticmethod
    def _digest(txn: lmdb.Transaction, db: Any) -> str:
        """SHA-256 over the table's rows in key order. Rows are hashed in slices, each packed
        as one msgpack array of [key, value] pairs (the C packer frames every key and value
        with its length, so the bytes hashed say exactly which rows there were)."""
        hasher = hashlib.sha256()
        rows: Any = txn.cursor(db=db).iternext()
        while chunk := list(islice(rows, 4096)):
            hasher.update(msgpack.packb(chunk, use_bin_type=True))
        return hasher.hexdigest()

    def checkpoint(
        self, position: int, view: MemoryView, *, keep: bool
    ) -> Callable[[], tuple[str, str]]:
        return self.checkpoints.compare(position, view, keep=keep)

    def attach(self, fold: Callable[[LMDBViewTxn, list[Notification]], None]) -> None:
        """Fold every append to the log into the live views in the append's transaction."""

        def project(txn: lmdb.Transaction, notifications: list[Notification]) -> None:
            view = self.in_txn(txn)
            fold(view, notifications)
            view.flush()

        self._recorder().attach(project)


class ViewCheckpoints:
    """The views as they were at some positions (`runner.CHECKPOINT_EVERY`), for the cache as
    it was (`LedgerStore.at`): derived data like the views, remade by a rebuild, checked by
    `rebuild --verify`, and written lazily by `at` on a home it may write.

    One record per checkpoint in ``views.checkpoints``, keyed by its position (8 bytes, big
    endian, so that the nearest one below a position is one cursor step): zstd (level 1) of
    the msgpack array ``[views format, position, SHA-256 of the log record at that position,
    {table: {key: value}}]``, tables and rows in key order, so that equal views are equal
    bytes and the digest compared by a rebuild is over the packed bytes whatever the
    compression. The position and the record's digest bind a checkpoint to the log it was
    folded from: one moved to another key, or left from another log, is damage, reported
    (a warning; `rebuild --verify`) and passed over, never answered from.

    One msgpack document, unpacked by one C call (for 21,000 references: 45 ms). Storing
    each row packed on its own, to decode only the rows a replay reads, loaded faster but
    made a rebuild, which packs every checkpoint, pay 70% more. A replay packs the document
    from the rows it keeps packed (`encode`: only the rows changed since its last checkpoint
    are packed again), the same bytes as one call over the whole views would give. zstd
    because such a checkpoint is 9 MB packed: zstd makes it 0.6 MB in 7 ms and back in 6 ms,
    where zlib took 30 ms each way for 1 MB. A checkpoint of another
    views format (an older imageledger) is ignored, and overwritten by the next rebuild.

    Checkpoints never take more than `MAX_SHARE` of the log's own pages: one that would is not
    stored (`at` then replays from an earlier one), so a cache with many references and a
    short log does not pay more disk for its past than for its log."""

    def __init__(
        self,
        env: LedgerEnv,
        views_format: int,
        log_db: str,
        record: Callable[[lmdb.Transaction, int], bytes | None],
    ) -> None:
        """`record(txn, position)`: the log's stored record at `position` (None: none)."""
        self.env = env
        self.format = views_format
        self.log_db = log_db
        self._record = record
        self._db: Any = None

    def _handle(self, *, create: bool) -> Any:
        """The database's handle; None when it does not exist and may not be made here (a
        query must not create databases, and a read-only home cannot)."""
        if self._db is None:
            if not create or self.env.config.readonly:
                if not self.env.exists(_CHECKPOINTS):
                    return None
                self._db = self.env.db(_CHECKPOINTS, create=False)
            else:
                self._db = self.env.db(_CHECKPOINTS)
        return self._db

    def _anchor(self, txn: lmdb.Transaction, position: int) -> bytes:
        record = self._record(txn, position)
        if record is None:
            msg = f"a view checkpoint is at position {position}, past the log's end"
            raise LedgerCorruptError(msg)
        return hashlib.sha256(record).digest()

    def encode(self, position: int, view: MemoryView) -> bytes:
        """The packed (uncompressed) bytes of a checkpoint of `view` at `position`: the
        MessagePack array ``[format, position, anchor, {table: {key: value}}]`` with tables
        and rows in key order, framed here around each table's rows as the view packed them
        (`MemoryView.packed`, which repacks only the rows changed since its last checkpoint).
        The bytes are those of packing the whole document at once (the test checks it)."""
        with self.env.read() as txn:
            anchor = self._anchor(txn, position)
        framer = msgpack.Packer(use_bin_type=True, datetime=True)
        pack = framer.pack
        tables = view.checkpointed()
        parts = [
            framer.pack_array_header(4),
            pack(self.format),
            pack(position),
            pack(anchor),
            framer.pack_map_header(len(tables)),
        ]
        for table in tables:
            count, rows = view.packed(table, pack)
            parts += [pack(table), framer.pack_map_header(count), rows]
        return b"".join(parts)

    def _decode(
        self, txn: lmdb.Transaction, position: int, stored: bytes
    ) -> tuple[bytes, dict[str, dict[bytes, Any]]] | None:
        """(packed bytes, records) of the checkpoint stored at `position`; None for another
        views format. Bytes that do not decode, or a checkpoint of another position or log,
        are damage (`LedgerCorruptError`)."""
        import zstandard

        try:
            packed = zstandard.ZstdDecompressor().decompress(stored)
        except zstandard.ZstdError as e:
            raise _undecodable(e) from e
        value = unpack(packed)
        if not (isinstance(value, list) and len(value) == 4 and isinstance(value[3], dict)):
            msg = "a view checkpoint is not [format, position, record digest, {table: rows}]"
            raise LedgerCorruptError(msg)
        if value[0] != self.format:
            return None
        if value[1] != position or value[2] != self._anchor(txn, position):
            msg = f"the view checkpoint at position {position} is not of this log's position"
            raise LedgerCorruptError(msg)
        tables: dict[str, dict[bytes, Any]] = value[3]
        for table, rows in tables.items():
            if not (isinstance(table, str) and isinstance(rows, dict)):
                msg = "a view checkpoint's table is not {key: value}"
                raise LedgerCorruptError(msg)
        return packed, tables

    def nearest(self, position: int) -> tuple[int, dict[str, dict[bytes, Any]]] | None:
        """The checkpoint at the greatest position not after `position` (None: none)."""
        db = self._handle(create=False)
        if db is None:
            return None
        with self.env.read() as txn:
            cursor: Any = txn.cursor(db=db)
            found = cursor.set_range(_POSITION.pack(position + 1))
            while cursor.prev() if found else cursor.last():
                found = True
                at = _POSITION.unpack(bytes(cursor.key()))[0]
                try:
                    decoded = self._decode(txn, at, bytes(cursor.value()))
                except LedgerCorruptError as e:
                    # Derived data: an earlier checkpoint (or the log) answers instead, and
                    # `rebuild --verify` reports it, `rebuild` remakes it.
                    log.warning("views.checkpoint_damaged", position=at, error=str(e))
                    continue
                if decoded is not None:
                    return at, decoded[1]
        return None

    def compare(
        self, position: int, view: MemoryView, *, keep: bool
    ) -> Callable[[], tuple[str, str]]:
        """The digests (stored, replayed) of the checkpoint at `position` and of `view`,
        both empty when none is stored (in this views format); with `keep`, `view` is
        stored there (a rebuild remakes every checkpoint).

        `view` is packed now; the rest (decompressing the stored checkpoint, the digests,
        compressing and storing the replayed one: ~15 ms of the ~50 a checkpoint of the
        benchmark's 1,000,000-event ledger costs, mostly in zstd and SHA-256, which release
        the GIL) is the function returned, which may run in another thread (a rebuild's
        runner overlaps it with the replay) and returns the digests.

        A stored checkpoint whose bytes are the replayed ones is the same checkpoint (they
        hold this format, this position and this log record's digest): it is not decoded
        (unpacking one cost more than packing it). Any other is decoded, to tell one of
        another views format (not compared) from damage."""
        db = self._handle(create=keep)
        found = None
        if db is not None:
            with self.env.read() as txn:
                value = txn.get(_POSITION.pack(position), db=db)
                found = None if value is None else bytes(value)
        if found is None and not keep:
            return lambda: ("", "")  # nothing to compare: spare the encoding
        packed = self.encode(position, view)

        def settle() -> tuple[str, str]:
            replayed = hashlib.sha256(packed).hexdigest()
            stored = ""
            if found is not None:
                stored = self._stored_digest(position, found, packed, replayed)
            if keep and stored != replayed:
                self._put(position, packed, overwrite=True)
            return (stored, replayed if stored else "")

        return settle

    def _stored_digest(self, position: int, found: bytes, packed: bytes, replayed: str) -> str:
        """The digest of the checkpoint `found` stored at `position` ("" for another views
        format, "damaged" when it does not decode or belongs elsewhere); `packed` is the
        replay's, whose digest is `replayed`."""
        import zstandard

        try:
            if zstandard.ZstdDecompressor().decompress(found) == packed:
                return replayed
        except zstandard.ZstdError:
            return "damaged"
        with self.env.read() as txn:
            try:
                decoded = self._decode(txn, position, found)
            except LedgerCorruptError:
                return "damaged"
        return "" if decoded is None else hashlib.sha256(decoded[0]).hexdigest()

    def keep(self, position: int, view: MemoryView) -> None:
        """Store a checkpoint at `position` unless one is there (`at` leaving one behind)."""
        db = self._handle(create=True)
        with self.env.read() as txn:
            if txn.get(_POSITION.pack(position), db=db) is not None:
                return
        self._put(position, self.encode(position, view), overwrite=False)

    def _put(self, position: int, packed: bytes, *, overwrite: bool) -> None:
        import zstandard

        db = self._handle(create=True)
        value = zstandard.ZstdCompressor(level=1).compress(packed)
        key = _POSITION.pack(position)
        if overwrite:  # the one it replaces (damaged, stale) goes whether or not this fits
            self.env.write(lambda txn: txn.delete(key, db=db))
        mine, log_pages = self.disk()
        # Counted in whole pages, one more for the leaf or branch it may add.
        page = self.env.env.stat()["psize"]
        if mine + (-(-len(value) // page) + 1) * page > MAX_SHARE * log_pages:
            log.info("views.checkpoint_skipped", position=position, bytes=len(value))
            return
        self.env.write(lambda txn: txn.put(key, value, db=db, overwrite=overwrite))

    def disk(self) -> tuple[int, int]:
        """The bytes of the ledger's pages the checkpoints take, and the log's."""
        db = self._handle(create=False)
        # No log database before the first event.
        log_db = self.env.db(self.log_db, create=False) if self.env.exists(self.log_db) else None
        with self.env.read() as txn:
            mine = 0 if db is None else _bytes(txn.stat(db))
            return mine, 0 if log_db is None else _bytes(txn.stat(log_db))


def _bytes(stat: Any) -> int:
    return int((stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]) * stat["psize"])
