"""`drctl recovery plan|run` on the worst day: a region lost in moto, every source restored
onto a fresh database server and folder, paid tiers first, resumable after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import PgServer
from lms import populate
from psycopg import sql
from support import directory_source, make_setup, postgres_source

from drdaemon import config as config_mod
from drdaemon import metrics, metrics_feed
from drdaemon.runtime import open_runtime


def _drctl_process(config: Path, *args: str) -> subprocess.Popen[str]:
    bindir = Path(sys.executable).parent
    return subprocess.Popen([str(bindir / "drctl"), "--config", str(config), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def _wait_for_lines(folder: Path, n: int, proc: subprocess.Popen[str]) -> list[str]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        lines = [ln for f in folder.glob("*.jsonl") for ln in f.read_text().splitlines()] \
            if folder.is_dir() else []
        if len(lines) >= n or proc.poll() is not None:
            return lines
        time.sleep(0.01)
    raise AssertionError("the recovery run recorded nothing in time")


def test_region_lost_recovery_plan_and_run_paid_first_resumable(
        tmp_path: Path, pg_database: str, pg_server: PgServer, moto_region_factory: Any) -> None:
    populate(pg_database)
    free_db = f"test_free_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(free_db)))
    with psycopg.connect(pg_server.dsn(free_db), autocommit=True) as conn:
        conn.execute("CREATE TABLE notes AS SELECT g AS id FROM generate_series(1, 50) g")
    small, big = tmp_path / "small", tmp_path / "big"
    small.mkdir()
    big.mkdir()
    (small / "a.txt").write_text("paid")
    (big / "blob").write_bytes(os.urandom(4 << 20))  # the free tier's slow restore
    eu = moto_region_factory("eu-frankfurt", "eu-central-1", "europe")
    us = moto_region_factory("us-virginia", "us-east-1", "north-america")
    setup = make_setup(tmp_path, [eu.toml(), us.toml()],
                       [postgres_source("lms-db", pg_database, tier="paid"),
                        directory_source("free-files", big, tier="free"),
                        directory_source("paid-files", small, tier="paid"),
                        postgres_source("free-db", pg_server.dsn(free_db), tier="free")])
    try:
        _run(setup, eu, pg_server, tmp_path)
    finally:
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            for name in (free_db, "rec_lms-db", "rec_free-db"):
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                             .format(sql.Identifier(name)))


def _run(setup: Any, eu: Any, pg_server: PgServer, tmp_path: Path) -> None:
    assert setup.drctl("backup").exit_code == 0
    drills = setup.drctl_json("drill", "run")["drills"]
    # The projected RTO of the free tier is its ETA in the plan: after every paid restore.
    plan = json.loads(setup.drctl("recovery", "plan", "--format", "json").stdout)
    order = [s["source"] for s in plan["sources"]]
    assert order == ["paid-files", "lms-db", "free-db", "free-files"], order
    tiers = {t["tier"]: t for t in plan["tiers"]}
    paid_rto = sum(d["rto_seconds"] for d in drills if d["tier"] == "paid")
    assert tiers["free"]["eta"] > tiers["paid"]["eta"] > 0
    last = drills[-1]  # free-db, drilled last: every source's latest drill is known
    assert last["source"] == "free-db"
    # Drill records keep timings to the microsecond; the plan adds up those rounded ones.
    assert last["projected_tier_rto_seconds"] == pytest.approx(tiers["free"]["eta"], abs=1e-3)
    assert last["projected_tier_rto_seconds"] > paid_rto * 0.5  # the paid ones count
    # The daemon exports the same plan's ETAs.
    cfg = config_mod.load(setup.config)
    st = metrics.MetricsState.from_config(cfg)
    metrics_feed.refresh(open_runtime(cfg), st)
    assert st.plan_tier_eta == pytest.approx({t: tiers[t]["eta"] for t in tiers}, abs=1e-3)
    assert set(st.plan_source_eta) == set(order)

    eu.server.stop()  # the primary region is gone
    md = setup.drctl("recovery", "plan", "--lost-region", "eu-frankfurt", "--parallel", "2")
    assert md.exit_code == 0, md.output + md.stderr
    assert "lost regions: eu-frankfurt" in md.stdout and "| paid | yes | 2 |" in md.stdout
    lost = json.loads(setup.drctl("recovery", "plan", "--format", "json").stdout)
    assert lost["lost_regions"] == ["eu-frankfurt"]  # unreachable: counted as lost
    assert {s["region"] for s in lost["sources"]} == {"us-virginia"}

    server = f"host={pg_server.host} port={pg_server.port} user={pg_server.user}"
    to_dir = tmp_path / "restored"
    args = ("recovery", "run", "--to-server", server, "--db-name", "rec_{source}",
            "--to-dir", str(to_dir), "--parallel", "1", "--lost-region", "eu-frankfurt")
    records = setup.state / "recovery"
    proc = _drctl_process(setup.config, *args)
    try:
        first = _wait_for_lines(records, 1, proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert 1 <= len(first) < 4, "the run ended before it could be killed mid-way"

    again = setup.drctl(*args, "--json")
    assert again.exit_code == 0, again.output + again.stderr
    run = json.loads(again.stdout)
    done_before = [json.loads(line)["source"] for line in first]
    assert run["skipped"] == done_before and run["ok"]
    assert not set(done_before) & {d["source"] for d in run["done"]}
    # Paid before free, from the recorded order of every finished restore.
    [record] = list(records.glob("*.jsonl"))
    recorded = [json.loads(line) for line in record.read_text().splitlines()]
    assert [r["source"] for r in recorded] == order
    assert all(r["region"] == "us-virginia" for r in recorded)
    assert [t["restored"] for t in run["summary"]] == [2, 2]
    # Everything restored and verified: the restore service checked each against its
    # manifest; the data is there.
    with psycopg.connect(pg_server.dsn("rec_lms-db")) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (200,)
    with psycopg.connect(pg_server.dsn("rec_free-db")) as conn:
        assert conn.execute("SELECT count(*) FROM notes").fetchone() == (50,)
    assert (to_dir / "paid-files" / "a.txt").read_text() == "paid"
    assert (to_dir / "free-files" / "blob").stat().st_size == 4 << 20
    audit = (setup.state / "audit" / "audit.jsonl").read_text()
    assert '"recovery.started"' in audit and '"recovery.finished"' in audit
