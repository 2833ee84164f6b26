"""One shared LMDB environment per ledger path per process.

py-lmdb refuses to open one path twice in a process, and LMDB wants one environment per
process anyway, so every recorder and view that names the same path gets the same
`LedgerEnv`. It owns what the raw environment leaves to its caller:

- **group commit**: writers in this process queue their work; one of them (the leader) runs the
  whole queue in one write transaction, each item in a nested transaction so one item's
  `IntegrityError` rolls back only that item, and pays the flushes for all of them. Before it
  commits, the leader *gathers*: it waits until the writers the previous batch released are
  back, bounded (see "Why the group commit gathers" below);
- **map growth**: on `MapFullError` the map doubles (up to `max_map_size`) and the batch is
  retried; a map grown by another process is adopted (`MapResizedError`). Resizing needs no
  transaction open in the process, so every transaction holds a shared lock that a resize
  takes exclusively;
- **stale readers**: reader slots left by crashed processes are cleared at open and before the
  map grows (they pin old pages and make the map grow for nothing);
- **change notification**: listeners are woken at once by commits in this process and by a
  poller that watches LMDB's last transaction id for other processes' commits;
- **damage**: LMDB keeps no checksums, so a damaged page shows up as whatever error the read
  that meets it gets (a wrong page type, a missing page, undecodable bytes). Every such error
  out of `read()`, `write()` and `db()` becomes one `LedgerCorruptError` naming the ledger and
  what to do (`damaged`); a data file shorter than its last used page is refused at open,
  before anything maps beyond its end (that read would be a SIGBUS, not an error);
- **observation**: the group commit's batch sizes and the leader's time in each commit are
  what a benchmark of it needs and cannot see from outside: `LedgerEnv.commit_observer` is the
  extension point for benchmarks and tests that reports them.

What cannot be turned into an error: py-lmdb's bundled LMDB is built with its assertions on,
and a cursor that steps onto a neighbouring page does not check that page's type before it
asserts it is a leaf (``mdb_cursor_next``/``mdb_cursor_prev`` after ``mdb_cursor_sibling``),
so a scan that crosses into a zeroed or overwritten page aborts the process (SIGABRT). That is
why `storage.ledgercheck` reads the whole ledger in a child process.

Why the group commit gathers, and why ``sync`` is LMDB's own durable commit again
-------------------------------------------------------------------------------------
Measured with ``python -m imageledger.tools.bench_ledger --batch-stats`` on the 2-vCPU VM of
docs/benchmarks.md ("Issue 10: the leader gathers"): eventsourcing's save path costs ~60-90 us
of GIL time per append with the thread switches, a durable LMDB commit ~550 us of flushes that
hold no GIL. Before, the leader committed whatever was queued the moment it could and, in
``sync`` mode, acknowledged batch N only after commit N+1's data flush (meta sync pipelined).
At 8 writer threads that split the writers into three groups (one committing, one waiting for
the next flush, one preparing its next append): 2.3-2.4 appends per commit, the leader busy
94% of the time, much of it waiting for the GIL behind preparing writers. Gathering waits
until everyone the last batch released is back: 7.8 appends per commit (median 8 of 8), and
over three alternating runs of the whole benchmark 4033 -> 4800 appends/s at 8 threads
(medians; LMDB/SQLite 1.68x -> 2.05x), 2155 -> 2215 at 1 thread (a lone writer never gathers:
it released only itself, and it is back). With everyone in one batch there is no next commit
to carry the previous batch's meta page, so the pipelining bought only a second flush call and
a second GIL round trip; LMDB's ``metasync`` commit (data flush, then the meta page through its
synchronous descriptor) does the same two flushes in one call, and is LMDB's own durability
argument.

The bound, at most one commit's duration (and `GATHER_CAP`): a straggler left out waits for
one more commit, so waiting longer for it than a commit takes costs the batch more than it
saves the straggler. 2x and 4x measured 2-3% faster, within the noise, and would double what a
writer whose company left may wait. Measured and dropped (8 threads, same sessions): gathering
with the pipelined meta sync kept (5.4-6.6 per commit: the batch waiting for the next flush
cannot be gathered; slower), metasync without gathering (3.5 per commit, ~3.8k/s), gathering
half the writers so one half prepares while the other flushes (the halves do not hold), waking
the batch as a chain (+3-9%, but a writer interrupted before passing the wake-up on would
strand the rest of its batch). A leader commits one batch, its own, then hands the lead to the
oldest queued writer, so no caller's thread keeps committing for others (the old leader led
until the queue ran dry, which under steady load could be for ever).

What bounds 8 writer threads now, and why the commit is not pipelined (issue 10, second pass)
---------------------------------------------------------------------------------------------
``bench_ledger --batch-stats`` now splits the leader's time (`BatchReport.syncing`). On the
benchmark's 2-vCPU VM a cycle at 8 threads is serial: gathering 550-670 us (seven writers
preparing their next append one after another under the GIL: eventsourcing's save path plus
a thread hand-off each), then committing 590-690 us (the writes' functions ~100-120 us, LMDB's
commit ~470-590 us: ~11 scattered page writes, the data fdatasync and the meta page's
synchronous write), ~7.8 appends per commit, ~1.5 ms per cycle. Two measurements say where the
time goes: the process pinned to one CPU (``taskset``) does 6.1-7.0k appends/s instead of
4.9-5.1k, its gathering 400 us instead of 715 (a hand-off to a thread asleep on the other,
idle vCPU costs ~40 us here; `perf` puts ~20% of the process's samples in the kernel's wake-up
and switch paths). Keeping data.mdb written with zeros ahead of LMDB's pages (so that a
commit's fdatasync does not also journal a change of the file's size) took ~50-70 us off the
LMDB commit (fdatasync median 374 -> 317 us, meta write 167 -> 128 us under strace) and was
dropped all the same: each extension wrote 1-8 MiB of zeros inside a commit, which that
commit's fdatasync then flushed, and a durable `use` + `release` at 10,000 references went
from a p99 of 2-4 ms to ~6 ms (the hot path's tail is a goal, the few percent of a cycle are
not). Overlapping the next batch's preparation with a commit's flushes was measured in five
shapes and dropped: the next leader beginning its transaction while the batch before commits
(4.7 per commit, no faster), a dedicated committer thread that acknowledges batch N just
before flushing N+1 (3.9 per commit, no faster), two sticky lanes of writers alternating on
LMDB's writer lock (3.8k/s), waking a batch one writer at a time, or all at once through one
eventfd write made without the GIL (both within the noise or slower). The reason is the
arithmetic: preparing eight appends (P) takes about as long as one commit (C), and a
pipeline needs two commits, each paying LMDB's two flushes, per cycle of eight, so it cannot
beat P + C unless P is well above C; and the committing thread, back from its flush, queues
for the GIL behind the writers it just released.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import lmdb

from imageledger.domain.errors import (
    LedgerCorruptError,
    LedgerError,
    LedgerFullError,
    LedgerReadOnlyError,
)
from imageledger.domain.log import get_logger

log = get_logger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class BatchReport:
    """One group commit, as `LedgerEnv.commit_observer` is told of it.

    size: the writes the batch held; seconds: the leader's time committing it (the writes'
    functions and LMDB's commit with its flushes); expected: how many writers the leader
    gathered for before it committed (0: it did not wait); gathered: whether they all came
    before the bound (True when it did not wait); waited: seconds spent gathering; syncing:
    of `seconds`, the time in LMDB's commit itself (page writes and flushes, no GIL held),
    so that the rest is the writes' functions run under the GIL."""

    size: int
    seconds: float
    expected: int
    gathered: bool
    waited: float
    syncing: float = 0.0


