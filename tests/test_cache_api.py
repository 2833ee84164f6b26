"""The public Python API end to end, with real images built by `tools/imagebuild.py`.

Each test loads real archives (docker-archive, OCI layout directory, OCI archive, a stream),
then checks what the API answers against what was built and what is on disk: canonical
references, the image's own config and platform, sizes, timestamps under an injected clock,
aliases and leases, what remove and prune delete (file by file), save/load round trips that
skopeo reads, rebuild, read-your-writes across instances and processes, the asyncio facade,
and hostile archives. `test_cache_model.py` covers the core semantics with synthetic content;
this file is about the public surface.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import itertools
import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from imageledger import (
    AsyncImageHandle,
    CachedImage,
    ContentCorruptError,
    DiskFullError,
    Image,
    ImageCache,
    ImageDetail,
    ImageHandle,
    ImageInUseError,
    ImageLedgerError,
    ImageNotFoundError,
    ImagePruneReport,
    InvalidReferenceError,
    LedgerFullError,
    RegistryOptions,
)
from imageledger.cache import internals
from imageledger.projections.views import FORMAT as VIEWS_FORMAT
from imageledger.projections.views import ViewState
from imageledger.storage.viewstore import packer
from imageledger.tools.imagebuild import (
    BuiltImage,
    ImageSpec,
    TarEntry,
    build_docker_archive,
    build_image,
    build_oci_archive,
    build_oci_layout,
    tar_bytes,
)

BASE = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SHARED_BASE = {"etc/os-release": b"ID=imageledger-test\n" * 20, "bin/sh": b"\x7fELF" * 300}
SKOPEO = shutil.which("skopeo")
needs_skopeo = pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed")


# ---------------------------------------------------------------------------- helpers


class Clock:
    """An injected clock: every event is stamped with `now`, which the test sets."""

    def __init__(self) -> None:
        self.now = BASE

    def __call__(self) -> datetime:
        return self.now

    def at(self, seconds: float) -> datetime:
        self.now = BASE + timedelta(seconds=seconds)
        return self.now


class NonSeekable(io.RawIOBase):
    """A file read like stdin: forward only, `seek`/`tell` fail."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._file = path.open("rb")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, buffer: Any) -> int:
        data = self._file.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._file.close()
        super().close()


_counter = itertools.count()


def spec(*names: str, top: bytes | None = None, **kwargs: Any) -> ImageSpec:
    """A small real image: the shared base layer plus a top layer unique to `top`."""
    unique = top if top is not None else f"{names}-{next(_counter)}".encode()
    kwargs.setdefault("layers", (SHARED_BASE, {"app/data": unique * 40}))
    return ImageSpec(names=names, **kwargs)


def docker_archive(directory: Path, *images: ImageSpec | BuiltImage) -> Path:
    path = directory / f"image-{next(_counter)}.tar"
    return build_docker_archive(path, list(images)).path


def sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def blob_path(home: Path, digest: str) -> Path:
    return home / "blobs" / "sha256" / digest.removeprefix("sha256:")


def digests_on_disk(home: Path) -> set[str]:
    root = home / "blobs" / "sha256"
    return {f"sha256:{p.name}" for p in root.iterdir()} if root.is_dir() else set()


def store_bytes(home: Path) -> int:
    """Bytes of every file the store owns (blobs, partials, artifacts); the ledger and the
    index.json projection are metadata that grow with every event and are left out."""
    total = 0
    for top in ("blobs", "tmp", "artifacts"):
        for path in (home / top).rglob("*"):
            if path.is_file() or path.is_symlink():
                total += path.lstat().st_size
    return total


def image_blobs(built: BuiltImage) -> set[str]:
    return {built.manifest_digest, built.config_digest, *(layer.digest for layer in built.layers)}


def report_summary(report: ImagePruneReport) -> tuple[int, ...]:
    return (
        report.image_refs_removed,
        report.manifests_removed,
        report.layers_removed,
        report.fsmeta_removed,
        report.vmdk_removed,
        report.bytes_reclaimed,
    )


def events(cache: ImageCache, reference: str | None = None) -> list[str]:
    return [entry.event for entry in cache.history(reference)]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def cache(home: Path, clock: Clock) -> Iterator[ImageCache]:
    with ImageCache(home, clock=clock, durability="nosync") as c:
        yield c


# ---------------------------------------------------------------------------- loading

FULL = ImageSpec(
    layers=(
        {"etc/os-release": b"ID=full\n", "etc/hostname": b"full\n"},
        {"usr/local/bin/app": b"#!/bin/sh\necho app\n" * 30},
        {"srv/www/index.html": b"<h1>hi</h1>\n" * 10},
    ),
    architecture="s390x",  # never this x86_64 host's: semantics 4
    os="linux",
    env=("PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=a=b c"),
    cmd=("serve", "--port", "8080"),
    entrypoint=("/usr/local/bin/app",),
    working_dir="/srv",
    user="1000:1000",
    labels={"org.opencontainers.image.title": "full", "b.label": "two"},
    stop_signal="SIGQUIT",
    names=("ghcr.io/acme/app:1.2",),
)

SOURCES = ("docker-archive", "docker25", "oci-layout", "oci-archive", "oci-archive-gz", "stream")


def _load_from(kind: str, cache: ImageCache, directory: Path) -> list[ImageHandle]:
    built = build_image(FULL)
    if kind == "docker-archive":
        return cache.load(build_docker_archive(directory / "d.tar", [built]).path)
    if kind == "docker25":
        path = build_docker_archive(directory / "d25.tar", [built], style="docker25").path
        return cache.load(path)
    if kind == "oci-layout":
        return cache.load(build_oci_layout(directory / "layout", [built]).path)
    if kind == "oci-archive":
        return cache.load(str(build_oci_archive(directory / "o.tar", [built]).path))
    if kind == "oci-archive-gz":
        path = build_oci_archive(directory / "o.tar.gz", [built], compression="gzip").path
        return cache.load(path)
    assert kind == "stream"
    path = build_docker_archive(directory / "s.tar", [built]).path
    stream = NonSeekable(path)
    with pytest.raises(OSError):
        stream.seek(0)
    try:
        return cache.load(stream)  # type: ignore[arg-type]
    finally:
        stream.close()


@pytest.mark.parametrize("kind", SOURCES)
def test_load_reports_the_images_own_config_layers_platform_and_size(
    kind: str, cache: ImageCache, home: Path, tmp_path: Path, clock: Clock
) -> None:
    built = build_image(FULL)
    handles = _load_from(kind, cache, tmp_path)

    assert [h.reference for h in handles] == ["ghcr.io/acme/app:1.2"]
    [handle] = handles
    assert cache.get("ghcr.io/acme/app:1.2") == handle
    # The stored manifest is the one the handle names, and describes exactly what was built
    # (a legacy docker-archive holds no manifest: one is synthesized, over the same blobs).
    manifest_path = blob_path(home, handle.manifest_digest)
    assert sha256_file(manifest_path) == handle.manifest_digest
    manifest = json.loads(manifest_path.read_bytes())
    assert manifest["config"]["digest"] == built.config_digest
    assert [d["digest"] for d in manifest["layers"]] == [layer.digest for layer in built.layers]
    if kind not in ("docker-archive", "stream"):
        assert handle.manifest_digest == built.manifest_digest

    assert (handle.os, handle.architecture) == ("linux", "s390x")
    assert handle.layer_count == 3
    # Semantics 5: manifest + config + distinct layers, as the store holds them.
    expected_size = (
        manifest_path.stat().st_size + len(built.config) + sum(lyr.size for lyr in built.layers)
    )
    assert handle.size_bytes == expected_size
    assert handle.size_bytes == store_bytes(home)
    assert handle.created_at == handle.last_used_at == clock.now

    detail = cache.inspect("ghcr.io/acme/app:1.2")
    assert detail.handle == handle
    config = detail.config
    assert config.digest == built.config_digest
    assert config.env == FULL.env
    assert config.cmd == FULL.cmd
    assert config.entrypoint == FULL.entrypoint
    assert config.working_dir == "/srv"
    assert config.user == "1000:1000"
    assert config.labels == tuple(sorted(FULL.labels.items()))
    assert config.stop_signal == "SIGQUIT"
    assert [
        (lyr.position, lyr.diff_id, lyr.blob_digest, lyr.media_type, lyr.compressed_size_bytes)
        for lyr in detail.layers
    ] == [
        (i, lyr.diff_id, lyr.digest, lyr.media_type, lyr.size) for i, lyr in enumerate(built.layers)
    ]
    assert [e for e in events(cache, handle.reference)] == ["ImagePulled"]


