"""Orphan data objects: data that no manifest and no trash entry names, cleaned up by prune.

How one arises: a backup completes the data object in a region and only then
writes the manifest there (backup.py). If that write fails, the backup deletes
the data again, but that delete can fail too, and a process killed between
the two steps leaves the data behind. Nothing lists it (no manifest, no
snapshot), so retention never sees it: it would cost storage forever, and
"every copy deleted within weeks of a contract's end" would not hold.

What counts (docs/format.md, "Orphan data objects"):

- only an object named exactly ``sources/<source>/data/<id>.<pgdump|tar>.zst.age``
  or ``sources/<source>/facts/<id>.json.zst`` (a facts object, treated as one
  more data object) of a configured source is ours; anything else is never touched;
- an id that any region names under ``manifests/`` or ``trash/`` (valid or
  not) is not an orphan: a copy without manifest beside a manifest elsewhere
  is a degraded snapshot that ``replicate --repair`` completes, a trashed one
  waits for its purge. If a region cannot be listed, nothing of that source
  is deleted: we cannot tell whether it is committed there.

When one may go: a backup commits its data object a moment before its manifest,
and a backup or repair on another host does the same with a name we cannot
see coming. So an orphan is deleted only when (1) an *earlier* prune on this
state folder already found it without any manifest or trash entry, at least
the grace period ago (first sightings are kept in
``<state_dir>/prune/orphans.json``, or with ``lock_dsn`` the cluster's shared
state), (2) its snapshot began at least the grace
period ago, (3) no live process on this host has it in flight (state.inflight),
(4) S3 Object Lock no longer holds it, and (5) the same safety net as
retention allows it. Just before the delete every region is asked once more
for its manifest.

A data object whose manifest this host's audit log says was written in that
region (``snapshot.committed``, ``replica.repaired``, ``prune.undo``) is no
orphan: drdaemon only removes manifests through the trash, and purge deletes
the data before the trash entry. Its manifest was lost or removed by hand (or
by an attacker), and the data may be the last copy of a snapshot that the
break-glass runbook can still restore. It is kept and reported as LOST, and
the run fails, until a person decides.

Pure core: :func:`holdings`, :func:`plan_orphans`. Shell: :func:`observe`,
:func:`plan_source`, :func:`delete`, and the sightings file.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from . import audit, layout, retention, shared_state, state, statefs
from .config import MAX_ORPHAN_GRACE as MAX_ORPHAN_GRACE
from .config import MIN_ORPHAN_GRACE as MIN_ORPHAN_GRACE
from .config import ORPHAN_GRACE as ORPHAN_GRACE
from .config import SourceConfig
from .errors import DrError
from .runtime import Runtime
from .storage import NotFound, ObjectInfo, ObjectStore
from .units import format_duration, format_utc

# The same words as prune's verdicts on snapshots.
KEEP, DELETE, LOCKED, BLOCKED = "keep", "delete", "locked", "blocked"
LOST = "lost"  # its manifest was committed here once: not a failed backup's leftover
COMMIT_EVENTS = ("snapshot.committed", "replica.repaired", "prune.undo")
# The grace period is `[retention] orphan_grace` (per source; ORPHAN_GRACE by
# default, from MIN_ORPHAN_GRACE to MAX_ORPHAN_GRACE), validated in config.py.


# -- functional core ---------------------------------------------------------

@dataclass(frozen=True)
class DataObject:
    name: str
    snapshot_id: str
    size: int


@dataclass(frozen=True)
class Holdings:
    """What one region holds under one source's prefix."""

    region: str
    data: tuple[DataObject, ...]  # objects named like data objects, nothing else
    referenced: frozenset[str]  # ids some manifest or trash object there is named after


