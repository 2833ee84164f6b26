"""The OCI distribution client: pull an image from a registry into the blob store.

`RegistryClient.pull(reference, store, platform=...)` speaks the OCI distribution API v2 over
HTTP/1.1 (httpx, one connection pool per client) and leaves the image's manifest, config and
layers verified in the store; it returns the image's `ImageContent`. It touches nothing else:
recording the pull (the ledger event, the in-flight lease) is the caller's business.

The client is this module; what it stands on has a module each: `storage.registryoptions`
(`RegistryOptions`, read from the environment), `storage.credentials` (Docker's config and
credential helpers), `storage.registryauth` (challenges and tokens), `storage.registryhttp`
(reading answers), `storage.redact` (values fit for a message), `storage.pullstore` (the
store as a pull sees it: blob locks, partials of dead pulls), `storage.oci` (manifests and the
nested-index walk) and `domain.platforms` (which index entry a platform takes).

Decisions (each pinned by ``tests/test_registry_client.py``, ``tests/test_registry_safety.py``
or ``tests/test_pull.py``):

- **Transport**: HTTPS, certificates verified against the system's trust store plus
  `RegistryOptions.ca_bundle` when given. A host listed in `RegistryOptions.insecure`
  (``host[:port]`` exactly as the reference spells it) is spoken to over plain HTTP; there is
  no "HTTPS without verification" mode: a registry with a self-signed certificate is reached by
  giving its CA as `ca_bundle`. ``docker.io`` is served by ``registry-1.docker.io``.
- **Auth** (`storage.registryauth`): every request goes out anonymously first; a 401's
  ``WWW-Authenticate`` challenge decides what follows (Basic, or a Bearer token cached per
  host and scope); a 401 after a fresh token, or a 403, is a `RegistryAuthError`. The client
  gives `RegistryAuth` a way to send a token request (`RegistryAuth` never reaches into the
  client) and asks it for the credentials of a host. Credentials travel over TLS, or over
  plain HTTP only to a host that is itself in the insecure list (`plain_http_allowed`; the
  registry being insecure says nothing about where its realm is). Redirects never carry
  ``Authorization`` to another origin (httpx drops it). Nothing here logs a credential, a token
  or a URL's query string, and no error message holds one.
- **Credentials from the environment** (`storage.registryoptions`) must name their registry
  (``IMAGELEDGER_REGISTRY_HOST``), or they are refused (`RegistryConfigError`).
- **Manifests**: ``Accept`` lists the four media types (OCI index and manifest, Docker manifest
  list and v2 schema 2), since distribution 2.8 answers 404 for OCI content or downgrades Docker
  content to schema 1 otherwise. The ``Content-Type`` must be one of them (schema 1 is refused
  by name); the body is read up to `MAX_MANIFEST_SIZE` whatever ``Content-Length`` says; its
  digest is computed here and must equal the pinned digest and ``Docker-Content-Digest``. An
  index resolves to the entry for the requested platform (`storage.oci.choose_index_entry`:
  os/architecture/variant, else os/architecture with a compatible variant), attestations
  skipped, nested indexes followed (`storage.oci.index_manifests`, at most `MAX_INDEX_DEPTH`
  deep); the chosen manifest is fetched by digest and checked against its descriptor.
- **Blobs**: the layers (at most `max_concurrent_layers` at once) and meanwhile the config, each
  streamed through the store's `BlobWriter`, which hashes while writing and lands nothing
  that does not verify. A blob already stored with the descriptor's size is not fetched. A
  broken or short transfer resumes with ``Range: bytes=<offset>-`` (a 200 answer restarts the
  blob), and so does a blob a killed pull left half written: its partial file (in ``tmp/`` or
  a dead lease's work directory) is copied into the new writer first (`adopt_partial`); if
  the result does not verify, the blob is downloaded again whole, once. Connection errors,
  429 and 5xx are retried with exponential backoff, honouring ``Retry-After``. Redirects
  (registries send blob GETs to object storage) are followed; the ``Authorization`` header is
  never sent to another host. Each blob's check-then-download happens under its download
  lock (`storage.pullstore.blob_lock`, an exclusive ``flock``), so concurrent pulls of one
  blob (threads or processes) download it once: the waiter then finds it stored.
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

import contextlib
import os
import random
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import httpx

from imageledger._version import __version__
from imageledger.domain.errors import (
    DigestMismatchError,
    ImageLedgerError,
    ManifestError,
    NotInRegistryError,
    RegistryAuthError,
    RegistryConfigError,
    RegistryError,
    RegistryManifestError,
    RegistryTimeoutError,
)
from imageledger.domain.log import get_logger
from imageledger.domain.model import (
    CONFIG_TYPES,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    SCHEMA1_TYPES,
    ImageContent,
    Platform,
    PulledImage,
    PullEndpoint,
)
from imageledger.domain.reference import (
    DEFAULT_REGISTRY,
    DEFAULT_TAG,
    Reference,
    validate_digest,
)
from imageledger.storage.credentials import normalize_host
from imageledger.storage.oci import (
    MAX_MANIFEST_SIZE,
    Descriptor,
    IndexEntry,
    choose_index_entry,
    describe_image,
    index_manifests,
    parse_index,
    parse_manifest,
)
from imageledger.storage.pullstore import PullStore, adopt_partial, blob_lock
from imageledger.storage.redact import (
    clip,
    duration,
    error_text,
    failed_host,
    safe_host,
    safe_url,
)
from imageledger.storage.registriesconf import Endpoint
from imageledger.storage.registryauth import RegistryAuth
from imageledger.storage.registryhttp import (
    RegistryTarget,
    content_type,
    digest_of,
    drain,
    error_detail,
    range_start,
    read_bounded,
    retry_after,
    tls_failure,
)
from imageledger.storage.registryoptions import MAX_BACKOFF, RegistryOptions

log = get_logger(__name__)

MANIFEST_ACCEPT: Final = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))
PROGRESS_STEP: Final = 1 << 20
"""Bytes between two "blob-bytes" progress events of one blob. (The connection delivers 64
KiB chunks; the store's writer gathers them into bigger writes, `blobs.WRITE_SIZE`.)"""
DOCKER_HUB_API: Final = "registry-1.docker.io"
MAX_RETRY_AFTER: Final = 60.0
"""The longest ``Retry-After`` a pull waits out: a registry asking for more fails the pull at
once, saying how long it asked for (waiting minutes in silence looks like a hang)."""
MAX_REDIRECTS: Final = 10
USER_AGENT: Final = f"imageledger/{__version__}"


class _Cancelled(Exception):
    """A layer download stopped because another one of the same pull failed."""


class _Restart(Exception):
    """A blob download must start again from byte 0 (the registry answered a resume with
    the wrong range); counted as a failed attempt, so a registry that always does is bounded."""


# ---- progress --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PullProgress:
    """One progress event: ``manifest`` (the chosen manifest was fetched and read: `layers`
    lists its layers, (digest, size) in order, each once, before any blob event), then for
    each blob ``blob-cached`` (already in the store, not fetched) or ``blob-start``,
    ``blob-bytes`` (`done` of `total` bytes of that blob), ``blob-verifying`` (all bytes
    in: its digest is checked and the file made durable) and ``blob-done``. `kind` says what
    the blob is (``manifest``, ``config``, ``layer``). A pull that falls back to another
    endpoint may start a blob again.

    `kind` and `layers` came later and take no part in equality: an event equals one made
    with the first four fields, as callers wrote them before."""

    event: str
    digest: str | None
    done: int
    total: int | None
    kind: str | None = field(default=None, compare=False)
    layers: tuple[tuple[str, int], ...] = field(default=(), compare=False)


class _Emitter:
    """A pull's progress callback, and what each endpoint served (`served`, `endpoints`)."""

    def __init__(self, callback: Callable[[PullProgress], None] | None) -> None:
        self._callback = callback
        self._lock = threading.Lock()
        self._blobs: dict[str, list[str]] = {}

    def served(self, target: RegistryTarget, digest: str) -> None:
        """`target`'s endpoint delivered blob `digest` (downloaded and verified)."""
        with self._lock:
            self._blobs.setdefault(target.reference.name, []).append(digest)

    def endpoints(
        self, tried: Sequence[Endpoint], manifest_from: Endpoint | None
    ) -> tuple[PullEndpoint, ...]:
        """The endpoints that served anything, in the order tried."""
        out = []
        for endpoint in tried:
            blobs = tuple(self._blobs.get(endpoint.location, ()))
            gave_manifest = manifest_from is not None and endpoint == manifest_from
            if blobs or gave_manifest:
                out.append(
                    PullEndpoint(
                        endpoint.location,
                        endpoint.mirror,
                        endpoint.insecure,
                        gave_manifest,
                        blobs,
                    )
                )
        return tuple(out)

    def __call__(
        self,
        event: str,
        digest: str | None,
        done: int,
        total: int | None,
        kind: str,
        layers: tuple[tuple[str, int], ...] = (),
    ) -> None:
        if self._callback is not None:
            with self._lock:
                self._callback(PullProgress(event, digest, done, total, kind, layers))


# ---- TLS ---------------------------------------------------------------------------------------


class _TrustContext(ssl.SSLContext):
    """``ssl.create_default_context()``, whose trust store (the system's CA certificates) is
    loaded when the first TLS connection is made rather than when the client is made.

    Loading it costs ~25-30 ms on the benchmark machine (parsing a few hundred PEM
    certificates), paid by every pull through the command line even when the registry, its
    token realm and its redirects are all plain HTTP (`RegistryOptions.insecure`). Nothing is
    verified less: httpcore makes every TLS connection through `wrap_socket` (or `wrap_bio`,
    TLS in a proxy tunnel), and both load the store first; ``verify_mode`` is
    ``CERT_REQUIRED`` and ``check_hostname`` on from the start (``PROTOCOL_TLS_CLIENT``), so
    a connection that somehow skipped the load would fail verification, never pass it.
    What `ssl.create_default_context` does besides loading (``SSLKEYLOGFILE``) is done here."""

    def __new__(cls) -> _TrustContext:
        return super().__new__(cls, ssl.PROTOCOL_TLS_CLIENT)

    def __init__(self) -> None:
        super().__init__()
        self.verify_mode = ssl.CERT_REQUIRED
        self.check_hostname = True
        self._trust_lock = threading.Lock()
        self._trusted = False
        # create_default_context's other step: honour SSLKEYLOGFILE (a debugging aid).
        keylog = os.environ.get("SSLKEYLOGFILE")
        if keylog and not sys.flags.ignore_environment:
            self.keylog_filename = keylog

    def load_trust(self) -> None:
        """Load the system's CA certificates, once (threads making their first connections
        at the same time wait for one load)."""
        if self._trusted:
            return
        with self._trust_lock:
            if not self._trusted:
                self.load_default_certs(ssl.Purpose.SERVER_AUTH)
                self._trusted = True

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        self.load_trust()
        return super().wrap_socket(*args, **kwargs)

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        self.load_trust()
        return super().wrap_bio(*args, **kwargs)


# ---- the client ------------------------------------------------------------------------------


class RegistryClient:
    """Pulls images from OCI distribution registries (thread-safe; one connection pool)."""

    def __init__(self, options: RegistryOptions | None = None) -> None:
        self.options = options if options is not None else RegistryOptions()
        context = _TrustContext()
        if self.options.ca_bundle is not None:
            # Given: checked now, so that a bundle that cannot be used fails the pull before
            # anything is sent (and the system's trust store is then loaded too).
            bundle = self.options.ca_bundle
            try:
                context.load_trust()
                context.load_verify_locations(cafile=str(bundle))
            except OSError as e:  # ssl.SSLError too: no certificate in it, or a bad one
                reason = getattr(e, "reason", None) or e.strerror or type(e).__name__
                msg = f"the CA bundle {clip(bundle)} cannot be used: {clip(reason, 80)}"
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
        registries = self.options.registries
        self._insecure = self.options.insecure | (
            registries.insecure_hosts() if registries is not None else frozenset()
        )
        self._auth = RegistryAuth(
            self.options.credentials,
            send=self._send_token,
            timed_out=self._timed_out,
            plain_http_allowed=self.plain_http_allowed,
        )

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

    def _target(
        self,
        reference: Reference,
        *,
        insecure: bool | None = None,
        deadline: float | None = None,
    ) -> RegistryTarget:
        host = normalize_host(reference.registry)
        api = DOCKER_HUB_API if host == DEFAULT_REGISTRY else host
        if insecure is None:
            insecure = host in self._insecure  # --insecure-registry, or registries.conf's
        if deadline is None:
            deadline = self._deadline()
        base = f"{'http' if insecure else 'https'}://{api}"
        return RegistryTarget(reference, host, base, insecure, deadline)

    def _deadline(self) -> float:
        limit = self.options.deadline
        return time.monotonic() + limit if limit is not None else float("inf")

    def endpoints(self, reference: Reference) -> tuple[Endpoint, ...]:
        """Where a pull of `reference` goes, in order (mirrors, then the primary location;
        `storage.registriesconf`); `RegistryBlockedError` when the configuration blocks it."""
        registries = self.options.registries
        if registries is None:
            host = normalize_host(reference.registry)
            return (Endpoint(reference, host in self.options.insecure, mirror=False),)
        return registries.endpoints(reference, self.options.insecure)

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
        return any(normalize_host(name) in self._insecure for name in names)

    def _delay(self, attempt: int) -> float:
        base = self.options.backoff * (2**attempt)
        return float(min(base, MAX_BACKOFF) * (1 + random.random() / 4))

    def _deadline_error(self, what: str, during: str) -> RegistryTimeoutError:
        limit = self.options.deadline
        return RegistryTimeoutError(
            f"{what}: the pull's deadline of {duration(limit)} s passed {during}"
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
        limit = duration(self.options.timeout)
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
        target: RegistryTarget | None,
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
        host = target.host if target is not None else safe_host(url)
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
                    f"{what}: {safe_url(url)} redirected more than {MAX_REDIRECTS} times"
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
                tls = tls_failure(e)
                if tls is not None:
                    reason = getattr(tls, "verify_message", None) or getattr(tls, "reason", None)
                    msg = f"{what}: TLS with {host} failed: {clip(reason or tls)}"
                    raise RegistryError(msg) from None
                if isinstance(e, httpx.UnsupportedProtocol):
                    msg = f"{what}: cannot follow {safe_url(url)}: {error_text(e)}"
                    raise RegistryError(msg) from None
                if attempt >= self.options.retries:
                    where = failed_host(e, host)
                    msg = f"{what}: cannot talk to {where}: {type(e).__name__}: {error_text(e)}"
                    raise RegistryError(msg) from None
                delay = self._delay(attempt)
                self._log_retry(what, url, type(e).__name__, attempt, delay)
                self._sleep(delay, deadline, what, f"retrying {host}")
                attempt += 1
                continue
            except (httpx.HTTPError, httpx.InvalidURL, ValueError, UnicodeError) as e:
                msg = f"{what}: cannot request {safe_url(url)}: {type(e).__name__}: {error_text(e)}"
                raise RegistryError(msg) from None
            timeouts = 0
            status = response.status_code
            log.debug("registry.response", method=method, url=safe_url(response.url), status=status)
            if status == 401 and target is not None:
                if auth_retried:
                    detail = error_detail(response)
                    response.close()
                    raise RegistryAuthError(self._refusal(target, sent, what, detail))
                try:
                    self._auth.unauthorized(target, response, sent)
                finally:
                    drain(response)
                auth_retried = True
                continue
            if status == 403 and target is not None:
                detail = error_detail(response)
                response.close()
                msg = f"{target.where}: access denied for {what}: {detail}"
                raise RegistryAuthError(msg)
            if status == 429 or status >= 500:
                if attempt >= self.options.retries:
                    detail = error_detail(response)
                    response.close()
                    msg = f"{what}: {host} answered {detail} (after {self.options.retries} retries)"
                    raise RegistryError(msg)
                after = retry_after(response)
                drain(response)
                if after is not None:
                    self._check_retry_after(after, status, host, what, deadline)
                delay = after if after is not None else self._delay(attempt)
                self._log_retry(what, url, str(status), attempt, delay)
                self._sleep(delay, deadline, what, f"waiting to retry {host}")
                attempt += 1
                continue
            return response

    def _send_token(
        self, url: httpx.URL, headers: Mapping[str, str], deadline: float
    ) -> httpx.Response:
        """`RegistryAuth`'s `SendToken`: a token request, without challenge handling."""
        return self._send(None, "GET", url, headers=headers, what="token", deadline=deadline)

    def _check_retry_after(
        self, after: float, status: int, host: str, what: str, deadline: float
    ) -> None:
        """Fail at once when the registry asks for a wait we will not sit through: more than
        `MAX_RETRY_AFTER`, or past the pull's deadline."""
        asked = f"{what}: {host} answered HTTP {status} and asked to wait {duration(after)} s"
        if after > MAX_RETRY_AFTER:
            msg = f"{asked} (Retry-After), more than the {duration(MAX_RETRY_AFTER)} s a pull waits"
            raise RegistryTimeoutError(msg)
        left = deadline - time.monotonic()
        if after >= left:
            msg = (
                f"{asked} (Retry-After), but the pull's deadline of"
                f" {duration(self.options.deadline)} s passes in {duration(max(left, 0.0))} s"
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
            url=safe_url(url),
            error=reason,
            attempt=attempt + 1,
            delay_seconds=round(delay, 3),
        )

    def _refusal(self, target: RegistryTarget, sent: str | None, what: str, detail: str) -> str:
        where = target.where
        if sent is not None and sent.startswith("Basic "):
            return f"{where}: the registry rejected the credentials for {what}: {detail}"
        if self._auth.credentials_for(target) is None:
            return (
                f"{where}: unauthorized for {what} after authenticating anonymously"
                f" (no credentials for {target.host}): {detail}"
            )
        return f"{where}: unauthorized for {what} even with a fresh token: {detail}"

    def _get_small(
        self, target: RegistryTarget, url: str, headers: Mapping[str, str], what: str, limit: int
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
                return response, read_bounded(response, limit, what, deadline=target.deadline)
            except httpx.TimeoutException as e:
                timeouts += 1
                if timeouts > 1 or attempt >= self.options.retries:
                    raise self._timed_out(e, target.host, what, target.deadline) from None
            except httpx.TransportError as e:
                if attempt >= self.options.retries:
                    msg = f"{what}: the transfer from {target.host} broke: {type(e).__name__}"
                    raise RegistryError(msg) from None
            except httpx.HTTPError as e:  # a body that does not decode: not worth a retry
                msg = f"{what}: unreadable answer from {target.host}: {error_text(e)}"
                raise RegistryError(msg) from None
            finally:
                if response.status_code == 200:
                    response.close()
            delay = self._delay(attempt)
            self._sleep(delay, target.deadline, what, f"retrying {target.host}")
            attempt += 1

    # -- manifests -----------------------------------------------------------------------------

    def _fetch_manifest(
        self, target: RegistryTarget, ref: str, expected: Descriptor | None
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
                detail = error_detail(response)
                if expected is None:
                    raise NotInRegistryError(str(target.reference), detail)
                msg = f"{what} (listed by the index of {target.reference}) is missing: {detail}"
                raise RegistryError(msg)
            if status != 200:
                msg = f"{what}: {target.host} answered {error_detail(response)}"
                raise RegistryError(msg)
        finally:
            response.close()
        media_type = content_type(response)
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
        digest = digest_of(body, "sha256")
        pinned = expected.digest if expected is not None else target.reference.digest
        if pinned is not None:
            actual = digest_of(body, pinned.partition(":")[0])
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
            actual = digest_of(body, announced.strip().partition(":")[0])
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

    def _index_entries(self, body: bytes, media_type: str, digest: str) -> list[IndexEntry]:
        try:
            return parse_index(body, media_type, digest=digest)
        except ManifestError as e:
            raise RegistryManifestError(str(e)) from None

    def _resolve(
        self, target: RegistryTarget, platform: Platform
    ) -> tuple[bytes, str, str, Platform | None]:
        """Follow the reference (through indexes, `index_manifests`) to one image manifest
        for `platform`: (body, media type, digest, the platform of the index entry that
        chose it)."""
        ref = target.reference.digest or target.reference.tag or "latest"
        body, media_type, digest = self._fetch_manifest(target, ref, None)
        chosen: Platform | None = None
        if media_type in INDEX_TYPES:

            def fetch(entry: IndexEntry) -> list[IndexEntry]:
                expected = Descriptor(entry.media_type, entry.digest, entry.size)
                return self._index_entries(*self._fetch_manifest(target, entry.digest, expected))

            def select(entries: Iterable[IndexEntry]) -> list[IndexEntry]:
                listed = list(entries)
                entry = choose_index_entry(listed, platform)
                if entry is None:
                    available = sorted(
                        {str(e.platform) for e in listed if e.platform and not e.attestation}
                    )
                    offers = ", ".join(available) if available else "no platform at all"
                    detail = f"no manifest for {platform}; the index offers {clip(offers)}"
                    raise NotInRegistryError(str(target.reference), detail)
                return [entry]

            [entry] = index_manifests(
                self._index_entries(body, media_type, digest),
                fetch=fetch,
                select=select,
                what=str(target.reference),
                error=RegistryManifestError,
            )
            chosen = entry.platform
            expected = Descriptor(entry.media_type, entry.digest, entry.size)
            body, media_type, digest = self._fetch_manifest(target, entry.digest, expected)
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
        self, target: RegistryTarget, store: PullStore, digest: str, cancel: threading.Event | None
    ) -> contextlib.AbstractContextManager[None]:
        """The blob's download lock, waited for until the pull's deadline at most."""
        what = f"blob {digest}"
        during = "waiting for another pull of the same blob"
        return blob_lock(
            store,
            digest,
            deadline=target.deadline,
            cancel=cancel,
            expired=lambda: self._deadline_error(what, during),
            cancelled=_Cancelled,
        )

    def _fetch_blob(
        self,
        target: RegistryTarget,
        store: PullStore,
        descriptor: Descriptor,
        emit: _Emitter,
        cancel: threading.Event,
        kind: str = "layer",
    ) -> None:
        digest, size = descriptor.digest, descriptor.size
        with self._lock(target, store, digest, cancel):
            if cancel.is_set():
                raise _Cancelled
            if store.has(digest) and store.size(digest) == size:
                emit("blob-cached", digest, size, size, kind)
                log.debug("registry.blob.cached", digest=digest, size=size)
                return
            emit("blob-start", digest, 0, size, kind)
            self._download(target, store, descriptor, emit, cancel, kind=kind)
            emit.served(target, digest)
            emit("blob-done", digest, size, size, kind)

    def _download(
        self,
        target: RegistryTarget,
        store: PullStore,
        descriptor: Descriptor,
        emit: _Emitter,
        cancel: threading.Event,
        *,
        adopt: bool = True,
        kind: str = "layer",
    ) -> None:
        """Download the blob into a new writer, resuming (``Range``) what a dead pull left
        (`adopt_partial`) and any transfer that breaks. A blob that fails to verify after
        resuming from a dead pull's bytes is downloaded again whole, once (those bytes may
        have been damaged: a crash, a power cut, a hand in ``tmp/``)."""
        digest, size = descriptor.digest, descriptor.size
        what = f"blob {digest}"
        url = f"{target.base}/v2/{target.repository}/blobs/{digest}"
        writer = store.writer(digest, size=size)
        try:
            adopted = adopt_partial(store, digest, size, writer) if adopt else 0
            if adopted:
                emit("blob-bytes", digest, adopted, size, kind)
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
                        start = range_start(response.headers.get("Content-Range"))
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
                            f" {error_detail(response)}"
                        )
                        raise RegistryError(msg)
                    else:
                        msg = f"{what}: {target.host} answered {error_detail(response)}"
                        raise RegistryError(msg)
                    reported = writer.offset
                    for chunk in response.iter_bytes():
                        writer.write(chunk)
                        if writer.offset - reported >= PROGRESS_STEP or writer.offset == size:
                            reported = writer.offset
                            emit("blob-bytes", digest, reported, size, kind)
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
                    drain(response)
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
                    msg = f"{what}: unreadable answer from {target.host}: {error_text(e)}"
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
            emit("blob-verifying", digest, size, size, kind)
            try:
                writer.commit()
            except DigestMismatchError:
                if not adopted:
                    raise
                log.warning("registry.blob.adopted_partial_bad", digest=digest, offset=adopted)
                self._download(target, store, descriptor, emit, cancel, adopt=False, kind=kind)
        except BaseException:
            writer.abort()
            raise

    def _fetch_blobs(
        self,
        target: RegistryTarget,
        store: PullStore,
        config: Descriptor,
        layers: list[Descriptor],
        emit: _Emitter,
    ) -> None:
        """Fetch the config and the layers: the layers in a pool (at most
        `RegistryOptions.max_concurrent_layers` at once), the config in this thread meanwhile
        (it used to be fetched before the layers started: a round trip, a write and two
        fsyncs that every pull waited for in line). The first failure stops the others."""
        cancel = threading.Event()
        workers = min(self.options.max_concurrent_layers, len(layers))
        pool = (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imageledger-pull")
            if workers
            else None
        )
        futures: list[Future[None]] = []
        failed: BaseException | None = None
        try:
            if pool is not None:
                futures = [
                    pool.submit(self._fetch_blob, target, store, layer, emit, cancel)
                    for layer in layers
                ]
            try:
                self._fetch_blob(target, store, config, emit, cancel, "config")
            except Exception as error:  # the layers are stopped, then this is raised
                failed = error
            else:
                wait(futures, return_when=FIRST_EXCEPTION)
        finally:
            cancel.set()  # all done, or one failed (or we were interrupted): stop the others
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        errors = [
            e
            for f in futures
            if not f.cancelled() and (e := f.exception()) is not None
            if not isinstance(e, _Cancelled)
        ]
        if failed is not None:
            raise failed
        if errors:
            raise errors[0]

    # -- login ---------------------------------------------------------------------------------

    def check_login(self, registry: str) -> bool:
        """Ask `registry` (``host[:port]``) for its API root (``GET /v2/``) with the
        credentials the options hold for it, answering its challenge as a pull does (Basic,
        or a Bearer token from its realm with the credentials): `RegistryAuthError` when it
        refuses them. True when the registry challenged us (the credentials were checked);
        False when it answered without asking for any (nothing could be checked)."""
        host = normalize_host(registry)
        target = self._target(Reference(host, "", DEFAULT_TAG))  # the registry as a whole
        response = self._send(target, "GET", f"{target.base}/v2/", headers={}, what="login")
        try:
            if response.status_code != 200:
                msg = f"login to {host}: {host} answered {error_detail(response)}"
                raise RegistryError(msg)
        finally:
            response.close()
        return self._auth.challenged(host)

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
        return self.fetch(reference, store, platform=platform, progress=progress).content

    def fetch(
        self,
        reference: Reference,
        store: PullStore,
        *,
        platform: Platform,
        progress: Callable[[PullProgress], None] | None = None,
    ) -> PulledImage:
        """`pull`, saying which endpoints served the image (`PulledImage.endpoints`).

        The endpoints are the registries configuration's mirrors that take the reference, in
        order, then the primary location (`endpoints`). An endpoint that fails (down, lacks
        the image, serves content that does not verify: a manifest other than the digest
        pinned, a blob that does not hash to its digest, refuses us) is logged
        (``registry.endpoint.fallback``) and the next one tried, the blobs verified from it
        kept; the last endpoint's failure is the pull's. One deadline bounds them all."""
        endpoints = self.endpoints(reference)
        emit = _Emitter(progress)
        deadline = self._deadline()
        tried: list[Endpoint] = []
        for number, endpoint in enumerate(endpoints, 1):
            tried.append(endpoint)
            target = self._target(endpoint.reference, insecure=endpoint.insecure, deadline=deadline)
            try:
                try:
                    content = self._pull(target, store, platform=platform, emit=emit)
                except (httpx.HTTPError, httpx.InvalidURL) as e:
                    # A safety net: each request handles its own errors, and one that slips
                    # through must still be one line, not a traceback.
                    msg = f"{endpoint.reference}: {type(e).__name__}: {error_text(e)}"
                    raise RegistryError(msg) from None
            except (RegistryError, DigestMismatchError) as e:
                if number == len(endpoints) or time.monotonic() >= deadline:
                    raise  # the last endpoint's failure, or no time left for another
                log.warning(
                    "registry.endpoint.fallback",
                    reference=str(reference),
                    endpoint=endpoint.location,
                    mirror=endpoint.mirror,
                    error=str(e),
                    error_type=type(e).__name__,
                    next=endpoints[number].location,
                )
                continue
            return PulledImage(content, emit.endpoints(tried, endpoint))
        raise AssertionError("unreachable: there is always a primary endpoint")  # pragma: no cover

    def _pull(
        self,
        target: RegistryTarget,
        store: PullStore,
        *,
        platform: Platform,
        emit: _Emitter,
    ) -> ImageContent:
        reference = target.reference
        started = time.monotonic()
        log.debug(
            "registry.pull.start",
            reference=str(reference),
            url=target.base,
            platform=str(platform),
        )
        body, media_type, digest, chosen = self._resolve(target, platform)
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
        unique: dict[str, Descriptor] = {}
        for layer in manifest.layers:
            unique.setdefault(layer.digest, layer)
        layers = tuple((layer.digest, layer.size) for layer in unique.values())
        emit("manifest", digest, len(body), len(body), "manifest", layers)
        self._fetch_blobs(target, store, manifest.config, list(unique.values()), emit)
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


def login(
    registry: str,
    username: str,
    password: str,
    *,
    auth_file: str | os.PathLike[str] | None = None,
    insecure: Iterable[str] = (),
    ca_bundle: Path | None = None,
    registries_conf: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[Path, bool]:
    """Check `username` and `password` against `registry` (``host[:port]``, or
    ``host[:port]/namespace[/repo]`` for credentials of that namespace only, as
    containers-auth.json(5) keys them), then store them in the auth file: `auth_file`, else
    ``$REGISTRY_AUTH_FILE``, else ``$XDG_RUNTIME_DIR/containers/auth.json`` (made 0600,
    written whole, every other entry kept). Refused credentials (`RegistryAuthError`) are
    not written. Plain HTTP as for a pull: `insecure`, ``IMAGELEDGER_INSECURE_REGISTRIES`` or
    an insecure location of the registries configuration. Returns the file and whether the
    registry challenged the credentials (False: it asked for none, so they were stored
    unchecked). The password is never logged and never in a message."""
    from imageledger.storage.credentials import auth_key, chosen_auth_file, store_credentials
    from imageledger.storage.registryoptions import options_from_environment

    env = os.environ if environ is None else environ
    key = auth_key(registry)
    host = key.split("/", 1)[0]
    if not host or any(c.isspace() or not c.isprintable() for c in key) or not username:
        msg = f"login needs a registry host[:port][/namespace] and a user, got {clip(registry)!r}"
        raise RegistryConfigError(msg)
    base = options_from_environment(
        env, insecure=insecure, ca_bundle=ca_bundle, registries_conf=registries_conf
    )
    given = (username, password)

    def only_these(asked: str) -> tuple[str, str] | None:
        return given if normalize_host(asked) == host else None

    options = replace(
        base,
        credentials=only_these,
        retries=min(base.retries, 2),
        deadline=min(base.deadline or 300.0, 300.0),
    )
    with RegistryClient(options) as client:
        checked = client.check_login(host)
    if not checked:
        log.warning("registry.login.unchecked", registry=host)
    path = chosen_auth_file(auth_file, env)
    store_credentials(path, key, username, password)
    log.info("registry.login", registry=key, auth_file=str(path), checked=checked)
    return path, checked


__all__ = ["MANIFEST_ACCEPT", "PullProgress", "RegistryClient", "login"]
