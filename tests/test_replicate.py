"""Replication and verification: the pure planner, then real moto regions end to end.

Degraded backups, bit flips, truncations and planted age files are made by
writing the buckets directly, as an outage or an attacker would; repair and
verify are run through drctl, as an operator would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import S3Region
from support import Setup, directory_source, flip_byte, make_setup, snapshot_keys

from drdaemon import layout, locks
from drdaemon import manifest as manifest_mod
from drdaemon.catalog import SnapshotEntry
from drdaemon.keys import load_manifest_key
from drdaemon.manifest import Manifest
from drdaemon.replicate import DataStat, plan_replication
from drdaemon.sources.directory import scan, summarize

# -- the pure planner ----------------------------------------------------------

T0 = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
SNAP = "20261123T020000Z-1a2b3c4d"
A, B, C = "eu", "us", "ap"


def make_manifest(size: int = 1000) -> Manifest:
    return Manifest(
        id=SNAP, source="lms", tenant="uni-a", tier="paid", kind="directory",
        consistency_time=T0, started_at=T0, finished_at=T0,
        data_name=layout.data_object_name("lms", SNAP, "directory"), sha256="0" * 64,
        size=size, compressed_size=900, plaintext_size=5000, zstd_level=3,
        recipients=("sha256:1f2e3d4c5b6a7988",))


def plan(regions: list[str], sizes: dict[str, Any], *, manifest_in: list[str] | None = None,
         problems: dict[str, str] | None = None, region_errors: dict[str, str] | None = None,
         with_manifest: bool = True, trashed_in: tuple[str, ...] = ()) -> Any:
    """Plan one snapshot; `sizes[region]` is a size, None (absent) or a DataStat."""
    m = make_manifest() if with_manifest else None
    entry = SnapshotEntry(SNAP, "lms", m, list(manifest_in if manifest_in is not None
                                                else regions), dict(problems or {}))
    stats = {("lms", SNAP, r): v if isinstance(v, DataStat) else DataStat(v)
             for r, v in sizes.items()}
    return plan_replication([entry], regions, region_errors or {}, stats,
                            {("lms", SNAP, r) for r in trashed_in})


def repairs(p: Any) -> dict[str, tuple[str, tuple[str, ...]]]:
    return {r.region: (r.reason, r.sources) for r in p.repairs}


def test_plan_complete_everywhere_needs_nothing() -> None:
    p = plan([A, B], {A: 1000, B: 1000})
    assert p.ok and not p.repairs
    assert p.snapshots[0].complete == [A, B]


@pytest.mark.parametrize(("manifest_in", "problems", "size_b", "reason"), [
    ([A], {}, None, "no manifest"),
    ([A], {}, 1000, "no manifest"),
    ([A, B], {}, None, "data object missing"),
    ([A, B], {}, 999, "data object is 999 bytes, its manifest says 1000"),
    ([A], {B: "manifest authentication failed"}, 1000,
     "manifest: manifest authentication failed"),
    ([A], {B: "manifest differs from the other regions' copy"}, 1000,
     "manifest: manifest differs from the other regions' copy"),
])
def test_plan_repairs_each_kind_of_incomplete_copy(manifest_in: list[str],
                                                   problems: dict[str, str],
                                                   size_b: int | None, reason: str) -> None:
    p = plan([A, B], {A: 1000, B: size_b}, manifest_in=manifest_in, problems=problems)
    assert not p.ok
    assert repairs(p) == {B: (reason, (A,))}
    assert p.snapshots[0].complete == [A]
    assert p.snapshots[0].problems == {B: reason}


def test_plan_prefers_complete_copies_then_right_sized_orphans() -> None:
    # A complete; B holds right-sized data but no manifest; C holds nothing.
    p = plan([A, B, C], {A: 1000, B: 1000, C: None}, manifest_in=[A])
    assert repairs(p) == {B: ("no manifest", (A,)), C: ("no manifest", (A, B))}
    assert {r.region: r.manifest_regions for r in p.repairs} == {B: (A,), C: (A,)}


def test_plan_replaces_a_copy_found_corrupt_from_a_good_one() -> None:
    corrupt = DataStat(1000, corrupt="does not match its manifest's sha256")
    p = plan([A, B], {A: corrupt, B: 1000})
    assert repairs(p) == {A: ("does not match its manifest's sha256", (B,))}
    assert p.snapshots[0].complete == [B]


def test_plan_never_copies_into_or_from_a_region_it_cannot_see() -> None:
    p = plan([A, B], {A: 1000, B: DataStat(error="connection refused")})
    assert not p.ok and not p.repairs
    assert p.snapshots[0].problems == {B: "cannot be checked: connection refused"}
    # A region whose listing failed has no stats at all.
    p = plan([A, B], {A: 1000}, manifest_in=[A], region_errors={B: "timeout"})
    assert not p.repairs and p.snapshots[0].problems == {B: "cannot be checked: timeout"}
    assert p.region_errors == {B: "timeout"}


def test_plan_leaves_a_copy_that_prune_trashed_alone() -> None:
    p = plan([A, B], {A: 1000, B: 1000}, manifest_in=[A], trashed_in=(B,))
    assert p.ok and not p.repairs
    assert p.snapshots[0].pruned == [B] and p.snapshots[0].complete == [A]
    # A stale trash entry beside a committed manifest (undo, repair) changes nothing.
    p = plan([A, B], {A: 1000, B: 1000}, trashed_in=(B,))
    assert p.snapshots[0].complete == [A, B] and not p.snapshots[0].pruned


def test_plan_without_any_good_copy_has_repairs_without_sources() -> None:
    p = plan([A, B], {A: 10, B: None})
    assert repairs(p) == {A: ("data object is 10 bytes, its manifest says 1000", ()),
                          B: ("data object missing", ())}
    p = plan([A, B], {}, manifest_in=[], problems={A: "forged"}, with_manifest=False)
    assert not p.repairs and p.snapshots[0].problems == {
        A: "forged", B: "no authenticated manifest of this snapshot in any region"}


# -- real regions ----------------------------------------------------------------

def make_tree(root: Path, blob: int = 200_000) -> Path:
    (root / "courses" / "bio").mkdir(parents=True)
    (root / "courses" / "bio" / "notes.md").write_text("# Cells\n" * 300)
    (root / "uploads").mkdir()
    (root / "uploads" / "blob.bin").write_bytes(os.urandom(blob))
    os.symlink("courses/bio/notes.md", root / "latest-notes")
    return root


def data_key(region: S3Region, snap_id: str) -> str:
    objs = region.client().list_objects_v2(Bucket=region.bucket).get("Contents", [])
    return next(o["Key"] for o in objs if "/data/" in o["Key"] and snap_id in o["Key"])


def read(region: S3Region, key: str) -> bytes:
    return bytes(region.client().get_object(Bucket=region.bucket, Key=key)["Body"].read())


def write(region: S3Region, key: str, body: bytes) -> None:
    region.client().put_object(Bucket=region.bucket, Key=key, Body=body)


def run_json(setup: Setup, *args: str, exit_code: int) -> Any:
    result = setup.drctl(*args, "--json")
    assert result.exit_code == exit_code, result.output + result.stderr
    return json.loads(result.stdout)


def events(setup: Setup, name: str) -> list[dict[str, Any]]:
    lines = (setup.state / "audit" / "audit.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == name]


def assert_nothing_in(region: S3Region) -> None:
    client = region.client()
    assert snapshot_keys(client, region.bucket) == []
    assert not client.list_multipart_uploads(Bucket=region.bucket).get("Uploads")


@pytest.fixture
def setup(tmp_path: Path, s3_regions: list[S3Region]) -> Setup:
    return make_setup(tmp_path, [r.toml() for r in s3_regions],
                      [directory_source("lms-files", make_tree(tmp_path / "tree"))])


def degraded_backup(tmp_path: Path, moto_region_factory: Any,
                    blob: int = 200_000) -> tuple[Setup, S3Region, S3Region, dict[str, Any]]:
    """A snapshot committed in eu only: us was down during the backup, and is back."""
    eu = moto_region_factory("eu-frankfurt", "eu-central-1", "europe")
    us = moto_region_factory("us-virginia", "us-east-1", "north-america")
    tree = make_tree(tmp_path / "tree", blob)
    setup = make_setup(tmp_path, [eu.toml(), us.toml()], [directory_source("lms-files", tree)])
    us.server.stop()
    [snap] = run_json(setup, "backup", exit_code=1)
    assert snap["degraded"] and snap["regions"] == ["eu-frankfurt"]
    us.server.start()
    return setup, eu, us, snap


def test_degraded_snapshot_is_reported_repaired_and_restorable(tmp_path: Path,
                                                               moto_region_factory: Any) -> None:
    setup, eu, us, snap = degraded_backup(tmp_path, moto_region_factory)

    report = run_json(setup, "replicate", exit_code=1)
    assert not report["ok"]
    [s] = report["snapshots"]
    assert s["complete"] == ["eu-frankfurt"]
    assert s["problems"] == {"us-virginia": "no manifest"}
    assert report["planned_repairs"][0]["from"] == ["eu-frankfurt"]
    assert report["repairs"] == []  # without --repair nothing changes
    assert_nothing_in(us)
    human = setup.drctl("replicate")
    assert human.exit_code == 1
    assert (f"lms-files {snap['snapshot_id']} in us-virginia: no manifest "
            "(--repair copies it from eu-frankfurt)") in human.stdout

    repair = setup.drctl("replicate", "--repair")
    assert repair.exit_code == 0
    # The state after the repair, not before it.
    assert "2 of 2 copies complete; repaired 1, failed 0" in repair.stdout, repair.stdout
    report = run_json(setup, "replicate", exit_code=0)
    assert report["summary"]["complete"] == 2 and report["summary"]["complete_before"] == 2
    assert [e["region"] for e in events(setup, "replica.repaired")] == ["us-virginia"]

    key = data_key(us, snap["snapshot_id"])
    assert hashlib.sha256(read(us, key)).hexdigest() == snap["sha256"]
    # The manifest is copied byte for byte: every region holds the same commit.
    mkey = layout.manifest_object_name("lms-files", snap["snapshot_id"])
    assert read(us, mkey) == read(eu, mkey)
    assert not us.client().list_multipart_uploads(Bucket=us.bucket).get("Uploads")

    assert run_json(setup, "replicate", exit_code=0)["snapshots"][0]["complete"] == [
        "eu-frankfurt", "us-virginia"]
    target = tmp_path / "restored"
    out = setup.drctl_json("restore", "latest", "--source", "lms-files", "--to", str(target),
                           "--region", "us-virginia")
    assert out["region"] == "us-virginia" and out["failed_regions"] == {}
    assert summarize(scan(target)) == summarize(scan(tmp_path / "tree"))


def test_bit_flip_is_found_by_verify_and_replaced_from_the_good_region(
        setup: Setup, s3_regions: list[S3Region]) -> None:
    [snap] = setup.drctl_json("backup")
    eu = s3_regions[0]
    key = data_key(eu, snap["snapshot_id"])
    flip_byte(eu, key)

    # By choice, replicate checks manifests and sizes only (cheap, every few
    # hours); the same-size flip is for verify, or for replicate --verify.
    assert run_json(setup, "replicate", exit_code=0)["ok"]
    report = run_json(setup, "verify", exit_code=1)
    assert [(c["region"], c["status"]) for c in report["copies"]] == [
        ("eu-frankfurt", "corrupt"), ("us-virginia", "ok")]
    assert "sha256" in report["copies"][0]["reason"]
    assert [e["region"] for e in events(setup, "verify.failed")] == ["eu-frankfurt"]
    human = setup.drctl("verify")
    assert human.exit_code == 1
    assert f"FAILED lms-files {snap['snapshot_id']} in eu-frankfurt: corrupt:" in human.stdout
    assert "1 ok, 1 failed" in human.stdout

    planned = run_json(setup, "replicate", "--verify", exit_code=1)
    assert planned["planned_repairs"][0]["region"] == "eu-frankfurt"
    repaired = run_json(setup, "replicate", "--verify", "--repair", exit_code=0)
    assert [(r["region"], r["from_region"]) for r in repaired["repairs"]] == [
        ("eu-frankfurt", "us-virginia")]
    assert hashlib.sha256(read(eu, key)).hexdigest() == snap["sha256"]
    assert run_json(setup, "verify", exit_code=0)["ok"]


def test_a_right_sized_orphan_is_a_source_once_it_verifies(setup: Setup,
                                                            s3_regions: list[S3Region]) -> None:
    """eu's copy is corrupt and us lost its manifest (its data is fine): both heal."""
    [snap] = setup.drctl_json("backup")
    eu, us = s3_regions
    flip_byte(eu, data_key(eu, snap["snapshot_id"]))
    us.client().delete_object(Bucket=us.bucket, Key=layout.manifest_object_name(
        "lms-files", snap["snapshot_id"]))

    report = run_json(setup, "replicate", "--verify", "--repair", exit_code=0)
    assert [(r["region"], r["from_region"]) for r in report["repairs"]] == [
        ("eu-frankfurt", "us-virginia"), ("us-virginia", "eu-frankfurt")]
    assert run_json(setup, "verify", exit_code=0)["ok"]


