"""The home's ``index.json`` and ``oci-layout``: the home is an OCI image layout, and its index
is a projection of the views (`projections.index`), written here (the domain's `OciIndex`)."""

from __future__ import annotations

import fcntl
import os

from imageledger.domain.log import get_logger
from imageledger.projections.index import oci_index
from imageledger.storage import layout
from imageledger.storage.eventstore import LedgerStore
from imageledger.storage.home import Dir

log = get_logger(__name__)


class OciIndexFile:
    """index.json, rewritten only when what it shows changed (semantics 14)."""

    def __init__(self, home: Dir, ledger: LedgerStore) -> None:
        self.home = home
        self.ledger = ledger

    def refresh(self, *, force: bool = False) -> None:
        """Rewrite index.json from the views, unless it already shows what they show (with
        `force`, whatever it shows: after a rebuild), and write oci-layout if missing.
        Serialised across processes by index.lock, so the last writer always writes the
        latest state and temp files found under it are stale."""
        home = self.home
        fd = home.open_lock(layout.INDEX_LOCK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if home.stat(layout.OCI_LAYOUT) is None:
                home.write_atomic(layout.OCI_LAYOUT, b'{"imageLayoutVersion":"1.0.0"}')
            with self.ledger.snapshot() as state:
                position = state.shown
                try:
                    with home.open_read(layout.INDEX_POSITION) as f:
                        written = int(f.read(32))
                except (FileNotFoundError, ValueError):
                    written = -1
                shown = home.file_size(layout.INDEX) is not None
                if not force and written >= position and shown:
                    return
                data = oci_index(state.index_entries(), position)
            # Every index write holds this lock, so a temporary file left now is a crashed
            # writer's: sweep it.
            for name, _ in home.entries():
                if name.startswith(".") and name.endswith(".tmp"):
                    home.delete(name)
            try:
                home.write_atomic(layout.INDEX, data)
                home.write_atomic(layout.INDEX_POSITION, str(position).encode())
            except OSError as e:
                # The command itself is committed; failing it now (a full disk, say) would
                # report as failed what happened. The next command writes the index again.
                log.warning("index.not_written", position=position, error=str(e))
        finally:
            os.close(fd)
