"""The evidence bundle (`drctl audit export`, `drctl audit verify --bundle`): checked by an
auditor with stock tools (VERIFY.md's own commands) and with drctl, holding only the public
key, on a copy with no drdaemon key or config around; any edited file is caught by both."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from conftest import S3Region
from hypothesis import given
from hypothesis import strategies as st
from support import Setup, directory_source, drctl, make_setup, run_cli

from drdaemon import anchors, audit
from drdaemon.audit_chain import line_hash
from drdaemon.drills.records import DrillRecord, matches_audit
from drdaemon.evidence_check import parse_sums
from drdaemon.signing import generate_signing_key, load_signing_key, public_path


def with_signing_key(setup: Setup) -> Path:
    key = setup.config.parent / "keys" / "signing.key"
    generate_signing_key(key)
    mkey = f'manifest_key_file = "{setup.manifest_key}"\n'
    setup.config.write_text(setup.config.read_text().replace(
        mkey, mkey + f'signing_key_file = "{key}"\n'))
    return key


def verify_commands(bundle: Path) -> list[str]:
    """The stock-tool commands of the bundle's VERIFY.md (indented lines), but for the
    anchors' (this bundle has none)."""
    text = (bundle / "VERIFY.md").read_text()
    return [line.strip() for line in text.splitlines()
            if line.startswith("    ") and "<seq>" not in line and "drctl" not in line]


def run_stock(bundle: Path, home: Path, key: Path) -> list[subprocess.CompletedProcess[str]]:
    """VERIFY.md's commands in `bundle`, as an auditor without drdaemon's keys runs them."""
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "LC_ALL": "C"}
    return [subprocess.run(["bash", "-o", "pipefail", "-c", cmd.replace("KEY.pub", str(key))],
                           cwd=bundle, env=env, capture_output=True, text=True, check=False)
            for cmd in verify_commands(bundle)]


def test_bundle_checks_with_stock_tools_and_drctl(tmp_path: Path,
                                                 s3_regions: list[S3Region]) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_text("evidence\n")
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [directory_source("lms-files", tree)])
    key_file = with_signing_key(setup)
    [snap] = setup.drctl_json("backup")
    [drill] = setup.drctl_json("drill", "run")["drills"]
    # An anchor of record 1, as the anchor job keeps it in the state folder (its
    # time-stamp token is another test's matter: tests/test_anchors.py).
    lines = audit.read_lines(setup.state)
    anchor = anchors.document(socket.gethostname(), anchors.chain_of(lines) or "", 1,
                              line_hash(lines[1]), datetime.now(UTC))
    folder = setup.state / anchors.FOLDER
    folder.mkdir(mode=0o700)
    (folder / "000000000001.json").write_bytes(anchor)

    out = tmp_path / "out" / "bundle"
    out.parent.mkdir()
    result = setup.drctl("audit", "export", "--to", str(out), "--since", "90d", "--json")
    assert result.exit_code == 0, result.output + result.stderr
    made = json.loads(result.stdout)
    assert made["ok"] and (made["drills"], made["manifests"], made["anchors"]) == (1, 1, 1), made
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "SHA256SUMS", "SHA256SUMS.sig", "VERIFY.md", "anchors/000000000001.json",
        "audit/audit.jsonl", "bundle.json",
        "drills/drills.jsonl", f"manifests/lms-files/{snap['snapshot_id']}.json",
        "signing-key.pub"]
    assert json.loads((out / "drills" / "drills.jsonl").read_text())["id"] == drill["id"]
    # Nothing half-written beside it, and never into a folder that holds something.
    assert os.listdir(out.parent) == ["bundle"]
    again = setup.drctl("audit", "export", "--to", str(out))
    assert again.exit_code == 2 and "not an empty folder" in again.stderr

    # The auditor's machine: a copy of the bundle, their copy of the public key, no
    # drdaemon key, no config, an empty home.
    auditor = tmp_path / "auditor"
    (auditor / "home").mkdir(parents=True)
    key = auditor / "operator.pub"
    shutil.copy(public_path(key_file), key)
    pristine = auditor / "bundle"
    shutil.copytree(out, pristine)
    checks = run_stock(pristine, auditor / "home", key)
    assert len(checks) == 3 and all(c.returncode == 0 for c in checks), checks
    fingerprint, signature, sums = (c.stdout for c in checks)
    assert made["signing_key"] == "ed25519:" + fingerprint.strip()
    assert "Signature Verified Successfully" in signature
    assert sums.count(": OK") == 7 and "FAILED" not in sums
    env = {"HOME": str(auditor / "home"), "PATH": os.environ["PATH"]}
    proc = run_cli("drctl", "audit", "verify", "--bundle", str(pristine), "--public-key",
                   str(key), "--json", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checked = json.loads(proc.stdout)
    assert (checked["drills"], checked["manifests"], checked["files"]) == (1, 1, 7)
    assert checked["audit"]["head"] == made["head"]

    # Any file edited: both the stock tools and drctl say so.
    for name in sorted(p.relative_to(pristine).as_posix() for p in pristine.rglob("*")
                       if p.is_file()):
        copy = auditor / re.sub(r"\W", "_", name)
        shutil.copytree(pristine, copy)
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / name).write_bytes(bytes(data))
        stock = run_stock(copy, auditor / "home", key)[1:]  # the signature, then sha256sum
        assert any(c.returncode != 0 for c in stock), name
        got = drctl(["audit", "verify", "--bundle", str(copy), "--public-key", str(key)])
        assert got.exit_code == 1 and "FAILED" in got.stdout, (name, got.stdout)
    # The key holder drops the drill record and signs the list again: the log still has it.
    dropped = auditor / "dropped"
    shutil.copytree(pristine, dropped)
    (dropped / "drills" / "drills.jsonl").write_bytes(b"")
    sums = re.sub(r"\S+  drills/drills.jsonl",
                  f"{hashlib.sha256(b'').hexdigest()}  drills/drills.jsonl",
                  (dropped / "SHA256SUMS").read_text())
    (dropped / "SHA256SUMS").write_text(sums)
    (dropped / "SHA256SUMS.sig").write_bytes(load_signing_key(key_file).sign(sums.encode()))
    got = drctl(["audit", "verify", "--bundle", str(dropped), "--public-key", str(key)])
    assert f"drill {drill['id']} (audit record" in got.stdout, got.stdout
    assert "has no signed record in drills/drills.jsonl" in got.stdout
    # A file added afterwards: drctl names it.
    (pristine / "drills" / "extra.jsonl").write_text("{}\n")
    got = drctl(["audit", "verify", "--bundle", str(pristine), "--public-key", str(key)])
    assert got.exit_code == 1 and "drills/extra.jsonl is not listed" in got.stdout


