"""The facts object (manifest version 2, issue 19): per-table row counts beside the data
object, authenticated through the manifest. Pure encoding and parsing first (golden cases
and properties), then the writer's refusal, then a real PostgreSQL snapshot through
verify, repair, restore and drill, and a version-1 manifest (counts inline) still read."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import hmac
import json
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import PgServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lms import populate
from old_format import downgrade
from psycopg import sql
from support import Setup, local_region, make_setup, postgres_source

from drdaemon import backup, facts, orphans, prune
from drdaemon import config as config_mod
from drdaemon.errors import IntegrityError
from drdaemon.keys import ManifestKey, load_manifest_key
from drdaemon.layout import data_object_name, facts_object_name, manifest_object_name
from drdaemon.manifest import FactsRef, Manifest, parse, serialize
from drdaemon.pipeline import Stored
from drdaemon.runtime import open_runtime
from drdaemon.sources import postgres
from drdaemon.tenant_keys import TenantKey, key_id_of

KEY = ManifestKey(secrets.token_bytes(32))
SNAP_ID = "20261129T020000Z-0a1b2c3d"
T = datetime(2026, 11, 29, 2, 0, tzinfo=UTC)
TABLES = [{"schema": "public", "table": f"t{i:05d}", "rows": i % 7} for i in range(300)]


def pg_manifest(**changes: Any) -> Manifest:
    m = Manifest(id=SNAP_ID, source="many", tenant="uni-a", tier="paid", kind="postgres",
                 consistency_time=T, started_at=T, finished_at=T,
                 data_name=data_object_name("many", SNAP_ID, "postgres"), sha256="ab" * 32,
                 size=10, compressed_size=9, plaintext_size=8, zstd_level=3,
                 recipients=("sha256:00112233445566aa",), facts={}, drdaemon_version="0.1.0")
    return dataclasses.replace(m, **changes)


def with_facts(tables: list[dict[str, Any]] = TABLES) -> tuple[Manifest, facts.Encoded]:
    inline, detached = facts.split("postgres", {"database": "lms", "database_size": 9000,
                                                "server_version": "15.8", "tables": tables})
    assert detached is not None
    enc = facts.encode("many", SNAP_ID, detached)
    return pg_manifest(facts=inline, facts_object=enc.ref), enc


# -- pure: split, encode, decode ---------------------------------------------------


def test_split_moves_only_the_tables_and_leaves_summaries() -> None:
    inline, detached = facts.split("postgres", {"database": "lms", "database_size": 9000,
                                                "server_version": "15.8", "tables": TABLES,
                                                "future": {"encoding": "UTF8"}})
    assert detached == {"tables": TABLES}
    assert inline == {"database": "lms", "database_size": 9000, "server_version": "15.8",
                      "future": {"encoding": "UTF8"}, "table_count": 300,
                      "row_total": sum(t["rows"] for t in TABLES)}
    tree = {"files": 3, "digest": "sha256:00", "skipped_special_files": []}
    assert facts.split("directory", tree) == (tree, None)


def test_manifest_version_2_round_trips_and_names_its_facts_object() -> None:
    m, enc = with_facts()
    raw = serialize(m, KEY)
    doc = json.loads(raw)
    assert doc["version"] == 2 and "tables" not in doc["facts"]
    assert doc["facts_object"] == {"name": "sources/many/facts/20261129T020000Z-0a1b2c3d.json.zst",
                                   "sha256": hashlib.sha256(enc.blob).hexdigest(),
                                   "size": len(enc.blob), "plaintext_size": enc.ref.plaintext_size,
                                   "compression": "zstd"}
    assert parse(raw, KEY) == m
    assert m.object_names() == (m.data_name, enc.ref.name)
    assert facts.decode(enc.blob, m) == {"tables": TABLES}
    # Version 1 (no facts object) is still written for directories and read as before.
    v1 = pg_manifest(facts={"tables": TABLES})
    assert json.loads(serialize(v1, KEY))["version"] == 1 and parse(serialize(v1, KEY), KEY) == v1


def _resigned(doc: dict[str, Any]) -> bytes:
    body = {k: v for k, v in doc.items() if k != "mac"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    mac = hmac.new(KEY.secret, canonical.encode(), hashlib.sha256).hexdigest()
    return json.dumps(dict(body, mac={"algorithm": "hmac-sha256", "key_id": KEY.key_id,
                                      "value": mac})).encode()


@pytest.mark.parametrize("change", [
    lambda d: d.pop("facts_object"),  # version 2 without its object
    lambda d: d.update(version=1),  # version 1 with one
    lambda d: d.update(version=3),
    lambda d: d["facts_object"].update(sha256="AB" * 32),
    lambda d: d["facts_object"].update(size=-1),
    lambda d: d["facts_object"].update(compression="gzip"),
    lambda d: d["facts_object"].pop("plaintext_size"),
    lambda d: d.update(facts_object=[1]),
], ids=["v2-no-object", "v1-with-object", "v3", "sha-upper", "size-negative", "gzip",
        "no-plaintext-size", "object-list"])
def test_validly_signed_but_malformed_facts_references_are_refused(change: Any) -> None:
    doc = json.loads(serialize(with_facts()[0], KEY))
    change(doc)
    with pytest.raises(IntegrityError):
        parse(_resigned(doc), KEY)


def test_decode_refuses_anything_but_its_own_object() -> None:
    m, enc = with_facts()
    flipped = bytearray(enc.blob)
    flipped[len(flipped) // 2] ^= 1
    with pytest.raises(IntegrityError, match="does not match its manifest"):
        facts.decode(bytes(flipped), m)
    with pytest.raises(IntegrityError, match="does not match its manifest"):
        facts.decode(enc.blob + b"\0", m)
    # Another snapshot's object, even with a reference that matches its bytes.
    other = facts.encode("many", "20261130T020000Z-0a1b2c3d", {"tables": TABLES})
    with pytest.raises(IntegrityError, match="another snapshot"):
        facts.decode(other.blob, dataclasses.replace(
            m, facts_object=dataclasses.replace(other.ref, name=enc.ref.name)))
    with pytest.raises(IntegrityError, match="names facts object"):
        facts.decode(enc.blob, dataclasses.replace(
            m, facts_object=dataclasses.replace(enc.ref, name="sources/many/data/x")))
    # A plaintext size that understates what the frame holds: decompression stops there.
    small = dataclasses.replace(enc.ref, plaintext_size=10)
    with pytest.raises(IntegrityError, match="decompresses to more than the 10 bytes"):
        facts.decode(enc.blob, dataclasses.replace(m, facts_object=small))
    large = dataclasses.replace(enc.ref, plaintext_size=enc.ref.plaintext_size + 1)
    with pytest.raises(IntegrityError, match="decompressed to"):
        facts.decode(enc.blob, dataclasses.replace(m, facts_object=large))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000), st.integers(min_value=0, max_value=10_000))
def test_untrusted_bytes_fail_only_with_integrity_error(raw: bytes, plain: int) -> None:
    ref = FactsRef(facts_object_name("many", SNAP_ID), hashlib.sha256(raw).hexdigest(),
                   len(raw), plain)
    with contextlib.suppress(IntegrityError):  # anything else fails the test
        facts.decode(raw, pg_manifest(facts_object=ref))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.fixed_dictionaries({"schema": st.text(max_size=20),
                                       "table": st.text(max_size=63),
                                       "rows": st.integers(min_value=0, max_value=2**62)}),
                max_size=50))
def test_any_tables_round_trip(tables: list[dict[str, Any]]) -> None:
    m, enc = with_facts(tables)
    assert facts.decode(enc.blob, parse(serialize(m, KEY), KEY)) == {"tables": tables}
    assert m.facts["table_count"] == len(tables)


def test_orphan_clean_up_knows_facts_objects() -> None:
    name = facts_object_name("many", SNAP_ID)
    assert orphans.data_snapshot_id("many", name) == SNAP_ID
    for foreign in (name + ".part", f"sources/many/facts/{SNAP_ID}.json",
                    f"sources/other/facts/{SNAP_ID}.json.zst",
                    f"sources/many/data/{SNAP_ID}.json.zst"):
        assert orphans.data_snapshot_id("many", foreign) is None, foreign


# -- the writer refuses what no reader would accept ----------------------------------


def test_the_writer_refuses_a_manifest_no_reader_accepts_before_any_commit(
        tmp_path: Path) -> None:
    setup = make_setup(tmp_path, regions(tmp_path),
                       [postgres_source("many", "host=127.0.0.1 port=1 dbname=x")])
    rt = open_runtime(config_mod.load(setup.config))
    src = rt.config.sources[0]
    stored = Stored(sha256="ab" * 32, size=10, compressed_size=9, plaintext_size=8)
    tenant_key = TenantKey("uni-a", key_id_of(setup.recipient), setup.recipient)

    def draft(found: dict[str, Any]) -> tuple[Manifest, facts.Encoded | None]:
        return backup._draft_manifest(rt, src, SNAP_ID, T, data_object_name("many", SNAP_ID,
                                      "postgres"), T, stored, found, tenant_key)

    # 100,000 tables: a small manifest, the counts in the facts object.
    many = [{"schema": f"inst_{i // 100:04d}", "table": f"course_enrolments_{i:06d}",
             "rows": i} for i in range(100_000)]
    m, enc = draft({"database": "x", "database_size": 1, "tables": many})
    assert enc is not None and len(serialize(m, rt.manifest_key)) < 4096
    assert facts.decode(enc.blob, m)["tables"] == many
    assert enc.ref.size < facts.MAX_FACTS_BYTES // 16
    # Facts that would make the manifest too large for any reader fail the snapshot.
    with pytest.raises(facts.FactsTooLarge, match="readers accept at most 1048576"):
        draft({"database": "x", "note": "x" * (1 << 20), "tables": []})
    with pytest.raises(facts.FactsTooLarge):
        facts.check_storable(b" " * (1 << 20 | 1))


# -- a real snapshot: verify, repair, restore, drill; and version 1 still read ---------


@pytest.fixture
def lms(pg_database: str) -> str:
    populate(pg_database)
    return pg_database


def regions(tmp_path: Path) -> list[str]:
    return [local_region("eu", tmp_path / "eu", "europe"),
            local_region("us", tmp_path / "us", "north-america")]


def drctl_ok(setup: Setup, *args: str, code: int = 0) -> Any:
    result = setup.drctl(*args, "--json")
    assert result.exit_code == code, result.output + result.stderr
    return json.loads(result.stdout)


def restore_counts(setup: Setup, pg_server: PgServer) -> list[dict[str, Any]]:
    name = f"restored_{uuid.uuid4().hex[:8]}"
    drctl_ok(setup, "restore", "latest", "--source", "lms", "--to", name)
    try:
        return postgres.table_counts(pg_server.dsn(name))
    finally:
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def test_the_facts_object_is_verified_repaired_and_drilled(tmp_path: Path, lms: str,
                                                           pg_server: PgServer) -> None:
    setup = make_setup(tmp_path, regions(tmp_path), [postgres_source("lms", lms)])
    [snap] = drctl_ok(setup, "backup")
    name = facts_object_name("lms", snap["snapshot_id"])
    us = tmp_path / "us" / name
    assert (tmp_path / "eu" / name).is_file() and us.is_file()

    us.unlink()
    report = drctl_ok(setup, "verify", code=1)
    [bad] = [c for c in report["copies"] if not c["ok"]]
    assert bad["region"] == "us" and bad["status"] == "corrupt"
    assert "facts object is missing" in bad["reason"]
    drctl_ok(setup, "replicate", "--repair")
    assert us.is_file()
    assert drctl_ok(setup, "verify")["ok"]

    shown = drctl_ok(setup, "snapshots", "show", snap["snapshot_id"])
    assert shown["version"] == 3 and shown["facts_object"]
    assert len(shown["facts"]["tables"]) == 5
    assert restore_counts(setup, pg_server) == postgres.table_counts(lms)
    [record] = drctl_ok(setup, "drill", "run")["drills"]
    assert record["verified"] and record["evidence"]["tables"] == 5


def test_a_version_1_manifest_with_inline_tables_still_restores_and_drills(
        tmp_path: Path, lms: str, pg_server: PgServer) -> None:
    setup = make_setup(tmp_path, regions(tmp_path), [postgres_source("lms", lms)])
    [snap] = drctl_ok(setup, "backup")
    snap_id = snap["snapshot_id"]
    downgrade(setup, "lms", snap_id)  # as written before tenant keys (version 2), then to 1
    key = load_manifest_key(setup.manifest_key)
    for region in ("eu", "us"):
        root = tmp_path / region
        m = parse((root / manifest_object_name("lms", snap_id)).read_bytes(), key)
        assert m.facts_object is not None
        detached = facts.decode((root / m.facts_object.name).read_bytes(), m)
        old = {k: v for k, v in m.facts.items() if k not in ("table_count", "row_total")}
        v1 = dataclasses.replace(m, facts={**old, **copy.deepcopy(detached)}, facts_object=None)
        (root / manifest_object_name("lms", snap_id)).write_bytes(serialize(v1, key))
        (root / m.facts_object.name).unlink()
    shown = drctl_ok(setup, "snapshots", "show", snap_id)
    assert shown["version"] == 1 and len(shown["facts"]["tables"]) == 5
    assert drctl_ok(setup, "verify")["ok"]
    assert restore_counts(setup, pg_server) == postgres.table_counts(lms)
    [record] = drctl_ok(setup, "drill", "run")["drills"]
    assert record["verified"] and record["snapshot_id"] == snap_id, record["reasons"]
    assert record["evidence"]["tables"] == 5


class _Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def test_prune_trashes_the_manifest_first_and_purges_the_facts_object_with_the_data(
        tmp_path: Path, lms: str) -> None:
    source = postgres_source("lms", lms) + (
        "[sources.retention]\ndaily = 1\nweekly = 0\nmonthly = 0\n")
    setup = make_setup(tmp_path, regions(tmp_path), [source])
    # Prune judges min_age by when the objects were written (real time), so the
    # test's clock runs ahead of the real one rather than at a fixed date.
    t0 = (datetime.now(UTC) + timedelta(days=2)).replace(hour=2, minute=0, second=0,
                                                         microsecond=0)
    clock = _Clock(t0)
    rt = open_runtime(config_mod.load(setup.config), clock=clock)
    ids = []
    for day in range(2):
        clock.now = t0 + timedelta(days=day)
        result = backup.snapshot(rt, rt.config.sources[0])
        assert result.ok and result.snapshot_id is not None, result.error
        ids.append(result.snapshot_id)
    old, new = ids

    def names(region: str) -> set[str]:
        root = tmp_path / region
        return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}

    clock.now = t0 + timedelta(days=1, hours=2)
    assert prune.run_prune(rt).ok
    for region in ("eu", "us"):
        held = names(region)
        # The manifest went first (to the trash); data and facts objects wait for the purge.
        assert manifest_object_name("lms", old) not in held
        assert {data_object_name("lms", old, "postgres"), facts_object_name("lms", old)} <= held
    clock.now += timedelta(days=7)
    report = prune.run_prune(rt)
    assert report.ok
    for region in ("eu", "us"):
        held = names(region)
        assert not {data_object_name("lms", old, "postgres"), facts_object_name("lms", old)} & held
        assert not [n for n in held if "/trash/" in n]
        assert {manifest_object_name("lms", new), data_object_name("lms", new, "postgres"),
                facts_object_name("lms", new)} <= held
    details = [c.detail for c in report.changes if c.action == "purge"]
    assert len(details) == 2 and all(facts_object_name("lms", old) in d for d in details)
