"""Issue 8 ("Safety first") for the registry client: where credentials may travel, environment
credentials that must name their registry, one-line errors for what httpx raises, bounded
waits (read timeout, pull deadline, Retry-After), the answer for a platform an index lacks,
and download lock files that neither pile up nor follow a planted link.

Real registries (the fixtures of ``tests/registry.py``) wherever one can show the behaviour;
the stub registry of ``tests/test_registry_client.py`` for answers no real registry gives (a
redirect loop, a token realm that redirects)."""

from __future__ import annotations

import base64
import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from imageledger import ImageCache
from imageledger.domain.errors import (
    HomeDamagedError,
    ImageLedgerError,
    NotInRegistryError,
    RegistryAuthError,
    RegistryConfigError,
    RegistryError,
    RegistryTimeoutError,
)
from imageledger.domain.model import Platform
from imageledger.domain.reference import Reference
from imageledger.storage.blobs import BlobStore
from imageledger.storage.pullstore import blob_lock
from imageledger.storage.redact import error_text
from imageledger.storage.registry import RegistryClient
from imageledger.storage.registryoptions import RegistryOptions, options_from_environment
from imageledger.tools.imagebuild import build_image

if TYPE_CHECKING:
    from tests.registry import FlakyRegistry, MakeTokenRegistry, Registry, TokenRegistry
    from tests.test_registry_client import (
        AMD64,
        Stub,
        _noise,
        _publish,
        _pull,
        _reply,
        _spec,
        _stub_pull,
        _stub_server,
    )
else:
    from registry import FlakyRegistry, MakeTokenRegistry, Registry, TokenRegistry
    from test_registry_client import (
        AMD64,
        Stub,
        _noise,
        _publish,
        _pull,
        _reply,
        _spec,
        _stub_pull,
        _stub_server,
    )

pytestmark = pytest.mark.timeout(120)

CLI = (sys.executable, "-m", "imageledger.tools.cli")
S390X = ("--platform", "linux/s390x")
OLD_STALL = 180.0
"""How long a stalled registry held a pull before (6 x 30 s): the bound the new limits beat."""


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "home")


@pytest.fixture
def stub() -> Any:
    with _stub_server(Stub()) as served:
        yield served


def _one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text and len(text) < 1000, text
    return text


# ---- 1. credentials travel over TLS, or plain HTTP to a host listed insecure itself --------


def test_credentials_never_go_to_a_plain_http_realm_that_is_not_listed_insecure(
    tmp_path: Path, registry_token: TokenRegistry
) -> None:
    registry, tokens = registry_token.registry, registry_token.tokens
    assert registry.password is not None
    _publish(tmp_path, registry, "private/realm:1", [_spec("realm")])
    credentials = registry.credentials
    before = len(tokens.requests)  # the push's
    # Only the registry is insecure; its realm (another port: another host) is plain HTTP too.
    with pytest.raises(RegistryAuthError, match="refusing to send the credentials") as caught:
        _pull(
            registry,
            BlobStore(tmp_path / "a"),
            "private/realm:1",
            credentials=lambda host: credentials,
        )
    text = _one_line(caught.value)
    assert tokens.host in text and registry.password not in text
    assert len(tokens.requests) == before  # not even asked: the credentials never left
    # Listing the realm's own host allows it.
    content = _pull(
        registry,
        BlobStore(tmp_path / "b"),
        "private/realm:1",
        credentials=lambda host: credentials,
        also_insecure=[tokens.host],
    )
    assert content.manifest_digest
    assert [r.account for r in tokens.requests[before:]] == [registry.username]


def test_an_anonymous_token_request_may_use_plain_http(
    tmp_path: Path, make_token_registry: MakeTokenRegistry
) -> None:
    served = make_token_registry(anonymous_pull=True)
    registry, tokens = served.registry, served.tokens
    built = _publish(tmp_path, registry, "public/app:1", [_spec("anon")]).images[0]
    before = len(tokens.requests)  # the push's
    content = _pull(registry, BlobStore(tmp_path / "home"), "public/app:1")
    assert content.manifest_digest == built.manifest_digest
    assert [r.account for r in tokens.requests[before:]] == [None]


