"""`imageledger tag SOURCE TARGET` / `ImageCache.tag` (issue 14): a second name for a cached
image, as `docker tag` gives one, recorded as its own event (`ImageTagged`: who named what,
from which name), folded like a pull's name so that every view, the past states and
`rebuild --verify` agree, and readable from docs/FORMAT.md alone.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from imageledger import (
    Image,
    ImageCache,
    ImageNotFoundError,
    InvalidReferenceError,
    LedgerReadOnlyError,
)
from imageledger.tools.imagebuild import ImageSpec, build_docker_archive

if TYPE_CHECKING:
    from tests.format_reader import read_history
    from tests.test_cli import assert_error, cli, ok
else:
    from format_reader import read_history
    from test_cli import assert_error, cli, ok

APP = "docker.io/library/app:1"
DB = "docker.io/library/db:1"
STABLE = "example.com/team/app:stable"


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def tick(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("tag-archives")
    specs = {
        "app": ImageSpec(
            layers=({"etc/base": b"base\n"}, {"opt/app": b"app\n" * 40}),
            labels={"tier": "web"},
            names=("app:1",),
        ),
        "db": ImageSpec(layers=({"opt/db": b"db\n" * 50},), names=("db:1",)),
    }
    return {
        name: build_docker_archive(directory / f"{name}.tar", [spec]).path
        for name, spec in specs.items()
    }


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(tmp_path: Path, archives: dict[str, Path], clock: Clock) -> ImageCache:
    c = ImageCache(tmp_path / "home", clock=clock)
    c.load(archives["app"])
    clock.tick(minutes=5)
    c.load(archives["db"])
    clock.tick(hours=1)
    return c


def test_a_tag_names_the_image_again_and_records_who_named_it_from_what(
    cache: ImageCache, clock: Clock
) -> None:
    source = cache.get("app:1")
    head = cache.audit.head()
    tagged = cache.tag("app:1", "example.com/team/app:stable")
    assert tagged == cache.get(STABLE)
    assert (tagged.reference, tagged.manifest_digest) == (STABLE, source.manifest_digest)
    assert (tagged.architecture, tagged.os, tagged.layer_count, tagged.size_bytes) == (
        source.architecture,
        source.os,
        source.layer_count,
        source.size_bytes,
    )
    assert tagged.created_at == tagged.last_used_at == clock.now  # the name is new
    assert cache.get("app:1") == source  # a tag is not a use of the source
    assert [h.reference for h in cache.list()] == [STABLE, DB, APP]  # newest first
    assert cache.inspect(STABLE).config == cache.inspect(APP).config
    assert cache.audit.head() == head + 1  # one event

    [event] = cache.audit.events(first=head + 1, types=frozenset({"ImageTagged"}))
    assert event["reference"] == STABLE and event["source_reference"] == APP
    assert event["content"]["manifest_digest"] == source.manifest_digest

    [entry] = cache.history(STABLE)
    assert (entry.event, entry.reference, entry.detail) == ("ImageTagged", STABLE, f"from {APP}")
    assert entry.at == clock.now and entry.manifest_digest == source.manifest_digest
    assert [(e.event, e.detail) for e in cache.history(APP)][-1] == (
        "ImageTagged",
        f"as {STABLE}",
    )
    assert cache.history()[-1].reference == STABLE  # the ledger's entry is the new name's
    explained = cache.explain(STABLE)
    assert explained["made_by"]["event"] == "ImageTagged"
    assert explained["made_by"]["source"] == f"tag:{APP}"
    assert explained["other_references"] == [APP]
    assert cache.explain(APP)["made_by"]["event"] == "ImagePulled"
    [row] = [r for r in cache.audit.report(reference=STABLE)]
    assert (row["action"], row["source"], row["outcome"]) == ("tag", f"tag:{APP}", "ok")
    assert row["manifest_digest"] == source.manifest_digest

    report = cache.rebuild(verify=True)
    assert report.identical, report.tables
    # index.json (the home as an OCI layout) names it too.
    index = json.loads((cache.home / "index.json").read_text())
    names = {m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]}
    assert STABLE in names
    cache.close()


def test_the_format_md_reader_reads_a_tag(cache: ImageCache) -> None:
    """FORMAT.md specifies ImageTagged: a reader written from it alone resolves its content
    (the config named by digest, carried by the pull before it)."""
    cache.tag("app:1", STABLE)
    home = cache.home
    digest = cache.get(APP).manifest_digest
    config = cache.inspect(APP).config
    cache.close()
    last = read_history(home / "ledger")[-1]
    assert last["type"] == "ImageTagged"
    assert (last["reference"], last["source_reference"]) == (STABLE, APP)
    assert last["content"]["manifest_digest"] == digest
    assert last["content"]["config"]["digest"] == config.digest
    assert last["content"]["config"]["labels"] == [["tier", "web"]]


def test_tagging_onto_an_existing_name_moves_it_as_docker_does(
    cache: ImageCache, clock: Clock
) -> None:
    db = cache.get("db:1")
    app = cache.get("app:1")
    cache.tag("app:1", "db:1")
    moved = cache.get("db:1")
    assert moved.manifest_digest == app.manifest_digest
    assert moved.created_at == db.created_at  # the name existed: it keeps its creation
    assert moved.last_used_at == clock.now
    assert cache.diff(cache.audit.head() - 1, cache.audit.head())["retagged"] == [
        {"reference": DB, "from_digest": db.manifest_digest, "to_digest": app.manifest_digest}
    ]
    # The image db:1 named is now named by nothing: a prune reclaims it, and only it.
    report = cache.prune(dry_run=True, keep=["*"])
    assert report.references == ()
    assert db.manifest_digest in {b.digest for b in report.deleted}
    assert app.manifest_digest not in {b.digest for b in report.deleted}
    assert cache.rebuild(verify=True).identical
    # Tagging it again onto the same image is still recorded (someone did it), and harmless.
    head = cache.audit.head()
    cache.tag("app:1", "db:1")
    assert cache.audit.head() == head + 1
    assert cache.get("db:1").created_at == db.created_at
    cache.close()


def test_removing_one_name_keeps_the_other_and_its_content(cache: ImageCache) -> None:
    cache.tag("app:1", STABLE)
    digest = cache.get(APP).manifest_digest
    cache.remove("app:1")  # one of two names: an untag, nothing deleted
    assert [e.detail for e in cache.history(APP)][-1] == "untagged"
    kept = cache.inspect(STABLE)
    assert kept.handle.manifest_digest == digest
    assert cache.verify(ledger=False).ok  # every blob it needs is still there
    cache.remove(STABLE)  # the last name: now the content goes
    assert "deleted" in [e.detail for e in cache.history(STABLE)][-1]
    assert [h.reference for h in cache.list()] == [DB]
    assert cache.rebuild(verify=True).identical
    cache.close()


def test_the_cache_before_the_tag_has_no_such_name(cache: ImageCache, clock: Clock) -> None:
    before_position, before_time = cache.audit.head(), clock.now
    clock.tick(minutes=1)
    cache.tag("app:1", STABLE)
    tag_position = cache.audit.head()
    clock.tick(minutes=1)
    cache.remove("app:1")
    for past in (cache.at(before_position), cache.at(before_time)):
        assert STABLE not in [h.reference for h in past.list()]
        with pytest.raises(ImageNotFoundError):
            past.get(STABLE)
    then = cache.at(tag_position)
    assert [h.reference for h in then.list()] == [STABLE, DB, APP]
    assert then.get(STABLE) == cache.get(STABLE)
    assert [h.reference for h in cache.list()] == [STABLE, DB]
    with pytest.raises(LedgerReadOnlyError):
        then.remove(STABLE)
    cache.close()


def test_what_a_tag_refuses(cache: ImageCache) -> None:
    head = cache.audit.head()
    with pytest.raises(ImageNotFoundError, match=r"docker\.io/library/nothing:1"):
        cache.tag("nothing:1", "other:1")
    digest = cache.get(APP).manifest_digest
    with pytest.raises(InvalidReferenceError, match="digest"):
        cache.tag("app:1", f"app@{digest}")
    with pytest.raises(InvalidReferenceError, match="digest"):
        cache.tag("app:1", f"app:2@{digest}")  # pinned by the digest: a digest reference
    with pytest.raises(InvalidReferenceError):
        cache.tag("app:1", "UPPER/case:1")
    assert cache.tag("app:1", "docker.io/library/app:1") == cache.get("app:1")  # itself
    assert cache.audit.head() == head  # none of them recorded anything
    cache.close()


def test_a_digest_reference_can_be_the_source(tmp_path: Path, archives: dict[str, Path]) -> None:
    with ImageCache(tmp_path / "home") as cache:
        digest = cache.load(archives["db"])[0].manifest_digest
        pinned = cache.load(archives["db"], tag=f"db@{digest}")[0]
        assert pinned.reference == f"docker.io/library/db@{digest}"
        assert cache.tag(pinned.reference, "db:pinned").manifest_digest == digest


def test_the_asyncio_api_tags_too(cache: ImageCache) -> None:
    async def run() -> None:
        handle = await Image.tag("app:1", STABLE, cache=cache)
        assert handle == cache.get(STABLE)
        assert (await handle.inspect()).handle.reference == STABLE

    asyncio.run(run())
    cache.close()


def test_the_command_line_tags(tmp_path: Path, archives: dict[str, Path]) -> None:
    home = tmp_path / "home"
    ok(home, "load", str(archives["app"]))
    assert ok(home, "tag", "app:1", "example.com/team/app:stable").stdout == b""  # as docker
    tagged = ok(home, "tag", "app:1", "app:2", "--json").json()
    assert tagged["reference"] == "docker.io/library/app:2"
    references = [o["reference"] for o in ok(home, "images", "--json").json()]
    assert references == ["docker.io/library/app:2", STABLE, APP]
    assert_error(cli(home, "tag", "missing:1", "x:1"), 3, "docker.io/library/missing:1")
    digest = tagged["manifest_digest"]
    assert_error(cli(home, "tag", "app:1", f"app@{digest}"), 2, "digest")
    assert_error(cli(home, "tag", "app:1"), 2, "TARGET")
    history = ok(home, "history", STABLE, "--json").json()
    assert [(e["event"], e["detail"]) for e in history] == [("ImageTagged", f"from {APP}")]
    explained = ok(home, "explain", STABLE).stdout.decode().splitlines()[0]
    assert explained.startswith(f"{STABLE} is cached (as of position 4): tagged at position 3")
    assert explained.endswith(f"from tag:{APP}")
    assert ok(home, "rebuild", "--verify").code == 0
    assert ok(home, "verify").code == 0  # the ledger check in a child decodes the tags too
    [listed] = [
        json.loads(line)
        for line in ok(home, "events", "--type", "ImageTagged", "--ref", STABLE, "--json")
        .stdout.decode()
        .splitlines()
    ]
    assert (listed["reference"], listed["source_reference"]) == (STABLE, APP)
    # Only a writable home can be tagged in, like every command that records.
    assert ok(home, "audit", "verify").code == 0  # the tag was signed into a checkpoint
