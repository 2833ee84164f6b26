"""Runs the folds: incrementally inside each append, or over the whole log (rebuild, verify).

The runner holds no state of its own; the view host (storage) keeps the tables, the log and
the live-namespace pointer, and the folds (`views.apply`) decide what the tables say.
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeAlias

from imageledger.domain.errors import LedgerCorruptError
from imageledger.domain.log import get_logger
from imageledger.domain.model import RebuildReport
from imageledger.domain.ports import ViewRecords
from imageledger.projections.views import APPEND_ONLY, PRESENT_ONLY, TABLES, apply, mark

log = get_logger(__name__)

if TYPE_CHECKING:  # a query loads no eventsourcing (see `domain.history`)
    from concurrent.futures import Future

    from eventsourcing.domain import DomainEventProtocol
    from eventsourcing.persistence import Notification

    Decode: TypeAlias = Callable[[Notification], DomainEventProtocol[Any]]
    Fold: TypeAlias = Callable[[ViewRecords, Sequence[Notification]], None]
Progress = Callable[[int, int], None]
Records: TypeAlias = dict[str, dict[bytes, Any]]

CHECKPOINT_EVERY = 10_000  # not Final: the tests and the benchmark's peer set it
"""The views are kept as they were after every this-many events (view checkpoints), so that
the cache as it was at any position (`LedgerStore.at`) is the nearest checkpoint below it plus
a replay of at most this many events: about 0.2 s of folding on the machines we measure
(docs/benchmarks.md), whatever the log's length. Each checkpoint holds the views' records but
not the append-only tables, so its size follows the cache's size, not the log's: with 10,000
references over a 1,000,000-event log they take a fraction of the log's disk (measured by
`imageledger bench timetravel`). Positions are multiples of this number, so a replay from any
checkpoint (a rebuild, `at`) meets the same ones."""


STREAMED_ROWS: Final = 100_000
"""A rebuild writes the streamed rows (the history index: one or two an event) out once this
many have gathered (~12 MB of them), not after every batch of the log it reads. Their keys
(reference, then position) are spread over the whole table, so each write transaction dirties
leaf pages all over it and writes them all back at its commit: written after every batch of
5,000 events, a rebuild of 1,000,000 events wrote 2.5 GB of pages (9.7 GB reached the disk)
where it now writes 0.3 GB (1.0 GB), and its wall time went from 27-40 s to ~20 s (measured:
docs/benchmarks.md). 200,000 rows gained nothing more."""


class ViewHost(Protocol):
    """Where views live: two namespaces, one live; the log they are folded from."""

    def spare(self) -> str: ...

    def clear(self, namespace: str) -> None: ...

    def head(self) -> int: ...

    def read_log(self, after: int, limit: int) -> Sequence[Notification]: ...

    def load(self, namespace: str, tables: dict[str, dict[bytes, Any]]) -> None:
        """Write rows {table: {key: value}} into `namespace` as they are (one transaction)."""

    def finish(
        self, namespace: str, after: int, fold: Any, *, activate: bool
    ) -> dict[str, tuple[str, str]]: ...

    def damage(self, error: LedgerCorruptError) -> BaseException:
        """`error`, damage found in what the host stores, as the host reports it (naming
        where it is and what to do)."""

    def checkpoint(
        self, position: int, view: MemoryView, *, keep: bool
    ) -> Callable[[], tuple[str, str]]:
        """Compare the view checkpoint stored at `position` with `view` (the views replayed
        to it) and, if `keep`, store them there. What it reads of `view` is read before it
        returns (the replay goes on changing it); the rest is done by the function it
        returns, which the runner calls in a thread of its own while it replays on, and
        which returns the digests (stored, replayed): both empty when none is stored
        (checkpoints are made lazily: a missing one is not damage)."""


def folder(decode: Decode) -> Fold:
    """The fold of a batch of log entries, in log order.

    A log entry that does not decode (its stored state or topic damaged; LMDB keeps no
    checksums) is `LedgerCorruptError` naming its position, whatever the mapper raised: a
    replay must stop at it, and the view host names the ledger (`ViewHost.damage`)."""

    def fold(view: ViewRecords, notifications: Sequence[Notification]) -> None:
        event = None
        for notification in notifications:
            try:
                event = decode(notification)
            except Exception as e:
                raise undecodable(notification, e) from e
            apply(view, event, notification.id)
        if event is not None:
            mark(view, event, notifications[-1].id)

    return fold


def next_checkpoint(position: int) -> int:
    """The first checkpoint position after `position`."""
    return (position // CHECKPOINT_EVERY + 1) * CHECKPOINT_EVERY


def undecodable(notification: Notification, error: Exception) -> LedgerCorruptError:
    """The error of a log entry the mapper could not turn into an event (itself, when the
    decoder already said which entry: see `storage.ledger.checked_decoder`)."""
    if isinstance(error, LedgerCorruptError) and f"log entry {notification.id} " in str(error):
        return error
    text = " ".join(str(error).split())
    if len(text) > 120:
        text = text[:117] + "..."
    what = error if isinstance(error, LedgerCorruptError) else f"{type(error).__name__}: {text}"
    return LedgerCorruptError(f"log entry {notification.id} cannot be decoded ({what})")


class MemoryView:
    """The views while a rebuild replays the log: records live decoded in plain dicts, so
    the folds pay no encoding, decoding or LMDB lookup per event. Rows of the `streamed`
    tables (written once per event, never read back by a fold) are not kept: `take` hands
    them over now and then (a get on them sees only the rows not taken yet). Memory therefore
    follows the cache's size (references, manifests, blobs, holders), not the log's length."""

    def __init__(
        self, tables: Sequence[str], streamed: Sequence[str], records: Records | None = None
    ) -> None:
        """Empty views, or the `records` of a view checkpoint (taken over, not copied)."""
        self._tables: Records = {table: {} for table in tables}
        if records is not None:
            self._tables.update((t, rows) for t, rows in records.items() if t in self._tables)
        self._streamed = tuple(streamed)
        # Each kept row's packed bytes, for `packed` (checkpoints), until the row changes.
        self._packed: dict[str, dict[bytes, bytes]] = {table: {} for table in tables}

    def get(self, table: str, key: bytes) -> Any:
        return self._tables[table].get(key)

    def put(self, table: str, key: bytes, value: Any) -> None:
        self._tables[table][key] = value
        self._packed[table].pop(key, None)

    def delete(self, table: str, key: bytes) -> None:
        self._tables[table].pop(key, None)
        self._packed[table].pop(key, None)

    def packed(self, table: str, pack: Callable[[Any], bytes]) -> tuple[int, bytes]:
        """The rows of `table` in key order, each as `pack(key) + pack(value)`, joined, and
        how many there are: the body of the table as one MessagePack map (`ViewCheckpoints`
        frames it). A row's bytes are kept until the fold puts or deletes it again, so a
        checkpoint packs only the rows changed since the one before (a few thousand of the
        ~50,000 in 10,000 events of the benchmark's ledger; packing them all was most of a
        checkpoint's cost). Sound because every fold writes a row it changed back through
        `put` (the LMDB views would lose the change otherwise: semantics 10), and no two
        rows share a mutable value."""
        rows = self._tables[table]
        memo = self._packed[table]
        keys = sorted(rows)
        parts: list[Any] = list(map(memo.get, keys))  # in C: most rows are there
        for i in [i for i, data in enumerate(parts) if data is None]:
            key = keys[i]
            parts[i] = memo[key] = pack(key) + pack(rows[key])
        return len(parts), b"".join(parts)

    def take(self) -> dict[str, dict[bytes, Any]]:
        """The streamed tables' rows written since the last call."""
        taken = {table: self._tables[table] for table in self._streamed}
        self._tables.update((table, {}) for table in self._streamed)
        return taken

    def streaming(self) -> int:
        """How many streamed rows were written since the last `take`."""
        return sum(len(self._tables[table]) for table in self._streamed)

    def records(self) -> dict[str, dict[bytes, Any]]:
        """Every kept record."""
        return {t: rows for t, rows in self._tables.items() if t not in self._streamed}

    def checkpointed(self) -> list[str]:
        """The tables a view checkpoint holds, in name order: the kept ones a past state
        needs (`views.PRESENT_ONLY`)."""
        return sorted(t for t in self.records() if t not in PRESENT_ONLY)


def rebuild(
    host: ViewHost,
    decode: Decode,
    *,
    verify_only: bool = False,
    batch: int = 5000,
    progress: Progress | None = None,
) -> RebuildReport:
    """Replay the whole log into the spare namespace, then compare it with the live views and
    (unless `verify_only`) make it live. The replay folds into a `MemoryView` and writes out
    only the streamed rows per batch and the records once at the end. Appends may go on
    meanwhile: the entries after the replay are folded, compared and activated in one
    transaction. One rebuild at a time per ledger (the caller's lock): two would share
    the spare namespace."""
    with collector_paused():
        try:
            return _rebuild(host, decode, verify_only, batch, progress)
        except LedgerCorruptError as e:
            damage = host.damage(e)
            if damage is e:
                raise
            raise damage from e


@contextmanager
def collector_paused() -> Iterator[None]:
    """A replay allocates millions of objects that live on (the records) or die young by
    reference counting; none form cycles. The cyclic collector would keep scanning the
    growing heap for nothing (measured: 40-80% on top of the replay), so it is paused for the
    rebuild and resumed after, if it was running. Process-wide, like every gc switch: other
    threads' cyclic garbage waits for the end of the rebuild."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _rebuild(
    host: ViewHost,
    decode: Decode,
    verify_only: bool,
    batch: int,
    progress: Progress | None,
) -> RebuildReport:
    fold = folder(decode)
    namespace = host.spare()
    host.clear(namespace)
    total = host.head()
    done = 0
    after = 0
    memory = MemoryView(TABLES, APPEND_ONLY)
    stored, replayed = hashlib.sha256(), hashlib.sha256()
    # Each checkpoint is packed here, then compared and stored by one worker while the replay
    # goes on (`ViewHost.checkpoint`), in position order.
    from concurrent.futures import ThreadPoolExecutor  # a query never rebuilds: loaded here

    settled: list[Future[tuple[str, str]]] = []
    with ThreadPoolExecutor(1, thread_name_prefix="imageledger-checkpoints") as settling:
        while True:
            notifications = host.read_log(after, min(batch, next_checkpoint(after) - after))
            if not notifications:
                break
            fold(memory, notifications)
            if memory.streaming() >= STREAMED_ROWS:
                host.load(namespace, memory.take())
            after = notifications[-1].id
            done += len(notifications)
            if after % CHECKPOINT_EVERY == 0:
                settle = host.checkpoint(after, memory, keep=not verify_only)
                settled.append(settling.submit(settle))
            if progress is not None:
                progress(done, max(total, done))
        host.load(namespace, {**memory.take(), **memory.records()})
        del memory
        for future in settled:
            found, made = future.result()
            stored.update(found.encode())
            replayed.update((found and made).encode())
    tables = host.finish(namespace, after, fold, activate=not verify_only)
    # The checkpoints that were stored, each compared with the replay at its position.
    tables["views.checkpoints"] = (stored.hexdigest(), replayed.hexdigest())
    if verify_only:
        host.clear(namespace)
    report = RebuildReport(events=done, activated=not verify_only, tables=tables)
    log.info("views.rebuilt", events=done, verify_only=verify_only, identical=report.identical)
    return report
