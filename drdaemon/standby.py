"""The hot-standby watch: is each standby there, streaming, close behind, still replaying?

`judge` (pure) turns one reading of both ends (sources/pg_standby.py) and the
previous status into a `StandbyStatus`: lag in bytes (primary's WAL position minus
standby's replay position) and seconds (since the last replayed transaction,
0 when nothing received is waiting), and how long replay has not moved while
WAL waits (a paused or stuck replay). `poll` reads every configured standby;
the daemon polls every POLL_INTERVAL and hands the statuses to the metrics;
`drctl status` polls once and shows the problems.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from .config import Config
from .config_standbys import StandbyConfig
from .sources.pg_standby import Reading, read
from .units import duration, size

POLL_INTERVAL = timedelta(seconds=15)
# Replay that has not moved this long while WAL waits is a problem for status
# (the alert waits 5 more minutes: DrdaemonStandbyNotReplaying).
STALL_PROBLEM = timedelta(minutes=1)
# pg_stat_replication.state, and "absent" when the primary lists no sender for it.
STATES = ("startup", "catchup", "streaming", "backup", "stopping", "absent")


@dataclass(frozen=True)
class StandbyStatus:
    """One standby as last polled (times are aware datetimes)."""

    name: str
    source: str | None
    polled_at: datetime
    up: bool  # the standby answers and is in recovery
    state: str  # one of STATES
    lag_bytes: int | None
    lag_seconds: float | None
    paused: bool
    replay_lsn: int | None
    stalled_since: datetime | None  # replay has not moved since, while WAL waits
    max_lag_bytes: int
    max_lag_seconds: float
    problems: tuple[str, ...] = field(default=())

    @property
    def streaming(self) -> bool:
        return self.state == "streaming"

    @property
    def stalled_seconds(self) -> float:
        if self.stalled_since is None:
            return 0.0
        return max((self.polled_at - self.stalled_since).total_seconds(), 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "up": self.up, "state": self.state,
                "streaming": self.streaming, "lag_bytes": self.lag_bytes,
                "lag_seconds": self.lag_seconds, "paused": self.paused,
                "stalled_seconds": self.stalled_seconds, "problems": list(self.problems),
                "polled_at": self.polled_at.isoformat()}


def judge(cfg: StandbyConfig, r: Reading, previous: StandbyStatus | None,
          now: datetime) -> StandbyStatus:
    """Pure: the status of standby `cfg` from reading `r`, polled at `now`."""
    up = r.standby_error is None and r.in_recovery
    state = r.state if r.state in STATES else ("absent" if r.state is None else "startup")
    lag_bytes = (max(r.primary_lsn - r.replay_lsn, 0)
                 if up and r.primary_lsn is not None and r.replay_lsn is not None else None)
    pending = up and r.replay_lsn is not None and (
        (r.receive_lsn is not None and r.receive_lsn > r.replay_lsn) or bool(lag_bytes))
    lag_seconds: float | None = None
    if up and not pending:
        lag_seconds = 0.0
    elif up and r.replay_time is not None and r.standby_now is not None:
        lag_seconds = max((r.standby_now - r.replay_time).total_seconds(), 0.0)
    stalled_since = None
    if pending:
        moved = previous is None or previous.replay_lsn != r.replay_lsn
        stalled_since = now if moved or previous is None else (previous.stalled_since or now)
    status = StandbyStatus(cfg.name, cfg.source, now, up, state, lag_bytes, lag_seconds,
                           r.paused and up, r.replay_lsn if up else None, stalled_since,
                           cfg.max_lag_bytes, cfg.max_lag.total_seconds())
    return _with_problems(status, cfg, r)


def _with_problems(s: StandbyStatus, cfg: StandbyConfig, r: Reading) -> StandbyStatus:
    out = []
    if r.standby_error is not None:
        out.append(f"standby {s.name} does not answer: {r.standby_error}")
    elif not r.in_recovery:
        out.append(f"standby {s.name} is not in recovery: promoted, or not a standby")
    if r.primary_error is not None:
        out.append(f"the primary of standby {s.name} does not answer: {r.primary_error}")
    elif s.state != "streaming":
        out.append(f"the primary lists no streaming replication to {s.name} "
                   f"(application_name {r.application_name!r}: {s.state})")
    if s.lag_bytes is not None and s.lag_bytes > cfg.max_lag_bytes:
        out.append(f"standby {s.name} is {size(s.lag_bytes)} behind (max "
                   f"{size(cfg.max_lag_bytes)})")
    if s.lag_seconds is not None and s.lag_seconds > cfg.max_lag.total_seconds():
        out.append(f"standby {s.name} is {duration(s.lag_seconds)} behind (max "
                   f"{duration(cfg.max_lag.total_seconds())})")
    if s.paused:
        out.append(f"standby {s.name}: replay is paused (SELECT pg_wal_replay_resume() "
                   "on the standby)")
    if s.stalled_seconds >= STALL_PROBLEM.total_seconds():
        out.append(f"standby {s.name} has replayed nothing for "
                   f"{duration(s.stalled_seconds)} while WAL waits")
    return StandbyStatus(**{**s.__dict__, "problems": tuple(out)})


def poll(config: Config, previous: Mapping[str, StandbyStatus], now: datetime
         ) -> list[StandbyStatus]:
    """Read and judge every configured standby (one failing never stops the others)."""
    return [judge(c, read(c.primary_dsn, c.standby_dsn, c.application_name),
                  previous.get(c.name), now) for c in config.standbys]
