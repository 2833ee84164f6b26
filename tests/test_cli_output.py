"""What the command line prints is safe to print (issue 8).

Names, architectures, paths and holders come from archives, registries and users: a hostile
image with an escape sequence and a newline in its architecture, loaded from a file whose name
has them too, must not reach the terminal raw through `images`,
`history`, `load` or `prune` (human output escapes them; JSON keeps the exact
value). Errors are one short line however long the value they quote (`one_line`), and the
numbers of `prune` (`--unused-for`, `--max-bytes`) fail as invalid usage, never as a traceback.
`prune --keep` spelled as people write references keeps what it names, end to end.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

if TYPE_CHECKING:
    from tests.test_cli import Result, assert_error, cli, ok
else:
    from test_cli import Result, assert_error, cli, ok

from imageledger.tools.cli import MESSAGE_LIMIT, one_line, quoted
from imageledger.tools.imagebuild import ImageSpec, build_docker_archive, build_image
from imageledger.tools.logs import printable

HOSTILE_ARCH = "amd64\x1b[31mRED\nforged line\r\x07\u202e"
HOLDER = "sandbox-9"  # holders are refused unless printable (domain/service.py)
# Bytes a terminal acts on: C0 controls but the line feeds that separate output lines, DEL,
# C1 controls (as UTF-8) and the bidi overrides that reorder what is shown.
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f\x80-\x9f\u202a-\u202e\u2066-\u2069]")


# ---------------------------------------------------------------------------- the helpers


def test_printable_escapes_controls_and_keeps_the_rest() -> None:
    assert printable("docker.io/library/alpine:3") == "docker.io/library/alpine:3"
    assert printable("café/日本") == "café/日本"
    assert printable(HOSTILE_ARCH) == ("amd64\\x1b[31mRED\\nforged line\\r\\x07\\u202e")
    assert not RAW_CONTROL.search(printable("".join(map(chr, range(0x110)))))


def test_one_line_escapes_and_cuts_idempotently() -> None:
    assert one_line("no such image\nforged: line") == "no such image\\nforged: line"
    value = "a" * 3_000_000
    message = f"invalid reference {value!r}: invalid tag"
    started = time.perf_counter()
    line = one_line(message)
    assert time.perf_counter() - started < 0.5  # never escapes 3 MB whole
    assert len(line) <= MESSAGE_LIMIT
    assert line.startswith("invalid reference 'aaa") and line.endswith("': invalid tag")
    assert str(len(message)) in line
    assert one_line(line) == line
    escaped = one_line("\x1b" * 900)  # short, but four times longer once escaped
    assert len(escaped) <= MESSAGE_LIMIT and not RAW_CONTROL.search(escaped)
    assert one_line(escaped) == escaped
    assert one_line("x" * MESSAGE_LIMIT) == "x" * MESSAGE_LIMIT


# Any code point, lone surrogates included (a path decoded with surrogateescape has them).
_ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=1500)


@given(_ANY_TEXT, st.integers(min_value=40, max_value=2000))
@settings(max_examples=300)
def test_whatever_the_text_the_output_is_printable_and_bounded(text: str, limit: int) -> None:
    shown = printable(text)
    assert shown.isprintable()
    shown.encode("utf-8")  # no lone surrogate left to fail the terminal's encoder
    line = one_line(text, limit)
    assert line.isprintable() and len(line) <= limit
    assert one_line(line, limit) == line
    if printable(text) == text and len(text) <= limit:
        assert line == text  # nothing to escape, nothing to cut: unchanged


def test_quoted_cuts_a_value_and_says_how_long_it_was() -> None:
    assert quoted("7d") == "'7d'"
    shown = quoted("9" * 5000)
    assert shown.startswith("'999") and shown.endswith("... (5000 characters)")
    assert len(shown) < 250
    assert quoted("a\x1bb") == "'a\\x1bb'"


# ---------------------------------------------------------------------------- a hostile image


def _lines_are_clean(result: Result) -> list[str]:
    text = result.stdout.decode()
    assert not RAW_CONTROL.search(text), text
    return text.splitlines()


def test_hostile_names_are_escaped_in_human_output_and_exact_in_json(tmp_path: Path) -> None:
    home = tmp_path / "home"
    image = build_image(
        ImageSpec(layers=({"x": b"hostile\n"},), architecture=HOSTILE_ARCH, names=("evil:1",))
    )
    archive = build_docker_archive(tmp_path / "evil\n\x1b[2J.tar", [image]).path
    loaded = ok(home, "load", str(archive))
    assert _lines_are_clean(loaded) == [
        f"Loaded docker.io/library/evil:1 ({image.manifest_digest[7:19]})"
    ]
    assert len(_lines_are_clean(ok(home, "use", "evil:1", "--holder", HOLDER))) == 1

    table = _lines_are_clean(ok(home, "images"))
    assert len(table) == 2  # the header and one image: no forged line
    assert "linux/amd64\\x1b[31mRED\\nforged line\\r\\x07\\u202e" in table[1]

    history = _lines_are_clean(ok(home, "history"))
    assert len(history) == 4  # header, ImagePulled, ImageUsed (Started is unnamed)
    assert any("evil\\n\\x1b[2J.tar" in line for line in history), history
    assert any("by sandbox-9" in line for line in history), history
    assert len(_lines_are_clean(ok(home, "history", "evil:1"))) == 3

    # JSON keeps the exact values (its encoder escapes them) and is nothing but JSON.
    images = ok(home, "images", "--json")
    assert not RAW_CONTROL.search(images.stdout.decode())
    assert json.loads(images.stdout)[0]["architecture"] == HOSTILE_ARCH
    events = ok(home, "history", "--json").json()
    assert {e["detail"] for e in events} >= {f"by {HOLDER}"}

    assert len(_lines_are_clean(ok(home, "release", HOLDER))) == 1
    pruned = _lines_are_clean(ok(home, "prune"))
    assert pruned[0].startswith("Removed docker.io/library/evil:1")


# ---------------------------------------------------------------------------- one-line errors

HUGE = "9" * 5000


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home holding one image: the refusals below must come from the arguments, not from
    a missing home (commands that only read, or prune, do not create one)."""
    directory = tmp_path_factory.mktemp("cached")
    image = build_image(ImageSpec(layers=({"k": b"kept\n"},), names=("kept:1",)))
    ok(directory / "home", "load", str(build_docker_archive(directory / "k.tar", [image]).path))
    return directory / "home"


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (("prune", "--unused-for", "800000d"), ("100 years",)),
        (("prune", "--unused-for", "36501d", "--json"), ("100 years",)),
        (("prune", "--unused-for", HUGE), ("5000 characters",)),
        (("prune", "--unused-for", f"{HUGE}s"), ("5001 characters",)),
        (("prune", "--unused-for", "\u0661\u0662h"), ("invalid duration",)),
        (("prune", "--max-bytes", HUGE), ("5000 characters", "19 digits")),
        (("prune", "--max-bytes", "+5"), ("invalid byte count",)),
        (("prune", "--max-bytes", "5_000"), ("invalid byte count",)),
        (("prune", "--keep", "Alpha"), ("upper-case",)),
        (("prune", "--keep", ""), ("empty",)),
        (("images", "--" + "x" * 100_000), ("unrecognized arguments", "characters in all")),
        (("inspect", "a\x1b[31m:1"), ()),
    ],
)
def test_bad_numbers_and_hostile_values_are_one_short_line(
    cached: Path, args: tuple[str, ...], mentions: tuple[str, ...]
) -> None:
    result = cli(cached, *args)
    assert_error(result, 2, *mentions)
    line = result.error_lines[0]
    assert len(line) <= len("imageledger: ") + MESSAGE_LIMIT, len(line)
    assert not RAW_CONTROL.search(result.stderr)


