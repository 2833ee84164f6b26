"""Durable appends per second through an eventsourcing `Application`: the LMDB ledger vs SQLite.

Run as ``python -m imageledger.tools.bench_ledger`` (or ``imageledger bench ledger``). One run
measures, on files in one directory (``--dir``; default a fresh temporary directory that is not
memory-backed):

- ``imageledger.storage.ledger`` (LMDB, ``LMDB_DURABILITY=sync``: every commit fsynced; writer
  threads of one process share a commit, see `imageledger.storage.lmdbenv`);
- ``eventsourcing.sqlite`` on a file (WAL). Its ``PRAGMA synchronous`` is read back from the
  module's own connection; if it is not FULL (or EXTRA) a commit is not durable, so a row with
  ``synchronous=FULL`` forced on every connection is added and used for the ratio;
- raw py-lmdb puts, one per durable write transaction (``sync=True, metasync=True``), one thread:
  the ceiling of one LMDB commit after another on this disk;

the first two each with 1 and 8 writer threads (``--threads``). An append is one ``app.save()``
of a new aggregate with one ``Created`` event (``--workload create``) or, with ``--workload
mix``, alternately that and one subsequent event on the aggregate just created. Every configuration
runs ``--rounds`` times for ``--seconds`` each, rounds interleaved across configurations so that
background noise spreads over all of them; the median is reported. For the LMDB rows the number
of write transactions (LMDB's ``last_txnid``) is read before and after, which gives the appends
carried per durable commit (the group-commit batch size). Every row also gives the process's
CPU time and context switches per append (all threads: at 8 writers the serial part of a cycle
is CPU under the GIL and thread wake-ups), and ``--batch-stats`` the leader's time per commit
split into gathering, the writes' functions and LMDB's commit itself (page writes and flushes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Final, cast
from uuid import UUID

import lmdb
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.sqlite import (
    SQLiteApplicationRecorder,
    SQLiteConnection,
    SQLiteConnectionPool,
    SQLiteFactory,
)
from eventsourcing.utils import Environment, EnvType

from imageledger.storage.ledger import LMDBFactory
from imageledger.storage.lmdbenv import BatchReport, LedgerEnv
from imageledger.tools.logs import configure_logging

GOAL_RATIO: Final = 2.5  # issue 10: durable appends at 8 threads >= 2.5x SQLite
MEMORY_FILESYSTEMS: Final = frozenset({"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"})
_SYNCHRONOUS_NAMES: Final = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
_FULL: Final = 2
_RAW_VALUE: Final = b"\xa5" * 256  # about the size of one stored event
_RAW_MAP_SIZE: Final = 1 << 30


# --------------------------------------------------------------------------- the workload


class _Image(Aggregate):
    """A stand-in for the cache's aggregates: created once, then used."""

    def __init__(self, reference: str, size: int) -> None:
        self.reference = reference
        self.size = size
        self.uses = 0

    @event("Used")
    def use(self, by: str) -> None:
        self.uses += 1


class _BenchApp(Application[UUID]):
    name = "LedgerBench"


class _AppWriter:
    """One writer thread's appends: each call is one `app.save()` of one event."""

    def __init__(self, app: _BenchApp, thread: int, workload: str) -> None:
        self.app = app
        self.thread = thread
        self.mix = workload == "mix"
        self.made = 0
        self.last: _Image | None = None

    def __call__(self) -> None:
        if self.last is not None:
            image, self.last = self.last, None
            image.use(by=f"bench-{self.thread}")
            self.app.save(image)
            return
        self.made += 1
        image = _Image(f"registry.example/bench/t{self.thread}:{self.made}", 1000 + self.made)
        self.app.save(image)
        if self.mix:
            self.last = image


class _RawWriter:
    """One py-lmdb put per durable write transaction."""

    def __init__(self, env: lmdb.Environment, thread: int) -> None:
        self.env = env
        self.prefix = thread.to_bytes(2, "big")
        self.made = 0

    def __call__(self) -> None:
        self.made += 1
        with self.env.begin(write=True) as txn:
            txn.put(self.prefix + self.made.to_bytes(8, "big"), _RAW_VALUE)


# --------------------------------------------------------------------------- SQLite, forced FULL


class _FullSyncSQLiteConnectionPool(SQLiteConnectionPool):
    """eventsourcing's SQLite pool, with ``PRAGMA synchronous=FULL`` on every connection."""

    def _create_connection(self) -> SQLiteConnection:
        conn = super()._create_connection()
        with conn.cursor() as cursor:
            cursor.execute("PRAGMA synchronous=FULL")
        return conn