def test_minimal_config_and_arm64_variant(cache: ImageCache, tmp_path: Path) -> None:
    """An image with no entrypoint, cmd, labels or stop signal reports None / empty."""
    bare = ImageSpec(
        layers=({"x": b"x"},),
        architecture="arm64",
        variant="v8",
        env=(),
        cmd=None,
        entrypoint=None,
        names=("bare:1",),
    )
    [handle] = cache.load(build_oci_layout(tmp_path / "bare", [bare]).path)
    assert (handle.reference, handle.os, handle.architecture) == (
        "docker.io/library/bare:1",
        "linux",
        "arm64",
    )
    config = handle.inspect().config
    assert (config.env, config.cmd, config.entrypoint, config.labels) == ((), None, None, ())
    assert config.stop_signal is None
    assert config.working_dir in ("", None)
    assert config.user in ("", None)


def test_size_counts_a_layer_repeated_in_one_image_once(
    cache: ImageCache, home: Path, tmp_path: Path
) -> None:
    same = {"etc/marker": b"same layer twice\n" * 50}
    built = build_image(ImageSpec(layers=(same, {"top": b"top"}, same), names=("rep:1",)))
    assert built.layers[0].digest == built.layers[2].digest
    [handle] = cache.load(build_oci_layout(tmp_path / "rep", [built]).path)
    assert handle.layer_count == 3
    distinct = {layer.digest: layer.size for layer in built.layers}
    assert handle.size_bytes == len(built.manifest) + len(built.config) + sum(distinct.values())
    assert handle.size_bytes == store_bytes(home)
    assert [layer.position for layer in handle.inspect().layers] == [0, 1, 2]


def test_load_tag_names_the_image_and_a_docker_archive_with_many_images(
    cache: ImageCache, tmp_path: Path
) -> None:
    one, two = build_image(spec("one:1", "one:latest")), build_image(spec("two:1"))
    handles = cache.load(docker_archive(tmp_path, one, two))
    assert sorted((h.reference, h.manifest_digest) for h in handles) == sorted(
        [
            ("docker.io/library/one:1", handles[0].manifest_digest),
            ("docker.io/library/one:latest", handles[0].manifest_digest),
            ("docker.io/library/two:1", cache.get("two:1").manifest_digest),
        ]
    )
    unnamed = build_oci_layout(tmp_path / "unnamed", [spec()])
    [tagged] = cache.load(unnamed.path, tag="registry.example:5000/team/img:v1")
    assert tagged.reference == "registry.example:5000/team/img:v1"
    assert tagged.manifest_digest == unnamed.images[0].manifest_digest


@pytest.mark.parametrize(
    ("compression", "docker_types", "style"),
    [
        ("none", False, "oci"),
        ("zstd", False, "oci"),
        ("none", False, "legacy"),
        ("zstd", False, "legacy"),
        ("gzip", True, "oci"),
        ("gzip", True, "docker25"),
    ],
)
def test_layer_media_types_are_reported_as_built(
    compression: Any, docker_types: bool, style: str, cache: ImageCache, tmp_path: Path
) -> None:
    built = build_image(
        ImageSpec(
            layers=({"a": b"a" * 500}, {"b": b"b" * 700}),
            compression=compression,
            docker_media_types=docker_types,
            names=("media:1",),
        )
    )
    if style == "oci":
        [handle] = cache.load(build_oci_layout(tmp_path / "layout", [built]).path)
    else:
        path = build_docker_archive(tmp_path / "d.tar", [built], style=style).path  # type: ignore[arg-type]
        [handle] = cache.load(path)
    if style != "legacy":
        assert handle.manifest_digest == built.manifest_digest
    assert [
        (lyr.blob_digest, lyr.diff_id, lyr.media_type, lyr.compressed_size_bytes)
        for lyr in handle.inspect().layers
    ] == [(lyr.digest, lyr.diff_id, lyr.media_type, lyr.size) for lyr in built.layers]


def test_a_multi_arch_archive_gives_each_reference_one_manifest(
    cache: ImageCache, tmp_path: Path
) -> None:
    arm = build_image(ImageSpec(architecture="arm64", variant="v8", layers=({"a": b"arm"},)))
    s390 = build_image(ImageSpec(architecture="s390x", layers=({"a": b"s390x"},)))
    layout = build_oci_layout(
        tmp_path / "multi", [arm, s390], multi_arch=True, attestations=True, names=("multi:1",)
    )
    handles = cache.load(layout.path)
    references = [h.reference for h in handles]
    assert references == sorted(set(references)) == ["docker.io/library/multi:1"]
    [handle] = handles
    assert cache.get("multi:1") == handle
    assert handle.manifest_digest in (arm.manifest_digest, s390.manifest_digest)
    assert cache.prune(dry_run=True, keep=["multi:1"]).manifests_removed == 0


def test_a_digest_reference_names_its_own_manifest(
    cache: ImageCache, home: Path, tmp_path: Path
) -> None:
    built = build_image(spec())
    layout = build_oci_layout(tmp_path / "pinned", [built]).path
    pinned = f"pinned@{built.manifest_digest}"
    [handle] = cache.load(layout, tag=pinned)
    assert handle.reference == f"docker.io/library/pinned@{built.manifest_digest}"
    assert cache.get(f"index.docker.io/library/{pinned}") == handle
    assert cache.inspect(pinned).handle.manifest_digest == built.manifest_digest


def test_a_pull_by_a_cached_digest_needs_no_registry(
    cache: ImageCache, clock: Clock, home: Path, tmp_path: Path
) -> None:
    [loaded] = cache.load(docker_archive(tmp_path, spec("x:1")))
    files = digests_on_disk(home)
    # Nothing listens on port 9: any contact with the "registry" would fail the pull.
    clock.at(60)
    pinned = cache.pull(f"127.0.0.1:9/mirror/x@{loaded.manifest_digest}")
    assert pinned.reference == f"127.0.0.1:9/mirror/x@{loaded.manifest_digest}"
    assert pinned.manifest_digest == loaded.manifest_digest
    assert (pinned.architecture, pinned.size_bytes) == (loaded.architecture, loaded.size_bytes)
    assert pinned.created_at == pinned.last_used_at == clock.now
    assert digests_on_disk(home) == files
    [entry] = cache.history(pinned.reference)
    assert (entry.event, entry.detail) == (
        "ImagePulled",
        "from registry:127.0.0.1:9/mirror/x (all cached)",
    )
    # A digest the cache does not hold still goes to the registry (and fails here, recorded).
    missing = "sha256:" + "0" * 64
    with pytest.raises(ImageLedgerError):
        cache.pull(f"127.0.0.1:9/mirror/x@{missing}", options=RegistryOptions(retries=0))
    assert events(cache, f"127.0.0.1:9/mirror/x@{missing}") == ["PullFailed"]


def test_a_digest_reference_cannot_name_other_content(
    cache: ImageCache, home: Path, tmp_path: Path
) -> None:
    layout = build_oci_layout(tmp_path / "pinned", [build_image(spec())]).path
    wrong = "pinned@sha256:" + "0" * 64
    with pytest.raises(ImageLedgerError):
        cache.load(layout, tag=wrong)
    assert cache.list() == []
    with pytest.raises(ImageNotFoundError):
        cache.get(wrong)