def test_a_realm_redirect_does_not_carry_the_credentials_to_another_host(
    stub: Stub, store: BlobStore
) -> None:
    stub.auth = "bearer"
    stub.add_image("app", "1", build_image(_spec("redirected-token")))
    with _stub_server(Stub(), hostname="localhost") as elsewhere:

        def hook(handler: http.server.BaseHTTPRequestHandler) -> bool:
            if handler.path.startswith("/token"):
                _reply(handler, 307, b"", {"Location": f"{elsewhere.url}/token?moved=1"})
                return True
            return False

        stub.hook = hook
        with pytest.raises(RegistryAuthError):
            _stub_pull(stub, store, "app:1", credentials=lambda host: stub.user)
        [(path, headers)] = elsewhere.requests
    assert path.startswith("/token")
    assert "authorization" not in {key.lower() for key in headers}
    token_requests = [h for p, h in stub.requests if p.startswith("/token")]
    assert token_requests and all("Authorization" in h for h in token_requests)


# ---- 2. environment credentials name their registry ----------------------------------------


@pytest.mark.parametrize(
    ("environ", "missing"),
    [
        (
            {"IMAGELEDGER_REGISTRY_USER": "u", "IMAGELEDGER_REGISTRY_PASSWORD": "s3cret-pw"},
            "IMAGELEDGER_REGISTRY_HOST",
        ),
        ({"IMAGELEDGER_REGISTRY_USER": "u"}, "IMAGELEDGER_REGISTRY_PASSWORD"),
        (
            {
                "IMAGELEDGER_REGISTRY_PASSWORD": "s3cret-pw",
                "IMAGELEDGER_REGISTRY_HOST": "r.example",
            },
            "IMAGELEDGER_REGISTRY_USER",
        ),
    ],
)
def test_environment_credentials_must_name_their_registry(
    tmp_path: Path, environ: dict[str, str], missing: str
) -> None:
    with pytest.raises(RegistryConfigError) as caught:
        options_from_environment({"HOME": str(tmp_path), **environ})
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, ImageLedgerError)
    text = _one_line(caught.value)
    assert f"{missing} is not" in text
    assert "s3cret-pw" not in text


def test_environment_credentials_go_only_to_their_registry(tmp_path: Path) -> None:
    options = options_from_environment(
        {
            "HOME": str(tmp_path),
            "IMAGELEDGER_REGISTRY_USER": "u",
            "IMAGELEDGER_REGISTRY_PASSWORD": "p",
            "IMAGELEDGER_REGISTRY_HOST": "https://Registry.Example:5000/",
        }
    )
    assert options.credentials is not None
    assert options.credentials("registry.example:5000") == ("u", "p")
    assert options.credentials("registry.example") is None
    assert options.credentials("docker.io") is None


