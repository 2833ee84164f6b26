"""`imageledger bench` with no benchmark named: every benchmark, then one table of issues 10's
and 12's figures: figure, ours, the peer's (measured in the same run), ratio, goal, met or not.

Each benchmark runs as it does alone (`bench ledger`, `bench cache`, `bench cli`, `bench
pull`, with ``--json``), so a figure here is the figure there: nothing a user's command does
is switched off. ``--quick`` runs each with short settings (fewer rounds, smaller caches and
images: the figures are rougher and the sizes differ from the goals', and the table says so);
``--json`` prints the table and each benchmark's whole report.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from collections.abc import Callable
from typing import Any

from imageledger.tools import bench_cache, bench_cli, bench_ledger, bench_pull, bench_timetravel

QUICK: dict[str, list[str]] = {
    "ledger": ["--seconds", "1", "--rounds", "1"],
    "cache": ["--refs", "2000", "--events", "50000", "--rounds", "5000", "--use-rounds", "80"],
    "cli": ["--rounds", "3", "--refs", "2000"],
    "pull": ["--rounds", "1", "--size-mib", "50"],
    "timetravel": ["--events", "50000", "--refs", "2000", "--rounds", "30", "--cold", "1"],
}
MAINS: dict[str, Callable[[list[str] | None], int]] = {
    "ledger": bench_ledger.main,
    "cache": bench_cache.main,
    "cli": bench_cli.main,
    "pull": bench_pull.main,
    "timetravel": bench_timetravel.main,
}


def _run(name: str, quick: bool) -> dict[str, Any]:
    """One benchmark's --json report (its progress lines go to stderr as they do alone)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        MAINS[name]([*(QUICK[name] if quick else []), "--json"])
    text = out.getvalue()
    report: dict[str, Any] = json.loads(text[text.index("{") :])
    return report


def _row(
    figure: str, ours: str, peer: str, ratio: float | None, goal: str, met: bool | None
) -> dict[str, Any]:
    return {
        "figure": figure,
        "ours": ours,
        "peer": peer,
        "ratio": None if ratio is None else round(ratio, 2),
        "goal": goal,
        "met": met,
    }


