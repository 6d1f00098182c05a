"""Reading a tenant's erasures back: its certificates, the journal of one begun and
not finished, and the one-line note with which restores, drills, replication,
exports and key unwrapping refuse an erased tenant.

The erasure itself (erasure.py) writes both; prune's sweep of what stayed
locked (erasure_sweep.py) asks :func:`erased_tenants` which tenants to sweep.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime

from . import layout, statefs
from .config import NAME_RE
from .erasure_cert import (
    MAX_CERTIFICATE_BYTES,
    DestroyedKey,
    ErasureCertificate,
    StoredObject,
    parse,
)
from .errors import DrError, IntegrityError, UsageError
from .runtime import Runtime
from .units import format_utc, parse_iso_time

JOURNAL = statefs.ERASURE_JOURNAL


# -- the journal ------------------------------------------------------------------

def journal_path(tenant: str) -> str:
    return f"{statefs.erasure_folder(tenant)}/{JOURNAL}"


@dataclass
class Journal:
    """What earlier, interrupted runs of this erasure did (empty for a new one)."""

    started_at: datetime | None = None
    sources: tuple[str, ...] = ()
    keys: dict[str, DestroyedKey] = field(default_factory=dict)
    intents: list[tuple[str, StoredObject]] = field(default_factory=list)  # (step, object)


def read_journal(rt: Runtime, tenant: str) -> Journal:
    raw = rt.state.read_log(journal_path(tenant))
    j = Journal()
    for line in raw.decode(errors="replace").splitlines():
        try:
            rec = json.loads(line)
            if "begin" in rec:
                j.started_at = parse_iso_time(rec["begin"]["started_at"])
                j.sources = tuple(rec["begin"]["sources"])
            elif "key" in rec:
                k = rec["key"]
                j.keys[k["key_id"]] = DestroyedKey(k["key_id"], k["fingerprint"],
                                                   bool(k["verified"]))
            elif "delete" in rec:
                o = rec["delete"]
                j.intents.append((rec["step"], StoredObject(o["where"], o["name"],
                                                            o["version_id"], o["size"])))
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a kill: the listing finds what it was about
    return j


def erasure_in_progress(rt: Runtime, tenant: str) -> bool:
    """Whether an erasure of `tenant` began and has not finished (its journal is there)."""
    return JOURNAL in rt.state.children(
        statefs.erasure_folder(tenant))


# -- reading erasures back --------------------------------------------------------------------

def state_certificates(rt: Runtime, tenant: str) -> Iterator[ErasureCertificate]:
    store = rt.state
    folder = statefs.erasure_folder(tenant)
    for name in store.children(folder):
        if layout.certificate_stamp(name) is None:
            continue
        try:
            raw = store.read(f"{folder}/{name}")
            if raw is not None:
                yield parse(raw, rt.manifest_key, tenant)
        except (IntegrityError, OSError):
            continue


def _region_certificates(rt: Runtime, tenant: str) -> list[ErasureCertificate]:
    """The certificates of the first region that answers: each holds them all, and a
    region that is down is waited for once, not once per region."""
    for store in rt.stores:
        found = []
        try:
            names = [i.name for i in store.list(layout.erasure_prefix(tenant))
                     if layout.certificate_stamp(i.name) is not None]
            for name in names:
                with suppress(IntegrityError):
                    found.append(parse(store.get_bytes(name, MAX_CERTIFICATE_BYTES),
                                       rt.manifest_key, tenant))
        except DrError:
            continue
        return found
    return []


def certificates(rt: Runtime, tenant: str) -> list[ErasureCertificate]:
    """The tenant's authentic erasure certificates, oldest first: the state folder's,
    else those of the first region that can be listed."""
    found = list(state_certificates(rt, tenant)) or _region_certificates(rt, tenant)
    return sorted(found, key=lambda c: (c.started_at, c.finished_at))


def erasure_note(rt: Runtime, tenant: str, regions: bool = True) -> str | None:
    """One line naming the tenant's erasure and its certificate, or None if never erased.

    An erasure begun and not finished (its journal in the state folder) counts:
    some key copies may already be gone. `regions=False`: the state's certificates
    only, no region listed (a check made on every snapshot, tenant_keys.ensure_key).
    """
    certs = certificates(rt, tenant) if regions else sorted(
        state_certificates(rt, tenant), key=lambda c: (c.started_at, c.finished_at))
    if certs:
        first = certs[0]
        state = "" if certs[-1].ok else " (not complete: run drctl tenant erase again)"
        return (f"tenant {tenant} was erased on {format_utc(first.started_at)[:10]}{state}; "
                f"erasure certificate {first.name}: its keys are destroyed and its snapshots "
                "cannot be restored, drilled or exported")
    journal = read_journal(rt, tenant)
    if journal.started_at is not None:
        return (f"tenant {tenant}: an erasure began on {format_utc(journal.started_at)} and is "
                f"not finished (journal {statefs.erasure_folder(tenant)}/{JOURNAL}); run "
                f"drctl tenant erase {tenant} to complete it")
    return None


def refuse_if_erased(rt: Runtime, tenant: str) -> None:
    """Raise UsageError with :func:`erasure_note` if `tenant` was erased."""
    note = erasure_note(rt, tenant)
    if note:
        raise UsageError(note)


def _region_erased_tenants(rt: Runtime) -> set[str]:
    """Tenants with a certificate in the first region that can be listed."""
    for store in rt.stores:
        try:
            names = [info.name for info in store.list(f"{layout.TENANTS}/")]
        except DrError:
            continue
        return {p[0] for p in map(layout.parse_certificate_name, names) if p is not None}
    return set()


def erased_tenants(rt: Runtime) -> dict[str, tuple[str, ...]]:
    """Tenant -> the sources its erasures covered, for every tenant with an authentic
    certificate in the state folder or, for a host whose state folder was rebuilt,
    in the regions: prune's sweep must not forget an erasure."""
    here = set(rt.state.children(layout.TENANTS))
    regional = _region_erased_tenants(rt)
    out: dict[str, tuple[str, ...]] = {}
    for tenant in sorted(here | regional):
        if not NAME_RE.match(tenant):
            continue
        certs = list(state_certificates(rt, tenant)) or (
            _region_certificates(rt, tenant) if tenant in regional else [])
        sources = {s for c in certs if not c.dry_run for s in c.sources}
        if sources:
            out[tenant] = tuple(sorted(sources))
    return out
