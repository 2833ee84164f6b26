"""Deciding what a remove or a prune deletes: pure functions of the cache state.

Both answer from one snapshot of the views plus the digests that in-flight pulls protect; the
service commits the answer as an event and only then unlinks (so a crash leaves orphans for the
next prune, never a ledger that names missing content).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from imageledger.domain.errors import InvalidReferenceError
from imageledger.domain.model import (
    ArtifactFile,
    DeletedBlob,
    DeletedKind,
    GcPolicy,
    ManifestRecord,
    PrunePolicy,
    ReferenceRecord,
    RemovedReference,
)
from imageledger.domain.ports import CacheState
from imageledger.domain.reference import DEFAULT_REGISTRY, Reference, parse_reference


def content_freed(
    state: CacheState,
    manifests: Iterable[ManifestRecord],
    protected: frozenset[str],
    reason: str,
) -> list[DeletedBlob]:
    """The blobs deleted when `manifests` go: each manifest's blobs that no other (surviving)
    manifest uses and no in-flight pull protects, and their materialized artifacts: each
    manifest's fsmeta and VMDK, and the EROFS image of each layer blob that goes (an image
    kept, by a lease or another name, keeps its artifacts). Sorted, each entry once."""
    going = {m.content.manifest_digest for m in manifests}
    freed: dict[str, DeletedBlob] = {}
    for manifest in sorted(manifests, key=lambda m: m.content.manifest_digest):
        stitched = state.stitched(manifest.content.manifest_digest)
        if stitched is not None:
            why = f"materialized for removed {reason}"
            fsmeta, vmdk = stitched.fsmeta, stitched.vmdk
            freed[fsmeta.path] = DeletedBlob(fsmeta.path, "fsmeta", fsmeta.size, why)
            freed[vmdk.path] = DeletedBlob(vmdk.path, "vmdk", vmdk.size, why)
        for digest, kind, size in manifest.content.kinded_blobs():
            if digest in freed or digest in protected:
                continue
            blob = state.blob(digest)
            users = set(blob.users) if blob is not None else set()
            if users <= going:
                why = reason if kind == "manifest" else f"only used by removed {reason}"
                freed[digest] = DeletedBlob(digest, kind, size, why)
                erofs = state.layer_artifact(digest) if kind == "layer" else None
                if erofs is not None:
                    why = f"materialized layer only used by removed {reason}"
                    file = erofs.file
                    freed[file.path] = DeletedBlob(file.path, "artifact", file.size, why)
    return sorted(freed.values(), key=lambda b: (b.kind != "manifest", b.digest))


# What a prune's policy can hold: past these a duration means "everything was used within it"
# and a budget "everything fits", the same answers as the largest values the clock
# (``timedelta``) and the event encoding (a 64-bit integer) can represent.
MAX_SECONDS: Final = int(timedelta.max.total_seconds())
MAX_BYTES: Final = 2**63 - 1
_CLASS: Final = re.compile(r"\[[^\]]*\]")
_IPV6_HOST: Final = re.compile(r"\[[0-9a-fA-F:.]+\](?::[0-9]+)?")


@dataclass(frozen=True, slots=True)
class KeepPattern:
    """One `keep` pattern, read the way people write references.

    A keep rule that silently protects nothing is a data-loss trap: ``alpha`` must keep
    ``docker.io/library/alpha:3``. So a pattern is normalized like a reference (no registry
    means ``docker.io``, a one-component Docker Hub name gets ``library/``, the registry is
    lower-cased, ``index.docker.io`` is ``docker.io``) and no tag and no digest means every tag
    and every digest of the repository. ``*``, ``?`` and ``[...]`` are fnmatch wildcards within
    the normalized pattern (``*`` also crosses ``/``). A pattern also protects what it matched
    before normalization existed (the full canonical reference matched as written, and the
    repository name as written, so ``*/app`` covers every registry): matching more only keeps
    more, the safe direction.
    """

    text: str
    names: tuple[str, ...]  # fnmatch patterns for ``registry/repository``
    tag: str | None  # fnmatch pattern for the tag; None: any (when digest is None too)
    digest: str | None  # fnmatch pattern for the digest; it pins, so a tag beside it is ignored
    exact: str | None  # the canonical reference when the pattern parses as one
    exact_name: str | None  # its ``registry/repository`` when it names no tag and no digest

    @classmethod
    def parse(cls, text: str) -> KeepPattern:
        """Normalize `text` (see the class docstring); raise ValueError for a pattern that can
        never match anything (empty, surrounded by whitespace, control characters, an
        upper-case repository), so that a typo stops the prune instead of deleting."""
        if not isinstance(text, str):
            msg = f"prune: a keep pattern is a string, got {type(text).__name__}"
            raise TypeError(msg)
        if not text or text != text.strip() or not text.isprintable():
            msg = f"prune: keep pattern {_shown(text)} is empty, has whitespace around it or "
            msg += "control characters: it could match nothing"
            raise ValueError(msg)
        rest, at, digest = text.partition("@")
        tag: str | None = None
        colon = rest.rfind(":")
        if colon > rest.rfind("/"):
            rest, tag = rest[:colon], rest[colon + 1 :]
        first, slash, remainder = rest.partition("/")
        if slash and ("." in first or ":" in first or first == "localhost"):
            registry, repository = first.lower(), remainder
            if registry == "index.docker.io":
                registry = DEFAULT_REGISTRY
        else:
            registry, repository = DEFAULT_REGISTRY, rest
        if registry == DEFAULT_REGISTRY and "/" not in repository:
            repository = f"library/{repository}"
        plain = _CLASS.sub("", repository)
        if plain != plain.lower():
            msg = f"prune: keep pattern {_shown(text)} has an upper-case repository; "
            msg += "repositories are lower case, so it could match nothing"
            raise ValueError(msg)
        exact: str | None = None
        exact_name: str | None = None
        try:
            parsed = parse_reference(text)
        except InvalidReferenceError:
            pass
        else:
            exact = str(parsed)
            if not at and tag is None:
                exact_name = parsed.name
        if _IPV6_HOST.fullmatch(registry):
            # A bracketed IPv6 host is a host, not a character class: match it literally.
            registry = "[[]" + registry[1:]
            rest = "[[]" + rest[1:]
        names = tuple(dict.fromkeys((f"{registry}/{repository}", rest)))
        return cls(text, names, None if at else tag, digest if at else None, exact, exact_name)

    def matches(self, reference: Reference) -> bool:
        """Whether this pattern protects the canonical `reference`."""
        canonical_text = str(reference)
        if canonical_text in (self.exact, self.text) or reference.name == self.exact_name:
            return True
        if fnmatch.fnmatchcase(canonical_text, self.text):
            return True
        if not any(fnmatch.fnmatchcase(reference.name, name) for name in self.names):
            return False
        if self.digest is not None:
            return reference.digest is not None and fnmatch.fnmatchcase(
                reference.digest, self.digest
            )
        if self.tag is not None:
            return reference.tag is not None and fnmatch.fnmatchcase(reference.tag, self.tag)
        return True


def _shown(text: str, limit: int = 200) -> str:
    """`text` quoted for an error message, cut to `limit` characters: a hostile pattern must
    not become a megabyte of stderr."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def keep_patterns(keep: object) -> tuple[KeepPattern, ...]:
    """Parse the `keep` argument of a prune: a list (any iterable) of pattern strings.

    A bare string is refused: iterating it would make every character a pattern (``"alpha"``
    would keep whatever matches ``a``, ``l``, ... : nothing), the worst kind of silent."""
    if isinstance(keep, str | bytes | bytearray):
        msg = f"prune: keep must be a list of patterns, not a single {type(keep).__name__}"
        if isinstance(keep, str):
            msg += f" (write keep=[{_shown(keep)}])"
        raise TypeError(msg)
    if not isinstance(keep, Iterable):
        msg = f"prune: keep must be a list of patterns, got {type(keep).__name__}"
        raise TypeError(msg)
    return tuple(KeepPattern.parse(pattern) for pattern in keep)


