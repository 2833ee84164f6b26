"""`Image`, the asyncio API with microsandbox's Python SDK names (``await Image.get(ref)``,
``list``, ``inspect``, ``remove``, ``prune``, ``load``, ``save``, plus ``pull``, ``use`` and
``release``), over the cache at ``$IMAGELEDGER_HOME`` unless one is passed. Same names and
semantics as the blocking `ImageCache` (DESIGN.md semantics 1-11); each call runs the blocking
one in a worker thread, and the handles it returns have awaitable `inspect()` and `remove()`.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, ClassVar, Literal, Unpack

from imageledger.cache import ImageCache
from imageledger.domain.filters import ListFilters
from imageledger.domain.model import (
    CachedImage,
    ImageDetail,
    ImagePruneReport,
    MaterializedImage,
)
from imageledger.storage.registry import PullProgress
from imageledger.storage.registryoptions import RegistryOptions


@dataclass(frozen=True, eq=False)
class AsyncImageHandle(CachedImage):
    """The asyncio API's handle: `await handle.inspect()`, `await handle.remove()`. Equal to
    the blocking API's handle of the same state (`CachedImage`)."""

    # The asyncio owner of the cache that answered; not part of the value.
    _owner: _AsyncOwner | None = field(default=None, compare=False, repr=False)

    async def inspect(self) -> ImageDetail[AsyncImageHandle]:
        """The image's details, as the cache holds them now."""
        return await self._require_owner().inspect(self.reference)

    async def remove(self, force: bool = False) -> None:
        """Remove this reference (semantics 6-7)."""
        await self._require_owner().remove(self.reference, force)

    def _require_owner(self) -> _AsyncOwner:
        if self._owner is None:
            msg = "this handle was not obtained from a cache"
            raise RuntimeError(msg)
        return self._owner


class _AsyncOwner:
    """What a handle from the asyncio API calls back: coroutines over the blocking cache."""

    def __init__(self, cache: ImageCache) -> None:
        self.cache = cache

    async def inspect(self, reference: str) -> ImageDetail[AsyncImageHandle]:
        detail = await asyncio.to_thread(self.cache.inspect, reference)
        return ImageDetail(self.bind(detail.handle), detail.config, detail.layers, detail.endpoints)

    async def remove(self, reference: str, force: bool = False) -> None:
        await asyncio.to_thread(self.cache.remove, reference, force)

    def bind(self, handle: CachedImage) -> AsyncImageHandle:
        """`handle`'s value as this owner's handle, made the way `ViewState.handles` makes
        handles (the field map handed over at once)."""
        fields = {name: getattr(handle, name) for name in _FIELDS}
        made = object.__new__(AsyncImageHandle)
        object.__setattr__(made, "__dict__", {**fields, "_owner": self})
        return made


_FIELDS = tuple(f.name for f in dataclasses.fields(CachedImage))
_OWNERS: weakref.WeakKeyDictionary[ImageCache, _AsyncOwner] = weakref.WeakKeyDictionary()


def _owner(cache: ImageCache) -> _AsyncOwner:
    """The one asyncio owner of `cache` (so that its list() memo is kept between calls)."""
    owner = _OWNERS.get(cache)
    if owner is None:
        owner = _OWNERS.setdefault(cache, _AsyncOwner(cache))
    return owner


