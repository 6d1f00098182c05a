"""Uploads a killed backup left open: found by their in-flight marker, aborted in every region.

A backup marks each snapshot it uploads (state.inflight: pid, owner token, source).
`kill -9` leaves the marker and the open multipart uploads. They are aborted:

- at daemon start, for every source (`abort_stale`, with any incomplete upload
  older than a day, which may belong to a live process on another host);
- by the next `drctl backup` (or scheduled snapshot) of the same source
  (`abort_abandoned`), only those of markers naming that source.

A marker's process is gone when, on this host and boot (the owner token's
incarnation, drills/scratch.py), no process runs with its pid and start time;
a marker of another host or boot is left to the daemon's day-old rule (or, with a
cluster lock, to the rule of the daemon that takes the lock: see abort_stale), a marker
of an earlier version (pid only) is judged by its pid alone. A marker is forgotten
once every region was cleaned of its uploads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from . import layout, state
from .drills import scratch as owners
from .errors import DrError
from .runtime import Runtime

log = logging.getLogger("drdaemon")


def gone(marker: state.InflightMarker) -> bool:
    """Whether the process that wrote `marker` has ended (False when it cannot be told)."""
    if marker.pid <= 0:
        return True  # unreadable: no process can be told to own it
    owner = owners.Owner.from_token(marker.owner) if marker.owner else None
    if owner is None:
        return marker.pid != os.getpid() and not state.process_alive(marker.pid)
    if owner.incarnation != owners.incarnation():
        return False  # another host, boot or container: not ours to judge
    return (owner.pid, owner.start) != (os.getpid(), owners.process_start(os.getpid())) and \
        owners.process_start(owner.pid) != owner.start


@dataclass
class Aborted:
    by_region: dict[str, int] = field(default_factory=dict)  # uploads aborted
    snapshots: tuple[str, ...] = ()  # whose markers were forgotten
    errors: tuple[str, ...] = ()

    @property
    def uploads(self) -> int:
        return sum(self.by_region.values())


def _abort(rt: Runtime, abandoned: set[str], should_abort: Callable[[str, datetime], bool]
           ) -> Aborted:
    n: dict[str, int] = {}
    errors = []
    for store in rt.stores:
        try:
            n[store.name] = store.cleanup_incomplete(should_abort)
        except DrError as exc:
            errors.append(f"{store.name}: {exc}")
            log.warning("cannot clean stale uploads in %s: %s", store.name, exc)
    if not errors:
        state.forget_abandoned(rt.config.daemon.state_dir, abandoned)
    return Aborted(n, tuple(sorted(abandoned)) if not errors else (), tuple(errors))


def _snapshot_of(name: str) -> str:
    return name.rsplit("/", 1)[-1].split(".", 1)[0]


def abort_abandoned(rt: Runtime, source: str) -> Aborted:
    """Abort the open uploads of `source` whose backup process is gone (before a new one)."""
    markers = state.inflight_markers(rt.config.daemon.state_dir)
    abandoned = {m.snapshot_id for m in markers if m.source == source and gone(m)}
    if not abandoned:
        return Aborted()
    prefix = layout.source_prefix(source)
    done = _abort(rt, abandoned,
                  lambda name, _begun: name.startswith(prefix) and _snapshot_of(name) in abandoned)
    if done.uploads:
        rt.record_event("snapshot.uploads_aborted", source=source, uploads=done.uploads,
                        snapshots=list(done.snapshots))
    return done


def abort_stale(rt: Runtime, cutoff: datetime, taken_at: datetime | None = None) -> Aborted:
    """Daemon start: abort the uploads of every gone process, and any begun before `cutoff`.

    `taken_at`: when this daemon took the cluster lock (`[daemon] lock_dsn`). Every
    upload begun before then, except those of live processes on this host, is
    also aborted: their daemon lost the lock (died, or was fenced) and will never
    commit them, and its in-flight markers live in another host's state folder.
    """
    state_dir = rt.config.daemon.state_dir
    abandoned = {m.snapshot_id for m in state.inflight_markers(state_dir) if gone(m)}
    ours = state.live_inflight(state_dir) if taken_at is not None else set()

    def stale(name: str, begun: datetime) -> bool:
        snap = _snapshot_of(name)
        if snap in abandoned or begun < cutoff:
            return True
        return taken_at is not None and begun < taken_at and snap not in ours

    return _abort(rt, abandoned, stale)
