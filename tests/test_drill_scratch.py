"""Scratch that killed drills leave behind is removed by the next drill run, and nothing else:
real drctl processes killed with SIGKILL, real processes as live and dead owners, a real
PostgreSQL server and real folders."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import PgServer, S3Region
from lms import populate
from psycopg import sql
from support import Setup, directory_source, make_setup, postgres_source

from drdaemon import audit, audit_chain
from drdaemon import config as config_mod
from drdaemon.drills import scratch as drill_scratch
from drdaemon.drills.scratch import Owner, database_prefix, folder_prefix
from drdaemon.runtime import open_runtime


@pytest.fixture
def sleeper() -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Start real processes that stand for drills (killed at the end if still running)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["sleep", "600"])
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def databases(pg_server: PgServer) -> Iterator[list[str]]:
    """Names of databases a test made; every one still there is dropped afterwards, because
    the server is shared and other tests assert that no drill database is left on it."""
    made: list[str] = []
    yield made
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        for name in made:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


def owner_of(proc: subprocess.Popen[bytes], day: datetime | None = None) -> Owner:
    """The owner a drill running as `proc` puts in its scratch names."""
    start = drill_scratch.process_start(proc.pid)
    assert start is not None
    day = day or datetime.now(UTC)
    return Owner(day.date(), drill_scratch.incarnation(), proc.pid, start)


def dead_owner(start: Callable[[], subprocess.Popen[bytes]]) -> Owner:
    """A process that made scratch and was then killed with SIGKILL."""
    proc = start()
    owner = owner_of(proc)
    proc.kill()
    proc.wait()
    return owner


def other_incarnation() -> str:
    """An incarnation that is not this host's (another host, boot or container)."""
    return "00000000" if drill_scratch.incarnation() != "00000000" else "11111111"


def create_database(pg: PgServer, made: list[str], name: str) -> str:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    made.append(name)
    return name


def database_names(pg: PgServer) -> set[str]:
    with psycopg.connect(pg.dsn()) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database")}


def removal_events(setup: Setup) -> list[dict[str, Any]]:
    return [r for r in audit_chain.parse_records(audit.read_lines(setup.state))
            if r.get("event") == "drill.scratch_removed"]


def drill_json(setup: Setup, *args: str) -> tuple[int, dict[str, Any]]:
    result = setup.drctl("drill", "run", *args, "--json")
    return result.exit_code, json.loads(result.stdout)


