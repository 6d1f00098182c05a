"""The end of a tenant's service, and legal holds: the services behind `drctl tenant`.

- :func:`offboard` records the end of service and the erasure deadline
  (lifecycle.py), takes a final snapshot of each of the tenant's sources unless
  one newer than the end exists, and from then on the daemon no longer
  schedules those sources (lifecycle.still_scheduled).
- :func:`hold` / :func:`release` record a legal hold (prune and erasure wait
  for it) and put or lift an S3 legal hold on every object of the tenant's
  sources in every region; a region without Object Lock keeps the hold only
  in drdaemon, and says so.

The state is recorded first: from that moment the daemon, prune and the
erasure job obey it, whatever happens to the storage calls after; re-running
the command finishes what failed.
"""

from __future__ import annotations

import getpass
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from pyrage import x25519

from . import catalog, export, layout, lifecycle, tenancy
from .backup import BackupResult, snapshot
from .config import SourceConfig
from .errors import DrError, UsageError
from .export_doc import ExportResult
from .lifecycle import Hold, TenantState
from .runtime import Runtime
from .units import format_utc

Progress = Callable[[str], Callable[[int], None] | None]


def tenant_sources(rt: Runtime, tenant: str) -> list[SourceConfig]:
    """The tenant's configured sources; UsageError naming the known tenants if none."""
    lifecycle.check_tenant(tenant)
    found = tenancy.sources_of(rt.config, tenant)
    if not found:
        known = ", ".join(lifecycle.configured_tenants(rt.config)) or "none"
        raise UsageError(f"no source of tenant {tenant!r} in {rt.config.path} (known: {known})")
    return found


# -- offboarding ---------------------------------------------------------------

@dataclass
class FinalSnapshot:
    """The final snapshot of one source: taken now, or an existing one newer than the end."""

    source: str
    snapshot_id: str | None
    taken: bool  # False: an existing snapshot was newer than the end
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "snapshot_id": self.snapshot_id, "taken": self.taken,
                "error": self.error}


@dataclass(frozen=True)
class ReturnCopy:
    """Where `offboard --return-to` writes the tenant's return copy (export.py), for whom
    (`recipient`, the customer's age key, or None for plaintext) and with which identities."""

    to: Path
    recipient: str | None = None
    identities: Sequence[x25519.Identity] = ()


@dataclass
class OffboardReport:
    state: TenantState
    finals: list[FinalSnapshot] = field(default_factory=list)
    unchanged: bool = False  # the same end was recorded before
    return_copy: ExportResult | None = None

    @property
    def ok(self) -> bool:
        return all(f.error is None for f in self.finals)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "unchanged": self.unchanged, **lifecycle.describe(self.state),
                "final_snapshots": [f.to_dict() for f in self.finals],
                "return_copy": self.return_copy.to_dict() if self.return_copy else None}


def offboard(rt: Runtime, tenant: str, end: date, *, force: bool = False,
             erase_after: timedelta | None = None,
             return_copy: ReturnCopy | None = None,
             progress: Progress | None = None) -> OffboardReport:
    """Record the end of `tenant`'s service and take its final snapshots.

    Idempotent: the same `end` again only finishes final snapshots that
    failed. Another end is refused unless `force`; an erased tenant, or an
    end in the future (the final snapshot could not be final), always is.

    `return_copy`: after the final snapshots succeeded, the tenant's return copy
    (export.export) is written there from them; its folder and recipient are
    checked before anything changes.
    """
    sources = tenant_sources(rt, tenant)
    if return_copy is not None:
        export.check_destination(return_copy.to)
        if return_copy.recipient is not None:
            export.parse_recipient(return_copy.recipient)
    now = rt.clock()
    if lifecycle.end_instant(end) > now:
        raise UsageError(f"the end of service {end.isoformat()} is in the future: offboard "
                         "a tenant on or after its last day, so the final snapshot is final")
    if erase_after is None:  # the tenant's own window ([[tenants]] erase_after, at most 28d)
        configured = rt.config.tenants.get(tenant)
        erase_after = configured.erase_after if configured else lifecycle.DEFAULT_ERASE_AFTER
    due = lifecycle.deadline(end, erase_after)
    unchanged = False

    def record(s: TenantState) -> TenantState:
        nonlocal unchanged
        if s.erased:
            raise UsageError(f"tenant {tenant} was erased; there is nothing to offboard")
        if s.end == end:
            unchanged = True
            return s
        if s.end is not None and not force:
            raise UsageError(f"tenant {tenant} was offboarded with end {s.end.isoformat()}; "
                             f"--force records {end.isoformat()} instead (erasure due "
                             f"{format_utc(due)})")
        return replace(s, end=end, erase_due=due, offboarded_at=s.offboarded_at or now,
                       final_snapshot_done=False)

    state = lifecycle.update(rt, tenant, record)
    report = OffboardReport(state, unchanged=unchanged)
    if not state.final_snapshot_done:
        report.finals = [_final_snapshot(rt, src, end, progress) for src in sources]
        if report.ok:
            report.state = lifecycle.update(
                rt, tenant, lambda s: replace(s, final_snapshot_done=True))
    if return_copy is not None and report.ok:
        report.return_copy = export.export(rt, return_copy.identities, tenant, return_copy.to,
                                           recipient=return_copy.recipient)
    if not (unchanged and not report.finals):
        rt.record_event("tenant.offboard", tenant=tenant, end=end.isoformat(),
                        erase_due=format_utc(due), forced=force and not unchanged,
                        final_snapshots=[f.to_dict() for f in report.finals],
                        ok=report.ok, user=getpass.getuser(), host=socket.gethostname())
    return report


