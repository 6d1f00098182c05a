"""The shared state in PostgreSQL (`[daemon] lock_dsn`): one audit chain and one truth
for every host of a cluster, and the move of a single host's state folder into it.

Hosts are processes with state folders of their own sharing one config and one
lock database (tests/conftest.py's pg_server)."""

from __future__ import annotations

import itertools
import json
import logging
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from support import Setup, directory_source, drctl, local_region, make_setup

from drdaemon import audit, lifecycle, orphans, shared_state, state
from drdaemon import config as config_mod
from drdaemon.audit_chain import HANDOVER, verify_lines
from drdaemon.drills import records as drill_records
from drdaemon.runtime import open_runtime
from drdaemon.signing import generate_signing_key

N = 40  # records (or updates) each process makes

# One "host": opens its runtime on its config, then appends or updates N times.
_WORKER = """
import sys
from datetime import UTC, datetime
from drdaemon import audit, config, state
from drdaemon.runtime import open_runtime
import os, time
rt = open_runtime(config.load(sys.argv[1]))
what, n, ready = sys.argv[2], int(sys.argv[3]), sys.argv[4]
open(ready + sys.argv[1][-6:-5], "w").close()  # both start together (host0.toml, host1.toml)
while not all(os.path.exists(ready + i) for i in "01"):
    time.sleep(0.01)
for i in range(n):
    if what == "audit":
        audit.append(rt, "test.record", {"i": i, "by": sys.argv[1]})
    else:
        state.record_outcome(rt.config.daemon.state_dir, "files", datetime.now(UTC), False,
                             f"failure {i}")
"""


def _tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    tree.mkdir(exist_ok=True)
    (tree / "f.txt").write_text("x")
    return tree


def _cluster_setup(tmp_path: Path, pg_server, name: str,
                   signed: bool = False) -> tuple[Setup, list[Path]]:
    """One config on a lock database, and two host configs differing by state folder;
    `signed`: with a signing key (one for both hosts, as they share the config)."""
    setup = make_setup(tmp_path, [local_region("eu", tmp_path / "r-eu", "europe"),
                                  local_region("us", tmp_path / "r-us", "north-america")],
                       [directory_source("files", _tree(tmp_path))],
                       daemon=f'lock_dsn = "{pg_server.dsn()}"\nlock_name = "{name}"\n')
    text = setup.config.read_text()
    if signed:
        key = tmp_path / "keys" / "signing.key"
        generate_signing_key(key)
        text = text.replace("[keys]\n", f'[keys]\nsigning_key_file = "{key}"\n')
    hosts = []
    for i in range(2):
        cfg = tmp_path / f"host{i}.toml"
        cfg.write_text(text.replace(f'state_dir = "{setup.state}"',
                                    f'state_dir = "{tmp_path / f"state{i}"}"'))
        hosts.append(cfg)
    return setup, hosts


def _race(hosts: list[Path], what: str) -> None:
    ready = str(hosts[0].parent / f"ready-{what}-")
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(h), what, str(N), ready],
                              stderr=subprocess.PIPE) for h in hosts]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()


def test_two_hosts_appending_at_once_write_one_chain(tmp_path: Path, pg_server) -> None:
    _, hosts = _cluster_setup(tmp_path, pg_server, "chain-race", signed=True)
    _race(hosts, "audit")
    for cfg in hosts:  # either host reads the one chain, every record of both
        rt = open_runtime(config_mod.load(cfg))
        lines = audit.read_lines(rt.config.daemon.state_dir)
        check = verify_lines(lines, audit.chain_keys(rt))
        assert check.ok, check.reason
        # One signing key for both: one handover to it, whichever host appended first.
        assert [json.loads(x)["event"] for x in lines].count(HANDOVER) == 1
        assert check.signer == rt.signing_key.fingerprint
        mine = [json.loads(line) for line in lines if b'"test.record"' in line]
        assert len(mine) == 2 * N
        assert {r["by"] for r in mine} == {str(h) for h in hosts}
        for by in hosts:  # each host's records in the order it made them
            assert [r["i"] for r in mine if r["by"] == str(by)] == list(range(N))
        switches = sum(x["by"] != y["by"] for x, y in itertools.pairwise(mine))
        assert switches > 1, "the two hosts did not append at once"
        # Nothing went to the host's own state folder.
        assert not (rt.config.daemon.state_dir / "audit" / "audit.jsonl").exists()


