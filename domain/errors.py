"""The errors imageledger raises: every one is an `ImageLedgerError`.

Callers catch one base class; each subclass names a situation a user can act on, and its
message says what and where (the reference, the path, the holders), never a secret. Every
error class lives here, whichever layer raises it, so that a caller finds the whole hierarchy
in one place (as httpx's ``_exceptions.py`` does)::

    ImageLedgerError
    ├── LedgerError
    │   ├── LedgerCorruptError
    │   │   └── LedgerMissingError
    │   ├── LedgerFullError
    │   ├── LedgerFormatError
    │   └── LedgerReadOnlyError
    ├── DiskFullError (also OSError)
    ├── InvalidReferenceError (also ValueError)
    ├── InvalidFilterError (also ValueError)
    ├── InvalidPlatformError (also ValueError)
    ├── DigestMismatchError
    ├── BlobTooLargeError
    ├── ImageNotFoundError (also LookupError)
    │   ├── PlatformNotFoundError
    │   └── NotInRegistryError (also RegistryError)
    ├── ImageInUseError
    ├── ContentMissingError
    ├── ContentCorruptError
    ├── HomeError
    │   ├── InvalidHomeError (also ValueError)
    │   ├── HomeNotFoundError (also LookupError)
    │   └── HomeDamagedError
    ├── CacheClosedError (also RuntimeError)
    ├── InvalidDestinationError (also ValueError)
    ├── ManifestError
    │   └── RegistryManifestError (also RegistryError)
    ├── ArchiveError
    ├── RegistryError
    │   ├── RegistryAuthError
    │   ├── RegistryTimeoutError
    │   ├── RegistryManifestError
    │   └── NotInRegistryError
    ├── RegistryConfigError (also ValueError)
    ├── AuditError
    │   ├── AuditKeyError
    │   ├── AuditVerificationError
    │   │   └── ProofError (also ValueError)
    │   ├── AuditInputError (also ValueError)
    │   │   └── NoteError
    │   └── TileError (also ValueError)
    ├── MaterializeError
    │   └── LayerRejectedError
    └── BundleError (also ValueError)

None of them derives from eventsourcing's errors, so that this module (and with it a query)
loads without eventsourcing. The LMDB persistence module (`storage.ledger`), whose callers may
be written against eventsourcing's interface, raises `LedgerCorruptError` and `LedgerFullError`
as subclasses that are also eventsourcing's `InterfaceError` and `OperationalError`.
"""

from __future__ import annotations

from typing import Any


class ImageLedgerError(Exception):
    """Base of every error imageledger raises on purpose."""


class LedgerError(ImageLedgerError):
    """The ledger (the LMDB environment holding the event log and views) cannot be used."""


class LedgerCorruptError(LedgerError):
    """The path holds something that is not a readable ledger (a file, a foreign or damaged
    LMDB environment). Its data is not touched (LMDB may create an empty lock file beside it)."""


class LedgerFullError(LedgerError):
    """The ledger's map reached its configured maximum (or the disk is full); the append that
    needed the space was rolled back whole, and what was committed before is intact."""


class DiskFullError(ImageLedgerError, OSError):
    """A pull, load or save ran out of space on its device (ENOSPC, EDQUOT); what it had
    written was removed, nothing of it is cached, the ledger is as before (plus, space
    permitting, the failure itself)."""


class InvalidReferenceError(ImageLedgerError, ValueError):
    """A malformed image reference or digest; raised before anything is touched."""


class InvalidFilterError(ImageLedgerError, ValueError):
    """An image filter (`images --filter`, `list()`'s keywords) that cannot mean anything: an
    unknown name, a `dangling` that is not a boolean, a malformed pattern or label."""


class DigestMismatchError(ImageLedgerError):
    """Content did not hash to the digest it was announced with; nothing of it was kept."""


class BlobTooLargeError(ImageLedgerError):
    """Content exceeded the size it was announced with (or a hard limit); nothing was kept."""


class ImageNotFoundError(ImageLedgerError, LookupError):
    """No cached image has that reference."""

    def __init__(self, reference: str) -> None:
        super().__init__(f"image not found: {reference}")
        self.reference = reference


