"""One unreadable manifest (issue 19): reported with its reason, never hiding the region's
other snapshots, and never silently replaced by an older snapshot in `restore latest` or a
drill. Local regions and directory sources: the behaviour is the catalog's, not a store's."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from support import Setup, directory_source, local_region, make_setup

from drdaemon import catalog, layout, manifest, metrics, metrics_feed
from drdaemon import config as config_mod
from drdaemon.runtime import open_runtime

REGIONS = ("eu", "us")


@pytest.fixture
def two_snapshots(tmp_path: Path) -> tuple[Setup, str, str]:
    """A source with an older and a newer snapshot in both regions."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a").write_text("old")
    setup = make_setup(tmp_path, [local_region("eu", tmp_path / "r-eu", "europe"),
                                  local_region("us", tmp_path / "r-us", "north-america")],
                       [directory_source("files", tree)])
    older = setup.drctl_json("backup")[0]["snapshot_id"]
    (tree / "a").write_text("new")
    time.sleep(1.1)  # ids carry the second
    newer = setup.drctl_json("backup")[0]["snapshot_id"]
    return setup, older, newer


def oversize(setup: Setup, snap_id: str, *regions: str) -> None:
    """Make the manifest larger than any reader accepts, as a pre-version-2 writer did."""
    for region in regions:
        path = setup.config.parent / f"r-{region}" / layout.manifest_object_name("files",
                                                                                    snap_id)
        raw = path.read_bytes()
        path.write_bytes(raw + b" " * (manifest.MAX_MANIFEST_BYTES + 1 - len(raw)))


def test_an_oversized_manifest_in_one_region_is_reported_and_the_rest_listed(
        two_snapshots: tuple[Setup, str, str]) -> None:
    setup, older, newer = two_snapshots
    oversize(setup, newer, "eu")
    result = setup.drctl("snapshots", "list", "--json")
    assert result.exit_code == 0, result.output  # still readable in us: a degraded copy
    doc = json.loads(result.stdout)
    assert doc["region_errors"] == {}
    by_id = {e["id"]: e for e in doc["snapshots"]}
    assert by_id[older]["regions"] == list(REGIONS)
    assert by_id[newer]["regions"] == ["us"] and not by_id[newer]["unreadable"]
    assert "larger than 1048576 bytes" in by_id[newer]["problems"]["eu"]


def test_a_newest_snapshot_unreadable_everywhere(two_snapshots: tuple[Setup, str, str],
                                                 tmp_path: Path) -> None:
    setup, older, newer = two_snapshots
    oversize(setup, newer, *REGIONS)

    listed = setup.drctl("snapshots", "list")
    assert listed.exit_code == 1
    lines = listed.stdout.splitlines()
    assert any(older in line and "eu, us" in line for line in lines), listed.stdout
    assert any(newer in line and "UNREADABLE" in line for line in lines), listed.stdout
    assert f"! snapshot {newer} of files cannot be read in any region" in listed.stderr
    doc = json.loads(setup.drctl("snapshots", "list", "--json").stdout)
    [bad] = [e for e in doc["snapshots"] if e["unreadable"]]
    assert bad["id"] == newer and set(bad["problems"]) == set(REGIONS)

    status = setup.drctl("status", "--json")
    assert status.exit_code == 1
    [src] = json.loads(status.stdout)["sources"]
    assert src["newest_id"] == older and not src["ok"]
    assert [u["id"] for u in src["unreadable_snapshots"]] == [newer]
    assert any(f"snapshot {newer} cannot be read in any region" in p and "larger than" in p
               for p in src["problems"])

    # restore latest refuses, naming the snapshot and why ...
    target = tmp_path / "restored"
    refused = setup.drctl("restore", "latest", "--source", "files", "--to", str(target))
    assert refused.exit_code == 1 and not target.exists()
    assert newer in refused.stderr and "larger than 1048576 bytes" in refused.stderr
    assert "--allow-older" in refused.stderr
    # ... unless told to take an older one, and then it says which.
    allowed = setup.drctl("restore", "latest", "--source", "files", "--to", str(target),
                          "--allow-older", "--json")
    assert allowed.exit_code == 0, allowed.output
    out = json.loads(allowed.stdout)
    assert out["snapshot_id"] == older and out["skipped_unreadable"] == [newer]
    assert any(newer in n and f"used the older {older}" in n for n in out["notes"])
    assert (target / "a").read_text() == "old"
    text = setup.drctl("restore", "latest", "--source", "files", "--allow-older",
                       "--to", str(tmp_path / "again"))
    assert text.exit_code == 0 and f"restored {older}" in text.stdout
    assert f"used the older {older}" in text.stderr

    misused = setup.drctl("restore", older, "--source", "files", "--allow-older",
                          "--to", str(tmp_path / "third"))
    assert misused.exit_code == 2 and "'latest' only" in misused.stderr

    # A drill does not prove an RPO with the older snapshot.
    drill = setup.drctl("drill", "run", "--json")
    assert drill.exit_code == 1
    [record] = json.loads(drill.stdout)["drills"]
    assert record["reason_codes"] == ["newest-unreadable"], record["reasons"]
    assert newer in record["reasons"][0] and record["snapshot_id"] is None

    # The metric the DrdaemonManifestUnreadable alert reads.
    rt = open_runtime(config_mod.load(setup.config))
    st = metrics.MetricsState.from_config(rt.config)
    metrics_feed.refresh(rt, st)
    reg = CollectorRegistry()
    reg.register(metrics.StateCollector(st, lambda: datetime.now(UTC)))
    for region in REGIONS:
        labels = {"source": "files", "tenant": "uni-a", "tier": "paid", "region": region}
        assert reg.get_sample_value("drdaemon_unreadable_manifests", labels) == 1
        assert reg.get_sample_value("drdaemon_retained_snapshots", labels) == 1


