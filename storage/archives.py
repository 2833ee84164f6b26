"""Image archives: load OCI layouts, OCI archives and ``docker save`` tarballs; save either.

Loading reads a tar exactly once, front to back (it may be stdin), and never trusts it:

- every entry name is checked (no absolute path, no ``..``), only regular files, directories
  and links whose target stays inside the archive are accepted, entries are bounded by
  `max_entry_size` and metadata (``index.json``, ``manifest.json``, configs, manifests) by
  `MAX_MANIFEST_SIZE`;
- ``blobs/<alg>/<hex>`` entries stream straight into the blob store, verified on the way
  (a blob that is already stored is hashed and compared, not rewritten); other files (the
  legacy ``docker save`` layout) are spooled under ``store.tmp`` and hashed while spooled;
- nothing a failed load wrote survives: the blobs it added are deleted and its spool is
  removed; blobs that were in the store before are left alone. A successful load also deletes
  the blobs it added that no loaded image uses (attestations, other platforms' leftovers).

Format choice: ``oci-layout`` + a valid ``index.json`` is an OCI layout (this includes Docker
25+ tarballs, whose ``manifest.json`` then only contributes RepoTags); otherwise
``manifest.json`` is a docker-archive, for which an OCI image manifest is synthesized with
`canonical_json` so that the same archive always yields the same manifest digest.

Legacy ``docker save`` (before 25) stores a layer shared by two images once and makes the
second ``<id>/layer.tar`` a relative symlink to the first: links inside the archive are
followed when ``manifest.json`` names them; a link used as a ``blobs/`` entry is refused.

Saving writes a deterministic tar (sorted entries, mtime 0, uid/gid 0, files 0644): the same
images saved twice give the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import posixpath
import re
import secrets
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO, Final, Literal

import structlog

from imageledger.domain.errors import (
    ContentCorruptError,
    DigestMismatchError,
    ImageLedgerError,
    InvalidReferenceError,
)
from imageledger.domain.model import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    ImageContent,
    LoadedImage,
    Platform,
)
from imageledger.domain.reference import parse_reference, validate_digest
from imageledger.storage.home import Dir
from imageledger.storage.oci import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    MAX_INDEX_ENTRIES,
    MAX_LAYERS,
    MAX_MANIFEST_SIZE,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    BlobAccess,
    IndexEntry,
    ManifestError,
    canonical_json,
    describe_image,
    parse_index,
    parse_json,
    parse_manifest,
    read_small_blob,
)

log = structlog.get_logger(__name__)

DEFAULT_MAX_ENTRY_SIZE: Final = 64 * 1024**3
"""Largest archive entry (a layer) accepted by default: 64 GiB."""
MAX_LINK_HOPS: Final = 16
MAX_INDEX_DEPTH: Final = 4
_CHUNK: Final = 1024 * 1024
_MAX_HEADER_PAYLOAD: Final = 1024 * 1024  # pax / GNU long-name headers are read into memory
_METADATA_FILES: Final = frozenset({"oci-layout", "index.json", "manifest.json", "repositories"})
_BLOB_NAME: Final = re.compile(r"blobs/(?P<algorithm>sha256|sha512)/(?P<hex>[0-9a-f]+)")
_GZIP_MAGIC: Final = b"\x1f\x8b"
_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
_LAYOUT_VERSION: Final = "1.0.0"

ArchiveFormat = Literal["docker", "oci"]
_NO_PLATFORM: Final = Platform("unknown", "unknown")


class ArchiveError(ImageLedgerError):
    """An image archive is malformed, unsupported or hostile (the message says which entry
    and what is wrong); a failed load leaves nothing behind."""


# ---- reading the tar -------------------------------------------------------------------------


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses pax / GNU long-name headers whose payload tarfile would read into memory whole."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> _BoundedTarInfo:
        info = super().frombuf(buf, encoding, errors)
        extended = (
            tarfile.XHDTYPE,
            tarfile.XGLTYPE,
            tarfile.SOLARIS_XHDTYPE,
            tarfile.GNUTYPE_LONGNAME,
            tarfile.GNUTYPE_LONGLINK,
        )
        if info.type in extended and info.size > _MAX_HEADER_PAYLOAD:
            msg = f"tar extended header of {info.size} bytes (limit {_MAX_HEADER_PAYLOAD})"
            raise ArchiveError(msg)
        return info


_READ_ERRORS: Final = (tarfile.TarError, EOFError, zlib.error, OSError)


def _entry_chunks(source: IO[bytes], name: str) -> Iterator[bytes]:
    """The content of one tar entry, in chunks; read errors become `ArchiveError`."""
    while True:
        try:
            chunk = source.read(_CHUNK)
        except _READ_ERRORS as e:
            raise ArchiveError(f"archive entry {name}: truncated or corrupt: {e}") from None
        if not chunk:
            return
        yield chunk


def _chunks(f: IO[bytes], *, limit: int | None = None) -> Iterator[bytes]:
    """The content of an open file, in chunks (at most `limit` bytes); closes it."""
    with f:
        remaining = limit
        while remaining is None or remaining > 0:
            chunk = f.read(_CHUNK if remaining is None else min(_CHUNK, remaining))
            if not chunk:
                return
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk


def _normalize(name: str, what: str) -> str:
    """An archive path as ``a/b/c``: no leading ``./``, no ``.``; refuse absolute and ``..``."""
    if name.startswith("/"):
        raise ArchiveError(f"{what} {name!r}: absolute path")
    if "\x00" in name:
        raise ArchiveError(f"{what} {name!r}: NUL in path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"{what} {name!r}: '..' in path")
    return "/".join(parts)


def _blob_digest(name: str) -> str | None:
    """The digest an archive path ``blobs/<alg>/<hex>`` names, if it names a valid one."""
    match = _BLOB_NAME.fullmatch(name)
    if match is None:
        return None
    try:
        return validate_digest(f"{match['algorithm']}:{match['hex']}")
    except InvalidReferenceError:
        return None


def _link_target(name: str, member: tarfile.TarInfo) -> str:
    linkname = member.linkname
    kind = "symlink" if member.issym() else "hardlink"
    if not linkname or linkname.startswith("/"):
        raise ArchiveError(f"archive {kind} {name} -> {linkname!r}: points outside the archive")
    # A symlink is relative to its directory, a hardlink to the archive root.
    joined = posixpath.join(posixpath.dirname(name), linkname) if member.issym() else linkname
    target = posixpath.normpath(joined)
    if target == ".." or target.startswith("../") or target in (".", ""):
        raise ArchiveError(f"archive {kind} {name} -> {linkname!r}: points outside the archive")
    return _normalize(target, f"archive {kind} target of {name}")


@dataclass(slots=True)
class _File:
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
class _Load:
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


def _once(data: bytes) -> Callable[[], Iterator[bytes]]:
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


class _Source:
    """What the format loaders need from an archive, whatever carries it."""

    def metadata(self, name: str) -> bytes | None:
        """A top-level metadata file (``index.json`` ...), or None when absent."""
        raise NotImplementedError

    def blob(self, digest: str, limit: int | None = None) -> bool:
        """Make blob `digest` of the archive present in the store; False when the archive
        does not hold it. A blob over `limit` bytes is refused before it is copied."""
        raise NotImplementedError

    def file(self, name: str, what: str) -> _File:
        """A regular file named by ``manifest.json`` (links inside the archive followed)."""
        raise ArchiveError(f"{what}: {name} is not in the archive")

    def has(self, name: str) -> bool:
        raise NotImplementedError


class _TarSource(_Source):
    """A tar read once, sequentially: blobs go to the store, the rest is spooled."""

    def __init__(self, load: _Load) -> None:
        self.load = load
        self.files: dict[str, _File] = {}
        self.links: dict[str, str] = {}
        self.dirs: set[str] = set()

    def scan(self, stream: IO[bytes], label: str) -> None:
        try:
            archive = tarfile.open(  # noqa: SIM115 - closed by the `with` below
                fileobj=stream, mode="r|*", tarinfo=_BoundedTarInfo
            )
        except ArchiveError:
            raise
        except (*_READ_ERRORS, TypeError) as e:
            # TypeError: tarfile parses a gzip header with ord() on whatever it read, so a
            # stream that ends inside that header fails as "ord() expected a character".
            raise ArchiveError(f"{label}: not a tar archive (or a compressed one): {e}") from None
        with archive:
            while True:
                try:
                    member = archive.next()
                except ArchiveError:
                    raise
                except _READ_ERRORS as e:
                    raise ArchiveError(f"{label}: truncated or corrupt tar: {e}") from None
                if member is None:
                    break
                self._member(archive, member)

    def _member(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = _normalize(member.name, "archive entry")
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
            target = _link_target(name, member)
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

    def _read(self, name: str, size: int, content: IO[bytes]) -> _File:
        chunks = _entry_chunks(content, name)
        if name in _METADATA_FILES:
            if size > MAX_MANIFEST_SIZE:
                msg = f"archive entry {name}: {size} bytes is larger than the {MAX_MANIFEST_SIZE}"
                raise ArchiveError(f"{msg} byte limit for metadata")
            data = b"".join(chunks)
            if len(data) != size:
                raise ArchiveError(f"archive entry {name}: truncated")
            return _File(name, size, f"sha256:{hashlib.sha256(data).hexdigest()}", data=data)
        digest = _blob_digest(name)
        if digest is not None:
            self.load.put(digest, lambda: chunks, size, f"archive entry {name}")
            return _File(name, size, digest, stored=True)
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
        return _File(name, size, f"sha256:{hasher.hexdigest()}", spool=(work, spool))

    # -- _Source --

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

    def file(self, name: str, what: str) -> _File:
        path = _normalize(name, what)
        for _ in range(MAX_LINK_HOPS):
            if path in self.files:
                return self.files[path]
            if path not in self.links:
                raise ArchiveError(f"{what}: {name} is not in the archive")
            path = self.links[path]
        raise ArchiveError(f"{what}: {name}: too many levels of links")

    def materialize(self, entry: _File, what: str) -> None:
        """Make the content of `entry` present in the store as blob ``entry.digest``."""
        if entry.stored:
            return
        if entry.data is not None:
            self.load.put(entry.digest, _once(entry.data), entry.size, what)
        elif entry.spool is not None:
            work, spool = entry.spool
            self.load.put(entry.digest, lambda: _chunks(work.open_read(spool)), entry.size, what)
        entry.stored = True

    def read_small(self, entry: _File, what: str) -> bytes:
        if entry.size > MAX_MANIFEST_SIZE:
            msg = f"{what}: {entry.size} bytes is larger than the {MAX_MANIFEST_SIZE} byte limit"
            raise ArchiveError(msg)
        if entry.data is not None:
            return entry.data
        if entry.spool is not None:
            with entry.spool[0].open_read(entry.spool[1]) as f:
                return f.read()
        return self.load.store.read(entry.digest)


class _DirSource(_Source):
    """An OCI image layout directory; blobs are copied into the store when needed."""

    def __init__(self, root: Path, load: _Load) -> None:
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
                    chunk = f.read(min(_CHUNK, remaining))
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


# ---- names -----------------------------------------------------------------------------------


def _reference_key(name: str) -> str:
    """What makes two spellings of a name the same name (the canonical reference)."""
    try:
        return str(parse_reference(name))
    except InvalidReferenceError:
        return name


def _add_names(names: list[str], candidates: Sequence[str | None], seen: set[str]) -> None:
    """Append the candidates not already named (by any spelling): one parse per name and a
    set lookup, so an image tagged N times costs O(N), not N^2 comparisons."""
    for name in candidates:
        if name:
            key = _reference_key(name)
            if key not in seen:
                seen.add(key)
                names.append(name)


def _entry_names(entry: IndexEntry) -> list[str]:
    """Names an index.json entry gives: containerd's full name, then the OCI ref name unless it
    is only that full name's tag (Docker 25+ writes both)."""
    full = entry.annotation(ANNOTATION_CONTAINERD_NAME)
    ref_name = entry.ref_name
    names: list[str] = []
    if full:
        names.append(full)
        if ref_name and "/" not in ref_name and ":" not in ref_name and "@" not in ref_name:
            with contextlib.suppress(InvalidReferenceError):
                if parse_reference(full).tag == ref_name:
                    ref_name = None
    if ref_name:
        names.append(ref_name)
    return names


