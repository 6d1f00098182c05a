"""Proving every recipient (issue 15): `drctl keys prove` with ops and escrow, a tenant key
wrapped without escrow, the older single-key format's headers, the offline escrow's proof
reaching the daemon through the audit log's mirror, the daemon's keys job and its metrics."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import S3Region
from hypothesis import given
from hypothesis import strategies as st
from old_format import downgrade
from support import Setup, directory_source, drctl, make_setup

from drdaemon import key_proof, metrics, proof_log
from drdaemon.keys import fingerprint, generate_identity
from drdaemon.runtime import load_config, open_runtime
from drdaemon.scheduler import Daemon


def make_tree(root: Path, tenant: str) -> Path:
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "a.txt").write_text(f"{tenant}\n" * 50)
    return root


@pytest.fixture
def setup(tmp_path: Path, s3_regions: list[S3Region]) -> Setup:
    sources = [directory_source(f"files-{t}", make_tree(tmp_path / t, t), tenant=t)
               for t in ("uni-a", "uni-b")]
    return make_setup(tmp_path, [r.toml() for r in s3_regions], sources)


def prove(setup: Setup, identity: Path, config: Path | None = None) -> tuple[int, Any]:
    result = drctl(["--config", str(config or setup.config), "keys", "prove",
                    "--identity", str(identity), "--json"])
    return result.exit_code, json.loads(result.stdout)


def audit_records(state: Path, event: str) -> list[dict[str, Any]]:
    lines = (state / "audit" / "audit.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def without_escrow(setup: Setup) -> str:
    """The config text with ops as the only recipient (the config before escrow was added)."""
    text = setup.config.read_text()
    return text.replace(f', {{ recipient = "{setup.escrow_recipient}", name = "escrow" }}', "")


def test_prove_passes_for_ops_and_escrow_and_names_a_key_without_escrow(
        setup: Setup, s3_regions: list[S3Region]) -> None:
    full = setup.config.read_text()
    setup.drctl_json("backup", "--source", "files-uni-a")
    setup.config.write_text(without_escrow(setup))  # uni-b's key: wrapped to ops only
    setup.drctl_json("backup", "--source", "files-uni-b")
    setup.config.write_text(full)
    ops_fp, escrow_fp = fingerprint(setup.recipient), fingerprint(setup.escrow_recipient)

    code, ops = prove(setup, setup.identity)
    assert code == 0 and ops["ok"]
    assert ops["recipients"] == [{"fingerprint": ops_fp, "recipient": "ops", "ok": True,
                                  "keys_opened": 4, "snapshots_opened": 0, "failures": []}]
    code, escrow = prove(setup, setup.escrow)
    assert code == 1 and not escrow["ok"]
    [r] = escrow["recipients"]
    assert (r["recipient"], r["keys_opened"]) == ("escrow", 2)
    [kid] = {f.split("'s key ")[1].split()[0] for f in r["failures"]}
    assert sorted(r["failures"]) == sorted(
        f"tenant uni-b's key {kid} in region {reg.name}: not wrapped to this recipient"
        for reg in s3_regions)
    proven = audit_records(setup.state, key_proof.PROVEN)
    assert [(p["fingerprint"], p["ok"], p["scope"]) for p in proven] == [
        (ops_fp, True, "command"), (escrow_fp, False, "command")]
    assert "AGE-SECRET-KEY" not in (setup.state / "audit" / "audit.jsonl").read_text()

    # The daemon's keys job: proves ops itself, reads the key records, feeds the metrics.
    rt = open_runtime(load_config(str(setup.config)))
    daemon = Daemon(rt)
    [(_, schedule, job)] = [j for j in daemon._maintenance() if j[0] == "keys"]
    assert schedule == rt.config.daemon.prove_schedule == "15 5 * * *"
    daemon.maintenance_job("keys", job)
    reg = metrics.build_registry(daemon.metrics, rt.clock)

    def sample(name: str, **labels: str) -> float | None:
        return reg.get_sample_value(name, labels)

    assert sample("drdaemon_tenant_keys_missing_recipient", tenant="uni-b",
                  recipient="escrow", fingerprint=escrow_fp) == 1
    assert sample("drdaemon_tenant_keys_missing_recipient", tenant="uni-a",
                  recipient="escrow", fingerprint=escrow_fp) == 0
    assert sample("drdaemon_recipient_last_proven_timestamp_seconds", recipient="escrow",
                  fingerprint=escrow_fp) is None  # its proofs failed
    assert sample("drdaemon_recipient_proof_max_age_seconds", recipient="escrow",
                  fingerprint=escrow_fp) == 90 * 86400
    ops_at = sample("drdaemon_recipient_last_proven_timestamp_seconds", recipient="ops",
                    fingerprint=ops_fp)
    assert ops_at is not None and abs(ops_at - datetime.now(UTC).timestamp()) < 60
    assert audit_records(setup.state, key_proof.PROVEN)[-1]["scope"] == "daemon"

    # Rewrapped to today's recipients, escrow opens everything and the metric clears.
    setup.drctl_json("keys", "rewrap", "--identity", str(setup.identity))
    code, escrow = prove(setup, setup.escrow)
    assert code == 0 and escrow["recipients"][0]["keys_opened"] == 4
    daemon.maintenance_job("keys", job)
    assert sample("drdaemon_tenant_keys_missing_recipient", tenant="uni-b",
                  recipient="escrow", fingerprint=escrow_fp) == 0
    assert sample("drdaemon_recipient_last_proven_timestamp_seconds", recipient="escrow",
                  fingerprint=escrow_fp) is not None


def test_single_key_snapshots_are_proven_by_their_header(setup: Setup, tmp_path: Path,
                                                         s3_regions: list[S3Region]) -> None:
    missing = setup.drctl("keys", "prove", "--identity", str(tmp_path / "nope.txt"))
    assert missing.exit_code == 2 and missing.stderr.count("\n") == 1
    code, out = prove(setup, setup.identity)  # before any backup: nothing proves it
    assert code == 1 and out["recipients"][0]["failures"][0].startswith("nothing to open")
    [snap] = setup.drctl_json("backup", "--source", "files-uni-a")
    downgrade(setup, "files-uni-a", snap["snapshot_id"])  # a version-1 snapshot
    for identity in (setup.identity, setup.escrow):
        code, out = prove(setup, identity)
        assert code == 0, out
        assert out["recipients"][0]["snapshots_opened"] == 2  # its header, in each region
    stranger = tmp_path / "stranger.txt"
    stranger_rec = generate_identity(stranger)
    text = setup.drctl("keys", "prove", "--identity", str(stranger))
    assert text.exit_code == 1
    assert text.stdout.startswith(f"not in [keys] recipients ({fingerprint(stranger_rec)}): "
                                  "FAILED")
    for reg in s3_regions:
        assert (f"  cannot open snapshot {snap['snapshot_id']} of source files-uni-a in region "
                f"{reg.name}: not encrypted to this recipient\n") in text.stdout


def test_offline_escrow_proof_reaches_the_daemon_through_the_mirror(
        setup: Setup, tmp_path: Path, s3_regions: list[S3Region]) -> None:
    setup.drctl_json("backup")
    # The custodian's machine: a read-only copy of the config, its own state folder, no
    # identity_file (the escrow identity is given on the command line).
    offline = tmp_path / "offline.toml"
    text = setup.config.read_text().replace(str(setup.state), str(tmp_path / "offline"))
    offline.write_text(text.replace(f'identity_file = "{setup.identity}"\n', ""))
    offline.chmod(0o444)
    code, out = prove(setup, setup.escrow, offline)
    assert code == 0 and out["ok"], out
    escrow_fp = fingerprint(setup.escrow_recipient)
    assert not [p for p in audit_records(setup.state, key_proof.PROVEN)
                if p["fingerprint"] == escrow_fp]  # not in the daemon's own log

    rt = open_runtime(load_config(str(setup.config)))
    check = proof_log.check(rt)
    seen = {r.name: r.last_proven for r in check.recipients}
    assert seen["escrow"] is not None and seen["ops"] is not None and check.ok

    # A mirrored record that does not verify with the audit key proves nothing.
    for region in s3_regions:
        client = region.client()
        for obj in client.list_objects_v2(Bucket=region.bucket, Prefix="audit/")["Contents"]:
            body = client.get_object(Bucket=region.bucket, Key=obj["Key"])["Body"].read()
            forged = b"".join(ln.replace(b'"time":"20', b'"time":"30')
                              if escrow_fp.encode() in ln else ln
                              for ln in body.splitlines(keepends=True))
            client.put_object(Bucket=region.bucket, Key=obj["Key"], Body=forged)
    again = proof_log.check(rt)
    assert {r.name: r.last_proven for r in again.recipients}["escrow"] is None


def test_drills_prove_the_recipient_that_unwrapped(setup: Setup) -> None:
    setup.drctl_json("backup", "--source", "files-uni-a")
    drill = setup.drctl("drill", "run", "--source", "files-uni-a", "--identity",
                        str(setup.escrow), "--json")
    assert drill.exit_code == 0, drill.output + drill.stderr
    [p] = audit_records(setup.state, key_proof.PROVEN)
    assert (p["fingerprint"], p["scope"], p["ok"], p["tenant"]) == (
        fingerprint(setup.escrow_recipient), "drill", True, "uni-a")


# -- pure --------------------------------------------------------------------------

def test_header_of_cuts_after_the_mac_line_and_nonce() -> None:
    head = b"age-encryption.org/v1\n-> X25519 abc\nbody\n--- mac\n" + b"n" * 16 + b"payload"
    assert key_proof.header_of(head) == head[:-len(b"payload")]
    assert key_proof.header_of(head[:-len(b"payload") - 1]) is None  # nonce cut short
    assert key_proof.header_of(b"age-encryption.org/v1\n-> X25519 abc\n") is None
    assert key_proof.header_of(b"PK\x03\x04 not age") is None


@given(st.lists(st.tuples(st.sampled_from(["a", "b"]),
                          st.sets(st.sampled_from(["f1", "f2", "f3"]))), max_size=6))
def test_missing_recipients_counts_each_key_lacking_each_configured_one(
        keys: list[tuple[str, set[str]]]) -> None:
    got = proof_log.missing_recipients(keys, ["f1", "f2"])
    for tenant in {t for t, _ in keys}:
        for fp in ("f1", "f2"):
            assert got[(tenant, fp)] == sum(1 for t, fps in keys if t == tenant
                                            and fp not in fps)
    assert all(fp in ("f1", "f2") for _, fp in got)


def test_last_proven_keeps_the_newest_successful_proof() -> None:
    recs = [{"event": "keys.proven", "fingerprint": "f", "ok": True,
             "time": "2026-01-01T00:00:00+00:00"},
            {"event": "keys.proven", "fingerprint": "f", "ok": False,
             "time": "2026-03-01T00:00:00+00:00"},
            {"event": "keys.proven", "fingerprint": "f", "ok": True,
             "time": "2026-02-01T00:00:00+00:00"},
            {"event": "drill", "fingerprint": "g", "ok": True,
             "time": "2026-02-01T00:00:00+00:00"}]
    assert proof_log.last_proven(recs) == {"f": datetime(2026, 2, 1, tzinfo=UTC)}
