"""The tamper-evident audit log: real events from real services, then real tampering.

Every record here is written by drctl or by `Runtime.record_event` in real
processes; tampering edits the file on disk (or a region's copy) the way an
intruder with a shell would, and `drctl audit verify` must name the record.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import S3Region
from hypothesis import given, settings
from hypothesis import strategies as st
from support import Setup, directory_source, local_region, make_setup, run_cli

from drdaemon import audit, audit_chain, audit_mirror, audit_secrets, keys, layout
from drdaemon.config import load as load_config
from drdaemon.keys import load_manifest_key
from drdaemon.runtime import open_runtime

KEY = b"k" * 32
REGIONS = ("eu-local", "us-local")


def make_tree(root: Path) -> Path:
    (root / "courses").mkdir(parents=True)
    (root / "courses" / "notes.md").write_text("# Cells\n" * 200)
    (root / "grades.csv").write_text("student,grade\nada,6\n")
    return root


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    tree = make_tree(tmp_path / "tree")
    return make_setup(tmp_path, [local_region("eu-local", tmp_path / "eu", "europe"),
                                 local_region("us-local", tmp_path / "us", "north-america")],
                      [directory_source("files", tree)])


def log_file(setup: Setup) -> Path:
    return setup.state / "audit" / "audit.jsonl"


def lines_of(setup: Setup) -> list[bytes]:
    return audit_chain.split_lines(log_file(setup).read_bytes())


def write_lines(setup: Setup, lines: list[bytes]) -> None:
    log_file(setup).write_bytes(b"".join(lines))


def verify_json(setup: Setup, *args: str, code: int) -> dict[str, Any]:
    result = setup.drctl("audit", "verify", *args, "--json")
    assert result.exit_code == code, result.output + result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


@pytest.fixture
def logged(setup: Setup, tmp_path: Path) -> Setup:
    """Two backups, a restore and a verify, each through drctl: six real records (the
    first backup makes the tenant's key, the restore unwraps it)."""
    for _ in range(2):
        assert setup.drctl("backup").exit_code == 0
    restored = setup.drctl("restore", "latest", "--source", "files", "--to",
                           str(tmp_path / "restored"))
    assert restored.exit_code == 0, restored.output + restored.stderr
    assert setup.drctl("verify").exit_code == 0
    return setup


def record(line: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(line)
    return doc


def chain(n: int, key: bytes = KEY) -> list[bytes]:
    """n records built by the real record maker, as `append` writes them."""
    lines: list[bytes] = []
    prev = audit_chain.GENESIS
    for seq in range(n):
        line = audit_chain.make_line(seq, f"2031-03-01T02:00:{seq:02d}+00:00", "test.event",
                               {"n": seq, "note": "é ünïcødé"}, prev, key)
        lines.append(line)
        prev = audit_chain.line_hash(line)
    return lines


# -- through the services and drctl ---------------------------------------------------


def test_real_events_verify_and_show(logged: Setup) -> None:
    out = logged.drctl("audit", "verify")
    assert out.exit_code == 0, out.output + out.stderr
    assert out.stdout.startswith("OK: ") and "6 records verified" in out.stdout
    doc = verify_json(logged, code=0)
    assert doc["ok"] and doc["records"] == 6 and doc["first_bad"] is None
    assert doc["head"] == audit_chain.line_hash(lines_of(logged)[-1])

    shown = logged.drctl_json("audit", "show")
    events = [r["event"] for r in shown["records"]]
    assert events == ["tenant_key.created", "snapshot.committed", "snapshot.committed",
                      "tenant_key.unwrapped", "restore", "verify.finished"]
    assert [r["seq"] for r in shown["records"]] == [0, 1, 2, 3, 4, 5]
    assert shown["verification"]["ok"]
    restore = shown["records"][4]
    assert restore["source"] == "files" and restore["region"] == "eu-local"
    assert restore["snapshot_id"] in {r["snapshot_id"] for r in shown["records"][1:3]}

    assert [r["event"] for r in logged.drctl_json("audit", "show", "--event", "snapshot.")[
        "records"]] == ["snapshot.committed"] * 2
    assert logged.drctl_json("audit", "show", "--since", "1h")["records"] == shown["records"]
    human = logged.drctl("audit", "show", "--event", "restore")
    assert human.exit_code == 0
    [line] = human.stdout.splitlines()
    assert " restore " in line and "source=files" in line and "mac=" not in line
    bad = logged.drctl("audit", "show", "--since", "yesterday")
    assert bad.exit_code == 2 and "--since" in bad.stderr


def test_show_since_uses_the_record_times(setup: Setup) -> None:
    clock = [datetime(2031, 3, 1, tzinfo=UTC)]
    rt = open_runtime(load_config(setup.config), clock=lambda: clock[0])
    for day in range(5):
        clock[0] = datetime(2031, 3, 1 + day, tzinfo=UTC)
        rt.record_event("test.day", day=day)
    records, check = audit.show(rt, timedelta(days=2))
    assert check.ok and [r["day"] for r in records] == [2, 3, 4]
    records, _ = audit.show(rt, None, "test.d")
    assert len(records) == 5 and audit.show(rt, None, "nope")[0] == []


def edit_field(lines: list[bytes]) -> int:
    doc = record(lines[1])
    doc["ok"] = False  # a committed snapshot recast as a failure, MAC left as it was
    lines[1] = audit_chain.canonical(doc) + b"\n"
    return 1


def edit_by_hand(lines: list[bytes]) -> int:
    lines[2] = lines[2].replace(b'"source":"files"', b'"source":"other"')
    return 2


def delete_record(lines: list[bytes]) -> int:
    del lines[1]
    return 1


def swap_records(lines: list[bytes]) -> int:
    lines[1], lines[2] = lines[2], lines[1]
    return 1


def rehash_without_key(lines: list[bytes]) -> int:
    """Drop record 1, renumber and re-link the chain, and 'sign' with plain sha256."""
    del lines[1]
    prev = audit_chain.GENESIS
    for seq, line in enumerate(lines):
        doc = record(line)
        doc.pop("mac")
        doc.update(seq=seq, prev=prev)
        doc["mac"] = hashlib.sha256(audit_chain.canonical(doc)).hexdigest()
        lines[seq] = audit_chain.canonical(doc) + b"\n"
        prev = audit_chain.line_hash(lines[seq])
    return 0


def forge_with_other_key(lines: list[bytes]) -> int:
    """A consistent chain signed with a key that is not the audit key."""
    doc = record(lines[3])
    body = {k: v for k, v in doc.items() if k != "mac"}
    body["ok"] = False
    lines[3] = audit_chain.canonical({**body, "mac": audit_chain.sign(body, b"x" * 32)}) + b"\n"
    return 3


def truncate_tail(lines: list[bytes]) -> int:
    lines[-1] = lines[-1][: len(lines[-1]) // 2]
    return len(lines) - 1


def insert_record(lines: list[bytes]) -> int:
    lines.insert(2, lines[1])  # a replayed record
    return 2


@pytest.mark.parametrize(("tamper", "why"), [
    (edit_field, "MAC does not match"),
    (edit_by_hand, "MAC does not match"),
    (delete_record, "seq is 2, expected 1"),
    (swap_records, "seq is 2, expected 1"),
    (rehash_without_key, "MAC does not match"),
    (forge_with_other_key, "MAC does not match"),
    (truncate_tail, "incomplete"),
    (insert_record, "seq is 1, expected 2"),
])
def test_tampering_is_named_at_its_record(logged: Setup, tamper: Callable[[list[bytes]], int],
                                          why: str) -> None:
    lines = lines_of(logged)
    bad = tamper(lines)
    write_lines(logged, lines)
    doc = verify_json(logged, code=1)
    assert not doc["ok"] and doc["first_bad"] == bad and why in doc["reason"]
    assert doc["records"] == bad
    human = logged.drctl("audit", "verify")
    assert human.exit_code == 1
    assert human.stdout.startswith("FAILED: ") and f"record {bad}: " in human.stdout
    shown = logged.drctl("audit", "show", "--json")
    assert shown.exit_code == 1 and not json.loads(shown.stdout)["verification"]["ok"]


def test_appending_after_a_cut_line_keeps_the_damage_visible(logged: Setup) -> None:
    lines = lines_of(logged)
    write_lines(logged, [*lines[:-1], lines[-1][:20]])
    rt = open_runtime(load_config(logged.config))
    rt.record_event("test.after")
    after = lines_of(logged)
    assert len(after) == 7 and after[5] == lines[-1][:20] + b"\n"
    assert record(after[6])["seq"] == 6
    assert record(after[6])["prev"] == audit_chain.line_hash(after[5])
    result = audit.verify(rt)
    assert not result.ok and result.first_bad == 5 and result.records == 5


# -- concurrency ----------------------------------------------------------------------

WRITER = """
import sys, time
from pathlib import Path
from drdaemon.config import load
from drdaemon.runtime import open_runtime
rt = open_runtime(load(sys.argv[1]))
go = Path(sys.argv[3])
while not go.exists():
    time.sleep(0.005)
for i in range(int(sys.argv[4])):
    rt.record_event("test.concurrent", worker=sys.argv[2], n=i)
"""


def test_two_processes_appending_at_once_keep_one_chain(setup: Setup, tmp_path: Path) -> None:
    go = tmp_path / "go"
    each = 60  # 120 records: more than one mirrored segment
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(setup.config), w, str(go),
                               str(each)], stderr=subprocess.PIPE, text=True)
             for w in ("a", "b")]
    time.sleep(0.5)
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    doc = verify_json(setup, code=0)
    assert doc["records"] == 2 * each
    records = [record(line) for line in lines_of(setup)]
    for w in ("a", "b"):
        assert [r["n"] for r in records if r["worker"] == w] == list(range(each))
    workers = "".join(r["worker"] for r in records)
    switches = sum(x != y for x, y in itertools.pairwise(workers))
    assert switches >= 2, workers  # they really did append at the same time
    for region in REGIONS:
        mirrored = verify_json(setup, "--region", region, code=0)
        assert mirrored["records"] == 2 * each and mirrored["head"] == doc["head"]
    folder = audit_chain.mirror_folder(socket.gethostname(), lines_of(setup)[0])
    names = sorted(p.name for p in (tmp_path / "eu" / folder).iterdir())
    # Each mirror wrote the records it found new, once; the first 100 again as one
    # whole block, which a reader reads instead of the smaller ones.
    assert "000000000000-000000000099.jsonl" in names
    assert len(names) > 3 and names[-1].endswith(f"-{2 * each - 1:012d}.jsonl")
    # The runbook's way back from a region's copy (audit-chain-broken.md, Fix 2).
    restored = subprocess.run(["sh", "-c", "cat *.jsonl | awk '!seen[$0]++'"],
                              cwd=tmp_path / "eu" / folder, capture_output=True, check=True)
    assert restored.stdout == log_file(setup).read_bytes()


