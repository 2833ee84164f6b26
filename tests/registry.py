"""Real OCI distribution registries for the tests (a pytest plugin: ``pytest_plugins``).

Each fixture starts its own Debian ``docker-registry`` (distribution 2.8) process on
127.0.0.1 port 0 with filesystem storage in a temporary directory, waits for its
``listening on 127.0.0.1:PORT`` log line, and stops it with SIGTERM at teardown (the process
handling is `imageledger.tools.localregistry`'s; TLS and auth go in as config overrides):

- ``registry``: plain HTTP, anonymous;
- ``registry_basic``: htpasswd (bcrypt) Basic auth, credentials in ``Registry.username/password``;
- ``registry_token`` / ``make_token_registry(lifetime=...)``: Bearer token auth backed by a
  `TokenServer` (a thread in the test process) that checks Basic credentials, issues ES256 JWTs
  scoped per repository and counts the requests it answers;
- ``registry_tls``: HTTPS with a server certificate for 127.0.0.1 signed by a test CA
  (``Registry.ca_cert``);
- ``flaky_registry`` / ``make_flaky_registry(upstream)``: a `FlakyProxy` in front of a plain
  registry that can tamper with a blob, cut a download short, stall one, answer 429/503 and
  count requests.

Images get into a registry with `push` (``skopeo copy``) from what
``imageledger.tools.imagebuild`` builds::

    layout = build_oci_layout(tmp_path / "layout", [ImageSpec(names=("v1",))])
    push(registry, f"oci:{layout.path}:v1", "library/test:v1")
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import math
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPResponse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import bcrypt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from imageledger.tools import localregistry
from imageledger.tools.localregistry import LocalRegistry

REGISTRY_BINARY = localregistry.registry_binary()
"""The distribution registry executable (``docker-registry serve CONFIG``;
``$IMAGELEDGER_TEST_REGISTRY``)."""
SKOPEO = os.environ.get("IMAGELEDGER_TEST_SKOPEO", "skopeo")
START_TIMEOUT = localregistry.START_TIMEOUT
STOP_TIMEOUT = localregistry.STOP_TIMEOUT
SKOPEO_TIMEOUT = 120.0

TOKEN_SERVICE = "imageledger-test-registry"
TOKEN_ISSUER = "imageledger-test-token-issuer"
TOKEN_LEEWAY = 60
"""Seconds distribution (2.7+) adds to a token's ``exp`` (and takes off ``nbf``) for clock
skew: a token is accepted until ``exp + 60``."""

BASIC_USERNAME = "tester"
BASIC_PASSWORD = "pa:ss w0rd!"
"""A password with a colon and a space, so a client that splits or quotes it wrongly fails."""


@dataclass(frozen=True)
class Registry:
    """A running registry as a client sees it."""

    host: str
    """``127.0.0.1:PORT``: what goes in an image reference."""
    url: str
    """``http://127.0.0.1:PORT`` or ``https://127.0.0.1:PORT``."""
    ca_cert: Path | None
    """The test CA (PEM) that signed the server certificate of a TLS registry, else None."""
    username: str | None
    """For Basic or token auth, else None."""
    password: str | None
    log: Path
    """The registry's log (stdout and stderr: its messages and access log)."""

    def reference(self, repository_and_tag: str) -> str:
        """``host/repository:tag`` (or ``@digest``) for this registry."""
        return f"{self.host}/{repository_and_tag}"

    @property
    def credentials(self) -> tuple[str, str] | None:
        """``(username, password)`` when the registry needs them."""
        if self.username is None or self.password is None:
            return None
        return self.username, self.password


class RegistryError(RuntimeError):
    """A registry process that did not start, or a push that failed."""


# ---- push ------------------------------------------------------------------------------------


