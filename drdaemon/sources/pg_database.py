"""PostgreSQL database-level properties: recorded by the backup, recreated on restore.

`pg_dump` without `--create` carries no database-level properties and
`pg_restore` into a fresh database applies none, so the backup records them
in the manifest's facts (`facts["database"]`, taken in the dump's own
transaction) and a restore recreates them on its staging database: encoding,
collation, ctype and locale provider at CREATE DATABASE; owner, privileges
(ACL), settings, comment and connection limit once pg_restore has finished.
A drill does the same on its scratch database and compares the result with
the manifest (docs/postgres-roles.md says what each role needs).

Pure functions turn the recorded facts into SQL and compare two records
(ACL items in pg_acl.py); `capture` and pg_recreate.Recreation are the thin IO
around them. About 450 lines, kept whole on purpose: the record, the SQL it
becomes and the comparison a drill makes must change together.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import pyrage
from psycopg import sql
from pyrage import x25519

from ..errors import SourceError, UsageError
from .pg_acl import PUBLIC, AclItem, format_aclitem, parse_aclitem, read_name

OWNER = "<owner>"  # the database owner, whoever it is, in compared ACLs

# Settings whose value is a list of quoted elements (pg_dump's
# variable_is_guc_list_quote): restored element by element, as pg_dump does.
LIST_SETTINGS = frozenset({"local_preload_libraries", "search_path", "session_preload_libraries",
                           "shared_preload_libraries", "temp_tablespaces",
                           "unix_socket_directories"})

_PROVIDERS = {"c": "libc", "i": "icu", "b": "builtin"}

CAPTURE_SQL = """
SELECT d.datname, pg_encoding_to_char(d.encoding), pg_get_userbyid(d.datdba),
       to_jsonb(d) - 'datacl', d.datacl::text[],
       shobj_description(d.oid, 'pg_database'),
       ARRAY(SELECT s.v FROM pg_db_role_setting rs, unnest(rs.setconfig) WITH ORDINALITY s(v, i)
             WHERE rs.setdatabase = d.oid AND rs.setrole = 0 ORDER BY s.i),
       ARRAY(SELECT ARRAY[r.rolname::text, s.v] FROM pg_db_role_setting rs
             JOIN pg_roles r ON r.oid = rs.setrole,
             unnest(rs.setconfig) WITH ORDINALITY s(v, i)
             WHERE rs.setdatabase = d.oid ORDER BY r.rolname, s.i)
