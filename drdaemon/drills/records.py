"""Drill records: what each restore drill found, kept as JSON lines in the state folder.

Each drill is one `DrillRecord`: a JSON line in `<state_dir>/drills/drills.jsonl`
(schema in docs/format.md, "Drill records") and a `drill` record in the audit
log, the tamper-evident copy. This module only stores and reads the lines; the
drills themselves run in drills/run.py. Prune reads `newest_verified` to keep the
proof that a restore works; metrics and reports read `load_records`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import statefs
from ..units import parse_iso_time

log = logging.getLogger("drdaemon")

RECORDS = statefs.DRILL_RECORDS


@dataclass
class DrillRecord:
    """One drill, as stored (one JSON line) and as exported to metrics and reports.

    Times are ISO 8601 UTC; durations are seconds. A value that could not be
    measured (the restore failed before it) is None. `verified` means the copy
    restored and matched every fact and check; `ok` means verified and inside
    every target.
    """

    id: str
    source: str
    tenant: str
    tier: str
    region: str
    snapshot_id: str | None
    sha256: str | None
    started_at: str
    finished_at: str
    ok: bool
    reasons: list[str]
    rto_seconds: float | None
    rpo_seconds: float | None
    worst_gap_seconds: float | None
    throughput_bytes_per_second: float | None  # stored (encrypted) bytes / RTO
    stored_bytes: int | None
    plaintext_bytes: int | None
    rto_target_seconds: float
    rpo_target_seconds: float
    projected_tier_rto_seconds: float | None  # the whole tier, see slo.projected_tier_rto
    timings: dict[str, float]
    kind: str = ""
    verified: bool = False
    plaintext_throughput_bytes_per_second: float | None = None
    consistency_time: str | None = None
    newest_snapshot_id: str | None = None  # newest in any region, if not the one drilled
    scratch: str | None = None  # where it was restored (dropped/deleted afterwards)
    evidence: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    host: str = ""
    restore_model: dict[str, Any] | None = None  # the tier's model behind the projection

    @property
    def reason_codes(self) -> list[str]:
        return [r.split(":", 1)[0] for r in self.reasons]

    @property
    def started(self) -> datetime:
        return parse_iso_time(self.started_at)

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), reason_codes=self.reason_codes)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> DrillRecord:
        """A record from its JSON form; unknown keys (from newer versions) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})


def records_path(state_dir: Path) -> Path:
    return state_dir / RECORDS


def append_record(state_dir: Path, record: DrillRecord) -> None:
    """Append one JSON line under an exclusive lock, fsynced.

    The daemon and a person may drill at once: the lock keeps lines whole. A
    line torn by a crash is closed off so that the next one starts clean.
    """
    line = (json.dumps(record.to_dict(), sort_keys=True, default=str) + "\n").encode()
    with statefs.appending(state_dir, RECORDS) as fd:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        statefs.write_all(fd, line)


def load_records(state_dir: Path, since: datetime | None = None,
                 source: str | None = None) -> list[DrillRecord]:
    """Recorded drills, oldest first; only those begun at/after `since`, of `source`."""
    path = records_path(state_dir)
    try:
        raw = statefs.read_shared(state_dir, RECORDS)
    except FileNotFoundError:
        return []
    records = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = DrillRecord.from_dict(json.loads(line))
            started = record.started
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("%s line %d is not a drill record, skipped: %s", path, n, exc)
            continue
        if since is not None and started < since:
            continue
        if source is not None and record.source != source:
            continue
        records.append(record)
    records.sort(key=lambda r: (r.started, r.id))
    return records


def latest_restores(records: Iterable[DrillRecord], sources: Iterable[str]
                    ) -> dict[str, tuple[int, float]]:
    """Pure: by source, (stored bytes, RTO seconds) of the latest verified drill of each
    of `sources` that has one (the restore measurements recovery_plan.py models)."""
    wanted = set(sources)
    latest: dict[str, DrillRecord] = {}
    for r in records:
        if not (r.source in wanted and r.verified and r.rto_seconds and r.stored_bytes):
            continue
        if r.source not in latest or (r.started, r.id) >= (latest[r.source].started,
                                                              latest[r.source].id):
            latest[r.source] = r
    return {name: (int(r.stored_bytes or 0), float(r.rto_seconds or 0))
            for name, r in latest.items()}


def newest_verified(state_dir: Path) -> dict[str, str]:
    """Per source, the newest snapshot id a drill restored and verified (prune keeps it)."""
    newest: dict[str, str] = {}
    for r in load_records(state_dir):
        if r.verified and r.snapshot_id and r.snapshot_id > newest.get(r.source, ""):
            newest[r.source] = r.snapshot_id
    return newest
