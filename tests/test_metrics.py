"""Metrics: the pure rendering, the daemon's hooks, /metrics over HTTP, and a real Prometheus.

Each test reads its own fresh CollectorRegistry (never the global one) with
get_sample_value, or scrapes the daemon's own endpoint.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import S3Region
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from support import Setup, directory_source, local_region, make_setup
from test_alert_rules import rules as alert_rules

from drdaemon import audit_chain, audit_mirror, metrics, metrics_feed
from drdaemon import config as config_mod
from drdaemon.backup import BackupResult, error_kind, snapshot
from drdaemon.errors import DrError, SourceError
from drdaemon.layout import data_object_name, manifest_object_name, new_snapshot_id
from drdaemon.metrics import (
    DrillView,
    MetricsState,
    SourceView,
    StateCollector,
    drill_views,
    failure_reason,
    retention_span_target,
    schedule_view,
)
from drdaemon.orphans import OrphanPlan, OrphanVerdict
from drdaemon.pipeline import AllRegionsFailed, Cancelled
from drdaemon.prune import PruneReport
from drdaemon.prune_plan import PrunePlan, RegionPlan
from drdaemon.replicate import run_replicate
from drdaemon.runtime import open_runtime
from drdaemon.scheduler import Daemon
from drdaemon.status import source_statuses
from drdaemon.storage import StorageError
from drdaemon.trash import Change, RegionError
from drdaemon.verify import CopyCheck, VerifyReport, run_verify

ALERTS = Path(__file__).resolve().parent.parent / "config" / "prometheus" / "alerts.yml"
NOW = datetime(2026, 11, 23, 12, tzinfo=UTC)
T = NOW.timestamp()


def wait_for(cond: Callable[[], object], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what or cond}"
        time.sleep(0.1)


def registry_of(st: MetricsState, now: datetime = NOW) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(StateCollector(st, lambda: now))
    return reg


def sample_state() -> MetricsState:
    st = MetricsState(
        sources={"db": metrics.SourceInfo("db", "uni-a", "paid", "postgres", 14, 7776000.0),
                 "files": metrics.SourceInfo("files", "uni-b", "free", "directory", 5, 0.0)},
        regions=("eu", "us"), tiers={"paid": (86400.0, 86400.0), "free": (86400.0, 172800.0)})
    st.views["db"] = SourceView(
        newest={"eu": T - 3600, "us": T - 90000}, oldest={"eu": T - 86400 * 100, "us": T - 90000},
        retained={"eu": 14, "us": 1}, holding_newest=("eu",), duration=42.5,
        plaintext_bytes=1000, compressed_bytes=400, stored_bytes=450, last_attempt_ok=False)
    st.region_reachable = {"eu": True, "us": True}
    st.snapshot_attempts["db"] = 3
    st.snapshot_failures[("db", "storage")] = 2
    st.drills = {"db": DrillView(T - 7200, True, 1800.0, 3600.0, 90000.0, 86400.0)}
    st.drill_intervals = {"paid": 604800.0}
    st.projected_rto = {"paid": 50000.0}
    st.running["snapshot"] = 1
    st.job_next_run = {"prune": T + 60}
    st.source_next_run = {"db": T + 120}
    st.refreshed_at = T - 10
    st.audit_mirrors = {"eu": metrics.AuditView(T - 60, True, 40)}
    st.orphans = {("db", "us", "lost"): metrics.OrphanView(1, 4096, T - 86400)}
    st.orphan_deletions[("db", "eu")] = 2
    return st


# -- the functional core ------------------------------------------------------------

def test_families_render_every_kind_of_state() -> None:
    reg = registry_of(sample_state())
    get = reg.get_sample_value
    db = {"source": "db", "tenant": "uni-a", "tier": "paid"}
    files = {"source": "files", "tenant": "uni-b", "tier": "free"}
    assert get("drdaemon_build_info", {"version": metrics.__version__}) == 1
    assert get("drdaemon_source_info", {**files, "kind": "directory"}) == 1
    assert get("drdaemon_last_snapshot_timestamp_seconds", {**db, "region": "eu"}) == T - 3600
    assert get("drdaemon_last_snapshot_timestamp_seconds", {**db, "region": "us"}) == T - 90000
    assert get("drdaemon_newest_snapshot_present", {**db, "region": "eu"}) == 1
    assert get("drdaemon_newest_snapshot_present", {**db, "region": "us"}) == 0
    assert get("drdaemon_newest_snapshot_regions", db) == 1
    assert get("drdaemon_retained_snapshots", {**db, "region": "eu"}) == 14
    # Ages are taken at the collector's clock, not stored.
    assert get("drdaemon_oldest_retained_snapshot_age_seconds", {**db, "region": "eu"}) == (
        86400 * 100)
    assert get("drdaemon_retention_target_snapshots", files) == 5
    assert get("drdaemon_retention_target_span_seconds", db) == 7776000
    assert get("drdaemon_last_snapshot_duration_seconds", db) == 42.5
    assert get("drdaemon_last_snapshot_plaintext_bytes", db) == 1000
    assert get("drdaemon_last_snapshot_compressed_bytes", db) == 400
    assert get("drdaemon_last_snapshot_stored_bytes", db) == 450
    assert get("drdaemon_snapshot_last_attempt_success", db) == 0
    assert get("drdaemon_snapshot_attempts_total", db) == 3
    assert get("drdaemon_snapshot_failures_total", {**db, "reason": "storage"}) == 2
    # Every bounded reason exists from the start, so rate() sees the first failure.
    assert get("drdaemon_snapshot_failures_total", {**files, "reason": "source"}) == 0
    assert get("drdaemon_snapshot_attempts_total", files) == 0
    assert get("drdaemon_tier_rpo_target_seconds", {"tier": "free"}) == 86400
    assert get("drdaemon_tier_rto_target_seconds", {"tier": "free"}) == 172800
    assert get("drdaemon_last_drill_timestamp_seconds", db) == T - 7200
    assert get("drdaemon_last_drill_success", db) == 1
    assert get("drdaemon_last_drill_rto_seconds", db) == 1800
    assert get("drdaemon_last_drill_rpo_seconds", db) == 3600
    assert get("drdaemon_last_drill_rto_target_seconds", db) == 90000
    assert get("drdaemon_last_drill_rpo_target_seconds", db) == 86400
    assert get("drdaemon_drill_interval_seconds", {"tier": "paid"}) == 604800
    assert get("drdaemon_projected_tier_rto_seconds", {"tier": "paid"}) == 50000
    assert get("drdaemon_job_running", {"job_name": "snapshot"}) == 1
    assert get("drdaemon_job_next_run_timestamp_seconds", {"job_name": "prune"}) == T + 60
    assert get("drdaemon_snapshot_next_run_timestamp_seconds", db) == T + 120
    assert get("drdaemon_state_refresh_timestamp_seconds") == T - 10
    assert get("drdaemon_state_complete") == 1
    assert get("drdaemon_region_reachable", {"region": "us"}) == 1
    assert get("drdaemon_orphan_objects", {**db, "region": "us", "verdict": "lost"}) == 1
    assert get("drdaemon_orphan_bytes", {**db, "region": "us", "verdict": "lost"}) == 4096
    assert get("drdaemon_orphan_first_seen_timestamp_seconds",
               {**db, "region": "us", "verdict": "lost"}) == T - 86400
    assert get("drdaemon_orphan_deletions_total", {**db, "region": "eu"}) == 2
    assert get("drdaemon_orphan_grace_seconds", files) == 86400  # the default
    # A source never refreshed has no storage series at all (not zeros that look real).
    assert get("drdaemon_retained_snapshots", {**files, "region": "eu"}) is None


def test_a_partial_view_before_the_first_full_read_says_so() -> None:
    st = sample_state()
    st.refreshed_at = None  # only a one-source refresh so far, or none
    get = registry_of(st).get_sample_value
    assert get("drdaemon_state_complete") == 0
    assert get("drdaemon_state_refresh_timestamp_seconds") is None


def test_no_label_holds_a_snapshot_id_or_anything_unbounded() -> None:
    bounded = {"source", "tenant", "tier", "region", "kind", "reason", "outcome", "status",
               "verdict", "job_name", "version"}
    for family in registry_of(sample_state()).collect():
        for s in family.samples:
            if s.name.startswith("drdaemon_"):
                assert set(s.labels) <= bounded, s


@pytest.mark.parametrize(("exc", "reason"), [
    (Cancelled("stopped by shutdown before the upload completed"), "cancelled"),
    (StorageError("no region can be written: eu: refused; us: refused"), "storage"),
    (AllRegionsFailed("every region failed: eu: timeout"), "storage"),
    (SourceError("pg_dump of host=db failed (exit 1): permission denied"), "source"),
    (DrError("something else"), "other"),
])
def test_failure_reason_is_one_of_four(exc: DrError, reason: str) -> None:
    result = BackupResult("s", error=str(exc), error_kind=error_kind(exc))
    assert failure_reason(result) == reason
    assert failure_reason(BackupResult("s", error="internal error: KeyError")) == "other"


def test_retention_span_target_is_promised_only_for_the_published_policy_or_longer() -> None:
    base = config_mod.RetentionConfig()
    assert retention_span_target(base) == timedelta(days=90)
    assert retention_span_target(config_mod.RetentionConfig(daily=14, weekly=8, monthly=6)) == (
        timedelta(days=90))
    assert retention_span_target(config_mod.RetentionConfig(daily=14, weekly=0, monthly=0)) == (
        timedelta(0))


@dataclass(frozen=True)
class Record:
    """The fields drill_records.DrillRecord documents; plain data, as load_records returns."""

    source: str
    tier: str
    ok: bool
    verified: bool
    rto_seconds: float | None
    rpo_seconds: float | None
    projected_tier_rto_seconds: float | None
    finished_at: str
    rto_target_seconds: float = 86400.0
    rpo_target_seconds: float = 86400.0
    tenant: str = "uni-a"
    region: str = "us"


def test_drill_views_keep_the_latest_per_source_and_tier() -> None:
    views, projected = drill_views([
        Record("db", "paid", True, True, 100.0, 50.0, 9000.0, "2026-11-20T06:00:00+00:00"),
        Record("db", "paid", False, False, None, None, None, "2026-11-21T06:00:00+00:00"),
        # Restored and verified, but slower than the target: not "failed" (ok is False).
        Record("files", "paid", False, True, 10.0, 5.0, 7000.0, "2026-11-19T06:00:00+00:00"),
        Record("broken", "paid", True, True, 1.0, 1.0, 1.0, "not a time"),
    ])
    assert views["db"] == DrillView(datetime(2026, 11, 21, 6, tzinfo=UTC).timestamp(), False,
                                    None, None, 86400.0, 86400.0)
    assert views["files"].rto_seconds == 10.0 and views["files"].ok
    assert "broken" not in views
    assert projected == {"paid": 9000.0}  # the latest record that projected anything


def test_schedule_view_takes_the_sooner_of_cron_and_retry() -> None:
    at = [NOW + timedelta(minutes=m) for m in range(4)]
    jobs, sources = schedule_view([("snapshot:db", at[3]), ("retry:db", at[1]),
                                   ("snapshot:files", at[2]), ("prune", at[0]),
                                   ("drill:paid", at[2]), ("verify", None)])
    assert sources == {"db": at[1].timestamp(), "files": at[2].timestamp()}
    assert jobs == {"prune": at[0].timestamp(), "drill:paid": at[2].timestamp()}


record = metrics_feed.record_report  # what the daemon's jobs hand the metrics


def test_reports_are_counted_by_region_and_status() -> None:
    st = sample_state()
    record(st, PruneReport(PrunePlan(NOW, False, ()), False, changes=[
        Change("trash", "db", "eu", "id1", "done", ""),
        Change("trash", "db", "eu", "id2", "failed", "x"),
        Change("purge", "db", "eu", "id0", "done", ""),
    ]))
    record(st, VerifyReport(False, checks=[
        CopyCheck("db", "id1", "eu", "ok"), CopyCheck("db", "id1", "us", "corrupt", "sha"),
        CopyCheck("db", "id3", "us", "missing", "gone")]))
    get = registry_of(st).get_sample_value
    db = {"source": "db", "tenant": "uni-a", "tier": "paid"}
    assert get("drdaemon_prune_deletions_total", {**db, "region": "eu"}) == 1
    assert get("drdaemon_verify_failures_total", {**db, "region": "us", "status": "corrupt"}) == 1
    assert get("drdaemon_verify_failed_copies", {**db, "region": "us"}) == 2
    assert get("drdaemon_verify_failed_copies", {**db, "region": "eu"}) == 0
    # The next run that passes clears the gauge (the counter keeps the history).
    record(st, VerifyReport(False, checks=[CopyCheck("db", "id1", "us", "ok")]))
    get = registry_of(st).get_sample_value
    assert get("drdaemon_verify_failed_copies", {**db, "region": "us"}) == 0
    assert get("drdaemon_verify_failures_total", {**db, "region": "us", "status": "corrupt"}) == 1


def test_the_replicate_job_counts_its_repairs(tmp_path: Path, trees: list[Path]) -> None:
    setup = two_sources(tmp_path, trees)
    rt = open_runtime(config_mod.load(setup.config))
    daemon = Daemon(rt)
    assert daemon.snapshot_job(rt.config.sources[0]) is not None
    shutil.rmtree(tmp_path / "r-us" / "sources" / "files-a")  # the us copy is lost
    daemon.maintenance_job("replicate", lambda: run_replicate(rt, repair=True))

    get = metrics.build_registry(daemon.metrics, rt.clock).get_sample_value
    us = {"source": "files-a", "tenant": "uni-a", "tier": "paid", "region": "us"}
    assert get("drdaemon_replica_repairs_total", {**us, "outcome": "repaired"}) == 1
    assert get("drdaemon_replica_repairs_total", {**us, "outcome": "failed"}) is None
    la = {k: v for k, v in us.items() if k != "region"}
    assert get("drdaemon_newest_snapshot_regions", la) == 2  # and the refresh saw it


def orphan(snap: str, action: str, size: int, seen: datetime) -> OrphanVerdict:
    return OrphanVerdict(f"sources/db/data/{snap}.pgdump.zst.age", snap, size, action,
                         ("no manifest or trash entry in any region", action), seen)


def test_prune_reports_set_the_orphan_gauges_of_what_they_read() -> None:
    st = sample_state()
    st.orphans = {("files", "eu", "keep"): metrics.OrphanView(3, 30, T)}  # an earlier run
    planned = PrunePlan(NOW, False, tuple(RegionPlan(s, r, ()) for s in ("db", "files")
                                          for r in ("eu", "us")))
    record(st, PruneReport(planned, False, changes=[
        Change("trash", "db", "eu", "s0", "done", ""),
        Change("orphan", "db", "us", "o5", "done", "deleted"),
        Change("orphan", "db", "us", "o6", "failed", "access denied"),
    ], orphans=[
        OrphanPlan("db", "eu", 9, (orphan("o1", "lost", 100, NOW - timedelta(days=2)),
                                   orphan("o2", "keep", 10, NOW - timedelta(hours=1)),
                                   orphan("o3", "keep", 20, NOW))),
        OrphanPlan("db", "us", 9, (orphan("o4", "blocked", 7, NOW - timedelta(days=3)),
                                   orphan("o5", "delete", 5, NOW - timedelta(days=2)),
                                   orphan("o6", "delete", 6, NOW - timedelta(days=2)))),
    ]))
    get = registry_of(st).get_sample_value
    db = {"source": "db", "tenant": "uni-a", "tier": "paid"}
    files = {"source": "files", "tenant": "uni-b", "tier": "free"}

    def orphans(name: str, labels: dict[str, str], region: str, verdict: str) -> float | None:
        return get(f"drdaemon_orphan_{name}", {**labels, "region": region, "verdict": verdict})

    assert (orphans("objects", db, "eu", "lost"), orphans("bytes", db, "eu", "lost")) == (1, 100)
    assert (orphans("objects", db, "eu", "keep"), orphans("bytes", db, "eu", "keep")) == (2, 30)
    assert orphans("first_seen_timestamp_seconds", db, "eu", "keep") == T - 3600  # the oldest
    assert orphans("objects", db, "us", "blocked") == 1
    # Deleted: gone; a failed delete is still there, as "delete".
    assert (orphans("objects", db, "us", "delete"), orphans("bytes", db, "us", "delete")) == (1, 6)
    assert get("drdaemon_orphan_deletions_total", {**db, "region": "us"}) == 1
    assert get("drdaemon_prune_deletions_total", {**db, "region": "eu"}) == 1
    assert orphans("objects", files, "eu", "keep") is None  # read this time, and clean

    # Next run: us cannot be read, eu has no orphan left. us keeps its last result.
    record(st, PruneReport(PrunePlan(NOW, False, (RegionPlan("db", "eu", ()),)), False,
                                 region_errors=[RegionError("db", "us", "connection refused")]))
    get = registry_of(st).get_sample_value
    assert orphans("objects", db, "eu", "lost") is None
    assert orphans("objects", db, "eu", "keep") is None
    assert orphans("objects", db, "us", "blocked") == 1
    assert orphans("objects", db, "us", "delete") == 1
    assert get("drdaemon_orphan_deletions_total", {**db, "region": "us"}) == 1


def test_audit_checks_render_and_an_unreadable_region_keeps_its_last_result() -> None:
    st = sample_state()
    st.audit_mirrors = {}
    get = registry_of(st).get_sample_value
    assert get("drdaemon_audit_verified_ok") is None  # never checked: absent, not a false 0
    ok = audit_chain.AuditVerification(True, 40)
    copy = audit_mirror.CopyAudit(ok)
    record(st, audit_mirror.AuditCheck(NOW - timedelta(days=1), ok, {"eu": copy, "us": copy}))
    bad = audit_chain.AuditVerification(False, 12, 12, "MAC does not match")
    differs = audit_mirror.CopyAudit(
        audit_chain.AuditVerification(False, 12, 12, "differs from the local log"),
        ("another chain of this host",), ("audit/h/0123456789abcdef",))
    record(st, audit_mirror.AuditCheck(NOW, bad, {"eu": differs}, {"us": "connection refused"}))
    get = registry_of(st).get_sample_value
    assert get("drdaemon_audit_verified_ok") == 0
    assert get("drdaemon_audit_verified_records") == 12
    assert get("drdaemon_audit_last_verified_timestamp_seconds") == T
    assert get("drdaemon_audit_mirror_verified_ok", {"region": "eu"}) == 0
    assert get("drdaemon_audit_mirror_last_verified_timestamp_seconds", {"region": "eu"}) == T
    assert get("drdaemon_audit_other_chains", {"region": "eu"}) == 1
    assert get("drdaemon_audit_other_chains", {"region": "us"}) == 0
    # us could not be read: it says nothing about the log, and its check time goes stale.
    assert get("drdaemon_audit_mirror_verified_ok", {"region": "us"}) == 1
    assert get("drdaemon_audit_mirror_last_verified_timestamp_seconds", {"region": "us"}) == (
        T - 86400)


def test_registry_has_the_process_collector() -> None:
    reg = metrics.build_registry(sample_state(), lambda: NOW)
    assert reg.get_sample_value("process_cpu_seconds_total") is not None
    assert reg.get_sample_value("drdaemon_build_info", {"version": metrics.__version__}) == 1


# -- the daemon: hooks, refresh, /metrics over HTTP ---------------------------------

@pytest.fixture
def trees(tmp_path: Path) -> list[Path]:
    out = []
    for name in ("a", "b"):
        (tmp_path / name / "d").mkdir(parents=True)
        (tmp_path / name / "d" / "f.txt").write_text(name * 1000)
        out.append(tmp_path / name)
    return out


def two_sources(tmp_path: Path, trees: list[Path], daemon: str = "") -> Setup:
    return make_setup(tmp_path, [local_region("eu", tmp_path / "r-eu", "europe"),
                                 local_region("us", tmp_path / "r-us", "north-america")],
                      [directory_source("files-a", trees[0], tier="paid", tenant="uni-a"),
                       directory_source("files-b", trees[1], tier="free", tenant="uni-b")],
                      daemon=daemon)


def test_refresh_says_what_drctl_status_says(tmp_path: Path, trees: list[Path]) -> None:
    setup = two_sources(tmp_path, trees)
    rt = open_runtime(config_mod.load(setup.config), clock=lambda: NOW)
    for src in rt.config.sources:
        assert snapshot(rt, src).ok
    shutil.rmtree(tmp_path / "r-us" / "sources" / "files-b")  # us lost files-b's copy
    st = MetricsState.from_config(rt.config)
    metrics_feed.refresh(rt, st)
    get = registry_of(st).get_sample_value
    statuses, _ = source_statuses(rt)
    for s in statuses:
        labels = {"source": s.source, "tenant": s.tenant, "tier": s.tier}
        assert s.newest_consistency is not None
        assert get("drdaemon_last_snapshot_timestamp_seconds", {**labels, "region": "eu"}) == (
            s.newest_consistency.timestamp())
        assert get("drdaemon_newest_snapshot_regions", labels) == len(s.regions)
        for region in ("eu", "us"):
            assert get("drdaemon_newest_snapshot_present", {**labels, "region": region}) == (
                region in s.regions)
        assert get("drdaemon_snapshot_last_attempt_success", labels) == 1
    b = {"source": "files-b", "tenant": "uni-b", "tier": "free"}
    assert get("drdaemon_retained_snapshots", {**b, "region": "us"}) == 0
    assert get("drdaemon_last_snapshot_timestamp_seconds", {**b, "region": "us"}) is None
    assert get("drdaemon_last_snapshot_stored_bytes", b) > 0
    assert get("drdaemon_state_refresh_timestamp_seconds") == T


def test_job_hooks_count_failures_and_verify_findings(tmp_path: Path,
                                                      trees: list[Path]) -> None:
    setup = two_sources(tmp_path, trees)
    rt = open_runtime(config_mod.load(setup.config))
    daemon = Daemon(rt)
    a, b = rt.config.sources
    assert daemon.snapshot_job(a) is not None
    shutil.rmtree(trees[1])
    assert daemon.snapshot_job(b) is not None  # fails: the tree is gone
    data = next((tmp_path / "r-us").glob("sources/files-a/data/*"))
    data.write_bytes(b"not what the manifest says")
    daemon.maintenance_job("verify", lambda: run_verify(rt))

    get = metrics.build_registry(daemon.metrics, rt.clock).get_sample_value
    la = {"source": "files-a", "tenant": "uni-a", "tier": "paid"}
    lb = {"source": "files-b", "tenant": "uni-b", "tier": "free"}
    assert get("drdaemon_snapshot_attempts_total", la) == 1
    assert get("drdaemon_snapshot_failures_total", {**la, "reason": "source"}) == 0
    assert get("drdaemon_snapshot_failures_total", {**lb, "reason": "source"}) == 1
    assert get("drdaemon_verify_failed_copies", {**la, "region": "us"}) == 1
    assert get("drdaemon_verify_failed_copies", {**la, "region": "eu"}) == 0
    assert get("drdaemon_verify_failures_total", {**la, "region": "us", "status": "corrupt"}) == 1
    assert get("drdaemon_job_last_run_success", {"job_name": "verify"}) == 1
    assert get("drdaemon_job_running", {"job_name": "verify"}) == 0
    # The maintenance job refreshed everything: files-b failed and has nothing stored.
    assert get("drdaemon_snapshot_last_attempt_success", lb) == 0
    assert get("drdaemon_snapshot_last_attempt_success", la) == 1
    assert get("drdaemon_retained_snapshots", {**lb, "region": "eu"}) == 0


def test_the_prune_job_exports_a_lost_and_a_pending_orphan(tmp_path: Path,
                                                            trees: list[Path]) -> None:
    """The daemon's prune job on real snapshots; the scrape lists nothing (cached state)."""
    setup = two_sources(tmp_path, trees)
    clock = [NOW - timedelta(days=2)]
    rt = open_runtime(config_mod.load(setup.config), clock=lambda: clock[0])
    daemon = Daemon(rt)
    [prune] = [fn for n, _, fn in daemon._maintenance() if n == "prune"]
    src = rt.config.sources[0]
    old = daemon.snapshot_job(src)
    clock[0] = NOW - timedelta(days=1)
    assert old is not None and old.manifest is not None and daemon.snapshot_job(src)
    lost_name = data_object_name(src.name, old.manifest.id, "directory")
    for store in rt.stores:  # removed by hand (or by an intruder), not through the trash
        store.delete(manifest_object_name(src.name, old.manifest.id))
    clock[0] = NOW - timedelta(days=1) + timedelta(hours=1)
    daemon.maintenance_job("prune", prune)  # first sighting: kept for the grace period
    get = metrics.build_registry(daemon.metrics, rt.clock).get_sample_value
    a = {"source": "files-a", "tenant": "uni-a", "tier": "paid"}
    assert get("drdaemon_orphan_objects", {**a, "region": "eu", "verdict": "keep"}) == 1

    # A backup that died between its data and its manifest, just now.
    pending = data_object_name(src.name, new_snapshot_id(NOW - timedelta(hours=1)), "directory")
    for store in rt.stores:
        store.put_bytes(pending, b"age-encryption.org/v1 ...")
    clock[0] = NOW + timedelta(hours=1)
    daemon.maintenance_job("prune", prune)
    get = metrics.build_registry(daemon.metrics, rt.clock).get_sample_value
    for region in ("eu", "us"):
        lost = {**a, "region": region, "verdict": "lost"}
        keep = {**a, "region": region, "verdict": "keep"}
        assert get("drdaemon_orphan_objects", lost) == 1
        assert get("drdaemon_orphan_bytes", lost) == old.manifest.size
        assert get("drdaemon_orphan_first_seen_timestamp_seconds", lost) == (
            NOW - timedelta(days=1) + timedelta(hours=1)).timestamp()
        assert get("drdaemon_orphan_objects", keep) == 1
        assert get("drdaemon_orphan_bytes", keep) == len(b"age-encryption.org/v1 ...")
        assert get("drdaemon_orphan_first_seen_timestamp_seconds", keep) == (
            NOW + timedelta(hours=1)).timestamp()
        assert get("drdaemon_orphan_deletions_total", {**a, "region": region}) is None
    assert get("drdaemon_orphan_grace_seconds", a) == 86400
    assert (tmp_path / "r-eu" / lost_name).exists()  # kept for a person to judge

    # A restarted daemon shows them before its next prune: the alert stays up.
    restarted = metrics.build_registry(Daemon(rt).metrics, rt.clock).get_sample_value
    for region in ("eu", "us"):
        for verdict in ("lost", "keep"):
            labels = {**a, "region": region, "verdict": verdict}
            assert restarted("drdaemon_orphan_objects", labels) == 1
            assert restarted("drdaemon_orphan_first_seen_timestamp_seconds", labels) == get(
                "drdaemon_orphan_first_seen_timestamp_seconds", labels)

    # The person judged it unneeded and deleted it; a day on, the pending one is due.
    for store in rt.stores:
        store.delete(lost_name)
    clock[0] = NOW + timedelta(days=1, hours=2)
    daemon.maintenance_job("prune", prune)
    get = metrics.build_registry(daemon.metrics, rt.clock).get_sample_value
    for region in ("eu", "us"):
        for verdict in ("lost", "keep", "delete"):
            assert get("drdaemon_orphan_objects",
                       {**a, "region": region, "verdict": verdict}) is None
        assert get("drdaemon_orphan_deletions_total", {**a, "region": region}) == 1
    assert not (tmp_path / "r-eu" / pending).exists()
    restarted = metrics.build_registry(Daemon(rt).metrics, rt.clock).get_sample_value
    assert restarted("drdaemon_orphan_objects", {**a, "region": "eu", "verdict": "lost"}) is None


