"""Proving a recipient: does this identity open what it must?

A backup is only as good as the keys that open it. `drctl keys prove` (and the
daemon, with the identity it holds) shows that an operator identity (ops or
escrow) unwraps every tenant key in every region, and opens the age header of
the newest snapshot of each source still in the older single-key format
(manifest without `encryption.tenant_key`): a ranged read of the header, no
download of the data. The outcome is recorded per recipient fingerprint in the
audit log (`keys.proven`); the daemon reads those records back, also those made
on other hosts (the offline escrow machine), from the regions' mirrors of the
audit log (proof_log.py).

Nothing unwrapped leaves this module: the tenant identities are checked against
their key id and dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyrage
from pyrage import x25519

from . import catalog, layout
from .keys import fingerprint
from .manifest import Manifest
from .runtime import Runtime
from .storage import ObjectStore, StorageError, read_head
from .tenant_key_record import identity_from, key_id_of
from .tenant_keys import MAX_KEY_OBJECT_BYTES, STATE, survey

log = logging.getLogger("drdaemon")

PROVEN = "keys.proven"  # the audit event, one per recipient proven
# An age header is a few hundred bytes per recipient; one read of this many holds it.
HEADER_READ = 16 << 10
NONCE = 16  # the payload nonce that follows the header: age wants it before it answers

# How a proof came about (the `scope` of its record).
BY_COMMAND, BY_DAEMON, BY_DRILL = "command", "daemon", "drill"


@dataclass(frozen=True)
class Sealed:
    """One thing an identity must open: a wrapped tenant key or a snapshot's age header.

    `blob` is what was read (None: nothing could be, `why` says so); `key_id` is set
    for a wrapped key, whose unwrapped identity must be that key.
    """

    what: str  # "tenant t's key K in region R" / "snapshot S of source X in region R"
    blob: bytes | None
    why: str = ""
    key_id: str | None = None


@dataclass
class RecipientProof:
    """What one identity opened, and every thing it could not (each named)."""

    fingerprint: str
    name: str
    keys_opened: int = 0
    snapshots_opened: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "recipient": self.name, "ok": self.ok,
                "keys_opened": self.keys_opened, "snapshots_opened": self.snapshots_opened,
                "failures": list(self.failures)}


@dataclass
class Proof:
    """`drctl keys prove`: one result per identity in the identity file."""

    recipients: list[RecipientProof]
    keys: int  # wrapped copies checked
    snapshots: int  # single-key snapshot headers checked

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.recipients)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "keys_checked": self.keys, "snapshots_checked": self.snapshots,
                "recipients": [r.to_dict() for r in self.recipients]}


# -- pure ------------------------------------------------------------------------

def header_of(head: bytes) -> bytes | None:
    """The age header and payload nonce at the start of `head`, or None if `head`
    holds no complete header (not an age file, or a header longer than was read)."""
    if not head.startswith(b"age-encryption.org/v1\n"):
        return None
    mac = head.find(b"\n---")
    end = head.find(b"\n", mac + 1) if mac >= 0 else -1
    if end < 0 or len(head) < end + 1 + NONCE:
        return None
    return head[:end + 1 + NONCE]


def opens_header(header: bytes, identity: x25519.Identity) -> str | None:
    """None if `identity` opens the age `header` (header_of): its file key unwraps and
    the header's MAC holds; else why not. The payload is not there, so age stops at it."""
    try:
        pyrage.decrypt(header, [identity])
    except pyrage.DecryptError as exc:
        text = str(exc)
        if "truncated" in text:  # past the header: the file key opened it
            return None
        if "no matching keys" in text.lower():
            return "not encrypted to this recipient"
        return f"damaged age header ({text})"
    return None


def opens_wrapped(blob: bytes, key_id: str, identity: x25519.Identity) -> str | None:
    """None if `identity` unwraps `blob` to tenant key `key_id`; else why not."""
    try:
        plain = pyrage.decrypt(blob, [identity])
    except pyrage.DecryptError as exc:
        if "no matching keys" in str(exc).lower():
            return "not wrapped to this recipient"
        return f"cannot be decrypted ({exc})"
    ident = identity_from(plain)
    if ident is None or key_id_of(str(ident.to_public())) != key_id:
        return f"holds another key than {key_id} (planted?)"
    return None


def judge(identities: Sequence[x25519.Identity], sealed: Iterable[Sealed],
          names: dict[str, str]) -> list[RecipientProof]:
    """Each identity against every sealed thing: what it opened, what not and why.
    `names`: recipient fingerprint -> configured name."""
    items = list(sealed)
    out = []
    for ident in identities:
        fp = fingerprint(str(ident.to_public()))
        proof = RecipientProof(fp, names.get(fp, "not in [keys] recipients"))
        if not items:  # opening nothing proves nothing
            proof.failures.append("nothing to open: no tenant key and no single-key "
                                  "snapshot was found in any region")
        for s in items:
            if s.blob is None:
                proof.failures.append(f"{s.what}: {s.why}")
                continue
            why = (opens_wrapped(s.blob, s.key_id, ident) if s.key_id is not None
                   else opens_header(s.blob, ident))
            if why is not None:
                proof.failures.append(f"{s.what}: {why}")
            elif s.key_id is not None:
                proof.keys_opened += 1
            else:
                proof.snapshots_opened += 1
        out.append(proof)
    return out


