"""imageledger: a local OCI image cache whose whole state is an event-sourced ledger in LMDB.

The public surface is what this module exports; everything else is private to the package.
"""

from imageledger.cache import Image, ImageCache, default_home
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
    HistoryEntry,
    ImageConfig,
    ImageDetail,
    ImageHandle,
    ImagePruneReport,
    LayerDetail,
    Platform,
    StoreCheck,
)
from imageledger.domain.reference import Reference, canonical
from imageledger.projections.runner import RebuildReport
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
from imageledger.tools.logs import configure_logging

__all__ = [
    "BlobProblem",
    "CacheClosedError",
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
    "ImageLedgerError",
    "ImageNotFoundError",
    "ImagePruneReport",
    "InvalidDestinationError",
    "InvalidHomeError",
    "InvalidPlatformError",
    "InvalidReferenceError",
    "LayerDetail",
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
    "canonical",
    "configure_logging",
    "default_home",
]
