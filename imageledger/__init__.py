"""imageledger: a local OCI image cache whose whole state is an event-sourced ledger in LMDB.

The public surface is what this module exports; everything else is private to the package.
`ImageCache` is the blocking API and `Image` the asyncio one; every error either can raise is
exported here and derives from `ImageLedgerError` (the hierarchy is in `domain.errors`).

Importing it is cheap on purpose: every export but `__version__` is imported on first use
(PEP 562 `__getattr__`), so a command-line run loads only what its command needs: a query
never loads the asyncio facade, and what the registry client and archives cost is paid by the
commands that use them. Type checkers see the plain imports under `TYPE_CHECKING`; `_LAZY`
names the module of each (a test checks that the two lists and `__all__` agree).
"""

import importlib
from typing import TYPE_CHECKING

from imageledger._version import __version__

if TYPE_CHECKING:
    from imageledger.aio import AsyncImageHandle, Image
    from imageledger.cache import (
        ImageCache,
        PastImageCache,
        check_ledger,
        default_home,
        replay_bundle,
        verify_export,
    )
    from imageledger.domain.audit import REPORT_COLUMNS, AuditReport, SignedCheckpoint
    from imageledger.domain.errors import (
        ArchiveError,
        AuditError,
        AuditInputError,
        AuditKeyError,
        AuditVerificationError,
        BlobTooLargeError,
        BundleError,
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
        InvalidFilterError,
        InvalidHomeError,
        InvalidPlatformError,
        InvalidReferenceError,
        LayerRejectedError,
        LedgerCorruptError,
        LedgerError,
        LedgerFormatError,
        LedgerFullError,
        LedgerMissingError,
        LedgerReadOnlyError,
        ManifestError,
        MaterializeError,
        NoteError,
        NotInRegistryError,
        PlatformNotFoundError,
        ProofError,
        RegistryAuthError,
        RegistryBlockedError,
        RegistryConfigError,
        RegistryError,
        RegistryManifestError,
        RegistryTimeoutError,
        TileError,
    )
    from imageledger.domain.model import (
        BlobProblem,
        CachedImage,
        DiskUsage,
        GcPolicy,
        HistoryEntry,
        ImageConfig,
        ImageDetail,
        ImageHandle,
        ImageLayer,
        ImagePruneReport,
        MaterializedImage,
        MaterializedLayer,
        Platform,
        RebuildReport,
        StoreCheck,
    )
    from imageledger.domain.ports import BuiltArtifact, Materializer
    from imageledger.domain.reference import Reference, canonical
    from imageledger.domain.service import check_holder
    from imageledger.storage.credentials import logout
    from imageledger.storage.migrate import MigrationReport, migrate
    from imageledger.storage.registry import PullProgress, login
    from imageledger.storage.registryoptions import RegistryOptions, options_from_environment

