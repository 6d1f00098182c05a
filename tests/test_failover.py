"""Active/standby with `[daemon] lock_dsn`: daemons as real processes, one state folder per host.

Two hosts share one config (keys, regions, sources) and one lock database; each has
its own state folder and metrics port. The standby waits, takes over when the active
dies or loses the lock, and a holder that lost the lock commits nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from conftest import S3Region, find_free_port
from support import (
    Setup,
    directory_source,
    drctl,
    kill_left_running,
    local_region,
    make_setup,
    snapshot_keys,
)

from drdaemon import config as config_mod
from drdaemon import locks, state
from drdaemon.backup import snapshot
from drdaemon.runtime import open_runtime
from drdaemon.scheduler import Daemon
from drdaemon.sources.pg_lock import lock_key

BIN = Path(sys.executable).parent
INTERVAL = 1  # [daemon] takeover_interval in these tests, seconds
# A standby takes over within two intervals of the lock's release, plus its own start.
TAKEOVER_BOUND = 2 * INTERVAL + 8
# Big enough to be caught mid-upload (5 MiB parts), small enough to upload fast.
BIG_MIB = 25


def wait_for(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@dataclass
class Host:
    """One daemon host: its config (its own state folder and metrics port) and process."""

    config: Path
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen([str(BIN / "drdaemon"), "--config", str(self.config),
                                          "run"], stdout=subprocess.DEVNULL, stderr=err)

    def active(self) -> int | None:
        """drdaemon_active as this host serves it (None if it does not answer)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics",
                                        timeout=2) as r:
                body = r.read().decode()
        except OSError:
            return None
        line = next((x for x in body.splitlines() if x.startswith("drdaemon_active ")), None)
        return None if line is None else int(float(line.split()[1]))

    def said(self, text: str) -> bool:
        return text in self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def hosts(tmp_path: Path, setup: Setup, n: int = 2) -> list[Host]:
    """`n` hosts sharing `setup`'s config but for their state folder and metrics port."""
    text = setup.config.read_text()
    out = []
    for i in range(n):
        port = find_free_port()
        cfg = tmp_path / f"host{i}.toml"
        cfg.write_text(text.replace(f'state_dir = "{setup.state}"',
                                    f'state_dir = "{tmp_path / f"state{i}"}"\n'
                                    f'metrics_address = "127.0.0.1:{port}"'))
        out.append(Host(cfg, port, tmp_path / f"host{i}.log"))
    return out


@pytest.fixture
def running() -> Iterator[list[Host]]:
    """Hosts started by the test; whatever still runs at the end is killed."""
    started: list[Host] = []
    yield started
    kill_left_running(h.proc for h in started)


def lock_daemon_config(pg_server, name: str, extra: str = "") -> str:
    return (f'lock_dsn = "{pg_server.dsn()}"\nlock_name = "{name}"\n'
            f'takeover_interval = "{INTERVAL}s"\nshutdown_grace = "5s"\n{extra}')


def two_local_regions(tmp_path: Path) -> list[str]:
    return [local_region("eu", tmp_path / "r-eu", "europe"),
            local_region("us", tmp_path / "r-us", "north-america")]


def big_tree(tmp_path: Path, mib: int) -> Path:
    tree = tmp_path / "big"
    tree.mkdir()
    (tree / "blob").write_bytes(os.urandom(mib << 20))
    return tree


def small_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "small"
    tree.mkdir()
    (tree / "f.txt").write_text("x" * 1000)
    return tree


def manifests(region: S3Region) -> list[str]:
    return [k for k in snapshot_keys(region.client(), region.bucket) if "/manifests/" in k]


def open_uploads(region: S3Region) -> list[dict]:
    return region.client().list_multipart_uploads(Bucket=region.bucket).get("Uploads", [])