def push(
    registry: Registry,
    source: str,
    reference: str,
    *,
    all_platforms: bool = False,
    docker_format: bool = False,
) -> str:
    """``skopeo copy SOURCE docker://HOST/REFERENCE``; returns the digest of the manifest (or
    index) pushed, as the registry names it (``skopeo --digestfile``).

    `source` is a skopeo transport reference (``oci:/path/layout:name``,
    ``oci-archive:/path.tar``, ``docker-archive:...``); `reference` is ``repository:tag`` in
    `registry`. `all_platforms` copies every image of an index (``--all``; without it skopeo
    copies only the host's platform); `docker_format` converts to Docker v2 schema 2 media types
    (``--format v2s2``, which rewrites the manifest, so its digest is not the built one;
    skopeo also gzips uncompressed layers on the way, which changes their digests). An
    ``oci:`` layout entry with Docker media types is invisible to skopeo: build OCI images and
    let `docker_format` convert them, or push a ``docker-archive:``.
    Credentials go as ``--dest-username/--dest-password``, a TLS registry is verified against its
    CA, a plain one is reached with ``--dest-tls-verify=false``. Raises `RegistryError` carrying
    skopeo's stderr when it fails.
    """
    with tempfile.TemporaryDirectory(prefix="skopeo-") as scratch:
        command = [SKOPEO, "--insecure-policy", "--tmpdir", scratch, "copy", "--retry-times", "0"]
        if all_platforms:
            command.append("--all")
        if docker_format:
            command += ["--format", "v2s2"]
        if registry.ca_cert is not None:
            cert_dir = Path(scratch, "certs")
            cert_dir.mkdir()
            shutil.copyfile(registry.ca_cert, cert_dir / "ca.crt")
            command += ["--dest-tls-verify=true", "--dest-cert-dir", str(cert_dir)]
        else:
            command.append("--dest-tls-verify=false")
        if registry.username is not None and registry.password is not None:
            command += ["--dest-username", registry.username]
            command += ["--dest-password", registry.password]
        else:
            command.append("--dest-no-creds")
        digest_file = Path(scratch, "digest")
        command += ["--digestfile", str(digest_file)]
        command += [source, f"docker://{registry.host}/{reference}"]
        env = dict(os.environ)
        env["REGISTRY_AUTH_FILE"] = str(Path(scratch, "auth.json"))  # never the user's
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=env,
            timeout=SKOPEO_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise RegistryError(
                f"skopeo copy {source} -> {registry.host}/{reference} failed "
                f"(exit {result.returncode}):\n{result.stderr.strip()}"
            )
        return digest_file.read_text().strip()


