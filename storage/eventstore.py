"""The eventsourcing application whose log a home's ledger holds, and the ledger as the
application service sees it (`LedgerStore`).

`LedgerApplication` stores imageledger's events in format 2 (`storage.ledgerformat`,
docs/FORMAT.md). It is one class, so that the cache and the ledger check
(`storage.ledgercheck`, which decodes every stored event as the cache does) cannot disagree
about how the log is read. `FormatOneApplication` reads a ledger written before format 2
(the generic canonical transcoder, `storage.transcoder`), for `imageledger migrate` only.

The format is stored in the ledger (``imageledger.format``, key ``version``), written when the
ledger is made; a ledger that holds events but no format is format 1. Opening a ledger in any
format but 2 is `LedgerFormatError`, before anything reads an event: bytes of another format
are never decoded as if they were format 2.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

from eventsourcing.application import Application
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Mapper, RecordConflictError, Transcoder
from eventsourcing.utils import get_topic

from imageledger.domain.errors import LedgerError, LedgerFormatError
from imageledger.domain.events import TRANSCODINGS
from imageledger.domain.log import get_logger
from imageledger.domain.model import ImageConfig, RebuildReport
from imageledger.domain.ports import AppendConflict
from imageledger.projections.runner import folder, rebuild
from imageledger.projections.views import FORMAT as VIEWS_FORMAT
from imageledger.projections.views import TABLES, ViewState
from imageledger.storage import layout
from imageledger.storage.home import Dir
from imageledger.storage.leases import StoreLock
from imageledger.storage.ledger import LMDBApplicationRecorder, LMDBFactory, checked_decoder
from imageledger.storage.ledgercheck import check_ledger
from imageledger.storage.ledgerformat import FORMAT_VERSION, LedgerMapper
from imageledger.storage.lmdbenv import LedgerEnv
from imageledger.storage.transcoder import MsgpackTranscoder, StoredEventMapper
from imageledger.storage.viewstore import LMDBViews

log = get_logger(__name__)

_FORMAT_DB: Final = b"imageledger.format"


def stored_format(env: LedgerEnv, has_events: bool) -> int | str | None:
    """The format a ledger says its events are in: the number stored in it, else 1 if it
    holds events (format 1 stored none), else None (an empty ledger: no format yet). A
    stored value that is not a number comes back as its text."""
    with env.read() as txn:
        exists = txn.get(_FORMAT_DB) is not None  # named databases are keys of the main one
    found = None
    if exists:
        db = env.db(_FORMAT_DB.decode(), create=False)
        with env.read() as txn:
            value = txn.get(b"version", db=db)
        found = None if value is None else bytes(value)
    if found is None:
        return 1 if has_events else None
    try:
        return int(found)
    except ValueError:
        return repr(found[:20])


def ledger_transcoder() -> MsgpackTranscoder:
    """Format 1's transcoder: the canonical msgpack transcoder with the domain's value types
    registered."""
    transcoder = MsgpackTranscoder()
    for transcoding in TRANSCODINGS:
        transcoder.register(transcoding)
    return transcoder


class LedgerApplication(Application[Any]):
    """The eventsourcing application that stores the ledger's events, in format 2. Stored
    events are read from disk, where LMDB keeps no checksums: one that cannot become a domain
    event is damage (`LedgerCorruptError`), never a raw TypeError."""

    name = "imageledger"

    def construct_mapper(self) -> Mapper[Any]:
        return LedgerMapper()

    @property
    def ledger_mapper(self) -> LedgerMapper:
        mapper = self.mapper
        assert isinstance(mapper, LedgerMapper)
        return mapper


class FormatOneApplication(Application[Any]):
    """A ledger written in format 1 (the generic canonical msgpack transcoder with the
    domain's value types): read by `imageledger migrate`, never appended to."""

    name = "imageledger"

    def construct_mapper(self) -> Mapper[Any]:
        return self.factory.mapper(
            transcoder=self.construct_transcoder(), mapper_class=StoredEventMapper
        )

    def construct_transcoder(self) -> Transcoder:
        return ledger_transcoder()


class LedgerStore:
    """A home's ledger as the application service sees it (the domain's `Ledger` port): the
    eventsourcing application on LMDB, the views folded in each append's transaction, the
    log read back by position, rebuilds and the child-process check."""

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
        env = {
            "PERSISTENCE_MODULE": get_topic(LMDBFactory),
            "LMDB_PATH": str(self.path),
            "LMDB_READONLY": "yes" if read_only else "no",
        }
        if durability:
            env["LMDB_DURABILITY"] = durability
        self._app = LedgerApplication(env=env)
        recorder = self._app.recorder
        assert isinstance(recorder, LMDBApplicationRecorder)
        self._recorder = recorder
        self.views = LMDBViews(recorder.env, recorder, TABLES)
        self._mapper = self._app.ledger_mapper
        self._mapper.configs = self._config
        self._decode = checked_decoder(self._mapper.to_domain_event, self.path)
        # The fold names a damaged entry itself (`runner.undecodable`), and the views' host
        # the ledger: it takes the mapper's decoder as it is, one frame less an event.
        self.views.attach(folder(self._mapper.to_domain_event))
        try:
            self._check_format(read_only)
        except BaseException:
            self._app.close()
            raise
        # Two rebuilds would fill the same spare namespace at once: one at a time per home.
        self._rebuild_lock = StoreLock(home, layout.REBUILD_LOCK, readonly=read_only)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[ViewState]:
        with self.views.read() as view:
            yield ViewState(view)

    def append(self, events: Sequence[DomainEventProtocol[Any]]) -> None:
        try:
            with self._mapper.batch():
                self._app.save(*events)
        except RecordConflictError as e:
            raise AppendConflict(str(e)) from e

    def _config(self, digest: str) -> ImageConfig | None:
        """A config the views hold (the mapper resolves configs named by digest with it)."""
        with self.snapshot() as state:
            return state.config(digest)

    def _check_format(self, read_only: bool) -> None:
        env = self._recorder.env
        found = stored_format(env, bool(self.views.head()))
        if found is None and not read_only:
            db = env.db(_FORMAT_DB.decode())
            version = str(FORMAT_VERSION).encode()
            env.write(lambda txn: txn.put(b"version", version, db=db, overwrite=False))
        elif found is not None and found != FORMAT_VERSION:
            raise LedgerFormatError(self.path, found)

    def events(self, reference: str | None) -> list[tuple[int, DomainEventProtocol[Any]]]:
        if reference is not None:
            with self.views.read() as view:
                logged = self.views.log_at(view, ViewState(view).history(reference))
            return [(n.id, self._decode(n)) for n in logged]
        found: list[tuple[int, DomainEventProtocol[Any]]] = []
        after = 0
        while batch := self._recorder.select_notifications(after, 1000, inclusive_of_start=False):
            found.extend((n.id, self._decode(n)) for n in batch)
            after = batch[-1].id
        return found

    def rebuild(
        self, *, verify: bool, progress: Callable[[int, int], None] | None
    ) -> RebuildReport:
        with self._rebuild_lock():
            return rebuild(
                self.views, self._mapper.to_domain_event, verify_only=verify, progress=progress
            )

    def check(self) -> LedgerError | None:
        return check_ledger(self.path).error()

    def current(self) -> bool:
        """Whether the views are in this version's layout (or hold nothing yet)."""
        with self.snapshot() as state:
            found = state.format
        return found == VIEWS_FORMAT or not self.views.head()

    def upgrade(self) -> None:
        """Views written in another layout (`views.FORMAT`, by another imageledger version)
        are rebuilt from the log before anything reads them: the log is the state, views are
        only a cache of it. The caller checks the home is writable."""
        with self._rebuild_lock():
            with self.snapshot() as state:
                found = state.format
            if found != VIEWS_FORMAT and self.views.head():
                log.warning("views.format_changed", found=found, wanted=VIEWS_FORMAT)
                rebuild(self.views, self._mapper.to_domain_event, verify_only=False)

    def close(self) -> None:
        self._app.close()
