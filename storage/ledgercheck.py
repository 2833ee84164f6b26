"""Check a whole ledger in a child process: `check_ledger(ledger_dir) -> LedgerCheck`
(the `Ledger.check` port; a storage adapter, as it reads LMDB's pages and replays the views).

LMDB keeps no checksums, so the only way to know a ledger is sound is to read all of it:
every event must decode through the mapper the cache uses, the aggregate index must name
exactly the log's events, and the views must equal a replay of the log (`rebuild(...,
verify_only=True)`, the replay `imageledger rebuild --verify` runs). Reading damaged pages is
not always an error: py-lmdb's LMDB asserts (SIGABRT) when a cursor steps onto a neighbouring
page that is not a leaf, and a page beyond the end of a file cut short is a SIGBUS. So the
reading happens in a child process (``python -m imageledger.storage.ledgercheck <dir>``), and
a child killed by a signal is itself the answer: the ledger is damaged.

First the pages: py-lmdb's offline verifier walks every tree of a copy in pure Python, never
through LMDB, and checks what LMDB assumes (page types and bounds, key order, counts, a free
list disjoint from the live pages). Then the meaning: events, index, replay, as above, read
through LMDB (in the same child, so a crash there is still only an answer).

The child never writes to the ledger it checks. A replay writes scratch views, and a write
transaction on damaged pages could spread the damage (a damaged free list hands out pages
still in use), so the child takes a consistent copy (`mdb_env_copy`, under a read
transaction, so appends may go on) into a temporary directory and replays there. The copy is
as large as the ledger (the log and views; blobs live elsewhere) and is removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import lmdb

from imageledger.domain.errors import LedgerCorruptError, LedgerError, LedgerFormatError
from imageledger.storage.lmdbenv import RECOVERY, as_damage, check_size, damaged

_RESULT: Final = "ledgercheck-result: "


@dataclass(frozen=True)
class LedgerCheck:
    """What `check_ledger` found. `problem` is one line naming the ledger and what to do
    (None when `ok`); `events` is how many events were read (0 if the check stopped early)."""

    ok: bool
    events: int
    problem: str | None
    # The stored format, when it is not the one this imageledger reads (then nothing was
    # decoded: bytes of another format are not damage).
    other_format: int | str | None = None
    path: str = field(default="", compare=False)  # the ledger checked (for the error)

    def error(self) -> LedgerError | None:
        """The problem as the package's error (None when `ok`): `LedgerFormatError` for a
        ledger in another format, `LedgerCorruptError` for a damaged one."""
        if self.ok:
            return None
        if self.other_format is not None:
            return LedgerFormatError(self.path, self.other_format)
        return LedgerCorruptError(self.problem or "the ledger is damaged")


def check_ledger(ledger_dir: Path, *, timeout: float | None = None) -> LedgerCheck:
    """Read and replay the whole ledger at `ledger_dir` (a home's ``ledger/``) in a child
    process and say whether it is sound. Never raises for damage, whatever the child met:
    an exception, a crash (a signal), no answer within `timeout` seconds."""
    import subprocess  # only a check starts a child: a query does not load it

    ledger_dir = Path(ledger_dir).absolute()
    try:
        done = subprocess.run(
            _child_command(ledger_dir),
            # The interpreter running now, whatever path it was started by (a user may be
            # able to run it without being able to open the path `sys.executable` names:
            # a virtualenv whose base interpreter lies under another user's home).
            executable=_SELF if os.path.exists(_SELF) else None,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "PYTHONFAULTHANDLER": ""},
        )
    except subprocess.TimeoutExpired:
        problem = f"{ledger_dir}: the ledger check did not finish in {timeout} s"
        return LedgerCheck(False, 0, problem)
    for line in reversed(done.stdout.decode("utf-8", "replace").splitlines()):
        if line.startswith(_RESULT):
            found = json.loads(line[len(_RESULT) :])
            return LedgerCheck(
                bool(found["ok"]),
                int(found["events"]),
                found["problem"],
                found.get("other_format"),
                str(ledger_dir),
            )
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = str(-done.returncode)
        detail = f"the ledger reader crashed (signal {name})"
        assertion = _lmdb_assertion(done.stderr)
        if assertion:
            detail += f": {assertion}"
        return LedgerCheck(False, 0, str(damaged(ledger_dir, detail)))
    last = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
    return LedgerCheck(
        False,
        0,
        f"{ledger_dir}: the ledger check failed (exit {done.returncode}): {last[0][:200]}",
    )


_SELF = "/proc/self/exe"


def _child_command(ledger_dir: Path) -> list[str]:
    """The child's command line (a function, so that a test can make a child that crashes)."""
    return [sys.executable, "-m", "imageledger.storage.ledgercheck", str(ledger_dir)]


def _lmdb_assertion(stderr: bytes) -> str:
    """LMDB's own line before an abort ("...mdb.c:6059: Assertion 'IS_LEAF(mp)' failed in
    mdb_cursor_next()"), which says where the damage was met."""
    for line in stderr.decode("utf-8", "replace").splitlines():
        if "Assertion" in line and "mdb" in line:
            return line.rsplit("/", 1)[-1].strip()[:160]
    return ""


# ----------------------------------------------------------------------- the child


def _open_readonly(ledger_dir: Path) -> lmdb.Environment:
    """The ledger opened for reading only; without LMDB's lock file when it cannot be opened
    (a read-only home: then no imageledger process writes to it either)."""
    data = ledger_dir / "data.mdb"
    if not data.is_file():
        raise damaged(ledger_dir, "data.mdb is missing")
    if data.stat().st_size == 0:
        raise damaged(ledger_dir, "data.mdb is empty")
    options: dict[str, Any] = {
        "subdir": True,
        "readonly": True,
        "max_dbs": 256,
        "max_readers": 1024,
        "readahead": False,
    }
    try:
        try:
            env = lmdb.open(str(ledger_dir), lock=True, **options)
        except lmdb.ReadonlyError:
            env = lmdb.open(str(ledger_dir), lock=False, **options)
        except lmdb.Error as e:
            if "Permission denied" not in str(e):
                raise
            env = lmdb.open(str(ledger_dir), lock=False, **options)
    except lmdb.Error as e:
        raise damaged(ledger_dir, f"LMDB cannot open it: {e}") from e
    try:
        check_size(ledger_dir, env)
    except BaseException:
        env.close()
        raise
    return env


def _copy(ledger_dir: Path, into: Path) -> None:
    env = _open_readonly(ledger_dir)
    try:
        env.copy(str(into))
    except lmdb.Error as e:
        raise as_damage(ledger_dir, e) from e
    finally:
        env.close()


def _check_copy(ledger_dir: Path, copy: Path) -> LedgerCheck:
    """The checks, on `copy` (of `ledger_dir`, which the messages name)."""
    # The application, mapper and views of the cache itself: the events must decode as the
    # cache decodes them, and the replay is the cache's (imported here, in the child only).
    from imageledger.projections.runner import rebuild
    from imageledger.projections.views import FORMAT as VIEWS_FORMAT
    from imageledger.projections.views import TABLES
    from imageledger.storage.eventstore import FORMAT_VERSION, stored_format
    from imageledger.storage.ledger import LMDBApplicationRecorder, LMDBFactory, check_log
    from imageledger.storage.ledgerapp import LedgerApplication
    from imageledger.storage.settings import LOG_DB
    from imageledger.storage.viewstore import LMDBViews

    env = {
        "PERSISTENCE_MODULE": f"{LMDBFactory.__module__}",
        "LMDB_PATH": str(copy),
        "LMDB_DURABILITY": "nosync",
    }
    app = LedgerApplication(env=env)
    try:
        recorder = app.recorder
        assert isinstance(recorder, LMDBApplicationRecorder)
        found = stored_format(recorder.env, lambda: bool(recorder.max_notification_id()))
        if found not in (None, FORMAT_VERSION):
            problem = str(LedgerFormatError(ledger_dir, found if found is not None else 1))
            return LedgerCheck(False, 0, problem, found, str(ledger_dir))
        views = LMDBViews(recorder.env, TABLES, lambda: recorder, VIEWS_FORMAT, LOG_DB)
        events = check_log(recorder)
        report = rebuild(views, app.mapper.to_domain_event, verify_only=True)
    finally:
        app.close()
    if not report.identical:
        differ = sorted(t for t, (live, rebuilt) in report.tables.items() if live != rebuilt)
        problem = (
            f"{ledger_dir}: the views differ from a replay of the log ({', '.join(differ)}); "
            "`imageledger rebuild` replaces them from the log"
        )
        return LedgerCheck(False, report.events, problem)
    if report.events != events:
        problem = (
            f"{ledger_dir}: the ledger is damaged (the log holds {events} events, the replay "
            f"read {report.events}); {RECOVERY}"
        )
        return LedgerCheck(False, report.events, problem)
    return LedgerCheck(True, events, None)


def _structure(ledger_dir: Path, copy: Path) -> str | None:
    """What py-lmdb's offline verifier (`lmdb.verify`: a pure-Python walk of every tree from
    the committed roots, which never hands the file to LMDB) finds wrong with the copy's
    pages, in one line; None if nothing. It also proves what no read can: that the free list
    names no live page, so that the next write cannot overwrite data in place."""
    from lmdb import verify

    try:
        problems = verify.verify(str(copy))  # type: ignore[no-untyped-call]
    except verify.VerifyError as e:
        problems = [str(e)]
    if not problems:
        return None
    more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
    first = str(problems[0]).replace(str(copy), str(ledger_dir))
    return str(damaged(ledger_dir, f"LMDB's page check: {first}{more}"))


def _child(ledger_dir: Path) -> LedgerCheck:
    work = Path(tempfile.mkdtemp(prefix="imageledger-check-"))
    try:
        _copy(ledger_dir, work)
        problem = _structure(ledger_dir, work)
        if problem is not None:
            return LedgerCheck(False, 0, problem)
        try:
            return _check_copy(ledger_dir, work)
        except LedgerCorruptError as e:
            # Raised naming the copy: name the ledger instead.
            text = str(e).replace(str(work), str(ledger_dir))
            raise as_damage(ledger_dir, LedgerCorruptError(text)) from e
    except LedgerCorruptError as e:
        problem = str(as_damage(ledger_dir, e))
        return LedgerCheck(False, 0, problem)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m imageledger.storage.ledgercheck <ledger dir>``: one result line on stdout.

    Anything other than a damage error escapes as a traceback on stderr and a non-zero
    exit: the parent reports it as a failed check, not as a sound ledger."""
    # Nothing configures logging here: the library's lines go to stdlib logging's default
    # (warnings on stderr), and stdout carries the result line only.
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m imageledger.storage.ledgercheck LEDGER_DIR", file=sys.stderr)
        return 2
    result = _child(Path(args[0]))
    line = json.dumps(
        {
            "ok": result.ok,
            "events": result.events,
            "problem": result.problem,
            "other_format": result.other_format,
        }
    )
    print(_RESULT + line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
