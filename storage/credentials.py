"""Registry credentials: the caller's, the containers auth files', Docker's ``config.json``
and credential helpers; and writing the auth file for `login` and `logout`.

`CredentialChain` answers "which user and password for this repository on this registry
host?" from, in order: the credentials given by the call, those of the environment (only for
the registry the environment names: see `storage.registryoptions`), the containers auth files
(containers-auth.json(5): `auth_files`, each in turn: its ``credHelpers`` helper for the
registry, then its ``auths`` keyed by ``registry``, ``registry/namespace`` or
``registry/namespace/repo``, the most specific key matching the repository first; the first
file holding a match wins), the credential helper Docker's config
names for the host (``credHelpers``, else ``credsStore``; asked once per host), then the
config's ``auths``. A host is compared as references spell it, Docker Hub's aliases folded
into ``docker.io`` (`normalize_host`). Nothing here logs a credential or a helper's output:
an unreadable config or a failing helper is logged by name and taken as "no credentials".
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
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
    found: dict[str, tuple[str, str]] = {}
    for key, credentials in _auth_entries(config, path):
        found.setdefault(auth_key_host(key), credentials)
    return found


def _auth_entries(config: Mapping[str, Any], path: Path) -> Iterator[tuple[str, tuple[str, str]]]:
    """(key, (user, password)) of the ``auths`` of a Docker or containers auth file."""
    auths = config.get("auths")
    if not isinstance(auths, dict):
        return
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
            yield key, (user, password)


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


# ---- containers-auth.json(5) ----------------------------------------------------------------

ENV_AUTH_FILE: Final = "REGISTRY_AUTH_FILE"


def auth_files(environ: Mapping[str, str]) -> list[Path]:
    """The containers auth files, in the order they are read (containers-auth.json(5)): the
    file named by ``$REGISTRY_AUTH_FILE`` or, when unset, ``$XDG_RUNTIME_DIR/containers/
    auth.json`` (``/run/containers/$UID/auth.json`` without ``XDG_RUNTIME_DIR``), then
    ``$XDG_CONFIG_HOME/containers/auth.json`` (``~/.config/...``). Docker's ``config.json``
    comes after them (`docker_config_path`), read as it always was."""
    files = [default_auth_file(environ)]
    user = containers_user_dir(environ)
    if user is not None:
        files.append(user / "auth.json")
    return files


def containers_user_dir(environ: Mapping[str, str]) -> Path | None:
    """The per-user directory of the containers configuration (its auth file, its
    registries.conf): ``$XDG_CONFIG_HOME/containers``, else ``~/.config/containers``."""
    xdg = environ.get("XDG_CONFIG_HOME")
    if xdg:
        return Path(xdg) / "containers"
    home = environ.get("HOME")
    return Path(home) / ".config" / "containers" if home else None


def default_auth_file(environ: Mapping[str, str]) -> Path:
    """Where `login` writes: ``$REGISTRY_AUTH_FILE``, else the containers default,
    ``$XDG_RUNTIME_DIR/containers/auth.json`` (``/run/containers/$UID/auth.json``)."""
    named = environ.get(ENV_AUTH_FILE)
    if named:
        return Path(named)
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "containers" / "auth.json"
    return Path("/run/containers") / str(os.getuid()) / "auth.json"


def chosen_auth_file(
    auth_file: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None
) -> Path:
    """The auth file `login` and `logout` write: `auth_file`, else `default_auth_file`."""
    if auth_file is not None:
        return Path(auth_file)
    return default_auth_file(os.environ if environ is None else environ)


def auth_key(key: str) -> str:
    """An auth file's key as references spell it: ``registry[/namespace.../repo]`` with the
    host lower-cased and Docker Hub's aliases folded (a legacy URL key names its host)."""
    text = key.strip()
    if "://" in text:
        return auth_key_host(text)
    host, sep, path = text.partition("/")
    return normalize_host(host) + (f"/{path.strip('/')}" if sep and path.strip("/") else "")


def repository_keys(host: str, repository: str) -> list[str]:
    """The keys that may hold credentials for `repository` on `host`, most specific first:
    ``host/a/b/repo``, ``host/a/b``, ``host/a``, ``host``."""
    host = normalize_host(host)
    keys = []
    parts = repository.split("/") if repository else []
    while parts:
        keys.append(f"{host}/{'/'.join(parts)}")
        parts.pop()
    keys.append(host)
    return keys


def auth_file_entries(config: Mapping[str, Any], path: Path) -> dict[str, tuple[str, str]]:
    """The ``auths`` of a containers auth file: key (`auth_key`) -> (user, password)."""
    found: dict[str, tuple[str, str]] = {}
    for key, credentials in _auth_entries(config, path):
        found.setdefault(auth_key(key), credentials)
    return found