def _final_snapshot(rt: Runtime, src: SourceConfig, end: date,
                    progress: Progress | None) -> FinalSnapshot:
    newest = catalog.newest_manifest(rt, src.name)
    if newest is not None and newest.consistency_time >= lifecycle.end_instant(end):
        return FinalSnapshot(src.name, newest.id, taken=False)
    on_progress = progress(src.name) if progress else None
    result: BackupResult = snapshot(rt, src, on_progress)
    return FinalSnapshot(src.name, result.snapshot_id, taken=True,
                         error=None if result.ok else result.error or "no region took it")


# -- legal hold ------------------------------------------------------------------

@dataclass
class RegionHold:
    """What a hold or release did in one region."""

    region: str
    objects: int = 0
    supported: bool = True
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"region": self.region, "objects": self.objects, "supported": self.supported,
                "error": self.error}


@dataclass
class HoldReport:
    state: TenantState
    on: bool
    regions: list[RegionHold] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.error is None for r in self.regions)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "hold": self.on, **lifecycle.describe(self.state),
                "regions": [r.to_dict() for r in self.regions]}


def tenant_object_prefixes(rt: Runtime, tenant: str) -> list[str]:
    """Where the tenant's objects are: each of its sources' data, facts, manifests and trash."""
    return [layout.source_prefix(s.name) for s in tenant_sources(rt, tenant)]


def _set_holds(rt: Runtime, tenant: str, on: bool) -> list[RegionHold]:
    prefixes = tenant_object_prefixes(rt, tenant)
    out = []
    for store in rt.stores:
        r = RegionHold(store.name)
        try:
            for prefix in prefixes:
                for info in store.list(prefix):
                    if not store.set_legal_hold(info.name, on):
                        r.supported = False
                        break
                    r.objects += 1
                if not r.supported:
                    break
        except DrError as exc:
            r.error = str(exc)
        out.append(r)
    return out


def hold(rt: Runtime, tenant: str, reason: str) -> HoldReport:
    """Place a legal hold on `tenant`: recorded first, then on every object in every region.

    Again on a held tenant: the reason is updated, the first date kept, and
    objects written since are held too.
    """
    tenant_sources(rt, tenant)
    reason = reason.strip()
    if not reason:
        raise UsageError("a legal hold needs a --reason (the case, the authority)")
    user, host = getpass.getuser(), socket.gethostname()
    placed = Hold(reason, user, host, rt.clock())
    state = lifecycle.update(rt, tenant, lambda s: lifecycle.with_hold(s, placed))
    report = HoldReport(state, True, _set_holds(rt, tenant, True))
    rt.record_event("tenant.hold", tenant=tenant, reason=reason, user=user, host=host,
                    regions=[r.to_dict() for r in report.regions], ok=report.ok)
    return report


def release(rt: Runtime, tenant: str) -> HoldReport:
    """Lift `tenant`'s legal hold in every region, then in drdaemon.

    The record goes last: if a region cannot lift its holds, the tenant stays
    held (prune and erasure keep waiting) and the command can be run again.
    """
    tenant_sources(rt, tenant)
    before = lifecycle.load(rt, tenant)
    if before.hold is None:
        raise UsageError(f"tenant {tenant} is not under a legal hold")
    regions = _set_holds(rt, tenant, False)
    report = HoldReport(before, False, regions)
    if report.ok:
        report.state = lifecycle.update(rt, tenant, lambda s: lifecycle.with_hold(s, None))
    rt.record_event("tenant.release", tenant=tenant, reason=before.hold.reason,
                    user=getpass.getuser(), host=socket.gethostname(),
                    regions=[r.to_dict() for r in regions], ok=report.ok)
    return report