_LAZY: dict[str, str] = {
    "AsyncImageHandle": "imageledger.aio",
    "Image": "imageledger.aio",
    "ImageCache": "imageledger.cache",
    "PastImageCache": "imageledger.cache",
    "check_ledger": "imageledger.cache",
    "verify_export": "imageledger.cache",
    "replay_bundle": "imageledger.cache",
    "migrate": "imageledger.storage.migrate",
    "MigrationReport": "imageledger.storage.migrate",
    "default_home": "imageledger.cache",
    "AuditReport": "imageledger.domain.audit",
    "REPORT_COLUMNS": "imageledger.domain.audit",
    "SignedCheckpoint": "imageledger.domain.audit",
    "ArchiveError": "imageledger.domain.errors",
    "AuditError": "imageledger.domain.errors",
    "AuditInputError": "imageledger.domain.errors",
    "AuditKeyError": "imageledger.domain.errors",
    "AuditVerificationError": "imageledger.domain.errors",
    "NoteError": "imageledger.domain.errors",
    "ProofError": "imageledger.domain.errors",
    "TileError": "imageledger.domain.errors",
    "BlobTooLargeError": "imageledger.domain.errors",
    "BundleError": "imageledger.domain.errors",
    "CacheClosedError": "imageledger.domain.errors",
    "ContentCorruptError": "imageledger.domain.errors",
    "ContentMissingError": "imageledger.domain.errors",
    "DigestMismatchError": "imageledger.domain.errors",
    "DiskFullError": "imageledger.domain.errors",
    "HomeDamagedError": "imageledger.domain.errors",
    "HomeError": "imageledger.domain.errors",
    "HomeNotFoundError": "imageledger.domain.errors",
    "ImageInUseError": "imageledger.domain.errors",
    "ImageLedgerError": "imageledger.domain.errors",
    "ImageNotFoundError": "imageledger.domain.errors",
    "InvalidDestinationError": "imageledger.domain.errors",
    "InvalidFilterError": "imageledger.domain.errors",
    "InvalidHomeError": "imageledger.domain.errors",
    "InvalidPlatformError": "imageledger.domain.errors",
    "InvalidReferenceError": "imageledger.domain.errors",
    "LedgerCorruptError": "imageledger.domain.errors",
    "LedgerError": "imageledger.domain.errors",
    "LedgerFormatError": "imageledger.domain.errors",
    "LedgerFullError": "imageledger.domain.errors",
    "LedgerMissingError": "imageledger.domain.errors",
    "LedgerReadOnlyError": "imageledger.domain.errors",
    "ManifestError": "imageledger.domain.errors",
    "MaterializeError": "imageledger.domain.errors",
    "LayerRejectedError": "imageledger.domain.errors",
    "MaterializedImage": "imageledger.domain.model",
    "MaterializedLayer": "imageledger.domain.model",
    "Materializer": "imageledger.domain.ports",
    "BuiltArtifact": "imageledger.domain.ports",
    "NotInRegistryError": "imageledger.domain.errors",
    "PlatformNotFoundError": "imageledger.domain.errors",
    "RegistryAuthError": "imageledger.domain.errors",
    "RegistryBlockedError": "imageledger.domain.errors",
    "RegistryConfigError": "imageledger.domain.errors",
    "RegistryError": "imageledger.domain.errors",
    "RegistryManifestError": "imageledger.domain.errors",
    "RegistryTimeoutError": "imageledger.domain.errors",
    "BlobProblem": "imageledger.domain.model",
    "CachedImage": "imageledger.domain.model",
    "HistoryEntry": "imageledger.domain.model",
    "ImageConfig": "imageledger.domain.model",
    "ImageDetail": "imageledger.domain.model",
    "ImageHandle": "imageledger.domain.model",
    "ImageLayer": "imageledger.domain.model",
    "ImagePruneReport": "imageledger.domain.model",
    "DiskUsage": "imageledger.domain.model",
    "GcPolicy": "imageledger.domain.model",
    "Platform": "imageledger.domain.model",
    "RebuildReport": "imageledger.domain.model",
    "StoreCheck": "imageledger.domain.model",
    "Reference": "imageledger.domain.reference",
    "canonical": "imageledger.domain.reference",
    "check_holder": "imageledger.domain.service",
    "PullProgress": "imageledger.storage.registry",
    "login": "imageledger.storage.registry",
    "logout": "imageledger.storage.credentials",
    "RegistryOptions": "imageledger.storage.registryoptions",
    "options_from_environment": "imageledger.storage.registryoptions",
}


if not TYPE_CHECKING:
    # Hidden from type checkers: a module-level __getattr__ would make every misspelt
    # `from imageledger import ...` type-check as a valid name.

    def __getattr__(name: str) -> object:
        module = _LAZY.get(name)
        if module is None:
            msg = f"module 'imageledger' has no attribute {name!r}"
            raise AttributeError(msg)
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # the next lookup is an ordinary global
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *_LAZY})


__all__ = [
    "REPORT_COLUMNS",
    "ArchiveError",
    "AsyncImageHandle",
    "AuditError",
    "AuditInputError",
    "AuditKeyError",
    "AuditReport",
    "AuditVerificationError",
    "BlobProblem",
    "BlobTooLargeError",
    "BuiltArtifact",
    "BundleError",
    "CacheClosedError",
    "CachedImage",
    "ContentCorruptError",
    "ContentMissingError",
    "DigestMismatchError",
    "DiskFullError",
    "DiskUsage",
    "GcPolicy",
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
    "InvalidFilterError",
    "InvalidHomeError",
    "InvalidPlatformError",
    "InvalidReferenceError",
    "LayerRejectedError",
    "LedgerCorruptError",
    "LedgerError",
    "LedgerFormatError",
    "LedgerFullError",
    "LedgerMissingError",
    "LedgerReadOnlyError",
    "ManifestError",
    "MaterializeError",
    "MaterializedImage",
    "MaterializedLayer",
    "Materializer",
    "MigrationReport",
    "NotInRegistryError",
    "NoteError",
    "PastImageCache",
    "Platform",
    "PlatformNotFoundError",
    "ProofError",
    "PullProgress",
    "RebuildReport",
    "Reference",
    "RegistryAuthError",
    "RegistryBlockedError",
    "RegistryConfigError",
    "RegistryError",
    "RegistryManifestError",
    "RegistryOptions",
    "RegistryTimeoutError",
    "SignedCheckpoint",
    "StoreCheck",
    "TileError",
    "__version__",
    "canonical",
    "check_holder",
    "check_ledger",
    "default_home",
    "login",
    "logout",
    "migrate",
    "options_from_environment",
    "replay_bundle",
    "verify_export",
]
