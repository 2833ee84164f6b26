"""Real crashes (semantics 11): a child process runs a load, a remove or a prune on a cache
home and is killed with SIGKILL, at points it announces (``--pause``: the child waits there,
inside the real code path, until it is killed) and at small random delays after progress
markers. After every kill the parent checks, on the home the dead child left:

- it opens, and ``rebuild(verify=True)`` finds the views identical to the log;
- no blob the ledger needs is missing (every handle's manifest, config and layers are in
  ``blobs/`` with the recorded size and hash right);
- after a default ``prune()`` (the cached images leased first, so that it keeps them), no
  orphan is left: every file under ``blobs/`` is a blob of a cached image, ``tmp/`` holds only
  the (empty of lease files) leases dir;
- loading the same archive again works and gives a complete image.

The images are real (`imageledger.tools.imagebuild`), with uncompressed layers of a few MiB of
random bytes, so that a kill can land in the middle of a blob being written. ``test/base`` is
cached (and leased) in every home and shares its bottom layer with ``test/app``, the image the
children load and remove: a crash must never cost the survivor its shared layer.
"""

from __future__ import annotations

import hashlib
import random
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from imageledger import ImageCache
from imageledger.cache import internals
from imageledger.tools.imagebuild import (
    BuiltImage,
    ImageSpec,
    build_docker_archive,
    build_image,
    build_oci_archive,
)

if TYPE_CHECKING:
    from tests import _cache_child_ops as cc
else:
    import _cache_child_ops as cc

pytestmark = pytest.mark.slow

MIB = 1 << 20
TIMEOUT = 30.0  # for waiting only: nothing asserts how long anything took
BASE_REF = "docker.io/test/base:1"
APP_REF = "docker.io/test/app:1"
MANY_REF = "docker.io/test/many:1"
BASE_HOLDER = "base-holder"


@dataclass(frozen=True)
class Images:
    base: BuiltImage
    app: BuiltImage
    many: BuiltImage
    base_tar: Path
    app_tar: Path  # OCI archive
    app_docker: Path  # legacy docker save
    many_tar: Path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    rng = random.Random(11)
    where = tmp_path_factory.mktemp("images")
    shared = rng.randbytes(3 * MIB)
    base = build_image(
        ImageSpec(
            layers=({"base/shared": shared}, {"base/own": rng.randbytes(64 << 10)}),
            compression="none",
            names=("test/base:1",),
        )
    )
    app = build_image(
        ImageSpec(
            layers=(
                {"base/shared": shared},
                {"app/one": rng.randbytes(3 * MIB)},
                {"app/two": rng.randbytes(3 * MIB)},
            ),
            compression="none",
            names=("test/app:1",),
        )
    )
    many = build_image(
        ImageSpec(
            layers=tuple({f"many/{i}": rng.randbytes(4096)} for i in range(150)),
            compression="none",
            names=("test/many:1",),
        )
    )
    assert base.layers[0].digest == app.layers[0].digest
    build_oci_archive(where / "base.tar", [base])
    build_oci_archive(where / "app.tar", [app])
    build_docker_archive(where / "app-docker.tar", [app])
    build_oci_archive(where / "many.tar", [many])
    return Images(
        base,
        app,
        many,
        where / "base.tar",
        where / "app.tar",
        where / "app-docker.tar",
        where / "many.tar",
    )


@pytest.fixture
def home(tmp_path: Path, images: Images) -> Path:
    """A home where ``test/base`` is cached and leased (so every prune keeps it)."""
    home = tmp_path / "home"
    with ImageCache(home) as cache:
        cache.load(images.base_tar)
        cache.use(BASE_REF, BASE_HOLDER)
    return home


Spawn = Callable[..., Any]


def member_span(archive: Path, digest: str) -> tuple[int, int]:
    """Where blob `digest`'s bytes are in the (uncompressed) archive: (start, end)."""
    with tarfile.open(archive) as tar:
        member = tar.getmember("blobs/sha256/" + digest.partition(":")[2])
        return member.offset_data, member.offset_data + member.size


