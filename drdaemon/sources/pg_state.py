"""The cluster's shared state in PostgreSQL (`[daemon] lock_dsn`): values and logs by key.

shared_state.py defines what a state store is; this is the one that lives in
the lock database, so that whichever host is active reads what the previous
one wrote. Two tables, made on first use (docs/format.md, "Shared state in
PostgreSQL"), every row keyed by the cluster's name (`lock_name`) too, so that
several clusters can share one database:

- `drdaemon_state (cluster, key, value, updated)`: a value replaced whole;
- `drdaemon_state_lines (cluster, key, n, line)`: a log, line n = 0, 1, 2, ...

Every read-modify-write and every append runs in one transaction holding the
advisory transaction lock of `<lock_name>:state:<key>` (pg_lock.lock_key), so
two hosts never interleave them: an append reads the last line and writes the
next ones as one step, and the audit log stays one chain. One connection per
store, behind a mutex (the daemon's jobs run in threads); a lost connection is
opened again at the next use.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg

from ..errors import DrError, first_line
from .pg_lock import lock_key
from .pg_session import CONNECT_TIMEOUT, describe

# The same shapes as shared_state.Change, MakeAppend (not imported: it imports this).
Change = Callable[[bytes | None], bytes | None]
MakeAppend = Callable[[bytes, Callable[[], int]], bytes]
# What a state folder holds to import: values and logs (lines) by key.
Seed = tuple[dict[str, bytes], dict[str, list[bytes]]]

log = logging.getLogger("drdaemon")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS drdaemon_state (
  cluster text NOT NULL, key text NOT NULL, value bytea NOT NULL,
  updated timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (cluster, key));
CREATE TABLE IF NOT EXISTS drdaemon_state_lines (
  cluster text NOT NULL, key text NOT NULL, n bigint NOT NULL, line bytea NOT NULL,
  PRIMARY KEY (cluster, key, n));
"""
# No step of the shared state takes this long unless something is wrong.
STATEMENT_TIMEOUT_MS = 60_000
# The row that says the cluster state was begun (and from which state folder).
META = ".cluster/begun.json"


