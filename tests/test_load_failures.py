"""Failed loads and pulls leave no content and always a trace; an archive is all or nothing;
a platform asked for is never answered with another; many names cost linear work (issue 8).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from imageledger import ImageCache
from imageledger.cache import internals
from imageledger.domain.errors import (
    ArchiveError,
    DigestMismatchError,
    ImageNotFoundError,
    PlatformNotFoundError,
)
from imageledger.domain.reference import parse_reference as real_parse
from imageledger.projections.views import ViewState
from imageledger.storage import archives
from imageledger.tools.imagebuild import (
    ImageSpec,
    build_docker_archive,
    build_image,
    build_oci_layout,
)


def blob_files(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "blobs").rglob("*") if p.is_file())


def tmp_leftovers(home: Path) -> list[str]:
    tmp = home / "tmp"
    return sorted(
        str(p.relative_to(tmp))
        for p in tmp.rglob("*")
        if p.parts[len(tmp.parts)] not in ("leases", "locks") or p.is_file()
    )


def spooled(home: Path) -> list[Path]:
    """Files a load in flight wrote under its lease's work directory (tmp/<lease>/...)."""
    tmp = home / "tmp"
    return [p for p in tmp.rglob("*") if p.is_file() and p.parent.parent != tmp]


def failures(cache: ImageCache) -> list[str]:
    return [e.detail for e in cache.history() if e.event == "PullFailed"]


@pytest.fixture
def cache(tmp_path: Path) -> Any:
    with ImageCache(tmp_path / "home") as c:
        yield c


def test_an_archive_whose_last_image_fails_commits_none_and_keeps_nothing(
    cache: ImageCache, tmp_path: Path
) -> None:
    good = build_image(ImageSpec(layers=({"good": b"good\n" * 100},), names=("good:1",)))
    other = build_image(ImageSpec(layers=({"other": b"other\n" * 100},)))
    # A name pinned to a digest that is not its manifest's: refused when the load commits,
    # after "good:1" was written (it used to be committed already).
    wrong = f"zzz@{good.manifest_digest}"
    bad = build_image(
        ImageSpec(layers=({"other": b"other\n" * 100},), names=(wrong,)),
    )
    assert bad.manifest_digest == other.manifest_digest
    archive = build_docker_archive(tmp_path / "two.tar", [good, bad]).path
    with pytest.raises(DigestMismatchError):
        cache.load(archive)
    assert cache.list() == []
    assert blob_files(cache.home) == []
    assert tmp_leftovers(cache.home) == []
    assert len(failures(cache)) == 1


def test_a_platform_asked_for_and_absent_is_not_found_and_names_what_is_there(
    cache: ImageCache, tmp_path: Path
) -> None:
    arm = build_image(ImageSpec(architecture="arm64", variant="v8", layers=({"a": b"arm"},)))
    s390 = build_image(ImageSpec(architecture="s390x", layers=({"a": b"s390x"},)))
    layout = build_oci_layout(tmp_path / "multi", [arm, s390], multi_arch=True, names=("m:1",))
    with pytest.raises(PlatformNotFoundError) as caught:
        cache.load(layout.path, platform="linux/riscv64")
    assert isinstance(caught.value, ImageNotFoundError)
    assert "linux/arm64/v8" in str(caught.value) and "linux/s390x" in str(caught.value)
    assert cache.list() == [] and blob_files(cache.home) == []
    assert len(failures(cache)) == 1
    # A variant asked for must match too; without one, any variant of the architecture does.
    with pytest.raises(PlatformNotFoundError):
        cache.load(layout.path, platform="linux/arm64/v9")
    [handle] = cache.load(layout.path, platform="linux/arm64")
    assert (handle.architecture, handle.manifest_digest) == ("arm64", arm.manifest_digest)
    # A single-platform archive loads whatever the host, when no platform is asked for...
    single = build_docker_archive(
        tmp_path / "s.tar", [ImageSpec(architecture="s390x", names=("s:1",))]
    )
    assert cache.load(single.path)[0].architecture == "s390x"
    # ...and is not found when another one is.
    with pytest.raises(PlatformNotFoundError, match="linux/s390x"):
        cache.load(single.path, platform="linux/amd64")