class CredentialChain:
    """Credentials from the call, then the environment, then the containers auth files
    (per-repository keys), then Docker's config.json: its credential helper for the host
    (asked once per host), then its ``auths``."""

    def __init__(
        self,
        explicit: Credentials | None,
        env_user: tuple[str, str] | None,
        env_host: str | None,
        docker: Mapping[str, tuple[str, str]],
        helpers: tuple[str | None, Mapping[str, str]] = (None, {}),
        path: str | None = None,
        containers: Sequence[tuple[Mapping[str, tuple[str, str]], Mapping[str, str]]] = (),
    ) -> None:
        self._explicit = explicit
        self._env = env_user
        self._env_host = env_host
        # Each containers auth file: its auths (per-repository keys) and its credHelpers.
        self._containers = [(dict(entries), dict(helpers)) for entries, helpers in containers]
        self._docker = dict(docker)
        self._store, self._helpers = helpers[0], dict(helpers[1])
        self._path = path
        self._asked: dict[tuple[str, str], tuple[str, str] | None] = {}
        self._lock = threading.Lock()

    def __call__(self, host: str) -> tuple[str, str] | None:
        return self.for_repository(host, "")

    def for_repository(self, host: str, repository: str) -> tuple[str, str] | None:
        """The credentials for `repository` (``namespace/repo``; empty: the registry as a
        whole) on registry `host`."""
        host = normalize_host(host)
        if self._explicit is not None:
            found = self._explicit(host)
            if found is not None:
                return found
        if self._env is not None and self._env_host == host:
            return self._env
        keys = repository_keys(host, repository)
        for entries, file_helpers in self._containers:
            # A file's credential helper for the registry first, then its keys (as
            # containers/image reads each file in turn).
            named = file_helpers.get(host)
            found = self._ask(named, host) if named is not None else None
            if found is not None:
                return found
            for key in keys:
                if key in entries:
                    return entries[key]
        helper = self._helpers.get(host, self._store)
        found = self._ask(helper, host) if helper is not None else None
        if found is not None:
            return found
        return self._docker.get(host)

    def _ask(self, helper: str, host: str) -> tuple[str, str] | None:
        """What credential helper `helper` answers for `host`, asked once (concurrent layer
        downloads wait for the one run)."""
        with self._lock:
            if (helper, host) not in self._asked:
                self._asked[helper, host] = helper_credentials(helper, host, self._path)
            return self._asked[helper, host]

    def __repr__(self) -> str:
        return "<registry credentials>"


# ---- writing the auth file (login, logout) --------------------------------------------------


def _auth_document(path: Path) -> dict[str, Any]:
    """The auth file as a dict to update: missing is empty; one that is not a JSON object is
    refused rather than overwritten (it may hold credentials a person wants to keep)."""
    from imageledger.domain.errors import RegistryConfigError

    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as e:
        msg = f"cannot read the auth file {path}: {e.strerror}"
        raise RegistryConfigError(msg) from None
    try:
        document = json.loads(raw) if raw.strip() else {}
    except ValueError:
        document = None
    if not isinstance(document, dict) or not isinstance(document.get("auths", {}), dict):
        msg = f"the auth file {path} is not a containers-auth.json(5) file; it was left alone"
        raise RegistryConfigError(msg)
    return document


def _write_auth_document(path: Path, document: Mapping[str, Any]) -> None:
    """Replace the auth file whole (a temporary file in its directory, mode 0600, fsynced,
    renamed over it): a reader never sees half a file, and nobody else may read it."""
    import tempfile

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = (json.dumps(document, indent="\t", sort_keys=True) + "\n").encode()
    fd, temporary = tempfile.mkstemp(prefix=".auth.json.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def store_credentials(path: Path, key: str, user: str, password: str) -> None:
    """Write (user, password) for `key` (``registry[/namespace...]``) into the auth file at
    `path` as containers tools do (``auths.<key>.auth``: base64 of ``user:password``), every
    other entry kept. Nothing is logged."""
    document = _auth_document(path)
    auths = document.setdefault("auths", {})
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    auths[key] = {"auth": token}
    _write_auth_document(path, document)


def remove_credentials(path: Path, key: str | None) -> list[str]:
    """Remove the credentials of `key` from the auth file at `path` (None: every registry's);
    the keys removed (empty: none were there, and the file is left as it was)."""
    document = _auth_document(path)
    auths: dict[str, Any] = document.get("auths", {})
    removed = sorted(auths) if key is None else [k for k in auths if auth_key(k) == key]
    if removed:
        for k in removed:
            del auths[k]
        _write_auth_document(path, document)
    return removed


def logout(
    registry: str | None,
    *,
    auth_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[Path, list[str]]:
    """Forget the stored credentials of `registry` (``host[:port][/namespace...]``; None:
    of every registry) in the auth file (`auth_file`, else ``$REGISTRY_AUTH_FILE``, else the
    containers default). The file and the keys removed."""
    path = chosen_auth_file(auth_file, environ)
    return path, remove_credentials(path, None if registry is None else auth_key(registry))


__all__ = [
    "ENV_AUTH_FILE",
    "CredentialChain",
    "Credentials",
    "auth_file_entries",
    "auth_files",
    "auth_key",
    "auth_key_host",
    "chosen_auth_file",
    "config_auths",
    "config_helpers",
    "containers_user_dir",
    "default_auth_file",
    "docker_config_credentials",
    "docker_config_path",
    "helper_credentials",
    "logout",
    "normalize_host",
    "read_docker_config",
    "remove_credentials",
    "repository_keys",
    "store_credentials",
]
