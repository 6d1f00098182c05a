"""Per-tenant keys (envelope encryption): each tenant's snapshots are encrypted to its own
age recipient, and its private key exists only wrapped to the operator recipients.

A tenant's keyring, in every region and in the state folder's store (docs/format.md,
"Tenant keys"; with `[daemon] lock_dsn` that store is the cluster's shared state, so
the cluster holds one copy and an erasure on any host destroys it for all)::

    tenants/<tenant>/keys/<key_id>.age    the tenant's age identity, age-encrypted to
                                          [keys] recipients (ops and escrow)
    tenants/<tenant>/keys/<key_id>.json   its public record, authenticated with the
                                          manifest key
    tenants/<tenant>/keys/<key_id>.rewrap.age  while a rewrap works on it: the new
                                          wrapped copy (key_rotation.py)

`key_id` is derived from the tenant's recipient, so an unwrapped identity is
checked against the key id an authenticated manifest names: a planted wrapped
key is refused, and a planted or altered record fails its MAC and is never
encrypted to. Keyring objects are never written under Object Lock: destroying
every copy is how a tenant is erased.

Backups need only the public record (:func:`ensure_key`); restores, drills and
deep verifies get the identities that open a snapshot from
:func:`snapshot_identities`, the one place that unwraps (audit-logged). The
key's public record (pure: encoding, parsing, choosing) is tenant_key_record.py;
rewrapping and rotating keys, key_rotation.py.
"""

from __future__ import annotations

import getpass
import itertools
import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyrage
from pyrage import x25519

from . import layout, shared_state, statefs, tenancy
from .erasure_records import erasure_note
from .errors import DrError, IntegrityError, UsageError
from .keys import describe_recipients, fingerprint
from .manifest import Manifest
from .pipeline import parse_recipients
from .runtime import Runtime
from .storage import ObjectStore, StorageError
from .tenant_key_record import (
    KeyRecord,
    KnownKey,
    TenantKey,
    choose,
    created_stamp,
    encode_record,
    identity_from,
    key_id_of,
    key_objects,
    parse_record,
)

log = logging.getLogger("drdaemon")

# Both objects are a few hundred bytes; anything larger is not ours.
MAX_KEY_OBJECT_BYTES = 64 << 10
# One lock for making tenant keys on a state folder: creation is rare.
CREATE_LOCK = statefs.lock_file("tenant-keys")
STATE = "the state folder"
# Seconds a process encrypts to a tenant key it found stored everywhere before it
# lists the regions' keyrings again (ensure_key).
KEYRING_RECHECK = 300.0


# -- the keyring as stored ---------------------------------------------------------

@dataclass
class Survey:
    """What one look at the state folder and every region found of a tenant's keys."""

    records: dict[str, KeyRecord] = field(default_factory=dict)  # key id -> record
    # where ("the state folder" or a region) -> {(key id, "age"|"json")} present there
    present: dict[str, set[tuple[str, str]]] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)

    def usable(self) -> KeyRecord | None:
        """The key to encrypt to: authenticated, with a wrapped copy somewhere."""
        wrapped = {kid for names in self.present.values() for kid, ext in names if ext == "age"}
        return choose([r for kid, r in self.records.items() if kid in wrapped])


def keyring_regions(rt: Runtime, tenant: str) -> list[ObjectStore]:
    """The regions that hold `tenant`'s keyring: those its residency allows (for a
    shared source's label "a+b", those every one of its tenants allows)."""
    allowed = set(tenancy.regions_for_tenants(rt.config, tenancy.label_tenants(tenant)))
    return [s for s in rt.stores if s.name in allowed]


def writable_regions(rt: Runtime, tenant: str) -> list[ObjectStore]:
    """:func:`keyring_regions` that the residency allows also in the config file as it
    reads now (Runtime.configs_in_force): a rewrap writes nowhere else."""
    names = tenancy.label_tenants(tenant)
    allowed = [set(tenancy.regions_for_tenants(c, names)) for c in rt.configs_in_force()]
    return [s for s in keyring_regions(rt, tenant) if all(s.name in a for a in allowed)]