FROM pg_database d WHERE d.datname = current_database()
"""


# -- the record (pure) ------------------------------------------------------------


def split_setting(entry: str) -> tuple[str, str]:
    """`name=value` of pg_db_role_setting into (name, value)."""
    name, sep, value = entry.partition("=")
    if not sep or not name:
        raise ValueError(f"malformed setting {entry!r}")
    return name, value


def split_guc_list(value: str) -> list[str]:
    """The elements of a list setting's stored value, as pg_dump's SplitGUCList reads them.

    e.g. `app, "$user", "a ""b"" c"` gives app, $user and a "b" c.
    """
    out: list[str] = []
    i, n = 0, len(value)
    while True:
        while i < n and value[i].isspace():
            i += 1
        if i < n and value[i] == '"':
            elem, i = read_name(value, i, "")
        else:
            j = i
            while j < n and value[j] != ",":
                j += 1
            elem, i = value[i:j].rstrip(), j
        out.append(elem)
        while i < n and value[i].isspace():
            i += 1
        if i >= n:
            return out
        if value[i] != ",":
            raise ValueError(f"malformed list value {value!r}")
        i += 1


@dataclass(frozen=True)
class Properties:
    """A database's properties as the manifest records them (`facts["database"]`)."""

    name: str
    encoding: str
    collate: str
    ctype: str
    locale_provider: str  # "libc", "icu" (or "builtin", PostgreSQL 17)
    icu_locale: str | None
    owner: str
    connection_limit: int
    settings: tuple[str, ...]  # "name=value", ALTER DATABASE ... SET
    role_settings: tuple[tuple[str, str], ...]  # (role, "name=value"), ALTER ROLE ... IN DATABASE
    comment: str | None
    acl: tuple[AclItem, ...] | None  # None: the default (PUBLIC may connect)

    def to_facts(self) -> dict[str, Any]:
        return {"name": self.name, "encoding": self.encoding, "collate": self.collate,
                "ctype": self.ctype, "locale_provider": self.locale_provider,
                "icu_locale": self.icu_locale, "owner": self.owner,
                "connection_limit": self.connection_limit, "settings": list(self.settings),
                "role_settings": [list(rs) for rs in self.role_settings],
                "comment": self.comment,
                "acl": None if self.acl is None else [format_aclitem(a) for a in self.acl]}

    @classmethod
    def from_facts(cls, facts: Any) -> Properties | None:
        """The recorded properties; None if the manifest has none (an older drdaemon's:
        there `facts["database"]` is the database's name). ValueError if malformed."""
        if not isinstance(facts, dict):
            return None
        try:
            props = cls(
                name=_str(facts["name"]), encoding=_str(facts["encoding"]),
                collate=_str(facts["collate"]), ctype=_str(facts["ctype"]),
                locale_provider=_str(facts["locale_provider"]),
                icu_locale=_opt_str(facts.get("icu_locale")), owner=_str(facts["owner"]),
                connection_limit=int(facts["connection_limit"]),
                settings=tuple(_str(s) for s in facts["settings"]),
                role_settings=tuple((_str(r), _str(s)) for r, s in facts["role_settings"]),
                comment=_opt_str(facts.get("comment")),
                acl=None if facts["acl"] is None
                else tuple(parse_aclitem(_str(a)) for a in facts["acl"]))
            for entry in (*props.settings, *(s for _, s in props.role_settings)):
                split_setting(entry)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed database properties ({exc})") from None
        if props.locale_provider not in _PROVIDERS.values():
            raise ValueError(f"unknown locale provider {props.locale_provider!r}")
        return props

    def roles(self) -> dict[str, list[str]]:
        """Every role these properties name -> what names it (for messages)."""
        uses: dict[str, list[str]] = {self.owner: ["owner"]}
        for a in self.acl or ():
            if a.grantee != PUBLIC:
                uses.setdefault(a.grantee, []).append("privileges")
            uses.setdefault(a.grantor, []).append("grantor")
        for role, _ in self.role_settings:
            uses.setdefault(role, []).append("settings")
        return {r: sorted(set(u)) for r, u in uses.items()}


# -- settings are sealed in the manifest ----------------------------------------------
#
# A setting may hold a secret (e.g. `ALTER DATABASE ... SET app.jwt_secret`), and
# manifests are plaintext in the buckets. So the manifest keeps only the
# settings' names in the clear and their values age-encrypted to the
# snapshot's recipients, like the dump that carries them too.

SEALED = "sealed_settings"


def seal(facts: dict[str, Any], recipients: Sequence[x25519.Recipient]) -> dict[str, Any]:
    """`facts` (Properties.to_facts) with settings and role settings age-encrypted."""
    inner = {"settings": facts["settings"], "role_settings": facts["role_settings"]}
    blob = pyrage.encrypt(json.dumps(inner, ensure_ascii=False).encode(), list(recipients))
    out = {k: v for k, v in facts.items() if k not in inner}
    out["setting_names"] = [split_setting(e)[0] for e in facts["settings"]]
    out["role_setting_names"] = [[r, split_setting(e)[0]] for r, e in facts["role_settings"]]
    out[SEALED] = base64.b64encode(blob).decode()
    return out