# -- the mirror -----------------------------------------------------------------------


def test_mirror_in_every_region_verifies_and_catches_rewrites(logged: Setup,
                                                              tmp_path: Path) -> None:
    local = lines_of(logged)
    folder = audit_chain.mirror_folder(socket.gethostname(), local[0])
    rt = open_runtime(load_config(logged.config))
    for region in REGIONS:
        assert audit_mirror.read_mirror(rt.store(region), folder) == local
        out = logged.drctl("audit", "verify", "--region", region)
        assert out.exit_code == 0, out.output + out.stderr
        assert out.stdout.startswith(f"OK: region {region}: 6 records verified")

    # An intruder edits a region's copy: the MAC says so.
    copy = next(p for p in sorted((tmp_path / "us" / folder).iterdir())
                if b'"ok":true' in p.read_bytes())
    copy.write_bytes(copy.read_bytes().replace(b'"ok":true', b'"ok":false', 1))
    doc = verify_json(logged, "--region", "us-local", code=1)
    # the first record with "ok" is the first snapshot's (record 0 made the tenant key)
    assert doc["first_bad"] == 1 and "MAC" in doc["reason"]

    # An intruder on the host cuts the local log: alone it still verifies, but the
    # region's copy proves records went missing, and the mirror keeps its longer copy.
    write_lines(logged, local[:2])
    assert verify_json(logged, code=0)["records"] == 2
    doc = verify_json(logged, "--region", "eu-local", code=1)
    assert doc["first_bad"] == 2 and "local log was cut" in doc["reason"]
    held = sorted((tmp_path / "eu" / folder).iterdir())
    assert set(audit_mirror.mirror(rt)) == set(REGIONS)
    assert sorted((tmp_path / "eu" / folder).iterdir()) == held
    assert audit_mirror.read_mirror(rt.store("eu-local"), folder) == local


