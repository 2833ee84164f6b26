"""Child-process entry points for the multi-process, crash and bad-input ledger tests, and
the parent-side helpers that drive them (`Child`, `check_after_kill`, `log_rows`; the test
modules import this module at run time, so mypy sees them as `Any` there).

Run as ``python -c "import _ledger_child, sys; sys.exit(_ledger_child.main(sys.argv[1:]))" CMD
ARGS...`` with this folder on ``PYTHONPATH`` (so the aggregate topics are
``_ledger_child:...`` in every process, never ``__main__:...``). The ledger is configured from
the process environment (``PERSISTENCE_MODULE``, ``LMDB_PATH``, ``LMDB_*``), as a user's
application would be.

The protocol on stdout: one line ``@@<json object>`` per message, written and flushed in one
call; anything else on stdout is ignored by the parent. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast
from uuid import NAMESPACE_URL, UUID, uuid4, uuid5

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import StoredEvent
from eventsourcing.utils import Environment

from imageledger.domain.errors import ImageLedgerError
from imageledger.storage.ledger import LMDBApplicationRecorder, LMDBFactory
from imageledger.tools.logs import configure_logging

APP_NAME = "ledgertest"
DIRECT_TOPIC = "_ledger_child:Direct"
KILL_TOPIC = "_ledger_child:Kill"

_out_lock = threading.Lock()


class Counter(Aggregate):
    """An aggregate whose state tells how many increments it saw and their total."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0
        self.total = 0

    @event("Incremented")
    def increment(self, by: int) -> None:
        self.count += 1
        self.total += by


class LedgerApp(Application[UUID]):
    name = APP_NAME


def say(**message: Any) -> None:
    """One protocol line on stdout, flushed at once."""
    line = "@@" + json.dumps(message, sort_keys=True) + "\n"
    with _out_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


def open_app() -> LedgerApp:
    return LedgerApp()


def factory_of(app: LedgerApp) -> LMDBFactory:
    return cast(LMDBFactory, app.factory)


def recorder_of(app: LedgerApp) -> LMDBApplicationRecorder:
    return cast(LMDBApplicationRecorder, app.recorder)


def kill_event(tag: str, thread: int, seq: int) -> StoredEvent:
    """The event number `seq` (from 1) of writer `thread` in kill round `tag`: deterministic,
    so the parent can check the exact content of every id the child reported."""
    pad = "x" * ((seq * 7919) % 6000)
    state = json.dumps({"tag": tag, "thread": thread, "seq": seq, "pad": pad}).encode()
    return StoredEvent(kill_originator(tag, thread), seq, KILL_TOPIC, state)


def kill_originator(tag: str, thread: int) -> UUID:
    return uuid5(NAMESPACE_URL, f"imageledger-test:{tag}:{thread}")


def digest(state: bytes) -> str:
    return hashlib.sha256(state).hexdigest()


# ---------------------------------------------------------------------------- commands


def cmd_concurrent(args: argparse.Namespace) -> int:
    """Append `args.events` events in batches of 1..9 (half through `Application.save` of
    counters, half straight into the recorder), after a go line on stdin."""
    app = open_app()
    recorder = recorder_of(app)
    rng = random.Random(args.child)
    counters: list[Counter] = []
    direct = uuid4()
    direct_version = 0
    batches: list[dict[str, Any]] = []
    say(event="ready", pid=os.getpid())
    if sys.stdin.readline().strip() != "go":
        return 2
    remaining = args.events
    while remaining:
        size = min(rng.randint(1, 9), remaining)
        if rng.random() < 0.5:
            # Through the application: one save of one or two counters is one batch.
            pending: list[Counter] = []
            budget = size
            while budget:
                if len(counters) < 3 and (not counters or rng.random() < 0.3):
                    counter = Counter(f"child-{args.child}-{len(counters)}")
                    counters.append(counter)
                else:
                    counter = rng.choice(counters)
                    counter.increment(rng.randint(1, 100))
                if counter not in pending:
                    pending.append(counter)
                budget -= 1
            recordings = app.save(*pending)
            batches.append(
                {
                    "kind": "app",
                    "ids": [r.notification.id for r in recordings],
                    "events": [
                        [str(r.domain_event.originator_id), r.domain_event.originator_version]
                        for r in recordings
                    ],
                }
            )
        else:
            stored = []
            for _ in range(size):
                direct_version += 1
                state = json.dumps({"child": args.child, "version": direct_version}).encode()
                stored.append(StoredEvent(direct, direct_version, DIRECT_TOPIC, state))
            ids = recorder.insert_events(stored)
            assert ids is not None
            batches.append(
                {
                    "kind": "recorder",
                    "ids": list(ids),
                    "events": [[str(direct), s.originator_version] for s in stored],
                }
            )
        remaining -= size
    report = {
        "child": args.child,
        "batches": batches,
        "counters": {
            str(c.id): {"version": c.version, "count": c.count, "total": c.total} for c in counters
        },
        "direct": [str(direct), direct_version],
    }
    with open(args.report, "w", encoding="utf-8") as f:
        json.dump(report, f)
    app.close()
    say(event="done")
    return 0


