"""Disk-pressure garbage collection (`imageledger gc`, `ImageCache.gc`; kubelet's image GC).

The decision (`policies.plan_gc`) is checked against a reference model on random caches; the
use case runs on a real small file system (a 64 MiB tmpfs, mounted here as root; skipped with
the reason when mounting is not permitted) holding a home with several images and a filler
file that puts the disk under real pressure. Times come from the cache's injectable clock,
never from how long anything took.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imageledger import DiskUsage, GcPolicy, Image, ImageCache, ImagePruneReport
from imageledger.cache import internals
from imageledger.domain.events import Batch
from imageledger.domain.model import (
    Actor,
    DeletedBlob,
    ImageConfig,
    ImageContent,
    Layer,
    Platform,
    PrunePolicy,
    ReferenceRecord,
    RemovedReference,
)
from imageledger.domain.policies import plan_gc
from imageledger.projections.views import TABLES, ViewState, apply
from imageledger.storage.ledgerformat import LedgerMapper
from imageledger.storage.viewstore import MemoryViewTxn
from imageledger.tools.imagebuild import ImageSpec, build_oci_layout

if TYPE_CHECKING:
    from tests.conftest import tmpfs
else:
    from conftest import tmpfs

CLI = (sys.executable, "-m", "imageledger.tools.cli")
TIMEOUT = 120.0
# Ten days ago: the command line's clock (the real one) sees these images as old enough.
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(days=10)
MIB = 1 << 20


# ---------------------------------------------------------------- the decision, against a model


class Records:
    """The views' records in plain dicts, written by the real folds (`projections.views`)."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[bytes, Any]] = {table: {} for table in TABLES}

    def get(self, table: str, key: bytes) -> Any:
        return self.tables[table].get(key)

    def put(self, table: str, key: bytes, value: Any) -> None:
        self.tables[table][key] = value

    def delete(self, table: str, key: bytes) -> None:
        self.tables[table].pop(key, None)


def _digest(kind: str, n: int) -> str:
    code = {"manifest": "a", "config": "c", "layer": "b"}[kind]
    return f"sha256:{code}{n:063x}"


@dataclass
class Model:
    """Images as lists of layers (some shared), references with times, leases, pulls in
    flight, images left without a name (a forced remove while leased, then the release) and
    stray files; made into a cache state by the real folds."""

    layer_sizes: list[int]
    images: list[tuple[int, ...]]  # layer indexes per image (manifest i)
    refs: list[tuple[int, int, int]]  # (image, created minute, minutes after that of last use)
    held: set[int]  # images leased (through their first reference, if they have one)
    in_flight: set[int]
    strays: list[int] = field(default_factory=list)

    def manifest(self, i: int) -> str:
        return _digest("manifest", i)

    def content(self, i: int) -> ImageContent:
        layers = tuple(
            Layer(_digest("layer", n), "application/vnd.oci.image.layer.v1.tar", s, None, p)
            for p, (n, s) in enumerate((n, self.layer_sizes[n]) for n in self.images[i])
        )
        return ImageContent(
            manifest_digest=self.manifest(i),
            manifest_media_type="application/vnd.oci.image.manifest.v1+json",
            manifest_size=100 + i,
            config=ImageConfig(_digest("config", i)),
            config_size=50 + i,
            platform=Platform("linux", "amd64"),
            layers=layers,
        )

    def state(self) -> Any:
        """The views after the events this model stands for, folded in time order."""
        actor = Actor("u", 0, 1, "h", "0")
        steps: list[tuple[datetime, int, str, tuple[Any, ...]]] = []

        def at(when: datetime, method: str, *args: Any) -> None:
            """At `when`, the `Batch` method `method` records its event with `args`."""
            steps.append((when, len(steps), method, args))

        named: set[int] = set()
        for n, (image, created, used) in enumerate(self.refs):
            ref, digest = f"example.com/app:{n}", self.manifest(image)
            content = self.content(image)
            at(T0 + timedelta(minutes=created), "pulled", ref, "x", content, False)
            if used:
                when = T0 + timedelta(minutes=created + used)
                at(when, "used", ref, digest, "probe")
                at(when, "released", "probe", ((ref, digest),))
            if image in self.held and image not in named:
                at(T0 + timedelta(minutes=created), "used", ref, digest, "sb")
            named.add(image)
        for image in range(len(self.images)):
            if image in named or image % 2:
                continue  # an image the cache never had
            # A name gone by a forced remove while leased, then the lease ended: a manifest
            # left without a reference, which any gc that acts reclaims.
            ref, digest, content = (
                f"example.com/gone:{image}",
                self.manifest(image),
                self.content(image),
            )
            held = image in self.held
            at(T0, "pulled", ref, "x", content, False)
            at(T0, "used", ref, digest, f"gone-{ref}")
            at(T0, "removed", ref, digest, True, (), 0)
            if not held:
                at(T0, "released", f"gone-{ref}", ((ref, digest),))
        records = Records()
        for position, (when, _order, method, args) in enumerate(sorted(steps), 1):
            batch = Batch(position, actor, when)  # not 0: no Started event
            getattr(batch, method)(*args)
            for event in batch.events:
                apply(records, event, position)
        return ViewState(MemoryViewTxn(records.tables))

    def protected(self) -> frozenset[str]:
        """What a pull in flight holds: its manifest and every blob of it."""
        return frozenset(
            d for i in self.in_flight for d, _kind, _size in self.content(i).kinded_blobs()
        )


