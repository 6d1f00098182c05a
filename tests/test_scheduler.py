"""The daemon's schedule: catch-up, no overlap, retry, clean shutdown, restart, one instance."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import S3Region
from hypothesis import given
from hypothesis import strategies as st
from support import directory_source, local_region, make_setup, snapshot_keys

from drdaemon import config as config_mod
from drdaemon import locks
from drdaemon.backup import snapshot
from drdaemon.errors import DrError
from drdaemon.retry import resume_at, retry_delay
from drdaemon.runtime import open_runtime
from drdaemon.scheduler import Daemon, overdue


class Clock:
    """A controllable clock for the runtime: decisions use it, never the wall clock."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def wait_for(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "a").mkdir(parents=True)
    (root / "a" / "f.txt").write_text("x" * 1000)
    return root


def local_setup(tmp_path: Path, tree: Path, daemon: str = ""):
    return make_setup(tmp_path, [local_region("eu", tmp_path / "r-eu", "europe"),
                                 local_region("us", tmp_path / "r-us", "north-america")],
                      [directory_source("files", tree, tier="paid")], daemon=daemon)


def manifests(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "r-us").glob("sources/files/manifests/*.json"))


# -- pure decisions -------------------------------------------------------------

@given(attempt=st.integers(0, 100), base_s=st.integers(1, 3600))
def test_retry_delay_grows_and_is_capped(attempt: int, base_s: int) -> None:
    base = timedelta(seconds=base_s)
    d = retry_delay(attempt, base)
    assert min(base, timedelta(hours=1)) <= d <= timedelta(hours=1)
    assert retry_delay(attempt + 1, base) >= d


def test_overdue_is_exactly_the_sources_outside_rpo(tmp_path: Path, tree: Path) -> None:
    cfg = config_mod.load(local_setup(tmp_path, tree).config)
    src = cfg.sources[0]
    now = datetime(2026, 11, 23, 12, tzinfo=UTC)
    rpo = lambda s: timedelta(hours=24)  # noqa: E731
    assert overdue([src], {}, rpo, now) == [src]
    assert overdue([src], {"files": now - timedelta(hours=23)}, rpo, now) == []
    # One boundary rule with status, drills and the alerts: exactly at the RPO is inside.
    assert overdue([src], {"files": now - timedelta(hours=24)}, rpo, now) == []
    assert overdue([src], {"files": now - timedelta(hours=24, seconds=1)}, rpo, now) == [src]


# -- the daemon with a controllable clock -------------------------------------------

def test_catch_up_at_start_only_when_outside_rpo(tmp_path: Path, tree: Path) -> None:
    setup = local_setup(tmp_path, tree)
    clock = Clock(datetime.now(UTC) - timedelta(days=3))
    rt = open_runtime(config_mod.load(setup.config), clock=clock)
    assert snapshot(rt, rt.config.sources[0]).ok

    clock.now += timedelta(hours=2)
    daemon = Daemon(rt)
    daemon.start()
    try:
        # The start's own catch-up runs in a job: let it finish before the clock moves.
        assert daemon.first_look_done.wait(60)
        assert daemon.catch_up() == []
        clock.now += timedelta(hours=23)  # 25 h after the snapshot: outside the paid RPO
        assert daemon.catch_up() == ["files"]
        wait_for(lambda: len(manifests(tmp_path)) == 2)
    finally:
        assert daemon.stop()


def test_no_overlap_for_one_source(tmp_path: Path) -> None:
    tree = tmp_path / "big"
    tree.mkdir()
    (tree / "blob").write_bytes(os.urandom(60 << 20))
    setup = local_setup(tmp_path, tree)
    rt = open_runtime(config_mod.load(setup.config))
    daemon = Daemon(rt)
    src = rt.config.sources[0]
    results: list[object] = []
    barrier = threading.Barrier(2)

    def go() -> None:
        barrier.wait()
        results.append(daemon.snapshot_job(src))

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r is None for r in results) == [False, True]
    assert len(manifests(tmp_path)) == 1


def test_failed_snapshot_is_retried_with_backoff(tmp_path: Path) -> None:
    tree = tmp_path / "not-yet"
    setup = local_setup(tmp_path, tree, daemon='retry_backoff = "1s"')
    rt = open_runtime(config_mod.load(setup.config))
    daemon = Daemon(rt)
    daemon.start()
    try:
        wait_for(lambda: daemon.attempts.get("files", 0) >= 1)
        assert daemon.scheduler.get_job("retry:files") is not None
        (tree / "d").mkdir(parents=True)  # the source comes back
        wait_for(lambda: len(manifests(tmp_path)) == 1)
        wait_for(lambda: "files" not in daemon.attempts)
    finally:
        assert daemon.stop()
    outcome = json.loads((setup.state / "sources" / "files.json").read_text())
    assert outcome["last_failure"] and "does not exist" in outcome["last_error"]
    assert outcome["last_success"] > outcome["last_failure"]