def unseal(facts: Any, identities: Sequence[x25519.Identity]) -> Any:
    """`facts` with sealed settings opened (others as they are). UsageError if no
    identity fits, ValueError if the sealed part is malformed."""
    if not isinstance(facts, dict) or SEALED not in facts:
        return facts
    try:
        blob = base64.b64decode(_str(facts[SEALED]), validate=True)
    except (binascii.Error, TypeError):
        raise ValueError("sealed settings are not base64") from None
    try:
        inner = json.loads(pyrage.decrypt(blob, list(identities)))
    except pyrage.DecryptError as exc:
        if "no matching keys" in str(exc).lower():
            raise UsageError("no identity given can decrypt the snapshot's database "
                             "settings") from None
        raise ValueError(f"sealed settings cannot be decrypted: {exc}") from None
    except (ValueError, UnicodeDecodeError):
        raise ValueError("sealed settings are not JSON") from None
    if not isinstance(inner, dict):
        raise ValueError("sealed settings are not a JSON object")
    out = {k: v for k, v in facts.items()
           if k not in (SEALED, "setting_names", "role_setting_names")}
    out["settings"] = inner.get("settings")
    out["role_settings"] = inner.get("role_settings")
    return out


def seal_facts(facts: dict[str, Any], recipients: Sequence[x25519.Recipient]) -> dict[str, Any]:
    """A source's facts with `facts["database"]`'s settings sealed (if it has any)."""
    db = facts.get("database")
    if not isinstance(db, dict) or SEALED in db:
        return facts
    return {**facts, "database": seal(db, recipients)}


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"{v!r} is not a string")
    return v


def _opt_str(v: Any) -> str | None:
    return None if v is None else _str(v)


def from_row(row: tuple[Any, ...]) -> Properties:
    """Properties from one row of CAPTURE_SQL."""
    name, encoding, owner, db, acl, comment, settings, role_settings = row
    provider = _PROVIDERS.get(str(db.get("datlocprovider", "c")), "libc")
    # PostgreSQL 15 and 16 call the provider's locale daticulocale, 17 datlocale.
    locale = db.get("datlocale", db.get("daticulocale"))
    return Properties(
        name=name, encoding=encoding, collate=db["datcollate"], ctype=db["datctype"],
        locale_provider=provider, icu_locale=locale if provider != "libc" else None,
        owner=owner, connection_limit=int(db["datconnlimit"]),
        settings=tuple(settings), role_settings=tuple((r, s) for r, s in role_settings),
        comment=comment, acl=None if acl is None else tuple(parse_aclitem(a) for a in acl))


# -- what to run (pure) -------------------------------------------------------------

# A compared property: ("encoding",), ("owner",), ("setting", name),
# ("role_setting", role, name), ("acl", grantee, grantor), ...
Key = tuple[str, ...]


@dataclass(frozen=True)
class Step:
    """Statements that recreate one property; `keys` are what it sets (see Key)."""

    what: str
    statements: tuple[sql.Composed | sql.SQL, ...]
    keys: tuple[Key, ...]
    roles: tuple[str, ...] = ()  # the roles it needs on the target


def create_statement(p: Properties | None, staging: str, server_version: int,
                     with_locale: bool = True) -> sql.Composed:
    """CREATE DATABASE for the staging database, with the recorded encoding and locale."""
    parts: list[sql.Composable] = [sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(
        sql.Identifier(staging))]
    if p is not None and with_locale:
        parts.append(sql.SQL("ENCODING {} LC_COLLATE {} LC_CTYPE {}").format(
            sql.Literal(p.encoding), sql.Literal(p.collate), sql.Literal(p.ctype)))
        if p.locale_provider != "libc" and server_version < 150000:
            raise UsageError(f"the database uses the {p.locale_provider} locale provider, "
                             "which needs PostgreSQL 15 or later on the target")
        if server_version >= 150000:
            # template0's provider is the cluster's default: always say which.
            parts.append(sql.SQL("LOCALE_PROVIDER {}").format(sql.SQL(p.locale_provider)))
        if p.locale_provider == "icu" and p.icu_locale:
            parts.append(sql.SQL("ICU_LOCALE {}").format(sql.Literal(p.icu_locale)))
        elif p.locale_provider == "builtin" and p.icu_locale:
            parts.append(sql.SQL("BUILTIN_LOCALE {}").format(sql.Literal(p.icu_locale)))
    return sql.SQL(" ").join(parts)


