"""Drill reports for auditors: pure functions from drill records to HTML, Markdown or JSON.

The HTML page is self-contained: inline CSS (with a print stylesheet), inline
SVG charts, no script, font or external resource (a Content-Security-Policy
forbids them). It is rendered from templates/report.html.j2 with Jinja2's
autoescape, because record fields (reasons, notes, source names) can hold text
from outside drdaemon (a server's error message): nothing is escaped by hand.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ..pages import render_template
from ..units import (
    against,
    duration,
    format_duration,
    parse_iso_time,
    rate,
    size,
    when,
)

if TYPE_CHECKING:
    from .records import DrillRecord

FORMATS = ("html", "md", "json")
PALETTE = ("#1f77b4", "#9467bd", "#2ca02c", "#ff7f0e", "#8c564b", "#17becf", "#e377c2")
FAIL_COLOUR = "#d62728"


@dataclass(frozen=True)
class ReportData:
    """Everything a report shows; built by drills.report_data, rendered here."""

    generated_at: datetime
    since: datetime | None
    records: Sequence[DrillRecord]
    # {"ok", "records", "first_bad", "reason", "head", "drill_records", "drills_unattested"}
    # of the audit chain (drills.attest.audit_status); None: no audit log
    audit: dict[str, Any] | None
    records_path: str = ""
    signing_key: str | None = None  # fingerprint of the key the records are checked with
    # records left out because their signature is missing or wrong: id, source,
    # started_at, status ("unsigned" / "forged"), why
    rejected: Sequence[dict[str, Any]] = ()
    anchor: dict[str, Any] | None = None  # the newest anchor of the log (attest.newest_anchor)

    @property
    def untrusted(self) -> frozenset[str]:
        """Ids of shown drills the audit log does not attest: never a PASS."""
        return frozenset((self.audit or {}).get("drills_unattested") or ())

    def result(self, r: DrillRecord) -> str:
        """PASS, FAIL, or UNATTESTED (a passed drill its audit record does not back)."""
        if not r.ok:
            return "FAIL"
        return "UNATTESTED" if r.id in self.untrusted else "PASS"

    def audit_record(self, r: DrillRecord) -> dict[str, Any]:
        """{"seq", "hash"} of the drill's `drill` audit record ({} if none attests it)."""
        found = (self.audit or {}).get("drill_records") or {}
        return dict(found.get(r.id) or {})


@dataclass(frozen=True)
class TierSummary:
    tier: str
    sources: tuple[str, ...]
    drills: int
    passed: int
    verified: int
    worst_rto: float | None
    rto_target: float
    worst_rpo: float | None
    rpo_target: float
    projected: float | None  # of the newest drill that measured one
    worst_gap: float | None
    last_drill: str

    @property
    def ok(self) -> bool:
        return self.drills > 0 and self.passed == self.drills


def summarize(records: Sequence[DrillRecord],
              untrusted: Collection[str] = ()) -> list[TierSummary]:
    """Per tier: drills run and passed, worst RTO/RPO against the (newest) targets.

    A drill in `untrusted` (not attested by the audit log) never counts as passed.
    """
    out = []
    for tier in sorted({r.tier for r in records}):
        rs = sorted((r for r in records if r.tier == tier), key=lambda r: r.started_at)
        projected = [r.projected_tier_rto_seconds for r in rs
                     if r.projected_tier_rto_seconds is not None]
        out.append(TierSummary(
            tier=tier, sources=tuple(sorted({r.source for r in rs})), drills=len(rs),
            passed=sum(r.ok and r.id not in untrusted for r in rs),
            verified=sum(r.verified for r in rs),
            worst_rto=_max(r.rto_seconds for r in rs), rto_target=rs[-1].rto_target_seconds,
            worst_rpo=_max(r.rpo_seconds for r in rs), rpo_target=rs[-1].rpo_target_seconds,
            projected=projected[-1] if projected else None,
            worst_gap=_max(r.worst_gap_seconds for r in rs), last_drill=rs[-1].started_at))
    return out


