"""Build real container images (for the demo and the tests): layer tars, configs, manifests,
OCI layouts, OCI archives and ``docker save`` tarballs, byte for byte deterministic.

Nothing here imports imageledger: the images are built the way the formats define them (OCI
image spec, Docker image spec v1.2 / ``docker save``), so that what the code under test reads
is independent of what it writes. Typical use::

    image = build_image(ImageSpec(layers=({"etc/os-release": b"ID=test\\n"},), names=("test:1",)))
    layout = build_oci_layout(tmp_path / "layout", [image])
    archive = build_docker_archive(tmp_path / "image.tar", [image])

Every builder returns what it built (`BuiltImage`, `BuiltLayout`, `BuiltArchive`) so tests can
compare digests, sizes and configs with what the code under test reports.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import posixpath
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Compression = Literal["none", "gzip", "zstd"]
DockerStyle = Literal["legacy", "docker25"]

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
LAYER_MEDIA_TYPES: Mapping[Compression, str] = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
IN_TOTO = "application/vnd.in-toto+json"
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
MTIME = 1_700_000_000
"""The fixed modification time of every file in built layers."""
CREATED = "2024-01-02T03:04:05Z"


def sha256(data: bytes) -> str:
    """``sha256:<hex>`` of `data`."""
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def json_bytes(obj: object) -> bytes:
    """Compact, key-sorted JSON (deterministic; not necessarily how Docker spells it)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def compress(data: bytes, compression: Compression) -> bytes:
    """`data` compressed deterministically (gzip with mtime 0, zstd level 3; zstd needs the
    `zstandard` package, imported only then)."""
    if compression == "none":
        return data
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    import zstandard

    return zstandard.ZstdCompressor(level=3).compress(data)


# ---- tar ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TarEntry:
    """One raw tar entry, for archives a test crafts by hand (hostile ones included).

    `type` is a `tarfile` type byte (``tarfile.REGTYPE``, ``SYMTYPE``, ``LNKTYPE``, ``DIRTYPE``,
    ``FIFOTYPE``, ``CHRTYPE``...); `size` overrides the header size (else ``len(data)``)."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    mode: int = 0o644
    mtime: int = 0


def tar_bytes(entries: Sequence[TarEntry], *, compression: Compression = "none") -> bytes:
    """A tar (PAX format) holding `entries` in the given order, optionally compressed."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type = entry.type
            info.mode = entry.mode
            info.mtime = entry.mtime
            info.linkname = entry.linkname
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if entry.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
            else:
                tar.addfile(info)
    return compress(buffer.getvalue(), compression)


def build_layer(files: Mapping[str, bytes], compression: Compression = "none") -> bytes:
    """A real layer: a tar of `files` (path -> content) with their parent directories, sorted,
    root-owned, fixed mtime, optionally compressed. A path ending in ``/`` is a directory."""
    entries: dict[str, TarEntry] = {}
    for path in files:
        parent = posixpath.dirname(path.rstrip("/"))
        while parent:
            entries.setdefault(
                parent + "/", TarEntry(parent + "/", type=tarfile.DIRTYPE, mode=0o755, mtime=MTIME)
            )
            parent = posixpath.dirname(parent)
    for path, data in files.items():
        if path.endswith("/"):
            entries[path] = TarEntry(path, type=tarfile.DIRTYPE, mode=0o755, mtime=MTIME)
        else:
            entries[path] = TarEntry(path, data, mode=0o644, mtime=MTIME)
    return tar_bytes([entries[name] for name in sorted(entries)], compression=compression)


def tar_directory(directory: Path, *, compression: Compression = "none") -> bytes:
    """A deterministic tar of everything under `directory` (an OCI layout -> an OCI archive)."""
    entries: list[TarEntry] = []
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if path.is_dir():
            entries.append(TarEntry(name + "/", type=tarfile.DIRTYPE, mode=0o755))
        else:
            entries.append(TarEntry(name, path.read_bytes()))
    return tar_bytes(entries, compression=compression)


# ---- images ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSpec:
    """What to build: layers (bottom first) as file maps, compression, platform, runtime config,
    and the names an archive gives the image (index.json ref names / RepoTags)."""

    layers: tuple[Mapping[str, bytes], ...] = ({"etc/hostname": b"test\n"},)
    compression: Compression = "gzip"
    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None
    env: tuple[str, ...] = ("PATH=/usr/local/bin:/usr/bin:/bin",)
    cmd: tuple[str, ...] | None = ("/bin/sh",)
    entrypoint: tuple[str, ...] | None = None
    working_dir: str = ""
    user: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    stop_signal: str | None = None
    names: tuple[str, ...] = ()
    docker_media_types: bool = False  # Docker v2 schema 2 manifest/config/layer media types