def test_refresh_reads_the_drill_log(tmp_path: Path, trees: list[Path]) -> None:
    """Against drills/records.py's own record format, where that module exists."""
    drills = pytest.importorskip("drdaemon.drills.records")
    setup = two_sources(tmp_path, trees)
    rt = open_runtime(config_mod.load(setup.config), clock=lambda: NOW)

    def record(source: str, tier: str, finished: datetime, verified: bool,
               rto: float | None, projected: float | None) -> object:
        return drills.DrillRecord.from_dict({
            "id": f"{source}-{finished:%H}", "source": source, "tenant": "uni-a", "tier": tier,
            "region": "us", "snapshot_id": None, "sha256": None,
            "started_at": (finished - timedelta(minutes=5)).isoformat(),
            "finished_at": finished.isoformat(), "ok": verified, "verified": verified,
            "reasons": [], "rto_seconds": rto, "rpo_seconds": 60.0 if rto else None,
            "worst_gap_seconds": None, "throughput_bytes_per_second": None,
            "stored_bytes": None, "plaintext_bytes": None, "rto_target_seconds": 86400.0,
            "rpo_target_seconds": 86400.0, "projected_tier_rto_seconds": projected,
            "timings": {}})

    for r in (record("files-a", "paid", NOW - timedelta(hours=3), True, 300.0, 4000.0),
              record("files-a", "paid", NOW - timedelta(hours=1), False, None, None),
              record("files-b", "free", NOW - timedelta(hours=2), True, 120.0, 900.0),
              record("gone", "paid", NOW, True, 1.0, 1.0)):  # no longer configured
        drills.append_record(rt.config.daemon.state_dir, r)
    st = MetricsState.from_config(rt.config)
    metrics_feed.refresh(rt, st)
    get = registry_of(st).get_sample_value
    a = {"source": "files-a", "tenant": "uni-a", "tier": "paid"}
    b = {"source": "files-b", "tenant": "uni-b", "tier": "free"}
    assert get("drdaemon_last_drill_timestamp_seconds", a) == T - 3600
    assert get("drdaemon_last_drill_success", a) == 0
    assert get("drdaemon_last_drill_rto_seconds", a) is None  # the failed drill measured none
    assert get("drdaemon_last_drill_success", b) == 1
    assert get("drdaemon_last_drill_rto_seconds", b) == 120
    assert get("drdaemon_last_drill_rpo_seconds", b) == 60
    # The newest projection of the tier by a configured source (the failed drill made none).
    assert get("drdaemon_projected_tier_rto_seconds", {"tier": "paid"}) == 4000
    assert get("drdaemon_projected_tier_rto_seconds", {"tier": "free"}) == 900
    assert get("drdaemon_last_drill_success", {**a, "source": "gone"}) is None


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def sources_with(samples: dict[str, list[tuple[dict[str, str], float]]], name: str,
                 **match: str) -> set[str]:
    return {labels["source"] for labels, _ in samples.get(name, [])
            if all(labels.get(k) == v for k, v in match.items())}


