"""Prometheus metrics: a collector that renders cached state and never touches storage.

A scrape must stay fast with a thousand sources however slow a bucket is, so
nothing here lists a bucket when Prometheus asks. The daemon keeps a
:class:`MetricsState` (plain data) up to date: after each snapshot it re-reads
that one source, after each maintenance job and every few minutes it re-reads
everything (:func:`refresh`); a scrape only renders the cache (:func:`families`).

Functional core (pure, no I/O, no clock): :func:`source_view` (what storage
holds for one source, judged by the same ``status.evaluate`` as ``drctl
status``), :func:`failure_reason`, :func:`drill_views`, :func:`schedule_view`,
:func:`audit_views`, :func:`orphan_views` and :func:`families`. Imperative shell: :func:`refresh`,
:func:`build_registry` and :func:`serve`.

Conventions: names start with ``drdaemon_``, values are in seconds and bytes,
timestamps are Unix seconds. Labels are bounded by the config (source, tenant,
tier, region, job_name) or by a fixed set (reason, outcome, status, verdict);
never a snapshot id. ``job_name`` rather than ``job`` because Prometheus owns ``job``.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
import zoneinfo
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__, audit, catalog, cron, state, statefs, status
from .backup import BackupResult
from .config import ORPHAN_GRACE, Config, RetentionConfig
from .metrics_server import MetricsServer, serve_registry
from .runtime import Runtime

if TYPE_CHECKING:
    from .prune import PruneReport

log = logging.getLogger("drdaemon")

REFRESH_INTERVAL = timedelta(minutes=5)
# The platform's promise: 14 fulls "across at least 3 months". The 7/4/3
# cascade provably keeps the oldest >= 90 days at steady state (retention.py).
PROMISED_SPAN = timedelta(days=90)
FAILURE_REASONS = ("source", "storage", "cancelled", "shrunk", "other")
SOURCE_LABELS = ("source", "tenant", "tier")
REGION_LABELS = (*SOURCE_LABELS, "region")


# -- functional core ----------------------------------------------------------

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


def source_view(cfg: Config, info: SourceInfo, entries: Iterable[catalog.SnapshotEntry],
                outcome: state.Outcome, reachable: Sequence[str], now: datetime) -> SourceView:
    """Pure: one source's view from its listed snapshots and its recorded outcome."""
    entries = list(entries)
    snaps = [(e.manifest, e.regions) for e in entries if e.manifest is not None]
    # The same judgement as `drctl status`: which snapshot is newest, where it is.
    st = status.evaluate(cfg, cfg.source(info.source), snaps, outcome, now)
    newest: dict[str, float] = {}
    oldest: dict[str, float] = {}
    retained = {r: 0 for r in reachable}
    for m, regions in snaps:
        t = m.consistency_time.timestamp()
        for r in regions:
            newest[r] = max(t, newest.get(r, t))
            oldest[r] = min(t, oldest.get(r, t))
            retained[r] = retained.get(r, 0) + 1
    top = next((m for m, _ in snaps if m.id == st.newest_id), None)
    unreadable = {r: 0 for r in reachable}
    for e in entries:
        for r in e.problems:
            unreadable[r] = unreadable.get(r, 0) + 1
    ok = None
    if outcome.last_attempt is not None or outcome.unfinished:
        # An attempt cut off by a crash or a stop counts as failed until one succeeds.
        ok = not outcome.pending_retry
    return SourceView(
        newest, oldest, retained, st.regions,
        (top.finished_at - top.started_at).total_seconds() if top else None,
        top.plaintext_size if top else None, top.compressed_size if top else None,
        top.size if top else None, ok, unreadable)


def failure_reason(result: BackupResult) -> str:
    """Pure: a failed snapshot's bounded `reason` label (set from the exception type)."""
    return result.error_kind or "other"


