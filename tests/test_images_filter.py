"""`imageledger images --filter` and `list()`'s filters (issue 14): Docker's names and meanings
(`reference`, `dangling`, `before`, `since`, `label`; see `domain.filters`), checked against a
model written separately from the code: random caches (loads under several names, digest-only
names, tags, removes) and random filters, every answer compared with the model's over the
unfiltered list. Then the command line's spelling, `--quiet`, and its refusals (exit 2, one
line) and the past (`--at`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imageledger import (
    Image,
    ImageCache,
    ImageHandle,
    ImageNotFoundError,
    InvalidFilterError,
    InvalidReferenceError,
)
from imageledger.domain.filters import familiar, image_filter
from imageledger.tools.imagebuild import ImageSpec, build_docker_archive

if TYPE_CHECKING:
    from tests.test_cli import assert_error, cli, ok
else:
    from test_cli import assert_error, cli, ok

# Names the random caches use (tags, with Docker Hub's one- and two-component names and
# another registry), labels, and patterns that exercise Go's path.Match (`*` and `?` never
# cross a '/', classes, escapes) against the familiar and canonical spellings.
NAMES = (
    "app:1",
    "app:2",
    "app:latest",
    "acme/app:1",
    "acme/web:3",
    "example.com/team/app:1",
    "example.com/app:edge",
    "db:1",
)
LABELS: tuple[dict[str, str], ...] = (
    {"tier": "web", "team": "a"},
    {"tier": "db"},
    {},
    {"tier": "web", "team": "b"},
)
PATTERNS = (
    "app",
    "app:1",
    "app:*",
    "ap?",
    "a*",
    "*",
    "*/*",
    "*/app",
    "acme/*",
    "acme/*:1",
    "[ab]*",
    "[^a]*",
    "*:[12]",
    "example.com/*/*",
    "example.com/team/app",
    "docker.io/library/app",
    "docker.io/library/app:1",
    "docker.io/*/*",
    "app\\:1",
    "*@sha256:*",
    "nothing",
)
LABEL_FILTERS = ("tier", "tier=web", "tier=db", "team", "team=a", "tier=web", "nope", "tier=")


# ------------------------------------------------------------------------- the model


def go_match(pattern: str, text: str) -> bool:  # noqa: PLR0911
    """Go's path.Match, written from its documentation (not from domain.filters): `*` any run
    of non-'/' characters, `?` one non-'/' character, `[...]` a class (`^` negates, `a-z`),
    `\\` escapes; the whole text must match."""
    if not pattern:
        return not text
    head = pattern[0]
    if head == "*":
        return any(
            go_match(pattern[1:], text[i:]) for i in range(len(text) + 1) if "/" not in text[:i]
        )
    if not text:
        return False
    if head == "?":
        return text[0] != "/" and go_match(pattern[1:], text[1:])
    if head == "[":
        end = pattern.index("]", 2)
        body = pattern[1:end]
        negated = body.startswith("^")
        members = body[1:] if negated else body
        hit = False
        i = 0
        while i < len(members):
            low = members[i]
            if i + 2 < len(members) and members[i + 1] == "-":
                hit |= low <= text[0] <= members[i + 2]
                i += 3
            else:
                hit |= low == text[0]
                i += 1
        return hit != negated and go_match(pattern[end + 1 :], text[1:])
    if head == "\\":
        return text[0] == pattern[1] and go_match(pattern[2:], text[1:])
    return text[0] == head and go_match(pattern[1:], text[1:])


def spellings(reference: str) -> list[str]:
    """What a reference pattern is matched against: Docker's familiar string and name, then
    the canonical reference and its name (the model's own split of the canonical form)."""
    if "@" in reference:
        name = reference.split("@", maxsplit=1)[0]
        suffix = reference[len(name) :]
    else:
        slash = reference.rfind("/")
        colon = reference.rfind(":")
        name, suffix = (reference[:colon], reference[colon:]) if colon > slash else (reference, "")
    short = name
    if short.startswith("docker.io/"):
        short = short[len("docker.io/") :]
        if short.startswith("library/") and short.count("/") == 1:
            short = short[len("library/") :]
    return [short + suffix, short, reference, name]


def model(
    handles: list[ImageHandle], labels: dict[str, dict[str, str]], filters: dict[str, Any]
) -> list[str]:
    """The references `list(**filters)` must answer, from the unfiltered list (newest
    first) and each image's labels."""
    order = [h.reference for h in handles]
    kept = []
    for i, h in enumerate(handles):
        ok_ = True
        if filters.get("reference"):
            ok_ &= any(go_match(p, s) for p in filters["reference"] for s in spellings(h.reference))
        if filters.get("dangling") is not None:
            ok_ &= ("@" in h.reference) == filters["dangling"]
        for ref in filters.get("before") or ():
            ok_ &= i > order.index(ref)
        for ref in filters.get("since") or ():
            ok_ &= i < order.index(ref)
        for text in filters.get("label") or ():
            key, equals, value = text.partition("=")
            have = labels[h.manifest_digest]
            ok_ &= key in have and (not equals or have[key] == value)
        if ok_:
            kept.append(h.reference)
    return kept


# ------------------------------------------------------------------------- random caches


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, dict[str, str]]]:
    """Four images (different labels), each an archive naming none: names come from `tag`."""
    directory = tmp_path_factory.mktemp("filter-pool")
    found = []
    for i, labels in enumerate(LABELS):
        spec = ImageSpec(layers=({f"opt/{i}": b"x" * (i + 1)},), labels=labels, names=(f"p{i}:1",))
        found.append((build_docker_archive(directory / f"{i}.tar", [spec]).path, labels))
    return found


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


