"""Prune's part of an erasure: deleting what an erasure left under Object Lock
once the lock has ended (prune calls :func:`sweep_erased` under its lock)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from . import layout
from .erasure import Run, delete_snapshot_objects
from .erasure_records import erased_tenants
from .runtime import Runtime


@dataclass(frozen=True)
class Swept:
    """One object of an erased tenant that prune deleted (or would, or could not)."""

    tenant: str
    source: str  # "" (and no region, name, snapshot id) for a failure to list
    region: str
    name: str
    snapshot_id: str
    status: str  # "done", "planned" or "failed"
    detail: str

def sweep_erased(rt: Runtime, now: datetime, dry_run: bool,
                 only: Collection[str] | None = None) -> list[Swept]:
    """Delete what erasures left under Object Lock once the lock has ended.

    Retention has no say: the tenant is erased, its newest and drill-verified
    snapshots are no proof of anything any more. `only`: these sources alone
    (a prune of chosen sources). Called by prune, under its lock.
    """
    swept: list[Swept] = []
    for tenant, erased in erased_tenants(rt).items():
        sources = [s for s in erased if only is None or s in only]
        if not sources:
            continue
        run = Run(tenant, now, dry_run, journal=False)
        delete_snapshot_objects(rt, run, sources)
        for o in run.deleted:
            parsed = layout.parse_object_name(o.name)
            swept.append(Swept(tenant, parsed.source if parsed else "", o.where, o.name,
                               parsed.snapshot_id if parsed else "",
                               "planned" if dry_run else "done",
                               f"{'would delete' if dry_run else 'deleted'} {o.name}"
                               + (f" version {o.version_id}" if o.version_id else "")
                               + f": tenant {tenant} was erased"))
        swept += [Swept(tenant, "", "", "", "", "failed", e) for e in run.errors]
        if run.deleted and not dry_run:
            rt.record_event("tenant.erase.sweep", tenant=tenant,
                            deleted=[f"{o.where}:{o.name}@{o.version_id}" for o in run.deleted],
                            errors=list(run.errors))
    return swept

