"""fsmeta (storage.erofs.build_fsmeta) and the disk the VMDK joins, checked by real readers:
``fsck.erofs --device=<layer>... --extract`` of the fsmeta, and the kernel mounting the joined
disk (fsmeta then the layers, concatenated exactly as the VMDK descriptor's extents say) as
EROFS in its flattened multi-device mode, with no ``device=`` option, then an overlay with a
writable upper on it, as a microVM guest does. The merged tree a test expects is computed
from the tar entries by the OCI rules (`merged_model`), not by imageledger's code."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from imageledger.storage.erofs import build_fsmeta
from imageledger.storage.vmdk import vmdk_descriptor

if TYPE_CHECKING:
    import tests.test_erofs as layer_tests
    import tests.test_vmdk as vmdk_tests
else:
    import test_erofs as layer_tests
    import test_vmdk as vmdk_tests

# The layer tests' tar builder, expected trees, snapshots and real readers.
Attrs = layer_tests.Attrs
E = layer_tests.E
MTIME = layer_tests.MTIME
build = layer_tests.build
check_build = layer_tests.check_build
expected = layer_tests.expected
fsck_extract = layer_tests.fsck_extract
inode_groups = layer_tests.inode_groups
mounted = layer_tests.mounted
snapshot = layer_tests.snapshot
without_setid = layer_tests.without_setid
extents = vmdk_tests.extents

WH = b".wh."
OPQ = b".wh..wh..opq"


def merged_model(layers: Sequence[Sequence[E]], *, xattrs: bool) -> dict[bytes, Attrs]:
    """The tree a stack of layers shows, by the OCI image spec's rules, bottom to top: a
    whiteout ``.wh.NAME`` hides NAME and what is under it in the layers below, an opaque
    marker hides everything the layers below put in its directory, and an entry replaces what
    was at its path (a non-directory replacing a directory hides the directory's contents)."""
    tree: dict[bytes, Attrs] = {}
    for entries in layers:
        below = dict(tree)

        def under(prefix: bytes, keys: dict[bytes, Attrs]) -> list[bytes]:
            return [k for k in keys if k == prefix or k.startswith(prefix + b"/")]

        plain = []
        for e in entries:
            path = e.name.strip(b"/")
            parent, _, base = path.rpartition(b"/")
            if base == OPQ:
                for key in under(parent, below) if parent else list(below):
                    if key != parent:
                        tree.pop(key, None)
            elif base.startswith(WH):
                hidden = (parent + b"/" if parent else b"") + base[len(WH) :]
                for key in under(hidden, below):
                    tree.pop(key, None)
            else:
                plain.append(e)
        for path, attrs in expected(plain, xattrs=xattrs).items():
            if attrs[0] != "d" or tree.get(path, ("",))[0] != "d":
                for key in under(path, tree):
                    tree.pop(key, None)
            tree[path] = attrs
    return tree


def joined_disk(tmp: Path, fsmeta: Path, layers: Sequence[Path]) -> Path:
    """The disk the VMDK describes, made by copying each extent (sectors at its offset in its
    file) in the descriptor's order."""
    text = vmdk_descriptor([(str(p), p.stat().st_size) for p in (fsmeta, *layers)])
    disk = tmp / "disk.img"
    with disk.open("wb") as out:
        for sectors, path, offset in extents(text):
            with open(path, "rb") as f:
                f.seek(offset * 512)
                data = f.read(sectors * 512)
            assert len(data) == sectors * 512
            out.write(data)
    return disk


def stitch(tmp: Path, layers: Sequence[Sequence[E]]) -> tuple[Path, list[Path]]:
    images = [build(tmp, entries, name=f"layer{i}") for i, entries in enumerate(layers)]
    fsmeta = tmp / "fsmeta.erofs"
    with fsmeta.open("w+b") as out:
        result = build_fsmeta(images, out)
    check_build(fsmeta, result, devices=images)
    return fsmeta, images


def three_layers() -> list[list[E]]:
    big = os.urandom(20_000)
    return [
        [
            E(b"etc/", "dir", mode=0o755),
            E(b"etc/passwd", data=b"root:x:0:0\n"),
            E(b"etc/group", data=b"root:x:0:\n"),
            E(b"etc/hosts", data=b"127.0.0.1 one\n"),
            E(b"usr/", "dir", mode=0o755),
            E(b"usr/lib/", "dir", mode=0o755),
            E(b"usr/lib/a", data=b"a1"),
            E(b"usr/lib/b", data=b"b1", xattrs={"user.from": b"layer0"}),
            E(b"usr/bin/", "dir", mode=0o755),
            E(b"usr/bin/tool", data=big, mode=0o755),
            E(b"usr/bin/tool2", "hardlink", link=b"usr/bin/tool"),
            E(b"var/", "dir", mode=0o755),
            E(b"var/cache/", "dir", mode=0o755),
            E(b"var/cache/x", data=b"x"),
            E(b"var/cache/sub/", "dir", mode=0o755),
            E(b"var/cache/sub/y", data=b"y"),
            E(b"opt/", "dir", mode=0o755),
            E(b"opt/old", data=b"old"),
            E(b"keep/", "dir", mode=0o755),
            E(b"keep/link", "symlink", link=b"../etc/passwd"),
            E(b"dev/", "dir", mode=0o755),
            E(b"dev/null", "chr", mode=0o666, dev=(1, 3)),
            E(b"caf\xe9-\xff", data=b"a name that is not UTF-8", xattrs={"user.\xe9": b"v"}),
        ],
        [
            E(b"etc/", "dir", mode=0o700, uid=7, xattrs={"user.layer": b"1"}),
            E(b"etc/.wh.group"),
            E(b"etc/hosts", data=b"127.0.0.1 two\n"),
            E(b"etc/hosts.bak", "hardlink", link=b"etc/hosts"),
            E(b"etc/passwd", data=b"root:x:0:0\nu:x:1:1\n", xattrs={"trusted.v": b"2"}),
            E(b"var/", "dir", mode=0o755),
            E(b"var/cache/", "dir", mode=0o755),
            E(b"var/cache/.wh..wh..opq"),
            E(b"var/cache/new", data=b"n"),
            E(b"opt/", "dir", mode=0o755),
            E(b"opt/old/", "dir", mode=0o755),
            E(b"opt/old/inner", data=b"i"),
            E(b"usr/", "dir", mode=0o755),
            E(b"usr/lib/", "dir", mode=0o755),
            E(b"usr/lib/.wh.a", "hardlink", link=b"etc/.wh.group"),  # a whiteout as a hard link
        ],
        [
            E(b"etc/", "dir", mode=0o700, uid=7, xattrs={"user.layer": b"2"}),
            E(b"etc/group", data=b"root:x:0:\nnew:x:5:\n"),
            E(b"usr/", "dir", mode=0o755),
            E(b"usr/bin/", "dir", mode=0o755),
            E(b"usr/bin/.wh.tool"),
            E(b"opt/", "dir", mode=0o711),
            E(b"opt/.wh..wh..opq"),
            E(b"opt/fresh", data=b"f"),
            E(b"var/", "dir", mode=0o755),
            E(b"var/.wh.cache"),
            E(b"var/cache2", data=b"c2"),
            E(b".wh.nothing-below"),
            E(b"new/", "dir", mode=0o755),
            E(b"new/deep/", "dir", mode=0o755),
            E(b"new/deep/file", data=b"deep"),
        ],
    ]


def test_the_model_says_what_overlay_rules_say() -> None:
    tree = merged_model(three_layers(), xattrs=False)
    assert b"etc/group" in tree and b"usr/lib/a" not in tree and b"usr/bin/tool" not in tree
    assert b"usr/bin/tool2" in tree and b"opt/old" not in tree and b"opt/fresh" in tree
    assert b"var/cache" not in tree and b"var/cache/new" not in tree and b"var/cache2" in tree
    assert tree[b"etc"][:4] == ("d", 0o700, 7, 0)


def test_fsck_reads_the_merged_tree_through_the_layers(tmp_path: Path) -> None:
    layers = three_layers()
    fsmeta, images = stitch(tmp_path, layers)
    into = tmp_path / "x"
    fsck_extract(fsmeta, into, devices=images)
    model = merged_model(layers, xattrs=False)
    assert without_setid(snapshot(into, xattrs=False)) == without_setid(model)


def test_the_kernel_mounts_the_joined_disk_as_the_merged_tree(tmp_path: Path) -> None:
    layers = three_layers()
    fsmeta, images = stitch(tmp_path, layers)
    disk = joined_disk(tmp_path, fsmeta, images)
    with mounted(tmp_path, disk) as where:
        assert snapshot(where, xattrs=True) == merged_model(layers, xattrs=True)
        assert inode_groups(where) == [{b"etc/hosts", b"etc/hosts.bak"}]
        assert os.stat(where / "usr/bin/tool2").st_nlink == 1  # its other name whited out
        assert os.listxattr(where / "var") == []  # no overlay marker survives the merge
        statfs = os.statvfs(where)
        assert statfs.f_blocks == sum(p.stat().st_size for p in (fsmeta, *images)) // 4096


@contextlib.contextmanager
def mount(*args: str) -> Iterator[None]:
    where = args[-1]
    subprocess.run(["mount", *args], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", where], check=True)


def test_an_overlay_with_a_writable_upper_on_the_joined_disk(tmp_path: Path) -> None:
    layers = three_layers()
    fsmeta, images = stitch(tmp_path, layers)
    disk = joined_disk(tmp_path, fsmeta, images)
    with mounted(tmp_path, disk, "lower") as lower:
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        merged = tmp_path / "merged"
        merged.mkdir()
        with mount("-t", "tmpfs", "tmpfs", str(scratch)):
            (scratch / "upper").mkdir()
            (scratch / "work").mkdir()
            options = f"lowerdir={lower},upperdir={scratch}/upper,workdir={scratch}/work"
            with mount("-t", "overlay", "overlay", "-o", options, str(merged)):
                assert (merged / "etc/hosts").read_bytes() == b"127.0.0.1 two\n"
                (merged / "etc/hosts").write_bytes(b"changed\n")
                (merged / "usr/lib/b").unlink()
                (merged / "made").write_bytes(b"new")
                (merged / "opt/fresh").rename(merged / "opt/moved")
                assert (merged / "etc/hosts").read_bytes() == b"changed\n"
                assert sorted(os.listdir(merged / "usr/lib")) == []
                assert sorted(os.listdir(merged / "opt")) == ["moved"]
                assert (merged / "usr/bin/tool2").read_bytes() == (
                    lower / "usr/bin/tool2"
                ).read_bytes()
            # The read-only disk is untouched; the changes are in the upper.
            assert (lower / "etc/hosts").read_bytes() == b"127.0.0.1 two\n"
            assert (lower / "usr/lib/b").exists() and (lower / "opt/fresh").exists()
            assert (scratch / "upper/made").read_bytes() == b"new"


def overlay_snapshot(tmp: Path, images: Sequence[Path]) -> dict[bytes, Attrs]:
    """The tree the kernel's overlayfs shows with the layer images as its lower layers (the
    top one first), read-only: the kernel's own merge, as a second opinion on fsmeta's."""
    with contextlib.ExitStack() as stack:
        lowers = [
            stack.enter_context(mounted(tmp, image, f"{image.stem}-lower")) for image in images
        ]
        merged = tmp / "overlay"
        merged.mkdir()
        lowerdir = ":".join(str(p) for p in reversed(lowers))
        stack.enter_context(
            mount("-t", "overlay", "overlay", "-o", f"ro,lowerdir={lowerdir}", str(merged))
        )
        return snapshot(merged, xattrs=True, listed_whiteouts=True)


def test_overlayfs_over_the_layer_images_shows_what_fsmeta_shows(tmp_path: Path) -> None:
    layers = three_layers()
    fsmeta, images = stitch(tmp_path, layers)
    overlay = overlay_snapshot(tmp_path, images)
    with mounted(tmp_path, joined_disk(tmp_path, fsmeta, images), "disk") as disk:
        assert overlay == snapshot(disk, xattrs=True)
    assert overlay == merged_model(layers, xattrs=True)


def test_more_layers_than_block_0_holds_device_slots_for(tmp_path: Path) -> None:
    """30 layers: the device table runs past block 0 (23 slots fit there)."""
    layers = [
        [E(b"shared/", "dir", mode=0o755), E(b"shared/f%02d" % i, data=b"%d" % i * 5000)]
        for i in range(30)
    ]
    layers[-1].append(E(b"shared/.wh.f00"))
    fsmeta, images = stitch(tmp_path, layers)
    fsck_extract(fsmeta, tmp_path / "x", devices=images)
    model = merged_model(layers, xattrs=True)
    assert snapshot(tmp_path / "x", xattrs=False) == merged_model(layers, xattrs=False)
    with mounted(tmp_path, joined_disk(tmp_path, fsmeta, images)) as where:
        assert snapshot(where, xattrs=True) == model


def test_fsmeta_is_deterministic(tmp_path: Path) -> None:
    fsmeta, images = stitch(tmp_path, three_layers())
    again = tmp_path / "again.erofs"
    with again.open("w+b") as out:
        build_fsmeta(images, out)
    assert again.read_bytes() == fsmeta.read_bytes()


def test_an_empty_stack_and_a_single_layer(tmp_path: Path) -> None:
    layer = [E(b"a", data=b"a", mtime=MTIME)]
    fsmeta, images = stitch(tmp_path, [layer])
    with mounted(tmp_path, joined_disk(tmp_path, fsmeta, images)) as where:
        assert (where / "a").read_bytes() == b"a"
    empty = tmp_path / "empty.erofs"
    with empty.open("w+b") as out:
        result = build_fsmeta([], out)
    check_build(empty, result)
    with mounted(tmp_path, empty, "empty-mnt") as where:
        assert os.listdir(where) == []


def random_layer(rng: random.Random, prefix: bytes = b"", depth: int = 0) -> list[E]:
    """Entries over a small name space (a, b, c, three levels), so that whiteouts, opaque
    markers, replaced files and directories of different layers collide often."""
    entries: list[E] = []
    for name in (b"a", b"b", b"c"):
        path = prefix + name
        roll = rng.random()
        if roll < 0.3:
            continue
        if roll < 0.45:
            entries.append(E(prefix + WH + name))
        elif roll < 0.7 or depth == 2:
            entries.append(E(path, data=rng.randbytes(rng.choice([0, 5, 5000]))))
        else:
            entries.append(E(path + b"/", "dir", mode=rng.choice([0o755, 0o700])))
            if rng.random() < 0.3:
                entries.append(E(path + b"/" + OPQ))
            entries += random_layer(rng, path + b"/", depth + 1)
    return entries


@pytest.mark.parametrize("seed", range(8))
def test_random_stacks_merge_as_the_rules_say(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    layers = [random_layer(rng) for _ in range(3)]
    fsmeta, images = stitch(tmp_path, layers)
    fsck_extract(fsmeta, tmp_path / "x", devices=images)
    assert snapshot(tmp_path / "x", xattrs=False) == merged_model(layers, xattrs=False)
    with mounted(tmp_path, joined_disk(tmp_path, fsmeta, images)) as where:
        assert snapshot(where, xattrs=True) == merged_model(layers, xattrs=True)
    assert overlay_snapshot(tmp_path, images) == merged_model(layers, xattrs=True)