CommitObserver = Callable[[BatchReport], None]
"""Told after each group commit (see `LedgerEnv.commit_observer`)."""

GATHER_CAP: Final = 0.002
"""The longest a leader waits for writers it expects back (seconds); see `LedgerEnv._take`."""

Durability = Literal["sync", "nometasync", "nosync"]
DURABILITY_MODES: Final[tuple[str, ...]] = ("sync", "nometasync", "nosync")

_MIB: Final = 1024 * 1024
_GIB: Final = 1024 * _MIB

# Written once into every ledger; its absence in a non-empty environment means the directory
# holds someone else's LMDB data, which we refuse to touch.
_META_DB: Final = b"imageledger.meta"
_FORMAT_KEY: Final = b"format"
FORMAT: Final = b"imageledger-ledger/1"

RECOVERY: Final = (
    "restore ledger/ from a backup, or move the home aside and load or pull the images again"
)

# LMDB's answers that mean the pages are not what LMDB wrote: a page of the wrong type or
# out of range, a tree deeper than any it builds, flags that contradict the database record,
# a transaction poisoned by one of those (BadTxn), sizes no writer produces.
DAMAGE_ERRORS: Final[tuple[type[lmdb.Error], ...]] = (
    lmdb.CorruptedError,
    lmdb.PageNotFoundError,
    lmdb.PanicError,
    lmdb.InvalidError,
    lmdb.VersionMismatchError,
    lmdb.BadTxnError,
    lmdb.BadValsizeError,
    lmdb.BadDbiError,
    lmdb.IncompatibleError,
    lmdb.CursorFullError,
    lmdb.PageFullError,
    lmdb.ProblemError,
)

