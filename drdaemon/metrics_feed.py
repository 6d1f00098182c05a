"""What the daemon feeds the metrics: observations built from the jobs' reports and listings.

The metrics package (drdaemon/metrics/) imports no service; this module does,
on the jobs' side. It turns a snapshot result, a prune, replicate, verify or
audit report into one plain observation (metrics/observations.py), and reads
storage, the state folder and the drill records into a :class:`StorageRefresh`
(:func:`refresh`): after each snapshot for that one source, after each
maintenance job and every :data:`REFRESH_INTERVAL` for everything.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta

from . import anchors, audit_mirror, catalog, lifecycle, recovery_plan, state, status, tenancy
from .backup import BackupResult
from .cluster.plan import KindCount
from .config_cluster import ClusterConfig
from .drills import records as drill_records
from .inventory import Inventory
from .manifest import Manifest
from .metrics import (
    AnchorRun,
    AuditCopy,
    AuditRun,
    CopyVerified,
    DrillRecordLike,
    InventoryRun,
    KeysRun,
    ListedSnapshot,
    MetricsState,
    OrphanSeen,
    PruneRun,
    QueueKind,
    QueueRead,
    RecipientSeen,
    RepairDone,
    ReplicateRun,
    SnapshotAttempt,
    SourceListing,
    StandbySeen,
    StorageRefresh,
    TenantLifecycle,
    UnmanagedSeen,
    VerifyRun,
    failure_reason,
)
from .proof_log import KeysCheck
from .prune import PruneReport
from .replicate import ReplicationReport
from .runtime import Runtime
from .standby import StandbyStatus
from .verify import VerifyReport

log = logging.getLogger("drdaemon")

REFRESH_INTERVAL = timedelta(minutes=5)


def standby_seen(s: StandbyStatus) -> StandbySeen:
    """A hot standby's status (standby.py) as the metrics keep it."""
    return StandbySeen(s.name, s.source or "", s.up, s.state, s.lag_bytes, s.lag_seconds,
                       s.paused, s.stalled_seconds, s.max_lag_bytes, s.max_lag_seconds,
                       s.polled_at.timestamp())


def queue_read(counts: Iterable[KindCount], workers: int, cluster: ClusterConfig,
               now: datetime) -> QueueRead:
    """The cluster's job queue as the scheduler read it (cluster/queue.py)."""
    kinds = tuple(QueueKind(c.kind, c.waiting, c.scheduled, c.running, c.failed, c.oldest_wait)
                  for c in counts)
    return QueueRead(kinds, workers, cluster.max_concurrent_snapshots,
                     cluster.max_queue_wait.total_seconds(), now.timestamp())


def snapshot_attempt(result: BackupResult) -> SnapshotAttempt:
    """Pure: a snapshot result as the metrics count it."""
    return SnapshotAttempt(result.source, result.ok, failure_reason(result))


def prune_run(report: PruneReport, regions: Sequence[str]) -> PruneRun:
    """Pure: what a prune run deleted, the (source, region) pairs it read and the
    orphans left there. Deleted orphans are gone; a pair that could not be read is
    not observed, so its last known orphans stay."""
    sources = ({rp.source for rp in report.plan.regions}
               | {e.source for e in report.region_errors} | {o.source for o in report.orphans})
    unread = {(e.source, e.region) for e in report.region_errors}
    observed = {(s, r) for s in sources for r in regions if (s, r) not in unread}
    observed |= {(o.source, o.region) for o in report.orphans}
    done = [c for c in report.changes if c.status == "done"]
    gone = {(c.source, c.region, c.snapshot_id) for c in done if c.action == "orphan"}
    left = tuple(OrphanSeen(op.source, op.region, v.action, v.size, v.first_seen.timestamp())
                 for op in report.orphans for v in op.verdicts
                 if (op.source, op.region, v.snapshot_id) not in gone)
    return PruneRun(tuple((c.source, c.region) for c in done if c.action == "trash"),
                    tuple((c.source, c.region) for c in done if c.action == "orphan"),
                    frozenset(observed), left)


