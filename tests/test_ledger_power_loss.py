"""Machine crashes (power loss), not just process crashes: the ledger lives on `losefs`, a FUSE
file system that keeps written data in memory until it is fsynced and drops it all when the
power is cut. A writer appending from two threads is SIGKILLed and the power cut at the same
instant; what is left on the backing directory is exactly what the disk would hold.

`sync` (the default) must lose no append it acknowledged: it acknowledges a commit only after
LMDB's durable commit (data and meta page flushed) has returned. `nometasync` acknowledges
after the data flush alone, and does lose the last commit here (every run while this was
written), as documented; `nosync` loses everything it was
never asked to flush. Those two are the controls: the harness really drops what was not
synced, and the `sync` test would see a lost acknowledgement.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests._ledger_child import opened
else:
    from _ledger_child import opened

LOSEFS = Path(__file__).resolve().parent / "losefs.py"
PERSISTENCE_MODULE = "imageledger.storage.ledger"


@dataclass
class Disk:
    """A losefs mount: the ledger goes under `mount`; `backing` is what survives a cut."""

    backing: Path
    mount: Path
    proc: subprocess.Popen[bytes]

    def cut_power(self) -> None:
        os.kill(self.proc.pid, signal.SIGUSR1)

    def unmount(self) -> None:
        subprocess.run(["umount", str(self.mount)], check=False, capture_output=True)
        self.proc.wait(30)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    pytest.importorskip("fuse", reason="the fusepy binding is not installed")
    backing, mount = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mount.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(LOSEFS), str(backing), str(mount)],
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 10
    while not os.path.ismount(mount):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.skip(f"cannot mount a FUSE file system here: {err.strip()[-300:]}")
        time.sleep(0.05)
    found = Disk(backing, mount, proc)
    try:
        yield found
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def crash(
    disk: Disk, spawn: Callable[..., Any], tmp_path: Path, durability: str, acks: int
) -> tuple[Path, list[dict[str, Any]]]:
    """Run an appender on the mount until it has reported `acks` appends, then kill it and
    cut the power at once; the ledger as the disk kept it, and what the writer was told."""
    ledger = disk.mount / "ledger"
    ledger.mkdir()
    # LMDB's lock file is shared memory (robust mutexes in a writable mapping), not data:
    # it lives off the crashing disk, as /dev/shm would hold it.
    locks = tmp_path / "locks"
    locks.mkdir(exist_ok=True)
    (ledger / "lock.mdb").symlink_to(locks / f"{durability}.lock.mdb")
    child = spawn(ledger, "appender", durability, "2", LMDB_DURABILITY=durability)
    child.expect("ready")
    reported: list[dict[str, Any]] = []
    while sum(len(m["ids"]) for m in reported) < acks:
        reported.append(child.expect("committed"))
    reported += child.kill()  # the writer is gone: nothing more is acknowledged ...
    disk.cut_power()  # ... and what it wrote but no flush made durable is gone too
    disk.unmount()
    kept = disk.backing / "ledger"
    (kept / "lock.mdb").unlink()
    return kept, reported


def test_sync_loses_no_acknowledged_append_at_a_power_cut(
    disk: Disk, spawn: Callable[..., Any], lc: ModuleType, tmp_path: Path
) -> None:
    kept, reported = crash(disk, spawn, tmp_path, "sync", acks=150)
    with opened(kept) as recorder:
        problems, log = lc.check_after_kill(recorder, "sync", reported, {})
        assert problems == []
        assert max(log) >= max(nid for m in reported for nid in m["ids"])
        assert list(log) == list(range(1, len(log) + 1))


def test_nosync_does_lose_acknowledged_appends_the_harness_is_real(
    disk: Disk, spawn: Callable[..., Any], lc: ModuleType, tmp_path: Path
) -> None:
    kept, reported = crash(disk, spawn, tmp_path, "nosync", acks=150)
    # Nothing was ever flushed: the ledger's file is there (directory operations are durable
    # at once) but holds none of what the writer was told was committed.
    assert (kept / "data.mdb").stat().st_size == 0
    with opened(kept) as recorder:
        problems, log = lc.check_after_kill(recorder, "nosync", reported, {})
    assert log == {}
    assert len([p for p in problems if "lost" in p]) == sum(len(m["ids"]) for m in reported)


def test_nometasync_can_undo_the_last_commits_and_nothing_else(
    disk: Disk, spawn: Callable[..., Any], lc: ModuleType, tmp_path: Path
) -> None:
    """What the README says of `nometasync`: a machine crash can undo the last commit (the
    meta page naming it was never flushed); what is kept is a consistent prefix of the log."""
    kept, reported = crash(disk, spawn, tmp_path, "nometasync", acks=150)
    with opened(kept) as recorder:
        problems, log = lc.check_after_kill(recorder, "nometasync", reported, {})
    acked = sorted(nid for m in reported for nid in m["ids"])
    lost = [nid for nid in acked if nid not in log]
    assert all(problem.startswith("reported id") for problem in problems), problems
    assert lost == acked[len(acked) - len(lost) :]  # only the newest
    assert len(lost) <= 8  # a commit or two of the writers' batches, not more
    assert list(log) == list(range(1, len(log) + 1))
