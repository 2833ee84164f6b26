"""Short commands as a user runs them: wall time from exec to exit, beside ``python -c pass``.

Run as ``python -m imageledger.tools.bench_cli`` (or ``imageledger bench cli``). One run:

1. makes two homes: one holding one small real image (loaded from a docker archive built by
   ``imageledger.tools.imagebuild``), and one with ``--refs`` references (default 10,000),
   recorded straight through the ledger (pull events of fabricated manifests, no blobs: the
   commands measured read the views only);
2. runs one untimed warm-up of every command (the first run of a changed module compiles and
   caches its bytecode, as ``pip install`` does at install time: the figures are not about
   the compiler);
3. runs ``--rounds`` rounds; each starts, in an order that rotates from round to round:

   - ``python -c pass`` with the same interpreter (the peer: an interpreter's start and exit);
   - ``imageledger --home HOME1 inspect REF --json`` (the console script ``pip`` installed,
     ``python -m imageledger.tools.cli`` where there is none);
   - ``imageledger --home HOME2 images --json``;

   each a process with stdout read through a pipe (as a script reads it) and the environment
   as it is, but for ``PYTHONDONTWRITEBYTECODE`` (see 2).

Reported: per round the three wall times and ``inspect / pass``; medians, spread (min, max)
and the goals of issue 10: inspect's median per-round ratio <= 4, images' median < 250 ms.
The header gives the CPUs and the load average at the start and the end (other work on the
machine is the main noise), and which of the optional modules that slow every import
(rich, click, pygments, zstandard: installed by the test extra, loaded by structlog and httpx
when present) are installed; ``--hide-test-extras`` runs the commands as from a plain
install (see `bench_pull.hide_test_extras`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from imageledger.cache import ImageCache, current_actor, internals
from imageledger.domain.events import Batch
from imageledger.domain.model import OCI_MANIFEST, ImageConfig, ImageContent, Layer, Platform
from imageledger.tools.bench_ledger import cpu_counts, filesystem_of, load_average, scratch_dir
from imageledger.tools.bench_pull import (
    TEST_EXTRAS_LOADED,
    at_least_one,
    child_environment,
    hide_test_extras,
    imageledger_command,
)
from imageledger.tools.imagebuild import ImageSpec, build_docker_archive, build_image

GOAL_INSPECT_RATIO: Final = 4.0
"""inspect's wall time / ``python -c pass``'s, median of the per-round ratios."""
GOAL_IMAGES_SECONDS: Final = 0.250
"""``images --json`` with 10,000 references, median wall time."""
PASS = "python -c pass"
INSPECT = "inspect"
IMAGES = "images"
TOOLS: Final = (PASS, INSPECT, IMAGES)
REFERENCE: Final = "bench.local/inspect:1"
LAYER: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
TIMEOUT: Final = 120.0


class BenchError(RuntimeError):
    """A command failed or printed something other than what the home holds."""


# --------------------------------------------------------------------------- the homes


def _digest(kind: str, n: int) -> str:
    return "sha256:" + f"{kind}-{n}".encode().hex().ljust(64, "0")[:64]


def fabricated(n: int) -> ImageContent:
    """Image `n` of a big home: three layers of 10 MB, layers shared between images."""
    return ImageContent(
        manifest_digest=_digest("manifest", n),
        manifest_media_type=OCI_MANIFEST,
        manifest_size=1100,
        config=ImageConfig(_digest("config", n), env=(f"IMAGE={n}",), cmd=("/bin/sh",)),
        config_size=1500,
        platform=Platform("linux", "amd64"),
        layers=tuple(
            Layer(_digest("blob", n % 97 + i), LAYER, 10_000_000, _digest("diff", n % 97 + i), i)
            for i in range(3)
        ),
    )


def fill_home(home: Path, refs: int) -> None:
    """`refs` references pulled at one-second steps, a thousand to an append."""
    actor = current_actor()
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with ImageCache(home, durability="nosync") as cache:
        ledger = internals(cache).ledger
        for first in range(0, refs, 1000):
            with ledger.snapshot() as state:
                events = Batch(state.version, actor, start)
            for i in range(first, min(first + 1000, refs)):
                events.stamp = start + timedelta(seconds=i)
                events.pulled(f"bench.local/app{i}:1", "bench", fabricated(i), cached=False)
            ledger.append(events.events)
        count = len(cache.list())
    if count != refs:
        msg = f"the big home holds {count} references, not {refs}"
        raise BenchError(msg)


def small_home(work: Path) -> Path:
    """A home holding one real two-layer image as `REFERENCE`, loaded as a user loads it."""
    spec = ImageSpec(
        layers=({"etc/os-release": b"ID=bench\n"}, {"usr/bin/app": b"#!/bin/sh\n" * 100}),
        env=("PATH=/usr/bin:/bin",),
        cmd=("/usr/bin/app",),
        labels={"org.opencontainers.image.title": "bench"},
        names=(REFERENCE,),
    )
    archive = build_docker_archive(work / "small.tar", [build_image(spec)]).path
    home = work / "small-home"
    with ImageCache(home) as cache:
        cache.load(archive)
    return home


# --------------------------------------------------------------------------- one command


def run_timed(command: Sequence[str], env: dict[str, str]) -> tuple[float, bytes]:
    """Wall seconds from exec to exit (the output read as it comes), and the output."""
    began = time.perf_counter()
    done = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        timeout=TIMEOUT,
        check=False,
    )
    elapsed = time.perf_counter() - began
    if done.returncode != 0:
        msg = f"{' '.join(command)} exited {done.returncode}: {done.stderr.decode()[-2000:]}"
        raise BenchError(msg)
    return elapsed, done.stdout


@dataclass
class Round:
    number: int
    order: tuple[str, ...]
    seconds: dict[str, float]

    @property
    def ratio(self) -> float:
        return self.seconds[INSPECT] / self.seconds[PASS]

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.number,
            "order": list(self.order),
            "pass_seconds": round(self.seconds[PASS], 4),
            "inspect_seconds": round(self.seconds[INSPECT], 4),
            "images_seconds": round(self.seconds[IMAGES], 4),
            "inspect_ratio": round(self.ratio, 3),
        }


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def summarize(rounds: Sequence[Round]) -> dict[str, Any]:
    ratio = statistics.median(r.ratio for r in rounds)
    images = statistics.median(r.seconds[IMAGES] for r in rounds)
    return {
        "pass_seconds": _spread([r.seconds[PASS] for r in rounds]),
        "inspect_seconds": _spread([r.seconds[INSPECT] for r in rounds]),
        "images_seconds": _spread([r.seconds[IMAGES] for r in rounds]),
        "inspect_ratio": _spread([r.ratio for r in rounds]),
        "goal_inspect_ratio": GOAL_INSPECT_RATIO,
        "goal_inspect_met": ratio <= GOAL_INSPECT_RATIO,
        "goal_images_seconds": GOAL_IMAGES_SECONDS,
        "goal_images_met": images < GOAL_IMAGES_SECONDS,
    }


# --------------------------------------------------------------------------- main


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cpus": cpu_counts(),
        "load_average_at_start": load_average(),
        "test_extras_installed": [
            name for name in TEST_EXTRAS_LOADED if importlib.util.find_spec(name) is not None
        ],
        "test_extras_hidden": args.hide_test_extras,
        "bytecode_writes_disabled_in_caller": bool(os.environ.get("PYTHONDONTWRITEBYTECODE")),
        "work_dir": str(work),
        "filesystem": filesystem_of(work),
    }
    _progress(f"making a home of {args.refs} references ...")
    big = work / "big-home"
    fill_home(big, args.refs)
    small = small_home(work)
    imageledger = imageledger_command()
    commands = {
        PASS: [sys.executable, "-c", "pass"],
        INSPECT: [*imageledger, "--home", str(small), "inspect", REFERENCE, "--json"],
        IMAGES: [*imageledger, "--home", str(big), "images", "--json"],
    }
    hidden = hide_test_extras(work / "hidden") if args.hide_test_extras else None
    env = child_environment(hidden)
    for tool in TOOLS:  # the warm-up; also checks what the commands print
        _, out = run_timed(commands[tool], env)
        if tool == INSPECT and json.loads(out)["reference"] != REFERENCE:
            raise BenchError(f"inspect printed {out[:200]!r}")
        if tool == IMAGES and len(json.loads(out)) != args.refs:
            raise BenchError(f"images printed {len(json.loads(out))} handles")
    rounds: list[Round] = []
    for number in range(1, args.rounds + 1):
        shift = number % len(TOOLS)
        order = TOOLS[shift:] + TOOLS[:shift]
        seconds = {tool: run_timed(commands[tool], env)[0] for tool in order}
        rounds.append(Round(number, order, seconds))
        _progress(
            f"round {number}/{args.rounds}: pass {seconds[PASS] * 1e3:.0f} ms, inspect "
            f"{seconds[INSPECT] * 1e3:.0f} ms, images {seconds[IMAGES] * 1e3:.0f} ms"
        )
    facts["load_average_at_end"] = load_average()
    return {
        "facts": facts,
        "settings": {"rounds": args.rounds, "refs": args.refs, "command": imageledger},
        "rounds": [r.to_json() for r in rounds],
        "summary": summarize(rounds),
    }


def _print_text(report: dict[str, Any]) -> None:
    facts, summary = report["facts"], report["summary"]
    refs = report["settings"]["refs"]
    print("imageledger command-line benchmark: wall time from exec to exit")
    print(f"python         {facts['python']} on {facts['platform']}")
    print(f"cpus           {facts['cpus']['usable']} usable of {facts['cpus']['cpu_count']}")
    print(
        f"load average   at start {facts['load_average_at_start']}, "
        f"at end {facts['load_average_at_end']}"
    )
    installed = ", ".join(facts["test_extras_installed"]) or "none"
    hidden = (
        " (hidden from the commands: --hide-test-extras)" if facts["test_extras_hidden"] else ""
    )
    print(f"test extras    installed and loaded by the commands' dependencies: {installed}{hidden}")
    print()
    header = f"{'round':>5}  {'pass ms':>8}  {'inspect ms':>10}  {'ratio':>6}  {'images ms':>9}"
    print(header)
    print("-" * len(header))
    for r in report["rounds"]:
        print(
            f"{r['round']:>5}  {r['pass_seconds'] * 1e3:>8.1f}  {r['inspect_seconds'] * 1e3:>10.1f}"
            f"  {r['inspect_ratio']:>6.2f}  {r['images_seconds'] * 1e3:>9.1f}"
        )
    print("-" * len(header))
    for key in ("median", "min", "max"):
        print(
            f"{key:>5}  {summary['pass_seconds'][key] * 1e3:>8.1f}  "
            f"{summary['inspect_seconds'][key] * 1e3:>10.1f}  "
            f"{summary['inspect_ratio'][key]:>6.2f}  {summary['images_seconds'][key] * 1e3:>9.1f}"
        )
    print()
    inspect_met = "met" if summary["goal_inspect_met"] else "NOT met"
    images_met = "met" if summary["goal_images_met"] else "NOT met"
    print(
        f"inspect / python -c pass, median of per-round ratios: "
        f"{summary['inspect_ratio']['median']:.2f}; goal <= {GOAL_INSPECT_RATIO:g}: {inspect_met}"
    )
    print(
        f"images --json with {refs} references, median: "
        f"{summary['images_seconds']['median'] * 1e3:.0f} ms; goal < "
        f"{GOAL_IMAGES_SECONDS * 1e3:.0f} ms: {images_met}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m imageledger.tools.bench_cli",
        description="Short commands' wall time from exec to exit, beside python -c pass.",
    )
    parser.add_argument("--dir", type=Path, default=None, help="where to make the work dir")
    parser.add_argument("--rounds", type=at_least_one, default=11, help="rounds (11)")
    parser.add_argument("--refs", type=at_least_one, default=10_000, help="references (10000)")
    parser.add_argument(
        "--hide-test-extras",
        action="store_true",
        help="run the commands as from a plain install: hide rich, click, pygments and "
        "zstandard, which the test extra installs and the dependencies load when present",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2): a return code, not an exit
        return 2 if e.code else 0
    work = scratch_dir(args.dir, "imageledger-bench-cli-")
    try:
        report = run(args, work)
    except KeyboardInterrupt:
        _progress("interrupted")
        return 130
    except (BenchError, subprocess.TimeoutExpired) as e:
        _progress(f"bench cli: {e}")
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        _print_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