def test_cli_refuses_unnamed_environment_credentials_with_exit_2(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "IMAGELEDGER_REGISTRY_USER": "someone",
        "IMAGELEDGER_REGISTRY_PASSWORD": "s3cret-pw",
    }
    env.pop("IMAGELEDGER_REGISTRY_HOST", None)
    done = subprocess.run(
        [*CLI, "--home", str(tmp_path / "home"), "pull", "127.0.0.1:9/app:1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "IMAGELEDGER_REGISTRY_HOST" in line and "s3cret-pw" not in line


# ---- 3. every error one line -----------------------------------------------------------------


def test_a_redirect_loop_is_one_line_naming_the_url_without_secrets(
    stub: Stub, store: BlobStore
) -> None:
    def hook(handler: http.server.BaseHTTPRequestHandler) -> bool:
        if "/manifests/" in handler.path:
            location = f"{stub.url}{handler.path.split('?')[0]}?sig=t0p-s3cret"
            _reply(handler, 302, b"", {"Location": location})
            return True
        return False

    stub.hook = hook
    with pytest.raises(RegistryError, match="redirected more than 10 times") as caught:
        _stub_pull(stub, store, "app:1")
    text = _one_line(caught.value)
    assert f"{stub.url}/v2/app/manifests/1" in text and "s3cret" not in text


@pytest.mark.parametrize(
    "location",
    [
        "http://exa mple.invalid/x",
        "http://[::1/x",
        "ftp://127.0.0.1/x",
        "http://127.0.0.1:99999/x",
        "http://user:pa55word@exa mple.invalid/x?sig=s3cret",
        "ftp://user:pa55word@127.0.0.1/x?sig=s3cret",
    ],
)
def test_unfollowable_redirects_are_one_line_registry_errors(
    stub: Stub, store: BlobStore, location: str
) -> None:
    def hook(handler: http.server.BaseHTTPRequestHandler) -> bool:
        if "/manifests/" in handler.path:
            _reply(handler, 302, b"", {"Location": location})
            return True
        return False

    stub.hook = hook
    with pytest.raises(RegistryError) as caught:
        _stub_pull(stub, store, "app:1", retries=1)
    text = _one_line(caught.value)
    assert "pa55word" not in text and "s3cret" not in text


@pytest.mark.parametrize("realm", ["http://[::1/token", "http://exa mple/token", "file:///x"])
def test_a_malformed_token_realm_is_a_registry_error(
    stub: Stub, store: BlobStore, realm: str
) -> None:
    def hook(handler: http.server.BaseHTTPRequestHandler) -> bool:
        _reply(handler, 401, b"{}", {"WWW-Authenticate": f'Bearer realm="{realm}"'})
        return True

    stub.hook = hook
    with pytest.raises(RegistryAuthError, match=r"not an http|refusing to send"):
        _stub_pull(stub, store, "app:1", credentials=lambda host: stub.user)


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("Content-Length", "9" * 5000),  # more digits than int() takes
        ("Retry-After", "\u00b2"),  # isdigit() but not int()-able
        ("Content-Range", "bytes " + "1" * 5000 + "-2/3"),
    ],
)
def test_hostile_numeric_headers_are_not_tracebacks(
    stub: Stub, store: BlobStore, header: str, value: str
) -> None:
    def hook(handler: http.server.BaseHTTPRequestHandler) -> bool:
        handler.send_response(503 if header == "Retry-After" else 206)
        handler.send_header(header, value)
        if header != "Content-Length":
            handler.send_header("Content-Length", "0")
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.close_connection = True
        return True

    stub.hook = hook
    with pytest.raises(RegistryError) as caught:
        _stub_pull(stub, store, "app:1", retries=1)
    _one_line(caught.value)


