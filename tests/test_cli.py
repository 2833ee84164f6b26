"""The `imageledger` command line as other programs script it: real subprocesses, real archives.

Pins the contract of issue 3: exit codes (0 ok, 2 invalid usage or input, 3 not found, 4 in
use), one-line errors on stderr, `--json` output that is nothing but JSON on stdout (even with
debug logs on stderr) in exactly the documented shapes, `load -` from stdin, `save -o`,
`--home` versus ``$IMAGELEDGER_HOME``, and the demo.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from imageledger.tools.imagebuild import (
    BuiltImage,
    ImageSpec,
    TarEntry,
    build_docker_archive,
    build_image,
    build_oci_layout,
    tar_bytes,
)

MODULE = [sys.executable, "-m", "imageledger.tools.cli"]
SCRIPT = Path(sys.executable).with_name("imageledger")
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
HANDLE_KEYS = {
    "reference",
    "manifest_digest",
    "architecture",
    "os",
    "layer_count",
    "size_bytes",
    "created_at",
    "last_used_at",
}
CONFIG_KEYS = {"digest", "env", "cmd", "entrypoint", "working_dir", "user", "labels", "stop_signal"}
LAYER_KEYS = {
    "diff_id",
    "blob_digest",
    "media_type",
    "compressed_size_bytes",
    "erofs_size_bytes",
    "position",
}
COUNT_KEYS = (
    "image_refs_removed",
    "manifests_removed",
    "layers_removed",
    "fsmeta_removed",
    "vmdk_removed",
    "bytes_reclaimed",
)

APP = ImageSpec(
    layers=({"etc/os-release": b"ID=cli\n"}, {"usr/bin/app": b"#!/bin/sh\necho app\n" * 20}),
    architecture="arm64",
    variant="v8",
    env=("PATH=/usr/bin:/bin", "MODE=cli"),
    cmd=("--serve",),
    entrypoint=("/usr/bin/app",),
    working_dir="/work",
    user="app",
    labels={"org.opencontainers.image.title": "app"},
    stop_signal="SIGINT",
    names=("acme/app:1", "acme/app:latest"),
)
OTHER = ImageSpec(layers=({"other": b"other image\n" * 30},), names=("other:2",))


@dataclass(frozen=True)
class Result:
    code: int
    stdout: bytes
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    @property
    def error_lines(self) -> list[str]:
        """stderr lines that are not structured (JSON) log lines."""
        return [line for line in self.stderr.splitlines() if not line.startswith("{")]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("IMAGELEDGER_HOME", "IMAGELEDGER_LOG_LEVEL")
    }
    env.update(extra or {})
    return env


def cli(
    home: Path | None,
    *args: str,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    script: bool = False,
) -> Result:
    command = [str(SCRIPT)] if script else list(MODULE)
    if home is not None:
        command += ["--home", str(home)]
    done = subprocess.run(
        [*command, *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        env=_env(env),
        timeout=120,
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr.decode(errors="backslashreplace"))


def cli_all(home: Path | None, commands: Sequence[Sequence[str]], **kwargs: Any) -> list[Result]:
    """Run independent commands concurrently (one process per CPU), results in order. The
    first runs alone: opening a fresh home from several processes at once is pinned by
    test_cache_api.py, not here."""
    first = cli(home, *commands[0], **kwargs)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return [first, *pool.map(lambda args: cli(home, *args, **kwargs), commands[1:])]


def ok(home: Path | None, *args: str, **kwargs: Any) -> Result:
    result = cli(home, *args, **kwargs)
    assert result.code == 0, (args, result.stderr)
    return result


def assert_error(result: Result, code: int, *mentions: str) -> None:
    """Exit `code`, nothing on stdout, exactly one (non-log) line on stderr."""
    assert result.code == code, (result.code, result.stderr[:2000])
    assert result.stdout == b""
    assert len(result.error_lines) == 1, result.stderr[:2000]
    line = result.error_lines[0]
    assert line.startswith("imageledger: "), line
    assert "Traceback" not in result.stderr
    for mention in mentions:
        assert mention in line, line


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def app(tmp_path: Path) -> BuiltImage:
    return build_image(APP)


@pytest.fixture
def archive(tmp_path: Path, app: BuiltImage) -> Path:
    return build_docker_archive(tmp_path / "app.tar", [app, build_image(OTHER)]).path


def assert_handle(obj: dict[str, Any]) -> None:
    assert set(obj) == HANDLE_KEYS
    assert isinstance(obj["reference"], str) and isinstance(obj["manifest_digest"], str)
    assert isinstance(obj["layer_count"], int) and isinstance(obj["size_bytes"], int)
    for key in ("created_at", "last_used_at"):
        assert obj[key] is None or RFC3339_UTC.match(obj[key]), obj[key]


# ---------------------------------------------------------------------------- JSON shapes


def test_load_images_and_inspect_json(home: Path, archive: Path, app: BuiltImage) -> None:
    loaded = ok(home, "load", str(archive), "--json", script=True).json()
    assert isinstance(loaded, list)
    for obj in loaded:
        assert_handle(obj)
    assert sorted(obj["reference"] for obj in loaded) == [
        "docker.io/acme/app:1",
        "docker.io/acme/app:latest",
        "docker.io/library/other:2",
    ]

    images = ok(home, "images", "--json", script=True).json()
    for obj in images:
        assert_handle(obj)
        assert obj["created_at"] is not None and obj["last_used_at"] is not None
    assert sorted(images, key=lambda o: str(o["reference"])) == sorted(
        loaded, key=lambda o: str(o["reference"])
    )
    # newest first: created_at never increases down the list
    created = [datetime.fromisoformat(o["created_at"]) for o in images]
    assert created == sorted(created, reverse=True)
    by_ref = {o["reference"]: o for o in images}
    assert by_ref["docker.io/acme/app:1"]["architecture"] == "arm64"
    assert by_ref["docker.io/acme/app:1"]["os"] == "linux"
    assert by_ref["docker.io/acme/app:1"]["layer_count"] == 2
    assert by_ref["docker.io/library/other:2"]["architecture"] == "amd64"

    detail = ok(home, "inspect", "acme/app", "--json").json()
    assert set(detail) == HANDLE_KEYS | {"config", "layers"}
    assert {k: detail[k] for k in HANDLE_KEYS} == by_ref["docker.io/acme/app:latest"]
    assert detail["config"] == {
        "digest": app.config_digest,
        "env": ["PATH=/usr/bin:/bin", "MODE=cli"],
        "cmd": ["--serve"],
        "entrypoint": ["/usr/bin/app"],
        "working_dir": "/work",
        "user": "app",
        "labels": {"org.opencontainers.image.title": "app"},
        "stop_signal": "SIGINT",
    }
    assert [set(layer) for layer in detail["layers"]] == [LAYER_KEYS, LAYER_KEYS]
    assert [
        (lyr["position"], lyr["diff_id"], lyr["blob_digest"], lyr["compressed_size_bytes"])
        for lyr in detail["layers"]
    ] == [(i, lyr.diff_id, lyr.digest, lyr.size) for i, lyr in enumerate(app.layers)]
    assert {lyr["media_type"] for lyr in detail["layers"]} == {app.layers[0].media_type}

    table = ok(home, "images").stdout.decode()
    assert "docker.io/acme/app:1" in table and "linux/arm64" in table


def test_use_release_rm_json_and_in_use_exit_4(home: Path, archive: Path) -> None:
    ok(home, "load", str(archive))
    used = ok(home, "use", "docker.io/library/other:2", "--holder", "sandbox-7", "--json").json()
    assert_handle(used)
    assert used["reference"] == "docker.io/library/other:2"

    assert_error(cli(home, "rm", "other:2"), 4, "sandbox-7")
    assert_error(cli(home, "rm", "other:2", "--json"), 4, "sandbox-7")
    refused = ok(home, "history", "other:2", "--json").json()
    assert [e["event"] for e in refused][-2:] == ["RemoveRefused", "RemoveRefused"]

    assert ok(home, "release", "sandbox-7", "--json").json() == {
        "holder": "sandbox-7",
        "leases_released": 1,
    }
    removed = ok(home, "rm", "index.docker.io/other:2", "--json").json()
    assert list(removed) == ["removed"]
    assert removed["removed"] in (["index.docker.io/other:2"], ["docker.io/library/other:2"])
    assert_error(cli(home, "rm", "other:2"), 3, "docker.io/library/other:2")
    ok(home, "use", "acme/app:1", "--holder", "sb")
    assert ok(home, "rm", "acme/app:latest").code == 0  # an alias: only untags
    forced = ok(home, "rm", "--force", "acme/app:1", "--json").json()
    assert forced["removed"] in (["acme/app:1"], ["docker.io/acme/app:1"])
    assert ok(home, "images", "--json").json() == []


def test_prune_json_dry_run_then_real(home: Path, archive: Path) -> None:
    ok(home, "load", str(archive))
    ok(home, "use", "acme/app:1", "--holder", "sb")
    dry = ok(home, "prune", "--dry-run", "--json").json()
    real = ok(home, "prune", "--json").json()
    for report in (dry, real):
        assert set(COUNT_KEYS) <= set(report)
        assert all(isinstance(report[k], int) for k in COUNT_KEYS)
        assert isinstance(report["removed"], list)
        assert all(isinstance(item["reason"], str) and item["reason"] for item in report["removed"])
        assert report["unmatched_keep"] == []
    assert [dry[k] for k in COUNT_KEYS] == [real[k] for k in COUNT_KEYS]
    assert dry["removed"] == real["removed"]
    assert real["image_refs_removed"] == 1 and real["manifests_removed"] == 1
    assert real["layers_removed"] == 1 and real["bytes_reclaimed"] > 0
    assert [o["reference"] for o in ok(home, "images", "--json").json()] == [
        "docker.io/acme/app:latest",
        "docker.io/acme/app:1",
    ]
    again = ok(home, "prune", "--json").json()
    assert [again[k] for k in COUNT_KEYS] == [0] * 6
    ok(home, "release", "sb")
    keep = ok(home, "prune", "--keep", "acme/app:1", "--keep", "docker.io/acme/*", "--json")
    assert keep.json()["image_refs_removed"] == 0
    fresh = ok(home, "prune", "--unused-for", "1h30m", "--json").json()
    assert fresh["image_refs_removed"] == 0  # just used
    budget = ok(home, "prune", "--max-bytes", "0", "--json").json()
    assert budget["image_refs_removed"] == 2 and budget["manifests_removed"] == 1


def test_history_df_and_rebuild_json(home: Path, archive: Path) -> None:
    ok(home, "load", str(archive))
    ok(home, "use", "acme/app:1", "--holder", "sb")
    reads: list[tuple[str, ...]] = [
        ("history", "--json"),
        ("history", "docker.io/acme/app:1", "--json"),
        ("history", "acme/app:1"),
        ("df", "--json"),
        ("images", "--json"),
        ("prune", "--dry-run", "--json"),
        ("rebuild", "--verify", "--json"),
    ]
    results = cli_all(home, reads)
    for args, result in zip(reads, results, strict=True):
        assert result.code == 0, (args, result.stderr)
    history, mine, table, df, images, dry, verified = results

    keys = {"position", "event", "at", "reference", "manifest_digest", "detail", "user", "host"}
    for entry in history.json():
        assert keys <= set(entry)
        assert RFC3339_UTC.match(entry["at"])
    positions = [e["position"] for e in history.json()]
    assert positions == sorted(positions)
    assert [e["event"] for e in history.json()].count("ImagePulled") == 3
    assert [e["event"] for e in mine.json()] == ["ImagePulled", "ImageUsed"]
    assert {e["reference"] for e in mine.json()} == {"docker.io/acme/app:1"}
    assert "ImageUsed" in table.stdout.decode()

    usage = df.json()
    sizes = {o["size_bytes"] for o in images.json()}
    assert usage["references"] == 3
    assert set(usage["bytes"]) == {"manifest", "config", "layer"}
    assert usage["total_bytes"] == sum(usage["bytes"].values()) == sum(sizes)
    assert usage["reclaimable_bytes"] == dry.json()["bytes_reclaimed"] > 0

    for report, verify in ((verified.json(), True), (ok(home, "rebuild", "--json").json(), False)):
        assert report["identical"] is True
        assert report["events"] == len(history.json())
        assert report["verified"] is verify
        assert report["tables"] and all(
            t["live"] == t["rebuilt"] for t in report["tables"].values()
        )
    assert "identical" in ok(home, "rebuild", "--verify").stdout.decode()


# ---------------------------------------------------------------------------- exit codes

BAD_USAGE = [
    ("inspect", "Bad/Ref"),
    ("inspect", "alpine:", "--json"),
    ("rm", "a b"),
    ("rm", "alpine@sha256:123", "--json"),
    ("use", "UPPER:1", "--holder", "h"),
    ("use", "alpine:1", "--holder", ""),
    ("history", "-bad-"),
    ("save", "Nope:1", "-o", "out.tar"),
    ("frobnicate",),
    ("images", "--bogus"),
    ("inspect",),
    ("use", "alpine:1"),
    ("save", "alpine:1", "-o", "x.tar", "--format", "zip"),
    ("prune", "--unused-for", "10x"),
    ("prune", "--unused-for", "-5m"),
    ("prune", "--unused-for", "1.5h"),
    ("prune", "--unused-for", ""),
    ("prune", "--max-bytes", "lots"),
    ("prune", "--unused-for", "800000d"),  # past timedelta: was an OverflowError traceback
    ("prune", "--unused-for", "9" * 5000),  # past int()'s digit limit: was its ValueError
    ("prune", "--max-bytes", "9" * 5000),
    (),
]


def test_invalid_usage_exits_2_with_one_line(home: Path, tmp_path: Path) -> None:
    for args, result in zip(BAD_USAGE, cli_all(home, BAD_USAGE), strict=True):
        try:
            assert_error(result, 2)
        except AssertionError as e:
            raise AssertionError(f"imageledger {' '.join(args)}: {e}") from None
    assert not (tmp_path / "out.tar").exists()


NOT_CACHED = [
    ("inspect", "nothere:1"),
    ("inspect", "nothere:1", "--json"),
    ("rm", "ghcr.io/o/nothere"),
    ("rm", "--force", "nothere", "--json"),
    ("use", "nothere", "--holder", "sb", "--json"),
    ("save", "nothere:1", "-o", "out.tar"),
]


def test_not_cached_exits_3(home: Path, archive: Path) -> None:
    ok(home, "load", str(archive))
    for args, result in zip(NOT_CACHED, cli_all(home, NOT_CACHED), strict=True):
        try:
            assert_error(result, 3, "nothere")
        except AssertionError as e:
            raise AssertionError(f"imageledger {' '.join(args)}: {e}") from None


def test_a_malformed_reference_changes_nothing(home: Path, archive: Path) -> None:
    ok(home, "load", str(archive))
    before = ok(home, "history", "--json").json()
    assert_error(cli(home, "rm", "--force", "ACME/app:1"), 2, "ACME/app:1")
    assert_error(cli(home, "load", str(archive), "--tag", "No Good"), 2)
    assert ok(home, "history", "--json").json() == before


def test_a_negative_byte_budget_is_invalid_input(home: Path, archive: Path) -> None:
    ok(home, "load", str(archive))
    assert_error(cli(home, "prune", "--max-bytes", "-5", "--json"), 2)
    assert len(ok(home, "images", "--json").json()) == 3


def _hostile_archive(tmp_path: Path, kind: str) -> Path:
    good = build_docker_archive(tmp_path / "good.tar", [build_image(OTHER)], style="docker25")
    entries = [
        TarEntry(name, data)
        for name, data in (
            ("manifest.json", good.manifest_json),
            ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
        )
    ]
    if kind == "dotdot":
        entries.insert(0, TarEntry("../escape", b"x"))
    elif kind == "absolute":
        entries.insert(0, TarEntry(str(tmp_path / "escape"), b"x"))
    else:
        entries.insert(0, TarEntry("link", type=b"2", linkname="/etc/passwd"))
    path = tmp_path / f"{kind}.tar"
    path.write_bytes(tar_bytes(entries))
    return path


def test_hostile_or_unreadable_archives_exit_2_and_leave_nothing(
    home: Path, tmp_path: Path
) -> None:
    hostile = [_hostile_archive(tmp_path, kind) for kind in ("dotdot", "absolute", "symlink")]
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(4096))
    commands: list[tuple[str, ...]] = [("load", str(path), "--json") for path in hostile]
    commands += [("load", str(junk)), ("load", str(tmp_path / "missing.tar"))]
    for args, result in zip(commands, cli_all(home, commands), strict=True):
        try:
            assert_error(result, 2)
        except AssertionError as e:
            raise AssertionError(f"imageledger {' '.join(args)}: {e}") from None
    assert_error(cli(home, "load", "-", stdin=hostile[0].read_bytes()), 2)
    assert_error(cli(home, "load", "-", stdin=b""), 2)
    assert ok(home, "images", "--json").json() == []
    history = ok(home, "history", "--json").json()
    assert {e["event"] for e in history} <= {"Started", "PullFailed"}
    for path in hostile:
        assert any(str(path) in (e["detail"] or "") for e in history), path
    blobs = home / "blobs" / "sha256"
    assert not blobs.exists() or list(blobs.iterdir()) == []
    assert not list(tmp_path.rglob("escape"))


# ---------------------------------------------------------------------------- stdin, save, home


def test_load_from_stdin_and_save_in_both_formats(
    home: Path, tmp_path: Path, archive: Path
) -> None:
    from_stdin = ok(home, "load", "-", "--json", stdin=archive.read_bytes()).json()
    assert len(from_stdin) == 3
    digests = {o["reference"]: o["manifest_digest"] for o in from_stdin}
    assert ok(home, "history", "acme/app:1", "--json").json()[-1]["event"] == "ImagePulled"

    for fmt in ("oci", "docker"):
        out = tmp_path / f"saved.{fmt}.tar"
        saved = ok(home, "save", "acme/app:1", "other:2", "-o", str(out), "--format", fmt)
        assert saved.stdout == b""
        other = tmp_path / f"other-{fmt}"
        loaded = ok(other, "load", str(out), "--json").json()
        assert {o["reference"]: o["manifest_digest"] for o in loaded} == {
            "docker.io/acme/app:1": digests["docker.io/acme/app:1"],
            "docker.io/library/other:2": digests["docker.io/library/other:2"],
        }
    default = tmp_path / "default.tar"
    ok(home, "save", "acme/app:latest", "-o", str(default))  # docker-archive by default
    assert b"manifest.json" in default.read_bytes()

    piped = ok(home, "save", "other:2", "-o", "-", "--format", "oci").stdout
    loaded = ok(tmp_path / "piped", "load", "-", "--json", stdin=piped).json()
    assert [o["manifest_digest"] for o in loaded] == [digests["docker.io/library/other:2"]]


def test_load_a_layout_directory_with_tag(home: Path, tmp_path: Path) -> None:
    layout = build_oci_layout(tmp_path / "layout", [ImageSpec(architecture="s390x")])
    [handle] = ok(home, "load", str(layout.path), "--tag", "localhost:5000/x/y:z", "--json").json()
    assert handle["reference"] == "localhost:5000/x/y:z"
    assert handle["manifest_digest"] == layout.images[0].manifest_digest
    assert handle["architecture"] == "s390x"
    printed = ok(home, "load", str(layout.path), "--tag", "y:1").stdout.decode()
    assert "docker.io/library/y:1" in printed


def test_home_flag_and_environment_variable(tmp_path: Path, archive: Path) -> None:
    env_home, flag_home = tmp_path / "from-env", tmp_path / "from-flag"
    env = {"IMAGELEDGER_HOME": str(env_home)}
    ok(None, "load", str(archive), env=env)
    assert len(ok(None, "images", "--json", env=env).json()) == 3
    # --home wins; a command that only reads never makes a home (exit 3, nothing created)
    missing = cli(flag_home, "images", "--json", env=env)
    assert (missing.code, missing.stdout) == (3, b"")
    assert "no imageledger home" in missing.stderr and not flag_home.exists()
    assert (env_home / "index.json").is_file() and (env_home / "oci-layout").is_file()
    assert len(ok(env_home, "images", "--json").json()) == 3


def test_json_stays_alone_on_stdout_with_debug_logs(home: Path, archive: Path) -> None:
    env = {"IMAGELEDGER_LOG_LEVEL": "debug"}
    loaded = ok(home, "load", str(archive), "--json", env=env)
    assert len(loaded.json()) == 3
    logs = [json.loads(line) for line in loaded.stderr.splitlines() if line.startswith("{")]
    assert logs, "debug logging produced no log line on stderr"
    assert loaded.error_lines == []
    reads: list[tuple[str, ...]] = [
        ("images", "--json"),
        ("prune", "--dry-run", "--json"),
        ("df", "--json"),
        ("history", "--json"),
        ("inspect", "acme/app:1", "--json"),
        ("rebuild", "--verify", "--json"),
    ]
    for args, result in zip(reads, cli_all(home, reads, env=env), strict=True):
        assert result.code == 0, (args, result.stderr)
        json.loads(result.stdout)
        assert result.error_lines == [], (args, result.stderr)
    assert_error(cli(home, "inspect", "nothere:1", "--json", env=env), 3)


def test_demo_exits_0(tmp_path: Path) -> None:
    result = cli(None, "demo", env={"TMPDIR": str(tmp_path)})
    assert result.code == 0, result.stderr
    assert b"demo complete" in result.stdout
    demo_home = tmp_path / "demo-home"
    ok(demo_home, "demo")
    events = [e["event"] for e in ok(demo_home, "history", "--json").json()]
    assert {"ImagePulled", "ImageUsed", "RemoveRefused", "HolderReleased"} <= set(events)
    assert events[-1] == "ImagesPruned"
    assert ok(demo_home, "images", "--json").json() == []


def test_verify_json_exit_codes_and_repair(home: Path, archive: Path) -> None:
    ok(home, "load", str(archive))
    clean = ok(home, "verify", "--json").json()
    assert clean["ok"] is True and clean["problems"] == [] and clean["blobs_checked"] > 0
    layer = ok(home, "inspect", "acme/app:1", "--json").json()["layers"][-1]["blob_digest"]
    path = home / "blobs" / "sha256" / layer.removeprefix("sha256:")
    path.write_bytes(path.read_bytes()[::-1])  # same size, other bytes
    damaged = cli(home, "verify", "--json")
    assert damaged.code == 1 and damaged.stderr.count("\n") <= 1  # the progress line at most
    [problem] = damaged.json()["problems"]
    assert problem["digest"] == layer and problem["problem"] == "corrupt"
    assert "docker.io/acme/app:1" in problem["references"] and problem["repaired"] is False
    text = cli(home, "verify", "--repair")
    assert text.code == 1 and f"corrupt layer {layer}" in text.stdout.decode()
    assert not path.exists()
    ok(home, "load", str(archive))
    assert ok(home, "verify").stdout.decode().strip().endswith("all intact")
