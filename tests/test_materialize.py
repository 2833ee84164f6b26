"""Materialization (issue 13) through the public API and the command line, on real files and a
real LMDB ledger: each layer as an EROFS image, the fsmeta and the VMDK, recorded in the
ledger (`LayerMaterialized`, `ImageStitched`), reported by `inspect`, deleted by `remove` and
`prune` when no remaining image needs them (counted as unlinked), spared while leased, hashed
by `verify`, rewritten when the home moves, written once by two processes at a time, and left
reclaimable by a SIGKILL mid-way. Every EROFS image written here passes Debian's
``fsck.erofs`` (deeper checks of the format are in the EROFS writer's own tests).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

import pytest

from imageledger import (
    Image,
    ImageCache,
    ImageNotFoundError,
    LayerRejectedError,
    MaterializedImage,
    MaterializeError,
)
from imageledger.storage.materializer import ErofsMaterializer
from imageledger.tools.imagebuild import (
    BuiltImage,
    ImageSpec,
    TarEntry,
    build_image,
    build_oci_archive,
    sha256,
    tar_bytes,
)

if TYPE_CHECKING:
    from imageledger import BuiltArtifact
    from tests.format_reader import read_history
    from tests.registry import Registry, push
else:
    from format_reader import read_history
    from registry import Registry, push

MIB = 1 << 20
TIMEOUT = 60.0  # for waiting only: nothing asserts how long anything took
BASE = "docker.io/test/base:1"
APP = "docker.io/test/app:1"
CLI = [sys.executable, "-m", "imageledger.tools.cli"]


@dataclass(frozen=True)
class Images:
    base: BuiltImage
    app: BuiltImage
    big: BuiltImage
    base_tar: Path
    app_tar: Path
    big_tar: Path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    """``test/base`` (2 layers) and ``test/app`` (3 layers, the bottom one shared with base);
    ``test/big`` has layers of a few MiB, so that a kill lands while one is being written."""
    rng = random.Random(13)
    where = tmp_path_factory.mktemp("images")
    shared = {
        "etc/os-release": b"ID=test\n",
        "usr/bin/tool": rng.randbytes(40_000),
        "usr/share/doc/readme": b"read me\n" * 100,
    }
    base = build_image(ImageSpec(layers=(shared, {"etc/base": b"base\n"}), names=("test/base:1",)))
    app = build_image(
        ImageSpec(
            layers=(
                shared,
                {"app/one": rng.randbytes(10_000), "app/conf/a.json": b"{}"},
                {"app/two": b"two\n", "etc/os-release": b"ID=app\n"},
            ),
            names=("test/app:1",),
        )
    )
    big = build_image(
        ImageSpec(
            layers=tuple({f"big/{i}/{j}": rng.randbytes(MIB) for j in range(3)} for i in range(4)),
            compression="none",
            names=("test/big:1",),
        )
    )
    assert base.layers[0].digest == app.layers[0].digest
    for name, image in (("base", base), ("app", app), ("big", big)):
        build_oci_archive(where / f"{name}.tar", [image])
    return Images(base, app, big, where / "base.tar", where / "app.tar", where / "big.tar")


@pytest.fixture
def home(tmp_path: Path, images: Images) -> Path:
    """A home holding base and app, nothing materialized."""
    home = tmp_path / "home"
    with ImageCache(home) as cache:
        cache.load(images.base_tar)
        cache.load(images.app_tar)
    return home


def fsck(image: Path, devices: Sequence[Path] = (), *, extract: Path | None = None) -> None:
    """Debian's fsck.erofs on `image` (with its extra devices, for an fsmeta): exit 0 and no
    ``<E>`` line (erofs-utils 1.5 exits 0 on a checksum mismatch)."""
    args = ["fsck.erofs", *(f"--device={d}" for d in devices)]
    if extract is not None:
        args.append(f"--extract={extract}")
    done = subprocess.run(
        [*args, str(image)], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "<E>" not in output, output


def files_under(directory: Path) -> dict[str, int]:
    """Every regular file below `directory`, relative path -> size."""
    if not directory.exists():
        return {}
    return {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def events_of(home: Path, kind: str) -> list[dict[str, Any]]:
    """The events of type `kind`, read from the ledger by the FORMAT.md reader."""
    return [e for e in read_history(home / "ledger") if e["type"] == kind]


def run_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "IMAGELEDGER_LOG_LEVEL": "error"},
    )


def check_materialized(image: MaterializedImage, tmp_path: Path) -> None:
    """Every file the result names exists, absolute, of its size; each layer image and the
    fsmeta (over the layers, as devices) pass fsck.erofs."""
    layers = [Path(layer.path) for layer in image.layers]
    for layer, path in zip(image.layers, layers, strict=True):
        assert path.is_absolute() and path.stat().st_size == layer.erofs_size_bytes
        fsck(path, extract=tmp_path / f"x-{path.stem[:12]}")
    fsmeta = Path(image.fsmeta)
    assert fsmeta.is_absolute() and fsmeta.stat().st_size == image.fsmeta_size_bytes
    fsck(fsmeta, layers)
    vmdk = Path(image.vmdk)
    assert vmdk.is_absolute() and vmdk.stat().st_size == image.vmdk_size_bytes
    descriptor = vmdk.read_text()
    for path in (fsmeta, *layers):
        assert str(path) in descriptor


# ------------------------------------------------------------------------- the API


def test_materialize_records_each_artifact_and_inspect_reports_their_sizes(
    home: Path, images: Images, tmp_path: Path
) -> None:
    with ImageCache(home) as cache:
        assert all(layer.erofs_size_bytes is None for layer in cache.inspect(APP).layers)
        done = cache.materialize("test/app:1")
        assert done.reference == APP and done.manifest_digest == images.app.manifest_digest
        assert [x.diff_id for x in done.layers] == [x.diff_id for x in images.app.layers]
        assert [x.blob_digest for x in done.layers] == [x.digest for x in images.app.layers]
        assert done.materializer == ErofsMaterializer.name
        assert done.written == 3 + 2  # three layer images, the fsmeta, the VMDK
        check_materialized(done, tmp_path)
        detail = cache.inspect(APP)
        assert [x.erofs_size_bytes for x in detail.layers] == [
            x.erofs_size_bytes for x in done.layers
        ]
        # Again: everything is recorded and on disk, so nothing is written or recorded.
        position = len(cache.history())
        again = cache.materialize(APP)
        assert again.written == 0 and again.layers == done.layers and again.vmdk == done.vmdk
        assert len(cache.history()) == position
        # base shares app's bottom layer: its image is the one already written.
        base = cache.materialize(BASE)
        assert base.layers[0] == done.layers[0]
        assert base.written == 1 + 2
        history = [(e.event, e.reference) for e in cache.history(APP)]
        assert history.count(("LayerMaterialized", APP)) == 3
        assert history.count(("ImageStitched", APP)) == 1
        assert cache.rebuild(verify=True).identical
        assert cache.verify().ok and cache.verify().artifacts_checked == 3 + 1 + 2 + 2
        usage = cache.df()["bytes"]
        assert usage["fsmeta"] == done.fsmeta_size_bytes + base.fsmeta_size_bytes
        assert usage["vmdk"] == done.vmdk_size_bytes + base.vmdk_size_bytes
        assert usage["artifact"] == sum(x.erofs_size_bytes for x in done.layers) + (
            base.layers[1].erofs_size_bytes
        )
    # The stored events, as FORMAT.md specifies them (a reader that imports nothing of ours).
    layers = events_of(home, "LayerMaterialized")
    assert [e["diff_id"] for e in layers[:3]] == [x.diff_id for x in images.app.layers]
    for event, layer in zip(layers, done.layers, strict=False):
        assert event["reference"] == APP
        assert event["blob_digest"] == layer.blob_digest
        path, digest, size = event["erofs"]
        assert (home / path).resolve() == Path(layer.path).resolve()
        assert (digest, size) == (layer.erofs_digest, layer.erofs_size_bytes)
        assert digest == sha256((home / path).read_bytes())
        assert event["materializer"] == ErofsMaterializer.name
    stitched = events_of(home, "ImageStitched")[0]
    assert stitched["manifest_digest"] == images.app.manifest_digest
    assert stitched["layers"] == [x.erofs_digest for x in done.layers]
    for field, path in (("fsmeta", done.fsmeta), ("vmdk", done.vmdk)):
        stored_path, digest, size = stitched[field]
        assert (home / stored_path).resolve() == Path(path).resolve()
        assert digest == sha256(Path(path).read_bytes()) and size == Path(path).stat().st_size


def test_an_image_not_cached_or_a_hostile_layer_is_refused_and_nothing_is_recorded(
    tmp_path: Path,
) -> None:
    hostile = tar_bytes([TarEntry("../escape", b"x"), TarEntry("etc/ok", b"ok")])
    image = build_image(ImageSpec(layers=({"etc/a": b"a"},), names=("test/bad:1",)))
    # The same image with its layer swapped for the hostile tar (the archive itself is fine:
    # loading does not read layer contents, materializing does).
    bad = _with_layer(image, hostile)
    build_oci_archive(tmp_path / "bad.tar", [bad])
    home = tmp_path / "home"
    with ImageCache(home) as cache:
        with pytest.raises(ImageNotFoundError):
            cache.materialize("test/none:1")
        cache.load(tmp_path / "bad.tar")
        before = len(cache.history())
        with pytest.raises(LayerRejectedError):
            cache.materialize("test/bad:1")
        assert len(cache.history()) == before
        assert files_under(home / "artifacts") == {}
        assert files_under(home / "tmp") == {}  # no work file, lease or lock left
    result = run_cli(home, "materialize", "test/bad:1")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    result = run_cli(home, "materialize", "test/none:1", "--json")
    assert result.returncode == 3 and result.stdout == "" and result.stderr.count("\n") == 1


def _with_layer(image: BuiltImage, raw: bytes) -> BuiltImage:
    """`image` rebuilt with one uncompressed layer `raw` (its diff_id that tar's digest)."""
    from imageledger.tools.imagebuild import BuiltLayer, build_config, json_bytes

    layer = BuiltLayer(raw, sha256(raw), sha256(raw), "application/vnd.oci.image.layer.v1.tar")
    config = build_config(image.spec, [layer.diff_id])
    manifest = json_bytes(
        {
            "schemaVersion": 2,
            "mediaType": image.manifest_media_type,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(config),
                "size": len(config),
            },
            "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": len(raw)}],
        }
    )
    return BuiltImage(
        image.spec,
        config,
        sha256(config),
        manifest,
        sha256(manifest),
        image.manifest_media_type,
        (layer,),
    )


