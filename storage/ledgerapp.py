"""The eventsourcing applications whose log a home's ledger holds.

`LedgerApplication` stores imageledger's events in format 2 (`storage.ledgerformat`,
docs/FORMAT.md). It is one class, so that the cache and the ledger check
(`storage.ledgercheck`, which decodes every stored event as the cache does) cannot disagree
about how the log is read. `FormatOneApplication` reads a ledger written before format 2
(the generic canonical transcoder, `storage.transcoder`), for `imageledger migrate` only.

Apart from `storage.eventstore` so that opening a ledger to query it loads no eventsourcing:
`LedgerStore` makes its application when a command first appends or reads the log.
"""

from __future__ import annotations

from typing import Any

from eventsourcing.application import Application
from eventsourcing.persistence import Mapper, Transcoder

from imageledger.domain.events import TRANSCODINGS
from imageledger.storage.ledgerformat import LedgerMapper
from imageledger.storage.settings import APPLICATION
from imageledger.storage.transcoder import MsgpackTranscoder, StoredEventMapper


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

    name = APPLICATION

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

    name = APPLICATION

    def construct_mapper(self) -> Mapper[Any]:
        return self.factory.mapper(
            transcoder=self.construct_transcoder(), mapper_class=StoredEventMapper
        )

    def construct_transcoder(self) -> Transcoder:
        return ledger_transcoder()
