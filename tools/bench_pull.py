"""Cold pulls of one big image from a local registry: imageledger vs ``skopeo copy``.

Run as ``python -m imageledger.tools.bench_pull`` (or ``imageledger bench pull``). One run:

1. builds an image of ``--size-mib`` MiB of incompressible random bytes in ``--layers`` gzip
   layers (one file per layer) as an OCI layout with ``imageledger.tools.imagebuild``;
2. starts a throwaway plain-HTTP registry (``imageledger.tools.localregistry``) and pushes the
   image to it as ``HOST/bench/big:1`` with ``skopeo copy`` (skopeo keeps gzip layers as
   they are, so the registry serves exactly the built blobs);
3. runs ``--rounds`` rounds, each timing every client once, interleaved (the order rotates
   from round to round):

   - ``cli`` (imageledger through the command line, the figure of issue 10): ``imageledger
     --home FRESH pull HOST/bench/big:1 --insecure-registry HOST --json``, a process started
     as a user starts it (the console script ``pip`` installed), its stderr a pseudo-terminal
     by default (``--cli-stderr tty``: the progress bar draws as at a terminal; ``pipe``: as
     in a script, JSON log lines instead), logging as configured by the environment; wall
     time from exec to exit;
   - ``process`` (imageledger in process): ``ImageCache(fresh home)`` + ``pull(ref,
     options=RegistryOptions(insecure={HOST}))`` + ``close()`` in this process, its modules
     already loaded;
   - skopeo: ``skopeo copy --src-tls-verify=false docker://HOST/bench/big:1 oci:DIR:big``
     into a fresh directory (a process per round, as one would run it).

   Both imageledger clients make a cold pull: every blob downloaded, checked against its
   digest and size, fsynced and recorded in the ledger. ``--modes`` picks them (both by
   default).

   Before each timed pull the previous round's output is removed and ``sync()`` is called
   (untimed), so neither client pays for the other's writeback.

Reported: the per-round times, their medians, the median of the per-round ratios
imageledger/skopeo for each imageledger client and whether it meets the goal (ratio <= 1.0;
judged on the command line when it was measured); the header gives the CPUs, the
Python, skopeo and registry versions and the filesystem of the working directory. Everything
(registry, temporary directories) is cleaned up on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pty
import resource
import shutil
import statistics
import subprocess
import sys
import threading
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
"""imageledger in this process."""
CLI: Final = "imageledger-cli"
"""imageledger through its command line, a process."""
SKOPEO: Final = "skopeo"
MODES: Final = {"cli": CLI, "process": IMAGELEDGER}
CLI_TIMEOUT: Final = 600.0


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


def imageledger_command() -> list[str]:
    """The console script next to this interpreter, as a user runs it; the module otherwise."""
    script = Path(sys.executable).with_name("imageledger")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "imageledger.tools.cli"]


TEST_EXTRAS_LOADED: Final = ("rich", "click", "pygments", "zstandard")
"""Packages of the test extra (import-linter's rich and click, zstandard) that the command
line's dependencies load when they are installed (structlog renders with rich, httpx loads
its own command line and zstd decoder): absent from a plain ``pip install imageledger``."""


def hide_test_extras(directory: Path) -> Path:
    """A directory that, first on ``PYTHONPATH``, makes `TEST_EXTRAS_LOADED` look not
    installed (each a module that raises ImportError, which their importers expect): what a
    user of a plain install runs, measured in a development environment."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in TEST_EXTRAS_LOADED:
        (directory / f"{name}.py").write_text(
            f"raise ImportError('{name} is hidden by the benchmark (--hide-test-extras)')\n"
        )
    return directory


def child_environment(hidden: Path | None = None) -> dict[str, str]:
    """This process's environment for a measured command, but for ``PYTHONDONTWRITEBYTECODE``:
    an installed package has its bytecode compiled (pip does it at install time), and a
    figure of the command line is not one of Python's compiler. With `hidden` (see
    `hide_test_extras`) first on ``PYTHONPATH``."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if hidden is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hidden), env.get("PYTHONPATH")]))
    return env


def warm_up(hidden: Path | None) -> None:
    """Compile and cache the bytecode of what a pull imports (untimed; see
    `child_environment`)."""
    code = "import imageledger.tools.cli, imageledger.cache, imageledger.storage.registry"
    subprocess.run(
        [sys.executable, "-c", code],
        env=child_environment(hidden),
        check=True,
        timeout=CLI_TIMEOUT,
    )


TTY_TAIL: Final = 4000
"""Bytes of the command line's terminal output kept for the message of a failed pull."""


