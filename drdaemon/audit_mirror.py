"""The audit log's copies in the regions, and the scheduled check of every copy.

The local log (audit.py) is mirrored to every region as segments written once,
where Object Lock keeps each beyond the reach of whoever controls this host
(`mirror`; which segments, pure, in audit_segments.py); a region's copy is read
back and compared with the local log, and every chain folder the region holds
is looked at, so that a log wiped and begun anew, or a rewritten chain beside
the old one, shows (`verify_mirror`); the daemon's scheduled check does both
for every region (`verify_everywhere`). The layout is in docs/format.md
("Audit log").
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from . import anchors, layout, statefs
from .audit import AuditContext, chain_keys, chain_label, read_lines, verify
from .audit_chain import (
    GENESIS,
    MAX_LINE,
    SEGMENT_RECORDS,
    AuditVerification,
    ChainKeys,
    line_hash,
    mirror_folder,
    parse_records,
    split_lines,
    verify_lines,
)
from .audit_segments import (
    ChainFolder,
    assemble,
    chain_folders,
    held_records,
    is_whole_block,
    spans_to_write,
    to_read,
    whole_blocks,
)
from .errors import DrError, UsageError
from .storage import ObjectStore, StorageError

log = logging.getLogger(__name__)


RETRY_REGION_AFTER = 300.0  # seconds a region whose mirror failed is left alone


@dataclass(frozen=True)
class Mirrored:
    """What this process knows a region holds of one chain folder: records 0 to
    `held` - 1, and the whole blocks beginning at `whole` (audit_segments)."""

    folder: str
    held: int
    whole: frozenset[int] = frozenset()


@dataclass
class MirrorState:
    """Per runtime: when each region whose mirror failed may be tried again, and what
    each region holds as this process last listed or wrote it (so that a record
    costs one PUT per region, not a LIST of the whole chain folder as well)."""

    retry_at: dict[str, float] = field(default_factory=dict)
    known: dict[str, Mirrored] = field(default_factory=dict)


class MirrorContext(AuditContext, Protocol):
    """What mirroring needs of a runtime besides the local log (runtime.Runtime is one)."""

    @property
    def stores(self) -> list[ObjectStore]: ...
    @property
    def audit_mirror(self) -> MirrorState: ...

    def store(self, region: str) -> ObjectStore: ...

    def record_event(self, event: str, **fields: Any) -> None: ...


def mirror(rt: MirrorContext) -> dict[str, str]:
    """Copy the local log to every region, best effort; return the regions that failed.

    Each region gets the records it lacks as new segments, written once with
    the Object Lock horizon where the bucket has Object Lock: usually one PUT
    per region. What a region holds is listed only when this process does not
    know it (its first mirror there, after a failure there, a new chain, a
    local log shorter than what it wrote, or `verify_everywhere`); after that,
    what it wrote is remembered (`MirrorState.known`). Another process on this host mirroring
    meanwhile at worst makes it write records the region already holds again,
    in a segment of their own, which readers take once (audit_segments.assemble).
    A region that fails is logged and left alone for RETRY_REGION_AFTER
    seconds: this never raises for a region, so recording an event never
    fails because of one.
    """
    state_dir = rt.config.daemon.state_dir
    failed: dict[str, str] = {}
    # Serialised so that two mirrors never write the same records twice.
    with statefs.locked(state_dir, statefs.AUDIT_MIRROR_LOCK, os.O_RDWR):
        lines = read_lines(state_dir)
        if not lines:
            return failed
        folder = mirror_folder(chain_label(rt.config.daemon), lines[0])
        lock_until = rt.config.retention.lock_until(rt.clock())
        for store in rt.stores:
            now = time.monotonic()
            if rt.audit_mirror.retry_at.get(store.name, 0.0) > now:
                continue
            known = rt.audit_mirror.known.pop(store.name, None)
            try:
                rt.audit_mirror.known[store.name] = _mirror_to(store, folder, lines,
                                                               lock_until, known)
            except Exception as exc:  # any failure of one region: see the docstring
                why = str(exc) or exc.__class__.__name__
                failed[store.name] = why
                rt.audit_mirror.retry_at[store.name] = now + RETRY_REGION_AFTER
                log.warning("audit log not mirrored to region %s (retried in %d min): %s",
                            store.name, RETRY_REGION_AFTER // 60, why)
    return failed


def _mirror_to(store: ObjectStore, folder: str, lines: Sequence[bytes],
               lock_until: datetime | None, known: Mirrored | None) -> Mirrored:
    """Write the segments `store` lacks; return what it holds then. `known`: what it
    held as this process last saw it (listed when None or no longer fitting)."""
    if known is None or known.folder != folder or known.held > len(lines):
        segs = _listed(store, folder + "/").get(folder)
        segments = segs.segments if segs else ()
        known = Mirrored(folder, held_records(segments, lines), whole_blocks(segments))
    if known.held > len(lines):
        # The region holds more of this chain than the local log: the local log
        # was cut. Its copy stays as it is: it is the evidence.
        raise DrError(f"region {store.name} holds more of {folder}/ than the local log's "
                      f"{len(lines)} records: the local log was cut: run drctl audit verify "
                      f"--region {store.name}")
    whole = set(known.whole)
    for first, last in spans_to_write(known.whole, known.held, len(lines)):
        store.put_bytes(layout.audit_span_name(folder, first, last),
                        b"".join(lines[first:last + 1]), retain_until=lock_until)
        if is_whole_block(first, last):
            whole.add(first)
    return Mirrored(folder, max(known.held, len(lines)), frozenset(whole))


def _listed(store: ObjectStore, prefix: str) -> dict[str, ChainFolder]:
    return chain_folders((info.name, info.size) for info in store.list(prefix))


def _read_folder(store: ObjectStore, segs: ChainFolder | None) -> tuple[list[bytes], list[str]]:
    parts = [(s, split_lines(store.get_bytes(s.name, SEGMENT_RECORDS * MAX_LINE)))
             for s in to_read(segs.segments if segs else ())]
    return assemble(parts)


def read_mirror(store: ObjectStore, folder: str) -> list[bytes]:
    """A region's copy of one chain folder (`audit/<host>/<chain>`), all its lines in order.

    Segments of both layouts are read; a gap or a fork leaves the lines as the
    segments hold them, so that checking them fails there
    (`verify_mirror` names it).
    """
    return _read_folder(store, _listed(store, folder + "/").get(folder))[0]


@dataclass(frozen=True)
class CopyAudit:
    """A copy of this host's log checked: a region's, with every chain folder the region
    holds, or the local log (`verify_local`: `problems` from the anchors only).

    `chain` is the region's copy of the local log's chain, verified and compared
    with the local log; `problems` what else is wrong: a gap or fork in that
    copy, another chain of this host (the local log was wiped and begun anew,
    or replaced by a rewritten chain), a region holding this host's chain while
    the local log is empty. `other_chains` are the folders of this host's
    other chains; `chains` counts every host's chain folders the region holds.
    """

    chain: AuditVerification
    problems: tuple[str, ...] = ()
    other_chains: tuple[str, ...] = ()
    chains: int = 0

    @property
    def ok(self) -> bool:
        return self.chain.ok and not self.problems

    @property
    def records(self) -> int:
        return self.chain.records

    @property
    def head(self) -> str:
        return self.chain.head

    @property
    def first_bad(self) -> int | None:
        return self.chain.first_bad

    @property
    def reason(self) -> str | None:
        return self.chain.reason or (self.problems[0] if self.problems else None)

    def to_dict(self) -> dict[str, Any]:
        return {**self.chain.to_dict(), "ok": self.ok, "reason": self.reason,
                "problems": list(self.problems), "other_chains": list(self.other_chains),
                "chains": self.chains}


def verify_mirror(rt: MirrorContext, region: str,
                  keys: ChainKeys | bytes | None = None) -> CopyAudit:
    """Verify a region's copy of this host's log, that it agrees with the local log, and
    that the region holds no other chain of this host.

    One listing of `audit/` shows every chain folder of every host. A copy
    behind the local log is fine (the mirror is best effort); a copy that
    differs, holds records the local log lost, has a gap or a fork, or another
    chain of this host beside it, is not. `keys` default to the runtime's (audit.chain_keys).
    """
    store = rt.store(region)
    keys = chain_keys(rt) if keys is None else keys
    state_dir = rt.config.daemon.state_dir
    local = read_lines(state_dir)
    host = chain_label(rt.config.daemon)
    folders = _listed(store, layout.AUDIT_MIRROR + "/")
    current = mirror_folder(host, local[0]) if local else None
    problems: list[str] = []
    others = sorted(f for f, c in folders.items() if c.host == host and f != current)
    accepted = accepted_chains(local)
    held_anchors = anchors.load_stored(store, host)
    for other in list(others):
        lines, _ = _read_folder(store, folders[other])
        seen = verify_lines(lines, keys)
        if seen.ok and accepted.get(other) == (seen.records, seen.head):
            # Accepted as it is (`accept_chain`): its anchors are checked against it.
            others.remove(other)
            chain_id = other.rsplit("/", 1)[1]
            problems += anchors.check_with(rt, lines,
                                           [a for a in held_anchors if a.chain == chain_id])
            held_anchors = [a for a in held_anchors if a.chain != chain_id]
            continue
        what = (f"{seen.records} records, head {seen.head}" if seen.ok else
                f"{len(lines)} records, not verifying from record {seen.first_bad}")
        problems.append(
            f"another chain of this host in region {region}: {other}/ ({what}), which the "
            "local log does not extend: the local log was " +
            ("wiped" if not local else "wiped and begun anew, or replaced by a rewritten chain"))
    # The region's anchors of this host, against the local log: the region's copy may
    # lag behind them, and it must agree with the local log (below) anyway.
    problems += anchors.check_with(rt, local, held_anchors)
    if current is None:
        return CopyAudit(AuditVerification(True, 0), tuple(problems), tuple(others),
                         len(folders))
    mirrored, gaps = _read_folder(store, folders.get(current))
    problems[:0] = gaps
    local = read_lines(state_dir)  # read after the mirror: it can only have grown since
    chain = _compare(mirrored, local, keys, region, current)
    return CopyAudit(chain, tuple(problems), tuple(others), len(folders))


CHAIN_ACCEPTED = "audit.chain.accepted"


def accepted_chains(lines: Sequence[bytes]) -> dict[str, tuple[object, object]]:
    """folder -> (records, head) of each earlier chain of this host the log accepted."""
    return {str(r["folder"]): (r.get("records"), r.get("head")) for r in parse_records(lines)
            if r.get("event") == CHAIN_ACCEPTED and isinstance(r.get("folder"), str)}


def accept_chain(rt: MirrorContext, region: str, folder: str, reason: str) -> dict[str, Any]:
    """Record that `folder`, an earlier chain of this host in `region`, is known: the log was
    lost and begun anew (an incident), not rewritten. From then on `verify_mirror` no longer
    reports that chain as long as it stays as it is now (its records and head); its own
    anchors are checked against it. The record names the chain for auditors."""
    if not reason.strip():
        raise UsageError("--reason is required: the incident that lost the log")
    store = rt.store(region)
    host = chain_label(rt.config.daemon)
    local = read_lines(rt.config.daemon.state_dir)
    chain = _listed(store, layout.AUDIT_MIRROR + "/").get(folder)
    if chain is None or chain.host != host:
        raise UsageError(f"region {region} holds no chain {folder}/ of this host")
    if local and folder == mirror_folder(host, local[0]):
        raise UsageError(f"{folder}/ is the local log's own chain")
    lines, gaps = _read_folder(store, chain)
    seen = verify_lines(lines, chain_keys(rt))
    if not seen.ok or gaps:
        raise UsageError(f"{folder}/ in region {region} does not verify "
                         f"({seen.reason or gaps[0]}): it is evidence of tampering, not an "
                         "earlier chain to accept")
    fields = {"folder": folder, "region": region, "records": seen.records, "head": seen.head,
              "reason": reason}
    rt.record_event(CHAIN_ACCEPTED, **fields)
    return fields


def verify_local(rt: MirrorContext, chain: AuditVerification | None = None) -> CopyAudit:
    """`drctl audit verify`: the local log's chain (`chain`: as checked already, e.g. with
    a public key alone), and that it extends every anchored head the state folder and the
    witness bucket hold."""
    lines = read_lines(rt.config.daemon.state_dir)
    problems = anchors.check_local(rt, lines)
    try:
        problems += anchors.check_witness(rt, lines)
    except StorageError as exc:
        problems.append(f"the witness bucket could not be read, its anchors were not checked: "
                        f"{exc}")
    return CopyAudit(chain if chain is not None else verify(rt), tuple(problems))


def _compare(mirrored: list[bytes], local: list[bytes], keys: ChainKeys | bytes, region: str,
             folder: str) -> AuditVerification:
    if not mirrored:
        return AuditVerification(False, 0, 0, f"region {region} holds no copy of this log "
                                              f"({folder}/)")
    result = verify_lines(mirrored, keys)
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
    check). With no local log the regions are still read: a region holding a
    chain of this host shows that the log was wiped.
    """

    checked_at: datetime
    local: AuditVerification
    regions: dict[str, CopyAudit] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)
    # The local log against the anchors of the state folder and the witness.
    local_problems: tuple[str, ...] = ()

    @property
    def local_ok(self) -> bool:
        return self.local.ok and not self.local_problems

    @property
    def ok(self) -> bool:
        return self.local_ok and all(r.ok for r in self.regions.values())

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked_at": self.checked_at.isoformat(),
                "local": {**self.local.to_dict(), "ok": self.local_ok,
                          "problems": list(self.local_problems)},
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
    regions: dict[str, CopyAudit] = {}
    unreachable: dict[str, str] = {}
    lines = read_lines(rt.config.daemon.state_dir)
    local_problems = anchors.check_local(rt, lines)
    try:
        local_problems += anchors.check_witness(rt, lines)
    except StorageError as exc:
        unreachable["witness"] = str(exc) or exc.__class__.__name__
    if local.records and local.ok:
        # From fresh listings, not what this process remembers writing: a region
        # that lost its copy (a bucket made anew) gets it back here.
        rt.audit_mirror.known.clear()
        mirror(rt)  # best effort; a cut local log never replaces a longer copy
    for store in rt.stores:
        try:
            regions[store.name] = verify_mirror(rt, store.name)
        except StorageError as exc:
            unreachable[store.name] = str(exc) or exc.__class__.__name__
    return AuditCheck(checked_at, local, regions, unreachable, tuple(local_problems))
