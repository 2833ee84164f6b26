"""Every port through which the application service talks to storage, in one place; storage
implements them, `imageledger.cache` wires them.

The domain never imports LMDB, HTTP or the file system: it reads a consistent snapshot of the
views (`CacheState`) and appends typed events through the `Ledger`, asks the `BlobStore` about
bytes on disk, claims what a pull or load writes with `Leases`, and gets images from a `Puller`
(a registry) or `Archives`. A port's docstring says what the service relies on; the adapter's
says how it is done.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, Protocol, TypeAlias

from imageledger.domain.errors import LedgerError
from imageledger.domain.model import (
    ArtifactFile,
    BlobRecord,
    DeletedBlob,
    DiskUsage,
    H,
    LayerArtifactRecord,
    LoadedImage,
    ManifestRecord,
    Platform,
    PulledImage,
    PullEndpoint,
    RebuildReport,
    ReferenceRecord,
    StitchedRecord,
)
from imageledger.domain.reference import Reference

if TYPE_CHECKING:  # a query loads neither eventsourcing (see `domain.history`) nor the audit
    from eventsourcing.domain import DomainEventProtocol

    from imageledger.domain import merkle, note

    DomainEvent: TypeAlias = DomainEventProtocol[Any]
ArchiveSource = str | os.PathLike[str] | BinaryIO
ArchiveDestination = str | os.PathLike[str] | BinaryIO


@dataclass(frozen=True, slots=True)
class LiveLeases:
    """What the live pulls and loads hold: digests, and their work directories (paths in the
    home) that a prune must leave alone."""

    digests: frozenset[str]
    work: frozenset[str]


class ViewRecords(Protocol):
    """What the folds read and write: plain values (dict, list, str, int, bytes, None, aware
    datetimes, which come back in UTC) by table and key."""

    def get(self, table: str, key: bytes) -> Any: ...

    def put(self, table: str, key: bytes, value: Any) -> None: ...

    def delete(self, table: str, key: bytes) -> None: ...


class ViewTxn(ViewRecords, Protocol):
    """One transaction over the stored views, which storage encodes canonically."""

    def scan(
        self, table: str, *, prefix: bytes = b"", reverse: bool = False
    ) -> Iterator[tuple[bytes, Any]]: ...

    def scan_encoded(
        self, table: str, *, prefix: bytes = b"", reverse: bool = False
    ) -> Iterator[tuple[bytes, bytes]]:
        """`scan` without decoding: equal bytes are equal values (canonical encoding), so a
        reader can keep what it built from a row and skip rows it has seen."""

    def decode(self, value: bytes) -> Any:
        """One value from `scan_encoded`, as `scan` would give it."""


class CacheState(Protocol):
    """The cache as of one ledger position: what decisions and queries read."""

    @property
    def position(self) -> int: ...

    @property
    def version(self) -> int:
        """The ledger aggregate's version (0 before its first event)."""

    def reference(self, reference: str) -> ReferenceRecord | None: ...

    def references(self) -> Iterator[ReferenceRecord]:
        """Newest first by created_at, ties by ledger position, newest first."""

    def handles(self, memo: dict[bytes, H], cls: type[H]) -> Iterator[H]:
        """`references()` as handles of class `cls` (the list() fast path). `memo` maps
        encoded rows to the handles made from them: rows found there are not decoded again,
        and once the scan is done it holds exactly this scan's rows."""

    def manifest(self, digest: str) -> ManifestRecord | None: ...

    def manifests(self) -> Iterator[ManifestRecord]: ...

    def blob(self, digest: str) -> BlobRecord | None: ...

    def blobs(self) -> Iterator[BlobRecord]: ...

    def holder(self, holder: str) -> tuple[tuple[str, str], ...]:
        """The (reference, manifest digest) leases `holder` holds."""

    def endpoints(self, reference: str) -> tuple[PullEndpoint, ...]:
        """Where the registry pull that last named `reference` came from (empty: a load, a
        tag, a pull the cache answered itself, or a pull recorded before endpoints were)."""

    def layer_artifact(self, blob_digest: str) -> LayerArtifactRecord | None:
        """The EROFS image of layer blob `blob_digest`, if the ledger records one."""

    def layer_artifacts(self) -> Iterator[LayerArtifactRecord]: ...

    def stitched(self, manifest_digest: str) -> StitchedRecord | None:
        """The fsmeta and VMDK of manifest `manifest_digest`, if the ledger records them."""

    def stitched_all(self) -> Iterator[StitchedRecord]: ...