def test_remove_and_prune_delete_what_no_image_needs_and_count_what_they_unlinked(
    home: Path,
) -> None:
    with ImageCache(home) as cache:
        app = cache.materialize(APP)
        base = cache.materialize(BASE)
        artifacts = home / "artifacts"
        before = files_under(artifacts)
        assert len(before) == 4 + 4  # 4 distinct layers, 2 fsmeta, 2 vmdk

        cache.remove(APP)
    after = files_under(artifacts)
    gone = {k: v for k, v in before.items() if k not in after}
    removed = events_of(home, "ImageRemoved")[-1]
    deleted = {d[0][len("artifacts/") :]: d for d in removed["deleted"] if "/" in d[0]}
    assert set(deleted) == set(gone)
    assert sorted(d[1] for d in deleted.values()) == ["artifact", "artifact", "fsmeta", "vmdk"]
    assert all(deleted[k][2] == size for k, size in gone.items())
    # The shared bottom layer's image stays: base needs it.
    assert Path(base.layers[0].path).exists() and Path(app.layers[0].path).exists()
    assert not Path(app.layers[1].path).exists() and not Path(app.vmdk).exists()

    with ImageCache(home) as cache:
        report = cache.prune()
        left = files_under(artifacts)
        assert left == {}
        unlinked = {k: v for k, v in after.items() if k not in left}
        assert report.fsmeta_removed == 1 and report.vmdk_removed == 1
        assert report.layers_removed == 2  # the layer blobs; their images are `artifact`s
        assert sum(1 for d in report.deleted if d.kind == "artifact") == 2
        blobs = sum(d.size for d in report.deleted if not d.by_path)
        assert report.bytes_reclaimed == blobs + sum(unlinked.values())
        assert cache.rebuild(verify=True).identical


