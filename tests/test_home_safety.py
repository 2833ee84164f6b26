"""The home is a trust boundary (issue 8): an ordinary user owns a cache that root operates.

The user (``nobody``, through ``setpriv``) plants symbolic links, FIFOs and odd files at every
level of the home: the top-level directories, entries inside them, lock files, the ledger,
index.json and its temporary files. Root then runs prune, remove, load, save, verify and
pull over it. Whatever happens, nothing outside the home is written, created or deleted (a
root-owned "victim" tree beside the home is compared byte for byte), a planted link is never
followed, and every refusal is a package error (``HomeDamagedError`` and its kin, exit 5 on
the command line), never a raw OSError or a hang.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from imageledger import ImageCache
from imageledger.domain.errors import (
    HomeNotFoundError,
    ImageLedgerError,
    InvalidHomeError,
    LedgerMissingError,
)
from imageledger.storage.registryoptions import RegistryOptions
from imageledger.tools.imagebuild import ImageSpec, build_docker_archive, build_image

if TYPE_CHECKING:
    from tests.registry import Registry, push
else:
    from registry import Registry, push

NOBODY = 65534
CLI = [sys.executable, "-m", "imageledger.tools.cli"]
APP = ImageSpec(layers=({"app": b"application\n" * 100},), names=("acme/app:1",))
MORE = ImageSpec(layers=({"more": b"more content\n" * 50},), names=("acme/more:1",))

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv (util-linux): the tests act as root over a user's home",
)


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every entry under `root` (links not followed): mode, owner and content hash."""
    found: dict[str, tuple[int, int, str]] = {}
    for path in sorted([root, *root.rglob("*")]):
        st = path.lstat()
        if stat.S_ISREG(st.st_mode):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            digest = os.readlink(path)
        else:
            digest = ""
        found[str(path.relative_to(root))] = (st.st_mode, st.st_uid, digest)
    return found


def as_nobody(cwd: Path, script: str) -> None:
    user = [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    subprocess.run(
        ["setpriv", *user, "sh", "-ec", script], cwd=cwd, check=True, capture_output=True
    )


def run_cli(
    home: str | Path, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The command line as root runs it (logs at error level, so stderr is its message)."""
    return subprocess.run(
        [sys.executable, "-m", "imageledger.tools.cli", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
        env={**os.environ, "IMAGELEDGER_LOG_LEVEL": "error"},
    )


class Site:
    """A world-traversable scratch directory: the user's home (owned by nobody), a root-owned
    victim tree beside it, and archives to load."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.home = base / "home"
        self.victim = base / "victim"
        (self.victim / "blobs" / "sha256").mkdir(parents=True)
        self.secret = self.victim / "secret"
        self.secret.write_bytes(b"root only\n")
        self.secret.chmod(0o600)
        other = b"another cache's blob\n"
        self.victim_blob = hashlib.sha256(other).hexdigest()
        (self.victim / "blobs" / "sha256" / self.victim_blob).write_bytes(other)
        self.app = build_docker_archive(base / "app.tar", [build_image(APP)]).path
        self.more = build_docker_archive(base / "more.tar", [build_image(MORE)]).path
        with ImageCache(self.home) as cache:
            cache.load(self.app)
            self.layer = cache.inspect("acme/app:1").layers[0].blob_digest.split(":")[1]
        subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(self.home)], check=True)
        self.before = snapshot(self.victim)

    def plant(self, script: str) -> None:
        as_nobody(self.home, script.replace("$V", str(self.victim)).replace("$L", self.layer))

    def victim_intact(self) -> None:
        assert snapshot(self.victim) == self.before
        outside = {p.name for p in self.base.iterdir()} - {"out.tar"}
        assert outside == {"home", "victim", "app.tar", "more.tar"}


@pytest.fixture
def site() -> Iterator[Site]:
    base = Path(tempfile.mkdtemp(prefix="imageledger-safety-"))
    base.chmod(0o755)
    try:
        yield Site(base)
    finally:
        shutil.rmtree(base)


