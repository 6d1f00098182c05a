"""The job queue's adapter: procrastinate on the `[cluster] dsn` database.

procrastinate's worker is asyncio; drdaemon's jobs are blocking code (pipes, threads,
boto3). So one event loop runs in its own thread per process, holding the one App and
its connection pool; the scheduler's threads hand it coroutines (`call`), and the worker
runs the task functions, which are plain functions, in the loop's thread pool (sized to
the worker's concurrency). psycopg itself stays behind procrastinate and
sources/pg_lock.py (tests/test_source_kinds.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any, TypeVar

import procrastinate
from procrastinate import exceptions as pq_exceptions
from procrastinate import worker as pq_worker

from ..config import Config
from ..errors import DrError, Fenced
from ..sources.pg_lock import LockSession
from ..sources.pg_session import describe
from . import plan

log = logging.getLogger("drdaemon")
T = TypeVar("T")
# How long a call on the queue's loop may take unless it says otherwise (a query, a
# deferral): bounded, so no thread of this process can wait on the loop for ever.
CALL_TIMEOUT = 60.0

# Held while the schema is checked and applied, so two hosts starting at once never
# both apply it; one name for every cluster sharing the database (the schema is shared).
SCHEMA_LOCK = "drdaemon:procrastinate-schema"
SCHEMA_WAIT = timedelta(minutes=2)

# Per queue and state: jobs, and for the runnable ones how long the oldest has waited
# since it was (re)queued. Failed jobs count for a day after they failed.
_COUNTS = """
SELECT j.queue_name,
       CASE WHEN j.status = 'doing' THEN 'running'
            WHEN j.status = 'failed' THEN 'failed'
            WHEN j.scheduled_at > now() THEN 'scheduled'
            ELSE 'waiting' END AS state,
       count(*) AS jobs,
       coalesce(max(extract(epoch FROM now() - greatest(e.at, j.scheduled_at))), 0)
           AS oldest_wait
  FROM procrastinate_jobs j
  LEFT JOIN LATERAL (SELECT max(at) AS at FROM procrastinate_events
                      WHERE job_id = j.id) e ON true
 WHERE j.queue_name = ANY(%(queues)s)
   AND (j.status IN ('todo', 'doing')
        OR (j.status = 'failed' AND e.at > now() - interval '1 day'))
 GROUP BY 1, 2
"""
# Is this worker still alive in the queue's eyes? The scheduler deletes the row of a
# worker silent for stalled_after when it gives that worker's jobs to others.
_ALIVE = """
SELECT count(*) AS alive FROM procrastinate_workers
 WHERE id = %(id)s AND last_heartbeat > now() - make_interval(secs => %(stalled)s)
"""
_WORKERS = """
SELECT count(*) AS workers FROM procrastinate_workers
 WHERE last_heartbeat > now() - make_interval(secs => %(stalled)s)
