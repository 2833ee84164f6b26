"""Real concurrency on one cache home: several processes (fresh interpreters running
`tests/_cache_child_ops.py`) and several threads of one process load, use, release, remove
and prune at once. Every loop is bounded in count and time. What must hold:

- a load that returned has its image cached and complete, even with prune running in a
  tight loop (the "prune deletes a just-pulled image" bug);
- content is never deleted while a lease on its manifest is held, and a remove is refused
  only while one is (checked on the ledger's own history afterwards);
- no process or thread ever gets an error other than `ImageInUseError` /
  `ImageNotFoundError`, forced removes included;
- ``list()`` is always newest first, a ``use()`` in one process is seen by a ``get()`` in
  another as soon as it returned;
- afterwards the views rebuild identical, no blob a cached image needs is missing, and a
  prune leaves no orphan.
"""

from __future__ import annotations

import random
import subprocess
import sys
import tarfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from imageledger import ImageCache, ImageInUseError, ImageNotFoundError
from imageledger.cache import internals
from imageledger.domain.events import ImageLedger
from imageledger.tools.bench_cache import append_mixed_events
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
TIMEOUT = 60.0  # for waiting only: nothing asserts how long anything took
LOADERS = 3
LOADS_PER_LOADER = 10


def ref(name: str) -> str:
    return f"docker.io/test/{name}:1"


@dataclass(frozen=True)
class Built:
    name: str
    image: BuiltImage
    archive: Path

    @property
    def reference(self) -> str:
        return ref(self.name)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    """Real images with uncompressed random layers: p0-p2 and garbage share a 2 MiB layer;
    q1/q2 share one too; the rest stand alone. Each comes as an OCI archive (``docker`` also
    as a legacy ``docker save``)."""
    rng = random.Random(21)
    where = tmp_path_factory.mktemp("images")
    shared_p = rng.randbytes(2 * MIB)
    shared_q = rng.randbytes(MIB)
    layers: dict[str, tuple[dict[str, bytes], ...]] = {
        **{
            f"p{i}": ({"shared": shared_p}, {f"p{i}": rng.randbytes(2 * MIB)})
            for i in range(LOADERS)
        },
        "garbage": ({"shared": shared_p}, {"garbage": rng.randbytes(MIB)}),
        "q1": ({"shared": shared_q}, {"q1": rng.randbytes(MIB)}),
        "q2": ({"shared": shared_q}, {"q2": rng.randbytes(MIB)}),
        "used": ({"u": rng.randbytes(MIB)}, {"u2": rng.randbytes(256 << 10)}),
        "forced": ({"f": rng.randbytes(MIB)},),
        "stable": ({"s": rng.randbytes(64 << 10)},),
        "m1": ({"m1": rng.randbytes(512 << 10)},),
        "m2": ({"m2": rng.randbytes(512 << 10)},),
        "docker": ({"d1": rng.randbytes(MIB)}, {"d2": rng.randbytes(MIB)}),
    }
    built: dict[str, Built] = {}
    for name, files in layers.items():
        image = build_image(ImageSpec(layers=files, compression="none", names=(f"test/{name}:1",)))
        archive = where / f"{name}.tar"
        build_oci_archive(archive, [image])
        built[name] = Built(name, image, archive)
    build_docker_archive(where / "docker-legacy.tar", [built["docker"].image])
    return built


Spawn = Callable[..., Any]


def start_together(children: list[Any]) -> None:
    """Every child has its cache open before any of them starts its loop."""
    for child in children:
        child.expect("ready")
    for child in children:
        child.send("go")


def no_internal_errors(done: dict[str, Any], who: str) -> None:
    assert done["internal"] == [], f"{who}: internal errors:\n" + "\n".join(done["internal"])