# Planted by the user; each key names where. "$V" is the victim tree, "$L" the image's layer.
PLANTS: dict[str, str] = {
    "blobs is a link to another cache's blobs": "rm -rf blobs && ln -s $V/blobs blobs",
    "blobs/sha256 is a link": "rm -rf blobs/sha256 && ln -s $V/blobs/sha256 blobs/sha256",
    "a blob is a link to a root-only file": "rm blobs/sha256/$L && ln -s $V/secret blobs/sha256/$L",
    "a link named by a digest in blobs": (
        "ln -s $V/blobs/sha256/* blobs/sha256/ && ln -s $V blobs/sha256/zz && ln -s $V blobs/x"
    ),
    "a blob is a FIFO": "rm blobs/sha256/$L && mkfifo blobs/sha256/$L",
    "tmp is a link": "rm -rf tmp && ln -s $V tmp",
    "links inside tmp": (
        "mkdir -p tmp && ln -s $V tmp/0123456789abcdef && ln -s $V/secret tmp/x.part"
    ),
    "tmp/leases is a link": "mkdir -p tmp && rm -rf tmp/leases && ln -s $V tmp/leases",
    "a lease is a link": "mkdir -p tmp/leases && ln -s $V/secret tmp/leases/00aa.lease",
    "tmp/locks is a link": "mkdir -p tmp && rm -rf tmp/locks && ln -s $V tmp/locks",
    "artifacts is a link": "rm -rf artifacts && ln -s $V artifacts",
    "links inside artifacts": (
        "mkdir -p artifacts/l && ln -s $V/secret artifacts/l/a.fsmeta && ln -s $V artifacts/l/d"
    ),
    "store.lock is a dangling link": "rm -f store.lock && ln -s $V/made-by-store-lock store.lock",
    "store.lock is a FIFO": "rm -f store.lock && mkfifo store.lock",
    "index.lock is a dangling link": "rm -f index.lock && ln -s $V/made-by-index-lock index.lock",
    "index.json is a link": "rm -f index.json && ln -s $V/secret index.json",
    "a stale index temp file is a link": "ln -s $V/secret .index.json.1.tmp",
    "ledger is a link": "mv ledger ledger.real && ln -s $V/ledger ledger",
    "the marker is a link": "rm -f imageledger-home && ln -s $V/secret imageledger-home",
}


def _prune(cache: ImageCache, site: Site) -> None:
    cache.prune()


def _remove(cache: ImageCache, site: Site) -> None:
    cache.remove("acme/app:1", force=True)


def _load(cache: ImageCache, site: Site) -> None:
    cache.load(site.more)


def _save(cache: ImageCache, site: Site) -> None:
    cache.save(["acme/app:1"], site.base / "out.tar")


def _verify(cache: ImageCache, site: Site) -> None:
    cache.verify(repair=True)


OPERATIONS: dict[str, Callable[[ImageCache, Site], None]] = {
    "prune": _prune,
    "remove": _remove,
    "load": _load,
    "save": _save,
    "verify --repair": _verify,
}


@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize("plant", list(PLANTS))
def test_planted_entries_are_never_followed(site: Site, plant: str, operation: str) -> None:
    site.plant(PLANTS[plant])
    try:
        with ImageCache(site.home) as cache:
            OPERATIONS[operation](cache, site)
    except ImageLedgerError as e:
        # Refusing is fine: it must name what is wrong, in one line.
        assert "\n" not in str(e)
    site.victim_intact()


@pytest.mark.parametrize(
    "plant",
    [
        "a link named by a digest in blobs",
        "links inside tmp",
        "a lease is a link",
        "links inside artifacts",
        "a blob is a link to a root-only file",
        "a blob is a FIFO",
    ],
)
def test_prune_reports_and_removes_stray_entries_but_not_their_targets(
    site: Site, plant: str
) -> None:
    site.plant(PLANTS[plant])
    planted = {
        p for p in site.home.rglob("*") if p.is_symlink() or stat.S_ISFIFO(p.lstat().st_mode)
    }
    assert planted
    with ImageCache(site.home) as cache:
        report = cache.prune()
    for path in planted:
        assert not path.is_symlink() and not path.exists(), path
    named = {b.digest for b in report.deleted}
    reported = {str(p.relative_to(site.home)) for p in planted if not p.name.endswith(".lease")}
    assert reported <= named, (reported, named)
    site.victim_intact()


@pytest.mark.parametrize(
    "plant",
    [
        "blobs is a link to another cache's blobs",
        "blobs/sha256 is a link",
        "tmp is a link",
        "artifacts is a link",
        "store.lock is a dangling link",
        "store.lock is a FIFO",
        "ledger is a link",
        "the marker is a link",
    ],
)
def test_structural_damage_is_refused_with_exit_5_and_one_line(site: Site, plant: str) -> None:
    site.plant(PLANTS[plant])
    result = run_cli(site.home, "prune")
    assert result.returncode == 5, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "link" in lines[0] or "not a" in lines[0], lines[0]
    site.victim_intact()


