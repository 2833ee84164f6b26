"""A canonical MessagePack transcoder for eventsourcing: `imageledger.storage.transcoder`.

Select it with ``TRANSCODER_TOPIC=imageledger.storage.transcoder:MsgpackTranscoder`` or by
returning a `MsgpackTranscoder` from ``Application.construct_transcoder``. eventsourcing only
calls ``Application.register_transcodings`` for a `JSONTranscoder`, so an application that needs
custom types registers them on the transcoder in its own ``construct_transcoder``.

Why MessagePack: it is compact binary, bytes stay bytes, and the C packer and unpacker do the
bulk of the work, so every event costs less to store and to read back than with eventsourcing's
JSONTranscoder (a typical ten-field event: a little faster to encode, about a third faster to
decode, a fifth smaller). Why not plain MessagePack: it forgets tuples (they come back as
lists), has no UUID, Decimal or datetime, and writes dict entries in insertion order.

Encoding is canonical: equal values of the same types always encode to the same bytes, whatever
order their dict keys were inserted in and whichever process or thread encodes them. That is
what lets a view rebuilt from the event log be compared byte for byte with the one it replaces,
lets identical payloads be deduplicated or hashed by their bytes, and keeps a re-encoded event
identical to the stored one. The rules that make it so:

- Dict entries are written sorted by the bytes of their encoded keys, never in insertion order.
- Integers take MessagePack's smallest form (the C packer always does this); floats are always
  float64, so a value never changes width with the platform or a packer option.
- Values that are equal but not identical stay distinct because decoding gives them back
  distinct: ``-0.0`` and ``0.0``, ``Decimal("1.0")`` and ``Decimal("1.00")``, and the same instant
  in two UTC offsets encode differently, exactly as their decoded forms differ.
- Decimal text is made independent of the thread's decimal context (``capitals``).
- A dict whose distinct keys would encode identically (two NaNs, or a str and a str subclass
  that refuses to equal it) is refused with ValueError: one entry would be lost on decode.

Extension type codes (application range, stable in storage; never renumber them):

====  ==================  ==========================================================
code  type                payload
====  ==================  ==========================================================
1     registered          canonical MessagePack ``[name, encoded data]`` of a
                          `Transcoding`, so storage names the transcoding, not a number
2     tuple               canonical MessagePack array of the items
3     int beyond 64 bits  minimal big-endian two's complement
4     UUID                the 16 bytes of ``UUID.bytes``
5     Decimal             ASCII ``str(d)`` with an upper-case exponent marker
6     naive datetime      ``>HBBBBBI``: year, month, day, hour, minute, second, microsecond
7     aware datetime      as 6, then ``>q`` UTC offset in microseconds
8     date                ``>HBB``: year, month, day
9     naive time          ``>BBBI``: hour, minute, second, microsecond
10    aware time          as 9, then ``>q`` UTC offset in microseconds
====  ==================  ==========================================================

Values of immutable registered types are decoded once per distinct payload: a transcoding whose
``immutable`` attribute is true promises that its decoded values are never mutated (frozen,
holding only immutable values), so the transcoder keeps the value decoded from each payload
(a bounded memo) and hands the same object back for the same bytes. Ledgers repeat such values
constantly (the same image pulled again, every event of one process carrying the same actor),
and replaying a log is then mostly dictionary hits instead of rebuilding nested objects.

Decoding treats its input as what it is, bytes read from disk: bytes this transcoder did not
write (a damaged page, a truncated value, another format) raise `UndecodableDataError`, a
`LedgerCorruptError`, whatever part of decoding notices; a type name or extension code it does
not know raises its subclass `UnknownTranscodingError`.

Aware datetimes and times come back with a fixed-offset `datetime.timezone`: the offset is kept
exactly (down to microseconds) but a zone's name and rules, and ``fold``, are not; the value
compares equal and has the same ``utcoffset()``.

Subclasses of the built-in types without a transcoding registered for their exact type are
written as their base type (a StrEnum as its str, a dict subclass as a dict, a namedtuple as a
tuple), as `json` would, and decode as that base type. A registered transcoding always wins
for its exact type, built-in or not.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
from collections.abc import Callable, Hashable
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from itertools import pairwise
from operator import itemgetter
from typing import Any, Final, TypeAlias
from uuid import UUID

import msgpack
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import (
    Mapper,
    StoredEvent,
    Transcoder,
    Transcoding,
    TranscodingNotRegisteredError,
)

from imageledger.domain.errors import LedgerCorruptError

__all__ = [
    "EXT_BIGINT",
    "EXT_DATE",
    "EXT_DATETIME",
    "EXT_DATETIME_TZ",
    "EXT_DECIMAL",
    "EXT_REGISTERED",
    "EXT_TIME",
    "EXT_TIME_TZ",
    "EXT_TUPLE",
    "EXT_UUID",
    "MsgpackTranscoder",
    "StoredEventMapper",
    "UndecodableDataError",
    "UnknownTranscodingError",
]

EXT_REGISTERED: Final = 1
EXT_TUPLE: Final = 2
EXT_BIGINT: Final = 3
EXT_UUID: Final = 4
EXT_DECIMAL: Final = 5
EXT_DATETIME: Final = 6
EXT_DATETIME_TZ: Final = 7
EXT_DATE: Final = 8
EXT_TIME: Final = 9
EXT_TIME_TZ: Final = 10

_DATETIME: Final = struct.Struct(">HBBBBBI")
_DATETIME_TZ: Final = struct.Struct(">HBBBBBIq")
_DATE: Final = struct.Struct(">HBB")
_TIME: Final = struct.Struct(">BBBI")
_TIME_TZ: Final = struct.Struct(">BBBIq")

# Exact types the C packer writes correctly by itself (ints beyond 64 bits reach `_default`).
_NATIVE: Final[frozenset[type]] = frozenset({str, int, float, bool, bytes, type(None)})

_ExtType: Final = msgpack.ExtType
# ExtType's own __new__ re-validates code and data in Python, which costs more than packing
# the value; every code and payload here is built by this module, so construct the tuple as is.
_tuple_new: Final = tuple.__new__

# Dicts with up to this many keys remember their key order (events and view rows do).
_KEY_ORDER_MAX_KEYS: Final = 64
_KEY_ORDER_CACHE_SIZE: Final = 4096
# Decoded values of immutable registered types kept for reuse, by payload bytes.
_DECODED_CACHE_SIZE: Final = 16384
_Converter: TypeAlias = Callable[[Any], Any]


def _offset_us(offset: timedelta) -> int:
    # Integer arithmetic: `offset // timedelta(microseconds=1)` is exact too but slower.
    return (offset.days * 86_400 + offset.seconds) * 1_000_000 + offset.microseconds


def _utf8_order(key: str) -> tuple[int, str]:
    # A MessagePack str header grows with the UTF-8 length, and UTF-8 preserves code point
    # order, so (UTF-8 length, str) orders keys exactly as their encoded bytes do.
    return len(key.encode()), key


def _bigint_bytes(value: int) -> bytes:
    magnitude = value if value >= 0 else ~value
    return value.to_bytes(magnitude.bit_length() // 8 + 1, "big", signed=True)


def _not_encodable(obj: object) -> TranscodingNotRegisteredError:
    # Same wording as eventsourcing's JSONTranscoder, so operators see one message either way.
    return TranscodingNotRegisteredError(
        f"Object of type {type(obj)} is not serializable. Please define and register "
        "a custom transcoding for this type."
    )


class UndecodableDataError(LedgerCorruptError, ValueError):
    """Bytes given to `MsgpackTranscoder.decode` are not something it encoded: truncated,
    damaged or foreign data. Stored events and views are decoded from disk, so damage there
    must surface as the package's own ledger error (with the cause chained), never as whatever
    msgpack, struct, datetime or a dataclass happened to raise on the way."""


class UnknownTranscodingError(UndecodableDataError, TranscodingNotRegisteredError):
    """The data names a registered type or extension code this transcoder does not know (a
    newer version wrote it, or the name is damaged); still eventsourcing's
    `TranscodingNotRegisteredError`, which is what that library raises for the same case."""


def _not_decodable(name: object) -> UnknownTranscodingError:
    return UnknownTranscodingError(
        f"Data serialized with name {_short(name)} is not deserializable. Please register a "
        "custom transcoding for this type."
    )


def _short(value: object, limit: int = 200) -> str:
    # Damaged data can hold a megabyte "name": an error message quotes only its start.
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class MsgpackTranscoder(Transcoder):
    """Encodes event and view state as canonical MessagePack (see the module docstring).

    Thread-safe once its transcodings are registered: encoding keeps no shared buffer, so the
    one instance an application holds can serve all its threads.
    """

    def __init__(self) -> None:
        self.types: dict[type, Transcoding] = {}
        self.names: dict[str, Transcoding] = {}
        self._native: frozenset[type] = _NATIVE
        # Exact type -> converter to something the C packer writes canonically. Subclass
        # resolutions are cached here too; `register` overwrites entries, so precedence holds.
        self._converters: dict[type, _Converter] = {
            dict: self._dict,
            list: self._list,
            tuple: self._tuple,
            UUID: self._uuid,
            Decimal: self._decimal,
            datetime: self._datetime,
            date: self._date,
            time: self._time,
        }
        self._ext_decoders: dict[int, Callable[[bytes], Any]] = {
            EXT_REGISTERED: self._decode_registered,
            EXT_TUPLE: self._decode_tuple,
            EXT_BIGINT: self._decode_bigint,
            EXT_UUID: self._decode_uuid,
            EXT_DECIMAL: self._decode_decimal,
            EXT_DATETIME: self._decode_datetime,
            EXT_DATETIME_TZ: self._decode_datetime_tz,
            EXT_DATE: self._decode_date,
            EXT_TIME: self._decode_time,
            EXT_TIME_TZ: self._decode_time_tz,
        }
        self._timezones: dict[int, timezone] = {}
        self._decoded: dict[bytes, Any] = {}
        self._key_orders: dict[tuple[int, ...], tuple[tuple[str, ...], tuple[str, ...]]] = {}

    def register(self, transcoding: Transcoding) -> None:
        """Registers a transcoding; it takes precedence over built-in handling of its type."""
        self.types[transcoding.type] = transcoding
        self.names[transcoding.name] = transcoding
        self._native = _NATIVE - self.types.keys()
        self._converters[transcoding.type] = self._registered_converter(transcoding)
        self._decoded.clear()  # a payload may now name a different transcoding
        self._key_orders.clear()  # registering str itself turns the str-key orders off

    def encode(self, obj: Any) -> bytes:
        """Encodes obj as canonical MessagePack bytes."""
        return self._pack(self._canon(obj))

    def decode(self, data: bytes) -> Any:
        """Decodes bytes made by `encode`.

        Anything else raises `UndecodableDataError` (a `LedgerCorruptError`), or its subclass
        `UnknownTranscodingError` for a type name or extension code not registered here: the
        bytes come from disk, so a failure to decode them is damage to report, whichever
        layer (msgpack, an extension decoder, a transcoding) noticed it first.
        """
        try:
            return self._unpack(data)
        except UndecodableDataError:
            raise
        except Exception as e:  # every failure on data that is not ours means the same
            msg = (
                f"{len(data) if isinstance(data, bytes | bytearray) else '?'} bytes of stored data"
                f" cannot be decoded ({type(e).__name__}: {_short(str(e))}): damaged, or not"
                " written by this transcoder"
            )
            raise UndecodableDataError(msg) from e

    def _unpack(self, data: bytes) -> Any:
        # `decode` without the wrapping, for the nested payloads of extension types: their
        # failures are wrapped once, by the outermost `decode`.
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=False,
            ext_hook=self._ext_hook,
        )

    # Encoding: `_canon` turns a value into one the C packer writes canonically by itself
    # (exact scalars, lists, dicts in canonical order, ExtType) and the packer does the rest.

    def _pack(self, obj: Any) -> bytes:
        # A Packer per call, not a shared one: a Packer has one buffer, so sharing it between
        # threads (or with a nested pack from inside `default`) would interleave output.
        packer = msgpack.Packer(default=self._default, use_bin_type=True, strict_types=True)
        return packer.pack(obj)  # type: ignore[no-any-return]

    def _default(self, obj: Any) -> Any:
        # The packer lands here for exact ints beyond 64 bits; anything else would have slipped
        # past `_canon`, so canonicalise it rather than trust the packer's own idea of it.
        if type(obj) is int:
            return _tuple_new(_ExtType, (EXT_BIGINT, _bigint_bytes(obj)))
        return self._canon(obj)

    def _canon(self, obj: Any) -> Any:
        cls = type(obj)
        if cls in self._native:
            return obj
        converter = self._converters.get(cls)
        if converter is None:
            converter = self._subclass_converter(cls, obj)
        return converter(obj)

    def _subclass_converter(self, cls: type, obj: Any) -> _Converter:
        converter: _Converter
        # datetime before date: a datetime is a date. bool cannot be subclassed.
        if issubclass(cls, str):
            converter = self._as_str
        elif issubclass(cls, int):
            converter = self._as_int
        elif issubclass(cls, float):
            converter = self._as_float
        elif issubclass(cls, bytes):
            converter = self._as_bytes
        elif issubclass(cls, dict):
            converter = self._dict
        elif issubclass(cls, list):
            converter = self._list
        elif issubclass(cls, tuple):
            converter = self._tuple
        elif issubclass(cls, datetime):
            converter = self._datetime
        elif issubclass(cls, date):
            converter = self._date
        elif issubclass(cls, time):
            converter = self._time
        elif issubclass(cls, UUID):
            converter = self._uuid
        elif issubclass(cls, Decimal):
            converter = self._decimal
        else:
            raise _not_encodable(obj)
        self._converters.setdefault(cls, converter)
        return self._converters[cls]

    def _registered_converter(self, transcoding: Transcoding) -> _Converter:
        name = transcoding.name
        encode = transcoding.encode

        def convert(obj: Any) -> Any:
            # The transcoding's output may itself need converting (another registered type).
            return _tuple_new(
                _ExtType, (EXT_REGISTERED, self._pack([name, self._canon(encode(obj))]))
            )

        return convert

    def _dict(self, obj: dict[Any, Any]) -> dict[Any, Any]:
        # Keyed by the keys' ids, not the keys: an equal key of another type (True for 1, a
        # str subclass for a str) may encode differently, so only the very same key objects
        # may reuse an order. The entry holds those objects, so while it exists no other
        # object can have their ids. Attribute names and msgpack-decoded keys are interned,
        # so the events of one class keep hitting the same entry.
        ids = tuple(map(id, obj))
        cached = self._key_orders.get(ids)
        if cached is not None:
            order = cached[1]
        else:
            found = self._str_key_order(obj)
            if found is None:
                return self._dict_by_encoded_keys(obj)
            order = found
            if len(ids) <= _KEY_ORDER_MAX_KEYS:
                if len(self._key_orders) >= _KEY_ORDER_CACHE_SIZE:
                    # Full of one-off shapes (dicts keyed by data, say): start again so the
                    # shapes that recur get back in, rather than being locked out for good.
                    self._key_orders.clear()
                self._key_orders[ids] = (tuple(obj), order)
        native = self._native
        converters = self._converters
        out: dict[Any, Any] = {}
        for key in order:
            value = obj[key]
            cls = type(value)
            if cls in native:
                out[key] = value
            else:
                out[key] = (converters.get(cls) or self._subclass_converter(cls, value))(value)
        return out

    def _str_key_order(self, obj: dict[Any, Any]) -> tuple[str, ...] | None:
        # The common case, all keys exact str: sort without encoding each key separately.
        if not obj:
            return ()
        if str not in self._native or set(map(type, obj)) != {str}:
            return None
        keys: list[str] = sorted(obj)
        if "".join(keys).isascii():
            keys.sort(key=len)  # stable, so equal lengths stay in code point order
        else:
            keys.sort(key=_utf8_order)
        return tuple(keys)

    def _dict_by_encoded_keys(self, obj: dict[Any, Any]) -> dict[Any, Any]:
        native = self._native
        canon = self._canon
        entries: list[tuple[bytes, Hashable, Any]] = []
        for key, value in obj.items():
            canonical_key = key if type(key) in native else canon(key)
            entries.append((self._pack(canonical_key), canonical_key, value))
        entries.sort(key=itemgetter(0))
        for before, after in pairwise(entries):
            if before[0] == after[0]:
                # e.g. "a" and a str subclass "a" with its own __eq__, or two NaN keys: one
                # would silently replace the other on decode, and no order is canonical.
                msg = f"Dict keys {before[1]!r} and {after[1]!r} encode identically"
                raise ValueError(msg)
        return {key: value if type(value) in native else canon(value) for _, key, value in entries}

    def _list(self, obj: list[Any] | tuple[Any, ...]) -> list[Any]:
        native = self._native
        if type(obj) is list and native.issuperset(map(type, obj)):
            return obj  # already canonical: the packer can take it as it is
        converters = self._converters
        fallback = self._subclass_converter
        return [
            value
            if (cls := type(value)) in native
            else (converters.get(cls) or fallback(cls, value))(value)
            for value in obj
        ]

    def _tuple(self, obj: tuple[Any, ...]) -> Any:
        return _tuple_new(_ExtType, (EXT_TUPLE, self._pack(self._list(obj))))

    def _as_str(self, obj: str) -> Any:
        return self._canon(str.__str__(obj))  # exact str even if __str__ is overridden

    def _as_int(self, obj: int) -> Any:
        return self._canon(int.__int__(obj))

    def _as_float(self, obj: float) -> Any:
        return self._canon(float.__float__(obj))

    def _as_bytes(self, obj: bytes) -> Any:
        return self._canon(bytes.__bytes__(obj))

    @staticmethod
    def _uuid(obj: UUID) -> Any:
        return _tuple_new(_ExtType, (EXT_UUID, obj.bytes))

    @staticmethod
    def _decimal(obj: Decimal) -> Any:
        # The exponent marker follows the thread's context.capitals; nothing else in the
        # text can be an "e" (Infinity, NaN, sNaN have none).
        return _tuple_new(
            _ExtType, (EXT_DECIMAL, Decimal.__str__(obj).replace("e", "E").encode("ascii"))
        )

    @staticmethod
    def _datetime(obj: datetime) -> Any:
        offset = obj.utcoffset()
        if offset is None:
            payload = _DATETIME.pack(
                obj.year, obj.month, obj.day, obj.hour, obj.minute, obj.second, obj.microsecond
            )
            return _tuple_new(_ExtType, (EXT_DATETIME, payload))
        payload = _DATETIME_TZ.pack(
            obj.year,
            obj.month,
            obj.day,
            obj.hour,
            obj.minute,
            obj.second,
            obj.microsecond,
            _offset_us(offset),
        )
        return _tuple_new(_ExtType, (EXT_DATETIME_TZ, payload))

    @staticmethod
    def _date(obj: date) -> Any:
        return _tuple_new(_ExtType, (EXT_DATE, _DATE.pack(obj.year, obj.month, obj.day)))

    @staticmethod
    def _time(obj: time) -> Any:
        offset = obj.utcoffset()
        if offset is None:
            return _tuple_new(
                _ExtType, (EXT_TIME, _TIME.pack(obj.hour, obj.minute, obj.second, obj.microsecond))
            )
        payload = _TIME_TZ.pack(
            obj.hour, obj.minute, obj.second, obj.microsecond, _offset_us(offset)
        )
        return _tuple_new(_ExtType, (EXT_TIME_TZ, payload))

    # Decoding: the C unpacker builds everything native and calls back only for ext types.

    def _ext_hook(self, code: int, payload: bytes) -> Any:
        try:
            decoder = self._ext_decoders[code]
        except KeyError:
            msg = (
                f"Data with MessagePack extension type {code} is not deserializable. "
                "It was not written by this transcoder."
            )
            raise UnknownTranscodingError(msg) from None
        return decoder(payload)

    def _decode_registered(self, payload: bytes) -> Any:
        value = self._decoded.get(payload)
        if value is not None:
            return value
        entry = self._unpack(payload)
        if type(entry) is not list or len(entry) != 2:
            msg = f"Malformed registered-type payload: {_short(entry)}"
            raise UndecodableDataError(msg)
        name, data = entry
        try:
            transcoding = self.names[name]
        except (KeyError, TypeError):
            raise _not_decodable(name) from None
        value = transcoding.decode(data)
        if getattr(transcoding, "immutable", False) and value is not None:
            if len(self._decoded) >= _DECODED_CACHE_SIZE:
                self._decoded.clear()  # as for key orders: let the values that recur back in
            self._decoded[payload] = value
        return value

    def _decode_tuple(self, payload: bytes) -> tuple[Any, ...]:
        items = self._unpack(payload)
        if type(items) is not list:
            msg = f"Malformed tuple payload: {_short(items)}"
            raise UndecodableDataError(msg)
        return tuple(items)

    @staticmethod
    def _decode_bigint(payload: bytes) -> int:
        return int.from_bytes(payload, "big", signed=True)

    @staticmethod
    def _decode_uuid(payload: bytes) -> UUID:
        return UUID(bytes=payload)

    @staticmethod
    def _decode_decimal(payload: bytes) -> Decimal:
        return Decimal(payload.decode("ascii"))

    def _timezone(self, offset_us: int) -> timezone:
        # Events of one ledger share a handful of offsets; building a timezone each time costs
        # more than the rest of the datetime.
        tz = self._timezones.get(offset_us)
        if tz is None:
            tz = timezone(timedelta(microseconds=offset_us))
            if len(self._timezones) < 1024:
                self._timezones[offset_us] = tz
        return tz

    @staticmethod
    def _decode_datetime(payload: bytes) -> datetime:
        return datetime(*_DATETIME.unpack(payload))

    def _decode_datetime_tz(self, payload: bytes) -> datetime:
        year, month, day, hour, minute, second, microsecond, offset = _DATETIME_TZ.unpack(payload)
        return datetime(year, month, day, hour, minute, second, microsecond, self._timezone(offset))

    @staticmethod
    def _decode_date(payload: bytes) -> date:
        return date(*_DATE.unpack(payload))

    @staticmethod
    def _decode_time(payload: bytes) -> time:
        return time(*_TIME.unpack(payload))

    def _decode_time_tz(self, payload: bytes) -> time:
        hour, minute, second, microsecond, offset = _TIME_TZ.unpack(payload)
        return time(hour, minute, second, microsecond, self._timezone(offset))


@functools.cache
def _event_fields(cls: type) -> frozenset[str] | None:
    """The field names of a dataclass event class (None for any other class)."""
    if dataclasses.is_dataclass(cls):
        return frozenset(f.name for f in dataclasses.fields(cls))
    return None


@functools.cache
def _event_defaults(cls: type[Any]) -> dict[str, Any]:
    """The fields of a dataclass event class that have a default, with it (read only: one
    dict per class, as `_event_fields`, not one per event decoded)."""
    return {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }


class StoredEventMapper(Mapper[Any]):
    """eventsourcing's `Mapper`, for a log read from disk: a stored event that cannot become
    a domain event raises `UndecodableDataError` (a `LedgerCorruptError`) naming its topic and
    version, never the library's own `MapperDeserialisationError` or a raw TypeError.

    Beyond what the transcoder checks, the decoded state must be a dict holding exactly the
    fields of its event class (a dataclass): eventsourcing installs the state as the event's
    ``__dict__`` unchecked, so a damaged event would otherwise fail later, inside a fold, as an
    AttributeError far from the damage. Select it with ``MAPPER_TOPIC`` or
    ``Application.construct_mapper``.
    """

    def to_domain_event(self, stored_event: StoredEvent) -> DomainEventProtocol[Any]:
        """The domain event `stored_event` records; `UndecodableDataError` when it cannot."""
        try:
            event = super().to_domain_event(stored_event)
        except Exception as e:
            cause = e.__cause__ if isinstance(e.__cause__, UndecodableDataError) else e
            error = type(cause) if isinstance(cause, UndecodableDataError) else UndecodableDataError
            msg = f"{self._where(stored_event)}: {_short(str(cause), 400)}"
            raise error(msg) from e
        cls = type(event)
        expected = _event_fields(cls)
        if expected is not None and event.__dict__.keys() < expected:
            # A field added to the class since (with a default: `ImagePulled.endpoints`)
            # takes its default, as format 2 reads it for an event stored without it.
            defaults = _event_defaults(cls)
            missing = expected - event.__dict__.keys()
            if missing <= defaults.keys():
                for name in missing:
                    event.__dict__[name] = defaults[name]
        if expected is not None and event.__dict__.keys() != expected:
            found = sorted(map(str, event.__dict__))
            msg = (
                f"{self._where(stored_event)}: its fields {_short(found)} are not those of"
                f" {cls.__qualname__} ({sorted(expected)})"
            )
            raise UndecodableDataError(msg)
        return event

    @staticmethod
    def _where(stored_event: StoredEvent) -> str:
        return (
            f"stored event {_short(stored_event.topic, 100)} of {stored_event.originator_id}"
            f" version {stored_event.originator_version}"
        )
