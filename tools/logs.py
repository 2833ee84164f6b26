"""Structured logging, configured once by whoever owns the process (the CLI, a test, an embedder).

The library itself only calls `structlog.get_logger()`; it never configures logging behind an
embedder's back. `configure_logging()` gives the command line what the project promises:

- JSON lines on stderr when stderr is not a terminal (a program reads them), a readable console
  rendering when it is; stdout stays free for `--json` output;
- the level from ``IMAGELEDGER_LOG_LEVEL`` (debug, info, warning, error; default warning);
- credentials never reach a line: values under secret-looking keys are replaced, and passwords
  in URLs and ``Authorization``-style tokens inside any string are masked, at any depth.

structlog is imported by `configure_logging`, not by this module: importing structlog loads
asyncio (and rich, where it is installed), 60 ms of a 160 ms ``inspect --json``. The command
line therefore calls `configure_logging_on_first_line`: nothing is imported until a line at an
enabled level is actually logged, which most commands never do (issue 10).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, Final, TextIO

from imageledger.domain.log import STRUCTURED

REDACTED: Final = "[redacted]"

_SECRET_KEY: Final = re.compile(
    r"pass(word|wd)?|secret|token|auth|credential|cookie|api[_-]?key|private[_-]?key",
    re.IGNORECASE,
)
_URL_USERINFO: Final = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]+:[^/@\s]*@")
_AUTH_SCHEME: Final = re.compile(r"\b(?P<scheme>Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
_LEVELS: Final = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


_NOT_PLAIN: Final = re.compile(r"[^ -~]")  # anything but printable ASCII: looked at one by one


def printable(text: str) -> str:
    """`text` with control and other non-printable characters escaped (``\\x1b``, ``\\n``,
    ``\\u202e``): what archives, registries and users put in names, architectures, paths and
    holders reaches a terminal, where an escape sequence could rewrite or hide other output and
    a newline could forge a line. Every human (non-JSON) line and log line goes through it;
    JSON is escaped by its encoder already."""
    if text.isprintable():
        return text
    return _NOT_PLAIN.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match[0]
    return char if char.isprintable() else char.encode("unicode_escape").decode("ascii")


def _printable_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """The event as a terminal may show it (see `printable`): the console renderer writes it
    raw, while other values go through `repr` (and the JSON renderer escapes everything)."""
    event = event_dict.get("event")
    if isinstance(event, str):
        event_dict["event"] = printable(event)
    return event_dict


def redact(value: Any) -> Any:
    """`value` with every credential masked; containers are copied, never mutated."""
    if isinstance(value, str):
        value = _URL_USERINFO.sub(rf"\g<scheme>{REDACTED}@", value)
        return _AUTH_SCHEME.sub(rf"\g<scheme> {REDACTED}", value)
    if isinstance(value, Mapping):
        return {
            k: REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    return value


def _redact_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    return redact(event_dict)  # type: ignore[no-any-return]


def log_level() -> int:
    """The level asked for by ``IMAGELEDGER_LOG_LEVEL`` (warning when unset or unknown)."""
    name = os.environ.get("IMAGELEDGER_LOG_LEVEL", "warning").strip().lower()
    return _LEVELS.get(name, logging.WARNING)


def configure_logging(
    *, level: int | None = None, stream: TextIO | None = None, json: bool | None = None
) -> None:
    """Configure structlog for this process; later calls replace the configuration.

    `json` defaults to "stream is not a TTY", `stream` to stderr, `level` to `log_level()`.
    """
    import structlog

    out = stream if stream is not None else sys.stderr
    as_json = not out.isatty() if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=True)
        if as_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    # httpx logs every request (full URLs, signed redirect query strings included) at INFO
    # through the standard library: keep that to warnings.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_processor,
            *(() if as_json else (_printable_processor,)),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            log_level() if level is None else level
        ),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


class _FirstLine(logging.Handler):
    """Stands in for the structlog configuration until the first line that passes the level.

    The library logs through the standard library while structlog is not configured
    (`imageledger.domain.log`); this handler, on the ``imageledger`` logger, then configures
    structlog (replacing itself) and hands the line over whole: the event and its fields ride
    on the record, so the line comes out as if structlog had been configured from the start.
    """

    def emit(self, record: logging.LogRecord) -> None:
        import structlog

        _uninstall()
        configure_logging()
        event, fields = getattr(record, STRUCTURED, (record.getMessage(), {}))
        getattr(structlog.get_logger(record.name), record.levelname.lower())(event, **fields)


_LIBRARY_LOGGER: Final = "imageledger"


def _uninstall() -> None:
    logger = logging.getLogger(_LIBRARY_LOGGER)
    for handler in list(logger.handlers):
        if isinstance(handler, _FirstLine):
            logger.removeHandler(handler)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


def configure_logging_on_first_line() -> None:
    """`configure_logging()` as late as possible: at once when structlog is already loaded
    (a second command in one process), else when the first enabled line is logged."""
    structlog = sys.modules.get("structlog")
    if structlog is not None:
        _uninstall()
        configure_logging()
        return
    _uninstall()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logger = logging.getLogger(_LIBRARY_LOGGER)
    logger.setLevel(log_level())
    logger.propagate = False  # the line is the handler's, not the last-resort handler's
    logger.addHandler(_FirstLine())
