"""Anchors: the log's head time-stamped by a TSA and kept in a witness bucket, the state
folder and every region; a log that does not extend an anchored head is a rewrite.

The TSA is a real `openssl ts -reply` behind an HTTP server (local_tsa.py); the
attacks are made with every secret the operator holds, the signing key included.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import S3Region
from forgery import rechain
from local_tsa import LocalTsa, local_tsa, make_ca
from support import Setup, directory_source, local_region, make_setup

from drdaemon import anchors, audit, audit_chain, audit_mirror, layout, metrics, tsa
from drdaemon.config import load as load_config
from drdaemon.errors import ConfigError
from drdaemon.keys import load_manifest_key
from drdaemon.runtime import Runtime, open_runtime
from drdaemon.scheduler import Daemon
from drdaemon.signing import generate_signing_key

REGIONS = ("eu-local", "us-local")


@pytest.fixture(scope="module")
def tsa_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTsa]:
    with local_tsa(tmp_path_factory.mktemp("tsa")) as server:
        yield server


@pytest.fixture
def setup(tmp_path: Path, tsa_server: LocalTsa) -> Setup:
    tsa_server.failing = False
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_text("a\n")
    audit_toml = (f'[audit]\ntsa_url = "{tsa_server.url}"\ntsa_ca_file = "{tsa_server.ca}"\n'
                  'anchor_every = "30m"\n\n'
                  f'[audit.witness]\nkind = "local"\npath = "{tmp_path / "witness"}"\n')
    return make_setup(tmp_path, [local_region("eu-local", tmp_path / "eu", "europe"),
                                 local_region("us-local", tmp_path / "us", "north-america")],
                      [directory_source("files", tree)], extra=audit_toml)


def runtime(setup: Setup) -> Runtime:
    return open_runtime(load_config(setup.config))


def log_file(setup: Setup) -> Path:
    return setup.state / "audit" / "audit.jsonl"


def test_the_daemons_anchor_job_stamps_and_keeps_the_head_everywhere(
        setup: Setup, tmp_path: Path, tsa_server: LocalTsa) -> None:
    rt = runtime(setup)
    daemon = Daemon(rt)
    assert daemon.anchoring() is not None
    every, job = daemon.anchoring() or (None, None)
    assert every is not None and every.total_seconds() == 1800 and job is not None
    for n in range(3):
        rt.record_event("test.event", n=n)
    daemon.maintenance_job("anchor", job)

    lines = audit.read_lines(setup.state)
    [kept] = anchors.load_all(setup.state)
    assert anchors.newest(setup.state) == kept
    assert (kept.seq, kept.head) == (2, audit_chain.line_hash(lines[2]))
    assert kept.token is not None and kept.tsa_time is not None
    chain = anchors.chain_of(lines)
    assert chain is not None
    folder = layout.audit_anchor_folder(socket.gethostname(), chain)
    for root in ("eu", "us", "witness"):
        assert (tmp_path / root / folder / "000000000002.json").read_bytes() == kept.raw
        assert (tmp_path / root / folder / "000000000002.tsr").read_bytes() == kept.token
    # The standard tool checks the token on its own.
    state = setup.state / "audit-anchors"
    done = subprocess.run(["openssl", "ts", "-verify", "-data", str(state / "000000000002.json"),
                           "-in", str(state / "000000000002.tsr"), "-CAfile", str(tsa_server.ca)],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "Verification: OK" in done.stdout

    get = metrics.build_registry(daemon.metrics, rt.clock).get_sample_value
    assert get("drdaemon_audit_anchored_timestamp_seconds") is not None
    assert get("drdaemon_audit_anchor_newest_timestamp_seconds") == \
        datetime.fromisoformat(kept.time).timestamp()

    # Nothing new recorded: the head is anchored already, no new token asked for.
    asked = tsa_server.requests
    report = anchors.anchor(rt)
    assert report.ok and not report.made and tsa_server.requests == asked

    # The TSA down: the anchor still goes to the state folder, regions and witness; the
    # failure is counted and the anchored time stays where it was.
    rt.record_event("test.event", n=3)
    tsa_server.failing = True
    before = get("drdaemon_audit_anchored_timestamp_seconds")
    daemon.maintenance_job("anchor", job)
    get = metrics.build_registry(daemon.metrics, rt.clock).get_sample_value
    assert get("drdaemon_audit_anchor_failures_total", {"place": "tsa"}) == 1
    assert get("drdaemon_audit_anchored_timestamp_seconds") == before
    assert anchors.newest(setup.state).seq == 3  # type: ignore[union-attr]
    assert anchors.newest(setup.state).token is None  # type: ignore[union-attr]


def test_a_rewritten_log_is_named_a_rewrite_against_every_anchor(setup: Setup,
                                                                  tmp_path: Path) -> None:
    """Remove a failed drill and re-chain with the audit key: alone the log verifies; the
    state folder's anchors, the witness's and each region's say "rewrite"."""
    rt = runtime(setup)
    rt.record_event("test.event", n=0)
    rt.record_event("drill", source="files", ok=False)
    rt.record_event("test.event", n=2)
    assert anchors.anchor(rt).made
    original = audit.read_lines(setup.state)
    key = audit_chain.audit_key(load_manifest_key(setup.manifest_key))
    log_file(setup).write_bytes(b"".join(rechain(original, key, drop=1)))
    assert audit.verify(rt).ok

    out = setup.drctl("audit", "verify")
    assert out.exit_code == 1, out.output
    assert "rewrite: anchored record 2" in out.stdout and "TSA time" in out.stdout

    # The operator removes the state folder's anchors too: the witness still has them.
    for p in (setup.state / "audit-anchors").iterdir():
        p.unlink()
    local = audit_mirror.verify_local(rt)
    assert not local.ok and any(p.startswith("rewrite: anchored record 2") and "witness" in p
                                for p in local.problems)
    for region in REGIONS:
        doc = json.loads(setup.drctl("audit", "verify", "--region", region, "--json").stdout)
        assert not doc["ok"]
        assert any(p.startswith("rewrite: anchored record 2") for p in doc["problems"])
    check = audit_mirror.verify_everywhere(rt)
    assert not check.local_ok and not check.ok

    # Wiped and begun anew: every anchor belongs to another chain.
    log_file(setup).unlink()
    rt.record_event("daemon.started")
    problems = anchors.check_witness(rt, audit.read_lines(setup.state))
    assert problems and "belongs to chain" in problems[0] and "the log was wiped" in problems[0]


