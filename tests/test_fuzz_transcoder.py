"""Fuzzing the stored-event decoder: `MsgpackTranscoder.decode` with the domain's transcodings
and `StoredEventMapper.to_domain_event` over random bytes and mutated real events.

The log is read from disk, so any bytes may come back: whatever they are, decoding gives a
value or raises `UndecodableDataError` (a `LedgerCorruptError`), never a raw msgpack, struct,
TypeError or KeyError, nor eventsourcing's own `MapperDeserialisationError`.
"""

from __future__ import annotations

import dataclasses
import struct
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import uuid4

import msgpack
import pytest
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Mapper, StoredEvent, TranscodingNotRegisteredError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from imageledger.domain.errors import ImageLedgerError, LedgerCorruptError
from imageledger.domain.events import LEDGER_ID, TRANSCODINGS, Batch
from imageledger.domain.model import (
    Actor,
    DeletedBlob,
    ImageConfig,
    ImageContent,
    Layer,
    Platform,
    PrunePolicy,
    RemovedReference,
)
from imageledger.storage import transcoder as tmod
from imageledger.storage.ledgerapp import ledger_transcoder
from imageledger.storage.transcoder import (
    MsgpackTranscoder,
    StoredEventMapper,
    UndecodableDataError,
    UnknownTranscodingError,
)

FUZZ = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
DIGEST = "sha256:" + "ab" * 32
NOW = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


def domain_transcoder() -> MsgpackTranscoder:
    """The transcoder the ledger's application uses (the domain's types registered)."""
    return ledger_transcoder()


def _events() -> list[DomainEventProtocol[Any]]:
    """One of each kind of event the ledger records, with every value type in it."""
    actor = Actor(user="root", uid=0, pid=42, host="box", version="0.1.0")
    content = ImageContent(
        manifest_digest=DIGEST,
        manifest_media_type="application/vnd.oci.image.manifest.v1+json",
        manifest_size=400,
        config=ImageConfig(
            digest="sha256:" + "cd" * 32,
            env=("PATH=/bin",),
            cmd=("/bin/sh",),
            entrypoint=None,
            working_dir="/",
            user=None,
            labels=(("a", "1"),),
            stop_signal="SIGTERM",
        ),
        config_size=300,
        platform=Platform("linux", "arm64", "v8"),
        layers=(
            Layer(DIGEST, "application/vnd.oci.image.layer.v1.tar", 10, DIGEST, 0),
            Layer(
                "sha256:" + "ef" * 32, "application/vnd.oci.image.layer.v1.tar+gzip", 2**40, None, 1
            ),
        ),
    )
    batch = Batch(0, actor, NOW)
    batch.pulled("docker.io/library/alpine:3.19", "archive:/tmp/a.tar", content, cached=False)
    batch.used("docker.io/library/alpine:3.19", DIGEST, "sandbox-1")
    batch.released("sandbox-1", (("docker.io/library/alpine:3.19", DIGEST),))
    batch.stamp = NOW.astimezone(timezone(timedelta(hours=5, minutes=45)))
    batch.pruned(
        PrunePolicy(unused_for_seconds=3600, keep=("docker.io/library/*",)),
        NOW,
        (RemovedReference("docker.io/library/alpine:3.19", DIGEST, "unused"),),
        (DeletedBlob(DIGEST, "layer", 10, "unreferenced"),),
        10,
    )
    return list(batch.events)


TRANSCODER = domain_transcoder()
MAPPER = Mapper[Any](transcoder=TRANSCODER)
STORED = [MAPPER.to_stored_event(event) for event in _events()]
STATES = [stored.state for stored in STORED]


def decode_or_package_error(transcoder: MsgpackTranscoder, data: bytes) -> Any:
    """Decode `data`; a failure must be the package's own ledger error, cause chained."""
    try:
        return transcoder.decode(data)
    except UndecodableDataError as e:
        assert isinstance(e, LedgerCorruptError)
        assert isinstance(e, ImageLedgerError)
        assert len(str(e)) < 2000, "a damaged value is quoted in full"
        return e


def test_the_real_events_round_trip() -> None:
    # The fuzzing below starts from these: they must be what the ledger really stores.
    mapper = StoredEventMapper(transcoder=domain_transcoder())
    for event, stored in zip(_events(), STORED, strict=True):
        again = mapper.to_domain_event(stored)
        assert type(again) is type(event)
        assert again.__dict__ == event.__dict__
        assert mapper.to_stored_event(again).state == stored.state


@FUZZ
@given(st.binary(max_size=300))
@example(b"")
@example(b"\xc1")  # never used by msgpack
@example(b"\x92\x01")  # truncated array
@example(b"\x01\x02")  # extra data
@example(b"\x81\x91\x01\x01")  # a list as a map key: unhashable
@example(b"\xa1\xff")  # invalid UTF-8
@example(b"\xd4\x63\x00")  # unknown extension code 99
@example(b"\xd5\x06\x00\x00")  # a naive datetime of 2 bytes (struct.error)
@example(b"\xc7\x0b\x06" + struct.pack(">HBBBBBI", 2024, 13, 1, 0, 0, 0, 0))  # month 13
@example(b"\xc7\x13\x07" + struct.pack(">HBBBBBIq", 2024, 1, 1, 0, 0, 0, 0, 2**62))  # offset
@example(b"\xc7\x03\x05\xff\xfe\xfd")  # a Decimal that is not ASCII
@example(b"\xc7\x03\x05abc")  # a Decimal that is not a number
@example(b"\xd4\x04\x00")  # a UUID of one byte
@example(b"\xd4\x02\x01")  # a tuple whose payload is an int, not an array
@example(b"\xc7\x02\x01\x91\x01")  # a registered payload that is not [name, data]
def test_random_bytes_decode_or_raise_a_ledger_error(data: bytes) -> None:
    decode_or_package_error(TRANSCODER, data)


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, where, value in edits:
        if not out:
            out.append(value)
            continue
        at = where % len(out)
        if kind == 0:
            out[at] = value
        elif kind == 1:
            del out[at:]
        elif kind == 2:
            out.insert(at, value)
        else:
            del out[at]
    return bytes(out)


