"""Tables as `docker images` prints them (issue 14): sizes with go-units' HumanSize at 3
significant digits, times as go-units' HumanDuration ages, digests cut to 12 hex digits, and
`--no-trunc` for the exact values; `--json` keeps exact numbers and RFC 3339 times.

The size and duration cases are go-units' own (size_test.go, duration_test.go) at the
precision `docker images` uses. The tables are read from real commands over a home whose
events were stamped by a clock set a known while before now: the ages are then asserted as
words (``3 hours ago``), never as a wall-clock time.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from imageledger import ImageCache
from imageledger.tools import human
from imageledger.tools.imagebuild import ImageSpec, build_docker_archive

if TYPE_CHECKING:
    from tests.test_cli import RFC3339_UTC, ok
else:
    from test_cli import RFC3339_UTC, ok


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        (0, "0B"),
        (1, "1B"),
        (950, "950B"),
        (999, "999B"),
        (1000, "1kB"),
        (1024, "1.02kB"),
        (4200, "4.2kB"),
        (12_345, "12.3kB"),
        (999_499, "999kB"),
        (999_999, "1e+03kB"),  # Go's %.3g, as docker prints it too
        (1_000_000, "1MB"),
        (7_800_000, "7.8MB"),
        (200_000_000, "200MB"),
        (1_500_000_000, "1.5GB"),
        (1_234_567_890_123, "1.23TB"),
        (10**18, "1EB"),
        (10**27, "1e+03YB"),  # past the last unit, it stays there
    ],
)
def test_sizes_as_docker_images_prints_them(size: int, shown: str) -> None:
    assert human.size(size) == shown


def test_go_units_human_size_cases_at_its_own_precision() -> None:
    """go-units' HumanSize (precision 4) examples: the same function at another precision."""
    assert human.size(1000, 4) == "1kB"
    assert human.size(1024, 4) == "1.024kB"
    assert human.size(1_000_000, 4) == "1MB"
    assert human.size(1_048_576, 4) == "1.049MB"
    assert human.size(2 * 1000**2, 4) == "2MB"
    assert human.size(3.42 * 1000**3, 4) == "3.42GB"
    assert human.size(5.372 * 1000**4, 4) == "5.372TB"
    assert human.size(2.22 * 1000**5, 4) == "2.22PB"
    assert human.size(1000**8 * 1000, 4) == "1000YB"


SECOND, MINUTE, HOUR, DAY = 1, 60, 3600, 86400
WEEK, MONTH, YEAR = 7 * DAY, 30 * DAY, 365 * DAY


@pytest.mark.parametrize(
    ("seconds", "words"),
    [  # go-units' duration_test.go, every case
        (0.45, "Less than a second"),
        (1, "1 second"),
        (45, "45 seconds"),
        (46, "46 seconds"),
        (59, "59 seconds"),
        (60, "About a minute"),
        (3 * MINUTE, "3 minutes"),
        (35 * MINUTE, "35 minutes"),
        (35 * MINUTE + 40, "35 minutes"),
        (45 * MINUTE, "45 minutes"),
        (45 * MINUTE + 40, "45 minutes"),
        (46 * MINUTE, "46 minutes"),
        (59 * MINUTE, "59 minutes"),
        (HOUR, "About an hour"),
        (HOUR + 29 * MINUTE, "About an hour"),
        (HOUR + 31 * MINUTE, "2 hours"),
        (HOUR + 59 * MINUTE, "2 hours"),
        (3 * HOUR, "3 hours"),
        (3 * HOUR + 29 * MINUTE, "3 hours"),
        (3 * HOUR + 31 * MINUTE, "4 hours"),
        (3 * HOUR + 59 * MINUTE, "4 hours"),
        (3 * HOUR + 60 * MINUTE, "4 hours"),
        (24 * HOUR, "24 hours"),
        (DAY + 12 * HOUR, "36 hours"),
        (2 * DAY, "2 days"),
        (7 * DAY, "7 days"),
        (13 * DAY + 5 * HOUR, "13 days"),
        (2 * WEEK, "2 weeks"),
        (2 * WEEK + 4 * DAY, "2 weeks"),
        (3 * WEEK, "3 weeks"),
        (4 * WEEK, "4 weeks"),
        (4 * WEEK + 3 * DAY, "4 weeks"),
        (MONTH, "4 weeks"),
        (MONTH + 2 * WEEK, "6 weeks"),
        (2 * MONTH, "2 months"),
        (2 * MONTH + 2 * WEEK, "2 months"),
        (3 * MONTH, "3 months"),
        (3 * MONTH + WEEK, "3 months"),
        (5 * MONTH + 2 * WEEK, "5 months"),
        (13 * MONTH, "13 months"),
        (23 * MONTH, "23 months"),
        (24 * MONTH, "24 months"),
        (24 * MONTH + 2 * WEEK, "2 years"),
        (3 * YEAR + 2 * MONTH, "3 years"),
    ],
)
def test_ages_in_go_units_words(seconds: float, words: str) -> None:
    assert human.duration(seconds) == words


