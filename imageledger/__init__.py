"""imageledger: a local OCI image cache whose whole state is an event-sourced ledger in LMDB.

The public surface is what this module exports; everything else is private to the package.
"""

from imageledger.domain.errors import (
    ImageLedgerError,
    LedgerCorruptError,
    LedgerError,
    LedgerFullError,
)
from imageledger.tools.logs import configure_logging

__all__ = [
    "ImageLedgerError",
    "LedgerCorruptError",
    "LedgerError",
    "LedgerFullError",
    "configure_logging",
]
