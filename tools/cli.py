"""The `imageledger` command line: the contract other programs script against.

``imageledger [--home DIR] COMMAND``; ``$IMAGELEDGER_HOME`` is the default home.

Exit codes: 0 success, 1 other failure, 2 invalid usage or input (a malformed reference, a
hostile archive, a path that cannot be a home or an output), 3 not found (an image, or the
home itself for a command that only reads), 4 in use, 5 damaged (the ledger or the home holds
something imageledger did not write: it is named, never obeyed). Errors are one line on
stderr; `--json` output is only ever on stdout; logs go to stderr (JSON lines when stderr is
not a terminal).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn

from imageledger.tools import human
from imageledger.tools.logs import configure_logging_on_first_line, printable

if TYPE_CHECKING:
    # Imported where they are used instead: loading the package's modules is most of what a
    # short command costs (see the `imageledger` package docstring), and a command loads
    # only what it runs.
    from imageledger import (
        ImageCache,
        ImageDetail,
        ImageHandle,
        ImagePruneReport,
        MaterializedImage,
    )

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_IN_USE = 4
EXIT_DAMAGED = 5

_DURATION = re.compile(r"(?P<n>[0-9]+)(?P<unit>[smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# A prune's --unused-for beyond a century is a typo, not a policy: refused, not overflowed.
MAX_DURATION_SECONDS: Final = 100 * 365 * 86400
MAX_BYTE_DIGITS: Final = 19  # 10**19 bytes is ten exabytes; longer digit strings are refused
# Error messages echo what they are about; past these sizes the echo is cut (a hostile value
# must not become megabytes on stderr), keeping the start and the end, which says what failed.
MESSAGE_LIMIT: Final = 1000
VALUE_LIMIT: Final = 200


class UsageError(Exception):
    """Bad command-line input (exit 2)."""


def one_line(message: str, limit: int = MESSAGE_LIMIT) -> str:
    """An error message made safe for stderr: one line, no control characters (see
    `printable`), at most `limit` characters. A longer one keeps its first two thirds and its
    last third around a note of its full length: the value an error quotes is usually in the
    middle, the reason at the end. Idempotent, so applying it twice is harmless."""
    if len(message) <= limit:
        text = printable(message)
        if len(text) <= limit:
            return text
    note = f"...[cut: {len(message)} characters in all]..."
    room = max(limit - len(note), 0)
    keep_head, keep_tail = room * 2 // 3, room - room * 2 // 3
    # Cut before escaping, so that a 3 MB message is never escaped whole.
    head = printable(message[:keep_head])[:keep_head]
    tail = printable(message[len(message) - keep_tail :])[-keep_tail:] if keep_tail else ""
    return f"{head}{note}{tail}"


def quoted(value: str, limit: int = VALUE_LIMIT) -> str:
    """A user- or remote-provided `value` quoted for a message: ``repr``-escaped, and when
    longer than `limit` characters cut there with an ellipsis and its full length
    (``'aaaa...' (3000000 characters)``)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def rfc3339(at: datetime | None) -> str | None:
    """UTC RFC 3339 with a Z, or None."""
    return None if at is None else at.isoformat().replace("+00:00", "Z")


def duration(text: str) -> int:
    """``90``, ``90s``, ``30m``, ``12h``, ``7d``, ``2w`` (and sums like ``1h30m``) in seconds,
    ASCII digits only, at most 100 years: a longer one is a typo (``800000d``) and, past the
    calendar, an OverflowError; thousands of digits are refused before `int` sees them (its
    own digit limit raises a foreign ValueError)."""
    total, pos = 0, 0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        digits = match["n"].lstrip("0")
        if len(digits) > len(str(MAX_DURATION_SECONDS)):
            total = MAX_DURATION_SECONDS + 1
        else:
            total += int(digits or "0") * _UNITS[match["unit"]]
        pos = match.end()
    if pos != len(text) or not text:
        msg = f"invalid duration {quoted(text)}: use e.g. 90s, 30m, 12h, 7d"
        raise argparse.ArgumentTypeError(msg)
    if total > MAX_DURATION_SECONDS:
        msg = (
            f"invalid duration {quoted(text)}: at most 100 years ({MAX_DURATION_SECONDS // 86400}d)"
        )
        raise argparse.ArgumentTypeError(msg)
    return total


def positive_duration(text: str) -> int:
    """A `duration` that is not zero (a timeout of nothing would fail every pull)."""
    seconds = duration(text)
    if seconds <= 0:
        msg = f"invalid duration {quoted(text)}: must be more than zero"
        raise argparse.ArgumentTypeError(msg)
    return seconds


def positive_int(text: str) -> int:
    """A position or a tree size: a `non_negative` count that is not zero."""
    value = non_negative(text)
    if value == 0:
        msg = f"invalid number {quoted(text)}: must be 1 or more"
        raise argparse.ArgumentTypeError(msg)
    return value


def non_negative(text: str) -> int:
    """A count of bytes: a non-negative integer in ASCII digits, at most 19 of them (more is
    a typo, and thousands would hit `int`'s own digit limit with a foreign message)."""
    digits = text.lstrip("0") if text.isascii() and text.isdigit() else None
    if digits is None:
        msg = f"invalid byte count {quoted(text)}: a non-negative integer"
        raise argparse.ArgumentTypeError(msg)
    if len(digits) > MAX_BYTE_DIGITS:
        msg = f"invalid byte count {quoted(text)}: more than {MAX_BYTE_DIGITS} digits"
        raise argparse.ArgumentTypeError(msg)
    return int(digits or "0")


def handle_json(handle: ImageHandle) -> dict[str, Any]:
    return {
        "reference": handle.reference,
        "manifest_digest": handle.manifest_digest,
        "architecture": handle.architecture,
        "os": handle.os,
        "layer_count": handle.layer_count,
        "size_bytes": handle.size_bytes,
        "created_at": rfc3339(handle.created_at),
        "last_used_at": rfc3339(handle.last_used_at),
    }


def detail_json(detail: ImageDetail[ImageHandle]) -> dict[str, Any]:
    config = detail.config
    return {
        **handle_json(detail.handle),
        "config": {
            "digest": config.digest,
            "env": list(config.env),
            "cmd": None if config.cmd is None else list(config.cmd),
            "entrypoint": None if config.entrypoint is None else list(config.entrypoint),
            "working_dir": config.working_dir,
            "user": config.user,
            "labels": dict(config.labels),
            "stop_signal": config.stop_signal,
        },
        "layers": [asdict(layer) for layer in detail.layers],
        # Where a registry pull of it came from; absent for a loaded or tagged name.
        **({"endpoints": [e.as_json() for e in detail.endpoints]} if detail.endpoints else {}),
    }


def report_json(report: ImagePruneReport) -> dict[str, Any]:
    return {
        "image_refs_removed": report.image_refs_removed,
        "manifests_removed": report.manifests_removed,
        "layers_removed": report.layers_removed,
        "fsmeta_removed": report.fsmeta_removed,
        "vmdk_removed": report.vmdk_removed,
        "bytes_reclaimed": report.bytes_reclaimed,
        "dry_run": report.dry_run,
        "removed": [
            {"kind": "reference", "name": r.reference, "reason": r.reason}
            for r in report.references
        ]
        + [
            {"kind": b.kind, "name": b.digest, "size_bytes": b.size, "reason": b.reason}
            for b in report.deleted
        ],
        "unmatched_keep": list(report.unmatched_keep),
    }


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


Scalar = str | int | float | bool | None

# What json.dumps(indent=2) puts between the members of an object nested in a list, and
# between two such objects.
_MEMBERS: Final = ",\n    "
_BETWEEN_ROWS: Final = "\n  },\n  {\n    "


