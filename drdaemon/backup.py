"""The snapshot service: one source through the pipeline into every region.

Ordering is the commit protocol (docs/format.md): the data object is
completed in every region first, the manifest is written last and is what
makes the snapshot exist there. A source that fails commits nothing anywhere;
a region that fails leaves nothing that lists as a snapshot and the snapshot
is committed, degraded, in the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import (
    __version__,
    catalog,
    layout,
    manifest,
    shrink,
    state,
    tenancy,
    tenant_keys,
    uploads,
)
from . import facts as facts_object
from .config import SourceConfig
from .drills import scratch as drill_scratch
from .errors import Cancelled, DrError, ShrinkError, SourceError
from .keys import fingerprint
from .manifest import Manifest, TenantKeyRef
from .pipeline import Stored, encrypt_and_upload, parse_recipients
from .runtime import Runtime
from .sources import kind_for
from .sources.base import Dump
from .storage import ObjectStore, StorageError, Upload
from .tenant_key_record import TenantKey

log = logging.getLogger("drdaemon")


@dataclass
class BackupResult:
    """The outcome of one source's snapshot."""

    source: str
    snapshot_id: str | None = None
    regions: list[str] = field(default_factory=list)
    failed_regions: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    error_kind: str | None = None  # source, storage, cancelled or other: bounded, for metrics
    manifest: Manifest | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.regions)

    @property
    def degraded(self) -> bool:
        return self.ok and bool(self.failed_regions)

    def to_dict(self) -> dict[str, object]:
        m = self.manifest
        return {
            "source": self.source, "ok": self.ok, "degraded": self.degraded,
            "snapshot_id": self.snapshot_id, "regions": self.regions,
            "failed_regions": self.failed_regions, "error": self.error,
            "size": m.size if m else None, "plaintext_size": m.plaintext_size if m else None,
            "sha256": m.sha256 if m else None,
        }


def error_kind(exc: DrError) -> str:
    """The bounded class of a snapshot failure, from the exception's type."""
    if isinstance(exc, Cancelled):
        return "cancelled"
    if isinstance(exc, ShrinkError):
        return "shrunk"
    if isinstance(exc, StorageError):
        return "storage"
    if isinstance(exc, SourceError):
        return "source"
    return "other"


@contextmanager
def open_dump(source: SourceConfig, now: datetime | None = None,
              cancel: threading.Event | None = None) -> Iterator[Dump]:
    """Start the dump of a source of any kind (`now`: the runtime's clock).

    `cancel` (the daemon's stopping event) ends a dump that is stuck, e.g. a
    PostgreSQL dump waiting on a lock, and fails it as cancelled.
    """
    with kind_for(source.kind).dump(source, now, cancel) as d:
        yield d


def snapshot(rt: Runtime, source: SourceConfig,
             on_progress: Callable[[int], None] | None = None, *,
             accept_shrink: bool = False) -> BackupResult:
    """Take one snapshot of `source` into every region. Never raises DrError.

    A snapshot whose source shrank sharply against the newest committed one
    is refused (shrink.py) unless `accept_shrink` (the operator confirmed it).
    """
    result = BackupResult(source.name)
    # Written before anything else: if this process dies mid-way, the next
    # daemon sees an unfinished attempt and retries it (scheduler.Daemon.start).
    state.record_start(rt.config.daemon.state_dir, source.name, rt.clock())
    try:
        _snapshot(rt, source, result, on_progress, accept_shrink)
    except DrError as exc:
        result.error = str(exc)
        result.error_kind = error_kind(exc)
    except Exception as exc:  # a bug is still a recorded failure, shown by status
        log.exception("snapshot of %s failed unexpectedly", source.name)
        result.error = f"internal error ({exc.__class__.__name__}); see the log"
        result.error_kind = "other"
    event = "snapshot.committed" if result.ok else "snapshot.failed"
    rt.record_event(event, **result.to_dict())
    state.record_outcome(rt.config.daemon.state_dir, result.source, rt.clock(), result.ok,
                         result.error or "; ".join(f"{k}: {v}" for k, v in
                                                   result.failed_regions.items()))
    return result


def _snapshot(rt: Runtime, source: SourceConfig, result: BackupResult,
              on_progress: Callable[[int], None] | None, accept_shrink: bool) -> None:
    cfg = rt.config
    started = rt.clock()
    snap_id = layout.new_snapshot_id(started)
    result.snapshot_id = snap_id
    data_name = layout.data_object_name(source.name, snap_id, source.kind)
    # What a killed backup of this source left open goes first (not only at the
    # next daemon start); this one's marker names its process for the next.
    uploads.abort_abandoned(rt, source.name)
    owner = drill_scratch.this_process(started).token
    with state.inflight(cfg.daemon.state_dir, snap_id, owner, source.name):
        _upload_and_commit(rt, source, result, snap_id, started, data_name, on_progress,
                           accept_shrink)


