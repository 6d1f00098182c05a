"""Pruning: the pure planner (golden cases and properties), then real snapshots end to end.

Many snapshots are taken quickly by driving the real backup service with an
injected clock that steps a day between snapshots; drctl gets the same
runtime (and so the same clock) through click's context object, the one place
resources are opened.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from conftest import S3Region
from hypothesis import given, settings
from hypothesis import strategies as st
from support import Setup, directory_source, local_region, make_setup

from drdaemon import backup, catalog, layout, metrics, orphans, state
from drdaemon.cli.drctl import cli as drctl_cli
from drdaemon.config import RetentionConfig
from drdaemon.config import load as load_config
from drdaemon.errors import UsageError
from drdaemon.layout import data_object_name, manifest_object_name, new_snapshot_id
from drdaemon.prune import (
    BLOCKED,
    DELETE,
    KEEP,
    LOCKED,
    RegionInput,
    Snapshot,
    plan_prune,
    plan_purge,
    plan_region,
    run_prune,
    trash_entry,
)
from drdaemon.runtime import Runtime, open_runtime
from drdaemon.scheduler import Daemon
from drdaemon.storage import ObjectInfo

T0 = datetime(2031, 3, 1, 2, 0, tzinfo=UTC)
DAY = timedelta(days=1)
SRC = "lms-files"

# -- the pure planner ------------------------------------------------------------


def snaps(days: int, *, locked: dict[int, datetime] | None = None) -> tuple[Snapshot, ...]:
    """One snapshot a day for `days` days from T0; id `s<day>`."""
    locked = locked or {}
    return tuple(Snapshot(f"s{i}", T0 + i * DAY, locked.get(i)) for i in range(days))


def region(days: int, **kw: Any) -> RegionInput:
    cfg = RetentionConfig(**{"daily": 3, "weekly": 0, "monthly": 0, **kw})
    return RegionInput(SRC, "eu", cfg, snaps(days))


def actions(rp: Any) -> dict[str, str]:
    return {v.id: v.action for v in rp.verdicts}


def test_plan_explains_every_id_newest_first() -> None:
    rp = plan_region(region(6), T0 + 5 * DAY + timedelta(hours=2))
    assert [v.id for v in rp.verdicts] == ["s5", "s4", "s3", "s2", "s1", "s0"]
    assert rp.verdicts[0].reasons == ("newest", "daily 2031-03-06")
    assert rp.verdicts[1].reasons == ("daily 2031-03-05",)
    assert [v.reasons for v in rp.verdicts[3:]] == [("expired",)] * 3
    assert rp.delete_ids == ("s2", "s1", "s0")
    # Exactly half is not more than max_delete_fraction 0.5.
    assert rp.blocked is None and rp.forced is None


def test_protected_ids_are_kept_and_do_not_shift_the_tiers() -> None:
    now = T0 + 5 * DAY + timedelta(hours=2)
    rp = plan_region(region(6), now, protected={"s0", "s5"})
    assert actions(rp) == {"s5": KEEP, "s4": KEEP, "s3": KEEP, "s2": DELETE, "s1": DELETE,
                           "s0": KEEP}
    by_id = {v.id: v for v in rp.verdicts}
    assert by_id["s0"].reasons == ("protected",)
    assert by_id["s5"].reasons == ("newest", "daily 2031-03-06", "protected")


def test_locked_snapshots_are_kept_with_the_date_and_not_counted() -> None:
    now = T0 + 5 * DAY
    inp = dataclasses.replace(region(6), snapshots=snaps(6, locked={
        0: now - timedelta(seconds=1), 1: now + DAY, 2: datetime(2031, 3, 9, 2, tzinfo=UTC)}))
    rp = plan_region(inp, now)
    assert actions(rp)["s0"] == DELETE  # its lock has passed
    assert actions(rp)["s1"] == LOCKED
    assert {v.id: v.reasons for v in rp.verdicts}["s2"] == (
        "expired", "locked until 2031-03-09T02:00:00Z")
    assert rp.delete_ids == ("s0",)


def test_safety_net_blocks_without_force_and_is_named_with_it() -> None:
    now = T0 + 7 * DAY
    blocked = plan_region(region(8, daily=2), now)
    assert blocked.delete_ids == ()
    assert sum(v.action == BLOCKED for v in blocked.verdicts) == 6
    assert all(v.reasons == ("expired", "safety net") for v in blocked.verdicts
               if v.action == BLOCKED)
    assert blocked.blocked is not None and "would delete 6 of 8 snapshots (75%)" in blocked.blocked
    assert "--force" in blocked.blocked

    forced = plan_region(region(8, daily=2), now, force=True)
    assert len(forced.delete_ids) == 6 and forced.blocked is None
    assert forced.forced is not None and "allowed by --force" in forced.forced

    # Fraction 0: any deletion at all needs --force.
    assert plan_region(region(4, max_delete_fraction=0.0), now).blocked is not None
    assert plan_region(region(3, max_delete_fraction=0.0), now).blocked is None


def test_newest_survives_a_source_that_stopped_long_ago() -> None:
    rp = plan_region(region(6, daily=1, min_age=timedelta(0)), T0 + 400 * DAY)
    assert rp.verdicts[0].id == "s5" and rp.verdicts[0].action == KEEP
    assert rp.verdicts[0].reasons[0] == "newest"


def test_invalid_snapshots_are_reported_untouched_and_regions_apart() -> None:
    eu = dataclasses.replace(region(6), invalid=(("s9", "manifest authentication failed"),))
    us = dataclasses.replace(region(4), region="us")
    plan = plan_prune([eu, us], T0 + 6 * DAY)
    assert [(r.source, r.region) for r in plan.regions] == [(SRC, "eu"), (SRC, "us")]
    assert plan.regions[0].invalid == (("s9", "manifest authentication failed"),)
    assert "s9" not in actions(plan.regions[0])
    assert plan.regions[1].delete_ids == ("s0",)
    assert json.loads(json.dumps(plan.to_dict()))["regions"][0]["counts"] == {
        "keep": 3, "delete": 3, "locked": 0, "blocked": 0}


@settings(max_examples=200, deadline=None)
@given(days=st.lists(st.integers(0, 400), min_size=1, max_size=40, unique=True),
       fraction=st.sampled_from([0.0, 0.25, 0.5, 1.0]), force=st.booleans(),
       protect=st.sets(st.integers(0, 39), max_size=5), age=st.integers(0, 500))
def test_plan_properties(days: list[int], fraction: float, force: bool, protect: set[int],
                         age: int) -> None:
    inp = RegionInput(SRC, "eu", RetentionConfig(2, 1, 1, max_delete_fraction=fraction),
                      tuple(Snapshot(f"s{d}", T0 + d * DAY) for d in days))
    protected = {f"s{days[i]}" for i in protect if i < len(days)}
    rp = plan_region(inp, T0 + age * DAY, protected=protected, force=force)
    newest = max(inp.snapshots, key=lambda s: s.created_at)
    deleted = set(rp.delete_ids)
    assert len(rp.verdicts) == len(days)
    assert newest.id not in deleted
    assert not deleted & protected
    if not force:
        assert len(deleted) <= fraction * len(days)
        assert (rp.blocked is None) == (not any(v.action == BLOCKED for v in rp.verdicts))


def test_trash_names_and_purge_plan() -> None:
    at = datetime(2031, 3, 9, 4, 5, 6, 789, tzinfo=UTC)
    name = layout.trash_name(SRC, "20310301T020000Z-1a2b3c4d", at)
    assert name == "sources/lms-files/trash/20310301T020000Z-1a2b3c4d.20310309T040506Z.json"
    entry = trash_entry(SRC, "eu", name)
    assert entry is not None and entry.trashed_at == at.replace(microsecond=0)
    assert trash_entry(SRC, "eu", "sources/lms-files/trash/notes.txt") is None
    assert plan_purge([entry], 7, entry.trashed_at + 7 * DAY - timedelta(seconds=1)) == ()
    assert plan_purge([entry], 7, entry.trashed_at + 7 * DAY) == (entry,)
    assert plan_purge([entry], 0, entry.trashed_at) == (entry,)


# -- end to end ------------------------------------------------------------------


class Clock:
    """The runtime's clock, moved by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclasses.dataclass
