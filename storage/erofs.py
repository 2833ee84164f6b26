"""Layer blobs as EROFS images, and the fsmeta that merges them (issue 13).

`build_layer` streams one layer blob (gzip, zstd or a plain tar) into an uncompressed EROFS
image, checking its diff_id on the way; `build_fsmeta` reads the layer images of a manifest
(ours) and writes the merged tree as a metadata-only EROFS whose regular files point into
them. The on-disk format is `storage.erofsformat`'s.

Why it is shaped so:

- One pass, flat memory: regular-file data is written to `out` as the tar is read (block 1
  on, in tar order, each file whole blocks with the last zero-padded), never held; what the
  tree keeps per entry is its metadata. Directories and the metadata area go after the data
  once the whole tree is known, and the superblock (block 0) last. So `out` is the only file
  written (a failed build leaves only `out`, which the caller deletes) and no spool is needed.
- Deterministic: data in tar order, inodes breadth first with names sorted, xattrs sorted, no
  clock, no host fact (uuid zero); the same blob gives the same bytes.
- Overlay semantics are resolved in the layer image as the guest's overlayfs reads them: an
  OCI whiteout ``.wh.NAME`` (whatever its tar type: a hard link included) becomes a character
  device 0/0 named NAME, ``.wh..wh..opq`` the ``trusted.overlay.opaque=y`` xattr of its
  directory (whiteouts inside an opaque directory hide nothing more and are dropped); AUFS
  metadata (``.wh..wh.*``) is skipped, except that a file in AUFS's link directory
  (``.wh..wh.plnk/``) is the data of the hard links naming it. ``trusted.overlay.*`` xattrs
  a tar carries itself are dropped, so a layer cannot redirect or hide another layer's files.
"""

from __future__ import annotations

import hashlib
import os
import queue
import stat
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Final, cast

from isal import isal_zlib

from imageledger.domain.errors import LayerRejectedError, MaterializeError
from imageledger.domain.model import OCI_LAYER_GZIP, OCI_LAYER_ZSTD
from imageledger.storage import erofsformat as fmt
from imageledger.storage import layertar
from imageledger.storage.erofsformat import BLOCK, FormatError, Node
from imageledger.storage.layertar import TarEntry, TarError, TarReader
from imageledger.storage.oci import layer_media_type

CHUNK: Final = 1 << 20
"""Bytes a read of the finished image takes (to hash it)."""
READ_CHUNK: Final = 256 << 10
"""Bytes of the compressed blob read at a time."""
STREAM_CHUNK: Final = 1 << 20
"""Bytes of the uncompressed tar handed over at a time: small enough that a chunk is still in
the CPU's cache when the next stage hashes or writes it (4 MiB chunks made the 200 MiB
benchmark's build slower), big enough that the hand-overs cost nothing."""
_AHEAD: Final = 8
MAX_DEPTH: Final = 512
"""Path components an entry may have: deeper is refused as hostile (no real image nests so
deep, and the readers that walk a tree recursively would not survive it)."""
MAX_PATH: Final = 4095
"""Bytes of an entry's path (PATH_MAX less its NUL): a longer one could not be opened."""
MAX_INODES: Final = 0xFFFFFFFF
"""Inodes an image may hold: EROFS stores an inode number in 32 bits."""
MAX_SYMLINK: Final = 4095
WHITEOUT: Final = b".wh."
OPAQUE: Final = b".wh..wh..opq"
AUFS_META: Final = b".wh..wh."
AUFS_LINKS: Final = b".wh..wh.plnk"
OPAQUE_XATTR: Final = b"trusted.overlay.opaque"
OVERLAY_XATTRS: Final = b"trusted.overlay."
_ZEROS: Final = memoryview(bytes(BLOCK))
_INFLATE_ERROR: Final = cast("type[Exception]", isal_zlib.error)
"""isal's error class (its type stub declares it as an instance of Exception)."""


@dataclass(frozen=True)
class ErofsBuild:
    size: int
    """Bytes of the image file written."""
    digest: str
    """``sha256:<hex>`` of the image file's bytes."""
    blocks: int
    """``size // 4096``."""


# ---- the uncompressed stream -------------------------------------------------------------------


