"""Database-level fidelity: encoding, locale, owner, settings, comment and privileges come
back on restore (to a new name and with --force), every server encoding backs up, drills
compare the properties and count as the backup did. Real PostgreSQL, real moto regions."""

from __future__ import annotations

import copy
import dataclasses
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import PgServer, S3Region
from psycopg import sql
from pyrage import x25519
from support import Setup, make_setup, postgres_source

from drdaemon import layout, manifest, tenant_keys
from drdaemon.keys import load_identities, load_manifest_key
from drdaemon.runtime import load_config, open_runtime
from drdaemon.sources import pg_database

OWNER = "lmsapp"
READER = "lms_reader"
OUTSIDER = "lms_outsider"  # a role without CONNECT
WORDS = ["Bär", "apfel", "ähnlich"]


def admin(pg: PgServer, *statements: sql.Composable | str) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        for stmt in statements:
            conn.execute(stmt)  # type: ignore[arg-type]


def ensure_role(pg: PgServer, name: str, extra: str = "") -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is None:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN " + extra).format(sql.Identifier(name)))


def properties(pg: PgServer, name: str) -> dict[str, Any]:
    """What the test compares, read with plain catalog queries (not drdaemon's), from
    inside the database: its comment is in its own encoding."""
    with psycopg.connect(pg.dsn(name), autocommit=True, client_encoding="UTF8") as conn:
        row = conn.execute(
            "SELECT pg_encoding_to_char(encoding), datcollate, datctype, datlocprovider, "
            "daticulocale, pg_get_userbyid(datdba), datconnlimit, "
            "shobj_description(oid, 'pg_database'), "
            "(SELECT array_agg(a::text ORDER BY a::text) FROM unnest(datacl) a), "
            "ARRAY(SELECT unnest(setconfig) FROM pg_db_role_setting "
            "      WHERE setdatabase = d.oid AND setrole = 0), "
            "ARRAY(SELECT r.rolname || ':' || unnest(setconfig) FROM pg_db_role_setting s "
            "      JOIN pg_roles r ON r.oid = s.setrole WHERE setdatabase = d.oid), "
            "has_database_privilege('public', oid, 'CONNECT') "
            "FROM pg_database d WHERE datname = %s", (name,)).fetchone()
    assert row is not None, f"no database {name}"
    keys = ("encoding", "collate", "ctype", "provider", "icu_locale", "owner", "connlimit",
            "comment", "acl", "settings", "role_settings", "public_connect")
    return dict(zip(keys, row, strict=True))


@pytest.fixture
def dbname(pg_server: PgServer) -> Iterator[str]:
    """A unique name; every database starting with it is dropped afterwards."""
    name = f"fid_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        for (db,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s",
                                  (name + "%",)).fetchall():
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))


def setup_for(tmp_path: Path, regions: list[S3Region], dsn: str) -> Setup:
    return make_setup(tmp_path, [r.toml() for r in regions], [postgres_source("db", dsn)])


def latin1_database(pg: PgServer, name: str) -> str:
    """A LATIN1/C database owned by lmsapp with every property the restore must keep."""
    ensure_role(pg, OWNER)
    ensure_role(pg, READER)
    ensure_role(pg, OUTSIDER)
    db = sql.Identifier(name)
    admin(pg,
          sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0 ENCODING 'LATIN1' "
                  "LC_COLLATE 'C' LC_CTYPE 'C' CONNECTION LIMIT 20").format(
              db, sql.Identifier(OWNER)),
          sql.SQL("ALTER DATABASE {} SET search_path TO app, \"$user\", public").format(db),
          sql.SQL("ALTER DATABASE {} SET work_mem TO '8MB'").format(db),
          sql.SQL("ALTER DATABASE {} SET app.jwt_secret TO 'JWT-s3cr3t'").format(db),
          sql.SQL("ALTER ROLE {} IN DATABASE {} SET statement_timeout TO '5min'").format(
              sql.Identifier(READER), db),
          sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC").format(db),
          sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(db, sql.Identifier(READER)))
    with psycopg.connect(pg.dsn(name), user=OWNER, autocommit=True) as conn:
        # Set from inside: PostgreSQL keeps it in the encoding of the database set from.
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS 'Kursdaten der Universität'").format(db))
        conn.execute('CREATE SCHEMA app; CREATE TABLE app."schüler" (name text)')
        conn.execute('INSERT INTO app."schüler" VALUES (%s), (%s), (%s)', WORDS)
    return pg.dsn(name)


