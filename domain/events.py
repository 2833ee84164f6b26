"""The ledger aggregate and its events: every change to the cache, in the past tense.

One aggregate, `ImageLedger`, per cache home records every event, so the log is one total
order and the eventsourcing library's optimistic concurrency (an event at version V+1 is
refused if another writer got there first) serialises decisions across threads and processes.
Its decision state is not rebuilt by replaying the aggregate: the projections are maintained
in the same transaction as the events, so the views at version V *are* the aggregate's state at
V; `ImageLedger.at(V)` makes the object that appends event V+1, and a conflict means "decide
again on fresher views" (the service retries; callers never see it).

Events carry only value types from `domain.model` (frozen dataclasses of str/int/tuples and
datetimes), registered with the transcoder by `TRANSCODINGS`, so their encoding is canonical.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any, Final
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate, Snapshot
from eventsourcing.persistence import Transcoding
from eventsourcing.utils import get_topic

from imageledger.domain.model import (
    Actor,
    DeletedBlob,
    ImageConfig,
    ImageContent,
    Layer,
    Platform,
    PrunePolicy,
    RemovedReference,
)

LEDGER_ID: Final = uuid5(NAMESPACE_URL, "imageledger:ledger")


class ImageLedger(Aggregate):
    """The ledger of one cache home."""

    @staticmethod
    def create_id(**_: Any) -> UUID:
        return LEDGER_ID

    class Event(Aggregate.Event):
        actor: Actor

    class Started(Aggregate.Created, Event):
        """The ledger's first event: the cache home came into use."""

    class ImagePulled(Event):
        """`reference` now names `content` (from a registry or an archive: `source`).
        `cached` is true when every blob was already in the store."""

        reference: str
        source: str
        content: ImageContent
        cached: bool

    class PullFailed(Event):
        """A pull or load of `reference` failed; nothing it wrote is live."""

        reference: str
        source: str
        error: str

    class ImageUsed(Event):
        """`holder` (a sandbox, a snapshot) took a lease on `reference`'s manifest."""

        reference: str
        manifest_digest: str
        holder: str

    class HolderReleased(Event):
        """`holder` ended every lease it held: (reference, manifest digest) pairs."""

        holder: str
        leases: tuple[tuple[str, str], ...]

    class ImageRemoved(Event):
        """`reference` was removed; `deleted` is exactly the content deleted with it (empty
        when another reference or a lease keeps the manifest)."""

        reference: str
        manifest_digest: str
        forced: bool
        deleted: tuple[DeletedBlob, ...]
        bytes_reclaimed: int

    class RemoveRefused(Event):
        """A remove without force was refused: it would drop the last reference to a
        manifest that `holders` lease."""

        reference: str
        manifest_digest: str
        holders: tuple[str, ...]

    class ImagesPruned(Event):
        """A prune as of `now` under `policy`: the references it removed and the content and
        stray files it deleted, each with its reason."""

        policy: PrunePolicy
        now: datetime
        references: tuple[RemovedReference, ...]
        deleted: tuple[DeletedBlob, ...]
        bytes_reclaimed: int

    def __init__(self, *, actor: Actor) -> None:
        """Use `ImageLedger.start()`: the ledger is created by its first command."""

    @classmethod
    def start(cls, actor: Actor, now: datetime) -> ImageLedger:
        return cls._create(cls.Started, id=LEDGER_ID, actor=actor, timestamp=now)

    @classmethod
    def at(cls, version: int, modified_on: datetime) -> ImageLedger:
        """The ledger as of `version`, ready to append event `version + 1` (see module doc)."""
        snapshot = Snapshot(
            originator_id=LEDGER_ID,
            originator_version=version,
            timestamp=modified_on,
            topic=get_topic(cls),
            state={"_created_on": modified_on, "_modified_on": modified_on},
        )
        ledger = snapshot.mutate(None)
        assert isinstance(ledger, cls)
        return ledger

    @classmethod
    def next_after(
        cls, version: int, modified: datetime | None, actor: Actor, now: datetime
    ) -> ImageLedger:
        """The ledger ready for its next event: at `version`, or started if it has none."""
        if version and modified is not None:
            return cls.at(version, modified)
        return cls.start(actor, now)

    def record(
        self, event_class: type[Event], *, actor: Actor, stamp: datetime, **fields: Any
    ) -> None:
        """Append one event stamped `stamp` (the injectable clock, read once per command)."""
        self.trigger_event(event_class, timestamp=stamp, actor=actor, **fields)


class _DataclassAsDict(Transcoding):
    """Encodes one frozen value type as a dict of its fields (nested values recurse).

    `immutable`: the model's value types are frozen and hold only str/int/None/tuples, so the
    transcoder may hand back one decoded value for every occurrence of the same bytes."""

    immutable = True

    def __init__(self, cls: type[Any]) -> None:
        self.type = cls
        self.name = f"imageledger.{cls.__name__}"
        self._fields = tuple(f.name for f in dataclasses.fields(cls))

    def encode(self, obj: Any) -> dict[str, Any]:
        return {name: getattr(obj, name) for name in self._fields}

    def decode(self, data: dict[str, Any]) -> Any:
        return self.type(**data)


TRANSCODINGS: Final = tuple(
    _DataclassAsDict(cls)
    for cls in (
        Actor,
        Platform,
        ImageConfig,
        Layer,
        ImageContent,
        DeletedBlob,
        PrunePolicy,
        RemovedReference,
    )
)
