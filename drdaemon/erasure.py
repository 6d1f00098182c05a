"""Crypto-shredding a tenant: `drctl tenant erase` and the daemon call :func:`erase`.

Snapshots sit in COMPLIANCE-locked buckets for weeks; the contract wants every
copy of a departed tenant's data gone within 4 weeks. What makes that possible
is that the tenant's snapshots are encrypted to the tenant's own key, stored
only wrapped (docs/format.md, "Tenants"). Erasure, in this order:

1. destroy every copy of the tenant's wrapped keys: every region, every object
   version (and delete marker) where a bucket keeps versions, and the state
   folder;
2. delete every version of every snapshot object of the tenant's sources that
   no Object Lock holds, in every region, trash included - only names that
   match layout.py's patterns; a locked version stays (unreadable from step 1
   on) and prune deletes it once its lock ends (erasure_sweep.sweep_erased);
3. check: list every region (all versions) and the state folder again; a key
   copy still there, or a place that could not be listed, fails the erasure;
4. write the certificate (erasure_cert.py): JSON in the state folder and in
   every region, never locked; an HTML page beside it in the state folder;
   an audit record.

Resumable: before each deletion an intent line goes to the journal
(state folder ``tenants/<t>/erasure/journal.jsonl``). A run killed in the
middle leaves it; the next run lists everything again, deletes what is left,
and counts a journalled object that is no longer listed as deleted, so the
certificate covers the whole erasure. The journal goes once the certificate is
written everywhere.

Reading erasures back (certificates, the journal, the note that refuses an
erased tenant) is erasure_records.py; prune's sweep is erasure_sweep.py. This
module stays a little over 400 lines: the four steps share the Run record and
the journal, and are meant to be read in order, in one place.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from . import layout, lifecycle, locks, shared_state, statefs, tenancy
from .config import NAME_HINT, NAME_RE
from .erasure_cert import (
    STATE_FOLDER,
    Check,
    DestroyedKey,
    ErasureCertificate,
    LockedObject,
    StoredObject,
    render_html,
    serialize,
)
from .erasure_records import Journal, journal_path, read_journal, state_certificates
from .errors import DrError, UsageError
from .keys import fingerprint
from .runtime import Runtime
from .storage import ObjectStore, ObjectVersion
from .units import format_utc

MAX_KEY_RECORD_BYTES = 64 << 10
# Within a snapshot, the manifest goes first (the snapshot stops listing), the
# trash entry last (while it stays, prune knows the id), as prune orders it.
_ROLE_ORDER = {layout.MANIFESTS: 0, layout.FACTS: 1, layout.DATA: 2, layout.TRASH: 3}


class ErasureFailed(DrError):
    """The erasure did not complete (the certificate says why); exit 1."""


# -- the journal (read back by erasure_records.py) ------------------------------------

def _append(rt: Runtime, tenant: str, record: dict[str, Any]) -> None:
    line = json.dumps(record, sort_keys=True).encode() + b"\n"
    rt.state.append(journal_path(tenant),
                                                       lambda _last, _count: line)


# -- what there is ------------------------------------------------------------------

@dataclass
class Run:
    """One run of an erasure (or a prune sweep): what it found and did."""

    tenant: str
    now: datetime
    dry_run: bool
    journal: bool  # write intents to the journal before each deletion
    seen: set[tuple[str, str, str]] = field(default_factory=set)  # (where, name, version)
    unlisted: set[str] = field(default_factory=set)  # regions a listing failed in
    key_copies: list[StoredObject] = field(default_factory=list)
    deleted: list[StoredObject] = field(default_factory=list)
    locked: list[LockedObject] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _versions(store: ObjectStore, prefix: str, run: Run) -> list[ObjectVersion] | None:
    try:
        found = list(store.list_versions(prefix))
    except DrError as exc:
        run.errors.append(f"region {store.name}: cannot list {prefix}: {exc}")
        run.unlisted.add(store.name)
        return None
    run.seen.update((store.name, v.name, v.version_id) for v in found)
    return found


def _delete(rt: Runtime, run: Run, step: str, obj: StoredObject,
            store: ObjectStore | None) -> None:
    """Journal the intent, then delete one version (or state file) for good."""
    if run.dry_run:
        run.deleted.append(obj)
        return
    if run.journal:
        _append(rt, run.tenant, {"step": step, "delete": obj.to_dict()})
    try:
        if store is None:
            for place in shared_state.with_own_folder(rt.config.daemon.state_dir):
                place.delete(obj.name)
        else:
            store.delete_version(obj.name, obj.version_id)
    except (DrError, OSError) as exc:
        run.errors.append(f"{obj.where}: cannot delete {obj.name}"
                          + (f" version {obj.version_id}" if obj.version_id else "")
                          + f": {exc}")
        return
    run.deleted.append(obj)


# -- step 1: the keys -------------------------------------------------------------------

def _key_id_of(name: str) -> str | None:
    parsed = layout.parse_tenant_key_name(name)  # a rewrap's staged copy included
    if parsed is not None:
        return parsed[0]
    base = name.rsplit("/", 1)[-1]
    stem, dot, ext = base.rpartition(".")
    return stem if dot and ext in ("age", "json") and stem else None


def _describe_key(key_id: str, raw: bytes | None) -> DestroyedKey:
    """A key's public facts from its record (untrusted: checked against its id)."""
    try:
        recipient = json.loads(raw or b"")["recipient"]
        if not isinstance(recipient, str) or not recipient.startswith("age1"):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        return DestroyedKey(key_id, None, False)
    return DestroyedKey(key_id, fingerprint(recipient), layout.tenant_key_id(recipient) == key_id)


