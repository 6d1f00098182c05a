"""The daemon's cache of authenticated manifests, which catalog.list_snapshots fills.

Its own module so that the runtime, which holds one, needs nothing of the
catalog (which needs the runtime).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from .manifest import Manifest

# (object name -> ((listed size, version), authenticated manifest)) of one region and source
CacheSlice = Mapping[str, tuple[tuple[int, str], Manifest]]


class ManifestCache:
    """Authenticated manifests by region, source, object name, listed size and version.

    Manifests are never rewritten (docs/format.md: prune's undo and replica
    repair put the same bytes back), so a listed name whose size and version
    (ETag, or mtime and inode) have not changed holds the manifest
    authenticated before; an object written again is read and authenticated
    again. Each listing of a source in
    a region replaces that slice with what it listed, so deleted snapshots
    drop out and memory stays bounded by what storage holds. A manifest that
    failed authentication is never kept. Cached manifests carry no `facts`
    (the per-table row counts drills compare against, which can be large):
    the daemon's metrics and watchdog never read them. Safe to share between
    threads: a slice is replaced whole, never changed in place.
    """

    def __init__(self) -> None:
        self._slices: dict[tuple[str, str], CacheSlice] = {}
        self._lock = threading.Lock()

    def slice(self, region: str, source: str) -> CacheSlice:
        with self._lock:
            return self._slices.get((region, source), {})

    def replace(self, region: str, source: str, entries: CacheSlice) -> None:
        with self._lock:
            self._slices[(region, source)] = entries

    def __len__(self) -> int:
        with self._lock:
            return sum(len(s) for s in self._slices.values())
