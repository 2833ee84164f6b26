"""File locks that keep the collector (remove, prune) off content a pull still needs.

- The **store lock** (``<home>/store.lock``, flock) serialises the two critical sections that
  must not interleave across processes: a collector's "decide what to delete, commit the event,
  unlink" and a pull's "check every blob is on disk, commit the event".
- An **in-flight lease** (``tmp/leases/<id>.lease``, flocked by its owner for its lifetime)
  lists the digests a pull or load has written or relies on before its event commits, and owns
  a work directory ``tmp/<id>/`` for partial files. The collector skips leased digests and
  leaves live work directories alone. A crashed owner's flock dies with it, so its lease is
  stale the moment it crashes: the next prune deletes the lease and its partial files, and the
  blobs it wrote (unreferenced by the ledger) are reclaimed as orphans.

Ordering that makes this safe: the owner records a digest in its lease (under the store lock)
*before* it checks whether the blob exists or writes it, and the collector reads leases (under
the store lock) *after* it decided and *before* it unlinks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import BinaryIO, Self

from imageledger.domain.log import get_logger
from imageledger.domain.ports import LiveLeases
from imageledger.storage import layout
from imageledger.storage.blobs import BlobStore, BlobWriter
from imageledger.storage.home import Dir

log = get_logger(__name__)


class StoreLock:
    """The store-wide lock: exclusive across processes and threads, re-entrant in a thread
    (only the outermost hold takes the flock; a second fd would block on the first)."""

    def __init__(self, home: Dir, name: str = layout.STORE_LOCK, *, readonly: bool = False) -> None:
        self.home = home
        self.name = name
        # A reader of a home it may not write: when the lock file is not there (nobody ever
        # wrote here) or cannot be opened at all, there is no writer to exclude.
        self.readonly = readonly
        self._local = threading.RLock()
        self._depth = threading.local()

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._local:
            depth = getattr(self._depth, "n", 0)
            self._depth.n = depth + 1
            try:
                if depth:
                    yield
                    return
                try:
                    fd = self.home.open_lock(self.name)
                except (FileNotFoundError, PermissionError):
                    if not self.readonly:
                        raise
                    yield
                    return
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    yield
                finally:
                    os.close(fd)  # closing releases the flock
            finally:
                self._depth.n = depth


class InFlightLease:
    """One pull's or load's claim on the digests it needs until its event commits."""

    def __init__(self, home: Dir, lock: StoreLock) -> None:
        self._home = home
        self._lock = lock
        self.id = secrets.token_hex(8)
        self._fd: int | None = None
        self._leases: Dir | None = None
        self._tmp: Dir | None = None
        self._work: Dir | None = None
        self.digests: list[str] = []

    @property
    def work(self) -> Dir:
        """The lease's own work directory, ``tmp/<id>/``, for partial files."""
        if self._work is None:
            msg = "the lease is not held"
            raise RuntimeError(msg)
        return self._work

    def __enter__(self) -> Self:
        try:
            self._tmp = self._home.sub(layout.TMP, create=True)
            self._leases = self._tmp.sub(layout.LEASES, create=True)
            # Created under the store lock, which every collector holds while it reads
            # leases: a collector never sees this lease half made (a ``.new`` file not
            # locked yet).
            with self._lock():
                fresh = f"{self.id}.new"
                flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(fresh, flags, 0o644, dir_fd=self._leases.fd)
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._leases.replace(fresh, self._leases, f"{self.id}.lease")
            self._fd = fd
            # The work directory comes after the lease, so a collector that lists tmp/ before
            # it reads the leases never sees a live work directory without its lease.
            os.mkdir(self.id, 0o755, dir_fd=self._tmp.fd)
            self._work = self._tmp.sub(self.id)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def add(self, digest: str) -> None:
        """Claim `digest` (call under the store lock, before checking or writing the blob)."""
        if self._fd is None:
            msg = "the lease is not held"
            raise RuntimeError(msg)
        if digest not in self.digests:
            self.digests.append(digest)
            os.write(self._fd, f"{digest}\n".encode())

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._work is not None:
            self._work.close()
            self._work = None
        if self._tmp is not None:
            self._tmp.delete(self.id)
            self._tmp.close()
            self._tmp = None
        if self._leases is not None:
            if self._fd is not None:
                self._leases.delete(f"{self.id}.lease")
            self._leases.close()
            self._leases = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class InFlightLeases:
    """The collector's view of every live lease under a home (the domain's `InFlight` port)."""

    def __init__(self, store: BlobStore, lock: StoreLock) -> None:
        self.store = store
        self.home = store.home
        self.lock = lock

    def lease(self) -> InFlightLease:
        return InFlightLease(self.home, self.lock)

    @contextlib.contextmanager
    def bringing(self, known: Callable[[str], bool]) -> Iterator[LeasedStore]:
        """One pull's or load's lease, and the store as it writes through it (the domain's
        `Leases.bringing`)."""
        with self.lease() as lease:
            yield LeasedStore(self.store, lease, self, known)

    def live(self, *, exclude: str | None = None) -> LiveLeases:
        """What every live lease holds, leaving out lease `exclude`; stale leases of dead
        owners are removed. Call it holding the store lock."""
        digests: set[str] = set()
        alive: set[str] = set()
        try:
            leases = self.home.sub(f"{layout.TMP}/{layout.LEASES}")
        except FileNotFoundError:
            return LiveLeases(frozenset(), frozenset())
        with leases:
            for name, st in leases.entries():
                stem, dot, suffix = name.rpartition(".")
                if not dot or suffix not in ("new", "lease") or not stat.S_ISREG(st.st_mode):
                    # Not a lease (a link, a directory, a stray name): not obeyed, removed.
                    log.warning("lease.stray_removed", entry=name)
                    _tidy(leases, name)
                    continue
                if suffix == "new":
                    # Leases are made under the store lock, which the caller holds: a .new
                    # file now is one whose owner died while making it.
                    _tidy(leases, name)
                    continue
                if stem == exclude:
                    continue
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                try:
                    fd = os.open(name, flags, dir_fd=leases.fd)
                except OSError:
                    continue  # gone (or swapped) since the listing
                try:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        with open(fd, closefd=False) as f:
                            digests.update(line.strip() for line in f if line.strip())
                        alive.add(stem)
                        continue
                    log.info("lease.stale_removed", lease=stem)
                    _tidy(leases, name)
                finally:
                    os.close(fd)
        return LiveLeases(frozenset(digests), frozenset(layout.work_dir(a) for a in alive))

    def protected(self) -> frozenset[str]:
        return self.live().digests