def test_mirror_to_s3_regions_locks_every_segment_at_once(
        tmp_path: Path, lock_regions: list[S3Region]) -> None:
    tree = make_tree(tmp_path / "tree")
    setup = make_setup(tmp_path, [r.toml(prefix="dr") for r in lock_regions],
                       [directory_source("files", tree)])
    assert setup.drctl("backup").exit_code == 0
    for r in lock_regions:
        client = r.client()
        keys = [o["Key"] for o in client.list_objects_v2(
            Bucket=r.bucket, Prefix="dr/audit/")["Contents"]]
        # the tenant key made, the snapshot committed: each mirrored when recorded, as a
        # segment of the new records only, locked from the start and never written again
        assert [k.rsplit("/", 1)[1] for k in keys] == [
            "000000000000-000000000000.jsonl", "000000000001-000000000001.jsonl"]
        for key in keys:
            head = client.head_object(Bucket=r.bucket, Key=key)
            assert head["ObjectLockMode"] == "COMPLIANCE"
            versions = client.list_object_versions(Bucket=r.bucket, Prefix=key)["Versions"]
            assert len(versions) == 1
        assert verify_json(setup, "--region", r.name, code=0)["records"] == 2


def test_a_region_that_is_down_never_fails_an_event(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    tree = make_tree(tmp_path / "tree")
    (tmp_path / "down").write_text("a file where the region's folder should be")
    setup = make_setup(tmp_path, [local_region("eu-local", tmp_path / "eu", "europe"),
                                  local_region("us-down", tmp_path / "down", "north-america")],
                       [directory_source("files", tree)])
    rt = open_runtime(load_config(setup.config))
    with caplog.at_level("WARNING", logger="drdaemon.audit"):
        for n in range(3):
            rt.record_event("test.event", n=n)
    warnings = [r.getMessage() for r in caplog.records if "not mirrored" in r.getMessage()]
    assert len(warnings) == 1 and "us-down" in warnings[0]  # then left alone for a while
    assert audit.verify(rt).records == 3
    assert audit_mirror.verify_mirror(rt, "eu-local").records == 3
    assert not verify_json(setup, "--region", "us-down", code=1)["ok"]


def test_failure_events_reach_the_regions_at_once(setup: Setup) -> None:
    """A failure is evidence too: it is mirrored as soon as it is recorded."""
    rt = open_runtime(load_config(setup.config))
    rt.record_event("snapshot.failed", source="files", error="disk on fire")
    mirrored = audit_mirror.verify_mirror(rt, "eu-local")
    assert mirrored.ok and mirrored.records == len(audit.read_lines(setup.state))


# -- secrets --------------------------------------------------------------------------


def test_no_secret_in_the_log_or_its_mirrors(logged: Setup, tmp_path: Path) -> None:
    secret_line = next(line for line in logged.identity.read_text().splitlines()
                       if line.startswith("AGE-SECRET-KEY-"))
    mkey = load_manifest_key(logged.manifest_key)
    needles = [secret_line, secret_line.lower(), mkey.secret.hex(),
               audit_chain.audit_key(mkey).hex()]
    files = [log_file(logged), *(tmp_path / "eu" / "audit").rglob("*.jsonl"),
             *(tmp_path / "us" / "audit").rglob("*.jsonl")]
    assert len(files) == 1 + 2 * 6  # the log, and each record in each region
    for f in files:
        text = f.read_text().lower()
        assert not [n for n in needles if n.lower() in text], f


def test_values_that_look_like_secrets_are_withheld(setup: Setup) -> None:
    rt = open_runtime(load_config(setup.config))
    identity = next(line for line in setup.identity.read_text().splitlines()
                    if line.startswith("AGE-SECRET-KEY-"))
    rt.record_event("restore.failed", source="db", snapshot_id="x",
                    target="host=db.internal dbname=lms password=hunter2",
                    failed_regions={"eu": "connect to postgresql://ops:hunter2@db/lms failed",
                                    "us": "timeout"},
                    notes=[identity, "fine"], key=rt.manifest_key.secret.hex())
    [line] = lines_of(setup)
    text = line.decode()
    assert "hunter2" not in text and "AGE-SECRET-KEY" not in text.upper()
    assert rt.manifest_key.secret.hex() not in text
    doc = record(line)
    assert doc["target"] == audit_secrets.WITHHELD and doc["failed_regions"]["us"] == "timeout"
    assert doc["notes"] == [audit_secrets.WITHHELD, "fine"] and doc["source"] == "db"
    assert doc["withheld"] == ["target", "failed_regions.eu", "notes[0]", "key"]
    assert audit.verify(rt).ok


def test_reserved_field_names_are_refused(setup: Setup) -> None:
    rt = open_runtime(load_config(setup.config))
    with pytest.raises(ValueError, match="reserved"):
        rt.record_event("test.event", seq=7)
    assert not log_file(setup).exists() or lines_of(setup) == []


def test_generated_keys_are_recorded_without_secrets(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    region = local_region("eu-local", tmp_path / "eu", "europe") + local_region(
        "us-local", tmp_path / "us", "north-america")
    config = tmp_path / "drdaemon.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n\n[keys]\ngenerate = true\n'
                      f'recipients = []\nidentity_file = "{keys / "id.txt"}"\n'
                      f'manifest_key_file = "{keys / "manifest.key"}"\n\n{region}\n'
                      + directory_source("files", make_tree(tmp_path / "tree")))
    rt = open_runtime(load_config(config))
    [line] = audit_chain.split_lines((tmp_path / "state" / "audit" / "audit.jsonl").read_bytes())
    doc = record(line)
    assert doc["event"] == "key.generated" and doc["generated"] == ["identity", "manifest-key"]
    assert doc["recipient"] == rt.config.keys.recipients[0]
    assert doc["manifest_key_id"] == rt.manifest_key.key_id
    assert "AGE-SECRET-KEY" not in line.decode().upper()
    assert rt.manifest_key.secret.hex() not in line.decode()
    open_runtime(load_config(config))  # keys exist now: nothing more to record
    assert audit.verify(rt).records == 1


def key_records(setup: Setup) -> list[dict[str, Any]]:
    return [record(line) for line in lines_of(setup)
            if record(line)["event"] == "key.generated"]


def test_drctl_keys_are_recorded_with_their_public_facts_only(setup: Setup,
                                                              tmp_path: Path) -> None:
    new_id, new_key = tmp_path / "new" / "identity.txt", tmp_path / "new" / "manifest.key"
    made = setup.drctl("keys", "generate", "--out", str(new_id))
    assert made.exit_code == 0, made.output + made.stderr
    recipient = made.stdout.strip()
    # Only the fingerprint goes beside it, on stderr: stdout stays the bare recipient.
    assert made.stderr.startswith(f"fingerprint {keys.fingerprint(recipient)} ")
    made = setup.drctl("keys", "manifest-key", "--out", str(new_key))
    assert made.exit_code == 0 and made.stderr == "", made.output + made.stderr
    key_id = made.stdout.strip()

    identity, manifest = key_records(setup)
    assert identity["generated"] == ["identity"] and identity["path"] == str(new_id)
    assert identity["recipient"] == recipient
    assert identity["fingerprint"] == keys.fingerprint(recipient)
    assert manifest["generated"] == ["manifest-key"] and manifest["path"] == str(new_key)
    assert manifest["manifest_key_id"] == key_id == load_manifest_key(new_key).key_id
    assert "recipient" not in manifest
    text = log_file(setup).read_text()
    assert "AGE-SECRET-KEY" not in text.upper()
    assert load_manifest_key(new_key).secret.hex() not in text
    # Signed with the config's manifest key, in the chain, and in every region.
    assert verify_json(setup, code=0)["records"] == 2
    for region in REGIONS:
        assert verify_json(setup, "--region", region, code=0)["records"] == 2


def test_drctl_keys_without_a_usable_config_say_so_and_succeed(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DRDAEMON_CONFIG"}
    made = run_cli("drctl", "keys", "generate", "--out", str(tmp_path / "id.txt"), env=env)
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("age1") and made.stdout.count("\n") == 1
    fingerprint_line, note = made.stderr.splitlines(keepends=True)
    assert fingerprint_line.startswith(f"fingerprint {keys.fingerprint(made.stdout.strip())} ")
    assert note == ("note: not recorded in an audit log yet: no config given "
                    "(--config or $DRDAEMON_CONFIG); the first config that uses this key "
                    "records it (id.txt.unrecorded beside it until then)\n")
    # No config: nothing touched the embedded demo's state folder.
    assert not (Path(os.environ["HOME"]) / ".local").exists()

    # A config that is not written yet (keys come first in a new setup).
    env["DRDAEMON_CONFIG"] = str(tmp_path / "drdaemon.toml")
    made = run_cli("drctl", "keys", "manifest-key", "--out", str(tmp_path / "m.key"), env=env)
    assert made.returncode == 0, made.stderr
    assert made.stderr.count("\n") == 1 and made.stderr.startswith(
        "note: not recorded in an audit log yet: ") and "config file not found" in made.stderr
    assert not (tmp_path / "state").exists()

    # The config comes: the first runtime that uses the keys records them, once.
    recipient = str(keys.load_identities(tmp_path / "id.txt")[0].to_public())
    (tmp_path / "drdaemon.toml").write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n\n[keys]\n'
        f'recipients = ["{recipient}"]\nidentity_file = "{tmp_path / "id.txt"}"\n'
        f'manifest_key_file = "{tmp_path / "m.key"}"\n\n'
        + local_region("eu-local", tmp_path / "eu", "europe")
        + local_region("us-local", tmp_path / "us", "north-america"))
    rt = open_runtime(load_config(tmp_path / "drdaemon.toml"))
    first = [record(line) for line in audit.read_lines(tmp_path / "state")]
    assert [r["generated"] for r in first] == [["identity"], ["manifest-key"]]
    assert first[0]["recipient"] == recipient
    assert first[1]["manifest_key_id"] == rt.manifest_key.key_id
    assert all(r["recorded"].startswith("at first use") and r["made_at"] and r["host"]
               for r in first)
    assert not keys.unrecorded_path(tmp_path / "m.key").exists()
    open_runtime(load_config(tmp_path / "drdaemon.toml"))
    assert len(audit.read_lines(tmp_path / "state")) == 2 and audit.verify(rt).ok


def test_the_manifest_key_of_a_new_setup_begins_its_audit_chain(tmp_path: Path) -> None:
    """A config written before its manifest key: once the key exists, the config is usable."""
    recipient = keys.generate_identity(tmp_path / "identity.txt")
    mkey = tmp_path / "manifest.key"
    config = tmp_path / "drdaemon.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n\n[keys]\n'
                      f'recipients = ["{recipient}"]\nmanifest_key_file = "{mkey}"\n\n'
                      + local_region("eu-local", tmp_path / "eu", "europe")
                      + local_region("us-local", tmp_path / "us", "north-america"))
    made = run_cli("drctl", "--config", str(config), "keys", "manifest-key", "--out", str(mkey))
    assert made.returncode == 0 and made.stderr == "", made.stderr
    rt = open_runtime(load_config(config))
    [line] = audit.read_lines(tmp_path / "state")
    assert record(line)["manifest_key_id"] == rt.manifest_key.key_id == made.stdout.strip()
    assert audit.verify(rt).ok


