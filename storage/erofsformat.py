"""The EROFS on-disk format as imageledger writes and reads it: a tree of `Node`s laid out as
inodes, directories, xattrs and chunk indexes, and read back from an image.

One subset of the format, the one microVM guests mount (learnt from the Linux kernel's
``fs/erofs/erofs_fs.h``): 4 KiB blocks, 64-byte extended inodes only, inline xattrs only (no
shared xattrs, no long prefixes), uncompressed data. Regular files of a layer image are
FLAT_PLAIN (whole blocks, the last zero-padded, so that fsmeta can point at them by block);
an fsmeta's regular files are CHUNK_BASED with 8-byte chunk indexes (one per 4 KiB block)
naming the device (the layer) that holds each block; directories and symlinks are FLAT_INLINE
when their tail fits in the block holding the inode, FLAT_PLAIN otherwise.

`write_metadata` writes the directory/symlink blocks and the metadata area of a tree whose
regular files already have their data placed; `superblock` packs block 0 (with the device
table of an fsmeta and the crc32c the kernel checks). `read_tree` reads an image written here
back into `Node`s (fsmeta merges the layers it reads).
"""

from __future__ import annotations

import os
import stat
import struct
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Final

BLOCK: Final = 4096
BLOCK_BITS: Final = 12
SUPER_OFFSET: Final = 1024
MAGIC: Final = 0xE0F5E1E2
SLOT: Final = 32
"""Inodes start on 32-byte slots; a nid is (offset in the metadata area) / 32."""
INODE_SIZE: Final = 64
DEVICE_SLOT: Final = 128
NAME_MAX: Final = 255
MAX_BLOCKS: Final = 0xFFFFFFFF
"""Block addresses are 32-bit: an image (and the joined disk) addresses at most 16 TiB."""

COMPAT_SB_CHKSUM: Final = 0x1
INCOMPAT_CHUNKED_FILE: Final = 0x4
INCOMPAT_DEVICE_TABLE: Final = 0x8
FLAT_PLAIN: Final = 0
FLAT_INLINE: Final = 2
CHUNK_BASED: Final = 4
CHUNK_INDEXES: Final = 0x20
"""Chunk format flag: 8-byte indexes (with a device id) instead of a 4-byte block map."""

XATTR_HEADER: Final = 12
_PREFIXES: Final = (
    # (index, prefix): longest first so that the ACL names win over a plain "system." match.
    (2, b"system.posix_acl_access"),
    (3, b"system.posix_acl_default"),
    (1, b"user."),
    (4, b"trusted."),
    (6, b"security."),
)
_PREFIX_BY_INDEX: Final = {index: prefix for index, prefix in _PREFIXES}

FT_REG, FT_DIR, FT_CHR, FT_BLK, FT_FIFO, FT_SOCK, FT_LNK = 1, 2, 3, 4, 5, 6, 7
_FILE_TYPES: Final = {
    stat.S_IFREG: FT_REG,
    stat.S_IFDIR: FT_DIR,
    stat.S_IFCHR: FT_CHR,
    stat.S_IFBLK: FT_BLK,
    stat.S_IFIFO: FT_FIFO,
    stat.S_IFSOCK: FT_SOCK,
    stat.S_IFLNK: FT_LNK,
}

_SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23x")
_INODE = struct.Struct("<HHHHQIIIIQII16x")
_XATTR_ENTRY = struct.Struct("<BBH")
_DIRENT = struct.Struct("<QHBx")
_CHUNK = struct.Struct("<HHI")
_DEVICE = struct.Struct("<64sIIHH52x")


class FormatError(ValueError):
    """A tree that this format cannot hold (the caller turns it into its own error)."""


# ---- crc32c ------------------------------------------------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_CRC32C: Final = _crc32c_table()


