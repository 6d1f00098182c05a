"""Drills of postgres sources: the scratch database, its verification against the
snapshot's facts and `[[drills.checks]]`, and removing scratch databases killed drills left.

The names and the verdicts (whose scratch it is, whether its process is gone)
belong to drills/scratch.py; this module only talks to the server.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pyrage import x25519

from ..errors import DrError, SourceError, UsageError, first_line
from . import pg_role_copy, pg_session, pg_sink, postgres
from .base import (
    CHECK_FAILED,
    COUNT_MISMATCH,
    MANIFEST_INVALID,
    NO_IDENTITY,
    PROPERTY_MISMATCH,
    RESTORE_FAILED,
    DrillFailure,
    DrillPlace,
    LeftoverJudge,
    Snapshot,
    SourceSettings,
    SqlCheck,
)
from .pg_recreate import Policy, Recreation

# Where the drill server cannot give the objects their owners (it lacks the roles
# and may not create them), the drill restores without owners and grants and
# says so: a drill server need not know the application's roles.
DRILL_RESTORE_OPTIONS = ("--no-owner", "--no-privileges")
OWNERS, NO_OWNER = "owners", "no-owner"


@dataclass
class OwnersMode:
    """How a drill restored ownership: `mode` (OWNERS or NO_OWNER) and why; the roles it
    created on the drill server (NOLOGIN, no password; dropped after the drill)."""

    mode: str
    why: str
    created: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "why": self.why, "created_roles": self.created}

    def note(self) -> str:
        if self.mode == OWNERS:
            return f"restored with owners and privileges: {self.why}"
        return f"restored with --no-owner --no-privileges: {self.why}"


def owners_mode(admin_dsn: str, sealed: Any,
                identities: Sequence[x25519.Identity]) -> OwnersMode:
    """Restore with owners where the drill server allows it: it has every role the
    snapshot names and the drill role may act as each, or the drill role is a superuser
    and creates the missing ones from the snapshot's roles."""
    try:
        roles = pg_role_copy.unseal(sealed, identities)
    except UsageError as exc:
        raise DrillFailure(NO_IDENTITY, str(exc)) from None
    except DrError as exc:
        raise DrillFailure(MANIFEST_INVALID, str(exc)) from None
    if roles is None:
        return OwnersMode(NO_OWNER, "the snapshot carries no roles (taken by an older "
                          "drdaemon)", [])
    needed = [str(r) for r in roles.get("needed") or []]
    try:
        with pg_session.connect(admin_dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT rolsuper, ARRAY(SELECT rolname::text FROM pg_roles WHERE rolname = "
                "ANY(%s) AND NOT pg_has_role(current_user, oid, 'MEMBER')) FROM pg_roles "
                "WHERE rolname = current_user", (needed,)).fetchone()
            assert row is not None
            superuser, foreign = bool(row[0]), list(row[1])
            missing = sorted(set(needed) - pg_role_copy.existing_roles(conn))
            if not missing and (superuser or not foreign):
                return OwnersMode(OWNERS, "the drill server has every role the snapshot "
                                  "names", [])
            if not superuser:
                lacks = (f"lacks the roles {', '.join(missing)}" if missing else
                         f"the drill role is no member of {', '.join(foreign)}")
                return OwnersMode(NO_OWNER, f"the drill server {lacks} and the drill role is "
                                  "no superuser", [])
            made = pg_role_copy.create(conn, roles, only=missing, login=False)
    except SourceError as exc:
        return OwnersMode(NO_OWNER, f"the roles could not be created: {exc}", [])
    return OwnersMode(OWNERS, "created the missing roles " + ", ".join(made.plan.create)
                      + " (NOLOGIN, no password; dropped after the drill)", made.plan.create)


class DrillSink(pg_sink.PostgresSink):
    """The scratch database; discarding it also drops the roles the drill created."""

    created_roles: list[str]

    def discard(self) -> None:
        try:
            super().discard()
        finally:  # the roles go even if the database could not (they own nothing else)
            if getattr(self, "created_roles", None):
                with pg_session.connect(self.admin_dsn, autocommit=True) as conn:
                    problems = pg_role_copy.drop(conn, self.created_roles)
                self.created_roles = []
                if problems:
                    raise SourceError("; ".join(problems))


def compare_tables(expected: Any, got: list[dict[str, Any]]) -> list[str]:
    """Count mismatches between the manifest's `tables` facts and a restored database."""
    try:
        want = {(str(t["schema"]), str(t["table"])): int(t["rows"]) for t in expected}
    except (TypeError, KeyError, ValueError):
        return [f"{MANIFEST_INVALID}: the manifest records no usable table counts"]
    have = {(t["schema"], t["table"]): int(t["rows"]) for t in got}
    reasons = []
    for (schema, table), rows in sorted(want.items()):
        name = f"{schema}.{table}"
        if (schema, table) not in have:
            reasons.append(f"{COUNT_MISMATCH}: table {name} is missing from the restored copy "
                           f"(manifest: {rows} rows)")
        elif have[(schema, table)] != rows:
            reasons.append(f"{COUNT_MISMATCH}: table {name} has {have[(schema, table)]} rows, "
                           f"the manifest says {rows}")
    for schema, table in sorted(set(have) - set(want)):
        reasons.append(f"{COUNT_MISMATCH}: table {schema}.{table} was restored but is not in "
                       "the manifest")
    return reasons


def open_scratch(source: SourceSettings, snapshot: Snapshot, place: DrillPlace,
                 identities: Sequence[x25519.Identity]) -> PostgresScratch:
    """A scratch database on the drill server (else the source's own), never committed."""
    assert source.dsn is not None
    base = place.server_dsn or source.dsn
    # The target name is only checked to be free: a drill never commits, it
    # verifies the staging database itself and drops it.
    prefix = place.database_prefix
    name = f"{prefix}{secrets.token_hex(6)}"
    # Database properties are recreated as a restore would, except what
    # names a role the drill server lacks or the drill role may not do
    # (Policy.drill): what was compared and skipped goes to the evidence.
    try:
        recreate = Recreation.from_facts(snapshot.facts.get("database"), Policy(drill=True),
                                         identities)
    except UsageError as exc:  # its sealed settings: no identity fits
        raise DrillFailure(NO_IDENTITY, str(exc)) from None
    owners = owners_mode(make_conninfo(base, dbname="postgres"), snapshot.facts.get("globals"),
                         identities)
    try:
        sink = DrillSink(base, make_conninfo(base, dbname=name), False, staging_prefix=prefix,
                         restore_options=() if owners.mode == OWNERS else DRILL_RESTORE_OPTIONS,
                         recreate=recreate)
    except BaseException:
        if owners.created:
            with pg_session.connect(make_conninfo(base, dbname="postgres"),
                                    autocommit=True) as conn:
                pg_role_copy.drop(conn, owners.created)
        raise
    sink.created_roles = list(owners.created)
    sink.notes.append(owners.note())
    return PostgresScratch(sink, postgres.describe(sink.staging_dsn),
                           {"server": postgres.describe(sink.admin_dsn),
                            "owners": owners.to_dict()}, tuple(place.checks))


@dataclass
class PostgresScratch:
    """A drill's scratch database (the sink's staging database)."""

    sink: pg_sink.PostgresSink
    where: str
    evidence: dict[str, Any]
    checks: tuple[SqlCheck, ...]

    def verify(self, facts: dict[str, Any], evidence: dict[str, Any]) -> list[str]:
        """Row counts against the facts, database properties, then the user's checks."""
        dsn = self.sink.staging_dsn
        try:
            tables = postgres.table_counts(dsn)
        except SourceError as exc:
            return [f"{RESTORE_FAILED}: cannot count rows in the restored copy: {exc}"]
        evidence["tables"] = len(tables)
        evidence["rows"] = sum(int(t["rows"]) for t in tables)
        reasons = compare_tables(facts.get("tables"), tables)
        reasons.extend(self._verify_properties(dsn, evidence))
        results = [run_check(dsn, c) for c in self.checks]
        evidence["checks"] = results
        reasons.extend(f"{CHECK_FAILED}: {r['sql']!r}: {r['detail']}"
                       for r in results if not r["ok"])
        return reasons

    def _verify_properties(self, dsn: str, evidence: dict[str, Any]) -> list[str]:
        recreate = self.sink.recreate
        try:
            got = postgres.database_properties(dsn)
        except SourceError as exc:
            return [f"{PROPERTY_MISMATCH}: cannot read the restored copy's properties: {exc}"]
        reasons = [f"{PROPERTY_MISMATCH}: database {d}" for d in recreate.differences(got)]
        evidence["database"] = recreate.evidence()
        return reasons


def run_check(dsn: str, check: SqlCheck) -> dict[str, Any]:
    """Run one user check, read-only, in the restored database."""
    result: dict[str, Any] = {"sql": check.sql, "min": check.min, "value": None, "ok": False,
                              "detail": ""}
    if check.database is not None and check.database != conninfo_to_dict(dsn).get("dbname"):
        result["detail"] = (f"names database {check.database!r}: a postgres source's checks "
                            "run in its own database (leave `database` out)")
        return result
    try:
        with psycopg.connect(dsn, connect_timeout=30, autocommit=False) as conn:
            conn.read_only = True
            row = conn.execute(check.sql).fetchone()
    except psycopg.Error as exc:
        result["detail"] = f"failed: {first_line(exc)}"
        return result
    value = row[0] if row else None
    if isinstance(value, Decimal):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        result["detail"] = f"returned {value!r}, not a number"
        return result
    result["value"] = value
    result["ok"] = value >= check.min
    result["detail"] = "" if result["ok"] else f"returned {value}, expected at least {check.min:g}"
    return result


# -- what killed drills left ------------------------------------------------------


def clean_leftovers(sources: Sequence[SourceSettings], server_dsn: str | None,
                    judge: LeftoverJudge) -> None:
    """Drop the scratch databases killed drills left on the drill servers of `sources`."""
    servers: dict[str, None] = {}
    for s in sources:
        if s.dsn is not None:
            servers[make_conninfo(server_dsn or s.dsn, dbname="postgres")] = None
    for admin in servers:
        clean_server(judge, admin)


def clean_server(judge: LeftoverJudge, admin: str) -> None:
    """Drop the scratch and staging databases on server `admin` that `judge` finds removable."""
    # Listing comes first and every verdict after it: a drill that makes its
    # scratch later is not listed, one that made it earlier is seen running.
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            names = [r[0] for r in conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY 1",
                (judge.database_like,))]
            for name in names:
                _clean_database(judge, conn, admin, name)
    except psycopg.Error as exc:
        judge.error(f"cannot look for leftover drill scratch on {postgres.describe(admin)}: "
                    f"{first_line(exc)}")


def _clean_database(judge: LeftoverJudge, conn: psycopg.Connection[Any], admin: str,
                    name: str) -> None:
    where = postgres.describe(make_conninfo(admin, dbname=name))
    verdict = judge.verdict(name, where)
    if verdict is None:
        return
    removable, who, why = verdict
    if not removable:
        judge.kept(where, who, why)
        return
    row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                       (name,)).fetchone()
    if row and row[0]:
        judge.kept(where, who, f"{why}, but {row[0]} connection(s) to it are open")
        return
    try:
        conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
    except psycopg.errors.InvalidCatalogName:
        return  # dropped meanwhile, by its drill or another cleanup
    except psycopg.errors.ObjectInUse:
        judge.kept(where, who, f"{why}, but a connection to it opened")
        return
    except psycopg.Error as exc:
        judge.error(f"cannot drop drill scratch {where} ({why}): {first_line(exc)}")
        return
    judge.removed(where, who, why)