def scratches(items: list[dict[str, Any]]) -> set[str]:
    return {x["scratch"].rsplit("/", 1)[-1] for x in items}


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := probe():
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_drill_database_is_removed_by_the_next_run(
        tmp_path: Path, pg_database: str, pg_server: PgServer, s3_regions: list[S3Region],
        databases: list[str]) -> None:
    populate(pg_database)
    slow = ('[[drills.checks]]\nsource = "lms-db"\n'
            'sql = "SELECT count(*) FROM pg_sleep(600)"\n')
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [postgres_source("lms-db", pg_database)], extra=slow)
    setup.drctl_json("backup")
    # A real `drctl drill run`, killed with SIGKILL while it verifies its scratch copy.
    drctl = Path(sys.executable).parent / "drctl"
    proc = subprocess.Popen([str(drctl), "--config", str(setup.config), "drill", "run"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def sleeping() -> tuple[str, int] | None:
            with psycopg.connect(pg_server.dsn()) as conn:
                row = conn.execute(
                    "SELECT datname, pid FROM pg_stat_activity WHERE datname LIKE "
                    "'drdaemon\\_drill\\_%' AND query LIKE '%pg_sleep%'").fetchone()
            return (row[0], row[1]) if row else None

        name, backend = wait_for("the drill's check", sleeping)
        databases.append(name)
    finally:
        proc.kill()
        proc.wait()
    assert f"_{drill_scratch.incarnation()}_{proc.pid}_" in name  # who made it
    setup.config.write_text(setup.config.read_text().replace(slow, ""))

    # The server has not noticed yet: its backend still sleeps in the scratch database.
    code, out = drill_json(setup)
    assert code == 0 and out["ok"], out
    [kept] = out["scratch"]["kept"]
    assert kept["scratch"].endswith("/" + name) and kept["kind"] == "database"
    assert kept["owner"] == f"pid {proc.pid} on this host"
    assert "its process has ended, but 1 connection(s) to it are open" in kept["reason"]
    assert out["scratch"]["removed"] == [] and name in database_names(pg_server)

    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (backend,))
    wait_for("the backend to end", lambda: sleeping() is None, timeout=30)
    code, out = drill_json(setup)
    assert code == 0 and out["ok"], out
    [removed] = out["scratch"]["removed"]
    assert removed == {"kind": "database", "scratch": kept["scratch"],
                       "owner": f"pid {proc.pid} on this host",
                       "reason": "its process has ended"}
    assert out["scratch"]["kept"] == [] and out["scratch"]["errors"] == []
    assert not {n for n in database_names(pg_server) if n.startswith("drdaemon_drill_")}
    [event] = removal_events(setup)
    assert {k: event[k] for k in removed} == removed
    assert setup.drctl_json("audit", "verify")["ok"]


def test_scratch_folders_of_dead_drills_go_live_and_unrelated_ones_stay(
        tmp_path: Path, s3_regions: list[S3Region],
        sleeper: Callable[[], subprocess.Popen[bytes]]) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "notes.md").write_text("# Cells\n")
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [directory_source("lms-files", tree)])
    setup.drctl_json("backup")
    root = setup.state / "drills" / "scratch"
    root.mkdir(parents=True)
    now = datetime.now(UTC)
    old = (now - timedelta(days=10)).timestamp()

    def drill_folder(owner: Owner, suffix: str = "k3j4h5g6") -> Path:
        """A folder as a directory drill leaves it: its staging folder, partly extracted."""
        folder = root / (folder_prefix(owner, "lms-files") + suffix)
        staging = folder / ".tree.drdaemon-20261123T020000Z-1a2b3c4d-a1b2c3.partial"
        (staging / "courses").mkdir(parents=True)
        (staging / "courses" / "notes.md").write_text("restored plaintext\n")
        (staging / "courses").chmod(0o500)  # as a restored tree may have it
        return folder

    other = other_incarnation()
    dead = drill_folder(dead_owner(sleeper))
    live = drill_folder(owner_of(sleeper()))
    elsewhere_old = drill_folder(Owner((now - timedelta(days=10)).date(), other, 4242, 99))
    elsewhere_new = drill_folder(Owner(now.date(), other, 4242, 99))
    legacy = root / "drdaemon-drill-lms-files-x9y8z7w6"  # an earlier version's name
    (legacy / ".tree.drdaemon-20261123T020000Z-1a2b3c4d-a1b2c3.partial").mkdir(parents=True)
    os.utime(legacy, (old, old))

    # Similar names that are not a drill's scratch, all old enough.
    unrelated = [root / "drdaemon-drill-notes", root / "drdaemon-drills-lms-files-x9y8z7w6",
                 root / "drdaemon-drill-lms-files-x9y8z7w6-copy"]
    for folder in unrelated:
        folder.mkdir()
    mine = root / "drdaemon-drill-lms-files-20261123"  # legacy-like name, a person's files
    mine.mkdir()
    (mine / "important.txt").write_text("keep me\n")
    as_file = root / (folder_prefix(dead_owner(sleeper), "lms-files") + "f1l3f1l3")
    as_file.write_text("a file, not a folder\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data.txt").write_text("outside the scratch folder\n")
    link = root / (folder_prefix(dead_owner(sleeper), "lms-files") + "l1nkl1nk")
    link.symlink_to(elsewhere)
    for path in [*unrelated, mine, as_file]:
        os.utime(path, (old, old))

    code, out = drill_json(setup)
    assert code == 0 and out["ok"], out
    removed = {Path(x["scratch"]): x for x in out["scratch"]["removed"]}
    kept = {Path(x["scratch"]): x for x in out["scratch"]["kept"]}
    assert set(removed) == {dead, elsewhere_old, legacy}, out["scratch"]
    assert set(kept) == {live, elsewhere_new}, out["scratch"]
    assert removed[dead]["reason"] == "its process has ended"
    assert "more than 4d ago" in removed[elsewhere_old]["reason"]
    assert removed[elsewhere_old]["owner"] == f"another host, boot or container ({other})"
    assert removed[legacy]["owner"] == "unknown (a name of an earlier version)"
    assert kept[live]["reason"] == "its process is running"
    assert "kept until it is 4d old" in kept[elsewhere_new]["reason"]
    left = set(root.iterdir())
    assert left == {live, elsewhere_new, *unrelated, mine, as_file, link}
    assert (elsewhere / "data.txt").exists() and (mine / "important.txt").exists()
    assert {e["scratch"] for e in removal_events(setup)} == {str(p) for p in removed}
    # The drill's own scratch folder, named after this process, is gone as always.
    assert all(not p.name.startswith(folder_prefix(drill_scratch.this_process(now),
                                                   "lms-files")) for p in left)