_READ_DAMAGE: Final[tuple[type[Exception], ...]] = (*DAMAGE_ERRORS, LedgerCorruptError)


def damaged(path: Path, detail: str) -> LedgerCorruptError:
    """The one error of a damaged ledger: where it is, what was found, what to do.

    `detail` is shortened to one line: it may hold bytes read from the damaged pages."""
    detail = " ".join(detail.split())
    if len(detail) > 200:
        detail = detail[:197] + "..."
    return LedgerCorruptError(f"{path}: the ledger is damaged ({detail}); {RECOVERY}")


def as_damage(path: Path, error: BaseException) -> BaseException:
    """`error` as the ledger at `path` reports it: LMDB's damage errors and a
    `LedgerCorruptError` that does not name the ledger (raised where the path is not known,
    such as decoding one stored value) become `damaged(path, ...)`; anything else is itself."""
    if isinstance(error, DAMAGE_ERRORS):
        return damaged(path, f"LMDB says: {error}")
    if isinstance(error, LedgerCorruptError) and str(path) not in str(error):
        return damaged(path, str(error))
    return error


@dataclass(frozen=True)
class EnvConfig:
    """How to open a ledger environment.

    durability:
      - ``sync`` (default): every commit is fsynced before it returns. A crash of the process
        or the machine loses nothing that was acknowledged.
      - ``nometasync``: data pages are fsynced, the meta page is not. A machine crash (power
        loss, kernel panic) can undo the last acknowledged commit; a process crash loses nothing.
      - ``nosync``: nothing is fsynced; the OS writes pages back when it likes. A process crash
        (even SIGKILL) loses nothing, a machine crash can undo every commit since the last
        `LedgerEnv.sync()`. The ledger stays consistent in all three modes.
    """

    map_size: int = 64 * _MIB
    max_map_size: int = 1024 * _GIB
    durability: Durability = "sync"
    max_readers: int = 1024
    max_dbs: int = 256
    poll_interval: float = 0.05
    # Open for reading only: a home this user may not write (a shared cache). LMDB keeps
    # its reader table in lock.mdb; when even that cannot be written, reads take no reader
    # slot, so `read()` checks afterwards that no writer could have reused what it read.
    readonly: bool = False