def unmatched_keep(keep: Iterable[str], references: Iterable[str]) -> tuple[str, ...]:
    """The patterns of `keep` that match none of `references` (canonical): each one is a rule
    that protected nothing, which the caller is warned about (a typo there is how a prune
    deletes what someone meant to keep)."""
    patterns = keep_patterns(tuple(keep))
    if not patterns:
        return ()
    parsed = [parse_reference(r) for r in references]
    return tuple(p.text for p in patterns if not any(p.matches(r) for r in parsed))


def _matcher(keep: object) -> Callable[[str], bool]:
    """Whether a canonical reference is kept. `keep` is checked again here, not only by the
    cache: the service can be driven directly (benchmarks, tests) and a bare string must be
    refused before the plan, and so before anything is recorded or deleted."""
    patterns = keep_patterns(keep)

    def matches(reference: str) -> bool:
        if not patterns:
            return False
        ref = parse_reference(reference)
        return any(p.matches(ref) for p in patterns)

    return matches


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
    kept = _matcher(policy.keep)
    cutoff = _cutoff(now, policy.unused_for_seconds)

    def removable(ref: ReferenceRecord) -> bool:
        manifest = manifests.get(ref.manifest_digest)
        if manifest is None or manifest.holders or ref.manifest_digest in protected:
            return False
        if kept(ref.reference):
            return False
        if policy.unused_for_seconds is not None:
            return cutoff is not None and ref.last_used_at <= cutoff
        return True

    candidates = [r for r in refs if removable(r)]
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
        total = sum(blob.size for blob in state.blobs()) + artifact_bytes(state)
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


