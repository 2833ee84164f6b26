"""The views: pure folds from ledger events to tables, and the reader over those tables.

`apply(view, event, position)` is the whole projection: it reads and writes only through the
`ViewRecords` port, uses only the event and its position, and writes only plain values with
sorted lists, so the tables after N events are the same bytes whether they were maintained one
commit at a time or rebuilt from the log (semantics 10). No clock, no host fact, no set or dict
order.

Tables (keys are bytes; values plain data):
- ``refs``: reference -> {m: manifest, c: created_at us, u: last_used_at us, p: created position}
- ``refs.order``: created_at us (8 bytes) + created position (8 bytes) -> the reference's
  handle: `ImageHandle`'s fields in order (`HANDLE_FIELDS`), its two times as UTC datetimes,
  so that list() makes each row a handle in one step (see `handles`)
- ``manifests``: digest -> {content, refs: [...], holders: [...], u: last used us}
- ``blobs``: digest -> {kind, size, users: [manifest digests]} (content reference counts)
- ``holders``: holder -> [[reference, manifest], ...]
- ``history``: reference + NUL + position (8 bytes) -> true: which events concern a reference;
  the entries are made from those events in the log when asked for (`reference_entries`), so
  the log stays the one record of who did what (`domain.history`)
- ``index``: reference -> its entry in index.json, as the canonical JSON bytes it adds there
  (`projections.index`), so that writing index.json only joins them
- ``configs``: config digest -> the config (`config_to_array`), for every config the log ever
  carried: the ledger stores a config's content only in the first event that brings it, so
  an event read alone resolves the digest it names here (`storage.ledgerformat`)
- ``erofs``: layer blob digest -> [diff_id, path, EROFS digest, size, materializer]: the
  layer's EROFS image (the last `LayerMaterialized`); gone when the blob leaves the views
- ``stitched``: manifest digest -> [fsmeta path, digest, size, VMDK path, digest, size,
  [layer EROFS digests], materializer] (the last `ImageStitched`); gone with the manifest
- ``meta``: b"position", b"version", b"modified", b"format" -> int

`FORMAT` numbers the layout above; views written by another layout are rebuilt from the log on
open. `APPEND_ONLY` names the tables whose rows are written once per event and never read by
the folds: a rebuild streams them out instead of holding them.
"""

from __future__ import annotations

import re
import struct
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from imageledger.domain.errors import LedgerCorruptError
from imageledger.domain.history import mentions
from imageledger.domain.model import (
    ArtifactFile,
    BlobRecord,
    CachedImage,
    DeletedBlob,
    H,
    ImageConfig,
    ImageContent,
    Layer,
    LayerArtifactRecord,
    ManifestRecord,
    Platform,
    PullEndpoint,
    ReferenceRecord,
    StitchedRecord,
    config_from_array,
    config_to_array,
)
from imageledger.domain.ports import ViewRecords, ViewTxn
from imageledger.projections.index import index_entry

if TYPE_CHECKING:
    from imageledger.domain.events import ImageLedger

TABLES: Final = (
    "refs",
    "refs.order",
    "manifests",
    "blobs",
    "holders",
    "history",
    "index",
    "configs",
    "erofs",
    "stitched",
    "endpoints",
    "meta",
)
APPEND_ONLY: Final = ("history",)
PRESENT_ONLY: Final = ("history", "index")
"""The tables no past state needs (`LedgerStore.at`, view checkpoints): the history index
(past queries read the log itself) and the index.json entries (written for the home as it is
now). The folds never read them, so a replay without them folds the other tables alike."""
HANDLE_FIELDS: Final = tuple(f.name for f in fields(CachedImage))
# 3: meta "shown", the position of the last event that changed what index.json shows.
# 7: ``erofs`` and ``stitched``, the materialized artifacts (issue 13).
# 8: ``endpoints``, where the registry pull that last named a reference came from (issue 14).
FORMAT: Final = 8
_U64: Final = struct.Struct(">Q")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def micros(at: datetime) -> int:
    """A timestamp as integer microseconds since the epoch (views hold no floats)."""
    delta = at - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


_MOMENTS: dict[int, datetime] = {}
_MOMENTS_LIMIT: Final = 65_536


