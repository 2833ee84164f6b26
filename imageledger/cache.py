"""The public image cache: the domain service wired to LMDB, the blob store and the sources.

`ImageCache` is the blocking API; `Image` is the asyncio API with microsandbox's Python SDK
names (``await Image.get(ref)``, ``list``, ``inspect``, ``remove``, ``prune``, ``load``,
``save``, plus ``use`` and ``release``), over the cache at ``$IMAGELEDGER_HOME`` unless one is
passed. Both have the same names and semantics (DESIGN.md semantics 1-11).

Layout of a home (``~/.local/share/imageledger`` by default)::

    ledger/               LMDB: the event log and the views
    oci-layout, index.json   the home is an OCI image layout; index.json is a projection
    blobs/sha256/<hex>    verified content
    tmp/                  in-flight leases and partial files (never counted as cached)
    store.lock            serialises deletes against pull commits across processes
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import errno
import fcntl
import getpass
import hashlib
import operator
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal

import structlog
from eventsourcing.utils import get_topic

from imageledger._version import __version__
from imageledger.domain.errors import (
    CacheClosedError,
    DiskFullError,
    HomeDamagedError,
    ImageLedgerError,
    InvalidDestinationError,
    InvalidHomeError,
    InvalidReferenceError,
    LedgerReadOnlyError,
    PlatformNotFoundError,
)
from imageledger.domain.events import ImageLedger
from imageledger.domain.model import (
    Actor,
    HistoryEntry,
    ImageContent,
    ImageDetail,
    ImageHandle,
    ImagePruneReport,
    LoadedImage,
    Platform,
    PrunePolicy,
    StoreCheck,
)
from imageledger.domain.policies import (
    MAX_BYTES,
    MAX_SECONDS,
    choose_platform,
    keep_patterns,
)
from imageledger.domain.reference import Reference, canonical
from imageledger.domain.service import ImageCacheService
from imageledger.projections.index import oci_index
from imageledger.projections.runner import RebuildReport, folder, rebuild
from imageledger.projections.views import FORMAT as VIEWS_FORMAT
from imageledger.projections.views import (
    TABLES,
    ViewState,
    ledger_entry,
    reference_entries,
)
from imageledger.storage import archives
from imageledger.storage.blobs import BlobStore, BlobWriter
from imageledger.storage.eventstore import LedgerApplication
from imageledger.storage.home import Dir, mark_home, open_home
from imageledger.storage.leases import InFlightLease, InFlightLeases, StoreLock
from imageledger.storage.ledger import LMDBApplicationRecorder, LMDBFactory, checked_decoder
from imageledger.storage.lmdbenv import DURABILITY_MODES
from imageledger.storage.oci import host_platform, parse_platform
from imageledger.storage.registry import (
    PullProgress,
    RegistryClient,
    RegistryOptions,
    environment_fingerprint,
    options_from_environment,
)
from imageledger.storage.viewstore import LMDBViews
from imageledger.tools.ledgercheck import check_ledger
from imageledger.tools.logs import configure_logging

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]


def default_home() -> Path:
    """``$IMAGELEDGER_HOME``, else ``~/.local/share/imageledger``. Set but empty is an error
    (`InvalidHomeError`), not the default: an unset variable in a script must not send its
    commands to another cache."""
    home = os.environ.get("IMAGELEDGER_HOME")
    if home is None:
        return Path.home() / ".local" / "share" / "imageledger"
    if not home:
        msg = "IMAGELEDGER_HOME is set but empty: give a directory path, or unset it"
        raise InvalidHomeError(msg)
    return Path(home)


def current_actor() -> Actor:
    """Who and where this process runs, for every event it appends (names and ids, no
    secret). A host fact, so it is read here, where the domain is wired to the machine."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = ""
    return Actor(
        user=user, uid=os.getuid(), pid=os.getpid(), host=socket.gethostname(), version=__version__
    )


def _utc_now() -> datetime:
    return datetime.now(UTC)


_CLIENT_MAX_AGE: Final = 600.0  # s


class _SharedClient:
    """The registry client the pulls of one cache share; closed once retired and unused
    (the caller holds the cache's client lock for every change)."""

    def __init__(self, key: object, client: RegistryClient) -> None:
        self.key = key
        self.client = client
        self.born = time.monotonic()
        self.users = 0
        self.retired = False

    def age(self) -> float:
        return time.monotonic() - self.born

    def retire(self) -> None:
        self.retired = True
        if not self.users:
            self.client.close()


