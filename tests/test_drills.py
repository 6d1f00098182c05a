"""Restore drills end to end: real PostgreSQL, moto S3 regions, directories; every failure mode
leaves a record with the right reason and no scratch database or folder behind."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from conftest import PgServer, S3Region
from lms import populate
from support import Setup, directory_source, flip_byte, make_setup, postgres_source, stored_key

from drdaemon import config as config_mod
from drdaemon import facts, layout, manifest
from drdaemon.drills import records as drill_records
from drdaemon.drills import run as drills
from drdaemon.errors import ConfigError
from drdaemon.keys import load_manifest_key
from drdaemon.runtime import open_runtime
from drdaemon.scheduler import Daemon

USERS_CHECK = ('[[drills.checks]]\nsource = "lms-db"\nsql = "SELECT count(*) FROM users"\n'
               'min = 200\n')


@pytest.fixture
def lms_dsn(pg_database: str) -> str:
    populate(pg_database)
    return pg_database


def pg_setup(tmp_path: Path, dsn: str, regions: list[S3Region], extra: str = USERS_CHECK,
             tier: str = "paid") -> Setup:
    return make_setup(tmp_path, [r.toml() for r in regions],
                      [postgres_source("lms-db", dsn, tier=tier)], extra=extra)


def scratch_databases(pg: PgServer) -> list[str]:
    with psycopg.connect(pg.dsn()) as conn:
        return [r[0] for r in conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'drdaemon%'")]


def scratch_left(setup: Setup) -> list[Path]:
    scratch = setup.state / "drills" / "scratch"
    return list(scratch.iterdir()) if scratch.exists() else []


def run_drill(setup: Setup, *args: str) -> tuple[int, dict]:
    result = setup.drctl("drill", "run", *args, "--json")
    return result.exit_code, json.loads(result.stdout)


def result_line(setup: Setup) -> str:
    """`drctl drill list` as people read it: the newest drill's line."""
    return setup.drctl("drill", "list").stdout.splitlines()[-1].split("  ", 1)[1]


def corrupt(region: S3Region, suffix: str) -> None:
    flip_byte(region, stored_key(region, suffix))


def test_postgres_drill_passes_records_and_protects(tmp_path: Path, lms_dsn: str,
                                                   pg_server: PgServer,
                                                   s3_regions: list[S3Region]) -> None:
    setup = pg_setup(tmp_path, lms_dsn, s3_regions)
    [snap] = setup.drctl_json("backup")
    code, out = run_drill(setup)
    [r] = out["drills"]
    assert code == 0 and out["ok"] and r["ok"] and r["verified"], r["reasons"]
    assert r["region"] == "us-virginia"  # not the primary: the copy a lost primary needs
    assert r["snapshot_id"] == snap["snapshot_id"] and r["sha256"] == snap["sha256"]
    assert r["stored_bytes"] == snap["size"] and r["plaintext_bytes"] == snap["plaintext_size"]
    assert r["evidence"]["tables"] == 5 and r["evidence"]["checks"][0]["value"] == 200
    assert r["evidence"]["checks"][0]["ok"] and r["scratch"].startswith("postgres://")
    assert 0 < r["rto_seconds"] < 60 and 0 <= r["rpo_seconds"] < 60
    assert r["throughput_bytes_per_second"] == pytest.approx(r["stored_bytes"] / r["rto_seconds"])
    assert r["projected_tier_rto_seconds"] == pytest.approx(r["rto_seconds"], rel=1e-3)
    assert (r["rto_target_seconds"], r["rpo_target_seconds"]) == (86400, 86400)
    phases = sum(r["timings"][p] for p in drills.PHASES)
    assert phases == pytest.approx(r["rto_seconds"], abs=0.05)
    assert scratch_databases(pg_server) == []

    listed = setup.drctl_json("drill", "list", "--since", "1d")["drills"]
    assert [d["id"] for d in listed] == [r["id"]]
    assert drill_records.newest_verified(setup.state) == {"lms-db": snap["snapshot_id"]}
    # Prune, from the daemon or drctl, never deletes the newest drill-verified snapshot.
    plan = setup.drctl_json("prune", "--dry-run")["regions"]
    for region in plan:
        [verdict] = region["snapshots"]
        assert "protected" in verdict["reasons"]

    report = json.loads(setup.drctl("drill", "report", "--format", "json").stdout)
    assert [d["id"] for d in report["drills"]] == [r["id"]]
    assert report["audit"] is not None, "drdaemon.audit is missing"
    assert report["audit"]["ok"] and report["audit"]["drills_unattested"] == [], report["audit"]
    # drills.jsonl is a convenience copy; the audit log's record is the evidence.
    path = setup.state / "drills" / "drills.jsonl"
    path.write_text(path.read_text().replace('"ok": true', '"ok": false'))
    report = json.loads(setup.drctl("drill", "report", "--format", "json").stdout)
    assert report["audit"]["drills_unattested"] == [r["id"]]
    path.write_text(path.read_text().replace('"ok": false', '"ok": true'))
    html = tmp_path / "report.html"
    assert setup.drctl("drill", "report", "-o", str(html)).exit_code == 0
    assert "<svg" in html.read_text() and r["snapshot_id"] in html.read_text()


