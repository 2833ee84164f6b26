"""Benchmark of the image cache's hot paths and of rebuild.

- what index.json adds to a command that changes it: `remove` of one alias at 10 and at N
  references (goal: < 20 ms more at N);
- `use` and `release` latency (p50/p99) at 10 and at N references, as a runtime calls them on
  every sandbox start and stop: default durability, index.json kept as for any user (goal:
  the same cost at both sizes);
- `get` and `list` latency (p50/p99) with N cached references (default 10,000), in process
  (what a sandbox runtime does on every sandbox start): list() with nothing changed, list()
  right after a real commit (a `use`), and the first list() of a process (nothing remembered);
- rebuild speed (events/s) of a ledger of M mixed events (default 1,000,000: pulls of many
  references over shared manifests, uses, releases, removes, prunes), rebuilt by
  ``imageledger rebuild`` in a process of its own (its peak RSS is the rebuild's).

Goals (issue 3): get p99 < 50 us; list of 10,000 < 20 ms; rebuild >= 100,000 events/s.
Run: ``imageledger bench cache [--refs N] [--events M] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgpack

from imageledger.aio import Image
from imageledger.cache import ImageCache, current_actor, internals
from imageledger.domain.events import Batch, ImageLedger
from imageledger.domain.model import (
    OCI_MANIFEST,
    ImageConfig,
    ImageContent,
    Layer,
    Platform,
    PrunePolicy,
    RemovedReference,
)
from imageledger.storage.ledgerapp import LedgerApplication
from imageledger.tools.bench_pull import imageledger_command

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def _digest(kind: str, n: int) -> str:
    return "sha256:" + f"{kind}{n:x}".encode().hex().ljust(64, "0")[:64]


def _content(n: int) -> ImageContent:
    layers = tuple(
        Layer(_digest("l", (n * 3 + i) % 5000), LAYER, 1_000_000 + i, _digest("d", n * 3 + i), i)
        for i in range(3)
    )
    return ImageContent(
        manifest_digest=_digest("m", n),
        manifest_media_type=OCI_MANIFEST,
        manifest_size=1200,
        config=ImageConfig(_digest("c", n), env=("PATH=/bin", f"N={n}"), cmd=("/bin/sh",)),
        config_size=2000,
        platform=Platform("linux", "amd64"),
        layers=layers,
    )


def append_mixed_events(cache: ImageCache, count: int, refs: int, batch: int = 1000) -> int:
    """Append `count` mixed events straight through the ledger (no blobs: the benchmark is
    about the log and the views, not the store)."""
    actor = current_actor()
    start = datetime(2026, 1, 1, tzinfo=UTC)
    ledger = internals(cache).ledger
    written = 0
    manifests = max(refs // 10, 1)
    while written < count:
        with ledger.snapshot() as state:
            events = Batch(state.version, actor, start)
        for _ in range(min(batch, count - written)):
            i = written
            # Each event at its own time (a replayed history, not one command).
            at = events.stamp = start + timedelta(milliseconds=i)
            kind = i % 20
            ref = f"bench.local/repo{i % refs}:v{(i // refs) % 3}"
            if kind < 14:
                events.pulled(ref, "bench", _content(i % manifests), cached=False)
            elif kind < 17:
                digest = _content(i % manifests).manifest_digest
                events.used(ref, digest, f"h{i % 50}")
            elif kind < 19:
                events.released(f"h{i % 50}", ())
            elif i % 40 == 19:
                events.pruned(PrunePolicy(), at, (RemovedReference(ref, "", "bench"),), (), 0)
            else:
                events.removed(ref, "", False, (), 0)
            written += 1
        ledger.append(events.events)
    return written


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_reads(home: Path, refs: int, rounds: int) -> dict[str, Any]:
    cache = ImageCache(home, durability="nosync")
    try:
        _append_events_pulls(cache, refs)
        names = [h.reference for h in cache.list()]
        assert len(names) == refs, (len(names), refs)
        get_samples, dict_samples = [], []
        # The peer: a dict lookup of the same names, timed the same way (the floor of any
        # in-process get).
        table = {h.reference: h for h in cache.list()}
        for i in range(rounds):
            name = names[(i * 7919) % refs]
            t0 = time.perf_counter()
            cache.get(name)
            get_samples.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            table.get(name)
            dict_samples.append(time.perf_counter() - t0)
        list_samples, after_commit, first_samples = [], [], []
        for i in range(max(rounds // 1000, 20)):
            t0 = time.perf_counter()
            cache.list()
            list_samples.append(time.perf_counter() - t0)
            # A real commit (a sandbox starts on one image): the position moves and one row
            # changes, so the next list() reads every row again.
            cache.use(names[(i * 7919) % refs], holder=f"bench-{i}")
            t0 = time.perf_counter()
            cache.list()
            after_commit.append(time.perf_counter() - t0)
            # The first list() of a process: nothing remembered at all.
            with ImageCache(home, durability="nosync") as fresh:
                t0 = time.perf_counter()
                fresh.list()
                first_samples.append(time.perf_counter() - t0)
        async_samples = asyncio.run(_async_lists(cache, max(rounds // 1000, 20)))
    finally:
        cache.close()
    return {
        "refs": refs,
        "async_list_p50_ms": round(_percentile(async_samples, 0.5) * 1e3, 2),
        "async_list_p99_ms": round(_percentile(async_samples, 0.99) * 1e3, 2),
        "get_p50_us": round(_percentile(get_samples, 0.5) * 1e6, 1),
        "get_p99_us": round(_percentile(get_samples, 0.99) * 1e6, 1),
        "dict_get_p99_us": round(_percentile(dict_samples, 0.99) * 1e6, 2),
        "list_p50_ms": round(_percentile(list_samples, 0.5) * 1e3, 2),
        "list_p99_ms": round(_percentile(list_samples, 0.99) * 1e3, 2),
        "list_after_commit_p50_ms": round(_percentile(after_commit, 0.5) * 1e3, 2),
        "list_after_commit_p99_ms": round(_percentile(after_commit, 0.99) * 1e3, 2),
        "list_first_p50_ms": round(_percentile(first_samples, 0.5) * 1e3, 2),
        "list_first_p99_ms": round(_percentile(first_samples, 0.99) * 1e3, 2),
    }


async def _async_lists(cache: ImageCache, rounds: int) -> list[float]:
    """`await Image.list()` (microsandbox's SDK name), nothing changed between calls: the
    memo plus one hop to a worker thread and back."""
    await Image.list(cache=cache)
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        await Image.list(cache=cache)
        samples.append(time.perf_counter() - t0)
    return samples


def _append_events_pulls(cache: ImageCache, refs: int) -> None:
    actor = current_actor()
    start = datetime(2026, 1, 1, tzinfo=UTC)
    ledger = internals(cache).ledger
    done = 0
    while done < refs:
        with ledger.snapshot() as state:
            events = Batch(state.version, actor, start)
        for i in range(done, min(done + 1000, refs)):
            events.stamp = start + timedelta(seconds=i)
            content = _content(i % max(refs // 10, 1))
            events.pulled(f"bench.local/repo{i}:v1", "bench", content, cached=False)
        done = min(done + 1000, refs)
        ledger.append(events.events)


def _durable_cache(home: Path, refs: int) -> tuple[ImageCache, list[str]]:
    """A cache of `refs` references (appended quickly, unsynced), reopened as a user opens
    it: default durability, index.json kept; and its references."""
    setup = ImageCache(home, durability="nosync")
    try:
        _append_events_pulls(setup, refs)
    finally:
        setup.close()
    cache = ImageCache(home)
    return cache, [h.reference for h in cache.list()]


def bench_use(home: Path, refs: int, rounds: int, threads: int = 1) -> dict[str, Any]:
    """A durable `use` then `release` through the API, as a runtime calls them on every
    sandbox start and stop: the default durability (every commit synced), index.json kept by
    the cache as always. `threads` run the pair at once, each with its own holders. Beside
    it, the peer: eventsourcing's SQLite module appending the same two events per pair, each
    thread on its own aggregate (no conflicts to retry: the peer's easiest case)."""
    cache, names = _durable_cache(home, refs)
    try:

        def ours(thread: int, i: int) -> float:
            name, holder = names[(i * 7919 + thread) % refs], f"sandbox-{thread}-{i}"
            t0 = time.perf_counter()
            cache.use(name, holder=holder)
            cache.release(holder)
            return time.perf_counter() - t0

        pairs = _in_threads(ours, threads, rounds)
    finally:
        cache.close()
    peer = _sqlite_pairs(home.parent / f"{home.name}-sqlite", names, threads, rounds)
    return {
        "refs": refs,
        "threads": threads,
        "use_release_p50_ms": round(_percentile(pairs, 0.5) * 1e3, 3),
        "use_release_p99_ms": round(_percentile(pairs, 0.99) * 1e3, 3),
        "sqlite_p50_ms": round(_percentile(peer, 0.5) * 1e3, 3),
        "sqlite_p99_ms": round(_percentile(peer, 0.99) * 1e3, 3),
    }


def _in_threads(pair: Callable[[int, int], float], threads: int, rounds: int) -> list[float]:
    """`rounds` calls of `pair(thread, i)` in each of `threads` threads started together."""
    samples: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def run(thread: int) -> None:
        start.wait()
        mine = [pair(thread, i) for i in range(rounds)]
        with lock:
            samples.extend(mine)

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return samples


def _sqlite_pairs(workdir: Path, names: list[str], threads: int, rounds: int) -> list[float]:
    """The peer of `bench_use`: the same ImageUsed and HolderReleased events, encoded by the
    same transcoder, saved by eventsourcing's SQLite module (WAL, its default pragmas)."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(workdir / "db")}
    app = LedgerApplication(env=env)
    actor = current_actor()
    digest = _content(0).manifest_digest
    try:

        def pair(thread: int, i: int) -> float:
            owner = uuid.uuid5(uuid.NAMESPACE_URL, f"bench-peer-{thread}")
            name, holder = names[(i * 7919 + thread) % len(names)], f"sandbox-{thread}-{i}"
            at = datetime.now(UTC)
            base: dict[str, Any] = {"originator_id": owner, "timestamp": at, "actor": actor}
            # eventsourcing makes the event classes dataclasses through a metaclass, which
            # type checkers do not see: the fields go in as a typed-as-Any map.
            use: dict[str, Any] = {"reference": name, "manifest_digest": digest, "holder": holder}
            release: dict[str, Any] = {"holder": holder, "leases": ((name, digest),)}
            used = ImageLedger.ImageUsed(**base, originator_version=2 * i + 1, **use)
            released = ImageLedger.HolderReleased(**base, originator_version=2 * i + 2, **release)
            t0 = time.perf_counter()
            app.save(used)
            app.save(released)
            return time.perf_counter() - t0

        return _in_threads(pair, threads, rounds)
    finally:
        app.close()


def bench_index(home: Path, refs: int, rounds: int) -> dict[str, Any]:
    """What keeping index.json costs a command that changes what it shows: `remove` of one
    alias (an untag: no blob is deleted), durable, index.json rewritten as for any user. The
    difference between 10 and N references is the index's share."""
    cache, names = _durable_cache(home, refs)
    try:
        removes = []
        for i in range(min(rounds, refs)):
            t0 = time.perf_counter()
            cache.remove(names[(i * 7919) % refs])
            removes.append(time.perf_counter() - t0)
        size = (home / "index.json").stat().st_size
    finally:
        cache.close()
    return {
        "refs": refs,
        "index_bytes": size,
        "remove_p50_ms": round(_percentile(removes, 0.5) * 1e3, 2),
        "remove_p99_ms": round(_percentile(removes, 0.99) * 1e3, 2),
    }


def _read_and_decode(cache: ImageCache) -> float:
    """The ceiling of a rebuild: read every stored event from the log and msgpack-decode its
    state in C (no transcoding hooks, no domain object, no fold). Seconds taken."""
    views = internals(cache).ledger.views
    t0 = time.perf_counter()
    after = 0
    while batch := views.read_log(after, 5000):
        for notification in batch:
            msgpack.unpackb(notification.state, strict_map_key=False)
        after = batch[-1].id
    return time.perf_counter() - t0


def _sample_memory(child: subprocess.Popen[str]) -> dict[str, int]:
    """The peaks (KiB) of a running child's RssAnon, RssFile and VmHWM, read from
    /proc/PID/status every 20 ms until it exits. Its pipes are read afterwards: what a
    rebuild prints (the report, a dozen progress lines) fits in their buffers."""
    peaks: dict[str, int] = {}
    path = Path(f"/proc/{child.pid}/status")
    while child.poll() is None:
        try:
            text = path.read_text()
        except OSError:
            break
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                peaks[key] = max(peaks.get(key, 0), int(value.split()[0]))
        time.sleep(0.02)
    return peaks


def bench_rebuild(home: Path, events: int, refs: int) -> dict[str, Any]:
    """The ledger of `events` mixed events is made in this process; the rebuild is timed as
    a user runs it, ``imageledger --home HOME rebuild --json`` in a process of its own, whose
    peak RSS is the rebuild's alone (this process's holds the setup's appends). The ceiling
    (reading and decoding every stored event) is measured here, on the same ledger."""
    cache = ImageCache(home, durability="nosync")
    try:
        t0 = time.perf_counter()
        append_mixed_events(cache, events, refs)
        append_s = time.perf_counter() - t0
        ceiling_s = _read_and_decode(cache)
    finally:
        cache.close()
    command = [*imageledger_command(), "--home", str(home), "rebuild", "--json"]
    t0 = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = _sample_memory(child)
    out, err = child.communicate()
    rebuild_s = time.perf_counter() - t0
    if child.returncode != 0:
        msg = f"imageledger rebuild failed ({child.returncode}): {err[-500:]}"
        raise RuntimeError(msg)
    report = json.loads(out)
    verify = subprocess.run(
        [*imageledger_command(), "--home", str(home), "rebuild", "--verify", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        "events": report["events"],
        "ceiling_events_per_s": round(report["events"] / ceiling_s),
        # The rebuild process's memory, sampled every 20 ms (KiB -> MiB): its own (heap,
        # anonymous) and all it had mapped, which includes the pages of the ledger file LMDB
        # maps and the replay reads once (page cache, which the kernel reclaims at will).
        "peak_anon_mib": round(peaks.get("RssAnon", 0) / 1024),
        "peak_rss_mib": round(peaks.get("VmHWM", 0) / 1024),
        "peak_file_mib": round(peaks.get("RssFile", 0) / 1024),
        "append_events_per_s": round(events / append_s),
        "rebuild_seconds": round(rebuild_s, 2),
        "rebuild_events_per_s": round(report["events"] / rebuild_s),
        "rebuilt_identical": report["identical"] and verify.returncode == 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imageledger bench cache", description=__doc__)
    parser.add_argument("--refs", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=100_000, help="get() calls measured")
    parser.add_argument(
        "--use-rounds", type=int, default=300, help="use()/release() pairs measured per size"
    )
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="imageledger-bench-", dir=args.dir))
    try:
        uses = [
            bench_use(base / f"use-{refs}-{threads}", refs, args.use_rounds // threads, threads)
            for threads in (1, 8)
            for refs in (10, args.refs)
        ]
        index_small = bench_index(base / "index-small", 10, 10)
        index_large = bench_index(base / "index-large", args.refs, 30)
        reads = bench_reads(base / "reads", args.refs, args.rounds)
        rebuild = bench_rebuild(base / "rebuild", args.events, args.refs)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    result: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "use": uses,
        "index": [index_small, index_large],
        "reads": reads,
        "rebuild": rebuild,
        "goals": {
            "get_p99_under_50us": reads["get_p99_us"] < 50,
            "index_json_adds_under_20ms": index_large["remove_p50_ms"]
            - index_small["remove_p50_ms"]
            < 20,
            "list_10k_under_20ms": reads["list_p99_ms"] < 20,
            "list_10k_after_commit_under_20ms": reads["list_after_commit_p99_ms"] < 20,
            "list_10k_first_in_process_under_20ms": reads["list_first_p99_ms"] < 20,
            "rebuild_at_least_100k_events_per_s": rebuild["rebuild_events_per_s"] >= 100_000,
        },
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"python {result['python']} on {result['machine']}")
        for use in result["use"]:
            print(
                f"use+release p50 {use['use_release_p50_ms']} ms   p99 "
                f"{use['use_release_p99_ms']} ms   (sqlite p50 {use['sqlite_p50_ms']} ms   p99 "
                f"{use['sqlite_p99_ms']} ms)   {use['refs']} refs, {use['threads']} threads"
            )
        for index in result["index"]:
            print(
                f"remove (untag, index.json rewritten) p50 {index['remove_p50_ms']} ms   p99 "
                f"{index['remove_p99_ms']} ms   ({index['refs']} refs, index.json "
                f"{index['index_bytes']} bytes)"
            )
        print(
            f"get   p50 {reads['get_p50_us']} us   p99 {reads['get_p99_us']} us   "
            f"(dict lookup p99 {reads['dict_get_p99_us']} us)   "
            f"({reads['refs']} refs; goal p99 < 50 us)"
        )
        print(
            f"list  p50 {reads['list_p50_ms']} ms   p99 {reads['list_p99_ms']} ms   (goal < 20 ms)"
        )
        print(
            f"asyncio Image.list p50 {reads['async_list_p50_ms']} ms   "
            f"p99 {reads['async_list_p99_ms']} ms   (nothing changed)"
        )
        print(
            f"list after a commit p50 {reads['list_after_commit_p50_ms']} ms   "
            f"p99 {reads['list_after_commit_p99_ms']} ms"
        )
        print(
            f"first list of a process p50 {reads['list_first_p50_ms']} ms   "
            f"p99 {reads['list_first_p99_ms']} ms"
        )
        print(
            f"rebuild {rebuild['events']} events in {rebuild['rebuild_seconds']} s = "
            f"{rebuild['rebuild_events_per_s']} events/s (goal >= 100000; reading and decoding "
            f"alone {rebuild['ceiling_events_per_s']} events/s; peak RSS "
            f"{rebuild['peak_rss_mib']} MiB); "
            f"identical={rebuild['rebuilt_identical']}"
        )
        print(f"append (for setup) {rebuild['append_events_per_s']} events/s")
        for goal, met in result["goals"].items():
            print(f"  {goal}: {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
