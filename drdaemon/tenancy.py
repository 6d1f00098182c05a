"""Tenants: who owns each source, and which regions may hold a tenant's data. Pure.

A tenant (an institution) is a `[[tenants]]` entry with a tier, an optional
residency and an erasure window; a source names its tenant (`tenant = "..."`)
or, when it holds several tenants' data, all of them (`tenants = [...]`: a
shared source). A source's tenant with no `[[tenants]]` entry is an *implicit*
tenant with the defaults (no residency, erasure window 28 days), so configs
written before tenants existed load unchanged.

The residency rule, the one place it is decided: a tenant's sources are
written to the configured regions its residency allows (all regions without
a residency); a shared source to the regions every one of its tenants
allows. Backups, `replicate --repair`, status, verify and the listings all
ask :func:`regions_for` which regions a source's copies belong in, and
:func:`check_upload` refuses a byte to any other region.

This module imports nothing from config.py (config.py calls its rules): the
config types are described here by the protocols they satisfy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .errors import DrError, UsageError
from .sources import is_kind, kind_for
from .sources.base import DataPlace

# The one set of continent names a region may give (config: `continent`).
CONTINENTS = ("africa", "antarctica", "asia", "europe", "north-america", "oceania",
              "south-america")
# Spellings that configs written before continents were validated use, read as the
# continent named here (docs/reference.md says so).
ALIASES = {"america": "north-america"}
DEFAULT_ERASE_AFTER = timedelta(days=28)
MAX_ERASE_AFTER = timedelta(days=28)  # the contract: every copy gone within 4 weeks
MIN_REGIONS = 2
SHARED_SEPARATOR = "+"  # a shared source's tenant label: "a+b" (manifests, metrics)


class ResidencyError(DrError):
    """An upload to a region outside a tenant's residency was refused."""


@dataclass(frozen=True)
class Residency:
    """Where a tenant's data may be: continents, or an explicit list of regions."""

    continents: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.regions:
            return "regions " + ", ".join(self.regions)
        return "continent(s) " + ", ".join(self.continents)

    def to_dict(self) -> dict[str, list[str]]:
        return ({"regions": list(self.regions)} if self.regions
                else {"continents": list(self.continents)})


@dataclass(frozen=True)
class TenantConfig:
    """A `[[tenants]]` entry, or the implicit tenant a source's label stands for."""

    name: str
    tier: str | None = None  # sources inherit it; None: each source names its tier
    residency: Residency | None = None  # None: every configured region
    erase_after: timedelta = DEFAULT_ERASE_AFTER  # read by erasure: end of service + this
    implicit: bool = False  # no [[tenants]] entry: made from a source's `tenant`


class RegionLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def continent(self) -> str: ...


class SourceLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def tenant(self) -> str: ...

    @property
    def tenants(self) -> tuple[str, ...]: ...

    @property
    def dsn(self) -> str | None: ...

    @property
    def path(self) -> Path | None: ...


class AgingSource(Protocol):
    @property
    def retention(self) -> Any: ...  # config.RetentionConfig (this module imports no config)


S = TypeVar("S", bound=SourceLike, covariant=True)


class ConfigLike(Protocol[S]):
    @property
    def regions(self) -> Sequence[RegionLike]: ...

    @property
    def sources(self) -> Sequence[S]: ...

    @property
    def tenants(self) -> Mapping[str, TenantConfig]: ...


# -- names -------------------------------------------------------------------------

def continent(value: object) -> str:
    """A continent's one spelling: 'North America', 'north_america' -> 'north-america'."""
    if not isinstance(value, str):
        raise TypeError("not a string")
    name = _spelled(value)
    name = ALIASES.get(name, name)
    if name not in CONTINENTS:
        raise ValueError("unknown continent")
    return name


def _spelled(value: str) -> str:
    return "-".join(value.strip().lower().replace("_", " ").replace("-", " ").split())


def owners(source: SourceLike) -> tuple[str, ...]:
    """The tenants whose data `source` holds (one, or several for a shared source)."""
    return source.tenants or (source.tenant,)


def is_shared(source: SourceLike) -> bool:
    """Whether `source` holds several tenants' data (`tenants = [...]`)."""
    return len(owners(source)) > 1


def shared_label(tenants: Sequence[str]) -> str:
    """The tenant label a shared source's manifests and metrics carry."""
    return SHARED_SEPARATOR.join(tenants)