# ---- test PKI ----------------------------------------------------------------------------------


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class CertificateAuthority:
    """A throwaway CA (ECDSA P-256) that issues server and token-signing certificates."""

    def __init__(self, name: str = "imageledger test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        """The CA certificate, PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> Path:
        """Write the CA certificate (PEM) to `path`; return it."""
        path.write_bytes(self.pem)
        return path

    def issue(
        self,
        common_name: str,
        *,
        ips: Sequence[str] = (),
        dns: Sequence[str] = (),
        server: bool = True,
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A new key and a leaf certificate for it: a TLS server certificate (with the IP and
        DNS subject alternative names) when `server`, else a signing certificate."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if server:
            names: list[x509.GeneralName] = [x509.IPAddress(IPv4Address(ip)) for ip in ips]
            names += [x509.DNSName(name) for name in dns]
            builder = builder.add_extension(
                x509.SubjectAlternativeName(names), critical=False
            ).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
        certificate = builder.sign(self.key, hashes.SHA256())
        return key, certificate

    def write_server_pair(self, directory: Path) -> tuple[Path, Path]:
        """Issue a server certificate for 127.0.0.1 / localhost; write ``server.crt`` and
        ``server.key`` (PEM) into `directory`; return their paths."""
        key, certificate = self.issue("127.0.0.1", ips=("127.0.0.1",), dns=("localhost",))
        cert_path = directory / "server.crt"
        key_path = directory / "server.key"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        key_path.chmod(0o600)
        return cert_path, key_path


# ---- the registry process -------------------------------------------------------------------


def _write_htpasswd(path: Path, username: str, password: str) -> None:
    # bcrypt cost 5 (the minimum Go's bcrypt accepts is 4): a check per request stays cheap.
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
    path.write_text(f"{username}:{hashed}\n")


@dataclass
class RegistryProcess:
    """A running ``docker-registry`` process (a `LocalRegistry`) and the client's view of it."""

    registry: Registry
    local: LocalRegistry

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.local.process

    @property
    def directory(self) -> Path:
        return self.local.directory

    @property
    def config(self) -> Path:
        return self.local.config

    def stop(self) -> None:
        """SIGTERM, then wait for the exit (SIGKILL if it does not come)."""
        self.local.stop()


def start_registry(
    directory: Path,
    *,
    tls: CertificateAuthority | None = None,
    basic: tuple[str, str] | None = None,
    token: TokenServer | None = None,
) -> RegistryProcess:
    """Start a registry (`imageledger.tools.localregistry.start`) with its storage, config and
    log under `directory`.

    `tls`: serve HTTPS with a certificate for 127.0.0.1 issued by that CA. `basic`: htpasswd
    auth for that ``(username, password)``. `token`: Bearer token auth with that token server
    (its realm, service, issuer and signing CA); the Registry then carries the token server's
    credentials. Stop it with `RegistryProcess.stop` (or use `running_registry`).
    """
    if basic is not None and token is not None:
        raise ValueError("a registry has one auth method")
    directory.mkdir(parents=True, exist_ok=True)
    overrides: dict[str, Any] = {}
    ca_cert: Path | None = None
    if tls is not None:
        cert_path, key_path = tls.write_server_pair(directory)
        overrides["http"] = {"tls": {"certificate": str(cert_path), "key": str(key_path)}}
        ca_cert = tls.write(directory / "ca.pem")
    username = password = None
    if basic is not None:
        username, password = basic
        htpasswd = directory / "htpasswd"
        _write_htpasswd(htpasswd, username, password)
        overrides["auth"] = {"htpasswd": {"realm": "imageledger-test", "path": str(htpasswd)}}
    if token is not None:
        username, password = token.username, token.password
        bundle = directory / "token-ca.pem"
        bundle.write_bytes(token.root_bundle)
        overrides["auth"] = {
            "token": {
                "realm": token.realm,
                "service": token.service,
                "issuer": token.issuer,
                "rootcertbundle": str(bundle),
            }
        }
    try:
        local = localregistry.start(directory, overrides, binary=REGISTRY_BINARY)
    except localregistry.LocalRegistryError as e:
        raise RegistryError(str(e)) from e
    registry = Registry(
        host=local.host,
        url=local.url,
        ca_cert=ca_cert,
        username=username,
        password=password,
        log=local.log,
    )
    return RegistryProcess(registry, local)


@contextlib.contextmanager
def running_registry(
    directory: Path,
    *,
    tls: CertificateAuthority | None = None,
    basic: tuple[str, str] | None = None,
    token: TokenServer | None = None,
) -> Iterator[Registry]:
    """`start_registry` as a context manager: the registry is stopped on exit."""
    started = start_registry(directory, tls=tls, basic=basic, token=token)
    try:
        yield started.registry
    finally:
        started.stop()


# ---- token server ------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json_response(
    handler: BaseHTTPRequestHandler,
    status: int,
    body: object,
    headers: Mapping[str, str] | None = None,
) -> None:
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(data)


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server answered."""

    method: str
    account: str | None
    """The authenticated user (None: anonymous or refused)."""
    service: str | None
    scopes: tuple[str, ...]
    """The scopes asked for, as sent (``repository:NAME:pull,push``)."""
    status: int
    token: str | None
    """The token issued (None when refused)."""
    time: float
    """``time.monotonic()`` when it was answered."""


@dataclass(frozen=True)
class Grant:
    """One resource of a token's ``access`` claim."""

    type: str
    name: str
    actions: tuple[str, ...]

    def claim(self) -> dict[str, object]:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


def parse_scope(scope: str) -> Grant | None:
    """``repository:NAME:pull,push`` (type may carry a class: ``repository(plugin)``); None
    when malformed."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if not kind or not name or not actions:
        return None
    return Grant(kind.split("(")[0], name, tuple(a for a in actions.split(",") if a))


class TokenServer:
    """A Docker-style token server (https://distribution.github.io/distribution/spec/auth/token/)
    on ``http://127.0.0.1:PORT/token``, in a thread of the test process.

    ``GET /token?service=S&scope=repository:NAME:pull,push[&scope=...]`` with Basic credentials
    (or, when `anonymous_pull`, none: pull is then all it grants) answers
    ``{"token", "access_token", "expires_in", "issued_at"}``; ``POST /token`` takes the OAuth2
    password grant form (``grant_type=password&username&password&service&scope``). A wrong
    password, or no credentials, is a 401; a missing or foreign ``service`` a 400.

    The token is an ES256 JWT whose ``x5c`` header carries the signing certificate, which chains
    to the CA in `root_bundle` (the registry's ``rootcertbundle``). `lifetime` (seconds, may be
    changed while running) is the ``expires_in`` answered. Distribution accepts a token until
    ``exp + 60 s`` (clock-skew leeway); with `enforce_lifetime` the ``exp`` claim is set 60 s
    early so that the registry itself refuses the token (401, ``error="invalid_token"``) once
    `lifetime` has passed, rounded up to a whole second (the JWT times are whole seconds).

    Every answered request is recorded in `requests`; `count` filters them.
    """

    def __init__(
        self,
        *,
        username: str = BASIC_USERNAME,
        password: str = BASIC_PASSWORD,
        lifetime: int = 300,
        anonymous_pull: bool = False,
        enforce_lifetime: bool = True,
        service: str = TOKEN_SERVICE,
        issuer: str = TOKEN_ISSUER,
    ) -> None:
        self.username = username
        self.password = password
        self.lifetime = lifetime
        self.anonymous_pull = anonymous_pull
        self.enforce_lifetime = enforce_lifetime
        self.service = service
        self.issuer = issuer
        self._ca = CertificateAuthority("imageledger test token CA")
        self._key, certificate = self._ca.issue("imageledger test token signer", server=False)
        self._x5c = [base64.b64encode(certificate.public_bytes(serialization.Encoding.DER))]
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        server = self

        class Handler(_QuietHandler):
            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                server._answer(self, query, self.headers.get("Authorization"))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                if form.get("grant_type") != ["password"]:
                    _json_response(self, 400, {"error": "unsupported_grant_type"})
                    return
                user = form.get("username", [""])[0]
                secret = form.get("password", [""])[0]
                basic = base64.b64encode(f"{user}:{secret}".encode()).decode()
                server._answer(self, form, f"Basic {basic}", oauth=True)

        self._httpd = _QuietServer(Handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: the realm's host, which a client must list as insecure before it
        sends credentials to it (the realm is plain HTTP)."""
        return f"127.0.0.1:{self.port}"

    @property
    def realm(self) -> str:
        return f"http://{self.host}/token"

    @property
    def root_bundle(self) -> bytes:
        """The CA (PEM) that the token-signing certificate chains to."""
        return self._ca.pem

    @property
    def requests(self) -> list[TokenRequest]:
        """Every request answered so far (a copy), oldest first."""
        with self._lock:
            return list(self._requests)

    def count(self, *, scope: str | None = None, issued: bool = True) -> int:
        """How many requests were answered (with a token when `issued`, else any), asking for
        `scope` when given (exactly as sent, e.g. ``repository:library/test:pull``)."""
        return sum(
            1
            for request in self.requests
            if (not issued or request.token is not None)
            and (scope is None or scope in request.scopes)
        )

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(STOP_TIMEOUT)

    def __enter__(self) -> TokenServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sign(self, claims: Mapping[str, object]) -> str:
        """A compact JWS (ES256, ``x5c`` header) of `claims`."""
        header = {"typ": "JWT", "alg": "ES256", "x5c": [c.decode() for c in self._x5c]}
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        der = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def issue(self, account: str | None, grants: Sequence[Grant]) -> str:
        """A token for `account` granting `grants`, valid for `lifetime` seconds."""
        clock = time.time()
        now = int(clock)
        # Rounded up: the registry never refuses the token before `lifetime` has passed (it may
        # accept it for up to one second more).
        expiry = math.ceil(clock + self.lifetime) - (TOKEN_LEEWAY if self.enforce_lifetime else 0)
        claims = {
            "iss": self.issuer,
            "sub": account or "",
            "aud": self.service,
            "exp": expiry,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(12),
            "access": [grant.claim() for grant in grants],
        }
        return self.sign(claims)

    def _record(self, request: TokenRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _answer(
        self,
        handler: BaseHTTPRequestHandler,
        params: Mapping[str, list[str]],
        authorization: str | None,
        *,
        oauth: bool = False,
    ) -> None:
        scopes = tuple(s for value in params.get("scope", []) for s in value.split(" ") if s)
        service = params.get("service", [None])[0]
        account: str | None = None
        refused: tuple[int, str] | None = None
        if authorization is not None and authorization.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
            except ValueError:
                decoded = ""
            user, _, secret = decoded.partition(":")
            if (user, secret) == (self.username, self.password):
                account = user
            else:
                refused = (401, "incorrect username or password")
        elif not self.anonymous_pull:
            refused = (401, "authentication required")
        if refused is None and service != self.service:
            refused = (400, f"unknown service {service!r}")
        if refused is not None:
            self._record(
                TokenRequest(handler.command, None, service, scopes, refused[0], None, _now())
            )
            headers = {"WWW-Authenticate": 'Basic realm="imageledger-test-token"'}
            _json_response(
                handler,
                refused[0],
                {"details": refused[1]},
                headers if refused[0] == 401 else None,
            )
            return
        grants: list[Grant] = []
        for scope in scopes:
            grant = parse_scope(scope)
            if grant is None:
                continue
            if account is None:  # anonymous: pull only
                actions = tuple(a for a in grant.actions if a == "pull")
                if not actions:
                    continue
                grant = Grant(grant.type, grant.name, actions)
            grants.append(grant)
        token = self.issue(account, grants)
        self._record(TokenRequest(handler.command, account, service, scopes, 200, token, _now()))
        issued_at = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
        body: dict[str, object] = {
            "access_token": token,
            "expires_in": self.lifetime,
            "issued_at": issued_at,
        }
        if oauth:
            body["scope"] = " ".join(scopes)
        else:
            body["token"] = token
        _json_response(handler, 200, body)


def _now() -> float:
    return time.monotonic()


class _QuietServer(ThreadingHTTPServer):
    """A threading HTTP server on 127.0.0.1 port 0 whose handler threads are daemons and that
    does not print a traceback when a client hangs up."""

    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 handler that does not log to stderr."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass(frozen=True)
class TokenRegistry:
    """A token-auth registry and its token server."""

    registry: Registry
    tokens: TokenServer

    @property
    def insecure(self) -> frozenset[str]:
        """The hosts a client lists as insecure to pull with credentials: the registry and
        its token realm (both plain HTTP)."""
        return frozenset({self.registry.host, self.tokens.host})


# ---- flaky proxy ------------------------------------------------------------------------------

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",  # the proxy has read the whole body already
    }
)
_BLOB_PATH = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>[a-z0-9]+:[a-zA-Z0-9=_-]+)$")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class ProxiedRequest:
    """One request the proxy received."""

    method: str
    path: str
    """Path and query, as sent."""
    headers: tuple[tuple[str, str], ...]
    status: int | None = None
    """What the client was answered (None when the proxy could not reach the registry)."""

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), else None."""
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


@dataclass
class _Failure:
    status: int
    times: int
    retry_after: str | None
    path_prefix: str
    method: str | None


@dataclass
class _Cut:
    nbytes: int
    times: int


@dataclass
class Stall:
    """A blob download held after some bytes: `reached` is set once the proxy has sent them and
    is waiting; `release()` lets the rest through (the proxy also releases it at teardown)."""

    after: int
    timeout: float
    reached: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    used: bool = False

    def release(self) -> None:
        self.released.set()

    def wait_reached(self, timeout: float = 30.0) -> None:
        """Block until a download reached the stall (AssertionError after `timeout`)."""
        if not self.reached.wait(timeout):
            raise AssertionError("no download reached the stall")


class FlakyProxy:
    """An HTTP proxy on 127.0.0.1 in front of a plain-HTTP registry, with knobs for the ways a
    registry fails a client.

    Requests and responses pass through unchanged (every header, repeated ones too, ``Host``
    included so the registry's ``Location`` URLs point at the proxy; ``Range`` requests and 206
    answers; bodies streamed), except where a knob says otherwise. Blob knobs apply to
    ``GET /v2/<name>/blobs/<digest>`` answered 200 or 206 (any repository):

    - `corrupt_blob(digest, offset=0)`: that byte of the blob (absolute offset, negative from
      the end) is flipped in every response that covers it, until `heal_blob`;
    - `cut_blob_after(digest, nbytes, times=1)`: the next `times` responses send their headers
      and `nbytes` of body, then the connection is closed;
    - `stall_blob(digest, after)`: the next response sends `after` bytes and waits for
      `Stall.release()`;
    - `fail_next(status, times=1, retry_after=None, path_prefix="/v2/", method=None)`: the next
      `times` matching requests are answered `status` (a registry-style JSON error body, and
      ``Retry-After`` when given) without reaching the registry;
    - `count(path_prefix="", method=None)` / `count_blob(digest)`: how many requests were
      received; `requests` lists them (method, path, headers, status);
    - `serve_instead(path, other)`: a request for `path` is forwarded as one for `other` (a
      registry answering a manifest digest with another manifest: a mirror serving the wrong
      content), until `reset`.
    """

    def __init__(self, upstream: Registry) -> None:
        if upstream.url.startswith("https"):
            raise ValueError("FlakyProxy fronts plain-HTTP registries only")
        self.upstream = upstream
        host, _, port = upstream.host.rpartition(":")
        self._upstream_address = (host, int(port))
        self._lock = threading.Lock()
        self._requests: list[ProxiedRequest] = []
        self._failures: list[_Failure] = []
        self._corrupt: dict[str, int] = {}
        self._cuts: dict[str, _Cut] = {}
        self._stalls: dict[str, list[Stall]] = {}
        self._all_stalls: list[Stall] = []
        self._instead: dict[str, str] = {}
        proxy = self

        class Handler(_QuietHandler):
            def do_GET(self) -> None:
                proxy._handle(self)

            do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        self._httpd = _QuietServer(Handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        port_number = int(self._httpd.server_address[1])
        self.registry = Registry(
            host=f"127.0.0.1:{port_number}",
            url=f"http://127.0.0.1:{port_number}",
            ca_cert=None,
            username=upstream.username,
            password=upstream.password,
            log=upstream.log,
        )

    # ---- knobs ----

    def corrupt_blob(self, digest: str, offset: int = 0) -> None:
        """Flip (xor 0xFF) byte `offset` of blob `digest` in every response that carries it."""
        with self._lock:
            self._corrupt[digest] = offset

    def heal_blob(self, digest: str) -> None:
        """Stop corrupting blob `digest`."""
        with self._lock:
            self._corrupt.pop(digest, None)

    def cut_blob_after(self, digest: str, nbytes: int, times: int = 1) -> None:
        """Close the connection after `nbytes` of body in the next `times` responses carrying
        blob `digest` (the ``Content-Length`` promised is the full one)."""
        with self._lock:
            self._cuts[digest] = _Cut(nbytes, times)

    def stall_blob(self, digest: str, after: int = 0, timeout: float = 60.0) -> Stall:
        """Hold the next response carrying blob `digest` after `after` bytes of body until the
        returned `Stall` is released (or `timeout` passes)."""
        stall = Stall(after, timeout)
        with self._lock:
            self._stalls.setdefault(digest, []).append(stall)
            self._all_stalls.append(stall)
        return stall

    def fail_next(
        self,
        status: int,
        times: int = 1,
        retry_after: int | str | None = None,
        *,
        path_prefix: str = "/v2/",
        method: str | None = None,
    ) -> None:
        """Answer the next `times` requests whose path starts with `path_prefix` (and whose
        method is `method`, when given) with `status`, without forwarding them."""
        with self._lock:
            self._failures.append(
                _Failure(
                    status,
                    times,
                    None if retry_after is None else str(retry_after),
                    path_prefix,
                    method,
                )
            )

    def reset(self) -> None:
        """Drop every knob (stalls are released) and forget the requests."""
        with self._lock:
            self._failures.clear()
            self._corrupt.clear()
            self._cuts.clear()
            self._stalls.clear()
            self._instead.clear()
            self._requests.clear()
            stalls = list(self._all_stalls)
        for stall in stalls:
            stall.release()

    @property
    def requests(self) -> list[ProxiedRequest]:
        """Every request received so far (a copy), oldest first."""
        with self._lock:
            return list(self._requests)

    def count(self, path_prefix: str = "", method: str | None = None) -> int:
        """How many requests had a path starting with `path_prefix` (and method `method`)."""
        return sum(
            1
            for request in self.requests
            if request.path.startswith(path_prefix) and (method is None or request.method == method)
        )

    def count_blob(self, digest: str, method: str = "GET") -> int:
        """How many `method` requests named blob `digest` (in any repository)."""
        return sum(
            1
            for request in self.requests
            if request.method == method and urlsplit(request.path).path.endswith(f"/blobs/{digest}")
        )

    def close(self) -> None:
        with self._lock:
            stalls = list(self._all_stalls)
        for stall in stalls:
            stall.release()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(STOP_TIMEOUT)

    def __enter__(self) -> FlakyProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the proxy ----

    def _take_failure(self, method: str, path: str) -> _Failure | None:
        with self._lock:
            for failure in self._failures:
                if (
                    failure.times > 0
                    and path.startswith(failure.path_prefix)
                    and (failure.method is None or failure.method == method)
                ):
                    failure.times -= 1
                    return failure
        return None

    def _blob_knobs(self, digest: str) -> tuple[int | None, _Cut | None, Stall | None]:
        with self._lock:
            corrupt = self._corrupt.get(digest)
            cut = self._cuts.get(digest)
            if cut is not None and cut.times > 0:
                cut.times -= 1
                cut = _Cut(cut.nbytes, 1)
            else:
                cut = None
            stall = None
            for candidate in self._stalls.get(digest, []):
                if not candidate.used:
                    candidate.used = True
                    stall = candidate
                    break
        return corrupt, cut, stall

    def serve_instead(self, path: str, other: str) -> None:
        """Forward requests for `path` (without query) as requests for `other`."""
        with self._lock:
            self._instead[path] = other

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        method = handler.command
        headers = tuple(handler.headers.items())
        body = _read_request_body(handler)
        path_only = urlsplit(handler.path).path
        with self._lock:
            forwarded = self._instead.get(path_only, handler.path)
        failure = self._take_failure(method, path_only)
        status: int | None = None
        try:
            if failure is not None:
                status = failure.status
                self._send_failure(handler, failure)
                return
            connection = HTTPConnection(*self._upstream_address, timeout=60)
            try:
                try:
                    connection.putrequest(
                        method, forwarded, skip_host=True, skip_accept_encoding=True
                    )
                    for name, value in headers:
                        if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                            connection.putheader(name, value)
                    if body is not None:
                        connection.putheader("Content-Length", str(len(body)))
                    connection.endheaders(body)
                    response = connection.getresponse()
                except OSError as error:
                    _json_response(handler, 502, {"errors": [{"message": str(error)}]})
                    return
                status = response.status
                self._relay(handler, method, path_only, response)
            finally:
                connection.close()
        finally:
            with self._lock:
                self._requests.append(ProxiedRequest(method, handler.path, headers, status))

    def _send_failure(self, handler: BaseHTTPRequestHandler, failure: _Failure) -> None:
        code = {429: "TOOMANYREQUESTS", 503: "UNAVAILABLE"}.get(failure.status, "UNKNOWN")
        extra = {} if failure.retry_after is None else {"Retry-After": failure.retry_after}
        _json_response(
            handler,
            failure.status,
            {"errors": [{"code": code, "message": "injected by FlakyProxy", "detail": None}]},
            extra,
        )

    def _relay(
        self,
        handler: BaseHTTPRequestHandler,
        method: str,
        path: str,
        response: HTTPResponse,
    ) -> None:
        handler.send_response_only(response.status, response.reason)
        length = response.getheader("Content-Length")
        no_body = method == "HEAD" or response.status in (204, 304) or response.status < 200
        chunked = not no_body and length is None
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP:
                handler.send_header(name, value)
        if chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        if no_body:
            return
        match = _BLOB_PATH.match(path)
        corrupt = cut = stall = None
        start, total = 0, int(length) if length is not None else None
        if method == "GET" and match and response.status in (200, 206):
            corrupt, cut, stall = self._blob_knobs(match.group("digest"))
            content_range = _CONTENT_RANGE.match(response.getheader("Content-Range") or "")
            if response.status == 206 and content_range:
                start = int(content_range.group(1))
                total = None if content_range.group(3) == "*" else int(content_range.group(3))
        if corrupt is not None and corrupt < 0:
            corrupt = None if total is None else total + corrupt
        sent = 0
        while True:
            chunk = response.read(_CHUNK)
            if not chunk:
                break
            if corrupt is not None and start + sent <= corrupt < start + sent + len(chunk):
                at = corrupt - start - sent
                chunk = chunk[:at] + bytes([chunk[at] ^ 0xFF]) + chunk[at + 1 :]
            if stall is not None and sent + len(chunk) > stall.after:
                head, chunk = chunk[: stall.after - sent], chunk[stall.after - sent :]
                _write(handler, head, chunked)
                sent += len(head)
                stall.reached.set()
                stall.released.wait(stall.timeout)
                stall = None
            if cut is not None and sent + len(chunk) >= cut.nbytes:
                _write(handler, chunk[: cut.nbytes - sent], chunked)
                handler.wfile.flush()
                handler.close_connection = True
                with contextlib.suppress(OSError):
                    handler.connection.shutdown(socket.SHUT_RDWR)
                return
            _write(handler, chunk, chunked)
            sent += len(chunk)
        if chunked:
            handler.wfile.write(b"0\r\n\r\n")


def _write(handler: BaseHTTPRequestHandler, data: bytes, chunked: bool) -> None:
    if not data:
        return
    if chunked:
        handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    else:
        handler.wfile.write(data)


def _read_request_body(handler: BaseHTTPRequestHandler) -> bytes | None:
    length = handler.headers.get("Content-Length")
    if length is not None:
        return handler.rfile.read(int(length))
    if "chunked" in (handler.headers.get("Transfer-Encoding") or "").lower():
        parts: list[bytes] = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while handler.rfile.readline().strip():  # trailers
                    pass
                return b"".join(parts)
            parts.append(handler.rfile.read(size))
            handler.rfile.readline()
    return None


@dataclass(frozen=True)
class FlakyRegistry:
    """A `FlakyProxy` and the registry behind it (push to either)."""

    proxy: FlakyProxy
    upstream: Registry

    @property
    def registry(self) -> Registry:
        """The proxy's address: what a client under test talks to."""
        return self.proxy.registry

    def corrupt_blob(self, digest: str, offset: int = 0) -> None:
        self.proxy.corrupt_blob(digest, offset)

    def cut_blob_after(self, digest: str, nbytes: int, times: int = 1) -> None:
        self.proxy.cut_blob_after(digest, nbytes, times)

    def stall_blob(self, digest: str, after: int = 0, timeout: float = 60.0) -> Stall:
        return self.proxy.stall_blob(digest, after, timeout)

    def fail_next(
        self,
        status: int,
        times: int = 1,
        retry_after: int | str | None = None,
        *,
        path_prefix: str = "/v2/",
        method: str | None = None,
    ) -> None:
        self.proxy.fail_next(status, times, retry_after, path_prefix=path_prefix, method=method)

    def count(self, path_prefix: str = "", method: str | None = None) -> int:
        return self.proxy.count(path_prefix, method)

    def count_blob(self, digest: str, method: str = "GET") -> int:
        return self.proxy.count_blob(digest, method)

    @property
    def requests(self) -> list[ProxiedRequest]:
        return self.proxy.requests