def test_an_unusable_ca_bundle_is_a_config_error(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not a certificate\n")
    for path in (bundle, tmp_path / "missing.pem"):
        with pytest.raises(RegistryConfigError, match=r"CA bundle .*ca\.pem|missing\.pem"):
            RegistryClient(RegistryOptions(ca_bundle=path))


# ---- 4. waits: read timeout, deadline, Retry-After ---------------------------------------------


@pytest.mark.parametrize("seconds", [100000, 600])
def test_retry_after_beyond_the_cap_fails_at_once(
    tmp_path: Path, flaky_registry: FlakyRegistry, store: BlobStore, seconds: int
) -> None:
    registry, upstream = flaky_registry.registry, flaky_registry.upstream
    _publish(tmp_path, upstream, "app/wait:1", [_spec("wait")])
    flaky_registry.fail_next(429, retry_after=seconds)
    started = time.monotonic()
    with pytest.raises(RegistryTimeoutError, match=f"asked to wait {seconds} s") as caught:
        _pull(registry, store, "app/wait:1")
    assert time.monotonic() - started < 30
    assert registry.host in _one_line(caught.value)
    assert "Retry-After" in str(caught.value)


def test_retry_after_past_the_deadline_fails_at_once(
    tmp_path: Path, flaky_registry: FlakyRegistry, store: BlobStore
) -> None:
    registry, upstream = flaky_registry.registry, flaky_registry.upstream
    _publish(tmp_path, upstream, "app/late:1", [_spec("late")])
    flaky_registry.fail_next(503, retry_after=30)
    started = time.monotonic()
    with pytest.raises(RegistryTimeoutError, match=r"asked to wait 30 s.*deadline of 5 s"):
        _pull(registry, store, "app/late:1", deadline=5.0)
    assert time.monotonic() - started < 5


def test_a_registry_that_stalls_after_the_headers_hits_the_read_timeout(
    tmp_path: Path, flaky_registry: FlakyRegistry, store: BlobStore
) -> None:
    registry, upstream = flaky_registry.registry, flaky_registry.upstream
    built = _publish(tmp_path, upstream, "app/stall:1", [_spec("s", _noise(b"s", 200_000))])
    layer = built.images[0].layers[0].digest
    # Every attempt would stall after the headers.
    stalls = [flaky_registry.stall_blob(layer, after=0, timeout=60) for _ in range(3)]
    started = time.monotonic()
    with pytest.raises(RegistryTimeoutError) as caught:
        _pull(registry, store, "app/stall:1", timeout=1.0)
    elapsed = time.monotonic() - started
    assert f"no data for 1 s from {registry.host}" in _one_line(caught.value)
    assert "deadline" not in str(caught.value)
    assert elapsed < OLD_STALL / 6  # one retry at most, not five
    assert [stall.reached.is_set() for stall in stalls] == [True, True, False]


def test_a_stall_that_outlasts_the_deadline_says_so(
    tmp_path: Path, flaky_registry: FlakyRegistry, store: BlobStore
) -> None:
    registry, upstream = flaky_registry.registry, flaky_registry.upstream
    built = _publish(tmp_path, upstream, "app/slow:1", [_spec("d", _noise(b"d", 200_000))])
    layer = built.images[0].layers[0].digest
    flaky_registry.stall_blob(layer, after=50_000, timeout=60)
    started = time.monotonic()
    with pytest.raises(RegistryTimeoutError, match="the pull's deadline of 3 s passed") as caught:
        _pull(registry, store, "app/slow:1", timeout=20.0, deadline=3.0)
    assert time.monotonic() - started < 20  # the deadline, not the read timeout
    assert "no data" not in _one_line(caught.value)


@pytest.mark.parametrize(
    ("name", "value", "seconds"),
    [
        ("IMAGELEDGER_PULL_TIMEOUT", "5", 5.0),
        ("IMAGELEDGER_PULL_TIMEOUT", "2.5s", 2.5),
        ("IMAGELEDGER_PULL_DEADLINE", "5m", 300.0),
        ("IMAGELEDGER_PULL_DEADLINE", " 2h ", 7200.0),
    ],
)
def test_timeouts_from_the_environment(
    tmp_path: Path, name: str, value: str, seconds: float
) -> None:
    options = options_from_environment({"HOME": str(tmp_path), name: value})
    field = "timeout" if name.endswith("TIMEOUT") else "deadline"
    assert getattr(options, field) == seconds
    defaults = options_from_environment({"HOME": str(tmp_path)})
    assert (defaults.timeout, defaults.deadline) == (30.0, 3600.0)
    assert options_from_environment({"HOME": str(tmp_path), name: value}, timeout=7).timeout == 7


@pytest.mark.parametrize(
    "value", ["abc", "0", "-1", "nan", "inf", "1e999", "9" * 5000, "2d", "100000h", "\x1b[31m"]
)
@pytest.mark.parametrize("name", ["IMAGELEDGER_PULL_TIMEOUT", "IMAGELEDGER_PULL_DEADLINE"])
def test_bad_timeouts_from_the_environment_are_clear_errors(
    tmp_path: Path, name: str, value: str
) -> None:
    with pytest.raises(RegistryConfigError, match=name) as caught:
        options_from_environment({"HOME": str(tmp_path), name: value})
    assert isinstance(caught.value, ValueError)
    assert "\x1b" not in _one_line(caught.value)


@pytest.mark.parametrize(
    "options",
    [{"timeout": 0}, {"timeout": float("nan")}, {"timeout": 1e300}, {"deadline": -1.0}],
)
def test_bad_timeouts_in_the_options_are_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"timeout|deadline"):
        RegistryOptions(**options)  # type: ignore[arg-type]