@pytest.fixture
def running_daemon(tmp_path: Path, trees: list[Path],
                   free_port: Callable[[], int]) -> Iterator[tuple[Daemon, int]]:
    port = free_port()
    setup = two_sources(tmp_path, trees, daemon=f'metrics_address = "127.0.0.1:{port}"')
    daemon = Daemon(open_runtime(config_mod.load(setup.config)))
    daemon.start()  # nothing is backed up yet: both sources are caught up at once
    try:
        yield daemon, port
    finally:
        assert daemon.stop()


def test_daemon_serves_metrics_for_every_source(running_daemon: tuple[Daemon, int]) -> None:
    _, port = running_daemon
    both = {"files-a", "files-b"}

    def scraped_both() -> bool:
        s = scrape(port)
        return all(sources_with(s, "drdaemon_last_snapshot_timestamp_seconds", region=r) == both
                   for r in ("eu", "us"))

    wait_for(scraped_both, what="both sources' snapshots in /metrics")
    s = scrape(port)
    assert sources_with(s, "drdaemon_snapshot_attempts_total") == both
    assert sources_with(s, "drdaemon_newest_snapshot_regions") == both
    assert sources_with(s, "drdaemon_retained_snapshots", region="us") == both
    assert sources_with(s, "drdaemon_snapshot_next_run_timestamp_seconds") == both
    assert sources_with(s, "drdaemon_last_snapshot_plaintext_bytes") == both
    assert {v for _, v in s["drdaemon_newest_snapshot_regions"]} == {2}
    jobs = {labels["job_name"] for labels, _ in s["drdaemon_job_next_run_timestamp_seconds"]}
    assert {"prune", "replicate", "verify", "watchdog", "metrics"} <= jobs
    assert "process_cpu_seconds_total" in s
    now = time.time()
    for _, t in s["drdaemon_last_snapshot_timestamp_seconds"]:
        assert now - 120 < t <= now