def cmd_appender(args: argparse.Namespace) -> int:
    """Append for ever from `args.threads` threads, reporting every committed append."""
    app = open_app()
    recorder = recorder_of(app)
    say(event="ready", pid=os.getpid())

    def write(thread: int) -> None:
        seq = 0
        while True:
            size = 1 + seq % 3
            batch = [kill_event(args.tag, thread, seq + i + 1) for i in range(size)]
            ids = recorder.insert_events(batch)
            assert ids is not None
            seq += size
            say(
                event="committed",
                thread=thread,
                ids=list(ids),
                seqs=[s.originator_version for s in batch],
            )

    for n in range(1, args.threads):
        threading.Thread(target=write, args=(n,), daemon=True).start()
    write(0)
    return 0


def cmd_reader(args: argparse.Namespace) -> int:
    """Hold a read transaction open until stdin closes (or the parent kills us)."""
    app = open_app()
    last = recorder_of(app).max_notification_id()
    with factory_of(app).ledger.read():
        say(event="reading", pid=os.getpid(), max=last)
        sys.stdin.readline()
    app.close()
    return 0


def reader_pids(text: str) -> list[int]:
    """The pids in the text of `lmdb.Environment.readers()`."""
    pids = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0].isdigit():
            pids.append(int(fields[0]))
    return pids


def cmd_raw_readers(args: argparse.Namespace) -> int:
    """The reader table as raw LMDB sees it, without clearing anything."""
    import lmdb

    env = lmdb.open(args.path, readonly=True, lock=True, max_dbs=256)
    try:
        say(event="readers", pids=reader_pids(env.readers()), mine=os.getpid())
    finally:
        env.close()
    return 0


def cmd_open_check(args: argparse.Namespace) -> int:
    """Open the ledger as an application would; report the reader table and append one event."""
    app = open_app()
    ledger = factory_of(app).ledger
    pids = reader_pids(ledger.env.readers())
    again = ledger.env.reader_check()
    ids = recorder_of(app).insert_events([StoredEvent(uuid4(), 1, DIRECT_TOPIC, b"{}")])
    say(event="opened", pids=pids, second_check=again, appended=list(ids or []))
    app.close()
    return 0


def cmd_grow_a(args: argparse.Namespace) -> int:
    """Stay open across another process's map growth, then `args.op` and append and read."""
    app = open_app()
    recorder = recorder_of(app)
    ledger = factory_of(app).ledger
    say(event="opened", max=recorder.max_notification_id(), map_size=ledger.env.info()["map_size"])
    if sys.stdin.readline().strip() != "go":
        return 2
    result: dict[str, Any] = {"event": "result"}
    try:
        if args.op == "read":
            result["max_before_append"] = recorder.max_notification_id()
        elif args.op == "new-recorder":
            tracking = factory_of(app).tracking_recorder()
            result["tracking"] = tracking.max_tracking_id("upstream")
        originator = uuid4()
        ids = recorder.insert_events(
            [StoredEvent(originator, v, DIRECT_TOPIC, b"{}") for v in (1, 2, 3)]
        )
        result["appended"] = list(ids or [])
        last = recorder.max_notification_id() or 0
        result["ids"] = [n.id for n in recorder.select_notifications(1, last + 10)]
        result["versions"] = [s.originator_version for s in recorder.select_events(originator)]
        result["map_size"] = ledger.env.info()["map_size"]
    except Exception as e:
        result["error"] = f"{type(e).__module__}.{type(e).__name__}: {e}"
    say(**result)
    app.close()
    return 0


