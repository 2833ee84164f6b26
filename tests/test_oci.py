"""storage/oci.py: manifests, indexes and configs parsed strictly; images described from the
blob store; canonical JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imageledger.domain.errors import ContentMissingError, ImageLedgerError, ManifestError
from imageledger.domain.model import DOCKER_LIST, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, Platform
from imageledger.storage.blobs import BlobStore
from imageledger.storage.oci import (
    MAX_MANIFEST_SIZE,
    canonical_json,
    describe_image,
    parse_config,
    parse_index,
    parse_manifest,
)
from imageledger.tools.imagebuild import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    ImageSpec,
    build_image,
    build_layer,
    json_bytes,
    sha256,
)

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


def descriptor(
    digest: str = DIGEST_A, size: object = 10, media_type: object = OCI_LAYER
) -> dict[str, object]:
    return {"mediaType": media_type, "digest": digest, "size": size}


def manifest(**overrides: object) -> dict[str, object]:
    obj: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(DIGEST_B, 20, OCI_CONFIG),
        "layers": [descriptor()],
    }
    obj.update(overrides)
    return obj


def refused(data: bytes, *fragments: str, media_type: str | None = OCI_MANIFEST) -> None:
    with pytest.raises(ManifestError) as raised:
        parse_manifest(data, media_type, digest=DIGEST_A)
    message = str(raised.value)
    assert DIGEST_A in message
    for fragment in fragments:
        assert fragment in message, message


# ---- canonical JSON --------------------------------------------------------------------------


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert canonical_json({"b": 1, "a": [1, {"d": None, "c": "é"}]}) == (
        '{"a":[1,{"c":"é","d":null}],"b":1}'.encode()
    )
    assert canonical_json({"x": 1, "y": 2}) == canonical_json({"y": 2, "x": 1})


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


# ---- manifests -------------------------------------------------------------------------------


def test_parse_oci_and_docker_manifests() -> None:
    for spec in (ImageSpec(), ImageSpec(docker_media_types=True)):
        image = build_image(spec)
        parsed = parse_manifest(image.manifest, image.manifest_media_type)
        assert parsed.media_type == image.manifest_media_type
        assert parsed.config.digest == image.config_digest
        assert parsed.config.size == len(image.config)
        assert parsed.config.media_type == (
            DOCKER_CONFIG if spec.docker_media_types else OCI_CONFIG
        )
        assert [(d.digest, d.size, d.media_type) for d in parsed.layers] == [
            (layer.digest, layer.size, layer.media_type) for layer in image.layers
        ]
        # Without a served media type the manifest's own field decides.
        assert parse_manifest(image.manifest, None) == parsed


def test_manifest_without_media_type_field_is_oci() -> None:
    obj = manifest()
    del obj["mediaType"]
    assert parse_manifest(json_bytes(obj), None).media_type == OCI_MANIFEST
    assert parse_manifest(json_bytes(obj), DOCKER_MANIFEST).media_type == DOCKER_MANIFEST


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        (b"not json", ("not valid JSON",)),
        (b"\xff\xfe", ("not valid JSON",)),
        (b"[1, 2]", ("expected a JSON object", "list")),
        (b'"manifest"', ("expected a JSON object",)),
        (b'{"schemaVersion": 2, "schemaVersion": 2}', ("duplicate key",)),
        (json_bytes(manifest(schemaVersion=1)), ("schema 1 is not supported",)),
        (json_bytes(manifest(schemaVersion=3)), ("schemaVersion must be 2",)),
        (json_bytes(manifest(schemaVersion="2")), ("schemaVersion must be 2",)),
        (json_bytes(manifest(schemaVersion=True)), ("schemaVersion must be 2",)),
        (json_bytes(manifest(mediaType=DOCKER_MANIFEST)), ("served as", "mediaType field says")),
        (json_bytes(manifest(mediaType=7)), ("mediaType must be a string",)),
        (json_bytes(manifest(manifests=[])), ("is an index",)),
        (json_bytes(manifest(config=None)), ("config must be a descriptor",)),
        (json_bytes({k: v for k, v in manifest().items() if k != "config"}), ("no config",)),
        (json_bytes(manifest(layers=None)), ("layers must be a list",)),
        (
            json_bytes(manifest(layers=[descriptor("sha256:abc")])),
            ("layers[0].digest", "invalid digest"),
        ),
        (json_bytes(manifest(layers=[descriptor("md5:" + "a" * 32)])), ("invalid digest",)),
        (json_bytes(manifest(layers=[descriptor(DIGEST_A.upper())])), ("invalid digest",)),
        (json_bytes(manifest(layers=[descriptor(size=-1)])), ("must not be negative",)),
        (json_bytes(manifest(layers=[descriptor(size=1.5)])), ("must be an integer",)),
        (json_bytes(manifest(layers=[descriptor(size="10")])), ("must be an integer",)),
        (json_bytes(manifest(layers=[descriptor(size=True)])), ("must be an integer",)),
        (
            json_bytes(manifest(layers=[descriptor(media_type=None)])),
            ("mediaType must be a string",),
        ),
        (json_bytes(manifest(layers=[{"digest": DIGEST_A, "size": 1}])), ("has no mediaType",)),
        (json_bytes(manifest(layers=[{"mediaType": OCI_LAYER, "size": 1}])), ("has no digest",)),
        (
            json_bytes(manifest(layers=[{"mediaType": OCI_LAYER, "digest": DIGEST_A}])),
            ("has no size",),
        ),
        (json_bytes(manifest(layers=["sha256:x"])), ("must be a descriptor object",)),
        (
            json_bytes(manifest(config={"mediaType": OCI_CONFIG, "size": 1})),
            ("config has no digest",),
        ),
        (json_bytes(manifest(layers=[descriptor()] * 1001)), ("1001 layers", "limit of 1000")),
        (b'{"schemaVersion": NaN}', ("not valid JSON",)),
    ],
)
def test_hostile_manifests_are_refused(data: bytes, fragments: tuple[str, ...]) -> None:
    refused(data, *fragments)


def test_unknown_media_types_are_refused() -> None:
    refused(json_bytes(manifest()), "unsupported media type", media_type="text/plain")
    refused(json_bytes(manifest(mediaType=None)), "unsupported media type", media_type=OCI_INDEX)
    obj = manifest(mediaType="application/vnd.example+json")
    refused(json_bytes(obj), "unsupported media type", media_type=None)


def test_manifest_over_the_size_limit_is_refused() -> None:
    data = json_bytes(manifest(padding="x" * MAX_MANIFEST_SIZE))
    refused(data, "larger than the 4194304 byte limit")


def test_manifest_error_is_an_imageledger_error() -> None:
    assert issubclass(ManifestError, ImageLedgerError)
    assert issubclass(ContentMissingError, ImageLedgerError)


# ---- indexes ---------------------------------------------------------------------------------


def test_parse_index_entries() -> None:
    data = json_bytes(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    **descriptor(DIGEST_A, 5, OCI_MANIFEST),
                    "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
                    "annotations": {"org.opencontainers.image.ref.name": "3.19", "z": "1"},
                },
                {
                    **descriptor(DIGEST_B, 6, OCI_MANIFEST),
                    "platform": {"os": "unknown", "architecture": "unknown"},
                },
                {
                    **descriptor(DIGEST_B, 6, OCI_MANIFEST),
                    "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
                },
                descriptor(DIGEST_A, 7, OCI_INDEX),
            ],
        }
    )
    entries = parse_index(data, OCI_INDEX)
    first = entries[0]
    assert (first.digest, first.size, first.media_type) == (DIGEST_A, 5, OCI_MANIFEST)
    assert first.platform == Platform("linux", "arm64", "v8")
    assert first.ref_name == "3.19"
    assert first.annotations == (("org.opencontainers.image.ref.name", "3.19"), ("z", "1"))
    assert not first.attestation
    assert entries[1].attestation and entries[2].attestation
    assert entries[3].media_type == OCI_INDEX and entries[3].platform is None
    assert entries[3].ref_name is None and not entries[3].attestation
    # A layout's index.json may omit mediaType.
    assert len(parse_index(json_bytes({"schemaVersion": 2, "manifests": []}), None)) == 0


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        ({"schemaVersion": 1, "manifests": []}, "schema 1 is not supported"),
        ({"schemaVersion": 2}, "manifests must be a list"),
        ({"schemaVersion": 2, "manifests": [], "mediaType": OCI_MANIFEST}, "unsupported media"),
        (
            {"schemaVersion": 2, "manifests": [], "mediaType": DOCKER_LIST},
            "mediaType field says",
        ),
        ({"schemaVersion": 2, "manifests": [], "layers": []}, "not an index"),
        ({"schemaVersion": 2, "manifests": [descriptor("sha256:12")]}, "invalid digest"),
        ({"schemaVersion": 2, "manifests": [descriptor(size=-5)]}, "must not be negative"),
        (
            {"schemaVersion": 2, "manifests": [{**descriptor(), "platform": {"os": "linux"}}]},
            "platform.architecture must be a string",
        ),
        (
            {
                "schemaVersion": 2,
                "manifests": [{**descriptor(), "platform": {"os": 1, "architecture": "x"}}],
            },
            "platform.os must be a string",
        ),
        (
            {"schemaVersion": 2, "manifests": [{**descriptor(), "annotations": {"a": 1}}]},
            "annotations['a'] must be a string",
        ),
    ],
)
def test_hostile_indexes_are_refused(obj: dict[str, object], fragment: str) -> None:
    with pytest.raises(ManifestError, match="index") as raised:
        parse_index(json_bytes(obj), OCI_INDEX, digest=DIGEST_B)
    assert fragment in str(raised.value)
    assert DIGEST_B in str(raised.value)


# ---- configs ---------------------------------------------------------------------------------


def config_bytes(runtime: object = None, **top: object) -> bytes:
    obj: dict[str, object] = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []},
    }
    if runtime is not None:
        obj["config"] = runtime
    obj.update(top)
    return json_bytes(obj)


def test_parse_config_reads_runtime_platform_and_diff_ids() -> None:
    spec = ImageSpec(
        layers=({"a": b"1"}, {"b": b"2"}),
        variant="v7",
        architecture="arm",
        env=("A=1", "B=2"),
        cmd=("run", "--fast"),
        entrypoint=("/init",),
        working_dir="/srv",
        user="1000:1000",
        labels={"z": "last", "a": "first"},
        stop_signal="SIGINT",
    )
    image = build_image(spec)
    config, platform, diff_ids = parse_config(image.config, image.config_digest)
    assert config.digest == image.config_digest
    assert config.env == ("A=1", "B=2")
    assert config.cmd == ("run", "--fast")
    assert config.entrypoint == ("/init",)
    assert config.working_dir == "/srv"
    assert config.user == "1000:1000"
    assert config.labels == (("a", "first"), ("z", "last"))
    assert config.stop_signal == "SIGINT"
    assert platform == Platform("linux", "arm", "v7")
    assert diff_ids == tuple(layer.diff_id for layer in image.layers)


def test_parse_config_keeps_none_apart_from_empty() -> None:
    config, _, _ = parse_config(config_bytes({"Cmd": [], "Entrypoint": None}), DIGEST_A)
    assert config.cmd == () and config.entrypoint is None
    config, _, _ = parse_config(config_bytes({"Cmd": None, "Entrypoint": []}), DIGEST_A)
    assert config.cmd is None and config.entrypoint == ()
    config, platform, diff_ids = parse_config(config_bytes(), DIGEST_A)  # no "config" at all
    assert config.env == () and config.cmd is None and config.entrypoint is None
    assert config.labels == () and diff_ids == ()
    assert platform == Platform("linux", "amd64")
    empty = {"WorkingDir": "", "User": "", "StopSignal": "", "Env": None, "Labels": None}
    config, _, _ = parse_config(config_bytes(empty), DIGEST_A)
    assert (config.working_dir, config.user, config.stop_signal) == (None, None, None)
    assert config.env == () and config.labels == ()


def test_parse_config_without_platform_reports_empty_strings() -> None:
    data = json_bytes({"config": {}, "rootfs": {"type": "layers", "diff_ids": [DIGEST_A]}})
    _, platform, diff_ids = parse_config(data, DIGEST_B)
    assert platform == Platform("", "", None)
    assert diff_ids == (DIGEST_A,)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"{", "not valid JSON"),
        (b"[]", "expected a JSON object"),
        (config_bytes(architecture=64), "architecture must be a string"),
        (config_bytes(os=["linux"]), "os must be a string"),
        (config_bytes(variant=8), "variant must be a string"),
        (config_bytes({"Env": "A=1"}), "config.Env must be a list of strings"),
        (config_bytes({"Cmd": ["a", 1]}), "config.Cmd must be a list of strings"),
        (config_bytes({"Labels": {"a": 1}}), "config.Labels['a'] must be a string"),
        (config_bytes({"WorkingDir": 5}), "config.WorkingDir must be a string"),
        (config_bytes("nope"), "config must be an object"),
        (config_bytes(rootfs={"diff_ids": ["sha256:nothex"]}), "rootfs.diff_ids[0]"),
        (config_bytes(rootfs={"diff_ids": "x"}), "rootfs.diff_ids must be a list"),
        (config_bytes(rootfs=[]), "rootfs must be an object"),
    ],
)
def test_hostile_configs_are_refused(data: bytes, fragment: str) -> None:
    with pytest.raises(ManifestError) as raised:
        parse_config(data, DIGEST_A)
    assert fragment in str(raised.value)
    assert f"config {DIGEST_A}" in str(raised.value)


# ---- describe_image --------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "home")


def put_image(
    store: BlobStore,
    config: bytes,
    layers: list[tuple[bytes, str]],
    *,
    sizes: dict[int, int] | None = None,
    config_media_type: str = OCI_CONFIG,
    skip_layers: bool = False,
) -> str:
    """Store a config, layers and the manifest over them; return the manifest digest."""
    store.write_bytes(config)
    descriptors = []
    for i, (data, media_type) in enumerate(layers):
        if not skip_layers:
            store.write_bytes(data)
        size = (sizes or {}).get(i, len(data))
        descriptors.append({"mediaType": media_type, "digest": sha256(data), "size": size})
    data = json_bytes(
        manifest(
            config=descriptor(sha256(config), len(config), config_media_type), layers=descriptors
        )
    )
    return store.write_bytes(data)


def test_describe_image_from_the_store(store: BlobStore) -> None:
    image = build_image(
        ImageSpec(
            layers=({"a": b"1"}, {"b": b"2"}, {"c": b"3"}),
            compression="zstd",
            variant="v8",
            architecture="arm64",
        )
    )
    for digest, data in image.blobs.items():
        store.write_bytes(data, digest)
    content = describe_image(store, image.manifest_digest)
    assert content.manifest_digest == image.manifest_digest
    assert content.manifest_media_type == OCI_MANIFEST
    assert content.manifest_size == len(image.manifest)
    assert content.config_size == len(image.config)
    assert content.config.digest == image.config_digest
    assert content.platform == Platform("linux", "arm64", "v8")
    assert [layer.position for layer in content.layers] == [0, 1, 2]
    assert [
        (layer.blob_digest, layer.diff_id, layer.compressed_size_bytes, layer.media_type)
        for layer in content.layers
    ] == [(layer.digest, layer.diff_id, layer.size, layer.media_type) for layer in image.layers]
    assert content.size_bytes == sum(len(data) for data in image.blobs.values())


def test_describe_image_falls_back_to_the_platform_hint(store: BlobStore) -> None:
    layer = build_layer({"x": b"1"})
    config = json_bytes({"config": {}, "rootfs": {"type": "layers", "diff_ids": [sha256(layer)]}})
    digest = put_image(store, config, [(layer, OCI_LAYER)])
    hint = Platform("linux", "riscv64")
    assert describe_image(store, digest, platform_hint=hint).platform == hint
    with pytest.raises(ManifestError, match="no os/architecture"):
        describe_image(store, digest)


def test_describe_image_checks_media_type_served(store: BlobStore) -> None:
    image = build_image(ImageSpec())
    for digest, data in image.blobs.items():
        store.write_bytes(data, digest)
    with pytest.raises(ManifestError, match="served as"):
        describe_image(store, image.manifest_digest, media_type=DOCKER_MANIFEST)


def test_describe_image_refuses_incomplete_or_inconsistent_images(store: BlobStore) -> None:
    layer = build_layer({"x": b"1"})
    good = config_bytes(rootfs={"type": "layers", "diff_ids": [sha256(layer)]})

    with pytest.raises(ContentMissingError, match=r"manifest sha256:.* is not in the blob store"):
        describe_image(store, DIGEST_A)

    digest = put_image(store, good, [(layer, OCI_LAYER)], skip_layers=True)
    with pytest.raises(
        ContentMissingError, match=f"layer 0 blob {sha256(layer)} is not in the blob store"
    ):
        describe_image(store, digest)

    digest = put_image(store, good, [(layer, OCI_LAYER)], sizes={0: len(layer) + 1})
    with pytest.raises(
        ManifestError, match=f"layer 0 blob .* has {len(layer)} bytes, the manifest says"
    ):
        describe_image(store, digest)

    two = config_bytes(rootfs={"type": "layers", "diff_ids": [sha256(layer), sha256(layer)]})
    digest = put_image(store, two, [(layer, OCI_LAYER)])
    with pytest.raises(ManifestError, match=r"1 layers but config .* lists 2 rootfs\.diff_ids"):
        describe_image(store, digest)

    digest = put_image(
        store,
        good,
        [(layer, OCI_LAYER)],
        config_media_type="application/vnd.cncf.helm.config.v1+json",
    )
    with pytest.raises(ManifestError, match="not a container image"):
        describe_image(store, digest)

    other = build_layer({"y": b"2"})
    digest = put_image(store, good, [(other, OCI_LAYER)])
    with pytest.raises(ManifestError, match=r"uncompressed .* differs from its diff_id"):
        describe_image(store, digest)

    wrong_size = json_bytes(
        manifest(
            config=descriptor(sha256(good), len(good) + 3, OCI_CONFIG),
            layers=[descriptor(sha256(layer), len(layer))],
        )
    )
    with pytest.raises(ManifestError, match=r"config .* has .* bytes, the manifest says"):
        describe_image(store, store.write_bytes(wrong_size))

    big = b" " * (MAX_MANIFEST_SIZE + 1)
    with pytest.raises(ManifestError, match="larger than"):
        describe_image(store, store.write_bytes(big))


def test_docker_manifest_json_round_trips_through_parse() -> None:
    image = build_image(ImageSpec(docker_media_types=True))
    obj = json.loads(image.manifest)
    assert obj["mediaType"] == DOCKER_MANIFEST
    assert (
        parse_manifest(image.manifest, DOCKER_MANIFEST).layers[0].media_type
        == obj["layers"][0]["mediaType"]
    )
