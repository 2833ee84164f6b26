"""The ledger as a transparency log (issue 11): the tree kept with the log, signed checkpoints,
verification that finds a flipped byte, a deleted or reordered event and a rewritten history,
proofs that RFC 9162 verifiers accept, and a key that never leaks.

Damage is made the way an attacker with the files would make it: by editing the LMDB file
directly (the cache closed), never through imageledger.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import lmdb
import pytest

from imageledger import (
    AuditKeyError,
    AuditVerificationError,
    ImageCache,
)
from imageledger.domain import merkle, note
from imageledger.tools.imagebuild import ImageSpec, build_docker_archive

LOG_DB = b"imageledger.log"
_U64 = struct.Struct(">Q")


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    spec = ImageSpec(layers=({"etc/app": b"app\n"},), names=("audit/app:1", "audit/app:2"))
    return build_docker_archive(tmp_path / "app.tar", [spec]).path


def _fill(home: Path, archive: Path, uses: int = 20) -> None:
    with ImageCache(home, audit_interval=3600) as cache:
        cache.load(archive)
        for i in range(uses):
            cache.use("audit/app:1", f"sandbox-{i}")
            if i % 3 == 0:
                cache.release(f"sandbox-{i}")


def _records(home: Path) -> list[bytes]:
    env = lmdb.open(str(home / "ledger"), max_dbs=64, readonly=True, lock=False)
    try:
        db = env.open_db(LOG_DB, create=False)
        with env.begin(db=db) as txn:
            return [bytes(v) for _k, v in txn.cursor()]
    finally:
        env.close()


def _edit_log(home: Path, edit: Callable[[Any, Any], object]) -> None:
    """Run `edit(txn, db)` on the home's log in a write transaction (the cache closed)."""
    env = lmdb.open(str(home / "ledger"), max_dbs=64)
    try:
        db = env.open_db(LOG_DB, create=False)
        with env.begin(write=True, db=db) as txn:
            edit(txn, db)
    finally:
        env.close()


