"""`MsgpackTranscoder`: exact round trips, canonical bytes, registered transcodings, errors, and
an eventsourcing application storing its events and snapshots through it in the LMDB ledger."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import struct
import threading
from collections import OrderedDict, namedtuple
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal, localcontext
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any, NamedTuple, cast
from uuid import UUID, uuid4

import msgpack
import pytest
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import (
    DatetimeAsISO,
    DecimalAsStr,
    Transcoder,
    Transcoding,
    TranscodingNotRegisteredError,
    UUIDAsHex,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from imageledger.storage import transcoder as tmod
from imageledger.storage.transcoder import MsgpackTranscoder

PERSISTENCE_MODULE = "imageledger.storage.ledger"
TRANSCODER_TOPIC = "imageledger.storage.transcoder:MsgpackTranscoder"


# Exact comparison: equal value *and* the same type all the way down, with the distinctions
# `==` hides (-0.0, NaN, Decimal exponents, UTC offsets, bool vs int) made visible.


def assert_same(expected: Any, actual: Any) -> None:
    assert type(actual) is type(expected), f"{actual!r} is not a {type(expected).__name__}"
    if isinstance(expected, float):
        assert struct.pack(">d", actual) == struct.pack(">d", expected), (expected, actual)
    elif isinstance(expected, Decimal):
        assert str(actual) == str(expected)
    elif isinstance(expected, datetime | time):
        assert (actual.tzinfo is None) == (expected.tzinfo is None)
        assert actual.utcoffset() == expected.utcoffset()
        assert actual.replace(tzinfo=None) == expected.replace(tzinfo=None)
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected)
        for e, a in zip(expected, actual, strict=True):
            assert_same(e, a)
    elif isinstance(expected, dict):
        assert len(actual) == len(expected)
        for key, value in expected.items():
            matches = [k for k in actual if type(k) is type(key) and k == key]
            assert len(matches) == 1, f"key {key!r} not found in {actual!r}"
            assert_same(key, matches[0])
            assert_same(value, actual[matches[0]])
    else:
        assert actual == expected


def round_trip(transcoder: Transcoder, obj: Any) -> Any:
    data = transcoder.encode(obj)
    assert isinstance(data, bytes)
    copy = transcoder.decode(data)
    assert_same(obj, copy)
    assert transcoder.encode(copy) == data, "re-encoding a decoded value changed its bytes"
    return copy


def stored_key_order_is_canonical(transcoder: MsgpackTranscoder, data: bytes) -> None:
    """Checks every map in `data`, including those inside tuples and registered types, was
    written sorted by its encoded key bytes."""

    def pairs_hook(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        encoded = [transcoder.encode(key) for key, _ in pairs]
        assert encoded == sorted(encoded), f"map keys out of order: {[k for k, _ in pairs]}"
        assert len(set(encoded)) == len(encoded)
        return dict(pairs)

    def ext_hook(code: int, payload: bytes) -> Any:
        if code == tmod.EXT_TUPLE:
            return tuple(unpack(payload))
        if code == tmod.EXT_REGISTERED:
            unpack(payload)  # only to check the maps inside
        return transcoder.decode(msgpack.packb(msgpack.ExtType(code, payload)))

    def unpack(payload: bytes) -> Any:
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=False,
            object_pairs_hook=pairs_hook,
            ext_hook=ext_hook,
        )

    unpack(data)


@pytest.fixture
def transcoder() -> MsgpackTranscoder:
    return MsgpackTranscoder()


# Built-in types, one at a time.


@pytest.mark.parametrize("value", [None, True, False])
def test_none_and_bools(transcoder: MsgpackTranscoder, value: bool | None) -> None:
    round_trip(transcoder, value)


def test_bool_never_becomes_int(transcoder: MsgpackTranscoder) -> None:
    assert transcoder.encode(True) == b"\xc3"
    assert transcoder.encode(1) == b"\x01"
    round_trip(transcoder, [True, 1, False, 0])
    round_trip(transcoder, {True: "bool", 2: "int"})
    assert transcoder.encode({True: 1}) != transcoder.encode({1: 1})


@pytest.mark.parametrize(
    "value",
    [
        0,
        1,
        -1,
        -32,
        -33,
        127,
        128,
        255,
        256,
        2**31,
        2**32,
        2**63 - 1,
        2**63,
        2**64 - 1,  # largest uint64: still native
        -(2**63),  # smallest int64: still native
        2**64,
        -(2**63) - 1,
        2**64 + 1,
        -(2**64),
        10**100,
        -(10**100),
        2**1000 - 1,
        -(2**1000),
    ],
)
def test_ints(transcoder: MsgpackTranscoder, value: int) -> None:
    round_trip(transcoder, value)


def test_ints_take_the_smallest_form(transcoder: MsgpackTranscoder) -> None:
    assert transcoder.encode(5) == b"\x05"
    assert transcoder.encode(-5) == b"\xfb"
    assert transcoder.encode(200) == b"\xcc\xc8"
    assert transcoder.encode(70000) == b"\xce\x00\x01\x11\x70"
    assert transcoder.encode(2**64 - 1) == b"\xcf" + b"\xff" * 8
    # Beyond 64 bits: extension type 3, minimal two's complement.
    assert transcoder.encode(2**64) == b"\xc7\x09\x03\x01" + b"\x00" * 8
    assert transcoder.encode(-(2**63) - 1) == b"\xc7\x09\x03\xff\x7f" + b"\xff" * 7


@pytest.mark.parametrize(
    "value",
    [0.0, -0.0, 1.5, -2.25, 0.1, 1e308, 5e-324, math.inf, -math.inf, 3.0, 2.0**70],
)
def test_floats(transcoder: MsgpackTranscoder, value: float) -> None:
    round_trip(transcoder, value)


def test_floats_are_always_float64(transcoder: MsgpackTranscoder) -> None:
    assert transcoder.encode(1.5) == b"\xcb" + struct.pack(">d", 1.5)
    assert transcoder.encode(-0.0) == b"\xcb" + struct.pack(">d", -0.0)
    assert transcoder.encode(0.0) != transcoder.encode(-0.0)
    copy = transcoder.decode(transcoder.encode(math.nan))
    assert isinstance(copy, float)
    assert math.isnan(copy)


@pytest.mark.parametrize("value", ["", "a", "a'b", 'a"b', "🐈 哈哈", "x" * 31, "x" * 32, "é" * 300])
def test_str(transcoder: MsgpackTranscoder, value: str) -> None:
    round_trip(transcoder, value)


@pytest.mark.parametrize("value", [b"", b"\x00", b"abc", bytes(range(256)), b"\xff" * 70000])
def test_bytes_stay_bytes(transcoder: MsgpackTranscoder, value: bytes) -> None:
    round_trip(transcoder, value)
    round_trip(transcoder, {"blob": value, "text": "abc"})


def test_lists_and_tuples_keep_their_types(transcoder: MsgpackTranscoder) -> None:
    round_trip(transcoder, [])
    round_trip(transcoder, ())
    round_trip(transcoder, [[]])
    round_trip(transcoder, ((),))
    round_trip(transcoder, [()])
    round_trip(transcoder, ([],))
    round_trip(transcoder, ((1, 2), [3, (4, [5, (6,)])]))
    round_trip(transcoder, [(1, "a"), {"b": 2}])
    round_trip(transcoder, ([1, "a"], {"b": 2}))
    round_trip(transcoder, {"a": (1, 2), "b": [3, 4], "c": [(5, (6, [7]))]})
    round_trip(transcoder, {"deep": [{"t": ((), ((),), [()])}]})


def test_dicts(transcoder: MsgpackTranscoder) -> None:
    round_trip(transcoder, {})
    round_trip(transcoder, {"a": {}})
    round_trip(transcoder, {"a": {"b": {"c": 1}}})
    round_trip(transcoder, {"_type_": 1, "_data_": 2})  # JSONTranscoder's markers mean nothing
    round_trip(transcoder, {1: "a", -1: "b", 2**70: "big", 1.5: "float", None: "none"})
    round_trip(transcoder, {b"raw": 1, "raw": 2})
    round_trip(transcoder, {(1, "a"): [1], (1, ("b",)): [2], (): [3]})
    round_trip(transcoder, {uuid4(): 1, Decimal("1.5"): 2, date(2024, 2, 29): 3})
    round_trip(transcoder, {datetime(2024, 1, 1, 12): "naive", "z": [{"y": 1}]})


def test_uuid(transcoder: MsgpackTranscoder) -> None:
    for value in (uuid4(), UUID(int=0), UUID(int=2**128 - 1)):
        round_trip(transcoder, value)
    value = UUID("b2723fe2-c01a-40d2-875e-a3aac6a09ff5")
    assert transcoder.encode(value) == b"\xd8\x04" + value.bytes


@pytest.mark.parametrize(
    "text",
    [
        "0",
        "-0",
        "0.00",
        "-0.00",
        "1.0",
        "1.00",
        "12.50",
        "1E+10",
        "1.20E+5",
        "-1.5E-7",
        "1E-1000000",
        "123456789012345678901234567890.123456789",
        "NaN",
        "-NaN",
        "NaN123",
        "sNaN",
        "-sNaN",
        "Infinity",
        "-Infinity",
    ],
)
def test_decimal_exact_str_form(transcoder: MsgpackTranscoder, text: str) -> None:
    value = Decimal(text)
    copy = round_trip(transcoder, value)
    assert str(copy) == str(value)


def test_decimal_text_ignores_the_context(transcoder: MsgpackTranscoder) -> None:
    value = Decimal("1.20E+5")
    data = transcoder.encode(value)
    with localcontext() as ctx:
        ctx.capitals = 0
        assert str(value) == "1.20e+5"
        assert transcoder.encode(value) == data


@pytest.mark.parametrize(
    "offset",
    [
        timedelta(0),
        timedelta(hours=5, minutes=45),  # Nepal
        timedelta(hours=-3, minutes=-30),  # Newfoundland
        timedelta(hours=12, minutes=45),  # Chatham
        timedelta(hours=-9, minutes=-30),
        timedelta(hours=23, minutes=59, seconds=59, microseconds=999999),
        timedelta(hours=-23, minutes=-59, seconds=-59, microseconds=-999999),
        timedelta(seconds=1),
        timedelta(microseconds=-1),
    ],
)
def test_aware_datetimes_keep_offset_and_microseconds(
    transcoder: MsgpackTranscoder, offset: timedelta
) -> None:
    tz = timezone(offset)
    for value in (
        datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=tz),
        datetime(2024, 1, 1, tzinfo=tz),
        datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=tz),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=tz),
        datetime.now(tz),
    ):
        copy = round_trip(transcoder, value)
        assert copy.utcoffset() == offset
        assert copy.microsecond == value.microsecond


def test_same_instant_in_two_offsets_stays_distinct(transcoder: MsgpackTranscoder) -> None:
    utc = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    nepal = utc.astimezone(timezone(timedelta(hours=5, minutes=45)))
    assert utc == nepal
    assert transcoder.encode(utc) != transcoder.encode(nepal)
    assert transcoder.decode(transcoder.encode(nepal)).utcoffset() == nepal.utcoffset()
    assert transcoder.decode(transcoder.encode(utc)).tzinfo is UTC


def test_naive_datetimes_stay_naive(transcoder: MsgpackTranscoder) -> None:
    for value in (
        datetime(2024, 2, 29, 1, 2, 3, 456789),
        datetime(1, 1, 1),
        datetime(9999, 12, 31, 23, 59, 59, 999999),
        datetime.now(),
    ):
        copy = round_trip(transcoder, value)
        assert copy.tzinfo is None


def test_zoneinfo_datetime_keeps_its_offset(transcoder: MsgpackTranscoder) -> None:
    zoneinfo = pytest.importorskip("zoneinfo")
    try:
        tz = zoneinfo.ZoneInfo("Asia/Kathmandu")
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip("no time zone database")
    value = datetime(2024, 7, 1, 9, 30, 0, 123456, tzinfo=tz)
    copy = transcoder.decode(transcoder.encode(value))
    assert copy == value
    assert copy.utcoffset() == timedelta(hours=5, minutes=45)


def test_dates_and_times(transcoder: MsgpackTranscoder) -> None:
    for value in (date(1, 1, 1), date(2024, 2, 29), date(9999, 12, 31)):
        round_trip(transcoder, value)
    for t in (
        time(),
        time(23, 59, 59, 999999),
        time(12, 0, tzinfo=timezone(timedelta(hours=5, minutes=45))),
        time(0, 0, 0, 1, tzinfo=timezone(timedelta(hours=-3, minutes=-30))),
    ):
        round_trip(transcoder, t)
    # A datetime is a date, but it must not come back as one.
    assert type(transcoder.decode(transcoder.encode(datetime(2024, 1, 1)))) is datetime
    assert type(transcoder.decode(transcoder.encode(date(2024, 1, 1)))) is date


def test_mixed_event_like_dict(transcoder: MsgpackTranscoder) -> None:
    value = {
        "originator_topic": "imageledger.domain.events:ImageLedger",
        "timestamp": datetime.now(UTC),
        "image_id": uuid4(),
        "digest": "sha256:" + "ab" * 32,
        "size": 2**40,
        "price": Decimal("12.50"),
        "pinned": False,
        "blob": b"\x00\x01",
        "platform": ("linux", "amd64", None),
        "layers": [{"digest": f"sha256:{i}", "size": i, "annotations": {}} for i in range(5)],
    }
    data = transcoder.encode(value)
    round_trip(transcoder, value)
    stored_key_order_is_canonical(transcoder, data)
    with pytest.raises(ValueError):  # not JSON, not even UTF-8
        json.loads(data)


# Canonical bytes.


def test_key_insertion_order_does_not_matter(transcoder: MsgpackTranscoder) -> None:
    a = {"b": 1, "a": 2, "aa": 3, "é": 4, "z" * 40: 5, 1: 6, (1,): 7}
    b = dict(reversed(list(a.items())))
    assert list(a) != list(b)
    assert transcoder.encode(a) == transcoder.encode(b)
    assert transcoder.encode({"x": a, "y": [a]}) == transcoder.encode({"y": [b], "x": b})
    stored_key_order_is_canonical(transcoder, transcoder.encode(a))


def test_str_keys_are_ordered_by_their_encoded_bytes(transcoder: MsgpackTranscoder) -> None:
    # Shorter first (the header holds the length), then byte order; UTF-8 length, not len().
    keys = ["b", "a", "ab", "é", "zz", "x" * 31, "x" * 32, "y" * 31, "é" * 16, "\U0001f408", "~"]
    data = transcoder.encode(dict.fromkeys(keys, 0))
    pairs = msgpack.unpackb(data, object_pairs_hook=list)
    stored = [key for key, _ in pairs]
    assert stored == sorted(keys, key=msgpack.packb)
    assert stored[:3] == ["a", "b", "~"]


def test_the_key_order_cache_keeps_types_apart(transcoder: MsgpackTranscoder) -> None:
    class Tag(str):
        __slots__ = ()

    for _ in range(3):  # fill and hit the cache
        assert transcoder.encode({"a": 1, "b": 2}) == transcoder.encode({"b": 2, "a": 1})
    # Equal keys of another type must not borrow the str keys' order or identity.
    assert_same({1: "x"}, transcoder.decode(transcoder.encode({1: "x"})))
    assert_same({True: "x"}, transcoder.decode(transcoder.encode({True: "x"})))
    assert_same({"a": 1}, transcoder.decode(transcoder.encode({Tag("a"): 1})))

    # A registered str subclass as a key, after the equal plain str key's order was cached.
    registered = MsgpackTranscoder()
    registered.register(DigestAsDict())
    key = "sha256:abc"
    for _ in range(3):
        assert_same({key: 1}, registered.decode(registered.encode({key: 1})))
    assert_same({Digest(key): 1}, registered.decode(registered.encode({Digest(key): 1})))


def test_many_dict_shapes_overflow_the_key_order_cache(transcoder: MsgpackTranscoder) -> None:
    shapes = [{f"k{n}": n, "z": [n]} for n in range(tmod._KEY_ORDER_CACHE_SIZE + 100)]
    first = [transcoder.encode(shape) for shape in shapes]
    assert [transcoder.encode(shape) for shape in reversed(shapes)] == first[::-1]
    assert [MsgpackTranscoder().encode(shape) for shape in shapes[-5:]] == first[-5:]


def test_equal_keys_that_encode_identically_are_refused(transcoder: MsgpackTranscoder) -> None:
    class Picky(str):
        """Like eventsourcing's test MyStr: equal only to its own type."""

        __slots__ = ()

        def __eq__(self, other: object) -> bool:
            return type(self) is type(other) and str.__eq__(self, other)

        def __hash__(self) -> int:
            return str.__hash__(self)

    value = {"a": 1, Picky("a"): 2}
    assert len(value) == 2
    with pytest.raises(ValueError, match="encode identically"):
        transcoder.encode(value)


