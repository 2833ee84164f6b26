"""What each event means in the history of a reference: which references it concerns and the
entry it makes, in words. History is made from the events themselves when asked for (the views
only index which events concern a reference), so the log stays the one record of who did what.

Events are told apart by their class's name, the stored topic of format 2 (`ImagePulled`, ...),
not by importing their classes: those are eventsourcing aggregate events, and a query (which
folds nothing and decodes no event) must not load eventsourcing to answer (issue 10: its import
is a fifth of a command-line query's time).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from imageledger.domain.model import Actor, HistoryEntry

if TYPE_CHECKING:
    from imageledger.domain.events import ImageLedger


def mentions(event: Any) -> list[tuple[str, str]]:
    """(reference, manifest digest) of each reference `event` is part of the history of."""
    name = type(event).__name__
    if name in ("ImagePulled", "ImageTagged"):
        digest = event.content.manifest_digest
        named = [(event.reference, digest)]
        # A tag's new name first (its ledger entry is the new name's); the source's history
        # shows the names it was given.
        source = getattr(event, "source_reference", event.reference)
        if source != event.reference:
            named.append((source, digest))
        return named
    if name in ("ImageUsed", "ImageRemoved", "RemoveRefused", "LayerMaterialized", "ImageStitched"):
        return [(event.reference, event.manifest_digest)]
    if name == "HolderReleased":
        return list(event.leases)
    if name == "ImagesPruned":
        return [(r.reference, r.manifest_digest) for r in event.references]
    if name == "PullFailed" and event.reference:
        return [(event.reference, "")]
    return []  # Started; a failed load of an unnamed archive is in the ledger's history only


def _pruned_detail(event: ImageLedger.ImagesPruned, reference: str) -> str:
    for removed in event.references:
        if removed.reference == reference:
            return removed.reason
    summary = f"{len(event.references)} references, {event.bytes_reclaimed} bytes"
    gc = event.policy.gc
    if gc is not None:
        summary = f"{gc.describe()}: {summary}"
    return summary


def _via(event: Any) -> str:
    """Where a pull came from when it was not simply the registry its reference names (a
    mirror, a rewritten location: the registries configuration), in words; else nothing."""
    endpoints = getattr(event, "endpoints", ())
    named = str(event.source).removeprefix("registry:")
    if all(not e.mirror and e.location == named for e in endpoints):
        return ""
    return " via " + "; ".join(e.describe() for e in endpoints)


def _removed_detail(event: ImageLedger.ImageRemoved, reference: str) -> str:
    return ("forced, " if event.forced else "") + (
        f"deleted {len(event.deleted)} blobs, {event.bytes_reclaimed} bytes"
        if event.deleted
        else "untagged"
    )


# What happened to a reference in an event, in words (history entries).
_DETAILS: Final[dict[str, Callable[[Any, str], str]]] = {
    "ImagePulled": lambda e, _: (
        f"from {e.source}" + _via(e) + (" (all cached)" if e.cached else "")
    ),
    "ImageTagged": lambda e, reference: (
        f"from {e.source_reference}" if reference == e.reference else f"as {e.reference}"
    ),
    "ImageUsed": lambda e, _: f"by {e.holder}",
    "LayerMaterialized": lambda e, _: (
        f"layer {e.diff_id} as {e.erofs.path} ({e.erofs.size} bytes, {e.materializer})"
    ),
    "ImageStitched": lambda e, _: (
        f"{len(e.layers)} layers: {e.fsmeta.path} ({e.fsmeta.size} bytes), {e.vmdk.path} "
        f"({e.vmdk.size} bytes), {e.materializer}"
    ),
    "HolderReleased": lambda e, _: f"by {e.holder}",
    "ImageRemoved": _removed_detail,
    "RemoveRefused": lambda e, _: "in use by " + ", ".join(e.holders),
    "PullFailed": lambda e, _: f"from {e.source}: {e.error}",
    "ImagesPruned": _pruned_detail,
}


def _entry(position: int, event: Any, reference: str, manifest: str) -> HistoryEntry:
    actor: Actor = event.actor
    name = type(event).__name__
    return HistoryEntry(
        position=position,
        event=name,
        at=event.timestamp,
        reference=reference,
        manifest_digest=manifest,
        detail=_DETAILS[name](event, reference) if name in _DETAILS else "",
        user=actor.user,
        host=actor.host,
        pid=actor.pid,
    )


def reference_entries(position: int, event: Any, reference: str) -> list[HistoryEntry]:
    """The history entries of `reference` that `event` (at `position`) makes."""
    return [_entry(position, event, r, m) for r, m in mentions(event) if r == reference]


def ledger_entry(position: int, event: Any) -> HistoryEntry:
    """`event` as one entry of the whole ledger's history: the entry of the one reference it
    concerns, or a summary with no reference (a prune, a release of several leases)."""
    concerned = mentions(event)
    if len(concerned) == 1 or type(event).__name__ == "ImageTagged":
        return _entry(position, event, *concerned[0])
    entry = _entry(position, event, "", "")
    if type(event).__name__ == "HolderReleased":
        entry = dataclasses.replace(entry, detail=f"by {event.holder}, {len(concerned)} leases")
    return entry
