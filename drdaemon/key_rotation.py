"""Rotating keys without re-encrypting data: `drctl keys rewrap` wraps every tenant key
again to today's [keys] recipients, `drctl tenant rotate-key` starts a new tenant key.

Rewrap, one key at a time, one place at a time (the state folder, then each region
the tenant's residency allows), in this order (docs/format.md "Tenant keys"):

1. write the new wrapped copy as ``<key_id>.rewrap.age``, read it back and unwrap it
   with an identity of one of today's recipients: it must hold the key the
   authenticated record names;
2. replace ``<key_id>.age`` with the same bytes (read back), then ``<key_id>.json``
   with the record naming today's recipients (read back, authenticated);
3. delete ``<key_id>.rewrap.age`` and, where the bucket keeps versions, every older
   version of ``<key_id>.age`` (keyring objects are never locked): no copy that a
   removed recipient opens is left behind.

At every instant each place holds a wrapped copy that opens the key (the old
``.age`` until step 2, the verified new one from step 1 on) and an authenticated
record. A run killed anywhere leaves a ``.rewrap.age``, an older version or a record
naming other recipients somewhere; the next run sees the key unfinished there and
does that place again with a fresh wrapping. Keys finished everywhere are passed over.

A rotated tenant key is a new key whose record's `created` is after every other's
(tenant_key_record.choose picks the newest); the old keys stay, so older snapshots
keep opening, until the tenant's erasure destroys them all.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyrage
from pyrage import x25519

from . import layout, lifecycle, locks, statefs
from .erasure_records import erasure_note
from .errors import DrError, IntegrityError, UsageError
from .keys import describe_recipients, fingerprint
from .pipeline import parse_recipients
from .runtime import Runtime
from .storage import NotFound, ObjectStore, ObjectVersion, StorageError
from .tenant_key_record import (
    KeyRecord,
    encode_record,
    identity_from,
    key_id_of,
    parse_record,
    rotation_stamp,
)
from .tenant_keys import (
    CREATE_LOCK,
    MAX_KEY_OBJECT_BYTES,
    STATE,
    _make,
    survey,
    unwrap,
    writable_regions,
)

log = logging.getLogger("drdaemon")
Progress = Callable[[int, int, str], None]  # (tenants done, tenants in all, tenant)


@dataclass
class KeyRewrap:
    """What a rewrap did to one tenant key."""

    tenant: str
    key_id: str
    outcome: str  # "rewrapped", "unchanged" (wrapped to today's recipients already), "failed"
    old_wrapped_to: list[str] = field(default_factory=list)
    wrapped_to: list[str] = field(default_factory=list)
    places: list[str] = field(default_factory=list)  # where it was wrapped again
    old_versions_removed: int = 0
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "key_id": self.key_id, "outcome": self.outcome,
                "old_wrapped_to": self.old_wrapped_to, "wrapped_to": self.wrapped_to,
                "places": self.places, "old_versions_removed": self.old_versions_removed,
                "errors": self.errors}


@dataclass
class RewrapReport:
    """A whole rewrap: every key, and the tenants passed over (and why)."""

    wrapped_to: list[str]
    keys: list[KeyRewrap] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # tenant-wide (a region unreachable)

    @property
    def ok(self) -> bool:
        return not self.errors and all(k.outcome != "failed" for k in self.keys)

    def count(self, outcome: str) -> int:
        return sum(k.outcome == outcome for k in self.keys)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "wrapped_to": self.wrapped_to,
                "rewrapped": self.count("rewrapped"), "unchanged": self.count("unchanged"),
                "failed": self.count("failed"), "keys": [k.to_dict() for k in self.keys],
                "skipped": self.skipped, "errors": self.errors}


# -- which tenants have keys ---------------------------------------------------------

def keyring_tenants(rt: Runtime) -> list[str]:
    """Every tenant (or shared-source label) whose keys may exist: the config's, and
    those with a keyring in the state folder or a region (an offboarded tenant whose
    sources left the config still has keys to rewrap)."""
    found = {s.tenant for s in rt.config.sources} | set(lifecycle.configured_tenants(rt.config))
    state = rt.state  # the cluster's shared state with lock_dsn (tenant_keys.py)
    for name in state.children(layout.TENANTS):
        if state.children(layout.tenant_keys_prefix(name).rstrip("/")):
            found.add(name)
    for store in rt.stores:
        try:
            for info in store.list(f"{layout.TENANTS}/"):
                parts = info.name.split("/")
                if len(parts) == 4 and parts[2] == layout.KEYS:
                    found.add(parts[1])
        except StorageError as exc:
            log.warning("cannot list the keyrings in region %s: %s", store.name, exc)
    return sorted(found)


# -- rewrap ------------------------------------------------------------------------------

def rewrap(rt: Runtime, identities: Sequence[x25519.Identity],
           progress: Progress | None = None) -> RewrapReport:
    """Wrap every tenant key again to today's [keys] recipients (docstring above).

    `identities` open the keys as they are wrapped now, and at least one of them
    must be an identity of today's recipients: each new copy is unwrapped with it
    before the old one goes (UsageError otherwise). Holds the deletions lock (no
    erasure or prune meanwhile on this state folder); erased tenants are passed over.
    """
    operators = list(rt.config.keys.recipients)
    wanted = sorted(fingerprint(r) for r in operators)
    verifiers = [i for i in identities if str(i.to_public()) in operators]
    if not verifiers:
        raise UsageError(
            "no --identity given belongs to today's [keys] recipients ("
            + describe_recipients(wanted, rt.recipient_labels())
            + "): give one of them too (--identity is repeatable), so each new wrapped copy "
              "is opened before the old one is removed")
    report = RewrapReport(wanted)
    with locks.deletions_for(rt.config.daemon), rt.audit_batch():
        tenants = keyring_tenants(rt)
        for n, tenant in enumerate(tenants):
            if progress:
                progress(n, len(tenants), tenant)
            note = erasure_note(rt, tenant)
            if note:
                report.skipped[tenant] = note  # never recreate an erased tenant's keys
                continue
            _rewrap_tenant(rt, tenant, identities, verifiers, report)
        if progress:
            progress(len(tenants), len(tenants), "")
    return report


def _rewrap_tenant(rt: Runtime, tenant: str, identities: Sequence[x25519.Identity],
                   verifiers: Sequence[x25519.Identity], report: RewrapReport) -> None:
    found = survey(rt, tenant)
    for region, why in found.unreachable.items():
        report.errors.append(f"tenant {tenant}: region {region} cannot be read ({why}); "
                             "run the command again when it answers")
    if not found.records:
        report.skipped[tenant] = "no key yet"
        return
    stores = {s.name: s for s in writable_regions(rt, tenant)}
    places = [STATE] + [n for n in stores if n in found.present]
    for _kid, record in sorted(found.records.items()):
        report.keys.append(_rewrap_key(rt, record, places, stores, identities, verifiers,
                                       report.wrapped_to))


def _rewrap_key(rt: Runtime, record: KeyRecord, places: list[str],
                stores: dict[str, ObjectStore], identities: Sequence[x25519.Identity],
                verifiers: Sequence[x25519.Identity], wanted: list[str]) -> KeyRewrap:
    tenant, kid = record.key.tenant, record.key.key_id
    out = KeyRewrap(tenant, kid, "unchanged", wrapped_to=wanted)
    todo, old = [], set(record.wrapped_to)
    for place in places:
        try:
            settled, seen = _settled(rt, place, stores.get(place), record, wanted)
        except (DrError, OSError) as exc:
            out.errors.append(f"{place}: {exc}")
            continue
        old |= seen
        if not settled:
            todo.append(place)
    out.old_wrapped_to = sorted(old)
    if not todo:
        out.outcome = "failed" if out.errors else "unchanged"
        return out
    try:
        ident = unwrap(rt, tenant, kid, identities)
    except DrError as exc:
        out.outcome = "failed"
        out.errors.append(str(exc))
        return out
    blob = pyrage.encrypt(f"{ident}\n".encode(), parse_recipients(rt.config.keys.recipients))
    new_record = _record_for(rt, record, wanted)
    for place in todo:
        try:
            out.old_versions_removed += _rewrap_in(rt, place, stores.get(place), record, blob,
                                                   new_record, verifiers)
            out.places.append(place)
        except (DrError, OSError) as exc:
            out.errors.append(f"{place}: {exc}")
    out.outcome = "failed" if out.errors else "rewrapped"
    rt.record_event("tenant_key.rewrapped", tenant=tenant, key_id=kid,
                    old_wrapped_to=out.old_wrapped_to, wrapped_to=wanted, places=out.places,
                    old_versions_removed=out.old_versions_removed, errors=out.errors,
                    user=getpass.getuser(), host=socket.gethostname())
    return out


def _record_for(rt: Runtime, record: KeyRecord, wanted: list[str]) -> bytes:
    return encode_record(record.key, record.created, wanted, rt.manifest_key)


# -- one place ---------------------------------------------------------------------------

def _settled(rt: Runtime, place: str, store: ObjectStore | None, record: KeyRecord,
             wanted: list[str]) -> tuple[bool, set[str]]:
    """(whether the key is wrapped to `wanted` there and nothing of a rewrap is left,
    the recipients its record there names)."""
    tenant, kid = record.key.tenant, record.key.key_id
    obj, staged = layout.tenant_key_object(tenant, kid), layout.tenant_key_staged(tenant, kid)
    raw = _get(rt, place, store, layout.tenant_key_record(tenant, kid))
    try:
        here = set(parse_record(raw, rt.manifest_key, tenant, kid).wrapped_to) if raw else set()
    except IntegrityError:
        here = set()
    if store is None:
        names = _state_names(rt, tenant)
        clean = obj in names and staged not in names
    else:
        versions = [v for v in store.list_versions(layout.tenant_keys_prefix(tenant))
                    if v.name in (obj, staged)]
        clean = any(v.name == obj and v.latest and not v.delete_marker for v in versions) \
            and all(v.name == obj and v.latest for v in versions)
    return clean and raw is not None and sorted(here) == wanted, here


def _state_names(rt: Runtime, tenant: str) -> set[str]:
    folder = layout.tenant_keys_prefix(tenant)
    return {folder + n for n in rt.state.children(folder.rstrip("/"))}


def _rewrap_in(rt: Runtime, place: str, store: ObjectStore | None, record: KeyRecord,
               blob: bytes, new_record: bytes, verifiers: Sequence[x25519.Identity]) -> int:
    """Steps 1-3 in one place; the number of older versions removed."""
    tenant, kid = record.key.tenant, record.key.key_id
    obj, staged = layout.tenant_key_object(tenant, kid), layout.tenant_key_staged(tenant, kid)
    name = layout.tenant_key_record(tenant, kid)
    _put(rt, store, staged, blob)
    check_wrapped(_get(rt, place, store, staged), verifiers, record, f"{place}: {staged}")
    _put(rt, store, obj, blob)
    if _get(rt, place, store, obj) != blob:
        raise IntegrityError(f"{obj} reads back other bytes than were written")
    _put(rt, store, name, new_record)
    back = _get(rt, place, store, name)
    if back is None or parse_record(back, rt.manifest_key, tenant, kid).wrapped_to \
            != parse_record(new_record, rt.manifest_key, tenant, kid).wrapped_to:
        raise IntegrityError(f"{name} reads back another record than was written")
    if store is None:
        rt.state.delete(staged)
        return 0
    return _drop_versions(store, (v for v in store.list_versions(layout.tenant_keys_prefix(
        tenant)) if v.name == staged or (v.name == obj and not v.latest)))


def check_wrapped(blob: bytes | None, verifiers: Sequence[x25519.Identity], record: KeyRecord,
                  what: str) -> None:
    """IntegrityError unless `blob` unwraps with `verifiers` to the identity whose public
    recipient `record` (authenticated) names."""
    if blob is None:
        raise IntegrityError(f"{what} is missing right after it was written")
    try:
        ident = identity_from(pyrage.decrypt(blob, list(verifiers)))
    except pyrage.DecryptError as exc:
        raise IntegrityError(f"{what} does not open with the identity given: {exc}") from None
    if ident is None or str(ident.to_public()) != record.key.recipient \
            or key_id_of(str(ident.to_public())) != record.key.key_id:
        raise IntegrityError(f"{what} holds another key than {record.key.key_id}")


def _drop_versions(store: ObjectStore, versions: Iterable[ObjectVersion]) -> int:
    """Delete these versions for good, versions before delete markers (a marker removed
    first would show the version beneath it for a moment); how many."""
    chosen = sorted(versions, key=lambda v: v.delete_marker)
    for v in chosen:
        store.delete_version(v.name, v.version_id)
    return len(chosen)


def _put(rt: Runtime, store: ObjectStore | None, name: str, blob: bytes) -> None:
    if store is None:
        rt.state.write(name, blob)
    else:
        store.put_bytes(name, blob, retain_until=None)  # never locked: erasure


def _get(rt: Runtime, place: str, store: ObjectStore | None, name: str) -> bytes | None:
    if store is None:
        return rt.state.read(name)
    try:
        return store.get_bytes(name, MAX_KEY_OBJECT_BYTES)
    except NotFound:
        return None


# -- a new tenant key --------------------------------------------------------------------

@dataclass
class Rotation:
    """A tenant key rotation: the key in use before, the new one, the keys kept."""

    tenant: str
    old_key_ids: list[str]
    previous: str  # the key in use before
    key_id: str  # the new key, in use from now on
    fingerprint: str
    created: str

    def to_dict(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "previous_key_id": self.previous,
                "key_id": self.key_id, "fingerprint": self.fingerprint,
                "created": self.created, "kept_key_ids": self.old_key_ids}


def rotate_key(rt: Runtime, tenant: str) -> Rotation:
    """Start a new key for `tenant`'s future snapshots (after a suspected exposure).

    Made under the key-creation lock with a `created` after every existing key's, so
    every process picks it from its next backup on (tenant_key_record.choose). The
    old keys stay: snapshots name the key they were encrypted to and keep opening.
    """
    labels = sorted({s.tenant for s in rt.config.sources})
    if tenant not in labels:
        raise UsageError(f"tenant {tenant!r} has no configured source, so no future snapshot "
                         f"to start a key for (tenants with sources: {', '.join(labels)})")
    if note := erasure_note(rt, tenant):
        raise UsageError(note)
    with statefs.locked(rt.config.daemon.state_dir, CREATE_LOCK, os.O_RDWR):
        found = survey(rt, tenant)
        current = found.usable()
        if current is None:
            raise UsageError(f"tenant {tenant} has no key yet: its first backup makes one")
        if found.unreachable:
            raise DrError(f"tenant {tenant}'s keyring cannot be read in "
                          + "; ".join(f"{k}: {v}" for k, v in found.unreachable.items())
                          + ": a new key must be stored everywhere; try again when it answers")
        created = rotation_stamp(rt.clock(), list(found.records.values()))
        key = _make(rt, tenant, created)
        after = survey(rt, tenant).usable()
    if after is None or after.key.key_id != key.key_id:
        raise DrError(f"tenant {tenant}'s new key {key.key_id} was stored but is not the one "
                      "in use; see drctl tenant show")
    rotation = Rotation(tenant, sorted(found.records), current.key.key_id, key.key_id,
                        key.fingerprint, created)
    rt.record_event("tenant_key.rotated", tenant=tenant, key_id=key.key_id,
                    previous_key_id=current.key.key_id, fingerprint=key.fingerprint,
                    previous_fingerprint=current.key.fingerprint,
                    kept_key_ids=rotation.old_key_ids, user=getpass.getuser(),
                    host=socket.gethostname())
    return rotation