def test_scratch_databases_in_use_or_unrelated_stay(
        tmp_path: Path, pg_database: str, pg_server: PgServer, s3_regions: list[S3Region],
        databases: list[str], sleeper: Callable[[], subprocess.Popen[bytes]]) -> None:
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [postgres_source("lms-db", pg_database)])
    setup.drctl_json("backup")
    now = datetime.now(UTC)
    other = other_incarnation()

    def scratch(owner: Owner, suffix: str = "0123456789ab") -> str:
        return create_database(pg_server, databases, database_prefix(owner) + suffix)

    dead = scratch(dead_owner(sleeper))
    live = scratch(owner_of(sleeper()))
    connected = scratch(dead_owner(sleeper))
    elsewhere_old = scratch(Owner((now - timedelta(days=10)).date(), other, 4242, 99))
    elsewhere_new = scratch(Owner(now.date(), other, 4242, 99))
    this = drill_scratch.this_process(now)
    mine = scratch(this)
    legacy = create_database(pg_server, databases, "drdaemon_drill_0123456789ab")
    token = f"260101_{other}_1_1"
    unrelated = [create_database(pg_server, databases, n) for n in (
        "drdaemon_drill_notes", f"drdaemon_drills_{token}_0123456789ab",
        f"drdaemon_drill_{token}_0123456789abcd", "drdaemon_restore_0123456789ab",
        f"drdaemon_drill_261399_{other}_1_1_0123456789ab", f"x_drdaemon_drill_{token}_0")]

    rt = open_runtime(config_mod.load(setup.config))
    # While this process runs a drill, its own scratch is in use.
    drill_scratch.begin_use()
    try:
        with psycopg.connect(pg_server.dsn(connected)):
            cleanup = drill_scratch.clean_leftovers(rt, rt.config.sources)
    finally:
        drill_scratch.end_use()
    assert scratches([x.to_dict() for x in cleanup.removed]) == {dead, elsewhere_old}
    kept = {x.scratch.rsplit("/", 1)[-1]: x for x in cleanup.kept}
    assert set(kept) == {live, connected, elsewhere_new, mine, legacy}
    assert kept[mine].reason == "this process is running a drill"
    assert kept[mine].owner == f"this process (pid {os.getpid()})"
    assert kept[live].reason == "its process is running"
    assert kept[connected].reason == "its process has ended, but 1 connection(s) to it are open"
    assert "drop it by hand" in kept[legacy].reason

    # The next drill run: the connection is closed and this process runs no drill before it.
    code, out = drill_json(setup)
    assert code == 0 and out["ok"], out
    assert scratches(out["scratch"]["removed"]) == {connected, mine}
    assert scratches(out["scratch"]["kept"]) == {live, elsewhere_new, legacy}
    left = {n for n in database_names(pg_server) if "drdaemon" in n}
    assert left == {live, elsewhere_new, legacy, *unrelated}
    assert len(removal_events(setup)) == 4


def test_reused_pids_and_zombies_are_not_taken_for_the_owner(
        sleeper: Callable[[], subprocess.Popen[bytes]]) -> None:
    now = datetime.now(UTC)
    here = drill_scratch.this_process(now)
    proc = sleeper()
    owner = owner_of(proc)
    running = drill_scratch.process_start(proc.pid)
    assert drill_scratch.judge(owner, here, running, False, now, timedelta(days=2))[0] is False
    # The same pid, started at another time, is another process.
    reused = dataclasses.replace(owner, start=owner.start - 1)
    assert drill_scratch.judge(reused, here, running, False, now, timedelta(days=2)) == (
        True, f"pid {proc.pid} on this host", "its process has ended")
    # Killed but not yet reaped: a zombie holds nothing.
    proc.kill()
    wait_for("the zombie", lambda: drill_scratch.process_start(proc.pid) is None, timeout=30)
    proc.wait()
    # Whose process cannot be checked: by age, against twice the slowest tier's RTO.
    far = dataclasses.replace(owner, incarnation=other_incarnation(),
                              day=(now - timedelta(days=3)).date())
    assert drill_scratch.judge(far, here, None, False, now, timedelta(days=2))[0] is True
    assert drill_scratch.judge(far, here, None, False, now, timedelta(days=4))[0] is False
