"""The eventsourcing persistence module on LMDB: `PERSISTENCE_MODULE=imageledger.storage.ledger`.

Configured through the eventsourcing environment (each key may be prefixed with the upper-cased
application name, as the library's own modules allow):

- ``LMDB_PATH`` (required): the ledger directory. Everything that names the same path in one
  process shares one LMDB environment.
- ``LMDB_MAP_SIZE``: initial map size in bytes (default 64 MiB); the map doubles on demand.
- ``LMDB_MAX_MAP_SIZE``: the ceiling for that growth (default 1 TiB); an append that needs more
  fails with `LedgerFullError` and writes nothing.
- ``LMDB_DURABILITY``: ``sync`` (default), ``nometasync`` or ``nosync``; see `EnvConfig`.
- ``LMDB_POLL_INTERVAL``: seconds between checks for other processes' commits (default 0.05).
- ``CREATE_TABLE``: create the named databases when a recorder is made (default yes).
- ``LMDB_READONLY``: open for reading only (default no): appends fail with
  `LedgerReadOnlyError`; see `EnvConfig.readonly`.

Layout, per application name ``N`` (databases are namespaced ``n.`` so several applications
and views can share one ledger):

- ``n.log``: notification id (8 bytes, big-endian) -> the whole stored event. This is the
  append-only event log; ids are assigned inside the write transaction from the log's last
  key, and LMDB has one writer at a time across processes, so they are gapless and in commit
  order no matter how many threads and processes append.
- ``n.log.index``: originator key + version -> notification id (aggregate reads).
- ``n.stored_<purpose>``: originator key + version -> stored event (snapshots and other
  aggregate-only recorders).
- ``n.tracking``: upstream application name -> last processed notification id.

An originator key is 17 bytes: ``0x00`` + the UUID's bytes, or ``0x01`` + a 128-bit BLAKE2b
digest of a string id (LMDB keys are short, string ids need not be); the id itself is kept in
the record. Versions are stored offset by 2**63 so that negative versions sort too.
"""

from __future__ import annotations

import functools
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from hashlib import blake2b
from pathlib import Path
from time import monotonic
from typing import Any, Final, TypeVar, cast
from uuid import UUID, SafeUUID

import lmdb
import msgpack
from eventsourcing.persistence import (
    AggregateRecorder,
    ApplicationRecorder,
    InfrastructureFactory,
    IntegrityError,
    InterfaceError,
    ListenNotifySubscription,
    Notification,
    OperationalError,
    ProcessRecorder,
    StoredEvent,
    Subscription,
    Tracking,
    TrackingRecorder,
    WaitInterruptedError,
)
from eventsourcing.utils import Environment, EnvType, resolve_topic

from imageledger.domain import errors
from imageledger.storage import settings
from imageledger.storage.lmdbenv import (
    LedgerEnv,
    damaged,
    open_env,
    release_env,
)


class LedgerCorruptError(errors.LedgerCorruptError, InterfaceError):
    """A damaged ledger (`imageledger.LedgerCorruptError`, whose name it keeps) as this
    persistence module reports it: also eventsourcing's `InterfaceError`, the type its
    persistence modules raise for it."""


class LedgerFullError(errors.LedgerFullError, OperationalError):
    """A full ledger (`imageledger.LedgerFullError`, whose name it keeps) as this persistence
    module reports it: also eventsourcing's `OperationalError`."""


F = TypeVar("F", bound=Callable[..., Any])