class _Interrupting(io.RawIOBase):
    """A stream that delivers `after` bytes of `data`, then is interrupted (Ctrl-C, or
    SIGTERM turned into KeyboardInterrupt by the command line)."""

    def __init__(self, data: bytes, after: int) -> None:
        self._data = io.BytesIO(data)
        self._after = after

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._data.tell() >= self._after:
            raise KeyboardInterrupt
        chunk = self._data.read(min(len(buffer), self._after - self._data.tell()))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def test_an_interrupted_load_keeps_nothing_and_is_recorded(
    cache: ImageCache, tmp_path: Path
) -> None:
    spec = ImageSpec(
        layers=({"one": b"1" * 200_000}, {"two": b"2" * 200_000}, {"three": b"3" * 200_000}),
        compression="none",
        names=("big:1",),
    )
    data = build_docker_archive(tmp_path / "big.tar", [spec]).path.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        cache.load(io.BufferedReader(_Interrupting(data, len(data) * 2 // 3)))
    assert cache.list() == []
    assert blob_files(cache.home) == []
    assert tmp_leftovers(cache.home) == []
    [failure] = failures(cache)
    assert "KeyboardInterrupt" in failure


def test_every_failed_load_is_recorded(cache: ImageCache, tmp_path: Path) -> None:
    (tmp_path / "garbage.tar").write_bytes(b"not a tar at all" * 100)
    for _ in range(3):
        with pytest.raises(ArchiveError):
            cache.load(tmp_path / "garbage.tar")
    assert len(failures(cache)) == 3


def test_the_wrong_kind_of_source_is_refused_clearly(cache: ImageCache) -> None:
    with pytest.raises(TypeError, match="path or a binary stream"):
        cache.load(b"/some/path")  # type: ignore[arg-type]


def test_one_manifest_under_many_names_is_one_commit_and_linear_work(
    cache: ImageCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = tuple(f"app:{i}" for i in range(2000))
    archive = build_docker_archive(tmp_path / "many.tar", [ImageSpec(names=names)]).path
    appends: list[int] = []
    ledger = internals(cache).ledger
    real_append = ledger.append

    def counting_append(events: Any) -> None:
        appends.append(len(events))
        real_append(events)

    parses = 0

    def counting_parse(text: str) -> Any:
        nonlocal parses
        parses += 1
        return real_parse(text)

    # A manifest row lists every reference to it: reading it once per alias (index.json
    # did) is N reads of N names.
    manifest_reads = 0
    real_manifest = ViewState.manifest

    def counting_manifest(self: ViewState, digest: str) -> Any:
        nonlocal manifest_reads
        manifest_reads += 1
        return real_manifest(self, digest)

    monkeypatch.setattr(ledger, "append", counting_append)
    monkeypatch.setattr(archives, "parse_reference", counting_parse)
    monkeypatch.setattr(ViewState, "manifest", counting_manifest)
    handles = cache.load(archive)
    assert len(handles) == len(names)
    assert len(appends) == 1 and appends[0] >= len(names)  # one commit, every name in it
    assert parses <= 3 * len(names)  # each name parsed a bounded number of times
    assert manifest_reads <= 10, manifest_reads
    assert len(cache.list()) == len(names)


def test_sigterm_during_a_cli_load_cleans_up_like_ctrl_c(tmp_path: Path) -> None:
    spec = ImageSpec(
        layers=({"one": os.urandom(300_000)}, {"two": os.urandom(300_000)}),
        compression="none",
        names=("big:1",),
    )
    data = build_docker_archive(tmp_path / "big.tar", [spec]).path.read_bytes()
    home = tmp_path / "home"
    env = {**os.environ, "IMAGELEDGER_LOG_LEVEL": "error"}
    child = subprocess.Popen(
        [sys.executable, "-m", "imageledger.tools.cli", "--home", str(home), "load", "-"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert child.stdin is not None
    child.stdin.write(data[: len(data) * 3 // 4])
    child.stdin.flush()
    deadline = time.monotonic() + 60
    # Spooled or stored: the load is under way, with files of its own on disk.
    while not spooled(home) and not blob_files(home):
        assert time.monotonic() < deadline, "the load wrote nothing"
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.decode().strip() == "imageledger: terminated (SIGTERM)"
    assert blob_files(home) == []
    assert tmp_leftovers(home) == []
    with ImageCache(home) as cache:
        [failure] = failures(cache)
        assert "Terminated" in failure
        assert cache.list() == []
