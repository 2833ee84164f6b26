"""Shared fixtures: a ledger directory per test, and child processes for crash tests."""

from __future__ import annotations

import importlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

PERSISTENCE_MODULE = "imageledger.storage.ledger"
CHILD_TIMEOUT = 60.0  # for waiting only: nothing asserts how long anything took


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger"


@pytest.fixture
def lc(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """`tests/_ledger_child.py` (child entry points and the parent-side helpers), importable
    here so its aggregate topics resolve."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))
    return importlib.import_module("_ledger_child")


@pytest.fixture
def spawn(lc: ModuleType) -> Iterator[Callable[..., Any]]:
    """Start a child (`lc.Child`); every child still running at teardown is killed."""
    children: list[Any] = []

    def start(ledger: Path, *args: str, **settings: str) -> Any:
        child = lc.Child(ledger, *args, timeout=CHILD_TIMEOUT, **settings)
        children.append(child)
        return child

    yield start
    for child in children:
        child.close()


@pytest.fixture
def cache_spawn(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start an image-cache child (`tests/_cache_child_ops.Child`: a cache operation with
    named pause points); every child still running at teardown is killed."""
    children: list[Any] = []
    cc = importlib.import_module("_cache_child_ops")

    def start(command: str, home: Path, *args: str) -> Any:
        log = tmp_path / f"child-{len(children)}.log"
        child = cc.Child(command, home, *args, log=log, timeout=CHILD_TIMEOUT)
        children.append(child)
        return child

    yield start
    for child in children:
        child.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB file system (tmpfs; the tests run as root, as the README says)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


pytest_plugins = ["registry"]
