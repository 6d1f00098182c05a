"""The cluster engine ([cluster] dsn): a scheduler and workers as real processes on a real
PostgreSQL queue (procrastinate), each with its own state folder, as hosts would be.

One scheduler tick (the start's catch-up) defers fifty-one sources; three `drdaemon worker`
processes snapshot each exactly once; the worker that holds the one slow source (its
pg_dump waits on a table the test keeps locked) is killed with SIGKILL, and the scheduler
puts its job back in the queue once the worker's heartbeats stop: another worker
completes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import psycopg
import pytest
from conftest import find_free_port
from hypothesis import given
from hypothesis import strategies as st
from support import (
    directory_source,
    kill_left_running,
    local_region,
    make_setup,
    postgres_source,
)

from drdaemon import audit_mirror, metrics
from drdaemon import config as config_mod
from drdaemon.cluster import plan, tasks
from drdaemon.cluster.daemon import ClusterDaemon, _open_queue
from drdaemon.cluster.queue import Queue
from drdaemon.errors import ConfigError, DrError
from drdaemon.runtime import open_runtime

BIN = Path(sys.executable).parent
N_SMALL = 50


def wait_for(cond, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@dataclass
class Proc:
    """One host's drdaemon process (`run` or `worker`), its config and state folder."""

    config: Path
    state: Path
    log: Path
    command: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen([str(BIN / "drdaemon"), "--config", str(self.config),
                                          self.command], stdout=subprocess.DEVNULL,
                                         stderr=err)

    def said(self, text: str) -> bool:
        return text in self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def began(self, source: str) -> bool:
        return self.said(f"snapshot of {source} begins on this worker")

    def committed(self) -> list[str]:
        """The sources this host committed a snapshot of, as its log says (the log, not
        the state: that may be the cluster's shared state)."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("job") == "snapshot" and rec.get("ok") is True:
                out.append(rec["source"])
        return out


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    kill_left_running(p.proc for p in started)


def host_configs(tmp_path: Path, text: str, state: Path, commands: list[str]) -> list[Proc]:
    """One config per host: the shared config but for its state folder and metrics port."""
    out = []
    for i, command in enumerate(commands):
        cfg = tmp_path / f"host{i}.toml"
        own = tmp_path / f"state{i}"
        cfg.write_text(text.replace(f'state_dir = "{state}"', f'state_dir = "{own}"\n'
                                    f'metrics_address = "127.0.0.1:0"'))
        out.append(Proc(cfg, own, tmp_path / f"host{i}.log", command))
    return out


def manifests(region: Path, source: str | None = None) -> list[Path]:
    return sorted(region.glob(f"sources/{source or '*'}/manifests/*.json"))


def test_three_workers_snapshot_fifty_sources_once_and_retry_a_killed_workers_job(
        tmp_path: Path, pg_server, pg_database: str, procs: list[Proc]) -> None:
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
    sources = []
    for i in range(N_SMALL):
        tree = tmp_path / "trees" / f"s{i:02d}"
        tree.mkdir(parents=True)
        (tree / "f.txt").write_text(f"source {i}\n")
        sources.append(directory_source(f"s{i:02d}", tree))
    sources.append(postgres_source("slow", pg_database))
    regions = [tmp_path / "r-eu", tmp_path / "r-us"]
    setup = make_setup(tmp_path, [local_region("eu", regions[0], "europe"),
                                  local_region("us", regions[1], "north-america")], sources,
                       extra=(f'[cluster]\ndsn = "{pg_server.dsn()}"\nheartbeat = "1s"\n'
                              'stalled_after = "4s"\nmax_concurrent_snapshots = 2\n'
                              'scheduler_works = false\n'),
                       daemon='lock_name = "queue-fifty"\ntakeover_interval = "1s"\n'
                              'shutdown_grace = "5s"\n')
    scheduler, *workers = host_configs(tmp_path, setup.config.read_text(), setup.state,
                                       ["run", "worker", "worker", "worker"])
    port = find_free_port()
    text = scheduler.config.read_text()
    scheduler.config.write_text(text.replace('"127.0.0.1:0"', f'"127.0.0.1:{port}"'))
    procs += [scheduler, *workers]
    locker = psycopg.connect(pg_database)
    try:
        locker.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")  # holds "slow" in pg_dump
        for w in workers:
            w.start()
        scheduler.start()
        wait_for(lambda: all(len(manifests(r)) == N_SMALL for r in regions), 180,
                 "the fifty small sources")
        # The slow one is held by the lock on one worker: kill that worker.
        holding = [w for w in workers if w.began("slow")]
        assert len(holding) == 1, "exactly one worker took the slow source"
        killed = holding[0]
        assert killed.stop(signal.SIGKILL) == -signal.SIGKILL
        others = [w for w in workers if w is not killed]
        wait_for(lambda: scheduler.said("its worker stopped sending heartbeats"), 60,
                 "the scheduler to retry the dead worker's job")
        wait_for(lambda: any(w.began("slow") for w in others),
                 60, "another worker to take the slow source")
    finally:
        locker.close()  # the lock goes: the retried pg_dump goes on
    wait_for(lambda: all(manifests(r, "slow") for r in regions), 120, "the slow source")
    # The scheduler exports the queue's state (read every heartbeat, and at its start).
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        scraped = r.read().decode()
    assert "drdaemon_queue_max_wait_seconds 3600.0" in scraped
    assert 'drdaemon_queue_jobs{kind="snapshot",state="waiting"}' in scraped
    for p in [scheduler, *others]:
        assert p.stop() == 0, p.log.read_text()[-2000:]
    for region in regions:
        per_source = [m.parent.parent.name for m in manifests(region)]
        assert sorted(per_source) == sorted([f"s{i:02d}" for i in range(N_SMALL)] + ["slow"])
    # Each source committed once, by one host: the killed worker never committed "slow".
    committed = [s for p in workers for s in p.committed()]
    assert sorted(committed) == sorted(set(committed)) and len(committed) == N_SMALL + 1
    assert "slow" not in killed.committed()
    assert scheduler.committed() == []  # scheduler_works = false: it only scheduled


def slow_source_cluster(tmp_path: Path, pg_server, pg_database: str, lock: str,
                        grace: int) -> tuple[list[Path], list[Proc]]:
    """A scheduler (taking no job) and two workers on one postgres source "slow" (its
    pg_dump waits while the test locks table t), short heartbeats; returns the two
    local regions and the three hosts (run, worker, worker), not started."""
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
    regions = [tmp_path / "r-eu", tmp_path / "r-us"]
    setup = make_setup(tmp_path, [local_region("eu", regions[0], "europe"),
                                  local_region("us", regions[1], "north-america")],
                       [postgres_source("slow", pg_database)],
                       extra=(f'[cluster]\ndsn = "{pg_server.dsn()}"\nheartbeat = "1s"\n'
                              'stalled_after = "4s"\nscheduler_works = false\n'),
                       daemon=f'lock_name = "{lock}"\nshutdown_grace = "{grace}s"\n')
    return regions, host_configs(tmp_path, setup.config.read_text(), setup.state,
                                 ["run", "worker", "worker"])


def test_a_worker_frozen_past_the_bound_never_commits_the_job_given_to_another(
        tmp_path: Path, pg_server, pg_database: str, procs: list[Proc]) -> None:
    """SIGSTOP, not SIGKILL: the worker comes back after its job went to another worker;
    its own attempt is fenced before the commit (one snapshot, by the other)."""
    regions, hosts = slow_source_cluster(tmp_path, pg_server, pg_database, "queue-frozen", 5)
    scheduler, *workers = hosts
    procs += [scheduler, *workers]
    started = [lambda w=w: w.began("slow") for w in workers]
    locker = psycopg.connect(pg_database)
    try:
        locker.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        for p in [*workers, scheduler]:
            p.start()
        wait_for(lambda: any(f() for f in started), 60, "a worker to take the source")
        frozen, other = workers if started[0]() else workers[::-1]
        assert frozen.proc is not None
        frozen.proc.send_signal(signal.SIGSTOP)
        wait_for(lambda: scheduler.said("its worker stopped sending heartbeats"), 60,
                 "the scheduler to retry the frozen worker's job")
        wait_for(lambda: other.began("slow"), 60,
                 "the other worker to take the source")
    finally:
        locker.close()
    wait_for(lambda: all(manifests(r, "slow") for r in regions), 120, "the snapshot")
    frozen.proc.send_signal(signal.SIGCONT)
    # Its commit is refused, and it stops on its own (exit 1: to be restarted afresh).
    assert frozen.proc.wait(timeout=60) == 1
    # Back from SIGSTOP it either reaches its commit first (refused) or learns from its
    # next heartbeat that it was declared dead and stops before: both are safe, and
    # which comes first is a race between its job thread and its heartbeat.
    if frozen.said("the commit of snapshot"):
        assert frozen.said("refused: this worker missed its heartbeats")
    assert frozen.said("was declared dead; stopped (restart it)")
    for p in [scheduler, other]:
        assert p.stop() == 0, p.log.read_text()[-2000:]
    for region in regions:
        assert len(manifests(region, "slow")) == 1
    assert other.committed() == ["slow"] and frozen.committed() == []


def test_a_worker_stopped_mid_job_gives_it_back_to_the_queue(
        tmp_path: Path, pg_server, pg_database: str, procs: list[Proc]) -> None:
    """SIGTERM of a worker whose pg_dump waits on a lock: it stops within its grace,
    exit 0, its job goes back to the queue at once and the next worker completes it."""
    regions, hosts = slow_source_cluster(tmp_path, pg_server, pg_database, "queue-sigterm",
                                         10)
    scheduler, first, second = hosts
    procs += [scheduler, first, second]
    locker = psycopg.connect(pg_database)
    try:
        locker.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        first.start()
        scheduler.start()
        wait_for(lambda: first.began("slow"), 60,
                 "the worker to take the source")
        began = time.monotonic()
        assert first.stop() == 0
        assert time.monotonic() - began < 10
        second.start()
        wait_for(lambda: second.began("slow"), 60,
                 "the next worker to take the source")
    finally:
        locker.close()
    wait_for(lambda: all(manifests(r, "slow") for r in regions), 60, "the snapshot")
    for p in (scheduler, second):
        assert p.stop() == 0
    assert not scheduler.said("its worker stopped sending heartbeats")  # not a stall
    assert first.committed() == [] and second.committed() == ["slow"]


def test_a_lone_scheduler_works_and_counts_a_job_that_failed_every_try(
        tmp_path: Path, pg_server, procs: list[Proc]) -> None:
    """`drdaemon run` with [cluster] and no worker elsewhere: it schedules and works; a
    source that fails every try ends as a failed job, which its metrics count."""
    good = tmp_path / "good"
    good.mkdir()
    (good / "f.txt").write_text("x")
    port = find_free_port()
    regions = [tmp_path / "r-eu", tmp_path / "r-us"]
    setup = make_setup(tmp_path, [local_region("eu", regions[0], "europe"),
                                  local_region("us", regions[1], "north-america")],
                       [directory_source("good", good),
                        directory_source("gone", tmp_path / "missing")],
                       extra=(f'[cluster]\ndsn = "{pg_server.dsn()}"\nheartbeat = "1s"\n'
                              'stalled_after = "3s"\nmax_attempts = 2\n'),
                       daemon=(f'lock_name = "queue-lone"\nretry_backoff = "1s"\n'
                               f'metrics_address = "127.0.0.1:{port}"\n'))
    (host,) = host_configs(tmp_path, setup.config.read_text(), setup.state, ["run"])
    host.config.write_text(host.config.read_text().replace(
        'metrics_address = "127.0.0.1:0"\n', ""))
    procs.append(host)
    host.start()
    wait_for(lambda: all(manifests(r, "good") for r in regions), 60, "the good source")

    scraped = [""]

    def failed() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                scraped[0] = r.read().decode()
        except OSError:
            return False
        return 'drdaemon_queue_jobs{kind="snapshot",state="failed"} 1.0' in scraped[0]

    wait_for(failed, 60, "the failed job in the metrics")
    # No cron job per source in the scheduler: the next run is still each source's.
    assert 'drdaemon_snapshot_next_run_timestamp_seconds{source="good"' in scraped[0]
    assert host.said("snapshot of gone failed")
    assert host.stop() == 0
    assert host.committed() == ["good"]


def test_drills_and_verify_go_through_the_queue_and_prune_stays(
        tmp_path: Path, pg_server) -> None:
    """The scheduler's maintenance jobs: verify and drills deferred (once while one
    waits), prune run in its own process; the task functions run the services."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f.txt").write_text("x")
    setup = make_setup(tmp_path, [local_region("eu", tmp_path / "r-eu", "europe"),
                                  local_region("us", tmp_path / "r-us", "north-america")],
                       [directory_source("files", tree)],
                       extra=f'[cluster]\ndsn = "{pg_server.dsn()}"\n',
                       daemon='lock_name = "queue-maint"\n')
    rt = open_runtime(config_mod.load(setup.config))
    queue = Queue(rt.config)
    queue.open()
    try:
        daemon = ClusterDaemon(rt, queue)
        ran: list[str] = []
        for name in ("verify", "drill:paid", "verify", "prune"):
            daemon.maintenance_job(name, lambda name=name: ran.append(name))
        assert ran == ["prune"]
        counts = {c.kind: c for c in queue.counts()[0]}
        assert (counts["verify"].waiting, counts["drill"].waiting) == (1, 1)
        assert counts["snapshot"].waiting == 0
    finally:
        queue.close()
    tasks.snapshot(rt, "files")
    assert tasks.verify(rt).ok  # every copy good: no exception
    drilled = tasks.drill(rt, "paid")
    assert [(r.source, r.ok) for r in drilled.records] == [("files", True)]
    shutil.rmtree(tree)
    with pytest.raises(tasks.JobFailed):
        tasks.snapshot(rt, "files")  # the tree is gone: a failed job, to be retried