def _max(values: Any) -> float | None:
    found = [v for v in values if v is not None]
    return max(found) if found else None


def render(data: ReportData, fmt: str) -> str:
    """The report in `fmt`: "html", "md" or "json"."""
    renderers: dict[str, Callable[[ReportData], str]] = {
        "html": render_html, "md": render_markdown, "json": render_json}
    return renderers[fmt](data)


# -- text helpers ------------------------------------------------------------------


def audit_line(audit: dict[str, Any] | None) -> tuple[str, str]:
    """(css class, sentence) for the audit chain verification."""
    if audit is None:
        return ("warn", "No audit log in this drdaemon build: the records were not checked "
                        "against a tamper-evident chain.")
    unattested = audit.get("drills_unattested") or []
    drills = ""
    if "drills_checked" in audit:
        drills = (f" {audit['drills_checked'] - len(unattested)} of {audit['drills_checked']} "
                  "drill record(s) match their audit record")
        drills += (f"; NOT attested (edited, or missing from the log): {', '.join(unattested)}."
                   if unattested else ".")
    if audit.get("ok"):
        return ("fail" if unattested else "ok",
                f"Audit chain verified: {audit.get('records')} record(s), every link intact."
                + drills)
    at = audit.get("first_bad")
    return ("fail", "Audit chain BROKEN" + (f" at record {at}" if at is not None else "")
            + f": {audit.get('reason') or 'no reason given'}. Records after that point "
              "cannot be trusted." + drills)


def evidence_text(r: DrillRecord) -> str:
    e = r.evidence or {}
    parts = []
    if "tables" in e:
        parts.append(f"{e['tables']} tables, {e.get('rows', '?')} rows counted")
    if "files" in e:
        parts.append(f"{_count(e['files'], 'file')}, "
                     f"{_count(e.get('directories', '?'), 'folder')}, "
                     f"{_count(e.get('symlinks', '?'), 'link')}, {size(e.get('bytes'))}, "
                     f"digest {e.get('digest', '?')}")
    owners = e.get("owners")
    if isinstance(owners, dict):
        with_owners = owners.get("mode") == "owners"
        parts.append("restored with owners" if with_owners else
                     "restored without owners (--no-owner)")
    for c in e.get("checks", []):
        parts.append(f"check {c.get('sql')!r} = {c.get('value')} (min {c.get('min')}): "
                     + ("ok" if c.get("ok") else "FAILED"))
    return "; ".join(parts) or "—"


def _count(n: object, noun: str) -> str:
    """"1 link", "2 links", "? links"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def timings_text(r: DrillRecord) -> str:
    t = r.timings or {}
    names = (("download", "download"), ("decrypt_decompress", "decrypt+decompress"),
             ("restore", "restore"), ("verify", "verify"))
    shown = [f"{label} {duration(t[k])}" for k, label in names if k in t]
    return ", ".join(shown) or "—"


def evidence_lines(data: ReportData) -> list[str]:
    """What an auditor matches this report against: the log's head, the signing key,
    the newest anchor, and every record left out for a missing or wrong signature."""
    head = (data.audit or {}).get("head")
    out = [f"Audit log head (sha256 of the last record that verified): {head or 'none'}."]
    out.append(f"Drill records are checked with signing key {data.signing_key}; only records "
               "whose signature verifies are shown and counted." if data.signing_key else
               "Drill records are NOT signed: set [keys] signing_key_file so that they and "
               "this report can be checked with a public key.")
    a = data.anchor
    out.append(f"Newest anchor: record {a.get('seq')} (head {a.get('head')}) at {a.get('time')}"
               + (f", time-stamped {a['tsa_time']}" if a.get("tsa_time") else "")
               + (f", kept in {', '.join(a.get('where') or [])}" if a.get("where") else "")
               + "." if a else "Newest anchor: none (the log's head is anchored nowhere).")
    for x in data.rejected:
        out.append(f"{str(x.get('status')).upper()} drill record {x.get('id')} "
                   f"({x.get('source')}, {x.get('started_at')}): {x.get('why')}; "
                   "not evidence, not counted.")
    return out


def drill_evidence(data: ReportData, r: DrillRecord) -> dict[str, str]:
    """One drill's evidence row: its audit record, who ran it where, what it read, how."""
    found = data.audit_record(r)
    mac = f"{r.manifest_key_id}:{r.manifest_mac}" if r.manifest_mac else "—"
    return {"id": r.id, "audit_seq": str(found.get("seq", "—")),
            "audit_hash": str(found.get("hash", "—")), "user": r.user or "—",
            "host": r.host or "—", "manifest_mac": mac, "version": r.tool_version or "—",
            "config": r.config_sha256 or "—"}


