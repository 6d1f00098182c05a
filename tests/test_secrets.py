"""After a full run, no secret appears anywhere drdaemon writes or says.

Secrets: the age identity, the manifest key (and the audit key derived from
it), and a PostgreSQL password given the libpq way (PGPASSWORD). Places: CLI
output and errors, the daemon's log, the state folder (audit log, drill
records, outcomes), every object in every bucket except the encrypted data
objects, the metrics page and the auditor report.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

from conftest import S3Region
from lms import populate
from support import directory_source, make_setup, postgres_source

from drdaemon import audit_chain
from drdaemon import config as config_mod
from drdaemon.keys import load_manifest_key
from drdaemon.runtime import open_runtime
from drdaemon.scheduler import Daemon

PASSWORD = "hunter2-Very-Secret-pw"


def test_no_secret_anywhere_after_a_full_run(tmp_path: Path, pg_database: str,
                                             s3_regions: list[S3Region],
                                             free_port: Callable[[], int],
                                             monkeypatch) -> None:
    populate(pg_database)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "notes.txt").write_text("course notes")
    port = free_port()
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [postgres_source("db", pg_database), directory_source("files", tree)],
                       daemon=f'metrics_address = "127.0.0.1:{port}"')
    # libpq's own means: the server trusts loopback, so any password works, and it
    # must still never be repeated by drdaemon.
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    env = dict(os.environ)
    said: list[str] = []

    def run(*args: str, ok: tuple[int, ...] = (0,)) -> None:
        proc = subprocess.run([str(Path(sys.executable).parent / args[0]), "--config",
                               str(setup.config), *args[1:]], capture_output=True, text=True,
                              env=env, timeout=300, check=False)
        assert proc.returncode in ok, (args, proc.stdout, proc.stderr)
        said.extend([proc.stdout, proc.stderr])

    run("drdaemon", "run", "--once")
    run("drctl", "backup")
    run("drctl", "status", "--json")
    run("drctl", "snapshots", "list")
    run("drctl", "restore", "latest", "--source", "db", "--to", "secrets_restored")
    run("drctl", "restore", "latest", "--source", "files", "--to", str(tmp_path / "r"))
    run("drctl", "restore", "latest", "--source", "db", "--to", "x",
        "--identity", str(tmp_path / "missing"), ok=(2,))
    run("drctl", "verify", "--deep")
    run("drctl", "drill", "run", ok=(0, 1))
    run("drctl", "drill", "report", "--since", "1d", "--format", "html", "-o",
        str(tmp_path / "report.html"))
    run("drctl", "prune", "--dry-run")
    run("drctl", "audit", "verify")

    rt = open_runtime(config_mod.load(setup.config))
    daemon = Daemon(rt)
    daemon.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            said.append(resp.read().decode())
    finally:
        daemon.stop()

    identity = next(line for line in setup.identity.read_text().splitlines()
                    if line.startswith("AGE-SECRET-KEY-"))
    mkey = load_manifest_key(setup.manifest_key)
    needles = [identity, identity.lower(), mkey.secret.hex(), audit_chain.audit_key(mkey).hex(),
               PASSWORD]

    def check(where: str, text: str) -> None:
        found = [n for n in needles if n.lower() in text.lower()]
        assert not found, f"secret found in {where}"

    for i, text in enumerate(said):
        check(f"output #{i}", text)
    check("report", (tmp_path / "report.html").read_text())
    state_files = [p for p in setup.state.rglob("*") if p.is_file()]
    assert any(p.name == "audit.jsonl" for p in state_files)
    for path in state_files:
        check(str(path), path.read_bytes().decode("utf-8", "replace"))
    objects = 0
    for region in s3_regions:
        client = region.client()
        for obj in client.list_objects_v2(Bucket=region.bucket).get("Contents", []):
            if obj["Key"].endswith(".age"):
                continue  # ciphertext
            body = client.get_object(Bucket=region.bucket, Key=obj["Key"])["Body"].read()
            check(obj["Key"], body.decode("utf-8", "replace"))
            objects += 1
    assert objects >= 6  # manifests and audit segments were scanned
