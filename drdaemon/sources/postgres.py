"""PostgreSQL: pg_dump of an exported snapshot, restored into a staging database.

The backup opens a REPEATABLE READ transaction, exports its snapshot and has
`pg_dump --snapshot` dump exactly that state while we count every table's rows
in the same snapshot, so a drill can prove a restore complete. A restore goes
into a new staging database that is renamed to the target only once the
stream has verified end to end; the target is never half-written (pg_sink.py).
"""

from __future__ import annotations

import secrets
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, BinaryIO, cast

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from ..errors import Cancelled, DrError, SourceError, first_line
from ..streams import StderrTail
from . import pg_database, pg_role_copy, pg_session
from .base import Dump
from .pg_session import child_env, describe, describe_connection, tool, with_stdio_buffer

__all__ = ["describe"]  # re-exported: drills, locks and drills.scratch name servers with it

# A table locked by someone else makes pg_dump and the row count wait this long, then fail.
LOCK_WAIT_TIMEOUT = timedelta(minutes=5)

_TABLES = """
SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1, 2
"""


def _connect(dsn: str, **kw: Any) -> psycopg.Connection[Any]:
    return pg_session.connect(dsn, **kw)


COUNT_BATCH = 500  # tables counted per statement


def _count_rows(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    # As pg_dump does: every row or an error ("query would be affected by
    # row-level security policy"), never the rows a policy lets this role see.
    conn.execute("SET row_security = off")
    tables = conn.execute(_TABLES).fetchall()
    counts: list[dict[str, Any]] = []
    # Many tables per statement: a schema of 100,000 tables is a hundred round
    # trips to the server, not 100,000. Rows come back by position, so names
    # never travel through a literal (SQL_ASCII databases stay byte-exact).
    for first in range(0, len(tables), COUNT_BATCH):
        batch = tables[first:first + COUNT_BATCH]
        query = sql.SQL(" UNION ALL ").join(
            sql.SQL("SELECT {}::int, count(*) FROM {}.{}").format(
                sql.Literal(i), sql.Identifier(schema), sql.Identifier(table))
            for i, (schema, table) in enumerate(batch))
        got = dict(conn.execute(query).fetchall())
        counts.extend({"schema": schema, "table": table, "rows": got.get(i, 0)}
                      for i, (schema, table) in enumerate(batch))
    return counts


def table_counts(dsn: str) -> list[dict[str, Any]]:
    """Exact row counts of every user table at `dsn`, in the form the manifest records."""
    with _connect(dsn, autocommit=False) as conn:
        pg_database.byte_transparent(conn)
        conn.read_only = True
        try:
            return _count_rows(conn)
        except psycopg.errors.InsufficientPrivilege as exc:
            hint = (" (the role needs BYPASSRLS or superuser, see docs/postgres-roles.md)"
                    if "row-level security" in str(exc) else "")
            raise SourceError(f"counting rows in {describe(dsn)} failed: "
                              f"{first_line(exc)}{hint}") from None
        except psycopg.Error as exc:
            raise SourceError(f"counting rows in {describe(dsn)} failed: "
                              f"{first_line(exc)}") from None


def database_properties(dsn: str) -> pg_database.Properties:
    """The database-level properties of the database at `dsn` (pg_database.capture)."""
    with _connect(dsn, autocommit=True) as conn:
        pg_database.byte_transparent(conn)
        try:
            return pg_database.capture(conn)
        except psycopg.Error as exc:
            raise SourceError(f"reading the properties of {describe(dsn)} failed: "
                              f"{first_line(exc)}") from None


@contextmanager
def dump(dsn: str, *, lock_wait_timeout: timedelta = LOCK_WAIT_TIMEOUT,
         cancel: threading.Event | None = None) -> Iterator[Dump]:
    """Dump the database at `dsn` in one consistent snapshot (see sources.base.Dump).

    pg_dump and the row count wait at most `lock_wait_timeout` for a table
    another session has locked, then fail naming the table and its holder.
    When `cancel` is set (the daemon stops), or the attempt ends any way but
    success, pg_dump is stopped and the attempt's server sessions terminated
    (pg_session.Guard): nothing of it stays waiting on the server.
    """
    pg_dump = tool("pg_dump")
    # Every session of this attempt carries this name, so that it can be ended.
    app = f"drdaemon-backup-{secrets.token_hex(6)}"
    conn = _connect(dsn, autocommit=False, application_name=app,
                    lock_timeout=lock_wait_timeout)
    where = describe_connection(conn)
    guard = pg_session.Guard(dsn, app, cancel)
    proc: subprocess.Popen[bytes] | None = None
    counter: threading.Thread | None = None
    done = False
    try:
        pg_database.byte_transparent(conn)
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        # statement_timestamp() is when this statement, which takes the
        # snapshot, began: a conservative consistency time.
        row = conn.execute(
            "SELECT pg_export_snapshot(), statement_timestamp(), "
            "current_setting('server_version'), pg_database_size(current_database()), "
            "current_database()").fetchone()
        assert row is not None
        snapshot, consistency, version, db_size, dbname = row
        database = pg_database.capture(conn).to_facts()  # in the same snapshot
        proc = subprocess.Popen(
            with_stdio_buffer([pg_dump, "--format=custom", "--compress=0",
                                f"--snapshot={snapshot}", "--no-password",
                                f"--lock-wait-timeout={pg_session.timeout_ms(lock_wait_timeout)}",
                                f"--dbname={make_conninfo(dsn, application_name=app)}"],
                               "o"),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=child_env())
        guard.procs.append(proc)
        stderr = StderrTail(proc)
        counted: dict[str, Any] = {}

        def count() -> None:
            # Counting runs alongside pg_dump in the same exported snapshot;
            # this transaction also has to stay open until pg_dump has imported it.
            # Then the roles the database names (server-wide, so not part of the
            # snapshot): also while pg_dump runs, not before it starts.
            try:
                counted["tables"] = _count_rows(conn)
                counted["roles"] = pg_role_copy.capture(
                    conn, make_conninfo(dsn, application_name=app), dbname)
            except SourceError as exc:
                counted["roles_error"] = exc
            except Exception as exc:
                counted["error"] = exc

        counter = threading.Thread(target=count, name="rowcount", daemon=True)
        counter.start()

        def failure(what: str, text: str, code: str = "") -> DrError:
            if guard.cancelled:
                return Cancelled(f"stopped by shutdown while {what} {where}")
            if pg_session.is_lock_timeout(text):
                text, code = pg_session.lock_wait_message(
                    dsn, pg_session.locked_table(text), app, lock_wait_timeout), ""
            return SourceError(f"{what} {where} failed{code}: {text}")

        def finish() -> dict[str, Any]:
            nonlocal done
            assert proc is not None and proc.stdout is not None and counter is not None
            proc.stdout.close()
            code = proc.wait()
            counter.join()
            if code != 0:
                raise failure("pg_dump of", (stderr.text() or "no message")
                              + _lock_hint(dsn, stderr.text()), f" (exit {code})")
            if "error" in counted:
                raise failure("counting rows in", first_line(counted["error"])
                              + _lock_hint(dsn, str(counted["error"])))
            if "roles_error" in counted:
                raise counted["roles_error"]
            done = True
            return {"database": database, "server_version": version,
                    "database_size": db_size, "tables": counted["tables"],
                    "globals": counted["roles"]}

        assert proc.stdout is not None
        yield Dump(cast(BinaryIO, proc.stdout), consistency, finish)
    except psycopg.Error as exc:
        raise SourceError(f"snapshot of {where} failed: {first_line(exc)}") from None
    finally:
        guard.close()
        if not done:
            # Abandoned: a failure, Ctrl-C, or a stop. pg_dump and the counting
            # session may be waiting on a lock that is never released.
            guard.abandon()
        if counter is not None:
            counter.join(pg_session.CLEANUP_CONNECT_TIMEOUT)
        conn.close()


_LOCK_ERRORS = ("out of shared memory", "max_locks_per_transaction")
_LOCKABLE = """
SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
"""


def _lock_hint(dsn: str, message: str) -> str:
    """A one-line hint when pg_dump ran out of lock slots (it locks every table at once)."""
    if not any(e in message for e in _LOCK_ERRORS):
        return ""
    try:
        with _connect(dsn, autocommit=True) as conn:
            row = conn.execute(_LOCKABLE).fetchone()
            setting = conn.execute("SHOW max_locks_per_transaction").fetchone()
    except (SourceError, psycopg.Error):
        row = setting = None
    tables = f"all {row[0]} tables" if row else "every table"
    now = f" (now {setting[0]})" if setting else ""
    # The row count holds a lock on each table too, in its own transaction.
    return (f"; hint: pg_dump locks {tables} at once and so does drdaemon's row count: "
            f"raise max_locks_per_transaction{now} on the server until it times "
            "max_connections is well over twice that, then restart PostgreSQL")