def test_read_modify_writes_from_two_hosts_lose_no_update(tmp_path: Path, pg_server) -> None:
    _, hosts = _cluster_setup(tmp_path, pg_server, "rmw-race")
    _race(hosts, "outcome")
    for cfg in hosts:
        daemon = config_mod.load(cfg).daemon
        shared_state.open_for(daemon)
        out = state.read_outcome(daemon.state_dir, "files")
        assert out.failures == 2 * N
        assert out.last_error is not None and out.last_error.startswith("failure ")


def _drill(source: str, snap: str) -> drill_records.DrillRecord:
    now = datetime(2026, 11, 30, 3, 0, tzinfo=UTC).isoformat()
    return drill_records.DrillRecord(
        id=f"d-{snap}", source=source, tenant="uni-a", tier="paid", region="eu",
        snapshot_id=snap, sha256=None, started_at=now, finished_at=now, ok=True, reasons=[],
        rto_seconds=1.0, rpo_seconds=1.0, worst_gap_seconds=None,
        throughput_bytes_per_second=None, stored_bytes=1, plaintext_bytes=1,
        rto_target_seconds=86400, rpo_target_seconds=86400, projected_tier_rto_seconds=None,
        timings={}, verified=True)


def test_a_single_host_moved_to_lock_dsn_keeps_its_state_and_a_second_host_does_not_import(
        tmp_path: Path, pg_server, caplog: pytest.LogCaptureFixture) -> None:
    _, hosts = _cluster_setup(tmp_path, pg_server, "moved")
    single = tmp_path / "single.toml"  # host0's config before lock_dsn
    single.write_text(hosts[0].read_text().replace(f'lock_dsn = "{pg_server.dsn()}"', ""))
    rt = open_runtime(config_mod.load(single))
    sdir = rt.config.daemon.state_dir
    assert rt.config.daemon.lock_dsn is None
    for i in range(3):
        rt.record_event("test.before", i=i)
    drill_records.append_record(sdir, _drill("files", "20261129T000000Z-0000aaaa"))
    state.record_outcome(sdir, "files", rt.clock(), False, "disk on fire")
    seen = datetime(2026, 11, 1, tzinfo=UTC)
    orphans.save_seen(sdir, {}, set(), [orphans.OrphanPlan("files", "eu", 1, (
        orphans.OrphanVerdict("sources/files/data/x.tar.zst.age", "x", 1, orphans.KEEP, (),
                              seen),))], set(), {("files", "eu")})
    lifecycle.update(rt, "uni-a", lambda s: lifecycle.TenantState(
        "uni-a", end=datetime(2031, 3, 1).date(),
        erase_due=lifecycle.deadline(datetime(2031, 3, 1).date())))
    before = audit.read_lines(sdir)
    shared_state.detach(sdir)

    with caplog.at_level(logging.WARNING, logger="drdaemon"):
        moved = open_runtime(config_mod.load(hosts[0]))
    assert "was empty: imported this host's state folder" in caplog.text
    lines = audit.read_lines(sdir)
    assert lines[:len(before)] == before, "the chain is imported as it was"
    assert json.loads(lines[len(before)])["event"] == "state.imported"
    assert audit.verify(moved).ok
    # The second host, with state of its own, joins: its state is left out, and said so.
    single_other = tmp_path / "single1.toml"
    single_other.write_text(hosts[1].read_text().replace(f'lock_dsn = "{pg_server.dsn()}"', ""))
    alone = open_runtime(config_mod.load(single_other))
    alone.record_event("test.elsewhere")
    odir = alone.config.daemon.state_dir
    drill_records.append_record(odir, _drill("files", "20261130T000000Z-0000bbbb"))
    shared_state.detach(odir)
    other = config_mod.load(hosts[1])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="drdaemon"):
        joined = open_runtime(other)
    assert "is not used: the cluster state 'moved'" in caplog.text
    for where in (sdir, odir):  # either host sees the moved host's state, and only it
        assert audit.read_lines(where) == lines
        assert drill_records.newest_verified(where) == {"files": "20261129T000000Z-0000aaaa"}
        assert state.read_outcome(where, "files").last_error == "disk on fire"
        assert orphans.load_seen(where) == {("eu", "sources/files/data/x.tar.zst.age"): seen}
        assert lifecycle.load(joined, "uni-a").erase_due == lifecycle.deadline(
            datetime(2031, 3, 1).date())
    verified = drctl(["--config", str(hosts[1]), "audit", "verify"])
    assert verified.exit_code == 0, verified.output + verified.stderr