# ---- loading ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Found:
    content: ImageContent
    names: list[str]
    seen: set[str] = field(default_factory=set)  # the names' canonical forms


def _collect(found: dict[str, _Found], content: ImageContent, names: Sequence[str]) -> None:
    known = found.get(content.manifest_digest)
    if known is None:
        found[content.manifest_digest] = known = _Found(content, [])
    _add_names(known.names, names, known.seen)


def _read_layout(source: _Source) -> list[IndexEntry] | str:
    """index.json's entries when this is a valid OCI layout, else why it is not."""
    layout = source.metadata("oci-layout")
    index = source.metadata("index.json")
    if layout is None or index is None:
        absent = [n for n, d in (("oci-layout", layout), ("index.json", index)) if d is None]
        return f"no {' and '.join(absent)}"
    try:
        obj = parse_json(layout, "oci-layout")
    except ManifestError as e:
        return str(e)
    if not isinstance(obj, dict) or not isinstance(obj.get("imageLayoutVersion"), str):
        return "oci-layout has no imageLayoutVersion"
    try:
        return parse_index(index, None, digest="index.json")
    except ManifestError as e:
        return str(e)


def _check_stored_size(store: BlobAccess, digest: str, size: int, what: str) -> None:
    stored = store.size(digest)
    if stored != size:
        raise ArchiveError(f"{what}: blob {digest} has {stored} bytes, its descriptor says {size}")


