"""The daemon on the embedded demo config: what the README's first command runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from support import drctl, drdaemon


def state(home: Path) -> Path:
    return home / ".local" / "state" / "drdaemon"


def test_run_once_on_embedded_default_takes_first_snapshot(tmp_path: Path) -> None:
    home = Path(os.environ["HOME"])
    result = drdaemon(["run", "--once"])
    assert result.exit_code == 0, result.stderr
    keys = state(home) / "keys"
    assert (keys / "identity.txt").stat().st_mode & 0o777 == 0o600
    assert (keys / "manifest.key").stat().st_mode & 0o777 == 0o600
    listed = json.loads(drctl(["snapshots", "list", "--json"]).stdout)["snapshots"]
    assert len(listed) == 1
    assert listed[0]["regions"] == ["local-europe", "local-america"]

    # Not overdue any more: a second pass takes nothing new.
    assert drdaemon(["run", "--once"]).exit_code == 0
    assert len(json.loads(drctl(["snapshots", "list", "--json"]).stdout)["snapshots"]) == 1

    out = tmp_path / "restored"
    result = drctl(["restore", "latest", "--source", "demo-tenant-files", "--to", str(out)])
    assert result.exit_code == 0, result.stderr
    assert (out / "courses" / "intro-biology" / "syllabus.md").exists()


def test_daemon_process_snapshots_at_start_and_stops_on_sigterm() -> None:
    home = Path(os.environ["HOME"])
    exe = Path(sys.executable).parent / "drdaemon"
    proc = subprocess.Popen([str(exe), "run"], stderr=subprocess.PIPE, text=True)
    try:
        manifests = state(home) / "regions" / "america" / "sources" / "demo-tenant-files"
        deadline = time.monotonic() + 60
        while not list(manifests.glob("manifests/*.json")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list(manifests.glob("manifests/*.json")), "no snapshot taken at start"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    outcome = [ln for ln in lines if ln.get("job") == "snapshot"]
    assert outcome and outcome[0]["ok"] is True
    assert any("stopping" in ln["msg"] for ln in lines)