def test_the_home_is_an_oci_layout_another_cache_can_load(
    cache: ImageCache, clock: Clock, home: Path, tmp_path: Path
) -> None:
    cache.load(docker_archive(tmp_path, spec("one:1", "one:2"), spec("ghcr.io/o/two:1")))
    with ImageCache(tmp_path / "copy", clock=clock, durability="nosync") as copy:
        loaded = copy.load(home)
        assert sorted((h.reference, h.manifest_digest) for h in loaded) == sorted(
            (h.reference, h.manifest_digest) for h in cache.list()
        )


# ---------------------------------------------------------------------------- semantics 1

SPELLINGS = (
    "alpine",
    "alpine:latest",
    "library/alpine",
    "library/alpine:latest",
    "docker.io/alpine",
    "docker.io/library/alpine",
    "docker.io/library/alpine:latest",
    "index.docker.io/library/alpine:latest",
    "index.docker.io/alpine",
)
MALFORMED = (
    "",
    "Alpine",
    "alpine:",
    ":latest",
    "a b",
    "-alpine",
    "docker.io//alpine",
    "alpine@sha256:abc",
    "alpine:" + "t" * 200,
    " alpine",
)


def test_every_spelling_of_a_reference_works_everywhere(
    cache: ImageCache, home: Path, tmp_path: Path
) -> None:
    cache.load(docker_archive(tmp_path, spec("alpine:latest")))
    canonical = "docker.io/library/alpine:latest"
    for spelling in SPELLINGS:
        assert cache.get(spelling).reference == canonical, spelling
        assert cache.inspect(spelling).handle.reference == canonical, spelling
        assert cache.use(spelling, f"sandbox-{spelling}").reference == canonical, spelling
        assert [e.reference for e in cache.history(spelling)] == [canonical] * len(
            cache.history(canonical)
        )
    with pytest.raises(ImageInUseError):
        cache.remove("index.docker.io/alpine")
    for spelling in SPELLINGS:
        assert cache.release(f"sandbox-{spelling}") == 1
    cache.remove("index.docker.io/alpine")
    assert cache.list() == []
    assert digests_on_disk(home) == set()


@pytest.mark.parametrize("bad", MALFORMED)
def test_a_malformed_reference_raises_and_changes_nothing(
    bad: str, cache: ImageCache, home: Path, tmp_path: Path
) -> None:
    archive = docker_archive(tmp_path, spec("alpine:3"))
    cache.load(archive)
    cache.use("alpine:3", "holder")
    before = (cache.history(), cache.list(), digests_on_disk(home))
    calls: list[Callable[[], object]] = [
        lambda: cache.get(bad),
        lambda: cache.inspect(bad),
        lambda: cache.remove(bad),
        lambda: cache.remove(bad, force=True),
        lambda: cache.use(bad, "holder"),
        lambda: cache.history(bad),
        lambda: cache.load(archive, tag=bad),
        lambda: cache.save([bad], tmp_path / "out.tar"),
    ]
    for call in calls:
        with pytest.raises(InvalidReferenceError):
            call()
    assert (cache.history(), cache.list(), digests_on_disk(home)) == before
    assert not (tmp_path / "out.tar").exists()


# ---------------------------------------------------------------------------- semantics 2, 3


def test_created_at_survives_a_retag_and_last_used_at_moves_on_reload_and_use(
    cache: ImageCache, clock: Clock, tmp_path: Path
) -> None:
    first = docker_archive(tmp_path, spec("app:1", top=b"v1"))
    second = docker_archive(tmp_path, spec("app:1", top=b"v2"))
    t0 = clock.at(0)
    [h0] = cache.load(first)
    assert (h0.created_at, h0.last_used_at) == (t0, t0)

    t1 = clock.at(60)
    [h1] = cache.load(second)  # the tag moves to another manifest
    assert h1.manifest_digest != h0.manifest_digest
    assert (h1.created_at, h1.last_used_at) == (t0, t1)

    t2 = clock.at(120)
    [h2] = cache.load(second)  # everything cached: still a pull
    assert (h2.manifest_digest, h2.created_at, h2.last_used_at) == (h1.manifest_digest, t0, t2)

    t3 = clock.at(180)
    assert cache.use("app:1", "sb").last_used_at == t3
    assert cache.get("app:1").created_at == t0
    clock.at(240)
    cache.release("sb")  # releasing is not a use
    assert cache.get("app:1").last_used_at == t3
    clock.at(300)
    cache.inspect("app:1")  # nor is reading
    assert cache.get("app:1").last_used_at == t3

    clock.at(360)
    cache.remove("app:1")
    t4 = clock.at(420)
    [h4] = cache.load(first)  # first pull since it was removed
    assert (h4.created_at, h4.last_used_at) == (t4, t4)
    assert events(cache, "app:1") == [
        "ImagePulled",
        "ImagePulled",
        "ImagePulled",
        "ImageUsed",
        "HolderReleased",
        "ImageRemoved",
        "ImagePulled",
    ]


def test_list_is_newest_first_with_ties_broken_by_ledger_position(
    cache: ImageCache, clock: Clock, tmp_path: Path
) -> None:
    clock.at(0)
    cache.load(docker_archive(tmp_path, spec("a:1")))
    clock.at(10)
    cache.load(docker_archive(tmp_path, spec("b:1")))
    cache.load(docker_archive(tmp_path, spec("c:1")))  # same second as b
    cache.load(docker_archive(tmp_path, spec("d:1")))  # and d
    clock.at(5)  # a clock that went back: created_at orders, not the position
    cache.load(docker_archive(tmp_path, spec("e:1")))
    clock.at(20)
    cache.load(docker_archive(tmp_path, spec("a:1")))  # a re-pull keeps created_at
    cache.use("b:1", "sb")  # and so does a use
    names = [h.reference.removeprefix("docker.io/library/") for h in cache.list()]
    assert names == ["d:1", "c:1", "b:1", "e:1", "a:1"]


# ---------------------------------------------------------------------------- semantics 6, 7


def test_removing_one_alias_only_untags(cache: ImageCache, home: Path, tmp_path: Path) -> None:
    built = build_image(spec("web:1", "web:stable", "ghcr.io/acme/web:1"))
    cache.load(docker_archive(tmp_path, built))
    before = {p.name: p.stat().st_ino for p in (home / "blobs" / "sha256").iterdir()}
    cache.use("web:stable", "sandbox-1")
    cache.remove("web:1")  # another alias remains
    cache.remove("web:stable")  # the leased alias, but ghcr.io/acme/web:1 still names it
    after = {p.name: p.stat().st_ino for p in (home / "blobs" / "sha256").iterdir()}
    assert after == before
    assert [h.reference for h in cache.list()] == ["ghcr.io/acme/web:1"]
    assert events(cache, "web:1")[-1] == "ImageRemoved"
    with pytest.raises(ImageNotFoundError):
        cache.get("web:1")


def test_remove_of_a_leased_image_is_refused_recorded_and_forced(
    cache: ImageCache, home: Path, tmp_path: Path
) -> None:
    built = build_image(spec("db:1"))
    [handle] = cache.load(docker_archive(tmp_path, built))
    cache.use("db:1", "sandbox-b")
    cache.use("db:1", "snapshot-a")
    on_disk = digests_on_disk(home)
    position = len(cache.history())

    with pytest.raises(ImageInUseError) as refused:
        cache.remove("docker.io/library/db:1")
    assert set(refused.value.holders) == {"sandbox-b", "snapshot-a"}
    assert "sandbox-b" in str(refused.value) and "snapshot-a" in str(refused.value)
    assert len(cache.history()) == position + 1
    last = cache.history("db:1")[-1]
    assert (last.event, last.manifest_digest) == ("RemoveRefused", handle.manifest_digest)
    assert cache.get("db:1") == cache.get("db:1")

    cache.remove("db:1", force=True)
    with pytest.raises(ImageNotFoundError):
        cache.get("db:1")
    assert digests_on_disk(home) == on_disk  # still leased: stays on disk
    report = cache.prune()
    assert report_summary(report) == (0, 0, 0, 0, 0, 0)
    assert digests_on_disk(home) == on_disk

    assert cache.release("sandbox-b") == 1
    assert report_summary(cache.prune())[:3] == (0, 0, 0)  # snapshot-a still holds it
    assert digests_on_disk(home) == on_disk
    assert cache.release("snapshot-a") == 1
    assert cache.release("snapshot-a") == 0
    size = store_bytes(home)
    report = cache.prune()
    assert report_summary(report) == (0, 1, 2, 0, 0, size)
    assert digests_on_disk(home) == set()


