"""Materialized artifacts on disk: where they go, how they get there whole, and the default
materializer that writes their bytes.

`ErofsMaterializer` is the domain's `Materializer` port over `storage.erofs` (each layer as an
uncompressed EROFS image, the fsmeta joining them) and `storage.vmdk` (the descriptor). It only
writes to the streams it is given; an embedder may plug its own.

`ArtifactFiles` is the `ArtifactStore` port: the files themselves. A materialize holds an
in-flight lease (`storage.leases`) that claims the image's blobs, so a prune or remove in any
process spares them while they are read; every artifact is written in that lease's work
directory (``tmp/<lease>/``), fsynced, hashed again here when an embedder's materializer wrote
it (the ledger never records a digest on a writer's word; see `LeaseWork._build` for why the
default's digest is not a word) and only then renamed into ``artifacts/`` (`storage.layout`:
layer images under ``artifacts/layers/`` by their blob's digest, fsmeta and VMDK under
``artifacts/images/`` by their manifest's), the directory fsynced. The service renames and
records under the store lock, so a prune never sees an artifact in place and unrecorded. A crash
leaves at worst a dead lease's work directory, or a renamed file the ledger does not account
for: both are strays the next prune reclaims. Everything goes through `storage.home.Dir`
(relative to directory descriptors, never through a link): a link planted at ``artifacts/`` or
below is refused as damage, never followed. The fsmeta writer reads the layer images by
``/proc/self/fd`` paths of descriptors opened that way, so it, too, reads exactly the files
checked.

Two materializations of the same layer (threads or processes) write it once: each layer and each
image is made under its own lock (``tmp/locks/<kind>-<hex>.lock``, `pullstore.blob_lock`), and the
second finds the first's artifact recorded in the ledger.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import posixpath
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final, cast

from imageledger.domain.errors import MaterializeError
from imageledger.domain.model import ArtifactFile
from imageledger.domain.ports import BuiltArtifact, Materializer
from imageledger.storage import layout
from imageledger.storage.blobs import BlobStore
from imageledger.storage.home import Dir
from imageledger.storage.leases import InFlightLease, InFlightLeases
from imageledger.storage.pullstore import blob_lock


class ErofsMaterializer:
    """The default `Materializer`: imageledger's own EROFS and VMDK writers."""

    name: Final = "imageledger-erofs"

    def build_layer(self, blob: BinaryIO, out: BinaryIO, *, diff_id: str) -> BuiltArtifact:
        from imageledger.storage.erofs import build_layer

        return build_layer(blob, out, diff_id=diff_id)

    def build_fsmeta(self, layers: Sequence[os.PathLike[str]], out: BinaryIO) -> BuiltArtifact:
        from imageledger.storage.erofs import build_fsmeta

        return build_fsmeta([Path(layer) for layer in layers], out)

    def vmdk_descriptor(self, extents: Sequence[tuple[str, int]]) -> str:
        from imageledger.storage.vmdk import vmdk_descriptor

        return vmdk_descriptor(extents)


@dataclass(frozen=True, slots=True)
class _Written:
    """What a write of known bytes (the VMDK descriptor) produced."""

    size: int
    digest: str


class ArtifactFiles:
    """The `ArtifactStore` port over the home's ``artifacts/`` (see the module docstring)."""

    def __init__(self, store: BlobStore, leases: InFlightLeases) -> None:
        self.store = store
        self.home = store.home
        self.leases = leases

    @contextlib.contextmanager
    def working(self, digests: Sequence[str]) -> Iterator[LeaseWork]:
        with self.leases.lease() as lease:
            with self.leases.lock():
                for digest in digests:
                    lease.add(digest)
            yield LeaseWork(self, lease)

    @contextlib.contextmanager
    def lock(self, kind: str, digest: str) -> Iterator[None]:
        # `blob_lock` names its file by what follows the colon: ``<kind>-<hex>.lock``, apart
        # from the download locks of blobs (``<hex>.lock``).
        with blob_lock(self.store, f"materialize:{kind}-{digest.partition(':')[2]}"):
            yield

    def size(self, path: str) -> int | None:
        parent, name = _split(path)
        try:
            with self.home.sub(parent) as directory:
                return directory.file_size(name)
        except FileNotFoundError:
            return None

    def check(self, file: ArtifactFile) -> str | None:
        found = self.size(file.path)
        if found is None:
            return "missing"
        if found != file.size:
            return "wrong size"
        parent, name = _split(file.path)
        try:
            with self.home.sub(parent) as directory, directory.open_read(name) as f:
                size, digest = _hash(f)
        except FileNotFoundError:
            return "missing"
        return None if (size, digest) == (file.size, file.digest) else "corrupt"

    def where(self, path: str) -> str:
        return str(Path(self.store.root).absolute() / path)