def _state_key_copies(rt: Runtime, tenant: str) -> list[StoredObject]:
    folder = statefs.tenant_keys_folder(tenant)
    # The cluster's copy (lock_dsn) and any this host kept from before it moved there.
    places = shared_state.with_own_folder(rt.config.daemon.state_dir)
    names = {n for place in places for n in place.children(folder)}
    return [StoredObject(STATE_FOLDER, f"{folder}/{n}") for n in sorted(names)
            if not n.startswith(".")]


def _region_key_copies(rt: Runtime, tenant: str,
                       run: Run) -> list[tuple[ObjectStore, ObjectVersion]]:
    found = []
    for store in rt.stores:
        versions = _versions(store, layout.tenant_keys_prefix(tenant), run)
        found += [(store, v) for v in versions or ()]
    return found


def _read_record(rt: Runtime, tenant: str, key_id: str,
                 regional: list[tuple[ObjectStore, ObjectVersion]]) -> bytes | None:
    rel = f"{statefs.tenant_keys_folder(tenant)}/{key_id}.json"
    for place in shared_state.with_own_folder(rt.config.daemon.state_dir):
        try:
            if (raw := place.read(rel)) is not None:
                return raw[:MAX_KEY_RECORD_BYTES]
        except (OSError, DrError):
            continue
    name = layout.tenant_key_record(tenant, key_id)
    for store, v in regional:
        if v.name == name and v.latest and not v.delete_marker:
            try:
                return store.get_bytes(name, MAX_KEY_RECORD_BYTES)
            except DrError:
                continue
    return None


def _destroy_keys(rt: Runtime, run: Run, known: dict[str, DestroyedKey]) -> dict[str, DestroyedKey]:
    """Step 1: record each key's public facts (once), then destroy every copy."""
    tenant = run.tenant
    local = _state_key_copies(rt, tenant)
    regional = _region_key_copies(rt, tenant, run)
    run.seen.update((o.where, o.name, o.version_id) for o in local)
    ids = {k for k in (_key_id_of(o.name) for o in local) if k}
    ids |= {k for k in (_key_id_of(v.name) for _, v in regional) if k}
    keys = dict(known)
    for key_id in sorted(ids - keys.keys()):
        keys[key_id] = _describe_key(key_id, _read_record(rt, tenant, key_id, regional))
        if not run.dry_run and run.journal:
            _append(rt, tenant, {"key": keys[key_id].to_dict()})
    for obj in local:
        _delete(rt, run, "key", obj, None)
    # Versions before delete markers: a marker removed first would show the
    # version beneath it to a reader for a moment.
    for store, v in sorted(regional, key=lambda sv: sv[1].delete_marker):
        _delete(rt, run, "key", StoredObject(store.name, v.name, v.version_id, v.size), store)
    run.key_copies = [o for o in run.deleted]
    run.deleted.clear()
    return keys


# -- step 2: the snapshot objects ----------------------------------------------------------

@dataclass(frozen=True)
class ObjectPlan:
    """What step 2 does with one source's versions in one region (plan_objects)."""

    delete: tuple[ObjectVersion, ...]  # in this order
    locked: tuple[tuple[ObjectVersion, datetime], ...]
    unknown: tuple[tuple[ObjectVersion, str], ...]  # lock unreadable: kept


def snapshot_versions(source: str, versions: Iterable[ObjectVersion]) -> list[ObjectVersion]:
    """The versions (not delete markers) named exactly as `source`'s snapshot objects:
    the only ones whose lock is asked for, and the only ones ever deleted."""
    return [v for v in versions if not v.delete_marker
            and (p := layout.parse_object_name(v.name)) is not None and p.source == source]