def test_a_pull_into_a_planted_home_stays_inside(
    site: Site, registry: Registry, tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    from imageledger.tools.imagebuild import build_oci_layout

    image = build_image(ImageSpec(layers=({"pulled": b"pulled\n" * 64},), names=("1",)))
    build_oci_layout(layout, [image])
    push(registry, f"oci:{layout}:1", "team/pulled:1")
    options = RegistryOptions(insecure=frozenset({registry.host}), backoff=0.01)
    for name in ("tmp/locks is a link", "links inside tmp", "tmp is a link"):
        site.plant(PLANTS[name])
        try:
            with ImageCache(site.home) as cache:
                cache.pull(registry.reference("team/pulled:1"), options=options)
        except ImageLedgerError as e:
            assert "link" in str(e)
        site.victim_intact()


# ---------------------------------------------------------------- what is a home


def test_a_foreign_directory_is_never_adopted(tmp_path: Path) -> None:
    foreign = tmp_path / "projects"
    (foreign / "tmp").mkdir(parents=True)
    (foreign / "tmp" / "notes.txt").write_text("mine\n")
    (foreign / "report.pdf").write_bytes(b"%PDF")
    before = snapshot(foreign)
    for create in (True, False):
        with pytest.raises(InvalidHomeError, match="not an imageledger home"):
            ImageCache(foreign, create=create)
    assert snapshot(foreign) == before


def test_an_empty_string_is_not_a_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidHomeError, match="empty"):
        ImageCache("")
    monkeypatch.setenv("IMAGELEDGER_HOME", "")
    with pytest.raises(InvalidHomeError, match="IMAGELEDGER_HOME"):
        ImageCache()
    result = run_cli("", "images", cwd=tmp_path)
    assert result.returncode == 2 and "empty" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_reading_never_creates_a_home(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    with pytest.raises(HomeNotFoundError):
        ImageCache(missing, create=False)
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HomeNotFoundError):
        ImageCache(empty, create=False)
    assert list(empty.iterdir()) == []


def test_a_new_home_is_marked_and_an_old_unmarked_home_is_adopted(
    tmp_path: Path, site: Site
) -> None:
    home = tmp_path / "new"
    with ImageCache(home) as cache:
        cache.load(site.app)
    assert (home / "imageledger-home").is_file()
    (home / "imageledger-home").unlink()  # as a home made before markers existed
    with ImageCache(home, create=False) as cache:
        assert [h.reference for h in cache.list()] == ["docker.io/acme/app:1"]
    assert (home / "imageledger-home").is_file()


@pytest.mark.parametrize("damage", ["empty", "missing"])
def test_a_lost_ledger_is_not_an_empty_one(tmp_path: Path, site: Site, damage: str) -> None:
    home = tmp_path / "home"
    with ImageCache(home) as cache:
        cache.load(site.app)
        cache.use("acme/app:1", "sandbox-1")
    blobs = snapshot(home / "blobs")
    if damage == "empty":
        (home / "ledger" / "data.mdb").write_bytes(b"")
    else:
        shutil.rmtree(home / "ledger")
    for create in (True, False):
        with pytest.raises(LedgerMissingError, match="ledger is"):
            ImageCache(home, create=create)
    result = run_cli(home, "prune")
    assert result.returncode == 5 and "backup" in result.stderr, result.stderr
    assert snapshot(home / "blobs") == blobs  # the next prune deleted every blob, once


def test_unmarked_home_without_ledger_but_with_blobs_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "blobs" / "sha256").mkdir(parents=True)
    (home / "blobs" / "sha256" / ("ab" * 32)).write_bytes(b"x")
    (home / "ledger").mkdir()
    with pytest.raises(LedgerMissingError):
        ImageCache(home)
    assert (home / "blobs" / "sha256" / ("ab" * 32)).exists()


# ---------------------------------------------------------------- save -o


