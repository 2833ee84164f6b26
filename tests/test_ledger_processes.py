"""The ledger shared by real processes: concurrent appends, SIGKILL mid-append, readers left
by killed processes, a map grown by another process, and subscriptions across processes.

Every child is a fresh interpreter (`subprocess` with `sys.executable`) running a command of
`tests/_ledger_child.py`; nothing is forked after LMDB is open, nothing is mocked.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.persistence import Notification, StoredEvent

from imageledger.storage.ledger import LMDBApplicationRecorder

if TYPE_CHECKING:
    from tests._ledger_child import opened
else:
    from _ledger_child import opened

TIMEOUT = 60.0  # for waiting only: nothing asserts how long anything took
MIB = 1 << 20
APP_NAME = "ledgertest"  # the children's application: the ledger namespace they share
PERSISTENCE_MODULE = "imageledger.storage.ledger"

Spawn = Callable[..., Any]


def _event(originator: UUID, version: int = 1, state: bytes = b"{}") -> StoredEvent:
    return StoredEvent(originator, version, "test:Event", state)


# ------------------------------------------------------------------ concurrent appends

CHILDREN = 4
EVENTS_PER_CHILD = 200


def test_concurrent_processes_append_gapless_unmixed_and_intact(
    ledger_path: Path, tmp_path: Path, spawn: Spawn, lc: ModuleType
) -> None:
    """Four processes, started together, each append 200 events in batches of 1-9 (half via
    `Application.save` of counters, half straight into the recorder): afterwards the log is
    1..800 without a gap, every event is there once at the id its writer was told, every
    batch occupies consecutive ids, and every aggregate replays to the state its writer had."""
    reports = [tmp_path / f"report-{n}.json" for n in range(CHILDREN)]
    children = [
        spawn(ledger_path, "concurrent", str(n), str(EVENTS_PER_CHILD), str(reports[n]))
        for n in range(CHILDREN)
    ]
    for child in children:
        child.expect("ready")  # every child has the ledger open before any writes
    for child in children:
        child.send("go")
    for child in children:
        child.expect("done")
        child.wait()

    total = CHILDREN * EVENTS_PER_CHILD
    app = lc.LedgerApp(
        env={"PERSISTENCE_MODULE": PERSISTENCE_MODULE, "LMDB_PATH": str(ledger_path)}
    )
    try:
        recorder: LMDBApplicationRecorder = app.recorder
        assert recorder.max_notification_id() == total
        notes = recorder.select_notifications(1, total + 100)
        assert [n.id for n in notes] == list(range(1, total + 1))
        by_id = {n.id: n for n in notes}

        claimed: dict[int, tuple[str, int]] = {}
        for path in reports:
            report = json.loads(path.read_text())
            for batch in report["batches"]:
                ids = batch["ids"]
                assert len(ids) == len(batch["events"]) > 0
                assert ids == list(range(ids[0], ids[0] + len(ids))), f"batch split: {ids}"
                for nid, (oid, version) in zip(ids, batch["events"], strict=True):
                    assert nid not in claimed, f"id {nid} reported by two writers"
                    claimed[nid] = (oid, version)
                    note = by_id[nid]
                    assert (str(note.originator_id), note.originator_version) == (oid, version)
        assert sorted(claimed) == list(range(1, total + 1))  # no event nobody wrote

        for path in reports:
            report = json.loads(path.read_text())
            for oid, want in report["counters"].items():
                counter = app.repository.get(UUID(oid))
                assert (counter.version, counter.count, counter.total) == (
                    want["version"],
                    want["count"],
                    want["total"],
                )
                versions = [s.originator_version for s in recorder.select_events(UUID(oid))]
                assert versions == list(range(1, want["version"] + 1))
            direct, last = report["direct"]
            stored = recorder.select_events(UUID(direct))
            assert [json.loads(s.state) for s in stored] == [
                {"child": report["child"], "version": v} for v in range(1, last + 1)
            ]
    finally:
        app.close()


# ------------------------------------------------------------------ SIGKILL mid-append

# Kill after at least this many events were reported committed, in successive rounds on the
# same ledger: different moments in the append loop, so some kills land inside a commit.
KILL_AFTER = (50, 61, 77, 90)


def test_sigkill_mid_append_loses_nothing_reported(
    ledger_path: Path, spawn: Spawn, lc: ModuleType
) -> None:
    """A child appends from two threads (durability ``sync``) and reports each commit; it is
    SIGKILLed mid-loop. The ledger then opens, holds every reported event with its exact
    content, has ids 1..max without a gap, and the next append gets max+1. Four rounds."""
    log: dict[int, tuple[str, int, bytes]] = {}
    for n, threshold in enumerate(KILL_AFTER):
        tag = f"round-{n}"
        child = spawn(ledger_path, "appender", tag, "2")
        child.expect("ready")
        reported: list[dict[str, Any]] = []
        while sum(len(m["ids"]) for m in reported) < threshold:
            reported.append(child.expect("committed"))
        reported += child.kill()

        with opened(ledger_path) as recorder:
            problems, log = lc.check_after_kill(recorder, tag, reported, log)
            assert problems == []
            last = max(log)
            assert last >= max(nid for m in reported for nid in m["ids"])
            assert recorder.insert_events([_event(uuid4())]) == [last + 1]
            log = lc.log_rows(recorder)


# ------------------------------------------------------------------ stale reader slots


def test_open_clears_reader_slots_of_killed_processes(ledger_path: Path, spawn: Spawn) -> None:
    """Two processes are SIGKILLed inside a read transaction while this process keeps the
    ledger open (when nobody has it open, LMDB resets the whole reader table anyway). Their
    slots stay in the lock file (raw LMDB still lists them) until the next process opens the
    ledger, which clears them: its reader table no longer names them, a second check finds
    nothing to clear, and it appends."""
    with opened(ledger_path) as recorder:
        readers = [spawn(ledger_path, "reader") for _ in range(2)]
        dead = [reader.expect("reading")["pid"] for reader in readers]
        for reader in readers:
            reader.kill()

        raw = spawn(ledger_path, "raw-readers", str(ledger_path))
        left = raw.expect("readers")["pids"]
        raw.wait()
        assert set(dead) <= set(left), "the killed readers left no slot: the test proves nothing"

        check = spawn(ledger_path, "open-check")
        after = check.expect("opened")
        check.wait()
        assert not set(dead) & set(after["pids"])
        assert after["second_check"] == 0
        assert after["appended"] == [1]

        raw = spawn(ledger_path, "raw-readers", str(ledger_path))
        assert not set(dead) & set(raw.expect("readers")["pids"])
        raw.wait()
        assert recorder.max_notification_id() == 1


# ------------------------------------------------------------------ map growth


@pytest.mark.parametrize(
    "op",
    [
        "read",
        "append",
        pytest.param(
            "new-recorder",
        ),
    ],
)
def test_process_open_across_another_process_growing_the_map(
    ledger_path: Path, spawn: Spawn, op: str
) -> None:
    """Process A opens a 1 MiB ledger and reads; process B appends 5 MB, which grows the map.
    A, still open, then (reads | appends | makes a new recorder) and appends: it adopts the
    grown map, its append gets the ids after B's, and it reads all of B's events."""
    small = {"LMDB_MAP_SIZE": str(MIB)}
    a = spawn(ledger_path, "grow-a", op, **small)
    assert a.expect("opened")["map_size"] == MIB

    b = spawn(ledger_path, "append", "50", "100000", **small)
    grown = b.expect("appended")
    b.wait()
    assert grown["map_size"] > MIB, "B did not grow the map: the test proves nothing"
    assert [e["id"] for e in grown["appended"]] == list(range(1, 51))

    a.send("go")
    result = a.expect("result")
    a.wait()
    assert "error" not in result, result["error"]
    assert result["appended"] == [51, 52, 53]
    assert result["ids"] == list(range(1, 54))
    assert result["versions"] == [1, 2, 3]
    assert result["map_size"] >= grown["map_size"]


# ------------------------------------------------------------------ subscriptions


def _follow(
    recorder: LMDBApplicationRecorder, gt: int, count: int
) -> tuple[list[Notification], threading.Event, list[BaseException], Callable[[], None]]:
    """Subscribe after `gt` and collect `count` notifications in a thread."""
    got: list[Notification] = []
    done = threading.Event()
    errors: list[BaseException] = []
    subscription = recorder.subscribe(gt=gt)

    def follow() -> None:
        try:
            for notification in subscription:
                got.append(notification)
                if len(got) == count:
                    done.set()
                    return
        except BaseException as e:
            errors.append(e)
            done.set()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()

    def stop() -> None:
        subscription.stop()
        thread.join(TIMEOUT)

    return got, done, errors, stop


def test_subscription_sees_another_process_appending(
    ledger_path: Path, spawn: Spawn, lc: ModuleType
) -> None:
    """A subscription in this process yields the three events another process appends, in
    order, with their content."""
    with opened(ledger_path) as recorder:
        recorder.insert_events([_event(uuid4())])
        start = recorder.max_notification_id()
        assert start == 1
        got, done, errors, stop = _follow(recorder, start, 3)
        try:
            child = spawn(ledger_path, "append", "3", "10")
            appended = child.expect("appended")["appended"]
            child.wait()
            assert done.wait(TIMEOUT), f"subscription yielded {len(got)} of 3"
        finally:
            stop()
        assert errors == []
        assert [a["id"] for a in appended] == [2, 3, 4]
        assert [(n.id, str(n.originator_id), lc.digest(n.state)) for n in got] == [
            (a["id"], a["originator"], a["sha"]) for a in appended
        ]


def test_subscription_woken_by_a_write_in_this_process(ledger_path: Path) -> None:
    """A write in the subscriber's own process wakes it at once: the poll interval is set far
    beyond the wait, so only the in-process notification can deliver the event in time."""
    with opened(ledger_path, LMDB_POLL_INTERVAL="30") as recorder:
        got, done, errors, stop = _follow(recorder, 0, 2)
        try:
            ids = recorder.insert_events([_event(uuid4()), _event(uuid4())])
            assert done.wait(TIMEOUT / 6), f"subscription yielded {len(got)} of 2"
        finally:
            stop()
        assert errors == []
        assert [n.id for n in got] == ids == [1, 2]
