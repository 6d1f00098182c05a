"""Directory snapshots end to end: two moto S3 regions, restore, break-glass, failures."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import S3Region
from old_format import (
    break_glass_fetch,
    break_glass_restore,
    break_glass_unwrap,
    downgrade,
    manifest_version,
)
from support import (
    Setup,
    directory_source,
    flip_byte,
    local_region,
    make_setup,
    snapshot_keys,
)

from drdaemon.sources.directory import scan, summarize


def make_tree(root: Path) -> Path:
    (root / "courses" / "bio" / "week-1").mkdir(parents=True)
    (root / "courses" / "bio" / "week-1" / "notes.md").write_text("# Cells\n" * 500)
    (root / "courses" / "bio" / "empty.txt").write_bytes(b"")
    (root / "uploads" / "ünïcødé — 学生").mkdir(parents=True)
    (root / "uploads" / "ünïcødé — 学生" / "essay é.txt").write_text("Ça va? 你好\n")
    (root / "uploads" / "blob.bin").write_bytes(os.urandom(300_000))
    (root / "empty-dir").mkdir()
    os.symlink("courses/bio/week-1/notes.md", root / "latest-notes")
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "tree")


@pytest.fixture
def setup(tmp_path: Path, tree: Path, s3_regions: list[S3Region]) -> Setup:
    return make_setup(tmp_path, [r.toml() for r in s3_regions],
                      [directory_source("lms-files", tree)])


def assert_same_tree(a: Path, b: Path) -> None:
    assert summarize(scan(a)) == summarize(scan(b))
    cmp = filecmp.dircmp(a, b)
    assert not cmp.left_only and not cmp.right_only and not cmp.diff_files
    assert os.readlink(b / "latest-notes") == "courses/bio/week-1/notes.md"


def data_object(region: S3Region, snap: dict) -> str:
    objs = region.client().list_objects_v2(Bucket=region.bucket)["Contents"]
    return next(o["Key"] for o in objs if o["Key"].endswith(".tar.zst.age")
                and snap["snapshot_id"] in o["Key"])


def test_backup_lists_and_restores_from_each_region(setup: Setup, tree: Path, tmp_path: Path,
                                                     s3_regions: list[S3Region]) -> None:
    [snap] = setup.drctl_json("backup")
    assert snap["ok"] and not snap["degraded"]
    assert snap["regions"] == ["eu-frankfurt", "us-virginia"]

    listed = setup.drctl_json("snapshots", "list")["snapshots"]
    assert [s["id"] for s in listed] == [snap["snapshot_id"]]
    assert listed[0]["missing_regions"] == []

    shown = setup.drctl_json("snapshots", "show", snap["snapshot_id"])
    assert shown["facts"]["files"] == 4 and shown["facts"]["symlinks"] == 1
    assert shown["data"]["sha256"] == snap["sha256"]
    # The same ciphertext went to both regions.
    for region in s3_regions:
        head = region.client().head_object(Bucket=region.bucket, Key=data_object(region, snap))
        assert head["ContentLength"] == snap["size"]

    for region in s3_regions:
        target = tmp_path / f"restored-{region.name}"
        out = setup.drctl_json("restore", "latest", "--source", "lms-files", "--to", str(target),
                               "--region", region.name)
        assert out["region"] == region.name
        assert_same_tree(tree, target)
    # No staging folders are left beside the targets.
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_break_glass_with_stock_age_zstd_tar(setup: Setup, tree: Path, tmp_path: Path,
                                             s3_regions: list[S3Region]) -> None:
    """runbooks/break-glass-restore.md: unwrap the tenant key with age, then age | zstd | tar;
    a snapshot written before tenant keys (version 1) with the old commands. With the
    offline escrow identity alone: the day the ops key is gone."""
    [snap] = setup.drctl_json("backup")
    region = s3_regions[1]
    work = tmp_path / "work"
    work.mkdir()
    break_glass_fetch(region, "lms-files", snap["snapshot_id"], "directory", work)
    assert manifest_version(work) == 3
    tenant_key = break_glass_unwrap(region, setup.escrow, work)
    out = tmp_path / "glass"
    out.mkdir()
    break_glass_restore("directory", tenant_key, work, str(out))
    assert_same_tree(tree, out)

    downgrade(setup, "lms-files", snap["snapshot_id"])
    break_glass_fetch(region, "lms-files", snap["snapshot_id"], "directory", work)
    assert manifest_version(work) == 1
    old = tmp_path / "glass-old"
    old.mkdir()
    break_glass_restore("directory", setup.escrow, work, str(old))
    assert_same_tree(tree, old)


def test_restore_refuses_non_empty_target(setup: Setup, tmp_path: Path) -> None:
    setup.drctl_json("backup")
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    result = setup.drctl("restore", "latest", "--source", "lms-files", "--to", str(target))
    assert result.exit_code == 2
    assert "not an empty folder" in result.stderr
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_restore_of_missing_or_malformed_id(setup: Setup, tmp_path: Path) -> None:
    setup.drctl_json("backup")
    for ref, message in (("20200101T000000Z-00000000", "no snapshot 20200101T000000Z"),
                         ("../../etc", "invalid snapshot id")):
        result = setup.drctl("restore", ref, "--source", "lms-files", "--to",
                             str(tmp_path / "x"))
        assert result.exit_code == 2, result.output
        assert message in result.stderr
        assert result.stderr.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_restore_with_wrong_identity_is_refused(setup: Setup, tmp_path: Path) -> None:
    from drdaemon.keys import generate_identity

    setup.drctl_json("backup")
    other = tmp_path / "other-identity.txt"
    generate_identity(other)
    target = tmp_path / "out"
    result = setup.drctl("restore", "latest", "--source", "lms-files", "--to", str(target),
                         "--identity", str(other))
    assert result.exit_code == 2
    assert "no identity given can unwrap tenant uni-a's key" in result.stderr
    assert not target.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_identity_readable_by_others_is_refused(setup: Setup, tmp_path: Path) -> None:
    setup.drctl_json("backup")
    setup.identity.chmod(0o644)
    result = setup.drctl("restore", "latest", "--source", "lms-files", "--to",
                         str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "readable by group or others" in result.stderr


def test_corrupt_object_falls_back_to_other_region(setup: Setup, tree: Path, tmp_path: Path,
                                                   s3_regions: list[S3Region]) -> None:
    [snap] = setup.drctl_json("backup")
    first = s3_regions[0]
    flip_byte(first, data_object(first, snap))

    target = tmp_path / "out"
    result = setup.drctl("restore", "latest", "--source", "lms-files", "--to", str(target))
    assert result.exit_code == 0, result.stderr
    assert "region eu-frankfurt skipped" in result.stderr
    assert "from region us-virginia" in result.stdout
    assert_same_tree(tree, target)


def test_corrupt_everywhere_fails_and_leaves_nothing(setup: Setup, tmp_path: Path,
                                                     s3_regions: list[S3Region]) -> None:
    [snap] = setup.drctl_json("backup")
    for region in s3_regions:
        key = data_object(region, snap)
        body = region.client().get_object(Bucket=region.bucket, Key=key)["Body"].read()
        region.client().put_object(Bucket=region.bucket, Key=key, Body=body[:-100])
    target = tmp_path / "out"
    result = setup.drctl("restore", "latest", "--source", "lms-files", "--to", str(target))
    assert result.exit_code == 1
    assert "failed in every region" in result.stderr
    assert not target.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_replaced_object_with_valid_age_file_is_detected(setup: Setup, tmp_path: Path,
                                                          s3_regions: list[S3Region]) -> None:
    """Anyone with the recipient can write a valid age file: the manifest's sha256 catches it."""
    [snap] = setup.drctl_json("backup")
    evil_tree = make_tree(tmp_path / "evil")
    (evil_tree / "courses" / "bio" / "empty.txt").write_text("planted")
    evil = subprocess.run(f"tar -C {evil_tree} -c . | zstd -q | age -r {setup.recipient}",
                          shell=True, check=True, capture_output=True).stdout
    for region in s3_regions:
        region.client().put_object(Bucket=region.bucket, Key=data_object(region, snap),
                                   Body=evil)
    target = tmp_path / "out"
    result = setup.drctl("restore", "latest", "--source", "lms-files", "--to", str(target))
    assert result.exit_code == 1
    assert "sha256" in result.stderr or "larger than its manifest" in result.stderr \
        or "truncated" in result.stderr
    assert not target.exists()


