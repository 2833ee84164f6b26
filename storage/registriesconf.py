"""The containers registries configuration, version 2: containers-registries.conf(5) and its
drop-ins, containers-registries.conf.d(5), as Podman, skopeo and CRI-O hosts already have it.

**Which files** (`config_files`), as containers/image's ``sysregistriesv2`` chooses them:

1. the main file: the one given (``--registries-conf`` on the command line,
   ``ImageCache(registries_conf=...)``), else ``$CONTAINERS_REGISTRIES_CONF``, else the
   per-user file ``$XDG_CONFIG_HOME/containers/registries.conf`` (``~/.config/...`` without
   ``XDG_CONFIG_HOME``) when it exists, else ``/etc/containers/registries.conf``. A main file
   that does not exist is an empty configuration;
2. then the drop-ins (``*.conf`` regular files only, each directory in name order): when the
   per-user file was chosen because it exists, only the per-user
   ``containers/registries.conf.d/``; otherwise ``/etc/containers/registries.conf.d/`` and
   then the per-user one.

``$IMAGELEDGER_CONTAINERS_ROOT`` (default ``/``) is prefixed to the two ``/etc/containers``
paths, as containers/image's ``RootForImplicitAbsolutePaths``: a chroot or a test suite
points it elsewhere, so that nothing of the real host's ``/etc`` is read.

**Merging**: a later file's ``[[registry]]`` table replaces an earlier one with the same
``prefix`` and adds the others. Within one file a prefix appears once.

**Matching** (`RegistriesConfig.find`): a table's ``prefix`` (default: its ``location``)
matches a reference ``registry/repository[:tag|@digest]`` (canonical: ``docker.io/library/``
spelled out) when the reference starts with it and continues with ``/``, ``@`` or, when the
prefix holds a repository path, ``:`` (a host-only prefix does not match another port:
``example.com`` is not ``example.com:5000``, a behaviour containers/image documents as
unintended). A prefix ``*.example.com`` matches the hosts under ``example.com`` (not
``example.com`` itself) and may not have a ``location``. The longest matching prefix wins.

**Endpoints** (`RegistriesConfig.endpoints`): the matching table's mirrors, in order, that
take the reference (``pull-from-mirror``: ``all``, ``digest-only``, ``tag-only``;
``mirror-by-digest-only = true`` makes every mirror digest-only), then the primary location.
The reference's matched prefix is replaced by an endpoint's ``location``. ``insecure = true``
means what ``--insecure-registry`` means here: plain HTTP (imageledger has no "TLS without
verification" mode). ``blocked = true`` refuses the pull (`RegistryBlockedError`).

Not used, on purpose: ``unqualified-search-registries``, ``short-name-mode`` and
``[aliases]``. A short name keeps Docker's normalization (``alpine`` is
``docker.io/library/alpine``) whatever the host's configuration says: the ledger records
references, and a short name resolving differently per host would make them ambiguous; a
runtime needs one answer. ``credential-helpers`` is not used either (credentials come from
`storage.credentials`). A version 1 file (``[registries.insecure]``, ``[registries.block]``:
lists of hosts) is read as tables of those hosts; its ``[registries.search]`` is not used.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from imageledger.domain.errors import (
    ImageLedgerError,
    RegistryBlockedError,
    RegistryConfigError,
)
from imageledger.domain.log import get_logger
from imageledger.domain.reference import Reference
from imageledger.storage.credentials import containers_user_dir
from imageledger.storage.redact import clip

log = get_logger(__name__)

ENV_REGISTRIES_CONF: Final = "CONTAINERS_REGISTRIES_CONF"
ENV_ROOT: Final = "IMAGELEDGER_CONTAINERS_ROOT"
SYSTEM_FILE: Final = "etc/containers/registries.conf"
SYSTEM_DIR: Final = "etc/containers/registries.conf.d"
MAX_FILE: Final = 4 << 20
"""Bytes a registries.conf may have: a configuration, not a data set."""

PullFromMirror = Literal["all", "digest-only", "tag-only"]
_PULL_FROM_MIRROR: Final[dict[str, PullFromMirror]] = {
    "all": "all",
    "digest-only": "digest-only",
    "tag-only": "tag-only",
}
_IGNORED_KEYS: Final = frozenset(
    {
        "unqualified-search-registries",
        "short-name-mode",
        "aliases",
        "credential-helpers",
        "additional-layer-store-auth-helper",
    }
)
_REGISTRY_KEYS: Final = frozenset(
    {"prefix", "location", "insecure", "blocked", "mirror", "mirror-by-digest-only"}
)
_MIRROR_KEYS: Final = frozenset({"location", "insecure", "pull-from-mirror"})


@dataclass(frozen=True)
class Mirror:
    """One ``[[registry.mirror]]``."""

    location: str
    insecure: bool = False
    pull_from_mirror: PullFromMirror = "all"

    def takes(self, reference: Reference) -> bool:
        """Whether this mirror is asked for `reference` (by digest, or by tag)."""
        if self.pull_from_mirror == "digest-only":
            return reference.digest is not None
        if self.pull_from_mirror == "tag-only":
            return reference.digest is None
        return True


@dataclass(frozen=True)
class RegistryEntry:
    """One ``[[registry]]`` table, after its defaults (`origin`: the file that set it)."""

    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirrors: tuple[Mirror, ...] = ()
    origin: str = ""

    @property
    def wildcard(self) -> bool:
        return self.prefix.startswith("*.")

    def match(self, reference: str) -> int:
        """How many characters of `reference` (``registry/repository[:tag|@digest]``) the
        prefix matches, or -1."""
        return prefix_match(reference, self.prefix)


@dataclass(frozen=True)
class Endpoint:
    """Where one attempt of a pull goes: a repository on a registry."""

    reference: Reference
    """The pulled reference as this endpoint names it (rewritten to its location)."""
    insecure: bool
    mirror: bool

    @property
    def location(self) -> str:
        """``registry/repository`` on this endpoint."""
        return self.reference.name


def prefix_match(reference: str, prefix: str) -> int:
    """The length of `reference` that `prefix` matches (see the module docstring), or -1."""
    if prefix.startswith("*."):
        host, _, _ = reference.partition("/")
        domain = prefix[1:]  # ".example.com"
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name.endswith(domain) and len(name) > len(domain):
            return len(name)  # as containers/image: a port stays with the rest
        return -1
    if reference == prefix:
        return len(prefix)
    if not reference.startswith(prefix):
        return -1
    follows = reference[len(prefix)]
    if follows in "/@" or (follows == ":" and "/" in prefix):
        return len(prefix)
    return -1


@dataclass(frozen=True)
class RegistriesConfig:
    """The ``[[registry]]`` tables of the files read (`files`, in the order read)."""

    registries: tuple[RegistryEntry, ...] = ()
    files: tuple[str, ...] = ()

    def insecure_hosts(self) -> frozenset[str]:
        """The hosts of every location and mirror marked insecure (spoken to over plain
        HTTP, and so allowed to receive credentials over it)."""
        hosts: set[str] = set()
        for entry in self.registries:
            if entry.insecure and not entry.wildcard:
                hosts.add(entry.location.split("/", 1)[0].lower())
            hosts.update(m.location.split("/", 1)[0].lower() for m in entry.mirrors if m.insecure)
        return frozenset(hosts)

    def find(self, reference: Reference) -> tuple[RegistryEntry, int] | None:
        """The table whose prefix matches `reference` longest, with the matched length."""
        text = str(reference)
        best: tuple[RegistryEntry, int] | None = None
        for entry in self.registries:
            length = entry.match(text)
            if length >= 0 and (best is None or len(entry.prefix) > len(best[0].prefix)):
                best = (entry, length)
        return best

    def endpoints(
        self, reference: Reference, insecure: frozenset[str] = frozenset()
    ) -> tuple[Endpoint, ...]:
        """Where a pull of `reference` goes, in order: the mirrors that take it, then the
        primary location. `insecure`: hosts listed insecure elsewhere (``--insecure-registry``).
        `RegistryBlockedError` when the matching table is blocked; `RegistryConfigError` when
        a location rewrites the reference into something that is not a reference."""
        found = self.find(reference)
        if found is None:
            return (Endpoint(reference, reference.registry in insecure, mirror=False),)
        entry, matched = found
        if entry.blocked:
            msg = (
                f"{reference}: pulls from {entry.prefix} are blocked by the registries"
                f" configuration ({entry.origin})"
            )
            raise RegistryBlockedError(msg)
        rest = str(reference)[matched:]
        out: list[Endpoint] = []
        for mirror in entry.mirrors:
            if mirror.takes(reference):
                rewritten = _rewrite(mirror.location, rest, entry)
                out.append(
                    Endpoint(rewritten, mirror.insecure or rewritten.registry in insecure, True)
                )
        primary = reference if entry.wildcard else _rewrite(entry.location, rest, entry)
        out.append(Endpoint(primary, entry.insecure or primary.registry in insecure, mirror=False))
        return tuple(out)


def _rewrite(location: str, rest: str, entry: RegistryEntry) -> Reference:
    text = location + rest
    try:
        return Reference.parse(text)
    except ImageLedgerError as e:
        msg = (
            f"the registries configuration ({entry.origin}) rewrites a reference under"
            f" {entry.prefix} to {clip(text, 200)!r}, which is not a reference: {e}"
        )
        raise RegistryConfigError(msg) from None


# ---- reading ------------------------------------------------------------------------------


def config_files(
    environ: Mapping[str, str] | None = None, path: str | os.PathLike[str] | None = None
) -> tuple[Path, tuple[Path, ...]]:
    """The main file (which may not exist) and the drop-in directories, in the order they are
    read (see the module docstring)."""
    env = os.environ if environ is None else environ
    root = Path(env.get(ENV_ROOT) or "/")
    user = containers_user_dir(env)
    user_file = user / "registries.conf" if user is not None else None
    user_dir = user / "registries.conf.d" if user is not None else None
    explicit = path if path is not None else (env.get(ENV_REGISTRIES_CONF) or None)
    if explicit is not None:
        main = Path(explicit)
    elif user_file is not None and user_file.exists():
        return user_file, (user_dir,) if user_dir is not None else ()
    else:
        main = root / SYSTEM_FILE
    dirs = [root / SYSTEM_DIR]
    if user_dir is not None:
        dirs.append(user_dir)
    return main, tuple(dirs)


def _drop_ins(directory: Path) -> list[Path]:
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except OSError as e:
        msg = f"cannot read the registries drop-in directory {directory}: {e.strerror}"
        raise RegistryConfigError(msg) from None
    found = []
    for name in names:
        if not name.endswith(".conf"):
            continue
        candidate = directory / name
        try:
            if stat.S_ISREG(candidate.stat().st_mode):
                found.append(candidate)
        except OSError:
            continue
    return found


def _read_toml(path: Path, *, missing_ok: bool) -> dict[str, Any] | None:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE + 1)
    except FileNotFoundError:
        if missing_ok:
            return None
        msg = f"the registries configuration {path} does not exist"
        raise RegistryConfigError(msg) from None
    except OSError as e:
        msg = f"cannot read the registries configuration {path}: {e.strerror}"
        raise RegistryConfigError(msg) from None
    if len(raw) > MAX_FILE:
        msg = f"the registries configuration {path} is larger than {MAX_FILE} bytes"
        raise RegistryConfigError(msg)
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        msg = f"the registries configuration {path} is not valid TOML: {clip(str(e), 200)}"
        raise RegistryConfigError(msg) from None


def _bool(table: Mapping[str, Any], key: str, where: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        msg = f"{where}: {key} must be true or false, got {clip(repr(value), 60)}"
        raise RegistryConfigError(msg)
    return value


def _location(value: Any, key: str, where: str, *, required: bool) -> str:
    if value is None or value == "":
        if required:
            msg = f"{where}: {key} is missing or empty"
            raise RegistryConfigError(msg)
        return ""
    if not isinstance(value, str) or any(c.isspace() or not c.isprintable() for c in value):
        got = clip(repr(value), 80)
        msg = f"{where}: {key} must be a registry[/namespace...] string, got {got}"
        raise RegistryConfigError(msg)
    return value.rstrip("/")


def _normalize_prefix(prefix: str) -> str:
    """A prefix as canonical references spell it: the host lower-cased, Docker Hub's legacy
    host folded (``index.docker.io`` is ``docker.io``)."""
    host, sep, rest = prefix.partition("/")
    host = host.lower()
    if host == "index.docker.io":
        host = "docker.io"
    return f"{host}{sep}{rest}"


def _table(value: Any, keys: frozenset[str], where: str, what: str) -> dict[str, Any]:
    """`value` as a TOML table; keys this reader does not know are logged (a newer
    containers/image may have added them) rather than refused."""
    if not isinstance(value, dict):
        msg = f"{where}: each {what} must be a table"
        raise RegistryConfigError(msg)
    unknown = sorted(set(value) - keys)
    if unknown:
        log.warning("registries_conf.unknown_key", where=where, keys=unknown)
    return value


def _mirror(value: Any, where: str) -> Mirror:
    table = _table(value, _MIRROR_KEYS, where, "[[registry.mirror]]")
    location = _location(table.get("location"), "mirror location", where, required=True)
    raw = table.get("pull-from-mirror", "all") or "all"
    mode = _PULL_FROM_MIRROR.get(raw) if isinstance(raw, str) else None
    if mode is None:
        msg = (
            f"{where}: pull-from-mirror must be one of {', '.join(_PULL_FROM_MIRROR)},"
            f" got {clip(repr(raw), 60)}"
        )
        raise RegistryConfigError(msg)
    return Mirror(location, _bool(table, "insecure", where), mode)


def _entry(value: Any, origin: str, index: int) -> RegistryEntry:
    where = f"{origin}: [[registry]] #{index + 1}"
    table = _table(value, _REGISTRY_KEYS, where, "[[registry]]")
    location = _location(table.get("location"), "location", where, required=False)
    prefix = _location(table.get("prefix"), "prefix", where, required=False) or location
    if not prefix:
        msg = f"{where}: neither prefix nor location is set"
        raise RegistryConfigError(msg)
    prefix = _normalize_prefix(prefix)
    where = f"{origin}: [[registry]] prefix {prefix!r}"
    if prefix.startswith("*."):
        if "/" in prefix or "*" in prefix[1:] or len(prefix) < 3:
            msg = f"{where}: a wildcard prefix must be a host, *.example.com"
            raise RegistryConfigError(msg)
        if location:
            msg = f"{where}: a wildcard prefix cannot have a location"
            raise RegistryConfigError(msg)
    elif "*" in prefix:
        msg = f"{where}: a wildcard may only begin the prefix (*.example.com)"
        raise RegistryConfigError(msg)
    elif not location:
        location = prefix
    mirrors_raw = table.get("mirror", [])
    if not isinstance(mirrors_raw, list):
        msg = f"{where}: mirror must be an array of tables ([[registry.mirror]])"
        raise RegistryConfigError(msg)
    mirrors = tuple(_mirror(m, where) for m in mirrors_raw)
    if _bool(table, "mirror-by-digest-only", where):
        if any(m.pull_from_mirror == "tag-only" for m in mirrors):
            msg = f"{where}: mirror-by-digest-only = true and a tag-only mirror contradict"
            raise RegistryConfigError(msg)
        mirrors = tuple(Mirror(m.location, m.insecure, "digest-only") for m in mirrors)
    return RegistryEntry(
        prefix=prefix,
        location=location,
        insecure=_bool(table, "insecure", where),
        blocked=_bool(table, "blocked", where),
        mirrors=mirrors,
        origin=origin,
    )


def parse_registries_conf(document: Mapping[str, Any], origin: str) -> list[RegistryEntry]:
    """The ``[[registry]]`` tables of one parsed file (`origin`: its path, for messages)."""
    if "registries" in document:
        if "registry" in document:
            msg = f"{origin}: mixes version 1 [registries.*] tables with version 2 [[registry]]"
            raise RegistryConfigError(msg)
        return _version_1(document["registries"], origin)
    ignored = sorted(_IGNORED_KEYS & set(document))
    if ignored:
        log.debug("registries_conf.ignored", file=origin, keys=ignored)
    unknown = sorted(set(document) - _IGNORED_KEYS - {"registry"})
    if unknown:
        log.warning("registries_conf.unknown_key", where=origin, keys=unknown)
    tables = document.get("registry", [])
    if not isinstance(tables, list):
        msg = f"{origin}: registry must be an array of tables ([[registry]])"
        raise RegistryConfigError(msg)
    entries = [_entry(table, origin, i) for i, table in enumerate(tables)]
    seen: set[str] = set()
    for entry in entries:
        if entry.prefix in seen:
            msg = f"{origin}: the prefix {entry.prefix!r} is set by more than one [[registry]]"
            raise RegistryConfigError(msg)
        seen.add(entry.prefix)
    return entries


def _version_1(tables: Any, origin: str) -> list[RegistryEntry]:
    """A version 1 file (still the default on older hosts): ``[registries.insecure]`` and
    ``[registries.block]`` lists of hosts become tables with that host as prefix and
    location (insecure, blocked); ``[registries.search]`` is short-name resolution, not used.
    A host in both lists is both."""
    if not isinstance(tables, dict):
        msg = f"{origin}: registries must be a table of [registries.search/insecure/block]"
        raise RegistryConfigError(msg)
    flags: dict[str, dict[str, bool]] = {}
    for kind in ("insecure", "block"):
        table = tables.get(kind, {})
        hosts = table.get("registries", []) if isinstance(table, dict) else None
        if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
            msg = f"{origin}: [registries.{kind}] registries must be a list of hosts"
            raise RegistryConfigError(msg)
        for host in hosts:
            prefix = _normalize_prefix(_location(host, "registries", origin, required=True))
            flags.setdefault(prefix, {})[kind] = True
    return [
        RegistryEntry(
            prefix,
            prefix,
            insecure=kinds.get("insecure", False),
            blocked=kinds.get("block", False),
            origin=origin,
        )
        for prefix, kinds in flags.items()
    ]


def merge(layers: Sequence[Sequence[RegistryEntry]]) -> tuple[RegistryEntry, ...]:
    """Files read in order: a later table replaces an earlier one of the same prefix."""
    merged: dict[str, RegistryEntry] = {}
    for entries in layers:
        for entry in entries:
            merged[entry.prefix] = entry
    return tuple(merged.values())


def load_registries_conf(
    environ: Mapping[str, str] | None = None, path: str | os.PathLike[str] | None = None
) -> RegistriesConfig:
    """The registries configuration of this host (or of `path`, then the drop-ins): see the
    module docstring. `RegistryConfigError` for a file that cannot be read or used, and for
    a main file named (`path`, ``$CONTAINERS_REGISTRIES_CONF``) that does not exist."""
    env = os.environ if environ is None else environ
    main, dirs = config_files(env, path)
    # A file named by the caller or $CONTAINERS_REGISTRIES_CONF must exist (as containers/image
    # has it): a typo must not silently mean "no mirrors, nothing blocked".
    named = path is not None or bool(env.get(ENV_REGISTRIES_CONF))
    files: list[str] = []
    layers: list[list[RegistryEntry]] = []
    document = _read_toml(main, missing_ok=not named)
    if document is not None:
        files.append(str(main))
        layers.append(parse_registries_conf(document, str(main)))
    for directory in dirs:
        for drop_in in _drop_ins(directory):
            document = _read_toml(drop_in, missing_ok=True)
            if document is not None:
                files.append(str(drop_in))
                layers.append(parse_registries_conf(document, str(drop_in)))
    return RegistriesConfig(merge(layers), tuple(files))


def config_fingerprint(
    environ: Mapping[str, str] | None = None, path: str | os.PathLike[str] | None = None
) -> tuple[object, ...]:
    """What `load_registries_conf` would read, summarised (paths, sizes, mtimes, inodes): a
    changed file gives another fingerprint, so a cached client is not reused across it."""
    env = os.environ if environ is None else environ
    main, dirs = config_files(env, path)
    candidates = [main]
    for directory in dirs:
        try:
            candidates.extend(_drop_ins(directory))
        except RegistryConfigError:
            candidates.append(directory)
    return tuple((str(candidate), file_seen(candidate)) for candidate in candidates)


def file_seen(path: Path | None) -> tuple[int, int, int] | None:
    """A file's modification time, size and inode (None: no file there, or none named): what
    a configuration fingerprint compares."""
    try:
        st = path.stat() if path is not None else None
    except OSError:
        return None
    return None if st is None else (st.st_mtime_ns, st.st_size, st.st_ino)


__all__ = [
    "ENV_REGISTRIES_CONF",
    "ENV_ROOT",
    "Endpoint",
    "Mirror",
    "RegistriesConfig",
    "RegistryEntry",
    "config_files",
    "config_fingerprint",
    "file_seen",
    "load_registries_conf",
    "merge",
    "parse_registries_conf",
    "prefix_match",
]
