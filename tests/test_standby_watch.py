"""The hot-standby watch against a real streaming replica on loopback (pg_basebackup -R):
streaming and caught up; replay paused while the primary writes, seen as stalled; the
replica stopped, seen as missing, in the metrics and in `drctl status`. And the config."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from conftest import pg_cluster, pg_replica, stop_server
from prometheus_client import CollectorRegistry
from support import Clock, local_region, make_setup, postgres_source

from drdaemon import config as config_mod
from drdaemon import metrics
from drdaemon.errors import ConfigError
from drdaemon.runtime import open_runtime
from drdaemon.scheduler import Daemon
from drdaemon.standby import StandbyStatus


def regions(tmp: Path) -> list[str]:
    return [local_region("eu", tmp / "eu", "europe"),
            local_region("us", tmp / "us", "north-america")]


def sample(daemon: Daemon, name: str, **labels: str) -> float | None:
    registry = CollectorRegistry()
    registry.register(metrics.StateCollector(daemon.metrics, daemon.rt.clock))
    return registry.get_sample_value(name, {"standby": "replica", "source": "", **labels})


def poll_until(daemon: Daemon, ok: object, what: str) -> StandbyStatus:
    deadline = time.monotonic() + 20
    while True:
        [s] = daemon.standby_job()
        if ok(s):  # type: ignore[operator]
            return s
        assert time.monotonic() < deadline, f"never {what}: {s}"
        time.sleep(0.1)


def test_a_real_replica_streams_then_stalls_then_goes_missing(tmp_path: Path) -> None:
    with pg_cluster() as primary, pg_replica(primary) as replica:
        setup = make_setup(tmp_path, regions(tmp_path), [], extra=(
            f'[[standbys]]\nname = "replica"\nprimary_dsn = "{primary.dsn()}"\n'
            f'standby_dsn = "{replica.dsn()}"\nmax_lag = "1m"\nmax_lag_bytes = "1MiB"\n'))
        clock = Clock(datetime.now(UTC))
        daemon = Daemon(open_runtime(config_mod.load(setup.config), clock=clock))
        # Commits flushed at once (the test server has synchronous_commit off), so that
        # "caught up" means this transaction was replayed.
        with psycopg.connect(primary.dsn(), autocommit=True) as conn:
            conn.execute("SET synchronous_commit = on")
            conn.execute("CREATE TABLE marks (n int)")
        s = poll_until(daemon, lambda s: s.streaming and s.lag_bytes == 0, "caught up")
        assert s.up and s.lag_seconds == 0 and not s.paused and s.problems == ()
        assert sample(daemon, "drdaemon_standby_up") == 1
        assert sample(daemon, "drdaemon_standby_replication_state", state="streaming") == 1
        assert sample(daemon, "drdaemon_standby_lag_bytes") == 0
        assert sample(daemon, "drdaemon_standby_max_lag_seconds") == 60

        # Replay paused while the primary writes: WAL arrives, nothing is replayed.
        with psycopg.connect(replica.dsn(), autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_pause()")
        with psycopg.connect(primary.dsn(), autocommit=True) as conn:
            conn.execute("SET synchronous_commit = on")
            conn.execute("INSERT INTO marks SELECT generate_series(1, 50000)")
        first = poll_until(daemon, lambda s: s.paused and s.stalled_since is not None,
                           "waiting to replay")
        assert first.stalled_seconds == 0 and first.lag_bytes and first.lag_bytes > 1 << 20
        clock.now += timedelta(minutes=10)
        [later] = daemon.standby_job()
        assert later.stalled_seconds == 600 and later.lag_seconds is not None
        assert later.lag_seconds > 0
        text = " | ".join(later.problems)
        assert "replay is paused" in text and "replayed nothing for 10m" in text, text
        assert "behind (max 1.0 MiB)" in text, text
        assert sample(daemon, "drdaemon_standby_replay_stalled_seconds") == 600
        assert sample(daemon, "drdaemon_standby_replay_paused") == 1
        with psycopg.connect(replica.dsn(), autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_resume()")
        clock.now += timedelta(seconds=15)
        poll_until(daemon, lambda s: s.lag_bytes == 0 and s.stalled_since is None, "caught up")
        assert sample(daemon, "drdaemon_standby_replay_stalled_seconds") == 0

        # The replica stops: missing, from both ends.
        stop_server(replica)
        gone = poll_until(daemon, lambda s: s.state == "absent", "absent")
        assert not gone.up and gone.lag_bytes is None
        assert "does not answer" in " ".join(gone.problems)
        assert sample(daemon, "drdaemon_standby_up") == 0
        assert sample(daemon, "drdaemon_standby_replication_state", state="absent") == 1
        assert sample(daemon, "drdaemon_standby_lag_bytes") is None
        status = setup.drctl("status", "--json")
        assert status.exit_code == 1
        assert "FAIL standby replica" in setup.drctl("status").stdout


def test_standbys_from_config_and_from_a_source(tmp_path: Path) -> None:
    src = postgres_source("lms", "host=db1 dbname=lms").replace(
        'dsn = "host=db1 dbname=lms"', 'dsn = "host=db1 dbname=lms"\n'
        'standby_dsn = "host=db2 dbname=lms"')

    def load(standby: str) -> config_mod.Config:
        where = tmp_path / str(len(list(tmp_path.iterdir())))
        setup = make_setup(where, regions(tmp_path), [src],
                           extra=f"[[standbys]]\n{standby}\n")
        return config_mod.load(setup.config)

    far, own = load('name = "far"\nsource = "lms"\nstandby_dsn = "host=db3 dbname=lms"\n'
                    'application_name = "far"\nmax_lag_bytes = "16MiB"').standbys
    assert (far.name, far.primary_dsn, far.application_name, far.max_lag_bytes) == (
        "far", "host=db1 dbname=lms", "far", 16 << 20)
    assert (own.name, own.source, own.standby_dsn, own.max_lag) == (
        "lms", "lms", "host=db2 dbname=lms", timedelta(minutes=5))
    for bad, said in (('name = "x"\nsource = "nope"\nstandby_dsn = "host=x"',
                       "standbys[0].source"),
                      ('name = "x"\nsource = "lms"\nprimary_dsn = "host=x"\n'
                       'standby_dsn = "host=x"', "one of the two"),
                      ('name = "x"\nsource = "lms"\nstandby_dsn = "host=x password=s3cret"',
                       "standbys[0].standby_dsn"),
                      ('name = "lms"\nsource = "lms"\nstandby_dsn = "host=x"',
                       "unique standby names")):
        with pytest.raises(ConfigError) as err:
            load(bad)
        assert said in str(err.value) and "s3cret" not in str(err.value), str(err.value)
