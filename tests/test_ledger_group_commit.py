"""The group commit of `storage.lmdbenv.LedgerEnv.write`, seen through its documented hook
(`commit_observer`) and through what the writers get back: a batch that fails fails every
writer in it and writes none of them; a lone writer never waits for company; a writer whose
company stopped writing waits for it once, and that wait ends at the bound, not with company.

Nothing asserts how long anything took; where a test needs writers queued behind a leader it
gives them time to queue, and asserts only what holds whichever batches they ended up in.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import lmdb
import pytest

from imageledger.domain.errors import LedgerFullError
from imageledger.storage.lmdbenv import BatchReport, EnvConfig, LedgerEnv, open_env, release_env

TIMEOUT = 60.0  # for waiting only: nothing asserts how long anything took
SETTLE = 0.2  # time given to writers to queue behind a blocked leader (not asserted)
MIB = 1 << 20


class Batches:
    """Which writers each batch held, in commit order: the writers' functions name themselves
    as they run (a batch runs again after a failed map growth, so names repeat), and the
    observer closes the batch."""

    def __init__(self, env: LedgerEnv) -> None:
        self.lock = threading.Lock()
        self.running: list[str] = []
        self.closed: list[tuple[list[str], BatchReport]] = []
        env.commit_observer = self

    def ran(self, name: str) -> None:
        with self.lock:
            if name not in self.running:
                self.running.append(name)

    def __call__(self, report: BatchReport) -> None:
        with self.lock:
            self.closed.append((self.running, report))
            self.running = []

    def holding(self, name: str) -> list[str]:
        (members,) = [members for members, _ in self.closed if name in members]
        return members


@pytest.fixture
def env(tmp_path: Path) -> Iterator[LedgerEnv]:
    # A map that cannot grow: a write larger than it fails its whole batch (LedgerFullError).
    shared = open_env(tmp_path / "ledger", EnvConfig(map_size=2 * MIB, max_map_size=2 * MIB))
    try:
        yield shared
    finally:
        shared.commit_observer = None
        release_env(shared)


def put(batches: Batches, name: str, value: bytes) -> Callable[[lmdb.Transaction], str]:
    def fn(txn: lmdb.Transaction) -> str:
        batches.ran(name)
        txn.put(name.encode(), value)
        return name

    return fn


def stored(env: LedgerEnv, name: str) -> bool:
    with env.read() as txn:
        return txn.get(name.encode()) is not None


def behind_a_held_leader(env: LedgerEnv, batches: Batches, writers: list[threading.Thread]) -> None:
    """Run `writers` while another writer leads a batch and stays inside it, so that they
    queue behind it (given `SETTLE` to do so), then let it go and wait for them all."""
    go = threading.Event()
    entered = threading.Event()

    def fn(txn: lmdb.Transaction) -> None:
        batches.ran("leader")
        entered.set()
        assert go.wait(TIMEOUT)
        txn.put(b"leader", b"x")

    leader = threading.Thread(target=env.write, args=(fn,))
    leader.start()
    assert entered.wait(TIMEOUT)
    for t in writers:
        t.start()
    time.sleep(SETTLE)
    go.set()
    for t in [leader, *writers]:
        t.join(TIMEOUT)
        assert not t.is_alive()
    assert stored(env, "leader")


def test_a_failed_batch_fails_every_writer_in_it_and_writes_none_of_them(env: LedgerEnv) -> None:
    batches = Batches(env)
    outcomes: dict[str, LedgerFullError | str] = {}

    def writer(name: str, value: bytes) -> None:
        try:
            outcomes[name] = env.write(put(batches, name, value))
        except LedgerFullError as e:
            outcomes[name] = e

    names = [f"small-{i}" for i in range(5)]
    threads = [threading.Thread(target=writer, args=(n, b"v" * 100)) for n in names]
    threads.insert(2, threading.Thread(target=writer, args=("too-big", b"x" * (3 * MIB))))
    behind_a_held_leader(env, batches, threads)

    # The batch that held the write too big for the map failed as a whole: the writers queued
    # with it (those before it ran, those after it never got to) all get the error, and the
    # report of that batch counts exactly them. Every other batch committed.
    failed = {name for name, outcome in outcomes.items() if not isinstance(outcome, str)}
    assert all(isinstance(outcomes[name], LedgerFullError) for name in failed)
    (report,) = [report for members, report in batches.closed if "too-big" in members]
    assert report.size == len(failed) > 1
    assert set(batches.holding("too-big")) <= failed
    for name in ["too-big", *names]:
        assert stored(env, name) == (name not in failed)
        if name not in failed:
            assert outcomes[name] == name
    committed = [(m, r) for m, r in batches.closed if "too-big" not in m]
    assert all(report.size == len(members) for members, report in committed)


def test_a_lone_writer_never_waits_for_company(env: LedgerEnv) -> None:
    batches = Batches(env)
    for i in range(50):
        assert env.write(put(batches, f"k{i}", b"v")) == f"k{i}"
    reports = [report for _, report in batches.closed]
    assert len(reports) == 50
    assert all(r.size == 1 and r.expected == 0 and r.gathered and not r.waited for r in reports)


def test_a_writer_whose_company_left_waits_once_and_the_wait_ends_at_the_bound(
    env: LedgerEnv,
) -> None:
    batches = Batches(env)
    company = [
        threading.Thread(target=env.write, args=(put(batches, name, b"v"),)) for name in ("b", "c")
    ]
    behind_a_held_leader(env, batches, company)

    # From now on one thread writes alone: the writers of the last batch never come back.
    lone_from = len(batches.closed)
    for i in range(20):
        assert env.write(put(batches, f"alone-{i}", b"v")) == f"alone-{i}"
    lone = [report for _, report in batches.closed[lone_from:]]
    assert all(r.size == 1 for r in lone)
    waits = [r for r in lone if r.expected]
    assert len(waits) <= 1
    # Nobody it waited for came: the wait ended at the bound (not with a batch of company).
    assert all(not r.gathered for r in waits)
    assert not any(r.expected for r in lone[1:])


def test_one_writers_error_rolls_back_that_writer_alone(env: LedgerEnv) -> None:
    """One writer's error rolls back that writer alone; the rest of its batch commits."""
    batches = Batches(env)
    outcomes: dict[str, BaseException | str] = {}

    def failing(txn: lmdb.Transaction) -> str:
        batches.ran("fails")
        txn.put(b"fails", b"v")
        raise ValueError("this write is refused")

    def writer(name: str, fn: Callable[[lmdb.Transaction], str]) -> None:
        try:
            outcomes[name] = env.write(fn)
        except ValueError as e:
            outcomes[name] = e

    threads = [
        threading.Thread(target=writer, args=("a", put(batches, "a", b"v"))),
        threading.Thread(target=writer, args=("fails", failing)),
        threading.Thread(target=writer, args=("b", put(batches, "b", b"v"))),
    ]
    behind_a_held_leader(env, batches, threads)
    assert isinstance(outcomes["fails"], ValueError)
    assert not stored(env, "fails")
    assert outcomes["a"] == "a" and stored(env, "a")
    assert outcomes["b"] == "b" and stored(env, "b")