def setting_statement(target: sql.Composable, entry: str) -> sql.Composed:
    """`<target> SET name TO value` for one stored `name=value` (target: ALTER DATABASE x...)."""
    name, value = split_setting(entry)
    values = split_guc_list(value) if name.lower() in LIST_SETTINGS else [value]
    return sql.SQL("{} SET {} TO {}").format(target, sql.Identifier(name),
                                              sql.SQL(", ").join(map(sql.Literal, values)))


def _tokens(privileges: str) -> set[str]:
    """Each privilege with its grant option mark: CTc* gives C, T and c*."""
    return {c + ("*" if privileges[i + 1:i + 2] == "*" else "")
            for i, c in enumerate(privileges) if c != "*"}


def normalized_acl(acl: Iterable[AclItem], owner: str) -> dict[Key, str]:
    """("acl", grantee, grantor) -> sorted privileges, with the owner written OWNER."""
    merged: dict[Key, set[str]] = {}
    for a in acl:
        grantee = OWNER if a.grantee == owner else a.grantee
        grantor = OWNER if a.grantor == owner else a.grantor
        merged.setdefault(("acl", grantee, grantor), set()).update(_tokens(a.privileges))
    return {k: "".join(sorted(v)) for k, v in merged.items()}


def effective_acl(p: Properties) -> tuple[AclItem, ...]:
    """The ACL in force: the recorded one, else PostgreSQL's default for a database."""
    if p.acl is not None:
        return p.acl
    return (AclItem(PUBLIC, "Tc", p.owner), AclItem(p.owner, "CTc", p.owner))


def owner_step(p: Properties, db: str) -> Step:
    """ALTER DATABASE `db` OWNER TO the recorded owner."""
    return Step(f"owner {p.owner}", (sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
        sql.Identifier(db), sql.Identifier(p.owner)),), (("owner",),), (p.owner,))


def apply_steps(p: Properties, db: str, owned: bool = True) -> list[Step]:
    """What recreates the privileges, settings, comment and connection limit of `p` on
    database `db` after pg_restore (and after owner_step). `owned`: the recorded owner
    owns `db`; else the current user does, and takes the owner's privileges."""
    name = sql.Identifier(db)
    alter = sql.SQL("ALTER DATABASE {}").format(name)
    owner = sql.Identifier(p.owner) if owned else sql.SQL("CURRENT_USER")
    steps: list[Step] = []
    if p.acl is not None:
        # Privileges: start from none (not even the owner's), then grant each item.
        steps.append(Step("privileges", (
            sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(name),
            sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(name, owner)), ()))
    # The owner's own grants first: other grantors may need their grant option.
    for a in sorted(p.acl or (), key=lambda a: a.grantor != p.owner):
        grantee = (sql.SQL("PUBLIC") if a.grantee == PUBLIC
                   else owner if a.grantee == p.owner else sql.Identifier(a.grantee))
        plain, grantable = a.grants()
        stmts: list[sql.Composed | sql.SQL] = []
        as_grantor = a.grantor != p.owner
        if as_grantor:
            stmts.append(sql.SQL("SET ROLE {}").format(sql.Identifier(a.grantor)))
        for privs, option in ((plain, ""), (grantable, " WITH GRANT OPTION")):
            if privs:
                stmts.append(sql.SQL("GRANT {} ON DATABASE {} TO {}" + option).format(
                    sql.SQL(", ").join(map(sql.SQL, privs)), name, grantee))
        if as_grantor:
            stmts.append(sql.SQL("RESET ROLE"))
        grantee_key = OWNER if a.grantee == p.owner else a.grantee
        grantor_key = OWNER if a.grantor == p.owner else a.grantor
        needs = tuple(r for r in (a.grantee, a.grantor)
                      if r not in (PUBLIC, p.owner))
        steps.append(Step(f"privileges {a.privileges} of {a.grantee or 'PUBLIC'} "
                          f"granted by {a.grantor}", tuple(stmts),
                          (("acl", grantee_key, grantor_key),), needs))
    for entry in p.settings:
        setting = split_setting(entry)[0]
        steps.append(Step(f"setting {entry}", (setting_statement(alter, entry),),
                          (("setting", setting),)))
    for role, entry in p.role_settings:
        setting = split_setting(entry)[0]
        target = sql.SQL("ALTER ROLE {} IN DATABASE {}").format(sql.Identifier(role), name)
        steps.append(Step(f"setting {entry} of role {role}", (setting_statement(target, entry),),
                          (("role_setting", role, setting),), (role,)))
    if p.comment is not None:
        steps.append(Step("comment", (sql.SQL("COMMENT ON DATABASE {} IS {}").format(
            name, sql.Literal(p.comment)),), (("comment",),)))
    if p.connection_limit != -1:
        steps.append(Step(f"connection limit {p.connection_limit}", (
            sql.SQL("{} CONNECTION LIMIT {}").format(alter, sql.Literal(p.connection_limit)),),
            (("connection_limit",),)))
    return steps