def test_a_leased_image_keeps_its_artifacts_while_the_lease_lives(home: Path) -> None:
    with ImageCache(home) as cache:
        done = cache.materialize(APP)
        cache.use(APP, "sandbox-1")
        before = files_under(home / "artifacts")
        report = cache.prune()
        assert report.fsmeta_removed == report.vmdk_removed == 0
        cache.remove(APP, force=True)  # the name goes; the content stays while leased
        cache.prune()
        assert files_under(home / "artifacts") == before
        assert Path(done.vmdk).exists() and Path(done.fsmeta).exists()
        cache.release("sandbox-1")
        cache.prune()
        assert not Path(done.vmdk).exists() and not Path(done.layers[2].path).exists()


def test_prune_reclaims_artifacts_the_ledger_does_not_record(home: Path) -> None:
    with ImageCache(home) as cache:
        done = cache.materialize(APP)
        stray = home / "artifacts" / "layers" / ("ab" * 32 + ".erofs")
        stray.write_bytes(b"s" * 1000)
        report = cache.prune(keep=["test/*"])
        assert [(d.digest, d.kind, d.size) for d in report.deleted] == [
            ("artifacts/layers/" + stray.name, "artifact", 1000)
        ]
        assert not stray.exists() and all(Path(x.path).exists() for x in done.layers)