def _check_shrink(source: SourceConfig, baseline: Manifest | None, facts: dict[str, Any],
                  accept: bool) -> None:
    """Refuse a sharp shrink against `baseline` (ShrinkError), or note an accepted one."""
    if baseline is None:
        return
    drops = shrink.sharp_drops(source.kind, baseline.facts, facts, source.max_shrink)
    if not drops:
        return
    said = ", ".join(str(d) for d in drops)
    if accept:
        facts["shrink_accepted"] = {"against": baseline.id, "drops": [str(d) for d in drops]}
        return
    raise ShrinkError(
        f"refused: {source.name} shrank sharply against snapshot {baseline.id} ({said}; "
        f"max_shrink {source.max_shrink:g}); an unmounted volume or a dropped schema looks "
        f"like this. If it is real: drctl backup --source {source.name} --accept-shrink")


def _upload_and_commit(rt: Runtime, source: SourceConfig, result: BackupResult, snap_id: str,
                       started: datetime, data_name: str,
                       on_progress: Callable[[int], None] | None, accept_shrink: bool) -> None:
    # Read while the dump starts: the snapshot to compare with (shrink.py), needed
    # once the dump is complete, and the tenant's keyring unless this process knows
    # its key (read only: a key is made, if need be, once the dump has begun).
    with ThreadPoolExecutor(2, thread_name_prefix="ahead") as pool:
        baseline = pool.submit(_baseline, rt, source)
        keyring = pool.submit(tenant_keys.look_ahead, rt, source.tenant)
        _upload_and_check(rt, source, result, snap_id, started, data_name, on_progress,
                          accept_shrink, baseline, keyring)


def _baseline(rt: Runtime, source: SourceConfig) -> Manifest | None:
    """The newest committed snapshot of `source`, for the shrink guard (None: unguarded).
    A region that cannot be read only narrows the choice. Every region is listed each
    time, so a newer snapshot another process or host wrote is the one compared with;
    only a manifest this process wrote or read already is not read again."""
    if source.max_shrink >= 1:
        return None
    return catalog.newest_manifest(rt, source.name, rt.known_newest)


def _upload_and_check(rt: Runtime, source: SourceConfig, result: BackupResult, snap_id: str,
                      started: datetime, data_name: str,
                      on_progress: Callable[[int], None] | None, accept_shrink: bool,
                      baseline: Future[Manifest | None],
                      keyring: Future[tenant_keys.Survey | None]) -> None:
    cfg = rt.config
    # Where a bucket has Object Lock, the snapshot cannot be removed before the
    # retention horizon, whatever happens to this daemon (docs/format.md).
    retain_until = source.retention.lock_until(started)
    uploads: dict[str, Upload] = {}
    # Only the regions the residency of the source's tenant(s) allows (tenancy.py).
    home = tenancy.regions_for(cfg, source)
    for store in rt.stores:
        if store.name not in home:
            continue
        try:
            rt.check_residency(source.name, store.name, source.tenant)
            uploads[store.name] = store.begin_upload(data_name, retain_until=retain_until)
        except (StorageError, tenancy.ResidencyError) as exc:
            result.failed_regions[store.name] = str(exc)
    if not uploads:
        raise StorageError("no region can be written: " + "; ".join(
            result.failed_regions.values()))
    try:
        with open_dump(source, rt.clock(), rt.stopping) as dump:
            # Encrypted to the tenant's own key, made on its first need (public part
            # only); once the source is known to be there.
            key = tenant_keys.ensure_key(rt, source.tenant, keyring.result())
            stored = encrypt_and_upload(
                dump.stream, uploads, [key.recipient], level=cfg.pipeline.zstd_level,
                threads=cfg.pipeline.zstd_threads, part_size=cfg.pipeline.part_size,
                on_progress=on_progress, cancel=rt.stopping)
            facts = dump.finish()
            _check_shrink(source, baseline.result(), facts, accept_shrink)
        # Facts that may hold secrets (database settings) are sealed like the dump.
        facts = kind_for(source.kind).seal_facts(facts, parse_recipients([key.recipient]))
        # Everything a reader will check is built and bounded before any
        # region commits: facts that cannot be stored fail the snapshot here.
        snap, detached = _draft_manifest(rt, source, snap_id, started, data_name,
                                         dump.consistency_time, stored, facts, key)
    except BaseException:
        for up in uploads.values():
            up.abort()
        raise
    result.failed_regions.update(stored.failed)

    def commit(name: str) -> None:
        try:
            uploads[name].commit()
        except StorageError:
            uploads[name].abort()
            raise

    # Fencing: a daemon that lost the cluster lock commits nothing (another host may
    # be active now); checked before the data is completed and again before the manifest.
    try:
        rt.fence(f"the commit of snapshot {snap_id} of {source.name}")
    except DrError:
        for up in uploads.values():
            up.abort()
        raise
    # Regions commit side by side: completing a large multipart upload can take
    # seconds per region, and one slow region must not hold up the others.
    errors = _each_region([n for n in uploads if n not in stored.failed], commit)
    result.failed_regions.update(errors)
    committed = [n for n in uploads if n not in stored.failed and n not in errors]
    # Timestamps have a fixed width: the size checked in the draft still holds.
    snap = dataclasses.replace(snap, finished_at=rt.clock())
    blob = manifest.serialize(snap, rt.manifest_key)
    manifest_name = layout.manifest_object_name(source.name, snap_id)

    def publish(name: str) -> None:
        store = rt.store(name)
        try:
            if detached is not None:
                store.put_bytes(detached.ref.name, detached.blob, retain_until=retain_until)
            store.put_bytes(manifest_name, blob, retain_until=retain_until)
        except StorageError:
            # Without its manifest the data object is an orphan: remove it now
            # if the region lets us; the replica repair copies it later.
            _remove_objects(store, snap)
            raise

    try:
        rt.fence(f"the manifest of snapshot {snap_id} of {source.name}")
    except DrError:
        for name in committed:  # completed data without a manifest: an orphan
            _remove_objects(rt.store(name), snap)
        raise
    errors = _each_region(committed, publish)
    result.failed_regions.update(errors)
    result.regions.extend(n for n in committed if n not in errors)
    if not result.regions:
        raise StorageError("no region committed the snapshot: " + "; ".join(
            f"{k}: {v}" for k, v in result.failed_regions.items()))
    result.manifest = snap
    # The next snapshot's shrink baseline, as a reader of the stored bytes sees it
    # (committed already: a manifest that does not parse back is only not remembered).
    with contextlib.suppress(DrError):
        rt.known_newest[source.name] = manifest.parse(blob, rt.manifest_key,
                                                      source=source.name, snapshot_id=snap_id)