def active_and_standby(tmp_path: Path, s3_regions: list[S3Region], pg_server,
                       running: list[Host], lock: str, more: tuple[str, ...] | list[str] = ()
                       ) -> tuple[Host, Host]:
    """Two hosts on the two S3 regions with a big source (and `more`), both started as
    standbys while the test holds the lock: once it lets go, one is active (and begins
    its uploads) while the other is already waiting. Returns (active, standby)."""
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [directory_source("big", big_tree(tmp_path, BIG_MIB)), *more],
                       daemon=lock_daemon_config(pg_server, lock))
    both = hosts(tmp_path, setup)
    running += both
    with locks.hold_in_postgres(pg_server.dsn(), lock):
        for h in both:
            h.start()
        for h in both:
            wait_for(lambda h=h: h.said(f"standby: the cluster lock {lock!r} is held by "
                                        "drdaemon daemon"))
    wait_for(lambda: sorted(h.active() or 0 for h in both) == [0, 1])
    active = next(h for h in both if h.active() == 1)
    return active, next(h for h in both if h is not active)


def test_standby_takes_over_when_the_active_is_killed_mid_upload(
        tmp_path: Path, s3_regions: list[S3Region], pg_server, running: list[Host]) -> None:
    a, b = active_and_standby(tmp_path, s3_regions, pg_server, running, "failover-kill",
                              [directory_source("small", small_tree(tmp_path))])
    wait_for(lambda: any("/big/" in u["Key"] for u in open_uploads(s3_regions[0])))

    a.stop(signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: b.active() == 1, TAKEOVER_BOUND)
    assert time.monotonic() - killed < TAKEOVER_BOUND
    # The start's catch-up snapshots every source the dead active had not committed.
    wait_for(lambda: all(len(manifests(r)) == 2 for r in s3_regions), 120)
    assert b.stop() == 0
    for region in s3_regions:
        assert open_uploads(region) == [], "the dead active's upload was left open"
        keys = snapshot_keys(region.client(), region.bucket)
        # Nothing half-written lists: one snapshot per source, its data beside its
        # manifest. (Killed between the two, the dead active may leave a data object
        # without a manifest: an orphan, which lists as nothing and prune removes.)
        assert sorted(k.split("/")[1] for k in manifests(region)) == ["big", "small"]
        for m in manifests(region):
            source, snap = m.split("/")[1], m.rsplit("/", 1)[1].removesuffix(".json")
            assert any(k.startswith(f"sources/{source}/data/{snap}.") for k in keys), keys
    listed = [s["source"] for s in _drctl_json(b.config, "snapshots", "list")["snapshots"]]
    assert sorted(listed) == ["big", "small"]


def test_a_holder_that_loses_its_lock_never_commits(
        tmp_path: Path, s3_regions: list[S3Region], pg_server, running: list[Host]) -> None:
    a, b = active_and_standby(tmp_path, s3_regions, pg_server, running, "failover-lost")
    wait_for(lambda: open_uploads(s3_regions[0]) != [])

    # The lock server ends the holder's session (as a restart or a cut connection would).
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        key = lock_key("failover-lost") & 0xFFFFFFFFFFFFFFFF
        ended = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
            "AND granted AND classid::bigint = %s AND objid::bigint = %s",
            (key >> 32, key & 0xFFFFFFFF)).fetchall()
    assert ended == [(True,)]
    assert a.stop(signal.SIGCONT) == 1  # it exits on its own, non-zero
    assert a.said("lost the cluster lock 'failover-lost'")
    assert a.said("snapshot of big failed")
    wait_for(lambda: b.active() == 1, TAKEOVER_BOUND)
    wait_for(lambda: all(manifests(r) for r in s3_regions), 120)
    assert b.stop() == 0
    for region in s3_regions:
        assert len(manifests(region)) == 1, "one tick, one commit: the old holder's is gone"
        assert open_uploads(region) == []
    # Both holders wrote to the one chain in the lock database; it verifies from either.
    for h in (a, b):
        verified = _drctl_json(h.config, "audit", "verify")
        assert verified["ok"], verified


