"""The stored bytes of imageledger's events, format 2 (docs/FORMAT.md is their specification).

`LedgerMapper` is the eventsourcing `Mapper` of the ledger's application: it turns each
`ImageLedger` event into a `StoredEvent` whose topic is the event's short name (``ImagePulled``,
never a Python module path) and whose state is one MessagePack array in the documented field
order, and back. Why not the generic canonical transcoder (`storage.transcoder`, format 1): its
timestamps, UUIDs, tuples and value types were MessagePack extensions decoded by Python hooks,
about 8 us an event; here every field decodes in msgpack's C unpacker (timestamps are
MessagePack's own timestamp extension, which the unpacker makes into a UTC datetime; value
types are plain arrays), and a reader in any language needs only a MessagePack library and
FORMAT.md.

Canonical: the packer writes only arrays, integers in their smallest form, str, nil, bool and
timestamps (an instant has one encoding), so the same event always gives the same bytes.
Timestamps are instants: an event stamped in another UTC offset comes back in UTC (the same
instant; format 1 kept the offset).

An image config's content is carried by the first event that brings it into the ledger; later
events name it by digest (a config is content-addressed: the digest fixes it). "Already in the
ledger" is decided only from what is committed (`configs`, the views' table of configs seen)
and from earlier events of the same append, so an event never names a config that no earlier
event in the log carries. Decoding resolves a named config from the configs this mapper has
decoded (a replay reads the log in order) or, for an event read alone, from `configs`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Final
from uuid import UUID

import msgpack
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Mapper, StoredEvent, Transcoder
from eventsourcing.utils import get_topic

from imageledger.domain.events import ImageLedger
from imageledger.domain.model import (
    Actor,
    ArtifactFile,
    DeletedBlob,
    DiskUsage,
    GcPolicy,
    ImageConfig,
    ImageContent,
    Layer,
    Platform,
    PrunePolicy,
    PullEndpoint,
    RemovedReference,
    config_from_array,
    config_to_array,
)
from imageledger.storage.transcoder import UndecodableDataError

# The stored topic of each event class: its short name, stable whatever the Python module.
CLASSES: Final[dict[str, type[Any]]] = {
    "Started": ImageLedger.Started,
    "ImagePulled": ImageLedger.ImagePulled,
    "ImageTagged": ImageLedger.ImageTagged,
    "PullFailed": ImageLedger.PullFailed,
    "ImageUsed": ImageLedger.ImageUsed,
    "HolderReleased": ImageLedger.HolderReleased,
    "ImageRemoved": ImageLedger.ImageRemoved,
    "RemoveRefused": ImageLedger.RemoveRefused,
    "ImagesPruned": ImageLedger.ImagesPruned,
    "LayerMaterialized": ImageLedger.LayerMaterialized,
    "ImageStitched": ImageLedger.ImageStitched,
}
TOPICS: Final[dict[type[Any], str]] = {cls: name for name, cls in CLASSES.items()}
# The fields after [timestamp, actor], in stored order, of each event.
FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "Started": (),
    "ImagePulled": ("reference", "source", "content", "cached"),
    "ImageTagged": ("reference", "source_reference", "content"),
    "PullFailed": ("reference", "source", "error"),
    "ImageUsed": ("reference", "manifest_digest", "holder"),
    "HolderReleased": ("holder", "leases"),
    "ImageRemoved": ("reference", "manifest_digest", "forced", "deleted", "bytes_reclaimed"),
    "RemoveRefused": ("reference", "manifest_digest", "holders"),
    "ImagesPruned": ("policy", "now", "references", "deleted", "bytes_reclaimed"),
    "LayerMaterialized": (
        "reference",
        "manifest_digest",
        "blob_digest",
        "diff_id",
        "erofs",
        "materializer",
    ),
    "ImageStitched": ("reference", "manifest_digest", "fsmeta", "vmdk", "layers", "materializer"),
}

_LEDGER_TOPIC: Final = get_topic(ImageLedger)
_MEMO_LIMIT: Final = 65_536

ConfigLookup = Callable[[str], ImageConfig | None]


# ---------------------------------------------------------------- value types as arrays


def _actor(actor: Actor) -> list[Any]:
    return [actor.user, actor.uid, actor.pid, actor.host, actor.version]


def _content(content: ImageContent, config: list[Any] | str) -> list[Any]:
    platform = content.platform
    return [
        content.manifest_digest,
        content.manifest_media_type,
        content.manifest_size,
        config,
        content.config_size,
        [platform.os, platform.architecture, platform.variant],
        [
            [
                layer.blob_digest,
                layer.media_type,
                layer.compressed_size_bytes,
                layer.diff_id,
                layer.position,
            ]
            for layer in content.layers
        ],
    ]


def _deleted(deleted: tuple[DeletedBlob, ...]) -> list[Any]:
    return [[d.digest, d.kind, d.size, d.reason] for d in deleted]


def _policy(policy: PrunePolicy) -> list[Any]:
    stored: list[Any] = [policy.dry_run, policy.unused_for_seconds, list(policy.keep)]
    stored.append(policy.max_bytes)
    gc = policy.gc
    if gc is not None:  # a fifth element for a gc only: a prune is stored as it always was
        disk = [gc.disk.size, gc.disk.used, gc.disk.available]
        stored.append(
            [gc.high_threshold, gc.low_threshold, gc.min_age_seconds, gc.max_age_seconds, disk]
        )
    return stored


def _gc(plain: Any) -> GcPolicy:
    high, low, min_age, max_age, (size, used, available) = plain
    return GcPolicy(
        _int(high, "policy"),
        _int(low, "policy"),
        _int(min_age, "policy"),
        None if max_age is None else _int(max_age, "policy"),
        DiskUsage(_int(size, "policy"), _int(used, "policy"), _int(available, "policy")),
    )


def _artifact_array(artifact: ArtifactFile) -> list[Any]:
    return [artifact.path, artifact.digest, artifact.size]


# Value types stored as one array each (by their exact type).
_ARRAYS: Final[dict[type[Any], Callable[[Any], list[Any]]]] = {
    PrunePolicy: _policy,
    ArtifactFile: _artifact_array,
}


class _Batch(threading.local):
    configs: set[str] | None = None


class LedgerMapper(Mapper[UUID]):
    """Format 2's mapper (see the module docstring). `configs` looks up a config the views
    hold (None if they do not); `LedgerStore` sets it once the views exist."""

    def __init__(self, transcoder: Transcoder | None = None) -> None:
        # The Mapper interface wants a transcoder; format 2 does not use one.
        super().__init__(transcoder or _NoTranscoder())
        self.configs: ConfigLookup = lambda _digest: None
        self._pack = msgpack.Packer(use_bin_type=True, datetime=True).pack
        self._pack_lock = threading.Lock()  # a Packer is not thread-safe
        self._batch = _Batch()
        # Configs this mapper has read or written, to resolve a digest when decoding (a
        # config is fixed by its digest); never to decide what an event stores.
        self._known: dict[str, ImageConfig] = {}
        self._actors: dict[tuple[Any, ...], Actor] = {}
        self._contents: dict[tuple[Any, ...], ImageContent] = {}

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Around one append: a config carried by an earlier event of it is named by digest
        in the later ones (they commit together, in order)."""
        self._batch.configs = set()
        try:
            yield
        finally:
            self._batch.configs = None

    # -------------------------------------------------------------- encoding

    def to_stored_event(self, domain_event: DomainEventProtocol[Any]) -> StoredEvent:
        event: Any = domain_event
        name = TOPICS.get(type(event))
        if name is None:
            msg = f"{type(event).__qualname__} is not an event of the imageledger ledger"
            raise TypeError(msg)
        state = [event.timestamp, _actor(event.actor)]
        for field in FIELDS[name]:
            state.append(self._field(getattr(event, field)))
        if name == "ImagePulled" and event.endpoints:
            # A trailing element only for a pull that names its endpoints (FORMAT.md): a
            # load, and every pull of an older ledger, keep their four fields.
            state.append([e.as_array() for e in event.endpoints])
        with self._pack_lock:
            data = self._pack(state)
        return StoredEvent(
            originator_id=event.originator_id,
            originator_version=event.originator_version,
            topic=name,
            state=data,
        )

    def _field(self, value: Any) -> Any:
        if isinstance(value, ImageContent):
            return _content(value, self._config_field(value.config))
        as_array = _ARRAYS.get(type(value))
        if as_array is not None:
            return as_array(value)
        if isinstance(value, tuple):
            if value and isinstance(value[0], DeletedBlob):
                return _deleted(value)
            if value and isinstance(value[0], RemovedReference):
                return [[r.reference, r.manifest_digest, r.reason] for r in value]
            return [list(v) if isinstance(v, tuple) else v for v in value]
        return value

    def _config_field(self, config: ImageConfig) -> list[Any] | str:
        """The config as the event stores it: by digest when the log already holds it (an
        earlier event of this append carries it, or a committed one: the views' `configs`),
        else in full. Only what is committed decides, never what this mapper has seen (an
        append it encoded may have been rolled back), so a digest is never stored without a
        full config before it in the log."""
        carried = self._batch.configs
        if carried is not None and config.digest in carried:
            stored: list[Any] | str = config.digest
        elif self.configs(config.digest) is not None:
            stored = config.digest
        else:
            if carried is not None:
                carried.add(config.digest)
            stored = config_to_array(config)
        # Decoding this event (the append folds it at once) resolves the digest from here,
        # without reading the views inside the append's own transaction.
        self._known.setdefault(config.digest, config)
        return stored

    # -------------------------------------------------------------- decoding

    def to_domain_event(self, stored_event: StoredEvent) -> DomainEventProtocol[Any]:
        name = stored_event.topic
        cls = CLASSES.get(name)
        if cls is None:
            raise self._damaged(stored_event, f"unknown event type {name[:100]!r}")
        try:
            state = _unpack(stored_event.state, timestamp=3, strict_map_key=True)
            length = _LENGTHS[name]
            if type(state) is not list or not (
                length <= len(state) <= length + _OPTIONAL.get(name, 0)
            ):
                msg = f"its state is not an array of {length} fields"
                raise ValueError(msg)
            timestamp = state[0]
            if type(timestamp) is not datetime:
                msg = "its timestamp is not a MessagePack timestamp"
                raise ValueError(msg)
            values: dict[str, Any] = {
                "originator_id": stored_event.originator_id,
                "originator_version": stored_event.originator_version,
                "timestamp": timestamp,
                "actor": self._actor(state[1]),
            }
            _READERS[name](self, state, values)
        except UndecodableDataError as e:
            raise self._damaged(stored_event, str(e)) from e
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise self._damaged(stored_event, f"{type(e).__name__}: {e}") from e
        except Exception as e:  # msgpack's own errors (ExtraData, FormatError, StackError)
            raise self._damaged(stored_event, f"{type(e).__name__}: {e}") from e
        event = object.__new__(cls)
        object.__setattr__(event, "__dict__", values)
        return event  # type: ignore[no-any-return]

    @staticmethod
    def _damaged(stored_event: StoredEvent, why: str) -> UndecodableDataError:
        text = " ".join(why.split())
        if len(text) > 300:
            text = text[:297] + "..."
        return UndecodableDataError(
            f"stored event {stored_event.topic[:100]!r} of {stored_event.originator_id}"
            f" version {stored_event.originator_version}: {text}"
        )

    def _actor(self, plain: list[Any]) -> Actor:
        key = tuple(plain)
        actor = self._actors.get(key)
        if actor is None:
            user, uid, pid, host, version = plain
            actor = Actor(
                _str(user, "actor"),
                _int(uid, "actor"),
                _int(pid, "actor"),
                _str(host, "actor"),
                _str(version, "actor"),
            )
            if len(self._actors) < _MEMO_LIMIT:
                self._actors[key] = actor
        return actor

    def _content(self, plain: list[Any]) -> ImageContent:
        digest, media_type, size, config, config_size, platform, layers = plain
        config_digest = config if type(config) is str else config[0]
        key = (digest, config_digest, *platform)
        content = self._contents.get(key)
        if content is not None:
            return content
        content = ImageContent(
            manifest_digest=_str(digest, "content"),
            manifest_media_type=_str(media_type, "content"),
            manifest_size=_int(size, "content"),
            config=self._config(config),
            config_size=_int(config_size, "content"),
            platform=Platform(*platform),
            layers=tuple(Layer(*layer) for layer in layers),
        )
        if len(self._contents) < _MEMO_LIMIT:
            self._contents[key] = content
        return content

    def _config(self, config: list[Any] | str) -> ImageConfig:
        if not isinstance(config, str):
            decoded = config_from_array(config)
            self._known.setdefault(decoded.digest, decoded)
            return decoded
        known = self._known.get(config) or self.configs(config)
        if known is None:
            msg = f"it names config {config[:80]}, which no earlier event carries"
            raise UndecodableDataError(msg)
        self._known[config] = known
        return known


