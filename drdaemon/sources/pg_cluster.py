"""A physical snapshot of a whole PostgreSQL cluster: pg_basebackup as a tar on stdout.

PostgreSQL writes a tar to standard output only for a single tablespace and
with `-X fetch` (the WAL the backup needs is fetched at its end and written
into the tar's pg_wal/), so the server must keep that WAL until the backup
ends. `wal_retention = "slot"` (the default) holds a *temporary* physical
replication slot in a session of ours for the length of the backup: the server
keeps every segment from before the backup's start, and the slot disappears
with the session, even if drdaemon is killed. `wal_retention = "wal_keep_size"`
relies on the server's `wal_keep_size` instead, which must be set (not 0); a
backup that writes more WAL than it keeps fails in pg_basebackup, and the
snapshot is never committed. Tablespaces outside the data directory are refused.

The facts (docs/format.md, "postgres-cluster"): server version, system
identifier, timeline, start and end LSN (pg_basebackup's own report, checked on
restore against backup_label and the tar's backup_manifest), the databases and
their sizes, and the WAL retention used.
"""

from __future__ import annotations

import logging
import re
import secrets
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO, cast

import psycopg
from psycopg.conninfo import make_conninfo

from ..errors import Cancelled, SourceError, first_line
from ..streams import StderrTail
from . import pg_session
from .base import Dump
from .pg_session import child_env, describe_connection, tool, with_stdio_buffer

log = logging.getLogger("drdaemon")

WAL_RETENTIONS = ("slot", "wal_keep_size")

_START = re.compile(r"write-ahead log start point: ([0-9A-F]+/[0-9A-F]+) on timeline (\d+)")
_END = re.compile(r"write-ahead log end point: ([0-9A-F]+/[0-9A-F]+)")
_LSN = re.compile(r"[0-9A-F]{1,8}/[0-9A-F]{1,8}")

_SERVER = """
SELECT current_setting('server_version'), current_setting('server_version_num')::int,
       (SELECT system_identifier::text FROM pg_control_system()),
       (SELECT rolname FROM pg_roles WHERE oid = 10),
       statement_timestamp()
"""
_TABLESPACES = """
SELECT spcname, pg_tablespace_location(oid) FROM pg_tablespace
WHERE pg_tablespace_location(oid) LIKE '/%' ORDER BY 1
"""
_DATABASES = """
SELECT datname, pg_database_size(oid) FROM pg_database
WHERE datallowconn ORDER BY 1
"""


def parse_progress(stderr: str) -> dict[str, Any]:
    """Pure: the start LSN, timeline and end LSN in pg_basebackup's verbose output."""
    out: dict[str, Any] = {}
    if m := _START.search(stderr):
        out["start_lsn"], out["timeline"] = m[1], int(m[2])
    if m := _END.search(stderr):
        out["end_lsn"] = m[1]
    return out


def lsn_value(text: str) -> int:
    """Pure: an LSN "X/Y" as a number (ValueError if it is not one)."""
    if not _LSN.fullmatch(text):
        raise ValueError(f"not an LSN: {text!r}")
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def label_start(label: str) -> str | None:
    """Pure: the START WAL LOCATION a backup_label records (None if none)."""
    m = re.search(r"^START WAL LOCATION: ([0-9A-F]+/[0-9A-F]+)", label, re.M)
    return m[1] if m else None


def _hold_wal(conn: psycopg.Connection[Any], retention: str, where: str) -> str:
    """Make the server keep the backup's WAL until the end; what was used, for the facts."""
    if retention == "slot":
        name = f"drdaemon_{secrets.token_hex(8)}"
        try:
            # Temporary: dropped when this session ends, however it ends.
            conn.execute("SELECT pg_create_physical_replication_slot(%s, true, true)", (name,))
        except psycopg.Error as exc:
            raise SourceError(
                f"cannot hold the WAL of a base backup of {where} in a temporary replication "
                f"slot: {first_line(exc)} (the role needs REPLICATION and the server a free "
                "slot, max_replication_slots; or set wal_retention = \"wal_keep_size\" with "
                "wal_keep_size set on the server, see docs/postgres-roles.md)") from None
        return "temporary replication slot"
    row = conn.execute("SELECT current_setting('wal_keep_size'), "
                       "pg_size_bytes(current_setting('wal_keep_size'))").fetchone()
    assert row is not None
    if int(row[1]) <= 0:
        raise SourceError(
            f"refusing a base backup of {where}: wal_retention = \"wal_keep_size\" but the "
            f"server's wal_keep_size is {row[0]}, so the WAL the backup needs may be removed "
            "before it is fetched: set wal_keep_size on the server, or use wal_retention = "
            "\"slot\"")
    return f"wal_keep_size = {row[0]}"


