"""Pulls through the image cache from a real registry (Debian's docker-registry 2.8): the
handle, the ledger events, cached re-pulls, and a prune running while a pull is in flight (in
another process) never deleting what the pull needs; a crashed pull's partial files are
reclaimed by the next prune."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from imageledger import DigestMismatchError, DiskFullError, ImageCache, ImageNotFoundError
from imageledger.cache import internals
from imageledger.domain.errors import RegistryAuthError
from imageledger.storage.registryoptions import RegistryOptions
from imageledger.tools.imagebuild import ImageSpec, build_image, build_oci_layout

if TYPE_CHECKING:
    from tests.registry import FlakyRegistry, Registry, TokenRegistry, push
else:
    from registry import FlakyRegistry, Registry, TokenRegistry, push

TIMEOUT = 60.0
CLI = (sys.executable, "-m", "imageledger.tools.cli")


def _options(registry: Registry) -> RegistryOptions:
    return RegistryOptions(insecure=frozenset({registry.host}), backoff=0.01)


def _push_image(registry: Registry, tmp_path: Path, name: str) -> str:
    image = build_image(
        ImageSpec(
            layers=({"big": os.urandom(4 << 20)}, {"etc/app": name.encode()}),
            compression="gzip",
            architecture="arm64",
            variant="v8",
            names=("1",),
        )
    )
    layout = build_oci_layout(tmp_path / f"layout-{name.replace('/', '-')}", [image])
    push(registry, f"oci:{layout.path}:1", f"{name}:1")
    return registry.reference(f"{name}:1")


def _big_layer(registry: Registry, reference: str, tmp_path: Path) -> str:
    """The digest of the image's biggest layer, learnt by pulling it into a scratch home."""
    with ImageCache(tmp_path / "probe") as probe:
        layers = probe.pull(reference, options=_options(registry)).inspect().layers
    biggest = max(layers, key=lambda layer: layer.compressed_size_bytes or 0)
    return str(biggest.blob_digest)


def test_pull_gives_the_image_its_own_platform_and_a_cached_repull_downloads_nothing(
    flaky_registry: FlakyRegistry, tmp_path: Path
) -> None:
    registry = flaky_registry.registry
    reference = _push_image(registry, tmp_path, "team/app")
    with ImageCache(tmp_path / "home") as cache:
        handle = cache.pull(reference, options=_options(registry))
        assert handle.reference == reference
        assert (handle.os, handle.architecture) == ("linux", "arm64")  # not this host's
        detail = handle.inspect()
        for layer in detail.layers:
            assert internals(cache).store.verify(layer.blob_digest)
        blob_gets = flaky_registry.count("/v2/team/app/blobs/", "GET")
        again = cache.pull(reference, options=_options(registry))
        assert flaky_registry.count("/v2/team/app/blobs/", "GET") == blob_gets
        assert again.created_at == handle.created_at
        assert again.last_used_at is not None and handle.last_used_at is not None
        assert again.last_used_at >= handle.last_used_at
        events = [e.event for e in cache.history(reference)]
        assert events == ["ImagePulled", "ImagePulled"]
        assert "(all cached)" in cache.history(reference)[1].detail


def test_a_missing_image_is_not_found_and_recorded(registry: Registry, tmp_path: Path) -> None:
    with ImageCache(tmp_path / "home") as cache:
        with pytest.raises(ImageNotFoundError, match="nothere"):
            cache.pull(registry.reference("nothere:1"), options=_options(registry))
        [failure] = cache.history(registry.reference("nothere:1"))
        assert failure.event == "PullFailed"
        assert cache.list() == []


def test_a_tampered_blob_is_refused_and_nothing_lands(
    flaky_registry: FlakyRegistry, tmp_path: Path
) -> None:
    registry = flaky_registry.registry
    reference = _push_image(registry, tmp_path, "team/tampered")
    big = _big_layer(registry, reference, tmp_path)
    flaky_registry.corrupt_blob(big, offset=1000)
    with ImageCache(tmp_path / "home") as cache:
        with pytest.raises(DigestMismatchError):
            cache.pull(reference, options=_options(registry))
        assert not internals(cache).store.has(big)
        assert cache.list() == []
        assert [e.event for e in cache.history(reference)] == ["PullFailed"]