class DrillRecordLike(Protocol):
    """The fields of drill_records.DrillRecord that metrics read."""

    source: str
    tier: str
    ok: bool  # verified *and* inside every target
    verified: bool  # the restore produced a copy that matched the manifest's facts
    rto_seconds: float | None
    rpo_seconds: float | None
    rto_target_seconds: float
    rpo_target_seconds: float
    projected_tier_rto_seconds: float | None
    finished_at: str


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


def audit_views(check: audit.AuditCheck) -> tuple[AuditView, dict[str, AuditView]]:
    """Pure: the local log's view and each region's whose copy could be read."""
    t = check.checked_at.timestamp()
    local = AuditView(t, check.local.ok, check.local.records)
    return local, {r: AuditView(t, v.ok, v.records) for r, v in check.regions.items()}


@dataclass(frozen=True)
class OrphanView:
    """The orphan data objects of one verdict in one (source, region) after a prune run."""

    objects: int
    bytes: int
    first_seen: float  # the oldest first sighting among them (Unix seconds)


def orphan_views(report: PruneReport, regions: Sequence[str]
                 ) -> tuple[set[tuple[str, str]], dict[tuple[str, str, str], OrphanView]]:
    """Pure: the (source, region) pairs a prune run read, and the orphans left there
    by (source, region, verdict). Deleted ones are gone; a pair that could not be
    read is not in the set, so its last known orphans stay."""
    sources = ({rp.source for rp in report.plan.regions}
               | {e.source for e in report.region_errors} | {o.source for o in report.orphans})
    unread = {(e.source, e.region) for e in report.region_errors}
    observed = {(s, r) for s in sources for r in regions if (s, r) not in unread}
    observed |= {(o.source, o.region) for o in report.orphans}
    gone = {(c.source, c.region, c.snapshot_id) for c in report.changes
            if c.action == "orphan" and c.status == "done"}
    found: dict[tuple[str, str, str], OrphanView] = {}
    for op in report.orphans:
        for v in op.verdicts:
            if (op.source, op.region, v.snapshot_id) in gone:
                continue
            key, seen = (op.source, op.region, v.action), v.first_seen.timestamp()
            old = found.get(key, OrphanView(0, 0, seen))
            found[key] = OrphanView(old.objects + 1, old.bytes + v.size,
                                    min(old.first_seen, seen))
    return observed, found


ORPHANS_FILE = "prune/orphan-metrics.json"


def orphans_path(state_dir: Path) -> Path:
    """Where the daemon keeps the orphan gauges of its last prune run."""
    return state_dir / ORPHANS_FILE


def save_orphans(state_dir: Path, st: MetricsState) -> None:
    """Keep the orphan gauges across restarts: prune runs daily, and a LOST
    orphan's alert must not clear because the daemon restarted in between."""
    with st.lock:
        rows = [{"source": s, "region": r, "verdict": v, "objects": o.objects,
                 "bytes": o.bytes, "first_seen": o.first_seen}
                for (s, r, v), o in sorted(st.orphans.items())]
    statefs.write_atomic(state_dir, ORPHANS_FILE,
                         json.dumps({"version": 1, "orphans": rows}, indent=1).encode())


