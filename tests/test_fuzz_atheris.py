"""Coverage-guided fuzzing (atheris, libFuzzer) of the same parsers the hypothesis fuzzers
cover: references, platforms, manifests/indexes/configs, tar archives and stored events.

Optional: skipped where atheris is not installed (it has wheels for x86-64 Linux only). Each
target runs in a child process, because libFuzzer ends its process when it is done; a bounded
number of runs from seeds built here (real documents and archives), so the test stays a few
seconds. A crash (any exception that is not the package's own error, or a write outside the
home) makes the child exit non-zero and prints the input that caused it.

Run one target longer by hand: ``python tests/test_fuzz_atheris.py archive -runs=200000``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

RUNS = {"archive": 800}  # a tar load per run costs more than a parse
DEFAULT_RUNS = 2000
MAX_SECONDS = 20  # libFuzzer stops (successfully) there even if the runs are not done
TARGETS = ("reference", "platform", "manifest", "archive", "event")


# ---- the targets (run in the child, instrumented) --------------------------------------------


def _sibling(name: str) -> Any:
    """A module of this directory (the child has it on its path; mypy sees it as Any)."""
    return importlib.import_module(name)


def _targets() -> dict[str, Callable[[bytes], None]]:
    atheris = _sibling("atheris")

    with atheris.instrument_imports(include=["imageledger"]):
        from imageledger.domain.errors import (
            ImageLedgerError,
            InvalidReferenceError,
            ManifestError,
        )
        from imageledger.domain.reference import parse_reference
        from imageledger.storage.archives import load
        from imageledger.storage.blobs import BlobStore
        from imageledger.storage.oci import (
            parse_config,
            parse_index,
            parse_manifest,
            parse_platform,
        )
        from imageledger.storage.transcoder import StoredEventMapper, UndecodableDataError

    def reference(data: bytes) -> None:
        text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(400)
        try:
            ref = parse_reference(text)
        except InvalidReferenceError:
            return
        assert parse_reference(str(ref)) == ref

    def platform(data: bytes) -> None:
        text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(100)
        try:
            parsed = parse_platform(text)
        except ImageLedgerError:
            return
        assert parse_platform(str(parsed)) == parsed

    def manifest(data: bytes) -> None:
        for parse in (
            lambda: parse_manifest(data, None),
            lambda: parse_index(data, None),
            lambda: parse_config(data, "sha256:" + "a" * 64),
        ):
            with contextlib.suppress(ManifestError):
                parse()

    root = Path(tempfile.mkdtemp(prefix="imageledger-atheris-"))
    (root / "outside").mkdir()
    (root / "outside" / "canary").write_bytes(b"canary\n")

    def archive(data: bytes) -> None:
        home = Path(tempfile.mkdtemp(dir=root, prefix="home-"))
        try:
            load(io.BytesIO(data), BlobStore(home), max_entry_size=1024 * 1024)
        except ImageLedgerError:
            pass
        finally:
            shutil.rmtree(home)
        left = sorted(p.name for p in root.iterdir())
        assert left == ["outside"], f"written outside the home: {left}"
        assert (root / "outside" / "canary").read_bytes() == b"canary\n"

    events = _sibling("test_fuzz_transcoder")
    stored_events, transcoder = events.STORED, events.TRANSCODER

    mapper = StoredEventMapper(transcoder=transcoder)

    def event(data: bytes) -> None:
        provider = atheris.FuzzedDataProvider(data)
        stored = stored_events[provider.ConsumeIntInRange(0, len(stored_events) - 1)]
        state = provider.ConsumeBytes(provider.remaining_bytes())
        with contextlib.suppress(UndecodableDataError):
            mapper.to_domain_event(type(stored)(stored.originator_id, 1, stored.topic, state))

    return {
        "reference": reference,
        "platform": platform,
        "manifest": manifest,
        "archive": archive,
        "event": event,
    }


def _seeds(target: str, corpus: Path) -> None:
    """Valid inputs to start from: libFuzzer mutates them toward the deep checks."""
    archives = _sibling("test_fuzz_archives")
    parsers = _sibling("test_fuzz_parsers")

    seeds: list[bytes]
    if target == "reference":
        seeds = [
            b"\x00" + s.encode()
            for s in ("alpine", "[::1]:5000/a/b:1", "reg.io/x@sha256:" + "a" * 64)
        ]
    elif target == "platform":
        seeds = [b"linux/arm64/v8", b"linux/amd64"]
    elif target == "manifest":
        seeds = [json.dumps(d).encode() for d in (parsers.MANIFEST, parsers.INDEX, parsers.CONFIG)]
    elif target == "archive":
        seeds = [archives._valid_tar(s) for s in sorted(archives.material().archives)]
    else:
        seeds = [bytes([i]) + s for i, s in enumerate(_sibling("test_fuzz_transcoder").STATES)]
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds):
        (corpus / f"seed-{i}").write_bytes(seed)


def main(argv: list[str]) -> None:
    atheris = _sibling("atheris")

    target = argv[1]
    test_one = _targets()[target]
    atheris.Setup([argv[0], *argv[2:]], test_one)
    atheris.Fuzz()


# ---- the test --------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_atheris_finds_nothing(target: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    try:
        _seeds(target, tmp_path / "corpus")
    finally:
        sys.path.remove(str(here))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]),
    }
    env["IMAGELEDGER_LOG_LEVEL"] = "critical"
    done = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            target,
            f"-runs={RUNS.get(target, DEFAULT_RUNS)}",
            f"-max_total_time={MAX_SECONDS}",
            "-max_len=65536",
            f"-artifact_prefix={tmp_path}/",
            str(tmp_path / "corpus"),
        ],
        capture_output=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    output = done.stderr.decode(errors="replace")
    assert done.returncode == 0, output[-6000:]
    assert "Done" in output or "INITED" in output, output[-2000:]


if __name__ == "__main__":
    main(sys.argv)