def test_restore_keeps_database_properties_new_name_and_force(
        tmp_path: Path, pg_server: PgServer, s3_regions: list[S3Region], dbname: str) -> None:
    dsn = latin1_database(pg_server, dbname)
    before = properties(pg_server, dbname)
    assert before["encoding"] == "LATIN1" and before["public_connect"] is False
    setup = setup_for(tmp_path, s3_regions, dsn)
    [snap] = setup.drctl_json("backup")
    assert snap["ok"], snap
    shown = setup.drctl_json("snapshots", "show", snap["snapshot_id"])
    recorded = shown["facts"]["database"]
    assert recorded["owner"] == OWNER and recorded["encoding"] == "LATIN1"
    assert recorded["comment"] == "Kursdaten der Universität"
    # Settings may hold secrets: the manifest (plaintext in the buckets) names them only.
    assert recorded["setting_names"] == ["search_path", "work_mem", "app.jwt_secret"]
    assert recorded["role_setting_names"] == [[READER, "statement_timeout"]]
    for value in ("JWT-s3cr3t", "8MB", "5min"):
        assert value not in json.dumps(shown)

    # Over an existing database owned by someone else, and to a new name.
    admin(pg_server, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname + "_forced")))
    with psycopg.connect(pg_server.dsn(dbname + "_forced"), autocommit=True) as conn:
        conn.execute("CREATE TABLE old (x int)")
    for target, extra in ((dbname + "_new", ()),
                          (dbname + "_forced", ("--force", "--jobs", "2"))):
        out = setup.drctl_json("restore", "latest", "--source", "db", "--to", target, *extra)
        assert out["notes"] == [], out
        assert properties(pg_server, target) == before, target
        with psycopg.connect(pg_server.dsn(target), user=OWNER, autocommit=True) as conn:
            assert conn.execute("SHOW search_path").fetchone() == ('app, "$user", public',)
            assert conn.execute("SHOW app.jwt_secret").fetchone() == ("JWT-s3cr3t",)
            rows = [r[0] for r in conn.execute('SELECT name FROM "schüler" ORDER BY name')]
            assert rows == sorted(WORDS, key=lambda w: w.encode("latin-1"))
            # PostgreSQL 15: public belongs to the database owner, who can use it.
            conn.execute("CREATE TABLE public.mine (x int)")
        with pytest.raises(psycopg.OperationalError, match="permission denied"):
            psycopg.connect(pg_server.dsn(target), user=OUTSIDER).close()


def test_icu_collation_keeps_sort_order(tmp_path: Path, pg_server: PgServer,
                                        s3_regions: list[S3Region], dbname: str) -> None:
    admin(pg_server, sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8' "
                             "LOCALE_PROVIDER icu ICU_LOCALE 'de-CH' LC_COLLATE 'C.UTF-8' "
                             "LC_CTYPE 'C.UTF-8'").format(sql.Identifier(dbname)))
    dsn = pg_server.dsn(dbname)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE words (w text)")
        conn.execute("INSERT INTO words VALUES (%s), (%s), (%s)", WORDS)
        order = [r[0] for r in conn.execute("SELECT w FROM words ORDER BY w")]
    assert order == ["ähnlich", "apfel", "Bär"]
    setup = setup_for(tmp_path, s3_regions, dsn)
    setup.drctl_json("backup")
    target = dbname + "_icu"
    setup.drctl_json("restore", "latest", "--source", "db", "--to", target)
    assert properties(pg_server, target) == properties(pg_server, dbname)
    with psycopg.connect(pg_server.dsn(target)) as conn:
        assert [r[0] for r in conn.execute("SELECT w FROM words ORDER BY w")] == order


@pytest.mark.parametrize("encoding", ["SQL_ASCII", "LATIN1"])
def test_any_server_encoding_round_trips(tmp_path: Path, pg_server: PgServer,
                                         s3_regions: list[S3Region], dbname: str,
                                         encoding: str) -> None:
    admin(pg_server, sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING {} LC_COLLATE 'C' "
                             "LC_CTYPE 'C'").format(sql.Identifier(dbname),
                                                    sql.Literal(encoding)))
    # SQL_ASCII stores the client's bytes as they come: UTF-8 here.
    client = "UTF8" if encoding == "SQL_ASCII" else encoding
    dsn = pg_server.dsn(dbname)
    with psycopg.connect(dsn, autocommit=True, client_encoding=client) as conn:
        conn.execute('CREATE TABLE "prüfung" ("größe" text)')
        conn.execute('INSERT INTO "prüfung" SELECT %s || i FROM generate_series(1, 50) i',
                     ("Grüße ",))
        expected = conn.execute('SELECT * FROM "prüfung" ORDER BY 1').fetchall()
    setup = setup_for(tmp_path, s3_regions, dsn)
    [snap] = setup.drctl_json("backup")
    assert snap["ok"], snap
    shown = setup.drctl_json("snapshots", "show", snap["snapshot_id"])
    assert shown["facts"]["database"]["encoding"] == encoding
    assert sum(t["rows"] for t in shown["facts"]["tables"]) == 50
    target = dbname + "_back"
    setup.drctl_json("restore", "latest", "--source", "db", "--to", target)
    assert properties(pg_server, target)["encoding"] == encoding
    with psycopg.connect(pg_server.dsn(target), client_encoding=client) as conn:
        assert conn.execute('SELECT * FROM "prüfung" ORDER BY 1').fetchall() == expected
    code, out = run_drill(setup)
    assert code == 0 and out["ok"], out["drills"][0]["reasons"]
    assert setup.drctl_json("config", "check", "--connect")["privileges"][0]["ok"]