def label_tenants(label: str) -> tuple[str, ...]:
    """The tenants a manifest's or record's tenant label names (see shared_label)."""
    return tuple(t for t in label.split(SHARED_SEPARATOR) if t)


def sources_of(cfg: ConfigLike[S], tenant: str) -> list[S]:
    """The configured sources holding `tenant`'s data: its own and the shared ones."""
    return [s for s in cfg.sources if tenant in owners(s)]


def pick(cfg: ConfigLike[S], tenant: str) -> list[S]:
    """`--tenant NAME`: the tenant's sources, or a UsageError naming the known tenants."""
    if tenant not in cfg.tenants:
        known = ", ".join(sorted(cfg.tenants)) or "none"
        raise UsageError(f"no tenant named {tenant!r} in the config (known: {known})")
    return sources_of(cfg, tenant)


# -- where data may go -----------------------------------------------------------

def allowed_regions(cfg: ConfigLike[SourceLike], tenant: str) -> tuple[str, ...]:
    """The configured regions `tenant` may use, in config order (all for no residency
    or a tenant the config does not know)."""
    t = cfg.tenants.get(tenant)
    res = t.residency if t is not None else None
    if res is None:
        return tuple(r.name for r in cfg.regions)
    if res.regions:
        return tuple(r.name for r in cfg.regions if r.name in res.regions)
    return tuple(r.name for r in cfg.regions if r.continent in res.continents)


def regions_for_tenants(cfg: ConfigLike[SourceLike], tenants: Iterable[str]
                        ) -> tuple[str, ...]:
    """The regions every one of `tenants` allows, in config order."""
    allowed = [set(allowed_regions(cfg, t)) for t in tenants]
    return tuple(r.name for r in cfg.regions if all(r.name in a for a in allowed))


def regions_for(cfg: ConfigLike[SourceLike], source: SourceLike) -> tuple[str, ...]:
    """The regions `source`'s snapshots are written to and expected in."""
    return regions_for_tenants(cfg, owners(source))


def homes(cfg: ConfigLike[SourceLike]) -> dict[str, tuple[str, ...]]:
    """Every configured source's regions (regions_for), by name: for readers that ask
    for many snapshots at once (pass it to regions_for_name)."""
    return {s.name: regions_for(cfg, s) for s in cfg.sources}


def regions_for_name(cfg: ConfigLike[SourceLike], source: str, label: str | None = None,
                     known: Mapping[str, tuple[str, ...]] | None = None) -> tuple[str, ...]:
    """The regions a snapshot of `source` belongs in: by the config when it knows the
    source (`known`: :func:`homes` of the config, computed once), else by the tenant
    `label` its manifest carries (a source no longer configured keeps its tenant's
    residency)."""
    found = (known if known is not None else homes(cfg)).get(source)
    return found if found is not None else regions_for_tenants(cfg, label_tenants(label or ""))


def check_upload(cfg: ConfigLike[SourceLike], source: str, region: str,
                 label: str | None = None) -> None:
    """Refuse (ResidencyError) an upload of `source`'s data to `region` unless the
    residency of every tenant it holds allows that region. Called right before each
    upload begins, with the config in force at that moment."""
    tenants = set(label_tenants(label or ""))
    for s in cfg.sources:
        if s.name == source:
            tenants |= set(owners(s))
    # The manifest's own tenant counts as well as the config's: data written for a
    # tenant stays in its regions even if the source has since changed hands.
    allowed = (regions_for_tenants(cfg, sorted(tenants)) if tenants
               else tuple(r.name for r in cfg.regions))
    if region in allowed:
        return
    raise ResidencyError(
        f"refused: region {region} is outside the residency of tenant "
        f"{', '.join(sorted(tenants))} (source {source}; allowed: "
        f"{', '.join(allowed) or 'none'}); nothing was written there")


# -- what `config check` refuses and warns about ------------------------------------

def overlaps(sources: Sequence[SourceLike]) -> list[tuple[int, int, str]]:
    """(i, j, how) for each pair of `sources` (i < j) holding the same data: the place
    each kind says its source reads (one database; one directory tree inside, or equal
    to, another: sources.base.DataPlace). Linear in the number of sources (by key and
    by each key's parents), not quadratic."""
    placed: dict[tuple[str, ...], list[tuple[int, DataPlace]]] = {}
    for i, src in enumerate(sources):
        place = kind_for(src.kind).data_place(src) if is_kind(src.kind) else None
        if place is not None:
            placed.setdefault(place.key, []).append((i, place))
    found: set[tuple[int, int, str]] = set()
    for key, group in placed.items():
        for a, place in group:
            near = [j for k in (key, *place.parents) for j, _ in placed.get(k, ())]
            found |= {(min(a, b), max(a, b), place.what) for b in near if a != b}
    return sorted(found)


