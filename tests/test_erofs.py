"""Layer EROFS images (storage.erofs.build_layer), checked by real readers: Debian's
``fsck.erofs --extract`` (any ``<E>`` line is a failure: 1.5 exits 0 on a checksum mismatch)
and ``dump.erofs`` (hard-link identity: 1.5 extracts hard links as copies and no xattrs), and
the Linux kernel (loop-mounted read-only: names, types, modes, owners, times, bytes, link
targets, devices, hard links, xattrs). The trees a test expects are written down from the tar
entries it built, never read back through imageledger's own code.

The helpers here (tar building, expected trees, snapshots, mounts) serve tests/test_fsmeta.py
too.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imageledger.domain.errors import LayerRejectedError, MaterializeError
from imageledger.storage import erofs, erofsformat
from imageledger.storage.erofs import ErofsBuild, build_layer

MTIME = 1_700_000_000
# A valid VFS_CAP_REVISION_2 security.capability (cap_net_bind_service, effective): the
# kernel validates this xattr's shape when it is read.
CAPABILITY = bytes.fromhex("0100000200040000000000000000000000000000")
Kind = str  # "dir" | "file" | "symlink" | "hardlink" | "chr" | "blk" | "fifo"


@dataclass(frozen=True)
class E:
    """One tar entry a test writes; names and link targets are bytes (non-UTF-8 allowed)."""

    name: bytes
    kind: Kind = "file"
    data: bytes = b""
    link: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = MTIME
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)


_TYPES = {
    "dir": tarfile.DIRTYPE,
    "file": tarfile.REGTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def make_tar(entries: Sequence[E], tar_format: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar (PAX unless told) of `entries`, in order (xattrs as ``SCHILY.xattr.*``)."""
    buffer = io.BytesIO()
    with tarfile.open(
        fileobj=buffer,
        mode="w",
        format=tar_format,
        encoding="utf-8",
        errors="surrogateescape",
    ) as tar:
        for e in entries:
            info = tarfile.TarInfo(_text(e.name))
            info.type = _TYPES[e.kind]
            info.mode, info.uid, info.gid, info.mtime = e.mode, e.uid, e.gid, e.mtime
            info.uname = info.gname = ""
            info.linkname = _text(e.link)
            info.devmajor, info.devminor = e.dev
            info.pax_headers = {f"SCHILY.xattr.{k}": _text(v) for k, v in e.xattrs.items()}
            if e.kind == "file":
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def compress(raw: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(raw, compresslevel=1, mtime=0)
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=1).compress(raw)
    return raw


def diff_id(raw: bytes) -> str:
    return f"sha256:{hashlib.sha256(raw).hexdigest()}"


def build(tmp: Path, entries: Sequence[E], name: str = "layer", compression: str = "gzip") -> Path:
    """`entries` as a layer blob made into an EROFS image at tmp/<name>.erofs."""
    raw = make_tar(entries)
    image = tmp / f"{name}.erofs"
    with image.open("w+b") as out:
        result = build_layer(io.BytesIO(compress(raw, compression)), out, diff_id=diff_id(raw))
    check_build(image, result)
    return image


def check_build(image: Path, result: ErofsBuild, devices: Sequence[Path] = ()) -> None:
    """`result` tells the truth about `image`, and fsck.erofs extracts it (every image a test
    writes goes through here or through `check_with_fsck`)."""
    data = image.read_bytes()
    assert result.size == len(data)
    assert result.blocks * 4096 == len(data)
    assert result.digest == f"sha256:{hashlib.sha256(data).hexdigest()}"
    del data
    into = image.parent / f"{image.name}.fsck"
    fsck_extract(image, into, devices)
    shutil.rmtree(into)


# ---- what a tree should hold ---------------------------------------------------------------


Attrs = tuple[object, ...]


def expected(entries: Sequence[E], *, xattrs: bool) -> dict[bytes, Attrs]:
    """The tree a tar of plain entries (no whiteouts, no duplicates, parents listed first)
    unpacks to: path -> attributes, as `snapshot` reports them."""
    tree: dict[bytes, Attrs] = {}
    for e in entries:
        path = e.name.strip(b"/")
        xs = tuple(sorted((k.encode(), v) for k, v in e.xattrs.items())) if xattrs else ()
        if e.kind == "hardlink":
            tree[path] = tree[e.link.strip(b"/")]
            continue
        kind, perm, detail = {
            "dir": ("d", e.mode, ()),
            "file": ("f", e.mode, (len(e.data), hashlib.sha256(e.data).hexdigest(), e.mtime)),
            "symlink": ("l", 0o777, (e.link, e.mtime)),
            "chr": ("c", e.mode, (e.dev, e.mtime)),
            "blk": ("b", e.mode, (e.dev, e.mtime)),
            "fifo": ("p", e.mode, (e.mtime,)),
        }[e.kind]
        tree[path] = (kind, perm, e.uid, e.gid, *detail, xs)
    return tree


