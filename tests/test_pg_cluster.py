"""The postgres-cluster kind (issue 17): a physical snapshot of the whole session server by
pg_basebackup, restored into a new data directory (--to-datadir --start), drilled, and
restored by hand with the break-glass runbook's stock commands."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import PgServer, _unprivileged_user, find_free_port
from old_format import runbook_command, sh
from psycopg import sql
from support import Setup, local_region, make_setup

from drdaemon import layout
from drdaemon.drills.scratch import process_start
from drdaemon.errors import IntegrityError, UsageError
from drdaemon.sources import pg_cluster
from drdaemon.sources.pg_cluster_kind import ClusterSink
from drdaemon.sources.pg_cluster_server import server_user
from drdaemon.sources.tree_extract import HostileEntry

OS_USER = _unprivileged_user().pw_name if os.geteuid() == 0 else None
# Odd text an application stores: accents, a right-to-left mark, emoji, a tab, CJK.
ODD = ["café", "\u200f\u05e9\u05dc\u05d5\u05dd", "emoji \U0001f600", "tab\there", "漢字",
       "back\\slash 'quote'"]
# And a LATIN1 database beside the UTF8 one.
LATIN = ["naïve", "£5 à la carte", "Ærø"]


LATIN_DB = "cluster_latin"


@pytest.fixture(scope="module")
def app_database(pg_server: PgServer) -> Iterator[str]:
    """An application database on the session server, with a table of odd text."""
    name = "cluster_app"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with psycopg.connect(pg_server.dsn(name), autocommit=True) as conn:
        conn.execute("CREATE SCHEMA app; CREATE TABLE app.notes (id int PRIMARY KEY, body text)")
        for i, text in enumerate(ODD):
            conn.execute("INSERT INTO app.notes VALUES (%s, %s)", (i, text))
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(LATIN_DB)))
        conn.execute(sql.SQL("CREATE DATABASE {} ENCODING 'LATIN1' TEMPLATE template0 "
                             "LC_COLLATE 'C' LC_CTYPE 'C'").format(sql.Identifier(LATIN_DB)))
    with psycopg.connect(pg_server.dsn(LATIN_DB), autocommit=True) as conn:
        conn.execute("CREATE SCHEMA app; CREATE TABLE app.notes (id int PRIMARY KEY, body text)")
        for i, text in enumerate(LATIN):
            conn.execute("INSERT INTO app.notes VALUES (%s, %s)", (i, text))
    yield name
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        for db in (name, LATIN_DB):
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(db)))


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A folder the server's unprivileged user can pass through (tmp_path cannot be)."""
    path = Path(tempfile.mkdtemp(prefix="drdaemon-cl-"))
    path.chmod(0o711)
    yield path
    for pid_file in path.rglob("postmaster.pid"):
        stop_cluster(pid_file.parent)
    shutil.rmtree(path, ignore_errors=True)


def cluster_setup(tmp_path: Path, pg: PgServer, extra: str = "", source_extra: str = "",
                  ) -> Setup:
    regions = [local_region("eu-local", tmp_path / "eu", "europe"),
               local_region("us-local", tmp_path / "us", "north-america")]
    os_user = f'os_user = "{OS_USER}"\n' if OS_USER else ""
    source = (f'[[sources]]\nname = "cluster"\nkind = "postgres-cluster"\ntenant = "uni-a"\n'
              f'tier = "paid"\ndsn = "{pg.dsn()}"\n{os_user}{source_extra}')
    return make_setup(tmp_path, regions, [source], extra)


def as_owner(argv: list[str]) -> list[str]:
    if OS_USER is None:
        return argv
    pw = server_user(OS_USER)
    assert pw is not None
    return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups",
            "--", *argv]