def test_content_force_removed_then_reloaded_while_leased_is_kept(
    cache: ImageCache, clock: Clock, home: Path, tmp_path: Path
) -> None:
    archive = docker_archive(tmp_path, spec("again:1"))
    [handle] = cache.load(archive)
    on_disk = digests_on_disk(home)
    cache.use("again:1", "sb")
    cache.remove("again:1", force=True)
    clock.at(10)
    [back] = cache.load(archive)
    assert (back.manifest_digest, back.created_at) == (handle.manifest_digest, clock.now)
    cache.release("sb")
    assert report_summary(cache.prune(keep=["again:1"])) == (0, 0, 0, 0, 0, 0)
    assert digests_on_disk(home) == on_disk
    cache.remove("again:1")
    assert digests_on_disk(home) == set()


def test_remove_deletes_exactly_what_no_other_manifest_uses(
    cache: ImageCache, home: Path, tmp_path: Path
) -> None:
    one, two = build_image(spec("one:1")), build_image(spec("two:1"))
    assert one.layers[0].digest == two.layers[0].digest  # a shared base layer
    cache.load(build_oci_layout(tmp_path / "both", [one, two]).path)
    assert digests_on_disk(home) == image_blobs(one) | image_blobs(two)

    before = store_bytes(home)
    cache.remove("one:1")
    assert digests_on_disk(home) == image_blobs(two)
    freed = before - store_bytes(home)
    assert freed == len(one.manifest) + len(one.config) + one.layers[1].size
    removed = cache.history("one:1")[-1]
    assert removed.event == "ImageRemoved"
    assert str(freed) in removed.detail  # the event records the bytes it deleted
    assert cache.inspect("two:1").handle.layer_count == 2

    cache.remove("two:1")
    assert digests_on_disk(home) == set()
    with pytest.raises(ImageNotFoundError):
        cache.remove("two:1")


def test_handle_methods_on_a_blocking_handle(cache: ImageCache, tmp_path: Path) -> None:
    [handle] = cache.load(docker_archive(tmp_path, spec("h:1")))
    detail = handle.inspect()
    assert isinstance(detail, ImageDetail)
    assert detail.handle.reference == handle.reference
    for listed in cache.list():
        assert listed.inspect().handle.manifest_digest == handle.manifest_digest
    cache.use("h:1", "sb")
    with pytest.raises(ImageInUseError):
        handle.remove()
    handle.remove(force=True)
    with pytest.raises(ImageNotFoundError):
        handle.inspect()
    with pytest.raises(ImageNotFoundError):
        handle.remove()


# ---------------------------------------------------------------------------- semantics 8


def _three_images(cache: ImageCache, clock: Clock, tmp_path: Path) -> dict[str, BuiltImage]:
    images = {
        name: build_image(spec(f"{name}:1", layers=({"only": name.encode() * (200 * (i + 1))},)))
        for i, name in enumerate(("aa", "bb", "cc"))
    }
    for i, built in enumerate(images.values()):
        clock.at(i * 10)
        cache.load(build_oci_layout(tmp_path / f"l{i}-{next(_counter)}", [built]).path)
    return images


def test_prune_default_dry_run_reports_what_the_real_prune_does(
    cache: ImageCache, clock: Clock, home: Path, tmp_path: Path
) -> None:
    images = _three_images(cache, clock, tmp_path)
    shared = [build_image(spec("s1:1")), build_image(spec("s2:1"))]
    cache.load(docker_archive(tmp_path, *shared))
    cache.load(docker_archive(tmp_path, spec("kept:1", "kept:alias")))
    cache.use("kept:alias", "sandbox")
    cache.remove("kept:1")  # content stays named by the leased alias

    disk, listed, history = digests_on_disk(home), cache.list(), len(cache.history())
    size = store_bytes(home)
    dry = cache.prune(dry_run=True)
    assert dry.dry_run
    assert (digests_on_disk(home), cache.list(), len(cache.history())) == (disk, listed, history)

    real = cache.prune()
    assert not real.dry_run
    assert report_summary(real) == report_summary(dry)
    assert real.references == dry.references and real.deleted == dry.deleted
    assert real.image_refs_removed == 5
    assert real.manifests_removed == 5
    # Three single-layer images and two tops; the shared base stays: the leased image uses it.
    assert real.layers_removed == 3 + 2
    assert shared[0].layers[0].digest in digests_on_disk(home)
    assert real.bytes_reclaimed == size - store_bytes(home)
    assert {r.reference for r in real.references} == {
        *(f"docker.io/library/{n}:1" for n in images),
        "docker.io/library/s1:1",
        "docker.io/library/s2:1",
    }
    assert all(r.reason for r in real.references) and all(b.reason for b in real.deleted)
    assert [h.reference for h in cache.list()] == ["docker.io/library/kept:alias"]
    assert events(cache)[-1] == "ImagesPruned"
    assert report_summary(cache.prune()) == (0, 0, 0, 0, 0, 0)


def test_a_new_home_is_made_in_a_handful_of_ledger_commits(tmp_path: Path) -> None:
    """Each LMDB commit of a durable ledger is an fsync: the views' twenty-odd databases are
    created in one (a first pull paid ~25 commits before its download)."""
    import lmdb

    ImageCache(tmp_path / "home").close()
    env = lmdb.open(str(tmp_path / "home" / "ledger"), readonly=True, lock=False, max_dbs=64)
    try:
        assert env.info()["last_txnid"] <= 8
    finally:
        env.close()


def test_a_dry_run_records_nothing_even_in_a_new_home(tmp_path: Path) -> None:
    """A plan is a query: on a home that has recorded nothing yet, `prune(dry_run=True)` and
    `df()` leave the ledger empty (it used to record the ledger's first event, `Started`)."""
    with ImageCache(tmp_path / "home") as fresh:
        assert fresh.prune(dry_run=True).dry_run
        fresh.df()
        assert fresh.history() == []


def test_prune_unused_for_keeps_recently_used(
    cache: ImageCache, clock: Clock, tmp_path: Path
) -> None:
    _three_images(cache, clock, tmp_path)  # aa at 0 s, bb at 10 s, cc at 20 s
    clock.at(3000)
    cache.use("aa:1", "sb")  # a use counts as recent use
    cache.release("sb")
    clock.at(3100)
    cache.load(docker_archive(tmp_path, spec("cc:1", layers=({"only": b"cc" * 600},))))
    clock.at(3600)  # a cached re-pull counts too
    report = cache.prune(unused_for=1800)
    assert [r.reference for r in report.references] == ["docker.io/library/bb:1"]
    assert [h.reference for h in cache.list()] == [
        "docker.io/library/cc:1",
        "docker.io/library/aa:1",
    ]


def test_prune_unused_for_boundaries(cache: ImageCache, clock: Clock, tmp_path: Path) -> None:
    _three_images(cache, clock, tmp_path)  # aa at 0 s, bb at 10 s, cc at 20 s
    clock.at(30)
    cache.load(docker_archive(tmp_path, spec("dd:1")))
    clock.at(3600)
    report = cache.prune(unused_for=3585)  # aa (3600 s) and bb (3590 s) are older
    assert [r.reference for r in report.references] == [
        "docker.io/library/aa:1",
        "docker.io/library/bb:1",
    ]
    assert "3585" in report.references[0].reason
    assert [h.reference for h in cache.list()] == [
        "docker.io/library/dd:1",
        "docker.io/library/cc:1",
    ]