def hardlink_groups(entries: Sequence[E]) -> list[set[bytes]]:
    groups: dict[bytes, set[bytes]] = {}
    for e in entries:
        if e.kind == "hardlink":
            target = e.link.strip(b"/")
            groups.setdefault(target, {target}).add(e.name.strip(b"/"))
    return sorted(groups.values(), key=sorted)


def snapshot(root: Path, *, xattrs: bool, listed_whiteouts: bool = False) -> dict[bytes, Attrs]:
    """What a real file system (an extracted or a mounted tree) holds under `root`.

    `listed_whiteouts`: for overlayfs, which lists a directory that only one lower layer
    holds as that layer stores it, whiteouts included, while a lookup of such a name finds
    nothing: a listed name that does not exist is no part of the tree."""
    base = os.fsencode(root)
    tree: dict[bytes, Attrs] = {}
    stack = [b""]
    while stack:
        rel = stack.pop()
        for entry in os.scandir(os.path.join(base, rel) if rel else base):
            path = os.path.join(rel, entry.name) if rel else entry.name
            try:
                st = os.lstat(entry.path)
            except FileNotFoundError:
                if listed_whiteouts:
                    continue
                raise
            mode = st.st_mode
            xs: tuple[tuple[bytes, bytes], ...] = ()
            if xattrs:
                names = os.listxattr(entry.path, follow_symlinks=False)
                xs = tuple(
                    sorted(
                        (os.fsencode(n), os.getxattr(entry.path, n, follow_symlinks=False))
                        for n in names
                    )
                )
            owner = (stat.S_IMODE(mode), st.st_uid, st.st_gid)
            attrs: Attrs
            if stat.S_ISDIR(mode):
                attrs = ("d", *owner, xs)
                stack.append(path)
            elif stat.S_ISREG(mode):
                with open(entry.path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                attrs = ("f", *owner, st.st_size, digest, int(st.st_mtime), xs)
            elif stat.S_ISLNK(mode):
                attrs = ("l", *owner, os.readlink(entry.path), int(st.st_mtime), xs)
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                kind = "c" if stat.S_ISCHR(mode) else "b"
                dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
                attrs = (kind, *owner, dev, int(st.st_mtime), xs)
            else:
                assert stat.S_ISFIFO(mode), path
                attrs = ("p", *owner, int(st.st_mtime), xs)
            tree[path] = attrs
    return tree


def inode_groups(root: Path) -> list[set[bytes]]:
    """Names that share an inode (non-directories with more than one link) on a mount."""
    base = os.fsencode(root)
    by_inode: dict[int, set[bytes]] = {}
    for dirpath, _dirs, files in os.walk(base):
        for name in files:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if st.st_nlink > 1:
                by_inode.setdefault(st.st_ino, set()).add(os.path.relpath(full, base))
    return sorted(by_inode.values(), key=sorted)


# ---- the real readers ----------------------------------------------------------------------


def fsck_extract(image: Path, into: Path, devices: Sequence[Path] = ()) -> None:
    """``fsck.erofs --extract``: exit 0 and no ``<E>`` line anywhere in its output."""
    run = subprocess.run(
        ["fsck.erofs", *(f"--device={d}" for d in devices), f"--extract={into}", str(image)],
        capture_output=True,
        text=True,
        errors="replace",
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "<E>" not in run.stderr + run.stdout, run.stderr


def dump_nid(image: Path, path: bytes) -> tuple[int, int]:
    """(nid, links) of `path` as ``dump.erofs`` reads them."""
    run = subprocess.run(
        [b"dump.erofs", b"--path=/" + path, os.fsencode(image)], capture_output=True, check=False
    )
    assert run.returncode == 0, run.stderr
    words = run.stdout.split()
    return int(words[words.index(b"NID:") + 1]), int(words[words.index(b"Links:") + 1])


def without_setid(tree: dict[bytes, Attrs]) -> dict[bytes, Attrs]:
    """`tree` with set-user/group-ID bits cleared on non-directories: fsck.erofs 1.5 extracts
    by chmod then lchown, and the kernel clears those bits on a chown (the images keep them:
    the kernel mounts check every mode bit)."""
    setid = stat.S_ISUID | stat.S_ISGID
    return {
        path: attrs if attrs[0] == "d" else (attrs[0], int(str(attrs[1])) & ~setid, *attrs[2:])
        for path, attrs in tree.items()
    }


def check_with_fsck(tmp: Path, image: Path, entries: Sequence[E]) -> None:
    into = tmp / f"{image.stem}-extracted"
    fsck_extract(image, into)
    extracted = snapshot(into, xattrs=False)
    assert without_setid(extracted) == without_setid(expected(entries, xattrs=False))
    for group in hardlink_groups(entries):
        nids = {dump_nid(image, path) for path in group}
        assert len(nids) == 1 and next(iter(nids))[1] == len(group), (group, nids)


_MOUNTABLE: list[str] = []


def _mount_erofs(image: Path, where: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["mount", "-t", "erofs", "-o", "loop,ro", str(image), str(where)],
        capture_output=True,
        check=False,
        text=True,
    )


def mount_refusal(tmp: Path) -> str | None:
    """Why this machine cannot loop-mount EROFS (probed once with an image from Debian's
    mkfs.erofs, so a failure of ours is never mistaken for a missing permission)."""
    if _MOUNTABLE:
        return _MOUNTABLE[0] or None
    src = tmp / "probe-src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    image = tmp / "probe.erofs"
    reason = ""
    made = subprocess.run(
        ["mkfs.erofs", "--quiet", str(image), str(src)], capture_output=True, check=False
    )
    if made.returncode:
        reason = f"mkfs.erofs failed: {made.stderr!r}"
    else:
        where = tmp / "probe-mnt"
        where.mkdir()
        run = _mount_erofs(image, where)
        if run.returncode:
            reason = f"loop-mounting EROFS is not permitted here: {run.stderr.strip()}"
        else:
            subprocess.run(["umount", str(where)], check=True)
    _MOUNTABLE.append(reason)
    return reason or None


@contextlib.contextmanager
def mounted(tmp: Path, image: Path, name: str = "mnt") -> Iterator[Path]:
    """`image` loop-mounted read-only as EROFS (skips where mounting is not permitted);
    unmounted (and its loop device, autoclear, released) whatever happens."""
    reason = mount_refusal(tmp)
    if reason:
        pytest.skip(reason)
    where = tmp / name
    where.mkdir()
    run = _mount_erofs(image, where)
    assert run.returncode == 0, f"the kernel refused the image: {run.stderr}"
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def check_with_kernel(tmp: Path, image: Path, entries: Sequence[E]) -> None:
    with mounted(tmp, image, f"{image.stem}-mnt") as where:
        assert snapshot(where, xattrs=True) == expected(entries, xattrs=True)
        assert inode_groups(where) == hardlink_groups(entries)


# ---- shapes --------------------------------------------------------------------------------


def mixed_entries() -> list[E]:
    """Every kind of entry, the odd sizes around a block, owners, modes, xattrs, bytes."""
    return [
        E(b"bin/", "dir", mode=0o755),
        E(
            b"bin/sh",
            data=b"#!/bin/sh\n" * 3,
            mode=0o4755,
            xattrs={"security.capability": CAPABILITY},
        ),
        E(b"etc/", "dir", mode=0o750, uid=5, gid=6, xattrs={"user.dir": b"yes"}),
        E(b"etc/empty", data=b""),
        E(b"etc/block", data=os.urandom(4096)),
        E(b"etc/block+1", data=os.urandom(4097), uid=1000, gid=100, mode=0o600),
        E(b"etc/big", data=os.urandom(300_000), xattrs={"user.a": b"1", "trusted.t": b"\x00\xff"}),
        E(b"etc/hard", "hardlink", link=b"etc/block+1"),
        E(b"etc/hard2", "hardlink", link=b"etc/block+1"),
        E(b"etc/short", "symlink", link=b"block"),
        E(b"etc/long", "symlink", link=b"x/" * 2000, xattrs={"trusted.l": b"v" * 3000}),
        E(b"dev/", "dir", mode=0o755),
        E(b"dev/null", "chr", mode=0o666, dev=(1, 3)),
        E(b"dev/sda1", "blk", mode=0o660, dev=(8, 1), gid=6),
        E(b"dev/big", "chr", mode=0o600, dev=(4000, 300000)),
        E(b"run/", "dir", mode=0o1777),
        E(b"run/fifo", "fifo", mode=0o620),
        E(b"caf\xe9/", "dir", mode=0o755),
        E(b"caf\xe9/\xff\xfe name", data=b"latin-1 and invalid UTF-8 names stay bytes"),
        E(b"xattrs-heavy", data=b"x", xattrs={f"user.k{i:03d}": b"v" * i for i in range(120)}),
    ]


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_every_kind_of_entry_reads_back_through_fsck_and_the_kernel(
    tmp_path: Path, compression: str
) -> None:
    entries = mixed_entries()
    image = build(tmp_path, entries, compression=compression)
    check_with_fsck(tmp_path, image, entries)
    check_with_kernel(tmp_path, image, entries)


def test_the_image_does_not_depend_on_the_compression_and_is_deterministic(
    tmp_path: Path,
) -> None:
    entries = mixed_entries()
    raw = make_tar(entries)
    images = []
    for i, compression in enumerate(["gzip", "zstd", "none", "gzip"]):
        out = tmp_path / f"{i}.erofs"
        with out.open("w+b") as f:
            result = build_layer(io.BytesIO(compress(raw, compression)), f, diff_id=diff_id(raw))
        check_build(out, result)
        images.append(out.read_bytes())
    assert len(set(images)) == 1


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_streams_of_several_members_or_frames(tmp_path: Path, compression: str) -> None:
    """pigz and parallel zstd write several gzip members / zstd frames, and gzip(1) allows
    zero padding after the last member."""
    entries = mixed_entries()
    raw = make_tar(entries)
    cut = len(raw) // 3
    blob = b"".join(compress(part, compression) for part in (raw[:cut], raw[cut:]))
    if compression == "gzip":
        blob += bytes(100)
    image = tmp_path / "layer.erofs"
    with image.open("w+b") as out:
        check_build(image, build_layer(io.BytesIO(blob), out, diff_id=diff_id(raw)))
    check_with_fsck(tmp_path, image, entries)


def test_memory_stays_flat_with_a_big_file(tmp_path: Path) -> None:
    """A 256 MiB file (a tiny gzip blob of zeros) is built in a child process whose peak
    resident memory grows by far less than the file: data is written as it is read."""
    raw = make_tar([E(b"big", data=bytes(256 << 20))])
    blob = tmp_path / "blob"
    blob.write_bytes(gzip.compress(raw, compresslevel=1))
    layer_id = diff_id(raw)
    del raw
    code = (
        "import sys\n"
        "from imageledger.storage.erofs import build_layer\n"
        "def hwm():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmHWM:'):\n"
        "            return int(line.split()[1])\n"
        "before = hwm()\n"
        "with open(sys.argv[1], 'rb') as b, open(sys.argv[2], 'w+b') as o:\n"
        "    build_layer(b, o, diff_id=sys.argv[3])\n"
        "print(hwm() - before)\n"
    )
    out = tmp_path / "big.erofs"
    run = subprocess.run(
        [sys.executable, "-c", code, str(blob), str(out), layer_id],
        capture_output=True,
        text=True,
        check=True,
    )
    grown_kib = int(run.stdout)
    assert grown_kib < 48 * 1024, f"peak RSS grew by {grown_kib} KiB for a 256 MiB file"
    assert out.stat().st_size > 256 << 20
    fsck_extract(out, tmp_path / "x")
    assert (tmp_path / "x/big").stat().st_size == 256 << 20


def test_many_small_files_in_big_directories(tmp_path: Path) -> None:
    entries = [E(b"a/", "dir", mode=0o755)]
    entries += [E(b"a/f%05d-%s" % (i, b"n" * (i % 40)), data=b"%d" % i) for i in range(3000)]
    entries += [E(b"b/", "dir", mode=0o755)]
    for d in range(40):
        entries.append(E(b"b/%02d/" % d, "dir", mode=0o755))
        entries += [E(b"b/%02d/%03d" % (d, i), data=b"y" * i) for i in range(60)]
    image = build(tmp_path, entries)
    check_with_fsck(tmp_path, image, entries)
    check_with_kernel(tmp_path, image, entries)


@pytest.mark.parametrize("blocks", [1, 2])
def test_directories_that_fill_their_blocks_exactly(tmp_path: Path, blocks: int) -> None:
    """A directory of exactly 4096 or 8192 bytes has no tail to inline (12-byte dirents and
    their names, in name order: "." and ".." take 27 bytes, then 15 names of 255 bytes and one
    of 52 fill a block; 15 more of 255 and one of 79 fill the next)."""
    names = [b"a%03d" % i + b"n" * 251 for i in range(15)] + [b"b" * 52]
    if blocks == 2:
        names += [b"c%03d" % i + b"m" * 251 for i in range(15)] + [b"d" * 79]
    entries = [E(b"d/", "dir", mode=0o755)] + [E(b"d/" + n, data=b"") for n in names]
    image = build(tmp_path, entries)
    check_with_fsck(tmp_path, image, entries)
    with mounted(tmp_path, image) as where:
        assert os.stat(where / "d").st_size == 4096 * blocks
        assert sorted(os.listdir(os.fsencode(where / "d"))) == sorted(names)


REAL_TREES = ("/usr/share/zoneinfo", "/usr/lib/x86_64-linux-gnu/perl-base", "/usr/share/perl")


@pytest.mark.parametrize("source", REAL_TREES)
def test_a_real_directory_of_this_machine(tmp_path: Path, source: str) -> None:
    """A real tree (zoneinfo: many small files and symlinks; Perl's: deep packages), packed
    by tarfile as a layer builder would, reads back from the image as the directory is."""
    if not Path(source).is_dir():
        pytest.skip(f"{source} is not on this machine")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(source, arcname=".")
    raw = buffer.getvalue()
    image = tmp_path / "real.erofs"
    with image.open("w+b") as out:
        result = build_layer(io.BytesIO(gzip.compress(raw, 1)), out, diff_id=diff_id(raw))
    check_build(image, result)
    original = snapshot(Path(source), xattrs=True)
    into = tmp_path / "x"
    fsck_extract(image, into)
    assert without_setid(snapshot(into, xattrs=False)) == without_setid(
        snapshot(Path(source), xattrs=False)
    )
    with mounted(tmp_path, image) as where:
        assert snapshot(where, xattrs=True) == original


def test_a_deep_tree(tmp_path: Path) -> None:
    entries = []
    path = b""
    for depth in range(200):
        path += b"d%d/" % depth
        entries.append(E(path, "dir", mode=0o755))
        entries.append(E(path + b"f", data=b"%d" % depth))
    image = build(tmp_path, entries)
    check_with_fsck(tmp_path, image, entries)
    check_with_kernel(tmp_path, image, entries)


def test_directories_the_tar_does_not_list_are_made(tmp_path: Path) -> None:
    entries = [E(b"x/y/z", data=b"z"), E(b"./", "dir", mode=0o700, uid=3)]
    image = build(tmp_path, entries)
    with mounted(tmp_path, image) as where:
        assert (where / "x/y/z").read_bytes() == b"z"
        st = os.stat(where / "x/y")
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o755, 0)
        st = os.stat(where)
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700, 3)