def cmd_append(args: argparse.Namespace) -> int:
    """Append `args.count` events of `args.size` bytes of state, one batch each."""
    app = open_app()
    recorder = recorder_of(app)
    appended = []
    for i in range(args.count):
        originator = uuid4()
        state = json.dumps({"i": i, "pad": "p" * args.size}).encode()
        ids = recorder.insert_events([StoredEvent(originator, 1, DIRECT_TOPIC, state)])
        appended.append(
            {"id": (ids or [0])[0], "originator": str(originator), "sha": digest(state)}
        )
    say(
        event="appended",
        appended=appended,
        map_size=factory_of(app).ledger.env.info()["map_size"],
    )
    app.close()
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    """Every notification: id, originator, version, topic and a digest of the state."""
    app = open_app()
    recorder = recorder_of(app)
    last = recorder.max_notification_id() or 0
    rows = [
        [n.id, str(n.originator_id), n.originator_version, n.topic, digest(n.state)]
        for n in recorder.select_notifications(1, last + 10)
    ]
    say(event="dump", max=last, rows=rows)
    app.close()
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    """Open the ledger and read its log; report the error a user would see, if any."""
    try:
        app = open_app()
        last = recorder_of(app).max_notification_id()
        app.close()
    except ImageLedgerError as e:
        say(event="error", type=type(e).__name__, message=str(e))
        return 0
    except Exception as e:
        say(event="error", type=f"{type(e).__module__}.{type(e).__name__}", message=str(e))
        return 0
    say(event="opened", max=last)
    return 0


# ---------------------------------------------------------------------------- parent side

TESTS_DIR = Path(__file__).resolve().parent
PERSISTENCE_MODULE = "imageledger.storage.ledger"
_BOOT = "import sys, _ledger_child; sys.exit(_ledger_child.main(sys.argv[1:]))"


class Child:
    """One child process running a command of this module against the ledger at `ledger`.

    `settings` are extra environment variables (``LMDB_MAP_SIZE`` and so on). Protocol messages
    are read by a thread, so the child never blocks on a full pipe; stderr goes to a file.
    """

    def __init__(self, ledger: Path, *args: str, timeout: float, **settings: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(TESTS_DIR), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
        )
        env["PERSISTENCE_MODULE"] = PERSISTENCE_MODULE
        env["LMDB_PATH"] = str(ledger)
        env.update(settings)
        self.timeout = timeout
        self.args = args
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the child)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            text=True,
        )
        self._messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            # A line cut short by SIGKILL has no newline: it was never fully reported.
            if line.startswith("@@") and line.endswith("\n"):
                self._messages.put(json.loads(line[2:]))
        self._messages.put(None)

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def expect(self, event: str) -> dict[str, Any]:
        """The next message, which must be `event`."""
        try:
            message = self._messages.get(timeout=self.timeout)
        except queue.Empty:
            msg = f"child {self.args} sent no {event!r} in {self.timeout}s:\n{self.stderr()}"
            raise AssertionError(msg) from None
        if message is None:
            self._messages.put(None)
            code = self.proc.wait(self.timeout)
            msg = f"child {self.args} exited ({code}) before {event!r}:\n{self.stderr()}"
            raise AssertionError(msg)
        assert message["event"] == event, (message, self.stderr())
        return message

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait(self) -> int:
        """Wait for a clean exit; its return code."""
        code = self.proc.wait(self.timeout)
        assert code == 0, f"child {self.args} exited with {code}:\n{self.stderr()}"
        return code

    def kill(self) -> list[dict[str, Any]]:
        """SIGKILL the child; the messages it had written before it died."""
        os.kill(self.proc.pid, signal.SIGKILL)
        code = self.proc.wait(self.timeout)
        assert code == -signal.SIGKILL, (code, self.stderr())
        self._reader.join(self.timeout)
        rest = []
        while (message := self._messages.get(timeout=self.timeout)) is not None:
            rest.append(message)
        return rest

    def close(self) -> None:
        """Kill the child if it still runs (test teardown) and release its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(self.timeout)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._stderr.close()


@contextlib.contextmanager
def opened(ledger: Path, **settings: str) -> Iterator[LMDBApplicationRecorder]:
    """The children's application recorder on `ledger`, opened in this (the parent) process."""
    env = {"PERSISTENCE_MODULE": PERSISTENCE_MODULE, "LMDB_PATH": str(ledger), **settings}
    factory = LMDBFactory(Environment(APP_NAME, env))
    try:
        recorder = factory.application_recorder()
        assert isinstance(recorder, LMDBApplicationRecorder)
        yield recorder
    finally:
        factory.close()


