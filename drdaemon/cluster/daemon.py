"""`drdaemon run` and `drdaemon worker` with `[cluster] dsn`: the scheduler and the workers.

The scheduler is the single-host Daemon with its snapshot timer replaced: instead of a
cron job per source running in process, one tick a minute defers, through the queue, the
sources whose cron fired since the last tick (the catch-up and the RPO watchdog defer the
overdue ones the same way), and drills and verify go through the queue too. Only the
holder of the cluster lock schedules; every `drdaemon run` and `drdaemon worker` works.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from .. import audit_mirror, cron, locks, metrics_feed, uploads
from ..config import SourceConfig
from ..errors import DrError, UsageError
from ..logs import setup_logging
from ..runtime import Runtime
from ..scheduler import STALE_UPLOAD_AGE, Daemon, _run_forever, stop_on_signals
from . import plan, tasks
from .queue import Queue

log = logging.getLogger("drdaemon")

TICK = timedelta(minutes=1)
AUDIT_MIRROR_EVERY = 60.0  # seconds


class ClusterDaemon(Daemon):
    """The active scheduler of a cluster: defers jobs instead of running them, retries
    the jobs of dead workers, exports the queue's state; works too (its own worker)."""

    def __init__(self, rt: Runtime, queue: Queue) -> None:
        super().__init__(rt)
        self.queue = queue
        self.last_tick = datetime.now(self.tz)

    def schedule_snapshots(self) -> None:
        cluster = self.queue.cluster
        self.scheduler.add_job(self.tick, "interval", seconds=TICK.total_seconds(),
                               id="queue:tick", name="defer the sources due")
        self.scheduler.add_job(self.retry_stalled, "interval",
                               seconds=cluster.heartbeat.total_seconds(), id="queue:stalled",
                               name="retry the jobs of dead workers")
        # The cluster's one audit chain (in the lock database) to the regions: here,
        # once a minute, rather than a PUT per region for every record of every job.
        self.scheduler.add_job(self.mirror_audit, "interval", seconds=AUDIT_MIRROR_EVERY,
                               id="queue:audit-mirror", name="mirror the audit chain")
        # The queue's counts as often as workers say they are alive (one small query).
        self.scheduler.add_job(self.count_queue, "interval",
                               seconds=cluster.heartbeat.total_seconds(), id="queue:count",
                               name="queue metrics", next_run_time=datetime.now(self.tz))

    def refresh_metrics(self, source: str | None = None) -> None:
        super().refresh_metrics(source)
        # No cron job per source here: each source's next run is its cron's next fire
        # (the tick defers it within a minute of that).
        try:
            now = datetime.now(self.tz)
            fires = [(f"snapshot:{s.name}",
                      cron.trigger(s.schedule, self.tz).get_next_fire_time(None, now))
                     for s in self.rt.config.sources]
            self.metrics.set_schedule([*((j.id, j.next_run_time)
                                         for j in self.scheduler.get_jobs()), *fires])
        except Exception:  # stale metrics are better than a dead job thread
            log.exception("cannot refresh the schedule's metrics", extra={"job": "metrics"})

    def tick(self) -> list[str]:
        """Defer every source whose cron fired since the last tick; never raises."""
        now = datetime.now(self.tz)
        since, self.last_tick = self.last_tick, now
        names = plan.fired({s.name: s.schedule for s in self.rt.config.sources}, self.tz,
                           since, now)
        return self.defer_snapshots([self.rt.config.source(n) for n in names], "tick")

    def defer_snapshots(self, sources: list[SourceConfig], why: str) -> list[str]:
        """Queue a snapshot job for each source not already waiting; returns the queued."""
        queued: list[str] = []
        waiting: list[str] = []
        for src in sources:
            if self.rt.stopping.is_set():
                break
            try:
                added = self.queue.defer(plan.snapshot_job(self.queue.name, src.name))
            except Exception as exc:  # the next tick or the watchdog tries again
                log.error("cannot queue the snapshot of %s: %s", src.name, exc,
                          extra={"job": "queue", "source": src.name})
                continue
            (queued if added else waiting).append(src.name)
        if queued or waiting:
            log.info("%s: queued %d snapshot(s)%s", why, len(queued),
                     f", {len(waiting)} already waiting" if waiting else "",
                     extra={"job": "queue", "queued": queued, "waiting": waiting})
        return queued

    def run_soon(self, source: SourceConfig, when: datetime, job_id: str) -> None:
        # The catch-up's (and the watchdog's) "at once": through the queue. Never a job
        # for later: one waiting for a future time blocks its lock (plan.py).
        self.defer_snapshots([source], job_id.partition(":")[0])

    def resume_retries(self) -> list[str]:
        # A failed snapshot's retry is a job in the queue already (tasks.SnapshotRetry):
        # it outlives this scheduler.
        return []

    def maintenance_job(self, name: str, fn: Callable[[], Any]) -> None:
        spec = plan.maintenance_job(self.queue.name, name)
        if spec is None:
            super().maintenance_job(name, fn)
            return
        try:
            added = self.queue.defer(spec)
        except Exception as exc:
            log.error("cannot queue %s: %s", name, exc, extra={"job": name, "ok": False})
            return
        log.info("%s %s", name, "queued" if added else "already waiting in the queue",
                 extra={"job": name, "queued": added})

    def retry_stalled(self) -> list[str]:
        """Put the jobs of dead workers back in the queue; never raises."""
        try:
            retried = self.queue.retry_stalled()
        except Exception as exc:
            log.error("cannot look for the jobs of dead workers: %s", exc,
                      extra={"job": "queue"})
            return []
        for job in retried:
            log.warning("retrying %s: its worker stopped sending heartbeats", job,
                        extra={"job": "queue", "retried": job})
        return retried

    def mirror_audit(self) -> None:
        """Copy what the cluster's chain gained to every region; never raises (best
        effort, as every mirror: the records are durable in the lock database)."""
        try:
            audit_mirror.mirror(self.rt)
        except Exception as exc:
            log.error("cannot mirror the audit chain: %s", exc, extra={"job": "audit"})

    def count_queue(self) -> None:
        """Read the queue's counts into the metrics; never raises."""
        try:
            counts, workers = self.queue.counts()
        except Exception as exc:
            log.error("cannot read the job queue: %s", exc, extra={"job": "queue"})
            return
        self.metrics.record_queue(metrics_feed.queue_read(
            counts, workers, self.queue.cluster, self.rt.clock()))

    def stop(self) -> bool:
        ended = super().stop()
        self.queue.stop_worker(self.rt.config.daemon.shutdown_grace.total_seconds())
        return ended


