"""A hypothesis state machine drives random pulls, uses, releases, removes (forced or not) and
prunes, with aliases sharing manifests and images sharing layers, against a plain reference
model of semantics 2-8. After every step the cache answers what the model says (handles, list
order, timestamps, in-use refusals, what is on disk); at the end a rebuild equals the views
maintained incrementally (semantics 10)."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from imageledger import ImageCache, ImageInUseError, ImageNotFoundError
from imageledger.cache import internals
from imageledger.domain.model import OCI_MANIFEST, ImageConfig, ImageContent, Layer, Platform
from imageledger.storage.blobs import BlobStore

REFS = ("docker.io/library/alpine:3", "docker.io/library/alpine:latest", "ghcr.io/o/app:1")
HOLDERS = ("sandbox-a", "sandbox-b", "snapshot-c")
BASE = datetime(2026, 1, 1, tzinfo=UTC)


def synthetic_image(store: BlobStore, name: str, layers: list[bytes]) -> ImageContent:
    """An image whose blobs are written to `store` (real files, real digests)."""
    descriptors = []
    for position, data in enumerate(layers):
        digest = store.write_bytes(data)
        descriptors.append(
            Layer(digest, "application/vnd.oci.image.layer.v1.tar", len(data), digest, position)
        )
    config = json.dumps({"name": name, "architecture": "arm64"}).encode()
    config_digest = store.write_bytes(config)
    manifest = json.dumps({"name": name, "layers": [d.blob_digest for d in descriptors]}).encode()
    manifest_digest = store.write_bytes(manifest)
    return ImageContent(
        manifest_digest=manifest_digest,
        manifest_media_type=OCI_MANIFEST,
        manifest_size=len(manifest),
        config=ImageConfig(config_digest, env=(f"NAME={name}",), cmd=("/bin/sh",)),
        config_size=len(config),
        platform=Platform("linux", "arm64", "v8"),
        layers=tuple(descriptors),
    )


SHARED = b"shared base layer" * 64
LAYERS = {
    "one": [SHARED, b"one-top" * 10],
    "two": [SHARED, b"two-top" * 20],
    "three": [b"three-only" * 30],
}


@dataclass
class Ref:
    manifest: str
    created: datetime
    used: datetime
    position: int


@dataclass
class Model:
    refs: dict[str, Ref] = field(default_factory=dict)
    leases: dict[str, set[tuple[str, str]]] = field(default_factory=dict)
    present: set[str] = field(default_factory=set)  # manifests in the cache
    step: int = 0

    def holders_of(self, manifest: str) -> set[str]:
        return {h for h, ls in self.leases.items() if any(m == manifest for _, m in ls)}

    def names_of(self, manifest: str) -> set[str]:
        return {r for r, ref in self.refs.items() if ref.manifest == manifest}


class Clock:
    def __init__(self) -> None:
        self.now = BASE

    def __call__(self) -> datetime:
        return self.now


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="imageledger-model-"))
        self.clock = Clock()
        self.cache = ImageCache(self.dir, clock=self.clock, durability="nosync")
        self.model = Model()
        # Content is written once; the store keeps blobs the ledger no longer needs only
        # until a remove or prune deletes them, so each pull rewrites its image's blobs.
        self.images = {
            name: synthetic_image(internals(self.cache).store, name, ls)
            for name, ls in LAYERS.items()
        }
        for digest in list(internals(self.cache).store.digests()):
            internals(self.cache).store.delete(digest)

    def teardown(self) -> None:
        try:
            report = self.cache.rebuild(verify=True)
            assert report.identical, report.tables
            before = self.cache.list()
            self.cache.rebuild()
            assert self.cache.list() == before
        finally:
            self.cache.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def tick(self) -> datetime:
        self.model.step += 1
        # Several steps share a second now and then, to exercise the tie-break by position.
        self.clock.now = BASE + timedelta(seconds=self.model.step // 2)
        return self.clock.now

    @rule(ref=st.sampled_from(REFS), name=st.sampled_from(sorted(LAYERS)))
    def pull(self, ref: str, name: str) -> None:
        now = self.tick()
        content = synthetic_image(internals(self.cache).store, name, LAYERS[name])
        internals(self.cache).service.add_all([(ref, content, False)], f"test:{name}")
        digest = content.manifest_digest
        old = self.model.refs.get(ref)
        if old is None:
            self.model.refs[ref] = Ref(digest, now, now, self.model.step)
        else:
            old.manifest, old.used = digest, now
        self.model.present.add(digest)

    @rule(ref=st.sampled_from(REFS), holder=st.sampled_from(HOLDERS))
    def use(self, ref: str, holder: str) -> None:
        now = self.tick()
        if ref not in self.model.refs:
            with pytest.raises(ImageNotFoundError):
                self.cache.use(ref, holder)
            return
        handle = self.cache.use(ref, holder)
        assert handle.last_used_at == now
        self.model.leases.setdefault(holder, set()).add((ref, self.model.refs[ref].manifest))
        self.model.refs[ref].used = now

    @rule(holder=st.sampled_from(HOLDERS))
    def release(self, holder: str) -> None:
        self.tick()
        assert self.cache.release(holder) == len(self.model.leases.pop(holder, set()))

    @rule(ref=st.sampled_from(REFS), force=st.booleans())
    def remove(self, ref: str, force: bool) -> None:
        self.tick()
        model = self.model
        if ref not in model.refs:
            with pytest.raises(ImageNotFoundError):
                self.cache.remove(ref, force=force)
            return
        manifest = model.refs[ref].manifest
        others = model.names_of(manifest) - {ref}
        holders = model.holders_of(manifest)
        if not others and holders and not force:
            with pytest.raises(ImageInUseError) as refused:
                self.cache.remove(ref, force=force)
            assert set(refused.value.holders) == holders
            return
        self.cache.remove(ref, force=force)
        del model.refs[ref]
        if not others and not holders:
            model.present.discard(manifest)

    @rule()
    def prune(self) -> None:
        self.tick()
        model = self.model
        leased = {m for ls in model.leases.values() for _, m in ls}
        gone_refs = {r for r, ref in model.refs.items() if ref.manifest not in leased}
        for r in gone_refs:
            del model.refs[r]
        named = {ref.manifest for ref in model.refs.values()}
        gone_manifests = {m for m in model.present if m not in named and m not in leased}
        model.present -= gone_manifests
        report = self.cache.prune()
        assert report.image_refs_removed == len(gone_refs)
        assert report.manifests_removed == len(gone_manifests)

    @precondition(lambda self: self.model.refs)
    @rule(data=st.data())
    def get_any_spelling(self, data: st.DataObject) -> None:
        ref = data.draw(st.sampled_from(sorted(self.model.refs)))
        spelling = ref.removeprefix("docker.io/library/").removesuffix(":latest")
        assert self.cache.get(spelling).reference == ref

    @invariant()
    def answers_match_the_model(self) -> None:
        model = self.model
        expected = sorted(
            model.refs.items(), key=lambda kv: (kv[1].created, kv[1].position), reverse=True
        )
        handles = self.cache.list()
        assert [h.reference for h in handles] == [r for r, _ in expected]
        for handle, (_, ref) in zip(handles, expected, strict=True):
            assert handle.manifest_digest == ref.manifest
            assert handle.created_at == ref.created
            assert handle.last_used_at == ref.used
            assert handle.architecture == "arm64" and handle.os == "linux"
        for name in REFS:
            if name not in model.refs:
                with pytest.raises(ImageNotFoundError):
                    self.cache.get(name)

    @invariant()
    def index_json_lists_every_reference_of_the_model(self) -> None:
        """index.json (joined from per-reference bytes the folds keep) is the canonical OCI
        index of the model's references, in reference order, each with its manifest."""
        images = {c.manifest_digest: c for c in self.images.values()}
        entries = []
        for reference in sorted(self.model.refs):
            content = images[self.model.refs[reference].manifest]
            platform = {"architecture": content.platform.architecture, "os": content.platform.os}
            if content.platform.variant:
                platform["variant"] = content.platform.variant
            entries.append(
                {
                    "annotations": {"org.opencontainers.image.ref.name": reference},
                    "digest": content.manifest_digest,
                    "mediaType": content.manifest_media_type,
                    "platform": platform,
                    "size": content.manifest_size,
                }
            )
        data = (self.cache.home / "index.json").read_bytes()
        index = json.loads(data)
        assert index["manifests"] == entries
        assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
        assert data == json.dumps(index, sort_keys=True, separators=(",", ":")).encode()

    @invariant()
    def disk_holds_exactly_the_live_content(self) -> None:
        images = {c.manifest_digest: c for c in self.images.values()}
        live = {d for m in self.model.present for d, _ in images[m].blobs}
        assert set(internals(self.cache).store.digests()) == live


CacheMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestCacheAgainstModel = CacheMachine.TestCase
