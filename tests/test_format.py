"""The ledger's stored format 2 (docs/FORMAT.md): a reader written only from the spec reads
what the API answers; configs are carried once; encoding is canonical; a format-1 ledger is
refused until `imageledger migrate` rewrites it with the same history."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tarfile
from dataclasses import asdict
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imageledger import ImageCache, LedgerFormatError
from imageledger.cache import internals
from imageledger.domain.events import Batch
from imageledger.domain.model import (
    Actor,
    DeletedBlob,
    ImageConfig,
    ImageContent,
    Layer,
    Platform,
    PrunePolicy,
    RemovedReference,
)
from imageledger.storage.ledgerformat import LedgerMapper
from imageledger.tools.imagebuild import ImageSpec, build_docker_archive

if TYPE_CHECKING:
    from tests.format_reader import read_history
else:
    from format_reader import read_history

FIXTURES = Path(__file__).resolve().parent / "fixtures"
BASE = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = BASE

    def __call__(self) -> datetime:
        return self.now


def _busy_home(tmp_path: Path, clock: Clock) -> ImageCache:
    """A home that went through every kind of event, two images sharing a config."""
    big_env = tuple(f"VAR{i}={'x' * 200}" for i in range(50))
    one = ImageSpec(layers=({"a": b"a"},), names=("fmt/app:1", "fmt/app:2"), env=big_env)
    two = ImageSpec(layers=({"b": b"b"}, {"c": b"c"}), names=("fmt/tool:1",), labels={"k": "v"})
    cache = ImageCache(tmp_path / "home", clock=clock, durability="nosync")
    cache.load(build_docker_archive(tmp_path / "a.tar", [one, two]).path)
    clock.now += timedelta(minutes=1)
    cache.load(build_docker_archive(tmp_path / "b.tar", [one]).path, tag="fmt/again:1")
    clock.now = clock.now.astimezone(timezone(timedelta(hours=-3)))  # another offset
    cache.use("fmt/tool:1", "sandbox-1")
    with contextlib.suppress(Exception):
        cache.remove("fmt/tool:1")  # refused
    with contextlib.suppress(Exception):
        cache.load(tmp_path / "missing.tar", tag="fmt/gone:1")
    clock.now += timedelta(minutes=1)
    cache.release("sandbox-1")
    cache.remove("fmt/app:2")
    cache.remove("fmt/tool:1", force=True)
    clock.now += timedelta(hours=3)
    cache.prune(unused_for=3600, keep=["fmt/again:*"])
    return cache


def test_a_reader_written_from_format_md_reads_what_the_api_answers(tmp_path: Path) -> None:
    clock = Clock()
    with _busy_home(tmp_path, clock) as cache:
        history = cache.history()
        details = {h.reference: cache.inspect(h.reference) for h in cache.list()}
    read = read_history(cache.home / "ledger")  # LMDB opens an environment once per process
    assert [e["position"] for e in read] == [h.position for h in history]
    assert [e["type"] for e in read] == [h.event for h in history]
    kinds = {e["type"] for e in read}
    assert kinds >= {"Started", "ImagePulled", "PullFailed", "ImageUsed", "HolderReleased"}
    assert kinds >= {"ImageRemoved", "RemoveRefused", "ImagesPruned"}
    for event, entry in zip(read, history, strict=True):
        assert event["at"] == entry.at  # the same instant (stored in UTC)
        assert event["at"].utcoffset() == timedelta(0)
        assert (event["actor"]["user"], event["actor"]["host"]) == (entry.user, entry.host)
        assert event["actor"]["pid"] == entry.pid
        if event["type"] in ("ImagePulled", "ImageUsed", "ImageRemoved", "RemoveRefused"):
            assert event["reference"] == entry.reference
    # Each live image: the content its last pull recorded is what inspect answers.
    pulled = {e["reference"]: e["content"] for e in read if e["type"] == "ImagePulled"}
    assert details, "the home should still hold an image"
    for reference, detail in details.items():
        content = pulled[reference]
        assert content["manifest_digest"] == detail.handle.manifest_digest
        config = detail.config
        assert content["config"]["digest"] == config.digest
        assert tuple(content["config"]["env"]) == config.env
        assert content["config"]["cmd"] == (list(config.cmd) if config.cmd else config.cmd)
        layers = [
            {k: v for k, v in asdict(layer).items() if k != "erofs_size_bytes"}
            for layer in detail.layers
        ]
        assert content["layers"] == layers


def test_a_config_is_carried_by_the_first_event_that_brings_it_only(tmp_path: Path) -> None:
    """Loading an image with a large config again and again stores the config once (format
    1 copied it into every event: a 3.9 MB config loaded 15 times made a 75 MB ledger)."""
    big_env = tuple(f"VAR{i}={'y' * 1000}" for i in range(200))  # a ~200 kB config
    image = ImageSpec(layers=({"a": b"a"},), names=("big/app:1",), env=big_env)
    archive = build_docker_archive(tmp_path / "big.tar", [image]).path
    with ImageCache(tmp_path / "home", durability="nosync") as cache:
        for i in range(15):
            cache.load(archive, tag=f"big/app:{i}")
        assert cache.inspect("big/app:14").config.env == big_env
        views = internals(cache).ledger.views
        log = views.env.db("imageledger.log")
        with views.env.read() as txn:
            sizes = [len(value) for _, value in txn.cursor(db=log)]
    read = read_history(cache.home / "ledger")
    pulls = [e for e in read if e["type"] == "ImagePulled"]
    assert len(pulls) == 15 and all(p["content"]["config"]["env"] == list(big_env) for p in pulls)
    assert sum(sizes) < 2 * 200_000, f"the log holds {sum(sizes)} bytes for one config"


def test_an_event_read_alone_resolves_a_config_named_by_digest(tmp_path: Path) -> None:
    """History of one reference decodes events without reading the log from the start: the
    config its pull names by digest comes from the views."""
    image = ImageSpec(layers=({"a": b"a"},), names=("one/app:1",), env=("A=1",))
    archive = build_docker_archive(tmp_path / "one.tar", [image]).path
    home = tmp_path / "home"
    with ImageCache(home, durability="nosync") as cache:
        cache.load(archive)
        cache.load(archive, tag="one/app:2")
    with ImageCache(home, durability="nosync") as cache:  # a fresh process's mapper
        assert [e.event for e in cache.history("one/app:2")] == ["ImagePulled"]
        assert cache.inspect("one/app:2").config.env == ("A=1",)
        assert cache.rebuild(verify=True).identical


# ---------------------------------------------------------------- canonical bytes

_text = st.text(max_size=20)
_digest = st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True)
_opt_texts = st.none() | st.lists(_text, max_size=3).map(tuple)
_config = st.builds(
    ImageConfig,
    _digest,
    st.lists(_text, max_size=3).map(tuple),
    _opt_texts,
    _opt_texts,
    st.none() | _text,
    st.none() | _text,
    st.dictionaries(_text, _text, max_size=3).map(lambda d: tuple(sorted(d.items()))),
    st.none() | _text,
)
_content = st.builds(
    ImageContent,
    _digest,
    _text,
    st.integers(0, 2**40),
    _config,
    st.integers(0, 2**31),
    st.builds(Platform, _text, _text, st.none() | _text),
    st.lists(
        st.builds(
            Layer, _digest, _text, st.integers(0, 2**40), st.none() | _digest, st.integers(0, 99)
        ),
        max_size=3,
    ).map(tuple),
)
_instant = st.datetimes(
    min_value=datetime(1970, 1, 2),
    max_value=datetime(2400, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=45))]),
)


@settings(max_examples=150, deadline=None)
@given(
    stamp=_instant,
    content=_content,
    names=st.lists(_text, min_size=1, max_size=3),
    cached=st.booleans(),
    deleted=st.lists(
        st.builds(
            DeletedBlob, _text, st.sampled_from(["layer", "partial"]), st.integers(0, 2**40), _text
        ),
        max_size=3,
    ).map(tuple),
    policy=st.builds(
        PrunePolicy,
        st.booleans(),
        st.none() | st.integers(0, 2**40),
        st.lists(_text, max_size=2).map(tuple),
        st.none() | st.integers(0, 2**62),
    ),
)
def test_encoding_is_canonical_and_decodes_to_the_same_event(
    stamp: datetime,
    content: ImageContent,
    names: list[str],
    cached: bool,
    deleted: tuple[DeletedBlob, ...],
    policy: PrunePolicy,
) -> None:
    actor = Actor(user="u", uid=0, pid=1, host="h", version="0")
    batch = Batch(0, actor, stamp)
    for name in names:
        batch.pulled(name, "archive:x", content, cached)
    batch.used(names[0], content.manifest_digest, "sb")
    batch.released("sb", ((names[0], content.manifest_digest),))
    batch.removed(names[0], content.manifest_digest, True, deleted, 7)
    batch.remove_refused(names[0], content.manifest_digest, ("a", "b"))
    refs = tuple(RemovedReference(n, content.manifest_digest, "unused") for n in names)
    batch.pruned(policy, stamp, refs, deleted, 3)
    batch.pull_failed("", "archive:stdin", "boom")
    first, second = LedgerMapper(), LedgerMapper()
    with first.batch():
        stored = [first.to_stored_event(e) for e in batch.events]
    with second.batch():
        again = [second.to_stored_event(e) for e in batch.events]
    assert [s.state for s in stored] == [s.state for s in again]
    reader = LedgerMapper()
    for event, record in zip(batch.events, stored, strict=True):
        decoded = reader.to_domain_event(record)
        assert type(decoded) is type(event)
        assert decoded.__dict__ == event.__dict__  # instants compare equal across offsets
        assert decoded.timestamp.utcoffset() == timedelta(0)
    # The first pull of the batch carries the config; the later ones name it by digest.
    pulls = [msgpack.unpackb(s.state, timestamp=3) for s in stored[1 : len(names) + 1]]
    assert isinstance(pulls[0][4][3], list) and pulls[0][4][3][0] == content.config.digest
    assert all(p[4][3] == content.config.digest for p in pulls[1:])


# ---------------------------------------------------------------- format 1


def _v1_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    with tarfile.open(FIXTURES / "ledger-v1.tar.gz") as tar:
        tar.extractall(home, filter="data")
    return home


def test_a_format_1_ledger_is_refused_naming_migrate(tmp_path: Path) -> None:
    home = _v1_home(tmp_path)
    with pytest.raises(LedgerFormatError, match=r"format 1.*imageledger migrate"):
        ImageCache(home)
    done = subprocess.run(
        [sys.executable, "-m", "imageledger.tools.cli", "--home", str(home), "images"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert "imageledger migrate" in line and "Traceback" not in done.stderr


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_migrate_rewrites_a_format_1_ledger_with_the_same_history(tmp_path: Path) -> None:
    home = _v1_home(tmp_path)
    expected = json.loads((FIXTURES / "ledger-v1.json").read_text())
    done = subprocess.run(
        [sys.executable, "-m", "imageledger.tools.cli", "--home", str(home), "migrate"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (home).iterdir() if p.name.startswith("ledger")) == ["ledger"]
    with ImageCache(home) as cache:
        history = [_plain(asdict(e)) for e in cache.history()]
        listed = [_plain(dict(h.__dict__)) for h in cache.list()]
        inspected = {
            h.reference: {
                "handle": _plain(dict(h.__dict__)),
                "config": _plain(asdict(cache.inspect(h.reference).config)),
                "layers": [_plain(asdict(x)) for x in cache.inspect(h.reference).layers],
            }
            for h in cache.list()
        }
        assert cache.rebuild(verify=True).identical
    # Same positions, same instants (now in UTC), same content and details.
    for before, after in zip(expected["history"], history, strict=True):
        assert _parse(before.pop("at")) == _parse(after.pop("at"))
        assert before == after
    for before, after in zip(expected["list"], listed, strict=True):
        for key in ("created_at", "last_used_at"):
            assert _parse(before.pop(key)) == _parse(after.pop(key))
        assert before == after
    assert inspected.keys() == expected["inspect"].keys()
    for reference, after in inspected.items():
        before = expected["inspect"][reference]
        assert before["config"] == after["config"] and before["layers"] == after["layers"]
    # Migrating again finds nothing to do.
    again = subprocess.run(
        [sys.executable, "-m", "imageledger.tools.cli", "--home", str(home), "migrate"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert "already" in again.stdout + again.stderr


@pytest.mark.parametrize("command", [["verify"], ["history"], ["rebuild", "--verify"]])
def test_every_command_on_a_format_1_home_names_migrate(tmp_path: Path, command: list[str]) -> None:
    """verify checks the ledger in a child before opening it: a format-1 ledger is not damage
    (exit 5) but a ledger to migrate (exit 1), like for every other command."""
    home = _v1_home(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "imageledger.tools.cli", "--home", str(home), *command],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "format 1" in line and "imageledger migrate" in line


def test_migrate_finishes_a_run_killed_between_its_renames(tmp_path: Path) -> None:
    """A run killed after it moved the old ledger aside but before it put the new one in
    place left a home without ledger/: migrate puts the finished copy in place."""
    home = _v1_home(tmp_path)
    migrate_home = [sys.executable, "-m", "imageledger.tools.cli", "--home", str(home), "migrate"]
    subprocess.run(migrate_home, capture_output=True, check=True)
    (home / "ledger").rename(home / "ledger.migrating")  # the state after the first rename
    with tarfile.open(FIXTURES / "ledger-v1.tar.gz") as tar:  # and the old one beside it
        tar.extractall(tmp_path / "old", filter="data")
    (tmp_path / "old" / "ledger").rename(home / "ledger.format1")
    done = subprocess.run(migrate_home, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in home.iterdir() if p.name.startswith("ledger")) == ["ledger"]
    with ImageCache(home) as cache:
        assert [h.reference for h in cache.list()] == ["docker.io/fixture/copy:1"]
        assert len(cache.history()) == 12


def test_a_config_seen_only_in_a_rolled_back_append_is_stored_in_full_again() -> None:
    """What decides that an event names its config by digest is what the log holds (an
    earlier event of the same append, or the views of committed ones), never what the mapper
    has seen: an append that was encoded and folded, then rolled back, left nothing in the
    log, so the next event must carry the config itself."""
    actor = Actor(user="u", uid=0, pid=1, host="h", version="0")
    content = ImageContent(
        "sha256:" + "a" * 64,
        "application/vnd.oci.image.manifest.v1+json",
        10,
        ImageConfig("sha256:" + "b" * 64, env=("A=1",)),
        5,
        Platform("linux", "amd64"),
        (),
    )
    mapper = LedgerMapper()  # its views hold no config: nothing is committed
    first = Batch(0, actor, BASE)
    first.pulled("docker.io/library/a:1", "archive:x", content, False)
    with mapper.batch():
        stored = [mapper.to_stored_event(e) for e in first.events]
    mapper.to_domain_event(stored[1])  # the append's fold decodes it; then it rolls back
    again = Batch(0, actor, BASE)
    again.pulled("docker.io/library/a:1", "archive:x", content, False)
    with mapper.batch():
        retried = mapper.to_stored_event(again.events[1])
    config = msgpack.unpackb(retried.state, timestamp=3)[4][3]
    assert isinstance(config, list) and config[0] == content.config.digest


def test_migrate_never_writes_in_a_directory_that_is_not_a_home(tmp_path: Path) -> None:
    other = tmp_path / "papers"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    done = subprocess.run(
        [sys.executable, "-m", "imageledger.tools.cli", "--home", str(other), "migrate"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "not an imageledger home" in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