def from_micros(us: int) -> datetime:
    """The instant `us` microseconds after the epoch. A replay rebuilds a reference's row at
    every pull of it, each with its creation time: the instants repeat, and a datetime is
    immutable, so the last few thousand are kept (a tenth of the cost of making one)."""
    at = _MOMENTS.get(us)
    if at is None:
        if len(_MOMENTS) >= _MOMENTS_LIMIT:
            _MOMENTS.clear()
        at = _MOMENTS[us] = _EPOCH + timedelta(microseconds=us)
    return at


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
    return {
        "digest": content.manifest_digest,
        "media_type": content.manifest_media_type,
        "size": content.manifest_size,
        "config": config_to_array(content.config),
        "config_size": content.config_size,
        "platform": [content.platform.os, content.platform.architecture, content.platform.variant],
        "layers": [
            [x.blob_digest, x.media_type, x.compressed_size_bytes, x.diff_id, x.position]
            for x in content.layers
        ],
    }


def content_from_plain(plain: dict[str, Any]) -> ImageContent:
    return ImageContent(
        manifest_digest=plain["digest"],
        manifest_media_type=plain["media_type"],
        manifest_size=plain["size"],
        config=config_from_array(plain["config"]),
        config_size=plain["config_size"],
        platform=Platform(*plain["platform"]),
        layers=tuple(Layer(*layer) for layer in plain["layers"]),
    )


# ---------------------------------------------------------------- the folds


def apply(view: ViewRecords, event: Any, position: int) -> None:
    """Fold one ledger event, at log `position`, into the views (see `mark` for meta)."""
    handler = _HANDLERS.get(type(event).__name__)
    if handler is not None:
        handler(view, event, position, micros(event.timestamp))
    suffix = b"\0" + _U64.pack(position)
    for reference, _manifest in mentions(event):
        view.put("history", reference.encode() + suffix, True)


def mark(view: ViewRecords, event: Any, position: int) -> None:
    """Record that the views include the log up to `position` (the last event of a batch)."""
    view.put("meta", b"position", position)
    view.put("meta", b"version", event.originator_version)
    view.put("meta", b"modified", micros(event.timestamp))
    view.put("meta", b"format", FORMAT)


def _pulled(
    view: ViewRecords,
    event: ImageLedger.ImagePulled | ImageLedger.ImageTagged,
    position: int,
    at: int,
    *,
    use: bool = True,
) -> None:
    """`event.reference` names `event.content` from now on. A pull is a use of the image
    (its manifest's last use moves); a tag (`use` false) is not, but the name it makes or
    moves is new: its created_at (when it had none) and last_used_at are the tag's time."""
    view.put("meta", b"shown", position)
    content = event.content
    digest = content.manifest_digest
    reference = event.reference
    manifest = view.get("manifests", digest.encode())
    if manifest is None:
        manifest = {"content": content_to_plain(content), "refs": [], "holders": [], "u": at}
        for blob, kind, size in content.kinded_blobs():
            record = view.get("blobs", blob.encode()) or {"kind": kind, "size": size, "users": []}
            record["users"] = _insert(record["users"], digest)
            view.put("blobs", blob.encode(), record)
        # Configs are never forgotten: one a manifest in the views names is in `configs`
        # since that manifest came, so only a manifest new to the views can bring one.
        config = content.config.digest.encode()
        if view.get("configs", config) is None:
            view.put("configs", config, config_to_array(content.config))
    manifest["refs"] = _insert(manifest["refs"], reference)
    if use:
        manifest["u"] = at
    view.put("manifests", digest.encode(), manifest)

    ref = view.get("refs", reference.encode())
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
        # The reference's entry in index.json depends on nothing but the reference and its
        # manifest: a pull that finds the reference on the same manifest leaves it as it is.
        view.put("index", reference.encode(), index_entry(reference, content))
    ref["u"] = at
    _put_ref(view, reference, ref, event.timestamp)
    # Where the name's latest pull came from (`inspect`), in a table of its own so that the
    # reference's row (read by every get and use) stays small; a load, a tag or a pull the
    # cache answered itself came from no registry.
    served = getattr(event, "endpoints", ())
    if served:
        view.put("endpoints", reference.encode(), [e.as_array() for e in served])
    elif view.get("endpoints", reference.encode()) is not None:
        view.delete("endpoints", reference.encode())


def _tagged(view: ViewRecords, event: ImageLedger.ImageTagged, position: int, at: int) -> None:
    _pulled(view, event, position, at, use=False)