def assert_leases_respected(cache: ImageCache, reference: str) -> dict[str, int]:
    """Replay `reference`'s history (and every prune report) in ledger order, tracking the
    holders of each manifest: content is never deleted while its manifest has a holder, a
    non-forced remove of the (only) reference happens only without holders, a refusal only
    with holders; the holders at the end are the views'. Returns counts by event."""
    holders: dict[str, set[str]] = defaultdict(set)
    counts: dict[str, int] = defaultdict(int)
    ledger = internals(cache).ledger
    prunes = [
        (position, event)
        for position, event in ledger.events(None)
        if isinstance(event, ImageLedger.ImagesPruned)
    ]
    timeline: list[tuple[int, str, Any]] = [
        (e.position, "history", e) for e in cache.history(reference)
    ]
    timeline += [(position, "prune", event) for position, event in prunes]
    for position, what, item in sorted(timeline, key=lambda t: (t[0], t[1])):
        if what == "prune":
            for deleted in item.deleted:
                if deleted.kind == "manifest":
                    digest = deleted.digest
                    assert not holders[digest], (
                        f"prune at {position} deleted {digest} held by {holders[digest]}"
                    )
            continue
        entry = item
        counts[entry.event] += 1
        manifest = entry.manifest_digest
        if entry.event == "ImageUsed":
            holders[manifest].add(entry.detail.removeprefix("by "))
        elif entry.event == "HolderReleased":
            holders[manifest].discard(entry.detail.removeprefix("by "))
        elif entry.event == "ImageRemoved":
            deleted = "deleted " in entry.detail
            forced = entry.detail.startswith("forced")
            if deleted:
                counts["ImageRemoved+content"] += 1
                assert not holders[manifest], (
                    f"remove at {position} deleted {manifest} held by {holders[manifest]}"
                )
            if not forced:
                assert not holders[manifest], (
                    f"non-forced remove at {position} while {holders[manifest]} held it"
                )
        elif entry.event == "RemoveRefused":
            assert holders[manifest], f"remove refused at {position} with no holder"
        elif entry.event == "ImagesPruned":
            assert not holders[manifest], f"prune at {position} removed a leased reference"
    with ledger.snapshot() as state:
        for digest, held in holders.items():
            record = state.manifest(digest)
            assert set(record.holders if record is not None else ()) == held, digest
    return dict(counts)


def loaded_positions(cache: ImageCache, reference: str) -> int:
    return sum(1 for e in cache.history(reference) if e.event == "ImagePulled")


# ------------------------------------------------------------------ loads vs prune


def test_loads_in_three_processes_while_another_prunes_in_a_tight_loop(
    tmp_path: Path, images: dict[str, Built], cache_spawn: Spawn
) -> None:
    """Three processes each load their own image (all three share a 2 MiB layer) ten times,
    checking it complete right after every load and removing it between loads, while a
    fourth process prunes in a tight loop and a fifth loads ``garbage`` (which shares that
    layer too) over and over for the pruner to collect. The pruner keeps the three
    references (else it could legitimately remove an image its loader is about to check),
    so what it deletes is ``garbage``, its content, and anything not accounted for: the
    shared layer and the blobs of loads still in flight must survive it. Every load
    succeeds and finds its image whole; at the end the three are cached and complete, the
    ledger rebuilds identical, nothing is orphaned."""
    home = tmp_path / "home"
    ImageCache(home).close()
    names = [f"p{i}" for i in range(LOADERS)]
    loaders = [
        cache_spawn(
            "load-remove-loop",
            home,
            "--archive",
            str(images[name].archive),
            "--reference",
            ref(name),
            "--count",
            str(LOADS_PER_LOADER),
        )
        for name in names
    ]
    pruner = cache_spawn("prune-loop", home, "--keep", "docker.io/test/p*", "--seconds", "40")
    start_together([*loaders, pruner])
    garbage = cache_spawn(
        "load", home, "--archive", str(images["garbage"].archive), "--count", "15"
    )
    results = [loader.expect("done") for loader in loaders]
    garbage.expect("done")
    assert garbage.wait() == 0
    pruner.send("stop")
    pruned = pruner.expect("done")
    no_internal_errors(pruned, "pruner")
    assert pruned["ok"].get("prune", 0) >= 5, pruned
    assert pruned["bytes_reclaimed"] > 0, "the pruner never collected anything"
    print("prunes during the loads:", pruned["ok"], "bytes reclaimed:", pruned["bytes_reclaimed"])
    for name, done in zip(names, results, strict=True):
        no_internal_errors(done, name)
        assert done["problems"] == [], done["problems"]
        assert done["ok"] == {"load": LOADS_PER_LOADER, "remove": LOADS_PER_LOADER - 1}, done

    cached = set(cc.assert_consistent(home)) - {ref("garbage")}
    assert cached == {ref(name) for name in names}
    with ImageCache(home) as cache:
        for name in names:
            cc.assert_complete(cache, ref(name))
            assert cache.get(ref(name)).manifest_digest == images[name].image.manifest_digest
            assert loaded_positions(cache, ref(name)) == LOADS_PER_LOADER
    cc.prune_and_assert_no_orphan(home)