def _wrong(field: str, value: Any, expected: str) -> TypeError:
    return TypeError(f"{field}: expected {expected}, found {type(value).__name__}")


def _str(value: Any, field: str) -> str:
    if type(value) is not str:
        raise _wrong(field, value, "a string")
    return value


def _int(value: Any, field: str) -> int:
    if type(value) is not int:
        raise _wrong(field, value, "an integer")
    return value


def _flag(value: Any, field: str) -> bool:
    if type(value) is not bool:
        raise _wrong(field, value, "a boolean")
    return value


# One reader per event type: it checks and converts the fields after [timestamp, actor] in
# the order of `FIELDS` into `values`. Spelled out rather than looped over a table of field
# decoders: a replay decodes every event, and the loop cost more than the decoding (issue 10).
Reader = Callable[["LedgerMapper", list[Any], dict[str, Any]], None]


def _read_started(_mapper: LedgerMapper, _state: list[Any], values: dict[str, Any]) -> None:
    values["originator_topic"] = _LEDGER_TOPIC


def _read_pulled(mapper: LedgerMapper, state: list[Any], values: dict[str, Any]) -> None:
    reference, source, content, cached, *endpoints = state[2:]  # endpoints: 0 or 1 (FORMAT.md)
    values["reference"] = _str(reference, "reference")
    values["source"] = _str(source, "source")
    values["content"] = mapper._content(content)
    values["cached"] = _flag(cached, "cached")
    values["endpoints"] = _read_endpoints(endpoints[0]) if endpoints else ()