def test_verify_rehashes_artifacts_and_repair_lets_materialize_write_them_again(
    home: Path,
) -> None:
    with ImageCache(home) as cache:
        done = cache.materialize(APP)
    target = Path(done.layers[1].path)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    result = run_cli(home, "verify", "--json")
    assert result.returncode == 1, result.stderr
    problems = json.loads(result.stdout)["problems"]
    relative = str(target.relative_to(home))
    assert [(p["digest"], p["kind"], p["problem"]) for p in problems] == [
        (relative, "artifact", "corrupt")
    ]
    assert problems[0]["references"] == [APP]
    with ImageCache(home) as cache:
        check = cache.verify(repair=True)
        assert [p.repaired for p in check.problems] == [True] and not target.exists()
        again = cache.materialize(APP)
        assert again.written == 1 and again.layers == done.layers  # the same bytes
        assert cache.verify().ok


def test_a_moved_home_gets_its_vmdk_rewritten(home: Path, tmp_path: Path) -> None:
    with ImageCache(home) as cache:
        first = cache.materialize(APP)
    moved = tmp_path / "elsewhere"
    os.rename(home, moved)
    with ImageCache(moved) as cache:
        again = cache.materialize(APP)
    assert again.written == 1  # the VMDK only: the layers and fsmeta did not change
    descriptor = Path(again.vmdk).read_text()
    assert str(moved) in descriptor and str(home) + "/" not in descriptor
    assert Path(again.vmdk).parent == moved / "artifacts" / "images"
    assert [x.erofs_digest for x in again.layers] == [x.erofs_digest for x in first.layers]
    stitched = events_of(moved, "ImageStitched")
    assert len(stitched) == 2 and stitched[0]["fsmeta"] == stitched[1]["fsmeta"]
    assert stitched[0]["vmdk"][1] != stitched[1]["vmdk"][1]
    assert len(events_of(moved, "LayerMaterialized")) == 3


