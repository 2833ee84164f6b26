"""The eventsourcing application whose log a home's ledger holds: imageledger's events,
encoded by the canonical msgpack transcoder with the domain's value types, and decoded with
`StoredEventMapper` (an event read from disk that cannot become a domain event is damage).

One class, so that the cache and the ledger check (`tools.ledgercheck`, which decodes every
stored event as the cache does) cannot disagree about how the log is read.
"""

from __future__ import annotations

from typing import Any

from eventsourcing.application import Application
from eventsourcing.persistence import Mapper, Transcoder

from imageledger.domain.events import TRANSCODINGS
from imageledger.storage.transcoder import MsgpackTranscoder, StoredEventMapper


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