def test_a_failed_load_keeps_a_layer_another_load_committed(
    tmp_path: Path, images: dict[str, Built], cache_spawn: Spawn
) -> None:
    """A load (child, archive q1 fed through a pipe) writes every blob, including the layer
    it shares with q2, and waits for the rest of the archive; meanwhile q2 is loaded (it
    finds the shared layer on disk) and committed. Then the first load fails (its archive
    ends before index.json). q2 must still be complete."""
    home = tmp_path / "home"
    ImageCache(home).close()
    q1, q2 = images["q1"], images["q2"]
    shared = q1.image.layers[0].digest
    assert q2.image.layers[0].digest == shared
    with tarfile.open(q1.archive) as tar:
        cut = tar.getmember("index.json").offset
    child = cache_spawn("load-stream", home)
    child.expect("ready")
    child.feed(q1.archive.read_bytes()[:cut])
    path = home / "blobs" / "sha256" / shared.partition(":")[2]
    end = time.monotonic() + TIMEOUT
    while not path.exists():
        assert time.monotonic() < end, "the first load never wrote the shared layer"
        time.sleep(0.005)
    with ImageCache(home) as cache:
        cache.load(q2.archive)
        cc.assert_complete(cache, q2.reference)
    child.close_stdin()
    failed = child.expect("error")
    assert failed["type"] == "ArchiveError", failed
    child.wait()
    assert path.exists(), "the failed load's cleanup deleted the layer q2 needs"
    assert cc.assert_consistent(home) == [q2.reference]


def test_prune_spares_the_work_dir_of_a_load_that_starts_during_it(
    tmp_path: Path, images: dict[str, Built], cache_spawn: Spawn
) -> None:
    """A prune (child) has read the live leases and is listing the store when a docker-archive
    load starts in this process. The load's in-flight lease is made under the store lock, so
    the load cannot spool anything (a work directory the prune could take for a dead load's)
    until the prune is done; then it succeeds with its image complete."""
    home = tmp_path / "home"
    ImageCache(home).close()
    archive = images["docker"].archive.with_name("docker-legacy.tar")
    pruner = cache_spawn("prune", home, "--pause", "listed")
    pruner.expect("paused")
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            with ImageCache(home) as cache:
                cache.load(archive)
        except BaseException as e:
            outcome.append(e)
        else:
            outcome.append(None)

    loader = threading.Thread(target=load)
    loader.start()
    time.sleep(0.3)
    assert cc.partial_files(home) == [], "the load spooled while the prune held the store"
    assert not outcome, "the load finished while the prune held the store"
    pruner.send("go")
    pruner.expect("pruned")
    loader.join(TIMEOUT)
    assert outcome == [None], f"the load failed: {outcome[0]!r}"
    with ImageCache(home) as cache:
        cc.assert_complete(cache, images["docker"].reference)


# ------------------------------------------------------------------ use vs remove


def test_use_in_one_process_races_remove_in_another(
    tmp_path: Path, images: dict[str, Built], cache_spawn: Spawn
) -> None:
    """Process A uses and releases the image under fresh holder ids, again and again; process
    B removes it (not forced) again and again and reloads it whenever the remove worked.
    For 2.5 s both see only success, `ImageInUseError` or `ImageNotFoundError`; both
    refusals and removals happen; the ledger's history shows no content deleted while a
    lease was held, no non-forced remove while one was, no refusal without one."""
    home = tmp_path / "home"
    used = images["used"]
    with ImageCache(home) as cache:
        cache.load(used.archive)
    user = cache_spawn(
        "use-loop", home, "--reference", used.reference, "--holder", "sandbox", "--seconds", "2.5"
    )
    remover = cache_spawn(
        "remove-reload-loop",
        home,
        "--reference",
        used.reference,
        "--archive",
        str(used.archive),
        "--seconds",
        "2.5",
        "--seed",
        "7",
    )
    start_together([user, remover])
    used_done, removed_done = user.expect("done"), remover.expect("done")
    no_internal_errors(used_done, "user")
    no_internal_errors(removed_done, "remover")
    assert set(used_done["expected"]) <= {"use:ImageNotFoundError"}, used_done
    assert set(removed_done["expected"]) <= {"remove:ImageInUseError"}, removed_done
    assert used_done["ok"].get("use", 0) > 0
    assert removed_done["ok"].get("remove", 0) > 0, removed_done
    assert removed_done["expected"].get("remove:ImageInUseError", 0) > 0, removed_done

    cc.assert_consistent(home)
    with ImageCache(home) as cache:
        counts = assert_leases_respected(cache, used.reference)
        print("history:", counts, "user:", used_done, "remover:", removed_done)
        assert counts.get("ImageRemoved+content", 0) > 0, counts
        assert counts.get("RemoveRefused", 0) > 0, counts
        with internals(cache).ledger.snapshot() as state:
            held = {m.content.manifest_digest: m.holders for m in state.manifests() if m.holders}
            assert not held, "a lease outlived its holder's release"
    cc.prune_and_assert_no_orphan(home)


