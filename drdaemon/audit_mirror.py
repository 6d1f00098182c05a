"""The audit log's copies in the regions, and the scheduled check of every copy.

The local log (audit.py) is mirrored to every region, segment by segment, where
Object Lock keeps finished segments beyond the reach of whoever controls this
host (`mirror`); a region's copy is read back and compared with the local log
(`verify_mirror`); the daemon's scheduled check does both for every region
(`verify_everywhere`). The layout is in docs/format.md ("Audit log").
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from . import layout, statefs
from .audit import AuditContext, chain_keys, log_path, read_lines, verify
from .audit_chain import (
    GENESIS,
    MAX_LINE,
    SEGMENT_RECORDS,
    AuditVerification,
    ChainKeys,
    line_hash,
    mirror_folder,
    segments,
    split_lines,
    verify_lines,
)
from .errors import DrError, UsageError
from .storage import ObjectStore, StorageError

log = logging.getLogger(__name__)


RETRY_REGION_AFTER = 300.0  # seconds a region whose mirror failed is left alone


@dataclass
class MirrorState:
    """Per runtime: when each region whose mirror failed may be tried again."""

    retry_at: dict[str, float] = field(default_factory=dict)


class MirrorContext(AuditContext, Protocol):
    """What mirroring needs of a runtime besides the local log (runtime.Runtime is one)."""

    @property
    def stores(self) -> list[ObjectStore]: ...
    @property
    def audit_mirror(self) -> MirrorState: ...

    def store(self, region: str) -> ObjectStore: ...


def mirror(rt: MirrorContext) -> dict[str, str]:
    """Copy the local log to every region, best effort; return the regions that failed.

    Only segments that grew are written; a full segment is written once more
    with the Object Lock horizon where the bucket has Object Lock. A region that
    fails is logged and left alone for RETRY_REGION_AFTER seconds: this never
    raises for a region, so recording an event never fails because of one.
    """
    state_dir = rt.config.daemon.state_dir
    failed: dict[str, str] = {}
    # Serialised so that a slower mirror never replaces a newer copy with an older one.
    with statefs.locked(state_dir, statefs.AUDIT_MIRROR_LOCK, os.O_RDWR):
        lines = read_lines(state_dir)
        if not lines:
            return failed
        folder = mirror_folder(socket.gethostname(), lines[0])
        parts = list(segments(lines))
        lock_until = rt.config.retention.lock_until(rt.clock())
        for store in rt.stores:
            now = time.monotonic()
            if rt.audit_mirror.retry_at.get(store.name, 0.0) > now:
                continue
            try:
                _mirror_to(store, folder, parts, lock_until)
            except Exception as exc:  # any failure of one region: see the docstring
                why = str(exc) or exc.__class__.__name__
                failed[store.name] = why
                rt.audit_mirror.retry_at[store.name] = now + RETRY_REGION_AFTER
                log.warning("audit log not mirrored to region %s (retried in %d min): %s",
                            store.name, RETRY_REGION_AFTER // 60, why)
    return failed


def _mirror_to(store: ObjectStore, folder: str, parts: list[tuple[int, bytes, bool]],
               lock_until: datetime | None) -> None:
    held = {info.name: info.size for info in store.list(folder + "/")}
    for first, data, full in parts:
        name = layout.audit_segment_name(folder, first)
        size = held.get(name)
        if size == len(data):
            continue
        if size is not None and size > len(data):
            # The region holds more of this chain than the local log: the local
            # log was cut. A shorter copy must never replace the longer one.
            raise DrError(f"{name} holds {size} bytes but the local log only {len(data)}; "
                          "the local log was cut: run drctl audit verify --region "
                          f"{store.name}")
        store.put_bytes(name, data, retain_until=lock_until if full else None)


def read_mirror(store: ObjectStore, folder: str) -> list[bytes]:
    """A region's copy of a chain, segment after segment."""
    lines: list[bytes] = []
    for info in sorted(store.list(folder + "/"), key=lambda i: i.name):
        lines += split_lines(store.get_bytes(info.name, SEGMENT_RECORDS * MAX_LINE))
    return lines


def verify_mirror(rt: MirrorContext, region: str,
                  keys: ChainKeys | None = None) -> AuditVerification:
    """Verify a region's copy of this host's log, and that it agrees with the local log.

    A copy behind the local log is fine (the mirror is best effort); a copy
    that differs, or holds records the local log lost, is not. `keys`: what
    to check it with (default: the runtime's, audit.chain_keys).
    """
    store = rt.store(region)
    state_dir = rt.config.daemon.state_dir
    local = read_lines(state_dir)
    if not local:
        raise UsageError(f"no audit log in {log_path(state_dir)}: nothing to compare "
                         f"region {region} with")
    folder = mirror_folder(socket.gethostname(), local[0])
    mirrored = read_mirror(store, folder)
    local = read_lines(state_dir)  # read after the mirror: it can only have grown since
    if not mirrored:
        return AuditVerification(False, 0, 0, f"region {region} holds no copy of this log "
                                              f"({folder}/)")
    result = verify_lines(mirrored, keys if keys is not None else chain_keys(rt))
    upto = result.records if result.ok else (result.first_bad or 0)
    for seq in range(min(upto, len(local))):
        if mirrored[seq] != local[seq]:
            return AuditVerification(False, seq, seq, "differs from the local log: one of the "
                                     "two copies was rewritten", _head(mirrored, seq))
    if result.ok and len(mirrored) > len(local):
        return AuditVerification(False, len(local), len(local),
                                 f"region {region} holds {len(mirrored)} records but the local "
                                 f"log only {len(local)}: the local log was cut",
                                 _head(mirrored, len(local)))
    return result


def _head(lines: Sequence[bytes], count: int) -> str:
    return line_hash(lines[count - 1]) if count else GENESIS


@dataclass(frozen=True)
class AuditCheck:
    """The local log and every region's copy of it, checked at `checked_at`.

    What the daemon's `audit` job reports and metrics export. `regions` holds
    the regions whose copy was read and compared with the local log;
    `unreachable` the regions that could not be read, which says nothing about
    the log (metrics keep their last result, so a long outage shows as a stale
    check). With no local log there is no chain to compare, so no region either.
    """

    checked_at: datetime
    local: AuditVerification
    regions: dict[str, AuditVerification] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.local.ok and all(r.ok for r in self.regions.values())

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked_at": self.checked_at.isoformat(),
                "local": self.local.to_dict(),
                "regions": {name: r.to_dict() for name, r in self.regions.items()},
                "unreachable": dict(self.unreachable)}


def verify_everywhere(rt: MirrorContext) -> AuditCheck:
    """`drctl audit verify`, then `drctl audit verify --region R` for every region.

    The same service functions the CLI calls, one report; never raises for a
    region that cannot be read. A local log that verifies is mirrored first, so
    that a region added since the last record, or one that was down when it was
    recorded, is compared with all of it instead of reported as holding no copy;
    a log that does not verify is never copied over the regions' evidence.
    """
    checked_at = rt.clock()
    local = verify(rt)
    regions: dict[str, AuditVerification] = {}
    unreachable: dict[str, str] = {}
    if local.records or not local.ok:  # there is a log: lines verified, or a bad one
        if local.ok:
            mirror(rt)  # best effort; a cut local log never replaces a longer copy
        for store in rt.stores:
            try:
                regions[store.name] = verify_mirror(rt, store.name)
            except StorageError as exc:
                unreachable[store.name] = str(exc) or exc.__class__.__name__
    return AuditCheck(checked_at, local, regions, unreachable)