class _LeasedStore:
    """The blob store as a source sees it during one load: every digest it touches is claimed
    by the load's in-flight lease first (see storage.leases for why the order matters)."""

    def __init__(
        self,
        store: BlobStore,
        lease: InFlightLease,
        lock: StoreLock,
        leases: InFlightLeases,
        known: Callable[[str], bool],
    ) -> None:
        self._known = known  # does the ledger account for this blob (a committed image uses it)?
        self._store = store
        self._lease = lease
        self._lock = lock
        self._leases = leases
        self.written: set[str] = set()
        self.root = store.root
        self.tmp = lease.work.path

    def scratch(self) -> Dir:
        return self._lease.work.sub("")

    def clear_work(self) -> None:
        work = self._lease.work
        for name, _ in work.entries():
            work.delete(name)

    def _claim(self, digest: str) -> None:
        with self._lock():
            self._lease.add(digest)

    def has(self, digest: str) -> bool:
        self._claim(digest)
        return self._store.has(digest)

    def size(self, digest: str) -> int | None:
        self._claim(digest)
        return self._store.size(digest)

    def write(self, digest: str, chunks: Any, **kwargs: Any) -> int:
        self._claim(digest)
        kwargs.setdefault("work", self._lease.work)
        size = self._store.write(digest, chunks, **kwargs)
        self.written.add(digest)
        return size

    def writer(self, digest: str, **kwargs: Any) -> BlobWriter:
        self._claim(digest)
        kwargs.setdefault("work", self._lease.work)
        self.written.add(digest)
        return self._store.writer(digest, **kwargs)

    def delete(self, digest: str) -> int:
        """A failed or partial load cleans up what it wrote, unless another live pull or load
        relies on the same blob (it would then fail at commit with its content missing)."""
        with self._lock():
            if digest in self._leases.live(exclude=self._lease.id)[0] or self._known(digest):
                return 0
            return self._store.delete(digest)

    def write_bytes(self, data: bytes, digest: str | None = None) -> str:
        digest = digest or f"sha256:{hashlib.sha256(data).hexdigest()}"
        self.write(digest, [data], size=len(data))
        return digest

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class ImageCache:
    """A local OCI image cache whose whole state is an event-sourced ledger (blocking API)."""

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        *,
        clock: Clock | None = None,
        durability: Literal["sync", "nometasync", "nosync"] | None = None,
        create: bool = True,
    ) -> None:
        """Open the cache at `home` (default `default_home()`).

        `create=False` is for callers that only read: a missing or empty home is then
        `HomeNotFoundError` instead of a new, empty cache (a mistyped path must not look
        like an empty cache). A directory that is not an imageledger home is refused
        (`InvalidHomeError`), and so is a home whose ledger is gone while its store holds
        content (`LedgerMissingError`): see `storage.home`."""
        if not structlog.is_configured():
            # structlog's unconfigured default prints every level to stdout, into an
            # embedder's output: fall back to ours (stderr, warning and up unless
            # IMAGELEDGER_LOG_LEVEL says otherwise). An embedder's own configuration wins.
            configure_logging()
        if durability is not None and durability not in DURABILITY_MODES:
            msg = f"unknown durability {durability!r}: use one of {', '.join(DURABILITY_MODES)}"
            raise ValueError(msg)
        self._closed = False
        self._home = open_home(home if home is not None else default_home(), create=create)
        self.home = self._home.path
        # A home this user may not write (a shared cache) is opened for reading: every query
        # answers, every command that would change it is refused in one line.
        self.read_only = not _writable(self.home)
        env = {
            "PERSISTENCE_MODULE": get_topic(LMDBFactory),
            "LMDB_PATH": str(self.home / "ledger"),
            "LMDB_READONLY": "yes" if self.read_only else "no",
        }
        if durability:
            env["LMDB_DURABILITY"] = durability
        try:
            self._app = LedgerApplication(env=env)
        except BaseException:
            self._home.close()
            raise
        if not self.read_only:
            mark_home(self._home)
        recorder = self._app.recorder
        assert isinstance(recorder, LMDBApplicationRecorder)
        self._recorder = recorder
        self._views = LMDBViews(recorder.env, recorder, TABLES)
        self._decode = checked_decoder(self._app.mapper.to_domain_event, self.home / "ledger")
        self._views.attach(folder(self._decode))
        self.store = BlobStore(self._home)
        self._lock = StoreLock(self._home, readonly=self.read_only)
        self._leases = InFlightLeases(self._home, self._lock)
        # Two rebuilds would fill the same spare namespace at once: one at a time per home.
        self._rebuild_lock = StoreLock(self._home, "rebuild.lock", readonly=self.read_only)
        self.write_index = True
        # list() memos, per owner the handles are bound to (this cache, or its asyncio
        # facade): the last list by ledger position, and handles by row (ViewState.handles).
        self._list_memos: dict[object, tuple[int, builtins.list[ImageHandle]]] = {}
        self._handle_memos: dict[object, dict[bytes, ImageHandle]] = {}
        self._async_owner = _AsyncOwner(self)
        self._clients_lock = threading.Lock()
        self._client: _SharedClient | None = None  # see _registry
        self.service = ImageCacheService(
            ledger=self,
            content=self.store,
            leases=self._leases,
            lock=self._lock,
            clock=clock or _utc_now,
            actor=current_actor(),
            history=self._history,
        )
        try:
            self._upgrade_views()
            if not self.read_only:
                self._write_index()
        except (OSError, HomeDamagedError) as e:
            if create or not self._views_current():
                self.close()
                raise
            # Only reading: a home whose derived files are damaged still answers; whoever
            # writes next repairs them.
            log.warning("home.index_not_written", home=str(self.home), error=str(e))
        except BaseException:
            self.close()
            raise

    # -- the service's Ledger port -------------------------------------------------------

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[ViewState]:
        self._check_open()
        with self._views.read() as view:
            yield ViewState(view)

    def _check_open(self) -> None:
        if self._closed:
            msg = f"the cache at {self.home} is closed"
            raise CacheClosedError(msg)

    def append(self, ledger: ImageLedger) -> None:
        self._check_open()
        self._app.save(ledger)
        if self.write_index:
            self._write_index()

    def _knows_blob(self, digest: str) -> bool:
        with self.snapshot() as state:
            return state.blob(digest) is not None

    # -- the OCI layout projection -----------------------------------------------------

    def _write_index(self, *, force: bool = False) -> None:
        """Rewrite index.json from the views, unless it already shows what they show (with
        `force`, whatever it shows: after a rebuild), and write oci-layout if missing.
        Serialised across processes by index.lock, so the last writer always writes the
        latest state and temp files found under it are stale."""
        home = self._home
        fd = home.open_lock("index.lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if home.stat("oci-layout") is None:
                home.write_atomic("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            with self.snapshot() as state:
                # What the index shows changes only with pulls, loads, removes and prunes
                # (semantics 14): after a use or a release this returns here, O(1).
                position = state.shown
                try:
                    with home.open_read("index.position") as f:
                        written = int(f.read(32))
                except (FileNotFoundError, ValueError):
                    written = -1
                if not force and written >= position and home.file_size("index.json") is not None:
                    return
                data = oci_index(state)
            # Every index write holds this lock, so a temporary file left now is a crashed
            # writer's: sweep it.
            for name, _ in home.entries():
                if name.startswith(".") and name.endswith(".tmp"):
                    home.delete(name)
            try:
                home.write_atomic("index.json", data)
                home.write_atomic("index.position", str(position).encode())
            except OSError as e:
                # The command itself is committed; failing it now (a full disk, say) would
                # report as failed what happened. The next command writes the index again.
                log.warning("index.not_written", position=position, error=str(e))
        finally:
            os.close(fd)

    # -- queries --------------------------------------------------------------------------

    def _bind(self, handle: ImageHandle) -> ImageHandle:
        # The handle was made for this call and is not shared yet: setting its owner in place
        # is safe, and four times cheaper than dataclasses.replace on the list() path.
        object.__setattr__(handle, "_owner", self)
        return handle

    def get(self, reference: str) -> ImageHandle:
        """The cached image `reference` names; `ImageNotFoundError` when it is not cached."""
        return self._bind(self.service.get(reference))

    def list(self) -> builtins.list[ImageHandle]:
        """Every cached reference, newest first (semantics 3).

        Memoised per process while the ledger position is unchanged (handles are immutable),
        so a runtime listing on every sandbox start pays one read of the position when nothing
        changed; any commit, in any process, moves the position and invalidates it."""
        return self._list_for(self)

    def _list_for(self, owner: object) -> builtins.list[ImageHandle]:
        """list() with handles whose `inspect()`/`remove()` call `owner`."""
        with self.snapshot() as state:
            position = state.position
        memo = self._list_memos.get(owner)
        if memo is not None and memo[0] == position:
            return builtins.list(memo[1])
        handles = self.service.list(self._handle_memos.setdefault(owner, {}))
        bind = object.__setattr__  # as in _bind, without a call per handle
        for handle in handles:
            bind(handle, "_owner", owner)
        with self.snapshot() as state:
            if state.position == position:
                self._list_memos[owner] = (position, handles)
        return builtins.list(handles)

    def inspect(self, reference: str) -> ImageDetail:
        detail = self.service.inspect(reference)
        return dataclasses.replace(detail, handle=self._bind(detail.handle))

    def history(self, reference: str | None = None) -> builtins.list[HistoryEntry]:
        """Every event of `reference` (or of the whole ledger), oldest first."""
        return self.service.history(reference)

    def _history(self, reference: str | None) -> builtins.list[HistoryEntry]:
        """Entries made from the events themselves: the views only index which events
        concern a reference; the index and the log are read in one snapshot."""
        if reference is not None:
            with self._views.read() as view:
                logged = self._views.log_at(view, ViewState(view).history(reference))
            return [
                entry
                for notification in logged
                for entry in reference_entries(
                    notification.id, self._decode(notification), reference
                )
            ]
        entries: builtins.list[HistoryEntry] = []
        after = 0
        while batch := self._recorder.select_notifications(after, 1000, inclusive_of_start=False):
            entries.extend(ledger_entry(n.id, self._decode(n)) for n in batch)
            after = batch[-1].id
        return entries

    # -- commands -----------------------------------------------------------------------

    def _check_writable(self, what: str) -> None:
        if self.read_only:
            msg = f"{self.home}: {what} needs a home this user can write; this one can only be read"
            raise LedgerReadOnlyError(msg)

    def use(self, reference: str, holder: str) -> ImageHandle:
        """`holder` (a sandbox id, a snapshot id) now uses the image: it cannot be removed
        without force, nor pruned, until `release(holder)`."""
        self._check_writable("use")
        return self._bind(self.service.use(reference, holder))

    def release(self, holder: str) -> int:
        """End every lease of `holder`; returns how many it held."""
        self._check_writable("release")
        return self.service.release(holder)

    def remove(self, reference: str, force: bool = False) -> None:
        """Semantics 6-7. `ImageInUseError` (naming the holders) when it would drop the last
        reference to a leased manifest and `force` is false."""
        self._check_writable("remove")
        self.service.remove(reference, force=force)

    def prune(
        self,
        *,
        dry_run: bool = False,
        unused_for: float | None = None,
        keep: Sequence[str] = (),
        max_bytes: int | None = None,
    ) -> ImagePruneReport:
        """Semantics 8. `unused_for` in seconds; `keep` a list of references or fnmatch
        patterns, normalized like references (``alpha`` keeps every tag of
        docker.io/library/alpha; see `KeepPattern`). A bare string for `keep` is refused (it
        would be read character by character and keep nothing); patterns that match no cached
        reference are logged and listed in the report's `unmatched_keep`. Durations and byte
        budgets past what the clock and the ledger can represent mean "everything is recent"
        and "everything fits", so they are clamped rather than overflowing mid-prune."""
        if not dry_run:
            self._check_writable("prune")
        patterns = tuple(p.text for p in keep_patterns(keep))
        try:
            seconds = None if unused_for is None else int(unused_for)
        except (OverflowError, TypeError, ValueError):
            msg = f"prune: unused_for must be a finite number of seconds, got {unused_for!r}"
            raise ValueError(msg) from None
        budget = None if max_bytes is None else operator.index(max_bytes)
        policy = PrunePolicy(
            dry_run=dry_run,
            unused_for_seconds=None if seconds is None else min(seconds, MAX_SECONDS),
            keep=patterns,
            max_bytes=None if budget is None else min(budget, MAX_BYTES),
        )
        report = self.service.prune(policy)
        for pattern in report.unmatched_keep:
            log.warning("prune.keep_unmatched", pattern=pattern[:200], length=len(pattern))
        return report

    def pull(
        self,
        reference: str,
        *,
        platform: str | None = None,
        options: RegistryOptions | None = None,
        progress: Callable[[PullProgress], None] | None = None,
    ) -> ImageHandle:
        """Pull `reference` from its registry (an index resolves to `platform`, ``os/arch
        [/variant]``, default this host's linux platform); the image's own platform is what
        the handle reports. Options default to `options_from_environment()` (insecure
        registries, CA bundle, credentials from the environment and Docker's config.json).

        The pulls of one cache share a registry client (its connections and tokens) while
        `options` stay the same (by default: while the environment and Docker's config.json
        are unchanged, and at most 10 minutes, so credential helpers are asked again).
        Blobs already in the store are not downloaded; what the pull writes is protected from
        a concurrent prune or remove by an in-flight lease until its event commits. A pull by
        digest of a manifest the cache holds (under any name) does not contact the registry
        at all: the digest pins the bytes, and they are here, verified. A sandbox can start
        offline from a pinned reference; the pull is recorded like any all-cached pull."""
        self._check_writable("pull")
        ref = Reference.parse(reference)
        wanted = parse_platform(platform) if platform else host_platform()
        source = f"registry:{ref.name}"
        with self._bringing(str(ref), source) as leased:
            held = self._held_manifest(ref.digest, leased)
            if held is not None:
                log.info("pull.offline", reference=str(ref))
                return self._bind(self.service.add(str(ref), held, source, cached=True))
            with _space(self.home), self._registry(options) as client:
                content = client.pull(ref, leased, platform=wanted, progress=progress)
            cached = not any(d in leased.written for d, _ in content.blobs)
            handle = self.service.add(str(ref), content, source, cached=cached)
        return self._bind(handle)

    @contextlib.contextmanager
    def _registry(self, options: RegistryOptions | None) -> Iterator[RegistryClient]:
        key = options if options is not None else environment_fingerprint()
        with self._clients_lock:
            shared = self._client
            if shared is None or shared.key != key or shared.age() > _CLIENT_MAX_AGE:
                if shared is not None:
                    shared.retire()
                client = RegistryClient(options or options_from_environment())
                shared = self._client = _SharedClient(key, client)
            shared.users += 1
        try:
            yield shared.client
        finally:
            with self._clients_lock:
                shared.users -= 1
                if shared.retired and not shared.users:
                    shared.client.close()

    def _held_manifest(self, digest: str | None, leased: _LeasedStore) -> ImageContent | None:
        """The content of manifest `digest` if the cache holds it whole; each blob is claimed
        by the pull's lease as it is checked, so a prune or remove from now on spares it."""
        if digest is None:
            return None
        with self.snapshot() as state:
            record = state.manifest(digest)
        if record is None:
            return None
        for blob, _kind, size in record.content.kinded_blobs():
            if leased.size(blob) != size:
                return None  # removed meanwhile: fetch it again
        return record.content

    def load(
        self,
        source: str | os.PathLike[str] | BinaryIO,
        *,
        tag: str | None = None,
        platform: str | None = None,
    ) -> builtins.list[ImageHandle]:
        """Load images from an OCI layout (directory or tar) or a `docker save` tarball.

        Names come from the archive (`RepoTags`, `org.opencontainers.image.ref.name`); `tag`
        names the image instead (the archive must then hold one image). A bare tag in an OCI
        layout (``latest``) needs `tag` to say which repository it belongs to. Where the archive
        holds several platforms of one image, `platform` (``os/arch[/variant]``, default this
        host's linux platform) picks one, else the first listed; the others are not kept."""
        self._check_writable("load")
        if not isinstance(source, str | os.PathLike) and not hasattr(source, "read"):
            msg = f"load() takes a path or a binary stream, not {type(source).__name__}"
            raise TypeError(msg)
        tag_ref = canonical(tag) if tag is not None else None
        wanted = parse_platform(platform) if platform else host_platform()
        where = os.fsdecode(source) if isinstance(source, str | os.PathLike) else "stdin"
        kind = _source_kind(source)
        with self._bringing(tag or "", f"{kind}:{where}") as leased:
            with _space(self.home):
                loaded = archives.load(
                    Path(os.fsdecode(source)) if isinstance(source, str | os.PathLike) else source,
                    leased,
                )
            named = _names(loaded, tag_ref, wanted, strict=platform is not None)
            # The platforms not chosen leave nothing behind.
            keep = {d for _, image in named for d, _ in image.content.blobs}
            for image in loaded:
                for digest, _ in image.content.blobs:
                    if digest not in keep and digest in leased.written:
                        leased.delete(digest)
                        keep.add(digest)
            handles = self.service.add_all(
                [
                    (
                        reference,
                        image.content,
                        not any(d in leased.written for d, _ in image.content.blobs),
                    )
                    for reference, image in named
                ],
                f"{kind}:{where}",
            )
        return [self._bind(h) for h in handles]

    @contextlib.contextmanager
    def _bringing(self, reference: str, source: str) -> Iterator[_LeasedStore]:
        """One pull or load: its in-flight lease and the store as the source sees it. If it
        fails (an error, an interrupt, SIGTERM in the CLI), the blobs it wrote that nothing
        else needs are deleted before the error leaves, and the failure is recorded: every
        failed pull or load is in the history, whatever failed."""
        with self._leases.lease() as lease:
            leased = _LeasedStore(self.store, lease, self._lock, self._leases, self._knows_blob)
            try:
                yield leased
            except BaseException as e:
                for digest in sorted(leased.written):
                    try:
                        leased.delete(digest)
                    except (OSError, ImageLedgerError) as cleanup:
                        log.warning("bring.cleanup_failed", digest=digest, error=str(cleanup))
                # The work directory goes with the lease anyway; emptied first, so that a
                # failure on a full disk leaves room for the ledger to record it.
                leased.clear_work()
                if isinstance(e, Exception | KeyboardInterrupt) and not isinstance(
                    e, CacheClosedError
                ):
                    self._record_failure(reference, source, e)
                raise

    def save(
        self,
        references: Sequence[str],
        destination: str | os.PathLike[str] | BinaryIO,
        *,
        format: Literal["docker", "oci"] = "docker",
    ) -> None:
        """Write the images to a docker-archive or an OCI archive (tar)."""
        images = []
        for reference in references:
            handle = self.get(reference)
            images.append((handle.reference, handle.manifest_digest))
        if not isinstance(destination, str | os.PathLike):
            with _space("the output stream"):
                archives.save(images, self.store, destination, format=format)
            return
        path = self._destination(Path(destination))
        with _space(path):
            if path.exists() and not path.is_file():
                # A device, a FIFO, a terminal: written through, never replaced by a file
                # (`-o /dev/null` as root must not turn /dev/null into an archive).
                try:
                    out = path.open("wb")
                except OSError as e:
                    msg = f"cannot write the archive to {path}: {e.strerror}"
                    raise InvalidDestinationError(msg) from None
                with out:
                    archives.save(images, self.store, out, format=format)
            else:
                archives.save(images, self.store, path, format=format)

    def _destination(self, path: Path) -> Path:
        """Where `save` writes for `path`: through a link to what it names (so that a link
        stays a link), never inside the home, never over a directory; a missing directory
        or one this user may not write is the caller's mistake (`InvalidDestinationError`,
        exit 2), whatever the command."""
        target = path.resolve()
        home = self.home.resolve()
        if target == home or target.is_relative_to(home):
            msg = f"{path}: inside the cache home {home}; write archives elsewhere"
            raise InvalidDestinationError(msg)
        if target.is_dir() or str(path).endswith("/"):
            msg = f"{path}: is a directory; give a file name for the archive"
            raise InvalidDestinationError(msg)
        if not target.parent.is_dir():
            msg = f"{path}: no such directory {target.parent}"
            raise InvalidDestinationError(msg)
        if (target.is_file() or not target.exists()) and not os.access(target.parent, os.W_OK):
            msg = f"{path}: cannot write in {target.parent} (permission denied)"
            raise InvalidDestinationError(msg)
        return target

    def _record_failure(self, reference: str, source: str, error: BaseException) -> None:
        """Trace a failed pull or load in the ledger, unless the ledger cannot take it (its
        disk is full too): the caller then still gets the original error, not this one."""
        what = str(error) or type(error).__name__
        if not isinstance(error, ImageLedgerError):
            what = f"{type(error).__name__}: {what}"
        try:
            self.service.record_failure(reference, source, what)
        except ImageLedgerError as unrecorded:
            log.warning("pull.failure_not_recorded", error=str(error), why=str(unrecorded))

    def rebuild(
        self, *, verify: bool = False, progress: Callable[[int, int], None] | None = None
    ) -> RebuildReport:
        """Replay the whole log into fresh views (or, with `verify`, into scratch space) and
        compare them with the live ones (semantics 10: they must be identical). Both write
        (the scratch space is in the ledger), so a read-only home refuses them."""
        self._check_writable("rebuild")
        with self._rebuild_lock():
            report = rebuild(self._views, self._decode, verify_only=verify, progress=progress)
        if not verify:
            self._write_index(force=True)
        return report

    def _views_current(self) -> bool:
        """Whether the views are in this version's layout (or hold nothing yet)."""
        with self.snapshot() as state:
            found = state.format
        return found == VIEWS_FORMAT or not self._views.head()

    def _upgrade_views(self) -> None:
        """Views written in another layout (`views.FORMAT`, by another imageledger version) are
        rebuilt from the log before anything reads them: the log is the state, views are
        only a cache of it."""
        if self._views_current():
            return
        self._check_writable("opening views of another imageledger version (they are rebuilt)")
        with self._rebuild_lock():
            with self.snapshot() as state:
                found = state.format
            if found != VIEWS_FORMAT:
                log.warning("views.format_changed", found=found, wanted=VIEWS_FORMAT)
                self.rebuild()  # the lock is re-entrant

    def verify(
        self,
        *,
        repair: bool = False,
        progress: Callable[[int, int], None] | None = None,
        ledger: bool = True,
    ) -> StoreCheck:
        """Check the ledger, then read back and hash every blob it accounts for; with
        `repair`, delete the wrong ones so that the next pull or load fetches them again (see
        the service).

        `ledger`: first check the ledger in a child process (`tools.ledgercheck`: LMDB's
        page structure, every event decoding, views equal to a replay), so that damage
        which would crash a reader is reported, as `LedgerCorruptError`, instead of killing
        this process; and the blobs are only judged against a ledger known to be sound.
        False for a caller that has just checked (the command line checks before it opens
        the cache at all)."""
        if repair:
            self._check_writable("verify --repair")
        if ledger:
            found = check_ledger(self.home / "ledger").error()
            if found is not None:
                raise found
        check = self.service.verify(repair=repair, progress=progress)
        for p in check.problems:
            log.warning(
                "store.blob_damaged", digest=p.digest, problem=p.problem, repaired=p.repaired
            )
        return check

    def df(self) -> dict[str, Any]:
        """Bytes by kind, and what a default prune would reclaim."""
        with self.snapshot() as state:
            by_kind: dict[str, int] = {}
            for blob in state.blobs():
                by_kind[blob.kind] = by_kind.get(blob.kind, 0) + blob.size
            references = sum(1 for _ in state.references())
        dry = self.prune(dry_run=True)
        return {
            "references": references,
            "bytes": by_kind,
            "total_bytes": sum(by_kind.values()),
            "reclaimable_bytes": dry.bytes_reclaimed,
        }

    def close(self) -> None:
        with self._clients_lock:
            if self._client is not None:
                self._client.retire()
                self._client = None
        if not self._closed:
            self._closed = True
            self._app.close()
            self._home.close()

    def __enter__(self) -> ImageCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _writable(home: Path) -> bool:
    """Whether this user may change the home (root may, unless the file system is read-only;
    `access` answers both)."""
    ledger = home / "ledger"
    return os.access(home, os.W_OK) and (not ledger.exists() or os.access(ledger, os.W_OK))


def _source_kind(source: object) -> str:
    if not isinstance(source, str | os.PathLike):
        return "archive"
    path = Path(source)
    return "oci-layout" if path.is_dir() else "archive"


@contextlib.contextmanager
def _space(where: object) -> Iterator[None]:
    """A file system out of space, as the package's own error: it is an expected condition
    a user can act on, not an internal failure."""
    try:
        yield
    except OSError as e:
        if isinstance(e, ImageLedgerError) or e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        msg = f"{where}: the device is full ({e.strerror}); nothing of it was kept"
        raise DiskFullError(e.errno, msg) from e


def _names(
    loaded: list[LoadedImage], tag: str | None, platform: Platform, *, strict: bool
) -> list[tuple[str, LoadedImage]]:
    """Which reference each loaded image gets (see `ImageCache.load`): one image per
    reference; where an archive holds several platforms under one name, the one `platform`
    matches, else (unless `strict`: the platform was asked for) the first the archive lists."""
    named: dict[str, list[LoadedImage]] = {}
    for image in loaded:
        refs = [tag] if tag is not None else _image_refs(image)
        for ref in refs:
            named.setdefault(ref, []).append(image)
    chosen: list[tuple[str, LoadedImage]] = []
    for ref, images in sorted(named.items()):
        platforms = [i.content.platform for i in images]
        if len(set(platforms)) != len(platforms):
            msg = f"the archive holds {len(images)} images for {ref}; load them one at a time"
            raise InvalidReferenceError(msg)
        best = choose_platform(images, platform, strict=strict)
        if best is None:
            offered = sorted({str(i.content.platform) for i in images})
            raise PlatformNotFoundError(ref, str(platform), offered)
        chosen.append((ref, best))
    return chosen


def _image_refs(image: LoadedImage) -> list[str]:
    refs = []
    for name in image.names:
        if "/" not in name and ":" not in name:
            continue  # a bare tag (an OCI layout's ref.name): which repository? --tag says
        try:
            refs.append(str(Reference.parse(name)))
        except InvalidReferenceError:
            continue
    if not refs:
        msg = (
            f"image {image.content.manifest_digest} in the archive has no usable name "
            f"({', '.join(image.names) or 'none'}); name it with --tag"
        )
        raise InvalidReferenceError(msg)
    return sorted(set(refs))


class _AsyncOwner:
    """What a handle from the asyncio API calls back: coroutines over the blocking cache."""

    def __init__(self, cache: ImageCache) -> None:
        self.cache = cache

    async def inspect(self, reference: str) -> ImageDetail:
        detail = await asyncio.to_thread(self.cache.inspect, reference)
        return dataclasses.replace(detail, handle=_async(detail.handle, self.cache))

    async def remove(self, reference: str, force: bool = False) -> None:
        await asyncio.to_thread(self.cache.remove, reference, force)


def _async(handle: ImageHandle, cache: ImageCache) -> ImageHandle:
    """`handle` bound to the cache's asyncio facade. A copy (the blocking cache shares its
    handles with its callers), made the way `ViewState.handles` makes handles."""
    copy = object.__new__(ImageHandle)
    object.__setattr__(copy, "__dict__", {**handle.__dict__, "_owner": cache._async_owner})
    return copy


class Image:
    """The asyncio API with microsandbox's SDK names, over the default cache or `cache`.
    Handles it returns have awaitable `inspect()` and `remove()`."""

    _default: ImageCache | None = None

    @classmethod
    def _cache(cls, cache: ImageCache | None) -> ImageCache:
        if cache is not None:
            return cache
        if cls._default is None:
            cls._default = ImageCache()
        return cls._default

    @classmethod
    async def get(cls, reference: str, *, cache: ImageCache | None = None) -> ImageHandle:
        c = cls._cache(cache)
        return _async(await asyncio.to_thread(c.get, reference), c)

    @classmethod
    async def list(cls, *, cache: ImageCache | None = None) -> builtins.list[ImageHandle]:
        c = cls._cache(cache)
        return await asyncio.to_thread(c._list_for, c._async_owner)

    @classmethod
    async def inspect(cls, reference: str, *, cache: ImageCache | None = None) -> ImageDetail:
        return await cls._cache(cache)._async_owner.inspect(reference)

    @classmethod
    async def remove(
        cls, reference: str, force: bool = False, *, cache: ImageCache | None = None
    ) -> None:
        await asyncio.to_thread(cls._cache(cache).remove, reference, force)

    @classmethod
    async def prune(cls, *, cache: ImageCache | None = None, **options: Any) -> ImagePruneReport:
        return await asyncio.to_thread(lambda: cls._cache(cache).prune(**options))

    @classmethod
    async def pull(
        cls,
        reference: str,
        *,
        platform: str | None = None,
        options: RegistryOptions | None = None,
        cache: ImageCache | None = None,
    ) -> ImageHandle:
        c = cls._cache(cache)
        handle = await asyncio.to_thread(
            lambda: c.pull(reference, platform=platform, options=options)
        )
        return _async(handle, c)

    @classmethod
    async def load(
        cls, source: Any, *, tag: str | None = None, cache: ImageCache | None = None
    ) -> builtins.list[ImageHandle]:
        c = cls._cache(cache)
        return [_async(h, c) for h in await asyncio.to_thread(lambda: c.load(source, tag=tag))]

    @classmethod
    async def save(
        cls,
        references: Sequence[str],
        destination: Any,
        *,
        format: Literal["docker", "oci"] = "docker",
        cache: ImageCache | None = None,
    ) -> None:
        await asyncio.to_thread(
            lambda: cls._cache(cache).save(references, destination, format=format)
        )

    @classmethod
    async def use(
        cls, reference: str, holder: str, *, cache: ImageCache | None = None
    ) -> ImageHandle:
        c = cls._cache(cache)
        return _async(await asyncio.to_thread(c.use, reference, holder), c)

    @classmethod
    async def release(cls, holder: str, *, cache: ImageCache | None = None) -> int:
        return await asyncio.to_thread(cls._cache(cache).release, holder)


__all__ = ["Image", "ImageCache", "default_home"]
