"""The cache as it was (issue 12): how fast `at` answers on a big ledger, what its view
checkpoints cost on disk, and how fast `events --json` lists the log.

Run as ``python -m imageledger.tools.bench_timetravel`` (or ``imageledger bench timetravel``).
One run, on a ledger of ``--events`` mixed events over ``--refs`` references
(`bench_cache.append_mixed_events`, not durable: the setup):

1. the **peer**: `at` at a random point with view checkpoints switched off (for that row
   only: as on a ledger made before them): the whole log up to it replayed, ``--cold`` times;
2. ``imageledger rebuild`` as a process, as a user runs it: it remakes the views and their
   checkpoints (`runner.CHECKPOINT_EVERY`); its time, and the checkpoints' disk beside the
   log's (`df`'s ``ledger``);
3. **ours**: ``at(p).list()`` then ``at(p).inspect(ref)`` at ``--rounds`` random points, in
   one process (a debugging session, a server answering `--at`), p50/p99 wall time; and
   ``imageledger images --at P --json`` as a process at a few of them (what an engineer
   types);
4. ``imageledger events --json > /dev/null`` as a process over the whole log: events a second,
   beside what reading and decoding the records alone costs in this process (the ceiling).

Goals (issue 12): at's p99 < 500 ms at 1,000,000 events; the checkpoints < 50% of the log's
disk; events --json >= 100,000 events/s.
"""

from __future__ import annotations

import argparse
import json
import os
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
from imageledger.projections import runner
from imageledger.tools.bench_cache import _percentile, append_mixed_events
from imageledger.tools.bench_cli import run_timed
from imageledger.tools.bench_pull import imageledger_command

GOAL_AT_P99_S = 0.5
GOAL_SHARE = 0.5
GOAL_EVENTS_PER_S = 100_000


def _at(cache: ImageCache, position: int) -> float:
    t0 = time.perf_counter()
    past = cache.at(position)
    handles = past.list()
    if handles:
        past.inspect(handles[len(handles) // 2].reference)
    return time.perf_counter() - t0


def _run(home: Path, *args: str) -> tuple[float, bytes]:
    """`imageledger --home HOME ARGS` as a user runs it: its wall seconds and its output."""
    return run_timed([*imageledger_command(), "--home", str(home), *args], dict(os.environ))


def _events_per_s(home: Path, events: int) -> float:
    command = [*imageledger_command(), "--home", str(home), "events", "--json"]
    with open(os.devnull, "wb") as sink:
        t0 = time.perf_counter()
        subprocess.run(command, stdout=sink, check=True)
        return events / (time.perf_counter() - t0)


def _ceiling_per_s(cache: ImageCache) -> float:
    """Reading and decoding every record into its fields (`record_fields`), nothing written."""
    from imageledger.storage.ledgerformat import record_fields

    t0 = time.perf_counter()
    count = 0
    for _position, record in internals(cache).ledger.log_records():
        record_fields(record)
        count += 1
    return count / (time.perf_counter() - t0)


def bench(home: Path, events: int, refs: int, rounds: int, cold: int) -> dict[str, Any]:
    rng = random.Random(12)
    cache = ImageCache(home, durability="nosync")
    try:
        t0 = time.perf_counter()
        append_mixed_events(cache, events, refs)
        append_s = time.perf_counter() - t0
        head = internals(cache).ledger.head()
        # 1. The peer: `at` with no checkpoint (a ledger made before them), switched off for
        # this row only: with an interval past the log's end, `at` neither finds nor leaves
        # any, and replays the log from its start.
        every, runner.CHECKPOINT_EVERY = runner.CHECKPOINT_EVERY, 1 << 62
        try:
            cold_s = [_at(cache, rng.randint(1, head)) for _ in range(cold)]
        finally:
            runner.CHECKPOINT_EVERY = every
    finally:
        cache.close()
    # 2. The rebuild a user runs: views and checkpoints remade from the log.
    rebuild_s, _out = _run(home, "rebuild", "--json")
    _s, df = _run(home, "df", "--json")
    ledger = json.loads(df)["ledger"]
    # 3. Ours.
    with ImageCache(home) as cache:
        points = [rng.randint(1, head) for _ in range(rounds)]
        warm = [_at(cache, p) for p in points]
        ceiling = _ceiling_per_s(cache)
    cli = [_run(home, "images", "--at", str(p), "--json")[0] for p in points[:5]]
    # 4. The log listed.
    per_s = _events_per_s(home, head)
    return {
        "events": head,
        "refs": refs,
        "append_events_per_s": round(events / append_s),
        "cold_at_p50_s": round(_percentile(cold_s, 0.5), 3),
        "cold_at_max_s": round(max(cold_s), 3),
        "rebuild_seconds": round(rebuild_s, 1),
        "at_p50_ms": round(_percentile(warm, 0.5) * 1e3, 1),
        "at_p99_ms": round(_percentile(warm, 0.99) * 1e3, 1),
        "at_max_ms": round(max(warm) * 1e3, 1),
        "images_at_cli_p50_ms": round(_percentile(cli, 0.5) * 1e3),
        "log_mib": round(ledger["log_bytes"] / 2**20, 1),
        "checkpoints_mib": round(ledger["checkpoint_bytes"] / 2**20, 1),
        "checkpoint_share": ledger["checkpoint_share"],
        "events_json_per_s": round(per_s),
        "decode_ceiling_per_s": round(ceiling),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imageledger bench timetravel", description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--refs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=200, help="random points timed")
    parser.add_argument("--cold", type=int, default=3, help="points timed with no checkpoint")
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="imageledger-bench-timetravel-", dir=args.dir))
    try:
        print(f"bench timetravel: a ledger of {args.events:,} events ...", file=sys.stderr)
        figures = bench(base / "home", args.events, args.refs, args.rounds, args.cold)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    result = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        **figures,
        "goals": {
            "at_p99_under_500ms": figures["at_p99_ms"] < GOAL_AT_P99_S * 1e3,
            "checkpoints_under_half_the_log": figures["checkpoint_share"] < GOAL_SHARE,
            "events_json_100k_per_s": figures["events_json_per_s"] >= GOAL_EVENTS_PER_S,
        },
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    f = figures
    print(f"python {result['python']}, {result['cpus']} CPUs, load {result['load_average']}")
    print(
        f"at(p).list() + inspect, {f['events']:,} events, {f['refs']:,} refs: p50 "
        f"{f['at_p50_ms']} ms  p99 {f['at_p99_ms']} ms  max {f['at_max_ms']} ms   (peer, no "
        f"checkpoint: p50 {f['cold_at_p50_s']} s, max {f['cold_at_max_s']} s)"
    )
    print(f"images --at P --json as a process: p50 {f['images_at_cli_p50_ms']} ms")
    print(
        f"checkpoints {f['checkpoints_mib']} MiB beside the log's {f['log_mib']} MiB "
        f"({f['checkpoint_share']:.0%}); rebuild (views + checkpoints) {f['rebuild_seconds']} s"
    )
    print(
        f"events --json {f['events_json_per_s']:,} events/s   (reading + decoding alone "
        f"{f['decode_ceiling_per_s']:,} events/s)"
    )
    for goal, met in result["goals"].items():
        print(f"  {goal}: {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
