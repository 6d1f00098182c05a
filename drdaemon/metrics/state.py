"""The metrics state: everything a scrape renders, kept up to date from observations.

The daemon holds one :class:`MetricsState`; jobs hand it observations
(observations.py) under its lock, which counts those changes (:class:`StateLock`), and a
scrape renders it when it changed (render.py, exposition.py).
"""

from __future__ import annotations

import threading
import zoneinfo
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .. import __version__, cron, tenancy
from ..config import Config
from .observations import (
    AnchorRun,
    AuditRun,
    InventoryRun,
    KeysRun,
    PruneRun,
    QueueRead,
    ReplicateRun,
    SnapshotAttempt,
    StandbySeen,
    StorageRefresh,
    TenantLifecycle,
    UnmanagedSeen,
    VerifyRun,
)
from .views import (
    AuditView,
    DrillView,
    OrphanView,
    SourceInfo,
    SourceView,
    audit_views,
    drill_views,
    orphan_views,
    retention_span_target,
    schedule_view,
    source_view,
)


class StateLock:
    """The re-entrant lock of a MetricsState that counts its changes.

    Every block held under it (``with st.lock:``, what every mutation does) may have
    changed the state, so leaving it adds one to `changes`; a scrape reads under
    :meth:`reading`, which counts nothing, and reuses what it rendered while
    `changes` stays the same (exposition.py). A new kind of observation needs
    nothing more than the lock it takes anyway.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.changes = 0

    def __enter__(self) -> StateLock:
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.changes += 1
        self._lock.release()

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the lock to read; not counted as a change."""
        with self._lock:
            yield