def plan_gc(
    state: CacheState,
    policy: GcPolicy,
    now: datetime,
    protected: frozenset[str],
    strays: Iterable[DeletedBlob],
) -> PrunePlan:
    """kubelet's image garbage collection (see `GcPolicy`) over one snapshot of the views and
    the disk figures `policy.disk` the caller read: a pure function of both.

    Never removed: a reference whose manifest is leased or protected by a pull in flight,
    and one younger than the minimum age (created less than `min_age_seconds` before `now`).
    Of the others: every one unused for more than `max_age_seconds` (kubelet's MaxAge,
    whatever the disk); then, when the use is at or above the high threshold, least
    recently used first (ties: created first), until what the removals free reaches
    `disk.to_free(low_threshold)`. What a removal frees is counted as prune counts it
    (`content_freed`): the blobs no remaining manifest uses, so a layer shared with an
    image that stays frees nothing; manifests left without a reference, and `strays`
    (files the ledger does not account for), are freed by any gc that acts and count
    first. A gc that has nothing to act on (no pressure, nothing too old) plans nothing at
    all, not even the strays: it leaves the cache as it found it.

    The estimate is the blobs' sizes, as prune reports them: a file system frees whole
    blocks, so the disk can end a little further below the low threshold than planned."""
    disk = policy.disk
    pressure = disk.at_least(policy.high_threshold)
    need = disk.to_free(policy.low_threshold) if pressure else 0
    manifests = {m.content.manifest_digest: m for m in state.manifests()}
    young = _cutoff(now, policy.min_age_seconds)

    def eligible(ref: ReferenceRecord) -> bool:
        manifest = manifests.get(ref.manifest_digest)
        if manifest is None or manifest.holders or ref.manifest_digest in protected:
            return False
        return young is not None and ref.created_at <= young

    candidates = sorted(
        (r for r in state.references() if eligible(r)),
        key=lambda r: (r.last_used_at, r.created_position),
    )
    old = None if policy.max_age_seconds is None else _cutoff(now, policy.max_age_seconds)
    too_old = [r for r in candidates if old is not None and r.last_used_at < old]
    if not pressure and not too_old:
        return PrunePlan(references=(), deleted=())

    # What the plan frees so far, kept as prune's `content_freed` would count it: a blob is
    # freed once every manifest using it goes (its last user is the one that frees it).
    remaining = {d: set(m.references) for d, m in manifests.items()}
    going: set[str] = set()
    freed: set[str] = set()
    stray_list = sorted(strays, key=_stray_key)
    freed_bytes = sum(s.size for s in stray_list)

    def drop(ref: ReferenceRecord) -> None:
        remaining[ref.manifest_digest].discard(ref.reference)
        if not remaining[ref.manifest_digest]:
            goes(ref.manifest_digest)

    def goes(digest: str) -> None:
        nonlocal freed_bytes
        going.add(digest)
        for blob_digest, _kind, size in manifests[digest].content.kinded_blobs():
            if blob_digest in freed or blob_digest in protected:
                continue
            blob = state.blob(blob_digest)
            if blob is None or set(blob.users) <= going:
                freed.add(blob_digest)
                freed_bytes += size

    for d, m in sorted(manifests.items()):
        if not m.references and not m.holders and d not in protected:
            goes(d)
    reasons: dict[str, str] = {}
    max_age = policy.max_age_seconds
    for ref in too_old:
        reasons[ref.reference] = f"unused for more than {max_age} s (gc max age)"
        drop(ref)
    if pressure:
        why = (
            f"least recently used, disk {disk.used_percent}% used >= "
            f"{policy.high_threshold}% (gc down to {policy.low_threshold}%)"
        )
        for ref in candidates:
            if freed_bytes >= need:
                break
            if ref.reference not in reasons:
                reasons[ref.reference] = why
                drop(ref)
    removed = tuple(
        RemovedReference(r.reference, r.manifest_digest, reasons[r.reference])
        for r in sorted(candidates, key=lambda r: r.reference)
        if r.reference in reasons
    )
    dangling = [manifests[d] for d in sorted(going)]
    deleted = content_freed(state, dangling, protected, "unreferenced manifest")
    return PrunePlan(references=removed, deleted=(*deleted, *stray_list))