class InFlight(Protocol):
    """Content that pulls and loads still running (in any process) have written or need."""

    def protected(self) -> frozenset[str]:
        """Digests a live pull holds; stale holders (crashed processes) are cleared."""


class StoreLock(Protocol):
    """Serialises "decide, commit, unlink" against "check blobs, commit" across processes."""

    def __call__(self) -> AbstractContextManager[None]: ...


class Snapshot(CacheState, Protocol):
    """One consistent read of the views, with what only the service's bookkeeping needs."""

    @property
    def shown(self) -> int:
        """The position of the last event that changed what index.json shows."""

    def history(self, reference: str) -> Iterator[int]:
        """The log positions of `reference`'s events, oldest first."""


class AppendConflict(Exception):
    """`Ledger.append` found one of its versions taken by another writer: the service decides
    again on a fresh snapshot. It never leaves the service (after too many attempts the
    service raises `LedgerError`), which is why it is not part of `domain.errors`."""


class Ledger(Protocol):
    """The event log and the views folded from it in the same transaction."""

    def snapshot(self) -> AbstractContextManager[Snapshot]: ...

    def append(self, events: Sequence[DomainEvent]) -> None:
        """Save `events` (the ledger's next versions) and fold them into the views, in one
        transaction; `AppendConflict` if another writer took one of the versions."""

    def events(self, reference: str | None) -> list[tuple[int, DomainEvent]]:
        """(position, event) of every event of `reference` (by the views' history index,
        read in the same snapshot as the log), or of the whole log; oldest first."""

    def rebuild(
        self, *, verify: bool, progress: Callable[[int, int], None] | None
    ) -> RebuildReport:
        """Replay the log into fresh views and compare them with the live ones; unless
        `verify`, make them live (one rebuild at a time per home)."""

    def check(self) -> LedgerError | None:
        """Check the stored ledger where damage cannot crash this process (a child)."""

    def head(self) -> int:
        """The log's last position (0: empty)."""

    def position_at(self, when: datetime) -> int:
        """The last position whose event happened at or before `when` (0: none)."""

    def at(self, position: int) -> Ledger:
        """The ledger as it was after the event at `position`, read only."""

    def disk(self) -> tuple[int, int]:
        """The bytes the log's pages take, and the view checkpoints' (`at`'s derived data)."""


@dataclass
class TreeReplay:
    """The audit tree recomputed from the log's stored records (`AuditLog.replay`)."""

    size: int = 0
    roots: dict[int, bytes] = field(default_factory=dict)
    """The root at each size the replay was asked for (the checkpoints' sizes)."""
    stored_digest: str = ""
    digest: str = ""
    """SHA-256 over the stored tiles and over the replayed ones."""
    first_bad: int | None = None
    """The first log position where the log and the stored tree disagree, if any."""
    problem: str = ""


class AuditState(Protocol):
    """One consistent read of the audit tree and its checkpoints."""

    @property
    def size(self) -> int:
        """The tree's size: the number of events it covers."""

    def tiles(self) -> merkle.Tiles: ...

    def checkpoints(self) -> list[tuple[int, bytes]]:
        """(size, signed note) of every kept checkpoint, smallest first."""

    def last_checkpoint(self) -> tuple[int, bytes] | None: ...

    def record(self, position: int) -> bytes:
        """The stored record at log `position` (the leaf's data)."""


