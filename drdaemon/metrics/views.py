"""Pure views: what the metrics render, derived from the config and from observations.

No I/O and no clock here: every function takes what it judges (the status
judgement of a source's newest snapshot comes in with its listing).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from ..config import ORPHAN_GRACE, RetentionConfig
from .observations import AuditRun, DrillRecordLike, OrphanSeen, SourceListing

# The platform's promise: 14 fulls "across at least 3 months". The 7/4/3
# cascade provably keeps the oldest >= 90 days at steady state (retention.py).
PROMISED_SPAN = timedelta(days=90)
FAILURE_REASONS = ("source", "storage", "cancelled", "shrunk", "other")
# A tenant's lifecycle states (lifecycle.STATES) and the erasure job's outcomes.
TENANT_STATES = ("active", "offboarded", "held", "erased")
ERASURE_OUTCOMES = ("done", "failed")
# pg_stat_replication.state of a hot standby, "absent" if its primary lists none (standby.py).
STANDBY_STATES = ("startup", "catchup", "streaming", "backup", "stopping", "absent")


@dataclass(frozen=True)
class SourceInfo:
    """What the config says about one source."""

    source: str
    tenant: str
    tier: str
    kind: str
    retention_target: int  # snapshots kept at steady state (daily + weekly + monthly)
    retention_span: float  # seconds the oldest must reach at steady state; 0: no promise
    orphan_grace: float = ORPHAN_GRACE.total_seconds()  # [retention] orphan_grace
    # The regions its snapshots belong in (its tenant's residency); () means all.
    regions: tuple[str, ...] = ()

    @property
    def labels(self) -> list[str]:
        return [self.source, self.tenant, self.tier]


def retention_span_target(r: RetentionConfig) -> timedelta:
    """The promised span for policies at least as long as the published 7/4/3.

    A shorter override (say, 14 dailies for a scratch source) makes no
    3-month promise, so it gets no span target (0) rather than a false alarm.
    """
    return PROMISED_SPAN if r.daily >= 7 and r.weekly >= 4 and r.monthly >= 3 else timedelta(0)


@dataclass(frozen=True)
class SourceView:
    """What storage held for one source at the last refresh (times in Unix seconds)."""

    newest: Mapping[str, float]  # region -> consistency time of its newest complete snapshot
    oldest: Mapping[str, float]  # region -> consistency time of its oldest
    retained: Mapping[str, int]  # region -> complete snapshots (reachable regions only)
    holding_newest: tuple[str, ...]  # regions that hold the newest snapshot of any region
    duration: float | None = None  # of the newest snapshot: start to manifest
    plaintext_bytes: int | None = None
    compressed_bytes: int | None = None
    stored_bytes: int | None = None
    last_attempt_ok: bool | None = None  # from the state folder; None if never attempted
    # region -> manifests listed there that cannot be read or authenticated (reachable only)
    unreadable: Mapping[str, int] = field(default_factory=dict)


def source_view(listing: SourceListing, reachable: Sequence[str]) -> SourceView:
    """Pure: one source's view from its listed snapshots and its recorded outcome."""
    newest: dict[str, float] = {}
    oldest: dict[str, float] = {}
    retained = {r: 0 for r in reachable}
    for snap in listing.snapshots:
        t = snap.consistency_time
        for r in snap.regions:
            newest[r] = max(t, newest.get(r, t))
            oldest[r] = min(t, oldest.get(r, t))
            retained[r] = retained.get(r, 0) + 1
    top = next((s for s in listing.snapshots if s.id == listing.newest_id), None)
    unreadable = {r: 0 for r in reachable}
    for r in listing.unreadable:
        unreadable[r] = unreadable.get(r, 0) + 1
    # An attempt cut off by a crash or a stop counts as failed until one succeeds.
    ok = not listing.pending_retry if listing.attempted else None
    return SourceView(
        newest, oldest, retained, listing.holding_newest,
        top.duration if top else None, top.plaintext_bytes if top else None,
        top.compressed_bytes if top else None, top.stored_bytes if top else None, ok,
        unreadable)


class HasErrorKind(Protocol):
    """A snapshot result (backup.BackupResult): its error's kind, None if none was named."""

    @property
    def error_kind(self) -> str | None: ...


