"""The OCI distribution client: pull an image from a registry into the blob store.

`RegistryClient.pull(reference, store, platform=...)` speaks the OCI distribution API v2 over
HTTP/1.1 (httpx, one connection pool per client) and leaves the image's manifest, config and
layers verified in the store; it returns the image's `ImageContent`. It touches nothing else:
recording the pull (the ledger event, the in-flight lease) is the caller's business.

Decisions (each pinned by ``tests/test_registry_client.py``, ``tests/test_registry_safety.py``
or ``tests/test_pull.py``):

- **Transport**: HTTPS, certificates verified against the system's trust store plus
  `RegistryOptions.ca_bundle` when given. A host listed in `RegistryOptions.insecure`
  (``host[:port]`` exactly as the reference spells it) is spoken to over plain HTTP; there is
  no "HTTPS without verification" mode: a registry with a self-signed certificate is reached by
  giving its CA as `ca_bundle`. ``docker.io`` is served by ``registry-1.docker.io``.
- **Auth**: every request goes out anonymously first. A 401's ``WWW-Authenticate`` challenge
  decides what follows: ``Basic`` sends the credentials we have for the registry host (from
  `RegistryOptions.credentials`); ``Bearer`` fetches a token from the challenge's realm
  (``service``, ``scope=repository:<repo>:pull``, Basic credentials when we have some,
  ``token`` or ``access_token`` in the answer) and caches it per (host, scope) until its
  ``expires_in`` (default 60 s) passes; later requests send it up front, and a 401 despite a
  token fetches a fresh one once. A 401 after that, or a 403, is a `RegistryAuthError`.
  Credentials travel over TLS, or over plain HTTP only to a host that is itself in the insecure
  list: a token realm on ``http://`` at a host not listed is refused (`RegistryAuthError`,
  nothing sent) when we have credentials, and asked anonymously when we have none (the
  registry being insecure says nothing about where its realm is). Redirects never carry
  ``Authorization`` to another origin (httpx drops it). Nothing here logs a credential, a token
  or a URL's query string, and no error message holds one.
- **Credentials from the environment** (`options_from_environment`) must name their registry
  (``IMAGELEDGER_REGISTRY_HOST``): a user and password sent to whichever registry asks would go
  to any host a reference names. Without it they are refused (`RegistryConfigError`).
- **Manifests**: ``Accept`` lists the four media types (OCI index and manifest, Docker manifest
  list and v2 schema 2), since distribution 2.8 answers 404 for OCI content or downgrades Docker
  content to schema 1 otherwise. The ``Content-Type`` must be one of them (schema 1 is refused
  by name); the body is read up to `MAX_MANIFEST_SIZE` whatever ``Content-Length`` says; its
  digest is computed here and must equal the pinned digest and ``Docker-Content-Digest``. An
  index resolves to the entry for the requested platform (os/architecture/variant, else
  os/architecture with a compatible variant), attestations skipped, nested indexes followed;
  the chosen manifest is fetched by digest and checked against its descriptor.
- **Blobs**: the config, then the layers (at most `max_concurrent_layers` at once), each
  streamed through the store's `BlobWriter`, which hashes while writing and lands nothing
  that does not verify. A blob already stored with the descriptor's size is not fetched. A
  broken or short transfer resumes with ``Range: bytes=<offset>-`` (a 200 answer restarts the
  blob), and so does a blob a killed pull left half written: its partial file (in ``tmp/`` or
  a dead lease's work directory) is copied into the new writer first (`_adopt_partial`); if
  the result does not verify, the blob is downloaded again whole, once. Connection errors,
  429 and 5xx are retried with exponential backoff, honouring ``Retry-After``. Redirects
  (registries send blob GETs to object storage) are followed; the ``Authorization`` header is
  never sent to another host. Each blob's check-then-download happens under an exclusive
  ``flock`` on ``<root>/tmp/locks/<hex>.lock``, so concurrent pulls of one blob (threads or
  processes) download it once: the waiter then finds it stored. The holder removes the lock
  file before releasing it (waiters check the inode they locked is still the path's), so locks
  do not pile up; the locks' directory and files are opened through `storage.home.Dir` (never
  through a link: a link, FIFO or device planted in their place is a `HomeDamagedError`
  naming it).
- **Waits are bounded**: `RegistryOptions.timeout` is the read timeout (no byte for that long:
  a stall, retried once, then ``no data for N s from HOST``); `RegistryOptions.deadline`
  bounds the whole pull (a trickle, endless retries: ``the pull's deadline of N s passed``).
  A ``Retry-After`` over `MAX_RETRY_AFTER` or past the deadline fails at once, saying how long
  the registry asked to wait (`RegistryTimeoutError`).
- **Errors**: every failure of the registry or the transport is a `RegistryError` (or a
  subclass) with a one-line message naming the registry or URL (no query, no user info),
  values from outside cut short and control characters escaped: a redirect loop, a URL httpx
  cannot parse, a header with 5,000 digits, a body that does not decode.
- **Progress**: `PullProgress` events go to the optional callback, one call at a time (never
  concurrently, though from the pool's threads).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.utils
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, Self
from urllib.parse import urlsplit

import httpx
import structlog

from imageledger._version import __version__
from imageledger.domain.errors import (
    DigestMismatchError,
    HomeDamagedError,
    ImageLedgerError,
    ImageNotFoundError,
)
from imageledger.domain.model import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    ImageContent,
    Platform,
)
from imageledger.domain.reference import DEFAULT_REGISTRY, Reference, validate_digest
from imageledger.storage.home import Dir
from imageledger.storage.oci import (
    CONFIG_TYPES,
    MAX_MANIFEST_SIZE,
    BlobAccess,
    Descriptor,
    IndexEntry,
    ManifestError,
    describe_image,
    parse_index,
    parse_manifest,
)

log = structlog.get_logger(__name__)

MANIFEST_ACCEPT: Final = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))
SCHEMA1_TYPES: Final = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
PROGRESS_STEP: Final = 1 << 20
"""Bytes between two "blob-bytes" progress events of one blob. (Blobs are written in the
chunks the connection delivers, 64 KiB: re-chunking into bigger writes only adds a copy.)"""
DOCKER_HUB_API: Final = "registry-1.docker.io"
DEFAULT_TOKEN_LIFETIME: Final = 60
MAX_INDEX_DEPTH: Final = 4
MAX_ERROR_BODY: Final = 64 * 1024
ERROR_BODY_TIME: Final = 5.0
"""Seconds an error answer's body (read for its message, or drained) may take to arrive: a
registry trickling it must not hold the pull (the error is known already)."""
MAX_TOKEN_RESPONSE: Final = 1024 * 1024
MAX_RETRY_AFTER: Final = 60.0
"""The longest ``Retry-After`` a pull waits out: a registry asking for more fails the pull at
once, saying how long it asked for (waiting minutes in silence looks like a hang)."""
MAX_BACKOFF: Final = 10.0
MAX_REDIRECTS: Final = 10
DEFAULT_TIMEOUT: Final = 30.0
"""Seconds without a byte (connecting, or between two reads or writes) before a request is
given up. A registry that has sent nothing for this long is stalled, not slow: a slow one
still trickles."""
DEFAULT_DEADLINE: Final = 3600.0
"""Seconds one pull may take in all (manifests, tokens, every blob, retries and waits). The
read timeout catches a registry that stops sending; this catches one that trickles, or
answers "retry later" forever, and would otherwise hold a sandbox's start (and the pull's
in-flight lease) without end. An hour is generous for real images (10 GB at 3 MB/s) and
still bounds the damage; ``IMAGELEDGER_PULL_DEADLINE`` raises or lowers it."""
MAX_TIMEOUT: Final = 86400.0
"""A day: sockets cannot take arbitrarily large timeouts (OverflowError), and more is not a
timeout."""
MAX_DEADLINE: Final = 30 * 86400.0
MAX_TOKEN_LIFETIME: Final = 86400.0
MAX_MESSAGE_VALUE: Final = 200
"""Characters of a value from outside (a URL, a platform, an error text) an error message
quotes before it is cut short."""
USER_AGENT: Final = f"imageledger/{__version__}"

ENV_INSECURE: Final = "IMAGELEDGER_INSECURE_REGISTRIES"
ENV_CA_BUNDLE: Final = "IMAGELEDGER_CA_BUNDLE"
ENV_USER: Final = "IMAGELEDGER_REGISTRY_USER"
ENV_PASSWORD: Final = "IMAGELEDGER_REGISTRY_PASSWORD"
ENV_HOST: Final = "IMAGELEDGER_REGISTRY_HOST"
ENV_TIMEOUT: Final = "IMAGELEDGER_PULL_TIMEOUT"
ENV_DEADLINE: Final = "IMAGELEDGER_PULL_DEADLINE"
_DOCKER_HUB_ALIASES: Final = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)


# ---- errors ----------------------------------------------------------------------------------


class RegistryError(ImageLedgerError):
    """The registry could not be used: unreachable or failing after the retries, garbage or
    unsupported answers (schema 1, oversized manifests), a missing blob."""


class RegistryAuthError(RegistryError):
    """The registry refused us (401 or 403) after we tried the credentials we have, or we
    refused to send the credentials where they could be read (a token realm over plain HTTP
    at a host not listed as insecure)."""


class RegistryTimeoutError(RegistryError):
    """A pull ran out of time: the registry sent nothing for the read timeout
    (``no data for N s from HOST``), the pull's overall deadline passed, or the registry asked
    to wait longer than we would (``Retry-After``). The message says which."""


class RegistryConfigError(ImageLedgerError, ValueError):
    """Registry options that cannot be used: a malformed ``IMAGELEDGER_PULL_TIMEOUT`` or
    ``IMAGELEDGER_PULL_DEADLINE``, credentials in the environment that do not say which
    registry they are for, a CA bundle that cannot be read. Invalid usage (a `ValueError`: the
    command line exits 2); the message names the variable or file, never a secret."""


class RegistryManifestError(RegistryError, ManifestError):
    """The registry served a manifest, index or config that is malformed or unusable."""


class NotInRegistryError(RegistryError, ImageNotFoundError):
    """The registry has no such image (404 for the manifest, or no manifest for the platform);
    the message names the reference."""

    def __init__(self, reference: str, detail: str = "") -> None:
        ImageNotFoundError.__init__(self, reference)
        self.detail = detail
        message = f"image not found in the registry: {reference}"
        self.args = (f"{message} ({detail})" if detail else message,)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reference, self.detail))


class _Cancelled(Exception):
    """A layer download stopped because another one of the same pull failed."""


class _Restart(Exception):
    """A blob download must start again from byte 0 (the registry answered a resume with
    the wrong range); counted as a failed attempt, so a registry that always does is bounded."""


# ---- options ---------------------------------------------------------------------------------


Credentials = Callable[[str], tuple[str, str] | None]


def _normalize_host(host: str) -> str:
    host = host.strip().lower()
    return DEFAULT_REGISTRY if host in _DOCKER_HUB_ALIASES else host


@dataclass(frozen=True)
class RegistryOptions:
    """How a `RegistryClient` reaches registries.

    `insecure`: ``host[:port]`` names spoken to over plain HTTP; credentials go over plain HTTP
    only to a host listed here (a token realm on another host must be listed itself).
    `ca_bundle`: a PEM file of CAs trusted in addition to the system's. `credentials`: registry
    host (as references spell it, ``docker.io`` for Docker Hub) -> (user, password), or None
    for anonymous. `backoff`: the first retry's delay in seconds (doubling each time, at most
    10 s). `timeout`: the read timeout, seconds without a byte from the registry (also the
    connect timeout) before a request is given up; a stall is retried once, the second in a
    row fails the pull (``no data for N s from HOST``). `deadline`: seconds a whole pull may
    take (None: no limit; see `DEFAULT_DEADLINE` for why one hour).
    """

    insecure: frozenset[str] = frozenset()
    ca_bundle: Path | None = None
    credentials: Credentials | None = field(default=None, repr=False)
    max_concurrent_layers: int = 4
    retries: int = 5
    timeout: float = DEFAULT_TIMEOUT
    backoff: float = 0.25
    deadline: float | None = DEFAULT_DEADLINE

    def __post_init__(self) -> None:
        if isinstance(self.insecure, str):
            msg = "insecure must be a set of host[:port] names, not a string"
            raise TypeError(msg)
        object.__setattr__(self, "insecure", frozenset(_normalize_host(h) for h in self.insecure))
        if self.max_concurrent_layers < 1:
            msg = f"max_concurrent_layers must be at least 1, got {self.max_concurrent_layers}"
            raise ValueError(msg)
        if self.retries < 0:
            msg = f"retries must not be negative, got {self.retries}"
            raise ValueError(msg)
        if not (0 < self.timeout <= MAX_TIMEOUT):  # also refuses NaN
            msg = f"timeout must be more than 0 and at most {MAX_TIMEOUT:g} s, got {self.timeout}"
            raise ValueError(msg)
        if self.deadline is not None and not (0 < self.deadline <= MAX_DEADLINE):
            msg = (
                f"deadline must be more than 0 and at most {MAX_DEADLINE:g} s (or None),"
                f" got {self.deadline}"
            )
            raise ValueError(msg)
        if not (0 <= self.backoff <= MAX_BACKOFF):
            msg = f"backoff must be from 0 to {MAX_BACKOFF:g} s, got {self.backoff}"
            raise ValueError(msg)


def _docker_config_path(environ: Mapping[str, str]) -> Path | None:
    directory = environ.get("DOCKER_CONFIG")
    if directory:
        return Path(directory) / "config.json"
    home = environ.get("HOME")
    if home:
        return Path(home) / ".docker" / "config.json"
    return None


def _auth_key_host(key: str) -> str:
    """The registry host a Docker ``config.json`` auths key names (``https://index.docker.io
    /v1/``, ``registry.example:5000``, ``http://host/``...)."""
    text = key.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    return _normalize_host(text.split("/", 1)[0])


def _read_docker_config(path: Path) -> dict[str, Any]:
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
    return _auths(_read_docker_config(path), path)


def _auths(config: Mapping[str, Any], path: Path) -> dict[str, tuple[str, str]]:
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
            found.setdefault(_auth_key_host(key), (user, password))
    return found


def _helpers(config: Mapping[str, Any]) -> tuple[str | None, dict[str, str]]:
    """The credential helpers of a Docker ``config.json``: ``credsStore`` (every registry)
    and ``credHelpers`` (registry host -> helper, which wins over ``credsStore``)."""
    store = config.get("credsStore")
    helpers = config.get("credHelpers")
    by_host = {
        _auth_key_host(key): name
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


class _CredentialChain:
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
        host = _normalize_host(host)
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


_DURATION: Final = re.compile(r"([0-9]{1,9}(?:\.[0-9]{1,9})?)\s*(s|m|h)?", re.ASCII)
_UNIT: Final = {None: 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def _clip(value: object, limit: int = MAX_MESSAGE_VALUE) -> str:
    """`value` as text fit for a one-line message: control characters escaped, cut to
    `limit` characters (a hostile registry or environment must not fill a terminal)."""
    text = str(value)
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit + 1])
    return text if len(text) <= limit else text[:limit] + "..."


_USER_INFO: Final = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]*@")
_QUERY: Final = re.compile(r"\?[^\s'\"]*")