def comparable(p: Properties) -> dict[Key, Any]:
    """Every compared property of `p` by Key (the name is not compared)."""
    out: dict[Key, Any] = {("encoding",): p.encoding, ("collate",): p.collate,
                           ("ctype",): p.ctype, ("locale_provider",): p.locale_provider,
                           ("icu_locale",): p.icu_locale, ("owner",): p.owner,
                           ("connection_limit",): p.connection_limit,
                           ("comment",): p.comment}
    for entry in p.settings:
        name, value = split_setting(entry)
        out[("setting", name)] = value
    for role, entry in p.role_settings:
        name, value = split_setting(entry)
        out[("role_setting", role, name)] = value
    out.update(normalized_acl(effective_acl(p), p.owner))
    return out


def describe_key(key: Key) -> str:
    kind = key[0]
    if kind == "setting":
        return f"setting {key[1]}"
    if kind == "role_setting":
        return f"setting {key[2]} of role {key[1]}"
    if kind == "acl":
        return f"privileges of {key[1] or 'PUBLIC'} granted by {key[2]}"
    return kind.replace("_", " ")


def differences(expected: Properties, got: Properties, skipped: Iterable[Key] = ()) -> list[str]:
    """Each property of `got` that differs from `expected`, except the `skipped` ones
    (a key skips every key it is a prefix of)."""
    skip = tuple(skipped)
    want, have = comparable(expected), comparable(got)
    out = []
    for key in sorted(set(want) | set(have)):
        if any(key[:len(s)] == s for s in skip):
            continue
        if key not in have:
            out.append(f"{describe_key(key)} is missing, the manifest says {_show(want[key])}")
        elif key not in want:
            out.append(f"{describe_key(key)} is {_show(have[key])}, the manifest has none")
        elif want[key] != have[key]:
            out.append(f"{describe_key(key)} is {_show(have[key])}, the manifest says "
                       f"{_show(want[key])}")
    return out


def _show(value: Any) -> str:
    return "none" if value is None else repr(value)


def missing_roles(p: Properties, existing: Iterable[str]) -> dict[str, list[str]]:
    """Roles `p` names that are not in `existing`, with what names them."""
    have = set(existing)
    return {r: uses for r, uses in sorted(p.roles().items()) if r not in have}


# -- IO -----------------------------------------------------------------------------


def capture(conn: psycopg.Connection[Any]) -> Properties:
    """The properties of the database `conn` is connected to."""
    row = conn.execute(CAPTURE_SQL).fetchone()
    if row is None:
        raise SourceError("the current database is not in pg_database")
    return from_row(tuple(row))


def byte_transparent(conn: psycopg.Connection[Any]) -> None:
    """Let drdaemon's own session read a SQL_ASCII database.

    There the server converts nothing and psycopg hands text back as bytes;
    as LATIN1 every byte is one character, so names read and written back
    (the count query) are the same bytes. Call before the first transaction.
    """
    if conn.info.parameter_status("server_encoding") == "SQL_ASCII":
        conn.execute("SET client_encoding TO 'LATIN1'")
        if not conn.autocommit:
            conn.commit()