@contextmanager
def dump(dsn: str, retention: str = "slot",
         cancel: threading.Event | None = None) -> Iterator[Dump]:
    """Stream a base backup (tar) of the cluster at `dsn` (see sources.base.Dump)."""
    pg_basebackup = tool("pg_basebackup")
    app = f"drdaemon-basebackup-{secrets.token_hex(6)}"
    conn = pg_session.connect(dsn, autocommit=True, application_name=app)
    where = describe_connection(conn)
    guard = pg_session.Guard(dsn, app, cancel)
    proc: subprocess.Popen[bytes] | None = None
    done = False
    try:
        row = conn.execute(_SERVER).fetchone()
        assert row is not None
        version, version_num, system_id, superuser, consistency = row
        outside = conn.execute(_TABLESPACES).fetchall()
        if outside:
            listed = ", ".join(f"{n} ({loc})" for n, loc in outside)
            raise SourceError(f"refusing a base backup of {where}: it has tablespaces outside "
                              f"its data directory, which a tar on standard output cannot "
                              f"hold: {listed}; back this server up with another tool")
        retained = _hold_wal(conn, retention, where)
        log.info("base backup of %s: WAL held by %s", where, retained)
        proc = subprocess.Popen(
            with_stdio_buffer([pg_basebackup, "--pgdata=-", "--format=tar",
                               "--wal-method=fetch", "--checkpoint=fast", "--verbose",
                               "--no-password", f"--label=drdaemon {app}",
                               f"--dbname={make_conninfo(dsn, application_name=app)}"], "o"),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=child_env())
        guard.procs.append(proc)
        stderr = StderrTail(proc, limit=16384)

        def finish() -> dict[str, Any]:
            nonlocal done
            assert proc is not None and proc.stdout is not None
            proc.stdout.close()
            code = proc.wait()
            text = stderr.buf.decode("utf-8", "replace")
            if code != 0:
                if guard.cancelled:
                    raise Cancelled(f"stopped by shutdown while backing up {where}")
                hint = (" (the WAL the backup needed was removed before it was fetched: use "
                        "wal_retention = \"slot\" or raise wal_keep_size)"
                        if "has already been removed" in text else "")
                raise SourceError(f"pg_basebackup of {where} failed (exit {code}): "
                                  f"{stderr.text() or 'no message'}{hint}")
            progress = parse_progress(text)
            if {"start_lsn", "end_lsn"} - set(progress):
                raise SourceError(f"pg_basebackup of {where} did not report its start and "
                                  "end WAL positions")
            try:
                databases = [{"name": n, "size": int(s)}
                             for n, s in conn.execute(_DATABASES).fetchall()]
            except psycopg.Error as exc:
                hint = (" (grant the role pg_read_all_stats, see docs/postgres-roles.md)"
                        if isinstance(exc, psycopg.errors.InsufficientPrivilege) else "")
                raise SourceError(f"listing the databases of {where} failed: "
                                  f"{first_line(exc)}{hint}") from None
            done = True
            return {"server_version": version, "server_version_num": int(version_num),
                    "system_identifier": str(system_id), "bootstrap_superuser": superuser,
                    **progress, "wal_retention": retained, "databases": databases,
                    "cluster_size": sum(d["size"] for d in databases)}

        assert proc.stdout is not None
        yield Dump(cast(BinaryIO, proc.stdout), consistency, finish)
    except psycopg.Error as exc:
        raise SourceError(f"base backup of {where} failed: {first_line(exc)}") from None
    finally:
        guard.close()
        if not done:
            guard.abandon()
        conn.close()  # ends the temporary slot with the session