STEPS = st.lists(
    st.tuples(
        st.sampled_from(("load", "tag", "pin", "remove")),
        st.integers(0, 3),
        st.sampled_from(NAMES),
    ),
    min_size=1,
    max_size=14,
)


def filters_from(
    draw: Callable[[st.SearchStrategy[Any]], Any], references: list[str]
) -> dict[str, Any]:
    """Random filters of every kind, `before`/`since` among the cached `references`."""
    filters: dict[str, Any] = {}
    if draw(st.booleans()):
        filters["reference"] = draw(st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=3))
    if draw(st.booleans()):
        filters["dangling"] = draw(st.booleans())
    if references and draw(st.integers(0, 3)) == 0:
        filters["before"] = draw(st.lists(st.sampled_from(references), min_size=1, max_size=2))
    if references and draw(st.integers(0, 3)) == 0:
        filters["since"] = draw(st.lists(st.sampled_from(references), min_size=1, max_size=2))
    if draw(st.booleans()):
        filters["label"] = draw(st.lists(st.sampled_from(LABEL_FILTERS), min_size=1, max_size=2))
    return filters


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=STEPS, data=st.data())
def test_filters_answer_as_the_model_over_random_caches(
    tmp_path_factory: pytest.TempPathFactory,
    pool: list[tuple[Path, dict[str, str]]],
    steps: list[tuple[str, int, str]],
    data: st.DataObject,
) -> None:
    home = tmp_path_factory.mktemp("filters") / "home"
    labels: dict[str, dict[str, str]] = {}
    with ImageCache(home, clock=Clock()) as cache:
        for action, image, name in steps:
            archive, image_labels = pool[image]
            if action == "load":
                handle = cache.load(archive, tag=name)[0]
            elif action == "pin":  # a digest-only name: dangling here
                digest = cache.load(archive, tag=name)[0].manifest_digest
                handle = cache.load(archive, tag=f"{name.rsplit(':', 1)[0]}@{digest}")[0]
            else:
                current = [h.reference for h in cache.list()]
                if not current:
                    continue
                chosen = current[image % len(current)]
                if action == "remove":
                    cache.remove(chosen)
                    continue
                handle = cache.tag(chosen, name)
                image_labels = dict(cache.inspect(chosen).config.labels)
            labels[handle.manifest_digest] = image_labels
        handles = cache.list()
        references = [h.reference for h in handles]
        for _ in range(6):
            filters = filters_from(data.draw, references)
            expected = model(handles, labels, filters)
            answered = cache.list(**filters)
            assert [h.reference for h in answered] == expected, filters
            assert answered == [h for h in handles if h.reference in expected]
            # The past answers alike (here: the last point, through the replay).
            if cache.audit.head():
                past = cache.at(cache.audit.head()).list(**filters)
                assert [h.reference for h in past] == expected


