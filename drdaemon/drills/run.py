"""Restore drills: prove, with evidence, that a snapshot restores within the tier's targets.

A drill restores the newest snapshot the drill region holds (default: the
first region that is not the primary, i.e. the copy a lost primary leaves)
through the very path `drctl restore` uses into scratch space, verifies it
against the manifest's facts and `[[drills.checks]]`, measures RTO (split into
phases, see slo.rto_split), RPO, throughput and the projected tier RTO, and
always removes the scratch copy: a `drdaemon_drill_*` database on `[drills]
postgres_dsn` (else the source's server) or a folder under `scratch_dir`, named
after the drilling process so that a run can first remove what killed drills
left (drills/scratch.py). README.md ("Drills") defines every figure and reason code.

Each drill is one `DrillRecord` (drills/records.py): a JSON line in
`<state_dir>/drills/drills.jsonl` and a `drill` record in the audit log (the
tamper-evident copy).
"""

from __future__ import annotations

import hashlib
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from pyrage import x25519

from .. import __version__, catalog, recovery_plan, slo, tenancy
from ..catalog import SnapshotEntry
from ..config import Config, SourceConfig
from ..erasure_records import erasure_note
from ..errors import UsageError, first_line
from ..keys import identities_for
from ..runtime import Runtime, current_user
from ..sources.base import MANIFEST_INVALID
from . import scratch as drill_scratch
from .attempt import (
    ERASED,
    INTERNAL,
    NEWEST_UNREADABLE,
    NO_SNAPSHOT,
    REGION_UNREACHABLE,
    SNAPSHOT_MISSING,
    Drill,
    restore_and_verify,
)
from .records import (
    DrillRecord,
    append_record,
    latest_restores,
    load_records,
)
from .scratch import Cleanup

log = logging.getLogger("drdaemon")

PHASES = slo.PHASES


@dataclass
class DrillRun:
    """The drills of one `drctl drill run` or daemon drill job.

    `scratch`: what killed drills had left, found before these ran (removed,
    kept and why); it does not change `ok`.
    """

    records: list[DrillRecord] = field(default_factory=list)
    scratch: Cleanup = field(default_factory=Cleanup)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.records)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "drills": [r.to_dict() for r in self.records],
                "scratch": self.scratch.to_dict()}


# -- pure helpers --------------------------------------------------------------


def default_region(config: Config, source: SourceConfig | None = None) -> str:
    """The region a drill reads from: the first that is not the primary (the first),
    among the regions `source`'s tenant's residency allows (two at least: config)."""
    home = tenancy.regions_for(config, source) if source is not None else ()
    return home[1] if len(home) > 1 else config.regions[1].name


# -- one drill -------------------------------------------------------------------


@dataclass
class _Catalog:
    """What the regions hold, listed once per run: per source, and unreadable regions."""

    entries: dict[str, list[SnapshotEntry]]
    region_errors: dict[str, dict[str, str]]  # source -> region -> error
    # source -> listed snapshots no region can read (e.g. a manifest too large)
    unreadable: dict[str, list[SnapshotEntry]] = field(default_factory=dict)

    @classmethod
    def read(cls, rt: Runtime, sources: Sequence[str]) -> _Catalog:
        entries, errors, unreadable = {}, {}, {}
        for name in sources:
            listing = catalog.list_snapshots(rt, name)
            entries[name] = [e for e in listing.snapshots if e.manifest is not None]
            errors[name] = listing.region_errors
            unreadable[name] = listing.unreadable
        return cls(entries, errors, unreadable)

    def newest(self, source: str) -> SnapshotEntry | None:
        found = self.entries.get(source, [])
        return found[-1] if found else None


def drill_source(rt: Runtime, identities: Sequence[x25519.Identity], source: SourceConfig,
                 region: str, snapshots: _Catalog) -> DrillRecord:
    """Drill one source from `region`; never raises for a failed drill (see the record).

    `snapshots` must list every source of the source's tier (for the projection).
    """
    d = Drill(rt, source, region)
    try:
        if note := erasure_note(rt, source.tenant):
            d.fail(ERASED, note)
        elif _choose(d, snapshots):
            restore_and_verify(d, identities)
    except Exception as exc:  # a bug must still leave a record and no scratch behind
        log.exception("drill of %s crashed", source.name)
        d.fail(INTERNAL, f"{exc.__class__.__name__}: {first_line(exc)}")
    return _record(d, snapshots)


