"""The application service: every use case of the image cache, in one place.

Queries read one consistent snapshot of the views. Every command reads one snapshot, decides,
and appends its events (a `Batch`) as the ledger's next versions; if another thread or process
appended first, it decides again on fresher views (optimistic concurrency, retried here, never
surfaced). Commands that delete content hold the store lock from the decision until the files
are unlinked, and commit before they unlink (semantics 11). Pulls and loads write their blobs
under an in-flight lease and commit once every blob is in the store; a failed one leaves nothing
it wrote and is recorded (`PullFailed`).

The service talks to everything outside the domain through the ports in `domain.ports`; the
facades (`imageledger.cache`, `imageledger.aio`) wire it and translate arguments, nothing
more. No call goes from here back to a facade.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import copy
import dataclasses
import hashlib
import operator
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

from imageledger.domain.errors import (
    CacheClosedError,
    ContentMissingError,
    DigestMismatchError,
    HomeError,
    ImageInUseError,
    ImageLedgerError,
    ImageNotFoundError,
    InvalidReferenceError,
    LedgerError,
    LedgerReadOnlyError,
    MaterializeError,
    PlatformNotFoundError,
)
from imageledger.domain.history import ledger_entry, reference_entries
from imageledger.domain.log import get_logger
from imageledger.domain.model import (
    Actor,
    ArtifactFile,
    BlobProblem,
    DeletedBlob,
    DeletedKind,
    GcPolicy,
    H,
    HistoryEntry,
    ImageContent,
    ImageDetail,
    ImageHandle,
    ImageLayer,
    ImagePruneReport,
    Layer,
    LayerArtifactRecord,
    LoadedImage,
    ManifestRecord,
    MaterializedImage,
    MaterializedLayer,
    Platform,
    PrunePolicy,
    PullEndpoint,
    RebuildReport,
    ReferenceRecord,
    StoreCheck,
)
from imageledger.domain.platforms import choose_platform
from imageledger.domain.policies import (
    MAX_BYTES,
    MAX_SECONDS,
    PrunePlan,
    accounted_artifacts,
    artifact_files,
    content_freed,
    keep_patterns,
    plan_gc,
    plan_prune,
    unmatched_keep,
)
from imageledger.domain.ports import (
    AppendConflict,
    ArchiveDestination,
    Archives,
    ArchiveSource,
    ArtifactStore,
    ArtifactWork,
    BlobStore,
    Leases,
    Ledger,
    LiveLeases,
    Materializer,
    OciIndex,
    Puller,
    Snapshot,
    SourceStore,
    StagedArtifact,
    StoreLock,
)
from imageledger.domain.reference import Reference, canonical

if TYPE_CHECKING:
    from imageledger.domain.events import Batch
    from imageledger.domain.filters import ImageFilter  # a query without filters loads none

log = get_logger(__name__)

T = TypeVar("T")

_MAX_ATTEMPTS: Final = 200
_HOLDER_MAX: Final = 256


class ImageCacheService:
    """Every use case over one cache home (see the module docstring)."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        store: BlobStore,
        leases: Leases,
        lock: StoreLock,
        index: OciIndex,
        archives: Archives,
        clock: Callable[[], datetime],
        actor: Actor,
        home: str,
        read_only: bool = False,
        after_append: Callable[[], None] | None = None,
        artifacts: ArtifactStore | None = None,
    ) -> None:
        self.ledger = ledger
        self.store = store
        self.leases = leases
        self.lock = lock
        self.index = index
        self.archives = archives
        self.clock = clock
        self.actor = actor
        self.home = home
        self.read_only = read_only
        # Called after each committed append (the audit log signs a checkpoint now and then).
        self.after_append = after_append
        # Where materialized artifacts go (None: this cache cannot materialize).
        self.artifacts = artifacts
        # The position this service answers as of (`at`), None for the live cache.
        self.past: int | None = None
        self.closed = False
        # Threads of this process decide and append one at a time, in arrival order: each
        # decision reads the views the previous one left, so they never conflict and retry
        # each other (which at 8 threads put p99 of a use+release near 150 ms), and none
        # waits behind more than the threads that came before it. Other processes still
        # can conflict; their conflicts are retried below.
        self._deciding = _FairLock()

    # ------------------------------------------------------------------ queries

    def close(self) -> None:
        """Refuse every use case from now on (the facade then closes the adapters)."""
        self.closed = True

    def check_open(self) -> None:
        if self.closed:
            msg = f"the cache at {self.home} is closed"
            raise CacheClosedError(msg)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Snapshot]:
        """One consistent read of the views (refused once the cache is closed)."""
        self.check_open()
        with self.ledger.snapshot() as state:
            yield state

    def get(self, reference: str) -> ImageHandle:
        ref = canonical(reference)
        with self.snapshot() as state:
            record = state.reference(ref)
        if record is None:
            raise ImageNotFoundError(ref)
        return record.handle()

    def list(
        self, known: int | None, memo: dict[bytes, H], cls: type[H]
    ) -> tuple[int, builtins.list[H] | None]:
        """(position, every handle newest first, of class `cls`), in one snapshot; the
        handles are None when the position is still `known` (the caller's last list is still
        right). `memo` as for `CacheState.handles`."""
        with self.snapshot() as state:
            position = state.position
            if position == known:
                return position, None
            return position, builtins.list(state.handles(memo, cls))

    def select(self, select: ImageFilter, memo: dict[bytes, H], cls: type[H]) -> builtins.list[H]:
        """list() narrowed by `select` (`domain.filters`: Docker's image filters), in one
        snapshot: the handles, the `before`/`since` images and the labels are of one moment.
        `memo` as for `CacheState.handles`."""
        with self.snapshot() as state:
            handles = builtins.list(state.handles(memo, cls))
            labels: dict[str, tuple[tuple[str, str], ...]] = {}

            def labels_of(handle: H) -> tuple[tuple[str, str], ...]:
                digest = handle.manifest_digest
                if digest not in labels:
                    manifest = state.manifest(digest)
                    labels[digest] = () if manifest is None else manifest.content.config.labels
                return labels[digest]

            return select.apply(handles, labels_of)

    def inspect(self, reference: str) -> ImageDetail[ImageHandle]:
        ref = canonical(reference)
        with self.snapshot() as state:
            record, manifest = _cached(state, ref)
            content = manifest.content
            erofs = {
                layer.blob_digest: state.layer_artifact(layer.blob_digest)
                for layer in content.layers
            }
            endpoints = state.endpoints(ref)
        return ImageDetail(
            handle=record.handle(),
            config=content.config,
            layers=tuple(
                ImageLayer(
                    diff_id=layer.diff_id,
                    blob_digest=layer.blob_digest,
                    media_type=layer.media_type,
                    compressed_size_bytes=layer.compressed_size_bytes,
                    erofs_size_bytes=_erofs_size(erofs[layer.blob_digest]),
                    position=layer.position,
                )
                for layer in content.layers
            ),
            endpoints=endpoints,
        )

    def history(self, reference: str | None = None) -> builtins.list[HistoryEntry]:
        """Every event of `reference` (or of the whole ledger), oldest first, made from the
        events themselves (the views only index which events concern a reference)."""
        self.check_open()
        if reference is None:
            return [ledger_entry(p, e) for p, e in self.ledger.events(None)]
        ref = canonical(reference)
        return [
            entry
            for position, event in self.ledger.events(ref)
            for entry in reference_entries(position, event, ref)
        ]

    def at(self, when: int | datetime) -> ImageCacheService:
        """The cache as it was after the event at position `when`, or after the last event at
        or before the instant `when`: a service over the log replayed that far, whose queries
        answer as the live cache answered then, and which changes nothing. Positions past the
        end or before the start, and instants in the future or before the first event, are a
        `ValueError` saying which."""
        self.check_open()
        head = self.ledger.head()
        if isinstance(when, datetime):
            if when.tzinfo is None:
                msg = "a time without a UTC offset is ambiguous: give one (or Z)"
                raise ValueError(msg)
            if when > self.clock():
                msg = f"{when.isoformat()} is in the future"
                raise ValueError(msg)
            position = self.ledger.position_at(when)
            if position == 0:
                msg = f"{when.isoformat()} is before the ledger's first event"
                raise ValueError(msg)
        else:
            position = when
            if not 1 <= position <= head:
                msg = f"position {position} is not in the ledger (1 to {head})"
                raise ValueError(msg)
        past = copy.copy(self)
        past.ledger = self.ledger.at(position)
        past.read_only = True
        past.after_append = None
        past.past = position
        return past

    def diff(self, first: int | datetime, second: int | datetime) -> dict[str, Any]:
        """What changed between two points of the ledger (see `at` for what a point is):
        references added, removed and re-tagged (the same name on another manifest), leases
        taken and released, and the bytes of blobs the cache gained and reclaimed."""
        before, after = self.at(first), self.at(second)
        old, new = _state_of(before), _state_of(after)
        return {
            "from": before.past,
            "to": after.past,
            "added": [
                {"reference": r, "manifest_digest": new["refs"][r]}
                for r in sorted(new["refs"].keys() - old["refs"].keys())
            ],
            "removed": [
                {"reference": r, "manifest_digest": old["refs"][r]}
                for r in sorted(old["refs"].keys() - new["refs"].keys())
            ],
            "retagged": [
                {"reference": r, "from_digest": old["refs"][r], "to_digest": new["refs"][r]}
                for r in sorted(old["refs"].keys() & new["refs"].keys())
                if old["refs"][r] != new["refs"][r]
            ],
            "leases_taken": _leases(new["leases"] - old["leases"]),
            "leases_released": _leases(old["leases"] - new["leases"]),
            "bytes_gained": sum(n for d, n in new["blobs"].items() if d not in old["blobs"]),
            "bytes_reclaimed": sum(n for d, n in old["blobs"].items() if d not in new["blobs"]),
        }

    def explain(self, reference: str, when: int | datetime | None = None) -> dict[str, Any]:
        """Why `reference` is in the cache (the pull that made it name its manifest; the
        leases and the other references that keep its content now) or why it is gone (the
        remove or prune that took it, with its recorded reason and policy, who ran it, and
        the holders of its manifest just before), citing ledger positions; as of `when` (a
        point as for `at`) or now. `ImageNotFoundError` for a reference the ledger never
        had (by then)."""
        ref = canonical(reference)
        view = self.at(when) if when is not None else self
        # The events as their classes are (typed by the port as eventsourcing's protocol).
        events: builtins.list[tuple[int, Any]] = builtins.list(view.ledger.events(ref))
        if not events:
            raise ImageNotFoundError(ref)
        with view.snapshot() as state:
            position = state.position
            record = state.reference(ref)
            manifest = None if record is None else state.manifest(record.manifest_digest)
            leases = (
                []
                if manifest is None
                else [
                    {"holder": h, "references": [r for r, _d in state.holder(h)]}
                    for h in manifest.holders
                ]
            )
        answer: dict[str, Any] = {"reference": ref, "as_of": position}
        if record is not None and manifest is not None:
            # A pull of it, or a tag that gave it its name (the source's history holds the
            # tags it was the source of: those did not make this name).
            made = next(
                (p, e)
                for p, e in reversed(events)
                if type(e).__name__ in ("ImagePulled", "ImageTagged")
                and e.reference == ref
                and e.content.manifest_digest == record.manifest_digest
            )
            # A tag's source is spelled as the others are (`registry:`, `archive:`): `tag:REF`.
            source = getattr(made[1], "source", None) or f"tag:{made[1].source_reference}"
            endpoints = getattr(made[1], "endpoints", ())
            served = {"endpoints": [e.as_json() for e in endpoints]} if endpoints else {}
            answer.update(
                present=True,
                manifest_digest=record.manifest_digest,
                made_by=_cited(made[0], made[1], source=source, **served),
                leases=leases,
                other_references=[r for r in manifest.references if r != ref],
            )
            return answer
        gone = next(
            (
                (p, e)
                for p, e in reversed(events)
                if type(e).__name__ in ("ImageRemoved", "ImagesPruned")
            ),
            None,
        )
        if gone is None:  # only failed pulls: it was never cached
            raise ImageNotFoundError(ref)
        gone_position, event = gone
        if type(event).__name__ == "ImagesPruned":
            why = next(r for r in event.references if r.reference == ref)
            digest, reason = why.manifest_digest, why.reason
            policy = event.policy
            detail = {
                "reason": reason,
                "policy": {
                    "unused_for_seconds": policy.unused_for_seconds,
                    "keep": list(policy.keep),
                    "max_bytes": policy.max_bytes,
                    **({} if policy.gc is None else {"gc": policy.gc.as_json()}),
                },
            }
        else:
            digest = event.manifest_digest
            detail = {"forced": event.forced, "blobs_deleted": len(event.deleted)}
        with self.at(gone_position - 1).snapshot() as before:
            then = before.manifest(digest)
            holders = [] if then is None else list(then.holders)
        answer.update(
            present=False,
            manifest_digest=digest,
            removed_by=_cited(gone_position, event, **detail),
            holders_then=holders,
        )
        return answer

    def df(self) -> dict[str, Any]:
        """Bytes by kind, and what a default prune would reclaim."""
        with self.snapshot() as state:
            by_kind: dict[str, int] = {}
            for blob in state.blobs():
                by_kind[blob.kind] = by_kind.get(blob.kind, 0) + blob.size
            # Materialized artifacts the ledger records, by kind (a layer's EROFS image is an
            # `artifact`), on the same disk as the blobs.
            for file, kind, _of in artifact_files(state):
                by_kind[kind] = by_kind.get(kind, 0) + file.size
            references = sum(1 for _ in state.references())
        dry = self.prune(dry_run=True)
        log_bytes, checkpoint_bytes = self.ledger.disk()
        return {
            "references": references,
            "bytes": by_kind,
            "total_bytes": sum(by_kind.values()),
            "reclaimable_bytes": dry.bytes_reclaimed,
            # The ledger's own disk: the log, and beside it the view checkpoints that make
            # `at` fast (derived data, at most storage.viewstore.MAX_SHARE of the log).
            "ledger": {
                "log_bytes": log_bytes,
                "checkpoint_bytes": checkpoint_bytes,
                "checkpoint_share": round(checkpoint_bytes / log_bytes, 3) if log_bytes else 0.0,
            },
        }

    # ------------------------------------------------------------------ committing

    def writable(self, what: str) -> None:
        """Refuse a command that would change a home this user can only read."""
        if self.read_only:
            msg = f"{self.home}: {what} needs a home this user can write; this one can only be read"
            raise LedgerReadOnlyError(msg)

    def _commit(self, decide: Callable[[Snapshot, Batch, datetime], T]) -> T:
        """Decide on a snapshot, append as the next versions; on a conflict, decide again.
        One read and one write transaction when nobody else appends meanwhile."""
        # The events, and eventsourcing under them, load with the first command that records
        # something: a query never needs them (see `domain.history`).
        from imageledger.domain.events import Batch

        for attempt in range(_MAX_ATTEMPTS):
            with self._deciding:
                now = self.clock()
                with self.snapshot() as state:
                    batch = Batch(state.version, self.actor, now)
                    result = decide(state, batch, now)
                if not batch.events:
                    return result
                try:
                    self.ledger.append(batch.events)
                except AppendConflict:
                    conflicted = True
                else:
                    conflicted = False
            if conflicted:
                time.sleep(random.uniform(0, 0.0005 * min(attempt + 1, 20)))
                continue
            if batch.shown:
                self.index.refresh()
            if self.after_append is not None:
                self.after_append()
            return result
        msg = f"could not append after {_MAX_ATTEMPTS} attempts: the ledger is too contended"
        raise LedgerError(msg)

    # ------------------------------------------------------------------ pulls and loads

    def pull(self, reference: str, platform: Platform, puller: Puller) -> ImageHandle:
        """Pull `reference` (see `ImageCache.pull`). A pull by digest of a manifest the cache
        holds whole does not contact the registry: the digest pins the bytes, and they are
        here, verified."""
        self.writable("pull")
        ref = Reference.parse(reference)
        source = f"registry:{ref.name}"
        with self._bringing(str(ref), source) as store:
            puller.admit(ref)  # a blocked registry is refused even when the cache holds it
            held = self._held_manifest(ref.digest, store)
            if held is not None:
                log.info("pull.offline", reference=str(ref))
                return self.add_all([(ref, held, True)], source)[0]
            pulled = puller.pull(ref, store, platform)
            content = pulled.content
            # An endpoint that failed midway (a mirror) may have left verified blobs this
            # image does not use (another manifest's): they leave nothing behind.
            needed = {d for d, _ in content.blobs}
            for digest in sorted(set(store.written) - needed):
                store.delete(digest)
            cached = not any(d in store.written for d, _ in content.blobs)
            return self.add_all([(ref, content, cached)], source, endpoints=pulled.endpoints)[0]

    def _held_manifest(self, digest: str | None, store: SourceStore) -> ImageContent | None:
        """The content of manifest `digest` if the cache holds it whole; each blob is claimed
        by the pull's lease as it is checked, so a prune or remove from now on spares it."""
        if digest is None:
            return None
        with self.snapshot() as state:
            record = state.manifest(digest)
        if record is None:
            return None
        for blob, _kind, size in record.content.kinded_blobs():
            if store.size(blob) != size:
                return None  # removed meanwhile: fetch it again
        return record.content

    def load(
        self,
        source: ArchiveSource,
        *,
        tag: str | None,
        platform: Platform,
        strict: bool,
    ) -> builtins.list[ImageHandle]:
        """Load the images of an archive (see `ImageCache.load`). `strict`: the platform was
        asked for, so an archive without it is an error rather than its first image."""
        self.writable("load")
        tag_ref = canonical(tag) if tag is not None else None
        where = self.archives.label(source)
        with self._bringing(tag or "", where) as store:
            loaded = self.archives.load(source, store)
            named = _names(loaded, tag_ref, platform, strict=strict)
            # The platforms not chosen leave nothing behind.
            keep = {d for _, image in named for d, _ in image.content.blobs}
            for image in loaded:
                for digest, _ in image.content.blobs:
                    if digest not in keep and digest in store.written:
                        store.delete(digest)
                        keep.add(digest)
            return self.add_all(
                [
                    (
                        reference,
                        image.content,
                        not any(d in store.written for d, _ in image.content.blobs),
                    )
                    for reference, image in named
                ],
                where,
            )

    @contextlib.contextmanager
    def _bringing(self, reference: str, source: str) -> Iterator[SourceStore]:
        """One pull or load: its in-flight lease and the store as the source sees it. If it
        fails (an error, an interrupt, SIGTERM in the CLI), the blobs it wrote that nothing
        else needs are deleted before the error leaves, and the failure is recorded: every
        failed pull or load is in the history, whatever failed."""
        with self.leases.bringing(self._knows_blob) as store:
            try:
                yield store
            except BaseException as e:
                for digest in sorted(store.written):
                    try:
                        store.delete(digest)
                    except (OSError, ImageLedgerError) as cleanup:
                        log.warning("bring.cleanup_failed", digest=digest, error=str(cleanup))
                # The work directory goes with the lease anyway; emptied first, so that a
                # failure on a full disk leaves room for the ledger to record it.
                store.clear_work()
                if isinstance(e, Exception | KeyboardInterrupt) and not isinstance(
                    e, CacheClosedError
                ):
                    self._record_failure(reference, source, e)
                raise

    def _knows_blob(self, digest: str) -> bool:
        with self.snapshot() as state:
            return state.blob(digest) is not None

    def _record_failure(self, reference: str, source: str, error: BaseException) -> None:
        """Trace a failed pull or load in the ledger, unless the ledger cannot take it (its
        disk is full too): the caller then still gets the original error, not this one."""
        what = str(error) or type(error).__name__
        if not isinstance(error, ImageLedgerError):
            what = f"{type(error).__name__}: {what}"
        try:
            self.record_failure(reference, source, what)
        except ImageLedgerError as unrecorded:
            log.warning("pull.failure_not_recorded", error=str(error), why=str(unrecorded))

    def add_all(
        self,
        images: Sequence[tuple[Reference | str, ImageContent, bool]],
        source: str,
        *,
        endpoints: tuple[PullEndpoint, ...] = (),
    ) -> builtins.list[ImageHandle]:
        """Commit a pull or load of (reference, content, cached) whose blobs are all in the
        store (the caller's in-flight lease still protects them): one append, so an archive
        of many images or one image under many names is all or nothing, and costs one commit
        whatever the number of names. `endpoints`: where a registry pull's manifest and blobs
        came from (mirrors, the primary location), recorded with it."""
        items: builtins.list[tuple[str, ImageContent, bool]] = []
        for reference, content, cached in images:
            parsed = reference if isinstance(reference, Reference) else Reference.parse(reference)
            ref, pinned = str(parsed), parsed.digest
            if pinned is not None and pinned != content.manifest_digest:
                msg = f"{ref} names manifest {pinned}, the content is {content.manifest_digest}"
                raise DigestMismatchError(msg)
            items.append((ref, content, cached))
        with self.lock():
            checked: set[str] = set()
            for ref, content, _cached in items:
                for digest, _kind, size in content.kinded_blobs():
                    if digest in checked:
                        continue
                    if self.store.size(digest) != size:
                        msg = (
                            f"{ref}: blob {digest} is missing from the store or has the wrong size"
                        )
                        raise ContentMissingError(msg)
                    checked.add(digest)

            def decide(state: Snapshot, batch: Batch, now: datetime) -> None:
                for ref, content, cached in items:
                    batch.pulled(ref, source, content, cached, endpoints)

            self._commit(decide)
            with self.snapshot() as state:
                records = [state.reference(ref) for ref, _, _ in items]
        handles = []
        for (ref, _, _), record in zip(items, records, strict=True):
            if record is None:  # pragma: no cover - committed just now, under the store lock
                raise ImageNotFoundError(ref)
            handles.append(record.handle())
        return handles

    def record_failure(self, reference: str, source: str, error: str) -> None:
        """A pull or load failed: the users must be able to trace it."""
        try:
            ref = canonical(reference) if reference else ""
        except InvalidReferenceError:
            return  # refused before anything was touched; nothing to trace in the ledger
        self._commit(lambda state, batch, now: batch.pull_failed(ref, source, error[:500]))

    def save(
        self,
        references: Sequence[str],
        destination: ArchiveDestination,
        *,
        format: Literal["docker", "oci"] = "docker",
    ) -> None:
        """Write the images to a docker-archive or an OCI archive (tar)."""
        images = []
        with self.snapshot() as state:
            for reference in references:
                ref = canonical(reference)
                record = state.reference(ref)
                if record is None:
                    raise ImageNotFoundError(ref)
                images.append((ref, record.manifest_digest))
        self.archives.save(images, destination, format=format)

    # ------------------------------------------------------------------ names

    def tag(self, source: str, target: str) -> ImageHandle:
        """`target` names the image `source` names, as `docker tag` does: recorded as
        `ImageTagged` (the new name's created_at is now, unless it already existed: a name
        that named another image is moved, as a re-pull moves it). A `source` that is not
        cached is `ImageNotFoundError`; a `target` that is a digest reference is refused
        (`InvalidReferenceError`): a digest already names its manifest, a tag names it
        again. Tagging a name as itself records nothing."""
        self.writable("tag")
        src = canonical(source)
        parsed = Reference.parse(target)
        if parsed.digest is not None:
            msg = f"cannot tag as {parsed}: a digest reference is not a name to give; use a tag"
            raise InvalidReferenceError(msg)
        dst = str(parsed)

        def decide(state: Snapshot, batch: Batch, now: datetime) -> None:
            _record, manifest = _cached(state, src)
            if dst != src:
                batch.tagged(dst, src, manifest.content)

        self._commit(decide)
        with self.snapshot() as state:
            record = state.reference(dst)
        if record is None:  # removed by another process since
            raise ImageNotFoundError(dst)
        return record.handle()

    # ------------------------------------------------------------------ materializing

    def materialize(self, reference: str, materializer: Materializer) -> MaterializedImage:
        """Make `reference`'s image bootable by a microVM (see `ImageCache.materialize`): each
        layer as an EROFS image, then the fsmeta and the VMDK joining them. What the ledger
        records as materialized and is still on disk, whole in size, is used as it is; a VMDK
        naming other paths (the home moved) is written again.

        Each artifact is written in the work directory of an in-flight lease that claims the
        image's blobs (a prune or remove spares them meanwhile), under a lock of its own (two
        materializations of one layer, in any process, write it once: the second finds the
        first's in the ledger), and is renamed into place and recorded under the store lock
        (a prune never sees it in place and unrecorded). A crash leaves files the ledger does
        not account for; the next prune reclaims them."""
        self.writable("materialize")
        artifacts = self._artifacts()
        ref = canonical(reference)
        with self.snapshot() as state:
            _record, manifest = _cached(state, ref)
        content = manifest.content
        for layer in content.layers:
            if layer.diff_id is None:
                msg = f"{ref}: layer {layer.blob_digest} has no diff_id (its config lists none)"
                raise MaterializeError(msg)
        blobs = content.kinded_blobs()
        with artifacts.working([digest for digest, _kind, _size in blobs]) as work:
            # Claimed now: what is here stays until the lease ends; what is not was deleted
            # (verify --repair, a remove racing the snapshot) and must be brought again.
            for digest, _kind, size in blobs:
                if self.store.size(digest) != size:
                    msg = f"{ref}: blob {digest} is missing from the store; pull or load it again"
                    raise ContentMissingError(msg)
            written = 0
            done: dict[str, ArtifactFile] = {}
            for layer in content.layers:
                if layer.blob_digest not in done:
                    file, wrote = self._materialize_layer(ref, content, layer, work, materializer)
                    done[layer.blob_digest] = file
                    written += wrote
            files = [done[layer.blob_digest] for layer in content.layers]
            fsmeta, vmdk, wrote = self._stitch(ref, content, files, work, materializer)
            written += wrote
        where = artifacts.where
        return MaterializedImage(
            reference=ref,
            manifest_digest=content.manifest_digest,
            vmdk=where(vmdk.path),
            fsmeta=where(fsmeta.path),
            layers=tuple(
                MaterializedLayer(
                    diff_id=layer.diff_id or "",
                    blob_digest=layer.blob_digest,
                    path=where(file.path),
                    erofs_digest=file.digest,
                    erofs_size_bytes=file.size,
                )
                for layer, file in zip(content.layers, files, strict=True)
            ),
            vmdk_size_bytes=vmdk.size,
            fsmeta_size_bytes=fsmeta.size,
            materializer=materializer.name,
            written=written,
        )

    def _artifacts(self) -> ArtifactStore:
        if self.artifacts is None:
            msg = f"the cache at {self.home} has no artifact store: it cannot materialize"
            raise MaterializeError(msg)
        return self.artifacts

    def _present(self, file: ArtifactFile) -> bool:
        """Whether a recorded artifact is on disk with its recorded size (what a pull trusts
        of a blob; `verify` hashes)."""
        return self._artifacts().size(file.path) == file.size

    def _materialize_layer(
        self,
        ref: str,
        content: ImageContent,
        layer: Layer,
        work: ArtifactWork,
        materializer: Materializer,
    ) -> tuple[ArtifactFile, int]:
        """The layer's EROFS image, written (1) unless the ledger has it on disk (0)."""
        with self._artifacts().lock("layer", layer.blob_digest):
            with self.snapshot() as state:
                known = state.layer_artifact(layer.blob_digest)
            if known is not None and self._present(known.file):
                return known.file, 0
            assert layer.diff_id is not None  # checked by `materialize`
            staged = work.layer(layer.blob_digest, layer.diff_id, materializer)
            diff_id = layer.diff_id

            def decide(state: Snapshot, batch: Batch, now: datetime) -> None:
                self._still_cached(state, ref, content.manifest_digest)
                batch.layer_materialized(
                    ref,
                    content.manifest_digest,
                    layer.blob_digest,
                    diff_id,
                    staged.file,
                    materializer.name,
                )

            self._install(staged, decide=decide)
        return staged.file, 1

    def _stitch(
        self,
        ref: str,
        content: ImageContent,
        layers: builtins.list[ArtifactFile],
        work: ArtifactWork,
        materializer: Materializer,
    ) -> tuple[ArtifactFile, ArtifactFile, int]:
        """The image's fsmeta and VMDK: kept when the ledger records them over these very
        layer images and the VMDK names the paths the home has now; else written again (the
        fsmeta only if its layers changed or it is gone)."""
        artifacts = self._artifacts()
        digest = content.manifest_digest
        layer_digests = tuple(file.digest for file in layers)
        with artifacts.lock("image", digest):
            with self.snapshot() as state:
                known = state.stitched(digest)
            staged_fsmeta = None
            if known is not None and known.layers == layer_digests and self._present(known.fsmeta):
                fsmeta = known.fsmeta
            else:
                staged_fsmeta = work.fsmeta(digest, layers, materializer)
                fsmeta = staged_fsmeta.file
            extents = [(artifacts.where(f.path), f.size) for f in (fsmeta, *layers)]
            descriptor = materializer.vmdk_descriptor(extents).encode()
            vmdk_digest = f"sha256:{hashlib.sha256(descriptor).hexdigest()}"
            if (
                staged_fsmeta is None
                and known is not None
                and known.vmdk.digest == vmdk_digest
                and self._present(known.vmdk)
            ):
                return known.fsmeta, known.vmdk, 0
            staged_vmdk = work.vmdk(digest, descriptor)
            staged = [s for s in (staged_fsmeta, staged_vmdk) if s is not None]

            def decide(state: Snapshot, batch: Batch, now: datetime) -> None:
                self._still_cached(state, ref, digest)
                for layer, file in zip(content.layers, layers, strict=True):
                    now_known = state.layer_artifact(layer.blob_digest)
                    if now_known is None or now_known.file != file:
                        msg = f"{ref}: layer {layer.blob_digest} changed while it was stitched"
                        raise MaterializeError(msg)
                batch.stitched(
                    ref, digest, fsmeta, staged_vmdk.file, layer_digests, materializer.name
                )

            self._install(*staged, decide=decide)
        return fsmeta, staged_vmdk.file, len(staged)

    def _install(self, *staged: StagedArtifact, decide: Callable[..., None]) -> None:
        """Rename `staged` into place and record them, under the store lock (a prune lists
        the disk and decides under it: it never sees them in place and unrecorded). When the
        recording fails (the image was removed meanwhile), they are deleted again."""
        with self.lock():
            installed: builtins.list[StagedArtifact] = []
            try:
                for artifact in staged:
                    artifact.install()
                    installed.append(artifact)
                self._commit(decide)
            except BaseException:
                self._unlink(
                    tuple(
                        DeletedBlob(a.file.path, "artifact", a.file.size, "not recorded")
                        for a in installed
                    )
                )
                raise
            finally:
                for artifact in staged:
                    artifact.discard()

    @staticmethod
    def _still_cached(state: Snapshot, ref: str, digest: str) -> None:
        if state.manifest(digest) is None:
            raise ImageNotFoundError(ref)

    # ------------------------------------------------------------------ leases

    def use(self, reference: str, holder: str) -> ImageHandle:
        """`holder` takes a lease on the reference's manifest (and uses the reference). One
        read and one write transaction: the handle is the one the decision read, used now
        (what the views hold after the fold, without reading them again)."""
        self.writable("use")
        ref = canonical(reference)
        check_holder(holder)

        def decide(state: Snapshot, batch: Batch, now: datetime) -> ImageHandle:
            record = state.reference(ref)
            if record is None:
                raise ImageNotFoundError(ref)
            batch.used(ref, record.manifest_digest, holder)
            return dataclasses.replace(record.handle(), last_used_at=now.astimezone(UTC))

        return self._commit(decide)

    def release(self, holder: str) -> int:
        """End every lease `holder` holds; returns how many (0: nothing held, nothing recorded)."""
        self.writable("release")
        check_holder(holder)

        def decide(state: Snapshot, batch: Batch, now: datetime) -> int:
            leases = state.holder(holder)
            if leases:
                batch.released(holder, leases)
            return len(leases)

        return self._commit(decide)

    # ------------------------------------------------------------------ deleting

    def remove(self, reference: str, *, force: bool = False) -> tuple[DeletedBlob, ...]:
        """Semantics 6 and 7; returns what was deleted."""
        self.writable("remove")
        ref = canonical(reference)
        with self.lock():
            protected = self.leases.protected()

            def decide(
                state: Snapshot, batch: Batch, now: datetime
            ) -> tuple[DeletedBlob, ...] | ImageInUseError:
                record = state.reference(ref)
                if record is None:
                    raise ImageNotFoundError(ref)
                manifest = state.manifest(record.manifest_digest)
                assert manifest is not None, f"views name a missing manifest for {ref}"
                others = [r for r in manifest.references if r != ref]
                if not others and manifest.holders and not force:
                    batch.remove_refused(ref, record.manifest_digest, manifest.holders)
                    return ImageInUseError(ref, manifest.holders)
                deleted: tuple[DeletedBlob, ...] = ()
                if not others and not manifest.holders and record.manifest_digest not in protected:
                    deleted = tuple(content_freed(state, [manifest], protected, f"removed {ref}"))
                batch.removed(
                    ref, record.manifest_digest, force, deleted, sum(b.size for b in deleted)
                )
                return deleted

            outcome = self._commit(decide)
            if isinstance(outcome, ImageInUseError):
                raise outcome
            self._unlink(outcome)  # the event says what was deleted; the API returns nothing
        return outcome

    def _unlink(self, entries: tuple[DeletedBlob, ...]) -> tuple[int, tuple[DeletedBlob, ...]]:
        """Unlink what a committed remove or prune deleted; the bytes actually freed and the
        entries unlinked (what a report counts). One entry that cannot be unlinked
        (permissions, a read-only mount, damage) does not stop the others: the event is
        committed, and what stays is an orphan that the next prune reclaims and reports again
        (commit first, unlink after: semantics 11)."""
        freed = 0
        unlinked = []
        for entry in entries:
            try:
                freed += self.store.delete_entry(entry)
            except (OSError, HomeError):
                continue
            unlinked.append(entry)
        return freed, tuple(unlinked)

    def prune(
        self,
        *,
        dry_run: bool = False,
        unused_for: float | None = None,
        keep: Sequence[str] = (),
        max_bytes: int | None = None,
    ) -> ImagePruneReport:
        """Semantics 8 (see `ImageCache.prune` for the arguments); `bytes_reclaimed` counts
        bytes actually unlinked."""
        if not dry_run:
            self.writable("prune")
        policy = _policy(dry_run, unused_for, keep, max_bytes)
        return self._prune(lambda: policy, plan_prune)

    def gc(
        self,
        *,
        high_threshold: int = 85,
        low_threshold: int = 80,
        min_age: float = 120.0,
        max_age: float | None = None,
        dry_run: bool = False,
    ) -> ImagePruneReport:
        """Disk-pressure garbage collection, kubelet's image GC policy (`GcPolicy`,
        `policies.plan_gc`): the disk is read under the store lock, then the plan is made and
        carried out by the prune path (one way to remove), and its event is an `ImagesPruned`
        whose policy holds the gc's thresholds and the disk figures it saw. A gc that removes
        nothing records nothing (a timer that finds no pressure leaves the ledger alone)."""
        if self.past is not None:
            msg = f"the cache as it was at position {self.past} has no disk to collect"
            raise ValueError(msg)
        if not dry_run:
            self.writable("gc")
        thresholds = _gc_thresholds(high_threshold, low_threshold, min_age, max_age)

        def gc_policy() -> PrunePolicy:
            return PrunePolicy(dry_run=dry_run, gc=GcPolicy(*thresholds, self.store.disk_usage()))

        def plan(
            state: Snapshot,
            policy: PrunePolicy,
            now: datetime,
            protected: frozenset[str],
            strays: builtins.list[DeletedBlob],
        ) -> PrunePlan:
            assert policy.gc is not None
            return plan_gc(state, policy.gc, now, protected, strays)

        report = self._prune(gc_policy, plan)
        need = 0 if report.gc is None else report.gc.to_free
        planned = sum(b.size for b in report.deleted)
        if planned < need:
            # kubelet's "failed to garbage collect required amount of images"
            log.warning("gc.not_enough_to_free", need_bytes=need, planned_bytes=planned)
        return report

    def _prune(
        self,
        make_policy: Callable[[], PrunePolicy],
        planner: Callable[
            [Snapshot, PrunePolicy, datetime, frozenset[str], builtins.list[DeletedBlob]],
            PrunePlan,
        ],
    ) -> ImagePruneReport:
        """The one way a prune or a gc removes: under the store lock, list the disk and the
        live leases, plan with `planner` on a snapshot, record the plan and unlink (or, for
        a dry run, only plan). `make_policy` is called under the lock (a gc reads the disk
        there)."""
        with self.lock():
            # Listing the disk before reading the leases: a work directory created after the
            # listing is not in it, and one listed belongs to a lease already there to read.
            # A past state's plan is the views' alone: what the disk and the leases held then
            # is not recorded.
            past = self.past is not None
            on_disk = set() if past else set(self.store.digests())
            candidates = [] if past else self.store.strays()
            live = LiveLeases(frozenset(), frozenset()) if past else self.leases.live()
            strays = [s for s in candidates if s.digest not in live.work]
            policy = make_policy()
            dry_run = policy.dry_run

            unmatched: builtins.list[str] = []

            def decide(state: Snapshot, now: datetime) -> Any:
                known = {blob.digest for blob in state.blobs()}
                orphans = [
                    DeletedBlob(d, "orphan", self.store.size(d) or 0, "not in the ledger")
                    for d in sorted(on_disk - known - live.digests)
                ]
                # Under artifacts/, what the ledger records is no stray (the views decide).
                accounted = accounted_artifacts(state)
                listed = [s for s in strays if s.digest not in accounted]
                plan = planner(state, policy, now, live.digests, [*orphans, *listed])
                # Matched against the references the plan was made from.
                unmatched[:] = unmatched_keep(
                    policy.keep, (r.reference for r in state.references())
                )
                return plan

            def record(state: Snapshot, batch: Batch, now: datetime) -> Any:
                plan = decide(state, now)
                if policy.gc is not None and not plan.references and not plan.deleted:
                    return plan  # a gc with nothing to do: nothing recorded
                batch.pruned(policy, now, plan.references, plan.deleted, plan.bytes)
                return plan

            if policy.dry_run:
                # A plan only: read on one snapshot, nothing recorded (not even the first
                # event of an empty ledger), and no event class loaded for it.
                with self.snapshot() as state:
                    plan = decide(state, self.clock())
                unlinked, gone = plan.bytes, plan.deleted
            else:
                plan = self._commit(record)
                unlinked, gone = self._unlink(plan.deleted)
        for pattern in unmatched:
            log.warning("prune.keep_unmatched", pattern=pattern[:200], length=len(pattern))
        return ImagePruneReport.of(
            plan.references,
            plan.deleted,
            unlinked,
            dry_run=dry_run,
            unmatched_keep=unmatched,
            gc=policy.gc,
            counted=gone,
        )

    # ------------------------------------------------------------------ checking

    def verify(
        self,
        *,
        repair: bool = False,
        progress: Callable[[int, int], None] | None = None,
        ledger: bool = True,
    ) -> StoreCheck:
        """Check the ledger (`Ledger.check`, unless `ledger` is false: the caller has just
        checked), then read back every blob it accounts for and hash it. With `repair`, a
        blob that is there but wrong (wrong size, corrupt) is deleted, under the store lock,
        so that the next pull or load of the images that need it fetches it again; what is
        missing stays missing until then. Nothing is recorded: the ledger was right, the disk
        was not. `progress(bytes done, bytes total)`."""
        if repair:
            self.writable("verify --repair")
        if ledger:
            found = self.ledger.check()
            if found is not None:
                raise found
        with self.snapshot() as state:
            blobs = builtins.list(state.blobs())
            users = {m.content.manifest_digest: m.references for m in state.manifests()}
            recorded = _recorded_artifacts(state)
        total = sum(blob.size for blob in blobs)
        done = 0
        problems = []
        for blob in blobs:
            problem = self.store.check(blob.digest, blob.size)
            done += blob.size
            if progress is not None:
                progress(done, total)
            if problem is None:
                continue
            repaired = False
            if repair and problem != "missing":
                with self.lock():
                    if self.store.check(blob.digest, blob.size) == problem:
                        self.store.delete(blob.digest)
                        repaired = True
            references = sorted({r for manifest in blob.users for r in users.get(manifest, ())})
            problems.append(
                BlobProblem(blob.digest, blob.kind, problem, tuple(references), repaired)
            )
        problems.extend(self._verify_artifacts(recorded, users, repair=repair))
        # Entries under blobs/ that are not blobs (links, FIFOs, directories, other names) are
        # damage too: named, never read or followed; --repair removes them (the link itself).
        for stray in self.store.strays():
            if stray.kind != "stray":
                continue  # partials and artifacts: prune's business, not damage
            repaired = False
            if repair:
                with self.lock():
                    self.store.delete_entry(stray)
                    repaired = True
            problems.append(BlobProblem(stray.digest, "stray", "not a blob", (), repaired))
        for p in problems:
            log.warning(
                "store.blob_damaged", digest=p.digest, problem=p.problem, repaired=p.repaired
            )
        return StoreCheck(len(blobs), total, tuple(problems), artifacts_checked=len(recorded))

    def _verify_artifacts(
        self,
        recorded: builtins.list[tuple[ArtifactFile, DeletedKind, tuple[str, ...]]],
        users: dict[str, tuple[str, ...]],
        *,
        repair: bool,
    ) -> builtins.list[BlobProblem]:
        """`verify` of the materialized artifacts the ledger records (hashed against the
        digests it recorded); with `repair`, a wrong one is deleted (under the store lock),
        so that the next `materialize` writes it again. Nothing is recorded: the disk was
        wrong, not the ledger."""
        if not recorded:
            return []
        artifacts = self._artifacts()
        problems = []
        for file, kind, manifests in recorded:
            problem = artifacts.check(file)
            if problem is None:
                continue
            repaired = False
            if repair and problem != "missing":
                with self.lock():
                    if artifacts.check(file) == problem:
                        self.store.delete_entry(DeletedBlob(file.path, kind, file.size, problem))
                        repaired = True
            references = sorted({r for manifest in manifests for r in users.get(manifest, ())})
            problems.append(BlobProblem(file.path, kind, problem, tuple(references), repaired))
        return problems

    def rebuild(
        self, *, verify: bool = False, progress: Callable[[int, int], None] | None = None
    ) -> RebuildReport:
        """Replay the whole log into fresh views (or, with `verify`, into scratch space) and
        compare them with the live ones (semantics 10: they must be identical). Both write
        (the scratch space is in the ledger), so a read-only home refuses them."""
        self.writable("rebuild")
        report = self.ledger.rebuild(verify=verify, progress=progress)
        if not verify:
            self.index.refresh(force=True)
        return report


