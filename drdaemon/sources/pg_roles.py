"""What the PostgreSQL roles drdaemon connects as need, checked against a live server.

docs/postgres-roles.md explains each privilege. `gather` reads the facts from a
server (one query per connection); `judge` (pure) turns them into what is
missing for backups, restores and drills; `check_config` runs both for every
postgres source of a config (`drctl config check --connect`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from ..config import Config
from ..errors import first_line
from .pg_database import byte_transparent
from .postgres import describe

_USER_NS = """n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'"""

_SOURCE_SQL = f"""
SELECT current_user::text, r.rolsuper, r.rolbypassrls, r.rolcreatedb,
  pg_get_userbyid(d.datdba)::text, pg_has_role(d.datdba, 'MEMBER'),
  ARRAY(SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p', 'm', 'S') AND {_USER_NS}
          AND NOT (has_schema_privilege(n.oid, 'USAGE')
                   AND has_table_privilege(c.oid, 'SELECT')) ORDER BY 1),
  ARRAY(SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND c.relrowsecurity AND {_USER_NS} ORDER BY 1),
  (SELECT count(*) FROM pg_largeobject_metadata m
   WHERE NOT pg_has_role(m.lomowner, 'USAGE') AND NOT EXISTS (
     SELECT 1 FROM aclexplode(m.lomacl) a WHERE a.privilege_type = 'SELECT'
       AND (a.grantee = 0 OR pg_has_role(a.grantee, 'USAGE')))),
  ARRAY(SELECT DISTINCT pg_get_userbyid(c.relowner)::text FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE {_USER_NS} AND NOT pg_has_role(c.relowner, 'MEMBER') ORDER BY 1)
FROM pg_roles r, pg_database d
WHERE r.rolname = current_user AND d.datname = current_database()
"""

_ROLE_SQL = """
SELECT current_user::text, rolsuper, rolbypassrls, rolcreatedb FROM pg_roles
WHERE rolname = current_user
"""

MAX_NAMED = 3  # tables named in a message; the rest are counted


@dataclass(frozen=True)
class Role:
    """A role's attributes that drdaemon's work depends on."""

    name: str
    superuser: bool
    bypassrls: bool
    createdb: bool


@dataclass(frozen=True)
class SourceFacts:
    """What the source's role may do in the source database."""

    role: Role
    owner: str  # the database's owner
    owner_member: bool  # the role may act as the owner
    unreadable: tuple[str, ...]  # tables, views, sequences it may not SELECT
    rls_tables: tuple[str, ...]  # tables with row-level security enabled
    unreadable_large_objects: int
    foreign_owners: tuple[str, ...]  # owners of objects the role is no member of


@dataclass
class ServerCheck:
    """The findings for one source: what each job's role lacks (empty: nothing)."""

    source: str
    server: str
    backup: list[str] = field(default_factory=list)
    restore: list[str] = field(default_factory=list)
    drill: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not (self.backup or self.restore or self.drill)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _some(names: tuple[str, ...]) -> str:
    shown = ", ".join(names[:MAX_NAMED])
    return shown + (f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else "")


def judge_backup(f: SourceFacts) -> list[str]:
    """What the source's role lacks to back the database up."""
    r, out = f.role, list[str]()
    if r.superuser:
        return out
    if f.unreadable:
        out.append(f"SELECT on {len(f.unreadable)} table(s) or sequence(s) "
                   f"({_some(f.unreadable)}): grant pg_read_all_data")
    if f.rls_tables and not r.bypassrls:
        out.append(f"BYPASSRLS: {len(f.rls_tables)} table(s) have row-level security "
                   f"({_some(f.rls_tables)}); pg_dump refuses to dump them partially")
    if f.unreadable_large_objects:
        out.append(f"SELECT on {f.unreadable_large_objects} large object(s) "
                   "(pg_read_all_data does not cover them): GRANT SELECT ON LARGE OBJECT")
    return out


def judge_restore(f: SourceFacts) -> list[str]:
    """What the same role lacks to restore onto the source's server."""
    r, out = f.role, list[str]()
    if r.superuser:
        return out
    if not r.createdb:
        out.append("CREATEDB: a restore creates its staging database")
    if not f.owner_member:
        out.append(f"membership in {f.owner} (the database's owner): a restore gives the "
                   "restored database its owner")
    if f.foreign_owners:
        out.append(f"membership in {_some(f.foreign_owners)}: pg_restore sets the owner of "
                   "each object (or restore as a superuser)")
    return out


def judge_drill(drill: Role, f: SourceFacts | None) -> list[str]:
    """What the drill role lacks (`f`: the source's facts, for its row-level security)."""
    out: list[str] = []
    if drill.superuser:
        return out
    if not drill.createdb:
        out.append("CREATEDB: a drill restores into a scratch database")
    if f is not None and f.rls_tables and not drill.bypassrls:
        out.append(f"BYPASSRLS: a drill counts every row of {len(f.rls_tables)} table(s) "
                   f"with row-level security ({_some(f.rls_tables)})")
    return out


# -- IO ---------------------------------------------------------------------------


def _role(row: Any) -> Role:
    return Role(str(row[0]), bool(row[1]), bool(row[2]), bool(row[3]))


def gather_source(dsn: str) -> SourceFacts:
    """The facts `judge_*` need, read from the source database as its role."""
    with psycopg.connect(dsn, connect_timeout=30, autocommit=True) as conn:
        byte_transparent(conn)
        row = conn.execute(_SOURCE_SQL).fetchone()
    assert row is not None
    return SourceFacts(_role(row), row[4], bool(row[5]), tuple(row[6]), tuple(row[7]),
                       int(row[8]), tuple(row[9]))


def gather_role(dsn: str) -> Role:
    """The attributes of the role `dsn` connects as."""
    with psycopg.connect(dsn, connect_timeout=30, autocommit=True) as conn:
        byte_transparent(conn)
        row = conn.execute(_ROLE_SQL).fetchone()
    assert row is not None
    return _role(row)


def check_config(config: Config) -> list[ServerCheck]:
    """Connect to every postgres source (and its drill server) and say what each role lacks."""
    out: list[ServerCheck] = []
    for src in config.sources:
        if src.kind != "postgres" or src.dsn is None:
            continue
        check = ServerCheck(src.name, describe(src.dsn))
        out.append(check)
        try:
            facts = gather_source(src.dsn)
        except psycopg.Error as exc:
            check.error = f"cannot check {describe(src.dsn)}: {first_line(exc)}"
            continue
        check.backup = judge_backup(facts)
        check.restore = judge_restore(facts)
        drill_dsn = config.drills.postgres_dsn
        try:
            drill = gather_role(make_conninfo(drill_dsn, dbname="postgres")) if drill_dsn \
                else facts.role
        except psycopg.Error as exc:
            check.error = f"cannot check the drill server {describe(drill_dsn or '')}: " \
                          f"{first_line(exc)}"
            continue
        check.drill = judge_drill(drill, facts)
    return out
