"""The audit log's use cases: sign checkpoints, verify the whole log offline, prove inclusion
and consistency (issue 11).

The ledger is a transparency log: every stored event is a leaf of an RFC 9162 Merkle tree
(`domain.merkle`, kept by storage in the append's own transaction), and the tree's state is
published as C2SP checkpoints in signed notes (`domain.note`). The rules this service keeps:

- Before a checkpoint is signed, the tree is proven consistent with the last checkpoint this
  log signed (an RFC 9162 consistency proof from the stored tree, verified against both
  roots): a log that is not an extension of its signed history is never signed again, and
  the error says so. Every signed checkpoint is kept.
- Verifying recomputes every leaf from the stored records, the whole tree from them, and
  checks every kept checkpoint against it: its signature (this log's key, or the one given),
  its origin, its size (never beyond the log) and its root. The first bad position is named.
- Signing is cheap but not free (a proof, an Ed25519 signature, a durable write): an embedder
  appending a thousand times a second gets one checkpoint per `interval` at most
  (`after_append`), while the command line signs once before it exits (`checkpoint`).
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from imageledger.domain import merkle
from imageledger.domain.errors import (
    AuditInputError,
    AuditVerificationError,
    ImageLedgerError,
    NoteError,
    ProofError,
)
from imageledger.domain.log import get_logger

if TYPE_CHECKING:
    from imageledger.domain import note
    from imageledger.domain.ports import AuditKeys, AuditLog

log = get_logger(__name__)

DEFAULT_INTERVAL = 5.0
"""Seconds between two checkpoints an embedder's appends sign (see `AuditService`)."""


@dataclass(frozen=True)
class SignedCheckpoint:
    """A checkpoint of the log and the signed note that publishes it."""

    origin: str
    size: int
    root: bytes
    note: str
    new: bool
    """Whether this call signed it (False: the log had not grown since the last one)."""


@dataclass(frozen=True)
class AuditReport:
    """What `AuditService.verify` checked, all of it sound (a failure raises instead)."""

    origin: str
    events: int
    root: bytes
    checkpoints: int
    key: str
    """The verifier key the checkpoints' signatures were checked with."""


