"""The cache as it was (issue 12, first part): `ImageCache.at(position | time)` answers every
query as the live cache answered at that moment.

A reference model in the strongest form: a long random run (loads under several names, uses
and releases by several holders, removes, forced removes, prunes) records the live answers of
every query after each step, with the ledger's position and the clock; then the past state at
each recorded point, by position and by time, must give exactly those answers.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import lmdb
import pytest
import zstandard

from imageledger import (
    ImageCache,
    ImageInUseError,
    ImageNotFoundError,
    LedgerReadOnlyError,
)
from imageledger.cache import internals
from imageledger.projections import runner
from imageledger.projections.views import FORMAT as VIEWS_FORMAT
from imageledger.projections.views import PRESENT_ONLY, TABLES
from imageledger.storage.ledgerformat import LedgerMapper
from imageledger.storage.viewstore import MAX_SHARE, packer
from imageledger.tools.bench_cache import append_mixed_events
from imageledger.tools.imagebuild import ImageSpec, build_docker_archive

NAMES = ("app", "db", "web")


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    directory = tmp_path_factory.mktemp("archives")
    found = []
    for i, name in enumerate(NAMES):
        spec = ImageSpec(
            layers=({"etc/base": b"shared\n"}, {f"opt/{name}": name.encode() * (i + 1)}),
            names=(f"{name}:1", f"{name}:latest", f"mirror/{name}:1"),
        )
        found.append(build_docker_archive(directory / f"{name}.tar", [spec]).path)
    return found


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def answers(view: Any) -> dict[str, Any]:
    """Every query's answer, as plain comparable values."""
    handles = view.list()
    details = {h.reference: view.inspect(h.reference) for h in handles}
    return {
        "list": handles,
        "inspect": details,
        # df's "ledger" measures the ledger's disk now, which no past state answers for.
        "df": {k: v for k, v in view.df().items() if k != "ledger"},
        "history": view.history(),
        "history of app:1": view.history("app:1"),
        "plan": _plan(view.prune(dry_run=True)),
    }


def _plan(report: Any) -> tuple[Any, ...]:
    return (
        report.references,
        report.deleted,
        report.bytes_reclaimed,
        report.image_refs_removed,
        report.layers_removed,
    )


def _steps(rng: random.Random, archives: list[Path], count: int) -> Iterator[tuple[str, Any]]:
    holders = [f"sandbox-{i}" for i in range(4)]
    refs = [f"{prefix}{n}:{tag}" for n in NAMES for prefix, tag in (("", "1"), ("", "latest"))]
    yield "load", archives[0]
    for _ in range(count):
        kind = rng.choice(["load", "load", "use", "use", "release", "remove", "force", "prune"])
        if kind == "load":
            yield kind, rng.choice(archives)
        elif kind == "use":
            yield kind, (rng.choice(refs), rng.choice(holders))
        elif kind == "release":
            yield kind, rng.choice(holders)
        elif kind in ("remove", "force"):
            yield kind, rng.choice(refs)
        else:
            yield kind, None