def test_the_largest_durations_and_budgets_work(cached: Path) -> None:
    def dry(*args: str) -> int:
        return int(ok(cached, "prune", "--dry-run", "--json", *args).json()["image_refs_removed"])

    assert dry("--unused-for", "36500d") == 0  # used within a century
    assert dry("--max-bytes", "9" * 19) == 0  # fits
    assert dry("--max-bytes", "000") == 1  # leading zeros: zero bytes


# ---------------------------------------------------------------------------- --keep, end to end


def test_keep_as_people_write_it_keeps_what_it_names(tmp_path: Path) -> None:
    home = tmp_path / "home"
    names = ("alpha:latest", "alpha:3", "alphabet:1", "example.com/gamma:2", "acme/beta:1")
    images = [
        build_image(ImageSpec(layers=({"n": name.encode() * 20},), names=(name,))) for name in names
    ]
    ok(home, "load", str(build_docker_archive(tmp_path / "all.tar", images).path))

    dry = cli(home, "prune", "--dry-run", "--keep", "alpha", "--keep", "alpah", "--json")
    assert dry.code == 0, dry.stderr
    assert dry.json()["unmatched_keep"] == ["alpah"]
    assert dry.error_lines == ["imageledger: warning: --keep 'alpah' matched no image"]

    real = cli(
        home, "prune", "--keep", "alpha", "--keep", "example.com/gamma", "--keep", "*/beta:*"
    )
    assert real.code == 0, real.stderr
    assert real.error_lines == []
    assert "Removed docker.io/library/alphabet:1" in real.stdout.decode()
    kept = {o["reference"] for o in ok(home, "images", "--json").json()}
    assert kept == {
        "docker.io/library/alpha:latest",
        "docker.io/library/alpha:3",
        "example.com/gamma:2",
        "docker.io/acme/beta:1",
    }
    again = ok(home, "prune", "--keep", "alpha:*", "--json").json()
    assert {r["name"] for r in again["removed"] if r["kind"] == "reference"} == {
        "example.com/gamma:2",
        "docker.io/acme/beta:1",
    }
    assert again["unmatched_keep"] == []
    assert {o["reference"] for o in ok(home, "images", "--json").json()} == {
        "docker.io/library/alpha:latest",
        "docker.io/library/alpha:3",
    }