def recipient_names(recipients: Sequence[str], names: dict[str, str]) -> dict[str, str]:
    """Fingerprint -> the configured name of each [keys] recipient ("recipients[i]" unnamed)."""
    return {fingerprint(r): names.get(r) or f"recipients[{i}]" for i, r in enumerate(recipients)}


# -- reading what must open --------------------------------------------------------

def tenants_with_keys(rt: Runtime) -> list[str]:
    """Every tenant (or shared source's label) whose keyring the config implies."""
    return sorted({s.tenant for s in rt.config.sources} | set(rt.config.tenants))


def wrapped_keys(rt: Runtime, tenant: str) -> list[Sealed]:
    """Every wrapped copy of every key of `tenant`, in every region its keyring uses; a key
    missing in one of them, or a region that cannot be read, is a Sealed without bytes."""
    found = survey(rt, tenant)
    out = [Sealed(f"tenant {tenant}'s keys in region {r}", None, f"unreadable ({why})")
           for r, why in sorted(found.unreachable.items())]
    regions = {w: names for w, names in found.present.items() if w != STATE}
    wanted = set(found.records) | {kid for names in regions.values()
                                   for kid, ext in names if ext == "age"}
    for region, names in sorted(regions.items()):
        store = rt.store(region)
        for kid in sorted(wanted):
            what = f"tenant {tenant}'s key {kid} in region {region}"
            if (kid, "age") not in names:
                out.append(Sealed(what, None, "no wrapped copy there", kid))
                continue
            try:
                blob = store.get_bytes(layout.tenant_key_object(tenant, kid),
                                       MAX_KEY_OBJECT_BYTES)
            except StorageError as exc:
                out.append(Sealed(what, None, f"unreadable ({exc})", kid))
                continue
            out.append(Sealed(what, blob, key_id=kid))
    return out


def single_key_headers(rt: Runtime) -> list[Sealed]:
    """The age header of the newest snapshot of each configured source, where that
    snapshot is of the older single-key format (encrypted to [keys] recipients): read
    from each region that holds it, with one ranged read each."""
    # The daemon's cache spares a GET of every manifest it authenticated before.
    listing = catalog.list_snapshots(rt, cache=rt.manifest_cache)
    configured = {s.name for s in rt.config.sources}
    out = [Sealed(f"region {r}", None, f"cannot be listed ({why})")
           for r, why in sorted(listing.region_errors.items())]
    for source, entry in sorted(catalog.newest_by_source(listing.snapshots).items()):
        m = entry.manifest
        if source not in configured or m is None or m.tenant_key is not None:
            continue
        for region in entry.regions:
            out.append(_header(rt.store(region), m))
    return out


def _header(store: ObjectStore, m: Manifest) -> Sealed:
    what = f"snapshot {m.id} of source {m.source} in region {store.name}"
    try:
        head = read_head(store, m.data_name, HEADER_READ)
    except StorageError as exc:
        return Sealed(what, None, f"unreadable ({exc})")
    header = header_of(head)
    if header is None:
        return Sealed(what, None, f"no age header in its first {HEADER_READ} bytes")
    return Sealed(what, header)


# -- the service -------------------------------------------------------------------

def prove(rt: Runtime, identities: Sequence[x25519.Identity], scope: str = BY_COMMAND) -> Proof:
    """Show what each of `identities` opens: every tenant key in every region, and the
    header of each source's newest single-key snapshot; record one `keys.proven` per
    identity in the audit log. Failures are collected, never raised."""
    sealed: list[Sealed] = []
    for tenant in tenants_with_keys(rt):
        sealed += wrapped_keys(rt, tenant)
    sealed += single_key_headers(rt)
    names = recipient_names(rt.config.keys.recipients, rt.config.keys.names)
    proof = Proof(judge(identities, sealed, names),
                  sum(1 for s in sealed if s.key_id is not None),
                  sum(1 for s in sealed if s.key_id is None))
    with rt.audit_batch():
        for r in proof.recipients:
            rt.record_event(PROVEN, scope=scope, **r.to_dict())
    return proof


def record_drill_unwrap(rt: Runtime, tenant: str, key_id: str,
                        identities: Sequence[x25519.Identity]) -> None:
    """A drill unwrapped `tenant`'s key `key_id` with the operator `identities`: when that
    was one identity, its recipient is shown to open that key; record it (no new read)."""
    if len(identities) != 1:
        return  # age does not say which of several opened it
    fp = fingerprint(str(identities[0].to_public()))
    names = recipient_names(rt.config.keys.recipients, rt.config.keys.names)
    rt.record_event(PROVEN, scope=BY_DRILL, fingerprint=fp,
                    recipient=names.get(fp, "not in [keys] recipients"), ok=True,
                    keys_opened=1, snapshots_opened=0, failures=[], tenant=tenant,
                    key_id=key_id)