class _FairLock:
    """A lock granted in the order it was asked for (`threading.Lock` lets a releasing thread
    take it straight back, so one thread can starve the others)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held = False
        self._waiting: collections.deque[threading.Event] = collections.deque()

    def __enter__(self) -> None:
        with self._mutex:
            if not self._held:
                self._held = True
                return
            turn = threading.Event()
            self._waiting.append(turn)
        try:
            turn.wait()  # the releasing thread hands the lock over: _held stays true
        except BaseException:
            # Interrupted while waiting (Ctrl-C, SIGTERM in the CLI): leave the queue, or, if
            # the lock was handed over meanwhile, pass it on, so nobody waits for us forever.
            with self._mutex:
                if turn.is_set():
                    self._hand_over()
                else:
                    self._waiting.remove(turn)
            raise

    def __exit__(self, *exc: object) -> None:
        with self._mutex:
            self._hand_over()

    def _hand_over(self) -> None:
        """Give the lock to the longest waiter, or free it (call holding the mutex)."""
        if self._waiting:
            self._waiting.popleft().set()
        else:
            self._held = False


def _policy(
    dry_run: bool, unused_for: float | None, keep: Sequence[str], max_bytes: int | None
) -> PrunePolicy:
    """The policy of a prune, from what a caller passes. Keep patterns are normalized like
    references (see `KeepPattern`); a bare string for `keep` is refused (it would be read
    character by character and keep nothing). Durations and byte budgets past what the clock
    and the ledger can represent mean "everything is recent" and "everything fits", so they
    are clamped rather than overflowing mid-prune."""
    patterns = tuple(p.text for p in keep_patterns(keep))
    seconds = _seconds("prune", "unused_for", unused_for, stored="unused_for_seconds")
    budget = None if max_bytes is None else operator.index(max_bytes)
    if budget is not None and budget < 0:
        msg = f"prune: max_bytes must not be negative, got {budget}"
        raise ValueError(msg)
    return PrunePolicy(
        dry_run=dry_run,
        unused_for_seconds=seconds,
        keep=patterns,
        max_bytes=None if budget is None else min(budget, MAX_BYTES),
    )


def _seconds(command: str, name: str, value: float | None, *, stored: str = "") -> int | None:
    """A prune's or a gc's duration argument in whole seconds (None stays None): a finite
    number, not negative (`stored`: the name the policy keeps it by, for that message), and
    past what the clock can represent clamped to `MAX_SECONDS` ("everything is recent")."""
    try:
        seconds = None if value is None else int(value)
    except (OverflowError, TypeError, ValueError):
        msg = f"{command}: {name} must be a finite number of seconds, got {value!r}"
        raise ValueError(msg) from None
    if seconds is None:
        return None
    if seconds < 0:
        msg = f"{command}: {stored or name} must not be negative, got {seconds}"
        raise ValueError(msg)
    return min(seconds, MAX_SECONDS)


def _gc_thresholds(
    high: int, low: int, min_age: float, max_age: float | None
) -> tuple[int, int, int, int | None]:
    """A gc's thresholds as `GcPolicy` holds them, checked as kubelet checks its own: whole
    percentages from 0 to 100 with low <= high (a high of 100 never triggers: a disk is never
    more than full), durations in whole seconds, not negative, clamped like prune's, and a
    maximum age above the minimum one (an image could not otherwise live to be judged)."""
    values = []
    for name, value in (("high_threshold", high), ("low_threshold", low)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
            msg = f"gc: {name} must be a whole percentage from 0 to 100, got {value!r}"
            raise ValueError(msg)
        values.append(value)
    if low > high:
        msg = f"gc: low_threshold ({low}%) must not be above high_threshold ({high}%)"
        raise ValueError(msg)
    youngest = _seconds("gc", "min_age", min_age)
    oldest = _seconds("gc", "max_age", max_age)
    assert youngest is not None
    if oldest is not None and oldest <= youngest:
        msg = f"gc: max_age ({oldest} s) must be more than min_age ({youngest} s)"
        raise ValueError(msg)
    return values[0], values[1], youngest, oldest


def _names(
    loaded: builtins.list[LoadedImage], tag: str | None, platform: Platform, *, strict: bool
) -> builtins.list[tuple[str, LoadedImage]]:
    """Which reference each loaded image gets (see `ImageCache.load`): one image per
    reference; where an archive holds several platforms under one name, the one `platform`
    matches, else (unless `strict`: the platform was asked for) the first the archive lists."""
    named: dict[str, builtins.list[LoadedImage]] = {}
    for image in loaded:
        refs = [tag] if tag is not None else _image_refs(image)
        for ref in refs:
            named.setdefault(ref, []).append(image)
    chosen: builtins.list[tuple[str, LoadedImage]] = []
    for ref, images in sorted(named.items()):
        platforms = [i.content.platform for i in images]
        if len(set(platforms)) != len(platforms):
            msg = f"the archive holds {len(images)} images for {ref}; load them one at a time"
            raise InvalidReferenceError(msg)
        best = choose_platform(images, platform, strict=strict)
        if best is None:
            offered = sorted({str(i.content.platform) for i in images})
            raise PlatformNotFoundError(ref, str(platform), offered)
        chosen.append((ref, best))
    return chosen


def _image_refs(image: LoadedImage) -> builtins.list[str]:
    refs = []
    for name in image.names:
        if "/" not in name and ":" not in name:
            continue  # a bare tag (an OCI layout's ref.name): which repository? --tag says
        try:
            refs.append(str(Reference.parse(name)))
        except InvalidReferenceError:
            continue
    if not refs:
        msg = (
            f"image {image.content.manifest_digest} in the archive has no usable name "
            f"({', '.join(image.names) or 'none'}); name it with --tag"
        )
        raise InvalidReferenceError(msg)
    return sorted(set(refs))


def _cached(state: Snapshot, ref: str) -> tuple[ReferenceRecord, ManifestRecord]:
    """The reference `ref` and the manifest it names; `ImageNotFoundError` when not cached."""
    record = state.reference(ref)
    manifest = None if record is None else state.manifest(record.manifest_digest)
    if record is None or manifest is None:
        raise ImageNotFoundError(ref)
    return record, manifest


def _recorded_artifacts(
    state: Snapshot,
) -> builtins.list[tuple[ArtifactFile, DeletedKind, tuple[str, ...]]]:
    """Every artifact the ledger records: (file, kind, the manifests that need it)."""
    found: builtins.list[tuple[ArtifactFile, DeletedKind, tuple[str, ...]]] = []
    for file, kind, of in artifact_files(state):
        if kind == "artifact":  # a layer's image: needed by the manifests using its blob
            blob = state.blob(of)
            found.append((file, kind, () if blob is None else blob.users))
        else:
            found.append((file, kind, (of,)))
    return found


def _erofs_size(record: LayerArtifactRecord | None) -> int | None:
    """A layer's `erofs_size_bytes` as `inspect` reports it (None: not materialized)."""
    return None if record is None else record.file.size


