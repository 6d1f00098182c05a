"""Drill records: what each restore drill found, kept as JSON lines in the state folder.

Each drill is one `DrillRecord`: a JSON line in `<state_dir>/drills/drills.jsonl`
(schema in docs/format.md, "Drill records"; with `[daemon] lock_dsn`, the same
lines in the cluster's shared state, shared_state.py, so prune's protection and
the report survive a failover) and a `drill` record in the audit
log, the tamper-evident copy. With a signing key configured each line carries
`sig`, an Ed25519 signature over the rest (audit_chain.seal), so that an auditor
holding only the public key can tell an edited line (`load_checked`). This
module only stores and reads the lines; the drills themselves run in
drills/run.py. Prune reads `newest_verified` to keep the proof that a restore
works; metrics read `load_records`, reports `load_checked`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import shared_state, statefs
from ..audit_chain import canonical, seal, signature_problem
from ..signing import PublicKey, SigningKey
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
    # Evidence an auditor matches against other records (docs/format.md, "Drill records"):
    user: str = ""  # who ran the drill (the daemon's user for scheduled drills)
    tool_version: str = ""  # drdaemon's version
    config_sha256: str | None = None  # of the config file's bytes when the drill ran
    manifest_key_id: str | None = None  # the key id and MAC of the manifest the drill read
    manifest_mac: str | None = None

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


def records_where(state_dir: Path) -> str:
    """Where the records live, for messages and reports: the file, or the cluster state."""
    return shared_state.describe(state_dir, RECORDS)


def signed_line(record: DrillRecord, signer: SigningKey | None) -> bytes:
    """The JSON line stored for `record`: with `sig` over the rest when a signing key is
    given (canonical form, so that the signed bytes are what a checker rebuilds)."""
    body = json.loads(json.dumps(record.to_dict(), default=str))
    if signer is None:
        return (json.dumps(body, sort_keys=True) + "\n").encode()
    return canonical(seal(body, signer)) + b"\n"


def append_record(state_dir: Path, record: DrillRecord,
                  signer: SigningKey | None = None) -> None:
    """Append one JSON line (signed by `signer`, if given) under the store's lock, durably.

    The daemon and a person may drill at once: the lock keeps lines whole. A
    line torn by a crash is closed off so that the next one starts clean.
    """
    line = signed_line(record, signer)
    shared_state.at(state_dir).append(RECORDS, lambda _last, _count: line)


def parsed_lines(state_dir: Path) -> Iterator[tuple[dict[str, Any], DrillRecord]]:
    """Each line that parses as a drill record: (its JSON object, the record)."""
    store = shared_state.at(state_dir)
    path = store.where + ": " + RECORDS
    raw = store.read_log(RECORDS)
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            record = DrillRecord.from_dict(doc)
            _ = record.started, record.to_dict()  # a start time; reasons a list
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("%s line %d is not a drill record, skipped: %s", path, n, exc)
            continue
        yield doc, record


def _wanted(record: DrillRecord, since: datetime | None, source: str | None) -> bool:
    return (since is None or record.started >= since) and \
        (source is None or record.source == source)


def load_records(state_dir: Path, since: datetime | None = None,
                 source: str | None = None) -> list[DrillRecord]:
    """Recorded drills, oldest first; only those begun at/after `since`, of `source`."""
    records = [r for _, r in parsed_lines(state_dir) if _wanted(r, since, source)]
    records.sort(key=lambda r: (r.started, r.id))
    return records


@dataclass(frozen=True)
class CheckedRecord:
    """A drill record and whether its line proves itself with the public key.

    `status`: "signed" (its `sig` verifies), "unsigned" (no `sig`) or "forged"
    (a `sig` that does not verify: edited after signing, or another key's);
    `why` says what is wrong for the latter two.
    """

    record: DrillRecord
    status: str
    why: str | None = None


def check_line(doc: dict[str, Any], public: PublicKey) -> tuple[str, str | None]:
    """(status, why) of one parsed drill record line against `public` (CheckedRecord)."""
    if "sig" not in doc:
        return "unsigned", "the record carries no signature"
    why = signature_problem(doc, public)
    return ("signed", None) if why is None else ("forged", why)


def load_checked(state_dir: Path, public: PublicKey, since: datetime | None = None
                 ) -> list[CheckedRecord]:
    """`load_records`, each with its signature checked against `public`, oldest first.

    A forged record is returned whatever its start time says: that time is not
    to be trusted either (moving a failed drill out of the period is an edit).
    """
    checked = (CheckedRecord(r, *check_line(doc, public)) for doc, r in parsed_lines(state_dir))
    out = [c for c in checked if c.status == "forged" or _wanted(c.record, since, None)]
    out.sort(key=lambda c: (c.record.started, c.record.id))
    return out


# A record of any version names at least these; newer fields are compared when the
# audit record has them too.
_ATTESTED = ("source", "snapshot_id", "sha256", "ok", "verified", "reasons", "rto_seconds",
             "rpo_seconds", "started_at")


def matches_audit(record: DrillRecord, event: dict[str, Any] | None) -> bool:
    """Pure: whether every field of `record` equals that of its `drill` audit record
    `event` (fields the log withheld as secret-looking aside)."""
    if event is None or any(k not in event for k in _ATTESTED):
        return False
    withheld = {re.split(r"[.\[]", str(p), maxsplit=1)[0] for p in event.get("withheld", [])}
    return all(event[k] == v for k, v in record.to_dict().items()
               if k in event and k not in withheld)


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