def _load_manifest(
    source: _Source,
    store: BlobAccess,
    entry: IndexEntry,
    platform_hint: Platform | None,
    what: str,
) -> ImageContent:
    if not source.blob(entry.digest, MAX_MANIFEST_SIZE):
        raise ArchiveError(f"{what}: manifest blob {entry.digest} is not in the archive")
    _check_stored_size(store, entry.digest, entry.size, what)
    data = read_small_blob(store, entry.digest, "manifest")
    manifest = parse_manifest(data, entry.media_type, digest=entry.digest)
    referenced = [("config", manifest.config.digest)] + [
        (f"layer {i}", layer.digest) for i, layer in enumerate(manifest.layers)
    ]
    for role, digest in referenced:
        if not source.blob(digest):
            msg = f"{what}: {role} blob {digest} of manifest {entry.digest} is not in the archive"
            raise ArchiveError(msg)
    return describe_image(
        store, entry.digest, platform_hint=platform_hint, media_type=entry.media_type
    )


def _platform_manifests(
    source: _Source, store: BlobAccess, entry: IndexEntry, what: str, depth: int = 0
) -> list[IndexEntry]:
    """The platform manifests of nested index `entry` that the archive holds (no attestation)."""
    if depth >= MAX_INDEX_DEPTH:
        raise ArchiveError(f"{what}: indexes nested more than {MAX_INDEX_DEPTH} deep")
    if not source.blob(entry.digest, MAX_MANIFEST_SIZE):
        raise ArchiveError(f"{what}: index blob {entry.digest} is not in the archive")
    _check_stored_size(store, entry.digest, entry.size, what)
    data = read_small_blob(store, entry.digest, "index")
    result: list[IndexEntry] = []
    for child in parse_index(data, entry.media_type, digest=entry.digest):
        if child.attestation:
            continue
        if child.media_type in INDEX_TYPES:
            result.extend(_platform_manifests(source, store, child, what, depth + 1))
        elif child.media_type in MANIFEST_TYPES and source.blob(child.digest, MAX_MANIFEST_SIZE):
            result.append(child)
    return result