# Subclasses of built-in types, and registered transcodings.


class Colour(StrEnum):
    RED = "red"


class Level(IntEnum):
    HIGH = 3


class Point(NamedTuple):
    x: int
    y: int


Legacy = namedtuple("Legacy", "a b")


class Digest(str):
    """A str subclass that, once registered, must come back as itself."""

    __slots__ = ()


class MyDict(dict[str, Any]):
    pass


class MyList(list[Any]):
    pass


class MyInt(int):
    pass


class MyFloat(float):
    pass


class MyBytes(bytes):
    pass


def test_builtin_subclasses_encode_as_their_base(transcoder: MsgpackTranscoder) -> None:
    cases: list[tuple[Any, Any]] = [
        (Colour.RED, "red"),
        (Level.HIGH, 3),
        (MyInt(7), 7),
        (MyInt(2**70), 2**70),
        (MyFloat(-0.0), -0.0),
        (MyBytes(b"ab"), b"ab"),
        (Digest("sha256:x"), "sha256:x"),
        (MyDict(b=1, a=2), {"a": 2, "b": 1}),
        (OrderedDict([("b", 1), ("a", 2)]), {"a": 2, "b": 1}),
        (MyList([1, (2,)]), [1, (2,)]),
        (Point(1, 2), (1, 2)),
        (Legacy("a", [1]), ("a", [1])),
        ({Colour.RED: Level.HIGH}, {"red": 3}),
        ([Colour.RED, MyDict(x=Level.HIGH)], ["red", {"x": 3}]),
    ]
    for value, base in cases:
        assert transcoder.encode(value) == transcoder.encode(base), value
        assert_same(base, transcoder.decode(transcoder.encode(value)))
    assert transcoder.encode(Level.HIGH) == b"\x03"
    assert transcoder.encode(Colour.RED) == b"\xa3red"


