"""What the daemon knows of its recipients: when each was last proven, and whether
every tenant key is wrapped to every configured recipient.

Proofs (`keys.proven` records, key_proof.py) are read from the local audit log
and from every other chain mirrored in the regions (`audit/<host>/<chain>/`,
audit_mirror.py): that is how a proof made by the escrow custodian on an offline
machine reaches the daemon. A mirrored chain counts only as far as it verifies
with the audit key (:func:`_verified`, the one place that checks one). Each check
lists `audit/` once per region, whatever the number of hosts.

The daemon's `keys` job (:func:`check`) first proves the identity it holds
(`[keys] identity_file`), then reads both; metrics export the outcome.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import audit, layout
from .audit import chain_keys
from .audit_chain import mirror_folder, parse_records, verify_lines
from .audit_mirror import read_mirror
from .key_proof import BY_DAEMON, PROVEN, Proof, prove, recipient_names, tenants_with_keys
from .keys import fingerprint, load_identities
from .runtime import Runtime
from .storage import StorageError
from .tenant_keys import survey

log = logging.getLogger("drdaemon")


@dataclass(frozen=True)
class RecipientState:
    """A configured recipient, and when a proof last showed its identity opens everything."""

    name: str
    fingerprint: str
    last_proven: datetime | None  # None: never, as far as the logs read tell


@dataclass
class KeysCheck:
    """The daemon's `keys` job: its own proof (if it holds an identity), each configured
    recipient's last proof, and each tenant key's configured recipients it lacks."""

    checked_at: datetime
    recipients: list[RecipientState]
    # (tenant, fingerprint of a configured recipient) -> that tenant's keys not wrapped to it
    missing: dict[tuple[str, str], int]
    proof: Proof | None = None
    unreadable: dict[str, str] = field(default_factory=dict)  # where -> why

    @property
    def ok(self) -> bool:
        """The daemon's own proof passed and every tenant key has every recipient. A
        recipient proven long ago (or never) is for the metrics and their alert to say."""
        return (self.proof is None or self.proof.ok) and not any(self.missing.values())

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked_at": self.checked_at.isoformat(),
                "recipients": [{"recipient": r.name, "fingerprint": r.fingerprint,
                                "last_proven": r.last_proven.isoformat()
                                if r.last_proven else None} for r in self.recipients],
                "missing": [{"tenant": t, "fingerprint": f, "keys": n}
                            for (t, f), n in sorted(self.missing.items()) if n],
                "proof": self.proof.to_dict() if self.proof else None,
                "unreadable": dict(self.unreadable)}


# -- pure ------------------------------------------------------------------------

def last_proven(records: Iterable[dict[str, Any]]) -> dict[str, datetime]:
    """Fingerprint -> the time of its newest successful `keys.proven` record."""
    out: dict[str, datetime] = {}
    for r in records:
        fp = r.get("fingerprint")
        if r.get("event") != PROVEN or r.get("ok") is not True or not isinstance(fp, str):
            continue
        try:
            at = datetime.fromisoformat(str(r.get("time")))
        except ValueError:
            continue
        if at.tzinfo is not None and (fp not in out or at > out[fp]):
            out[fp] = at
    return out


def missing_recipients(wrapped_to: Iterable[tuple[str, Iterable[str]]],
                       configured: Iterable[str]) -> dict[tuple[str, str], int]:
    """(tenant, configured fingerprint) -> how many of the tenant's keys (given as
    (tenant, fingerprints it is wrapped to)) are not wrapped to it; 0 for none."""
    wanted = list(configured)
    out: dict[tuple[str, str], int] = {}
    for tenant, fps in wrapped_to:
        have = set(fps)
        for fp in wanted:
            out[(tenant, fp)] = out.get((tenant, fp), 0) + (fp not in have)
    return out


# -- reading the logs --------------------------------------------------------------

def _verified(lines: list[bytes], rt: Runtime) -> list[bytes]:
    """The lines of a chain that verify with this runtime's keys (the audit keys of its
    manifest key set, its signing keys), from the first on."""
    result = verify_lines(lines, chain_keys(rt))
    return lines[:result.records]


def proof_records(rt: Runtime, unreadable: dict[str, str]) -> list[dict[str, Any]]:
    """Every `keys.proven` record of the local log and of every other chain mirrored in
    any region (one LIST of `audit/` per region); each chain as far as it verifies."""
    local = audit.read_lines(rt.config.daemon.state_dir)
    mine = mirror_folder(audit.chain_label(rt.config.daemon), local[0]) if local else None
    records = _proofs(_verified(local, rt))
    seen = {mine}
    for store in rt.stores:
        try:
            folders = {info.name.rsplit("/", 1)[0]
                       for info in store.list(layout.AUDIT_MIRROR + "/")}
            for folder in sorted(folders - seen):
                records += _proofs(_verified(read_mirror(store, folder), rt))
                seen.add(folder)  # the same chain in another region adds nothing
        except StorageError as exc:
            unreadable[f"region {store.name}"] = str(exc)
    return records


def _proofs(lines: list[bytes]) -> list[dict[str, Any]]:
    return [r for r in parse_records(lines) if r.get("event") == PROVEN]


def wrapped_to(rt: Runtime, unreadable: dict[str, str]) -> list[tuple[str, tuple[str, ...]]]:
    """(tenant, fingerprints it is wrapped to) of every tenant key, from the authenticated
    key records: no unwrapping."""
    out = []
    for tenant in tenants_with_keys(rt):
        found = survey(rt, tenant)
        for where, why in found.unreachable.items():
            unreadable[f"region {where}"] = why
        out += [(tenant, r.wrapped_to) for _kid, r in sorted(found.records.items())]
    return out


# -- the daemon's job --------------------------------------------------------------

def check(rt: Runtime, prove_own: bool = True) -> KeysCheck:
    """Prove the identity the daemon holds ([keys] identity_file; not with `prove_own`
    False, the daemon's look at start), then read every recipient's last proof and every
    tenant key's recipients."""
    proof = None
    if prove_own and rt.config.keys.identity_file is not None:
        proof = prove(rt, load_identities(rt.config.keys.identity_file), BY_DAEMON)
    unreadable: dict[str, str] = {}
    proven = last_proven(proof_records(rt, unreadable))
    keys = rt.config.keys
    names = recipient_names(keys.recipients, keys.names)
    recipients = [RecipientState(names[fingerprint(r)], fingerprint(r),
                                 proven.get(fingerprint(r))) for r in keys.recipients]
    missing = missing_recipients(wrapped_to(rt, unreadable), list(names))
    return KeysCheck(rt.clock(), recipients, missing, proof, unreadable)
