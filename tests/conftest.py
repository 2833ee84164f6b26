"""Shared fixtures: every test gets its own ledger directory under pytest's tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

PERSISTENCE_MODULE = "imageledger.storage.ledger"


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger"