def _choose(d: Drill, snapshots: _Catalog) -> bool:
    """Pick the newest snapshot the drill region holds; False (with a reason) if none."""
    name, region = d.source.name, d.region
    unreadable = snapshots.region_errors.get(name, {})
    entries = snapshots.entries.get(name, [])
    held = [e for e in entries if region in e.regions]
    if region in unreadable:
        d.fail(REGION_UNREACHABLE, f"region {region} could not be listed: {unreadable[region]}")
        return False
    newer = [e for e in snapshots.unreadable.get(name, [])
             if not entries or e.id > entries[-1].id]
    if newer:
        # Drilling an older snapshot would prove an RPO that nothing can restore.
        older = f"not drilling an older one ({held[-1].id})" if held else "no older one either"
        d.fail(NEWEST_UNREADABLE, f"the newest snapshot {newer[-1].id} of {name} cannot be "
               f"read in any region ({newer[-1].why_unreadable()}); {older}")
        return False
    if not held:
        problems = [e.problems[region] for e in entries if region in e.problems]
        if problems:
            d.fail(MANIFEST_INVALID, f"region {region}: {problems[-1]}")
        elif entries:
            d.fail(SNAPSHOT_MISSING, f"region {region} holds no snapshot of {name}; the "
                   f"newest ({entries[-1].id}) is only in {', '.join(entries[-1].regions)}")
        else:
            d.fail(NO_SNAPSHOT, f"no snapshot of {name} in any region")
        return False
    d.entry = held[-1]
    if entries[-1].id != d.entry.id:
        d.notes.append(f"the newest snapshot {entries[-1].id} is not in region {region}; "
                       f"drilled the newest one there, {d.entry.id}")
    return True


