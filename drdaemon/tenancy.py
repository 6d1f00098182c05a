"""Tenants: which sources hold whose data. Pure functions over the config.

Until the `[[tenants]]` table lands, a tenant is the `tenant` label of a source
and every source belongs to exactly one tenant (docs/architecture.md).
"""

from __future__ import annotations

from .config import Config, SourceConfig


def sources_of(cfg: Config, tenant: str) -> list[SourceConfig]:
    """The configured sources holding `tenant`'s data, in config order."""
    return [s for s in cfg.sources if s.tenant == tenant]
