"""PostgreSQL: pg_dump of an exported snapshot, restored into a staging database.

The backup opens a REPEATABLE READ transaction, exports its snapshot and has
`pg_dump --snapshot` dump exactly that state while we count every table's rows
in the same snapshot, so a drill can prove a restore complete. A restore goes
into a new staging database that is renamed to the target only once the
stream has verified end to end; the target is never half-written.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO, cast

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ..errors import Cancelled, DrError, SourceError, UsageError, first_line
from ..streams import BackgroundWriter, StderrTail
from . import pg_database, pg_recreate, pg_session
from .base import Dump
from .pg_session import child_env, describe, describe_connection

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
_USER_RELATIONS = """
SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
"""


def _connect(dsn: str, **kw: Any) -> psycopg.Connection[Any]:
    return pg_session.connect(dsn, **kw)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise SourceError(f"{name} is not installed (Debian: apt-get install postgresql-client)")
    return path


# pg_dump and pg_restore move the dump through stdio, which buffers a pipe in
# 4 KiB pieces: some 600,000 writes by pg_dump and as many reads by us per 2.4 GB
# dump, and as many again between us and pg_restore. coreutils' stdbuf gives
# their stdout/stdin a 1 MiB buffer instead (measured on the dump side: 612,260
# writes became 2,404, ~2 CPU-s less per 2.4 GB); without stdbuf, plain stdio.
STDIO_BUFFER = "1M"


def _with_stdio_buffer(argv: list[str], stream: str) -> list[str]:
    """`argv` run with a 1 MiB stdio buffer on its stdout ("o") or stdin ("i")."""
    stdbuf = shutil.which("stdbuf")
    return [stdbuf, f"-{stream}{STDIO_BUFFER}", *argv] if stdbuf else argv


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
    pg_dump = _tool("pg_dump")
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
        snapshot, consistency, version, db_size, _ = row
        database = pg_database.capture(conn).to_facts()  # in the same snapshot
        proc = subprocess.Popen(
            _with_stdio_buffer([pg_dump, "--format=custom", "--compress=0",
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
            try:
                counted["tables"] = _count_rows(conn)
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
            done = True
            return {"database": database, "server_version": version,
                    "database_size": db_size, "tables": counted["tables"]}

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


def target_dsn(source_dsn: str, target: str) -> str:
    """TARGET as a DSN: itself if it is one, else a database on the source's server."""
    if "=" in target or target.startswith(("postgres://", "postgresql://")):
        try:
            params = conninfo_to_dict(target)
        except psycopg.Error:
            raise UsageError("restore target is not a valid DSN") from None
        if not params.get("dbname"):
            raise UsageError("restore target DSN names no database (dbname=...)")
        if "password" in params:
            # pg_restore would carry it on its command line, readable by every
            # local user in /proc/PID/cmdline. Never echoed.
            raise UsageError("the restore target must not contain a password: use PGPASSFILE "
                             "or a service file (pg_service.conf) for the target's password")
        return target
    if not target or len(target.encode()) > 63 or "\0" in target:
        raise UsageError(f"invalid database name {target!r}: 1-63 bytes expected")
    return make_conninfo(source_dsn, dbname=target)


