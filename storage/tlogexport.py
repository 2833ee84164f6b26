"""The audit log as a C2SP tlog-tiles static directory (c2sp.org/tlog-tiles): written from the
ledger, incrementally, and verified without it.

A directory holds ``checkpoint`` (the signed note), the hash tiles ``tile/<L>/<N>`` (full) and
``tile/<L>/<N>.p/<W>`` (the partial one of each level, for each size exported), and the entry
bundles ``tile/entries/<N>[.p/<W>]``: the stored records themselves, each prefixed with its
length as a big-endian uint16. Any tlog-tiles client served the directory by a plain static
file server fetches the checkpoint, checks its signature with the log's verifier key, and
proves any entry included.

Decisions: an export is written where the caller says, files first, the checkpoint last (a
client never sees a checkpoint whose tiles are missing), each file whole under a temporary
name and renamed, never through a link planted in the directory; a directory that already
holds an export of this log is extended (only the tiles and bundles the older size did not
have), one of another log is refused. tlog-tiles cannot carry an entry above 65,535 bytes (the
uint16 prefix): a ledger with a bigger record (a pull whose image config is that big) cannot be
exported so, and the error names its position (`audit export --jsonl` carries any record).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from imageledger.domain import merkle
from imageledger.domain.errors import AuditInputError, AuditVerificationError, NoteError
from imageledger.storage.home import Dir
from imageledger.storage.tlog import Records, TreeStore

CHECKPOINT: Final = "checkpoint"
_MAX_CHECKPOINT: Final = 64 * 1024


@dataclass(frozen=True)
class TilesExport:
    """What one `export_tiles` wrote."""

    size: int
    since: int
    files: int


def _write(root: Dir, relative: str, data: bytes) -> None:
    parent, _, name = relative.rpartition("/")
    if parent:
        with root.sub(parent, create=True) as directory:
            directory.write_atomic(name, data)
    else:
        root.write_atomic(name, data)


def _read(root: Dir, relative: str, limit: int) -> bytes | None:
    parent, _, name = relative.rpartition("/")
    try:
        directory = root.sub(parent) if parent else None
    except FileNotFoundError:
        return None
    try:
        source = directory if directory is not None else root
        try:
            with source.open_read(name) as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            return None
    finally:
        if directory is not None:
            directory.close()
    if len(data) > limit:
        msg = f"{relative} is larger than a tlog-tiles file can be"
        raise AuditVerificationError(msg)
    return data


def _checkpoint_of(data: bytes | None) -> tuple[str, int] | None:
    """(origin, size) of an exported checkpoint's body, signature unchecked (the export's
    own bookkeeping: which tiles it holds)."""
    from imageledger.domain import note

    if data is None:
        return None
    try:
        text = data.decode()
        body = text[: text.rindex("\n\n") + 1]
        checkpoint = note.Checkpoint.parse(body)
    except (UnicodeDecodeError, ValueError):
        return ("", -1)
    return checkpoint.origin, checkpoint.size


def export_tiles(
    tree: TreeStore, records: Records, directory: Path, origin: str, size: int, note_text: str
) -> TilesExport:
    """Write (or extend) the tlog-tiles directory of the log at its checkpoint of `size`."""
    with Dir.at(directory, create=True) as out:
        found = _checkpoint_of(_read(out, CHECKPOINT, _MAX_CHECKPOINT))
        since = 0
        if found is not None:
            if found[0] != origin or found[1] < 0:
                msg = f"{directory} holds something else than an export of this log"
                raise AuditInputError(msg)
            since = found[1]
            if since > size:
                msg = f"{directory} holds an export at size {since}, beyond size {size}"
                raise AuditInputError(msg)
        files = 0
        with tree.read() as txn:
            entries = records(txn, (since // merkle.TILE_WIDTH) * merkle.TILE_WIDTH)
            for ref in merkle.tiles_for_size(size, since):
                data = tree.tile(txn, ref.level, ref.index)[: ref.width * merkle.HASH_SIZE]
                _write(out, ref.path, data)
                files += 1
                if ref.level == 0:
                    bundle = _bundle(entries, ref.index, ref.width)
                    _write(out, merkle.entries_path(ref.index, ref.width), bundle)
                    files += 1
        _write(out, CHECKPOINT, note_text.encode())
        out.fsync()
    return TilesExport(size, since, files + 1)


def _bundle(entries: Iterator[tuple[int, bytes]], index: int, width: int) -> bytes:
    """The entry bundle of level-0 tile `index` holding `width` entries (the iterator stands
    at its first record: bundles are written in order)."""
    chunk = []
    first = index * merkle.TILE_WIDTH + 1
    for offset in range(width):
        position, record = next(entries)
        if position != first + offset:
            msg = f"the log has no entry {first + offset}"
            raise AuditVerificationError(msg)
        if len(record) > merkle.MAX_ENTRY_SIZE:
            msg = (
                f"event {position} is {len(record)} bytes; tlog-tiles entry bundles hold "
                f"entries of at most {merkle.MAX_ENTRY_SIZE} (export it with --jsonl)"
            )
            raise AuditInputError(msg)
        chunk.append(record)
    return merkle.entry_bundle(chunk)


# ------------------------------------------------------------------ verifying a directory


@dataclass(frozen=True)
class TilesCheck:
    origin: str
    size: int
    root: bytes


def verify_tiles(directory: Path, verifier_key: str) -> TilesCheck:
    """Verify a tlog-tiles directory with nothing but it and the verifier key: the
    checkpoint's signature; every entry bundle's entries hash to its level-0 tile's leaves;
    every tile above holds the roots of the full tiles below; the leaves fold into the signed
    root. `AuditVerificationError` naming the first file that is wrong (exit 5)."""
    from imageledger.domain import note

    verifier = note.Verifier.from_string(verifier_key.strip())
    try:
        out = Dir.at(directory)
    except (FileNotFoundError, NotADirectoryError):
        msg = f"{directory}: no such export directory"
        raise AuditInputError(msg) from None
    with out:
        data = _read(out, CHECKPOINT, _MAX_CHECKPOINT)
        if data is None:
            msg = f"{directory} has no checkpoint"
            raise AuditVerificationError(msg)
        try:
            checkpoint = note.Checkpoint.parse(note.verify(data, verifier))
        except NoteError as e:
            msg = f"the export's checkpoint does not verify with the key given ({e})"
            raise AuditVerificationError(msg) from None
        if checkpoint.origin != verifier.name or checkpoint.extensions:
            msg = f"the export's checkpoint is not one of the log {verifier.name!r}"
            raise AuditVerificationError(msg)
        size = checkpoint.size
        folded = merkle.CompactRange()
        roots: dict[int, list[bytes]] = {}  # per level, the roots of its full tiles in order
        full = merkle.TILE_WIDTH * merkle.HASH_SIZE
        for ref in merkle.tiles_for_size(size):
            path = ref.path
            tile = _read(out, path, full)
            if tile is None or len(tile) != ref.width * merkle.HASH_SIZE:
                msg = f"{path} is missing or not {ref.width} hashes"
                raise AuditVerificationError(msg)
            step = merkle.HASH_SIZE
            hashes = [tile[i : i + step] for i in range(0, len(tile), step)]
            if ref.level == 0:
                _check_bundle(out, ref, hashes)
                for leaf in hashes:
                    folded.append(leaf)
            else:
                start = ref.index * merkle.TILE_WIDTH
                if hashes != roots.get(ref.level - 1, [])[start : start + ref.width]:
                    msg = f"{path} does not hold the roots of the full tiles below it"
                    raise AuditVerificationError(msg)
            if ref.width == merkle.TILE_WIDTH:
                roots.setdefault(ref.level, []).append(_tile_root(hashes))
        if folded.size != size or folded.root() != checkpoint.root:
            msg = f"the exported entries are not the tree the checkpoint at size {size} signed"
            raise AuditVerificationError(msg)
    return TilesCheck(checkpoint.origin, size, checkpoint.root)


def _tile_root(hashes: list[bytes]) -> bytes:
    folded = merkle.CompactRange()
    for value in hashes:
        folded.append(value)
    return folded.root()


def _check_bundle(out: Dir, ref: merkle.TileRef, leaves: list[bytes]) -> None:
    path = merkle.entries_path(ref.index, ref.width)
    bundle = _read(out, path, ref.width * (2 + merkle.MAX_ENTRY_SIZE))
    if bundle is None:
        msg = f"{path} is missing"
        raise AuditVerificationError(msg)
    offset, number = 0, 0
    while offset < len(bundle):
        if offset + 2 > len(bundle):
            msg = f"{path} ends inside an entry's length"
            raise AuditVerificationError(msg)
        length = int.from_bytes(bundle[offset : offset + 2], "big")
        entry = bundle[offset + 2 : offset + 2 + length]
        if len(entry) != length or number >= len(leaves):
            msg = f"{path} holds more or other entries than its tile's {len(leaves)} leaves"
            raise AuditVerificationError(msg)
        if merkle.leaf_hash(entry) != leaves[number]:
            position = ref.index * merkle.TILE_WIDTH + number + 1
            msg = f"{path}: the entry at position {position} is not the leaf its tile holds"
            raise AuditVerificationError(msg)
        offset += 2 + length
        number += 1
    if number != len(leaves):
        msg = f"{path} holds {number} entries, its tile {len(leaves)} leaves"
        raise AuditVerificationError(msg)