@dataclass
class MetricsState:
    """Everything a scrape renders. Mutated only under `lock`, by the daemon."""

    sources: dict[str, SourceInfo]
    regions: tuple[str, ...]
    tiers: dict[str, tuple[float, float]]  # tier -> (rpo, rto) seconds
    version: str = __version__
    views: dict[str, SourceView] = field(default_factory=dict)
    region_reachable: dict[str, bool] = field(default_factory=dict)
    refreshed_at: float | None = None
    snapshot_attempts: Counter[str] = field(default_factory=Counter)
    snapshot_failures: Counter[tuple[str, str]] = field(default_factory=Counter)
    prune_deletions: Counter[tuple[str, str]] = field(default_factory=Counter)
    orphan_deletions: Counter[tuple[str, str]] = field(default_factory=Counter)
    # (source, region, verdict) -> what the daemon's last prune run left; absent: none
    orphans: dict[tuple[str, str, str], OrphanView] = field(default_factory=dict)
    replica_repairs: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    verify_failures: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    verify_failed_copies: dict[tuple[str, str], int] = field(default_factory=dict)  # last run
    drills: dict[str, DrillView] = field(default_factory=dict)
    projected_rto: dict[str, float] = field(default_factory=dict)
    plan_tier_eta: dict[str, float] = field(default_factory=dict)  # recovery_plan.py
    plan_source_eta: dict[str, float] = field(default_factory=dict)
    drill_intervals: dict[str, float] = field(default_factory=dict)  # tier -> longest cron gap
    running: Counter[str] = field(default_factory=Counter)
    job_next_run: dict[str, float] = field(default_factory=dict)
    source_next_run: dict[str, float] = field(default_factory=dict)
    job_last_run: dict[str, tuple[float, bool]] = field(default_factory=dict)
    audit_local: AuditView | None = None  # None until the first audit check
    audit_mirrors: dict[str, AuditView] = field(default_factory=dict)
    anchored_at: float | None = None  # the last anchor run that left the head anchored
    anchor_newest: float | None = None  # the time of the newest anchor
    anchor_failures: Counter[str] = field(default_factory=Counter)  # place -> failed runs
    tenants: dict[str, TenantLifecycle] = field(default_factory=dict)
    erasures: Counter[tuple[str, str]] = field(default_factory=Counter)  # (tenant, outcome)
    # source -> what the last complete inventory found unmanaged (inventory.py)
    unmanaged: dict[str, UnmanagedSeen] = field(default_factory=dict)
    standbys: dict[str, StandbySeen] = field(default_factory=dict)  # by standby name
    proof_max_age: float = 90 * 86400.0  # [keys] proof_max_age
    keys: KeysRun | None = None  # None until the first keys check
    queue: QueueRead | None = None  # [cluster]: the job queue as last read; None: no queue
    lock: StateLock = field(default_factory=StateLock, repr=False, compare=False)

    @classmethod
    def from_config(cls, cfg: Config, now: datetime | None = None) -> MetricsState:
        sources = {s.name: SourceInfo(
            s.name, s.tenant, s.tier, s.kind,
            s.retention.daily + s.retention.weekly + s.retention.monthly,
            retention_span_target(s.retention).total_seconds(),
            s.retention.orphan_grace.total_seconds(),
            tenancy.regions_for(cfg, s)) for s in cfg.sources}
        tiers = {t.name: (t.rpo.total_seconds(), t.rto.total_seconds())
                 for t in cfg.tiers.values()}
        tz = zoneinfo.ZoneInfo(cfg.daemon.timezone)
        start = now or datetime.now(UTC)
        intervals = {tier: cron.longest_gap(cfg.drills.schedule_for(tier), tz,
                                            start).total_seconds()
                     for tier in sorted({s.tier for s in cfg.sources})}
        return cls(sources, tuple(r.name for r in cfg.regions), tiers,
                   drill_intervals=intervals,
                   proof_max_age=cfg.keys.proof_max_age.total_seconds())

    @contextmanager
    def job(self, name: str, now: Callable[[], datetime]) -> Iterator[None]:
        """Count `name` as running while the block runs; record when it ended and how."""
        with self.lock:
            self.running[name] += 1
        ok = False
        try:
            yield
            ok = True
        finally:
            with self.lock:
                self.running[name] -= 1
                self.job_last_run[name] = (now().timestamp(), ok)

    def record_snapshot(self, attempt: SnapshotAttempt) -> None:
        """Count one snapshot attempt, and its failure by reason."""
        with self.lock:
            self.snapshot_attempts[attempt.source] += 1
            if not attempt.ok:
                self.snapshot_failures[(attempt.source, attempt.reason)] += 1

    def record_prune(self, run: PruneRun) -> None:
        """Count what a prune run deleted; replace the orphans of what it read."""
        with self.lock:
            for key in run.trashed:
                self.prune_deletions[key] += 1
            for key in run.orphans_deleted:
                self.orphan_deletions[key] += 1
            self.orphans = {k: v for k, v in self.orphans.items()
                            if (k[0], k[1]) not in run.observed}
            self.orphans.update(orphan_views(run.orphans))

    def record_inventory(self, run: InventoryRun) -> None:
        """Keep what storage holds that the config does not name; a listing that missed
        a region adds what it saw and forgets nothing."""
        with self.lock:
            seen = {u.source: u for u in run.unmanaged}
            self.unmanaged = seen if run.complete else {**self.unmanaged, **seen}

    def record_replicate(self, run: ReplicateRun) -> None:
        """Count a replicate run's repairs by outcome."""
        with self.lock:
            for r in run.repairs:
                self.replica_repairs[(r.source, r.region, "repaired" if r.ok else "failed")] += 1

    def record_verify(self, run: VerifyRun) -> None:
        """Count a verify run's failed copies; keep how many failed per (source, region)."""
        with self.lock:
            failed: Counter[tuple[str, str]] = Counter()
            for c in run.copies:
                if not c.ok:
                    self.verify_failures[(c.source, c.region, c.status)] += 1
                    failed[(c.source, c.region)] += 1
            self.verify_failed_copies = {
                (c.source, c.region): failed[(c.source, c.region)] for c in run.copies}

    def record_audit(self, run: AuditRun) -> None:
        """Keep an audit check's outcome."""
        with self.lock:
            self.audit_local, mirrors = audit_views(run)
            # A region that could not be read keeps its last result, and its
            # check time goes stale (DrdaemonAuditVerifyMissing).
            self.audit_mirrors.update(mirrors)

    def record_anchor(self, run: AnchorRun) -> None:
        """Keep an anchoring run's outcome; count where it failed."""
        with self.lock:
            if run.anchored:
                self.anchored_at = run.checked_at
            if run.newest is not None:
                self.anchor_newest = run.newest
            self.anchor_failures.update(run.failures)

    def home(self, source: str, regions: Sequence[str]) -> tuple[str, ...]:
        """`regions` narrowed to those the source's tenant's residency allows."""
        info = self.sources.get(source)
        home = info.regions if info is not None else ()
        return tuple(r for r in regions if not home or r in home)

    def record_refresh(self, refresh: StorageRefresh) -> None:
        """Keep what a storage refresh read (one source, or all with the drills)."""
        views = {s.source: source_view(s, self.home(s.source, refresh.reachable))
                 for s in refresh.sources}
        drills = None if refresh.drills is None else drill_views(refresh.drills)
        with self.lock:
            self.views.update(views)
            self.region_reachable.update({r: r in refresh.reachable for r in self.regions})
            if drills is not None:  # a full refresh
                self.refreshed_at = refresh.at
                self.drills, self.projected_rto = drills
            if refresh.plan_tier_eta is not None:
                self.plan_tier_eta = dict(refresh.plan_tier_eta)
                self.plan_source_eta = dict(refresh.plan_source_eta or {})

    def record_tenants(self, tenants: Iterable[TenantLifecycle]) -> None:
        """Replace every tenant's lifecycle state with what a refresh read."""
        views = {t.tenant: t for t in tenants}
        with self.lock:
            self.tenants = views

    def record_standbys(self, seen: Iterable[StandbySeen]) -> None:
        """Replace every hot standby's state with what a poll judged."""
        views = {s.standby: s for s in seen}
        with self.lock:
            self.standbys = views

    def record_keys(self, run: KeysRun) -> None:
        """Keep what the daemon's keys check found."""
        with self.lock:
            self.keys = run

    def record_queue(self, read: QueueRead) -> None:
        """Keep what the scheduler last read of the cluster's job queue."""
        # Not a change of the cached render: the queue's series are rendered at every
        # scrape (render.timed_families), and it is read every heartbeat.
        with self.lock.reading():
            self.queue = read

    def record_erasure(self, tenant: str, outcome: str) -> None:
        """Count what the erasure job did with one due erasure."""
        with self.lock:
            self.erasures[(tenant, outcome)] += 1

    def set_schedule(self, jobs: Iterable[tuple[str, datetime | None]]) -> None:
        by_job, by_source = schedule_view(jobs)
        with self.lock:
            self.job_next_run, self.source_next_run = by_job, by_source
