"""Runs the folds: incrementally inside each append, or over the whole log (rebuild, verify).

The runner holds no state of its own; the view host (storage) keeps the tables, the log and
the live-namespace pointer, and the folds (`views.apply`) decide what the tables say.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Notification

from imageledger.domain.ports import ViewTxn
from imageledger.projections.views import apply, mark

log = structlog.get_logger(__name__)

Decode = Callable[[Notification], DomainEventProtocol[Any]]
Fold = Callable[[ViewTxn, Sequence[Notification]], None]
Progress = Callable[[int, int], None]


class ViewHost(Protocol):
    """Where views live: two namespaces, one live; the log they are folded from."""

    def spare(self) -> str: ...

    def clear(self, namespace: str) -> None: ...

    def head(self) -> int: ...

    def read_log(self, after: int, limit: int) -> Sequence[Notification]: ...

    def write(self, namespace: str, fn: Callable[[Any], None]) -> None: ...

    def finish(
        self, namespace: str, after: int, fold: Any, *, activate: bool
    ) -> dict[str, tuple[str, str]]: ...


def folder(decode: Decode) -> Fold:
    """The fold of a batch of log entries, in log order."""

    def fold(view: ViewTxn, notifications: Sequence[Notification]) -> None:
        event = None
        for notification in notifications:
            event = decode(notification)
            apply(view, event, notification.id)
        if event is not None:
            mark(view, event, notifications[-1].id)

    return fold


def _batch(fold: Fold, notifications: Sequence[Notification]) -> Callable[[ViewTxn], None]:
    return lambda view: fold(view, notifications)


@dataclass(frozen=True)
class RebuildReport:
    events: int
    activated: bool
    tables: dict[str, tuple[str, str]]  # table -> (live digest, rebuilt digest)

    @property
    def identical(self) -> bool:
        return all(live == rebuilt for live, rebuilt in self.tables.values())


def rebuild(
    host: ViewHost,
    decode: Decode,
    *,
    verify_only: bool = False,
    batch: int = 5000,
    progress: Progress | None = None,
) -> RebuildReport:
    """Replay the whole log into the spare namespace, then compare it with the live views and
    (unless `verify_only`) make it live. Appends may go on meanwhile: the last batch is folded,
    compared and activated in one transaction."""
    fold = folder(decode)
    namespace = host.spare()
    host.clear(namespace)
    total = host.head()
    done = 0
    after = 0
    while True:
        notifications = host.read_log(after, batch)
        if not notifications:
            break
        host.write(namespace, _batch(fold, notifications))
        after = notifications[-1].id
        done += len(notifications)
        if progress is not None:
            progress(done, max(total, done))
    tables = host.finish(namespace, after, fold, activate=not verify_only)
    if verify_only:
        host.clear(namespace)
    report = RebuildReport(events=done, activated=not verify_only, tables=tables)
    log.info("views.rebuilt", events=done, verify_only=verify_only, identical=report.identical)
    return report