_edits = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 10_000), st.integers(0, 255)),
    min_size=1,
    max_size=4,
)


@FUZZ
@given(st.sampled_from(range(len(STATES))), _edits)
def test_mutated_events_decode_or_raise_a_ledger_error(index: int, edits: Any) -> None:
    decode_or_package_error(TRANSCODER, _mutate(STATES[index], edits))


_names = st.sampled_from([t.name for t in TRANSCODINGS] + ["nope", ""])
_payload_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=6) | st.sampled_from(["digest", "os", "uid"]), inner)
    ),
    max_leaves=12,
)


@FUZZ
@given(_names, _payload_values)
@example("imageledger.Platform", {"os": "linux"})  # a missing field: the dataclass refuses
@example("imageledger.Platform", [1, 2])  # not a dict of fields
@example("imageledger.Actor", {"user": "u", "uid": 0, "pid": 1, "host": "h", "nope": 1})
def test_registered_payloads_of_the_wrong_shape_raise_a_ledger_error(name: str, data: Any) -> None:
    inner = msgpack.packb([name, data], use_bin_type=True)
    outer = msgpack.packb(msgpack.ExtType(tmod.EXT_REGISTERED, inner), use_bin_type=True)
    decode_or_package_error(TRANSCODER, outer)


def test_deeply_nested_tuples_are_a_ledger_error_not_a_recursion_error() -> None:
    data = msgpack.packb(1)
    for _ in range(5000):
        data = msgpack.packb(msgpack.ExtType(tmod.EXT_TUPLE, msgpack.packb([data])))
        data = msgpack.packb(msgpack.ExtType(tmod.EXT_TUPLE, data))
    with pytest.raises(UndecodableDataError):
        TRANSCODER.decode(data)


def test_unknown_types_stay_eventsourcings_error_too() -> None:
    # eventsourcing raises TranscodingNotRegisteredError for an unknown name; so do we, and it
    # is a ledger error as well.
    inner = msgpack.packb(["nope", {}])
    data = msgpack.packb(msgpack.ExtType(tmod.EXT_REGISTERED, inner))
    with pytest.raises(UnknownTranscodingError) as caught:
        TRANSCODER.decode(data)
    assert isinstance(caught.value, TranscodingNotRegisteredError)
    assert isinstance(caught.value, LedgerCorruptError)


def test_a_failed_decode_leaves_the_transcoder_usable() -> None:
    transcoder = domain_transcoder()
    with pytest.raises(UndecodableDataError):
        transcoder.decode(STATES[1][:-3])
    assert transcoder.decode(STATES[1]) == TRANSCODER.decode(STATES[1])


# ---- the mapper ------------------------------------------------------------------------------


def to_event_or_package_error(stored: StoredEvent) -> DomainEventProtocol[Any] | None:
    mapper = StoredEventMapper(transcoder=TRANSCODER)
    try:
        event = mapper.to_domain_event(stored)
    except UndecodableDataError as e:
        assert isinstance(e, LedgerCorruptError)
        assert f"version {stored.originator_version}" in str(e)
        return None
    # What the mapper hands on has exactly its class's fields: a fold can read every one.
    for name in event.__dict__:
        getattr(event, name)
    return event


@FUZZ
@given(st.sampled_from(range(len(STORED))), _edits)
@example(1, [(1, 1, 0)])  # cut after the map header: an empty state
def test_mutated_stored_events_map_or_raise_a_ledger_error(index: int, edits: Any) -> None:
    stored = STORED[index]
    damaged = _mutate(stored.state, edits)
    to_event_or_package_error(dataclasses.replace(stored, state=damaged))


@FUZZ
@given(st.binary(max_size=200), st.sampled_from([s.topic for s in STORED] + ["nope:Nope", ""]))
@example(b"\x01", STORED[1].topic)  # a state that is an int, not a dict
@example(b"\x80", STORED[1].topic)  # an empty dict: no fields at all
def test_random_stored_events_map_or_raise_a_ledger_error(state: bytes, topic: str) -> None:
    stored = StoredEvent(originator_id=LEDGER_ID, originator_version=3, topic=topic, state=state)
    to_event_or_package_error(stored)


def test_a_state_with_a_missing_or_extra_field_is_refused() -> None:
    stored = STORED[1]
    state = TRANSCODER.decode(stored.state)
    for changed in ({k: v for k, v in state.items() if k != "reference"}, {**state, "x": 1}):
        damaged = dataclasses.replace(stored, state=TRANSCODER.encode(changed))
        with pytest.raises(UndecodableDataError, match="are not those of"):
            StoredEventMapper(transcoder=TRANSCODER).to_domain_event(damaged)


def test_the_plain_mapper_would_let_foreign_errors_out() -> None:
    # Why StoredEventMapper exists: eventsourcing's own mapper wraps decode failures in its
    # MapperDeserialisationError and lets a non-dict state through to a raw TypeError.
    stored = StoredEvent(
        originator_id=uuid4(), originator_version=1, topic=STORED[1].topic, state=b"\x01"
    )
    with pytest.raises(TypeError):
        MAPPER.to_domain_event(stored)
    with pytest.raises(UndecodableDataError):
        StoredEventMapper(transcoder=TRANSCODER).to_domain_event(stored)