def config_sha256(config: Config) -> str | None:
    """sha256 of the config file's bytes (None if it cannot be read now): which
    settings a drill ran under, for an auditor to match against the file."""
    try:
        with open(config.path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        return None


def _record(d: Drill, snapshots: _Catalog) -> DrillRecord:
    rt, entry = d.rt, d.entry
    # The drill region's own manifest when it was read, else the catalog's copy.
    m = d.manifest or (entry.manifest if entry is not None else None)
    rpo = slo.rpo_at(m.consistency_time, d.started_at) if m is not None else None
    gap = slo.worst_gap(e.manifest.consistency_time
                        for e in snapshots.entries.get(d.source.name, []) if e.manifest)
    rto = d.rto if d.verified else None
    rate = slo.throughput(m.size, rto) if m is not None and rto else None
    plain_rate = slo.throughput(m.plaintext_size, rto) if m is not None and rto else None
    projected, model = _projection(d, snapshots, m.size if m is not None else None,
                                   rto if rate is not None else None)
    d.reasons.extend(slo.evaluate(d.targets, rto=timedelta(seconds=rto) if rto else None,
                                  rpo=rpo, projected=projected))
    newest = snapshots.newest(d.source.name)
    return DrillRecord(
        id=d.id, source=d.source.name, tenant=d.source.tenant, tier=d.source.tier,
        region=d.region, snapshot_id=entry.id if entry else None,
        sha256=m.sha256 if m else None,
        started_at=d.started_at.isoformat(), finished_at=rt.clock().isoformat(),
        ok=d.verified and not d.reasons, reasons=d.reasons, rto_seconds=rto,
        rpo_seconds=rpo.total_seconds() if rpo is not None else None,
        worst_gap_seconds=gap.total_seconds() if gap is not None else None,
        throughput_bytes_per_second=rate,
        stored_bytes=m.size if m else None, plaintext_bytes=m.plaintext_size if m else None,
        rto_target_seconds=d.targets.rto.total_seconds(),
        rpo_target_seconds=d.targets.rpo.total_seconds(),
        projected_tier_rto_seconds=projected.total_seconds() if projected is not None else None,
        timings={k: round(v, 6) for k, v in d.timings.items()},
        kind=d.source.kind, verified=d.verified,
        plaintext_throughput_bytes_per_second=plain_rate,
        consistency_time=m.consistency_time.isoformat() if m else None,
        newest_snapshot_id=newest.id if newest and entry and newest.id != entry.id else None,
        scratch=d.scratch, evidence=d.evidence, notes=d.notes, host=socket.gethostname(),
        restore_model=model.to_dict() if model is not None else None,
        user=current_user(), tool_version=__version__, config_sha256=config_sha256(rt.config),
        manifest_key_id=d.manifest_mac["key_id"] if d.manifest_mac else None,
        manifest_mac=d.manifest_mac["value"] if d.manifest_mac else None)


def _projection(d: Drill, snapshots: _Catalog, stored: int | None, rto: float | None
                ) -> tuple[timedelta | None, slo.RestoreModel | None]:
    """The drilled tier's ETA in the recovery plan (recovery_plan.py: paid tiers first, one
    restore at a time), with this drill as its source's latest restore; and the tier's model.

    None unless this drill measured a restore: an old figure must not pass as today's.
    """
    rt, tier = d.rt, d.source.tier
    if stored is None or rto is None:
        return None, None
    for s in rt.config.sources:
        if s.tier == tier and snapshots.newest(s.name) is None:
            d.notes.append(f"source {s.name} of tier {tier} has no snapshot: "
                           "the projected tier RTO leaves it out")
    sources = recovery_plan.plan_sources(rt.config, snapshots.entries)
    restores = latest_restores(load_records(rt.config.daemon.state_dir),
                               [s.name for s in rt.config.sources])
    restores[d.source.name] = (stored, rto)
    plan = recovery_plan.build_plan(sources, restores)
    eta = plan.tier_eta(tier)
    model = recovery_plan.tier_models(sources, restores).get(tier)
    if eta is None:
        return None, model
    # Absurd inputs (a byte drilled in minutes, terabytes projected) must not crash.
    return timedelta(seconds=min(eta, slo.MAX_SECONDS)), model


# -- the service -------------------------------------------------------------------


def run_drills(rt: Runtime, identities: Sequence[x25519.Identity] | None = None,
               sources: Sequence[str] | None = None, *, region: str | None = None,
               tier: str | None = None) -> DrillRun:
    """Drill every chosen source (default: all, or all of `tier`) and record each drill.

    `region` defaults, per source, to the first non-primary region its tenant allows
    (default_region); `identities` to the configured identity file. One failing
    drill never stops the others. First, scratch that killed drills left is removed
    (drill_scratch.clean_leftovers).
    """
    cfg = rt.config
    if sources:
        chosen = cfg.pick_sources(sources)
    else:
        chosen = [s for s in cfg.sources if tier is None or s.tier == tier]
    if not chosen:
        raise UsageError("no source to drill" + (f" in tier {tier!r}" if tier else ""))
    chosen_region = rt.store(region).name if region else None
    if identities is None:
        identities = identities_for(cfg, None, "a drill")
    # Every source: the tier's projection is its ETA in the plan, after the tiers ahead.
    snapshots = _Catalog.read(rt, [s.name for s in cfg.sources])
    # One mirror of the audit log for the run (and at most one a minute while
    # it lasts: Runtime.audit_batch), not one per removal and drill.
    with rt.audit_batch():
        # What killed drills left goes first: a drill server or scratch folder
        # filled by leftovers would fail these drills for no fault of the backups.
        run = DrillRun(scratch=drill_scratch.clean_leftovers(rt, chosen))
        signer = rt.signing_key
        for src in chosen:
            record = drill_source(rt, identities, src,
                                  chosen_region or default_region(cfg, src), snapshots)
            append_record(cfg.daemon.state_dir, record, signer)
            rt.record_event("drill", **record.to_dict())
            run.records.append(record)
    return run


def drill_jobs(rt: Runtime) -> list[tuple[str, str, Callable[[], Any]]]:
    """The daemon's drill jobs: one per tier that has sources, on its schedule."""
    tiers = sorted({s.tier for s in rt.config.sources})

    def job(tier: str) -> Callable[[], DrillRun]:
        return lambda: run_drills(rt, tier=tier)

    return [(f"drill:{t}", rt.config.drills.schedule_for(t), job(t)) for t in tiers]