def stop_cluster(datadir: Path) -> None:
    pg_ctl = next(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    subprocess.run(as_owner([str(pg_ctl), "stop", "-D", str(datadir), "-m", "fast", "-w"]),
                   capture_output=True, timeout=120, check=False)


def rows(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT id, body FROM app.notes ORDER BY id").fetchall()


def source_facts(pg: PgServer) -> tuple[str, str]:
    with psycopg.connect(pg.dsn()) as conn:
        row = conn.execute("SELECT system_identifier::text, current_setting('server_version') "
                           "FROM pg_control_system()").fetchone()
    assert row is not None
    return row[0], row[1]


def test_round_trip_to_a_started_data_directory_and_by_break_glass(
        pg_server: PgServer, app_database: str, tmp_path: Path, reachable_dir: Path) -> None:
    setup = cluster_setup(tmp_path, pg_server)
    [snap] = setup.drctl_json("backup")
    assert snap["ok"] and snap["regions"] == ["eu-local", "us-local"], snap
    facts = setup.drctl_json("snapshots", "show", snap["snapshot_id"])["facts"]
    system_id, version = source_facts(pg_server)
    assert facts["system_identifier"] == system_id and facts["server_version"] == version
    assert facts["wal_retention"] == "temporary replication slot"
    assert pg_cluster.lsn_value(facts["start_lsn"]) < pg_cluster.lsn_value(facts["end_lsn"])
    assert app_database in {d["name"] for d in facts["databases"]}
    assert all(d["size"] > 0 for d in facts["databases"])
    # The temporary slot went with the backup's session.
    with psycopg.connect(pg_server.dsn()) as conn:
        assert conn.execute("SELECT count(*) FROM pg_replication_slots "
                            "WHERE slot_name LIKE 'drdaemon%'").fetchone() == (0,)

    target = reachable_dir / "restored"
    port = find_free_port()
    out = setup.drctl_json("restore", "latest", "--source", "cluster", "--to-datadir",
                           str(target), "--start", "--port", str(port))
    assert out["target"] == str(target)
    assert any(f"started with pg_ctl on 127.0.0.1:{port}" in n for n in out["notes"])
    st = target.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700
    if OS_USER:
        assert st.st_uid == server_user(OS_USER).pw_uid  # type: ignore[union-attr]
    assert not (target / "recovery.signal").exists()
    restored = f"host=127.0.0.1 port={port} user=postgres dbname={app_database}"
    assert rows(restored) == list(enumerate(ODD))
    assert rows(restored.replace(app_database, LATIN_DB)) == list(enumerate(LATIN))
    assert {LATIN_DB, app_database} <= {d["name"] for d in facts["databases"]}
    with psycopg.connect(restored) as conn:
        row = conn.execute("SELECT system_identifier::text, pg_is_in_recovery(), "
                           "current_setting('archive_mode') FROM pg_control_system()").fetchone()
    assert row == (system_id, False, "off")
    stop_cluster(target)
    server_dies_with_a_killed_drill(target, facts)
    # Beside the target, no staging folder is left.
    assert [p.name for p in reachable_dir.iterdir()] == ["restored"]

    # A non-empty target is refused before anything is read.
    refused = setup.drctl("restore", "latest", "--source", "cluster", "--to-datadir",
                          str(target))
    assert refused.exit_code == 2 and "not an empty folder" in refused.stderr
    refused = setup.drctl("restore", "latest", "--source", "cluster", "--to", str(target))
    assert refused.exit_code == 2 and "give --to-datadir DIR" in refused.stderr
    refused = setup.drctl("restore", "latest", "--source", "cluster", "--to-datadir",
                          str(reachable_dir / "other"), "--port", "5999")
    assert refused.exit_code == 2 and "--start and --port N go together" in refused.stderr

    # Break-glass (runbooks/break-glass-restore.md): stock age, zstd, tar and pg_ctl.
    work = tmp_path / "work"
    work.mkdir()
    region = tmp_path / "us"
    shutil.copy(region / layout.manifest_object_name("cluster", snap["snapshot_id"]),
                work / "manifest.json")
    shutil.copy(region / layout.data_object_name("cluster", snap["snapshot_id"],
                                                 "postgres-cluster"), work / "snapshot.age")
    sh(runbook_command("jq -r") + " > key-name", work)
    shutil.copy(region / (work / "key-name").read_text().strip(), work / "tenant-key.age")
    sh(runbook_command("(umask 077 && age -d", **{"identity.txt": str(setup.identity)}), work)
    glass = reachable_dir / "glass"
    sh(runbook_command("mkdir -m 700 /srv/pg-restored", **{"/srv/pg-restored": str(glass)}),
       work)
    sh(runbook_command("age -d -i tenant.key snapshot.age | zstd -d | tar -C",
                       **{"/srv/pg-restored": str(glass)}), work)
    if OS_USER:
        sh(runbook_command("chown -R postgres:", **{"/srv/pg-restored": str(glass),
                                                    "postgres": OS_USER}), work)
    glass_port = find_free_port()
    start = runbook_command("pg_ctl start", **{"/srv/pg-restored": str(glass),
                                               "5433": str(glass_port)})
    pg_ctl = pg_server.bin("pg_ctl")
    subprocess.run(as_owner(["bash", "-c", start.replace("pg_ctl", str(pg_ctl), 1)]),
                   cwd=work, check=True, timeout=120, capture_output=True)
    try:
        assert rows(f"host=127.0.0.1 port={glass_port} user=postgres "
                    f"dbname={app_database}") == list(enumerate(ODD))
    finally:
        stop_cluster(glass)


# A drill's private server, started by a process that is then killed -9.
KILLED_DRILL = """
import json, sys, time
from pathlib import Path
from drdaemon.sources import pg_cluster_server as srv
server = srv.start_private(Path(sys.argv[1]), srv.server_user(sys.argv[2] or None),
                           json.loads(sys.argv[3]))
print(server.proc.pid, flush=True)
time.sleep(600)
"""


def server_dies_with_a_killed_drill(datadir: Path, facts: dict[str, Any]) -> None:
    """The scratch server of a killed drill stops with it (its parent-death signal), so
    that the next run removes a folder no server uses."""
    child = subprocess.Popen([sys.executable, "-c", KILLED_DRILL, str(datadir), OS_USER or "",
                              json.dumps(facts)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    pid = int(child.stdout.readline())
    assert (datadir / "postmaster.pid").exists()
    child.kill()
    child.wait()
    deadline = time.monotonic() + 60
    while (datadir / "postmaster.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the server's shutdown
    assert not (datadir / "postmaster.pid").exists()
    while process_start(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_start(pid) is None  # gone, or a zombie nobody reaped yet


def test_drill_starts_checks_and_removes_the_scratch_cluster(
        pg_server: PgServer, app_database: str, tmp_path: Path, reachable_dir: Path) -> None:
    scratch = reachable_dir / "scratch"
    scratch.mkdir(mode=0o711)
    checks = (f'[drills]\nscratch_dir = "{scratch}"\n'
              f'[[drills.checks]]\nsource = "cluster"\ndatabase = "{app_database}"\n'
              f'sql = "SELECT count(*) FROM app.notes"\nmin = {len(ODD)}\n'
              f'[[drills.checks]]\nsource = "cluster"\n'
              f'sql = "SELECT count(*) FROM pg_database"\nmin = 3\n')
    setup = cluster_setup(tmp_path, pg_server, checks)
    setup.drctl_json("backup")
    result = setup.drctl("drill", "run", "--json")
    [record] = json.loads(result.stdout)["drills"]
    assert result.exit_code == 0 and record["ok"] and record["verified"], record["reasons"]
    assert record["kind"] == "postgres-cluster" and record["rto_seconds"] > 0
    evidence = record["evidence"]
    assert [c["ok"] for c in evidence["checks"]] == [True, True]
    assert evidence["checks"][0]["value"] == len(ODD)
    assert evidence["system_identifier"] == source_facts(pg_server)[0]
    # The scratch cluster was stopped and removed: nothing listens on its port.
    assert list(scratch.iterdir()) == []
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(f"host=127.0.0.1 port={evidence['port']} user=postgres",
                        connect_timeout=3)


def test_refusals_tablespace_and_wal_keep_size(pg_server: PgServer, tmp_path: Path,
                                               reachable_dir: Path) -> None:
    setup = cluster_setup(tmp_path, pg_server, source_extra='wal_retention = "wal_keep_size"\n')
    [snap] = failed_backup(setup)
    assert not snap["ok"]
    assert "wal_keep_size is 0" in snap["error"], snap["error"]

    location = reachable_dir / "ts"
    location.mkdir()
    if OS_USER:
        pw = server_user(OS_USER)
        assert pw is not None
        os.chown(location, pw.pw_uid, pw.pw_gid)
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLESPACE cluster_far LOCATION {}").format(
            sql.Literal(str(location))))
    try:
        setup = cluster_setup(tmp_path / "b", pg_server)
        [snap] = failed_backup(setup)
    finally:
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            conn.execute("DROP TABLESPACE cluster_far")
    assert not snap["ok"]
    assert "tablespaces outside its data directory" in snap["error"]
    assert f"cluster_far ({location})" in snap["error"]


def failed_backup(setup: Setup) -> Any:
    result = setup.drctl("backup", "--json")
    assert result.exit_code == 1, result.output + result.stderr
    return json.loads(result.stdout)


def hostile_tar(member: tarfile.TarInfo) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        t.addfile(tarfile.TarInfo("PG_VERSION"), io.BytesIO(b""))
        t.addfile(member, io.BytesIO(b"x" * member.size) if member.isreg() else None)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = 1 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize("member", [
    _member("../escape"), _member("/etc/evil"), _member("dev", tarfile.CHRTYPE),
    _member("hard", tarfile.LNKTYPE, "PG_VERSION"), _member("fifo", tarfile.FIFOTYPE),
    _member("pg_wal", tarfile.SYMTYPE, "/etc"),
], ids=["dotdot", "absolute", "device", "hardlink", "fifo", "symlink"])
def test_a_hostile_tar_member_is_refused(tmp_path: Path, member: tarfile.TarInfo) -> None:
    target = tmp_path / "data"
    sink = ClusterSink(target, "20260101T000000Z-00000000", {}, None, 1 << 20)
    try:
        with pytest.raises((BrokenPipeError, HostileEntry)):
            sink.writer.write(hostile_tar(member))
            sink.writer.close()
            sink.complete()
    finally:
        sink.discard()
    assert list(tmp_path.iterdir()) == []


def test_a_copy_that_contradicts_its_facts_is_refused(tmp_path: Path) -> None:
    sink = ClusterSink(tmp_path / "data", "20260101T000000Z-00000000",
                       {"server_version_num": 150000, "start_lsn": "0/2000028"}, None, 1 << 20)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        info = tarfile.TarInfo("PG_VERSION")
        info.size = 3
        t.addfile(info, io.BytesIO(b"14\n"))
    try:
        sink.writer.write(buf.getvalue())
        sink.writer.close()
        with pytest.raises(IntegrityError, match="PG_VERSION is 14"):
            sink.complete()
    finally:
        sink.discard()
    with pytest.raises(UsageError, match="absolute path"):
        ClusterSink(Path("relative"), "x", {}, None, 1)


def test_progress_and_label_parsing() -> None:
    text = ("pg_basebackup: write-ahead log start point: 0/2000028 on timeline 1\n"
            "pg_basebackup: write-ahead log end point: 0/2000100\n")
    assert pg_cluster.parse_progress(text) == {"start_lsn": "0/2000028", "timeline": 1,
                                               "end_lsn": "0/2000100"}
    assert pg_cluster.label_start("START WAL LOCATION: 1/AB (file 00)\n") == "1/AB"
    assert pg_cluster.lsn_value("1/AB") == (1 << 32) + 0xAB
    with pytest.raises(ValueError):
        pg_cluster.lsn_value("1/XY")
