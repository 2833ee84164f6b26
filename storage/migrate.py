"""`imageledger migrate`: rewrite a home's ledger from format 1 into format 2 (docs/FORMAT.md).

Every event is read with format 1's decoder and appended, in order, to a new ledger written
beside the old one (``ledger.migrating/``): the same positions (the log assigns them in order,
from 1), the same instants (stored in UTC now), the same content (a config carried once).
The views of the new ledger are folded as it is written and then checked against a replay of
its log. Only then is the old ledger replaced: ``ledger`` -> ``ledger.format1``,
``ledger.migrating`` -> ``ledger``, and the old one deleted. Until that moment the old ledger is
untouched, so a failure (or a kill) at any point loses nothing: running `migrate` again
resumes from whichever of these states it finds.

The store lock is held throughout, so no other imageledger process of this version deletes
content meanwhile; none can append either, as none opens a format 1 ledger (one of an older
version could: stop them first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from eventsourcing.utils import get_topic

from imageledger.domain.errors import LedgerCorruptError, LedgerFormatError, LedgerMissingError
from imageledger.domain.log import get_logger
from imageledger.storage import layout
from imageledger.storage.eventstore import LedgerStore
from imageledger.storage.home import Dir, mark_home, open_home
from imageledger.storage.leases import StoreLock
from imageledger.storage.ledger import LMDBApplicationRecorder, LMDBFactory
from imageledger.storage.ledgerapp import FormatOneApplication

log = get_logger(__name__)

_BATCH = 1000


@dataclass(frozen=True)
class MigrationReport:
    """What `migrate` did: how many events it rewrote (0 when the ledger was already in
    format 2) and from which format."""

    events: int
    from_format: int
    to_format: int = 2

    @property
    def migrated(self) -> bool:
        return self.from_format != self.to_format


def migrate(
    home_path: str | Path, *, progress: Callable[[int, int], None] | None = None
) -> MigrationReport:
    """Rewrite the ledger of the home at `home_path` into format 2 (see the module docstring).
    `progress(events done, events in all)`."""
    home = _open(home_path)
    try:
        # Marked before anything moves: a home made before markers, killed between the two
        # renames below, must still be recognised as a home by the run that resumes it.
        mark_home(home)
        with StoreLock(home)():
            _finish_interrupted_swap(home)
            try:
                LedgerStore(home, read_only=False).close()
            except LedgerFormatError as e:
                if e.found != 1:
                    raise
            else:
                return MigrationReport(events=0, from_format=2)
            if home.stat(layout.LEDGER_MIGRATING) is not None:
                home.delete(layout.LEDGER_MIGRATING)  # a copy a failed run left: start over
            events = _copy(home, progress)
            home.replace(layout.LEDGER, home, layout.LEDGER_FORMAT1)
            home.replace(layout.LEDGER_MIGRATING, home, layout.LEDGER)
            home.fsync()
            home.delete(layout.LEDGER_FORMAT1)
            log.info("ledger.migrated", home=str(home.path), events=events)
            return MigrationReport(events=events, from_format=1)
    finally:
        home.close()


def _open(home_path: str | Path) -> Dir:
    """The home, as every command opens it (never a directory that is not a home: `migrate`
    writes there). A home a killed run left without ``ledger/`` (between its two renames) is
    one `open_home` refuses as missing its ledger: the finished copy beside it goes in place
    first."""
    try:
        return open_home(home_path, create=False)
    except LedgerMissingError:
        bare = Dir.at(home_path)
        try:
            if bare.stat(layout.LEDGER) is not None or bare.stat(layout.LEDGER_MIGRATING) is None:
                raise
            bare.replace(layout.LEDGER_MIGRATING, bare, layout.LEDGER)
            bare.fsync()
        finally:
            bare.close()
    return open_home(home_path, create=False)


def _finish_interrupted_swap(home: Dir) -> None:
    """A run killed between its two renames left the new ledger complete beside the old one;
    one killed after them left the old one to delete."""
    if home.stat(layout.LEDGER) is None and home.stat(layout.LEDGER_MIGRATING) is not None:
        home.replace(layout.LEDGER_MIGRATING, home, layout.LEDGER)
        home.fsync()
    if home.stat(layout.LEDGER) is not None and home.stat(layout.LEDGER_FORMAT1) is not None:
        home.delete(layout.LEDGER_FORMAT1)


def _copy(home: Dir, progress: Callable[[int, int], None] | None) -> int:
    old = FormatOneApplication(
        env={
            "PERSISTENCE_MODULE": get_topic(LMDBFactory),
            "LMDB_PATH": str(home.path / layout.LEDGER),
            "LMDB_READONLY": "yes",
        }
    )
    try:
        recorder = old.recorder
        assert isinstance(recorder, LMDBApplicationRecorder)
        total = recorder.max_notification_id() or 0
        new = LedgerStore(home, read_only=False, name=layout.LEDGER_MIGRATING)
        try:
            done = 0
            while batch := recorder.select_notifications(done, _BATCH, inclusive_of_start=False):
                if batch[0].id != done + 1:
                    msg = f"the format 1 log jumps from entry {done} to {batch[0].id}"
                    raise LedgerCorruptError(f"{home.path / layout.LEDGER}: {msg}")
                new.append([old.mapper.to_domain_event(n) for n in batch])
                done = batch[-1].id
                if progress is not None:
                    progress(done, max(total, done))
            report = new.rebuild(verify=True, progress=None)
            if not report.identical or report.events != done:
                msg = "the rewritten ledger's views differ from a replay of its log"
                raise LedgerCorruptError(f"{home.path / layout.LEDGER_MIGRATING}: {msg}")
            return done
        finally:
            new.close()
    finally:
        old.close()
