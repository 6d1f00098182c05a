"""What snapshots exist: committed manifests, read and authenticated per region."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import manifest
from .errors import DrError, IntegrityError, UsageError
from .manifest import Manifest
from .runtime import Runtime
from .storage import NotFound, ObjectStore


@dataclass
class SnapshotEntry:
    """One snapshot id of one source, merged across regions."""

    id: str
    source: str
    manifest: Manifest | None = None
    regions: list[str] = field(default_factory=list)  # regions with a valid manifest
    problems: dict[str, str] = field(default_factory=dict)  # region -> what is wrong there

    def to_dict(self, all_regions: list[str]) -> dict[str, object]:
        m = self.manifest
        return {
            "id": self.id, "source": self.source,
            "tenant": m.tenant if m else None, "tier": m.tier if m else None,
            "kind": m.kind if m else None,
            "consistency_time": m.consistency_time.isoformat() if m else None,
            "finished_at": m.finished_at.isoformat() if m else None,
            "size": m.size if m else None, "plaintext_size": m.plaintext_size if m else None,
            "sha256": m.sha256 if m else None,
            "regions": self.regions,
            "missing_regions": [r for r in all_regions if r not in self.regions],
            "problems": self.problems,
        }


@dataclass
class Listing:
    snapshots: list[SnapshotEntry]
    region_errors: dict[str, str]


def read_manifest(rt: Runtime, store: ObjectStore, source: str, snapshot_id: str) -> Manifest:
    """Fetch and authenticate one manifest; NotFound, StorageError or IntegrityError."""
    name = manifest.manifest_object_name(source, snapshot_id)
    raw = store.get_bytes(name, manifest.MAX_MANIFEST_BYTES)
    return manifest.parse(raw, rt.manifest_key, source=source, snapshot_id=snapshot_id)


def list_snapshots(rt: Runtime, source: str | None = None,
                   region: str | None = None) -> Listing:
    """Every committed snapshot of the configured sources, newest last."""
    sources = [rt.config.source(source).name] if source else [s.name for s in rt.config.sources]
    stores = [rt.store(region)] if region else rt.stores
    entries: dict[tuple[str, str], SnapshotEntry] = {}
    region_errors: dict[str, str] = {}
    for store in stores:
        try:
            for src in sources:
                for info in store.list(manifest.manifests_prefix(src)):
                    snap_id = manifest.snapshot_id_from_manifest_name(info.name)
                    if snap_id is None:
                        continue
                    entry = entries.setdefault((src, snap_id), SnapshotEntry(snap_id, src))
                    _add_region(rt, store, entry)
        except DrError as exc:
            region_errors[store.name] = str(exc)
    ordered = sorted(entries.values(), key=lambda e: (e.source, e.id))
    return Listing(ordered, region_errors)


def _add_region(rt: Runtime, store: ObjectStore, entry: SnapshotEntry) -> None:
    try:
        m = read_manifest(rt, store, entry.source, entry.id)
    except NotFound:
        return  # deleted between list and read
    except IntegrityError as exc:
        entry.problems[store.name] = str(exc)
        return
    if entry.manifest is not None and entry.manifest.sha256 != m.sha256:
        entry.problems[store.name] = "manifest differs from the other regions' copy"
        return
    entry.manifest = entry.manifest or m
    entry.regions.append(store.name)


def resolve(rt: Runtime, source: str, ref: str) -> SnapshotEntry:
    """The snapshot `ref` ("latest" or an id) of `source`, with the regions holding it."""
    if ref != "latest" and not manifest.ID_RE.match(ref):
        raise UsageError(f"invalid snapshot id {ref!r}: expected 'latest' or an id like "
                         "20261123T020000Z-1a2b3c4d")
    listing = list_snapshots(rt, source)
    found = [e for e in listing.snapshots if e.manifest is not None]
    if ref != "latest":
        found = [e for e in found if e.id == ref]
    if not found:
        what = "no snapshot" if ref == "latest" else f"no snapshot {ref}"
        errors = "".join(f"; region {k} unreadable: {v}" for k, v in
                         listing.region_errors.items())
        problems = [p for e in listing.snapshots if e.id == ref for p in e.problems.values()]
        detail = f" ({problems[0]})" if problems else ""
        raise UsageError(f"{what} of source {source!r} in any region{detail}{errors}")
    # Ids carry only the second: two snapshots begun in the same second are
    # ordered by their recorded start, so "latest" is never a coin toss.
    return max(found, key=lambda e: (e.manifest.started_at if e.manifest else None, e.id))
