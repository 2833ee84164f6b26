"""Image archives: load OCI layouts, OCI archives and ``docker save`` tarballs; save either.

The two entry points, `load` and `save`; the work is done by the modules named below.

Loading reads a tar exactly once, front to back (it may be stdin), and never trusts it
(`storage.tarsafe`, `storage.archivesources`): every entry name is checked, only regular
files, directories and links that stay inside the archive are accepted, entries and metadata
are bounded, blobs stream into the blob store verified on the way. Nothing a failed load
wrote survives: the blobs it added are deleted and its spool is removed; blobs that were in
the store before are left alone. A successful load also deletes the blobs it added that no
loaded image uses (attestations, other platforms' leftovers).

Format choice: ``oci-layout`` + a valid ``index.json`` is an OCI layout (`storage.ociload`;
this includes Docker 25+ tarballs, whose ``manifest.json`` then only contributes RepoTags);
otherwise ``manifest.json`` is a docker-archive (`storage.dockerload`), for which an OCI image
manifest is synthesized with `canonical_json` so that the same archive always yields the same
manifest digest. An image listed more than once (under several names, or by both files of a
Docker 25+ tarball) is one image with every name, each once whatever its spelling.

Saving (`storage.archivesave`) writes a deterministic tar (sorted entries, mtime 0, uid/gid 0,
files 0644): the same images saved twice give the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final

from imageledger.domain.errors import ArchiveError, InvalidReferenceError
from imageledger.domain.log import get_logger
from imageledger.domain.model import ImageContent, LoadedImage
from imageledger.domain.reference import parse_reference
from imageledger.storage.archivesave import ArchiveFormat, save
from imageledger.storage.archivesources import DirSource, LoadWork, Source, TarSource
from imageledger.storage.dockerload import docker_repo_tags, load_docker, parse_docker_manifest
from imageledger.storage.oci import BlobAccess
from imageledger.storage.ociload import load_oci, read_layout

log = get_logger(__name__)

DEFAULT_MAX_ENTRY_SIZE: Final = 64 * 1024**3
"""Largest archive entry (a layer) accepted by default: 64 GiB."""


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


@dataclass(slots=True)
class _Found:
    content: ImageContent
    names: list[str]
    seen: set[str] = field(default_factory=set)  # the names' canonical forms


def _merged(images: Iterable[LoadedImage]) -> list[LoadedImage]:
    """One image per manifest, in the order first met, with the names of all its listings."""
    found: dict[str, _Found] = {}
    for image in images:
        known = found.get(image.content.manifest_digest)
        if known is None:
            found[image.content.manifest_digest] = known = _Found(image.content, [])
        _add_names(known.names, image.names, known.seen)
    return [LoadedImage(f.content, tuple(f.names)) for f in found.values()]


# ---- loading ---------------------------------------------------------------------------------


def _load_from(source: Source, store: BlobAccess) -> list[LoadedImage]:
    layout = read_layout(source)
    manifest_json = source.metadata("manifest.json")
    found: list[LoadedImage]
    if isinstance(layout, list):
        found = load_oci(source, store, layout)
        if manifest_json is not None and isinstance(source, TarSource):
            images = list({i.content.manifest_digest: i.content for i in found}.values())
            found += docker_repo_tags(source, parse_docker_manifest(manifest_json), images)
    elif manifest_json is not None and isinstance(source, TarSource):
        found = load_docker(source, store, parse_docker_manifest(manifest_json))
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
    load_ = LoadWork(store, max_entry_size)
    keep: set[str] = set()
    try:
        if isinstance(source, str | os.PathLike):
            path = Path(source)
            if path.is_dir():
                found = _load_from(DirSource(path, load_), store)
            else:
                try:
                    stream = path.open("rb")
                except OSError as e:
                    raise ArchiveError(f"cannot read archive {path}: {e}") from None
                with stream:
                    tar = TarSource(load_)
                    tar.scan(stream, str(path))
                    found = _load_from(tar, store)
        else:
            tar = TarSource(load_)
            tar.scan(source, "archive stream")
            found = _load_from(tar, store)
        images = _merged(found)
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


__all__ = ["DEFAULT_MAX_ENTRY_SIZE", "ArchiveFormat", "load", "save"]