def _put_ref(view: ViewRecords, reference: str, ref: dict[str, Any], used: datetime) -> None:
    """A reference's record, and its row in creation order (all list() needs, in one scan).
    `used` is the event's own timestamp (ref["u"] in microseconds): no datetime is rebuilt
    from an integer unless the reference is older than this event."""
    view.put("refs", reference.encode(), ref)
    view.put(
        "refs.order",
        _U64.pack(ref["c"]) + _U64.pack(ref["p"]),
        [
            reference,
            ref["m"],
            ref["a"],
            ref["o"],
            ref["n"],
            ref["s"],
            used if ref["c"] == ref["u"] else from_micros(ref["c"]),
            used,
        ],
    )


def _untag(view: ViewRecords, reference: str, digest: str) -> None:
    manifest = view.get("manifests", digest.encode())
    if manifest is not None:
        manifest["refs"] = _without(manifest["refs"], reference)
        view.put("manifests", digest.encode(), manifest)


def _drop_reference(view: ViewRecords, reference: str) -> None:
    ref = view.get("refs", reference.encode())
    if ref is None:
        return
    view.delete("refs", reference.encode())
    if view.get("endpoints", reference.encode()) is not None:
        view.delete("endpoints", reference.encode())
    view.delete("refs.order", _U64.pack(ref["c"]) + _U64.pack(ref["p"]))
    view.delete("index", reference.encode())
    _untag(view, reference, ref["m"])


def _drop_content(view: ViewRecords, deleted: tuple[DeletedBlob, ...]) -> None:
    """Forget deleted manifests, and with them their claim on blobs: a blob no manifest uses
    any more leaves the views (deleted with them, or kept on disk for an in-flight pull that
    protected it: then it is an orphan to the ledger until that pull commits it again)."""
    for blob in deleted:
        if blob.kind != "manifest":
            continue
        manifest = view.get("manifests", blob.digest.encode())
        if manifest is None:
            continue
        view.delete("manifests", blob.digest.encode())
        for digest, _kind, _size in content_from_plain(manifest["content"]).kinded_blobs():
            record = view.get("blobs", digest.encode())
            if record is None:
                continue
            record["users"] = _without(record["users"], blob.digest)
            if record["users"]:
                view.put("blobs", digest.encode(), record)
            else:
                _drop_blob(view, digest)
        view.delete("stitched", blob.digest.encode())
    for blob in deleted:
        record = view.get("blobs", blob.digest.encode())
        if record is not None and not record["users"]:
            _drop_blob(view, blob.digest)


def _drop_blob(view: ViewRecords, digest: str) -> None:
    """A blob leaves the views, and its EROFS image with it: deleted in the same event when
    the blob was (`policies.content_freed`); when the blob stays on disk for an in-flight
    pull, the image becomes a file the ledger does not account for, which prune reclaims."""
    view.delete("blobs", digest.encode())
    view.delete("erofs", digest.encode())


def _used(view: ViewRecords, event: ImageLedger.ImageUsed, position: int, at: int) -> None:
    lease = [event.reference, event.manifest_digest]
    leases = view.get("holders", event.holder.encode()) or []
    view.put("holders", event.holder.encode(), _insert(leases, lease))
    manifest = view.get("manifests", event.manifest_digest.encode())
    if manifest is not None:
        manifest["holders"] = _insert(manifest["holders"], event.holder)
        manifest["u"] = at
        view.put("manifests", event.manifest_digest.encode(), manifest)
    ref = view.get("refs", event.reference.encode())
    if ref is not None:
        ref["u"] = at
        _put_ref(view, event.reference, ref, event.timestamp)


def _released(view: ViewRecords, event: ImageLedger.HolderReleased, position: int, at: int) -> None:
    view.delete("holders", event.holder.encode())
    for _reference, digest in event.leases:
        manifest = view.get("manifests", digest.encode())
        if manifest is not None:
            manifest["holders"] = _without(manifest["holders"], event.holder)
            view.put("manifests", digest.encode(), manifest)


def _removed(view: ViewRecords, event: ImageLedger.ImageRemoved, position: int, at: int) -> None:
    view.put("meta", b"shown", position)
    _drop_reference(view, event.reference)
    _drop_content(view, event.deleted)


def _pruned(view: ViewRecords, event: ImageLedger.ImagesPruned, position: int, at: int) -> None:
    if event.references:
        view.put("meta", b"shown", position)
    for removed in event.references:
        _drop_reference(view, removed.reference)
    _drop_content(view, event.deleted)


