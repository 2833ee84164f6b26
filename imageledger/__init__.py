"""imageledger: a local OCI image cache whose whole state is an event-sourced ledger in LMDB.

The public surface is what this module exports; everything else is private to the package.
"""

from imageledger.cache import Image, ImageCache, default_home
from imageledger.domain.errors import (
    ContentCorruptError,
    ContentMissingError,
    DigestMismatchError,
    DiskFullError,
    ImageInUseError,
    ImageLedgerError,
    ImageNotFoundError,
    InvalidReferenceError,
    LedgerCorruptError,
    LedgerError,
    LedgerFullError,
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
from imageledger.storage.registry import (
    NotInRegistryError,
    PullProgress,
    RegistryAuthError,
    RegistryError,
    RegistryOptions,
)
from imageledger.tools.logs import configure_logging

__all__ = [
    "BlobProblem",
    "ContentCorruptError",
    "ContentMissingError",
    "DigestMismatchError",
    "DiskFullError",
    "HistoryEntry",
    "Image",
    "ImageCache",
    "ImageConfig",
    "ImageDetail",
    "ImageHandle",
    "ImageInUseError",
    "ImageLedgerError",
    "ImageNotFoundError",
    "ImagePruneReport",
    "InvalidReferenceError",
    "LayerDetail",
    "LedgerCorruptError",
    "LedgerError",
    "LedgerFullError",
    "NotInRegistryError",
    "Platform",
    "PullProgress",
    "RebuildReport",
    "Reference",
    "RegistryAuthError",
    "RegistryError",
    "RegistryOptions",
    "StoreCheck",
    "canonical",
    "configure_logging",
    "default_home",
]