def test_verify_everywhere_without_a_log_finds_no_chain_in_the_regions(setup: Setup) -> None:
    rt = open_runtime(load_config(setup.config))
    check = audit_mirror.verify_everywhere(rt)
    assert check.ok and check.local.records == 0
    assert {r: (v.ok, v.records, v.chains) for r, v in check.regions.items()} == {
        r: (True, 0, 0) for r in REGIONS}
    assert check.to_dict()["local"]["ok"] is True


def test_verify_everywhere_brings_a_new_region_up_to_date(logged: Setup,
                                                          tmp_path: Path) -> None:
    """A region added to the config holds no copy yet: the check copies, then compares."""
    text = logged.config.read_text()
    logged.config.write_text(text + "\n" + local_region("ap-local", tmp_path / "ap", "asia"))
    rt = open_runtime(load_config(logged.config))
    check = audit_mirror.verify_everywhere(rt)
    assert check.ok, check.to_dict()
    assert {r: v.records for r, v in check.regions.items()} == {
        "eu-local": 6, "us-local": 6, "ap-local": 6}

    # A local log that does not verify is not copied over the regions' evidence.
    lines = lines_of(logged)
    write_lines(logged, [*lines, lines[0]])  # a replayed record
    (tmp_path / "ap").rename(tmp_path / "ap-gone")
    check = audit_mirror.verify_everywhere(rt)
    assert not check.ok and check.local.first_bad == 6
    assert check.regions["ap-local"].reason is not None
    assert "no copy" in check.regions["ap-local"].reason
    assert check.regions["eu-local"].ok  # behind the local log, and agrees with it


