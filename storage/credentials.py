"""Registry credentials: the caller's, Docker's ``config.json`` and its credential helpers.

`CredentialChain` answers "which user and password for this registry host?" from, in order:
the credentials given by the call, those of the environment (only for the registry the
environment names: see `storage.registryoptions`), the credential helper Docker's config
names for the host (``credHelpers``, else ``credsStore``; asked once per host), then the
config's ``auths``. A host is compared as references spell it, Docker Hub's aliases folded
into ``docker.io`` (`normalize_host`). Nothing here logs a credential or a helper's output:
an unreadable config or a failing helper is logged by name and taken as "no credentials".
"""

from __future__ import annotations

import base64
import binascii
import json
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from imageledger.domain.log import get_logger
from imageledger.domain.reference import DEFAULT_REGISTRY

log = get_logger(__name__)

_DOCKER_HUB_ALIASES: Final = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)

Credentials = Callable[[str], tuple[str, str] | None]
"""Registry host (as references spell it, ``docker.io`` for Docker Hub) -> (user, password),
or None for anonymous."""


def normalize_host(host: str) -> str:
    host = host.strip().lower()
    return DEFAULT_REGISTRY if host in _DOCKER_HUB_ALIASES else host


def docker_config_path(environ: Mapping[str, str]) -> Path | None:
    directory = environ.get("DOCKER_CONFIG")
    if directory:
        return Path(directory) / "config.json"
    home = environ.get("HOME")
    if home:
        return Path(home) / ".docker" / "config.json"
    return None


def auth_key_host(key: str) -> str:
    """The registry host a Docker ``config.json`` auths key names (``https://index.docker.io
    /v1/``, ``registry.example:5000``, ``http://host/``...)."""
    text = key.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    return normalize_host(text.split("/", 1)[0])


def read_docker_config(path: Path) -> dict[str, Any]:
    """A Docker ``config.json`` as a dict; a missing file is an empty one, an unreadable or
    invalid one is logged (without its content) and taken as empty."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as e:
        log.warning("registry.docker_config.unreadable", path=str(path), error=e.strerror)
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        log.warning("registry.docker_config.invalid", path=str(path))
        return {}
    return config if isinstance(config, dict) else {}


def docker_config_credentials(path: Path) -> dict[str, tuple[str, str]]:
    """The ``auths`` of a Docker ``config.json``: host -> (user, password). Entries with an
    ``auth`` (base64 ``user:password``) or ``username``/``password`` fields are read; identity
    tokens are not supported. A missing file is no credentials; an unreadable one is logged
    (without its content) and ignored."""
    return config_auths(read_docker_config(path), path)


def config_auths(config: Mapping[str, Any], path: Path) -> dict[str, tuple[str, str]]:
    auths = config.get("auths")
    found: dict[str, tuple[str, str]] = {}
    if not isinstance(auths, dict):
        return found
    for key, entry in sorted(auths.items()):
        if not isinstance(key, str) or not isinstance(entry, dict):
            continue
        user: object = entry.get("username")
        password: object = entry.get("password")
        encoded = entry.get("auth")
        if isinstance(encoded, str) and encoded:
            try:
                decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                log.warning("registry.docker_config.bad_auth", path=str(path), key=key)
                continue
            user, sep, password = decoded.partition(":")
            if not sep:
                continue
        if isinstance(user, str) and user and isinstance(password, str):
            found.setdefault(auth_key_host(key), (user, password))
    return found


def config_helpers(config: Mapping[str, Any]) -> tuple[str | None, dict[str, str]]:
    """The credential helpers of a Docker ``config.json``: ``credsStore`` (every registry)
    and ``credHelpers`` (registry host -> helper, which wins over ``credsStore``)."""
    store = config.get("credsStore")
    helpers = config.get("credHelpers")
    by_host = {
        auth_key_host(key): name
        for key, name in (helpers.items() if isinstance(helpers, dict) else ())
        if isinstance(key, str) and isinstance(name, str) and name
    }
    return (store if isinstance(store, str) and store else None), by_host


_HELPER_NOT_FOUND: Final = b"credentials not found"
_HELPER_TIMEOUT: Final = 60.0


def helper_credentials(helper: str, host: str, path: str | None) -> tuple[str, str] | None:
    """Ask Docker credential helper ``docker-credential-<helper>`` (found on `path`, a
    PATH-style list) for `host`'s credentials, by its protocol: ``get`` with the server URL
    on stdin, JSON ``{"Username", "Secret"}`` on stdout. A helper that is missing, fails,
    has none, or answers an identity token (not supported) gives None, logged without any
    of its output (it may hold a secret)."""
    program = shutil.which(f"docker-credential-{helper}", path=path)
    if program is None:
        log.warning("registry.credential_helper.missing", helper=helper, host=host)
        return None
    server = "https://index.docker.io/v1/" if host == DEFAULT_REGISTRY else host
    try:
        done = subprocess.run(
            [program, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=_HELPER_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("registry.credential_helper.failed", helper=helper, host=host, error=str(e))
        return None
    if done.returncode != 0:
        if _HELPER_NOT_FOUND in done.stdout.lower() + done.stderr.lower():
            log.debug("registry.credential_helper.none", helper=helper, host=host)
        else:
            log.warning(
                "registry.credential_helper.failed", helper=helper, host=host, exit=done.returncode
            )
        return None
    return _helper_answer(done.stdout, helper, host)


def _helper_answer(stdout: bytes, helper: str, host: str) -> tuple[str, str] | None:
    try:
        answer = json.loads(stdout)
        user, secret = answer["Username"], answer["Secret"]
    except (ValueError, KeyError, TypeError):
        user = secret = None
    if not isinstance(user, str) or not isinstance(secret, str) or not user:
        log.warning("registry.credential_helper.bad_answer", helper=helper, host=host)
        return None
    if user == "<token>":
        log.warning("registry.credential_helper.identity_token_unsupported", helper=helper)
        return None
    return user, secret


class CredentialChain:
    """Credentials from the call, then the environment, then Docker's config.json: its
    credential helper for the host (asked once per host), then its ``auths``."""

    def __init__(
        self,
        explicit: Credentials | None,
        env_user: tuple[str, str] | None,
        env_host: str | None,
        docker: Mapping[str, tuple[str, str]],
        helpers: tuple[str | None, Mapping[str, str]] = (None, {}),
        path: str | None = None,
    ) -> None:
        self._explicit = explicit
        self._env = env_user
        self._env_host = env_host
        self._docker = dict(docker)
        self._store, self._helpers = helpers[0], dict(helpers[1])
        self._path = path
        self._asked: dict[str, tuple[str, str] | None] = {}
        self._lock = threading.Lock()

    def __call__(self, host: str) -> tuple[str, str] | None:
        host = normalize_host(host)
        if self._explicit is not None:
            found = self._explicit(host)
            if found is not None:
                return found
        if self._env is not None and self._env_host == host:
            return self._env
        helper = self._helpers.get(host, self._store)
        if helper is not None:
            with self._lock:  # concurrent layer downloads: one helper run per host
                if host not in self._asked:
                    self._asked[host] = helper_credentials(helper, host, self._path)
                found = self._asked[host]
            if found is not None:
                return found
        return self._docker.get(host)

    def __repr__(self) -> str:
        return "<registry credentials>"


__all__ = [
    "CredentialChain",
    "Credentials",
    "auth_key_host",
    "config_auths",
    "config_helpers",
    "docker_config_credentials",
    "docker_config_path",
    "helper_credentials",
    "normalize_host",
    "read_docker_config",
]
