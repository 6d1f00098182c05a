"""The trash: a pruned snapshot's way out of storage, and back (docs/format.md, "Pruning
and the trash").

1. *trash*: the manifest is copied to ``sources/<src>/trash/<id>.<stamp>.json``
   (``stamp`` = the deletion time, so no object mtime is needed), then
   ``manifests/<id>.json`` is deleted. The snapshot stops listing at once; its
   data stays.
2. *purge*, once the trash entry is ``trash_days`` old: the data object is
   deleted, then the trash entry. A crash in between leaves a trash entry whose
   data is gone; the next purge finishes it (deleting a missing object is fine).
3. *undo*: the trash manifest is authenticated, put back in ``manifests/``,
   then the trash entry is removed (:func:`undo_prune`, ``drctl prune --undo``).

Each step on one object is a function returning a :class:`Change`; prune.py
decides which steps to take (prune_plan.py) and calls them under the deletions lock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from . import layout, locks, manifest
from .errors import DrError, IntegrityError, UsageError
from .manifest import Manifest
from .prune_plan import TrashEntry, trash_entry
from .runtime import Runtime
from .storage import NotFound, ObjectStore
from .units import format_utc


@dataclass(frozen=True)
class Change:
    """One step on storage: done, planned (dry run), skipped or failed, and why."""

    action: str  # "trash", "purge", "undo", "orphan" or "erased"
    source: str
    region: str
    snapshot_id: str
    status: str  # "done", "planned", "skipped" or "failed"
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"action": self.action, "source": self.source, "region": self.region,
                "snapshot_id": self.snapshot_id, "status": self.status, "detail": self.detail}


@dataclass(frozen=True)
class RegionError:
    source: str
    region: str
    error: str

    def to_dict(self) -> dict[str, str]:
        return {"source": self.source, "region": self.region, "error": self.error}


@dataclass
class UndoReport:
    changes: list[Change] = field(default_factory=list)
    region_errors: list[RegionError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.region_errors and all(c.status != "failed" for c in self.changes)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "changes": [c.to_dict() for c in self.changes],
                "region_errors": [e.to_dict() for e in self.region_errors]}


def checked(m: Manifest) -> Manifest:
    """`m`, if the object names it gives are its own; IntegrityError if not: deleting
    them could hit another snapshot."""
    expected = layout.data_object_name(m.source, m.id, m.kind)
    if m.data_name != expected:
        raise IntegrityError(f"manifest names data object {m.data_name!r}, "
                             f"expected {expected!r}")
    facts = layout.facts_object_name(m.source, m.id)
    if m.facts_object is not None and m.facts_object.name != facts:
        raise IntegrityError(f"manifest names facts object {m.facts_object.name!r}, "
                             f"expected {facts!r}")
    return m


def locked_until(store: ObjectStore, names: Iterable[str]) -> datetime | None:
    """The latest Object Lock retain-until date of `names` in `store`, if any."""
    dates = [d for d in (store.retained_until(n) for n in names) if d is not None]
    return max(dates) if dates else None


def _exists(store: ObjectStore, name: str) -> bool:
    try:
        store.stat(name)
    except NotFound:
        return False
    return True


def list_trash(store: ObjectStore, source: str) -> list[TrashEntry]:
    """The trash entries of `source` in `store` (stray objects left out)."""
    entries = (trash_entry(source, store.name, info.name)
               for info in store.list(layout.trash_prefix(source)))
    return [e for e in entries if e is not None]


def move_to_trash(rt: Runtime, store: ObjectStore, source: str, snap_id: str,
                  now: datetime, trash_days: int) -> Change:
    """Move one snapshot's manifest to the trash; its data stays for `trash_days`."""
    mname = layout.manifest_object_name(source, snap_id)
    tname = layout.trash_name(source, snap_id, now)
    try:
        raw = store.get_bytes(mname, manifest.MAX_MANIFEST_BYTES)
        # The bytes moved are the ones planned with: authentic, and this id's.
        checked(manifest.parse(raw, rt.manifest_key, source=source, snapshot_id=snap_id))
        store.put_bytes(tname, raw)
        store.delete(mname)  # manifest first out of the listing; the data stays
    except NotFound:
        return Change("trash", source, store.name, snap_id, "skipped",
                      "manifest already gone")
    except DrError as exc:
        return Change("trash", source, store.name, snap_id, "failed", str(exc))
    rt.record_event("prune.trash", source=source, region=store.name, snapshot_id=snap_id,
                    manifest=mname, trash=tname)
    due = format_utc(now + timedelta(days=trash_days))
    return Change("trash", source, store.name, snap_id, "done",
                  f"manifest moved to {tname}; data kept, purged from {due}")


