"""After `kill -9` of `drctl backup`, the next `drctl backup` of the same source aborts the
multipart uploads the dead process left open (not only the next daemon start), and nothing
else: a real drctl killed with SIGKILL, real processes as owners, S3 through moto."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from conftest import S3Region
from support import directory_source, make_setup
from test_drill_scratch import owner_of, sleeper  # noqa: F401 - a fixture

from drdaemon import audit, audit_chain, state, statefs


def _open_uploads(region: S3Region) -> set[str]:
    found = region.client().list_multipart_uploads(Bucket=region.bucket).get("Uploads", [])
    return {u["Key"] for u in found}


def test_a_killed_backups_uploads_are_aborted_by_the_next_backup_of_its_source(
        tmp_path: Path, s3_regions: list[S3Region],
        sleeper: Callable[[], subprocess.Popen[bytes]]) -> None:  # noqa: F811
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "blob").write_bytes(os.urandom(11 << 20))  # three 5 MiB parts
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [directory_source("files", tree)])
    eu = s3_regions[0]

    drctl = Path(sys.executable).parent / "drctl"
    proc = subprocess.Popen([str(drctl), "--config", str(setup.config), "backup"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not _open_uploads(eu) and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    [killed] = state.inflight_markers(setup.state)
    assert (killed.pid, killed.source) == (proc.pid, "files")
    left = _open_uploads(eu)
    assert [k for k in left if killed.snapshot_id in k], "killed after its upload ended"

    # Beside it: an upload of a live backup of the same source, and one of a dead backup
    # of another source: neither is this backup's to abort.
    def marker(snap: str, pid: int, token: str, source: str) -> str:
        statefs.write_atomic(setup.state, statefs.inflight_marker(snap),
                             f"{pid}\n{token}\n{source}\n".encode())
        key = f"sources/{source}/data/{snap}.tar.zst.age"
        eu.client().create_multipart_upload(Bucket=eu.bucket, Key=key)
        return key

    live_proc = sleeper()
    live = marker("20260101T000000Z-0000aaaa", live_proc.pid, owner_of(live_proc).token,
                  "files")
    dead_proc = sleeper()
    dead_token = owner_of(dead_proc).token
    dead_proc.kill()
    dead_proc.wait()
    other = marker("20260101T000000Z-0000bbbb", dead_proc.pid, dead_token, "other")

    result = setup.drctl("backup", "--source", "files")
    assert result.exit_code == 0, result.output + result.stderr
    for region in s3_regions:
        assert not [k for k in _open_uploads(region) if killed.snapshot_id in k], region.name
    assert _open_uploads(eu) == {live, other}
    assert {m.snapshot_id for m in state.inflight_markers(setup.state)} == {
        "20260101T000000Z-0000aaaa", "20260101T000000Z-0000bbbb"}
    [event] = [r for r in audit_chain.parse_records(audit.read_lines(setup.state))
               if r.get("event") == "snapshot.uploads_aborted"]
    assert event["snapshots"] == [killed.snapshot_id] and event["uploads"] >= 1