class LeasedStore:
    """The blob store as a source sees it during one pull or load (the registry's
    `PullStore`, the archives' `BlobAccess`, the domain's `SourceStore`): every digest it
    touches is claimed by the run's in-flight lease first (see the module docstring for why
    the order matters), and its partial files go to the lease's work directory."""

    def __init__(
        self,
        store: BlobStore,
        lease: InFlightLease,
        leases: InFlightLeases,
        known: Callable[[str], bool],
    ) -> None:
        self._known = known  # does the ledger account for this blob (a committed image uses it)?
        self._store = store
        self._lease = lease
        self._leases = leases
        self.written: set[str] = set()

    @property
    def home(self) -> Dir:
        return self._store.home

    def scratch(self) -> Dir:
        return self._lease.work.sub("")

    def clear_work(self) -> None:
        work = self._lease.work
        for name, _ in work.entries():
            work.delete(name)

    def _claim(self, digest: str) -> None:
        with self._leases.lock():
            self._lease.add(digest)

    def has(self, digest: str) -> bool:
        self._claim(digest)
        return self._store.has(digest)

    def size(self, digest: str) -> int | None:
        self._claim(digest)
        return self._store.size(digest)

    def open(self, digest: str) -> BinaryIO:
        self._claim(digest)
        return self._store.open(digest)

    def read(self, digest: str) -> bytes:
        self._claim(digest)
        return self._store.read(digest)

    def write(
        self,
        digest: str,
        chunks: Iterable[bytes],
        *,
        size: int | None = None,
        max_size: int | None = None,
    ) -> int:
        self._claim(digest)
        written = self._store.write(
            digest, chunks, size=size, max_size=max_size, work=self._lease.work
        )
        self.written.add(digest)
        return written

    def writer(
        self, digest: str, *, size: int | None = None, max_size: int | None = None
    ) -> BlobWriter:
        self._claim(digest)
        self.written.add(digest)
        return self._store.writer(digest, size=size, max_size=max_size, work=self._lease.work)

    def write_bytes(self, data: bytes, digest: str | None = None) -> str:
        digest = digest or f"sha256:{hashlib.sha256(data).hexdigest()}"
        self.write(digest, [data], size=len(data))
        return digest

    def delete(self, digest: str) -> int:
        """A failed or partial run cleans up what it wrote, unless another live pull or load
        relies on the same blob (it would then fail at commit with its content missing)."""
        with self._leases.lock():
            if digest in self._leases.live(exclude=self._lease.id).digests or self._known(digest):
                return 0
            return self._store.delete(digest)


def _tidy(leases: Dir, name: str) -> None:
    """Remove a dead or stray lease entry; a reader that may not write the home (a shared
    cache) leaves it for whoever writes next."""
    try:
        leases.delete(name)
    except PermissionError:
        log.debug("lease.not_removed", entry=name)
    except OSError as e:
        if e.errno != errno.EROFS:
            raise