def plan_objects(source: str, versions: Iterable[ObjectVersion],
                 locks: Mapping[tuple[str, str], datetime | str | None],
                 now: datetime) -> ObjectPlan:
    """Pure: delete every version of `source`'s snapshot objects whose lock (from
    `locks`, by (name, version id); a str is why it could not be read) has ended;
    keep the others, dated. Names that do not parse as the source's are never
    touched. Within a snapshot the manifest goes first and the trash entry last
    (prune's order); delete markers go last, and only over names nothing stays under
    (so a snapshot prune trashed does not reappear in a listing)."""
    ours = [(v, p) for v in versions
            if (p := layout.parse_object_name(v.name)) is not None and p.source == source]
    ours.sort(key=lambda vp: (vp[1].snapshot_id, _ROLE_ORDER[vp[1].role], vp[0].name,
                              vp[0].version_id))
    delete: list[ObjectVersion] = []
    locked: list[tuple[ObjectVersion, datetime]] = []
    unknown: list[tuple[ObjectVersion, str]] = []
    for v, _ in ours:
        if v.delete_marker:
            continue
        until = locks.get((v.name, v.version_id))
        if isinstance(until, str):
            unknown.append((v, until))
        elif until is not None and until > now:
            locked.append((v, until))
        else:
            delete.append(v)
    held = {v.name for v, _ in locked} | {v.name for v, _ in unknown}
    delete += [v for v, _ in ours if v.delete_marker and v.name not in held]
    return ObjectPlan(tuple(delete), tuple(locked), tuple(unknown))


def _lock(store: ObjectStore, v: ObjectVersion) -> datetime | str | None:
    try:
        return store.version_retained_until(v.name, v.version_id)
    except DrError as exc:
        return str(exc)


def delete_snapshot_objects(rt: Runtime, run: Run, sources: Iterable[str]) -> None:
    """Step 2 (and prune's sweep): list every version of `sources`' objects in every
    region, ask the lock of each snapshot object, then carry out :func:`plan_objects`."""
    for source in sources:
        for store in rt.stores:
            versions = _versions(store, layout.source_prefix(source), run)
            if versions is None:
                continue
            locks = {(v.name, v.version_id): _lock(store, v)
                     for v in snapshot_versions(source, versions)}
            plan = plan_objects(source, versions, locks, run.now)
            run.locked += [LockedObject(store.name, v.name, v.version_id, until)
                           for v, until in plan.locked]
            run.errors += [f"region {store.name}: cannot read the lock of {v.name}: {why}"
                           for v, why in plan.unknown]
            for v in plan.delete:
                _delete(rt, run, "object", StoredObject(store.name, v.name, v.version_id,
                                                        v.size), store)


# -- step 3: the check ----------------------------------------------------------------------

def check_keys_gone(rt: Runtime, tenant: str) -> Check:
    """List every region (all versions) and the state folder for copies of the tenant's keys."""
    remaining: list[StoredObject] = []
    unreadable: list[tuple[str, str]] = []
    places: list[str] = []
    for store in rt.stores:
        try:
            remaining += [StoredObject(store.name, v.name, v.version_id, v.size)
                          for v in store.list_versions(layout.tenant_keys_prefix(tenant))]
        except DrError as exc:
            unreadable.append((store.name, str(exc)))
            continue
        places.append(store.name)
    try:
        remaining += _state_key_copies(rt, tenant)
        places.append(STATE_FOLDER)
    except (OSError, DrError) as exc:
        unreadable.append((STATE_FOLDER, str(exc)))
    return Check(not remaining and not unreadable, tuple(places), tuple(remaining),
                 tuple(unreadable))


# -- the service ----------------------------------------------------------------------------

def _refuse_shared(rt: Runtime, tenant: str, now: datetime) -> None:
    shared = tenancy.shared_sources(rt.config, tenant)
    if not shared:
        return
    by = max(tenancy.ages_out_by(rt.config.source(s.source), now) for s in shared)
    names = ", ".join(f"{s.source} (with {', '.join(s.others)})" for s in shared)
    raise UsageError(
        f"tenant {tenant} cannot be crypto-shredded alone: its data is in shared sources "
        f"{names}, whose snapshots hold other tenants' data under the same keys; remove its "
        f"data from them and their copies age out under retention by {format_utc(by)[:10]}")


def _previously(journal: Journal, run: Run) -> list[tuple[str, StoredObject]]:
    """Intents of earlier runs whose objects this run no longer found: deleted then.
    Where this run could not list, nothing is known: a later run will tell."""
    gone = {(o.where, o.name, o.version_id): (step, o) for step, o in journal.intents
            if (o.where, o.name, o.version_id) not in run.seen and o.where not in run.unlisted}
    return list(gone.values())  # an object tried twice (a failed delete) counts once


