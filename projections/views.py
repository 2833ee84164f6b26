"""The views: pure folds from ledger events to tables, and the reader over those tables.

`apply(view, event, position)` is the whole projection: it reads and writes only through the
`ViewTxn` port, uses only the event and its position, and writes only plain values with sorted
lists, so the tables after N events are the same bytes whether they were maintained one commit
at a time or rebuilt from the log (semantics 10). No clock, no host fact, no set or dict order.

Tables (keys are bytes; values plain data):
- ``refs``: reference -> {m: manifest, c: created_at us, u: last_used_at us, p: created position}
- ``refs.order``: created_at us (8 bytes) + created position (8 bytes) -> reference (list())
- ``manifests``: digest -> {content, refs: [...], holders: [...], u: last used us}
- ``blobs``: digest -> {kind, size, users: [manifest digests]} (content reference counts)
- ``holders``: holder -> [[reference, manifest], ...]
- ``history``: reference + NUL + position (8 bytes) -> {e, at, m, d, who}
- ``prunes``: position (8 bytes) -> the prune report
- ``meta``: b"position", b"version", b"modified" -> int
"""

from __future__ import annotations

import struct
from bisect import bisect_left
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from imageledger.domain.events import ImageLedger
from imageledger.domain.model import (
    Actor,
    BlobRecord,
    DeletedBlob,
    ImageConfig,
    ImageContent,
    ImageHandle,
    Layer,
    ManifestRecord,
    Platform,
    ReferenceRecord,
)
from imageledger.domain.ports import ViewTxn

TABLES: Final = ("refs", "refs.order", "manifests", "blobs", "holders", "history", "prunes", "meta")
_U64: Final = struct.Struct(">Q")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def micros(at: datetime) -> int:
    """A timestamp as integer microseconds since the epoch (views hold no floats)."""
    delta = at - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _key(text: str) -> bytes:
    return text.encode()


def _insert(items: list[Any], item: Any) -> list[Any]:
    """`items` (sorted, unique) with `item` in its place."""
    i = bisect_left(items, item)
    if i == len(items) or items[i] != item:
        items.insert(i, item)
    return items


def _without(items: list[Any], item: Any) -> list[Any]:
    return [i for i in items if i != item]


# ---------------------------------------------------------------- content <-> plain values


def content_to_plain(content: ImageContent) -> dict[str, Any]:
    c = content.config
    return {
        "digest": content.manifest_digest,
        "media_type": content.manifest_media_type,
        "size": content.manifest_size,
        "config": [
            c.digest,
            list(c.env),
            None if c.cmd is None else list(c.cmd),
            None if c.entrypoint is None else list(c.entrypoint),
            c.working_dir,
            c.user,
            [list(pair) for pair in c.labels],
            c.stop_signal,
        ],
        "config_size": content.config_size,
        "platform": [content.platform.os, content.platform.architecture, content.platform.variant],
        "layers": [
            [x.blob_digest, x.media_type, x.compressed_size_bytes, x.diff_id, x.position]
            for x in content.layers
        ],
    }


def content_from_plain(plain: dict[str, Any]) -> ImageContent:
    digest, env, cmd, entrypoint, working_dir, user, labels, stop_signal = plain["config"]
    return ImageContent(
        manifest_digest=plain["digest"],
        manifest_media_type=plain["media_type"],
        manifest_size=plain["size"],
        config=ImageConfig(
            digest=digest,
            env=tuple(env),
            cmd=None if cmd is None else tuple(cmd),
            entrypoint=None if entrypoint is None else tuple(entrypoint),
            working_dir=working_dir,
            user=user,
            labels=tuple((k, v) for k, v in labels),
            stop_signal=stop_signal,
        ),
        config_size=plain["config_size"],
        platform=Platform(*plain["platform"]),
        layers=tuple(Layer(*layer) for layer in plain["layers"]),
    )


# ---------------------------------------------------------------- the folds


