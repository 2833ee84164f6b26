"""The ledger given bad input: a path that is no ledger (a file, random bytes, a truncated or
foreign LMDB environment), a full map, invalid configuration, and the relaxed durability modes
(which must still survive a process crash).

Everything runs on real files; what must not crash the test process (a damaged data file can
make LMDB touch memory beyond the end of the file) runs in a child process.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any
from uuid import NAMESPACE_URL, UUID, uuid5

import lmdb
import pytest
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import (
    ApplicationRecorder,
    InterfaceError,
    OperationalError,
    StoredEvent,
)

from imageledger.domain.errors import LedgerCorruptError, LedgerFullError
from imageledger.storage.ledger import LMDBApplicationRecorder, LMDBFactory

if TYPE_CHECKING:
    from tests._ledger_child import opened
else:
    from _ledger_child import opened

TIMEOUT = 60.0  # for waiting only: nothing asserts how long anything took
MIB = 1 << 20
APP_NAME = "ledgertest"  # the namespace of the child processes' application
PERSISTENCE_MODULE = "imageledger.storage.ledger"

Spawn = Callable[..., Any]


class Note(Aggregate):
    """An aggregate with a payload of any size."""

    def __init__(self, text: str) -> None:
        self.text = text

    @event("Edited")
    def edit(self, text: str) -> None:
        self.text = text


class LedgerApp(Application[UUID]):
    name = APP_NAME


def _env(ledger: Path, **settings: str) -> dict[str, str]:
    return {"PERSISTENCE_MODULE": PERSISTENCE_MODULE, "LMDB_PATH": str(ledger), **settings}


def _oid(name: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"imageledger-test:{name}")


def _event(name: str, version: int = 1, state: bytes = b"{}") -> StoredEvent:
    return StoredEvent(_oid(name), version, "test:Event", state)


def _dump(spawn: Spawn, ledger: Path, **settings: str) -> list[list[Any]]:
    """The whole log as a fresh process reads it: [id, originator, version, topic, sha256]."""
    child = spawn(ledger, "dump", **settings)
    rows: list[list[Any]] = child.expect("dump")["rows"]
    child.wait()
    return rows


def _rows(recorder: ApplicationRecorder, lc: ModuleType) -> list[list[Any]]:
    """The whole log as this process reads it, in the form of `_dump`."""
    last = recorder.max_notification_id() or 0
    return [
        [n.id, str(n.originator_id), n.originator_version, n.topic, lc.digest(n.state)]
        for n in recorder.select_notifications(1, last + 100)
    ]


# ------------------------------------------------------------------ a file, not a ledger


def test_path_of_a_regular_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    """LMDB_PATH naming a file: `LedgerCorruptError` naming the path, the file untouched;
    the same through an `Application`, and for a path below that file."""
    path = tmp_path / "ledger"
    content = b"my precious notes\n" * 100
    path.write_bytes(content)
    for target in (path, path / "ledger"):
        with pytest.raises(LedgerCorruptError) as caught:
            LMDBFactory(_env(target))
        assert str(target) in str(caught.value)
        assert isinstance(caught.value, InterfaceError)
    with pytest.raises(LedgerCorruptError, match=str(path)):
        LedgerApp(env=_env(path))
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger"]


# ------------------------------------------------------------------ damaged data files


@pytest.mark.parametrize("size", [100, 3 * 4096, 64 * 1024])
def test_random_bytes_data_file_is_refused_and_left_alone(tmp_path: Path, size: int) -> None:
    """A directory whose data.mdb is random bytes: `LedgerCorruptError` naming the path, and
    data.mdb keeps its bytes."""
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    content = random.Random(size).randbytes(size)
    (ledger / "data.mdb").write_bytes(content)
    with pytest.raises(LedgerCorruptError) as caught:
        LMDBFactory(_env(ledger))
    assert str(ledger) in str(caught.value)
    assert (ledger / "data.mdb").read_bytes() == content


@pytest.mark.parametrize(
    "keep",
    [
        pytest.param(lambda size: 100, id="inside-first-meta-page"),
        pytest.param(
            lambda size: 8192,
            id="meta-pages-only",
        ),
        pytest.param(
            lambda size: size // 2,
            id="half",
        ),
    ],
)
def test_truncated_ledger_is_refused_and_left_alone(
    tmp_path: Path, spawn: Spawn, keep: Callable[[int], int]
) -> None:
    """A truncated copy of a real ledger's data.mdb: opening it (in a child, since a damaged
    map can kill the process) reports `LedgerCorruptError` naming the path, and the copy keeps
    its bytes."""
    real = tmp_path / "real"
    with opened(real) as recorder:
        for n in range(60):
            recorder.insert_events([_event(f"t{n}", 1, bytes([n]) * 3000)])
    data = (real / "data.mdb").read_bytes()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    content = data[: keep(len(data))]
    (damaged / "data.mdb").write_bytes(content)

    probe = spawn(damaged, "probe")
    code = probe.proc.wait(TIMEOUT)
    assert code == 0, f"opening a truncated ledger killed the process ({code})"
    report = probe.expect("error")
    assert report["type"] == "LedgerCorruptError"
    assert str(damaged) in report["message"]
    assert (damaged / "data.mdb").read_bytes() == content


# ------------------------------------------------------------------ foreign LMDB data


def _plain_keys(path: Path) -> None:
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        txn.put(b"user:1", b"alice")
        txn.put(b"user:2", b"bob")
    env.close()


def _named_dbs(path: Path) -> None:
    env = lmdb.open(str(path), max_dbs=4)
    db = env.open_db(b"things")
    with env.begin(write=True, db=db) as txn:
        txn.put(b"k", b"v")
    env.close()


def _key_named_like_meta(path: Path) -> None:
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        txn.put(b"imageledger.meta", b"not a database")
        txn.put(b"other", b"data")
    env.close()


def _other_format(path: Path) -> None:
    env = lmdb.open(str(path), max_dbs=4)
    db = env.open_db(b"imageledger.meta")
    with env.begin(write=True, db=db) as txn:
        txn.put(b"format", b"imageledger-ledger/99")
    env.close()


def _main_db(path: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(path), readonly=True, max_dbs=4)
    try:
        with env.begin() as txn:
            return {bytes(k): bytes(v) for k, v in txn.cursor()}
    finally:
        env.close()


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_plain_keys, id="plain-keys"),
        pytest.param(_named_dbs, id="named-databases"),
        pytest.param(_other_format, id="other-ledger-format"),
        pytest.param(
            _key_named_like_meta,
            id="key-named-like-the-meta-db",
        ),
    ],
)
def test_foreign_lmdb_environment_is_refused_and_left_alone(
    tmp_path: Path, make: Callable[[Path], None]
) -> None:
    """A valid LMDB environment that is not an imageledger ledger: `LedgerCorruptError` naming
    the path; data.mdb keeps its bytes and its keys, and no ledger metadata is added."""
    path = tmp_path / "foreign"
    make(path)
    content = (path / "data.mdb").read_bytes()
    keys = _main_db(path)
    with pytest.raises(LedgerCorruptError) as caught:
        LMDBFactory(_env(path))
    assert str(path) in str(caught.value)
    assert (path / "data.mdb").read_bytes() == content
    assert _main_db(path) == keys


# ------------------------------------------------------------------ full map


def test_full_map_rolls_the_append_back_whole(
    ledger_path: Path, spawn: Spawn, lc: ModuleType
) -> None:
    """A ledger capped at 1 MiB: an append that cannot fit raises `LedgerFullError` (an
    eventsourcing `OperationalError`) naming the path, and nothing of it is visible, not even
    its events that would fit; what was committed before is intact, a small append either
    commits at max+1 or fails the same way, and a new process reopens all of it."""
    capped = {"LMDB_MAP_SIZE": str(MIB), "LMDB_MAX_MAP_SIZE": str(MIB)}
    app = LedgerApp(env=_env(ledger_path, **capped))
    try:
        recorder = app.recorder
        assert isinstance(recorder, LMDBApplicationRecorder)
        assert recorder.insert_events(
            [_event("grower", v, b"small %d" % v) for v in (1, 2, 3)]
        ) == [1, 2, 3]
        before = recorder.select_events(_oid("grower"))

        # A batch of small and too-big events for an aggregate that exists: all or nothing.
        batch = [_event("grower", 4, b"fits"), _event("grower", 5, b"z" * 600_000)]
        batch.append(_event("grower", 6, b"z" * 600_000))
        with pytest.raises(LedgerFullError) as caught:
            recorder.insert_events(batch)
        assert isinstance(caught.value, OperationalError)
        assert str(ledger_path) in str(caught.value)
        assert recorder.max_notification_id() == 3
        assert recorder.select_events(_oid("grower")) == before

        # Through the application: the aggregate is not saved at all.
        note = Note("n" * 1_100_000)
        with pytest.raises(LedgerFullError):
            app.save(note)
        with pytest.raises(AggregateNotFoundError):
            app.repository.get(note.id)

        # Fill the map one event at a time until it refuses one.
        committed: list[str] = []
        failed = None
        for n in range(1000):
            name = f"filler-{n}"
            try:
                recorder.insert_events([_event(name, 1, bytes([n % 256]) * 16_000)])
            except LedgerFullError:
                failed = name
                break
            committed.append(name)
        assert failed is not None, "a 1 MiB map took 16 MB"
        last = recorder.max_notification_id()
        assert last == 3 + len(committed)
        assert recorder.select_events(_oid(failed)) == []
        assert recorder.select_events(_oid("grower")) == before
        for n, name in enumerate(committed):
            (stored,) = recorder.select_events(_oid(name))
            assert stored.state == bytes([n % 256]) * 16_000

        # A small append commits at max+1 only if space is left; either way the log is whole.
        try:
            ids = recorder.insert_events([_event("small", 1, b"tiny")])
        except LedgerFullError:
            assert recorder.max_notification_id() == last
            assert recorder.select_events(_oid("small")) == []
        else:
            assert ids == [last + 1]
        rows = _rows(recorder, lc)
        assert [r[0] for r in rows] == list(range(1, len(rows) + 1))
    finally:
        app.close()

    assert _dump(spawn, ledger_path, **capped) == rows


def test_threads_appending_into_a_full_map_fail_cleanly(ledger_path: Path, lc: ModuleType) -> None:
    """Six threads append events of mixed sizes into a 1 MiB ledger until well past full:
    every append either commits or raises `LedgerFullError` (nothing else), the log is
    exactly the committed events at the ids they were given, gapless, and no failed event is
    visible."""
    capped = {"LMDB_MAP_SIZE": str(MIB), "LMDB_MAX_MAP_SIZE": str(MIB)}
    outcomes: list[tuple[StoredEvent, list[int] | None]] = []
    unexpected: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(6)
    with opened(ledger_path, **capped) as recorder:

        def work(thread: int) -> None:
            rng = random.Random(thread)
            try:
                start.wait(TIMEOUT)
                for i in range(40):
                    size = rng.choice([50, 2_000, 20_000, 60_000])
                    stored = _event(f"t{thread}-{i}", 1, bytes([i]) * size)
                    try:
                        ids = recorder.insert_events([stored])
                    except LedgerFullError:
                        result = None
                    else:
                        result = list(ids or [])
                    with lock:
                        outcomes.append((stored, result))
            except BaseException as e:
                unexpected.append(e)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        assert unexpected == []
        assert len(outcomes) == 6 * 40

        succeeded = [(s, ids) for s, ids in outcomes if ids is not None]
        failed = [s for s, ids in outcomes if ids is None]
        assert succeeded and failed, "the map never filled, or nothing fitted"
        last = recorder.max_notification_id()
        assert sorted(i for _, ids in succeeded for i in ids) == list(range(1, (last or 0) + 1))
        notes = {n.id: n for n in recorder.select_notifications(1, 1000)}
        assert sorted(notes) == list(range(1, (last or 0) + 1))
        for stored, ids in succeeded:
            (nid,) = ids
            assert (notes[nid].originator_id, notes[nid].state) == (
                stored.originator_id,
                stored.state,
            )
        for stored in failed:
            assert recorder.select_events(stored.originator_id) == []


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("LMDB_DURABILITY", "fast"),
        ("LMDB_MAP_SIZE", "lots"),
        ("LMDB_MAP_SIZE", "64MiB"),
        ("LMDB_MAX_MAP_SIZE", "1T"),
        pytest.param(
            "LMDB_POLL_INTERVAL",
            "soon",
        ),
        pytest.param(
            "LMDB_MAP_SIZE",
            "-1",
        ),
    ],
)
def test_invalid_setting_is_a_clear_error_and_touches_nothing(
    ledger_path: Path, key: str, value: str
) -> None:
    """An invalid setting: `OSError` (eventsourcing's convention for configuration) naming
    the key, from the factory and from an application, and no ledger directory is made."""
    with pytest.raises(OSError, match=key):
        LMDBFactory(_env(ledger_path, **{key: value}))
    with pytest.raises(OSError, match=key):
        LedgerApp(env=_env(ledger_path, **{key: value}))
    assert not ledger_path.exists()


@pytest.mark.parametrize("path", [None, ""])
def test_missing_path_is_a_clear_error(path: str | None) -> None:
    """No (or an empty) LMDB_PATH: `OSError` naming the key."""
    env = {"PERSISTENCE_MODULE": PERSISTENCE_MODULE}
    if path is not None:
        env["LMDB_PATH"] = path
    with pytest.raises(OSError, match="LMDB_PATH"):
        LMDBFactory(env)
    with pytest.raises(OSError, match="LMDB_PATH"):
        LedgerApp(env=env)


# ------------------------------------------------------------------ durability modes


@pytest.mark.parametrize("durability", ["nometasync", "nosync"])
def test_relaxed_durability_appends_reads_and_reopens(
    ledger_path: Path, spawn: Spawn, lc: ModuleType, durability: str
) -> None:
    """A ``nometasync`` or ``nosync`` ledger appends, reads back, and reopens (here and in a
    new process) with everything in it."""
    settings = {"LMDB_DURABILITY": durability}
    app = LedgerApp(env=_env(ledger_path, **settings))
    try:
        note = Note("first")
        for n in range(5):
            note.edit(f"edit {n}")
        app.save(note)
        app.recorder.insert_events([_event("direct", v) for v in (1, 2)])
        assert app.repository.get(note.id).text == "edit 4"
        rows = _rows(app.recorder, lc)
    finally:
        app.close()
    assert [r[0] for r in rows] == list(range(1, 9))

    app = LedgerApp(env=_env(ledger_path, **settings))
    try:
        assert app.repository.get(note.id).text == "edit 4"
        assert _rows(app.recorder, lc) == rows
    finally:
        app.close()
    assert _dump(spawn, ledger_path, **settings) == rows


def test_nosync_writer_killed_loses_nothing_reported(
    ledger_path: Path, spawn: Spawn, lc: ModuleType
) -> None:
    """``nosync`` leaves flushing to the OS, whose page cache outlives a crashed process: a
    writer SIGKILLed mid-loop loses none of the appends it was told were committed, the log
    stays gapless and takes the next append at max+1. Two rounds."""
    log: dict[int, tuple[str, int, bytes]] = {}
    for n, threshold in enumerate((50, 73)):
        tag = f"nosync-{n}"
        child = spawn(ledger_path, "appender", tag, "2", LMDB_DURABILITY="nosync")
        child.expect("ready")
        reported: list[dict[str, Any]] = []
        while sum(len(m["ids"]) for m in reported) < threshold:
            reported.append(child.expect("committed"))
        reported += child.kill()

        with opened(ledger_path, LMDB_DURABILITY="nosync") as recorder:
            problems, log = lc.check_after_kill(recorder, tag, reported, log)
            assert problems == []
            last = max(log)
            assert last >= max(nid for m in reported for nid in m["ids"])
            assert recorder.insert_events([_event(f"after-{tag}")]) == [last + 1]
            log = lc.log_rows(recorder)
    assert list(log) == list(range(1, len(log) + 1))


def test_ledger_directory_can_be_moved_back_after_refusal(tmp_path: Path) -> None:
    """After a refused open (a file in the way), removing the obstacle is enough: the same
    path then opens as a new, empty ledger in the same process."""
    path = tmp_path / "ledger"
    path.write_bytes(b"in the way")
    with pytest.raises(LedgerCorruptError):
        LMDBFactory(_env(path))
    path.unlink()
    with opened(path) as recorder:
        assert recorder.max_notification_id() is None
        assert recorder.insert_events([_event("x")]) == [1]