def _load_oci(
    source: _Source, store: BlobAccess, entries: list[IndexEntry], found: dict[str, _Found]
) -> None:
    for i, entry in enumerate(entries):
        what = f"index.json manifests[{i}]"
        if entry.attestation:
            continue
        names = _entry_names(entry)
        if entry.media_type in MANIFEST_TYPES:
            content = _load_manifest(source, store, entry, entry.platform, what)
            _collect(found, content, names)
        elif entry.media_type in INDEX_TYPES:
            children = _platform_manifests(source, store, entry, what)
            if not children:
                msg = f"{what}: index {entry.digest} has no platform manifest in the archive"
                raise ArchiveError(msg)
            for child in children:
                content = _load_manifest(source, store, child, child.platform, what)
                _collect(found, content, names)
        else:
            log.info("archive.skip_entry", entry=what, media_type=entry.media_type)


@dataclass(frozen=True, slots=True)
class _DockerItem:
    config: str
    repo_tags: tuple[str, ...]
    layers: tuple[str, ...]


def _docker_manifest(data: bytes) -> list[_DockerItem]:
    what = "manifest.json"
    try:
        obj = parse_json(data, what)
    except ManifestError as e:
        raise ArchiveError(str(e)) from None
    if not isinstance(obj, list) or not obj:
        raise ArchiveError(f"{what}: expected a non-empty JSON array of images")
    if len(obj) > MAX_INDEX_ENTRIES:
        raise ArchiveError(f"{what}: {len(obj)} images is more than {MAX_INDEX_ENTRIES}")
    items: list[_DockerItem] = []
    for i, item in enumerate(obj):
        where = f"{what}[{i}]"
        if not isinstance(item, dict):
            raise ArchiveError(f"{where}: expected an object, got {item!r}")
        config = item.get("Config")
        if not isinstance(config, str) or not config:
            raise ArchiveError(f"{where}: Config must be a path, got {config!r}")
        tags = item.get("RepoTags")
        if tags is None:
            tags = []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ArchiveError(f"{where}: RepoTags must be a list of strings, got {tags!r}")
        layers = item.get("Layers")
        if not isinstance(layers, list) or not all(isinstance(p, str) and p for p in layers):
            raise ArchiveError(f"{where}: Layers must be a list of paths, got {layers!r}")
        if len(layers) > MAX_LAYERS:
            raise ArchiveError(f"{where}: {len(layers)} layers is more than {MAX_LAYERS}")
        items.append(_DockerItem(config, tuple(tags), tuple(layers)))
    return items