def _read_endpoints(plain: Any) -> tuple[PullEndpoint, ...]:
    if type(plain) is not list or not plain:
        msg = "endpoints: a non-empty array when present (an empty one is never stored)"
        raise ValueError(msg)
    out = []
    for endpoint in plain:
        location, mirror, insecure, manifest, blobs = endpoint
        out.append(
            PullEndpoint(
                _str(location, "endpoints"),
                _flag(mirror, "endpoints"),
                _flag(insecure, "endpoints"),
                _flag(manifest, "endpoints"),
                tuple(_str(blob, "endpoints") for blob in blobs),
            )
        )
    return tuple(out)


def _read_tagged(mapper: LedgerMapper, state: list[Any], values: dict[str, Any]) -> None:
    reference, source_reference, content = state[2:]
    values["reference"] = _str(reference, "reference")
    values["source_reference"] = _str(source_reference, "source_reference")
    values["content"] = mapper._content(content)


def _read_pull_failed(_mapper: LedgerMapper, state: list[Any], values: dict[str, Any]) -> None:
    reference, source, error = state[2:]
    values["reference"] = _str(reference, "reference")
    values["source"] = _str(source, "source")
    values["error"] = _str(error, "error")


def _read_used(_mapper: LedgerMapper, state: list[Any], values: dict[str, Any]) -> None:
    reference, digest, holder = state[2:]
    values["reference"] = _str(reference, "reference")
    values["manifest_digest"] = _str(digest, "manifest_digest")
    values["holder"] = _str(holder, "holder")