def _persistence_errors(method: F) -> F:
    """`method` raising the ledger's errors as eventsourcing's own types too.

    The domain's errors do not derive from eventsourcing's (`domain.errors` must load without
    it: a query never needs eventsourcing); code written against eventsourcing's interface
    catches `InterfaceError` and `OperationalError`, so the module's entry points raise
    subclasses that are both. Subclasses with a meaning of their own (a missing ledger, an
    undecodable value) pass through as they are."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except (InterfaceError, OperationalError):
            raise
        except errors.LedgerCorruptError as e:
            if type(e) is not errors.LedgerCorruptError:
                raise
            raise LedgerCorruptError(*e.args) from e
        except errors.LedgerFullError as e:
            if type(e) is not errors.LedgerFullError:
                raise
            raise LedgerFullError(*e.args) from e

    return cast(F, wrapper)


_U64: Final = struct.Struct(">Q")
_VERSION_OFFSET: Final = 1 << 63
_UUID_TAG: Final = b"\x00"
_STR_TAG: Final = b"\x01"
_KEY_LEN: Final = 17


def originator_key(originator_id: UUID | str) -> bytes:
    """The fixed-length key prefix of one aggregate sequence."""
    if isinstance(originator_id, UUID):
        return _UUID_TAG + originator_id.bytes
    return _STR_TAG + blake2b(originator_id.encode(), digest_size=16).digest()


def _event_key(originator_id: UUID | str, version: int) -> bytes:
    return originator_key(originator_id) + _U64.pack(version + _VERSION_OFFSET)


def _pack(s: StoredEvent) -> bytes:
    oid = s.originator_id
    raw = oid.bytes if isinstance(oid, UUID) else oid
    return cast(bytes, msgpack.packb((raw, s.originator_version, s.topic, s.state)))


def _get(txn: lmdb.Transaction, key: bytes, db: Any) -> bytes:
    value = txn.get(key, db=db)
    if value is None:
        msg = f"ledger index points at a missing log entry {key.hex()}"
        raise LedgerCorruptError(msg)
    return cast(bytes, value)


_new: Final = object.__new__
_set: Final = object.__setattr__
_from_bytes: Final = int.from_bytes
_UNKNOWN: Final = SafeUUID.unknown


_last_uuid: tuple[bytes, UUID] = (b"", UUID(int=0))


def _uuid(raw: bytes) -> UUID:
    # What UUID(bytes=raw) builds, without its argument checks (the 16 bytes are ours): half
    # the cost, and reading the log back makes one per entry. A UUID is immutable and a log
    # usually has one originator (imageledger's has), so the last one is reused.
    global _last_uuid  # noqa: PLW0603 - a one-entry memo, replaced whole (thread-safe)
    last_raw, last = _last_uuid
    if raw == last_raw:
        return last
    if len(raw) != 16:
        msg = f"ledger entry has a {len(raw)}-byte originator id"
        raise LedgerCorruptError(msg)
    uuid = _new(UUID)
    _set(uuid, "int", _from_bytes(raw, "big"))
    _set(uuid, "is_safe", _UNKNOWN)
    _last_uuid = (raw, uuid)
    return uuid


def _unpack(data: bytes) -> tuple[UUID | str, int, str, bytes]:
    """A stored event's four fields, checked: LMDB keeps no checksums, so bytes from a
    damaged page come back as they are. What msgpack cannot read, or reads as anything but
    (16 bytes or str, int, str, bytes), is a `LedgerCorruptError` (the transaction boundary in
    `lmdbenv` adds the ledger's path), never a raw msgpack error or a garbage event."""
    try:
        raw, version, topic, state = msgpack.unpackb(data)
    except Exception as e:  # msgpack raises several types, and unpacking a non-4-tuple more
        msg = f"a stored event cannot be decoded ({type(e).__name__}: {_short(e)})"
        raise LedgerCorruptError(msg) from e
    if (
        type(version) is not int
        or type(topic) is not str
        or type(state) is not bytes
        or not isinstance(raw, bytes | str)
    ):
        msg = "a stored event has fields of the wrong types"
        raise LedgerCorruptError(msg)
    return (_uuid(raw) if isinstance(raw, bytes) else raw), version, topic, state


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 80 else text[:77] + "..."


def _tracked(value: bytes | memoryview) -> int:
    """A tracking record: a notification id, 8 bytes big-endian."""
    if len(value) != 8:
        msg = f"a tracking record is {len(value)} bytes, not 8"
        raise LedgerCorruptError(msg)
    return int(_U64.unpack(value)[0])


def _position(key: bytes | memoryview) -> int:
    """A log key as its notification id (8 bytes, big-endian, from 1)."""
    if len(key) != 8:
        msg = f"a log key is {len(key)} bytes, not 8"
        raise LedgerCorruptError(msg)
    position: int = _U64.unpack(key)[0]
    if position == 0:
        msg = "a log key is notification id 0"
        raise LedgerCorruptError(msg)
    return position


def _notification(data: bytes, position: int) -> Notification:
    """The log entry `data` at `position`. Notification is a frozen dataclass whose __init__
    sets its five fields one by one; the recorder builds its own from stored bytes by
    handing it its field map at once, as eventsourcing's mapper builds events."""
    oid, version, topic, state = _unpack(data)
    notification = _new(Notification)
    _set(
        notification,
        "__dict__",
        {
            "originator_id": oid,
            "originator_version": version,
            "topic": topic,
            "state": state,
            "id": position,
        },
    )
    return notification


class LMDBRecorder:
    """What every recorder here shares: the ledger environment and its database names."""

    def __init__(self, env: LedgerEnv, namespace: str = "", *, create: bool = True) -> None:
        self.env = env
        self.namespace = namespace
        self.create = create

    def _db(self, name: str) -> Any:
        return self.env.db(self.namespace + name, create=self.create)

    def create_table(self) -> None:
        """Open (and create) this recorder's databases now rather than on first use."""


class LMDBAggregateRecorder(LMDBRecorder, AggregateRecorder):
    """Aggregate sequences only (snapshots): originator key + version -> stored event."""

    def __init__(
        self, env: LedgerEnv, namespace: str = "", *, purpose: str = "events", create: bool = True
    ) -> None:
        super().__init__(env, namespace, create=create)
        self.db_name = f"stored_{purpose}"
        if create:
            self.create_table()

    def create_table(self) -> None:
        self._db(self.db_name)

    @_persistence_errors
    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        db = self._db(self.db_name)
        rows = [
            (_event_key(s.originator_id, s.originator_version), _pack(s)) for s in stored_events
        ]

        def insert(txn: lmdb.Transaction) -> None:
            for key, value in rows:
                if not txn.put(key, value, db=db, overwrite=False):
                    msg = f"stored event already recorded: {key.hex()}"
                    raise IntegrityError(msg)

        if rows:
            self.env.write(insert)
        return None

    @_persistence_errors
    def select_events(
        self,
        originator_id: UUID | str,
        *,
        gt: int | None = None,
        lte: int | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> Sequence[StoredEvent]:
        db = self._db(self.db_name)
        with self.env.read() as txn:
            return [
                StoredEvent(*_unpack(value))
                for value in _scan_sequence(txn, db, originator_id, gt, lte, desc, limit)
            ]


def _scan_sequence(
    txn: lmdb.Transaction,
    db: Any,
    originator_id: UUID | str,
    gt: int | None,
    lte: int | None,
    desc: bool,
    limit: int | None,
) -> list[bytes]:
    """The values of one aggregate sequence between versions (gt, lte], in order."""
    prefix = originator_key(originator_id)
    low = prefix + _U64.pack(gt + _VERSION_OFFSET + 1 if gt is not None else 0)
    high = prefix + _U64.pack(lte + _VERSION_OFFSET if lte is not None else (1 << 64) - 1)
    if (limit is not None and limit <= 0) or low > high:
        return []
    found: list[bytes] = []
    cursor: Any = txn.cursor(db=db)  # values are bytes: transactions use buffers=False
    if desc:
        if not cursor.set_range(high):
            if not cursor.last():
                return []
        elif cursor.key() > high and not cursor.prev():
            return []
        while cursor.key() >= low:
            found.append(cursor.value())
            if len(found) == limit or not cursor.prev():
                break
    else:
        if not cursor.set_range(low):
            return []
        while cursor.key() <= high:
            found.append(cursor.value())
            if len(found) == limit or not cursor.next():
                break
    return found


Projector = Callable[[lmdb.Transaction, list[Notification]], None]


class LMDBApplicationRecorder(LMDBRecorder, ApplicationRecorder):
    """The application sequence: a gapless, commit-ordered log plus an aggregate index.

    This module's extension of eventsourcing's `ApplicationRecorder` interface, for views kept
    in the same LMDB environment (`storage.viewstore`): `attach` runs a projector inside every
    append's write transaction, and `entries_after`/`entries_at` read the log by position in
    a transaction the caller already holds (so an index of positions and the entries it names
    are read in one snapshot). Nothing outside this module touches the recorder's databases."""

    def __init__(self, env: LedgerEnv, namespace: str = "", *, create: bool = True) -> None:
        super().__init__(env, namespace, create=create)
        self._projectors: list[Projector] = []
        if create:
            self.create_table()

    def attach(self, projector: Projector) -> None:
        """Call `projector(transaction, new notifications)` inside every append's write
        transaction, so what it maintains commits (or rolls back) atomically with the events."""
        self._projectors.append(projector)

    def entries_after(self, txn: lmdb.Transaction, after: int) -> Iterator[Notification]:
        """The log after notification `after`, read in the open (read or write) `txn`."""
        cursor: Any = txn.cursor(db=self._db("log"))
        if not cursor.set_range(_U64.pack(after + 1)):
            return
        for key, value in cursor:
            yield _notification(value, _position(key))

    def entries_at(self, txn: lmdb.Transaction, positions: Iterable[int]) -> Iterator[Notification]:
        """The log entries at `positions`, read in the open `txn`."""
        log_db = self._db("log")
        for position in positions:
            yield _notification(_get(txn, _U64.pack(position), log_db), position)

    def records_after(self, txn: lmdb.Transaction, after: int) -> Iterator[tuple[int, bytes]]:
        """(position, log record) after notification `after`, read in the open `txn`: the
        stored bytes themselves, never decoded (the audit log's leaves: docs/FORMAT.md)."""
        cursor: Any = txn.cursor(db=self._db("log"))
        if not cursor.set_range(_U64.pack(after + 1)):
            return
        for key, value in cursor:
            yield _position(key), bytes(value)

    @staticmethod
    def notifications(records: Iterable[tuple[int, bytes]]) -> list[Notification]:
        """The log entries of `records` ((position, stored record), as `records_after` reads
        them): a rebuild reads the log once, for the audit tree's leaves and the views."""
        return [_notification(record, position) for position, record in records]

    def create_table(self) -> None:
        self._db("log")
        self._db("log.index")

    @_persistence_errors
    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        log_db = self._db("log")
        index_db = self._db("log.index")
        rows = [
            (_event_key(s.originator_id, s.originator_version), _pack(s)) for s in stored_events
        ]
        extra = self._prepare_extra(**kwargs)

        def insert(txn: lmdb.Transaction) -> list[int]:
            ids = self._append(txn, log_db, index_db, rows)
            if extra is not None:
                extra(txn)
            if self._projectors and ids:
                notifications = [
                    Notification(s.originator_id, s.originator_version, s.topic, s.state, i)
                    for s, i in zip(stored_events, ids, strict=True)
                ]
                for projector in self._projectors:
                    projector(txn, notifications)
            return ids

        if not rows and extra is None:
            return []
        return self.env.write(insert)

    def insert_records(self, records: Sequence[bytes]) -> list[int]:
        """Append stored records exactly as given (a debug bundle's log, replayed into a new
        home), in one transaction, with their index entries; the attached projectors are not
        run (the caller rebuilds the views once, after the last record). Each record must be
        a stored event in the form this module writes (`_pack` gives back the same bytes),
        else `LedgerCorruptError` and nothing of the batch is stored."""
        log_db = self._db("log")
        index_db = self._db("log.index")
        rows = []
        for record in records:
            stored = StoredEvent(*_unpack(record))
            if _pack(stored) != record:
                msg = "a record is not a stored event in this ledger's form"
                raise LedgerCorruptError(msg)
            rows.append((_event_key(stored.originator_id, stored.originator_version), record))
        return self.env.write(lambda txn: self._append(txn, log_db, index_db, rows))

    def _prepare_extra(self, **kwargs: Any) -> Any:
        """A function to run in the same transaction as the events (tracking, for a process)."""
        return None

    @staticmethod
    def _append(
        txn: lmdb.Transaction, log_db: Any, index_db: Any, rows: list[tuple[bytes, bytes]]
    ) -> list[int]:
        cursor = txn.cursor(db=log_db)
        last = _position(cursor.key()) if cursor.last() else 0
        ids = []
        for key, value in rows:
            last += 1
            packed_id = _U64.pack(last)
            if not txn.put(key, packed_id, db=index_db, overwrite=False):
                msg = f"stored event already recorded: {key.hex()}"
                raise IntegrityError(msg)
            txn.put(packed_id, value, db=log_db, append=True)
            ids.append(last)
        return ids

    @_persistence_errors
    def select_events(
        self,
        originator_id: UUID | str,
        *,
        gt: int | None = None,
        lte: int | None = None,
        desc: bool = False,
        limit: int | None = None,
    ) -> Sequence[StoredEvent]:
        log_db = self._db("log")
        index_db = self._db("log.index")
        with self.env.read() as txn:
            ids = _scan_sequence(txn, index_db, originator_id, gt, lte, desc, limit)
            return [StoredEvent(*_unpack(_get(txn, packed_id, log_db))) for packed_id in ids]

    @_persistence_errors
    def select_notifications(
        self,
        start: int | None,
        limit: int,
        stop: int | None = None,
        topics: Sequence[str] = (),
        *,
        inclusive_of_start: bool = True,
    ) -> Sequence[Notification]:
        first = 1 if start is None else (start if inclusive_of_start else start + 1)
        first = max(first, 1)
        wanted = frozenset(topics)
        found: list[Notification] = []
        if limit <= 0:
            return found
        log_db = self._db("log")
        with self.env.read() as txn:
            cursor: Any = txn.cursor(db=log_db)
            if not cursor.set_range(_U64.pack(first)):
                return found
            for key, value in cursor:
                notification_id = _position(key)
                if stop is not None and notification_id > stop:
                    break
                notification = _notification(value, notification_id)
                if wanted and notification.topic not in wanted:
                    continue
                found.append(notification)
                if len(found) >= limit:
                    break
        return found

    @_persistence_errors
    def max_notification_id(self) -> int | None:
        log_db = self._db("log")
        with self.env.read() as txn:
            cursor = txn.cursor(db=log_db)
            return _position(cursor.key()) if cursor.last() else None

    def subscribe(
        self, gt: int | None = None, topics: Sequence[str] = ()
    ) -> Subscription[ApplicationRecorder]:
        return LMDBSubscription(recorder=self, gt=gt, topics=topics)


E = TypeVar("E")


def checked_decoder(decode: Callable[[Notification], E], path: Path) -> Callable[[Notification], E]:
    """`decode` (an application mapper's ``to_domain_event``) for log entries of the ledger at
    `path`: whatever it raises on an entry (its state damaged so that the transcoder cannot
    read it, a topic that names no class, fields the event does not take) becomes
    `LedgerCorruptError` naming the ledger, the entry and what to do. Entries are read from
    disk, where LMDB keeps no checksums: a failure to decode one is damage to report."""

    def checked(notification: Notification) -> E:
        try:
            return decode(notification)
        except Exception as e:
            detail = " ".join(str(e).split())
            if len(detail) > 120:
                detail = detail[:117] + "..."
            raise damaged(
                path,
                f"log entry {notification.id} cannot be decoded ({type(e).__name__}: {detail})",
            ) from e

    return checked


def check_log(recorder: LMDBApplicationRecorder) -> int:
    """Read the whole log and its aggregate index in one snapshot and return how many events
    the log holds; `LedgerCorruptError` at the first entry that is not what `insert_events`
    writes: an envelope that does not decode, ids that are not 1, 2, 3, ..., an index entry
    that names a missing entry or one of another originator or version, or an entry the index
    does not name. For `storage.ledgercheck` (in a child process: a damaged page can abort
    the reader)."""
    log_db = recorder._db("log")
    index_db = recorder._db("log.index")
    with recorder.env.read() as txn:
        expected = 0
        log_cursor: Any = txn.cursor(db=log_db)
        for key, value in log_cursor.iternext():
            expected += 1
            position = _position(key)
            if position != expected:
                msg = f"the log jumps from entry {expected - 1} to {position}"
                raise LedgerCorruptError(msg)
            _unpack(value)
        indexed = 0
        index_cursor: Any = txn.cursor(db=index_db)
        for key, packed_id in index_cursor.iternext():
            indexed += 1
            oid, version, _topic, _state = _unpack(_get(txn, packed_id, log_db))
            if len(packed_id) != 8 or key != _event_key(oid, version):
                msg = f"the log index entry {bytes(key).hex()} names another event"
                raise LedgerCorruptError(msg)
        if indexed != expected:
            msg = f"the log holds {expected} events but its index names {indexed}"
            raise LedgerCorruptError(msg)
    return expected


class LMDBSubscription(ListenNotifySubscription[LMDBApplicationRecorder]):
    """Wakes at once on commits in this process and within the poll interval on others'."""

    def __init__(
        self, recorder: LMDBApplicationRecorder, gt: int | None = None, topics: Sequence[str] = ()
    ) -> None:
        super().__init__(recorder=recorder, gt=gt, topics=topics)
        recorder.env.listen(self._has_been_notified)

    def stop(self) -> None:
        super().stop()
        self._recorder.env.unlisten(self._has_been_notified)


class LMDBTrackingRecorder(LMDBRecorder, TrackingRecorder):
    """One row per upstream application: the last notification id it processed."""

    def __init__(self, env: LedgerEnv, namespace: str = "", *, create: bool = True) -> None:
        super().__init__(env, namespace, create=create)
        if create:
            self.create_table()

    def create_table(self) -> None:
        self._db("tracking")

    @_persistence_errors
    def insert_tracking(self, tracking: Tracking) -> None:
        record = self._tracking_writer(tracking)
        self.env.write(record)

    def _tracking_writer(self, tracking: Tracking) -> Any:
        """A function that records `tracking` in a write transaction (so views and process
        recorders can record it atomically with their own writes)."""
        db = self._db("tracking")
        key = tracking.application_name.encode()
        new = tracking.notification_id

        def record(txn: lmdb.Transaction) -> None:
            current = txn.get(key, db=db)
            if current is not None and _tracked(current) >= new:
                msg = (
                    f"tracking {tracking.application_name}:{new} is not after the recorded "
                    f"position {_tracked(current)}"
                )
                raise IntegrityError(msg)
            txn.put(key, _U64.pack(new), db=db)

        return record

    @_persistence_errors
    def max_tracking_id(self, application_name: str) -> int | None:
        db = self._db("tracking")
        with self.env.read() as txn:
            value = txn.get(application_name.encode(), db=db)
            return None if value is None else _tracked(value)

    def wait(
        self,
        application_name: str,
        notification_id: int | None,
        timeout: float = 1.0,
        interrupt: threading.Event | None = None,
    ) -> None:
        """As the base class, but woken by commits rather than by a 100-800 ms backoff."""
        deadline = monotonic() + timeout
        woken = threading.Event()
        self.env.listen(woken)
        try:
            while not self.has_tracking_id(application_name, notification_id):
                if interrupt is not None and interrupt.is_set():
                    raise WaitInterruptedError
                remaining = deadline - monotonic()
                if remaining <= 0:
                    msg = (
                        f"Timed out waiting for notification {notification_id} "
                        f"from application '{application_name}' to be processed"
                    )
                    raise TimeoutError(msg)
                woken.wait(min(remaining, 0.1))
                woken.clear()
        finally:
            self.env.unlisten(woken)


class LMDBProcessRecorder(LMDBTrackingRecorder, LMDBApplicationRecorder, ProcessRecorder):
    """Events and the tracking record of the notification that caused them, atomically."""

    def __init__(self, env: LedgerEnv, namespace: str = "", *, create: bool = True) -> None:
        super().__init__(env, namespace, create=create)

    def create_table(self) -> None:
        LMDBTrackingRecorder.create_table(self)
        LMDBApplicationRecorder.create_table(self)

    def _prepare_extra(self, **kwargs: Any) -> Any:
        tracking: Tracking | None = kwargs.get("tracking")
        return None if tracking is None else self._tracking_writer(tracking)


class LMDBFactory(InfrastructureFactory[LMDBTrackingRecorder]):
    """Builds the recorders of one application on its ledger (see the module docstring)."""

    LMDB_PATH = settings.LMDB_PATH
    LMDB_MAP_SIZE = settings.LMDB_MAP_SIZE
    LMDB_MAX_MAP_SIZE = settings.LMDB_MAX_MAP_SIZE
    LMDB_DURABILITY = settings.LMDB_DURABILITY
    LMDB_POLL_INTERVAL = settings.LMDB_POLL_INTERVAL
    CREATE_TABLE = "CREATE_TABLE"
    LMDB_READONLY = settings.LMDB_READONLY

    aggregate_recorder_class = LMDBAggregateRecorder
    application_recorder_class = LMDBApplicationRecorder
    tracking_recorder_class = LMDBTrackingRecorder
    process_recorder_class = LMDBProcessRecorder

    @_persistence_errors
    def __init__(self, env: Environment | EnvType | None):
        super().__init__(env)
        path = self.env.get(self.LMDB_PATH)
        if not path:
            keys = ", ".join(self.env.create_keys(self.LMDB_PATH))
            msg = f"LMDB ledger path not found in environment with keys: {keys}"
            raise OSError(msg)
        # Read as `LedgerStore` reads them before it makes its application (storage.settings).
        self._settings = settings.Settings(self.env.name, dict(self.env))
        config = self._settings.env_config()
        self.ledger = open_env(path, config)
        self._closed = False
        name = self.env.name.lower()
        self.namespace = f"{name}." if name else ""

    def _create(self) -> bool:
        return self._settings.flag(self.CREATE_TABLE, True)

    @_persistence_errors
    def aggregate_recorder(self, purpose: str = "events") -> AggregateRecorder:
        return self.aggregate_recorder_class(
            self.ledger, self.namespace, purpose=purpose, create=self._create()
        )

    @_persistence_errors
    def application_recorder(self) -> ApplicationRecorder:
        cls: type[LMDBApplicationRecorder] = self.application_recorder_class
        topic = self.env.get(self.APPLICATION_RECORDER_TOPIC)
        if topic:
            cls = resolve_topic(topic)
            assert issubclass(cls, LMDBApplicationRecorder)
        return cls(self.ledger, self.namespace, create=self._create())

    @_persistence_errors
    def tracking_recorder(
        self, tracking_recorder_class: type[LMDBTrackingRecorder] | None = None
    ) -> LMDBTrackingRecorder:
        cls = tracking_recorder_class
        if cls is None:
            topic = self.env.get(self.TRACKING_RECORDER_TOPIC)
            cls = resolve_topic(topic) if topic else self.tracking_recorder_class
        assert cls is not None and issubclass(cls, LMDBTrackingRecorder)
        return cls(self.ledger, self.namespace, create=self._create())

    @_persistence_errors
    def process_recorder(self) -> ProcessRecorder:
        cls: type[LMDBProcessRecorder] = self.process_recorder_class
        topic = self.env.get(self.PROCESS_RECORDER_TOPIC)
        if topic:
            cls = resolve_topic(topic)
            assert issubclass(cls, LMDBProcessRecorder)
        return cls(self.ledger, self.namespace, create=self._create())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            release_env(self.ledger)


Factory = LMDBFactory