class AuditService:
    """The audit log of one home (see the module docstring)."""

    def __init__(
        self,
        log: AuditLog,
        keys: AuditKeys,
        *,
        writable: bool,
        interval: float = DEFAULT_INTERVAL,
        clock: Any = time.monotonic,
    ) -> None:
        self.log = log
        self.keys = keys
        self.writable = writable
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._last_attempt: float | None = None

    # ------------------------------------------------------------------ keys

    def _signer(self, *, create: bool) -> note.Signer:
        return self.keys.signer(self.log.origin(), create=create and self.writable)

    def verifier_key(self) -> str:
        """The public key that verifies this log's checkpoints, as a note verifier key string
        (``<origin>+<key id>+<base64 key>``); the key is made if there is none yet."""
        return self._signer(create=True).verifier().to_string()

    # ------------------------------------------------------------------ signing

    def checkpoint(self) -> SignedCheckpoint:
        """Sign a checkpoint of the log as it is now, after proving it consistent with the
        last one signed; the last one itself when the log has not grown since."""
        from imageledger.domain import note

        signer = self._signer(create=True)
        verifier = signer.verifier()
        origin = signer.name
        while True:
            with self.log.audit_state() as state:
                size = state.size
                tiles = state.tiles()
                root = tiles.root(size)
                last = state.last_checkpoint()
                proof: list[bytes] = []
                if last is not None and 0 < last[0] < size:
                    proof = tiles.consistency_proof(last[0], size)
            previous = None
            if last is not None:
                previous = self._open(last[1], verifier, origin, f"the checkpoint at {last[0]}")
                if previous.size > size:
                    msg = (
                        f"the log holds {size} events but was signed at {previous.size}: "
                        "it is not an extension of its signed history and is not signed again"
                    )
                    raise AuditVerificationError(msg)
                if previous.size == size:
                    if previous.root != root:
                        msg = (
                            f"the log at size {size} is not the one signed at that size: "
                            "it is not signed again"
                        )
                        raise AuditVerificationError(msg)
                    return SignedCheckpoint(origin, size, root, last[1].decode(), new=False)
                if previous.size > 0:
                    try:
                        merkle.verify_consistency(previous.size, size, proof, previous.root, root)
                    except ProofError as e:
                        msg = (
                            f"the log is not an extension of the checkpoint signed at size "
                            f"{previous.size} ({e}): it is not signed again"
                        )
                        raise AuditVerificationError(msg) from None
            body = note.Checkpoint(origin, size, root).body()
            signed = note.sign(body, signer)
            expect = last[0] if last is not None else None
            if self.log.keep_checkpoint(size, signed.encode(), expect):
                log.info("audit.checkpoint", size=size, origin=origin)
                return SignedCheckpoint(origin, size, root, signed, new=True)
            # Another process signed meanwhile: decide again against its checkpoint.

    def after_append(self) -> None:
        """Called after each append of this process: sign a checkpoint if none was attempted
        for `interval` seconds. A failure is logged, never raised: the append it follows is
        committed, and the next attempt waits for the interval too."""
        if not self.writable:
            return
        now = self.clock()
        with self._lock:
            if self._last_attempt is not None and now - self._last_attempt < self.interval:
                return
            self._last_attempt = now
        try:
            self.checkpoint()
        except (ImageLedgerError, OSError) as e:  # a key that cannot be made, a full ledger
            log.warning("audit.checkpoint_failed", error=str(e))

    @staticmethod
    def _open(data: bytes, verifier: note.Verifier, origin: str, what: str) -> note.Checkpoint:
        from imageledger.domain import note

        try:
            text = note.verify(data, verifier)
            checkpoint = note.Checkpoint.parse(text)
        except NoteError as e:
            msg = f"{what} does not verify with the key given ({e})"
            raise AuditVerificationError(msg) from None
        if checkpoint.origin != origin:
            msg = f"{what} is for the log {checkpoint.origin!r}, not this one ({origin!r})"
            raise AuditVerificationError(msg)
        if checkpoint.extensions:
            msg = f"{what} has extension lines, which imageledger never signs"
            raise AuditVerificationError(msg)
        return checkpoint

    # ------------------------------------------------------------------ verifying

    def verify(self, verifier_key: str | None = None) -> AuditReport:
        """Recompute every leaf, the tree and every kept checkpoint (see the module
        docstring); `AuditVerificationError` naming the first bad position or checkpoint."""
        from imageledger.domain import note

        with self.log.audit_state() as state:
            checkpoints = state.checkpoints()
        verifier: note.Verifier | None = None
        if verifier_key is not None:
            verifier = note.Verifier.from_string(verifier_key.strip())
        elif checkpoints:  # nothing signed yet: no key needed (and none is made)
            verifier = self._signer(create=False).verifier()
        origin = self.log.origin() if checkpoints else ""
        replay = self.log.replay([size for size, _ in checkpoints])
        if replay.first_bad is not None:
            msg = f"position {replay.first_bad}: {replay.problem}"
            raise AuditVerificationError(msg)
        for size, data in checkpoints:
            what = f"the checkpoint at size {size}"
            assert verifier is not None
            checkpoint = self._open(data, verifier, origin, what)
            if checkpoint.size != size:
                msg = f"{what} says size {checkpoint.size}"
                raise AuditVerificationError(msg)
            if size > replay.size:
                msg = f"{what} is beyond the log, which holds {replay.size} events"
                raise AuditVerificationError(msg)
            if replay.roots.get(size) != checkpoint.root:
                msg = (
                    f"{what}: the log's first {size} events are not the ones that were "
                    "signed (rewritten, or truncated and extended again)"
                )
                raise AuditVerificationError(msg)
        with self.log.audit_state() as state:
            root = state.tiles().root(replay.size) if replay.size <= state.size else b""
        key = verifier.to_string() if verifier is not None else ""
        return AuditReport(origin, replay.size, root, len(checkpoints), key)

    # ------------------------------------------------------------------ exporting

    def export_jsonl(
        self, write: Callable[[str], object], first: int = 1, last: int | None = None
    ) -> SignedCheckpoint:
        """The log from `first` to `last` (default: all of it) as JSON Lines, for SIEM tools:
        one object per event (``position``, ``leaf_hash``, ``record``: the stored record in
        base64, then every field of it named as docs/FORMAT.md names them), then one line with
        the checkpoint that covers the last event (``checkpoint``: the signed note, signed now
        when none covers it yet) and the complete subtrees left and right of the exported
        leaves, so that `verify_jsonl` proves every line part of signed history with nothing
        but the export and the verifier key. Streams: memory does not grow with the log."""
        size = self.log.head()
        last = size if last is None else last
        if not 1 <= first <= last <= size:
            msg = f"no events {first} to {last}: the log holds {size}"
            raise ValueError(msg)
        covering = self._covering(last)
        with self.log.audit_state() as state:
            tiles = state.tiles()
            left = [tiles.subtree(h, i) for h, i in merkle.aligned(0, first - 1)]
            right = [tiles.subtree(h, i) for h, i in merkle.aligned(last, covering.size)]
        for position, record, fields in self.log.entries(first, last):
            line = {
                "position": position,
                "leaf_hash": merkle.leaf_hash(record).hex(),
                "record": base64.b64encode(record).decode(),
                **fields,
            }
            write(json.dumps(line, sort_keys=True, separators=(",", ":")) + "\n")
        write(
            json.dumps(
                {
                    "checkpoint": covering.note,
                    "origin": covering.origin,
                    "size": covering.size,
                    "root_hash": covering.root.hex(),
                    # The complete subtrees left and right of the exported leaves (see
                    # `merkle.aligned`): with them a verifier folds the leaves into the root.
                    "left": [h.hex() for h in left],
                    "right": [h.hex() for h in right],
                },
                sort_keys=True,
                separators=(",", ":"),
            )
            + "\n"
        )
        return covering

    def export_tiles(self, directory: str) -> tuple[SignedCheckpoint, int]:
        """The log as a C2SP tlog-tiles directory at a checkpoint of all of it (signed now
        if the log grew since the last), extending an export of this log already there;
        the checkpoint and the number of files written."""
        signed = self.checkpoint()
        return signed, self.log.export_tiles(directory, signed.size, signed.note)

    def _covering(self, last: int) -> SignedCheckpoint:
        """The first kept checkpoint of a tree holding event `last` (signed now if none)."""
        with self.log.audit_state() as state:
            kept = [(size, data) for size, data in state.checkpoints() if size >= last]
        if not kept:
            return self.checkpoint()
        size, data = kept[0]
        verifier = self._signer(create=False).verifier()
        origin = self.log.origin()
        checkpoint = self._open(data, verifier, origin, f"the checkpoint at size {size}")
        return SignedCheckpoint(origin, size, checkpoint.root, data.decode(), new=False)

    # ------------------------------------------------------------------ reporting

    def report(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        reference: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Who pulled, used, released, removed and pruned what, when, from where, with which
        digests and with what outcome (refusals and failed pulls included): one row per
        reference an event concerns, oldest first, read from the stored records (streamed).
        `since`/`until` bound the events' instants (inclusive); `reference` is a canonical
        reference (the caller canonicalises it)."""
        for event in self.events(since=since, until=until, reference=reference):
            actor = event["actor"]
            for row in _rows(event):
                if reference is not None and row["reference"] != reference:
                    continue
                yield {
                    "position": event["position"],
                    "at": event["at"],
                    **row,
                    "user": actor["user"],
                    "uid": actor["uid"],
                    "host": actor["host"],
                    "pid": actor["pid"],
                }

    # ------------------------------------------------------------------ the log itself

    def head(self) -> int:
        """The log's last position."""
        return self.log.head()

    def events(
        self,
        *,
        first: int = 1,
        last: int | None = None,
        types: frozenset[str] = frozenset(),
        reference: str | None = None,
        holder: str | None = None,
        actor: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Iterator[dict[str, Any]]:
        """The log's events from `first` to `last` (default: the end now), each as its stored
        fields (docs/FORMAT.md names) with its ``position``, oldest first, streamed; only those
        of one of `types`, mentioning `reference` (canonical) or `holder`, appended by user
        `actor`, or stamped within [`since`, `until`]."""
        end = self.head() if last is None else min(last, self.head())
        if first > end:
            return
        for position, _record, fields in self.log.entries(max(first, 1), end):
            if types and fields["type"] not in types:
                continue
            if actor is not None and fields["actor"]["user"] != actor:
                continue
            if since is not None and _instant(fields["at"]) < since:
                continue
            if until is not None and _instant(fields["at"]) > until:
                continue
            rows = _rows(fields)
            if reference is not None and all(r["reference"] != reference for r in rows):
                continue
            if holder is not None and holder not in _holders(fields):
                continue
            fields["position"] = position  # a fresh dict per record: no copy
            yield fields

    # ------------------------------------------------------------------ proving

    def _proof_size(self, size: int | None) -> int:
        if size is not None:
            return size
        with self.log.audit_state() as state:
            last = state.last_checkpoint()
        if last is None:
            msg = "no checkpoint is signed yet: give the tree size (or sign one first)"
            raise AuditVerificationError(msg)
        return last[0]

    def prove_inclusion(self, position: int, size: int | None = None) -> dict[str, Any]:
        """The RFC 9162 inclusion proof of the event at `position` (leaf position - 1) in the
        tree of `size` events (default: the last checkpoint's)."""
        size = self._proof_size(size)
        with self.log.audit_state() as state:
            if not 1 <= position <= size <= state.size:
                msg = f"no event {position} in a tree of {size} events (the log holds {state.size})"
                raise ValueError(msg)
            tiles = state.tiles()
            leaf = merkle.leaf_hash(state.record(position))
            root = tiles.root(size)
            hashes = tiles.inclusion_proof(position - 1, size)
        merkle.verify_inclusion(position - 1, size, leaf, hashes, root)
        return {
            "leaf_index": position - 1,
            "tree_size": size,
            "leaf_hash": leaf.hex(),
            "root_hash": root.hex(),
            "hashes": [h.hex() for h in hashes],
        }

    def prove_consistency(self, first: int, second: int | None = None) -> dict[str, Any]:
        """The RFC 9162 consistency proof from the tree of `first` events to that of `second`
        (default: the last checkpoint's)."""
        second = self._proof_size(second)
        with self.log.audit_state() as state:
            if not 0 < first <= second <= state.size:
                msg = (
                    f"no consistency proof from {first} to {second} events "
                    f"(the log holds {state.size}; sizes start at 1)"
                )
                raise ValueError(msg)
            tiles = state.tiles()
            first_root, second_root = tiles.root(first), tiles.root(second)
            hashes = tiles.consistency_proof(first, second)
        merkle.verify_consistency(first, second, hashes, first_root, second_root)
        return {
            "first_size": first,
            "second_size": second,
            "first_root": first_root.hex(),
            "second_root": second_root.hex(),
            "hashes": [h.hex() for h in hashes],
        }


REPORT_COLUMNS = (
    "position",
    "at",
    "action",
    "reference",
    "manifest_digest",
    "holder",
    "source",
    "outcome",
    "user",
    "uid",
    "host",
    "pid",
)
"""The columns of `AuditService.report`'s rows, in order (the CSV header)."""


def _instant(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def _row(action: str, reference: str, digest: str, outcome: str, **extra: str) -> dict[str, Any]:
    return {
        "action": action,
        "reference": reference,
        "manifest_digest": digest,
        "holder": extra.get("holder", ""),
        "source": extra.get("source", ""),
        "outcome": outcome,
    }


Row = dict[str, Any]


def _pulled(f: dict[str, Any]) -> list[Row]:
    outcome = "ok, every blob already cached" if f["cached"] else "ok"
    digest = f["content"]["manifest_digest"]
    return [_row("pull", f["reference"], digest, outcome, source=f["source"])]


def _tagged(f: dict[str, Any]) -> list[Row]:
    """A tag is one row, of the name it made; its source is where the name came from."""
    digest = f["content"]["manifest_digest"]
    return [_row("tag", f["reference"], digest, "ok", source=f"tag:{f['source_reference']}")]


def _pull_failed(f: dict[str, Any]) -> list[Row]:
    return [_row("pull", f["reference"], "", f"failed: {f['error']}", source=f["source"])]


def _used(f: dict[str, Any]) -> list[Row]:
    return [_row("use", f["reference"], f["manifest_digest"], "ok", holder=f["holder"])]


def _released(f: dict[str, Any]) -> list[Row]:
    leases = f["leases"] or [{"reference": "", "manifest_digest": ""}]
    return [
        _row("release", lease["reference"], lease["manifest_digest"], "ok", holder=f["holder"])
        for lease in leases
    ]


def _removed(f: dict[str, Any]) -> list[Row]:
    deleted = f["deleted"]
    outcome = ("forced, " if f["forced"] else "") + (
        f"removed, {len(deleted)} blobs deleted, {f['bytes_reclaimed']} bytes"
        if deleted
        else "untagged"
    )
    return [_row("remove", f["reference"], f["manifest_digest"], outcome)]


def _refused(f: dict[str, Any]) -> list[Row]:
    outcome = "refused: in use by " + ", ".join(f["holders"])
    return [_row("remove", f["reference"], f["manifest_digest"], outcome)]


def _pruned(f: dict[str, Any]) -> list[Row]:
    what = "dry run" if f["policy"]["dry_run"] else "pruned"
    rows = [
        _row("prune", r["reference"], r["manifest_digest"], f"{what}: {r['reason']}")
        for r in f["references"]
    ]
    return rows or [_row("prune", "", "", f"{what}: nothing to remove")]


def _materialized(f: dict[str, Any]) -> list[Row]:
    erofs = f["erofs"]
    outcome = (
        f"layer {f['diff_id']}: {erofs['path']}, {erofs['size']} bytes, by {f['materializer']}"
    )
    return [_row("materialize", f["reference"], f["manifest_digest"], outcome)]


def _stitched(f: dict[str, Any]) -> list[Row]:
    fsmeta, vmdk = f["fsmeta"], f["vmdk"]
    outcome = f"stitched: {fsmeta['path']}, {vmdk['path']}, by {f['materializer']}"
    return [_row("materialize", f["reference"], f["manifest_digest"], outcome)]


# The report's rows of each event type (its stored fields as `AuditLog.entries` gives them);
# `Started` (the home came into use) makes none.
_ROWS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "ImagePulled": _pulled,
    "ImageTagged": _tagged,
    "PullFailed": _pull_failed,
    "ImageUsed": _used,
    "HolderReleased": _released,
    "ImageRemoved": _removed,
    "RemoveRefused": _refused,
    "ImagesPruned": _pruned,
    "LayerMaterialized": _materialized,
    "ImageStitched": _stitched,
}


def _rows(fields: dict[str, Any]) -> list[Row]:
    rows = _ROWS.get(fields["type"])
    return rows(fields) if rows is not None else []


# ------------------------------------------------------------------ verifying an export


@dataclass(frozen=True)
class ExportCheck:
    """What `verify_jsonl` verified (a failure raises instead)."""

    origin: str
    first: int
    last: int
    size: int
    root: bytes


def verify_jsonl(
    lines: Iterable[str], verifier_key: str, decode: Callable[[bytes], dict[str, Any]]
) -> ExportCheck:
    """Verify a JSON Lines export (`AuditService.export_jsonl`) without the home: each line's
    record hashes to its leaf hash and `decode`s (the FORMAT.md reader) to exactly the fields
    the line shows, positions run on without a gap, and the leaves, folded
    with the subtrees around them, give the root of the checkpoint on the last line, whose
    signature the verifier key checks. An edited, deleted, reordered or inserted line fails,
    and so does a checkpoint of another key. The leaf hashes are held until the checkpoint
    line (32 bytes an event). `AuditVerificationError` naming the line (exit 5);
    `AuditInputError` for what is not an export at all (exit 2)."""
    from imageledger.domain import note

    verifier = note.Verifier.from_string(verifier_key.strip())
    leaves = bytearray()
    first = last = 0
    final: dict[str, Any] | None = None
    for number, text in enumerate(lines, 1):
        if final is not None:
            msg = f"line {number}: more lines after the checkpoint"
            raise AuditVerificationError(msg)
        try:
            line = json.loads(text)
        except ValueError:
            msg = f"line {number} is not JSON"
            raise AuditInputError(msg) from None
        if not isinstance(line, dict):
            msg = f"line {number} is not a JSON object"
            raise AuditInputError(msg)
        if "checkpoint" in line:
            final = line
            continue
        position = line.get("position")
        if not isinstance(position, int) or position < 1 or (last and position != last + 1):
            where = f"position {last + 1}" if last else "a position"
            msg = f"line {number}: position {position!r} where {where} belongs"
            raise AuditVerificationError(msg)
        try:
            record = base64.b64decode(line["record"], validate=True)
            leaf = bytes.fromhex(line["leaf_hash"])
        except (KeyError, TypeError, ValueError, binascii.Error):
            msg = f"line {number} (position {position}): no record or leaf hash"
            raise AuditVerificationError(msg) from None
        if merkle.leaf_hash(record) != leaf:
            msg = f"line {number} (position {position}): its record does not hash to its leaf"
            raise AuditVerificationError(msg)
        shown = {k: v for k, v in line.items() if k not in ("position", "leaf_hash", "record")}
        try:
            stored = decode(record)
        except ImageLedgerError:
            stored = None
        if shown != stored:
            msg = f"line {number} (position {position}): its fields are not its record's"
            raise AuditVerificationError(msg)
        first = first or position
        last = position
        leaves += leaf
    if final is None or not last:
        msg = "the export has no events, or no checkpoint line at its end"
        raise AuditVerificationError(msg)
    try:
        text = note.verify(str(final["checkpoint"]), verifier)
    except NoteError as e:
        msg = f"the export's checkpoint does not verify with the key given ({e})"
        raise AuditVerificationError(msg) from None
    checkpoint = note.Checkpoint.parse(text)
    if checkpoint.origin != verifier.name or checkpoint.extensions:
        msg = f"the export's checkpoint is not one of the log {verifier.name!r}"
        raise AuditVerificationError(msg)
    if checkpoint.size < last:
        msg = f"the checkpoint (size {checkpoint.size}) does not cover position {last}"
        raise AuditVerificationError(msg)
    try:
        left = [bytes.fromhex(h) for h in final["left"]]
        right = [bytes.fromhex(h) for h in final["right"]]
    except (KeyError, TypeError, ValueError):
        msg = "the checkpoint line lacks the subtrees around the exported events"
        raise AuditVerificationError(msg) from None
    outside = merkle.aligned(0, first - 1), merkle.aligned(last, checkpoint.size)
    if [len(left), len(right)] != [len(outside[0]), len(outside[1])]:
        msg = "the subtrees around the exported events do not fit their positions"
        raise AuditVerificationError(msg)
    folded = merkle.CompactRange()
    for (height, _index), value in zip(outside[0], left, strict=True):
        folded.append(value, height)
    for i in range(0, len(leaves), merkle.HASH_SIZE):
        folded.append(bytes(leaves[i : i + merkle.HASH_SIZE]))
    for (height, _index), value in zip(outside[1], right, strict=True):
        folded.append(value, height)
    if folded.root() != checkpoint.root:
        msg = (
            f"the events {first} to {last} with the subtrees around them are not the tree "
            f"the checkpoint at size {checkpoint.size} signed: a line was edited, deleted, "
            "reordered or inserted"
        )
        raise AuditVerificationError(msg)
    return ExportCheck(checkpoint.origin, first, last, checkpoint.size, checkpoint.root)


def _holders(fields: dict[str, Any]) -> list[str]:
    """The holders an event names: the one that took or ended leases, or those a remove was
    refused for."""
    if "holder" in fields:
        return [fields["holder"]]
    return list(fields.get("holders", []))