def _read_released(_mapper: LedgerMapper, state: list[Any], values: dict[str, Any]) -> None:
    holder, leases = state[2:]
    values["holder"] = _str(holder, "holder")
    values["leases"] = tuple(
        (_str(reference, "leases"), _str(digest, "leases")) for reference, digest in leases
    )


def _read_removed(_mapper: LedgerMapper, state: list[Any], values: dict[str, Any]) -> None:
    reference, digest, forced, deleted, reclaimed = state[2:]
    values["reference"] = _str(reference, "reference")
    values["manifest_digest"] = _str(digest, "manifest_digest")
    values["forced"] = _flag(forced, "forced")
    values["deleted"] = tuple(DeletedBlob(*d) for d in deleted)
    values["bytes_reclaimed"] = _int(reclaimed, "bytes_reclaimed")


def _read_refused(_mapper: LedgerMapper, state: list[Any], values: dict[str, Any]) -> None:
    reference, digest, holders = state[2:]
    values["reference"] = _str(reference, "reference")
    values["manifest_digest"] = _str(digest, "manifest_digest")
    values["holders"] = tuple(_str(holder, "holders") for holder in holders)


def _read_pruned(_mapper: LedgerMapper, state: list[Any], values: dict[str, Any]) -> None:
    policy, now, references, deleted, reclaimed = state[2:]
    dry_run, unused_for_seconds, keep, max_bytes, *gc = policy  # gc: 4 or 5 (FORMAT.md)
    if len(gc) > 1:
        msg = f"policy: an array of 4 or 5 elements, found {len(policy)}"
        raise ValueError(msg)
    values["policy"] = PrunePolicy(
        dry_run, unused_for_seconds, tuple(keep), max_bytes, _gc(gc[0]) if gc else None
    )
    if type(now) is not datetime:
        msg = "now: a prune's time is not a MessagePack timestamp"
        raise TypeError(msg)
    values["now"] = now
    values["references"] = tuple(RemovedReference(*r) for r in references)
    values["deleted"] = tuple(DeletedBlob(*d) for d in deleted)
    values["bytes_reclaimed"] = _int(reclaimed, "bytes_reclaimed")