def test_directory_drill_passes_then_fails_rpo_later(tmp_path: Path,
                                                    s3_regions: list[S3Region]) -> None:
    tree = tmp_path / "tree"
    (tree / "courses" / "ünï").mkdir(parents=True)
    (tree / "courses" / "ünï" / "notes.md").write_text("# Cells\n" * 500)
    (tree / "empty").mkdir()
    (tree / "link").symlink_to("courses")
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [directory_source("lms-files", tree)])
    setup.drctl_json("backup")
    code, out = run_drill(setup, "--source", "lms-files")
    [r] = out["drills"]
    assert code == 0 and r["ok"], r["reasons"]
    assert (r["evidence"]["files"], r["evidence"]["directories"], r["evidence"]["symlinks"]) \
        == (1, 3, 1)
    assert r["evidence"]["bytes"] == 8 * 500
    assert scratch_left(setup) == []

    # Three days later with no newer snapshot, the same copy restores but is too old.
    cfg = config_mod.load(setup.config)
    now = open_runtime(cfg).clock()
    late = open_runtime(cfg, clock=lambda: now + timedelta(days=3))
    [r] = drills.run_drills(late, region="eu-frankfurt").records
    assert r.region == "eu-frankfurt"
    assert r.verified and not r.ok and r.reason_codes == ["rpo-over-target"], r.reasons
    assert r.rpo_seconds is not None and r.rpo_seconds > 3 * 86400 - 60
    assert scratch_left(setup) == []

    # The daemon's drill job for the tier runs the same service and records its drill.
    daemon = Daemon(open_runtime(cfg))
    [(name, fn)] = [(n, f) for n, _, f in daemon._maintenance() if n.startswith("drill:")]
    daemon.maintenance_job(name, fn)
    assert name == "drill:paid"
    # Oldest first by start time: the "three days later" drill sorts last.
    assert [d.ok for d in drill_records.load_records(setup.state)] == [True, True, False]
    assert scratch_left(setup) == []


def test_corrupt_object_fails_then_other_region_passes(tmp_path: Path, lms_dsn: str,
                                                      pg_server: PgServer,
                                                      s3_regions: list[S3Region]) -> None:
    setup = pg_setup(tmp_path, lms_dsn, s3_regions)
    setup.drctl_json("backup")
    corrupt(s3_regions[1], ".pgdump.zst.age")
    code, out = run_drill(setup)
    [r] = out["drills"]
    assert code == 1 and not r["ok"] and not r["verified"]
    assert r["reason_codes"] == ["corrupt"], r["reasons"]
    assert r["rto_seconds"] is None and r["rpo_seconds"] is not None
    assert scratch_databases(pg_server) == []
    assert drill_records.newest_verified(setup.state) == {}

    code, out = run_drill(setup, "--region", "eu-frankfurt")
    assert code == 0 and out["drills"][0]["region"] == "eu-frankfurt"
    assert scratch_databases(pg_server) == []


