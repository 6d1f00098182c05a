"""The tenant export service: the return copy of a tenant's data (drctl tenant export).

For each of the tenant's sources one snapshot (default: the newest complete
one) is streamed from a region through `restore.stream_into`, the one place
snapshot data is decrypted and checked (data object sha256 and size, age
authentication, zstd bounded by the manifest's plaintext size), into a file:
the `pg_dump` custom archive or the tar exactly as it was dumped, or that
file age-encrypted to the customer's recipient on its way to disk. Beside them
go `MANIFEST.json` (what each file holds: snapshot, consistency time, sizes,
row counts), `SHA256SUMS` and `README.txt`; the layout is in docs/format.md
("Tenant export").

Everything is written into a private staging folder next to the destination,
read back and hashed again, and only then renamed into place: a failure
leaves nothing behind. With a recipient no plaintext of the tenant's data
touches the disk: the small files are encrypted in memory, the data files
through a pipe. Memory stays flat whatever the snapshot's size.

What the files say (pure: `file_name`, `sha256sums`, `manifest_doc`,
`readme_text`, `check_magic`): export_doc.py. The files on disk (the sink,
staging, reading back, the rename into place): export_files.py. Here: choosing
the snapshots and the service, `export`.
"""

from __future__ import annotations

import getpass
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pyrage import x25519

from . import catalog, layout, tenancy, tenant_keys
from . import facts as facts_object
from .catalog import SnapshotEntry
from .config import SourceConfig
from .erasure_records import refuse_if_erased
from .errors import DrError, UsageError
from .export_doc import ExportedSource, ExportResult, check_magic, file_name, kept_facts
from .export_files import (
    FileSink,
    move_into_place,
    remove_stale_staging,
    staging_for,
    verify_written,
    write_side_files,
)
from .keys import fingerprint
from .manifest import Manifest
from .restore import TargetError, stream_into
from .runtime import Runtime
from .storage import NotFound, ObjectStore

Progress = Callable[[int, int], None]  # (bytes just read, total bytes of the whole export)


# -- choosing snapshots -----------------------------------------------------------------

def _owner_of(rt: Runtime, snapshot_id: str, others: Sequence[SourceConfig]) -> str | None:
    """The source among `others` that lists `snapshot_id` in some region (names only)."""
    for store in rt.stores:
        for src in others:
            try:
                names = store.list(layout.manifests_prefix(src.name))
                if any(layout.snapshot_id_from_manifest_name(i.name) == snapshot_id
                       for i in names):
                    return src.name
            except DrError:
                continue
    return None


def choose(rt: Runtime, tenant: str, sources: Sequence[SourceConfig],
           snapshot_ids: Sequence[str]) -> list[tuple[SourceConfig, SnapshotEntry]]:
    """The snapshot to export of each of `sources`: the one named in `snapshot_ids`, else
    the newest complete one. UsageError for an id none of them holds."""
    for sid in snapshot_ids:
        if not layout.is_snapshot_id(sid):
            raise UsageError(f"invalid snapshot id {sid!r}: expected an id like "
                             "20261123T020000Z-1a2b3c4d")
    listings = {s.name: catalog.list_snapshots(rt, s.name) for s in sources}
    picked: dict[str, SnapshotEntry] = {}
    for sid in snapshot_ids:
        hits = [e for s in sources for e in listings[s.name].snapshots if e.id == sid]
        if not hits:
            others = [s for s in rt.config.sources if s.tenant != tenant]
            owner = _owner_of(rt, sid, others)
            if owner is not None:
                raise UsageError(f"snapshot {sid} belongs to source {owner} of tenant "
                                 f"{rt.config.source(owner).tenant}, not to tenant {tenant}")
            raise UsageError(f"no snapshot {sid} of tenant {tenant}'s sources "
                             f"({', '.join(s.name for s in sources)}) in any region")
        entry = hits[0]
        if entry.source in picked:
            raise UsageError(f"--snapshot names two snapshots of source {entry.source} "
                             f"({picked[entry.source].id}, {sid}): give one per source")
        if entry.manifest is None:
            raise DrError(f"snapshot {sid} of source {entry.source} cannot be read in any "
                          f"region ({entry.why_unreadable()})")
        picked[entry.source] = entry
    chosen = []
    for src in sources:
        listing = listings[src.name]
        entry = picked.get(src.name) or _latest(tenant, src.name, listing)
        entry.unreachable.update(listing.region_errors)
        chosen.append((src, entry))
    return chosen


