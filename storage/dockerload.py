"""Loading a ``docker save`` tarball (a docker-archive) from its `TarSource`.

``manifest.json`` lists each image: its config file, its layer files (bottom to top, links
inside the archive followed: legacy ``docker save`` stores a shared layer once) and its
RepoTags. An OCI image manifest is synthesized for each with `canonical_json`, so that the
same archive always yields the same manifest digest; a layer's media type is read from its
first bytes (gzip, zstd or a plain tar). A Docker 25+ tarball is an OCI layout too: there,
``manifest.json`` only contributes the RepoTags (`docker_repo_tags`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from imageledger.domain.errors import ArchiveError, ManifestError
from imageledger.domain.model import (
    OCI_CONFIG,
    OCI_MANIFEST,
    ImageContent,
    LoadedImage,
)
from imageledger.storage.archivesources import TarSource, once
from imageledger.storage.oci import (
    MAX_INDEX_ENTRIES,
    MAX_LAYERS,
    BlobAccess,
    canonical_json,
    describe_image,
    layer_media_type,
    parse_json,
)


@dataclass(frozen=True, slots=True)
class DockerItem:
    config: str
    repo_tags: tuple[str, ...]
    layers: tuple[str, ...]


def parse_docker_manifest(data: bytes) -> list[DockerItem]:
    what = "manifest.json"
    try:
        obj = parse_json(data, what)
    except ManifestError as e:
        raise ArchiveError(str(e)) from None
    if not isinstance(obj, list) or not obj:
        raise ArchiveError(f"{what}: expected a non-empty JSON array of images")
    if len(obj) > MAX_INDEX_ENTRIES:
        raise ArchiveError(f"{what}: {len(obj)} images is more than {MAX_INDEX_ENTRIES}")
    items: list[DockerItem] = []
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
        items.append(DockerItem(config, tuple(tags), tuple(layers)))
    return items


def load_docker(source: TarSource, store: BlobAccess, items: list[DockerItem]) -> list[LoadedImage]:
    """The images `items` (``manifest.json``'s) describe, each with its RepoTags, in order."""
    found: list[LoadedImage] = []
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
                    "mediaType": layer_media_type(layer.head(store, 4)),
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
        source.load.put(digest, once(manifest), len(manifest), where)
        found.append(LoadedImage(describe_image(store, digest), item.repo_tags))
    return found


def docker_repo_tags(
    source: TarSource, items: list[DockerItem], images: Sequence[ImageContent]
) -> list[LoadedImage]:
    """Docker 25+ tarballs: RepoTags of manifest.json go to the OCI image with that config
    (`images`, those the layout gave), in manifest.json's order."""
    found: list[LoadedImage] = []
    for i, item in enumerate(items):
        where = f"manifest.json[{i}]"
        config = source.file(item.config, f"{where} Config")
        for j, path in enumerate(item.layers):
            source.file(path, f"{where} Layers[{j}]")
        found.extend(
            LoadedImage(image, item.repo_tags)
            for image in images
            if image.config.digest == config.digest
        )
    return found


__all__ = ["DockerItem", "docker_repo_tags", "load_docker", "parse_docker_manifest"]