def _artifact(plain: Any, field: str) -> ArtifactFile:
    path, digest, size = plain
    return ArtifactFile(_str(path, field), _str(digest, field), _int(size, field))


def _read_materialized(_mapper: LedgerMapper, state: list[Any], values: dict[str, Any]) -> None:
    reference, manifest, blob, diff_id, erofs, materializer = state[2:]
    values["reference"] = _str(reference, "reference")
    values["manifest_digest"] = _str(manifest, "manifest_digest")
    values["blob_digest"] = _str(blob, "blob_digest")
    values["diff_id"] = _str(diff_id, "diff_id")
    values["erofs"] = _artifact(erofs, "erofs")
    values["materializer"] = _str(materializer, "materializer")


def _read_stitched(_mapper: LedgerMapper, state: list[Any], values: dict[str, Any]) -> None:
    reference, manifest, fsmeta, vmdk, layers, materializer = state[2:]
    values["reference"] = _str(reference, "reference")
    values["manifest_digest"] = _str(manifest, "manifest_digest")
    values["fsmeta"] = _artifact(fsmeta, "fsmeta")
    values["vmdk"] = _artifact(vmdk, "vmdk")
    values["layers"] = tuple(_str(layer, "layers") for layer in layers)
    values["materializer"] = _str(materializer, "materializer")


_READERS: Final[dict[str, Reader]] = {
    "Started": _read_started,
    "ImagePulled": _read_pulled,
    "ImageTagged": _read_tagged,
    "PullFailed": _read_pull_failed,
    "ImageUsed": _read_used,
    "HolderReleased": _read_released,
    "ImageRemoved": _read_removed,
    "RemoveRefused": _read_refused,
    "ImagesPruned": _read_pruned,
    "LayerMaterialized": _read_materialized,
    "ImageStitched": _read_stitched,
}
_LENGTHS: Final = {name: len(fields) + 2 for name, fields in FIELDS.items()}
# Trailing fields a type may add after its `FIELDS`, present only when they hold something
# (FORMAT.md): a pull's endpoints.
OPTIONAL_FIELDS: Final[dict[str, tuple[str, ...]]] = {"ImagePulled": ("endpoints",)}
_OPTIONAL: Final = {name: len(fields) for name, fields in OPTIONAL_FIELDS.items()}
_unpack: Final = msgpack.unpackb


class _NoTranscoder(Transcoder):
    """Format 2 encodes events itself; the Mapper base class only holds a transcoder."""

    def encode(self, obj: Any) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes) -> Any:
        raise NotImplementedError


# ---------------------------------------------------------------- a record as plain JSON data

_CONFIG_NAMES: Final = (
    "digest",
    "env",
    "cmd",
    "entrypoint",
    "working_dir",
    "user",
    "labels",
    "stop_signal",
)


def record_instant(record: bytes) -> datetime:
    """When the event of a stored log record happened (its state's timestamp), decoded from
    the stored bytes alone; `UndecodableDataError` when the record is not a format 2 one."""
    try:
        _id, _version, _kind, state = msgpack.unpackb(record)
        stamp = msgpack.unpackb(state, timestamp=3)[0]
    except Exception as e:
        msg = f"a log record is not a format 2 record ({type(e).__name__})"
        raise UndecodableDataError(msg) from None
    if type(stamp) is not datetime:
        msg = "a log record's timestamp is not a MessagePack timestamp"
        raise UndecodableDataError(msg)
    return stamp


