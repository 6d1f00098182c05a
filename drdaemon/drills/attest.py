"""What a drill report shows: the drill records, and which of them the hash-chained
audit log attests (drills.jsonl is a convenience copy; the audit log is the evidence)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ..errors import DrError, UsageError
from ..runtime import Runtime
from .records import DrillRecord, load_records, records_path
from .report import ReportData


def audit_status(rt: Runtime, records: Sequence[DrillRecord]) -> dict[str, Any] | None:
    """The audit chain's verification for a report, and which of `records` it attests.

    drills.jsonl is a convenience copy that anyone with the state folder could
    edit; the `drill` records in the hash-chained audit log are the evidence.
    A drill whose outcome differs from its audit record (or has none before
    the chain's first bad record) is listed in `drills_unattested`.
    """
    from .. import audit

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
