"""storage/archives.py: load OCI layouts, OCI archives and docker-archives (files and streams),
save deterministic archives, refuse hostile archives leaving nothing behind, and interoperate
with skopeo."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import replace as replace_fields
from pathlib import Path
from typing import BinaryIO

import pytest

from imageledger.domain.errors import (
    ArchiveError,
    ContentMissingError,
    DigestMismatchError,
    InvalidReferenceError,
    ManifestError,
)
from imageledger.domain.model import OCI_MANIFEST, LoadedImage, Platform
from imageledger.storage.archives import load, save
from imageledger.storage.blobs import BlobStore
from imageledger.tools.imagebuild import (
    LAYER_MEDIA_TYPES,
    BuiltImage,
    Compression,
    ImageSpec,
    TarEntry,
    build_docker_archive,
    build_image,
    build_layer,
    build_oci_archive,
    build_oci_layout,
    json_bytes,
    sha256,
    tar_bytes,
    tar_directory,
    write_blob,
)

SKOPEO = shutil.which("skopeo")
needs_skopeo = pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed")

ALPINE = ImageSpec(
    layers=({"etc/os-release": b"ID=alpine\n", "bin/": b""}, {"etc/motd": b"hello\n"}),
    names=("alpine:3.19",),
    env=("PATH=/usr/bin", "LANG=C.UTF-8"),
    cmd=("/bin/sh",),
    entrypoint=("/entry",),
    working_dir="/root",
    user="nobody",
    labels={"org.example.b": "2", "org.example.a": "1"},
    stop_signal="SIGTERM",
)
BUSYBOX = ImageSpec(
    layers=({"bin/busybox": b"\x7fELF busybox"},),
    names=("busybox:1.36", "localhost:5000/tools/busybox:stable"),
    cmd=None,
)


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "home")


def state(store: BlobStore) -> tuple[list[str], list[str]]:
    """What a failed load must not change: the blob set and the contents of tmp/."""
    partials = (
        [p.relative_to(store.tmp).as_posix() for p in store.tmp.rglob("*")]
        if store.tmp.exists()
        else []
    )
    return list(store.digests()), sorted(partials)


def check_content(loaded: LoadedImage, image: BuiltImage) -> None:
    """`loaded` is exactly `image`: same manifest, config, platform and layers."""
    content = loaded.content
    spec = image.spec
    assert content.manifest_digest == image.manifest_digest
    assert content.manifest_size == len(image.manifest)
    assert content.config.digest == image.config_digest
    assert content.config_size == len(image.config)
    assert content.config.env == spec.env
    assert content.config.cmd == spec.cmd
    assert content.config.entrypoint == spec.entrypoint
    assert content.config.working_dir == (spec.working_dir or None)
    assert content.config.user == (spec.user or None)
    assert content.config.labels == tuple(sorted(spec.labels.items()))
    assert content.config.stop_signal == spec.stop_signal
    assert content.platform == Platform(spec.os, spec.architecture, spec.variant)
    assert [
        (
            layer.position,
            layer.blob_digest,
            layer.diff_id,
            layer.compressed_size_bytes,
            layer.media_type,
        )
        for layer in content.layers
    ] == [
        (i, layer.digest, layer.diff_id, layer.size, layer.media_type)
        for i, layer in enumerate(image.layers)
    ]


def check_stored(store: BlobStore, *images: LoadedImage) -> None:
    """The store holds exactly the blobs of `images`, each verified."""
    expected = sorted({digest for image in images for digest, _ in image.content.blobs})
    assert list(store.digests()) == expected
    assert all(store.verify(digest) for digest in expected)
    assert state(store)[1] == []


# ---- OCI layouts and archives ----------------------------------------------------------------


def test_load_oci_layout_directory(store: BlobStore, tmp_path: Path) -> None:
    layout = build_oci_layout(tmp_path / "layout", [ALPINE, BUSYBOX])
    loaded = load(layout.path, store)
    assert [image.names for image in loaded] == [("alpine:3.19",), BUSYBOX.names]
    check_content(loaded[0], layout.images[0])
    check_content(loaded[1], layout.images[1])
    check_stored(store, *loaded)


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_load_oci_archive(store: BlobStore, tmp_path: Path, compression: Compression) -> None:
    archive = build_oci_archive(tmp_path / "oci.tar", [ALPINE], compression=compression)
    loaded = load(archive.path, store)
    assert len(loaded) == 1
    assert loaded[0].names == ("alpine:3.19",)
    check_content(loaded[0], archive.images[0])
    check_stored(store, *loaded)


def test_load_docker_media_types(store: BlobStore, tmp_path: Path) -> None:
    spec = ImageSpec(docker_media_types=True, names=("example.com/app:v1",))
    loaded = load(build_oci_archive(tmp_path / "oci.tar", [spec]).path, store)
    assert (
        loaded[0].content.manifest_media_type
        == "application/vnd.docker.distribution.manifest.v2+json"
    )
    assert loaded[0].names == ("example.com/app:v1",)


def test_multi_arch_layout_yields_one_image_per_platform(store: BlobStore, tmp_path: Path) -> None:
    amd64 = ImageSpec(layers=({"arch": b"amd64"},))
    arm64 = ImageSpec(layers=({"arch": b"arm64"},), architecture="arm64", variant="v8")
    layout = build_oci_layout(
        tmp_path / "layout",
        [amd64, arm64],
        multi_arch=True,
        attestations=True,
        names=("3.19", "latest"),
    )
    loaded = load(layout.path, store)
    assert [image.content.platform for image in loaded] == [
        Platform("linux", "amd64"),
        Platform("linux", "arm64", "v8"),
    ]
    for image, built in zip(loaded, layout.images, strict=True):
        check_content(image, built)
        assert image.names == ("3.19", "latest")  # bare tags as the layout gives them
    # The attestation manifests and the index were read but are no image's blobs: not kept.
    check_stored(store, *loaded)
    assert layout.index_digest is not None and not store.has(layout.index_digest)
    assert not any(store.has(digest) for digest in layout.attestation_digests)


def test_multi_arch_archive_skips_platforms_it_does_not_hold(
    store: BlobStore, tmp_path: Path
) -> None:
    amd64 = build_image(ImageSpec(layers=({"arch": b"amd64"},)))
    arm64 = build_image(ImageSpec(layers=({"arch": b"arm64"},), architecture="arm64"))
    layout = build_oci_layout(
        tmp_path / "layout", [amd64, arm64], multi_arch=True, omit=[arm64.manifest_digest]
    )
    loaded = load(Path(layout.path), store)
    assert [image.content.manifest_digest for image in loaded] == [amd64.manifest_digest]
    stream = io.BytesIO(tar_directory(layout.path, compression="gzip"))
    assert [
        image.content.manifest_digest for image in load(stream, BlobStore(tmp_path / "other"))
    ] == [amd64.manifest_digest]


def test_same_manifest_under_several_names_is_one_image(store: BlobStore, tmp_path: Path) -> None:
    spec = ImageSpec(names=("app:1", "app:latest", "docker.io/library/app:1"))
    loaded = load(build_oci_layout(tmp_path / "layout", [spec]).path, store)
    assert len(loaded) == 1
    assert loaded[0].names == ("app:1", "app:latest")  # one spelling per reference


def test_loading_twice_is_idempotent(store: BlobStore, tmp_path: Path) -> None:
    archive = build_oci_archive(tmp_path / "oci.tar", [ALPINE, BUSYBOX])
    first = load(archive.path, store)
    blobs = list(store.digests())
    second = load(archive.path, store)
    assert first == second
    assert list(store.digests()) == blobs


# ---- docker-archives -------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_load_docker_archive(store: BlobStore, tmp_path: Path, compression: Compression) -> None:
    spec = ImageSpec(
        layers=ALPINE.layers,
        compression=compression,
        names=ALPINE.names,
        labels={"a": "b"},
        stop_signal="SIGINT",
    )
    archive = build_docker_archive(tmp_path / "docker.tar", [spec])
    loaded = load(archive.path, store)
    assert len(loaded) == 1
    image = loaded[0]
    built = archive.images[0]
    assert image.names == ("alpine:3.19",)
    assert image.content.config.digest == built.config_digest
    assert image.content.config.labels == (("a", "b"),)
    assert image.content.config.stop_signal == "SIGINT"
    assert image.content.manifest_media_type == OCI_MANIFEST
    assert [
        (layer.blob_digest, layer.diff_id, layer.media_type) for layer in image.content.layers
    ] == [(layer.digest, layer.diff_id, LAYER_MEDIA_TYPES[compression]) for layer in built.layers]
    # The synthesized manifest is canonical OCI JSON over the archive's blobs.
    manifest = json.loads(store.read(image.content.manifest_digest))
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["config"] == {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        "digest": built.config_digest,
        "size": len(built.config),
    }
    assert store.read(image.content.manifest_digest) == json_bytes(manifest)
    check_stored(store, *loaded)


def test_docker_archive_manifest_digest_is_stable(tmp_path: Path) -> None:
    spec = ImageSpec(compression="none", names=("app:1",))
    first = build_docker_archive(tmp_path / "a.tar", [spec])
    second = build_docker_archive(tmp_path / "b.tar", [build_image(spec)])
    digests = {
        load(archive.path, BlobStore(tmp_path / name))[0].content.manifest_digest
        for archive, name in ((first, "s1"), (second, "s2"), (first, "s2"))
    }
    assert len(digests) == 1


def test_docker_archive_with_several_images_sharing_layers(
    store: BlobStore, tmp_path: Path
) -> None:
    base = {"etc/os-release": b"ID=base\n"}
    app = {"app/main.py": b"print('hi')\n"}
    one = ImageSpec(layers=(base, app), compression="none", names=("one:1",))
    # `app` again, on another chain: legacy docker save writes it once and symlinks it.
    two = ImageSpec(
        layers=({"other": b"x"}, app), compression="none", names=("two:1", "two:latest")
    )
    three = ImageSpec(layers=(base,), compression="none", names=())
    archive = build_docker_archive(tmp_path / "docker.tar", [one, two, three])
    with tarfile.open(archive.path) as tar:
        assert any(member.issym() for member in tar.getmembers())
    loaded = load(archive.path, store)
    assert [image.names for image in loaded] == [("one:1",), ("two:1", "two:latest"), ()]
    shared = loaded[0].content.layers[1].blob_digest
    assert loaded[1].content.layers[1].blob_digest == shared
    assert loaded[2].content.layers[0].blob_digest == loaded[0].content.layers[0].blob_digest
    for image, built in zip(loaded, archive.images, strict=True):
        assert image.content.config.digest == built.config_digest
    check_stored(store, *loaded)


def test_docker25_archive_prefers_the_oci_index(store: BlobStore, tmp_path: Path) -> None:
    archive = build_docker_archive(tmp_path / "docker.tar", [ALPINE, BUSYBOX], style="docker25")
    loaded = load(archive.path, store)
    # The real manifests (not synthesized ones), named by containerd's full names (the bare
    # ref.name tag and the short RepoTags spell the same references).
    check_content(loaded[0], archive.images[0])
    check_content(loaded[1], archive.images[1])
    assert loaded[0].names == ("docker.io/library/alpine:3.19",)
    assert loaded[1].names == (
        "docker.io/library/busybox:1.36",
        "localhost:5000/tools/busybox:stable",
    )


def test_repo_tags_join_names_from_the_index(store: BlobStore, tmp_path: Path) -> None:
    image = build_image(ImageSpec(names=("a:1",)))
    layout = build_oci_layout(tmp_path / "layout", [image])
    manifest_json = [
        {
            "Config": "blobs/sha256/" + image.config_digest.partition(":")[2],
            "RepoTags": ["b:2"],
            "Layers": ["blobs/sha256/" + layer.digest.partition(":")[2] for layer in image.layers],
        }
    ]
    (layout.path / "manifest.json").write_text(json.dumps(manifest_json))
    loaded = load(io.BytesIO(tar_directory(layout.path)), store)
    assert loaded[0].names == ("a:1", "b:2")


def test_invalid_index_falls_back_to_manifest_json(store: BlobStore, tmp_path: Path) -> None:
    archive = build_docker_archive(tmp_path / "docker.tar", [ALPINE], style="docker25")
    with tarfile.open(archive.path) as tar:
        entries = [
            TarEntry(m.name, tar.extractfile(m).read() if m.isfile() else b"", m.type)  # type: ignore[union-attr]
            for m in tar.getmembers()
        ]
    broken = [
        TarEntry(e.name, b'{"schemaVersion": 1}', e.type) if e.name == "index.json" else e
        for e in entries
    ]
    (tmp_path / "broken.tar").write_bytes(tar_bytes(broken))
    loaded = load(tmp_path / "broken.tar", store)
    assert loaded[0].names == ("alpine:3.19",)
    assert loaded[0].content.config.digest == archive.images[0].config_digest


# ---- streams ---------------------------------------------------------------------------------


class NonSeekable(io.RawIOBase):
    """A read-only stream that cannot seek or tell (like a pipe)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        chunk = self._data.read(min(len(buffer), 4096))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def pipe_reader(data: bytes) -> tuple[BinaryIO, threading.Thread]:
    """A buffered reader over an OS pipe fed by a thread (stdin-like)."""
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        with os.fdopen(write_fd, "wb") as writer:
            writer.write(data)

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return os.fdopen(read_fd, "rb"), thread