class PgStateStore:
    """A shared_state.StateStore in PostgreSQL for the cluster `cluster` (lock_name).

    `seed` gives what the local state folder holds: imported once, by the first
    host that uses an empty cluster state (`begin`).
    """

    def __init__(self, dsn: str, cluster: str, state_dir: str,
                 seed: Callable[[], Seed]) -> None:
        self.dsn, self.cluster, self._seed = dsn, cluster, seed
        self.state_dir = state_dir
        self._mutex = threading.RLock()
        self._conn: psycopg.Connection[Any] | None = None
        self._begun = False
        # Set by `begin`: what it imported (None: the cluster state was begun before).
        self.imported: dict[str, int] | None = None
        self.begun_by: dict[str, Any] = {}

    @property
    def where(self) -> str:
        return f"cluster state {self.cluster!r} in {describe(self.dsn)}"

    # -- the connection ---------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            try:
                # Keepalives and a statement timeout: a lost server or a stuck lock
                # holder fails a step with one line instead of hanging a job.
                self._conn = psycopg.connect(
                    self.dsn, connect_timeout=CONNECT_TIMEOUT,
                    application_name=f"drdaemon state {socket.gethostname()}"[:63],
                    keepalives=1, keepalives_idle=5, keepalives_interval=5,
                    keepalives_count=3, options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}")
            except psycopg.Error as exc:
                raise DrError(f"cannot reach the {self.where}: "
                              f"{first_line(exc, 'error')}") from None
        return self._conn

    @contextmanager
    def _tx(self, key: str | None = None) -> Iterator[psycopg.Cursor[Any]]:
        """One transaction, holding `key`'s advisory transaction lock if given."""
        with self._mutex:
            if not self._begun:
                self._begun = True
                try:
                    self.begin()
                except BaseException:
                    self._begun = False
                    raise
            conn = self._connect()
            try:
                with conn.transaction(), conn.cursor() as cur:
                    if key is not None:
                        cur.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock(key),))
                    yield cur
            except psycopg.Error as exc:
                if conn.closed or conn.broken:
                    self._conn = None
                raise DrError(f"on the {self.where}: {first_line(exc, 'error')}") from None

    def _lock(self, key: str) -> int:
        return lock_key(f"{self.cluster}:state:{key}")

    def close(self) -> None:
        """End the connection."""
        with self._mutex:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- the first use ------------------------------------------------------------------

    def begin(self) -> tuple[dict[str, int] | None, dict[str, Any]]:
        """Make the tables if missing; if this cluster's state is empty, import the local
        state folder (`seed`) in the same transaction, under the cluster-wide lock
        `<lock_name>:state`, so that two hosts starting at once import one folder.
        Returns (what was imported, None if the state was begun before; who began it)."""
        with self._mutex:
            self._begun, self.imported = True, None
            conn = self._connect()
            try:
                with conn.transaction(), conn.cursor() as cur:
                    cur.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("drdaemon:schema"),))
                    cur.execute(_SCHEMA)
                    cur.execute("SELECT pg_advisory_xact_lock(%s)",
                                (lock_key(f"{self.cluster}:state"),))
                    row = cur.execute("SELECT value FROM drdaemon_state WHERE cluster = %s AND "
                                      "key = %s", (self.cluster, META)).fetchone()
                    if row is not None:
                        self.begun_by = json.loads(bytes(row[0]))
                    else:
                        self.imported = self._import(cur)
            except psycopg.Error as exc:
                self._begun = False
                if conn.closed or conn.broken:
                    self._conn = None
                raise DrError(f"on the {self.where}: {first_line(exc, 'error')}") from None
        return self.imported, self.begun_by

    def _import(self, cur: psycopg.Cursor[Any]) -> dict[str, int]:
        values, logs = self._seed()
        for key, data in values.items():
            cur.execute("INSERT INTO drdaemon_state (cluster, key, value) VALUES (%s, %s, %s)",
                        (self.cluster, key, data))
        for key, lines in logs.items():
            cur.executemany("INSERT INTO drdaemon_state_lines (cluster, key, n, line) "
                            "VALUES (%s, %s, %s, %s)",
                            [(self.cluster, key, n, line) for n, line in enumerate(lines)])
        summary = {"values": len(values), **{key: len(lines) for key, lines in logs.items()}}
        self.begun_by = {"host": socket.gethostname(), "state_dir": self.state_dir,
                         "time": datetime.now(UTC).isoformat(), "imported": summary}
        cur.execute("INSERT INTO drdaemon_state (cluster, key, value) VALUES (%s, %s, %s)",
                    (self.cluster, META, json.dumps(self.begun_by, sort_keys=True).encode()))
        return summary

    # -- values -------------------------------------------------------------------------

    def read(self, key: str) -> bytes | None:
        with self._tx() as cur:
            row = cur.execute("SELECT value FROM drdaemon_state WHERE cluster = %s AND key = %s",
                              (self.cluster, key)).fetchone()
        return None if row is None else bytes(row[0])

    def _put(self, cur: psycopg.Cursor[Any], key: str, data: bytes) -> None:
        cur.execute("INSERT INTO drdaemon_state (cluster, key, value) VALUES (%s, %s, %s) "
                    "ON CONFLICT (cluster, key) DO UPDATE SET value = excluded.value, "
                    "updated = now()", (self.cluster, key, data))

    def write(self, key: str, data: bytes) -> None:
        with self._tx() as cur:
            self._put(cur, key, data)

    def update(self, key: str, change: Change) -> bytes | None:
        with self._tx(key) as cur:
            row = cur.execute("SELECT value FROM drdaemon_state WHERE cluster = %s AND key = %s",
                              (self.cluster, key)).fetchone()
            new = change(None if row is None else bytes(row[0]))
            if new is not None:
                self._put(cur, key, new)
        return new

    def delete(self, key: str) -> None:
        with self._tx(key) as cur:
            cur.execute("DELETE FROM drdaemon_state WHERE cluster = %s AND key = %s",
                        (self.cluster, key))
            cur.execute("DELETE FROM drdaemon_state_lines WHERE cluster = %s AND key = %s",
                        (self.cluster, key))

    # -- logs ---------------------------------------------------------------------------

    def read_log(self, key: str) -> bytes:
        with self._tx() as cur:
            rows = cur.execute("SELECT line FROM drdaemon_state_lines WHERE cluster = %s AND "
                               "key = %s ORDER BY n", (self.cluster, key)).fetchall()
        return b"".join(bytes(r[0]) for r in rows)

    def append(self, key: str, make: MakeAppend) -> None:
        with self._tx(key) as cur:
            row = cur.execute("SELECT n, line FROM drdaemon_state_lines WHERE cluster = %s AND "
                              "key = %s ORDER BY n DESC LIMIT 1", (self.cluster, key)).fetchone()
            n, last = (int(row[0]) + 1, bytes(row[1])) if row is not None else (0, b"")
            count = n
            data = make(last, lambda: count)
            lines = data.splitlines(keepends=True)
            cur.executemany("INSERT INTO drdaemon_state_lines (cluster, key, n, line) "
                            "VALUES (%s, %s, %s, %s)",
                            [(self.cluster, key, n + i, line) for i, line in enumerate(lines)])

    def children(self, folder: str) -> list[str]:
        prefix = folder.rstrip("/") + "/"
        like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        with self._tx() as cur:
            rows = cur.execute(
                "SELECT key FROM drdaemon_state WHERE cluster = %s AND key LIKE %s "
                "UNION SELECT DISTINCT key FROM drdaemon_state_lines WHERE cluster = %s "
                "AND key LIKE %s", (self.cluster, like, self.cluster, like)).fetchall()
        return sorted({str(r[0])[len(prefix):].split("/", 1)[0] for r in rows})
