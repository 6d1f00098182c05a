"""Which sources hold a tenant's data: pure functions over the config.

Until the `[[tenants]]` table lands, a tenant is the `tenant` label on a source
(docs/reference.md). A source whose snapshots hold several tenants' data is
*shared*: declared so (`tenants = [...]` on the source, once the config reads
it), or - until then - found: another tenant's source backs up the same
PostgreSQL database or an overlapping directory tree. A shared source cannot be
crypto-shredded for one tenant (erasure.py refuses).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from .config import Config, SourceConfig


def sources_of(cfg: Config, tenant: str) -> list[SourceConfig]:
    """The sources labelled with `tenant`, in config order."""
    return [s for s in cfg.sources if s.tenant == tenant]


def tenants_of_source(src: SourceConfig) -> tuple[str, ...]:
    """The tenants a source declares it holds (its own label if it declares none)."""
    declared = getattr(src, "tenants", None)  # `tenants = [...]`, once the config has it
    return tuple(declared) if declared else (src.tenant,)


def _database(dsn: str) -> tuple[str, str, str]:
    """(host, port, database) a DSN names, for comparison only."""
    if "://" in dsn:
        parts = urlsplit(dsn)
        return (parts.hostname or "", str(parts.port or 5432), parts.path.lstrip("/"))
    pairs = dict(p.split("=", 1) for p in dsn.split() if "=" in p)
    return (pairs.get("host", ""), pairs.get("port", "5432"), pairs.get("dbname", ""))


def _overlap(a: SourceConfig, b: SourceConfig) -> bool:
    """Whether two sources back up the same data (a database, or nested trees)."""
    if a.kind != b.kind:
        return False
    if a.kind == "postgres" and a.dsn and b.dsn:
        return _database(a.dsn) == _database(b.dsn)
    if a.path is not None and b.path is not None:
        pa, pb = Path(a.path).absolute(), Path(b.path).absolute()
        return pa == pb or pa.is_relative_to(pb) or pb.is_relative_to(pa)
    return False


@dataclass(frozen=True)
class SharedSource:
    """A source holding `tenant`'s data together with `others`' data."""

    source: str
    others: tuple[str, ...]


def shared_sources(cfg: Config, tenant: str) -> list[SharedSource]:
    """The sources with `tenant`'s data that also hold another tenant's data.

    Declared (`tenants = [...]`) or found: a source of `tenant` and one of
    another tenant that back up the same database or overlapping trees are
    both shared.
    """
    found: dict[str, set[str]] = {}
    for src in cfg.sources:
        held = tenants_of_source(src)
        if tenant in held and len(held) > 1:
            found.setdefault(src.name, set()).update(t for t in held if t != tenant)
    mine = [s for s in cfg.sources if tenant in tenants_of_source(s)]
    for src in mine:
        for other in cfg.sources:
            if other is src or tenant in tenants_of_source(other) or not _overlap(src, other):
                continue
            found.setdefault(src.name, set()).update(tenants_of_source(other))
            found.setdefault(other.name, set()).update(tenants_of_source(other))
    return [SharedSource(name, tuple(sorted(found[name])))
            for name in (s.name for s in cfg.sources) if name in found]


def ages_out_by(src: SourceConfig, now: datetime) -> datetime:
    """When the last snapshot that holds data removed from `src` today is gone for good.

    The newest snapshot taken before the removal is kept longest: through the
    daily, weekly and monthly tiers (a month counted as 31 days), or its
    Object Lock if that is longer, then `trash_days` in the trash.
    """
    r = src.retention
    tiers = timedelta(days=r.daily + 7 * r.weekly + 31 * r.monthly)
    return now + max(tiers, r.min_retention, r.min_age) + timedelta(days=r.trash_days)
