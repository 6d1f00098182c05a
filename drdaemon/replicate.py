"""Replication: every snapshot complete in every region, and repair of the copies that are not.

Plan, then execute (like prune). `plan_replication` is pure: from the catalog
listing and what each region holds under each data-object name it says, per
snapshot, which regions hold a complete copy (authenticated manifest, data
object present, size as the manifest says) and which need a repair, naming the
regions to copy from. `execute` carries out the repairs: the data object is
streamed from a healthy region through a VerifyingReader into a multipart
upload in the target, committed only when the whole source copy matched the
manifest's size and sha256; the manifest is written last, as in a backup.

What the plan checks, and why: by default only manifests and sizes (a
few listings and one HEAD per copy), cheap enough to run every few hours. A
same-size bit flip passes that; `verify=True` also streams and hashes every
otherwise complete copy (see verify.py) so that the weekly verify job can
repair what it finds. A repair always hashes its source while copying, so a
corrupt copy is never spread, whichever mode planned it.

Prune plans per region and moves a deleted snapshot's manifest to the trash
(prune.py, trash.py): a region with a trash entry for a snapshot dropped it on
purpose, so it is reported as pruned there, never repaired back. Repairs take
prune's lock, so that a prune and a repair never interleave on this host.

Why one module of about 500 lines: the plan (pure), the observation of the
regions, the repairs and the report are one operation over the same few records
(DataStat, Repair, SnapshotReplicas), read top to bottom in that order, and a
repair's safety (its source hashed while copied, the manifest written last, no
copy back into a region that pruned it) is reviewed against the plan that chose
it. If the pure plan grows, it is the part to move out first.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from . import catalog, layout, locks, manifest, tenancy, tenant_keys
from . import facts as facts_object
from .catalog import SnapshotEntry
from .erasure_records import erasure_note
from .errors import DrError, IntegrityError
from .manifest import Manifest
from .pipeline import FanOut
from .runtime import Runtime
from .storage import NotFound, ObjectStore, StorageError
from .streams import VerifyingReader
from .verify import CORRUPT, MISSING, OK, check_copy

CHUNK = 1 << 20
CopyKey = tuple[str, str, str]  # (source, snapshot id, region)


# -- the pure core -----------------------------------------------------------

@dataclass(frozen=True)
class DataStat:
    """What one region holds under a snapshot's data-object name."""

    size: int | None = None  # None: no object there
    error: str | None = None  # the region could not be asked: state unknown
    corrupt: str | None = None  # streamed and found not to match its manifest


@dataclass
class Repair:
    """Copy one snapshot into one region."""

    manifest: Manifest
    region: str  # the target
    reason: str
    sources: tuple[str, ...]  # regions to copy the data from, best first
    manifest_regions: tuple[str, ...]  # regions holding the authenticated manifest

    @property
    def key(self) -> CopyKey:
        return (self.manifest.source, self.manifest.id, self.region)

    def to_dict(self) -> dict[str, object]:
        return {"source": self.manifest.source, "snapshot_id": self.manifest.id,
                "region": self.region, "reason": self.reason, "from": list(self.sources)}


@dataclass
class SnapshotReplicas:
    """Where one snapshot is complete, and what is wrong everywhere else."""

    source: str
    snapshot_id: str
    manifest: Manifest | None
    complete: list[str] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)  # region -> why not complete
    pruned: list[str] = field(default_factory=list)  # regions whose prune trashed it
    # The regions it belongs in (its tenant's residency: tenancy.regions_for) and
    # the regions holding a copy although the residency does not allow them.
    expected: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)


@dataclass
class ReplicationPlan:
    regions: list[str]
    snapshots: list[SnapshotReplicas]
    repairs: list[Repair]  # includes repairs with no source (they will fail, loudly)
    region_errors: dict[str, str]

    @property
    def ok(self) -> bool:
        """Every snapshot is complete in every region."""
        return not self.region_errors and not any(s.problems for s in self.snapshots)


