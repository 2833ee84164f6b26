"""How every part of the library logs, without ever configuring logging.

structlog's unconfigured default prints every level to stdout, which would land in an
embedder's own output. So a library logger asks at each call: when the process configured
structlog (the CLI does, with `tools.logs`; an embedder may), the line goes through that
pipeline as usual; when nobody did, it goes to the standard library's `logging` under the
module's name, whose default is silence below WARNING and a plain line on stderr above (the
"last resort" handler), as for any library that uses `logging`. Nothing reaches stdout either
way, and an embedder that configured `logging` gets the lines there.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Final

STRUCTURED: Final = "imageledger_structured"
"""The attribute of a standard-library log record that holds the line's ``(event, fields)``."""

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class Logger:
    """A structlog-style logger (``log.warning("event.name", key=value)``) for one module."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def _emit(self, method: str, event: str, fields: dict[str, Any]) -> None:
        # A process that never imported structlog cannot have configured it: the library does
        # not import it either (it costs a command-line query tens of milliseconds, asyncio
        # included), and goes straight to the standard library.
        structlog = sys.modules.get("structlog")
        if structlog is not None and structlog.is_configured():
            getattr(structlog.get_logger(self.name), method)(event, **fields)
            return
        logger = logging.getLogger(self.name)
        level = _LEVELS[method]
        if logger.isEnabledFor(level):
            detail = " ".join(f"{key}={value!r}" for key, value in fields.items())
            # The event and its fields ride along on the record (`STRUCTURED`), so that a
            # handler which renders structured lines (the command line's) gets them whole.
            logger.log(level, "%s %s", event, detail, extra={STRUCTURED: (event, fields)})

    def debug(self, event: str, **fields: Any) -> None:
        self._emit("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", event, fields)


def get_logger(name: str) -> Logger:
    return Logger(name)