def test_the_commit_is_fenced_when_the_lock_is_gone(tmp_path: Path, pg_server) -> None:
    """The check right before the commit: a snapshot whose daemon lost the lock between
    its last watch and its commit is refused and leaves nothing."""
    setup = make_setup(tmp_path, two_local_regions(tmp_path),
                       [directory_source("files", small_tree(tmp_path))])
    rt = open_runtime(config_mod.load(setup.config))
    cluster = locks.ClusterLock(pg_server.dsn(), "fence-check", interval=timedelta(seconds=1))
    try:
        assert cluster.wait_until_taken(threading.Event(), lambda _holder: None)
        rt.fence = cluster.fence
        assert snapshot(rt, rt.config.sources[0]).ok  # held: commits
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (cluster._session.backend_pid(),))
        result = snapshot(rt, rt.config.sources[0])
    finally:
        cluster.close()
    assert not result.ok
    assert "no longer holds the cluster lock 'fence-check'" in (result.error or "")
    assert len(list((tmp_path / "r-eu").glob("sources/files/manifests/*.json"))) == 1
    assert len(list((tmp_path / "r-eu").glob("sources/files/data/*"))) == 1


def test_taking_the_lock_aborts_the_previous_holders_uploads(tmp_path: Path) -> None:
    """moto dates every upload 2010, so the day-old rule aborts all there: this is the
    rule itself, on local regions, where an upload's age is its temporary file's."""
    setup = make_setup(tmp_path, two_local_regions(tmp_path),
                       [directory_source("files", small_tree(tmp_path))])
    rt = open_runtime(config_mod.load(setup.config))
    eu = rt.store("eu")
    # Begun by the previous holder, on another host: no marker in this state folder.
    theirs = eu.begin_upload("sources/files/data/20261130T000000Z-0000aaaa.tar.zst.age")
    theirs.write_part(b"x")
    # Begun by a live process on this host (a drctl backup): not the previous holder's.
    ours = eu.begin_upload("sources/files/data/20261130T000000Z-0000bbbb.tar.zst.age")
    ours.write_part(b"y")

    def open_ones() -> list[str]:
        return sorted(p.name for p in (tmp_path / "r-eu").rglob(".drdaemon-tmp-*"))

    with state.inflight(setup.state, "20261130T000000Z-0000bbbb", "", "files"):
        daemon = Daemon(rt)
        daemon.clean_stale_uploads()  # no cluster lock: the day-old rule only
        assert len(open_ones()) == 2
        daemon.lock_taken_at = rt.clock() + timedelta(seconds=1)
        daemon.clean_stale_uploads()
        assert [n for n in open_ones() if "0000aaaa" in n] == []
        assert [n for n in open_ones() if "0000bbbb" in n] != []
    ours.abort()


def test_standby_stops_at_once_on_sigterm(tmp_path: Path, pg_server,
                                          running: list[Host]) -> None:
    setup = make_setup(tmp_path, two_local_regions(tmp_path),
                       [directory_source("files", small_tree(tmp_path))],
                       daemon=lock_daemon_config(pg_server, "standby-stop"))
    (host,) = hosts(tmp_path, setup, 1)
    running.append(host)
    with locks.hold_in_postgres(pg_server.dsn(), "standby-stop"):
        host.start()
        wait_for(lambda: host.active() == 0)
        began = time.monotonic()
        assert host.stop() == 0
        assert time.monotonic() - began < 3
    assert not list((tmp_path / "r-eu").glob("sources/*/manifests/*.json"))


def test_drctl_prune_waits_for_another_hosts_deletions(tmp_path: Path, pg_server) -> None:
    setup = make_setup(tmp_path, two_local_regions(tmp_path),
                       [directory_source("files", small_tree(tmp_path))],
                       daemon=lock_daemon_config(pg_server, "deleting",
                                                 'deletions_lock_wait = "1s"'))
    other_host_state = tmp_path / "other-state"
    other_host_state.mkdir()
    with locks.deletions_lock(other_host_state, pg_server.dsn(), "deleting"):
        began = time.monotonic()
        held = setup.drctl("prune")
        assert time.monotonic() - began < 10
    assert held.exit_code == 1
    assert "the lock 'deleting:deletions' is held by drdaemon deletions" in held.stderr
    assert setup.drctl("prune").exit_code == 0


def _drctl_json(config: Path, *args: str) -> dict:
    out = drctl(["--config", str(config), *args, "--json"])
    assert out.exit_code == 0, out.stderr
    return json.loads(out.stdout)


