"""A table locked by another session: the backup fails in time, says who holds the lock,
and leaves nothing behind on the server or in the process table, also when the daemon is
stopped by SIGTERM while pg_dump waits. Real PostgreSQL, real processes and signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import PgServer, S3Region
from lms import populate
from support import make_setup, postgres_source, snapshot_keys


def exe(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def wait_for(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def dbname(dsn: str) -> str:
    return dsn.rsplit("dbname=", 1)[1]


@pytest.fixture
def lms_dsn(pg_database: str) -> str:
    populate(pg_database)
    return pg_database


@pytest.fixture
def holder(lms_dsn: str) -> Iterator[psycopg.Connection]:
    """A session holding ACCESS EXCLUSIVE on `users` until the test ends."""
    conn = psycopg.connect(lms_dsn, application_name="nightly-migration")
    conn.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
    try:
        yield conn
    finally:
        conn.rollback()
        conn.close()


def other_backends(pg: PgServer, db: str, holder_pid: int) -> list[tuple[int, str]]:
    """Client sessions on database `db` other than the lock holder's (and this query's)."""
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        return conn.execute(
            "SELECT pid, application_name FROM pg_stat_activity WHERE datname = %s "
            "AND backend_type = 'client backend' AND pid NOT IN (%s, pg_backend_pid())",
            (db, holder_pid)).fetchall()


def pg_dump_processes(db: str) -> list[int]:
    """pg_dump processes on this host dumping database `db`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"pg_dump") for a in argv[:3]) and db.encode() in b" ".join(argv):
            found.append(int(proc.name))
    return found


def service_file(tmp_path: Path, pg: PgServer, name: str, db: str) -> Path:
    """A libpq service file naming the server by its unix socket folder."""
    socket_dir = str(Path(pg.data_dir).parent)  # type: ignore[arg-type]
    path = tmp_path / "pg_service.conf"
    path.write_text(f"[{name}]\nhost={socket_dir}\nport={pg.port}\nuser={pg.user}\n"
                    f"dbname={db}\n")
    return path


def test_a_locked_table_fails_the_backup_in_time_naming_table_and_holder(
        tmp_path: Path, pg_server: PgServer, lms_dsn: str, holder: psycopg.Connection,
        s3_regions: list[S3Region]) -> None:
    db = dbname(lms_dsn)
    services = service_file(tmp_path, pg_server, "lms", db)
    source = postgres_source("lms-db", "service=lms") + 'lock_wait_timeout = "2s"\n'
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions], [source])
    env = dict(os.environ, PGSERVICEFILE=str(services))
    started = time.monotonic()
    result = subprocess.run([exe("drctl"), "--config", str(setup.config), "backup"],
                            capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert time.monotonic() - started < 60
    out = result.stdout
    assert "lock_wait_timeout (2s)" in out, out
    assert "public.users" in out and f"pid {holder.info.backend_pid}" in out, out
    assert "'nightly-migration'" in out, out
    # The server libpq used, resolved from the service file: the socket folder and port.
    socket_dir = str(Path(pg_server.data_dir).parent)  # type: ignore[arg-type]
    assert f"postgres://{pg_server.user}@/{db}?host={socket_dir}&port={pg_server.port} " \
           "(service lms)" in out, out
    assert "local socket" not in out
    for region in s3_regions:
        assert snapshot_keys(region.client(), region.bucket) == []
    wait_for(lambda: other_backends(pg_server, db, holder.info.backend_pid) == [], 15)
    assert pg_dump_processes(db) == []


def test_sigterm_ends_pg_dump_and_its_sessions_and_records_the_attempt(
        tmp_path: Path, pg_server: PgServer, lms_dsn: str, holder: psycopg.Connection,
        s3_regions: list[S3Region]) -> None:
    db = dbname(lms_dsn)
    # The default lock_wait_timeout (5m) is far longer than this test: pg_dump waits.
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [postgres_source("lms-db", lms_dsn)], daemon='shutdown_grace = "20s"')
    proc = subprocess.Popen([exe("drdaemon"), "--config", str(setup.config), "run"],
                            stderr=subprocess.PIPE, text=True)
    try:
        # The daemon catches up at once: its pg_dump queues behind the lock.
        def pg_dump_waits() -> bool:
            with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
                return conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND "
                    "wait_event_type = 'Lock' AND query LIKE 'LOCK TABLE%%'",
                    (db,)).fetchone()[0] > 0
        wait_for(lambda: pg_dump_waits() or proc.poll() is not None, 60)
        assert proc.poll() is None, proc.communicate()[1]
        assert pg_dump_processes(db)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
        stopped_in = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "exiting anyway" not in err, err
    assert stopped_in < 20, f"took {stopped_in:.1f}s: the grace period ran out"
    assert pg_dump_processes(db) == []
    wait_for(lambda: other_backends(pg_server, db, holder.info.backend_pid) == [], 15)
    outcome = json.loads((setup.state / "sources" / "lms-db.json").read_text())
    assert outcome["last_failure"] and outcome["last_success"] is None
    assert "stopped by shutdown" in outcome["last_error"]
    lines = [json.loads(ln) for ln in err.splitlines() if ln.startswith("{")]
    failed = [ln for ln in lines if ln.get("job") == "snapshot" and ln.get("source") == "lms-db"]
    assert failed and "stopped by shutdown" in failed[0]["error"], err
    for region in s3_regions:
        assert snapshot_keys(region.client(), region.bucket) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_drctl_stopped_while_pg_dump_waits_leaves_no_session_behind(
        tmp_path: Path, pg_server: PgServer, lms_dsn: str, holder: psycopg.Connection,
        s3_regions: list[S3Region], signum: signal.Signals) -> None:
    db = dbname(lms_dsn)
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [postgres_source("lms-db", lms_dsn)])
    proc = subprocess.Popen([exe("drctl"), "--config", str(setup.config), "backup"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: bool(pg_dump_processes(db)) or proc.poll() is not None, 60)
        time.sleep(1)  # pg_dump is now queued behind the lock
        assert proc.poll() is None
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert pg_dump_processes(db) == []
    wait_for(lambda: other_backends(pg_server, db, holder.info.backend_pid) == [], 15)


def test_kill_9_while_pg_dump_waits_leaves_nothing_past_the_lock_wait_timeout(
        tmp_path: Path, pg_server: PgServer, lms_dsn: str, holder: psycopg.Connection,
        s3_regions: list[S3Region]) -> None:
    db = dbname(lms_dsn)
    source = postgres_source("lms-db", lms_dsn) + 'lock_wait_timeout = "3s"\n'
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions], [source])
    proc = subprocess.Popen([exe("drctl"), "--config", str(setup.config), "backup"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: bool(pg_dump_processes(db)) or proc.poll() is not None, 60)
    assert proc.poll() is None
    proc.kill()
    proc.wait()
    # Nobody ends them now; the lock wait timeout does, well before the holder lets go.
    wait_for(lambda: pg_dump_processes(db) == [] and
             other_backends(pg_server, db, holder.info.backend_pid) == [], 20)
