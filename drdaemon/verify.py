"""The verify service: is every stored copy still the snapshot its manifest describes?

For each snapshot and region the data object is streamed and its size and
sha256 are checked against the authenticated manifest (the same VerifyingReader
restores use). With `deep`, the copy also goes through the restore pipeline
(age decrypt, zstd decompress bounded by the manifest's plaintext size) into a
sink that keeps nothing: proof that the identity we hold can read it end to
end, which a hash alone cannot give (a manifest vouches for the bytes, not for
what they decrypt to).

Nothing is written anywhere; memory stays bounded by the stream buffers.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO, cast

from pyrage import x25519

from . import catalog, tenancy, tenant_keys
from . import facts as facts_object
from .errors import DrError, IntegrityError, UsageError
from .manifest import Manifest
from .restore import stream_into
from .runtime import Runtime
from .storage import NotFound, ObjectStore, StorageError
from .streams import VerifyingReader

CHUNK = 1 << 20

# Why a copy failed, coarsely, for scripts and for the replica repair:
# only "missing" and "corrupt" are facts about the copy itself; "unreachable"
# is about the region right now and says nothing about the data.
OK, MISSING, CORRUPT, UNREACHABLE, UNREADABLE, NO_MANIFEST = (
    "ok", "missing", "corrupt", "unreachable", "unreadable", "manifest")


@dataclass(frozen=True)
class CopyCheck:
    """The outcome of checking one copy (one snapshot in one region)."""

    source: str
    snapshot_id: str
    region: str
    status: str  # one of the constants above
    reason: str | None = None
    bytes: int = 0  # stored bytes found intact (0 unless ok)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_dict(self) -> dict[str, object]:
        return dict(asdict(self), ok=self.ok)


@dataclass
class VerifyReport:
    deep: bool
    checks: list[CopyCheck] = field(default_factory=list)
    region_errors: dict[str, str] = field(default_factory=dict)

    @property
    def failures(self) -> list[CopyCheck]:
        return [c for c in self.checks if not c.ok]

    @property
    def ok(self) -> bool:
        return not self.failures and not self.region_errors

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok, "deep": self.deep,
            "checked": len(self.checks), "failed": len(self.failures),
            "snapshots": len({(c.source, c.snapshot_id) for c in self.checks}),
            "bytes": sum(c.bytes for c in self.checks),
            "region_errors": self.region_errors,
            "copies": [c.to_dict() for c in self.checks],
        }


class _Discard(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return len(data)


class NullSink:
    """A restore target that keeps nothing: deep verification only wants the
    stream read, decrypted and decompressed end to end."""

    def __init__(self) -> None:
        self.writer = cast(BinaryIO, _Discard())
        self.notes: list[str] = []

    def complete(self) -> None:
        pass

    def commit(self) -> str:
        return "nowhere"

    def discard(self) -> None:
        pass


def hash_copy(store: ObjectStore, m: Manifest) -> None:
    """Stream one region's data object, checking size and sha256 against `m`, and its
    facts object, if any (a copy without it is corrupt: drills cannot check it).

    Raises NotFound (no data object), StorageError or IntegrityError.
    """
    what = f"snapshot {m.id} in region {store.name}"
    with store.open_read(m.data_name) as raw:
        reader = VerifyingReader(raw, m.size, m.sha256, what)
        while reader.read(CHUNK):
            pass  # VerifyingReader raises at EOF unless everything matched
    if not reader.verified:
        reader.check()
    try:
        facts_object.fetch(store, m)
    except NotFound:
        raise IntegrityError(f"{what}: its facts object is missing") from None


def check_copy(store: ObjectStore, m: Manifest, *, deep: bool = False,
               identities: Sequence[x25519.Identity] = ()) -> tuple[str, str | None]:
    """(status, reason) of one region's copy of snapshot `m`; never raises DrError."""
    try:
        if deep:
            try:
                stream_into(store, m, identities, NullSink())
            except UsageError as exc:
                # age refuses before it reads the payload, so the hash was never
                # checked: a planted file for another recipient is corrupt, a
                # genuine copy means none of our identities can restore it.
                hash_copy(store, m)
                return UNREADABLE, str(exc)
        else:
            hash_copy(store, m)
    except NotFound as exc:
        return MISSING, str(exc)
    except IntegrityError as exc:
        return CORRUPT, str(exc)
    except StorageError as exc:
        return UNREACHABLE, str(exc)
    except (DrError, OSError) as exc:  # decrypt/decompress failures, local read errors
        return UNREADABLE, str(exc) or exc.__class__.__name__
    return OK, None


def run_verify(rt: Runtime, sources: Sequence[str] | None = None, region: str | None = None,
               *, deep: bool = False,
               identities: Sequence[x25519.Identity] | None = None) -> VerifyReport:
    """Check every copy of every snapshot of `sources` (default: all) in `region` (default: all)."""
    if deep and not identities:
        raise UsageError("deep verification decrypts: it needs an identity")
    names = {s.name for s in rt.config.pick_sources(sources)} if sources else None
    regions = [rt.store(region).name] if region else [s.name for s in rt.stores]
    single = next(iter(names)) if names and len(names) == 1 else None
    listing = catalog.list_snapshots(rt, single, region)
    report = VerifyReport(deep, region_errors=dict(listing.region_errors))
    known = tenancy.homes(rt.config)
    unwrapped: tenant_keys.Unwrapped = {}  # a tenant key is unwrapped once a run
    with rt.audit_batch():  # a failure per copy, one mirror per region for the run
        for entry in listing.snapshots:
            if names is not None and entry.source not in names:
                continue
            home = tenancy.regions_for_name(
                rt.config, entry.source, entry.manifest.tenant if entry.manifest else None,
                known)
            for name in (r for r in regions if r in home):
                check = _check_entry(rt, entry, name, listing.region_errors, deep,
                                     identities or (), unwrapped)
                report.checks.append(check)
                if not check.ok:
                    rt.record_event("verify.failed", **check.to_dict(), deep=deep)
        rt.record_event("verify.finished", ok=report.ok, deep=deep,
                        checked=len(report.checks), failed=len(report.failures),
                        sources=sorted({c.source for c in report.checks}),
                        region_errors=report.region_errors)
    return report


def _check_entry(rt: Runtime, entry: catalog.SnapshotEntry, region: str,
                 region_errors: dict[str, str], deep: bool,
                 identities: Sequence[x25519.Identity],
                 unwrapped: tenant_keys.Unwrapped) -> CopyCheck:
    def result(status: str, reason: str | None = None, n: int = 0,
               seconds: float = 0.0) -> CopyCheck:
        return CopyCheck(entry.source, entry.id, region, status, reason, n, seconds)

    m = entry.manifest
    if region not in entry.regions:
        if region in entry.problems:
            return result(NO_MANIFEST, entry.problems[region])
        if m is None:
            return result(NO_MANIFEST, "no authenticated manifest in any region")
        if region in region_errors:
            return result(UNREACHABLE, f"region could not be listed: {region_errors[region]}")
        return result(MISSING, "no manifest in this region")
    assert m is not None  # a region is listed for an entry only with its manifest
    started = time.monotonic()
    if deep:
        try:  # the identities that open this snapshot: a tenant key is unwrapped here
            identities = tenant_keys.snapshot_identities(rt, m, identities, unwrapped)
        except DrError as exc:
            return result(UNREADABLE, str(exc))
    status, reason = check_copy(rt.store(region), m, deep=deep, identities=identities)
    return result(status, reason, m.size if status == OK else 0, time.monotonic() - started)
