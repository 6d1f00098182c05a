"""A database's roles, carried with its snapshot: captured from the source server with
`pg_dumpall --globals-only`, sealed like the dump, and created on a restore target
(`drctl restore --with-roles`) or a drill server before pg_restore needs them.

The decisions are pure (pg_globals.py); this module talks to the servers.
"""

from __future__ import annotations

import base64
import binascii
import json
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pyrage
from psycopg import sql
from pyrage import x25519

from ..errors import DrError, SourceError, UsageError, first_line
from . import pg_globals
from .pg_session import child_env, tool

# The roles a database names: owners, grantees, policies (pg_shdepend; the bootstrap
# superuser and predefined roles are never recorded there), the database's owner and
# the roles with settings in it.
_NEEDED = """
WITH d AS (SELECT oid, datdba FROM pg_database WHERE datname = current_database())
SELECT pg_get_userbyid(s.refobjid)::text FROM pg_shdepend s, d
WHERE s.refclassid = 'pg_authid'::regclass
  AND (s.dbid = d.oid OR (s.classid = 'pg_database'::regclass AND s.objid = d.oid))
UNION SELECT pg_get_userbyid(d.datdba)::text FROM d
UNION SELECT pg_get_userbyid(r.setrole)::text FROM pg_db_role_setting r, d
  WHERE r.setdatabase = d.oid AND r.setrole <> 0
"""
MAX_GLOBALS = 64 << 20  # bytes of pg_dumpall output
GLOBALS_TIMEOUT = 300.0
SEALED = "sealed"

# Everything of the server's catalogs that the kept part of `pg_dumpall --globals-only`
# is made of (pg_globals.parse): roles with their attributes and role-wide settings
# (pg_roles.rolconfig), memberships with their grantors, comments and security labels
# on roles; with `passwords`, the password hashes too (pg_authid, readable then). A
# digest, so that a capture whose digest is unchanged reuses the parsed output.
_ROLES_DIGEST = """
SELECT encode(sha256(textsend(concat_ws('|',
  (SELECT string_agg(r::text, ',' ORDER BY r.oid) FROM pg_catalog.pg_roles r),
  (SELECT string_agg(m::text, ',' ORDER BY m.roleid, m.member, m.grantor)
     FROM pg_catalog.pg_auth_members m),
  (SELECT string_agg(d::text, ',' ORDER BY d.objoid) FROM pg_catalog.pg_shdescription d
     WHERE d.classoid = 'pg_catalog.pg_authid'::regclass),
  (SELECT string_agg(l::text, ',' ORDER BY l.objoid, l.provider)
     FROM pg_catalog.pg_shseclabel l WHERE l.classoid = 'pg_catalog.pg_authid'::regclass),
  CASE WHEN %(passwords)s THEN (SELECT string_agg(a.oid::text || ':' ||
     coalesce(a.rolpassword, ''), ',' ORDER BY a.oid) FROM pg_catalog.pg_authid a) END
))), 'hex')
"""
# (server, user, passwords) -> (digest, parsed globals): pg_dumpall's output of this
# process's last capture there. One process snapshots many databases of one server
# (a day's snapshots, the daemon); the roles rarely change between them.
_captured: dict[tuple[str, str, bool], tuple[str, pg_globals.Globals]] = {}
_captured_lock = threading.Lock()


def capture(conn: psycopg.Connection[Any], dsn: str, dbname: str) -> dict[str, Any]:
    """The roles the database at `conn` needs, as facts: `sql` (pg_dumpall's statements for
    them and their members), `needed`, `passwords` (False: the backup role cannot read
    pg_authid, so the roles carry no password). SourceError if pg_dumpall fails.

    pg_dumpall (a process and a connection of its own) runs only when the server's
    roles differ from this process's last capture there (`_ROLES_DIGEST`, read in
    the same session); otherwise that capture's output is used again."""
    try:
        needed = sorted(r[0] for r in conn.execute(_NEEDED).fetchall() if r[0])
        row = conn.execute("SELECT has_table_privilege('pg_catalog.pg_authid', "
                           "'SELECT')").fetchone()
        passwords = bool(row and row[0])
        digest_row = conn.execute(_ROLES_DIGEST, {"passwords": passwords}).fetchone()
    except psycopg.Error as exc:
        raise SourceError(f"listing the database's roles failed: {first_line(exc)}") from None
    digest = str(digest_row[0]) if digest_row else ""
    server = (f"{conn.info.host}:{conn.info.port}", conn.info.user, passwords)
    with _captured_lock:
        hit = _captured.get(server)
    if hit is not None and hit[0] == digest:
        parsed = hit[1]
    else:
        parsed = pg_globals.parse(_dumpall(dsn, dbname, passwords))
        with _captured_lock:
            _captured[server] = (digest, parsed)
    kept = pg_globals.keep(parsed, needed)
    return {"sql": pg_globals.render(kept), "needed": needed, "passwords": passwords,
            "roles": list(kept.roles)}


def _dumpall(dsn: str, dbname: str, passwords: bool) -> str:
    """`pg_dumpall --globals-only` of the server at `dsn` (SourceError if it fails)."""
    argv = [tool("pg_dumpall"), "--globals-only", "--no-password", f"--dbname={dsn}",
            f"--database={dbname}"]
    if not passwords:
        argv.append("--no-role-passwords")
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              env=child_env(), timeout=GLOBALS_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SourceError(f"pg_dumpall --globals-only failed: {exc}") from None
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise SourceError(f"pg_dumpall --globals-only failed (exit {proc.returncode}): "
                          f"{err[-1] if err else 'no message'}")
    if len(proc.stdout) > MAX_GLOBALS:
        raise SourceError(f"pg_dumpall --globals-only wrote more than {MAX_GLOBALS} bytes")
    return proc.stdout.decode()


