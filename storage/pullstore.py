"""The blob store as a pull sees it: what it uses of it, per-blob download locks, and the
partial downloads of dead pulls.

- **Locks**: each blob's check-then-download happens under an exclusive ``flock`` on
  ``<root>/tmp/locks/<hex>.lock`` (`blob_lock`), so concurrent pulls of one blob (threads or
  processes) download it once: the waiter then finds it stored. The holder removes the lock
  file before releasing it (waiters check the inode they locked is still the path's), so locks
  do not pile up; the locks' directory and files are opened through `storage.home.Dir` (never
  through a link: a link, FIFO or device planted in their place is a `HomeDamagedError`
  naming it).
- **Partials**: a blob a killed pull left half written (its partial file in ``tmp/`` or a dead
  lease's work directory) is copied into the new writer first (`adopt_partial`), so that the
  download resumes with ``Range`` instead of starting from zero.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import Final, Protocol

from imageledger.domain.errors import HomeDamagedError, RegistryError, RegistryTimeoutError
from imageledger.domain.log import get_logger
from imageledger.storage import layout
from imageledger.storage.home import Dir
from imageledger.storage.oci import BlobAccess

log = get_logger(__name__)


class BlobWriting(Protocol):
    """What the client uses of a `storage.blobs.BlobWriter`."""

    @property
    def offset(self) -> int: ...

    def write(self, chunk: bytes) -> None: ...

    def commit(self) -> int: ...

    def abort(self) -> None: ...


class PullStore(BlobAccess, Protocol):
    """A `BlobStore`, or a wrapper around one (a lease-claiming one, say): `has` is asked
    before anything else of each digest, and `home` (the store's open home, see
    `storage.home`) holds ``tmp/locks`` and the partial files of dead pulls."""

    @property
    def home(self) -> Dir: ...

    def writer(self, digest: str, *, size: int | None = None) -> BlobWriting: ...

    def write_bytes(self, data: bytes, digest: str | None = None) -> str: ...


_LOCK_POLL: Final = 0.25
"""The longest pause between two tries at a lock another pull holds (while a deadline or a
cancellation must be noticed, the lock is polled rather than waited for)."""


def _flock(
    fd: int,
    deadline: float,
    cancel: threading.Event | None,
    expired: Callable[[], BaseException],
    cancelled: Callable[[], BaseException],
) -> None:
    """Take an exclusive flock on `fd`, waiting for the holder (another pull of the blob)
    at most until `deadline` (then raising `expired()`), and not after `cancel` is set
    (raising `cancelled()`)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    if deadline == float("inf") and cancel is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    pause = 0.01
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise expired()
        if cancel is not None and cancel.wait(min(pause, left)):
            raise cancelled()
        if cancel is None:
            time.sleep(min(pause, left))
        pause = min(pause * 2, _LOCK_POLL)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            continue


@contextlib.contextmanager
def blob_lock(
    store: PullStore,
    digest: str,
    *,
    deadline: float = float("inf"),
    cancel: threading.Event | None = None,
    expired: Callable[[], BaseException] | None = None,
    cancelled: Callable[[], BaseException] | None = None,
) -> Iterator[None]:
    """Hold an exclusive flock on ``<root>/tmp/locks/<hex>.lock`` (per open file, so threads
    of one process exclude each other too), and remove the file when done, so that locks do
    not pile up.

    The classic pattern makes the removal safe: the holder unlinks the path before it closes
    (releases) the file; a waiter that then gets the lock on the unlinked file sees that the
    path no longer names its file (another inode, or none) and starts again on the path's
    current file. The same check covers a sweep of ``tmp/`` removing the file. The directories
    and the file are opened through `storage.home.Dir` (one component at a time, never
    through a link): a link, FIFO or device planted there is a `HomeDamagedError` naming it,
    never followed. A wait for another pull's lock ends at `deadline` (raising `expired()`)
    or when `cancel` is set (raising `cancelled()`: the caller's own signal, so that it can
    tell its cancellation from a failure)."""
    name = f"{digest.partition(':')[2]}.lock"

    def default_expired() -> BaseException:
        return RegistryTimeoutError(f"waiting for another pull of {digest}: the deadline passed")

    def default_cancelled() -> BaseException:
        return RegistryError(f"waiting for another pull of {digest}: cancelled")

    with store.home.sub(f"{layout.TMP}/{layout.LOCKS}", create=True) as locks:
        while True:
            fd = locks.open_lock(name)
            try:
                _flock(
                    fd,
                    deadline,
                    cancel,
                    expired or default_expired,
                    cancelled or default_cancelled,
                )
                mine = os.fstat(fd)
                current = locks.stat(name)
                if current is None or (current.st_dev, current.st_ino) != (
                    mine.st_dev,
                    mine.st_ino,
                ):
                    continue
                try:
                    yield
                finally:
                    _unlink_lock(locks, name, mine)
                return
            finally:
                os.close(fd)  # after the unlink: a waiter must not lock a file still named


