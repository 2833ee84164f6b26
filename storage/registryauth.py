"""Registry authentication: ``WWW-Authenticate`` challenges, Basic credentials, Bearer tokens.

Every request goes out anonymously first. A 401's ``WWW-Authenticate`` challenge decides what
follows: ``Basic`` sends the credentials we have for the registry host; ``Bearer`` fetches a
token from the challenge's realm (``service``, ``scope=repository:<repo>:pull``, Basic
credentials when we have some, ``token`` or ``access_token`` in the answer) and caches it per
(host, scope) until its ``expires_in`` (default 60 s) passes; later requests send it up front,
and a 401 despite a token fetches a fresh one once. Credentials travel over TLS, or over plain
HTTP only to a host that is itself in the insecure list: a token realm on ``http://`` at a
host not listed is refused (`RegistryAuthError`, nothing sent) when we have credentials, and
asked anonymously when we have none. Nothing here logs a credential or a token.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import httpx

from imageledger.domain.errors import RegistryAuthError, RegistryError, RegistryTimeoutError
from imageledger.domain.log import get_logger
from imageledger.storage.credentials import CredentialChain, Credentials
from imageledger.storage.redact import safe_host, safe_url
from imageledger.storage.registryhttp import RegistryTarget, error_detail, read_bounded

log = get_logger(__name__)

DEFAULT_TOKEN_LIFETIME: Final = 60
MAX_TOKEN_RESPONSE: Final = 1024 * 1024
MAX_TOKEN_LIFETIME: Final = 86400.0

SendToken = Callable[[httpx.URL, Mapping[str, str], float], httpx.Response]
"""Send a token request: GET `url` with `headers` (no challenge handling: a token request
carries what it carries), retried as the client retries, waiting until the deadline (a
`time.monotonic()`) at most; the response is streamed (the caller reads and closes it).
Failures are the client's `RegistryError`s."""
TimedOut = Callable[[httpx.TimeoutException, str, str, float], RegistryTimeoutError]
"""The client's error for a timeout reading from host (2nd argument) while doing `what`
(3rd), given the pull's deadline (4th): worded with the client's read timeout and deadline."""


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


@dataclass
class _Token:
    value: str
    expires: float  # time.monotonic()


class RegistryAuth:
    """What each registry host wants (Basic, or Bearer from a realm) and the tokens we hold.

    The client asks it for the header to send up front (`header`) and hands it every 401
    (`unauthorized`); it asks the client, through the callables it was built with, to send a
    token request (`SendToken`), to word a timeout (`TimedOut`) and whether a URL may carry
    credentials over plain HTTP. Thread-safe: one token fetch per (host, scope) at a time."""

    def __init__(
        self,
        credentials: Credentials | None,
        *,
        send: SendToken,
        timed_out: TimedOut,
        plain_http_allowed: Callable[[str], bool],
    ) -> None:
        self._lookup = credentials
        self._send = send
        self._timed_out = timed_out
        self._plain_http_allowed = plain_http_allowed
        self._lock = threading.Lock()
        self._basic: set[str] = set()
        self._realms: dict[str, dict[str, str]] = {}
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._fetching: dict[tuple[str, str], threading.Lock] = {}

    def challenged(self, host: str) -> bool:
        """Whether `host` has asked us to authenticate (Basic or Bearer)."""
        with self._lock:
            return host in self._basic or host in self._realms

    def credentials_for(self, target: RegistryTarget) -> tuple[str, str] | None:
        """The credentials we have for `target`'s repository on its registry (the most
        specific of a containers auth file's per-repository keys), or None (anonymous)."""
        if self._lookup is None:
            return None
        if isinstance(self._lookup, CredentialChain):
            return self._lookup.for_repository(target.host, target.reference.repository)
        return self._lookup(target.host)

    @staticmethod
    def _basic_header(credentials: tuple[str, str]) -> str:
        user, password = credentials
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")

    def header(self, target: RegistryTarget) -> str | None:
        """The Authorization header to send up front (None: anonymous)."""
        with self._lock:
            basic = target.host in self._basic
            bearer = target.host in self._realms
        if basic:
            credentials = self.credentials_for(target)
            return self._basic_header(credentials) if credentials is not None else None
        if bearer:
            return f"Bearer {self._token(target)}"
        return None

    def unauthorized(
        self, target: RegistryTarget, response: httpx.Response, sent: str | None
    ) -> None:
        """React to a 401 answer to a request that carried `sent`: learn the challenge and get
        what the retry needs, or raise `RegistryAuthError`."""
        challenges = parse_challenges(response.headers.get_list("WWW-Authenticate"))
        schemes = {scheme: params for scheme, params in reversed(challenges)}
        where = target.where
        if "bearer" in schemes and schemes["bearer"].get("realm"):
            with self._lock:
                self._realms[target.host] = schemes["bearer"]
            refused = sent.removeprefix("Bearer ") if sent and sent.startswith("Bearer ") else None
            self._token(target, refused=refused)
            return
        if "basic" in schemes:
            credentials = self.credentials_for(target)
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

    def _token(self, target: RegistryTarget, *, refused: str | None = None) -> str:
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

    def _fetch_token(self, target: RegistryTarget) -> _Token:
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
            msg = f"{target.host}: the token realm {safe_url(realm)!r} is not an http(s) URL"
            raise RegistryAuthError(msg)
        headers: dict[str, str] = {}
        credentials = self.credentials_for(target)
        if credentials is not None:
            if parts.scheme == "http" and not self._plain_http_allowed(realm):
                msg = (
                    f"{target.where}: refusing to send the credentials for"
                    f" {target.host} to the token realm {safe_url(realm)} over plain HTTP:"
                    " its host is not listed as an insecure registry (use HTTPS, or list it"
                    " with --insecure-registry)"
                )
                raise RegistryAuthError(msg)
            headers["Authorization"] = self._basic_header(credentials)
        params = {"scope": target.scope} if target.scope else {}
        if challenge.get("service"):
            params["service"] = challenge["service"]
        url = url.copy_merge_params(params)
        started = time.monotonic()
        response = self._send(url, headers, target.deadline)
        try:
            if response.status_code in (401, 403):
                detail = error_detail(response)
                whose = "the credentials" if credentials else "anonymous access"
                msg = f"{target.where}: the token server refused {whose}: {detail}"
                raise RegistryAuthError(msg)
            if response.status_code != 200:
                msg = f"{target.host}: the token server answered {error_detail(response)}"
                raise RegistryError(msg)
            body = read_bounded(
                response, MAX_TOKEN_RESPONSE, "token", RegistryError, deadline=target.deadline
            )
        except httpx.TimeoutException as e:
            realm_host = safe_host(url)
            raise self._timed_out(e, realm_host, "token", target.deadline) from None
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


__all__ = ["RegistryAuth", "SendToken", "TimedOut", "parse_challenges"]