def test_whiteouts_opaque_directories_and_aufs_metadata(tmp_path: Path) -> None:
    entries = [
        E(b"etc/", "dir", mode=0o755),
        E(b"etc/.wh.passwd", data=b""),
        E(b".wh..wh.plnk/", "dir", mode=0o700),
        E(b".wh..wh.plnk/123.456", data=b""),
        E(b".wh..wh.plnk/777.888", data=b"shared", mode=0o640),
        # AUFS kept hard-linked files' data in its link directory: both names get it.
        E(b"var/", "dir", mode=0o755),
        E(b"var/one", "hardlink", link=b".wh..wh.plnk/777.888"),
        E(b"var/two", "hardlink", link=b".wh..wh.plnk/777.888"),
        # A whiteout stored as a hard link (to AUFS's link directory, or another whiteout).
        E(b"etc/.wh.group", "hardlink", link=b".wh..wh.plnk/123.456"),
        E(b"etc/.wh.shadow", "hardlink", link=b"etc/.wh.passwd"),
        E(b"var/", "dir", mode=0o755),
        E(b"var/.wh..wh..opq", data=b""),
        E(b"var/kept", data=b"new"),
        E(b"var/.wh.old", data=b""),  # hides nothing the opaque marker does not: dropped
        E(b"opt/.wh..wh..opq", data=b""),
    ]
    image = build(tmp_path, entries)
    whiteout = ("c", 0, 0, 0, (0, 0), MTIME)
    shared = ("f", 0o640, 0, 0, 6, hashlib.sha256(b"shared").hexdigest(), MTIME, ())
    into = tmp_path / "x"
    fsck_extract(image, into)
    tree = snapshot(into, xattrs=False)
    assert tree == {
        b"etc": ("d", 0o755, 0, 0, ()),
        b"etc/passwd": (*whiteout, ()),
        b"etc/group": (*whiteout, ()),
        b"etc/shadow": (*whiteout, ()),
        b"var": ("d", 0o755, 0, 0, ()),
        b"var/kept": ("f", 0o644, 0, 0, 3, hashlib.sha256(b"new").hexdigest(), MTIME, ()),
        b"var/one": shared,
        b"var/two": shared,
        b"opt": ("d", 0o755, 0, 0, ()),
    }
    with mounted(tmp_path, image) as where:
        opaque = ((b"trusted.overlay.opaque", b"y"),)
        tree = snapshot(where, xattrs=True)
        assert tree[b"var"][-1] == opaque and tree[b"opt"][-1] == opaque
        assert tree[b"etc"][-1] == ()
        assert tree[b"etc/group"] == (*whiteout, ())
        assert inode_groups(where) == [{b"var/one", b"var/two"}]


