"""Reading a hot standby's replication from both ends: the primary's
`pg_stat_replication` and WAL position, the standby's replay position and time.

Plain readings only; standby.py judges them (lag, presence, a replay that stopped).
The primary's role needs `pg_monitor` (or superuser) to see pg_stat_replication's
state; the standby's role needs nothing beyond CONNECT.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from ..errors import first_line
from .pg_session import describe

CONNECT_TIMEOUT = 5  # a poll every few seconds: a dead server must not hold it up

_STANDBY = """
SELECT pg_is_in_recovery(),
  (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint,
  (pg_last_wal_receive_lsn() - '0/0'::pg_lsn)::bigint,
  pg_last_xact_replay_timestamp(), now(),
  CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END,
  coalesce(nullif(current_setting('cluster_name'), ''), 'walreceiver')
"""
_PRIMARY = """
SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint,
  (SELECT state FROM pg_stat_replication WHERE application_name = %s
   ORDER BY state = 'streaming' DESC, backend_start DESC LIMIT 1)
"""


@dataclass(frozen=True)
class Reading:
    """One poll of a standby and its primary; an error says which end failed and why
    (never a password)."""

    standby_error: str | None = None
    in_recovery: bool = False
    replay_lsn: int | None = None  # bytes from 0/0
    receive_lsn: int | None = None
    replay_time: datetime | None = None  # commit time of the last replayed transaction
    standby_now: datetime | None = None
    paused: bool = False
    application_name: str | None = None
    primary_error: str | None = None
    primary_lsn: int | None = None
    state: str | None = None  # pg_stat_replication.state; None: the primary lists none


def read(primary_dsn: str, standby_dsn: str, application_name: str | None) -> Reading:
    """Poll the standby, then its primary (the row whose application_name is the given one,
    else the standby's cluster_name, else "walreceiver")."""
    standby: dict[str, Any] = {}
    try:
        with psycopg.connect(standby_dsn, connect_timeout=CONNECT_TIMEOUT,
                             autocommit=True) as conn:
            row = conn.execute(_STANDBY).fetchone()
        assert row is not None
        standby = {"in_recovery": bool(row[0]), "replay_lsn": row[1], "receive_lsn": row[2],
                   "replay_time": row[3], "standby_now": row[4], "paused": bool(row[5])}
        name = application_name or str(row[6])
    except psycopg.Error as exc:
        standby = {"standby_error": f"{describe(standby_dsn)}: {first_line(exc)}"}
        name = application_name or "walreceiver"
    try:
        with psycopg.connect(primary_dsn, connect_timeout=CONNECT_TIMEOUT,
                             autocommit=True) as conn:
            prow = conn.execute(_PRIMARY, (name,)).fetchone()
        assert prow is not None
        primary: dict[str, Any] = {"primary_lsn": prow[0], "state": prow[1]}
    except psycopg.Error as exc:
        primary = {"primary_error": f"{describe(primary_dsn)}: {first_line(exc)}"}
    return Reading(application_name=name, **standby, **primary)