class CustomType1:
    def __init__(self, value: UUID) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]


class CustomType2:
    def __init__(self, value: CustomType1) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]


class CustomType1AsUUID(Transcoding):
    type = CustomType1
    name = "custom_type1_as_uuid"

    def encode(self, obj: CustomType1) -> UUID:
        return obj.value

    def decode(self, data: UUID) -> CustomType1:
        assert isinstance(data, UUID)
        return CustomType1(data)


class CustomType2AsCustomType1(Transcoding):
    """Encodes to another registered type, which must be encoded in turn."""

    type = CustomType2
    name = "custom_type2_as_custom_type1"

    def encode(self, obj: CustomType2) -> CustomType1:
        return obj.value

    def decode(self, data: CustomType1) -> CustomType2:
        assert isinstance(data, CustomType1)
        return CustomType2(data)


class DigestAsDict(Transcoding):
    type = Digest
    name = "digest"

    def encode(self, obj: Digest) -> dict[str, Any]:
        algorithm, _, hex_ = obj.partition(":")
        return {"hex": hex_, "algorithm": algorithm, "parts": (algorithm, hex_)}

    def decode(self, data: dict[str, Any]) -> Digest:
        assert type(data["parts"]) is tuple
        return Digest(f"{data['algorithm']}:{data['hex']}")