# ---- 5. a platform the index lacks --------------------------------------------------------------


def test_a_missing_platform_is_not_found_and_names_what_the_index_offers(
    tmp_path: Path, registry: Registry, store: BlobStore
) -> None:
    specs = [
        _spec("amd", architecture="amd64"),
        _spec("arm", architecture="arm64", variant="v8"),
    ]
    _publish(tmp_path, registry, "app/plat:1", specs, multi_arch=True, attestations=True)
    with pytest.raises(NotInRegistryError) as caught:
        _pull(registry, store, "app/plat:1", platform=Platform("linux", "s390x"))
    text = _one_line(caught.value)
    assert "no manifest for linux/s390x" in text
    assert "linux/amd64" in text and "linux/arm64" in text
    assert "unknown/unknown" not in text  # attestations are not platforms on offer
    env = {**os.environ, "IMAGELEDGER_INSECURE_REGISTRIES": registry.host}
    done = subprocess.run(
        [*CLI, "--home", str(tmp_path / "cli"), "pull", registry.reference("app/plat:1"), *S390X],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 3, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "linux/s390x" in line and "linux/amd64" in line and "linux/arm64" in line


# ---- 6. download locks -----------------------------------------------------------------------


def _locks(store: BlobStore) -> list[str]:
    directory = store.root / "tmp" / "locks"
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_pulls_leave_no_lock_files(tmp_path: Path, registry: Registry) -> None:
    specs = [_spec(f"l{i}", f"layer {i}".encode(), b"shared") for i in range(3)]
    for i, spec in enumerate(specs):
        _publish(tmp_path, registry, f"app/locks{i}:1", [spec])
    store = BlobStore(tmp_path / "home")
    for i in range(3):
        _pull(registry, store, f"app/locks{i}:1")
        _pull(registry, store, f"app/locks{i}:1")  # all cached: locks taken, none kept
        assert _locks(store) == []


@pytest.mark.parametrize("kind", ["link", "dangling link", "fifo"])
def test_a_lock_file_planted_as_a_link_or_fifo_is_named_never_followed(
    tmp_path: Path, registry: Registry, kind: str
) -> None:
    built = _publish(tmp_path, registry, "app/planted:1", [_spec("planted")]).images[0]
    store = BlobStore(tmp_path / "home")
    locks = store.root / "tmp" / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    victim.chmod(0o444)
    outside = tmp_path / "created-outside"  # O_CREAT through a dangling link would make it
    planted = locks / f"{built.layers[0].digest.partition(':')[2]}.lock"
    if kind == "link":
        planted.symlink_to(victim)
    elif kind == "dangling link":
        planted.symlink_to(outside)
    else:
        os.mkfifo(planted)
    with pytest.raises(HomeDamagedError) as caught:
        _pull(registry, store, "app/planted:1")
    text = _one_line(caught.value)
    assert str(planted) in text and ("link" in text or "not a" in text)
    assert victim.read_bytes() == b"precious" and victim.stat().st_mode & 0o777 == 0o444
    assert not outside.exists()
    assert planted.is_symlink() or planted.is_fifo()  # named, not obeyed, not removed
    assert _locks(store) == [planted.name]  # every other lock was removed by its holder
    planted.unlink()  # the operator's repair
    assert _pull(registry, store, "app/planted:1").manifest_digest == built.manifest_digest
    assert _locks(store) == []


@pytest.mark.parametrize("where", ["tmp", "tmp/locks"])
def test_a_link_planted_as_the_locks_directory_is_refused(
    tmp_path: Path, registry: Registry, where: str
) -> None:
    _publish(tmp_path, registry, "app/linked:1", [_spec("linked")])
    store = BlobStore(tmp_path / "home")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "locks").mkdir(parents=True)
    planted = store.root / where
    if planted.exists():
        planted.rmdir()
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.symlink_to(elsewhere if where == "tmp" else elsewhere / "locks")
    with pytest.raises(HomeDamagedError, match="symbolic link") as caught:
        _pull(registry, store, "app/linked:1")
    assert where in _one_line(caught.value)
    assert planted.is_symlink()  # named, not removed: the operator decides
    assert list(elsewhere.rglob("*")) == [elsewhere / "locks"]


