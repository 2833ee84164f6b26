"""Value types of the image cache: what an image is, as events record it and views show it.

All are frozen and hashable, hold only str/int/None/tuples (no floats, no dicts, no sets), so
that encoding them is canonical and a view rebuilt from the log is byte-identical (semantics 10).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Generic, Literal, Protocol, TypeVar

# Media types (OCI image spec and Docker's v2 schema 2): the one place they are spelled.
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
UNCOMPRESSED_LAYER_TYPES = (OCI_LAYER, DOCKER_LAYER)
# Docker's schema 1 manifests: recognised only to be refused with a clear message.
SCHEMA1_TYPES = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)


BlobKind = Literal["manifest", "config", "layer"]


@dataclass(frozen=True, slots=True)
class Platform:
    """The image's own platform (from its config, or the index entry that chose it)."""

    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """The runtime configuration a sandbox needs from the image's config blob."""

    digest: str
    env: tuple[str, ...] = ()
    cmd: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    working_dir: str | None = None
    user: str | None = None
    labels: tuple[tuple[str, str], ...] = ()  # sorted by key
    stop_signal: str | None = None


@dataclass(frozen=True, slots=True)
class Layer:
    """One layer, bottom (position 0) to top; `diff_id` is the digest of the uncompressed tar."""

    blob_digest: str
    media_type: str
    compressed_size_bytes: int
    diff_id: str | None
    position: int


@dataclass(frozen=True, slots=True)
class ImageContent:
    """An image whose blobs (manifest, config, layers) are all verified in the blob store."""

    manifest_digest: str
    manifest_media_type: str
    manifest_size: int
    config: ImageConfig
    config_size: int
    platform: Platform
    layers: tuple[Layer, ...]

    @property
    def blobs(self) -> tuple[tuple[str, int], ...]:
        """(digest, size) of every blob the image occupies, manifest first, layers in order."""
        return (
            (self.manifest_digest, self.manifest_size),
            (self.config.digest, self.config_size),
            *((layer.blob_digest, layer.compressed_size_bytes) for layer in self.layers),
        )

    @property
    def size_bytes(self) -> int:
        """Semantics 5: what the image's distinct blobs occupy in the store."""
        return sum(dict(self.blobs).values())

    def kinded_blobs(self) -> tuple[tuple[str, BlobKind, int], ...]:
        """(digest, kind, size) of each distinct blob: manifest, config, then layers."""
        seen: dict[str, tuple[str, BlobKind, int]] = {}
        seen[self.manifest_digest] = (self.manifest_digest, "manifest", self.manifest_size)
        seen.setdefault(self.config.digest, (self.config.digest, "config", self.config_size))
        for layer in self.layers:
            seen.setdefault(
                layer.blob_digest, (layer.blob_digest, "layer", layer.compressed_size_bytes)
            )
        return tuple(seen.values())


@dataclass(frozen=True, slots=True)
class PullEndpoint:
    """Where part of a pull came from (the registries configuration may send it to mirrors
    or a rewritten location): `location` is the repository there (``host[:port]/repo``),
    `mirror` whether it is a mirror rather than the primary location, `insecure` whether it
    was spoken to over plain HTTP, `manifest` whether it served the image's manifest(s), and
    `blobs` the digests of the blobs downloaded from it (blobs already cached came from
    nowhere). An auditor reads from these that an image came from a mirror."""

    location: str
    mirror: bool
    insecure: bool
    manifest: bool
    blobs: tuple[str, ...] = ()

    def as_array(self) -> list[Any]:
        """As the ledger (FORMAT.md) and the ``endpoints`` view store it: one array, the
        fields in order."""
        return [self.location, self.mirror, self.insecure, self.manifest, list(self.blobs)]

    def as_json(self) -> dict[str, Any]:
        """As FORMAT.md names its fields (`events --json`, `explain`)."""
        return {
            "location": self.location,
            "mirror": self.mirror,
            "insecure": self.insecure,
            "manifest": self.manifest,
            "blobs": list(self.blobs),
        }

    def describe(self) -> str:
        """In words, for history: ``mirror HOST/REPO (manifest, 3 blobs)``."""
        served = (["manifest"] if self.manifest else []) + (
            [f"{len(self.blobs)} blob{'' if len(self.blobs) == 1 else 's'}"] if self.blobs else []
        )
        role = "mirror " if self.mirror else ""
        return f"{role}{self.location} ({', '.join(served)})"