def test_second_daemon_on_same_state_is_refused(tmp_path: Path, tree: Path) -> None:
    setup = local_setup(tmp_path, tree)
    with locks.hold(setup.state, "daemon"):
        with pytest.raises(DrError, match="already running"), locks.hold(setup.state, "daemon"):
            pass
        proc = subprocess.run([str(Path(sys.executable).parent / "drdaemon"), "--config",
                               str(setup.config), "run", "--once"],
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 1
        assert "already running" in proc.stderr
        assert manifests(tmp_path) == []


def test_stale_incomplete_uploads_are_cleaned_at_start(tmp_path: Path, tree: Path,
                                                       s3_regions: list[S3Region]) -> None:
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [directory_source("files", tree)])
    region = s3_regions[0]
    region.client().create_multipart_upload(Bucket=region.bucket, Key="sources/files/data/x")
    (tmp_path / "unused").mkdir()
    clock = Clock(datetime.now(UTC) + timedelta(days=2))
    rt = open_runtime(config_mod.load(setup.config), clock=clock)
    Daemon(rt).clean_stale_uploads()
    assert not region.client().list_multipart_uploads(Bucket=region.bucket).get("Uploads")


# -- a real daemon process, stopped mid-upload -----------------------------------

def test_sigterm_mid_upload_leaves_nothing_then_restart_resumes(
        tmp_path: Path, s3_regions: list[S3Region]) -> None:
    tree = tmp_path / "big"
    tree.mkdir()
    (tree / "blob").write_bytes(os.urandom(150 << 20))
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [directory_source("files", tree)])
    exe = str(Path(sys.executable).parent / "drdaemon")
    eu = s3_regions[0].client()
    bucket = s3_regions[0].bucket

    proc = subprocess.Popen([exe, "--config", str(setup.config), "run"],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: eu.list_multipart_uploads(Bucket=bucket).get("Uploads"), 60)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped by shutdown" in err
    for region in s3_regions:
        c = region.client()
        assert snapshot_keys(c, region.bucket) == []
        assert not c.list_multipart_uploads(Bucket=region.bucket).get("Uploads")

    proc = subprocess.Popen([exe, "--config", str(setup.config), "run"],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any("/manifests/" in o["Key"] for o in
                             eu.list_objects_v2(Bucket=bucket).get("Contents", [])), 120)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def test_daemon_repairs_a_lost_region_copy(tmp_path: Path, tree: Path,
                                           moto_region_factory) -> None:
    eu = moto_region_factory("eu-frankfurt", "eu-central-1", "europe")
    us = moto_region_factory("us-virginia", "us-east-1", "north-america")
    setup = make_setup(tmp_path, [eu.toml(), us.toml()], [directory_source("files", tree)])
    us.server.stop()
    assert setup.drctl("backup").exit_code == 1  # degraded
    us.server.start()
    rt = open_runtime(config_mod.load(setup.config))
    daemon = Daemon(rt)
    daemon.start()
    try:
        # Run the scheduled replicate job now instead of waiting for its cron.
        daemon.scheduler.modify_job("replicate", next_run_time=datetime.now(UTC))
        wait_for(lambda: any(o["Key"].endswith(".json") for o in us.client().list_objects_v2(
            Bucket=us.bucket).get("Contents", [])))
    finally:
        assert daemon.stop()
    listed = setup.drctl_json("snapshots", "list")["snapshots"]
    assert listed[0]["regions"] == ["eu-frankfurt", "us-virginia"]