# -- the pure core --------------------------------------------------------------------


def test_verify_lines_golden() -> None:
    lines = chain(5)
    ok = audit_chain.verify_lines(lines, KEY)
    assert ok == audit_chain.AuditVerification(True, 5, None, None,
                                               audit_chain.line_hash(lines[-1]))
    assert audit_chain.verify_lines([], KEY) == audit_chain.AuditVerification(True, 0)
    assert record(lines[0])["prev"] == audit_chain.GENESIS
    assert not audit_chain.verify_lines(lines, b"other key" * 4).ok
    spaced = [*lines[:4], lines[4].replace(b",", b", ", 1)]
    assert audit_chain.verify_lines(spaced, KEY).reason == \
        "not in canonical form: the line was edited"
    assert audit_chain.verify_lines([b"[1]\n"], KEY).reason == "not a JSON record"
    assert audit_chain.verify_lines([b"[" * 100_000 + b"\n"], KEY).reason == "not a JSON record"
    seq_true = record(lines[1])
    seq_true.pop("mac")
    seq_true["seq"] = True  # 1 == True in Python, not in the log
    forged = [lines[0], audit_chain.canonical(
        {**seq_true, "mac": audit_chain.sign(seq_true, KEY)}) + b"\n"]
    assert "seq is True" in (audit_chain.verify_lines(forged, KEY).reason or "")


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_changed_byte_is_caught_at_its_line(data: st.DataObject) -> None:
    lines = chain(6)
    i = data.draw(st.integers(0, len(lines) - 1))
    pos = data.draw(st.integers(0, len(lines[i]) - 1))
    new = data.draw(st.integers(0, 255).filter(lambda b: b != lines[i][pos]))
    blob = b"".join(lines)
    at = sum(len(x) for x in lines[:i]) + pos
    changed = audit_chain.split_lines(blob[:at] + bytes([new]) + blob[at + 1:])
    result = audit_chain.verify_lines(changed, KEY)
    assert not result.ok and result.first_bad == i and result.records == i


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=10))
def test_any_plain_fields_round_trip_through_a_signed_line(value: Any) -> None:
    fields = audit_secrets.plain_fields({"value": value})
    line = audit_chain.make_line(0, "2031-03-01T00:00:00+00:00", "test", fields,
                                 audit_chain.GENESIS, KEY)
    assert line.isascii() and line.count(b"\n") == 1
    assert audit_chain.verify_lines([line], KEY).ok