def purge(rt: Runtime, store: ObjectStore, e: TrashEntry, now: datetime,
          dry_run: bool) -> Change:
    """Delete a due trash entry's data objects, then the entry (unless `dry_run`)."""
    def change(status: str, detail: str) -> Change:
        return Change("purge", e.source, e.region, e.snapshot_id, status, detail)

    try:
        raw = store.get_bytes(e.name, manifest.MAX_MANIFEST_BYTES)
        # Only an authentic manifest may name the data object to delete.
        m = checked(manifest.parse(raw, rt.manifest_key, source=e.source,
                                    snapshot_id=e.snapshot_id))
    except IntegrityError as exc:
        return change("failed", f"trash entry {e.name} not trusted, left in place: {exc}")
    except NotFound:
        return change("skipped", f"trash entry {e.name} already gone")
    except DrError as exc:
        return change("failed", str(exc))
    objects = " and ".join(m.object_names())
    if dry_run:
        return change("planned", f"would delete {objects} and {e.name}")
    try:
        if _exists(store, layout.manifest_object_name(e.source, e.snapshot_id)):
            # Committed again since (an undo, a repair): the data is live.
            store.delete(e.name)
            detail = f"snapshot is committed again; kept its data, removed {e.name}"
        else:
            until = locked_until(store, m.object_names())
            if until is not None and until > now:
                return change("skipped", f"data locked until {format_utc(until)}; "
                                         "purged by a later run")
            # The trash entry goes last: while it stays, a crash in between is
            # finished by the next purge.
            for name in m.object_names():
                store.delete(name)
            store.delete(e.name)
            detail = f"deleted {objects} and {e.name}"
    except DrError as exc:
        return change("failed", str(exc))
    rt.record_event("prune.purge", source=e.source, region=e.region,
                    snapshot_id=e.snapshot_id, data=m.data_name, trash=e.name, detail=detail)
    return change("done", detail)


def _undo(rt: Runtime, store: ObjectStore, e: TrashEntry) -> Change:
    def change(status: str, detail: str) -> Change:
        return Change("undo", e.source, e.region, e.snapshot_id, status, detail)

    mname = layout.manifest_object_name(e.source, e.snapshot_id)
    try:
        raw = store.get_bytes(e.name, manifest.MAX_MANIFEST_BYTES)
        m = checked(manifest.parse(raw, rt.manifest_key, source=e.source,
                                    snapshot_id=e.snapshot_id))
    except IntegrityError as exc:
        return change("failed", f"trash entry {e.name} is not authenticated by the manifest "
                                f"key; left in the trash: {exc}")
    except NotFound:
        return change("skipped", f"trash entry {e.name} already gone")
    except DrError as exc:
        return change("failed", str(exc))
    try:
        if _exists(store, mname):
            detail = f"already committed; removed {e.name}"
        elif gone := [n for n in m.object_names() if not _exists(store, n)]:
            return change("failed", f"{' and '.join(gone)} {'is' if len(gone) == 1 else 'are'} "
                                    "gone (purged); "
                                    "restore from another region or copy")
        else:
            store.put_bytes(mname, raw)
            detail = f"manifest restored from {e.name}"
        store.delete(e.name)
    except DrError as exc:
        return change("failed", str(exc))
    rt.record_event("prune.undo", source=e.source, region=e.region,
                    snapshot_id=e.snapshot_id, manifest=mname, trash=e.name)
    return change("done", detail)


def undo_prune(rt: Runtime, sources: list[str] | None = None,
               snapshot_id: str | None = None) -> UndoReport:
    """Put trashed snapshots (all of the chosen sources, or one id) back, in every region.

    Raises UsageError for a malformed id, or one found in no region's trash.
    """
    if snapshot_id is not None and not layout.is_snapshot_id(snapshot_id):
        raise UsageError(f"invalid snapshot id {snapshot_id!r}: expected an id like "
                         "20261123T020000Z-1a2b3c4d")
    chosen = rt.config.pick_sources(sources)
    report = UndoReport()
    with rt.audit_batch(), locks.deletions_for(rt.config.daemon):
        found: list[tuple[ObjectStore, TrashEntry]] = []
        for src in chosen:
            for store in rt.stores:
                try:
                    entries = list_trash(store, src.name)
                except DrError as exc:
                    report.region_errors.append(RegionError(src.name, store.name, str(exc)))
                    continue
                found += [(store, e) for e in entries
                          if snapshot_id is None or e.snapshot_id == snapshot_id]
        if snapshot_id is not None and not found:
            unread = "".join(f"; region {e.region} unreadable: {e.error}"
                             for e in report.region_errors)
            raise UsageError(f"snapshot {snapshot_id} is in no region's trash of "
                             f"{', '.join(s.name for s in chosen) or 'any source'}{unread}")
        # Newest trash entry first: if an id was trashed twice, the latest copy wins.
        found.sort(key=lambda se: (se[1].source, se[1].region, se[1].snapshot_id,
                                   -se[1].trashed_at.timestamp()))
        for store, entry in found:
            report.changes.append(_undo(rt, store, entry))
    return report