def plan_replication(entries: Sequence[SnapshotEntry], regions: Sequence[str],
                     region_errors: Mapping[str, str], stats: Mapping[CopyKey, DataStat],
                     trashed: Collection[CopyKey] = frozenset(),
                     homes: Mapping[str, Sequence[str]] | None = None) -> ReplicationPlan:
    """Which copies are complete, which need repair and from where. Pure.

    `trashed`: copies that prune moved to the trash (intentionally absent).
    `homes`: by source, the regions its snapshots belong in (default: `regions`);
    a region outside them is never expected to hold a copy, nor repaired into.
    """
    snapshots, repairs = [], []
    for entry in entries:
        home = [r for r in regions if homes is None or r in homes.get(entry.source, regions)]
        snap, wanted, spare = _classify(entry, home, region_errors, stats, trashed)
        snap.outside = [r for r in entry.regions if r not in home]
        snapshots.append(snap)
        m = entry.manifest
        if m is None:
            continue  # nothing authenticated to copy: the problems say so
        # Complete copies first; then copies whose data looks right but whose
        # manifest is missing or bad (the stream is verified either way).
        order = snap.complete + spare
        holders = tuple(snap.complete + [r for r in entry.regions if r not in snap.complete])
        for region, reason in wanted:
            repairs.append(Repair(m, region, reason,
                                  tuple(r for r in order if r != region), holders))
    return ReplicationPlan(list(regions), snapshots, repairs, dict(region_errors))


def _classify(entry: SnapshotEntry, regions: Sequence[str], region_errors: Mapping[str, str],
              stats: Mapping[CopyKey, DataStat], trashed: Collection[CopyKey]
              ) -> tuple[SnapshotReplicas, list[tuple[str, str]], list[str]]:
    """The snapshot's replicas, the (region, reason) pairs to repair, and spare sources."""
    m = entry.manifest
    snap = SnapshotReplicas(entry.source, entry.id, m, expected=list(regions))
    wanted: list[tuple[str, str]] = []
    spare: list[str] = []
    for region in regions:
        if m is None:
            snap.problems[region] = entry.problems.get(
                region, "no authenticated manifest of this snapshot in any region")
            continue
        key = (entry.source, entry.id, region)
        if region not in entry.regions and key in trashed:
            snap.pruned.append(region)  # retention's decision there, not damage
            continue
        st = stats.get(key)
        if st is None or st.error is not None:
            # Unknown is not missing: never plan a copy into a region we cannot see.
            why = (st.error if st is not None else region_errors.get(region, "not checked"))
            snap.problems[region] = f"cannot be checked: {why}"
            continue
        data_ok = st.size == m.size and st.corrupt is None
        if region in entry.regions and data_ok:
            snap.complete.append(region)
            continue
        if region in entry.regions:
            reason = (st.corrupt if st.corrupt is not None
                      else "data object missing" if st.size is None
                      else f"data object is {st.size} bytes, its manifest says {m.size}")
        else:
            reason = (f"manifest: {entry.problems[region]}" if region in entry.problems
                      else "no manifest")
            if data_ok:
                spare.append(region)
        snap.problems[region] = reason
        wanted.append((region, reason))
    return snap, wanted, spare


# -- observing the regions ---------------------------------------------------

def observe(rt: Runtime, sources: Sequence[str] | None = None, *,
            verify_data: bool = False) -> ReplicationPlan:
    """List, stat (and with verify_data, hash) every copy, then plan."""
    names = {s.name for s in rt.config.pick_sources(sources)} if sources else None
    single = next(iter(names)) if names and len(names) == 1 else None
    listing = catalog.list_snapshots(rt, single)
    entries = [e for e in listing.snapshots if names is None or e.source in names]
    down = dict(listing.region_errors)
    trashed = _trashed(rt, {e.source for e in entries}, down)
    homes = tenancy.homes(rt.config)
    stats: dict[CopyKey, DataStat] = {}
    for entry in entries:
        m = entry.manifest
        if m is None:
            continue
        for store in rt.stores:
            if store.name not in homes.get(entry.source, ()):
                continue  # outside the residency: never a copy to check or repair
            key = (entry.source, entry.id, store.name)
            if store.name in down:
                # Each request would wait out its retries for nothing.
                stats[key] = DataStat(error=down[store.name])
                continue
            stats[key] = _stat(store, m, verify_data and store.name in entry.regions)
            if stats[key].error is not None:
                down[store.name] = stats[key].error or ""
    return plan_replication(entries, [s.name for s in rt.stores], listing.region_errors, stats,
                            trashed, homes)