def replicate_run(report: ReplicationReport) -> ReplicateRun:
    """Pure: each repair a replicate run tried, and whether it worked."""
    return ReplicateRun(tuple(RepairDone(o.repair.manifest.source, o.repair.region, o.ok)
                              for o in report.outcomes))


def verify_run(report: VerifyReport) -> VerifyRun:
    """Pure: each copy a verify run checked, and its status."""
    return VerifyRun(tuple(CopyVerified(c.source, c.region, c.ok, c.status)
                           for c in report.checks))


def audit_run(check: audit_mirror.AuditCheck) -> AuditRun:
    """Pure: an audit check's local log and each region whose copy was read."""
    return AuditRun(check.checked_at.timestamp(),
                    AuditCopy(check.local_ok, check.local.records),
                    {r: AuditCopy(v.ok, v.records, len(v.other_chains))
                     for r, v in check.regions.items()})


def anchor_run(report: anchors.AnchorReport) -> AnchorRun:
    """Pure: an anchoring run's outcome."""
    newest = None
    if report.anchor is not None:
        try:
            newest = datetime.fromisoformat(report.anchor.time).timestamp()
        except ValueError:
            newest = None
    return AnchorRun(report.checked_at.timestamp(), report.ok, newest,
                     tuple(sorted(report.failures)))


def keys_run(check: KeysCheck) -> KeysRun:
    """Pure: a keys check's recipients (when each was last proven) and missing wrappings."""
    return KeysRun(tuple(RecipientSeen(r.name, r.fingerprint, r.last_proven.timestamp()
                                       if r.last_proven else None) for r in check.recipients),
                   dict(check.missing))


def inventory_run(inv: Inventory, tenants: Mapping[str, tenancy.TenantConfig]) -> InventoryRun:
    """Pure: the unmanaged sources an inventory found, each with its tenant's erasure
    window (the shortest of a shared label's tenants; the default if none is configured)."""
    seen = []
    for h in inv.unmanaged():
        windows = [tenants[t].erase_after for t in h.tenants if t in tenants]
        window = min(windows, default=tenancy.DEFAULT_ERASE_AFTER)
        seen.append(UnmanagedSeen(h.source, h.tenant or "", sum(h.bytes.values()),
                                  h.newest.timestamp() if h.newest else None,
                                  window.total_seconds()))
    return InventoryRun(tuple(seen), complete=inv.ok)


def record_report(st: MetricsState, report: object) -> None:
    """Hand `st` what a maintenance job's report says; a report metrics do not
    count (drills: read back from their records at the next refresh) is ignored."""
    if isinstance(report, PruneReport):
        st.record_prune(prune_run(report, st.regions))
    elif isinstance(report, ReplicationReport):
        st.record_replicate(replicate_run(report))
    elif isinstance(report, VerifyReport):
        st.record_verify(verify_run(report))
    elif isinstance(report, audit_mirror.AuditCheck):
        st.record_audit(audit_run(report))
    elif isinstance(report, anchors.AnchorReport):
        st.record_anchor(anchor_run(report))
    elif isinstance(report, KeysCheck):
        st.record_keys(keys_run(report))


def record_inventory(st: MetricsState, inv: Inventory,
                     tenants: Mapping[str, tenancy.TenantConfig]) -> None:
    """Hand `st` what an inventory (the daemon's "tenants" job) found unmanaged."""
    st.record_inventory(inventory_run(inv, tenants))


def listed_snapshot(m: Manifest, regions: Sequence[str]) -> ListedSnapshot:
    """Pure: the facts of one listed snapshot the metrics render."""
    return ListedSnapshot(m.id, m.consistency_time.timestamp(), tuple(regions),
                          (m.finished_at - m.started_at).total_seconds(),
                          m.plaintext_size, m.compressed_size, m.size)