# ------------------------------------------------------------------------- fixed cases


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, pool: list[tuple[Path, dict[str, str]]]) -> Path:
    """Oldest to newest: app:1 (tier=web, team=a), acme/web:3 (tier=db),
    example.com/team/app:1 (no labels) and app:1's image under a digest-only name."""
    where = tmp_path_factory.mktemp("filters-cli") / "home"
    with ImageCache(where, clock=Clock()) as cache:
        cache.load(pool[0][0], tag="app:1")
        cache.load(pool[1][0], tag="acme/web:3")
        cache.load(pool[2][0], tag="example.com/team/app:1")
        digest = cache.get("app:1").manifest_digest
        cache.load(pool[0][0], tag=f"app@{digest}")
    return where


def test_docker_spellings_of_reference_patterns() -> None:
    assert familiar("docker.io/library/alpine:3.19") == ("alpine:3.19", "alpine")
    assert familiar("docker.io/acme/app:1") == ("acme/app:1", "acme/app")
    assert familiar("docker.io/library/a/b:1") == ("library/a/b:1", "library/a/b")
    assert familiar("example.com:5000/app:1") == ("example.com:5000/app:1", "example.com:5000/app")
    digest = "sha256:" + "a" * 64
    assert familiar(f"docker.io/library/app@{digest}") == (f"app@{digest}", "app")


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("app", ["docker.io/library/app@", "docker.io/library/app:1"]),
        ("*", ["docker.io/library/app@", "docker.io/library/app:1"]),  # no '/' in the name
        ("*/*", ["docker.io/acme/web:3"]),
        # The canonical spelling matches too: every docker.io name has two slashes there.
        (
            "*/*/*",
            [
                "docker.io/library/app@",
                "example.com/team/app:1",
                "docker.io/acme/web:3",
                "docker.io/library/app:1",
            ],
        ),
        ("example.com/*/app:1", ["example.com/team/app:1"]),
        (
            "docker.io/*/*",
            ["docker.io/library/app@", "docker.io/acme/web:3", "docker.io/library/app:1"],
        ),
        ("acme/web:[0-9]", ["docker.io/acme/web:3"]),
        ("nothing*", []),
    ],
)
def test_reference_patterns_as_docker_matches_them(
    home: Path, pattern: str, expected: list[str]
) -> None:
    with ImageCache(home, create=False) as cache:
        found = [h.reference for h in cache.list(reference=pattern)]
    assert [r.split("sha256")[0] for r in found] == expected


def test_each_filter_and_how_they_combine(home: Path) -> None:
    with ImageCache(home, create=False) as cache:
        every = [h.reference for h in cache.list()]
        pinned, team, web, app = every
        assert pinned.startswith("docker.io/library/app@sha256:")

        def refs(**filters: Any) -> list[str]:
            return [h.reference for h in cache.list(**filters)]

        assert refs(dangling=True) == [pinned]
        assert refs(dangling=False) == [team, web, app]
        assert refs(before=web) == [app]
        assert refs(since=web) == [pinned, team]
        assert refs(since=app, before=pinned) == [team, web]
        assert refs(before=[pinned, web]) == [app]  # before the oldest of them (docker)
        assert refs(since=[app, web]) == [pinned, team]  # since the newest of them
        assert refs(label="tier") == [pinned, web, app]
        assert refs(label="tier=web") == [pinned, app]
        assert refs(label=["tier=web", "team=a"]) == [pinned, app]  # labels AND
        assert refs(label=["tier=web", "tier=db"]) == []
        assert refs(label="team=b") == []
        assert refs(reference=["acme/*", "example.com/*/*"]) == [team, web]  # patterns OR
        assert refs(reference="app", dangling=False) == [app]  # different filters AND
        assert refs(reference="app", label="tier=db") == []
        assert refs() == every