def erase(rt: Runtime, tenant: str, dry_run: bool = False,
          now: datetime | None = None) -> ErasureCertificate:
    """Crypto-shred `tenant` (module docstring); idempotent, resumes an interrupted run.

    Raises UsageError for a bad name, an unknown tenant or a shared source;
    returns the certificate otherwise, complete or not (`.ok`): the caller
    fails loudly on an incomplete one. A dry run lists and changes nothing.
    """
    if not NAME_RE.match(tenant):
        raise UsageError(f"invalid tenant name {tenant!r}: {NAME_HINT}")
    now = now or rt.clock()
    journal = read_journal(rt, tenant)
    configured = [s.name for s in tenancy.sources_of(rt.config, tenant)]
    # Sources an earlier erasure covered count too: the config may have dropped them.
    earlier_sources = [s for c in state_certificates(rt, tenant) for s in c.sources]
    sources = tuple(dict.fromkeys((*journal.sources, *earlier_sources, *configured)))
    if not sources:
        known = sorted({s.tenant for s in rt.config.sources}) or ["none"]
        raise UsageError(f"no source of tenant {tenant!r} in {rt.config.path} and no earlier "
                         f"erasure of it (tenants: {', '.join(known)})")
    _refuse_shared(rt, tenant, now)
    state = lifecycle.load(rt, tenant)
    if state.hold is not None and not dry_run:
        raise UsageError(f"tenant {tenant} is under legal hold ({state.hold.reason}, since "
                         f"{format_utc(state.hold.since)}): erasure waits until "
                         f"`drctl tenant release {tenant}`")
    started = journal.started_at or now
    run = Run(tenant, now, dry_run, journal=not dry_run)
    lock: AbstractContextManager[object] = (
        nullcontext() if dry_run else locks.deletions_for(rt.config.daemon))
    with rt.audit_batch(), lock:
        if not dry_run:  # a daemon that lost the cluster lock erases nothing
            rt.fence(f"the erasure of tenant {tenant}")
        if not dry_run and journal.started_at is None:
            _append(rt, tenant, {"begin": {"started_at": format_utc(started),
                                           "sources": list(sources)}})
        keys = _destroy_keys(rt, run, journal.keys)
        delete_snapshot_objects(rt, run, sources)
        check = check_keys_gone(rt, tenant) if not dry_run else Check(
            False, (), tuple(run.key_copies), ())
        earlier = _previously(journal, run)
        cert = ErasureCertificate(
            tenant=tenant, started_at=started, finished_at=rt.clock(), sources=sources,
            places=(*(s.name for s in rt.stores), STATE_FOLDER),
            keys=tuple(sorted(keys.values(), key=lambda k: k.key_id)),
            key_copies=tuple(o for step, o in earlier if step == "key") + tuple(run.key_copies),
            deleted=tuple(o for step, o in earlier if step == "object") + tuple(run.deleted),
            locked=tuple(run.locked), check=check, errors=tuple(run.errors), dry_run=dry_run)
        if not dry_run:
            _publish(rt, cert)
            _record_in_lifecycle(rt, cert)
    return cert


def _record_in_lifecycle(rt: Runtime, cert: ErasureCertificate) -> None:
    """The tenant's lifecycle state learns the erasure (so the deadline alerts end),
    finished only when the certificate says every key copy is gone."""
    done = cert.finished_at if cert.ok else None
    lifecycle.update(rt, cert.tenant, lambda s: replace(
        s, erasure=lifecycle.Erasure(cert.started_at, done, cert.name)))


def _publish(rt: Runtime, cert: ErasureCertificate) -> None:
    """Step 4: the certificate everywhere, the audit record, then the journal goes."""
    raw = serialize(cert, rt.manifest_key)
    state = rt.state
    folder = statefs.erasure_folder(cert.tenant)
    state.write(f"{folder}/{cert.stamp}.json", raw)
    state.write(f"{folder}/{cert.stamp}.html", render_html(cert).encode())
    failed = []
    for store in rt.stores:
        try:
            store.put_bytes(cert.name, raw)  # never locked: it names what was destroyed
        except DrError as exc:
            failed.append(f"{store.name}: {exc}")
    rt.record_event("tenant.erase", tenant=cert.tenant, certificate=cert.name,
                    ok=cert.ok and not failed, sources=list(cert.sources),
                    key_ids=[k.key_id for k in cert.keys],
                    fingerprints=[k.fingerprint for k in cert.keys if k.fingerprint],
                    key_copies_destroyed=len(cert.key_copies), objects_deleted=len(cert.deleted),
                    objects_locked=len(cert.locked), check=cert.check.summary(),
                    errors=list(cert.errors), certificate_not_written=failed)
    if cert.ok and not failed:
        state.delete(journal_path(cert.tenant))
    elif failed:
        raise ErasureFailed(f"erasure of {cert.tenant}: the certificate could not be written "
                            f"to {'; '.join(failed)}; run the erasure again")
