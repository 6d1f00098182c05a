"""Rotating keys without re-encrypting data (key_rotation.py), end to end: real moto S3
regions with Object Lock (so versioned), real age, real processes killed with SIGKILL.

`drctl keys rewrap` swaps the ops recipient between backups (every snapshot restores with
the new identity, the removed one opens no copy left anywhere), and a rewrap killed at a
point seen from outside leaves every key openable and is completed by the next run.
`drctl tenant rotate-key` starts a new key; the old one keeps opening older snapshots,
and erasure destroys both."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import S3Region
from hypothesis import given, settings
from hypothesis import strategies as st
from test_erasure import HoldingProxy
from test_tenant_keys import TENANTS, World, age_decrypt, make_world

from drdaemon import layout, statefs, tenant_key_record, tenant_keys
from drdaemon.cli.tenant import show_lines
from drdaemon.keys import fingerprint, generate_identity
from drdaemon.runtime import load_config, open_runtime

STATE = "state folder"


@pytest.fixture
def world(tmp_path: Path, lock_regions: list[S3Region]) -> World:
    return make_world(tmp_path, lock_regions)


def swap_ops(w: World, tmp: Path) -> tuple[Path, str]:
    """Replace the ops recipient (and identity file) in the config by a new one."""
    new_ops = tmp / "keys" / "ops-new.txt"
    new_rec = generate_identity(new_ops)
    text = w.setup.config.read_text()
    w.setup.config.write_text(text.replace(w.setup.recipient, new_rec).replace(
        str(w.setup.identity), str(new_ops)))
    return new_ops, new_rec


def key_ids(w: World) -> dict[str, list[str]]:
    rt = open_runtime(load_config(str(w.setup.config)))
    return {t: sorted(tenant_keys.survey(rt, t).records) for t in TENANTS}


def wrapped_copies(w: World, tenant: str, kid: str, every_version: bool) -> dict[str, bytes]:
    """where -> bytes of the key's wrapped copy: the state folder's and each region's
    current `.age` (or every version of every keyring object of it, staged ones too)."""
    name = layout.tenant_key_object(tenant, kid)
    out = {STATE: (w.setup.state / name).read_bytes()}
    for r in w.regions:
        c = r.client()
        if not every_version:
            out[r.name] = c.get_object(Bucket=r.bucket, Key=name)["Body"].read()
            continue
        listed = c.list_object_versions(Bucket=r.bucket, Prefix=f"{name[:-4]}.")
        for v in listed.get("Versions", []):
            if v["Key"].endswith(".age"):
                out[f"{r.name} {v['Key']} {v['VersionId']}"] = c.get_object(
                    Bucket=r.bucket, Key=v["Key"], VersionId=v["VersionId"])["Body"].read()
    return out


def record_wrapped_to(w: World, tenant: str, kid: str) -> dict[str, list[str]]:
    name = layout.tenant_key_record(tenant, kid)
    raws = {STATE: (w.setup.state / name).read_bytes()}
    raws |= {r.name: r.client().get_object(Bucket=r.bucket, Key=name)["Body"].read()
             for r in w.regions}
    return {where: sorted(json.loads(raw)["wrapped_to"]) for where, raw in raws.items()}


def snapshot_key(w: World, snap_id: str) -> str:
    return w.show(snap_id)["data"]["encryption"]["tenant_key"]["key_id"]  # type: ignore[no-any-return]


def restore_all(w: World, rounds: list[dict[str, dict[str, Any]]], tmp: Path,
                *identity: str, tenants: tuple[str, ...] = TENANTS) -> None:
    """Restore every snapshot of every round, each tenant's tree compared with its own."""
    for n, results in enumerate(rounds):
        for t in tenants:
            src = f"files-{t}"
            target = tmp / f"restored-{n}-{t}"
            w.setup.drctl_json("restore", results[src]["snapshot_id"], "--source", src,
                               "--to", str(target), *identity)
            assert (target / "docs" / "secret.txt").read_text() == f"{t} grades\n" * 100