class AuditLog(Protocol):
    """The ledger as a transparency log (storage/tlog.py, kept in the ledger's transactions)."""

    def origin(self) -> str:
        """The log's origin, made and kept the first time it is asked for."""

    def head(self) -> int:
        """The log's last position (the tree's size too, once it has caught up)."""

    def audit_state(self) -> AbstractContextManager[AuditState]: ...

    def keep_checkpoint(self, size: int, note: bytes, expect_last: int | None) -> bool:
        """Keep a signed checkpoint unless another was kept since the one at `expect_last`."""

    def replay(self, at_sizes: Sequence[int]) -> TreeReplay:
        """The tree recomputed from every stored record, compared with the stored one."""

    def export_tiles(self, directory: str, size: int, note: str) -> int:
        """Write (or extend) the C2SP tlog-tiles directory of the log at its checkpoint of
        `size` (signed note `note`); the number of files written."""

    def entries(self, first: int, last: int) -> Iterator[tuple[int, bytes, dict[str, Any]]]:
        """(position, stored record, its fields as plain data) from `first` to `last`, read in
        one snapshot, one at a time (an export of a million events in constant memory)."""


class AuditKeys(Protocol):
    """Where the audit log's signing key is kept (storage/auditkey.py)."""

    @property
    def where(self) -> str:
        """Where the key is (a path; never its content)."""

    def signer(self, origin: str, *, create: bool) -> note.Signer: ...


class BlobStore(Protocol):
    """The blob store and the other entries under the home that prune and verify judge."""

    def size(self, digest: str) -> int | None: ...

    def check(self, digest: str, size: int) -> str | None:
        """None when the blob is intact, else ``missing``, ``wrong size`` or ``corrupt``."""

    def delete(self, digest: str) -> int: ...

    def digests(self) -> Iterator[str]: ...

    def strays(self) -> list[DeletedBlob]:
        """Entries that are no blob: partial files, stray names under ``blobs/``, unmaterialized
        artifacts (each named by its path in the home, with its kind)."""

    def delete_entry(self, entry: DeletedBlob) -> int:
        """Delete what a committed remove or prune named: a blob by digest, anything else by
        its path in the home (the entry's kind says which)."""

    def disk_usage(self) -> DiskUsage:
        """The file system that holds the home, as it is now (what a gc decides on)."""


class SourceStore(Protocol):
    """The blob store as one pull or load writes into it: every digest it touches is claimed
    by the run's in-flight lease first, so a prune or remove spares it until the commit."""

    @property
    def written(self) -> set[str]:
        """The digests this run wrote (rather than found)."""

    def size(self, digest: str) -> int | None: ...

    def delete(self, digest: str) -> int:
        """Delete a blob this run wrote, unless a live run or the ledger needs it."""

    def clear_work(self) -> None:
        """Empty the run's work directory (partial files)."""


class Leases(InFlight, Protocol):
    def live(self) -> LiveLeases:
        """Every live lease's digests and work directories (call under the store lock)."""

    def bringing(self, known: Callable[[str], bool]) -> AbstractContextManager[SourceStore]:
        """One pull's or load's lease and the store as it writes through it; `known(digest)`
        says whether the ledger accounts for a blob (a failed run never deletes those)."""


class Puller(Protocol):
    """A registry, configured for one pull (options, progress)."""

    def admit(self, reference: Reference) -> None:
        """Refuse a reference the registries configuration blocks (`RegistryBlockedError`),
        before anything else: a pull the cache could answer itself is refused too."""

    def pull(self, reference: Reference, store: SourceStore, platform: Platform) -> PulledImage:
        """Fetch `reference` (an index resolved to `platform`) into `store`; the image and
        the endpoints (mirrors, the primary location) that served it."""