def test_lost_region_fails_with_reason(tmp_path: Path, lms_dsn: str, pg_server: PgServer,
                                       s3_regions: list[S3Region],
                                       moto_region_factory: Callable[..., S3Region]) -> None:
    far = moto_region_factory("us-oregon", "us-west-2", "north-america")
    setup = pg_setup(tmp_path, lms_dsn, [s3_regions[0], far])
    setup.drctl_json("backup")
    far.server.stop()
    code, out = run_drill(setup)
    [r] = out["drills"]
    assert code == 1 and r["region"] == "us-oregon"
    assert r["reason_codes"] == ["region-unreachable"], r["reasons"]
    assert r["snapshot_id"] is None and r["rto_seconds"] is None
    assert scratch_databases(pg_server) == []


def test_tampered_counts_fail_every_table_that_differs(tmp_path: Path, lms_dsn: str,
                                                       pg_server: PgServer,
                                                       s3_regions: list[S3Region]) -> None:
    failing = ('[[drills.checks]]\nsource = "lms-db"\n'
               'sql = "SELECT count(*) FROM users WHERE email LIKE \'%@nowhere\'"\n')
    setup = pg_setup(tmp_path, lms_dsn, s3_regions, extra=USERS_CHECK + failing)
    [snap] = setup.drctl_json("backup")
    key = load_manifest_key(setup.manifest_key)
    name = layout.manifest_object_name("lms-db", snap["snapshot_id"])
    for region in s3_regions:
        client = region.client()
        raw = client.get_object(Bucket=region.bucket, Key=name)["Body"].read()
        m = manifest.parse(raw, key)
        assert m.facts_object is not None and "tables" not in m.facts
        stored = client.get_object(Bucket=region.bucket, Key=m.facts_object.name)["Body"].read()
        tables = copy.deepcopy(facts.decode(stored, m)["tables"])
        for t in tables:
            if t["table"] in ("users", "submissions"):
                t["rows"] += 1
        # A consistent forgery: a new facts object, and the manifest re-signed for it.
        enc = facts.encode(m.source, m.id, {"tables": tables})
        client.put_object(Bucket=region.bucket, Key=enc.ref.name, Body=enc.blob)
        forged = manifest.serialize(dataclasses.replace(m, facts_object=enc.ref), key)
        client.put_object(Bucket=region.bucket, Key=name, Body=forged)
    code, out = run_drill(setup)
    [r] = out["drills"]
    assert code == 1 and not r["verified"] and r["rto_seconds"] is None
    assert r["reason_codes"] == ["count-mismatch", "count-mismatch", "check-failed"], \
        r["reasons"]
    assert "public.submissions has 300 rows, the manifest says 301" in r["reasons"][0]
    assert "public.users has 200 rows, the manifest says 201" in r["reasons"][1]
    assert "@nowhere" in r["reasons"][2] and "returned 0, expected at least 1" in r["reasons"][2]
    assert [c["ok"] for c in r["evidence"]["checks"]] == [True, False]
    assert scratch_databases(pg_server) == []


def test_rto_over_target_on_a_verified_copy(tmp_path: Path, lms_dsn: str, pg_server: PgServer,
                                            s3_regions: list[S3Region]) -> None:
    # Verification is part of the RTO: a check that sleeps makes the drill slower than a
    # 1-second target, deterministically.
    extra = ('[tiers.tiny]\nrto = "1s"\nrpo = "24h"\n\n[[drills.checks]]\nsource = "lms-db"\n'
             'sql = "SELECT count(*) FROM pg_sleep(1.2)"\n')
    setup = pg_setup(tmp_path, lms_dsn, s3_regions, extra=extra, tier="tiny")
    setup.drctl_json("backup")
    code, out = run_drill(setup)
    [r] = out["drills"]
    assert code == 1 and r["verified"] and not r["ok"]
    assert r["reason_codes"] == ["rto-over-target", "projected-rto-over-target"], r["reasons"]
    assert r["rto_seconds"] > 1.2 and r["rto_target_seconds"] == 1
    assert r["timings"]["verify"] >= 1.2  # verification is part of the RTO
    assert result_line(setup).startswith("FAIL lms-db (tiny)")
    assert scratch_databases(pg_server) == []