def _expected(
    state: Any, gc: GcPolicy, now: datetime, protected: frozenset[str], strays: list[int]
) -> tuple[set[str], int]:
    """The reference model: what kubelet's policy removes, by brute force over sets, from
    any `CacheState` (the model's, or a real cache's snapshot)."""
    refs = list(state.references())
    manifests = {m.content.manifest_digest: m for m in state.manifests()}
    blobs = list(state.blobs())

    def eligible(r: ReferenceRecord) -> bool:
        m = manifests[r.manifest_digest]
        young = now - r.created_at < timedelta(seconds=gc.min_age_seconds)
        return not m.holders and r.manifest_digest not in protected and not young

    def freed(removed: set[str]) -> int:
        left = {r.reference for r in refs} - removed
        going = {
            d
            for d, m in manifests.items()
            if not set(m.references) & left and not m.holders and d not in protected
        }
        return sum(strays) + sum(
            int(b.size) for b in blobs if b.digest not in protected and set(b.users) <= going
        )

    candidates = sorted(
        (r for r in refs if eligible(r)), key=lambda r: (r.last_used_at, r.created_position)
    )
    old = set()
    if gc.max_age_seconds is not None:
        old = {
            r.reference
            for r in candidates
            if now - r.last_used_at > timedelta(seconds=gc.max_age_seconds)
        }
    usable = gc.disk.used + gc.disk.available
    pressure = usable > 0 and gc.disk.used * 100 >= gc.high_threshold * usable
    if not pressure and not old:
        return set(), 0
    chosen = set(old)
    if pressure:
        need = gc.disk.used - gc.low_threshold * (gc.disk.used + gc.disk.available) // 100
        for r in candidates:
            if freed(chosen) >= need:
                break
            chosen.add(r.reference)
    return chosen, freed(chosen)


@st.composite
def models(draw: st.DrawFn) -> Model:
    layer_sizes = draw(st.lists(st.integers(1, 5000), min_size=1, max_size=6))
    layer = st.integers(0, len(layer_sizes) - 1)
    images = draw(st.lists(st.lists(layer, min_size=1, max_size=3).map(tuple), max_size=5))
    refs = []
    if images:
        refs = draw(
            st.lists(
                st.tuples(st.integers(0, len(images) - 1), st.integers(0, 50), st.integers(0, 50)),
                max_size=7,
            )
        )
    indexes = (
        st.sets(st.integers(0, max(len(images) - 1, 0)), max_size=2) if images else st.just(set())
    )
    return Model(
        layer_sizes,
        images,
        refs,
        draw(indexes),
        draw(indexes),
        draw(st.lists(st.integers(0, 3000), max_size=2)),
    )


