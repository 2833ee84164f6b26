"""Loading an OCI layout (a directory, an OCI archive, a Docker 25+ tarball) from its source.

``oci-layout`` plus a valid ``index.json`` make an OCI layout. Each entry of ``index.json`` is
an image manifest (loaded), or an index whose platform manifests the archive holds are
loaded (nested indexes followed by `storage.oci.index_manifests`; the platforms an archive
leaves out, as ``docker save --platform`` does, are skipped), or something else (skipped, and
logged). Attestations are skipped. Every blob a manifest references must be in the archive.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from imageledger.domain.errors import ArchiveError, InvalidReferenceError, ManifestError
from imageledger.domain.log import get_logger
from imageledger.domain.model import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    ImageContent,
    LoadedImage,
    Platform,
)
from imageledger.domain.reference import parse_reference
from imageledger.storage.archivesources import Source
from imageledger.storage.oci import (
    ANNOTATION_CONTAINERD_NAME,
    MAX_MANIFEST_SIZE,
    BlobAccess,
    IndexEntry,
    describe_image,
    index_manifests,
    parse_index,
    parse_json,
    parse_manifest,
    read_small_blob,
)

log = get_logger(__name__)


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


def read_layout(source: Source) -> list[IndexEntry] | str:
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
    source: Source,
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
    source: Source, store: BlobAccess, entry: IndexEntry, what: str
) -> list[IndexEntry]:
    """The platform manifests of index `entry` and of the indexes it nests, that the archive
    holds (no attestation). ``index.json`` is depth 0, so `entry`'s own index is depth 1, as
    a registry's top-level index is."""

    def fetch(index: IndexEntry) -> list[IndexEntry]:
        if not source.blob(index.digest, MAX_MANIFEST_SIZE):
            raise ArchiveError(f"{what}: index blob {index.digest} is not in the archive")
        _check_stored_size(store, index.digest, index.size, what)
        data = read_small_blob(store, index.digest, "index")
        return parse_index(data, index.media_type, digest=index.digest)

    def held(entries: Iterable[IndexEntry]) -> Iterator[IndexEntry]:
        # Lazily: an entry's blob is copied when the walk reaches it, in the index's order.
        for child in entries:
            if child.attestation:
                continue
            if child.media_type in INDEX_TYPES or (
                child.media_type in MANIFEST_TYPES and source.blob(child.digest, MAX_MANIFEST_SIZE)
            ):
                yield child

    return index_manifests(
        [entry], fetch=fetch, select=held, what=what, error=ArchiveError, depth=0
    )


def load_oci(source: Source, store: BlobAccess, entries: list[IndexEntry]) -> list[LoadedImage]:
    """The images of layout index `entries` (``index.json``'s), each with the names its
    entry gives, in order (a manifest listed twice comes twice: the caller merges)."""
    found: list[LoadedImage] = []
    for i, entry in enumerate(entries):
        what = f"index.json manifests[{i}]"
        if entry.attestation:
            continue
        names = tuple(_entry_names(entry))
        if entry.media_type in MANIFEST_TYPES:
            content = _load_manifest(source, store, entry, entry.platform, what)
            found.append(LoadedImage(content, names))
        elif entry.media_type in INDEX_TYPES:
            children = _platform_manifests(source, store, entry, what)
            if not children:
                msg = f"{what}: index {entry.digest} has no platform manifest in the archive"
                raise ArchiveError(msg)
            for child in children:
                content = _load_manifest(source, store, child, child.platform, what)
                found.append(LoadedImage(content, names))
        else:
            log.info("archive.skip_entry", entry=what, media_type=entry.media_type)
    return found


__all__ = ["load_oci", "read_layout"]