def test_save_writes_through_devices_and_links_and_never_into_the_home(
    tmp_path: Path, site: Site
) -> None:
    home = tmp_path / "home"
    with ImageCache(home) as cache:
        cache.load(site.app)
        null = os.stat("/dev/null")
        cache.save(["acme/app:1"], "/dev/null")
        after = os.stat("/dev/null")
        assert stat.S_ISCHR(after.st_mode) and after.st_rdev == null.st_rdev
        target = tmp_path / "real.tar"
        target.write_bytes(b"old")
        link = tmp_path / "link.tar"
        link.symlink_to(target)
        cache.save(["acme/app:1"], link)
        assert link.is_symlink() and target.stat().st_size > 1000
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
        cache.save(["acme/app:1"], fifo)
        data = reader.communicate(timeout=30)[0]
        assert stat.S_ISFIFO(fifo.lstat().st_mode) and data == target.read_bytes()
        for inside in (home / "x.tar", home / "blobs" / "y.tar", home):
            with pytest.raises(ValueError, match=r"inside the cache home|directory"):
                cache.save(["acme/app:1"], inside)
        assert not (home / "x.tar").exists()


def test_save_destination_errors_are_all_exit_2(tmp_path: Path, site: Site) -> None:
    home = tmp_path / "home"
    with ImageCache(home) as cache:
        cache.load(site.app)
    (tmp_path / "adir").mkdir()
    for output in ("missing_dir/x.tar", "adir", "adir/", str(home / "inside.tar")):
        result = run_cli(home, "save", "acme/app:1", "-o", output, cwd=tmp_path)
        assert result.returncode == 2, (output, result.stderr)
        assert len(result.stderr.splitlines()) == 1, result.stderr


def test_an_entry_that_cannot_be_unlinked_does_not_stop_the_prune(site: Site) -> None:
    # Root once ran something in the user's home and left a directory the user cannot empty.
    stuck = site.home / "tmp" / "deadbeefdeadbeef"
    stuck.mkdir(parents=True)
    (stuck / "x.part").write_bytes(b"s" * 300)
    orphan = site.home / "blobs" / "sha256" / ("ab" * 32)
    as_nobody(site.home, f"printf '%1000s' x > {orphan}")
    user = [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    result = subprocess.run(
        ["setpriv", *user, *CLI, "--home", str(site.home), "prune", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "IMAGELEDGER_LOG_LEVEL": "error", "HOME": "/nonexistent"},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert not orphan.exists()
    assert (stuck / "x.part").exists()
    planned = {e["name"]: e.get("size_bytes", 0) for e in report["removed"]}
    assert planned["tmp/deadbeefdeadbeef"] == 300
    # What was unlinked, not what was planned: everything but the stuck directory.
    assert report["bytes_reclaimed"] == sum(planned.values()) - 300
    site.victim_intact()


def test_verify_names_entries_that_are_not_blobs_and_repair_removes_them(site: Site) -> None:
    site.plant(PLANTS["a link named by a digest in blobs"])
    result = run_cli(site.home, "verify", "--json")
    assert result.returncode == 1, result.stderr
    found = json.loads(result.stdout)["problems"]
    strays = sorted(p["digest"] for p in found if p["kind"] == "stray")
    assert strays == sorted(["blobs/x", "blobs/sha256/zz", f"blobs/sha256/{site.victim_blob}"])
    with ImageCache(site.home) as cache:
        assert all(p.repaired for p in cache.verify(repair=True).problems)
        assert cache.verify().ok
    site.victim_intact()


def as_nobody_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    user = [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    return subprocess.run(
        ["setpriv", *user, *CLI, "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "IMAGELEDGER_LOG_LEVEL": "error", "HOME": "/nonexistent"},
    )


def test_a_home_the_user_may_not_write_can_be_read_and_refuses_writes(site: Site) -> None:
    shared = site.base / "shared"
    with ImageCache(shared) as cache:
        cache.load(site.app)
        cache.use("acme/app:1", "sandbox-1")
    before = snapshot(shared)
    listed = as_nobody_cli(shared, "images", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [h["reference"] for h in json.loads(listed.stdout)] == ["docker.io/acme/app:1"]
    for reading in (
        ("inspect", "acme/app:1", "--json"),
        ("history", "--json"),
        ("df", "--json"),
        ("verify", "--json"),
        ("prune", "--dry-run", "--json"),
    ):
        result = as_nobody_cli(shared, *reading)
        assert result.returncode == 0, (reading, result.stderr)
        json.loads(result.stdout)
    for writing in (
        ("use", "acme/app:1", "--holder", "x"),
        ("release", "sandbox-1"),
        ("rm", "--force", "acme/app:1"),
        ("prune",),
        ("load", str(site.more)),
        ("rebuild",),
        ("verify", "--repair"),
    ):
        result = as_nobody_cli(shared, *writing)
        assert result.returncode == 1, (writing, result.stderr)
        [line] = result.stderr.splitlines()
        assert "can only be read" in line, line
    assert snapshot(shared) == before