def _prune_in_child(home: Path) -> dict[str, object]:
    code = (
        "import json, sys\n"
        "from imageledger import ImageCache\n"
        "with ImageCache(sys.argv[1]) as c:\n"
        "    r = c.prune()\n"
        "print(json.dumps({'refs': r.image_refs_removed}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(home)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_prune_in_another_process_while_a_pull_is_in_flight_deletes_nothing_it_needs(
    flaky_registry: FlakyRegistry, tmp_path: Path
) -> None:
    """The microsandbox bug this project exists to fix: a prune deleting a just-pulled image."""
    registry = flaky_registry.registry
    reference = _push_image(registry, tmp_path, "team/inflight")
    big = _big_layer(registry, reference, tmp_path)
    home = tmp_path / "home"
    stall = flaky_registry.stall_blob(big, after=1 << 20)
    outcome: list[BaseException | None] = []

    def pull() -> None:
        try:
            with ImageCache(home) as cache:
                cache.pull(reference, options=_options(registry))
        except BaseException as e:
            outcome.append(e)
        else:
            outcome.append(None)

    puller = threading.Thread(target=pull)
    puller.start()
    stall.wait_reached(TIMEOUT)  # config and the small layer are in; the big one is half way
    pruned = _prune_in_child(home)
    stall.release()
    puller.join(TIMEOUT)
    assert outcome == [None], outcome
    assert pruned["refs"] == 0
    with ImageCache(home) as cache:
        handle = cache.get(reference)
        for layer in handle.inspect().layers:
            assert internals(cache).store.verify(layer.blob_digest)
        assert cache.rebuild(verify=True).identical


def test_a_crashed_pull_leaves_partials_the_next_prune_reclaims(
    flaky_registry: FlakyRegistry, tmp_path: Path
) -> None:
    registry = flaky_registry.registry
    reference = _push_image(registry, tmp_path, "team/crash")
    big = _big_layer(registry, reference, tmp_path)
    home = tmp_path / "home"
    stall = flaky_registry.stall_blob(big, after=2 << 20)  # past a gathered write
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "imageledger.tools.cli",
            "--home",
            str(home),
            "pull",
            reference,
            "--insecure-registry",
            registry.host,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        stall.wait_reached(TIMEOUT)
        # The writer gathers up to `WRITE_SIZE` in memory before it writes: kill the pull
        # once what it received is on the disk, as a pull killed mid-download leaves it.
        deadline = time.monotonic() + TIMEOUT
        while not any(p.stat().st_size > 0 for p in (home / "tmp").rglob("*.part") if p.is_file()):
            assert time.monotonic() < deadline, "the pull wrote nothing of the big layer"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait(TIMEOUT)
    finally:
        stall.release()
        if child.poll() is None:
            child.kill()
    tmp = home / "tmp"
    assert any(p.name.endswith(".part") for p in tmp.rglob("*")), "no partial download to reclaim"
    with ImageCache(home) as cache:
        assert cache.list() == []
        report = cache.prune()
        assert report.bytes_reclaimed > 0
        assert list(internals(cache).store.digests()) == []
        assert not any(p.is_file() for p in tmp.rglob("*") if p.parent.name != "locks")
        handle = cache.pull(reference, options=_options(registry))
        for layer in handle.inspect().layers:
            assert internals(cache).store.verify(layer.blob_digest)