# ---- fixtures ----------------------------------------------------------------------------------


def _require(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.fail(f"{binary} is not installed (apt-get install docker-registry skopeo)")


@pytest.fixture(scope="session")
def registry_ca() -> CertificateAuthority:
    """The test CA for TLS registries (one per session)."""
    return CertificateAuthority()


@pytest.fixture
def make_registry(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Registry]]:
    """``make_registry(tls=CA | None, basic=(user, password) | None, token=TokenServer | None)``
    starts another registry; all are stopped at teardown."""
    _require(REGISTRY_BINARY)
    started: list[RegistryProcess] = []

    def make(
        *,
        tls: CertificateAuthority | None = None,
        basic: tuple[str, str] | None = None,
        token: TokenServer | None = None,
    ) -> Registry:
        directory = tmp_path_factory.mktemp("registry")
        process = start_registry(directory, tls=tls, basic=basic, token=token)
        started.append(process)
        return process.registry

    yield make
    for process in reversed(started):
        process.stop()


@pytest.fixture
def registry(make_registry: Callable[..., Registry]) -> Registry:
    """A plain-HTTP, anonymous registry."""
    return make_registry()


@pytest.fixture
def registry_basic(make_registry: Callable[..., Registry]) -> Registry:
    """A plain-HTTP registry with htpasswd (bcrypt) Basic auth; credentials in the Registry."""
    return make_registry(basic=(BASIC_USERNAME, BASIC_PASSWORD))