@pytest.mark.parametrize(("seed", "every"), [(1, None), (2, None), (3, 4), (4, 7)])
def test_every_past_answer_is_what_the_live_cache_said_then(
    tmp_path: Path,
    archives: list[Path],
    seed: int,
    every: int | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without view checkpoints (the default interval is far beyond this run) and with
    checkpoints every few events: left behind by `at` itself in the first pass, then read by
    the second pass in random order, then remade by a rebuild."""
    if every is not None:
        monkeypatch.setattr(runner, "CHECKPOINT_EVERY", every)
    clock = Clock()
    rng = random.Random(seed)
    recorded: list[tuple[int, datetime, dict[str, Any]]] = []
    with ImageCache(tmp_path / "home", clock=clock, durability="nosync") as cache:
        for kind, argument in _steps(rng, archives, 40):
            clock.now += timedelta(seconds=rng.randint(1, 120))
            try:
                if kind == "load":
                    cache.load(argument)
                elif kind == "use":
                    cache.use(*argument)
                elif kind == "release":
                    cache.release(argument)
                elif kind in ("remove", "force"):
                    cache.remove(argument, force=kind == "force")
                else:
                    cache.prune()
            except (ImageNotFoundError, ImageInUseError):
                pass  # refused or absent: the refusal is an event too (or nothing happened)
            position = len(cache.history())
            if position and (not recorded or recorded[-1][0] != position):
                recorded.append((position, clock.now, answers(cache)))
        assert len(recorded) > 20
        for position, when, live in recorded:
            past = cache.at(position)
            assert past.position == position
            assert answers(past) == live, position
            by_time = cache.at(when)
            assert by_time.position == position
        if every is not None:
            checkpoints = internals(cache).ledger.views.checkpoints
            head = len(cache.history())
            nearest = [checkpoints.nearest(p) for p in range(every, head + 1, every)]
            stored = [found[0] for found in nearest if found is not None]
            # `at` left behind the ones it replayed through, as far as their disk may grow.
            assert stored[: len(set(stored))] == sorted(set(stored))
            assert stored and all(p % every == 0 for p in stored)
            mine, log = checkpoints.disk()
            assert 0 < mine <= MAX_SHARE * log
            for position, _when, live in rng.sample(recorded, len(recorded)):
                assert answers(cache.at(position)) == live, position
            assert cache.rebuild(verify=True).identical
            report = cache.rebuild()
            assert report.identical
            assert report.tables["views.checkpoints"][0]  # compared, not skipped
            for position, _when, live in recorded:
                assert answers(cache.at(position)) == live, position
        # The past is read only, and its handles answer as of then.
        position, _when, live = recorded[len(recorded) // 2]
        past = cache.at(position)
        for handle in past.list():
            assert handle.inspect() == live["inspect"][handle.reference]
            with pytest.raises(LedgerReadOnlyError):
                handle.remove()
        with pytest.raises(LedgerReadOnlyError):
            past.prune(dry_run=False)


def test_positions_and_times_outside_the_ledger_are_refused(
    tmp_path: Path, archives: list[Path]
) -> None:
    clock = Clock()
    with ImageCache(tmp_path / "home", clock=clock) as cache:
        cache.load(archives[0])
        head = len(cache.history())
        for bad in (0, head + 1):
            with pytest.raises(ValueError, match="not in the ledger"):
                cache.at(bad)
        with pytest.raises(ValueError, match="in the future"):
            cache.at(clock.now + timedelta(days=1))
        with pytest.raises(ValueError, match="before the ledger's first event"):
            cache.at(clock.now - timedelta(days=1))
        with pytest.raises(ValueError, match="UTC offset"):
            cache.at(datetime(2026, 1, 1))


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imageledger.tools.cli", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_events_lists_the_log_with_filters(tmp_path: Path, archives: list[Path]) -> None:
    home = tmp_path / "home"
    assert _cli(home, "load", str(archives[0])).returncode == 0
    assert _cli(home, "use", "app:1", "--holder", "s1").returncode == 0
    assert _cli(home, "use", "app:latest", "--holder", "s2").returncode == 0
    assert _cli(home, "release", "s1").returncode == 0

    def listed(*args: str) -> list[dict[str, Any]]:
        done = _cli(home, "events", "--json", *args)
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]

    everything = listed()
    assert [e["position"] for e in everything] == list(range(1, len(everything) + 1))
    assert all({"position", "at", "type", "actor"} <= set(e) for e in everything)
    types = [e["type"] for e in everything]
    assert types == ["Started", *["ImagePulled"] * 3, "ImageUsed", "ImageUsed", "HolderReleased"]
    assert [e["holder"] for e in listed("--type", "ImageUsed")] == ["s1", "s2"]
    assert [e["position"] for e in listed("--holder", "s1")] == [5, 7]
    assert [e["type"] for e in listed("--ref", "app:1")] == [
        "ImagePulled",
        "ImageUsed",
        "HolderReleased",
    ]
    assert [e["position"] for e in listed("--from", "3", "--to", "5")] == [3, 4, 5]
    assert listed("--actor", "nobody-here") == []
    assert listed("--since", "2999-01-01") == []
    human = _cli(home, "events").stdout.splitlines()
    assert len(human) == len(everything) and "HolderReleased" in human[-1]


def test_events_follow_prints_what_another_process_appends(
    tmp_path: Path, archives: list[Path]
) -> None:
    home = tmp_path / "home"
    assert _cli(home, "load", str(archives[0])).returncode == 0
    command = [sys.executable, "-m", "imageledger.tools.cli", "--home", str(home)]
    follower = subprocess.Popen(
        [*command, "events", "--json", "--follow", "--from", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _cli(home, "use", "app:1", "--holder", "late").returncode == 0
        assert follower.stdout is not None
        line = follower.stdout.readline()  # blocks until the follower prints it
        event = json.loads(line)
        assert (event["position"], event["type"], event["holder"]) == (5, "ImageUsed", "late")
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(30)
    assert follower.returncode == 130


def test_diff_says_what_changed_between_two_points(tmp_path: Path, archives: list[Path]) -> None:
    home = tmp_path / "home"
    assert _cli(home, "load", str(archives[0])).returncode == 0  # app:1, app:latest, mirror
    start = 4
    assert _cli(home, "use", "app:1", "--holder", "s1").returncode == 0
    assert _cli(home, "load", str(archives[1])).returncode == 0  # db:1, db:latest, mirror
    assert _cli(home, "release", "s1").returncode == 0
    assert _cli(home, "use", "db:1", "--holder", "s2").returncode == 0
    assert _cli(home, "rm", "app:latest").returncode == 0
    with ImageCache(home) as cache:
        db = cache.get("db:1").manifest_digest
        app = cache.get("app:1").manifest_digest
        end = len(cache.history())
        change = cache.diff(start, end)
    assert [a["reference"] for a in change["added"]] == [
        "docker.io/library/db:1",
        "docker.io/library/db:latest",
        "docker.io/mirror/db:1",
    ]
    assert [r["reference"] for r in change["removed"]] == ["docker.io/library/app:latest"]
    assert change["removed"][0]["manifest_digest"] == app
    assert change["retagged"] == []
    assert change["leases_taken"] == [
        {"holder": "s2", "reference": "docker.io/library/db:1", "manifest_digest": db}
    ]
    assert change["leases_released"] == []  # s1 took and released within the span
    assert change["bytes_gained"] > 0 and change["bytes_reclaimed"] == 0
    back = json.loads(_cli(home, "diff", str(end), str(start), "--json").stdout)
    assert back["added"] == change["removed"] and back["removed"] == change["added"]
    assert back["leases_released"] == change["leases_taken"]
    assert back["bytes_reclaimed"] == change["bytes_gained"]
    human = _cli(home, "diff", str(start), str(end))
    assert human.returncode == 0 and "+ docker.io/library/db:1" in human.stdout


def test_explain_says_why_an_image_is_here_or_gone_citing_positions(
    tmp_path: Path, archives: list[Path]
) -> None:
    home = tmp_path / "home"
    assert _cli(home, "load", str(archives[0])).returncode == 0  # positions 2-4: app refs
    assert _cli(home, "use", "app:1", "--holder", "sandbox-9").returncode == 0  # 5
    assert _cli(home, "rm", "app:latest").returncode == 0  # 6: untagged
    assert _cli(home, "rm", "--force", "app:1").returncode == 0  # 7: forced, leased
    why = json.loads(_cli(home, "explain", "mirror/app:1", "--json").stdout)
    assert why["present"] is True and why["made_by"]["position"] == 4
    assert why["made_by"]["event"] == "ImagePulled" and why["made_by"]["user"]
    assert why["leases"] == [{"holder": "sandbox-9", "references": ["docker.io/library/app:1"]}]
    gone = json.loads(_cli(home, "explain", "app:1", "--json").stdout)
    assert gone["present"] is False
    assert (gone["removed_by"]["position"], gone["removed_by"]["forced"]) == (7, True)
    assert gone["holders_then"] == ["sandbox-9"]
    # As of before the remove, app:1 was there.
    earlier = json.loads(_cli(home, "explain", "app:1", "--at", "6", "--json").stdout)
    assert earlier["present"] is True and earlier["as_of"] == 6
    # A prune, with its reason and policy recorded.
    assert _cli(home, "release", "sandbox-9").returncode == 0
    assert _cli(home, "prune").returncode == 0
    pruned = json.loads(_cli(home, "explain", "mirror/app:1", "--json").stdout)
    assert pruned["removed_by"]["event"] == "ImagesPruned" and pruned["removed_by"]["reason"]
    assert pruned["removed_by"]["policy"]["keep"] == []
    human = _cli(home, "explain", "app:1")
    assert human.returncode == 0 and "is gone" in human.stdout and "position 7" in human.stdout
    never = _cli(home, "explain", "never/was:here")
    assert never.returncode == 3 and len(never.stderr.strip().splitlines()) == 1
    # A reference whose only events are failed pulls was never cached: not found, no trace.
    failed = "127.0.0.1:9/none:1"
    pulled = _cli(home, "pull", failed, "--insecure-registry", "127.0.0.1:9", "--timeout", "2s")
    assert pulled.returncode != 0
    assert _cli(home, "events", "--type", "PullFailed").stdout.count("PullFailed") == 1
    only_failed = _cli(home, "explain", failed)
    assert only_failed.returncode == 3, only_failed.stderr
    assert len(only_failed.stderr.strip().splitlines()) == 1


def _checkpointed(home: Path, archives: list[Path], clock: Clock) -> list[tuple[int, Any]]:
    """A home with view checkpoints (every 3 events, made by a rebuild) and the live answers
    at every position."""
    recorded = []
    with ImageCache(home, clock=clock, durability="nosync") as cache:
        for step in range(12):
            clock.now += timedelta(minutes=1)
            cache.load(archives[step % len(archives)])
            if step % 4 == 3:
                cache.use(f"{NAMES[step % 3]}:1", f"sandbox-{step}")
            if step % 5 == 4:
                cache.remove(f"{NAMES[step % 3]}:latest", force=True)
            recorded.append((len(cache.history()), answers(cache)))
        report = cache.rebuild()
        assert report.identical
    return recorded


def test_damaged_view_checkpoints_are_reported_never_obeyed(
    tmp_path: Path, archives: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flipped bytes in a checkpoint, and a checkpoint that decodes but says another past:
    `at` still answers what the live cache said (from an earlier checkpoint or the log),
    `rebuild --verify` reports the checkpoints, `rebuild` remakes them."""
    monkeypatch.setattr(runner, "CHECKPOINT_EVERY", 3)
    home = tmp_path / "home"
    recorded = _checkpointed(home, archives, Clock())
    env = lmdb.open(str(home / "ledger"), max_dbs=64)
    db = env.open_db(b"views.checkpoints", create=False)
    with env.begin(write=True, db=db) as txn:
        stored = [(bytes(k), bytes(v)) for k, v in txn.cursor()]
        assert len(stored) >= 3
        flipped = bytearray(stored[1][1])
        flipped[len(flipped) // 2] ^= 0xFF
        txn.put(stored[1][0], bytes(flipped))
        txn.put(stored[2][0], stored[0][1])  # well formed, but the views of another position
    env.close()
    with ImageCache(home) as cache:
        for position, live in recorded:
            assert answers(cache.at(position)) == live, position
    with ImageCache(home) as cache:
        verify = cache.rebuild(verify=True)
        assert not verify.identical
        differ = [t for t, (live, rebuilt) in verify.tables.items() if live != rebuilt]
        assert differ == ["views.checkpoints"]
        assert not cache.rebuild().identical  # it found them, and remade them
        again = cache.rebuild(verify=True)
        assert again.identical, [t for t, (a, b) in again.tables.items() if a != b]
        for position, live in recorded:
            assert answers(cache.at(position)) == live, position
    done = subprocess.run(
        [sys.executable, "-m", "imageledger.tools.cli", "--home", str(home), "rebuild", "--verify"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_a_home_this_user_may_only_read_answers_the_past_without_writing(
    tmp_path: Path, archives: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`at` leaves checkpoints behind only where it may write: on a read-only ledger it
    replays from the checkpoints there are (or the log) and changes nothing."""
    monkeypatch.setattr(runner, "CHECKPOINT_EVERY", 3)
    home = tmp_path / "home"
    recorded = []
    clock = Clock()
    with ImageCache(home, clock=clock, durability="nosync") as cache:
        for step in range(9):
            clock.now += timedelta(minutes=1)
            cache.load(archives[step % len(archives)])
            recorded.append((len(cache.history()), answers(cache)))
    before = (home / "ledger" / "data.mdb").read_bytes()
    view = tmp_path / "read-only"
    view.mkdir()
    bound = subprocess.run(
        ["mount", "--bind", str(home), str(view)], capture_output=True, check=False
    )
    if bound.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bound.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
        with ImageCache(view) as cache:
            assert cache.read_only
            for position, live in recorded:
                assert answers(cache.at(position)) == live, position
    finally:
        subprocess.run(["umount", str(view)], check=True)
    assert (home / "ledger" / "data.mdb").read_bytes() == before
    with ImageCache(home) as cache:
        assert internals(cache).ledger.views.checkpoints.disk()[0] == 0


def test_df_reports_the_ledger_and_its_checkpoints_beside_it(
    tmp_path: Path, archives: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "CHECKPOINT_EVERY", 3)
    home = tmp_path / "home"
    _checkpointed(home, archives, Clock())
    with ImageCache(home) as cache:
        ledger = cache.df()["ledger"]
    assert ledger["log_bytes"] > 0
    assert 0 < ledger["checkpoint_bytes"] <= MAX_SHARE * ledger["log_bytes"]
    assert ledger["checkpoint_share"] == round(ledger["checkpoint_bytes"] / ledger["log_bytes"], 3)


def test_checkpoints_are_the_bytes_of_the_whole_views_packed_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebuild packs each checkpoint from rows its replay packed earlier where they did not
    change since (`MemoryView.packed`): every stored checkpoint must still be the bytes of
    the whole document packed in one call, as an independent replay of the log (a fresh
    mapper and fold, no checkpoint read) has the views there. The mixed events add, change
    and delete rows between checkpoints."""
    monkeypatch.setattr(runner, "CHECKPOINT_EVERY", 250)
    with ImageCache(tmp_path / "home", durability="nosync") as cache:
        append_mixed_events(cache, 2000, 40, batch=100)
        assert cache.rebuild().identical
        ledger = internals(cache).ledger
        env = ledger.views.env
        view = runner.MemoryView(TABLES, PRESENT_ONLY)
        fold = runner.folder(LedgerMapper().to_domain_event)
        checked, after = 0, 0
        while batch := ledger.views.read_log(after, 250):
            fold(view, list(batch))
            view.take()
            after = batch[-1].id
            if after % 250:
                continue
            with env.read() as txn:
                stored = txn.get(after.to_bytes(8, "big"), db=env.db("views.checkpoints"))
                record = next(iter(ledger.records()(txn, after - 1)))[1]
            assert stored is not None, after
            rows = {t: dict(sorted(r.items())) for t, r in sorted(view.records().items())}
            whole = packer()([VIEWS_FORMAT, after, hashlib.sha256(record).digest(), rows])
            assert zstandard.ZstdDecompressor().decompress(bytes(stored)) == whole, after
            checked += 1
        assert checked == 8
        assert cache.rebuild(verify=True).identical
