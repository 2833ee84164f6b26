"""Numbers and times as `docker images` prints them, for the command line's tables.

Sizes are decimal, three significant digits (`docker images` calls go-units'
``HumanSizeWithPrecision(size, 3)``: ``950B``, ``4.2kB``, ``200MB``, ``1.5GB``); ages are
go-units' ``HumanDuration`` plus `` ago`` (``Less than a second ago``, ``About a minute
ago``, ``2 hours ago``); digests are cut to 12 hex digits as Docker cuts image ids. The exact
values stay one flag away (``--no-trunc``) and in ``--json``. Pure functions of their
arguments (the age takes `now`), so tests pin every boundary without a clock.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Final

_UNITS: Final = ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")
_SHORT: Final = 12


def size(count: float, precision: int = 3) -> str:
    """go-units' HumanSizeWithPrecision: divide by 1000 while at least 1000 (up to YB), then
    ``%.<precision>g`` and the unit. Go's and Python's ``%g`` agree, the edge included
    (999,999 bytes is ``1e+03kB`` in both, as `docker images` prints it)."""
    value, unit = float(count), 0
    while value >= 1000.0 and unit < len(_UNITS) - 1:
        value /= 1000.0
        unit += 1
    return f"{value:.{precision}g}{_UNITS[unit]}"


def duration(seconds: float) -> str:  # noqa: PLR0911
    """go-units' HumanDuration of a duration in seconds: whole seconds and minutes are
    truncated, hours rounded half away from zero (``1h29m`` is about an hour, ``1h31m`` two
    hours), then days, weeks (from 14 days), months of 30 days (from 60 days) and years of
    365 days (from 730 days: 24 months)."""
    whole = int(seconds)
    if whole < 1:
        return "Less than a second"
    if whole == 1:
        return "1 second"
    if whole < 60:
        return f"{whole} seconds"
    minutes = int(seconds / 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = math.floor(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{int(seconds / 3600) // 24 // 365} years"


def age(at: datetime | None, now: datetime) -> str:
    """How long before `now` `at` was, as Docker's CREATED column says it (``3 minutes
    ago``); an instant after `now` (another host's clock) is ``Less than a second ago``, as
    in Docker; None (unknown) is empty."""
    if at is None:
        return ""
    return duration((now - at).total_seconds()) + " ago"


def short_digest(digest: str) -> str:
    """``sha256:<hex>`` as Docker shows an id: the first 12 hex digits, no algorithm."""
    return digest.split(":", 1)[-1][:_SHORT]