class _SharedExclusiveLock:
    """Many transactions at once, or one map resize alone (LMDB's rule for set_mapsize)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting_exclusive:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting_exclusive += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting_exclusive -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class _Pending:
    __slots__ = ("done", "error", "fn", "result", "wake")

    def __init__(self, fn: Callable[[lmdb.Transaction], Any]) -> None:
        self.fn = fn
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        # Released once while its writer waits: when the write is done, or when the writer is
        # to lead. A bare lock rather than an Event: one C call to wake and one to wait, where
        # an Event takes a Condition and a fresh waiter lock per wait.
        self.wake = threading.Lock()
        self.wake.acquire()


def _ack(items: list[_Pending]) -> None:
    for item in items:
        item.done = True
        item.wake.release()


def check_size(path: Path, env: lmdb.Environment) -> None:
    """Refuse a data file shorter than the pages the meta page says are in use.

    LMDB maps the file and reads pages through the map; a page beyond the end of the file is
    a SIGBUS on first touch, which kills the process instead of raising. A file cut short (a
    copy interrupted, a disk full while restoring, a truncate) has valid meta pages at its
    start, so LMDB opens it: the size must be checked at open, before any transaction reads a
    page above the first two."""
    size = (path / "data.mdb").stat().st_size
    needed = (int(env.info()["last_pgno"]) + 1) * int(env.stat()["psize"])
    if size < needed:
        msg = (
            f"{path}: the ledger is damaged (data.mdb is truncated: {size} bytes, its pages "
            f"need {needed}); {RECOVERY}"
        )
        raise LedgerCorruptError(msg)


class LedgerEnv:
    """A ledger's LMDB environment, shared by everything in this process that opens its path."""

    def __init__(self, path: Path, config: EnvConfig) -> None:
        self.path = path
        self.config = config
        self._pid = os.getpid()
        self._users = 0
        self._lock = _SharedExclusiveLock()
        self._dbs: dict[bytes, Any] = {}
        self._dbs_lock = threading.Lock()
        # The group commit's state, guarded by _queue_lock: the queue; whether a writer leads
        # (commits) it; the wake-up of a leader gathering, released by the writer whose arrival
        # completes what it waits for; how many writers that is; how many writers arrived since
        # the last batch was acknowledged, and how many that batch released (they are expected
        # back); how long the last commit took (what gathering may cost at most).
        self._queue_lock = threading.Lock()
        self._pending: list[_Pending] = []
        self._leading = False
        self._gather: Any = None
        self._want = 0
        self._arrived = 0
        self._returning = 0
        self._last_commit = 0.0
        self._syncing = 0.0
        # Functions run in every commit's transaction after its writes (see before_commit).
        self._before_commit: dict[str, Callable[[lmdb.Transaction], None]] = {}
        self._listeners: set[threading.Event] = set()
        self._listeners_lock = threading.Lock()
        self._poller: threading.Thread | None = None
        self._closed = False
        self.unlocked = False  # see _open
        # An extension point for benchmarks and tests, which need the batch sizes, the
        # leader's busy time and its gathering of the group commit and cannot see them from
        # outside: set it to a `CommitObserver` to be called on the committing thread after
        # every batch (committed or rolled back) with its `BatchReport`, and back to None to
        # stop. It runs while the batch's writers wait, so it must be quick and must not raise.
        self.commit_observer: CommitObserver | None = None
        self.env = self._open()

    # ----------------------------------------------------------------- opening

    def _open(self) -> lmdb.Environment:
        path = self.path
        if path.exists() and not path.is_dir():
            msg = f"{path}: not a ledger: a ledger is a directory, this is a file"
            raise LedgerCorruptError(msg)
        readonly = self.config.readonly
        if not readonly:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                msg = f"{path}: cannot create the ledger directory: {e.strerror}"
                raise LedgerCorruptError(msg) from e
        # Without write access to lock.mdb, LMDB cannot register a reader (see EnvConfig).
        self.unlocked = readonly and not os.access(path / "lock.mdb", os.W_OK)
        durability = self.config.durability
        if durability not in DURABILITY_MODES:
            msg = f"unknown ledger durability {durability!r}; use one of {DURABILITY_MODES}"
            raise ValueError(msg)
        try:
            env = lmdb.open(
                str(path),
                map_size=self.config.map_size,
                max_dbs=self.config.max_dbs,
                max_readers=self.config.max_readers,
                subdir=True,
                sync=durability != "nosync",
                # LMDB's own durable commit: the data pages are flushed, then the meta page is
                # written through a synchronous descriptor (see the module docstring for why
                # the group commit no longer pipelines that second flush).
                metasync=durability == "sync",
                lock=not self.unlocked,
                readonly=readonly,
                create=not readonly,
                readahead=False,
                meminit=False,
            )
        except (lmdb.InvalidError, lmdb.CorruptedError, lmdb.VersionMismatchError) as e:
            said = str(e).removeprefix(f"{path}: ")
            msg = f"{path}: not a readable ledger, or a damaged one (LMDB says: {said}); {RECOVERY}"
            raise LedgerCorruptError(msg) from e
        except lmdb.Error as e:
            msg = f"{path}: cannot open the ledger: {e}"
            raise LedgerCorruptError(msg) from e
        try:
            cleared = 0 if self.unlocked else env.reader_check()
            if cleared:
                log.info("ledger.stale_readers_cleared", path=str(path), count=cleared)
            check_size(path, env)
            try:
                self._check_format(env)
            except DAMAGE_ERRORS as e:
                raise as_damage(path, e) from e
        except BaseException:
            env.close()
            raise
        return env

    def _check_format(self, env: lmdb.Environment) -> None:
        """That `env` is an imageledger ledger (its meta database names the format), making
        an empty one so. The check and the making each read in one transaction: processes
        opening a new ledger at once must not see one's half-made state (the meta database
        created, or another database, before the format is written) as a foreign one."""
        main = env.open_db(None)
        with env.begin() as txn:
            has_meta = txn.get(_META_DB) is not None
            entries = txn.stat(main)["entries"]
        if not has_meta:
            if entries or self.config.readonly:
                msg = f"{self.path}: holds an LMDB environment that is not an imageledger ledger"
                raise LedgerCorruptError(msg)
            with env.begin(write=True) as txn:  # one writer at a time: made once, whole
                if txn.get(_META_DB) is None:
                    if txn.stat(main)["entries"]:
                        msg = (
                            f"{self.path}: holds an LMDB environment that is not an imageledger"
                            " ledger"
                        )
                        raise LedgerCorruptError(msg)
                    meta = env.open_db(_META_DB, txn=txn, create=True)
                    txn.put(_FORMAT_KEY, FORMAT, db=meta)
        try:
            meta = env.open_db(_META_DB, create=False)
        except lmdb.Error as e:
            msg = f"{self.path}: holds an LMDB environment that is not a ledger ({e})"
            raise LedgerCorruptError(msg) from e
        with env.begin(db=meta) as txn:
            found = txn.get(_FORMAT_KEY)
        if found != FORMAT:
            msg = f"{self.path}: ledger format {found!r} is not {FORMAT!r}"
            raise LedgerCorruptError(msg)

    def exists(self, *names: str) -> bool:
        """Whether every named database `names` exists (named databases are keys of LMDB's
        main one): what a reader that must not create them (a query, a read-only home) asks
        before it opens one with `db(create=False)`."""
        with self.read() as txn:
            return all(txn.get(name.encode()) is not None for name in names)

    def db(self, name: str, *, create: bool = True) -> Any:
        """The handle of named database `name` (created when missing and `create`).

        Handles are process-wide in LMDB and opening one takes a write transaction, so this
        must not run inside `write()` or `read()` (it takes the resize lock exclusively);
        recorders resolve their handles before they open a transaction.
        """
        key = name.encode()
        handle = self._dbs.get(key)
        if handle is not None:
            return handle
        create = create and not self.config.readonly
        with self._dbs_lock:
            if key not in self._dbs:
                self._dbs.update(self._open_handles([key], create=create))
            return self._dbs[key]

    def _open_handles(self, keys: list[bytes], *, create: bool) -> dict[bytes, Any]:
        """Open (and, with `create`, make) the named databases `keys`: one write transaction
        for all of them, growing or adopting the map as it must. Under `_dbs_lock`."""
        with self._lock.exclusive():
            for _attempt in range(3):
                try:
                    if not create:
                        return {k: self.env.open_db(k, create=False) for k in keys}
                    with self.env.begin(write=True) as txn:
                        return {k: self.env.open_db(k, txn=txn, create=True) for k in keys}
                except lmdb.NotFoundError:
                    names = ", ".join(repr(k.decode()) for k in keys)
                    msg = f"{self.path}: database {names} does not exist"
                    raise LedgerCorruptError(msg) from None
                except lmdb.MapFullError:
                    self._grow_locked()
                except lmdb.MapResizedError:
                    self.env.set_mapsize(0)  # another process grew it: adopt
                except DAMAGE_ERRORS as e:
                    raise as_damage(self.path, e) from e
        names = ", ".join(k.decode() for k in keys)
        msg = f"{self.path}: no room to create the databases {names}"
        raise LedgerFullError(msg)

    def before_commit(self, name: str, hook: Callable[[lmdb.Transaction], None]) -> None:
        """Run `hook(txn)` in every commit's write transaction, after the batch's writes and
        before the commit, once per commit however many writes the group commit gathered
        (the audit tree folds all the batch's new records at once: `storage.tlog`). What it
        raises rolls the whole batch back, every write failing with it. One hook per `name`
        in the process: the first registration stands (several caches on one home)."""
        self._before_commit.setdefault(name, hook)

    def dbs(self, names: list[str]) -> list[Any]:
        """The handles of the named databases `names`, those missing created together in one
        write transaction: a fresh ledger's views are some twenty databases, and `db` creates
        each with a commit of its own (twenty fsyncs: 10-80 ms before a first pull). Not
        inside `write()` or `read()`, as `db`."""
        if not self.config.readonly and any(n.encode() not in self._dbs for n in names):
            with self._dbs_lock:
                missing = [n.encode() for n in names if n.encode() not in self._dbs]
                if missing:
                    self._dbs.update(self._open_handles(missing, create=True))
        return [self.db(n) for n in names]

    # ----------------------------------------------------------------- reading

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A read-only snapshot of the ledger as of now.

        Damage met while the snapshot is read (LMDB's damage errors, a `LedgerCorruptError`
        from decoding a stored value) leaves it as `damaged(...)`, naming this ledger."""
        while True:
            with self._lock.shared():
                try:
                    txn = self.env.begin(buffers=False)
                except lmdb.MapResizedError:
                    pass
                except DAMAGE_ERRORS as e:
                    raise as_damage(self.path, e) from e
                else:
                    try:
                        yield txn
                        self._check_unlocked_read(txn)
                    except _READ_DAMAGE as e:
                        self._check_unlocked_read(txn)
                        damage = as_damage(self.path, e)
                        if damage is e:
                            raise
                        raise damage from e
                    finally:
                        txn.abort()
                    return
            self._adopt_map_size()

    def _check_unlocked_read(self, txn: lmdb.Transaction) -> None:
        """A read that held no reader slot (`EnvConfig.readonly` without access to lock.mdb)
        is sound only if no writer could have reused its pages meanwhile: LMDB frees the
        pages of snapshot N when N+1 commits and may reuse them from N+2 on. Past that, the
        answer may mix two states: refused rather than returned."""
        if self.unlocked and self.env.info()["last_txnid"] > txn.id() + 1:
            msg = (
                f"{self.path}: the ledger changed while it was read without a reader lock "
                "(this user cannot write the home); run the command again"
            )
            raise LedgerError(msg)

    # ----------------------------------------------------------------- writing

    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run `fn` in a write transaction and commit it durably (per the durability mode).

        `fn` runs in a nested transaction inside a batch that other threads' writes share, so
        it must touch nothing but the transaction it is given, and may run more than once (a
        batch is run again after the map grows); if it raises, its changes alone are rolled
        back and its exception is raised here once the batch has committed.
        """
        self._check_usable()
        if self.config.readonly:
            msg = f"{self.path}: opened read-only (this user cannot write the home)"
            raise LedgerReadOnlyError(msg)
        item = _Pending(fn)
        with self._queue_lock:
            self._pending.append(item)
            self._arrived += 1
            lead = not self._leading
            if lead:
                self._leading = True
            elif self._gather is not None and self._arrived >= self._want:
                self._gather.release()
                self._gather = None
        if not lead:
            item.wake.acquire()
            lead = not item.done
        if lead:
            self._lead(item)
        if item.error is not None:
            # Damage met by this write (or by the batch it was part of) names the ledger.
            error = as_damage(self.path, item.error)
            if error is not item.error:
                raise error from item.error
            raise item.error
        return item.result  # type: ignore[no-any-return]

    def _lead(self, own: _Pending) -> None:
        """Commit one batch, the one holding `own`, then hand the lead to the oldest writer
        queued meanwhile: no thread commits for others longer than its own write takes."""
        batch: list[_Pending] = []
        try:
            batch, expected, gathered, waited = self._take()
            began = time.perf_counter()
            self._commit(batch)
            self._last_commit = took = time.perf_counter() - began
            observer = self.commit_observer
            if observer is not None:
                observer(BatchReport(len(batch), took, expected, gathered, waited, self._syncing))
            self._notify()
            with self._queue_lock:
                self._arrived = 0
                self._returning = len(batch)
            _ack(batch)
        except BaseException as e:
            with self._queue_lock:
                if own in self._pending:  # interrupted while gathering: never taken
                    self._pending.remove(own)
                    batch.append(own)
            failed = [item for item in batch if not item.done]
            for item in failed:
                item.error = item.error or e
            _ack(failed)
            raise
        finally:
            with self._queue_lock:
                if self._pending:
                    self._pending[0].wake.release()
                else:
                    self._leading = False

    def _take(self) -> tuple[list[_Pending], int, bool, float]:
        """The next batch: the queue, once the writers the last batch released are back.

        The writers of one batch usually come back together (a thread that appends tends to
        append again), so the leader waits until as many writers have arrived since the last
        acknowledgement as it released, but never longer than the last commit took (a
        straggler left out waits for one more commit, no longer than the others would have
        waited for it) nor `GATHER_CAP`. A lone writer releases only itself and is back
        already: it never waits. A writer whose company stopped writing waits once, at most
        the bound: the batch it then commits alone releases one writer.

        Returns the batch, how many writers were waited for (0: none), whether they all came,
        and the seconds waited."""
        with self._queue_lock:
            want = self._returning
            if self._arrived >= want:
                batch, self._pending = self._pending, []
                return batch, 0, True, 0.0
            gather = threading.Lock()
            gather.acquire()
            self._gather = gather
            self._want = want
        began = time.perf_counter()
        try:
            gathered = gather.acquire(timeout=min(self._last_commit, GATHER_CAP))
        finally:
            with self._queue_lock:
                self._gather = None
        with self._queue_lock:
            batch, self._pending = self._pending, []
        return batch, want, gathered, time.perf_counter() - began

    def _commit(self, batch: list[_Pending]) -> bool:
        """Commit the batch (growing or adopting the map as needed); False if nothing was."""
        try:
            while True:
                grow = False
                with self._lock.shared():
                    try:
                        self._commit_once(batch)
                    except lmdb.MapFullError:
                        grow = True
                    except lmdb.MapResizedError:
                        pass
                    else:
                        return True
                if grow:
                    self._grow()
                else:
                    self._adopt_map_size()
        except Exception as e:
            # The whole batch was rolled back: every item fails with the batch's error.
            for item in batch:
                item.error = e
            return False

    def _commit_once(self, batch: list[_Pending]) -> None:
        env = self.env
        self._syncing = 0.0
        txn = env.begin(write=True)
        try:
            for item in batch:
                item.error = None
                child = env.begin(write=True, parent=txn)
                try:
                    item.result = item.fn(child)
                except (lmdb.MapFullError, lmdb.MapResizedError):
                    child.abort()
                    raise
                except Exception as e:
                    child.abort()
                    item.error = e
                else:
                    child.commit()
            for hook in list(self._before_commit.values()):
                hook(txn)
            syncing = time.perf_counter()
            txn.commit()
            self._syncing = time.perf_counter() - syncing
        except lmdb.Error as e:
            txn.abort()
            if isinstance(e, (lmdb.MapFullError, lmdb.MapResizedError)):
                raise
            if "No space left" in str(e):
                msg = f"{self.path}: the disk is full; the append was rolled back: {e}"
                raise LedgerFullError(msg) from e
            if "Input/output error" in str(e):
                # LMDB reports a short write (what a full disk gives it) as EIO.
                msg = (
                    f"{self.path}: the ledger could not be written (input/output error: most "
                    f"often a full disk, else a failing device); the append was rolled back"
                )
                raise LedgerFullError(msg) from e
            raise
        except BaseException:
            txn.abort()
            raise

    def _grow(self) -> None:
        with self._lock.exclusive():
            self._grow_locked()

    def _grow_locked(self) -> None:
        self.env.reader_check()
        current = self.env.info()["map_size"]
        limit = self.config.max_map_size
        if current >= limit:
            msg = (
                f"{self.path}: the ledger is full: its map reached the maximum of {limit} bytes "
                "(raise LMDB_MAX_MAP_SIZE); the append was rolled back"
            )
            raise LedgerFullError(msg)
        new = min(current * 2, limit)
        try:
            self.env.set_mapsize(new)
        except lmdb.Error as e:
            msg = f"{self.path}: cannot grow the ledger map to {new} bytes: {e}"
            raise LedgerFullError(msg) from e
        log.info("ledger.map_grown", path=str(self.path), old=current, new=new)

    def _adopt_map_size(self) -> None:
        with self._lock.exclusive():
            self.env.set_mapsize(0)

    def sync(self) -> None:
        """Flush everything to disk (what `nosync` mode leaves to the OS)."""
        with self._lock.shared():
            self.env.sync(True)

    # ----------------------------------------------------------------- change notification

    def last_txnid(self) -> int:
        with self._lock.shared():
            return int(self.env.info()["last_txnid"])

    def listen(self, event: threading.Event) -> None:
        """Set `event` whenever any process commits to this ledger."""
        with self._listeners_lock:
            self._listeners.add(event)
            # A commit between the caller's last read and this registration would otherwise
            # wait for the next commit: wake the listener once so it reads again now.
            event.set()
            if self._poller is None or not self._poller.is_alive():
                self._poller = threading.Thread(
                    target=self._poll, name=f"ledger-poller:{self.path}", daemon=True
                )
                self._poller.start()

    def unlisten(self, event: threading.Event) -> None:
        with self._listeners_lock:
            self._listeners.discard(event)

    def _notify(self) -> None:
        with self._listeners_lock:
            listeners = list(self._listeners)
        for event in listeners:
            event.set()

    def _poll(self) -> None:
        seen = self.last_txnid()
        while True:
            with self._listeners_lock:
                if not self._listeners or self._closed:
                    self._poller = None
                    return
            threading.Event().wait(self.config.poll_interval)
            if self._closed:
                continue
            try:
                now = self.last_txnid()
            except lmdb.Error:
                continue
            if now != seen:
                seen = now
                self._notify()

    # ----------------------------------------------------------------- lifetime

    def _check_usable(self) -> None:
        if self._closed:
            msg = f"{self.path}: the ledger environment is closed"
            raise LedgerCorruptError(msg)
        if os.getpid() != self._pid:
            msg = f"{self.path}: a ledger environment cannot be used across fork(); open it anew"
            raise LedgerCorruptError(msg)

    def close(self) -> None:
        with self._listeners_lock:
            self._closed = True
            self._listeners.clear()
        with self._lock.exclusive():
            self.env.close()


_registry: dict[tuple[int, Path], LedgerEnv] = {}
_registry_lock = threading.Lock()


def open_env(path: str | os.PathLike[str], config: EnvConfig | None = None) -> LedgerEnv:
    """The process's `LedgerEnv` for `path`, opened on first use; pair with `release_env`.

    A later caller's `config` is ignored while the environment is open: an environment has one
    configuration per process (LMDB's own rule).
    """
    resolved = Path(path).expanduser().resolve()
    key = (os.getpid(), resolved)
    with _registry_lock:
        shared = _registry.get(key)
        if shared is None:
            shared = LedgerEnv(resolved, config or EnvConfig())
            _registry[key] = shared
        shared._users += 1
        return shared


def release_env(shared: LedgerEnv) -> None:
    """Drop one user of `shared`; the last one closes it."""
    key = (shared._pid, shared.path)
    with _registry_lock:
        shared._users -= 1
        if shared._users > 0 or os.getpid() != shared._pid:
            return
        _registry.pop(key, None)
    shared.close()
