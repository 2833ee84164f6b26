"""How a blob writer writes (issue 10's pull speed): what it gathers before it hashes and
writes, when it asks the kernel to start the writeback, and that neither changes what lands:
the same verified bytes, fsynced before the rename, nothing left behind on failure."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

from imageledger.domain.errors import BlobTooLargeError, DigestMismatchError
from imageledger.storage import blobs
from imageledger.storage.blobs import WRITE_SIZE, WRITEBACK_STEP, BlobStore

CHUNK = 64 * 1024  # what a download delivers


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _partials(store: BlobStore) -> list[Path]:
    return [p for p in store.tmp.rglob("*.part") if p.is_file()]


def test_chunks_are_gathered_then_hashed_and_written_together(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = os.urandom(WRITE_SIZE + 3 * CHUNK)
    writer = store.writer(sha(data), size=len(data))
    [partial] = _partials(store)
    writer.write(data[:CHUNK])
    assert writer.offset == CHUNK  # counted (a resume asks for what follows)...
    assert partial.stat().st_size == 0  # ...but still gathered in memory
    for start in range(CHUNK, WRITE_SIZE, CHUNK):
        writer.write(data[start : start + CHUNK])
    assert partial.stat().st_size == WRITE_SIZE  # 1 MiB gathered: written in one go
    for start in range(WRITE_SIZE, len(data), CHUNK):
        writer.write(data[start : start + CHUNK])
    assert writer.offset == len(data)
    assert writer.commit() == len(data)
    assert store.read(sha(data)) == data
    assert _partials(store) == []


def test_gathered_bytes_are_verified_like_the_others(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = os.urandom(3 * CHUNK)
    writer = store.writer(sha(data), size=len(data))
    writer.write(data[:CHUNK])
    writer.write(b"\0" * CHUNK)  # damaged in transit, still gathered at commit
    writer.write(data[2 * CHUNK :])
    with pytest.raises(DigestMismatchError):
        writer.commit()
    assert not store.has(sha(data))
    assert _partials(store) == []


def test_too_many_bytes_are_refused_as_they_arrive(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = os.urandom(CHUNK)
    writer = store.writer(sha(data), size=len(data))
    writer.write(data)
    with pytest.raises(BlobTooLargeError):
        writer.write(b"x")
    writer.abort()
    assert _partials(store) == []


def test_a_reused_buffer_is_copied_when_gathered(tmp_path: Path) -> None:
    """A caller may hand in a buffer it fills again after the call (``readinto``): what was
    gathered must be what it held then."""
    store = BlobStore(tmp_path)
    first, second = os.urandom(CHUNK), os.urandom(CHUNK)
    buffer = bytearray(first)
    writer = store.writer(sha(first + second), size=2 * CHUNK)
    writer.write(buffer)
    buffer[:] = second
    writer.write(buffer)
    writer.commit()
    assert store.read(sha(first + second)) == first + second


def test_writeback_is_started_every_step_and_the_blob_still_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple[int, int]] = []
    synced: list[int] = []

    def start_writeback(fd: int, offset: int, length: int) -> bool:
        assert os.fstat(fd).st_size >= offset + length  # written before it is asked for
        asked.append((offset, length))
        return True

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(blobs, "start_writeback", start_writeback)
    store = BlobStore(tmp_path)
    data = os.urandom(2 * WRITEBACK_STEP + WRITE_SIZE)
    writer = store.writer(sha(data), size=len(data))
    for start in range(0, len(data), CHUNK):
        writer.write(data[start : start + CHUNK])
    assert asked == [(0, WRITEBACK_STEP), (WRITEBACK_STEP, WRITEBACK_STEP)]
    monkeypatch.setattr(os, "fsync", fsync)
    writer.commit()
    assert len(synced) == 2  # the blob's file, then its directory after the rename
    assert store.read(sha(data)) == data


def test_a_failed_writeback_request_is_not_repeated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[int] = []

    def start_writeback(fd: int, offset: int, length: int) -> bool:
        asked.append(offset)
        return False  # no such call here (not Linux), or it failed

    monkeypatch.setattr(blobs, "start_writeback", start_writeback)
    store = BlobStore(tmp_path)
    data = os.urandom(3 * WRITEBACK_STEP)
    with store.writer(sha(data), size=len(data)) as writer:
        for start in range(0, len(data), WRITE_SIZE):
            writer.write(data[start : start + WRITE_SIZE])
        writer.commit()
    assert asked == [0]
    assert store.read(sha(data)) == data


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_start_writeback_on_linux(tmp_path: Path) -> None:
    path = tmp_path / "file"
    data = os.urandom(WRITEBACK_STEP)
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        assert blobs.start_writeback(f.fileno(), 0, len(data))
    assert path.read_bytes() == data
    assert not blobs.start_writeback(-1, 0, 1)  # a bad descriptor: refused, not raised


@pytest.mark.parametrize(
    "sizes", [[1, WRITE_SIZE + 5, 3], [WRITE_SIZE - 1, 2, WRITE_SIZE], [7] * 50]
)
@pytest.mark.parametrize("announced", [True, False])
def test_any_mix_of_chunk_sizes_lands_in_order(
    tmp_path: Path, sizes: list[int], announced: bool
) -> None:
    """Small chunks are gathered, big ones written as they are (after what was gathered)."""
    store = BlobStore(tmp_path)
    data = os.urandom(sum(sizes))
    writer = store.writer(sha(data), size=len(data) if announced else None)
    start = 0
    for size in sizes:
        writer.write(data[start : start + size])
        start += size
    writer.commit()
    assert store.read(sha(data)) == data
