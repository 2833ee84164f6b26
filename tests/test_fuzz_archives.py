"""Fuzzing both archive readers of `storage/archives.py`: tars (docker-archive, OCI archive;
plain, gzip'd, from a file or a stream) and OCI layout directories.

Inputs are real small archives built with `tools/imagebuild.py`, mutated entry by entry
(hostile names and link targets, other entry types, damaged or foreign JSON, headers that
announce more than they hold) and byte by byte, and layouts with links planted to a directory
beside the home. Whatever the input, `load` returns images whose blobs are all in the store,
or raises an `ImageLedgerError`; it never writes outside the home (the input and a sibling
directory with a canary file are compared, byte for byte, before and after), and a failed load
leaves the store as it found it.
"""

from __future__ import annotations

import bz2
import contextlib
import functools
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from imageledger.domain.errors import ArchiveError, ImageLedgerError
from imageledger.storage.archives import load
from imageledger.storage.blobs import BlobStore
from imageledger.tools.imagebuild import (
    BuiltImage,
    ImageSpec,
    TarEntry,
    build_docker_archive,
    build_image,
    build_oci_layout,
)

FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
MAX_ENTRY = 1024 * 1024  # a load's entry limit here: "huge" sizes are past it or truncated


# ---- material --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Material:
    """Real archives as lists of entries, and what hostile entries are made of."""

    images: tuple[BuiltImage, ...]
    archives: dict[str, tuple[TarEntry, ...]]  # style -> entries
    blobs: dict[str, bytes]
    layout: Path  # a real OCI layout directory (a template: copied, never loaded in place)


def _entries(tar: bytes) -> tuple[TarEntry, ...]:
    out: list[TarEntry] = []
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        for member in archive.getmembers():
            content = archive.extractfile(member) if member.isreg() else None
            data = content.read() if content is not None else b""
            out.append(TarEntry(member.name, data, member.type, member.linkname, member.mode))
    return tuple(out)


@functools.cache
def material() -> Material:
    """Built once per session: two images sharing a layer, in every archive style."""
    shared = {"etc/os-release": b"ID=fuzz\n"}
    first = build_image(ImageSpec(layers=(shared, {"a": b"1"}), names=("app:1", "reg.io/x/y:2")))
    second = build_image(
        ImageSpec(layers=(shared,), compression="none", architecture="arm64", names=("b:1",))
    )
    images = (first, second)
    work = Path(tempfile.mkdtemp(prefix="imageledger-fuzz-material-"))
    archives = {
        "docker-legacy": _entries(
            build_docker_archive(work / "legacy.tar", images).path.read_bytes()
        ),
        "docker25": _entries(
            build_docker_archive(work / "d25.tar", images, style="docker25").path.read_bytes()
        ),
    }
    layout = build_oci_layout(work / "layout", images).path
    oci: list[TarEntry] = []
    for path in sorted(layout.rglob("*")):
        name = path.relative_to(layout).as_posix()
        if path.is_dir():
            oci.append(TarEntry(name + "/", type=tarfile.DIRTYPE, mode=0o755))
        else:
            oci.append(TarEntry(name, path.read_bytes()))
    archives["oci"] = tuple(oci)
    multi = build_oci_layout(work / "multi", images, multi_arch=True, attestations=True).path
    archives["oci-multi"] = tuple(
        TarEntry(p.relative_to(multi).as_posix(), p.read_bytes())
        for p in sorted(multi.rglob("*"))
        if p.is_file()
    )
    blobs: dict[str, bytes] = {}
    for image in images:
        blobs.update(image.blobs)
    return Material(images, archives, blobs, layout)


# ---- the sandbox: a home, the input, and a sibling that must stay untouched -----------------


@dataclass(frozen=True)
class Sandbox:
    root: Path
    home: Path
    inputs: Path
    outside: Path


@contextmanager
def sandbox() -> Iterator[Sandbox]:
    root = Path(tempfile.mkdtemp(prefix="imageledger-fuzz-"))
    try:
        box = Sandbox(root, root / "home", root / "in", root / "outside")
        box.inputs.mkdir()
        (box.outside / "dir").mkdir(parents=True)
        (box.outside / "canary").write_bytes(b"canary\n")
        (box.outside / "dir" / "canary2").write_bytes(b"canary2\n")
        yield box
    finally:
        for path in root.rglob("*"):  # a fuzzed layout may hold read-only or odd entries
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)


