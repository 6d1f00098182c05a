"""The daemon's cache of authenticated manifests (manifest_cache.ManifestCache).

Real stores (local folders, moto S3 servers), wrapped in a counting proxy that
forwards every call: a refresh must GET only manifests it has not read
before, follow new and deleted snapshots, and never serve a manifest that
failed authentication; drctl must keep reading every manifest from storage.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from counting_store import CountingStore, count_calls, reset
from support import Setup, directory_source, local_region, make_setup

from drdaemon import config as config_mod
from drdaemon import layout, manifest, metrics_feed, scheduler, statefs
from drdaemon.backup import snapshot
from drdaemon.cli.drctl import cli as drctl_cli
from drdaemon.manifest_cache import DiskCache
from drdaemon.metrics import MetricsState
from drdaemon.runtime import Runtime, open_runtime
from drdaemon.scheduler import Daemon

T0 = datetime(2026, 11, 20, 2, tzinfo=UTC)
SOURCES = ("files-a", "files-b")


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclass
class World:
    setup: Setup
    rt: Runtime
    clock: Clock
    stores: dict[str, CountingStore]
    regions: list[str]
    ids: dict[str, list[str]]  # source -> snapshot ids, oldest first

    def backup(self, source: str) -> str:
        self.clock.now += timedelta(hours=1)
        result = snapshot(self.rt, self.rt.config.source(source))
        assert result.ok and not result.degraded and result.snapshot_id, result.error
        self.ids[source].append(result.snapshot_id)
        return result.snapshot_id

    def manifest_reads(self) -> int:
        return sum(s.manifest_reads() for s in self.stores.values())

    def drctl_json(self, *args: str) -> Any:
        """drctl in-process on this very runtime (its cache filled by the refreshes)."""
        result = CliRunner().invoke(drctl_cli, ["--config", str(self.setup.config), *args,
                                                "--json"],
                                    obj={"runtime": self.rt}, catch_exceptions=False)
        assert result.exit_code == 0, result.output + result.stderr
        return json.loads(result.stdout)


@pytest.fixture(params=["local", "s3"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> World:
    """Two directory sources with two snapshots each, in two local or two S3 regions."""
    if request.param == "s3":
        s3 = request.getfixturevalue("s3_regions")
        regions, names = [r.toml() for r in s3], [r.name for r in s3]
    else:
        names = ["eu", "us"]
        regions = [local_region("eu", tmp_path / "r-eu", "europe"),
                   local_region("us", tmp_path / "r-us", "north-america")]
    sources = []
    for name in SOURCES:
        tree = tmp_path / name
        (tree / "d").mkdir(parents=True)
        (tree / "d" / "f.txt").write_text(name * 100)
        sources.append(directory_source(name, tree))
    setup = make_setup(tmp_path, regions, sources)
    clock = Clock(T0)
    rt = open_runtime(config_mod.load(setup.config), clock=clock)
    w = World(setup, rt, clock, count_calls(rt), names, {s: [] for s in SOURCES})
    for _ in range(2):
        for name in SOURCES:
            w.backup(name)
    reset(w.stores)
    return w


def newest_time(st: MetricsState, source: str, region: str) -> float:
    return st.views[source].newest[region]


def test_a_refresh_reads_only_manifests_it_has_not_read(world: World) -> None:
    w = world
    eu, us = w.regions
    st = MetricsState.from_config(w.rt.config)
    metrics_feed.refresh(w.rt, st)
    assert w.manifest_reads() == 8  # 2 sources x 2 snapshots x 2 regions
    assert len(w.rt.manifest_cache) == 8
    first = dict(st.views)

    # Nothing new: each region is listed again, once for every source, and no
    # manifest is read.
    reset(w.stores)
    metrics_feed.refresh(w.rt, st)
    assert w.manifest_reads() == 0
    for s in w.stores.values():
        assert [k for k in s.calls if k[0] == "list"] == [("list", "sources/")]
    assert st.views == first
    # The RPO watchdog shares the cache.
    newest = scheduler.newest_consistency(w.rt)
    assert w.manifest_reads() == 0
    assert {k: v.timestamp() for k, v in newest.items()} == {
        s: newest_time(st, s, eu) for s in SOURCES}

    # A new snapshot: the one-source refresh after it reads its manifest once per region.
    new = w.backup("files-a")
    reset(w.stores)
    metrics_feed.refresh(w.rt, st, "files-a")
    assert w.manifest_reads() == 2
    assert {(op, name) for s in w.stores.values() for (op, name) in s.calls
            if "/manifests/" in name and op != "list"} == {
        ("get_bytes", layout.manifest_object_name("files-a", new))}
    for region in (eu, us):
        assert newest_time(st, "files-a", region) == w.clock.now.timestamp()
        assert st.views["files-a"].retained[region] == 3
    reset(w.stores)
    metrics_feed.refresh(w.rt, st)
    assert w.manifest_reads() == 0

    # A deleted snapshot disappears from the metrics and from the cache.
    gone = w.ids["files-b"][0]
    w.stores[eu].inner.delete(layout.manifest_object_name("files-b", gone))
    reset(w.stores)
    metrics_feed.refresh(w.rt, st)
    assert w.manifest_reads() == 0
    assert st.views["files-b"].retained == {eu: 1, us: 2}
    assert st.views["files-b"].oldest[eu] > st.views["files-b"].oldest[us]
    assert len(w.rt.manifest_cache) == 9  # 10 manifests, less the one deleted
    assert layout.manifest_object_name("files-b", gone) not in (
        w.rt.manifest_cache.slice(eu, "files-b"))


def test_a_tampered_manifest_is_never_served_from_the_cache(world: World) -> None:
    w = world
    eu, us = w.regions
    st = MetricsState.from_config(w.rt.config)
    metrics_feed.refresh(w.rt, st)
    old, new = w.ids["files-a"]
    new_name = layout.manifest_object_name("files-a", new)
    eu_store = w.stores[eu].inner

    # Rewritten with another size (an edited field): read again, refused, not kept.
    doc = json.loads(eu_store.get_bytes(new_name, manifest.MAX_MANIFEST_BYTES))
    doc["tenant"] = "someone-else"
    eu_store.put_bytes(new_name, json.dumps(doc).encode())
    for _ in range(2):  # also on the next refresh: a refused manifest is not cached
        reset(w.stores)
        metrics_feed.refresh(w.rt, st)
        assert w.manifest_reads() == 1
        assert new_name not in w.rt.manifest_cache.slice(eu, "files-a")
        assert st.views["files-a"].retained == {eu: 1, us: 2}
        assert st.views["files-a"].holding_newest == (us,)

    # Edited in place with the same size (one hex digit of the sha256): the
    # object's version (ETag; mtime and inode) changed, so the refresh reads it
    # again and refuses it too; drctl reads every manifest from storage.
    old_name = layout.manifest_object_name("files-a", old)
    us_store = w.stores[us].inner
    raw = us_store.get_bytes(old_name, manifest.MAX_MANIFEST_BYTES)
    found = re.search(rb'"sha256": *"', raw)
    assert found is not None
    at = found.end()
    forged = raw[:at] + (b"0" if raw[at:at + 1] != b"0" else b"1") + raw[at + 1:]
    assert len(forged) == len(raw)
    us_store.put_bytes(old_name, forged)
    reset(w.stores)
    metrics_feed.refresh(w.rt, st)
    assert w.manifest_reads() == 2  # the refused one again, and the forged one
    assert old_name not in w.rt.manifest_cache.slice(us, "files-a")
    assert st.views["files-a"].retained == {eu: 1, us: 1}
    cached = len(w.rt.manifest_cache)

    reset(w.stores)
    listed = {e["id"]: e for e in w.drctl_json("snapshots", "list", "--source", "files-a")[
        "snapshots"]}
    # drctl authenticates every copy, but downloads only the two never stored
    # in the state folder's disk cache: the refused ones, which are never kept.
    assert w.manifest_reads() == 2
    assert "authenticat" in listed[new]["problems"][eu], listed[new]["problems"]
    assert listed[new]["regions"] == [us]
    assert listed[old]["regions"] == [eu] and us in listed[old]["problems"]
    shown = w.drctl_json("snapshots", "show", old, "--source", "files-a")
    assert shown["regions"] == [eu] and shown["missing_regions"] == [us]
    assert shown["facts"]["files"] == 1  # the whole manifest, not the cache's copy
    assert len(w.rt.manifest_cache) == cached  # drctl neither reads nor fills the cache

    # A tampered disk cache is refused like a tampered bucket: the entry of the good
    # eu copy of `old`, edited (same size), is dropped and the copy read from storage.
    state = w.setup.state / statefs.MANIFEST_CACHE / eu
    info = eu_store.stat(old_name)
    entry = state / DiskCache.entry(old_name, info.size, info.version)
    good = entry.read_bytes()
    at = good.index(b'"sha256"') + 12
    entry.write_bytes(good[:at] + (b"0" if good[at:at + 1] != b"0" else b"1") + good[at + 1:])
    reset(w.stores)
    again = w.drctl_json("snapshots", "show", old, "--source", "files-a")
    assert again["regions"] == [eu] and again == shown
    assert w.stores[eu].count("get_bytes", old_name) == 1
    assert entry.read_bytes() == good  # put back from storage


def test_the_start_lists_storage_once_for_the_metrics_and_the_catch_up(world: World) -> None:
    # Issue 16: the daemon's first look (full refresh, then the catch-up judged from it)
    # lists each region's sources once, not once for each.
    w = world
    daemon = Daemon(w.rt)
    w.clock.now += timedelta(days=2)  # every source overdue: the catch-up has work
    daemon.first_look()
    for s in w.stores.values():
        assert {k: n for k, n in s.calls.items() if k[0] == "list"
                and k[1].startswith("sources/")} == {("list", "sources/"): 1}
    assert daemon.metrics.refreshed_at is not None
    assert sorted(j.id for j in daemon.scheduler.get_jobs()) == [
        f"catchup:{s}" for s in SOURCES]