def _entry(snap_id: str, readable: bool) -> catalog.SnapshotEntry:
    e = catalog.SnapshotEntry(snap_id, "files")
    if readable:
        t = layout.id_time(snap_id)
        e.manifest = manifest.Manifest(
            id=snap_id, source="files", tenant="uni-a", tier="paid", kind="directory",
            consistency_time=t, started_at=t, finished_at=t,
            data_name=layout.data_object_name("files", snap_id, "directory"),
            sha256="ab" * 32, size=1, compressed_size=1, plaintext_size=1, zstd_level=3,
            recipients=())
        e.regions = ["eu"]
    else:
        e.problems = {"eu": "manifest is larger than 1048576 bytes"}
    return e


A, B, C = ("20261101T020000Z-0000000a", "20261102T020000Z-0000000b",
           "20261103T020000Z-0000000c")


def test_choose_latest_never_passes_an_unreadable_newest_silently() -> None:
    choose = catalog.choose_latest
    assert choose([], allow_older=False) is None
    found = choose([_entry(A, True), _entry(B, True)], allow_older=False)
    assert found is not None and found.entry.id == B and found.note() is None
    # An unreadable snapshot older than the chosen one changes nothing.
    found = choose([_entry(A, False), _entry(B, True)], allow_older=False)
    assert found is not None and found.entry.id == B and found.skipped == []
    entries = [_entry(A, True), _entry(B, False), _entry(C, False)]
    with pytest.raises(catalog.NewestUnreadable, match=f"{C}, cannot be read.*older {A}"):
        choose(entries, allow_older=False)
    found = choose(entries, allow_older=True)
    assert found is not None and found.entry.id == A
    assert [e.id for e in found.skipped] == [C, B]
    assert found.note() is not None and C in found.note() and f"used the older {A}" in found.note()
    for allow in (False, True):
        with pytest.raises(catalog.NewestUnreadable, match="nor can any older one"):
            choose([_entry(A, False)], allow_older=allow)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(min_value=1, max_value=28), st.booleans()),
                unique_by=lambda x: x[0], max_size=8), st.booleans())
def test_choose_latest_properties(days: list[tuple[int, bool]], allow: bool) -> None:
    entries = sorted((_entry(f"202611{day:02d}T020000Z-0000000a", readable)
                      for day, readable in days), key=lambda e: e.id)
    readable = [e.id for e in entries if not e.unreadable]
    newer_bad = [e.id for e in entries if e.unreadable and (not readable or e.id > readable[-1])]
    try:
        found = catalog.choose_latest(entries, allow_older=allow)
    except catalog.NewestUnreadable as exc:
        # Refused exactly when the newest listed snapshot is unreadable (and, with
        # allow_older, when nothing older is readable either); the message names it.
        assert newer_bad and (not allow or not readable)
        assert max(newer_bad) in str(exc)
        return
    if not entries:
        assert found is None
        return
    assert found is not None and found.entry.id == readable[-1]
    assert [e.id for e in found.skipped] == sorted(newer_bad, reverse=True)
    assert allow or not found.skipped