def apply(view: ViewTxn, event: Any, position: int) -> None:
    """Fold one ledger event, at log `position`, into the views (see `mark` for meta)."""
    handler = _HANDLERS.get(type(event))
    if handler is not None:
        handler(view, event, position, micros(event.timestamp))


def mark(view: ViewTxn, event: Any, position: int) -> None:
    """Record that the views include the log up to `position` (the last event of a batch)."""
    view.put("meta", b"position", position)
    view.put("meta", b"version", event.originator_version)
    view.put("meta", b"modified", micros(event.timestamp))


def _history(
    view: ViewTxn, reference: str, position: int, at: int, event: Any, manifest: str, detail: str
) -> None:
    actor: Actor = event.actor
    view.put(
        "history",
        _key(reference) + b"\0" + _U64.pack(position),
        {
            "e": type(event).__name__,
            "at": at,
            "m": manifest,
            "d": detail,
            "who": [actor.user, actor.uid, actor.host, actor.pid, actor.version],
        },
    )


def _pulled(view: ViewTxn, event: ImageLedger.ImagePulled, position: int, at: int) -> None:
    content = event.content
    digest = content.manifest_digest
    reference = event.reference
    manifest = view.get("manifests", _key(digest))
    if manifest is None:
        manifest = {"content": content_to_plain(content), "refs": [], "holders": [], "u": at}
        for blob, kind, size in content.kinded_blobs():
            record = view.get("blobs", _key(blob)) or {"kind": kind, "size": size, "users": []}
            record["users"] = _insert(record["users"], digest)
            view.put("blobs", _key(blob), record)
    manifest["refs"] = _insert(manifest["refs"], reference)
    manifest["u"] = at
    view.put("manifests", _key(digest), manifest)

    ref = view.get("refs", _key(reference))
    if ref is None or ref["m"] != digest:
        if ref is None:
            ref = {"m": digest, "c": at, "u": at, "p": position}
        else:
            _untag(view, reference, ref["m"])
            ref["m"] = digest
        ref["a"] = content.platform.architecture
        ref["o"] = content.platform.os
        ref["n"] = len(content.layers)
        ref["s"] = content.size_bytes
    ref["u"] = at
    _put_ref(view, reference, ref)
    detail = f"from {event.source}" + (" (all cached)" if event.cached else "")
    _history(view, reference, position, at, event, digest, detail)


def _put_ref(view: ViewTxn, reference: str, ref: dict[str, Any]) -> None:
    """A reference's record, and its row in creation order (all list() needs, in one scan)."""
    view.put("refs", _key(reference), ref)
    view.put(
        "refs.order",
        _U64.pack(ref["c"]) + _U64.pack(ref["p"]),
        [reference, ref["m"], ref["c"], ref["u"], ref["a"], ref["o"], ref["n"], ref["s"]],
    )


def _untag(view: ViewTxn, reference: str, digest: str) -> None:
    manifest = view.get("manifests", _key(digest))
    if manifest is not None:
        manifest["refs"] = _without(manifest["refs"], reference)
        view.put("manifests", _key(digest), manifest)


def _drop_reference(view: ViewTxn, reference: str) -> None:
    ref = view.get("refs", _key(reference))
    if ref is None:
        return
    view.delete("refs", _key(reference))
    view.delete("refs.order", _U64.pack(ref["c"]) + _U64.pack(ref["p"]))
    _untag(view, reference, ref["m"])


def _drop_content(view: ViewTxn, deleted: tuple[DeletedBlob, ...]) -> None:
    """Forget deleted manifests, and with them their claim on blobs: a blob no manifest uses
    any more leaves the views (deleted with them, or kept on disk for an in-flight pull that
    protected it: then it is an orphan to the ledger until that pull commits it again)."""
    for blob in deleted:
        if blob.kind != "manifest":
            continue
        manifest = view.get("manifests", _key(blob.digest))
        if manifest is None:
            continue
        view.delete("manifests", _key(blob.digest))
        for digest, _kind, _size in content_from_plain(manifest["content"]).kinded_blobs():
            record = view.get("blobs", _key(digest))
            if record is None:
                continue
            record["users"] = _without(record["users"], blob.digest)
            if record["users"]:
                view.put("blobs", _key(digest), record)
            else:
                view.delete("blobs", _key(digest))
    for blob in deleted:
        record = view.get("blobs", _key(blob.digest))
        if record is not None and not record["users"]:
            view.delete("blobs", _key(blob.digest))