class FullSyncSQLiteFactory(SQLiteFactory):
    """`eventsourcing.sqlite`'s factory on `_FullSyncSQLiteConnectionPool` (same tables, same
    recorders); selected with ``PERSISTENCE_MODULE=imageledger.tools.bench_ledger:
    FullSyncSQLiteFactory``."""

    def __init__(self, env: Environment | EnvType | None) -> None:
        super().__init__(env)
        default_pool = self.datastore.pool
        self.datastore.pool = _FullSyncSQLiteConnectionPool(
            db_name=default_pool.db_name, lock_timeout=default_pool.lock_timeout
        )
        default_pool.close()


def _sqlite_pragmas(app: _BenchApp) -> tuple[str, int]:
    """The journal mode and synchronous level of a connection of `app`'s SQLite pool."""
    recorder = cast(SQLiteApplicationRecorder, app.recorder)
    with recorder.datastore.transaction(commit=False) as cursor:
        cursor.execute("PRAGMA journal_mode")
        journal_mode = str(cursor.fetchone()[0])
        cursor.execute("PRAGMA synchronous")
        synchronous = int(cursor.fetchone()[0])
    return journal_mode, synchronous


# --------------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class Backend:
    key: str
    label: str
    kind: str  # "app" or "raw"
    env: Callable[[Path], dict[str, str]]


def _lmdb_env(durability: str) -> Callable[[Path], dict[str, str]]:
    def make(workdir: Path) -> dict[str, str]:
        return {
            "PERSISTENCE_MODULE": "imageledger.storage.ledger",
            "LMDB_PATH": str(workdir / "ledger"),
            "LMDB_DURABILITY": durability,
        }

    return make


def _sqlite_env(module: str) -> Callable[[Path], dict[str, str]]:
    def make(workdir: Path) -> dict[str, str]:
        return {"PERSISTENCE_MODULE": module, "SQLITE_DBNAME": str(workdir / "events.sqlite")}

    return make


LMDB: Final = Backend("lmdb", "lmdb ledger (sync)", "app", _lmdb_env("sync"))
LMDB_NOSYNC: Final = Backend(
    "lmdb_nosync", "lmdb ledger (nosync; not durable)", "app", _lmdb_env("nosync")
)
SQLITE: Final = Backend(
    "sqlite", "eventsourcing.sqlite (WAL)", "app", _sqlite_env("eventsourcing.sqlite")
)
SQLITE_FULL: Final = Backend(
    "sqlite_full",
    "eventsourcing.sqlite (WAL, synchronous=FULL forced)",
    "app",
    _sqlite_env(f"{__name__}:{FullSyncSQLiteFactory.__qualname__}"),
)
RAW: Final = Backend("raw_lmdb", "raw py-lmdb put (sync, metasync)", "raw", lambda _: {})


@dataclass
class Measurement:
    appends: int
    seconds: float
    commits: int | None = None
    batches: list[int] | None = None
    leader_seconds: float | None = None
    gathers: int = 0  # commits whose leader waited for the writers it expected back
    gathers_short: int = 0  # of those, waits that ended at the bound, not all back
    gather_seconds: float = 0.0
    syncing_seconds: float = 0.0  # of leader_seconds, inside LMDB's commit (writes, flushes)
    cpu_seconds: float = 0.0  # the process's CPU time (user + system) over the timed part
    context_switches: int = 0  # the process's voluntary + involuntary ones over it

    @property
    def rate(self) -> float:
        return self.appends / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Row:
    backend: Backend
    threads: int
    rounds: list[Measurement] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(m.rate for m in self.rounds)

    def per_commit(self) -> float | None:
        appends = sum(m.appends for m in self.rounds)
        commits = [m.commits for m in self.rounds]
        if any(c is None for c in commits):
            return None
        total = sum(c for c in commits if c is not None)
        return appends / total if total else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "backend": self.backend.key,
            "label": self.backend.label,
            "threads": self.threads,
            "appends_per_second_median": round(self.median, 1),
            "appends_per_second_rounds": [round(m.rate, 1) for m in self.rounds],
            "appends": [m.appends for m in self.rounds],
            "seconds": [round(m.seconds, 4) for m in self.rounds],
            "cpu_us_per_append": _per_append(self.rounds, 1e6, "cpu_seconds"),
            "context_switches_per_append": _per_append(self.rounds, 1.0, "context_switches"),
        }
        per_commit = self.per_commit()
        if per_commit is not None:
            out["commits"] = [m.commits for m in self.rounds]
            out["appends_per_commit"] = round(per_commit, 3)
        batches = [b for m in self.rounds for b in (m.batches or [])]
        if batches:
            out["batch_size"] = _batch_summary(batches)
            busy = [m.leader_seconds / m.seconds for m in self.rounds if m.leader_seconds]
            out["leader_busy_fraction"] = [round(b, 3) for b in busy]
            out["gathering"] = _gather_summary(self.rounds, len(batches))
            out["leader_us_per_commit"] = _leader_split(self.rounds, len(batches))
        return out


