"""`imageledger bench` with no benchmark named: the table of issue 10's figures is made from
each benchmark's own --json report, and judges each goal from the figures in it."""

from __future__ import annotations

from typing import Any

from imageledger.tools.bench_all import figures


def _reports(rebuild_rate: int, get_p99: float, use_p99: float) -> dict[str, dict[str, Any]]:
    use = [
        {"threads": t, "refs": r, "use_release_p99_ms": use_p99, "sqlite_p99_ms": 1.0}
        for t in (1, 8)
        for r in (10, 10_000)
    ]
    return {
        "cache": {
            "rebuild": {
                "events": 1_000_001,
                "rebuild_events_per_s": rebuild_rate,
                "ceiling_events_per_s": 250_000,
                "peak_rss_mib": 1_100,
                "peak_anon_mib": 200,
                "peak_file_mib": 900,
            },
            "reads": {"refs": 10_000, "get_p99_us": get_p99, "dict_get_p99_us": 0.5},
            "use": use,
            "index": [{"refs": 10, "remove_p50_ms": 2.0}, {"refs": 10_000, "remove_p50_ms": 9.0}],
        },
        "ledger": {
            "summary": {
                "ratio_threads": 8,
                "ratio_against": "eventsourcing.sqlite (WAL)",
                "ratio": 2.1,
                "goal_ratio": 2.5,
                "goal_met": False,
            }
        },
        "cli": {
            "settings": {"refs": 10_000},
            "summary": {
                "inspect_seconds": {"median": 0.16},
                "pass_seconds": {"median": 0.023},
                "inspect_ratio": {"median": 6.9},
                "goal_inspect_ratio": 4.0,
                "goal_inspect_met": False,
                "images_seconds": {"median": 0.24},
                "goal_images_seconds": 0.25,
                "goal_images_met": True,
            },
        },
        "pull": {
            "summary": {
                "goal_judged_on": "imageledger-cli",
                "imageledger-cli": {"median_seconds": 0.8, "median_ratio": 1.4},
                "skopeo": {"median_seconds": 0.57},
                "goal_ratio": 1.0,
                "goal_met": False,
            }
        },
    }


def test_the_table_judges_every_goal_from_the_reports() -> None:
    rows = {r["figure"]: r for r in figures(_reports(120_000, 30, 3))}
    assert rows["rebuild of 1,000,001 mixed events (events/s)"]["met"] is True  # 2.1x the ceiling
    assert rows["get p99, 10,000 refs"]["met"] is True
    assert rows["durable use+release p99, 1 thread(s), 10 vs 10,000 refs"]["met"] is True
    assert rows["what index.json adds to a remove, 10,000 refs"]["met"] is True  # +7 ms
    assert rows["durable appends/s at 8 threads"]["met"] is False
    assert rows["inspect --json, exec to exit"]["met"] is False
    assert rows["images --json, 10,000 refs"]["met"] is True
    assert rows["pull through the command line"]["ratio"] == 1.4


def test_a_missed_goal_is_reported_as_missed() -> None:
    table = figures(_reports(rebuild_rate=60_000, get_p99=80, use_p99=6))
    judged = {r["figure"]: r["met"] for r in table}
    assert judged["rebuild of 1,000,001 mixed events (events/s)"] is False
    assert judged["get p99, 10,000 refs"] is False
    assert judged["durable use+release p99, 1 thread(s), 10 vs 10,000 refs"] is False
    assert judged["durable use+release p99, 8 thread(s), 10 vs 10,000 refs"] is None  # reported