class ImageInUseError(ImageLedgerError):
    """Removing the reference would drop the last name of a manifest that holders lease."""

    def __init__(self, reference: str, holders: tuple[str, ...]) -> None:
        super().__init__(f"image {reference} is in use by {', '.join(holders)}")
        self.reference = reference
        self.holders = holders


class ContentMissingError(ImageLedgerError):
    """A blob an image needs is not in the store: when its pull or load commits, or when a
    manifest that references it is read from the store (the one "blob missing" error; it was
    also spelled ``MissingBlobError``)."""


class ContentCorruptError(ImageLedgerError):
    """A blob in the store no longer is what the ledger says (wrong size, or it does not hash
    to its digest: bit rot, tampering). `imageledger verify --repair` deletes such blobs; the
    next pull or load of the images that need them fetches them again."""


class HomeError(ImageLedgerError):
    """The cache home cannot be used as it is (see `storage.home` for what a home is)."""


class InvalidHomeError(HomeError, ValueError):
    """The path given as the home cannot be one: an empty string, a file, or a directory that
    holds other things and is not an imageledger home (it is never adopted: a prune would
    delete what it finds there)."""


class HomeNotFoundError(HomeError, LookupError):
    """A command that only reads was pointed at a home that does not exist (or is empty);
    reading never creates one, so a typo in the path does not look like an empty cache."""


class HomeDamagedError(HomeError):
    """Something in the home is not what imageledger put there: a symbolic link, a device or
    a file where its directories or lock files belong. imageledger never follows or obeys
    such an entry; it names it, and the operator removes it."""


class LedgerMissingError(LedgerCorruptError):
    """The home's ledger is missing or empty while its store holds content: the history of
    that content is lost, and a fresh ledger would call every blob an orphan and prune it.
    Nothing runs until the ledger is restored or the content moved aside."""


class CacheClosedError(ImageLedgerError, RuntimeError):
    """The `ImageCache` was used after `close()`."""


class InvalidDestinationError(ImageLedgerError, ValueError):
    """An archive cannot be written where asked: a missing directory, a directory, a path
    inside the cache home (the home holds only what imageledger accounts for), or a place
    this user may not write."""


class PlatformNotFoundError(ImageNotFoundError):
    """The archive (or index) holds no image for the platform asked for; the message names
    the platforms it does hold. Never answered with another platform's image."""

    def __init__(self, reference: str, wanted: str, offered: list[str]) -> None:
        ImageLedgerError.__init__(
            self,
            f"image not found: {reference} has no {wanted} image "
            f"(it offers {', '.join(offered) or 'none'})",
        )
        self.reference = reference
        self.wanted = wanted
        self.offered = offered


class LedgerFormatError(LedgerError):
    """The ledger stores its events in another format than this imageledger reads: format 1
    (imageledger before the format was settled) is rewritten by ``imageledger migrate``; a
    higher number was written by a newer imageledger. Nothing of it was read."""

    def __init__(self, path: object, found: int | str) -> None:
        self.path = path
        self.found = found
        if found == 1:
            msg = (
                f"{path}: the ledger is in format 1 (written by an older imageledger); "
                "run `imageledger migrate` to rewrite it into format 2 (docs/FORMAT.md)"
            )
        else:
            msg = (
                f"{path}: the ledger is in format {found}, which this imageledger does not "
                "read (a newer imageledger wrote it); use that version"
            )
        super().__init__(msg)


class LedgerReadOnlyError(LedgerError):
    """The cache was opened for reading only (its home is one this user may not write, a
    shared cache): it answers every query, and every command that would change it fails."""


# ---- images: manifests, archives, platforms --------------------------------------------------


class ManifestError(ImageLedgerError):
    """A manifest, index or image config is malformed, unsupported or inconsistent with the
    blobs it describes; the message names the digest and what is wrong."""


class InvalidPlatformError(ImageLedgerError, ValueError):
    """A platform given by a caller is not ``os/arch[/variant]``; raised before anything is
    touched (a ValueError too, as it was before it had a class of its own)."""


class ArchiveError(ImageLedgerError):
    """An image archive is malformed, unsupported or hostile (the message says which entry
    and what is wrong); a failed load leaves nothing behind."""


# ---- registries ------------------------------------------------------------------------------