def test_load_from_a_pipe(store: BlobStore, tmp_path: Path) -> None:
    archive = build_docker_archive(tmp_path / "docker.tar", [ALPINE, BUSYBOX])
    reader, thread = pipe_reader(archive.path.read_bytes())
    with reader:
        assert not reader.seekable()
        loaded = load(reader, store)
    thread.join()
    assert [image.content.config.digest for image in loaded] == [
        i.config_digest for i in archive.images
    ]
    check_stored(store, *loaded)


@pytest.mark.parametrize("kind", ["oci", "oci-gzip", "docker", "docker25"])
def test_load_from_a_non_seekable_stream(store: BlobStore, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "archive.tar"
    if kind.startswith("oci"):
        built = build_oci_archive(
            path, [ALPINE], compression="gzip" if kind == "oci-gzip" else "none"
        ).images
    else:
        built = build_docker_archive(
            path, [ALPINE], style="docker25" if kind == "docker25" else "legacy"
        ).images
    stream = io.BufferedReader(NonSeekable(path.read_bytes()))
    loaded = load(stream, store)
    assert loaded[0].content.config.digest == built[0].config_digest
    assert load(path, store) == loaded


# ---- save ------------------------------------------------------------------------------------


def loaded_into(store: BlobStore, tmp_path: Path, *specs: ImageSpec) -> list[LoadedImage]:
    return load(build_oci_layout(tmp_path / "source", list(specs)).path, store)


def test_save_oci_then_load_gives_the_same_images(store: BlobStore, tmp_path: Path) -> None:
    alpine, busybox = loaded_into(store, tmp_path, ALPINE, BUSYBOX)
    refs = [
        ("docker.io/library/alpine:3.19", alpine.content.manifest_digest),
        ("docker.io/library/busybox:1.36", busybox.content.manifest_digest),
        (
            "localhost:5000/tools/busybox@" + busybox.content.manifest_digest,
            busybox.content.manifest_digest,
        ),
    ]
    save(refs, store, tmp_path / "out.tar", format="oci")
    with tarfile.open(tmp_path / "out.tar") as tar:
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        assert json.loads(tar.extractfile("oci-layout").read()) == {"imageLayoutVersion": "1.0.0"}  # type: ignore[union-attr]
        assert "manifest.json" not in tar.getnames()
    assert [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]] == [
        r for r, _ in refs
    ]
    again = load(tmp_path / "out.tar", BlobStore(tmp_path / "other"))
    assert [image.content for image in again] == [alpine.content, busybox.content]
    assert again[1].names == (refs[1][0], refs[2][0])