def _used(view: ViewTxn, event: ImageLedger.ImageUsed, position: int, at: int) -> None:
    lease = [event.reference, event.manifest_digest]
    leases = view.get("holders", _key(event.holder)) or []
    view.put("holders", _key(event.holder), _insert(leases, lease))
    manifest = view.get("manifests", _key(event.manifest_digest))
    if manifest is not None:
        manifest["holders"] = _insert(manifest["holders"], event.holder)
        manifest["u"] = at
        view.put("manifests", _key(event.manifest_digest), manifest)
    ref = view.get("refs", _key(event.reference))
    if ref is not None:
        ref["u"] = at
        _put_ref(view, event.reference, ref)
    _history(
        view, event.reference, position, at, event, event.manifest_digest, f"by {event.holder}"
    )


def _released(view: ViewTxn, event: ImageLedger.HolderReleased, position: int, at: int) -> None:
    view.delete("holders", _key(event.holder))
    for reference, digest in event.leases:
        manifest = view.get("manifests", _key(digest))
        if manifest is not None:
            manifest["holders"] = _without(manifest["holders"], event.holder)
            view.put("manifests", _key(digest), manifest)
        _history(view, reference, position, at, event, digest, f"by {event.holder}")


def _removed(view: ViewTxn, event: ImageLedger.ImageRemoved, position: int, at: int) -> None:
    _drop_reference(view, event.reference)
    _drop_content(view, event.deleted)
    detail = ("forced, " if event.forced else "") + (
        f"deleted {len(event.deleted)} blobs, {event.bytes_reclaimed} bytes"
        if event.deleted
        else "untagged"
    )
    _history(view, event.reference, position, at, event, event.manifest_digest, detail)


def _refused(view: ViewTxn, event: ImageLedger.RemoveRefused, position: int, at: int) -> None:
    detail = "in use by " + ", ".join(event.holders)
    _history(view, event.reference, position, at, event, event.manifest_digest, detail)


def _failed(view: ViewTxn, event: ImageLedger.PullFailed, position: int, at: int) -> None:
    if not event.reference:
        return  # an unnamed archive: the failure is in the log (whole-ledger history) only
    _history(view, event.reference, position, at, event, "", f"from {event.source}: {event.error}")


def _pruned(view: ViewTxn, event: ImageLedger.ImagesPruned, position: int, at: int) -> None:
    for removed in event.references:
        _drop_reference(view, removed.reference)
        _history(
            view, removed.reference, position, at, event, removed.manifest_digest, removed.reason
        )
    _drop_content(view, event.deleted)
    view.put("prunes", _U64.pack(position), prune_report_plain(event))


def prune_report_plain(event: ImageLedger.ImagesPruned) -> dict[str, Any]:
    kinds = [blob.kind for blob in event.deleted]
    return {
        "now": micros(event.now),
        "image_refs_removed": len(event.references),
        "manifests_removed": kinds.count("manifest"),
        "layers_removed": kinds.count("layer"),
        "fsmeta_removed": kinds.count("fsmeta"),
        "vmdk_removed": kinds.count("vmdk"),
        "bytes_reclaimed": event.bytes_reclaimed,
        "references": [[r.reference, r.manifest_digest, r.reason] for r in event.references],
        "deleted": [[b.digest, b.kind, b.size, b.reason] for b in event.deleted],
    }


_HANDLERS: Final[dict[type[Any], Any]] = {
    ImageLedger.ImagePulled: _pulled,
    ImageLedger.ImageUsed: _used,
    ImageLedger.HolderReleased: _released,
    ImageLedger.ImageRemoved: _removed,
    ImageLedger.RemoveRefused: _refused,
    ImageLedger.PullFailed: _failed,
    ImageLedger.ImagesPruned: _pruned,
}