def snapshot(root: Path, *, skip: Path) -> dict[str, Any]:
    """Every entry under `root` except `skip`: type, content hash or link target, mode."""
    found: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == skip:
            dirnames.clear()
            continue
        for name in dirnames + filenames:
            path = here / name
            if path == skip:
                continue
            info = path.lstat()
            key = path.relative_to(root).as_posix()
            if stat.S_ISLNK(info.st_mode):
                found[key] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                found[key] = ("file", info.st_mode, hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                found[key] = ("other", info.st_mode)
    return found


def store_files(home: Path) -> set[str]:
    """Regular files under the store's blobs/ and tmp/ (the ledger is not involved here)."""
    found: set[str] = set()
    for top in ("blobs", "tmp"):
        for dirpath, _, filenames in os.walk(home / top):
            for name in filenames:
                path = Path(dirpath) / name
                if path.is_file() and not path.is_symlink():
                    found.add(path.relative_to(home).as_posix())
    return found


def check_load(box: Sandbox, source: Path | io.BytesIO) -> None:
    """Load `source` into the sandbox's home and check the promises, whatever happens."""
    store = BlobStore(box.home)
    outside = snapshot(box.root, skip=box.home)
    before = store_files(box.home)
    try:
        loaded = load(source, store, max_entry_size=MAX_ENTRY)
    except ImageLedgerError as e:
        assert str(e)
        after = store_files(box.home)
        added = sorted(after - before)
        # A failed load leaves nothing behind; lock and lease files are the store's own.
        assert not [f for f in added if not f.startswith(("tmp/locks/", "tmp/leases/"))], added
    else:
        assert loaded
        for image in loaded:
            for digest, size in image.content.blobs:
                assert store.size(digest) == size
                assert store.verify(digest)
    assert snapshot(box.root, skip=box.home) == outside, "load wrote outside the home"


# ---- tars ------------------------------------------------------------------------------------


def raw_tar(entries: list[tuple[TarEntry, int | None]], *, end: bool = True) -> bytes:
    """A PAX tar of `entries`, each with an optional header size that differs from its data
    (announce more than is there: a huge or truncated entry)."""
    out = io.BytesIO()
    for entry, declared in entries:
        info = tarfile.TarInfo(entry.name)
        info.type = entry.type
        info.mode = entry.mode
        info.linkname = entry.linkname
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        data = entry.data if entry.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else b""
        info.size = len(data) if declared is None else declared
        out.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        out.write(data)
        out.write(b"\0" * (-len(data) % tarfile.BLOCKSIZE))
    if end:
        out.write(b"\0" * (2 * tarfile.BLOCKSIZE))
    return out.getvalue()


_HOSTILE_NAMES = [
    "../escape",
    "../outside/canary",
    "/abs/path",
    "/etc/passwd",
    "a/../../b",
    "./index.json",
    "blobs/sha256/../../../outside/canary",
    "blobs/sha256/" + "0" * 64,
    "blobs/sha512/" + "0" * 128,
    "blobs/sha256/short",
    "blobs",
    "",
    ".",
    "index.json/",
    "manifest.json",
    "oci-layout",
    "repositories",
    "x\x00y",
    "layer.tar",
    "d/" * 150 + "long",  # a PAX path record
    "blobs/sha256/\u00e9\udcff",  # not ASCII, not even UTF-8
]
_LINK_TARGETS = [
    "../../outside/canary",
    "../outside/canary",
    "/etc/passwd",
    "..",
    "../",
    "a/../../..",
    "index.json",
    "manifest.json",
    "",
    ".",
    "self",
]
_TYPES = [
    tarfile.REGTYPE,
    tarfile.SYMTYPE,
    tarfile.LNKTYPE,
    tarfile.DIRTYPE,
    tarfile.FIFOTYPE,
    tarfile.CHRTYPE,
    tarfile.BLKTYPE,
    tarfile.CONTTYPE,
    b"Z",
]


def _json_mutation(data: bytes, draw: st.DrawFn) -> bytes:
    """`data` (JSON) with one value somewhere replaced by something of another kind."""
    try:
        doc = json.loads(data)
    except ValueError:
        return data
    paths: list[tuple[Any, ...]] = []

    def walk(value: Any, prefix: tuple[Any, ...]) -> None:
        paths.append(prefix)
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, (*prefix, key))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, (*prefix, i))

    walk(doc, ())
    path = draw(st.sampled_from(paths))
    blob_names = sorted(material().blobs)
    new = draw(
        st.one_of(
            st.none(),
            st.integers(-3, 2**64),
            st.sampled_from(
                [
                    "",
                    "../../outside/canary",
                    "/etc/passwd",
                    "sha256:" + "0" * 64,
                    "blobs/sha256/../../outside/canary",
                    "application/vnd.oci.image.index.v1+json",
                    "application/vnd.oci.image.manifest.v1+json",
                    "\x1b[31mred",
                    *blob_names,
                ]
            ),
            st.lists(st.sampled_from(["../x", "a", "/b", *blob_names]), max_size=3),
            st.dictionaries(
                st.sampled_from(["os", "size", "digest", "x"]), st.integers(), max_size=2
            ),
        )
    )
    if not path:
        return json.dumps(new).encode()
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    if draw(st.booleans()):
        parent[path[-1]] = new
    elif isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent.pop(path[-1])
    return json.dumps(doc).encode()