class LevelAsName(Transcoding):
    type = Level
    name = "level"

    def encode(self, obj: Level) -> str:
        return obj.name

    def decode(self, data: str) -> Level:
        return Level[data]


@pytest.fixture
def registered() -> MsgpackTranscoder:
    transcoder = MsgpackTranscoder()
    transcoder.register(CustomType1AsUUID())
    transcoder.register(CustomType2AsCustomType1())
    transcoder.register(DigestAsDict())
    transcoder.register(LevelAsName())
    return transcoder


def test_nested_custom_types(registered: MsgpackTranscoder) -> None:
    uuid = UUID("b2723fe2c01a40d2875ea3aac6a09ff5")
    value = CustomType2(CustomType1(uuid))
    data = registered.encode(value)
    copy = registered.decode(data)
    assert isinstance(copy, CustomType2)
    assert isinstance(copy.value, CustomType1)
    assert copy.value.value == uuid
    # Storage names the transcodings, outermost first, wrapping the built-in UUID type.
    outer = msgpack.unpackb(data)
    assert outer.code == tmod.EXT_REGISTERED
    name, inner = msgpack.unpackb(outer.data)
    assert name == "custom_type2_as_custom_type1"
    name, innermost = msgpack.unpackb(inner.data)
    assert name == "custom_type1_as_uuid"
    assert innermost == msgpack.ExtType(tmod.EXT_UUID, uuid.bytes)