def _trashed(rt: Runtime, sources: Collection[str], down: dict[str, str]) -> set[CopyKey]:
    """The (source, id, region) of every trash entry; regions that fail go in `down`."""
    found: set[CopyKey] = set()
    for store in rt.stores:
        if store.name in down:
            continue
        try:
            for src in sorted(sources):
                for info in store.list(layout.trash_prefix(src)):
                    trashed = layout.parse_trash_name(info.name)
                    if trashed is not None:
                        found.add((src, trashed[0], store.name))
        except DrError as exc:
            down[store.name] = str(exc)
    return found


def _stat(store: ObjectStore, m: Manifest, hash_it: bool) -> DataStat:
    try:
        size = store.stat(m.data_name).size
    except NotFound:
        return DataStat(None)
    except DrError as exc:
        return DataStat(error=str(exc))
    if size != m.size:
        return DataStat(size)
    if not hash_it:
        return _stat_facts(store, m, size)
    status, reason = check_copy(store, m)
    if status == MISSING:  # deleted between stat and read
        return DataStat(None)
    if status not in (OK, CORRUPT):  # the region, not the copy, failed us
        return DataStat(error=reason)
    return DataStat(size, corrupt=reason if status == CORRUPT else None)


def _stat_facts(store: ObjectStore, m: Manifest, size: int) -> DataStat:
    """The data object is there with its size: is the facts object, if any, too?"""
    ref = m.facts_object
    if ref is None:
        return DataStat(size)
    try:
        found = store.stat(ref.name).size
    except NotFound:
        return DataStat(size, corrupt="facts object missing")
    except DrError as exc:
        return DataStat(error=str(exc))
    if found != ref.size:
        return DataStat(size, corrupt=f"facts object is {found} bytes, its manifest says "
                                      f"{ref.size}")
    return DataStat(size)


# -- executing repairs -------------------------------------------------------

@dataclass
class RepairOutcome:
    repair: Repair
    ok: bool
    from_region: str | None = None
    error: str | None = None
    tried: dict[str, str] = field(default_factory=dict)  # source region -> why it failed
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return dict(self.repair.to_dict(), ok=self.ok, from_region=self.from_region,
                    error=self.error, tried=self.tried, seconds=round(self.seconds, 3),
                    bytes=self.repair.manifest.size if self.ok else 0)


class _SourceFailed(Exception):
    """The source region's copy could not be read or did not verify: try the next one."""


def retain_until(rt: Runtime, m: Manifest) -> datetime | None:
    """The Object Lock horizon a backup gave this snapshot (see backup.py), if still ahead.

    A repaired copy must be as undeletable as the copies the backup wrote; a
    horizon already past needs no lock (and S3 refuses one in the past).
    """
    until = rt.config.source(m.source).retention.lock_until(m.started_at)
    return until if until is not None and until > rt.clock() else None


def copy_data(src: ObjectStore, target: ObjectStore, m: Manifest, part_size: int,
              rt: Runtime) -> None:
    """Stream `m`'s data object from `src` into `target`, verified before commit.

    Raises _SourceFailed when the source is at fault (unreadable, truncated,
    corrupt) and DrError when the target is; either way the target's upload
    is aborted and nothing becomes visible there.
    """
    what = f"snapshot {m.id} in region {src.name}"
    upload = target.begin_upload(m.data_name, retain_until=retain_until(rt, m))
    # FanOut with one region: the same part schedule (parts grow past S3's
    # 10,000-part limit) and upload thread as a backup, so reading and
    # uploading overlap and memory stays about three parts.
    fan = FanOut({target.name: upload}, part_size, rt.stopping)
    committed = False
    try:
        try:
            raw = src.open_read(m.data_name)
        except DrError as exc:
            raise _SourceFailed(str(exc)) from None
        with raw:
            reader = VerifyingReader(raw, m.size, m.sha256, what)
            while True:
                try:
                    chunk = reader.read(CHUNK)
                except (DrError, OSError) as exc:
                    raise _SourceFailed(str(exc) or exc.__class__.__name__) from None
                if not chunk:
                    break
                fan.write(chunk)
        # The reader raises at EOF unless size and sha256 matched: only a
        # verified source reaches this point.
        if not reader.verified:
            raise _SourceFailed(f"{what} was not read to the end")
        failed = fan.finish()
        if failed:
            raise StorageError(failed[target.name])
        upload.commit()
        committed = True
    finally:
        if not committed:
            fan.abort()


