"""Progress bars for long work (pulls, rebuilds): a bar on a terminal, structured log events
otherwise, so embedders and log readers see progress without a terminal.

Lines go through the library's logger (`imageledger.domain.log`), never structlog directly: the
command line configures structlog only when a first line is logged (`tools.logs`), and an
embedder that configured nothing gets them on the standard library's logging, not stdout."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Self, TextIO

from imageledger.domain.log import get_logger

_log = get_logger(__name__)


class Progress:
    """`update(done, total)` redraws at most ten times a second; logs every 10%."""

    def __init__(self, label: str, *, unit: str = "", stream: TextIO | None = None) -> None:
        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self._drawn = 0.0
        self._logged = -1

    def update(self, done: int, total: int) -> None:
        fraction = done / total if total else 1.0
        if self.tty:
            now = time.monotonic()
            if now - self._drawn < 0.1 and done < total:
                return
            self._drawn = now
            width = 30
            filled = int(width * fraction)
            self.stream.write(
                f"\r{self.label} [{'#' * filled}{' ' * (width - filled)}] "
                f"{fraction:6.1%} {done}/{total} {self.unit}"
            )
            self.stream.flush()
        decile = int(fraction * 10)
        if decile > self._logged:
            self._logged = decile
            _log.info("progress", task=self.label, done=done, total=total, unit=self.unit)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
