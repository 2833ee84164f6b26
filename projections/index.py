"""The OCI image layout's ``index.json`` as a projection of the views.

The cache home is itself an OCI image layout: every cached reference is one manifest entry,
named by its canonical reference in ``org.opencontainers.image.ref.name`` (so
``skopeo inspect oci:$HOME:docker.io/library/alpine:3.19`` finds it). Sorted by reference and
serialised canonically, so the same views always give the same bytes.

Each reference's entry is kept in the views as the JSON bytes it contributes (`index_entry`,
folded with the event that names the reference), so writing the index joins ready bytes in
key order: no manifest is read or decoded, and no JSON is built for 10,000 references to
write one file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from json.encoder import encode_basestring_ascii as _string
from typing import Any

from imageledger.domain.model import OCI_INDEX, ImageContent

REF_NAME = "org.opencontainers.image.ref.name"
POSITION = "io.imageledger.position"


def _json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def index_entry(reference: str, content: ImageContent) -> bytes:
    """The descriptor of `reference`'s manifest in index.json, as canonical JSON bytes: what
    ``json.dumps(entry, sort_keys=True, separators=(",", ":"))`` gives, written out directly
    (keys in sorted order, strings through json's own C escaper): every pull folds one, and
    json.dumps cost a fifth of a replay."""
    platform = content.platform
    variant = f',"variant":{_string(platform.variant)}' if platform.variant else ""
    return (
        f'{{"annotations":{{"{REF_NAME}":{_string(reference)}}},'
        f'"digest":{_string(content.manifest_digest)},'
        f'"mediaType":{_string(content.manifest_media_type)},'
        f'"platform":{{"architecture":{_string(platform.architecture)},'
        f'"os":{_string(platform.os)}{variant}}},'
        f'"size":{int(content.manifest_size)}}}'
    ).encode()


def oci_index(entries: Iterable[bytes], shown: int) -> bytes:
    """index.json from the entries in reference order: the same bytes as
    ``json.dumps(index, sort_keys=True, separators=(",", ":"))`` of the whole document.
    `shown` is the last position that changed what it shows (not the ledger's head: a use or
    a release changes nothing here, so it must not need a rewrite)."""
    head = _json({"annotations": {POSITION: str(shown)}})[:-1]  # without the closing brace
    tail = _json({"mediaType": OCI_INDEX, "schemaVersion": 2})[1:]  # without the opening one
    return b"".join((head, b',"manifests":[', b",".join(entries), b"],", tail))
