"""Cold pulls of one big image from a local registry: imageledger vs ``skopeo copy``.

Run as ``python -m imageledger.tools.bench_pull`` (or ``imageledger bench pull``). One run:

1. builds an image of ``--size-mib`` MiB of incompressible random bytes in ``--layers`` gzip
   layers (one file per layer) as an OCI layout with ``imageledger.tools.imagebuild``;
2. starts a throwaway plain-HTTP registry (``imageledger.tools.localregistry``) and pushes the
   image to it as ``HOST/bench/big:1`` with ``skopeo copy`` (skopeo keeps gzip layers as
   they are, so the registry serves exactly the built blobs);
3. runs ``--rounds`` rounds, each timing both clients once, interleaved (odd rounds
   imageledger first, even rounds skopeo first):

   - imageledger: ``ImageCache(fresh home)`` + ``pull(ref, options=RegistryOptions(insecure=
     {HOST}))`` + ``close()``, in this process: a cold pull, every blob downloaded, checked
     against its digest and size, fsynced and recorded in the ledger;
   - skopeo: ``skopeo copy --src-tls-verify=false docker://HOST/bench/big:1 oci:DIR:big``
     into a fresh directory (a process per round, as one would run it).

   Before each timed pull the previous round's output is removed and ``sync()`` is called
   (untimed), so neither client pays for the other's writeback.

Reported: the per-round times, their medians, the median of the per-round ratios
imageledger/skopeo and whether it meets the goal (ratio <= 1.0); the header gives the CPUs, the
Python, skopeo and registry versions and the filesystem of the working directory. Everything
(registry, temporary directories) is cleaned up on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from imageledger.cache import ImageCache
from imageledger.storage.oci import host_platform
from imageledger.storage.registryoptions import RegistryOptions
from imageledger.tools import localregistry
from imageledger.tools.bench_ledger import (
    cpu_counts,
    dist_version,
    filesystem_of,
    load_average,
    scratch_dir,
)
from imageledger.tools.imagebuild import BuiltImage, ImageSpec, build_image, build_oci_layout
from imageledger.tools.logs import configure_logging

GOAL_RATIO: Final = 1.0
"""imageledger's median per-round time / skopeo's must not exceed this."""
MIB: Final = 1 << 20
REPOSITORY: Final = "bench/big"
TAG: Final = "1"
LAYOUT_NAME: Final = "big"
SKOPEO_TIMEOUT: Final = 600.0
IMAGELEDGER: Final = "imageledger"
SKOPEO: Final = "skopeo"


class BenchError(RuntimeError):
    """A tool failed or produced something other than the pushed image."""


# --------------------------------------------------------------------------- the image


def build_big_image(directory: Path, size_mib: int, layers: int) -> BuiltImage:
    """Write an OCI layout of one image (named `LAYOUT_NAME`) of `size_mib` MiB of random bytes
    split over `layers` gzip layers to `directory`; return what was built."""
    total = size_mib * MIB
    sizes = [total // layers] * layers
    sizes[-1] += total - sum(sizes)
    host = host_platform()
    spec = ImageSpec(
        layers=tuple({f"bench/layer{i}.bin": os.urandom(n)} for i, n in enumerate(sizes)),
        compression="gzip",
        architecture=host.architecture,
        variant=host.variant,
        cmd=None,
        names=(LAYOUT_NAME,),
    )
    image = build_image(spec)
    build_oci_layout(directory, [image])
    return image


# --------------------------------------------------------------------------- skopeo


def _run_skopeo(skopeo: str, scratch: Path, arguments: Sequence[str]) -> str:
    """``skopeo --insecure-policy --tmpdir SCRATCH ARGUMENTS``, never with the user's auth file;
    its stdout. Raises `BenchError` with skopeo's stderr when it fails."""
    scratch.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["REGISTRY_AUTH_FILE"] = str(scratch / "auth.json")
    command = [skopeo, "--insecure-policy", "--tmpdir", str(scratch), *arguments]
    result = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=SKOPEO_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        msg = f"{' '.join(command)} failed (exit {result.returncode}):\n{result.stderr.strip()}"
        raise BenchError(msg)
    return result.stdout