def test_a_later_entry_replaces_an_earlier_one(tmp_path: Path) -> None:
    entries = [
        E(b"a", data=b"first"),
        E(b"b", "hardlink", link=b"a"),
        E(b"a", data=b"second"),  # b keeps the first inode
        E(b"d/", "dir", mode=0o700),
        E(b"d/x", data=b"x"),
        E(b"d/", "dir", mode=0o755),  # new attributes, same children
        E(b"gone/", "dir"),
        E(b"gone/y", data=b"y"),
        E(b"gone", "symlink", link=b"d"),
    ]
    image = build(tmp_path, entries)
    with mounted(tmp_path, image) as where:
        assert (where / "a").read_bytes() == b"second"
        assert (where / "b").read_bytes() == b"first"
        assert os.stat(where / "b").st_nlink == 1
        assert stat.S_IMODE(os.stat(where / "d").st_mode) == 0o755
        assert (where / "d/x").read_bytes() == b"x"
        assert os.readlink(where / "gone") == "d"
    fsck_extract(image, tmp_path / "x")


def test_overlay_xattrs_from_the_tar_and_foreign_namespaces_are_dropped(tmp_path: Path) -> None:
    entries = [
        E(b"d/", "dir", xattrs={"trusted.overlay.redirect": b"/etc", "user.ok": b"1"}),
        E(b"f", xattrs={"com.apple.provenance": b"x", "trusted.overlay.metacopy": b""}),
    ]
    image = build(tmp_path, entries)
    with mounted(tmp_path, image) as where:
        assert os.listxattr(where / "d") == ["user.ok"]
        assert os.listxattr(where / "f") == []