class LeaseWork:
    """One materialize's lease and work directory (the `ArtifactWork` port)."""

    def __init__(self, files: ArtifactFiles, lease: InFlightLease) -> None:
        self._files = files
        self._work = lease.work

    def layer(self, blob_digest: str, diff_id: str, materializer: Materializer) -> StagedFile:
        with self._files.store.open(blob_digest) as blob:
            return self._build(
                layout.layer_artifact(blob_digest),
                lambda out: materializer.build_layer(blob, out, diff_id=diff_id),
                rehash=not _ours(materializer),
            )

    def fsmeta(
        self, manifest_digest: str, layers: Sequence[ArtifactFile], materializer: Materializer
    ) -> StagedFile:
        with contextlib.ExitStack() as stack:
            paths = []
            for layer in layers:
                parent, name = _split(layer.path)
                directory = stack.enter_context(self._files.home.sub(parent))
                opened = stack.enter_context(directory.open_read(name))
                # The very file opened (never through a link), by a name the writer can open.
                paths.append(Path(f"/proc/self/fd/{opened.fileno()}"))
            return self._build(
                layout.image_artifact(manifest_digest, layout.FSMETA_SUFFIX),
                lambda out: materializer.build_fsmeta(paths, out),
                rehash=not _ours(materializer),
            )
        raise AssertionError  # pragma: no cover - the with block returns

    def vmdk(self, manifest_digest: str, descriptor: bytes) -> StagedFile:
        def write(out: BinaryIO) -> BuiltArtifact:
            out.write(descriptor)
            return _Written(len(descriptor), f"sha256:{hashlib.sha256(descriptor).hexdigest()}")

        # The digest is of the very bytes written here, by this module: nothing to re-read.
        path = layout.image_artifact(manifest_digest, layout.VMDK_SUFFIX)
        return self._build(path, write, rehash=False)

    def _build(
        self, path: str, write: Callable[[BinaryIO], BuiltArtifact], *, rehash: bool
    ) -> StagedFile:
        """`write` a new file in the work directory, fsync it, and (`rehash`) hash it again;
        the staged file (`MaterializeError` when it is not what the writer said it wrote).

        Why the re-read is only for an embedder's materializer: the check exists because a
        `Materializer` is a port and the ledger never records a digest on a writer's word,
        so a plugged-in writer that reports a wrong digest (or writes after reporting) is
        caught here. The default writer's digest is no such word: `storage.erofs` computes
        it by reading the finished file back through `out` after flushing it, after its
        last write, which is exactly the read this re-hash would make (the fsync between
        them changes no byte). Re-reading would check that code against itself, for ~0.2 s
        per 200 MiB image (issue 13's benchmark). Nor can the one digest be taken while
        writing: an EROFS image's superblock (block 0) is known, and written, last. So the
        default (`ErofsMaterializer` exactly: a subclass may override a writer, as an
        embedder's wrapper may lie) is taken at its digest, and every other is re-read."""
        work = self._work
        name = f"{secrets.token_hex(4)}-{posixpath.basename(path)}"
        try:
            with work.create(name, readable=True) as out:
                built = write(out)
                out.flush()
                os.fsync(out.fileno())
                if rehash:
                    out.seek(0)
                    size, digest = _hash(out)
                else:  # the size is still checked: a stat costs nothing
                    size, digest = os.fstat(out.fileno()).st_size, built.digest
            if (built.size, built.digest) != (size, digest):
                msg = (
                    f"{path}: the materializer said it wrote {built.size} bytes hashing to "
                    f"{built.digest}; the file holds {size} bytes hashing to {digest}"
                )
                raise MaterializeError(msg)
        except BaseException:
            work.delete(name)
            raise
        return StagedFile(self._files.home, work, name, ArtifactFile(path, digest, size))


class StagedFile:
    """An artifact whole in the work directory (the `StagedArtifact` port)."""

    def __init__(self, home: Dir, work: Dir, name: str, file: ArtifactFile) -> None:
        self._home = home
        self._work = work
        self._name = name
        self.file = file

    def install(self) -> None:
        parent, name = _split(self.file.path)
        with self._home.sub(parent, create=True) as directory:
            self._work.replace(self._name, directory, name)
            directory.fsync()

    def discard(self) -> None:
        if self._work.fd >= 0:
            self._work.delete(self._name)


def _ours(materializer: Materializer) -> bool:
    """The default materializer itself (not a subclass), whose digests are its own read-back
    of the file (`LeaseWork._build`)."""
    return type(materializer) is ErofsMaterializer


def _split(path: str) -> tuple[str, str]:
    """(directory, name) of an artifact's path in the home; only paths under artifacts/."""
    parent, _, name = path.rpartition("/")
    if parent.split("/")[0] != layout.ARTIFACTS or not name or ".." in path.split("/"):
        msg = f"{path!r} is not an artifact's path"
        raise ValueError(msg)
    return parent, name


def _hash(f: BinaryIO) -> tuple[int, str]:
    """(size, ``sha256:<hex>``) of the open file `f`, read from where it stands to its end."""
    start = f.tell()
    # Every file here is a buffered one (`Dir.open_read`, the writer's "w+b"): it has readinto.
    digest = hashlib.file_digest(cast("io.BufferedIOBase", f), "sha256").hexdigest()
    return f.tell() - start, f"sha256:{digest}"


__all__ = ["ArtifactFiles", "ErofsMaterializer", "LeaseWork", "StagedFile"]