def test_the_lock_excludes_while_files_come_and_go(tmp_path: Path) -> None:
    """Many threads take one blob's lock in turn while each holder removes the file: never two
    inside at once (the inode check), and no file left at the end."""
    store = BlobStore(tmp_path / "home")
    digest = "sha256:" + "ab" * 32
    inside = 0
    most = 0
    entries = 0
    guard = threading.Lock()

    def worker() -> None:
        nonlocal inside, most, entries
        for _ in range(40):
            with blob_lock(store, digest):
                with guard:
                    inside += 1
                    entries += 1
                    most = max(most, inside)
                time.sleep(0.0005)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert entries == 240 and most == 1
    assert _locks(store) == []


def test_waiting_for_another_pulls_lock_ends_at_the_deadline(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "home")
    digest = "sha256:" + "cd" * 32
    held = threading.Event()
    done = threading.Event()

    def holder() -> None:
        with blob_lock(store, digest):
            held.set()
            done.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(10)
        with (
            pytest.raises(RegistryTimeoutError, match="deadline"),
            blob_lock(store, digest, deadline=time.monotonic() + 0.3),
        ):
            pytest.fail("the lock was taken while held")
    finally:
        done.set()
        thread.join(30)
    assert _locks(store) == []


def test_credentials_in_basic_auth_headers_are_not_in_errors(stub: Stub, store: BlobStore) -> None:
    """A realm on plain HTTP refused for credentials: the error names the realm without the
    user info a hostile registry may put in it."""

    def hook(handler: http.server.BaseHTTPRequestHandler) -> bool:
        challenge = 'Bearer realm="http://user:hunter2@auth.invalid/token?x=s3cret"'
        _reply(handler, 401, b"{}", {"WWW-Authenticate": challenge})
        return True

    stub.hook = hook
    secret = "c0rrect-h0rse"
    with pytest.raises(RegistryAuthError, match="refusing") as caught:
        _stub_pull(stub, store, "app:1", credentials=lambda host: ("carol", secret))
    text = _one_line(caught.value)
    for leaked in (
        "hunter2",
        "s3cret",
        secret,
        base64.b64encode(b"carol:" + secret.encode()).decode(),
    ):
        assert leaked not in text
    assert "http://auth.invalid/token" in text


def test_plain_http_is_allowed_only_to_a_host_listed_itself() -> None:
    client = RegistryClient(RegistryOptions(insecure=frozenset({"reg:5000", "auth", "[::1]:81"})))
    with client:
        assert client.plain_http_allowed("http://reg:5000/token")
        assert not client.plain_http_allowed("http://reg:5001/token")  # another port
        assert not client.plain_http_allowed("http://reg/token")
        assert client.plain_http_allowed("http://auth/token")
        assert client.plain_http_allowed("http://auth:80/token")
        assert not client.plain_http_allowed("http://auth:8080/token")
        assert client.plain_http_allowed("http://[::1]:81/token")
        assert not client.plain_http_allowed("http://evil.example/token?reg:5000")
        assert not client.plain_http_allowed("http://[::1/token")


