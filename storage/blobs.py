"""The content-addressed blob store: ``blobs/<algorithm>/<hex>`` under the cache home.

This is containerd's "content store": it knows bytes and digests, nothing about images,
references or what is live (the ledger's projections know that; the collector acts on it).

A blob lands only verified and whole: it is streamed into ``tmp/``, hashed on the way, checked
against its digest and announced size, fsynced, renamed into place and the directory fsynced.
A crash leaves at worst a partial file in ``tmp/``, which is never counted as cached and which
prune reclaims. Digests are validated before they become paths, so no digest can name a file
outside the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Final

import structlog

from imageledger.domain.errors import BlobTooLargeError, DigestMismatchError
from imageledger.domain.model import DeletedBlob
from imageledger.domain.reference import validate_digest

log = structlog.get_logger(__name__)

PARTIAL_SUFFIX: Final = ".part"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tree_size(path: Path) -> int:
    """Bytes under `path` (a file, a symlink itself, or a directory tree); 0 if gone."""
    try:
        if path.is_symlink() or not path.is_dir():
            return path.lstat().st_size
        return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir())
    except FileNotFoundError:
        return 0


class BlobStore:
    """Verified, durable, content-addressed files under `root` (the cache home)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"

    def path(self, digest: str) -> Path:
        """Where blob `digest` lives (whether or not it is there)."""
        algorithm, _, hexdigest = validate_digest(digest).partition(":")
        return self.blobs / algorithm / hexdigest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int | None:
        """The blob's size in bytes, or None when it is not stored."""
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def open(self, digest: str) -> BinaryIO:
        """The blob for reading; `FileNotFoundError` when it is not stored."""
        return self.path(digest).open("rb")

    def read(self, digest: str) -> bytes:
        with self.open(digest) as f:
            return f.read()

    def writer(
        self,
        digest: str,
        *,
        size: int | None = None,
        max_size: int | None = None,
        work: Path | None = None,
    ) -> BlobWriter:
        """A resumable writer for blob `digest`: feed it chunks (after an interrupted download,
        resume from `writer.offset`), then `commit()` or `abort()`. Partial files go to `work`
        (an in-flight lease's directory) or ``tmp/``."""
        return BlobWriter(self, digest, size=size, max_size=max_size, work=work)

    def write(
        self,
        digest: str,
        chunks: Iterable[bytes],
        *,
        size: int | None = None,
        max_size: int | None = None,
        work: Path | None = None,
    ) -> int:
        """Store the content streamed by `chunks` as blob `digest`; return its size.

        Raises `DigestMismatchError` when the content hashes otherwise or its length is not
        `size`, and `BlobTooLargeError` as soon as it passes `size` or `max_size`; either way
        nothing is kept. Storing a blob that is already there is harmless (same bytes).
        """
        with self.writer(digest, size=size, max_size=max_size, work=work) as writer:
            for chunk in chunks:
                writer.write(chunk)
            return writer.commit()

    def write_bytes(self, data: bytes, digest: str | None = None) -> str:
        """Store `data` (verified against `digest` when given); return its digest."""
        digest = digest or f"sha256:{hashlib.sha256(data).hexdigest()}"
        self.write(digest, [data], size=len(data))
        return digest

    def delete(self, digest: str) -> int:
        """Unlink blob `digest`; return the bytes freed (0 when it was not there)."""
        path = self.path(digest)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        _fsync_dir(path.parent)
        return size

    def digests(self) -> Iterator[str]:
        """Every blob on disk, sorted (the collector compares this with what the ledger holds)."""
        if not self.blobs.is_dir():
            return
        for algorithm_dir in sorted(self.blobs.iterdir()):
            for entry in sorted(algorithm_dir.iterdir()):
                digest = f"{algorithm_dir.name}:{entry.name}"
                try:
                    validate_digest(digest)
                except ValueError:
                    continue
                yield digest

    def partials(self) -> Iterator[Path]:
        """Files in ``tmp/``: partial downloads and work files, never part of the cache."""
        if self.tmp.is_dir():
            yield from sorted(self.tmp.iterdir())

    def strays(self, alive: frozenset[str]) -> list[DeletedBlob]:
        """Files under the home that the ledger cannot account for: work directories of dead
        in-flight leases and loose partials in ``tmp/``, unmaterialized artifacts, and files in
        ``blobs/`` that are not named by a digest. `alive` holds the live lease ids."""
        found: list[DeletedBlob] = []
        if self.tmp.is_dir():
            for entry in sorted(self.tmp.iterdir()):
                if entry.name in ("leases", "locks") or entry.name in alive:
                    continue
                found.append(
                    DeletedBlob(
                        f"tmp/{entry.name}", "partial", _tree_size(entry), "stale partial download"
                    )
                )
        artifacts = self.root / "artifacts"
        if artifacts.is_dir():
            for entry in sorted(artifacts.rglob("*")):
                if entry.is_dir() and not entry.is_symlink():
                    continue
                kind = {".fsmeta": "fsmeta", ".vmdk": "vmdk"}.get(entry.suffix, "artifact")
                relative = entry.relative_to(self.root).as_posix()
                found.append(DeletedBlob(relative, kind, _tree_size(entry), "not in the ledger"))
        if self.blobs.is_dir():
            for entry in sorted(self.blobs.rglob("*")):
                relative = entry.relative_to(self.blobs).as_posix()
                if entry.is_dir() and not entry.is_symlink() and "/" not in relative:
                    continue
                try:
                    validate_digest(relative.replace("/", ":", 1))
                    if entry.is_file() and not entry.is_symlink():
                        continue
                except ValueError:
                    pass
                found.append(
                    DeletedBlob(
                        f"blobs/{relative}", "orphan", _tree_size(entry), "not a blob of the store"
                    )
                )
        return found

    def delete_path(self, relative: str) -> int:
        """Delete a stray found by `strays` (only under tmp/, artifacts/ or blobs/)."""
        path = self.root / relative
        top = relative.split("/", 1)[0]
        if top not in ("tmp", "artifacts", "blobs") or ".." in relative.split("/"):
            msg = f"refusing to delete {relative!r}: not a stray path of the store"
            raise ValueError(msg)
        size = _tree_size(path)
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def check(self, digest: str, size: int) -> str | None:
        """None when the blob is there, `size` bytes long and hashes to `digest`; otherwise
        what is wrong with it: ``missing``, ``wrong size`` or ``corrupt``."""
        found = self.size(digest)
        if found is None:
            return "missing"
        if found != size:
            return "wrong size"
        return None if self.verify(digest) else "corrupt"

    def verify(self, digest: str) -> bool:
        """Whether the stored blob still hashes to its digest (bit rot, tampering)."""
        algorithm = digest.partition(":")[0]
        hasher = hashlib.new(algorithm)
        with self.open(digest) as f:
            while chunk := f.read(1 << 20):
                hasher.update(chunk)
        return f"{algorithm}:{hasher.hexdigest()}" == digest