def test_save_docker_then_load_gives_the_same_images(store: BlobStore, tmp_path: Path) -> None:
    alpine, busybox = loaded_into(store, tmp_path, ALPINE, BUSYBOX)
    refs = [
        ("docker.io/library/alpine:3.19", alpine.content.manifest_digest),
        ("docker.io/library/busybox:1.36", busybox.content.manifest_digest),
        ("localhost:5000/tools/busybox:stable", busybox.content.manifest_digest),
        (
            "docker.io/library/busybox@" + busybox.content.manifest_digest,
            busybox.content.manifest_digest,
        ),
    ]
    save(refs, store, tmp_path / "out.tar", format="docker")
    with tarfile.open(tmp_path / "out.tar") as tar:
        manifest_json = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        names = tar.getnames()
    assert manifest_json == [
        {
            "Config": "blobs/sha256/" + alpine.content.config.digest.partition(":")[2],
            "RepoTags": ["alpine:3.19"],
            "Layers": [
                "blobs/sha256/" + layer.blob_digest.partition(":")[2]
                for layer in alpine.content.layers
            ],
        },
        {
            "Config": "blobs/sha256/" + busybox.content.config.digest.partition(":")[2],
            "RepoTags": ["busybox:1.36", "localhost:5000/tools/busybox:stable"],
            "Layers": [
                "blobs/sha256/" + layer.blob_digest.partition(":")[2]
                for layer in busybox.content.layers
            ],
        },
    ]
    assert index["manifests"][0]["annotations"] == {
        "io.containerd.image.name": "docker.io/library/alpine:3.19",
        "org.opencontainers.image.ref.name": "3.19",
    }
    assert "oci-layout" in names
    again = load(tmp_path / "out.tar", BlobStore(tmp_path / "other"))
    assert [image.content for image in again] == [alpine.content, busybox.content]
    assert again[0].names == ("docker.io/library/alpine:3.19",)
    assert again[1].names == tuple(ref for ref, _ in refs[1:])


