"""Rendering: the metric families of a MetricsState, and the collector a scrape calls.

A scrape must stay fast with a thousand sources however slow a bucket is, so
nothing here lists a bucket when Prometheus asks: it renders the cached state
(the daemon keeps that rendering until the state changes: exposition.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .state import MetricsState
from .views import ERASURE_OUTCOMES, FAILURE_REASONS, STANDBY_STATES, TENANT_STATES

SOURCE_LABELS = ("source", "tenant", "tier")
REGION_LABELS = (*SOURCE_LABELS, "region")


def _gauge(name: str, doc: str, labels: Sequence[str] = (), unit: str = "",
           value: float | None = None) -> GaugeMetricFamily:
    if value is not None:
        return GaugeMetricFamily(name, doc, value=value, unit=unit)
    return GaugeMetricFamily(name, doc, labels=list(labels), unit=unit)


def families(st: MetricsState, now: datetime) -> list[Metric]:
    """Pure: render `st` as metric families; ages are taken at `now`."""
    return [*state_families(st), *timed_families(st, now)]


def _labeller(st: MetricsState) -> Callable[[str], list[str]]:
    src = st.sources

    def lab(source: str) -> list[str]:
        i = src.get(source)
        return i.labels if i else [source, "", ""]
    return lab


def timed_families(st: MetricsState, now: datetime) -> list[Metric]:
    """Pure: the families whose values depend on `now` (ages), rendered at every scrape."""
    lab = _labeller(st)
    oldest = _gauge("drdaemon_oldest_retained_snapshot_age_seconds",
                    "Age of the oldest retained snapshot in the region (by consistency time).",
                    REGION_LABELS)
    t_now = now.timestamp()
    for name, v in sorted(st.views.items()):
        labels = lab(name)
        for region, t in sorted(v.oldest.items()):
            oldest.add_metric([*labels, region], max(0.0, t_now - t))
    # The queue is read every heartbeat: its few series are rendered at each scrape
    # rather than making every read throw away the render of everything else.
    return [oldest, *_queue_families(st, t_now)]


def state_families(st: MetricsState) -> list[Metric]:
    """Pure: every family whose values depend on `st` alone (what a scrape may reuse
    until `st` changes; see exposition.py)."""
    info, lab = list(st.sources.values()), _labeller(st)
    out: list[Metric] = []
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

    out += _storage_families(st, lab)
    out += _activity_families(st, lab)
    out += _orphan_families(st, lab)
    out += _drill_families(st, lab)
    out += _audit_families(st)
    out += _tenant_families(st)
    out += _unmanaged_families(st)
    out += _standby_families(st)
    out += _key_families(st)
    return out


QUEUE_STATES = ("waiting", "scheduled", "running", "failed")


def _queue_families(st: MetricsState, t_now: float) -> list[Metric]:
    """The cluster's job queue as the scheduler last read it (absent without [cluster])."""
    q = st.queue
    if q is None:
        return []
    jobs = _gauge("drdaemon_queue_jobs", "Jobs in the cluster's queue by kind and state: "
                  "waiting (runnable, not taken), scheduled (a retry waiting for its time), "
                  "running, failed (in the last day).", ["kind", "state"])
    oldest = _gauge("drdaemon_queue_oldest_waiting_seconds", "How long the oldest job of "
                    "the kind waiting to be taken has waited (0: none waits).", ["kind"])
    for k in q.kinds:
        for state in QUEUE_STATES:
            jobs.add_metric([k.kind, state], float(getattr(k, state)))
        oldest.add_metric([k.kind], k.oldest_wait)
    workers = _gauge("drdaemon_queue_workers", "Workers with a recent heartbeat.",
                     value=q.workers)
    capacity = _gauge("drdaemon_queue_worker_capacity", "Jobs one worker runs at once "
                      "([cluster] max_concurrent_snapshots).", value=q.capacity)
    bound = _gauge("drdaemon_queue_max_wait_seconds", "How long a job may wait before "
                   "DrdaemonQueueBacklog fires ([cluster] max_queue_wait).", value=q.max_wait)
    read = _gauge("drdaemon_queue_read_age_seconds", "Seconds since the scheduler last "
                  "read the queue.", value=max(t_now - q.read_at, 0.0))
    return [jobs, oldest, workers, capacity, bound, read]