def _materialized(
    view: ViewRecords, event: ImageLedger.LayerMaterialized, position: int, at: int
) -> None:
    erofs = event.erofs
    view.put(
        "erofs",
        event.blob_digest.encode(),
        [event.diff_id, erofs.path, erofs.digest, erofs.size, event.materializer],
    )


def _stitched(view: ViewRecords, event: ImageLedger.ImageStitched, position: int, at: int) -> None:
    fsmeta, vmdk = event.fsmeta, event.vmdk
    view.put(
        "stitched",
        event.manifest_digest.encode(),
        [
            fsmeta.path,
            fsmeta.digest,
            fsmeta.size,
            vmdk.path,
            vmdk.digest,
            vmdk.size,
            list(event.layers),
            event.materializer,
        ],
    )


# By the event class's name, its stored topic (see `domain.history` for why not the class).
_HANDLERS: Final[dict[str, Any]] = {
    "ImagePulled": _pulled,
    "ImageTagged": _tagged,
    "ImageUsed": _used,
    "HolderReleased": _released,
    "ImageRemoved": _removed,
    "ImagesPruned": _pruned,
    "LayerMaterialized": _materialized,
    "ImageStitched": _stitched,
}


# ---------------------------------------------------------------- the reader


# ---------------------------------------------------------------- checking what is read
#
# LMDB keeps no checksums: a damaged page can hand back a row that msgpack decodes but that
# no fold wrote (a digest that is not a digest, a string where a size belongs). The reader
# checks what it answers with, where that is cheap (types, the shape of digests), so that a
# damaged row fails as `LedgerCorruptError` (the transaction boundary names the ledger)
# instead of being printed as an answer. A row damaged into another well-formed value (one hex
# digit for another) cannot be told from a real one here: `rebuild --verify` and `verify`
# compare the views with a replay of the log.

_DIGEST_RE: Final = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")
_ROW_ERRORS: Final = (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError)


def _bad_row(table: str, key: bytes, error: BaseException | None = None) -> LedgerCorruptError:
    shown = key[:40].decode("utf-8", "backslashreplace")
    why = f" ({type(error).__name__})" if error is not None else ""
    return LedgerCorruptError(f"the views' {table} row {shown!r} is not a record they write{why}")


def _digest(value: Any) -> bool:
    return type(value) is str and _DIGEST_RE.fullmatch(value) is not None


def _text(value: Any) -> bool:
    return type(value) is str


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


_MAX_MICROS: Final = 253_402_300_800_000_000  # 10000-01-01: what from_micros can represent


def _micros(value: Any) -> bool:
    return type(value) is int and 0 <= value < _MAX_MICROS


def _checked_handle(row: Any) -> bool:
    """A refs.order row: the handle's fields in order (see `_put_ref`)."""
    return (
        type(row) is list
        and len(row) == 8
        and _text(row[0])
        and _digest(row[1])
        and _text(row[2])
        and _text(row[3])
        and _count(row[4])
        and _count(row[5])
        and type(row[6]) is datetime
        and type(row[7]) is datetime
    )


def _checked_ref(ref: Any) -> bool:
    return (
        type(ref) is dict
        and _digest(ref.get("m"))
        and _micros(ref.get("c"))
        and _micros(ref.get("u"))
        and _count(ref.get("p"))
        and _text(ref.get("a"))
        and _text(ref.get("o"))
        and _count(ref.get("n"))
        and _count(ref.get("s"))
    )


def _endpoints(plain: Any, key: bytes) -> tuple[PullEndpoint, ...]:
    """An ``endpoints`` row: where the pull that last named a reference came from."""
    try:
        return tuple(
            PullEndpoint(location, mirror, insecure, manifest, tuple(blobs))
            for location, mirror, insecure, manifest, blobs in plain
        )
    except (TypeError, ValueError):
        raise _bad_row("endpoints", key) from None


def _checked_blob(key: bytes, record: Any) -> str:
    """The digest of a blobs row, once the row is known to be one."""
    try:
        digest = key.decode()
    except UnicodeDecodeError as e:
        raise _bad_row("blobs", key, e) from None
    if not (
        _digest(digest)
        and type(record) is dict
        and _text(record.get("kind"))
        and _count(record.get("size"))
        and type(record.get("users")) is list
        and all(_digest(user) for user in record["users"])
    ):
        raise _bad_row("blobs", key)
    return digest


def _checked_leases(key: bytes, leases: Any) -> tuple[tuple[str, str], ...]:
    if type(leases) is not list or not all(
        type(lease) is list and len(lease) == 2 and _text(lease[0]) and _digest(lease[1])
        for lease in leases
    ):
        raise _bad_row("holders", key)
    return tuple((r, m) for r, m in leases)