def _read_state(rt: Runtime, name: str) -> bytes | None:
    """A keyring file of the state folder's store (the cluster's shared state with
    lock_dsn), which uses the regions' names (docs/format.md)."""
    return rt.state.read(name)


def _names_in_state(rt: Runtime, tenant: str) -> set[tuple[str, str]]:
    found = (layout.parse_tenant_key_name(n)
             for n in rt.state.children(key_objects(tenant).rstrip("/")))
    return {f for f in found if f is not None}


def refuse_erased(rt: Runtime, tenant: str, regions: bool = True) -> None:
    """UsageError with the erasure note if `tenant`'s erasure began (on any host of the
    cluster): its key is never used, unwrapped or put back. A copy this host still finds
    in its own state folder (from before a move to lock_dsn, or on a host without it
    whose state missed an erasure run elsewhere) is removed first, with a warning and
    an audit record. `regions=False`: the state's erasure records only, no region
    listed (erasure_records.erasure_note)."""
    note = erasure_note(rt, tenant, regions)
    if note is None:
        return
    # The cluster's copy (lock_dsn) is the erasure's to destroy, and listed in its
    # certificate; a copy in this host's own folder is one no erasure may ever see.
    own = shared_state.FolderStore(rt.config.daemon.state_dir)
    folder = key_objects(tenant).rstrip("/")
    names = [n for n in own.children(folder) if not n.startswith(".")]
    for n in names:
        own.delete(f"{folder}/{n}")
    if names:
        log.warning("removed %d key file(s) of erased tenant %s from the %s (%s); %s",
                    len(names), tenant, own.where, ", ".join(names), note)
        rt.record_event("tenant_key.erased_copy_removed", tenant=tenant, where=own.where,
                        objects=[f"{folder}/{n}" for n in names])
    rt.known_keys.pop(tenant, None)
    raise UsageError(note)


def _add_record(rt: Runtime, survey: Survey, tenant: str, kid: str, raw: bytes | None,
                where: str) -> None:
    if raw is None or kid in survey.records:
        return
    try:
        survey.records[kid] = parse_record(raw, rt.manifest_key, tenant, kid)
    except IntegrityError as exc:
        # Never encrypted to: a planted record must not redirect encryption.
        log.warning("ignoring %s in %s: %s", layout.tenant_key_record(tenant, kid), where, exc)


def survey(rt: Runtime, tenant: str) -> Survey:
    """Read `tenant`'s keyring from the state folder and every region it uses."""
    out = Survey()
    names = _names_in_state(rt, tenant)
    out.present[STATE] = names
    for kid, ext in sorted(names):
        if ext == "json":
            _add_record(rt, out, tenant, kid, _read_state(rt, layout.tenant_key_record(
                tenant, kid)), STATE)
    for store in keyring_regions(rt, tenant):
        try:
            listed = {layout.parse_tenant_key_name(o.name) for o in
                      store.list(key_objects(tenant))}
            out.present[store.name] = {f for f in listed if f is not None}
            for kid, ext in sorted(out.present[store.name]):
                if ext == "json" and kid not in out.records:
                    raw = store.get_bytes(layout.tenant_key_record(tenant, kid),
                                          MAX_KEY_OBJECT_BYTES)
                    _add_record(rt, out, tenant, kid, raw, f"region {store.name}")
        except StorageError as exc:
            out.unreachable[store.name] = str(exc)
            out.present.pop(store.name, None)
    return out


def _known(rt: Runtime, tenant: str) -> TenantKey | None:
    """The key this process found stored everywhere, if that is recent and the state
    folder's keyring is as it was then (see ensure_key)."""
    known = rt.known_keys.get(tenant)
    if known is not None and time.monotonic() - known.at < KEYRING_RECHECK \
            and _names_in_state(rt, tenant) == known.state_names:
        return known.record.key
    return None


