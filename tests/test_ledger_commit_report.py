"""The group commit's report of its LMDB commit (`BatchReport.syncing`): of the leader's time
committing a batch, the part spent in LMDB's commit itself (page writes and flushes, the GIL
released), which `bench_ledger --batch-stats` shows apart from the writes' functions. Nothing
here measures time: only that the parts add up."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from imageledger.storage.lmdbenv import BatchReport, EnvConfig, LedgerEnv, open_env, release_env

TIMEOUT = 60.0  # for waiting only


@pytest.fixture
def env(tmp_path: Path) -> Iterator[LedgerEnv]:
    shared = open_env(tmp_path / "ledger", EnvConfig())
    try:
        yield shared
    finally:
        release_env(shared)


def put(i: int) -> Any:
    def fn(txn: lmdb.Transaction) -> int:
        txn.put(b"k%08d" % i, b"v" * 300 + b"%d" % i)
        return i

    return fn


def test_the_report_tells_the_lmdb_commit_apart(env: LedgerEnv) -> None:
    reports: list[BatchReport] = []
    lock = threading.Lock()

    def observe(report: BatchReport) -> None:
        with lock:
            reports.append(report)

    env.commit_observer = observe
    try:
        threads = [
            threading.Thread(target=lambda n=n: [env.write(put(n * 100 + i)) for i in range(50)])
            for n in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
    finally:
        env.commit_observer = None
    assert sum(r.size for r in reports) == 200
    assert all(0 < r.syncing <= r.seconds for r in reports)
