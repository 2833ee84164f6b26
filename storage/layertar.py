"""A layer's tar read once, as a stream: entries with their names as bytes, data copied to a
file without passing through Python copies.

Why not `tarfile` (which `storage.tarsafe` bounds for archives): a layer is read once per
materialization and is mostly file data. tarfile hands names over as text (non-UTF-8 names
survive only through surrogate escapes), parses every header in Python twice over for PAX,
and moves data through its own 10 KiB buffer joins; here data goes from the uncompressed
chunks to the image as memoryview slices, and a 200 MiB layer parses in a fraction of the
time. What is read: POSIX ustar (with its name prefix), PAX local and global headers (path,
linkpath, size, uid, gid, mtime, ``SCHILY.xattr.*``), GNU long names and long link names,
octal and base-256 numbers; a header's checksum is checked. Refused (`TarError`, the caller
says which layer): a bad checksum, a truncated stream, an extended header over
`MAX_HEADER_PAYLOAD` (the limit `storage.tarsafe` sets for archives), sparse files and the
other GNU extensions (multi-volume, dump directories), numbers that are not numbers.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final, Protocol

from imageledger.storage.tarsafe import MAX_HEADER_PAYLOAD

BLOCK: Final = 512
_ZERO: Final = bytes(BLOCK)
_POSIX: Final = b"ustar\x00"
REGULAR: Final = b"0"
HARDLINK: Final = b"1"
SYMLINK: Final = b"2"
CHAR: Final = b"3"
BLOCKDEV: Final = b"4"
DIRECTORY: Final = b"5"
FIFO: Final = b"6"
CONTIGUOUS: Final = b"7"
_PAX: Final = b"x"
_PAX_GLOBAL: Final = b"g"
_GNU_LONGNAME: Final = b"L"
_GNU_LONGLINK: Final = b"K"
_KNOWN: Final = {REGULAR, HARDLINK, SYMLINK, CHAR, BLOCKDEV, DIRECTORY, FIFO, CONTIGUOUS}
_XATTR: Final = b"SCHILY.xattr."


class TarError(ValueError):
    """The stream is not a tar this reader accepts; the message says where and why."""


class Writer(Protocol):
    def write(self, data: bytes | memoryview, /) -> int: ...


@dataclass(slots=True)
class TarEntry:
    name: bytes
    type: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    mtime_nsec: int
    linkname: bytes
    devmajor: int
    devminor: int
    xattrs: dict[bytes, bytes] = field(default_factory=dict)

    def has_data(self) -> bool:
        return self.type in (REGULAR, CONTIGUOUS)


def _text(field_: bytes) -> bytes:
    end = field_.find(b"\0")
    return field_ if end < 0 else field_[:end]


def _number(field_: bytes, what: str) -> int:
    if field_ and field_[0] & 0x80:  # base-256 (GNU): big-endian, 0xff first for negatives
        value = int.from_bytes(field_[1:], "big")
        return value - (1 << (8 * (len(field_) - 1))) if field_[0] == 0xFF else value
    try:  # the usual field, NUL-terminated digits: half the time of the general reading below
        return int(field_.rstrip(b"\0"), 8)
    except ValueError:
        pass  # a NUL inside (text after it is ignored), an empty field, or not a number
    text = _text(field_).strip(b" ")
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise TarError(f"tar header: {what} {bytes(field_)!r} is not a number") from None


def _checksum_ok(header: bytes) -> bool:
    """The header's checksum: the sum of its bytes, its checksum field counted as spaces,
    unsigned (POSIX) or, as some old tars wrote it, signed. The unsigned sum is taken from
    two Adler-32s (in C: 0.55 us a header, `sum` took 3.1 us, and a layer has two headers a
    file with PAX): the low 16 bits of the Adler-32 of 256 bytes are exactly 1 + their sum,
    which is at most 65,280, below Adler's modulus 65,521."""
    stored = _number(header[148:156], "checksum")
    halves = (zlib.adler32(header[:256]) & 0xFFFF) + (zlib.adler32(header[256:]) & 0xFFFF) - 2
    unsigned = halves - sum(header[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    high = sum(1 for b in header[:148] if b > 127) + sum(1 for b in header[156:] if b > 127)
    return stored == unsigned - 256 * high


def _pax_records(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            if not data[pos:].strip(b"\0\n"):
                return
            raise TarError("tar PAX header: a record without a length")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarError("tar PAX header: a record length that is not a number") from None
        record = data[space + 1 : pos + length]
        if length <= space - pos or pos + length > len(data) or not record.endswith(b"\n"):
            raise TarError("tar PAX header: a record that does not end where it says")
        key, sep, value = record[:-1].partition(b"=")
        if not sep:
            raise TarError("tar PAX header: a record without '='")
        yield key, value
        pos += length


class TarReader:
    """Entries of the tar whose bytes `next_chunk` returns in order (b"" at the end). For
    each entry, `entries` yields it and the caller either copies its data (`copy_data`) or
    leaves it (skipped on the next step)."""

    def __init__(self, next_chunk: Callable[[], bytes]) -> None:
        self._next_chunk = next_chunk
        self._buf = memoryview(b"")
        self._off = 0
        self._pending = 0  # data bytes of the current entry not yet read
        self._pad = 0  # then the padding to its block

    def _fill(self) -> bool:
        chunk = self._next_chunk()
        if not chunk:
            return False
        self._buf = memoryview(chunk)
        self._off = 0
        return True

    def _take(self, size: int) -> bytes:
        """Exactly `size` bytes, or fewer only at the end of the stream."""
        parts = []
        while size:
            if self._off >= len(self._buf) and not self._fill():
                break
            piece = self._buf[self._off : self._off + size]
            self._off += len(piece)
            size -= len(piece)
            parts.append(piece)
        return b"".join(parts)

    def _skip(self, size: int) -> None:
        while size:
            if self._off >= len(self._buf) and not self._fill():
                raise TarError("tar: the stream ends inside an entry")
            step = min(size, len(self._buf) - self._off)
            self._off += step
            size -= step

    def copy_data(self, out: Writer) -> None:
        """The current entry's data, written to `out` in slices of the stream's chunks."""
        left = self._pending
        while left:
            if self._off >= len(self._buf) and not self._fill():
                raise TarError("tar: the stream ends inside a file's data")
            piece = self._buf[self._off : self._off + left]
            self._off += len(piece)
            left -= len(piece)
            out.write(piece)
        self._pending = 0

    def _payload(self, size: int, what: str) -> bytes:
        if size > MAX_HEADER_PAYLOAD:
            raise TarError(f"tar {what} of {size} bytes (limit {MAX_HEADER_PAYLOAD})")
        data = self._take(size)
        if len(data) < size:
            raise TarError(f"tar: the stream ends inside a {what}")
        self._skip(-size % BLOCK)
        return data

    def entries(self) -> Iterator[TarEntry]:
        pax_global: dict[bytes, bytes] = {}
        pax: dict[bytes, bytes] = {}
        long_name: bytes | None = None
        long_link: bytes | None = None
        while True:
            self._skip(self._pending + self._pad)
            self._pending = self._pad = 0
            header = self._take(BLOCK)
            if not header or header == _ZERO:
                return  # the end-of-archive marker (or a stream that stops between entries)
            if len(header) < BLOCK:
                raise TarError("tar: the stream ends inside a header")
            if not _checksum_ok(header):
                raise TarError("tar: a header with a bad checksum (not a tar, or damaged)")
            kind = header[156:157]
            size = _number(header[124:136], "size")
            if size < 0:
                raise TarError("tar header: a negative size")
            if kind == _PAX:
                pax.update(_pax_records(self._payload(size, "PAX header")))
                continue
            if kind == _PAX_GLOBAL:
                pax_global.update(_pax_records(self._payload(size, "PAX global header")))
                continue
            if kind == _GNU_LONGNAME:
                long_name = _text(self._payload(size, "GNU long name"))
                continue
            if kind == _GNU_LONGLINK:
                long_link = _text(self._payload(size, "GNU long link name"))
                continue
            entry = self._entry(header, kind, size, {**pax_global, **pax}, long_name, long_link)
            pax, long_name, long_link = {}, None, None
            if entry.has_data():
                self._pending, self._pad = entry.size, -entry.size % BLOCK
            yield entry

    def _entry(
        self,
        header: bytes,
        kind: bytes,
        size: int,
        pax: dict[bytes, bytes],
        long_name: bytes | None,
        long_link: bytes | None,
    ) -> TarEntry:
        name = _text(header[0:100])
        if header[257:263] == _POSIX:
            prefix = _text(header[345:500])
            if prefix:
                name = prefix + b"/" + name
        if kind == b"\0":
            kind = DIRECTORY if name.endswith(b"/") else REGULAR
        if kind not in _KNOWN:
            what = "sparse file" if kind == b"S" else f"entry type {kind!r}"
            raise TarError(f"tar: {_show(name)} is a {what}, which layers do not carry")
        entry = TarEntry(
            name=long_name if long_name is not None else name,
            type=kind,
            mode=_number(header[100:108], "mode"),
            uid=_number(header[108:116], "uid"),
            gid=_number(header[116:124], "gid"),
            size=size,
            mtime=_number(header[136:148], "mtime"),
            mtime_nsec=0,
            linkname=long_link if long_link is not None else _text(header[157:257]),
            devmajor=_number(header[329:337], "devmajor"),
            devminor=_number(header[337:345], "devminor"),
        )
        for key, value in pax.items():
            self._apply(entry, key, value)
        return entry

    @staticmethod
    def _apply(entry: TarEntry, key: bytes, value: bytes) -> None:
        if key.startswith(_XATTR):
            entry.xattrs[key[len(_XATTR) :]] = value
        elif key.startswith(b"GNU.sparse."):
            raise TarError(f"tar: {_show(entry.name)} is a sparse file, which layers do not carry")
        elif not value:
            return  # an empty record removes the keyword: the header's field stands
        elif key == b"path":
            entry.name = value
        elif key == b"linkpath":
            entry.linkname = value
        elif key in (b"size", b"uid", b"gid"):
            try:
                number = int(value)
            except ValueError:
                raise TarError(f"tar PAX {key.decode()} {value!r} is not a number") from None
            if number < 0:
                raise TarError(f"tar PAX {key.decode()} {number} is negative")
            setattr(entry, key.decode(), number)
        elif key == b"mtime":
            entry.mtime, entry.mtime_nsec = _pax_time(value)


def _pax_time(value: bytes) -> tuple[int, int]:
    whole, _, frac = value.partition(b".")
    try:
        seconds = int(whole)
        nsec = int((frac + b"000000000")[:9]) if frac else 0
    except ValueError:
        raise TarError(f"tar PAX mtime {value!r} is not a time") from None
    if value.startswith(b"-"):
        return seconds, 0
    return seconds, nsec


def _show(name: bytes) -> str:
    return repr(name.decode("utf-8", "backslashreplace"))


__all__ = ["MAX_HEADER_PAYLOAD", "TarEntry", "TarError", "TarReader"]
