"""Audit batches: many records, one mirror (Runtime.audit_batch).

Real stores (local folders, moto S3 servers) wrapped in a counting proxy that
forwards every call. Every record must still reach the local log at once; the
regions get one LIST and at most one PUT each when the outermost batch ends,
and their copies must still verify (`drctl audit verify --region`).
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import S3Region
from counting_store import CountingStore, count_calls, reset
from support import Setup, directory_source, local_region, make_setup

from drdaemon import audit, audit_chain, audit_mirror, runtime
from drdaemon.backup import snapshot
from drdaemon.cli.drctl import cli as drctl_cli
from drdaemon.config import load as load_config
from drdaemon.drills.run import run_drills
from drdaemon.replicate import run_replicate
from drdaemon.runtime import Runtime, open_runtime
from drdaemon.verify import run_verify

T0 = datetime(2031, 3, 1, 2, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def mirror_puts(p: CountingStore) -> int:
    return p.count("put_bytes", "audit/")


def mirror_lists(p: CountingStore) -> int:
    return p.count("list", "audit/")


def trees(tmp_path: Path, names: list[str]) -> list[str]:
    sources = []
    for name in names:
        tree = tmp_path / "trees" / name
        (tree / "d").mkdir(parents=True)
        (tree / "d" / "notes.md").write_text(f"# {name}\n" * 100)
        sources.append(directory_source(name, tree))
    return sources


def local_setup(tmp_path: Path, names: list[str], extra: str = "") -> Setup:
    return make_setup(tmp_path, [local_region("eu", tmp_path / "eu", "europe"),
                                 local_region("us", tmp_path / "us", "north-america")],
                      [s + extra for s in trees(tmp_path, names)])


def mirrored_records(rt: Runtime, region: str) -> int:
    check = audit_mirror.verify_mirror(rt, region)
    assert check.ok, check
    return check.records


def test_a_prune_mirrors_once_per_region_and_the_copy_verifies(
        tmp_path: Path, s3_regions: list[S3Region]) -> None:
    retention = '[sources.retention]\ndaily = 3\nweekly = 0\nmonthly = 0\n'
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [s + retention for s in trees(tmp_path, ["files"])])
    clock = Clock(T0)
    rt = open_runtime(load_config(setup.config), clock=clock)
    for day in range(6):
        clock.now = T0 + timedelta(days=day)
        assert snapshot(rt, rt.config.sources[0]).ok
    clock.now += timedelta(hours=2)
    before = len(audit.read_lines(setup.state))
    proxies = count_calls(rt)

    result = CliRunner().invoke(drctl_cli, ["--config", str(setup.config), "prune", "--json"],
                                obj={"runtime": rt}, catch_exceptions=False)
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)
    assert [c["status"] for c in report["changes"]] == ["done"] * 6  # 3 ids x 2 regions

    records = audit_chain.parse_records(audit.read_lines(setup.state))
    assert [r["event"] for r in records[before:]] == ["prune.trash"] * 6
    for r in s3_regions:
        # The snapshots' mirrors told this runtime what the region holds: no LIST.
        assert mirror_lists(proxies[r.name]) == 0
        assert mirror_puts(proxies[r.name]) == 1
        out = CliRunner().invoke(drctl_cli, ["--config", str(setup.config), "audit", "verify",
                                             "--region", r.name, "--json"],
                                 obj={}, catch_exceptions=False)
        assert out.exit_code == 0, out.output + out.stderr
        assert json.loads(out.stdout)["records"] == len(records)


def test_batches_nest_append_at_once_and_mirror_once_even_on_an_exception(
        tmp_path: Path) -> None:
    setup = local_setup(tmp_path, ["files"])
    rt = open_runtime(load_config(setup.config))
    proxies = count_calls(rt)
    with rt.audit_batch():
        pass
    assert not any(p.calls for p in proxies.values())  # nothing recorded, nothing mirrored

    with rt.audit_batch():
        rt.record_event("test.outer", n=1)
        with rt.audit_batch():
            rt.record_event("test.inner", n=2)
        rt.record_event("test.outer", n=3)
        assert audit.verify(rt).records == 3  # the local record is never deferred
        assert not any(p.calls for p in proxies.values())
    for region, p in proxies.items():
        assert (mirror_lists(p), mirror_puts(p)) == (1, 1)
        assert mirrored_records(rt, region) == 3

    reset(proxies)
    with pytest.raises(RuntimeError, match="boom"), rt.audit_batch():
        rt.record_event("test.failing", n=4)
        raise RuntimeError("boom")
    for region, p in proxies.items():
        assert mirror_puts(p) == 1
        assert mirrored_records(rt, region) == 4

    # Outside a batch, each record is mirrored as it is made.
    reset(proxies)
    rt.record_event("test.single", n=5)
    rt.record_event("test.single", n=6)
    assert {mirror_puts(p) for p in proxies.values()} == {2}


def test_a_batch_in_one_thread_never_holds_back_another_threads_records(
        tmp_path: Path) -> None:
    setup = local_setup(tmp_path, ["files"])
    rt = open_runtime(load_config(setup.config))
    proxies = count_calls(rt)
    inside, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def batched() -> None:
        try:
            with rt.audit_batch():
                rt.record_event("test.batched")
                inside.set()
                assert release.wait(30)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    worker = threading.Thread(target=batched)
    worker.start()
    try:
        assert inside.wait(30)
        assert not any(p.calls for p in proxies.values())
        rt.record_event("test.unbatched")  # this thread has no batch: mirrored at once
        for region, p in proxies.items():
            assert mirror_puts(p) == 1
            assert mirrored_records(rt, region) == 2  # the whole log, the batch's record too
        reset(proxies)
    finally:
        release.set()
        worker.join(30)
    assert not errors
    for region, p in proxies.items():
        # The batch's end looked once more; nothing had grown since, so nothing was written
        # (and nothing listed: the runtime knows what it wrote).
        assert (mirror_lists(p), mirror_puts(p)) == (0, 0)
        assert mirrored_records(rt, region) == 2


def test_a_long_batch_mirrors_on_the_way(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    setup = local_setup(tmp_path, ["files"])
    rt = open_runtime(load_config(setup.config))
    proxies = count_calls(rt)
    monkeypatch.setattr(runtime, "AUDIT_BATCH_MIRROR_INTERVAL", 0.0)
    with rt.audit_batch():
        for n in range(3):
            rt.record_event("test.slow_step", n=n)
            assert {mirrored_records(rt, r) for r in proxies} == {n + 1}
    assert {mirror_puts(p) for p in proxies.values()} == {3}


def test_repair_drill_and_verify_runs_mirror_once_per_region(tmp_path: Path) -> None:
    names = ["files-a", "files-b", "files-c"]
    setup = local_setup(tmp_path, names)
    rt = open_runtime(load_config(setup.config))
    for src in rt.config.sources:
        assert snapshot(rt, src).ok
    for name in names:  # region us loses every copy
        for p in (tmp_path / "us" / "sources" / name).rglob("*"):
            if p.is_file():
                p.unlink()
    proxies = count_calls(rt)
    before = len(audit.read_lines(setup.state))

    report = run_replicate(rt, repair=True)
    assert report.ok and len(report.outcomes) == 3
    events = [r["event"] for r in audit_chain.parse_records(audit.read_lines(setup.state))[before:]]
    assert events == ["replica.repaired"] * 3
    for region, p in proxies.items():
        assert (mirror_lists(p), mirror_puts(p)) == (0, 1)
        assert mirrored_records(rt, region) == before + 3

    reset(proxies)
    run = run_drills(rt, region="us")
    assert [r.verified for r in run.records] == [True] * 3
    for region, p in proxies.items():
        assert (mirror_lists(p), mirror_puts(p)) == (0, 1)
        # a drill, a key unwrap and the proof of the recipient that unwrapped it, each
        assert mirrored_records(rt, region) == before + 12

    # Two copies lost in eu: verify records a failure per copy, mirrored once.
    for name in names[:2]:
        for p in (tmp_path / "eu" / "sources" / name / "data").iterdir():
            p.unlink()
    reset(proxies)
    checked = run_verify(rt)
    assert len(checked.failures) == 2
    records = audit_chain.parse_records(audit.read_lines(setup.state))
    events = [r["event"] for r in records[before + 12:]]
    assert events == ["verify.failed", "verify.failed", "verify.finished"]
    for region, p in proxies.items():
        assert (mirror_lists(p), mirror_puts(p)) == (0, 1)
        assert mirrored_records(rt, region) == before + 15



def test_a_backup_of_several_sources_mirrors_once_per_region(tmp_path: Path) -> None:
    # drctl backup of many sources (a day's snapshots run by hand): one mirror segment
    # per region for the run, not a LIST and a PUT per region after every snapshot.
    names = ["files-a", "files-b", "files-c"]
    setup = local_setup(tmp_path, names)
    result = setup.drctl("backup")
    assert result.exit_code == 0, result.output
    rt = open_runtime(load_config(setup.config))
    records = len(audit.read_lines(setup.state))
    assert records >= 3
    for region in ("eu", "us"):
        segments = [p for p in (tmp_path / region / "audit").rglob("*") if p.is_file()]
        assert len(segments) == 1, segments
        assert mirrored_records(rt, region) == records