def test_scrub_patterns() -> None:
    for secret in ("AGE-SECRET-KEY-1QQQ", "age-secret-key-1qqq", "password=x",
                   "dbname=a PASSWORD = 'x'", "postgres://u:p@h/db", "https://a:b@host",
                   "...abcdef0123..."):
        assert audit_secrets.looks_secret(secret, known=["ABCDEF0123"]), secret
    for fine in ("password authentication failed for user ops", "postgres://h/db",
                 "postgres://u@h/db", "sha256:abcd", "age1qyqszqgpqyqszqgpqyqszqgp"):
        assert not audit_secrets.looks_secret(fine), fine
    assert audit_secrets.scrub({"a": {"password=x": 1}}) == (
        {"a": {f"{audit_secrets.WITHHELD} #0": 1}}, ["a.#0"])


def test_segments_and_names() -> None:
    lines = chain(3)
    assert list(audit_chain.segments(lines)) == [(0, b"".join(lines), False)]
    full = [b"x\n"] * (audit_chain.SEGMENT_RECORDS + 1)
    assert [(f, done) for f, _, done in audit_chain.segments(full)] == [(0, True), (100, False)]
    assert layout.host_label("Web-01.Example.org") == "web-01.example.org"
    assert layout.host_label("../é") == "host"
    assert audit_chain.mirror_folder("h", lines[0]).startswith("audit/h/")
    assert audit_chain.split_lines(b"a\nb") == [b"a\n", b"b"] and audit_chain.split_lines(b"") == []


def test_ed25519_records_verify_with_the_public_key_alone(tmp_path: Path) -> None:
    from drdaemon.signing import generate_signing_key

    signer = generate_signing_key(tmp_path / "signing.key")
    # A new signed log opens with the handover to its key (test_audit_signing.py).
    lines, prev = [], audit_chain.GENESIS
    for seq in range(3):
        event, fields = (("test.event", {"n": seq}) if seq else
                         (audit_chain.HANDOVER, audit_chain.handover_fields(signer.public)))
        line = audit_chain.make_line(seq, f"2031-03-01T02:00:0{seq}+00:00", event,
                                     fields, prev, signer)
        lines.append(line)
        prev = audit_chain.line_hash(line)
    public = audit_chain.ChainKeys(public=(signer.public,))
    assert audit_chain.verify_lines(lines, public).ok
    # No secret proves a signed record, and a secret does not replace the public key.
    assert "no record is proven" in (audit_chain.verify_lines(lines, KEY).reason or "")
    edited = [*lines[:1], lines[1].replace(b'"n":1', b'"n":7'), *lines[2:]]
    result = audit_chain.verify_lines(edited, public)
    assert (result.first_bad, result.records) == (1, 1)
    assert "signature does not match" in (result.reason or "")
