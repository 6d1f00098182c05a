"""The recovery plan: which copy of every source to restore, in what order, and when each is back.

Pure: plain data in (the sources, the newest copies storage holds, the drills'
restore measurements, the lost regions, how many restores run at once), a
:class:`RecoveryPlan` out. `drctl recovery plan` prints it, `drctl recovery
run` executes it (recovery.py), and the drills' projected tier RTO, its metric
and alert read their tier's ETA from it (drills/run.py, metrics_feed.py).

- **Copy**: per source, the newest snapshot with an authenticated manifest in
  a region that is not lost; read from the first region of the source's own
  order (its tenant's residency, else the config's) that holds it.
- **Order**: paid tiers first, then by the tier's RTO target (tightest first),
  then by stored size (smallest first: more tenants back sooner), then name.
- **ETA**: each restore takes the restore model of its tier (slo.RestoreModel,
  fitted to the latest drill of each of the tier's sources; a tier never
  drilled takes the model of every drill); restores are list-scheduled on
  `parallel` lanes in that order (each goes to the lane free first), so a
  free tier's ETA includes the paid restores ahead of it. A tier's ETA is when
  its last restore ends, judged against its RTO target with slo.over.

Times are seconds from the start of the recovery. Nothing here reads a clock.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Protocol

from . import tenancy
from .config import Config
from .slo import RestoreModel, fit_restore_model, over
from .units import duration, format_bytes

MAX_PARALLEL = 256  # restores at once: more than any server or link takes
NO_COPY = "no-copy"  # reason code: no region that is left holds a readable snapshot


@dataclass(frozen=True)
class Copy:
    """One snapshot of a source as the catalog lists it (authenticated manifest)."""

    snapshot_id: str
    stored_bytes: int
    regions: tuple[str, ...]  # regions that hold it with a valid manifest


@dataclass(frozen=True)
class PlanSource:
    """A configured source, as much of it as the plan needs."""

    name: str
    tenant: str
    tier: str
    kind: str
    paid: bool
    rto_target: float  # its tier's RTO target, seconds
    regions: tuple[str, ...]  # where it may be stored, in order of preference
    copies: tuple[Copy, ...] = ()  # any order


@dataclass(frozen=True)
class PlanItem:
    """One source's place in the plan (`problem` set: it cannot be restored)."""

    order: int
    source: str
    tenant: str
    tier: str
    kind: str
    paid: bool
    snapshot_id: str | None
    region: str | None
    stored_bytes: int | None
    lane: int | None = None
    start: float | None = None  # seconds after the recovery begins
    eta: float | None = None  # when its restore is expected to end
    problem: str | None = None


@dataclass(frozen=True)
class TierEta:
    """A tier's expected finish, against its RTO target."""

    tier: str
    paid: bool
    rto_target: float
    sources: int
    eta: float | None  # when its last restore ends; None: no drill measured a restore
    ok: bool | None  # eta within target and every source restorable; None when unknown
    unrestorable: tuple[str, ...] = ()  # sources with no copy left: the tier is not whole


@dataclass(frozen=True)
class RecoveryPlan:
    items: tuple[PlanItem, ...]
    tiers: tuple[TierEta, ...]
    parallel: int
    lost_regions: tuple[str, ...]
    models: Mapping[str, dict[str, Any] | None] = field(default_factory=dict)

    def item(self, source: str) -> PlanItem:
        return next(i for i in self.items if i.source == source)

    def tier_eta(self, tier: str) -> float | None:
        return next((t.eta for t in self.tiers if t.tier == tier), None)

    def to_dict(self) -> dict[str, Any]:
        return {"parallel": self.parallel, "lost_regions": list(self.lost_regions),
                "sources": [asdict(i) for i in self.items],
                "tiers": [dict(asdict(t), unrestorable=list(t.unrestorable))
                          for t in self.tiers],
                "models": dict(self.models)}


class _Manifest(Protocol):
    @property
    def size(self) -> int: ...