def load_orphans(state_dir: Path, st: MetricsState) -> None:
    """The gauges `save_orphans` kept, for configured sources and regions; a
    missing or unreadable file leaves them empty until the next prune."""
    try:
        rows = json.loads(statefs.read_bytes(state_dir, ORPHANS_FILE))["orphans"]
        found = {(str(row["source"]), str(row["region"]), str(row["verdict"])):
                 OrphanView(int(row["objects"]), int(row["bytes"]), float(row["first_seen"]))
                 for row in rows}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if not isinstance(exc, FileNotFoundError):
            log.warning("orphan gauges not restored from %s: %s", orphans_path(state_dir), exc)
        return
    with st.lock:
        st.orphans = {k: v for k, v in found.items()
                      if k[0] in st.sources and k[1] in st.regions}


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
    drill_intervals: dict[str, float] = field(default_factory=dict)  # tier -> longest cron gap
    running: Counter[str] = field(default_factory=Counter)
    job_next_run: dict[str, float] = field(default_factory=dict)
    source_next_run: dict[str, float] = field(default_factory=dict)
    job_last_run: dict[str, tuple[float, bool]] = field(default_factory=dict)
    audit_local: AuditView | None = None  # None until the first audit check
    audit_mirrors: dict[str, AuditView] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    @classmethod
    def from_config(cls, cfg: Config, now: datetime | None = None) -> MetricsState:
        sources = {s.name: SourceInfo(
            s.name, s.tenant, s.tier, s.kind,
            s.retention.daily + s.retention.weekly + s.retention.monthly,
            retention_span_target(s.retention).total_seconds(),
            s.retention.orphan_grace.total_seconds()) for s in cfg.sources}
        tiers = {t.name: (t.rpo.total_seconds(), t.rto.total_seconds())
                 for t in cfg.tiers.values()}
        tz = zoneinfo.ZoneInfo(cfg.daemon.timezone)
        start = now or datetime.now(UTC)
        intervals = {tier: cron.longest_gap(cfg.drills.schedule_for(tier), tz,
                                            start).total_seconds()
                     for tier in sorted({s.tier for s in cfg.sources})}
        return cls(sources, tuple(r.name for r in cfg.regions), tiers,
                   drill_intervals=intervals)

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

    def record_snapshot(self, result: BackupResult) -> None:
        with self.lock:
            self.snapshot_attempts[result.source] += 1
            if not result.ok:
                self.snapshot_failures[(result.source, failure_reason(result))] += 1

    def record_report(self, report: object) -> None:
        """Count what a prune, replicate or verify run did; keep an audit check's outcome."""
        from .prune import PruneReport
        from .replicate import ReplicationReport
        from .verify import VerifyReport

        with self.lock:
            if isinstance(report, PruneReport):
                for ch in report.changes:
                    if ch.action == "trash" and ch.status == "done":
                        self.prune_deletions[(ch.source, ch.region)] += 1
                    elif ch.action == "orphan" and ch.status == "done":
                        self.orphan_deletions[(ch.source, ch.region)] += 1
                observed, found = orphan_views(report, self.regions)
                self.orphans = {k: v for k, v in self.orphans.items()
                                if (k[0], k[1]) not in observed}
                self.orphans.update(found)
            elif isinstance(report, ReplicationReport):
                for o in report.outcomes:
                    outcome = "repaired" if o.ok else "failed"
                    self.replica_repairs[(o.repair.manifest.source, o.repair.region,
                                          outcome)] += 1
            elif isinstance(report, VerifyReport):
                failed: Counter[tuple[str, str]] = Counter()
                for c in report.checks:
                    if not c.ok:
                        self.verify_failures[(c.source, c.region, c.status)] += 1
                        failed[(c.source, c.region)] += 1
                self.verify_failed_copies = {
                    (c.source, c.region): failed[(c.source, c.region)] for c in report.checks}
            elif isinstance(report, audit.AuditCheck):
                self.audit_local, mirrors = audit_views(report)
                # A region that could not be read keeps its last result, and its
                # check time goes stale (DrdaemonAuditVerifyMissing).
                self.audit_mirrors.update(mirrors)

    def set_schedule(self, jobs: Iterable[tuple[str, datetime | None]]) -> None:
        by_job, by_source = schedule_view(jobs)
        with self.lock:
            self.job_next_run, self.source_next_run = by_job, by_source


def _gauge(name: str, doc: str, labels: Sequence[str] = (), unit: str = "") -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels), unit=unit)