def test_gnu_ustar_and_pax_tars_of_one_tree_give_one_image(tmp_path: Path) -> None:
    """The tar dialects a layer comes in: GNU (long names as ``L``/``K`` entries, base-256
    numbers), POSIX ustar (a name prefix), PAX (records; a global header too)."""
    long_dir = b"d" * 90 + b"/" + b"e" * 90 + b"/"
    entries = [
        E(b"dir/", "dir", mode=0o755),
        E(long_dir.split(b"/")[0] + b"/", "dir", mode=0o755),
        E(long_dir, "dir", mode=0o700),
        E(long_dir + b"f" * 60, data=b"long", uid=0o7777777 + 1, gid=3),
        E(b"dir/link-" + b"l" * 120, "symlink", link=b"t" * 150),
        E(b"dir/hard", "hardlink", link=long_dir + b"f" * 60),
        E(b"dir/dev", "chr", dev=(10, 200), mode=0o600),
    ]
    images = set()
    for tar_format in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        raw = make_tar(entries, tar_format)
        with (tmp_path / "o").open("w+b") as f:
            result = build_layer(io.BytesIO(raw), f, diff_id=diff_id(raw))
        check_build(tmp_path / "o", result)
        images.add(result.digest)
    ustar = [  # names over 100 bytes go in the prefix field
        E(b"p" * 120 + b"/", "dir", mode=0o755),
        E(b"p" * 120 + b"/" + b"n" * 90, data=b"prefixed", uid=7),
        E(b"t", data=b"t"),
        E(b"p" * 120 + b"/h", "hardlink", link=b"t"),
    ]
    raw = make_tar(ustar, tarfile.USTAR_FORMAT)
    assert raw[257:263] == b"ustar\x00"
    image = build(tmp_path, ustar, "ustar", compression="none")
    check_with_fsck(tmp_path, image, ustar)
    assert len(images) == 1
    image = build(tmp_path, entries, "gnu", compression="none")
    check_with_kernel(tmp_path, image, entries)
    # A PAX global header applies to every entry after it.
    buffer = io.BytesIO()
    with tarfile.open(
        fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"mtime": "1234567890.5"}
    ) as tar:
        for name in ("a", "b"):
            info = tarfile.TarInfo(name)
            tar.addfile(info)
    raw = buffer.getvalue()
    out = tmp_path / "global.erofs"
    with out.open("w+b") as f:
        result = build_layer(io.BytesIO(raw), f, diff_id=diff_id(raw))
    check_build(out, result)
    with mounted(tmp_path, out, "global-mnt") as where:
        assert os.stat(where / "b").st_mtime_ns == 1234567890_500000000


