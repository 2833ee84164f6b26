"""Which image (or index entry) to take for a platform: the one matcher, its rules written once.

Two callers choose among images of several platforms, and they do not want the same answer
(each difference is pinned by tests): a pull chooses among a registry index's entries the way
a container runtime would run them, and a load chooses which of an archive's images gets a
name. So the rules are written once, here, and each caller names its `PlatformRules`:

1. Only candidates of the wanted os and architecture are considered (rule 4 aside).
2. The first whose variant equals the wanted one wins. Under `PlatformRules.arm64_is_v8`,
   arm64 without a variant counts as arm64/v8 on both sides (what arm64 images mean by it).
3. When no variant is wanted, the first candidate wins.
4. When a variant is wanted and no candidate has it:

   - under `PlatformRules.older_variants`, the first candidate without a variant wins; else
     the highest ``vN`` variant not above the one wanted (an arm/v6 image runs on arm/v7;
     the first listed of equal ones); else none;
   - under `PlatformRules.any_variant`, the first candidate wins;
   - else none: a variant asked for is not answered with another.

5. With no candidate at all: under `PlatformRules.any_platform` the first item of all wins
   (an archive's own order), else none.

`PULL` (a registry index) uses 2 with arm64_is_v8 and 4 with older variants, never 5: a pull
must not bring an image the host cannot run. `LOAD_ASKED` (a load whose platform was asked
for) takes an exact variant or none. `LOAD_DEFAULTED` (a load whose platform is only the
host's, by default) takes any variant of the architecture, else the archive's first image:
an archive of a single foreign image still loads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from imageledger.domain.model import LoadedImage, Platform

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PlatformRules:
    """Which of the module's optional rules apply (see the module docstring)."""

    arm64_is_v8: bool = False
    older_variants: bool = False
    any_variant: bool = False
    any_platform: bool = False


PULL: Final = PlatformRules(arm64_is_v8=True, older_variants=True)
LOAD_ASKED: Final = PlatformRules()
LOAD_DEFAULTED: Final = PlatformRules(any_variant=True, any_platform=True)


def _variant(platform: Platform, rules: PlatformRules) -> str | None:
    if rules.arm64_is_v8 and platform.architecture == "arm64" and platform.variant in (None, "v8"):
        return "v8"
    return platform.variant


def _variant_number(variant: str | None) -> int | None:
    if variant and variant[0] == "v" and variant[1:].isdigit():
        return int(variant[1:])
    return None


def match_platform(  # noqa: PLR0911
    items: Sequence[T],
    wanted: Platform,
    platform_of: Callable[[T], Platform | None],
    rules: PlatformRules,
) -> T | None:
    """The item of `items` for `wanted` under `rules` (see the module docstring), or None.
    `platform_of` gives an item's platform, None for one that is never a candidate (an
    attestation, an entry without a platform)."""
    candidates: list[tuple[T, Platform]] = []
    for item in items:
        platform = platform_of(item)
        if platform is not None and (platform.os, platform.architecture) == (
            wanted.os,
            wanted.architecture,
        ):
            candidates.append((item, platform))
    variant = _variant(wanted, rules)
    for item, platform in candidates:
        if _variant(platform, rules) == variant:
            return item
    if not candidates:
        return items[0] if rules.any_platform and items else None
    if wanted.variant is None or rules.any_variant:
        return candidates[0][0]
    if not rules.older_variants:
        return None
    for item, platform in candidates:
        if platform.variant is None:
            return item
    number = _variant_number(variant)
    if number is None:
        return None
    compatible = [
        (n, i)
        for i, (_, platform) in enumerate(candidates)
        if (n := _variant_number(platform.variant)) is not None and n <= number
    ]
    if not compatible:
        return None
    return candidates[max(compatible, key=lambda pair: (pair[0], -pair[1]))[1]][0]


def _image_platform(image: LoadedImage) -> Platform:
    return image.content.platform


def choose_platform(
    images: Sequence[LoadedImage], wanted: Platform, *, strict: bool = False
) -> LoadedImage | None:
    """The image of an archive that gets a name shared by several platforms: under
    `LOAD_ASKED` when `strict` (the platform was asked for: another platform is never an
    answer), else under `LOAD_DEFAULTED` (it was only defaulted to the host's)."""
    rules = LOAD_ASKED if strict else LOAD_DEFAULTED
    return match_platform(images, wanted, _image_platform, rules)


__all__ = [
    "LOAD_ASKED",
    "LOAD_DEFAULTED",
    "PULL",
    "PlatformRules",
    "choose_platform",
    "match_platform",
]
