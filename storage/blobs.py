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
import functools
import hashlib
import os
import secrets
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Final

from imageledger.domain.errors import BlobTooLargeError, DigestMismatchError
from imageledger.domain.log import get_logger
from imageledger.domain.model import DeletedBlob, DeletedKind, DiskUsage
from imageledger.domain.reference import validate_digest
from imageledger.storage import layout
from imageledger.storage.home import Dir

log = get_logger(__name__)

PARTIAL_SUFFIX: Final = ".part"
WRITE_SIZE: Final = 1 << 20
"""Bytes a `BlobWriter` gathers before it hashes and writes them, in one call each. A
download delivers 64 KiB chunks (httpcore's reads); hashing and writing each on its own
costs two releases and re-acquisitions of the GIL per chunk, and with four layers
downloading at once on two cores the threads spent much of their time waiting for it. On the
benchmark machine (200 MiB in 4 layers, in process, interleaved rounds) gathering 1 MiB
took a pull from ~0.47-0.50 to ~0.39-0.40 s at the same CPU time (the copy into the buffer
costs ~20 ms per 200 MiB); 256 KiB gave ~0.42 s. What is gathered is counted in
`BlobWriter.offset` (a resume asks for what follows it: the gathered bytes are in memory,
not lost); a process killed meanwhile leaves its partial file at most this much shorter than
what it had received, and the next pull fetches that again."""
WRITEBACK_STEP: Final = 8 << 20
"""Bytes a `BlobWriter` writes between two requests to the kernel to start writing them to
the disk (`start_writeback`). Without them, a big blob's pages stay dirty in the page cache
until `BlobWriter.commit` fsyncs it, and the whole blob is written to the disk while the pull
waits (on the benchmark machine ~0.1 s for 200 MiB, after the download); with them, the disk
writes while the download goes on, and the fsync finds little left to do (in process,
interleaved: ~0.56 -> ~0.50 s). 8 MiB: small enough to keep the disk busy, large enough
that the requests (one per 8 writes) cost nothing measurable."""