def test_custom_types_inside_containers(registered: MsgpackTranscoder) -> None:
    value = {
        "a": CustomType2(CustomType1(uuid4())),
        "b": [CustomType1(uuid4()), (CustomType1(uuid4()),)],
        "digest": Digest("sha256:abc"),
        "level": Level.HIGH,
    }
    data = registered.encode(value)
    copy = registered.decode(data)
    assert copy == value
    assert type(copy["b"][1]) is tuple
    assert type(copy["digest"]) is Digest
    assert copy["level"] is Level.HIGH
    assert registered.encode(copy) == data
    stored_key_order_is_canonical(registered, data)


def test_registered_transcodings_win_over_subclass_handling(
    transcoder: MsgpackTranscoder,
) -> None:
    digest, level = Digest("sha256:abc"), Level.HIGH
    # Unregistered, these are a str and an int (and the subclass decision is cached) ...
    assert_same("sha256:abc", transcoder.decode(transcoder.encode(digest)))
    assert_same(3, transcoder.decode(transcoder.encode(level)))
    # ... registering them afterwards still takes over, for values and for dict keys.
    transcoder.register(DigestAsDict())
    transcoder.register(LevelAsName())
    assert_same(digest, transcoder.decode(transcoder.encode(digest)))
    assert transcoder.decode(transcoder.encode(level)) is Level.HIGH
    copy = transcoder.decode(transcoder.encode({level: digest, 4: "int"}))
    assert copy == {Level.HIGH: digest, 4: "int"}
    assert {type(k) for k in copy} == {Level, int}


def test_registered_transcodings_win_over_builtin_types(transcoder: MsgpackTranscoder) -> None:
    uuid, when = uuid4(), datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    builtin = transcoder.encode([uuid, when, Decimal("1.5")])
    transcoder.register(UUIDAsHex())
    transcoder.register(DecimalAsStr())
    transcoder.register(DatetimeAsISO())
    data = transcoder.encode([uuid, when, Decimal("1.5")])
    assert data != builtin
    assert uuid.hex.encode() in data
    assert b"uuid_hex" in data
    round_trip(transcoder, [uuid, when, Decimal("1.5")])
    # The built-in extension types still decode: data written before registering stays valid.
    assert_same([uuid, when, Decimal("1.5")], transcoder.decode(builtin))