def _remove_objects(store: ObjectStore, snap: Manifest) -> None:
    """Best effort: the objects of a snapshot whose manifest will not be written."""
    for orphan in snap.object_names():
        with contextlib.suppress(DrError):
            store.delete(orphan)


def _draft_manifest(rt: Runtime, source: SourceConfig, snap_id: str, started: datetime,
                    data_name: str, consistency: datetime, stored: Stored,
                    facts: dict[str, Any], key: TenantKey
                    ) -> tuple[Manifest, facts_object.Encoded | None]:
    """The snapshot's manifest and facts object, or FactsTooLarge if a reader would refuse
    either (the bounds are the readers' own: manifest.py, facts.py)."""
    cfg = rt.config
    inline, detached = facts_object.split(source.kind, facts)
    encoded = (facts_object.encode(source.name, snap_id, detached)
               if detached is not None else None)
    snap = Manifest(
        id=snap_id, source=source.name, tenant=source.tenant, tier=source.tier,
        kind=source.kind, consistency_time=consistency, started_at=started,
        finished_at=rt.clock(), data_name=data_name, sha256=stored.sha256, size=stored.size,
        compressed_size=stored.compressed_size, plaintext_size=stored.plaintext_size,
        zstd_level=cfg.pipeline.zstd_level,
        recipients=(fingerprint(key.recipient),),
        facts=inline, drdaemon_version=__version__,
        facts_object=encoded.ref if encoded is not None else None,
        tenant_key=TenantKeyRef(key.tenant, key.key_id))
    facts_object.check_storable(manifest.serialize(snap, rt.manifest_key))
    return snap, encoded


def _each_region(names: list[str], step: Callable[[str], None]) -> dict[str, str]:
    """Run `step` for every region at once; return the StorageErrors by region."""
    def attempt(name: str) -> str | None:
        try:
            step(name)
        except StorageError as exc:
            return str(exc)
        return None

    if len(names) <= 1:
        outcomes = [attempt(n) for n in names]
    else:
        with ThreadPoolExecutor(len(names), thread_name_prefix="commit") as pool:
            outcomes = list(pool.map(attempt, names))
    return {n: e for n, e in zip(names, outcomes, strict=True) if e is not None}


def backup(rt: Runtime, sources: list[SourceConfig],
           on_progress: Callable[[str, int], None] | None = None, *,
           accept_shrink: bool = False) -> list[BackupResult]:
    """Snapshot each source in turn; one failing source never stops the others."""
    results = []
    for src in sources:
        progress = (lambda n, s=src.name: on_progress(s, n)) if on_progress else None
        results.append(snapshot(rt, src, progress, accept_shrink=accept_shrink))
    return results
