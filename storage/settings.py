"""A ledger's settings: the ``LMDB_*`` variables of the persistence module, as an `EnvConfig`.

The eventsourcing persistence module (`storage.ledger.LMDBFactory`) reads them from its
application's environment, and `storage.eventstore.LedgerStore` opens the same LMDB
environment before (and often without) making that application: a query reads the views only,
and eventsourcing costs a command-line query a fifth of its time to import (issue 10). Both
must configure the environment alike (one environment per path per process keeps the first
configuration), so both read the settings here, looked up as eventsourcing's `Environment`
does: ``<APPLICATION NAME>_<KEY>`` first, then ``<KEY>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, cast

from imageledger.storage.lmdbenv import DURABILITY_MODES, Durability, EnvConfig

APPLICATION: Final = "imageledger"
"""The name of the applications that keep a home's log (`storage.ledgerapp`): the prefix of
their databases and of their settings' variables."""
LOG_DB: Final = f"{APPLICATION.lower()}.log"
"""The log's database: our application's recorder namespace and ``log`` (`storage.ledger`)."""
LMDB_PATH: Final = "LMDB_PATH"
LMDB_MAP_SIZE: Final = "LMDB_MAP_SIZE"
LMDB_MAX_MAP_SIZE: Final = "LMDB_MAX_MAP_SIZE"
LMDB_DURABILITY: Final = "LMDB_DURABILITY"
LMDB_POLL_INTERVAL: Final = "LMDB_POLL_INTERVAL"
LMDB_READONLY: Final = "LMDB_READONLY"
_TRUE: Final = frozenset({"y", "yes", "t", "true", "on", "1"})
_FALSE: Final = frozenset({"n", "no", "f", "false", "off", "0"})


class Settings:
    """`values` (the process environment with the application's own settings over it) as
    the application named `name` sees them."""

    def __init__(self, name: str, values: Mapping[str, str]) -> None:
        self.name = name
        self.values = values

    def keys(self, key: str) -> list[str]:
        """Where `key` is looked up, in order (what eventsourcing's `create_keys` gives)."""
        return [f"{self.name.upper()}_{key}", key] if self.name else [key]

    def get(self, key: str) -> str | None:
        for name in self.keys(key):
            value = self.values.get(name)
            if value is not None:
                return value
        return None

    def flag(self, key: str, default: bool) -> bool:
        """A yes/no setting, spelt as eventsourcing's `strtobool` accepts."""
        value = (self.get(key) or "").strip().lower()
        if not value:
            return default
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        msg = f"{key}={value!r}: expected yes or no"
        raise ValueError(msg)

    def env_config(self) -> EnvConfig:
        """The LMDB environment's configuration; `OSError` naming the setting that is wrong."""
        defaults = EnvConfig()
        durability = self.get(LMDB_DURABILITY) or defaults.durability
        if durability not in DURABILITY_MODES:
            msg = f"{LMDB_DURABILITY}={durability!r}: use one of {', '.join(DURABILITY_MODES)}"
            raise OSError(msg)
        config = EnvConfig(
            map_size=self._bytes(LMDB_MAP_SIZE, defaults.map_size),
            max_map_size=self._bytes(LMDB_MAX_MAP_SIZE, defaults.max_map_size),
            durability=cast(Durability, durability),
            poll_interval=self._seconds(LMDB_POLL_INTERVAL, defaults.poll_interval),
            readonly=self.flag(LMDB_READONLY, False),
        )
        if config.max_map_size < config.map_size:
            msg = (
                f"{LMDB_MAX_MAP_SIZE}={config.max_map_size} is below "
                f"{LMDB_MAP_SIZE}={config.map_size}"
            )
            raise OSError(msg)
        return config

    def _bytes(self, key: str, default: int) -> int:
        value = (self.get(key) or "").strip()
        if not value:
            return default
        try:
            number = int(value)
        except ValueError:
            number = -1
        if number <= 0:
            msg = f"{key}={value!r}: expected a positive number of bytes"
            raise OSError(msg)
        return number

    def _seconds(self, key: str, default: float) -> float:
        value = (self.get(key) or "").strip()
        if not value:
            return default
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not 0 < seconds < 3600:
            msg = f"{key}={value!r}: expected a number of seconds between 0 and 3600"
            raise OSError(msg)
        return seconds
