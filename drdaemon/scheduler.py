"""The daemon: every source snapshotted on its cron, overdue ones at once, retried on failure.

APScheduler is only the timer. The decisions (which source is overdue, how
long to back off) are small pure functions; the Daemon class wires them to
the scheduler, the services and the signals.

Over 400 lines on purpose: nearly all of it is the one Daemon class, whose jobs
share its APScheduler, its lock and its runtime; the decisions it applies live
in pure modules already (cron, retry, lifecycle), so splitting the class would
only scatter its wiring.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
import zoneinfo
from collections.abc import Callable
from datetime import datetime, timedelta
from types import FrameType
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from . import (
    anchors,
    audit_mirror,
    catalog,
    cron,
    erasure,
    lifecycle,
    locks,
    metrics,
    metrics_feed,
    proof_log,
    slo,
    standby,
    state,
    uploads,
)
from .backup import BackupResult, snapshot
from .config import SourceConfig
from .errors import DrError
from .logs import setup_logging
from .retry import resume_at, retry_delay
from .runtime import Runtime
from .sources.tree_extract import interpreter_note

log = logging.getLogger("drdaemon")

WATCHDOG_INTERVAL = timedelta(minutes=15)
STALE_UPLOAD_AGE = timedelta(days=1)
# The erasure-deadline job: daily (and at start); lifecycle.ERASE_LEAD before a
# deadline, so one run a day meets it.
ERASURE_SCHEDULE = "15 0 * * *"
# What the job did with a due erasure (drdaemon_tenant_erasures_total{outcome}).
ERASURE_DONE, ERASURE_FAILED = "done", "failed"


def newest_consistency(rt: Runtime, listing: catalog.Listing | None = None
                       ) -> dict[str, datetime]:
    """Consistency time of each source's newest committed snapshot (any region).

    Lists every region, but reads only manifests the daemon has not
    authenticated before (the metrics refresh shares the cache); or takes
    `listing`, one of everything made just now (the start's refresh).
    """
    if listing is None:
        listing = catalog.list_snapshots(rt, cache=rt.manifest_cache)
    return {source: e.manifest.consistency_time
            for source, e in catalog.newest_by_source(listing.snapshots).items()
            if e.manifest is not None}


def overdue(sources: list[SourceConfig], newest: dict[str, datetime],
            rpo: Callable[[SourceConfig], timedelta], now: datetime) -> list[SourceConfig]:
    """Pure: sources with no snapshot within their RPO; they must not wait for cron."""
    return [s for s in sources
            if s.name not in newest or slo.over(slo.rpo_at(newest[s.name], now), rpo(s))]


def due_sources(rt: Runtime, now: datetime, listing: catalog.Listing | None = None
                ) -> list[SourceConfig]:
    """Scheduled sources (their tenant not offboarded) outside their tier's RPO now
    (from `listing` if given, see newest_consistency)."""
    sources = lifecycle.scheduled(rt.config.sources, lifecycle.states_by_tenant(rt))
    return overdue(sources, newest_consistency(rt, listing),
                   lambda s: rt.config.tiers[s.tier].rpo, now)


def _carry_out_erasure(rt: Runtime, tenant: str) -> str:
    """Erase `tenant`, whose erasure is due (erasure.erase, as `drctl tenant erase`);
    returns the outcome the metrics count. An incomplete erasure is an ERROR line and
    outcome "failed": the next run resumes it."""
    cert = erasure.erase(rt, tenant)
    if not cert.ok:
        log.error("erasure of tenant %s is not complete (certificate %s): %s", tenant,
                  cert.name, "; ".join(cert.errors) or "a key copy remains",
                  extra={"job": "erasure", "tenant": tenant})
        return ERASURE_FAILED
    log.info("tenant %s erased; certificate %s", tenant, cert.name,
             extra={"job": "erasure", "tenant": tenant})
    return ERASURE_DONE


def still_scheduled(rt: Runtime, source: SourceConfig) -> bool:
    """Whether `source` is still to be snapshotted (its tenant not offboarded); logs the
    skip. Shared by the daemon's snapshot job and the queue's (cluster/tasks.py)."""
    try:
        scheduled = lifecycle.source_scheduled(rt, source)
    except DrError as exc:  # an unreadable state file: better a snapshot too many
        log.error("cannot read the lifecycle of tenant %s, snapshotting %s: %s",
                  source.tenant, source.name, exc, extra={"job": "snapshot"})
        return True
    if not scheduled:
        log.info("snapshot of %s skipped: tenant %s is offboarded", source.name,
                 source.tenant, extra={"job": "snapshot", "source": source.name,
                                       "skipped": True})
    return scheduled


def attempt_snapshot(rt: Runtime, source: SourceConfig) -> BackupResult:
    """One snapshot attempt (backup.snapshot: it records the outcome in the state), logged
    as one line; never raises. Shared by the daemon's snapshot job and the queue's."""
    try:
        result = snapshot(rt, source)
    except Exception as exc:  # a bug must not kill the daemon (or the worker)
        log.exception("snapshot of %s crashed", source.name)
        result = BackupResult(source.name, error=f"internal error: {exc}")
    fields = {k: v for k, v in result.to_dict().items() if v not in (None, {}, [])}
    if result.ok:
        log.info("snapshot %s of %s%s", result.snapshot_id, source.name,
                 " (degraded)" if result.degraded else "", extra={"job": "snapshot", **fields})
    else:
        log.error("snapshot of %s failed: %s", source.name, result.error,
                  extra={"job": "snapshot", **fields})
    return result


class Daemon:
    """Schedules snapshots and maintenance jobs for one runtime."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        cfg = rt.config.daemon
        self.tz = zoneinfo.ZoneInfo(cfg.timezone)
        self.scheduler = BackgroundScheduler(
            timezone=self.tz,
            executors={"snapshots": ThreadPoolExecutor(cfg.max_concurrent_snapshots),
                       "default": ThreadPoolExecutor(2),
                       # the first look at storage must not queue behind maintenance
                       "startup": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600})
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        self._idle = threading.Condition(self._busy_lock)
        self.attempts: dict[str, int] = {}
        self.metrics = metrics.MetricsState.from_config(rt.config)
        self.standbys: dict[str, standby.StandbyStatus] = {}  # as last polled
        metrics.load_orphans(cfg.state_dir, self.metrics)
        self._metrics_server: metrics.WSGIServer | None = None
        self.exposition: metrics.Exposition | None = None  # what /metrics serves, once served
        # Set once the start's first look at storage (refresh, catch-up, retries) is done.
        self.first_look_done = threading.Event()
        # When this daemon took the cluster lock ([daemon] lock_dsn), if it has one.
        self.lock_taken_at: datetime | None = None

    # -- jobs ---------------------------------------------------------------

    def snapshot_job(self, source: SourceConfig) -> BackupResult | None:
        """Snapshot one source unless it is already running or its tenant was offboarded;
        log one line; never raises."""
        if not still_scheduled(self.rt, source):
            return None
        with self._busy_lock:
            if source.name in self._busy or self.rt.stopping.is_set():
                log.info("snapshot of %s skipped: %s", source.name, "already running"
                         if source.name in self._busy else "stopping",
                         extra={"job": "snapshot", "source": source.name, "skipped": True})
                return None
            self._busy.add(source.name)
        try:
            with self.metrics.job("snapshot", self.rt.clock):
                result = attempt_snapshot(self.rt, source)
        finally:
            with self._busy_lock:
                self._busy.discard(source.name)
                self._idle.notify_all()
        if result.ok:
            self.attempts.pop(source.name, None)
        else:
            self._schedule_retry(source)
        self.metrics.record_snapshot(metrics_feed.snapshot_attempt(result))
        if self.scheduler.running and not self.rt.stopping.is_set():
            self.refresh_metrics(source.name)  # that source only: one prefix per region
        return result

    def standby_job(self) -> list[standby.StandbyStatus]:
        """Poll every hot standby (standby.py) into the metrics; log a line for each new
        problem; never raises."""
        try:
            polled = standby.poll(self.rt.config, self.standbys, self.rt.clock())
        except Exception:  # a bug must not kill the job thread
            log.exception("standby watch crashed", extra={"job": "standby"})
            return []
        for s in polled:
            before = self.standbys.get(s.name)
            for problem in s.problems:
                if before is None or problem not in before.problems:
                    log.warning("%s", problem, extra={"job": "standby", "standby": s.name})
        self.standbys = {s.name: s for s in polled}
        self.metrics.record_standbys(metrics_feed.standby_seen(s) for s in polled)
        return polled

    def erasure_job(self) -> list[str]:
        """Carry out every erasure due now; held tenants wait. Returns the tenants tried;
        never raises."""
        with self.metrics.job("erasure", self.rt.clock):
            try:
                states = lifecycle.load_all(self.rt)
            except DrError as exc:
                log.error("cannot read the tenants' lifecycle: %s", exc, extra={"job": "erasure"})
                return []
            now = self.rt.clock()
            for s in states:
                if s.hold is not None and lifecycle.is_due(s, now):
                    log.warning("erasure of tenant %s is due but waits for a legal hold: %s",
                                s.tenant, s.hold.reason,
                                extra={"job": "erasure", "tenant": s.tenant})
            due = lifecycle.due_erasures(states, now)
            for tenant in due:
                try:
                    outcome = _carry_out_erasure(self.rt, tenant)
                except DrError as exc:
                    log.error("erasure of tenant %s failed: %s", tenant, exc,
                              extra={"job": "erasure", "tenant": tenant})
                    outcome = ERASURE_FAILED
                except Exception:
                    log.exception("erasure of tenant %s crashed", tenant,
                                  extra={"job": "erasure", "tenant": tenant})
                    outcome = ERASURE_FAILED
                self.metrics.record_erasure(tenant, outcome)
        if due and self.scheduler.running and not self.rt.stopping.is_set():
            self.refresh_metrics()
        return due

    def _schedule_retry(self, source: SourceConfig, when: datetime | None = None) -> None:
        """A retry of `source` after the backoff (or at `when`), unless cron comes first."""
        if self.rt.stopping.is_set():
            return
        attempt = self.attempts.get(source.name, 0)
        now = datetime.now(self.tz)
        if when is None:
            when = now + retry_delay(attempt, self.rt.config.daemon.retry_backoff)
        cron = self.scheduler.get_job(f"snapshot:{source.name}")
        # Retry until the next cron run would come first: then that run is the retry.
        if cron and cron.next_run_time and when >= cron.next_run_time:
            log.info("no retry of %s before its next run", source.name)
            return
        self.attempts[source.name] = attempt + 1
        self.run_soon(source, when, f"retry:{source.name}")
        delay = max((when - now).total_seconds(), 0.0)
        log.info("retrying %s in %ss (attempt %d)", source.name, int(delay),
                 attempt + 1, extra={"job": "snapshot", "source": source.name,
                                     "retry_in_seconds": delay})

    def resume_retries(self) -> list[str]:
        """Retry, after a restart, every source whose last attempt failed or never ended.

        A daily snapshot cut off by a restart (or a crash) would otherwise wait
        for tomorrow's cron, or for the RPO watchdog once the RPO is already
        breached. The backoff continues from the recorded attempts.
        """
        resumed = []
        base = self.rt.config.daemon.retry_backoff
        for src in self.rt.config.sources:
            outcome = state.read_outcome(self.rt.config.daemon.state_dir, src.name)
            when = resume_at(outcome, base, self.rt.clock())
            if when is None or self.scheduler.get_job(f"catchup:{src.name}"):
                continue  # an overdue source is caught up at once instead
            self.attempts[src.name] = max(outcome.failed_attempts - 1, 0)
            # The runtime's clock decided; APScheduler keeps wall time in the daemon's zone.
            wall = datetime.now(self.tz) + max(when - self.rt.clock(), timedelta(0))
            self._schedule_retry(src, wall)
            if self.scheduler.get_job(f"retry:{src.name}"):
                resumed.append(src.name)
        return resumed

    def run_soon(self, source: SourceConfig, when: datetime, job_id: str) -> None:
        """A one-off snapshot of `source` at `when`."""
        self.scheduler.add_job(self.snapshot_job, "date", run_date=when, args=(source,),
                               id=job_id, replace_existing=True, executor="snapshots",
                               name=f"snapshot {source.name} (one-off)")

    def catch_up(self, listing: catalog.Listing | None = None) -> list[str]:
        """Snapshot at once every source outside its RPO (at start and by the watchdog);
        `listing`: the start's, made by its first refresh just before."""
        try:
            due = due_sources(self.rt, self.rt.clock(), listing)
        except DrError as exc:
            log.warning("cannot tell which sources are overdue, snapshotting all: %s", exc)
            due = list(self.rt.config.sources)
        with self._busy_lock:
            due = [s for s in due if s.name not in self._busy]
        now = datetime.now(self.tz)
        for src in due:
            if not self.scheduler.get_job(f"retry:{src.name}"):
                self.run_soon(src, now, f"catchup:{src.name}")
        if due:
            log.info("catching up %d overdue source(s): %s", len(due),
                     ", ".join(s.name for s in due), extra={"job": "catchup"})
        return [s.name for s in due]

    def maintenance_job(self, name: str, fn: Callable[[], Any]) -> None:
        """Run prune/replicate/verify/audit/keys/drills; log one line with its outcome; never
        raises."""
        try:
            with self.metrics.job(name, self.rt.clock):
                report = fn()
            metrics_feed.record_report(self.metrics, report)
            if name == "prune":
                self._keep_orphan_gauges()
            ok = bool(getattr(report, "ok", True))
            log.log(logging.INFO if ok else logging.ERROR, "%s %s", name,
                    "ok" if ok else "found problems", extra={"job": name, "ok": ok,
                    "report": report.to_dict() if hasattr(report, "to_dict") else None})
        except DrError as exc:
            log.error("%s failed: %s", name, exc, extra={"job": name, "ok": False})
        except Exception:
            log.exception("%s crashed", name, extra={"job": name, "ok": False})
        # Prune, repair and drills change what every source holds; the audit check,
        # the anchor job and the keys check change no snapshot and record their own
        # metrics above.
        if not self.rt.stopping.is_set() and name not in ("audit", "anchor", "keys"):
            self.refresh_metrics()

    def _keep_orphan_gauges(self) -> None:
        try:
            metrics.save_orphans(self.rt.config.daemon.state_dir, self.metrics)
        except OSError as exc:
            log.warning("orphan gauges not saved: %s", exc, extra={"job": "prune"})

    def refresh_metrics(self, source: str | None = None) -> catalog.Listing | None:
        """Re-read storage (one source, or all) into the cache scrapes render, and return
        the listing it made (None if it failed); never raises."""
        try:
            listing = metrics_feed.refresh(self.rt, self.metrics, source)
            self.metrics.set_schedule((j.id, j.next_run_time) for j in self.scheduler.get_jobs())
            if source is None and self.exposition is not None:
                # Rendered here once, not by the next scrape; after a snapshot's own
                # refresh the next scrape renders (one render per scrape at most, not
                # one per snapshot on a busy night).
                self.exposition.prime()
            return listing
        except Exception:  # stale metrics are better than a dead job thread
            log.exception("cannot refresh metrics", extra={"job": "metrics"})
            return None

    def _serve_metrics(self, standby: bool = False) -> None:
        address = self.rt.config.daemon.metrics_address
        if standby:
            served: Any = metrics.standby_registry()
        else:
            # The state rendered once per change of it, not once per scrape.
            self.exposition = metrics.Exposition(self.metrics, self.rt.clock,
                                                 metrics.live_registry())
            served = metrics.wsgi_app(self.exposition,
                                      metrics.build_registry(self.metrics, self.rt.clock))
        try:
            self._metrics_server = metrics.serve(address, served)
        except OSError as exc:
            # Backups matter more than their metrics: carry on, loudly; the
            # DrdaemonDown/DrdaemonAbsent alerts tell on-call nobody can scrape us.
            log.error("cannot serve metrics on %s: %s", address, exc, extra={"job": "metrics"})
            return
        log.info("serving metrics on http://%s/metrics", address, extra={"job": "metrics"})

    # -- lifecycle ------------------------------------------------------------

    def clean_stale_uploads(self) -> None:
        """Abort uploads a crash left behind in every region.

        Uploads of snapshots whose process died (an in-flight marker naming a
        dead pid) go at once; any other incomplete upload only once it is a day
        old, because it may belong to a live process on another host, unless this
        daemon holds the cluster lock: then every upload begun before it took the
        lock (but those of live processes here) was its predecessor's, and goes.
        """
        done = uploads.abort_stale(self.rt, self.rt.clock() - STALE_UPLOAD_AGE,
                                   self.lock_taken_at)
        for region, n in done.by_region.items():
            if n:
                log.info("aborted %d stale incomplete upload(s) in %s", n, region,
                         extra={"job": "cleanup", "region": region, "aborted": n})

    def stand_by(self, cluster: locks.ClusterLock, stop: threading.Event) -> bool:
        """Wait, serving `drdaemon_active 0`, until this daemon takes the cluster lock
        (True) or `stop` is set (False)."""
        self._serve_metrics(standby=True)

        def waiting(holder: str) -> None:
            log.info("standby: the cluster lock %r is held by %s; trying it every %ds",
                     cluster.name, holder, int(cluster.interval.total_seconds()),
                     extra={"job": "lock", "active": False})

        try:
            if not cluster.wait_until_taken(stop, waiting):
                return False
        finally:
            if self._metrics_server is not None:
                metrics.shutdown(self._metrics_server)
                self._metrics_server = None
        self.lock_taken_at = self.rt.clock()
        self.rt.fence = cluster.fence
        log.info("active: took the cluster lock %r", cluster.name,
                 extra={"job": "lock", "active": True})
        return True

    def watch_lock(self, cluster: locks.ClusterLock, stop: threading.Event) -> None:
        """Check every takeover interval that the cluster lock is still held; on loss
        stop taking jobs, abort the streams in flight (their commits are fenced too)
        and set `stop`. Runs in its own thread until `stop`."""
        while not stop.wait(cluster.interval.total_seconds()):
            if not cluster.still_held():
                log.critical("lost the cluster lock %r (connection lost or ended): no new "
                             "job starts, uploads in flight are aborted before their "
                             "manifests; exiting, to come back as a standby", cluster.name,
                             extra={"job": "lock", "active": False})
                self.rt.stopping.set()
                stop.set()
                return

    def schedule_snapshots(self) -> None:
        """Each source's snapshot on its cron (cluster/daemon.py: one tick defers them)."""
        for src in self.rt.config.sources:
            self.scheduler.add_job(self.snapshot_job, cron.trigger(
                src.schedule, self.tz, self.rt.config.daemon.jitter),
                args=(src,), id=f"snapshot:{src.name}", name=f"snapshot {src.name}",
                executor="snapshots")

    def start(self) -> None:
        """Schedule every job and start the timer (returns at once)."""
        cfg = self.rt.config.daemon
        self.clean_stale_uploads()
        self.schedule_snapshots()
        for name, expr, fn in self._maintenance():
            # The audit check also runs at start: its metrics are not absent for a
            # day after a restart, and a log edited while the daemon was down shows.
            first = {"next_run_time": datetime.now(self.tz)} if name == "audit" else {}
            self.scheduler.add_job(self.maintenance_job, cron.trigger(expr, self.tz, cfg.jitter),
                                   args=(name, fn), id=name, name=name, **first)
        anchoring = self.anchoring()
        if anchoring is not None:
            every, anchor = anchoring
            self.scheduler.add_job(self.maintenance_job, "interval",
                                   seconds=every.total_seconds(), args=("anchor", anchor),
                                   id="anchor", name="audit anchor",
                                   next_run_time=datetime.now(self.tz))
        self.scheduler.add_job(self.erasure_job, cron.trigger(ERASURE_SCHEDULE, self.tz,
                                                              cfg.jitter),
                               id="erasure", name="erasure deadlines",
                               next_run_time=datetime.now(self.tz))
        # The keys metrics at start too, from what the logs say: the daemon's own proof
        # waits for prove_schedule (a restart adds no record to the audit log).
        self.scheduler.add_job(self.maintenance_job, "date", run_date=datetime.now(self.tz),
                               args=("keys", lambda: proof_log.check(self.rt, prove_own=False)),
                               id="keys:start", name="keys (at start)")
        self.scheduler.add_job(self.catch_up, "interval",
                               seconds=WATCHDOG_INTERVAL.total_seconds(), id="watchdog",
                               name="rpo watchdog")
        self.scheduler.add_job(self.refresh_metrics, "interval",
                               seconds=metrics_feed.REFRESH_INTERVAL.total_seconds(), id="metrics",
                               name="metrics refresh")
        # Storage is listed once at start: the first full refresh fills the
        # manifest cache, then the catch-up judges RPO from it without a GET.
        self.scheduler.add_job(self.first_look, "date", run_date=datetime.now(self.tz),
                               id="startup", name="first refresh and catch-up",
                               executor="startup")
        if self.rt.config.standbys:
            self.scheduler.add_job(self.standby_job, "interval",
                                   seconds=standby.POLL_INTERVAL.total_seconds(), id="standby",
                                   name="standby watch", next_run_time=datetime.now(self.tz))
        self._serve_metrics()
        self.scheduler.start()

    def first_look(self) -> None:
        """The start's one read of storage: the metrics, then the catch-up from them, then
        the retries of attempts a previous daemon left unfinished (catch-up first: a
        source overdue now is snapshotted at once, not after a backoff). The catch-up
        judges from the refresh's own listing: storage is listed once."""
        try:
            self.catch_up(self.refresh_metrics())
            self.resume_retries()
        finally:
            self.first_look_done.set()

    def _maintenance(self) -> list[tuple[str, str, Callable[[], Any]]]:
        from .drills.run import drill_jobs
        from .prune import run_prune
        from .replicate import run_replicate
        from .verify import run_verify

        cfg = self.rt.config.daemon
        rt = self.rt
        return [("prune", cfg.prune_schedule, lambda: run_prune(rt)),
                ("replicate", cfg.replicate_schedule, lambda: run_replicate(rt, repair=True)),
                ("verify", cfg.verify_schedule, lambda: run_verify(rt)),
                ("audit", cfg.audit_schedule, lambda: audit_mirror.verify_everywhere(rt)),
                # Prove the identity the daemon holds; read every recipient's last proof,
                # also those mirrored from other hosts (the offline escrow machine).
                ("keys", cfg.prove_schedule, lambda: proof_log.check(rt)),
                # Data no configured source owns any more (inventory.py): one listing
                # of sources/ per region, as often as replication checks the copies.
                ("tenants", cfg.replicate_schedule, self.take_inventory),
                *drill_jobs(rt)]  # one per tier: [drills] schedule or [drills.tiers.NAME]

    def anchoring(self) -> tuple[timedelta, Callable[[], Any]] | None:
        """How often, and the job that anchors the audit log's head (none configured: None)."""
        cfg = self.rt.config.audit
        if not cfg.anchoring:
            return None
        rt = self.rt
        return cfg.anchor_every, lambda: anchors.anchor(rt)

    def take_inventory(self) -> Any:
        """List what every region holds by source; hand the unmanaged ones to the metrics."""
        from .inventory import take

        inv = take(self.rt)
        metrics_feed.record_inventory(self.metrics, inv, self.rt.config.tenants)
        return inv

    def stop(self) -> bool:
        """Start no new job, abort streams in flight, wait up to the grace period.

        Returns True if every running job ended within the grace period.
        """
        self.rt.stopping.set()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        if self._metrics_server is not None:
            metrics.shutdown(self._metrics_server)
            self._metrics_server = None
        grace = self.rt.config.daemon.shutdown_grace.total_seconds()
        with self._busy_lock:
            return self._idle.wait_for(lambda: not self._busy, timeout=grace)


def run_daemon(rt: Runtime, *, once: bool = False) -> None:
    """Run until SIGTERM/SIGINT (or, with once, take the overdue snapshots and return)."""
    setup_logging()
    cfg = rt.config.daemon
    with contextlib.ExitStack() as held:
        held.enter_context(locks.hold(cfg.state_dir, "daemon"))
        if cfg.lock_dsn and once:  # a one-off run never waits: it is refused
            held.enter_context(locks.hold_in_postgres(cfg.lock_dsn, cfg.lock_name))
        if once:
            daemon = Daemon(rt)
            daemon.clean_stale_uploads()
            results = [daemon.snapshot_job(s) for s in due_sources(rt, rt.clock())]
            if not all(r is not None and r.ok for r in results):
                raise DrError("some snapshots failed (see the log above)")
            return
        cluster = None
        if cfg.lock_dsn:
            cluster = locks.ClusterLock(cfg.lock_dsn, cfg.lock_name, cfg.takeover_interval)
            held.callback(cluster.close)
        _run_forever(rt, cluster)


def stop_on_signals() -> threading.Event:
    """An event SIGTERM and SIGINT set (each logged): what a long-running command waits on."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def _run_forever(rt: Runtime, cluster: locks.ClusterLock | None = None,
                 daemon: Daemon | None = None) -> None:
    """Serve until a signal (or the loss of `cluster`); `daemon`: the cluster engine's
    scheduler (cluster/daemon.py), else the single-host Daemon."""
    daemon = daemon or Daemon(rt)
    stop = stop_on_signals()
    if cluster is not None:
        if not daemon.stand_by(cluster, stop):
            log.info("drdaemon stopped (standby)")
            return
        threading.Thread(target=daemon.watch_lock, args=(cluster, stop), name="lock-watch",
                         daemon=True).start()
    daemon.start()
    log.info("drdaemon started: %d source(s), %d region(s)", len(rt.config.sources),
             len(rt.config.regions), extra={"pid": os.getpid()})
    if (note := interpreter_note()) is not None:
        log.warning("%s", note)
    stop.wait()
    lost = cluster is not None and cluster.lost.is_set()
    if daemon.stop():
        log.info("drdaemon stopped")
    else:
        # Streams were told to abort; anything still busy is cut off here. Its
        # upload stays incomplete and invisible, and is cleaned at next start.
        log.warning("jobs still running after the grace period; exiting anyway")
        logging.shutdown()
        os._exit(1 if lost else 0)
    if lost:
        # Non-zero, so that the service manager restarts it: it comes back a standby.
        raise DrError("lost the cluster lock; stopped (restart to stand by again)")


# How long a stopped process waits for threads no job tracks (a maintenance job the
# scheduler's shutdown did not wait for, a queue job past its grace) before it ends.
STRAY_THREAD_WAIT = 5.0


def end_stray_threads(wait: float = STRAY_THREAD_WAIT) -> None:
    """After a stop: give the threads still running `wait` seconds; if any is left, log
    where each one is and end the process now (exit 0: the stop was asked for). The
    interpreter would otherwise join them at exit, and a thread stuck in a call would
    keep a stopped daemon alive until the service manager kills it, with no word why."""
    me = threading.current_thread()
    deadline = time.monotonic() + wait

    def stray() -> list[threading.Thread]:
        return [t for t in threading.enumerate()
                if t is not me and not t.daemon and t.is_alive()]

    for t in stray():
        t.join(max(0.0, deadline - time.monotonic()))
    left = stray()
    if not left:
        return
    frames = sys._current_frames()
    for t in left:
        frame = frames.get(t.ident) if t.ident is not None else None
        where = "".join(traceback.format_stack(frame)[-6:]) if frame is not None else "?"
        log.warning("thread %s still running %.0fs after the stop; exiting anyway; it was "
                    "at:\n%s", t.name, wait, where.rstrip())
    logging.shutdown()
    os._exit(0)
