"""How a `RegistryClient` reaches registries: `RegistryOptions`, and reading them from the
environment and Docker's config (`options_from_environment`).

**Credentials from the environment** must name their registry (``IMAGELEDGER_REGISTRY_HOST``):
a user and password sent to whichever registry asks would go to any host a reference names.
Without it they are refused (`RegistryConfigError`). **Waits are bounded**: `timeout` is the
read timeout (no byte for that long: a stall), `deadline` bounds a whole pull; both come from
``IMAGELEDGER_PULL_TIMEOUT`` and ``IMAGELEDGER_PULL_DEADLINE`` unless given.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from imageledger.domain.errors import RegistryConfigError
from imageledger.storage.credentials import (
    CredentialChain,
    Credentials,
    auth_file_entries,
    auth_files,
    auth_key_host,
    config_auths,
    config_helpers,
    docker_config_path,
    normalize_host,
    read_docker_config,
)
from imageledger.storage.redact import clip
from imageledger.storage.registriesconf import (
    RegistriesConfig,
    config_fingerprint,
    file_seen,
    load_registries_conf,
)

MAX_BACKOFF: Final = 10.0
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

ENV_INSECURE: Final = "IMAGELEDGER_INSECURE_REGISTRIES"
ENV_CA_BUNDLE: Final = "IMAGELEDGER_CA_BUNDLE"
ENV_USER: Final = "IMAGELEDGER_REGISTRY_USER"
ENV_PASSWORD: Final = "IMAGELEDGER_REGISTRY_PASSWORD"
ENV_HOST: Final = "IMAGELEDGER_REGISTRY_HOST"
ENV_TIMEOUT: Final = "IMAGELEDGER_PULL_TIMEOUT"
ENV_DEADLINE: Final = "IMAGELEDGER_PULL_DEADLINE"


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
    take (None: no limit; see `DEFAULT_DEADLINE` for why one hour). `registries`: the
    containers registries configuration (`storage.registriesconf`: prefixes, mirrors,
    location rewrites, blocked and insecure registries); None: none, every reference goes to
    the registry it names.
    """

    insecure: frozenset[str] = frozenset()
    ca_bundle: Path | None = None
    credentials: Credentials | None = field(default=None, repr=False)
    max_concurrent_layers: int = 4
    retries: int = 5
    timeout: float = DEFAULT_TIMEOUT
    backoff: float = 0.25
    deadline: float | None = DEFAULT_DEADLINE
    registries: RegistriesConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.insecure, str):
            msg = "insecure must be a set of host[:port] names, not a string"
            raise TypeError(msg)
        object.__setattr__(self, "insecure", frozenset(normalize_host(h) for h in self.insecure))
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


_DURATION: Final = re.compile(r"([0-9]{1,9}(?:\.[0-9]{1,9})?)\s*(s|m|h)?", re.ASCII)
_UNIT: Final = {None: 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


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
            f" 90s, 5m, 1h), got {clip(raw, 40)!r}"
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
    host = auth_key_host(host_value)
    if not host or any(c.isspace() or not c.isprintable() for c in host):
        msg = f"{ENV_HOST} must be a registry host[:port], got {clip(host_value, 80)!r}"
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
    registries_conf: str | os.PathLike[str] | None = None,
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
      ``PATH``), and where it has none, ``auths``; the containers auth files
      (``$REGISTRY_AUTH_FILE`` or ``$XDG_RUNTIME_DIR/containers/auth.json``, then
      ``~/.config/containers/auth.json``, per-repository keys) come before Docker's config;
    - the registries configuration: `registries_conf` (then its drop-ins), else the files
      containers-registries.conf(5) names (`storage.registriesconf.load_registries_conf`).

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
    config_path = docker_config_path(env)
    config = read_docker_config(config_path) if config_path is not None else {}
    docker = config_auths(config, config_path) if config_path is not None else {}
    path = env.get("PATH", os.defpath)
    containers = []
    for auth_file in auth_files(env):
        document = read_docker_config(auth_file)
        containers.append((auth_file_entries(document, auth_file), config_helpers(document)[1]))
    chain = CredentialChain(
        credentials,
        env_credentials,
        env_host,
        docker,
        config_helpers(config),
        path,
        containers=containers,
    )
    return RegistryOptions(
        insecure=frozenset(hosts),
        ca_bundle=bundle,
        credentials=chain,
        max_concurrent_layers=max_concurrent_layers,
        retries=retries,
        timeout=timeout,
        deadline=deadline,
        registries=load_registries_conf(env, registries_conf),
    )


def environment_fingerprint(
    environ: Mapping[str, str] | None = None,
    registries_conf: str | os.PathLike[str] | None = None,
) -> tuple[object, ...]:
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
        "REGISTRY_AUTH_FILE",
        "XDG_RUNTIME_DIR",
        "XDG_CONFIG_HOME",
        "HOME",
    )
    config = docker_config_path(env)
    seen = file_seen(config)
    files = tuple((str(f), file_seen(f)) for f in auth_files(env))
    registries = config_fingerprint(env, registries_conf)
    # A digest, not the values: the password must not sit in a long-lived tuple in memory
    # any more than it already does, nor show up in a repr.
    values = hashlib.sha256(repr([env.get(n) for n in names]).encode()).hexdigest()
    return values, str(config), seen, env.get("PATH", os.defpath), files, registries


__all__ = [
    "DEFAULT_DEADLINE",
    "DEFAULT_TIMEOUT",
    "MAX_BACKOFF",
    "MAX_DEADLINE",
    "MAX_TIMEOUT",
    "RegistryOptions",
    "environment_fingerprint",
    "options_from_environment",
]
