"""A throwaway local OCI distribution registry, for the benchmarks and the tests.

`start` launches Debian's ``docker-registry`` (distribution 2.8; ``$IMAGELEDGER_TEST_REGISTRY``
names another executable) on 127.0.0.1 port 0, with filesystem storage, its config and its log
under one directory, waits for its ``listening on 127.0.0.1:PORT`` log line and returns a
`LocalRegistry`; `LocalRegistry.stop` ends it with SIGTERM (SIGKILL if that is ignored).
`running` does both as a context manager::

    with running(tmp_path / "registry") as registry:
        subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", "oci:layout:v1",
                        f"docker://{registry.host}/library/test:1"], check=True)

The default registry serves plain HTTP without auth; TLS, auth or anything else in
distribution's configuration goes in as `config_overrides`, merged into the default config
(mappings key by key, anything else replaced).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

BINARY_ENV: Final = "IMAGELEDGER_TEST_REGISTRY"
DEFAULT_BINARY: Final = "docker-registry"
START_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 15.0

_LISTENING: Final = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


class LocalRegistryError(RuntimeError):
    """The registry executable is missing or the process did not start."""


def registry_binary() -> str:
    """The registry executable: ``$IMAGELEDGER_TEST_REGISTRY`` or ``docker-registry``."""
    return os.environ.get(BINARY_ENV, DEFAULT_BINARY)


def default_config(storage: Path) -> dict[str, Any]:
    """Distribution's configuration for a plain-HTTP, anonymous registry on 127.0.0.1 port 0
    storing under `storage`, with its access log on and upload purging off."""
    return {
        "version": "0.1",
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {"addr": "127.0.0.1:0", "secret": secrets.token_hex(16)},
    }


def merge_config(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of `base` with `overrides` merged in: where both hold a mapping under a key
    the two are merged, otherwise the override's value replaces the base's."""
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        current = merged.get(key)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            merged[key] = merge_config(current, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@dataclass
class LocalRegistry:
    """A running registry process and where its files are."""

    host: str
    """``127.0.0.1:PORT``: what goes in an image reference."""
    url: str
    """``http://127.0.0.1:PORT``, or ``https://`` when the config has ``http.tls``."""
    log: Path
    """The registry's stdout and stderr (its messages and access log)."""
    directory: Path
    config: Path
    """The configuration file it was started with (JSON, which is YAML)."""
    storage: Path
    process: subprocess.Popen[bytes]

    def reference(self, repository_and_tag: str) -> str:
        """``host/repository:tag`` (or ``@digest``) for this registry."""
        return f"{self.host}/{repository_and_tag}"

    def stop(self) -> None:
        """SIGTERM, then wait for the exit (SIGKILL if it does not come). Idempotent."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)

    def __enter__(self) -> LocalRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start(
    directory: Path,
    config_overrides: Mapping[str, Any] | None = None,
    *,
    binary: str | None = None,
    timeout: float = START_TIMEOUT,
) -> LocalRegistry:
    """Start a registry with its storage (``storage/``), config (``config.yml``) and log
    (``registry.log``) under `directory` (created if missing).

    `config_overrides` is merged into `default_config` (see `merge_config`); for example
    ``{"http": {"tls": {"certificate": ..., "key": ...}}}`` or ``{"auth": {"htpasswd": ...}}``.
    The listening address must stay on 127.0.0.1. `binary` defaults to `registry_binary()`.
    The caller's ``REGISTRY_*`` environment variables (which would override the config file)
    are not passed on. Raises `LocalRegistryError` when the executable is missing, or when the
    registry exits or does not log its port within `timeout` seconds (with the log).
    """
    executable = binary or registry_binary()
    if shutil.which(executable) is None:
        msg = f"{executable} is not installed (apt-get install docker-registry)"
        raise LocalRegistryError(msg)
    directory.mkdir(parents=True, exist_ok=True)
    storage = directory / "storage"
    storage.mkdir(exist_ok=True)
    config = merge_config(default_config(storage), config_overrides or {})
    # JSON is YAML: distribution's config loader reads it as is.
    config_path = directory / "config.yml"
    config_path.write_text(json.dumps(config, indent=2))
    log = directory / "registry.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [executable, "serve", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        port = _wait_for_port(process, log, executable, timeout)
    except BaseException:  # also KeyboardInterrupt: never leave the process behind
        if process.poll() is None:
            process.kill()
            process.wait()
        raise
    scheme = "https" if "tls" in config.get("http", {}) else "http"
    return LocalRegistry(
        host=f"127.0.0.1:{port}",
        url=f"{scheme}://127.0.0.1:{port}",
        log=log,
        directory=directory,
        config=config_path,
        storage=storage,
        process=process,
    )


def _wait_for_port(
    process: subprocess.Popen[bytes], log: Path, executable: str, timeout: float
) -> int:
    deadline = time.monotonic() + timeout
    while True:
        match = _LISTENING.search(log.read_text(errors="replace"))
        if match:
            return int(match.group(1))
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                process.kill()
                process.wait()
            msg = f"{executable} did not start (exit {process.returncode}):\n" + log.read_text(
                errors="replace"
            )
            raise LocalRegistryError(msg)
        time.sleep(0.02)


@contextlib.contextmanager
def running(
    directory: Path, config_overrides: Mapping[str, Any] | None = None
) -> Iterator[LocalRegistry]:
    """`start` as a context manager: the registry is stopped on exit."""
    registry = start(directory, config_overrides)
    try:
        yield registry
    finally:
        registry.stop()


__all__ = [
    "BINARY_ENV",
    "START_TIMEOUT",
    "STOP_TIMEOUT",
    "LocalRegistry",
    "LocalRegistryError",
    "default_config",
    "merge_config",
    "registry_binary",
    "running",
    "start",
]
