"""The caches of manifests that catalog.list_snapshots fills: the daemon's in memory,
and every process's on disk in the state folder.

Its own module so that the runtime, which holds one, needs nothing of the
catalog (which needs the runtime).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from . import statefs
from .manifest import MAX_MANIFEST_BYTES, Manifest

log = logging.getLogger(__name__)

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


class DiskCache:
    """Manifests as stored in one region, kept in the state folder so that `drctl` and
    a restarting daemon GET only the manifests they have not seen before.

    An entry is named by the object's name, listed size and version (ETag, or
    mtime and inode), so an object written again is never answered from the
    cache. Entries are the stored bytes, not a verdict: every reader parses and
    authenticates them again with the manifest key, so a tampered cache is
    refused like a tampered bucket. The cache is a convenience: a state folder
    it cannot be written to (another user's) costs GETs, never a failure.
    """

    def __init__(self, state_dir: Path, region: str) -> None:
        self.state_dir = state_dir
        self.folder = f"{statefs.MANIFEST_CACHE}/{region}"

    @staticmethod
    def entry(name: str, size: int, version: str) -> str:
        """The cache file of one listed object."""
        key = f"{name}\0{size}\0{version}".encode()
        return hashlib.sha256(key).hexdigest()[:40] + ".json"

    def get_many(self, listed: Iterable[tuple[str, int, str]]) -> dict[str, bytes]:
        """The bytes stored for the listed objects (name, size, version) that are cached,
        read through one descriptor of the cache folder: name -> bytes (unauthenticated!)."""
        wanted = {self.entry(n, size, v): (n, size) for n, size, v in listed
                  if size <= MAX_MANIFEST_BYTES and v}
        try:
            found = statefs.read_many(self.state_dir, self.folder, wanted)
        except (OSError, statefs.UnsafeState) as exc:
            log.warning("manifest cache not used: %s", exc)
            return {}
        return {wanted[e][0]: data for e, data in found.items() if len(data) == wanted[e][1]}

    def put_many(self, fetched: Iterable[tuple[str, int, str, bytes]]) -> None:
        """`put` of each (name, listed size, version, raw), through one descriptor of the
        cache folder (a cold start writes a thousand entries); best effort."""
        files = {self.entry(name, size, version): raw for name, size, version, raw in fetched
                 if len(raw) == size and version}
        try:
            # Not fsynced: an entry a crash cut short fails authentication when read
            # and is fetched from the region again.
            statefs.write_many(self.state_dir, self.folder, files)
        except (OSError, statefs.UnsafeState) as exc:
            log.debug("manifest cache %s not written: %s", self.folder, exc)

    def drop(self, name: str, size: int, version: str) -> None:
        """Remove one entry (it failed authentication)."""
        try:
            statefs.unlink(self.state_dir, f"{self.folder}/{self.entry(name, size, version)}")
        except (OSError, statefs.UnsafeState) as exc:
            log.debug("manifest cache entry not removed: %s", exc)

    def keep_only(self, entries: Iterable[str]) -> None:
        """Remove every entry but `entries` (after a listing of everything configured),
        so the cache never outgrows what the region holds."""
        wanted = set(entries)
        try:
            names = statefs.list_names(self.state_dir, self.folder)
        except (OSError, statefs.UnsafeState) as exc:
            log.debug("manifest cache %s not listed: %s", self.folder, exc)
            return
        for name in names:
            if name not in wanted and name.endswith(".json"):
                try:
                    statefs.unlink(self.state_dir, f"{self.folder}/{name}")
                except (OSError, statefs.UnsafeState) as exc:
                    log.debug("manifest cache entry not removed: %s", exc)
                    return
