"""Semantics 1: any spelling of a reference maps to one canonical form; malformed input raises
a clear error before anything is touched."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imageledger.domain.errors import ImageLedgerError, InvalidReferenceError
from imageledger.domain.reference import Reference, canonical, parse_reference, validate_digest

SHA = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("alpine", "docker.io/library/alpine:latest"),
        ("alpine:3.19", "docker.io/library/alpine:3.19"),
        ("library/alpine", "docker.io/library/alpine:latest"),
        ("docker.io/alpine", "docker.io/library/alpine:latest"),
        ("docker.io/library/alpine:latest", "docker.io/library/alpine:latest"),
        ("index.docker.io/library/alpine", "docker.io/library/alpine:latest"),
        ("INDEX.DOCKER.IO/library/alpine", "docker.io/library/alpine:latest"),
        ("Docker.IO/library/alpine", "docker.io/library/alpine:latest"),
        ("bitnami/redis:7", "docker.io/bitnami/redis:7"),
        ("localhost/foo", "localhost/foo:latest"),
        ("localhost:5000/foo/bar:v1", "localhost:5000/foo/bar:v1"),
        ("127.0.0.1:5000/a_b/c-d/e.f:tag_1.2-x", "127.0.0.1:5000/a_b/c-d/e.f:tag_1.2-x"),
        ("[::1]:5000/img:1", "[::1]:5000/img:1"),
        ("ghcr.io/owner/repo@" + SHA, "ghcr.io/owner/repo@" + SHA),
        ("alpine@" + SHA, "docker.io/library/alpine@" + SHA),
        ("alpine:3.19@" + SHA, "docker.io/library/alpine@" + SHA),
        ("localhost:5000", "docker.io/library/localhost:5000"),
        ("a__b---c/d", "docker.io/a__b---c/d:latest"),
    ],
)
def test_spellings_map_to_the_canonical_form(spelling: str, expected: str) -> None:
    assert canonical(spelling) == expected
    assert canonical(expected) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty"),
        (" alpine", "whitespace"),
        ("alpine ", "whitespace"),
        ("Alpine", "lower case"),
        ("docker.io/Library/alpine", "lower case"),
        ("alpine:", "invalid tag"),
        ("alpine:-x", "invalid tag"),
        ("alpine:" + "x" * 129, "invalid tag"),
        ("alpine@sha256:abc", "invalid digest"),
        ("alpine@sha256:" + "AB" * 32, "invalid digest"),
        ("alpine@md5:" + "ab" * 16, "invalid digest"),
        ("alpine@", "invalid digest"),
        ("a//b", "not valid"),
        ("a/b/", "not valid"),
        ("/a", "not valid"),
        ("a..b/c", "registry"),
        ("-a", "not valid"),
        ("a-", "not valid"),
        ("reg.io:99999/a", "out of range"),
        ("reg-.io/a", "registry"),
        ("reg.io/", "no repository"),
        ("ab" * 32, "image id"),
        ("x.io/" + "a/" * 130 + "a", "longer than"),
        ("../../etc/passwd", "registry"),
        ("etc/../../passwd", "not valid"),
        ("a/../b", "not valid"),
    ],
)
def test_malformed_references_are_refused_clearly(text: str, says: str) -> None:
    with pytest.raises(InvalidReferenceError) as raised:
        parse_reference(text)
    assert says in str(raised.value)
    assert repr(text) in str(raised.value)
    assert isinstance(raised.value, ImageLedgerError)
    assert isinstance(raised.value, ValueError)


def test_reference_fields_and_name() -> None:
    ref = Reference.parse("localhost:5000/team/app:v2")
    assert ref == Reference("localhost:5000", "team/app", "v2", None)
    assert ref.name == "localhost:5000/team/app"
    pinned = Reference.parse("team/app@" + SHA)
    assert (pinned.tag, pinned.digest) == (None, SHA)


def test_validate_digest_accepts_sha512() -> None:
    digest = "sha512:" + "0f" * 64
    assert validate_digest(digest) == digest
    with pytest.raises(InvalidReferenceError):
        validate_digest("sha512:" + "0f" * 32)


_alnum = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=6)
_separator = st.sampled_from([".", "_", "__", "-", "--"])
_component = st.builds(
    lambda first, pairs: first + "".join(s + a for s, a in pairs),
    _alnum,
    st.lists(st.tuples(_separator, _alnum), max_size=2),
)
_host_label = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,4}[a-zA-Z0-9])?", fullmatch=True)
_registry = st.one_of(
    st.none(),
    st.just("docker.io"),
    st.just("index.docker.io"),
    st.just("localhost"),
    st.builds(lambda a, b: f"{a}.{b}", _host_label, _host_label),
    st.builds(lambda h, p: f"{h}:{p}", st.just("localhost"), st.integers(1, 65535)),
)
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
_digest = st.sampled_from(["sha256:" + c * 64 for c in "0123456789abcdef"])


@st.composite
def references(draw: st.DrawFn) -> str:
    registry = draw(_registry)
    path = "/".join(draw(st.lists(_component, min_size=1, max_size=3)))
    text = path if registry is None else f"{registry}/{path}"
    if draw(st.booleans()):
        text += ":" + draw(_tag)
    if draw(st.booleans()):
        text += "@" + draw(_digest)
    return text


@given(references())
def test_canonicalization_is_idempotent(text: str) -> None:
    try:
        once = canonical(text)
    except InvalidReferenceError:
        # Only the documented refusals: a bare 64-hex name, a name past 255 characters, or a
        # first component with a dot before another component, which (as in Docker) names a
        # registry host, and a host cannot hold "_" ("a.b_c/d" is refused, not a repository).
        first, _, rest = text.partition("/")
        host_like = bool(rest) and "." in first and "_" in first
        assert len(text) > 200 or any(len(part) == 64 for part in text.split("/")) or host_like
        return
    assert canonical(once) == once
    assert Reference.parse(once) == Reference.parse(text)


@given(references())
def test_every_spelling_of_one_reference_has_one_canonical_form(text: str) -> None:
    try:
        ref = parse_reference(text)
    except InvalidReferenceError:
        return
    suffix = f"@{ref.digest}" if ref.digest else f":{ref.tag}"
    spellings = {str(ref), f"{ref.registry}/{ref.repository}{suffix}"}
    if ref.registry == "docker.io":
        spellings.add(f"index.docker.io/{ref.repository}{suffix}")
        spellings.add(f"DOCKER.IO/{ref.repository}{suffix}")
        if ref.repository.startswith("library/"):
            spellings.add(ref.repository.removeprefix("library/") + suffix)
    if ref.tag == "latest":
        spellings.add(ref.name)
    if ref.digest:
        spellings.add(f"{ref.name}:sometag{suffix}")
    assert {canonical(s) for s in spellings} == {str(ref)}


@given(st.text(max_size=80))
def test_arbitrary_text_parses_or_raises_the_one_clear_error(text: str) -> None:
    try:
        ref = parse_reference(text)
    except InvalidReferenceError as e:
        assert str(e)
    else:
        assert parse_reference(str(ref)) == ref


@pytest.mark.parametrize(
    ("text", "says"),
    [
        # Once accepted as an IPv6 host, then a traceback from httpx in the middle of a pull.
        ("[...]/a", "not an IPv6 address"),
        ("[:]/a", "not an IPv6 address"),
        ("[1.2.3.4]/a", "not an IPv6 address"),
        ("[::1::2]:5000/a", "not an IPv6 address"),
        ("[fe80::1%eth0]/a", "registry"),
        # Once Python's own "Exceeds the limit (4300 digits)" ValueError.
        ("reg.io:" + "9" * 5000 + "/a", "longer than any valid reference"),
        ("reg.io:" + "9" * 400 + "/a", "out of range"),
        ("reg.io:" + "0" * 400 + "1" * 6 + "/a", "out of range"),
        ("reg.io:0/a", "out of range"),
        ("reg.io:65536/a", "out of range"),
    ],
)
def test_hosts_and_ports_are_refused_clearly(text: str, says: str) -> None:
    with pytest.raises(InvalidReferenceError) as raised:
        parse_reference(text)
    assert says in str(raised.value)
    assert "Exceeds the limit" not in str(raised.value)


@pytest.mark.parametrize(
    "text",
    [
        "[::1]/a",
        "[::ffff:1.2.3.4]:5000/a",
        "[2001:DB8::1]:443/a:1",
        "reg.io:65535/a",
        "reg.io:00080/a",
    ],
)
def test_valid_ipv6_hosts_and_ports_are_accepted(text: str) -> None:
    ref = parse_reference(text)
    assert ref.registry == text.partition("/")[0].lower()
    assert canonical(str(ref)) == str(ref)


def test_validate_digest_refuses_what_is_not_a_string() -> None:
    for value in (None, 5, b"sha256:" + b"ab" * 32, ["sha256:" + "ab" * 32]):
        with pytest.raises(InvalidReferenceError, match="invalid digest"):
            validate_digest(value)  # type: ignore[arg-type]


def test_a_huge_reference_is_refused_at_once_and_quoted_in_part() -> None:
    text = "x.io/" + "a-b_c." * 500_000 + "a"
    with pytest.raises(InvalidReferenceError, match="longer than any valid reference") as raised:
        parse_reference(text)
    assert len(str(raised.value)) < 200
    # The bound admits the longest valid spelling: index.docker.io, a 255-character name, a
    # 128-character tag and a sha512 digest.
    repository = "a/" * 117 + "a" * 11
    longest = f"index.docker.io/{repository}:{'t' * 128}@sha512:{'0f' * 64}"
    assert len(f"docker.io/{repository}") == 255
    assert canonical(longest) == f"docker.io/{repository}@sha512:{'0f' * 64}"
