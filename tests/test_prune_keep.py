"""`prune(keep=...)` patterns are read the way people write references (issue 8).

A keep rule that silently protects nothing is a data-loss trap: before this, ``alpha``,
``alpha:*`` and ``example.com/gamma`` protected nothing and only the full canonical spelling
worked. These tests pin the normalization (property tests over random references and their
spellings, both ways: a spelling protects its reference, and a plain name protects no other
repository), then prune real images loaded into a real home and check, file by file, that what
a pattern names is still there; a bare string for `keep`, bad patterns and out-of-range
durations are refused or handled before anything is recorded.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from imageledger import ImageCache
from imageledger.domain.policies import KeepPattern, keep_patterns, unmatched_keep
from imageledger.domain.reference import Reference, parse_reference
from imageledger.tools.imagebuild import BuiltImage, ImageSpec, build_docker_archive, build_image

# ---------------------------------------------------------------------------- properties

_component = st.from_regex(r"[a-z0-9]{1,6}(?:[._-][a-z0-9]{1,4})?", fullmatch=True)
_tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,10}", fullmatch=True)
_digest = st.from_regex(r"[a-f0-9]{64}", fullmatch=True).map(lambda h: f"sha256:{h}")
_registry = st.sampled_from(
    ["docker.io", "ghcr.io", "example.com", "localhost:5000", "reg.example.com:443", "[::1]:5000"]
)


@st.composite
def references(draw: st.DrawFn) -> Reference:
    registry = draw(_registry)
    path = draw(st.lists(_component, min_size=1, max_size=3))
    if registry == "docker.io" and len(path) == 1:
        path = ["library", *path]
    repository = "/".join(path)
    if draw(st.booleans()):
        return parse_reference(f"{registry}/{repository}@{draw(_digest)}")
    return parse_reference(f"{registry}/{repository}:{draw(_tag)}")


def _names(ref: Reference, draw: Callable[[st.SearchStrategy[str]], str]) -> str:
    """One spelling of `ref`'s ``registry/repository``."""
    registry, repository = ref.registry, ref.repository
    spellings = [f"{registry}/{repository}", f"{registry.upper()}/{repository}"]
    if registry == "docker.io":
        spellings += [f"index.docker.io/{repository}", f"DOCKER.IO/{repository}"]
        first = repository.split("/")[0]
        if "." not in first and first != "localhost":  # else it would read as a registry
            spellings.append(repository)
        if repository.startswith("library/"):
            short = repository.removeprefix("library/")
            spellings += [short, f"docker.io/{short}", f"index.docker.io/{short}"]
    return draw(st.sampled_from(spellings))


@st.composite
def spellings(draw: st.DrawFn, ref: Reference) -> str:
    """A keep pattern someone could write for `ref`: any spelling of its name, with its tag
    or digest, a wildcard for it, or nothing (every tag and digest)."""
    name = _names(ref, draw)
    if ref.digest is not None:
        suffixes = ["", f"@{ref.digest}", f"@{ref.digest[:20]}*", f":sometag@{ref.digest}"]
    else:
        assert ref.tag is not None
        suffixes = ["", f":{ref.tag}", ":*", f":{ref.tag[0]}*", f":{ref.tag[:-1]}?"]
        if len(ref.tag) == 1:
            suffixes.remove(f":{ref.tag[:-1]}?")
    return name + draw(st.sampled_from(suffixes))


@st.composite
def reference_and_spelling(draw: st.DrawFn) -> tuple[Reference, str]:
    ref = draw(references())
    return ref, draw(spellings(ref))


@given(reference_and_spelling())
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_any_spelling_of_a_reference_protects_it(case: tuple[Reference, str]) -> None:
    ref, pattern = case
    assert KeepPattern.parse(pattern).matches(ref), (pattern, str(ref))
    assert unmatched_keep([pattern], [str(ref)]) == ()


@given(references(), references(), st.data())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_a_name_without_wildcards_protects_no_other_repository(
    ref: Reference, other: Reference, data: st.DataObject
) -> None:
    pattern = _names(ref, data.draw)
    assert KeepPattern.parse(pattern).matches(ref)
    assert KeepPattern.parse(pattern).matches(other) == (other.name == ref.name)
    if other.name != ref.name:
        assert unmatched_keep([pattern], [str(other)]) == (pattern,)


