"""Progress for long work: a pull's per-layer display, as `docker pull` draws it, and the bar
of the other long commands (rebuild, verify, migrate). On a terminal they draw; otherwise
they only log (structured events), so embedders and log readers see progress without one.

Lines go through the library's logger (`imageledger.domain.log`), never structlog directly: the
command line configures structlog only when a first line is logged (`tools.logs`), and an
embedder that configured nothing gets them on the standard library's logging, not stdout."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Final, Self, TextIO

from imageledger.domain.log import get_logger
from imageledger.tools import human
from imageledger.tools.logs import printable

if TYPE_CHECKING:
    from imageledger import PullProgress

_log = get_logger(__name__)


class _Closing:
    """A `with` block around the work: `close` when it ends, however it ends."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Progress(_Closing):
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

    def close(self) -> None:
        """End the bar's line."""
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()


# ---- a pull, layer by layer ----------------------------------------------------------------

WAITING: Final = "Waiting"
DOWNLOADING: Final = "Downloading"
VERIFYING: Final = "Verifying"
COMPLETE: Final = "Pull complete"
CACHED: Final = "Already exists"
BAR_WIDTH: Final = 50  # docker's
_REDRAW: Final = 0.1  # seconds between two redraws while bytes come in
_UP: Final = "\x1b[{}A"  # cursor up N lines
_CLEAR: Final = "\r\x1b[2K"  # to the start of the line, erase it


# A blob's progress event -> the state its layer's line shows.
_STATES: Final = {
    "blob-cached": CACHED,
    "blob-start": DOWNLOADING,
    "blob-bytes": DOWNLOADING,
    "blob-verifying": VERIFYING,
    "blob-done": COMPLETE,
}


@dataclass
class _Layer:
    size: int
    state: str = WAITING
    done: int = 0


def _bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """docker's bar: ``[=====>      ]``, the arrow at the fraction done."""
    filled = width if total <= 0 else min(done * width // total, width)
    if filled >= width:
        return "[" + "=" * width + "]"
    return "[" + "=" * filled + ">" + " " * (width - filled - 1) + "]"


def _left(seconds: float) -> str:
    """A time left as docker's old ETA printed it: ``7s``, ``2m05s``, ``1h02m``."""
    whole = int(seconds + 0.999)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


class PullDisplay(_Closing):
    """A pull's progress callback (`ImageCache.pull(progress=...)`), drawn as `docker pull`
    draws it when `draw` (the command line's stdout is a terminal): one line per layer, by
    the first 12 hex digits of its digest (``Waiting``, ``Downloading`` with a bar and the
    bytes as MB, ``Verifying``, ``Pull complete``, or ``Already exists`` for a layer the
    cache held), then a total line over the bytes to download, with the speed and the time
    left. The block is redrawn in place (cursor up, erase line) at most ten times a second
    while bytes come in, at once when a layer changes state, and a last time when the pull
    ends; lines are cut to the terminal's width so that none wraps and breaks the redraw.

    Whether it draws or not, every change of a layer's state is logged (``pull.layer``, at
    info), as the other progress bars log their tenths: off a terminal that is all there is,
    and stdout keeps only the command's own answer (scripts read it unchanged)."""

    def __init__(
        self,
        stream: TextIO,
        *,
        draw: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.draw = draw
        self.clock = clock
        self.layers: dict[str, _Layer] = {}
        self._drawn_lines = 0
        self._drawn_at = 0.0
        self._started: float | None = None
        self._finished: float | None = None

    # -- the callback

    def __call__(self, event: PullProgress) -> None:
        if event.event == "manifest":
            for digest, size in event.layers:
                self.layers.setdefault(digest, _Layer(size))
            self._render(force=True)
            return
        layer = self.layers.get(event.digest or "")
        if layer is None:
            return  # the config (and the manifest's own blob): not a line of their own
        state = _STATES.get(event.event)
        if state is None:
            return
        if state == DOWNLOADING and self._started is None:
            self._started = self.clock()
        layer.done = layer.size if state in (CACHED, COMPLETE) else event.done
        changed = state != layer.state
        layer.state = state
        if changed:
            _log.info("pull.layer", digest=event.digest, state=state, size=layer.size)
        self._render(force=changed)

    # -- what the lines say

    def lines(self) -> list[str]:
        """The block as it stands: one line per layer, then the total."""
        out = []
        for digest, layer in self.layers.items():
            line = f"{human.short_digest(digest)}: {layer.state}"
            if layer.state == DOWNLOADING:
                line += f" {_bar(layer.done, layer.size)}  {_mb(layer.done)}/{_mb(layer.size)}"
            out.append(line)
        if self.layers:
            out.append(self.total_line())
        return out

    def total_line(self) -> str:
        """The bytes to download (the layers not already cached), how many are in, the speed
        since the first byte and the time left at that speed (``done`` once all are in)."""
        fetched = [x for x in self.layers.values() if x.state != CACHED]
        total = sum(x.size for x in fetched)
        done = sum(x.done for x in fetched)
        if not fetched:
            return "Total: all layers already exist"
        end = self._finished if self._finished is not None else self.clock()
        elapsed = 0.0 if self._started is None else end - self._started
        speed = done / elapsed if elapsed > 0 else 0.0
        if done >= total:
            left = "done"
        elif speed > 0:
            left = f"{_left((total - done) / speed)} left"
        else:
            left = "starting"
        return f"Total: {_bar(done, total)}  {_mb(done)}/{_mb(total)}  {_mb(speed)}/s  {left}"

    # -- drawing

    def _render(self, *, force: bool) -> None:
        if not self.draw:
            return
        now = self.clock()
        if not force and now - self._drawn_at < _REDRAW:
            return
        self._drawn_at = now
        width = _width(self.stream)
        text = _UP.format(self._drawn_lines) if self._drawn_lines else ""
        lines = self.lines()
        for line in lines:
            text += _CLEAR + printable(line)[: width - 1] + "\n"
        self._drawn_lines = len(lines)
        self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        """Draw the block a last time, as the pull ended (complete, or where it stopped)."""
        self._finished = self.clock()
        self._render(force=True)


def _mb(count: float) -> str:
    """Bytes as `docker pull` shows them (go-units' HumanSize: decimal, 4 digits)."""
    return human.size(count, 4)


def _width(stream: TextIO) -> int:
    try:
        return max(os.get_terminal_size(stream.fileno()).columns, 20)
    except (OSError, ValueError):
        return 80