def families(st: MetricsState, now: datetime) -> list[Metric]:
    """Pure: render `st` as metric families; ages are taken at `now`."""
    src, info = st.sources, list(st.sources.values())
    out: list[Metric] = []

    def lab(source: str) -> list[str]:
        i = src.get(source)
        return i.labels if i else [source, "", ""]

    build = _gauge("drdaemon_build_info", "drdaemon's version (always 1).", ["version"])
    build.add_metric([st.version], 1)
    out.append(build)

    g = _gauge("drdaemon_source_info", "A configured source (always 1).", (*SOURCE_LABELS, "kind"))
    for i in info:
        g.add_metric([*i.labels, i.kind], 1)
    out.append(g)

    rpo = _gauge("drdaemon_tier_rpo_target_seconds", "The tier's RPO target.", ["tier"])
    rto = _gauge("drdaemon_tier_rto_target_seconds", "The tier's RTO target.", ["tier"])
    for tier, (rpo_s, rto_s) in sorted(st.tiers.items()):
        rpo.add_metric([tier], rpo_s)
        rto.add_metric([tier], rto_s)
    interval = _gauge("drdaemon_drill_interval_seconds",
                      "Longest time between the tier's scheduled drills ([drills] schedule).",
                      ["tier"])
    for tier, seconds in sorted(st.drill_intervals.items()):
        interval.add_metric([tier], seconds)
    out += [rpo, rto, interval]

    target = _gauge("drdaemon_retention_target_snapshots",
                    "Snapshots the retention policy keeps at steady state.", SOURCE_LABELS)
    span = _gauge("drdaemon_retention_target_span_seconds",
                  "Age the oldest kept snapshot must reach at steady state (0: no promise).",
                  SOURCE_LABELS)
    for i in info:
        target.add_metric(i.labels, i.retention_target)
        span.add_metric(i.labels, i.retention_span)
    out += [target, span]

    out += _storage_families(st, now, lab)
    out += _activity_families(st, lab)
    out += _orphan_families(st, lab)
    out += _drill_families(st, lab)
    out += _audit_families(st)
    return out


def _storage_families(st: MetricsState, now: datetime,
                      lab: Callable[[str], list[str]]) -> list[Metric]:
    last = _gauge("drdaemon_last_snapshot_timestamp_seconds",
                  "Consistency time of the newest complete snapshot in the region.",
                  REGION_LABELS)
    present = _gauge("drdaemon_newest_snapshot_present",
                     "1 if the region holds the source's newest snapshot, else 0.",
                     REGION_LABELS)
    holding = _gauge("drdaemon_newest_snapshot_regions",
                     "Regions holding the source's newest snapshot.", SOURCE_LABELS)
    retained = _gauge("drdaemon_retained_snapshots",
                      "Complete snapshots retained in the region.", REGION_LABELS)
    oldest = _gauge("drdaemon_oldest_retained_snapshot_age_seconds",
                    "Age of the oldest retained snapshot in the region (by consistency time).",
                    REGION_LABELS)
    duration = _gauge("drdaemon_last_snapshot_duration_seconds",
                      "Wall time of the newest snapshot, from its start to its manifest.",
                      SOURCE_LABELS)
    sizes = {k: _gauge(f"drdaemon_last_snapshot_{k}_bytes", f"{doc} of the newest snapshot.",
                       SOURCE_LABELS)
             for k, doc in (("plaintext", "Plaintext size"), ("compressed", "Size after zstd"),
                            ("stored", "Stored (encrypted) size in each region"))}
    unreadable = _gauge("drdaemon_unreadable_manifests",
                        "Manifests listed in the region that cannot be read or authenticated "
                        "(too large, altered, malformed).", REGION_LABELS)
    attempt = _gauge("drdaemon_snapshot_last_attempt_success",
                     "1 if the source's last snapshot attempt succeeded, 0 if it failed.",
                     SOURCE_LABELS)
    t_now = now.timestamp()
    for name, v in sorted(st.views.items()):
        labels = lab(name)
        for region, t in sorted(v.newest.items()):
            last.add_metric([*labels, region], t)
        if v.holding_newest:
            # An unreachable region counts as missing, as in `drctl status`.
            for region in st.regions:
                present.add_metric([*labels, region], float(region in v.holding_newest))
            holding.add_metric(labels, len(v.holding_newest))
        for region, n in sorted(v.retained.items()):
            retained.add_metric([*labels, region], n)
        for region, n in sorted(v.unreadable.items()):
            unreadable.add_metric([*labels, region], n)
        for region, t in sorted(v.oldest.items()):
            oldest.add_metric([*labels, region], max(0.0, t_now - t))
        if v.duration is not None:
            duration.add_metric(labels, v.duration)
        for k, value in (("plaintext", v.plaintext_bytes), ("compressed", v.compressed_bytes),
                         ("stored", v.stored_bytes)):
            if value is not None:
                sizes[k].add_metric(labels, value)
        if v.last_attempt_ok is not None:
            attempt.add_metric(labels, float(v.last_attempt_ok))
    reach = _gauge("drdaemon_region_reachable",
                   "1 if the region could be listed at the last refresh.", ["region"])
    for region, ok in sorted(st.region_reachable.items()):
        reach.add_metric([region], float(ok))
    refreshed = _gauge("drdaemon_state_refresh_timestamp_seconds",
                       "When the cached storage state was last read in full.")
    if st.refreshed_at is not None:
        refreshed.add_metric([], st.refreshed_at)
    return [last, present, holding, retained, oldest, duration, *sizes.values(), attempt,
            reach, refreshed, unreadable]