def _latest(tenant: str, source: str, listing: catalog.Listing) -> SnapshotEntry:
    """The newest complete snapshot of `source` (never silently an older one)."""
    found = catalog.choose_latest(listing.snapshots, allow_older=False)
    if found is None:
        errors = "".join(f"; region {k} unreadable: {v}" for k, v in
                         listing.region_errors.items())
        raise DrError(f"source {source} of tenant {tenant} has no snapshot in any "
                      f"region{errors}: nothing to export for it")
    return found.entry


# -- the shell ------------------------------------------------------------------------

def check_destination(dest: Path) -> None:
    """Refuse a destination that exists and is not an empty folder (no entries at all)."""
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise UsageError(f"export destination {dest} exists and is not an empty folder; "
                         "choose a new or empty folder")
    if not dest.parent.is_dir():
        raise UsageError(f"export destination {dest}: folder {dest.parent} does not exist")


def parse_recipient(text: str) -> x25519.Recipient:
    """The customer's age X25519 recipient; UsageError naming what is wrong."""
    try:
        return x25519.Recipient.from_str(text.strip())
    except Exception:
        raise UsageError(f"--recipient {text[:16]!r}... is not an age X25519 public key "
                         "(age1...)") from None


def _full_facts(store: ObjectStore, m: Manifest) -> dict[str, Any]:
    try:
        return facts_object.full_facts(store, m)
    except NotFound:
        raise DrError(f"facts object of snapshot {m.id} is missing in region "
                      f"{store.name}") from None


def _export_one(rt: Runtime, identities: Sequence[x25519.Identity], source: SourceConfig,
                entry: SnapshotEntry, staging: Path, recipient: x25519.Recipient | None,
                progress: Callable[[int, int], None] | None) -> ExportedSource:
    """Stream one snapshot into `staging`, trying each region that holds it in turn."""
    failed: dict[str, str] = {}
    name = file_name(source.name, source.kind)
    stored_as = name + (".age" if recipient is not None else "")
    for store in rt.stores:
        if store.name not in entry.regions:
            failed[store.name] = entry.problems.get(store.name) or (
                f"unreachable: {entry.unreachable[store.name]}"
                if store.name in entry.unreachable else "does not hold this snapshot")
            continue
        try:
            m = catalog.read_manifest(rt, store, source.name, entry.id)
            facts = _full_facts(store, m)
        except DrError as exc:
            failed[store.name] = str(exc)
            continue
        if m.kind != source.kind:
            raise DrError(f"snapshot {m.id} is a {m.kind} snapshot, source {source.name} "
                          f"is {source.kind}")
        sink = FileSink(staging / stored_as, recipient)
        try:
            opening = tenant_keys.snapshot_identities(rt, m, identities)  # a tenant key
            stream_into(store, m, opening, sink, progress, rt.recipient_labels())
            problem = check_magic(m.kind, sink.plain.head)
            if problem:
                raise DrError(f"snapshot {m.id} in region {store.name} {problem}")
        except BaseException as exc:  # nothing half-written stays, whatever happened
            sink.discard()
            if isinstance(exc, TargetError):  # the copy was authentic: the destination failed
                raise DrError(f"writing {stored_as} to the export folder failed: "
                              f"{exc}") from None
            if isinstance(exc, UsageError) or not isinstance(exc, DrError | OSError):
                raise
            failed[store.name] = str(exc) or exc.__class__.__name__
            continue
        return ExportedSource(
            source.name, m.kind, m.id, m.consistency_time, store.name, name,
            sink.plain.count, sink.plain.sha.hexdigest(), stored_as, sink.stored.count,
            sink.stored.sha.hexdigest(), kept_facts(m.kind, facts),
            {k: v for k, v in failed.items() if k in entry.regions})
    reasons = "; ".join(f"{k}: {v}" for k, v in failed.items())
    raise DrError(f"export of snapshot {entry.id} of source {source.name} failed in every "
                  f"region: {reasons}")