def _per_append(rounds: list[Measurement], scale: float, attribute: str) -> float:
    """A process-wide cost (CPU time, context switches) over all rounds, per append: at 8
    threads the serial part of a group commit cycle is CPU under the GIL and thread wake-ups,
    which these two show."""
    appends = sum(m.appends for m in rounds)
    total = sum(float(getattr(m, attribute)) for m in rounds)
    return round(total / appends * scale, 2) if appends else 0.0


def _leader_split(rounds: list[Measurement], commits: int) -> dict[str, float]:
    """The leader's mean time per commit, split into the writes' functions (GIL held) and
    LMDB's commit itself (page writes and the two flushes, no GIL held), and its mean wait
    for writers before it."""
    busy = sum(m.leader_seconds or 0.0 for m in rounds)
    syncing = sum(m.syncing_seconds for m in rounds)
    waited = sum(m.gather_seconds for m in rounds)
    if not commits:
        return {"committing": 0.0, "lmdb_commit": 0.0, "functions": 0.0, "gathering": 0.0}
    return {
        "committing": round(busy / commits * 1e6, 1),
        "lmdb_commit": round(syncing / commits * 1e6, 1),
        "functions": round((busy - syncing) / commits * 1e6, 1),
        "gathering": round(waited / commits * 1e6, 1),
    }


def _gather_summary(rounds: list[Measurement], commits: int) -> dict[str, Any]:
    """How often the group commit's leader waited for writers before committing, how often
    that wait ended at its bound, and the mean wait."""
    gathers = sum(m.gathers for m in rounds)
    return {
        "commits_gathered": gathers,
        "fraction_gathered": round(gathers / commits, 3) if commits else 0.0,
        "ended_at_bound": sum(m.gathers_short for m in rounds),
        "mean_wait_us": round(sum(m.gather_seconds for m in rounds) / gathers * 1e6, 1)
        if gathers
        else 0.0,
    }


def _batch_summary(batches: list[int]) -> dict[str, Any]:
    ordered = sorted(batches)
    histogram: dict[str, int] = {}
    for size in ordered:
        histogram[str(size)] = histogram.get(str(size), 0) + 1
    return {
        "commits": len(ordered),
        "mean": round(statistics.fmean(ordered), 3),
        "median": statistics.median(ordered),
        "p90": ordered[int(0.9 * (len(ordered) - 1))],
        "max": ordered[-1],
        "histogram": histogram,
    }


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Timed:
    """What `_timed` measured: calls completed, wall seconds, and the process's CPU seconds and
    context switches over the same span."""

    calls: int
    seconds: float
    cpu_seconds: float
    context_switches: int


def _usage() -> tuple[float, int]:
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime, used.ru_nvcsw + used.ru_nivcsw