def _unlink_lock(locks: Dir, name: str, mine: os.stat_result) -> None:
    """Remove lock file `name` if it is still ours (we still hold its lock, so nobody else
    can have replaced it but a sweep of ``tmp/``). A failure to remove only leaves a file
    behind; it never fails the pull."""
    try:
        current = locks.stat(name)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            locks.delete(name)
    except OSError as e:
        log.warning("registry.lock.not_removed", path=str(locks.path / name), error=e.strerror)


_PARTIAL_NAME: Final = re.compile(r"([0-9a-f]{64,128})\.[0-9a-f]{1,64}\.part", re.ASCII)
ADOPT_MIN_SIZE: Final = 1 << 20
"""Blobs smaller than this are not resumed from a dead pull's partial file: downloading them
again costs less than looking."""


def _dead_partials(home: Dir, digest: str, size: int) -> list[tuple[int, str, str]]:
    """Partial downloads of `digest` a pull left in ``tmp/`` or a lease's work directory
    ``tmp/<id>/`` (a `BlobWriter`'s ``<hex>.<random>.part``), biggest first, as (size, work
    directory relative to ``tmp/`` or "", name); only regular files no bigger than the blob.
    Read through `storage.home.Dir`: a link or anything planted is skipped, never
    followed."""
    hexdigest = digest.partition(":")[2]
    found: list[tuple[int, str, str]] = []

    def scan(directory: Dir, relative: str) -> None:
        for name, st in directory.entries():
            match = _PARTIAL_NAME.fullmatch(name)
            if (
                match is not None
                and match[1] == hexdigest
                and stat.S_ISREG(st.st_mode)
                and 0 < st.st_size <= size
            ):
                found.append((st.st_size, relative, name))

    try:
        with home.sub(layout.TMP) as tmp:
            scan(tmp, "")
            for name, st in tmp.entries():
                if stat.S_ISDIR(st.st_mode) and name not in layout.TMP_OWN:
                    with contextlib.suppress(OSError, HomeDamagedError), tmp.sub(name) as work:
                        scan(work, name)
    except (OSError, HomeDamagedError):
        return []
    return sorted(found, reverse=True)


def adopt_partial(store: PullStore, digest: str, size: int, writer: BlobWriting) -> int:
    """Feed `writer` (new, empty) the bytes of the biggest partial download of `digest` that
    an earlier pull left behind (killed, or its machine lost power), so that the download
    resumes with ``Range`` instead of starting from zero; the bytes adopted.

    Called under the blob's download lock, so no pull is writing that digest now (a load may
    be: reading a prefix of its file is harmless). The file is copied, not moved: it belongs
    to a dead lease, and prune reclaims it as before. Its bytes are checked like any others,
    by the blob's digest at commit (the caller downloads again whole when they are bad)."""
    if size < ADOPT_MIN_SIZE:
        return 0
    for _, relative, name in _dead_partials(store.home, digest, size):
        try:
            with (
                store.home.sub(layout.work_dir(relative) if relative else layout.TMP) as directory,
                directory.open_read(name) as source,
            ):
                while writer.offset < size:
                    try:
                        chunk = source.read(min(1 << 20, size - writer.offset))
                    except OSError:
                        break
                    if not chunk:
                        break
                    writer.write(chunk)  # the store's errors (a full disk) are the pull's
        except (FileNotFoundError, HomeDamagedError):
            continue  # gone (a prune, its own pull finishing) or swapped for something else
        if writer.offset:
            log.debug(
                "registry.blob.adopted_partial", digest=digest, offset=writer.offset, size=size
            )
            break
    return writer.offset


__all__ = ["ADOPT_MIN_SIZE", "BlobWriting", "PullStore", "adopt_partial", "blob_lock"]
