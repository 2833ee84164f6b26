"""The containers registries configuration (containers-registries.conf(5), version 2, and its
drop-ins): which files are read and in what order, how a ``[[registry]]`` table is chosen for
a reference (a table of cases and a property), and pulls through two real registries (Debian's
docker-registry) as primary and mirror: a mirror that serves, one that is down, one that lacks
the image, one that serves the wrong manifest for a digest, ``pull-from-mirror`` digest-only
and tag-only, a blocked namespace, and a location rewrite; the ledger records the endpoint
that served the manifest and the blobs, and an old ledger's pull events still read.

Every test runs under `conftest._containers_config`: the system and per-user configuration
directories are empty temporary ones, so nothing of this host's /etc is read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from imageledger import (
    DigestMismatchError,
    ImageCache,
    ImageNotFoundError,
    LedgerCorruptError,
    Reference,
    RegistryBlockedError,
    RegistryConfigError,
)
from imageledger.domain.events import Batch
from imageledger.domain.model import (
    Actor,
    ImageConfig,
    ImageContent,
    Layer,
    Platform,
    PullEndpoint,
)
from imageledger.storage.ledgerformat import LedgerMapper, record_fields
from imageledger.storage.registriesconf import (
    Endpoint,
    Mirror,
    RegistriesConfig,
    RegistryEntry,
    config_files,
    load_registries_conf,
    prefix_match,
)
from imageledger.storage.registryoptions import RegistryOptions
from imageledger.tools.imagebuild import ImageSpec, build_image, build_oci_layout

if TYPE_CHECKING:
    from tests.registry import FlakyRegistry, MakeFlakyRegistry, Registry, push
else:
    from registry import FlakyRegistry, MakeFlakyRegistry, Registry, push

CLI = (sys.executable, "-m", "imageledger.tools.cli")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, check=False, env=env)


# ---- which files ------------------------------------------------------------------------------


def _env(root: Path, **extra: str) -> dict[str, str]:
    return {
        "IMAGELEDGER_CONTAINERS_ROOT": str(root / "root"),
        "XDG_CONFIG_HOME": str(root / "config"),
        "HOME": str(root / "home"),
        **extra,
    }


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _load(root: Path, text: str) -> RegistriesConfig:
    """The configuration of one named file holding `text`."""
    return load_registries_conf(_env(root), _write(root / "r.conf", text))


def _entry(prefix: str, location: str) -> str:
    return f'[[registry]]\nprefix = "{prefix}"\nlocation = "{location}"\n'


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for name in ("root", "config", "home"):
        (tmp_path / name).mkdir()
    return tmp_path


def test_the_system_file_then_its_drop_ins_then_the_users_drop_ins_in_name_order(
    root: Path,
) -> None:
    system = root / "root/etc/containers"
    _write(system / "registries.conf", _entry("a.example", "system.example"))
    _write(system / "registries.conf.d/20-b.conf", _entry("a.example", "dropin20.example"))
    _write(system / "registries.conf.d/10-a.conf", _entry("b.example", "dropin10.example"))
    _write(system / "registries.conf.d/30-c.conf.disabled", _entry("a.example", "no.example"))
    (system / "registries.conf.d/40-dir.conf").mkdir()  # a directory: ignored
    user = root / "config/containers/registries.conf.d"
    _write(user / "05-user.conf", _entry("b.example", "user.example"))
    config = load_registries_conf(_env(root))
    assert config.files == (
        str(system / "registries.conf"),
        str(system / "registries.conf.d/10-a.conf"),
        str(system / "registries.conf.d/20-b.conf"),
        str(user / "05-user.conf"),
    )
    locations = {e.prefix: e.location for e in config.registries}
    # Later files replace a table of the same prefix; the user's drop-ins come last.
    assert locations == {"a.example": "dropin20.example", "b.example": "user.example"}


def test_a_per_user_file_replaces_the_system_file_and_its_drop_ins(root: Path) -> None:
    system = root / "root/etc/containers"
    _write(system / "registries.conf", _entry("a.example", "system.example"))
    _write(system / "registries.conf.d/10.conf", _entry("c.example", "system-dropin.example"))
    user = root / "config/containers"
    _write(user / "registries.conf", _entry("b.example", "user.example"))
    _write(user / "registries.conf.d/10.conf", _entry("d.example", "user-dropin.example"))
    main, dirs = config_files(_env(root))
    assert main == user / "registries.conf"
    assert dirs == (user / "registries.conf.d",)
    config = load_registries_conf(_env(root))
    assert {e.prefix for e in config.registries} == {"b.example", "d.example"}


def test_xdg_config_home_unset_means_the_home_directorys_config(root: Path) -> None:
    env = _env(root)
    del env["XDG_CONFIG_HOME"]
    _write(root / "home/.config/containers/registries.conf", _entry("h.example", "h2.example"))
    config = load_registries_conf(env)
    assert [e.location for e in config.registries] == ["h2.example"]


@pytest.mark.parametrize("how", ["env", "argument"])
def test_a_named_file_is_the_main_file_and_the_drop_ins_still_apply(root: Path, how: str) -> None:
    named = _write(root / "elsewhere.conf", _entry("a.example", "named.example"))
    _write(root / "config/containers/registries.conf", _entry("a.example", "user.example"))
    _write(root / "root/etc/containers/registries.conf.d/10.conf", _entry("z.example", "z.example"))
    if how == "env":
        config = load_registries_conf(_env(root, CONTAINERS_REGISTRIES_CONF=str(named)))
    else:
        config = load_registries_conf(_env(root), named)
    assert {e.prefix: e.location for e in config.registries} == {
        "a.example": "named.example",
        "z.example": "z.example",
    }


def test_no_files_is_no_configuration_and_a_named_file_that_is_missing_is_an_error(
    root: Path,
) -> None:
    assert load_registries_conf(_env(root)).registries == ()
    with pytest.raises(RegistryConfigError, match="does not exist"):
        load_registries_conf(_env(root), root / "missing.conf")
    missing = _env(root, CONTAINERS_REGISTRIES_CONF=str(root / "missing.conf"))
    with pytest.raises(RegistryConfigError, match="does not exist"):
        load_registries_conf(missing)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "[registries.search]\nregistries = ['a.example']\n" + _entry("b.example", "c.example"),
            "mixes version 1",
        ),
        ("[registries.block]\nregistries = 'a.example'\n", "list of hosts"),
        ('[[registry]]\nprefix = "*.example.com"\nlocation = "x.example"\n', "wildcard"),
        ('[[registry]]\nprefix = "a.*.example.com"\nlocation = "x.example"\n', "wildcard"),
        ('[[registry]]\nprefix = "*.example.com/ns"\n', "wildcard"),
        ("[[registry]]\ninsecure = true\n", "neither prefix nor location"),
        ('[[registry]]\nlocation = "a.example"\ninsecure = "yes"\n', "true or false"),
        (
            '[[registry]]\nlocation = "a.example"\n[[registry.mirror]]\nlocation = "m.example"\n'
            'pull-from-mirror = "sometimes"\n',
            "pull-from-mirror",
        ),
        ('[[registry]]\nlocation = "a.example"\n[[registry.mirror]]\ninsecure = true\n', "empty"),
        (_entry("a.example", "x.example") + _entry("a.example", "y.example"), "more than one"),
        (
            '[[registry]]\nlocation = "a.example"\nmirror-by-digest-only = true\n'
            '[[registry.mirror]]\nlocation = "m.example"\npull-from-mirror = "tag-only"\n',
            "contradict",
        ),
        ("this is = = not toml", "not valid TOML"),
    ],
)
def test_a_file_that_cannot_mean_anything_is_refused_naming_it(
    root: Path, text: str, error: str
) -> None:
    path = _write(root / "bad.conf", text)
    with pytest.raises(RegistryConfigError, match=error) as raised:
        load_registries_conf(_env(root), path)
    assert str(path) in str(raised.value)


def test_a_version_1_file_gives_its_insecure_and_blocked_hosts(root: Path) -> None:
    config = _load(
        root,
        "[registries.search]\nregistries = ['docker.io', 'quay.io']\n"
        "[registries.insecure]\nregistries = ['Plain.Example:5000', 'both.example']\n"
        "[registries.block]\nregistries = ['evil.example', 'both.example']\n",
    )
    by_prefix = {e.prefix: (e.location, e.insecure, e.blocked) for e in config.registries}
    assert by_prefix == {
        "plain.example:5000": ("plain.example:5000", True, False),
        "both.example": ("both.example", True, True),
        "evil.example": ("evil.example", False, True),
    }
    [endpoint] = config.endpoints(Reference.parse("plain.example:5000/app:1"))
    assert endpoint.insecure
    with pytest.raises(RegistryBlockedError):
        config.endpoints(Reference.parse("evil.example/app:1"))
    # Search registries are short-name resolution: not used.
    assert str(Reference.parse("app")) == "docker.io/library/app:latest"


def test_short_name_settings_are_read_but_not_used(root: Path) -> None:
    config = _load(
        root,
        'unqualified-search-registries = ["quay.io"]\nshort-name-mode = "enforcing"\n'
        '[aliases]\n"alpine" = "quay.io/other/alpine"\n',
    )
    alpine = Reference.parse("alpine")  # Docker's normalization, whatever the host says
    assert str(alpine) == "docker.io/library/alpine:latest"
    assert config.endpoints(alpine) == (Endpoint(alpine, insecure=False, mirror=False),)


# ---- matching -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "prefix", "length"),
    [
        ("example.com/foo/app:1", "example.com", len("example.com")),
        ("example.com/foo/app:1", "example.com/foo", len("example.com/foo")),
        ("example.com/foo/app:1", "example.com/foo/app", len("example.com/foo/app")),
        ("example.com/foo/app:1", "example.com/foo/app:1", len("example.com/foo/app:1")),
        ("example.com/foo/app@sha256:" + "a" * 64, "example.com/foo/app", 19),
        ("example.com/foobar/app:1", "example.com/foo", -1),  # not at a separator
        ("example.com:5000/foo/app:1", "example.com", -1),  # another port is another host
        ("example.com/foo/app:1", "example.co", -1),
        ("example.com/foo/app:1", "other.com", -1),
        ("sub.example.com/foo/app:1", "*.example.com", len("sub.example.com")),
        ("a.sub.example.com/foo/app:1", "*.example.com", len("a.sub.example.com")),
        ("sub.example.com:5000/app:1", "*.example.com", len("sub.example.com")),
        ("example.com/foo/app:1", "*.example.com", -1),  # the domain itself is not under it
        ("notexample.com/foo/app:1", "*.example.com", -1),
        ("docker.io/library/alpine:3", "docker.io/library/alpine", 24),
        ("docker.io/library/alpine:3", "docker.io/alpine", -1),  # library/ must be spelt
    ],
)
def test_prefix_matching(reference: str, prefix: str, length: int) -> None:
    assert prefix_match(reference, prefix) == length


def _config(*entries: RegistryEntry) -> RegistriesConfig:
    return RegistriesConfig(tuple(entries), ("test",))


@pytest.mark.parametrize(
    ("reference", "chosen"),
    [
        ("example.com/foo/bar/app:1", "example.com/foo/bar"),
        ("example.com/foo/app:1", "example.com/foo"),
        ("example.com/other/app:1", "example.com"),
        ("sub.example.com/app:1", "sub.example.com"),  # exact host beats the wildcard
        ("other.example.com/app:1", "*.example.com"),
        ("elsewhere.org/app:1", None),
    ],
)
def test_the_longest_matching_prefix_wins(reference: str, chosen: str | None) -> None:
    config = _config(
        RegistryEntry("example.com", "example.com"),
        RegistryEntry("*.example.com", ""),
        RegistryEntry("example.com/foo/bar", "example.com/foo/bar"),
        RegistryEntry("example.com/foo", "example.com/foo"),
        RegistryEntry("sub.example.com", "sub.example.com"),
    )
    found = config.find(Reference.parse(reference))
    assert (found[0].prefix if found else None) == chosen


_COMPONENT = st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True)


@given(
    host=st.lists(_COMPONENT, min_size=2, max_size=3).map(".".join),
    path=st.lists(_COMPONENT, min_size=1, max_size=4),
    cut=st.integers(min_value=0, max_value=4),
    tag=_COMPONENT,
)
def test_property_every_component_prefix_matches_and_rewrites_onto_its_location(
    host: str, path: list[str], cut: int, tag: str
) -> None:
    """Any leading run of a reference's components is a prefix that matches it, exactly to
    its end; rewriting onto a location keeps what follows; a prefix that stops inside a
    component never matches."""
    reference = Reference.parse(f"{host}/{'/'.join(path)}:{tag}")
    prefix = "/".join([host, *path[: min(cut, len(path))]])
    assert prefix_match(str(reference), prefix) == len(prefix)
    assert prefix_match(str(reference), prefix + "x") == -1
    config = _config(RegistryEntry(prefix, "mirror.internal:5000/cache"))
    [endpoint] = config.endpoints(reference)
    rest = str(reference)[len(prefix) :]
    assert str(endpoint.reference) == "mirror.internal:5000/cache" + rest
    assert endpoint.reference.tag == tag


def test_endpoints_mirrors_in_order_then_the_primary_by_pull_from_mirror() -> None:
    entry = RegistryEntry(
        "example.com/foo",
        "internal.example.net/bar",
        insecure=True,
        mirrors=(
            Mirror("mirror-0.local/foo", insecure=False, pull_from_mirror="all"),
            Mirror("mirror-1.local:5000/m/foo", insecure=True, pull_from_mirror="digest-only"),
            Mirror("mirror-2.local/foo", pull_from_mirror="tag-only"),
        ),
    )
    config = _config(entry)
    by_tag = config.endpoints(Reference.parse("example.com/foo/image:latest"))
    assert [(str(e.reference), e.mirror, e.insecure) for e in by_tag] == [
        ("mirror-0.local/foo/image:latest", True, False),
        ("mirror-2.local/foo/image:latest", True, False),
        ("internal.example.net/bar/image:latest", False, True),
    ]
    digest = "sha256:" + "b" * 64
    by_digest = config.endpoints(Reference.parse(f"example.com/foo/image@{digest}"))
    assert [str(e.reference) for e in by_digest] == [
        f"mirror-0.local/foo/image@{digest}",
        f"mirror-1.local:5000/m/foo/image@{digest}",
        f"internal.example.net/bar/image@{digest}",
    ]
    # Hosts listed insecure elsewhere (--insecure-registry) stay insecure.
    listed = config.endpoints(
        Reference.parse("example.com/foo/image:1"), frozenset({"mirror-0.local"})
    )
    assert listed[0].insecure


def test_mirror_by_digest_only_makes_every_mirror_digest_only(root: Path) -> None:
    config = _load(
        root,
        '[[registry]]\nlocation = "a.example"\nmirror-by-digest-only = true\n'
        '[[registry.mirror]]\nlocation = "m.example"\n',
    )
    assert [e.location for e in config.endpoints(Reference.parse("a.example/x:1"))] == [
        "a.example/x"
    ]
    pinned = Reference.parse("a.example/x@sha256:" + "c" * 64)
    assert [e.location for e in config.endpoints(pinned)] == ["m.example/x", "a.example/x"]


def test_a_blocked_prefix_refuses_and_a_longer_unblocked_one_allows(root: Path) -> None:
    config = _load(
        root,
        '[[registry]]\nprefix = "evil.example"\nlocation = "evil.example"\nblocked = true\n'
        '[[registry]]\nprefix = "evil.example/audited"\nlocation = "evil.example/audited"\n',
    )
    with pytest.raises(RegistryBlockedError, match=r"evil\.example.*blocked.*r\.conf"):
        config.endpoints(Reference.parse("evil.example/x:1"))
    assert len(config.endpoints(Reference.parse("evil.example/audited/x:1"))) == 1


def test_docker_hub_prefixes_are_normalized_as_references_are(root: Path) -> None:
    config = _load(
        root,
        '[[registry]]\nprefix = "INDEX.DOCKER.IO/library/alpine"\n'
        'location = "mirror.local/hub/alpine"\n',
    )
    [endpoint] = config.endpoints(Reference.parse("alpine:3.19"))
    assert str(endpoint.reference) == "mirror.local/hub/alpine:3.19"


# ---- the stored event ---------------------------------------------------------------------------


def _pull_events(endpoints: tuple[PullEndpoint, ...]) -> tuple[Any, Any]:
    """An ImagePulled with `endpoints`, and its stored record (format 2)."""
    actor = Actor(user="u", uid=0, pid=1, host="h", version="0")
    content = ImageContent(
        "sha256:" + "a" * 64,
        "application/vnd.oci.image.manifest.v1+json",
        10,
        ImageConfig("sha256:" + "b" * 64),
        5,
        Platform("linux", "amd64"),
        (Layer("sha256:" + "c" * 64, "application/vnd.oci.image.layer.v1.tar+gzip", 7, None, 0),),
    )
    batch = Batch(1, actor, datetime(2026, 12, 5, tzinfo=UTC))
    batch.pulled("example.com/foo/app:1", "registry:example.com/foo/app", content, False, endpoints)
    [event] = batch.events
    mapper = LedgerMapper()
    with mapper.batch():
        return event, mapper.to_stored_event(event)


def test_a_pull_with_endpoints_stores_a_seventh_element_and_reads_back() -> None:
    served = (
        PullEndpoint("mirror.local/foo/app", True, True, False, ("sha256:" + "c" * 64,)),
        PullEndpoint("example.com/foo/app", False, False, True, ()),
    )
    event, record = _pull_events(served)
    state = msgpack.unpackb(record.state, timestamp=3)
    assert len(state) == 7
    assert state[6] == [
        ["mirror.local/foo/app", True, True, False, ["sha256:" + "c" * 64]],
        ["example.com/foo/app", False, False, True, []],
    ]
    decoded = LedgerMapper().to_domain_event(record)
    assert decoded.__dict__ == event.__dict__
    plain = record_fields(msgpack.packb([b"\0" * 16, 2, "ImagePulled", record.state]))
    assert plain["endpoints"][0] == {
        "location": "mirror.local/foo/app",
        "mirror": True,
        "insecure": True,
        "manifest": False,
        "blobs": ["sha256:" + "c" * 64],
    }


def test_a_pull_without_endpoints_is_stored_as_before_and_old_records_read() -> None:
    """No endpoints (a load, an offline pull, every pull before endpoints existed): the state
    keeps its six elements, as every pull was stored before, and reads back with none;
    an empty seventh element is never written, so it is damage."""
    _event, record = _pull_events(())
    state = msgpack.unpackb(record.state, timestamp=3)
    assert len(state) == 6
    decoded: Any = LedgerMapper().to_domain_event(record)
    assert decoded.endpoints == ()
    empty = msgpack.packb([*state, []], datetime=True)
    damaged = type(record)(record.originator_id, record.originator_version, record.topic, empty)
    with pytest.raises(LedgerCorruptError, match="endpoints"):
        LedgerMapper().to_domain_event(damaged)
    eight = msgpack.packb([*state, [], []], datetime=True)
    longer = type(record)(record.originator_id, record.originator_version, record.topic, eight)
    with pytest.raises(LedgerCorruptError, match="array of 6 fields"):
        LedgerMapper().to_domain_event(longer)


# ---- pulls through real registries -----------------------------------------------------------


def _image(tmp_path: Path, name: str, payload: bytes) -> Path:
    image = build_image(
        ImageSpec(
            layers=({"etc/payload": payload}, {"etc/name": name.encode()}),
            architecture="amd64",
            names=("v1",),
        )
    )
    return build_oci_layout(tmp_path / f"layout-{name}", [image]).path


def _digest(registry: Registry, repository: str, tag: str) -> str:
    import httpx

    from imageledger.storage.registry import MANIFEST_ACCEPT

    answer = httpx.get(
        f"{registry.url}/v2/{repository}/manifests/{tag}",
        headers={"Accept": MANIFEST_ACCEPT},
        timeout=30,
    )
    answer.raise_for_status()
    return str(answer.headers["Docker-Content-Digest"])


class Pair:
    """A primary and a mirror registry, each behind a counting `FlakyProxy`, the primary
    holding image X as team/app:v1."""

    def __init__(
        self, tmp_path: Path, primary: FlakyRegistry, mirror: FlakyRegistry, x: Path
    ) -> None:
        self.tmp_path = tmp_path
        self.primary = primary
        self.mirror = mirror
        self.x = x
        push(primary.upstream, f"oci:{x}:v1", "team/app:v1")
        self.digest = _digest(primary.upstream, "team/app", "v1")

    @property
    def reference(self) -> str:
        return self.primary.registry.reference("team/app:v1")

    @property
    def pinned(self) -> str:
        return self.primary.registry.reference(f"team/app@{self.digest}")

    def conf(self, mirror_lines: str = "", *, mirror_location: str | None = None) -> Path:
        location = mirror_location or f"{self.mirror.registry.host}/team"
        return _write(
            self.tmp_path / "registries.conf",
            f'[[registry]]\nprefix = "{self.primary.registry.host}/team"\n'
            f'location = "{self.primary.registry.host}/team"\ninsecure = true\n'
            f'[[registry.mirror]]\nlocation = "{location}"\ninsecure = true\n{mirror_lines}',
        )

    def cache(self, conf: Path) -> ImageCache:
        return ImageCache(self.tmp_path / "home", registries_conf=conf)


@pytest.fixture
def pair(tmp_path: Path, make_flaky_registry: MakeFlakyRegistry, make_registry: Any) -> Pair:
    primary = make_flaky_registry(make_registry())
    mirror = make_flaky_registry(make_registry())
    return Pair(tmp_path, primary, mirror, _image(tmp_path, "x", b"image X\n"))


def _options(conf: Path) -> RegistryOptions:
    """Fast retries for endpoints that are down; everything else from the configuration."""
    return RegistryOptions(backoff=0.01, retries=1, registries=load_registries_conf(path=conf))


def _pulled(cache: ImageCache) -> list[Any]:
    return [e for e in cache.audit.events() if e["type"] == "ImagePulled"]


def test_a_mirror_that_has_the_image_serves_it_and_the_event_says_so(pair: Pair) -> None:
    push(pair.mirror.upstream, f"oci:{pair.x}:v1", "team/app:v1")
    with pair.cache(pair.conf()) as cache:
        handle = cache.pull(pair.reference)
        assert handle.reference == pair.reference  # the name asked for, not the mirror's
        assert handle.manifest_digest == pair.digest
        assert pair.primary.proxy.count("/v2/team/") == 0
        [event] = _pulled(cache)
        [endpoint] = event["endpoints"]
        assert endpoint["location"] == f"{pair.mirror.registry.host}/team/app"
        assert endpoint["mirror"] is True and endpoint["insecure"] is True
        assert endpoint["manifest"] is True
        blobs = {layer.blob_digest for layer in handle.inspect().layers}
        assert blobs <= set(endpoint["blobs"])
        assert event["source"] == f"registry:{pair.primary.registry.host}/team/app"
        [entry] = [e for e in cache.history(pair.reference) if e.event == "ImagePulled"]
        assert f"via mirror {pair.mirror.registry.host}/team/app (manifest, " in entry.detail
        made_by = cache.explain(pair.reference)["made_by"]
        assert made_by["endpoints"] == event["endpoints"]
        detail = cache.inspect(pair.reference)
        assert [e.as_json() for e in detail.endpoints] == event["endpoints"]
        # A second name given by a tag came from no registry.
        tagged = cache.tag(pair.reference, "example.com/local/app:1")
        assert cache.inspect(tagged.reference).endpoints == ()
        # The views hold it as the log says (a rebuild gives the same answer).
        assert cache.rebuild(verify=True).identical
        cache.remove(pair.reference)
        with pytest.raises(ImageNotFoundError):
            cache.inspect(pair.reference)
        assert cache.at(event["position"]).inspect(pair.reference).endpoints == detail.endpoints


def test_a_mirror_that_is_down_falls_back_to_the_primary_and_logs_it(pair: Pair) -> None:
    conf = pair.conf(mirror_location="127.0.0.1:9/team")  # discard port: nothing listens
    with pair.cache(conf) as cache, capture_logs() as logs:
        handle = cache.pull(pair.reference, options=_options(conf))
        assert handle.manifest_digest == pair.digest
        [event] = _pulled(cache)
        assert [(e["location"], e["mirror"], e["manifest"]) for e in event["endpoints"]] == [
            (f"{pair.primary.registry.host}/team/app", False, True)
        ]
    [fallback] = [e for e in logs if e["event"] == "registry.endpoint.fallback"]
    assert fallback["endpoint"] == "127.0.0.1:9/team/app"
    assert fallback["mirror"] is True
    assert fallback["next"] == f"{pair.primary.registry.host}/team/app"
    assert fallback["log_level"] == "warning"


def test_a_mirror_that_lacks_the_image_falls_back_to_the_primary(pair: Pair) -> None:
    with pair.cache(pair.conf()) as cache, capture_logs() as logs:
        handle = cache.pull(pair.reference)
        assert handle.manifest_digest == pair.digest
        assert pair.mirror.proxy.count("/v2/team/app/manifests/v1") >= 1
        [event] = _pulled(cache)
        assert [e["mirror"] for e in event["endpoints"]] == [False]
    assert [e["error_type"] for e in logs if e["event"] == "registry.endpoint.fallback"] == [
        "NotInRegistryError"
    ]


def test_a_mirror_serving_another_manifest_for_a_digest_is_rejected(
    pair: Pair, tmp_path: Path
) -> None:
    # The mirror holds a different image under the same repository and tag, and answers the
    # pinned digest with it.
    y = _image(tmp_path, "y", b"image Y, not X\n")
    push(pair.mirror.upstream, f"oci:{y}:v1", "team/app:v1")
    other = _digest(pair.mirror.upstream, "team/app", "v1")
    assert other != pair.digest
    pair.mirror.proxy.serve_instead(
        f"/v2/team/app/manifests/{pair.digest}", "/v2/team/app/manifests/v1"
    )
    with pair.cache(pair.conf()) as cache, capture_logs() as logs:
        handle = cache.pull(pair.pinned)
        assert handle.manifest_digest == pair.digest  # verified, from the primary
        [event] = _pulled(cache)
        assert [(e["mirror"], e["manifest"]) for e in event["endpoints"]] == [(False, True)]
        # Nothing of the mirror's image was kept.
        assert not (cache.home / "blobs/sha256" / other.removeprefix("sha256:")).exists()
    [fallback] = [e for e in logs if e["event"] == "registry.endpoint.fallback"]
    assert fallback["error_type"] == DigestMismatchError.__name__
    assert other in fallback["error"] and pair.digest in fallback["error"]


def test_a_wrong_manifest_from_the_only_endpoint_fails_the_pull(pair: Pair) -> None:
    """Whatever the endpoint, the digest is verified: with no primary to fall back to (the
    mirror is the primary here), the pull fails and is recorded as failed."""
    y = _image(pair.tmp_path, "y", b"image Y\n")
    push(pair.mirror.upstream, f"oci:{y}:v1", "team/app:v1")
    pair.mirror.proxy.serve_instead(
        f"/v2/team/app/manifests/{pair.digest}", "/v2/team/app/manifests/v1"
    )
    conf = _write(
        pair.tmp_path / "only.conf",
        f'[[registry]]\nprefix = "{pair.primary.registry.host}/team"\n'
        f'location = "{pair.mirror.registry.host}/team"\ninsecure = true\n',
    )
    with pair.cache(conf) as cache:
        with pytest.raises(DigestMismatchError):
            cache.pull(pair.pinned)
        assert cache.list() == []
        [failed] = [e for e in cache.audit.events() if e["type"] == "PullFailed"]
        assert failed["reference"] == pair.pinned


@pytest.mark.parametrize("mode", ["digest-only", "tag-only"])
def test_pull_from_mirror_sends_only_digests_or_only_tags_to_the_mirror(
    pair: Pair, mode: str
) -> None:
    push(pair.mirror.upstream, f"oci:{pair.x}:v1", "team/app:v1")
    conf = pair.conf(f'pull-from-mirror = "{mode}"\n')
    # The one the mirror does not take first (it goes to the primary), then the other.
    first, then = (
        (pair.reference, pair.pinned) if mode == "digest-only" else (pair.pinned, pair.reference)
    )
    with pair.cache(conf) as cache:
        cache.pull(first)
        assert pair.mirror.proxy.count("/v2/") == 0
        cache.remove(first)
        cache.prune()
        cache.pull(then)
        events = _pulled(cache)
        assert [e["endpoints"][0]["mirror"] for e in events] == [False, True]
        assert events[1]["endpoints"][0]["location"] == f"{pair.mirror.registry.host}/team/app"


def test_a_blocked_registry_is_refused_recorded_and_exit_2(pair: Pair) -> None:
    conf = _write(
        pair.tmp_path / "blocked.conf",
        f'[[registry]]\nlocation = "{pair.primary.registry.host}"\nblocked = true\n',
    )
    with pair.cache(conf) as cache:
        with pytest.raises(RegistryBlockedError, match="blocked"):
            cache.pull(pair.reference)
        [failed] = [e for e in cache.audit.events() if e["type"] == "PullFailed"]
        assert failed["reference"] == pair.reference
        assert "blocked" in failed["error"]
    assert pair.primary.proxy.count() == 0  # nothing was sent
    home = str(pair.tmp_path / "home")
    done = _cli("--home", home, "--registries-conf", str(conf), "pull", pair.reference)
    assert done.returncode == 2, done.stderr
    assert "blocked by the registries configuration" in done.stderr


def test_a_blocked_registry_is_refused_even_for_a_digest_the_cache_holds(pair: Pair) -> None:
    """A pull by digest of a manifest the cache holds is answered without the registry; a
    blocked registry still refuses it, so the configuration means the same for every pull."""
    with pair.cache(pair.conf()) as cache:
        cache.pull(pair.pinned)
    conf = _write(
        pair.tmp_path / "blocked.conf",
        f'[[registry]]\nprefix = "{pair.primary.registry.host}/team"\n'
        f'location = "{pair.primary.registry.host}/team"\nblocked = true\n',
    )
    pair.primary.proxy.reset()
    with pair.cache(conf) as cache:
        with pytest.raises(RegistryBlockedError):
            cache.pull(pair.pinned)
        assert [e["type"] for e in cache.audit.events()][-1] == "PullFailed"
    assert pair.primary.proxy.count() == 0


def test_a_location_rewrite_pulls_from_the_location_under_the_name_asked_for(
    pair: Pair,
) -> None:
    conf = _write(
        pair.tmp_path / "rewrite.conf",
        '[[registry]]\nprefix = "registry.invalid/mirrored"\n'
        f'location = "{pair.primary.registry.host}/team"\ninsecure = true\n',
    )
    with pair.cache(conf) as cache:
        handle = cache.pull("registry.invalid/mirrored/app:v1")
        assert handle.reference == "registry.invalid/mirrored/app:v1"
        assert handle.manifest_digest == pair.digest
        [event] = _pulled(cache)
        assert event["endpoints"][0]["location"] == f"{pair.primary.registry.host}/team/app"
        assert event["endpoints"][0]["mirror"] is False
        [entry] = [e for e in cache.history(handle.reference) if e.event == "ImagePulled"]
        assert f"via {pair.primary.registry.host}/team/app" in entry.detail


def test_the_command_line_reads_the_environments_file_and_events_show_the_mirror(
    pair: Pair,
) -> None:
    push(pair.mirror.upstream, f"oci:{pair.x}:v1", "team/app:v1")
    conf = pair.conf()
    env = {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(conf)}
    home = str(pair.tmp_path / "cli-home")
    pulled = _cli("--home", home, "pull", pair.reference, "--json", env=env)
    assert pulled.returncode == 0, pulled.stderr
    events = _cli("--home", home, "events", "--type", "ImagePulled", "--json", env=env)
    [line] = events.stdout.splitlines()
    [endpoint] = json.loads(line)["endpoints"]
    assert endpoint["mirror"] is True
    assert endpoint["location"] == f"{pair.mirror.registry.host}/team/app"
    inspected = _cli("--home", home, "inspect", pair.reference, "--json", env=env)
    assert json.loads(inspected.stdout)["endpoints"] == [endpoint]


def test_a_pull_without_any_configuration_records_the_registry_itself(
    registry: Registry, tmp_path: Path
) -> None:
    x = _image(tmp_path, "x", b"plain\n")
    push(registry, f"oci:{x}:v1", "team/app:v1")
    options = RegistryOptions(insecure=frozenset({registry.host}))
    with ImageCache(tmp_path / "home") as cache:
        cache.pull(registry.reference("team/app:v1"), options=options)
        [event] = _pulled(cache)
        [endpoint] = event["endpoints"]
        assert endpoint["location"] == f"{registry.host}/team/app"
        assert endpoint["mirror"] is False and endpoint["manifest"] is True
        # An ordinary pull's history reads as it always did.
        [entry] = [e for e in cache.history() if e.event == "ImagePulled"]
        assert entry.detail == f"from registry:{registry.host}/team/app"


def test_a_mirror_with_the_manifest_but_not_a_blob_falls_back_keeping_what_verified(
    pair: Pair,
) -> None:
    push(pair.mirror.upstream, f"oci:{pair.x}:v1", "team/app:v1")
    with pair.cache(pair.conf()) as probe:
        layers = probe.pull(pair.reference).inspect().layers
        probe.remove(pair.reference)
        probe.prune()
    missing = layers[-1].blob_digest
    pair.mirror.proxy.fail_next(404, times=100, path_prefix=f"/v2/team/app/blobs/{missing}")
    with pair.cache(pair.conf()) as cache:
        cache.pull(pair.reference, options=_options(pair.conf()))
        [event] = _pulled(cache)[-1:]
        by_location = {e["location"]: e for e in event["endpoints"]}
        primary = by_location[f"{pair.primary.registry.host}/team/app"]
        assert primary["manifest"] is True
        assert missing in primary["blobs"]
        mirror = by_location.get(f"{pair.mirror.registry.host}/team/app")
        if mirror is not None:  # what the mirror delivered before it failed is kept
            assert mirror["manifest"] is False and missing not in mirror["blobs"]


def test_not_found_everywhere_is_not_found(pair: Pair) -> None:
    with pair.cache(pair.conf()) as cache, pytest.raises(ImageNotFoundError):
        cache.pull(pair.primary.registry.reference("team/absent:v1"))