def look_ahead(rt: Runtime, tenant: str) -> Survey | None:
    """The keyring as `ensure_key` would read it now (None: it will not read it), read
    ahead (a backup does while its dump starts); makes nothing."""
    return None if _known(rt, tenant) is not None else survey(rt, tenant)


def ensure_key(rt: Runtime, tenant: str, ahead: Survey | None = None) -> TenantKey:
    """The key `tenant`'s snapshots are encrypted to: found, or made on first need.

    Needs no private key. Making one is race-safe: under a lock in the state
    folder the keyring is read again first, and when processes on two hosts
    made one each, all use the same one (:func:`choose`) and both stay stored.
    A copy missing in a region or the state folder is put back.

    The regions are listed once per KEYRING_RECHECK seconds and tenant in a
    process, not on every snapshot: a key found stored everywhere is used again
    (`Runtime.known_keys`) while the state folder's keyring is as it was then. A
    key made, rotated or erased on this host changes that folder, so it is seen
    at once; one rotated on another host is used by this one within
    KEYRING_RECHECK (the key used until then stays stored and opens the
    snapshots made with it). `ahead`: the keyring as `look_ahead` read it a moment
    ago, used instead of reading it again (a key is still made under the lock only
    after reading it afresh).

    A tenant whose erasure began is refused first, memo or not (:func:`refuse_erased`):
    with lock_dsn its note is in the shared state, seen at once by every host; the
    regions' certificates are read too whenever the keyring is (not on the memo path).
    """
    known = _known(rt, tenant)
    refuse_erased(rt, tenant, regions=known is None)
    if known is not None:
        return known
    rt.known_keys.pop(tenant, None)
    found = ahead if ahead is not None else survey(rt, tenant)
    if found.usable() is None:
        with statefs.locked(rt.config.daemon.state_dir, CREATE_LOCK, os.O_RDWR):
            found = survey(rt, tenant)  # another process may have made it meanwhile
            if found.usable() is None:
                if note := erasure_note(rt, tenant):
                    # An erased tenant gets no new key: its sources should be gone.
                    raise UsageError(f"{note}; remove its sources from the config")
                _make(rt, tenant)
                found = survey(rt, tenant)
    chosen = found.usable()
    if chosen is None:
        raise DrError(f"tenant {tenant}'s new key could not be stored anywhere: "
                      + "; ".join(f"{k}: {v}" for k, v in found.unreachable.items()))
    _repair(rt, chosen, found)
    if not found.unreachable:
        rt.known_keys[tenant] = KnownKey(chosen, frozenset(_names_in_state(rt, tenant)),
                                         time.monotonic())
    return chosen.key


def repair(rt: Runtime, tenant: str) -> str | None:
    """Put `tenant`'s key copies back where they are missing (as ensure_key does), without
    ever making a key: for replica repair, which copies snapshots that need one.
    Returns None, or the erasure note of an erased tenant, whose key is never put back
    (logged here: the other tenants' repair goes on)."""
    try:
        refuse_erased(rt, tenant)
        found = survey(rt, tenant)
        chosen = found.usable()
        if chosen is not None:
            _repair(rt, chosen, found)
    except UsageError as exc:
        log.warning("tenant %s's key is not put back: %s", tenant, exc)
        return str(exc)
    return None


def _make(rt: Runtime, tenant: str, created: str | None = None) -> TenantKey:
    """Make a tenant key: the wrapped identity first, then its record, state folder first.
    `created` (tenant_key_record.created_stamp) defaults to now."""
    ident = x25519.Identity.generate()
    key = TenantKey(tenant, key_id_of(str(ident.to_public())), str(ident.to_public()))
    stored, failed = _store_wrapped(rt, key, ident, created or created_stamp(rt.clock()))
    rt.record_event("tenant_key.created", tenant=tenant, key_id=key.key_id,
                    recipient=key.recipient, fingerprint=key.fingerprint,
                    wrapped_to=[fingerprint(r) for r in rt.config.keys.recipients],
                    regions=stored, failed_regions=failed)
    return key