class _Handover:
    """A bounded queue between two threads that a stop event abandons (neither side blocks
    for good once the build has stopped)."""

    def __init__(self, stop: threading.Event) -> None:
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(_AHEAD)
        self._stop = stop

    def put(self, item: bytes | BaseException) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> bytes | BaseException:
        while not self._stop.is_set():
            try:
                return self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
        return b""


class _Uncompressed:
    """The layer's tar stream in chunks (`chunk`), uncompressed by its magic bytes and hashed
    (the diff_id is the sha256 of these bytes).

    Uncompressing, hashing and the tar parsing each run in a thread of their own, handing
    chunks over (at most `_AHEAD` ahead, so memory stays bounded): isal, zstd and hashlib
    release the GIL, so on two cores a build takes about its slowest stage, not the sum of
    them. An error in a stage (a corrupt stream, a read error) is raised by `chunk`."""

    def __init__(self, blob: BinaryIO) -> None:
        self.hash = hashlib.sha256()
        head = blob.read(4)
        chunks: Iterator[bytes]
        media_type = layer_media_type(head)
        if media_type == OCI_LAYER_GZIP:
            chunks = _gunzip(blob, head)
        elif media_type == OCI_LAYER_ZSTD:
            chunks = _unzstd(blob, head)
        else:
            chunks = _plain(blob, head)
        self._stop = threading.Event()
        self._data = _Handover(self._stop)
        self._to_hash = _Handover(self._stop)
        self._done = False
        self._threads = [
            threading.Thread(target=self._produce, args=(chunks,), name="imageledger-uncompress"),
            threading.Thread(target=self._hash, name="imageledger-diff-id"),
        ]
        for thread in self._threads:
            thread.daemon = True
            thread.start()

    def _produce(self, chunks: Iterator[bytes]) -> None:
        try:
            for chunk in chunks:
                if not (self._to_hash.put(chunk) and self._data.put(chunk)):
                    return
            self._to_hash.put(b"")
            self._data.put(b"")
        except BaseException as e:  # handed to the reader, which raises it
            self._to_hash.put(b"")
            self._data.put(e)

    def _hash(self) -> None:
        while (item := self._to_hash.get()) and not isinstance(item, BaseException):
            self.hash.update(item)

    def chunk(self) -> bytes:
        """The next piece of the uncompressed stream; b"" at its end."""
        if self._done:
            return b""
        item = self._data.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if not item:
            self._done = True
        return item

    def drain(self) -> str:
        """Read to the end (what follows the tar's end marker counts in the diff_id too);
        the diff_id of everything read."""
        while self.chunk():
            pass
        for thread in self._threads:
            thread.join()
        return f"sha256:{self.hash.hexdigest()}"

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def _plain(blob: BinaryIO, head: bytes) -> Iterator[bytes]:
    if head:
        yield head
    while chunk := blob.read(STREAM_CHUNK):
        yield chunk


def _gunzip(blob: BinaryIO, head: bytes) -> Iterator[bytes]:
    """Every gzip member in turn (zero padding after the last is allowed, as gzip(1) does);
    output bounded per step so a small blob cannot make one huge buffer.

    Inflated by ISA-L (python-isal's zlib-compatible `isal_zlib`), not zlib: on the 200 MiB
    benchmark layer zlib's inflate alone took twice `mkfs.erofs`'s whole build, ISA-L's
    takes 0.4x zlib's time (docs/benchmarks.md, issue 13). It checks what zlib checks (the
    header, its CRC16 when flagged, each member's CRC32 and length) and refuses what zlib
    refuses; tests/test_erofs.py pins both. There is no zlib fallback: isal is a dependency
    with wheels for every platform the package supports, so one inflater is ever run."""
    data = head
    decomp = isal_zlib.decompressobj(31)
    try:
        while True:
            if not data:
                data = blob.read(READ_CHUNK)
                if not data:
                    if not decomp.eof:
                        raise LayerRejectedError("layer blob: truncated gzip stream")
                    return
            if decomp.eof:  # a further member, or trailing zeros
                data = data.lstrip(b"\0")
                if not data:
                    continue
                decomp = isal_zlib.decompressobj(31)
            out = decomp.decompress(data, STREAM_CHUNK)
            data = decomp.unconsumed_tail or decomp.unused_data
            if out:
                yield out
    except _INFLATE_ERROR as e:
        raise LayerRejectedError(f"layer blob: corrupt gzip stream: {e}") from None