class AcmeMaterializer:
    """An embedder's own materializer: the default writers under its own name."""

    name = "acme-erofs/2"

    def __init__(self, lie: bool = False) -> None:
        self.inner = ErofsMaterializer()
        self.lie = lie

    def build_layer(self, blob: BinaryIO, out: BinaryIO, *, diff_id: str) -> BuiltArtifact:
        built = self.inner.build_layer(blob, out, diff_id=diff_id)
        if self.lie:
            out.write(b"extra")  # not what it reports
        return built

    def build_fsmeta(self, layers: Sequence[os.PathLike[str]], out: BinaryIO) -> BuiltArtifact:
        return self.inner.build_fsmeta(layers, out)

    def vmdk_descriptor(self, extents: Sequence[tuple[str, int]]) -> str:
        return self.inner.vmdk_descriptor(extents)


def test_an_embedders_materializer_is_recorded_and_checked(home: Path, tmp_path: Path) -> None:
    with (
        ImageCache(home, materializer=AcmeMaterializer(lie=True)) as cache,
        pytest.raises(MaterializeError, match="the file holds"),
    ):
        cache.materialize(APP)
    assert events_of(home, "LayerMaterialized") == []
    assert files_under(home / "artifacts") == {}
    with ImageCache(home, materializer=AcmeMaterializer()) as cache:
        done = cache.materialize(APP)
    assert done.materializer == "acme-erofs/2"
    check_materialized(done, tmp_path)
    recorded = events_of(home, "LayerMaterialized") + events_of(home, "ImageStitched")
    assert {e["materializer"] for e in recorded} == {"acme-erofs/2"}
    with ImageCache(home) as cache:
        history = cache.history(APP)
        assert any("acme-erofs/2" in e.detail for e in history if e.event == "ImageStitched")


class LyingSubclass(ErofsMaterializer):
    """The default writers, subclassed: a subclass may override what it writes, so it is
    not the default the cache takes at its word."""

    def build_layer(self, blob: BinaryIO, out: BinaryIO, *, diff_id: str) -> BuiltArtifact:
        built = super().build_layer(blob, out, diff_id=diff_id)
        out.seek(4096)
        out.write(b"changed after its digest was taken")  # same size, other bytes
        return built


def test_only_the_default_materializer_itself_is_taken_at_its_digest(home: Path) -> None:
    """The default's digest is its own read-back of the finished file, so the cache does
    not read the file again; a subclass's is re-read and its lie refused."""
    with (
        ImageCache(home, materializer=LyingSubclass()) as cache,
        pytest.raises(MaterializeError, match="the file holds"),
    ):
        cache.materialize(APP)
    assert events_of(home, "LayerMaterialized") == []
    with ImageCache(home) as cache:
        done = cache.materialize(APP)
        # What was recorded unread is what is on disk: verify hashes every artifact.
        report = cache.verify()
    assert report.ok and report.artifacts_checked == len(done.layers) + 2  # fsmeta, VMDK
    for layer in done.layers:
        data = Path(layer.path).read_bytes()
        assert f"sha256:{hashlib.sha256(data).hexdigest()}" == layer.erofs_digest


# ------------------------------------------------------------------------- the CLI