def crc32c_raw(data: bytes, seed: int = 0xFFFFFFFF) -> int:
    """CRC-32C (Castagnoli) as the kernel's ``crc32c(seed, data, len)`` computes it: no final
    inversion (the standard CRC-32C of `data` is this value XOR 0xFFFFFFFF). Table-driven and
    pure Python: it only ever runs over one superblock (3 KiB) per image."""
    crc = seed
    table = _CRC32C
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc


# ---- the tree ----------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class Node:
    """One inode. Names live in the parent's `children`; a hard link is one `Node` under
    several names. Regular files carry where their data is: `blkaddr` (first block, in this
    image for a layer, in layer `device` for an fsmeta) and `size`."""

    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    size: int = 0
    rdev: int = 0
    blkaddr: int = 0
    device: int = 0
    target: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    children: dict[bytes, Node] | None = None

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)


def directory(mode: int = 0o755) -> Node:
    """A new, empty directory (root-owned, mtime 0 until the tar says otherwise)."""
    return Node(mode=stat.S_IFDIR | (mode & 0o7777), children={})


def encode_dev(major: int, minor: int) -> int:
    """The kernel's ``new_encode_dev`` (what an inode's ``i_u.rdev`` holds)."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def split_xattr(name: bytes) -> tuple[int, bytes] | None:
    """(name index, suffix) of an xattr name, or None when EROFS has no short prefix for it
    (a name Linux could not set either, such as a macOS ``com.apple.*``)."""
    for index, prefix in _PREFIXES:
        if index in (2, 3):
            if name == prefix:
                return index, b""
        elif name.startswith(prefix) and len(name) > len(prefix):
            return index, name[len(prefix) :]
    return None


def xattr_body(xattrs: dict[bytes, bytes]) -> bytes:
    """The inline xattr body (header and entries, each 4-byte aligned), sorted by (index,
    suffix) for deterministic bytes; b"" when there are none."""
    if not xattrs:
        return b""
    entries = []
    for name, value in xattrs.items():
        split = split_xattr(name)
        if split is None:
            raise FormatError(f"xattr {name!r} has no EROFS name prefix")
        index, suffix = split
        if len(suffix) > NAME_MAX or len(value) > 0xFFFF:
            raise FormatError(f"xattr {name!r}: name or value too long")
        entries.append((index, suffix, value))
    parts = [bytes(XATTR_HEADER)]
    for index, suffix, value in sorted(entries):
        entry = _XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
        parts.append(entry + bytes(-len(entry) % 4))
    body = b"".join(parts)
    if (len(body) - XATTR_HEADER) // 4 + 1 > 0xFFFF:
        raise FormatError("inline xattrs over the 256 KiB an inode addresses")
    return body


def parse_xattrs(body: bytes) -> dict[bytes, bytes]:
    xattrs: dict[bytes, bytes] = {}
    pos = XATTR_HEADER + 4 * body[4]  # skip the shared xattr ids (never written here)
    while pos + _XATTR_ENTRY.size <= len(body):
        name_len, index, value_len = _XATTR_ENTRY.unpack_from(body, pos)
        start = pos + _XATTR_ENTRY.size
        name = _PREFIX_BY_INDEX[index] + body[start : start + name_len]
        xattrs[name] = body[start + name_len : start + name_len + value_len]
        pos += (_XATTR_ENTRY.size + name_len + value_len + 3) & ~3
    return xattrs


# ---- writing -----------------------------------------------------------------------------------


def _dir_blocks(names: list[bytes]) -> list[list[bytes]]:
    """`names` (sorted) packed into directory blocks: 12-byte dirents then the names."""
    blocks: list[list[bytes]] = [[]]
    used = 0
    for name in names:
        need = _DIRENT.size + len(name)
        if used + need > BLOCK:
            blocks.append([])
            used = 0
        blocks[-1].append(name)
        used += need
    return blocks


@dataclass(slots=True)
class _Placed:
    node: Node
    nid: int = 0
    nlink: int = 1
    layout: int = FLAT_PLAIN
    xattrs: bytes = b""
    tail: bytes = b""
    """What follows the inode inline (a symlink's target, a directory's last block)."""
    inline: int = 0
    """Its length, known before `tail` is (a directory's needs every nid)."""
    data_blocks: int = 0
    blkaddr: int = 0
    blocks_of_dir: list[list[bytes]] | None = None
    chunks: int = 0


def _order(root: Node) -> list[Node]:
    """Every inode once, breadth first, children by name: deterministic, and the root first
    (its nid must fit the superblock's 16 bits)."""
    seen: set[int] = {id(root)}
    order = [root]
    queue: deque[Node] = deque([root])
    while queue:
        node = queue.popleft()
        assert node.children is not None
        for name in sorted(node.children):
            child = node.children[name]
            if id(child) in seen:
                continue
            seen.add(id(child))
            order.append(child)
            if child.children is not None:
                queue.append(child)
    return order


@dataclass(frozen=True, slots=True)
class Written:
    blocks: int
    """Blocks of the whole image (its size / 4096) once the metadata is written."""
    meta_blkaddr: int
    root_nid: int
    inodes: int


def write_metadata(out: BinaryIO, root: Node, *, start_block: int, chunked: bool) -> Written:
    """Write, from block `start_block` of `out` on, the data blocks of directories and
    symlinks that do not fit inline, then the metadata area (every inode with its xattrs and
    inline tail or chunk indexes), zero-padded to a whole block.

    Regular files must already have `blkaddr` and `size` (`chunked`: as blocks of layer
    `device`, written as one chunk index per block; else as this image's FLAT_PLAIN blocks).
    Memory: per inode its placement and packed xattrs (directories: their names, grouped in
    blocks); directory blocks and inodes are packed and written one at a time, in 1 MiB
    writes, never the whole metadata area at once."""
    order = _order(root)
    if len(order) > 0xFFFFFFFF:
        raise FormatError(f"{len(order)} inodes: more than EROFS addresses")
    placed = {id(node): _Placed(node) for node in order}
    counted: dict[int, int] = {}
    for node in order:  # link counts: names for files, 2 + subdirectories for directories
        if node.children is None:
            continue
        p = placed[id(node)]
        p.nlink = 2
        for child in node.children.values():
            if child.children is not None:
                p.nlink += 1
            else:
                counted[id(child)] = counted.get(id(child), 0) + 1
    for key, count in counted.items():
        placed[key].nlink = count

    block = start_block
    for node in order:  # layouts; out-of-line directory and symlink blocks are written now
        p = placed[id(node)]
        p.xattrs = xattr_body(node.xattrs)
        kind = node.kind
        if node.children is not None:
            p.blocks_of_dir = _dir_blocks(sorted([b".", b"..", *node.children]))
            last = p.blocks_of_dir[-1]
            tail_len = sum(_DIRENT.size + len(n) for n in last)
            node.size = BLOCK * (len(p.blocks_of_dir) - 1) + tail_len
            if INODE_SIZE + len(p.xattrs) + tail_len <= BLOCK and tail_len < BLOCK:
                p.layout = FLAT_INLINE
                p.inline = tail_len
                p.data_blocks = len(p.blocks_of_dir) - 1
            else:
                p.data_blocks = len(p.blocks_of_dir)
            p.blkaddr = block if p.data_blocks else 0
            block += p.data_blocks
        elif kind == stat.S_IFLNK:
            node.size = len(node.target)
            if INODE_SIZE + len(p.xattrs) + node.size <= BLOCK:
                p.layout = FLAT_INLINE
                p.tail = node.target
                p.inline = node.size
            else:
                p.data_blocks = 1  # a target is at most 4095 bytes
                p.blkaddr = block
                out.seek(block * BLOCK)
                out.write(node.target + bytes(BLOCK - node.size))
                block += 1
        elif kind == stat.S_IFREG:
            if chunked:
                p.layout = CHUNK_BASED
                p.chunks = -(-node.size // BLOCK)
            p.blkaddr = node.blkaddr
    if block > MAX_BLOCKS:
        raise FormatError("image over 16 TiB")

    meta_blkaddr = block
    pos = SLOT  # slot 0 stays empty: no inode gets nid 0 (readers take 0 for "no inode")
    for node in order:  # nids: each inode with what follows it stays in one block if it can
        p = placed[id(node)]
        extra = p.inline
        head = INODE_SIZE + len(p.xattrs)
        if p.layout == CHUNK_BASED:
            extra = (-(pos + head) % 8) + 8 * p.chunks
        unit = head + extra
        if unit <= BLOCK and pos % BLOCK + unit > BLOCK:
            pos += -pos % BLOCK
        if p.layout == CHUNK_BASED:
            extra = (-(pos + head) % 8) + 8 * p.chunks
        p.nid = pos // SLOT
        pos += head + extra
        pos += -pos % SLOT

    parents = {id(root): root}
    for node in order:
        if node.children is not None:
            for child in node.children.values():
                if child.children is not None:
                    parents[id(child)] = node
    for node in order:  # directory blocks, now that every nid is known
        p = placed[id(node)]
        if p.blocks_of_dir is None:
            continue
        assert node.children is not None
        nids = {name: placed[id(child)].nid for name, child in node.children.items()}
        types = {name: _FILE_TYPES[child.kind] for name, child in node.children.items()}
        nids[b"."] = p.nid
        nids[b".."] = placed[id(parents[id(node)])].nid
        types[b"."] = FT_DIR
        types[b".."] = FT_DIR
        if p.data_blocks:
            out.seek(p.blkaddr * BLOCK)
        for i, names in enumerate(p.blocks_of_dir):
            data = _dir_block(names, nids, types)
            if i < p.data_blocks:
                out.write(data + bytes(BLOCK - len(data)))
            else:
                p.tail = data
    return _write_inodes(out, order, placed, meta_blkaddr)


def _dir_block(names: list[bytes], nids: dict[bytes, int], types: dict[bytes, int]) -> bytes:
    heads = []
    offset = _DIRENT.size * len(names)
    for name in names:
        heads.append(_DIRENT.pack(nids[name], offset, types[name]))
        offset += len(name)
    return b"".join(heads) + b"".join(names)


def _write_inodes(
    out: BinaryIO, order: list[Node], placed: dict[int, _Placed], meta_blkaddr: int
) -> Written:
    out.seek(meta_blkaddr * BLOCK)
    buf = bytearray()
    written = 0
    for ino, node in enumerate(order, start=1):
        p = placed[id(node)]
        offset = p.nid * SLOT
        if offset > written + len(buf):
            buf += bytes(offset - written - len(buf))
        if p.layout == CHUNK_BASED:
            i_u = CHUNK_INDEXES  # chunk bits 0: one chunk per block
        elif node.kind in (stat.S_IFCHR, stat.S_IFBLK):
            i_u = node.rdev
        elif node.kind in (stat.S_IFIFO, stat.S_IFSOCK):
            i_u = 0
        else:
            i_u = p.blkaddr
        icount = (len(p.xattrs) - XATTR_HEADER) // 4 + 1 if p.xattrs else 0
        buf += _INODE.pack(
            1 | (p.layout << 1),
            icount,
            node.mode & 0xFFFF,
            0,
            node.size,
            i_u,
            ino,
            node.uid,
            node.gid,
            node.mtime,
            node.mtime_nsec,
            p.nlink,
        )
        buf += p.xattrs
        if p.layout == CHUNK_BASED:
            buf += bytes(-(written + len(buf)) % 8)  # chunk indexes are 8-byte aligned
            dev = node.device
            base = node.blkaddr
            buf += b"".join(_CHUNK.pack(0, dev, base + i) for i in range(p.chunks))
        else:
            buf += p.tail
        if len(buf) >= 1 << 20:
            out.write(buf)
            written += len(buf)
            buf = bytearray()
    buf += bytes(-(written + len(buf)) % BLOCK)
    out.write(buf)
    written += len(buf)
    root_nid = placed[id(order[0])].nid
    return Written(meta_blkaddr + written // BLOCK, meta_blkaddr, root_nid, len(order))


def superblock(
    written: Written, *, devices: Sequence[tuple[int, int]] = (), uuid: bytes = bytes(16)
) -> bytes:
    """Block 0 through the end of the superblock's block: the superblock at 1024 with its
    crc32c (over the rest of block 0, as the kernel checks it), then for an fsmeta the device
    table (`devices`: (blocks, mapped_blkaddr) of each layer) at slot 9 (byte 1152) on, over as
    many blocks as it needs. Returns ``meta_blkaddr``-independent bytes: block 0 and, with
    more than 23 devices, the blocks after it (the caller reserved them)."""
    devt_slotoff = (SUPER_OFFSET + 128) // DEVICE_SLOT
    incompat = (INCOMPAT_CHUNKED_FILE | INCOMPAT_DEVICE_TABLE) if devices else 0
    table = b"".join(_DEVICE.pack(bytes(64), blocks, mapped, 0, 0) for blocks, mapped in devices)
    head = bytearray(devt_slotoff * DEVICE_SLOT + len(table))
    head += bytes(-len(head) % BLOCK)
    sb = _SUPER.pack(
        MAGIC,
        0,
        COMPAT_SB_CHKSUM,
        BLOCK_BITS,
        0,
        written.root_nid,
        written.inodes,
        0,
        0,
        written.blocks,
        written.meta_blkaddr,
        0,
        uuid,
        bytes(16),
        incompat,
        0,
        len(devices),
        devt_slotoff if devices else 0,
        0,
        0,
        0,
        0,
        0,
    )
    head[SUPER_OFFSET : SUPER_OFFSET + len(sb)] = sb
    head[devt_slotoff * DEVICE_SLOT : devt_slotoff * DEVICE_SLOT + len(table)] = table
    crc = crc32c_raw(bytes(head[SUPER_OFFSET:BLOCK]))
    head[SUPER_OFFSET + 4 : SUPER_OFFSET + 8] = crc.to_bytes(4, "little")
    return bytes(head)


def reserved_blocks(devices: int) -> int:
    """Blocks at the start of an image that `superblock` fills (block 0, and the device table
    beyond it when an fsmeta joins more than 23 layers)."""
    return -(-((SUPER_OFFSET + 128) + DEVICE_SLOT * devices) // BLOCK)


# ---- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Super:
    root_nid: int
    meta_blkaddr: int
    blocks: int
    inodes: int


def read_super(fd: int) -> Super:
    head = os.pread(fd, BLOCK, 0)
    if len(head) < BLOCK:
        raise FormatError("not an EROFS image: shorter than a block")
    fields = _SUPER.unpack_from(head, SUPER_OFFSET)
    if fields[0] != MAGIC or fields[3] != BLOCK_BITS:
        raise FormatError("not an EROFS image with 4 KiB blocks")
    if (
        crc32c_raw(head[SUPER_OFFSET : SUPER_OFFSET + 4] + bytes(4) + head[SUPER_OFFSET + 8 :])
        != (fields[1])
    ):
        raise FormatError("EROFS superblock checksum mismatch")
    return Super(root_nid=fields[5], meta_blkaddr=fields[10], blocks=fields[9], inodes=fields[6])


def read_tree(fd: int, *, device: int = 0) -> tuple[Node, Super]:
    """The tree of an image written by this module (a layer image), regular files pointing at
    their blocks (`device` recorded on each). Hard links come back as one `Node`.

    An image that is not what this module wrote (damaged on disk, or replaced by one of the
    same size) is a `FormatError`: no read goes past the file's end, so a size field gone
    wrong cannot make one huge buffer."""
    try:
        return _read_tree(fd, device)
    except FormatError:
        raise
    except (KeyError, IndexError, ValueError, OverflowError, struct.error) as e:
        raise FormatError(f"damaged EROFS metadata ({type(e).__name__}: {e})") from None


def _read_tree(fd: int, device: int) -> tuple[Node, Super]:
    sb = read_super(fd)
    base = sb.meta_blkaddr * BLOCK
    end = os.fstat(fd).st_size

    def pread(size: int, offset: int) -> bytes:
        if offset + size > end:
            raise FormatError(f"{size} bytes at {offset}: past the image's end ({end} bytes)")
        return os.pread(fd, size, offset)

    nodes: dict[int, Node] = {}

    def inode(nid: int) -> tuple[Node, int, int, int]:
        raw = pread(INODE_SIZE, base + nid * SLOT)
        if len(raw) < INODE_SIZE:
            raise FormatError(f"inode {nid} past the end of the image")
        fmt, icount, mode, _nb, size, i_u, _ino, uid, gid, mtime, nsec, _nlink = _INODE.unpack(raw)
        if not fmt & 1:
            raise FormatError(f"inode {nid}: compact inodes are not written by imageledger")
        layout = (fmt >> 1) & 7
        xsize = XATTR_HEADER + 4 * (icount - 1) if icount else 0
        xattrs = parse_xattrs(pread(xsize, base + nid * SLOT + INODE_SIZE)) if xsize else {}
        node = Node(mode=mode, uid=uid, gid=gid, mtime=mtime, mtime_nsec=nsec, size=size)
        node.xattrs = xattrs
        kind = stat.S_IFMT(mode)
        if kind not in _FILE_TYPES:
            raise FormatError(f"inode {nid}: mode {mode:o} is no kind of file")
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            node.rdev = i_u
        elif kind == stat.S_IFREG:
            if i_u * BLOCK + size > end:  # an fsmeta points at these blocks: they must exist
                raise FormatError(f"inode {nid}: a file's data past the image's end")
            node.blkaddr = i_u
            node.device = device
        return node, layout, xsize, i_u

    def data(nid: int, size: int, layout: int, xsize: int, blkaddr: int) -> bytes:
        full = size // BLOCK if layout == FLAT_INLINE else -(-size // BLOCK)
        body = pread(full * BLOCK, blkaddr * BLOCK) if full else b""
        if layout == FLAT_INLINE:
            body += pread(size - full * BLOCK, base + nid * SLOT + INODE_SIZE + xsize)
        return body[:size]

    root, layout, xsize, i_u = inode(sb.root_nid)
    nodes[sb.root_nid] = root
    queue: deque[tuple[Node, int, int, int, int]] = deque([(root, sb.root_nid, layout, xsize, i_u)])
    while queue:
        node, nid, layout, xsize, i_u = queue.popleft()
        node.children = {}
        body = data(nid, node.size, layout, xsize, i_u)
        for name, child_nid in _dirents(body):
            if name in (b".", b".."):
                continue
            if child_nid in nodes:
                child = nodes[child_nid]
                if child.children is not None:
                    raise FormatError(f"directory inode {child_nid} linked twice")
            else:
                child, c_layout, c_xsize, c_iu = inode(child_nid)
                nodes[child_nid] = child
                if child.kind == stat.S_IFDIR:
                    queue.append((child, child_nid, c_layout, c_xsize, c_iu))
                elif child.kind == stat.S_IFLNK:
                    if not 0 < child.size < BLOCK:
                        raise FormatError(f"inode {child_nid}: a symlink of {child.size} bytes")
                    child.target = data(child_nid, child.size, c_layout, c_xsize, c_iu)
            node.children[name] = child
    return root, sb


def _dirents(body: bytes) -> Iterator[tuple[bytes, int]]:
    for start in range(0, len(body), BLOCK):
        block = body[start : start + BLOCK]
        first_nameoff = _DIRENT.unpack_from(block, 0)[1]
        count = first_nameoff // _DIRENT.size
        heads = [_DIRENT.unpack_from(block, i * _DIRENT.size) for i in range(count)]
        for i, (nid, nameoff, _ft) in enumerate(heads):
            end = heads[i + 1][1] if i + 1 < count else len(block)
            yield block[nameoff:end].rstrip(b"\0"), nid