def test_prune_keep_patterns_and_exact_spellings(
    cache: ImageCache, clock: Clock, tmp_path: Path
) -> None:
    names = ("alpine:3", "ghcr.io/acme/app:1", "ghcr.io/acme/app:2", "busybox:latest", "nginx:1.25")
    for name in names:
        cache.load(docker_archive(tmp_path, spec(name)))
    report = cache.prune(keep=["alpine:3", "ghcr.io/acme/*", "docker.io/library/nginx:1.*"])
    assert [r.reference for r in report.references] == ["docker.io/library/busybox:latest"]
    assert report.manifests_removed == 1
    assert sorted(h.reference for h in cache.list()) == [
        "docker.io/library/alpine:3",
        "docker.io/library/nginx:1.25",
        "ghcr.io/acme/app:1",
        "ghcr.io/acme/app:2",
    ]
    report = cache.prune(keep=["index.docker.io/library/alpine:3"])  # any spelling
    assert sorted(r.reference for r in report.references) == [
        "docker.io/library/nginx:1.25",
        "ghcr.io/acme/app:1",
        "ghcr.io/acme/app:2",
    ]
    assert [h.reference for h in cache.list()] == ["docker.io/library/alpine:3"]


def test_prune_max_bytes_evicts_least_recently_used_down_to_the_budget(
    cache: ImageCache, clock: Clock, home: Path, tmp_path: Path
) -> None:
    images = _three_images(cache, clock, tmp_path)  # last used: aa 0 s, bb 10 s, cc 20 s
    sizes = {name: cache.get(f"{name}:1").size_bytes for name in images}
    clock.at(30)
    cache.use("aa:1", "sb")  # now bb is the least recently used, then cc, then aa
    cache.release("sb")
    total = store_bytes(home)
    assert total == sum(sizes.values())

    assert cache.prune(max_bytes=total).image_refs_removed == 0
    dry = cache.prune(max_bytes=total - 1, dry_run=True)
    assert [r.reference for r in dry.references] == ["docker.io/library/bb:1"]
    report = cache.prune(max_bytes=sizes["aa"] + sizes["cc"])
    assert [r.reference for r in report.references] == ["docker.io/library/bb:1"]
    assert report.bytes_reclaimed == sizes["bb"] == total - store_bytes(home)
    assert "least recently used" in report.references[0].reason

    cache.use("cc:1", "sandbox")  # leased: never evicted, even over budget
    report = cache.prune(max_bytes=0)
    assert [r.reference for r in report.references] == ["docker.io/library/aa:1"]
    assert [h.reference for h in cache.list()] == ["docker.io/library/cc:1"]
    assert store_bytes(home) == sizes["cc"]


def test_prune_reclaims_orphan_blobs_and_stale_partials_byte_for_byte(
    cache: ImageCache, clock: Clock, home: Path, tmp_path: Path
) -> None:
    cache.load(docker_archive(tmp_path, spec("live:1")))
    cache.use("live:1", "sb")
    live = digests_on_disk(home)
    orphan_hex = secrets.token_hex(32)
    orphan = home / "blobs" / "sha256" / orphan_hex
    orphan.write_bytes(os.urandom(1000))
    (home / "tmp").mkdir(exist_ok=True)
    (home / "tmp" / f"{secrets.token_hex(32)}.part").write_bytes(b"p" * 500)
    (home / "tmp" / "deadbeefdeadbeef").mkdir()
    (home / "tmp" / "deadbeefdeadbeef" / "x.part").write_bytes(b"q" * 300)
    size = store_bytes(home)

    dry = cache.prune(dry_run=True)
    assert orphan.exists()
    report = cache.prune()
    assert report_summary(report) == report_summary(dry)
    assert report.bytes_reclaimed == 1800 == size - store_bytes(home)
    kinds = sorted((b.kind, b.size) for b in report.deleted)
    assert kinds == [("orphan", 1000), ("partial", 300), ("partial", 500)]
    orphan_entry = next(b for b in report.deleted if b.kind == "orphan")
    assert orphan_hex in orphan_entry.digest
    assert report.image_refs_removed == report.manifests_removed == report.layers_removed == 0
    assert not orphan.exists()
    assert [p for p in (home / "tmp").iterdir() if p.name != "leases"] == []
    assert digests_on_disk(home) == live


# ---------------------------------------------------------------------------- save / skopeo


@pytest.mark.parametrize("fmt", ["docker", "oci"])
def test_save_then_load_round_trips(
    fmt: str, cache: ImageCache, tmp_path: Path, clock: Clock
) -> None:
    cache.load(docker_archive(tmp_path, spec("web:1", "web:latest", architecture="arm64")))
    cache.load(build_oci_layout(tmp_path / "g", [spec("ghcr.io/acme/tool:2")]).path)
    refs = ["web:1", "docker.io/library/web:latest", "ghcr.io/acme/tool:2"]
    out = tmp_path / f"saved-{fmt}.tar"
    cache.save(refs, out, format=fmt)  # type: ignore[arg-type]

    with ImageCache(tmp_path / "other", clock=clock, durability="nosync") as other:
        loaded = other.load(out)
        assert sorted(h.reference for h in loaded) == sorted(
            ["docker.io/library/web:1", "docker.io/library/web:latest", "ghcr.io/acme/tool:2"]
        )
        for ref in refs:
            mine, theirs = cache.inspect(ref), other.inspect(ref)
            assert theirs.handle.manifest_digest == mine.handle.manifest_digest
            assert (theirs.handle.size_bytes, theirs.handle.architecture) == (
                mine.handle.size_bytes,
                mine.handle.architecture,
            )
            assert (theirs.config, theirs.layers) == (mine.config, mine.layers)
    saved_again = tmp_path / f"again-{fmt}.tar"
    cache.save(refs, saved_again, format=fmt)  # type: ignore[arg-type]
    assert saved_again.read_bytes() == out.read_bytes()


def test_save_a_missing_reference_raises_and_writes_nothing(
    cache: ImageCache, tmp_path: Path
) -> None:
    with pytest.raises(ImageNotFoundError):
        cache.save(["nothere:1"], tmp_path / "x.tar")
    assert list(tmp_path.iterdir()) == [cache.home]


def _skopeo(*args: str) -> subprocess.CompletedProcess[bytes]:
    assert SKOPEO is not None
    return subprocess.run([SKOPEO, *args], capture_output=True, check=True, timeout=60)


@needs_skopeo
def test_skopeo_reads_saves_and_the_home_itself(
    cache: ImageCache, home: Path, tmp_path: Path
) -> None:
    built = build_image(spec("x:1", architecture="arm64", labels={"k": "v"}))
    [handle] = cache.load(build_oci_layout(tmp_path / "x", [built]).path)
    docker = tmp_path / "x-docker.tar"
    oci = tmp_path / "x-oci.tar"
    cache.save(["x:1"], docker, format="docker")
    cache.save(["x:1"], oci, format="oci")

    # skopeo's docker-archive source lists the uncompressed layers (diff_ids).
    for location, layers in (
        (f"docker-archive:{docker}", [layer.diff_id for layer in built.layers]),
        (f"oci-archive:{oci}:docker.io/library/x:1", [layer.digest for layer in built.layers]),
    ):
        info = json.loads(_skopeo("inspect", location).stdout)
        assert info["Architecture"] == "arm64", location
        assert info["Os"] == "linux", location
        assert info["Labels"] == {"k": "v"}, location
        assert info["Layers"] == layers, location
    raw = _skopeo("inspect", "--raw", f"oci-archive:{oci}:docker.io/library/x:1").stdout
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == handle.manifest_digest

    raw = _skopeo("inspect", "--raw", f"oci:{home}:docker.io/library/x:1").stdout
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == handle.manifest_digest
    config = json.loads(_skopeo("inspect", "--config", f"oci:{home}:docker.io/library/x:1").stdout)
    assert config["architecture"] == "arm64"
    cache.remove("x:1")  # index.json follows the ledger
    with pytest.raises(subprocess.CalledProcessError):
        _skopeo("inspect", "--raw", f"oci:{home}:docker.io/library/x:1")