def test_export_needs_a_signing_key_and_verify_needs_its_public_key(tmp_path: Path) -> None:
    setup = make_setup(tmp_path, [f'[[regions]]\nname = "{n}"\nkind = "local"\n'
                                  f'continent = "{c}"\npath = "{tmp_path / n}"\n'
                                  for n, c in (("a", "europe"), ("b", "north-america"))], [])
    result = setup.drctl("audit", "export", "--to", str(tmp_path / "bundle"))
    assert result.exit_code == 2 and "signing_key_file" in result.stderr
    assert not (tmp_path / "bundle").exists()
    result = drctl(["audit", "verify", "--bundle", str(tmp_path)])
    assert result.exit_code == 2 and "--public-key" in result.stderr


NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=12)


@given(st.lists(st.lists(NAME, min_size=1, max_size=3).map("/".join), unique=True, max_size=6),
       st.sampled_from(["../x", "/etc/passwd", "a/../../b", "a//b", "a\\b", "a b", "a/"]))
def test_sums_take_plain_relative_names_only(names: list[str], hostile: str) -> None:
    """Every plain relative name round-trips; a name that could leave the bundle never does."""
    names = [n for n in names if ".." not in n.split("/")]
    text = "".join(f"{i:064x}  {n}\n" for i, n in enumerate(names))
    assert parse_sums(text) == ({n: f"{i:064x}" for i, n in enumerate(names)}, [])
    sums, problems = parse_sums(text + f"{0:064x}  {hostile}\n")
    assert hostile not in sums and len(problems) == 1


@given(st.sampled_from([f.name for f in dataclasses.fields(DrillRecord)
                        if f.name != "reasons"]),
       st.one_of(st.integers(), st.text(max_size=5), st.none(), st.booleans()))
def test_a_drill_record_matches_its_audit_record_only_unchanged(name: str, value: object) -> None:
    record = DrillRecord.from_dict(json.loads(REPORT_RECORD))
    event = json.loads(json.dumps(record.to_dict()))
    assert matches_audit(record, event)
    edited = DrillRecord.from_dict({**record.to_dict(), name: value})
    assert matches_audit(edited, event) == (edited.to_dict() == record.to_dict())
    # Fields the log withheld as secret-looking are not compared; the rest still are.
    assert matches_audit(edited, {**event, "withheld": [f"{name}[0]"]})


REPORT_RECORD = json.dumps({
    "id": "20261123T020000Z-00000001", "source": "lms-files", "tenant": "uni-a", "tier": "paid",
    "region": "us-virginia", "snapshot_id": "20261123T010000Z-abcdef01", "sha256": "ab" * 32,
    "started_at": "2026-11-23T02:00:00+00:00", "finished_at": "2026-11-23T02:00:05+00:00",
    "ok": True, "reasons": [], "rto_seconds": 5.0, "rpo_seconds": 3600.0,
    "worst_gap_seconds": None, "throughput_bytes_per_second": 1.0, "stored_bytes": 5,
    "plaintext_bytes": 9, "rto_target_seconds": 86400.0, "rpo_target_seconds": 86400.0,
    "projected_tier_rto_seconds": 5.0, "timings": {"download": 1.0}, "host": "dr-1",
    "user": "ops", "manifest_key_id": "k1", "manifest_mac": "cd" * 32})