def figures(reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    cache = reports["cache"]
    rebuild = cache["rebuild"]
    ceiling = rebuild["ceiling_events_per_s"]
    ours = rebuild["rebuild_events_per_s"]
    rows.append(
        _row(
            f"rebuild of {rebuild['events']:,} mixed events (events/s)",
            f"{ours:,}; peak memory {rebuild['peak_anon_mib']} MiB "
            f"(+ {rebuild['peak_file_mib']} MiB of the mapped ledger file)",
            f"read + decode only: {ceiling:,}",
            ceiling / ours,
            ">= 100,000/s, within 3x of the peer, peak memory < 300 MiB",
            ours >= 100_000 and ceiling / ours <= 3 and rebuild["peak_anon_mib"] < 300,
        )
    )
    reads = cache["reads"]
    rows.append(
        _row(
            f"get p99, {reads['refs']:,} refs",
            f"{reads['get_p99_us']} us",
            f"dict lookup {reads['dict_get_p99_us']} us",
            reads["get_p99_us"] / max(reads["dict_get_p99_us"], 0.01),
            "< 50 us",
            reads["get_p99_us"] < 50,
        )
    )
    uses = {(u["threads"], u["refs"]): u for u in cache["use"]}
    small, large = min(r for _, r in uses), max(r for _, r in uses)
    for threads in (1, 8):
        one, many = uses[threads, small], uses[threads, large]
        growth = many["use_release_p99_ms"] / max(one["use_release_p99_ms"], 0.001)
        rows.append(
            _row(
                f"durable use+release p99, {threads} thread(s), {small} vs {large:,} refs",
                f"{one['use_release_p99_ms']} / {many['use_release_p99_ms']} ms",
                f"eventsourcing.sqlite {one['sqlite_p99_ms']} / {many['sqlite_p99_ms']} ms",
                many["use_release_p99_ms"] / max(many["sqlite_p99_ms"], 0.001),
                "p99 < 5 ms, large within 1.5x of small" if threads == 1 else "reported",
                (many["use_release_p99_ms"] < 5 and growth <= 1.5) if threads == 1 else None,
            )
        )
    index_small, index_large = cache["index"]
    extra = index_large["remove_p50_ms"] - index_small["remove_p50_ms"]
    rows.append(
        _row(
            f"what index.json adds to a remove, {index_large['refs']:,} refs",
            f"+{extra:.1f} ms ({index_large['remove_p50_ms']} ms)",
            f"{index_small['refs']} refs: {index_small['remove_p50_ms']} ms",
            None,
            "< 20 ms extra",
            extra < 20,
        )
    )
    ledger = reports["ledger"]["summary"]
    rows.append(
        _row(
            f"durable appends/s at {ledger['ratio_threads']} threads",
            "imageledger",
            str(ledger["ratio_against"]),
            ledger["ratio"],
            f">= {ledger['goal_ratio']}x the peer",
            ledger["goal_met"],
        )
    )
    cli = reports["cli"]["summary"]
    refs = reports["cli"]["settings"]["refs"]
    rows.append(
        _row(
            "inspect --json, exec to exit",
            f"{cli['inspect_seconds']['median'] * 1e3:.0f} ms",
            f"python -c pass {cli['pass_seconds']['median'] * 1e3:.0f} ms",
            cli["inspect_ratio"]["median"],
            f"<= {cli['goal_inspect_ratio']}x",
            cli["goal_inspect_met"],
        )
    )
    rows.append(
        _row(
            f"images --json, {refs:,} refs",
            f"{cli['images_seconds']['median'] * 1e3:.0f} ms",
            "-",
            None,
            f"< {cli['goal_images_seconds'] * 1e3:.0f} ms",
            cli["goal_images_met"],
        )
    )
    pull = reports["pull"]["summary"]
    through = pull[pull["goal_judged_on"]]
    rows.append(
        _row(
            "pull through the command line",
            f"{through['median_seconds']} s",
            f"skopeo {pull['skopeo']['median_seconds']} s",
            through["median_ratio"],
            f"<= {pull['goal_ratio']}x",
            pull["goal_met"],
        )
    )
    if "timetravel" in reports:
        rows.extend(_time_travel(reports["timetravel"]))
    return rows


def _time_travel(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 12's figures (`bench timetravel`)."""
    size = f"{report['events']:,} events, {report['refs']:,} refs"
    return [
        _row(
            f"at(p).list() + inspect p99, {size}",
            f"{report['at_p99_ms']} ms (p50 {report['at_p50_ms']})",
            f"no checkpoint: p50 {report['cold_at_p50_s'] * 1e3:.0f} ms",
            report["cold_at_p50_s"] * 1e3 / max(report["at_p99_ms"], 0.001),
            "p99 < 500 ms",
            report["goals"]["at_p99_under_500ms"],
        ),
        _row(
            "view checkpoints' disk beside the log's",
            f"{report['checkpoints_mib']} MiB",
            f"log {report['log_mib']} MiB",
            report["checkpoint_share"],
            "< 50% of the log",
            report["goals"]["checkpoints_under_half_the_log"],
        ),
        _row(
            "events --json (events/s)",
            f"{report['events_json_per_s']:,}",
            f"read + decode only: {report['decode_ceiling_per_s']:,}",
            report["decode_ceiling_per_s"] / max(report["events_json_per_s"], 1),
            ">= 100,000/s",
            report["goals"]["events_json_100k_per_s"],
        ),
    ]


def _print_table(rows: list[dict[str, Any]], quick: bool) -> None:
    header = ("figure", "ours", "peer (same run)", "ratio", "goal", "met")
    lines = [
        (
            r["figure"],
            r["ours"],
            r["peer"],
            "-" if r["ratio"] is None else f"{r['ratio']}x",
            r["goal"],
            {True: "met", False: "NOT met", None: "-"}[r["met"]],
        )
        for r in rows
    ]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines, strict=True)]
    for line in (header, *lines):
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    if quick:
        print("(--quick: short runs at smaller sizes; the goals are judged at full size)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imageledger bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs of every benchmark")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args(argv)
    reports = {}
    for name in MAINS:
        print(f"bench {name} ...", file=sys.stderr, flush=True)
        reports[name] = _run(name, args.quick)
    rows = figures(reports)
    if args.json:
        print(json.dumps({"quick": args.quick, "figures": rows, "reports": reports}, indent=2))
    else:
        _print_table(rows, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