def test_stop_closes_the_metrics_port(tmp_path: Path, trees: list[Path],
                                      free_port: Callable[[], int]) -> None:
    port = free_port()
    setup = two_sources(tmp_path, trees, daemon=f'metrics_address = "127.0.0.1:{port}"')
    daemon = Daemon(open_runtime(config_mod.load(setup.config)))
    daemon.start()
    assert "drdaemon_build_info" in scrape(port)
    # Let the catch-up run first: APScheduler may complain about a one-off job
    # that falls due at the very moment it shuts down.
    wait_for(lambda: sources_with(scrape(port), "drdaemon_last_snapshot_timestamp_seconds")
             == {"files-a", "files-b"}, what="the catch-up snapshots")
    assert daemon.stop()
    with pytest.raises(urllib.error.URLError):
        scrape(port)


def test_a_taken_port_does_not_stop_backups(tmp_path: Path, trees: list[Path],
                                            running_daemon: tuple[Daemon, int]) -> None:
    _, port = running_daemon
    other = tmp_path / "other"
    other.mkdir()
    setup = two_sources(other, trees, daemon=f'metrics_address = "127.0.0.1:{port}"')
    daemon = Daemon(open_runtime(config_mod.load(setup.config)))
    daemon.start()
    try:
        wait_for(lambda: len(list((other / "r-eu").glob("sources/*/manifests/*.json"))) == 2,
                 what="snapshots by the daemon without a metrics port")
    finally:
        assert daemon.stop()