def artifact_files(state: CacheState) -> Iterator[tuple[ArtifactFile, DeletedKind, str]]:
    """Every materialized artifact the ledger records: (file, kind, what it was made of: the
    layer blob's digest for a layer's EROFS image, the manifest's for its fsmeta and VMDK)."""
    for layer in state.layer_artifacts():
        yield layer.file, "artifact", layer.blob_digest
    for image in state.stitched_all():
        yield image.fsmeta, "fsmeta", image.manifest_digest
        yield image.vmdk, "vmdk", image.manifest_digest


def artifact_bytes(state: CacheState) -> int:
    """What the materialized artifacts the ledger records occupy (a budget counts them: they
    are on the same disk, and a prune frees them with their images)."""
    return sum(file.size for file, _kind, _of in artifact_files(state))


def accounted_artifacts(state: CacheState) -> frozenset[str]:
    """The paths (in the home) of every artifact the ledger records: under ``artifacts/``,
    anything else is a stray for prune to reclaim."""
    return frozenset(file.path for file, _kind, _of in artifact_files(state))


def _cutoff(now: datetime, unused_for_seconds: int | None) -> datetime | None:
    """The last use time that counts as unused: `now` minus the duration, or None when the
    duration reaches back before the calendar (``timedelta``'s range, about 2.7 million
    years; nothing was used that long ago, so nothing is old enough) instead of an
    OverflowError out of a prune."""
    if unused_for_seconds is None:
        return now
    try:
        return now - timedelta(seconds=unused_for_seconds)
    except OverflowError:
        return None


def _stray_key(blob: DeletedBlob) -> tuple[str, str]:
    return blob.kind, blob.digest
