"""Schemas with thousands of tables (issue 19): a real PostgreSQL database of 12,000 tables
backs up, lists, restores row for row and drills, because per-table row counts live in
the snapshot's facts object rather than in its manifest; and pg_dump running out of lock
slots says which setting to raise."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import PgServer, S3Region, pg_cluster
from psycopg import sql
from support import make_setup, postgres_source

from drdaemon import layout
from drdaemon.sources import postgres

# Long names, as schema-per-institution layouts have: ~120 bytes a table in a version-1
# manifest, so 12,000 tables made one of ~1.4 MB, past the 1 MiB every reader accepts.
CREATE_TABLES = """
DO $$
BEGIN
  FOR i IN {first}..{last} LOOP
    EXECUTE format('CREATE TABLE institution_%s_course_enrolments_archive (id int)',
                   lpad(i::text, 5, '0'));
    IF i % 3 > 0 THEN
      EXECUTE format('INSERT INTO institution_%s_course_enrolments_archive '
                     'SELECT generate_series(1, %s)', lpad(i::text, 5, '0'), i % 3);
    END IF;
  END LOOP;
END $$;
"""


def create_database(server: PgServer, tables: int, batch: int, *,
                    drop: bool = True) -> Iterator[str]:
    """A database of `tables` one-column tables made `batch` per transaction (each holds
    a lock on every table it creates until it commits); dropped afterwards if `drop`."""
    name = f"many_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with psycopg.connect(server.dsn(name), autocommit=True) as conn:
            for first in range(1, tables + 1, batch):
                last = min(first + batch - 1, tables)
                conn.execute(CREATE_TABLES.format(first=first, last=last).encode())
        yield server.dsn(name)
    finally:
        if drop:
            with psycopg.connect(server.dsn(), autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                             .format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def pg_server_many_locks() -> Iterator[PgServer]:
    """A server with room to lock ~50,000 tables at once (512 x ~120 processes): pg_dump
    and the row count each lock every table, and so does the drill's count."""
    with pg_cluster("max_locks_per_transaction = 512\n") as server:
        yield server


@pytest.fixture
def many_tables(pg_server_many_locks: PgServer) -> Iterator[str]:
    # Not dropped: DROP DATABASE of 12,000 tables takes a minute here; the server, which
    # only this test uses, goes with this module.
    yield from create_database(pg_server_many_locks, 12_000, 12_000, drop=False)


@pytest.mark.slow
def test_twelve_thousand_tables_back_up_list_restore_and_drill(
        tmp_path: Path, many_tables: str, pg_server_many_locks: PgServer,
        s3_regions: list[S3Region]) -> None:
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [postgres_source("many", many_tables)])
    [snap] = setup.drctl_json("backup")
    assert snap["ok"] and not snap["degraded"], snap
    snap_id = snap["snapshot_id"]

    # Every reader accepts what the writer committed: listed in both regions, exit 0.
    listed = setup.drctl("snapshots", "list", "--json")
    assert listed.exit_code == 0, listed.output
    [entry] = json.loads(listed.stdout)["snapshots"]
    assert entry["id"] == snap_id and entry["regions"] == [r.name for r in s3_regions]
    assert not entry["problems"] and not entry["unreadable"]

    # The manifest stays small; the counts are in the authenticated facts object.
    for region in s3_regions:
        client = region.client()
        raw = client.get_object(Bucket=region.bucket,
                                Key=layout.manifest_object_name("many", snap_id))["Body"].read()
        assert len(raw) < 4096
        doc = json.loads(raw)
        assert doc["version"] == 3 and "tables" not in doc["facts"]
        assert doc["facts"]["table_count"] == 12_000
        assert doc["facts"]["row_total"] == 12_000  # 4,000 tables each of 0, 1 and 2 rows
        ref = doc["facts_object"]
        head = client.head_object(Bucket=region.bucket, Key=ref["name"])
        assert head["ContentLength"] == ref["size"]

    shown = setup.drctl_json("snapshots", "show", snap_id)
    assert len(shown["facts"]["tables"]) == 12_000

    restored = f"restored_{uuid.uuid4().hex[:8]}"
    result = setup.drctl("restore", "latest", "--source", "many", "--to", restored, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["snapshot_id"] == snap_id
    target = pg_server_many_locks.dsn(restored)  # left to the server's end, as above
    assert postgres.table_counts(target) == postgres.table_counts(many_tables)

    drill = setup.drctl("drill", "run", "--json")
    assert drill.exit_code == 0, drill.output
    [record] = json.loads(drill.stdout)["drills"]
    assert record["verified"] and record["snapshot_id"] == snap_id
    assert record["evidence"]["tables"] == 12_000 and record["evidence"]["rows"] == 12_000


@pytest.fixture(scope="module")
def pg_server_few_locks() -> Iterator[PgServer]:
    """A server with the fewest lock slots PostgreSQL allows (10 x ~120 processes)."""
    with pg_cluster("max_locks_per_transaction = 10\n") as server:
        yield server


@pytest.fixture
def too_many_to_lock(pg_server_few_locks: PgServer) -> Iterator[str]:
    # pg_dump and the row count each lock all 3,000 tables at once.
    yield from create_database(pg_server_few_locks, 3_000, 500)


@pytest.mark.slow
def test_out_of_lock_slots_names_the_setting_and_the_table_count(
        tmp_path: Path, too_many_to_lock: str, s3_regions: list[S3Region]) -> None:
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [postgres_source("many", too_many_to_lock)])
    started = time.monotonic()
    result = setup.drctl("backup", "--json")
    assert result.exit_code == 1
    [snap] = json.loads(result.stdout)
    assert not snap["ok"] and snap["regions"] == []
    error = snap["error"]
    assert "out of shared memory" in error, error
    assert "hint: pg_dump locks all 3000 tables" in error, error
    assert "max_locks_per_transaction (now 10)" in error and "\n" not in error, error
    assert time.monotonic() - started < 60