def test_docker_archive_without_index_round_trips_to_a_stable_digest(
    store: BlobStore, tmp_path: Path
) -> None:
    spec = ImageSpec(compression="gzip", names=("app:1",))
    first = load(build_docker_archive(tmp_path / "in.tar", [spec]).path, store)[0]
    save(
        [("docker.io/library/app:1", first.content.manifest_digest)],
        store,
        tmp_path / "out.tar",
        format="docker",
    )
    with tarfile.open(tmp_path / "out.tar") as tar:
        entries = [
            TarEntry(m.name, tar.extractfile(m).read() if m.isfile() else b"", m.type)  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.name not in ("index.json", "oci-layout")
        ]
    (tmp_path / "plain.tar").write_bytes(tar_bytes(entries))
    again = load(tmp_path / "plain.tar", BlobStore(tmp_path / "other"))[0]
    assert again.content == first.content
    assert again.names == ("app:1",)


@pytest.mark.parametrize("format", ["oci", "docker"])
def test_save_is_byte_deterministic(store: BlobStore, tmp_path: Path, format: str) -> None:
    alpine, busybox = loaded_into(store, tmp_path, ALPINE, BUSYBOX)
    refs = [
        ("docker.io/library/busybox:1.36", busybox.content.manifest_digest),
        ("docker.io/library/alpine:3.19", alpine.content.manifest_digest),
    ]
    save(refs, store, tmp_path / "a.tar", format=format)  # type: ignore[arg-type]
    save(refs, store, tmp_path / "b.tar", format=format)  # type: ignore[arg-type]
    stream = io.BytesIO()
    save(refs, store, stream, format=format)  # type: ignore[arg-type]
    data = (tmp_path / "a.tar").read_bytes()
    assert data == (tmp_path / "b.tar").read_bytes() == stream.getvalue()
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
    files = [m for m in members if m.isfile()]
    assert [m.name for m in files] == sorted(m.name for m in files)
    assert all((m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "") for m in members)
    assert all(m.mode == 0o644 for m in files)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_save_refuses_bad_requests(store: BlobStore, tmp_path: Path) -> None:
    (alpine,) = loaded_into(store, tmp_path, ALPINE)
    digest = alpine.content.manifest_digest
    dest = tmp_path / "out.tar"
    with pytest.raises(InvalidReferenceError):
        save([("Not A Reference", digest)], store, dest, format="oci")
    with pytest.raises(ArchiveError, match="given twice"):
        save(
            [("alpine:3.19", digest), ("docker.io/library/alpine:3.19", "sha256:" + "0" * 64)],
            store,
            dest,
            format="oci",
        )
    with pytest.raises(ContentMissingError, match="not in the blob store"):
        save([("alpine:3.19", "sha256:" + "0" * 64)], store, dest, format="docker")
    with pytest.raises(ArchiveError, match="unknown archive format"):
        save([("alpine:3.19", digest)], store, dest, format="zip")  # type: ignore[arg-type]
    with pytest.raises(ArchiveError, match="nothing to save"):
        save([], store, dest, format="oci")
    with pytest.raises(ArchiveError, match="cannot write archive"):
        save([("alpine:3.19", digest)], store, tmp_path / "no" / "such" / "dir.tar", format="oci")
    # A failure while writing leaves no partial file behind and no dest.
    store.delete(alpine.content.layers[0].blob_digest)
    with pytest.raises(ContentMissingError):
        save([("alpine:3.19", digest)], store, dest, format="oci")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "source"]


# ---- hostile archives ------------------------------------------------------------------------


def oci_entries(*specs: ImageSpec) -> tuple[list[TarEntry], list[BuiltImage]]:
    """The entries of a valid OCI archive of `specs` (index.json, oci-layout, blobs)."""
    images = [build_image(spec) for spec in specs]
    blobs: dict[str, bytes] = {}
    for image in images:
        blobs.update(image.blobs)
    entries = [TarEntry("blobs/sha256/" + d.partition(":")[2], blobs[d]) for d in sorted(blobs)]
    index = {"schemaVersion": 2, "manifests": [image.descriptor() for image in images]}
    entries += [
        TarEntry("index.json", json_bytes(index)),
        TarEntry("oci-layout", json_bytes({"imageLayoutVersion": "1.0.0"})),
    ]
    return entries, images


