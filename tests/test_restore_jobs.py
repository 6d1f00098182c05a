"""`drctl restore --jobs N`: parallel pg_restore from a private, verified scratch copy.

Real PostgreSQL, two moto S3 regions; no timing is asserted (speed is bench/'s job).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from conftest import PgServer, S3Region
from lms import populate, table_rows
from support import (
    Setup,
    directory_source,
    flip_byte,
    local_region,
    make_setup,
    postgres_source,
    stored_key,
)

from drdaemon.sources.pg_sink import PostgresSink


@pytest.fixture
def lms_dsn(pg_database: str) -> str:
    populate(pg_database, scale=3)
    return pg_database


@pytest.fixture
def setup(tmp_path: Path, lms_dsn: str, s3_regions: list[S3Region]) -> Setup:
    return make_setup(tmp_path, [r.toml() for r in s3_regions],
                      [postgres_source("lms-db", lms_dsn)])


def databases(pg: PgServer, pattern: str) -> list[str]:
    with psycopg.connect(pg.dsn()) as conn:
        return [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (pattern,))]


def test_jobs_round_trip_removes_scratch_copy(setup: Setup, lms_dsn: str, pg_server: PgServer,
                                              tmp_path: Path) -> None:
    setup.drctl_json("backup")
    scratch = tmp_path / "scratch"
    out = setup.drctl_json("restore", "latest", "--source", "lms-db", "--to", "par",
                           "--jobs", "3", "--scratch-dir", str(scratch))
    assert out["region"] == "eu-frankfurt"
    assert table_rows(pg_server.dsn("par")) == table_rows(lms_dsn)
    assert list(scratch.iterdir()) == []
    assert databases(pg_server, "drdaemon_restore_%") == []


def test_jobs_default_scratch_is_in_state_folder(setup: Setup, lms_dsn: str,
                                                 pg_server: PgServer) -> None:
    setup.drctl_json("backup")
    setup.drctl_json("restore", "latest", "--source", "lms-db", "--to", "par2", "--jobs", "2")
    assert table_rows(pg_server.dsn("par2")) == table_rows(lms_dsn)
    scratch = setup.state / "restore"
    assert scratch.is_dir() and list(scratch.iterdir()) == []
    assert stat.S_IMODE(scratch.stat().st_mode) == 0o700


def test_scratch_copy_is_private_and_discarded(lms_dsn: str, pg_server: PgServer,
                                               tmp_path: Path) -> None:
    sink = PostgresSink(lms_dsn, "never_committed", False, jobs=2, scratch_dir=tmp_path)
    assert sink.dump_fd is not None
    st = os.fstat(sink.dump_fd)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_nlink == 0 and list(tmp_path.iterdir()) == []  # no name anyone could open
    sink.writer.write(b"not yet verified")
    sink.discard()
    assert sink.dump_fd is None
    assert list(tmp_path.iterdir()) == []
    assert databases(pg_server, sink.staging) == []


def test_corrupt_object_leaves_nothing(setup: Setup, pg_server: PgServer,
                                       s3_regions: list[S3Region], tmp_path: Path) -> None:
    [snap] = setup.drctl_json("backup")
    for region in s3_regions:
        # the tail: pg_restore has already consumed most of the dump
        flip_byte(region, stored_key(region, ".pgdump.zst.age"), at=-200)
    scratch = tmp_path / "scratch"
    result = setup.drctl("restore", snap["snapshot_id"], "--source", "lms-db", "--to", "never",
                         "--jobs", "2", "--scratch-dir", str(scratch))
    assert result.exit_code == 1
    assert result.stderr.count("corrupt") == 2, result.stderr
    assert list(scratch.iterdir()) == []
    assert databases(pg_server, "never") == []
    assert databases(pg_server, "drdaemon_restore_%") == []


def test_jobs_on_directory_source_is_a_usage_error(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    setup = make_setup(tmp_path, [local_region("a", tmp_path / "a", "europe"),
                                  local_region("b", tmp_path / "b", "north-america")],
                       [directory_source("files", tree)])
    result = setup.drctl("restore", "latest", "--source", "files", "--to",
                         str(tmp_path / "out"), "--jobs", "2")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "--jobs" in result.stderr, result.stderr
    result = setup.drctl("restore", "latest", "--source", "files", "--to",
                         str(tmp_path / "out"), "--scratch-dir", str(tmp_path))
    assert result.exit_code == 2 and "--scratch-dir" in result.stderr


def test_a_killed_restore_leaves_no_plaintext_in_the_scratch_folder(
        lms_dsn: str, pg_server: PgServer, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    code = ("import sys\nfrom pathlib import Path\n"
            "from drdaemon.sources.pg_sink import PostgresSink\n"
            "sink = PostgresSink(sys.argv[1], 'killed_restore', False, jobs=2,"
            " scratch_dir=Path(sys.argv[2]))\n"
            "sink.writer.write(b'PGDMP' + b'plaintext' * 100000)\n"
            "print(sink.staging, flush=True)\n"
            "sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, lms_dsn, str(scratch)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        staging = proc.stdout.readline().strip()
        assert staging.startswith("drdaemon_restore_")
        fds = Path(f"/proc/{proc.pid}/fd")
        held = [os.readlink(fd) for fd in fds.iterdir()]
        # The copy exists (the test is not void) but under no name in the folder.
        assert any(h.startswith(str(scratch)) and h.endswith("(deleted)") for h in held), held
        assert list(scratch.iterdir()) == []
    finally:
        proc.kill()
        proc.wait()
    assert list(scratch.iterdir()) == []
    # A killed restore still leaves its staging database (not cleaned up yet).
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{staging}"')