def test_the_new_active_continues_the_old_ones_state_and_audit_chain(
        tmp_path: Path, pg_server, running: list[Host]) -> None:
    """With lock_dsn, what the killed active recorded (a source's failures, a drill, an
    orphan sighting, an offboarding, the audit chain) is where the standby reads it."""
    from drdaemon import lifecycle, shared_state
    from drdaemon.drills.records import newest_verified

    (tmp_path / "c").mkdir()
    setup = make_setup(tmp_path, two_local_regions(tmp_path),
                       [directory_source("small", small_tree(tmp_path)),
                        directory_source("broken", tmp_path / "missing"),
                        directory_source("leaving", small_tree(tmp_path / "c"), tenant="uni-c")],
                       daemon=lock_daemon_config(pg_server, "continues"))
    a, b = hosts(tmp_path, setup)
    running += [a, b]
    a.start()
    wait_for(lambda: a.active() == 1)
    a_state, b_state = (config_mod.load(h.config).daemon for h in (a, b))
    for d in (a_state, b_state):  # this process reads each host's state as it would
        shared_state.open_for(d)
    wait_for(lambda: state.read_outcome(a_state.state_dir, "broken").failures == 1
             and state.read_outcome(a_state.state_dir, "small").last_success is not None)
    assert drctl(["--config", str(a.config), "backup", "--source", "broken"]).exit_code != 0
    assert state.read_outcome(a_state.state_dir, "broken").failures == 2
    ran = drctl(["--config", str(a.config), "drill", "run", "--source", "small", "--json"])
    drilled = json.loads(ran.stdout)
    assert drilled["drills"][0]["verified"], drilled
    orphan = "sources/small/data/20261101T000000Z-0000dead.tar.zst.age"
    (tmp_path / "r-eu" / orphan).write_bytes(b"left behind")
    seen = _orphan_first_seen(a.config, orphan)
    end = (lifecycle.datetime.now(lifecycle.UTC) - timedelta(days=1)).date().isoformat()
    offboarded = drctl(["--config", str(a.config), "tenant", "offboard", "uni-c", "--end", end])
    assert offboarded.exit_code == 0, offboarded.output + offboarded.stderr
    before = _drctl_json(a.config, "audit", "verify")
    assert before["ok"], before

    b.start()
    wait_for(lambda: b.active() == 0)
    a.stop(signal.SIGKILL)
    wait_for(lambda: b.active() == 1, TAKEOVER_BOUND)
    # (a) the source's failures go on from the old active's count
    assert state.read_outcome(b_state.state_dir, "broken").failures >= 2
    # (b) the drill record: listed, and protecting its snapshot from prune
    listed = _drctl_json(b.config, "drill", "list")["drills"]
    assert [d["id"] for d in listed] == [drilled["drills"][0]["id"]]
    assert newest_verified(b_state.state_dir) == {"small": drilled["drills"][0]["snapshot_id"]}
    report = drctl(["--config", str(b.config), "drill", "report", "--format", "json"])
    assert report.exit_code == 0 and drilled["drills"][0]["id"] in report.stdout, report.stderr
    # (c) the orphan was first seen when the old active saw it
    assert _orphan_first_seen(b.config, orphan) == seen
    # (d) the offboarded tenant's erasure deadline
    rt_b = open_runtime(config_mod.load(b.config))
    assert lifecycle.load(rt_b, "uni-c").erase_due == lifecycle.deadline(
        lifecycle.date.fromisoformat(end))
    # (e) one chain: the new active's records follow the old one's, on either host
    assert drctl(["--config", str(b.config), "backup", "--source", "small"]).exit_code == 0
    for h in (a, b):
        after = _drctl_json(h.config, "audit", "verify")
        assert after["ok"], after
        assert after["records"] > before["records"]
    lines = shared_state.at(b_state.state_dir).read_log("audit/audit.jsonl").splitlines()
    events = [json.loads(x)["event"] for x in lines[before["records"]:]]
    assert "snapshot.committed" in events
    assert b.stop() == 0


def _orphan_first_seen(config: Path, name: str) -> str:
    report = _drctl_json(config, "prune")
    found = [o["first_seen"] for p in report["orphans"] for o in p["objects"]
             if o["name"] == name]
    assert found, report["orphans"]
    return found[0]
