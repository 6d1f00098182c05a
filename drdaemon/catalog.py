"""What snapshots exist: committed manifests, read and authenticated per region.

Every reader (drctl, restore, verify, replicate, prune, drills) lists afresh
and authenticates every manifest it uses, each time. What it need not do each
time is download them: manifests are never rewritten, so the bytes of one
already seen come from the state folder's DiskCache (and are authenticated
again). The daemon's own bookkeeping, its metrics refresh and RPO watchdog,
also passes a :class:`ManifestCache` of manifests authenticated before, so that
a refresh every few minutes parses only what is new.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from . import layout, manifest
from .errors import DrError, IntegrityError, UsageError
from .manifest import Manifest
from .manifest_cache import DiskCache, ManifestCache
from .storage import NotFound, ObjectInfo, ObjectStore, TooLarge

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class SnapshotEntry:
    """One snapshot id of one source, merged across regions."""

    id: str
    source: str
    manifest: Manifest | None = None
    regions: list[str] = field(default_factory=list)  # regions with a valid manifest
    problems: dict[str, str] = field(default_factory=dict)  # region -> what is wrong there
    # region -> why it could not be listed when this entry was resolved (see `resolve`)
    unreachable: dict[str, str] = field(default_factory=dict)

    @property
    def unreadable(self) -> bool:
        """Listed (committed somewhere) but no region holds a manifest that authenticates."""
        return self.manifest is None

    def why_unreadable(self) -> str:
        """The problems that make it unreadable, one line."""
        return "; ".join(f"region {r}: {why}" for r, why in self.problems.items()) or \
            "no region holds an authenticated manifest"

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
            "unreadable": self.unreadable,
        }


@dataclass
class Listing:
    snapshots: list[SnapshotEntry]
    region_errors: dict[str, str]

    @property
    def unreadable(self) -> list[SnapshotEntry]:
        """Snapshots listed somewhere whose manifest no region can read."""
        return [e for e in self.snapshots if e.unreadable]


def _too_large() -> IntegrityError:
    return IntegrityError(f"manifest is larger than {manifest.MAX_MANIFEST_BYTES} bytes, "
                          "the most any reader accepts")


def newest_by_source(entries: Iterable[SnapshotEntry]) -> dict[str, SnapshotEntry]:
    """Pure: each source's newest complete snapshot (by consistency time, then id).

    The one rule for "newest" that the daemon's catch-up, `status` and the
    metrics share; its `regions` are the regions holding it.
    """
    newest: dict[str, SnapshotEntry] = {}
    for e in entries:
        if e.manifest is None:
            continue
        best = newest.get(e.source)
        if best is None or best.manifest is None or newness(e.manifest) > newness(best.manifest):
            newest[e.source] = e
    return newest


def newness(m: Manifest) -> tuple[datetime, str]:
    """The order "newest" means: consistency time, then id (ids carry only the second)."""
    return (m.consistency_time, m.id)


def read_manifest(rt: Runtime, store: ObjectStore, source: str, snapshot_id: str) -> Manifest:
    """Fetch and authenticate one manifest; NotFound, StorageError or IntegrityError
    (also for one too large to read: that is the manifest's fault, not the region's)."""
    return read_manifest_with_mac(rt, store, source, snapshot_id)[0]


def read_manifest_with_mac(rt: Runtime, store: ObjectStore, source: str,
                           snapshot_id: str) -> tuple[Manifest, dict[str, str]]:
    """`read_manifest`, and the manifest's `mac` ({"key_id", "value"}) as stored: what a
    drill record names so that an auditor can match it to the manifest in a bundle."""
    name = layout.manifest_object_name(source, snapshot_id)
    try:
        raw = store.get_bytes(name, manifest.MAX_MANIFEST_BYTES)
    except TooLarge:
        raise _too_large() from None
    m = manifest.parse(raw, rt.manifest_key, source=source, snapshot_id=snapshot_id)
    mac = json.loads(raw)["mac"]  # authenticated just now: a dict with these strings
    return m, {"key_id": str(mac["key_id"]), "value": str(mac["value"])}


# GETs of one region's new manifests overlap up to this many: as many as botocore keeps
# connections per client (10); the listing, one request per 1,000 objects, is over by
# then. With 20 ms per request, 1,000 GETs took ~12-14 s with 8, ~11 s with 10 here.
READ_WORKERS = 10


@dataclass
class _RegionRead:
    """What one region holds of the wanted sources: per (source, id), the listed object
    and its authenticated manifest, or why it is not usable (None: deleted meanwhile)."""

    found: dict[tuple[str, str], tuple[ObjectInfo, Manifest | str | None]] = \
        field(default_factory=dict)
    error: str | None = None


def list_snapshots(rt: Runtime, source: str | None = None, region: str | None = None, *,
                   cache: ManifestCache | None = None) -> Listing:
    """Every committed snapshot of the configured sources, newest last.

    Requests grow with pages of objects, not with sources: a region is listed
    once (its whole `sources/` tree, 1,000 names a request, or one source's
    manifests when `source` is given), the regions at the same time, and the
    manifests not read before are fetched a few at a time. The entries are then
    merged in the configured order of regions, so the outcome does not depend
    on which region answered first.

    With `cache` (the daemon's metrics refresh and watchdog only), manifests
    already authenticated are taken from it instead of storage, and the
    entries' manifests carry no `facts`; see :class:`ManifestCache`.
    """
    sources = [rt.config.source(source).name] if source else [s.name for s in rt.config.sources]
    stores = [rt.store(region)] if region else rt.stores
    with ThreadPoolExecutor(max(1, len(stores)), thread_name_prefix="list") as pool:
        reads = list(pool.map(lambda st: _read_region(rt, st, sources, cache), stores))
    entries: dict[tuple[str, str], SnapshotEntry] = {}
    region_errors: dict[str, str] = {}
    for store, read in zip(stores, reads, strict=True):
        if read.error is not None:
            region_errors[store.name] = read.error
            continue
        for (src, snap_id), (_info, got) in sorted(read.found.items()):
            entry = entries.setdefault((src, snap_id), SnapshotEntry(snap_id, src))
            if isinstance(got, Manifest):
                _add_copy(store.name, entry, got)
            elif got is not None:
                entry.problems[store.name] = got
    ordered = sorted(entries.values(), key=lambda e: (e.source, e.id))
    return Listing(ordered, region_errors)


def _listed_manifests(store: ObjectStore, sources: list[str]) -> dict[tuple[str, str],
                                                                       ObjectInfo]:
    """(source, id) -> listed manifest object, for `sources`, from as few listings as can be."""
    wanted = set(sources)
    prefix = layout.manifests_prefix(sources[0]) if len(sources) == 1 else \
        layout.SOURCES + "/"
    found = {}
    for info in store.list(prefix):
        obj = layout.parse_object_name(info.name)
        if obj is not None and obj.role == layout.MANIFESTS and obj.source in wanted:
            found[(obj.source, obj.snapshot_id)] = info
    return found


def _read_region(rt: Runtime, store: ObjectStore, sources: list[str],
                 cache: ManifestCache | None) -> _RegionRead:
    """List one region and authenticate what it holds (never raises for the region)."""
    read = _RegionRead()
    if not sources:
        return read
    try:
        listed = _listed_manifests(store, sources)
    except DrError as exc:
        read.error = str(exc)
        return read
    slices = {src: cache.slice(store.name, src) for src in sources} if cache else {}
    todo = []
    for key, info in listed.items():
        hit = slices[key[0]].get(info.name) if cache else None
        if hit is not None and hit[0] == (info.size, info.version):
            read.found[key] = (info, hit[1])
        elif info.size > manifest.MAX_MANIFEST_BYTES:
            # One snapshot no reader accepts must not hide the region's others.
            read.found[key] = (info, str(_too_large()))
        else:
            todo.append((key, info))
    disk = DiskCache(rt.config.daemon.state_dir, store.name)
    # The cache folder is opened once for every entry (not once an entry).
    stored = disk.get_many((info.name, info.size, info.version) for _, info in todo)
    new: list[tuple[str, int, str, bytes]] = []  # fetched and authenticated: for the disk
    # Entries in the disk cache are parsed here (CPU: threads would only take turns);
    # the others are fetched a few at a time.
    hits = [(key, info) for key, info in todo if info.name in stored]
    misses = [(key, info) for key, info in todo if info.name not in stored]
    try:
        got_hits = [_fetch(rt, store, disk, key, info, stored[info.name], new)
                    for key, info in hits]
        with ThreadPoolExecutor(READ_WORKERS, thread_name_prefix=f"read-{store.name}") as pool:
            fetched = pool.map(lambda item: _fetch(rt, store, disk, item[0], item[1], None,
                                                   new), misses)
            for (key, info), got in zip([*hits, *misses], [*got_hits, *fetched], strict=True):
                if cache is not None and isinstance(got, Manifest):
                    got = dataclasses.replace(got, facts={})
                read.found[key] = (info, got)
    except DrError as exc:  # the region failed while being read: it is unreachable
        return _RegionRead(error=str(exc))
    disk.put_many(new)  # in one go: a cold start writes a thousand
    if len(sources) == len(rt.config.sources):
        disk.keep_only(DiskCache.entry(i.name, i.size, i.version) for i in listed.values())
    if cache is not None:
        seen: dict[str, dict[str, tuple[tuple[int, str], Manifest]]] = {s: {} for s in sources}
        for (src, _), (info, got) in read.found.items():
            if isinstance(got, Manifest):
                # Authentic (a copy differing from another region's is still worth
                # keeping: the comparison is made again on every listing).
                seen[src][info.name] = ((info.size, info.version), got)
        for src in sources:
            cache.replace(store.name, src, seen[src])
    return read


def _fetch(rt: Runtime, store: ObjectStore, disk: DiskCache, key: tuple[str, str],
           info: ObjectInfo, cached: bytes | None,
           new: list[tuple[str, int, str, bytes]]) -> Manifest | str | None:
    """One listed manifest, authenticated: from `cached` (its bytes in the disk cache),
    else from storage (then added to `new`, for the disk cache); why it is not usable;
    None if deleted since it was listed."""
    source, snap_id = key
    if cached is not None:
        try:
            return manifest.parse(cached, rt.manifest_key, source=source, snapshot_id=snap_id)
        except IntegrityError as exc:
            # Refused as a bucket's copy would be; storage may still hold a good one.
            log.warning("manifest cache: %s of region %s refused (%s); read from storage",
                        info.name, store.name, exc)
            disk.drop(info.name, info.size, info.version)
    try:
        raw = store.get_bytes(info.name, manifest.MAX_MANIFEST_BYTES)
    except TooLarge:
        return str(_too_large())
    except NotFound:
        return None  # deleted between list and read
    try:
        m = manifest.parse(raw, rt.manifest_key, source=source, snapshot_id=snap_id)
    except IntegrityError as exc:
        return str(exc)
    new.append((info.name, info.size, info.version, raw))  # list.append is atomic
    return m


def _add_copy(region: str, entry: SnapshotEntry, m: Manifest) -> None:
    """Add `region`'s authenticated copy to `entry`, unless it differs from another's."""
    if entry.manifest is not None and entry.manifest.sha256 != m.sha256:
        entry.problems[region] = "manifest differs from the other regions' copy"
        return
    entry.manifest = entry.manifest or m
    entry.regions.append(region)


def newest_manifest(rt: Runtime, source: str,
                    known: dict[str, Manifest] | None = None) -> Manifest | None:
    """The newest committed snapshot of `source` that authenticates in some region.

    Reads as little as it can: one listing per region, then only the newest
    id's manifest (an older one only if that cannot be read anywhere).
    Regions that cannot be listed are passed over; None if nothing is found.
    `known` (source -> a manifest authenticated before, e.g. the one this
    process just wrote): the listing still decides which snapshot is newest,
    but that one is not read again if it is the one known; one read is kept there.
    """
    def listed(store: ObjectStore) -> list[str]:
        try:
            return [snap_id for info in store.list(layout.manifests_prefix(source))
                    if (snap_id := layout.snapshot_id_from_manifest_name(info.name))]
        except DrError:
            return []

    holders: dict[str, list[ObjectStore]] = {}
    # The regions at the same time; their holders in the configured order.
    with ThreadPoolExecutor(max(1, len(rt.stores)), thread_name_prefix="newest") as pool:
        for store, ids in zip(rt.stores, pool.map(listed, rt.stores), strict=True):
            for snap_id in ids:
                holders.setdefault(snap_id, []).append(store)
    ids = sorted(holders, reverse=True)
    while ids:
        # Ids carry only the second: every id of the newest second is read and
        # the latest recorded start wins, as in choose_latest.
        second = ids[0][:16]
        batch = [i for i in ids if i.startswith(second)]
        ids = ids[len(batch):]
        found = [m for m in (_first_readable(rt, holders[i], source, i, known)
                             for i in batch) if m is not None]
        if found:
            return max(found, key=lambda m: (m.started_at, m.id))
    return None


def _first_readable(rt: Runtime, stores: list[ObjectStore], source: str, snap_id: str,
                    known: dict[str, Manifest] | None = None) -> Manifest | None:
    if known is not None and (m := known.get(source)) is not None and m.id == snap_id:
        return m
    for store in stores:
        try:
            m = read_manifest(rt, store, source, snap_id)
        except DrError:
            continue
        if known is not None:
            known[source] = m
        return m
    return None


class NewestUnreadable(DrError):
    """The newest committed snapshot cannot be read in any region: no silent fallback."""


@dataclass
class Resolved:
    """The snapshot a reference chose, and the newer ones passed over to get there."""

    entry: SnapshotEntry
    skipped: list[SnapshotEntry] = field(default_factory=list)  # unreadable, newest first

    def note(self) -> str | None:
        """One line naming the unreadable newer snapshots and the one used instead."""
        if not self.skipped:
            return None
        newest = self.skipped[0]
        return (f"the newest snapshot {newest.id} cannot be read in any region "
                f"({newest.why_unreadable()}); used the older {self.entry.id}")


def choose_latest(entries: list[SnapshotEntry], *, allow_older: bool) -> Resolved | None:
    """The newest readable snapshot of one source's `entries`; None if there is none. Pure.

    Listed snapshots newer than it whose manifest no region can read (too
    large, forged, malformed) are what RPO is measured against: falling back
    past them is refused (NewestUnreadable) unless `allow_older`.
    """
    readable = [e for e in entries if e.manifest is not None]
    unreadable = sorted((e for e in entries if e.unreadable), key=lambda e: e.id, reverse=True)
    if not readable:
        if unreadable:
            raise NewestUnreadable(
                f"the newest snapshot of source {unreadable[0].source!r}, {unreadable[0].id}, "
                f"cannot be read in any region ({unreadable[0].why_unreadable()}), nor can "
                "any older one")
        return None
    # Ids carry only the second: two snapshots begun in the same second are
    # ordered by their recorded start, so "latest" is never a coin toss.
    chosen = max(readable, key=lambda e: (e.manifest.started_at if e.manifest else None, e.id))
    skipped = [e for e in unreadable if e.id > chosen.id]
    if skipped and not allow_older:
        newest = skipped[0]
        raise NewestUnreadable(
            f"the newest snapshot of source {newest.source!r}, {newest.id}, cannot be read in "
            f"any region ({newest.why_unreadable()}); refusing to fall back to the older "
            f"{chosen.id} silently (--allow-older uses it)")
    return Resolved(chosen, skipped)


def resolve_ref(rt: Runtime, source: str, ref: str, *, allow_older: bool = False) -> Resolved:
    """The snapshot `ref` ("latest" or an id) of `source`, with the regions holding it.

    "latest" refuses (NewestUnreadable) when a newer snapshot is listed but
    unreadable everywhere, unless `allow_older`.
    """
    if ref != "latest" and not layout.is_snapshot_id(ref):
        raise UsageError(f"invalid snapshot id {ref!r}: expected 'latest' or an id like "
                         "20261123T020000Z-1a2b3c4d")
    listing = list_snapshots(rt, source)
    if ref == "latest":
        found = choose_latest(listing.snapshots, allow_older=allow_older)
    else:
        found = next((Resolved(e) for e in listing.snapshots
                      if e.id == ref and e.manifest is not None), None)
    if found is None:
        what = "no snapshot" if ref == "latest" else f"no snapshot {ref}"
        errors = "".join(f"; region {k} unreadable: {v}" for k, v in
                         listing.region_errors.items())
        problems = [e.why_unreadable() for e in listing.snapshots
                    if e.id == ref or (ref == "latest" and e.unreadable)]
        detail = f" ({problems[-1]})" if problems else ""
        raise UsageError(f"{what} of source {source!r} in any region{detail}{errors}")
    # A region that could not be listed may well hold it: say so, not "missing".
    found.entry.unreachable.update(listing.region_errors)
    return found


def resolve(rt: Runtime, source: str, ref: str) -> SnapshotEntry:
    """The snapshot `ref` of `source` (see resolve_ref; never falls back to an older one)."""
    return resolve_ref(rt, source, ref).entry