def seal(facts: dict[str, Any], recipients: Sequence[x25519.Recipient]) -> dict[str, Any]:
    """`facts` with `globals` age-encrypted to `recipients` (password hashes, role names);
    `passwords` and the number of roles stay readable."""
    g = facts.get("globals")
    if not isinstance(g, dict) or SEALED in g:
        return facts
    blob = pyrage.encrypt(json.dumps(g, ensure_ascii=False).encode(), list(recipients))
    return {**facts, "globals": {SEALED: base64.b64encode(blob).decode(),
                                 "passwords": g.get("passwords"),
                                 "role_count": len(g.get("roles") or [])}}


def unseal(sealed: Any, identities: Sequence[x25519.Identity]) -> dict[str, Any] | None:
    """The globals of a snapshot's facts (None: an older snapshot has none). UsageError if no
    identity fits, DrError if they are malformed."""
    if sealed is None:
        return None
    try:
        blob = base64.b64decode(str(sealed[SEALED]), validate=True)
        doc = json.loads(pyrage.decrypt(blob, list(identities)))
    except pyrage.DecryptError as exc:
        if "no matching keys" in str(exc).lower():
            raise UsageError("no identity given can decrypt the snapshot's roles") from None
        raise DrError(f"the snapshot's roles cannot be decrypted: {exc}") from None
    except (TypeError, KeyError, binascii.Error, ValueError, UnicodeDecodeError):
        raise DrError("the snapshot's roles are malformed") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("sql"), str):
        raise DrError("the snapshot's roles are malformed")
    return doc


@dataclass
class Created:
    """What creating a snapshot's roles did on a server."""

    plan: pg_globals.Plan = field(default_factory=pg_globals.Plan)
    passwords: bool = True

    def notes(self) -> list[str]:
        """What it did, for the operator (names only, never a password)."""
        p, out = self.plan, []
        if p.create:
            out.append("created roles: " + ", ".join(p.create)
                       + ("" if self.passwords else " (without passwords: the backup role "
                          "could not read them; set them with ALTER ROLE ... PASSWORD)"))
        if p.existing:
            out.append("roles already on the target, left alone: " + ", ".join(p.existing))
        if p.grants:
            out.append("memberships granted: " + ", ".join(
                f"{g.member} in {g.role}" for g in p.grants))
        if p.skipped_grants:
            out.append("memberships not granted (a side is missing on the target): "
                       + ", ".join(f"{g.member} in {g.role}" for g in p.skipped_grants))
        if not (p.create or p.existing):
            out.append("the snapshot names no roles to create")
        return out

    def to_dict(self) -> dict[str, Any]:
        p = self.plan
        return {"created": p.create, "existing": p.existing, "passwords": self.passwords,
                "memberships": [[g.member, g.role] for g in p.grants],
                "memberships_skipped": [[g.member, g.role] for g in p.skipped_grants]}


def existing_roles(conn: psycopg.Connection[Any]) -> set[str]:
    return {r[0] for r in conn.execute("SELECT rolname::text FROM pg_roles").fetchall()}


def create(conn: psycopg.Connection[Any], globals_: dict[str, Any], only: Sequence[str] | None
           = None, login: bool = True) -> Created:
    """Create the roles of `globals_` that the server at `conn` lacks (`only`: of these
    names), in one transaction; `login=False` leaves every created role without LOGIN
    and password (a drill's). SourceError naming the role if the server refuses."""
    roles = pg_globals.parse(globals_["sql"])
    if only is not None:
        roles = pg_globals.Globals({n: s for n, s in roles.roles.items() if n in only},
                                   [g for g in roles.memberships
                                    if g.role in only and g.member in only])
    try:
        plan = pg_globals.plan(roles, existing_roles(conn))
        with conn.transaction():
            for name in plan.create:
                for stmt in roles.roles[name]:
                    _run(conn, stmt, name)
                if not login:
                    _run(conn, sql.SQL("ALTER ROLE {} WITH NOLOGIN PASSWORD NULL").format(
                        sql.Identifier(name)), name)
            for g in plan.grants:
                _run(conn, g.statement(), g.role)
    except psycopg.Error as exc:
        raise SourceError(f"cannot create the snapshot's roles: {first_line(exc)}") from None
    return Created(plan, bool(globals_.get("passwords")) and login)


def _run(conn: psycopg.Connection[Any], stmt: str | sql.Composed, role: str) -> None:
    # The statement may carry a password hash: never in the message.
    try:
        # pg_dumpall's own statement, one at a time (pg_globals.statements split them).
        conn.execute(stmt.encode() if isinstance(stmt, str) else stmt)
    except psycopg.Error as exc:
        raise SourceError(f"cannot create role {role!r} on the target: "
                          f"{first_line(exc)}") from None


def drop(conn: psycopg.Connection[Any], names: Sequence[str]) -> list[str]:
    """Drop roles a drill created (after its scratch database): the reasons it could not."""
    problems = []
    for name in names:
        try:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
        except psycopg.Error as exc:
            problems.append(f"cannot drop role {name!r}: {first_line(exc)}")
    return problems


def can_create_roles(conn: psycopg.Connection[Any]) -> bool:
    """Whether the connected role may create roles (superuser or CREATEROLE)."""
    row = conn.execute("SELECT rolsuper OR rolcreaterole FROM pg_roles "
                       "WHERE rolname = current_user").fetchone()
    return bool(row and row[0])
