"""A database's roles travel with its snapshot: sealed, never plaintext in a region;
`drctl restore --with-roles` onto a fresh server creates the missing ones (same password
hash, memberships, owners); without it the missing role stops the restore; a drill on a
server without the roles creates them, restores with owners, says so and drops them.
Real PostgreSQL servers (the session's and a fresh one), local regions."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import psycopg
from conftest import PgServer, pg_cluster
from lms import populate
from psycopg import sql
from support import local_region, make_setup, postgres_source

from drdaemon.sources import pg_role_copy


def roles_of(dsn: str, names: list[str]) -> dict[str, tuple[str | None, bool]]:
    """name -> (password hash, can log in) of the roles that exist."""
    with psycopg.connect(dsn) as conn:
        return {r[0]: (r[1], r[2]) for r in conn.execute(
            "SELECT rolname::text, rolpassword, rolcanlogin FROM pg_authid "
            "WHERE rolname = ANY(%s)", (names,))}


def members_of(dsn: str, role: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        return {r[0] for r in conn.execute(
            "SELECT pg_get_userbyid(member)::text FROM pg_auth_members "
            "WHERE roleid = (SELECT oid FROM pg_roles WHERE rolname = %s)", (role,))}


def owners(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute(
            "SELECT relname::text, pg_get_userbyid(relowner)::text FROM pg_class "
            "WHERE relname IN ('users', 'courses', 'enrolments')").fetchall())


def test_roles_travel_sealed_and_with_roles_recreates_them(
        tmp_path: Path, pg_server: PgServer, pg_database: str) -> None:
    tag = uuid.uuid4().hex[:8]
    owner, reader, odd, other = (f"app_owner_{tag}", f"app_reader_{tag}",
                                 f'Odd Role; x"y {tag}', f"other_tenant_{tag}")
    ident = sql.Identifier
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'owner-secret'").format(
            ident(owner)))
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident(reader)))
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(ident(odd)))
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'x'").format(ident(other)))
        conn.execute(sql.SQL("GRANT {} TO {}").format(ident(owner), ident(reader)))
    populate(pg_database)
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER TABLE users OWNER TO {}").format(ident(owner)))
        conn.execute(sql.SQL("ALTER TABLE courses OWNER TO {}").format(ident(odd)))
        conn.execute(sql.SQL("GRANT SELECT ON enrolments TO {}").format(ident(reader)))
    want = roles_of(pg_database, [owner, reader, odd])
    assert want[owner][0] and want[owner][0].startswith("SCRAM-SHA-256$")

    regions = tmp_path / "regions"
    setup = make_setup(tmp_path, [local_region("eu", regions / "eu", "europe"),
                                  local_region("us", regions / "us", "north-america")],
                       [postgres_source("lms", pg_database)])
    [snap] = setup.drctl_json("backup")
    assert snap["ok"], snap
    # Sealed: no password hash and no role name of the roles object in any region.
    stored = b"".join(p.read_bytes() for p in regions.rglob("*") if p.is_file())
    assert want[owner][0].encode() not in stored and b"SCRAM-SHA-256" not in stored
    assert b"Odd Role" not in stored
    facts = setup.drctl_json("snapshots", "show", snap["snapshot_id"], "--source", "lms")
    # owner, odd, the database's owner (postgres) and reader (a member of owner).
    assert facts["facts"]["roles"] == {"count": 4, "passwords": True}

    with pg_cluster() as fresh:
        all_roles = [owner, reader, odd, other]
        # A drill on a server without the roles: created for it (NOLOGIN, no password),
        # restored with owners, and dropped afterwards.
        drill = make_setup(tmp_path / "drill", [local_region("eu", regions / "eu", "europe"),
                                                local_region("us", regions / "us",
                                                             "north-america")],
                           [postgres_source("lms", pg_database)],
                           extra=f'[drills]\npostgres_dsn = "{fresh.dsn()}"\n')
        drill.identity.write_bytes(setup.identity.read_bytes())
        drill.manifest_key.write_bytes(setup.manifest_key.read_bytes())
        result = drill.drctl("drill", "run", "--json")
        [d] = json.loads(result.stdout)["drills"]
        assert result.exit_code == 0 and d["ok"], d["reasons"]
        assert d["evidence"]["owners"]["mode"] == "owners"
        assert sorted(d["evidence"]["owners"]["created_roles"]) == sorted([owner, odd, reader])
        assert any("restored with owners" in n for n in d["notes"]), d["notes"]
        assert roles_of(fresh.dsn(), all_roles) == {}
        report = drill.drctl("drill", "report", "--format", "md").stdout
        assert "restored with owners" in report, report

        # Without --with-roles: the missing role stops the restore, as before.
        target = fresh.dsn("restored")
        plain = setup.drctl("restore", "latest", "--source", "lms", "--to", target)
        assert plain.exit_code != 0 and "does not exist" in plain.stderr, plain.stderr

        # The reader exists on the target already (without LOGIN): left alone, named.
        with psycopg.connect(fresh.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(ident(reader)))
        done = setup.drctl_json("restore", "latest", "--source", "lms", "--to", target,
                                "--with-roles")
        notes = " | ".join(done["notes"])
        assert f"created roles: {odd}, {owner}" in notes, notes
        assert f"left alone: {reader}, postgres" in notes and f"{reader} in {owner}" in notes, notes
        got = roles_of(fresh.dsn(), all_roles)
        assert got == {owner: want[owner], odd: want[odd], reader: (None, False)}
        assert members_of(fresh.dsn(), owner) == {reader}
        assert owners(target) == {"users": owner, "courses": odd, "enrolments": "postgres"}
        with psycopg.connect(target) as conn:
            row = conn.execute("SELECT has_table_privilege(%s, 'enrolments', 'SELECT')",
                               (reader,)).fetchone()
        assert row == (True,)
        audit = (setup.state / "audit" / "audit.jsonl").read_text()
        assert f"created roles: {odd}, {owner}" in audit.replace('\\"', '"')

    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(
            ident(psycopg.conninfo.conninfo_to_dict(pg_database)["dbname"])))
        for role in all_roles:
            conn.execute(sql.SQL("DROP ROLE {}").format(ident(role)))


def test_a_backup_role_that_cannot_read_passwords_carries_the_roles_without(
        pg_database: str) -> None:
    tag = uuid.uuid4().hex[:8]
    backup_role, owner = f"bk_{tag}", f"owner_{tag}"
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'pw'").format(sql.Identifier(owner)))
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(backup_role)))
        conn.execute(sql.SQL("CREATE TABLE t (n int)"))
        conn.execute(sql.SQL("ALTER TABLE t OWNER TO {}").format(sql.Identifier(owner)))
    dsn = psycopg.conninfo.make_conninfo(pg_database, user=backup_role)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            got = pg_role_copy.capture(conn, dsn, conn.info.dbname)
        assert got["passwords"] is False and owner in got["needed"]
        assert f"CREATE ROLE {owner};" in got["sql"] and "PASSWORD" not in got["sql"]
    finally:
        with psycopg.connect(pg_database, autocommit=True) as conn:
            conn.execute("DROP TABLE t")
            for role in (owner, backup_role):
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
