"""OCI / Docker image manifests, indexes and configs: parse, validate, describe.

Everything here treats its input as hostile: a manifest, index or config is bounded in size
(`MAX_MANIFEST_SIZE`), must be one JSON object without duplicate keys, and every descriptor in
it is checked (media type a string, digest well-formed, size a non-negative int) before any
digest becomes a path. A refusal is a `ManifestError` naming the digest and what is wrong.

`describe_image` turns a manifest already in the blob store into the domain's `ImageContent`;
`canonical_json` is the one serialization used to synthesize manifests, so that the same input
always hashes to the same digest. `index_manifests` is the one walk through nested indexes
(a registry pull and an archive load both follow it, each with its own way to fetch an index),
bounded by `MAX_INDEX_DEPTH`; `choose_index_entry` is the pull's choice of an index entry for
a platform (the rules are `domain.platforms`'s).

The manifest, index and config media types are the domain's (`domain.model`); only the layer
media types, which nothing above storage looks at, are defined here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Final, Protocol

from imageledger.domain.errors import (
    ContentMissingError,
    InvalidPlatformError,
    InvalidReferenceError,
    ManifestError,
)
from imageledger.domain.model import (
    CONFIG_TYPES,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    UNCOMPRESSED_LAYER_TYPES,
    ImageConfig,
    ImageContent,
    Layer,
    Platform,
)
from imageledger.domain.platforms import PULL, match_platform
from imageledger.domain.reference import validate_digest
from imageledger.storage.home import Dir

MAX_MANIFEST_SIZE: Final = 4 * 1024 * 1024
"""Largest manifest, index or config accepted (bytes); registries use the same bound."""
MAX_LAYERS: Final = 1000
MAX_INDEX_ENTRIES: Final = 10_000
MAX_INDEX_DEPTH: Final = 4
"""How deep image indexes may nest: an image's own (top-level) index is at depth 1, an index
it lists at depth 2, and so on; a layout's ``index.json`` (an archive's table of contents, as
a registry's tags are) is depth 0. Indexes nested more than this deep are refused: real
images nest one level at most, and a chain of indexes must end."""


_GZIP_MAGIC: Final = b"\x1f\x8b"
_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"


def layer_media_type(head: bytes) -> str:
    """A layer blob's media type told from its first bytes (4 are enough): gzip, zstd, or
    else a plain tar. The one sniffing of a layer's compression (a docker-archive's layers
    are typed by it; a materialization uncompresses by it)."""
    if head.startswith(_GZIP_MAGIC):
        return OCI_LAYER_GZIP
    if head.startswith(_ZSTD_MAGIC):
        return OCI_LAYER_ZSTD
    return OCI_LAYER


ANNOTATION_REF_NAME: Final = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME: Final = "io.containerd.image.name"
ANNOTATION_REFERENCE_TYPE: Final = "vnd.docker.reference.type"
ATTESTATION_MANIFEST: Final = "attestation-manifest"


class BlobAccess(Protocol):
    """What this module and `storage.archives` use of a blob store: `BlobStore` itself, or a
    wrapper around it (one that claims every digest for an in-flight lease, say)."""

    def scratch(self) -> Dir:
        """A work directory for spooled files (the caller closes it; see storage.home)."""

    def has(self, digest: str) -> bool: ...

    def size(self, digest: str) -> int | None: ...

    def open(self, digest: str) -> BinaryIO: ...

    def read(self, digest: str) -> bytes: ...

    def write(
        self,
        digest: str,
        chunks: Iterable[bytes],
        *,
        size: int | None = None,
        max_size: int | None = None,
    ) -> int: ...

    def delete(self, digest: str) -> int: ...


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A content descriptor: what a manifest says about one blob it references."""

    media_type: str
    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class Manifest:
    """An image manifest (OCI or Docker v2 schema 2): config and layers, bottom to top."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One entry of an image index (OCI index, Docker manifest list, a layout's index.json)."""

    digest: str
    media_type: str
    size: int
    platform: Platform | None
    ref_name: str | None  # org.opencontainers.image.ref.name
    attestation: bool
    annotations: tuple[tuple[str, str], ...] = ()  # sorted by key

    def annotation(self, key: str) -> str | None:
        return dict(self.annotations).get(key)


# ---- JSON ------------------------------------------------------------------------------------