def blob_entry(digest: str) -> str:
    return "blobs/sha256/" + digest.partition(":")[2]


def replace(entries: list[TarEntry], name: str, new: TarEntry | None) -> list[TarEntry]:
    result = [new if e.name == name else e for e in entries]
    return [e for e in result if e is not None]


def _case_dotdot() -> tuple[bytes, type[Exception], str]:
    entries, _ = oci_entries(ALPINE)
    return tar_bytes([*entries, TarEntry("blobs/../../evil", b"x")]), ArchiveError, "'..' in path"


def _case_absolute() -> tuple[bytes, type[Exception], str]:
    entries, _ = oci_entries(ALPINE)
    return tar_bytes([*entries, TarEntry("/etc/evil", b"x")]), ArchiveError, "absolute path"


def _case_symlink_outside() -> tuple[bytes, type[Exception], str]:
    entries, _ = oci_entries(ALPINE)
    link = TarEntry("blobs/sha256/evil", type=tarfile.SYMTYPE, linkname="../../../etc/passwd")
    return tar_bytes([*entries, link]), ArchiveError, "points outside the archive"


def _case_symlink_absolute() -> tuple[bytes, type[Exception], str]:
    entries, _ = oci_entries(ALPINE)
    link = TarEntry("evil", type=tarfile.SYMTYPE, linkname="/etc/passwd")
    return tar_bytes([*entries, link]), ArchiveError, "points outside the archive"


def _case_hardlink_outside() -> tuple[bytes, type[Exception], str]:
    entries, _ = oci_entries(ALPINE)
    link = TarEntry("evil", type=tarfile.LNKTYPE, linkname="../outside")
    return tar_bytes([*entries, link]), ArchiveError, "points outside the archive"


def _case_link_as_blob() -> tuple[bytes, type[Exception], str]:
    entries, images = oci_entries(ALPINE)
    layer = blob_entry(images[0].layers[1].digest)
    moved = [TarEntry("elsewhere", e.data) if e.name == layer else e for e in entries]
    link = TarEntry(layer, type=tarfile.SYMTYPE, linkname="../../elsewhere")
    return tar_bytes([link, *moved]), ArchiveError, "a link cannot be a blob"


def _case_fifo() -> tuple[bytes, type[Exception], str]:
    entries, _ = oci_entries(ALPINE)
    return tar_bytes([*entries, TarEntry("pipe", type=tarfile.FIFOTYPE)]), ArchiveError, "is a fifo"


def _case_device() -> tuple[bytes, type[Exception], str]:
    entries, _ = oci_entries(ALPINE)
    dev = TarEntry("blobs/sha256/dev", type=tarfile.CHRTYPE)
    return tar_bytes([*entries, dev]), ArchiveError, "is a character device"


def _case_digest_mismatch() -> tuple[bytes, type[Exception], str]:
    entries, images = oci_entries(ALPINE)
    layer = images[0].layers[1]
    tampered = TarEntry(blob_entry(layer.digest), build_layer({"evil": b"payload"}, "gzip"))
    return (
        tar_bytes(replace(entries, blob_entry(layer.digest), tampered)),
        DigestMismatchError,
        "hashes to",
    )


def _case_missing_layer() -> tuple[bytes, type[Exception], str]:
    entries, images = oci_entries(ALPINE)
    layer = images[0].layers[1]
    return tar_bytes(replace(entries, blob_entry(layer.digest), None)), ArchiveError, "layer 1 blob"


def _case_missing_manifest() -> tuple[bytes, type[Exception], str]:
    entries, images = oci_entries(ALPINE)
    name = blob_entry(images[0].manifest_digest)
    return tar_bytes(replace(entries, name, None)), ArchiveError, "manifest blob sha256:"


def _case_duplicate_conflict() -> tuple[bytes, type[Exception], str]:
    entries, _ = oci_entries(ALPINE)
    index = next(e for e in entries if e.name == "index.json")
    other = TarEntry("index.json", json_bytes({"schemaVersion": 2, "manifests": []}))
    return tar_bytes([index, *entries, other]), ArchiveError, "duplicate entries that differ"


def _case_manifest_json_missing_path() -> tuple[bytes, type[Exception], str]:
    image = build_image(ALPINE)
    config = image.config_digest.partition(":")[2] + ".json"
    manifest_json = [{"Config": config, "RepoTags": ["a:1"], "Layers": ["nothere/layer.tar"]}]
    entries = [
        TarEntry(config, image.config),
        TarEntry("manifest.json", json.dumps(manifest_json).encode()),
    ]
    return tar_bytes(entries), ArchiveError, "nothere/layer.tar is not in the archive"


def _case_manifest_json_too_big() -> tuple[bytes, type[Exception], str]:
    entries, _ = oci_entries(ALPINE)
    big = TarEntry("manifest.json", b"[" + b" " * (4 * 1024 * 1024) + b"]")
    return tar_bytes([*entries, big]), ArchiveError, "larger than the 4194304 byte limit"


def _case_big_manifest_blob() -> tuple[bytes, type[Exception], str]:
    data = b"{" + b" " * (4 * 1024 * 1024) + b"}"
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": sha256(data), "size": len(data)}],
    }
    entries = [
        TarEntry(blob_entry(sha256(data)), data),
        TarEntry("index.json", json_bytes(index)),
        TarEntry("oci-layout", json_bytes({"imageLayoutVersion": "1.0.0"})),
    ]
    return tar_bytes(entries), ArchiveError, "larger than the 4194304 byte limit for a manifest"