def failure_reason(result: HasErrorKind) -> str:
    """Pure: a failed snapshot's bounded `reason` label (set from the exception type)."""
    return result.error_kind or "other"


@dataclass(frozen=True)
class DrillView:
    finished_at: float
    ok: bool  # the restore worked (DrillRecord.verified); targets are compared apart
    rto_seconds: float | None
    rpo_seconds: float | None
    # The tier's targets when the drill ran: alerts judge a drill by what it was held to.
    rto_target_seconds: float | None = None
    rpo_target_seconds: float | None = None


def drill_views(records: Iterable[DrillRecordLike]
                ) -> tuple[dict[str, DrillView], dict[str, float]]:
    """Pure: each source's latest drill, and each tier's latest projected RTO."""
    latest: dict[str, tuple[float, DrillRecordLike]] = {}
    projected: dict[str, tuple[float, float]] = {}
    for rec in records:
        try:
            t = datetime.fromisoformat(rec.finished_at).timestamp()
        except (TypeError, ValueError):
            continue  # an unreadable record is the drill module's problem, not a scrape's
        if rec.source not in latest or t >= latest[rec.source][0]:
            latest[rec.source] = (t, rec)
        p = rec.projected_tier_rto_seconds
        if p is not None and (rec.tier not in projected or t >= projected[rec.tier][0]):
            projected[rec.tier] = (t, float(p))
    # "Failed" means the restore did not work; a slow but good restore is not
    # a failure here but DrdaemonDrillRTOOverTarget, from the measured RTO.
    views = {s: DrillView(t, bool(getattr(r, "verified", r.ok)), _opt_float(r.rto_seconds),
                          _opt_float(r.rpo_seconds), _opt_float(r.rto_target_seconds),
                          _opt_float(r.rpo_target_seconds))
             for s, (t, r) in latest.items()}
    return views, {tier: p for tier, (_, p) in projected.items()}


def _opt_float(v: float | None) -> float | None:
    return None if v is None else float(v)


def schedule_view(jobs: Iterable[tuple[str, datetime | None]]
                  ) -> tuple[dict[str, float], dict[str, float]]:
    """Pure: (next run per job name, next snapshot per source) from (job id, next run).

    A source's one-off catch-up or retry counts when it comes before its cron.
    """
    by_job: dict[str, float] = {}
    by_source: dict[str, float] = {}
    for job_id, when in jobs:
        if when is None:
            continue  # paused
        t = when.timestamp()
        kind, _, source = job_id.partition(":")
        if kind in ("snapshot", "retry", "catchup") and source:
            by_source[source] = min(t, by_source.get(source, t))
        else:  # prune, replicate, verify, watchdog, drills (per tier): bounded by config
            by_job[job_id] = t
    return by_job, by_source


@dataclass(frozen=True)
class AuditView:
    """One copy of the audit log at the last check (the local log, or a region's copy)."""

    checked_at: float  # Unix seconds
    ok: bool  # the chain verified (and, for a region, agreed with the local log)
    records: int  # records that verified, up to the first bad one
    other_chains: int = 0  # a region: this host's chains there other than the local log's


def audit_views(check: AuditRun) -> tuple[AuditView, dict[str, AuditView]]:
    """Pure: the local log's view and each region's whose copy could be read."""
    t = check.checked_at
    local = AuditView(t, check.local.ok, check.local.records)
    return local, {r: AuditView(t, v.ok, v.records, v.other_chains)
                   for r, v in check.regions.items()}


@dataclass(frozen=True)
class OrphanView:
    """The orphan data objects of one verdict in one (source, region) after a prune run."""

    objects: int
    bytes: int
    first_seen: float  # the oldest first sighting among them (Unix seconds)


def orphan_views(orphans: Iterable[OrphanSeen]) -> dict[tuple[str, str, str], OrphanView]:
    """Pure: the orphans a prune run left, by (source, region, verdict)."""
    found: dict[tuple[str, str, str], OrphanView] = {}
    for o in orphans:
        key = (o.source, o.region, o.verdict)
        old = found.get(key, OrphanView(0, 0, o.first_seen))
        found[key] = OrphanView(old.objects + 1, old.bytes + o.size,
                                min(old.first_seen, o.first_seen))
    return found