def rows_json(rows: Sequence[Mapping[str, Scalar]]) -> str:
    """Exactly ``json.dumps(rows, indent=2)`` for a list of non-empty objects of scalars
    (what `images --json` prints), about four times faster: with `indent`, the standard
    library encodes in Python, value by value (~150 ms for 10,000 handles); without it, in C.
    So the rows are encoded in C with the indented object's member separator, and only the
    seams between rows are rewritten: ``},`` + separator + ``{`` occurs nowhere else, because
    a member is followed by a quoted key, never by ``{``, and an encoded string never holds a
    raw newline. tests/test_cli_json.py checks the equality on arbitrary rows."""
    if not rows:
        return "[]"
    flat = json.dumps(rows, separators=(_MEMBERS, ": "))
    return "[\n  {\n    " + flat[2:-2].replace("}" + _MEMBERS + "{", _BETWEEN_ROWS) + "\n  }\n]"


def _say(text: str) -> None:
    """Print one human-readable line, control characters escaped (see `printable`)."""
    print(printable(text))


def _table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> None:
    """Aligned columns; every cell escaped (see `printable`) before widths are measured."""
    cells = [list(map(str, header))] + [
        [("" if v is None else printable(str(v))) for v in r] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


# ----------------------------------------------------------------------- commands


def cmd_images(cache: ImageCache, args: argparse.Namespace) -> int:
    handles = cache.list(**image_filters(args.filter))
    if args.quiet:
        for h in handles:
            _say(h.reference)
        return EXIT_OK
    if args.json:
        print(rows_json([handle_json(h) for h in handles]))
        return EXIT_OK
    now = datetime.now(UTC)
    exact = args.no_trunc
    _table(
        [
            (
                h.reference,
                h.manifest_digest if exact else human.short_digest(h.manifest_digest),
                f"{h.os}/{h.architecture}",
                h.layer_count,
                h.size_bytes if exact else human.size(h.size_bytes),
                rfc3339(h.created_at) if exact else human.age(h.created_at, now),
                rfc3339(h.last_used_at) if exact else human.age(h.last_used_at, now),
            )
            for h in handles
        ],
        ("REFERENCE", "MANIFEST", "PLATFORM", "LAYERS", "SIZE", "CREATED", "LAST USED"),
    )
    return EXIT_OK


def image_filters(given: Sequence[str]) -> dict[str, Any]:
    """``--filter KEY=VALUE`` options as `ImageCache.list`'s keywords, by Docker's names
    (reference, dangling, before, since, label; see `imageledger.domain.filters`). A filter
    that is not KEY=VALUE, an unknown key, or a `dangling` that is not true/false/1/0 (or is
    both) is `UsageError` (exit 2), one line naming it."""
    values: dict[str, list[str]] = {}
    for text in given:
        key, equals, value = text.partition("=")
        if not equals or not key:
            msg = f"bad format of filter {quoted(text)} (expected name=value)"
            raise UsageError(msg)
        if key not in _FILTER_NAMES:
            msg = f"invalid filter {quoted(key)}: use one of {', '.join(_FILTER_NAMES)}"
            raise UsageError(msg)
        values.setdefault(key, []).append(value)
    keywords: dict[str, Any] = {k: v for k, v in values.items() if k != "dangling"}
    if "dangling" in values:
        truth = {v.lower() for v in values["dangling"]}
        yes, no = bool(truth & {"true", "1"}), bool(truth & {"false", "0"})
        if yes == no or truth - {"true", "1", "false", "0"}:
            shown = ", ".join(quoted(v) for v in values["dangling"])
            msg = f"invalid filter dangling={shown}: give dangling=true or dangling=false"
            raise UsageError(msg)
        keywords["dangling"] = yes
    return keywords


# `ListFilters`' keys (imageledger.domain.filters: the command line does not import the domain).
_FILTER_NAMES: Final = ("reference", "dangling", "before", "since", "label")


def cmd_inspect(cache: ImageCache, args: argparse.Namespace) -> int:
    # JSON with or without --json, as `docker image inspect` prints (--json is accepted, as on
    # every command a program reads).
    _print_json(detail_json(cache.inspect(args.reference)))
    return EXIT_OK


def cmd_load(cache: ImageCache, args: argparse.Namespace) -> int:
    source: Any = sys.stdin.buffer if args.path == "-" else Path(args.path)
    handles = cache.load(source, tag=args.tag, platform=args.platform, materialize=args.materialize)
    if args.json:
        _print_json([handle_json(h) for h in handles])
    else:
        for h in handles:
            _say(f"Loaded {h.reference} ({human.short_digest(h.manifest_digest)})")
            if args.materialize:
                _say(f"Materialized {h.reference}")
    return EXIT_OK


def materialized_json(image: MaterializedImage) -> dict[str, Any]:
    """`materialize --json`: paths absolute, layers bottom to top."""
    return {
        "reference": image.reference,
        "vmdk": image.vmdk,
        "fsmeta": image.fsmeta,
        "layers": [
            {"diff_id": x.diff_id, "path": x.path, "erofs_size_bytes": x.erofs_size_bytes}
            for x in image.layers
        ],
    }


def cmd_materialize(cache: ImageCache, args: argparse.Namespace) -> int:
    image = cache.materialize(args.reference)
    if args.json:
        _print_json(materialized_json(image))
    else:
        _say_materialized(image)
    return EXIT_OK


def _say_materialized(image: MaterializedImage) -> None:
    _say(
        f"Materialized {image.reference} ({len(image.layers)} layers, "
        f"{image.written} files written): {image.vmdk}"
    )


def cmd_pull(cache: ImageCache, args: argparse.Namespace) -> int:
    from imageledger import options_from_environment

    options = options_from_environment(
        insecure=args.insecure_registry,
        ca_bundle=Path(args.ca_bundle) if args.ca_bundle else None,
        timeout=args.timeout,
        deadline=args.deadline,
        registries_conf=args.registries_conf,
    )
    if args.quiet and args.json:
        raise UsageError("pull: --quiet and --json each choose the output: give one")
    # docker pull's display on a terminal; off one (or for --json, --quiet), logs only.
    draw = not (args.json or args.quiet) and sys.stdout.isatty()
    if draw:
        # The reference is not parsed yet: escaped and cut before it reaches the terminal.
        _say(f"Pulling {one_line(args.reference, 200)}")
    from imageledger.tools.progress import PullDisplay  # not for a query

    with PullDisplay(sys.stdout, draw=draw) as display:
        handle = cache.pull(
            args.reference, platform=args.platform, options=options, progress=display
        )
    if args.quiet:
        _say(handle.reference)  # only the reference, as docker pull --quiet prints it
        return EXIT_OK
    image = cache.materialize(handle.reference) if args.materialize else None
    if args.json:
        shown = handle_json(handle)
        if image is not None:
            shown["materialized"] = materialized_json(image)
        _print_json(shown)
    else:
        _say(
            f"Pulled {handle.reference} ({human.short_digest(handle.manifest_digest)}, "
            f"{handle.os}/{handle.architecture}, {handle.size_bytes} bytes)"
        )
        if image is not None:
            _say_materialized(image)
    return EXIT_OK


def cmd_save(cache: ImageCache, args: argparse.Namespace) -> int:
    destination: Any = sys.stdout.buffer if args.output == "-" else Path(args.output)
    cache.save(args.references, destination, format=args.format)
    return EXIT_OK


def cmd_tag(cache: ImageCache, args: argparse.Namespace) -> int:
    handle = cache.tag(args.reference, args.target)
    if args.json:
        _print_json(handle_json(handle))
    return EXIT_OK


def cmd_completion(cache: None, args: argparse.Namespace) -> int:
    from imageledger.tools import completion

    parser = build_parser()
    sys.stdout.write(completion.bash(parser) if args.shell == "bash" else completion.zsh(parser))
    return EXIT_OK


def cmd_use(cache: ImageCache, args: argparse.Namespace) -> int:
    handle = cache.use(args.reference, args.holder)
    if args.json:
        _print_json(handle_json(handle))
    else:
        _say(f"{args.holder} uses {handle.reference}")
    return EXIT_OK


def cmd_release(cache: ImageCache, args: argparse.Namespace) -> int:
    count = cache.release(args.holder)
    if args.json:
        _print_json({"holder": args.holder, "leases_released": count})
    else:
        _say(f"{args.holder}: released {count} lease(s)")
    return EXIT_OK


def cmd_rm(cache: ImageCache, args: argparse.Namespace) -> int:
    from imageledger import ImageLedgerError

    removed: list[str] = []
    try:
        for reference in args.references:
            cache.remove(reference, force=args.force)
            removed.append(reference)
            if not args.json:
                _say(f"Removed {reference}")
    except ImageLedgerError:
        # A later one failed (exit 3 or 4): still say, as JSON, which ones were removed.
        if args.json and removed:
            _print_json({"removed": removed})
        raise
    if args.json:
        _print_json({"removed": removed})
    return EXIT_OK


def cmd_prune(cache: ImageCache, args: argparse.Namespace) -> int:
    report = cache.prune(
        dry_run=args.dry_run, unused_for=args.unused_for, keep=args.keep, max_bytes=args.max_bytes
    )
    for pattern in report.unmatched_keep:
        # After the prune (the library decides), but on stderr either way: a keep rule that
        # protected nothing is most likely a typo, and what it meant to keep may be gone.
        print(
            f"imageledger: warning: --keep {one_line(quoted(pattern))} matched no image",
            file=sys.stderr,
        )
    if args.json:
        _print_json(report_json(report))
        return EXIT_OK
    _say_report(report)
    return EXIT_OK


def _say_report(report: ImagePruneReport) -> None:
    """What a prune or a gc removed (or would), line by line, then the totals."""
    verb = "Would remove" if report.dry_run else "Removed"
    for r in report.references:
        _say(f"{verb} {r.reference} ({r.reason})")
    for b in report.deleted:
        _say(f"{verb} {b.kind} {b.digest} ({b.size} bytes, {b.reason})")
    _say(
        f"{report.image_refs_removed} references, {report.manifests_removed} manifests, "
        f"{report.layers_removed} layers; {report.bytes_reclaimed} bytes "
        + ("reclaimable" if report.dry_run else "reclaimed")
    )


def cmd_gc(cache: ImageCache, args: argparse.Namespace) -> int:
    report = cache.gc(
        high_threshold=args.high_threshold,
        low_threshold=args.low_threshold,
        min_age=args.min_age,
        max_age=args.max_age,
        dry_run=args.dry_run,
    )
    if args.json:
        gc = None if report.gc is None else report.gc.as_json()
        _print_json({**report_json(report), "gc": gc})
        return EXIT_OK
    if report.gc is not None:
        _say(report.gc.describe())
    _say_report(report)
    return EXIT_OK


def percentage(text: str) -> int:
    """A whole percentage, 0 to 100 (a gc threshold, as kubelet takes it)."""
    if not (text.isascii() and text.isdigit()) or len(text) > 3 or int(text) > 100:
        msg = f"invalid percentage {quoted(text)}: a whole number from 0 to 100"
        raise argparse.ArgumentTypeError(msg)
    return int(text)


def cmd_history(cache: ImageCache, args: argparse.Namespace) -> int:
    entries = cache.history(args.reference)
    if args.json:
        _print_json(
            [
                {
                    "position": e.position,
                    "event": e.event,
                    "at": rfc3339(e.at),
                    "reference": e.reference or None,
                    "manifest_digest": e.manifest_digest or None,
                    "detail": e.detail or None,
                    "user": e.user,
                    "host": e.host,
                    "pid": e.pid,
                }
                for e in entries
            ]
        )
        return EXIT_OK
    now = datetime.now(UTC)
    exact = args.no_trunc
    _table(
        [
            (
                e.position,
                rfc3339(e.at) if exact else human.age(e.at, now),
                e.event,
                e.reference,
                e.manifest_digest if exact else human.short_digest(e.manifest_digest),
                e.detail,
                f"{e.user}@{e.host}",
            )
            for e in entries
        ],
        ("POS", "AT", "EVENT", "REFERENCE", "MANIFEST", "DETAIL", "BY"),
    )
    return EXIT_OK


def cmd_rebuild(cache: ImageCache, args: argparse.Namespace) -> int:
    from imageledger.tools.progress import Progress  # not for a query

    with Progress("rebuild", unit="events") as progress:
        report = cache.rebuild(verify=args.verify, progress=progress.update)
    result = {
        "events": report.events,
        "verified": args.verify,
        "identical": report.identical,
        "tables": {
            t: {"live": live, "rebuilt": rebuilt} for t, (live, rebuilt) in report.tables.items()
        },
    }
    if args.json:
        _print_json(result)
    else:
        what = "verified" if args.verify else "rebuilt"
        state = "identical to" if report.identical else "DIFFERENT from"
        _say(f"{what} {report.events} events; rebuilt views are {state} the live views")
    return EXIT_OK if report.identical else EXIT_FAILURE


def cmd_audit_key(cache: ImageCache, args: argparse.Namespace) -> int:
    key = cache.audit.verifier_key()
    if args.json:
        _print_json({"verifier_key": key})
    else:
        print(key)
    return EXIT_OK


def cmd_audit_checkpoint(cache: ImageCache, args: argparse.Namespace) -> int:
    signed = cache.audit.checkpoint()
    if args.json:
        _print_json(
            {
                "origin": signed.origin,
                "size": signed.size,
                "root_hash": signed.root.hex(),
                "new": signed.new,
                "note": signed.note,
            }
        )
    else:
        sys.stdout.write(signed.note)
    return EXIT_OK


def cmd_audit_verify(cache: ImageCache, args: argparse.Namespace) -> int:
    from imageledger.tools.progress import Progress  # not for a query

    with Progress("audit verify", unit="events"):
        report = cache.audit.verify(args.key)
    if args.json:
        _print_json(
            {
                "verified": True,
                "origin": report.origin,
                "events": report.events,
                "root_hash": report.root.hex(),
                "checkpoints": report.checkpoints,
                "verifier_key": report.key,
            }
        )
    else:
        _say(
            f"verified {report.events} events and {report.checkpoints} signed checkpoints"
            + (f" of {report.origin}" if report.origin else "")
        )
    return EXIT_OK


def cmd_audit_export(cache: ImageCache, args: argparse.Namespace) -> int:
    if bool(args.jsonl) == bool(args.tiles):
        raise UsageError("give either --jsonl (to stdout) or --tiles DIR")
    if args.jsonl:
        cache.audit.export_jsonl(sys.stdout.write, args.first or 1, args.last)
        return EXIT_OK
    if args.first or args.last:
        raise UsageError("--from and --to go with --jsonl; --tiles exports the whole log")
    signed, files = cache.audit.export_tiles(args.tiles)
    if args.json:
        _print_json({"directory": args.tiles, "size": signed.size, "files": files})
    else:
        _say(f"exported {signed.size} events to {args.tiles} ({files} files written)")
    return EXIT_OK


def cmd_audit_report(cache: ImageCache, args: argparse.Namespace) -> int:
    from imageledger import REPORT_COLUMNS, canonical

    reference = canonical(args.ref) if args.ref else None
    rows = cache.audit.report(since=args.since, until=args.until, reference=reference)
    if args.csv:
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(REPORT_COLUMNS)
        for row in rows:
            writer.writerow([row[c] for c in REPORT_COLUMNS])
    elif args.json:
        # An array written row by row: a long log is never held whole.
        sys.stdout.write("[")
        for i, row in enumerate(rows):
            sys.stdout.write(("," if i else "") + "\n  " + json.dumps(row))
        sys.stdout.write("\n]\n")
    else:
        table = [
            [
                row["at"],
                row["action"],
                row["reference"],
                row["holder"] or row["source"],
                row["outcome"],
                f"{row['user']}@{row['host']}",
            ]
            for row in rows
        ]
        _table(table, ["AT", "ACTION", "REFERENCE", "HOLDER/SOURCE", "OUTCOME", "BY"])
    return EXIT_OK


def instant(text: str) -> datetime:
    """An instant on the command line: ISO 8601 (``2026-12-05``, ``2026-12-05T03:12:00Z``,
    ``2026-12-05T03:12:00+01:00``); one without an offset is UTC."""
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        msg = f"invalid time {quoted(text)}: ISO 8601, e.g. 2026-12-05T03:12:00Z"
        raise argparse.ArgumentTypeError(msg) from None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def cmd_login(cache: None, args: argparse.Namespace) -> int:
    """Check the credentials against the registry, then store them (containers-auth.json):
    the password from stdin (``--password-stdin``) or a prompt that does not echo it."""
    import getpass

    from imageledger import login

    user = args.username
    if not user:
        if not sys.stdin.isatty():
            raise UsageError("login: give the user with -u USER (stdin is not a terminal)")
        user = input("Username: ").strip()
    if args.password_stdin:
        password = sys.stdin.read()
        password = password[:-1] if password.endswith("\n") else password
        password = password[:-1] if password.endswith("\r") else password
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
    else:
        raise UsageError("login: stdin is not a terminal: give the password with --password-stdin")
    if not password:
        raise UsageError("login: the password is empty")
    path, checked = login(
        args.registry,
        user,
        password,
        auth_file=args.authfile,
        insecure=args.insecure_registry,
        ca_bundle=Path(args.ca_bundle) if args.ca_bundle else None,
        registries_conf=args.registries_conf,
    )
    del password
    if not checked:
        print(
            f"imageledger: warning: {one_line(args.registry)} asked for no credentials: they"
            " were stored unchecked",
            file=sys.stderr,
        )
    if args.json:
        _print_json({"registry": args.registry, "auth_file": str(path), "checked": checked})
    else:
        _say(f"Login Succeeded! (credentials stored in {one_line(str(path))})")
    return EXIT_OK


def cmd_logout(cache: None, args: argparse.Namespace) -> int:
    from imageledger import logout

    if args.all == (args.registry is not None):
        raise UsageError("logout: give a REGISTRY or --all (not both)")
    path, removed = logout(args.registry, auth_file=args.authfile)
    if not removed and not args.all:
        where = one_line(f"{args.registry} (no credentials for it in {path})")
        print(f"imageledger: not logged in to {where}", file=sys.stderr)
        return EXIT_NOT_FOUND
    if args.json:
        _print_json({"auth_file": str(path), "removed": removed})
    else:
        for key in removed:
            _say(f"Removed login credentials for {one_line(key)}")
    return EXIT_OK


def cmd_audit_verify_export(cache: None, args: argparse.Namespace) -> int:
    from imageledger import verify_export

    checked = verify_export(args.path, args.key)
    if args.json:
        _print_json(
            {
                "verified": True,
                "origin": checked.origin,
                "first": checked.first,
                "last": checked.last,
                "size": checked.size,
                "root_hash": checked.root.hex(),
            }
        )
    else:
        _say(
            f"verified events {checked.first} to {checked.last} of {checked.origin} under its "
            f"checkpoint at size {checked.size}"
        )
    return EXIT_OK


def cmd_events(cache: ImageCache, args: argparse.Namespace) -> int:
    from imageledger import canonical

    filters: dict[str, Any] = {
        "types": frozenset(args.type),
        "reference": canonical(args.ref) if args.ref else None,
        "holder": args.holder,
        "actor": args.actor,
        "since": args.since,
        "until": args.until,
    }
    last = args.first - 1 if args.first else 0
    while True:
        # The end is read once per pass and the pass lists up to it, so that an event
        # appended while the pass prints is listed by the next one, never skipped.
        end = cache.audit.head() if args.last is None else min(args.last, cache.audit.head())
        events = cache.audit.events(first=last + 1, last=end, **filters)
        if args.json:
            _write_json_lines(events)
        else:
            for event in events:
                sys.stdout.write(_event_line(event) + "\n")
        sys.stdout.flush()
        last = max(last, end)
        if not args.follow or (args.last is not None and last >= args.last):
            return EXIT_OK
        time.sleep(FOLLOW_POLL)


FOLLOW_POLL: Final = 0.05
"""Seconds between two looks at the ledger with ``events --follow`` (the ledger's own poll
interval for other processes' commits)."""


def _write_json_lines(objects: Iterable[dict[str, Any]]) -> None:
    """One JSON object a line, keys sorted, written in chunks: msgspec's encoder, because
    the standard library's took 10 us of an event's 20 (issue 12's goal: 100,000 a second)."""
    import msgspec

    encode = msgspec.json.Encoder(order="sorted").encode
    sys.stdout.flush()
    out = sys.stdout.buffer
    chunk: list[bytes] = []
    for obj in objects:
        chunk.append(encode(obj))
        if len(chunk) == 512:
            out.write(b"\n".join(chunk) + b"\n")
            chunk = []
    if chunk:
        out.write(b"\n".join(chunk) + b"\n")
    out.flush()


def _event_line(event: dict[str, Any]) -> str:
    subject = event.get("reference") or event.get("holder") or ""
    detail = event.get("source") or event.get("error") or ""
    actor = event["actor"]
    fields = (
        str(event["position"]),
        event["at"],
        event["type"],
        subject,
        detail,
        f"{actor['user']}@{actor['host']}",
    )
    return "  ".join(printable(str(f)) for f in fields if f != "")


def cmd_explain(cache: ImageCache, args: argparse.Namespace) -> int:
    why = cache.explain(args.reference, args.when)
    if args.json:
        _print_json(why)
        return EXIT_OK
    if why["present"]:
        made = why["made_by"]
        verb = "tagged" if made["event"] == "ImageTagged" else "pulled"
        _say(
            f"{why['reference']} is cached (as of position {why['as_of']}): {verb} at position "
            f"{made['position']} ({made['at']}) by {made['user']}@{made['host']} from "
            f"{made['source']}"
        )
        for lease in why["leases"]:
            _say(f"  leased by {lease['holder']}")
        for other in why["other_references"]:
            _say(f"  its content is also named {other}")
        return EXIT_OK
    gone = why["removed_by"]
    _say(
        f"{why['reference']} is gone (as of position {why['as_of']}): {gone['event']} at "
        f"position {gone['position']} ({gone['at']}) by {gone['user']}@{gone['host']}"
    )
    if "reason" in gone:
        _say(f"  reason: {gone['reason']}")
    elif gone.get("forced"):
        _say("  forced")
    holders = ", ".join(why["holders_then"]) or "none"
    _say(f"  holders of its manifest just before: {holders}")
    return EXIT_OK


def cmd_diff(cache: ImageCache, args: argparse.Namespace) -> int:
    change = cache.diff(args.first, args.second)
    if args.json:
        _print_json(change)
        return EXIT_OK
    _say(f"from position {change['from']} to {change['to']}:")
    for key, sign in (("added", "+"), ("removed", "-")):
        for item in change[key]:
            _say(f"  {sign} {item['reference']} ({item['manifest_digest'][:19]})")
    for item in change["retagged"]:
        _say(f"  ~ {item['reference']} {item['from_digest'][:19]} -> {item['to_digest'][:19]}")
    for key, word in (("leases_taken", "leased"), ("leases_released", "released")):
        for item in change[key]:
            _say(f"  {word}: {item['holder']} on {item['reference']}")
    _say(f"  bytes gained {change['bytes_gained']}, reclaimed {change['bytes_reclaimed']}")
    return EXIT_OK


def position_or_time(text: str) -> int | datetime:
    """``--at``: a ledger position (digits) or an instant (`instant`)."""
    if text.isascii() and text.isdigit():
        return non_negative(text)
    return instant(text)


def cmd_audit_prove(cache: ImageCache, args: argparse.Namespace) -> int:
    if args.event is not None:
        if args.first is not None or args.second is not None:
            raise UsageError("give either --event [--size] or --from [--to]")
        proof = cache.audit.prove_inclusion(args.event, args.size)
    elif args.first is not None:
        if args.size is not None:
            raise UsageError("--size goes with --event; --to gives the second size")
        proof = cache.audit.prove_consistency(args.first, args.second)
    else:
        raise UsageError("give --event N (inclusion) or --from S1 (consistency)")
    _print_json(proof)
    return EXIT_OK


def cmd_migrate(cache: ImageCache | None, args: argparse.Namespace) -> int:
    from imageledger import default_home, migrate

    home = args.home if args.home is not None else default_home()
    from imageledger.tools.progress import Progress  # not for a query

    with Progress("migrate", unit="events") as progress:
        report = migrate(home, progress=progress.update)
    if args.json:
        _print_json(
            {
                "migrated": report.migrated,
                "events": report.events,
                "from_format": report.from_format,
                "to_format": report.to_format,
            }
        )
    elif report.migrated:
        _say(f"migrated {report.events} events from format {report.from_format} to format 2")
    else:
        _say("the ledger is already in format 2: nothing to migrate")
    return EXIT_OK


def cmd_debug_bundle(cache: ImageCache, args: argparse.Namespace) -> int:
    manifest = cache.debug_bundle(args.out)
    if args.json:
        _print_json(manifest)
    else:
        _say(f"wrote {args.out}: {manifest['events']} events, the views' digests, versions")
    return EXIT_OK


def cmd_replay_bundle(cache: ImageCache | None, args: argparse.Namespace) -> int:
    from imageledger import default_home, replay_bundle

    home = args.home if args.home is not None else default_home()
    from imageledger.tools.progress import Progress  # not for a query

    with Progress("replay", unit="events") as progress:
        manifest = replay_bundle(args.bundle, home, progress.update)
    if args.json:
        _print_json({"home": str(home), **manifest})
    else:
        made = manifest.get("created_at", "?")
        _say(f"replayed {manifest['events']} events of a bundle made {made} into {home}")
        if manifest["views_differ"]:
            tables = ", ".join(manifest["views_differ"])
            _say(f"its views differed from a replay of its log: {tables}")
    return EXIT_OK


def cmd_verify(cache: ImageCache, args: argparse.Namespace) -> int:
    from imageledger.tools.progress import Progress  # not for a query

    with Progress("verify", unit="bytes") as progress:
        check = cache.verify(repair=args.repair, progress=progress.update, ledger=False)
    if args.json:
        _print_json(
            {
                "blobs_checked": check.blobs_checked,
                "bytes_checked": check.bytes_checked,
                "artifacts_checked": check.artifacts_checked,
                "ok": check.ok,
                "problems": [asdict(problem) for problem in check.problems],
            }
        )
    else:
        for p in check.problems:
            needed = ", ".join(p.references) or "no reference"
            again = "materialize" if p.kind in ("artifact", "fsmeta", "vmdk") else "pull or load"
            action = f"deleted: {again} those again" if p.repaired else "kept"
            print(f"{p.problem} {p.kind} {p.digest} (needed by {needed}); {action}")
        state = "all intact" if check.ok else f"{len(check.problems)} damaged"
        artifacts = f" and {check.artifacts_checked} artifacts" if check.artifacts_checked else ""
        print(
            f"checked {check.blobs_checked} blobs ({check.bytes_checked} bytes){artifacts}: {state}"
        )
    return EXIT_OK if check.ok else EXIT_FAILURE


def cmd_df(cache: ImageCache, args: argparse.Namespace) -> int:
    usage = cache.df()
    if args.json:
        _print_json(usage)
    else:
        shown: Callable[[int], object] = (lambda n: n) if args.no_trunc else human.size
        for kind, size in sorted(usage["bytes"].items()):
            _say(f"{kind:10} {shown(size)}")
        print(f"{'total':10} {shown(usage['total_bytes'])}")
        print(f"{'reclaimable':10} {shown(usage['reclaimable_bytes'])}")
        ledger = usage["ledger"]
        print(f"{'ledger log':10} {shown(ledger['log_bytes'])}")
        share = f"{ledger['checkpoint_share']:.0%} of the log"
        print(f"{'checkpoints':10} {shown(ledger['checkpoint_bytes'])} ({share}: `--at` replays)")
    return EXIT_OK


def cmd_demo(cache: ImageCache | None, args: argparse.Namespace) -> int:
    from imageledger.tools.demo import run_demo

    return run_demo(args.home, keep=args.keep)


def cmd_bench(cache: ImageCache | None, args: argparse.Namespace) -> int:
    from imageledger.tools import (
        bench_audit,
        bench_cache,
        bench_cli,
        bench_erofs,
        bench_ledger,
        bench_pull,
        bench_timetravel,
    )

    benches = {
        "audit": bench_audit.main,
        "erofs": bench_erofs.main,
        "ledger": bench_ledger.main,
        "cache": bench_cache.main,
        "pull": bench_pull.main,
        "cli": bench_cli.main,
        "timetravel": bench_timetravel.main,
    }
    if not args.rest:
        # No benchmark named: all of them, and one table of the figures and their goals.
        from imageledger.tools import bench_all

        flags = [flag for flag, on in (("--quick", args.quick), ("--json", args.json)) if on]
        return bench_all.main(flags)
    if args.rest[0] not in benches:
        msg = f"bench: choose one of {', '.join(benches)}, or none for all of them"
        raise UsageError(msg)
    return benches[args.rest[0]](args.rest[1:])


# ----------------------------------------------------------------------- the parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse quotes what it was given ("unrecognized arguments: ..."): cut and escaped.
        raise UsageError(one_line(message))


# `imageledger COMMAND --help` ends with these (`audit SUB` under "audit SUB"): what people
# type, as `git` and `docker` help pages show it.
EXAMPLES: Final[dict[str, tuple[str, ...]]] = {
    "": (
        "imageledger pull alpine:3.19",
        "imageledger images --filter reference='alpine*'",
        "imageledger --home /var/lib/sandboxes/images df",
        "source <(imageledger completion bash)",
    ),
    "images": (
        "imageledger images",
        "imageledger images --filter reference=alpine --filter reference='acme/*'",
        "imageledger images --filter dangling=true --quiet",
        "imageledger images --filter since=app:1 --filter label=org.example.team=infra",
        "imageledger images --no-trunc",
        "imageledger images --json --at 2026-12-05T03:12Z",
    ),
    "inspect": ("imageledger inspect alpine:3.19", "imageledger inspect app:1 --at 1200"),
    "load": (
        "imageledger load hello.tar",
        "imageledger load ./oci-layout --tag app:1",
        "docker save app:1 | imageledger load -",
    ),
    "materialize": (
        "imageledger materialize alpine:3.19",
        "imageledger materialize app:1 --json",
    ),
    "pull": (
        "imageledger pull alpine:3.19 --materialize",
        "imageledger pull ghcr.io/owner/app:1.2 --platform linux/arm64",
        "imageledger pull 127.0.0.1:5000/app:1 --insecure-registry 127.0.0.1:5000 --json",
    ),
    "save": (
        "imageledger save app:1 -o app.tar",
        "imageledger save app:1 db:2 -o images.tar --format oci",
    ),
    "tag": (
        "imageledger tag alpine:3.19 registry.example.com/base/alpine:stable",
        "imageledger tag app@sha256:<hex> app:pinned",
    ),
    "use": ("imageledger use app:1 --holder sandbox-42",),
    "release": ("imageledger release sandbox-42",),
    "rm": ("imageledger rm app:1", "imageledger rm --force app:1 db:2"),
    "prune": (
        "imageledger prune --dry-run",
        "imageledger prune --unused-for 7d --keep 'docker.io/library/*'",
        "imageledger prune --max-bytes 10000000000 --json",
    ),
    "gc": (
        "imageledger gc --high-threshold 85 --low-threshold 80",
        "imageledger gc --high-threshold 85 --low-threshold 80 --min-age 2m --dry-run",
    ),
    "history": (
        "imageledger history",
        "imageledger history app:1 --no-trunc",
        "imageledger history --at 1200 --json",
    ),
    "events": (
        "imageledger events --ref app:1 --since 2026-12-05",
        "imageledger events --type ImagePulled --type ImageTagged --json",
        "imageledger events --follow",
    ),
    "explain": ("imageledger explain app:1", "imageledger explain app:1 --at 2026-12-05T03:12Z"),
    "diff": ("imageledger diff 1200 2026-12-05T03:12Z",),
    "rebuild": ("imageledger rebuild --verify",),
    "verify": ("imageledger verify", "imageledger verify --repair --json"),
    "df": ("imageledger df", "imageledger df --no-trunc", "imageledger df --json"),
    "audit": ("imageledger audit verify", "imageledger audit report --since 2026-12-01 --csv"),
    "audit key": ("imageledger audit key",),
    "audit checkpoint": ("imageledger audit checkpoint --json",),
    "audit verify": ("imageledger audit verify", "imageledger audit verify --key VKEY"),
    "audit export": (
        "imageledger audit export --jsonl > export.jsonl",
        "imageledger audit export --jsonl --from 10 --to 50",
        "imageledger audit export --tiles ./tiles",
    ),
    "audit verify-export": ("imageledger audit verify-export export.jsonl --key VKEY",),
    "audit report": ("imageledger audit report --since 2026-12-01 --ref app:1 --csv",),
    "audit prove": (
        "imageledger audit prove --event 42",
        "imageledger audit prove --from 10 --to 50",
    ),
    "migrate": ("imageledger migrate",),
    "debug-bundle": ("imageledger debug-bundle bug-1234.tar.gz",),
    "replay-bundle": (
        "imageledger --home /tmp/bug-1234 replay-bundle bug-1234.tar.gz",
        "imageledger --home /tmp/bug-1234 images --at 2026-12-05T03:12Z",
    ),
    "demo": ("imageledger demo", "imageledger demo --keep"),
    "bench": ("imageledger bench --quick", "imageledger bench cache"),
    "completion": (
        "source <(imageledger completion bash)",
        "imageledger completion bash > /etc/bash_completion.d/imageledger",
        'imageledger completion zsh > "${fpath[1]}/_imageledger"',
    ),
    "login": ("imageledger login registry.example.com -u me --password-stdin < token.txt",),
    "logout": ("imageledger logout registry.example.com",),
}


def _epilog(name: str) -> str | None:
    examples = EXAMPLES.get(name)
    if not examples:
        return None
    return "examples:\n" + "\n".join(f"  {line}" for line in examples)


def build_parser() -> argparse.ArgumentParser:
    from imageledger._version import __version__

    parser = _Parser(
        prog="imageledger",
        description=__doc__.splitlines()[0],
        epilog=_epilog(""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"imageledger {__version__}")
    parser.add_argument(
        "--home",
        default=None,
        help="cache home (default $IMAGELEDGER_HOME or ~/.local/share/imageledger)",
    )
    parser.add_argument(
        "--registries-conf",
        default=None,
        metavar="FILE",
        help="the registries configuration, containers-registries.conf(5) (default "
        "$CONTAINERS_REGISTRIES_CONF, else ~/.config/containers/registries.conf if it exists, "
        "else /etc/containers/registries.conf; drop-ins in registries.conf.d are read too)",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, run: Callable[..., int], help_: str, *, json_flag: bool = True) -> Any:
        sub = commands.add_parser(
            name,
            help=help_,
            epilog=_epilog(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if json_flag:
            sub.add_argument("--json", action="store_true", help="machine-readable output")
        sub.set_defaults(run=run)
        return sub

    at_help = "as the cache was at a ledger position or an ISO 8601 time (UTC by default)"
    no_trunc_help = "exact values: whole digests, sizes in bytes, RFC 3339 times"
    images = add("images", cmd_images, "list cached images, newest first")
    images.add_argument("--at", type=position_or_time, metavar="POSITION|TIME", help=at_help)
    images.add_argument(
        "-f",
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="docker's image filters (repeatable): reference=PATTERN, dangling=true|false, "
        "before=REF, since=REF, label=KEY[=VALUE]",
    )
    images.add_argument("-q", "--quiet", action="store_true", help="print references only")
    images.add_argument("--no-trunc", action="store_true", help=no_trunc_help)
    inspect_ = add("inspect", cmd_inspect, "show an image's config and layers")
    inspect_.add_argument("reference")
    inspect_.add_argument("--at", type=position_or_time, metavar="POSITION|TIME", help=at_help)
    materialize_help = "then write its layers' EROFS images, fsmeta and VMDK (as materialize)"
    materialize = add(
        "materialize", cmd_materialize, "write what a microVM boots: layer EROFS, fsmeta, VMDK"
    )
    materialize.add_argument("reference")
    load = add("load", cmd_load, "load images from an OCI layout or a docker-archive")
    load.add_argument("path", help="OCI layout directory or tar, docker-archive tar, - for stdin")
    load.add_argument("--tag", help="name the (single) image in the archive")
    load.add_argument(
        "--platform", help="os/arch[/variant] to keep of a multi-platform archive (default: host)"
    )
    load.add_argument("--materialize", action="store_true", help=materialize_help)
    pull = add("pull", cmd_pull, "pull an image from an OCI distribution registry")
    pull.add_argument("reference")
    pull.add_argument("--platform", help="os/arch[/variant] of an index to pull (default: host)")
    pull.add_argument(
        "-q", "--quiet", action="store_true", help="print only the reference, no progress"
    )
    pull.add_argument("--materialize", action="store_true", help=materialize_help)
    pull.add_argument(
        "--insecure-registry",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="speak plain HTTP to this registry (repeatable; also "
        "IMAGELEDGER_INSECURE_REGISTRIES=host:port,...)",
    )
    pull.add_argument("--ca-bundle", metavar="PEM", help="extra CA certificates to trust")
    pull.add_argument(
        "--timeout",
        type=positive_duration,
        metavar="DURATION",
        help="fail when the registry sends nothing for this long (default 30s; also "
        "IMAGELEDGER_PULL_TIMEOUT)",
    )
    pull.add_argument(
        "--deadline",
        type=positive_duration,
        metavar="DURATION",
        help="fail when the whole pull takes longer (default 1h; also IMAGELEDGER_PULL_DEADLINE)",
    )
    save = add("save", cmd_save, "save images to an archive", json_flag=False)
    save.add_argument("references", nargs="+")
    save.add_argument("-o", "--output", required=True, help="archive path, - for stdout")
    save.add_argument("--format", choices=("docker", "oci"), default="docker")
    tag = add("tag", cmd_tag, "give a cached image another name (as docker tag)")
    tag.add_argument("reference", metavar="SOURCE", help="a cached reference")
    tag.add_argument("target", metavar="TARGET", help="the new name (a tag, not a digest)")
    use = add("use", cmd_use, "lease an image for a holder (a sandbox, a snapshot)")
    use.add_argument("reference")
    use.add_argument("--holder", required=True)
    add("release", cmd_release, "end every lease of a holder").add_argument("holder")
    rm = add("rm", cmd_rm, "remove references (and content nothing else needs)")
    rm.add_argument("references", nargs="+")
    rm.add_argument("--force", action="store_true", help="remove even while in use")
    prune = add("prune", cmd_prune, "remove unused images and unreferenced content")
    prune.add_argument("--dry-run", action="store_true")
    prune.add_argument("--at", type=position_or_time, metavar="POSITION|TIME", help=at_help)
    prune.add_argument(
        "--unused-for",
        type=duration,
        metavar="DURATION",
        help="keep images used within DURATION (90s, 30m, 12h, 7d, 1h30m; at most 100 years)",
    )
    prune.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="PATTERN",
        help="never remove references matching PATTERN (repeatable): a reference spelled any "
        "way, without a tag meaning every tag and digest (alpha, alpha:3.*, example.com/app), "
        "with fnmatch wildcards; one that matches no image is warned about on stderr",
    )
    prune.add_argument(
        "--max-bytes",
        type=non_negative,
        metavar="N",
        help="evict least recently used images until the cache fits in N bytes",
    )
    gc_ = add(
        "gc",
        cmd_gc,
        "kubelet's disk-pressure image GC: over --high-threshold, remove least recently used "
        "unused images until under --low-threshold",
    )
    gc_.add_argument(
        "--high-threshold",
        type=percentage,
        default=85,
        metavar="PERCENT",
        help="collect when the home's file system is at least this full (default 85)",
    )
    gc_.add_argument(
        "--low-threshold",
        type=percentage,
        default=80,
        metavar="PERCENT",
        help="collect until it is at most this full (default 80)",
    )
    gc_.add_argument(
        "--min-age",
        type=duration,
        default=120,
        metavar="DURATION",
        help="never remove an image pulled more recently (default 2m)",
    )
    gc_.add_argument(
        "--max-age",
        type=positive_duration,
        metavar="DURATION",
        help="remove images unused for longer, whatever the disk (default: never)",
    )
    gc_.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    history = add("history", cmd_history, "the ledger's events (of one reference)")
    history.add_argument("--no-trunc", action="store_true", help=no_trunc_help)
    history.add_argument("reference", nargs="?")
    history.add_argument("--at", type=position_or_time, metavar="POSITION|TIME", help=at_help)
    events = add("events", cmd_events, "the ledger's events, filtered; --follow for new ones")
    events.add_argument(
        "--type",
        action="append",
        default=[],
        metavar="TYPE",
        help="ImagePulled, ImageUsed, ... (repeatable)",
    )
    events.add_argument("--ref", metavar="REFERENCE", help="events that concern this reference")
    events.add_argument("--holder", help="events of this holder")
    events.add_argument("--actor", metavar="USER", help="events appended by this user")
    events.add_argument("--since", type=instant, metavar="TIME")
    events.add_argument("--until", type=instant, metavar="TIME")
    events.add_argument("--from", dest="first", type=positive_int, metavar="N")
    events.add_argument("--to", dest="last", type=positive_int, metavar="M")
    events.add_argument(
        "--follow", action="store_true", help="keep printing new events until interrupted"
    )
    explain = add("explain", cmd_explain, "why a reference is cached, or why it is gone")
    explain.add_argument("reference")
    explain.add_argument(
        "--at", dest="when", type=position_or_time, metavar="POSITION|TIME", help=at_help
    )
    diff = add("diff", cmd_diff, "what changed between two points of the ledger")
    diff.add_argument("first", type=position_or_time, metavar="A", help="a position or a time")
    diff.add_argument("second", type=position_or_time, metavar="B", help="a position or a time")
    rebuild = add("rebuild", cmd_rebuild, "replay the log into fresh views")
    rebuild.add_argument(
        "--verify",
        action="store_true",
        help="rebuild into scratch space and compare, change nothing",
    )
    verify = add("verify", cmd_verify, "read back and hash every blob the ledger accounts for")
    verify.add_argument(
        "--repair",
        action="store_true",
        help="delete damaged blobs, so that the next pull or load fetches them again",
    )
    df = add("df", cmd_df, "disk usage by kind and what prune would reclaim")
    df.add_argument("--no-trunc", action="store_true", help="sizes in bytes")
    df.add_argument("--at", type=position_or_time, metavar="POSITION|TIME", help=at_help)
    audit = commands.add_parser(
        "audit",
        help="the ledger as a transparency log: keys, checkpoints, verify, proofs",
        epilog=_epilog("audit"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    audits = audit.add_subparsers(dest="audit_command", required=True, parser_class=_Parser)

    def add_audit(name: str, run: Callable[..., int], help_: str) -> Any:
        sub = audits.add_parser(
            name,
            help=help_,
            epilog=_epilog(f"audit {name}"),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("--json", action="store_true", help="machine-readable output")
        sub.set_defaults(run=run)
        return sub

    add_audit("key", cmd_audit_key, "print the verifier key of this log's checkpoints")
    add_audit("checkpoint", cmd_audit_checkpoint, "sign a checkpoint of the log now")
    audit_verify = add_audit(
        "verify", cmd_audit_verify, "recompute every leaf, the tree and every checkpoint"
    )
    audit_verify.add_argument(
        "--key", metavar="VKEY", help="verifier key to check the signatures with"
    )
    export = audits.add_parser(
        "export",
        help="the log as JSON Lines, then the checkpoint that covers it",
        epilog=_epilog("audit export"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("--jsonl", action="store_true", help="one JSON object per event")
    export.add_argument("--tiles", metavar="DIR", help="a C2SP tlog-tiles directory")
    export.add_argument("--json", action="store_true", help="(with --tiles) machine-readable")
    export.add_argument("--from", dest="first", type=positive_int, metavar="N")
    export.add_argument("--to", dest="last", type=positive_int, metavar="M")
    export.set_defaults(run=cmd_audit_export)
    verify_export = add_audit(
        "verify-export", cmd_audit_verify_export, "verify an export without the home"
    )
    verify_export.add_argument("path", help="the export: a --tiles directory or a --jsonl file")
    verify_export.add_argument("--key", required=True, metavar="VKEY", help="the verifier key")
    verify_export.set_defaults(needs_cache=False)
    report = add_audit("report", cmd_audit_report, "who did what to which image, and how it went")
    report.add_argument("--since", type=instant, metavar="TIME", help="ISO 8601; UTC by default")
    report.add_argument("--until", type=instant, metavar="TIME")
    report.add_argument("--ref", metavar="REFERENCE", help="only this reference")
    report.add_argument("--csv", action="store_true", help="CSV with a header row")
    prove = add_audit("prove", cmd_audit_prove, "an RFC 9162 inclusion or consistency proof")
    prove.add_argument("--event", type=positive_int, metavar="N", help="the event at position N")
    prove.add_argument("--size", type=positive_int, metavar="S", help="in the tree of S events")
    prove.add_argument("--from", dest="first", type=positive_int, metavar="S1")
    prove.add_argument("--to", dest="second", type=positive_int, metavar="S2")
    migrate = add(
        "migrate", cmd_migrate, "rewrite a ledger of an older format into format 2 (FORMAT.md)"
    )
    migrate.set_defaults(needs_cache=False)
    bundle = add(
        "debug-bundle", cmd_debug_bundle, "pack the log, versions and configuration for a bug"
    )
    bundle.add_argument("out", metavar="OUT.tar.gz")
    replay = add(
        "replay-bundle", cmd_replay_bundle, "load a debug bundle into a new, read-only home"
    )
    replay.add_argument("bundle", metavar="IN.tar.gz")
    replay.set_defaults(needs_cache=False)
    demo = add(
        "demo", cmd_demo, "build a small image and walk it through the cache", json_flag=False
    )
    demo.add_argument("--keep", action="store_true", help="keep the demo home")
    demo.set_defaults(needs_cache=False)
    completion = add(
        "completion", cmd_completion, "print a shell completion script", json_flag=False
    )
    completion.add_argument("shell", choices=("bash", "zsh"))
    completion.set_defaults(needs_cache=False)
    bench = add("bench", cmd_bench, "benchmarks (see docs/benchmarks.md)", json_flag=False)
    bench.add_argument("--quick", action="store_true", help="with no benchmark named: short runs")
    bench.add_argument("--json", action="store_true", help="with no benchmark named: JSON")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(needs_cache=False)
    login = add("login", cmd_login, "check and store credentials for a registry (auth.json)")
    login.add_argument("registry", help="HOST[:PORT], or HOST[:PORT]/NAMESPACE for that only")
    login.add_argument("-u", "--username", help="the user (prompted for on a terminal)")
    login.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    login.add_argument(
        "--authfile",
        metavar="FILE",
        help="the auth file to write (default $REGISTRY_AUTH_FILE, else "
        "$XDG_RUNTIME_DIR/containers/auth.json)",
    )
    login.add_argument(
        "--insecure-registry",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="speak plain HTTP to this registry (also IMAGELEDGER_INSECURE_REGISTRIES)",
    )
    login.add_argument("--ca-bundle", metavar="PEM", help="extra CA certificates to trust")
    login.set_defaults(needs_cache=False)
    logout = add("logout", cmd_logout, "remove a registry's stored credentials (auth.json)")
    logout.add_argument("registry", nargs="?", help="HOST[:PORT][/NAMESPACE]")
    logout.add_argument("--all", action="store_true", help="remove every registry's credentials")
    logout.add_argument("--authfile", metavar="FILE", help="the auth file (as for login)")
    logout.set_defaults(needs_cache=False)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is so that it unwinds as Ctrl-C does: a load or
    pull in flight deletes what it wrote and records its failure before the process ends."""


def _terminate(signum: int, _frame: object) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit code.

    `argv` None means that this process is the command (the console script, ``python -m``):
    then, once the command is done, every object is frozen out of the cyclic garbage
    collector (`gc.freeze`). The interpreter's exit would otherwise walk every object the
    imports made, ~40 ms of a ~240 ms `inspect` on the benchmark machine, to free memory
    that the ending process gives back anyway; nothing waits on that collection, because
    the cache and every file the command opened are closed by then (the `with` in `_run`),
    and exit still flushes stdout and stderr, runs atexit handlers and joins threads.
    Callers that pass `argv` (tests, embedders) go on living: their collector is left alone.
    """
    if argv is None:
        # httpx's package imports its own command line (`httpx._main`: rich, click, pygments)
        # whenever those happen to be installed, 30-40 ms of every pull's start; its
        # `__init__` falls back to a stub when that import fails, as on a plain install. This
        # process never runs httpx's command line, so it marks the module as absent.
        sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    try:
        return _main(argv)
    finally:
        if argv is None:
            gc.freeze()


def _main(argv: Sequence[str] | None) -> int:
    configure_logging_on_first_line()
    if threading.current_thread() is threading.main_thread():
        # The command line owns its process; the library never installs handlers.
        signal.signal(signal.SIGTERM, _terminate)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"imageledger: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _run(args)
    except UsageError as e:
        print(f"imageledger: {e}", file=sys.stderr)
        return EXIT_USAGE


# Commands that may make a home (they bring content); every other one only opens an existing
# home: reading never creates one (a mistyped --home must not look like an empty cache).
_CREATING: Final = frozenset({"load", "pull"})
# Commands that append to the ledger: each signs a checkpoint of it before it exits.
_APPENDING: Final = frozenset(
    {"load", "pull", "use", "release", "rm", "prune", "gc", "tag", "materialize"}
)


def _command(cache: ImageCache, args: argparse.Namespace) -> int:
    """Run the command on `cache` (or, with ``--at``, on the cache as it was then: read
    only); a command that appended signs a checkpoint before it returns."""
    at = getattr(args, "at", None)
    if at is not None:
        if args.command == "prune" and not args.dry_run:
            raise UsageError("--at plans a past prune: it needs --dry-run")
        return int(args.run(cache.at(at), args))
    code = int(args.run(cache, args))
    if args.command in _APPENDING and not cache.read_only:
        _sign(cache)
    return code


def _sign(cache: ImageCache) -> None:
    """Sign a checkpoint of what this command appended (nothing new: nothing signed). The
    command itself succeeded: a failure to sign is one line on stderr, not its exit code."""
    from imageledger import ImageLedgerError

    try:
        cache.audit.checkpoint()
    except (ImageLedgerError, OSError) as e:
        print(f"imageledger: warning: no checkpoint signed: {one_line(str(e))}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    from imageledger import (
        ImageCache,
        ImageLedgerError,
        canonical,
        check_holder,
        check_ledger,
        default_home,
    )

    try:
        if not getattr(args, "needs_cache", True):
            return int(args.run(None, args))
        # A malformed reference is refused before anything is touched, the home included.
        given = getattr(args, "references", None) or [getattr(args, "reference", None)]
        for reference in given:
            if reference is not None:
                canonical(reference)
        if getattr(args, "holder", None) is not None:
            check_holder(args.holder)
        home = args.home if args.home is not None else default_home()
        if args.command == "verify" and os.fspath(home):
            # The ledger first, in a child process, before this one opens it: damage that
            # would crash a reader (LMDB aborts on some damaged pages) is reported, not died of.
            found = check_ledger(home)
            if found is not None:
                raise found
        with ImageCache(
            home, create=args.command in _CREATING, registries_conf=args.registries_conf
        ) as cache:
            return _command(cache, args)
    except BrokenPipeError:
        return EXIT_FAILURE
    except Terminated:
        print("imageledger: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("imageledger: interrupted", file=sys.stderr)
        return 130
    except (ImageLedgerError, ValueError, OSError) as e:
        print(f"imageledger: {one_line(str(e))}", file=sys.stderr)
        return exit_code(e)


def exit_code(error: BaseException) -> int:
    """The documented exit code of a failure: one class of failure, one code, whichever
    command meets it."""
    from imageledger import (
        ArchiveError,
        AuditVerificationError,
        DigestMismatchError,
        HomeDamagedError,
        HomeNotFoundError,
        ImageInUseError,
        ImageNotFoundError,
        InvalidReferenceError,
        LayerRejectedError,
        LedgerCorruptError,
        ManifestError,
        RegistryBlockedError,
    )

    if isinstance(error, ImageNotFoundError | HomeNotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(error, ImageInUseError):
        return EXIT_IN_USE
    if isinstance(error, LedgerCorruptError | HomeDamagedError | AuditVerificationError):
        return EXIT_DAMAGED
    if isinstance(error, InvalidReferenceError | ValueError | RegistryBlockedError):
        return EXIT_USAGE
    # Bad input (a hostile archive, manifest or layer, a digest that does not match) is exit 2.
    if isinstance(error, DigestMismatchError | ArchiveError | ManifestError | LayerRejectedError):
        return EXIT_USAGE
    return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
