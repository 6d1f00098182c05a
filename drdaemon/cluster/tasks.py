"""The job functions a worker runs: the same services, and the same shared code, the
single-host daemon runs (scheduler.still_scheduled, scheduler.attempt_snapshot, which calls
backup.snapshot and records the outcome; retry.retry_delay for the backoff).

They are plain (blocking) functions: procrastinate runs them in threads. A job that fails
raises, so procrastinate records it failed, or retries it (snapshots only) after the
daemon's backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from procrastinate import BaseRetryStrategy, RetryDecision
from procrastinate.jobs import Job

from ..errors import ConfigError
from ..retry import retry_delay
from ..runtime import Runtime
from ..scheduler import attempt_snapshot, still_scheduled
from . import plan

log = logging.getLogger("drdaemon")


class JobFailed(Exception):
    """A job that did not do its work; `at_once`: retry without a backoff (its worker
    was stopped, another may take it now)."""

    def __init__(self, reason: str, *, at_once: bool = False) -> None:
        super().__init__(reason)
        self.at_once = at_once


class SnapshotRetry(BaseRetryStrategy):
    """The daemon's backoff ([daemon] retry_backoff, doubling, capped at an hour) for at
    most `max_attempts` tries; crashes of drdaemon itself are not retried."""

    def __init__(self, base: timedelta, max_attempts: int) -> None:
        self.base, self.max_attempts = base, max_attempts

    def get_retry_decision(self, *, exception: BaseException,
                           job: Job) -> RetryDecision | None:
        if not isinstance(exception, JobFailed) or job.attempts + 1 >= self.max_attempts:
            return None
        if exception.at_once:
            return RetryDecision(retry_in={"seconds": 0})
        delay = retry_delay(job.attempts, self.base)
        return RetryDecision(retry_in={"seconds": int(delay.total_seconds())})


def snapshot(rt: Runtime, source: str) -> None:
    """Snapshot `source` once; raise JobFailed if it failed."""
    try:
        src = rt.config.source(source)
    except ConfigError:
        log.warning("snapshot job for %s dropped: no such source in the config any more",
                    source, extra={"job": "snapshot", "source": source})
        return
    if not still_scheduled(rt, src):
        return
    if rt.stopping.is_set():
        raise JobFailed("the worker is stopping", at_once=True)
    log.info("snapshot of %s begins on this worker", source,
             extra={"job": "snapshot", "source": source})
    result = attempt_snapshot(rt, src)
    if not result.ok:
        raise JobFailed(result.error or "failed", at_once=rt.stopping.is_set())


def verify(rt: Runtime) -> Any:
    """The daemon's verify job (every copy of every snapshot); raise if it found problems,
    so the queue counts a failed job (the worker's log says which copies). Returns the
    report."""
    from ..verify import run_verify

    return _maintenance("verify", lambda: run_verify(rt))


def drill(rt: Runtime, tier: str) -> Any:
    """The daemon's drill job of `tier` (drills.run.drill_jobs); a failed drill is in its
    record, not a failed job. Returns the drill run (None: no source of the tier)."""
    from ..drills.run import drill_jobs

    jobs = {name: fn for name, _expr, fn in drill_jobs(rt)}
    fn = jobs.get(f"drill:{tier}")
    if fn is None:
        log.warning("drill job for tier %s dropped: no source of that tier any more", tier,
                    extra={"job": "drill"})
        return None
    return _maintenance(f"drill:{tier}", fn, raise_on_findings=False)


def _maintenance(name: str, fn: Callable[[], Any], *, raise_on_findings: bool = True) -> Any:
    report = fn()
    ok = bool(getattr(report, "ok", True))
    log.log(logging.INFO if ok else logging.ERROR, "%s %s", name,
            "ok" if ok else "found problems", extra={"job": name, "ok": ok,
            "report": report.to_dict() if hasattr(report, "to_dict") else None})
    if not ok and raise_on_findings:
        raise JobFailed(f"{name} found problems")
    return report


def task_functions(rt: Runtime) -> dict[str, Callable[..., None]]:
    """The functions a worker registers, by kind, bound to its runtime."""

    def snapshot_task(source: str) -> None:
        snapshot(rt, source)

    def drill_task(tier: str) -> None:
        drill(rt, tier)

    def verify_task() -> None:
        verify(rt)

    return {plan.SNAPSHOT: snapshot_task, plan.DRILL: drill_task, plan.VERIFY: verify_task}


def retries(rt: Runtime) -> dict[str, BaseRetryStrategy]:
    """Which kinds are retried, and how: snapshots, with the daemon's backoff."""
    assert rt.config.cluster is not None
    return {plan.SNAPSHOT: SnapshotRetry(rt.config.daemon.retry_backoff,
                                         rt.config.cluster.max_attempts)}
