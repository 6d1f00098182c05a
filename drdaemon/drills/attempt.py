"""One drill's attempt: read the manifest, restore through restore.stream_into into a
scratch copy the source's kind makes, verify it, and always remove it.

`Drill` holds what the attempt found (reasons, notes, timings, evidence); the
service (drills/run.py) chooses the snapshot and makes the record.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from pyrage import x25519

from .. import catalog, key_proof, slo, tenant_keys
from .. import facts as facts_object
from ..catalog import SnapshotEntry
from ..config import SourceConfig
from ..errors import DrError, IntegrityError, SourceError, UsageError, first_line
from ..layout import new_snapshot_id
from ..manifest import Manifest
from ..restore import stream_into
from ..runtime import Runtime
from ..sources import kind_for
from ..sources.base import (
    MANIFEST_INVALID,
    NO_IDENTITY,
    RESTORE_FAILED,
    DrillFailure,
    DrillPlace,
    DrillScratch,
    Sink,
)
from ..storage import NotFound, ObjectStore, StorageError
from ..verify import hash_copy
from . import scratch as drill_scratch
from .timing import StreamClock, TimedSink, TimedStore

# Reason codes: every failure reason reads "<code>: <detail>".
# (The codes a kind's verification uses are in sources/base.py.)
NO_SNAPSHOT = "no-snapshot"
NEWEST_UNREADABLE = "newest-unreadable"  # the newest listed snapshot is unreadable everywhere
SNAPSHOT_MISSING = "snapshot-missing"  # none in the drill region (others have some)
REGION_UNREACHABLE = "region-unreachable"
OBJECT_MISSING = "object-missing"
CORRUPT = "corrupt"
CLEANUP_FAILED = "cleanup-failed"
INTERNAL = "internal-error"
ERASED = "tenant-erased"  # the tenant was crypto-shredded (erasure.py): nothing to restore


class Drill:
    """The state of one drill while it runs: reasons, notes, timings, evidence."""

    def __init__(self, rt: Runtime, source: SourceConfig, region: str) -> None:
        self.rt, self.source, self.region = rt, source, region
        tier = rt.config.tiers[source.tier]
        self.targets: slo.Targets = tier
        self.id = new_snapshot_id(rt.clock())
        self.started_at = rt.clock()
        self.reasons: list[str] = []
        self.notes: list[str] = []
        self.timings: dict[str, float] = {}
        self.evidence: dict[str, Any] = {}
        self.manifest: Manifest | None = None
        self.manifest_mac: dict[str, str] | None = None  # as stored: {"key_id", "value"}
        self.entry: SnapshotEntry | None = None
        self.scratch: str | None = None
        self.rto: float | None = None
        self.verified = False

    def fail(self, code: str, detail: str) -> None:
        self.reasons.append(f"{code}: {detail}")


def restore_and_verify(d: Drill, identities: Sequence[x25519.Identity]) -> None:
    assert d.entry is not None
    store = d.rt.store(d.region)
    started = time.monotonic()
    try:
        m, d.manifest_mac = catalog.read_manifest_with_mac(d.rt, store, d.source.name,
                                                           d.entry.id)
    except NotFound:
        d.fail(SNAPSHOT_MISSING, f"manifest of {d.entry.id} vanished from region {d.region}")
        return
    except IntegrityError as exc:
        d.fail(MANIFEST_INVALID, f"region {d.region}: {exc}")
        return
    except StorageError as exc:
        d.fail(REGION_UNREACHABLE, str(exc))
        return
    finally:
        d.timings["manifest"] = time.monotonic() - started
    d.manifest = m
    if m.kind != d.source.kind:
        d.fail(MANIFEST_INVALID, f"snapshot {m.id} is a {m.kind} snapshot, source "
               f"{d.source.name} is {d.source.kind}")
        return
    expected = _expected_facts(d, store, m)
    if expected is None:
        return
    # The identities that open this snapshot: a tenant key is fetched and unwrapped
    # here, which a recovery pays too; charged to `manifest` (download) so that the
    # phases still add up to the RTO.
    unwrap = time.monotonic()
    try:
        operators, identities = identities, tenant_keys.snapshot_identities(d.rt, m, identities)
    except UsageError as exc:
        d.fail(NO_IDENTITY, str(exc))
        return
    except DrError as exc:
        d.fail(CORRUPT, str(exc))
        return
    finally:
        d.timings["manifest"] += time.monotonic() - unwrap
    clock = StreamClock()
    scratch = Scratch(d, m, expected, identities)
    try:
        mark = time.monotonic()
        sink = scratch.open()
        d.timings["prepare"] = time.monotonic() - mark
        if sink is None:
            return
        clock.t0 = time.monotonic()
        try:
            _stream(d, store, m, identities, sink, clock)
        finally:
            d.timings.update(stream=time.monotonic() - clock.t0,
                             first_byte=clock.first_byte or 0.0, read_wait=clock.read_wait,
                             write_wait=clock.write_wait, restore_finish=clock.finish)
            d.notes.extend(sink.notes)
        if d.reasons:
            return
        mark = time.monotonic()
        scratch.verify()
        d.timings["verify"] = time.monotonic() - mark
        d.rto = time.monotonic() - started
        d.verified = not d.reasons
        d.timings.update(slo.rto_split(**{k: d.timings[k] for k in _MEASURED}))
    finally:
        mark = time.monotonic()
        scratch.remove()
        d.timings["cleanup"] = time.monotonic() - mark
        if m.tenant_key is not None:
            # A side effect, recorded outside the timed phases: the operator
            # recipient opened that tenant key.
            key_proof.record_drill_unwrap(d.rt, m.tenant_key.tenant, m.tenant_key.key_id,
                                          operators)


def _expected_facts(d: Drill, store: ObjectStore, m: Manifest) -> dict[str, Any] | None:
    """Every fact the copy is checked against (a version-2 manifest's facts object too);
    None, with a reason, if the facts object cannot be had."""
    started = time.monotonic()
    try:
        return facts_object.full_facts(store, m)
    except NotFound as exc:
        d.fail(OBJECT_MISSING, f"facts object: {exc}")
    except IntegrityError as exc:
        d.fail(CORRUPT, str(exc))
    except StorageError as exc:
        d.fail(REGION_UNREACHABLE, str(exc))
    finally:
        d.timings["manifest"] += time.monotonic() - started
    return None


_MEASURED = ("manifest", "prepare", "first_byte", "stream", "read_wait", "write_wait",
             "restore_finish", "verify")


def _stream(d: Drill, store: ObjectStore, m: Manifest, identities: Sequence[x25519.Identity],
            sink: Sink, clock: StreamClock) -> None:
    """The restore path itself (restore.stream_into), timed; failures become reasons."""
    try:
        stream_into(cast(ObjectStore, TimedStore(store, clock)), m, identities,
                    TimedSink(sink, clock), labels=d.rt.recipient_labels())
    except UsageError as exc:
        d.fail(NO_IDENTITY, str(exc))
    except NotFound as exc:
        d.fail(OBJECT_MISSING, str(exc))
    except IntegrityError as exc:
        d.fail(CORRUPT, str(exc))
    except StorageError as exc:
        d.fail(REGION_UNREACHABLE, str(exc))
    except (DrError, OSError) as exc:
        _classify(d, store, m, exc)


def _classify(d: Drill, store: ObjectStore, m: Manifest, exc: BaseException) -> None:
    """Name the cause of a failed stream: a corrupt object often surfaces only as the
    consumer's error (pg_restore: "end of file") or age's bare "decryption error", so
    the object is hashed again; only a copy that verifies leaves a restore failure."""
    failed = first_line(exc)
    try:
        hash_copy(store, m)
    except IntegrityError as bad:
        d.fail(CORRUPT, f"{bad}; the restore stopped with: {failed}")
        return
    except NotFound as gone:
        d.fail(OBJECT_MISSING, str(gone))
        return
    except DrError:
        pass  # the region failed again: the restore's own error says more
    d.fail(RESTORE_FAILED, failed)


class Scratch:
    """The scratch target of one drill; `remove` always runs and always removes it.

    Its name carries this process (drill_scratch.Owner): should the process be
    killed before `remove`, a later run removes what it left. The kind makes
    and verifies the copy (SourceKind.open_scratch); a folder it asks for is
    removed here.
    """

    def __init__(self, d: Drill, m: Manifest, facts: dict[str, Any],
                 identities: Sequence[x25519.Identity] = ()) -> None:
        self.d, self.m, self.facts, self.identities = d, m, facts, identities
        self.copy: DrillScratch | None = None
        self.folder: Path | None = None
        self.owner = drill_scratch.this_process(d.started_at)
        self.in_use = False

    def open(self) -> Sink | None:
        d = self.d
        drill_scratch.begin_use()  # before the scratch exists: see clean_leftovers
        self.in_use = True
        config = d.rt.config
        place = DrillPlace(
            make_folder=self._make_folder,
            database_prefix=drill_scratch.database_prefix(self.owner),
            server_dsn=config.drills.postgres_dsn,
            checks=[c for c in config.drills.checks if c.source == d.source.name])
        try:
            # Every fact, the facts object's too (e.g. the roles a drill may create).
            copy = kind_for(d.source.kind).open_scratch(
                d.source, dataclasses.replace(self.m, facts=self.facts), place,
                self.identities)
        except DrillFailure as exc:
            d.fail(exc.code, exc.detail)
            return None
        except DrError as exc:
            d.fail(RESTORE_FAILED, f"cannot prepare the scratch copy: {first_line(exc)}")
            return None
        self.copy = copy
        d.scratch = copy.where
        d.evidence.update(copy.evidence)
        return copy.sink

    def _make_folder(self) -> Path:
        """A fresh private folder for the copy, in the scratch folder, named after its owner."""
        config = self.d.rt.config
        root = drill_scratch.scratch_root(config)
        prefix = drill_scratch.folder_prefix(self.owner, self.d.source.name)
        try:
            drill_scratch.ensure_scratch_root(config)  # restored plaintext: 0700
            self.folder = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
        except OSError as exc:
            raise SourceError(f"cannot create a scratch folder in {root}: "
                              f"{exc.strerror or exc}") from None
        return self.folder

    def verify(self) -> None:
        assert self.copy is not None
        self.d.reasons.extend(self.copy.verify(self.facts, self.d.evidence))

    def remove(self) -> None:
        d = self.d
        try:
            if self.copy is not None:
                try:
                    self.copy.sink.discard()
                except Exception as exc:
                    d.fail(CLEANUP_FAILED, f"scratch copy {d.scratch} may be left behind "
                           f"(the next drill run removes it): {first_line(exc)}")
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)
                if self.folder.exists():
                    d.fail(CLEANUP_FAILED, f"scratch folder {self.folder} could not be "
                           "deleted (the next drill run tries again)")
        finally:
            if self.in_use:
                self.in_use = False
                drill_scratch.end_use()
