"""Reading a registry's HTTP answers without trusting them, and how a pull addresses one.

Bodies are read bounded (`read_bounded`: refused past a limit whatever ``Content-Length``
says, and given up at the pull's deadline); an error answer's body is read for its message
for at most `ERROR_BODY_TIME` and `MAX_ERROR_BODY` bytes (`error_detail`), or drained the
same way so that the connection can be reused (`drain`); numbers in headers
(``Retry-After``, ``Content-Range``, ``Content-Length``) are parsed with bounded digit
counts, so that a header of 5,000 digits is "unreadable", not an OverflowError.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import re
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import httpx

from imageledger.domain.errors import RegistryError, RegistryManifestError
from imageledger.domain.reference import Reference
from imageledger.storage.redact import MAX_MESSAGE_VALUE, clip

MAX_ERROR_BODY: Final = 64 * 1024
ERROR_BODY_TIME: Final = 5.0
"""Seconds an error answer's body (read for its message, or drained) may take to arrive: a
registry trickling it must not hold the pull (the error is known already)."""
_SECONDS: Final = re.compile(r"[0-9]{1,12}", re.ASCII)
_LENGTH: Final = re.compile(r"\s*([0-9]{1,18})\s*", re.ASCII)


@dataclass(frozen=True)
class RegistryTarget:
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
        """The token scope of a pull; empty for the registry as a whole (a login's check)."""
        if not self.reference.repository:
            return ""
        return f"repository:{self.reference.repository}:pull"

    @property
    def where(self) -> str:
        """What messages name: ``host (reference)``, or the host alone for the registry as a
        whole (a login's check)."""
        if not self.reference.repository:
            return self.host
        return f"{self.host} ({self.reference})"


def retry_after(response: httpx.Response) -> float | None:
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


def read_bounded(
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


def tls_failure(error: BaseException) -> ssl.SSLError | None:
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


def error_detail(response: httpx.Response) -> str:
    """``STATUS [CODE: message]`` from a registry error answer (its JSON ``errors``)."""
    detail = f"HTTP {response.status_code}"
    try:
        until = time.monotonic() + ERROR_BODY_TIME
        body = read_bounded(response, MAX_ERROR_BODY, "error", deadline=until)
        errors = json.loads(body).get("errors")
        parts = [
            f"{e.get('code', '?')}: {e.get('message', '')}".strip()
            for e in errors
            if isinstance(e, dict)
        ]
        if parts:
            detail += f" ({clip('; '.join(parts))})"
    except (httpx.HTTPError, RegistryError, ValueError, AttributeError, TypeError, RecursionError):
        pass
    return clip(detail, MAX_MESSAGE_VALUE + 40)


def drain(response: httpx.Response) -> None:
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


def content_type(response: httpx.Response) -> str:
    return str(response.headers.get("Content-Type", "")).split(";", 1)[0].strip().lower()


def digest_of(data: bytes, algorithm: str) -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def range_start(content_range: str | None) -> int | None:
    """The first byte of a ``Content-Range: bytes <start>-<end>/<total>`` header."""
    if not content_range:
        return None
    match = re.fullmatch(
        r"\s*bytes\s+([0-9]{1,18})-([0-9]{1,18})/([0-9]{1,18}|\*)\s*", content_range, re.ASCII
    )
    return int(match[1]) if match else None


__all__ = [
    "ERROR_BODY_TIME",
    "MAX_ERROR_BODY",
    "RegistryTarget",
    "content_type",
    "digest_of",
    "drain",
    "error_detail",
    "range_start",
    "read_bounded",
    "retry_after",
    "tls_failure",
]