def _store_wrapped(rt: Runtime, key: TenantKey, ident: x25519.Identity,
                   created: str) -> tuple[list[str], dict[str, str]]:
    """Wrap `ident` to the [keys] recipients and write it, then its record, to the state
    folder and every region; (regions written, regions failed with why)."""
    operators = rt.config.keys.recipients
    wrapped = pyrage.encrypt(f"{ident}\n".encode(), parse_recipients(operators))
    record = encode_record(key, created, [fingerprint(r) for r in operators], rt.manifest_key)
    objects = ((layout.tenant_key_object(key.tenant, key.key_id), wrapped),
               (layout.tenant_key_record(key.tenant, key.key_id), record))
    for name, blob in objects:
        rt.state.write(name, blob)
    stored, failed = [], {}
    for store in keyring_regions(rt, key.tenant):
        try:
            for name, blob in objects:
                store.put_bytes(name, blob, retain_until=None)  # never locked: erasure
            stored.append(store.name)
        except StorageError as exc:
            failed[store.name] = str(exc)  # put back by the next ensure_key
    return stored, failed


def _repair(rt: Runtime, chosen: KeyRecord, found: Survey) -> None:
    """Put the chosen key's wrapped copy and record back where they are missing."""
    key = chosen.key
    wanted = ((key.key_id, "age"), (key.key_id, "json"))
    checked = False
    for where, names in found.present.items():
        missing = [w for w in wanted if w not in names]
        if not missing:
            continue
        if not checked:  # an erasure begun since the caller looked: put nothing back
            refuse_erased(rt, key.tenant)
            checked = True
        repaired = []
        for kid, ext in missing:
            name = (layout.tenant_key_object if ext == "age" else layout.tenant_key_record)(
                key.tenant, kid)
            blob = chosen.raw if ext == "json" else _wrapped_copy(rt, found, name, where)
            if blob is None:
                continue
            try:
                if where == STATE:
                    rt.state.write(name, blob)
                else:
                    rt.store(where).put_bytes(name, blob, retain_until=None)
            except StorageError as exc:
                log.warning("cannot put back %s in region %s: %s", name, where, exc)
                continue
            repaired.append(name)
        if repaired:
            rt.record_event("tenant_key.repaired", tenant=key.tenant, key_id=key.key_id,
                            where=where, objects=repaired)


def _wrapped_copy(rt: Runtime, found: Survey, name: str, missing_in: str) -> bytes | None:
    """A wrapped key's bytes from the state folder, else from a region that has it.

    Unverifiable without a private key, so a planted copy may be copied along;
    unwrap checks each copy against its key id and tries the next.
    """
    copies = _copies(rt, name, [w for w in found.present if w != missing_in])
    return next((blob for _where, blob in copies), None)


def _copies(rt: Runtime, name: str, places: Sequence[str]) -> Iterator[tuple[str, bytes]]:
    """(where, bytes) of each copy of object `name`, read lazily in the order given."""
    for where in places:
        if where == STATE:
            blob = _read_state(rt, name)
        else:
            try:
                blob = rt.store(where).get_bytes(name, MAX_KEY_OBJECT_BYTES)
            except StorageError:  # NotFound included: try the next place
                blob = None
        if blob is not None:
            yield where, blob


# -- unwrapping: restores, drills, deep verifies ----------------------------------------

# Tenant keys a run has unwrapped already, by (tenant, key id): a run over many
# snapshots (verify --deep) unwraps each key once.
Unwrapped = dict[tuple[str, str], x25519.Identity]