def _timed(
    writers: Sequence[Callable[[], None]],
    seconds: float,
    warmup: int,
    on_start: Callable[[], None] = lambda: None,
    on_stop: Callable[[], None] = lambda: None,
) -> Timed:
    """Run every writer in its own thread for `seconds` after `warmup` untimed calls each; the
    number of calls completed and the wall time from the start until the last one returned
    (with the process's CPU time and context switches over that span)."""
    n = len(writers)
    counts = [0] * n
    errors: list[BaseException] = []
    ready = threading.Barrier(n + 1)
    go = threading.Event()
    stop = threading.Event()

    def run(i: int) -> None:
        write = writers[i]
        try:
            for _ in range(warmup):
                write()
            ready.wait()
            go.wait()
            done = 0
            while not stop.is_set():
                write()
                done += 1
            counts[i] = done
        except threading.BrokenBarrierError:
            return
        except BaseException as e:
            errors.append(e)
            ready.abort()
            stop.set()
            go.set()

    threads = [threading.Thread(target=run, args=(i,), name=f"bench-writer-{i}") for i in range(n)]
    for t in threads:
        t.start()
    try:
        with contextlib.suppress(threading.BrokenBarrierError):
            ready.wait()
        on_start()
        cpu_before, switches_before = _usage()
        began = time.perf_counter()
        go.set()
        stop.wait(seconds)
    finally:  # also on KeyboardInterrupt: no writer may outlive its store
        stop.set()
        ready.abort()
        go.set()
        for t in threads:
            t.join()
    elapsed = time.perf_counter() - began
    cpu_after, switches_after = _usage()
    on_stop()
    if errors:
        raise errors[0]
    return Timed(sum(counts), elapsed, cpu_after - cpu_before, switches_after - switches_before)


class _BatchRecorder:
    """The sizes of one `LedgerEnv`'s group commits and the time its leader spends in them,
    through the environment's `commit_observer` (the figures are not visible from outside);
    only what commits while `recording` counts, so warm-up appends stay out."""

    def __init__(self, ledger: LedgerEnv) -> None:
        self.ledger = ledger
        self.recording = False
        self.sizes: list[int] = []
        self.busy = 0.0
        self.syncing = 0.0
        self.gathers = 0  # commits whose leader waited for writers it expected back
        self.short = 0  # of those, the ones whose wait ended at the bound
        self.waited = 0.0
        ledger.commit_observer = self

    def __call__(self, report: BatchReport) -> None:
        if self.recording:
            self.sizes.append(report.size)
            self.busy += report.seconds
            self.syncing += report.syncing
            if report.expected:
                self.gathers += 1
                self.short += not report.gathered
                self.waited += report.waited

    def detach(self) -> None:
        self.ledger.commit_observer = None


def _measure_app(
    backend: Backend, threads: int, workdir: Path, args: argparse.Namespace
) -> Measurement:
    app = _BenchApp(env=backend.env(workdir))
    try:
        ledger = app.factory.ledger if isinstance(app.factory, LMDBFactory) else None
        batches = _BatchRecorder(ledger) if ledger is not None and args.batch_stats else None
        txnids: list[int] = []

        def on_start() -> None:
            if ledger is not None:
                txnids.append(ledger.last_txnid())
            if batches is not None:
                batches.recording = True

        def on_stop() -> None:
            if batches is not None:
                batches.recording = False
            if ledger is not None:
                txnids.append(ledger.last_txnid())

        writers = [_AppWriter(app, i, args.workload) for i in range(threads)]
        try:
            timed = _timed(writers, args.seconds, args.warmup, on_start, on_stop)
        finally:
            if batches is not None:
                batches.detach()
        return Measurement(
            timed.calls,
            timed.seconds,
            commits=txnids[1] - txnids[0] if len(txnids) == 2 else None,
            batches=batches.sizes if batches is not None else None,
            leader_seconds=batches.busy if batches is not None else None,
            gathers=batches.gathers if batches is not None else 0,
            gathers_short=batches.short if batches is not None else 0,
            gather_seconds=batches.waited if batches is not None else 0.0,
            syncing_seconds=batches.syncing if batches is not None else 0.0,
            cpu_seconds=timed.cpu_seconds,
            context_switches=timed.context_switches,
        )
    finally:
        app.close()


def _measure_raw(threads: int, workdir: Path, args: argparse.Namespace) -> Measurement:
    env = lmdb.open(
        str(workdir / "raw"), map_size=_RAW_MAP_SIZE, subdir=True, sync=True, metasync=True
    )
    try:
        txnids: list[int] = []

        def txnid() -> None:
            txnids.append(int(env.info()["last_txnid"]))

        writers = [_RawWriter(env, i) for i in range(threads)]
        timed = _timed(writers, args.seconds, args.warmup, txnid, txnid)
        return Measurement(
            timed.calls,
            timed.seconds,
            commits=txnids[1] - txnids[0],
            cpu_seconds=timed.cpu_seconds,
            context_switches=timed.context_switches,
        )
    finally:
        env.close()


