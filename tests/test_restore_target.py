"""The restore's region loop: an unreachable region says so, --region is honoured, a failure
on the target stops at once and says what the target lacks, --no-owner, no password on a
command line, children without storage credentials. Real PostgreSQL, moto regions, real
processes."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from conftest import PgServer, S3Region
from lms import populate, table_rows
from support import directory_source, local_region, make_setup, postgres_source


def drctl(config: Path, *args: str, env: dict[str, str] | None = None,
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "drctl"), "--config", str(config),
                           *args], capture_output=True, text=True, env=env, timeout=300,
                          check=False)


def staging_databases(pg: PgServer) -> list[str]:
    with psycopg.connect(pg.dsn()) as conn:
        return [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'drdaemon_restore_%'")]


def test_an_unreachable_region_says_so_and_region_is_honoured(
        tmp_path: Path, moto_region_factory) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "syllabus.md").write_text("week 1")
    eu = moto_region_factory("eu-frankfurt", "eu-central-1", "europe")
    us = moto_region_factory("us-virginia", "us-east-1", "north-america")
    setup = make_setup(tmp_path, [eu.toml(), us.toml()], [directory_source("files", tree)])
    assert drctl(setup.config, "backup").returncode == 0
    eu.server.stop()

    # Asked for the lost region: it fails, saying why, and restores nothing from the other.
    only_eu = drctl(setup.config, "restore", "latest", "--source", "files", "--to",
                    str(tmp_path / "from-eu"), "--region", "eu-frankfurt")
    assert only_eu.returncode == 1, only_eu.stdout + only_eu.stderr
    assert "from region eu-frankfurt failed: eu-frankfurt: unreachable: " in only_eu.stderr
    assert "does not hold" not in only_eu.stderr
    assert not (tmp_path / "from-eu").exists()

    # Without --region: the other region, and the lost one named as unreachable.
    anywhere = drctl(setup.config, "restore", "latest", "--source", "files", "--to",
                     str(tmp_path / "restored"))
    assert anywhere.returncode == 0, anywhere.stderr
    assert "region eu-frankfurt skipped: unreachable: " in anywhere.stderr, anywhere.stderr
    assert "does not hold this snapshot" not in anywhere.stderr
    assert "from region us-virginia" in anywhere.stdout
    assert (tmp_path / "restored" / "syllabus.md").read_text() == "week 1"


@pytest.fixture
def owned_db(pg_database: str) -> tuple[str, str]:
    """(DSN, role): the LMS schema owned by an application role, which has grants too."""
    role = f"lmsapp_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} NOLOGIN")
    populate(pg_database)
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE users OWNER TO {role}")
        conn.execute(f"GRANT SELECT ON courses TO {role}")
    return pg_database, role


def drop_role(dsn: str, role: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"REASSIGN OWNED BY {role} TO CURRENT_USER")
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")


def test_a_missing_role_stops_at_once_then_no_owner_restores(
        tmp_path: Path, pg_server: PgServer, owned_db: tuple[str, str],
        s3_regions: list[S3Region]) -> None:
    dsn, role = owned_db
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions], [postgres_source("db", dsn)])
    assert drctl(setup.config, "backup").returncode == 0
    expected = table_rows(dsn)
    drop_role(dsn, role)  # the target server no longer has the snapshot's role

    target = "restored_no_owner"
    failed = drctl(setup.config, "restore", "latest", "--source", "db", "--to", target)
    assert failed.returncode == 1, failed.stderr
    err = failed.stderr
    assert "failed on the target, not in region eu-frankfurt" in err, err
    assert f'role "{role}" does not exist' in err and "--no-owner" in err, err
    assert "every region" not in err and "us-virginia" not in err, err
    assert staging_databases(pg_server) == []

    restored = drctl(setup.config, "restore", "latest", "--source", "db", "--to", target,
                     "--no-owner")
    assert restored.returncode == 0, restored.stderr
    assert "no GRANT or REVOKE was applied" in restored.stderr
    assert table_rows(pg_server.dsn(target)) == expected
    with psycopg.connect(pg_server.dsn(target)) as conn:
        owner = conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'users'")
        assert owner.fetchone() == (pg_server.user,)
    assert staging_databases(pg_server) == []


def test_a_target_role_without_createdb_stops_at_once(
        tmp_path: Path, pg_server: PgServer, pg_database: str,
        s3_regions: list[S3Region]) -> None:
    populate(pg_database)
    role = f"nocreate_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN NOCREATEDB")
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [postgres_source("db", pg_database)])
    assert drctl(setup.config, "backup").returncode == 0
    target = f"host={pg_server.host} port={pg_server.port} user={role} dbname=restored_by_role"
    failed = drctl(setup.config, "restore", "latest", "--source", "db", "--to", target)
    assert failed.returncode == 1
    assert "failed on the target" in failed.stderr and "lacks CREATEDB" in failed.stderr
    assert "every region" not in failed.stderr
    assert f"postgres://{role}@{pg_server.host}:{pg_server.port}/" in failed.stderr


@pytest.mark.parametrize("form", ["keywords", "uri"])
def test_a_password_in_the_restore_target_is_refused_and_never_echoed(
        tmp_path: Path, pg_server: PgServer, pg_database: str, form: str) -> None:
    setup = make_setup(tmp_path, [local_region("a", tmp_path / "a", "europe"),
                                  local_region("b", tmp_path / "b", "america")],
                       [postgres_source("db", pg_database)])
    assert drctl(setup.config, "backup").returncode == 0
    secret = "Pl41n-Secret"
    target = (f"host={pg_server.host} port={pg_server.port} user=postgres password={secret} "
              "dbname=restored" if form == "keywords" else
              f"postgresql://postgres:{secret}@{pg_server.host}:{pg_server.port}/restored")
    for extra in ([], ["--jobs", "2"]):
        result = drctl(setup.config, "restore", "latest", "--source", "db", "--to", target,
                       *extra)
        assert result.returncode == 2, result.stderr
        assert "must not contain a password" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert secret not in result.stdout + result.stderr


def test_pg_dump_and_pg_restore_get_no_storage_credentials(
        tmp_path: Path, pg_server: PgServer, pg_database: str,
        s3_regions: list[S3Region]) -> None:
    populate(pg_database)
    seen = tmp_path / "seen"
    seen.mkdir()
    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    for tool in ("pg_dump", "pg_restore"):
        script = wrappers / tool
        script.write_text(f'#!/bin/sh\nenv > "{seen}/{tool}.$$"\n'
                          f'exec "{pg_server.bin(tool)}" "$@"\n')
        script.chmod(0o755)
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [postgres_source("db", pg_database)])
    env = dict(os.environ, PATH=f"{wrappers}:{os.environ['PATH']}",
               AWS_SESSION_TOKEN="session-token-for-s3", PGCONNECT_TIMEOUT="20")
    assert drctl(setup.config, "backup", env=env).returncode == 0
    result = drctl(setup.config, "restore", "latest", "--source", "db", "--to", "env_check",
                   env=env)
    assert result.returncode == 0, result.stderr
    result = drctl(setup.config, "restore", "latest", "--source", "db", "--to", "env_check_j",
                   "--jobs", "2", env=env)
    assert result.returncode == 0, result.stderr
    seen_by = {p.name.split(".")[0]: p.read_text() for p in seen.iterdir()}
    assert set(seen_by) == {"pg_dump", "pg_restore"} and len(list(seen.iterdir())) == 3
    for tool, text in seen_by.items():
        names = {line.split("=", 1)[0] for line in text.splitlines() if "=" in line}
        assert not {n for n in names if n.startswith("AWS_")}, (tool, names)
        assert "session-token-for-s3" not in text and "testing" not in text, tool
        assert "PGCONNECT_TIMEOUT" in names and "PATH" in names, (tool, names)