@dataclasses.dataclass(frozen=True)
class Frozen:
    name: str
    parts: tuple[int, ...]


class FrozenAsList(Transcoding):
    type = Frozen
    name = "frozen"
    immutable = True

    def __init__(self) -> None:
        self.decoded = 0

    def encode(self, obj: Frozen) -> list[Any]:
        return [obj.name, obj.parts]

    def decode(self, data: list[Any]) -> Frozen:
        self.decoded += 1
        return Frozen(data[0], data[1])


def test_immutable_values_are_decoded_once_per_payload(transcoder: MsgpackTranscoder) -> None:
    frozen = FrozenAsList()
    transcoder.register(frozen)
    value = Frozen("a", (1, 2))
    first = transcoder.decode(transcoder.encode({"x": value, "y": [value]}))
    again = transcoder.decode(transcoder.encode((value, Frozen("b", (3,)))))
    assert first == {"x": value, "y": [value]}
    assert again == (value, Frozen("b", (3,)))
    # One decoded object serves every occurrence of the same bytes, in any enclosing value.
    assert first["x"] is first["y"][0] is again[0]
    assert frozen.decoded == 2  # "a" once, "b" once


def test_mutable_values_are_never_shared(registered: MsgpackTranscoder) -> None:
    # CustomType1 is mutable (its transcoding does not say immutable): each decode is fresh,
    # so mutating one decoded value cannot leak into the next decode of the same bytes.
    data = registered.encode(CustomType1(UUID(int=1)))
    first = registered.decode(data)
    first.value = UUID(int=2)
    second = registered.decode(data)
    assert second is not first
    assert second.value == UUID(int=1)


def test_decoded_memo_is_bounded_and_stays_correct(transcoder: MsgpackTranscoder) -> None:
    frozen = FrozenAsList()
    transcoder.register(frozen)
    count = tmod._DECODED_CACHE_SIZE + 100
    values = [Frozen(f"v{i}", (i,)) for i in range(count)]
    encoded = [transcoder.encode(v) for v in values]
    for _ in range(2):
        assert [transcoder.decode(data) for data in encoded] == values
    assert len(transcoder._decoded) <= tmod._DECODED_CACHE_SIZE


def test_registering_again_forgets_decoded_values(transcoder: MsgpackTranscoder) -> None:
    transcoder.register(FrozenAsList())
    data = transcoder.encode(Frozen("a", (1,)))
    transcoder.decode(data)

    class Renamed(FrozenAsList):
        def decode(self, data: list[Any]) -> Frozen:
            return Frozen(data[0].upper(), data[1])

    transcoder.register(Renamed())
    assert transcoder.decode(data) == Frozen("A", (1,))


def test_registering_str_itself_is_respected(transcoder: MsgpackTranscoder) -> None:
    class StrAsUpper(Transcoding):
        type = str
        name = "upper"

        def encode(self, obj: str) -> bytes:
            return obj.upper().encode()

        def decode(self, data: bytes) -> str:
            return data.decode().lower()

    assert transcoder.encode({"b": 1, "a": 2})  # primes the str-key order cache
    transcoder.register(StrAsUpper())
    data = transcoder.encode({"b": "x", "a": ["y"]})
    assert b"upper" in data
    assert b"B" in data
    assert transcoder.decode(data) == {"b": "x", "a": ["y"]}
    stored_key_order_is_canonical(transcoder, data)


# Errors.


class Unsupported:
    pass


def test_unregistered_type_on_encode(transcoder: MsgpackTranscoder) -> None:
    expected = (
        f"Object of type {Unsupported} is not serializable. Please define and register a "
        "custom transcoding for this type."
    )
    for value in (Unsupported(), {"a": Unsupported()}, [1, (2, Unsupported())]):
        with pytest.raises(TranscodingNotRegisteredError) as caught:
            transcoder.encode(value)
        assert isinstance(caught.value, TypeError)
        assert caught.value.args[0] == expected
    unhashable_keys: tuple[object, ...] = (Unsupported, frozenset())
    for key in unhashable_keys:
        with pytest.raises(TranscodingNotRegisteredError, match=r"is not serializable"):
            transcoder.encode({"a": 1, key: 2})
    with pytest.raises(TranscodingNotRegisteredError) as caught:
        transcoder.encode({"a": [Unsupported()]})
    assert caught.value.args[0] == expected
    with pytest.raises(TranscodingNotRegisteredError, match="<class 'set'>"):
        transcoder.encode({1, 2})
    with pytest.raises(TranscodingNotRegisteredError, match="<class 'bytearray'>"):
        transcoder.encode(bytearray(b"x"))  # would otherwise come back as bytes
    with pytest.raises(TranscodingNotRegisteredError, match=r"<class 'datetime\.timedelta'>"):
        transcoder.encode(timedelta(1))