# ---------------------------------------------------------------------------- rebuild, readers


def test_rebuild_and_verify_agree_after_a_busy_sequence(
    cache: ImageCache, clock: Clock, home: Path, tmp_path: Path
) -> None:
    for i, names in enumerate((("a:1", "a:2"), ("b:1",), ("ghcr.io/o/c:1",), ("d:1",))):
        clock.at(i)
        cache.load(docker_archive(tmp_path, spec(*names)))
    clock.at(10)
    cache.use("a:1", "sb-1")
    cache.use("b:1", "sb-1")
    cache.use("b:1", "sb-2")
    with pytest.raises(ImageInUseError):
        cache.remove("b:1")
    cache.remove("a:2")
    cache.remove("b:1", force=True)
    with pytest.raises(ImageLedgerError):
        cache.load(tmp_path / "missing.tar")
    cache.release("sb-1")
    clock.at(20)
    cache.load(docker_archive(tmp_path, spec("d:1")))  # retag
    cache.prune(keep=["d:*"], dry_run=True)
    cache.prune(keep=["docker.io/library/d:*"])
    clock.at(30)
    cache.load(docker_archive(tmp_path, spec("e:1")))

    listed = cache.list()
    details = [cache.inspect(h.reference) for h in listed]
    history = cache.history()
    index = (home / "index.json").read_bytes()

    verified = cache.rebuild(verify=True)
    assert verified.identical, verified.tables
    rebuilt = cache.rebuild()
    assert rebuilt.identical, rebuilt.tables
    assert rebuilt.events == verified.events == len(history)
    assert rebuilt.tables == verified.tables
    again = cache.rebuild(verify=True)
    assert again.identical and again.tables == verified.tables
    assert cache.list() == listed
    assert [cache.inspect(h.reference) for h in listed] == details
    assert cache.history() == history
    assert (home / "index.json").read_bytes() == index


def test_views_of_another_format_are_rebuilt_on_open(
    cache: ImageCache, clock: Clock, home: Path, tmp_path: Path
) -> None:
    for i, name in enumerate(("a:1", "b:1", "c:1")):
        clock.at(i)
        cache.load(docker_archive(tmp_path, spec(name)))
    cache.use("b:1", "sb-1")
    listed, details = cache.list(), cache.inspect("b:1")
    # What an older imageledger left: another format number, and rows this one cannot read.
    views = internals(cache).ledger.views

    def older(txn: Any) -> None:
        view = views.in_txn(txn)
        txn.put(b"format", packer()(1), db=view.dbs["meta"])
        txn.drop(view.dbs["refs.order"], delete=False)
        txn.put(b"\0" * 16, b"\x93\x01\x02\x03", db=view.dbs["refs.order"])

    views.env.write(older)
    cache.close()
    with ImageCache(home, clock=clock, durability="nosync") as reopened:
        assert reopened.list() == listed
        assert reopened.inspect("b:1") == details
        assert reopened.rebuild(verify=True).identical
        with internals(reopened).ledger.snapshot() as state:
            assert state.format == VIEWS_FORMAT


def test_list_after_commits_shares_only_unchanged_handles(
    cache: ImageCache, clock: Clock, tmp_path: Path
) -> None:
    for i, name in enumerate(("a:1", "b:1", "c:1")):
        clock.at(i)
        cache.load(docker_archive(tmp_path, spec(name)))
    before = {h.reference: h for h in cache.list()}
    clock.at(50)
    cache.use("b:1", "sb-1")  # one row changes
    after = {h.reference: h for h in cache.list()}
    assert after["docker.io/library/b:1"].last_used_at == clock.now
    assert before["docker.io/library/b:1"].last_used_at == BASE + timedelta(seconds=1)
    for name in ("docker.io/library/a:1", "docker.io/library/c:1"):
        assert after[name] is before[name]  # unchanged rows are not decoded again
    assert all(h.inspect().handle == h for h in after.values())  # each bound to the cache
    cache.remove("a:1")
    assert [h.reference for h in cache.list()] == [
        "docker.io/library/c:1",
        "docker.io/library/b:1",
    ]


def test_another_instance_reads_its_writes_immediately(
    cache: ImageCache, clock: Clock, home: Path, tmp_path: Path
) -> None:
    with ImageCache(home, clock=clock, durability="nosync") as other:
        assert other.list() == cache.list() == []
        [handle] = cache.load(docker_archive(tmp_path, spec("rw:1")))
        assert other.get("rw:1") == handle
        assert [h.reference for h in other.list()] == ["docker.io/library/rw:1"]
        clock.at(99)
        other.use("rw:1", "sb")
        assert cache.get("rw:1").last_used_at == clock.now
        with pytest.raises(ImageInUseError):
            cache.remove("rw:1")
        assert other.history("rw:1")[-1].event == "RemoveRefused"
        other.load(docker_archive(tmp_path, spec("rw:2")))
        assert len(cache.list()) == 2  # a list memoised before the write is not served
        cache.release("sb")
        cache.remove("rw:1")
        with pytest.raises(ImageNotFoundError):
            other.get("rw:1")


_CHILD = textwrap.dedent(
    """
    import json, sys
    from imageledger import ImageCache, ImageNotFoundError
    home, op, *args = sys.argv[1:]
    with ImageCache(home) as cache:
        if op == "get":
            try:
                print(json.dumps(cache.get(args[0]).manifest_digest))
            except ImageNotFoundError:
                print(json.dumps(None))
        elif op == "use":
            print(json.dumps(cache.use(args[0], args[1]).reference))
        elif op == "load":
            print(json.dumps([h.reference for h in cache.load(args[0])]))
    """
)