def canonical_json(obj: object) -> bytes:
    """`obj` as canonical JSON: sorted keys, no spaces, UTF-8, no NaN/Infinity."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(data: bytes, what: str) -> object:
    """Parse `data` as JSON, bounded by `MAX_MANIFEST_SIZE`, strict (UTF-8, no duplicate keys,
    no NaN/Infinity); `what` names it in the `ManifestError` raised otherwise."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ManifestError(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > MAX_MANIFEST_SIZE:
        msg = f"{what}: {len(data)} bytes is larger than the {MAX_MANIFEST_SIZE} byte limit"
        raise ManifestError(msg)
    try:
        text = bytes(data).decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ManifestError(f"{what}: not valid JSON: {e}") from None
    return obj


def _load_object(data: bytes, what: str) -> dict[str, object]:
    obj = parse_json(data, what)
    if not isinstance(obj, dict):
        raise ManifestError(f"{what}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _what(kind: str, digest: str | None) -> str:
    return f"{kind} {digest}" if digest else kind


def _check_schema(obj: Mapping[str, object], what: str) -> None:
    version = obj.get("schemaVersion")
    if version == 1 and not isinstance(version, bool):
        raise ManifestError(f"{what}: schemaVersion 1: schema 1 is not supported")
    if version != 2 or isinstance(version, bool):
        raise ManifestError(f"{what}: schemaVersion must be 2, got {version!r}")


def _media_type(
    obj: Mapping[str, object], given: str | None, allowed: tuple[str, ...], what: str
) -> str:
    declared = obj.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise ManifestError(f"{what}: mediaType must be a string, got {declared!r}")
    for candidate in (given, declared):
        if candidate is not None and candidate not in allowed:
            msg = f"{what}: unsupported media type {candidate!r} (expected one of {list(allowed)})"
            raise ManifestError(msg)
    if given is not None and declared is not None and given != declared:
        msg = f"{what}: served as {given!r} but its mediaType field says {declared!r}"
        raise ManifestError(msg)
    return given or declared or allowed[0]


def _string(value: object, field: str, what: str) -> str:
    if not isinstance(value, str):
        raise ManifestError(f"{what}: {field} must be a string, got {value!r}")
    return value


def _optional_string(value: object, field: str, what: str) -> str | None:
    return None if value is None else _string(value, field, what)


def _string_map(value: object, field: str, what: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ManifestError(f"{what}: {field} must be an object of strings, got {value!r}")
    for key, item in value.items():
        if not isinstance(item, str):
            msg = f"{what}: {field}[{key!r}] must be a string, got {item!r}"
            raise ManifestError(msg)
    return tuple(sorted(value.items()))


def _digest(value: object, field: str, what: str) -> str:
    text = _string(value, field, what)
    try:
        return validate_digest(text)
    except InvalidReferenceError as e:
        raise ManifestError(f"{what}: {field}: {e}") from None


def _size(value: object, field: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(f"{what}: {field} must be an integer, got {value!r}")
    if value < 0:
        raise ManifestError(f"{what}: {field} must not be negative, got {value}")
    return value


def _descriptor(value: object, field: str, what: str) -> Descriptor:
    if not isinstance(value, dict):
        raise ManifestError(f"{what}: {field} must be a descriptor object, got {value!r}")
    for key in ("mediaType", "digest", "size"):
        if key not in value:
            raise ManifestError(f"{what}: {field} has no {key}")
    return Descriptor(
        media_type=_string(value["mediaType"], f"{field}.mediaType", what),
        digest=_digest(value["digest"], f"{field}.digest", what),
        size=_size(value["size"], f"{field}.size", what),
    )


def _platform(value: object, field: str, what: str) -> Platform | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ManifestError(f"{what}: {field} must be an object, got {value!r}")
    os_ = _string(value.get("os"), f"{field}.os", what)
    architecture = _string(value.get("architecture"), f"{field}.architecture", what)
    variant = _optional_string(value.get("variant"), f"{field}.variant", what)
    return Platform(os_, architecture, variant or None)


# ---- parsing ---------------------------------------------------------------------------------


def parse_manifest(data: bytes, media_type: str | None, *, digest: str | None = None) -> Manifest:
    """Parse an OCI image manifest or Docker v2 schema 2 manifest.

    `media_type` is what the manifest was served as (an index entry's mediaType, a registry's
    Content-Type), or None; it must agree with the manifest's own mediaType field. `digest`
    only names the manifest in error messages.
    """
    what = _what("manifest", digest)
    obj = _load_object(data, what)
    _check_schema(obj, what)
    if "manifests" in obj:
        raise ManifestError(f"{what}: has 'manifests': it is an index, not an image manifest")
    kind = _media_type(obj, media_type, MANIFEST_TYPES, what)
    if "config" not in obj:
        raise ManifestError(f"{what}: has no config descriptor")
    config = _descriptor(obj["config"], "config", what)
    layers = obj.get("layers")
    if not isinstance(layers, list):
        raise ManifestError(f"{what}: layers must be a list, got {layers!r}")
    if len(layers) > MAX_LAYERS:
        msg = f"{what}: {len(layers)} layers is more than the limit of {MAX_LAYERS}"
        raise ManifestError(msg)
    return Manifest(
        media_type=kind,
        config=config,
        layers=tuple(_descriptor(item, f"layers[{i}]", what) for i, item in enumerate(layers)),
    )


def parse_index(
    data: bytes, media_type: str | None, *, digest: str | None = None
) -> list[IndexEntry]:
    """Parse an OCI image index or Docker manifest list (also a layout's ``index.json``).

    Entries of any media type are returned (callers pick manifests and nested indexes); an
    entry is an attestation when annotated ``vnd.docker.reference.type: attestation-manifest``
    or when its platform is ``unknown/unknown`` (BuildKit's convention).
    """
    what = _what("index", digest)
    obj = _load_object(data, what)
    _check_schema(obj, what)
    _media_type(obj, media_type, INDEX_TYPES, what)
    if "layers" in obj or "config" in obj:
        raise ManifestError(f"{what}: has layers/config: it is an image manifest, not an index")
    manifests = obj.get("manifests")
    if not isinstance(manifests, list):
        raise ManifestError(f"{what}: manifests must be a list, got {manifests!r}")
    if len(manifests) > MAX_INDEX_ENTRIES:
        msg = f"{what}: {len(manifests)} entries is more than the limit of {MAX_INDEX_ENTRIES}"
        raise ManifestError(msg)
    entries: list[IndexEntry] = []
    for i, item in enumerate(manifests):
        field = f"manifests[{i}]"
        descriptor = _descriptor(item, field, what)
        fields: dict[str, object] = item  # a descriptor object (checked above)
        platform = _platform(fields.get("platform"), f"{field}.platform", what)
        annotations = _string_map(fields.get("annotations"), f"{field}.annotations", what)
        values = dict(annotations)
        attestation = values.get(ANNOTATION_REFERENCE_TYPE) == ATTESTATION_MANIFEST or (
            platform is not None and platform.os == "unknown" and platform.architecture == "unknown"
        )
        entries.append(
            IndexEntry(
                digest=descriptor.digest,
                media_type=descriptor.media_type,
                size=descriptor.size,
                platform=platform,
                ref_name=values.get(ANNOTATION_REF_NAME),
                attestation=attestation,
                annotations=annotations,
            )
        )
    return entries


def _entry_platform(entry: IndexEntry) -> Platform | None:
    return None if entry.attestation else entry.platform


def choose_index_entry(entries: Sequence[IndexEntry], platform: Platform) -> IndexEntry | None:
    """The entry of an index a pull takes for `platform`, attestations skipped: the rules are
    `domain.platforms.PULL` (the exact variant, arm64 meaning arm64/v8; else a compatible
    one), never another os or architecture."""
    return match_platform(entries, platform, _entry_platform, PULL)


def index_manifests(
    entries: Iterable[IndexEntry],
    *,
    fetch: Callable[[IndexEntry], Iterable[IndexEntry]],
    select: Callable[[Iterable[IndexEntry]], Iterable[IndexEntry]],
    what: str,
    error: Callable[[str], Exception],
    depth: int = 1,
) -> list[IndexEntry]:
    """The entries reached from `entries` (those of an index at `depth`, see
    `MAX_INDEX_DEPTH`) that are not indexes, in order: of each index, the entries `select`
    keeps are taken, and a nested index among them is read by `fetch` and walked in turn.

    A pull selects the one entry for its platform and fetches from the registry; a load
    selects what the archive holds and fetches from it. An index that would be nested more
    than `MAX_INDEX_DEPTH` deep is refused before it is fetched, as ``error(message)``
    (`what` names where, in the message)."""
    found: list[IndexEntry] = []
    for entry in select(entries):
        if entry.media_type not in INDEX_TYPES:
            found.append(entry)
            continue
        nested = depth + 1
        if nested > MAX_INDEX_DEPTH:
            raise error(f"{what}: indexes nested more than {MAX_INDEX_DEPTH} deep")
        found.extend(
            index_manifests(
                fetch(entry), fetch=fetch, select=select, what=what, error=error, depth=nested
            )
        )
    return found


def _string_list(value: object, field: str, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ManifestError(f"{what}: {field} must be a list of strings, got {value!r}")
    return tuple(value)


def parse_config(data: bytes, digest: str) -> tuple[ImageConfig, Platform, tuple[str | None, ...]]:
    """Parse an image config blob: the runtime config, the platform and ``rootfs.diff_ids``.

    ``Cmd``/``Entrypoint`` keep the difference between absent/null (None) and ``[]``; an
    absent ``Env`` is ``()``; empty ``WorkingDir``/``User``/``StopSignal`` are None; labels
    are sorted. The platform's os/architecture are ``""`` when the config does not say.
    """
    what = f"config {digest}"
    obj = _load_object(data, what)
    runtime = obj.get("config")
    if runtime is None:
        runtime = {}
    if not isinstance(runtime, dict):
        raise ManifestError(f"{what}: config must be an object, got {runtime!r}")
    config = ImageConfig(
        digest=digest,
        env=_string_list(runtime.get("Env"), "config.Env", what) or (),
        cmd=_string_list(runtime.get("Cmd"), "config.Cmd", what),
        entrypoint=_string_list(runtime.get("Entrypoint"), "config.Entrypoint", what),
        working_dir=_optional_string(runtime.get("WorkingDir"), "config.WorkingDir", what) or None,
        user=_optional_string(runtime.get("User"), "config.User", what) or None,
        labels=_string_map(runtime.get("Labels"), "config.Labels", what),
        stop_signal=_optional_string(runtime.get("StopSignal"), "config.StopSignal", what) or None,
    )
    platform = Platform(
        os=_optional_string(obj.get("os"), "os", what) or "",
        architecture=_optional_string(obj.get("architecture"), "architecture", what) or "",
        variant=_optional_string(obj.get("variant"), "variant", what) or None,
    )
    rootfs = obj.get("rootfs")
    diff_ids: tuple[str | None, ...] = ()
    if rootfs is not None:
        if not isinstance(rootfs, dict):
            raise ManifestError(f"{what}: rootfs must be an object, got {rootfs!r}")
        raw = rootfs.get("diff_ids")
        if raw is not None:
            if not isinstance(raw, list):
                raise ManifestError(f"{what}: rootfs.diff_ids must be a list, got {raw!r}")
            if len(raw) > MAX_LAYERS:
                msg = f"{what}: {len(raw)} diff_ids is more than the limit of {MAX_LAYERS}"
                raise ManifestError(msg)
            diff_ids = tuple(
                _digest(item, f"rootfs.diff_ids[{i}]", what) for i, item in enumerate(raw)
            )
    return config, platform, diff_ids


# ---- from the store --------------------------------------------------------------------------


def read_small_blob(store: BlobAccess, digest: str, kind: str) -> bytes:
    """Blob `digest` (a manifest, index or config) from the store, refused when too large."""
    size = store.size(digest)
    if size is None:
        raise ContentMissingError(f"{kind} {digest} is not in the blob store")
    if size > MAX_MANIFEST_SIZE:
        msg = f"{kind} {digest}: {size} bytes is larger than the {MAX_MANIFEST_SIZE} byte limit"
        raise ManifestError(msg)
    return store.read(digest)


def describe_image(
    store: BlobAccess,
    manifest_digest: str,
    *,
    platform_hint: Platform | None = None,
    media_type: str | None = None,
) -> ImageContent:
    """The `ImageContent` of manifest `manifest_digest`, whose blobs must all be in `store`.

    The platform is the config's own, or `platform_hint` (the index entry that chose this
    manifest) when the config names none. Every layer must be stored with its descriptor's
    size (`ContentMissingError` when absent, `ManifestError` when inconsistent); an uncompressed
    layer's digest must equal its diff_id. `media_type` (what the manifest was served as)
    must agree with the manifest's mediaType field when given.
    """
    validate_digest(manifest_digest)
    data = read_small_blob(store, manifest_digest, "manifest")
    manifest = parse_manifest(data, media_type, digest=manifest_digest)
    what = f"manifest {manifest_digest}"
    if manifest.config.media_type not in CONFIG_TYPES:
        msg = (
            f"{what}: config media type {manifest.config.media_type!r} is not an image config"
            f" (expected one of {list(CONFIG_TYPES)}): not a container image"
        )
        raise ManifestError(msg)
    config_digest = manifest.config.digest
    config_data = read_small_blob(store, config_digest, "config")
    if len(config_data) != manifest.config.size:
        msg = (
            f"{what}: config {config_digest} has {len(config_data)} bytes,"
            f" the manifest says {manifest.config.size}"
        )
        raise ManifestError(msg)
    config, platform, diff_ids = parse_config(config_data, config_digest)
    if len(diff_ids) != len(manifest.layers):
        msg = (
            f"{what}: {len(manifest.layers)} layers but config {config_digest} lists"
            f" {len(diff_ids)} rootfs.diff_ids"
        )
        raise ManifestError(msg)
    if not platform.os or not platform.architecture:
        if platform_hint is None:
            msg = f"{what}: config {config_digest} names no os/architecture and no hint was given"
            raise ManifestError(msg)
        platform = platform_hint
    layers: list[Layer] = []
    for position, (descriptor, diff_id) in enumerate(zip(manifest.layers, diff_ids, strict=True)):
        stored = store.size(descriptor.digest)
        if stored is None:
            msg = f"{what}: layer {position} blob {descriptor.digest} is not in the blob store"
            raise ContentMissingError(msg)
        if stored != descriptor.size:
            msg = (
                f"{what}: layer {position} blob {descriptor.digest} has {stored} bytes,"
                f" the manifest says {descriptor.size}"
            )
            raise ManifestError(msg)
        if descriptor.media_type in UNCOMPRESSED_LAYER_TYPES and diff_id != descriptor.digest:
            msg = (
                f"{what}: layer {position} is uncompressed ({descriptor.media_type}) but its"
                f" digest {descriptor.digest} differs from its diff_id {diff_id}"
            )
            raise ManifestError(msg)
        layers.append(
            Layer(
                blob_digest=descriptor.digest,
                media_type=descriptor.media_type,
                compressed_size_bytes=descriptor.size,
                diff_id=diff_id,
                position=position,
            )
        )
    return ImageContent(
        manifest_digest=manifest_digest,
        manifest_media_type=manifest.media_type,
        manifest_size=len(data),
        config=config,
        config_size=len(config_data),
        platform=platform,
        layers=tuple(layers),
    )


__all__ = [
    "ANNOTATION_CONTAINERD_NAME",
    "ANNOTATION_REF_NAME",
    "MAX_INDEX_DEPTH",
    "MAX_INDEX_ENTRIES",
    "MAX_LAYERS",
    "MAX_MANIFEST_SIZE",
    "BlobAccess",
    "Descriptor",
    "IndexEntry",
    "Manifest",
    "canonical_json",
    "choose_index_entry",
    "describe_image",
    "host_platform",
    "index_manifests",
    "layer_media_type",
    "parse_config",
    "parse_index",
    "parse_json",
    "parse_manifest",
    "parse_platform",
    "read_small_blob",
]


_MACHINES = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i686": ("386", None),
    "i386": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}


def host_platform() -> Platform:
    """This host's platform as OCI spells it, for linux images (the default a runtime wants)."""
    import platform  # only the default platform needs it: a query does not load it

    machine = platform.machine().lower()
    architecture, variant = _MACHINES.get(machine, (machine, None))
    return Platform("linux", architecture, variant)


_PLATFORM_PART: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")


def parse_platform(text: str) -> Platform:
    """``os/arch[/variant]``, e.g. ``linux/arm64/v8``.

    Each part is what OCI uses (letters, digits, ``.``, ``_``, ``-``; at most 64): the text
    comes from a command line, and whitespace or a control character would only ever match
    nothing and then be printed back raw in the "not found" message.
    """
    if not isinstance(text, str):
        raise InvalidPlatformError(f"invalid platform {text!r}: a platform is a string")
    parts = text.split("/", 3)
    if len(parts) not in (2, 3) or not all(_PLATFORM_PART.fullmatch(part) for part in parts):
        shown = repr(text) if len(text) <= 100 else f"{text[:100]!r}... ({len(text)} characters)"
        msg = f"invalid platform {shown}: expected os/arch[/variant], e.g. linux/arm64"
        raise InvalidPlatformError(msg)
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)