def wait_for(what: str, condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def recover_and_check(home: Path, images: Images, *, expect_app: bool | None = None) -> Any:
    """The checks after a crash (see the module docstring); then ``test/app`` is loaded
    afresh, checked, and the home is reset to ``test/base`` only. Returns the prune report."""
    references = cc.assert_consistent(home)
    assert BASE_REF in references, "the surviving image was lost"
    if expect_app is not None:
        assert (APP_REF in references) == expect_app, references
    report = cc.prune_and_assert_no_orphan(home)
    with ImageCache(home) as cache:
        cache.release(cc.KEEPER)
        handles = cache.load(images.app_tar)
        assert [h.reference for h in handles] == [APP_REF]
        cc.assert_complete(cache, APP_REF)
        cc.assert_complete(cache, BASE_REF)
        assert cache.get(APP_REF).manifest_digest == images.app.manifest_digest
        cache.remove(APP_REF)
        assert internals(cache).store.has(images.base.layers[0].digest)
    return report


# ------------------------------------------------------------------ loads


def test_kill_while_blobs_are_written(home: Path, images: Images, cache_spawn: Spawn) -> None:
    """A load reading the archive from a pipe is killed while it is writing a layer blob (the
    parent fed it up to a random point inside that layer and saw the partial file), after a
    small random delay. Six kills, at different layers and depths: the dead load's partial
    file and whatever blobs it finished are reclaimed by the next prune, the shared layer the
    cached image needs survives, and the archive loads afterwards."""
    rng = random.Random(1)
    data = images.app_tar.read_bytes()
    own = [layer.digest for layer in images.app.layers[1:]]
    for attempt in range(6):
        digest = own[attempt % 2]
        start, end = member_span(images.app_tar, digest)
        cut = start + int((end - start) * rng.uniform(0.1, 0.9))
        child = cache_spawn("load-stream", home)
        child.expect("ready")
        child.feed(data[:cut])
        wait_for("a partial blob", lambda: bool(cc.partial_files(home)))
        time.sleep(rng.uniform(0, 0.005))
        child.kill()
        assert cc.partial_files(home), "the kill did not land mid-write"
        assert any(p.suffix == ".lease" for p in cc.lease_files(home))
        report = recover_and_check(home, images, expect_app=False)
        kinds = {blob.kind for blob in report.deleted}
        assert "partial" in kinds, report


def test_crashed_loader_lease_does_not_block_prune(
    home: Path, images: Images, cache_spawn: Spawn
) -> None:
    """While a load is alive (blocked mid-layer) its lease protects what it wrote: a prune
    deletes neither its finished blob nor its partial file. Once it is SIGKILLed, its lease
    is stale at once (the flock died with it): the next prune returns, removes the lease,
    reclaims the partial file and the blob no committed image uses, and counts them."""
    data = images.app_tar.read_bytes()
    first, second = sorted(
        images.app.layers[1:], key=lambda layer: member_span(images.app_tar, layer.digest)
    )
    start, end = member_span(images.app_tar, second.digest)
    child = cache_spawn("load-stream", home)
    child.expect("ready")
    child.feed(data[: (start + end) // 2])
    wait_for("a partial blob", lambda: bool(cc.partial_files(home)))

    with ImageCache(home) as cache:
        assert internals(cache).store.has(first.digest), "the first own layer should be written"
        alive = cache.prune()
        assert not any(b.digest == first.digest or b.kind == "partial" for b in alive.deleted), (
            alive
        )
        assert internals(cache).store.has(first.digest)
        assert cc.partial_files(home)

    child.kill()
    assert [p.suffix for p in cc.lease_files(home)] == [".lease"]

    pruned: list[Any] = []
    with ImageCache(home) as cache:
        worker = threading.Thread(target=lambda: pruned.append(cache.prune()))
        worker.start()
        worker.join(TIMEOUT)
        assert not worker.is_alive(), "prune blocked on a dead loader's lease"
        report = pruned[0]
        deleted = {b.digest: b for b in report.deleted}
        assert deleted[first.digest].kind == "orphan"
        partials = [b for b in report.deleted if b.kind == "partial"]
        assert len(partials) == 1 and partials[0].digest.startswith("tmp/"), report
        assert report.bytes_reclaimed >= first.size
        assert not internals(cache).store.has(first.digest)
        assert not cc.partial_files(home)
        assert not cc.lease_files(home)
    recover_and_check(home, images, expect_app=False)


def test_kill_around_the_commit(home: Path, images: Images, cache_spawn: Spawn) -> None:
    """A load (from a file) is killed with every blob written but its event not committed,
    then with its event committed but its lease and work dir not yet cleaned up (both at
    pause points inside the real code path), then 8 times at random 0-4 ms after it enters
    the commit, then 4 times at random moments of the whole load. Either outcome is
    allowed by a random kill; each home must recover."""
    rng = random.Random(2)
    archive = str(images.app_tar)

    child = cache_spawn("load", home, "--archive", archive, "--pause", "before-add")
    child.expect("paused")
    child.kill()
    recover_and_check(home, images, expect_app=False)

    child = cache_spawn("load", home, "--archive", archive, "--pause", "after-add")
    child.expect("paused")
    child.kill()
    assert [p.suffix for p in cc.lease_files(home)] == [".lease"]
    recover_and_check(home, images, expect_app=True)

    landed = []
    for _ in range(8):
        child = cache_spawn("load", home, "--archive", archive)
        child.expect("add")
        time.sleep(rng.uniform(0, 0.004))
        child.kill()
        with ImageCache(home) as cache:
            committed = any(h.reference == APP_REF for h in cache.list())
        landed.append(f"{child.landed}:{'committed' if committed else 'not committed'}")
        recover_and_check(home, images)

    started = time.monotonic()
    with ImageCache(home) as cache:
        cache.load(images.app_tar)
        cache.remove(APP_REF)
    duration = time.monotonic() - started
    for _ in range(4):
        child = cache_spawn("load", home, "--archive", archive)
        child.expect("load-start")
        time.sleep(rng.uniform(0, duration))
        child.kill()
        landed.append(child.landed)
        recover_and_check(home, images)
    print("random kills landed:", landed)


def test_kill_loading_a_docker_archive(home: Path, images: Images, cache_spawn: Spawn) -> None:
    """The legacy ``docker save`` path spools layer files under the lease's work dir before it
    stores them: kills at random moments of that load (5 times) leave spools and blobs that
    the next prune reclaims."""
    rng = random.Random(3)
    started = time.monotonic()
    with ImageCache(home) as cache:
        cache.load(images.app_docker)
        cache.remove(APP_REF)
    duration = time.monotonic() - started
    landed = []
    for _ in range(5):
        child = cache_spawn("load", home, "--archive", str(images.app_docker))
        child.expect("load-start")
        time.sleep(rng.uniform(0, duration))
        child.kill()
        landed.append(child.landed + (" (spools left)" if cc.partial_files(home) else ""))
        recover_and_check(home, images)
    print("random kills landed:", landed)


def test_kill_while_the_lease_is_created(home: Path, images: Images, cache_spawn: Spawn) -> None:
    """A load killed while its in-flight lease is being created (locked under its temporary
    name, not yet renamed): the next prune must leave no lease file of any kind."""
    child = cache_spawn("load", home, "--archive", str(images.app_tar), "--pause", "lease-rename")
    child.expect("paused")
    child.kill()
    cc.assert_consistent(home)
    cc.prune_and_assert_no_orphan(home)
    leftovers = cc.lease_files(home)
    assert not leftovers, f"lease files left after prune: {leftovers}"


def test_kill_while_index_json_is_written(home: Path, images: Images, cache_spawn: Spawn) -> None:
    """A load killed after its commit, while index.json is being rewritten (written to its
    temporary file, not renamed): the next open and prune must leave no temporary behind."""
    child = cache_spawn("load", home, "--archive", str(images.app_tar), "--pause", "index-rename")
    child.expect("paused")
    child.kill()
    assert APP_REF in cc.assert_consistent(home), "the load committed before the index"
    cc.prune_and_assert_no_orphan(home)
    leftovers = sorted(p.name for p in home.iterdir() if p.name.endswith(".tmp"))
    assert not leftovers, f"temporary files left in the home: {leftovers}"


def test_layer_protected_by_a_load_that_then_crashes_is_reclaimed(
    tmp_path: Path, images: Images, cache_spawn: Spawn
) -> None:
    """``test/base`` is removed while a load of ``test/app`` (sharing its bottom layer) is in
    flight and has claimed that layer, so the remove keeps it; then the load is killed.
    With no image left, the next prune must leave ``blobs/`` empty."""
    home = tmp_path / "home"
    with ImageCache(home) as cache:
        cache.load(images.base_tar)
    shared = images.base.layers[0].digest
    data = images.app_tar.read_bytes()
    with tarfile.open(images.app_tar) as tar:
        cut = tar.getmember("index.json").offset  # every blob, but not the index
    child = cache_spawn("load-stream", home)
    child.expect("ready")
    child.feed(data[:cut])
    lease = home / "tmp" / "leases"
    wait_for(
        "the load to claim the shared layer",
        lambda: any(shared in p.read_text() for p in lease.glob("*.lease")),
    )
    with ImageCache(home) as cache:
        cache.remove(BASE_REF)
        assert internals(cache).store.has(shared), "a layer an in-flight load claimed was deleted"
    child.kill()
    assert cc.assert_consistent(home) == []
    with ImageCache(home) as cache:
        cache.prune()
    leftover = cc.blob_files(home)
    assert leftover == set(), f"{leftover} survived prune (the shared layer is {shared})"


# ------------------------------------------------------------------ removes


def test_kill_during_remove(home: Path, images: Images, cache_spawn: Spawn) -> None:
    """``remove(test/app)`` killed right after its event commits (nothing unlinked yet), after
    its first and second unlink, and 6 times at random 0-10 ms after it starts. The removed
    image's blobs left on disk are orphans the next prune reclaims; the shared layer of
    ``test/base`` is never among what goes."""
    rng = random.Random(4)
    points = [
        ("after-commit:ImageRemoved", 1, True),
        ("after-unlink", 1, True),
        ("after-unlink", 2, True),
    ] + [(None, 0, False)] * 6
    landed: list[str] = []
    for point, n, committed in points:
        with ImageCache(home) as cache:
            cache.load(images.app_tar)
        args = ["--reference", APP_REF]
        if point is not None:
            args += ["--pause", point, "--pause-at", str(n)]
        child = cache_spawn("remove", home, *args)
        if point is not None:
            child.expect("paused")
        else:
            child.expect("remove-start")
            time.sleep(rng.uniform(0, 0.01))
        child.kill()
        if point is None:
            landed.append(child.landed)
        report = recover_and_check(home, images, expect_app=None if not committed else False)
        if point == "after-commit:ImageRemoved":
            orphans = {b.digest for b in report.deleted if b.kind == "orphan"}
            own = {layer.digest for layer in images.app.layers[1:]}
            assert own <= orphans, report
    print("random kills landed:", landed)


# ------------------------------------------------------------------ prunes


def plant_orphans(home: Path, rng: random.Random, count: int) -> None:
    """Blob files the ledger does not account for (real digests, random content)."""
    directory = home / "blobs" / "sha256"
    directory.mkdir(parents=True, exist_ok=True)
    for _ in range(count):
        data = rng.randbytes(rng.randrange(256, 4096))
        (directory / hashlib.sha256(data).hexdigest()).write_bytes(data)


def test_kill_during_prune(home: Path, images: Images, cache_spawn: Spawn) -> None:
    """A prune with ~450 files to unlink (an unreferenced 150-layer image and 300 orphan
    blobs) is killed while it lists the store (store lock held, nothing decided), right after
    its event commits, after a random number of unlinks, and 4 times at random moments:
    the next prune finishes the job, ``test/base`` is intact, and the 150-layer image loads
    again (and stays, unleased, for the next round's prune)."""
    rng = random.Random(5)
    with ImageCache(home) as cache:
        cache.load(images.many_tar)
    plant_orphans(home, rng, 300)
    with ImageCache(home) as cache:
        started = time.monotonic()
        cache.prune()
        duration = time.monotonic() - started
        cache.load(images.many_tar)
    points: list[tuple[str | None, int]] = [
        ("listed", 1),
        ("after-commit:ImagesPruned", 1),
        ("after-unlink", rng.randrange(2, 150)),
        ("after-unlink", rng.randrange(150, 440)),
        *[(None, 0)] * 4,
    ]
    landed: list[str] = []
    for point, n in points:
        plant_orphans(home, rng, 300)
        before = len(cc.blob_files(home))
        args = [] if point is None else ["--pause", point, "--pause-at", str(n)]
        child = cache_spawn("prune", home, *args)
        if point is not None:
            child.expect("paused")
        else:
            child.expect("prune-start")
            time.sleep(rng.uniform(0, duration))
        child.kill()
        if point is None:
            landed.append(f"{child.landed}, {before - len(cc.blob_files(home))} unlinked")
        if point == "after-unlink":
            assert 0 < before - len(cc.blob_files(home)) < before
        references = cc.assert_consistent(home)
        assert BASE_REF in references
        cc.prune_and_assert_no_orphan(home)
        with ImageCache(home) as cache:
            cache.release(cc.KEEPER)
            cache.load(images.many_tar)
            cc.assert_complete(cache, MANY_REF)
            cc.assert_complete(cache, BASE_REF)
    print("random kills landed:", landed)
    with ImageCache(home) as cache:
        cache.remove(MANY_REF)
    recover_and_check(home, images, expect_app=False)