def test_region_down_during_backup_commits_degraded(tmp_path: Path, tree: Path,
                                                    moto_region_factory) -> None:
    eu = moto_region_factory("eu-frankfurt", "eu-central-1", "europe")
    us = moto_region_factory("us-virginia", "us-east-1", "north-america")
    setup = make_setup(tmp_path, [eu.toml(), us.toml()], [directory_source("lms-files", tree)])
    us.server.stop()
    result = setup.drctl("backup", "--json")
    assert result.exit_code == 1

    [snap] = json.loads(result.stdout)
    assert snap["ok"] and snap["degraded"]
    assert snap["regions"] == ["eu-frankfurt"]
    assert "us-virginia" in snap["failed_regions"]
    us.server.start()
    listed = setup.drctl_json("snapshots", "list")["snapshots"]
    assert listed[0]["regions"] == ["eu-frankfurt"]
    assert listed[0]["missing_regions"] == ["us-virginia"]
    # Nothing half-written is left in the region that failed.
    assert snapshot_keys(us.client(), us.bucket) == []
    assert not us.client().list_multipart_uploads(Bucket=us.bucket).get("Uploads")


def test_unreadable_source_commits_nothing(tmp_path: Path, s3_regions: list[S3Region]) -> None:
    tree = make_tree(tmp_path / "tree")
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [directory_source("lms-files", tree)])
    secret = tree / "courses" / "bio" / "week-1"
    secret.chmod(0o000)
    try:
        if os.access(secret, os.R_OK):
            pytest.skip("running with privileges that ignore file modes")
        result = setup.drctl("backup", "--json")
    finally:
        secret.chmod(0o755)
    assert result.exit_code == 1
    assert "Permission denied" in result.stdout
    for region in s3_regions:
        assert snapshot_keys(region.client(), region.bucket) == []
        assert not region.client().list_multipart_uploads(Bucket=region.bucket).get("Uploads")