def test_missing_owner_stops_unless_skipped(tmp_path: Path, pg_server: PgServer,
                                            s3_regions: list[S3Region], dbname: str) -> None:
    doomed, gone_reader = f"owner_{dbname}", f"reader_{dbname}"
    ensure_role(pg_server, doomed)
    ensure_role(pg_server, gone_reader)
    ensure_role(pg_server, READER)
    db = sql.Identifier(dbname)
    admin(pg_server, sql.SQL("CREATE DATABASE {} OWNER {}").format(db, sql.Identifier(doomed)),
          sql.SQL("COMMENT ON DATABASE {} IS 'kept'").format(db),
          sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(db),
          sql.SQL("GRANT CONNECT ON DATABASE {} TO {}, {}").format(
              db, sql.Identifier(gone_reader), sql.Identifier(READER)))
    setup = setup_for(tmp_path, s3_regions, pg_server.dsn(dbname))
    setup.drctl_json("backup")
    admin(pg_server, sql.SQL("DROP DATABASE {}").format(db),
          sql.SQL("DROP ROLE {}").format(sql.Identifier(doomed)),
          sql.SQL("DROP ROLE {}").format(sql.Identifier(gone_reader)))

    result = setup.drctl("restore", "latest", "--source", "db", "--to", dbname)
    assert result.exit_code == 2, result.output + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert doomed in line and "owner" in line and "--skip-missing-roles" in line
    assert f"{gone_reader} (privileges)" in line
    with psycopg.connect(pg_server.dsn()) as conn:
        assert conn.execute("SELECT datname FROM pg_database WHERE datname = %s OR datname "
                            "LIKE 'drdaemon_restore_%%'", (dbname,)).fetchall() == []

    out = setup.drctl_json("restore", "latest", "--source", "db", "--to", dbname,
                           "--skip-missing-roles")
    assert any(doomed in n and "owner" in n for n in out["notes"]), out["notes"]
    got = properties(pg_server, dbname)
    assert got["owner"] == pg_server.user and got["comment"] == "kept"
    # The rest of the privileges hold: no PUBLIC connect, the reader that exists may.
    assert got["acl"] == ["lms_reader=c/postgres", "postgres=CTc/postgres"]


def test_missing_locale_stops_unless_skipped(tmp_path: Path, pg_server: PgServer,
                                             s3_regions: list[S3Region], dbname: str) -> None:
    admin(pg_server, sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'LATIN1' "
                             "LC_COLLATE 'C' LC_CTYPE 'C'").format(sql.Identifier(dbname)))
    setup = setup_for(tmp_path, s3_regions, pg_server.dsn(dbname))
    [snap] = setup.drctl_json("backup")
    # Taken on a server that has a locale this one lacks.
    forge(setup, s3_regions, snap["snapshot_id"],
          lambda f: f["database"].update(collate="de_CH.ISO-8859-1", ctype="de_CH.ISO-8859-1"))
    result = setup.drctl("restore", "latest", "--source", "db", "--to", dbname + "_x")
    assert result.exit_code == 2, result.output + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "de_CH.ISO-8859-1" in line and "--skip-missing-locale" in line
    out = setup.drctl_json("restore", "latest", "--source", "db", "--to", dbname + "_x",
                           "--skip-missing-locale")
    assert any("de_CH.ISO-8859-1" in n and "default" in n for n in out["notes"]), out["notes"]
    assert properties(pg_server, dbname + "_x")["collate"] == "C"