@pytest.fixture
def registry_tls(
    make_registry: Callable[..., Registry], registry_ca: CertificateAuthority
) -> Registry:
    """An HTTPS registry (certificate for 127.0.0.1 from `registry_ca`; ``Registry.ca_cert``)."""
    return make_registry(tls=registry_ca)


MakeTokenRegistry = Callable[..., TokenRegistry]


@pytest.fixture
def make_token_registry(make_registry: Callable[..., Registry]) -> Iterator[MakeTokenRegistry]:
    """``make_token_registry(lifetime=300, anonymous_pull=False, enforce_lifetime=True)``: a
    registry with Bearer token auth and its own `TokenServer` (see there)."""
    servers: list[TokenServer] = []

    def make(
        *,
        lifetime: int = 300,
        anonymous_pull: bool = False,
        enforce_lifetime: bool = True,
    ) -> TokenRegistry:
        tokens = TokenServer(
            lifetime=lifetime, anonymous_pull=anonymous_pull, enforce_lifetime=enforce_lifetime
        )
        servers.append(tokens)
        return TokenRegistry(make_registry(token=tokens), tokens)

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def registry_token(make_token_registry: MakeTokenRegistry) -> TokenRegistry:
    """A registry with Bearer token auth (tokens live 300 s): ``.registry`` and ``.tokens``."""
    return make_token_registry()