def _unzstd(blob: BinaryIO, head: bytes) -> Iterator[bytes]:
    try:
        import zstandard
    except ImportError:  # pragma: no cover - the test extra installs it
        raise MaterializeError(
            "layer blob is zstd-compressed: materializing it needs the zstandard package"
        ) from None
    reader = zstandard.ZstdDecompressor().stream_reader(
        cast(IO[bytes], _Prefixed(head, blob)), read_size=READ_CHUNK, read_across_frames=True
    )
    try:
        while chunk := reader.read(STREAM_CHUNK):
            yield chunk
    except zstandard.ZstdError as e:
        raise LayerRejectedError(f"layer blob: corrupt zstd stream: {e}") from None


class _Prefixed:
    def __init__(self, head: bytes, blob: BinaryIO) -> None:
        self._head = head
        self._blob = blob

    def read(self, size: int = -1) -> bytes:
        if self._head:
            head, self._head = self._head, b""
            return head
        return self._blob.read(size)


# ---- the layer tree ----------------------------------------------------------------------------


def _parts(name: bytes, what: str) -> list[bytes]:
    if name.startswith(b"/"):
        raise LayerRejectedError(f"layer {what} {_show(name)}: absolute path")
    if b"\0" in name:
        raise LayerRejectedError(f"layer {what} {_show(name)}: NUL in path")
    parts = [part for part in name.split(b"/") if part not in (b"", b".")]
    if b".." in parts:
        raise LayerRejectedError(f"layer {what} {_show(name)}: '..' in path")
    for part in parts:
        if len(part) > fmt.NAME_MAX:
            raise LayerRejectedError(
                f"layer {what} {_show(name)}: a name of {len(part)} bytes (limit {fmt.NAME_MAX})"
            )
    if len(parts) > MAX_DEPTH:
        raise LayerRejectedError(
            f"layer {what} {_show(name)[:80]}...: {len(parts)} levels deep (limit {MAX_DEPTH})"
        )
    if sum(len(part) + 1 for part in parts) > MAX_PATH:
        raise LayerRejectedError(f"layer {what} {_show(name)[:80]}...: path over {MAX_PATH} bytes")
    return parts


def _show(name: bytes) -> str:
    return repr(name.decode("utf-8", "backslashreplace"))