def copy_facts(src: ObjectStore, target: ObjectStore, m: Manifest, rt: Runtime) -> None:
    """Copy `m`'s facts object, if any, checked against the manifest before it is written.

    Raises _SourceFailed when the source's copy is missing or bad, DrError when
    the target fails.
    """
    ref = m.facts_object
    if ref is None:
        return
    try:
        blob = src.get_bytes(ref.name, facts_object.MAX_FACTS_BYTES)
        facts_object.decode(blob, m)
    except (NotFound, IntegrityError) as exc:
        raise _SourceFailed(f"facts object: {exc}") from None
    except DrError as exc:
        raise _SourceFailed(str(exc)) from None
    target.put_bytes(ref.name, blob, retain_until=retain_until(rt, m))


def _manifest_blob(rt: Runtime, repair: Repair, stores: Mapping[str, ObjectStore]) -> bytes:
    """The exact manifest bytes from a region holding it, re-authenticated now.

    Copied as stored rather than re-serialized: the copy is then
    byte-identical in every region, as after a backup, and carries any field
    a newer drdaemon wrote that this one does not model. Read after the data
    copy, right before writing it, so a snapshot pruned meanwhile is noticed.
    """
    m = repair.manifest
    name = layout.manifest_object_name(m.source, m.id)
    problems = []
    for region in repair.manifest_regions:
        try:
            raw = stores[region].get_bytes(name, manifest.MAX_MANIFEST_BYTES)
            if manifest.parse(raw, rt.manifest_key, source=m.source, snapshot_id=m.id) == m:
                return raw
            problems.append(f"{region}: manifest changed since the plan")
        except DrError as exc:
            problems.append(str(exc))
    raise _ManifestGone("no region holds its authenticated manifest any more ("
                        + "; ".join(problems) + ")")


class _ManifestGone(DrError):
    """The snapshot's manifest vanished while repairing (pruned meanwhile)."""


def repair_one(rt: Runtime, repair: Repair) -> RepairOutcome:
    """Copy the data, then write the manifest, into the target; try each source in turn."""
    stores = {s.name: s for s in rt.stores}
    target = stores[repair.region]
    m = repair.manifest
    out = RepairOutcome(repair, ok=False)
    if note := erasure_note(rt, m.tenant):  # an erased tenant's ciphertext never goes back
        out.error = note
        rt.record_event("replica.repair_failed", **out.to_dict())
        return out
    started = time.monotonic()
    try:
        # The same gate as a backup's, checked again now: the plan may be older
        # than a residency added to the config since.
        rt.check_residency(m.source, target.name, m.tenant)
    except tenancy.ResidencyError as exc:
        out.error = str(exc)
        rt.record_event("replica.repair_failed", **out.to_dict())
        return out
    if not repair.sources:
        out.error = "no healthy copy in any other region to repair from"
    for region in repair.sources:
        if rt.stopping.is_set():
            out.error = "stopped by shutdown"
            break
        try:
            copy_data(stores[region], target, m, rt.config.pipeline.part_size, rt)
            copy_facts(stores[region], target, m, rt)
        except _SourceFailed as exc:
            out.tried[region] = str(exc)
            continue
        except DrError as exc:
            out.error = f"cannot write region {target.name}: {exc}"
            break
        try:
            target.put_bytes(layout.manifest_object_name(m.source, m.id),
                             _manifest_blob(rt, repair, stores),
                             retain_until=retain_until(rt, m))
        except _ManifestGone as exc:
            # Pruned meanwhile (by another host: prune and repair share a lock
            # here). The copied data is left alone: it may be what an undo of
            # that prune needs, and purge removes it with the trash entry.
            out.error = str(exc)
        except DrError as exc:
            # The data object stays as an unlisted orphan (no manifest, no
            # snapshot); the next repair overwrites it under the same name.
            out.error = f"cannot write the manifest to region {target.name}: {exc}"
        else:
            out.ok, out.from_region = True, region
        break
    else:
        if repair.sources:
            out.error = "no source region holds a copy that verifies: " + "; ".join(
                f"{k}: {v}" for k, v in out.tried.items())
    out.seconds = time.monotonic() - started
    event = "replica.repaired" if out.ok else "replica.repair_failed"
    rt.record_event(event, **out.to_dict())
    return out


