"""The cluster lock's PostgreSQL session: take, watch and name the holder of an advisory lock.

Daemons on several hosts share one config and one `[daemon] lock_dsn`; the one
whose session holds the session-level advisory lock is the active one
(locks.ClusterLock). Everything that touches that session is here, behind one
mutex: jobs run in threads, and a psycopg connection serves one query at a time.

The session is configured so that a holder that vanishes is noticed quickly
on both sides: client TCP keepalives (this side learns its connection is dead),
server keepalives (the server ends the backend of a dead host, which releases
the lock), and a short statement timeout (a check never hangs).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from datetime import timedelta
from typing import Any

import psycopg

from ..errors import DrError, first_line
from .pg_session import CONNECT_TIMEOUT, describe, timeout_ms

# Who holds a key, as pg_stat_activity names it (application_name carries
# "drdaemon <host> pid <pid>", set by LockSession).
_HOLDER = """
SELECT coalesce(nullif(a.application_name, ''), 'pid ' || l.pid), l.pid,
       coalesce(host(a.client_addr), 'local')
FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted
  AND l.classid::bigint = %s AND l.objid::bigint = %s AND l.objsubid = 1
LIMIT 1
"""
# Whether this very session holds the key: the fencing check, one index-free scan
# of pg_locks (a few rows) on the already open connection.
_HOLDS = """
SELECT 1 FROM pg_locks
WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
  AND classid::bigint = %s AND objid::bigint = %s AND objsubid = 1
"""


def lock_key(name: str) -> int:
    """The signed 64-bit advisory lock key of a lock name."""
    return int.from_bytes(hashlib.sha256(f"drdaemon:{name}".encode()).digest()[:8], "big",
                          signed=True)


def _key_parts(key: int) -> tuple[int, int]:
    """pg_locks shows a bigint key as (classid, objid): its high and low 32 bits, unsigned."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return unsigned >> 32, unsigned & 0xFFFFFFFF


def application_name(role: str) -> str:
    """How this process names itself to the lock server (who holds the lock)."""
    return f"drdaemon {role} {socket.gethostname()} pid {os.getpid()}"[:63]


class LockSession:
    """One PostgreSQL session for one advisory lock name; every method is thread-safe.

    `check_every` bounds how long a dead peer goes unnoticed: the server's
    keepalives and this side's statement timeout are derived from it.
    """

    def __init__(self, dsn: str, name: str, *, role: str = "daemon",
                 check_every: timedelta = timedelta(seconds=5)) -> None:
        self.dsn, self.name = dsn, name
        self.key = lock_key(name)
        self._parts = _key_parts(self.key)
        self._mutex = threading.Lock()
        secs = max(1, int(check_every.total_seconds()))
        self._statement_timeout = f"{timeout_ms(check_every)}ms"
        try:
            self._conn: psycopg.Connection[Any] = psycopg.connect(
                dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                application_name=application_name(role),
                keepalives=1, keepalives_idle=secs, keepalives_interval=secs,
                keepalives_count=3)
            # The server side of the same: a host that vanishes without closing its
            # connection loses the lock within about 4 intervals, not hours.
            self._conn.execute(
                "SELECT set_config('tcp_keepalives_idle', %s, false),"
                " set_config('tcp_keepalives_interval', %s, false),"
                " set_config('tcp_keepalives_count', '3', false),"
                " set_config('statement_timeout', %s, false)",
                (str(secs), str(secs), self._statement_timeout))
        except psycopg.Error as exc:
            raise DrError(f"cannot reach the lock database {describe(dsn)}: "
                          f"{first_line(exc, 'error')}") from None

    def try_take(self) -> bool:
        """Take the lock if nobody holds it; whether this session holds it now."""
        with self._mutex:
            try:
                row = self._conn.execute("SELECT pg_try_advisory_lock(%s)",
                                         (self.key,)).fetchone()
            except psycopg.Error as exc:
                raise DrError(f"lost the lock database {describe(self.dsn)}: "
                              f"{first_line(exc, 'error')}") from None
            return bool(row and row[0])

    def take(self, wait: timedelta) -> bool:
        """Wait up to `wait` for the lock; whether this session holds it now."""
        with self._mutex:
            try:
                # The wait is bounded by lock_timeout alone, for this one statement.
                self._conn.execute("SELECT set_config('lock_timeout', %s, false),"
                                   " set_config('statement_timeout', '0', false)",
                                   (f"{timeout_ms(wait)}ms",))
                try:
                    self._conn.execute("SELECT pg_advisory_lock(%s)", (self.key,))
                finally:
                    self._conn.execute("SELECT set_config('lock_timeout', '0', false),"
                                       " set_config('statement_timeout', %s, false)",
                                       (self._statement_timeout,))
                return True
            except psycopg.errors.LockNotAvailable:
                return False
            except psycopg.Error as exc:
                raise DrError(f"on the lock database {describe(self.dsn)}: "
                              f"{first_line(exc, 'error')}") from None

    def holds(self) -> bool:
        """Whether this session still holds the lock (False if the connection is lost)."""
        with self._mutex:
            try:
                return self._conn.execute(_HOLDS, self._parts).fetchone() is not None
            except psycopg.Error:
                return False

    def holder(self) -> str:
        """Who holds the lock now, for a message ("nobody" if no one does)."""
        with self._mutex:
            try:
                row = self._conn.execute(_HOLDER, self._parts).fetchone()
            except psycopg.Error as exc:
                return f"unknown ({first_line(exc, 'error')})"
        if row is None:
            return "nobody"
        return f"{row[0]} (server pid {row[1]}, from {row[2]})"

    def backend_pid(self) -> int:
        """This session's server process id (what pg_locks shows)."""
        return int(self._conn.info.backend_pid)

    def close(self) -> None:
        """End the session, which releases the lock if held."""
        with self._mutex:
            self._conn.close()