class World:
    setup: Setup
    rt: Runtime
    clock: Clock
    ids: list[str]  # oldest first, one a day from T0

    def drctl(self, *args: str) -> Result:
        return CliRunner().invoke(drctl_cli, ["--config", str(self.setup.config), *args],
                                  obj={"runtime": self.rt}, catch_exceptions=False)

    def prune_json(self, *args: str, code: int = 0) -> Any:
        result = self.drctl("prune", *args, "--json")
        assert result.exit_code == code, result.output + result.stderr
        return json.loads(result.stdout)

    def listed(self, region: str | None = None) -> list[str]:
        return [e.id for e in catalog.list_snapshots(self.rt, SRC, region).snapshots
                if e.manifest is not None]

    def events(self, kind: str) -> list[dict[str, Any]]:
        path = self.setup.state / "audit" / "audit.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        return [e for e in lines if e["event"] == kind]


def make_world(tmp_path: Path, regions: list[str], days: int, **retention: Any) -> World:
    """`days` daily snapshots of a small tree; `retention` overrides the source's own
    [sources.retention] (daily 3, nothing weekly or monthly)."""
    tree = tmp_path / "tree"
    tree.mkdir(exist_ok=True)
    (tree / "notes.md").write_text("# week 1\n" * 50)
    own = {"daily": 3, "weekly": 0, "monthly": 0, **retention}
    source = directory_source(SRC, tree) + "[sources.retention]\n" + "".join(
        f"{k} = {json.dumps(v)}\n" for k, v in own.items())
    setup = make_setup(tmp_path, regions, [source])
    clock = Clock(T0)
    rt = open_runtime(load_config(setup.config), clock=clock)
    ids = []
    for i in range(days):
        clock.now = T0 + i * DAY
        result = backup.snapshot(rt, rt.config.sources[0])
        assert result.ok and not result.degraded, result.error or result.failed_regions
        assert result.manifest is not None and result.manifest.consistency_time == clock.now
        assert result.snapshot_id is not None
        ids.append(result.snapshot_id)
    clock.now = T0 + (days - 1) * DAY + timedelta(hours=2)
    return World(setup, rt, clock, ids)