"""


class Queue:
    """The cluster's queue in this process: open, defer, retry stalled jobs, count, work."""

    def __init__(self, config: Config) -> None:
        if config.cluster is None:
            raise DrError(f"{config.path}: no [cluster] table: there is no queue to use")
        self.config = config
        self.cluster = config.cluster
        self.name = config.daemon.lock_name
        self.queues = plan.queues(self.name)
        size = self.cluster.max_concurrent_snapshots
        self.app = procrastinate.App(connector=procrastinate.PsycopgConnector(
            conninfo=self.cluster.dsn, min_size=1, max_size=size + 4))
        self._loop = asyncio.new_event_loop()
        # The task functions block: each running job needs a thread of its own.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=size + 2,
                                                               thread_name_prefix="job")
        self._loop.set_default_executor(self._executor)
        self._thread = threading.Thread(target=self._loop.run_forever, name="queue",
                                        daemon=True)
        self._worker: asyncio.Task[None] | None = None
        self._running: pq_worker.Worker | None = None
        self._open = False
        self._closing = False

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = CALL_TIMEOUT) -> T:
        """Run `coro` on the queue's loop and wait for its result (at most `timeout`).

        Once the queue is closing this raises at once: a scheduler job (the queue's
        counts, a tick) still calling in while the loop stops would otherwise wait for
        ever on a future nobody completes, and the process could not exit (the
        interpreter joins its job threads)."""
        if self._closing or not self._thread.is_alive():
            coro.close()
            raise DrError("the job queue is closed (this process is stopping)")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def open(self) -> None:
        """Reach the database (one clear line if it cannot), apply procrastinate's schema
        if it is absent (under an advisory lock), open the pool."""
        try:
            session = LockSession(self.cluster.dsn, SCHEMA_LOCK, role="queue")
        except DrError as exc:
            raise DrError("[cluster] dsn: " + str(exc).replace("the lock database",
                                                                "the queue database")) from None
        try:
            if not session.take(SCHEMA_WAIT):
                raise DrError(f"[cluster] dsn: the schema lock {SCHEMA_LOCK!r} is held by "
                              f"{session.holder()}; try again")
            self._thread.start()
            self.call(self._open_pool())
            self._open = True
            if self.call(self._apply_schema()):
                log.info("applied the job queue's schema (procrastinate %s) in %s",
                         procrastinate.__version__, describe(self.cluster.dsn),
                         extra={"job": "queue"})
        finally:
            session.close()

    async def _open_pool(self) -> None:
        await self.app.open_async()

    async def _apply_schema(self) -> bool:
        row = await self.app.connector.execute_query_one_async(
            "SELECT to_regclass('procrastinate_jobs') IS NOT NULL AS present")
        if row["present"]:
            return False
        await self.app.schema_manager.apply_schema_async()
        return True

    def close(self) -> None:
        """Close the pool and stop the loop (the worker must be stopped first); calls
        still waiting on the loop are cancelled, new ones refused."""
        if not self._thread.is_alive():
            return
        closing = self._open
        self._closing, self._open = True, False
        try:
            fut = asyncio.run_coroutine_threadsafe(self._close(closing), self._loop)
            fut.result(timeout=30)
        except Exception as exc:  # closing: say it, do not mask the exit
            log.warning("closing the job queue: %s", exc, extra={"job": "queue"})
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        # Idle job threads end now; a job still running past the stop is the daemon's
        # to report (scheduler.end_stray_threads), not the interpreter's to wait for.
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _close(self, pool: bool) -> None:
        if pool:
            await self.app.close_async()
        # Whatever another thread is still waiting for ends now (CancelledError there).
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        if rest:
            await asyncio.wait(rest, timeout=5)

    # -- the scheduler's side ------------------------------------------------

    def defer(self, spec: plan.JobSpec) -> bool:
        """Queue one job; False when its queueing lock says one is waiting already."""
        deferrer = self.app.configure_task(spec.task, queue=spec.queue, lock=spec.lock,
                                           queueing_lock=spec.queueing_lock)
        try:
            self.call(deferrer.defer_async(**spec.args))
        except pq_exceptions.AlreadyEnqueued:
            return False
        return True

    def retry_stalled(self) -> list[str]:
        """Put back in the queue the running jobs of workers silent for `stalled_after`
        (procrastinate finds them by their heartbeats, it does not retry them); forget
        those workers. Returns what was retried, as "task(args)"."""
        return self.call(self._retry_stalled(self.cluster.stalled_after.total_seconds()))

    async def _retry_stalled(self, seconds: float) -> list[str]:
        manager = self.app.job_manager
        retried = []
        for queue in self.queues:
            for job in await manager.get_stalled_jobs(queue=queue,
                                                      seconds_since_heartbeat=seconds):
                await manager.retry_job(job)
                retried.append(job.call_string)
        await manager.prune_stalled_workers(seconds)
        return retried

    def counts(self) -> tuple[list[plan.KindCount], int]:
        """The queue's jobs by kind, and the workers alive (a heartbeat within
        `stalled_after`)."""
        return self.call(self._counts())

    async def _counts(self) -> tuple[list[plan.KindCount], int]:
        connector = self.app.connector
        rows = await connector.execute_query_all_async(_COUNTS, queues=self.queues)
        alive = await connector.execute_query_one_async(
            _WORKERS, stalled=self.cluster.stalled_after.total_seconds())
        got = [plan.QueueRow(r["queue_name"], r["state"], int(r["jobs"]),
                             float(r["oldest_wait"] or 0)) for r in rows]
        return plan.count_by_kind(got, self.name), int(alive["workers"])

    # -- the worker's side -----------------------------------------------------

    def register(self, tasks: dict[str, Callable[..., None]],
                 retry: dict[str, procrastinate.BaseRetryStrategy]) -> None:
        """The task functions this process runs, by kind (before `start_worker`)."""
        for kind, fn in tasks.items():
            self.app.task(name=plan.task_name(kind), retry=retry.get(kind, False))(fn)

    def start_worker(self, name: str, grace: timedelta) -> None:
        """Start taking jobs of every kind of the cluster (returns at once)."""
        cluster = self.cluster

        self._running = pq_worker.Worker(
            app=self.app, queues=self.queues, name=name,
            concurrency=cluster.max_concurrent_snapshots, install_signal_handlers=False,
            update_heartbeat_interval=cluster.heartbeat.total_seconds(),
            stalled_worker_timeout=cluster.stalled_after.total_seconds(),
            shutdown_graceful_timeout=grace.total_seconds(), fetch_job_polling_interval=5.0)
        running = self._running

        async def start() -> asyncio.Task[None]:
            return asyncio.ensure_future(running.run())

        self._worker = self.call(start())
        log.info("worker %s takes jobs from %s (%d at once)", name, ", ".join(self.queues),
                 cluster.max_concurrent_snapshots, extra={"job": "queue"})

    def alive(self) -> bool:
        """Whether this worker is alive in the queue: registered, its heartbeat within
        `stalled_after` (False once the scheduler declared it dead)."""
        worker_id = self._running.worker_id if self._running is not None else None
        if worker_id is None:
            return False
        seconds = self.cluster.stalled_after.total_seconds()
        row = self.call(self.app.connector.execute_query_one_async(
            _ALIVE, id=worker_id, stalled=seconds), timeout=seconds)
        return bool(row["alive"])

    def fence(self, what: str) -> None:
        """Raise Fenced unless this worker is still alive in the queue (its heartbeat
        within `stalled_after`, not declared dead), right before `what` (a snapshot's
        commit, its manifest): a worker cut off past the bound has had its jobs given
        to others, and must not commit them too."""
        try:
            alive = self.alive()
        except Exception as exc:
            raise Fenced(f"{what} refused: cannot tell the job queue this worker is "
                         f"alive ({exc})") from None
        if not alive:
            raise Fenced(f"{what} refused: this worker missed its heartbeats for "
                         "[cluster] stalled_after; its jobs went to other workers")

    def worker_failed(self) -> BaseException | None:
        """Why the worker stopped on its own (None while it runs, or if never started)."""
        w = self._worker
        if w is None or not w.done() or w.cancelled():
            return None
        return w.exception() or DrError("the queue's worker stopped")

    def stop_worker(self, timeout: float) -> None:
        """Stop taking jobs; wait up to `timeout` for the running ones (told to stop
        through the runtime's `stopping` before this)."""
        worker = self._worker
        if worker is None:
            return

        async def stop() -> None:
            worker.cancel()
            await asyncio.wait([worker], timeout=timeout)

        self.call(stop(), timeout=timeout + 10)
        self._worker = None