def test_a_call_waiting_on_the_queue_when_it_closes_ends_and_later_ones_are_refused(
        tmp_path: Path, pg_server) -> None:
    """A scheduler job still waiting on the queue's loop when the process stops (the
    queue's counts every heartbeat) must not wait for ever: the interpreter joins job
    threads at exit, so one such wait kept a stopped `drdaemon run` from exiting."""
    queue = Queue(_config(tmp_path, f'[cluster]\ndsn = "{pg_server.dsn()}"\n',
                          'lock_name = "queue-close"\n'))
    queue.open()
    ended: list[BaseException] = []

    def waiting() -> None:
        try:
            queue.call(asyncio.sleep(3600))
        except BaseException as exc:  # CancelledError is a BaseException
            ended.append(exc)

    caller = threading.Thread(target=waiting)
    caller.start()
    time.sleep(0.2)  # the call is waiting on the loop
    queue.close()
    caller.join(timeout=10)
    assert not caller.is_alive() and len(ended) == 1
    with pytest.raises(DrError, match="the job queue is closed"):
        queue.call(asyncio.sleep(0))


def test_workers_records_reach_the_regions_through_the_schedulers_mirror(
        tmp_path: Path, pg_server) -> None:
    """In a cluster the chain lives in the lock database: a worker's job appends its
    records there and makes no audit PUT; the active scheduler mirrors them on an
    interval, and each region's copy then verifies."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f.txt").write_text("x")
    setup = make_setup(tmp_path, [local_region("eu", tmp_path / "r-eu", "europe"),
                                  local_region("us", tmp_path / "r-us", "north-america")],
                       [directory_source("files", tree)],
                       extra=f'[cluster]\ndsn = "{pg_server.dsn()}"\n',
                       daemon='lock_name = "queue-mirror"\n')
    rt = open_runtime(config_mod.load(setup.config))

    def mirrored() -> list[list[str]]:
        return [[o.name for o in store.list("audit/")] for store in rt.stores]

    with contextlib.ExitStack() as held:
        queue = _open_queue(rt, held, "worker")
        tasks.snapshot(rt, "files")
        assert mirrored() == [[], []]  # recorded, durable in the database, not copied
        ClusterDaemon(rt, queue).mirror_audit()
    assert all(names for names in mirrored())
    for region in ("eu", "us"):
        copy = audit_mirror.verify_mirror(rt, region)
        assert copy.ok and copy.records > 0, copy.to_dict()


def test_an_unreachable_queue_database_is_one_line(tmp_path: Path, free_port) -> None:
    setup = make_setup(tmp_path, [local_region("eu", tmp_path / "r-eu", "europe"),
                                  local_region("us", tmp_path / "r-us", "north-america")], [],
                       extra=f'[cluster]\ndsn = "host=127.0.0.1 port={free_port()} '
                             'user=x dbname=y connect_timeout=2"\n')
    out = subprocess.run([str(BIN / "drdaemon"), "--config", str(setup.config), "worker"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    # The queue's line ("cannot reach the queue database ..."), or the shared state's when
    # it opens first on the same database (lock_dsn is the cluster's dsn).
    assert len(lines) == 1 and "cannot reach the " in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def _config(tmp_path: Path, cluster: str, daemon: str = "") -> config_mod.Config:
    setup = make_setup(tmp_path, [local_region("eu", tmp_path / "r-eu", "europe"),
                                  local_region("us", tmp_path / "r-us", "north-america")], [],
                       extra=cluster, daemon=daemon)
    return config_mod.load(setup.config)


def test_cluster_config_defaults_and_the_one_dsn(tmp_path: Path) -> None:
    cfg = _config(tmp_path, '[cluster]\ndsn = "host=db user=drdaemon dbname=queue"\n')
    assert cfg.cluster is not None
    assert cfg.cluster.max_concurrent_snapshots == 2 and cfg.cluster.scheduler_works
    assert cfg.cluster.stalled_after > 2 * cfg.cluster.heartbeat
    assert cfg.daemon.lock_dsn == "host=db user=drdaemon dbname=queue"
    other = _config(tmp_path / "b", '[cluster]\ndsn = "host=db dbname=queue"\n',
                    'lock_dsn = "host=lockdb dbname=locks"\n')
    assert other.daemon.lock_dsn == "host=lockdb dbname=locks"
    assert _config(tmp_path / "c", "").cluster is None
    assert _config(tmp_path / "d", "").daemon.lock_dsn is None


@pytest.mark.parametrize(("body", "says"), [
    ('dsn = "host=db password=hunter2"', "a password must not be written"),
    ('dsn = "host=db"\nmax_concurrent_snapshots = 0', "an integer from 1 to 64"),
    ('dsn = "host=db"\nheartbeat = "10s"\nstalled_after = "15s"', "above two heartbeats"),
    ('dsn = "host=db"\nmax_queue_wait = "10s"', "at least 1m"),
    ('dsn = "host=db"\nworkers = 3', "unknown key"),
    ('max_concurrent_snapshots = 2', "cluster.dsn"),
])
def test_cluster_config_errors_are_one_line(tmp_path: Path, body: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, f"[cluster]\n{body}\n")
    assert says in str(err.value) and "\n" not in str(err.value)
    assert "hunter2" not in str(err.value)


def test_one_jobs_locks_and_queues_are_the_clusters() -> None:
    spec = plan.snapshot_job("c1", "lms-db")
    assert (spec.task, spec.queue, spec.lock, spec.queueing_lock, spec.args) == (
        "drdaemon.snapshot", "c1:snapshot", "c1:source:lms-db", "c1:snapshot:lms-db",
        {"source": "lms-db"})
    drill = plan.maintenance_job("c1", "drill:paid")
    assert drill is not None and drill.queue == "c1:drill" and drill.args == {"tier": "paid"}
    assert plan.maintenance_job("c1", "prune") is None  # deletes: stays with the lock holder
    rows = [plan.QueueRow("c1:snapshot", "waiting", 3, 40.0),
            plan.QueueRow("c1:snapshot", "running", 2), plan.QueueRow("c2:snapshot", "failed", 9),
            plan.QueueRow("c1:verify", "failed", 1)]
    counts = {c.kind: c for c in plan.count_by_kind(rows, "c1")}
    assert counts["snapshot"] == plan.KindCount("snapshot", 3, 0, 2, 0, 40.0)
    assert counts["verify"].failed == 1 and counts["drill"] == plan.KindCount("drill")


UTC_ZONE = zoneinfo.ZoneInfo("UTC")
START = datetime(2026, 11, 30, tzinfo=UTC)


@given(st.integers(0, 3 * 1440), st.integers(1, 180))
def test_consecutive_ticks_defer_each_fire_exactly_once(start_min: int, step: int) -> None:
    """However late or often the ticks come, a tick defers a source exactly when its cron
    fired since the previous tick (several fires in one gap: one job), so none is lost."""
    schedules = {"daily": "0 2 * * *", "five": "*/5 * * * *", "hourly": "17 * * * *"}
    t0 = START + timedelta(minutes=start_min)
    ticks = [t0 + timedelta(minutes=step * i) for i in range(6)]
    for since, now in pairwise(ticks):
        got = plan.fired(schedules, UTC_ZONE, since, now)
        assert got == [n for n, e in schedules.items() if _fires(e, since, now) > 0]


def _fires(expr: str, since: datetime, until: datetime) -> int:
    """Cron fires in (since, until], counted minute by minute (crontab's meaning)."""
    minute, hour = expr.split()[:2]
    n, t = 0, since + timedelta(minutes=1)
    while t <= until:
        ok_m = minute == "*" or (minute.startswith("*/") and t.minute % int(minute[2:]) == 0) \
            or (minute.isdigit() and t.minute == int(minute))
        ok_h = hour == "*" or (hour.isdigit() and t.hour == int(hour))
        n += ok_m and ok_h
        t += timedelta(minutes=1)
    return n


def test_the_queue_metrics_render_each_kind_and_state() -> None:
    st = metrics.MetricsState(sources={}, regions=("eu",), tiers={"paid": (1.0, 1.0)})
    assert not [f for f in metrics.families(st, START) if f.name.startswith("drdaemon_queue")]
    st.record_queue(metrics.QueueRead((metrics.QueueKind("snapshot", 3, 1, 2, 0, 42.0),),
                                      workers=3, capacity=2, max_wait=3600.0,
                                      read_at=START.timestamp() - 5))
    got = {(f.name, tuple(sorted(s.labels.items()))): s.value
           for f in metrics.families(st, START) for s in f.samples
           if f.name.startswith("drdaemon_queue")}
    assert got[("drdaemon_queue_jobs", (("kind", "snapshot"), ("state", "waiting")))] == 3
    assert got[("drdaemon_queue_jobs", (("kind", "snapshot"), ("state", "scheduled")))] == 1
    assert got[("drdaemon_queue_oldest_waiting_seconds", (("kind", "snapshot"),))] == 42.0
    assert got[("drdaemon_queue_workers", ())] == 3
    assert got[("drdaemon_queue_read_age_seconds", ())] == 5.0