def test_truncated_copy_is_found_by_size_and_repaired(setup: Setup,
                                                      s3_regions: list[S3Region]) -> None:
    [snap] = setup.drctl_json("backup")
    us = s3_regions[1]
    key = data_key(us, snap["snapshot_id"])
    write(us, key, read(us, key)[:-100])

    report = run_json(setup, "replicate", exit_code=1)
    assert report["snapshots"][0]["problems"] == {
        "us-virginia": f"data object is {snap['size'] - 100} bytes, its manifest says "
                       f"{snap['size']}"}
    assert run_json(setup, "replicate", "--repair", exit_code=0)["summary"]["repaired"] == 1
    assert run_json(setup, "verify", "--region", "us-virginia", exit_code=0)["checked"] == 1


def test_repair_from_a_corrupt_only_copy_fails_and_leaves_nothing(
        tmp_path: Path, moto_region_factory: Any) -> None:
    # 12 MiB of noise: three 5 MiB parts, so parts are uploaded before the
    # corruption shows at the end of the stream and must be aborted.
    setup, eu, us, snap = degraded_backup(tmp_path, moto_region_factory, blob=12 << 20)
    flip_byte(eu, data_key(eu, snap["snapshot_id"]))

    report = run_json(setup, "replicate", "--repair", exit_code=1)
    [failed] = report["repairs"]
    assert not failed["ok"] and failed["region"] == "us-virginia"
    assert "sha256" in failed["tried"]["eu-frankfurt"]
    assert "no source region holds a copy that verifies" in failed["error"]
    assert_nothing_in(us)
    [event] = events(setup, "replica.repair_failed")
    assert event["region"] == "us-virginia" and event["snapshot_id"] == snap["snapshot_id"]
    human = setup.drctl("replicate", "--repair")
    assert human.exit_code == 1
    assert "-> REPAIR FAILED: no source region holds a copy that verifies" in human.stdout


