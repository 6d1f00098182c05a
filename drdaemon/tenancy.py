"""Which sources belong to a tenant (until `[[tenants]]` lands: the sources' `tenant` label)."""

from __future__ import annotations

from .config import Config, SourceConfig


def sources_of(cfg: Config, tenant: str) -> list[SourceConfig]:
    """Pure: the configured sources of `tenant`, in config order."""
    return [s for s in cfg.sources if s.tenant == tenant]
