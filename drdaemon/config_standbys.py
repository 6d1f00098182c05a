"""Parsing `[[standbys]]` and the sources' `standby_dsn` (called by config.py's parser).

A hot standby is watched from both ends (standby.py): its primary, given as a DSN
or as the postgres source whose server it follows, and the standby itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from .config_table import NAME_HINT, NAME_RE, Failer, Table
from .units import parse_duration, parse_size

DEFAULT_MAX_LAG_BYTES = 64 << 20
DEFAULT_MAX_LAG = timedelta(minutes=5)


@dataclass(frozen=True)
class StandbyConfig:
    """A hot standby to watch; lag beyond either bound alerts (DrdaemonStandbyLagging)."""

    name: str
    primary_dsn: str
    standby_dsn: str
    source: str | None = None  # the postgres source on the primary, if named
    # Matches the primary's pg_stat_replication row; None: the standby's cluster_name,
    # else "walreceiver" (PostgreSQL's default for a standby's connection).
    application_name: str | None = None
    max_lag_bytes: int = DEFAULT_MAX_LAG_BYTES
    max_lag: timedelta = DEFAULT_MAX_LAG


class SourceLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def dsn(self) -> str | None: ...
    @property
    def standby_dsn(self) -> str | None: ...


def parse_standbys(p: Failer, items: list[Any], sources: Sequence[SourceLike],
                   dsn: Callable[[Any], str]) -> tuple[StandbyConfig, ...]:
    """`[[standbys]]`, then one standby per source with a `standby_dsn` (named after the
    source, default bounds). `dsn` checks a DSN (no password)."""
    by_source = {s.name: s for s in sources if s.dsn}
    out: list[StandbyConfig] = []
    dsn_what = "a libpq DSN without a password (use PGPASSFILE or a service file)"
    for i, item in enumerate(items):
        t = Table(p, f"standbys[{i}]", item)
        name = t.take("name", str)
        if not NAME_RE.match(name):
            p.fail(t.key("name"), NAME_HINT, name)
        source = t.take("source", str, None)
        primary: str | None = t.convert("primary_dsn", dsn, None, what=dsn_what, echo=False)
        if (source is None) == (primary is None):
            p.fail(t.key("primary_dsn"), "either primary_dsn or source (one of the two)",
                   primary or source or "neither")
        if source is not None:
            if source not in by_source:
                p.fail(t.key("source"), f"the name of a source with a dsn {sorted(by_source)}",
                       source)
            primary = by_source[source].dsn
        assert primary is not None
        standby = t.convert("standby_dsn", dsn, what=dsn_what, echo=False)
        app = t.take("application_name", str, None)
        max_bytes = t.convert("max_lag_bytes", parse_size, DEFAULT_MAX_LAG_BYTES,
                              what="a size like '64MiB'")
        max_lag = t.convert("max_lag", _duration, DEFAULT_MAX_LAG,
                            what="a duration like 5m")
        t.done()
        out.append(StandbyConfig(name, primary, standby, source, app, max_bytes, max_lag))
    for s in sources:
        if s.standby_dsn and s.dsn:
            out.append(StandbyConfig(s.name, s.dsn, s.standby_dsn, s.name))
    names = [s.name for s in out]
    for name in names:
        if names.count(name) > 1:
            p.fail("standbys", "unique standby names (a source's standby_dsn is named after "
                   "the source)", f"{name!r} twice")
    return tuple(out)


def _duration(value: Any) -> timedelta:
    d = parse_duration(str(value))
    if d <= timedelta(0):
        raise ValueError("must be positive")
    return d