def data_snapshot_id(source: str, name: str) -> str | None:
    """The snapshot id of a data (or facts) object's name, or None for anything not ours.

    A snapshot's facts object is one of its data objects here: left without a
    manifest, it is an orphan on the same terms.
    """
    obj = layout.parse_object_name(name)
    if obj is None or obj.source != source or obj.role not in (layout.DATA, layout.FACTS):
        return None
    try:
        layout.id_time(obj.snapshot_id)  # 20261399T999999Z matches the pattern, is no time
    except ValueError:
        return None
    return obj.snapshot_id


def holdings(source: str, region: str, listing: Iterable[ObjectInfo]) -> Holdings:
    """Sort one listing of ``sources/<source>/``: data objects, and ids that are referenced."""
    data: list[DataObject] = []
    referenced: set[str] = set()
    for info in listing:
        snap_id = data_snapshot_id(source, info.name)
        if snap_id is not None:
            data.append(DataObject(info.name, snap_id, info.size))
            continue
        # Anything under manifests/ or trash/ named after an id keeps that id's data.
        ref = layout.referenced_id(source, info.name)
        if ref is not None:
            referenced.add(ref)
    return Holdings(region, tuple(data), frozenset(referenced))


def committed_here(records: Iterable[Mapping[str, Any]], source: str,
                   ids: Collection[str]) -> dict[tuple[str, str], str]:
    """(region, id) -> the first audit record saying a manifest of `id` was written there."""
    found: dict[tuple[str, str], str] = {}
    for r in records:
        event, snap_id = r.get("event"), r.get("snapshot_id")
        if event not in COMMIT_EVENTS or r.get("source") != source or snap_id not in ids:
            continue
        regions = r.get("regions") if event == "snapshot.committed" else [r.get("region")]
        for region in regions if isinstance(regions, list) else ():
            found.setdefault((str(region), str(snap_id)),
                             f"{event} record {r.get('seq')} at {r.get('time')}")
    return found


@dataclass(frozen=True)
class OrphanVerdict:
    name: str
    snapshot_id: str
    size: int
    action: str  # KEEP, DELETE, LOCKED, BLOCKED or LOST
    reasons: tuple[str, ...]
    first_seen: datetime  # when this state folder first found it orphaned (now if never)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "snapshot_id": self.snapshot_id, "size": self.size,
                "action": self.action, "reasons": list(self.reasons),
                "first_seen": self.first_seen.isoformat()}


@dataclass(frozen=True)
class OrphanPlan:
    """The orphans of one source in one region, oldest id first."""

    source: str
    region: str
    data_objects: int  # every data object of the source there, orphan or not
    verdicts: tuple[OrphanVerdict, ...]
    blocked: str | None = None
    forced: str | None = None

    def count(self, action: str) -> int:
        return sum(v.action == action for v in self.verdicts)

    @property
    def to_delete(self) -> tuple[OrphanVerdict, ...]:
        return tuple(v for v in self.verdicts if v.action == DELETE)

    @property
    def lost(self) -> tuple[OrphanVerdict, ...]:
        return tuple(v for v in self.verdicts if v.action == LOST)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "region": self.region,
                "data_objects": self.data_objects, "blocked": self.blocked,
                "forced": self.forced,
                "counts": {a: self.count(a) for a in (KEEP, DELETE, LOCKED, BLOCKED, LOST)},
                "objects": [v.to_dict() for v in self.verdicts]}