@st.composite
def mutated_tars(draw: st.DrawFn) -> tuple[bytes, str]:
    """A real archive with entry-level mutations, then maybe compressed or byte-damaged."""
    style = draw(st.sampled_from(sorted(material().archives)))
    entries: list[tuple[TarEntry, int | None]] = [(e, None) for e in material().archives[style]]
    for _ in range(draw(st.integers(1, 4))):
        if not entries:
            entries.append((TarEntry("index.json", b"{}"), None))
        i = draw(st.integers(0, len(entries) - 1))
        entry, declared = entries[i]
        action = draw(
            st.sampled_from(
                ["json", "data", "name", "type", "link", "delete", "duplicate", "size", "insert"]
            )
        )
        if action == "json":
            entry = replace(entry, data=_json_mutation(entry.data, draw))
        elif action == "data":
            entry = replace(entry, data=draw(st.binary(max_size=64)))
        elif action == "name":
            entry = replace(entry, name=draw(st.sampled_from(_HOSTILE_NAMES)))
        elif action == "type":
            entry = replace(entry, type=draw(st.sampled_from(_TYPES)))
        elif action == "link":
            kind = draw(st.sampled_from([tarfile.SYMTYPE, tarfile.LNKTYPE]))
            target = draw(st.sampled_from([*_LINK_TARGETS, *(e.name for e, _ in entries)]))
            entry = replace(entry, type=kind, linkname=entry.name if target == "self" else target)
        elif action == "delete":
            del entries[i]
            continue
        elif action == "duplicate":
            entries.insert(draw(st.integers(0, len(entries))), (entry, declared))
        elif action == "size":
            declared = draw(st.sampled_from([0, len(entry.data) + 1, MAX_ENTRY + 1, 2**40, 8**11]))
        elif action == "insert":
            name = draw(st.sampled_from(_HOSTILE_NAMES))
            kind = draw(st.sampled_from(_TYPES))
            extra = TarEntry(
                name, draw(st.binary(max_size=16)), kind, draw(st.sampled_from(_LINK_TARGETS))
            )
            entries.insert(draw(st.integers(0, len(entries))), (extra, None))
            continue
        entries[i] = (entry, declared)
    data = raw_tar(entries, end=draw(st.booleans()))
    compression = draw(st.sampled_from(["none"] * 5 + ["gzip", "gzip", "bz2", "xz"]))
    if compression == "gzip":
        data = gzip.compress(data, mtime=0)
    elif compression == "bz2":
        data = bz2.compress(data)
    elif compression == "xz":
        data = lzma.compress(data)
    if draw(st.integers(0, 4)) == 0 and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + draw(st.binary(max_size=4)) + data[at + 1 :]
    if draw(st.integers(0, 6)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return data, style


def _valid_tar(style: str) -> bytes:
    return raw_tar([(e, None) for e in material().archives[style]])


@FUZZ
@given(mutated_tars(), st.booleans())
@example((_valid_tar("docker-legacy"), "docker-legacy"), False)
@example((_valid_tar("docker25"), "docker25"), True)
@example((_valid_tar("oci"), "oci"), False)
@example((_valid_tar("oci-multi"), "oci-multi"), True)
@example((raw_tar([(TarEntry("index.json", b"{}"), 2**40)]), "oci"), False)  # huge, truncated
@example((raw_tar([(TarEntry("x/layer.tar", b"ab"), MAX_ENTRY + 1)]), "docker-legacy"), True)
@example((b"", "oci"), False)
@example((b"\x1f\x8b\x08", "oci"), False)  # ends inside the gzip header: once a raw TypeError
@example((b"\x1f\x8b\x08\x00garbage", "oci"), True)
def test_mutated_tars_load_or_raise_a_package_error(case: tuple[bytes, str], stream: bool) -> None:
    data, _ = case
    with sandbox() as box:
        if stream:
            check_load(box, io.BytesIO(data))
        else:
            path = box.inputs / "archive.tar"
            path.write_bytes(data)
            check_load(box, path)


def test_the_unmutated_archives_load() -> None:
    # The mutations start from archives that load: every style, every image.
    for style in sorted(material().archives):
        with sandbox() as box:
            loaded = load(io.BytesIO(_valid_tar(style)), BlobStore(box.home))
            digests = {image.content.manifest_digest for image in loaded}
            if style not in {"docker-legacy", "docker25"}:
                assert digests == {image.manifest_digest for image in material().images}
            else:
                assert len(digests) == 2


@pytest.mark.parametrize(
    "entries",
    [
        [
            TarEntry(
                "blobs/sha256/" + "0" * 64, type=tarfile.SYMTYPE, linkname="../../../outside/canary"
            )
        ],
        [TarEntry("index.json", type=tarfile.LNKTYPE, linkname="/etc/passwd")],
        [TarEntry("../outside/canary", b"overwritten\n")],
        [TarEntry("/tmp/imageledger-fuzz-abs", b"x")],
        [
            TarEntry(
                "manifest.json",
                json.dumps([{"Config": "../outside/canary", "Layers": []}]).encode(),
            )
        ],
        [
            TarEntry("l", type=tarfile.SYMTYPE, linkname="../outside/canary"),
            TarEntry("manifest.json", json.dumps([{"Config": "l", "Layers": ["l"]}]).encode()),
        ],
        [
            TarEntry("a", type=tarfile.SYMTYPE, linkname="b"),
            TarEntry("b", type=tarfile.SYMTYPE, linkname="a"),
            TarEntry("manifest.json", json.dumps([{"Config": "a", "Layers": ["a"]}]).encode()),
        ],
    ],
)
def test_hostile_entries_are_refused_and_touch_nothing(entries: list[TarEntry]) -> None:
    with sandbox() as box:
        path = box.inputs / "hostile.tar"
        path.write_bytes(raw_tar([(e, None) for e in entries]))
        with pytest.raises(ArchiveError):
            load(path, BlobStore(box.home), max_entry_size=MAX_ENTRY)
        check_load(box, path)
        assert (box.outside / "canary").read_bytes() == b"canary\n"


# ---- layout directories ----------------------------------------------------------------------


@st.composite
def layout_mutations(draw: st.DrawFn) -> list[tuple[str, str, Any]]:
    """Changes to a copy of the real layout: (action, relative path, argument)."""
    files = sorted(
        p.relative_to(material().layout).as_posix() for p in material().layout.rglob("*")
    )
    paths = st.sampled_from([*files, "blobs/sha256/" + "0" * 64, "blobs/sha256/x", "index.json/x"])
    actions = st.sampled_from(
        [
            "symlink-out",
            "symlink-in",
            "hardlink-out",
            "json",
            "data",
            "delete",
            "fifo",
            "dir",
            "chmod",
        ]
    )
    return draw(
        st.lists(
            st.tuples(
                actions, paths, st.sampled_from(["canary", "dir", "dir/canary2", "nope", ".."])
            ),
            min_size=1,
            max_size=3,
        )
    )


def _apply(layout: Path, outside: Path, action: str, relative: str, arg: str, draw: Any) -> None:
    path = layout / relative
    if action != "dir" and not path.parent.is_dir():
        return
    if path.is_dir() and not path.is_symlink():
        if action in ("json", "data", "chmod", "hardlink-out", "fifo"):
            return
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    if action == "symlink-out":
        path.symlink_to(Path(os.path.relpath(outside / arg, path.parent)))
    elif action == "symlink-in":
        path.symlink_to("index.json" if relative != "index.json" else "oci-layout")
    elif action == "hardlink-out":
        target = outside / "canary"
        os.link(target, path)
    elif action == "json":
        original = material().layout / relative
        data = original.read_bytes() if original.is_file() else b"{}"
        path.write_bytes(_json_mutation(data, draw))
    elif action == "data":
        path.write_bytes(draw(st.binary(max_size=64)))
    elif action == "fifo":
        os.mkfifo(path)
    elif action == "dir":
        with contextlib.suppress(OSError):  # under a file: nothing to plant
            path.mkdir(parents=True, exist_ok=True)
    elif action == "chmod":
        path.write_bytes(b"{}")
        path.chmod(0)


@settings(FUZZ, max_examples=200)  # each example copies a layout: the slowest fuzz here
@given(layout_mutations(), st.data())
@example([("symlink-out", "blobs", "dir")], None)
@example([("symlink-out", "index.json", "canary")], None)
@example([("fifo", "index.json", "")], None)
@example([("hardlink-out", "oci-layout", "")], None)
def test_mutated_layouts_load_or_raise_a_package_error(
    mutations: list[tuple[str, str, str]], data: Any
) -> None:
    with sandbox() as box:
        layout = box.inputs / "layout"
        shutil.copytree(material().layout, layout)
        for action, relative, arg in mutations:
            _apply(layout, box.outside, action, relative, arg, data.draw if data else None)
        check_load(box, layout)


def test_hostile_layout_links_are_refused() -> None:
    for relative in ("index.json", "oci-layout", "blobs", "blobs/sha256"):
        with sandbox() as box:
            layout = box.inputs / "layout"
            shutil.copytree(material().layout, layout)
            target = layout / relative
            if target.is_dir():
                shutil.copytree(target, box.outside / "copy")
                shutil.rmtree(target)
                target.symlink_to(box.outside / "copy")
            else:
                shutil.copy(target, box.outside / "copy")
                target.unlink()
                target.symlink_to(box.outside / "copy")
            with pytest.raises(ArchiveError, match=r"symlink|outside"):
                load(layout, BlobStore(box.home))
            check_load(box, layout)


def test_a_file_where_a_layout_directory_should_be_is_a_missing_blob() -> None:
    # Once a raw NotADirectoryError: blobs/sha256 was a file, and looking a blob up under it
    # failed in lstat().
    with sandbox() as box:
        layout = box.inputs / "layout"
        shutil.copytree(material().layout, layout)
        shutil.rmtree(layout / "blobs" / "sha256")
        (layout / "blobs" / "sha256").write_bytes(b"not a directory")
        with pytest.raises(ArchiveError, match="not in the archive"):
            load(layout, BlobStore(box.home))
        check_load(box, layout)


def test_a_fifo_in_a_layout_is_refused_without_blocking() -> None:
    with sandbox() as box:
        layout = box.inputs / "layout"
        shutil.copytree(material().layout, layout)
        (layout / "index.json").unlink()
        os.mkfifo(layout / "index.json")
        with pytest.raises(ArchiveError, match="not a regular file"):
            load(layout, BlobStore(box.home))


# ---- through the cache -----------------------------------------------------------------------


@settings(FUZZ, max_examples=60)  # a ledger per example: fewer, the readers are fuzzed above
@given(mutated_tars())
def test_mutated_tars_through_the_cache(case: tuple[bytes, str]) -> None:
    """`ImageCache.load` as a user calls it (ledger, leases, the store lock): the same promises,
    and a failed load keeps no blob."""
    from imageledger.cache import ImageCache

    data, _ = case
    with sandbox() as box:
        path = box.inputs / "archive.tar"
        path.write_bytes(data)
        outside = snapshot(box.root, skip=box.home)
        cache = ImageCache(box.home)
        try:
            try:
                handles = cache.load(path)
            except ImageLedgerError as e:
                assert str(e)
                blobs = [f for f in store_files(box.home) if f.startswith("blobs/")]
                assert blobs == [], blobs
            else:
                assert handles
                assert all(cache.get(h.reference).manifest_digest for h in handles)
        finally:
            cache.close()
        assert snapshot(box.root, skip=box.home) == outside, "load wrote outside the home"