@dataclass(frozen=True)
class BuiltLayer:
    """One built layer: its blob, the blob's digest, the uncompressed tar's digest (diff_id)."""

    data: bytes
    digest: str
    diff_id: str
    media_type: str

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class BuiltImage:
    """A built image: config and manifest blobs and their digests, and its layers."""

    spec: ImageSpec
    config: bytes
    config_digest: str
    manifest: bytes
    manifest_digest: str
    manifest_media_type: str
    layers: tuple[BuiltLayer, ...]

    @property
    def blobs(self) -> dict[str, bytes]:
        """Every blob of the image by digest: manifest, config, layers."""
        result = {self.manifest_digest: self.manifest, self.config_digest: self.config}
        result.update((layer.digest, layer.data) for layer in self.layers)
        return result

    @property
    def platform(self) -> dict[str, str]:
        """The image's platform as an index entry spells it."""
        result = {"os": self.spec.os, "architecture": self.spec.architecture}
        if self.spec.variant:
            result["variant"] = self.spec.variant
        return result

    def descriptor(self, annotations: Mapping[str, str] | None = None) -> dict[str, object]:
        """The image's manifest descriptor (with platform) for an index."""
        result: dict[str, object] = {
            "mediaType": self.manifest_media_type,
            "digest": self.manifest_digest,
            "size": len(self.manifest),
            "platform": self.platform,
        }
        if annotations:
            result["annotations"] = dict(annotations)
        return result


def build_config(spec: ImageSpec, diff_ids: Sequence[str]) -> bytes:
    """An image config as Docker/BuildKit write it: platform, created, runtime config,
    ``rootfs.diff_ids`` and one history entry per layer."""
    runtime: dict[str, object] = {
        "Env": list(spec.env),
        "Cmd": None if spec.cmd is None else list(spec.cmd),
        "Entrypoint": None if spec.entrypoint is None else list(spec.entrypoint),
        "WorkingDir": spec.working_dir,
        "User": spec.user,
        "Labels": dict(spec.labels) or None,
    }
    if spec.stop_signal is not None:
        runtime["StopSignal"] = spec.stop_signal
    config: dict[str, object] = {
        "architecture": spec.architecture,
        "os": spec.os,
        "created": CREATED,
        "config": runtime,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [
            {"created": CREATED, "created_by": f"/bin/sh -c #(nop) ADD layer {i}"}
            for i in range(len(diff_ids))
        ],
    }
    if spec.variant:
        config["variant"] = spec.variant
    return json_bytes(config)


def build_image(spec: ImageSpec) -> BuiltImage:
    """Build `spec`: layer blobs, config (diff_ids = digests of the uncompressed tars), manifest."""
    layers: list[BuiltLayer] = []
    for files in spec.layers:
        raw = build_layer(files)
        blob = compress(raw, spec.compression)
        media_type = LAYER_MEDIA_TYPES[spec.compression]
        if spec.docker_media_types:
            if spec.compression != "gzip":
                raise ValueError("Docker v2 schema 2 layers are gzip")
            media_type = DOCKER_LAYER_GZIP
        layers.append(BuiltLayer(blob, sha256(blob), sha256(raw), media_type))
    config = build_config(spec, [layer.diff_id for layer in layers])
    manifest_type = DOCKER_MANIFEST if spec.docker_media_types else OCI_MANIFEST
    manifest = json_bytes(
        {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {
                "mediaType": DOCKER_CONFIG if spec.docker_media_types else OCI_CONFIG,
                "digest": sha256(config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}
                for layer in layers
            ],
        }
    )
    return BuiltImage(
        spec=spec,
        config=config,
        config_digest=sha256(config),
        manifest=manifest,
        manifest_digest=sha256(manifest),
        manifest_media_type=manifest_type,
        layers=tuple(layers),
    )


def _built(images: Sequence[ImageSpec | BuiltImage]) -> list[BuiltImage]:
    return [image if isinstance(image, BuiltImage) else build_image(image) for image in images]


def build_attestation(image: BuiltImage) -> tuple[bytes, dict[str, bytes]]:
    """A BuildKit-style attestation manifest for `image` and its blobs (config + in-toto)."""
    statement = json_bytes({"_type": "https://in-toto.io/Statement/v0.1", "subject": []})
    config = json_bytes({"architecture": "unknown", "os": "unknown", "config": {}, "rootfs": {}})
    manifest = json_bytes(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
            "layers": [
                {
                    "mediaType": IN_TOTO,
                    "digest": sha256(statement),
                    "size": len(statement),
                    "annotations": {"in-toto.io/predicate-type": "https://spdx.dev/Document"},
                }
            ],
        }
    )
    return manifest, {sha256(config): config, sha256(statement): statement}


