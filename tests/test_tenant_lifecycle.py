"""Offboarding, legal holds and the erasure deadline with real parts: local and moto regions
(with Object Lock), the real daemon's scheduler code, the runtime's faked clock."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result
from conftest import S3Region
from support import directory_source, local_region, make_setup

from drdaemon import backup, catalog, lifecycle, metrics
from drdaemon import config as config_mod
from drdaemon.cli.drctl import cli as drctl_cli
from drdaemon.lifecycle import Erasure, Hold, TenantState
from drdaemon.runtime import Runtime, open_runtime
from drdaemon.scheduler import Daemon, due_sources

T0 = datetime(2031, 3, 1, 2, 0, tzinfo=UTC)
DAY = timedelta(days=1)


@dataclasses.dataclass
class World:
    config: Path
    rt: Runtime
    time: list[datetime]  # [now]: the runtime's clock reads it, the test moves it

    def clock(self) -> datetime:
        return self.time[0]

    def drctl(self, *args: str) -> Result:
        return CliRunner().invoke(drctl_cli, ["--config", str(self.config), *args],
                                  obj={"runtime": self.rt}, catch_exceptions=False)

    def json(self, *args: str, code: int = 0) -> Any:
        result = self.drctl(*args, "--json")
        assert result.exit_code == code, result.output + result.stderr
        return json.loads(result.stdout)

    def listed(self, source: str) -> list[str]:
        return sorted(e.id for e in catalog.list_snapshots(self.rt, source).snapshots
                      if e.manifest is not None)

    def events(self, kind: str) -> list[dict[str, Any]]:
        path = self.rt.config.daemon.state_dir / "audit" / "audit.jsonl"
        return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == kind]


def make_world(tmp_path: Path, regions: list[str], days: int = 1, retention: str = "",
               extra: str = "") -> World:
    """Sources files-a, db-a (tenant uni-a) and files-b (uni-b), snapshotted daily from T0."""
    sources = []
    for name, tenant in (("files-a", "uni-a"), ("docs-a", "uni-a"), ("files-b", "uni-b")):
        tree = tmp_path / name
        tree.mkdir()
        (tree / "notes.md").write_text(f"# {name}\n" * 50)
        sources.append(directory_source(name, tree, tenant=tenant) + retention)
    setup = make_setup(tmp_path, regions, sources, extra)
    time = [T0]
    rt = open_runtime(config_mod.load(setup.config), clock=lambda: time[0])
    for i in range(days):
        time[0] = T0 + i * DAY
        for src in rt.config.sources:
            assert backup.snapshot(rt, src).ok
    time[0] += timedelta(hours=2)
    return World(setup.config, rt, time)


def local_regions(tmp_path: Path) -> list[str]:
    return [local_region("eu", tmp_path / "eu", "europe"),
            local_region("us", tmp_path / "us", "north-america")]


def test_offboard_takes_final_snapshots_stops_scheduling_and_survives_a_restart(
        tmp_path: Path) -> None:
    w = make_world(tmp_path, local_regions(tmp_path))
    before = {s: w.listed(s) for s in ("files-a", "docs-a", "files-b")}
    w.time[0] = T0 + 2 * DAY
    end = (T0 + DAY).date()  # 2031-03-02: newer than the snapshots of 2031-03-01

    out = w.json("tenant", "offboard", "uni-a", "--end", end.isoformat())
    assert out["state"] == "offboarded" and out["end"] == "2031-03-02"
    assert out["erase_due"] == "2031-03-30T00:00:00+00:00" and out["final_snapshot_done"]
    finals = {f["source"]: f for f in out["final_snapshots"]}
    assert set(finals) == {"files-a", "docs-a"} and all(f["taken"] for f in finals.values())
    for s in ("files-a", "docs-a"):
        assert w.listed(s) == sorted([*before[s], finals[s]["snapshot_id"]])
    assert w.listed("files-b") == before["files-b"]
    [event] = w.events("tenant.offboard")
    assert event["tenant"] == "uni-a" and event["erase_due"] == "2031-03-30T00:00:00Z"
    # `tenant show` carries the lifecycle and the keys the snapshots are encrypted to.
    show = w.json("tenant", "show", "uni-a")
    assert show["sections"]["lifecycle"]["state"] == "offboarded"
    keys = show["sections"]["keys"]
    [key] = keys["keys"]
    assert keys["in_use"] == key["key_id"] and key["fingerprint"]
    assert key["wrapped_copies"] == sorted(["eu", "us", "the state folder"])
    assert w.json("tenant", "show", "uni-b")["sections"]["lifecycle"] is None  # active

    # The same end again: nothing new. Another end: refused, unless --force.
    again = w.json("tenant", "offboard", "uni-a", "--end", end.isoformat())
    assert again["unchanged"] and again["final_snapshots"] == []
    refused = w.drctl("tenant", "offboard", "uni-a", "--end", "2031-03-01")
    assert refused.exit_code == 2
    assert "was offboarded with end 2031-03-02; --force" in refused.stderr
    forced = w.json("tenant", "offboard", "uni-a", "--end", "2031-03-01", "--force")
    assert forced["erase_due"] == "2031-03-29T00:00:00+00:00"
    assert [f["taken"] for f in forced["final_snapshots"]] == [False, False]
    assert len(w.events("tenant.offboard")) == 2

    # A new runtime (a restart) reads the same state; the real daemon code skips
    # the tenant's sources however overdue they are, and snapshots the others.
    w.time[0] = T0 + 30 * DAY
    rt = open_runtime(config_mod.load(w.config), clock=w.clock)
    state = lifecycle.load(rt, "uni-a")
    assert state.end == date(2031, 3, 1) and state.final_snapshot_done
    assert [s.name for s in due_sources(rt, w.clock())] == ["files-b"]
    daemon = Daemon(rt)
    assert daemon.snapshot_job(rt.config.source("files-a")) is None
    assert len(w.listed("files-a")) == 2
    result = daemon.snapshot_job(rt.config.source("files-b"))
    assert result is not None and result.ok


def test_offboard_refuses_bad_requests_and_changes_nothing(tmp_path: Path) -> None:
    w = make_world(tmp_path, local_regions(tmp_path))
    cases = [
        (["uni-a", "--end", "2031-03-05"], "is in the future"),
        (["uni-a", "--end", "March"], "expected a date like"),
        (["uni-z", "--end", "2031-03-01"], "no source of tenant 'uni-z'"),
        (["uni-a", "--end", "2031-03-01", "--recipient", "age1" + "q" * 58],
         "--recipient needs --return-to"),
        (["uni-a", "--end", "2031-03-01", "--return-to", str(tmp_path / "files-a")],
         "exists and is not an empty folder"),
        (["uni-a", "--end", "2031-03-01", "--return-to", str(tmp_path / "copy"),
          "--recipient", "age1nope"], "--recipient"),
    ]
    for args, message in cases:
        result = w.drctl("tenant", "offboard", *args)
        assert result.exit_code == 2, result.output
        assert message in result.stderr and len(result.stderr.splitlines()) == 1
    assert lifecycle.recorded_tenants(w.rt) == []
    assert len(w.listed("files-a")) == 1


def test_offboard_writes_the_return_copy_from_the_final_snapshots(tmp_path: Path) -> None:
    w = make_world(tmp_path, local_regions(tmp_path))
    w.time[0] = T0 + 2 * DAY
    (tmp_path / "files-a" / "last.md").write_text("written on the last day\n")
    copy = tmp_path / "return-copy"
    out = w.json("tenant", "offboard", "uni-a", "--end", "2031-03-02", "--return-to", str(copy))
    finals = {f["source"]: f["snapshot_id"] for f in out["final_snapshots"]}
    exported = {s["source"]: s["snapshot_id"] for s in out["return_copy"]["sources"]}
    assert exported == finals  # the copy is made from the final snapshots
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=copy, capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    listing = subprocess.run(["tar", "-tf", str(copy / "files-a.tar")], capture_output=True,
                             text=True, check=True).stdout
    assert "last.md" in listing
    [event] = w.events("tenant.export")
    assert event["tenant"] == "uni-a"


def test_the_deadline_is_the_tenants_own_erase_after(tmp_path: Path) -> None:
    w = make_world(tmp_path, local_regions(tmp_path),
                   extra='[[tenants]]\nname = "uni-a"\ntier = "paid"\nerase_after = 14\n')
    w.time[0] = T0 + 2 * DAY
    out = w.json("tenant", "offboard", "uni-a", "--end", "2031-03-02")
    assert out["erase_due"] == "2031-03-16T00:00:00+00:00"  # 14 days, not the default 28
    other = w.json("tenant", "offboard", "uni-b", "--end", "2031-03-02")
    assert other["erase_due"] == "2031-03-30T00:00:00+00:00"  # an implicit tenant: 28


def test_a_failed_final_snapshot_exits_1_and_running_again_finishes_it(tmp_path: Path) -> None:
    w = make_world(tmp_path, local_regions(tmp_path))
    w.time[0] = T0 + 2 * DAY
    hidden = tmp_path / "docs-a.away"
    (tmp_path / "docs-a").rename(hidden)  # the source is gone: its snapshot fails
    out = w.json("tenant", "offboard", "uni-a", "--end", "2031-03-02", code=1)
    assert not out["ok"] and not out["final_snapshot_done"]
    failed = {f["source"]: f["error"] for f in out["final_snapshots"]}
    assert failed["files-a"] is None and failed["docs-a"]
    # Recorded all the same: the deadline runs and the daemon no longer schedules them.
    assert lifecycle.load(w.rt, "uni-a").erase_due == datetime(2031, 3, 30, tzinfo=UTC)
    assert [s.name for s in due_sources(w.rt, T0 + 9 * DAY)] == ["files-b"]

    hidden.rename(tmp_path / "docs-a")
    again = w.json("tenant", "offboard", "uni-a", "--end", "2031-03-02")
    assert again["ok"] and again["final_snapshot_done"] and again["unchanged"]
    taken = {f["source"]: f["taken"] for f in again["final_snapshots"]}
    assert taken == {"files-a": False, "docs-a": True}  # files-a's final one is newer than the end
    assert len(w.listed("files-a")) == 2 and len(w.listed("docs-a")) == 2


def test_a_hold_without_object_lock_is_recorded_and_said(tmp_path: Path) -> None:
    w = make_world(tmp_path, local_regions(tmp_path))
    result = w.drctl("tenant", "hold", "uni-a", "--reason", "court order 2031/17")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("legal hold not supported (no Object Lock); hold recorded "
                               "only in drdaemon") == 2
    assert lifecycle.is_held(w.rt, "uni-a")
    [event] = w.events("tenant.hold")
    assert event["reason"] == "court order 2031/17" and event["user"] and event["host"]
    assert w.drctl("tenant", "hold", "uni-a", "--reason", " ").exit_code == 2
    assert w.drctl("tenant", "release", "uni-a").exit_code == 0
    assert not lifecycle.is_held(w.rt, "uni-a")
    assert w.drctl("tenant", "release", "uni-a").exit_code == 2  # not held


def test_a_bucket_without_object_lock_keeps_the_hold_in_drdaemon_only(
        tmp_path: Path, s3_regions: list[S3Region]) -> None:
    w = make_world(tmp_path, [r.toml() for r in s3_regions])
    out = w.json("tenant", "hold", "uni-a", "--reason", "regulator request")
    assert out["ok"] and out["state"] == "held"
    assert [(x["supported"], x["objects"], x["error"]) for x in out["regions"]] == [
        (False, 0, None), (False, 0, None)]
    assert w.json("prune", "--dry-run")["held"] == ["files-a", "docs-a"]


def legal_holds(r: S3Region, source: str) -> dict[str, str]:
    client = r.client()
    keys = [o["Key"] for o in client.list_objects_v2(
        Bucket=r.bucket, Prefix=f"sources/{source}/").get("Contents", [])]
    return {k: client.get_object_legal_hold(Bucket=r.bucket, Key=k)["LegalHold"]["Status"]
            for k in keys}


def test_hold_puts_real_legal_holds_and_prune_waits_until_release(
        tmp_path: Path, lock_regions: list[S3Region]) -> None:
    retention = ("[sources.retention]\ndaily = 2\nweekly = 0\nmonthly = 0\n"
                 'min_retention = "0s"\nmax_delete_fraction = 1.0\n')
    w = make_world(tmp_path, [r.toml() for r in lock_regions], days=5, retention=retention)
    out = w.json("tenant", "hold", "uni-a", "--reason", "litigation hold, case 17")
    assert out["state"] == "held" and out["hold"]["reason"] == "litigation hold, case 17"
    for r in lock_regions:
        for source in ("files-a", "docs-a"):
            holds = legal_holds(r, source)
            # data and manifest of each of the 5 snapshots (directories have no facts object)
            assert len(holds) == 10 and set(holds.values()) == {"ON"}, holds
    assert {x["region"]: x["objects"] for x in out["regions"]} == {
        lock_regions[0].name: 20, lock_regions[1].name: 20}

    # Prune keeps every object of the held tenant and prunes the other tenant.
    report = w.json("prune")
    assert report["held"] == ["files-a", "docs-a"]
    assert len(w.listed("files-a")) == len(w.listed("docs-a")) == 5
    assert len(w.listed("files-b")) == 2
    assert "files-a: not pruned, its tenant is under a legal hold" in w.drctl(
        "prune", "--dry-run").stdout

    # An erasure waits for the hold too, by hand as by the daemon; nothing is touched.
    refused = w.drctl("tenant", "erase", "uni-a")
    assert refused.exit_code == 2 and "under legal hold (litigation hold, case 17" in (
        refused.stderr)
    assert len(w.listed("files-a")) == 5

    out = w.json("tenant", "release", "uni-a")
    assert out["state"] == "active" and out["hold"] is None
    for r in lock_regions:
        assert set(legal_holds(r, "files-a").values()) == {"OFF"}
    assert w.json("prune")["held"] == []
    assert len(w.listed("files-a")) == len(w.listed("docs-a")) == 2
    [event] = w.events("tenant.release")
    assert event["reason"] == "litigation hold, case 17"


# -- the daemon's erasure-deadline job ------------------------------------------

def record(rt: Runtime, tenant: str, end: date, *, held: bool = False,
           erased: bool = False) -> None:
    finished = Erasure(lifecycle.deadline(end) - DAY, lifecycle.deadline(end) - DAY,
                       "cert.json") if erased else None
    hold = Hold("case 9", "ops", "host-a", T0) if held else None
    lifecycle.save(rt, TenantState(tenant, end, lifecycle.deadline(end), hold, finished, True))


def sample(daemon: Daemon, name: str, **labels: str) -> float | None:
    registry = metrics.build_registry(daemon.metrics, daemon.rt.clock)
    return registry.get_sample_value(name, labels)


def test_the_erasure_job_selects_due_tenants_skipping_held_and_done(tmp_path: Path) -> None:
    w = make_world(tmp_path, local_regions(tmp_path))
    w.time[0] = datetime(2031, 4, 29, 1, 0, tzinfo=UTC)
    record(w.rt, "uni-a", date(2031, 4, 1))  # deadline 04-29 00:00: overdue
    record(w.rt, "uni-c", date(2031, 4, 2))  # deadline 04-30 00:00: due (one day ahead)
    record(w.rt, "uni-d", date(2031, 4, 3))  # deadline 05-01: not yet due
    record(w.rt, "uni-e", date(2031, 3, 1), held=True)  # overdue, but held
    record(w.rt, "uni-f", date(2031, 3, 1), erased=True)  # done
    daemon = Daemon(w.rt)
    assert daemon.erasure_job() == ["uni-a", "uni-c"]
    # uni-a is erased for real (erasure.erase); uni-c has no source to erase: a failure.
    assert sample(daemon, "drdaemon_tenant_erasures_total", tenant="uni-a",
                  outcome="done") == 1
    assert w.listed("files-a") == [] and w.listed("docs-a") == []
    assert len(w.listed("files-b")) == 1
    assert lifecycle.load(w.rt, "uni-a").erased
    assert sample(daemon, "drdaemon_tenant_erasures_total", tenant="uni-c",
                  outcome="failed") == 1
    assert sample(daemon, "drdaemon_tenant_erasures_total", tenant="uni-e",
                  outcome="done") is None
    assert daemon.erasure_job() == ["uni-c"]  # done is never due again

    daemon.refresh_metrics()
    deadline = datetime(2031, 5, 1, tzinfo=UTC).timestamp()
    assert sample(daemon, "drdaemon_tenant_erasure_deadline_timestamp_seconds",
                  tenant="uni-d") == deadline
    assert sample(daemon, "drdaemon_tenant_erasure_deadline_timestamp_seconds",
                  tenant="uni-a") == datetime(2031, 4, 29, tzinfo=UTC).timestamp()  # kept
    assert sample(daemon, "drdaemon_tenant_erasure_deadline_timestamp_seconds",
                  tenant="uni-b") is None  # active: no deadline
    for tenant, state in (("uni-a", "erased"), ("uni-d", "offboarded"), ("uni-b", "active"),
                          ("uni-e", "held"), ("uni-f", "erased")):
        assert sample(daemon, "drdaemon_tenant_state", tenant=tenant, state=state) == 1
        assert sample(daemon, "drdaemon_tenant_state", tenant=tenant, state="active") == (
            1 if state == "active" else 0)
    assert sample(daemon, "drdaemon_tenant_legal_hold", tenant="uni-e") == 1
    assert sample(daemon, "drdaemon_tenant_legal_hold", tenant="uni-a") == 0

    # The release of the hold lets the held erasure go at the next run.
    lifecycle.update(w.rt, "uni-e", lambda s: lifecycle.with_hold(s, None))
    assert "uni-e" in daemon.erasure_job()


def test_the_daemon_runs_the_erasure_job_at_start(tmp_path: Path) -> None:
    w = make_world(tmp_path, local_regions(tmp_path))
    w.time[0] = T0 + 40 * DAY
    for tenant in ("uni-a", "uni-b"):
        record(w.rt, tenant, T0.date())  # offboarded: the daemon takes no snapshot
    daemon = Daemon(w.rt)
    daemon.start()
    try:
        job = daemon.scheduler.get_job("erasure")
        assert job is not None and job.name == "erasure deadlines"
        deadline = datetime.now(UTC) + timedelta(seconds=30)
        while sample(daemon, "drdaemon_tenant_erasures_total", tenant="uni-b",
                     outcome="done") != 1:
            assert datetime.now(UTC) < deadline, "the erasure job did not run at start"
    finally:
        assert daemon.stop()
    assert w.listed("files-a") == [] and w.listed("files-b") == []