def test_rewrap_between_backups_killed_halfway_then_completed(world: World,
                                                              tmp_path: Path) -> None:
    w = world
    old_ops, escrow_fp = w.setup.identity, fingerprint(w.escrow_recipient)
    old_fp = fingerprint(w.setup.recipient)
    first = w.backup()
    w.setup.drctl_json("tenant", "rotate-key", "uni-a")  # uni-a: two keys, both rewrapped
    second = w.backup()
    new_ops, new_rec = swap_ops(w, tmp_path)
    wanted = sorted([fingerprint(new_rec), escrow_fp])
    keys = key_ids(w)
    assert [len(keys[t]) for t in TENANTS] == [2, 1]

    # Only the departing identity: no new copy could be checked, so nothing is done.
    refused = w.setup.drctl("keys", "rewrap", "--identity", str(old_ops))
    assert refused.exit_code == 2 and "--identity is repeatable" in refused.stderr

    # Killed while deleting the first key's staged copy in the first region (a proxy
    # holds that request, so the point is known whatever the machine's speed).
    r0 = w.regions[0]
    proxy = HoldingProxy(r0.endpoint_url, hold_at=1)
    config = w.setup.config.read_text()
    w.setup.config.write_text(config.replace(f'endpoint_url = "{r0.endpoint_url}"',
                                             f'endpoint_url = "{proxy.url}"'))
    try:
        drctl = str(Path(sys.executable).parent / "drctl")
        env = dict(os.environ, DRDAEMON_CONFIG=str(w.setup.config))
        proc = subprocess.Popen([drctl, "keys", "rewrap", "--identity", str(w.escrow),
                                 "--json"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        assert proxy.holding.wait(120), proc.communicate(timeout=5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        t0, k0 = "uni-a", keys["uni-a"][0]
        # half-way: the state folder and region 1 wrap k0 to today's recipients (its
        # staged copy still in region 1), region 2 and every other key as before
        assert record_wrapped_to(w, t0, k0) == {
            STATE: wanted, r0.name: wanted, w.regions[1].name: sorted([old_fp, escrow_fp])}
        staged = layout.tenant_key_staged(t0, k0)
        assert "Versions" in r0.client().list_object_versions(Bucket=r0.bucket, Prefix=staged)
        # every tenant key still opens everywhere (escrow is in both sets)
        for t, kids in keys.items():
            for kid in kids:
                for where, blob in wrapped_copies(w, t, kid, every_version=False).items():
                    assert age_decrypt(w.escrow, blob).returncode == 0, (t, kid, where)
        proxy.passthrough = True
        out = w.setup.drctl_json("keys", "rewrap", "--identity", str(w.escrow))
    finally:
        w.setup.config.write_text(config)
        proxy.close()
    assert out["ok"] and (out["rewrapped"], out["unchanged"], out["failed"]) == (3, 0, 0)
    done = {(k["tenant"], k["key_id"]): k for k in out["keys"]}
    # the killed run finished k0 in the state folder: the next one did the regions only
    assert done[(t0, k0)]["places"] == [r.name for r in w.regions]
    assert done[("uni-b", keys["uni-b"][0])]["places"] == ["the state folder"] + [
        r.name for r in w.regions]
    assert all(old_fp in k["old_wrapped_to"] for k in out["keys"])

    # Every copy, in every object version, opens with the new ops identity only; no
    # staged copy is left; every record names today's recipients.
    for t, kids in keys.items():
        for kid in kids:
            copies = wrapped_copies(w, t, kid, every_version=True)
            assert len(copies) == 1 + len(w.regions), copies.keys()
            for where, blob in copies.items():
                assert age_decrypt(old_ops, blob).returncode != 0, (t, kid, where)
                assert age_decrypt(new_ops, blob).returncode == 0, (t, kid, where)
            assert set(map(tuple, record_wrapped_to(w, t, kid).values())) == {tuple(wanted)}
    audit = [json.loads(x) for x in (w.setup.state / "audit" / "audit.jsonl").read_text()
             .splitlines()]
    rewrapped = [e for e in audit if e["event"] == "tenant_key.rewrapped"]
    assert {(e["tenant"], e["key_id"]) for e in rewrapped} == set(done)
    assert all(e["wrapped_to"] == wanted and old_fp in e["old_wrapped_to"] for e in rewrapped)

    # Before and after: every snapshot restores with the new ops identity (the config's).
    third = w.backup()
    restore_all(w, [first, second, third], tmp_path)
    again = w.setup.drctl("keys", "rewrap", "--identity", str(new_ops))
    assert again.exit_code == 0, again.output + again.stderr
    assert again.stdout.splitlines()[-1].startswith(
        "0 key(s) rewrapped, 3 already wrapped to today's recipients, 0 failed; recipients: ")


def test_rotate_key_old_snapshots_keep_opening_and_erasure_destroys_both(
        world: World, tmp_path: Path) -> None:
    w = world
    first = w.backup()
    old = snapshot_key(w, first["files-uni-a"]["snapshot_id"])
    rotated = w.setup.drctl_json("tenant", "rotate-key", "uni-a")
    assert rotated["previous_key_id"] == old and rotated["key_id"] != old
    assert rotated["kept_key_ids"] == [old]
    new = rotated["key_id"]
    shown = w.setup.drctl_json("tenant", "show", "uni-a")
    keys = shown["sections"]["keys"]
    assert keys["in_use"] == new
    assert {k["key_id"]: k["current"] for k in keys["keys"]} == {old: False, new: True}
    text = "\n".join(show_lines(shown))
    assert f"{new} current" in text and f"{old} older" in text

    second = w.backup()
    assert snapshot_key(w, second["files-uni-a"]["snapshot_id"]) == new
    restore_all(w, [first, second], tmp_path, "--identity", str(w.escrow), tenants=("uni-a",))
    audit = [json.loads(x) for x in (w.setup.state / "audit" / "audit.jsonl").read_text()
             .splitlines()]
    [record] = [e for e in audit if e["event"] == "tenant_key.rotated"]
    assert (record["tenant"], record["previous_key_id"], record["key_id"]) == (
        "uni-a", old, new)

    erased = w.setup.drctl("tenant", "erase", "uni-a", "--json")
    assert erased.exit_code == 0, erased.output + erased.stderr
    cert = json.loads(erased.stdout)
    assert sorted(k["key_id"] for k in cert["keys"]) == sorted([old, new])
    for r in w.regions:
        listed = r.client().list_object_versions(Bucket=r.bucket,
                                                 Prefix=layout.tenant_keys_prefix("uni-a"))
        assert not listed.get("Versions") and not listed.get("DeleteMarkers")
    assert statefs.list_names(w.setup.state, "tenants/uni-a/keys") == []
    for results in (first, second):
        failed = w.setup.drctl("restore", results["files-uni-a"]["snapshot_id"], "--source",
                               "files-uni-a", "--to", str(tmp_path / "gone"))
        assert failed.exit_code != 0 and "was erased on" in failed.stderr
    again = w.setup.drctl("tenant", "rotate-key", "uni-a")
    assert again.exit_code == 2 and "was erased on" in again.stderr
    # A rewrap passes the erased tenant over: nothing of its keys comes back.
    out = w.setup.drctl_json("keys", "rewrap", "--identity", str(w.escrow))
    assert "was erased on" in out["skipped"]["uni-a"]
    assert (out["rewrapped"], out["unchanged"]) == (0, 1)  # uni-b's, wrapped as configured
    assert statefs.list_names(w.setup.state, "tenants/uni-a/keys") == []
    for r in w.regions:
        assert "Versions" not in r.client().list_object_versions(
            Bucket=r.bucket, Prefix=layout.tenant_keys_prefix("uni-a"))


_STAMPS = st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2027, 1, 1),
                      timezones=st.just(UTC))


@settings(max_examples=100, deadline=None)
@given(st.lists(_STAMPS, max_size=5), _STAMPS)
def test_a_rotated_key_is_chosen_even_when_the_clock_is_behind(existing: list[datetime],
                                                               now: datetime) -> None:
    records = [tenant_key_record.KeyRecord(
        tenant_key_record.TenantKey("t", f"{n + 1:016x}", "x"),
        tenant_key_record.created_stamp(c), (), b"") for n, c in enumerate(existing)]
    stamp = tenant_key_record.rotation_stamp(now, records)
    assert all(stamp > r.created for r in records)
    assert stamp >= tenant_key_record.created_stamp(now)
    new = tenant_key_record.KeyRecord(tenant_key_record.TenantKey("t", "0" * 16, "x"), stamp,
                                      (), b"")  # the smallest key id: wins by date alone
    assert tenant_key_record.choose([*records, new]) == new


def test_a_staged_copy_is_named_by_its_key() -> None:
    kid = "0123456789abcdef"
    assert layout.parse_tenant_key_name(layout.tenant_key_staged("uni-a", kid)) == (kid, "rewrap")
    assert layout.parse_tenant_key_name(layout.tenant_key_object("uni-a", kid)) == (kid, "age")
    assert layout.parse_tenant_key_name(f"tenants/uni-a/keys/{kid}.other.age") is None