def test_rewritten_with_the_signing_key_and_checked_with_the_public_key_alone(
        tmp_path: Path, tsa_server: LocalTsa) -> None:
    """The auditor's check: the public key, the anchors and the TSA's CA; no secret."""
    signer = generate_signing_key(tmp_path / "signing.key")
    lines: list[bytes] = []
    prev = audit_chain.GENESIS
    # A signed log opens with the handover to its key (audit_chain.HANDOVER).
    for seq, (event, fields) in enumerate([(audit_chain.HANDOVER,
                                            audit_chain.handover_fields(signer.public)),
                                           ("snapshot.committed", {"source": "db"}),
                                           ("drill", {"source": "db", "ok": False}),
                                           ("snapshot.committed", {"source": "db"})]):
        line = audit_chain.make_line(seq, f"2031-03-01T02:00:0{seq}+00:00", event, fields,
                                     prev, signer)
        lines.append(line)
        prev = audit_chain.line_hash(line)
    chain = anchors.chain_of(lines) or ""
    raw = anchors.document("dr-1", chain, 3, audit_chain.line_hash(lines[3]),
                           datetime(2031, 3, 1, 2, 1, tzinfo=UTC))
    token = tsa.request(tsa_server.url, raw)
    anchored = [anchors.parse(raw, token, ["witness"])]
    public = audit_chain.ChainKeys(public=(signer.public,))
    assert audit_chain.verify_lines(lines, public).ok
    assert anchors.check_extends(lines, anchored, tsa_server.ca) == []

    forged = rechain(lines, signer, drop=2)
    assert audit_chain.verify_lines(forged, public).ok  # the key alone cannot tell
    [problem] = anchors.check_extends(forged, anchored, tsa_server.ca)
    assert problem.startswith("rewrite: anchored record 3 ")
    assert f"TSA time {anchored[0].tsa_time}" in problem and "in witness" in problem
    # Cut to before the anchor, or replaced by another chain: a rewrite too.
    assert "beyond the log's 3 records" in anchors.check_extends(lines[:3], anchored, None)[0]
    assert "belongs to chain" in anchors.check_extends([], anchored, None)[0]

    # A token made up by the operator (his own CA) or over other bytes does not verify.
    other = tmp_path / "other-ca"
    make_ca(other, "Operator CA")
    [bad] = anchors.check_extends(lines, anchored, other / "ca.crt")
    assert "time-stamp token does not verify" in bad
    moved = [anchors.parse(raw.replace(b'"time":"2031', b'"time":"2030'), token, ["witness"])]
    assert any("does not verify" in p for p in anchors.check_extends(lines, moved,
                                                                      tsa_server.ca))