# ---- OCI layouts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltLayout:
    """An OCI layout on disk: its images, and for a multi-arch layout the index and the
    attestation manifests it holds."""

    path: Path
    images: tuple[BuiltImage, ...]
    index_digest: str | None = None
    attestation_digests: tuple[str, ...] = ()


def write_blob(layout: Path, data: bytes) -> str:
    """Store `data` as ``blobs/sha256/<hex>`` of `layout`; return its digest."""
    digest = sha256(data)
    path = layout / "blobs" / "sha256" / digest.partition(":")[2]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def build_oci_layout(
    directory: Path,
    images: Sequence[ImageSpec | BuiltImage],
    *,
    multi_arch: bool = False,
    attestations: bool = False,
    names: Sequence[str] = (),
    omit: Sequence[str] = (),
) -> BuiltLayout:
    """Write an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256``).

    Single-arch: one index.json entry per image name (``org.opencontainers.image.ref.name``)
    or one unnamed entry. `multi_arch`: the images are the platforms of one image index, which
    index.json lists once per name in `names`; `attestations` adds a BuildKit attestation
    manifest (platform unknown/unknown) per platform. Blobs whose digest is in `omit` are not
    written (a partial layout).
    """
    built = _built(images)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "oci-layout").write_bytes(json_bytes({"imageLayoutVersion": "1.0.0"}))
    blobs: dict[str, bytes] = {}
    for image in built:
        blobs.update(image.blobs)
    entries: list[dict[str, object]] = []
    index_digest: str | None = None
    attestation_digests: list[str] = []
    if multi_arch:
        children: list[dict[str, object]] = [image.descriptor() for image in built]
        if attestations:
            for image in built:
                manifest, extra = build_attestation(image)
                blobs.update(extra)
                blobs[sha256(manifest)] = manifest
                attestation_digests.append(sha256(manifest))
                children.append(
                    {
                        "mediaType": OCI_MANIFEST,
                        "digest": sha256(manifest),
                        "size": len(manifest),
                        "platform": {"os": "unknown", "architecture": "unknown"},
                        "annotations": {
                            "vnd.docker.reference.digest": image.manifest_digest,
                            "vnd.docker.reference.type": "attestation-manifest",
                        },
                    }
                )
        index = json_bytes({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children})
        index_digest = sha256(index)
        blobs[index_digest] = index
        descriptor = {"mediaType": OCI_INDEX, "digest": index_digest, "size": len(index)}
        for name in names or [""]:
            entry: dict[str, object] = dict(descriptor)
            if name:
                entry["annotations"] = {REF_NAME: name}
            entries.append(entry)
    else:
        for image in built:
            for name in image.spec.names or ("",):
                entries.append(image.descriptor({REF_NAME: name} if name else None))
    for digest, data in blobs.items():
        if digest not in omit:
            write_blob(directory, data)
    (directory / "index.json").write_bytes(
        json_bytes({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
    )
    return BuiltLayout(directory, tuple(built), index_digest, tuple(attestation_digests))


def build_oci_archive(
    path: Path,
    images: Sequence[ImageSpec | BuiltImage],
    *,
    compression: Compression = "none",
    multi_arch: bool = False,
    attestations: bool = False,
    names: Sequence[str] = (),
) -> BuiltLayout:
    """An OCI archive: a tar (optionally gzip'd) of the layout `build_oci_layout` writes."""
    staging = path.with_name(path.name + ".layout")
    layout = build_oci_layout(
        staging, images, multi_arch=multi_arch, attestations=attestations, names=names
    )
    path.write_bytes(tar_directory(staging, compression=compression))
    return BuiltLayout(path, layout.images, layout.index_digest, layout.attestation_digests)


# ---- docker save -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltArchive:
    """A ``docker save`` tarball and the images in it (in manifest.json order)."""

    path: Path
    images: tuple[BuiltImage, ...]
    manifest_json: bytes


def _docker_entries_legacy(built: Sequence[BuiltImage]) -> tuple[list[TarEntry], bytes]:
    """Docker before 25: ``<config hex>.json``, ``<v1 id>/layer.tar`` (+ ``json``,
    ``VERSION``), ``repositories``; a layer blob already written under another v1 id becomes a
    relative symlink, as ``docker save`` does."""
    files: dict[str, TarEntry] = {}
    first_path: dict[str, str] = {}
    items: list[dict[str, object]] = []
    repositories: dict[str, dict[str, str]] = {}
    for image in built:
        config_name = image.config_digest.partition(":")[2] + ".json"
        files[config_name] = TarEntry(config_name, image.config)
        parent = ""
        layer_paths: list[str] = []
        for layer in image.layers:
            v1_id = hashlib.sha256(f"{parent} {layer.diff_id}".encode()).hexdigest()
            parent = v1_id
            layer_path = f"{v1_id}/layer.tar"
            layer_paths.append(layer_path)
            if layer_path in files:
                continue
            files[f"{v1_id}/"] = TarEntry(f"{v1_id}/", type=tarfile.DIRTYPE, mode=0o755)
            files[f"{v1_id}/VERSION"] = TarEntry(f"{v1_id}/VERSION", b"1.0")
            files[f"{v1_id}/json"] = TarEntry(f"{v1_id}/json", json_bytes({"id": v1_id}))
            if layer.digest in first_path:
                target = f"../{first_path[layer.digest]}"
                files[layer_path] = TarEntry(layer_path, type=tarfile.SYMTYPE, linkname=target)
            else:
                first_path[layer.digest] = layer_path
                files[layer_path] = TarEntry(layer_path, layer.data)
        items.append(
            {"Config": config_name, "RepoTags": list(image.spec.names), "Layers": layer_paths}
        )
        for name in image.spec.names:
            repository, _, tag = name.rpartition(":")
            repositories.setdefault(repository, {})[tag] = parent
    manifest_json = json.dumps(items).encode()
    files["manifest.json"] = TarEntry("manifest.json", manifest_json)
    files["repositories"] = TarEntry("repositories", json.dumps(repositories).encode())
    return [files[name] for name in sorted(files)], manifest_json


def _docker_entries_25(built: Sequence[BuiltImage]) -> tuple[list[TarEntry], bytes]:
    """Docker 25+: an OCI layout (blobs/sha256, index.json with containerd's name annotation
    and the tag as ref name, oci-layout) plus manifest.json pointing into blobs/."""
    blobs: dict[str, bytes] = {}
    index: list[dict[str, object]] = []
    items: list[dict[str, object]] = []
    for image in built:
        blobs.update(image.blobs)
        for name in image.spec.names:
            repository, _, tag = name.rpartition(":")
            first = repository.split("/")[0]
            if "/" in repository and ("." in first or ":" in first or first == "localhost"):
                full = name
            elif "/" in repository:
                full = f"docker.io/{name}"
            else:
                full = f"docker.io/library/{name}"
            index.append(image.descriptor({CONTAINERD_NAME: full, REF_NAME: tag}))
        items.append(
            {
                "Config": "blobs/sha256/" + image.config_digest.partition(":")[2],
                "RepoTags": list(image.spec.names),
                "Layers": [
                    "blobs/sha256/" + layer.digest.partition(":")[2] for layer in image.layers
                ],
            }
        )
    manifest_json = json.dumps(items).encode()
    entries = [
        TarEntry("blobs/", type=tarfile.DIRTYPE, mode=0o755),
        TarEntry("blobs/sha256/", type=tarfile.DIRTYPE, mode=0o755),
    ]
    entries += [TarEntry("blobs/sha256/" + d.partition(":")[2], blobs[d]) for d in sorted(blobs)]
    entries += [
        TarEntry(
            "index.json",
            json_bytes({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index}),
        ),
        TarEntry("manifest.json", manifest_json),
        TarEntry("oci-layout", json_bytes({"imageLayoutVersion": "1.0.0"})),
    ]
    return entries, manifest_json


def build_docker_archive(
    path: Path,
    images: Sequence[ImageSpec | BuiltImage],
    *,
    style: DockerStyle = "legacy",
) -> BuiltArchive:
    """Write a ``docker save`` tarball of `images` (RepoTags = each spec's names).

    ``legacy`` is the layout of Docker before 25 (and of skopeo's docker-archive); the layer
    files are the image's layer blobs as built, so an ImageSpec's compression decides whether
    they are plain tars, gzip or zstd. ``docker25`` is the OCI-layout-based layout Docker 25+
    writes.
    """
    built = _built(images)
    if style == "legacy":
        entries, manifest_json = _docker_entries_legacy(built)
    else:
        entries, manifest_json = _docker_entries_25(built)
    path.write_bytes(tar_bytes(entries))
    return BuiltArchive(path, tuple(built), manifest_json)


__all__ = [
    "CREATED",
    "LAYER_MEDIA_TYPES",
    "MTIME",
    "BuiltArchive",
    "BuiltImage",
    "BuiltLayer",
    "BuiltLayout",
    "Compression",
    "DockerStyle",
    "ImageSpec",
    "TarEntry",
    "build_attestation",
    "build_config",
    "build_docker_archive",
    "build_image",
    "build_layer",
    "build_oci_archive",
    "build_oci_layout",
    "compress",
    "json_bytes",
    "sha256",
    "tar_bytes",
    "tar_directory",
    "write_blob",
]
