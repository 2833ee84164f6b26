"""Image references: the distribution reference grammar and one canonical spelling.

Every call accepts any spelling of a reference (``alpine``, ``library/alpine:latest``,
``index.docker.io/library/alpine``, ``DOCKER.IO/library/alpine:latest``); handles and events
carry the canonical one, ``registry/repository:tag`` or ``registry/repository@sha256:<hex>``,
so that one image is one key in the ledger whatever the caller typed.

Decisions beyond the grammar (a demanding user's expectations, as Docker behaves):
- the registry is the first path component only when it looks like a host: it contains ``.``
  or ``:``, or is ``localhost``; otherwise the name is on Docker Hub (``docker.io``), and a
  one-component Docker Hub name gets ``library/``; ``index.docker.io`` is ``docker.io``;
- a bracketed host must be an IPv6 address (``[::1]:5000``), a port 1-65535 (a port past
  five significant digits is refused before it becomes an int);
- host names are case-insensitive, so the registry is lower-cased; repositories must already be
  lower case (an upper-case repository is refused, not folded: it names nothing on a registry);
- ``name:tag@digest`` is pinned by the digest: the canonical form drops the tag (the digest
  alone says which content is meant; a tag beside it is a comment that may since have moved);
- text longer than any valid reference could be (`_MAX_TEXT`) is refused before it is parsed,
  and quoted only in part;
- a 64-hex-character name alone is refused: it reads as an image id, not a repository;
- digests are ``sha256`` (64 hex) or ``sha512`` (128 hex), lower-case hex as the OCI image
  spec requires; anything else is refused before it can become a path or a key.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final

from imageledger.domain.errors import InvalidReferenceError

DEFAULT_REGISTRY: Final = "docker.io"
DEFAULT_TAG: Final = "latest"
_LIBRARY: Final = "library/"  # Docker Hub's namespace of official images
_LEGACY_REGISTRIES: Final = frozenset({"index.docker.io"})
_MAX_NAME: Final = 255
# The longest text that can be valid: a name of _MAX_NAME characters spelled with
# "index.docker.io" (6 more than its canonical "docker.io"), a 128-character tag and a sha512
# digest. Anything longer is refused before a pattern runs over it, and quoted only in part.
_MAX_TEXT: Final = _MAX_NAME + 6 + 1 + 128 + 1 + len("sha512:") + 128

_DOMAIN_COMPONENT: Final = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST: Final = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[(?P<ipv6>[0-9a-fA-F:.]+)\])"
    r"(?::(?P<port>[0-9]+))?"
)
_MAX_PORT: Final = 65535
_PATH_COMPONENT: Final = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG: Final = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST: Final = re.compile(r"(?P<algorithm>sha256|sha512):(?P<hex>[a-f0-9]+)")
_DIGEST_LENGTHS: Final = {"sha256": 64, "sha512": 128}
_IMAGE_ID: Final = re.compile(r"[a-f0-9]{64}")


@dataclass(frozen=True, slots=True, order=True)
class Reference:
    """A parsed, canonical image reference. Exactly one of `tag` and `digest` is set."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse any spelling; raise `InvalidReferenceError` saying what is wrong."""
        return parse_reference(text)

    @property
    def name(self) -> str:
        """``registry/repository``: the repository on its registry, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        if self.digest is not None:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag}"


def validate_digest(digest: str) -> str:
    """`digest` itself when it is a well-formed, supported content digest."""
    # Digests come from hostile JSON and headers too: anything but a str is refused the same way.
    match = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if match is None or len(match["hex"]) != _DIGEST_LENGTHS[match["algorithm"]]:
        msg = f"invalid digest {digest!r}: expected sha256:<64 hex> or sha512:<128 hex>, lower case"
        raise InvalidReferenceError(msg)
    return digest


def _split_registry(name: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return DEFAULT_REGISTRY, name


def _check_registry(text: str, registry: str) -> str:
    match = _HOST.fullmatch(registry)
    if match is None:
        msg = f"invalid reference {text!r}: {registry!r} is not a registry host[:port]"
        raise InvalidReferenceError(msg)
    ipv6 = match["ipv6"]
    if ipv6 is not None:
        # The pattern only admits IPv6's alphabet; "[...]" or "[1.2.3.4]" would pass it and
        # fail later, as an unusable URL, in the middle of a pull.
        try:
            ipaddress.IPv6Address(ipv6)
        except ValueError:
            msg = f"invalid reference {text!r}: {registry!r} is not a registry host[:port]"
            msg += f" ({ipv6!r} is not an IPv6 address)"
            raise InvalidReferenceError(msg) from None
    port = match["port"]
    if port is not None:
        # Leading zeros are harmless; past five digits the port is out of range whatever they
        # are, and int() of thousands of digits raises its own (foreign) ValueError.
        digits = port.lstrip("0")
        if len(digits) > len(str(_MAX_PORT)) or not 0 < int(digits or "0") <= _MAX_PORT:
            shown = port if len(port) <= 10 else f"{port[:10]}... ({len(port)} digits)"
            msg = f"invalid reference {text!r}: port {shown} is out of range (1-{_MAX_PORT})"
            raise InvalidReferenceError(msg)
    registry = registry.lower()
    return DEFAULT_REGISTRY if registry in _LEGACY_REGISTRIES else registry


def parse_reference(text: str) -> Reference:
    """See the module docstring for the grammar and the canonical form."""
    if not isinstance(text, str):
        msg = f"invalid reference {text!r}: a reference is a string"
        raise InvalidReferenceError(msg)
    if len(text) > _MAX_TEXT:
        msg = (
            f"invalid reference {text[:60]!r}... ({len(text)} characters): longer than any valid"
            f" reference ({_MAX_TEXT})"
        )
        raise InvalidReferenceError(msg)
    if not text or text != text.strip():
        msg = f"invalid reference {text!r}: empty or surrounded by whitespace"
        raise InvalidReferenceError(msg)
    rest, at, digest = text.partition("@")
    if at:
        try:
            validate_digest(digest)
        except InvalidReferenceError as e:
            msg = f"invalid reference {text!r}: {e}"
            raise InvalidReferenceError(msg) from None
    # A ':' after the last '/' starts the tag; one before it belongs to a registry port.
    tag: str | None = None
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.fullmatch(tag):
            msg = f"invalid reference {text!r}: invalid tag {tag!r}"
            raise InvalidReferenceError(msg)
    registry, repository = _split_registry(rest)
    registry = _check_registry(text, registry)
    if not repository:
        msg = f"invalid reference {text!r}: no repository name"
        raise InvalidReferenceError(msg)
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        if _IMAGE_ID.fullmatch(repository):
            msg = f"invalid reference {text!r}: a 64-hex name reads as an image id"
            raise InvalidReferenceError(msg)
        repository = f"{_LIBRARY}{repository}"
    for component in repository.split("/"):
        if not _PATH_COMPONENT.fullmatch(component):
            why = "must be lower case" if component.lower() != component else "is not valid"
            msg = f"invalid reference {text!r}: repository component {component!r} {why}"
            raise InvalidReferenceError(msg)
    if len(registry) + 1 + len(repository) > _MAX_NAME:
        msg = f"invalid reference {text!r}: name longer than {_MAX_NAME} characters"
        raise InvalidReferenceError(msg)
    if at:
        return Reference(registry, repository, None, digest)
    return Reference(registry, repository, tag or DEFAULT_TAG, None)


def canonical(text: str) -> str:
    """The canonical spelling of reference `text`."""
    return str(parse_reference(text))


def familiar_name(name: str) -> str:
    """A canonical repository name as Docker shows it: ``docker.io/library/alpine`` ->
    ``alpine``, ``docker.io/acme/app`` -> ``acme/app``; other registries' names as they are
    (`docker images`, `docker save`'s repositories and filters all spell names so)."""
    if name.startswith(DEFAULT_REGISTRY + "/"):
        name = name[len(DEFAULT_REGISTRY) + 1 :]
        if name.startswith(_LIBRARY) and "/" not in name[len(_LIBRARY) :]:
            name = name[len(_LIBRARY) :]
    return name