def config_problems(cfg: ConfigLike[SourceLike]) -> list[str]:
    """What makes a config unusable for its tenants, one line each (pure)."""
    problems = []
    for name in sorted(cfg.tenants):
        t = cfg.tenants[name]
        allowed = allowed_regions(cfg, name)
        if len(allowed) < MIN_REGIONS and (not t.implicit or sources_of(cfg, name)):
            where = f" ({t.residency.describe()})" if t.residency else ""
            problems.append(f"tenant {name}: its residency{where} allows "
                            f"{len(allowed)} configured region(s) "
                            f"({', '.join(allowed) or 'none'}); at least {MIN_REGIONS} needed")
    for s in cfg.sources:
        if not is_shared(s):
            continue
        allowed = regions_for(cfg, s)
        if len(allowed) < MIN_REGIONS:
            problems.append(f"source {s.name}: shared by {', '.join(owners(s))}, whose "
                            f"residencies have {len(allowed)} region(s) in common "
                            f"({', '.join(allowed) or 'none'}); at least {MIN_REGIONS} needed")
    for i, j, how in overlaps(cfg.sources):
        a, b = cfg.sources[i], cfg.sources[j]
        if set(owners(a)) != set(owners(b)):
            problems.append(
                f"sources {a.name} (tenant {', '.join(owners(a))}) and {b.name} (tenant "
                f"{', '.join(owners(b))}) hold {how}: one tenant's data would sit under "
                "another's name; declare one shared source with tenants = [...]")
    return problems


def config_warnings(cfg: ConfigLike[SourceLike]) -> list[str]:
    """What `config check` warns about per tenant: one continent, shared sources."""
    out = []
    continent_of = {r.name: r.continent for r in cfg.regions}
    if not cfg.tenants and len(set(continent_of.values())) < 2:
        out.append(f"WARNING: every region is on continent "
                   f"{', '.join(sorted(set(continent_of.values())))}; the policy promises "
                   "copies on two continents")
    for name in sorted(cfg.tenants):
        t = cfg.tenants[name]
        if t.residency is not None:
            continue  # an explicit residency is the tenant's own promise
        used = {continent_of[r] for r in allowed_regions(cfg, name)}
        if len(used) < 2:
            out.append(f"WARNING: tenant {name}: every region it uses is on continent "
                       f"{', '.join(sorted(used)) or 'none'}; the policy promises copies "
                       "on two continents")
    shared_by: dict[str, list[str]] = {}
    for src in cfg.sources:
        if is_shared(src):
            for owner in owners(src):
                shared_by.setdefault(owner, []).append(src.name)
    for name in sorted(cfg.tenants):
        shared = shared_by.get(name)
        if shared:
            out.append(f"WARNING: tenant {name}: its data sits in the shared source(s) "
                       f"{', '.join(shared)}: erasing it alone is impossible there (those "
                       "copies go only when retention ages them out), so its erasure promise "
                       "cannot be kept per tenant")
    return out


# -- what erasure must know ----------------------------------------------------------

@dataclass(frozen=True)
class SharedSource:
    """A source holding `tenant`'s data together with `others`' data."""

    source: str
    others: tuple[str, ...]


def shared_sources(cfg: ConfigLike[S], tenant: str) -> list[SharedSource]:
    """The sources with `tenant`'s data that also hold another tenant's data (declared
    `tenants = [...]`; undeclared overlaps are refused by `config check`)."""
    return [SharedSource(s.name, tuple(t for t in owners(s) if t != tenant))
            for s in sources_of(cfg, tenant) if is_shared(s)]


def ages_out_by(src: AgingSource, now: datetime) -> datetime:
    """When the last snapshot that holds data removed from `src` today is gone for good.

    The newest snapshot taken before the removal is kept longest: through the
    daily, weekly and monthly tiers (a month counted as 31 days), or its
    Object Lock if that is longer, then `trash_days` in the trash.
    """
    r = src.retention
    tiers = timedelta(days=r.daily + 7 * r.weekly + 31 * r.monthly)
    return now + max(tiers, r.min_retention, r.min_age) + timedelta(days=r.trash_days)