def _activity_families(st: MetricsState, lab: Callable[[str], list[str]]) -> list[Metric]:
    attempts = CounterMetricFamily("drdaemon_snapshot_attempts",
                                   "Snapshot attempts since the daemon started.",
                                   labels=list(SOURCE_LABELS))
    failures = CounterMetricFamily("drdaemon_snapshot_failures",
                                   "Failed snapshot attempts, by reason.",
                                   labels=[*SOURCE_LABELS, "reason"])
    for name in st.sources:
        attempts.add_metric(lab(name), st.snapshot_attempts[name])
        for reason in FAILURE_REASONS:
            failures.add_metric([*lab(name), reason], st.snapshot_failures[(name, reason)])
    deletions = CounterMetricFamily("drdaemon_prune_deletions",
                                    "Snapshots the prune job removed (moved to the trash).",
                                    labels=list(REGION_LABELS))
    for (s, r), n in sorted(st.prune_deletions.items()):
        deletions.add_metric([*lab(s), r], n)
    repairs = CounterMetricFamily("drdaemon_replica_repairs",
                                  "Replica repairs into the region, by outcome.",
                                  labels=[*REGION_LABELS, "outcome"])
    for (s, r, o), n in sorted(st.replica_repairs.items()):
        repairs.add_metric([*lab(s), r, o], n)
    verify = CounterMetricFamily("drdaemon_verify_failures",
                                 "Copies that failed verification, by status.",
                                 labels=[*REGION_LABELS, "status"])
    for (s, r, status_), n in sorted(st.verify_failures.items()):
        verify.add_metric([*lab(s), r, status_], n)
    failed = _gauge("drdaemon_verify_failed_copies",
                    "Copies that failed the last verify run.", REGION_LABELS)
    for (s, r), n in sorted(st.verify_failed_copies.items()):
        failed.add_metric([*lab(s), r], n)

    running = _gauge("drdaemon_job_running", "Instances of the job running now.", ["job_name"])
    for name, n in sorted(st.running.items()):
        running.add_metric([name], n)
    next_run = _gauge("drdaemon_job_next_run_timestamp_seconds",
                      "When the job runs next.", ["job_name"])
    for name, t in sorted(st.job_next_run.items()):
        next_run.add_metric([name], t)
    last_run = _gauge("drdaemon_job_last_run_timestamp_seconds",
                      "When the job last ended.", ["job_name"])
    last_ok = _gauge("drdaemon_job_last_run_success",
                     "1 if the job's last run ended without an error.", ["job_name"])
    for name, (t, ok) in sorted(st.job_last_run.items()):
        last_run.add_metric([name], t)
        last_ok.add_metric([name], float(ok))
    src_next = _gauge("drdaemon_snapshot_next_run_timestamp_seconds",
                      "When the source's next snapshot is scheduled.", SOURCE_LABELS)
    for name, t in sorted(st.source_next_run.items()):
        src_next.add_metric(lab(name), t)
    return [attempts, failures, deletions, repairs, verify, failed, running, next_run,
            last_run, last_ok, src_next]