@given(references())
def test_a_tag_pattern_keeps_only_that_tag(ref: Reference) -> None:
    tagged = Reference(ref.registry, ref.repository, "t1", None)
    assert KeepPattern.parse(f"{ref.name}:t1").matches(tagged)
    assert not KeepPattern.parse(f"{ref.name}:t2").matches(tagged)
    pinned = Reference(ref.registry, ref.repository, None, "sha256:" + "a" * 64)
    assert not KeepPattern.parse(f"{ref.name}:*").matches(pinned)  # a tag pattern: tags only
    assert KeepPattern.parse(ref.name).matches(pinned)


WRITTEN = [
    # (pattern, reference, protected)
    ("alpha", "docker.io/library/alpha:latest", True),
    ("alpha", "docker.io/library/alpha:3", True),
    ("alpha", f"docker.io/library/alpha@sha256:{'b' * 64}", True),
    ("alpha:*", "docker.io/library/alpha:3", True),
    ("alpha:3", "docker.io/library/alpha:latest", False),
    ("alpha:3.*", "docker.io/library/alpha:3.19", True),
    ("alpha", "docker.io/library/alphabet:1", False),
    ("alpha", "docker.io/acme/alpha:1", False),
    ("alpha", "ghcr.io/alpha:1", False),
    ("alpha*", "docker.io/library/alphabet:1", True),
    ("example.com/gamma", "example.com/gamma:2", True),
    ("Example.COM/gamma", "example.com/gamma:2", True),
    ("example.com/gamma", "docker.io/library/gamma:2", False),
    ("acme/*", "docker.io/acme/beta:1", True),
    ("acme/*", "ghcr.io/acme/beta:1", False),
    ("*/beta", "ghcr.io/acme/beta:1", True),  # as written: any registry
    ("*", "ghcr.io/acme/beta:1", True),  # everything, as before normalization
    ("*:latest", "ghcr.io/acme/beta:latest", True),
    ("*:latest", "ghcr.io/acme/beta:1", False),
    ("docker.io/acme/*", "docker.io/acme/beta:1", True),  # the canonical spelling still works
    ("index.docker.io/alpha", "docker.io/library/alpha:9", True),
    ("localhost:5000/app", "localhost:5000/app:1", True),
    ("[::1]:5000/app", "[::1]:5000/app:1", True),  # no character class: matched exactly
    ("alp[h]a", "docker.io/library/alpha:1", True),
]


@pytest.mark.parametrize(("pattern", "reference", "protected"), WRITTEN)
def test_patterns_as_people_write_them(pattern: str, reference: str, protected: bool) -> None:
    assert KeepPattern.parse(pattern).matches(parse_reference(reference)) is protected


@pytest.mark.parametrize(
    ("keep", "error", "says"),
    [
        ("alpha", TypeError, "keep=['alpha']"),
        (b"alpha", TypeError, "not a single bytes"),
        (7, TypeError, "got int"),
        ([7], TypeError, "a keep pattern is a string"),
        ([""], ValueError, "empty"),
        ([" alpha"], ValueError, "whitespace"),
        (["alpha\x1b[31m"], ValueError, "control characters"),
        (["Alpha"], ValueError, "upper-case repository"),
        (["x" * 100_000], None, ""),  # long but valid: accepted
    ],
)
def test_bad_keep_arguments_are_refused(
    keep: object, error: type[Exception] | None, says: str
) -> None:
    if error is None:
        keep_patterns(keep)
        return
    with pytest.raises(error) as raised:
        keep_patterns(keep)
    assert says in str(raised.value)
    assert len(str(raised.value)) < 600


# ---------------------------------------------------------------------------- a real home

BASE = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
_count = itertools.count()


def _image(*names: str) -> BuiltImage:
    unique = f"{names}-{next(_count)}".encode()
    return build_image(ImageSpec(layers=({"data": unique * 50},), names=names))


