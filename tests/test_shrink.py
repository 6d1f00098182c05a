"""The shrink guard: an emptied tree or a collapsed database is refused, not blessed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import psycopg
from hypothesis import given
from hypothesis import strategies as st
from support import directory_source, local_region, make_setup, postgres_source

from drdaemon import config as config_mod
from drdaemon import metrics, shrink
from drdaemon.runtime import open_runtime
from drdaemon.scheduler import Daemon

counts = st.integers(0, 10**12)


@given(counts, counts, counts, counts, st.floats(0, 1))
def test_a_drop_is_refused_exactly_when_it_exceeds_max_shrink(
        files0: int, files1: int, bytes0: int, bytes1: int, max_shrink: float) -> None:
    drops = shrink.sharp_drops("directory", {"files": files0, "bytes": bytes0},
                               {"files": files1, "bytes": bytes1}, max_shrink)
    want = {n for n, a, b in (("files", files0, files1), ("bytes", bytes0, bytes1))
            if max_shrink < 1 and a > 0 and (a - b) / a > max_shrink}
    assert {d.measure for d in drops} == want
    # Growth is never a drop, and neither is a source that was empty before.
    assert not shrink.sharp_drops("directory", {"files": 0}, {"files": files1}, max_shrink)


def test_postgres_measures_read_old_and_new_manifests() -> None:
    inline = {"tables": [{"schema": "s", "table": "t", "rows": 5},
                         {"schema": "s", "table": "u", "rows": 7}], "database_size": 100}
    assert shrink.measures("postgres", inline) == {"rows": 12, "database_size": 100}
    assert shrink.measures("postgres", {"row_total": 3}) == {"rows": 3}
    assert shrink.measures("directory", {"files": True, "bytes": -1}) == {}
    [drop] = shrink.sharp_drops("postgres", inline, {"row_total": 0, "database_size": 90}, 0.5)
    assert str(drop) == "rows 12 -> 0 (-100%)"


def test_emptied_tree_is_refused_until_confirmed(tmp_path: Path) -> None:
    tree = tmp_path / "moodledata"
    (tree / "course").mkdir(parents=True)
    for i in range(20):
        (tree / "course" / f"f{i}.pdf").write_bytes(b"%PDF" * 100)
    setup = make_setup(tmp_path, [local_region("eu", tmp_path / "r-eu", "europe"),
                                  local_region("us", tmp_path / "r-us", "north-america")],
                       [directory_source("files", tree)])
    [good] = setup.drctl_json("backup")
    shutil.rmtree(tree)
    tree.mkdir()  # the volume is not mounted: an empty mount point

    # The daemon's job refuses it, counts it, and status says what dropped.
    rt = open_runtime(config_mod.load(setup.config))
    daemon = Daemon(rt)
    result = daemon.snapshot_job(rt.config.sources[0])
    assert result is not None and not result.ok and result.error_kind == "shrunk"
    assert f"against snapshot {good['snapshot_id']}" in (result.error or "")
    assert "files 20 -> 0 (-100%)" in (result.error or "")
    assert daemon.metrics.snapshot_failures[("files", "shrunk")] == 1
    registry = metrics.build_registry(daemon.metrics, rt.clock)
    assert registry.get_sample_value("drdaemon_snapshot_failures_total", {
        "source": "files", "tenant": "uni-a", "tier": "paid", "reason": "shrunk"}) == 1
    listed = setup.drctl_json("snapshots", "list")["snapshots"]
    assert [s["id"] for s in listed] == [good["snapshot_id"]]  # nothing committed
    status = setup.drctl("status", "--json")
    assert status.exit_code == 1
    assert any("shrank sharply" in p for p in json.loads(status.stdout)["sources"][0]["problems"])

    plain = setup.drctl("backup")
    assert plain.exit_code == 1 and "--accept-shrink" in plain.stdout
    assert setup.drctl("backup", "--accept-shrink").exit_code == 2  # never for every source
    [ok] = setup.drctl_json("backup", "--source", "files", "--accept-shrink")
    assert ok["ok"]
    shown = setup.drctl_json("snapshots", "show", ok["snapshot_id"], "--source", "files")
    facts = shown.get("facts") or shown["manifest"]["facts"]
    assert facts["shrink_accepted"]["against"] == good["snapshot_id"]
    # The confirmed snapshot is the new baseline: the next daily backup is normal.
    assert setup.drctl("backup").exit_code == 0


def test_collapsed_database_is_refused(tmp_path: Path, pg_database: str) -> None:
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE grades (id int, mark int)")
        conn.execute("INSERT INTO grades SELECT g, g % 100 FROM generate_series(1, 5000) g")
    setup = make_setup(tmp_path, [local_region("eu", tmp_path / "r-eu", "europe"),
                                  local_region("us", tmp_path / "r-us", "north-america")],
                       [postgres_source("db", pg_database)])
    assert setup.drctl("backup").exit_code == 0
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute("DELETE FROM grades WHERE id > 100")  # 98 % of the rows gone
    refused = setup.drctl("backup")
    assert refused.exit_code == 1 and "rows 5000 -> 100 (-98%)" in refused.stdout
    # A source configured to swing freely is never refused.
    setup.config.write_text(setup.config.read_text().replace(
        'tier = "paid"\ndsn', 'tier = "paid"\nmax_shrink = 1\ndsn'))
    assert setup.drctl("backup").exit_code == 0
