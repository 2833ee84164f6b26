"""The audit log's costs (issue 11): what the Merkle tree adds to a durable append, how fast
`audit verify` and `audit export --jsonl` go over a big ledger, and how long a proof takes.

Run as ``python -m imageledger.tools.bench_audit`` (or ``imageledger bench audit``). One run:

1. **the tree's cost on the hot path**: a durable `use` then `release` through the API (what a
   runtime pays per sandbox start and stop) on a cache of ``--refs`` references, p50/p99 of
   ``--use-rounds`` pairs, 1 thread, beside the same pairs with the tree's fold switched off
   **for that row only** (the peer: the cost of the tree is the difference; nothing else a
   command does is switched off, the checkpoint signing included); rounds interleaved;
2. a ledger of ``--events`` mixed events (`bench_cache.append_mixed_events`, not durable: the
   setup), a checkpoint signed, then timed: `audit verify` (every leaf recomputed from the
   stored records, the tree and the checkpoint checked), `audit export --jsonl` of the whole
   log into a sink that only counts bytes, and ``--proofs`` inclusion and consistency proofs
   at random positions (p50/p99).

The tree's share is also measured at 8 threads (blocks of rounds alternating), and
`audit export --tiles` of the big ledger into a fresh directory is timed.

Goals (issue 11): the tree < 10% of a durable append (1 and 8 threads); verify >= 200,000
events/s; the tiles export >= 100,000 events/s; a proof's p99 < 5 ms at 1,000,000 events.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from imageledger.cache import ImageCache, internals
from imageledger.storage import tlog
from imageledger.tools.bench_cache import (
    _durable_cache,
    _in_threads,
    _percentile,
    _sample_memory,
    append_mixed_events,
)
from imageledger.tools.bench_pull import imageledger_command

GOAL_TREE_SHARE = 0.10
GOAL_VERIFY_PER_S = 200_000
GOAL_PROOF_P99_S = 0.005


def bench_tree_cost(home: Path, refs: int, rounds: int) -> dict[str, Any]:
    cache, names = _durable_cache(home, refs)
    fold = tlog.TreeStore.fold
    samples: dict[str, list[float]] = {"with the tree": [], "tree switched off": []}
    try:
        for i in range(rounds * 2):
            row = "with the tree" if i % 2 == 0 else "tree switched off"
            if row == "tree switched off":
                tlog.TreeStore.fold = lambda self, txn, records: None  # type: ignore[method-assign]
            name, holder = names[(i * 7919) % refs], f"sandbox-{i}"
            t0 = time.perf_counter()
            cache.use(name, holder=holder)
            cache.release(holder)
            samples[row].append(time.perf_counter() - t0)
            tlog.TreeStore.fold = fold  # type: ignore[method-assign]
    finally:
        tlog.TreeStore.fold = fold  # type: ignore[method-assign]
        cache.close()
    result: dict[str, Any] = {"refs": refs, "pairs": rounds}
    for row, values in samples.items():
        kept = values[1:]  # the first pair of a process signs the first checkpoint
        result[row] = {
            "p50_ms": round(_percentile(kept, 0.5) * 1e3, 3),
            "p99_ms": round(_percentile(kept, 0.99) * 1e3, 3),
        }
    on, off = result["with the tree"]["p50_ms"], result["tree switched off"]["p50_ms"]
    result["tree_share_p50"] = round((on - off) / on, 3) if on else None
    return result


def bench_tree_cost_threads(home: Path, refs: int, rounds: int, threads: int) -> dict[str, Any]:
    """As `bench_tree_cost` with `threads` threads doing pairs at once (their appends share
    group commits, and the tree is folded once per commit): blocks of rounds alternate."""
    cache, names = _durable_cache(home, refs)
    fold = tlog.TreeStore.fold
    samples: dict[str, list[float]] = {"with the tree": [], "tree switched off": []}

    def pair(thread: int, i: int) -> float:
        name, holder = names[(i * 7919 + thread) % refs], f"sandbox-{thread}-{i}"
        t0 = time.perf_counter()
        cache.use(name, holder=holder)
        cache.release(holder)
        return time.perf_counter() - t0

    try:
        cache.use(names[0], holder="first")  # the first checkpoint is signed here
        for block in range(4):
            row = "with the tree" if block % 2 == 0 else "tree switched off"
            if row == "tree switched off":
                tlog.TreeStore.fold = lambda self, txn, records: None  # type: ignore[method-assign]
            t0 = time.perf_counter()
            samples[row] += _in_threads(pair, threads, rounds // 2)
            tlog.TreeStore.fold = fold  # type: ignore[method-assign]
            samples[row + " seconds"] = [
                *samples.get(row + " seconds", []),
                time.perf_counter() - t0,
            ]
    finally:
        tlog.TreeStore.fold = fold  # type: ignore[method-assign]
        cache.close()
    on = _percentile(samples["with the tree"], 0.5)
    off = _percentile(samples["tree switched off"], 0.5)
    return {
        "refs": refs,
        "threads": threads,
        "with the tree": {"p50_ms": round(on * 1e3, 3)},
        "tree switched off": {"p50_ms": round(off * 1e3, 3)},
        "tree_share_p50": round((on - off) / on, 3) if on else None,
    }


def bench_big_ledger(home: Path, events: int, refs: int, proofs: int) -> dict[str, Any]:
    with ImageCache(home, durability="nosync", audit_interval=1e9) as cache:
        t0 = time.perf_counter()
        append_mixed_events(cache, events, refs)
        append_s = time.perf_counter() - t0
        cache.audit.checkpoint()
        t0 = time.perf_counter()
        report = cache.audit.verify()
        verify_s = time.perf_counter() - t0
        written = 0

        def sink(text: str) -> None:
            nonlocal written
            written += len(text)

        t0 = time.perf_counter()
        cache.audit.export_jsonl(sink)
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _signed, tile_files = cache.audit.export_tiles(str(home.parent / "tiles"))
        tiles_s = time.perf_counter() - t0
        size = report.events
        rng = random.Random(7)
        inclusion, consistency = [], []
        for _ in range(proofs):
            position = rng.randint(1, size)
            t0 = time.perf_counter()
            cache.audit.prove_inclusion(position, size)
            inclusion.append(time.perf_counter() - t0)
            first = rng.randint(1, size)
            t0 = time.perf_counter()
            cache.audit.prove_consistency(first, size)
            consistency.append(time.perf_counter() - t0)
        with internals(cache).ledger.tree.read() as txn:
            tiles = sum(1 for _ in internals(cache).ledger.tree.stored_tiles(txn))
    memory = _command_memory(home, ["audit", "export", "--jsonl"])
    memory.update(_command_memory(home, ["audit", "export", "--tiles", str(home.parent / "t2")]))
    return {
        "events": size,
        **memory,
        "append_events_per_s": round(events / append_s),
        "verify_seconds": round(verify_s, 2),
        "verify_events_per_s": round(size / verify_s),
        "export_jsonl_seconds": round(export_s, 2),
        "export_jsonl_events_per_s": round(size / export_s),
        "export_jsonl_mib": round(written / 2**20, 1),
        "export_tiles_seconds": round(tiles_s, 2),
        "export_tiles_events_per_s": round(size / tiles_s),
        "export_tiles_files": tile_files,
        "inclusion_p50_ms": round(_percentile(inclusion, 0.5) * 1e3, 3),
        "inclusion_p99_ms": round(_percentile(inclusion, 0.99) * 1e3, 3),
        "consistency_p50_ms": round(_percentile(consistency, 0.5) * 1e3, 3),
        "consistency_p99_ms": round(_percentile(consistency, 0.99) * 1e3, 3),
        "stored_tiles": tiles,
    }


def _command_memory(home: Path, command: list[str]) -> dict[str, int]:
    """The peak memory of its own (RssAnon, MiB) of an `imageledger` command run as a user
    runs it, its output thrown away: the exports stream, so it must not grow with the log."""
    child = subprocess.Popen(
        [*imageledger_command(), "--home", str(home), *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    peaks = _sample_memory(child)
    child.wait()
    name = "_".join(part.strip("-") for part in command[:3] if not part.startswith("/"))
    return {f"{name}_peak_anon_mib": round(peaks.get("RssAnon", 0) / 1024)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imageledger bench audit", description=__doc__)
    parser.add_argument("--refs", type=int, default=10_000)
    parser.add_argument("--use-rounds", type=int, default=300)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--proofs", type=int, default=200)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="imageledger-bench-audit-", dir=args.dir))
    try:
        print("bench audit: the tree's cost on durable use+release ...", file=sys.stderr)
        tree = bench_tree_cost(base / "use", args.refs, args.use_rounds)
        tree8 = bench_tree_cost_threads(base / "use8", args.refs, args.use_rounds // 8, 8)
        print(f"bench audit: a ledger of {args.events:,} events ...", file=sys.stderr)
        big = bench_big_ledger(base / "big", args.events, args.refs, args.proofs)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    proof_p99 = max(big["inclusion_p99_ms"], big["consistency_p99_ms"]) / 1e3
    result = {
        "python": platform.python_version(),
        "tree_cost": tree,
        "tree_cost_8_threads": tree8,
        "big_ledger": big,
        "goals": {
            "tree_share_met": all(
                t["tree_share_p50"] is not None and t["tree_share_p50"] < GOAL_TREE_SHARE
                for t in (tree, tree8)
            ),
            "verify_met": big["verify_events_per_s"] >= GOAL_VERIFY_PER_S,
            "proof_p99_met": proof_p99 < GOAL_PROOF_P99_S,
            "export_tiles_met": big["export_tiles_events_per_s"] >= 100_000,
        },
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    on, off = tree["with the tree"], tree["tree switched off"]
    print(f"imageledger audit benchmark (python {result['python']})")
    print(
        f"durable use+release, {tree['refs']:,} refs, p50/p99: {on['p50_ms']}/{on['p99_ms']} ms;"
        f" the tree switched off: {off['p50_ms']}/{off['p99_ms']} ms; the tree's share of p50"
        f" {tree['tree_share_p50']:.1%} (goal < 10%)"
    )
    on8, off8 = tree8["with the tree"], tree8["tree switched off"]
    print(
        f"8 threads: p50 {on8['p50_ms']} ms, the tree switched off {off8['p50_ms']} ms;"
        f" the tree's share {tree8['tree_share_p50']:.1%}"
    )
    print(
        f"export --tiles {big['export_tiles_events_per_s']:,} events/s"
        f" ({big['export_tiles_files']:,} files; goal >= 100,000)"
    )
    print(
        f"{big['events']:,} events: audit verify {big['verify_events_per_s']:,} events/s"
        f" (goal >= 200,000), export --jsonl {big['export_jsonl_events_per_s']:,} events/s"
        f" ({big['export_jsonl_mib']} MiB), proofs p50/p99 inclusion"
        f" {big['inclusion_p50_ms']}/{big['inclusion_p99_ms']} ms, consistency"
        f" {big['consistency_p50_ms']}/{big['consistency_p99_ms']} ms (goal p99 < 5 ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