def _orphan_families(st: MetricsState, lab: Callable[[str], list[str]]) -> list[Metric]:
    """Orphan data objects, as the daemon's last prune run left them (no listing here).

    `verdict` is prune's: keep, delete, locked, blocked or lost (orphans.py); a
    "delete" left after a run is one whose delete failed or was skipped.
    """
    labels = [*REGION_LABELS, "verdict"]
    objects = _gauge("drdaemon_orphan_objects",
                     "Orphan data objects (no manifest or trash entry in any region) left by "
                     "the last prune run, by verdict; absent: none.", labels)
    size = _gauge("drdaemon_orphan_bytes", "Bytes of those orphan data objects.", labels)
    seen = _gauge("drdaemon_orphan_first_seen_timestamp_seconds",
                  "When the oldest of those orphan data objects was first seen orphaned.",
                  labels)
    for (s, r, verdict), v in sorted(st.orphans.items()):
        key = [*lab(s), r, verdict]
        objects.add_metric(key, v.objects)
        size.add_metric(key, v.bytes)
        seen.add_metric(key, v.first_seen)
    grace = _gauge("drdaemon_orphan_grace_seconds",
                   "How long an orphan data object waits before prune deletes it "
                   "([retention] orphan_grace).", SOURCE_LABELS)
    for i in st.sources.values():
        grace.add_metric(i.labels, i.orphan_grace)
    deletions = CounterMetricFamily("drdaemon_orphan_deletions",
                                    "Orphan data objects the prune job deleted.",
                                    labels=list(REGION_LABELS))
    for (s, r), n in sorted(st.orphan_deletions.items()):
        deletions.add_metric([*lab(s), r], n)
    return [objects, size, seen, grace, deletions]


def _drill_families(st: MetricsState, lab: Callable[[str], list[str]]) -> list[Metric]:
    when = _gauge("drdaemon_last_drill_timestamp_seconds",
                  "When the source's latest restore drill finished.", SOURCE_LABELS)
    ok = _gauge("drdaemon_last_drill_success",
                "1 if the source's latest restore drill restored a copy that verified, else 0.",
                SOURCE_LABELS)
    rto = _gauge("drdaemon_last_drill_rto_seconds",
                 "RTO measured by the source's latest drill.", SOURCE_LABELS)
    rpo = _gauge("drdaemon_last_drill_rpo_seconds",
                 "RPO measured by the source's latest drill.", SOURCE_LABELS)
    rto_target = _gauge("drdaemon_last_drill_rto_target_seconds",
                        "The RTO target the source's latest drill was held to.", SOURCE_LABELS)
    rpo_target = _gauge("drdaemon_last_drill_rpo_target_seconds",
                        "The RPO target the source's latest drill was held to.", SOURCE_LABELS)
    for name, d in sorted(st.drills.items()):
        labels = lab(name)
        when.add_metric(labels, d.finished_at)
        ok.add_metric(labels, float(d.ok))
        for gauge, value in ((rto, d.rto_seconds), (rpo, d.rpo_seconds),
                             (rto_target, d.rto_target_seconds),
                             (rpo_target, d.rpo_target_seconds)):
            if value is not None:
                gauge.add_metric(labels, value)
    projected = _gauge("drdaemon_projected_tier_rto_seconds",
                       "Time to restore every source of the tier at drill-measured throughput.",
                       ["tier"])
    for tier, seconds in sorted(st.projected_rto.items()):
        projected.add_metric([tier], seconds)
    return [when, ok, rto, rpo, rto_target, rpo_target, projected]