MakeFlakyRegistry = Callable[[Registry], FlakyRegistry]


@pytest.fixture
def make_flaky_registry() -> Iterator[MakeFlakyRegistry]:
    """``make_flaky_registry(upstream)``: a `FlakyProxy` in front of any plain-HTTP registry
    (a Basic or token one too)."""
    proxies: list[FlakyProxy] = []

    def make(upstream: Registry) -> FlakyRegistry:
        proxy = FlakyProxy(upstream)
        proxies.append(proxy)
        return FlakyRegistry(proxy, upstream)

    yield make
    for proxy in proxies:
        proxy.close()


@pytest.fixture
def flaky_registry(
    make_flaky_registry: MakeFlakyRegistry, make_registry: Callable[..., Registry]
) -> FlakyRegistry:
    """A `FlakyProxy` in front of a plain anonymous registry: ``.registry`` is the proxy,
    ``.upstream`` the registry itself; the knobs are `FlakyProxy`'s."""
    return make_flaky_registry(make_registry())


__all__ = [
    "BASIC_PASSWORD",
    "BASIC_USERNAME",
    "TOKEN_ISSUER",
    "TOKEN_LEEWAY",
    "TOKEN_SERVICE",
    "CertificateAuthority",
    "FlakyProxy",
    "FlakyRegistry",
    "Grant",
    "MakeFlakyRegistry",
    "MakeTokenRegistry",
    "ProxiedRequest",
    "Registry",
    "RegistryError",
    "RegistryProcess",
    "Stall",
    "TokenRegistry",
    "TokenRequest",
    "TokenServer",
    "parse_scope",
    "push",
    "running_registry",
    "start_registry",
]
