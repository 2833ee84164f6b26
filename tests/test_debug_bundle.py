"""Debug bundles (issue 12): `imageledger debug-bundle OUT.tar.gz` packs the log as stored, the
views' digests, versions, platform and configuration with every secret removed;
`imageledger --home DIR replay-bundle IN.tar.gz` makes a new read-only home from it where every
query and `--at` answer as they did where the bundle was made.

Through the command line, as an engineer sends and replays a bundle; the secrets are looked
for in the bundle's uncompressed bytes, not in what our reader says it holds.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from imageledger import ImageCache
from imageledger.cache import internals
from imageledger.tools.imagebuild import ImageSpec, build_docker_archive

if TYPE_CHECKING:
    from tests.test_audit import cli
else:
    from test_audit import cli

SECRETS = {
    "IMAGELEDGER_REGISTRY_PASSWORD": "hunter2-registry-secret",
    "IMAGELEDGER_REGISTRY_USER": "alice-the-user",
    "HTTPS_PROXY": "http://proxyuser:proxy-pass-secret@proxy.example:3128/?token=query-secret",
}


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(minutes=3)
        return self.now


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with a history: loads under several names, leases, a forced remove, a prune."""
    base = tmp_path_factory.mktemp("original")
    archives = [
        build_docker_archive(
            base / f"{name}.tar",
            [
                ImageSpec(
                    layers=({f"opt/{name}": name.encode() * 9},), names=(f"{name}:1", f"{name}:2")
                )
            ],
        ).path
        for name in ("app", "db", "web")
    ]
    home = base / "home"
    with ImageCache(home, clock=Clock(), durability="nosync") as cache:
        for archive in archives:
            cache.load(archive)
        cache.use("app:1", "sandbox-1")
        cache.use("db:1", "sandbox-2")
        cache.remove("web:2")
        cache.release("sandbox-2")
        cache.remove("app:2", force=True)
        cache.prune()
        cache.load(archives[2])
    return home


def _json(home: Path, *args: str) -> Any:
    done = cli(home, *args, "--json")
    assert done.returncode == 0, (args, done.stderr)
    if args[0] == "events":  # one object a line
        return [json.loads(line) for line in done.stdout.splitlines()]
    return json.loads(done.stdout)


QUERIES: list[tuple[str, ...]] = [
    ("images",),
    ("images", "--at", "9"),
    ("inspect", "app:1"),
    ("inspect", "db:1", "--at", "5"),
    ("history",),
    ("history", "web:1"),
    ("events",),
    ("events", "--type", "ImageUsed"),
    ("explain", "db:2"),
    ("explain", "web:2", "--at", "10"),
    ("diff", "3", "12"),
    ("prune", "--dry-run"),
    ("prune", "--dry-run", "--at", "8"),
]


def test_a_replayed_bundle_answers_every_query_as_the_home_it_was_made_from(
    original: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "bug.tar.gz"
    made = cli(original, "debug-bundle", str(bundle), "--json", env=SECRETS)
    assert made.returncode == 0, made.stderr
    manifest = json.loads(made.stdout)
    replayed = tmp_path / "replayed"
    done = cli(replayed, "replay-bundle", str(bundle), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["events"] == manifest["events"] > 10
    assert report["views_differ"] == []
    for query in QUERIES:
        assert _json(replayed, *query) == _json(original, *query), query
    df_then, df_now = _json(original, "df"), _json(replayed, "df")
    df_then.pop("ledger"), df_now.pop("ledger")  # pages on disk, not state
    assert df_now == df_then
    # The very bytes of the log, at the same positions.
    with ImageCache(original) as first, ImageCache(replayed) as second:
        assert list(internals(second).ledger.log_records()) == list(
            internals(first).ledger.log_records()
        )
        assert second.read_only
    # Someone else's past: read only, whatever this user may write.
    refused = cli(replayed, "use", "app:1", "--holder", "me")
    assert refused.returncode != 0
    assert "read" in refused.stderr and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_the_bundle_holds_no_secret(original: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bug.tar.gz"
    key = tmp_path / "audit.key"
    env = {**SECRETS, "IMAGELEDGER_AUDIT_KEY": str(key), "UNRELATED_API_TOKEN": "tok-unrelated"}
    made = cli(original, "debug-bundle", str(bundle), env=env)
    assert made.returncode == 0, made.stderr
    raw = gzip.decompress(bundle.read_bytes())
    for secret in (*SECRETS.values(), "proxy-pass-secret", "query-secret", "tok-unrelated"):
        if secret.startswith("http"):
            continue
        assert secret.encode() not in raw, secret
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        assert tar.getnames() == ["bundle.json", "log.records"]
        member = tar.extractfile("bundle.json")
        assert member is not None
        manifest = json.load(member)
    config = manifest["configuration"]
    assert config["IMAGELEDGER_REGISTRY_PASSWORD"] == "<redacted>"
    assert config["IMAGELEDGER_AUDIT_KEY"] == "<redacted>"
    assert config["HTTPS_PROXY"].startswith("http://proxy.example:3128/")
    assert "UNRELATED_API_TOKEN" not in config
    assert manifest["versions"]["imageledger"]
    assert manifest["platform"]["machine"]
    assert set(manifest["views"]) >= {"refs", "manifests", "blobs"}


def test_bad_bundles_and_used_homes_are_refused_leaving_nothing(
    original: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "bug.tar.gz"
    assert cli(original, "debug-bundle", str(bundle)).returncode == 0
    raw = bytearray(gzip.decompress(bundle.read_bytes()))
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tar:
        offset = tar.getmember("log.records").offset_data
    damaged = bytearray(raw)
    damaged[offset + 40] ^= 0x01  # inside the first record
    cut = raw[: offset + 100]
    cases = {
        "a flipped byte": gzip.compress(bytes(damaged)),
        "cut short": gzip.compress(bytes(cut)),
        "not a bundle": b"hello",
        "a tar of something else": _tar({"etc/passwd": b"root:x:0:0\n"}),
    }
    for what, data in cases.items():
        path = tmp_path / "bad.tar.gz"
        path.write_bytes(data)
        home = tmp_path / "never"
        done = cli(home, "replay-bundle", str(path))
        assert done.returncode == 2, (what, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, (what, done.stderr)
        assert "Traceback" not in done.stderr
        assert not home.exists(), what
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    done = cli(used, "replay-bundle", str(bundle))
    assert done.returncode == 2
    assert [p.name for p in used.iterdir()] == ["keep.txt"]
    again = cli(original, "replay-bundle", str(bundle))
    assert again.returncode == 2  # a home with a ledger is not new either
    nowhere = cli(original, "debug-bundle", str(tmp_path / "missing" / "bug.tar.gz"))
    assert nowhere.returncode == 2
    assert nowhere.stderr.count("\n") == 1 and "cannot write the bundle" in nowhere.stderr


def _tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()
