"""Restore drills: prove, with evidence, that a snapshot restores within the tier's targets.

A drill restores the newest snapshot the drill region holds (default: the
first region that is not the primary, i.e. the copy a lost primary leaves)
through the very path `drctl restore` uses into scratch space, verifies it
against the manifest's facts and `[[drills.checks]]`, measures RTO (split into
phases, see slo.rto_split), RPO, throughput and the projected tier RTO, and
always removes the scratch copy: a `drdaemon_drill_*` database on `[drills]
postgres_dsn` (else the source's server) or a folder under `scratch_dir`, named
after the drilling process so that a run can first remove what killed drills
left (drill_scratch.py). README.md ("Drills") defines every figure and reason code.

Each drill is one `DrillRecord` (drill_records.py): a JSON line in
`<state_dir>/drills/drills.jsonl` and a `drill` record in the audit log (the
tamper-evident copy).
"""

from __future__ import annotations

import logging
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO, cast

import psycopg
from psycopg.conninfo import make_conninfo
from pyrage import x25519

from . import catalog, drill_scratch, slo, tenant_keys
from . import facts as facts_object
from .catalog import SnapshotEntry
from .config import Config, DrillCheck, SourceConfig
from .drill_records import (
    DrillRecord,
    append_record,
    latest_restores,
    load_records,
    records_path,
)
from .drill_scratch import Cleanup
from .errors import DrError, IntegrityError, SourceError, UsageError, first_line
from .keys import identities_for
from .layout import new_snapshot_id
from .manifest import Manifest
from .report import ReportData
from .restore import stream_into
from .runtime import Runtime
from .sources import postgres
from .sources.base import Sink
from .sources.directory import DirectorySink, owner_problem, tree_facts
from .sources.pg_database import Policy, Recreation
from .storage import NotFound, ObjectStore, StorageError
from .verify import hash_copy

log = logging.getLogger("drdaemon")

# A drill server need not know the source's roles: ownership and grants are
# not what a drill proves, and restoring them could fail for reasons no
# disaster would have.
DRILL_RESTORE_OPTIONS = ("--no-owner", "--no-privileges")

# Reason codes: every failure reason reads "<code>: <detail>".
NO_SNAPSHOT = "no-snapshot"
NEWEST_UNREADABLE = "newest-unreadable"  # the newest listed snapshot is unreadable everywhere
SNAPSHOT_MISSING = "snapshot-missing"  # none in the drill region (others have some)
REGION_UNREACHABLE = "region-unreachable"
MANIFEST_INVALID = "manifest-invalid"
OBJECT_MISSING = "object-missing"
CORRUPT = "corrupt"
NO_IDENTITY = "no-identity"
RESTORE_FAILED = "restore-failed"
COUNT_MISMATCH = "count-mismatch"
DIGEST_MISMATCH = "digest-mismatch"
CHECK_FAILED = "check-failed"
PROPERTY_MISMATCH = "property-mismatch"  # database-level properties (pg_database.py)
CLEANUP_FAILED = "cleanup-failed"
INTERNAL = "internal-error"

PHASES = slo.PHASES


@dataclass
class DrillRun:
    """The drills of one `drctl drill run` or daemon drill job.

    `scratch`: what killed drills had left, found before these ran (removed,
    kept and why); it does not change `ok`.
    """

    records: list[DrillRecord] = field(default_factory=list)
    scratch: Cleanup = field(default_factory=Cleanup)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.records)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "drills": [r.to_dict() for r in self.records],
                "scratch": self.scratch.to_dict()}


# -- pure helpers --------------------------------------------------------------


def default_region(config: Config) -> str:
    """The region a drill reads from: the first that is not the primary (the first)."""
    return config.regions[1].name


def compare_tables(expected: Any, got: list[dict[str, Any]]) -> list[str]:
    """Count mismatches between the manifest's `tables` facts and a restored database."""
    try:
        want = {(str(t["schema"]), str(t["table"])): int(t["rows"]) for t in expected}
    except (TypeError, KeyError, ValueError):
        return [f"{MANIFEST_INVALID}: the manifest records no usable table counts"]
    have = {(t["schema"], t["table"]): int(t["rows"]) for t in got}
    reasons = []
    for (schema, table), rows in sorted(want.items()):
        name = f"{schema}.{table}"
        if (schema, table) not in have:
            reasons.append(f"{COUNT_MISMATCH}: table {name} is missing from the restored copy "
                           f"(manifest: {rows} rows)")
        elif have[(schema, table)] != rows:
            reasons.append(f"{COUNT_MISMATCH}: table {name} has {have[(schema, table)]} rows, "
                           f"the manifest says {rows}")
    for schema, table in sorted(set(have) - set(want)):
        reasons.append(f"{COUNT_MISMATCH}: table {schema}.{table} was restored but is not in "
                       "the manifest")
    return reasons


