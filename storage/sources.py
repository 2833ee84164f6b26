"""Where images come from and go to, as the application service sees them: registries (the
domain's `Puller`, with the client pool the pulls of one cache share) and archives (`Archives`:
OCI layouts and docker archives, read and written). A full disk is the package's
`DiskFullError` here, whatever the source was doing.

The registry client (with httpx) and the archive readers and writers are imported by the
methods that use them: the cache wires this module for every command, and a `use` or an
`images` must not pay for loading them."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

from imageledger.domain.errors import DiskFullError, ImageLedgerError, InvalidDestinationError
from imageledger.domain.model import LoadedImage, Platform, PulledImage
from imageledger.domain.ports import ArchiveDestination, ArchiveSource, SourceStore
from imageledger.domain.reference import Reference
from imageledger.storage.blobs import BlobStore
from imageledger.storage.leases import LeasedStore

if TYPE_CHECKING:
    from imageledger.storage.registriesconf import RegistriesConfig
    from imageledger.storage.registry import PullProgress, RegistryClient
    from imageledger.storage.registryoptions import RegistryOptions

_CLIENT_MAX_AGE: Final = 600.0  # s


@contextlib.contextmanager
def disk_space(where: object) -> Iterator[None]:
    """A file system out of space, as the package's own error: it is an expected condition
    a user can act on, not an internal failure."""
    try:
        yield
    except OSError as e:
        if isinstance(e, ImageLedgerError) or e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        msg = f"{where}: the device is full ({e.strerror}); nothing of it was kept"
        raise DiskFullError(e.errno, msg) from e


class _SharedClient:
    """The registry client the pulls of one cache share; closed once retired and unused
    (the caller holds the pool's lock for every change)."""

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


class Registries:
    """The registry clients of one cache: the pulls share one (its connections and tokens)
    while their options stay the same (by default: while the environment and Docker's
    config.json are unchanged, and at most 10 minutes, so credential helpers are asked
    again)."""

    def __init__(self, home: Path, registries_conf: str | os.PathLike[str] | None = None) -> None:
        self.home = home
        self.registries_conf = registries_conf
        self._lock = threading.Lock()
        self._client: _SharedClient | None = None

    def puller(
        self,
        options: RegistryOptions | None = None,
        progress: Callable[[PullProgress], None] | None = None,
    ) -> RegistryPuller:
        return RegistryPuller(self, options, progress)

    @contextlib.contextmanager
    def client(self, options: RegistryOptions | None) -> Iterator[RegistryClient]:
        from imageledger.storage.registry import RegistryClient
        from imageledger.storage.registryoptions import (
            environment_fingerprint,
            options_from_environment,
        )

        conf = self.registries_conf
        if options is not None and options.registries is None and conf is not None:
            options = dataclasses.replace(options, registries=self.configuration(options))
        key = options if options is not None else environment_fingerprint(registries_conf=conf)
        with self._lock:
            shared = self._client
            if shared is None or shared.key != key or shared.age() > _CLIENT_MAX_AGE:
                if shared is not None:
                    shared.retire()
                client = RegistryClient(options or options_from_environment(registries_conf=conf))
                shared = self._client = _SharedClient(key, client)
            shared.users += 1
        try:
            yield shared.client
        finally:
            with self._lock:
                shared.users -= 1
                if shared.retired and not shared.users:
                    shared.client.close()

    def configuration(self, options: RegistryOptions | None) -> RegistriesConfig | None:
        """The registries configuration a pull with `options` goes by: the options' own, else
        the cache's (`registries_conf`) for options that name none, else, without options,
        the environment's (as `options_from_environment` reads it). Reads the files only."""
        if options is not None and (options.registries is not None or self.registries_conf is None):
            return options.registries
        from imageledger.storage.registriesconf import load_registries_conf

        return load_registries_conf(path=self.registries_conf)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.retire()
                self._client = None


class RegistryPuller:
    """One pull's registry: the shared client, with this pull's options and progress."""

    def __init__(
        self,
        registries: Registries,
        options: RegistryOptions | None,
        progress: Callable[[PullProgress], None] | None,
    ) -> None:
        self._registries = registries
        self._options = options
        self._progress = progress

    def admit(self, reference: Reference) -> None:
        """Refuse `reference` when the registries configuration blocks it. Reads the
        registries configuration (not the credentials) and makes no client: an offline pull
        stays offline. Options that name no configuration take the one read here, so that
        the pull's client does not read it again."""
        registries = self._registries.configuration(self._options)
        if registries is None:
            return
        registries.endpoints(reference)  # raises when blocked (insecure hosts do not count)
        if self._options is not None and self._options.registries is None:
            self._options = dataclasses.replace(self._options, registries=registries)

    def pull(self, reference: Reference, store: SourceStore, platform: Platform) -> PulledImage:
        assert isinstance(store, LeasedStore)  # the one SourceStore: InFlightLeases.bringing
        with disk_space(self._registries.home), self._registries.client(self._options) as c:
            return c.fetch(reference, store, platform=platform, progress=self._progress)


class ArchiveFiles:
    """Archives read into and written from one home's blob store."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self.home = store.root

    def label(self, source: ArchiveSource) -> str:
        if not isinstance(source, str | os.PathLike) and not hasattr(source, "read"):
            msg = f"load() takes a path or a binary stream, not {type(source).__name__}"
            raise TypeError(msg)
        if not isinstance(source, str | os.PathLike):
            return "archive:stdin"
        path = Path(os.fsdecode(source))
        return f"{'oci-layout' if path.is_dir() else 'archive'}:{os.fsdecode(source)}"

    def load(self, source: ArchiveSource, store: SourceStore) -> list[LoadedImage]:
        assert isinstance(store, LeasedStore)  # the one SourceStore: InFlightLeases.bringing
        from imageledger.storage import archives

        with disk_space(self.home):
            return archives.load(
                Path(os.fsdecode(source)) if isinstance(source, str | os.PathLike) else source,
                store,
            )

    def save(
        self,
        images: Sequence[tuple[str, str]],
        destination: ArchiveDestination,
        *,
        format: Literal["docker", "oci"],
    ) -> None:
        from imageledger.storage import archives

        if not isinstance(destination, str | os.PathLike):
            with disk_space("the output stream"):
                archives.save(images, self.store, destination, format=format)
            return
        path = self._destination(Path(destination))
        with disk_space(path):
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