class _Layer:
    """The tree being built from the tar's entries, in order (a later entry replaces an
    earlier one of the same name, as extracting the tar would)."""

    def __init__(self, out: BinaryIO) -> None:
        self.root = fmt.directory(0o755)
        self.out = out
        self.block = 1
        self.inodes = 1
        self.aufs_links: dict[bytes, Node] = {}

    def _new(self, node: Node) -> Node:
        self.inodes += 1
        if self.inodes > MAX_INODES:
            raise LayerRejectedError(f"layer has more than {MAX_INODES} inodes")
        return node

    def parent(self, parts: list[bytes], name: bytes) -> Node:
        """The directory holding `parts[-1]`, made (root-owned, 0755) where the tar did not
        list it; a whiteout on the way gives way to the directory."""
        node = self.root
        for part in parts[:-1]:
            assert node.children is not None
            child = node.children.get(part)
            if child is None or _is_whiteout(child):
                child = node.children[part] = self._new(fmt.directory(0o755))
            elif child.children is None:
                raise LayerRejectedError(
                    f"layer entry {_show(name)}: {_show(part)} on its path is not a directory"
                )
            node = child
        return node

    def lookup(self, parts: list[bytes]) -> Node | None:
        node = self.root
        for part in parts:
            if node.children is None:
                return None
            found = node.children.get(part)
            if found is None:
                return None
            node = found
        return node

    def add(self, entry: TarEntry, tar: TarReader) -> None:
        name = entry.name
        parts = _parts(name, "entry")
        meta = _meta(entry)
        if not parts:
            if entry.type != layertar.DIRECTORY:
                raise LayerRejectedError(f"layer entry {_show(name)}: the root is not a directory")
            _update_dir(self.root, meta)
            return
        if len(parts) == 2 and parts[0] == AUFS_LINKS and entry.has_data():
            # An AUFS hard-link target: no name in the tree, data for the links to it.
            self.aufs_links[parts[1]] = self._file(entry, meta, tar)
            return
        if self._overlay_marker(parts, name, meta):
            return
        base = parts[-1]
        parent = self.parent(parts, name)
        assert parent.children is not None
        existing = parent.children.get(base)
        kind = entry.type
        if kind == layertar.DIRECTORY:
            if existing is not None and existing.children is not None:
                _update_dir(existing, meta)
            else:
                node = self._new(fmt.directory(0o755))
                _update_dir(node, meta)
                parent.children[base] = node
            return
        if kind == layertar.HARDLINK:
            target_parts = _parts(entry.linkname, f"hard link {_show(name)} ->")
            if len(target_parts) == 2 and target_parts[0] == AUFS_LINKS:
                target = self.aufs_links.get(target_parts[1])
            else:
                target = self.lookup(target_parts)
            if target is None or target is self.root:
                raise LayerRejectedError(
                    f"layer hard link {_show(name)} -> {_show(entry.linkname)}: "
                    "no such entry before it"
                )
            if target.children is not None:
                raise LayerRejectedError(f"layer hard link {_show(name)}: to a directory")
            parent.children[base] = target
            return
        if entry.has_data():
            parent.children[base] = self._file(entry, meta, tar)
            return
        node = self._new(meta.node(0))
        if kind == layertar.SYMLINK:
            link = entry.linkname
            if not link or len(link) > MAX_SYMLINK or b"\0" in link:
                raise LayerRejectedError(
                    f"layer symlink {_show(name)}: a target of {len(link)} bytes"
                )
            node.mode = stat.S_IFLNK | 0o777
            node.target = link
        elif kind in (layertar.CHAR, layertar.BLOCKDEV):
            node.mode = (stat.S_IFCHR if kind == layertar.CHAR else stat.S_IFBLK) | meta.perm
            major, minor = entry.devmajor, entry.devminor
            if not (0 <= major < 1 << 12 and 0 <= minor < 1 << 20):
                raise LayerRejectedError(
                    f"layer device {_show(name)}: {major}:{minor} is not a Linux device number"
                )
            node.rdev = fmt.encode_dev(major, minor)
        else:
            assert kind == layertar.FIFO, kind
            node.mode = stat.S_IFIFO | meta.perm
        parent.children[base] = node

    def _overlay_marker(self, parts: list[bytes], name: bytes, meta: _Meta) -> bool:
        """Handle an OCI whiteout, an opaque marker or AUFS metadata (True), whatever the
        entry's tar type: a whiteout stored as a hard link is still a whiteout."""
        base = parts[-1]
        if any(part.startswith(AUFS_META) for part in parts[:-1]):
            return True  # inside AUFS metadata (.wh..wh.plnk/...): not part of the tree
        if base == OPAQUE:
            self.parent(parts, name).xattrs[OPAQUE_XATTR] = b"y"
            return True
        if base.startswith(AUFS_META):
            return True
        if not base.startswith(WHITEOUT):
            return False
        hidden = base[len(WHITEOUT) :]
        if hidden in (b"", b".", b".."):
            raise LayerRejectedError(f"layer entry {_show(name)}: a whiteout of no name")
        parent = self.parent(parts, name)
        assert parent.children is not None
        parent.children[hidden] = self._new(
            Node(mode=stat.S_IFCHR, uid=meta.uid, gid=meta.gid, mtime=meta.mtime)
        )
        return True

    def _file(self, entry: TarEntry, meta: _Meta, tar: TarReader) -> Node:
        """A regular file, its data written now: whole blocks from the next free one, the
        last zero-padded."""
        node = self._new(meta.node(stat.S_IFREG))
        node.size = entry.size
        if entry.size:
            node.blkaddr = self.block
            tar.copy_data(self.out)
            pad = -entry.size % BLOCK
            if pad:
                self.out.write(_ZEROS[:pad])
            self.block += (entry.size + pad) // BLOCK
            if self.block > fmt.MAX_BLOCKS:
                raise LayerRejectedError("layer: its files are over the 16 TiB EROFS holds")
        return node