class Listed(Protocol):
    """A catalog entry (catalog.SnapshotEntry): what `plan_sources` reads of it."""

    @property
    def id(self) -> str: ...
    @property
    def manifest(self) -> _Manifest | None: ...
    @property
    def regions(self) -> list[str]: ...


def plan_sources(cfg: Config, listed: Mapping[str, Sequence[Listed]]) -> list[PlanSource]:
    """Every configured source with its readable copies (`listed`: catalog entries by source)."""
    out = []
    for s in cfg.sources:
        tier = cfg.tiers[s.tier]
        copies = tuple(Copy(e.id, e.manifest.size, tuple(e.regions))
                       for e in listed.get(s.name, ()) if e.manifest is not None and e.regions)
        out.append(PlanSource(s.name, s.tenant, s.tier, s.kind, tier.paid,
                              tier.rto.total_seconds(), tenancy.regions_for(cfg, s), copies))
    return out


# -- the pieces --------------------------------------------------------------------


def choose_copy(src: PlanSource, lost: Iterable[str]) -> tuple[Copy, str] | None:
    """The newest copy held in a region not lost, and the region to read it from."""
    gone = set(lost)
    for copy in sorted(src.copies, key=lambda c: c.snapshot_id, reverse=True):
        left = [r for r in copy.regions if r not in gone]
        if left:
            ranked = sorted(left, key=lambda r: (src.regions.index(r) if r in src.regions
                                                 else len(src.regions), r))
            return copy, ranked[0]
    return None


def priority(src: PlanSource, stored_bytes: int | None) -> tuple[bool, float, int, str]:
    """Sort key: paid first, then tightest RTO target, then smallest, then name."""
    return (not src.paid, src.rto_target, stored_bytes or 0, src.name)


def schedule(durations: Sequence[float], lanes: int) -> list[tuple[int, float, float]]:
    """List scheduling: each job, in order, on the lane free first (lowest index on a tie).

    Returns (lane, start, end) per job. Starts never decrease along the list:
    a job never starts before one ahead of it.
    """
    if lanes < 1:
        raise ValueError("at least one lane")
    free = [0.0] * lanes
    out = []
    for d in durations:
        lane = min(range(lanes), key=lambda i: (free[i], i))
        start = free[lane]
        free[lane] = start + max(d, 0.0)
        out.append((lane, start, free[lane]))
    return out


def tier_models(sources: Sequence[PlanSource], restores: Mapping[str, tuple[int, float]]
                ) -> dict[str, RestoreModel | None]:
    """Per tier: the model fitted to the latest drill of each of its sources;
    a tier none of whose sources was drilled takes the model of every drill."""
    everyone = fit_restore_model(restores.values())
    models: dict[str, RestoreModel | None] = {}
    for tier in sorted({s.tier for s in sources}):
        own = [restores[s.name] for s in sources if s.tier == tier and s.name in restores]
        models[tier] = fit_restore_model(own) or everyone
    return models


# -- the plan ------------------------------------------------------------------------


def build_plan(sources: Sequence[PlanSource], restores: Mapping[str, tuple[int, float]],
               *, lost: Iterable[str] = (), parallel: int = 1) -> RecoveryPlan:
    """The plan for restoring every source (see the module's docstring).

    `restores`: per source, (stored bytes, RTO seconds) of its latest verified
    drill (drills/records.latest_restores). Without any, the plan still gives
    copies and order, and no ETA.
    """
    if not 1 <= parallel <= MAX_PARALLEL:
        raise ValueError(f"parallel must be 1 to {MAX_PARALLEL}")
    lost_regions = tuple(sorted(set(lost)))
    models = tier_models(sources, restores)
    chosen = {s.name: choose_copy(s, lost_regions) for s in sources}
    ranked = sorted(sources, key=lambda s: priority(s, _size(chosen[s.name])))
    restorable = [s for s in ranked if chosen[s.name] is not None]
    known = all(models[s.tier] is not None for s in restorable)
    slots = iter(schedule([_seconds(models[s.tier], _size(chosen[s.name])) for s in restorable],
                          parallel) if known else [])
    items = []
    for n, s in enumerate(ranked, 1):
        found = chosen[s.name]
        if found is None:
            items.append(PlanItem(n, s.name, s.tenant, s.tier, s.kind, s.paid, None, None, None,
                                  problem=f"{NO_COPY}: no region left holds a readable "
                                          f"snapshot of {s.name}"))
            continue
        copy, region = found
        lane, start, end = next(slots, (None, None, None))
        items.append(PlanItem(n, s.name, s.tenant, s.tier, s.kind, s.paid, copy.snapshot_id,
                              region, copy.stored_bytes, lane, start, end))
    return RecoveryPlan(tuple(items), _tiers(sources, items, known), parallel, lost_regions,
                        {t: (m.to_dict() if m else None) for t, m in models.items()})


