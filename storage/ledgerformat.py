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
    DeletedBlob,
    ImageConfig,
    ImageContent,
    Layer,
    Platform,
    PrunePolicy,
    RemovedReference,
    config_from_array,
    config_to_array,
)
from imageledger.storage.transcoder import UndecodableDataError

FORMAT_VERSION: Final = 2

# The stored topic of each event class: its short name, stable whatever the Python module.
CLASSES: Final[dict[str, type[Any]]] = {
    "Started": ImageLedger.Started,
    "ImagePulled": ImageLedger.ImagePulled,
    "PullFailed": ImageLedger.PullFailed,
    "ImageUsed": ImageLedger.ImageUsed,
    "HolderReleased": ImageLedger.HolderReleased,
    "ImageRemoved": ImageLedger.ImageRemoved,
    "RemoveRefused": ImageLedger.RemoveRefused,
    "ImagesPruned": ImageLedger.ImagesPruned,
}
TOPICS: Final[dict[type[Any], str]] = {cls: name for name, cls in CLASSES.items()}
# The fields after [timestamp, actor], in stored order, of each event.
FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "Started": (),
    "ImagePulled": ("reference", "source", "content", "cached"),
    "PullFailed": ("reference", "source", "error"),
    "ImageUsed": ("reference", "manifest_digest", "holder"),
    "HolderReleased": ("holder", "leases"),
    "ImageRemoved": ("reference", "manifest_digest", "forced", "deleted", "bytes_reclaimed"),
    "RemoveRefused": ("reference", "manifest_digest", "holders"),
    "ImagesPruned": ("policy", "now", "references", "deleted", "bytes_reclaimed"),
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
    return [policy.dry_run, policy.unused_for_seconds, list(policy.keep), policy.max_bytes]


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
        if isinstance(value, PrunePolicy):
            return _policy(value)
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
            state = msgpack.unpackb(stored_event.state, timestamp=3, strict_map_key=True)
            fields = FIELDS[name]
            if type(state) is not list or len(state) != len(fields) + 2:
                msg = f"its state is not an array of {len(fields) + 2} fields"
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
            if cls is ImageLedger.Started:
                values["originator_topic"] = _LEDGER_TOPIC
            for field, value in zip(fields, state[2:], strict=True):
                values[field] = _DECODERS[field](self, value)
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
            actor = Actor(_str(user), _int(uid), _int(pid), _str(host), _str(version))
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
            manifest_digest=_str(digest),
            manifest_media_type=_str(media_type),
            manifest_size=_int(size),
            config=self._config(config),
            config_size=_int(config_size),
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


def _str(value: Any) -> str:
    if type(value) is not str:
        msg = f"expected a string, found {type(value).__name__}"
        raise TypeError(msg)
    return value


def _int(value: Any) -> int:
    if type(value) is not int:
        msg = f"expected an integer, found {type(value).__name__}"
        raise TypeError(msg)
    return value


def _text(_mapper: LedgerMapper, value: Any) -> str:
    return _str(value)


def _flag(_mapper: LedgerMapper, value: Any) -> bool:
    if type(value) is not bool:
        msg = f"expected a boolean, found {type(value).__name__}"
        raise TypeError(msg)
    return value


def _count(_mapper: LedgerMapper, value: Any) -> int:
    return _int(value)


def _pairs(_mapper: LedgerMapper, value: Any) -> tuple[tuple[str, str], ...]:
    return tuple((reference, digest) for reference, digest in value)


def _strings(_mapper: LedgerMapper, value: Any) -> tuple[str, ...]:
    return tuple(_str(v) for v in value)


def _deleted_from(_mapper: LedgerMapper, value: Any) -> tuple[DeletedBlob, ...]:
    return tuple(DeletedBlob(*d) for d in value)


def _removed_from(_mapper: LedgerMapper, value: Any) -> tuple[RemovedReference, ...]:
    return tuple(RemovedReference(*r) for r in value)


def _policy_from(_mapper: LedgerMapper, value: Any) -> PrunePolicy:
    dry_run, unused_for_seconds, keep, max_bytes = value
    return PrunePolicy(dry_run, unused_for_seconds, tuple(keep), max_bytes)


def _now(_mapper: LedgerMapper, value: Any) -> datetime:
    if type(value) is not datetime:
        msg = "a prune's time is not a MessagePack timestamp"
        raise TypeError(msg)
    return value


_DECODERS: Final[dict[str, Callable[[LedgerMapper, Any], Any]]] = {
    "reference": _text,
    "source": _text,
    "error": _text,
    "manifest_digest": _text,
    "holder": _text,
    "cached": _flag,
    "forced": _flag,
    "bytes_reclaimed": _count,
    "content": LedgerMapper._content,
    "leases": _pairs,
    "holders": _strings,
    "deleted": _deleted_from,
    "references": _removed_from,
    "policy": _policy_from,
    "now": _now,
}


class _NoTranscoder(Transcoder):
    """Format 2 encodes events itself; the Mapper base class only holds a transcoder."""

    def encode(self, obj: Any) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes) -> Any:
        raise NotImplementedError


__all__ = ["CLASSES", "FIELDS", "FORMAT_VERSION", "TOPICS", "LedgerMapper"]
