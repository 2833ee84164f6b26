"""The OCI distribution client (`storage.registry`) against a real registry (distribution 2.8,
started by the fixtures of ``tests/registry.py``) and, for answers no real registry gives
(garbage, schema 1, oversized manifests, cross-host redirects, revoked tokens), against a tiny
stub registry served by `http.server` in this file."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import http.server
import json
import logging
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import structlog
from structlog.testing import LogCapture

from imageledger.domain.errors import (
    DigestMismatchError,
    ImageNotFoundError,
    NotInRegistryError,
    RegistryAuthError,
    RegistryError,
)
from imageledger.domain.model import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Platform
from imageledger.domain.reference import Reference
from imageledger.storage.blobs import BlobStore
from imageledger.storage.credentials import docker_config_credentials
from imageledger.storage.oci import IndexEntry, choose_index_entry, host_platform
from imageledger.storage.registry import PullProgress, RegistryClient
from imageledger.storage.registryauth import parse_challenges
from imageledger.storage.registryoptions import RegistryOptions, options_from_environment
from imageledger.tools.imagebuild import (
    BuiltImage,
    ImageSpec,
    build_image,
    build_oci_layout,
    json_bytes,
    sha256,
)

# pytest imports tests/registry.py as the plugin module `registry`; mypy knows it as
# `tests.registry` (the convention of tests/test_registry_fixture.py).
if TYPE_CHECKING:
    from tests.registry import FlakyRegistry, MakeTokenRegistry, Registry, TokenRegistry, push
else:
    from registry import FlakyRegistry, MakeTokenRegistry, Registry, TokenRegistry, push

pytestmark = pytest.mark.timeout(120)

Logs = list[MutableMapping[str, Any]]
AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64", "v8")
OTHER = ARM64 if host_platform().architecture == "amd64" else AMD64
"""A platform that is not the host's, so that choosing it proves the choice was made."""


# ---- helpers -------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def logs() -> Iterator[Logs]:
    """Every structlog event of the test, debug included, as the event dicts logged."""
    capture = LogCapture()
    structlog.configure(
        processors=[capture],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=False,
    )
    yield capture.entries
    structlog.reset_defaults()


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "home")


def _options(registry: Registry, **kwargs: Any) -> RegistryOptions:
    """Options for `registry`: plain HTTP to it (unless it is TLS) and to the hosts in
    ``also_insecure`` (a token realm)."""
    insecure = frozenset() if registry.url.startswith("https://") else frozenset({registry.host})
    insecure |= frozenset(kwargs.pop("also_insecure", ()))
    kwargs.setdefault("backoff", 0.01)
    return RegistryOptions(insecure=insecure, **kwargs)


def _credentials(registry: Registry) -> Callable[[str], tuple[str, str] | None]:
    assert registry.username is not None and registry.password is not None
    user, password = registry.username, registry.password
    return lambda host: (user, password) if host == registry.host else None


def _pull(
    registry: Registry,
    store: BlobStore,
    reference: str,
    platform: Platform = AMD64,
    progress: Callable[[PullProgress], None] | None = None,
    **options: Any,
) -> Any:
    with RegistryClient(_options(registry, **options)) as client:
        return client.pull(
            Reference.parse(f"{registry.host}/{reference}"),
            store,
            platform=platform,
            progress=progress,
        )


def _spec(name: str, *layers: bytes, **kwargs: Any) -> ImageSpec:
    files = tuple({f"{name}/{i}": data} for i, data in enumerate(layers or (name.encode(),)))
    return ImageSpec(layers=files, **kwargs)


def _publish(
    tmp_path: Path,
    registry: Registry,
    reference: str,
    images: list[ImageSpec],
    *,
    multi_arch: bool = False,
    attestations: bool = False,
    docker_format: bool = False,
) -> Any:
    """Build an OCI layout of `images` and push it (skopeo) as `reference`."""
    directory = tmp_path / f"layout-{reference.replace('/', '_').replace(':', '_')}"
    if multi_arch:
        layout = build_oci_layout(
            directory, images, multi_arch=True, attestations=attestations, names=("x",)
        )
    else:
        layout = build_oci_layout(directory, [_named(images[0], "x")])
    push(
        registry,
        f"oci:{directory}:x",
        reference,
        all_platforms=multi_arch,
        docker_format=docker_format,
    )
    return layout


def _named(spec: ImageSpec, name: str) -> ImageSpec:
    return dataclasses.replace(spec, names=(name,))


def _noise(seed: bytes, size: int) -> bytes:
    """`size` incompressible bytes (layers are gzipped: skopeo would compress anything else)."""
    return hashlib.shake_256(seed).digest(size)


def _no_partials(store: BlobStore) -> None:
    assert not [p for p in store.tmp.rglob("*") if p.name.endswith(".part")]


# ---- pulls from a real registry ------------------------------------------------------------