def _child(home: Path, *args: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(home), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "IMAGELEDGER_LOG_LEVEL": "error"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_another_process_reads_and_writes_the_same_home(
    cache: ImageCache, home: Path, tmp_path: Path
) -> None:
    [handle] = cache.load(docker_archive(tmp_path, spec("proc:1")))
    assert cache.list()  # memoise a listing before the other process writes
    assert _child(home, "get", "proc:1") == handle.manifest_digest
    assert _child(home, "use", "proc:1", "child-sandbox") == handle.reference
    with pytest.raises(ImageInUseError) as refused:
        cache.remove("proc:1")
    assert refused.value.holders == ("child-sandbox",)
    assert _child(home, "load", str(docker_archive(tmp_path, spec("proc:2")))) == [
        "docker.io/library/proc:2"
    ]
    assert {h.reference for h in cache.list()} == {
        "docker.io/library/proc:1",
        "docker.io/library/proc:2",
    }
    cache.release("child-sandbox")
    cache.remove("proc:1")
    assert _child(home, "get", "proc:1") is None


def test_a_fresh_home_opened_by_two_processes_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic: the other process opens the home while this one is writing oci-layout."""
    home = tmp_path / "home"
    real_replace = os.replace
    others: list[subprocess.Popen[bytes]] = []

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        if Path(dst).name == "oci-layout" and not others:
            other = subprocess.Popen(
                [sys.executable, "-m", "imageledger.tools.cli", "--home", str(home), "images"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            others.append(other)
            with contextlib.suppress(subprocess.TimeoutExpired):
                other.wait(timeout=5)  # it may wait for a lock this process holds: fine
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    try:
        with ImageCache(home) as cache:
            assert cache.list() == []
    finally:
        monkeypatch.undo()
        for other in others:
            other.wait(timeout=60)
    assert others and others[0].returncode == 0
    assert (home / "oci-layout").is_file() and (home / "index.json").is_file()


# ---------------------------------------------------------------------------- asyncio API


def test_the_asyncio_api(cache: ImageCache, home: Path, tmp_path: Path) -> None:
    archive = docker_archive(tmp_path, spec("async:1", "async:2"))
    out = tmp_path / "async-out.tar"

    async def scenario() -> None:
        loaded = await Image.load(archive, cache=cache)
        assert sorted(h.reference for h in loaded) == [
            "docker.io/library/async:1",
            "docker.io/library/async:2",
        ]
        got, listed = await asyncio.gather(
            Image.get("async:1", cache=cache), Image.list(cache=cache)
        )
        assert got == cache.get("async:1")
        assert listed == cache.list()
        detail: ImageDetail[CachedImage] = await Image.inspect("async:1", cache=cache)
        assert detail == cache.inspect("async:1")
        assert (await Image.use("async:1", "sb", cache=cache)).reference == got.reference
        await Image.remove("async:2", cache=cache)  # an alias: only untags
        with pytest.raises(ImageInUseError):
            await Image.remove("async:1", cache=cache)
        with pytest.raises(ImageNotFoundError):
            await Image.get("async:2", cache=cache)
        await Image.save(["async:1"], out, format="oci", cache=cache)
        assert await Image.release("sb", cache=cache) == 1
        dry = await Image.prune(cache=cache, dry_run=True)
        assert dry.dry_run and dry.image_refs_removed == 1
        report = await Image.prune(cache=cache)
        assert report_summary(report) == report_summary(dry)
        assert await Image.list(cache=cache) == []
        again = await Image.load(out, cache=cache)
        assert [h.reference for h in again] == ["docker.io/library/async:1"]
        await Image.remove("async:1", force=True, cache=cache)
        with pytest.raises(InvalidReferenceError):
            await Image.get("Not Valid", cache=cache)

    asyncio.run(scenario())
    assert digests_on_disk(home) == set()


def test_the_asyncio_api_defaults_to_imageledger_home(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGELEDGER_HOME", str(home))
    monkeypatch.setattr(Image, "_default", None)
    archive = docker_archive(tmp_path, spec("envhome:1"))

    async def scenario() -> list[AsyncImageHandle]:
        await Image.load(archive)
        return await Image.list()

    try:
        listed = asyncio.run(scenario())
    finally:
        if Image._default is not None:
            Image._default.close()
    assert [h.reference for h in listed] == ["docker.io/library/envhome:1"]
    with ImageCache(home) as direct:
        assert direct.list() == listed


def test_handle_methods_from_the_asyncio_api_are_awaitable(
    cache: ImageCache, tmp_path: Path
) -> None:
    cache.load(docker_archive(tmp_path, spec("aw:1")))

    async def scenario() -> None:
        handle = await Image.get("aw:1", cache=cache)
        detail = await handle.inspect()
        assert detail.handle.reference == "docker.io/library/aw:1"
        [listed] = await Image.list(cache=cache)
        assert (await listed.inspect()).handle == detail.handle
        await handle.remove()
        assert await Image.list(cache=cache) == []

    asyncio.run(scenario())


def test_asyncio_and_blocking_lists_keep_their_own_handles_across_commits(
    cache: ImageCache, clock: Clock, tmp_path: Path
) -> None:
    for i, name in enumerate(("a:1", "b:1")):
        clock.at(i)
        cache.load(docker_archive(tmp_path, spec(name)))

    async def scenario() -> None:
        first = await Image.list(cache=cache)
        blocking: list[CachedImage] = [*cache.list()]
        assert first == blocking and all(a is not b for a, b in zip(first, blocking, strict=True))
        assert (await Image.list(cache=cache))[0] is first[0]  # nothing changed: the same
        clock.at(30)
        await Image.use("a:1", "sb", cache=cache)  # one row changes
        after = {h.reference: h for h in await Image.list(cache=cache)}
        before = {h.reference: h for h in first}
        assert after["docker.io/library/b:1"] is before["docker.io/library/b:1"]
        assert after["docker.io/library/a:1"].last_used_at == clock.now
        for handle in after.values():  # still the asyncio API's handles: awaitable methods
            assert (await handle.inspect()).handle == handle
        assert cache.list()[0].inspect().handle.reference == "docker.io/library/b:1"

    asyncio.run(scenario())


# ---------------------------------------------------------------------------- hostile archives


def _members(path: Path) -> list[TarEntry]:
    """A tar's entries as `TarEntry`s, to rewrite a good archive into a hostile one."""
    entries = []
    with tarfile.open(path) as tar:
        for member in tar:
            data = b""
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                data = extracted.read()
            entries.append(
                TarEntry(member.name, data, member.type, member.linkname, member.mode, 0)
            )
    return entries


def _hostile(kind: str, tmp_path: Path) -> Path:
    built = build_image(spec("evil:1"))
    good = build_docker_archive(tmp_path / "good.tar", [built], style="docker25").path
    entries = _members(good)
    layer_name = "blobs/sha256/" + built.layers[1].digest.removeprefix("sha256:")
    if kind == "dotdot":
        entries.append(TarEntry("../evil", b"escaped"))
    elif kind == "dotdot-inside":
        entries.insert(3, TarEntry("blobs/../../evil", b"escaped"))
    elif kind == "absolute":
        entries.append(TarEntry(str(tmp_path / "evil"), b"escaped"))
    elif kind == "symlink-out":
        entries = [
            TarEntry(e.name, type=tarfile.SYMTYPE, linkname="/etc/passwd")
            if e.name == layer_name
            else e
            for e in entries
        ]
    elif kind == "digest-mismatch":
        entries = [
            TarEntry(e.name, bytes(len(e.data))) if e.name == layer_name else e for e in entries
        ]
    else:
        raise AssertionError(kind)
    path = tmp_path / f"hostile-{kind}.tar"
    path.write_bytes(tar_bytes(entries))
    return path


HOSTILE = ("dotdot", "dotdot-inside", "absolute", "symlink-out", "digest-mismatch")


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_archive_is_refused_and_leaves_nothing_behind(
    kind: str, cache: ImageCache, home: Path, tmp_path: Path
) -> None:
    # Something is cached already: it must survive untouched (the evil image shares its base).
    [kept] = cache.load(docker_archive(tmp_path, spec("kept:1")))
    before = {p.name: p.read_bytes() for p in (home / "blobs" / "sha256").iterdir()}
    history = cache.history()
    path = _hostile(kind, tmp_path)

    with pytest.raises(ImageLedgerError) as error:
        cache.load(path)
    assert str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ImageLedgerError):
        stream = NonSeekable(path)
        try:
            cache.load(stream)  # type: ignore[arg-type]
        finally:
            stream.close()

    after = cache.history()
    assert after[: len(history)] == history
    for entry in after[len(history) :]:
        assert entry.event == "PullFailed"
        assert entry.manifest_digest == ""
    assert any(str(path) in e.detail for e in after[len(history) :])
    assert cache.list() == [kept]
    assert {p.name: p.read_bytes() for p in (home / "blobs" / "sha256").iterdir()} == before
    assert [p for p in (home / "tmp").iterdir() if p.name != "leases"] == []
    assert list((home / "tmp" / "leases").glob("*")) == []
    assert not list(tmp_path.rglob("evil"))
    assert cache.rebuild(verify=True).identical


# ---------------------------------------------------------------------------- a full disk


def fill(disk: Path, leave: int) -> Path:
    """Take all but `leave` bytes of `disk`'s free space."""
    filler = disk / "filler"
    with filler.open("wb") as f:  # emptied first: its own bytes count as free
        remaining = shutil.disk_usage(disk).free - leave
        while remaining > 0:
            try:
                remaining -= f.write(b"\0" * min(remaining, 65536))
                f.flush()
            except OSError as e:  # block rounding: the disk is full a little early
                assert e.errno == errno.ENOSPC
                break
    return filler


