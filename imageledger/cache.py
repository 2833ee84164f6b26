"""`ImageCache`, the blocking API: a thin facade over the application service.

It opens a home, wires the service (`domain.service`) to its adapters (`storage/`), translates
arguments (platform strings, defaults) and binds the handles it returns to itself; every use
case runs in the service. `imageledger.aio.Image` is the asyncio API over it. The layout of a
home is in `storage.layout`.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import functools
import getpass
import json
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, Unpack

from imageledger._version import __version__
from imageledger.domain.errors import (
    AuditInputError,
    BundleError,
    HomeDamagedError,
    InvalidHomeError,
    LedgerError,
    LedgerReadOnlyError,
)
from imageledger.domain.log import get_logger
from imageledger.domain.model import (
    Actor,
    H,
    HistoryEntry,
    ImageDetail,
    ImageHandle,
    ImagePruneReport,
    MaterializedImage,
    RebuildReport,
    StoreCheck,
)
from imageledger.domain.ports import Materializer
from imageledger.domain.service import ImageCacheService
from imageledger.projections.views import FORMAT as VIEWS_FORMAT
from imageledger.storage import layout
from imageledger.storage.blobs import BlobStore
from imageledger.storage.eventstore import FORMAT_VERSION, LedgerStore
from imageledger.storage.home import Dir, mark_home, open_home
from imageledger.storage.indexfile import OciIndexFile
from imageledger.storage.leases import InFlightLeases, StoreLock
from imageledger.storage.ledgercheck import check_ledger as check_ledger_dir
from imageledger.storage.lmdbenv import DURABILITY_MODES
from imageledger.storage.materializer import ArtifactFiles, ErofsMaterializer
from imageledger.storage.oci import host_platform, parse_platform
from imageledger.storage.sources import ArchiveFiles, Registries

if TYPE_CHECKING:
    from imageledger.domain.audit import (  # the registry client (and httpx) load only for a pull
        AuditService,
        ExportCheck,
    )
    from imageledger.domain.filters import ImageFilter, ListFilters
    from imageledger.storage.registry import PullProgress
    from imageledger.storage.registryoptions import RegistryOptions

log = get_logger(__name__)

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


def verify_export(path: str | os.PathLike[str], verifier_key: str) -> ExportCheck:
    """Verify an export of an audit log with nothing but it and the log's verifier key: a
    C2SP tlog-tiles directory (`audit export --tiles`, `storage.tlogexport.verify_tiles`) or
    a JSON Lines file (`audit export --jsonl`, `domain.audit.verify_jsonl`)."""
    from imageledger.domain.audit import ExportCheck, verify_jsonl
    from imageledger.storage.ledgerformat import record_fields

    if os.path.isdir(path):
        from imageledger.storage.tlogexport import verify_tiles

        tiles = verify_tiles(Path(path), verifier_key)
        return ExportCheck(tiles.origin, 1, tiles.size, tiles.size, tiles.root)
    try:
        with open(path, encoding="utf-8") as f:
            return verify_jsonl(f, verifier_key, record_fields)
    except UnicodeDecodeError:
        msg = f"{path}: not an export (not UTF-8 text)"
        raise AuditInputError(msg) from None


def current_actor() -> Actor:
    """Who and where this process runs, for every event it appends (names and ids, no
    secret). A host fact, so it is read here, where the domain is wired to the machine."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = ""
    return Actor(
        user=user, uid=os.getuid(), pid=os.getpid(), host=os.uname().nodename, version=__version__
    )


def _utc_now() -> datetime:
    return datetime.now(UTC)


class _Queries:
    """The queries `ImageCache` and `PastImageCache` answer alike, from their service."""

    _service: ImageCacheService

    def _bind(self, handle: ImageHandle) -> ImageHandle:
        # The handle was made for this call and is not shared yet: setting its owner in place
        # is safe, and four times cheaper than dataclasses.replace on the list() path.
        object.__setattr__(handle, "_owner", self)
        return handle

    def get(self, reference: str) -> ImageHandle:
        """The cached image `reference` names; `ImageNotFoundError` when it is not cached."""
        return self._bind(self._service.get(reference))

    def inspect(self, reference: str) -> ImageDetail[ImageHandle]:
        detail = self._service.inspect(reference)
        return dataclasses.replace(detail, handle=self._bind(detail.handle))

    def history(self, reference: str | None = None) -> builtins.list[HistoryEntry]:
        """Every event of `reference` (or of the whole ledger), oldest first."""
        return self._service.history(reference)

    def df(self) -> dict[str, Any]:
        """Bytes by kind, and what a default prune would reclaim."""
        return self._service.df()