@dataclass(frozen=True, slots=True)
class _Meta:
    perm: int
    uid: int
    gid: int
    mtime: int
    nsec: int
    xattrs: dict[bytes, bytes]

    def node(self, kind: int) -> Node:
        return Node(
            mode=kind | self.perm,
            uid=self.uid,
            gid=self.gid,
            mtime=self.mtime,
            mtime_nsec=self.nsec,
            xattrs=dict(self.xattrs),
        )


def _meta(entry: TarEntry) -> _Meta:
    if not (0 <= entry.uid <= 0xFFFFFFFF and 0 <= entry.gid <= 0xFFFFFFFF):
        raise LayerRejectedError(f"layer entry {_show(entry.name)}: uid/gid out of 32-bit range")
    xattrs: dict[bytes, bytes] = {}
    for xname, value in entry.xattrs.items():
        if xname.startswith(OVERLAY_XATTRS) or fmt.split_xattr(xname) is None:
            continue  # overlay's own markers, or a namespace Linux (and EROFS) cannot hold
        if len(value) > 0xFFFF or len(xname) > fmt.NAME_MAX:
            raise LayerRejectedError(
                f"layer entry {_show(entry.name)}: xattr {_show(xname)} too long"
            )
        xattrs[xname] = value
    # Times before 1970 are stored as 0 (EROFS keeps unsigned seconds).
    mtime, nsec = (entry.mtime, entry.mtime_nsec) if entry.mtime >= 0 else (0, 0)
    return _Meta(entry.mode & 0o7777, entry.uid, entry.gid, min(mtime, (1 << 63) - 1), nsec, xattrs)


def _update_dir(node: Node, meta: _Meta) -> None:
    opaque = node.xattrs.get(OPAQUE_XATTR)
    node.mode = stat.S_IFDIR | meta.perm
    node.uid, node.gid, node.mtime, node.mtime_nsec = meta.uid, meta.gid, meta.mtime, meta.nsec
    node.xattrs = dict(meta.xattrs)
    if opaque is not None:
        node.xattrs[OPAQUE_XATTR] = opaque


# ---- building ----------------------------------------------------------------------------------


def build_layer(blob: BinaryIO, out: BinaryIO, *, diff_id: str) -> ErofsBuild:
    """Read a layer blob as stored (gzip, zstd or a plain tar, told apart by their magic
    bytes), check its diff_id (the sha256 of the uncompressed tar) while reading, and write the
    uncompressed EROFS image to `out` (a regular file opened "w+b" at offset 0; the caller
    fsyncs and renames it, or deletes it on an error).

    Raises `LayerRejectedError` on a hostile or malformed layer (the message names the entry
    and the rule) or a diff_id mismatch; OSError from writing `out` (a full disk) as it is."""
    stream = _Uncompressed(blob)
    layer = _Layer(out)
    out.write(bytes(BLOCK))  # block 0: the superblock, written last
    try:
        tar = TarReader(stream.chunk)
        for entry in tar.entries():
            layer.add(entry, tar)
        actual = stream.drain()
    except TarError as e:
        raise LayerRejectedError(f"layer blob: {e}") from None
    finally:
        stream.close()
    if actual != diff_id:
        raise LayerRejectedError(f"layer blob uncompresses to {actual}, not its diff_id {diff_id}")
    try:
        _drop_redundant_whiteouts(layer.root)
        written = fmt.write_metadata(out, layer.root, start_block=layer.block, chunked=False)
    except FormatError as e:
        raise LayerRejectedError(f"layer {diff_id}: {e}") from None
    out.seek(0)
    out.write(fmt.superblock(written))
    return _finish(out)


