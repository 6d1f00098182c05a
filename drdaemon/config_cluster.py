"""Parsing `[cluster]`: the PostgreSQL job queue several hosts take work from (cluster/).

Without the table nothing changes: `drdaemon run` is scheduler and worker in one process
with no database. With `dsn`, `drdaemon run` is the one active scheduler (and a worker too)
and `drdaemon worker` only works; see docs/architecture.md "Engines".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .config_table import Table
from .units import format_duration, parse_duration

MAX_CONCURRENT = 64


@dataclass(frozen=True)
class ClusterConfig:
    """`[cluster]`: the queue's database and each worker's bounds."""

    dsn: str
    # Snapshot (and drill, verify) jobs one worker runs at once.
    max_concurrent_snapshots: int = 2
    # How often a worker says it is alive; a worker silent for `stalled_after` is dead:
    # the scheduler puts its jobs back in the queue (procrastinate finds them, but does
    # not retry them by itself).
    heartbeat: timedelta = timedelta(seconds=10)
    stalled_after: timedelta = timedelta(minutes=1)
    # A job waiting longer than this alerts (DrdaemonQueueBacklog).
    max_queue_wait: timedelta = timedelta(hours=1)
    # Times a failed snapshot job is tried in all ([daemon] retry_backoff between tries).
    max_attempts: int = 6
    # Whether `drdaemon run` works on jobs too, or only schedules (a small scheduler host).
    scheduler_works: bool = True


def parse_cluster(t: Table, dsn_check: Callable[[Any], str]) -> ClusterConfig:
    """The `[cluster]` table (`dsn_check`: config.py's DSN check, no password)."""
    d = ClusterConfig("")
    dsn = t.convert("dsn", dsn_check, what="a libpq DSN without a password (use PGPASSFILE "
                                           "or a service file)", echo=False)
    concurrent = t.take("max_concurrent_snapshots", int, d.max_concurrent_snapshots)
    if not 1 <= concurrent <= MAX_CONCURRENT:
        t.parser.fail(t.key("max_concurrent_snapshots"),
                      f"an integer from 1 to {MAX_CONCURRENT}", concurrent)
    what = "a duration like 10s, 1m or 1h"
    heartbeat = t.convert("heartbeat", parse_duration, d.heartbeat, what=what)
    if not timedelta(seconds=1) <= heartbeat <= timedelta(minutes=5):
        t.parser.fail(t.key("heartbeat"), "a duration from 1s to 5m", format_duration(heartbeat))
    stalled = t.convert("stalled_after", parse_duration, d.stalled_after, what=what)
    if not 2 * heartbeat < stalled <= timedelta(hours=1):
        t.parser.fail(t.key("stalled_after"), "a duration above two heartbeats and at most 1h",
                      format_duration(stalled))
    wait = t.convert("max_queue_wait", parse_duration, d.max_queue_wait, what=what)
    if wait < timedelta(minutes=1):
        t.parser.fail(t.key("max_queue_wait"), "at least 1m", format_duration(wait))
    attempts = t.take("max_attempts", int, d.max_attempts)
    if not 1 <= attempts <= 20:
        t.parser.fail(t.key("max_attempts"), "an integer from 1 to 20", attempts)
    works = t.take("scheduler_works", bool, d.scheduler_works)
    t.done()
    return ClusterConfig(dsn, concurrent, heartbeat, stalled, wait, attempts, works)