def local_regions(tmp_path: Path) -> list[str]:
    return [local_region("eu-local", tmp_path / "eu", "europe"),
            local_region("us-local", tmp_path / "us", "north-america")]


@pytest.fixture
def local6(tmp_path: Path) -> World:
    return make_world(tmp_path, local_regions(tmp_path), 6)


def raw_names(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_dry_run_changes_nothing_and_prints_every_reason(local6: World) -> None:
    w = local6
    before = {r: raw_names(w.setup.config.parent / r) for r in ("eu", "us")}
    result = w.drctl("prune", "--dry-run")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"{SRC} @ eu-local: 6 snapshot(s) (keep 3, delete 3)" in out
    assert f"KEEP     {w.ids[5]}  2031-03-06 02:00:00  newest, daily 2031-03-06" in out
    for old in w.ids[:3]:
        assert out.count(f"DELETE   {old}  2031-03-0") == 2  # one line per region
        assert f"PLANNED  trash  {SRC} @ us-local {old}: would move" in out
    assert "dry run: nothing was changed" in out

    report = w.prune_json("--dry-run")
    assert report["ok"] and report["dry_run"]
    assert {(c["region"], c["snapshot_id"], c["status"]) for c in report["changes"]} == {
        (r, i, "planned") for r in ("eu-local", "us-local") for i in w.ids[:3]}
    assert {r: raw_names(w.setup.config.parent / r) for r in ("eu", "us")} == before
    assert not (w.setup.state / "audit" / "audit.jsonl").read_text().count("prune.")
    assert w.listed() == w.ids


def test_prune_trashes_manifests_first_in_every_region_and_undo_restores(
        tmp_path: Path, s3_regions: list[S3Region]) -> None:
    w = make_world(tmp_path, [r.toml() for r in s3_regions], 6)
    report = w.prune_json()
    assert report["ok"] and not report["dry_run"]
    gone, kept = w.ids[:3], w.ids[3:]
    assert {(c["action"], c["region"], c["snapshot_id"], c["status"])
            for c in report["changes"]} == {
        ("trash", r.name, i, "done") for r in s3_regions for i in gone}
    stamp = w.clock.now.strftime("%Y%m%dT%H%M%SZ")
    for r in s3_regions:
        keys = {o["Key"] for o in r.client().list_objects_v2(Bucket=r.bucket)["Contents"]}
        for i in gone:
            assert manifest_object_name(SRC, i) not in keys
            assert data_object_name(SRC, i, "directory") in keys  # the data stays
            assert f"sources/{SRC}/trash/{i}.{stamp}.json" in keys
        for i in kept:
            assert manifest_object_name(SRC, i) in keys
        assert w.listed(r.name) == kept
    assert len(w.events("prune.trash")) == 6
    assert w.drctl("snapshots", "list", "--json").exit_code == 0

    # A second run the same day has nothing left to do.
    again = w.prune_json()
    assert again["changes"] == [] and again["ok"]

    one = w.prune_json("--undo", "--id", gone[0])
    assert {(c["region"], c["status"]) for c in one["changes"]} == {
        (r.name, "done") for r in s3_regions}
    assert w.listed() == [gone[0], *kept]
    rest = w.drctl("prune", "--undo")
    assert rest.exit_code == 0, rest.output
    assert rest.stdout.count("DONE     undo") == 4
    assert w.listed() == w.ids
    for r in s3_regions:
        keys = {o["Key"] for o in r.client().list_objects_v2(Bucket=r.bucket)["Contents"]}
        assert not [k for k in keys if "/trash/" in k]
    assert len(w.events("prune.undo")) == 6


def test_purge_deletes_data_then_trash_after_trash_days(local6: World) -> None:
    w = local6
    trashed_at = w.clock.now
    assert run_prune(w.rt).ok
    eu = w.setup.config.parent / "eu"
    data = [eu / data_object_name(SRC, i, "directory") for i in w.ids[:3]]
    assert all(p.exists() for p in data)

    # No new snapshots for 6 days: retention keeps what it kept, trash waits.
    w.clock.now = trashed_at + 7 * DAY - timedelta(minutes=1)
    report = run_prune(w.rt)
    assert report.ok and report.changes == []
    assert w.prune_json("--dry-run")["changes"] == []

    w.clock.now = trashed_at + 7 * DAY
    dry = w.prune_json("--dry-run")
    assert {c["status"] for c in dry["changes"]} == {"planned"} and len(dry["changes"]) == 6
    assert all(p.exists() for p in data)
    report = run_prune(w.rt)
    assert report.ok
    assert sorted((c.action, c.region, c.snapshot_id, c.status) for c in report.changes) == \
        sorted(("purge", r, i, "done") for r in ("eu-local", "us-local") for i in w.ids[:3])
    for root in (eu, w.setup.config.parent / "us"):
        names = raw_names(root)
        assert not [n for n in names if "/trash/" in n]
        assert {n for n in names if "/data/" in n} == {
            data_object_name(SRC, i, "directory") for i in w.ids[3:]}
    assert len(w.events("prune.purge")) == 6
    # Purged snapshots cannot come back.
    assert w.drctl("prune", "--undo", "--id", w.ids[0]).exit_code == 2


def test_safety_net_blocks_without_force_and_proceeds_with_it(tmp_path: Path) -> None:
    w = make_world(tmp_path, local_regions(tmp_path), 8, daily=2)
    result = w.drctl("prune")
    assert result.exit_code == 1
    assert "BLOCKED by the safety net: would delete 6 of 8 snapshots (75%)" in result.stdout
    assert result.stdout.count("expired, safety net") == 12
    assert w.listed() == w.ids and not w.events("prune.trash")
    blocked = w.prune_json(code=1)
    assert not blocked["ok"] and all(r["blocked"] for r in blocked["regions"])

    forced = w.drctl("prune", "--force")
    assert forced.exit_code == 0, forced.output
    assert "safety net overridden" in forced.stdout
    assert w.listed() == w.ids[6:]
    assert len(w.events("prune.trash")) == 12


def test_protected_and_newest_are_never_deleted(local6: World) -> None:
    w = local6
    w.clock.now = T0 + 400 * DAY  # the source stopped long ago
    report = run_prune(w.rt, protected={w.ids[0]})
    assert report.ok
    for rp in report.plan.regions:
        by_id = {v.id: v for v in rp.verdicts}
        assert by_id[w.ids[0]].action == KEEP and by_id[w.ids[0]].reasons == ("protected",)
        assert by_id[w.ids[5]].reasons[0] == "newest"
    assert w.listed() == [w.ids[0], *w.ids[3:]]


def test_unauthenticated_manifests_are_never_touched(local6: World) -> None:
    w = local6
    root = w.setup.config.parent
    forged = root / "eu" / manifest_object_name(SRC, w.ids[0])
    forged.write_bytes(forged.read_bytes().replace(b'"uni-a"', b'"uni-b"'))
    report = w.prune_json()
    eu = next(r for r in report["regions"] if r["region"] == "eu-local")
    assert eu["invalid"] == [{"id": w.ids[0], "problem":
                              "manifest authentication failed: it was altered or forged"}]
    assert [s["id"] for s in eu["snapshots"] if s["action"] == "delete"] == w.ids[2:0:-1]
    assert forged.exists()
    assert w.listed("us-local") == w.ids[3:]

    # A trash entry that does not authenticate is neither undone nor purged.
    trash = next((root / "us" / f"sources/{SRC}/trash").iterdir())
    trash.write_bytes(trash.read_bytes().replace(b'"uni-a"', b'"uni-b"'))
    result = w.drctl("prune", "--undo", "--source", SRC)
    assert result.exit_code == 1
    assert "FAILED   undo" in result.stdout and "not authenticated" in result.stdout
    assert trash.exists()
    w.clock.now += 8 * DAY
    purge = run_prune(w.rt)
    assert not purge.ok
    [failed] = [c for c in purge.changes if c.status == "failed"]
    assert failed.action == "purge" and "not trusted" in failed.detail
    assert trash.exists()


def test_object_lock_buckets_lock_snapshots_and_prune_skips_them(
        tmp_path: Path, lock_regions: list[S3Region]) -> None:
    w = make_world(tmp_path, [r.toml() for r in lock_regions], 6,
                   min_retention="4d", max_delete_fraction=1.0, daily=2)
    for r in lock_regions:
        for i, snap_id in enumerate(w.ids):
            for key in (data_object_name(SRC, snap_id, "directory"),
                        manifest_object_name(SRC, snap_id)):
                head = r.client().head_object(Bucket=r.bucket, Key=key)
                assert head["ObjectLockMode"] == "COMPLIANCE"
                assert head["ObjectLockRetainUntilDate"] == T0 + (i + 4) * DAY

    result = w.drctl("prune")
    assert result.exit_code == 0, result.output
    assert result.stdout.count(
        f"LOCKED   {w.ids[2]}  2031-03-03 02:00:00  expired, locked until 2031-03-07T02:00:00Z"
    ) == 2  # once per region
    assert result.stdout.count(f"LOCKED   {w.ids[3]}") == 2
    assert w.listed() == w.ids[2:]
    for r in lock_regions:
        keys = {o["Key"] for o in r.client().list_objects_v2(Bucket=r.bucket)["Contents"]}
        assert {k for k in keys if "/trash/" in k} == {
            layout.trash_name(SRC, i, w.clock.now) for i in w.ids[:2]}


@pytest.fixture
def lock_holder(local6: World) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the prune lock until its stdin closes."""
    code = ("import sys; from pathlib import Path; from drdaemon.locks import deletions_lock\n"
            "with deletions_lock(Path(sys.argv[1])):\n"
            "    print('locked', flush=True); sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(local6.setup.state)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    yield proc
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=10)


def test_a_concurrent_prune_gets_the_lock_error(local6: World,
                                                lock_holder: subprocess.Popen[str]) -> None:
    w = local6
    for args in (["prune"], ["prune", "--undo"]):
        result = w.drctl(*args)
        assert result.exit_code == 1
        assert result.stderr.startswith("drctl: error: a prune or a replica repair is running")
    assert w.drctl("prune", "--dry-run").exit_code == 0  # reading needs no lock
    assert w.listed() == w.ids
    assert lock_holder.stdin is not None
    lock_holder.stdin.close()
    lock_holder.wait(timeout=10)
    assert w.drctl("prune").exit_code == 0
    assert w.listed() == w.ids[3:]


@pytest.mark.parametrize(("args", "message"), [
    (["--id", "20310301T020000Z-1a2b3c4d"], "--id needs --undo"),
    (["--undo", "--dry-run"], "--undo cannot be combined"),
    (["--source", "nope"], "no source named 'nope'"),
    (["--undo", "--id", "../x"], "invalid snapshot id"),
    (["--undo", "--id", "20310301T020000Z-1a2b3c4d"], "is in no region's trash"),
])
def test_cli_usage_errors_exit_2(local6: World, args: list[str], message: str) -> None:
    result = local6.drctl("prune", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1


# -- orphan data objects: the pure core ------------------------------------------

OLD, NEW = "20310301T020000Z-0000000a", "20310305T060000Z-0000000b"


def data(snap_id: str, ext: str = "tar") -> str:
    return f"sources/{SRC}/data/{snap_id}.{ext}.zst.age"


def test_only_names_exactly_like_a_data_object_are_ours() -> None:
    assert orphans.data_snapshot_id(SRC, data(OLD)) == OLD
    assert orphans.data_snapshot_id(SRC, data(OLD, "pgdump")) == OLD
    for foreign in (data(OLD) + ".part", data(OLD, "zip"), data(OLD.upper()),
                    f"sources/{SRC}/data/x/{OLD}.tar.zst.age", f"sources/{SRC}/data/notes.txt",
                    f"sources/{SRC}/data/.drdaemon-tmp-{OLD}.tar.zst.age.1a2b",
                    f"sources/other/data/{OLD}.tar.zst.age", f"sources/{SRC}/{OLD}.tar.zst.age",
                    f"sources/{SRC}/data/20311399T999999Z-0000000a.tar.zst.age",
                    f"backups/sources/{SRC}/data/{OLD}.tar.zst.age"):
        assert orphans.data_snapshot_id(SRC, foreign) is None, foreign
    held = orphans.holdings(SRC, "eu", [ObjectInfo(n, 5) for n in (
        data(OLD), data(NEW), data(OLD) + ".part", manifest_object_name(SRC, NEW),
        f"sources/{SRC}/trash/{OLD}.20310309T040506Z.json", f"sources/{SRC}/notes/{OLD}.json")])
    assert [o.snapshot_id for o in held.data] == [OLD, NEW]
    assert held.referenced == {OLD, NEW}


def held_in(region: str, *ids: str, refs: tuple[str, ...] = ()) -> orphans.Holdings:
    return orphans.Holdings(region, tuple(orphans.DataObject(data(i), i, 10) for i in ids),
                            frozenset(refs))


def test_orphan_plan_explains_every_orphan() -> None:
    now = datetime(2031, 3, 6, 4, 30, tzinfo=UTC)
    kept = "20310303T020000Z-0000000c"  # committed in us only: replicate completes eu
    eu = held_in("eu", OLD, NEW, kept, "20310302T020000Z-0000000d", "20310302T020000Z-0000000e")
    us = held_in("us", kept, refs=(kept,))
    first = {("eu", data(OLD)): now - DAY, ("eu", data(NEW)): now - DAY}

    def verdicts(**kw: Any) -> dict[str, tuple[str, tuple[str, ...]]]:
        [plan] = orphans.plan_orphans(SRC, [eu, us], now, first_seen=first, **kw)
        assert plan.region == "eu" and plan.data_objects == 5
        return {v.snapshot_id[-1]: (v.action, v.reasons[1:]) for v in plan.verdicts}

    assert verdicts() == {
        "a": (DELETE, ("past the 1d grace period",)),
        "b": (KEEP, ("grace period: deleted from 2031-03-06T06:00:00Z",)),  # began < 1 day ago
        "d": (KEEP, ("grace period: deleted from 2031-03-07T04:30:00Z",)),  # first seen now
        "e": (KEEP, ("grace period: deleted from 2031-03-07T04:30:00Z",)),
    }
    assert verdicts(in_flight={OLD})["a"] == (KEEP, ("a backup on this host has it in flight",))
    assert verdicts(protected={OLD})["a"] == (KEEP, ("protected",))
    assert verdicts(locked={("eu", data(OLD)): now + DAY})["a"] == (
        LOCKED, ("locked until 2031-03-07T04:30:00Z",))
    assert verdicts(locked={("eu", data(OLD)): now})["a"][0] == DELETE
    assert verdicts(unreadable={"us": "connection refused"})["a"] == (KEEP, (
        "region us unreadable, cannot tell whether it is committed there: connection refused",))
    # An orphan of one region is a committed snapshot's copy if another region names it.
    named = held_in("us", refs=tuple(o.snapshot_id for o in eu.data))
    assert orphans.plan_orphans(SRC, [eu, named], now) == ()


def test_commits_are_read_from_the_audit_records() -> None:
    records = [
        {"seq": 1, "time": "t1", "event": "snapshot.committed", "source": SRC,
         "snapshot_id": OLD, "regions": ["eu"]},
        {"seq": 2, "time": "t2", "event": "snapshot.failed", "source": SRC,
         "snapshot_id": NEW, "regions": ["us"]},
        {"seq": 3, "time": "t3", "event": "replica.repaired", "source": SRC,
         "snapshot_id": OLD, "region": "us"},
        {"seq": 4, "time": "t4", "event": "prune.undo", "source": SRC, "snapshot_id": NEW,
         "region": "eu"},
        {"seq": 5, "time": "t5", "event": "snapshot.committed", "source": "other",
         "snapshot_id": NEW, "regions": ["us"]},
        {"seq": 6, "event": "snapshot.committed", "source": SRC, "snapshot_id": NEW,
         "regions": "us"},  # not what we write: ignored
    ]
    assert orphans.committed_here(records, SRC, {OLD, NEW}) == {
        ("eu", OLD): "snapshot.committed record 1 at t1",
        ("us", OLD): "replica.repaired record 3 at t3",
        ("eu", NEW): "prune.undo record 4 at t4"}
    assert orphans.committed_here(records, SRC, {NEW}) == {
        ("eu", NEW): "prune.undo record 4 at t4"}


def test_orphan_safety_net_counts_every_data_object_of_the_region() -> None:
    now = datetime(2031, 3, 6, 4, 30, tzinfo=UTC)
    ids = [f"2031030{d}T020000Z-0000000{d}" for d in range(1, 5)]
    eu = held_in("eu", *ids, refs=(ids[3],))
    first = {("eu", data(i)): now - 2 * DAY for i in ids}
    [plan] = orphans.plan_orphans(SRC, [eu], now, first_seen=first)
    assert plan.count(BLOCKED) == 3 and plan.to_delete == ()
    assert plan.blocked is not None and "would delete 3 of 4 data objects (75%)" in plan.blocked
    [forced] = orphans.plan_orphans(SRC, [eu], now, first_seen=first, force=True)
    assert len(forced.to_delete) == 3 and forced.forced is not None
    [half] = orphans.plan_orphans(SRC, [eu], now, first_seen=first, max_delete_fraction=0.75)
    assert len(half.to_delete) == 3 and half.blocked is None


# -- orphan data objects: end to end ---------------------------------------------


def make_orphan(w: World, at: datetime) -> str:
    """What a backup begun `at` leaves in every region if it dies between data and manifest."""
    snap_id = new_snapshot_id(at)
    blob = w.rt.stores[0].get_bytes(data_object_name(SRC, w.ids[0], "directory"), 1 << 20)
    for store in w.rt.stores:
        store.put_bytes(data(snap_id), blob,
                        retain_until=w.rt.config.sources[0].retention.lock_until(at))
    return snap_id


def orphan_verdicts(report: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {(o["region"], v["snapshot_id"]): v["action"] for o in report["orphans"]
            for v in o["objects"]}


def test_orphans_are_deleted_after_the_grace_period_and_nothing_else(tmp_path: Path) -> None:
    w = make_world(tmp_path, local_regions(tmp_path), 6)
    root = w.setup.config.parent
    regions = ("eu-local", "us-local")
    old = make_orphan(w, T0 + DAY + timedelta(hours=12))
    busy = make_orphan(w, T0 + 2 * DAY + timedelta(hours=12))
    foreign = [f"sources/{SRC}/data/README.txt", data(old) + ".part", data(old, "zip"),
               f"sources/{SRC}/data/old/{old}.tar.zst.age", f"sources/gone/data/{old}.tar.zst.age",
               f"elsewhere/{old}.tar.zst.age"]
    for name in foreign:
        (root / "eu" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "eu" / name).write_bytes(b"not ours")
    seen_file = w.setup.state / "prune" / "orphans.json"

    # First sighting: reported, kept, and only a real run remembers it.
    w.clock.now = first = T0 + 5 * DAY + timedelta(hours=2)
    dry = w.prune_json("--dry-run")
    assert orphan_verdicts(dry) == {(r, i): "keep" for r in regions for i in (old, busy)}
    assert not seen_file.exists()
    text = w.drctl("prune").stdout
    assert f"{SRC} @ eu-local: 2 orphan data object(s) (keep 2) among 8 data objects" in text
    assert (f"KEEP     {data(old)}  " in text and "no manifest or trash entry in any region "
            "(first seen 2031-03-06T04:00:00Z), grace period: deleted from "
            "2031-03-07T04:00:00Z" in text)
    assert w.listed() == w.ids[3:]  # retention trashed ids[:3] as usual
    assert seen_file.exists() and not w.events("prune.orphan")

    # Made after that run: a fresh orphan, first seen by the next one.
    fresh = make_orphan(w, first + DAY - timedelta(hours=3))
    w.clock.now = first + DAY
    before = raw_names(root / "eu") | {f"us/{n}" for n in raw_names(root / "us")}
    dry = w.prune_json("--dry-run")
    assert orphan_verdicts(dry) == {**{(r, i): "delete" for r in regions for i in (old, busy)},
                                    **{(r, fresh): "keep" for r in regions}}
    assert {(c["action"], c["region"], c["snapshot_id"], c["status"]) for c in dry["changes"]} \
        == {("orphan", r, i, "planned") for r in regions for i in (old, busy)}
    assert before == raw_names(root / "eu") | {f"us/{n}" for n in raw_names(root / "us")}

    with state.inflight(w.setup.state, busy):  # a live backup on this host says it is its
        report = w.prune_json()
    assert report["ok"]
    assert orphan_verdicts(report) == {**{(r, old): "delete" for r in regions},
                                       **{(r, i): "keep" for r in regions for i in (busy, fresh)}}
    assert {(c["region"], c["snapshot_id"], c["status"]) for c in report["changes"]} == {
        (r, old, "done") for r in regions}
    for r in ("eu", "us"):
        names = raw_names(root / r)
        assert data(old) not in names
        assert {data(busy), data(fresh)} <= names
        # Snapshots with a manifest and trashed ones keep their data.
        assert {data_object_name(SRC, i, "directory") for i in w.ids} <= names
        assert len([n for n in names if "/trash/" in n]) == 3
    assert set(foreign) <= raw_names(root / "eu")
    assert w.listed() == w.ids[3:]
    events = w.events("prune.orphan")
    assert sorted((e["region"], e["data"], e["snapshot_id"]) for e in events) == [
        (r, data(old), old) for r in regions]
    assert events[0]["first_seen"] == first.isoformat()

    # Without the marker, the next run deletes the other one; the fresh one's day is not up.
    w.clock.now += timedelta(hours=1)
    assert [(c.region, c.snapshot_id) for c in run_prune(w.rt).changes] == [
        (r, busy) for r in regions]
    w.clock.now += DAY
    assert [(c.region, c.snapshot_id) for c in run_prune(w.rt).changes] == [
        (r, fresh) for r in regions]
    assert run_prune(w.rt).changes == [] and json.loads(seen_file.read_text())["seen"] == {}
    assert set(foreign) <= raw_names(root / "eu")
    assert len(w.events("prune.orphan")) == 6


def test_orphan_safety_net_and_grace_option(tmp_path: Path) -> None:
    w = make_world(tmp_path, local_regions(tmp_path), 1)
    for hours in (1, 2, 3):
        make_orphan(w, T0 - hours * timedelta(hours=1))
    assert w.prune_json()["ok"]
    w.clock.now += timedelta(hours=2)
    assert w.drctl("prune", "--orphan-grace", "59m").exit_code == 2
    result = w.drctl("prune", "--orphan-grace", "1h")
    assert result.exit_code == 1
    assert result.stdout.count("BLOCKED by the safety net: would delete 3 of 4 data objects "
                               "(75%)") == 2
    assert not w.events("prune.orphan")
    forced = w.prune_json("--orphan-grace", "1h", "--force")
    assert len([c for c in forced["changes"] if c["status"] == "done"]) == 6
    assert len(w.events("prune.orphan")) == 6


def test_locked_orphans_are_kept_and_reported(tmp_path: Path,
                                              lock_regions: list[S3Region]) -> None:
    w = make_world(tmp_path, [r.toml() for r in lock_regions], 3, min_retention="4d")
    unlocked = make_orphan(w, T0 - 2 * DAY)  # locked until T0 + 2d
    locked = make_orphan(w, T0 + 2 * DAY)  # locked until T0 + 6d
    foreign = [f"sources/{SRC}/data/README.txt", f"sources/other/data/{unlocked}.tar.zst.age"]
    for r in lock_regions:
        for key in foreign:
            r.client().put_object(Bucket=r.bucket, Key=key, Body=b"not ours",
                                  ChecksumAlgorithm="SHA256")
    w.clock.now = T0 + 3 * DAY
    assert w.prune_json()["ok"]
    w.clock.now = T0 + 4 * DAY
    result = w.drctl("prune")
    assert result.exit_code == 0, result.output
    assert result.stdout.count(f"LOCKED   {data(locked)}") == 2
    assert "locked until 2031-03-07T02:00:00Z" in result.stdout
    report = w.prune_json("--dry-run")
    assert orphan_verdicts(report) == {(r.name, locked): "locked" for r in lock_regions}
    for r in lock_regions:
        keys = {o["Key"] for o in r.client().list_objects_v2(Bucket=r.bucket)["Contents"]}
        assert data(unlocked) not in keys
        assert {data(locked), *foreign} <= keys
        assert {data_object_name(SRC, i, "directory") for i in w.ids} <= keys
    assert {e["snapshot_id"] for e in w.events("prune.orphan")} == {unlocked}
    assert w.listed() == w.ids


def test_an_unreadable_region_keeps_every_orphan(tmp_path: Path,
                                                 s3_regions: list[S3Region]) -> None:
    w = make_world(tmp_path, [r.toml() for r in s3_regions], 2)
    eu, us = s3_regions
    orphan_id = make_orphan(w, T0)
    w.clock.now = T0 + 2 * DAY
    assert w.prune_json()["ok"]
    w.clock.now += DAY
    us.server.stop()  # is it committed there? nobody can tell now
    report = w.prune_json(code=1)
    [verdict] = [v for o in report["orphans"] for v in o["objects"]]
    assert verdict["action"] == "keep" and "region us-virginia unreadable" in verdict["reasons"][1]
    assert data(orphan_id) in {o["Key"] for o in
                               eu.client().list_objects_v2(Bucket=eu.bucket)["Contents"]}
    us.server.start()
    assert [c["snapshot_id"] for c in w.prune_json()["changes"]] == [orphan_id] * 2


def test_a_data_object_whose_committed_manifest_vanished_is_kept_as_lost(tmp_path: Path) -> None:
    w = make_world(tmp_path, local_regions(tmp_path), 3)
    for store in w.rt.stores:  # removed by hand, or by someone who should not have
        store.delete(manifest_object_name(SRC, w.ids[0]))
    assert w.prune_json()["ok"]
    w.clock.now += DAY
    result = w.drctl("prune", "--force")
    assert result.exit_code == 1
    assert result.stdout.count(f"LOST     {data_object_name(SRC, w.ids[0], 'directory')}") == 2
    assert "its manifest was written here (snapshot.committed record" in result.stdout
    report = w.prune_json(code=1)
    assert {(o["region"], o["counts"]["lost"]) for o in report["orphans"]} == {
        ("eu-local", 1), ("us-local", 1)}
    for r in ("eu", "us"):
        assert data_object_name(SRC, w.ids[0], "directory") in raw_names(tmp_path / r)
    assert not w.events("prune.orphan")


def test_the_daemons_prune_job_uses_the_configured_orphan_grace(tmp_path: Path) -> None:
    """`[retention] orphan_grace` reaches the daemon's prune job and drctl; the option wins."""
    w = make_world(tmp_path, local_regions(tmp_path), 1)
    text = w.setup.config.read_text()
    # Global: the source's own [sources.retention] (daily 3) inherits it.
    w.setup.config.write_text(text.replace("[pipeline]", '[retention]\norphan_grace = "3h"\n\n'
                                           "[pipeline]", 1))
    w.rt = open_runtime(load_config(w.setup.config), clock=w.clock)
    assert w.rt.config.sources[0].retention.orphan_grace == timedelta(hours=3)
    daemon = Daemon(w.rt)
    [job] = [fn for name, _, fn in daemon._maintenance() if name == "prune"]
    orphan_id = make_orphan(w, T0 + timedelta(hours=1))
    regions = ("eu-local", "us-local")
    first = w.clock.now  # T0 + 2h: the job's first sighting

    daemon.maintenance_job("prune", job)
    get = metrics.build_registry(daemon.metrics, w.rt.clock).get_sample_value
    labels = {"source": SRC, "tenant": "uni-a", "tier": "paid"}
    assert get("drdaemon_orphan_grace_seconds", labels) == 3 * 3600
    assert get("drdaemon_orphan_objects", {**labels, "region": "eu-local", "verdict": "keep"}) == 1

    w.clock.now = first + timedelta(hours=3) - timedelta(minutes=1)
    assert orphan_verdicts(w.prune_json("--dry-run")) == {(r, orphan_id): "keep" for r in regions}
    w.clock.now = first + timedelta(hours=3)
    assert orphan_verdicts(w.prune_json("--dry-run")) == {
        (r, orphan_id): "delete" for r in regions}
    # The option overrides the config for one run, in either direction.
    assert orphan_verdicts(w.prune_json("--dry-run", "--orphan-grace", "1d")) == {
        (r, orphan_id): "keep" for r in regions}
    for bad in ("59m", "29d", "99999999999999d", "a day"):
        result = w.drctl("prune", "--dry-run", "--orphan-grace", bad)
        assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and "grace" in result.stderr, result.stderr

    daemon.maintenance_job("prune", job)  # the daemon's job, on its configured grace
    for r in ("eu", "us"):
        assert data(orphan_id) not in raw_names(tmp_path / r)
    assert sorted(e["region"] for e in w.events("prune.orphan")) == list(regions)
    get = metrics.build_registry(daemon.metrics, w.rt.clock).get_sample_value
    for r in regions:
        assert get("drdaemon_orphan_deletions_total", {**labels, "region": r}) == 1
        assert get("drdaemon_orphan_objects", {**labels, "region": r, "verdict": "keep"}) is None
    assert get("drdaemon_job_last_run_success", {"job_name": "prune"}) == 1


def test_run_prune_refuses_an_orphan_grace_out_of_range(local6: World) -> None:
    with pytest.raises(UsageError, match="at least 1h"):
        run_prune(local6.rt, orphan_grace=timedelta(minutes=59))
    with pytest.raises(UsageError, match="at most 28d"):
        run_prune(local6.rt, orphan_grace=timedelta(days=29))