def test_daemons_on_two_hosts_meet_at_the_postgres_lock(tmp_path: Path, tree: Path,
                                                         pg_server) -> None:
    """Two state folders (two hosts), one config: the PostgreSQL lock lets one run."""
    lock_dsn = pg_server.dsn()
    setup = local_setup(tmp_path, tree, daemon=f'lock_dsn = "{lock_dsn}"\nlock_name = "t1"')
    with locks.hold_in_postgres(lock_dsn, "t1"):
        proc = subprocess.run([str(Path(sys.executable).parent / "drdaemon"), "--config",
                               str(setup.config), "run", "--once"],
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 1
        assert "another drdaemon holds the lock 't1'" in proc.stderr
        assert manifests(tmp_path) == []
    # Released with the connection: now it runs.
    proc = subprocess.run([str(Path(sys.executable).parent / "drdaemon"), "--config",
                           str(setup.config), "run", "--once"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert len(manifests(tmp_path)) == 1


# -- an attempt cut off by a stop or a crash is retried after the restart ------------

_T0 = datetime(2026, 11, 23, 2, tzinfo=UTC)


@given(failures=st.integers(0, 20), unfinished=st.booleans(), late_s=st.integers(0, 10 ** 6),
       base_s=st.integers(1, 3600))
def test_resume_at_follows_the_backoff_and_is_never_in_the_past(
        failures: int, unfinished: bool, late_s: int, base_s: int) -> None:
    from drdaemon.state import Outcome
    ended = _T0.isoformat()
    if unfinished:  # began at T0, never ended; any earlier failures ended before
        outcome = Outcome(last_attempt=(_T0 - timedelta(hours=1)).isoformat(),
                          last_failure=(_T0 - timedelta(hours=1)).isoformat(),
                          last_started=ended, failures=failures)
    elif failures:
        outcome = Outcome(last_attempt=ended, last_failure=ended, last_started=ended,
                          failures=failures)
    else:
        outcome = Outcome(last_attempt=ended, last_success=ended, last_started=ended)
    now = _T0 + timedelta(seconds=late_s)
    when = resume_at(outcome, timedelta(seconds=base_s), now)
    if not unfinished and not failures:
        assert when is None
        return
    assert when is not None and when >= now
    attempts = failures + (1 if unfinished else 0)
    assert when == max(_T0 + retry_delay(attempts - 1, timedelta(seconds=base_s)), now)


def test_snapshot_stopped_by_shutdown_is_retried_after_restart(tmp_path: Path) -> None:
    # A good snapshot within the RPO, so neither the start-up catch-up nor the
    # watchdog would take another before tomorrow's cron.
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "small").write_text("x")
    setup = local_setup(tmp_path, tree, daemon='retry_backoff = "1s"')
    rt = open_runtime(config_mod.load(setup.config))
    assert snapshot(rt, rt.config.sources[0]).ok
    (tree / "blob").write_bytes(os.urandom(80 << 20))

    daemon = Daemon(rt)
    results: list[object] = []
    job = threading.Thread(target=lambda: results.append(daemon.snapshot_job(
        rt.config.sources[0])))
    job.start()
    wait_for(lambda: any((tmp_path / "state" / "inflight").glob("*")))
    assert daemon.stop()  # what SIGTERM does: the stream in flight is aborted
    job.join()
    assert results and not results[0].ok and "shutdown" in (results[0].error or "")
    assert len(manifests(tmp_path)) == 1

    status = setup.drctl("status", "--json")
    assert status.exit_code == 1
    (files,) = json.loads(status.stdout)["sources"]
    assert not files["ok"] and any("last attempt failed" in p for p in files["problems"])

    again = Daemon(open_runtime(config_mod.load(setup.config)))
    again.start()
    try:
        assert again.catch_up() == []  # inside the RPO: only the retry can take it
        wait_for(lambda: len(manifests(tmp_path)) == 2)
    finally:
        assert again.stop()
    assert setup.drctl("status").exit_code == 0


def test_backup_killed_mid_upload_is_retried_by_the_next_daemon(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "small").write_text("x")
    setup = local_setup(tmp_path, tree, daemon='retry_backoff = "1s"')
    assert setup.drctl("backup").exit_code == 0
    (tree / "blob").write_bytes(os.urandom(150 << 20))
    drctl = str(Path(sys.executable).parent / "drctl")
    proc = subprocess.Popen([drctl, "--config", str(setup.config), "backup"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: any((tmp_path / "state" / "inflight").glob("*")), 60)
    finally:
        proc.kill()  # a crash: nothing gets to record the attempt's end
        proc.wait()
    status = setup.drctl("status", "--json")
    assert status.exit_code == 1
    files = json.loads(status.stdout)["sources"][0]
    assert any("never finished" in p for p in files["problems"])

    rt = open_runtime(config_mod.load(setup.config))
    daemon = Daemon(rt)
    daemon.start()
    try:
        # The start's first look at storage schedules it (after a 1 s backoff).
        wait_for(lambda: daemon.scheduler.get_job("retry:files") is not None, 60)
        wait_for(lambda: len(manifests(tmp_path)) == 2, 120)
    finally:
        assert daemon.stop()
    assert setup.drctl_json("status")["sources"][0]["problems"] == []


def test_a_thread_stuck_after_the_stop_is_named_and_does_not_keep_the_process() -> None:
    """A stopped daemon whose stray thread (a job no one tracks, stuck in a call) would
    be joined by the interpreter for ever: it waits a bounded time, logs where the thread
    is, and exits 0."""
    code = (
        "import threading, time\n"
        "from drdaemon.logs import setup_logging\n"
        "from drdaemon.scheduler import end_stray_threads\n"
        "setup_logging()\n"
        "def stuck_in_a_call():\n"
        "    time.sleep(3600)\n"
        "threading.Thread(target=stuck_in_a_call, name='job-7').start()\n"
        "threading.Thread(target=time.sleep, args=(0.2,), name='ends-soon').start()\n"
        "end_stray_threads(1.0)\n")
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - started < 30
    assert "thread job-7 still running" in out.stderr and "stuck_in_a_call" in out.stderr
    assert "ends-soon" not in out.stderr