def log_rows(recorder: LMDBApplicationRecorder) -> dict[int, tuple[str, int, bytes]]:
    """The whole log in id order: id -> (originator, version, state)."""
    last = recorder.max_notification_id() or 0
    return {
        n.id: (str(n.originator_id), n.originator_version, n.state)
        for n in recorder.select_notifications(1, last + 100)
    }


def check_after_kill(
    recorder: LMDBApplicationRecorder,
    tag: str,
    reported: list[dict[str, Any]],
    before: dict[int, tuple[str, int, bytes]],
) -> tuple[list[str], dict[int, tuple[str, int, bytes]]]:
    """What is wrong with the ledger after an `appender` child of round `tag` was killed.

    `reported` are its ``committed`` messages, `before` the log as it was before the round.
    Returns the problems found (none is right) and the log as it is now.
    """
    problems: list[str] = []
    last = recorder.max_notification_id() or 0
    now = log_rows(recorder)
    if list(now) != list(range(1, last + 1)):
        problems.append(f"ids are not 1..{last} without gaps: {list(now)}")
    for nid, row in before.items():
        if now.get(nid) != row:
            problems.append(f"id {nid} committed before round {tag} changed")
    for message in reported:
        for nid, seq in zip(message["ids"], message["seqs"], strict=True):
            expected = kill_event(tag, message["thread"], seq)
            row = (str(expected.originator_id), expected.originator_version, expected.state)
            if now.get(nid) != row:
                problems.append(f"reported id {nid} (thread {message['thread']}, seq {seq}) lost")
    threads: dict[int, list[int]] = {}
    for nid in sorted(set(now) - set(before)):
        oid, version, state = now[nid]
        thread = json.loads(state)["thread"]
        expected = kill_event(tag, thread, version)
        if (oid, state) != (str(expected.originator_id), expected.state):
            problems.append(f"id {nid} holds an event the child never wrote")
        threads.setdefault(thread, []).append(version)
    for thread, versions in threads.items():
        if versions != list(range(1, len(versions) + 1)):
            problems.append(f"thread {thread}: versions {versions} are not 1..n in id order")
        stored = recorder.select_events(kill_originator(tag, thread))
        if [s.originator_version for s in stored] != versions:
            problems.append(f"thread {thread}: the aggregate index disagrees with the log")
    return problems, now


def main(argv: list[str]) -> int:
    configure_logging(stream=sys.stderr)
    parser = argparse.ArgumentParser(prog="_ledger_child")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("concurrent")
    p.add_argument("child", type=int)
    p.add_argument("events", type=int)
    p.add_argument("report")
    p.set_defaults(run=cmd_concurrent)
    p = commands.add_parser("appender")
    p.add_argument("tag")
    p.add_argument("threads", type=int)
    p.set_defaults(run=cmd_appender)
    p = commands.add_parser("reader")
    p.set_defaults(run=cmd_reader)
    p = commands.add_parser("raw-readers")
    p.add_argument("path")
    p.set_defaults(run=cmd_raw_readers)
    p = commands.add_parser("open-check")
    p.set_defaults(run=cmd_open_check)
    p = commands.add_parser("grow-a")
    p.add_argument("op", choices=["read", "append", "new-recorder"])
    p.set_defaults(run=cmd_grow_a)
    p = commands.add_parser("append")
    p.add_argument("count", type=int)
    p.add_argument("size", type=int)
    p.set_defaults(run=cmd_append)
    p = commands.add_parser("dump")
    p.set_defaults(run=cmd_dump)
    p = commands.add_parser("probe")
    p.set_defaults(run=cmd_probe)
    args = parser.parse_args(argv)
    return int(args.run(args))
