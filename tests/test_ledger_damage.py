"""A damaged ledger (issue 8, "Damaged ledger pages"): reported, never answered from.

LMDB keeps no checksums, so damage to ``ledger/data.mdb`` (a bad sector, a truncated copy, a
stray write) shows up as whatever a read meets. Every command must turn it into one line on
stderr naming the ledger and what to do, with exit 5 ("the ledger is damaged"), or, if the
damage hit nothing the command reads, answer exactly as it would have undamaged; `verify`
checks the whole ledger in a child process (`storage.ledgercheck`) and survives a reader that
crashes.

The one death that cannot be prevented in the CLI process: py-lmdb's LMDB asserts (SIGABRT)
when a cursor steps onto a neighbouring page that is not a leaf (see `storage.lmdbenv`). The
property test allows exactly that, for the ordinary commands only, and only with LMDB's
assertion line on stderr.

Every command runs in a child process on a fresh copy of one home, built once per module.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

import msgpack
import pytest
from eventsourcing.persistence import Notification
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imageledger.domain.errors import LedgerCorruptError
from imageledger.storage import ledgercheck
from imageledger.storage.ledger import checked_decoder
from imageledger.storage.ledgercheck import LedgerCheck, check_ledger
from imageledger.tools.imagebuild import ImageSpec, build_docker_archive, build_image

SCRIPT = Path(sys.executable).with_name("imageledger")
EXIT_DAMAGED = 5
PAGE = 4096
IMAGES = 8
REFERENCE = "docker.io/acme/img1:1"
COMMANDS: tuple[tuple[str, ...], ...] = (
    ("images", "--json"),
    ("inspect", REFERENCE),
    # Exact times: the table's ages ("3 minutes ago") change between the undamaged run and
    # the damaged ones.
    ("history", "--no-trunc"),
    ("history", REFERENCE, "--no-trunc"),
    ("df",),
    ("prune", "--dry-run"),
    ("verify",),
    ("rebuild", "--verify"),
)


@dataclass(frozen=True)
class Run:
    code: int
    stdout: bytes
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        """stderr lines that are not structured (JSON) log lines."""
        return [line for line in self.stderr.splitlines() if not line.startswith("{")]


def cli(home: Path, *args: str) -> Run:
    env = {k: v for k, v in os.environ.items() if k not in ("IMAGELEDGER_HOME",)}
    done = subprocess.run(
        [str(SCRIPT), "--home", str(home), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    return Run(done.returncode, done.stdout, done.stderr.decode("utf-8", "replace"))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with eight images under two names each, a lease and a removed name: a log that
    spans several pages, and every view table in use."""
    base = tmp_path_factory.mktemp("damage")
    specs = [
        ImageSpec(
            layers=({f"file{i}": (b"content %d\n" % i) * 40},),
            names=(f"acme/img{i}:1", f"acme/img{i}:latest"),
        )
        for i in range(IMAGES)
    ]
    archive = build_docker_archive(base / "images.tar", [build_image(s) for s in specs]).path
    home = base / "home"
    for args in (
        ("load", str(archive)),
        ("use", REFERENCE, "--holder", "sandbox-1"),
        ("rm", "docker.io/acme/img2:latest"),
    ):
        run = cli(home, *args)
        assert run.code == 0, (args, run.stderr)
    return home


