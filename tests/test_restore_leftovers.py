"""What a killed `drctl restore` leaves (its staging database) is removed by the next restore
onto that server and by the next drill run, with the drill scratch's liveness rules: a real
drctl killed with SIGKILL, real processes as live and dead owners, a real PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from conftest import PgServer
from lms import populate
from support import local_region, make_setup, postgres_source
from test_drill_scratch import (  # noqa: F401 - fixtures
    create_database,
    database_names,
    databases,
    dead_owner,
    drill_json,
    owner_of,
    scratches,
    sleeper,
    wait_for,
)

from drdaemon import audit, audit_chain
from drdaemon.drills import scratch as drill_scratch


def _staging(pg: PgServer) -> list[str]:
    with psycopg.connect(pg.dsn()) as conn:
        return [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'drdaemon\\_restore\\_%'")]


def _connections(pg: PgServer, name: str) -> int:
    with psycopg.connect(pg.dsn()) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                           (name,)).fetchone()
    return int(row[0]) if row else 0


def test_a_killed_restores_staging_goes_at_the_next_restore_and_drill_run(
        tmp_path: Path, pg_database: str, pg_server: PgServer, databases: list[str],  # noqa: F811
        sleeper: Callable[[], subprocess.Popen[bytes]]) -> None:  # noqa: F811
    populate(pg_database)
    setup = make_setup(tmp_path, [local_region("eu", tmp_path / "eu", "europe"),
                                  local_region("us", tmp_path / "us", "north-america")],
                       [postgres_source("lms-db", pg_database)])
    setup.drctl_json("backup")
    databases += ["killed_target", "second_target"]
    before = set(_staging(pg_server))

    # A real `drctl restore`, killed with SIGKILL while pg_restore fills its staging database.
    drctl = Path(sys.executable).parent / "drctl"
    proc = subprocess.Popen([str(drctl), "--config", str(setup.config), "restore", "latest",
                             "--source", "lms-db", "--to", "killed_target"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (made := set(_staging(pg_server)) - before) and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
    [killed] = made
    databases.append(killed)
    assert f"_{drill_scratch.incarnation()}_{proc.pid}_" in killed  # who made it
    # Its pg_restore sees the end of its input and goes; then nobody uses the staging.
    wait_for("pg_restore to end", lambda: _connections(pg_server, killed) == 0, timeout=30)

    # Beside it: a staging of a live restore, and one of a restore killed on another day.
    live = create_database(pg_server, databases,
                           drill_scratch.staging_prefix(owner_of(sleeper())) + "0123456789")
    dead = create_database(pg_server, databases,
                           drill_scratch.staging_prefix(dead_owner(sleeper)) + "abcdef0123")
    unrelated = create_database(pg_server, databases, "drdaemon_restore_0123456789ab")

    result = setup.drctl("restore", "latest", "--source", "lms-db", "--to", "second_target",
                         "--json")
    assert result.exit_code == 0, result.output + result.stderr
    notes = json.loads(result.stdout)["notes"]
    assert any(killed in n and f"pid {proc.pid} on this host" in n
               and "its process has ended" in n for n in notes), notes
    left = database_names(pg_server)
    assert killed not in left and dead not in left and "killed_target" not in left
    assert {live, unrelated, "second_target"} <= left
    events = [r for r in audit_chain.parse_records(audit.read_lines(setup.state))
              if r.get("event") == "restore.staging_removed"]
    assert {e["scratch"].rsplit("/", 1)[-1] for e in events} == {killed, dead}
    assert all(e["kind"] == "restore staging database" for e in events)

    # A drill run removes them too, by the same rules.
    again = create_database(pg_server, databases,
                            drill_scratch.staging_prefix(dead_owner(sleeper)) + "fedcba9876")
    code, out = drill_json(setup)
    assert code == 0, out
    assert scratches(out["scratch"]["removed"]) == {again}
    assert live in scratches(out["scratch"]["kept"])
    assert {live, unrelated} <= database_names(pg_server)