def _size(found: tuple[Copy, str] | None) -> int | None:
    return found[0].stored_bytes if found is not None else None


def _seconds(model: RestoreModel | None, stored: int | None) -> float:
    assert model is not None
    return model.seconds(stored or 0)


def _tiers(sources: Sequence[PlanSource], items: Sequence[PlanItem], known: bool
           ) -> tuple[TierEta, ...]:
    out = []
    one = {s.tier: s for s in sources}  # a tier's sources share its paid flag and target
    for tier, s in sorted(one.items(), key=lambda kv: (not kv[1].paid, kv[1].rto_target, kv[0])):
        mine = [i for i in items if i.tier == tier]
        ends = [i.eta for i in mine if i.eta is not None]
        eta = max(ends, default=0.0) if known else None
        missing = tuple(i.source for i in mine if i.problem)
        # A tier with a source that has no copy left cannot be whole, in time or ever.
        ok = (False if missing else None if eta is None
              else not over(timedelta(seconds=eta), timedelta(seconds=s.rto_target)))
        out.append(TierEta(tier, s.paid, s.rto_target, len(mine), eta, ok, missing))
    return tuple(out)


# -- rendering ------------------------------------------------------------------------


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "unknown (no drill)"
    return "0s" if seconds == 0 else duration(seconds)


def render_markdown(plan: RecoveryPlan) -> str:
    """The table an incident commander reads first: tiers, then every source in order."""
    lost = ", ".join(plan.lost_regions) or "none"
    lines = [f"# Recovery plan ({plan.parallel} restore(s) at once; lost regions: {lost})", "",
             "| tier | paid | sources | ETA | RTO target | verdict |",
             "| --- | --- | --- | --- | --- | --- |"]
    for t in plan.tiers:
        if t.unrestorable:
            verdict = f"INCOMPLETE: {len(t.unrestorable)} source(s) without a copy"
        else:
            verdict = "unknown" if t.ok is None else "inside" if t.ok else "OVER"
        lines.append(f"| {t.tier} | {'yes' if t.paid else 'no'} | {t.sources} | "
                     f"{_when(t.eta)} | {duration(t.rto_target)} | {verdict} |")
    lines += ["", "| # | source | tier | tenant | snapshot | region | size | lane | start | ETA |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i in plan.items:
        if i.problem:
            lines.append(f"| {i.order} | {i.source} | {i.tier} | {i.tenant} | "
                         f"{i.problem} | | | | | |")
            continue
        lane = "" if i.lane is None else str(i.lane + 1)
        start = "" if i.start is None else _when(i.start)
        lines.append(f"| {i.order} | {i.source} | {i.tier} | {i.tenant} | {i.snapshot_id} | "
                     f"{i.region} | {format_bytes(i.stored_bytes or 0)} | {lane} | {start} | "
                     f"{_when(i.eta)} |")
    return "\n".join(lines)


def render_json(plan: RecoveryPlan) -> str:
    return json.dumps(plan.to_dict(), indent=2, sort_keys=True)
