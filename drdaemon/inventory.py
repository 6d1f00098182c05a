"""Where each tenant's data is: what every region holds under `sources/`, by source and tenant.

One listing of `sources/` per region (one LIST request per page of objects,
never one per source) says which sources have data where, how many bytes and
snapshots, and from when to when. Sources found in storage but not in the
config are *unmanaged*: nothing backs them up, prunes or erases them any more,
so they are listed with their bytes and age (and their tenant, read from their
newest manifest), and a metric and an alert fire when they outlive the erasure
window (docs/reference.md, runbooks/unmanaged-data.md).

`tenant show` and `tenant access` are built here too. `tenant show` returns its
facts in named sections; other parts of the tenant lifecycle (the tenant's
keys, its offboarding state) add theirs through :data:`SECTIONS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from . import audit, catalog, layout, lifecycle, tenancy, tenant_keys
from .errors import DrError, UsageError
from .runtime import Runtime


@dataclass
class SourceHoldings:
    """What the regions hold of one source (by object names; manifests not read)."""

    source: str
    tenant: str | None  # the config's label, else the newest manifest's; None: unknown
    managed: bool
    bytes: dict[str, int] = field(default_factory=dict)  # region -> bytes of its objects
    objects: int = 0
    snapshots: dict[str, set[str]] = field(default_factory=dict)  # region -> manifest ids
    oldest: datetime | None = None  # creation second of the oldest snapshot id seen
    newest: datetime | None = None

    @property
    def tenants(self) -> tuple[str, ...]:
        return tenancy.label_tenants(self.tenant or "")

    def snapshot_ids(self) -> set[str]:
        return set().union(*self.snapshots.values()) if self.snapshots else set()

    def age(self, now: datetime) -> timedelta | None:
        """How long since its newest snapshot was begun (None: no snapshot seen)."""
        return now - self.newest if self.newest is not None else None

    def to_dict(self, now: datetime) -> dict[str, Any]:
        age = self.age(now)
        return {"source": self.source, "tenant": self.tenant, "managed": self.managed,
                "bytes": sum(self.bytes.values()), "bytes_by_region": self.bytes,
                "objects": self.objects, "snapshots": len(self.snapshot_ids()),
                "regions": sorted(r for r, ids in self.snapshots.items() if ids),
                "oldest": _iso(self.oldest), "newest": _iso(self.newest),
                "age_seconds": age.total_seconds() if age is not None else None}


@dataclass
class Inventory:
    """Every source with data in any region, and the regions that could not be listed."""

    taken_at: datetime
    sources: dict[str, SourceHoldings]
    region_errors: dict[str, str]

    @property
    def ok(self) -> bool:
        return not self.region_errors

    def unmanaged(self) -> list[SourceHoldings]:
        return [h for n, h in sorted(self.sources.items()) if not h.managed]

    def to_dict(self) -> dict[str, Any]:
        return {"taken_at": self.taken_at.isoformat(),
                "sources": [h.to_dict(self.taken_at) for _, h in sorted(self.sources.items())],
                "region_errors": self.region_errors}


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def holdings(listed: Mapping[str, Iterable[tuple[str, int]]],
             labels: Mapping[str, str]) -> dict[str, SourceHoldings]:
    """Pure: per source, what the (name, size) listings of `sources/` per region say.

    `labels`: the configured sources' tenant labels (the rest are unmanaged).
    Names drdaemon does not write are passed over, as prune passes them over.
    """
    out: dict[str, SourceHoldings] = {}
    for region, objects in listed.items():
        for name, size in objects:
            obj = layout.parse_object_name(name)
            if obj is None:
                continue
            h = out.setdefault(obj.source, SourceHoldings(
                obj.source, labels.get(obj.source), obj.source in labels))
            h.bytes[region] = h.bytes.get(region, 0) + size
            h.objects += 1
            ids = h.snapshots.setdefault(region, set())
            if obj.role != layout.MANIFESTS:
                continue
            ids.add(obj.snapshot_id)
            try:
                at = layout.id_time(obj.snapshot_id)
            except ValueError:
                continue
            h.oldest = at if h.oldest is None or at < h.oldest else h.oldest
            h.newest = at if h.newest is None or at > h.newest else h.newest
    return out


def take(rt: Runtime) -> Inventory:
    """List `sources/` once in every region; name each unmanaged source's tenant from
    its newest manifest (authenticated; unknown if none reads)."""
    listed: dict[str, list[tuple[str, int]]] = {}
    errors: dict[str, str] = {}
    for store in rt.stores:
        try:
            listed[store.name] = [(i.name, i.size) for i in store.list(layout.SOURCES + "/")]
        except DrError as exc:
            errors[store.name] = str(exc)
    labels = {s.name: s.tenant for s in rt.config.sources}
    found = holdings(listed, labels)
    for h in found.values():
        if not h.managed:
            h.tenant = _manifest_tenant(rt, h)
    return Inventory(rt.clock(), found, errors)


def _manifest_tenant(rt: Runtime, h: SourceHoldings) -> str | None:
    """The tenant label of the newest manifest of `h` that authenticates anywhere."""
    by_id: dict[str, list[str]] = {}
    for region, ids in h.snapshots.items():
        for i in ids:
            by_id.setdefault(i, []).append(region)
    for snap_id in sorted(by_id, reverse=True)[:5]:  # a few tries, never every manifest
        for region in by_id[snap_id]:
            try:
                return catalog.read_manifest(rt, rt.store(region), h.source, snap_id).tenant
            except DrError:
                continue
    return None


# -- tenant list -----------------------------------------------------------------

def tenant_list(rt: Runtime, inv: Inventory) -> dict[str, Any]:
    """Every configured tenant with its sources and bytes, then what storage holds
    that the config no longer names (unmanaged sources, and tenants found only there)."""
    cfg = rt.config
    tenants = []
    for name in sorted(cfg.tenants):
        t = cfg.tenants[name]
        own = [s.name for s in tenancy.sources_of(cfg, name)]
        stored = sum(sum(inv.sources[s].bytes.values()) for s in own if s in inv.sources)
        unmanaged = [h.source for h in inv.unmanaged() if name in h.tenants]
        tenants.append({"tenant": name, "tier": t.tier, "implicit": t.implicit,
                        "residency": t.residency.to_dict() if t.residency else None,
                        "sources": own, "unmanaged_sources": unmanaged, "bytes": stored})
    return {"tenants": tenants,
            "unmanaged": [h.to_dict(inv.taken_at) for h in inv.unmanaged()],
            "unmanaged_tenants": _strangers(cfg.tenants, inv),
            "region_errors": inv.region_errors, "taken_at": inv.taken_at.isoformat()}


def _strangers(configured: Mapping[str, object], inv: Inventory) -> list[str]:
    """Tenants that only unmanaged sources name."""
    return sorted({t for h in inv.unmanaged() for t in h.tenants} - set(configured))


# -- tenant show -------------------------------------------------------------------

# name -> (rt, tenant) -> that section of `tenant show`, or None while it has nothing to
# say: the keys (tenant_keys.py) and the lifecycle (lifecycle.py); another part of the
# tenant lifecycle adds its own here.
Section = Callable[[Runtime, str], dict[str, Any] | None]
PLANNED_SECTIONS = ("keys", "lifecycle")


def keys_section(rt: Runtime, tenant: str) -> dict[str, Any] | None:
    """The tenant's keys: id, whether it is the current one (new snapshots are encrypted
    to it; the others open older snapshots), recipient fingerprint, when made, the
    operator recipients it is wrapped to, and where a wrapped copy is (None: the tenant
    has no key yet)."""
    found = tenant_keys.survey(rt, tenant)
    if not found.records and not any(found.present.values()):
        return None
    keys = []
    chosen = found.usable()
    for kid in sorted({k for names in found.present.values() for k, _ in names}
                      | set(found.records)):
        rec = found.records.get(kid)
        keys.append({
            "key_id": kid,
            "current": chosen is not None and chosen.key.key_id == kid,
            "fingerprint": rec.key.fingerprint if rec else None,
            "created": rec.created if rec else None,
            "wrapped_to": list(rec.wrapped_to) if rec else [],
            "wrapped_copies": sorted(w for w, names in found.present.items()
                                     if (kid, "age") in names),
        })
    return {"keys": keys, "in_use": chosen.key.key_id if chosen else None,
            "unreachable": dict(found.unreachable)}


def lifecycle_section(rt: Runtime, tenant: str) -> dict[str, Any] | None:
    """Offboarding, legal hold and erasure (lifecycle.describe); None while active."""
    state = lifecycle.load(rt, tenant)
    described = lifecycle.describe(state)
    return described if described.get("state") != "active" else None


SECTIONS: dict[str, Section] = {"keys": keys_section, "lifecycle": lifecycle_section}


def known_tenant(rt: Runtime, tenant: str, inv: Inventory | None = None) -> None:
    """UsageError (one line) unless the config or storage knows `tenant`."""
    if tenant in rt.config.tenants:
        return
    if inv is not None and any(tenant in h.tenants for h in inv.sources.values()):
        return
    known = ", ".join(sorted(rt.config.tenants)) or "none"
    raise UsageError(f"no tenant named {tenant!r} in the config or in storage (known: {known})")


def tenant_show(rt: Runtime, tenant: str, inv: Inventory) -> dict[str, Any]:
    """Tier, residency, sources, where copies are (regions and continents), how many
    snapshots over what span, then each registered section."""
    known_tenant(rt, tenant, inv)
    cfg = rt.config
    t = cfg.tenants.get(tenant)
    mine = [h for h in inv.sources.values() if tenant in h.tenants]
    continent = {r.name: r.continent for r in cfg.regions}
    regions = sorted({r for h in mine for r, ids in h.snapshots.items() if ids})
    starts = [x for h in mine for x in (h.oldest, h.newest) if x is not None]
    shared = [s.name for s in tenancy.sources_of(cfg, tenant) if tenancy.is_shared(s)]
    out: dict[str, Any] = {
        "tenant": tenant, "configured": t is not None and not t.implicit,
        "tier": t.tier if t else None,
        "residency": t.residency.to_dict() if t and t.residency else None,
        "allowed_regions": list(tenancy.allowed_regions(cfg, tenant)) if t else [],
        "erase_after_days": t.erase_after.days if t else None,
        "sources": [s.name for s in tenancy.sources_of(cfg, tenant)],
        "shared_sources": shared,
        "unmanaged_sources": [h.source for h in mine if not h.managed],
        "regions": regions,
        "continents": sorted({continent.get(r, "unknown") for r in regions}),
        "snapshots": sum(len(h.snapshot_ids()) for h in mine),
        "oldest": _iso(min(starts)) if starts else None,
        "newest": _iso(max(starts)) if starts else None,
        "bytes": sum(sum(h.bytes.values()) for h in mine),
        "region_errors": inv.region_errors,
        "sections": {name: None for name in PLANNED_SECTIONS},
    }
    for name, section in SECTIONS.items():
        out["sections"][name] = section(rt, tenant)
    return out


# -- tenant access -----------------------------------------------------------------

def touches(record: Mapping[str, Any], tenant: str, sources: Iterable[str]) -> bool:
    """Pure: whether an audit record is about `tenant`'s data: it names the tenant
    (alone or in a shared label, or in `tenants`), or one of its `sources` (records
    written before records named their tenant)."""
    label = record.get("tenant")
    if isinstance(label, str) and tenant in tenancy.label_tenants(label):
        return True
    many = record.get("tenants")
    if isinstance(many, list) and tenant in many:
        return True
    names = set(sources)
    if isinstance(record.get("source"), str) and record["source"] in names:
        return "tenant" not in record  # a record naming another tenant is that tenant's
    listed = record.get("sources")
    return isinstance(listed, list) and bool(names & {s for s in listed if isinstance(s, str)})


def tenant_access(rt: Runtime, tenant: str, since: timedelta | None
                  ) -> tuple[list[dict[str, Any]], audit.AuditVerification]:
    """Every audit record since `since` that touched `tenant`'s data, oldest first, and
    whether the log verifies (a list from a broken log is no evidence)."""
    records, check = audit.show(rt, since)
    sources = [s.name for s in tenancy.sources_of(rt.config, tenant)]
    found = [r for r in records if touches(r, tenant, sources)]
    if not found and tenant not in rt.config.tenants:
        # A departed tenant is known by its records; a typo by nothing at all.
        known_tenant(rt, tenant)
    return found, check