class Archives(Protocol):
    """OCI layouts and docker archives, read and written."""

    def label(self, source: ArchiveSource) -> str:
        """What the ledger records as a load's source (``oci-layout:PATH``, ``archive:stdin``)."""

    def load(self, source: ArchiveSource, store: SourceStore) -> list[LoadedImage]: ...

    def save(
        self,
        images: Sequence[tuple[str, str]],
        destination: ArchiveDestination,
        *,
        format: Literal["docker", "oci"],
    ) -> None:
        """Write (reference, manifest digest) images to `destination` (never into the home)."""


class OciIndex(Protocol):
    """The home's ``index.json`` (the home is an OCI image layout)."""

    def refresh(self, *, force: bool = False) -> None:
        """Rewrite it if it does not show what the views show (with `force`, anyway)."""


class BuiltArtifact(Protocol):
    """What a `Materializer` says it wrote (storage re-hashes the file before it is
    recorded: the ledger never takes a writer's word for a digest)."""

    @property
    def size(self) -> int: ...

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of the bytes written."""


class Materializer(Protocol):
    """What turns an image into what a microVM boots: the bytes of each layer's EROFS image,
    of the fsmeta joining them and of the VMDK descriptor (`storage.materializer.
    ErofsMaterializer` by default; an embedder may plug its own). It only writes to the
    streams it is given: where files go, locks, fsync and the ledger are the cache's, so the
    ledger records every materializer the same way, by its `name`."""

    @property
    def name(self) -> str:
        """Who wrote the artifacts, as the ledger records it (e.g. ``imageledger-erofs``)."""

    def build_layer(self, blob: BinaryIO, out: BinaryIO, *, diff_id: str) -> BuiltArtifact:
        """Write the layer `blob` (as stored: gzip, zstd or plain tar, checked against
        `diff_id` while read) to `out` (opened ``w+b``) as an EROFS image."""

    def build_fsmeta(self, layers: Sequence[os.PathLike[str]], out: BinaryIO) -> BuiltArtifact:
        """Write the merged tree of `layers` (layer images, bottom to top) to `out`."""

    def vmdk_descriptor(self, extents: Sequence[tuple[str, int]]) -> str:
        """The VMDK descriptor joining `extents` ((absolute path, size in bytes): fsmeta,
        then the layers bottom to top) into one disk."""


class StagedArtifact(Protocol):
    """An artifact written whole and fsynced in a materialize's work directory, not yet in
    place: `install` renames it to `file.path` (the ledger must record it under the store
    lock right after); `discard` deletes it if it is still in the work directory."""

    @property
    def file(self) -> ArtifactFile: ...

    def install(self) -> None: ...

    def discard(self) -> None: ...


class ArtifactWork(Protocol):
    """One materialize's in-flight lease: the blobs it reads are claimed (a prune or remove
    spares them until it ends) and its files are written in the lease's work directory, so a
    crash leaves only files that the next prune reclaims."""

    def layer(
        self, blob_digest: str, diff_id: str, materializer: Materializer
    ) -> StagedArtifact: ...

    def fsmeta(
        self, manifest_digest: str, layers: Sequence[ArtifactFile], materializer: Materializer
    ) -> StagedArtifact: ...

    def vmdk(self, manifest_digest: str, descriptor: bytes) -> StagedArtifact: ...


class ArtifactStore(Protocol):
    """The materialized artifacts under the home (``artifacts/``)."""

    def working(self, digests: Sequence[str]) -> AbstractContextManager[ArtifactWork]:
        """A materialize's lease over the blobs `digests` (see `ArtifactWork`)."""

    def lock(self, kind: str, digest: str) -> AbstractContextManager[None]:
        """An exclusive lock (threads and processes) on making artifact `kind` of `digest`,
        so that two materializations of one layer or image write it once."""

    def size(self, path: str) -> int | None:
        """The size of the artifact file at `path` (in the home), None when it is not there."""

    def check(self, file: ArtifactFile) -> str | None:
        """None when the file is there and hashes to its digest, else ``missing``, ``wrong
        size`` or ``corrupt``."""

    def where(self, path: str) -> str:
        """The absolute path of `path` in the home (what a VMDK and a runtime name)."""
