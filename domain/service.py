"""The application service: the image cache's commands and queries.

Every command reads one consistent snapshot of the views, decides, and appends its events as
the ledger's next version; if another thread or process appended first, it decides again on
fresher views (optimistic concurrency, retried here, never surfaced). Commands that delete
content hold the store lock from the decision until the files are unlinked, and commit before
they unlink (semantics 11).
"""

from __future__ import annotations

import builtins
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, Protocol, TypeVar

from eventsourcing.persistence import RecordConflictError

from imageledger.domain.errors import (
    ContentMissingError,
    DigestMismatchError,
    HomeError,
    ImageInUseError,
    ImageNotFoundError,
    InvalidReferenceError,
    LedgerError,
)
from imageledger.domain.events import ImageLedger
from imageledger.domain.model import (
    Actor,
    BlobProblem,
    DeletedBlob,
    HistoryEntry,
    ImageContent,
    ImageDetail,
    ImageHandle,
    ImagePruneReport,
    LayerDetail,
    PrunePolicy,
    StoreCheck,
)
from imageledger.domain.policies import content_freed, plan_prune, unmatched_keep
from imageledger.domain.ports import CacheState, InFlight, StoreLock
from imageledger.domain.reference import Reference, canonical

T = TypeVar("T")

_MAX_ATTEMPTS = 200
# Deleted entries named by a digest; every other kind (partial, stray, artifact, fsmeta,
# vmdk) is named by its path in the home.
_BLOB_KINDS = frozenset({"manifest", "config", "layer", "orphan"})
_HOLDER_MAX = 256


class Snapshot(CacheState, Protocol):
    @property
    def modified(self) -> datetime | None: ...


class Ledger(Protocol):
    """Where the service reads state and appends events (storage + projections implement it)."""

    def snapshot(self) -> AbstractContextManager[Snapshot]: ...

    def append(self, ledger: ImageLedger) -> None:
        """Save the ledger's pending events; `RecordConflictError` if the version is taken."""


class Content(Protocol):
    """The blob store as the service needs it."""

    def size(self, digest: str) -> int | None: ...

    def check(self, digest: str, size: int) -> str | None:
        """None when the blob is intact, else ``missing``, ``wrong size`` or ``corrupt``."""

    def delete(self, digest: str) -> int: ...

    def digests(self) -> Iterator[str]: ...

    def strays(self, alive: frozenset[str]) -> list[DeletedBlob]: ...

    def delete_path(self, relative: str) -> int: ...


class Leases(InFlight, Protocol):
    def live(self) -> tuple[frozenset[str], frozenset[str]]: ...