def _layer_media_type(head: bytes) -> str:
    if head.startswith(_GZIP_MAGIC):
        return OCI_LAYER_GZIP
    if head.startswith(_ZSTD_MAGIC):
        return OCI_LAYER_ZSTD
    return OCI_LAYER


def _load_docker(
    source: _TarSource, store: BlobAccess, items: list[_DockerItem], found: dict[str, _Found]
) -> None:
    for i, item in enumerate(items):
        where = f"manifest.json[{i}]"
        config = source.file(item.config, f"{where} Config")
        config_data = source.read_small(config, f"{where} Config {item.config}")
        source.materialize(config, f"{where} Config {item.config}")
        layers: list[dict[str, object]] = []
        for j, path in enumerate(item.layers):
            what = f"{where} Layers[{j}] {path}"
            layer = source.file(path, what)
            source.materialize(layer, what)
            layers.append(
                {
                    "mediaType": _layer_media_type(layer.head(store, 4)),
                    "digest": layer.digest,
                    "size": layer.size,
                }
            )
        manifest = canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": OCI_CONFIG,
                    "digest": config.digest,
                    "size": len(config_data),
                },
                "layers": layers,
            }
        )
        digest = f"sha256:{hashlib.sha256(manifest).hexdigest()}"
        source.load.put(digest, _once(manifest), len(manifest), where)
        _collect(found, describe_image(store, digest), item.repo_tags)


def _add_repo_tags(source: _TarSource, items: list[_DockerItem], found: dict[str, _Found]) -> None:
    """Docker 25+ tarballs: RepoTags of manifest.json go to the OCI image with that config."""
    for i, item in enumerate(items):
        where = f"manifest.json[{i}]"
        config = source.file(item.config, f"{where} Config")
        for j, path in enumerate(item.layers):
            source.file(path, f"{where} Layers[{j}]")
        for image in found.values():
            if image.content.config.digest == config.digest:
                _add_names(image.names, item.repo_tags, image.seen)


def _load_from(source: _Source, store: BlobAccess) -> dict[str, _Found]:
    found: dict[str, _Found] = {}
    layout = _read_layout(source)
    manifest_json = source.metadata("manifest.json")
    if isinstance(layout, list):
        _load_oci(source, store, layout, found)
        if manifest_json is not None and isinstance(source, _TarSource):
            _add_repo_tags(source, _docker_manifest(manifest_json), found)
    elif manifest_json is not None and isinstance(source, _TarSource):
        _load_docker(source, store, _docker_manifest(manifest_json), found)
    elif manifest_json is not None:
        msg = "an extracted docker-archive directory is not supported: load the tar itself"
        raise ArchiveError(msg)
    elif source.has("index.json") or source.has("oci-layout"):
        raise ArchiveError(f"not a valid OCI layout: {layout}")
    else:
        msg = "neither an OCI layout (oci-layout + index.json) nor a docker-archive (manifest.json)"
        raise ArchiveError(msg)
    if not found:
        raise ArchiveError("the archive holds no image manifest")
    return found