def test_unknown_name_on_decode(registered: MsgpackTranscoder) -> None:
    data = registered.encode({"digest": Digest("sha256:abc")})
    with pytest.raises(TranscodingNotRegisteredError) as caught:
        MsgpackTranscoder().decode(data)
    assert isinstance(caught.value, TypeError)
    assert caught.value.args[0] == (
        "Data serialized with name 'digest' is not deserializable. Please register a "
        "custom transcoding for this type."
    )
    forged = msgpack.packb(msgpack.ExtType(tmod.EXT_REGISTERED, msgpack.packb(["nope", 1])))
    with pytest.raises(TranscodingNotRegisteredError, match="name 'nope'"):
        registered.decode(forged)


def test_unknown_extension_code_on_decode(transcoder: MsgpackTranscoder) -> None:
    with pytest.raises(TranscodingNotRegisteredError, match="extension type 99"):
        transcoder.decode(msgpack.packb([msgpack.ExtType(99, b"")]))


def test_a_failed_encode_leaves_the_transcoder_usable(transcoder: MsgpackTranscoder) -> None:
    with pytest.raises(TypeError):
        transcoder.encode({"a": [1, Unsupported()]})
    round_trip(transcoder, {"a": [1, (2,)]})


def test_concurrent_encoding_is_deterministic(transcoder: MsgpackTranscoder) -> None:
    values = [{"n": n, "t": (n, str(n)), "d": {"y": n, "x": [n]}} for n in range(200)]
    expected = [transcoder.encode(v) for v in values]
    results: list[list[bytes]] = []

    def work() -> None:
        results.append([transcoder.encode(v) for v in values])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 4


# Properties.

_OFFSETS = st.timedeltas(
    min_value=timedelta(hours=-24) + timedelta(microseconds=1),
    max_value=timedelta(hours=24) - timedelta(microseconds=1),
).map(timezone)
_TIMEZONES = st.none() | _OFFSETS

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**300), max_value=2**300)
    | st.floats()
    | st.text()
    | st.binary()
    | st.uuids()
    | st.decimals()
    | st.datetimes(timezones=_TIMEZONES)
    | st.dates()
    | st.times(timezones=_TIMEZONES)
)
_KEYS = (
    st.text()
    | st.integers()
    | st.integers(min_value=2**64, max_value=2**100)
    | st.booleans()
    | st.none()
    | st.binary()
    | st.floats(allow_nan=False)
    | st.uuids()
    | st.dates()
    | st.datetimes()
    | st.tuples(st.integers(), st.text())
)
_VALUES = st.recursive(
    _SCALARS,
    lambda children: (
        st.lists(children, max_size=5)
        | st.lists(children, max_size=5).map(tuple)
        | st.dictionaries(_KEYS, children, max_size=5)
        | st.dictionaries(st.text(max_size=40), children, max_size=8)
    ),
    max_leaves=25,
)


def _reinserted(value: Any, rnd: random.Random) -> Any:
    """The same value with every dict rebuilt in a random insertion order."""
    if type(value) is dict:
        items = list(value.items())
        rnd.shuffle(items)
        return {k: _reinserted(v, rnd) for k, v in items}
    if type(value) is list:
        return [_reinserted(v, rnd) for v in value]
    if type(value) is tuple:
        return tuple(_reinserted(v, rnd) for v in value)
    return value


@settings(max_examples=300, deadline=None)
@given(_VALUES)
def test_property_round_trip(value: Any) -> None:
    round_trip(MsgpackTranscoder(), value)


@settings(max_examples=300, deadline=None)
@given(_VALUES, st.randoms(use_true_random=False))
def test_property_canonical_under_key_reordering(value: Any, rnd: random.Random) -> None:
    transcoder = MsgpackTranscoder()
    data = transcoder.encode(value)
    assert transcoder.encode(_reinserted(value, rnd)) == data
    assert MsgpackTranscoder().encode(_reinserted(value, rnd)) == data  # a fresh instance too
    stored_key_order_is_canonical(transcoder, data)


@settings(max_examples=300, deadline=None)
@given(_VALUES)
def test_property_decoded_values_re_encode_identically(value: Any) -> None:
    transcoder = MsgpackTranscoder()
    data = transcoder.encode(value)
    assert transcoder.encode(transcoder.decode(data)) == data
    assert transcoder.encode(transcoder.decode(data)) == data  # again, with caches warm


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(), st.integers(), max_size=12))
def test_property_str_keys_sort_like_their_encoding(value: dict[str, int]) -> None:
    data = MsgpackTranscoder().encode(value)
    pairs = msgpack.unpackb(data, object_pairs_hook=list)
    encoded_keys = [msgpack.packb(k) for k, _ in pairs]
    assert encoded_keys == sorted(encoded_keys)


# An eventsourcing application on the LMDB ledger, with this transcoder.