def _kill_a_pull_midway(
    flaky_registry: FlakyRegistry, reference: str, big: str, home: Path
) -> list[Path]:
    """Run ``imageledger pull`` in a child, SIGKILL it once `big` is 1 MiB in; the partial
    files it left."""
    registry = flaky_registry.registry
    already = flaky_registry.count_blob(big)
    stall = flaky_registry.stall_blob(big, after=1 << 20)
    child = subprocess.Popen(
        [*CLI, "--home", str(home), "pull", reference, "--insecure-registry", registry.host],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        stall.wait_reached(TIMEOUT)
        time.sleep(0.2)  # the client has written what it received
        child.send_signal(signal.SIGKILL)
        child.wait(TIMEOUT)
    finally:
        stall.release()
        if child.poll() is None:
            child.kill()
    deadline = time.monotonic() + TIMEOUT  # the proxy records a request when it is over
    while flaky_registry.count_blob(big) <= already and time.monotonic() < deadline:
        time.sleep(0.02)
    return [p for p in (home / "tmp").rglob("*.part") if p.name.startswith(big.split(":")[1])]


@pytest.mark.parametrize("damaged", [False, True])
def test_the_pull_after_a_killed_one_resumes_the_layer_it_left(
    flaky_registry: FlakyRegistry, tmp_path: Path, damaged: bool
) -> None:
    registry = flaky_registry.registry
    reference = _push_image(registry, tmp_path, "team/resume")
    big = _big_layer(registry, reference, tmp_path)
    home = tmp_path / "home"
    [partial] = _kill_a_pull_midway(flaky_registry, reference, big, home)
    left = partial.stat().st_size
    assert 0 < left <= 1 << 20
    if damaged:  # the dead pull's bytes are wrong: found at commit, downloaded again whole
        with partial.open("r+b") as f:
            f.write(b"\0" * 100)
    before = len(flaky_registry.requests)
    with ImageCache(home) as cache:
        handle = cache.pull(reference, options=_options(registry))
        for layer in handle.inspect().layers:
            assert internals(cache).store.verify(layer.blob_digest)
    fetches = [
        r
        for r in flaky_registry.requests[before:]
        if r.method == "GET" and r.path.endswith(f"/blobs/{big}")
    ]
    expected = [f"bytes={left}-", None] if damaged else [f"bytes={left}-"]
    assert [r.header("Range") for r in fetches] == expected
    assert partial.exists()  # copied, not taken: the dead lease's files are prune's


def test_cli_pull_json_and_exit_codes(registry: Registry, tmp_path: Path) -> None:
    reference = _push_image(registry, tmp_path, "cli/app")
    home = tmp_path / "home"
    base = [sys.executable, "-m", "imageledger.tools.cli", "--home", str(home)]
    env = {**os.environ, "IMAGELEDGER_INSECURE_REGISTRIES": registry.host}
    done = subprocess.run(
        [*base, "pull", reference, "--json"],
        capture_output=True,
        env=env,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    handle = json.loads(done.stdout)
    assert handle["reference"] == reference and handle["architecture"] == "arm64"
    missing = subprocess.run(
        [*base, "pull", registry.reference("cli/none:1"), "--json"],
        capture_output=True,
        env=env,
        timeout=TIMEOUT,
        check=False,
    )
    assert missing.returncode == 3 and missing.stdout == b""
    assert len(missing.stderr.decode().strip().splitlines()) == 1
    bad = subprocess.run(
        [*base, "pull", "Bad/Ref"], capture_output=True, timeout=TIMEOUT, check=False
    )
    assert bad.returncode == 2


def test_a_pull_onto_a_full_disk_fails_cleanly_and_prune_gives_the_space_back(
    registry: Registry, small_disk: Path, tmp_path: Path
) -> None:
    reference = _push_image(registry, tmp_path, "team/toobig")  # a 4 MiB layer, 4 MiB disk
    with ImageCache(small_disk / "home") as cache:
        free = shutil.disk_usage(small_disk).free
        with pytest.raises(DiskFullError, match="device is full"):
            cache.pull(reference, options=_options(registry))
        assert cache.list() == []
        [failure] = cache.history(reference)
        assert failure.event == "PullFailed" and "device is full" in failure.detail
        # What the pull had written (kept for a resume while it could still be one) goes with
        # the next prune: the disk is as free as before the pull, give or take the ledger.
        cache.prune()
        assert shutil.disk_usage(small_disk).free >= free - (64 << 10)


def test_pulls_of_one_cache_share_connections_and_tokens_until_the_environment_changes(
    registry_token: TokenRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, tokens = registry_token.registry, registry_token.tokens
    assert registry.username is not None and registry.password is not None
    reference = _push_image(registry, tmp_path, "team/shared")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    monkeypatch.setenv("IMAGELEDGER_INSECURE_REGISTRIES", ",".join(registry_token.insecure))
    monkeypatch.setenv("IMAGELEDGER_REGISTRY_HOST", registry.host)
    monkeypatch.setenv("IMAGELEDGER_REGISTRY_USER", registry.username)
    monkeypatch.setenv("IMAGELEDGER_REGISTRY_PASSWORD", registry.password)
    before = len(tokens.requests)
    with ImageCache(tmp_path / "home") as cache:
        first = cache.pull(reference)
        again = cache.pull(reference)  # the tag is resolved again, with the token held
        assert again.manifest_digest == first.manifest_digest
        assert len(tokens.requests) == before + 1
        # The environment changes (another password): the next pull builds a new client,
        # which has to ask for a token again, and is refused.
        monkeypatch.setenv("IMAGELEDGER_REGISTRY_PASSWORD", "not-the-password")
        with pytest.raises(RegistryAuthError):
            cache.pull(reference)
        assert len(tokens.requests) > before + 1
        # Explicit options: one client while the same options are passed.
        options = RegistryOptions(
            insecure=registry_token.insecure,
            credentials=lambda host: (registry.username or "", registry.password or ""),
        )
        asked = len(tokens.requests)
        cache.pull(reference, options=options)
        cache.pull(reference, options=options)
        assert len(tokens.requests) == asked + 1