def build_fsmeta(layers: Sequence[Path], out: BinaryIO) -> ErofsBuild:
    """The merged tree of `layers` (our layer images, bottom to top) as a metadata-only EROFS:
    whiteouts and opaque directories applied bottom to top (none remains in the result),
    directories and symlinks its own, regular files chunk-based with one 8-byte index per
    4 KiB block naming device 1..N (the layer) and the block there. Its device table gives
    each layer's block count and ``mapped_blkaddr``, where that layer starts on the disk that
    joins fsmeta then the layers bottom to top (`storage.vmdk`), so the guest mounts the joined
    disk with no ``device=`` options (the kernel's flattened multi-device mode).

    Memory: the merged tree's metadata (the layers' data is never read)."""
    merged = fmt.directory(0o755)
    sizes: list[int] = []
    for device, path in enumerate(layers, start=1):
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            tree, _sb = fmt.read_tree(fd, device=device)
        except FormatError as e:
            raise LayerRejectedError(f"layer image {path}: {e}") from None
        finally:
            os.close(fd)
        if size % BLOCK:
            raise LayerRejectedError(f"layer image {path}: {size} bytes is not whole blocks")
        sizes.append(size // BLOCK)
        _merge(merged, tree)
    try:
        written = fmt.write_metadata(
            out, merged, start_block=fmt.reserved_blocks(len(layers)), chunked=True
        )
    except FormatError as e:
        raise LayerRejectedError(f"fsmeta: {e}") from None
    devices = []
    mapped = written.blocks
    for blocks in sizes:
        devices.append((blocks, mapped))
        mapped += blocks
    if mapped > fmt.MAX_BLOCKS:
        raise LayerRejectedError("fsmeta: the joined disk would be over 16 TiB")
    out.seek(0)
    out.write(fmt.superblock(written, devices=devices))
    return _finish(out)


def _drop_redundant_whiteouts(root: Node) -> None:
    """Whiteouts in an opaque directory hide nothing the opaque marker does not hide already;
    they go, so that overlayfs, which lists a directory only one layer holds as stored (its
    whiteouts included), never shows a name that then does not exist."""
    stack = [root]
    while stack:
        node = stack.pop()
        assert node.children is not None
        if node.xattrs.get(OPAQUE_XATTR) == b"y":
            for name in [n for n, child in node.children.items() if _is_whiteout(child)]:
                del node.children[name]
        stack.extend(child for child in node.children.values() if child.children is not None)


def _is_whiteout(node: Node) -> bool:
    return node.kind == stat.S_IFCHR and node.rdev == 0


def _merge(lower: Node, upper: Node) -> None:
    """Lay `upper` (a layer's tree) over `lower` (the merge so far) as overlayfs would show
    them: the upper directory's attributes win, an opaque upper directory hides the lower's
    entries, a whiteout removes the name. Directories of the result are new nodes; files are
    the layer's own (so hard links stay one inode)."""
    stack = [(lower, upper)]
    while stack:
        low, up = stack.pop()
        assert low.children is not None and up.children is not None
        low.mode, low.uid, low.gid = up.mode, up.uid, up.gid
        low.mtime, low.mtime_nsec = up.mtime, up.mtime_nsec
        low.xattrs = {k: v for k, v in up.xattrs.items() if k != OPAQUE_XATTR}
        if up.xattrs.get(OPAQUE_XATTR) == b"y":
            low.children = {}
        for name, child in up.children.items():
            if _is_whiteout(child):
                low.children.pop(name, None)
                continue
            if child.children is not None:
                existing = low.children.get(name)
                if existing is None or existing.children is None:
                    existing = low.children[name] = fmt.directory(0o755)
                stack.append((existing, child))
            else:
                low.children[name] = child


def _finish(out: BinaryIO) -> ErofsBuild:
    """The finished image's size and digest, read back from `out` (the superblock in block 0
    is written last, so the sha256 cannot be taken while writing: this one read is the only
    one, and `storage.materializer` takes this digest from the default writer without
    reading the file again). Read into one reused buffer: no 200 allocations for 200 MiB."""
    out.flush()
    size = out.seek(0, os.SEEK_END)
    fd = out.fileno()
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    offset = 0
    while offset < size and (got := os.preadv(fd, [buffer], offset)):
        digest.update(view[:got])
        offset += got
    if offset != size:
        raise MaterializeError(f"image shrank while hashed: {offset} of {size} bytes read")
    return ErofsBuild(size=size, digest=f"sha256:{digest.hexdigest()}", blocks=size // BLOCK)


__all__ = ["MAX_DEPTH", "MAX_INODES", "ErofsBuild", "build_fsmeta", "build_layer"]