def unnamed_file(folder: Path) -> int:
    """A new 0600 file in `folder` that has no name: an open descriptor only.

    For plaintext scratch copies: whatever ends the process, even SIGKILL, the
    kernel frees the file with its last descriptor, and nobody can open it by
    name meanwhile. O_TMPFILE where the filesystem has it, otherwise a
    private temporary file unlinked at once.
    """
    tmpfile = getattr(os, "O_TMPFILE", 0)  # Linux only
    if tmpfile:
        try:
            return os.open(folder, tmpfile | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
    fd, name = tempfile.mkstemp(prefix="drdaemon-restore-", dir=folder)
    os.unlink(name)
    return fd


class PostgresSink:
    """pg_restore into a fresh staging database, renamed to the target on commit.

    By default pg_restore reads the dump from its stdin as it streams in. With
    `jobs`, pg_restore needs a seekable file: the dump is written to a private
    0600 file in `scratch_dir` and `pg_restore --jobs` runs on it in `complete()`,
    i.e. only after the stream verified; the file is removed afterwards whatever
    happens (complete, commit or discard).
    """

    def __init__(self, source_dsn: str, target: str, force: bool, *,
                 staging_prefix: str = "drdaemon_restore_",
                 restore_options: Sequence[str] = (), jobs: int | None = None,
                 scratch_dir: Path | None = None, size_hint: int = 0,
                 recreate: pg_recreate.Recreation | None = None) -> None:
        # Drills never commit: they verify the staging database itself and drop
        # it, under their own prefix, restored with their own pg_restore options.
        self.dsn = target_dsn(source_dsn, target)
        self.name = str(conninfo_to_dict(self.dsn)["dbname"])
        self.admin_dsn = make_conninfo(self.dsn, dbname="postgres")
        self.staging = f"{staging_prefix}{secrets.token_hex(6)}"
        self.staging_dsn = make_conninfo(self.dsn, dbname=self.staging)
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr: StderrTail | None = None
        self._feed: BackgroundWriter | None = None
        # The snapshot's database properties (owner, locale, settings, ACL...).
        self.recreate = recreate or pg_recreate.Recreation(None)
        self.notes: list[str] = self.recreate.notes
        self.jobs = jobs
        self.dump_fd: int | None = None  # the --jobs scratch copy, see unnamed_file
        self.command = [_tool("pg_restore"), "--exit-on-error", "--no-password",
                        *restore_options, f"--dbname={self.staging_dsn}"]
        if jobs is not None and scratch_dir is None:
            raise UsageError("pg_restore --jobs needs a scratch folder")
        self.target_exists = self._check_target(force)
        with _connect(self.admin_dsn, autocommit=True) as conn:
            try:
                self.recreate.create(conn, self.staging)
            except (SourceError, UsageError) as exc:
                # Which server refused matters as much as why (a DSN resolved by libpq).
                raise type(exc)(f"on {describe_connection(conn)}: {exc}") from None
        try:
            if jobs is not None:
                assert scratch_dir is not None
                self.writer = self._open_dump_file(scratch_dir, size_hint)
                return
            self.proc = subprocess.Popen(
                _with_stdio_buffer(self.command, "i"), stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env())
        except BaseException:
            self.discard()
            raise
        self.stderr = StderrTail(self.proc)
        assert self.proc.stdin is not None
        # Fed from a thread: decrypting the next chunk overlaps pg_restore
        # taking the last one, as in a shell pipeline of separate processes.
        self._feed = BackgroundWriter(cast(BinaryIO, self.proc.stdin), name="pg_restore-feed")
        self.writer = cast(BinaryIO, self._feed)

    def _open_dump_file(self, scratch_dir: Path, size_hint: int) -> BinaryIO:
        try:
            scratch_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            free = shutil.disk_usage(scratch_dir).free
            if free < size_hint:
                raise UsageError(
                    f"scratch folder {scratch_dir} has {free >> 20} MiB free, the dump needs "
                    f"{size_hint >> 20} MiB: choose another with --scratch-dir")
            fd = unnamed_file(scratch_dir)
        except OSError as exc:
            raise UsageError(f"cannot create a scratch file in {scratch_dir}: "
                             f"{exc.strerror or exc}") from None
        self.dump_fd = fd
        # Written from a thread: the disk keeps pace while the stream decrypts.
        return cast(BinaryIO, BackgroundWriter(os.fdopen(os.dup(fd), "wb", buffering=1 << 20),
                                               name="scratch-writer"))

    def _close_dump_file(self) -> None:
        """Close the scratch copy: with its last descriptor the kernel frees it."""
        if self.dump_fd is not None:
            with suppress(OSError):
                self.writer.close()
            os.close(self.dump_fd)
            self.dump_fd = None

    def _admin(self, query: sql.Composed | sql.SQL, params: tuple[Any, ...] = ()) -> list[Any]:
        with _connect(self.admin_dsn, autocommit=True) as conn:
            try:
                cur = conn.execute(query, params)
                return cur.fetchall() if cur.description else []
            except psycopg.Error as exc:
                raise SourceError(f"on {describe_connection(conn)}: "
                                  f"{first_line(exc)}") from None

    def _check_target(self, force: bool) -> bool:
        rows = self._admin(sql.SQL("SELECT 1 FROM pg_database WHERE datname = %s"), (self.name,))
        if not rows:
            return False
        with _connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(_USER_RELATIONS).fetchone()
        if row and row[0] and not force:
            raise UsageError(f"database {self.name!r} exists and is not empty; "
                             "use --force to replace it")
        return True

    def complete(self) -> None:
        if self.jobs is not None:
            self._restore_file()
            self._recreate_properties()
            return
        assert self.proc is not None and self.stderr is not None
        with suppress(BrokenPipeError):
            self.writer.close()
        code = self.proc.wait()
        if code != 0:
            raise SourceError(f"pg_restore into {self.name!r} failed (exit {code}): "
                              f"{self.stderr.text() or 'no message'}")
        self._recreate_properties()

    def _recreate_properties(self) -> None:
        """The snapshot's database properties, once pg_restore has finished.

        From inside the database, as pg_dump --create does: PostgreSQL keeps a
        comment or setting in the encoding of the database it was set from.
        """
        with _connect(self.staging_dsn, autocommit=True) as conn:
            pg_database.byte_transparent(conn)
            self.recreate.apply(conn, self.staging)

    def _restore_file(self) -> None:
        """pg_restore --jobs from the verified scratch copy, which is freed afterwards.

        pg_restore and its workers open the copy as /proc/self/fd/N, the
        descriptor they inherit: it has no name anyone else could open.
        """
        assert self.dump_fd is not None
        try:
            self.writer.close()
            self.proc = subprocess.Popen(
                [*self.command, f"--jobs={self.jobs}", f"/proc/self/fd/{self.dump_fd}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                pass_fds=(self.dump_fd,), env=child_env())
            self.stderr = StderrTail(self.proc)
            code = self.proc.wait()
        except OSError as exc:
            raise SourceError(f"restoring into {self.name!r} from the scratch copy: "
                              f"{exc.strerror or exc}") from None
        finally:
            self._close_dump_file()
        if code != 0:
            raise SourceError(f"pg_restore into {self.name!r} failed (exit {code}): "
                              f"{self.stderr.text() or 'no message'}")

    def commit(self) -> str:
        self._close_dump_file()
        if self.target_exists:
            self._admin(sql.SQL("DROP DATABASE {}").format(sql.Identifier(self.name)))
        self._admin(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
            sql.Identifier(self.staging), sql.Identifier(self.name)))
        return describe(self.dsn)

    def discard(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._feed is not None:
            with suppress(OSError):  # the feeding thread ends on the closed pipe
                self._feed.close()
        self._close_dump_file()
        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(self.staging)))