def _meta_int(view: ViewTxn, key: bytes) -> int | None:
    value = view.get("meta", key)
    if value is None:
        return None
    if not _count(value):
        raise _bad_row("meta", key)
    return int(value)


class ViewState:
    """`CacheState` over one view transaction (a consistent snapshot). What it reads is
    checked as it is turned into records (see `_bad_row`)."""

    def __init__(self, view: ViewTxn) -> None:
        self.view = view

    @property
    def position(self) -> int:
        return _meta_int(self.view, b"position") or 0

    @property
    def version(self) -> int:
        return _meta_int(self.view, b"version") or 0

    @property
    def shown(self) -> int:
        """The position of the last event that changed what index.json shows (references and
        their manifests): uses, releases and failures do not, so they need no index write."""
        return _meta_int(self.view, b"shown") or 0

    @property
    def format(self) -> int | None:
        """The `FORMAT` the views were written in (None before the first event)."""
        return _meta_int(self.view, b"format")

    @property
    def modified(self) -> datetime | None:
        us = _meta_int(self.view, b"modified")
        if us is None:
            return None
        if not _micros(us):
            raise _bad_row("meta", b"modified")
        return from_micros(us)

    def reference(self, reference: str) -> ReferenceRecord | None:
        key = reference.encode()
        ref = self.view.get("refs", key)
        if ref is None:
            return None
        if not _checked_ref(ref):
            raise _bad_row("refs", key)
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
        for key, row in self.view.scan("refs.order", reverse=True):
            if len(key) != 16 or not _checked_handle(row):
                raise _bad_row("refs.order", key)
            yield ReferenceRecord(
                created_position=_U64.unpack(key[8:])[0],
                **dict(zip(HANDLE_FIELDS, row, strict=True)),
            )

    def handles(self, memo: dict[bytes, H], cls: type[H]) -> Iterator[H]:
        """list(): every handle, newest first, straight from one scan.

        Each row holds the handle's fields in order (its datetimes decoded by the C unpacker),
        so a handle gets them as its `__dict__` in one step, the way eventsourcing rebuilds its
        events, instead of the frozen dataclass's field-by-field `__init__`. With a `memo` (the
        encoded rows of the previous scan and their handles), a row whose bytes are unchanged
        is not even decoded: a commit changes one or two rows, so list() after a commit costs
        the scan plus a dictionary hit per reference. Handles are immutable, so sharing them
        between lists is safe; the memo may be shared between threads, as every entry it
        holds is right for its key whoever wrote it."""
        previous = memo.copy()
        memo.clear()
        new, set_dict, names, decode = object.__new__, object.__setattr__, HANDLE_FIELDS, None
        for key, data in self.view.scan_encoded("refs.order", reverse=True):
            handle = previous.get(data)
            if handle is None:
                decode = decode or self.view.decode
                row = decode(data)
                if not _checked_handle(row):
                    raise _bad_row("refs.order", key)
                handle = new(cls)
                set_dict(handle, "__dict__", dict(zip(names, row, strict=True)))
            memo[data] = handle
            yield handle

    def manifest(self, digest: str) -> ManifestRecord | None:
        key = digest.encode()
        manifest = self.view.get("manifests", key)
        return None if manifest is None else _manifest_record(key, manifest)

    def manifests(self) -> Iterator[ManifestRecord]:
        for key, manifest in self.view.scan("manifests"):
            yield _manifest_record(key, manifest)

    def blob(self, digest: str) -> BlobRecord | None:
        key = digest.encode()
        record = self.view.get("blobs", key)
        return None if record is None else _blob_record(_checked_blob(key, record), record)

    def blobs(self) -> Iterator[BlobRecord]:
        for key, record in self.view.scan("blobs"):
            yield _blob_record(_checked_blob(key, record), record)

    def holder(self, holder: str) -> tuple[tuple[str, str], ...]:
        key = holder.encode()
        return _checked_leases(key, self.view.get("holders", key) or [])

    def endpoints(self, reference: str) -> tuple[PullEndpoint, ...]:
        """Where the registry pull that last named `reference` came from (none for a name a
        load or a tag gave, or a pull the cache answered itself)."""
        key = reference.encode()
        row = self.view.get("endpoints", key)
        return () if row is None else _endpoints(row, key)

    def layer_artifact(self, blob_digest: str) -> LayerArtifactRecord | None:
        """The EROFS image of layer blob `blob_digest`, if it was materialized."""
        key = blob_digest.encode()
        row = self.view.get("erofs", key)
        return None if row is None else _layer_artifact(key, row)

    def layer_artifacts(self) -> Iterator[LayerArtifactRecord]:
        for key, row in self.view.scan("erofs"):
            yield _layer_artifact(key, row)

    def stitched(self, manifest_digest: str) -> StitchedRecord | None:
        """The fsmeta and VMDK of manifest `manifest_digest`, if it was stitched."""
        key = manifest_digest.encode()
        row = self.view.get("stitched", key)
        return None if row is None else _stitched_record(key, row)

    def stitched_all(self) -> Iterator[StitchedRecord]:
        for key, row in self.view.scan("stitched"):
            yield _stitched_record(key, row)

    def config(self, digest: str) -> ImageConfig | None:
        """A config the log has carried (see the ``configs`` table)."""
        key = digest.encode()
        row = self.view.get("configs", key)
        if row is None:
            return None
        try:
            return config_from_array(row)
        except _ROW_ERRORS as e:
            raise _bad_row("configs", key, e) from None

    def index_entries(self) -> Iterator[bytes]:
        """Every reference's index.json entry, in reference order (`projections.index`)."""
        for key, entry in self.view.scan("index"):
            if type(entry) is not bytes:
                raise _bad_row("index", key)
            yield entry

    def history(self, reference: str) -> Iterator[int]:
        """The log positions of `reference`'s events, oldest first (`reference_entries`
        makes the entries from those events)."""
        prefix = reference.encode() + b"\0"
        for key, _ in self.view.scan("history", prefix=prefix):
            if len(key) != len(prefix) + 8:
                raise _bad_row("history", key)
            yield _U64.unpack(key[-8:])[0]