@dataclass(frozen=True, slots=True)
class PulledImage:
    """What a registry pull brought: the image, and the endpoints that served it."""

    content: ImageContent
    endpoints: tuple[PullEndpoint, ...] = ()


@dataclass(frozen=True, slots=True)
class LoadedImage:
    """What a source delivers: the content plus the names the source gave it (raw spellings)."""

    content: ImageContent
    names: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class CachedImage:
    """One cached reference as the seed API's handle shows it: the value both APIs' handles
    carry. Handles compare and hash by these fields alone, whichever API they came from (a
    handle from the asyncio API equals the blocking API's handle of the same state).

    Not slotted, unlike the other values: list() builds thousands at a time by handing each a
    ready field map as its `__dict__` (see `ViewState.handles`)."""

    reference: str
    manifest_digest: str
    architecture: str
    os: str
    layer_count: int
    size_bytes: int
    created_at: datetime | None
    last_used_at: datetime | None

    def _values(self) -> tuple[object, ...]:
        return (
            self.reference,
            self.manifest_digest,
            self.architecture,
            self.os,
            self.layer_count,
            self.size_bytes,
            self.created_at,
            self.last_used_at,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CachedImage):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())


class HandleOwner(Protocol):
    """What a blocking handle calls back: the cache that answered."""

    def inspect(self, reference: str) -> ImageDetail[ImageHandle]: ...

    def remove(self, reference: str, force: bool = False) -> None: ...


@dataclass(frozen=True, eq=False)
class ImageHandle(CachedImage):
    """The blocking API's handle (`ImageCache`): `inspect()` and `remove()` act on the cache
    it came from. The asyncio API's is `imageledger.aio.AsyncImageHandle`."""

    # The cache that answered; not part of the value.
    _owner: HandleOwner | None = field(default=None, compare=False, repr=False)

    def inspect(self) -> ImageDetail[ImageHandle]:
        """The image's details, as the cache holds them now."""
        return self._require_owner().inspect(self.reference)

    def remove(self, force: bool = False) -> None:
        """Remove this reference (semantics 6-7)."""
        self._require_owner().remove(self.reference, force)

    def _require_owner(self) -> HandleOwner:
        if self._owner is None:
            msg = "this handle was not obtained from a cache"
            raise RuntimeError(msg)
        return self._owner


@dataclass(frozen=True, slots=True)
class ArtifactFile:
    """A materialized file as the ledger records it: where it is (a path in the home, e.g.
    ``artifacts/layers/<hex>.erofs``), the digest of its bytes and its size."""

    path: str
    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class MaterializedLayer:
    """One layer of a materialized image: its uncompressed EROFS image (`path` absolute)."""

    diff_id: str
    blob_digest: str
    path: str
    erofs_digest: str
    erofs_size_bytes: int


@dataclass(frozen=True, slots=True)
class MaterializedImage:
    """`materialize()`: what a microVM runtime boots. `vmdk` joins `fsmeta` (the merged tree,
    metadata only) and the layers' EROFS images, bottom to top, into one read-only disk; every
    path is absolute. `written` counts the files this call wrote (0: all were there and
    recorded; a moved home rewrites the VMDK)."""

    reference: str
    manifest_digest: str
    vmdk: str
    fsmeta: str
    layers: tuple[MaterializedLayer, ...]
    vmdk_size_bytes: int
    fsmeta_size_bytes: int
    materializer: str
    written: int


@dataclass(frozen=True, slots=True)
class ImageLayer:
    """One layer of an image as `inspect()` reports it (the seed API's name)."""

    diff_id: str | None
    blob_digest: str
    media_type: str
    compressed_size_bytes: int | None
    erofs_size_bytes: int | None
    position: int


