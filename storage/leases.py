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
import fcntl
import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog

log = structlog.get_logger(__name__)


class StoreLock:
    """The store-wide lock: exclusive across processes and threads, re-entrant in a thread
    (only the outermost hold takes the flock; a second fd would block on the first)."""

    def __init__(self, home: Path, name: str = "store.lock") -> None:
        self.path = home / name
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
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    yield
                finally:
                    os.close(fd)  # closing releases the flock
            finally:
                self._depth.n = depth


class InFlightLease:
    """One pull's or load's claim on the digests it needs until its event commits."""

    def __init__(self, home: Path, lock: StoreLock) -> None:
        self._lock = lock
        self.id = secrets.token_hex(8)
        self.dir = home / "tmp" / "leases"
        self.path = self.dir / f"{self.id}.lease"
        self.work = home / "tmp" / self.id
        self._fd: int | None = None
        self.digests: list[str] = []

    def __enter__(self) -> Self:
        self.dir.mkdir(parents=True, exist_ok=True)
        # Created under the store lock, which every collector holds while it reads leases: a
        # collector never sees this lease half made (a ``.new`` file not locked yet).
        with self._lock():
            fresh = self.dir / f"{self.id}.new"
            fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.replace(fresh, self.path)
        self._fd = fd
        # The work directory comes after the lease, so a collector that lists tmp/ before it
        # reads the leases never sees a live work directory without its lease.
        self.work.mkdir(parents=True, exist_ok=True)
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
        shutil.rmtree(self.work, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class InFlightLeases:
    """The collector's view of every live lease under a home (the domain's `InFlight` port)."""

    def __init__(self, home: Path, lock: StoreLock) -> None:
        self.home = home
        self.lock = lock
        self.dir = home / "tmp" / "leases"

    def lease(self) -> InFlightLease:
        return InFlightLease(self.home, self.lock)

    def live(self, *, exclude: str | None = None) -> tuple[frozenset[str], frozenset[str]]:
        """(digests held, lease ids alive), leaving out lease `exclude`; stale leases of dead
        owners are removed. Call it holding the store lock."""
        digests: set[str] = set()
        alive: set[str] = set()
        if not self.dir.is_dir():
            return frozenset(), frozenset()
        for fresh in self.dir.glob("*.new"):
            # Leases are made under the store lock, which the caller holds: a .new file now is
            # one whose owner died while making it.
            fresh.unlink(missing_ok=True)
        for path in sorted(self.dir.glob("*.lease")):
            if path.stem == exclude:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    with open(fd, closefd=False) as f:
                        digests.update(line.strip() for line in f if line.strip())
                    alive.add(path.stem)
                    continue
                log.info("lease.stale_removed", lease=path.stem)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            finally:
                os.close(fd)
        return frozenset(digests), frozenset(alive)

    def protected(self) -> frozenset[str]:
        return self.live()[0]
