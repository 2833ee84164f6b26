"""The OCI image layout's ``index.json`` as a projection of the views.

The cache home is itself an OCI image layout: every cached reference is one manifest entry,
named by its canonical reference in ``org.opencontainers.image.ref.name`` (so
``skopeo inspect oci:$HOME:docker.io/library/alpine:3.19`` finds it). Sorted by reference and
serialised canonically, so the same views always give the same bytes.
"""

from __future__ import annotations

import json
from typing import Any

from imageledger.domain.model import OCI_INDEX, ManifestRecord
from imageledger.projections.views import ViewState

REF_NAME = "org.opencontainers.image.ref.name"
POSITION = "io.imageledger.position"


def oci_index(state: ViewState) -> bytes:
    entries: list[dict[str, Any]] = []
    # One read per manifest, not per reference: a manifest row lists all its references, so
    # reading it again for each of N aliases would make one index write O(N^2).
    manifests: dict[str, ManifestRecord | None] = {}
    for record in sorted(state.references(), key=lambda r: r.reference):
        digest = record.manifest_digest
        if digest not in manifests:
            manifests[digest] = state.manifest(digest)
        manifest = manifests[digest]
        if manifest is None:
            continue
        content = manifest.content
        platform: dict[str, str] = {
            "architecture": content.platform.architecture,
            "os": content.platform.os,
        }
        if content.platform.variant:
            platform["variant"] = content.platform.variant
        entries.append(
            {
                "mediaType": content.manifest_media_type,
                "digest": content.manifest_digest,
                "size": content.manifest_size,
                "platform": platform,
                "annotations": {REF_NAME: record.reference},
            }
        )
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": entries,
        # The last position that changed what this shows (not the ledger's head: a use or a
        # release changes nothing here, so it must not need a rewrite).
        "annotations": {POSITION: str(state.shown)},
    }
    return json.dumps(index, sort_keys=True, separators=(",", ":")).encode()
