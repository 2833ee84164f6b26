"""Image filters with Docker's names and meanings (`docker images --filter`), for `list()` and
`imageledger images --filter`.

- ``reference=PATTERN``: the pattern is matched as Docker matches it (`reference.FamiliarMatch`:
  Go's `path.Match`, where ``*`` and ``?`` never match ``/``) against the image's familiar
  name with its tag or digest (``alpine:3.19``, ``acme/app:1``) and without it (``alpine``).
  Docker stops there; since imageledger shows canonical names (``docker.io/library/alpine:
  3.19``), the canonical spelling with and without its tag or digest matches too. Several
  patterns: an image matching any one is listed (Docker ORs them).
- ``dangling=true|false``: Docker's dangling images are those without a tag (``<none>``).
  Here every cached image has a name, so a dangling one is one named only by digest
  (``repo@sha256:...``): a name no tag points at. ``false`` lists the tagged ones.
- ``before=REF`` / ``since=REF``: images created before (older than) or since (newer than)
  the cached image REF, in the order `list()` gives (created_at, then ledger position: two
  images made by one load are still ordered). Several values narrow together, as Docker
  resolves them (before the oldest, since the newest). A REF that is not cached is
  `ImageNotFoundError`, as Docker's "No such image".
- ``label=KEY`` / ``label=KEY=VALUE``: the image config's labels. Several: an image must have
  every one (Docker's `MatchKVList` ANDs labels).

Different filters AND. Everything here is pure: the service gives it the handles in list
order and a lookup of their labels.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, TypedDict, TypeVar

from imageledger.domain.errors import InvalidFilterError
from imageledger.domain.model import CachedImage
from imageledger.domain.reference import canonical, familiar_name

C = TypeVar("C", bound=CachedImage)


class ListFilters(TypedDict, total=False):
    """`list()`'s filter keywords (``**filters: Unpack[ListFilters]``), as `image_filter`
    takes them."""

    reference: str | Sequence[str] | None
    dangling: bool | None
    before: str | Sequence[str] | None
    since: str | Sequence[str] | None
    label: str | Sequence[str] | None


@dataclass(frozen=True)
class ImageFilter:
    """A parsed, checked filter (see the module docstring); empty lets everything through."""

    references: tuple[str, ...] = ()
    dangling: bool | None = None
    before: tuple[str, ...] = ()
    since: tuple[str, ...] = ()
    labels: tuple[tuple[str, str | None], ...] = ()

    @property
    def empty(self) -> bool:
        return self == _NOTHING

    def apply(
        self, handles: Sequence[C], labels: Callable[[C], Iterable[tuple[str, str]]]
    ) -> list[C]:
        """The `handles` (newest first, as `list()` gives them) that pass. `labels` gives an
        image's config labels (asked only when a label filter is set). A `before` or `since`
        reference not among the handles is `ImageNotFoundError`."""
        from imageledger.domain.errors import ImageNotFoundError

        order = {h.reference: i for i, h in enumerate(handles)}
        lowest, highest = -1, len(handles)
        for reference in self.before:  # older than: after it in newest-first order
            if reference not in order:
                raise ImageNotFoundError(reference)
            lowest = max(lowest, order[reference])
        for reference in self.since:  # newer than: before it
            if reference not in order:
                raise ImageNotFoundError(reference)
            highest = min(highest, order[reference])
        matchers = [_go_pattern(p) for p in self.references]
        kept = []
        for i, handle in enumerate(handles):
            if not lowest < i < highest:
                continue
            if self.dangling is not None and is_dangling(handle.reference) != self.dangling:
                continue
            if matchers and not any(reference_matches(m, handle.reference) for m in matchers):
                continue
            if self.labels and not _has_labels(dict(labels(handle)), self.labels):
                continue
            kept.append(handle)
        return kept


_NOTHING: Final = ImageFilter()


def image_filter(
    reference: str | Sequence[str] | None = None,
    dangling: bool | None = None,
    before: str | Sequence[str] | None = None,
    since: str | Sequence[str] | None = None,
    label: str | Sequence[str] | None = None,
) -> ImageFilter:
    """`list()`'s keywords as a checked `ImageFilter`: each of `reference`, `before`,
    `since` and `label` one value or several; a pattern that is not one, a label without a
    key or a `dangling` that is not a bool is `InvalidFilterError`, a malformed `before` or
    `since` reference `InvalidReferenceError`."""
    patterns = _values("reference", reference)
    for pattern in patterns:
        _go_pattern(pattern)
    if dangling is not None and not isinstance(dangling, bool):
        msg = f"dangling must be true or false, not {dangling!r}"
        raise InvalidFilterError(msg)
    labels: list[tuple[str, str | None]] = []
    for text in _values("label", label):
        key, equals, value = text.partition("=")
        if not key:
            msg = f"invalid label filter {text[:200]!r}: give KEY or KEY=VALUE"
            raise InvalidFilterError(msg)
        labels.append((key, value if equals else None))
    return ImageFilter(
        references=patterns,
        dangling=dangling,
        before=tuple(canonical(r) for r in _values("before", before)),
        since=tuple(canonical(r) for r in _values("since", since)),
        labels=tuple(labels),
    )


def _values(name: str, given: str | Sequence[str] | None) -> tuple[str, ...]:
    if given is None:
        return ()
    values = (given,) if isinstance(given, str) else tuple(given)
    for value in values:
        if not isinstance(value, str):
            msg = f"{name} filter values are strings, not {type(value).__name__}"
            raise InvalidFilterError(msg)
    return values


def is_dangling(reference: str) -> bool:
    """Whether a canonical reference is dangling here: named by digest only, no tag."""
    return "@" in reference


def familiar(reference: str) -> tuple[str, str]:
    """A canonical reference as Docker shows it (``docker.io/library/alpine:3`` ->
    ``alpine:3``) and its familiar name without tag or digest (``alpine``)."""
    name, separator, rest = _split(reference)
    short = familiar_name(name)
    return short + separator + rest, short


def _split(reference: str) -> tuple[str, str, str]:
    """A canonical reference as its name, ``@`` or ``:``, and its digest or tag."""
    name, separator, rest = reference.partition("@")
    if not separator:
        colon = reference.rfind(":")
        if colon > reference.rfind("/"):
            name, separator, rest = reference[:colon], ":", reference[colon + 1 :]
    return name, separator, rest


def reference_matches(pattern: re.Pattern[str], reference: str) -> bool:
    """Docker's FamiliarMatch (familiar string, then familiar name), then the canonical
    spelling with and without its tag or digest."""
    shown, short = familiar(reference)
    name = _split(reference)[0]
    return any(pattern.fullmatch(text) is not None for text in (shown, short, reference, name))


def _has_labels(present: dict[str, str], wanted: tuple[tuple[str, str | None], ...]) -> bool:
    return all(key in present and (value is None or present[key] == value) for key, value in wanted)


_PATTERNS: dict[str, re.Pattern[str]] = {}


def _go_pattern(pattern: str) -> re.Pattern[str]:
    """Go's `path.Match` pattern as a regular expression: ``*`` any run of characters but
    ``/``, ``?`` one character but ``/``, ``[...]`` a class (``[^...]`` negated, ``a-z``
    ranges, ``\\`` escapes), ``\\x`` the character x. A malformed pattern (an unclosed or
    empty class, a trailing backslash) is `InvalidFilterError`, as Go's ErrBadPattern."""
    compiled = _PATTERNS.get(pattern)
    if compiled is not None:
        return compiled
    bad = InvalidFilterError(f"invalid reference pattern {pattern[:200]!r}")
    out: list[str] = []
    i, n = 0, len(pattern)

    def char(j: int) -> tuple[str, int]:
        """One character of a class at `j` (escapes resolved), and where the next starts."""
        if j >= n or pattern[j] in "-]":
            raise bad
        if pattern[j] == "\\":
            if j + 1 >= n:
                raise bad
            return pattern[j + 1], j + 2
        return pattern[j], j + 1

    while i < n:
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "\\":
            if i + 1 >= n:
                raise bad
            out.append(re.escape(pattern[i + 1]))
            i += 2
        elif c == "[":
            i += 1
            negated = i < n and pattern[i] == "^"
            if negated:
                i += 1
            ranges: list[str] = []
            while True:
                if i >= n:
                    raise bad
                if pattern[i] == "]" and ranges:
                    i += 1
                    break
                low, i = char(i)
                high = low
                if i < n and pattern[i] == "-":
                    high, i = char(i + 1)
                    if high < low:
                        raise bad
                ranges.append(f"{re.escape(low)}-{re.escape(high)}")
            out.append("[" + ("^" if negated else "") + "".join(ranges) + "]")
        else:
            out.append(re.escape(c))
            i += 1
    compiled = re.compile("".join(out), re.DOTALL)
    if len(_PATTERNS) < 1024:
        _PATTERNS[pattern] = compiled
    return compiled