def export(rt: Runtime, identities: Sequence[x25519.Identity], tenant: str, dest: Path, *,
           recipient: str | None = None, snapshot_ids: Sequence[str] = (),
           without_shared: bool = False,
           on_progress: Progress | None = None) -> ExportResult:
    """Write the return copy of `tenant`'s data to the new or empty folder `dest`.

    `recipient`: the customer's age public key; every file holding the tenant's
    data is encrypted to it and no plaintext reaches the disk. `snapshot_ids`:
    the snapshot to export for their sources (at most one per source); the
    tenant's other sources give their newest complete snapshot. A shared source
    (several tenants' data) is refused, or left out with `without_shared`. Raises
    UsageError (unknown tenant, an id of another tenant, a bad destination or
    recipient) or DrError (no region could supply a verified copy, the disk
    failed); either way nothing is left at `dest`. Audit-logged either way.
    """
    started = time.monotonic()
    refuse_if_erased(rt, tenant)  # the keys are gone: say so, whatever identity was given
    sources = tenancy.sources_of(rt.config, tenant)
    if not sources:
        known = sorted({s.tenant for s in rt.config.sources})
        raise UsageError(f"no tenant {tenant!r} in {rt.config.path} (tenants: "
                         f"{', '.join(known) or 'none'})")
    # A shared source's snapshot holds other tenants' data too: it is never handed to
    # one customer, and the copy is only incomplete when the operator says so.
    shared = [s.name for s in sources if tenancy.is_shared(s)]
    if shared and not without_shared:
        raise UsageError(f"tenant {tenant}'s data is also in shared source(s) "
                         f"{', '.join(shared)}, whose snapshots hold other tenants' data and "
                         "are never exported; --without-shared exports the rest and lists "
                         "them as not included")
    sources = [s for s in sources if not tenancy.is_shared(s)]
    if not sources:
        raise UsageError(f"tenant {tenant} has no source of its own, only shared ones "
                         f"({', '.join(shared)}): there is nothing to export")
    customer = parse_recipient(recipient) if recipient is not None else None
    recipient_fp = fingerprint(str(customer)) if customer is not None else None
    dest = dest.absolute()
    check_destination(dest)
    stale = remove_stale_staging(dest)
    chosen = choose(rt, tenant, sources, snapshot_ids)
    total = sum(e.manifest.size for _, e in chosen if e.manifest is not None)
    progress = (lambda n, _t: on_progress(n, total)) if on_progress else None
    who = {"tenant": tenant, "destination": str(dest), "recipient_fingerprint": recipient_fp,
           "sources": [s.name for s, _ in chosen],
           "snapshot_ids": [e.id for _, e in chosen],
           "user": getpass.getuser(), "host": socket.gethostname()}
    staging = staging_for(dest)
    try:
        exported = [_export_one(rt, identities, src, entry, staging, customer, progress)
                    for src, entry in chosen]
        files = write_side_files(staging, tenant, exported, customer, recipient_fp,
                                  rt.clock(), shared)
        verify_written(staging, files)
        move_into_place(staging, dest)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, Exception):
            rt.record_event("tenant.export.failed", **who, error=str(exc))
        raise
    result = ExportResult(tenant, str(dest), recipient_fp, exported, files,
                          time.monotonic() - started)
    for s in exported:
        for region, why in s.failed_regions.items():
            result.notes.append(f"{s.source}: region {region} skipped: {why}")
    result.notes += [f"removed {n}: the staging folder of an export that was killed"
                     for n in stale]
    result.notes += [f"{n}: NOT INCLUDED: a shared source (its snapshots hold other tenants' "
                     "data)" for n in shared]
    rt.record_event("tenant.export", **who, files=files, not_included=shared,
                    regions={s.source: s.region for s in exported},
                    bytes=sum(s.size for s in exported))
    return result

