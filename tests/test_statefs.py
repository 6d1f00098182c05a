"""The state folder cannot be turned: links planted in it are refused, never followed, and a
folder someone else owns or may write is refused (issue 22, item 2). Real files, real
symbolic links, a real other user; drctl run as a real process where the exit code matters."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import _unprivileged_user
from support import Setup, directory_source, local_region, make_setup, run_cli

from drdaemon import locks, metrics, orphans, state, statefs
from drdaemon.drills import records as drill_records
from drdaemon.runtime import load_config, open_runtime

OUTSIDE_TEXT = b"precious: not the daemon's\n"


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    tree = tmp_path / "tree"
    (tree / "courses").mkdir(parents=True)
    (tree / "courses" / "notes.md").write_text("notes\n")
    return make_setup(tmp_path, [local_region("eu", tmp_path / "eu", "europe"),
                                 local_region("us", tmp_path / "us", "north-america")],
                      [directory_source("files", tree)])


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside the state folder with a file an attacker wants overwritten."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "target").write_bytes(OUTSIDE_TEXT)
    return folder


def _record(source: str = "files") -> drill_records.DrillRecord:
    return drill_records.DrillRecord(
        id="d1", source=source, tenant="uni-a", tier="paid", region="eu", snapshot_id=None,
        sha256=None, started_at="2026-01-01T00:00:00+00:00",
        finished_at="2026-01-01T00:01:00+00:00", ok=False, reasons=[], rto_seconds=None,
        rpo_seconds=None, worst_gap_seconds=None, throughput_bytes_per_second=None,
        stored_bytes=None, plaintext_bytes=None, rto_target_seconds=1.0,
        rpo_target_seconds=1.0, projected_tier_rto_seconds=None, timings={})


def _audit(setup: Setup) -> None:
    open_runtime(load_config(str(setup.config))).record_event("test.event", n=1)


def _lock(state_dir: Path) -> None:
    with locks.hold(state_dir, "deletions"):
        pass


def _outcome(state_dir: Path) -> None:
    state.record_outcome(state_dir, "files", datetime.now(UTC), True, "")


def _inflight(state_dir: Path) -> None:
    with state.inflight(state_dir, "20260101T000000Z-00000000"):
        pass


def _orphan_gauges(state_dir: Path) -> None:
    metrics.save_orphans(state_dir, metrics.MetricsState({}, (), {}))


def _sightings(state_dir: Path) -> None:
    # One old sighting of a source no longer configured: dropped, so the file is written.
    orphans.save_seen(state_dir, {("eu", "data/gone/x"): datetime.now(UTC)}, [], [], [], [])


def _drill(state_dir: Path) -> None:
    drill_records.append_record(state_dir, _record())


# What each write looks like, and the state entry an attacker replaces by a link.
FILE_LINKS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "drill-records": ("drills/drills.jsonl", _drill),
    "deletions-lock": ("locks/deletions.lock", _lock),
}
FOLDER_LINKS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "drills-folder": ("drills", _drill),
    "locks-folder": ("locks", _lock),
    "sources-folder": ("sources", _outcome),
    "inflight-folder": ("inflight", _inflight),
    "prune-folder-gauges": ("prune", _orphan_gauges),
    "prune-folder-sightings": ("prune", _sightings),
}


def _untouched(outside: Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["target"]
    assert (outside / "target").read_bytes() == OUTSIDE_TEXT


@pytest.mark.parametrize("case", FILE_LINKS, ids=list(FILE_LINKS))
def test_a_state_file_replaced_by_a_link_is_refused_and_its_target_untouched(
        setup: Setup, outside: Path, case: str) -> None:
    rel, write = FILE_LINKS[case]
    link = setup.state / rel
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside / "target")
    with pytest.raises(statefs.UnsafeState, match="symbolic link; refusing to follow"):
        write(setup.state)
    _untouched(outside)
    assert link.is_symlink()


@pytest.mark.parametrize("case", FOLDER_LINKS, ids=list(FOLDER_LINKS))
def test_a_state_folder_replaced_by_a_link_is_refused_and_nothing_lands_outside(
        setup: Setup, outside: Path, case: str) -> None:
    rel, write = FOLDER_LINKS[case]
    setup.state.mkdir(parents=True, exist_ok=True)
    (setup.state / rel).symlink_to(outside)
    with pytest.raises(statefs.UnsafeState, match="symbolic link or not a folder"):
        write(setup.state)
    _untouched(outside)


@pytest.mark.parametrize("rel", ["audit/audit.jsonl", "audit/mirror.lock", "audit"])
def test_drctl_refuses_a_linked_audit_log_with_one_line_and_exit_2(
        setup: Setup, outside: Path, rel: str) -> None:
    assert setup.drctl("backup").exit_code == 0  # the log exists and is mirrored
    victim = setup.state / rel
    if victim.is_dir():
        for p in victim.iterdir():
            p.unlink()
        victim.rmdir()
        victim.symlink_to(outside)
    else:
        victim.unlink()
        victim.symlink_to(outside / "target")
    proc = run_cli("drctl", "--config", str(setup.config), "backup")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to follow" in lines[0] and str(victim) in lines[0]
    _untouched(outside)


def test_reads_do_not_follow_links_either(setup: Setup, outside: Path) -> None:
    (outside / "target").write_text(json.dumps(_record().to_dict()) + "\n")
    (setup.state / "drills").mkdir(parents=True)
    (setup.state / "drills" / "drills.jsonl").symlink_to(outside / "target")
    with pytest.raises(statefs.UnsafeState):
        drill_records.load_records(setup.state)


@pytest.mark.parametrize("rel", ["", "audit"])
def test_a_state_folder_writable_by_others_is_refused(setup: Setup, rel: str) -> None:
    assert setup.drctl("backup").exit_code == 0
    folder = setup.state / rel
    folder.chmod(0o777)
    proc = run_cli("drctl", "--config", str(setup.config), "backup")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "writable by group or others (mode 0777)" in lines[0]
    assert str(folder) in lines[0]


@pytest.mark.parametrize("rel", ["", "drills"])
def test_a_state_folder_owned_by_another_user_is_refused(setup: Setup, rel: str) -> None:
    other = _unprivileged_user()
    folder = setup.state / rel
    folder.mkdir(parents=True, exist_ok=True)
    os.chown(folder, other.pw_uid, other.pw_gid)
    with pytest.raises(statefs.UnsafeState, match=f"owned by user id {other.pw_uid}"):
        if rel:
            _drill(setup.state)
        else:
            _audit(setup)
    assert not list((setup.state / rel).iterdir())


def test_the_state_folder_is_made_private_and_a_sound_one_is_used(setup: Setup) -> None:
    old = os.umask(0o022)
    try:
        _audit(setup)
        _drill(setup.state)
        _outcome(setup.state)
    finally:
        os.umask(old)
    for folder in (setup.state, setup.state / "audit", setup.state / "drills",
                   setup.state / "sources"):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    assert len(drill_records.load_records(setup.state)) == 1
    assert state.read_outcome(setup.state, "files").last_success


def test_read_many_reads_through_one_folder_and_refuses_a_planted_link(
        setup: Setup, outside: Path) -> None:
    state = setup.state
    statefs.write_atomic(state, "cache/manifests/eu/a.json", b"A", durable=False)
    statefs.write_atomic(state, "cache/manifests/eu/b.json", b"B")
    assert statefs.read_many(state, "cache/manifests/eu", ["a.json", "b.json", "gone.json"]) \
        == {"a.json": b"A", "b.json": b"B"}
    assert statefs.read_many(state, "cache/manifests/us", ["a.json"]) == {}
    (outside / "secret").write_bytes(b"not ours")
    (state / "cache" / "manifests" / "eu" / "c.json").symlink_to(outside / "secret")
    with pytest.raises(statefs.UnsafeState, match="symbolic link"):
        statefs.read_many(state, "cache/manifests/eu", ["c.json"])


def test_write_many_writes_through_one_folder_and_never_writes_outside(
        setup: Setup, outside: Path) -> None:
    state = setup.state
    statefs.write_many(state, "cache/manifests/eu", {"a.json": b"A", "b.json": b"B"})
    assert statefs.read_many(state, "cache/manifests/eu", ["a.json", "b.json"]) == {
        "a.json": b"A", "b.json": b"B"}
    # A planted link is replaced, never followed: its target stays as it was.
    (state / "cache" / "manifests" / "eu" / "c.json").symlink_to(outside / "target")
    statefs.write_many(state, "cache/manifests/eu", {"c.json": b"C"})
    assert statefs.read_many(state, "cache/manifests/eu", ["c.json"]) == {"c.json": b"C"}
    _untouched(outside)
    for bad in ("../x.json", "sub/x.json"):
        with pytest.raises(ValueError, match="not a"):
            statefs.write_many(state, "cache/manifests/eu", {bad: b"X"})
    (state / "cache" / "manifests" / "us").symlink_to(outside)
    with pytest.raises(statefs.UnsafeState, match="symbolic link or not a folder"):
        statefs.write_many(state, "cache/manifests/us", {"a.json": b"A"})
    _untouched(outside)