# Covariant: a detail is read-only, so a detail of either API's handle is a detail of a
# `CachedImage`.
H_co = TypeVar("H_co", bound=CachedImage, covariant=True)
# A handle class, for functions that make handles of the class they are given.
H = TypeVar("H", bound=CachedImage)


@dataclass(frozen=True, slots=True)
class ImageDetail(Generic[H_co]):
    """`inspect()`: the handle (of the API that answered) plus config and layers (bottom to
    top)."""

    handle: H_co
    config: ImageConfig
    layers: tuple[ImageLayer, ...]
    endpoints: tuple[PullEndpoint, ...] = ()
    """Where the registry pull that last named the image came from (mirrors, a rewritten
    location, the registry itself); empty for a loaded or tagged name."""


@dataclass(frozen=True, slots=True)
class Actor:
    """Who and where an event came from, so the audit trail needs no schema change later.
    No secret: a user name and ids, never a credential."""

    user: str
    uid: int
    pid: int
    host: str
    version: str


# What a remove or prune deletes. The first four are blobs, named by digest; the others are
# entries of the home that are no blob, named by their path in the home.
DeletedKind = Literal[
    "manifest", "config", "layer", "orphan", "partial", "stray", "artifact", "fsmeta", "vmdk"
]
BLOB_KINDS: Final = frozenset({"manifest", "config", "layer", "orphan"})


@dataclass(frozen=True, slots=True)
class DeletedBlob:
    """One blob (or other entry of the home) a remove or prune deleted, and why. `digest`
    names it: a blob's digest, or for the kinds that are no blob (`by_path`) its path in the
    home (the field keeps its name: events store it)."""

    digest: str
    kind: DeletedKind
    size: int
    reason: str

    @property
    def by_path(self) -> bool:
        """Whether `digest` is a path in the home rather than a blob's digest."""
        return self.kind not in BLOB_KINDS


@dataclass(frozen=True, slots=True)
class PrunePolicy:
    """What a prune may remove. The seed's default (all fields empty) removes every reference
    whose manifest has no lease and no pull in flight, then everything unreferenced."""

    dry_run: bool = False
    unused_for_seconds: int | None = None  # keep references used within this many seconds
    keep: tuple[str, ...] = ()  # references or fnmatch patterns never removed
    max_bytes: int | None = None  # evict least recently used until the cache fits
    gc: GcPolicy | None = None  # a disk-pressure gc: its thresholds and the disk it saw


