"""The daemon's schedule: each source's snapshot on its cron, overdue ones at once."""

from __future__ import annotations

import logging
import signal
import zoneinfo
from datetime import datetime
from types import FrameType

from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger

from . import catalog
from .backup import BackupResult, snapshot
from .config import SourceConfig
from .errors import DrError
from .logs import setup_logging
from .runtime import Runtime

log = logging.getLogger("drdaemon")


def newest_consistency(rt: Runtime) -> dict[str, datetime]:
    """Consistency time of each source's newest committed snapshot (any region)."""
    listing = catalog.list_snapshots(rt)
    newest: dict[str, datetime] = {}
    for e in listing.snapshots:
        if e.manifest is not None:
            t = e.manifest.consistency_time
            newest[e.source] = max(t, newest.get(e.source, t))
    return newest


def due_sources(rt: Runtime, now: datetime) -> list[SourceConfig]:
    """Sources with no snapshot newer than their tier's RPO: they must not wait for cron."""
    newest = newest_consistency(rt)
    return [s for s in rt.config.sources
            if s.name not in newest or now - newest[s.name] >= rt.config.tiers[s.tier].rpo]


def snapshot_job(rt: Runtime, source: SourceConfig) -> BackupResult:
    """Run one snapshot and log its outcome as one line; never raises."""
    result = snapshot(rt, source)
    fields = {k: v for k, v in result.to_dict().items() if v not in (None, {}, [])}
    if result.ok:
        log.info("snapshot %s of %s%s", result.snapshot_id, source.name,
                 " (degraded)" if result.degraded else "", extra={"job": "snapshot", **fields})
    else:
        log.error("snapshot of %s failed: %s", source.name, result.error,
                  extra={"job": "snapshot", **fields})
    return result


def run_daemon(rt: Runtime, *, once: bool = False) -> None:
    """Run forever (or, with once, take the overdue snapshots and return)."""
    setup_logging()
    tz = zoneinfo.ZoneInfo(rt.config.daemon.timezone)
    try:
        due = due_sources(rt, rt.clock())
    except DrError as exc:
        log.warning("cannot tell which sources are overdue, snapshotting all: %s", exc)
        due = list(rt.config.sources)
    if once:
        results = [snapshot_job(rt, s) for s in due]
        if not all(r.ok for r in results):
            raise DrError("some snapshots failed (see the log above)")
        return
    scheduler = BlockingScheduler(timezone=tz, job_defaults={
        "coalesce": True, "max_instances": 1, "misfire_grace_time": 3600})
    for src in rt.config.sources:
        kwargs = {"next_run_time": datetime.now(tz)} if src in due else {}
        scheduler.add_job(snapshot_job, CronTrigger.from_crontab(src.schedule, timezone=tz),
                          args=(rt, src), id=f"snapshot:{src.name}", name=f"snapshot {src.name}",
                          **kwargs)

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        scheduler.shutdown(wait=False)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("drdaemon started: %d source(s), %d region(s), %d overdue", len(rt.config.sources),
             len(rt.config.regions), len(due))
    scheduler.start()
    log.info("drdaemon stopped")