def test_pull_oci_image(tmp_path: Path, registry: Registry, store: BlobStore) -> None:
    spec = _spec("oci", b"one" * 1000, b"two" * 1000, labels={"a": "b"})
    built = _publish(tmp_path, registry, "app/oci:1", [spec]).images[0]
    events: list[PullProgress] = []
    content = _pull(registry, store, "app/oci:1", progress=events.append)
    assert content.manifest_digest == built.manifest_digest
    assert content.manifest_media_type == OCI_MANIFEST
    assert content.config.digest == built.config_digest
    assert content.config.labels == (("a", "b"),)
    assert content.platform == AMD64
    assert [layer.blob_digest for layer in content.layers] == [lay.digest for lay in built.layers]
    for digest in built.blobs:
        assert store.verify(digest)
    assert events[0] == PullProgress(
        "manifest", built.manifest_digest, len(built.manifest), len(built.manifest)
    )
    done = {e.digest for e in events if e.event == "blob-done"}
    assert done == {built.config_digest, *(layer.digest for layer in built.layers)}
    # Everything is stored now: a second pull fetches no blob.
    again: list[PullProgress] = []
    assert _pull(registry, store, "app/oci:1", progress=again.append) == content
    assert {e.event for e in again} == {"manifest", "blob-cached"}
    _no_partials(store)


def test_pull_docker_media_types(tmp_path: Path, registry: Registry, store: BlobStore) -> None:
    spec = _spec("docker", b"layer")  # skopeo converts it to Docker v2 schema 2
    built = _publish(tmp_path, registry, "app/docker:1", [spec], docker_format=True).images[0]
    content = _pull(registry, store, "app/docker:1")
    assert content.manifest_media_type == DOCKER_MANIFEST
    assert [layer.blob_digest for layer in content.layers] == [lay.digest for lay in built.layers]
    assert store.verify(content.manifest_digest)


def test_pull_by_digest(tmp_path: Path, registry: Registry, store: BlobStore) -> None:
    built = _publish(tmp_path, registry, "app/pinned:1", [_spec("pinned")]).images[0]
    content = _pull(registry, store, f"app/pinned@{built.manifest_digest}")
    assert content.manifest_digest == built.manifest_digest


def test_index_resolves_to_the_requested_platform_skipping_attestations(
    tmp_path: Path, registry: Registry, store: BlobStore
) -> None:
    specs = [
        _spec("amd", architecture="amd64"),
        _spec("arm", architecture="arm64", variant="v8"),
    ]
    layout = _publish(tmp_path, registry, "app/multi:1", specs, multi_arch=True, attestations=True)
    chosen = next(i for i in layout.images if i.spec.architecture == OTHER.architecture)
    content = _pull(registry, store, "app/multi:1", platform=OTHER)
    assert content.manifest_digest == chosen.manifest_digest
    assert content.platform.architecture == OTHER.architecture
    others = [i for i in layout.images if i is not chosen]
    for image in others:
        assert not store.has(image.manifest_digest)
        assert not any(store.has(layer.digest) for layer in image.layers)
    for attestation in layout.attestation_digests:
        assert not store.has(attestation)
    assert layout.index_digest is not None and not store.has(layout.index_digest)
    with pytest.raises(NotInRegistryError, match=r"app/multi:1.*linux/s390x"):
        _pull(registry, store, "app/multi:1", platform=Platform("linux", "s390x"))


def test_docker_manifest_list(tmp_path: Path, registry: Registry, store: BlobStore) -> None:
    specs = [
        _spec("amd", architecture="amd64"),
        _spec("arm", architecture="arm64", variant="v8"),
    ]
    layout = _publish(tmp_path, registry, "app/list:1", specs, multi_arch=True, docker_format=True)
    served = httpx.get(
        f"{registry.url}/v2/app/list/manifests/1",
        headers={"Accept": f"{DOCKER_LIST}, {DOCKER_MANIFEST}"},
    )
    assert served.headers["Content-Type"] == DOCKER_LIST
    content = _pull(registry, store, "app/list:1", platform=OTHER)
    assert content.manifest_media_type == DOCKER_MANIFEST
    assert content.platform.architecture == OTHER.architecture
    chosen = next(i for i in layout.images if i.spec.architecture == OTHER.architecture)
    assert [layer.blob_digest for layer in content.layers] == [lay.digest for lay in chosen.layers]


def test_not_found_names_the_reference(registry: Registry, store: BlobStore) -> None:
    with pytest.raises(NotInRegistryError) as caught:
        _pull(registry, store, "no/such:tag")
    assert isinstance(caught.value, ImageNotFoundError)
    assert caught.value.reference == f"{registry.host}/no/such:tag"
    assert f"{registry.host}/no/such:tag" in str(caught.value)


def test_basic_auth(tmp_path: Path, registry_basic: Registry, store: BlobStore) -> None:
    registry = registry_basic
    built = _publish(tmp_path, registry, "private/app:1", [_spec("basic")]).images[0]
    content = _pull(registry, store, "private/app:1", credentials=_credentials(registry))
    assert content.manifest_digest == built.manifest_digest
    with pytest.raises(RegistryAuthError, match="no credentials"):
        _pull(registry, BlobStore(tmp_path / "anonymous"), "private/app:1")
    wrong = lambda host: ("alice", "wrong-password")  # noqa: E731
    with pytest.raises(RegistryAuthError, match="rejected"):
        _pull(registry, BlobStore(tmp_path / "wrong"), "private/app:1", credentials=wrong)