def record_fields(record: bytes) -> dict[str, Any]:
    """A stored log record (docs/FORMAT.md) as plain JSON-able data, every field named as
    FORMAT.md names it, decoded from the stored bytes alone (for exports that tools other
    than imageledger read): ``type``, ``at`` (ISO 8601, UTC), ``actor``, then the type's
    fields; a config named by digest stays its digest, as stored. `UndecodableDataError` when
    the record is not a format 2 record."""
    try:
        _id, _version, kind, state = msgpack.unpackb(record)
        values = msgpack.unpackb(state, timestamp=3)
        names = FIELDS[kind]
        extra = OPTIONAL_FIELDS.get(kind, ())
        if type(values) is not list or not (
            len(names) + 2 <= len(values) <= len(names) + 2 + len(extra)
        ):
            msg = "its state is not an array of the type's fields"
            raise ValueError(msg)
        names = names + extra[: len(values) - len(names) - 2]
        user, uid, pid, host, version = values[1]
        plain: dict[str, Any] = {
            "type": kind,
            "at": _iso(values[0]),
            "actor": {"user": user, "uid": uid, "pid": pid, "host": host, "version": version},
        }
        for name, value in zip(names, values[2:], strict=True):
            plain[name] = _PLAIN.get(name, _same)(value)
    except UndecodableDataError:
        raise
    except Exception as e:
        msg = f"a log record is not a format 2 record ({type(e).__name__})"
        raise UndecodableDataError(msg) from None
    return plain


def _iso(value: Any) -> str:
    if type(value) is not datetime:
        msg = "a timestamp is not a MessagePack timestamp"
        raise TypeError(msg)
    return value.isoformat().replace("+00:00", "Z")


def _same(value: Any) -> Any:
    return value


def _plain_config(value: Any) -> Any:
    if isinstance(value, str):
        return value
    config = dict(zip(_CONFIG_NAMES, value, strict=True))
    config["labels"] = {k: v for k, v in config["labels"]}
    return config


def _plain_content(value: Any) -> dict[str, Any]:
    digest, media_type, size, config, config_size, platform, layers = value
    return {
        "manifest_digest": digest,
        "manifest_media_type": media_type,
        "manifest_size": size,
        "config": _plain_config(config),
        "config_size": config_size,
        "platform": {"os": platform[0], "architecture": platform[1], "variant": platform[2]},
        "layers": [
            {
                "blob_digest": blob,
                "media_type": kind,
                "compressed_size": size,
                "diff_id": diff_id,
                "position": position,
            }
            for blob, kind, size, diff_id, position in layers
        ],
    }


def _plain_deleted(value: Any) -> list[dict[str, Any]]:
    return [
        {"name": name, "kind": kind, "size": size, "reason": reason}
        for name, kind, size, reason in value
    ]


def _plain_policy(value: Any) -> dict[str, Any]:
    names = ("dry_run", "unused_for_seconds", "keep", "max_bytes")
    plain = dict(zip(names, value[:4], strict=True))
    if len(value) > 4:  # a gc's thresholds and the disk it saw
        [high, low, min_age, max_age, (size, used, available)] = value[4]
        plain["gc"] = {
            "high_threshold": high,
            "low_threshold": low,
            "min_age_seconds": min_age,
            "max_age_seconds": max_age,
            "disk": {"size": size, "used": used, "available": available},
        }
    return plain


def _plain_artifact(value: Any) -> dict[str, Any]:
    path, digest, size = value
    return {"path": path, "digest": digest, "size": size}


_PLAIN: Final[dict[str, Callable[[Any], Any]]] = {
    "content": _plain_content,
    "deleted": _plain_deleted,
    "leases": lambda v: [{"reference": r, "manifest_digest": m} for r, m in v],
    "references": lambda v: [
        {"reference": r, "manifest_digest": m, "reason": why} for r, m, why in v
    ],
    "policy": _plain_policy,
    "now": _iso,
    "endpoints": lambda v: [
        {"location": loc, "mirror": mirror, "insecure": insecure, "manifest": manifest, "blobs": b}
        for loc, mirror, insecure, manifest, b in v
    ],
    "erofs": _plain_artifact,
    "fsmeta": _plain_artifact,
    "vmdk": _plain_artifact,
}

__all__ = ["CLASSES", "FIELDS", "TOPICS", "LedgerMapper", "record_fields", "record_instant"]