def _standby_families(st: MetricsState) -> list[Metric]:
    """Hot standbys as the daemon's last poll judged them (standby.py); a lag that could
    not be read is left out rather than shown as 0."""
    labels = ["standby", "source"]

    def g(name: str, doc: str, extra: Sequence[str] = ()) -> GaugeMetricFamily:
        return _gauge(f"drdaemon_standby_{name}", doc, [*labels, *extra])

    up = g("up", "1 if the hot standby answers and is in recovery, else 0.")
    state = g("replication_state", "1 for the primary's pg_stat_replication state of the "
              "standby (absent: the primary lists none), 0 for the others.", ["state"])
    lag_b = g("lag_bytes", "WAL bytes between the primary's position and the standby's "
              "replay position.")
    lag_s = g("lag_seconds", "Seconds since the last transaction the standby replayed, "
              "0 when nothing received waits.")
    paused = g("replay_paused", "1 while the standby's replay is paused, else 0.")
    stalled = g("replay_stalled_seconds", "How long the standby's replay position has not "
                "moved while WAL waits to be replayed (0: moving or caught up).")
    max_b = g("max_lag_bytes", "The standby's lag bound in bytes (max_lag_bytes).")
    max_s = g("max_lag_seconds", "The standby's lag bound in seconds (max_lag).")
    polled = g("last_poll_timestamp_seconds", "When the daemon last polled the standby.")
    for name, s in sorted(st.standbys.items()):
        key = [name, s.source]
        up.add_metric(key, float(s.up))
        for each in STANDBY_STATES:
            state.add_metric([*key, each], float(s.state == each))
        if s.lag_bytes is not None:
            lag_b.add_metric(key, s.lag_bytes)
        if s.lag_seconds is not None:
            lag_s.add_metric(key, s.lag_seconds)
        paused.add_metric(key, float(s.paused))
        stalled.add_metric(key, s.stalled_seconds)
        max_b.add_metric(key, s.max_lag_bytes)
        max_s.add_metric(key, s.max_lag_seconds)
        polled.add_metric(key, s.polled_at)
    return [up, state, lag_b, lag_s, paused, stalled, max_b, max_s, polled]


def _key_families(st: MetricsState) -> list[Metric]:
    """The operator recipients (ops, escrow): when each was last proven to open every
    tenant key, and the tenant keys not wrapped to one; from the last keys check."""
    labels = ["recipient", "fingerprint"]
    max_age = _gauge("drdaemon_recipient_proof_max_age_seconds",
                     "How long a configured recipient may go without a proof that its "
                     "identity opens every tenant key ([keys] proof_max_age).", labels)
    proven = _gauge("drdaemon_recipient_last_proven_timestamp_seconds",
                    "When the recipient's identity was last shown to open what it must "
                    "(drctl keys prove, the daemon's keys job, a drill); absent: never.",
                    labels)
    missing = _gauge("drdaemon_tenant_keys_missing_recipient",
                     "Keys of the tenant not wrapped to the configured recipient "
                     "(from the keys' records).", ["tenant", *labels])
    if st.keys is not None:
        names = {r.fingerprint: r.name for r in st.keys.recipients}
        for r in st.keys.recipients:
            max_age.add_metric([r.name, r.fingerprint], st.proof_max_age)
            if r.last_proven is not None:
                proven.add_metric([r.name, r.fingerprint], r.last_proven)
        for (tenant, fp), n in sorted(st.keys.missing.items()):
            missing.add_metric([tenant, names.get(fp, ""), fp], n)
    return [max_age, proven, missing]


def _unmanaged_families(st: MetricsState) -> list[Metric]:
    """Data of sources no longer configured (inventory.py), as last listed; absent: none.

    Labels: the source and the tenant its newest manifest names (bounded by what the
    regions hold under `sources/`, which only drdaemon writes).
    """
    labels = ["source", "tenant"]
    size = _gauge("drdaemon_unmanaged_bytes",
                  "Bytes, in every region together, of a source found in storage but not in "
                  "the config.", labels)
    newest = _gauge("drdaemon_unmanaged_newest_snapshot_timestamp_seconds",
                    "When the newest snapshot of that unmanaged source was begun.", labels)
    window = _gauge("drdaemon_unmanaged_erase_after_seconds",
                    "The erasure window of its tenant (erase_after; 28 days if the tenant is "
                    "not configured): its data must be gone that long after it stopped.",
                    labels)
    for name, u in sorted(st.unmanaged.items()):
        key = [name, u.tenant]
        size.add_metric(key, u.bytes)
        window.add_metric(key, u.erase_after)
        if u.newest is not None:
            newest.add_metric(key, u.newest)
    return [size, newest, window]


