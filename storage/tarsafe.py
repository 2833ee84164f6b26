"""Reading a tar that may be hostile: bounded headers, checked names, links kept inside.

An archive comes from anywhere (a download, stdin), so nothing in it is trusted before it is
checked: a pax or GNU long-name header whose payload tarfile would read into memory whole is
refused past `MAX_HEADER_PAYLOAD`; an entry name is refused when absolute, holding NUL or
``..``; a link must point inside the archive; a read error (a truncated or corrupt stream)
is an `ArchiveError` naming the entry, never a tarfile or zlib exception.
"""

from __future__ import annotations

import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from typing import IO, Final

from imageledger.domain.errors import ArchiveError

CHUNK: Final = 1024 * 1024
"""Bytes read at a time from an archive entry or a spooled file."""
MAX_HEADER_PAYLOAD: Final = 1024 * 1024  # pax / GNU long-name headers are read into memory


class BoundedTarInfo(tarfile.TarInfo):
    """Refuses pax / GNU long-name headers whose payload tarfile would read into memory whole."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> BoundedTarInfo:
        info = super().frombuf(buf, encoding, errors)
        extended = (
            tarfile.XHDTYPE,
            tarfile.XGLTYPE,
            tarfile.SOLARIS_XHDTYPE,
            tarfile.GNUTYPE_LONGNAME,
            tarfile.GNUTYPE_LONGLINK,
        )
        if info.type in extended and info.size > MAX_HEADER_PAYLOAD:
            msg = f"tar extended header of {info.size} bytes (limit {MAX_HEADER_PAYLOAD})"
            raise ArchiveError(msg)
        return info


READ_ERRORS: Final = (tarfile.TarError, EOFError, zlib.error, OSError)


def entry_chunks(source: IO[bytes], name: str) -> Iterator[bytes]:
    """The content of one tar entry, in chunks; read errors become `ArchiveError`."""
    while True:
        try:
            chunk = source.read(CHUNK)
        except READ_ERRORS as e:
            raise ArchiveError(f"archive entry {name}: truncated or corrupt: {e}") from None
        if not chunk:
            return
        yield chunk


def archive_path(name: str, what: str) -> str:
    """An archive path as ``a/b/c``: no leading ``./``, no ``.``; refuse absolute and ``..``."""
    if name.startswith("/"):
        raise ArchiveError(f"{what} {name!r}: absolute path")
    if "\x00" in name:
        raise ArchiveError(f"{what} {name!r}: NUL in path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"{what} {name!r}: '..' in path")
    return "/".join(parts)


def link_target(name: str, member: tarfile.TarInfo) -> str:
    linkname = member.linkname
    kind = "symlink" if member.issym() else "hardlink"
    if not linkname or linkname.startswith("/"):
        raise ArchiveError(f"archive {kind} {name} -> {linkname!r}: points outside the archive")
    # A symlink is relative to its directory, a hardlink to the archive root.
    joined = posixpath.join(posixpath.dirname(name), linkname) if member.issym() else linkname
    target = posixpath.normpath(joined)
    if target == ".." or target.startswith("../") or target in (".", ""):
        raise ArchiveError(f"archive {kind} {name} -> {linkname!r}: points outside the archive")
    return archive_path(target, f"archive {kind} target of {name}")


__all__ = [
    "CHUNK",
    "MAX_HEADER_PAYLOAD",
    "READ_ERRORS",
    "BoundedTarInfo",
    "archive_path",
    "entry_chunks",
    "link_target",
]