def _work(rt: Runtime, queue: Queue, role: str) -> None:
    queue.register(tasks.task_functions(rt), tasks.retries(rt))
    # A snapshot commits only while this worker is alive in the queue's eyes (the
    # scheduler replaces this with its cluster lock's check once it takes the lock).
    rt.fence = queue.fence
    queue.start_worker(f"{role} {socket.gethostname()} pid {os.getpid()}",
                       rt.config.daemon.shutdown_grace)


def _open_queue(rt: Runtime, held: contextlib.ExitStack, role: str) -> Queue:
    """This host's state-folder lock for `role`, then the queue, open (closed by `held`);
    the uploads this host's dead processes left are aborted."""
    setup_logging()
    rt.mirror_each_record = False  # the active scheduler mirrors (mirror_audit)
    # procrastinate logs every job start and end at INFO; drdaemon logs its own line.
    logging.getLogger("procrastinate").setLevel(logging.WARNING)
    held.enter_context(locks.hold(rt.config.daemon.state_dir, role))
    queue = Queue(rt.config)
    held.callback(queue.close)
    queue.open()
    _clean_own_uploads(rt)
    return queue


def run_scheduler(rt: Runtime) -> None:
    """`drdaemon run` with [cluster]: work at once; schedule while holding the lock."""
    cfg = rt.config.daemon
    assert cfg.lock_dsn is not None  # [cluster] dsn sets it (config.py)
    with contextlib.ExitStack() as held:
        queue = _open_queue(rt, held, "daemon")
        if queue.cluster.scheduler_works:
            _work(rt, queue, "drdaemon")
        cluster = locks.ClusterLock(cfg.lock_dsn, cfg.lock_name, cfg.takeover_interval)
        held.callback(cluster.close)
        try:
            _run_forever(rt, cluster, ClusterDaemon(rt, queue))
        finally:
            rt.stopping.set()
            queue.stop_worker(cfg.shutdown_grace.total_seconds())


def run_worker(rt: Runtime) -> None:
    """`drdaemon worker`: take jobs from the cluster's queue until SIGTERM/SIGINT."""
    if rt.config.cluster is None:
        raise UsageError(f"{rt.config.path}: drdaemon worker needs a [cluster] table "
                         "(its dsn names the job queue's database)")
    cfg = rt.config.daemon
    stop = stop_on_signals()
    with contextlib.ExitStack() as held:
        queue = _open_queue(rt, held, "worker")
        _work(rt, queue, "worker")
        while not stop.wait(queue.cluster.heartbeat.total_seconds()):
            failed = queue.worker_failed()
            if failed is not None:
                raise DrError(f"the queue's worker stopped: {failed}")
            if not _still_alive(queue):
                # Frozen or cut off past stalled_after: its jobs went to others and its
                # commits are fenced; the service manager restarts it as a new worker.
                rt.stopping.set()
                queue.stop_worker(cfg.shutdown_grace.total_seconds())
                raise DrError("this worker missed its heartbeats for [cluster] "
                              "stalled_after and was declared dead; stopped (restart it)")
        rt.stopping.set()  # streams in flight abort before their manifests
        queue.stop_worker(cfg.shutdown_grace.total_seconds())
    log.info("drdaemon worker stopped")


def _still_alive(queue: Queue) -> bool:
    """False only when the queue says this worker is dead; a failed check is not that
    (the fence refuses commits meanwhile)."""
    try:
        return queue.alive()
    except Exception as exc:
        log.warning("cannot check this worker in the job queue: %s", exc,
                    extra={"job": "queue"})
        return True


def _clean_own_uploads(rt: Runtime) -> None:
    """Abort the uploads this host's dead processes left (their markers say so), and any
    a day old; a job retried from a dead worker on another host leaves its upload to that
    rule (no lock says whose it was)."""
    done = uploads.abort_stale(rt, rt.clock() - STALE_UPLOAD_AGE, None)
    for region, n in done.by_region.items():
        if n:
            log.info("aborted %d stale incomplete upload(s) in %s", n, region,
                     extra={"job": "cleanup", "region": region, "aborted": n})