def load(
    source: Path | BinaryIO,
    store: BlobAccess,
    *,
    max_entry_size: int = DEFAULT_MAX_ENTRY_SIZE,
) -> list[LoadedImage]:
    """Load every image of an archive into `store`: an OCI layout directory, an OCI archive
    (tar, possibly gzip'd), or a ``docker save`` tarball; a stream is read once, in order.

    Returns one `LoadedImage` per manifest, in archive order, with the names the archive gives
    it (raw spellings: full references, Docker short names or bare tags). Raises
    `ArchiveError` (or `DigestMismatchError`, `ManifestError`) and leaves nothing behind.
    """
    load_ = _Load(store, max_entry_size)
    keep: set[str] = set()
    try:
        if isinstance(source, str | os.PathLike):
            path = Path(source)
            if path.is_dir():
                found = _load_from(_DirSource(path, load_), store)
            else:
                try:
                    stream = path.open("rb")
                except OSError as e:
                    raise ArchiveError(f"cannot read archive {path}: {e}") from None
                with stream:
                    tar = _TarSource(load_)
                    tar.scan(stream, str(path))
                    found = _load_from(tar, store)
        else:
            tar = _TarSource(load_)
            tar.scan(source, "archive stream")
            found = _load_from(tar, store)
        images = [LoadedImage(f.content, tuple(f.names)) for f in found.values()]
        keep = {digest for image in images for digest, _ in image.content.blobs}
    except BaseException:
        load_.cleanup(keep=set())
        raise
    load_.cleanup(keep=keep)
    log.info(
        "archive.loaded",
        images=[i.content.manifest_digest for i in images],
        blobs_written=len(load_.written),
    )
    return images


# ---- saving ----------------------------------------------------------------------------------


def _familiar(reference: str) -> str:
    """Docker's short spelling of a canonical tagged reference (``alpine:3.19``)."""
    ref = parse_reference(reference)
    repository = ref.repository
    if ref.registry == "docker.io":
        if repository.startswith("library/") and repository.count("/") == 1:
            repository = repository.removeprefix("library/")
        name = repository
    else:
        name = f"{ref.registry}/{repository}"
    return f"{name}:{ref.tag}"


def _blob_name(digest: str) -> str:
    algorithm, _, hexdigest = digest.partition(":")
    return f"blobs/{algorithm}/{hexdigest}"