def test_vanished_source_commits_nothing(tmp_path: Path, s3_regions: list[S3Region]) -> None:
    import shutil

    tree = make_tree(tmp_path / "tree")
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [directory_source("lms-files", tree)])
    shutil.rmtree(tree)
    result = setup.drctl("backup", "--json")
    assert result.exit_code == 1
    assert "does not exist" in result.stdout
    for region in s3_regions:
        assert snapshot_keys(region.client(), region.bucket) == []


def test_restore_shows_progress_on_a_terminal(setup: Setup, tmp_path: Path) -> None:
    """A person at a terminal sees bytes, rate and ETA; scripts (no TTY) see none."""
    import pty
    import sys

    setup.drctl_json("backup")
    leader, follower = pty.openpty()
    exe = str(Path(sys.executable).parent / "drctl")
    proc = subprocess.Popen([exe, "--config", str(setup.config), "restore", "latest",
                             "--source", "lms-files", "--to", str(tmp_path / "tty")],
                            stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=60) == 0
    text = seen.decode(errors="replace")
    assert "restore lms-files" in text and "/s" in text and "ETA" in text, text
    quiet = setup.drctl("restore", "latest", "--source", "lms-files", "--to",
                        str(tmp_path / "notty"))
    assert quiet.exit_code == 0 and "ETA" not in quiet.stderr


def test_manifest_refused_in_one_region_removes_its_data_and_commits_the_others(
        tmp_path: Path, tree: Path) -> None:
    """Regions commit side by side; one whose manifest write fails keeps no orphan data."""
    eu, us = tmp_path / "eu", tmp_path / "us"
    setup = make_setup(tmp_path, [local_region("eu-local", eu, "europe"),
                                  local_region("us-local", us, "north-america")],
                       [directory_source("lms-files", tree)])
    # A file where us-local's manifest folder belongs: the data object commits,
    # the manifest cannot (root ignores file modes, so a mode would not do).
    (us / "sources" / "lms-files").mkdir(parents=True)
    (us / "sources" / "lms-files" / "manifests").write_text("in the way")
    result = setup.drctl("backup", "--json")
    assert result.exit_code == 1, result.output
    [snap] = json.loads(result.stdout)
    assert snap["ok"] and snap["degraded"]
    assert snap["regions"] == ["eu-local"]
    assert "us-local" in snap["failed_regions"]
    assert list((us / "sources" / "lms-files" / "data").iterdir()) == []
    assert len(list((eu / "sources" / "lms-files" / "data").iterdir())) == 1
    restored = tmp_path / "restored"
    assert setup.drctl("restore", "latest", "--source", "lms-files", "--to",
                       str(restored)).exit_code == 0
    assert_same_tree(tree, restored)


def test_wrong_identity_error_names_the_configured_keys(setup: Setup, tmp_path: Path) -> None:
    from drdaemon.keys import fingerprint

    escrow = setup.escrow_recipient  # make_setup names both: ops and escrow
    setup.drctl_json("backup")
    keygen = setup.drctl("keys", "generate", "--out", str(tmp_path / "other.txt"))
    assert keygen.exit_code == 0 and keygen.stdout.startswith("age1")
    other = keygen.stdout.strip()
    assert f"fingerprint {fingerprint(other)}" in keygen.stderr
    result = setup.drctl("restore", "latest", "--source", "lms-files", "--to",
                         str(tmp_path / "out"), "--identity", str(tmp_path / "other.txt"))
    assert result.exit_code == 2
    assert f"ops ({fingerprint(setup.recipient)}" in result.stderr
    assert f"escrow ({fingerprint(escrow)}" in result.stderr
