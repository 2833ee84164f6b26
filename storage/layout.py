"""What lives where in a home: the one place its names are spelled.

imageledger-home        the marker: this directory is an imageledger home
ledger/                 LMDB: the event log and the views
oci-layout, index.json  the home is an OCI image layout; index.json is a projection
index.position          the position of the views index.json shows; index.lock
blobs/<alg>/<hex>       verified content
tmp/<lease>/            an in-flight pull's or load's work directory (partial files)
tmp/leases/<id>.lease   in-flight leases; tmp/locks/ per-blob download locks
artifacts/layers/<hex>.erofs      a layer blob's EROFS image (named by the blob's digest)
artifacts/images/<hex>.fsmeta     a manifest's fsmeta (its merged tree, metadata only)
artifacts/images/<hex>.vmdk       its VMDK descriptor (fsmeta then the layers, absolute paths)
audit/signer.key        the audit log's signing key (0600 in a 0700 directory)
replayed-bundle.json    a home made by `replay-bundle` (the bundle's manifest): read only
store.lock              serialises deletes against pull commits across processes
rebuild.lock            one rebuild of the views at a time
"""

from __future__ import annotations

from typing import Final

MARKER: Final = "imageledger-home"
LEDGER: Final = "ledger"
# While `imageledger migrate` runs: the new ledger it writes, and the old one once replaced
# (both gone when it succeeds).
LEDGER_MIGRATING: Final = "ledger.migrating"
LEDGER_FORMAT1: Final = "ledger.format1"
OCI_LAYOUT: Final = "oci-layout"
INDEX: Final = "index.json"
INDEX_POSITION: Final = "index.position"
INDEX_LOCK: Final = "index.lock"
BLOBS: Final = "blobs"
TMP: Final = "tmp"
LEASES: Final = "leases"  # under tmp/
LOCKS: Final = "locks"  # under tmp/
ARTIFACTS: Final = "artifacts"
AUDIT: Final = "audit"
AUDIT_KEY: Final = "signer.key"  # under audit/
REPLAYED: Final = "replayed-bundle.json"
STORE_LOCK: Final = "store.lock"
REBUILD_LOCK: Final = "rebuild.lock"

# Every name imageledger itself puts at the top of a home (a home made before the marker
# existed is recognised by holding nothing else).
OWN_NAMES: Final = frozenset(
    {
        MARKER,
        LEDGER,
        LEDGER_MIGRATING,
        LEDGER_FORMAT1,
        BLOBS,
        TMP,
        ARTIFACTS,
        AUDIT,
        REPLAYED,
        OCI_LAYOUT,
        INDEX,
        INDEX_POSITION,
        INDEX_LOCK,
        STORE_LOCK,
        REBUILD_LOCK,
    }
)
# imageledger's own directories in tmp/, beside the work directories of leases.
TMP_OWN: Final = frozenset({LEASES, LOCKS})


ARTIFACT_LAYERS: Final = "layers"  # under artifacts/
ARTIFACT_IMAGES: Final = "images"  # under artifacts/
EROFS_SUFFIX: Final = ".erofs"
FSMETA_SUFFIX: Final = ".fsmeta"
VMDK_SUFFIX: Final = ".vmdk"


def layer_artifact(blob_digest: str) -> str:
    """Where the EROFS image of layer blob `blob_digest` (a validated digest) goes, as a
    path in the home: by the blob's digest, so that the blob and its image go together."""
    return f"{ARTIFACTS}/{ARTIFACT_LAYERS}/{blob_digest.partition(':')[2]}{EROFS_SUFFIX}"


def image_artifact(manifest_digest: str, suffix: str) -> str:
    """Where manifest `manifest_digest`'s fsmeta or VMDK (`suffix`) goes, as a path in the
    home."""
    return f"{ARTIFACTS}/{ARTIFACT_IMAGES}/{manifest_digest.partition(':')[2]}{suffix}"


def work_dir(lease: str) -> str:
    """The work directory of in-flight lease `lease`, as a path in the home."""
    return f"{TMP}/{lease}"
