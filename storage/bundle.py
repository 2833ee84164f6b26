"""Debug bundles: a home's log and what it ran on, packed so that a bug can be replayed on
another machine (issue 12: `imageledger debug-bundle`, `imageledger replay-bundle`).

A bundle is a gzip-compressed tar of two regular files, in this order:

- ``bundle.json``: ``format`` (`FORMAT`), ``created_at``, ``events`` (how many records),
  ``log_sha256`` (of ``log.records`` as stored in the tar), ``ledger_format`` and
  ``views_format``, ``views`` (each live view table's digest, as `rebuild` reports them),
  ``versions`` (imageledger, Python and the libraries that read and write the ledger),
  ``platform``, and ``configuration``: the environment that configures imageledger with
  every secret removed (`configuration`).
- ``log.records``: the log's stored records, exactly as the ledger stores them
  (docs/FORMAT.md), in position order from 1, each after its length (4 bytes, big endian).

The log carries no secret by design (events never hold credentials), so the records go as
they are; a replay stores the same bytes at the same positions and checks it did.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
import secrets
import struct
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import IO, Any, Final

from imageledger.domain.errors import BundleError
from imageledger.storage.redact import clip, without_credentials

FORMAT: Final = "imageledger-debug-bundle/1"
MANIFEST: Final = "bundle.json"
LOG: Final = "log.records"
_LENGTH: Final = struct.Struct(">I")
_MAX_MANIFEST: Final = 1 << 20
_MAX_RECORD: Final = 64 << 20  # far above any event's record (a config is a few KiB)

# What configures imageledger: its own variables, LMDB's, where credentials and registry
# configuration are read from, proxies and CA bundles. Nothing else of the environment goes.
_CONFIG: Final = re.compile(
    r"(?i)^(IMAGELEDGER_\w+|LMDB_\w+|REGISTRY_AUTH_FILE|CONTAINERS_\w+|DOCKER_CONFIG"
    r"|XDG_CONFIG_HOME|XDG_RUNTIME_DIR|SSL_CERT_FILE|SSL_CERT_DIR|(HTTPS?|ALL|NO)_PROXY)$"
)
# A variable so named holds a secret (or names where one is): its value never goes.
_SECRET: Final = re.compile(r"(?i)(PASSWORD|PASSWD|TOKEN|SECRET|CREDENTIAL|AUTH|KEY|USER)")
REDACTED: Final = "<redacted>"


def configuration(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of `environ` that configure imageledger, each secret removed: values of
    variables named like a secret (a password, a token, a key, a user, an auth file) are
    `REDACTED` whole, and every other value loses the user info and query of any URL in it
    (a proxy URL may carry a password)."""
    return {
        name: REDACTED if _SECRET.search(name) else without_credentials(value)
        for name, value in sorted(environ.items())
        if _CONFIG.match(name)
    }


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("imageledger", "eventsourcing", "lmdb", "msgpack", "zstandard"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "absent"
    return found


def host_platform() -> dict[str, str]:
    uname = platform.uname()
    return {"system": uname.system, "release": uname.release, "machine": uname.machine}


def write_bundle(
    out: Path, manifest: dict[str, Any], records: Iterable[tuple[int, bytes]]
) -> dict[str, Any]:
    """Write the bundle of `records` (position, stored record; positions 1, 2, ...) and
    `manifest` (the fields above but ``format``, ``events`` and ``log_sha256``, added here) to
    `out`, through a temporary file beside it renamed into place: a failure leaves no half
    bundle. The records are spooled to a temporary file first (a tar member's size precedes
    its bytes), so memory stays flat in the log's length. Returns the manifest written."""
    digest = hashlib.sha256()
    count = 0
    with tempfile.TemporaryFile(prefix="imageledger-bundle-") as spool:
        for position, record in records:
            if position != count + 1:
                msg = f"the log skips from position {count} to {position}"
                raise BundleError(msg)
            frame = _LENGTH.pack(len(record)) + record
            spool.write(frame)
            digest.update(frame)
            count = position
        size = spool.tell()
        spool.seek(0)
        manifest = {
            "format": FORMAT,
            **manifest,
            "events": count,
            "log_sha256": digest.hexdigest(),
        }
        header = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
        # A fresh name, created exclusively: a link or file planted at a predictable name is
        # never written through (as `save -o` does: storage.archivesave).
        partial = out.with_name(f".{out.name}.{secrets.token_hex(4)}.partial")
        try:
            raw_file = partial.open("xb")
        except OSError as e:
            msg = f"cannot write the bundle {out}: {e.strerror or e}"
            raise BundleError(msg) from None
        try:
            with raw_file as raw:
                with tarfile.open(fileobj=raw, mode="w:gz") as tar:
                    tar.addfile(_member(MANIFEST, len(header)), io.BytesIO(header))
                    tar.addfile(_member(LOG, size), spool)
                raw.flush()  # the tar's end and gzip's trailer are written when it closes
                os.fsync(raw.fileno())
            partial.replace(out)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    return manifest


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0  # the same log makes the same bundle
    return info


class BundleReader:
    """A bundle being read: `manifest` at once, then `records()` once, streamed. A bundle
    whose members, framing, count or digest are not what its manifest says is a
    `BundleError`, raised at the latest when `records()` ends: a replay that consumed the
    records must treat that as failure (`replay-bundle` removes the home it was making)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file: IO[bytes] = path.open("rb")
        except OSError as e:
            msg = f"{path}: cannot read the bundle ({e.strerror or e})"
            raise BundleError(msg) from e
        try:
            try:
                self._tar = tarfile.open(fileobj=self._file, mode="r|gz")  # noqa: SIM115
            except (tarfile.TarError, OSError, EOFError) as e:
                msg = f"{path}: not a debug bundle ({clip(e)})"
                raise BundleError(msg) from e
            self.manifest = self._read_manifest()
        except BaseException:
            self.close()
            raise

    def _next(self, name: str) -> tarfile.TarInfo:
        try:
            member = self._tar.next()
        except (tarfile.TarError, OSError, EOFError) as e:
            msg = f"{self.path}: not a debug bundle ({clip(e)})"
            raise BundleError(msg) from e
        if member is None or member.name != name or not member.isreg():
            found = "nothing" if member is None else repr(clip(member.name, 60))
            msg = f"{self.path}: not a debug bundle ({found} where {name} should be)"
            raise BundleError(msg)
        return member

    def _read_manifest(self) -> dict[str, Any]:
        member = self._next(MANIFEST)
        if member.size > _MAX_MANIFEST:
            msg = f"{self.path}: its {MANIFEST} is over {_MAX_MANIFEST} bytes"
            raise BundleError(msg)
        data = self._extract(member).read()
        try:
            manifest = json.loads(data)
        except ValueError as e:
            msg = f"{self.path}: its {MANIFEST} is not JSON ({clip(e, 80)})"
            raise BundleError(msg) from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            msg = f"{self.path}: a bundle of format {clip(found, 60)!r}, not {FORMAT}"
            raise BundleError(msg)
        events, digest = manifest.get("events"), manifest.get("log_sha256")
        if type(events) is not int or events < 0 or not isinstance(digest, str):
            msg = f"{self.path}: its {MANIFEST} lacks the log's count or digest"
            raise BundleError(msg)
        return manifest

    def _extract(self, member: tarfile.TarInfo) -> IO[bytes]:
        stream = self._tar.extractfile(member)
        assert stream is not None  # a regular file
        return stream

    def records(self) -> Iterator[tuple[int, bytes]]:
        stream = self._extract(self._next(LOG))
        digest = hashlib.sha256()
        position = 0
        try:
            while header := stream.read(_LENGTH.size):
                (length,) = _LENGTH.unpack(header.rjust(_LENGTH.size, b"\0"))
                record = stream.read(length) if length <= _MAX_RECORD else b""
                if len(header) != _LENGTH.size or len(record) != length or not length:
                    msg = f"{self.path}: {LOG} is cut or damaged after record {position}"
                    raise BundleError(msg)
                digest.update(header + record)
                position += 1
                yield position, record
        except (tarfile.TarError, OSError, EOFError) as e:
            msg = f"{self.path}: {LOG} cannot be read after record {position} ({clip(e)})"
            raise BundleError(msg) from e
        if position != self.manifest["events"] or digest.hexdigest() != self.manifest["log_sha256"]:
            msg = (
                f"{self.path}: {LOG} holds {position} records whose digest is not the one"
                f" {MANIFEST} gives ({self.manifest['events']} records)"
            )
            raise BundleError(msg)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def created_at() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")
