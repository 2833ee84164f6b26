"""The ledger's data file written ahead of LMDB's pages (`LedgerEnv._reserve`), and the group
commit's report of its LMDB commit (`BatchReport.syncing`).

What must hold whatever the timing: a process that commits more than a few times keeps
data.mdb longer than its used pages while it is open and cuts it back when it closes; a
process killed while the file is written ahead leaves a ledger that opens, holds every
acknowledged write and passes LMDB's offline page check; an OS error while writing ahead (a
full disk) stops the writing ahead and never fails an append; a short-lived process never
writes ahead. Nothing here measures time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest
from lmdb import verify

from imageledger.storage.lmdbenv import (
    RESERVE_AFTER,
    BatchReport,
    EnvConfig,
    LedgerEnv,
    open_env,
    release_env,
)

TIMEOUT = 60.0  # for waiting only
WRITES = RESERVE_AFTER + 200


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


def file_size(path: Path) -> int:
    return (path / "data.mdb").stat().st_size


def used_size(env: LedgerEnv) -> int:
    return (int(env.env.info()["last_pgno"]) + 1) * int(env.env.stat()["psize"])


def stored_keys(path: Path) -> list[bytes]:
    shared = open_env(path, EnvConfig(readonly=True))
    try:
        with shared.read() as txn:
            return [bytes(key) for key, _ in txn.cursor()]
    finally:
        release_env(shared)


def page_check(path: Path) -> list[Any]:
    problems: list[Any] = verify.verify(str(path))  # type: ignore[no-untyped-call]
    return problems


def test_written_ahead_while_open_and_cut_back_at_close(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    shared = open_env(path, EnvConfig())
    try:
        for i in range(WRITES):
            assert shared.write(put(i)) == i
        assert file_size(path) > used_size(shared)  # zeros after the last used page
    finally:
        release_env(shared)
    reopened = open_env(path, EnvConfig())
    try:
        assert file_size(path) == used_size(reopened)  # cut back when the last user closed
    finally:
        release_env(reopened)
    keys = stored_keys(path)
    assert [k for k in keys if k.startswith(b"k")] == [b"k%08d" % i for i in range(WRITES)]
    assert page_check(path) == []


def test_a_few_commits_never_write_ahead(tmp_path: Path) -> None:
    shared = open_env(tmp_path / "ledger", EnvConfig())
    try:
        for i in range(RESERVE_AFTER - 1):  # the format record took one commit at open
            shared.write(put(i))
        assert file_size(shared.path) == used_size(shared)
    finally:
        release_env(shared)


def test_nosync_never_writes_ahead(tmp_path: Path) -> None:
    shared = open_env(tmp_path / "ledger", EnvConfig(durability="nosync"))
    try:
        for i in range(WRITES):
            shared.write(put(i))
        assert file_size(shared.path) == used_size(shared)
    finally:
        release_env(shared)


def test_an_os_error_stops_writing_ahead_and_appends_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, data: Any, offset: int) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)  # LMDB's own writes are not Python's
    shared = open_env(tmp_path / "ledger", EnvConfig())
    try:
        for i in range(WRITES):
            assert shared.write(put(i)) == i
        assert file_size(shared.path) == used_size(shared)
    finally:
        release_env(shared)
    assert len([k for k in stored_keys(tmp_path / "ledger") if k.startswith(b"k")]) == WRITES


_KILLED_CHILD = r"""
import os, signal, sys, threading
from pathlib import Path
from imageledger.storage.lmdbenv import EnvConfig, open_env
env = open_env(Path(sys.argv[1]), EnvConfig())
count = int(sys.argv[2])
said = threading.Lock()
def writer(first):
    for i in range(first, count, 4):
        def fn(txn, i=i):
            txn.put(b"k%08d" % i, b"v" * 300 + b"%d" % i)
        env.write(fn)
        with said:  # acknowledged: durable before this line
            sys.stdout.write(f"{i}\n")
            sys.stdout.flush()
threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
info = env.env.info()
print("sizes", os.stat(Path(sys.argv[1]) / "data.mdb").st_size,
      (info["last_pgno"] + 1) * env.env.stat()["psize"], flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_process_killed_while_written_ahead_leaves_a_whole_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_CHILD, str(path), str(WRITES)],
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
        text=True,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    lines = done.stdout.split("\n")
    acknowledged = sorted(int(line) for line in lines if line.strip().isdigit())
    assert acknowledged == list(range(WRITES))
    (sizes,) = [line for line in lines if line.startswith("sizes")]
    size, used = (int(x) for x in sizes.split()[1:])
    assert size > used  # killed with zeros after its last page: never cut back
    assert file_size(path) == size
    assert page_check(path) == []
    keys = stored_keys(path)
    assert [k for k in keys if k.startswith(b"k")] == [b"k%08d" % i for i in range(WRITES)]
    shared = open_env(path, EnvConfig())  # and it takes more writes
    try:
        assert shared.write(put(WRITES)) == WRITES
    finally:
        release_env(shared)
    assert page_check(path) == []


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
