"""Where a load's entries come from: a tar read once, or an OCI layout directory.

Both sources answer the format loaders (`storage.ociload`, `storage.dockerload`) the same
questions (`Source`): a metadata file, whether a blob is there (copying it into the store on
the way), a file ``manifest.json`` names. Neither trusts what it reads:

- `TarSource` reads the tar exactly once, front to back (it may be stdin). Only regular files,
  directories and links whose target stays inside the archive are accepted (see
  `storage.tarsafe`), entries are bounded by the load's `max_entry_size` and metadata
  (``index.json``, ``manifest.json``...) by `MAX_MANIFEST_SIZE`. ``blobs/<alg>/<hex>``
  entries stream straight into the blob store, verified on the way (a blob that is already
  stored is hashed and compared, not rewritten); other files (the legacy ``docker save``
  layout) are spooled under the store's scratch space and hashed while spooled. Legacy
  ``docker save`` (before 25) stores a layer shared by two images once and makes the second
  ``<id>/layer.tar`` a relative symlink to the first: links are followed when
  ``manifest.json`` names them; a link used as a ``blobs/`` entry is refused.
- `DirSource` reads an OCI layout directory, each file checked by path and again once open
  (no link, inside the layout, a regular file), copied into the store when needed.

`LoadWork` is the bookkeeping of one load: the blobs it wrote and its spool, so that a failed
load removes all it added (blobs that were in the store before are left alone).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO, Final

from imageledger.domain.errors import ArchiveError, DigestMismatchError, InvalidReferenceError
from imageledger.domain.reference import validate_digest
from imageledger.storage.home import Dir
from imageledger.storage.oci import MAX_MANIFEST_SIZE, BlobAccess
from imageledger.storage.tarsafe import (
    CHUNK,
    READ_ERRORS,
    BoundedTarInfo,
    archive_path,
    entry_chunks,
    link_target,
)

MAX_LINK_HOPS: Final = 16
_METADATA_FILES: Final = frozenset({"oci-layout", "index.json", "manifest.json", "repositories"})
_BLOB_NAME: Final = re.compile(r"blobs/(?P<algorithm>sha256|sha512)/(?P<hex>[0-9a-f]+)")


def _chunks(f: IO[bytes], *, limit: int | None = None) -> Iterator[bytes]:
    """The content of an open file, in chunks (at most `limit` bytes); closes it."""
    with f:
        remaining = limit
        while remaining is None or remaining > 0:
            chunk = f.read(CHUNK if remaining is None else min(CHUNK, remaining))
            if not chunk:
                return
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk


def _blob_digest(name: str) -> str | None:
    """The digest an archive path ``blobs/<alg>/<hex>`` names, if it names a valid one."""
    match = _BLOB_NAME.fullmatch(name)
    if match is None:
        return None
    try:
        return validate_digest(f"{match['algorithm']}:{match['hex']}")
    except InvalidReferenceError:
        return None


@dataclass(slots=True)
class ArchiveFile:
    """A regular file of the archive: where its verified content is and what it hashes to."""

    name: str
    size: int
    digest: str
    data: bytes | None = None  # metadata, in memory
    spool: tuple[Dir, str] | None = None  # spooled under the load's work directory
    stored: bool = False  # a blobs/<alg>/<hex> entry, verified in the blob store

    def head(self, store: BlobAccess, n: int) -> bytes:
        if self.data is not None:
            return self.data[:n]
        spool = self.spool
        with spool[0].open_read(spool[1]) if spool is not None else store.open(self.digest) as f:
            return f.read(n)


@dataclass(slots=True)
class LoadWork:
    """The bookkeeping of one load: what it wrote, where it spools."""

    store: BlobAccess
    max_entry_size: int
    work: Dir | None = None
    written: set[str] = field(default_factory=set)
    spooled: int = 0
    _work_name: str = ""

    def work_dir(self) -> Dir:
        """The load's own spool directory under the store's scratch space, made on first
        use; everything in it is reached through its descriptor (see `storage.home`)."""
        if self.work is None:
            name = f"load-{secrets.token_hex(8)}"
            with self.store.scratch() as scratch:
                self.work = scratch.sub(name, create=True)
            self._work_name = name
        return self.work

    def put(self, digest: str, chunks: Callable[[], Iterator[bytes]], size: int, what: str) -> None:
        """Make blob `digest` present: write it (tracked) or, when stored, verify the copy."""
        try:
            if self.store.has(digest):
                _verify(digest, chunks(), size)
            else:
                self.store.write(digest, chunks(), size=size)
                self.written.add(digest)
        except DigestMismatchError as e:
            raise DigestMismatchError(f"{what}: {e}") from None

    def cleanup(self, keep: set[str]) -> None:
        for digest in sorted(self.written - keep):
            self.store.delete(digest)
        self.written &= keep
        if self.work is not None:
            self.work.close()
            self.work = None
            with self.store.scratch() as scratch:
                scratch.delete(self._work_name)


def once(data: bytes) -> Callable[[], Iterator[bytes]]:
    return lambda: iter([data])


def _verify(digest: str, chunks: Iterator[bytes], size: int) -> None:
    algorithm = digest.partition(":")[0]
    hasher = hashlib.new(algorithm)
    total = 0
    for chunk in chunks:
        total += len(chunk)
        hasher.update(chunk)
    actual = f"{algorithm}:{hasher.hexdigest()}"
    if total != size or actual != digest:
        msg = f"blob {digest}: content ({total} bytes) hashes to {actual}"
        raise DigestMismatchError(msg)


class Source:
    """What the format loaders need from an archive, whatever carries it."""

    def metadata(self, name: str) -> bytes | None:
        """A top-level metadata file (``index.json`` ...), or None when absent."""
        raise NotImplementedError

    def blob(self, digest: str, limit: int | None = None) -> bool:
        """Make blob `digest` of the archive present in the store; False when the archive
        does not hold it. A blob over `limit` bytes is refused before it is copied."""
        raise NotImplementedError

    def file(self, name: str, what: str) -> ArchiveFile:
        """A regular file named by ``manifest.json`` (links inside the archive followed)."""
        raise ArchiveError(f"{what}: {name} is not in the archive")

    def has(self, name: str) -> bool:
        raise NotImplementedError


class TarSource(Source):
    """A tar read once, sequentially: blobs go to the store, the rest is spooled."""

    def __init__(self, load: LoadWork) -> None:
        self.load = load
        self.files: dict[str, ArchiveFile] = {}
        self.links: dict[str, str] = {}
        self.dirs: set[str] = set()

    def scan(self, stream: IO[bytes], label: str) -> None:
        try:
            archive = tarfile.open(  # noqa: SIM115 - closed by the `with` below
                fileobj=stream, mode="r|*", tarinfo=BoundedTarInfo
            )
        except ArchiveError:
            raise
        except (*READ_ERRORS, TypeError) as e:
            # TypeError: tarfile parses a gzip header with ord() on whatever it read, so a
            # stream that ends inside that header fails as "ord() expected a character".
            raise ArchiveError(f"{label}: not a tar archive (or a compressed one): {e}") from None
        with archive:
            while True:
                try:
                    member = archive.next()
                except ArchiveError:
                    raise
                except READ_ERRORS as e:
                    raise ArchiveError(f"{label}: truncated or corrupt tar: {e}") from None
                if member is None:
                    break
                self._member(archive, member)

    def _member(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = archive_path(member.name, "archive entry")
        if not name:
            if member.isdir():
                return
            raise ArchiveError(f"archive entry {member.name!r}: empty name")
        if member.isdir():
            if name in self.files or name in self.links:
                raise ArchiveError(f"archive entry {name}: both a directory and a file")
            self.dirs.add(name)
            return
        if name in self.dirs:
            raise ArchiveError(f"archive entry {name}: both a directory and a file")
        if member.issym() or member.islnk():
            target = link_target(name, member)
            if name in self.files or self.links.get(name, target) != target:
                raise ArchiveError(f"archive entry {name}: duplicate entries that differ")
            self.links[name] = target
            return
        if not member.isreg():
            kind = {
                tarfile.CHRTYPE: "a character device",
                tarfile.BLKTYPE: "a block device",
                tarfile.FIFOTYPE: "a fifo",
            }.get(member.type, f"of unsupported type {member.type!r}")
            raise ArchiveError(f"archive entry {name}: is {kind}")
        if name in self.links:
            raise ArchiveError(f"archive entry {name}: duplicate entries that differ")
        if member.size > self.load.max_entry_size:
            msg = (
                f"archive entry {name}: {member.size} bytes is larger than the"
                f" {self.load.max_entry_size} byte limit"
            )
            raise ArchiveError(msg)
        content = archive.extractfile(member)
        if content is None:  # pragma: no cover - regular files always have content
            raise ArchiveError(f"archive entry {name}: no content")
        with content:
            entry = self._read(name, member.size, content)
        previous = self.files.get(name)
        if previous is not None:
            if previous.digest != entry.digest or previous.size != entry.size:
                raise ArchiveError(f"archive entry {name}: duplicate entries that differ")
            if entry.spool is not None:
                entry.spool[0].delete(entry.spool[1])
            return
        self.files[name] = entry

    def _read(self, name: str, size: int, content: IO[bytes]) -> ArchiveFile:
        chunks = entry_chunks(content, name)
        if name in _METADATA_FILES:
            if size > MAX_MANIFEST_SIZE:
                msg = f"archive entry {name}: {size} bytes is larger than the {MAX_MANIFEST_SIZE}"
                raise ArchiveError(f"{msg} byte limit for metadata")
            data = b"".join(chunks)
            if len(data) != size:
                raise ArchiveError(f"archive entry {name}: truncated")
            return ArchiveFile(name, size, f"sha256:{hashlib.sha256(data).hexdigest()}", data=data)
        digest = _blob_digest(name)
        if digest is not None:
            self.load.put(digest, lambda: chunks, size, f"archive entry {name}")
            return ArchiveFile(name, size, digest, stored=True)
        # Any other file (legacy docker save): spool it, hashing on the way.
        self.load.spooled += 1
        work, spool = self.load.work_dir(), f"{self.load.spooled:08d}"
        hasher = hashlib.sha256()
        written = 0
        with work.create(spool) as out:
            for chunk in chunks:
                written += len(chunk)
                hasher.update(chunk)
                out.write(chunk)
        if written != size:
            raise ArchiveError(f"archive entry {name}: truncated")
        return ArchiveFile(name, size, f"sha256:{hasher.hexdigest()}", spool=(work, spool))

    # -- Source --

    def has(self, name: str) -> bool:
        return name in self.files or name in self.links

    def metadata(self, name: str) -> bytes | None:
        if name in self.links:
            raise ArchiveError(f"archive entry {name}: is a link, not a file")
        entry = self.files.get(name)
        return None if entry is None else entry.data

    def blob(self, digest: str, limit: int | None = None) -> bool:
        algorithm, _, hexdigest = digest.partition(":")
        name = f"blobs/{algorithm}/{hexdigest}"
        if name in self.links:
            raise ArchiveError(f"archive entry {name}: a link cannot be a blob")
        entry = self.files.get(name)
        if entry is None or not entry.stored:
            return False
        if limit is not None and entry.size > limit:
            msg = f"archive entry {name}: {entry.size} bytes is larger than the {limit} byte limit"
            raise ArchiveError(f"{msg} for a manifest or index")
        return True

    def file(self, name: str, what: str) -> ArchiveFile:
        path = archive_path(name, what)
        for _ in range(MAX_LINK_HOPS):
            if path in self.files:
                return self.files[path]
            if path not in self.links:
                raise ArchiveError(f"{what}: {name} is not in the archive")
            path = self.links[path]
        raise ArchiveError(f"{what}: {name}: too many levels of links")

    def materialize(self, entry: ArchiveFile, what: str) -> None:
        """Make the content of `entry` present in the store as blob ``entry.digest``."""
        if entry.stored:
            return
        if entry.data is not None:
            self.load.put(entry.digest, once(entry.data), entry.size, what)
        elif entry.spool is not None:
            work, spool = entry.spool
            self.load.put(entry.digest, lambda: _chunks(work.open_read(spool)), entry.size, what)
        entry.stored = True

    def read_small(self, entry: ArchiveFile, what: str) -> bytes:
        if entry.size > MAX_MANIFEST_SIZE:
            msg = f"{what}: {entry.size} bytes is larger than the {MAX_MANIFEST_SIZE} byte limit"
            raise ArchiveError(msg)
        if entry.data is not None:
            return entry.data
        if entry.spool is not None:
            with entry.spool[0].open_read(entry.spool[1]) as f:
                return f.read()
        return self.load.store.read(entry.digest)


class DirSource(Source):
    """An OCI image layout directory; blobs are copied into the store when needed."""

    def __init__(self, root: Path, load: LoadWork) -> None:
        self.root = root
        self.real_root = root.resolve()
        self.load = load
        self.copied: set[str] = set()

    def _unreadable(self, relative: str, error: OSError) -> ArchiveError:
        return ArchiveError(
            f"layout {self.root}: cannot read {relative}: {error.strerror or error}"
        )

    def _open(self, relative: str) -> tuple[BinaryIO, int] | None:
        """Regular file `relative` of the layout, open, and its size; None when absent.

        Checked twice: by path first (no link, inside the layout, a regular file, not too
        large), then on the open file itself, opened without following a link and without
        blocking, so that an entry swapped after the check (for a link, a FIFO that would hang
        the read, a device) is refused rather than read.
        """
        path = self.root / relative
        try:
            info = path.lstat()
        except (FileNotFoundError, NotADirectoryError):  # a file where a directory should be
            return None
        except OSError as e:
            raise self._unreadable(relative, e) from None
        if stat.S_ISLNK(info.st_mode):
            raise ArchiveError(f"layout {self.root}: {relative} is a symlink")
        try:
            inside = path.resolve().is_relative_to(self.real_root)
        except (OSError, RuntimeError):  # a loop of links above it (RuntimeError before 3.13)
            inside = False
        if not inside:
            raise ArchiveError(f"layout {self.root}: {relative} is outside the layout")
        if not stat.S_ISREG(info.st_mode):
            raise ArchiveError(f"layout {self.root}: {relative} is not a regular file")
        self._check_size(relative, info.st_size)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            f = os.fdopen(os.open(path, flags), "rb")
        except OSError as e:
            raise self._unreadable(relative, e) from None
        try:
            opened = os.fstat(f.fileno())
            if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
                raise ArchiveError(f"layout {self.root}: {relative} changed while it was read")
            self._check_size(relative, opened.st_size)
        except BaseException:
            f.close()
            raise
        return f, opened.st_size

    def _check_size(self, relative: str, size: int) -> None:
        if size > self.load.max_entry_size:
            msg = (
                f"layout {self.root}: {relative}: {size} bytes is larger than the"
                f" {self.load.max_entry_size} byte limit"
            )
            raise ArchiveError(msg)

    def _read_chunks(self, f: BinaryIO, relative: str, limit: int) -> Iterator[bytes]:
        """The content of open file `f` (at most `limit` bytes), closing it; read errors
        become `ArchiveError` (errors of whoever consumes the chunks are not touched)."""
        with f:
            remaining = limit
            while remaining > 0:
                try:
                    chunk = f.read(min(CHUNK, remaining))
                except OSError as e:
                    raise self._unreadable(relative, e) from None
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk

    def has(self, name: str) -> bool:
        return (self.root / name).exists()

    def metadata(self, name: str) -> bytes | None:
        opened = self._open(name)
        if opened is None:
            return None
        f, size = opened
        if size > MAX_MANIFEST_SIZE:
            f.close()
            msg = f"layout {self.root}: {name} is larger than the {MAX_MANIFEST_SIZE} byte limit"
            raise ArchiveError(msg)
        return b"".join(self._read_chunks(f, name, MAX_MANIFEST_SIZE + 1))

    def blob(self, digest: str, limit: int | None = None) -> bool:
        if digest in self.copied:
            return True
        algorithm, _, hexdigest = digest.partition(":")
        relative = f"blobs/{algorithm}/{hexdigest}"
        opened = self._open(relative)
        if opened is None:
            return False
        f, size = opened
        what = f"layout {self.root}: {relative}"
        if limit is not None and size > limit:
            f.close()
            msg = f"{what}: {size} bytes is larger than the {limit} byte limit"
            raise ArchiveError(f"{msg} for a manifest or index")
        try:
            # One more byte than announced: a file that grew is caught by the size check.
            self.load.put(digest, lambda: self._read_chunks(f, relative, size + 1), size, what)
        finally:
            f.close()
        self.copied.add(digest)
        return True


__all__ = [
    "MAX_LINK_HOPS",
    "ArchiveFile",
    "DirSource",
    "LoadWork",
    "Source",
    "TarSource",
    "once",
]