def test_the_superblock_crc32c_is_castagnoli_as_the_kernel_computes_it() -> None:
    """The check value of CRC-32C (RFC 3720's polynomial) is 0xE3069283; the kernel's
    ``crc32c(~0, ...)`` leaves out the final inversion."""
    assert erofsformat.crc32c_raw(b"123456789") ^ 0xFFFFFFFF == 0xE3069283
    assert erofsformat.crc32c_raw(bytes(32)) ^ 0xFFFFFFFF == 0x8A9136AA  # RFC 3720 B.4


def test_bench_erofs_runs_from_the_command_line() -> None:
    """`imageledger bench erofs` (tiny sizes): both builders ran on the same tree and the
    report has its figures (no time is judged here)."""
    bench = ("bench", "erofs", "--size-mib", "2", "--rounds", "1", "--json")
    run = subprocess.run(
        [sys.executable, "-m", "imageledger.tools.cli", *bench],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(run.stdout)
    assert report["files"] > 10 and report["tree_mib"] == 2.0
    assert report["ours_image_mib"] >= report["tar_mib"] - 0.1 and report["mkfs_image_mib"] > 1
    assert report["ours_peak_rss_mib"] >= report["ours_rss_before_build_mib"] > 0
    assert isinstance(report["goal_met"], bool)


# ---- hostile layers ------------------------------------------------------------------------


HOSTILE: dict[str, list[E]] = {
    "absolute path": [E(b"/etc/passwd", data=b"x")],
    "dot-dot": [E(b"a/../../etc/passwd", data=b"x")],
    "hard link to a missing entry": [E(b"a", "hardlink", link=b"nowhere")],
    "hard link escaping": [E(b"a", data=b"x"), E(b"b", "hardlink", link=b"../a")],
    "hard link to a directory": [E(b"d/", "dir"), E(b"h", "hardlink", link=b"d")],
    "name over 255 bytes": [E(b"d/" + b"n" * 256, data=b"x")],
    "absurd depth": [E(b"d/" * (erofs.MAX_DEPTH + 1) + b"f", data=b"x")],
    "through a file": [E(b"f", data=b"x"), E(b"f/g", data=b"y")],
    "through a symlink": [E(b"l", "symlink", link=b"/etc"), E(b"l/passwd", data=b"y")],
    "empty symlink": [E(b"l", "symlink", link=b"")],
    "a whiteout of nothing": [E(b"d/.wh.", data=b"")],
    "root replaced by a file": [E(b"./", "file", data=b"x")],
    "device number Linux has not": [E(b"d", "chr", dev=(1, 1 << 20))],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers_are_refused_leaving_only_out(tmp_path: Path, case: str) -> None:
    raw = make_tar(HOSTILE[case])
    work = tmp_path / "work"
    work.mkdir()
    out = work / "layer.erofs"
    with out.open("w+b") as f, pytest.raises(LayerRejectedError) as caught:
        build_layer(io.BytesIO(gzip.compress(raw)), f, diff_id=diff_id(raw))
    assert isinstance(caught.value, MaterializeError)
    assert str(caught.value).startswith("layer")
    assert sorted(p.name for p in work.iterdir()) == ["layer.erofs"]


def test_a_blob_that_is_not_its_diff_id_is_refused(tmp_path: Path) -> None:
    raw = make_tar([E(b"f", data=b"x")])
    with (tmp_path / "o").open("w+b") as f, pytest.raises(LayerRejectedError, match="diff_id"):
        build_layer(io.BytesIO(raw), f, diff_id=diff_id(raw + b"\0"))


@pytest.mark.parametrize("damage", ["truncated gzip", "corrupt gzip", "corrupt zstd", "not a tar"])
def test_damaged_streams_are_refused(tmp_path: Path, damage: str) -> None:
    raw = make_tar([E(b"f", data=os.urandom(50_000))])
    blob = {
        "truncated gzip": gzip.compress(raw)[:-100],
        "corrupt gzip": gzip.compress(raw)[:20] + b"\xff" * 200 + gzip.compress(raw)[220:],
        "corrupt zstd": compress(raw, "zstd")[:30] + b"\xff" * 100,
        "not a tar": b"\x01" * 4096,
    }[damage]
    with (tmp_path / "o").open("w+b") as f, pytest.raises(LayerRejectedError):
        build_layer(io.BytesIO(blob), f, diff_id=diff_id(raw))


def _gzip_damage(raw: bytes, damage: str) -> bytes:
    """A gzip blob of `raw` whose deflate data is intact (so the tar, and its diff_id, would
    come out right): only the inflater's own checks can refuse it."""
    good = gzip.compress(raw, mtime=0)
    flipped = {"member CRC32": -8, "member length": -4}
    if damage in flipped:
        at = len(good) + flipped[damage]
        return good[:at] + bytes([good[at] ^ 1]) + good[at + 1 :]
    if damage == "header CRC16":  # FHCRC set, its check value wrong
        deflate = good[10:]
        header = b"\x1f\x8b\x08\x02" + bytes(6)
        crc16 = (zlib.crc32(header) + 1) & 0xFFFF
        return header + crc16.to_bytes(2, "little") + deflate
    if damage == "truncated second member":
        cut = len(raw) // 2
        second = gzip.compress(raw[cut:], mtime=0)
        return gzip.compress(raw[:cut], mtime=0) + second[: len(second) // 2]
    if damage == "junk after the last member":
        return good + b"not gzip at all, and longer than a header"
    assert damage == "a lone trailer byte after the last member"
    return good + b"\x1f"


@pytest.mark.parametrize(
    "damage",
    [
        "member CRC32",
        "member length",
        "header CRC16",
        "truncated second member",
        "junk after the last member",
        "a lone trailer byte after the last member",
    ],
)
def test_the_inflater_refuses_damage_the_diff_id_would_miss(tmp_path: Path, damage: str) -> None:
    """ISA-L inflates gzip layers (not zlib): it must refuse all that zlib refuses, here
    where the inflated bytes are the right tar, so the diff_id check would not catch it."""
    raw = make_tar([E(b"f", data=os.urandom(50_000)), E(b"g", data=b"text " * 20_000)])
    blob = _gzip_damage(raw, damage)
    with (tmp_path / "o").open("w+b") as f, pytest.raises(LayerRejectedError) as caught:
        build_layer(io.BytesIO(blob), f, diff_id=diff_id(raw))
    assert str(caught.value).startswith(
        ("layer blob: corrupt gzip stream", "layer blob: truncated gzip stream")
    )


def test_many_gzip_members_across_read_chunks(tmp_path: Path) -> None:
    """pigz-like blobs: many members (an empty one among them) whose boundaries fall
    anywhere in the inflater's reads, then zero padding; the image equals the one-member
    blob's."""
    entries = [*mixed_entries(), E(b"big", data=os.urandom(3 * erofs.READ_CHUNK))]
    raw = make_tar(entries)
    cuts = sorted({0, len(raw), *(len(raw) * k // 37 for k in range(37))})
    members = [gzip.compress(raw[a:b], compresslevel=1, mtime=0) for a, b in pairwise(cuts)]
    members.insert(5, gzip.compress(b"", mtime=0))
    images = []
    for i, blob in enumerate([b"".join(members) + bytes(3000), gzip.compress(raw, mtime=0)]):
        image = tmp_path / f"layer{i}.erofs"
        with image.open("w+b") as out:
            check_build(image, build_layer(io.BytesIO(blob), out, diff_id=diff_id(raw)))
        images.append(image.read_bytes())
    assert images[0] == images[1]
    check_with_fsck(tmp_path, tmp_path / "layer0.erofs", entries)


def raw_header(name: bytes, kind: bytes, size: int) -> bytes:
    """One hand-made ustar header block (for dialects tarfile will not write)."""
    header = bytearray(512)
    header[0 : len(name)] = name
    header[100:108] = b"0000644\0"
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"00000000000\0"
    header[148:156] = b" " * 8
    header[156:157] = kind
    header[257:265] = b"ustar\x0000"
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


@pytest.mark.parametrize(
    "tar",
    [
        pytest.param(raw_header(b"f", b"S", 0) + bytes(1024), id="GNU sparse file"),
        pytest.param(raw_header(b"f", b"x", 2 << 20) + bytes(2 << 20), id="PAX header over 1 MiB"),
        pytest.param(raw_header(b"f", b"x", 9) + b"9 path=\n".ljust(512, b"\0"), id="bad PAX"),
        pytest.param(raw_header(b"f", b"M", 0) + bytes(1024), id="GNU multi-volume"),
        pytest.param(raw_header(b"f", b"0", 5000) + bytes(600), id="truncated data"),
        pytest.param(raw_header(b"f", b"0", 5)[:300], id="truncated header"),
        pytest.param(
            raw_header(b"f", b"0", 0)[:10] + b"X" + raw_header(b"f", b"0", 0)[11:], id="checksum"
        ),
    ],
)
def test_tars_this_reader_does_not_take_are_refused(tmp_path: Path, tar: bytes) -> None:
    with (tmp_path / "o").open("w+b") as f, pytest.raises(LayerRejectedError, match="tar"):
        build_layer(io.BytesIO(tar), f, diff_id=diff_id(tar))


def test_more_inodes_than_the_format_addresses_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limit itself (2**32 inodes) cannot be reached in a test: the same check is run
    against a lowered limit."""
    monkeypatch.setattr(erofs, "MAX_INODES", 50)
    raw = make_tar([E(b"f%d" % i, data=b"") for i in range(60)])
    with (tmp_path / "o").open("w+b") as f, pytest.raises(LayerRejectedError, match="inodes"):
        build_layer(io.BytesIO(raw), f, diff_id=diff_id(raw))


# ---- random trees --------------------------------------------------------------------------

_names = st.binary(min_size=1, max_size=30).filter(
    lambda n: (
        b"/" not in n and b"\0" not in n and n not in (b".", b"..") and not n.startswith(b".wh.")
    )
)


@st.composite
def trees(draw: st.DrawFn) -> list[E]:
    """A random tree as tar entries: directories before what they hold, every kind of entry,
    random owners, modes, sizes around block boundaries, xattrs, hard links to earlier files."""
    entries: list[E] = []
    dirs = [b""]
    files: list[bytes] = []
    taken: set[bytes] = set()
    for _ in range(draw(st.integers(1, 40))):
        parent = draw(st.sampled_from(dirs))
        name = draw(_names)
        path = parent + name
        if path in taken:
            continue
        taken.add(path)
        kind = draw(st.sampled_from(["dir", "file", "file", "symlink", "hardlink", "chr", "fifo"]))
        if kind == "hardlink" and not files:
            kind = "file"
        base = E(
            path,
            kind,
            mode=draw(st.integers(0, 0o7777)),
            uid=draw(st.integers(0, 70000)),
            gid=draw(st.integers(0, 70000)),
            mtime=draw(st.integers(0, 2**33)),
            xattrs=draw(
                st.dictionaries(
                    # user.* only on files and directories: Linux reads it nowhere else.
                    st.sampled_from(
                        ["user.a", "user.bb", "trusted.x", "trusted.overlay_not"]
                        if kind in ("file", "dir")
                        else ["trusted.x", "trusted.y"]
                    ),
                    st.binary(max_size=300),
                    max_size=3,
                )
            ),
        )
        if kind == "dir":
            entries.append(replace(base, name=path + b"/", mode=base.mode | 0o700))
            dirs.append(path + b"/")
        elif kind == "file":
            size = draw(st.sampled_from([0, 1, 4095, 4096, 4097, 9000]))
            entries.append(replace(base, data=os.urandom(size)))
            files.append(path)
        elif kind == "symlink":
            link = draw(st.binary(min_size=1, max_size=200).filter(lambda b: b"\0" not in b))
            entries.append(replace(base, link=link))
        elif kind == "hardlink":
            entries.append(E(path, "hardlink", link=draw(st.sampled_from(files))))
        elif kind == "chr":
            dev = (draw(st.integers(0, 4095)), draw(st.integers(1, 2**20 - 1)))
            entries.append(replace(base, dev=dev))
        else:
            entries.append(base)
    return entries


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(entries=trees())
def test_random_trees_read_back_through_fsck_and_the_kernel(
    tmp_path_factory: pytest.TempPathFactory, entries: list[E]
) -> None:
    tmp = tmp_path_factory.mktemp("tree")
    image = build(tmp, entries)
    check_with_fsck(tmp, image, entries)
    check_with_kernel(tmp, image, entries)
