"""Per-tenant keys end to end: real moto S3 regions (Object Lock, versioning), real age,
real PostgreSQL. Each tenant's snapshots are encrypted to its own key, wrapped to ops and
escrow in every region and the state folder; restores, drills and deep verifies unwrap it."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pyrage
import pytest
from conftest import PgServer, S3Region
from hypothesis import given, settings
from hypothesis import strategies as st
from lms import populate, table_rows
from old_format import downgrade
from pyrage import x25519
from support import Setup, directory_source, make_setup, postgres_source

from drdaemon import layout, manifest, statefs, tenant_key_record, tenant_keys
from drdaemon.errors import IntegrityError
from drdaemon.keys import ManifestKey, fingerprint, generate_identity, load_manifest_key
from drdaemon.runtime import load_config, open_runtime

TENANTS = ("uni-a", "uni-b")


@dataclasses.dataclass
class World:
    setup: Setup
    escrow: Path
    escrow_recipient: str
    regions: list[S3Region]
    trees: dict[str, Path]

    def backup(self) -> dict[str, dict[str, Any]]:
        """source -> its backup result."""
        return {r["source"]: r for r in self.setup.drctl_json("backup")}

    def show(self, snap_id: str) -> dict[str, Any]:
        return self.setup.drctl_json("snapshots", "show", snap_id)  # type: ignore[no-any-return]


def add_escrow(setup: Setup, tmp: Path) -> tuple[Path, str]:
    """The second operator recipient (escrow), named, next to the ops one (make_setup)."""
    return setup.escrow, setup.escrow_recipient


def make_world(tmp_path: Path, regions: list[S3Region]) -> World:
    trees = {}
    sources = []
    for tenant in TENANTS:
        tree = tmp_path / f"tree-{tenant}"
        (tree / "docs").mkdir(parents=True)
        (tree / "docs" / "secret.txt").write_text(f"{tenant} grades\n" * 100)
        trees[tenant] = tree
        sources.append(directory_source(f"files-{tenant}", tree, tenant=tenant))
    setup = make_setup(tmp_path, [r.toml() for r in regions], sources)
    escrow, rec = add_escrow(setup, tmp_path)
    return World(setup, escrow, rec, regions, trees)


@pytest.fixture
def world(tmp_path: Path, lock_regions: list[S3Region]) -> World:
    return make_world(tmp_path, lock_regions)


def s3_get(region: S3Region, key: str) -> bytes:
    return region.client().get_object(Bucket=region.bucket, Key=key)["Body"].read()  # type: ignore[no-any-return]


def s3_put(region: S3Region, key: str, body: bytes) -> None:
    region.client().put_object(Bucket=region.bucket, Key=key, Body=body)


def keyring(region: S3Region, tenant: str) -> list[str]:
    listed = region.client().list_objects_v2(Bucket=region.bucket,
                                             Prefix=layout.tenant_keys_prefix(tenant))
    return sorted(o["Key"] for o in listed.get("Contents", []))


def age_decrypt(identity: Path, data: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["age", "-d", "-i", str(identity)], input=data, capture_output=True,
                          check=False)


def unwrap_with_age(tmp: Path, identity: Path, wrapped: bytes, name: str) -> Path:
    """The break-glass step: `age -d -i OPS tenants/T/keys/K.age > tenant.key`."""
    out = age_decrypt(identity, wrapped)
    assert out.returncode == 0, out.stderr
    path = tmp / name
    path.write_bytes(out.stdout)
    path.chmod(0o600)
    return path


def test_two_tenants_two_keys_unlocked_keyrings_everywhere(world: World, tmp_path: Path) -> None:
    results = world.backup()
    shown = {t: world.show(results[f"files-{t}"]["snapshot_id"]) for t in TENANTS}
    keys = {t: shown[t]["data"]["encryption"]["tenant_key"] for t in TENANTS}
    assert {t: k["tenant"] for t, k in keys.items()} == {t: t for t in TENANTS}
    assert keys["uni-a"]["key_id"] != keys["uni-b"]["key_id"]
    for t in TENANTS:
        assert shown[t]["version"] == 3
        kid = keys[t]["key_id"]
        names = [layout.tenant_key_object(t, kid), layout.tenant_key_record(t, kid)]
        for region in world.regions:
            assert keyring(region, t) == names
            for name in names:  # keyring objects: no Object Lock, while the data has one
                head = region.client().head_object(Bucket=region.bucket, Key=name)
                assert "ObjectLockMode" not in head and "ObjectLockRetainUntilDate" not in head
            data = region.client().head_object(Bucket=region.bucket,
                                               Key=shown[t]["data"]["name"])
            assert data["ObjectLockMode"] == "COMPLIANCE"
        for name in names:
            assert (world.setup.state / name).is_file()
            assert (world.setup.state / name).stat().st_mode & 0o777 == 0o600
        record = json.loads((world.setup.state / names[1]).read_text())
        assert shown[t]["data"]["encryption"]["recipients"] == [fingerprint(record["recipient"])]
        assert sorted(record["wrapped_to"]) == sorted(
            [fingerprint(world.setup.recipient), fingerprint(world.escrow_recipient)])

    # Tenant A's data opens with A's key (unwrapped by stock age) and not with B's, nor
    # with the operator identities themselves.
    region = world.regions[1]
    unwrapped = {t: unwrap_with_age(tmp_path, world.setup.identity, (
        world.setup.state / layout.tenant_key_object(t, keys[t]["key_id"])).read_bytes(),
        f"{t}.key") for t in TENANTS}
    data_a = s3_get(region, shown["uni-a"]["data"]["name"])
    assert age_decrypt(unwrapped["uni-a"], data_a).returncode == 0
    for wrong in (unwrapped["uni-b"], world.setup.identity, world.escrow):
        out = age_decrypt(wrong, data_a)
        assert out.returncode != 0 and b"no identity matched" in out.stderr.lower()


def test_restore_drill_and_deep_verify_with_ops_and_escrow(world: World, tmp_path: Path) -> None:
    world.backup()
    for label, identity in (("ops", world.setup.identity), ("escrow", world.escrow)):
        for t in TENANTS:
            target = tmp_path / f"restored-{label}-{t}"
            out = world.setup.drctl_json("restore", "latest", "--source", f"files-{t}",
                                         "--to", str(target), "--identity", str(identity))
            assert out["target"] == str(target)
            assert (target / "docs" / "secret.txt").read_text() == f"{t} grades\n" * 100
        drill = world.setup.drctl("drill", "run", "--identity", str(identity), "--json")
        assert drill.exit_code == 0, drill.output + drill.stderr
        report = world.setup.drctl_json("verify", "--deep", "--identity", str(identity))
        assert report["ok"] and len(report["copies"]) == 4
    lines = [json.loads(ln) for ln in (world.setup.state / "audit" / "audit.jsonl")
             .read_text().splitlines()]
    unwraps = [ln for ln in lines if ln["event"] == "tenant_key.unwrapped"]
    # each restore once, each drill once a tenant, each deep verify once a tenant key
    assert len(unwraps) == 2 * (2 + 2 + 2)
    assert {u["tenant"] for u in unwraps} == set(TENANTS)
    assert all(u["user"] and u["host"] and u["key_id"]
               for u in unwraps)


def test_wrong_identity_names_the_wrapping_recipients(world: World, tmp_path: Path) -> None:
    world.backup()
    other = tmp_path / "stranger.txt"
    generate_identity(other)
    result = world.setup.drctl("restore", "latest", "--source", "files-uni-a", "--to",
                               str(tmp_path / "x"), "--identity", str(other))
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "no identity given can unwrap tenant uni-a's key" in result.stderr
    assert f"ops ({fingerprint(world.setup.recipient)}" in result.stderr
    assert f"escrow ({fingerprint(world.escrow_recipient)}" in result.stderr
    assert not (tmp_path / "x").exists()
    lines = (world.setup.state / "audit" / "audit.jsonl").read_text()
    assert "tenant_key.unwrap_failed" in lines


def test_planted_and_tampered_records_are_never_encrypted_to(world: World,
                                                             tmp_path: Path) -> None:
    """A record not signed by our manifest key, or altered, never redirects encryption."""
    attacker = tmp_path / "attacker.txt"
    evil = generate_identity(attacker)
    forged_key = ManifestKey(b"\x01" * 32)
    evil_key = tenant_key_record.TenantKey("uni-a", tenant_key_record.key_id_of(evil), evil)
    planted = tenant_key_record.encode_record(evil_key, tenant_key_record.created_stamp(
        datetime(2000, 1, 1, tzinfo=UTC)), [fingerprint(evil)], forged_key)
    wrapped = pyrage.encrypt(b"x", [x25519.Recipient.from_str(world.setup.recipient)])
    for region in world.regions:
        s3_put(region, layout.tenant_key_record("uni-a", evil_key.key_id), planted)
        s3_put(region, layout.tenant_key_object("uni-a", evil_key.key_id), wrapped)
    results = world.backup()
    used = world.show(results["files-uni-a"]["snapshot_id"])["data"]["encryption"]
    assert used["tenant_key"]["key_id"] != evil_key.key_id
    assert used["recipients"] != [fingerprint(evil)]

    # Now alter the genuine record everywhere: the recipient swapped for the attacker's,
    # its MAC kept. The next backup refuses it and makes a new key instead.
    good = used["tenant_key"]["key_id"]
    rec_name = layout.tenant_key_record("uni-a", good)
    doc = json.loads((world.setup.state / rec_name).read_text())
    doc["recipient"] = evil
    tampered = json.dumps(doc).encode()
    (world.setup.state / rec_name).write_bytes(tampered)
    for region in world.regions:
        s3_put(region, rec_name, tampered)
    with pytest.raises(IntegrityError, match="authentication failed"):
        tenant_key_record.parse_record(tampered, load_manifest_key(world.setup.manifest_key),
                                 "uni-a", good)
    results = world.backup()
    again = world.show(results["files-uni-a"]["snapshot_id"])["data"]["encryption"]
    assert again["tenant_key"]["key_id"] not in (good, evil_key.key_id)
    data = s3_get(world.regions[0], world.show(results["files-uni-a"]["snapshot_id"])
                  ["data"]["name"])
    assert age_decrypt(attacker, data).returncode != 0


def test_planted_wrapped_key_is_refused_and_another_copy_used(world: World,
                                                              tmp_path: Path) -> None:
    results = world.backup()
    kid = world.show(results["files-uni-a"]["snapshot_id"])["data"]["encryption"][
        "tenant_key"]["key_id"]
    name = layout.tenant_key_object("uni-a", kid)
    # Anyone can wrap some identity to the ops recipient and put it under the name.
    other = x25519.Identity.generate()
    planted = pyrage.encrypt(f"{other}\n".encode(),
                             [x25519.Recipient.from_str(world.setup.recipient)])
    (world.setup.state / name).write_bytes(planted)
    s3_put(world.regions[0], name, planted)
    target = tmp_path / "out"
    world.setup.drctl_json("restore", "latest", "--source", "files-uni-a", "--to", str(target))
    assert (target / "docs" / "secret.txt").is_file()
    s3_put(world.regions[1], name, planted)
    result = world.setup.drctl("restore", "latest", "--source", "files-uni-a", "--to",
                               str(tmp_path / "out2"))
    assert result.exit_code != 0
    assert f"no usable copy of tenant uni-a's key {kid}" in result.stderr
    assert "planted" in result.stderr


def test_missing_copies_are_repaired_and_none_left_is_one_line(world: World,
                                                               tmp_path: Path) -> None:
    results = world.backup()
    kid = world.show(results["files-uni-a"]["snapshot_id"])["data"]["encryption"][
        "tenant_key"]["key_id"]
    names = [layout.tenant_key_object("uni-a", kid), layout.tenant_key_record("uni-a", kid)]
    original = {n: (world.setup.state / n).read_bytes() for n in names}
    client = world.regions[1].client()
    for n in names:
        for v in client.list_object_versions(Bucket=world.regions[1].bucket,
                                             Prefix=n).get("Versions", []):
            client.delete_object(Bucket=world.regions[1].bucket, Key=n,
                                 VersionId=v["VersionId"])
        (world.setup.state / n).unlink()
    again = world.backup()
    assert world.show(again["files-uni-a"]["snapshot_id"])["data"]["encryption"][
        "tenant_key"]["key_id"] == kid
    for n in names:
        assert s3_get(world.regions[1], n) == original[n]
        assert (world.setup.state / n).read_bytes() == original[n]
    lines = (world.setup.state / "audit" / "audit.jsonl").read_text()
    assert lines.count('"tenant_key.repaired"') == 2  # region us-virginia, the state folder

    # Every copy gone (as an erasure leaves it): one clear line, for ops and escrow alike.
    for region in world.regions:
        c = region.client()
        for n in names:
            for v in c.list_object_versions(Bucket=region.bucket, Prefix=n).get("Versions", []):
                c.delete_object(Bucket=region.bucket, Key=n, VersionId=v["VersionId"])
    for n in names:
        (world.setup.state / n).unlink()
    for identity in (world.setup.identity, world.escrow):
        result = world.setup.drctl("restore", "latest", "--source", "files-uni-a", "--to",
                                   str(tmp_path / "gone"), "--identity", str(identity))
        assert result.exit_code == 2
        assert result.stderr.strip() == (
            f"error: no copy of tenant uni-a's key {kid} was found in any region or the "
            "state folder") or result.stderr.strip().endswith(
            f"no copy of tenant uni-a's key {kid} was found in any region or the state folder")
        assert result.stderr.count("\n") == 1


def test_replica_repair_puts_the_tenant_key_back_with_the_snapshot(world: World) -> None:
    results = world.backup()
    snap = world.show(results["files-uni-a"]["snapshot_id"])
    kid = snap["data"]["encryption"]["tenant_key"]["key_id"]
    us = world.regions[1]
    client = us.client()
    # The snapshot's locked versions stay; a delete marker hides them, as a lost copy looks.
    for name in (snap["data"]["name"], layout.manifest_object_name("files-uni-a", snap["id"])):
        client.delete_object(Bucket=us.bucket, Key=name)
    for name in (layout.tenant_key_object("uni-a", kid), layout.tenant_key_record("uni-a", kid)):
        for v in client.list_object_versions(Bucket=us.bucket, Prefix=name).get("Versions", []):
            client.delete_object(Bucket=us.bucket, Key=name, VersionId=v["VersionId"])
    assert keyring(us, "uni-a") == []
    result = world.setup.drctl("replicate", "--repair")
    assert result.exit_code == 0, result.output + result.stderr
    assert keyring(us, "uni-a") == [layout.tenant_key_object("uni-a", kid),
                                    layout.tenant_key_record("uni-a", kid)]


def _ensure(config: str) -> str:
    rt = open_runtime(load_config(config))
    return tenant_keys.ensure_key(rt, "uni-c").key_id


def test_concurrent_creation_ends_with_one_key(world: World, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(6) as pool:
        ids = pool.map(_ensure, [str(world.setup.config)] * 6)
    assert len(set(ids)) == 1
    for region in world.regions:
        assert keyring(region, "uni-c") == [layout.tenant_key_object("uni-c", ids[0]),
                                            layout.tenant_key_record("uni-c", ids[0])]
    assert statefs.list_names(world.setup.state, "tenants/uni-c/keys") == [
        f"{ids[0]}.age", f"{ids[0]}.json"]

    # Two hosts (two state folders) that each made a key at once: both stay stored, and
    # every process converges on the same one.
    rt = open_runtime(load_config(str(world.setup.config)))
    other_cfg = dataclasses.replace(rt.config, daemon=dataclasses.replace(
        rt.config.daemon, state_dir=tmp_path / "state-b"))
    rt_b = open_runtime(other_cfg)
    tenant_keys._make(rt_b, "uni-c")  # the other host's own key, made in the same race
    found = tenant_keys.survey(rt, "uni-c")
    assert len(found.records) == 2
    assert tenant_keys.ensure_key(rt, "uni-c") == tenant_keys.ensure_key(rt_b, "uni-c")


def _setting(pg: PgServer, dbname: str) -> list[str]:
    with psycopg.connect(pg.dsn()) as conn:
        row = conn.execute("SELECT s.setconfig FROM pg_db_role_setting s JOIN pg_database d "
                           "ON d.oid = s.setdatabase WHERE d.datname = %s AND s.setrole = 0",
                           (dbname,)).fetchone()
    return list(row[0]) if row else []


def test_old_format_restores_next_to_new(tmp_path: Path, pg_database: str, pg_server: PgServer,
                                         s3_regions: list[S3Region]) -> None:
    """A version-2 snapshot (encrypted to [keys] recipients, settings sealed to them) and a
    version-3 one of the same database: restores with ops and escrow, drill, deep verify."""
    populate(pg_database)
    source_db = psycopg.conninfo.conninfo_to_dict(pg_database)["dbname"]
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {source_db} SET app.jwt_secret = 'hush'")
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions],
                       [postgres_source("lms-db", pg_database)])
    escrow, _ = add_escrow(setup, tmp_path)
    [old] = setup.drctl_json("backup")
    downgrade(setup, "lms-db", old["snapshot_id"])
    [new] = setup.drctl_json("backup")
    versions = {s: setup.drctl_json("snapshots", "show", s)["version"]
                for s in (old["snapshot_id"], new["snapshot_id"])}
    assert versions == {old["snapshot_id"]: 2, new["snapshot_id"]: 3}
    expected = table_rows(pg_database)
    made = []
    try:
        for snap, identity in ((old, setup.identity), (new, setup.identity), (old, escrow),
                               (new, escrow)):
            name = f"restored_{uuid.uuid4().hex[:10]}"
            made.append(name)
            setup.drctl_json("restore", snap["snapshot_id"], "--source", "lms-db", "--to",
                             name, "--identity", str(identity))
            assert table_rows(pg_server.dsn(name)) == expected
            assert _setting(pg_server, name) == ["app.jwt_secret=hush"]
    finally:
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            for name in made:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    for identity in (setup.identity, escrow):
        drill = setup.drctl("drill", "run", "--identity", str(identity), "--json")
        assert drill.exit_code == 0, drill.output + drill.stderr
        report = setup.drctl_json("verify", "--deep", "--identity", str(identity))
        assert report["ok"] and len(report["copies"]) == 4


def test_creation_waits_for_the_lock_and_reads_again(world: World) -> None:
    """A process that found no key waits for the creation lock, then reads the keyring
    again before it makes one: the key made meanwhile is the one it uses."""
    config = str(world.setup.config)
    rt = open_runtime(load_config(config))
    with multiprocessing.get_context("fork").Pool(1) as pool:  # forked before the lock
        with statefs.locked(world.setup.state, tenant_keys.CREATE_LOCK, os.O_RDWR):
            pending = pool.apply_async(_ensure, (config,))
            time.sleep(2)
            assert not pending.ready()  # found no key, and waits for the lock
            tenant_keys._make(rt, "uni-c")
        kid = pending.get(timeout=120)
    assert list(tenant_keys.survey(rt, "uni-c").records) == [kid]


# -- pure parts -------------------------------------------------------------------------

MKEY = ManifestKey(b"\x07" * 32)


def _record(tenant: str = "uni-a") -> tuple[tenant_key_record.TenantKey, bytes]:
    rec = str(x25519.Identity.generate().to_public())
    key = tenant_key_record.TenantKey(tenant, tenant_key_record.key_id_of(rec), rec)
    return key, tenant_key_record.encode_record(key, "2026-01-01T00:00:00Z", ["sha256:x"], MKEY)


def test_record_round_trip_and_refusals() -> None:
    key, raw = _record()
    assert tenant_key_record.parse_record(raw, MKEY, "uni-a", key.key_id).key == key
    with pytest.raises(IntegrityError, match="another manifest key"):
        tenant_key_record.parse_record(raw, ManifestKey(b"\x08" * 32), "uni-a", key.key_id)
    with pytest.raises(IntegrityError, match="another tenant or key"):
        tenant_key_record.parse_record(raw, MKEY, "uni-b", key.key_id)
    with pytest.raises(IntegrityError, match="another tenant or key"):
        tenant_key_record.parse_record(raw, MKEY, "uni-a", "0" * 16)
    # Signed, but the recipient is not the key id's: the key id is derived from it.
    doc = json.loads(raw)
    doc.pop("mac")
    doc["recipient"] = str(x25519.Identity.generate().to_public())
    with pytest.raises(IntegrityError, match="another tenant or key"):
        tenant_key_record.parse_record(json.dumps(manifest.signed(doc, MKEY)).encode(), MKEY,
                                 "uni-a", key.key_id)
    for junk in (b"", b"[]", b"{", b"\xff"):
        with pytest.raises(IntegrityError):
            tenant_key_record.parse_record(junk, MKEY, "uni-a", key.key_id)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["2026-01-01T00:00:00Z", "2026-01-01T00:00:01Z"]),
                          st.from_regex(r"[0-9a-f]{16}", fullmatch=True)),
                min_size=1, max_size=6, unique_by=lambda t: t[1]), st.randoms())
def test_choose_is_the_same_whatever_the_order(entries: list[tuple[str, str]],
                                               rnd: Any) -> None:
    records = [tenant_key_record.KeyRecord(tenant_key_record.TenantKey("t", kid, "age1x"),
                                           created, (), b"")
               for created, kid in entries]
    shuffled = list(records)
    rnd.shuffle(shuffled)
    chosen = tenant_key_record.choose(shuffled)
    assert chosen == tenant_key_record.choose(records)
    assert chosen is not None and chosen.created == max(c for c, _ in entries)


def test_identity_from_plaintext() -> None:
    ident = x25519.Identity.generate()
    assert str(tenant_key_record.identity_from(f"{ident}\n".encode())) == str(ident)
    for junk in (b"", b"hello", f"{ident}\n{ident}\n".encode(), b"\xff\xfe"):
        assert tenant_key_record.identity_from(junk) is None


def test_manifest_version_3_names_the_tenant_key() -> None:
    t = datetime(2026, 1, 1, tzinfo=UTC)
    m = manifest.Manifest(id="20260101T000000Z-00000000", source="s", tenant="uni-a",
                          tier="paid", kind="directory", consistency_time=t, started_at=t,
                          finished_at=t, data_name="sources/s/data/x", sha256="0" * 64, size=1,
                          compressed_size=1, plaintext_size=1, zstd_level=3,
                          recipients=("sha256:1",),
                          tenant_key=manifest.TenantKeyRef("uni-a", "0123456789abcdef"))
    assert m.version == 3
    assert manifest.parse(manifest.serialize(m, MKEY), MKEY) == m
    old = dataclasses.replace(m, tenant_key=None)
    assert manifest.parse(manifest.serialize(old, MKEY), MKEY).version == 1

    def forge(body: dict[str, Any]) -> bytes:
        return json.dumps(manifest.signed(body, MKEY)).encode()

    no_key = m.body()
    del no_key["data"]["encryption"]["tenant_key"]
    with pytest.raises(IntegrityError, match=r"needs encryption\.tenant_key"):
        manifest.parse(forge(no_key), MKEY)
    early = old.body()
    early["data"]["encryption"]["tenant_key"] = {"tenant": "uni-a", "key_id": "0" * 16}
    with pytest.raises(IntegrityError, match=r"cannot have encryption\.tenant_key"):
        manifest.parse(forge(early), MKEY)
    other = m.body()
    other["data"]["encryption"]["tenant_key"]["tenant"] = "uni-b"
    with pytest.raises(IntegrityError, match="another tenant"):
        manifest.parse(forge(other), MKEY)

