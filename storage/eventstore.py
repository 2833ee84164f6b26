"""The eventsourcing application whose log a home's ledger holds: imageledger's events,
encoded by the canonical msgpack transcoder with the domain's value types, and decoded with
`StoredEventMapper` (an event read from disk that cannot become a domain event is damage).

`LedgerApplication` is one class, so that the cache and the ledger check
(`storage.ledgercheck`, which decodes every stored event as the cache does) cannot disagree
about how the log is read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from eventsourcing.application import Application
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Mapper, Transcoder
from eventsourcing.utils import get_topic

from imageledger.domain.errors import LedgerCorruptError
from imageledger.domain.events import TRANSCODINGS
from imageledger.domain.log import get_logger
from imageledger.domain.model import RebuildReport
from imageledger.projections.runner import folder, rebuild
from imageledger.projections.views import FORMAT as VIEWS_FORMAT
from imageledger.projections.views import TABLES, ViewState
from imageledger.storage import layout
from imageledger.storage.home import Dir
from imageledger.storage.leases import StoreLock
from imageledger.storage.ledger import LMDBApplicationRecorder, LMDBFactory, checked_decoder
from imageledger.storage.ledgercheck import check_ledger
from imageledger.storage.transcoder import MsgpackTranscoder, StoredEventMapper
from imageledger.storage.viewstore import LMDBViews

log = get_logger(__name__)


def ledger_transcoder() -> MsgpackTranscoder:
    """The canonical msgpack transcoder with the domain's value types registered."""
    transcoder = MsgpackTranscoder()
    for transcoding in TRANSCODINGS:
        transcoder.register(transcoding)
    return transcoder


class LedgerApplication(Application[Any]):
    """The eventsourcing application that stores the ledger's events (msgpack, canonical)."""

    name = "imageledger"

    def construct_mapper(self) -> Mapper[Any]:
        # Stored events are read from disk, where LMDB keeps no checksums: one that cannot
        # become a domain event is damage (LedgerCorruptError), never a raw TypeError.
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
    ) -> None:
        self.path = home.path / layout.LEDGER
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
        self._decode = checked_decoder(self._app.mapper.to_domain_event, self.path)
        self.views.attach(folder(self._decode))
        # Two rebuilds would fill the same spare namespace at once: one at a time per home.
        self._rebuild_lock = StoreLock(home, layout.REBUILD_LOCK, readonly=read_only)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[ViewState]:
        with self.views.read() as view:
            yield ViewState(view)

    def append(self, events: Sequence[DomainEventProtocol[Any]]) -> None:
        self._app.save(*events)

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
            return rebuild(self.views, self._decode, verify_only=verify, progress=progress)

    def check(self) -> LedgerCorruptError | None:
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
                rebuild(self.views, self._decode, verify_only=False)

    def close(self) -> None:
        self._app.close()