class Shipment(Aggregate):
    @event("Registered")
    def __init__(
        self,
        reference: UUID,
        value: Decimal,
        booked_at: datetime,
        route: tuple[Any, ...],
        digest: Digest,
    ) -> None:
        self.reference = reference
        self.value = value
        self.booked_at = booked_at
        self.route = route
        self.digest = digest
        self.history: list[tuple[datetime, Decimal]] = []

    @event("Revalued")
    def revalue(self, value: Decimal, at: datetime, legs: tuple[tuple[str, int], ...]) -> None:
        self.history.append((at, self.value))
        self.value = value
        self.legs = legs


class Shipping(Application[UUID]):
    name = "shipping"
    is_snapshotting_enabled = True

    def construct_transcoder(self) -> Transcoder:
        # eventsourcing only calls register_transcodings for a JSONTranscoder.
        transcoder = super().construct_transcoder()
        assert isinstance(transcoder, MsgpackTranscoder)
        transcoder.register(DigestAsDict())
        return transcoder


def _ledger_env(tmp_path: Path) -> dict[str, str]:
    return {
        "PERSISTENCE_MODULE": PERSISTENCE_MODULE,
        "LMDB_PATH": str(tmp_path / "ledger"),
        "TRANSCODER_TOPIC": TRANSCODER_TOPIC,
    }


def _assert_shipment(expected: Shipment, actual: Shipment) -> None:
    assert actual.id == expected.id
    assert actual.version == expected.version
    for attribute in ("reference", "value", "booked_at", "route", "digest", "history", "legs"):
        assert_same(getattr(expected, attribute), getattr(actual, attribute))
    assert_same(expected.created_on, actual.created_on)
    assert_same(expected.modified_on, actual.modified_on)


def test_application_round_trips_through_the_ledger(tmp_path: Path) -> None:
    env = _ledger_env(tmp_path)
    nepal = timezone(timedelta(hours=5, minutes=45))
    app = Shipping(env=env)
    try:
        assert isinstance(app.mapper.transcoder, MsgpackTranscoder)
        shipment = Shipment(
            reference=uuid4(),
            value=Decimal("1234.500"),
            booked_at=datetime(2024, 2, 29, 23, 59, 59, 123456, tzinfo=nepal),
            route=("NRT", "KTM", ("via", "DEL")),
            digest=Digest("sha256:abc"),
        )
        shipment.revalue(
            Decimal("-0E-7"),
            datetime(2024, 3, 1, 0, 0, 0, 1, tzinfo=timezone(timedelta(hours=-3, minutes=-30))),
            (("NRT", 1), ("KTM", 2**70)),
        )
        app.save(shipment)

        notifications = app.recorder.select_notifications(None, 10)
        assert len(notifications) == 2
        for notification in notifications:
            state = notification.state
            assert 0x80 <= state[0] <= 0x8F or state[0] in (0xDE, 0xDF), state[:1]
            with pytest.raises(ValueError):
                json.loads(state)
            decoded = app.mapper.transcoder.decode(state)
            assert isinstance(decoded, dict)
            assert app.mapper.transcoder.encode(decoded) == state
        registered = app.mapper.transcoder.decode(notifications[0].state)
        assert type(registered["route"]) is tuple
        assert type(registered["route"][2]) is tuple
        assert type(registered["reference"]) is UUID
        assert type(registered["digest"]) is Digest
        assert str(app.mapper.transcoder.decode(notifications[1].state)["value"]) == "-0E-7"
        app.take_snapshot(shipment.id)
    finally:
        app.close()

    reopened = Shipping(env=env)
    try:
        copy: Aggregate = reopened.repository.get(shipment.id)  # from the snapshot
        assert isinstance(copy, Shipment)
        _assert_shipment(shipment, copy)
        assert reopened.snapshots is not None
        snapshots = list(reopened.snapshots.get(shipment.id))
        assert len(snapshots) == 1
        # Events alone (no snapshot) rebuild the same state.
        replayed: Aggregate | None = None
        for domain_event in reopened.events.get(shipment.id):
            replayed = cast(Aggregate.Event, domain_event).mutate(replayed)
        assert isinstance(replayed, Shipment)
        _assert_shipment(shipment, replayed)
    finally:
        reopened.close()


def test_transcoder_topic_alone_selects_it(tmp_path: Path) -> None:
    class Plain(Application[UUID]):
        name = "plain"

    env = _ledger_env(tmp_path)
    app = Plain(env=env)
    try:
        assert isinstance(app.mapper.transcoder, MsgpackTranscoder)
        aggregate = Aggregate()
        app.save(aggregate)
    finally:
        app.close()
    again = Plain(env=env)
    try:
        copy: Aggregate = again.repository.get(aggregate.id)
        assert copy.id == aggregate.id
        assert_same(aggregate.created_on, copy.created_on)
    finally:
        again.close()
