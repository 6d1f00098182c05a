"""Parsing `[[tenants]]` and a source's tenant keys (called by config.py's parser).

The tenant model and its rules live in tenancy.py; this module only turns the
TOML into it, reporting every problem as one line naming the key.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import timedelta
from typing import Any

from . import tenancy
from .config_table import NAME_HINT, NAME_RE, Failer, Said, Table
from .tenancy import Residency, TenantConfig
from .units import parse_duration


def parse_tenants(p: Failer, items: list[Any], tiers: Collection[str],
                  regions: Sequence[tenancy.RegionLike]) -> dict[str, TenantConfig]:
    """The `[[tenants]]` list, by name."""
    tenants: dict[str, TenantConfig] = {}
    for i, item in enumerate(items):
        t = Table(p, f"tenants[{i}]", item)
        name = tenant_name(p, t, "name", t.take("name", str))
        if name in tenants:
            p.fail(t.key("name"), "a unique name", f"duplicate {name!r}")
        tier = t.take("tier", str, None)
        if tier is not None and tier not in tiers:
            p.fail(t.key("tier"), f"one of the tiers {sorted(tiers)}", tier)
        residency = None
        if "residency" in t.data:
            residency = _residency(p, Table(p, t.key("residency"), t.take("residency", dict)),
                                   regions)
        erase_after = t.convert("erase_after", _erase_after, tenancy.DEFAULT_ERASE_AFTER,
                                what="a number of days from 0 to 28 (or a duration like 14d)")
        t.done()
        tenants[name] = TenantConfig(name, tier, residency, erase_after)
    return tenants


def _residency(p: Failer, t: Table, regions: Sequence[tenancy.RegionLike]) -> Residency:
    if ("continents" in t.data) == ("regions" in t.data):
        p.fail(t.where, "exactly one of continents = [...] or regions = [...]",
               sorted(t.data))
    if "continents" in t.data:
        raw = t.take("continents", list)
        try:
            continents = tuple(dict.fromkeys(tenancy.continent(c) for c in raw))
        except (TypeError, ValueError):
            p.fail(t.key("continents"), f"a list of continents from {list(tenancy.CONTINENTS)}",
                   raw)
        if not continents:
            p.fail(t.key("continents"), "at least one continent", raw)
        t.done()
        return Residency(continents=continents)
    raw = t.take("regions", list)
    known = [r.name for r in regions]
    if not raw or any(not isinstance(r, str) or r not in known for r in raw):
        p.fail(t.key("regions"), f"a list of configured regions from {known}", raw)
    t.done()
    return Residency(regions=tuple(dict.fromkeys(raw)))


def _erase_after(value: Any) -> timedelta:
    if isinstance(value, bool):
        raise TypeError("not a number of days")
    days = timedelta(days=value) if isinstance(value, int) else parse_duration(value)
    if not timedelta(0) <= days <= tenancy.MAX_ERASE_AFTER:
        raise ValueError("at most 28 days: the contract's four weeks")
    return days


def tenant_name(p: Failer, t: Table, key: str, name: str) -> str:
    if not NAME_RE.match(name) or tenancy.SHARED_SEPARATOR in name:
        p.fail(t.key(key), NAME_HINT, name)
    return name


def source_owners(p: Failer, t: Table) -> tuple[str, ...]:
    """A source's `tenant = "..."`, or a shared source's `tenants = [...]` (2 or more)."""
    if ("tenant" in t.data) == ("tenants" in t.data):
        p.fail(t.key("tenant"), "tenant = \"...\" or, for a source holding several "
               "tenants' data, tenants = [...] (one of the two)",
               sorted(k for k in ("tenant", "tenants") if k in t.data) or "neither")
    if "tenant" in t.data:
        return (tenant_name(p, t, "tenant", t.take("tenant", str)),)
    raw = t.take("tenants", list)
    names = tuple(dict.fromkeys(tenant_name(p, t, "tenants", n) if isinstance(n, str)
                                else p.fail(t.key("tenants"), "a list of tenant names", raw)
                                for n in raw))
    if len(names) < 2:
        p.fail(t.key("tenants"), "two or more tenants (one tenant: tenant = \"...\")", raw)
    return names


def source_tier(p: Failer, t: Table, owners: Sequence[str],
                tenants: Mapping[str, TenantConfig], tiers: Collection[str]) -> str:
    """The source's own `tier`, else the one its tenants share."""
    tier = t.take("tier", str, None)
    if tier is None:
        inherited = {tenants[o].tier for o in owners if o in tenants}
        if len(inherited) == 1 and None not in inherited and len(owners) == sum(
                o in tenants for o in owners):
            tier = inherited.pop()
    if tier is None:
        p.fail(t.key("tier"), f"one of the tiers {sorted(tiers)} (its tenant "
               f"{', '.join(owners)} gives none, or tenants differ)", Said("nothing"))
    if tier not in tiers:
        p.fail(t.key("tier"), f"one of the tiers {sorted(tiers)}", tier)
    return tier


def implicit_tenants(owners: Sequence[tuple[str, ...]],
                     tenants: Mapping[str, TenantConfig]) -> dict[str, TenantConfig]:
    """`tenants` plus an implicit tenant (defaults) for each owner without an entry."""
    out = dict(tenants)
    for names in owners:
        for name in names:
            out.setdefault(name, TenantConfig(name, implicit=True))
    return out
