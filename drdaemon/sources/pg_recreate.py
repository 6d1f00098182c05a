"""Recreating a snapshot's database-level properties on a restore's (or drill's) staging
database: what a target may lack (`Policy`) and the steps around pg_restore
(`Recreation`). The record and the SQL it becomes are pure, in pg_database.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import psycopg
from pyrage import x25519

from ..errors import DrError, SourceError, UsageError, first_line
from .pg_database import (
    Key,
    Properties,
    Step,
    apply_steps,
    comparable,
    create_statement,
    describe_key,
    differences,
    missing_roles,
    owner_step,
    unseal,
)


@dataclass
class Policy:
    """How a restore treats what the target lacks.

    Strict by default (stop, naming it). `skip_missing_roles`: apply the rest,
    owned by the restoring role where the owner is missing. `skip_missing_locale`:
    create the database with the server's default encoding and locale when the
    recorded ones cannot be created. `drill`: a drill's scratch copy: missing
    roles and privileges the drill role lacks are skipped (a drill server needs
    no application roles), anything else that fails is a difference.
    """

    skip_missing_roles: bool = False
    skip_missing_locale: bool = False
    drill: bool = False


@dataclass
class Recreation:
    """Recreating one snapshot's recorded properties on a staging database."""

    props: Properties | None
    policy: Policy = field(default_factory=Policy)
    notes: list[str] = field(default_factory=list)
    skipped: dict[Key, str] = field(default_factory=dict)  # key -> why
    failures: list[str] = field(default_factory=list)  # drill: steps that failed
    _absent: set[str] = field(default_factory=set)
    _set_owner: bool = True

    @classmethod
    def from_facts(cls, facts: Any, policy: Policy | None = None,
                   identities: Sequence[x25519.Identity] = ()) -> Recreation:
        """From a manifest's `facts["database"]`, its settings opened with `identities`;
        DrError if it cannot be read, UsageError if no identity fits."""
        try:
            props = Properties.from_facts(unseal(facts, identities))
        except ValueError as exc:
            raise DrError(f"the snapshot's database properties cannot be read: {exc}") from None
        rec = cls(props, policy or Policy())
        if props is None:
            rec.notes.append("the snapshot records no database properties (taken by an older "
                             "drdaemon): encoding, collation, owner, settings, comment and "
                             "privileges are the target server's defaults")
        return rec

    def create(self, conn: psycopg.Connection[Any], staging: str) -> None:
        """Check the roles the properties need, then CREATE DATABASE `staging` with them."""
        p = self.props
        if p is not None:
            self._check_roles(conn, p)
        version = conn.info.server_version
        try:
            conn.execute(create_statement(p, staging, version))
            return
        except psycopg.Error as exc:
            if p is None or not isinstance(exc, _LOCALE_ERRORS):
                raise SourceError(f"cannot create the staging database: "
                                  f"{first_line(exc)}") from None
            wanted = (f"encoding {p.encoding}, collation {p.collate}, ctype {p.ctype}, "
                      f"{p.locale_provider} locale provider"
                      + (f", locale {p.icu_locale}" if p.icu_locale else ""))
            if self.policy.drill:
                raise SourceError(f"the drill server cannot create a database with {wanted}: "
                                  f"{first_line(exc)}") from None
            if not self.policy.skip_missing_locale:
                raise UsageError(f"the target server cannot create a database with {wanted} "
                                 f"({first_line(exc)}); install the locale there, or pass "
                                 "--skip-missing-locale to use the server's defaults") from None
        try:
            conn.execute(create_statement(p, staging, version, with_locale=False))
        except psycopg.Error as exc:
            raise SourceError(f"cannot create the staging database: "
                              f"{first_line(exc)}") from None
        for key in ("encoding", "collate", "ctype", "locale_provider", "icu_locale"):
            self.skipped[(key,)] = "unavailable on the target server"
        self.notes.append(f"skipped {wanted}: the target server cannot create it; the database "
                          "has the server's default encoding and locale (sort order may differ)")

    def _check_roles(self, conn: psycopg.Connection[Any], p: Properties) -> None:
        try:
            rows = conn.execute("SELECT rolname::text FROM pg_roles WHERE rolname = ANY(%s)",
                                (list(p.roles()),)).fetchall()
        except psycopg.Error as exc:
            raise SourceError(f"cannot list the target's roles: {first_line(exc)}") from None
        missing = missing_roles(p, (r[0] for r in rows))
        if not missing:
            return
        listed = ", ".join(f"{r} ({', '.join(u)})" for r, u in missing.items())
        if not (self.policy.skip_missing_roles or self.policy.drill):
            raise UsageError(f"the target server lacks role(s) the database needs: {listed}; "
                             "create them, or pass --skip-missing-roles to restore without them")
        self._absent = set(missing)
        self._set_owner = p.owner not in missing
        self.notes.append(f"skipped what names role(s) missing on the target: {listed}")

    def apply(self, conn: psycopg.Connection[Any], db: str) -> None:
        """Recreate owner, privileges, settings, comment and connection limit on `db`."""
        if self.props is None:
            return
        if not self._set_owner:
            self.skipped[("owner",)] = f"role {self.props.owner} is missing"
        else:
            self._run(conn, owner_step(self.props, db))
        owned = ("owner",) not in self.skipped
        for step in apply_steps(self.props, db, owned):
            absent = [r for r in step.roles if r in self._absent]
            if absent:
                for key in step.keys:
                    self.skipped[key] = f"role {', '.join(absent)} is missing"
                continue
            self._run(conn, step)

    def _run(self, conn: psycopg.Connection[Any], step: Step) -> None:
        try:
            for stmt in step.statements:
                conn.execute(stmt)
        except psycopg.Error as exc:
            denied = isinstance(exc, psycopg.errors.InsufficientPrivilege)
            if not self.policy.drill and denied:
                # About the target, not the copy: no other region would help.
                raise UsageError(f"the restoring role may not recreate the database's "
                                 f"{step.what}: {first_line(exc)} (docs/postgres-roles.md)"
                                 ) from None
            if not self.policy.drill:
                raise SourceError(f"cannot recreate the database's {step.what}: "
                                  f"{first_line(exc)}") from None
            with suppress(psycopg.Error):
                conn.execute("RESET ROLE")
            if denied:
                for key in step.keys:
                    self.skipped[key] = f"the drill role may not: {first_line(exc)}"
                self.notes.append(f"database {step.what} not recreated: the drill role "
                                  f"may not ({first_line(exc)})")
            else:
                self.failures.append(f"{step.what} could not be recreated: {first_line(exc)}")
                for key in step.keys:
                    self.skipped[key] = "failed (reported)"

    def differences(self, got: Properties) -> list[str]:
        """How the recreated database differs from the record (failed steps included)."""
        if self.props is None:
            return []
        return [*self.failures, *differences(self.props, got, self.skipped)]

    def evidence(self) -> dict[str, Any]:
        """What a drill record says it compared and skipped."""
        if self.props is None:
            return {"recorded": False}
        keys = sorted(comparable(self.props))
        skip = tuple(self.skipped)
        return {"recorded": True,
                "compared": [describe_key(k) for k in keys
                             if not any(k[:len(s)] == s for s in skip)],
                "skipped": {describe_key(k): why for k, why in sorted(self.skipped.items())}}


# CREATE DATABASE's complaints about an encoding or locale the server cannot use.
_LOCALE_ERRORS = (psycopg.errors.InvalidParameterValue, psycopg.errors.WrongObjectType,
                  psycopg.errors.FeatureNotSupported, psycopg.errors.CharacterNotInRepertoire,
                  psycopg.errors.UndefinedObject, psycopg.errors.InternalError_)
