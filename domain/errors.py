"""The errors imageledger raises: every one is an `ImageLedgerError`.

Callers catch one base class; each subclass names a situation a user can act on, and its
message says what and where (the reference, the path, the holders), never a secret.
"""

from __future__ import annotations

from eventsourcing.persistence import InterfaceError, OperationalError


class ImageLedgerError(Exception):
    """Base of every error imageledger raises on purpose."""


class LedgerError(ImageLedgerError):
    """The ledger (the LMDB environment holding the event log and views) cannot be used."""


class LedgerCorruptError(LedgerError, InterfaceError):
    """The path holds something that is not a readable ledger (a file, a foreign or damaged
    LMDB environment). Its data is not touched (LMDB may create an empty lock file beside it)."""


class LedgerFullError(LedgerError, OperationalError):
    """The ledger's map reached its configured maximum (or the disk is full); the append that
    needed the space was rolled back whole, and what was committed before is intact."""


class DiskFullError(ImageLedgerError, OSError):
    """A pull, load or save ran out of space on its device (ENOSPC, EDQUOT); what it had
    written was removed, nothing of it is cached, the ledger is as before (plus, space
    permitting, the failure itself)."""


class InvalidReferenceError(ImageLedgerError, ValueError):
    """A malformed image reference or digest; raised before anything is touched."""


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
    """A blob an image needs is not in the store when its pull or load commits."""


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


class LedgerReadOnlyError(LedgerError):
    """The cache was opened for reading only (its home is one this user may not write, a
    shared cache): it answers every query, and every command that would change it fails."""
