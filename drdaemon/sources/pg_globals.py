"""The server's roles that a database needs, from `pg_dumpall --globals-only`. Pure.

A logical snapshot names roles it does not contain: the owners of its objects,
the grantees of its privileges. `parse` reads the SQL pg_dumpall writes into
statements per role and role memberships; `keep` narrows them to the roles a
database needs (and the roles that are members of those: the logins that use
it), so that a snapshot of one tenant's database never carries another
tenant's roles; `render` writes them back as SQL that psql runs as it is
(break-glass); `plan` decides, against the roles a target already has, which
to create and which memberships to grant: existing roles are left alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

_IDENT = r'"(?:[^"]|"")*"|[A-Za-z_][A-Za-z0-9_$]*'
_ROLE_STATEMENT = re.compile(
    rf"^(?:CREATE ROLE|ALTER ROLE|COMMENT ON ROLE|SECURITY LABEL FOR (?:{_IDENT}) ON ROLE)"
    rf"\s+({_IDENT})(?=\s|$)", re.S)
_GRANT = re.compile(
    rf"^GRANT\s+({_IDENT})\s+TO\s+({_IDENT})(\s+WITH ADMIN OPTION)?"
    rf"(?:\s+WITH INHERIT (?:TRUE|FALSE))?(?:\s+WITH SET (?:TRUE|FALSE))?"
    rf"(?:\s+GRANTED BY\s+(?:{_IDENT}))?$", re.S)
_BARE = re.compile(r"[a-z_][a-z0-9_$]*")


@dataclass(frozen=True)
class Membership:
    """`member` is a member of `role` (GRANT role TO member)."""

    role: str
    member: str
    admin: bool = False

    def statement(self) -> str:
        admin = " WITH ADMIN OPTION" if self.admin else ""
        return f"GRANT {quote(self.role)} TO {quote(self.member)}{admin}"


@dataclass
class Globals:
    """Roles (their statements, in pg_dumpall's order) and memberships."""

    roles: dict[str, list[str]] = field(default_factory=dict)
    memberships: list[Membership] = field(default_factory=list)


@dataclass
class Plan:
    """What `--with-roles` does on a target: statements to run in one transaction."""

    create: list[str] = field(default_factory=list)  # roles created, in order
    existing: list[str] = field(default_factory=list)  # roles the target has: left alone
    grants: list[Membership] = field(default_factory=list)
    skipped_grants: list[Membership] = field(default_factory=list)  # a side is missing

    def statements(self, roles: Globals) -> list[str]:
        out = [s for name in self.create for s in roles.roles[name]]
        return out + [g.statement() for g in self.grants]


def quote(name: str) -> str:
    """A role name as an SQL identifier (quoted unless plainly lower case)."""
    if _BARE.fullmatch(name):
        return name
    return '"' + name.replace('"', '""') + '"'


def unquote(ident: str) -> str:
    """An identifier as pg_dumpall wrote it -> the role name (bare ones are lower case)."""
    if ident.startswith('"'):
        return ident[1:-1].replace('""', '"')
    return ident.lower()


def statements(text: str) -> list[str]:
    """SQL statements of a script, without comments and psql meta-commands (\\restrict)."""
    out: list[str] = []
    buf: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "'\"":  # a literal or an identifier; doubled quotes stay inside
            j = i + 1
            while j < n:
                if text[j] == c:
                    if j + 1 < n and text[j + 1] == c:
                        j += 2
                        continue
                    break
                j += 1
            buf.append(text[i:j + 1])
            i = j + 1
        elif (c == "-" and text.startswith("--", i)) or (c == "\\" and not "".join(buf).strip()):
            # a comment, or a psql meta-command on a line of its own: to the line's end
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif c == ";":
            stmt = "".join(buf).strip()
            if stmt:
                out.append(stmt)
            buf = []
            i += 1
        else:
            buf.append(c)
            i += 1
    return out


def parse(text: str) -> Globals:
    """The role statements and memberships of a `pg_dumpall --globals-only` script.

    Session settings, tablespaces and per-database role settings (`IN DATABASE`:
    the restore recreates those with the database) are left out.
    """
    out = Globals()
    for stmt in statements(text):
        if m := _ROLE_STATEMENT.match(stmt):
            if re.match(rf"^ALTER ROLE\s+(?:{_IDENT})\s+IN DATABASE\b", stmt, re.S):
                continue
            out.roles.setdefault(unquote(m.group(1)), []).append(stmt + ";")
        elif m := _GRANT.match(stmt):
            out.memberships.append(Membership(unquote(m.group(1)), unquote(m.group(2)),
                                              bool(m.group(3))))
    return out


def keep(roles: Globals, needed: Iterable[str]) -> Globals:
    """The roles `needed` (those of them the server has) and, transitively, their members;
    the memberships of every role kept."""
    wanted = {r for r in needed if r in roles.roles}
    grew = True
    while grew:
        more = {g.member for g in roles.memberships
                if g.role in wanted and g.member in roles.roles} - wanted
        wanted |= more
        grew = bool(more)
    return Globals({n: list(s) for n, s in roles.roles.items() if n in wanted},
                   [g for g in roles.memberships if g.member in wanted])


def render(roles: Globals) -> str:
    """SQL psql runs as it is: every role's statements, then the memberships."""
    lines = [s for stmts in roles.roles.values() for s in stmts]
    lines += [g.statement() + ";" for g in roles.memberships]
    return "\n".join(lines) + "\n"


def plan(roles: Globals, existing: Iterable[str]) -> Plan:
    """Create the roles the target lacks; grant each membership of a created role whose
    other side exists (then); leave the target's own roles and their memberships alone."""
    have = set(existing)
    out = Plan()
    for name in roles.roles:
        (out.existing if name in have else out.create).append(name)
    created = set(out.create)
    after = have | created
    for g in roles.memberships:
        if g.role not in created and g.member not in created:
            continue
        (out.grants if g.role in after and g.member in after else out.skipped_grants).append(g)
    return out
