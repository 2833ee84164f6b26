"""The ports through which the domain talks to storage; storage implements them.

The domain never imports LMDB, HTTP or the file system: it reads a consistent snapshot of the
views (`CacheState`), appends through a `Ledger`, and asks a `ContentStore` about bytes on disk.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

from imageledger.domain.model import BlobRecord, ImageHandle, ManifestRecord, ReferenceRecord


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

    def handles(self, memo: dict[bytes, ImageHandle] | None = None) -> Iterator[ImageHandle]:
        """`references()` as handles (the list() fast path). `memo` maps encoded rows to the
        handles made from them: rows found there are not decoded again, and once the scan
        is done it holds exactly this scan's rows."""

    def manifest(self, digest: str) -> ManifestRecord | None: ...

    def manifests(self) -> Iterator[ManifestRecord]: ...

    def blob(self, digest: str) -> BlobRecord | None: ...

    def blobs(self) -> Iterator[BlobRecord]: ...

    def holder(self, holder: str) -> tuple[tuple[str, str], ...]:
        """The (reference, manifest digest) leases `holder` holds."""


class ContentStore(Protocol):
    """The bytes on disk, as far as decisions about deleting them go."""

    def size(self, digest: str) -> int | None: ...

    def delete(self, digest: str) -> int: ...


class InFlight(Protocol):
    """Content that pulls and loads still running (in any process) have written or need."""

    def protected(self) -> frozenset[str]:
        """Digests a live pull holds; stale holders (crashed processes) are cleared."""


class StoreLock(Protocol):
    """Serialises "decide, commit, unlink" against "check blobs, commit" across processes."""

    def __call__(self) -> AbstractContextManager[None]: ...
