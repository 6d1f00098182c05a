"""Drill records are evidence: signed lines, reports built from signed records only, each
drill tied to its audit record and the manifest it read, the report signed (openssl checks it).

The attack of issue 23: editing a drill record's region, targets, host, digest or times in
drills.jsonl left the report saying PASS.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import S3Region
from support import Setup, directory_source, make_setup, stored_key

from drdaemon import audit, layout
from drdaemon.signing import generate_signing_key, public_path

EDITS = [("region", "eu-frankfurt"), ("rto_target_seconds", 10.0 ** 9), ("host", "elsewhere"),
         ("sha256", "0" * 64), ("started_at", "2000-01-01T00:00:00+00:00")]


def report(setup: Setup) -> dict[str, Any]:
    result = setup.drctl("drill", "report", "--since", "3650d", "--format", "json")
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


def edit_line(path: Path, n: int, field: str, value: object) -> bytes:
    """Set `field` of the drill record on line `n`, keeping its `sig`; return the old bytes."""
    old = path.read_bytes()
    lines = old.splitlines(keepends=True)
    doc = json.loads(lines[n])
    doc[field] = value
    lines[n] = (json.dumps(doc, sort_keys=True) + "\n").encode()
    path.write_bytes(b"".join(lines))
    return old


def add_signing_key(setup: Setup) -> Path:
    key = setup.config.parent / "keys" / "signing.key"
    generate_signing_key(key)
    text = setup.config.read_text()
    mkey = f'manifest_key_file = "{setup.manifest_key}"\n'
    setup.config.write_text(text.replace(mkey, mkey + f'signing_key_file = "{key}"\n'))
    return key


def openssl_verify(pub: Path, data: Path, sig: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(pub),
                           "-rawin", "-in", str(data), "-sigfile", str(sig)],
                          capture_output=True, text=True)


def test_edited_drill_records_never_pass(tmp_path: Path, s3_regions: list[S3Region]) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_text("evidence\n")
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [directory_source("lms-files", tree)])
    [snap] = setup.drctl_json("backup")
    records = setup.state / "drills" / "drills.jsonl"

    # Without a signing key the audit log is the check: every field, not just nine.
    assert setup.drctl("drill", "run").exit_code == 0
    [d] = report(setup)["drills"]
    assert d["result"] == "PASS" and "sig" not in json.loads(records.read_text())
    for field, value in EDITS:
        old = edit_line(records, 0, field, value)
        doc = report(setup)
        # Flagged as not matching its audit record or, moved out of the period, as
        # missing from it; never a PASS.
        flagged = doc["audit"]["drills_unattested"] + [x["id"] for x in doc["rejected"]]
        assert flagged == [d["id"]], field
        assert "PASS" not in [x["result"] for x in doc["drills"]], field
        assert sum(s["passed"] for s in doc["summary"]) == 0, field
        records.write_bytes(old)

    # With a signing key: records are signed, and only signed ones are evidence.
    key = add_signing_key(setup)
    assert setup.drctl("drill", "run").exit_code == 0
    unsigned, signed = (json.loads(x) for x in records.read_text().splitlines())
    assert "sig" not in unsigned and signed["sig"]["alg"] == "ed25519"
    doc = report(setup)
    assert [x["id"] for x in doc["drills"]] == [signed["id"]]
    assert [(x["id"], x["status"]) for x in doc["rejected"]] == [(unsigned["id"], "unsigned")]
    [d] = doc["drills"]
    assert d["result"] == "PASS" and doc["signing_key"] == signed["sig"]["key"]

    # Each drill names its audit record, who ran it where, and the manifest it read.
    lines = audit.read_lines(setup.state)
    at = d["audit_record"]["seq"]
    assert d["audit_record"]["hash"] == hashlib.sha256(lines[at]).hexdigest()
    assert json.loads(lines[at])["event"] == "drill" and json.loads(lines[at])["id"] == d["id"]
    assert doc["audit"]["head"] == hashlib.sha256(lines[-1]).hexdigest()
    assert d["user"] and d["host"] and d["tool_version"]
    assert d["config_sha256"] == hashlib.sha256(setup.config.read_bytes()).hexdigest()
    region = s3_regions[1]
    name = stored_key(region, layout.manifest_object_name("lms-files", snap["snapshot_id"]))
    stored = json.loads(region.client().get_object(Bucket=region.bucket, Key=name)["Body"].read())
    assert (d["manifest_key_id"], d["manifest_mac"]) == (stored["mac"]["key_id"],
                                                         stored["mac"]["value"])

    for field, value in EDITS:
        old = edit_line(records, 1, field, value)
        doc = report(setup)
        assert doc["drills"] == [] and [s["passed"] for s in doc["summary"]] == [], field
        forged = {x["id"]: x for x in doc["rejected"]}[signed["id"]]
        assert forged["status"] == "forged" and "edited" in forged["why"], field
        md = setup.drctl("drill", "report", "--since", "3650d").stdout
        assert f"FORGED drill record {signed['id']}" in md and "| PASS |" not in md, field
        records.write_bytes(old)

    # A drill removed from drills.jsonl is named from its audit record.
    old = records.read_bytes()
    records.write_bytes(old.splitlines(keepends=True)[0])
    doc = report(setup)
    assert doc["drills"] == [] and [(x["id"], x["status"]) for x in doc["rejected"]] == [
        (unsigned["id"], "unsigned"), (signed["id"], "missing")]
    records.write_bytes(old)

    # The report is signed: openssl checks it with the public key alone.
    out = tmp_path / "out" / "report.html"
    out.parent.mkdir()
    result = setup.drctl("drill", "report", "--since", "3650d", "--out", str(out))
    assert result.exit_code == 0, result.output + result.stderr
    sig = out.with_name("report.html.sig")
    check = openssl_verify(public_path(key), out, sig)
    assert check.returncode == 0 and "Signature Verified Successfully" in check.stdout
    out.write_bytes(out.read_bytes().replace(b"PASS", b"FAIL"))
    assert openssl_verify(public_path(key), out, sig).returncode != 0


@pytest.mark.parametrize("fmt", ["md", "json"])
def test_signed_report_formats(tmp_path: Path, fmt: str) -> None:
    """Every format can be written and signed, without any drill yet."""
    setup = make_setup(tmp_path, [f'[[regions]]\nname = "{n}"\nkind = "local"\n'
                                  f'continent = "{c}"\npath = "{tmp_path / n}"\n'
                                  for n, c in (("a", "europe"), ("b", "north-america"))], [])
    key = add_signing_key(setup)
    out = tmp_path / f"report.{fmt}"
    result = setup.drctl("drill", "report", "--format", fmt, "--out", str(out))
    assert result.exit_code == 0, result.output + result.stderr
    assert openssl_verify(public_path(key), out, out.with_name(out.name + ".sig")).returncode == 0
