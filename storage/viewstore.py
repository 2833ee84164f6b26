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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final, cast

import lmdb
import msgpack
from eventsourcing.persistence import Notification

from imageledger.storage.ledger import LMDBApplicationRecorder, log_entries
from imageledger.storage.lmdbenv import LedgerEnv

NAMESPACES: Final = ("a", "b")
_ACTIVE: Final = b"views.active"


def pack(value: Any) -> bytes:
    """msgpack of a plain value. Canonical because the folds build every record with a fixed
    key order (literals, never from a set) and lists they sort; rebuild --verify and the
    model test check that live and rebuilt views are the same bytes."""
    return cast(bytes, msgpack.packb(value, use_bin_type=True))


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


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
        for (table, key), value in self._dirty.items():
            if value is self._deleted:
                self.txn.delete(key, db=self.dbs[table])
            else:
                self.txn.put(key, pack(value), db=self.dbs[table])
        self._dirty.clear()

    def scan(
        self, table: str, *, prefix: bytes = b"", reverse: bool = False
    ) -> Iterator[tuple[bytes, Any]]:
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
        # py-lmdb's C iterators and one bound unpacker: list() of 10,000 references is one scan.
        decode = _UNPACK
        if not prefix:
            for key, value in rows:
                yield key, decode(value)
            return
        for key, value in rows:
            if not key.startswith(prefix):
                return
            yield key, decode(value)


def _successor(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with `prefix` (None if none)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


class LMDBViews:
    """The view tables of one ledger; `tables` names them (the projection's TABLES)."""

    def __init__(
        self, env: LedgerEnv, recorder: LMDBApplicationRecorder, tables: Sequence[str]
    ) -> None:
        self.env = env
        self.recorder = recorder
        self.tables = tuple(tables)
        self._meta = env.db("views.meta")
        self._dbs = {
            ns: {table: env.db(f"views.{ns}.{table}") for table in self.tables} for ns in NAMESPACES
        }

    def active(self, txn: lmdb.Transaction) -> str:
        value = txn.get(_ACTIVE, db=self._meta)
        return "a" if value is None else cast(bytes, value).decode()

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

    def write(self, namespace: str, fn: Callable[[LMDBViewTxn], None]) -> None:
        def write(txn: lmdb.Transaction) -> None:
            view = self.in_txn(txn, namespace)
            fn(view)
            view.flush()

        self.env.write(write)

    def clear(self, namespace: str) -> None:
        def drop(txn: lmdb.Transaction) -> None:
            for db in self._dbs[namespace].values():
                txn.drop(db, delete=False)

        self.env.write(drop)

    def head(self) -> int:
        return self.recorder.max_notification_id() or 0

    def read_log(self, after: int, limit: int) -> Sequence[Notification]:
        return self.recorder.select_notifications(after, limit, inclusive_of_start=False)

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
            fold(view, list(log_entries(txn, self.recorder, after)))
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

    @staticmethod
    def _digest(txn: lmdb.Transaction, db: Any) -> str:
        hasher = hashlib.sha256()
        for key, value in txn.cursor(db=db):
            hasher.update(len(key).to_bytes(4, "big") + key)
            hasher.update(len(value).to_bytes(4, "big") + value)
        return hasher.hexdigest()

    def attach(self, fold: Callable[[LMDBViewTxn, list[Notification]], None]) -> None:
        """Fold every append to the log into the live views in the append's transaction."""

        def project(txn: lmdb.Transaction, notifications: list[Notification]) -> None:
            view = self.in_txn(txn)
            fold(view, notifications)
            view.flush()

        self.recorder.projectors.append(project)
