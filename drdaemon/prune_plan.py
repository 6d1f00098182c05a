"""The prune plan: which snapshots retention deletes, and which trash entries are due.

Pure (no I/O, no clock): :func:`plan_prune` turns the snapshots complete in
each (source, region), the source's retention config, ``now``, protected ids
and ``force`` into a :class:`PrunePlan` that explains every id (KEEP, DELETE,
LOCKED, BLOCKED); :func:`plan_purge` picks the trash entries older than
``trash_days``. prune.py lists the regions and carries the plan out through the
trash (trash.py).

A snapshot's date for retention is its manifest's ``consistency_time``: the
promises ("14 fulls across at least 3 months", RPO) are about how old the
*data* is, and that is what consistency time measures; ``finished_at`` would
date a slow dump by when it ended, and the id's second is only when the job
started. All three are authenticated by the manifest's MAC, but only
consistency time means "the source as it was then".
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from . import layout, retention
from .config import RetentionConfig
from .units import format_utc

KEEP, DELETE, LOCKED, BLOCKED = "keep", "delete", "locked", "blocked"
REASON_PROTECTED = "protected"
REASON_SAFETY_NET = "safety net"


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