def test_verify_deep_reads_good_copies_and_refuses_a_planted_age_file(
        setup: Setup, tmp_path: Path, s3_regions: list[S3Region]) -> None:
    [snap] = setup.drctl_json("backup")
    report = run_json(setup, "verify", "--deep", exit_code=0)
    assert report["deep"] and report["checked"] == 2 and report["bytes"] == 2 * snap["size"]

    # Anyone with the public recipient can write a valid age file.
    evil = make_tree(tmp_path / "evil")
    planted = subprocess.run(f"tar -C {evil} -c . | zstd -q | age -r {setup.recipient}",
                             shell=True, check=True, capture_output=True).stdout
    us = s3_regions[1]
    write(us, data_key(us, snap["snapshot_id"]), planted)
    report = run_json(setup, "verify", "--deep", exit_code=1)
    assert [(c["region"], c["status"]) for c in report["copies"]] == [
        ("eu-frankfurt", "ok"), ("us-virginia", "corrupt")]
    assert run_json(setup, "verify", "--deep", "--region", "eu-frankfurt", exit_code=0)["ok"]


def test_verify_deep_finds_what_a_hash_cannot(setup: Setup, tmp_path: Path,
                                              s3_regions: list[S3Region]) -> None:
    """A manifest vouches for bytes, not for what they decrypt to; and a key can be lost."""
    from drdaemon.keys import generate_identity

    [snap] = setup.drctl_json("backup")
    other = tmp_path / "other-identity.txt"
    generate_identity(other)
    report = run_json(setup, "verify", "--deep", "--identity", str(other), exit_code=1)
    assert {c["status"] for c in report["copies"]} == {"unreadable"}
    assert "no identity given can unwrap tenant uni-a's key" in report["copies"][0]["reason"]

    # An authenticated manifest over bytes that are not an age file (as a
    # buggy writer could leave): the hash matches, only decryption tells.
    key = load_manifest_key(setup.manifest_key)
    mname = layout.manifest_object_name("lms-files", snap["snapshot_id"])
    m = manifest_mod.parse(read(s3_regions[0], mname), key)
    junk = os.urandom(5000)
    bad = dataclasses.replace(m, sha256=hashlib.sha256(junk).hexdigest(), size=len(junk))
    for region in s3_regions:
        write(region, data_key(region, snap["snapshot_id"]), junk)
        write(region, mname, manifest_mod.serialize(bad, key))
    assert run_json(setup, "verify", exit_code=0)["ok"]
    report = run_json(setup, "verify", "--deep", exit_code=1)
    assert {c["status"] for c in report["copies"]} == {"unreadable"}
    assert "cannot be decrypted" in report["copies"][0]["reason"]