def _measure(row: Row, base: Path, round_no: int, args: argparse.Namespace) -> Measurement:
    workdir = Path(
        tempfile.mkdtemp(prefix=f"{row.backend.key}-{row.threads}t-r{round_no}-", dir=base)
    )
    try:
        if row.backend.kind == "raw":
            return _measure_raw(row.threads, workdir, args)
        return _measure_app(row.backend, row.threads, workdir, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _probe_sqlite(base: Path, backend: Backend) -> tuple[str, int]:
    """What `backend`'s connections run at, after one append."""
    workdir = Path(tempfile.mkdtemp(prefix=f"probe-{backend.key}-", dir=base))
    try:
        app = _BenchApp(env=backend.env(workdir))
        try:
            app.save(_Image("registry.example/probe:1", 1))
            return _sqlite_pragmas(app)
        finally:
            app.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- machine facts
# Public: bench_pull reports the same facts and picks its directory the same way.


def filesystem_of(path: Path) -> dict[str, str]:
    """The mount that holds `path`, from /proc/mounts (Linux): a figure measured on tmpfs or a
    network mount says nothing about durable writes on a disk, so the report names it."""
    found = {"type": "unknown", "device": "unknown", "mount_point": "unknown", "options": ""}
    best = -1
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            lines = mounts.read().splitlines()
    except OSError:
        return found
    for line in lines:
        parts = line.split()
        if len(parts) < 4:
            continue
        device, mount_point, fstype, options = parts[:4]
        mount_point = mount_point.replace("\\040", " ")
        mount = Path(mount_point)
        if (mount == path or mount in path.parents) and len(mount_point) >= best:
            best = len(mount_point)
            found = {
                "type": fstype,
                "device": device,
                "mount_point": mount_point,
                "options": options,
            }
    return found


def cpu_counts() -> dict[str, int | None]:
    """The CPUs there are and the CPUs this process may use: with fewer usable CPUs than
    writer threads, the threads compete for the CPU rather than for the disk."""
    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    return {"cpu_count": os.cpu_count(), "usable": usable}


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, taken at the start and end of a run: others' work
    on the same machine is the main source of noise in these figures."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def dist_version(dist: str) -> str:
    """The installed version of distribution `dist`, or "unknown": a report stays printable
    when a package was installed without metadata."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def scratch_dir(requested: Path | None, prefix: str) -> Path:
    """A fresh directory for one run's stores, under `requested` if given. By default the system
    temporary directory, unless it is a memory filesystem, where fsync costs nothing and a
    durable write would measure nothing: then the current directory."""
    if requested is not None:
        requested.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=requested)).resolve()
    parent = Path(tempfile.gettempdir()).resolve()
    if filesystem_of(parent)["type"] in MEMORY_FILESYSTEMS:
        parent = Path.cwd().resolve()
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent)).resolve()


def _fdatasync_probe(target: Path, seconds: float = 0.5) -> dict[str, float]:
    """What one 4 KiB write + fdatasync costs in `target` (the floor under every durable commit:
    LMDB pays two flushes per commit, SQLite in WAL mode one)."""
    path = target / "fdatasync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    samples: list[float] = []
    try:
        page = b"\0" * 4096
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(samples) < 10:
            began = time.perf_counter()
            os.pwrite(fd, page, 4096 * (len(samples) % 256))
            os.fdatasync(fd)
            samples.append(time.perf_counter() - began)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    samples.sort()
    return {
        "median_us": round(statistics.median(samples) * 1e6, 1),
        "p90_us": round(samples[int(0.9 * (len(samples) - 1))] * 1e6, 1),
        "samples": len(samples),
    }


def _facts(target: Path, sqlite_pragmas: tuple[str, int]) -> dict[str, Any]:
    journal_mode, synchronous = sqlite_pragmas
    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "eventsourcing": dist_version("eventsourcing"),
        "py_lmdb": getattr(lmdb, "__version__", "unknown"),
        "lmdb": ".".join(str(v) for v in lmdb.version()),
        "sqlite": sqlite3.sqlite_version,
        "sqlite_default_journal_mode": journal_mode,
        "sqlite_default_synchronous": _SYNCHRONOUS_NAMES.get(synchronous, str(synchronous)),
        "cpus": cpu_counts(),
        "load_average_at_start": load_average(),
        "target_dir": str(target),
        "filesystem": filesystem_of(target),
        "fdatasync_4k": _fdatasync_probe(target),
    }


# --------------------------------------------------------------------------- output


def _print_text(
    facts: dict[str, Any], rows: list[Row], summary: dict[str, Any], args: argparse.Namespace
) -> None:
    fs = facts["filesystem"]
    cpus = facts["cpus"]
    print(
        "imageledger ledger benchmark: durable appends/s through eventsourcing Application.save()"
    )
    print(f"python         {facts['python']} on {facts['platform']}")
    print(f"eventsourcing  {facts['eventsourcing']}")
    print(f"py-lmdb        {facts['py_lmdb']} (LMDB {facts['lmdb']})")
    print(
        f"sqlite         {facts['sqlite']}; eventsourcing.sqlite runs journal_mode="
        f"{facts['sqlite_default_journal_mode']} synchronous={facts['sqlite_default_synchronous']}"
    )
    print(
        f"cpus           {cpus['usable']} usable of {cpus['cpu_count']}; load average at start "
        f"{facts['load_average_at_start']}, at end {facts['load_average_at_end']}"
    )
    print(
        f"target dir     {facts['target_dir']} on {fs['type']} ({fs['device']} at "
        f"{fs['mount_point']}, {fs['options']})"
    )
    sync = facts["fdatasync_4k"]
    print(
        f"fdatasync      4 KiB pwrite + fdatasync there: median {sync['median_us']:.0f} us, "
        f"p90 {sync['p90_us']:.0f} us ({sync['samples']} samples)"
    )
    print(
        f"workload       {args.workload}; {args.seconds:g} s x {args.rounds} rounds per row "
        f"(interleaved), {args.warmup} untimed warm-up appends per thread; median reported"
    )
    for note in summary["notes"]:
        print(f"note           {note}")
    print()
    header = (
        f"{'backend':52} {'threads':>7} {'appends/s':>10}  {'rounds':26} {'per commit':>10}"
        f" {'cpu us':>7} {'switches':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        rounds = " ".join(f"{m.rate:.0f}" for m in row.rounds)
        per_commit = row.per_commit()
        pc = f"{per_commit:.2f}" if per_commit is not None else "-"
        cpu = _per_append(row.rounds, 1e6, "cpu_seconds")
        switches = _per_append(row.rounds, 1.0, "context_switches")
        print(
            f"{row.backend.label:52} {row.threads:>7} {row.median:>10.0f}  {rounds:26} {pc:>10}"
            f" {cpu:>7.0f} {switches:>8.1f}"
        )
    print("(cpu us, switches: the process's CPU time and context switches per append, all threads)")
    print()
    for row in rows:
        batches = [b for m in row.rounds for b in (m.batches or [])]
        if batches:
            s = _batch_summary(batches)
            busy = [m.leader_seconds / m.seconds for m in row.rounds if m.leader_seconds]
            g = _gather_summary(row.rounds, len(batches))
            split = _leader_split(row.rounds, len(batches))
            print(
                f"group commits  {row.backend.label}, {row.threads} threads: {s['commits']} "
                f"commits, batch mean {s['mean']:.2f} median {s['median']:g} p90 {s['p90']} max "
                f"{s['max']}; leader busy {statistics.fmean(busy):.0%} of the wall time; "
                f"gathered before {g['fraction_gathered']:.0%} of commits (mean wait "
                f"{g['mean_wait_us']:.0f} us, {g['ended_at_bound']} ended at the bound); per "
                f"commit {split['committing']:.0f} us committing = {split['functions']:.0f} us "
                f"functions + {split['lmdb_commit']:.0f} us LMDB commit, after "
                f"{split['gathering']:.0f} us gathering"
            )
    ratio = summary["ratio"]
    if ratio is None:
        print("ratio          not measured")
        return
    met = "MET" if summary["goal_met"] else "NOT MET"
    print(
        f"ratio          LMDB/SQLite at {summary['ratio_threads']} threads: {ratio:.2f}x "
        f"(vs {summary['ratio_against']}); goal >= {GOAL_RATIO:g}x: {met}"
    )


# --------------------------------------------------------------------------- main


def _thread_counts(text: str) -> list[int]:
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        msg = f"expected comma-separated thread counts, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not counts or counts[0] < 1:
        msg = "thread counts must be >= 1"
        raise argparse.ArgumentTypeError(msg)
    return counts


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        msg = f"expected a positive number, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m imageledger.tools.bench_ledger",
        description="Durable appends/s through eventsourcing: the LMDB ledger vs SQLite.",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where to make the (temporary, removed) stores; default a fresh temporary "
        "directory not on a memory filesystem",
    )
    parser.add_argument("--seconds", type=_positive, default=3.0, help="per measurement (3)")
    parser.add_argument("--rounds", type=int, default=3, help="per row; median reported (3)")
    parser.add_argument(
        "--threads", type=_thread_counts, default=[1, 8], help="writer threads (1,8)"
    )
    parser.add_argument("--warmup", type=int, default=20, help="untimed appends per thread (20)")
    parser.add_argument(
        "--workload",
        choices=("create", "mix"),
        default="create",
        help="create: a new aggregate per append; mix: alternately that and one more event",
    )
    parser.add_argument(
        "--batch-stats",
        action="store_true",
        help=(
            "record every LMDB group commit's batch size, the leader's busy time (the writes' "
            "functions and LMDB's commit apart) and how often and how long it gathered writers"
        ),
    )
    parser.add_argument(
        "--force-sqlite-full",
        action="store_true",
        help="add the synchronous=FULL SQLite rows even if the default is already FULL",
    )
    parser.add_argument(
        "--cpu-ceiling",
        action="store_true",
        help="add LMDB nosync rows (not durable): what the Python path costs without fsync",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.rounds < 1 or args.warmup < 0:
            parser.error("--rounds must be >= 1 and --warmup >= 0")
    except SystemExit as e:  # --help (0) or a usage error (2): a return code, not an exit
        return 2 if e.code else 0
    threads: list[int] = args.threads
    base = scratch_dir(args.dir, "imageledger-bench-")

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        notes: list[str] = []
        fs = filesystem_of(base)
        if fs["type"] in MEMORY_FILESYSTEMS:
            notes.append(f"{base} is on {fs['type']}: fsync costs nothing there, not durable")
        pragmas = _probe_sqlite(base, SQLITE)
        backends = [LMDB, SQLITE]
        durable_sqlite = SQLITE
        if pragmas[1] < _FULL:
            level = _SYNCHRONOUS_NAMES.get(pragmas[1], str(pragmas[1]))
            notes.append(
                f"eventsourcing.sqlite runs synchronous={level}: its commits are not fsynced "
                "one by one; the synchronous=FULL rows are the durable comparison"
            )
            durable_sqlite = SQLITE_FULL
        else:
            notes.append(
                "eventsourcing.sqlite's default synchronous=FULL in WAL mode fsyncs the WAL on "
                "every commit: durable vs durable"
            )
        if durable_sqlite is SQLITE_FULL or args.force_sqlite_full:
            forced = _probe_sqlite(base, SQLITE_FULL)
            if forced[1] < _FULL:
                notes.append("forcing synchronous=FULL did not take effect")
            backends.append(SQLITE_FULL)
        if args.cpu_ceiling:
            backends.append(LMDB_NOSYNC)
        rows = [Row(b, n) for b in backends for n in threads]
        rows.append(Row(RAW, 1))
        facts = _facts(base, pragmas)
        for round_no in range(1, args.rounds + 1):
            for row in rows:
                m = _measure(row, base, round_no, args)
                row.rounds.append(m)
                progress(
                    f"round {round_no}/{args.rounds}  {row.backend.label:52} "
                    f"{row.threads:>2} threads  {m.rate:8.0f} appends/s"
                )

        ratio_threads = 8 if 8 in threads else threads[-1]
        lmdb_row = next(r for r in rows if r.backend is LMDB and r.threads == ratio_threads)
        sqlite_row = next(
            r for r in rows if r.backend is durable_sqlite and r.threads == ratio_threads
        )
        ratio = lmdb_row.median / sqlite_row.median if sqlite_row.median else None
        summary: dict[str, Any] = {
            "ratio_threads": ratio_threads,
            "ratio_against": durable_sqlite.label,
            "ratio": round(ratio, 3) if ratio is not None else None,
            "goal_ratio": GOAL_RATIO,
            "goal_met": ratio is not None and ratio >= GOAL_RATIO,
            "notes": notes,
        }
        facts["load_average_at_end"] = load_average()
        if args.json:
            report = {
                "facts": facts,
                "settings": {
                    "seconds": args.seconds,
                    "rounds": args.rounds,
                    "threads": threads,
                    "warmup": args.warmup,
                    "workload": args.workload,
                },
                "results": [r.to_json() for r in rows],
                "summary": summary,
            }
            print(json.dumps(report, sort_keys=True))
        else:
            _print_text(facts, rows, summary, args)
        return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
