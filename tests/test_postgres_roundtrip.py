"""PostgreSQL snapshots end to end: real server, two moto S3 regions, pg_restore."""

from __future__ import annotations

import subprocess
from pathlib import Path

import psycopg
import pytest
from conftest import PgServer, S3Region
from lms import TABLES, populate, table_rows
from old_format import (
    break_glass_fetch,
    break_glass_restore,
    break_glass_unwrap,
    downgrade,
    manifest_version,
    runbook_command,
    sh,
)
from support import Setup, flip_byte, make_setup, postgres_source, snapshot_keys, stored_key


@pytest.fixture
def lms_dsn(pg_database: str) -> str:
    populate(pg_database)
    return pg_database


@pytest.fixture
def setup(tmp_path: Path, lms_dsn: str, s3_regions: list[S3Region]) -> Setup:
    return make_setup(tmp_path, [r.toml() for r in s3_regions],
                      [postgres_source("lms-db", lms_dsn)])


def database_exists(pg: PgServer, name: str) -> bool:
    with psycopg.connect(pg.dsn()) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() \
            is not None


def staging_databases(pg: PgServer) -> list[str]:
    with psycopg.connect(pg.dsn()) as conn:
        return [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'drdaemon_restore_%'")]


def test_backup_records_consistent_facts(setup: Setup, lms_dsn: str) -> None:
    [snap] = setup.drctl_json("backup")
    assert snap["ok"] and not snap["degraded"], snap
    shown = setup.drctl_json("snapshots", "show", snap["snapshot_id"])
    counts = {t["table"]: t["rows"] for t in shown["facts"]["tables"]}
    with psycopg.connect(lms_dsn) as conn:
        for table in TABLES:
            assert counts[table] == conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    assert shown["facts"]["server_version"]
    assert shown["facts"]["database_size"] > 0
    # Server and drdaemon share one clock here: the exported snapshot was taken
    # after the snapshot started and before it finished.
    assert shown["started_at"] <= shown["consistency_time"] <= shown["finished_at"]
    assert shown["data"]["plaintext_size"] > shown["data"]["compressed_size"]


def test_restore_latest_from_each_region(setup: Setup, lms_dsn: str, pg_server: PgServer,
                                         s3_regions: list[S3Region]) -> None:
    setup.drctl_json("backup")
    expected = table_rows(lms_dsn)
    for region in s3_regions:
        name = f"restored_{region.name.replace('-', '_')}"
        out = setup.drctl_json("restore", "latest", "--source", "lms-db", "--to", name,
                               "--region", region.name)
        assert out["region"] == region.name
        assert table_rows(pg_server.dsn(name)) == expected
    assert staging_databases(pg_server) == []


def test_restore_to_dsn_target(setup: Setup, lms_dsn: str, pg_server: PgServer) -> None:
    setup.drctl_json("backup")
    setup.drctl_json("restore", "latest", "--source", "lms-db", "--to",
                     pg_server.dsn("restored_by_dsn"))
    assert table_rows(pg_server.dsn("restored_by_dsn")) == table_rows(lms_dsn)


def test_non_empty_target_refused_unless_forced(setup: Setup, lms_dsn: str,
                                                pg_server: PgServer) -> None:
    setup.drctl_json("backup")
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE busy_target")
    with psycopg.connect(pg_server.dsn("busy_target"), autocommit=True) as conn:
        conn.execute("CREATE TABLE precious (x int); INSERT INTO precious VALUES (42)")
    result = setup.drctl("restore", "latest", "--source", "lms-db", "--to", "busy_target")
    assert result.exit_code == 2
    assert "not empty" in result.stderr and "--force" in result.stderr
    with psycopg.connect(pg_server.dsn("busy_target")) as conn:
        assert conn.execute("SELECT x FROM precious").fetchone() == (42,)

    setup.drctl_json("restore", "latest", "--source", "lms-db", "--to", "busy_target", "--force")
    assert table_rows(pg_server.dsn("busy_target")) == table_rows(lms_dsn)
    assert staging_databases(pg_server) == []


def test_corrupt_object_everywhere_leaves_no_database(setup: Setup, pg_server: PgServer,
                                                      s3_regions: list[S3Region]) -> None:
    [snap] = setup.drctl_json("backup")
    for region in s3_regions:
        # the tail: pg_restore has already consumed most of the dump
        flip_byte(region, stored_key(region, ".pgdump.zst.age"), at=-200)
    result = setup.drctl("restore", snap["snapshot_id"], "--source", "lms-db", "--to", "never")
    assert result.exit_code == 1
    assert "failed in every region" in result.stderr
    assert result.stderr.count("corrupt") == 2, result.stderr  # both copies named corrupt
    assert not database_exists(pg_server, "never")
    assert staging_databases(pg_server) == []


def test_break_glass_with_stock_tools(setup: Setup, lms_dsn: str, pg_server: PgServer,
                                      s3_regions: list[S3Region], tmp_path: Path) -> None:
    """runbooks/break-glass-restore.md on a version-3 snapshot: unwrap the tenant key with
    age and the ops identity, then age | zstd | pg_restore."""
    [snap] = setup.drctl_json("backup")
    region, work = s3_regions[1], tmp_path / "glass"
    work.mkdir()
    break_glass_fetch(region, "lms-db", snap["snapshot_id"], "postgres", work)
    assert manifest_version(work) == 3
    tenant_key = break_glass_unwrap(region, setup.identity, work)
    assert tenant_key.stat().st_mode & 0o777 == 0o600
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE glass")
    break_glass_restore("postgres", tenant_key, work, pg_server.dsn("glass"),
                        str(pg_server.bin("pg_restore")))
    assert table_rows(pg_server.dsn("glass")) == table_rows(lms_dsn)
    # The roles the database names, sealed in the facts object: opened with stock tools.
    region.client().download_file(region.bucket, stored_key(region, ".json.zst"),
                                  str(work / "ID.json.zst"))
    sh(runbook_command("zstd -dc ID.json.zst | jq", **{"tenant.key": str(tenant_key)}), work)
    assert "CREATE ROLE postgres;" in (work / "roles.sql").read_text()  # the database's owner
    # The operator identity alone no longer opens a snapshot: only the tenant key does.
    with pytest.raises(subprocess.CalledProcessError):
        sh(f"age -d -i {setup.identity} snapshot.age > /dev/null", work)


def test_break_glass_old_format_with_old_commands(setup: Setup, lms_dsn: str,
                                                  pg_server: PgServer,
                                                  s3_regions: list[S3Region],
                                                  tmp_path: Path) -> None:
    """A snapshot written before tenant keys (version 1/2) restores with the old commands."""
    [snap] = setup.drctl_json("backup")
    downgrade(setup, "lms-db", snap["snapshot_id"])
    region, work = s3_regions[1], tmp_path / "glass"
    work.mkdir()
    break_glass_fetch(region, "lms-db", snap["snapshot_id"], "postgres", work)
    assert manifest_version(work) == 2
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE glass_old")
    break_glass_restore("postgres", setup.identity, work, pg_server.dsn("glass_old"),
                        str(pg_server.bin("pg_restore")))
    assert table_rows(pg_server.dsn("glass_old")) == table_rows(lms_dsn)


def test_source_down_commits_nothing(tmp_path: Path, pg_server: PgServer,
                                     s3_regions: list[S3Region]) -> None:
    dsn = f"host=127.0.0.1 port={pg_server.port} user={pg_server.user} dbname=no_such_db"
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [postgres_source("lms-db", dsn)])
    result = setup.drctl("backup")
    assert result.exit_code == 1
    assert "FAILED" in result.stdout and "no_such_db" in result.stdout
    for region in s3_regions:
        assert snapshot_keys(region.client(), region.bucket) == []