_SYNC_FILE_RANGE_WRITE: Final = 2
"""``SYNC_FILE_RANGE_WRITE`` (linux/fs.h): start writeback of the range's dirty pages, and
do not wait for it."""


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` (Linux), looked up once; None elsewhere or when it cannot be
    called. ctypes is imported only by a writer of a blob big enough to want it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (ImportError, OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    call: Callable[[int, int, int, int], int] = function
    return call


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask the kernel to start writing `length` bytes of `fd` from `offset` to the disk, and
    return at once (``sync_file_range(SYNC_FILE_RANGE_WRITE)``; False where there is no such
    call or it failed). Durability is unchanged: this only moves the disk's work earlier, and
    nothing counts on it; the blob is still fsynced before it is renamed into place (a crash
    before that fsync leaves a partial file, as before). ctypes releases the GIL around the
    call, so the other downloads go on meanwhile."""
    call = _sync_file_range()
    if call is None:
        return False
    return call(fd, offset, length, _SYNC_FILE_RANGE_WRITE) == 0


class BlobStore:
    """Verified, durable, content-addressed files under the cache home `root`.

    Every file operation goes through `storage.home.Dir` (relative to directory descriptors,
    never through a link), so a link or a FIFO planted under ``blobs/`` or ``tmp/`` is a stray
    entry to report, never a way out of the home."""

    def __init__(self, root: str | os.PathLike[str] | Dir) -> None:
        self.home = root if isinstance(root, Dir) else Dir.at(root, create=True)
        self.root = self.home.path

    def path(self, digest: str) -> Path:
        """Where blob `digest` lives (for messages: the store never opens a blob by name)."""
        algorithm, _, hexdigest = validate_digest(digest).partition(":")
        return self.root / layout.BLOBS / algorithm / hexdigest

    @property
    def tmp(self) -> Path:
        """Where ``tmp/`` is (for messages and tests: files there are made by `scratch`)."""
        return self.root / layout.TMP

    def scratch(self) -> Dir:
        """``tmp/``, opened anew (the caller closes it): work files of a load go there."""
        return self.home.sub(layout.TMP, create=True)

    def _algorithm_dir(self, digest: str, *, create: bool = False) -> tuple[Dir, str]:
        algorithm, _, hexdigest = validate_digest(digest).partition(":")
        return self.home.sub(f"{layout.BLOBS}/{algorithm}", create=create), hexdigest

    def has(self, digest: str) -> bool:
        return self.size(digest) is not None

    def size(self, digest: str) -> int | None:
        """The blob's size in bytes, or None when it is not stored (a link or any other kind
        of file under a blob's name is not a blob)."""
        try:
            directory, name = self._algorithm_dir(digest)
        except FileNotFoundError:
            return None
        with directory:
            return directory.file_size(name)

    def open(self, digest: str) -> BinaryIO:
        """The blob for reading; `FileNotFoundError` when it is not stored."""
        directory, name = self._algorithm_dir(digest)
        with directory:
            return directory.open_read(name)

    def read(self, digest: str) -> bytes:
        with self.open(digest) as f:
            return f.read()

    def writer(
        self,
        digest: str,
        *,
        size: int | None = None,
        max_size: int | None = None,
        work: Dir | None = None,
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
        work: Dir | None = None,
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
        try:
            directory, name = self._algorithm_dir(digest)
        except FileNotFoundError:
            return 0
        with directory:
            freed = directory.delete(name)
            if freed:
                directory.fsync()
        return freed

    def digests(self) -> Iterator[str]:
        """Every blob on disk, sorted (the collector compares this with what the ledger
        holds): regular files named by a valid digest; anything else is a stray."""
        try:
            blobs = self.home.sub(layout.BLOBS)
        except FileNotFoundError:
            return
        with blobs:
            for algorithm, st in blobs.entries():
                if not stat.S_ISDIR(st.st_mode) and algorithm not in _ALGORITHMS:
                    continue  # a stray (see strays)
                # An algorithm's directory that is a link is the store's structure damaged:
                # refused (HomeDamagedError), never followed nor silently dropped.
                with blobs.sub(algorithm) as directory:
                    for name, entry in directory.entries():
                        digest = f"{algorithm}:{name}"
                        if not stat.S_ISREG(entry.st_mode) or not _is_digest(digest):
                            continue
                        yield digest

    def strays(self) -> list[DeletedBlob]:
        """Entries under the home that the ledger cannot account for: work directories of
        in-flight leases and loose partials in ``tmp/`` (the caller leaves out those of live
        leases), unmaterialized artifacts, and anything in ``blobs/`` that is not a regular
        file named by a digest (links, FIFOs, directories, other names). Names are relative
        to the home; `delete_entry` removes them (a link itself, never what it points to)."""
        found: list[DeletedBlob] = []
        with contextlib.suppress(FileNotFoundError), self.home.sub(layout.TMP) as tmp:
            for name, st in tmp.entries():
                if name in layout.TMP_OWN and stat.S_ISDIR(st.st_mode):
                    continue
                size = tmp.tree_size(name)
                found.append(
                    DeletedBlob(layout.work_dir(name), "partial", size, "stale partial download")
                )
        with contextlib.suppress(FileNotFoundError), self.home.sub(layout.ARTIFACTS) as artifacts:
            for relative, size in _files_below(artifacts, ""):
                kind = _ARTIFACT_KINDS.get(PurePosixPath(relative).suffix, "artifact")
                found.append(
                    DeletedBlob(f"{layout.ARTIFACTS}/{relative}", kind, size, "not in the ledger")
                )
        with contextlib.suppress(FileNotFoundError), self.home.sub(layout.BLOBS) as blobs:
            for algorithm, st in blobs.entries():
                if not stat.S_ISDIR(st.st_mode) and algorithm not in _ALGORITHMS:
                    found.append(_stray(f"{layout.BLOBS}/{algorithm}", blobs.tree_size(algorithm)))
                    continue
                with blobs.sub(algorithm) as directory:
                    for name, entry in directory.entries():
                        ok = stat.S_ISREG(entry.st_mode) and _is_digest(f"{algorithm}:{name}")
                        if not ok:
                            size = directory.tree_size(name)
                            found.append(_stray(f"{layout.BLOBS}/{algorithm}/{name}", size))
        return found

    def delete_entry(self, entry: DeletedBlob) -> int:
        """Delete what a committed remove or prune named: a blob by its digest, any other
        kind by its path in the home (`_delete_path`); the bytes freed."""
        if entry.by_path:
            return self._delete_path(entry.digest)
        return self.delete(entry.digest)

    def disk_usage(self) -> DiskUsage:
        """statvfs(3) of the file system holding the home, read through the home's own
        descriptor (never a path that could have been swapped for a link)."""
        st = os.fstatvfs(self.home.fd)
        return DiskUsage(
            size=st.f_blocks * st.f_frsize,
            used=(st.f_blocks - st.f_bfree) * st.f_frsize,
            available=st.f_bavail * st.f_frsize,
        )

    def _delete_path(self, relative: str) -> int:
        """Delete a stray found by `strays` (only under tmp/, artifacts/ or blobs/), links
        never followed; the bytes of regular files freed."""
        parts = relative.split("/")
        roots = (layout.TMP, layout.ARTIFACTS, layout.BLOBS)
        if parts[0] not in roots or len(parts) < 2 or ".." in parts:
            msg = f"refusing to delete {relative!r}: not a stray path of the store"
            raise ValueError(msg)
        try:
            directory = self.home.sub("/".join(parts[:-1]))
        except FileNotFoundError:
            return 0
        with directory:
            return directory.delete(parts[-1])

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


_ALGORITHMS: Final = frozenset({"sha256", "sha512"})
_ARTIFACT_KINDS: Final[dict[str, DeletedKind]] = {".fsmeta": "fsmeta", ".vmdk": "vmdk"}


def _is_digest(digest: str) -> bool:
    try:
        validate_digest(digest)
    except ValueError:
        return False
    return True


def _stray(relative: str, size: int) -> DeletedBlob:
    return DeletedBlob(relative, "stray", size, "not a blob of the store")


def _files_below(directory: Dir, prefix: str) -> Iterator[tuple[str, int]]:
    """(relative name, size) of every entry below `directory` that is not a directory (links
    are entries, not ways in), depth first in name order."""
    for name, st in directory.entries():
        relative = f"{prefix}{name}"
        if stat.S_ISDIR(st.st_mode):
            with directory.sub(name) as inner:
                yield from _files_below(inner, f"{relative}/")
        else:
            yield relative, st.st_size if stat.S_ISREG(st.st_mode) else 0


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
        work: Dir | None,
    ) -> None:
        self.digest = digest
        self._store = store
        self.size = size
        self.limit = size if size is not None else max_size
        algorithm, _, hexdigest = validate_digest(digest).partition(":")
        self._algorithm = algorithm
        self._name = hexdigest
        # Its own descriptor of the work directory: the caller's may close first.
        self._work = (work or store.home).sub("" if work is not None else layout.TMP, create=True)
        self._partial = f"{hexdigest}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
        self.partial = self._work.path / self._partial  # for messages
        self._hasher = hashlib.new(algorithm)
        try:
            self._file: BinaryIO | None = self._work.create(self._partial)
        except BaseException:
            self._work.close()
            raise
        self.offset = 0  # bytes accepted by `write`: in the file, or gathered (`WRITE_SIZE`)
        self._buffer: bytearray | None = None  # where chunks are gathered (`WRITE_SIZE`)
        self._gathered = 0  # bytes of it in use
        self._in_file = 0  # bytes hashed and written to the file
        self._written_back = 0  # bytes whose writeback was started (`start_writeback`)
        self._writeback = True

    def write(self, chunk: bytes | bytearray) -> None:
        if self._file is None:
            msg = f"blob {self.digest}: the writer is closed"
            raise ValueError(msg)
        self.offset += len(chunk)
        if self.limit is not None and self.offset > self.limit:
            msg = f"blob {self.digest}: more than the announced {self.limit} bytes"
            raise BlobTooLargeError(msg)
        size = len(chunk)
        if self._gathered + size > WRITE_SIZE:
            self._write_gathered()
        if size >= WRITE_SIZE:  # big enough on its own: no copy
            self._hash_and_write(chunk)
            return
        if self._buffer is None:
            # One buffer per writer, never bigger than the blob (`write` refused more than
            # `limit` above): gathering into it, rather than joining the chunks, allocates
            # nothing per write (a 1 MiB join is above glibc's mmap threshold until that
            # adapts, and 4 MiB joins cost a page fault per 4 KiB: measured, +0.2 s sys).
            wanted = WRITE_SIZE if self.limit is None else min(WRITE_SIZE, max(self.limit, 1))
            self._buffer = bytearray(wanted)
        # A copy: a caller's reused buffer (``readinto``) may change once we return.
        self._buffer[self._gathered : self._gathered + size] = chunk
        self._gathered += size
        if self._gathered >= WRITE_SIZE:
            self._write_gathered()

    def _write_gathered(self) -> None:
        if self._buffer is None or not self._gathered:
            return
        with memoryview(self._buffer) as view, view[: self._gathered] as data:
            self._hash_and_write(data)
        self._gathered = 0

    def _hash_and_write(self, data: bytes | bytearray | memoryview) -> None:
        """Hash and write `data` in one call each; start the writeback of every
        `WRITEBACK_STEP` written."""
        assert self._file is not None
        self._hasher.update(data)
        self._file.write(data)
        self._in_file += len(data)
        if self._writeback and self._in_file - self._written_back >= WRITEBACK_STEP:
            self._file.flush()
            length = self._in_file - self._written_back
            self._writeback = start_writeback(self._file.fileno(), self._written_back, length)
            self._written_back = self._in_file

    def commit(self) -> int:
        """Verify size and digest, fsync, move into place, fsync the directory; the size."""
        if self._file is None:
            msg = f"blob {self.digest}: the writer is closed"
            raise ValueError(msg)
        try:
            self._write_gathered()
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
            with self._store.home.sub(
                f"{layout.BLOBS}/{self._algorithm}", create=True
            ) as directory:
                self._work.replace(self._partial, directory, self._name)
                directory.fsync()
            self._work.close()
        except BaseException:
            self.abort()
            raise
        return self.offset

    def abort(self) -> None:
        self._buffer = None
        self._gathered = 0
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._work.fd >= 0:
            self._work.delete(self._partial)
            self._work.close()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None or self._work.fd >= 0:
            self.abort()