class BlobWriter:
    """One blob on its way into the store: hashed as it is written, verified and moved into
    place by `commit()`; `abort()` (or leaving the `with` block without committing) deletes
    the partial file. Not shared between threads."""

    def __init__(
        self,
        store: BlobStore,
        digest: str,
        *,
        size: int | None,
        max_size: int | None,
        work: Path | None,
    ) -> None:
        self.digest = digest
        self.final = store.path(digest)
        self.size = size
        self.limit = size if size is not None else max_size
        partial_dir = work if work is not None else store.tmp
        partial_dir.mkdir(parents=True, exist_ok=True)
        self.partial = partial_dir / f"{self.final.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
        self._hasher = hashlib.new(digest.partition(":")[0])
        self._file: BinaryIO | None = self.partial.open("xb")
        self.offset = 0

    def write(self, chunk: bytes) -> None:
        if self._file is None:
            msg = f"blob {self.digest}: the writer is closed"
            raise ValueError(msg)
        self.offset += len(chunk)
        if self.limit is not None and self.offset > self.limit:
            msg = f"blob {self.digest}: more than the announced {self.limit} bytes"
            raise BlobTooLargeError(msg)
        self._hasher.update(chunk)
        self._file.write(chunk)

    def commit(self) -> int:
        """Verify size and digest, fsync, move into place, fsync the directory; the size."""
        if self._file is None:
            msg = f"blob {self.digest}: the writer is closed"
            raise ValueError(msg)
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            if self.size is not None and self.offset != self.size:
                msg = f"blob {self.digest}: got {self.offset} bytes, announced {self.size}"
                raise DigestMismatchError(msg)
            actual = f"{self.digest.partition(':')[0]}:{self._hasher.hexdigest()}"
            if actual != self.digest:
                msg = f"blob {self.digest}: content hashes to {actual}"
                raise DigestMismatchError(msg)
            self.final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.partial, self.final)
            _fsync_dir(self.final.parent)
        except BaseException:
            self.abort()
            raise
        return self.offset

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        with contextlib.suppress(FileNotFoundError):
            self.partial.unlink()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None or self.partial.exists():
            self.abort()