def plan_orphans(source: str, held: Sequence[Holdings], now: datetime, *,
                 grace: timedelta = ORPHAN_GRACE,
                 first_seen: Mapping[tuple[str, str], datetime] | None = None,
                 unreadable: Mapping[str, str] | None = None,
                 in_flight: Collection[str] = frozenset(),
                 protected: Collection[str] = frozenset(),
                 locked: Mapping[tuple[str, str], datetime | None] | None = None,
                 committed: Mapping[tuple[str, str], str] | None = None,
                 max_delete_fraction: float = 0.5, force: bool = False
                 ) -> tuple[OrphanPlan, ...]:
    """Which data objects of `source` are orphans in each region, and which may go now.

    `first_seen` and `locked` are keyed by (region, object name), `committed`
    (see :func:`committed_here`) by (region, id); `unreadable` maps regions that
    could not be listed to why. Regions without orphans are left out.
    """
    first_seen = first_seen or {}
    locked = locked or {}
    committed = committed or {}
    referenced = frozenset(i for h in held for i in h.referenced)
    plans = []
    for h in held:
        verdicts = []
        for obj in sorted(h.data, key=lambda o: (o.snapshot_id, o.name)):
            if obj.snapshot_id in referenced:
                continue  # committed or trashed somewhere: repair or purge deals with it
            seen = min(first_seen.get((h.region, obj.name), now), now)
            why = f"no manifest or trash entry in any region (first seen {format_utc(seen)})"
            due = max(seen, layout.id_time(obj.snapshot_id)) + grace
            until = locked.get((h.region, obj.name))
            lost = committed.get((h.region, obj.snapshot_id))
            if lost is not None:
                action, more = LOST, (
                    f"its manifest was written here ({lost}) and is gone without a trash "
                    "entry: a lost manifest, not a failed backup; kept for a person to judge")
            elif obj.snapshot_id in in_flight:
                action, more = KEEP, "a backup on this host has it in flight"
            elif obj.snapshot_id in protected:
                action, more = KEEP, "protected"
            elif unreadable:
                action, more = KEEP, "; ".join(
                    f"region {r} unreadable, cannot tell whether it is committed there: {e}"
                    for r, e in sorted(unreadable.items()))
            elif now < due:
                action, more = KEEP, f"grace period: deleted from {format_utc(due)}"
            elif until is not None and until > now:
                action, more = LOCKED, f"locked until {format_utc(until)}"
            else:
                action, more = DELETE, f"past the {format_duration(grace)} grace period"
            verdicts.append(OrphanVerdict(obj.name, obj.snapshot_id, obj.size, action,
                                          (why, more), seen))
        if not verdicts:
            continue
        deletes, total = sum(v.action == DELETE for v in verdicts), len(h.data)
        # The same net as for snapshots: a listing gone wrong (manifests moved
        # away, a prefix mix-up) would make every data object look orphaned.
        blocked, forced = retention.delete_guard(deletes, total, max_delete_fraction, force,
                                                 "data objects")
        if blocked:
            verdicts = [OrphanVerdict(v.name, v.snapshot_id, v.size, BLOCKED,
                                      (*v.reasons, "safety net"), v.first_seen)
                        if v.action == DELETE else v for v in verdicts]
        plans.append(OrphanPlan(source, h.region, total, tuple(verdicts), blocked, forced))
    return tuple(plans)


# -- the sightings file ------------------------------------------------------

SEEN_FILE = statefs.ORPHAN_SIGHTINGS


