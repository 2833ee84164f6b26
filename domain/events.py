"""The ledger aggregate and its events: every change to the cache, in the past tense.

One aggregate, `ImageLedger`, per cache home records every event, so the log is one total
order and the eventsourcing library's optimistic concurrency (an event at version V+1 is
refused if another writer got there first) serialises decisions across threads and processes.
Its decision state is not rebuilt by replaying the aggregate: the projections are maintained
in the same transaction as the events, so the views at version V *are* the aggregate's state at
V. A command therefore never loads the aggregate: it reads the views, and its `Batch` makes the
typed events numbered V+1, V+2, ... that the application saves (eventsourcing's
`Application.save` takes events as well as aggregates). A conflict means "decide again on
fresher views" (the service retries; callers never see it).

Events carry only value types from `domain.model` (frozen dataclasses of str/int/tuples and
datetimes), which the ledger stores as plain arrays in a documented order (format 2:
`storage.ledgerformat`, docs/FORMAT.md). `TRANSCODINGS` registers them with the generic
transcoder of format 1, which `imageledger migrate` still reads.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any, Final
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate
from eventsourcing.persistence import Transcoding
from eventsourcing.utils import get_topic

from imageledger.domain.model import (
    Actor,
    ArtifactFile,
    DeletedBlob,
    ImageConfig,
    ImageContent,
    Layer,
    Platform,
    PrunePolicy,
    PullEndpoint,
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
        endpoints: tuple[PullEndpoint, ...] = ()
        """Where a registry pull's manifest and blobs came from (a mirror, a rewritten
        location, the registry itself); empty for a load, an offline pull by digest, and every
        pull recorded before imageledger recorded endpoints."""

    class ImageTagged(Event):
        """`reference` now names `content`, the image `source_reference` named when it was
        tagged (`docker tag SOURCE TARGET`). Its own event rather than a pull: nothing was
        brought from anywhere, and an auditor reading the log must see that the name was
        given locally, from which name. It carries the content as `ImagePulled` does, so the
        views fold it the same way (and a reader of the log alone learns what was named)."""

        reference: str
        source_reference: str
        content: ImageContent

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

    class LayerMaterialized(Event):
        """The layer `blob_digest` (uncompressed: `diff_id`) of `reference`'s manifest is now
        an EROFS image, `erofs`, written by the materializer named `materializer`. Recorded
        only once the file is whole, fsynced and in its place: a crash before leaves a file
        the ledger does not account for, which the next prune reclaims."""

        reference: str
        manifest_digest: str
        blob_digest: str
        diff_id: str
        erofs: ArtifactFile
        materializer: str

    class ImageStitched(Event):
        """`reference`'s manifest is bootable: `fsmeta` (its merged tree, pointing into the
        layer images whose EROFS digests `layers` lists bottom to top) and `vmdk` (the
        descriptor joining fsmeta and the layers, by absolute paths) are in place, written by
        `materializer`. A later one for the same manifest replaces it (a moved home)."""

        reference: str
        manifest_digest: str
        fsmeta: ArtifactFile
        vmdk: ArtifactFile
        layers: tuple[str, ...]
        materializer: str

    def __init__(self, *, actor: Actor) -> None:
        """The aggregate is never loaded or built: see the module docstring and `Batch`."""


_SHOWN: Final = (
    ImageLedger.ImagePulled,
    ImageLedger.ImageTagged,
    ImageLedger.ImageRemoved,
    ImageLedger.ImagesPruned,
)


class Batch:
    """The events one command appends, as the ledger's versions after `version`.

    One typed method per event, so a command cannot record an event with a field missing or
    misspelt. Every event of one batch carries the same actor and the same timestamp (the
    injectable clock, read once per command); a caller replaying a history (a benchmark)
    moves `stamp` between events. On an empty ledger (`version` 0) the batch
    starts with `Started`, so the ledger's first command also records when the home came into
    use, whatever that command records itself."""

    def __init__(self, version: int, actor: Actor, stamp: datetime) -> None:
        self.actor = actor
        self.stamp = stamp
        self.version = version
        self.events: list[ImageLedger.Event] = []
        if version == 0:
            self.version = 1
            started: dict[str, Any] = {"originator_topic": _TOPIC, "actor": actor}
            self.events.append(
                ImageLedger.Started(
                    originator_id=LEDGER_ID, originator_version=1, timestamp=stamp, **started
                )
            )

    @property
    def shown(self) -> bool:
        """Whether the batch changes what index.json shows (semantics 14): it pulls, removes,
        prunes or tags references. A use, a release, a refusal or a failure leaves it as it is."""
        return any(isinstance(event, _SHOWN) for event in self.events)

    def _add(self, event_class: type[ImageLedger.Event], **fields: Any) -> None:
        # eventsourcing makes each event class a dataclass through its metaclass, which type
        # checkers do not see: the typed methods below are the checked signatures.
        self.version += 1
        fields.update(
            originator_id=LEDGER_ID,
            originator_version=self.version,
            timestamp=self.stamp,
            actor=self.actor,
        )
        self.events.append(event_class(**fields))

    def pulled(
        self,
        reference: str,
        source: str,
        content: ImageContent,
        cached: bool,
        endpoints: tuple[PullEndpoint, ...] = (),
    ) -> None:
        self._add(
            ImageLedger.ImagePulled,
            reference=reference,
            source=source,
            content=content,
            cached=cached,
            endpoints=endpoints,
        )

    def tagged(self, reference: str, source_reference: str, content: ImageContent) -> None:
        self._add(
            ImageLedger.ImageTagged,
            reference=reference,
            source_reference=source_reference,
            content=content,
        )

    def layer_materialized(
        self,
        reference: str,
        manifest_digest: str,
        blob_digest: str,
        diff_id: str,
        erofs: ArtifactFile,
        materializer: str,
    ) -> None:
        self._add(
            ImageLedger.LayerMaterialized,
            reference=reference,
            manifest_digest=manifest_digest,
            blob_digest=blob_digest,
            diff_id=diff_id,
            erofs=erofs,
            materializer=materializer,
        )

    def stitched(
        self,
        reference: str,
        manifest_digest: str,
        fsmeta: ArtifactFile,
        vmdk: ArtifactFile,
        layers: tuple[str, ...],
        materializer: str,
    ) -> None:
        self._add(
            ImageLedger.ImageStitched,
            reference=reference,
            manifest_digest=manifest_digest,
            fsmeta=fsmeta,
            vmdk=vmdk,
            layers=layers,
            materializer=materializer,
        )

    def pull_failed(self, reference: str, source: str, error: str) -> None:
        self._add(ImageLedger.PullFailed, reference=reference, source=source, error=error)

    def used(self, reference: str, manifest_digest: str, holder: str) -> None:
        self._add(
            ImageLedger.ImageUsed,
            reference=reference,
            manifest_digest=manifest_digest,
            holder=holder,
        )

    def released(self, holder: str, leases: tuple[tuple[str, str], ...]) -> None:
        self._add(ImageLedger.HolderReleased, holder=holder, leases=leases)

    def removed(
        self,
        reference: str,
        manifest_digest: str,
        forced: bool,
        deleted: tuple[DeletedBlob, ...],
        bytes_reclaimed: int,
    ) -> None:
        self._add(
            ImageLedger.ImageRemoved,
            reference=reference,
            manifest_digest=manifest_digest,
            forced=forced,
            deleted=deleted,
            bytes_reclaimed=bytes_reclaimed,
        )

    def remove_refused(
        self, reference: str, manifest_digest: str, holders: tuple[str, ...]
    ) -> None:
        self._add(
            ImageLedger.RemoveRefused,
            reference=reference,
            manifest_digest=manifest_digest,
            holders=holders,
        )

    def pruned(
        self,
        policy: PrunePolicy,
        now: datetime,
        references: tuple[RemovedReference, ...],
        deleted: tuple[DeletedBlob, ...],
        bytes_reclaimed: int,
    ) -> None:
        self._add(
            ImageLedger.ImagesPruned,
            policy=policy,
            now=now,
            references=references,
            deleted=deleted,
            bytes_reclaimed=bytes_reclaimed,
        )


_TOPIC: Final = get_topic(ImageLedger)


class _DataclassAsDict(Transcoding):
    """Encodes one frozen value type as a dict of its fields (nested values recurse).

    `immutable`: the model's value types are frozen and hold only str/int/None/tuples, so the
    transcoder may hand back one decoded value for every occurrence of the same bytes."""

    immutable = True

    def __init__(self, cls: type[Any], retired: dict[str, Any] | None = None) -> None:
        self.type = cls
        self.name = f"imageledger.{cls.__name__}"
        self._fields = tuple(f.name for f in dataclasses.fields(cls))
        # Fields the type no longer has, with the one value events ever stored in them:
        # dropped when an old event is read, so a ledger written before stays readable.
        self._retired = retired or {}

    def encode(self, obj: Any) -> dict[str, Any]:
        return {name: getattr(obj, name) for name in self._fields}

    def decode(self, data: dict[str, Any]) -> Any:
        if self._retired:
            retired = self._retired
            data = {k: v for k, v in data.items() if k not in retired or v != retired[k]}
        return self.type(**data)


TRANSCODINGS: Final = (
    *(
        _DataclassAsDict(cls)
        for cls in (
            Actor,
            Platform,
            ImageConfig,
            Layer,
            ImageContent,
            DeletedBlob,
            RemovedReference,
            ArtifactFile,
            PullEndpoint,
        )
    ),
    # `only_dangling` was never set (always false) and is gone from the policy.
    _DataclassAsDict(PrunePolicy, retired={"only_dangling": False}),
)