class RegistryError(ImageLedgerError):
    """The registry could not be used: unreachable or failing after the retries, garbage or
    unsupported answers (schema 1, oversized manifests), a missing blob."""


class RegistryAuthError(RegistryError):
    """The registry refused us (401 or 403) after we tried the credentials we have, or we
    refused to send the credentials where they could be read (a token realm over plain HTTP
    at a host not listed as insecure)."""


class RegistryTimeoutError(RegistryError):
    """A pull ran out of time: the registry sent nothing for the read timeout
    (``no data for N s from HOST``), the pull's overall deadline passed, or the registry asked
    to wait longer than we would (``Retry-After``). The message says which."""


class RegistryConfigError(ImageLedgerError, ValueError):
    """Registry options that cannot be used: a malformed ``IMAGELEDGER_PULL_TIMEOUT`` or
    ``IMAGELEDGER_PULL_DEADLINE``, credentials in the environment that do not say which
    registry they are for, a CA bundle that cannot be read. Invalid usage (a `ValueError`: the
    command line exits 2); the message names the variable or file, never a secret."""


class RegistryBlockedError(RegistryError):
    """The registries configuration (containers-registries.conf(5)) blocks the registry or
    namespace a pull names (``blocked = true``): refused before anything is sent, recorded
    as a failed pull, exit 2 on the command line (the request is not allowed, retrying will
    not help). The message names the matching prefix and the file that set it."""


class RegistryManifestError(RegistryError, ManifestError):
    """The registry served a manifest, index or config that is malformed or unusable."""


class NotInRegistryError(RegistryError, ImageNotFoundError):
    """The registry has no such image (404 for the manifest, or no manifest for the platform);
    the message names the reference."""

    def __init__(self, reference: str, detail: str = "") -> None:
        ImageNotFoundError.__init__(self, reference)
        self.detail = detail
        message = f"image not found in the registry: {reference}"
        self.args = (f"{message} ({detail})" if detail else message,)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reference, self.detail))


class AuditError(ImageLedgerError):
    """The audit log (the Merkle tree over the ledger, its signed checkpoints) cannot do what
    was asked."""


class AuditKeyError(AuditError):
    """The audit signing key is missing, unreadable, malformed, readable by others, or made
    for another log. The message names where the key is, never what it holds."""


class AuditVerificationError(AuditError):
    """What was verified is not what was signed: a stored event, the tree, a checkpoint, a
    proof or an export does not match (the command line exits 5). The message names the first
    bad position or checkpoint."""


class AuditInputError(AuditError, ValueError):
    """Malformed audit input: a proof, a checkpoint, a key string or an export that cannot be
    read at all (the command line exits 2)."""


class NoteError(AuditInputError):
    """A signed note, a checkpoint or a key string that cannot be used (`domain.note`). Its
    message is one line that never quotes a key string or key material."""


class ProofError(AuditVerificationError, ValueError):
    """A Merkle proof, or the sizes and hashes it is checked against, do not verify
    (`domain.merkle`): the message is one line saying which check failed, never a hash dump."""


class TileError(AuditError, ValueError):
    """Stored tiles that do not hold what the asked tree size needs (missing, short, longer
    than the size says, not whole hashes): a store out of step with its size, which no retry
    fixes (`domain.merkle`; storage reports it as damage)."""


# ---- materialization: layer EROFS images, fsmeta, VMDK ---------------------------------------


class MaterializeError(ImageLedgerError):
    """An image could not be materialized (its layers as EROFS images, the fsmeta joining them,
    the VMDK descriptor): the message names the layer or file and what went wrong; nothing of
    the failed artifact is kept or counted."""


class LayerRejectedError(MaterializeError):
    """A layer blob cannot become an EROFS image: it is hostile or malformed (a name with
    ``..`` or an absolute path, a hard link to a missing entry, a name over 255 bytes, an
    absurd depth, more inodes than the format addresses, a corrupt stream) or it does not
    uncompress to its diff_id. The message names the entry and the rule it broke."""


class BundleError(ImageLedgerError, ValueError):
    """A debug bundle that cannot be written, read or replayed: not a bundle, damaged, of
    another format, or a home to replay it into that is not new (the command line exits 2)."""