def test_old_manifest_restores_with_a_note(tmp_path: Path, pg_server: PgServer,
                                           s3_regions: list[S3Region], dbname: str) -> None:
    admin(pg_server, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    setup = setup_for(tmp_path, s3_regions, pg_server.dsn(dbname))
    [snap] = setup.drctl_json("backup")
    # What an earlier drdaemon recorded: the name only.
    forge(setup, s3_regions, snap["snapshot_id"], lambda f: f.update(database=dbname))
    out = setup.drctl_json("restore", "latest", "--source", "db", "--to", dbname + "_old")
    assert any("records no database properties" in n for n in out["notes"]), out


# -- drills ---------------------------------------------------------------------


def forge(setup: Setup, regions: list[S3Region], snapshot_id: str, change: Any) -> None:
    """Rewrite the facts of a snapshot's manifest in every region (re-authenticated)."""
    key = load_manifest_key(setup.manifest_key)
    name = layout.manifest_object_name("db", snapshot_id)
    for region in regions:
        client = region.client()
        m = manifest.parse(client.get_object(Bucket=region.bucket, Key=name)["Body"].read(), key)
        facts = copy.deepcopy(m.facts)
        change(facts)
        client.put_object(Bucket=region.bucket, Key=name,
                          Body=manifest.serialize(dataclasses.replace(m, facts=facts), key))


def run_drill(setup: Setup, *args: str) -> tuple[int, dict[str, Any]]:
    result = setup.drctl("drill", "run", *args, "--json")
    return result.exit_code, json.loads(result.stdout)


def drill_role_dsn(pg: PgServer, role: str) -> str:
    return f"host={pg.host} port={pg.port} user={role} dbname=postgres"


def test_drill_compares_properties_and_skips_absent_roles(
        tmp_path: Path, pg_server: PgServer, s3_regions: list[S3Region], dbname: str) -> None:
    dsn = latin1_database(pg_server, dbname)
    # A non-superuser drill role: it may not act as lmsapp, so the owner is skipped.
    drill_role = f"drill_{dbname}"
    ensure_role(pg_server, drill_role, "CREATEDB BYPASSRLS")
    extra = f'[drills]\npostgres_dsn = "{drill_role_dsn(pg_server, drill_role)}"\n'
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions], [postgres_source("db", dsn)],
                       extra=extra)
    [snap] = setup.drctl_json("backup")
    code, out = run_drill(setup)
    [r] = out["drills"]
    assert code == 0 and r["ok"], r["reasons"]
    evidence = r["evidence"]["database"]
    assert {"encoding", "collate", "comment", "setting search_path",
            f"privileges of {READER} granted by <owner>"} <= set(evidence["compared"])
    assert "owner" in evidence["skipped"] and "owner" not in evidence["compared"]

    # A property the drill server cannot recreate is a difference, not a pass. The settings
    # are sealed to the tenant's key (tenant_keys.py).
    rt = open_runtime(load_config(str(setup.config)))
    [key] = [r.key for r in tenant_keys.survey(rt, "uni-a").records.values()]
    tenant = tenant_keys.unwrap(rt, "uni-a", key.key_id, load_identities(setup.identity))

    def add_setting(facts: dict[str, Any]) -> None:
        db = pg_database.unseal(facts["database"], [tenant])
        db["settings"].append("statement_timeout=forever")
        facts["database"] = pg_database.seal(db, [x25519.Recipient.from_str(key.recipient)])

    forge(setup, s3_regions, snap["snapshot_id"], add_setting)
    code, out = run_drill(setup)
    [r] = out["drills"]
    assert code == 1 and not r["verified"]
    assert r["reason_codes"] == ["property-mismatch"], r["reasons"]
    assert "statement_timeout=forever" in r["reasons"][0]