def cli(
    home: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imageledger.tools.cli", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


# ---------------------------------------------------------------- the tree and checkpoints


def test_the_tree_covers_every_stored_record_and_checkpoints_verify(
    tmp_path: Path, archive: Path
) -> None:
    home = tmp_path / "home"
    _fill(home, archive)
    records = _records(home)
    with ImageCache(home) as cache:
        signed = cache.audit.checkpoint()
        assert signed.size == len(records)
        # The root is RFC 9162's MTH over the stored records exactly (a naive recomputation).
        assert signed.root == _naive_root([merkle.leaf_hash(r) for r in records])
        verifier = note.Verifier.from_string(cache.audit.verifier_key())
        checkpoint = note.Checkpoint.parse(note.verify(signed.note, verifier))
        assert (checkpoint.origin, checkpoint.size, checkpoint.root) == (
            signed.origin,
            len(records),
            signed.root,
        )
        assert verifier.name == signed.origin
        # Nothing appended since: the same checkpoint, not a new one.
        again = cache.audit.checkpoint()
        assert (again.new, again.note) == (False, signed.note)
        report = cache.audit.verify()
        assert report.events == len(records) and report.root == signed.root
        assert report.checkpoints >= 1
        assert cache.rebuild(verify=True).identical


def _naive_root(leaves: list[bytes]) -> bytes:
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return merkle.node_hash(_naive_root(leaves[:k]), _naive_root(leaves[k:]))


def test_proofs_are_what_rfc_9162_verifiers_accept(tmp_path: Path, archive: Path) -> None:
    home = tmp_path / "home"
    _fill(home, archive, uses=40)
    records = _records(home)
    with ImageCache(home) as cache:
        signed = cache.audit.checkpoint()
        for position in (1, 2, len(records) // 2, len(records)):
            proof = cache.audit.prove_inclusion(position)
            assert proof["tree_size"] == signed.size
            assert proof["leaf_hash"] == merkle.leaf_hash(records[position - 1]).hex()
            assert proof["root_hash"] == signed.root.hex()
            merkle.verify_inclusion(
                proof["leaf_index"],
                proof["tree_size"],
                bytes.fromhex(proof["leaf_hash"]),
                [bytes.fromhex(h) for h in proof["hashes"]],
                signed.root,
            )
        first = 5
        proof = cache.audit.prove_consistency(first)
        assert (
            proof["first_root"] == _naive_root([merkle.leaf_hash(r) for r in records[:first]]).hex()
        )
        merkle.verify_consistency(
            first,
            signed.size,
            [bytes.fromhex(h) for h in proof["hashes"]],
            bytes.fromhex(proof["first_root"]),
            signed.root,
        )
    done = cli(home, "audit", "prove", "--event", "3")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["leaf_index"] == 2
    for bad in (["--event", "0"], ["--event", str(len(records) + 5)], []):
        done = cli(home, "audit", "prove", *bad)
        assert done.returncode == 2, (bad, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_every_appending_command_signs_before_it_exits(tmp_path: Path, archive: Path) -> None:
    home = tmp_path / "home"
    assert cli(home, "load", str(archive)).returncode == 0
    assert cli(home, "use", "audit/app:1", "--holder", "s1").returncode == 0
    size = len(_records(home))
    with ImageCache(home) as cache, cache_state(cache) as state:
        assert state.last_checkpoint()[0] == size
    key = cli(home, "audit", "key")
    assert key.returncode == 0
    [line] = key.stdout.splitlines()
    assert note.Verifier.from_string(line).name.startswith("imageledger.invalid/")


def test_an_embedder_signs_at_most_once_per_interval(tmp_path: Path, archive: Path) -> None:
    home = tmp_path / "home"
    with ImageCache(home, audit_interval=3600) as cache:
        cache.load(archive)
        for i in range(30):
            cache.use("audit/app:1", f"s{i}")
        with cache_state(cache) as state:
            assert len(state.checkpoints()) == 1  # the first append's
    with ImageCache(home, audit_interval=0) as cache:
        for i in range(5):
            cache.use("audit/app:1", f"t{i}")
        with cache_state(cache) as state:
            assert len(state.checkpoints()) == 1 + 5


def cache_state(cache: ImageCache) -> AbstractContextManager[Any]:
    return cache.audit.log.audit_state()


# ---------------------------------------------------------------- damage is found


def _verify_fails(home: Path, where: str) -> str:
    with ImageCache(home) as cache, pytest.raises(AuditVerificationError) as caught:
        cache.audit.verify()
    assert where in str(caught.value), str(caught.value)
    done = cli(home, "audit", "verify")
    assert done.returncode == 5, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert where in line and "Traceback" not in done.stderr
    return line


@pytest.mark.parametrize("offset", [-1, 20])
def test_a_flipped_byte_in_a_stored_event_is_found_at_its_position(
    tmp_path: Path, archive: Path, offset: int
) -> None:
    home = tmp_path / "home"
    _fill(home, archive)
    with ImageCache(home) as cache:
        cache.audit.checkpoint()
    position = 9

    def flip(txn: lmdb.Transaction, db: object) -> None:
        key = _U64.pack(position)
        found = txn.get(key)
        assert found is not None
        value = bytearray(found)
        value[offset] ^= 0x01
        txn.put(key, bytes(value))

    _edit_log(home, flip)
    _verify_fails(home, f"position {position}")


def test_a_deleted_event_is_found(tmp_path: Path, archive: Path) -> None:
    home = tmp_path / "home"
    _fill(home, archive)
    _edit_log(home, lambda txn, db: txn.delete(_U64.pack(7)))
    _verify_fails(home, "position 7")


def test_reordered_events_are_found_at_the_first(tmp_path: Path, archive: Path) -> None:
    home = tmp_path / "home"
    _fill(home, archive)

    def swap(txn: lmdb.Transaction, db: object) -> None:
        a, b = txn.get(_U64.pack(6)), txn.get(_U64.pack(11))
        assert a is not None and b is not None
        txn.put(_U64.pack(6), b)
        txn.put(_U64.pack(11), a)

    _edit_log(home, swap)
    _verify_fails(home, "position 6")


def test_a_log_truncated_and_extended_again_is_never_signed_and_fails_verify(
    tmp_path: Path, archive: Path
) -> None:
    """The attacker rewrites history consistently: deletes the tail, rebuilds views and tree
    from what is left, and appends again. The new log agrees with itself; only the signed
    checkpoint can tell, and it does."""
    home = tmp_path / "home"
    _fill(home, archive)
    with ImageCache(home) as cache:
        signed = cache.audit.checkpoint()
    keep = signed.size - 5

    def truncate(txn: lmdb.Transaction, db: object) -> None:
        for position in range(keep + 1, signed.size + 1):
            txn.delete(_U64.pack(position))

    _edit_log(home, truncate)
    # ... and the log's aggregate index, so that the versions can be taken again.
    env = lmdb.open(str(home / "ledger"), max_dbs=64)
    try:
        index = env.open_db(b"imageledger.log.index", create=False)
        with env.begin(write=True, db=index) as txn:
            doomed = [k for k, v in txn.cursor() if _U64.unpack(v)[0] > keep]
            for key in doomed:
                txn.delete(key)
    finally:
        env.close()
    with ImageCache(home, audit_interval=3600) as cache:
        cache.rebuild()  # views and tree from what is left
        for i in range(8):  # longer than before, so the size alone does not tell
            cache.use("audit/app:2", f"forged-{i}")
        with pytest.raises(AuditVerificationError, match=r"not an extension|not the one signed"):
            cache.audit.checkpoint()
    done = cli(home, "audit", "checkpoint")
    assert done.returncode == 5 and "not signed again" in done.stderr
    _verify_fails(home, f"checkpoint at size {signed.size}")


def test_a_checkpoint_signed_by_another_key_fails_verify(tmp_path: Path, archive: Path) -> None:
    home = tmp_path / "home"
    _fill(home, archive)
    other = note.generate_signer("someone.example/log")
    done = cli(home, "audit", "verify", "--key", other.verifier().to_string())
    assert done.returncode == 5, done.stderr
    assert "does not verify" in done.stderr


def test_an_old_ledger_without_a_tree_catches_up_when_opened(tmp_path: Path, archive: Path) -> None:
    home = tmp_path / "home"
    _fill(home, archive)
    env = lmdb.open(str(home / "ledger"), max_dbs=64)
    try:
        for name in (b"imageledger.tiles", b"imageledger.audit", b"imageledger.checkpoints"):
            db = env.open_db(name, create=False)
            with env.begin(write=True) as txn:
                txn.drop(db, delete=True)
    finally:
        env.close()
    shutil.rmtree(home / "audit")  # a home made before the audit log had no key either
    events = len(_records(home))
    with ImageCache(home) as cache:  # opening it gives it its tree
        report = cache.audit.verify()
        assert (report.events, report.checkpoints) == (events, 0)
        assert len(list(cache.audit.events())) == events
        cache.use("audit/app:1", "late")
        report = cache.audit.verify()
        assert (report.events, report.checkpoints) == (events + 1, 1)
        assert cache.rebuild(verify=True).identical


# ---------------------------------------------------------------- the key


def _key_file(home: Path) -> Path:
    return home / "audit" / "signer.key"


def test_the_key_is_made_0600_and_never_printed(tmp_path: Path, archive: Path) -> None:
    home = tmp_path / "home"
    _fill(home, archive)
    key = _key_file(home)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    secret = key.read_text().strip()
    assert secret.startswith("PRIVATE+KEY+")
    seed = secret.rsplit("+", 1)[1]
    outputs = []
    for args in (
        ("audit", "key"),
        ("audit", "checkpoint", "--json"),
        ("audit", "verify", "--json"),
        ("audit", "prove", "--event", "1"),
        ("history", "--json"),
        ("audit", "verify", "--key", "x+y+z"),
    ):
        done = cli(home, *args, env={"IMAGELEDGER_LOG_LEVEL": "debug"})
        outputs += [done.stdout, done.stderr]
    for text in outputs:
        assert secret not in text and seed not in text and "PRIVATE+KEY" not in text


def test_a_key_others_may_read_is_refused(tmp_path: Path, archive: Path) -> None:
    home = tmp_path / "home"
    _fill(home, archive)
    _key_file(home).chmod(0o644)
    with ImageCache(home) as cache, pytest.raises(AuditKeyError, match="chmod 600"):
        cache.audit.checkpoint()
    done = cli(home, "use", "audit/app:1", "--holder", "after")
    assert done.returncode == 0  # the use is committed; the signature is what is refused
    assert "no checkpoint signed" in done.stderr


def test_an_operator_key_file_is_used_and_a_key_for_another_log_refused(
    tmp_path: Path, archive: Path
) -> None:
    home = tmp_path / "home"
    with ImageCache(home) as cache:
        origin = cache.audit.log.origin()
    operator = tmp_path / "keys" / "log.key"
    operator.parent.mkdir()
    signer = note.generate_signer(origin)
    operator.write_text(signer.to_string() + "\n")
    env = {"IMAGELEDGER_AUDIT_KEY": str(operator)}
    assert cli(home, "load", str(archive), env=env).returncode == 0
    key = cli(home, "audit", "key", env=env)
    assert key.stdout.strip() == signer.verifier().to_string()
    assert not _key_file(home).exists()
    assert cli(home, "audit", "verify", "--key", key.stdout.strip()).returncode == 0
    operator.write_text(note.generate_signer("other.example/log").to_string() + "\n")
    done = cli(home, "audit", "checkpoint", env=env)
    assert done.returncode == 1 and "is for the log" in done.stderr
    assert "PRIVATE" not in done.stderr


def test_malformed_keys_are_one_line_and_exit_2(tmp_path: Path, archive: Path) -> None:
    home = tmp_path / "home"
    _fill(home, archive)
    for bad in ("", "a+b", "name+12345678+AAAA", "PRIVATE+KEY+x+00000000+AAAA"):
        done = cli(home, "audit", "verify", "--key", bad)
        assert done.returncode == 2, (bad, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_a_key_that_cannot_be_made_never_fails_the_command_it_follows(
    tmp_path: Path, archive: Path
) -> None:
    """A file planted where the key's directory belongs: the use is committed and answered,
    the signature is refused (a warning), and the damage is named, not obeyed."""
    home = tmp_path / "home"
    assert cli(home, "load", str(archive)).returncode == 0
    shutil.rmtree(home / "audit")
    (home / "audit").write_text("not a directory\n")
    with ImageCache(home) as cache:
        cache.use("audit/app:1", "api")  # signs on its first append: refused, not raised
    done = cli(home, "use", "audit/app:1", "--holder", "cli")
    assert done.returncode == 0, done.stderr
    assert "no checkpoint signed" in done.stderr and "not a directory" in done.stderr
    assert (home / "audit").read_text() == "not a directory\n"


def test_the_jsonl_export_is_every_event_then_a_checkpoint_that_covers_it(
    tmp_path: Path, archive: Path
) -> None:
    """Each line is a stored record's fields as FORMAT.md names them, with its leaf hash; the
    last line is a signed checkpoint under which every exported leaf is provably included."""
    home = tmp_path / "home"
    _fill(home, archive, uses=6)
    records = _records(home)
    with ImageCache(home) as cache:
        history = [(h.position, h.event) for h in cache.history()]
        key = cache.audit.verifier_key()
    done = cli(home, "audit", "export", "--jsonl")
    assert done.returncode == 0, done.stderr
    *lines, last = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(x["position"], x["type"]) for x in lines] == history
    assert [x["leaf_hash"] for x in lines] == [merkle.leaf_hash(r).hex() for r in records]
    pulled = next(x for x in lines if x["type"] == "ImagePulled")
    assert pulled["reference"] == "docker.io/audit/app:1"
    assert pulled["content"]["manifest_digest"].startswith("sha256:")
    assert all(x["at"].endswith("Z") and x["actor"]["user"] for x in lines)
    checkpoint = note.Checkpoint.parse(
        note.verify(last["checkpoint"], note.Verifier.from_string(key))
    )
    assert checkpoint.size >= len(lines) and checkpoint.root.hex() == last["root_hash"]
    # A range, and the checkpoint that covers its end.
    done = cli(home, "audit", "export", "--jsonl", "--from", "3", "--to", "5")
    *part, cover = [json.loads(line) for line in done.stdout.splitlines()]
    assert [x["position"] for x in part] == [3, 4, 5]
    assert cover["size"] >= 5
    for bad in (["--from", "9999"], ["--from", "4", "--to", "2"], []):
        done = cli(home, "audit", "export", "--jsonl" if bad else "--from=1", *bad)
        assert done.returncode == 2, (bad, done.stderr)
        assert "Traceback" not in done.stderr


def test_the_report_says_who_did_what_with_refusals_and_failures(
    tmp_path: Path, archive: Path
) -> None:
    home = tmp_path / "home"
    assert cli(home, "load", str(archive)).returncode == 0
    assert cli(home, "use", "audit/app:1", "--holder", "sandbox-1").returncode == 0
    assert cli(home, "rm", "audit/app:2").returncode == 0  # untagged: app:1 keeps the image
    assert cli(home, "rm", "audit/app:1").returncode == 4  # refused: the last name, in use
    assert cli(home, "release", "sandbox-1").returncode == 0
    done = cli(home, "audit", "report", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    actions = [(r["action"], r["reference"].rsplit("/", 1)[-1], r["outcome"]) for r in rows]
    assert actions[:2] == [("pull", "app:1", "ok"), ("pull", "app:2", "ok")]
    assert ("use", "app:1", "ok") in actions
    assert ("remove", "app:1", "refused: in use by sandbox-1") in actions
    assert ("release", "app:1", "ok") in actions
    assert ("remove", "app:2", "untagged") in actions
    assert all(r["user"] and r["host"] and r["at"].endswith("Z") for r in rows)
    use = next(r for r in rows if r["action"] == "use")
    assert use["holder"] == "sandbox-1" and use["manifest_digest"].startswith("sha256:")
    # Filters: one reference, a time window that holds nothing.
    only = json.loads(cli(home, "audit", "report", "--json", "--ref", "audit/app:2").stdout)
    assert {r["reference"] for r in only} == {"docker.io/audit/app:2"}
    later = cli(home, "audit", "report", "--json", "--since", "2999-01-01")
    assert json.loads(later.stdout) == []
    csv_out = cli(home, "audit", "report", "--csv").stdout.splitlines()
    assert csv_out[0].split(",")[:4] == ["position", "at", "action", "reference"]
    assert len(csv_out) == len(rows) + 1
    bad = cli(home, "audit", "report", "--since", "yesterday")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def _export(home: Path, *args: str) -> list[str]:
    done = cli(home, "audit", "export", "--jsonl", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines(keepends=True)


def test_an_export_verifies_offline_and_every_tampering_is_found(
    tmp_path: Path, archive: Path
) -> None:
    home = tmp_path / "home"
    _fill(home, archive, uses=12)
    key = cli(home, "audit", "key").stdout.strip()
    lines = _export(home)
    whole = tmp_path / "export.jsonl"
    whole.write_text("".join(lines))
    done = cli(tmp_path / "nowhere", "audit", "verify-export", str(whole), "--key", key)
    assert done.returncode == 0, done.stderr
    part = tmp_path / "part.jsonl"
    part.write_text("".join(_export(home, "--from", "4", "--to", "9")))
    assert cli(home, "audit", "verify-export", str(part), "--key", key).returncode == 0

    def edited_field(rows: list[str]) -> list[str]:
        line = json.loads(rows[2])
        line["at"] = "2020-01-01T00:00:00Z"
        return [*rows[:2], json.dumps(line) + "\n", *rows[3:]]

    def edited_record(rows: list[str]) -> list[str]:
        line = json.loads(rows[3])
        record = bytearray(base64.b64decode(line["record"]))
        record[-1] ^= 1
        line["record"] = base64.b64encode(bytes(record)).decode()
        line["leaf_hash"] = merkle.leaf_hash(bytes(record)).hex()  # a consistent forgery
        return [*rows[:3], json.dumps(line) + "\n", *rows[4:]]

    tamperings: dict[str, Callable[[list[str]], list[str]]] = {
        "a field": edited_field,
        "a record, leaf hash recomputed": edited_record,
        "a deleted line": lambda rows: rows[:4] + rows[5:],
        "the first line deleted": lambda rows: rows[1:],
        "the last event deleted": lambda rows: rows[:-2] + rows[-1:],
        "two lines swapped": lambda rows: [*rows[:2], rows[3], rows[2], *rows[4:]],
        "a line repeated": lambda rows: [*rows[:3], rows[2], *rows[3:]],
    }
    for what, tamper in tamperings.items():
        forged = tmp_path / "forged.jsonl"
        forged.write_text("".join(tamper(list(lines))))
        done = cli(home, "audit", "verify-export", str(forged), "--key", key)
        assert done.returncode == 5, (what, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    other = note.generate_signer("someone.example/log").verifier().to_string()
    assert cli(home, "audit", "verify-export", str(whole), "--key", other).returncode == 5
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("not json\n")
    assert cli(home, "audit", "verify-export", str(garbage), "--key", key).returncode == 2


def test_a_tiles_export_serves_tlog_clients_and_every_tampering_is_found(
    tmp_path: Path, archive: Path
) -> None:
    """600 events: two full level-0 tiles, a partial one and a level-1 tile above them. The
    directory is what a tlog-tiles client fetches: a checkpoint, hash tiles and entry bundles
    whose entries hash to the leaves; exported again later it is extended, not rewritten."""
    from imageledger.tools.bench_cache import append_mixed_events

    home = tmp_path / "home"
    with ImageCache(home, durability="nosync") as cache:
        cache.load(archive)
        append_mixed_events(cache, 600, 40)
        key = cache.audit.verifier_key()
        first = cache.audit.export_tiles(str(tmp_path / "tiles"))[0]
        records = _records_of(cache)
    tiles = tmp_path / "tiles"
    names = sorted(str(p.relative_to(tiles)) for p in tiles.rglob("*") if p.is_file())
    size = first.size
    assert names == sorted(
        [
            "checkpoint",
            "tile/0/000",
            "tile/0/001",
            f"tile/0/002.p/{size - 512}",
            "tile/1/000.p/2",
            "tile/entries/000",
            "tile/entries/001",
            f"tile/entries/002.p/{size - 512}",
        ]
    )
    bundle = (tiles / "tile/entries/001").read_bytes()
    assert bundle[:2] == len(records[256]).to_bytes(2, "big")
    assert bundle[2 : 2 + len(records[256])] == records[256]
    assert cli(tmp_path / "x", "audit", "verify-export", str(tiles), "--key", key).returncode == 0
    # Later: extended, the older partial tiles kept (a client may hold the older checkpoint).
    assert cli(home, "use", "audit/app:1", "--holder", "late").returncode == 0
    assert cli(home, "audit", "export", "--tiles", str(tiles)).returncode == 0
    assert (tiles / f"tile/0/002.p/{size - 512}").is_file()
    assert (tiles / f"tile/0/002.p/{size - 512 + 1}").is_file()
    assert cli(home, "audit", "verify-export", str(tiles), "--key", key).returncode == 0

    def flip(relative: str, offset: int) -> None:
        path = tiles / relative
        data = bytearray(path.read_bytes())
        data[offset] ^= 1
        path.write_bytes(bytes(data))

    damages: dict[str, Callable[[], None]] = {
        "an entry's byte": lambda: flip("tile/entries/001", 40),
        "a leaf hash": lambda: flip("tile/0/000", 5),
        "the tile above": lambda: flip("tile/1/000.p/2", 0),
        "a bundle deleted": (tiles / "tile/entries/000").unlink,
    }
    for what, damage in damages.items():
        shutil.copytree(tiles, tmp_path / "kept")
        damage()
        done = cli(home, "audit", "verify-export", str(tiles), "--key", key)
        assert done.returncode == 5, (what, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
        shutil.rmtree(tiles)
        shutil.move(tmp_path / "kept", tiles)
    other = note.generate_signer("someone.example/log").verifier().to_string()
    assert cli(home, "audit", "verify-export", str(tiles), "--key", other).returncode == 5
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "checkpoint").write_text("other.example/log\n1\nAAAA\n")
    done = cli(home, "audit", "export", "--tiles", str(tmp_path / "foreign"))
    assert done.returncode == 2 and "something else" in done.stderr


def _records_of(cache: ImageCache) -> list[bytes]:
    from imageledger.cache import internals

    ledger = internals(cache).ledger
    with ledger.tree.read() as txn:
        return [record for _position, record in ledger.records()(txn, 0)]


def test_a_record_too_big_for_a_tiles_bundle_is_named_and_jsonl_still_carries_it(
    tmp_path: Path,
) -> None:
    """tlog-tiles prefixes each entry with a uint16 length: an event above 65,535 bytes (a
    pull whose image config is that big) cannot be a tiles entry. The export says which one,
    and leaves no checkpoint of a half-written export; the JSON Lines export carries it."""
    spec = ImageSpec(names=("big/config:1",), env=tuple(f"V{i}={'x' * 100}" for i in range(800)))
    archive = build_docker_archive(tmp_path / "big.tar", [spec]).path
    home = tmp_path / "home"
    assert cli(home, "load", str(archive)).returncode == 0
    done = cli(home, "audit", "export", "--tiles", str(tmp_path / "tiles"))
    assert done.returncode == 2, done.stderr
    assert "event 2 is" in done.stderr and "--jsonl" in done.stderr
    assert not (tmp_path / "tiles" / "checkpoint").exists()
    key = cli(home, "audit", "key").stdout.strip()
    export = tmp_path / "all.jsonl"
    export.write_text(cli(home, "audit", "export", "--jsonl").stdout)
    assert cli(home, "audit", "verify-export", str(export), "--key", key).returncode == 0