def test_audit_config(tmp_path: Path, tsa_server: LocalTsa) -> None:
    def cfg(audit_toml: str) -> Path:
        return make_setup(tmp_path / str(abs(hash(audit_toml))),
                          [local_region("a", tmp_path / "a", "europe"),
                           local_region("b", tmp_path / "b", "asia")], [],
                          extra=audit_toml).config

    plain = load_config(cfg(""))
    assert not plain.audit.anchoring and plain.audit.anchor_every.total_seconds() == 3600
    with pytest.raises(ConfigError, match="tsa_ca_file"):
        load_config(cfg(f'[audit]\ntsa_url = "{tsa_server.url}"\n'))
    with pytest.raises(ConfigError, match="tsa_url"):
        load_config(cfg('[audit]\ntsa_url = "file:///etc/passwd"\ntsa_ca_file = "x"\n'))
    with pytest.raises(ConfigError, match="anchor_every"):
        load_config(cfg('[audit]\nanchor_every = "10s"\n[audit.witness]\nkind = "local"\n'
                        'path = "w"\n'))
    witness = load_config(cfg('[audit.witness]\nkind = "s3"\nbucket = "w"\n'))
    assert witness.audit.anchoring and witness.audit.witness is not None
    assert witness.audit.witness.bucket == "w" and witness.audit.witness.name == "witness"


def test_the_witness_bucket_keeps_anchors_under_object_lock(
        tmp_path: Path, lock_regions: list[S3Region]) -> None:
    """No time-stamping authority: the witness alone (an S3 bucket with Object Lock)."""
    w = lock_regions[1]
    witness = (f'[audit.witness]\nkind = "s3"\nbucket = "{w.bucket}"\nregion = "{w.region}"\n'
               f'endpoint_url = "{w.endpoint_url}"\nprefix = "witness"\n')
    tree = tmp_path / "tree"
    tree.mkdir()
    setup = make_setup(tmp_path, [local_region("eu-local", tmp_path / "eu", "europe"),
                                  local_region("us-local", tmp_path / "us", "north-america")],
                       [directory_source("files", tree)], extra=witness)
    rt = runtime(setup)
    rt.record_event("test.event", n=0)
    out = setup.drctl("audit", "anchor")
    assert out.exit_code == 0, out.output + out.stderr
    assert out.stdout.startswith("anchored: record 0") and "witness" in out.stdout
    keys = [o["Key"] for o in w.client().list_objects_v2(
        Bucket=w.bucket, Prefix="witness/audit/anchors/")["Contents"]]
    assert [k.rsplit("/", 1)[1] for k in keys] == ["000000000000.json"]
    head = w.client().head_object(Bucket=w.bucket, Key=keys[0])
    assert head["ObjectLockMode"] == "COMPLIANCE"
    assert setup.drctl("audit", "verify").exit_code == 0
    log_file(setup).write_bytes(b"")  # wiped
    for p in (setup.state / "audit-anchors").iterdir():
        p.unlink()
    out = setup.drctl("audit", "verify")
    assert out.exit_code == 1 and "rewrite: anchored record 0" in out.stdout
    assert "in witness" in out.stdout and "the log was wiped or replaced" in out.stdout