def _tar_info(name: str, size: int, *, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def save(
    images: Sequence[tuple[str, str]],
    store: BlobAccess,
    dest: Path | BinaryIO,
    *,
    format: ArchiveFormat,
) -> None:
    """Write images (canonical reference, manifest digest) from `store` as an archive.

    ``oci``: an OCI archive (tar of an OCI layout) whose index.json names each manifest by
    its reference in ``org.opencontainers.image.ref.name``. ``docker``: a docker-archive
    (``manifest.json`` with RepoTags in Docker's short form) that also carries ``oci-layout``
    and ``index.json`` as Docker 25+ writes them. The bytes depend only on the images. A
    `dest` path is written through a temporary file renamed into place.
    """
    if format not in ("docker", "oci"):
        raise ArchiveError(f"unknown archive format {format!r} (expected 'docker' or 'oci')")
    if not images:
        raise ArchiveError("nothing to save: no image given")
    pairs: list[tuple[str, str]] = []
    by_reference: dict[str, str] = {}
    for reference, digest in images:
        canonical_ref = str(parse_reference(reference))
        validate_digest(digest)
        if by_reference.setdefault(canonical_ref, digest) != digest:
            first = by_reference[canonical_ref]
            msg = f"reference {canonical_ref} given twice, for {first} and {digest}"
            raise ArchiveError(msg)
        if (canonical_ref, digest) not in pairs:
            pairs.append((canonical_ref, digest))
    contents: dict[str, ImageContent] = {}
    for _, digest in pairs:
        if digest not in contents:
            # The platform is not written (index.json entries need none): any hint will do for
            # a config that names none.
            try:
                contents[digest] = describe_image(store, digest, platform_hint=_NO_PLATFORM)
            except (ManifestError, OSError) as e:
                # The ledger vouched for this manifest and its config when they came in.
                msg = f"image {digest} is damaged in the store ({e})"
                msg += ": run `imageledger verify --repair`"
                raise ContentCorruptError(msg) from e

    index_entries: list[dict[str, object]] = []
    for reference, digest in pairs:
        content = contents[digest]
        descriptor: dict[str, object] = {
            "mediaType": content.manifest_media_type,
            "digest": digest,
            "size": content.manifest_size,
        }
        if format == "oci":
            descriptor["annotations"] = {ANNOTATION_REF_NAME: reference}
        else:
            annotations = {ANNOTATION_CONTAINERD_NAME: reference}
            tag = parse_reference(reference).tag
            if tag is not None:
                annotations[ANNOTATION_REF_NAME] = tag
            descriptor["annotations"] = annotations
        index_entries.append(descriptor)
    metadata: dict[str, bytes] = {
        "oci-layout": canonical_json({"imageLayoutVersion": _LAYOUT_VERSION}),
        "index.json": canonical_json(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index_entries}
        ),
    }
    if format == "docker":
        items: list[dict[str, object]] = []
        for digest, content in contents.items():
            tags = [
                _familiar(reference)
                for reference, d in pairs
                if d == digest and parse_reference(reference).tag is not None
            ]
            items.append(
                {
                    "Config": _blob_name(content.config.digest),
                    "RepoTags": tags,
                    "Layers": [_blob_name(layer.blob_digest) for layer in content.layers],
                }
            )
        metadata["manifest.json"] = canonical_json(items)

    blobs: dict[str, int] = {}
    for content in contents.values():
        for digest, size in content.blobs:
            blobs[_blob_name(digest)] = size
    names = sorted({*metadata, *blobs})
    directories = sorted({posixpath.dirname(n) for n in blobs} | {"blobs"})

    def write(out: IO[bytes]) -> None:
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for directory in directories:
                tar.addfile(_tar_info(directory, 0, directory=True))
            for name in names:
                if name in metadata:
                    data = metadata[name]
                    tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))
                else:
                    digest = name.removeprefix("blobs/").replace("/", ":", 1)
                    _add_verified(tar, name, store, digest, blobs[name])

    if isinstance(dest, str | os.PathLike):
        path = Path(dest)
        partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
        try:
            out = partial.open("xb")
        except OSError as e:
            raise ArchiveError(f"cannot write archive {path}: {e}") from None
        try:
            with out:
                write(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
            raise
    else:
        write(dest)
    log.info("archive.saved", format=format, images=len(pairs), blobs=len(blobs))


class _Hashing(io.RawIOBase):
    """A blob file read through a hasher, so that what goes out is checked on the way."""

    def __init__(self, f: IO[bytes], algorithm: str) -> None:
        self._f = f
        self.hasher = hashlib.new(algorithm)

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.hasher.update(data)
        return data


def _add_verified(
    tar: tarfile.TarFile, name: str, store: BlobAccess, digest: str, size: int
) -> None:
    """Copy a blob into the archive, refusing one that is not what the ledger says (a
    corrupt store must not spread into archives)."""
    found = store.size(digest)
    if found != size:
        state = "missing" if found is None else f"{found} bytes, not {size}"
        msg = f"blob {digest} in the store is {state}: run `imageledger verify --repair`"
        raise ContentCorruptError(msg)
    with store.open(digest) as f:
        reader = _Hashing(f, digest.partition(":")[0])
        tar.addfile(_tar_info(name, size), reader)
    actual = f"{digest.partition(':')[0]}:{reader.hasher.hexdigest()}"
    if actual != digest:
        msg = (
            f"blob {digest} in the store is corrupt (it hashes to {actual}): "
            "run `imageledger verify --repair`"
        )
        raise ContentCorruptError(msg)


__all__ = ["DEFAULT_MAX_ENTRY_SIZE", "ArchiveError", "ArchiveFormat", "load", "save"]