def execute(rt: Runtime, plan: ReplicationPlan) -> list[RepairOutcome]:
    """Carry out every repair of `plan`, each once; one failure never stops the others.

    Repairs that have a source go first: a copy they heal then serves as a
    source (and manifest holder) for the snapshot's repairs that had none.
    """
    healed: dict[tuple[str, str], list[str]] = {}
    outcomes = []
    for r in sorted(plan.repairs, key=lambda r: not r.sources):
        snap = (r.manifest.source, r.manifest.id)
        more = tuple(h for h in healed.get(snap, []) if h not in r.sources)
        if more:
            r = dataclasses.replace(r, sources=r.sources + more,
                                    manifest_regions=r.manifest_regions + more)
        out = repair_one(rt, r)
        if out.ok:
            healed.setdefault(snap, []).append(r.region)
        outcomes.append(out)
    # A copied snapshot is of use in its region only with its tenant's key there too.
    for tenant in sorted({o.repair.manifest.tenant_key.tenant for o in outcomes
                          if o.ok and o.repair.manifest.tenant_key is not None}):
        tenant_keys.repair(rt, tenant)
    return outcomes


# -- the service -------------------------------------------------------------

@dataclass
class ReplicationReport:
    plan: ReplicationPlan
    outcomes: list[RepairOutcome] = field(default_factory=list)
    repair: bool = False
    verified: bool = False

    def remaining(self) -> dict[CopyKey, str]:
        """Copies still not complete after the run, with why."""
        fixed = {o.repair.key for o in self.outcomes if o.ok}
        failed = {o.repair.key: o.error or "repair failed" for o in self.outcomes if not o.ok}
        left = {}
        for s in self.plan.snapshots:
            for region, why in s.problems.items():
                key = (s.source, s.snapshot_id, region)
                if key not in fixed:
                    left[key] = f"{why}; repair failed: {failed[key]}" if key in failed else why
        return left

    @property
    def ok(self) -> bool:
        """Every snapshot is complete in every region after the run."""
        return not self.plan.region_errors and not self.remaining()

    def summary(self) -> dict[str, int]:
        copies = sum(len(s.expected) for s in self.plan.snapshots)
        pruned = sum(len(s.pruned) for s in self.plan.snapshots)
        before = copies - pruned - sum(len(s.problems) for s in self.plan.snapshots)
        # "complete" is the state after this run: what the operator needs to know.
        return {"snapshots": len(self.plan.snapshots), "copies": copies - pruned,
                "complete": copies - pruned - len(self.remaining()),
                "complete_before": before,
                "pruned": pruned,
                "repaired": sum(1 for o in self.outcomes if o.ok),
                "repair_failed": sum(1 for o in self.outcomes if not o.ok),
                "remaining": len(self.remaining())}

    def to_dict(self) -> dict[str, object]:
        fixed = {o.repair.key: o.from_region for o in self.outcomes if o.ok}
        snapshots = []
        for s in self.plan.snapshots:
            repaired = {r: fixed[(s.source, s.snapshot_id, r)] for r in s.problems
                        if (s.source, s.snapshot_id, r) in fixed}
            snapshots.append({
                "source": s.source, "id": s.snapshot_id, "complete": s.complete,
                "problems": s.problems, "repaired": repaired, "pruned": s.pruned,
                "expected": s.expected, "outside_residency": s.outside,
                "ok": len(s.complete) + len(repaired) + len(s.pruned) == len(s.expected)})
        return {
            "ok": self.ok, "repair": self.repair, "verified": self.verified,
            "regions": self.plan.regions, "region_errors": self.plan.region_errors,
            "snapshots": snapshots,
            "planned_repairs": [r.to_dict() for r in self.plan.repairs],
            "repairs": [o.to_dict() for o in self.outcomes],
            "summary": self.summary(),
        }


def run_replicate(rt: Runtime, sources: list[str] | None = None, *, repair: bool = False,
                  verify: bool = False) -> ReplicationReport:
    """Check (and with `repair`, restore) every snapshot's copy in every region.

    `verify` also hashes every copy that looks complete, so that same-size
    corruption is found (and, with `repair`, replaced); it reads everything.
    """
    if not repair:
        return ReplicationReport(observe(rt, sources, verify_data=verify), [], repair, verify)
    # Planned under the lock too: what a prune changed before we got it counts.
    # One mirror of the audit log for the whole run, not one per repair.
    with rt.audit_batch(), locks.deletions_for(rt.config.daemon):
        plan = observe(rt, sources, verify_data=verify)
        rt.fence("replica repair")  # a daemon that lost the cluster lock repairs nothing
        return ReplicationReport(plan, execute(rt, plan), repair, verify)