@pytest.fixture(scope="module")
def undamaged(pristine: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """Each command's answer on an undamaged copy of the home."""
    answers = {}
    for command in COMMANDS:
        home = tmp_path_factory.mktemp("undamaged") / "home"
        shutil.copytree(pristine, home)
        run = cli(home, *command)
        assert run.code == 0, (command, run.stderr)
        answers[" ".join(command)] = run
    return answers


def damaged_copy(pristine: Path, into: Path, damage: Callable[[bytes], bytes]) -> Path:
    home = into / "home"
    shutil.copytree(pristine, home)
    data = home / "ledger" / "data.mdb"
    data.write_bytes(damage(data.read_bytes()))
    return home


# ------------------------------------------------------------------ LMDB's page layout


def _meta_root(data: bytes, dbi: int) -> int:
    """The root page of database `dbi` (0 free list, 1 main) in the newest meta page."""
    metas: list[tuple[int, int]] = []
    for page in (0, 1):
        base = page * PAGE + 16
        txnid = int(struct.unpack_from("<Q", data, base + 24 + 2 * 48 + 8)[0])
        root = int(struct.unpack_from("<Q", data, base + 24 + dbi * 48 + 40)[0])
        metas.append((txnid, root))
    return max(metas)[1]


def _nodes(data: bytes, pgno: int) -> list[tuple[int, bytes, int]]:
    """(flags, key, offset of the node's data) of every node on page `pgno`."""
    base = pgno * PAGE
    lower = struct.unpack_from("<H", data, base + 12)[0]
    nodes = []
    for i in range((lower - 16) // 2):
        ptr = struct.unpack_from("<H", data, base + 16 + 2 * i)[0]
        lo, hi, flags, ksize = struct.unpack_from("<HHHH", data, base + ptr)
        key = data[base + ptr + 8 : base + ptr + 8 + ksize]
        nodes.append((flags | (lo << 16) | (hi << 32), key, base + ptr + 8 + ksize))
    return nodes


def _is_branch(data: bytes, pgno: int) -> bool:
    return bool(struct.unpack_from("<H", data, pgno * PAGE + 10)[0] & 0x01)


def _named_root(data: bytes, name: bytes) -> int:
    """The root page of the named database `name` (the main database is one leaf page in
    these small ledgers)."""
    main = _meta_root(data, 1)
    assert not _is_branch(data, main)
    for _, key, offset in _nodes(data, main):
        if key == name:
            return int(struct.unpack_from("<Q", data, offset + 40)[0])
    raise AssertionError(f"no database {name!r}")


def _children(data: bytes, pgno: int) -> list[int]:
    """The child pages of branch page `pgno`, in key order."""
    return [packed >> 16 & 0xFFFF_FFFF_FFFF for packed, _, _ in _nodes(data, pgno)]


def zero_page(pgno: int) -> Callable[[bytes], bytes]:
    def damage(data: bytes) -> bytes:
        return data[: pgno * PAGE] + bytes(PAGE) + data[(pgno + 1) * PAGE :]

    return damage


def log_leaves(pristine: Path) -> list[int]:
    data = (pristine / "ledger" / "data.mdb").read_bytes()
    root = _named_root(data, b"imageledger.log")
    assert _is_branch(data, root), "the test ledger's log must span several pages"
    return _children(data, root)


# ------------------------------------------------------------------ the checker


def test_checker_passes_a_sound_ledger(pristine: Path, tmp_path: Path) -> None:
    home = damaged_copy(pristine, tmp_path, lambda data: data)
    before = (home / "ledger" / "data.mdb").read_bytes()
    found = check_ledger(home / "ledger")
    assert found == LedgerCheck(ok=True, events=found.events, problem=None)
    assert found.events >= 2 * IMAGES
    assert found.error() is None
    # It reads a copy: the ledger is not written, not even its scratch views.
    assert (home / "ledger" / "data.mdb").read_bytes() == before


DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "truncated-to-nothing": lambda data: b"",
    "truncated-inside-the-meta-pages": lambda data: data[:100],
    "truncated-after-the-meta-pages": lambda data: data[: 2 * PAGE],
    "truncated-by-one-page": lambda data: data[:-PAGE],
    "both-meta-pages-zeroed": lambda data: bytes(2 * PAGE) + data[2 * PAGE :],
    "everything-after-the-meta-pages-random": lambda data: (
        data[: 2 * PAGE] + random.Random(8).randbytes(len(data) - 2 * PAGE)
    ),
}


@pytest.mark.parametrize("name", sorted(DAMAGES))
def test_checker_reports_damage_naming_the_ledger(
    pristine: Path, tmp_path: Path, name: str
) -> None:
    home = damaged_copy(pristine, tmp_path, DAMAGES[name])
    found = check_ledger(home / "ledger")
    assert not found.ok
    assert found.problem is not None and "\n" not in found.problem
    assert str(home / "ledger") in found.problem
    error = found.error()
    assert error is not None and str(error) == found.problem


def test_checker_reports_an_undecodable_log_entry(pristine: Path, tmp_path: Path) -> None:
    """A log entry whose bytes no longer decode: LMDB reads it fine, the check does not."""

    def damage(data: bytes) -> bytes:
        found = bytearray(data)
        leaf = log_leaves(pristine)[0]
        _, _, offset = _nodes(data, leaf)[0]
        found[offset : offset + 8] = b"\xc1" * 8  # 0xc1: never used by msgpack
        return bytes(found)

    home = damaged_copy(pristine, tmp_path, damage)
    found = check_ledger(home / "ledger")
    assert not found.ok and found.problem is not None
    assert str(home / "ledger") in found.problem


def test_checker_reports_a_page_that_would_crash_a_reader(pristine: Path, tmp_path: Path) -> None:
    """The log's second leaf page zeroed: a cursor stepping onto it from the first makes LMDB
    abort the reading process (SIGABRT). The checker's page walk (py-lmdb's offline
    verifier, which never hands the file to LMDB) finds it first."""
    home = damaged_copy(pristine, tmp_path, zero_page(log_leaves(pristine)[1]))
    found = check_ledger(home / "ledger")
    assert not found.ok and found.problem is not None
    assert str(home / "ledger") in found.problem
    assert "LMDB's page check" in found.problem and "imageledger.log" in found.problem


@pytest.mark.parametrize(
    "crash", [signal.SIGBUS, signal.SIGSEGV, signal.SIGABRT], ids=lambda s: s.name
)
def test_checker_survives_a_crashing_reader(
    pristine: Path, monkeypatch: pytest.MonkeyPatch, crash: signal.Signals
) -> None:
    """Whatever kills the reading child (a SIGBUS from a page beyond the end of the file, an
    assertion in LMDB), the checker answers: not ok, naming the ledger and the signal."""
    die = f"import os, signal; os.kill(os.getpid(), signal.{crash.name})"
    monkeypatch.setattr(ledgercheck, "_child_command", lambda _: [sys.executable, "-c", die])
    found = check_ledger(pristine / "ledger")
    assert not found.ok and found.problem is not None
    assert str(pristine / "ledger") in found.problem
    assert f"the ledger reader crashed (signal {crash.name})" in found.problem
    assert "\n" not in found.problem


def test_checker_reports_views_that_differ_from_the_log(pristine: Path, tmp_path: Path) -> None:
    """A view row damaged into another well-formed value: only a replay can tell."""

    def damage(data: bytes) -> bytes:
        found = bytearray(data)
        root = _named_root(data, b"views.a.blobs")
        leaf = root
        while _is_branch(data, leaf):
            leaf = _children(data, leaf)[0]
        _, _, offset = _nodes(data, leaf)[0]
        at = data.index(b"size", offset) + 4  # {"kind": ..., "size": <fixint>, ...}
        assert data[at] < 0x80 or data[at] in (0xCC, 0xCD)
        found[at + (data[at] >= 0x80)] ^= 0x01
        return bytes(found)

    home = damaged_copy(pristine, tmp_path, damage)
    found = check_ledger(home / "ledger")
    assert not found.ok and found.problem is not None
    assert "blobs" in found.problem and "imageledger rebuild" in found.problem


# ------------------------------------------------------------------ the command line


def assert_damage_reported(run: Run, ledger: Path) -> None:
    assert run.code == EXIT_DAMAGED, (run.code, run.stderr)
    assert run.stdout == b""
    assert len(run.error_lines) == 1, run.stderr
    assert run.error_lines[0].startswith("imageledger: ")
    assert str(ledger) in run.error_lines[0]
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("name", sorted(DAMAGES))
def test_cli_reports_damage_with_exit_5(pristine: Path, tmp_path: Path, name: str) -> None:
    home = damaged_copy(pristine, tmp_path, DAMAGES[name])
    for command in (("images",), ("history",), ("verify",)):
        shutil.copy2(home / "ledger" / "data.mdb", tmp_path / "data.mdb")
        assert_damage_reported(cli(home, *command), home / "ledger")
        shutil.copy2(tmp_path / "data.mdb", home / "ledger" / "data.mdb")


def test_verify_checks_the_ledger_not_only_the_blobs(pristine: Path, tmp_path: Path) -> None:
    """An undecodable log entry: the blobs are intact, but verify must not say all is."""

    def damage(data: bytes) -> bytes:
        found = bytearray(data)
        _, _, offset = _nodes(data, log_leaves(pristine)[0])[0]
        found[offset : offset + 8] = b"\xc1" * 8
        return bytes(found)

    home = damaged_copy(pristine, tmp_path, damage)
    assert_damage_reported(cli(home, "verify"), home / "ledger")


def test_verify_survives_a_crashing_reader(pristine: Path, tmp_path: Path) -> None:
    """The page that makes an in-process reader abort: verify reports it, exit 5."""
    home = damaged_copy(pristine, tmp_path, zero_page(log_leaves(pristine)[1]))
    assert_damage_reported(cli(home, "verify"), home / "ledger")


_KINDS = ("zero", "garbage", "flip", "truncate", "append")


@st.composite
def damages(draw: st.DrawFn) -> tuple[str, int, int]:
    kind = draw(st.sampled_from(_KINDS))
    where = draw(st.integers(min_value=0, max_value=(1 << 20) - 1))
    length = draw(st.integers(min_value=1, max_value=2 * PAGE))
    return kind, where, length


def apply_damage(data: bytes, kind: str, where: int, length: int) -> bytes:
    at = where % len(data)
    if kind == "truncate":
        return data[:at]
    if kind == "append":
        return data + random.Random(where).randbytes(length)
    found = bytearray(data)
    end = min(at + length, len(data))
    if kind == "zero":
        found[at:end] = bytes(end - at)
    elif kind == "garbage":
        found[at:end] = random.Random(where).randbytes(end - at)
    else:
        found[at] ^= 1 << (length % 8)
    return bytes(found)


def check_answer(command: Sequence[str], run: Run, undamaged: Run, ledger: Path) -> None:
    """What a command may do on a damaged ledger (see the module docstring)."""
    assert "Traceback" not in run.stderr, run.stderr
    if run.code < 0:
        assert command[0] != "verify", f"verify died of signal {-run.code}: {run.stderr}"
        assert run.code == -signal.SIGABRT, run.stderr
        assert "Assertion 'IS_LEAF(mp)' failed" in run.stderr, run.stderr
        return
    if run.code == 0:
        assert run.stdout == undamaged.stdout, "an answer from a damaged ledger"
        return
    if command[0] == "rebuild" and run.code == 1:
        assert b"DIFFERENT" in run.stdout  # the views differ from the log: what it checks
        return
    assert run.code in (3, EXIT_DAMAGED), (run.code, run.stderr)
    assert run.stdout == b""
    assert len(run.error_lines) == 1, run.stderr
    if run.code == EXIT_DAMAGED:
        assert str(ledger) in run.error_lines[0], run.error_lines[0]


@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(damage=damages())
def test_damaged_pages_never_give_a_garbage_answer_or_a_traceback(
    pristine: Path,
    undamaged: dict[str, Run],
    tmp_path_factory: pytest.TempPathFactory,
    damage: tuple[str, int, int],
) -> None:
    data = (pristine / "ledger" / "data.mdb").read_bytes()
    damaged = apply_damage(data, *damage)
    for command in COMMANDS:
        home = tmp_path_factory.mktemp("damaged") / "home"
        shutil.copytree(pristine, home)
        (home / "ledger" / "data.mdb").write_bytes(damaged)
        run = cli(home, *command)
        check_answer(command, run, undamaged[" ".join(command)], home / "ledger")
        shutil.rmtree(home)


def damage_first_state(pristine: Path) -> Callable[[bytes], bytes]:
    """The first log entry's event state overwritten with bytes that are not msgpack, its
    envelope intact (same length): LMDB and the recorder read it, the mapper cannot."""

    def damage(data: bytes) -> bytes:
        found = bytearray(data)
        _, _, offset = _nodes(data, log_leaves(pristine)[0])[0]
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(data[offset : offset + PAGE])
        raw, version, topic, state = next(unpacker)
        envelope = msgpack.packb((raw, version, topic, state))
        assert data[offset : offset + len(envelope)] == envelope
        start = offset + len(envelope) - len(state)
        found[start : start + len(state)] = b"\xc1" * len(state)
        return bytes(found)

    return damage


def test_checker_reports_an_undecodable_event_state(pristine: Path, tmp_path: Path) -> None:
    home = damaged_copy(pristine, tmp_path, damage_first_state(pristine))
    found = check_ledger(home / "ledger")
    assert not found.ok and found.problem is not None
    assert str(home / "ledger") in found.problem and "log entry 1" in found.problem


def test_history_reports_an_undecodable_event_state(pristine: Path, tmp_path: Path) -> None:
    home = damaged_copy(pristine, tmp_path, damage_first_state(pristine))
    assert_damage_reported(cli(home, "history"), home / "ledger")


def test_checked_decoder_names_the_ledger_and_the_entry(tmp_path: Path) -> None:
    def decode(notification: Notification) -> object:
        raise ValueError("bad\nbytes")

    checked = checked_decoder(decode, tmp_path / "ledger")
    with pytest.raises(LedgerCorruptError) as caught:
        checked(Notification(uuid4(), 1, "topic", b"state", 7))
    message = str(caught.value)
    assert "\n" not in message
    assert str(tmp_path / "ledger") in message and "log entry 7" in message


def damage_view_digest(table: bytes) -> Callable[[bytes], bytes]:
    """The first digest in the first leaf of view table `table` made a non-digest (one hex
    digit turned into 'z'): msgpack still decodes the row, so only the reader's check stands
    between it and the output."""

    def damage(data: bytes) -> bytes:
        leaf = _named_root(data, table)
        while _is_branch(data, leaf):
            leaf = _children(data, leaf)[0]
        for packed, _, offset in _nodes(data, leaf):
            end = offset + (packed >> 16 & 0xFFFF_FFFF)  # a leaf node's data size
            at = data.find(b"sha256:", offset, end)
            if at >= 0:
                at += len("sha256:")
                return data[:at] + b"z" + data[at + 1 :]
        raise AssertionError(f"no digest in the values of {table!r}'s first leaf")

    return damage


@pytest.mark.parametrize(
    ("table", "command"),
    [
        (b"views.a.refs.order", ("images", "--json")),
        (b"views.a.refs.order", ("images",)),
        (b"views.a.blobs", ("df",)),
        (b"views.a.manifests", ("prune", "--dry-run")),
    ],
)
def test_a_garbage_digest_in_the_views_is_not_an_answer(
    pristine: Path, tmp_path: Path, table: bytes, command: tuple[str, ...]
) -> None:
    home = damaged_copy(pristine, tmp_path, damage_view_digest(table))
    assert_damage_reported(cli(home, *command), home / "ledger")