def _case_schema1_manifest() -> tuple[bytes, type[Exception], str]:
    entries, _ = oci_entries(ALPINE)
    data = json_bytes({"schemaVersion": 1, "name": "x", "fsLayers": []})
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": sha256(data), "size": len(data)}],
    }
    entries = replace(entries, "index.json", TarEntry("index.json", json_bytes(index)))
    return (
        tar_bytes([*entries, TarEntry(blob_entry(sha256(data)), data)]),
        ManifestError,
        "schema 1 is not supported",
    )


def _case_bad_index() -> tuple[bytes, type[Exception], str]:
    entries, _ = oci_entries(ALPINE)
    entries = replace(entries, "index.json", TarEntry("index.json", b"[]"))
    return tar_bytes(entries), ArchiveError, "not a valid OCI layout"


def _case_garbage() -> tuple[bytes, type[Exception], str]:
    return os.urandom(1000) + b"this is not a tar", ArchiveError, "not a tar"


def _case_empty() -> tuple[bytes, type[Exception], str]:
    return b"", ArchiveError, "not a tar"


def _case_truncated() -> tuple[bytes, type[Exception], str]:
    entries, images = oci_entries(ImageSpec(layers=({"big": os.urandom(100_000)},)))
    data = tar_bytes(entries)
    cut = data.index(images[0].layers[0].data[:64]) + 5000
    return data[:cut], ArchiveError, "truncated"


def _case_gzip_garbage() -> tuple[bytes, type[Exception], str]:
    return b"\x1f\x8b\x08\x00" + os.urandom(500), ArchiveError, "not a tar"


def _case_no_format() -> tuple[bytes, type[Exception], str]:
    return tar_bytes([TarEntry("hello.txt", b"hi")]), ArchiveError, "neither an OCI layout"


def _case_link_loop() -> tuple[bytes, type[Exception], str]:
    image = build_image(ALPINE)
    config = image.config_digest.partition(":")[2] + ".json"
    manifest_json = [{"Config": config, "RepoTags": [], "Layers": ["a/layer.tar"]}]
    entries = [
        TarEntry(config, image.config),
        TarEntry("a/layer.tar", type=tarfile.SYMTYPE, linkname="../b/layer.tar"),
        TarEntry("b/layer.tar", type=tarfile.SYMTYPE, linkname="../a/layer.tar"),
        TarEntry("manifest.json", json.dumps(manifest_json).encode()),
    ]
    return tar_bytes(entries), ArchiveError, "too many levels of links"


def _case_huge_pax_header() -> tuple[bytes, type[Exception], str]:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("index.json")
        info.pax_headers = {"comment": "x" * (2 * 1024 * 1024)}
        tar.addfile(info, io.BytesIO(b""))
    return buffer.getvalue(), ArchiveError, "extended header"


def _case_diff_ids_mismatch() -> tuple[bytes, type[Exception], str]:
    image = build_image(ALPINE)
    config = image.config_digest.partition(":")[2] + ".json"
    layer = image.layers[0]
    manifest_json = [{"Config": config, "RepoTags": [], "Layers": ["l0.tar"]}]
    entries = [
        TarEntry(config, image.config),
        TarEntry("l0.tar", layer.data),
        TarEntry("manifest.json", json.dumps(manifest_json).encode()),
    ]
    return tar_bytes(entries), ManifestError, "1 layers but config"


def _case_tampered_docker_layer() -> tuple[bytes, type[Exception], str]:
    image = build_image(ImageSpec(compression="none"))
    config = image.config_digest.partition(":")[2] + ".json"
    manifest_json = [{"Config": config, "RepoTags": [], "Layers": ["l0/layer.tar"]}]
    entries = [
        TarEntry(config, image.config),
        TarEntry("l0/layer.tar", build_layer({"evil": b"payload"})),
        TarEntry("manifest.json", json.dumps(manifest_json).encode()),
    ]
    return tar_bytes(entries), ManifestError, "differs from its diff_id"


HOSTILE = {
    "tampered-docker-layer": _case_tampered_docker_layer,
    "dotdot": _case_dotdot,
    "absolute": _case_absolute,
    "symlink-outside": _case_symlink_outside,
    "symlink-absolute": _case_symlink_absolute,
    "hardlink-outside": _case_hardlink_outside,
    "link-as-blob": _case_link_as_blob,
    "fifo": _case_fifo,
    "device": _case_device,
    "digest-mismatch": _case_digest_mismatch,
    "missing-layer": _case_missing_layer,
    "missing-manifest": _case_missing_manifest,
    "duplicate-conflict": _case_duplicate_conflict,
    "manifest-json-missing-path": _case_manifest_json_missing_path,
    "manifest-json-too-big": _case_manifest_json_too_big,
    "big-manifest-blob": _case_big_manifest_blob,
    "schema1-manifest": _case_schema1_manifest,
    "bad-index": _case_bad_index,
    "garbage": _case_garbage,
    "empty": _case_empty,
    "truncated": _case_truncated,
    "gzip-garbage": _case_gzip_garbage,
    "no-format": _case_no_format,
    "link-loop": _case_link_loop,
    "huge-pax-header": _case_huge_pax_header,
    "diff-ids-mismatch": _case_diff_ids_mismatch,
}