def test_verify_options_are_checked(setup: Setup) -> None:
    result = setup.drctl("verify", "--identity", str(setup.identity))
    assert result.exit_code == 2 and "only used with --deep" in result.stderr
    result = setup.drctl("verify", "--region", "mars")
    assert result.exit_code == 2 and "no region named 'mars'" in result.stderr
    result = setup.drctl("replicate", "--source", "nope")
    assert result.exit_code == 2 and "no source named 'nope'" in result.stderr
    # Nothing backed up yet: nothing to check, nothing wrong.
    assert run_json(setup, "verify", exit_code=0)["checked"] == 0
    assert run_json(setup, "replicate", exit_code=0)["summary"]["copies"] == 0


def test_a_snapshot_pruned_in_one_region_is_not_copied_back(setup: Setup,
                                                             s3_regions: list[S3Region]) -> None:
    [snap] = setup.drctl_json("backup")
    us = s3_regions[1]
    # What prune's trash step does in one region (prune plans per region).
    mname = layout.manifest_object_name("lms-files", snap["snapshot_id"])
    write(us, layout.trash_name("lms-files", snap["snapshot_id"], datetime.now(UTC)),
          read(us, mname))
    us.client().delete_object(Bucket=us.bucket, Key=mname)

    report = run_json(setup, "replicate", "--repair", exit_code=0)
    assert report["snapshots"][0]["pruned"] == ["us-virginia"]
    assert report["planned_repairs"] == [] and report["repairs"] == []
    assert report["summary"]["pruned"] == 1


def test_repair_waits_for_no_prune(setup: Setup, s3_regions: list[S3Region]) -> None:
    """Repair and prune take the same lock: a repair must not recommit what a prune removes."""
    setup.drctl_json("backup")
    with locks.deletions_lock(setup.state):
        result = setup.drctl("replicate", "--repair")
        assert result.exit_code == 1 and "a prune or a replica repair is running" in result.stderr
        assert setup.drctl("replicate").exit_code == 0  # planning only reads
