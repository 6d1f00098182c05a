"""pg_globals (pure): reading pg_dumpall's roles, narrowing them to a database's, and
what `--with-roles` creates on a target. Golden examples from a real PostgreSQL 15
pg_dumpall, and property tests."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from drdaemon.sources.pg_globals import Globals, Membership, keep, parse, plan, quote, render

# Lines shortened (fewer role attributes) to fit; the statements are pg_dumpall's.
DUMPALL = r"""--
-- PostgreSQL database cluster dump
--

\restrict oPW2dP3no0lUWYw0WGzKAbx6IAgbTzRBO225XvwDViOeqe1hfs9tdKdmBC4V9UX

SET default_transaction_read_only = off;

SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;

--
-- Roles
--

CREATE ROLE "Odd Role; x""y";
ALTER ROLE "Odd Role; x""y" WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB NOLOGIN;
CREATE ROLE app_owner;
ALTER ROLE app_owner WITH NOSUPERUSER INHERIT LOGIN PASSWORD 'SCRAM-SHA-256$4096:N0Lx==$vrC9=:c6H=';
COMMENT ON ROLE app_owner IS 'it''s; -- not a comment
multiline';
CREATE ROLE app_reader;
ALTER ROLE app_reader WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB LOGIN NOREPLICATION;
CREATE ROLE other_tenant;
ALTER ROLE other_tenant WITH LOGIN PASSWORD 'SCRAM-SHA-256$4096:other';
CREATE ROLE postgres;
ALTER ROLE postgres WITH SUPERUSER INHERIT CREATEROLE CREATEDB LOGIN REPLICATION BYPASSRLS;

--
-- User Configurations
--

--
-- User Config "app_owner"
--

ALTER ROLE app_owner SET work_mem TO '8MB';
ALTER ROLE app_owner IN DATABASE lms SET search_path TO 'x';

--
-- Role memberships
--

GRANT app_owner TO "Odd Role; x""y" WITH ADMIN OPTION GRANTED BY postgres;
GRANT app_owner TO app_reader GRANTED BY postgres;
GRANT pg_read_all_data TO app_reader GRANTED BY postgres;

\unrestrict oPW2dP3no0lUWYw0WGzKAbx6IAgbTzRBO225XvwDViOeqe1hfs9tdKdmBC4V9UX

--
-- PostgreSQL database cluster dump complete
--
"""
ODD = 'Odd Role; x"y'


def test_pg_dumpall_roles_are_read_per_role_with_their_memberships() -> None:
    g = parse(DUMPALL)
    assert list(g.roles) == [ODD, "app_owner", "app_reader", "other_tenant", "postgres"]
    assert g.roles["app_owner"][1].endswith("PASSWORD 'SCRAM-SHA-256$4096:N0Lx==$vrC9=:c6H=';")
    assert g.roles["app_owner"][2] == "COMMENT ON ROLE app_owner IS 'it''s; -- not a comment\n" \
                                      "multiline';"
    # Per-database settings are recreated with the database, not here.
    assert g.roles["app_owner"][3] == "ALTER ROLE app_owner SET work_mem TO '8MB';"
    assert len(g.roles["app_owner"]) == 4
    assert g.memberships == [Membership("app_owner", ODD, True),
                             Membership("app_owner", "app_reader"),
                             Membership("pg_read_all_data", "app_reader")]


def test_a_database_keeps_the_roles_it_names_and_their_members_only() -> None:
    kept = keep(parse(DUMPALL), ["app_owner", "no_such_role"])
    assert set(kept.roles) == {"app_owner", ODD, "app_reader"}  # never other_tenant's
    assert Membership("pg_read_all_data", "app_reader") in kept.memberships
    assert "other_tenant" not in render(kept) and "SCRAM-SHA-256$4096:other" not in render(kept)
    assert parse(render(kept)) == kept  # what is stored reads back the same


def test_with_roles_creates_the_missing_and_leaves_the_existing_alone() -> None:
    kept = keep(parse(DUMPALL), ["app_owner"])
    p = plan(kept, ["postgres", "app_reader", "pg_read_all_data"])
    assert p.create == [ODD, "app_owner"] and p.existing == ["app_reader"]
    # app_reader exists: its membership in the new app_owner is granted, its other
    # memberships (between roles the target already had) are not touched.
    assert p.grants == [Membership("app_owner", ODD, True), Membership("app_owner", "app_reader")]
    stmts = p.statements(kept)
    assert stmts[0] == 'CREATE ROLE "Odd Role; x""y";'
    assert stmts[-1] == "GRANT app_owner TO app_reader"
    assert not any("app_reader WITH" in s for s in stmts)
    # A side missing on the target: not granted, and said.
    p = plan(Globals(kept.roles, [Membership("gone", "app_owner")]), [])
    assert p.grants == [] and p.skipped_grants == [Membership("gone", "app_owner")]


names = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1,
                max_size=12)


@given(st.lists(names, min_size=1, max_size=5, unique=True),
       st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4), st.booleans()), max_size=6),
       st.sets(st.integers(0, 4)))
def test_any_role_names_round_trip_and_plans_hold(roles: list[str],
                                                 edges: list[tuple[int, int, bool]],
                                                 have: set[int]) -> None:
    g = Globals({r: [f"CREATE ROLE {quote(r)};",
                     f"COMMENT ON ROLE {quote(r)} IS 'a;''b -- c';"] for r in roles},
                [Membership(roles[a % len(roles)], roles[b % len(roles)], adm)
                 for a, b, adm in edges])
    assert parse(render(g)) == g
    existing = {roles[i % len(roles)] for i in have}
    p = plan(g, existing)
    assert set(p.create) == set(roles) - existing and set(p.existing) == existing
    for m in p.grants + p.skipped_grants:  # only memberships of a role created now
        assert m.role in p.create or m.member in p.create