def test_a_full_disk_fails_a_load_cleanly_and_the_next_one_works(
    small_disk: Path, clock: Clock, tmp_path: Path
) -> None:
    home = small_disk / "home"
    big = spec("big:1", layers=(SHARED_BASE, {"app/data": secrets.token_bytes(300_000)}))
    archive = docker_archive(tmp_path, big)
    with ImageCache(home, clock=clock, durability="nosync") as cache:
        [small] = cache.load(docker_archive(tmp_path, spec("small:1")))
        files, listed = digests_on_disk(home), cache.list()
        filler = fill(small_disk, leave=200_000)
        with pytest.raises(DiskFullError) as raised:
            cache.load(archive)
        assert isinstance(raised.value, ImageLedgerError)
        assert raised.value.errno == errno.ENOSPC
        assert "device is full" in str(raised.value)
        # Nothing of it is kept: no blob, no partial file, no reference.
        assert digests_on_disk(home) == files
        assert not [p for p in (home / "tmp").rglob("*") if p.is_file()]
        assert cache.list() == listed
        assert events(cache)[-1] == "PullFailed"
        assert "device is full" in cache.history()[-1].detail

        # The command line says so in one line and exits 1.
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "imageledger.tools.cli",
                "--home",
                str(home),
                "load",
                str(archive),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 1
        assert "device is full" in done.stderr and len(done.stderr.strip().splitlines()) == 1

        # With the disk completely full, recording the failure or writing index.json after a
        # commit may fail too: the caller still gets the load's own error, and a command that
        # committed is not reported as failed (the ledger is the record; the index follows).
        fill(small_disk, leave=0)
        with pytest.raises(DiskFullError):
            cache.load(archive)
        clock.at(90)
        try:
            cache.use("small:1", "sb-on-a-full-disk")
        except LedgerFullError:
            assert cache.get("small:1").last_used_at != clock.now  # rolled back whole
        else:
            assert cache.get("small:1").last_used_at == clock.now
        filler.unlink()
        [loaded] = cache.load(archive)
        assert loaded.reference == "docker.io/library/big:1"
        assert cache.get("small:1").manifest_digest == small.manifest_digest
        index = json.loads((home / "index.json").read_text())
        names = {m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]}
        assert names == {"docker.io/library/small:1", "docker.io/library/big:1"}
        assert cache.rebuild(verify=True).identical


# ---------------------------------------------------------------------------- a damaged store


def test_verify_finds_damaged_blobs_save_refuses_them_and_repair_lets_a_reload_heal(
    cache: ImageCache, home: Path, tmp_path: Path
) -> None:
    archive = docker_archive(tmp_path, spec("a:1"), spec("b:1"))
    cache.load(archive)
    a, b = cache.inspect("a:1"), cache.inspect("b:1")
    shared = a.layers[0].blob_digest
    assert shared == b.layers[0].blob_digest
    a_top, b_config = a.layers[-1].blob_digest, b.config.digest
    clean = cache.verify()
    assert clean.ok and clean.blobs_checked == len(digests_on_disk(home)) == 7  # 2+2+3

    # Bit rot in a's own layer (same size), a truncated config of b, the shared layer gone.
    data = bytearray(blob_path(home, a_top).read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob_path(home, a_top).write_bytes(bytes(data))
    blob_path(home, b_config).write_bytes(blob_path(home, b_config).read_bytes()[:-5])
    shared_bytes = blob_path(home, shared).read_bytes()
    blob_path(home, shared).unlink()
    found = {p.digest: p for p in cache.verify().problems}
    assert {d: (p.problem, p.references, p.repaired) for d, p in found.items()} == {
        a_top: ("corrupt", ("docker.io/library/a:1",), False),
        b_config: ("wrong size", ("docker.io/library/b:1",), False),
        shared: ("missing", ("docker.io/library/a:1", "docker.io/library/b:1"), False),
    }
    assert found[b_config].kind == "config" and found[a_top].kind == "layer"

    # A damaged image is not exported, and no archive (or partial file) is left behind:
    # found before writing (b's config is short), or while streaming (a's layer hashes wrong).
    blob_path(home, shared).write_bytes(shared_bytes)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ContentCorruptError, match="verify --repair"):
        cache.save(["b:1"], out / "b.tar")
    with pytest.raises(ContentCorruptError, match=f"{a_top} in the store is corrupt"):
        cache.save(["a:1"], out / "a.tar", format="oci")
    assert list(out.iterdir()) == []

    blob_path(home, shared).unlink()
    repaired = {p.digest: p.repaired for p in cache.verify(repair=True).problems}
    assert repaired == {a_top: True, b_config: True, shared: False}  # nothing to delete
    assert not ({a_top, b_config, shared} & digests_on_disk(home))
    # Loading the images again brings the blobs back; the store is whole, saving works.
    cache.load(archive)
    assert cache.verify().ok
    cache.save(["a:1", "b:1"], out / "both.tar")
    assert (out / "both.tar").stat().st_size > 0


def test_index_json_is_rewritten_only_when_what_it_shows_changes(
    cache: ImageCache, home: Path, tmp_path: Path
) -> None:
    """Semantics 14: a use or a release (what a runtime does on every sandbox start and
    stop) changes nothing index.json shows, so it is not rewritten (it was, whole, on every
    commit: O(references) per use); a load, a remove and a prune that drops a reference are."""
    cache.load(docker_archive(tmp_path, spec("a:1", "a:2")))
    index = home / "index.json"

    def identity() -> tuple[int, int]:
        st = index.stat()
        return st.st_ino, st.st_mtime_ns

    before = identity()
    cache.use("a:1", "sb-1")
    cache.release("sb-1")
    cache.prune(dry_run=True)
    assert identity() == before
    cache.load(docker_archive(tmp_path, spec("b:1")))
    after_load = identity()
    assert after_load != before
    names = {
        m["annotations"]["org.opencontainers.image.ref.name"]
        for m in json.loads(index.read_text())["manifests"]
    }
    assert names == {"docker.io/library/a:1", "docker.io/library/a:2", "docker.io/library/b:1"}
    cache.remove("a:2")
    assert identity() != after_load
    assert "docker.io/library/a:2" not in index.read_text()


def test_use_and_release_cost_one_read_and_one_write_whatever_the_cache_holds(
    cache: ImageCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a runtime calls on every sandbox start and stop reads the views once, commits
    once, and neither rewrites index.json nor walks the cached references (issue 9: a use
    once rebuilt the whole index from every manifest)."""
    names = tuple(f"many:{i}" for i in range(300))
    cache.load(build_docker_archive(tmp_path / "many.tar", [ImageSpec(names=names)]).path)
    parts = internals(cache)
    calls: dict[str, int] = {"snapshot": 0, "append": 0, "refresh": 0, "references": 0}
    real_snapshot, real_append = parts.ledger.snapshot, parts.ledger.append
    real_refresh, real_references = parts.index.refresh, ViewState.references

    def counted(name: str, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(parts.ledger, "snapshot", counted("snapshot", real_snapshot))
    monkeypatch.setattr(parts.ledger, "append", counted("append", real_append))
    monkeypatch.setattr(parts.index, "refresh", counted("refresh", real_refresh))
    monkeypatch.setattr(ViewState, "references", counted("references", real_references))
    index_before = (cache.home / "index.json").read_bytes()
    handle = cache.use("many:7", "sandbox-1")
    assert calls == {"snapshot": 1, "append": 1, "refresh": 0, "references": 0}
    assert handle == cache.get("many:7")  # the handle is what the views now hold
    calls.update(dict.fromkeys(calls, 0))
    assert cache.release("sandbox-1") == 1
    assert calls == {"snapshot": 1, "append": 1, "refresh": 0, "references": 0}
    assert (cache.home / "index.json").read_bytes() == index_before