def test_bearer_token_reused_then_refreshed_after_expiry(
    tmp_path: Path, make_token_registry: MakeTokenRegistry, store: BlobStore
) -> None:
    # The registry itself refuses the token once its 3 s are over (enforce_lifetime).
    served = make_token_registry(lifetime=3)
    registry, tokens = served.registry, served.tokens
    spec = _spec("token", b"a" * 100, b"b" * 100, b"c" * 100)
    _publish(tmp_path, registry, "private/tok:1", [spec])
    issued = tokens.count()
    options = _options(registry, credentials=_credentials(registry), also_insecure=[tokens.host])
    with RegistryClient(options) as client:
        reference = Reference.parse(f"{registry.host}/private/tok:1")
        client.pull(reference, store, platform=AMD64)
        assert tokens.count() - issued == 1  # one token for the manifest and all four blobs
        assert tokens.requests[-1].scopes == ("repository:private/tok:pull",)
        assert tokens.requests[-1].account == registry.username
        client.pull(reference, BlobStore(tmp_path / "again"), platform=AMD64)
        assert tokens.count() - issued == 1  # still valid: reused
        time.sleep(3.1)
        client.pull(reference, BlobStore(tmp_path / "later"), platform=AMD64)
        assert tokens.count() - issued == 2  # expired: fetched anew, once


def test_bearer_token_refusals(
    tmp_path: Path, registry_token: TokenRegistry, store: BlobStore
) -> None:
    registry = registry_token.registry
    _publish(tmp_path, registry, "private/tok:1", [_spec("refused")])
    with pytest.raises(RegistryAuthError, match="refused anonymous access"):
        _pull(registry, store, "private/tok:1")
    wrong = lambda host: (registry.username, "wrong-password")  # noqa: E731
    with pytest.raises(RegistryAuthError, match="refused the credentials"):
        _pull(
            registry,
            store,
            "private/tok:1",
            credentials=wrong,
            also_insecure=[registry_token.tokens.host],
        )
    assert not list(store.digests())


def test_tls_with_the_test_ca(tmp_path: Path, registry_tls: Registry, store: BlobStore) -> None:
    registry = registry_tls
    assert registry.url.startswith("https://") and registry.ca_cert is not None
    built = _publish(tmp_path, registry, "secure/app:1", [_spec("tls")]).images[0]
    content = _pull(registry, store, "secure/app:1", ca_bundle=Path(registry.ca_cert))
    assert content.manifest_digest == built.manifest_digest
    started = time.monotonic()
    with pytest.raises(RegistryError, match=r"(?i)certificate") as caught:
        _pull(registry, BlobStore(tmp_path / "untrusted"), "secure/app:1", backoff=1.0)
    assert not isinstance(caught.value, RegistryAuthError)
    assert time.monotonic() - started < 1.0  # a certificate that does not verify is not retried