@pytest.fixture
def preloaded(store: BlobStore, tmp_path: Path) -> list[LoadedImage]:
    """A store that already holds BUSYBOX and one ALPINE layer (they must survive)."""
    images = loaded_into(store, tmp_path, BUSYBOX)
    layer = build_image(ALPINE).layers[0]
    store.write_bytes(layer.data, layer.digest)
    return images


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("via", ["file", "stream"])
def test_hostile_archive_is_refused_leaving_nothing(
    store: BlobStore, tmp_path: Path, preloaded: list[LoadedImage], case: str, via: str
) -> None:
    data, error, fragment = HOSTILE[case]()
    before = state(store)
    path = tmp_path / "hostile.tar"
    path.write_bytes(data)
    source: Path | BinaryIO = path if via == "file" else io.BytesIO(data)
    with pytest.raises(error) as raised:
        load(source, store)
    assert fragment in str(raised.value), str(raised.value)
    assert state(store) == before  # pre-existing blobs intact, nothing added, no temp file
    assert all(store.verify(d) for d in before[0])
    assert all(store.has(d) for image in preloaded for d, _ in image.content.blobs)


def test_identical_duplicate_entries_are_accepted(store: BlobStore) -> None:
    entries, images = oci_entries(ALPINE)
    loaded = load(io.BytesIO(tar_bytes([*entries, *entries])), store)
    assert loaded[0].content.manifest_digest == images[0].manifest_digest


def test_entry_over_the_size_limit_is_refused(store: BlobStore, tmp_path: Path) -> None:
    entries, images = oci_entries(
        ImageSpec(layers=({"big": os.urandom(5000)},), compression="none")
    )
    before = state(store)
    with pytest.raises(ArchiveError, match="larger than the 4096 byte limit") as raised:
        load(io.BytesIO(tar_bytes(entries)), store, max_entry_size=4096)
    assert blob_entry(images[0].layers[0].digest) in str(raised.value)
    assert state(store) == before


def test_failed_load_deletes_the_blobs_it_wrote(store: BlobStore, tmp_path: Path) -> None:
    # Every blob of the archive lands (verified) before the missing one is noticed.
    entries, images = oci_entries(ALPINE, BUSYBOX)
    absent = images[1].layers[0].digest
    written = [e for e in entries if e.name != blob_entry(absent)]
    with pytest.raises(ArchiveError, match="is not in the archive"):
        load(io.BytesIO(tar_bytes(written)), store)
    assert state(store) == ([], [])


def test_in_archive_links_are_followed_for_manifest_json(store: BlobStore) -> None:
    image = build_image(ImageSpec(compression="none", layers=({"a": b"1"}, {"a": b"1"})))
    config = image.config_digest.partition(":")[2] + ".json"
    manifest_json = [
        {"Config": config, "RepoTags": ["x:1"], "Layers": ["one/layer.tar", "two/layer.tar"]}
    ]
    entries = [
        TarEntry(config, image.config),
        TarEntry("one/layer.tar", image.layers[0].data),
        TarEntry("two/layer.tar", type=tarfile.SYMTYPE, linkname="../one/layer.tar"),
        TarEntry("manifest.json", json.dumps(manifest_json).encode()),
    ]
    loaded = load(io.BytesIO(tar_bytes(entries)), store)
    assert [layer.blob_digest for layer in loaded[0].content.layers] == [image.layers[0].digest] * 2
    hard = replace(
        entries,
        "two/layer.tar",
        TarEntry("two/layer.tar", type=tarfile.LNKTYPE, linkname="one/layer.tar"),
    )
    assert load(io.BytesIO(tar_bytes(hard)), store) == loaded


def test_hostile_layout_directories(store: BlobStore, tmp_path: Path) -> None:
    layout = build_oci_layout(tmp_path / "layout", [ALPINE])
    layer = layout.images[0].layers[0]
    path = layout.path / blob_entry(layer.digest)
    outside = tmp_path / "outside"
    outside.write_bytes(layer.data)
    path.unlink()
    path.symlink_to(outside)
    with pytest.raises(ArchiveError, match="is a symlink"):
        load(layout.path, store)
    assert state(store) == ([], [])
    path.unlink()
    path.write_bytes(b"tampered")
    with pytest.raises(DigestMismatchError):
        load(layout.path, store)
    assert state(store) == ([], [])
    path.unlink()
    with pytest.raises(ArchiveError, match="not in the archive"):
        load(layout.path, store)
    (layout.path / "oci-layout").unlink()
    with pytest.raises(ArchiveError, match="no oci-layout"):
        load(layout.path, store)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ArchiveError, match="neither an OCI layout"):
        load(empty, store)
    with pytest.raises(ArchiveError, match="cannot read archive"):
        load(tmp_path / "missing.tar", store)
    extracted = tmp_path / "extracted"
    extracted.mkdir()
    (extracted / "manifest.json").write_text("[]")
    with pytest.raises(ArchiveError, match="extracted docker-archive directory is not supported"):
        load(extracted, store)
    assert state(store) == ([], [])


def test_unreferenced_blobs_in_an_archive_are_not_kept(store: BlobStore, tmp_path: Path) -> None:
    layout = build_oci_layout(tmp_path / "layout", [ALPINE])
    stray = write_blob(layout.path, b"not part of any image")
    loaded = load(io.BytesIO(tar_directory(layout.path)), store)
    assert not store.has(stray)
    check_stored(store, *loaded)


# ---- skopeo interop --------------------------------------------------------------------------