def test_drill_counts_with_row_security_off(tmp_path: Path, pg_server: PgServer,
                                            s3_regions: list[S3Region], dbname: str) -> None:
    admin(pg_server, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    dsn = pg_server.dsn(dbname)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE marks (tenant int, mark int)")
        conn.execute("INSERT INTO marks SELECT i % 3, i FROM generate_series(1, 3000) i")
        conn.execute("ALTER TABLE marks ENABLE ROW LEVEL SECURITY")
        conn.execute("ALTER TABLE marks FORCE ROW LEVEL SECURITY")
        conn.execute("CREATE POLICY visible ON marks USING (tenant <> 0)")
    role = f"drill_{dbname}"
    ensure_role(pg_server, role, "CREATEDB")  # no BYPASSRLS
    extra = f'[drills]\npostgres_dsn = "{drill_role_dsn(pg_server, role)}"\n'
    setup = make_setup(tmp_path, [r.toml() for r in s3_regions], [postgres_source("db", dsn)],
                       extra=extra)
    setup.drctl_json("backup")
    code, out = run_drill(setup)
    [r] = out["drills"]
    assert code == 1 and r["reason_codes"] == ["restore-failed"], r["reasons"]
    assert "row-level security" in r["reasons"][0] and "BYPASSRLS" in r["reasons"][0]
    admin(pg_server, sql.SQL("ALTER ROLE {} BYPASSRLS").format(sql.Identifier(role)))
    code, out = run_drill(setup)
    assert code == 0 and out["ok"], out["drills"][0]["reasons"]


# -- least privileges -------------------------------------------------------------


def test_config_check_connect_names_what_roles_lack(tmp_path: Path, pg_server: PgServer,
                                                    s3_regions: list[S3Region],
                                                    dbname: str) -> None:
    admin(pg_server, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)),
          sql.SQL("ALTER DATABASE {} SET work_mem TO '8MB'").format(sql.Identifier(dbname)),
          sql.SQL("COMMENT ON DATABASE {} IS 'c'").format(sql.Identifier(dbname)))
    dsn = pg_server.dsn(dbname)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE marks (tenant int); ALTER TABLE marks ENABLE ROW LEVEL "
                     "SECURITY; CREATE TABLE hidden (x int); SELECT lo_from_bytea(0, 'x')")
    role = f"bk_{dbname}"
    ensure_role(pg_server, role)
    admin(pg_server, sql.SQL("GRANT pg_read_all_data TO {}").format(sql.Identifier(role)))
    limited = f"host={pg_server.host} port={pg_server.port} user={role} dbname={dbname}"
    setup = setup_for(tmp_path, s3_regions, limited)
    result = setup.drctl("config", "check", "--connect", "--json")
    assert result.exit_code == 1, result.output + result.stderr
    [check] = json.loads(result.stdout)["privileges"]
    assert not check["ok"] and check["error"] is None
    assert [m.split(" ")[0] for m in check["backup"]] == ["BYPASSRLS:", "SELECT"]
    assert "public.marks" in check["backup"][0] and "1 large object" in check["backup"][1]
    assert check["restore"][0].startswith("CREATEDB") and "membership in postgres" in \
        check["restore"][1]
    assert [m.split(":")[0] for m in check["drill"]] == ["CREATEDB", "BYPASSRLS"]
    text = setup.drctl("config", "check", "--connect")
    assert "db (postgres://" in text.stdout and "backup role lacks BYPASSRLS" in text.stdout

    # What docs/postgres-roles.md prescribes for backups is enough, and checked as such.
    admin(pg_server, sql.SQL("ALTER ROLE {} BYPASSRLS").format(sql.Identifier(role)))
    with psycopg.connect(dsn, autocommit=True) as conn:
        for (oid,) in conn.execute("SELECT oid FROM pg_largeobject_metadata").fetchall():
            conn.execute(sql.SQL("GRANT SELECT ON LARGE OBJECT {} TO {}").format(
                sql.Literal(oid), sql.Identifier(role)))
    result = setup.drctl("config", "check", "--connect", "--json")
    [check] = json.loads(result.stdout)["privileges"]
    assert check["backup"] == [] and check["restore"], check
    [snap] = setup.drctl_json("backup")
    assert snap["ok"], snap

    # A superuser lacks nothing; no --connect, no connection.
    setup = setup_for(tmp_path / "su", s3_regions, dsn)
    assert setup.drctl_json("config", "check", "--connect")["privileges"][0]["ok"]
    assert "privileges" not in setup.drctl_json("config", "check")


def test_restoring_role_that_may_not_set_the_owner_stops(
        tmp_path: Path, pg_server: PgServer, s3_regions: list[S3Region], dbname: str) -> None:
    restorer = f"rs_{dbname}"
    ensure_role(pg_server, OWNER)
    ensure_role(pg_server, restorer, "CREATEDB")
    db = sql.Identifier(dbname)
    admin(pg_server, sql.SQL("CREATE DATABASE {} OWNER {}").format(db, sql.Identifier(OWNER)),
          sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(db, sql.Identifier(restorer)))
    with psycopg.connect(pg_server.dsn(dbname), user=restorer, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA mine; CREATE TABLE mine.t (x int)")
    setup = setup_for(tmp_path, s3_regions, pg_server.dsn(dbname))
    setup.drctl_json("backup")
    target = f"host={pg_server.host} port={pg_server.port} user={restorer} dbname={dbname}_r"
    result = setup.drctl("restore", "latest", "--source", "db", "--to", target)
    assert result.exit_code == 2, result.output + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert f"may not recreate the database's owner {OWNER}" in line
    with psycopg.connect(pg_server.dsn()) as conn:
        assert conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s OR datname "
                            "LIKE 'drdaemon_restore_%%'", (dbname + "_r",)).fetchall() == []