_EVIDENCE_COLUMNS = ("id", "audit_seq", "audit_hash", "user", "host", "manifest_mac", "version",
                     "config")


# -- JSON and Markdown --------------------------------------------------------------


def render_json(data: ReportData) -> str:
    doc = {
        "generated_at": data.generated_at.isoformat(),
        "since": data.since.isoformat() if data.since else None,
        "records_path": data.records_path,
        "audit": data.audit,
        "signing_key": data.signing_key,
        "anchor": data.anchor,
        "rejected": list(data.rejected),
        "summary": [dict(asdict(s), ok=s.ok)
                    for s in summarize(data.records, data.untrusted)],
        "drills": [dict(r.to_dict(), result=data.result(r), audit_record=data.audit_record(r))
                   for r in data.records],
    }
    return json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n"


_MD_ESCAPES = str.maketrans({c: "\\" + c for c in "\\<>&|"} | {"\n": " ", "\r": " "})


def _md(text: object) -> str:
    """A Markdown table cell: no pipes, newlines or HTML from the data.

    Backslash escapes, not HTML entities: the file is read as plain text at
    least as often as it is rendered, and `&#x27;` helps neither reader.
    """
    return str(text).translate(_MD_ESCAPES)


def render_markdown(data: ReportData) -> str:
    lines = ["# Restore drill report", "",
             f"Generated {when(data.generated_at.isoformat())}; drills since "
             f"{when(data.since.isoformat()) if data.since else 'the first record'}: "
             f"{len(data.records)}.", "", "## Audit log", "", _md(audit_line(data.audit)[1]),
             "", *[f"- {_md(x)}" for x in evidence_lines(data)],
             "", "## Summary per tier", "",
             "| tier | drills | passed | worst RTO / target | worst RPO / target | "
             "projected tier RTO | worst gap |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in summarize(data.records, data.untrusted):
        lines.append(f"| {_md(s.tier)} | {s.drills} | {s.passed} | "
                     f"{_md(against(s.worst_rto, s.rto_target))} | "
                     f"{_md(against(s.worst_rpo, s.rpo_target))} | "
                     f"{_md(against(s.projected, s.rto_target))} | {duration(s.worst_gap)} |")
    lines += ["", "## Every drill", "",
              "| started | source | tier | region | snapshot | sha256 | result | RTO / target | "
              "RPO / target | throughput | timings | evidence | reasons |",
              "| --- " * 13 + "|"]
    for r in data.records:
        lines.append("| " + " | ".join(_md(c) for c in (
            when(r.started_at), r.source, r.tier, r.region, r.snapshot_id or "—",
            r.sha256 or "—", data.result(r),
            against(r.rto_seconds, r.rto_target_seconds),
            against(r.rpo_seconds, r.rpo_target_seconds), rate(r.throughput_bytes_per_second),
            timings_text(r), evidence_text(r), "; ".join(r.reasons) or "—")) + " |")
    lines += ["", "## Evidence per drill", "",
              "| drill | audit seq | audit record sha256 | user | host | manifest key id:MAC | "
              "drdaemon | config sha256 |", "| --- " * 8 + "|"]
    for r in data.records:
        row = drill_evidence(data, r)
        lines.append(f"| `{_md(row['id'])}` | "
                     + " | ".join(_md(row[c]) for c in _EVIDENCE_COLUMNS[1:]) + " |")
    return "\n".join(lines) + "\n"


# -- HTML ------------------------------------------------------------------------------
# templates/report.html.j2, rendered with autoescape: a value from a record can
# never become markup, whatever the code below forgets.



def render_html(data: ReportData) -> str:
    records = sorted(data.records, key=lambda r: (r.started_at, r.id))
    audit_class, audit_text = audit_line(data.audit)
    tiers = sorted({r.tier for r in records})
    colours = {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(tiers)}
    html = render_template("report.html.j2",
        generated=when(data.generated_at.isoformat()),
        since=when(data.since.isoformat()) if data.since else "the first record",
        passed=sum(data.result(r) == "PASS" for r in records), records_path=data.records_path,
        audit_class=audit_class, audit_text=audit_text, evidence=evidence_lines(data),
        evidence_class="fail" if data.rejected else "ok" if data.signing_key else "warn",
        tiers=[_tier_row(s) for s in summarize(records, data.untrusted)],
        drills=[_drill_row(data, r) for r in records], fail_colour=FAIL_COLOUR,
        drill_evidence=[drill_evidence(data, r) for r in records],
        charts=[chart("rto", "Recovery time (RTO) measured by each drill, against the tier "
                      "target", records, colours, data.untrusted),
                chart("rpo", "Data age at the drill (RPO), against the tier target", records,
                      colours, data.untrusted)])
    return str(html)


def _tier_row(s: TierSummary) -> dict[str, object]:
    return {"tier": s.tier, "sources": ", ".join(s.sources), "drills": s.drills,
            "class": "ok" if s.ok else "fail", "passed": s.passed, "verified": s.verified,
            "rto": against(s.worst_rto, s.rto_target), "rpo": against(s.worst_rpo, s.rpo_target),
            "projected": against(s.projected, s.rto_target), "gap": duration(s.worst_gap),
            "last": when(s.last_drill)}


def _drill_row(data: ReportData, r: DrillRecord) -> dict[str, object]:
    return {"id": r.id, "result": data.result(r), "started": when(r.started_at),
            "source": r.source, "tenant": r.tenant, "kind": r.kind,
            "tier": r.tier, "region": r.region,
            "snapshot": r.snapshot_id or "—", "consistent": when(r.consistency_time),
            "sha256": r.sha256 or "—", "ok": r.ok, "verified": r.verified,
            "rto": against(r.rto_seconds, r.rto_target_seconds),
            "rpo": against(r.rpo_seconds, r.rpo_target_seconds),
            "stored": size(r.stored_bytes), "plain": size(r.plaintext_bytes),
            "rate": rate(r.throughput_bytes_per_second), "timings": timings_text(r),
            "evidence": evidence_text(r), "reasons": list(r.reasons), "notes": list(r.notes)}


# -- SVG charts: the geometry here, the markup in the template ----------------------------

_W, _H = 900, 300
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 150, 16, 44
_TICKS = (0.001, 0.01, 0.1, 1, 10, 60, 600, 3600, 6 * 3600, 86400, 2 * 86400, 7 * 86400, 30 * 86400,
          365 * 86400)


def chart(metric: str, caption: str, records: Sequence[DrillRecord],
          colours: dict[str, str], untrusted: Collection[str] = ()) -> dict[str, Any]:
    """Measured `metric` ("rto" or "rpo") per drill over time, log scale, with target lines:
    every coordinate and label the template draws (a drill in `untrusted` is not a pass)."""
    title = "RTO" if metric == "rto" else "RPO"

    def value(r: DrillRecord) -> float | None:
        return r.rto_seconds if metric == "rto" else r.rpo_seconds

    def target(r: DrillRecord) -> float:
        return r.rto_target_seconds if metric == "rto" else r.rpo_target_seconds

    pw, ph = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    out: dict[str, Any] = {
        "metric": metric, "title": title, "caption": caption, "width": _W, "height": _H,
        "left": _LEFT, "right": _RIGHT, "top": _TOP, "plot_width": pw, "plot_height": ph,
        "legend": sorted(colours.items()), "ticks": [], "times": [], "targets": [],
        "marks": []}
    if not records:
        return out
    times = [_time(r.started_at) for r in records]
    t0, t1 = min(times), max(times)
    if t1 - t0 < 3600:
        t0, t1 = t0 - 1800, t1 + 1800
    values = [v for r in records if (v := value(r)) is not None and v > 0]
    values += [target(r) for r in records if target(r) > 0]
    lo = max(min(values, default=1.0) / 2, 0.001)
    hi = max(max(values, default=10.0) * 2, lo * 10)

    def x(t: float) -> float:
        return _LEFT + (t - t0) / (t1 - t0) * pw

    def y(v: float) -> float:
        v = max(v, lo)
        return _TOP + ph - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * ph

    out["ticks"] = [{"y": y(t), "label": _short(t)} for t in _TICKS if lo <= t <= hi]
    span = t1 - t0
    fmt = "%Y-%m-%d" if span > 2 * 86400 else "%m-%d %H:%M"
    out["times"] = [{"x": x(t0 + span * i / 4),
                     "label": datetime.fromtimestamp(t0 + span * i / 4, UTC).strftime(fmt)}
                    for i in range(5)]
    labels: list[float] = []  # y of each target label, so that equal targets stay legible
    for tier in sorted({r.tier for r in records}):
        mine = [(r, t) for r, t in zip(records, times, strict=True) if r.tier == tier]
        out["targets"].append(_target_line(tier, [(x(t), y(target(r))) for r, t in mine],
                                           colours[tier], duration(target(mine[-1][0])), labels))
    for r, t in zip(records, times, strict=True):
        v = value(r)
        tip = (f"{r.source} ({r.tier}) {when(r.started_at)}: {title} {duration(v)}, target "
               f"{duration(target(r))}, "
               f"{'FAIL' if not r.ok else 'UNATTESTED' if r.id in untrusted else 'PASS'}"
               + (f" — {'; '.join(r.reasons)}" if r.reasons else ""))
        out["marks"].append({"missing": v is None, "x": x(t),
                             "y": _TOP + ph if v is None else y(v),
                             "ok": r.ok and r.id not in untrusted,
                             "colour": colours[r.tier], "tip": tip})
    return out


def _target_line(tier: str, points: list[tuple[float, float]], colour: str, label: str,
                 used: list[float]) -> dict[str, Any]:
    """A stepped dashed line through each drill's target (targets may change over time)."""
    steps = [(float(_LEFT), points[0][1])]
    for px, py in points:
        steps += [(px, steps[-1][1]), (px, py)]
    steps.append((float(_W - _RIGHT), points[-1][1]))
    end_y = points[-1][1]
    while any(abs(end_y - u) < 12 for u in used):
        end_y += 12
    used.append(end_y)
    return {"tier": tier, "colour": colour, "label": label, "label_y": end_y,
            "points": " ".join(f"{px:.1f},{py:.1f}" for px, py in steps)}


def _short(seconds: float) -> str:
    """An axis label: 0.1s, 1s, 10m, 6h, 2d."""
    if seconds < 1:
        return f"{seconds:g}s"
    return format_duration(timedelta(seconds=seconds)).replace(" ", "")


def _time(iso: str) -> float:
    return parse_iso_time(iso).timestamp()