def _audit_families(st: MetricsState) -> list[Metric]:
    ok = _gauge("drdaemon_audit_verified_ok",
                "1 if the local audit log verified at the last check, else 0.")
    when = _gauge("drdaemon_audit_last_verified_timestamp_seconds",
                  "When the local audit log was last checked (whatever the outcome).")
    records = _gauge("drdaemon_audit_verified_records",
                     "Records of the local audit log that verified at the last check, "
                     "up to the first bad one.")
    if st.audit_local is not None:
        ok.add_metric([], float(st.audit_local.ok))
        when.add_metric([], st.audit_local.checked_at)
        records.add_metric([], st.audit_local.records)
    mirror_ok = _gauge("drdaemon_audit_mirror_verified_ok",
                       "1 if the region's copy of the audit log verified and agreed with the "
                       "local log at the last check, else 0.", ["region"])
    mirror_when = _gauge("drdaemon_audit_mirror_last_verified_timestamp_seconds",
                         "When the region's copy of the audit log was last read and checked.",
                         ["region"])
    for region, v in sorted(st.audit_mirrors.items()):
        mirror_ok.add_metric([region], float(v.ok))
        mirror_when.add_metric([region], v.checked_at)
    return [ok, when, records, mirror_ok, mirror_when]


class StateCollector(Collector):
    """Renders a MetricsState at scrape time; reads nothing else."""

    def __init__(self, st: MetricsState, clock: Callable[[], datetime]) -> None:
        self.state = st
        self.clock = clock

    def collect(self) -> Iterable[Metric]:
        with self.state.lock:
            return families(self.state, self.clock())


# -- imperative shell ---------------------------------------------------------

def refresh(rt: Runtime, st: MetricsState, source: str | None = None) -> None:
    """Read storage, the state folder and drill records into `st`.

    With `source`, only that source is re-read (after its snapshot): one
    listing of one prefix per region rather than of every source. Manifests
    come from the runtime's cache where they were authenticated before, so a
    refresh GETs only new ones (catalog.ManifestCache).
    """
    listing = catalog.list_snapshots(rt, source, cache=rt.manifest_cache)
    now = rt.clock()
    names = [source] if source else list(st.sources)
    reachable = [r for r in st.regions if r not in listing.region_errors]
    by_source: dict[str, list[catalog.SnapshotEntry]] = {n: [] for n in names}
    for e in listing.snapshots:
        if e.source in by_source:
            by_source[e.source].append(e)
    views = {n: source_view(rt.config, st.sources[n], by_source[n],
                            state.read_outcome(rt.config.daemon.state_dir, n), reachable, now)
             for n in names}
    drills = None if source else _load_drills(rt)
    with st.lock:
        st.views.update(views)
        st.region_reachable.update({r: r in reachable for r in st.regions})
        if drills is not None:  # a full refresh
            st.refreshed_at = now.timestamp()
            st.drills, st.projected_rto = drills


def _load_drills(rt: Runtime) -> tuple[dict[str, DrillView], dict[str, float]]:
    """The latest drill of each source from drill_records.load_records, if that module exists."""
    try:
        drills: Any = importlib.import_module("drdaemon.drill_records")
    except ImportError:
        return {}, {}
    try:
        records = drills.load_records(rt.config.daemon.state_dir)
    except Exception as exc:  # a broken drill log must not stop the other metrics
        log.warning("cannot read drill records for metrics: %s", exc)
        return {}, {}
    # A source since removed from the config is no evidence about today's tiers.
    known = {s.name for s in rt.config.sources}
    return drill_views(r for r in records if r.source in known)


def build_registry(st: MetricsState, clock: Callable[[], datetime]) -> CollectorRegistry:
    """A registry with drdaemon's collector and the process and platform collectors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(st, clock))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` from `[daemon] metrics_address`; an empty host means every interface."""
    host, _, port = address.rpartition(":")
    return host or "0.0.0.0", int(port)


# The name the scheduler knows the server by.
WSGIServer = MetricsServer


def serve(address: str, registry: CollectorRegistry) -> MetricsServer:
    """Serve /metrics on `address` with bounded threads and timeouts (metrics_server.py);
    stop with :func:`shutdown`."""
    host, port = parse_address(address)
    return serve_registry(host, port, registry)


def shutdown(server: MetricsServer) -> None:
    server.shutdown()
    server.server_close()