# ------------------------------------------------------------------ threads of one process


def test_threads_query_use_and_release_while_another_loads_and_removes(
    tmp_path: Path, images: dict[str, Built], cache_spawn: Spawn
) -> None:
    """In one process, three threads do random get / list / inspect / use / release while a
    fourth loads and removes (forced or not) two images and a fifth uses a third image and
    asks another process for it: for 2.5 s no thread sees an error other than
    `ImageNotFoundError` / `ImageInUseError`, every list() is newest first, and the other
    process's get() shows exactly the last_used_at the use() returned (read-your-writes
    across processes)."""
    home = tmp_path / "home"
    stable, m1, m2 = images["stable"], images["m1"], images["m2"]
    cache = ImageCache(home)
    for built in (stable, m1, m2):
        cache.load(built.archive)
    reader = cache_spawn("get-server", home)
    reader.expect("ready")

    deadline = time.monotonic() + 2.5
    errors: list[str] = []
    counts: dict[str, int] = defaultdict(int)
    lock = threading.Lock()

    def note(what: str) -> None:
        with lock:
            counts[what] += 1

    def guarded(name: str, body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            while time.monotonic() < deadline:
                try:
                    body()
                except (ImageNotFoundError, ImageInUseError) as e:
                    note(f"{name}:{type(e).__name__}")
                except Exception as e:
                    with lock:
                        errors.append(f"{name}: {e!r}")
                    return

        return run

    def querier(n: int) -> Callable[[], None]:
        rng = random.Random(n)
        holder = f"querier-{n}"

        def step() -> None:
            choice = rng.randrange(5)
            reference = rng.choice([stable, m1, m2]).reference
            if choice == 0:
                assert cache.get(reference).reference == reference
                note("get")
            elif choice == 1:
                listed = cache.list()
                created = [h.created_at for h in listed]
                assert None not in created, "a cached image without created_at"
                stamps = [c for c in created if c is not None]
                assert stamps == sorted(stamps, reverse=True), "list() not newest first"
                assert len({h.reference for h in listed}) == len(listed)
                note("list")
            elif choice == 2:
                detail = cache.inspect(reference)
                assert detail.handle.reference == reference
                note("inspect")
            elif choice == 3:
                cache.use(rng.choice([m1, m2]).reference, holder)
                note("use")
            else:
                cache.release(holder)
                note("release")
            time.sleep(0.0005)  # let the loading thread and the probe have the GIL too

        return guarded(f"querier-{n}", step)

    churn_rng = random.Random(99)

    def churn() -> None:
        for loaded, removed in ((m1, m2), (m2, m1)):
            cache.load(loaded.archive)
            note("load")
            try:
                cache.remove(removed.reference, force=churn_rng.random() < 0.3)
                note("remove")
            except ImageInUseError:
                note("churn:ImageInUseError")

    def read_your_writes() -> None:
        handle = cache.use(stable.reference, "ryw")
        reader.send(f"get {stable.reference}")
        got = reader.expect("got")
        assert got["last_used_at"] is not None
        seen = datetime.fromisoformat(got["last_used_at"])
        assert seen == handle.last_used_at, (seen, handle.last_used_at)
        cache.release("ryw")
        note("ryw")

    threads = [threading.Thread(target=querier(n)) for n in range(3)]
    threads.append(threading.Thread(target=guarded("churn", churn)))
    threads.append(threading.Thread(target=guarded("ryw", read_your_writes)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    reader.send("quit")
    reader.wait()
    cache.close()

    assert errors == [], errors
    print("operations:", dict(counts))
    for what in ("get", "list", "inspect", "use", "release", "load", "remove", "ryw"):
        assert counts[what] > 0, dict(counts)
    cc.assert_consistent(home)
    with ImageCache(home) as cache:
        for built in (m1, m2):
            assert_leases_respected(cache, built.reference)
        for n in range(3):
            cache.release(f"querier-{n}")
    cc.prune_and_assert_no_orphan(home)


# ------------------------------------------------------------------ force remove


def test_force_remove_races_prune_and_release(
    tmp_path: Path, images: dict[str, Built], cache_spawn: Spawn
) -> None:
    """One process loads the image when missing, uses it and force-removes it, in a loop;
    another releases the holder in a loop; a third prunes in a tight loop. For 2.5 s no
    forced remove (nor anything else) fails with an internal error; the history shows no
    content deleted while a lease was held; afterwards the home is consistent and, once
    everything is released, a prune leaves no orphan."""
    home = tmp_path / "home"
    forced = images["forced"]
    ImageCache(home).close()
    args = ("--reference", forced.reference, "--holder", "sandbox-f")
    remover = cache_spawn(
        "force-loop", home, *args, "--archive", str(forced.archive), "--seconds", "2.5"
    )
    releaser = cache_spawn("release-loop", home, *args, "--seconds", "2.5", "--seed", "3")
    pruner = cache_spawn("prune-loop", home, "--seconds", "40")
    start_together([remover, releaser, pruner])
    removed, released = remover.expect("done"), releaser.expect("done")
    pruner.send("stop")
    pruned = pruner.expect("done")
    for who, done in (("force-remover", removed), ("releaser", released), ("pruner", pruned)):
        no_internal_errors(done, who)
    assert removed["ok"].get("force-remove", 0) > 0, removed
    assert set(removed["expected"]) <= {"use:ImageNotFoundError", "force-remove:ImageNotFoundError"}
    assert released["released"] > 0, released
    assert pruned["ok"].get("prune", 0) > 0, pruned

    cc.assert_consistent(home)
    with ImageCache(home) as cache:
        counts = assert_leases_respected(cache, forced.reference)
        print("history:", counts, "remover:", removed, "pruner:", pruned["ok"])
        assert counts.get("ImageRemoved", 0) > 0, counts
        cache.release("sandbox-f")
    cc.prune_and_assert_no_orphan(home)
    with ImageCache(home) as cache:
        cache.load(forced.archive)
        cc.assert_complete(cache, forced.reference)


def test_processes_rebuilding_at_once_leave_identical_views(tmp_path: Path) -> None:
    """Two `imageledger rebuild`s at once (two operators, or two processes opening views of
    an older format) share one spare namespace: unserialised, one would clear it under the
    other and activate views missing the start of the log."""
    home = tmp_path / "home"
    with ImageCache(home, durability="nosync") as cache:
        append_mixed_events(cache, 20_000, 2_000)
        listed, history = cache.list(), cache.history()
    script = (
        "import sys\nfrom imageledger import ImageCache\n"
        "with ImageCache(sys.argv[1]) as cache:\n"
        "    for _ in range(3):\n"
        "        assert cache.rebuild().identical\n"
    )
    children = [
        subprocess.Popen([sys.executable, "-c", script, str(home)], stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for child in children:
        _, err = child.communicate(timeout=300)
        assert child.returncode == 0, err.decode()
    with ImageCache(home) as cache:
        assert cache.rebuild(verify=True).identical
        assert cache.list() == listed
        assert cache.history() == history


def test_threads_of_one_process_never_conflict_and_all_of_them_commit(tmp_path: Path) -> None:
    """Threads of one process take turns to decide and append (in arrival order), so none of
    their appends is refused as a conflict and retried; every use and release lands."""
    home = tmp_path / "home"
    with ImageCache(home, durability="nosync") as cache:
        cache.load(build_docker_archive(tmp_path / "a.tar", [ImageSpec(names=("t:1",))]).path)
        ledger = internals(cache).ledger
        real_append = ledger.append
        refused: list[int] = []

        def counting(events: Any) -> None:
            try:
                real_append(events)
            except Exception:
                refused.append(1)
                raise

        ledger.append = counting  # type: ignore[method-assign]
        errors: list[BaseException] = []

        def run(n: int) -> None:
            try:
                for i in range(25):
                    cache.use("t:1", f"sb-{n}-{i}")
                    assert cache.release(f"sb-{n}-{i}") == 1
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == [] and refused == []
        events = [e.event for e in cache.history("t:1")]
        assert events.count("ImageUsed") == events.count("HolderReleased") == 200
