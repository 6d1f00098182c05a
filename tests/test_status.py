"""drctl status tells the truth about every source: RPO, regions, retention, failures."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from conftest import S3Region
from support import directory_source, local_region, make_setup

from drdaemon import config as config_mod
from drdaemon import state
from drdaemon.backup import snapshot
from drdaemon.runtime import open_runtime
from drdaemon.status import evaluate, source_statuses


def setup_two_sources(tmp_path: Path, regions: list[str]):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(name)
    return make_setup(tmp_path, regions, [directory_source("paid-files", tmp_path / "a"),
                                          directory_source("free-files", tmp_path / "b",
                                                           tier="free")])


def local_regions(tmp_path: Path) -> list[str]:
    return [local_region("eu", tmp_path / "r-eu", "europe"),
            local_region("us", tmp_path / "r-us", "north-america")]


def test_evaluate_is_pure_and_names_each_problem(tmp_path: Path) -> None:
    setup = setup_two_sources(tmp_path, local_regions(tmp_path))
    cfg = config_mod.load(setup.config)
    clock_at = datetime(2026, 11, 20, 2, tzinfo=UTC)
    rt = open_runtime(cfg, clock=lambda: clock_at)
    snap = snapshot(rt, cfg.sources[0])
    assert snap.manifest is not None
    m = snap.manifest
    now = m.consistency_time + timedelta(hours=3)
    fresh = evaluate(cfg, cfg.sources[0], [(m, ["eu", "us"])], state.Outcome(), now)
    assert fresh.ok and fresh.retained == 1 and fresh.age == timedelta(hours=3)
    assert fresh.next_run == datetime(2026, 11, 21, 2, tzinfo=UTC)

    late = evaluate(cfg, cfg.sources[0], [(m, ["eu", "us"])], state.Outcome(),
                    m.consistency_time + timedelta(hours=25))
    assert not late.ok and "over the 1d RPO" in late.problems[0]

    degraded = evaluate(cfg, cfg.sources[0], [(m, ["eu"])], state.Outcome(), now)
    assert degraded.problems == ("newest snapshot missing in us",)

    never = evaluate(cfg, cfg.sources[1], [], state.Outcome(), now)
    assert never.problems == ("no snapshot yet",) and never.newest_id is None


def test_status_cli_exit_codes(tmp_path: Path) -> None:
    setup = setup_two_sources(tmp_path, local_regions(tmp_path))
    result = setup.drctl("status", "--json")
    assert result.exit_code == 1  # nothing backed up yet
    doc = json.loads(result.stdout)
    assert not doc["ok"] and [s["problems"] for s in doc["sources"]] == [["no snapshot yet"]] * 2

    assert setup.drctl("backup").exit_code == 0
    result = setup.drctl("status", "--json")
    assert result.exit_code == 0, result.stdout
    doc = json.loads(result.stdout)
    assert all(s["ok"] and s["regions"] == ["eu", "us"] for s in doc["sources"])
    assert {s["tier"]: s["rpo_seconds"] for s in doc["sources"]} == {"paid": 86400,
                                                                      "free": 86400}
    human = setup.drctl("status")
    assert human.exit_code == 0 and human.stdout.count("OK") == 2


def test_status_reports_degraded_region_and_last_failure(tmp_path: Path,
                                                         moto_region_factory) -> None:
    eu: S3Region = moto_region_factory("eu-frankfurt", "eu-central-1", "europe")
    us: S3Region = moto_region_factory("us-virginia", "us-east-1", "north-america")
    setup = setup_two_sources(tmp_path, [eu.toml(), us.toml()])
    us.server.stop()
    setup.drctl("backup", "--source", "paid-files")
    us.server.start()
    (tmp_path / "b" / "f").unlink()
    (tmp_path / "b").rmdir()
    setup.drctl("backup", "--source", "free-files")

    rt = open_runtime(config_mod.load(setup.config))
    statuses, errors = source_statuses(rt)
    assert errors == {}
    paid, free = statuses
    assert paid.problems == ("newest snapshot missing in us-virginia",)
    assert free.last_failure is not None and "does not exist" in (free.last_error or "")
    result = setup.drctl("status")
    assert result.exit_code == 1
    assert "missing in us-virginia" in result.stdout and "last failure" in result.stdout


def test_newest_is_one_rule_for_catch_up_status_and_metrics(tmp_path: Path) -> None:
    import dataclasses

    from hypothesis import given
    from hypothesis import strategies as st

    from drdaemon import catalog

    setup = setup_two_sources(tmp_path, local_regions(tmp_path))
    cfg = config_mod.load(setup.config)
    rt = open_runtime(cfg, clock=lambda: datetime(2026, 11, 20, 2, tzinfo=UTC))
    base = snapshot(rt, cfg.sources[0]).manifest
    assert base is not None
    t0 = base.consistency_time

    @given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 5),
                              st.sampled_from(["0000000a", "0000000b"]), st.booleans()),
                    max_size=12))
    def check(rows: list[tuple[str, int, str, bool]]) -> None:
        entries = []
        for source, hours, suffix, readable in rows:
            at = t0 + timedelta(hours=hours)
            snap_id = f"{at:%Y%m%dT%H%M%SZ}-{suffix}"
            m = dataclasses.replace(base, id=snap_id, source=source, consistency_time=at)
            entries.append(catalog.SnapshotEntry(snap_id, source, m if readable else None,
                                                 ["eu"] if readable else []))
        newest = catalog.newest_by_source(entries)
        for source in ("a", "b"):
            mine = [e for e in entries if e.source == source and e.manifest is not None]
            if not mine:
                assert source not in newest
                continue
            want = max(catalog.newness(e.manifest) for e in mine if e.manifest)
            got = newest[source].manifest
            assert got is not None and catalog.newness(got) == want
            # status judges the same snapshot newest.
            snaps = [(e.manifest, e.regions) for e in mine if e.manifest]
            verdict = evaluate(cfg, cfg.sources[0], snaps, state.Outcome(), t0)
            assert verdict.newest_id == got.id

    check()
