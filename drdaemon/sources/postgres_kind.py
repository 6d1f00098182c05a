"""The postgres source kind: one database, dumped by pg_dump (custom format) in one
consistent snapshot and restored by pg_restore into a staging database.

The work is done in postgres.py (dump, sink), pg_database.py (database-level
properties), pg_session.py and pg_drill.py (drills); this module is the plug-in
that the services see (sources.kind_for("postgres")).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

from psycopg.conninfo import make_conninfo
from pyrage import x25519

from ..errors import DrError, UsageError
from . import pg_database, pg_drill, pg_recreate, pg_role_copy, pg_session, pg_sink, postgres
from .base import (
    DataPlace,
    DrillPlace,
    DrillScratch,
    Dump,
    LeftoverJudge,
    RestoreOptions,
    Sink,
    Snapshot,
    SourceSettings,
    SourceWhere,
    whole_sizes,
)

# drctl restore --no-owner: for a target without the snapshot's roles. Grants
# name those roles too, so they are left out with the owners.
NO_OWNER_OPTIONS = ("--no-owner", "--no-privileges")
# What a tenant export's MANIFEST.json tells the customer besides the tables.
CUSTOMER_FACTS = ("server_version", "database_size", "table_count", "row_total")


class PostgresKind:
    """A PostgreSQL database (`dsn`, `lock_wait_timeout`; `standby_dsn`: its server's hot
    standby, watched by standby.py)."""

    name = "postgres"
    dump_format = "pgdump"
    config_keys = ("dsn", "lock_wait_timeout", "standby_dsn")
    restore_options = frozenset({"jobs", "no_owner", "policy", "with_roles"})
    takes_sql_checks = True
    # Per-table row counts outgrow a manifest past ~10,000 tables (facts.py); the
    # sealed roles (pg_role_copy.py) are only read by restores and drills.
    detached_facts = ("tables", "globals")
    export_suffix = ".dump"
    target_noun = "database"

    def plaintext_problem(self, head: bytes) -> str | None:
        if head.startswith(b"PGDMP"):
            return None
        return "is not a pg_dump custom archive (no PGDMP header)"

    def customer_facts(self, facts: Mapping[str, Any]) -> dict[str, Any]:
        # Row counts per table; never the sealed database settings.
        out = {k: facts[k] for k in CUSTOMER_FACTS if k in facts}
        tables = facts.get("tables")
        if isinstance(tables, list):
            out["tables"] = [{"schema": t.get("schema"), "table": t.get("table"),
                              "rows": t.get("rows")} for t in tables if isinstance(t, dict)]
            out.setdefault("table_count", len(out["tables"]))
            out.setdefault("row_total", sum(int(t["rows"] or 0) for t in out["tables"]))
        return out

    def data_place(self, source: SourceWhere) -> DataPlace | None:
        if not source.dsn:
            return None
        try:
            host, port, dbname = pg_session.database_identity(source.dsn)
        except ValueError:  # validated when loaded; an odd DSN matches nothing
            return None
        return DataPlace(("postgres", host, port, dbname), what="the same database")

    def load_instructions(self, file: str) -> list[str]:
        return ["a pg_dump custom archive; load it into a new database with:",
                "  createdb NEWDB",
                f"  pg_restore --no-owner --dbname=NEWDB {file}",
                "(leave out --no-owner where the roles it names exist)"]

    def dump(self, source: SourceSettings, now: datetime | None,
             cancel: threading.Event | None) -> AbstractContextManager[Dump]:
        assert source.dsn is not None
        return postgres.dump(source.dsn, lock_wait_timeout=source.lock_wait_timeout,
                             cancel=cancel)

    def seal_facts(self, facts: dict[str, Any],
                   recipients: Sequence[x25519.Recipient]) -> dict[str, Any]:
        # Database settings and role password hashes may hold secrets: sealed like the dump.
        return pg_role_copy.seal(pg_database.seal_facts(facts, recipients), recipients)

    def detached_summary(self, detached: dict[str, Any]) -> dict[str, Any]:
        # The shrink guard and status compare these in place of `tables`.
        out: dict[str, Any] = {}
        tables = detached.get("tables")
        if tables is not None:
            out.update(table_count=len(tables), row_total=sum(int(t["rows"]) for t in tables))
        roles = detached.get("globals")
        if isinstance(roles, dict):  # how many roles, and whether with their passwords
            out["roles"] = {"count": roles.get("role_count"), "passwords": roles.get("passwords")}
        return out

    def measures(self, facts: Mapping[str, Any]) -> dict[str, int]:
        """The rows of every table (`row_total`, or the sum of the per-table counts of
        manifests that carry them inline) and the database's size."""
        rows = facts.get("row_total")
        tables = facts.get("tables")
        if rows is None and isinstance(tables, list):
            counts = [t.get("rows") for t in tables if isinstance(t, dict)]
            rows = sum(c for c in counts if isinstance(c, int)) if counts else None
        return whole_sizes({"rows": rows, "database_size": facts.get("database_size")})

    def check_target(self, source: SourceSettings, target: str) -> None:
        assert source.dsn is not None
        pg_sink.target_dsn(source.dsn, target)  # a bad target (or one with a password)

    def open_sink(self, source: SourceSettings, snapshot: Snapshot, target: str,
                  options: RestoreOptions) -> Sink:
        assert source.dsn is not None
        created = _create_roles(source.dsn, snapshot, target, options) \
            if options.with_roles else None
        recreate = pg_recreate.Recreation.from_facts(snapshot.facts.get("database"),
                                                     options.policy, options.identities)
        if options.leftovers is not None:
            # The target's server is where a killed restore left its staging database.
            pg_drill.clean_server(options.leftovers, make_conninfo(
                pg_sink.target_dsn(source.dsn, target), dbname="postgres"))
        prefix = {"staging_prefix": options.staging_prefix} if options.staging_prefix else {}
        sink = pg_sink.PostgresSink(
            source.dsn, target, options.force, jobs=options.jobs, **prefix,
            scratch_dir=options.scratch_dir, size_hint=snapshot.plaintext_size,
            restore_options=NO_OWNER_OPTIONS if options.no_owner else (), recreate=recreate)
        if options.no_owner:
            sink.notes.append("restored with --no-owner: every object belongs to the restoring "
                              "role and no GRANT or REVOKE was applied")
        if created is not None:
            sink.notes.extend(created.notes())
        return sink

    def open_scratch(self, source: SourceSettings, snapshot: Snapshot, place: DrillPlace,
                     identities: Sequence[x25519.Identity]) -> DrillScratch:
        return pg_drill.open_scratch(source, snapshot, place, identities)

    def clean_leftovers(self, sources: Sequence[SourceSettings], server_dsn: str | None,
                        judge: LeftoverJudge) -> None:
        pg_drill.clean_leftovers(sources, server_dsn, judge)


def _create_roles(source_dsn: str, snapshot: Snapshot, target: str,
                  options: RestoreOptions) -> pg_role_copy.Created:
    """--with-roles: the roles the snapshot names that the target server lacks, created
    before anything else (they stay if the restore then fails: a retry needs them)."""
    if options.no_owner:
        raise UsageError("--with-roles and --no-owner contradict each other: choose one")
    roles = pg_role_copy.unseal(snapshot.facts.get("globals"), options.identities)
    if roles is None:
        raise UsageError(f"snapshot {snapshot.id} carries no roles (taken by an older "
                         "drdaemon): create them on the target first, or restore with "
                         "--no-owner")
    dsn = pg_sink.target_dsn(source_dsn, target)
    try:
        with pg_session.connect(make_conninfo(dsn, dbname="postgres"), autocommit=True) as conn:
            return pg_role_copy.create(conn, roles)
    except DrError as exc:
        raise type(exc)(f"--with-roles on {postgres.describe(dsn)}: {exc}") from None


POSTGRES = PostgresKind()
