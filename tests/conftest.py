"""Shared fixtures: a ledger directory per test, and child processes for crash tests."""

from __future__ import annotations

import contextlib
import importlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

PERSISTENCE_MODULE = "imageledger.storage.ledger"
CHILD_TIMEOUT = 60.0  # for waiting only: nothing asserts how long anything took


@pytest.fixture(autouse=True)
def _containers_config(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Every test sees an empty containers configuration, never the host's: the system files
    (``/etc/containers/registries.conf`` and its drop-ins) under an empty root
    (``IMAGELEDGER_CONTAINERS_ROOT``), the per-user ones (registries.conf, auth.json) under
    an empty ``XDG_CONFIG_HOME``, the runtime auth file under an empty ``XDG_RUNTIME_DIR``;
    ``CONTAINERS_REGISTRIES_CONF`` and ``REGISTRY_AUTH_FILE`` unset. Child processes
    inherit it. Returns the root (tests write files under it)."""
    root = tmp_path_factory.mktemp("containers")
    for name in ("root", "config", "runtime"):
        (root / name).mkdir()
    monkeypatch.setenv("IMAGELEDGER_CONTAINERS_ROOT", str(root / "root"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(root / "config"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(root / "runtime"))
    monkeypatch.delenv("CONTAINERS_REGISTRIES_CONF", raising=False)
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    return root


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


@contextlib.contextmanager
def tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A real file system of `size` (tmpfs) at `mount`, made here and unmounted whatever
    happens (the tests run as root, as the README says); skips where mounting is refused."""
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB file system."""
    with tmpfs(tmp_path / "small", "4m") as mount:
        yield mount


pytest_plugins = ["registry"]
