"""A FUSE file system that loses what was not synced when the power is cut.

``python tests/losefs.py BACKING MOUNTPOINT`` mounts BACKING at MOUNTPOINT (foreground, until
unmounted). File data written through the mount is held in memory until an ``fsync`` or
``fdatasync`` of that file (or a write through an ``O_SYNC``/``O_DSYNC`` handle) writes it to
BACKING and fsyncs it there: what a disk with a volatile write cache and honest flushes does.
``SIGUSR1`` cuts the power: every write not yet made durable is dropped, and every write after
it vanishes too (success is still answered, as a dying disk would). BACKING then holds exactly
what a machine crash at that instant would have left.

Simplifications: directory operations (create, rename, unlink, symlink, mkdir) are durable at
once; file contents are kept whole in memory once written (test files are small). Symlinks are
passed through, so a file that must not live on this file system (LMDB's ``lock.mdb``, a
shared writable mapping of robust mutexes) can point elsewhere.

Used by the machine-crash test of the ledger (`test_ledger_power_loss.py`); needs ``libfuse2``
and the ``fusepy`` binding, and root for the mount.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from typing import Any

from fuse import FUSE, FuseOSError, Operations  # type: ignore[import-untyped]


class LoseFS(Operations):  # type: ignore[misc]
    def __init__(self, backing: str) -> None:
        self.backing = os.path.realpath(backing)
        self._mutex = threading.RLock()
        self.volatile: dict[str, bytearray] = {}  # path -> whole content, unsynced writes in
        self.sync_handles: set[int] = set()
        self.cut = False
        signal.signal(signal.SIGUSR1, self._cut)

    def _cut(self, *_: object) -> None:
        with self._mutex:
            self.cut = True
            self.volatile.clear()

    def _full(self, path: str) -> str:
        return os.path.join(self.backing, path.lstrip("/"))

    def _image(self, path: str) -> bytearray:
        image = self.volatile.get(path)
        if image is None:
            with open(self._full(path), "rb") as f:
                image = self.volatile[path] = bytearray(f.read())
        return image

    def _persist(self, path: str) -> None:
        image = self.volatile.pop(path, None)
        if image is None or self.cut:
            return
        fd = os.open(self._full(path), os.O_WRONLY)
        try:
            os.ftruncate(fd, len(image))
            os.pwrite(fd, bytes(image), 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- metadata, passed through ---------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.lstat(self._full(path))
        attrs = {
            key: getattr(st, key)
            for key in (
                "st_atime",
                "st_ctime",
                "st_gid",
                "st_mode",
                "st_mtime",
                "st_nlink",
                "st_size",
                "st_uid",
            )
        }
        with self._mutex:
            image = self.volatile.get(path)
            if image is not None:
                attrs["st_size"] = len(image)
        return attrs

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._full(path))]

    def readlink(self, path: str) -> str:
        return os.readlink(self._full(path))

    def symlink(self, target: str, source: str) -> None:
        os.symlink(source, self._full(target))

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._full(path), mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._full(path))

    def unlink(self, path: str) -> None:
        with self._mutex:
            self.volatile.pop(path, None)
        os.unlink(self._full(path))

    def rename(self, old: str, new: str) -> None:
        with self._mutex:
            if old in self.volatile:
                self.volatile[new] = self.volatile.pop(old)
        os.rename(self._full(old), self._full(new))

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._full(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._full(path), uid, gid)

    def utimens(self, path: str, times: tuple[float, float] | None = None) -> None:
        os.utime(self._full(path), times)

    def statfs(self, path: str) -> dict[str, Any]:
        st = os.statvfs(self._full(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files")
        return {key: getattr(st, key) for key in (*keys, "f_flag", "f_frsize", "f_namemax")}

    # -- file data: volatile until synced -------------------------------------------------

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        fd = os.open(self._full(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        os.close(fd)
        return self.open(path, os.O_RDWR)

    def open(self, path: str, flags: int) -> int:
        fd = os.open(self._full(path), os.O_RDONLY)  # a handle number; data goes through us
        if flags & (os.O_SYNC | os.O_DSYNC):
            with self._mutex:
                self.sync_handles.add(fd)
        if flags & os.O_TRUNC:
            self.truncate(path, 0)
        return fd

    def release(self, path: str, fh: int) -> None:
        with self._mutex:
            self.sync_handles.discard(fh)
        os.close(fh)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self._mutex:
            image = self.volatile.get(path)
            if image is not None:
                return bytes(image[offset : offset + size])
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self._mutex:
            if self.cut:
                return len(data)
            image = self._image(path)
            end = offset + len(data)
            if end > len(image):
                image.extend(b"\0" * (end - len(image)))
            image[offset:end] = data
            if fh in self.sync_handles:
                self._persist(path)
        return len(data)

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        with self._mutex:
            if self.cut:
                return
            image = self._image(path)
            if length < len(image):
                del image[length:]
            else:
                image.extend(b"\0" * (length - len(image)))

    def fsync(self, path: str, datasync: int, fh: int) -> None:
        with self._mutex:
            self._persist(path)

    def flush(self, path: str, fh: int) -> None:
        return None  # close(2) makes nothing durable


def main() -> None:
    backing, mountpoint = sys.argv[1:3]
    if not os.path.isdir(backing):
        raise FuseOSError(errno.ENOENT)
    FUSE(LoseFS(backing), mountpoint, foreground=True, nothreads=True, allow_other=False)


if __name__ == "__main__":
    main()