class Image:
    """The asyncio API over the default cache or `cache`."""

    _default: ClassVar[ImageCache | None] = None

    @classmethod
    def _cache(cls, cache: ImageCache | None) -> ImageCache:
        if cache is not None:
            return cache
        if cls._default is None:
            cls._default = ImageCache()
        return cls._default

    @classmethod
    async def get(cls, reference: str, *, cache: ImageCache | None = None) -> AsyncImageHandle:
        c = cls._cache(cache)
        return _owner(c).bind(await asyncio.to_thread(c.get, reference))

    @classmethod
    async def list(
        cls, *, cache: ImageCache | None = None, **filters: Unpack[ListFilters]
    ) -> builtins.list[AsyncImageHandle]:
        """Every cached image, newest first; the filters as `ImageCache.list`'s."""
        c = cls._cache(cache)
        return await asyncio.to_thread(lambda: c.list_for(_owner(c), AsyncImageHandle, **filters))

    @classmethod
    async def tag(
        cls, source: str, target: str, *, cache: ImageCache | None = None
    ) -> AsyncImageHandle:
        """`ImageCache.tag`: a second name for a cached image."""
        c = cls._cache(cache)
        return _owner(c).bind(await asyncio.to_thread(c.tag, source, target))

    @classmethod
    async def inspect(
        cls, reference: str, *, cache: ImageCache | None = None
    ) -> ImageDetail[AsyncImageHandle]:
        return await _owner(cls._cache(cache)).inspect(reference)

    @classmethod
    async def remove(
        cls, reference: str, force: bool = False, *, cache: ImageCache | None = None
    ) -> None:
        await asyncio.to_thread(cls._cache(cache).remove, reference, force)

    @classmethod
    async def prune(
        cls,
        *,
        dry_run: bool = False,
        unused_for: float | None = None,
        keep: Sequence[str] = (),
        max_bytes: int | None = None,
        cache: ImageCache | None = None,
    ) -> ImagePruneReport:
        c = cls._cache(cache)
        return await asyncio.to_thread(
            lambda: c.prune(dry_run=dry_run, unused_for=unused_for, keep=keep, max_bytes=max_bytes)
        )

    @classmethod
    async def gc(
        cls,
        *,
        high_threshold: int = 85,
        low_threshold: int = 80,
        min_age: float = 120.0,
        max_age: float | None = None,
        dry_run: bool = False,
        cache: ImageCache | None = None,
    ) -> ImagePruneReport:
        """`ImageCache.gc`: disk-pressure garbage collection, kubelet's policy."""
        c = cls._cache(cache)
        return await asyncio.to_thread(
            lambda: c.gc(
                high_threshold=high_threshold,
                low_threshold=low_threshold,
                min_age=min_age,
                max_age=max_age,
                dry_run=dry_run,
            )
        )

    @classmethod
    async def pull(
        cls,
        reference: str,
        *,
        platform: str | None = None,
        options: RegistryOptions | None = None,
        progress: Callable[[PullProgress], None] | None = None,
        materialize: bool = False,
        cache: ImageCache | None = None,
    ) -> AsyncImageHandle:
        c = cls._cache(cache)
        handle = await asyncio.to_thread(
            lambda: c.pull(
                reference,
                platform=platform,
                options=options,
                progress=progress,
                materialize=materialize,
            )
        )
        return _owner(c).bind(handle)

    @classmethod
    async def load(
        cls,
        source: str | os.PathLike[str] | BinaryIO,
        *,
        tag: str | None = None,
        platform: str | None = None,
        materialize: bool = False,
        cache: ImageCache | None = None,
    ) -> builtins.list[AsyncImageHandle]:
        c = cls._cache(cache)
        handles = await asyncio.to_thread(
            lambda: c.load(source, tag=tag, platform=platform, materialize=materialize)
        )
        return [_owner(c).bind(h) for h in handles]

    @classmethod
    async def materialize(
        cls, reference: str, *, cache: ImageCache | None = None
    ) -> MaterializedImage:
        """`ImageCache.materialize`: the layers' EROFS images, fsmeta and VMDK."""
        return await asyncio.to_thread(cls._cache(cache).materialize, reference)

    @classmethod
    async def save(
        cls,
        references: Sequence[str],
        destination: str | os.PathLike[str] | BinaryIO,
        *,
        format: Literal["docker", "oci"] = "docker",
        cache: ImageCache | None = None,
    ) -> None:
        c = cls._cache(cache)
        await asyncio.to_thread(lambda: c.save(references, destination, format=format))

    @classmethod
    async def use(
        cls, reference: str, holder: str, *, cache: ImageCache | None = None
    ) -> AsyncImageHandle:
        c = cls._cache(cache)
        return _owner(c).bind(await asyncio.to_thread(c.use, reference, holder))

    @classmethod
    async def release(cls, holder: str, *, cache: ImageCache | None = None) -> int:
        return await asyncio.to_thread(cls._cache(cache).release, holder)


__all__ = ["AsyncImageHandle", "Image"]