# -- a real Prometheus scraping the daemon ------------------------------------------

def prometheus_binary() -> str:
    path = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(path).is_file():
        pytest.fail("prometheus is not installed (Debian: apt-get install prometheus; "
                    "scripts/test does it)")
    return path


def api(port: int, path: str, **params: str) -> dict[str, object]:
    url = f"http://127.0.0.1:{port}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            doc: dict[str, object] = json.loads(resp.read())
    except (urllib.error.URLError, ConnectionError):
        return {}
    return doc


def test_real_prometheus_scrapes_a_series_per_source(
        tmp_path: Path, running_daemon: tuple[Daemon, int],
        free_port: Callable[[], int]) -> None:
    _, daemon_port = running_daemon
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {ALERTS}\n"
        "scrape_configs:\n  - job_name: drdaemon\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{daemon_port}']\n")
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [prometheus_binary(), f"--config.file={config}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        def series_sources() -> set[str]:
            doc = api(prom_port, "query", query="drdaemon_last_snapshot_timestamp_seconds")
            result = (doc.get("data") or {}).get("result", [])  # type: ignore[attr-defined]
            return {r["metric"]["source"] for r in result}

        def failed() -> bool:
            return proc.poll() is not None

        wait_for(lambda: failed() or series_sources() == {"files-a", "files-b"}, 45,
                 "Prometheus to scrape both sources")
        assert not failed(), (tmp_path / "prometheus.log").read_text()[-3000:]

        up = api(prom_port, "query", query='up{job="drdaemon"}')["data"]
        assert [r["value"][1] for r in up["result"]] == ["1"]  # type: ignore[index]

        # The real Prometheus loads every rule and evaluates it on real series
        # without an error (a many-to-many join would show here).
        def rules() -> list[dict[str, str]]:
            groups = (api(prom_port, "rules").get("data") or {}).get(  # type: ignore[attr-defined]
                "groups", [])
            return [r for g in groups for r in g["rules"]]

        wait_for(lambda: rules() and all(r.get("health") == "ok" for r in rules()), 20,
                 "every rule evaluated")
        # Every alert of alerts.yml (its count changes as alerts are added).
        assert {r["name"] for r in rules()} == {r["alert"] for r in alert_rules()}
        firing = {r["name"] for r in rules() if r.get("state") == "firing"}
        assert not firing & {"DrdaemonRPOBreached", "DrdaemonDown", "DrdaemonAbsent",
                             "DrdaemonSnapshotOverdue", "DrdaemonRegionMissingSnapshot",
                             "DrdaemonAuditChainBroken", "DrdaemonAuditVerifyMissing",
                             "DrdaemonManifestUnreadable"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# -- the daemon's audit job ---------------------------------------------------------


def sample(port: int, name: str, **labels: str) -> float | None:
    return next((v for got, v in scrape(port).get(name, []) if got == labels), None)


def test_the_daemons_audit_job_catches_an_edited_line(tmp_path: Path, trees: list[Path],
                                                      free_port: Callable[[], int]) -> None:
    port = free_port()
    setup = two_sources(tmp_path, trees, daemon=f'metrics_address = "127.0.0.1:{port}"\n'
                                                 'audit_schedule = "15 3 * * *"')
    daemon = Daemon(open_runtime(config_mod.load(setup.config)))
    assert ("audit", "15 3 * * *") in [(n, e) for n, e, _ in daemon._maintenance()]
    daemon.start()
    try:
        wait_for(lambda: sources_with(scrape(port), "drdaemon_last_snapshot_timestamp_seconds")
                 == {"files-a", "files-b"}, what="the catch-up snapshots")

        def run_audit_job(records: float, ok: float) -> None:
            """Bring the scheduled job forward, as its cron would run it."""
            daemon.scheduler.modify_job("audit", next_run_time=datetime.now(daemon.tz))
            wait_for(lambda: (sample(port, "drdaemon_audit_verified_records"),
                              sample(port, "drdaemon_audit_verified_ok")) == (records, ok),
                     what=f"an audit check with {records} records, ok={ok}")

        # the key made for each tenant and a snapshot record of each source, in the log
        # and both regions
        run_audit_job(4, 1)
        for region in ("eu", "us"):
            assert sample(port, "drdaemon_audit_mirror_verified_ok", region=region) == 1
        checked = sample(port, "drdaemon_audit_last_verified_timestamp_seconds")
        assert checked is not None and time.time() - 60 < checked <= time.time()
        assert sample(port, "drdaemon_job_next_run_timestamp_seconds", job_name="audit")

        # An intruder on the host edits a line of the local log.
        log_file = setup.state / "audit" / "audit.jsonl"
        lines = audit_chain.split_lines(log_file.read_bytes())
        lines[0] = lines[0].replace(b'"time":"2', b'"time":"1', 1)
        log_file.write_bytes(b"".join(lines))

        run_audit_job(0, 0)  # record 0 is the first that fails
        for region in ("eu", "us"):  # each region's copy is the original: it differs now
            assert sample(port, "drdaemon_audit_mirror_verified_ok", region=region) == 0
        assert sample(port, "drdaemon_job_last_run_success", job_name="audit") == 1
    finally:
        assert daemon.stop()


def test_the_audit_job_with_a_region_down(tmp_path: Path, trees: list[Path],
                                          moto_region_factory: Callable[..., S3Region]) -> None:
    far = moto_region_factory("us", "us-east-1", "north-america")
    setup = make_setup(tmp_path, [local_region("eu", tmp_path / "r-eu", "europe"), far.toml()],
                       [directory_source("files-a", trees[0])])
    clock = [NOW]
    rt = open_runtime(config_mod.load(setup.config), clock=lambda: clock[0])
    daemon = Daemon(rt)
    [(name, check)] = [(n, fn) for n, _, fn in daemon._maintenance() if n == "audit"]
    daemon.maintenance_job(name, check)  # no log yet: the regions hold no chain of this host
    get = metrics.build_registry(daemon.metrics, rt.clock).get_sample_value
    assert get("drdaemon_audit_verified_ok") == 1 and get("drdaemon_audit_verified_records") == 0
    assert get("drdaemon_audit_mirror_verified_ok", {"region": "us"}) == 1

    assert daemon.snapshot_job(rt.config.sources[0]) is not None
    daemon.maintenance_job(name, check)
    clock[0] = NOW + timedelta(days=1)
    far.server.stop()
    daemon.maintenance_job(name, check)
    get = metrics.build_registry(daemon.metrics, rt.clock).get_sample_value
    # the tenant's key made, the snapshot committed
    assert get("drdaemon_audit_verified_ok") == 1 and get("drdaemon_audit_verified_records") == 2
    assert get("drdaemon_audit_last_verified_timestamp_seconds") == T + 86400
    assert get("drdaemon_audit_mirror_last_verified_timestamp_seconds", {"region": "eu"}) == (
        T + 86400)
    # The region that could not be read keeps its last result; its check time goes stale.
    assert get("drdaemon_audit_mirror_verified_ok", {"region": "us"}) == 1
    assert get("drdaemon_audit_mirror_last_verified_timestamp_seconds", {"region": "us"}) == T
    assert get("drdaemon_job_last_run_success", {"job_name": "audit"}) == 1
