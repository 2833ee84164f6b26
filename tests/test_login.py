"""Credentials the containers way: the auth files of containers-auth.json(5) (which files, in
which order, per-repository keys most specific first) and ``imageledger login`` / ``logout``
against real registries (Debian's docker-registry with htpasswd Basic auth, and one with
Bearer tokens): refused credentials are never written, accepted ones are written 0600 into
the auth file (other entries kept) and used by the next pull, logout removes them, and the
password appears in no log line, no ledger byte, no message and no output.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from imageledger import ImageCache, RegistryAuthError, login, logout
from imageledger.storage.credentials import (
    CredentialChain,
    auth_file_entries,
    auth_files,
    default_auth_file,
    read_docker_config,
    repository_keys,
)
from imageledger.storage.registryoptions import RegistryOptions, options_from_environment
from imageledger.tools.imagebuild import ImageSpec, build_image, build_oci_layout

if TYPE_CHECKING:
    from tests.registry import Registry, TokenRegistry, push
else:
    from registry import Registry, TokenRegistry, push

CLI = (sys.executable, "-m", "imageledger.tools.cli")


def _auth(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def _write_auth(path: Path, auths: dict[str, dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": auths}))
    return path


# ---- which file, which key ----------------------------------------------------------------------


def test_auth_files_in_the_man_pages_order(tmp_path: Path) -> None:
    env = {
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "HOME": str(tmp_path / "home"),
    }
    assert auth_files(env) == [
        tmp_path / "run/containers/auth.json",
        tmp_path / "config/containers/auth.json",
    ]
    # $REGISTRY_AUTH_FILE takes the runtime file's place (and is where login writes).
    named = {**env, "REGISTRY_AUTH_FILE": str(tmp_path / "named.json")}
    assert auth_files(named) == [tmp_path / "named.json", tmp_path / "config/containers/auth.json"]
    assert default_auth_file(named) == tmp_path / "named.json"
    # Without XDG_CONFIG_HOME, ~/.config.
    del env["XDG_CONFIG_HOME"]
    assert auth_files(env)[1] == tmp_path / "home/.config/containers/auth.json"


def test_repository_keys_most_specific_first() -> None:
    assert repository_keys("Quay.IO", "team/sub/app") == [
        "quay.io/team/sub/app",
        "quay.io/team/sub",
        "quay.io/team",
        "quay.io",
    ]
    assert repository_keys("index.docker.io", "library/alpine")[-1] == "docker.io"


def _chain(tmp_path: Path, env: dict[str, str]) -> CredentialChain:
    options = options_from_environment(env)
    assert isinstance(options.credentials, CredentialChain)
    return options.credentials


@pytest.mark.parametrize(
    ("repository", "expected"),
    [
        ("team/app", "repo-user"),  # registry/namespace/repo
        ("team/other", "namespace-user"),  # registry/namespace
        ("elsewhere/app", "registry-user"),  # registry
        ("team/app/deeper", "repo-user"),  # the longest key that is a prefix of it
    ],
)
def test_per_repository_keys_most_specific_first(
    tmp_path: Path, repository: str, expected: str
) -> None:
    runtime = _write_auth(
        tmp_path / "run/containers/auth.json",
        {
            "registry.example:5000": _auth("registry-user", "p1"),
            "registry.example:5000/team": _auth("namespace-user", "p2"),
            "registry.example:5000/team/app": _auth("repo-user", "p3"),
        },
    )
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "run"), "HOME": str(tmp_path / "home")}
    assert runtime.exists()
    chain = _chain(tmp_path, env)
    found = chain.for_repository("registry.example:5000", repository)
    assert found is not None and found[0] == expected
    assert chain("registry.example:5000") == ("registry-user", "p1")


def test_the_first_file_with_a_match_wins_then_dockers_config(tmp_path: Path) -> None:
    named = _write_auth(tmp_path / "named.json", {"a.example/team": _auth("named", "1")})
    _write_auth(
        tmp_path / "config/containers/auth.json",
        {"a.example/team/app": _auth("config", "2"), "b.example": _auth("config-b", "3")},
    )
    _write_auth(
        tmp_path / "docker/config.json",
        {"https://c.example/v1/": _auth("docker-c", "4"), "b.example": _auth("docker-b", "5")},
    )
    env = {
        "REGISTRY_AUTH_FILE": str(named),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "DOCKER_CONFIG": str(tmp_path / "docker"),
        "HOME": str(tmp_path / "home"),
    }
    chain = _chain(tmp_path, env)
    # A less specific key in an earlier file beats a more specific one in a later file.
    assert chain.for_repository("a.example", "team/app") == ("named", "1")
    assert chain.for_repository("b.example", "x") == ("config-b", "3")
    assert chain.for_repository("c.example", "x") == ("docker-c", "4")
    assert chain.for_repository("d.example", "x") is None


def _helper(bin_dir: Path, name: str, answers: dict[str, tuple[str, str]]) -> None:
    """A real ``docker-credential-<name>`` program answering `answers[server]`."""
    bin_dir.mkdir(exist_ok=True)
    program = bin_dir / f"docker-credential-{name}"
    program.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        "server = sys.stdin.read().strip()\n"
        f"answers = {json.dumps({k: list(v) for k, v in answers.items()})}\n"
        "if server not in answers:\n"
        "    print('credentials not found in native keychain')\n"
        "    sys.exit(1)\n"
        "print(json.dumps({'Username': answers[server][0], 'Secret': answers[server][1]}))\n"
    )
    program.chmod(0o755)


def test_a_containers_auth_files_credential_helper_comes_before_its_keys(
    tmp_path: Path,
) -> None:
    _helper(tmp_path / "bin", "vault", {"a.example": ("from-helper", "h")})
    runtime = tmp_path / "run/containers/auth.json"
    runtime.parent.mkdir(parents=True)
    runtime.write_text(
        json.dumps(
            {
                "credHelpers": {"a.example": "vault", "b.example": "vault"},
                "auths": {"a.example": _auth("from-key", "k"), "b.example": _auth("b", "k")},
            }
        )
    )
    env = {
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
        "HOME": str(tmp_path / "home"),
        "PATH": str(tmp_path / "bin"),
    }
    chain = _chain(tmp_path, env)
    assert chain.for_repository("a.example", "team/app") == ("from-helper", "h")
    # The helper has nothing for b.example: the file's own key answers.
    assert chain.for_repository("b.example", "x") == ("b", "k")


def test_an_unreadable_auth_file_is_skipped_not_fatal(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert auth_file_entries(read_docker_config(broken), broken) == {}


# ---- login and logout against real registries --------------------------------------------------


def _push(registry: Registry, tmp_path: Path) -> str:
    image = build_image(ImageSpec(layers=({"etc/x": b"login test\n"},), names=("v1",)))
    layout = build_oci_layout(tmp_path / "layout", [image])
    push(registry, f"oci:{layout.path}:v1", "team/app:v1")
    return registry.reference("team/app:v1")


def _auth_file(tmp_path: Path) -> Path:
    return tmp_path / "auth" / "auth.json"


def _cli(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "IMAGELEDGER_LOG_LEVEL": "debug", **(env or {})},
    )


@dataclass(frozen=True)
class Basic:
    """An htpasswd registry holding team/app:v1, its credentials, and where login writes."""

    registry: Registry
    username: str
    password: str
    reference: str
    auth: Path


@pytest.fixture
def basic(registry_basic: Registry, tmp_path: Path) -> Basic:
    registry = registry_basic
    assert registry.username is not None and registry.password is not None
    reference = _push(registry, tmp_path)
    return Basic(registry, registry.username, registry.password, reference, _auth_file(tmp_path))


def test_login_refuses_a_wrong_password_writes_a_right_one_0600_pull_uses_it_logout_removes(
    basic: Basic, tmp_path: Path
) -> None:
    registry, reference, auth = basic.registry, basic.reference, basic.auth
    assert registry.username is not None and registry.password is not None
    _write_auth(auth, {"other.example": _auth("someone", "kept")})
    env = {
        "REGISTRY_AUTH_FILE": str(auth),
        "IMAGELEDGER_INSECURE_REGISTRIES": registry.host,
    }
    wrong = "not-" + registry.password
    refused = _cli(
        "login",
        registry.host,
        "-u",
        registry.username,
        "--password-stdin",
        stdin=wrong + "\n",
        env=env,
    )
    assert refused.returncode == 1, refused.stderr
    assert "rejected the credentials" in refused.stderr
    assert wrong not in refused.stderr + refused.stdout
    assert registry.host not in json.loads(auth.read_text())["auths"]

    accepted = _cli(
        "login",
        registry.host,
        "-u",
        registry.username,
        "--password-stdin",
        stdin=registry.password + "\n",
        env=env,
    )
    assert accepted.returncode == 0, accepted.stderr
    assert "Login Succeeded" in accepted.stdout
    assert registry.password not in accepted.stderr + accepted.stdout
    assert stat.S_IMODE(auth.stat().st_mode) == 0o600
    stored = json.loads(auth.read_text())["auths"]
    assert stored["other.example"] == _auth("someone", "kept")  # other entries kept
    assert stored[registry.host] == _auth(registry.username, registry.password)
    assert not [p for p in auth.parent.iterdir() if p.name != "auth.json"]  # no temporaries

    home = str(tmp_path / "home")
    pulled = _cli("--home", home, "pull", reference, "--json", env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert registry.password not in pulled.stderr + pulled.stdout
    events = _cli("--home", home, "events", "--json", env=env)
    assert registry.password not in events.stdout
    for name in os.listdir(Path(home) / "ledger"):
        assert registry.password.encode() not in (Path(home) / "ledger" / name).read_bytes()

    out = _cli("logout", registry.host, env=env)
    assert out.returncode == 0, out.stderr
    stored = json.loads(auth.read_text())["auths"]
    assert registry.host not in stored and "other.example" in stored
    again = _cli("--home", home, "pull", registry.reference("team/app:v1"), env=env)
    # The image is cached by tag, so the pull asks the registry for the manifest: refused now.
    assert again.returncode == 1 and "requires authentication" in again.stderr
    missing = _cli("logout", registry.host, env=env)
    assert missing.returncode == 3 and "not logged in" in missing.stderr
    everything = _cli("logout", "--all", env=env)
    assert everything.returncode == 0
    assert json.loads(auth.read_text())["auths"] == {}


def test_login_through_the_api_against_a_token_registry(
    registry_token: TokenRegistry, tmp_path: Path
) -> None:
    registry = registry_token.registry
    assert registry.username is not None and registry.password is not None
    reference = _push(registry, tmp_path)
    auth = _auth_file(tmp_path)
    insecure = registry_token.insecure
    with pytest.raises(RegistryAuthError) as refused:
        login(registry.host, registry.username, "wrong", auth_file=auth, insecure=insecure)
    assert "wrong" not in str(refused.value)
    assert not auth.exists()
    path, checked = login(
        registry.host, registry.username, registry.password, auth_file=auth, insecure=insecure
    )
    assert (path, checked) == (auth, True)
    assert stat.S_IMODE(auth.stat().st_mode) == 0o600
    env = {**os.environ, "REGISTRY_AUTH_FILE": str(auth)}
    options = options_from_environment(env, insecure=insecure)
    with ImageCache(tmp_path / "home") as cache:
        assert cache.pull(reference, options=options).reference == reference
    _path, removed = logout(registry.host, auth_file=auth)
    assert removed == [registry.host]


def test_per_namespace_login_is_used_for_that_namespace_only(basic: Basic, tmp_path: Path) -> None:
    registry, reference, auth = basic.registry, basic.reference, basic.auth
    assert registry.username is not None and registry.password is not None
    insecure = frozenset({registry.host})
    login(
        f"{registry.host}/team",
        registry.username,
        registry.password,
        auth_file=auth,
        insecure=insecure,
    )
    assert list(json.loads(auth.read_text())["auths"]) == [f"{registry.host}/team"]
    env = {**os.environ, "REGISTRY_AUTH_FILE": str(auth)}
    chain = options_from_environment(env).credentials
    assert isinstance(chain, CredentialChain)
    assert chain.for_repository(registry.host, "team/app") == (
        registry.username,
        registry.password,
    )
    assert chain.for_repository(registry.host, "elsewhere/app") is None
    with ImageCache(tmp_path / "home") as cache:
        handle = cache.pull(reference, options=options_from_environment(env, insecure=insecure))
        assert handle.reference == reference


def test_login_to_a_registry_that_asks_for_nothing_stores_unchecked_and_says_so(
    registry: Registry, tmp_path: Path
) -> None:
    auth = _auth_file(tmp_path)
    done = _cli(
        "login",
        registry.host,
        "-u",
        "u",
        "--password-stdin",
        "--authfile",
        str(auth),
        "--insecure-registry",
        registry.host,
        stdin="secret-never-shown",
    )
    assert done.returncode == 0, done.stderr
    assert "asked for no credentials" in done.stderr
    assert "secret-never-shown" not in done.stderr + done.stdout


def test_login_without_a_terminal_or_password_stdin_is_usage(tmp_path: Path) -> None:
    done = _cli("login", "registry.example", "-u", "u", "--authfile", str(tmp_path / "a.json"))
    assert done.returncode == 2
    assert "--password-stdin" in done.stderr
    assert not (tmp_path / "a.json").exists()


def test_an_auth_file_that_is_not_json_is_left_alone(
    registry_basic: Registry, tmp_path: Path
) -> None:
    registry = registry_basic
    assert registry.username is not None and registry.password is not None
    auth = _auth_file(tmp_path)
    auth.parent.mkdir(parents=True)
    auth.write_text("precious, not json")
    with pytest.raises(ValueError, match=r"not a containers-auth\.json"):
        login(
            registry.host,
            registry.username,
            registry.password,
            auth_file=auth,
            insecure={registry.host},
        )
    assert auth.read_text() == "precious, not json"


def test_explicit_options_credentials_do_not_need_the_auth_file(
    registry_basic: Registry, tmp_path: Path
) -> None:
    """The API's own credentials still come first (nothing the auth file says overrides)."""
    registry = registry_basic
    assert registry.credentials is not None
    reference = _push(registry, tmp_path)
    creds = registry.credentials
    options = RegistryOptions(insecure=frozenset({registry.host}), credentials=lambda host: creds)
    with ImageCache(tmp_path / "home") as cache:
        assert cache.pull(reference, options=options).reference == reference