def skopeo(*args: str) -> bytes:
    assert SKOPEO is not None
    result = subprocess.run(
        [SKOPEO, "--insecure-policy", *args], capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


@pytest.fixture
def saved(store: BlobStore, tmp_path: Path) -> Iterator[tuple[LoadedImage, LoadedImage]]:
    alpine, busybox = loaded_into(store, tmp_path, ALPINE, BUSYBOX)
    yield alpine, busybox


@needs_skopeo
def test_skopeo_reads_our_oci_archive(
    store: BlobStore, tmp_path: Path, saved: tuple[LoadedImage, LoadedImage]
) -> None:
    alpine, busybox = saved
    refs = [
        ("docker.io/library/alpine:3.19", alpine.content.manifest_digest),
        ("localhost:5000/tools/busybox:stable", busybox.content.manifest_digest),
    ]
    archive = tmp_path / "out.tar"
    save(refs, store, archive, format="oci")
    for (reference, _), image in zip(refs, saved, strict=True):
        raw = skopeo("inspect", "--raw", f"oci-archive:{archive}:{reference}")
        assert sha256(raw) == image.content.manifest_digest
        manifest = json.loads(raw)
        assert manifest["config"]["digest"] == image.content.config.digest
        assert len(manifest["layers"]) == len(image.content.layers)
        config = skopeo("inspect", "--config", "--raw", f"oci-archive:{archive}:{reference}")
        assert sha256(config) == image.content.config.digest


@needs_skopeo
def test_skopeo_reads_our_docker_archive(
    store: BlobStore, tmp_path: Path, saved: tuple[LoadedImage, LoadedImage]
) -> None:
    alpine, busybox = saved
    refs = [
        ("docker.io/library/alpine:3.19", alpine.content.manifest_digest),
        ("docker.io/library/busybox:1.36", busybox.content.manifest_digest),
    ]
    archive = tmp_path / "out.tar"
    save(refs, store, archive, format="docker")
    for (reference, _), image in zip(refs, saved, strict=True):
        short = reference.removeprefix("docker.io/library/")
        for ref in (f"docker-archive:{archive}:{short}", f"docker-archive:{archive}:{reference}"):
            manifest = json.loads(skopeo("inspect", "--raw", ref))
            assert manifest["config"]["digest"] == image.content.config.digest
            assert len(manifest["layers"]) == len(image.content.layers)
            info = json.loads(skopeo("inspect", ref))
            assert info["Layers"] == [layer.diff_id for layer in image.content.layers]
            assert info["Architecture"] == image.content.platform.architecture
    # A single-image archive needs no reference; skopeo can copy all of it out (it reads
    # every layer, gzip'd as stored) and we read the copy back.
    single = tmp_path / "single.tar"
    save(refs[:1], store, single, format="docker")
    manifest = json.loads(skopeo("inspect", "--raw", f"docker-archive:{single}"))
    assert manifest["config"]["digest"] == alpine.content.config.digest
    assert len(manifest["layers"]) == len(alpine.content.layers)
    skopeo("copy", "-q", f"docker-archive:{single}", f"oci:{tmp_path / 'copied'}:x")
    (copied,) = load(tmp_path / "copied", BlobStore(tmp_path / "other"))
    # skopeo re-serializes the config when it converts to OCI: same fields, another digest.
    assert replace_fields(copied.content.config, digest="") == replace_fields(
        alpine.content.config, digest=""
    )
    assert [layer.diff_id for layer in copied.content.layers] == [
        layer.diff_id for layer in alpine.content.layers
    ]


@needs_skopeo
@pytest.mark.parametrize("transport", ["docker-archive", "oci-archive"])
def test_we_read_what_skopeo_writes(store: BlobStore, tmp_path: Path, transport: str) -> None:
    layout = build_oci_layout(tmp_path / "layout", [ALPINE, BUSYBOX])
    alpine, busybox = layout.images
    archive = tmp_path / f"{transport}.tar"
    skopeo(
        "copy",
        "-q",
        f"oci:{layout.path}:alpine:3.19",
        f"{transport}:{archive}:docker.io/library/alpine:3.19",
    )
    loaded = load(archive, store)
    assert len(loaded) == 1
    image = loaded[0]
    assert image.content.config.digest == alpine.config_digest
    assert [layer.diff_id for layer in image.content.layers] == [
        layer.diff_id for layer in alpine.layers
    ]
    assert image.content.platform == Platform("linux", "amd64")
    if transport == "oci-archive":
        # skopeo copies an OCI image unchanged: the very same manifest.
        assert image.content.manifest_digest == alpine.manifest_digest
    else:
        # docker-archive stores layers uncompressed; the name is skopeo's RepoTags spelling.
        assert all(layer.media_type == LAYER_MEDIA_TYPES["none"] for layer in image.content.layers)
        assert all(layer.blob_digest == layer.diff_id for layer in image.content.layers)
        assert image.names == ("docker.io/library/alpine:3.19",)
    # And as a stream (stdin), read once.
    with archive.open("rb") as f:
        assert load(f, BlobStore(tmp_path / "other")) == loaded
    assert busybox.manifest_digest not in {d for d, _ in image.content.blobs}


@needs_skopeo
def test_we_read_a_multi_arch_oci_archive_from_skopeo(store: BlobStore, tmp_path: Path) -> None:
    amd64 = ImageSpec(layers=({"arch": b"amd64"},))
    arm = ImageSpec(layers=({"arch": b"arm"},), architecture="arm", variant="v7")
    layout = build_oci_layout(
        tmp_path / "layout", [amd64, arm], multi_arch=True, attestations=True, names=("v1",)
    )
    archive = tmp_path / "multi.tar"
    skopeo(
        "copy",
        "-q",
        "--all",
        f"oci:{layout.path}:v1",
        f"oci-archive:{archive}:example.com/multi:v1",
    )
    loaded = load(archive, store)
    assert [image.content.manifest_digest for image in loaded] == [
        i.manifest_digest for i in layout.images
    ]
    assert [image.content.platform for image in loaded] == [
        Platform("linux", "amd64"),
        Platform("linux", "arm", "v7"),
    ]
    assert all(image.names == ("example.com/multi:v1",) for image in loaded)
    check_stored(store, *loaded)
