"""Pruning: retention applied per source and region, through a trash that can be undone.

Functional core (pure, no I/O, no clock):

- :func:`plan_prune` turns the snapshots complete in each (source, region),
  the source's retention config, ``now``, protected ids and ``force`` into a
  :class:`PrunePlan` that explains every id (KEEP, DELETE, LOCKED, BLOCKED);
- :func:`plan_purge` picks the trash entries older than ``trash_days``.

Imperative shell: :func:`run_prune` and :func:`undo_prune`, which the daemon's
prune job and ``drctl prune`` both call. They print nothing and return reports.

Ordering (docs/format.md, "Pruning and the trash"):

1. *trash*: the manifest is copied to ``sources/<src>/trash/<id>.<stamp>.json``
   (``stamp`` = the deletion time, so no object mtime is needed), then
   ``manifests/<id>.json`` is deleted. The snapshot stops listing at once; its
   data stays.
2. *purge*, once the trash entry is ``trash_days`` old: the data object is
   deleted, then the trash entry. A crash in between leaves a trash entry whose
   data is gone; the next purge finishes it (deleting a missing object is fine).
3. *undo*: the trash manifest is authenticated, put back in ``manifests/``,
   then the trash entry is removed.
4. *orphans*: data objects that no manifest or trash entry in any region names
   (a backup that died between its data and its manifest) are deleted once an
   earlier run saw them orphaned a grace period ago (orphans.py).

A snapshot's date for retention is its manifest's ``consistency_time``: the
promises ("14 fulls across at least 3 months", RPO) are about how old the
*data* is, and that is what consistency time measures; ``finished_at`` would
date a slow dump by when it ended, and the id's second is only when the job
started. All three are authenticated by the manifest's MAC, but only
consistency time means "the source as it was then".
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from . import catalog, layout, locks, manifest, orphans, retention, state
from .config import RetentionConfig, SourceConfig
from .drills.records import newest_verified
from .errors import DrError, IntegrityError, UsageError
from .manifest import Manifest
from .orphans import OrphanPlan
from .runtime import Runtime
from .storage import NotFound, ObjectStore
from .units import format_duration, format_utc

KEEP, DELETE, LOCKED, BLOCKED = "keep", "delete", "locked", "blocked"
REASON_PROTECTED = "protected"
REASON_SAFETY_NET = "safety net"


# -- functional core ---------------------------------------------------------

@dataclass(frozen=True)
class Snapshot:
    """A snapshot complete in one region, as the planner sees it (a retention.Dated)."""

    id: str
    created_at: datetime  # the manifest's consistency_time (see the module docstring)
    locked_until: datetime | None = None  # Object Lock retain-until of its objects there


@dataclass(frozen=True)
class RegionInput:
    """What one (source, region) holds: its complete snapshots and the ones it cannot trust."""

    source: str
    region: str
    retention: RetentionConfig
    snapshots: tuple[Snapshot, ...]
    invalid: tuple[tuple[str, str], ...] = ()  # (id, problem): never touched


@dataclass(frozen=True)
class Verdict:
    id: str
    created_at: datetime
    action: str  # KEEP, DELETE, LOCKED or BLOCKED
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "created_at": self.created_at.isoformat(),
                "action": self.action, "reasons": list(self.reasons)}


@dataclass(frozen=True)
class RegionPlan:
    """The decisions for one source in one region, newest first."""

    source: str
    region: str
    verdicts: tuple[Verdict, ...]
    invalid: tuple[tuple[str, str], ...] = ()
    blocked: str | None = None  # why the safety net stopped every deletion here
    forced: str | None = None  # the safety net that --force overrode

    @property
    def delete_ids(self) -> tuple[str, ...]:
        return tuple(v.id for v in self.verdicts if v.action == DELETE)

    def count(self, action: str) -> int:
        return sum(v.action == action for v in self.verdicts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "region": self.region,
            "blocked": self.blocked, "forced": self.forced,
            "counts": {a: self.count(a) for a in (KEEP, DELETE, LOCKED, BLOCKED)},
            "snapshots": [v.to_dict() for v in self.verdicts],
            "invalid": [{"id": i, "problem": p} for i, p in self.invalid],
        }


@dataclass(frozen=True)
class PrunePlan:
    now: datetime
    force: bool
    regions: tuple[RegionPlan, ...]

    @property
    def blocked(self) -> tuple[RegionPlan, ...]:
        return tuple(r for r in self.regions if r.blocked)

    def to_dict(self) -> dict[str, Any]:
        return {"now": self.now.isoformat(), "force": self.force,
                "regions": [r.to_dict() for r in self.regions]}


def policy_of(cfg: RetentionConfig) -> retention.RetentionPolicy:
    return retention.RetentionPolicy(cfg.daily, cfg.weekly, cfg.monthly, cfg.min_age)


def plan_region(inp: RegionInput, now: datetime, *, protected: Collection[str] = frozenset(),
                force: bool = False, tz: tzinfo = UTC) -> RegionPlan:
    """Retention for one (source, region), then protection, locks and the safety net.

    Protected and locked snapshots still take part in the retention plan (so
    they do not shift the tiers); they are only exempted from deletion.
    """
    rplan = retention.plan(inp.snapshots, policy_of(inp.retention), now, tz)
    locks = {s.id: s.locked_until for s in inp.snapshots}
    decisions = sorted(rplan.keep + rplan.delete, key=lambda d: (d.created_at, d.id),
                       reverse=True)
    verdicts = []
    for d in decisions:
        until = locks.get(d.id)
        if d.id in protected:
            verdicts.append(Verdict(d.id, d.created_at, KEEP,
                                    (d.reasons if d.keep else ()) + (REASON_PROTECTED,)))
        elif d.keep:
            verdicts.append(Verdict(d.id, d.created_at, KEEP, d.reasons))
        elif until is not None and until > now:
            verdicts.append(Verdict(d.id, d.created_at, LOCKED,
                                    (*d.reasons, f"locked until {format_utc(until)}")))
        else:
            verdicts.append(Verdict(d.id, d.created_at, DELETE, d.reasons))
    deletes, total = sum(v.action == DELETE for v in verdicts), len(verdicts)
    fraction = inp.retention.max_delete_fraction
    # The net is for a run gone wrong (a clock jump, a config typo that sets
    # daily = 1): it never deletes more than this share of a region's snapshots.
    blocked, forced = retention.delete_guard(deletes, total, fraction, force, "snapshots")
    if blocked:
        verdicts = [Verdict(v.id, v.created_at, BLOCKED, (*v.reasons, REASON_SAFETY_NET))
                    if v.action == DELETE else v for v in verdicts]
    return RegionPlan(inp.source, inp.region, tuple(verdicts), inp.invalid, blocked, forced)


def plan_prune(inputs: Iterable[RegionInput], now: datetime, *,
               protected: Collection[str] = frozenset(), force: bool = False,
               tz: tzinfo = UTC) -> PrunePlan:
    """Plan every (source, region) independently; see :func:`plan_region`.

    Regions are planned apart because they may hold different sets (a
    degraded snapshot, a region that was down): each keeps its own newest
    snapshot and its own safety net.
    """
    protected = frozenset(protected)
    return PrunePlan(now, force, tuple(
        plan_region(inp, now, protected=protected, force=force, tz=tz) for inp in inputs))


@dataclass(frozen=True)
class TrashEntry:
    source: str
    region: str
    snapshot_id: str
    trashed_at: datetime
    name: str  # object name of the trashed manifest


def trash_entry(source: str, region: str, name: str) -> TrashEntry | None:
    """The trash entry a listed object name stands for (layout.parse_trash_name), or
    None for a stray object."""
    parsed = layout.parse_trash_name(name)
    if parsed is None:
        return None
    return TrashEntry(source, region, parsed[0], parsed[1], name)


def plan_purge(entries: Iterable[TrashEntry], trash_days: int,
               now: datetime) -> tuple[TrashEntry, ...]:
    """Trash entries at least `trash_days` old, oldest first."""
    due = [e for e in entries if now - e.trashed_at >= timedelta(days=trash_days)]
    return tuple(sorted(due, key=lambda e: (e.trashed_at, e.source, e.region, e.snapshot_id)))


# -- reports -----------------------------------------------------------------

@dataclass(frozen=True)
class Change:
    """One step on storage: done, planned (dry run), skipped or failed, and why."""

    action: str  # "trash", "purge", "undo" or "orphan"
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
class PruneReport:
    plan: PrunePlan
    dry_run: bool
    changes: list[Change] = field(default_factory=list)
    region_errors: list[RegionError] = field(default_factory=list)
    orphans: list[OrphanPlan] = field(default_factory=list)  # only regions with orphans

    @property
    def ok(self) -> bool:
        """False if the safety net blocked a source, a region was unreadable, a step
        failed or a data object lost its manifest (orphans.LOST)."""
        return (not self.plan.blocked and not self.region_errors
                and not any(o.blocked or o.lost for o in self.orphans)
                and all(c.status != "failed" for c in self.changes))

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "dry_run": self.dry_run, **self.plan.to_dict(),
                "changes": [c.to_dict() for c in self.changes],
                "region_errors": [e.to_dict() for e in self.region_errors],
                "orphans": [o.to_dict() for o in self.orphans]}


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


# -- imperative shell --------------------------------------------------------

def _checked(m: Manifest) -> Manifest:
    """Refuse a manifest whose object names are not its own: deleting them could hit
    another snapshot."""
    expected = layout.data_object_name(m.source, m.id, m.kind)
    if m.data_name != expected:
        raise IntegrityError(f"manifest names data object {m.data_name!r}, "
                             f"expected {expected!r}")
    facts = layout.facts_object_name(m.source, m.id)
    if m.facts_object is not None and m.facts_object.name != facts:
        raise IntegrityError(f"manifest names facts object {m.facts_object.name!r}, "
                             f"expected {facts!r}")
    return m


def _locked_until(store: ObjectStore, names: Iterable[str]) -> datetime | None:
    dates = [d for d in (store.retained_until(n) for n in names) if d is not None]
    return max(dates) if dates else None


def _region_input(rt: Runtime, src: SourceConfig, store: ObjectStore, now: datetime,
                  tz: tzinfo) -> RegionInput:
    """List and authenticate one (source, region); raises DrError if it cannot be read."""
    listing = catalog.list_snapshots(rt, src.name, store.name)
    if listing.region_errors:
        raise DrError(next(iter(listing.region_errors.values())))
    snaps: list[tuple[Snapshot, Manifest]] = []
    invalid: list[tuple[str, str]] = []
    for entry in listing.snapshots:
        try:
            if entry.manifest is None:
                raise IntegrityError("; ".join(entry.problems.values()) or "unreadable manifest")
            m = _checked(entry.manifest)
        except IntegrityError as exc:
            invalid.append((entry.id, str(exc)))
            continue
        snaps.append((Snapshot(m.id, m.consistency_time), m))
    # Only what retention would delete is asked for its lock: one HEAD per
    # object, and nothing at all in stores without Object Lock.
    expired = set(retention.plan([s for s, _ in snaps], policy_of(src.retention), now,
                                 tz).delete_ids)
    final = tuple(
        Snapshot(s.id, s.created_at, _locked_until(
            store, (*m.object_names(), layout.manifest_object_name(src.name, m.id))))
        if s.id in expired else s for s, m in snaps)
    return RegionInput(src.name, store.name, src.retention, final, tuple(invalid))


def _trash(rt: Runtime, store: ObjectStore, source: str, snap_id: str, now: datetime,
           trash_days: int) -> Change:
    mname = layout.manifest_object_name(source, snap_id)
    tname = layout.trash_name(source, snap_id, now)
    try:
        raw = store.get_bytes(mname, manifest.MAX_MANIFEST_BYTES)
        # The bytes moved are the ones planned with: authentic, and this id's.
        _checked(manifest.parse(raw, rt.manifest_key, source=source, snapshot_id=snap_id))
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


def _exists(store: ObjectStore, name: str) -> bool:
    try:
        store.stat(name)
    except NotFound:
        return False
    return True


def _purge(rt: Runtime, store: ObjectStore, e: TrashEntry, now: datetime,
           dry_run: bool) -> Change:
    def change(status: str, detail: str) -> Change:
        return Change("purge", e.source, e.region, e.snapshot_id, status, detail)

    try:
        raw = store.get_bytes(e.name, manifest.MAX_MANIFEST_BYTES)
        # Only an authentic manifest may name the data object to delete.
        m = _checked(manifest.parse(raw, rt.manifest_key, source=e.source,
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
            until = _locked_until(store, m.object_names())
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


def _trash_entries(store: ObjectStore, source: str) -> list[TrashEntry]:
    entries = (trash_entry(source, store.name, info.name)
               for info in store.list(layout.trash_prefix(source)))
    return [e for e in entries if e is not None]


def run_prune(rt: Runtime, sources: list[str] | None = None, *, dry_run: bool = False,
              force: bool = False, protected: Collection[str] = frozenset(),
              orphan_grace: timedelta | None = None) -> PruneReport:
    """Plan retention for every chosen source and region; unless `dry_run`, trash
    what the plan deletes, purge trash older than the source's `trash_days`,
    then delete orphan data objects past the grace period (orphans.py): each
    source's `[retention] orphan_grace`, or `orphan_grace` for all if given.

    A dry run takes no lock: it only reads (it does not record orphan sightings
    either). `protected` ids are never deleted, and neither is the newest
    drill-verified snapshot of each source (read here, so that the daemon and
    drctl both keep the proof that a restore works). One unreadable region or
    failing step never stops the others; everything is in the report.
    """
    if orphan_grace is not None and orphan_grace < orphans.MIN_ORPHAN_GRACE:
        raise UsageError(f"the orphan grace period must be at least "
                         f"{format_duration(orphans.MIN_ORPHAN_GRACE)}: a backup on another "
                         "host may be about to commit what looks orphaned")
    if orphan_grace is not None and orphan_grace > orphans.MAX_ORPHAN_GRACE:
        raise UsageError(f"the orphan grace period must be at most "
                         f"{format_duration(orphans.MAX_ORPHAN_GRACE)}: every copy of a "
                         "departed institution's data must be gone within 4 weeks")
    chosen = rt.config.pick_sources(sources)
    protected = frozenset(protected) | frozenset(
        newest_verified(rt.config.daemon.state_dir).values())
    tz = ZoneInfo(rt.config.daemon.timezone)  # day/week/month as the operator's calendar
    lock: AbstractContextManager[object] = (
        contextlib.nullcontext() if dry_run else locks.deletions_lock(rt.config.daemon.state_dir))
    # One mirror of the audit log for the whole run, not one per deletion.
    with rt.audit_batch(), lock:
        now = rt.clock()
        inputs: list[RegionInput] = []
        errors: list[RegionError] = []
        for src in chosen:
            for store in rt.stores:
                try:
                    inputs.append(_region_input(rt, src, store, now, tz))
                except DrError as exc:
                    errors.append(RegionError(src.name, store.name, str(exc)))
        plan = plan_prune(inputs, now, protected=protected, force=force, tz=tz)
        report = PruneReport(plan, dry_run, region_errors=errors)
        for rp in plan.regions:
            store = rt.store(rp.region)
            for snap_id in rp.delete_ids:
                report.changes.append(
                    Change("trash", rp.source, rp.region, snap_id, "planned",
                           f"would move {layout.manifest_object_name(rp.source, snap_id)} "
                           f"to {layout.trash_prefix(rp.source)}") if dry_run
                    else _trash(rt, store, rp.source, snap_id, now,
                                rt.config.source(rp.source).retention.trash_days))
        for src in chosen:
            for store in rt.stores:
                if any(e.source == src.name and e.region == store.name for e in errors):
                    continue
                try:
                    entries = _trash_entries(store, src.name)
                except DrError as exc:
                    report.region_errors.append(RegionError(src.name, store.name, str(exc)))
                    continue
                for entry in plan_purge(entries, src.retention.trash_days, now):
                    report.changes.append(_purge(rt, store, entry, now, dry_run))
        _sweep_orphans(rt, chosen, report, now, orphan_grace, protected, force)
    return report


def _sweep_orphans(rt: Runtime, chosen: list[SourceConfig], report: PruneReport,
                   now: datetime, grace: timedelta | None, protected: Collection[str],
                   force: bool) -> None:
    """Find and (unless a dry run) delete orphan data objects; record the sightings.
    `grace` overrides every source's own `orphan_grace`."""
    state_dir = rt.config.daemon.state_dir
    seen = orphans.load_seen(state_dir)
    in_flight = state.live_inflight(state_dir)
    records = orphans.audit_records(state_dir)
    observed: list[tuple[str, str]] = []
    gone: set[tuple[str, str]] = set()
    for src in chosen:
        plans, unreadable = orphans.plan_source(
            rt, src, now, grace=src.retention.orphan_grace if grace is None else grace,
            first_seen=seen, in_flight=in_flight, protected=protected, force=force,
            records=records)
        known = {(e.source, e.region) for e in report.region_errors}
        report.region_errors += [RegionError(src.name, r, why) for r, why in unreadable.items()
                                 if (src.name, r) not in known]
        observed += [(src.name, s.name) for s in rt.stores if s.name not in unreadable]
        report.orphans += plans
        for op in plans:
            for v in op.to_delete:
                if report.dry_run:
                    report.changes.append(Change("orphan", src.name, op.region, v.snapshot_id,
                                                 "planned", f"would delete {v.name}"))
                    continue
                status, detail = orphans.delete(rt, rt.store(op.region), src.name, v)
                if status == "done":
                    gone.add((op.region, v.name))
                report.changes.append(Change("orphan", src.name, op.region, v.snapshot_id,
                                             status, detail))
    if not report.dry_run:
        live = {(s.name, r.name) for s in rt.config.sources for r in rt.stores}
        orphans.save_seen(state_dir, seen, observed, report.orphans, gone, live)


def _undo(rt: Runtime, store: ObjectStore, e: TrashEntry) -> Change:
    def change(status: str, detail: str) -> Change:
        return Change("undo", e.source, e.region, e.snapshot_id, status, detail)

    mname = layout.manifest_object_name(e.source, e.snapshot_id)
    try:
        raw = store.get_bytes(e.name, manifest.MAX_MANIFEST_BYTES)
        m = _checked(manifest.parse(raw, rt.manifest_key, source=e.source,
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
    with rt.audit_batch(), locks.deletions_lock(rt.config.daemon.state_dir):
        found: list[tuple[ObjectStore, TrashEntry]] = []
        for src in chosen:
            for store in rt.stores:
                try:
                    entries = _trash_entries(store, src.name)
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
