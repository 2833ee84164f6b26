"""Saving images from the store as an archive: an OCI archive or a docker-archive.

The tar is deterministic (sorted entries, mtime 0, uid/gid 0, files 0644, directories 0755):
the same images saved twice give the same bytes. Every blob is hashed on its way into the
archive and must be what the ledger says (size and digest): a corrupt store must not spread
into archives (`ContentCorruptError`, asking for ``imageledger verify --repair``). A path is
written through a temporary file beside it, renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import posixpath
import secrets
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, BinaryIO, Final, Literal

from imageledger.domain.errors import ArchiveError, ContentCorruptError, ManifestError
from imageledger.domain.log import get_logger
from imageledger.domain.model import OCI_INDEX, ImageContent, Platform
from imageledger.domain.reference import familiar_name, parse_reference, validate_digest
from imageledger.storage.oci import (
    ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
    BlobAccess,
    canonical_json,
    describe_image,
)

log = get_logger(__name__)

ArchiveFormat = Literal["docker", "oci"]
_LAYOUT_VERSION: Final = "1.0.0"
_NO_PLATFORM: Final = Platform("unknown", "unknown")


def _familiar(reference: str) -> str:
    """Docker's short spelling of a canonical tagged reference (``alpine:3.19``)."""
    ref = parse_reference(reference)
    return f"{familiar_name(f'{ref.registry}/{ref.repository}')}:{ref.tag}"


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


__all__ = ["ArchiveFormat", "save"]