@dataclass(frozen=True, slots=True)
class DiskUsage:
    """The file system that holds the home, in bytes, as statvfs(3) reports it: `size` =
    f_blocks * f_frsize, `used` = (f_blocks - f_bfree) * f_frsize, `available` = f_bavail *
    f_frsize (what an unprivileged writer can still take; the root reserve is neither).

    Use is ``used / (used + available)``: what df(1) prints as Use% (df rounds it up). kubelet
    computes ``1 - available / capacity`` with the whole size as capacity, so it counts the
    root reserve as used; on a file system without one (tmpfs, XFS) the two agree. Used +
    available is the part a writer can ever fill, which is what "full" means to a pull."""

    size: int
    used: int
    available: int

    @property
    def usable(self) -> int:
        """Used + available: the bytes the use is a percentage of."""
        return self.used + self.available

    def at_least(self, percent: int) -> bool:
        """Whether the use is `percent` or more (exact integer arithmetic, no rounding)."""
        return self.usable > 0 and self.used * 100 >= percent * self.usable

    @property
    def used_percent(self) -> int:
        """The use in whole percent, rounded up as df prints it."""
        return 0 if self.usable <= 0 else -(-self.used * 100 // self.usable)

    def to_free(self, percent: int) -> int:
        """The bytes to free so that the use is at most `percent` (0 when it already is)."""
        return max(self.used - percent * self.usable // 100, 0)


@dataclass(frozen=True, slots=True)
class GcPolicy:
    """kubelet's image garbage collection policy, by its names: at or above
    `high_threshold` percent of use, remove unused images least recently used first until
    the use is at most `low_threshold` percent; never an image younger than
    `min_age_seconds` (since it was first pulled); and, with `max_age_seconds`, any image
    unused for longer, whatever the disk. `disk` is what the gc saw when it decided."""

    high_threshold: int
    low_threshold: int
    min_age_seconds: int
    max_age_seconds: int | None
    disk: DiskUsage

    @property
    def to_free(self) -> int:
        """The bytes this gc had to free: 0 below the high threshold."""
        under = not self.disk.at_least(self.high_threshold)
        return 0 if under else self.disk.to_free(self.low_threshold)

    def describe(self) -> str:
        """The policy and the disk it saw, in words (history, the CLI)."""
        words = (
            f"gc at {self.disk.used_percent}% of {self.disk.usable} bytes used "
            f"(high {self.high_threshold}%, low {self.low_threshold}%, "
            f"min age {self.min_age_seconds} s"
        )
        if self.max_age_seconds is not None:
            words += f", max age {self.max_age_seconds} s"
        return words + ")"

    def as_json(self) -> dict[str, Any]:
        """The policy and the disk it saw, as JSON (explain, the CLI's gc --json)."""
        return {
            "high_threshold": self.high_threshold,
            "low_threshold": self.low_threshold,
            "min_age_seconds": self.min_age_seconds,
            "max_age_seconds": self.max_age_seconds,
            "disk": {
                "size_bytes": self.disk.size,
                "used_bytes": self.disk.used,
                "available_bytes": self.disk.available,
                "used_percent": self.disk.used_percent,
                "bytes_to_free": self.to_free,
            },
        }


@dataclass(frozen=True, slots=True)
class RemovedReference:
    reference: str
    manifest_digest: str
    reason: str


@dataclass(frozen=True, slots=True)
class ImagePruneReport:
    """The seed API's prune report, plus what was (or would be) removed and why."""

    image_refs_removed: int
    manifests_removed: int
    layers_removed: int
    fsmeta_removed: int
    vmdk_removed: int
    bytes_reclaimed: int
    dry_run: bool = False
    references: tuple[RemovedReference, ...] = ()
    deleted: tuple[DeletedBlob, ...] = ()
    # keep patterns that matched no cached reference: a rule that protected nothing (a typo?)
    unmatched_keep: tuple[str, ...] = ()
    # a disk-pressure gc's policy and the disk it saw (None for a prune)
    gc: GcPolicy | None = None

    @classmethod
    def of(
        cls,
        references: Sequence[RemovedReference],
        deleted: Sequence[DeletedBlob],
        bytes_reclaimed: int,
        *,
        dry_run: bool = False,
        unmatched_keep: Sequence[str] = (),
        gc: GcPolicy | None = None,
        counted: Sequence[DeletedBlob] | None = None,
    ) -> ImagePruneReport:
        """The report of a prune that removed `references` and `deleted` (the one place its
        counts are made, for the API, the CLI and the history alike). `counted`: the entries
        of `deleted` really unlinked, which the counts count (default: all of them)."""
        kinds = [entry.kind for entry in (deleted if counted is None else counted)]
        return cls(
            image_refs_removed=len(references),
            manifests_removed=kinds.count("manifest"),
            layers_removed=kinds.count("layer"),
            fsmeta_removed=kinds.count("fsmeta"),
            vmdk_removed=kinds.count("vmdk"),
            bytes_reclaimed=bytes_reclaimed,
            dry_run=dry_run,
            references=tuple(references),
            deleted=tuple(deleted),
            unmatched_keep=tuple(unmatched_keep),
            gc=gc,
        )


# ---- what the views hold (read through the domain's CacheState port) ----------------------


@dataclass(frozen=True, slots=True)
class ReferenceRecord:
    """A cached reference as the views hold it; `created_position` orders ties in list()."""

    reference: str
    manifest_digest: str
    created_at: datetime
    last_used_at: datetime
    created_position: int
    architecture: str
    os: str
    layer_count: int
    size_bytes: int

    def handle(self) -> ImageHandle:
        return ImageHandle(
            reference=self.reference,
            manifest_digest=self.manifest_digest,
            architecture=self.architecture,
            os=self.os,
            layer_count=self.layer_count,
            size_bytes=self.size_bytes,
            created_at=self.created_at,
            last_used_at=self.last_used_at,
        )


@dataclass(frozen=True, slots=True)
class ManifestRecord:
    """A manifest in the cache: its content, the references naming it and the leases on it."""

    content: ImageContent
    references: tuple[str, ...]  # sorted
    holders: tuple[str, ...]  # sorted; holders of a lease on this manifest
    last_used_at: datetime


@dataclass(frozen=True, slots=True)
class BlobRecord:
    """A blob the ledger accounts for and the manifests that keep it live."""

    digest: str
    kind: str  # manifest | config | layer
    size: int
    users: tuple[str, ...]  # sorted manifest digests


@dataclass(frozen=True, slots=True)
class LayerArtifactRecord:
    """A layer blob's EROFS image as the views hold it (the last `LayerMaterialized`)."""

    blob_digest: str
    diff_id: str
    file: ArtifactFile
    materializer: str


@dataclass(frozen=True, slots=True)
class StitchedRecord:
    """A manifest's fsmeta and VMDK as the views hold them (the last `ImageStitched`)."""

    manifest_digest: str
    fsmeta: ArtifactFile
    vmdk: ArtifactFile
    layers: tuple[str, ...]  # the layers' EROFS digests, bottom to top
    materializer: str


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One event in the life of a reference (or, for the whole ledger, one event). The ledger
    is the record: entries are made from the events at query time (`projections.views`)."""

    position: int
    event: str
    at: datetime
    reference: str
    manifest_digest: str
    detail: str
    user: str
    host: str
    pid: int


@dataclass(frozen=True, slots=True)
class BlobProblem:
    """A blob the ledger accounts for that the store does not hold intact, or an entry under
    ``blobs/`` that is not a blob at all (kind ``stray``, named by its path in the home)."""

    digest: str
    kind: str  # manifest | config | layer | stray
    problem: str  # missing | wrong size | corrupt | not a blob
    references: tuple[str, ...]  # the cached references whose images need it, sorted
    repaired: bool  # deleted (a wrong blob), so the next pull or load fetches it again


@dataclass(frozen=True, slots=True)
class StoreCheck:
    """What `verify` found: every blob the ledger accounts for, read back and hashed."""

    blobs_checked: int
    bytes_checked: int
    problems: tuple[BlobProblem, ...]
    # Materialized artifacts the ledger records (layer EROFS images, fsmeta, VMDK), read back
    # and hashed like the blobs; their problems are in `problems` (kind artifact/fsmeta/vmdk,
    # `digest` their path in the home).
    artifacts_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class RebuildReport:
    """What `rebuild` found: how many events were replayed, whether the rebuilt views went
    live, and per table the digest of the live views beside the rebuilt ones."""

    events: int
    activated: bool
    tables: dict[str, tuple[str, str]]  # table -> (live digest, rebuilt digest)

    @property
    def identical(self) -> bool:
        return all(live == rebuilt for live, rebuilt in self.tables.values())


# ---- value types as plain arrays: the ledger's stored format (docs/FORMAT.md) and the views


def config_to_array(config: ImageConfig) -> list[Any]:
    """[digest, env, cmd, entrypoint, working_dir, user, labels as [key, value] pairs,
    stop_signal]: lists and nil for absent values."""
    return [
        config.digest,
        list(config.env),
        None if config.cmd is None else list(config.cmd),
        None if config.entrypoint is None else list(config.entrypoint),
        config.working_dir,
        config.user,
        [list(label) for label in config.labels],
        config.stop_signal,
    ]


def config_from_array(array: list[Any]) -> ImageConfig:
    digest, env, cmd, entrypoint, working_dir, user, labels, stop_signal = array
    return ImageConfig(
        digest,
        tuple(env),
        None if cmd is None else tuple(cmd),
        None if entrypoint is None else tuple(entrypoint),
        working_dir,
        user,
        tuple((key, value) for key, value in labels),
        stop_signal,
    )