def load_seen(state_dir: Path) -> dict[tuple[str, str], datetime]:
    """(region, name) -> first sighting as an orphan. Unreadable means none: later, not sooner."""
    try:
        raw = shared_state.at(state_dir).read(SEEN_FILE)
        if raw is None:
            return {}
        doc = json.loads(raw)
        return {(str(region), str(name)): datetime.fromisoformat(at).astimezone(UTC)
                for region, names in doc["seen"].items() for name, at in names.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def save_seen(state_dir: Path, old: Mapping[tuple[str, str], datetime],
              observed: Collection[tuple[str, str]], plans: Iterable[OrphanPlan],
              gone: Collection[tuple[str, str]], live: Collection[tuple[str, str]]) -> None:
    """Keep the sightings of (source, region) pairs not `observed` this run (among the
    configured `live` ones); replace the observed ones by this run's orphans, less
    those `gone` (deleted). Written atomically, and only if something changed."""
    def owner(region: str, name: str) -> tuple[str, str]:
        parts = name.split("/")
        return (parts[1] if len(parts) > 2 else "", region)

    new = {k: v for k, v in old.items() if owner(*k) in live and owner(*k) not in observed}
    for p in plans:
        for v in p.verdicts:
            if (p.region, v.name) not in gone:
                new[(p.region, v.name)] = v.first_seen
    if new == dict(old):
        return
    seen: dict[str, dict[str, str]] = {}
    for (region, name), at in sorted(new.items()):
        seen.setdefault(region, {})[name] = at.isoformat()
    shared_state.at(state_dir).write(
        SEEN_FILE, json.dumps({"version": 1, "seen": seen}, indent=1).encode())


# -- imperative shell --------------------------------------------------------

def observe(rt: Runtime, source: str) -> tuple[list[Holdings], dict[str, str]]:
    """One listing of the source's prefix per region; regions that fail are in the dict."""
    held, unreadable = [], {}
    for store in rt.stores:
        try:
            held.append(holdings(source, store.name,
                                 store.list(layout.source_prefix(source))))
        except DrError as exc:
            unreadable[store.name] = str(exc)
    return held, unreadable


def audit_records(state_dir: Path) -> Callable[[], list[dict[str, Any]]]:
    """This host's audit records, read at the first call only (the log grows for years)."""
    return functools.cache(lambda: audit.parse_records(audit.read_lines(state_dir)))


def plan_source(rt: Runtime, src: SourceConfig, now: datetime, *, grace: timedelta,
                first_seen: Mapping[tuple[str, str], datetime], in_flight: Collection[str],
                protected: Collection[str], force: bool,
                records: Callable[[], Iterable[Mapping[str, Any]]]
                ) -> tuple[tuple[OrphanPlan, ...], dict[str, str]]:
    """List, plan, look up what would go (audit log, Object Lock), plan again.
    Never raises DrError."""
    held, unreadable = observe(rt, src.name)

    def plan(locked: Mapping[tuple[str, str], datetime | None],
             committed: Mapping[tuple[str, str], str]) -> tuple[OrphanPlan, ...]:
        return plan_orphans(src.name, held, now, grace=grace, first_seen=first_seen,
                            unreadable=unreadable, in_flight=in_flight, protected=protected,
                            locked=locked, committed=committed, force=force,
                            max_delete_fraction=src.retention.max_delete_fraction)

    plans = plan({}, {})
    due = [(p.region, v) for p in plans for v in p.verdicts if v.action in (DELETE, BLOCKED)]
    if not due:
        return plans, unreadable
    # Only what would be deleted is looked up: in this host's audit log, and
    # for its lock (one HEAD each, and none at all in stores without Object Lock).
    committed = committed_here(records(), src.name, {v.snapshot_id for _, v in due})
    locked: dict[tuple[str, str], datetime | None] = {}
    for region, v in due:
        try:
            locked[(region, v.name)] = rt.store(region).retained_until(v.name)
        except DrError as exc:
            unreadable[region] = str(exc)
    return plan(locked, committed), unreadable


def delete(rt: Runtime, store: ObjectStore, source: str, v: OrphanVerdict) -> tuple[str, str]:
    """Delete one planned orphan after a last look; (status, detail) and an audit record."""
    mname = layout.manifest_object_name(source, v.snapshot_id)
    if v.snapshot_id in state.live_inflight(rt.config.daemon.state_dir):
        return "skipped", f"{v.name}: a backup on this host has it in flight; kept"
    for other in rt.stores:
        try:
            other.stat(mname)
        except NotFound:
            continue
        except DrError as exc:
            return "failed", f"{v.name} kept: cannot check for its manifest: {exc}"
        return "skipped", f"{v.name}: committed meanwhile in {other.name}; kept"
    try:
        store.delete(v.name)
    except DrError as exc:
        return "failed", str(exc)
    detail = (f"deleted orphan {v.name} ({v.size} bytes): no manifest or trash entry in "
              f"any region since {format_utc(v.first_seen)}")
    rt.record_event("prune.orphan", source=source, region=store.name,
                    snapshot_id=v.snapshot_id, data=v.name, size=v.size,
                    first_seen=v.first_seen.isoformat(), detail=detail)
    return "done", detail
