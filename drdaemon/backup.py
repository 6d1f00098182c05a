"""The snapshot service: one source through the pipeline into every region.

Ordering is the commit protocol (docs/format.md): the data object is
completed in every region first, the manifest is written last and is what
makes the snapshot exist there. A source that fails commits nothing anywhere;
a region that fails leaves nothing that lists as a snapshot and the snapshot
is committed, degraded, in the others.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

from . import __version__, manifest, state
from .config import SourceConfig
from .errors import DrError, SourceError
from .keys import fingerprint
from .manifest import Manifest
from .pipeline import Cancelled, encrypt_and_upload
from .runtime import Runtime
from .sources import directory, postgres
from .sources.base import Dump
from .storage import StorageError, Upload

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
    if isinstance(exc, StorageError):
        return "storage"
    if isinstance(exc, SourceError):
        return "source"
    return "other"


@contextmanager
def open_dump(source: SourceConfig, now: datetime | None = None) -> Iterator[Dump]:
    """Start the dump of a source of any kind (`now`: the runtime's clock)."""
    if source.kind == "postgres":
        assert source.dsn is not None
        with postgres.dump(source.dsn) as d:
            yield d
    else:
        assert source.path is not None
        with directory.dump(source.path, now, source.on_unreadable) as d:
            yield d


def snapshot(rt: Runtime, source: SourceConfig,
             on_progress: Callable[[int], None] | None = None) -> BackupResult:
    """Take one snapshot of `source` into every region. Never raises DrError."""
    result = BackupResult(source.name)
    try:
        _snapshot(rt, source, result, on_progress)
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
              on_progress: Callable[[int], None] | None) -> None:
    cfg = rt.config
    started = rt.clock()
    snap_id = manifest.new_snapshot_id(started)
    result.snapshot_id = snap_id
    data_name = manifest.data_object_name(source.name, snap_id, source.kind)
    with state.inflight(cfg.daemon.state_dir, snap_id):
        _upload_and_commit(rt, source, result, snap_id, started, data_name, on_progress)


def _upload_and_commit(rt: Runtime, source: SourceConfig, result: BackupResult, snap_id: str,
                       started: datetime, data_name: str,
                       on_progress: Callable[[int], None] | None) -> None:
    cfg = rt.config
    # Where a bucket has Object Lock, the snapshot cannot be removed before the
    # retention horizon, whatever happens to this daemon (docs/format.md).
    retain_until = source.retention.lock_until(started)
    uploads: dict[str, Upload] = {}
    for store in rt.stores:
        try:
            uploads[store.name] = store.begin_upload(data_name, retain_until=retain_until)
        except StorageError as exc:
            result.failed_regions[store.name] = str(exc)
    if not uploads:
        raise StorageError("no region can be written: " + "; ".join(
            result.failed_regions.values()))
    try:
        with open_dump(source, rt.clock()) as dump:
            stored = encrypt_and_upload(
                dump.stream, uploads, cfg.keys.recipients, level=cfg.pipeline.zstd_level,
                threads=cfg.pipeline.zstd_threads, part_size=cfg.pipeline.part_size,
                on_progress=on_progress, cancel=rt.stopping)
            facts = dump.finish()
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

    # Regions commit side by side: completing a large multipart upload can take
    # seconds per region, and one slow region must not hold up the others.
    errors = _each_region([n for n in uploads if n not in stored.failed], commit)
    result.failed_regions.update(errors)
    committed = [n for n in uploads if n not in stored.failed and n not in errors]
    snap = Manifest(
        id=snap_id, source=source.name, tenant=source.tenant, tier=source.tier,
        kind=source.kind, consistency_time=dump.consistency_time, started_at=started,
        finished_at=rt.clock(), data_name=data_name, sha256=stored.sha256, size=stored.size,
        compressed_size=stored.compressed_size, plaintext_size=stored.plaintext_size,
        zstd_level=cfg.pipeline.zstd_level,
        recipients=tuple(fingerprint(r) for r in cfg.keys.recipients),
        facts=facts, drdaemon_version=__version__)
    blob = manifest.serialize(snap, rt.manifest_key)
    manifest_name = manifest.manifest_object_name(source.name, snap_id)

    def publish(name: str) -> None:
        store = rt.store(name)
        try:
            store.put_bytes(manifest_name, blob, retain_until=retain_until)
        except StorageError:
            # Without its manifest the data object is an orphan: remove it now
            # if the region lets us; the replica repair copies it later.
            with contextlib.suppress(DrError):
                store.delete(data_name)
            raise

    errors = _each_region(committed, publish)
    result.failed_regions.update(errors)
    result.regions.extend(n for n in committed if n not in errors)
    if not result.regions:
        raise StorageError("no region committed the snapshot: " + "; ".join(
            f"{k}: {v}" for k, v in result.failed_regions.items()))
    result.manifest = snap


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
           on_progress: Callable[[str, int], None] | None = None) -> list[BackupResult]:
    """Snapshot each source in turn; one failing source never stops the others."""
    results = []
    for src in sources:
        progress = (lambda n, s=src.name: on_progress(s, n)) if on_progress else None
        results.append(snapshot(rt, src, progress))
    return results