def test_an_age_is_relative_to_the_now_it_is_given() -> None:
    now = datetime(2026, 12, 5, 12, tzinfo=UTC)
    assert human.age(now - timedelta(minutes=2), now) == "2 minutes ago"
    assert human.age(now - timedelta(minutes=70), now) == "About an hour ago"
    assert human.age(now + timedelta(seconds=30), now) == "Less than a second ago"  # skew
    assert human.age(None, now) == ""
    assert human.short_digest("sha256:" + "0123456789ab" + "f" * 52) == "0123456789ab"
    assert human.short_digest("") == ""


# ------------------------------------------------------------------------------ the tables


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One image loaded 3 hours and 10 minutes before now (by the cache's clock), used 5
    minutes after: its row says "3 hours ago" and "3 hours ago" whatever the test's speed."""
    directory = tmp_path_factory.mktemp("human")
    noise = b"".join(hashlib.sha256(b"%d" % i).digest() for i in range(400))  # 12.8 kB
    spec = ImageSpec(layers=({"opt/data": noise},), names=("app:1",))
    archive = build_docker_archive(directory / "app.tar", [spec]).path
    now = [datetime.now(UTC) - timedelta(hours=3, minutes=10)]
    with ImageCache(directory / "home", clock=lambda: now[0]) as cache:
        cache.load(archive)
        now[0] += timedelta(minutes=5)
        cache.use("app:1", "sandbox-1")
    return directory / "home"


def _rows(text: str) -> list[list[str]]:
    """A table's lines split on its two-space column gaps."""
    return [[cell.strip() for cell in line.split("  ") if cell] for line in text.splitlines()]


def test_images_shows_short_digests_human_sizes_and_ages(home: Path) -> None:
    [handle] = ok(home, "images", "--json").json()
    header, row = _rows(ok(home, "images").stdout.decode())
    assert header == ["REFERENCE", "MANIFEST", "PLATFORM", "LAYERS", "SIZE", "CREATED", "LAST USED"]
    assert [cell.strip() for cell in row] == [
        "docker.io/library/app:1",
        handle["manifest_digest"][len("sha256:") :][:12],
        "linux/amd64",
        "1",
        human.size(handle["size_bytes"]),
        "3 hours ago",
        "3 hours ago",
    ]
    assert human.size(handle["size_bytes"]).endswith("kB")  # ~10 kB: not raw bytes

    header, row = _rows(ok(home, "images", "--no-trunc").stdout.decode())
    assert [cell.strip() for cell in row] == [
        "docker.io/library/app:1",
        handle["manifest_digest"],
        "linux/amd64",
        "1",
        str(handle["size_bytes"]),
        handle["created_at"],
        handle["last_used_at"],
    ]
    # --json: exact numbers and RFC 3339, as before.
    assert isinstance(handle["size_bytes"], int) and handle["size_bytes"] > 10_000
    assert RFC3339_UTC.match(handle["created_at"]) and RFC3339_UTC.match(handle["last_used_at"])


def test_history_shows_ages_and_short_digests(home: Path) -> None:
    entries = ok(home, "history", "--json").json()
    lines = ok(home, "history").stdout.decode().splitlines()
    assert lines[0].split() == ["POS", "AT", "EVENT", "REFERENCE", "MANIFEST", "DETAIL", "BY"]
    pulled = next(line for line in lines if "ImagePulled" in line)
    used = next(line for line in lines if "ImageUsed" in line)
    digest = entries[-1]["manifest_digest"]
    assert "3 hours ago" in pulled and "3 hours ago" in used
    assert f" {digest[7:19]} " in used and digest not in used
    exact = ok(home, "history", "--no-trunc").stdout.decode()
    assert digest in exact and entries[-1]["at"] in exact and " ago" not in exact


def test_df_shows_human_sizes(home: Path) -> None:
    usage = ok(home, "df", "--json").json()
    lines = [" ".join(line.split()) for line in ok(home, "df").stdout.decode().splitlines()]
    assert f"total {human.size(usage['total_bytes'])}" in lines
    assert f"reclaimable {human.size(usage['reclaimable_bytes'])}" in lines
    for kind, size in usage["bytes"].items():
        assert f"{kind} {human.size(size)}" in lines
    exact = ok(home, "df", "--no-trunc").stdout.decode().splitlines()
    assert f"total {usage['total_bytes']}" in [" ".join(line.split()) for line in exact]