def _error_text(error: BaseException) -> str:
    """An exception's text for a message: URLs in it lose their user info and query (httpx
    quotes a bad ``Location``, which may be a signed storage URL), then `_clip`."""
    text = _USER_INFO.sub(r"\1", str(error))
    return _clip(_QUERY.sub("?...", text))


def _env_seconds(env: Mapping[str, str], name: str, default: float, limit: float) -> float:
    """A duration from the environment: seconds (``30``, ``2.5``) or with a unit (``90s``,
    ``5m``, ``1h``), more than 0 and at most `limit`; unset or empty is `default`."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    match = _DURATION.fullmatch(raw.lower())
    seconds = float(match[1]) * _UNIT[match[2]] if match else 0.0
    if not 0 < seconds <= limit:
        msg = (
            f"{name} must be a duration of more than 0 and at most {limit:g} seconds (e.g. 30,"
            f" 90s, 5m, 1h), got {_clip(raw, 40)!r}"
        )
        raise RegistryConfigError(msg)
    return seconds


def _env_credentials(env: Mapping[str, str]) -> tuple[tuple[str, str] | None, str | None]:
    """The environment's credentials and the registry host they are for, or (None, None).

    Credentials must name their registry: sent to whichever registry asks for Basic auth,
    they would go to any host a reference names (a typo, a hostile image name in a script).
    A user without a password, a password without a user, or either without
    ``IMAGELEDGER_REGISTRY_HOST`` is refused (the message names the missing variable)."""
    user, password = env.get(ENV_USER) or None, env.get(ENV_PASSWORD)
    host_value = (env.get(ENV_HOST) or "").strip()
    if user is None and not password:
        return None, None
    if user is None:
        msg = f"{ENV_PASSWORD} is set but {ENV_USER} is not: set both (and {ENV_HOST})"
        raise RegistryConfigError(msg)
    if password is None:
        msg = f"{ENV_USER} is set but {ENV_PASSWORD} is not: set both (and {ENV_HOST})"
        raise RegistryConfigError(msg)
    if not host_value:
        msg = (
            f"{ENV_USER} and {ENV_PASSWORD} are set but {ENV_HOST} is not: set it to the"
            " registry (host[:port]) the credentials are for; they are never sent to every"
            " registry"
        )
        raise RegistryConfigError(msg)
    host = _auth_key_host(host_value)
    if not host or any(c.isspace() or not c.isprintable() for c in host):
        msg = f"{ENV_HOST} must be a registry host[:port], got {_clip(host_value, 80)!r}"
        raise RegistryConfigError(msg)
    return (user, password), host


def options_from_environment(
    environ: Mapping[str, str] | None = None,
    *,
    insecure: Iterable[str] = (),
    ca_bundle: Path | None = None,
    credentials: Credentials | None = None,
    max_concurrent_layers: int = 4,
    retries: int = 5,
    timeout: float | None = None,
    deadline: float | None = None,
) -> RegistryOptions:
    """`RegistryOptions` from the call's arguments, the environment and Docker's config.

    - ``IMAGELEDGER_INSECURE_REGISTRIES=host[:port],...`` adds to `insecure`;
    - ``IMAGELEDGER_CA_BUNDLE=path`` is the CA bundle unless `ca_bundle` is given;
    - ``IMAGELEDGER_PULL_TIMEOUT`` (the read timeout, default 30 s) and
      ``IMAGELEDGER_PULL_DEADLINE`` (a whole pull, default 1 h): seconds, or a number with
      ``s``, ``m`` or ``h``; `timeout` and `deadline` win when given;
    - credentials: `credentials` (the call's) first; then ``IMAGELEDGER_REGISTRY_USER`` and
      ``IMAGELEDGER_REGISTRY_PASSWORD``, for the registry named by ``IMAGELEDGER_REGISTRY_HOST``
      (``host[:port]``, required with them); then Docker's ``config.json``
      (``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``): the credential helper
      for the host (``credHelpers``, else ``credsStore``: ``docker-credential-<name>`` on
      ``PATH``), and where it has none, ``auths``.

    Raises `RegistryConfigError` (a `ValueError`) for a malformed duration or credentials
    that do not name their registry.
    """
    env = os.environ if environ is None else environ
    hosts = set(insecure)
    hosts.update(h for h in env.get(ENV_INSECURE, "").split(",") if h.strip())
    bundle = ca_bundle
    if bundle is None and env.get(ENV_CA_BUNDLE):
        bundle = Path(env[ENV_CA_BUNDLE])
    if timeout is None:
        timeout = _env_seconds(env, ENV_TIMEOUT, DEFAULT_TIMEOUT, MAX_TIMEOUT)
    if deadline is None:
        deadline = _env_seconds(env, ENV_DEADLINE, DEFAULT_DEADLINE, MAX_DEADLINE)
    env_credentials, env_host = _env_credentials(env)
    config_path = _docker_config_path(env)
    config = _read_docker_config(config_path) if config_path is not None else {}
    docker = _auths(config, config_path) if config_path is not None else {}
    path = env.get("PATH", os.defpath)
    chain = _CredentialChain(credentials, env_credentials, env_host, docker, _helpers(config), path)
    return RegistryOptions(
        insecure=frozenset(hosts),
        ca_bundle=bundle,
        credentials=chain,
        max_concurrent_layers=max_concurrent_layers,
        retries=retries,
        timeout=timeout,
        deadline=deadline,
    )


def environment_fingerprint(environ: Mapping[str, str] | None = None) -> tuple[object, ...]:
    """What `options_from_environment` reads, summarised: equal fingerprints give equal
    options (so a client built from them can be reused), except for what credential helpers
    answer, which callers re-ask by rebuilding their options now and then."""
    env = os.environ if environ is None else environ
    names = (
        ENV_INSECURE,
        ENV_CA_BUNDLE,
        ENV_USER,
        ENV_PASSWORD,
        ENV_HOST,
        ENV_TIMEOUT,
        ENV_DEADLINE,
        "DOCKER_CONFIG",
    )
    config = _docker_config_path(env)
    try:
        stat = config.stat() if config is not None else None
        seen = None if stat is None else (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    except OSError:
        seen = None
    # A digest, not the values: the password must not sit in a long-lived tuple in memory
    # any more than it already does, nor show up in a repr.
    values = hashlib.sha256(repr([env.get(n) for n in names]).encode()).hexdigest()
    return values, str(config), seen, env.get("PATH", os.defpath)


# ---- progress --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PullProgress:
    """One progress event: ``manifest`` (the chosen manifest was fetched), ``blob-start``,
    ``blob-bytes`` (`done` of `total` bytes of that blob), ``blob-done``, ``blob-cached``
    (already in the store, not fetched)."""

    event: str
    digest: str | None
    done: int
    total: int | None


class _Emitter:
    def __init__(self, callback: Callable[[PullProgress], None] | None) -> None:
        self._callback = callback
        self._lock = threading.Lock()

    def __call__(self, event: str, digest: str | None, done: int, total: int | None) -> None:
        if self._callback is not None:
            with self._lock:
                self._callback(PullProgress(event, digest, done, total))


# ---- the store as the client sees it ---------------------------------------------------------


class BlobWriting(Protocol):
    """What the client uses of a `storage.blobs.BlobWriter`."""

    @property
    def offset(self) -> int: ...

    def write(self, chunk: bytes) -> None: ...

    def commit(self) -> int: ...

    def abort(self) -> None: ...


class PullStore(BlobAccess, Protocol):
    """A `BlobStore`, or a wrapper around one (a lease-claiming one, say): `has` is asked
    before anything else of each digest, and `home` (the store's open home, see
    `storage.home`) holds ``tmp/locks`` and the partial files of dead pulls."""

    @property
    def home(self) -> Dir: ...

    def writer(self, digest: str, *, size: int | None = None) -> BlobWriting: ...

    def write_bytes(self, data: bytes, digest: str | None = None) -> str: ...


_LOCK_POLL: Final = 0.25
"""The longest pause between two tries at a lock another pull holds (while a deadline or a
cancellation must be noticed, the lock is polled rather than waited for)."""


def _flock(
    fd: int,
    deadline: float,
    cancel: threading.Event | None,
    expired: Callable[[], BaseException],
) -> None:
    """Take an exclusive flock on `fd`, waiting for the holder (another pull of the blob)
    at most until `deadline`, and not after `cancel` is set."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    if deadline == float("inf") and cancel is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    pause = 0.01
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise expired()
        if cancel is not None and cancel.wait(min(pause, left)):
            raise _Cancelled
        if cancel is None:
            time.sleep(min(pause, left))
        pause = min(pause * 2, _LOCK_POLL)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            continue


@contextlib.contextmanager
def _blob_lock(
    store: PullStore,
    digest: str,
    *,
    deadline: float = float("inf"),
    cancel: threading.Event | None = None,
    expired: Callable[[], BaseException] | None = None,
) -> Iterator[None]:
    """Hold an exclusive flock on ``<root>/tmp/locks/<hex>.lock`` (per open file, so threads
    of one process exclude each other too), and remove the file when done, so that locks do
    not pile up.

    The classic pattern makes the removal safe: the holder unlinks the path before it closes
    (releases) the file; a waiter that then gets the lock on the unlinked file sees that the
    path no longer names its file (another inode, or none) and starts again on the path's
    current file. The same check covers a sweep of ``tmp/`` removing the file. The directories
    and the file are opened through `storage.home.Dir` (one component at a time, never
    through a link): a link, FIFO or device planted there is a `HomeDamagedError` naming it,
    never followed. A wait for another pull's lock ends at `deadline` (raising `expired()`)
    or when `cancel` is set."""
    name = f"{digest.partition(':')[2]}.lock"

    def default_expired() -> BaseException:
        return RegistryTimeoutError(f"waiting for another pull of {digest}: the deadline passed")

    with store.home.sub("tmp/locks", create=True) as locks:
        while True:
            fd = locks.open_lock(name)
            try:
                _flock(fd, deadline, cancel, expired or default_expired)
                mine = os.fstat(fd)
                current = locks.stat(name)
                if current is None or (current.st_dev, current.st_ino) != (
                    mine.st_dev,
                    mine.st_ino,
                ):
                    continue
                try:
                    yield
                finally:
                    _unlink_lock(locks, name, mine)
                return
            finally:
                os.close(fd)  # after the unlink: a waiter must not lock a file still named


def _unlink_lock(locks: Dir, name: str, mine: os.stat_result) -> None:
    """Remove lock file `name` if it is still ours (we still hold its lock, so nobody else
    can have replaced it but a sweep of ``tmp/``). A failure to remove only leaves a file
    behind; it never fails the pull."""
    try:
        current = locks.stat(name)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            locks.delete(name)
    except OSError as e:
        log.warning("registry.lock.not_removed", path=str(locks.path / name), error=e.strerror)


_PARTIAL_NAME: Final = re.compile(r"([0-9a-f]{64,128})\.[0-9a-f]{1,64}\.part", re.ASCII)
ADOPT_MIN_SIZE: Final = 1 << 20
"""Blobs smaller than this are not resumed from a dead pull's partial file: downloading them
again costs less than looking."""


def _dead_partials(home: Dir, digest: str, size: int) -> list[tuple[int, str, str]]:
    """Partial downloads of `digest` a pull left in ``tmp/`` or a lease's work directory
    ``tmp/<id>/`` (a `BlobWriter`'s ``<hex>.<random>.part``), biggest first, as (size, work
    directory relative to ``tmp/`` or "", name); only regular files no bigger than the blob.
    Read through `storage.home.Dir`: a link or anything planted is skipped, never
    followed."""
    hexdigest = digest.partition(":")[2]
    found: list[tuple[int, str, str]] = []

    def scan(directory: Dir, relative: str) -> None:
        for name, st in directory.entries():
            match = _PARTIAL_NAME.fullmatch(name)
            if (
                match is not None
                and match[1] == hexdigest
                and stat.S_ISREG(st.st_mode)
                and 0 < st.st_size <= size
            ):
                found.append((st.st_size, relative, name))

    try:
        with home.sub("tmp") as tmp:
            scan(tmp, "")
            for name, st in tmp.entries():
                if stat.S_ISDIR(st.st_mode) and name not in ("leases", "locks"):
                    with contextlib.suppress(OSError, HomeDamagedError), tmp.sub(name) as work:
                        scan(work, name)
    except (OSError, HomeDamagedError):
        return []
    return sorted(found, reverse=True)


def _adopt_partial(store: PullStore, digest: str, size: int, writer: BlobWriting) -> int:
    """Feed `writer` (new, empty) the bytes of the biggest partial download of `digest` that
    an earlier pull left behind (killed, or its machine lost power), so that the download
    resumes with ``Range`` instead of starting from zero; the bytes adopted.

    Called under the blob's download lock, so no pull is writing that digest now (a load may
    be: reading a prefix of its file is harmless). The file is copied, not moved: it belongs
    to a dead lease, and prune reclaims it as before. Its bytes are checked like any others,
    by the blob's digest at commit (the caller downloads again whole when they are bad)."""
    if size < ADOPT_MIN_SIZE:
        return 0
    for _, relative, name in _dead_partials(store.home, digest, size):
        try:
            with (
                store.home.sub(f"tmp/{relative}" if relative else "tmp") as directory,
                directory.open_read(name) as source,
            ):
                while writer.offset < size:
                    try:
                        chunk = source.read(min(1 << 20, size - writer.offset))
                    except OSError:
                        break
                    if not chunk:
                        break
                    writer.write(chunk)  # the store's errors (a full disk) are the pull's
        except (FileNotFoundError, HomeDamagedError):
            continue  # gone (a prune, its own pull finishing) or swapped for something else
        if writer.offset:
            log.debug(
                "registry.blob.adopted_partial", digest=digest, offset=writer.offset, size=size
            )
            break
    return writer.offset


# ---- HTTP helpers ----------------------------------------------------------------------------


_TOKEN: Final = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_CHALLENGE_SCHEME: Final = re.compile(rf"[\s,]*({_TOKEN})(?:[ \t]+|$)")
_CHALLENGE_PARAM: Final = re.compile(
    rf'[ \t]*({_TOKEN})[ \t]*=[ \t]*(?:"((?:[^"\\]|\\.)*)"|({_TOKEN}))[ \t]*,?'
)


def parse_challenges(values: Iterable[str]) -> list[tuple[str, dict[str, str]]]:
    """``WWW-Authenticate`` header values -> [(scheme lower-cased, {param: value})]."""
    challenges: list[tuple[str, dict[str, str]]] = []
    for value in values:
        pos = 0
        while pos < len(value):
            scheme = _CHALLENGE_SCHEME.match(value, pos)
            if scheme is None:
                break
            pos = scheme.end()
            params: dict[str, str] = {}
            while (param := _CHALLENGE_PARAM.match(value, pos)) is not None:
                quoted, plain = param[2], param[3]
                text = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else plain
                params[param[1].lower()] = text
                pos = param.end()
            challenges.append((scheme[1].lower(), params))
    return challenges


_SECONDS: Final = re.compile(r"[0-9]{1,12}", re.ASCII)
_LENGTH: Final = re.compile(r"\s*([0-9]{1,18})\s*", re.ASCII)


def _retry_after(response: httpx.Response) -> float | None:
    """The seconds a ``Retry-After`` header asks for (not capped: the caller decides whether
    it waits that long), or None when absent or unreadable."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):
        return float(value)
    if value.isdigit():  # more digits than any sane wait (or not ASCII ones): forever
        return float("inf")
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        return max((when - datetime.now(UTC)).total_seconds(), 0.0)
    except OverflowError:
        return None


def _read_bounded(
    response: httpx.Response,
    limit: int,
    what: str,
    error: type[RegistryError] = RegistryManifestError,
    *,
    deadline: float = float("inf"),
) -> bytes:
    """The (streamed) response body, refused past `limit` bytes whatever Content-Length says;
    a body still trickling at `deadline` raises `httpx.ReadTimeout` (the caller's error)."""
    declared = _LENGTH.fullmatch(response.headers.get("Content-Length") or "")
    if declared is not None and int(declared[1]) > limit:
        announced = int(declared[1])
        msg = f"{what}: the registry announces {announced} bytes, more than the {limit} limit"
        raise error(msg)
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if time.monotonic() >= deadline:
            raise httpx.ReadTimeout("the pull's deadline passed", request=response.request)
        if len(body) > limit:
            msg = f"{what}: the registry sent more than the {limit} byte limit"
            raise error(msg)
    return bytes(body)


def _tls_failure(error: BaseException) -> ssl.SSLError | None:
    """The TLS error behind a connection error (a certificate that does not verify, a plain
    HTTP server on the other end): retrying would not help."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _error_detail(response: httpx.Response) -> str:
    """``STATUS [CODE: message]`` from a registry error answer (its JSON ``errors``)."""
    detail = f"HTTP {response.status_code}"
    try:
        until = time.monotonic() + ERROR_BODY_TIME
        body = _read_bounded(response, MAX_ERROR_BODY, "error", deadline=until)
        errors = json.loads(body).get("errors")
        parts = [
            f"{e.get('code', '?')}: {e.get('message', '')}".strip()
            for e in errors
            if isinstance(e, dict)
        ]
        if parts:
            detail += f" ({_clip('; '.join(parts))})"
    except (httpx.HTTPError, RegistryError, ValueError, AttributeError, TypeError, RecursionError):
        pass
    return _clip(detail, MAX_MESSAGE_VALUE + 40)


def _drain(response: httpx.Response) -> None:
    """Read a small unwanted body so the connection can be reused, then close (a body that is
    big or slow to come is abandoned with its connection)."""
    try:
        size = 0
        until = time.monotonic() + ERROR_BODY_TIME
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > MAX_ERROR_BODY or time.monotonic() >= until:
                break
    except httpx.HTTPError:
        pass
    finally:
        response.close()


def _media_type(response: httpx.Response) -> str:
    return str(response.headers.get("Content-Type", "")).split(";", 1)[0].strip().lower()


def _digest_of(data: bytes, algorithm: str) -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _safe_url(url: httpx.URL | str) -> str:
    """A URL fit for a log line or an error: no user info, no query (signed storage URLs
    carry secrets), cut short; never raises (a hostile URL may not even parse)."""
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
        host = parsed.host
        if ":" in host:
            host = f"[{host}]"
        if parsed.port is not None:
            host = f"{host}:{parsed.port}"
        text = f"{parsed.scheme}://{host}{parsed.path}"
    except (httpx.InvalidURL, ValueError, TypeError, UnicodeError):
        text = str(url).split("?", 1)[0].rsplit("@", 1)[-1]
    return _clip(text)


def _safe_host(url: httpx.URL | str) -> str:
    """``host[:port]`` of `url` for a message (never its user info); never raises."""
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
        host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
        return _clip(f"{host}:{parsed.port}" if parsed.port is not None else host)
    except (httpx.InvalidURL, ValueError, TypeError, UnicodeError):
        return "an unparseable URL"


def _where(error: httpx.RequestError, host: str) -> str:
    """The host a failed request was talking to: `host`, or where it had been redirected."""
    try:
        failed = _safe_host(error.request.url)
    except RuntimeError:  # httpx raised it without a request
        return host
    return host if failed == host else f"{failed} (redirected from {host})"


def _seconds(value: float | None) -> str:
    """Seconds for a message: ``30``, ``2.5``, ``100000``; ``unlimited`` for None or inf."""
    if value is None or value == float("inf"):
        return "unlimited"
    if value >= 1e12:
        return "more than 10^12"
    return f"{value:.1f}".removesuffix(".0") if value < 100 else f"{value:.0f}"


# ---- the client ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """One repository on one registry, as a pull addresses it."""

    reference: Reference
    host: str  # host[:port] as the reference spells it: the key of credentials and insecure
    base: str  # scheme://api-host[:port]
    insecure: bool
    deadline: float = float("inf")  # time.monotonic() by which the pull must be done

    @property
    def repository(self) -> str:
        return self.reference.repository

    @property
    def scope(self) -> str:
        return f"repository:{self.reference.repository}:pull"


@dataclass
class _Token:
    value: str
    expires: float  # time.monotonic()


class _Auth:
    """What each registry host wants (Basic, or Bearer from a realm) and the tokens we hold."""

    def __init__(self, client: RegistryClient) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._basic: set[str] = set()
        self._realms: dict[str, dict[str, str]] = {}
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._fetching: dict[tuple[str, str], threading.Lock] = {}

    def _credentials(self, host: str) -> tuple[str, str] | None:
        lookup = self._client.options.credentials
        return lookup(host) if lookup is not None else None

    @staticmethod
    def _basic_header(credentials: tuple[str, str]) -> str:
        user, password = credentials
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")

    def header(self, target: _Target) -> str | None:
        """The Authorization header to send up front (None: anonymous)."""
        with self._lock:
            basic = target.host in self._basic
            bearer = target.host in self._realms
        if basic:
            credentials = self._credentials(target.host)
            return self._basic_header(credentials) if credentials is not None else None
        if bearer:
            return f"Bearer {self._token(target)}"
        return None

    def unauthorized(self, target: _Target, response: httpx.Response, sent: str | None) -> None:
        """React to a 401 answer to a request that carried `sent`: learn the challenge and get
        what the retry needs, or raise `RegistryAuthError`."""
        challenges = parse_challenges(response.headers.get_list("WWW-Authenticate"))
        schemes = {scheme: params for scheme, params in reversed(challenges)}
        where = f"{target.host} ({target.reference})"
        if "bearer" in schemes and schemes["bearer"].get("realm"):
            with self._lock:
                self._realms[target.host] = schemes["bearer"]
            refused = sent.removeprefix("Bearer ") if sent and sent.startswith("Bearer ") else None
            self._token(target, refused=refused)
            return
        if "basic" in schemes:
            credentials = self._credentials(target.host)
            if credentials is None:
                msg = f"{where}: the registry requires authentication and we have no credentials"
                raise RegistryAuthError(msg)
            if sent is not None and sent.startswith("Basic "):
                msg = f"{where}: the registry rejected the credentials for {target.host}"
                raise RegistryAuthError(msg)
            with self._lock:
                self._basic.add(target.host)
            return
        if challenges:
            names = ", ".join(sorted({scheme for scheme, _ in challenges}))
            msg = f"{where}: unsupported authentication scheme(s): {names}"
        else:
            msg = f"{where}: unauthorized (401) and no usable WWW-Authenticate challenge"
        raise RegistryAuthError(msg)

    def _token(self, target: _Target, *, refused: str | None = None) -> str:
        """A token for `target`'s scope: the cached one unless it expired or is `refused` (the
        registry just answered 401 to it); otherwise a fresh one, fetched by one thread while
        the others wait for it."""
        key = (target.host, target.scope)
        with self._lock:
            fetch_lock = self._fetching.setdefault(key, threading.Lock())
        with fetch_lock:
            with self._lock:
                cached = self._tokens.get(key)
            if cached is not None and cached.expires > time.monotonic() and cached.value != refused:
                return cached.value
            token = self._fetch_token(target)
            with self._lock:
                self._tokens[key] = token
            return token.value

    def _fetch_token(self, target: _Target) -> _Token:
        with self._lock:
            challenge = dict(self._realms[target.host])
        realm = challenge["realm"]
        try:
            parts = urlsplit(realm)
            usable = parts.scheme in ("http", "https") and bool(parts.hostname)
            url = httpx.URL(realm)
        except (ValueError, httpx.InvalidURL):
            usable = False
        if not usable:
            msg = f"{target.host}: the token realm {_safe_url(realm)!r} is not an http(s) URL"
            raise RegistryAuthError(msg)
        headers: dict[str, str] = {}
        credentials = self._credentials(target.host)
        if credentials is not None:
            if parts.scheme == "http" and not self._client.plain_http_allowed(realm):
                msg = (
                    f"{target.host} ({target.reference}): refusing to send the credentials for"
                    f" {target.host} to the token realm {_safe_url(realm)} over plain HTTP:"
                    " its host is not listed as an insecure registry (use HTTPS, or list it"
                    " with --insecure-registry)"
                )
                raise RegistryAuthError(msg)
            headers["Authorization"] = self._basic_header(credentials)
        params = {"scope": target.scope}
        if challenge.get("service"):
            params["service"] = challenge["service"]
        url = url.copy_merge_params(params)
        started = time.monotonic()
        response = self._client._send(
            None, "GET", url, headers=headers, what="token", deadline=target.deadline
        )
        try:
            if response.status_code in (401, 403):
                detail = _error_detail(response)
                whose = "the credentials" if credentials else "anonymous access"
                msg = (
                    f"{target.host} ({target.reference}): the token server refused {whose}:"
                    f" {detail}"
                )
                raise RegistryAuthError(msg)
            if response.status_code != 200:
                msg = f"{target.host}: the token server answered {_error_detail(response)}"
                raise RegistryError(msg)
            body = _read_bounded(
                response, MAX_TOKEN_RESPONSE, "token", RegistryError, deadline=target.deadline
            )
        except httpx.TimeoutException as e:
            realm_host = _safe_host(url)
            raise self._client._timed_out(e, realm_host, "token", target.deadline) from None
        except httpx.HTTPError as e:
            msg = f"{target.host}: reading the token failed: {type(e).__name__}"
            raise RegistryError(msg) from None
        finally:
            response.close()
        try:
            answer = json.loads(body)
        except (ValueError, RecursionError):
            answer = None
        value = None
        if isinstance(answer, dict):
            value = answer.get("token") or answer.get("access_token")
        if not isinstance(value, str) or not value:
            msg = f"{target.host}: the token server's answer holds no token"
            raise RegistryAuthError(msg)
        lifetime = answer.get("expires_in") if isinstance(answer, dict) else None
        if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        lifetime = min(lifetime, MAX_TOKEN_LIFETIME)
        log.debug(
            "registry.token.fetched",
            host=target.host,
            scope=target.scope,
            lifetime_seconds=lifetime,
            with_credentials=credentials is not None,
        )
        return _Token(value, started + float(lifetime))


class RegistryClient:
    """Pulls images from OCI distribution registries (thread-safe; one connection pool)."""

    def __init__(self, options: RegistryOptions | None = None) -> None:
        self.options = options if options is not None else RegistryOptions()
        context = ssl.create_default_context()
        if self.options.ca_bundle is not None:
            bundle = self.options.ca_bundle
            try:
                context.load_verify_locations(cafile=str(bundle))
            except OSError as e:  # ssl.SSLError too: no certificate in it, or a bad one
                reason = getattr(e, "reason", None) or e.strerror or type(e).__name__
                msg = f"the CA bundle {_clip(bundle)} cannot be used: {_clip(reason, 80)}"
                raise RegistryConfigError(msg) from None
        connections = 2 * self.options.max_concurrent_layers + 4
        self._http = httpx.Client(
            verify=context,
            timeout=httpx.Timeout(self.options.timeout),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            follow_redirects=True,
            max_redirects=MAX_REDIRECTS,
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        )
        self._auth = _Auth(self)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- requests ------------------------------------------------------------------------------

    def _target(self, reference: Reference) -> _Target:
        host = _normalize_host(reference.registry)
        api = DOCKER_HUB_API if host == DEFAULT_REGISTRY else host
        insecure = host in self.options.insecure
        limit = self.options.deadline
        deadline = time.monotonic() + limit if limit is not None else float("inf")
        base = f"{'http' if insecure else 'https'}://{api}"
        return _Target(reference, host, base, insecure, deadline)

    def plain_http_allowed(self, url: httpx.URL | str) -> bool:
        """Whether credentials may go to `url` over plain HTTP: only when its own host is
        listed as insecure (``host:port`` as it spells it, or ``host`` for port 80). Another
        host's insecurity says nothing about this one: a registry on plain HTTP on a trusted
        network may name a token realm anywhere."""
        try:
            parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
            host = parsed.host
        except (httpx.InvalidURL, ValueError, UnicodeError):
            return False
        if not host:
            return False
        if ":" in host:
            host = f"[{host}]"
        names = {f"{host}:{parsed.port or 80}"}
        if parsed.port in (None, 80):
            names.add(host)
        return any(_normalize_host(name) in self.options.insecure for name in names)

    def _delay(self, attempt: int) -> float:
        base = self.options.backoff * (2**attempt)
        return float(min(base, MAX_BACKOFF) * (1 + random.random() / 4))

    def _deadline_error(self, what: str, during: str) -> RegistryTimeoutError:
        limit = self.options.deadline
        return RegistryTimeoutError(
            f"{what}: the pull's deadline of {_seconds(limit)} s passed {during}"
            " (IMAGELEDGER_PULL_DEADLINE)"
        )

    def _check_deadline(self, deadline: float, what: str, during: str) -> None:
        if time.monotonic() >= deadline:
            raise self._deadline_error(what, during)

    def _sleep(self, delay: float, deadline: float, what: str, during: str) -> None:
        """Wait `delay` seconds, unless that would pass the pull's deadline: then fail now."""
        if time.monotonic() + delay >= deadline:
            raise self._deadline_error(what, during)
        time.sleep(delay)

    def _request_timeout(self, deadline: float) -> httpx.Timeout:
        """The per-request timeout: the read timeout, shortened so that no wait runs past the
        pull's deadline."""
        left = deadline - time.monotonic()
        return httpx.Timeout(max(min(self.options.timeout, left), 0.001))

    def _timed_out(
        self, error: httpx.TimeoutException, host: str, what: str, deadline: float
    ) -> RegistryTimeoutError:
        """The error for a request that timed out: the deadline's when it has passed (the
        timeout was shortened to it), else which wait of the read timeout ran out."""
        if time.monotonic() >= deadline - 0.01:
            return self._deadline_error(what, f"waiting for {host}")
        limit = _seconds(self.options.timeout)
        if isinstance(error, httpx.ConnectTimeout):
            text = f"could not connect to {host} within {limit} s"
        elif isinstance(error, httpx.WriteTimeout):
            text = f"could not send to {host} for {limit} s"
        elif isinstance(error, httpx.PoolTimeout):
            text = f"no free connection to {host} within {limit} s"
        else:
            text = f"no data for {limit} s from {host}"
        return RegistryTimeoutError(f"{what}: {text} (IMAGELEDGER_PULL_TIMEOUT)")

    def _send(
        self,
        target: _Target | None,
        method: str,
        url: httpx.URL | str,
        *,
        headers: Mapping[str, str],
        what: str,
        deadline: float | None = None,
    ) -> httpx.Response:
        """Send a request (streamed: the caller reads and closes the response), handling auth
        challenges (when `target` is given), and retrying connection errors, 429 and 5xx
        (a timeout only once: a second one in a row means the registry stalls). Any other
        status is returned to the caller. No wait runs past `deadline` (default: the
        target's); every failure is a `RegistryError` naming the URL without its query."""
        if deadline is None:
            deadline = target.deadline if target is not None else float("inf")
        attempt = 0
        timeouts = 0
        auth_retried = False
        host = target.host if target is not None else _safe_host(url)
        while True:
            self._check_deadline(deadline, what, f"before asking {host}")
            request_headers = dict(headers)
            sent = self._auth.header(target) if target is not None else None
            if sent is not None:
                request_headers["Authorization"] = sent
            try:
                request = self._http.build_request(
                    method, url, headers=request_headers, timeout=self._request_timeout(deadline)
                )
                response = self._http.send(request, stream=True)
            except httpx.TooManyRedirects:
                msg = (
                    f"{what}: {_safe_url(url)} redirected more than {MAX_REDIRECTS} times"
                    " (a redirect loop?)"
                )
                raise RegistryError(msg) from None
            except httpx.TimeoutException as e:
                timeouts += 1
                if timeouts > 1 or attempt >= self.options.retries:
                    raise self._timed_out(e, host, what, deadline) from None
                self._log_retry(what, url, type(e).__name__, attempt, 0.0)
                attempt += 1
                continue
            except httpx.TransportError as e:
                tls = _tls_failure(e)
                if tls is not None:
                    reason = getattr(tls, "verify_message", None) or getattr(tls, "reason", None)
                    msg = f"{what}: TLS with {host} failed: {_clip(reason or tls)}"
                    raise RegistryError(msg) from None
                if isinstance(e, httpx.UnsupportedProtocol):
                    msg = f"{what}: cannot follow {_safe_url(url)}: {_error_text(e)}"
                    raise RegistryError(msg) from None
                if attempt >= self.options.retries:
                    where = _where(e, host)
                    msg = f"{what}: cannot talk to {where}: {type(e).__name__}: {_error_text(e)}"
                    raise RegistryError(msg) from None
                delay = self._delay(attempt)
                self._log_retry(what, url, type(e).__name__, attempt, delay)
                self._sleep(delay, deadline, what, f"retrying {host}")
                attempt += 1
                continue
            except (httpx.HTTPError, httpx.InvalidURL, ValueError, UnicodeError) as e:
                msg = (
                    f"{what}: cannot request {_safe_url(url)}: {type(e).__name__}: {_error_text(e)}"
                )
                raise RegistryError(msg) from None
            timeouts = 0
            status = response.status_code
            log.debug(
                "registry.response", method=method, url=_safe_url(response.url), status=status
            )
            if status == 401 and target is not None:
                if auth_retried:
                    detail = _error_detail(response)
                    response.close()
                    raise RegistryAuthError(self._refusal(target, sent, what, detail))
                try:
                    self._auth.unauthorized(target, response, sent)
                finally:
                    _drain(response)
                auth_retried = True
                continue
            if status == 403 and target is not None:
                detail = _error_detail(response)
                response.close()
                msg = f"{target.host} ({target.reference}): access denied for {what}: {detail}"
                raise RegistryAuthError(msg)
            if status == 429 or status >= 500:
                if attempt >= self.options.retries:
                    detail = _error_detail(response)
                    response.close()
                    msg = f"{what}: {host} answered {detail} (after {self.options.retries} retries)"
                    raise RegistryError(msg)
                after = _retry_after(response)
                _drain(response)
                if after is not None:
                    self._check_retry_after(after, status, host, what, deadline)
                delay = after if after is not None else self._delay(attempt)
                self._log_retry(what, url, str(status), attempt, delay)
                self._sleep(delay, deadline, what, f"waiting to retry {host}")
                attempt += 1
                continue
            return response

    def _check_retry_after(
        self, after: float, status: int, host: str, what: str, deadline: float
    ) -> None:
        """Fail at once when the registry asks for a wait we will not sit through: more than
        `MAX_RETRY_AFTER`, or past the pull's deadline."""
        asked = f"{what}: {host} answered HTTP {status} and asked to wait {_seconds(after)} s"
        if after > MAX_RETRY_AFTER:
            msg = f"{asked} (Retry-After), more than the {_seconds(MAX_RETRY_AFTER)} s a pull waits"
            raise RegistryTimeoutError(msg)
        left = deadline - time.monotonic()
        if after >= left:
            msg = (
                f"{asked} (Retry-After), but the pull's deadline of"
                f" {_seconds(self.options.deadline)} s passes in {_seconds(max(left, 0.0))} s"
                " (IMAGELEDGER_PULL_DEADLINE)"
            )
            raise RegistryTimeoutError(msg)

    @staticmethod
    def _log_retry(
        what: str, url: httpx.URL | str, reason: str, attempt: int, delay: float
    ) -> None:
        log.debug(
            "registry.retry",
            what=what,
            url=_safe_url(url),
            error=reason,
            attempt=attempt + 1,
            delay_seconds=round(delay, 3),
        )

    def _refusal(self, target: _Target, sent: str | None, what: str, detail: str) -> str:
        where = f"{target.host} ({target.reference})"
        if sent is not None and sent.startswith("Basic "):
            return f"{where}: the registry rejected the credentials for {what}: {detail}"
        if self._auth._credentials(target.host) is None:
            return (
                f"{where}: unauthorized for {what} after authenticating anonymously"
                f" (no credentials for {target.host}): {detail}"
            )
        return f"{where}: unauthorized for {what} even with a fresh token: {detail}"

    def _get_small(
        self, target: _Target, url: str, headers: Mapping[str, str], what: str, limit: int
    ) -> tuple[httpx.Response, bytes]:
        """GET a small body (a manifest), retrying a transfer broken midway. A 200 comes back
        closed, with its body; any other status with an empty body and the response still open
        (the caller reads its error detail and closes it)."""
        attempt = 0
        timeouts = 0
        while True:
            response = self._send(target, "GET", url, headers=headers, what=what)
            try:
                if response.status_code != 200:
                    return response, b""
                return response, _read_bounded(response, limit, what, deadline=target.deadline)
            except httpx.TimeoutException as e:
                timeouts += 1
                if timeouts > 1 or attempt >= self.options.retries:
                    raise self._timed_out(e, target.host, what, target.deadline) from None
            except httpx.TransportError as e:
                if attempt >= self.options.retries:
                    msg = f"{what}: the transfer from {target.host} broke: {type(e).__name__}"
                    raise RegistryError(msg) from None
            except httpx.HTTPError as e:  # a body that does not decode: not worth a retry
                msg = f"{what}: unreadable answer from {target.host}: {_error_text(e)}"
                raise RegistryError(msg) from None
            finally:
                if response.status_code == 200:
                    response.close()
            delay = self._delay(attempt)
            self._sleep(delay, target.deadline, what, f"retrying {target.host}")
            attempt += 1

    # -- manifests -----------------------------------------------------------------------------

    def _fetch_manifest(
        self, target: _Target, ref: str, expected: Descriptor | None
    ) -> tuple[bytes, str, str]:
        """(body, media type, digest) of manifest `ref` (a tag or digest), verified: against the
        reference's digest, ``Docker-Content-Digest`` and `expected` (an index entry)."""
        separator = "@" if ref.startswith(("sha256:", "sha512:")) else ":"
        what = f"manifest {target.reference.name}{separator}{ref}"
        url = f"{target.base}/v2/{target.repository}/manifests/{ref}"
        response, body = self._get_small(
            target, url, {"Accept": MANIFEST_ACCEPT}, what, MAX_MANIFEST_SIZE
        )
        try:
            status = response.status_code
            if status == 404:
                detail = _error_detail(response)
                if expected is None:
                    raise NotInRegistryError(str(target.reference), detail)
                msg = f"{what} (listed by the index of {target.reference}) is missing: {detail}"
                raise RegistryError(msg)
            if status != 200:
                msg = f"{what}: {target.host} answered {_error_detail(response)}"
                raise RegistryError(msg)
        finally:
            response.close()
        media_type = _media_type(response)
        if media_type in SCHEMA1_TYPES:
            msg = (
                f"{what}: the registry serves a Docker schema 1 manifest: schema 1 is not supported"
            )
            raise RegistryManifestError(msg)
        if media_type not in MANIFEST_TYPES + INDEX_TYPES:
            msg = (
                f"{what}: the registry answered with Content-Type {media_type or 'none'!r},"
                " not a manifest or index media type"
            )
            raise RegistryManifestError(msg)
        digest = _digest_of(body, "sha256")
        pinned = expected.digest if expected is not None else target.reference.digest
        if pinned is not None:
            actual = _digest_of(body, pinned.partition(":")[0])
            if actual != pinned:
                msg = f"{what}: the registry sent content hashing to {actual}, not {pinned}"
                raise DigestMismatchError(msg)
            digest = pinned
        announced = response.headers.get("Docker-Content-Digest")
        if announced is not None:
            try:
                validate_digest(announced.strip())
            except ImageLedgerError:
                msg = f"{what}: the registry sent a malformed Docker-Content-Digest"
                raise RegistryError(msg) from None
            actual = _digest_of(body, announced.strip().partition(":")[0])
            if actual != announced.strip():
                msg = (
                    f"{what}: the content hashes to {actual} but the registry announced"
                    f" {announced.strip()}"
                )
                raise DigestMismatchError(msg)
        if expected is not None:
            if len(body) != expected.size:
                msg = f"{what}: {len(body)} bytes, its index entry says {expected.size}"
                raise DigestMismatchError(msg)
            if expected.media_type != media_type:
                msg = (
                    f"{what}: served as {media_type!r} but its index entry says"
                    f" {expected.media_type!r}"
                )
                raise RegistryManifestError(msg)
        return body, media_type, digest

    def _resolve(
        self, target: _Target, platform: Platform, emit: _Emitter
    ) -> tuple[bytes, str, str, Platform | None]:
        """Follow the reference (through indexes) to one image manifest for `platform`:
        (body, media type, digest, the platform of the index entry that chose it)."""
        ref = target.reference.digest or target.reference.tag or "latest"
        body, media_type, digest = self._fetch_manifest(target, ref, None)
        chosen: Platform | None = None
        depth = 0
        while media_type in INDEX_TYPES:
            depth += 1
            if depth > MAX_INDEX_DEPTH:
                msg = f"{target.reference}: indexes nested more than {MAX_INDEX_DEPTH} deep"
                raise RegistryManifestError(msg)
            try:
                entries = parse_index(body, media_type, digest=digest)
            except ManifestError as e:
                raise RegistryManifestError(str(e)) from None
            entry = choose_platform(entries, platform)
            if entry is None:
                available = sorted(
                    {str(e.platform) for e in entries if e.platform and not e.attestation}
                )
                offers = ", ".join(available) if available else "no platform at all"
                detail = f"no manifest for {platform}; the index offers {_clip(offers)}"
                raise NotInRegistryError(str(target.reference), detail)
            chosen = entry.platform
            expected = Descriptor(entry.media_type, entry.digest, entry.size)
            body, media_type, digest = self._fetch_manifest(target, entry.digest, expected)
        emit("manifest", digest, len(body), len(body))
        log.debug(
            "registry.manifest",
            reference=str(target.reference),
            digest=digest,
            media_type=media_type,
            platform=str(chosen) if chosen else None,
        )
        return body, media_type, digest, chosen

    # -- blobs ---------------------------------------------------------------------------------

    def _lock(
        self, target: _Target, store: PullStore, digest: str, cancel: threading.Event | None
    ) -> contextlib.AbstractContextManager[None]:
        """The blob's download lock, waited for until the pull's deadline at most."""
        what = f"blob {digest}"
        during = "waiting for another pull of the same blob"
        return _blob_lock(
            store,
            digest,
            deadline=target.deadline,
            cancel=cancel,
            expired=lambda: self._deadline_error(what, during),
        )

    def _fetch_blob(
        self,
        target: _Target,
        store: PullStore,
        descriptor: Descriptor,
        emit: _Emitter,
        cancel: threading.Event,
    ) -> None:
        digest, size = descriptor.digest, descriptor.size
        with self._lock(target, store, digest, cancel):
            if cancel.is_set():
                raise _Cancelled
            if store.has(digest) and store.size(digest) == size:
                emit("blob-cached", digest, size, size)
                log.debug("registry.blob.cached", digest=digest, size=size)
                return
            emit("blob-start", digest, 0, size)
            self._download(target, store, descriptor, emit, cancel)
            emit("blob-done", digest, size, size)

    def _download(
        self,
        target: _Target,
        store: PullStore,
        descriptor: Descriptor,
        emit: _Emitter,
        cancel: threading.Event,
        *,
        adopt: bool = True,
    ) -> None:
        """Download the blob into a new writer, resuming (``Range``) what a dead pull left
        (`_adopt_partial`) and any transfer that breaks. A blob that fails to verify after
        resuming from a dead pull's bytes is downloaded again whole, once (those bytes may
        have been damaged: a crash, a power cut, a hand in ``tmp/``)."""
        digest, size = descriptor.digest, descriptor.size
        what = f"blob {digest}"
        url = f"{target.base}/v2/{target.repository}/blobs/{digest}"
        writer = store.writer(digest, size=size)
        try:
            adopted = _adopt_partial(store, digest, size, writer) if adopt else 0
            if adopted:
                emit("blob-bytes", digest, adopted, size)
            attempt = 0
            stalls = 0
            furthest = adopted
            while True:
                if adopted and writer.offset >= size:
                    break  # the dead pull had it all, and died before it could commit
                headers: dict[str, str] = {}
                if writer.offset:
                    headers["Range"] = f"bytes={writer.offset}-"
                response = self._send(target, "GET", url, headers=headers, what=what)
                broken: str
                try:
                    status = response.status_code
                    if status == 206:
                        start = _range_start(response.headers.get("Content-Range"))
                        if start != writer.offset:
                            log.debug("registry.blob.bad_range", digest=digest, start=start)
                            raise _Restart("a wrong Content-Range")
                        log.debug("registry.blob.resumed", digest=digest, offset=writer.offset)
                    elif status == 200:
                        if writer.offset:
                            log.debug("registry.blob.restarted", digest=digest)
                            writer.abort()
                            writer = store.writer(digest, size=size)
                    elif status == 416 and writer.offset:
                        raise _Restart("416 for a resume")
                    elif status == 404:
                        msg = (
                            f"{what} of {target.reference} is not in the registry:"
                            f" {_error_detail(response)}"
                        )
                        raise RegistryError(msg)
                    else:
                        msg = f"{what}: {target.host} answered {_error_detail(response)}"
                        raise RegistryError(msg)
                    reported = writer.offset
                    for chunk in response.iter_bytes():
                        writer.write(chunk)
                        if writer.offset - reported >= PROGRESS_STEP or writer.offset == size:
                            reported = writer.offset
                            emit("blob-bytes", digest, reported, size)
                        if cancel.is_set():
                            raise _Cancelled
                        if time.monotonic() >= target.deadline:
                            during = f"at byte {writer.offset} of {size} from {target.host}"
                            raise self._deadline_error(what, during)
                    if writer.offset >= size:
                        break
                    broken = "ended early"
                except _Restart as restart:
                    broken = str(restart)
                    writer.abort()
                    writer = store.writer(digest, size=size)
                    _drain(response)
                except httpx.TimeoutException as e:
                    broken = type(e).__name__
                    stalls += 1
                    if time.monotonic() >= target.deadline - 0.01 or (
                        stalls > 1 and writer.offset <= furthest
                    ):
                        raise self._timed_out(e, target.host, what, target.deadline) from None
                except httpx.TransportError as e:
                    broken = type(e).__name__
                except httpx.HTTPError as e:  # a body that does not decode: not worth a retry
                    msg = f"{what}: unreadable answer from {target.host}: {_error_text(e)}"
                    raise RegistryError(msg) from None
                finally:
                    response.close()
                if writer.offset > furthest:
                    furthest = writer.offset
                    attempt = 0  # progress: the retry budget is per stall, not per blob
                    stalls = 0
                if attempt >= self.options.retries:
                    msg = (
                        f"{what}: the transfer from {target.host} broke ({broken}) at byte"
                        f" {writer.offset} of {size}, after {self.options.retries} retries"
                    )
                    raise RegistryError(msg)
                delay = self._delay(attempt) if attempt else 0.0
                log.debug(
                    "registry.blob.interrupted",
                    digest=digest,
                    offset=writer.offset,
                    size=size,
                    reason=broken,
                    delay_seconds=round(delay, 3),
                )
                self._sleep(delay, target.deadline, what, f"retrying {target.host}")
                attempt += 1
            try:
                writer.commit()
            except DigestMismatchError:
                if not adopted:
                    raise
                log.warning("registry.blob.adopted_partial_bad", digest=digest, offset=adopted)
                self._download(target, store, descriptor, emit, cancel, adopt=False)
        except BaseException:
            writer.abort()
            raise

    def _fetch_layers(
        self,
        target: _Target,
        store: PullStore,
        layers: list[Descriptor],
        emit: _Emitter,
    ) -> None:
        cancel = threading.Event()
        workers = min(self.options.max_concurrent_layers, len(layers))
        if workers == 0:
            return
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imageledger-pull")
        futures: list[Future[None]] = []
        try:
            futures = [
                pool.submit(self._fetch_blob, target, store, layer, emit, cancel)
                for layer in layers
            ]
            wait(futures, return_when=FIRST_EXCEPTION)
        finally:
            cancel.set()  # all done, or one failed (or we were interrupted): stop the others
            pool.shutdown(wait=True, cancel_futures=True)
        errors = [
            e
            for f in futures
            if not f.cancelled() and (e := f.exception()) is not None
            if not isinstance(e, _Cancelled)
        ]
        if errors:
            raise errors[0]

    # -- pull ----------------------------------------------------------------------------------

    def pull(
        self,
        reference: Reference,
        store: PullStore,
        *,
        platform: Platform,
        progress: Callable[[PullProgress], None] | None = None,
    ) -> ImageContent:
        """Fetch `reference` (an index resolves to `platform`) into `store`; its content.

        Every failure of the registry or the connection is a `RegistryError` (its message one
        line, naming the registry or URL, never a credential); the store's own errors
        (`DiskFullError`...) pass through."""
        try:
            return self._pull(reference, store, platform=platform, progress=progress)
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            # A safety net: each request handles its own errors, and one that slips through
            # must still be one line, not a traceback (and not an httpx type callers don't know).
            msg = f"{reference}: {type(e).__name__}: {_error_text(e)}"
            raise RegistryError(msg) from None

    def _pull(
        self,
        reference: Reference,
        store: PullStore,
        *,
        platform: Platform,
        progress: Callable[[PullProgress], None] | None = None,
    ) -> ImageContent:
        target = self._target(reference)
        emit = _Emitter(progress)
        started = time.monotonic()
        log.debug(
            "registry.pull.start",
            reference=str(reference),
            url=target.base,
            platform=str(platform),
        )
        body, media_type, digest, chosen = self._resolve(target, platform, emit)
        try:
            manifest = parse_manifest(body, media_type, digest=digest)
        except ManifestError as e:
            raise RegistryManifestError(str(e)) from None
        if manifest.config.media_type not in CONFIG_TYPES:
            msg = (
                f"manifest {digest} of {reference}: config media type"
                f" {manifest.config.media_type!r} is not an image config: not a container image"
            )
            raise RegistryManifestError(msg)
        if manifest.config.size > MAX_MANIFEST_SIZE:
            msg = (
                f"manifest {digest} of {reference}: config of {manifest.config.size} bytes is"
                f" larger than the {MAX_MANIFEST_SIZE} byte limit"
            )
            raise RegistryManifestError(msg)
        cancel = threading.Event()
        self._fetch_blob(target, store, manifest.config, emit, cancel)
        unique: dict[str, Descriptor] = {}
        for layer in manifest.layers:
            unique.setdefault(layer.digest, layer)
        self._fetch_layers(target, store, list(unique.values()), emit)
        with self._lock(target, store, digest, None):
            if not (store.has(digest) and store.size(digest) == len(body)):
                store.write_bytes(body, digest)
        try:
            content = describe_image(
                store, digest, platform_hint=chosen or platform, media_type=media_type
            )
        except ManifestError as e:
            raise RegistryManifestError(f"{reference}: {e}") from None
        log.debug(
            "registry.pull.done",
            reference=str(reference),
            digest=digest,
            layers=len(manifest.layers),
            seconds=round(time.monotonic() - started, 3),
        )
        return content


def _range_start(content_range: str | None) -> int | None:
    """The first byte of a ``Content-Range: bytes <start>-<end>/<total>`` header."""
    if not content_range:
        return None
    match = re.fullmatch(
        r"\s*bytes\s+([0-9]{1,18})-([0-9]{1,18})/([0-9]{1,18}|\*)\s*", content_range, re.ASCII
    )
    return int(match[1]) if match else None


# ---- platforms -------------------------------------------------------------------------------


def _variant(platform: Platform) -> str | None:
    if platform.architecture == "arm64" and platform.variant in (None, "v8"):
        return "v8"
    return platform.variant


def _variant_number(variant: str | None) -> int | None:
    if variant and variant[0] == "v" and variant[1:].isdigit():
        return int(variant[1:])
    return None


def choose_platform(  # noqa: PLR0911
    entries: Iterable[IndexEntry], platform: Platform
) -> IndexEntry | None:
    """The index entry for `platform`, attestations skipped: the exact os/architecture/variant
    (arm64's variant defaults to v8); else, when no variant is asked for, the first entry of the
    os/architecture; else one of the os/architecture without a variant; else the highest
    ``vN`` variant not above the one asked for (an arm/v6 image runs on arm/v7)."""
    candidates = [
        e
        for e in entries
        if not e.attestation
        and e.platform is not None
        and e.platform.os == platform.os
        and e.platform.architecture == platform.architecture
    ]
    wanted = _variant(platform)
    for entry in candidates:
        assert entry.platform is not None
        if _variant(entry.platform) == wanted:
            return entry
    if not candidates:
        return None
    if platform.variant is None:
        return candidates[0]
    for entry in candidates:
        assert entry.platform is not None
        if entry.platform.variant is None:
            return entry
    number = _variant_number(wanted)
    if number is None:
        return None
    compatible = [
        (n, i)
        for i, e in enumerate(candidates)
        if e.platform is not None
        and (n := _variant_number(e.platform.variant)) is not None
        and n <= number
    ]
    if not compatible:
        return None
    return candidates[max(compatible, key=lambda pair: (pair[0], -pair[1]))[1]]


__all__ = [
    "MANIFEST_ACCEPT",
    "BlobWriting",
    "NotInRegistryError",
    "PullProgress",
    "PullStore",
    "RegistryAuthError",
    "RegistryClient",
    "RegistryConfigError",
    "RegistryError",
    "RegistryManifestError",
    "RegistryOptions",
    "RegistryTimeoutError",
    "choose_platform",
    "docker_config_credentials",
    "options_from_environment",
    "parse_challenges",
]