@pytest.fixture
def loaded(tmp_path: Path) -> tuple[ImageCache, dict[str, BuiltImage]]:
    """A real home holding alpha:latest, alpha:3, alphabet:1, acme/beta:1, example.com/gamma:2
    and delta:1, each its own image (its own blobs on disk)."""
    images = {
        name: _image(name)
        for name in ("alpha:latest", "alpha:3", "alphabet:1", "acme/beta:1", "example.com/gamma:2")
    }
    images["delta:1"] = _image("delta:1")
    archive = build_docker_archive(tmp_path / "images.tar", list(images.values())).path
    now = [BASE]
    cache = ImageCache(tmp_path / "home", clock=lambda: now[0])
    cache.load(archive)
    return cache, images


def _blob_files(cache: ImageCache, image: BuiltImage) -> list[Path]:
    digests = [image.manifest_digest, image.config_digest, *(lyr.digest for lyr in image.layers)]
    return [cache.home / "blobs" / "sha256" / d.removeprefix("sha256:") for d in digests]


def _references(cache: ImageCache) -> set[str]:
    return {h.reference for h in cache.list()}


def test_keep_alpha_really_keeps_every_alpha_tag(
    loaded: tuple[ImageCache, dict[str, BuiltImage]],
) -> None:
    cache, images = loaded
    with cache:
        dry = cache.prune(dry_run=True, keep=["alpha"])
        assert {r.reference for r in dry.references} == {
            "docker.io/library/alphabet:1",
            "docker.io/acme/beta:1",
            "example.com/gamma:2",
            "docker.io/library/delta:1",
        }
        report = cache.prune(keep=["alpha", "example.com/gamma", "acme/beta:*"])
        assert report.unmatched_keep == ()
        assert _references(cache) == {
            "docker.io/library/alpha:latest",
            "docker.io/library/alpha:3",
            "docker.io/acme/beta:1",
            "example.com/gamma:2",
        }
        for name in ("alpha:latest", "alpha:3", "acme/beta:1", "example.com/gamma:2"):
            assert all(path.is_file() for path in _blob_files(cache, images[name])), name
        for name in ("alphabet:1", "delta:1"):
            assert not any(path.exists() for path in _blob_files(cache, images[name])), name
        # The event records the patterns as written.
        pruned = [e for e in cache.history() if e.event == "ImagesPruned"]
        assert len(pruned) == 1


def test_unmatched_patterns_are_reported_and_logged(
    loaded: tuple[ImageCache, dict[str, BuiltImage]],
) -> None:
    cache, _ = loaded
    with cache, capture_logs() as logs:
        report = cache.prune(dry_run=True, keep=["alpah", "alpha:3", "ghcr.io/*", "delta"])
    assert report.unmatched_keep == ("alpah", "ghcr.io/*")
    warned = [e["pattern"] for e in logs if e["event"] == "prune.keep_unmatched"]
    assert warned == ["alpah", "ghcr.io/*"]
    assert {e["log_level"] for e in logs if e["event"] == "prune.keep_unmatched"} == {"warning"}


def test_a_bare_string_is_refused_before_anything_is_recorded(
    loaded: tuple[ImageCache, dict[str, BuiltImage]],
) -> None:
    cache, _ = loaded
    with cache:
        before = len(cache.history())
        with pytest.raises(TypeError, match="list of patterns"):
            cache.prune(keep="alpha")  # a str is a Sequence[str] to the type checker
        with pytest.raises(ValueError, match="upper-case"):
            cache.prune(keep=["Alpha"])
        assert len(cache.history()) == before
        assert len(_references(cache)) == 6


def test_durations_and_budgets_past_any_clock_do_not_overflow(
    loaded: tuple[ImageCache, dict[str, BuiltImage]],
) -> None:
    cache, _ = loaded
    with cache:
        for huge in (800_000 * 86_400, 10**30, 1e300):
            report = cache.prune(unused_for=huge)
            assert report.image_refs_removed == 0  # nothing was unused that long
        assert cache.prune(max_bytes=10**40).image_refs_removed == 0  # everything fits
        for bad in (float("inf"), float("nan")):
            with pytest.raises(ValueError, match="finite"):
                cache.prune(unused_for=bad)
        assert len(_references(cache)) == 6
        assert cache.rebuild(verify=True).identical
        assert cache.prune(unused_for=timedelta(days=1).total_seconds()).image_refs_removed == 0