def test_cli_materialize_json_and_load_materialize(images: Images, tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = run_cli(home, "load", str(images.app_tar), "--materialize")
    assert result.returncode == 0, result.stderr
    result = run_cli(home, "materialize", "test/app:1", "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert list(shown) == ["reference", "vmdk", "fsmeta", "layers"]
    assert shown["reference"] == APP
    assert [list(x) for x in shown["layers"]] == [["diff_id", "path", "erofs_size_bytes"]] * 3
    assert [x["diff_id"] for x in shown["layers"]] == [x.diff_id for x in images.app.layers]
    for path in (shown["vmdk"], shown["fsmeta"], *(x["path"] for x in shown["layers"])):
        assert Path(path).is_absolute() and Path(path).is_file()
    assert [x["erofs_size_bytes"] for x in shown["layers"]] == [
        Path(x["path"]).stat().st_size for x in shown["layers"]
    ]
    # Everything was materialized by the load: this run wrote and recorded nothing more.
    assert len(events_of(home, "LayerMaterialized")) == 3
    inspect = json.loads(run_cli(home, "inspect", APP).stdout)
    assert [x["erofs_size_bytes"] for x in inspect["layers"]] == [
        x["erofs_size_bytes"] for x in shown["layers"]
    ]
    events = run_cli(home, "events", "--type", "ImageStitched", "--json")
    stitched = [json.loads(line) for line in events.stdout.splitlines()]
    assert [(e["type"], e["vmdk"]["path"]) for e in stitched] == [
        ("ImageStitched", str(Path(shown["vmdk"]).relative_to(home)))
    ]
    assert run_cli(home, "rebuild", "--verify").returncode == 0


# ------------------------------------------------------------------------- processes

CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    from imageledger import ImageCache
    from imageledger.cache import internals
    from imageledger.storage.materializer import ErofsMaterializer

    home, reference, pause, go = sys.argv[1:5]

    class Pausing(ErofsMaterializer):
        # The default writers; `pause` names where to stop until killed: "building" (the
        # second layer's image is half written in the lease's work directory).
        calls = 0

        def build_layer(self, blob, out, *, diff_id):
            Pausing.calls += 1
            if pause == "building" and Pausing.calls == 2:
                out.write(b"partial" * 10000)
                out.flush()
                print("@@paused", flush=True)
                time.sleep(3600)
            return super().build_layer(blob, out, diff_id=diff_id)

    with ImageCache(home, materializer=Pausing()) as cache:
        if pause == "installed":
            # The second layer's image is renamed into artifacts/, not yet recorded.
            ledger = internals(cache).ledger
            real = ledger.append
            seen = []

            def append(events):
                seen.extend(type(e).__name__ for e in events)
                if seen.count("LayerMaterialized") == 2:
                    print("@@paused", flush=True)
                    time.sleep(3600)
                real(events)

            ledger.append = append
        print("@@ready", flush=True)
        while go != "-" and not os.path.exists(go):
            time.sleep(0.01)
        done = cache.materialize(reference)
        print("@@done " + json.dumps({"written": done.written, "vmdk": done.vmdk}), flush=True)
    """
)


def start_child(
    home: Path, reference: str, pause: str = "-", go: str = "-"
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(home), reference, pause, go],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "IMAGELEDGER_LOG_LEVEL": "error"},
    )


def wait_for(stream: IO[str] | None, marker: str) -> str:
    assert stream is not None
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        if line.startswith(marker):
            return line[len(marker) :].strip()
    raise AssertionError(f"the child never said {marker!r}")


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
        child.wait(TIMEOUT)


@pytest.mark.parametrize("pause", ["building", "installed"])
def test_a_killed_materialize_leaves_nothing_counted_and_prune_reclaims_it(
    images: Images,
    tmp_path: Path,
    children: list[subprocess.Popen[str]],
    pause: str,
) -> None:
    home = tmp_path / "home"
    with ImageCache(home) as cache:
        cache.load(images.big_tar)
    child = start_child(home, "test/big:1", pause)
    children.append(child)
    wait_for(child.stdout, "@@paused")
    child.send_signal(signal.SIGKILL)
    child.wait(TIMEOUT)

    recorded = {e["erofs"][0] for e in events_of(home, "LayerMaterialized")}
    assert len(recorded) == 1 and events_of(home, "ImageStitched") == []
    with ImageCache(home) as cache:
        assert cache.rebuild(verify=True).identical
        sizes = [x.erofs_size_bytes for x in cache.inspect("test/big:1").layers]
        assert sizes[0] is not None and sizes[1:] == [None, None, None]
        on_disk = set(files_under(home / "artifacts"))
        leftovers = [p for p in (home / "tmp").iterdir() if p.name not in ("leases", "locks")]
        if pause == "building":
            assert leftovers  # the dead lease's work directory, with the half-written image
        else:
            assert len(on_disk) == 2  # the recorded image and the one renamed, unrecorded
        report = cache.prune(keep=["test/*"])
        assert report.image_refs_removed == 0
        reclaimed = {d.digest for d in report.deleted}
        assert {f"artifacts/{p}" for p in on_disk} - recorded <= reclaimed
        assert {f"artifacts/{p}" for p in files_under(home / "artifacts")} == recorded
        assert [p.name for p in (home / "tmp").iterdir() if p.name != "locks"] == ["leases"]
        done = cache.materialize("test/big:1")
        assert done.written == 3 + 2
        assert cache.verify().ok
    fsck(Path(done.layers[1].path))


def test_two_processes_materializing_one_image_write_each_layer_once(
    images: Images, tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    home = tmp_path / "home"
    with ImageCache(home) as cache:
        cache.load(images.big_tar)
    go = tmp_path / "go"
    started = [start_child(home, "test/big:1", "-", str(go)) for _ in range(2)]
    children.extend(started)
    for child in started:
        wait_for(child.stdout, "@@ready")
    go.touch()
    results = [json.loads(wait_for(child.stdout, "@@done")) for child in started]
    for child in started:
        assert child.wait(TIMEOUT) == 0, child.stderr.read() if child.stderr else ""
    assert results[0]["vmdk"] == results[1]["vmdk"]
    assert sum(r["written"] for r in results) == 4 + 2  # each file written by one of them
    layers = events_of(home, "LayerMaterialized")
    assert sorted(e["blob_digest"] for e in layers) == sorted(x.digest for x in images.big.layers)
    assert len(events_of(home, "ImageStitched")) == 1
    with ImageCache(home) as cache:
        assert cache.verify().ok and cache.rebuild(verify=True).identical


def test_cli_pull_materialize(registry: Registry, images: Images, tmp_path: Path) -> None:
    push(registry, f"oci-archive:{images.app_tar}", "mat/app:1")
    reference = registry.reference("mat/app:1")
    home = tmp_path / "home"
    result = run_cli(
        home, "pull", reference, "--materialize", "--json", "--insecure-registry", registry.host
    )
    assert result.returncode == 0, result.stderr
    pulled = json.loads(result.stdout)
    assert pulled["reference"] == reference
    shown = pulled["materialized"]
    assert shown["reference"] == reference and len(shown["layers"]) == 3
    assert Path(shown["vmdk"]).is_file() and Path(shown["fsmeta"]).is_file()
    fsck(Path(shown["fsmeta"]), [Path(x["path"]) for x in shown["layers"]])
    assert len(events_of(home, "LayerMaterialized")) == 3


def test_the_asyncio_api_and_the_audit_report_show_materialization(home: Path) -> None:
    with ImageCache(home) as cache:
        done = asyncio.run(Image.materialize(APP, cache=cache))
        again = cache.materialize(APP)
        assert (again.vmdk, again.layers, again.written) == (done.vmdk, done.layers, 0)
        rows = [r for r in cache.audit.report(reference=APP) if r["action"] == "materialize"]
        assert len(rows) == 3 + 1
        assert all(r["manifest_digest"] == done.manifest_digest for r in rows)
        assert rows[-1]["outcome"].startswith("stitched: ")


def test_the_cache_as_it_was_reports_what_was_materialized_then(home: Path) -> None:
    with ImageCache(home) as cache:
        before = cache.history()[-1].position
        done = cache.materialize(APP)
        after = cache.history()[-1].position
        assert all(x.erofs_size_bytes is None for x in cache.at(before).inspect(APP).layers)
        sizes = [x.erofs_size_bytes for x in cache.at(after).inspect(APP).layers]
        assert sizes == [x.erofs_size_bytes for x in done.layers]
        cache.remove(APP)
        assert cache.at(after).df()["bytes"]["vmdk"] == done.vmdk_size_bytes
        assert "vmdk" not in cache.df()["bytes"]