@settings(max_examples=400, deadline=None)
@given(
    model=models(),
    used=st.integers(0, 40_000),
    available=st.integers(0, 40_000),
    high=st.integers(0, 100),
    spread=st.integers(0, 100),
    min_age=st.sampled_from([0, 60, 600, 3000]),
    max_age=st.none() | st.sampled_from([61, 900, 2400, 4000]),
    now_minute=st.integers(50, 120),
)
def test_the_decision_is_kubelets_policy_with_prunes_accounting(
    model: Model,
    used: int,
    available: int,
    high: int,
    spread: int,
    min_age: int,
    max_age: int | None,
    now_minute: int,
) -> None:
    low = max(high - spread, 0)
    if max_age is not None and max_age <= min_age:
        max_age = None
    gc = GcPolicy(high, low, min_age, max_age, DiskUsage(used + available, used, available))
    state = model.state()
    now = T0 + timedelta(minutes=now_minute)
    protected = model.protected()
    strays = [
        DeletedBlob(f"tmp/{n}", "partial", size, "stale") for n, size in enumerate(model.strays)
    ]
    plan = plan_gc(state, gc, now, protected, strays)
    chosen, freed = _expected(state, gc, now, protected, model.strays)
    assert {r.reference for r in plan.references} == chosen
    # What the plan deletes is exactly what the model frees: a layer shared with an image
    # that stays is not counted (nor deleted), and strays count once.
    assert plan.bytes == freed
    for removed in plan.references:
        manifest = state.manifest(removed.manifest_digest)
        assert (
            manifest is not None
            and not manifest.holders
            and removed.manifest_digest not in protected
        )
    deleted = {b.digest for b in plan.deleted}
    assert not deleted & protected
    # The reference order of the report is by name, whatever the removal order.
    assert [r.reference for r in plan.references] == sorted(r.reference for r in plan.references)


@settings(max_examples=100, deadline=None)
@given(
    high=st.integers(0, 100),
    low=st.integers(0, 100),
    min_age=st.integers(0, 2**40),
    max_age=st.none() | st.integers(0, 2**40),
    disk=st.tuples(st.integers(0, 2**62), st.integers(0, 2**62), st.integers(0, 2**62)),
    dry_run=st.booleans(),
)
def test_a_gc_policy_is_stored_as_a_fifth_element_and_read_back(
    high: int,
    low: int,
    min_age: int,
    max_age: int | None,
    disk: tuple[int, int, int],
    dry_run: bool,
) -> None:
    gc = GcPolicy(high, low, min_age, max_age, DiskUsage(*disk))
    batch = Batch(1, Actor("u", 0, 1, "h", "0"), T0)
    removed = (RemovedReference("example.com/app:1", _digest("manifest", 1), "gc"),)
    batch.pruned(PrunePolicy(dry_run=dry_run, gc=gc), T0, removed, (), 0)
    batch.pruned(PrunePolicy(dry_run=dry_run), T0, removed, (), 0)
    mapper = LedgerMapper()
    stored = [mapper.to_stored_event(e) for e in batch.events]
    decoded = [LedgerMapper().to_domain_event(s) for s in stored]
    assert decoded[0].policy.gc == gc  # type: ignore[attr-defined]
    assert decoded[1].policy.gc is None  # type: ignore[attr-defined]
    policies = [msgpack.unpackb(s.state, timestamp=3)[2] for s in stored]
    assert len(policies[0]) == 5 and len(policies[1]) == 4  # a prune stays as it always was
    assert policies[0][4] == [high, low, min_age, max_age, list(disk)]