def _drain(fd: int, tail: bytearray) -> None:
    """Read a pseudo-terminal's output until its last writer closes it (as a terminal
    would display it); keep its last `TTY_TAIL` bytes in `tail` (a failed pull's error is
    there, not in a pipe)."""
    try:
        while chunk := os.read(fd, 65536):
            tail += chunk
            del tail[:-TTY_TAIL]
    except OSError:  # EIO: every slave end is closed
        pass
    finally:
        os.close(fd)


def pull_cli(
    home: Path, reference: str, host: str, expected: str, *, tty: bool, hidden: Path | None
) -> Timing:
    """``imageledger --home HOME pull REFERENCE --insecure-registry HOST --json``, timed from
    exec to exit (CPU: the process); stderr a pseudo-terminal when `tty` (read by a thread,
    as a terminal reads it), else a pipe read as it comes; checks the manifest digest."""
    command = [
        *imageledger_command(),
        "--home",
        str(home),
        "pull",
        reference,
        "--insecure-registry",
        host,
        "--json",
    ]
    master, slave = pty.openpty() if tty else (-1, -1)
    shown = bytearray()
    reader = threading.Thread(target=_drain, args=(master, shown), daemon=True) if tty else None
    cpu = _cpu_seconds(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave if tty else subprocess.PIPE,
            env=child_environment(hidden),
        )
    finally:
        if tty:
            os.close(slave)
    if reader is not None:
        reader.start()
    try:
        out, err = process.communicate(timeout=CLI_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    elapsed = time.perf_counter() - began
    cpu = _cpu_seconds(resource.RUSAGE_CHILDREN) - cpu
    if reader is not None:
        reader.join(timeout=10)
    if process.returncode != 0:
        detail = (err or bytes(shown)).decode(errors="replace")[-2000:]
        msg = f"{' '.join(command)} exited {process.returncode}: {detail}"
        raise BenchError(msg)
    digest = json.loads(out)["manifest_digest"]
    if digest != expected:
        msg = f"imageledger (command line) pulled {digest}, the registry has {expected}"
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
    """One round: the timing of each client, in the order they ran."""

    number: int
    order: tuple[str, ...]
    timings: dict[str, Timing]

    def ratio(self, tool: str) -> float:
        return self.timings[tool].seconds / self.timings[SKOPEO].seconds

    def imageledger_tools(self) -> list[str]:
        return [tool for tool in (CLI, IMAGELEDGER) if tool in self.timings]

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {"round": self.number, "order": list(self.order)}
        for tool, timing in self.timings.items():
            row[f"{tool}_seconds"] = round(timing.seconds, 4)
            row[f"{tool}_cpu_seconds"] = round(timing.cpu_seconds, 4)
        for tool in self.imageledger_tools():
            row[f"{tool}_ratio"] = round(self.ratio(tool), 4)
        return row


def summarize(rounds: Sequence[Round], image_bytes: int) -> dict[str, Any]:
    """Medians (and the spread: min, max) per client, the median per-round ratio of each
    imageledger client to skopeo, and the goal, judged on the command line when measured."""
    summary: dict[str, Any] = {}
    for tool in rounds[0].timings:
        seconds = [r.timings[tool].seconds for r in rounds]
        median = statistics.median(seconds)
        summary[tool] = {
            "median_seconds": round(median, 4),
            "min_seconds": round(min(seconds), 4),
            "max_seconds": round(max(seconds), 4),
            "median_mib_per_s": round(image_bytes / MIB / median, 1),
            "median_cpu_seconds": round(
                statistics.median(r.timings[tool].cpu_seconds for r in rounds), 4
            ),
        }
        if tool != SKOPEO:
            ratios = [r.ratio(tool) for r in rounds]
            summary[tool]["median_ratio"] = round(statistics.median(ratios), 4)
            summary[tool]["min_ratio"] = round(min(ratios), 4)
            summary[tool]["max_ratio"] = round(max(ratios), 4)
    judged = rounds[0].imageledger_tools()[0]
    summary["goal_ratio"] = GOAL_RATIO
    summary["goal_judged_on"] = judged
    summary["goal_met"] = summary[judged]["median_ratio"] <= GOAL_RATIO
    return summary


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
    hidden = ", test extras hidden" if facts["test_extras_hidden_from_cli"] else ""
    print(f"cli            {' '.join(facts['cli_command'])}; stderr {facts['cli_stderr']}{hidden}")
    print()
    tools = list(rounds[0].timings)
    header = f"{'round':>6}  " + "  ".join(
        f"{tool + ' s':>18}  {'ratio':>6}  {'cpu s':>6}" for tool in tools
    )
    print(header)
    print("-" * len(header))
    for r in rounds:
        cells = []
        for tool in tools:
            ratio = f"{r.ratio(tool):>6.3f}" if tool != SKOPEO else " " * 6
            cells.append(
                f"{r.timings[tool].seconds:>18.3f}  {ratio}  {r.timings[tool].cpu_seconds:>6.2f}"
            )
        print(f"{r.number:>6}  " + "  ".join(cells))
    print("-" * len(header))
    for key in ("median", "min", "max"):
        cells = []
        for tool in tools:
            ratio = summary[tool].get(f"{key}_ratio")
            shown = f"{ratio:>6.3f}" if ratio is not None else " " * 6
            cpu = summary[tool]["median_cpu_seconds"] if key == "median" else None
            cpu_shown = f"{cpu:>6.2f}" if cpu is not None else " " * 6
            cells.append(f"{summary[tool][f'{key}_seconds']:>18.3f}  {shown}  {cpu_shown}")
        print(f"{key:>6}  " + "  ".join(cells))
    print()
    print(
        "throughput     "
        + ", ".join(f"{tool} {summary[tool]['median_mib_per_s']:.0f} MiB/s" for tool in tools)
        + " (medians; ratio: the client's s / skopeo's s in the same round)"
    )
    met = "met" if summary["goal_met"] else "NOT met"
    judged = summary["goal_judged_on"]
    print(
        f"ratio          {judged}/skopeo, median of per-round ratios: "
        f"{summary[judged]['median_ratio']:.3f}; goal <= {GOAL_RATIO:g}: {met}"
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


def modes(text: str) -> list[str]:
    """``cli``, ``process`` or both, comma-separated: the imageledger clients to time."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODES]
    if not names or unknown:
        msg = f"modes: choose from {', '.join(MODES)}, comma-separated; got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return [MODES[name] for name in dict.fromkeys(names)]


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
    parser.add_argument(
        "--modes",
        type=modes,
        default=[CLI, IMAGELEDGER],
        help="imageledger clients to time beside skopeo: cli (the command line, a process), "
        "process (in this process), comma-separated (cli,process)",
    )
    parser.add_argument(
        "--cli-stderr",
        choices=("tty", "pipe"),
        default="tty",
        help="the command line's stderr: a pseudo-terminal (a user at a terminal: the "
        "progress bar draws) or a pipe (a script: JSON log lines) (tty)",
    )
    parser.add_argument(
        "--hide-test-extras",
        action="store_true",
        help="run the command line as from a plain install (see hide_test_extras)",
    )
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
        "cli_stderr": args.cli_stderr,
        "cli_command": imageledger_command(),
        "test_extras_hidden_from_cli": args.hide_test_extras,
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
        hidden = hide_test_extras(work / "hidden") if args.hide_test_extras else None
        if CLI in args.modes:
            warm_up(hidden)
        tools = [*args.modes, SKOPEO]
        for number in range(1, args.rounds + 1):
            shift = (number - 1) % len(tools)
            order = tuple(tools[shift:] + tools[:shift])
            timings: dict[str, Timing] = {}
            for tool in order:
                output = work / f"{tool}-r{number}"
                os.sync()  # untimed: nobody pays for the previous pull's writeback
                if tool == IMAGELEDGER:
                    timings[tool] = pull_imageledger(output, reference, registry.host, digest)
                elif tool == CLI:
                    timings[tool] = pull_cli(
                        output,
                        reference,
                        registry.host,
                        digest,
                        tty=args.cli_stderr == "tty",
                        hidden=hidden,
                    )
                else:
                    timings[tool] = pull_skopeo(args.skopeo, scratch, output, reference, digest)
                shutil.rmtree(output)
            result = Round(number, order, {tool: timings[tool] for tool in tools})
            rounds.append(result)
            _progress(
                f"round {number}/{args.rounds}: "
                + ", ".join(f"{tool} {timings[tool].seconds:.3f} s" for tool in tools)
            )
    facts["load_average_at_end"] = load_average()
    report = {
        "facts": facts,
        "settings": {
            "rounds": args.rounds,
            "size_mib": args.size_mib,
            "layers": args.layers,
            "skopeo": args.skopeo,
            "modes": args.modes,
            "cli_stderr": args.cli_stderr,
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
