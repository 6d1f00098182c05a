"""PostgreSQL sessions: which server they reach, how long they wait for locks, how they end.

Three jobs around libpq connections that the dump and restore code share:
naming the server libpq really used (after service files, sockets and
defaults are resolved, never a password); bounding lock waits and saying who
holds the lock; and ending every server session and child process of an
attempt that is abandoned (a failure, Ctrl-C, or the daemon stopping), so
nothing stays waiting on the server after drdaemon has moved on.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ..errors import SourceError, first_line
from ..units import format_duration

CONNECT_TIMEOUT = 30
# The separate session that ends an abandoned attempt's sessions: quick, or not at all.
CLEANUP_CONNECT_TIMEOUT = 10
# A child asked to stop (SIGTERM) is killed (SIGKILL) if still running after this.
STOP_WAIT = 3.0
# Children (pg_dump, pg_restore) see only these variables: libpq's own (PG*),
# what a program needs to run, and never the storage credentials.
CHILD_ENV_NAMES = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "USER", "LOGNAME")
CHILD_ENV_PREFIXES = ("PG", "LC_")


def child_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a PostgreSQL client program: no AWS/S3 or other secrets."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items()
            if k in CHILD_ENV_NAMES or k.startswith(CHILD_ENV_PREFIXES)}


# -- naming the server --------------------------------------------------------


def render(*, host: str | None, port: str | None, dbname: str | None, user: str | None,
           service: str | None = None) -> str:
    """A libpq URI naming a server and database (no password), e.g. for messages.

    A unix socket folder is given as libpq's `host` query parameter
    (postgres:///db?host=/run/postgresql&port=5432), never glued to the port.
    """
    who = f"{user}@" if user else ""
    if host and not host.startswith("/") and "," not in host:
        shown = f"[{host}]" if ":" in host else host
        uri = f"postgres://{who}{shown}{':' + port if port else ''}/{dbname or ''}"
    else:
        query = "&".join(f"{k}={v}" for k, v in (("host", host), ("port", port)) if v)
        uri = f"postgres://{who}/{dbname or ''}{'?' + query if query else ''}"
    return f"{uri} (service {service})" if service else uri


def describe(dsn: str) -> str:
    """A DSN for messages, as written: host, port, database, user; never a password.

    Before a connection exists this is all we know; once one does, prefer
    :func:`describe_connection` (what libpq resolved from services and defaults).
    """
    try:
        p = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "(unparseable DSN)"
    host = p.get("host") or p.get("hostaddr")
    if p.get("service") and not host:
        db = f", database {p['dbname']}" if p.get("dbname") else ""
        return f"service {p['service']}{db}"
    return render(host=str(host) if host else None, port=_str(p.get("port")),
                  dbname=_str(p.get("dbname")), user=_str(p.get("user")),
                  service=_str(p.get("service")))


def _str(value: Any) -> str | None:
    return str(value) if value else None


def _text(value: bytes | None) -> str | None:
    return value.decode(errors="replace") if value else None


def describe_pgconn(pgconn: Any, dbname: str | None = None) -> str | None:
    """What libpq used for a (possibly failed) connection; None if it cannot tell.

    `dbname` replaces the connection's database (e.g. the admin session of a restore
    naming its target).
    """
    try:
        service = next((_text(o.val) for o in pgconn.info if o.keyword == b"service"), None)
        return render(host=_text(pgconn.host), port=_text(pgconn.port),
                      dbname=dbname or _text(pgconn.db), user=_text(pgconn.user),
                      service=service)
    except (psycopg.Error, AttributeError):
        return None


def describe_connection(conn: psycopg.Connection[Any], dbname: str | None = None) -> str:
    """The server and database `conn` reached, as libpq resolved them."""
    return describe_pgconn(conn.pgconn, dbname) or "(closed connection)"


def connect(dsn: str, *, lock_timeout: timedelta | None = None,
            **kw: Any) -> psycopg.Connection[Any]:
    """Connect, or raise SourceError naming the server libpq tried.

    `lock_timeout`: this session waits at most that long for any lock, then
    its statement fails (LockNotAvailable) instead of hanging.
    """
    kw.setdefault("connect_timeout", CONNECT_TIMEOUT)
    try:
        conn = psycopg.connect(dsn, **kw)
    except psycopg.Error as exc:
        where = describe_pgconn(getattr(exc, "pgconn", None)) or describe(dsn)
        raise SourceError(f"cannot connect to {where}: {first_line(exc)}") from None
    if lock_timeout is not None:
        try:
            conn.execute("SELECT set_config('lock_timeout', %s, false)",
                         (f"{timeout_ms(lock_timeout)}ms",))
            if not conn.autocommit:
                conn.commit()
        except psycopg.Error as exc:
            conn.close()
            raise SourceError(f"on {describe(dsn)}: {first_line(exc)}") from None
    return conn


def timeout_ms(timeout: timedelta) -> int:
    """A lock timeout in milliseconds; never 0, which PostgreSQL reads as "wait forever"."""
    return max(1, int(timeout.total_seconds() * 1000))


# -- who holds the lock ---------------------------------------------------------

_LOCK_HOLDERS = """
SELECT format('%%I.%%I', n.nspname, c.relname), l.pid, coalesce(a.application_name, ''),
       coalesce(a.usename::text, ''), l.mode
FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE l.locktype = 'relation' AND l.granted AND l.mode = 'AccessExclusiveLock'
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.pid IS DISTINCT FROM pg_backend_pid()
  AND (%(table)s::text IS NULL OR l.relation = to_regclass(%(table)s::text))
  AND coalesce(a.application_name, '') <> %(ours)s
ORDER BY 1, 2
"""
# pg_dump's own words when a lock wait timed out: "Query was: LOCK TABLE s.t IN ACCESS SHARE MODE"
_LOCK_QUERY = re.compile(r"LOCK TABLE (.+?) IN ACCESS SHARE MODE")


@dataclass(frozen=True)
class LockHolder:
    """A session holding a lock that keeps a dump from reading a table."""

    table: str
    pid: int | None  # None: a prepared transaction
    application: str
    user: str
    mode: str

    def __str__(self) -> str:
        who = (f"pid {self.pid} (application {self.application or '(none)'!r}, "
               f"user {self.user or '?'})" if self.pid is not None
               else "a prepared transaction")
        return f"table {self.table} is locked ({self.mode}) by {who}"


def locked_table(pg_dump_stderr: str) -> str | None:
    """The table pg_dump gave up waiting for, from its error message."""
    m = _LOCK_QUERY.search(pg_dump_stderr)
    return m.group(1) if m else None


def is_lock_timeout(text: str) -> bool:
    """Whether a PostgreSQL error text says a lock (or pg_dump's lock wait) timed out."""
    return "due to lock timeout" in text or (
        "due to statement timeout" in text and locked_table(text) is not None)


def lock_holders(dsn: str, table: str | None, ours: str) -> list[LockHolder]:
    """Sessions holding ACCESS EXCLUSIVE on `table` (any table if None), not ours.

    Asked from a separate, short session; [] if that is impossible: the
    message then simply names no holder.
    """
    try:
        with psycopg.connect(dsn, connect_timeout=CLEANUP_CONNECT_TIMEOUT,
                             autocommit=True) as conn:
            conn.execute("SET statement_timeout = '10s'")
            rows = conn.execute(_LOCK_HOLDERS, {"table": table, "ours": ours}).fetchall()
    except psycopg.Error:
        return []
    return [LockHolder(r[0], r[1], r[2], r[3], r[4]) for r in rows]


def lock_wait_message(dsn: str, table: str | None, ours: str, timeout: timedelta) -> str:
    """One line: which table could not be locked within `timeout`, and who holds it."""
    holders = lock_holders(dsn, table, ours)
    waited = f"waited longer than lock_wait_timeout ({format_duration(timeout)})"
    if holders:
        return f"{waited}: " + "; ".join(str(h) for h in holders)
    what = f"table {table}" if table else "a table"
    return f"{waited} for a lock on {what} (no other session holds it now)"


# -- ending an abandoned attempt ------------------------------------------------


def stop_process(proc: subprocess.Popen[bytes], wait: float = STOP_WAIT) -> None:
    """Ask a child to stop (SIGTERM), kill it if it has not after `wait` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def end_sessions(dsn: str, application_name: str) -> int:
    """Terminate every server session named `application_name`; how many ended.

    From a separate session: a backend waiting on a lock notices neither its
    client's death nor a closed socket until the lock is granted, which may be
    never. Best effort: a server that cannot be reached ends them itself.
    """
    try:
        with psycopg.connect(dsn, connect_timeout=CLEANUP_CONNECT_TIMEOUT,
                             autocommit=True) as conn:
            conn.execute("SET statement_timeout = '10s'")
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s AND pid <> pg_backend_pid()",
                (application_name,)).fetchall()
    except psycopg.Error:
        return 0
    return sum(1 for r in rows if r[0])


class Guard:
    """Ends an attempt's child process and server sessions if it is abandoned.

    Every session of the attempt carries `application_name`. A thread watches
    `cancel` (the daemon's stopping event): a pg_dump blocked on a lock makes
    no progress, so nothing else would notice the stop. :meth:`abandon` is
    also called directly when the attempt ends any other way than success.
    """

    def __init__(self, dsn: str, application_name: str,
                 cancel: threading.Event | None = None) -> None:
        self.dsn = dsn
        self.application_name = application_name
        self.cancel = cancel
        self.procs: list[subprocess.Popen[bytes]] = []
        self.cancelled = False  # the stop came from `cancel`
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._ended = False
        self._thread: threading.Thread | None = None
        if cancel is not None:
            self._thread = threading.Thread(target=self._watch, name="pg-guard", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        assert self.cancel is not None
        while not self._done.wait(0.2):
            if self.cancel.is_set():
                self.cancelled = True
                self.abandon()
                return

    def abandon(self) -> None:
        """Stop the children, then terminate the attempt's server sessions (once)."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
        for proc in self.procs:
            stop_process(proc)
        end_sessions(self.dsn, self.application_name)

    def close(self) -> None:
        """The attempt is over: stop watching."""
        self._done.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()


def tool(name: str) -> str:
    """The path of a PostgreSQL client program (SourceError if it is not installed)."""
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


def with_stdio_buffer(argv: list[str], stream: str) -> list[str]:
    """`argv` run with a 1 MiB stdio buffer on its stdout ("o") or stdin ("i")."""
    stdbuf = shutil.which("stdbuf")
    return [stdbuf, f"-{stream}{STDIO_BUFFER}", *argv] if stdbuf else argv


def database_identity(dsn: str) -> tuple[str, str, str]:
    """(host, port, dbname) of a libpq DSN: two sources on one database compare equal.

    A service name stands for its host; libpq's defaults fill what is not given.
    """
    params = {k: str(v) for k, v in parse_dsn(dsn).items()}
    host = params.get("host") or params.get("hostaddr") or ""
    if not host and "service" in params:
        host = "service:" + params["service"]
    host = host.lower()
    if host in ("127.0.0.1", "::1"):
        host = "localhost"
    dbname = params.get("dbname") or params.get("user") or ""
    return host, params.get("port") or "5432", dbname


def parse_dsn(value: str) -> dict[str, Any]:
    """The parameters of a libpq DSN; ValueError("not a valid DSN") that never echoes it
    (psycopg's own message may, and with it a password)."""
    try:
        return conninfo_to_dict(value)
    except Exception:
        raise ValueError("not a valid DSN") from None
