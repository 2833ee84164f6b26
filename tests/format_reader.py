"""A reader of an imageledger home's history written only from docs/FORMAT.md: LMDB and
MessagePack, nothing of imageledger. `tests/test_format.py` compares what it reads with what
the API answers; if the two ever disagree, either the code or FORMAT.md is wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lmdb
import msgpack

EVENT_FIELDS = {
    "Started": [],
    "ImagePulled": ["reference", "source", "content", "cached"],
    "ImageTagged": ["reference", "source_reference", "content"],
    "PullFailed": ["reference", "source", "error"],
    "ImageUsed": ["reference", "manifest_digest", "holder"],
    "HolderReleased": ["holder", "leases"],
    "ImageRemoved": ["reference", "manifest_digest", "forced", "deleted", "bytes_reclaimed"],
    "RemoveRefused": ["reference", "manifest_digest", "holders"],
    "ImagesPruned": ["policy", "now", "references", "deleted", "bytes_reclaimed"],
    # erofs, fsmeta, vmdk: [path in the home, digest, size]
    "LayerMaterialized": [
        "reference",
        "manifest_digest",
        "blob_digest",
        "diff_id",
        "erofs",
        "materializer",
    ],
    "ImageStitched": ["reference", "manifest_digest", "fsmeta", "vmdk", "layers", "materializer"],
}
OPTIONAL_FIELDS = {"ImagePulled": ["endpoints"]}  # trailing, present only when non-empty
CONFIG_FIELDS = ["digest", "env", "cmd", "entrypoint", "working_dir", "user", "labels", "stop"]


def read_history(ledger: Path) -> list[dict[str, Any]]:
    """Every event of the ledger at `ledger` (a home's ``ledger/``), in position order, as
    plain dicts: position, type, at, actor, and the type's fields by name, with each
    ImagePulled's config resolved to its full form."""
    env = lmdb.open(str(ledger), readonly=True, lock=False, max_dbs=64)
    try:
        with env.begin() as txn:
            formats = env.open_db(b"imageledger.format", txn=txn, create=False)
            if txn.get(b"version", db=formats) != b"2":
                raise ValueError("not a format 2 ledger")
            log = env.open_db(b"imageledger.log", txn=txn, create=False)
            configs: dict[str, dict[str, Any]] = {}
            events = []
            for key, value in txn.cursor(db=log):
                _id, _version, kind, state = msgpack.unpackb(value)
                fields = msgpack.unpackb(state, timestamp=3)
                user, uid, pid, host, _version = fields[1]
                event = {
                    "position": int.from_bytes(key, "big"),
                    "type": kind,
                    "at": fields[0],
                    "actor": {
                        "user": user,
                        "uid": uid,
                        "pid": pid,
                        "host": host,
                        "version": _version,
                    },
                }
                names = EVENT_FIELDS[kind]
                optional = OPTIONAL_FIELDS.get(kind, [])
                assert 2 + len(names) <= len(fields) <= 2 + len(names) + len(optional), (
                    kind,
                    len(fields),
                )
                names = names + optional[: len(fields) - 2 - len(names)]
                event.update(zip(names, fields[2:], strict=True))
                if kind in ("ImagePulled", "ImageTagged"):
                    event["content"] = _content(event["content"], configs)
                events.append(event)
            return events
    finally:
        env.close()


def _content(array: list[Any], configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    digest, media_type, size, config, config_size, platform, layers = array
    if isinstance(config, str):
        config = configs[config]  # carried in full by an earlier event
    else:
        config = dict(zip(CONFIG_FIELDS, config, strict=True))
        configs[config["digest"]] = config
    return {
        "manifest_digest": digest,
        "manifest_media_type": media_type,
        "manifest_size": size,
        "config": config,
        "config_size": config_size,
        "platform": {"os": platform[0], "architecture": platform[1], "variant": platform[2]},
        "layers": [
            {
                "blob_digest": layer[0],
                "media_type": layer[1],
                "compressed_size_bytes": layer[2],
                "diff_id": layer[3],
                "position": layer[4],
            }
            for layer in layers
        ],
    }