def snapshot_identities(rt: Runtime, m: Manifest, identities: Sequence[x25519.Identity],
                        unwrapped: Unwrapped | None = None) -> list[x25519.Identity]:
    """The identities that open snapshot `m` (data and sealed facts), from the operator
    `identities` given: those themselves for a version 1 or 2 snapshot, the unwrapped
    tenant identity for version 3. UsageError (one line) when they cannot."""
    ref = m.tenant_key
    if ref is None:
        return list(identities)
    memo = {} if unwrapped is None else unwrapped
    wanted = (ref.tenant, ref.key_id)
    if wanted not in memo:
        memo[wanted] = unwrap(rt, ref.tenant, ref.key_id, identities)
    return [memo[wanted]]


def unwrap(rt: Runtime, tenant: str, key_id: str,
           identities: Sequence[x25519.Identity]) -> x25519.Identity:
    """The tenant's identity `key_id`, unwrapped with the operator `identities` (ops or
    escrow). Tries the state folder's copy, then each region's; audit-logs the outcome.

    UsageError when the tenant's erasure began (refuse_erased: no copy is tried), when
    no identity given fits (naming the recipients it is wrapped to), or when no copy
    exists anywhere; IntegrityError when every copy found holds another key (planted).
    """
    try:
        refuse_erased(rt, tenant)
    except UsageError as exc:
        _audit(rt, "tenant_key.unwrap_failed", tenant, key_id, reason=str(exc))
        raise
    places = [STATE] + [s.name for s in keyring_regions(rt, tenant)]
    refused, bad = False, []
    # A rewrap's staged copy (key_rotation.py) is tried after every settled one.
    copies = itertools.chain(_copies(rt, layout.tenant_key_object(tenant, key_id), places),
                             _copies(rt, layout.tenant_key_staged(tenant, key_id), places))
    for where, blob in copies:
        try:
            plain = pyrage.decrypt(blob, list(identities))
        except pyrage.DecryptError as exc:
            if "no matching keys" in str(exc).lower():
                refused = True
            else:
                bad.append(f"{where}: cannot be decrypted ({exc})")
            continue
        ident = identity_from(plain)
        if ident is None or key_id_of(str(ident.to_public())) != key_id:
            bad.append(f"{where}: holds another key than {key_id} (planted?)")
            continue
        _audit(rt, "tenant_key.unwrapped", tenant, key_id, copy=where)
        return ident
    reason = _unwrap_failure(rt, tenant, key_id, refused, bad)
    _audit(rt, "tenant_key.unwrap_failed", tenant, key_id, reason=reason)
    if bad and not refused:
        raise IntegrityError(reason)
    raise UsageError(reason)


def _audit(rt: Runtime, event: str, tenant: str, key_id: str, **fields: Any) -> None:
    rt.record_event(event, tenant=tenant, key_id=key_id, user=getpass.getuser(),
                    host=socket.gethostname(), **fields)


def _unwrap_failure(rt: Runtime, tenant: str, key_id: str, refused: bool,
                    bad: list[str]) -> str:
    """The one line saying why tenant `tenant`'s key `key_id` could not be unwrapped."""
    if refused:
        return (f"no identity given can unwrap tenant {tenant}'s key {key_id}; it is wrapped "
                f"to {describe_recipients(_wrapped_to(rt, tenant, key_id), rt.recipient_labels())}"
                ": give the identity of one of these")
    if bad:
        return f"no usable copy of tenant {tenant}'s key {key_id}: " + "; ".join(bad)
    note = erasure_note(rt, tenant)
    return note or (f"no copy of tenant {tenant}'s key {key_id} was found in any region or "
                    "the state folder")


def _wrapped_to(rt: Runtime, tenant: str, key_id: str) -> list[str]:
    """Fingerprints a key is wrapped to, from its authenticated record (else [keys])."""
    name = layout.tenant_key_record(tenant, key_id)
    for _where, raw in _copies(rt, name, [STATE] + [s.name for s in keyring_regions(rt, tenant)]):
        try:
            return list(parse_record(raw, rt.manifest_key, tenant, key_id).wrapped_to)
        except IntegrityError:
            continue
    return [fingerprint(r) for r in rt.config.keys.recipients]
