"""imageledger: a local OCI image cache whose whole state is an event-sourced ledger in LMDB.

The public surface is what this module exports; everything else is private to the package.
`ImageCache` is the blocking API and `Image` the asyncio one; every error either can raise is
exported here and derives from `ImageLedgerError` (the hierarchy is in `domain.errors`).
"""

from imageledger._version import __version__
from imageledger.aio import AsyncImageHandle, Image
from imageledger.cache import ImageCache, default_home
from imageledger.domain.errors import (
    CacheClosedError,
    ContentCorruptError,
    ContentMissingError,
    DigestMismatchError,
    DiskFullError,
    HomeDamagedError,
    HomeError,
    HomeNotFoundError,
    ImageInUseError,
    ImageLedgerError,
    ImageNotFoundError,
    InvalidDestinationError,
    InvalidHomeError,
    InvalidReferenceError,
    LedgerCorruptError,
    LedgerError,
    LedgerFullError,
    LedgerMissingError,
    LedgerReadOnlyError,
    PlatformNotFoundError,
)
from imageledger.domain.model import (
    BlobProblem,
    CachedImage,
    HistoryEntry,
    ImageConfig,
    ImageDetail,
    ImageHandle,
    ImageLayer,
    ImagePruneReport,
    Platform,
    RebuildReport,
    StoreCheck,
)
from imageledger.domain.reference import Reference, canonical
from imageledger.domain.service import check_holder
from imageledger.storage.oci import InvalidPlatformError
from imageledger.storage.registry import (
    NotInRegistryError,
    PullProgress,
    RegistryAuthError,
    RegistryConfigError,
    RegistryError,
    RegistryOptions,
    RegistryTimeoutError,
)

__all__ = [
    "AsyncImageHandle",
    "BlobProblem",
    "CacheClosedError",
    "CachedImage",
    "ContentCorruptError",
    "ContentMissingError",
    "DigestMismatchError",
    "DiskFullError",
    "HistoryEntry",
    "HomeDamagedError",
    "HomeError",
    "HomeNotFoundError",
    "Image",
    "ImageCache",
    "ImageConfig",
    "ImageDetail",
    "ImageHandle",
    "ImageInUseError",
    "ImageLayer",
    "ImageLedgerError",
    "ImageNotFoundError",
    "ImagePruneReport",
    "InvalidDestinationError",
    "InvalidHomeError",
    "InvalidPlatformError",
    "InvalidReferenceError",
    "LedgerCorruptError",
    "LedgerError",
    "LedgerFullError",
    "LedgerMissingError",
    "LedgerReadOnlyError",
    "NotInRegistryError",
    "Platform",
    "PlatformNotFoundError",
    "PullProgress",
    "RebuildReport",
    "Reference",
    "RegistryAuthError",
    "RegistryConfigError",
    "RegistryError",
    "RegistryOptions",
    "RegistryTimeoutError",
    "StoreCheck",
    "__version__",
    "canonical",
    "check_holder",
    "default_home",
]
