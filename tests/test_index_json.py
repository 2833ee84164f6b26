"""index.json's entries are written out directly (not through json.dumps, which cost a fifth
of a replay): they must be exactly the canonical JSON json.dumps would give, whatever the
strings hold."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from imageledger.domain.model import ImageConfig, ImageContent, Platform
from imageledger.projections.index import REF_NAME, index_entry, oci_index

_text = st.text(max_size=40)


@settings(max_examples=500, deadline=None)
@given(_text, _text, _text, st.integers(0, 2**62), _text, _text, st.none() | _text)
def test_an_entry_is_the_canonical_json_of_its_descriptor(
    reference: str, digest: str, media_type: str, size: int, os: str, arch: str, variant: str | None
) -> None:
    content = ImageContent(
        digest, media_type, size, ImageConfig("d"), 1, Platform(os, arch, variant), ()
    )
    platform = {"architecture": arch, "os": os} | ({"variant": variant} if variant else {})
    descriptor = {
        "mediaType": media_type,
        "digest": digest,
        "size": size,
        "platform": platform,
        "annotations": {REF_NAME: reference},
    }
    expected = json.dumps(descriptor, sort_keys=True, separators=(",", ":")).encode()
    assert index_entry(reference, content) == expected
    index = oci_index([expected, expected], 7)
    assert index == json.dumps(json.loads(index), sort_keys=True, separators=(",", ":")).encode()
    assert json.loads(index)["manifests"] == [descriptor, descriptor]