class ImageCache(_Queries):
    """A local OCI image cache whose whole state is an event-sourced ledger (blocking API)."""

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        *,
        clock: Clock | None = None,
        durability: Literal["sync", "nometasync", "nosync"] | None = None,
        create: bool = True,
        audit_key: str | os.PathLike[str] | None = None,
        audit_interval: float | None = None,
        registries_conf: str | os.PathLike[str] | None = None,
        materializer: Materializer | None = None,
    ) -> None:
        """Open the cache at `home` (default `default_home()`).

        `materialize` writes the artifacts a microVM boots with `materializer` (any object
        with the `domain.ports.Materializer` methods; default imageledger's own EROFS and
        VMDK writers, `storage.materializer.ErofsMaterializer`); the ledger records each by
        its `name`.

        Pulls follow the containers registries configuration (containers-registries.conf(5):
        mirrors, location rewrites, blocked and insecure registries): `registries_conf` names
        its main file (its drop-ins are still read), else ``$CONTAINERS_REGISTRIES_CONF``,
        else the per-user or system file (`storage.registriesconf`).

        The ledger is an audit log (`audit`): the checkpoints it signs use the key in the home
        (made on first use), or the key file `audit_key` (else ``$IMAGELEDGER_AUDIT_KEY``);
        while the log grows, this cache signs a checkpoint at most every `audit_interval`
        seconds (default `domain.audit.DEFAULT_INTERVAL`, 5).

        `create=False` is for callers that only read: a missing or empty home is then
        `HomeNotFoundError` instead of a new, empty cache (a mistyped path must not look
        like an empty cache). A directory that is not an imageledger home is refused
        (`InvalidHomeError`), and so is a home whose ledger is gone while its store holds
        content (`LedgerMissingError`): see `storage.home`. A home this user may not write (a
        shared cache) is opened for reading: every query answers, every command that would
        change it is refused in one line (`LedgerReadOnlyError`)."""
        if durability is not None and durability not in DURABILITY_MODES:
            msg = f"unknown durability {durability!r}: use one of {', '.join(DURABILITY_MODES)}"
            raise ValueError(msg)
        self._home = open_home(home if home is not None else default_home(), create=create)
        self.home = self._home.path
        self.read_only = not _writable(self.home)
        try:
            self._ledger = LedgerStore(self._home, read_only=self.read_only, durability=durability)
        except BaseException:
            self._home.close()
            raise
        if not self.read_only:
            mark_home(self._home)
        self._store = store = BlobStore(self._home)
        lock = StoreLock(self._home, readonly=self.read_only)
        leases = InFlightLeases(store, lock)
        self._materializer: Materializer = materializer or ErofsMaterializer()
        self._index = OciIndexFile(self._home, self._ledger)
        self._registries = Registries(self.home, registries_conf)
        self._audit_key, self._audit_interval = audit_key, audit_interval
        self._service = ImageCacheService(
            ledger=self._ledger,
            store=store,
            leases=leases,
            lock=lock,
            index=self._index,
            archives=ArchiveFiles(store),
            clock=clock or _utc_now,
            actor=current_actor(),
            home=str(self.home),
            read_only=self.read_only,
            after_append=self._after_append,
            artifacts=ArtifactFiles(store, leases),
        )
        # list() memos, per owner the handles are bound to (this cache, or its asyncio
        # facade): the last list by ledger position, and handles by row (ViewState.handles).
        self._list_memos: dict[object, tuple[int, builtins.list[Any]]] = {}
        self._handle_memos: dict[object, dict[bytes, Any]] = {}
        try:
            if not self._ledger.current():
                self._service.writable(
                    "opening views of another imageledger version (they are rebuilt)"
                )
                self._ledger.upgrade()
            if not self.read_only:
                self._index.refresh()
        except (OSError, HomeDamagedError) as e:
            if create or not self._ledger.current():
                self.close()
                raise
            # Only reading: a home whose derived files are damaged still answers; whoever
            # writes next repairs them.
            log.warning("home.index_not_written", home=str(self.home), error=str(e))
        except BaseException:
            self.close()
            raise

    @functools.cached_property
    def audit(self) -> AuditService:
        """The ledger as a transparency log (`domain.audit`), made when first used: a query
        loads none of it."""
        from imageledger.domain.audit import AuditService
        from imageledger.storage.auditkey import AuditKeys
        from imageledger.storage.tlog import LedgerAudit

        ledger = self._ledger
        catch_up = ledger.catch_up_tree if not self.read_only else None
        interval = {} if self._audit_interval is None else {"interval": self._audit_interval}
        return AuditService(
            LedgerAudit(ledger.tree, ledger.records, ledger.head, catch_up),
            AuditKeys(self._home, self._audit_key),
            writable=not self.read_only,
            **interval,
        )

    def _after_append(self) -> None:
        self.audit.after_append()

    # -- queries --------------------------------------------------------------------------

    def list(self, **filters: Unpack[ListFilters]) -> builtins.list[ImageHandle]:
        """Every cached reference, newest first (semantics 3); with filters, those that pass
        them all, Docker's image filters by their names (`domain.filters`): `reference`
        patterns (any may match), `dangling` (True: named by digest only), `before` / `since`
        a cached reference (older / newer than it), `label` ``KEY`` or ``KEY=VALUE`` (every one
        must hold). A filter that cannot mean anything is `InvalidFilterError`; a `before` or
        `since` image that is not cached, `ImageNotFoundError`.

        Unfiltered, it is memoised per process while the ledger position is unchanged
        (handles are immutable), so a runtime listing on every sandbox start pays one read
        of the position when nothing changed; any commit, in any process, moves the position
        and invalidates it."""
        return self.list_for(self, ImageHandle, **filters)

    def list_for(
        self, owner: object, cls: type[H], **filters: Unpack[ListFilters]
    ) -> builtins.list[H]:
        """list() as handles of class `cls` whose `inspect()`/`remove()` call `owner` (this
        cache, or the asyncio facade's owner: `imageledger.aio`). Each owner keeps its own
        memos, so its handles stay its own (and the same objects while unchanged)."""
        select = _filter(filters)
        rows = self._handle_memos.setdefault(owner, {})
        if select is not None:
            return _owned(self._service.select(select, rows, cls), owner)
        memo = self._list_memos.get(owner)
        position, handles = self._service.list(memo[0] if memo is not None else None, rows, cls)
        if handles is None:
            assert memo is not None
            return builtins.list(memo[1])
        self._list_memos[owner] = (position, _owned(handles, owner))
        return builtins.list(handles)

    # -- commands -------------------------------------------------------------------------

    def tag(self, source: str, target: str) -> ImageHandle:
        """Give the cached image `source` names a second name, `target`, as `docker tag`
        does; returns the new name's handle. Recorded as its own event (`ImageTagged`: who
        named what, from which name); the new name's created_at is now. A `target` that
        already names an image is moved to this one (as a re-pull moves it); removing either
        name later leaves the other. `ImageNotFoundError` when `source` is not cached;
        `InvalidReferenceError` when `target` is a digest reference."""
        return self._bind(self._service.tag(source, target))

    def use(self, reference: str, holder: str) -> ImageHandle:
        """`holder` (a sandbox id, a snapshot id) now uses the image: it cannot be removed
        without force, nor pruned, until `release(holder)`."""
        return self._bind(self._service.use(reference, holder))

    def release(self, holder: str) -> int:
        """End every lease of `holder`; returns how many it held."""
        return self._service.release(holder)

    def remove(self, reference: str, force: bool = False) -> None:
        """Semantics 6-7. `ImageInUseError` (naming the holders) when it would drop the last
        reference to a leased manifest and `force` is false."""
        self._service.remove(reference, force=force)

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
        return self._service.prune(
            dry_run=dry_run, unused_for=unused_for, keep=keep, max_bytes=max_bytes
        )

    def gc(
        self,
        *,
        high_threshold: int = 85,
        low_threshold: int = 80,
        min_age: float = 120.0,
        max_age: float | None = None,
        dry_run: bool = False,
    ) -> ImagePruneReport:
        """Disk-pressure garbage collection, kubelet's image GC policy with its names and
        defaults, for embedders that run it on a timer. When the file system holding the home
        is at or above `high_threshold` percent of use (used / (used + available), as df
        computes Use%; see `DiskUsage`), remove unused images least recently used first until
        it is at most `low_threshold` percent; an image first pulled less than `min_age`
        seconds ago, or in use (leased, or being pulled), is never removed; with `max_age`
        (seconds), an image unused for longer goes whatever the disk. The report is a prune's
        (`ImagePruneReport`, its `gc` holding the policy and the disk figures seen), and so is
        the event (an `ImagesPruned` whose policy records them); a gc that removes nothing
        records nothing. `ValueError` for thresholds outside 0-100, a low above the high, or a
        max_age not above min_age."""
        return self._service.gc(
            high_threshold=high_threshold,
            low_threshold=low_threshold,
            min_age=min_age,
            max_age=max_age,
            dry_run=dry_run,
        )

    def pull(
        self,
        reference: str,
        *,
        platform: str | None = None,
        options: RegistryOptions | None = None,
        progress: Callable[[PullProgress], None] | None = None,
        materialize: bool = False,
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
        offline from a pinned reference; the pull is recorded like any all-cached pull.

        `materialize`: then `materialize` the image (a failure there raises; the pull stays
        committed)."""
        self._service.writable("pull")
        wanted = parse_platform(platform) if platform else host_platform()
        puller = self._registries.puller(options, progress)
        handle = self._bind(self._service.pull(reference, wanted, puller))
        if materialize:
            self.materialize(handle.reference)
        return handle

    def load(
        self,
        source: str | os.PathLike[str] | BinaryIO,
        *,
        tag: str | None = None,
        platform: str | None = None,
        materialize: bool = False,
    ) -> builtins.list[ImageHandle]:
        """Load images from an OCI layout (directory or tar) or a `docker save` tarball.

        Names come from the archive (`RepoTags`, `org.opencontainers.image.ref.name`); `tag`
        names the image instead (the archive must then hold one image). A bare tag in an OCI
        layout (``latest``) needs `tag` to say which repository it belongs to. Where the archive
        holds several platforms of one image, `platform` (``os/arch[/variant]``, default this
        host's linux platform) picks one, else the first listed; the others are not kept.
        `materialize`: then `materialize` every image loaded (each manifest once)."""
        self._service.writable("load")
        wanted = parse_platform(platform) if platform else host_platform()
        handles = self._service.load(source, tag=tag, platform=wanted, strict=platform is not None)
        if materialize:
            first = {h.manifest_digest: h.reference for h in reversed(handles)}
            for reference in sorted(first.values()):
                self.materialize(reference)
        return [self._bind(h) for h in handles]

    def materialize(self, reference: str) -> MaterializedImage:
        """Make the image bootable by a microVM: each layer as an uncompressed EROFS image,
        a metadata-only fsmeta EROFS of the merged tree pointing into them, and a VMDK
        descriptor joining fsmeta and the layers (bottom to top) into one read-only disk;
        absolute paths in the result. What is already materialized (recorded in the ledger
        and on disk) is not written again, in this or any process; a VMDK naming paths of a
        home since moved is rewritten. Each artifact is recorded in the ledger
        (`LayerMaterialized`, `ImageStitched`) once it is whole and in place; `remove` and
        `prune` delete those no remaining image needs, `verify` hashes them.
        `ImageNotFoundError` when not cached; `LayerRejectedError` (a `MaterializeError`)
        for a layer that cannot become an EROFS image."""
        return self._service.materialize(reference, self._materializer)

    def save(
        self,
        references: Sequence[str],
        destination: str | os.PathLike[str] | BinaryIO,
        *,
        format: Literal["docker", "oci"] = "docker",
    ) -> None:
        """Write the images to a docker-archive or an OCI archive (tar); never into the
        home, and through a device, FIFO or link rather than over it."""
        self._service.save(references, destination, format=format)

    def rebuild(
        self, *, verify: bool = False, progress: Callable[[int, int], None] | None = None
    ) -> RebuildReport:
        """Replay the whole log into fresh views (or, with `verify`, into scratch space) and
        compare them with the live ones (semantics 10: they must be identical)."""
        return self._service.rebuild(verify=verify, progress=progress)

    def verify(
        self,
        *,
        repair: bool = False,
        progress: Callable[[int, int], None] | None = None,
        ledger: bool = True,
    ) -> StoreCheck:
        """Check the ledger, then read back and hash every blob it accounts for; with
        `repair`, delete the wrong ones so that the next pull or load fetches them again.

        `ledger`: first check the ledger in a child process (`storage.ledgercheck`: LMDB's
        page structure, every event decoding, views equal to a replay), so that damage
        which would crash a reader is reported, as `LedgerCorruptError`, instead of killing
        this process; and the blobs are only judged against a ledger known to be sound.
        False for a caller that has just checked (the command line checks before it opens
        the cache at all)."""
        return self._service.verify(repair=repair, progress=progress, ledger=ledger)

    def at(self, when: int | datetime) -> PastImageCache:
        """The cache as it was after the event at position `when`, or after the last event at
        or before the instant `when` (aware datetime): the same queries as this cache (get,
        list, inspect, df, history, a dry-run prune), answering as it answered then, and
        nothing that changes it. The log is replayed up to there. `ValueError` for a
        position outside the ledger, or an instant in the future or before its first event."""
        return PastImageCache(self._service.at(when))

    def explain(self, reference: str, when: int | datetime | None = None) -> dict[str, Any]:
        """Why `reference` is cached, or why it is gone, citing ledger positions (as of `when`,
        a point as for `at`, or now)."""
        return self._service.explain(reference, when)

    def diff(self, first: int | datetime, second: int | datetime) -> dict[str, Any]:
        """What changed between two points of the ledger (positions or aware datetimes, as
        for `at`): references added, removed and re-tagged, leases taken and released, bytes
        gained and reclaimed."""
        return self._service.diff(first, second)

    def debug_bundle(self, out: str | os.PathLike[str]) -> dict[str, Any]:
        """Write a debug bundle of this cache to `out` (`storage.bundle`: a gzip tar of the log
        as stored, the views' digests, the versions, the platform and the configuration with
        every secret removed), for `replay_bundle` on another machine. Returns its manifest."""
        from imageledger.storage.bundle import (
            configuration,
            created_at,
            host_platform,
            versions,
            write_bundle,
        )

        self._service.check_open()
        ledger = self._ledger
        manifest = {
            "created_at": created_at(),
            "home": str(self.home),
            "ledger_format": FORMAT_VERSION,
            "views_format": VIEWS_FORMAT,
            "views": ledger.view_digests(),
            "versions": versions(),
            "platform": host_platform(),
            "configuration": configuration(os.environ),
        }
        return write_bundle(Path(out), manifest, ledger.log_records())

    def close(self) -> None:
        self._registries.close()
        if not self._service.closed:
            self._service.close()
            self._ledger.close()
            self._home.close()

    def __enter__(self) -> ImageCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PastImageCache(_Queries):
    """`ImageCache.at`: the cache as it was at one position of its ledger (read only).

    Its queries are the service's own over the replayed views, so a past answer is what the
    live cache answered at that moment (tests compare the two). A dry-run prune plans from the
    views alone: what the disk and the in-flight pulls held then is not recorded, so orphans,
    strays and in-flight leases are not in a past plan. Its handles' `inspect()` answers as of
    the same moment; anything that would change the cache is `LedgerReadOnlyError`."""

    def __init__(self, service: ImageCacheService) -> None:
        self._service = service
        assert service.past is not None
        self.position: int = service.past

    def list(self, **filters: Unpack[ListFilters]) -> builtins.list[ImageHandle]:
        """As `ImageCache.list`, filters included, as the cache was then."""
        select = _filter(filters)
        if select is not None:
            return [self._bind(h) for h in self._service.select(select, {}, ImageHandle)]
        _position, handles = self._service.list(None, {}, ImageHandle)
        assert handles is not None
        return [self._bind(h) for h in handles]

    def prune(
        self,
        *,
        dry_run: bool = True,
        unused_for: float | None = None,
        keep: Sequence[str] = (),
        max_bytes: int | None = None,
    ) -> ImagePruneReport:
        """The plan a prune would have made then (dry runs only)."""
        if not dry_run:
            msg = f"the cache as it was at position {self.position} cannot be pruned"
            raise LedgerReadOnlyError(msg)
        return self._service.prune(
            dry_run=True, unused_for=unused_for, keep=keep, max_bytes=max_bytes
        )

    def remove(self, reference: str, force: bool = False) -> None:
        msg = f"the cache as it was at position {self.position} cannot be changed"
        raise LedgerReadOnlyError(msg)


@dataclasses.dataclass(frozen=True)
class Internals:
    """What a cache is wired from, typed as the adapters they are."""

    service: ImageCacheService
    ledger: LedgerStore
    store: BlobStore
    index: OciIndexFile


def internals(cache: ImageCache) -> Internals:
    """The application service under `cache` and its adapters: for operator tools,
    benchmarks and tests that drive or observe a use case's parts. Not part of the public
    API (`imageledger/__init__.py` does not export it)."""
    return Internals(cache._service, cache._ledger, cache._store, cache._index)


def check_ledger(home: str | os.PathLike[str]) -> LedgerError | None:
    """Check the ledger of the home at `home` in a child process (LMDB's page structure, every
    event decoding, views equal to a replay), before anything in this process opens it:
    damage that would crash a reader (LMDB aborts on some damaged pages) is returned as
    `LedgerCorruptError`, not died of; a ledger in another format, as `LedgerFormatError`.
    None when it is sound, or when there is no ledger directory to check (a link planted at
    ``ledger/`` is not followed: opening the home reports it as damage)."""
    ledger = Path(home) / layout.LEDGER
    if not ledger.is_dir() or ledger.is_symlink():
        return None
    return check_ledger_dir(ledger).error()


def _owned(handles: builtins.list[H], owner: object) -> builtins.list[H]:
    """`handles`, made for this call and not shared yet, bound to `owner` in place (as
    `_bind` binds one, without a call per handle)."""
    bind = object.__setattr__
    for handle in handles:
        bind(handle, "_owner", owner)
    return handles


def _filter(filters: ListFilters) -> ImageFilter | None:
    """`list()`'s filters checked (`domain.filters`), None when there are none: the module
    loads only for a filtered list (a runtime's unfiltered list, a query, pay nothing)."""
    if not filters:
        return None
    from imageledger.domain.filters import image_filter

    select = image_filter(**filters)
    return None if select.empty else select


def _writable(home: Path) -> bool:
    """Whether this user may change the home (root may, unless the file system is read-only;
    `access` answers both). A home made by `replay_bundle` is someone else's past: never."""
    ledger = home / layout.LEDGER
    if os.path.lexists(home / layout.REPLAYED):
        return False
    return os.access(home, os.W_OK) and (not ledger.exists() or os.access(ledger, os.W_OK))


def replay_bundle(
    bundle: str | os.PathLike[str],
    home: str | os.PathLike[str],
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Make `home` (a directory that does not exist yet, or an empty one) a read-only home
    holding the log of the debug bundle `bundle` (`ImageCache.debug_bundle`), record for
    record at the same positions, with its views, their checkpoints and its audit tree folded
    from it: every query and `at` answer there as they answered where the bundle was made.
    Returns the bundle's manifest with ``views_differ``: the tables whose digest differs from
    the views the bundle's home had (none, unless those views were not a replay of their log:
    the bug, perhaps). A bundle that cannot be read is `BundleError`, and the home is left as
    it was found."""
    from imageledger.storage.bundle import BundleReader

    target = Path(home)
    made = not target.exists()
    if not made and (not target.is_dir() or target.is_symlink() or any(target.iterdir())):
        msg = f"{target}: a bundle is replayed into a new home only (a missing or empty directory)"
        raise BundleError(msg)
    with BundleReader(Path(bundle)) as reader:
        try:
            with ImageCache(target, durability="nosync") as cache:
                ledger = internals(cache).ledger
                ledger.import_log(reader.records(), progress, reader.manifest["events"])
                digests = ledger.view_digests()
            found = reader.manifest.get("views")
            views = found if isinstance(found, dict) else {}
            manifest = {
                **reader.manifest,
                "views_differ": sorted(t for t in digests if views.get(t) != digests[t]),
            }
            with open_home(target, create=False) as replayed:
                text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
                replayed.write_atomic(layout.REPLAYED, text.encode())
        except BaseException:
            _undo_replay(target, made=made)
            raise
    return manifest


def _undo_replay(target: Path, *, made: bool) -> None:
    """Empty the home a failed replay was making, through the home's one way of deleting
    (`Dir.delete`: links are removed, never followed), and remove it if the replay made it."""
    with contextlib.suppress(OSError), Dir.at(target) as home:
        for name, _found in home.entries():
            home.delete(name)
    if made:
        with contextlib.suppress(OSError):
            target.rmdir()


__all__ = [
    "ImageCache",
    "Internals",
    "check_ledger",
    "default_home",
    "internals",
    "replay_bundle",
]
