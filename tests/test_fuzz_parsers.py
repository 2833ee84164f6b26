"""Fuzzing the parsers of untrusted text: references (`domain/reference.py`), manifests, indexes,
configs and platforms (`storage/oci.py`).

Each input either parses into a value that holds the parser's promises (a reference that
re-parses to itself and makes a valid registry URL; descriptors with well-formed digests and
non-negative sizes) or raises the package's own error. Nothing else may escape: not httpx's
InvalidURL later, not Python's int-digit limit, not a TypeError on a JSON value of the wrong
type, not a RecursionError on deep nesting.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from imageledger.domain.errors import (
    ImageLedgerError,
    InvalidPlatformError,
    InvalidReferenceError,
    ManifestError,
)
from imageledger.domain.model import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    Platform,
)
from imageledger.domain.reference import Reference, canonical, parse_reference, validate_digest
from imageledger.storage.oci import (
    MAX_MANIFEST_SIZE,
    parse_config,
    parse_index,
    parse_json,
    parse_manifest,
    parse_platform,
)

FUZZ = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
SHA = "sha256:" + "ab" * 32
SHA2 = "sha256:" + "cd" * 32


# ---- references ------------------------------------------------------------------------------


def check_reference(text: Any) -> Reference | None:
    """Parse `text`: a reference that keeps every promise, or InvalidReferenceError."""
    try:
        ref = parse_reference(text)
    except InvalidReferenceError as e:
        assert isinstance(e, ImageLedgerError)
        assert str(e).startswith("invalid reference")
        return None
    assert parse_reference(str(ref)) == ref
    assert canonical(str(ref)) == str(ref)
    assert (ref.tag is None) != (ref.digest is None)
    if ref.digest is not None:
        assert validate_digest(ref.digest) == ref.digest
    # What a pull does with it: the registry URL must be valid, its host the registry's.
    suffix = ref.digest or ref.tag
    url = httpx.URL(f"https://{ref.registry}/v2/{ref.repository}/manifests/{suffix}")
    assert url.path == f"/v2/{ref.repository}/manifests/{suffix}"
    if ref.registry.startswith("["):
        host, _, port = ref.registry[1:].partition("]")
        assert ipaddress.IPv6Address(url.host) == ipaddress.IPv6Address(host)
        port = port.removeprefix(":")
    else:
        host, _, port = ref.registry.partition(":")
        assert url.host == host
    assert url.port in (None, int(port or 443))
    return ref


_ALPHABET = [*"abcxyz0129AZ.-_:/@[]", "%", " ", "\x00", "\n", "é", "ф", "٣", "\u200b"]
_hex = st.text(alphabet="0123456789abcdefABCDEF", min_size=1, max_size=4)
_ipv6ish = st.one_of(
    st.ip_addresses(v=6).map(str),
    st.lists(_hex | st.just(""), min_size=1, max_size=9).map(":".join),
    st.ip_addresses(v=4).map(str),
    st.sampled_from(["...", ":", "::", ":::", "1::2::3", "::ffff:1.2.3.4", "fe80::1%eth0"]),
)
_host = st.one_of(
    st.sampled_from(["docker.io", "index.docker.io", "localhost", "reg.io", "127.0.0.1", "a-b.c"]),
    _ipv6ish.map(lambda h: f"[{h}]"),
    st.text(alphabet=_ALPHABET, max_size=12),
)
_port = st.one_of(
    st.integers(0, 70000).map(str),
    st.integers(1, 6000).map(lambda n: "9" * n),
    st.integers(1, 20).map(lambda n: "0" * n + "443"),
    st.text(alphabet="0123456789٣", min_size=1, max_size=6),
)
_path = st.lists(
    st.from_regex(r"[a-z0-9]+([._-][a-z0-9]+)?", fullmatch=True) | st.text(_ALPHABET, max_size=5),
    min_size=1,
    max_size=3,
).map("/".join)
_digest = st.one_of(
    st.just(SHA), st.just("sha512:" + "0f" * 64), st.text(alphabet=_ALPHABET, max_size=12)
)


@st.composite
def hostile_references(draw: st.DrawFn) -> str:
    text = ""
    if draw(st.booleans()):
        text = draw(_host)
        if draw(st.booleans()):
            text += ":" + draw(_port)
        text += "/"
    text += draw(_path)
    if draw(st.booleans()):
        text += ":" + draw(st.text(alphabet=_ALPHABET, max_size=10))
    if draw(st.booleans()):
        text += "@" + draw(_digest)
    return text


@FUZZ
@given(hostile_references())
@example("[...]/a")
@example("[1.2.3.4]/a")
@example("reg.io:" + "9" * 5000 + "/a")
@example("[::1]:" + "0" * 4400 + "1/a")
def test_hostile_references_parse_or_raise_the_one_error(text: str) -> None:
    check_reference(text)


@FUZZ
@given(st.text(alphabet=st.sampled_from(_ALPHABET), max_size=120) | st.text(max_size=60))
def test_arbitrary_text_is_a_reference_or_the_one_error(text: str) -> None:
    check_reference(text)


@FUZZ
@given(st.one_of(st.none(), st.integers(), st.binary(max_size=20), st.lists(st.text(max_size=3))))
def test_non_strings_are_refused_as_references_and_digests(value: Any) -> None:
    with pytest.raises(InvalidReferenceError):
        parse_reference(value)
    with pytest.raises(InvalidReferenceError):
        validate_digest(value)


@FUZZ
@given(st.text(alphabet=st.sampled_from([*"sha256:512abcdefABCDEF0123456789", "é", " "])))
def test_digests_are_valid_or_refused(text: str) -> None:
    try:
        assert validate_digest(text) == text
    except InvalidReferenceError:
        return
    algorithm, _, hexdigest = text.partition(":")
    assert {"sha256": 64, "sha512": 128}[algorithm] == len(hexdigest)
    assert hexdigest == hexdigest.lower()


# ---- platforms -------------------------------------------------------------------------------


@FUZZ
@given(
    st.text(alphabet=st.sampled_from([*"linuxamd64/v8._-", " ", "\x1b", "\n", "é"]), max_size=30)
)
@example("linux/amd64\x1b[31m")
@example("linux/arm64/v8/")
@example(" linux/arm64")
def test_platforms_parse_or_raise_the_packages_error(text: str) -> None:
    try:
        platform = parse_platform(text)
    except InvalidPlatformError as e:
        assert isinstance(e, ImageLedgerError)
        assert isinstance(e, ValueError)  # the command line's exit 2, as before
        return
    assert parse_platform(str(platform)) == platform
    assert all(part.isprintable() and " " not in part for part in str(platform).split("/"))


def test_a_platform_that_is_not_a_string_is_the_packages_error() -> None:
    with pytest.raises(InvalidPlatformError):
        parse_platform(None)  # type: ignore[arg-type]
    assert parse_platform("linux/arm64/v8") == Platform("linux", "arm64", "v8")


# ---- manifests, indexes, configs -------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10),
    st.sampled_from([SHA, "sha256:", "", OCI_MANIFEST, OCI_CONFIG, OCI_LAYER, *INDEX_TYPES]),
)
_keys = st.sampled_from(
    [
        "schemaVersion",
        "mediaType",
        "config",
        "layers",
        "manifests",
        "digest",
        "size",
        "platform",
        "annotations",
        "os",
        "architecture",
        "variant",
        "rootfs",
        "diff_ids",
        "Env",
        "Cmd",
        "Labels",
    ]
)
_json_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(_keys | st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=25,
)


def _descriptor(media_type: str, digest: str = SHA, size: int = 10) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest, "size": size}


MANIFEST = {
    "schemaVersion": 2,
    "mediaType": OCI_MANIFEST,
    "config": _descriptor(OCI_CONFIG, SHA2, 300),
    "layers": [_descriptor(OCI_LAYER), _descriptor(OCI_LAYER, SHA2, 0)],
}
INDEX = {
    "schemaVersion": 2,
    "mediaType": sorted(INDEX_TYPES)[0],
    "manifests": [
        {
            **_descriptor(OCI_MANIFEST),
            "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
            "annotations": {"org.opencontainers.image.ref.name": "1.0"},
        }
    ],
}
CONFIG = {
    "architecture": "arm64",
    "os": "linux",
    "config": {"Env": ["A=1"], "Cmd": ["/bin/sh"], "Labels": {"a": "b"}, "WorkingDir": "/"},
    "rootfs": {"type": "layers", "diff_ids": [SHA, SHA2]},
}


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (keys and indexes) into a JSON value, the root included."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _paths(item, (*prefix, i))
    return found


@st.composite
def mutated(draw: st.DrawFn, document: dict[str, Any]) -> bytes:
    """`document` with a few values replaced, keys dropped or added, then maybe its bytes
    damaged: mostly-valid JSON is what reaches the deep checks."""
    doc = json.loads(json.dumps(document))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        if not path:
            doc = draw(_json_values)
            continue
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(_json_values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(_keys)] = draw(_json_values)
        else:
            parent.append(draw(_json_values))
        if not isinstance(doc, dict):
            break
    data = json.dumps(doc, ensure_ascii=draw(st.booleans())).encode()
    if draw(st.integers(0, 4)) == 0 and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + draw(st.binary(max_size=3)) + data[at + 1 :]
    return data


_raw_json = st.one_of(
    st.binary(max_size=200),
    st.text(alphabet='{}[]",:0123456789.eE-+ tfnrualsx\\', max_size=200).map(str.encode),
)
_hostile_json = st.sampled_from(
    [
        b'{"schemaVersion":2,"schemaVersion":2}',  # duplicate keys
        b'{"schemaVersion":NaN}',
        b'{"schemaVersion":Infinity}',
        b'{"schemaVersion":' + b"9" * 5000 + b"}",  # past the int-digit limit
        b"[" * 100_000 + b"]" * 100_000,  # past the recursion limit
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b'{"schemaVersion":2,"layers":' + b"[" * 900 + b"]" * 900 + b"}",  # deep, then repr'd
        b"\xef\xbb\xbf{}",  # a BOM
        b'"\\ud800"',  # a lone surrogate
        b'{"schemaVersion":2,"manifests":[{"mediaType":"x","digest":"sha256:'
        + b"a" * 64
        + b'","size":-1}]}',
        b'{"schemaVersion":true,"config":{},"layers":[]}',
    ]
)


def _parsers() -> list[tuple[str, Any]]:
    return [
        ("manifest", lambda data: parse_manifest(data, None, digest=SHA)),
        ("manifest as served", lambda data: parse_manifest(data, OCI_MANIFEST)),
        ("index", lambda data: parse_index(data, None, digest=SHA)),
        ("config", lambda data: parse_config(data, SHA)),
        ("json", lambda data: parse_json(data, "fuzz")),
    ]


def check_all_parsers(data: bytes) -> None:
    """Every parser on `data`: a well-formed result, or ManifestError with a bounded message."""
    for name, parse in _parsers():
        try:
            result = parse(data)
        except ManifestError as e:
            assert isinstance(e, ImageLedgerError)
            assert len(str(e)) < 20 * len(data) + 2000, name
            continue
        _check_result(name, result)


def _check_result(name: str, result: Any) -> None:
    if name.startswith("manifest"):
        assert result.media_type in MANIFEST_TYPES
        for descriptor in (result.config, *result.layers):
            assert validate_digest(descriptor.digest) == descriptor.digest
            assert type(descriptor.size) is int and descriptor.size >= 0
            assert type(descriptor.media_type) is str
    elif name == "index":
        for entry in result:
            assert validate_digest(entry.digest) == entry.digest
            assert type(entry.size) is int and entry.size >= 0
            assert all(type(k) is str and type(v) is str for k, v in entry.annotations)
            if entry.platform is not None:
                assert type(entry.platform.os) is str and type(entry.platform.architecture) is str
    elif name == "config":
        config, platform, diff_ids = result
        assert all(type(v) is str for v in config.env)
        assert all(type(k) is str and type(v) is str for k, v in config.labels)
        assert type(platform.os) is str and type(platform.architecture) is str
        assert all(validate_digest(d) == d for d in diff_ids if d is not None)


@FUZZ
@given(st.one_of(mutated(MANIFEST), mutated(INDEX), mutated(CONFIG)))
def test_mutated_documents_parse_or_raise_manifest_error(data: bytes) -> None:
    check_all_parsers(data)


@FUZZ
@given(_raw_json | _hostile_json)
def test_raw_bytes_parse_or_raise_manifest_error(data: bytes) -> None:
    check_all_parsers(data)


def test_the_valid_documents_parse() -> None:
    # The mutations above start from documents each parser accepts.
    assert len(parse_manifest(json.dumps(MANIFEST).encode(), None).layers) == 2
    assert len(parse_index(json.dumps(INDEX).encode(), None)) == 1
    assert parse_config(json.dumps(CONFIG).encode(), SHA)[2] == (SHA, SHA2)


@pytest.mark.parametrize(
    "data",
    [
        b"{" + b" " * MAX_MANIFEST_SIZE + b"}",
        bytearray(b"{}"),
        memoryview(b"[]"),
    ],
)
def test_sizes_and_buffer_types(data: Any) -> None:
    check_all_parsers(data)


@pytest.mark.parametrize("data", [None, "{}", 5, ["{}"]])
def test_what_is_not_bytes_is_a_manifest_error(data: Any) -> None:
    for _, parse in _parsers():
        with pytest.raises(ManifestError):
            parse(data)