def test_a_host_httpx_cannot_encode_is_a_one_line_registry_error(store: BlobStore) -> None:
    with (
        RegistryClient(RegistryOptions(retries=0)) as client,
        pytest.raises(RegistryError, match="cannot request") as caught,
    ):
        client.pull(Reference.parse("xn--a.com/app:1"), store, platform=AMD64)
    _one_line(caught.value)


@pytest.mark.parametrize(
    "environ",
    [
        {"IMAGELEDGER_PULL_TIMEOUT": "soon"},
        {"IMAGELEDGER_PULL_DEADLINE": "-5"},
    ],
)
def test_cli_refuses_bad_timeouts_with_exit_2(tmp_path: Path, environ: dict[str, str]) -> None:
    done = subprocess.run(
        [*CLI, "--home", str(tmp_path / "home"), "pull", "127.0.0.1:9/app:1"],
        capture_output=True,
        text=True,
        env={**os.environ, **environ},
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert next(iter(environ)) in line


def test_error_texts_lose_user_info_and_queries() -> None:
    """httpx may quote a URL (a bad ``Location``, a signed storage URL) in its errors."""
    error = ValueError("bad Location http://u:pa55word@h/x?sig=s3cret and https://a:b@g/")
    assert error_text(error) == "bad Location http://h/x?... and https://g/"
    assert len(error_text(ValueError("x" * 5000))) < 300
    assert "\x1b" not in error_text(ValueError("\x1b[31mred"))


@pytest.mark.parametrize("stage", ["headers", "body"])
def test_a_manifest_that_stalls_hits_the_read_timeout(
    stub: Stub, store: BlobStore, stage: str
) -> None:
    release = threading.Event()

    def hook(handler: http.server.BaseHTTPRequestHandler) -> bool:
        if "/manifests/" in handler.path:
            if stage == "body":
                handler.send_response(200)
                handler.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                handler.send_header("Content-Length", "1000")
                handler.end_headers()
                handler.wfile.write(b"{")
                handler.wfile.flush()
            release.wait(30)
            handler.close_connection = True
            return True
        return False

    stub.hook = hook
    started = time.monotonic()
    try:
        with pytest.raises(RegistryTimeoutError) as caught:
            _stub_pull(stub, store, "app:1", timeout=0.5)
    finally:
        release.set()
    assert f"no data for 0.5 s from {stub.host}" in _one_line(caught.value)
    assert time.monotonic() - started < 10
    assert stub.count("/v2/app/manifests/") == 2  # one retry, then the error


def test_the_cli_takes_the_deadline_and_says_which_limit_it_hit(
    tmp_path: Path, flaky_registry: FlakyRegistry
) -> None:
    registry, upstream = flaky_registry.registry, flaky_registry.upstream
    built = _publish(tmp_path, upstream, "app/cli:1", [_spec("c", _noise(b"c", 200_000))])
    flaky_registry.stall_blob(built.images[0].layers[0].digest, after=50_000, timeout=60)
    home = tmp_path / "home"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "imageledger.tools.cli", "--home", str(home), "pull"),
            *(registry.reference("app/cli:1"), "--insecure-registry", registry.host),
            *("--timeout", "20s", "--deadline", "3s"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("IMAGELEDGER_")},
    )
    assert result.returncode == 1, result.stderr
    [line] = [x for x in result.stderr.splitlines() if not x.startswith("{")]
    assert "the pull's deadline of 3 s passed" in line, line
    with ImageCache(home) as cache:
        assert [e.event for e in cache.history()] == ["Started", "PullFailed"]