def refresh(rt: Runtime, st: MetricsState, source: str | None = None) -> catalog.Listing:
    """Read storage, the state folder and drill records into `st`; return the listing.

    With `source`, only that source is re-read (after its snapshot): one
    listing of one prefix per region rather than of every source. Manifests
    come from the runtime's cache where they were authenticated before, so a
    refresh GETs only new ones (manifest_cache.ManifestCache).
    """
    listing = catalog.list_snapshots(rt, source, cache=rt.manifest_cache)
    now = rt.clock()
    names = [source] if source else list(st.sources)
    by_source: dict[str, list[catalog.SnapshotEntry]] = {n: [] for n in names}
    for e in listing.snapshots:
        if e.source in by_source:
            by_source[e.source].append(e)
    sources = []
    configured = {s.name: s for s in rt.config.sources}
    for name in names:
        snaps = [(e.manifest, e.regions) for e in by_source[name] if e.manifest is not None]
        outcome = state.read_outcome(rt.config.daemon.state_dir, name)
        # The same judgement as `drctl status`: which snapshot is newest, where it is.
        src = configured.get(name) or rt.config.source(name)  # ConfigError if unknown
        judged = status.evaluate(rt.config, src, snaps, outcome, now)
        sources.append(SourceListing(
            name, tuple(listed_snapshot(m, regions) for m, regions in snaps),
            tuple(r for e in by_source[name] for r in e.problems),
            judged.newest_id, tuple(judged.regions),
            outcome.last_attempt is not None or outcome.unfinished, outcome.pending_retry))
    reachable = tuple(r for r in st.regions if r not in listing.region_errors)
    drills = None if source else _drill_records(rt)
    tiers, etas = (None, None) if source else _plan_etas(rt, by_source, drills or [],
                                                          listing.region_errors)
    st.record_refresh(StorageRefresh(now.timestamp(), reachable, tuple(sources), drills,
                                     tiers, etas))
    if source is None:
        _tenants(rt, st)
    return listing


def tenant_lifecycle(s: lifecycle.TenantState) -> TenantLifecycle:
    """Pure: one tenant's lifecycle state as the metrics render it."""
    return TenantLifecycle(s.tenant, lifecycle.state_name(s),
                           None if s.erase_due is None else s.erase_due.timestamp(),
                           s.hold is not None)


def _tenants(rt: Runtime, st: MetricsState) -> None:
    """Every configured or recorded tenant's lifecycle; the last known if unreadable."""
    try:
        states = lifecycle.load_all(rt)
    except Exception as exc:  # a malformed state file must not stop the other metrics
        log.warning("cannot read the tenants' lifecycle for metrics: %s", exc)
        return
    st.record_tenants(tenant_lifecycle(s) for s in states)


def _plan_etas(rt: Runtime, listed: Mapping[str, Sequence[catalog.SnapshotEntry]],
               records: Sequence[DrillRecordLike], unreachable: Iterable[str]
               ) -> tuple[dict[str, float] | None, dict[str, float] | None]:
    """The recovery plan's ETA per tier and per source, as `drctl recovery plan` gives it
    now (regions that cannot be listed count as lost; one restore at a time); None, None
    (the last ones kept) if it cannot be made."""
    restores = drill_records.latest_restores(
        [r for r in records if isinstance(r, drill_records.DrillRecord)],
        [s.name for s in rt.config.sources])
    try:
        plan = recovery_plan.build_plan(recovery_plan.plan_sources(rt.config, listed),
                                        restores, lost=unreachable)
    except Exception as exc:  # a bug here must not stop the other metrics
        log.warning("cannot make the recovery plan for metrics: %s", exc)
        return None, None
    return ({t.tier: t.eta for t in plan.tiers if t.eta is not None},
            {i.source: i.eta for i in plan.items if i.eta is not None})


def _drill_records(rt: Runtime) -> list[DrillRecordLike]:
    """The drill records of configured sources; none if the drill log cannot be read."""
    try:
        records = drill_records.load_records(rt.config.daemon.state_dir)
    except Exception as exc:  # a broken drill log must not stop the other metrics
        log.warning("cannot read drill records for metrics: %s", exc)
        return []
    # A source since removed from the config is no evidence about today's tiers.
    known = {s.name for s in rt.config.sources}
    return [r for r in records if r.source in known]
