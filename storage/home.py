"""The cache home as a trust boundary: every write and delete stays inside it.

A home may belong to an ordinary user while root operates it (a shared cache, a runtime that
runs as root over a user's images), so anything in it may have been planted: a symbolic link
at ``blobs``, ``tmp/<lease>`` or a blob's name, a FIFO where a lock file belongs, a directory
swapped for a link between a check and a use. Paths are therefore never resolved by name
below the home: `Dir` holds an open directory and does everything relative to that file
descriptor, one component at a time, with ``O_NOFOLLOW``; a link is an entry like any other,
never a way somewhere else. `Dir.delete` is the one deletion path of the package: it unlinks
what is at a name (a link itself, never its target) and removes directories with the
descriptor-based ``shutil.rmtree``, which never leaves the tree it was given.

The home itself is the operator's choice, so its own path may pass through links (once, when
it is opened). `open_home` decides whether a directory is a home: imageledger writes a marker
file, ``imageledger-home``, when it makes one; an existing directory without it is adopted
only when it is empty or is a home made before markers existed (its ``ledger/`` and nothing
but imageledger's own names). Anything else is refused, because the next prune would delete
whatever it found under ``tmp/`` and ``artifacts/``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from pathlib import Path
from typing import BinaryIO, Final, Self

from imageledger.domain.errors import (
    HomeDamagedError,
    HomeNotFoundError,
    InvalidHomeError,
    LedgerMissingError,
)
from imageledger.storage import layout

MARKER_CONTENT: Final = b'{"imageledger-home":1}\n'

# A directory holding only imageledger's own names (and lost+found, for a home that is a file
# system of its own) is a home made before the marker.
_OWN_NAMES: Final = layout.OWN_NAMES | {"lost+found"}

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _parts(relative: str) -> list[str]:
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if ".." in parts:
        msg = f"{relative!r}: a path inside the home never climbs out of it"
        raise ValueError(msg)
    return parts


class Dir:
    """An open directory inside the home; every operation is relative to its descriptor and
    never follows a symbolic link. Close it (or use it as a context manager)."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path  # for messages only: never opened by name

    @classmethod
    def at(cls, path: str | os.PathLike[str], *, create: bool = False) -> Dir:
        """The directory at `path` (links in `path` itself are followed: it is the caller's
        choice); created with its parents when missing and `create`."""
        where = Path(path)
        try:
            fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            if not create:
                raise
            where.mkdir(parents=True, exist_ok=True)
            fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return cls(fd, where)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _damaged(self, name: str, what: str) -> HomeDamagedError:
        return HomeDamagedError(
            f"{self.path / name} is {what}: imageledger never follows or obeys such an entry "
            "in its home; remove it"
        )

    def _open_dir(self, name: str, *, create: bool) -> int:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            if not create:
                raise
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=self.fd)
            return self._open_dir(name, create=False)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise  # permissions, I/O: not what is there, but whether we may look
            st = self.stat(name)
            if st is None:
                raise FileNotFoundError(e.errno, e.strerror, str(self.path / name)) from None
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise self._damaged(name, kind) from None

    def sub(self, relative: str, *, create: bool = False) -> Dir:
        """The directory `relative` below this one, walked one component at a time without
        following links (`HomeDamagedError` at a link or a non-directory); missing ones are
        made when `create`, else `FileNotFoundError`."""
        fd = os.dup(self.fd)
        path = self.path
        try:
            for part in _parts(relative):
                nxt = Dir(fd, path)._open_dir(part, create=create)
                os.close(fd)
                fd, path = nxt, path / part
        except BaseException:
            os.close(fd)
            raise
        return Dir(fd, path)

    def stat(self, name: str) -> os.stat_result | None:
        """What is at `name` itself (a link is a link), None when nothing is."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def file_size(self, name: str) -> int | None:
        """The size of the regular file at `name`; None when nothing, or something else, is
        there (a link or a FIFO named like a blob is not a blob)."""
        st = self.stat(name)
        return st.st_size if st is not None and stat.S_ISREG(st.st_mode) else None

    def open_read(self, name: str) -> BinaryIO:
        """The regular file at `name` for reading; `FileNotFoundError` when there is none (a
        link or another kind of file is never opened: ``O_NONBLOCK`` so that a FIFO planted
        there cannot hang the reader)."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(name, flags, dir_fd=self.fd)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
                raise FileNotFoundError(e.errno, e.strerror, str(self.path / name)) from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise FileNotFoundError(2, "not a regular file", str(self.path / name))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")

    def create(self, name: str, mode: int = 0o644, *, readable: bool = False) -> BinaryIO:
        """A new file at `name` for writing (and reading back, "w+b", when `readable`);
        `FileExistsError` when anything (a link too) is there already."""
        access = os.O_RDWR if readable else os.O_WRONLY
        flags = access | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.fdopen(os.open(name, flags, mode, dir_fd=self.fd), "w+b" if readable else "wb")

    def open_lock(self, name: str) -> int:
        """A lock file's descriptor (created when missing): never through a link, never a
        FIFO or a device (`HomeDamagedError`)."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            try:
                fd = os.open(name, flags, 0o644, dir_fd=self.fd)
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EROFS):  # a home this user may only read
                    raise
                # flock needs no write access: a reader of a shared home still excludes
                # (and waits for) the collector.
                readonly = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
                fd = os.open(name, readonly, dir_fd=self.fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                st = self.stat(name)
                kind = "a symbolic link" if st and stat.S_ISLNK(st.st_mode) else "not a file"
                raise self._damaged(name, kind) from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise self._damaged(name, "not a regular file")
        return fd

    def write_atomic(self, name: str, data: bytes) -> None:
        """Replace `name` with `data` whole: a fresh temporary file, fsynced, renamed over it
        (a link at `name` is replaced, never written through)."""
        tmp = f".{name}.{os.getpid()}.tmp"
        self.delete(tmp)
        try:
            with self.create(tmp) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            self.delete(tmp)  # a full disk, say: nothing half written stays
            raise

    def replace(self, name: str, target: Dir, target_name: str) -> None:
        os.replace(name, target_name, src_dir_fd=self.fd, dst_dir_fd=target.fd)

    def entries(self) -> list[tuple[str, os.stat_result]]:
        """(name, what is there, links not followed), sorted by name."""
        found = []
        with os.scandir(self.fd) as it:
            for entry in it:
                try:
                    found.append((entry.name, entry.stat(follow_symlinks=False)))
                except FileNotFoundError:
                    continue
        return sorted(found, key=lambda e: e[0])

    def tree_size(self, name: str) -> int:
        """Bytes of the regular files at or under `name` (links count as nothing: their
        targets are not ours)."""
        st = self.stat(name)
        if st is None:
            return 0
        if not stat.S_ISDIR(st.st_mode):
            return st.st_size if stat.S_ISREG(st.st_mode) else 0
        total = 0
        for _root, _dirs, files, root_fd in os.fwalk(name, dir_fd=self.fd, follow_symlinks=False):
            for file in files:
                with contextlib.suppress(FileNotFoundError):
                    inner = os.stat(file, dir_fd=root_fd, follow_symlinks=False)
                    if stat.S_ISREG(inner.st_mode):
                        total += inner.st_size
        return total

    def delete(self, name: str) -> int:
        """Remove whatever is at `name` (a file, a link itself, a directory tree) and return
        the bytes of regular files freed; 0 when nothing was there. The one way imageledger
        deletes: nothing outside this directory is ever touched."""
        if "/" in name or name in ("", ".", ".."):
            msg = f"{name!r}: delete takes one name in a directory"
            raise ValueError(msg)
        st = self.stat(name)
        if st is None:
            return 0
        if stat.S_ISDIR(st.st_mode):
            size = self.tree_size(name)
            try:
                shutil.rmtree(name, dir_fd=self.fd)
            except FileNotFoundError:
                return 0
            except OSError:
                # Swapped for a link or a file since the stat: remove that entry itself.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=self.fd)
            return size
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return 0
        except IsADirectoryError:
            return self.delete(name)  # swapped for a directory since the stat
        return st.st_size if stat.S_ISREG(st.st_mode) else 0

    def fsync(self) -> None:
        os.fsync(self.fd)


def _holds_content(home: Dir) -> bool:
    """Whether ``blobs/`` holds anything at all (a file under any algorithm directory)."""
    try:
        blobs = home.sub(layout.BLOBS)
    except (FileNotFoundError, HomeDamagedError):
        return home.stat(layout.BLOBS) is not None
    with blobs:
        for name, st in blobs.entries():
            if not stat.S_ISDIR(st.st_mode):
                return True
            try:
                with blobs.sub(name) as algorithm:
                    if algorithm.entries():
                        return True
            except HomeDamagedError:
                return True
    return False


def _ledger_state(home: Dir) -> str:
    """``absent``, ``empty`` (a ledger directory without data, or with a zero-length data
    file) or ``present``; links and odd files where the ledger belongs are damage."""
    st = home.stat(layout.LEDGER)
    if st is None:
        return "absent"
    with home.sub(layout.LEDGER) as ledger:
        for name in ("data.mdb", "lock.mdb"):
            entry = ledger.stat(name)
            if entry is not None and not stat.S_ISREG(entry.st_mode):
                raise ledger._damaged(name, "not a regular file")
        size = ledger.file_size("data.mdb")
    return "present" if size else "empty"


def open_home(path: str | os.PathLike[str], *, create: bool) -> Dir:
    """Open the home at `path`, deciding whether it is one (see the module docstring).

    `create`: the command may write, so a missing or empty directory becomes a home (the
    marker is written once the ledger is there, by `mark_home`). A command that only reads
    passes False and gets `HomeNotFoundError` instead: reading never makes a home.
    Refuses (`LedgerMissingError`) a home whose ledger is missing or empty while its store
    holds content: a fresh ledger would take every blob for an orphan.
    """
    text = os.fspath(path)
    if not text:
        msg = "the home is an empty string: give a directory path"
        raise InvalidHomeError(msg)
    where = Path(text)
    try:
        home = Dir.at(where, create=create)
    except FileNotFoundError:
        msg = f"no imageledger home at {where} (a pull or load makes one)"
        raise HomeNotFoundError(msg) from None
    except NotADirectoryError:
        msg = f"{where} is not a directory, so it cannot be an imageledger home"
        raise InvalidHomeError(msg) from None
    try:
        names = {
            name
            for name, _ in home.entries()
            if not (name.startswith(".") and name.endswith(".tmp"))  # a crashed atomic write
        }
        marked = layout.MARKER in names
        if marked:
            marker = home.stat(layout.MARKER)
            if marker is None or not stat.S_ISREG(marker.st_mode):
                raise home._damaged(layout.MARKER, "not a regular file")
        elif names - _OWN_NAMES or (names and layout.LEDGER not in names):
            shown = sorted(names - _OWN_NAMES) or sorted(names)
            msg = (
                f"{where} is not an imageledger home and is not empty (it holds "
                f"{', '.join(repr(n) for n in shown[:3])}{', ...' if len(shown) > 3 else ''}): "
                "refusing to use it; give a new or empty directory"
            )
            raise InvalidHomeError(msg)
        elif not names and not create:
            msg = f"{where} is empty: not an imageledger home yet (a pull or load makes it one)"
            raise HomeNotFoundError(msg)
        ledger = _ledger_state(home)
        if ledger != "present" and (marked or _holds_content(home)):
            what = "missing" if ledger == "absent" else "empty"
            msg = (
                f"{where / 'ledger'}: the ledger is {what} but the home "
                f"{'was made by imageledger' if marked else 'holds blobs'}: its history is "
                "lost, and a fresh ledger would delete every blob as an orphan. Restore "
                "ledger/ from a backup, or move the home aside and pull or load again"
            )
            if marked and not _holds_content(home) and ledger == "empty":
                # Made, then cut off before its first page reached the disk: nothing to lose.
                return home
            raise LedgerMissingError(msg)
    except BaseException:
        home.close()
        raise
    return home


def mark_home(home: Dir) -> None:
    """Write the marker (once the ledger exists, so that a marked home always had one); a
    home that cannot be written (a shared, read-only cache) is left as it is."""
    if home.stat(layout.MARKER) is not None:
        return
    try:
        home.write_atomic(layout.MARKER, MARKER_CONTENT)
    except PermissionError:
        return
    except OSError as e:
        if e.errno != errno.EROFS:
            raise