# ---------------------------------------------------------------- the reader


class ViewState:
    """`CacheState` over one view transaction (a consistent snapshot)."""

    def __init__(self, view: ViewTxn) -> None:
        self.view = view

    @property
    def position(self) -> int:
        return int(self.view.get("meta", b"position") or 0)

    @property
    def version(self) -> int:
        return int(self.view.get("meta", b"version") or 0)

    @property
    def modified(self) -> datetime | None:
        us = self.view.get("meta", b"modified")
        return None if us is None else from_micros(us)

    def reference(self, reference: str) -> ReferenceRecord | None:
        ref = self.view.get("refs", _key(reference))
        if ref is None:
            return None
        return ReferenceRecord(
            reference=reference,
            manifest_digest=ref["m"],
            created_at=from_micros(ref["c"]),
            last_used_at=from_micros(ref["u"]),
            created_position=ref["p"],
            architecture=ref["a"],
            os=ref["o"],
            layer_count=ref["n"],
            size_bytes=ref["s"],
        )

    def references(self) -> Iterator[ReferenceRecord]:
        for _, row in self.view.scan("refs.order", reverse=True):
            reference, manifest, created, used, arch, os_, layers, size = row
            yield ReferenceRecord(
                reference=reference,
                manifest_digest=manifest,
                created_at=from_micros(created),
                last_used_at=from_micros(used),
                created_position=_U64.unpack(_[8:])[0],
                architecture=arch,
                os=os_,
                layer_count=layers,
                size_bytes=size,
            )

    def handles(self) -> Iterator[ImageHandle]:
        """list(): every handle, newest first, straight from one scan."""
        for _, row in self.view.scan("refs.order", reverse=True):
            reference, manifest, created, used, arch, os_, layers, size = row
            yield ImageHandle(
                reference,
                manifest,
                arch,
                os_,
                layers,
                size,
                from_micros(created),
                from_micros(used),
            )

    def manifest(self, digest: str) -> ManifestRecord | None:
        manifest = self.view.get("manifests", _key(digest))
        return None if manifest is None else _manifest_record(manifest)

    def manifests(self) -> Iterator[ManifestRecord]:
        for _, manifest in self.view.scan("manifests"):
            yield _manifest_record(manifest)

    def blob(self, digest: str) -> BlobRecord | None:
        record = self.view.get("blobs", _key(digest))
        return None if record is None else _blob_record(digest, record)

    def blobs(self) -> Iterator[BlobRecord]:
        for key, record in self.view.scan("blobs"):
            yield _blob_record(key.decode(), record)

    def holder(self, holder: str) -> tuple[tuple[str, str], ...]:
        return tuple((r, m) for r, m in self.view.get("holders", _key(holder)) or [])

    def holders(self) -> Iterator[tuple[str, tuple[tuple[str, str], ...]]]:
        for key, leases in self.view.scan("holders"):
            yield key.decode(), tuple((r, m) for r, m in leases)

    def history(self, reference: str) -> Iterator[tuple[int, dict[str, Any]]]:
        for key, entry in self.view.scan("history", prefix=_key(reference) + b"\0"):
            yield _U64.unpack(key[-8:])[0], entry

    def prunes(self) -> Iterator[tuple[int, dict[str, Any]]]:
        for key, report in self.view.scan("prunes"):
            yield _U64.unpack(key)[0], report


def _manifest_record(manifest: dict[str, Any]) -> ManifestRecord:
    return ManifestRecord(
        content=content_from_plain(manifest["content"]),
        references=tuple(manifest["refs"]),
        holders=tuple(manifest["holders"]),
        last_used_at=from_micros(manifest["u"]),
    )


def _blob_record(digest: str, record: dict[str, Any]) -> BlobRecord:
    return BlobRecord(digest, record["kind"], record["size"], tuple(record["users"]))
