"""The content store: only verified, whole blobs land; bad input leaves nothing behind."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imageledger.domain.errors import BlobTooLargeError, DigestMismatchError, InvalidReferenceError
from imageledger.storage.blobs import BlobStore


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def leftovers(store: BlobStore) -> list[Path]:
    """Partial files and work directories left in tmp/ (never part of the cache)."""
    return [store.root / entry.digest for entry in store.strays() if entry.kind == "partial"]


def test_write_read_and_size(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = os.urandom(300_000)
    digest = store.write_bytes(data)
    assert digest == sha(data)
    assert store.has(digest)
    assert store.size(digest) == len(data)
    assert store.read(digest) == data
    assert store.path(digest) == tmp_path / "blobs" / "sha256" / digest.split(":")[1]
    assert store.verify(digest)
    assert list(store.digests()) == [digest]
    assert leftovers(store) == []


def test_streamed_chunks_are_hashed_on_the_way(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    parts = [os.urandom(1000) for _ in range(50)]
    data = b"".join(parts)
    assert store.write(sha(data), iter(parts), size=len(data)) == len(data)
    assert store.read(sha(data)) == data


def test_wrong_content_is_refused_and_nothing_lands(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    claimed = sha(b"what the manifest promised")
    with pytest.raises(DigestMismatchError, match="hashes to"):
        store.write(claimed, [b"what the registry sent"])
    assert not store.has(claimed)
    assert leftovers(store) == []


def test_short_content_is_refused(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = b"abcdef"
    with pytest.raises(DigestMismatchError, match="announced 10"):
        store.write(sha(data), [data], size=10)
    assert not store.has(sha(data)) and leftovers(store) == []


def test_oversized_stream_stops_at_the_limit(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    sent: list[int] = []

    def endless() -> Iterator[bytes]:
        while True:
            sent.append(1)
            yield b"x" * 1024

    with pytest.raises(BlobTooLargeError):
        store.write(sha(b"x"), endless(), max_size=10 * 1024)
    assert len(sent) == 11  # stopped reading right after the limit was passed
    assert leftovers(store) == []


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:../../../../etc/passwd",
        "sha256:" + "a" * 63,
        "sha256:" + "A" * 64,
        "md5:" + "a" * 32,
        "../sha256:" + "a" * 64,
        "sha256:" + "a" * 64 + "/x",
    ],
)
def test_digests_are_validated_before_they_become_paths(tmp_path: Path, digest: str) -> None:
    store = BlobStore(tmp_path)
    for call in (store.path, store.has, store.size, store.delete):
        with pytest.raises(InvalidReferenceError):
            call(digest)
    with pytest.raises(InvalidReferenceError):
        store.write(digest, [b"x"])
    assert not (tmp_path / "blobs").exists()


def test_delete_reports_bytes_freed(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest = store.write_bytes(b"y" * 4096)
    assert store.delete(digest) == 4096
    assert store.delete(digest) == 0
    assert not store.has(digest)


def test_rewriting_an_existing_blob_is_harmless(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest = store.write_bytes(b"same")
    assert store.write_bytes(b"same") == digest
    assert store.read(digest) == b"same" and leftovers(store) == []


def test_verify_detects_bit_rot(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest = store.write_bytes(b"pristine content")
    store.path(digest).write_bytes(b"pristine c0ntent")
    assert not store.verify(digest)


def test_digests_skip_foreign_files(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    digest = store.write_bytes(b"z")
    (tmp_path / "blobs" / "sha256" / "not-a-digest").write_bytes(b"?")
    assert list(store.digests()) == [digest]


def test_a_writer_killed_mid_blob_leaves_only_a_partial_in_tmp(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from imageledger.storage.blobs import BlobStore\n"
        "def chunks():\n"
        "    for i in range(10_000):\n"
        "        if i == 5:\n"
        "            print('writing', flush=True)\n"
        "        yield b'q' * 65536\n"
        "        time.sleep(0.01)\n"
        f"BlobStore({str(tmp_path)!r}).write('sha256:' + 'c' * 64, chunks())\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "writing"
    time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    store = BlobStore(tmp_path)
    assert list(store.digests()) == []
    (partial,) = leftovers(store)
    assert partial.name.endswith(".part")


@settings(max_examples=30, deadline=None)
@given(data=st.binary(max_size=5000), chunk=st.integers(1, 700))
def test_any_chunking_stores_the_same_blob(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, chunk: int
) -> None:
    store = BlobStore(tmp_path_factory.mktemp("store"))
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    store.write(sha(data), pieces, size=len(data))
    assert store.read(sha(data)) == data
