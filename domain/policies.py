"""Deciding what a remove or a prune deletes: pure functions of the cache state.

Both answer from one snapshot of the views plus the digests that in-flight pulls protect; the
service commits the answer as an event and only then unlinks (so a crash leaves orphans for the
next prune, never a ledger that names missing content).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from imageledger.domain.errors import InvalidReferenceError
from imageledger.domain.model import (
    DeletedBlob,
    LoadedImage,
    ManifestRecord,
    Platform,
    PrunePolicy,
    ReferenceRecord,
    RemovedReference,
)
from imageledger.domain.ports import CacheState
from imageledger.domain.reference import canonical


def content_freed(
    state: CacheState,
    manifests: Iterable[ManifestRecord],
    protected: frozenset[str],
    reason: str,
) -> list[DeletedBlob]:
    """The blobs deleted when `manifests` go: each manifest's blobs that no other (surviving)
    manifest uses and no in-flight pull protects. Sorted, each blob once."""
    going = {m.content.manifest_digest for m in manifests}
    freed: dict[str, DeletedBlob] = {}
    for manifest in sorted(manifests, key=lambda m: m.content.manifest_digest):
        for digest, kind, size in manifest.content.kinded_blobs():
            if digest in freed or digest in protected:
                continue
            blob = state.blob(digest)
            users = set(blob.users) if blob is not None else set()
            if users <= going:
                why = reason if kind == "manifest" else f"only used by removed {reason}"
                freed[digest] = DeletedBlob(digest, kind, size, why)
    return sorted(freed.values(), key=lambda b: (b.kind != "manifest", b.digest))


def _matches(reference: str, patterns: tuple[str, ...]) -> bool:
    for pattern in patterns:
        if fnmatch.fnmatchcase(reference, pattern):
            return True
        try:
            if canonical(pattern) == reference:
                return True
        except InvalidReferenceError:
            continue
    return False


@dataclass(frozen=True)
class PrunePlan:
    references: tuple[RemovedReference, ...]
    deleted: tuple[DeletedBlob, ...]

    @property
    def bytes(self) -> int:
        return sum(b.size for b in self.deleted)


def plan_prune(
    state: CacheState,
    policy: PrunePolicy,
    now: datetime,
    protected: frozenset[str],
    strays: Iterable[DeletedBlob],
) -> PrunePlan:
    """Semantics 8. References go when their manifest has no lease and no pull in flight, and
    the policy allows (`keep`, `unused_for`, `max_bytes` least recently used first); then every
    manifest left with no reference and no lease, the blobs only they used, and `strays` (files
    the ledger does not account for, found by storage)."""
    manifests = {m.content.manifest_digest: m for m in state.manifests()}
    refs = list(state.references())

    def removable(ref: ReferenceRecord) -> bool:
        manifest = manifests.get(ref.manifest_digest)
        if manifest is None or manifest.holders or ref.manifest_digest in protected:
            return False
        if _matches(ref.reference, policy.keep):
            return False
        if policy.unused_for_seconds is not None:
            return ref.last_used_at <= now - timedelta(seconds=policy.unused_for_seconds)
        return True

    candidates = [] if policy.only_dangling else [r for r in refs if removable(r)]
    remaining = {d: set(m.references) for d, m in manifests.items()}

    def dangling() -> list[ManifestRecord]:
        return [
            m
            for d, m in sorted(manifests.items())
            if not remaining[d] and not m.holders and d not in protected
        ]

    chosen: list[ReferenceRecord] = []
    if policy.max_bytes is None:
        chosen = candidates
        for ref in chosen:
            remaining[ref.manifest_digest].discard(ref.reference)
    else:
        total = sum(blob.size for blob in state.blobs())
        # Least recently used first; ties by creation order (older first).
        for ref in sorted(candidates, key=lambda r: (r.last_used_at, r.created_position)):
            if total - sum(b.size for b in content_freed(state, dangling(), protected, "")) <= (
                policy.max_bytes
            ):
                break
            chosen.append(ref)
            remaining[ref.manifest_digest].discard(ref.reference)

    reason = "unused"
    if policy.max_bytes is not None:
        reason = f"least recently used, cache over {policy.max_bytes} bytes"
    elif policy.unused_for_seconds is not None:
        reason = f"unused for more than {policy.unused_for_seconds} s"
    removed = tuple(
        RemovedReference(r.reference, r.manifest_digest, reason)
        for r in sorted(chosen, key=lambda r: r.reference)
    )
    deleted = content_freed(state, dangling(), protected, "unreferenced manifest")
    return PrunePlan(references=removed, deleted=(*deleted, *sorted(strays, key=_stray_key)))


def _stray_key(blob: DeletedBlob) -> tuple[str, str]:
    return blob.kind, blob.digest


def choose_platform(images: Sequence[LoadedImage], wanted: Platform) -> LoadedImage:
    """The image whose platform best matches `wanted`: same os, architecture and variant;
    else same os and architecture; else the first listed (an archive's own order)."""
    for image in images:
        if image.content.platform == wanted:
            return image
    for image in images:
        platform = image.content.platform
        if (platform.os, platform.architecture) == (wanted.os, wanted.architecture):
            return image
    return images[0]
