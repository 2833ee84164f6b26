"""tests/registry.py: each registry fixture serves real images over real HTTP, and the flaky
proxy's knobs do what they say. Also pins the distribution 2.8 behaviour the client relies on
(Accept negotiation, schema 1 downgrade, auth challenges, token leeway)."""

from __future__ import annotations

import hashlib
import json
import ssl
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from imageledger.tools.imagebuild import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    BuiltLayout,
    ImageSpec,
    build_oci_layout,
)

# pytest imports tests/registry.py as the plugin module `registry` (tests/ is on sys.path under
# the rootdir-based "prepend" import mode); mypy, with explicit package bases, knows the same
# file as `tests.registry`.
if TYPE_CHECKING:
    from tests.registry import (
        BASIC_PASSWORD,
        FlakyRegistry,
        MakeFlakyRegistry,
        MakeTokenRegistry,
        Registry,
        TokenRegistry,
        push,
        running_registry,
    )
else:
    from registry import (
        BASIC_PASSWORD,
        FlakyRegistry,
        MakeFlakyRegistry,
        MakeTokenRegistry,
        Registry,
        TokenRegistry,
        push,
        running_registry,
    )

DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
ACCEPT_ALL = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="a",service="b"`` -> ("bearer", {"realm": "a", "service": "b"})."""
    scheme, _, rest = header.partition(" ")
    params: dict[str, str] = {}
    for part in rest.split('",'):
        key, _, value = part.partition("=")
        params[key.strip()] = value.strip().strip('"')
    return scheme.lower(), params


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> BuiltLayout:
    """A one-image OCI layout, entry named ``v1``, two gzip layers."""
    spec = ImageSpec(
        layers=({"etc/hostname": b"single\n"}, {"usr/bin/tool": b"#!/bin/sh\n" * 50}),
        names=("v1",),
    )
    return build_oci_layout(tmp_path_factory.mktemp("single"), [spec])


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory) -> BuiltLayout:
    """A two-platform OCI index with attestations, entry named ``multi``."""
    specs = [
        ImageSpec(layers=({"arch": b"amd64\n"},), architecture="amd64"),
        ImageSpec(layers=({"arch": b"arm64\n"},), architecture="arm64", variant="v8"),
    ]
    directory = tmp_path_factory.mktemp("multi")
    return build_oci_layout(directory, specs, multi_arch=True, attestations=True, names=("multi",))


@pytest.fixture(scope="module")
def multi_plain(tmp_path_factory: pytest.TempPathFactory) -> BuiltLayout:
    """A two-platform OCI index without attestations (skopeo cannot convert in-toto layers to
    Docker media types), entry named ``multi``."""
    specs = [
        ImageSpec(layers=({"arch": b"amd64\n"},), architecture="amd64"),
        ImageSpec(layers=({"arch": b"arm64\n"},), architecture="arm64", variant="v8"),
    ]
    directory = tmp_path_factory.mktemp("multi-plain")
    return build_oci_layout(directory, specs, multi_arch=True, names=("multi",))


def get_manifest(
    client: httpx.Client, registry: Registry, repository: str, reference: str, accept: str | None
) -> httpx.Response:
    headers = {} if accept is None else {"Accept": accept}
    return client.get(f"{registry.url}/v2/{repository}/manifests/{reference}", headers=headers)


def assert_manifest(response: httpx.Response, media_type: str, digest: str) -> None:
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == media_type
    assert response.headers["Docker-Content-Digest"] == digest
    assert digest_of(response.content) == digest


# ---- plain registry ----------------------------------------------------------------------------


def test_plain_registry_serves_oci_docker_and_multi_arch(
    registry: Registry, single: BuiltLayout, multi: BuiltLayout, multi_plain: BuiltLayout
) -> None:
    image = single.images[0]
    assert registry.url == f"http://{registry.host}"
    assert registry.ca_cert is None and registry.credentials is None
    assert push(registry, f"oci:{single.path}:v1", "test/oci:v1") == image.manifest_digest
    docker_digest = push(registry, f"oci:{single.path}:v1", "test/docker:v1", docker_format=True)
    assert docker_digest != image.manifest_digest  # skopeo rewrote the manifest
    assert push(registry, f"oci:{multi.path}:multi", "test/multi:v1", all_platforms=True) == (
        multi.index_digest
    )
    list_digest = push(
        registry,
        f"oci:{multi_plain.path}:multi",
        "test/list:v1",
        all_platforms=True,
        docker_format=True,
    )

    with httpx.Client(timeout=10) as client:
        base = client.get(f"{registry.url}/v2/")
        assert base.status_code == 200
        assert base.headers["Docker-Distribution-Api-Version"] == "registry/2.0"

        # OCI manifest: served only to a client that accepts OCI media types.
        oci = get_manifest(client, registry, "test/oci", "v1", ACCEPT_ALL)
        assert_manifest(oci, OCI_MANIFEST, image.manifest_digest)
        assert oci.content == image.manifest
        for accept in (None, DOCKER_MANIFEST, "*/*"):
            refused = get_manifest(client, registry, "test/oci", "v1", accept)
            assert refused.status_code == 404, accept
            assert refused.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        by_digest = get_manifest(client, registry, "test/oci", image.manifest_digest, OCI_MANIFEST)
        assert_manifest(by_digest, OCI_MANIFEST, image.manifest_digest)
        head = client.head(
            f"{registry.url}/v2/test/oci/manifests/v1", headers={"Accept": ACCEPT_ALL}
        )
        assert head.status_code == 200
        assert head.headers["Docker-Content-Digest"] == image.manifest_digest
        assert int(head.headers["Content-Length"]) == len(image.manifest)

        # Docker v2 schema 2: served as is when accepted, downgraded to schema 1 otherwise.
        docker = get_manifest(client, registry, "test/docker", "v1", ACCEPT_ALL)
        assert_manifest(docker, DOCKER_MANIFEST, docker_digest)
        layers = json.loads(docker.content)["layers"]
        assert [layer["digest"] for layer in layers] == [layer.digest for layer in image.layers]
        for accept in (None, OCI_MANIFEST):
            downgraded = get_manifest(client, registry, "test/docker", "v1", accept)
            assert downgraded.status_code == 200
            assert downgraded.headers["Content-Type"] == SCHEMA1_SIGNED
            assert downgraded.headers["Docker-Content-Digest"] != docker_digest

        # OCI index (with attestation manifests) and every manifest it lists.
        index = get_manifest(client, registry, "test/multi", "v1", ACCEPT_ALL)
        assert multi.index_digest is not None
        assert_manifest(index, OCI_INDEX, multi.index_digest)
        children = json.loads(index.content)["manifests"]
        assert len(children) == 4
        assert {child["digest"] for child in children} >= {
            built.manifest_digest for built in multi.images
        } | set(multi.attestation_digests)
        for child in children:
            response = get_manifest(client, registry, "test/multi", child["digest"], ACCEPT_ALL)
            assert_manifest(response, OCI_MANIFEST, child["digest"])
        refused = get_manifest(client, registry, "test/multi", "v1", OCI_MANIFEST)
        assert refused.status_code == 404

        # Docker manifest list.
        docker_list = get_manifest(client, registry, "test/list", "v1", ACCEPT_ALL)
        assert_manifest(docker_list, DOCKER_LIST, list_digest)
        entries = json.loads(docker_list.content)["manifests"]
        assert [entry["platform"]["architecture"] for entry in entries] == ["amd64", "arm64"]
        assert {entry["mediaType"] for entry in entries} == {DOCKER_MANIFEST}

        # Blobs: full and ranged.
        layer = image.layers[1]
        url = f"{registry.url}/v2/test/oci/blobs/{layer.digest}"
        blob = client.get(url)
        assert blob.status_code == 200 and blob.content == layer.data
        assert blob.headers["Docker-Content-Digest"] == layer.digest
        ranged = client.get(url, headers={"Range": "bytes=10-"})
        assert ranged.status_code == 206
        assert ranged.headers["Content-Range"] == f"bytes 10-{layer.size - 1}/{layer.size}"
        assert ranged.content == layer.data[10:]
        missing = client.get(f"{registry.url}/v2/test/oci/blobs/sha256:{'0' * 64}")
        assert missing.status_code == 404


def test_registry_process_lifecycle(tmp_path: Path) -> None:
    with running_registry(tmp_path / "registry") as registry:
        assert httpx.get(f"{registry.url}/v2/").status_code == 200
        assert "listening on" in registry.log.read_text()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{registry.url}/v2/")


# ---- Basic auth ------------------------------------------------------------------------------


def test_basic_auth_registry(registry_basic: Registry, single: BuiltLayout) -> None:
    assert registry_basic.credentials == (registry_basic.username, BASIC_PASSWORD)
    digest = push(registry_basic, f"oci:{single.path}:v1", "private/app:v1")
    with httpx.Client(timeout=10) as client:
        anonymous = client.get(f"{registry_basic.url}/v2/")
        assert anonymous.status_code == 401
        scheme, params = challenge(anonymous.headers["WWW-Authenticate"])
        assert scheme == "basic" and params["realm"]
        manifest_url = f"{registry_basic.url}/v2/private/app/manifests/v1"
        assert client.get(manifest_url, headers={"Accept": ACCEPT_ALL}).status_code == 401
        wrong = client.get(f"{registry_basic.url}/v2/", auth=(str(registry_basic.username), "x"))
        assert wrong.status_code == 401
        assert client.get(f"{registry_basic.url}/v2/", auth=registry_basic.credentials).is_success
        response = client.get(
            manifest_url, headers={"Accept": ACCEPT_ALL}, auth=registry_basic.credentials
        )
        assert_manifest(response, OCI_MANIFEST, digest)


# ---- token auth ------------------------------------------------------------------------------


def fetch_token(client: httpx.Client, params: dict[str, str], registry: Registry) -> Any:
    response = client.get(
        params["realm"],
        params={"service": params["service"], "scope": params["scope"]},
        auth=registry.credentials,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_token_auth_registry(registry_token: TokenRegistry, single: BuiltLayout) -> None:
    registry, tokens = registry_token.registry, registry_token.tokens
    digest = push(registry, f"oci:{single.path}:v1", "team/app:v1")
    assert tokens.count(scope="repository:team/app:pull,push") >= 1
    pushed = tokens.count()

    with httpx.Client(timeout=10) as client:
        base = client.get(f"{registry.url}/v2/")
        assert base.status_code == 401
        scheme, params = challenge(base.headers["WWW-Authenticate"])
        assert scheme == "bearer"
        assert params == {"realm": tokens.realm, "service": tokens.service}

        manifest_url = f"{registry.url}/v2/team/app/manifests/v1"
        denied = client.get(manifest_url, headers={"Accept": ACCEPT_ALL})
        assert denied.status_code == 401
        scheme, params = challenge(denied.headers["WWW-Authenticate"])
        assert scheme == "bearer"
        assert params["scope"] == "repository:team/app:pull"
        assert params["realm"] == tokens.realm and params["service"] == tokens.service

        answer = fetch_token(client, params, registry)
        assert answer["token"] == answer["access_token"]
        assert answer["expires_in"] == tokens.lifetime
        bearer = {"Authorization": f"Bearer {answer['token']}"}
        response = client.get(manifest_url, headers={"Accept": ACCEPT_ALL, **bearer})
        assert_manifest(response, OCI_MANIFEST, digest)
        assert tokens.count() == pushed + 1
        assert tokens.count(scope="repository:team/app:pull") == 1
        assert tokens.requests[-1].account == registry.username

        # The token covers its scope only.
        other = client.get(f"{registry.url}/v2/team/other/manifests/v1", headers=bearer)
        assert other.status_code == 401
        _, params = challenge(other.headers["WWW-Authenticate"])
        assert params["error"] == "insufficient_scope"
        assert params["scope"] == "repository:team/other:pull"
        delete = client.delete(manifest_url, headers=bearer)
        assert delete.status_code == 401
        assert 'error="insufficient_scope"' in delete.headers["WWW-Authenticate"]

        # The token server checks the credentials.
        refused = client.get(
            tokens.realm,
            params={"service": tokens.service, "scope": "repository:team/app:pull"},
            auth=(str(registry.username), "wrong"),
        )
        assert refused.status_code == 401
        anonymous = client.get(tokens.realm, params={"service": tokens.service})
        assert anonymous.status_code == 401
        assert tokens.count(issued=False) == tokens.count() + 2


def test_token_lifetime_is_enforced_by_the_registry(
    make_token_registry: MakeTokenRegistry, single: BuiltLayout
) -> None:
    token_registry = make_token_registry(lifetime=1)
    registry, tokens = token_registry.registry, token_registry.tokens
    push(registry, f"oci:{single.path}:v1", "short/lived:v1")
    manifest_url = f"{registry.url}/v2/short/lived/manifests/v1"
    with httpx.Client(timeout=10) as client:
        params = {
            "realm": tokens.realm,
            "service": tokens.service,
            "scope": "repository:short/lived:pull",
        }
        answer = fetch_token(client, params, registry)
        assert answer["expires_in"] == 1
        bearer = {"Authorization": f"Bearer {answer['token']}", "Accept": ACCEPT_ALL}
        assert client.get(manifest_url, headers=bearer).status_code == 200
        time.sleep(2.1)  # the lifetime, rounded up to a whole second, has passed
        expired = client.get(manifest_url, headers=bearer)
        assert expired.status_code == 401
        assert 'error="invalid_token"' in expired.headers["WWW-Authenticate"]
        before = tokens.count()
        fresh = fetch_token(client, params, registry)
        assert tokens.count() == before + 1
        fresh_headers = {"Authorization": f"Bearer {fresh['token']}", "Accept": ACCEPT_ALL}
        assert client.get(manifest_url, headers=fresh_headers).status_code == 200


def test_anonymous_pull_tokens(make_token_registry: MakeTokenRegistry, single: BuiltLayout) -> None:
    token_registry = make_token_registry(anonymous_pull=True)
    registry, tokens = token_registry.registry, token_registry.tokens
    push(registry, f"oci:{single.path}:v1", "public/app:v1")
    with httpx.Client(timeout=10) as client:
        answer = client.get(
            tokens.realm,
            params={"service": tokens.service, "scope": "repository:public/app:pull,push"},
        ).json()
        bearer = {"Authorization": f"Bearer {answer['token']}", "Accept": ACCEPT_ALL}
        manifest_url = f"{registry.url}/v2/public/app/manifests/v1"
        assert client.get(manifest_url, headers=bearer).status_code == 200
        upload = client.post(f"{registry.url}/v2/public/app/blobs/uploads/", headers=bearer)
        assert upload.status_code == 401  # anonymous tokens grant pull only
        assert tokens.requests[-1].account is None


# ---- TLS ---------------------------------------------------------------------------------------


def test_tls_registry(registry_tls: Registry, single: BuiltLayout) -> None:
    assert registry_tls.url == f"https://{registry_tls.host}"
    assert registry_tls.ca_cert is not None
    digest = push(registry_tls, f"oci:{single.path}:v1", "secure/app:v1")
    context = ssl.create_default_context(cafile=str(registry_tls.ca_cert))
    with httpx.Client(verify=context, timeout=10) as client:
        assert client.get(f"{registry_tls.url}/v2/").status_code == 200
        response = get_manifest(client, registry_tls, "secure/app", "v1", ACCEPT_ALL)
        assert_manifest(response, OCI_MANIFEST, digest)
    with httpx.Client(timeout=10) as client, pytest.raises(httpx.ConnectError) as refused:
        client.get(f"{registry_tls.url}/v2/")
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
    # Plain HTTP to the TLS port: Go's server answers 400 (it does not hang up).
    plain = httpx.get(f"http://{registry_tls.host}/v2/", timeout=10)
    assert plain.status_code == 400
    assert "HTTPS" in plain.text


# ---- flaky proxy -------------------------------------------------------------------------------


@pytest.fixture
def flaky(flaky_registry: FlakyRegistry, single: BuiltLayout) -> FlakyRegistry:
    """The flaky registry with `single` pushed as ``flaky/app:v1`` (through the proxy)."""
    push(flaky_registry.registry, f"oci:{single.path}:v1", "flaky/app:v1")
    assert flaky_registry.count("/v2/flaky/app/blobs/uploads/", "PATCH") >= 1
    return flaky_registry


def test_flaky_proxy_passes_everything_through(flaky: FlakyRegistry, single: BuiltLayout) -> None:
    image = single.images[0]
    proxy, upstream = flaky.registry, flaky.upstream
    assert proxy.host != upstream.host
    with httpx.Client(timeout=10) as client:
        path = f"/v2/flaky/app/manifests/{image.manifest_digest}"
        direct = client.get(upstream.url + path, headers={"Accept": ACCEPT_ALL})
        proxied = client.get(proxy.url + path, headers={"Accept": ACCEPT_ALL})
        assert proxied.content == direct.content == image.manifest
        for name in ("Content-Type", "Content-Length", "Docker-Content-Digest", "Etag"):
            assert proxied.headers[name] == direct.headers[name], name
        # Accept is relayed: without OCI media types the registry answers 404.
        assert client.get(proxy.url + path, headers={"Accept": DOCKER_MANIFEST}).status_code == 404
        # Location (built from Host) points at the proxy.
        upload = client.post(f"{proxy.url}/v2/flaky/app/blobs/uploads/")
        assert upload.status_code == 202
        assert upload.headers["Location"].startswith(f"{proxy.url}/v2/flaky/app/blobs/uploads/")
        layer = image.layers[0]
        blob_url = f"{proxy.url}/v2/flaky/app/blobs/{layer.digest}"
        ranged = client.get(blob_url, headers={"Range": "bytes=5-"})
        assert ranged.status_code == 206 and ranged.content == layer.data[5:]
        assert ranged.headers["Content-Range"] == f"bytes 5-{layer.size - 1}/{layer.size}"
        assert flaky.requests[-1].header("Range") == "bytes=5-"
        assert flaky.count_blob(layer.digest) == 1
        assert flaky.count("/v2/flaky/app/manifests/", "GET") == 2


def test_flaky_proxy_relays_auth_challenges(
    make_flaky_registry: MakeFlakyRegistry,
    registry_token: TokenRegistry,
    registry_basic: Registry,
) -> None:
    token_flaky = make_flaky_registry(registry_token.registry)
    basic_flaky = make_flaky_registry(registry_basic)
    assert token_flaky.registry.credentials == registry_token.registry.credentials
    with httpx.Client(timeout=10) as client:
        bearer = client.get(f"{token_flaky.registry.url}/v2/")
        assert bearer.status_code == 401
        assert bearer.headers["WWW-Authenticate"].startswith(
            f'Bearer realm="{registry_token.tokens.realm}"'
        )
        basic = client.get(f"{basic_flaky.registry.url}/v2/")
        assert basic.headers["WWW-Authenticate"].startswith("Basic realm=")
        ok = client.get(f"{basic_flaky.registry.url}/v2/", auth=registry_basic.credentials)
        assert ok.status_code == 200


def test_flaky_corrupt_blob(flaky: FlakyRegistry, single: BuiltLayout) -> None:
    layer = single.images[0].layers[1]
    url = f"{flaky.registry.url}/v2/flaky/app/blobs/{layer.digest}"
    flaky.corrupt_blob(layer.digest, offset=-1)
    with httpx.Client(timeout=10) as client:
        tampered = client.get(url)
        assert tampered.status_code == 200
        assert tampered.headers["Docker-Content-Digest"] == layer.digest  # the header still lies
        assert len(tampered.content) == layer.size
        assert digest_of(tampered.content) != layer.digest
        differing = [
            i for i, (a, b) in enumerate(zip(tampered.content, layer.data, strict=True)) if a != b
        ]
        assert differing == [layer.size - 1]
        tail = client.get(url, headers={"Range": f"bytes={layer.size - 4}-"})
        assert tail.content[:3] == layer.data[-4:-1] and tail.content[3] != layer.data[-1]
        flaky.proxy.heal_blob(layer.digest)
        assert client.get(url).content == layer.data
    assert flaky.count_blob(layer.digest) == 3


def test_flaky_cut_blob_then_resume(flaky: FlakyRegistry, single: BuiltLayout) -> None:
    layer = single.images[0].layers[1]
    url = f"{flaky.registry.url}/v2/flaky/app/blobs/{layer.digest}"
    flaky.cut_blob_after(layer.digest, 100)
    received = bytearray()
    with httpx.Client(timeout=10) as client:
        with pytest.raises(httpx.RemoteProtocolError), client.stream("GET", url) as response:
            assert response.status_code == 200
            assert int(response.headers["Content-Length"]) == layer.size
            for chunk in response.iter_raw():
                received += chunk
        assert bytes(received) == layer.data[:100]
        rest = client.get(url, headers={"Range": f"bytes={len(received)}-"})
        assert rest.status_code == 206
        assert digest_of(bytes(received) + rest.content) == layer.digest
        assert client.get(url).content == layer.data  # only once
    assert flaky.count_blob(layer.digest) == 3


def test_flaky_fail_next(flaky: FlakyRegistry, single: BuiltLayout) -> None:
    url = f"{flaky.registry.url}/v2/flaky/app/manifests/v1"
    flaky.fail_next(503, times=2, retry_after=1)
    flaky.fail_next(429, times=1, path_prefix="/v2/flaky/app/blobs/")
    with httpx.Client(timeout=10) as client:
        answers = [client.get(url, headers={"Accept": ACCEPT_ALL}) for _ in range(3)]
        assert [answer.status_code for answer in answers] == [503, 503, 200]
        assert answers[0].headers["Retry-After"] == "1"
        assert answers[0].json()["errors"][0]["code"] == "UNAVAILABLE"
        assert "Retry-After" not in answers[2].headers
        config = single.images[0].config_digest
        blob_url = f"{flaky.registry.url}/v2/flaky/app/blobs/{config}"
        assert client.get(blob_url).status_code == 429
        assert client.get(blob_url).status_code == 200
    assert [r.status for r in flaky.requests[-5:]] == [503, 503, 200, 429, 200]
    assert flaky.count("/v2/flaky/app/manifests/v1", "GET") == 3


def test_flaky_stall_blob(flaky: FlakyRegistry, single: BuiltLayout) -> None:
    layer = single.images[0].layers[1]
    url = f"{flaky.registry.url}/v2/flaky/app/blobs/{layer.digest}"
    stall = flaky.stall_blob(layer.digest, after=10)
    result: list[bytes] = []

    def download() -> None:
        result.append(httpx.get(url, timeout=30).content)

    thread = threading.Thread(target=download)
    thread.start()
    stall.wait_reached()
    time.sleep(0.1)
    assert not result  # still held
    stall.release()
    thread.join(30)
    assert result == [layer.data]
