"""The ledger as the application service sees it (`LedgerStore`, the domain's `Ledger` port).

The log is kept by an eventsourcing application (`storage.ledgerapp`) on the LMDB persistence
module (`storage.ledger`); the views are folded in each append's transaction. `LedgerStore`
opens the LMDB environment and the views itself and makes the application only when a
command first needs it (an append, the log read back, a rebuild): a query reads the views and
loads no eventsourcing, no event class and no mapper (issue 10: their import was a fifth of a
command-line query's time).

The format is stored in the ledger (``imageledger.format``, key ``version``), written when the
ledger is made; a ledger that holds events but no format is format 1. Opening a ledger in any
format but 2 is `LedgerFormatError`, before anything reads an event: bytes of another format
are never decoded as if they were format 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from imageledger.domain.errors import (
    LedgerCorruptError,
    LedgerError,
    LedgerFormatError,
    LedgerReadOnlyError,
)
from imageledger.domain.log import get_logger
from imageledger.domain.model import ImageConfig, RebuildReport
from imageledger.domain.ports import AppendConflict
from imageledger.projections import runner
from imageledger.projections.runner import MemoryView, collector_paused, folder, rebuild
from imageledger.projections.views import FORMAT as VIEWS_FORMAT
from imageledger.projections.views import PRESENT_ONLY, TABLES, ViewState
from imageledger.storage import layout
from imageledger.storage.home import Dir
from imageledger.storage.leases import StoreLock
from imageledger.storage.ledgercheck import check_ledger
from imageledger.storage.lmdbenv import LedgerEnv, open_env, release_env
from imageledger.storage.settings import (
    APPLICATION,
    LMDB_DURABILITY,
    LMDB_PATH,
    LMDB_READONLY,
    LOG_DB,
    Settings,
)
from imageledger.storage.viewstore import LMDBViews, MemoryViewTxn

if TYPE_CHECKING:
    from eventsourcing.domain import DomainEventProtocol
    from eventsourcing.persistence import Notification

    from imageledger.storage.ledger import LMDBApplicationRecorder
    from imageledger.storage.ledgerapp import LedgerApplication
    from imageledger.storage.ledgerformat import LedgerMapper
    from imageledger.storage.tlog import Records, TreeReplayer, TreeStore

log = get_logger(__name__)

_FORMAT_DB: Final = b"imageledger.format"
_LEDGER_MODULE: Final = "imageledger.storage.ledger"  # the persistence module


FORMAT_VERSION: Final = 2
"""The format of the stored events this version writes and reads (docs/FORMAT.md)."""


def stored_format(env: LedgerEnv, has_events: Callable[[], bool]) -> int | str | None:
    """The format a ledger says its events are in: the number stored in it, else 1 if it
    holds events (format 1 stored none), else None (an empty ledger: no format yet). A
    stored value that is not a number comes back as its text. `has_events` is asked only
    when no format is stored (it reads the log, which a query need not load)."""
    found = None
    if env.exists(_FORMAT_DB.decode()):
        db = env.db(_FORMAT_DB.decode(), create=False)
        with env.read() as txn:
            value = txn.get(b"version", db=db)
        found = None if value is None else bytes(value)
    if found is None:
        return 1 if has_events() else None
    try:
        return int(found)
    except ValueError:
        return repr(found[:20])


class LedgerStore:
    """A home's ledger as the application service sees it (the domain's `Ledger` port): the
    views read in snapshots, appends folded into them in the same transaction, the log read
    back by position, rebuilds and the child-process check."""

    def __init__(
        self,
        home: Dir,
        *,
        read_only: bool,
        durability: str | None = None,
        name: str = layout.LEDGER,
    ) -> None:
        """The ledger at `name` in `home` (another name only while `imageledger migrate`
        writes a new ledger beside the old one)."""
        self.path = home.path / name
        self._read_only = read_only
        self._settings = {LMDB_PATH: str(self.path), LMDB_READONLY: "yes" if read_only else "no"}
        if durability:
            self._settings[LMDB_DURABILITY] = durability
        # Configured exactly as the application's persistence module will configure it (one
        # environment per path per process: the first opener's configuration holds).
        config = Settings(APPLICATION, {**os.environ, **self._settings}).env_config()
        self._env = open_env(self.path, config)
        self._app: LedgerApplication | None = None
        self._app_lock = threading.RLock()  # attaching the fold asks for the recorder
        try:
            self.views = LMDBViews(self._env, TABLES, self._recorder, VIEWS_FORMAT, LOG_DB)
            self._check_format(read_only)
        except BaseException:
            release_env(self._env)
            raise
        # Two rebuilds would fill the same spare namespace at once: one at a time per home.
        self._rebuild_lock = StoreLock(home, layout.REBUILD_LOCK, readonly=read_only)

    def _application(self) -> LedgerApplication:
        """The eventsourcing application, made on first use (see the module docstring)."""
        with self._app_lock:
            if self._app is None:
                from imageledger.storage.ledger import checked_decoder
                from imageledger.storage.ledgerapp import LedgerApplication

                settings = {"PERSISTENCE_MODULE": _LEDGER_MODULE, **self._settings}
                app = LedgerApplication(env=settings)
                mapper = app.ledger_mapper
                mapper.configs = self._config
                self._decode = checked_decoder(mapper.to_domain_event, self.path)
                self._mapper = mapper
                self._app = app
                try:
                    # The fold names a damaged entry itself (`runner.undecodable`), and the
                    # views' host the ledger: it takes the mapper's decoder as it is, one
                    # frame less an event.
                    self.views.attach(folder(mapper.to_domain_event))
                    # ... and the audit log's tree, from the stored records themselves, once
                    # per commit (a group commit of eight appends folds eight leaves at once).
                    records = self._recorder().records_after
                    tree = self.tree
                    self._env.before_commit("audit.tree", lambda txn: tree.fold(txn, records))
                except BaseException:
                    self._app = None
                    app.close()
                    raise
            return self._app

    def _recorder(self) -> LMDBApplicationRecorder:
        from imageledger.storage.ledger import LMDBApplicationRecorder

        recorder = self._application().recorder
        assert isinstance(recorder, LMDBApplicationRecorder)
        return recorder

    @functools.cached_property
    def tree(self) -> TreeStore:
        """The audit log's tree (`storage.tlog`), opened when an append or the audit first
        needs it: a query neither loads nor opens it."""
        from imageledger.storage.tlog import TreeStore

        return TreeStore(self._env)

    def catch_up_tree(self) -> None:
        """Give a ledger made before the audit log (or last written by a version without it)
        its tree now, in one write transaction (the same fold every commit runs), so that
        the audit log covers the whole history before anything is asked of it."""
        with self.tree.read() as txn:
            size = self.tree.size(txn)
        if size >= self.head():
            return
        records = self.records()
        self._env.write(lambda txn: self.tree.fold(txn, records))

    def records(self) -> Records:
        """The reader of the log's stored records, undecoded (the audit log's leaves)."""
        return self._recorder().records_after

    def log_records(self) -> Iterator[tuple[int, bytes]]:
        """(position, stored record) of the whole log as it is now, oldest first, read in
        short transactions (a long read would pin every page written meanwhile)."""
        records = self.records()
        head, after = self.head(), 0
        while after < head:
            with self._env.read() as txn:
                batch = list(itertools.islice(records(txn, after), min(10_000, head - after)))
            if not batch:
                return
            yield from batch
            after = batch[-1][0]

    def import_log(
        self,
        records: Iterable[tuple[int, bytes]],
        progress: Callable[[int, int], None] | None = None,
        total: int = 0,
    ) -> RebuildReport:
        """Store another ledger's log, record for record at the same positions, in this empty
        one (a debug bundle's replay), then fold the views, their checkpoints and the audit
        tree from it (`rebuild`). A record not in the stored form is `LedgerCorruptError`."""
        if self.head():
            msg = f"{self.path}: holds events already; a log is imported into a new ledger only"
            raise LedgerError(msg)
        recorder = self._recorder()
        batch: list[bytes] = []
        done = 0
        for position, record in records:
            batch.append(record)
            if len(batch) == 5000:
                done = recorder.insert_records(batch)[-1]
                batch = []
                if progress is not None:
                    progress(done, max(total, done))
            if position != done + len(batch):
                msg = f"the log skips to position {position} after {done + len(batch) - 1}"
                raise LedgerCorruptError(msg)
        if batch:
            recorder.insert_records(batch)
        return self.rebuild(verify=False, progress=None)

    def view_digests(self) -> dict[str, str]:
        """Each live view table's digest (as `rebuild` reports them)."""
        return self.views.digests()

    def _ledger_mapper(self) -> LedgerMapper:
        self._application()
        return self._mapper

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[ViewState]:
        with self.views.read() as view:
            yield ViewState(view)

    def append(self, events: Sequence[DomainEventProtocol[Any]]) -> None:
        from eventsourcing.persistence import RecordConflictError

        app = self._application()
        try:
            with self._mapper.batch():
                app.save(*events)
        except RecordConflictError as e:
            raise AppendConflict(str(e)) from e

    def _config(self, digest: str) -> ImageConfig | None:
        """A config the views hold (the mapper resolves configs named by digest with it)."""
        with self.snapshot() as state:
            return state.config(digest)

    def _check_format(self, read_only: bool) -> None:
        env = self._env
        found = stored_format(env, lambda: bool(self.views.head()))
        if found is None and not read_only:
            db = env.db(_FORMAT_DB.decode())
            version = str(FORMAT_VERSION).encode()
            env.write(lambda txn: txn.put(b"version", version, db=db, overwrite=False))
        elif found is not None and found != FORMAT_VERSION:
            raise LedgerFormatError(self.path, found)

    def events(self, reference: str | None) -> list[tuple[int, DomainEventProtocol[Any]]]:
        self._application()
        if reference is not None:
            with self.views.read() as view:
                logged = self.views.log_at(view, ViewState(view).history(reference))
            return [(n.id, self._decode(n)) for n in logged]
        found: list[tuple[int, DomainEventProtocol[Any]]] = []
        after = 0
        recorder = self._recorder()
        while batch := recorder.select_notifications(after, 1000, inclusive_of_start=False):
            found.extend((n.id, self._decode(n)) for n in batch)
            after = batch[-1].id
        return found

    def rebuild(
        self, *, verify: bool, progress: Callable[[int, int], None] | None
    ) -> RebuildReport:
        decode = self._ledger_mapper().to_domain_event
        recorder = self._recorder()
        with self._rebuild_lock():
            # The audit tree is derived from the log too: replayed from the records the views'
            # replay reads (the log is read once), compared, and (unless only verifying)
            # replaced where it differs.
            replayer = self.tree.replayer()
            host = _ReadOnce(self.views, self._env, recorder, replayer)
            report = rebuild(host, decode, verify_only=verify, progress=progress)
            tree = self.tree.replay(recorder.records_after, repair=not verify, replayer=replayer)
        tables = {**report.tables, "audit.tiles": (tree.stored_digest, tree.digest)}
        return dataclasses.replace(report, tables=tables)

    # ------------------------------------------------------------------ the past

    def head(self) -> int:
        """The log's last position (0: empty)."""
        with self.snapshot() as state:
            return state.position

    def position_at(self, when: datetime) -> int:
        """The last position whose event happened at or before `when` (0: none did). Events
        are numbered in commit order and stamped just before it, so their instants rise with
        their positions (a clock set back between two commands breaks that, and then this
        answers for one of the stretches where it holds): a binary search over the stored
        records' instants, O(log n) of them decoded."""
        from imageledger.storage.ledgerformat import record_instant

        records = self._recorder().records_after
        head = self.head()
        with self._env.read() as txn:

            def instant(position: int) -> datetime:
                for _found, record in records(txn, position - 1):
                    return record_instant(record)
                msg = f"the log has no entry {position}"
                raise LedgerError(msg)

            low, high = 0, head  # instant(low) <= when < instant(high + 1), by the search
            while low < high:
                middle = (low + high + 1) // 2
                if instant(middle) <= when:
                    low = middle
                else:
                    high = middle - 1
            return low

    def at(self, position: int) -> PastLedger:
        """The ledger as it was after the event at `position`: the nearest view checkpoint
        below it (`runner.CHECKPOINT_EVERY`) and the log after it replayed into views held
        in memory (`MemoryView`), read through the same `ViewState`. On a home it may write,
        it leaves behind the checkpoints it replayed through and did not find, so the first
        `at` far from any checkpoint pays for the later ones (`rebuild` makes them all)."""
        decode = self._ledger_mapper().to_domain_event
        fold = folder(decode)
        keep = not self._read_only
        with collector_paused():
            found = self.views.checkpoints.nearest(position)
            after, records = found if found is not None else (0, None)
            view = MemoryView(TABLES, PRESENT_ONLY, records)
            while after < position:
                limit = min(5000, position - after, runner.next_checkpoint(after) - after)
                batch = self.views.read_log(after, limit)
                if not batch:
                    break
                fold(view, list(batch))
                view.take()  # no past query reads them (`views.PRESENT_ONLY`)
                after = batch[-1].id
                if keep and after % runner.CHECKPOINT_EVERY == 0:
                    self.views.checkpoints.keep(after, view)
        return PastLedger(self, position, view.records())

    def check(self) -> LedgerError | None:
        return check_ledger(self.path).error()

    def disk(self) -> tuple[int, int]:
        checkpoints, log_bytes = self.views.checkpoints.disk()
        return log_bytes, checkpoints

    def current(self) -> bool:
        """Whether the views are in this version's layout (or hold nothing yet)."""
        with self.snapshot() as state:
            found = state.format
        return found == VIEWS_FORMAT or not self.views.head()

    def upgrade(self) -> None:
        """Views written in another layout (`views.FORMAT`, by another imageledger version)
        are rebuilt from the log before anything reads them: the log is the state, views are
        only a cache of it. The caller checks the home is writable."""
        decode = self._ledger_mapper().to_domain_event
        with self._rebuild_lock():
            with self.snapshot() as state:
                found = state.format
            if found != VIEWS_FORMAT and self.views.head():
                log.warning("views.format_changed", found=found, wanted=VIEWS_FORMAT)
                rebuild(self.views, decode, verify_only=False)

    def close(self) -> None:
        with self._app_lock:
            app, self._app = self._app, None
        if app is not None:
            app.close()
        release_env(self._env)


class _ReadOnce:
    """The views as a rebuild's host (`runner.ViewHost`), whose log reads also feed the
    audit tree's replay the stored records they read: a rebuild reads the log once for both
    (the tree's leaves are the records themselves; a second full read was ~10% of a
    rebuild)."""

    def __init__(
        self,
        views: LMDBViews,
        env: LedgerEnv,
        recorder: LMDBApplicationRecorder,
        tree: TreeReplayer,
    ) -> None:
        self._views = views
        self._env = env
        self._recorder = recorder
        self._tree = tree

    def read_log(self, after: int, limit: int) -> Sequence[Notification]:
        with self._env.read() as txn:
            records = list(itertools.islice(self._recorder.records_after(txn, after), limit))
            self._tree.add(txn, records)
        return self._recorder.notifications(records)

    def spare(self) -> str:
        return self._views.spare()

    def clear(self, namespace: str) -> None:
        self._views.clear(namespace)

    def head(self) -> int:
        return self._views.head()

    def load(self, namespace: str, tables: dict[str, dict[bytes, Any]]) -> None:
        self._views.load(namespace, tables)

    def finish(
        self, namespace: str, after: int, fold: Any, *, activate: bool
    ) -> dict[str, tuple[str, str]]:
        return self._views.finish(namespace, after, fold, activate=activate)

    def damage(self, error: LedgerCorruptError) -> BaseException:
        return self._views.damage(error)

    def checkpoint(
        self, position: int, view: MemoryView, *, keep: bool
    ) -> Callable[[], tuple[str, str]]:
        return self._views.checkpoint(position, view, keep=keep)


class PastLedger:
    """The `Ledger` port as it was at one position (read only): `LedgerStore.at`."""

    def __init__(
        self, live: LedgerStore, position: int, tables: dict[str, dict[bytes, Any]]
    ) -> None:
        self.live = live
        self.position = position
        self._tables = tables

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[ViewState]:
        yield ViewState(MemoryViewTxn(self._tables))

    def append(self, events: Sequence[DomainEventProtocol[Any]]) -> None:
        msg = f"the cache as it was at position {self.position} cannot be changed"
        raise LedgerReadOnlyError(msg)

    def events(self, reference: str | None) -> list[tuple[int, DomainEventProtocol[Any]]]:
        return [(p, e) for p, e in self.live.events(reference) if p <= self.position]

    def rebuild(
        self, *, verify: bool, progress: Callable[[int, int], None] | None
    ) -> RebuildReport:
        msg = "a past state is not rebuilt: rebuild the cache itself"
        raise LedgerReadOnlyError(msg)

    def check(self) -> LedgerError | None:
        return self.live.check()

    def disk(self) -> tuple[int, int]:
        return self.live.disk()

    def head(self) -> int:
        return self.position

    def position_at(self, when: datetime) -> int:
        return min(self.live.position_at(when), self.position)

    def at(self, position: int) -> PastLedger:
        return self.live.at(min(position, self.position))
