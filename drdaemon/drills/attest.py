"""What a drill report shows: the drill records, which of them prove themselves (signed with
the signing key) and which the hash-chained audit log attests, and the evidence an auditor
matches them against (the log's head, the key's fingerprint, the newest anchor)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import anchors
from ..audit_chain import line_hash
from ..errors import DrError, UsageError
from ..runtime import Runtime
from .records import DrillRecord, load_checked, load_records, matches_audit, records_where
from .report import ReportData


def audit_status(rt: Runtime, records: Sequence[DrillRecord],
                 in_period: Callable[[dict[str, Any]], bool] = lambda _: False,
                 known: frozenset[str] = frozenset()) -> dict[str, Any] | None:
    """The audit chain's verification for a report, and which of `records` it attests.

    drills.jsonl is a convenience copy that anyone with the state folder could
    edit; the `drill` records in the hash-chained audit log are the evidence.
    A drill whose fields differ from its audit record's (or has none before
    the chain's first bad record) is listed in `drills_unattested`; each that
    has one gets its seq and line sha256 in `drill_records` (id -> {"seq", "hash"}).
    `drills_missing`: the `drill` audit records `in_period` (judged by the audit
    record's own fields) that neither `records` nor `known` holds: a drill removed
    from drills.jsonl, or whose time was edited out of the period.
    """
    from .. import audit

    try:
        result = audit.verify(rt)
        lines = audit.read_lines(rt.config.daemon.state_dir)
    except DrError as exc:
        return {"ok": False, "records": None, "first_bad": None, "reason": str(exc),
                "head": None, "drills_checked": len(records), "drill_records": {},
                "drills_unattested": [r.id for r in records], "drills_missing": []}
    good = lines if result.first_bad is None else lines[:result.first_bad]
    trusted: dict[Any, tuple[dict[str, Any], str]] = {}
    for doc, line in zip(audit.parse_records(good), good, strict=True):
        if doc.get("event") == "drill":
            trusted[doc.get("id")] = (doc, line_hash(line))
    found = {r.id: trusted[r.id] for r in records if r.id in trusted}
    shown = known | {r.id for r in records}
    missing = [{"id": i, "source": doc.get("source"), "started_at": doc.get("started_at"),
                "ok": doc.get("ok"), "seq": doc.get("seq")}
               for i, (doc, _) in trusted.items() if i not in shown and in_period(doc)]
    return {"ok": bool(result.ok), "records": result.records, "first_bad": result.first_bad,
            "reason": result.reason, "head": result.head, "drills_checked": len(records),
            "drill_records": {i: {"seq": doc.get("seq"), "hash": h}
                              for i, (doc, h) in found.items()},
            "drills_unattested": [r.id for r in records
                                  if not matches_audit(r, found.get(r.id, (None, ""))[0])],
            "drills_missing": missing}


def newest_anchor(state_dir: Path) -> dict[str, Any] | None:
    """The newest anchor of the audit log's head, as a report shows it ({"seq", "head",
    "time", "tsa_time", "where"}), or None if there is none."""
    a = anchors.newest(state_dir)
    if a is None:
        return None
    return {"seq": a.seq, "head": a.head, "time": a.time, "tsa_time": a.tsa_time,
            "where": list(a.where)}


def report_data(rt: Runtime, since: datetime | None, sources: Sequence[str] = (),
                drill_id: str | None = None) -> ReportData:
    """The drills (and audit chain verification) a report shows.

    With a signing key configured only records whose signature verifies are
    shown and counted; the others are listed in `rejected` (never a PASS).
    """
    state_dir = rt.config.daemon.state_dir
    names = {s.name for s in rt.config.pick_sources(sources)} if sources else set()

    def chosen(r: DrillRecord) -> bool:
        return (not names or r.source in names) and (drill_id is None or r.id == drill_id)

    def in_period(event: dict[str, Any]) -> bool:
        try:
            record = DrillRecord.from_dict(event)
            return chosen(record) and (since is None or record.started >= since)
        except (ValueError, TypeError, AttributeError):
            return False

    key = rt.signing_key
    rejected: list[dict[str, Any]] = []
    if key is None:
        records = [r for r in load_records(state_dir, since) if chosen(r)]
    else:
        checked = [c for c in load_checked(state_dir, key.public, since) if chosen(c.record)]
        records = [c.record for c in checked if c.status == "signed"]
        rejected = [{"id": c.record.id, "source": c.record.source,
                     "started_at": c.record.started_at, "status": c.status, "why": c.why}
                    for c in checked if c.status != "signed"]
    audit = audit_status(rt, records, in_period, frozenset(x["id"] for x in rejected))
    for x in (audit or {}).get("drills_missing", []):
        rejected.append(dict(x, status="missing", why=(
            f"{'a FAILED' if x.get('ok') is False else 'a'} drill recorded in the audit log "
            f"(record {x.get('seq')}) has no record in the period in drills.jsonl: removed, "
            "or its time edited")))
    if drill_id is not None and not records and not rejected:
        raise UsageError(f"no drill {drill_id!r} in {records_where(state_dir)}")
    return ReportData(rt.clock(), since, records, audit,
                      records_where(state_dir),
                      signing_key=key.fingerprint if key is not None else None,
                      rejected=rejected, anchor=newest_anchor(state_dir))


def sign_report(rt: Runtime, data: bytes) -> bytes | None:
    """The detached Ed25519 signature of a report's bytes (None: no signing key): what
    `openssl pkeyutl -verify -rawin` checks against the published public key."""
    key = rt.signing_key
    return key.sign(data) if key is not None else None
