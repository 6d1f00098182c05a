"""Fault injection: processes killed mid-upload, regions down, sources failing.

Each test drives real processes against real moto servers and checks that
nothing half-written lists as a snapshot and that the next run recovers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import S3Region
from support import Setup, directory_source, make_setup


def wait_for(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def exe(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def keys(region: S3Region) -> list[str]:
    return [o["Key"] for o in
            region.client().list_objects_v2(Bucket=region.bucket).get("Contents", [])]


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
