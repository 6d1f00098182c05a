"""Fault injection: processes killed mid-upload, regions down, sources failing.

Each test drives real processes against real moto servers and checks that
nothing half-written lists as a snapshot and that the next run recovers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import S3Region
from support import Setup, directory_source, make_setup, snapshot_keys


def wait_for(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def exe(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def keys(region: S3Region) -> list[str]:
    return snapshot_keys(region.client(), region.bucket)


def open_uploads(region: S3Region) -> list[dict]:
    return region.client().list_multipart_uploads(Bucket=region.bucket).get("Uploads", [])


@pytest.fixture
def big_setup(tmp_path: Path, s3_regions: list[S3Region]) -> Setup:
    tree = tmp_path / "big"
    tree.mkdir()
    (tree / "blob").write_bytes(os.urandom(120 << 20))
    return make_setup(tmp_path, [r.toml() for r in s3_regions],
                      [directory_source("files", tree)])


@pytest.mark.parametrize("command", [["drctl", "backup"], ["drdaemon", "run"]])
def test_kill_9_mid_upload_leaves_nothing_and_next_start_recovers(
        big_setup: Setup, s3_regions: list[S3Region], command: list[str]) -> None:
    proc = subprocess.Popen([exe(command[0]), "--config", str(big_setup.config),
                             *command[1:]], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: open_uploads(s3_regions[0]))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    for region in s3_regions:
        assert not [k for k in keys(region) if k.endswith(".json")], "a snapshot was listed"
    assert open_uploads(s3_regions[0]), "the kill left no upload behind: test is void"

    result = subprocess.run([exe("drdaemon"), "--config", str(big_setup.config), "run",
                             "--once"], capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert "aborted 1 stale incomplete upload" in result.stderr
    for region in s3_regions:
        assert not open_uploads(region)
        assert len([k for k in keys(region) if k.endswith(".json")]) == 1
    assert big_setup.drctl("status").exit_code == 0


# -- disk full during restore -------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path: Path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs",
                                            str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_during_restore_is_clear_and_leaves_nothing(
        tmp_path: Path, s3_regions: list[S3Region], tiny_disk: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big.bin").write_bytes(os.urandom(5 << 20))
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [directory_source("files", tree)])
    assert setup.drctl("backup").exit_code == 0
    result = setup.drctl("restore", "latest", "--source", "files", "--to",
                         str(tiny_disk / "out"))
    assert result.exit_code == 1
    assert "No space left on device" in result.stderr
    assert list(tiny_disk.iterdir()) == []


# -- the source fails halfway -----------------------------------------------------------

def test_pg_dump_killed_halfway_commits_nothing(tmp_path: Path, pg_database: str,
                                                s3_regions: list[S3Region]) -> None:
    import psycopg
    from support import postgres_source

    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE blobs (id int, b bytea)")
        conn.execute("INSERT INTO blobs SELECT i, decode(repeat(md5(i::text), 20000), 'hex') "
                     "FROM generate_series(1, 400) i")
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [postgres_source("db", pg_database)])
    proc = subprocess.Popen([exe("drctl"), "--config", str(setup.config), "backup"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def pg_dump_pid() -> int | None:
        out = subprocess.run(["pgrep", "-P", str(proc.pid), "-x", "pg_dump"],
                             capture_output=True, text=True).stdout.split()
        return int(out[0]) if out else None

    wait_for(lambda: pg_dump_pid() is not None or proc.poll() is not None, 30)
    pid = pg_dump_pid()
    assert pid is not None, "pg_dump finished before it could be killed: test is void"
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "pg_dump" in out and "failed" in out
    for region in s3_regions:
        assert keys(region) == [] and not open_uploads(region)
    status = setup.drctl("status", "--json")
    assert status.exit_code == 1 and "no snapshot yet" in status.stdout


# -- storage content swapped by someone with bucket access ---------------------------------

def test_manifest_swapped_between_snapshots_is_refused(tmp_path: Path,
                                                       s3_regions: list[S3Region]) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a").write_text("one")
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [directory_source("files", tree)])
    first = setup.drctl_json("backup")[0]["snapshot_id"]
    (tree / "a").write_text("two")
    time.sleep(1.1)  # ids carry the second
    second = setup.drctl_json("backup")[0]["snapshot_id"]
    for region in s3_regions:
        c = region.client()
        old = c.get_object(Bucket=region.bucket,
                           Key=f"sources/files/manifests/{first}.json")["Body"].read()
        c.put_object(Bucket=region.bucket, Key=f"sources/files/manifests/{second}.json",
                     Body=old)
    listing = setup.drctl("snapshots", "list", "--json")
    assert listing.exit_code == 1  # an unreadable snapshot is no quiet success
    swapped = next(s for s in json.loads(listing.stdout)["snapshots"] if s["id"] == second)
    assert swapped["regions"] == [] and "found as" in str(swapped["problems"])
    assert swapped["unreadable"]
    result = setup.drctl("restore", second, "--source", "files", "--to", str(tmp_path / "o"))
    assert result.exit_code == 2 and "found as" in result.stderr
    assert not (tmp_path / "o").exists()


# -- flaky storage ------------------------------------------------------------------

@pytest.mark.parametrize("throttle", [False, True], ids=["resets", "503-slowdown"])
def test_connection_resets_are_retried_and_the_snapshot_is_exact(
        tmp_path: Path, s3_regions: list[S3Region], throttle: bool) -> None:
    from urllib.parse import urlparse

    from flaky_proxy import FlakyProxy

    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "blob").write_bytes(os.urandom(24 << 20))  # several 5 MiB parts
    eu, us = s3_regions
    up = urlparse(eu.endpoint_url)
    proxy = FlakyProxy((up.hostname or "127.0.0.1", up.port or 80), every=3, after_bytes=100_000,
                       throttle=throttle)
    try:
        flaky_eu = eu.toml().replace(eu.endpoint_url, proxy.url)
        setup = make_setup(tmp_path, [flaky_eu, us.toml()], [directory_source("files", tree)])
        result = setup.drctl("backup", "--json")
        assert proxy.resets > 0, "the proxy never reset a connection: test is void"
        import json

        [snap] = json.loads(result.stdout)
        # botocore's retries absorb the resets: the flaky region holds an exact copy.
        assert snap["ok"] and snap["regions"] == ["eu-frankfurt", "us-virginia"], snap
        assert setup.drctl("verify", "--region", "eu-frankfurt").exit_code == 0
        assert not open_uploads(eu)
        out = tmp_path / "out"
        restored = setup.drctl("restore", "latest", "--source", "files", "--to", str(out),
                               "--region", "eu-frankfurt")
        assert restored.exit_code == 0, restored.stderr
        assert (out / "blob").read_bytes() == (tree / "blob").read_bytes()
    finally:
        proxy.close()


def test_both_regions_down_is_a_clear_failure(tmp_path: Path, moto_region_factory) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_text("x")
    eu = moto_region_factory("eu-frankfurt", "eu-central-1", "europe")
    us = moto_region_factory("us-virginia", "us-east-1", "north-america")
    setup = make_setup(tmp_path, [eu.toml(), us.toml()], [directory_source("files", tree)])
    eu.server.stop()
    us.server.stop()
    result = subprocess.run([exe("drctl"), "--config", str(setup.config), "backup"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 1
    assert "FAILED" in result.stdout and "Traceback" not in result.stderr + result.stdout
    assert "eu-frankfurt" in result.stdout and "us-virginia" in result.stdout
    outcome = (setup.state / "sources" / "files.json").read_text()
    assert '"last_failure": "2' in outcome


def test_wrong_password_fails_with_the_reason_and_never_echoes_it(
        tmp_path: Path, pg_server, s3_regions: list[S3Region]) -> None:
    import psycopg
    from support import postgres_source

    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS pw_user")
        conn.execute("CREATE ROLE pw_user LOGIN PASSWORD 'the-right-one'")
    hba = Path(pg_server.data_dir) / "pg_hba.conf"
    original = hba.read_text()
    # Only this role must prove a password; every other test keeps trust auth.
    hba.write_text(f"host all pw_user 127.0.0.1/32 scram-sha-256\n{original}")
    try:
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
        dsn = f"host=127.0.0.1 port={pg_server.port} user=pw_user dbname=postgres"
        setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                           [postgres_source("db", dsn)])
        env = dict(os.environ, PGPASSWORD="Wr0ng-Secret-Guess")
        result = subprocess.run([exe("drctl"), "--config", str(setup.config), "backup"],
                                capture_output=True, text=True, timeout=120, env=env,
                                check=False)
    finally:
        hba.write_text(original)
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
    assert result.returncode == 1
    assert "password authentication failed" in result.stdout
    assert "Wr0ng-Secret-Guess" not in result.stdout + result.stderr
    for region in s3_regions:
        assert keys(region) == []