def _manifest_record(key: bytes, manifest: Any) -> ManifestRecord:
    try:
        record = ManifestRecord(
            content=content_from_plain(manifest["content"]),
            references=tuple(manifest["refs"]),
            holders=tuple(manifest["holders"]),
            last_used_at=from_micros(manifest["u"]),
        )
    except _ROW_ERRORS as e:
        raise _bad_row("manifests", key, e) from None
    content = record.content
    if not (
        _digest(content.manifest_digest)
        and key == content.manifest_digest.encode()
        and _digest(content.config.digest)
        and _count(content.manifest_size)
        and _count(content.config_size)
        and all(_text(r) for r in record.references)
        and all(_text(h) for h in record.holders)
        and all(_digest(x.blob_digest) and _count(x.compressed_size_bytes) for x in content.layers)
    ):
        raise _bad_row("manifests", key)
    return record


def _artifact_file(path: Any, digest: Any, size: Any) -> ArtifactFile:
    if not (_text(path) and path.startswith("artifacts/") and _digest(digest) and _count(size)):
        raise ValueError("not an artifact")
    return ArtifactFile(path, digest, size)


def _layer_artifact(key: bytes, row: Any) -> LayerArtifactRecord:
    try:
        diff_id, path, digest, size, materializer = row
        record = LayerArtifactRecord(
            key.decode(), diff_id, _artifact_file(path, digest, size), materializer
        )
    except _ROW_ERRORS as e:
        raise _bad_row("erofs", key, e) from None
    if not (_digest(record.blob_digest) and _digest(diff_id) and _text(materializer)):
        raise _bad_row("erofs", key)
    return record


def _stitched_record(key: bytes, row: Any) -> StitchedRecord:
    try:
        fsmeta_path, fsmeta_digest, fsmeta_size, vmdk_path, vmdk_digest, vmdk_size = row[:6]
        layers, materializer = row[6:]
        record = StitchedRecord(
            key.decode(),
            _artifact_file(fsmeta_path, fsmeta_digest, fsmeta_size),
            _artifact_file(vmdk_path, vmdk_digest, vmdk_size),
            tuple(layers),
            materializer,
        )
    except _ROW_ERRORS as e:
        raise _bad_row("stitched", key, e) from None
    if not (
        _digest(record.manifest_digest)
        and all(_digest(layer) for layer in record.layers)
        and _text(materializer)
    ):
        raise _bad_row("stitched", key)
    return record


def _blob_record(digest: str, record: dict[str, Any]) -> BlobRecord:
    return BlobRecord(digest, record["kind"], record["size"], tuple(record["users"]))