def test_the_asyncio_api_filters_alike(home: Path) -> None:
    with ImageCache(home, create=False) as cache:
        expected = cache.list(reference="app", dangling=False)

        async def listed() -> list[str]:
            handles = await Image.list(reference="app", dangling=False, cache=cache)
            return [h.reference for h in handles]

        assert asyncio.run(listed()) == [h.reference for h in expected] != []


def test_what_list_refuses(home: Path) -> None:
    with ImageCache(home, create=False) as cache:
        for bad in ("[", "a[", "[]", "[a-]", "x\\"):
            with pytest.raises(InvalidFilterError, match="pattern"):
                cache.list(reference=bad)
        with pytest.raises(InvalidFilterError, match="label"):
            cache.list(label="=web")
        with pytest.raises(InvalidFilterError, match="dangling"):
            cache.list(dangling="yes")  # type: ignore[arg-type]
        with pytest.raises(InvalidFilterError):
            cache.list(reference=[1])  # type: ignore[list-item]
        with pytest.raises(ImageNotFoundError, match=r"docker\.io/library/gone:1"):
            cache.list(before="gone:1")
        with pytest.raises(InvalidReferenceError):
            cache.list(since="Not A Reference")
    assert image_filter().empty and not image_filter(dangling=False).empty


def test_the_command_line_filters(home: Path) -> None:
    every = [o["reference"] for o in ok(home, "images", "--json").json()]
    pinned, team, web, app = every

    def quiet(*filters: str) -> list[str]:
        return ok(home, "images", "--quiet", *filters).stdout.decode().splitlines()

    assert quiet() == every
    assert quiet("--filter", "reference=app") == [pinned, app]
    assert quiet("-f", "reference=acme/*", "-f", "reference=example.com/*/*") == [team, web]
    assert quiet("--filter", "dangling=true") == [pinned]
    assert quiet("--filter", "dangling=0") == [team, web, app]
    assert quiet("--filter", f"before={web}", "--filter", "label=tier=web") == [app]
    assert quiet("--filter", "since=acme/web:3") == [pinned, team]
    assert quiet("--filter", "label=tier=web", "--filter", "label=team=a") == [pinned, app]
    listed = ok(home, "images", "--filter", "reference=acme/*", "--json").json()
    assert [o["reference"] for o in listed] == [web]
    table = ok(home, "images", "--filter", "reference=acme/*").stdout.decode().splitlines()
    assert len(table) == 2 and table[1].startswith(web)
    # The past: before the last load, the digest-only name did not exist.
    assert ok(home, "images", "-q", "-f", "dangling=true", "--at", "4").stdout == b""


@pytest.mark.parametrize(
    ("arguments", "code", "mentions"),
    [
        (("--filter", "color=red"), 2, ("invalid filter 'color'", "reference, dangling")),
        (("--filter", "reference"), 2, ("expected name=value",)),
        (("--filter", "=x"), 2, ("expected name=value",)),
        (("--filter", "dangling=maybe"), 2, ("dangling=true or dangling=false",)),
        (("--filter", "dangling=true", "--filter", "dangling=false"), 2, ("dangling",)),
        (("--filter", "reference=[a-"), 2, ("invalid reference pattern",)),
        (("--filter", "label==x"), 2, ("label",)),
        (("--filter", "before=gone:1"), 3, ("docker.io/library/gone:1",)),
        (("--filter", "since=-bad-"), 2, ()),
    ],
)
def test_a_bad_filter_is_one_line(
    home: Path, arguments: tuple[str, ...], code: int, mentions: tuple[str, ...]
) -> None:
    assert_error(cli(home, "images", *arguments), code, *mentions)
