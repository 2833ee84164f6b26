"""The `imageledger` command line.

Exit codes (the contract scripts rely on): 0 success, 1 other failure, 2 invalid usage or
input, 3 not found, 4 in use. Errors are one line on stderr; `--json` output is only ever on
stdout, and logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from imageledger.domain.errors import ImageLedgerError
from imageledger.tools.logs import configure_logging

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def default_home() -> Path:
    """``$IMAGELEDGER_HOME``, else ``~/.local/share/imageledger``."""
    home = os.environ.get("IMAGELEDGER_HOME")
    return Path(home) if home else Path.home() / ".local" / "share" / "imageledger"


class _Counter(Aggregate):
    """The demo's aggregate: one per writer thread, one event per append."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0

    @event("Incremented")
    def increment(self, by: int) -> None:
        self.count += by


class _DemoLedger(Application[UUID]):
    name = "demo"


def _demo(args: argparse.Namespace) -> int:
    """Append from several threads, follow the log live, reopen and check it is gapless."""
    workdir = Path(tempfile.mkdtemp(prefix="imageledger-demo-")) if args.home is None else None
    ledger = (workdir or Path(args.home)) / "ledger"
    env = {"PERSISTENCE_MODULE": "imageledger.storage.ledger", "LMDB_PATH": str(ledger)}
    try:
        app = _DemoLedger(env=env)
        start = app.recorder.max_notification_id() or 0
        seen: list[int] = []
        total = args.threads * args.appends
        followed = threading.Event()

        def follow() -> None:
            with app.recorder.subscribe(gt=start) as subscription:
                for notification in subscription:
                    seen.append(notification.id)
                    if len(seen) == total + args.threads:
                        followed.set()
                        return

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()

        def write(n: int) -> None:
            counter = _Counter(f"writer-{n}")
            for i in range(args.appends):
                counter.increment(i)
                app.save(counter)

        began = time.perf_counter()
        writers = [threading.Thread(target=write, args=(n,)) for n in range(args.threads)]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
        elapsed = time.perf_counter() - began
        followed.wait(timeout=30)
        app.close()

        reopened = _DemoLedger(env=env)
        last = reopened.recorder.max_notification_id() or 0
        ids = [n.id for n in reopened.recorder.select_notifications(start + 1, limit=last)]
        reopened.close()
        report: dict[str, Any] = {
            "ledger": str(ledger),
            "writer_threads": args.threads,
            "events_appended": total + args.threads,
            "seconds": round(elapsed, 3),
            "durable_appends_per_second": round((total + args.threads) / elapsed),
            "followed_live": len(seen),
            "gapless_after_reopen": ids == list(range(start + 1, last + 1)),
            "last_notification_id": last,
        }
        if args.json:
            print(json.dumps(report, sort_keys=True))
        else:
            for key, value in report.items():
                print(f"{key:28} {value}")
        ok = report["gapless_after_reopen"] and report["followed_live"] == total + args.threads
        return EXIT_OK if ok else EXIT_FAILURE
    finally:
        if workdir is not None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _bench_ledger(args: argparse.Namespace) -> int:
    from imageledger.tools import bench_ledger

    return bench_ledger.main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imageledger", description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=None, help="cache home (default $IMAGELEDGER_HOME)")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="append to a ledger from many threads, follow it")
    demo.add_argument("--threads", type=int, default=8)
    demo.add_argument("--appends", type=int, default=250, help="appends per thread")
    demo.add_argument("--keep", action="store_true", help="keep the temporary ledger")
    demo.add_argument("--json", action="store_true")
    demo.set_defaults(run=_demo)

    bench = commands.add_parser("bench-ledger", help="durable append benchmark vs SQLite")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(run=_bench_ledger)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) and EXIT_USAGE
    try:
        return int(args.run(args))
    except ImageLedgerError as e:
        print(f"imageledger: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