TREE_FACTS = ("files", "directories", "symlinks", "bytes", "digest")


def compare_tree(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """Mismatches between the manifest's directory facts and a restored tree."""
    reasons = []
    for key in TREE_FACTS:
        if key not in expected:
            reasons.append(f"{MANIFEST_INVALID}: the manifest records no {key}")
        elif got[key] != expected[key]:
            code = DIGEST_MISMATCH if key == "digest" else COUNT_MISMATCH
            reasons.append(f"{code}: restored {key} is {got[key]}, the manifest says "
                           f"{expected[key]}")
    return reasons


# -- timing the restore pipeline -----------------------------------------------


@dataclass
class _StreamClock:
    """Where a streaming restore spent its time (seconds, monotonic)."""

    t0: float = 0.0
    first_byte: float | None = None
    read_wait: float = 0.0
    write_wait: float = 0.0
    finish: float = 0.0


class _TimedReader:
    """The stored object's stream, timing each read (network and storage waits)."""

    def __init__(self, inner: BinaryIO, clock: _StreamClock) -> None:
        self.inner, self.clock = inner, clock

    def read(self, n: int = -1) -> bytes:
        start = time.monotonic()
        data = self.inner.read(n)
        end = time.monotonic()
        if self.clock.first_byte is None and data:
            self.clock.first_byte = end - self.clock.t0
        else:
            self.clock.read_wait += end - start
        return data

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> _TimedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _TimedStore:
    """The slice of a store that `stream_into` uses (name, open_read), with reads timed."""

    def __init__(self, store: ObjectStore, clock: _StreamClock) -> None:
        self.name, self.store, self.clock = store.name, store, clock

    def open_read(self, name: str) -> BinaryIO:
        return cast(BinaryIO, _TimedReader(self.store.open_read(name), self.clock))


class _TimedWriter:
    """The sink's writer, timing how long the restore consumer held the stream up."""

    def __init__(self, inner: BinaryIO, clock: _StreamClock) -> None:
        self.inner, self.clock = inner, clock

    def write(self, data: Any) -> int:
        start = time.monotonic()
        try:
            return self.inner.write(data)
        finally:
            self.clock.write_wait += time.monotonic() - start


class _TimedSink:
    """A sink whose writes and completion are timed."""

    def __init__(self, sink: Sink, clock: _StreamClock) -> None:
        self.sink, self.clock = sink, clock
        self.writer = cast(BinaryIO, _TimedWriter(sink.writer, clock))
        self.notes = sink.notes

    def complete(self) -> None:
        start = time.monotonic()
        try:
            self.sink.complete()
        finally:
            self.clock.finish += time.monotonic() - start

    def commit(self) -> str:
        return self.sink.commit()

    def discard(self) -> None:
        self.sink.discard()


# -- one drill -------------------------------------------------------------------


@dataclass
class _Catalog:
    """What the regions hold, listed once per run: per source, and unreadable regions."""

    entries: dict[str, list[SnapshotEntry]]
    region_errors: dict[str, dict[str, str]]  # source -> region -> error
    # source -> listed snapshots no region can read (e.g. a manifest too large)
    unreadable: dict[str, list[SnapshotEntry]] = field(default_factory=dict)

    @classmethod
    def read(cls, rt: Runtime, sources: Sequence[str]) -> _Catalog:
        entries, errors, unreadable = {}, {}, {}
        for name in sources:
            listing = catalog.list_snapshots(rt, name)
            entries[name] = [e for e in listing.snapshots if e.manifest is not None]
            errors[name] = listing.region_errors
            unreadable[name] = listing.unreadable
        return cls(entries, errors, unreadable)

    def newest(self, source: str) -> SnapshotEntry | None:
        found = self.entries.get(source, [])
        return found[-1] if found else None


class _Drill:
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
        self.entry: SnapshotEntry | None = None
        self.scratch: str | None = None
        self.rto: float | None = None
        self.verified = False

    def fail(self, code: str, detail: str) -> None:
        self.reasons.append(f"{code}: {detail}")


def drill_source(rt: Runtime, identities: Sequence[x25519.Identity], source: SourceConfig,
                 region: str, snapshots: _Catalog) -> DrillRecord:
    """Drill one source from `region`; never raises for a failed drill (see the record).

    `snapshots` must list every source of the source's tier (for the projection).
    """
    d = _Drill(rt, source, region)
    try:
        if _choose(d, snapshots):
            _restore_and_verify(d, identities)
    except Exception as exc:  # a bug must still leave a record and no scratch behind
        log.exception("drill of %s crashed", source.name)
        d.fail(INTERNAL, f"{exc.__class__.__name__}: {first_line(exc)}")
    return _record(d, snapshots)


def _choose(d: _Drill, snapshots: _Catalog) -> bool:
    """Pick the newest snapshot the drill region holds; False (with a reason) if none."""
    name, region = d.source.name, d.region
    unreadable = snapshots.region_errors.get(name, {})
    entries = snapshots.entries.get(name, [])
    held = [e for e in entries if region in e.regions]
    if region in unreadable:
        d.fail(REGION_UNREACHABLE, f"region {region} could not be listed: {unreadable[region]}")
        return False
    newer = [e for e in snapshots.unreadable.get(name, [])
             if not entries or e.id > entries[-1].id]
    if newer:
        # Drilling an older snapshot would prove an RPO that nothing can restore.
        older = f"not drilling an older one ({held[-1].id})" if held else "no older one either"
        d.fail(NEWEST_UNREADABLE, f"the newest snapshot {newer[-1].id} of {name} cannot be "
               f"read in any region ({newer[-1].why_unreadable()}); {older}")
        return False
    if not held:
        problems = [e.problems[region] for e in entries if region in e.problems]
        if problems:
            d.fail(MANIFEST_INVALID, f"region {region}: {problems[-1]}")
        elif entries:
            d.fail(SNAPSHOT_MISSING, f"region {region} holds no snapshot of {name}; the "
                   f"newest ({entries[-1].id}) is only in {', '.join(entries[-1].regions)}")
        else:
            d.fail(NO_SNAPSHOT, f"no snapshot of {name} in any region")
        return False
    d.entry = held[-1]
    if entries[-1].id != d.entry.id:
        d.notes.append(f"the newest snapshot {entries[-1].id} is not in region {region}; "
                       f"drilled the newest one there, {d.entry.id}")
    return True


def _restore_and_verify(d: _Drill, identities: Sequence[x25519.Identity]) -> None:
    assert d.entry is not None
    store = d.rt.store(d.region)
    started = time.monotonic()
    try:
        m = catalog.read_manifest(d.rt, store, d.source.name, d.entry.id)
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
    try:  # the identities that open this snapshot: a tenant key is unwrapped here
        identities = tenant_keys.snapshot_identities(d.rt, m, identities)
    except UsageError as exc:
        d.fail(NO_IDENTITY, str(exc))
        return
    except DrError as exc:
        d.fail(CORRUPT, str(exc))
        return
    clock = _StreamClock()
    scratch = _Scratch(d, m, expected, identities)
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


def _expected_facts(d: _Drill, store: ObjectStore, m: Manifest) -> dict[str, Any] | None:
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


def _stream(d: _Drill, store: ObjectStore, m: Manifest, identities: Sequence[x25519.Identity],
            sink: Sink, clock: _StreamClock) -> None:
    """The restore path itself (restore.stream_into), timed; failures become reasons."""
    try:
        stream_into(cast(ObjectStore, _TimedStore(store, clock)), m, identities,
                    _TimedSink(sink, clock), labels=d.rt.recipient_labels())
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


def _classify(d: _Drill, store: ObjectStore, m: Manifest, exc: BaseException) -> None:
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


class _Scratch:
    """The scratch target of one drill; `remove` always runs and always removes it.

    Its name carries this process (drill_scratch.Owner): should the process be
    killed before `remove`, a later run removes what it left.
    """

    def __init__(self, d: _Drill, m: Manifest, facts: dict[str, Any],
                 identities: Sequence[x25519.Identity] = ()) -> None:
        self.d, self.m, self.facts, self.identities = d, m, facts, identities
        self.sink: postgres.PostgresSink | DirectorySink | None = None
        self.folder: Path | None = None
        self.owner = drill_scratch.this_process(d.started_at)
        self.in_use = False

    def open(self) -> Sink | None:
        d = self.d
        drill_scratch.begin_use()  # before the scratch exists: see clean_leftovers
        self.in_use = True
        try:
            if d.source.kind == "postgres":
                return self._open_postgres()
            return self._open_directory()
        except DrError as exc:
            d.fail(RESTORE_FAILED, f"cannot prepare the scratch copy: {first_line(exc)}")
            return None

    def _open_postgres(self) -> Sink | None:
        d = self.d
        assert d.source.dsn is not None
        base = d.rt.config.drills.postgres_dsn or d.source.dsn
        # The target name is only checked to be free: a drill never commits, it
        # verifies the staging database itself and drops it.
        prefix = drill_scratch.database_prefix(self.owner)
        name = f"{prefix}{secrets.token_hex(6)}"
        # Database properties are recreated as a restore would, except what
        # names a role the drill server lacks or the drill role may not do
        # (Policy.drill): what was compared and skipped goes to the evidence.
        try:
            recreate = Recreation.from_facts(self.m.facts.get("database"), Policy(drill=True),
                                             self.identities)
        except UsageError as exc:  # its sealed settings: no identity fits
            d.fail(NO_IDENTITY, str(exc))
            return None
        sink = postgres.PostgresSink(base, make_conninfo(base, dbname=name), False,
                                     staging_prefix=prefix,
                                     restore_options=DRILL_RESTORE_OPTIONS, recreate=recreate)
        self.sink = sink
        d.scratch = postgres.describe(sink.staging_dsn)
        d.evidence["server"] = postgres.describe(sink.admin_dsn)
        return sink

    def _open_directory(self) -> Sink:
        d = self.d
        root = drill_scratch.scratch_root(d.rt.config)
        prefix = drill_scratch.folder_prefix(self.owner, d.source.name)
        try:
            drill_scratch.ensure_scratch_root(d.rt.config)  # restored plaintext: 0700
            self.folder = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
        except OSError as exc:
            raise SourceError(f"cannot create a scratch folder in {root}: "
                              f"{exc.strerror or exc}") from None
        # No expected facts for the sink: the drill compares them itself, to
        # report every mismatch and to time verification apart from the restore.
        bound = self.m.facts.get("bytes")
        sink = DirectorySink(self.folder / "tree", self.m.id, {},
                             max_bytes=bound if isinstance(bound, int) else None)
        self.sink = sink
        d.scratch = str(sink.staging)
        return sink

    def verify(self) -> None:
        d = self.d
        if isinstance(self.sink, DirectorySink):
            tree = tree_facts(self.sink.staging, self.facts)
            d.evidence.update({k: tree[k] for k in TREE_FACTS})
            d.reasons.extend(compare_tree(self.facts, tree))
            if (problem := owner_problem(self.facts, tree)) is not None:
                d.reasons.append(f"{DIGEST_MISMATCH}: {problem}")
            return
        assert self.sink is not None
        dsn = self.sink.staging_dsn
        try:
            tables = postgres.table_counts(dsn)
        except SourceError as exc:
            d.fail(RESTORE_FAILED, f"cannot count rows in the restored copy: {exc}")
            return
        d.evidence["tables"] = len(tables)
        d.evidence["rows"] = sum(int(t["rows"]) for t in tables)
        d.reasons.extend(compare_tables(self.facts.get("tables"), tables))
        self._verify_properties(dsn)
        checks = [c for c in d.rt.config.drills.checks if c.source == d.source.name]
        results = [_run_check(dsn, c) for c in checks]
        d.evidence["checks"] = results
        for r in results:
            if not r["ok"]:
                d.fail(CHECK_FAILED, f"{r['sql']!r}: {r['detail']}")

    def _verify_properties(self, dsn: str) -> None:
        d = self.d
        assert isinstance(self.sink, postgres.PostgresSink)
        recreate = self.sink.recreate
        try:
            got = postgres.database_properties(dsn)
        except SourceError as exc:
            d.fail(PROPERTY_MISMATCH, f"cannot read the restored copy's properties: {exc}")
            return
        for difference in recreate.differences(got):
            d.fail(PROPERTY_MISMATCH, f"database {difference}")
        d.evidence["database"] = recreate.evidence()

    def remove(self) -> None:
        d = self.d
        try:
            if self.sink is not None:
                try:
                    self.sink.discard()
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


def _run_check(dsn: str, check: DrillCheck) -> dict[str, Any]:
    """Run one user check, read-only, in the restored database."""
    result: dict[str, Any] = {"sql": check.sql, "min": check.min, "value": None, "ok": False,
                              "detail": ""}
    try:
        with psycopg.connect(dsn, connect_timeout=30, autocommit=False) as conn:
            conn.read_only = True
            row = conn.execute(check.sql).fetchone()
    except psycopg.Error as exc:
        result["detail"] = f"failed: {first_line(exc)}"
        return result
    value = row[0] if row else None
    if isinstance(value, Decimal):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        result["detail"] = f"returned {value!r}, not a number"
        return result
    result["value"] = value
    result["ok"] = value >= check.min
    result["detail"] = "" if result["ok"] else f"returned {value}, expected at least {check.min:g}"
    return result


def _record(d: _Drill, snapshots: _Catalog) -> DrillRecord:
    rt, entry = d.rt, d.entry
    # The drill region's own manifest when it was read, else the catalog's copy.
    m = d.manifest or (entry.manifest if entry is not None else None)
    rpo = slo.rpo_at(m.consistency_time, d.started_at) if m is not None else None
    gap = slo.worst_gap(e.manifest.consistency_time
                        for e in snapshots.entries.get(d.source.name, []) if e.manifest)
    rto = d.rto if d.verified else None
    rate = slo.throughput(m.size, rto) if m is not None and rto else None
    plain_rate = slo.throughput(m.plaintext_size, rto) if m is not None and rto else None
    sizes = []
    tier_sources = [s.name for s in rt.config.sources if s.tier == d.source.tier]
    for name in tier_sources:
        newest = snapshots.newest(name)
        if newest is not None and newest.manifest is not None:
            sizes.append(newest.manifest.size)
        elif rate is not None:
            d.notes.append(f"source {name} of tier {d.source.tier} has no snapshot: "
                           "the projected tier RTO leaves it out")
    model = None
    if m is not None and rto and rate is not None:
        # One model for the tier: this drill with every other source's latest.
        others = [n for n in tier_sources if n != d.source.name]
        model = slo.fit_restore_model(
            [*latest_restores(load_records(rt.config.daemon.state_dir), others), (m.size, rto)])
    projected = slo.projected_tier_rto(sizes, model)
    d.reasons.extend(slo.evaluate(d.targets, rto=timedelta(seconds=rto) if rto else None,
                                  rpo=rpo, projected=projected))
    newest = snapshots.newest(d.source.name)
    return DrillRecord(
        id=d.id, source=d.source.name, tenant=d.source.tenant, tier=d.source.tier,
        region=d.region, snapshot_id=entry.id if entry else None,
        sha256=m.sha256 if m else None,
        started_at=d.started_at.isoformat(), finished_at=rt.clock().isoformat(),
        ok=d.verified and not d.reasons, reasons=d.reasons, rto_seconds=rto,
        rpo_seconds=rpo.total_seconds() if rpo is not None else None,
        worst_gap_seconds=gap.total_seconds() if gap is not None else None,
        throughput_bytes_per_second=rate,
        stored_bytes=m.size if m else None, plaintext_bytes=m.plaintext_size if m else None,
        rto_target_seconds=d.targets.rto.total_seconds(),
        rpo_target_seconds=d.targets.rpo.total_seconds(),
        projected_tier_rto_seconds=projected.total_seconds() if projected is not None else None,
        timings={k: round(v, 6) for k, v in d.timings.items()},
        kind=d.source.kind, verified=d.verified,
        plaintext_throughput_bytes_per_second=plain_rate,
        consistency_time=m.consistency_time.isoformat() if m else None,
        newest_snapshot_id=newest.id if newest and entry and newest.id != entry.id else None,
        scratch=d.scratch, evidence=d.evidence, notes=d.notes, host=socket.gethostname(),
        restore_model=model.to_dict() if model is not None else None)


# -- the service -------------------------------------------------------------------


def run_drills(rt: Runtime, identities: Sequence[x25519.Identity] | None = None,
               sources: Sequence[str] | None = None, *, region: str | None = None,
               tier: str | None = None) -> DrillRun:
    """Drill every chosen source (default: all, or all of `tier`) and record each drill.

    `region` defaults to the first non-primary region; `identities` to the
    configured identity file. One failing drill never stops the others. First,
    scratch that killed drills left is removed (drill_scratch.clean_leftovers).
    """
    cfg = rt.config
    if sources:
        chosen = cfg.pick_sources(sources)
    else:
        chosen = [s for s in cfg.sources if tier is None or s.tier == tier]
    if not chosen:
        raise UsageError("no source to drill" + (f" in tier {tier!r}" if tier else ""))
    region = rt.store(region).name if region else default_region(cfg)
    if identities is None:
        identities = identities_for(cfg, None, "a drill")
    tiers = {s.tier for s in chosen}
    snapshots = _Catalog.read(rt, [s.name for s in cfg.sources if s.tier in tiers])
    # One mirror of the audit log for the run (and at most one a minute while
    # it lasts: Runtime.audit_batch), not one per removal and drill.
    with rt.audit_batch():
        # What killed drills left goes first: a drill server or scratch folder
        # filled by leftovers would fail these drills for no fault of the backups.
        run = DrillRun(scratch=drill_scratch.clean_leftovers(rt, chosen))
        for src in chosen:
            record = drill_source(rt, identities, src, region, snapshots)
            append_record(cfg.daemon.state_dir, record)
            rt.record_event("drill", **record.to_dict())
            run.records.append(record)
    return run


def drill_jobs(rt: Runtime) -> list[tuple[str, str, Callable[[], Any]]]:
    """The daemon's drill jobs: one per tier that has sources, on its schedule."""
    tiers = sorted({s.tier for s in rt.config.sources})

    def job(tier: str) -> Callable[[], DrillRun]:
        return lambda: run_drills(rt, tier=tier)

    return [(f"drill:{t}", rt.config.drills.schedule_for(t), job(t)) for t in tiers]


def audit_status(rt: Runtime, records: Sequence[DrillRecord]) -> dict[str, Any] | None:
    """The audit chain's verification for a report, and which of `records` it attests.

    drills.jsonl is a convenience copy that anyone with the state folder could
    edit; the `drill` records in the hash-chained audit log are the evidence.
    A drill whose outcome differs from its audit record (or has none before
    the chain's first bad record) is listed in `drills_unattested`.
    """
    from . import audit

    try:
        result = audit.verify(rt)
        events = audit.parse_records(audit.read_lines(rt.config.daemon.state_dir))
    except DrError as exc:
        return {"ok": False, "records": None, "first_bad": None, "reason": str(exc),
                "drills_checked": len(records), "drills_unattested": [r.id for r in records]}
    trusted = {e.get("id"): e for e in events if e.get("event") == "drill"
               and (result.first_bad is None or int(e.get("seq", -1)) < result.first_bad)}
    return {"ok": bool(result.ok), "records": result.records, "first_bad": result.first_bad,
            "reason": result.reason, "drills_checked": len(records),
            "drills_unattested": [r.id for r in records if not _attested(r, trusted.get(r.id))]}


_ATTESTED = ("source", "snapshot_id", "sha256", "ok", "verified", "reasons", "rto_seconds",
             "rpo_seconds", "started_at")


def _attested(record: DrillRecord, event: dict[str, Any] | None) -> bool:
    if event is None:
        return False
    mine = record.to_dict()
    return all(event.get(k) == mine[k] for k in _ATTESTED)


def report_data(rt: Runtime, since: datetime | None, sources: Sequence[str] = (),
                drill_id: str | None = None) -> ReportData:
    """The drills (and audit chain verification) a report shows."""
    state_dir = rt.config.daemon.state_dir
    names = {s.name for s in rt.config.pick_sources(sources)} if sources else set()
    records = [r for r in load_records(state_dir, since)
               if (not names or r.source in names) and (drill_id is None or r.id == drill_id)]
    if drill_id is not None and not records:
        raise UsageError(f"no drill {drill_id!r} in {records_path(state_dir)}")
    return ReportData(rt.clock(), since, records, audit_status(rt, records),
                      str(records_path(state_dir)))