def _storage_families(st: MetricsState, lab: Callable[[str], list[str]]) -> list[Metric]:
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
    for name, v in sorted(st.views.items()):
        labels = lab(name)
        for region, t in sorted(v.newest.items()):
            last.add_metric([*labels, region], t)
        if v.holding_newest:
            # An unreachable region counts as missing, as in `drctl status`.
            for region in st.home(name, st.regions):  # its tenant's residency
                present.add_metric([*labels, region], float(region in v.holding_newest))
            holding.add_metric(labels, len(v.holding_newest))
        for region, n in sorted(v.retained.items()):
            retained.add_metric([*labels, region], n)
        for region, n in sorted(v.unreadable.items()):
            unreadable.add_metric([*labels, region], n)
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
    # Before the first full read after a start, the per-source families above
    # hold nothing or a part: say so rather than let a partial view look whole.
    complete = _gauge("drdaemon_state_complete",
                      "1 once storage has been read in full since the daemon started; "
                      "0 while the first read is under way.")
    complete.add_metric([], float(st.refreshed_at is not None))
    return [last, present, holding, retained, duration, *sizes.values(), attempt,
            reach, refreshed, complete, unreadable]


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
    plan_tier = _gauge("drdaemon_recovery_plan_tier_eta_seconds",
                       "When the tier's last restore would end if every source were restored "
                       "now, paid tiers first, one at a time (drctl recovery plan).", ["tier"])
    for tier, seconds in sorted(st.plan_tier_eta.items()):
        plan_tier.add_metric([tier], seconds)
    plan_source = _gauge("drdaemon_recovery_plan_source_eta_seconds",
                         "When the source's restore would end in the recovery plan.",
                         SOURCE_LABELS)
    for name, seconds in sorted(st.plan_source_eta.items()):
        plan_source.add_metric(lab(name), seconds)
    return [when, ok, rto, rpo, rto_target, rpo_target, projected, plan_tier, plan_source]


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
    others = _gauge("drdaemon_audit_other_chains",
                    "Chains of this host's audit log in the region other than the local "
                    "log's: the local log was wiped and begun anew, or replaced.", ["region"])
    for region, v in sorted(st.audit_mirrors.items()):
        mirror_ok.add_metric([region], float(v.ok))
        mirror_when.add_metric([region], v.checked_at)
        others.add_metric([region], v.other_chains)
    return [ok, when, records, mirror_ok, mirror_when, others, *_anchor_families(st)]


def _anchor_families(st: MetricsState) -> list[Metric]:
    anchored = _gauge("drdaemon_audit_anchored_timestamp_seconds",
                      "When the anchor job last left the audit log's head anchored everywhere "
                      "configured (time-stamp, state folder, regions, witness).")
    newest = _gauge("drdaemon_audit_anchor_newest_timestamp_seconds",
                    "The time of the newest anchor of the audit log's head.")
    failures = CounterMetricFamily("drdaemon_audit_anchor_failures",
                                   "Anchor runs that could not stamp or write the anchor, by "
                                   "place (tsa, state, log, witness or a region).",
                                   labels=["place"])
    if st.anchored_at is not None:
        anchored.add_metric([], st.anchored_at)
    if st.anchor_newest is not None:
        newest.add_metric([], st.anchor_newest)
    for place, n in sorted(st.anchor_failures.items()):
        failures.add_metric([place], n)
    return [anchored, newest, failures]


def _tenant_families(st: MetricsState) -> list[Metric]:
    due = _gauge("drdaemon_tenant_erasure_deadline_timestamp_seconds",
                 "When every copy of the offboarded tenant's data must be gone "
                 "(end of service + erase_after).", ["tenant"])
    state = _gauge("drdaemon_tenant_state",
                   "1 for the tenant's lifecycle state (active, offboarded, held, erased), "
                   "0 for the others.", ["tenant", "state"])
    hold = _gauge("drdaemon_tenant_legal_hold",
                  "1 while a legal hold suspends prune and erasure for the tenant, else 0.",
                  ["tenant"])
    erasures = CounterMetricFamily("drdaemon_tenant_erasures",
                                   "Due erasures the daemon's erasure job handled, by outcome "
                                   "(done, failed).",
                                   labels=["tenant", "outcome"])
    for name, t in sorted(st.tenants.items()):
        if t.erase_due is not None:
            due.add_metric([name], t.erase_due)
        for s in TENANT_STATES:
            state.add_metric([name, s], float(t.state == s))
        hold.add_metric([name], float(t.held))
    for name in sorted({t for t, _ in st.erasures}):
        for outcome in ERASURE_OUTCOMES:
            erasures.add_metric([name, outcome], st.erasures[(name, outcome)])
    return [due, state, hold, erasures]


class StateCollector(Collector):
    """Renders a MetricsState at scrape time; reads nothing else."""

    def __init__(self, st: MetricsState, clock: Callable[[], datetime]) -> None:
        self.state = st
        self.clock = clock

    def collect(self) -> Iterable[Metric]:
        with self.state.lock.reading():
            return families(self.state, self.clock())


class RoleCollector(Collector):
    """`drdaemon_active`: 1 for the daemon that runs the jobs, 0 for a standby waiting
    for the cluster lock (`[daemon] lock_dsn`)."""

    def __init__(self, active: bool) -> None:
        self.active = active

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "drdaemon_active", "1 if this daemon runs the jobs (it holds the cluster lock, or "
            "none is configured); 0 while it waits as a standby.", value=int(self.active))


def build_registry(st: MetricsState, clock: Callable[[], datetime]) -> CollectorRegistry:
    """A registry with drdaemon's collector, `drdaemon_active` 1, and the process and
    platform collectors (rendered afresh at every collect; the daemon serves the same
    through exposition.Exposition, which renders the state once per change)."""
    registry = live_registry()
    registry.register(StateCollector(st, clock))
    return registry


def live_registry(active: bool = True) -> CollectorRegistry:
    """The collectors read at every scrape: `drdaemon_active`, the process and the
    platform."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RoleCollector(active))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def standby_registry() -> CollectorRegistry:
    """What a standby serves: `drdaemon_active` 0 and its process; no backup metrics,
    which are the active daemon's to report."""
    return live_registry(active=False)