class ImageCacheService:
    """Commands and queries over one cache home."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        content: Content,
        leases: Leases,
        lock: StoreLock,
        clock: Callable[[], datetime],
        actor: Actor,
        history: Callable[[str | None], list[HistoryEntry]],
    ) -> None:
        self.ledger = ledger
        self.content = content
        self.leases = leases
        self.lock = lock
        self.clock = clock
        self.actor = actor
        self._history = history

    # ------------------------------------------------------------------ queries

    def get(self, reference: str) -> ImageHandle:
        ref = canonical(reference)
        with self.ledger.snapshot() as state:
            record = state.reference(ref)
        if record is None:
            raise ImageNotFoundError(ref)
        return record.handle()

    def list(self, memo: dict[bytes, ImageHandle] | None = None) -> builtins.list[ImageHandle]:
        """Newest first; `memo` as for `CacheState.handles`."""
        with self.ledger.snapshot() as state:
            return builtins.list(state.handles(memo))

    def inspect(self, reference: str) -> ImageDetail:
        ref = canonical(reference)
        with self.ledger.snapshot() as state:
            record = state.reference(ref)
            manifest = None if record is None else state.manifest(record.manifest_digest)
        if record is None or manifest is None:
            raise ImageNotFoundError(ref)
        content = manifest.content
        return ImageDetail(
            handle=record.handle(),
            config=content.config,
            layers=tuple(
                LayerDetail(
                    diff_id=layer.diff_id,
                    blob_digest=layer.blob_digest,
                    media_type=layer.media_type,
                    compressed_size_bytes=layer.compressed_size_bytes,
                    erofs_size_bytes=None,  # not materialized yet
                    position=layer.position,
                )
                for layer in content.layers
            ),
        )

    def history(self, reference: str | None = None) -> builtins.list[HistoryEntry]:
        return self._history(None if reference is None else canonical(reference))

    # ------------------------------------------------------------------ commands

    def _commit(self, decide: Callable[[Snapshot, ImageLedger, datetime], T]) -> T:
        """Decide on a snapshot, append as the next version; on a conflict, decide again."""
        for attempt in range(_MAX_ATTEMPTS):
            now = self.clock()
            with self.ledger.snapshot() as state:
                ledger = ImageLedger.next_after(state.version, state.modified, self.actor, now)
                result = decide(state, ledger, now)
            if len(ledger.pending_events) == 0:
                return result
            try:
                self.ledger.append(ledger)
            except RecordConflictError:
                time.sleep(random.uniform(0, 0.0005 * min(attempt + 1, 20)))
                continue
            return result
        msg = f"could not append after {_MAX_ATTEMPTS} attempts: the ledger is too contended"
        raise LedgerError(msg)

    def _record(self, ledger: ImageLedger, stamp: datetime, cls: Any, **fields: Any) -> None:
        ledger.record(cls, actor=self.actor, stamp=stamp, **fields)

    def add(
        self, reference: str, content: ImageContent, source: str, *, cached: bool
    ) -> ImageHandle:
        """Commit a pull or load whose blobs are all in the store (the caller's in-flight
        lease still protects them): `reference` now names `content`."""
        return self.add_all([(reference, content, cached)], source)[0]

    def add_all(
        self, images: Sequence[tuple[str, ImageContent, bool]], source: str
    ) -> builtins.list[ImageHandle]:
        """Commit a load (or pull) of several (reference, content, cached) at once: one
        append, so an archive of many images or one image under many names is all or
        nothing, and costs one commit whatever the number of names."""
        items: builtins.list[tuple[str, ImageContent, bool]] = []
        for reference, content, cached in images:
            ref = canonical(reference)
            pinned = Reference.parse(ref).digest
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
                    if self.content.size(digest) != size:
                        msg = (
                            f"{ref}: blob {digest} is missing from the store or has the wrong size"
                        )
                        raise ContentMissingError(msg)
                    checked.add(digest)

            def decide(state: Snapshot, ledger: ImageLedger, now: datetime) -> None:
                for ref, content, cached in items:
                    self._record(
                        ledger,
                        now,
                        ImageLedger.ImagePulled,
                        reference=ref,
                        source=source,
                        content=content,
                        cached=cached,
                    )

            self._commit(decide)
            with self.ledger.snapshot() as state:
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
        self._commit(
            lambda state, ledger, now: self._record(
                ledger,
                now,
                ImageLedger.PullFailed,
                reference=ref,
                source=source,
                error=error[:500],
            )
        )

    def use(self, reference: str, holder: str) -> ImageHandle:
        """`holder` takes a lease on the reference's manifest (and uses the reference)."""
        ref = canonical(reference)
        check_holder(holder)

        def decide(state: Snapshot, ledger: ImageLedger, now: datetime) -> None:
            record = state.reference(ref)
            if record is None:
                raise ImageNotFoundError(ref)
            self._record(
                ledger,
                now,
                ImageLedger.ImageUsed,
                reference=ref,
                manifest_digest=record.manifest_digest,
                holder=holder,
            )

        self._commit(decide)
        return self.get(ref)

    def release(self, holder: str) -> int:
        """End every lease `holder` holds; returns how many (0: nothing held, nothing recorded)."""
        check_holder(holder)

        def decide(state: Snapshot, ledger: ImageLedger, now: datetime) -> int:
            leases = state.holder(holder)
            if leases:
                self._record(ledger, now, ImageLedger.HolderReleased, holder=holder, leases=leases)
            return len(leases)

        return self._commit(decide)

    def remove(self, reference: str, *, force: bool = False) -> tuple[DeletedBlob, ...]:
        """Semantics 6 and 7; returns what was deleted."""
        ref = canonical(reference)
        with self.lock():
            protected = self.leases.protected()

            def decide(
                state: Snapshot, ledger: ImageLedger, now: datetime
            ) -> tuple[DeletedBlob, ...] | ImageInUseError:
                record = state.reference(ref)
                if record is None:
                    raise ImageNotFoundError(ref)
                manifest = state.manifest(record.manifest_digest)
                assert manifest is not None, f"views name a missing manifest for {ref}"
                others = [r for r in manifest.references if r != ref]
                if not others and manifest.holders and not force:
                    self._record(
                        ledger,
                        now,
                        ImageLedger.RemoveRefused,
                        reference=ref,
                        manifest_digest=record.manifest_digest,
                        holders=manifest.holders,
                    )
                    return ImageInUseError(ref, manifest.holders)
                deleted: tuple[DeletedBlob, ...] = ()
                if not others and not manifest.holders and record.manifest_digest not in protected:
                    deleted = tuple(content_freed(state, [manifest], protected, f"removed {ref}"))
                self._record(
                    ledger,
                    now,
                    ImageLedger.ImageRemoved,
                    reference=ref,
                    manifest_digest=record.manifest_digest,
                    forced=force,
                    deleted=deleted,
                    bytes_reclaimed=sum(b.size for b in deleted),
                )
                return deleted

            outcome = self._commit(decide)
            if isinstance(outcome, ImageInUseError):
                raise outcome
            self._unlink(outcome)
        return outcome

    def _unlink(self, blobs: tuple[DeletedBlob, ...]) -> int:
        """Unlink what a committed remove or prune deleted; the bytes actually freed. One
        entry that cannot be unlinked (permissions, a read-only mount, damage) does not stop
        the others: the event is committed, and what stays is an orphan that the next prune
        reclaims and reports again (commit first, unlink after: semantics 11)."""
        freed = 0
        for blob in blobs:
            try:
                if blob.kind in _BLOB_KINDS:
                    freed += self.content.delete(blob.digest)
                else:
                    freed += self.content.delete_path(blob.digest)
            except (OSError, HomeError):
                continue
        return freed

    def verify(
        self, *, repair: bool = False, progress: Callable[[int, int], None] | None = None
    ) -> StoreCheck:
        """Read back every blob the ledger accounts for and hash it. With `repair`, a blob
        that is there but wrong (wrong size, corrupt) is deleted, under the store lock, so that
        the next pull or load of the images that need it fetches it again; what is missing
        stays missing until then. Nothing is recorded: the ledger was right, the disk was not.
        `progress(bytes done, bytes total)`."""
        with self.ledger.snapshot() as state:
            blobs = builtins.list(state.blobs())
            users = {m.content.manifest_digest: m.references for m in state.manifests()}
        total = sum(blob.size for blob in blobs)
        done = 0
        problems = []
        for blob in blobs:
            problem = self.content.check(blob.digest, blob.size)
            done += blob.size
            if progress is not None:
                progress(done, total)
            if problem is None:
                continue
            repaired = False
            if repair and problem != "missing":
                with self.lock():
                    if self.content.check(blob.digest, blob.size) == problem:
                        self.content.delete(blob.digest)
                        repaired = True
            references = sorted({r for manifest in blob.users for r in users.get(manifest, ())})
            problems.append(
                BlobProblem(blob.digest, blob.kind, problem, tuple(references), repaired)
            )
        # Entries under blobs/ that are not blobs (links, FIFOs, directories, other names) are
        # damage too: named, never read or followed; --repair removes them (the link itself).
        for stray in self.content.strays(frozenset()):
            if stray.kind != "stray":
                continue  # partials and artifacts: prune's business, not damage
            repaired = False
            if repair:
                with self.lock():
                    self.content.delete_path(stray.digest)
                    repaired = True
            problems.append(BlobProblem(stray.digest, "stray", "not a blob", (), repaired))
        return StoreCheck(len(blobs), total, tuple(problems))

    def prune(self, policy: PrunePolicy | None = None) -> ImagePruneReport:
        """Semantics 8: see `plan_prune`; `bytes_reclaimed` counts bytes actually unlinked."""
        policy = policy or PrunePolicy()
        for name in ("unused_for_seconds", "max_bytes"):
            value = getattr(policy, name)
            if value is not None and value < 0:
                msg = f"prune: {name} must not be negative, got {value}"
                raise ValueError(msg)
        with self.lock():
            # Listing the disk before reading the leases: a work directory created after the
            # listing is not in it, and one listed belongs to a lease already there to read.
            on_disk = set(self.content.digests())
            candidates = self.content.strays(frozenset())
            protected, alive = self.leases.live()
            live_dirs = {f"tmp/{lease}" for lease in alive}
            strays = [s for s in candidates if s.digest not in live_dirs]

            unmatched: builtins.list[str] = []

            def decide(state: Snapshot, ledger: ImageLedger, now: datetime) -> Any:
                known = {blob.digest for blob in state.blobs()}
                orphans = [
                    DeletedBlob(d, "orphan", self.content.size(d) or 0, "not in the ledger")
                    for d in sorted(on_disk - known - protected)
                ]
                plan = plan_prune(state, policy, now, protected, [*orphans, *strays])
                # Matched against the references the plan was made from.
                unmatched[:] = unmatched_keep(
                    policy.keep, (r.reference for r in state.references())
                )
                if not policy.dry_run:
                    self._record(
                        ledger,
                        now,
                        ImageLedger.ImagesPruned,
                        policy=policy,
                        now=now,
                        references=plan.references,
                        deleted=plan.deleted,
                        bytes_reclaimed=plan.bytes,
                    )
                return plan

            plan = self._commit(decide)
            unlinked = plan.bytes if policy.dry_run else self._unlink(plan.deleted)
        kinds = [b.kind for b in plan.deleted]
        return ImagePruneReport(
            image_refs_removed=len(plan.references),
            manifests_removed=kinds.count("manifest"),
            layers_removed=kinds.count("layer"),
            fsmeta_removed=kinds.count("fsmeta"),
            vmdk_removed=kinds.count("vmdk"),
            bytes_reclaimed=unlinked,
            dry_run=policy.dry_run,
            references=plan.references,
            deleted=plan.deleted,
            unmatched_keep=tuple(unmatched),
        )


def check_holder(holder: str) -> None:
    if (
        not isinstance(holder, str)
        or not holder
        or len(holder) > _HOLDER_MAX
        or not holder.isprintable()
    ):
        msg = f"invalid holder id {holder!r}: a printable string of 1-{_HOLDER_MAX} characters"
        raise InvalidReferenceError(msg)