def check_holder(holder: str) -> None:
    """A holder id is a printable string of 1-256 characters (a sandbox id, a snapshot id)."""
    if (
        not isinstance(holder, str)
        or not holder
        or len(holder) > _HOLDER_MAX
        or not holder.isprintable()
    ):
        msg = f"invalid holder id {holder!r}: a printable string of 1-{_HOLDER_MAX} characters"
        raise InvalidReferenceError(msg)


def _state_of(service: ImageCacheService) -> dict[str, Any]:
    """References, blobs and leases of one point (for `ImageCacheService.diff`)."""
    with service.snapshot() as state:
        refs = {r.reference: r.manifest_digest for r in state.references()}
        blobs = {b.digest: b.size for b in state.blobs()}
        holders = {h for m in state.manifests() for h in m.holders}
        leases = {(h, ref, digest) for h in holders for ref, digest in state.holder(h)}
    return {"refs": refs, "blobs": blobs, "leases": leases}


def _leases(found: set[tuple[str, str, str]]) -> builtins.list[dict[str, str]]:
    return [{"holder": h, "reference": r, "manifest_digest": d} for h, r, d in sorted(found)]


def _cited(position: int, event: Any, **detail: Any) -> dict[str, Any]:
    """An event as `explain` cites it: where, what, when, who."""
    actor = event.actor
    return {
        "position": position,
        "event": type(event).__name__,
        "at": event.timestamp.isoformat().replace("+00:00", "Z"),
        "user": actor.user,
        "host": actor.host,
        "pid": actor.pid,
        **detail,
    }
