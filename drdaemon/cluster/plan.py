"""Pure decisions of the cluster engine: what a scheduler tick defers, and under which names.

Every queue, lock and queueing lock starts with the cluster's name ([daemon] lock_name),
so several clusters may share one database. A snapshot job holds the source's lock (one
source never runs twice at once) and a queueing lock (a tick never queues a source that
is already waiting). Nothing here is deferred into the future: procrastinate lets a
waiting job with a future `scheduled_at` block every job sharing its lock (issue #1599),
so the scheduler defers a job only when it is due.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo

from .. import cron

SNAPSHOT, DRILL, VERIFY = "snapshot", "drill", "verify"
KINDS = (SNAPSHOT, DRILL, VERIFY)
# The maintenance jobs that go through the queue, by the daemon's job name; the others
# (prune, replicate with repair, erasure, audit, anchor, keys, tenants) delete or
# check the evidence, and stay with the one active scheduler, fenced by its lock.
QUEUED_MAINTENANCE = (VERIFY, DRILL)


def task_name(kind: str) -> str:
    """The procrastinate task that runs jobs of `kind`."""
    return f"drdaemon.{kind}"


def queue_name(cluster: str, kind: str) -> str:
    return f"{cluster}:{kind}"


def queues(cluster: str) -> list[str]:
    """Every queue of the cluster: what a worker listens to."""
    return [queue_name(cluster, k) for k in KINDS]


def kind_of(queue: str, cluster: str) -> str | None:
    """The kind of a queue of `cluster` (None: another cluster's queue)."""
    prefix = f"{cluster}:"
    kind = queue.removeprefix(prefix)
    return kind if queue.startswith(prefix) and kind in KINDS else None


@dataclass(frozen=True)
class JobSpec:
    """One job to defer: its task, queue, locks and arguments."""

    kind: str
    queue: str
    lock: str
    queueing_lock: str
    args: dict[str, str] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return task_name(self.kind)


def snapshot_job(cluster: str, source: str) -> JobSpec:
    """A snapshot of `source`: one at a time per source, one waiting at most."""
    return JobSpec(SNAPSHOT, queue_name(cluster, SNAPSHOT), f"{cluster}:source:{source}",
                   f"{cluster}:snapshot:{source}", {"source": source})


def maintenance_job(cluster: str, name: str) -> JobSpec | None:
    """The queue's job for the daemon's maintenance job `name` ("verify", "drill:TIER"),
    or None for a job that stays in the scheduler's process."""
    kind, _, arg = name.partition(":")
    if kind not in QUEUED_MAINTENANCE:
        return None
    lock = f"{cluster}:{name}"
    return JobSpec(kind, queue_name(cluster, kind), lock, lock, {"tier": arg} if arg else {})


def fired(schedules: Mapping[str, str], tz: tzinfo, since: datetime,
          now: datetime) -> list[str]:
    """Pure: the names whose cron expression fired in (since, now], in the given order:
    what one scheduler tick defers. A tick that came late still sees every fire."""
    after = since + timedelta(microseconds=1)  # a fire at `since` was the last tick's
    out = []
    for name, expr in schedules.items():
        nxt = cron.trigger(expr, tz).get_next_fire_time(None, after)
        if nxt is not None and nxt <= now:
            out.append(name)
    return out


@dataclass(frozen=True)
class KindCount:
    """The queue's jobs of one kind: waiting (runnable now), scheduled (a retry later),
    running, failed in the last day; and how long the oldest waiting one has waited."""

    kind: str
    waiting: int = 0
    scheduled: int = 0
    running: int = 0
    failed: int = 0
    oldest_wait: float = 0.0


@dataclass(frozen=True)
class QueueRow:
    """One row of the queue's count: jobs of one queue in one state."""

    queue: str
    state: str  # waiting, scheduled, running or failed
    jobs: int
    oldest_wait: float = 0.0


def count_by_kind(rows: Iterable[QueueRow], cluster: str) -> list[KindCount]:
    """Pure: the counts of every kind (zeros included), from the queue's rows."""
    by: dict[str, dict[str, float]] = {k: {} for k in KINDS}
    for r in rows:
        kind = kind_of(r.queue, cluster)
        if kind is None:
            continue
        seen = by[kind]
        seen[r.state] = seen.get(r.state, 0) + r.jobs
        if r.state == "waiting":
            seen["oldest_wait"] = max(seen.get("oldest_wait", 0.0), r.oldest_wait)
    return [KindCount(k, int(v.get("waiting", 0)), int(v.get("scheduled", 0)),
                      int(v.get("running", 0)), int(v.get("failed", 0)),
                      float(v.get("oldest_wait", 0.0))) for k, v in by.items()]


def due_names(sources: Sequence[str], due: Iterable[str]) -> list[str]:
    """Pure: `due` in the configured order, once each."""
    wanted = set(due)
    return [s for s in sources if s in wanted]
