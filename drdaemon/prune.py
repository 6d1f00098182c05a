"""Pruning: retention applied per source and region, through a trash that can be undone.

:func:`run_prune`, which the daemon's prune job and ``drctl prune`` both call,
lists and authenticates every (source, region), plans with the pure core of
prune_plan.py, then, under the deletions lock, moves what the plan deletes to
the trash and purges trash that is due (trash.py, where the ordering on storage
is written down), and deletes orphan data objects: data that no manifest or
trash entry in any region names (a backup that died between its data and its
manifest), once an earlier run saw them orphaned a grace period ago
(orphans.py). It prints nothing and returns a report; ``drctl prune --undo`` is
trash.undo_prune.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from . import catalog, erasure_sweep, layout, lifecycle, locks, orphans, retention, state
from .config import SourceConfig
from .drills.records import newest_verified
from .errors import DrError, IntegrityError, UsageError
from .manifest import Manifest
from .orphans import OrphanPlan
from .prune_plan import PrunePlan, RegionInput, Snapshot, plan_prune, plan_purge, policy_of
from .runtime import Runtime
from .storage import ObjectStore
from .trash import Change, RegionError, checked, list_trash, locked_until, move_to_trash, purge
from .units import format_duration


@dataclass
class PruneReport:
    plan: PrunePlan
    dry_run: bool
    changes: list[Change] = field(default_factory=list)
    region_errors: list[RegionError] = field(default_factory=list)
    orphans: list[OrphanPlan] = field(default_factory=list)  # only regions with orphans
    held: list[str] = field(default_factory=list)  # sources skipped: their tenant is held

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
                "orphans": [o.to_dict() for o in self.orphans], "held": self.held}


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
            m = checked(entry.manifest)
        except IntegrityError as exc:
            invalid.append((entry.id, str(exc)))
            continue
        snaps.append((Snapshot(m.id, m.consistency_time), m))
    # Only what retention would delete is asked for its lock: one HEAD per
    # object, and nothing at all in stores without Object Lock.
    expired = set(retention.plan([s for s, _ in snaps], policy_of(src.retention), now,
                                 tz).delete_ids)
    final = tuple(
        Snapshot(s.id, s.created_at, locked_until(
            store, (*m.object_names(), layout.manifest_object_name(src.name, m.id))))
        if s.id in expired else s for s, m in snaps)
    return RegionInput(src.name, store.name, src.retention, final, tuple(invalid))


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
    # A legal hold suspends every deletion of the tenant's data (lifecycle.py).
    held = [s.name for s in chosen if lifecycle.is_held(rt, s.tenant)]
    chosen = [s for s in chosen if s.name not in held]
    protected = frozenset(protected) | frozenset(
        newest_verified(rt.config.daemon.state_dir).values())
    tz = ZoneInfo(rt.config.daemon.timezone)  # day/week/month as the operator's calendar
    lock: AbstractContextManager[object] = (
        contextlib.nullcontext() if dry_run else locks.deletions_for(rt.config.daemon))
    # One mirror of the audit log for the whole run, not one per deletion.
    with rt.audit_batch(), lock:
        if not dry_run:  # a daemon that lost the cluster lock deletes nothing
            rt.fence("prune")
        now = rt.clock()
        swept = _sweep_erased(rt, now, dry_run, sources or None)
        inputs: list[RegionInput] = []
        errors: list[RegionError] = []
        for src in chosen:
            for store in rt.stores:
                try:
                    inputs.append(_region_input(rt, src, store, now, tz))
                except DrError as exc:
                    errors.append(RegionError(src.name, store.name, str(exc)))
        plan = plan_prune(inputs, now, protected=protected, force=force, tz=tz)
        report = PruneReport(plan, dry_run, changes=swept, region_errors=errors, held=held)
        for rp in plan.regions:
            store = rt.store(rp.region)
            for snap_id in rp.delete_ids:
                report.changes.append(
                    Change("trash", rp.source, rp.region, snap_id, "planned",
                           f"would move {layout.manifest_object_name(rp.source, snap_id)} "
                           f"to {layout.trash_prefix(rp.source)}") if dry_run
                    else move_to_trash(rt, store, rp.source, snap_id, now,
                                rt.config.source(rp.source).retention.trash_days))
        for src in chosen:
            for store in rt.stores:
                if any(e.source == src.name and e.region == store.name for e in errors):
                    continue
                try:
                    entries = list_trash(store, src.name)
                except DrError as exc:
                    report.region_errors.append(RegionError(src.name, store.name, str(exc)))
                    continue
                for entry in plan_purge(entries, src.retention.trash_days, now):
                    report.changes.append(purge(rt, store, entry, now, dry_run))
        _sweep_orphans(rt, chosen, report, now, orphan_grace, protected, force)
    return report


def _sweep_erased(rt: Runtime, now: datetime, dry_run: bool,
                  sources: list[str] | None) -> list[Change]:
    """What erasures left under Object Lock, deleted once the lock ends, before and
    whatever retention plans (erasure_sweep.sweep_erased): an erased tenant's newest or
    drill-verified snapshot proves nothing any more. Named `sources` alone, if any."""
    return [Change("erased", s.source, s.region, s.snapshot_id, s.status, s.detail)
            for s in erasure_sweep.sweep_erased(rt, now, dry_run, sources)]


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