# ---------------------------------------------------------------- a real file system under pressure


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A real 64 MiB file system."""
    with tmpfs(tmp_path / "disk", "64m") as mount:
        yield mount


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def _load(cache: ImageCache, tmp_path: Path, name: str, *layers: bytes) -> str:
    """Load an image of `layers` (uncompressed, so its blobs are the sizes given) as `name`."""
    spec = ImageSpec(
        layers=tuple({"data": data} for data in layers),
        compression="none",
        names=(f"example.com/{name}:1",),
    )
    layout = build_oci_layout(tmp_path / f"layout-{name}", [spec])
    [handle] = cache.load(layout.path)
    return handle.reference


def _usage(path: Path) -> DiskUsage:
    st = os.statvfs(path)
    return DiskUsage(
        st.f_blocks * st.f_frsize,
        (st.f_blocks - st.f_bfree) * st.f_frsize,
        st.f_bavail * st.f_frsize,
    )


def _fill_to(disk: Path, percent: float) -> None:
    """Write a filler file so that the file system is about `percent` full."""
    usage = _usage(disk)
    wanted = int(usage.usable * percent / 100) - usage.used
    assert wanted > 0, f"already {usage.used_percent}% full"
    with open(disk / "filler", "ab") as f:
        while wanted > 0:
            chunk = min(wanted, 4 * MIB)
            f.write(b"\xa5" * chunk)
            wanted -= chunk


@pytest.fixture
def cached(disk: Path, tmp_path: Path) -> Iterator[tuple[ImageCache, Clock, list[str]]]:
    """A home on the small disk with five images, loaded a minute apart at T0, then used in
    another order (least recently used first: c, a, e, b, d). `a` and `b` share a 3 MiB
    base layer; every image also has a 3 MiB layer of its own."""
    clock = Clock()
    base = os.urandom(3 * MIB)
    with ImageCache(disk / "home", clock=clock) as cache:
        refs = {}
        for name in "abcde":
            own = os.urandom(3 * MIB)
            layers = (base, own) if name in "ab" else (own,)
            refs[name] = _load(cache, tmp_path, name, *layers)
            clock.advance(minutes=1)
        clock.advance(minutes=30)
        for name in "caebd":
            cache.use(refs[name], "probe")
            cache.release("probe")
            clock.advance(minutes=1)
        clock.advance(minutes=10)
        yield cache, clock, [refs[n] for n in "caebd"]


def _removed(report: ImagePruneReport) -> list[str]:
    return sorted(r.reference for r in report.references)


def _snapshot(cache: ImageCache) -> Any:
    """The views as the gc is about to read them, kept (the ledger as of its head, replayed
    into memory: `LedgerStore.at`), for the reference model."""
    ledger = internals(cache).ledger
    with ledger.at(ledger.head()).snapshot() as state:
        return state


def _check_against_the_model(
    report: ImagePruneReport, before: Any, now: datetime, protected: frozenset[str] = frozenset()
) -> None:
    assert report.gc is not None
    chosen, freed = _expected(before, report.gc, now, protected, [])
    assert _removed(report) == sorted(chosen)
    assert sum(b.size for b in report.deleted) == freed


def test_under_pressure_it_removes_least_recently_used_until_the_low_threshold(
    cached: tuple[ImageCache, Clock, list[str]], disk: Path
) -> None:
    cache, clock, lru = cached
    c, a, e, b, d = lru
    _fill_to(disk, 92)
    before, real_before = _snapshot(cache), _usage(disk)
    head = len(cache.history())
    report = cache.gc(high_threshold=85, low_threshold=75)
    assert report.gc is not None and report.gc.disk.used_percent >= 85
    need = report.gc.disk.to_free(75)
    # About 11 MiB to free. c, a and e free 9 MiB: `a` shares its base layer with `b`, so
    # while `b` stays removing `a` frees only its own layer (counting all of `a` would have
    # stopped after e); b goes too, and with it the base: d, the most recently used, stays.
    assert _removed(report) == sorted([c, a, e, b])
    _check_against_the_model(report, before, clock.now)
    assert report.bytes_reclaimed >= need
    assert {h.reference for h in cache.list()} == {d}
    # Really at or below the low threshold now: the estimate counts blob sizes, the disk frees
    # whole pages, so it can only be further below (a page or two of ledger aside).
    after = _usage(disk)
    assert after.used <= real_before.used - report.bytes_reclaimed + MIB
    assert after.used * 100 <= 75 * after.usable + 100 * MIB
    history = cache.history()
    assert len(history) == head + 1
    assert history[-1].event == "ImagesPruned"
    assert "high 85%, low 75%" in history[-1].detail
    assert all("least recently used" in r.reason for r in report.references)


def test_images_younger_than_min_age_or_leased_are_never_removed(
    cached: tuple[ImageCache, Clock, list[str]], disk: Path, tmp_path: Path
) -> None:
    cache, clock, lru = cached
    c, _a, _e, _b, _d = lru
    young = _load(cache, tmp_path, "young", os.urandom(3 * MIB))
    clock.advance(seconds=30)
    for ref in lru:  # every other image used after the young one: it is the LRU now
        cache.use(ref, "probe")
        cache.release("probe")
    cache.use(c, "sandbox-1")  # and c is in use
    clock.advance(seconds=10)
    _fill_to(disk, 95)
    before = _snapshot(cache)
    report = cache.gc(high_threshold=85, low_threshold=60, min_age=120)
    removed = _removed(report)
    assert young not in removed and c not in removed
    assert removed  # the pressure removed the others that could go
    _check_against_the_model(report, before, clock.now)
    assert {young, c} <= {h.reference for h in cache.list()}
    # Once old enough, the young one can go like any other.
    clock.advance(minutes=5)
    again = cache.gc(high_threshold=50, low_threshold=20, min_age=120)
    assert young in _removed(again) and c not in _removed(again)


def test_an_image_a_pull_is_bringing_is_never_removed(
    cached: tuple[ImageCache, Clock, list[str]], disk: Path
) -> None:
    cache, clock, lru = cached
    c = lru[0]  # the least recently used
    digest = cache.get(c).manifest_digest
    _fill_to(disk, 92)
    service = internals(cache).service
    # A pull of the same manifest in flight (the real in-flight lease a pull writes under):
    # what it has touched is claimed until its event commits.
    with service.leases.bringing(lambda _digest: True) as store:
        assert store.size(digest) is not None
        before = _snapshot(cache)
        report = cache.gc(high_threshold=85, low_threshold=75)
        assert c not in _removed(report) and report.references
        _check_against_the_model(report, before, clock.now, frozenset(service.leases.protected()))
    assert c in {h.reference for h in cache.list()}


def test_max_age_removes_images_unused_for_longer_without_pressure(
    cached: tuple[ImageCache, Clock, list[str]], disk: Path
) -> None:
    cache, _clock, lru = cached
    c, a, e, b, d = lru
    # Unused for 15, 14, 13, 12 and 11 minutes; the disk is far from the threshold.
    report = cache.gc(high_threshold=85, low_threshold=80, max_age=12.5 * 60)
    assert report.gc is not None and not report.gc.disk.at_least(85)
    assert _removed(report) == sorted([c, a, e])
    assert all("gc max age" in r.reason for r in report.references)
    assert {h.reference for h in cache.list()} == {b, d}
    assert cache.history()[-1].event == "ImagesPruned"


def test_the_asyncio_api_plans_the_same_gc(
    cached: tuple[ImageCache, Clock, list[str]], disk: Path
) -> None:
    cache, _clock, _lru = cached
    _fill_to(disk, 92)
    blocking = cache.gc(high_threshold=85, low_threshold=75, dry_run=True)
    awaited = asyncio.run(Image.gc(high_threshold=85, low_threshold=75, dry_run=True, cache=cache))
    assert awaited.references == blocking.references and awaited.references
    assert awaited.deleted == blocking.deleted and awaited.dry_run


def test_below_the_high_threshold_nothing_is_removed_nor_recorded(
    cached: tuple[ImageCache, Clock, list[str]], disk: Path
) -> None:
    cache, _clock, lru = cached
    _fill_to(disk, 80)
    head = len(cache.history())
    report = cache.gc(high_threshold=85, low_threshold=50)
    assert report.gc is not None and not report.gc.disk.at_least(85)
    assert report.references == () and report.deleted == () and report.bytes_reclaimed == 0
    assert len(cache.history()) == head
    assert {h.reference for h in cache.list()} == set(lru)


def test_thresholds_are_checked_as_kubelet_checks_them(
    cached: tuple[ImageCache, Clock, list[str]],
) -> None:
    cache, _clock, _lru = cached
    for kwargs in (
        {"high_threshold": 101},
        {"low_threshold": -1},
        {"high_threshold": 70, "low_threshold": 80},
        {"min_age": 600, "max_age": 60},
        {"min_age": -5},
    ):
        with pytest.raises(ValueError, match="gc:"):
            cache.gc(**kwargs)  # type: ignore[arg-type]


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_cli_gc_dry_run_json_and_the_event_it_records(
    cached: tuple[ImageCache, Clock, list[str]], disk: Path
) -> None:
    cache, _clock, lru = cached
    home = disk / "home"
    _fill_to(disk, 92)
    head = len(cache.history())
    cache.close()  # the command line is another process: it runs with its own (real) clock
    args = ("gc", "--high-threshold", "85", "--low-threshold", "75", "--min-age", "0")
    dry = _cli(home, *args, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert set(plan) >= {
        "image_refs_removed",
        "manifests_removed",
        "layers_removed",
        "bytes_reclaimed",
        "dry_run",
        "removed",
        "gc",
    }
    assert plan["dry_run"] is True and plan["image_refs_removed"] == 4
    gc = plan["gc"]
    assert (gc["high_threshold"], gc["low_threshold"], gc["min_age_seconds"]) == (85, 75, 0)
    assert gc["max_age_seconds"] is None
    figures = gc["disk"]
    assert set(figures) == {
        "size_bytes",
        "used_bytes",
        "available_bytes",
        "used_percent",
        "bytes_to_free",
    }
    assert figures["used_percent"] >= 85 and figures["bytes_to_free"] > 0
    images = _cli(home, "images", "--json")
    assert len(json.loads(images.stdout)) == 5  # a dry run removes nothing
    done = _cli(home, *args, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["dry_run"] is False
    removed = sorted(r["name"] for r in report["removed"] if r["kind"] == "reference")
    assert removed == sorted(lru[:4])
    assert report["bytes_reclaimed"] >= report["gc"]["disk"]["bytes_to_free"]
    # The stored event: a prune whose policy holds the gc's thresholds and the disk it saw.
    events = _cli(home, "events", "--type", "ImagesPruned", "--json")
    [event] = [json.loads(line) for line in events.stdout.splitlines()]
    assert event["position"] == head + 1
    stored = event["policy"]["gc"]
    assert stored["high_threshold"] == 85 and stored["low_threshold"] == 75
    assert stored["disk"] == {
        "size": report["gc"]["disk"]["size_bytes"],
        "used": report["gc"]["disk"]["used_bytes"],
        "available": report["gc"]["disk"]["available_bytes"],
    }
    explained = json.loads(_cli(home, "explain", lru[0], "--json").stdout)
    assert explained["removed_by"]["policy"]["gc"]["disk"]["used_bytes"] == stored["disk"]["used"]
    human = _cli(home, "gc", "--high-threshold", "85", "--low-threshold", "75")
    assert human.returncode == 0 and human.stdout.startswith("gc at ")
    usage = _cli(home, "gc", "--high-threshold", "70", "--low-threshold", "80")
    assert usage.returncode == 2 and "low_threshold" in usage.stderr