def test_the_trust_store_is_loaded_only_for_a_tls_connection(
    tmp_path: Path,
    registry: Registry,
    registry_tls: Registry,
    store: BlobStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The system's CA certificates (~25 ms to load) are loaded by the first TLS connection,
    not by every client: a pull over plain HTTP never loads them, and a pull over TLS with
    no CA bundle verifies against them (``SSL_CERT_FILE`` stands in for the system's store)."""
    loads: list[int] = []
    real = ssl.SSLContext.load_default_certs

    def counting(context: ssl.SSLContext, purpose: ssl.Purpose = ssl.Purpose.SERVER_AUTH) -> None:
        loads.append(1)
        real(context, purpose)

    monkeypatch.setattr(ssl.SSLContext, "load_default_certs", counting)
    plain = _publish(tmp_path, registry, "plain/app:1", [_spec("plain")]).images[0]
    assert _pull(registry, store, "plain/app:1").manifest_digest == plain.manifest_digest
    assert loads == []
    assert registry_tls.ca_cert is not None
    secure = _publish(tmp_path, registry_tls, "secure/lazy:1", [_spec("lazy")]).images[0]
    monkeypatch.setenv("SSL_CERT_FILE", str(registry_tls.ca_cert))
    with RegistryClient(_options(registry_tls)) as client:
        assert loads == []
        for _ in range(2):
            content = client.pull(
                Reference.parse(f"{registry_tls.host}/secure/lazy:1"),
                BlobStore(tmp_path / "lazy"),
                platform=AMD64,
            )
            assert content.manifest_digest == secure.manifest_digest
    assert loads == [1]  # once per client, whatever the connections


def test_a_config_that_fails_stops_the_layers_and_is_the_error(
    tmp_path: Path, flaky_registry: FlakyRegistry, store: BlobStore
) -> None:
    """The config is fetched while the layers download (no longer before them): its failure
    is still the pull's error, and nothing of the pull lands but whole, verified blobs."""
    registry, upstream = flaky_registry.registry, flaky_registry.upstream
    spec = _spec("cfg", _noise(b"cfg-a", 300_000), _noise(b"cfg-b", 300_000))
    built = _publish(tmp_path, upstream, "app/badconfig:1", [spec]).images[0]
    flaky_registry.corrupt_blob(built.config_digest)
    with pytest.raises(DigestMismatchError, match=built.config_digest):
        _pull(registry, store, "app/badconfig:1")
    assert not store.has(built.config_digest)
    assert not store.has(built.manifest_digest)
    for digest in store.digests():
        assert store.verify(digest)
    _no_partials(store)


# ---- the flaky proxy -----------------------------------------------------------------------


def test_shared_layer_downloaded_once(
    tmp_path: Path, flaky_registry: FlakyRegistry, store: BlobStore
) -> None:
    registry, upstream = flaky_registry.registry, flaky_registry.upstream
    shared = {"shared/base": b"base layer" * 1000}
    one = ImageSpec(layers=(shared, {"one": b"1"}))
    two = ImageSpec(layers=(shared, {"two": b"2"}))
    first = _publish(tmp_path, upstream, "app/one:1", [one]).images[0]
    second = _publish(tmp_path, upstream, "app/two:1", [two]).images[0]
    base = first.layers[0].digest
    assert second.layers[0].digest == base
    events: list[PullProgress] = []
    _pull(registry, store, "app/one:1")
    _pull(registry, store, "app/two:1", progress=events.append)
    assert flaky_registry.count(f"/v2/app/one/blobs/{base}") == 1
    assert flaky_registry.count(f"/v2/app/two/blobs/{base}") == 0
    assert any(e.event == "blob-cached" and e.digest == base for e in events)


def test_tampered_blob_is_rejected_and_nothing_lands(
    tmp_path: Path, flaky_registry: FlakyRegistry, store: BlobStore
) -> None:
    registry, upstream = flaky_registry.registry, flaky_registry.upstream
    built = _publish(tmp_path, upstream, "app/tampered:1", [_spec("t", b"x" * 5000)]).images[0]
    layer = built.layers[0].digest
    flaky_registry.corrupt_blob(layer)
    with pytest.raises(DigestMismatchError, match=layer):
        _pull(registry, store, "app/tampered:1")
    assert not store.has(layer)
    assert not store.has(built.manifest_digest)
    _no_partials(store)


def test_interrupted_layer_resumes_with_range(
    tmp_path: Path, flaky_registry: FlakyRegistry, store: BlobStore, logs: Logs
) -> None:
    registry, upstream = flaky_registry.registry, flaky_registry.upstream
    spec = _spec("resume", _noise(b"resume", 2_500_000))
    built = _publish(tmp_path, upstream, "app/resume:1", [spec]).images[0]
    layer = built.layers[0]
    flaky_registry.cut_blob_after(layer.digest, 1_000_000)
    content = _pull(registry, store, "app/resume:1")
    assert content.layers[0].blob_digest == layer.digest
    assert store.read(layer.digest) == layer.data
    fetches = [r for r in flaky_registry.requests if r.path.endswith(f"/blobs/{layer.digest}")]
    assert [r.header("Range") for r in fetches] == [None, "bytes=1000000-"]
    assert [r.status for r in fetches] == [200, 206]
    resumed = [e for e in logs if e["event"] == "registry.blob.resumed"]
    assert [(e["digest"], e["offset"]) for e in resumed] == [(layer.digest, 1_000_000)]
    _no_partials(store)


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured(
    tmp_path: Path, flaky_registry: FlakyRegistry, store: BlobStore, status: int
) -> None:
    registry, upstream = flaky_registry.registry, flaky_registry.upstream
    built = _publish(tmp_path, upstream, "app/busy:1", [_spec("busy")]).images[0]
    flaky_registry.fail_next(status, times=2, retry_after=1)
    started = time.monotonic()
    content = _pull(registry, store, "app/busy:1")
    assert content.manifest_digest == built.manifest_digest
    assert time.monotonic() - started >= 1.9  # two answers asked for a second each


def test_errors_after_the_retries(
    tmp_path: Path, flaky_registry: FlakyRegistry, store: BlobStore
) -> None:
    registry, upstream = flaky_registry.registry, flaky_registry.upstream
    _publish(tmp_path, upstream, "app/down:1", [_spec("down")])
    flaky_registry.fail_next(500, times=3)
    with pytest.raises(RegistryError, match=r"500.*after 2 retries"):
        _pull(registry, store, "app/down:1", retries=2)


def test_two_threads_pulling_one_image_download_each_blob_once(
    tmp_path: Path, flaky_registry: FlakyRegistry, store: BlobStore
) -> None:
    registry, upstream = flaky_registry.registry, flaky_registry.upstream
    layers = [_noise(bytes([i]), 1 << 20) for i in range(3)]
    spec = _spec("twice", *layers)
    built = _publish(tmp_path, upstream, "app/twice:1", [spec]).images[0]
    barrier = threading.Barrier(2)
    results: list[Any] = []

    def pull() -> None:
        barrier.wait()
        results.append(_pull(registry, BlobStore(store.root), "app/twice:1"))

    threads = [threading.Thread(target=pull) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 2 and results[0] == results[1]
    for digest in [built.config_digest, *(layer.digest for layer in built.layers)]:
        assert flaky_registry.count(f"/v2/app/twice/blobs/{digest}") == 1
        assert store.verify(digest)


_CHILD_PULL = """
import sys
from imageledger.domain.model import Platform
from imageledger.domain.reference import Reference
from imageledger.storage.blobs import BlobStore
from imageledger.storage.registry import RegistryClient
from imageledger.storage.registryoptions import RegistryOptions
from imageledger.tools.logs import configure_logging

configure_logging(stream=sys.stderr)
home, host, reference = sys.argv[1:4]
platform = Platform("linux", "amd64")
with RegistryClient(RegistryOptions(insecure=frozenset({host}))) as client:
    content = client.pull(Reference.parse(reference), BlobStore(home), platform=platform)
print(content.manifest_digest)
"""


def test_two_processes_pulling_one_image_download_each_blob_once(
    tmp_path: Path, flaky_registry: FlakyRegistry, store: BlobStore
) -> None:
    registry, upstream = flaky_registry.registry, flaky_registry.upstream
    spec = _spec("procs", _noise(b"procs", 300_000))
    built = _publish(tmp_path, upstream, "app/procs:1", [spec]).images[0]
    layer = built.layers[0].digest
    # The first process to reach the layer holds it (and its lock) until the other is waiting.
    stall = flaky_registry.stall_blob(layer, after=1000)
    command = [sys.executable, "-c", _CHILD_PULL, str(store.root), registry.host]
    children = [
        subprocess.Popen(
            [*command, f"{registry.host}/app/procs:1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        stall.wait_reached()
        deadline = time.monotonic() + 30
        while flaky_registry.count("/v2/app/procs/manifests/") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # the second child is now waiting for the blob's lock
        stall.release()
        outputs = [child.communicate(timeout=60) for child in children]
    finally:
        stall.release()
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert [child.returncode for child in children] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == [built.manifest_digest] * 2
    assert flaky_registry.count_blob(layer) == 1
    assert flaky_registry.count_blob(built.config_digest) == 1
    assert store.verify(layer)


# ---- a stub registry for answers a real one does not give ----------------------------------


@dataclass
class Stub:
    """A minimal registry: manifests (content type, body) by ``repo/ref``, blobs by digest,
    optional auth ("basic" or "bearer" with a token endpoint on the same server), and a hook
    that may answer any request itself (return True when it did)."""

    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    auth: str | None = None
    user: tuple[str, str] = ("carol", "c0rrect-h0rse")
    tokens: list[str] = field(default_factory=list)
    valid_tokens: set[str] = field(default_factory=set)
    token_lifetime: int = 300
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    hook: Callable[[http.server.BaseHTTPRequestHandler], bool] | None = None
    url: str = ""
    host: str = ""

    def add_image(self, repository: str, tag: str, image: BuiltImage) -> None:
        media_type = image.manifest_media_type
        self.manifests[f"{repository}/{tag}"] = (media_type, image.manifest)
        self.manifests[f"{repository}/{image.manifest_digest}"] = (media_type, image.manifest)
        self.blobs.update(image.blobs)

    def add_manifest(self, repository: str, ref: str, media_type: str, body: bytes) -> str:
        self.manifests[f"{repository}/{ref}"] = (media_type, body)
        self.manifests[f"{repository}/{sha256(body)}"] = (media_type, body)
        return sha256(body)

    def count(self, prefix: str) -> int:
        return sum(1 for path, _ in self.requests if path.startswith(prefix))


def _reply(
    handler: http.server.BaseHTTPRequestHandler,
    status: int,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> None:
    handler.send_response(status)
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _serve(stub: Stub, handler: http.server.BaseHTTPRequestHandler) -> None:  # noqa: PLR0911
    path = handler.path.split("?", 1)[0]
    stub.requests.append((handler.path, dict(handler.headers.items())))
    if stub.hook is not None and stub.hook(handler):
        return
    auth = handler.headers.get("Authorization", "")
    if path == "/token":
        expected = "Basic " + base64.b64encode(":".join(stub.user).encode()).decode()
        if auth != expected:
            _reply(handler, 401)
            return
        token = f"stub-token-{len(stub.tokens)}-{time.monotonic_ns()}"
        stub.tokens.append(token)
        stub.valid_tokens.add(token)
        answer = json.dumps({"access_token": token, "expires_in": stub.token_lifetime})
        _reply(handler, 200, answer.encode(), {"Content-Type": "application/json"})
        return
    if stub.auth == "bearer" and auth.removeprefix("Bearer ") not in stub.valid_tokens:
        challenge = f'Bearer realm="{stub.url}/token",service="stub",scope="repository:x:pull"'
        _reply(handler, 401, b"{}", {"WWW-Authenticate": challenge})
        return
    if stub.auth == "basic":
        expected = "Basic " + base64.b64encode(":".join(stub.user).encode()).decode()
        if auth != expected:
            _reply(handler, 401, b"{}", {"WWW-Authenticate": 'Basic realm="stub"'})
            return
    parts = path.split("/")
    if len(parts) >= 5 and parts[1] == "v2" and parts[-2] in ("manifests", "blobs"):
        repository, kind, ref = "/".join(parts[2:-2]), parts[-2], parts[-1]
        if kind == "manifests" and f"{repository}/{ref}" in stub.manifests:
            media_type, body = stub.manifests[f"{repository}/{ref}"]
            headers = {"Content-Type": media_type, "Docker-Content-Digest": sha256(body)}
            _reply(handler, 200, body, headers)
            return
        if kind == "blobs" and ref in stub.blobs:
            _reply(handler, 200, stub.blobs[ref], {"Content-Type": "application/octet-stream"})
            return
    _reply(handler, 404, b'{"errors":[{"code":"NOT_FOUND","message":"nope"}]}')


@contextlib.contextmanager
def _stub_server(stub: Stub, hostname: str = "127.0.0.1") -> Iterator[Stub]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            _serve(stub, self)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    stub.host = f"{hostname}:{server.server_address[1]}"
    stub.url = f"http://{stub.host}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stub
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def stub() -> Iterator[Stub]:
    with _stub_server(Stub()) as served:
        yield served


def _stub_pull(stub: Stub, store: BlobStore, reference: str, **options: Any) -> Any:
    options.setdefault("backoff", 0.01)
    with RegistryClient(RegistryOptions(insecure=frozenset({stub.host}), **options)) as client:
        return client.pull(Reference.parse(f"{stub.host}/{reference}"), store, platform=AMD64)


def test_garbage_manifest_is_a_registry_error(stub: Stub, store: BlobStore) -> None:
    stub.add_manifest("app", "json", OCI_MANIFEST, b"<html>not json</html>")
    stub.add_manifest("app", "html", "text/html", b"<html>hello</html>")
    stub.add_manifest("app", "empty", OCI_MANIFEST, json_bytes({"schemaVersion": 2}))
    with pytest.raises(RegistryError, match="not valid JSON"):
        _stub_pull(stub, store, "app:json")
    with pytest.raises(RegistryError, match="text/html"):
        _stub_pull(stub, store, "app:html")
    with pytest.raises(RegistryError, match="config"):
        _stub_pull(stub, store, "app:empty")
    assert not list(store.digests())


def test_schema1_is_refused_clearly(stub: Stub, store: BlobStore) -> None:
    body = json_bytes({"schemaVersion": 1, "name": "app", "tag": "old", "fsLayers": []})
    stub.add_manifest(
        "app", "old", "application/vnd.docker.distribution.manifest.v1+prettyjws", body
    )
    with pytest.raises(RegistryError, match="schema 1 is not supported"):
        _stub_pull(stub, store, "app:old")


def test_oversized_manifests_are_refused(stub: Stub, store: BlobStore) -> None:
    big = b"{" + b" " * (4 * 1024 * 1024) + b"}"

    def hook(handler: http.server.BaseHTTPRequestHandler) -> bool:
        if handler.path.endswith("/manifests/announced"):
            _reply(handler, 200, big, {"Content-Type": OCI_MANIFEST})
            return True
        if handler.path.endswith("/manifests/unannounced"):
            # No Content-Length: the body runs until the connection closes.
            handler.send_response(200)
            handler.send_header("Content-Type", OCI_MANIFEST)
            handler.send_header("Connection", "close")
            handler.end_headers()
            handler.wfile.write(big)
            handler.close_connection = True
            return True
        return False

    stub.hook = hook
    with pytest.raises(RegistryError, match="4194304"):
        _stub_pull(stub, store, "app:announced")
    with pytest.raises(RegistryError, match="more than the 4194304 byte limit"):
        _stub_pull(stub, store, "app:unannounced")


def test_manifest_digests_are_verified(stub: Stub, store: BlobStore) -> None:
    image = build_image(_spec("verified"))
    stub.add_image("app", "1", image)
    other = build_image(_spec("other"))

    def hook(handler: http.server.BaseHTTPRequestHandler) -> bool:
        if handler.path.endswith("/manifests/lying"):
            headers = {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": sha256(b"x")}
            _reply(handler, 200, image.manifest, headers)
            return True
        return False

    stub.hook = hook
    with pytest.raises(DigestMismatchError, match="announced"):
        _stub_pull(stub, store, "app:lying")
    # Pinned by a digest the registry serves other content for.
    stub.manifests[f"app/{other.manifest_digest}"] = (OCI_MANIFEST, image.manifest)
    with pytest.raises(DigestMismatchError, match=other.manifest_digest):
        _stub_pull(stub, store, f"app@{other.manifest_digest}")
    assert _stub_pull(stub, store, "app:1").manifest_digest == image.manifest_digest


def test_nested_index(stub: Stub, store: BlobStore) -> None:
    amd = build_image(_spec("amd", architecture="amd64"))
    arm = build_image(_spec("arm", architecture="arm64", variant="v8"))
    for image in (amd, arm):
        stub.add_image("app", image.manifest_digest, image)
    inner = json_bytes(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [arm.descriptor()]}
    )
    inner_digest = stub.add_manifest("app", "inner", OCI_INDEX, inner)
    outer = json_bytes(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                amd.descriptor(),
                {
                    "mediaType": OCI_INDEX,
                    "digest": inner_digest,
                    "size": len(inner),
                    "platform": arm.platform,
                },
            ],
        }
    )
    stub.add_manifest("app", "1", OCI_INDEX, outer)
    with RegistryClient(RegistryOptions(insecure=frozenset({stub.host}))) as client:
        content = client.pull(Reference.parse(f"{stub.host}/app:1"), store, platform=ARM64)
    assert content.manifest_digest == arm.manifest_digest
    assert not store.has(inner_digest)


def test_a_refused_token_is_refreshed_once(stub: Stub, store: BlobStore) -> None:
    stub.auth = "bearer"
    image = build_image(_spec("bearer", b"one", b"two"))
    stub.add_image("app", "1", image)
    options = RegistryOptions(
        insecure=frozenset({stub.host}), credentials=lambda host: stub.user, backoff=0.01
    )
    with RegistryClient(options) as client:
        reference = Reference.parse(f"{stub.host}/app:1")
        client.pull(reference, store, platform=AMD64)
        assert len(stub.tokens) == 1
        stub.valid_tokens.clear()  # the registry revokes the token it still has cached
        client.pull(reference, BlobStore(store.root / "second"), platform=AMD64)
        assert len(stub.tokens) == 2  # a 401 with the cached token: refreshed once
        original = stub.hook

        def revoke_all(handler: http.server.BaseHTTPRequestHandler) -> bool:
            stub.valid_tokens.clear()  # no token is ever valid
            return False

        stub.hook = revoke_all
        with pytest.raises(RegistryAuthError, match="even with a fresh token"):
            client.pull(reference, BlobStore(store.root / "third"), platform=AMD64)
        assert len(stub.tokens) == 3
        stub.hook = original
    for token in stub.tokens:
        for path, _ in stub.requests:
            assert token not in path


def test_redirects_do_not_carry_authorization_to_another_host(stub: Stub, store: BlobStore) -> None:
    stub.auth = "basic"
    image = build_image(_spec("redirected", b"payload" * 100))
    stub.add_image("app", "1", image)
    layer = image.layers[0].digest
    with _stub_server(Stub(), hostname="localhost") as storage:
        storage.blobs[layer] = image.layers[0].data

        def hook(handler: http.server.BaseHTTPRequestHandler) -> bool:
            if handler.path.endswith(f"/blobs/{layer}") and handler.headers.get("Authorization"):
                location = f"{storage.url}/v2/storage/blobs/{layer}?signature=s3cr3t"
                _reply(handler, 307, b"", {"Location": location})
                return True
            return False

        stub.hook = hook
        content = _stub_pull(stub, store, "app:1", credentials=lambda host: stub.user)
    assert content.layers[0].blob_digest == layer
    ((path, headers),) = storage.requests
    assert path.startswith(f"/v2/storage/blobs/{layer}")
    assert "authorization" not in {key.lower() for key in headers}


# ---- credentials and logs ------------------------------------------------------------------


def test_credentials_and_tokens_never_reach_the_logs(
    tmp_path: Path,
    registry_basic: Registry,
    registry_token: TokenRegistry,
    store: BlobStore,
    logs: Logs,
) -> None:
    basic, bearer = registry_basic, registry_token.registry
    failures: list[str] = []
    wrong_password = "wr0ng-but-s3cret"
    pairs = [_credentials(basic)(basic.host), _credentials(bearer)(bearer.host)]
    pairs.append(("someone", wrong_password))
    realm = [registry_token.tokens.host]
    for registry in (basic, bearer):
        _publish(tmp_path, registry, "private/logged:1", [_spec("logged")])
        home = tmp_path / registry.host.replace(":", "_")
        _pull(
            registry,
            BlobStore(home),
            "private/logged:1",
            credentials=_credentials(registry),
            also_insecure=realm,
        )
        with pytest.raises(RegistryAuthError) as caught:
            _pull(
                registry,
                BlobStore(home / "wrong"),
                "private/logged:1",
                credentials=lambda host: ("someone", wrong_password),
                also_insecure=realm,
            )
        failures.append(str(caught.value))
    tokens = [r.token for r in registry_token.tokens.requests if r.token is not None]
    assert logs and tokens
    secrets = [password for _, password in (p for p in pairs if p is not None)] + tokens
    secrets += [
        base64.b64encode(f"{user}:{password}".encode()).decode()
        for user, password in (p for p in pairs if p is not None)
    ]
    text = repr(logs) + repr(failures)
    for secret in secrets:
        assert secret not in text
    assert "Bearer " not in text and "Basic " not in text


# ---- options, challenges, platforms (no registry) ------------------------------------------


def test_options_from_environment(tmp_path: Path) -> None:
    config = tmp_path / "docker" / "config.json"
    config.parent.mkdir()
    config.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {
                        "auth": base64.b64encode(b"hubuser:hub:pass").decode()
                    },
                    "registry.example:5000": {"username": "u", "password": "p"},
                    "http://other.example/": {"auth": "!!not base64!!"},
                },
                "credsStore": "desktop",
            }
        )
    )
    environ = {
        "DOCKER_CONFIG": str(config.parent),
        "IMAGELEDGER_INSECURE_REGISTRIES": "localhost:5000, 127.0.0.1:1234,",
        "IMAGELEDGER_CA_BUNDLE": str(tmp_path / "ca.pem"),
    }
    options = options_from_environment(environ, insecure=["Extra.Example"])
    assert options.insecure == frozenset({"localhost:5000", "127.0.0.1:1234", "extra.example"})
    assert options.ca_bundle == tmp_path / "ca.pem"
    assert options.credentials is not None
    assert options.credentials("docker.io") == ("hubuser", "hub:pass")
    assert options.credentials("registry.example:5000") == ("u", "p")
    assert options.credentials("other.example") is None
    assert "hub:pass" not in repr(options)
    # The environment's credentials, for one host or every host; the call's come first.
    scoped = options_from_environment(
        {
            **environ,
            "IMAGELEDGER_REGISTRY_USER": "env",
            "IMAGELEDGER_REGISTRY_PASSWORD": "envpass",
            "IMAGELEDGER_REGISTRY_HOST": "registry.example:5000",
        }
    )
    assert scoped.credentials is not None
    assert scoped.credentials("registry.example:5000") == ("env", "envpass")
    assert scoped.credentials("docker.io") == ("hubuser", "hub:pass")
    assert docker_config_credentials(tmp_path / "missing.json") == {}
    # The call's credentials come first.
    first = options_from_environment(
        {
            "HOME": str(tmp_path),
            "IMAGELEDGER_REGISTRY_USER": "e",
            "IMAGELEDGER_REGISTRY_PASSWORD": "p",
            "IMAGELEDGER_REGISTRY_HOST": "a.example",
        },
        credentials=lambda host: ("call", "x") if host == "a.example" else None,
    )
    assert first.credentials is not None
    assert first.credentials("a.example") == ("call", "x")
    assert first.credentials("b.example") is None  # the environment's name their registry


def test_parse_challenges() -> None:
    header = (
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push"'
    )
    assert parse_challenges([header]) == [
        (
            "bearer",
            {
                "realm": "https://auth.example/token",
                "service": "registry.example",
                "scope": "repository:a/b:pull,push",
            },
        )
    ]
    assert parse_challenges(['Basic realm="x", Bearer realm="y",service=s']) == [
        ("basic", {"realm": "x"}),
        ("bearer", {"realm": "y", "service": "s"}),
    ]
    assert parse_challenges(['basic realm="a \\"quoted\\" realm"']) == [
        ("basic", {"realm": 'a "quoted" realm'})
    ]


def _entry(platform: Platform | None, attestation: bool = False) -> IndexEntry:
    digest = "sha256:" + hashlib.sha256(str((platform, attestation)).encode()).hexdigest()
    return IndexEntry(digest, OCI_MANIFEST, 1, platform, None, attestation)


def test_choose_platform() -> None:
    amd = _entry(AMD64)
    arm64 = _entry(Platform("linux", "arm64"))
    v6, v7 = _entry(Platform("linux", "arm", "v6")), _entry(Platform("linux", "arm", "v7"))
    unknown = _entry(Platform("unknown", "unknown"), attestation=True)
    entries = [unknown, amd, arm64, v6, v7]
    assert choose_index_entry(entries, AMD64) is amd
    assert choose_index_entry(entries, Platform("linux", "arm64", "v8")) is arm64
    assert choose_index_entry(entries, Platform("linux", "arm", "v7")) is v7
    assert choose_index_entry([unknown, amd, v6], Platform("linux", "arm", "v7")) is v6
    assert choose_index_entry([v7], Platform("linux", "arm", "v6")) is None
    assert choose_index_entry(entries, Platform("linux", "arm")) is v6
    assert choose_index_entry(entries, Platform("windows", "amd64")) is None
    assert choose_index_entry([unknown], Platform("unknown", "unknown")) is None


def _helper(bin_dir: Path, name: str, answers: dict[str, tuple[str, str]]) -> Path:
    """A real ``docker-credential-<name>`` program (Docker's credential helper protocol): it
    logs each request beside itself and answers `answers[server]`, or "not found"."""
    bin_dir.mkdir(exist_ok=True)
    program = bin_dir / f"docker-credential-{name}"
    program.write_text(
        f"#!{sys.executable}\n"
        "import json, pathlib, sys\n"
        "server = sys.stdin.read().strip()\n"
        f"answers = {json.dumps({k: list(v) for k, v in answers.items()})}\n"
        "log = pathlib.Path(sys.argv[0] + '.log')\n"
        "with log.open('a') as f:\n"
        "    f.write(sys.argv[1] + ' ' + server + '\\n')\n"
        "if server not in answers:\n"
        "    print('credentials not found in native keychain')\n"
        "    sys.exit(1)\n"
        "user, secret = answers[server]\n"
        "print(json.dumps({'ServerURL': server, 'Username': user, 'Secret': secret}))\n"
    )
    program.chmod(0o755)
    return program


def test_docker_credential_helpers(
    tmp_path: Path, registry_basic: Registry, store: BlobStore, logs: Logs
) -> None:
    registry = registry_basic
    right = _credentials(registry)(registry.host)
    assert right is not None
    _publish(tmp_path, registry, "private/helped:1", [_spec("helped")])
    bin_dir = tmp_path / "bin"
    store_helper = _helper(bin_dir, "teststore", {registry.host: right})
    wrong = _helper(bin_dir, "wrong", {registry.host: ("intruder", "nope")})
    empty = _helper(bin_dir, "empty", {})
    config = tmp_path / "docker" / "config.json"
    config.parent.mkdir()
    environ = {"DOCKER_CONFIG": str(config.parent), "PATH": str(bin_dir)}

    def pull_with(docker_config: dict[str, Any], home: str) -> Any:
        config.write_text(json.dumps(docker_config))
        options = options_from_environment(environ, insecure=[registry.host])
        with RegistryClient(dataclasses.replace(options, backoff=0.01)) as client:
            return client.pull(
                Reference.parse(registry.reference("private/helped:1")),
                BlobStore(tmp_path / home),
                platform=AMD64,
            )

    # credsStore answers for every registry; the helper is asked once for the pull.
    assert pull_with({"credsStore": "teststore"}, "a").manifest_digest
    assert (bin_dir / f"{store_helper.name}.log").read_text() == f"get {registry.host}\n"
    # credHelpers wins over credsStore for its host.
    with pytest.raises(RegistryAuthError):
        pull_with({"credsStore": "teststore", "credHelpers": {registry.host: "wrong"}}, "b")
    assert (bin_dir / f"{wrong.name}.log").read_text() == f"get {registry.host}\n"
    # A helper with nothing for the host, or no such helper: the auths entry is used.
    user, password = right
    auths = {"auths": {registry.host: {"username": user, "password": password}}}
    assert pull_with({**auths, "credHelpers": {registry.host: "empty"}}, "c").manifest_digest
    assert (bin_dir / f"{empty.name}.log").read_text() == f"get {registry.host}\n"
    assert pull_with({**auths, "credsStore": "missing"}, "d").manifest_digest
    events = [entry["event"] for entry in logs]
    assert "registry.credential_helper.missing" in events
    assert right[1] not in repr(logs) and "nope" not in repr(logs)