def _skopeo_version(skopeo: str) -> str:
    try:
        out = subprocess.run(
            [skopeo, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except OSError:
        return "unknown"
    return out.strip().removeprefix("skopeo version ").strip() or "unknown"


def _registry_version() -> str:
    try:
        out = subprocess.run(
            [localregistry.registry_binary(), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError:
        return "unknown"
    return (out.stdout or out.stderr).strip() or "unknown"


def push(skopeo: str, scratch: Path, layout: Path, host: str) -> str:
    """Push `layout`'s image to ``HOST/bench/big:1``; the manifest digest the registry has."""
    digest_file = scratch / "push-digest"
    _run_skopeo(
        skopeo,
        scratch,
        [
            "copy",
            "--retry-times",
            "0",
            "--dest-tls-verify=false",
            "--dest-no-creds",
            "--digestfile",
            str(digest_file),
            f"oci:{layout}:{LAYOUT_NAME}",
            f"docker://{host}/{REPOSITORY}:{TAG}",
        ],
    )
    return digest_file.read_text().strip()


# --------------------------------------------------------------------------- one pull each


@dataclass(frozen=True)
class Timing:
    """One pull: wall-clock seconds, and CPU seconds (user + system) of the client."""

    seconds: float
    cpu_seconds: float


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def pull_imageledger(home: Path, reference: str, host: str, expected: str) -> Timing:
    """``ImageCache(home)`` + pull + close, timed (CPU: this process, all its threads); checks
    the manifest digest."""
    options = RegistryOptions(insecure=frozenset({host}))
    cpu = _cpu_seconds(resource.RUSAGE_SELF)
    began = time.perf_counter()
    cache = ImageCache(home)
    try:
        handle = cache.pull(reference, options=options)
    finally:
        cache.close()
    elapsed = time.perf_counter() - began
    cpu = _cpu_seconds(resource.RUSAGE_SELF) - cpu
    if handle.manifest_digest != expected:
        msg = f"imageledger pulled {handle.manifest_digest}, the registry has {expected}"
        raise BenchError(msg)
    return Timing(elapsed, cpu)


def pull_skopeo(
    skopeo: str, scratch: Path, destination: Path, reference: str, expected: str
) -> Timing:
    """``skopeo copy docker://REFERENCE oci:DESTINATION:big``, timed (CPU: the skopeo
    process); checks the manifest digest the layout's index.json names."""
    arguments = [
        "copy",
        "--retry-times",
        "0",
        "--src-tls-verify=false",
        "--src-no-creds",
        f"docker://{reference}",
        f"oci:{destination}:{LAYOUT_NAME}",
    ]
    cpu = _cpu_seconds(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    _run_skopeo(skopeo, scratch, arguments)
    elapsed = time.perf_counter() - began
    cpu = _cpu_seconds(resource.RUSAGE_CHILDREN) - cpu
    index = json.loads((destination / "index.json").read_text())
    digests = [m.get("digest") for m in index.get("manifests", [])]
    if digests != [expected]:
        msg = f"skopeo wrote {digests}, the registry has {expected}"
        raise BenchError(msg)
    return Timing(elapsed, cpu)


# --------------------------------------------------------------------------- results


@dataclass
class Round:
    number: int
    first: str
    imageledger: Timing
    skopeo: Timing

    @property
    def imageledger_seconds(self) -> float:
        return self.imageledger.seconds

    @property
    def skopeo_seconds(self) -> float:
        return self.skopeo.seconds

    @property
    def ratio(self) -> float:
        return self.imageledger.seconds / self.skopeo.seconds

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.number,
            "first": self.first,
            "imageledger_seconds": round(self.imageledger_seconds, 4),
            "skopeo_seconds": round(self.skopeo_seconds, 4),
            "ratio": round(self.ratio, 4),
            "imageledger_cpu_seconds": round(self.imageledger.cpu_seconds, 4),
            "skopeo_cpu_seconds": round(self.skopeo.cpu_seconds, 4),
        }


def summarize(rounds: Sequence[Round], image_bytes: int) -> dict[str, Any]:
    imageledger = statistics.median(r.imageledger_seconds for r in rounds)
    skopeo = statistics.median(r.skopeo_seconds for r in rounds)
    ratio = statistics.median(r.ratio for r in rounds)
    return {
        "imageledger_median_seconds": round(imageledger, 4),
        "skopeo_median_seconds": round(skopeo, 4),
        "imageledger_median_mib_per_s": round(image_bytes / MIB / imageledger, 1),
        "skopeo_median_mib_per_s": round(image_bytes / MIB / skopeo, 1),
        "median_ratio": round(ratio, 4),
        "imageledger_median_cpu_seconds": round(
            statistics.median(r.imageledger.cpu_seconds for r in rounds), 4
        ),
        "skopeo_median_cpu_seconds": round(
            statistics.median(r.skopeo.cpu_seconds for r in rounds), 4
        ),
        "goal_ratio": GOAL_RATIO,
        "goal_met": ratio <= GOAL_RATIO,
    }


def _print_text(
    facts: dict[str, Any], image: dict[str, Any], rounds: Sequence[Round], summary: dict[str, Any]
) -> None:
    fs = facts["filesystem"]
    cpus = facts["cpus"]
    print("imageledger pull benchmark: cold pulls from a local registry, imageledger vs skopeo")
    print(f"python         {facts['python']} on {facts['platform']}")
    print(f"cpus           {cpus['usable']} usable of {cpus['cpu_count']}")
    print(
        f"load average   at start {facts['load_average_at_start']}, "
        f"at end {facts['load_average_at_end']}"
    )
    print(f"skopeo         {facts['skopeo']}")
    print(f"registry       {facts['registry']} (plain HTTP on 127.0.0.1, filesystem storage)")
    print(f"imageledger    httpx {facts['httpx']}, {facts['max_concurrent_layers']} layers at once")
    print(
        f"work dir       {facts['work_dir']} on {fs['type']} ({fs['device']} at "
        f"{fs['mount_point']}, {fs['options']})"
    )
    print(
        f"image          {image['layers']} gzip layers of random bytes, {image['blob_mib']:.1f} "
        f"MiB of blobs ({image['size_mib']} MiB of files); {image['manifest_digest']}"
    )
    print()
    header = (
        f"{'round':>6}  {'first':11}  {'imageledger s':>13}  {'skopeo s':>9}  {'ratio':>6}  "
        f"{'imageledger cpu s':>17}  {'skopeo cpu s':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in rounds:
        print(
            f"{r.number:>6}  {r.first:11}  {r.imageledger_seconds:>13.3f}  "
            f"{r.skopeo_seconds:>9.3f}  {r.ratio:>6.3f}  "
            f"{r.imageledger.cpu_seconds:>17.3f}  {r.skopeo.cpu_seconds:>12.3f}"
        )
    print("-" * len(header))
    print(
        f"{'median':>6}  {'':11}  {summary['imageledger_median_seconds']:>13.3f}  "
        f"{summary['skopeo_median_seconds']:>9.3f}  {summary['median_ratio']:>6.3f}  "
        f"{summary['imageledger_median_cpu_seconds']:>17.3f}  "
        f"{summary['skopeo_median_cpu_seconds']:>12.3f}"
    )
    print()
    print(
        f"throughput     imageledger {summary['imageledger_median_mib_per_s']:.0f} MiB/s, "
        f"skopeo {summary['skopeo_median_mib_per_s']:.0f} MiB/s (medians; ratio column: "
        "imageledger s / skopeo s)"
    )
    met = "met" if summary["goal_met"] else "NOT met"
    print(
        f"ratio          imageledger/skopeo, median of per-round ratios: "
        f"{summary['median_ratio']:.3f}; goal <= {GOAL_RATIO:g}: {met}"
    )


# --------------------------------------------------------------------------- main


def at_least_one(text: str) -> int:
    """A positive integer argument (public: bench_cli parses its counts the same way)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"expected a positive integer, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m imageledger.tools.bench_pull",
        description="Cold pulls from a local registry: imageledger vs skopeo copy.",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where to make the (temporary, removed) working directory; default a fresh "
        "temporary directory not on a memory filesystem",
    )
    parser.add_argument("--rounds", type=at_least_one, default=5, help="rounds (5)")
    parser.add_argument("--size-mib", type=at_least_one, default=200, help="image size (200)")
    parser.add_argument("--layers", type=at_least_one, default=4, help="layers (4)")
    parser.add_argument("--skopeo", default="skopeo", help="the skopeo executable (skopeo)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return parser


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], list[Round]]:
    """Build, push and measure in `work`: the report (facts, settings, image, rounds, summary,
    as JSON values) and the rounds."""
    facts: dict[str, Any] = {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cpus": cpu_counts(),
        "load_average_at_start": load_average(),
        "skopeo": _skopeo_version(args.skopeo),
        "registry": _registry_version(),
        "httpx": dist_version("httpx"),
        "max_concurrent_layers": RegistryOptions().max_concurrent_layers,
        "work_dir": str(work),
        "filesystem": filesystem_of(work),
    }
    if shutil.which(args.skopeo) is None:
        msg = f"{args.skopeo} is not installed (apt-get install skopeo)"
        raise BenchError(msg)
    scratch = work / "skopeo-tmp"
    _progress(f"building a {args.size_mib} MiB image in {args.layers} layers ...")
    built = build_big_image(work / "layout", args.size_mib, args.layers)
    blob_bytes = sum(layer.size for layer in built.layers) + len(built.config)
    image: dict[str, Any] = {
        "size_mib": args.size_mib,
        "layers": args.layers,
        "blob_bytes": blob_bytes,
        "blob_mib": blob_bytes / MIB,
        "manifest_digest": built.manifest_digest,
    }
    del built  # the layer bytes: a few hundred MiB
    rounds: list[Round] = []
    with localregistry.running(work / "registry") as registry:
        reference = registry.reference(f"{REPOSITORY}:{TAG}")
        _progress(f"pushing to {reference} ...")
        digest = push(args.skopeo, scratch, work / "layout", registry.host)
        if digest != image["manifest_digest"]:
            msg = f"the registry has {digest}, the built manifest is {image['manifest_digest']}"
            raise BenchError(msg)
        shutil.rmtree(work / "layout")
        for number in range(1, args.rounds + 1):
            home = work / f"imageledger-r{number}"
            destination = work / f"skopeo-r{number}"
            order = [IMAGELEDGER, SKOPEO] if number % 2 else [SKOPEO, IMAGELEDGER]
            timings: dict[str, Timing] = {}
            for tool in order:
                os.sync()  # untimed: nobody pays for the previous pull's writeback
                if tool == IMAGELEDGER:
                    timings[tool] = pull_imageledger(home, reference, registry.host, digest)
                else:
                    timings[tool] = pull_skopeo(
                        args.skopeo, scratch, destination, reference, digest
                    )
            shutil.rmtree(home)
            shutil.rmtree(destination)
            result = Round(number, order[0], timings[IMAGELEDGER], timings[SKOPEO])
            rounds.append(result)
            _progress(
                f"round {number}/{args.rounds}: imageledger {result.imageledger_seconds:.3f} s, "
                f"skopeo {result.skopeo_seconds:.3f} s, ratio {result.ratio:.3f}"
            )
    facts["load_average_at_end"] = load_average()
    report = {
        "facts": facts,
        "settings": {
            "rounds": args.rounds,
            "size_mib": args.size_mib,
            "layers": args.layers,
            "skopeo": args.skopeo,
        },
        "image": image,
        "rounds": [r.to_json() for r in rounds],
        "summary": summarize(rounds, blob_bytes),
    }
    return report, rounds


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2): a return code, not an exit
        return 2 if e.code else 0
    work = scratch_dir(args.dir, "imageledger-bench-pull-")
    try:
        report, rounds = run(args, work)
    except KeyboardInterrupt:
        _progress("interrupted")
        return 130
    except (BenchError, localregistry.LocalRegistryError, subprocess.TimeoutExpired) as e:
        _progress(f"bench pull: {e}")
        return 1
    finally:  # the registry is stopped by `run`; this removes its storage and every pull
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        _print_text(report["facts"], report["image"], rounds, report["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