def test_drills_config_and_daemon_jobs(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    regions = [f'[[regions]]\nname = "{n}"\nkind = "local"\ncontinent = "{c}"\n'
               f'path = "{tmp_path / n}"\n' for n, c in (("a", "europe"), ("b", "asia"))]
    sources = [directory_source("files", tree),
               postgres_source("db", "host=127.0.0.1 dbname=x", tier="free")]
    extra = ('[drills]\npostgres_dsn = "host=drill.internal user=drill"\n'
             'schedule = "0 7 * * sun"\nscratch_dir = "scratch"\n'
             '[drills.tiers.paid]\nschedule = "0 6 * * *"\n'
             '[[drills.checks]]\nsource = "db"\nsql = "SELECT 1"\nmin = 0.5\n')
    setup = make_setup(tmp_path, regions, sources, extra=extra)
    cfg = config_mod.load(setup.config)
    assert cfg.drills.postgres_dsn == "host=drill.internal user=drill"
    assert cfg.drills.scratch_dir == tmp_path / "scratch"
    assert cfg.drills.checks[0].min == 0.5
    jobs = {name: expr for name, expr, _ in Daemon(open_runtime(cfg))._maintenance()}
    assert jobs["drill:paid"] == "0 6 * * *" and jobs["drill:free"] == "0 7 * * sun"
    assert drills.default_region(cfg) == "b"

    bad = {
        'postgres_dsn = "host=x password=hunter2"': "drills.postgres_dsn",
        'schedule = "every day"': "drills.schedule",
        '[drills.tiers.gold]\nschedule = "0 6 * * *"': "drills.tiers.gold",
        '[[drills.checks]]\nsource = "files"\nsql = "SELECT 1"': "drills.checks[0].source",
        '[[drills.checks]]\nsource = "db"\nsql = "SELECT 1"\nmin = "one"':
            "drills.checks[0].min",
        'retries = 3': "drills.retries",
    }
    for text, key in bad.items():
        body = setup.config.read_text().split("[drills]")[0]
        setup.config.write_text(body + "[drills]\n" + text + "\n" + "\n".join(regions + sources))
        with pytest.raises(ConfigError) as err:
            config_mod.load(setup.config)
        assert key in str(err.value) and "hunter2" not in str(err.value)


def test_tier_projection_comes_from_every_sources_latest_drill(tmp_path: Path) -> None:
    # A large and a tiny source of one tier, drilled large first: the tier's
    # projection must not be the tiny one's alone (it was, before), and the
    # report, its JSON and the metric must all show the same figure.
    from support import local_region

    from drdaemon import metrics, metrics_feed, slo
    big, small = tmp_path / "big", tmp_path / "small"
    big.mkdir()
    small.mkdir()
    (big / "blob").write_bytes(os.urandom(24 << 20))
    (small / "note").write_text("x")
    setup = make_setup(tmp_path, [local_region("eu", tmp_path / "r-eu", "europe"),
                                  local_region("us", tmp_path / "r-us", "north-america")],
                       [directory_source("big", big), directory_source("small", small)])
    setup.drctl_json("backup")
    _, first = run_drill(setup, "--source", "big")
    _, second = run_drill(setup, "--source", "small")
    [b], [s] = first["drills"], second["drills"]
    model = slo.fit_restore_model([(b["stored_bytes"], b["rto_seconds"]),
                                   (s["stored_bytes"], s["rto_seconds"])])
    want = slo.projected_tier_rto([b["stored_bytes"], s["stored_bytes"]], model)
    assert want is not None and want.total_seconds() >= 0.5 * b["rto_seconds"]
    assert s["projected_tier_rto_seconds"] == pytest.approx(want.total_seconds())
    assert s["restore_model"]["samples"] == 2

    report = json.loads(setup.drctl("drill", "report", "--format", "json").stdout)
    [paid] = report["summary"]
    assert paid["projected"] == pytest.approx(want.total_seconds())
    st = metrics.MetricsState.from_config(config_mod.load(setup.config))
    metrics_feed.refresh(open_runtime(config_mod.load(setup.config)), st)
    assert st.projected_rto["paid"] == pytest.approx(want.total_seconds())
