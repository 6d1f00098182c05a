"""Residency end to end, on moto regions and a real PostgreSQL: two tenants, one paid with
its data held in Europe (two regions there), one free on two continents.

Each tenant's objects only ever reach its allowed regions: by backup, by `replicate
--repair`, and when the config gains a residency under a running daemon. `--tenant`
selects sources on every command that takes it; `tenant list/show/access` say where the
data is and who touched it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import S3Region
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from support import Setup, directory_source, make_setup, postgres_source

from drdaemon import backup, config, inventory, metrics, metrics_feed, replicate
from drdaemon.runtime import open_runtime
from drdaemon.sources.directory import scan, summarize

TENANTS = ('[[tenants]]\nname = "uni-eu"\ntier = "paid"\n'
           'residency = { continents = ["europe"] }\n\n'
           '[[tenants]]\nname = "college-x"\ntier = "free"\n\n')
EU_ONLY = ("eu-frankfurt", "eu-paris")
ALL = ("eu-frankfurt", "eu-paris", "us-virginia")


def keys(region: S3Region, prefix: str = "sources/") -> list[str]:
    objs = region.client().list_objects_v2(Bucket=region.bucket, Prefix=prefix)
    return [o["Key"] for o in objs.get("Contents", [])]


def nothing_of(region: S3Region, source: str) -> None:
    """No object of `source` in the region, not even an unfinished upload."""
    assert keys(region, f"sources/{source}/") == []
    uploads = region.client().list_multipart_uploads(Bucket=region.bucket).get("Uploads", [])
    assert not [u for u in uploads if f"sources/{source}/" in u["Key"]]


def audit_records(setup: Setup, event: str) -> list[dict[str, Any]]:
    lines = (setup.state / "audit" / "audit.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


@pytest.fixture
def world(tmp_path: Path, s3_regions: list[S3Region], moto_region_factory: Any,
          pg_database: str) -> Iterator[tuple[Setup, dict[str, S3Region]]]:
    eu, us = s3_regions
    paris = moto_region_factory("eu-paris", "eu-west-3", "europe")
    regions = {"eu-frankfurt": eu, "eu-paris": paris, "us-virginia": us}
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE marks (id int PRIMARY KEY, mark int)")
        conn.execute("INSERT INTO marks SELECT g, g % 7 FROM generate_series(1, 500) g")
    files = tmp_path / "college-files"
    (files / "d").mkdir(parents=True)
    (files / "d" / "essay.txt").write_text("college " * 2000)
    db = postgres_source("uni-eu-db", pg_database, tenant="uni-eu")
    setup = make_setup(tmp_path, [eu.toml(), paris.toml(), us.toml()],
                       ["\n".join(line for line in db.splitlines() if not line.startswith("tier")),
                        directory_source("college-files", files, tier="free",
                                         tenant="college-x")],
                       extra=TENANTS)
    yield setup, regions
    # Restores name their databases after the test's own (tests run in one server).
    own = conninfo_to_dict(pg_database)["dbname"]
    with psycopg.connect(pg_database, autocommit=True) as conn:
        for (name,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                    (f"%{own}",)).fetchall():
            if name != own:
                conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(
                    sql.Identifier(name)))


def restored_db(setup: Setup) -> str:
    """A database name unique to this test (see `world`)."""
    dsn = next(line for line in setup.config.read_text().splitlines() if line.startswith("dsn"))
    return "back_" + conninfo_to_dict(dsn.split('"')[1])["dbname"]


def test_each_tenants_objects_reach_only_its_regions(world: tuple[Setup, dict[str, S3Region]],
                                                     tmp_path: Path) -> None:
    setup, regions = world
    out = {r["source"]: r for r in setup.drctl_json("backup")}
    assert out["uni-eu-db"]["regions"] == list(EU_ONLY)
    assert out["college-files"]["regions"] == list(ALL)
    assert not out["uni-eu-db"]["degraded"] and not out["college-files"]["degraded"]
    nothing_of(regions["us-virginia"], "uni-eu-db")
    for name in EU_ONLY:
        assert keys(regions[name], "sources/uni-eu-db/manifests/")
    for name in ALL:
        assert keys(regions[name], "sources/college-files/manifests/")

    # Nothing reports the regions the residency excludes as missing copies.
    status = setup.drctl_json("status")
    by = {s["source"]: s for s in status["sources"]}
    assert status["ok"] and by["uni-eu-db"]["missing_regions"] == []
    assert by["uni-eu-db"]["regions"] == list(EU_ONLY)
    listed = setup.drctl_json("snapshots", "list")
    assert all(e["missing_regions"] == [] for e in listed["snapshots"])
    verify = setup.drctl_json("verify")
    assert verify["ok"] and verify["checked"] == 5  # 2 copies + 3 copies
    rep = setup.drctl_json("replicate")
    assert rep["ok"] and rep["summary"]["copies"] == 5

    # A lost copy in Paris is repaired from Frankfurt; Virginia still gets nothing.
    paris = regions["eu-paris"]
    for key in keys(paris, "sources/uni-eu-db/"):
        paris.client().delete_object(Bucket=paris.bucket, Key=key)
    assert setup.drctl("status").exit_code == 1
    repaired = setup.drctl_json("replicate", "--repair")
    assert [(r["source"], r["region"]) for r in repaired["repairs"]] == [
        ("uni-eu-db", "eu-paris")]
    assert repaired["ok"]
    assert keys(paris, "sources/uni-eu-db/manifests/")
    nothing_of(regions["us-virginia"], "uni-eu-db")
    assert setup.drctl_json("status")["ok"]

    # The tenant's database restores, from one of its own regions.
    name = restored_db(setup)
    restored = setup.drctl_json("restore", "--tenant", "uni-eu", "latest",
                                "--to", "{source}_" + name)
    assert [r["source"] for r in restored] == ["uni-eu-db"]
    assert restored[0]["region"] in EU_ONLY
    assert restored[0]["target"].endswith(f"/uni-eu-db_{name}")


def test_a_residency_added_under_a_running_daemon_binds_it(
        world: tuple[Setup, dict[str, S3Region]]) -> None:
    setup, regions = world
    text = setup.config.read_text()
    # The daemon started before the residency was written: its config lets Europe's
    # data go anywhere, and it made one snapshot everywhere under it.
    setup.config.write_text(text.replace('residency = { continents = ["europe"] }\n', ""))
    rt = open_runtime(config.load(setup.config))
    assert backup.snapshot(rt, rt.config.source("uni-eu-db")).regions == list(ALL)
    us = regions["us-virginia"]
    for key in keys(us, "sources/uni-eu-db/"):
        us.client().delete_object(Bucket=us.bucket, Key=key)
    plan = replicate.observe(rt)
    assert [r.region for r in plan.repairs] == ["us-virginia"]

    setup.config.write_text(text)  # the residency lands; the daemon is not restarted
    outcomes = replicate.execute(rt, plan)
    assert [o.ok for o in outcomes] == [False]
    assert "outside the residency of tenant uni-eu" in (outcomes[0].error or "")
    result = backup.snapshot(rt, rt.config.source("uni-eu-db"))
    assert result.ok and result.regions == list(EU_ONLY)
    assert "outside the residency" in result.failed_regions["us-virginia"]
    nothing_of(us, "uni-eu-db")
    refused = audit_records(setup, "residency.refused")
    assert {r["region"] for r in refused} == {"us-virginia"} and len(refused) == 2
    assert all(r["tenant"] == "uni-eu" and r["user"] and r["host"] for r in refused)


def test_tenant_selects_sources_on_every_command(world: tuple[Setup, dict[str, S3Region]],
                                                 tmp_path: Path) -> None:
    setup, _ = world
    done = setup.drctl_json("backup", "--tenant", "college-x")
    assert [r["source"] for r in done] == ["college-files"]
    listed = setup.drctl_json("snapshots", "list", "--tenant", "college-x")
    assert {e["source"] for e in listed["snapshots"]} == {"college-files"}
    status = setup.drctl_json("status", "--tenant", "college-x")
    assert [s["source"] for s in status["sources"]] == ["college-files"] and status["ok"]
    verify = setup.drctl_json("verify", "--tenant", "college-x")
    assert {c["source"] for c in verify["copies"]} == {"college-files"}
    drill = setup.drctl_json("drill", "run", "--tenant", "college-x")
    assert [d["source"] for d in drill["drills"]] == ["college-files"]
    assert drill["drills"][0]["region"] == "eu-paris"  # its first non-primary region
    target = tmp_path / "restored"
    restored = setup.drctl_json("restore", "latest", "--tenant", "college-x",
                                "--to", f"{target}/{{source}}")
    assert restored[0]["target"] == str(target / "college-files")
    assert summarize(scan(target / "college-files")) == summarize(
        scan(tmp_path / "college-files"))

    for args in (["backup"], ["snapshots", "list"], ["status"], ["verify"],
                 ["drill", "run"], ["restore", "latest", "--to", "x{source}"],
                 ["replicate"]):
        bad = setup.drctl(*args, "--tenant", "nobody")
        assert bad.exit_code == 2, (args, bad.output, bad.stderr)
        assert bad.stderr.count("\n") == 1 and "no tenant named 'nobody'" in bad.stderr
    mixed = setup.drctl("backup", "--tenant", "college-x", "--source", "uni-eu-db")
    assert mixed.exit_code == 2 and "hold no data of tenant 'college-x'" in mixed.stderr
    no_template = setup.drctl("restore", "latest", "--tenant", "college-x", "--to", "/tmp/x")
    assert no_template.exit_code == 2 and "{source}" in no_template.stderr
    folder_for_db = setup.drctl("restore", "latest", "--tenant", "uni-eu", "--to",
                                "/srv/{source}")
    assert folder_for_db.exit_code == 2 and "--to-db" in folder_for_db.stderr


def test_tenant_list_show_and_access(world: tuple[Setup, dict[str, S3Region]]) -> None:
    setup, _ = world
    setup.drctl_json("backup")
    # A departed institution: its source is gone from the config, its data is not.
    text = setup.config.read_text()
    cut = text.index("[[sources]]\nname = \"college-files\"")
    setup.config.write_text(text[:cut].replace(
        '[[tenants]]\nname = "college-x"\ntier = "free"\n\n', ""))
    out = setup.drctl_json("tenant", "list")
    assert [t["tenant"] for t in out["tenants"]] == ["uni-eu"]
    [gone] = out["unmanaged"]
    assert gone["source"] == "college-files" and gone["tenant"] == "college-x"
    assert gone["bytes"] > 0 and set(gone["bytes_by_region"]) == set(ALL)
    assert gone["snapshots"] == 1 and gone["age_seconds"] >= 0
    assert out["unmanaged_tenants"] == ["college-x"]
    human = setup.drctl("tenant", "list")
    assert "UNMANAGED college-files (tenant college-x)" in human.stdout

    # The daemon's "tenants" job hands the same finding to the metrics; the alert
    # compares its age with the erasure window (config/prometheus/alerts_test.yml).
    rt = open_runtime(config.load(setup.config))
    st = metrics.MetricsState.from_config(rt.config)
    metrics_feed.record_inventory(st, inventory.take(rt), rt.config.tenants)
    get = metrics.build_registry(st, rt.clock).get_sample_value
    labels = {"source": "college-files", "tenant": "college-x"}
    assert get("drdaemon_unmanaged_bytes", labels) == gone["bytes"]
    assert get("drdaemon_unmanaged_erase_after_seconds", labels) == 28 * 86400
    newest = get("drdaemon_unmanaged_newest_snapshot_timestamp_seconds", labels)
    assert newest is not None and 0 <= rt.clock().timestamp() - newest < 3600
    assert get("drdaemon_unmanaged_bytes", {"source": "uni-eu-db", "tenant": "uni-eu"}) is None

    show = setup.drctl_json("tenant", "show", "uni-eu")
    assert show["tier"] == "paid" and show["residency"] == {"continents": ["europe"]}
    assert show["regions"] == list(EU_ONLY) and show["continents"] == ["europe"]
    assert show["sources"] == ["uni-eu-db"] and show["snapshots"] == 1
    assert set(show["sections"]) >= {"keys", "lifecycle"}
    departed = setup.drctl_json("tenant", "show", "college-x")
    assert departed["unmanaged_sources"] == ["college-files"]
    assert departed["continents"] == ["europe", "north-america"]
    assert setup.drctl("tenant", "show", "nobody").exit_code == 2

    assert setup.drctl_json("verify", "--tenant", "uni-eu", "--deep")["ok"]
    setup.drctl_json("restore", "latest", "--source", "uni-eu-db", "--to", restored_db(setup))
    access = setup.drctl_json("tenant", "access", "uni-eu", "--since", "1d")
    events = [r["event"] for r in access["records"]]
    # the key made by the first backup; each read of the data unwraps it (tenant_keys.py)
    assert events == ["tenant_key.created", "snapshot.committed", "tenant_key.unwrapped",
                      "verify.finished", "tenant_key.unwrapped", "restore"]
    assert access["log_verified"] and access["records"][3]["deep"]
    assert all(r["user"] and r["host"] for r in access["records"])
    # The departed tenant's records still name it, from the records themselves.
    gone_access = setup.drctl_json("tenant", "access", "college-x")
    assert [r["event"] for r in gone_access["records"]] == ["tenant_key.created",
                                                            "snapshot.committed"]
    assert gone_access["records"][1]["source"] == "college-files"
    assert setup.drctl("tenant", "access", "nobody").exit_code == 2
