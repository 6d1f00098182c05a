"""Drill reports for auditors: pure functions from drill records to HTML, Markdown or JSON.

The HTML page is self-contained: inline CSS (with a print stylesheet), inline
SVG charts built here as strings, no script, font or external resource (a
Content-Security-Policy forbids them). Every piece of text that comes from a
record or the config is escaped, because record fields (reasons, notes,
source names) can hold text from outside drdaemon (a server's error message).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from html import escape
from typing import TYPE_CHECKING, Any

from .units import format_bytes, format_duration, parse_iso_time

if TYPE_CHECKING:
    from .drill_records import DrillRecord

FORMATS = ("html", "md", "json")
PALETTE = ("#1f77b4", "#9467bd", "#2ca02c", "#ff7f0e", "#8c564b", "#17becf", "#e377c2")
FAIL_COLOUR = "#d62728"


@dataclass(frozen=True)
class ReportData:
    """Everything a report shows; built by drills.report_data, rendered here."""

    generated_at: datetime
    since: datetime | None
    records: Sequence[DrillRecord]
    # {"ok", "records", "first_bad", "reason"} of the audit chain; None: no audit log
    audit: dict[str, Any] | None
    records_path: str = ""


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


def summarize(records: Sequence[DrillRecord]) -> list[TierSummary]:
    """Per tier: drills run and passed, worst RTO/RPO against the (newest) targets."""
    out = []
    for tier in sorted({r.tier for r in records}):
        rs = sorted((r for r in records if r.tier == tier), key=lambda r: r.started_at)
        projected = [r.projected_tier_rto_seconds for r in rs
                     if r.projected_tier_rto_seconds is not None]
        out.append(TierSummary(
            tier=tier, sources=tuple(sorted({r.source for r in rs})), drills=len(rs),
            passed=sum(r.ok for r in rs), verified=sum(r.verified for r in rs),
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


def duration(seconds: float | None) -> str:
    """Seconds for people: sub-minute values keep a decimal (drills can be fast)."""
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds:.3f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    return format_duration(timedelta(seconds=seconds))


def rate(bps: float | None) -> str:
    return "—" if bps is None else f"{format_bytes(bps)}/s"


def size(n: int | None) -> str:
    return "—" if n is None else format_bytes(n)


def when(iso: str | None) -> str:
    if not iso:
        return "—"
    try:
        t = parse_iso_time(iso)
    except ValueError:
        return iso
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def against(value: float | None, target: float) -> str:
    mark = "" if value is None else (" ✔" if value <= target else " ✘ over")
    return f"{duration(value)} / {duration(target)}{mark}"


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


# -- JSON and Markdown --------------------------------------------------------------


def render_json(data: ReportData) -> str:
    doc = {
        "generated_at": data.generated_at.isoformat(),
        "since": data.since.isoformat() if data.since else None,
        "records_path": data.records_path,
        "audit": data.audit,
        "summary": [dict(asdict(s), ok=s.ok) for s in summarize(data.records)],
        "drills": [r.to_dict() for r in data.records],
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
             "", "## Summary per tier", "",
             "| tier | drills | passed | worst RTO / target | worst RPO / target | "
             "projected tier RTO | worst gap |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in summarize(data.records):
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
            r.sha256 or "—", "PASS" if r.ok else "FAIL",
            against(r.rto_seconds, r.rto_target_seconds),
            against(r.rpo_seconds, r.rpo_target_seconds), rate(r.throughput_bytes_per_second),
            timings_text(r), evidence_text(r), "; ".join(r.reasons) or "—")) + " |")
    return "\n".join(lines) + "\n"


# -- HTML ------------------------------------------------------------------------------

_CSS = """
:root { --ok: #1a7f37; --fail: #d62728; --warn: #9a6700; --line: #d0d7de; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328;
       margin: 2rem auto; max-width: 1200px; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
table { border-collapse: collapse; width: 100%; font-size: 12.5px; }
th, td { border: 1px solid var(--line); padding: 4px 6px; text-align: left; vertical-align: top; }
td.evidence, td.reasons { overflow-wrap: anywhere; min-width: 12em; }
th { background: #f6f8fa; }
code { font: 11.5px ui-monospace, monospace; overflow-wrap: anywhere; }
.ok { color: var(--ok); font-weight: 600; } .fail { color: var(--fail); font-weight: 600; }
.warn { color: var(--warn); font-weight: 600; }
.meta { color: #59636e; } figure { margin: 1rem 0; }
svg { max-width: 100%; height: auto; font: 11px system-ui, sans-serif; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 50%;
          margin: 0 4px 0 12px; }
ul.reasons { margin: 0; padding-left: 1.1rem; }
@media print {
  body { margin: 0; max-width: none; font-size: 10pt; }
  h2 { break-after: avoid; } figure, tr { break-inside: avoid; }
  table { font-size: 8pt; } code { font-size: 7.5pt; }
  a { color: inherit; text-decoration: none; }
}
"""


def render_html(data: ReportData) -> str:
    e = _e
    records = sorted(data.records, key=lambda r: (r.started_at, r.id))
    since = when(data.since.isoformat()) if data.since else "the first record"
    audit_class, audit_text = audit_line(data.audit)
    passed = sum(r.ok for r in records)
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>drdaemon restore drill report</title>", f"<style>{_CSS}</style>", "</head>",
        "<body>", "<header>", "<h1>Restore drill report</h1>",
        f'<p class="meta">Generated {e(when(data.generated_at.isoformat()))} by drdaemon. '
        f"Drills since {e(since)}: {len(records)} run, {passed} passed. Records: "
        f"<code>{e(data.records_path)}</code>.</p>", "</header>",
        '<section id="audit"><h2>Audit log</h2>',
        f'<p class="{audit_class}" id="audit-result">{e(audit_text)}</p></section>',
        '<section id="summary"><h2>Summary per tier</h2>', _summary_table(records),
        "</section>",
        '<section id="charts"><h2>Measured RTO and RPO per drill</h2>',
        _figure("rto", "Recovery time (RTO) measured by each drill, against the tier target",
                records),
        _figure("rpo", "Data age at the drill (RPO), against the tier target", records),
        "</section>",
        '<section id="drills"><h2>Every drill, with its evidence</h2>',
        _drills_table(records), "</section>",
        '<section id="definitions"><h2>Definitions</h2><ul>'
        "<li><b>RTO</b>: wall time from the start of the restore (manifest fetch) to a "
        "verified copy, read from the drill region; split into download, "
        "decrypt+decompress, restore and verify.</li>"
        "<li><b>RPO</b>: drill start minus the consistency time of the snapshot restored.</li>"
        "<li><b>Worst gap</b>: the largest gap between consecutive consistency times of the "
        "snapshots retained at the drill (retention thins older ones on purpose).</li>"
        "<li><b>Projected tier RTO</b>: every source of the tier restored one after another, "
        "each a fixed cost plus the stored bytes of its newest snapshot over a throughput, "
        "both fitted to the latest drill of every source of the tier; the tier's row shows "
        "the newest drill's projection.</li>"
        "<li><b>Verified</b>: sha256 of the stored object, then the restored copy against "
        "the authenticated manifest (row counts per table, or files, bytes and digest), "
        "and the configured SQL checks.</li></ul></section>",
        "</body>", "</html>"]
    return "\n".join(parts) + "\n"


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _summary_table(records: Sequence[DrillRecord]) -> str:
    rows = []
    for s in summarize(records):
        cls = "ok" if s.ok else "fail"
        rows.append(
            f'<tr class="tier-{_e(s.tier)}"><td>{_e(s.tier)}</td>'
            f"<td>{_e(', '.join(s.sources))}</td><td>{s.drills}</td>"
            f'<td class="{cls}">{s.passed}</td><td>{s.verified}</td>'
            f"<td>{_e(against(s.worst_rto, s.rto_target))}</td>"
            f"<td>{_e(against(s.worst_rpo, s.rpo_target))}</td>"
            f"<td>{_e(against(s.projected, s.rto_target))}</td>"
            f"<td>{_e(duration(s.worst_gap))}</td><td>{_e(when(s.last_drill))}</td></tr>")
    if not rows:
        rows.append('<tr><td colspan="10">No drill in this period.</td></tr>')
    return ('<table id="summary-table"><thead><tr><th>Tier</th><th>Sources</th><th>Drills</th>'
            "<th>Passed</th><th>Verified</th><th>Worst RTO / target</th>"
            "<th>Worst RPO / target</th><th>Projected tier RTO / target</th>"
            "<th>Worst gap</th><th>Last drill</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _drills_table(records: Sequence[DrillRecord]) -> str:
    rows = []
    for r in records:
        cls = "ok" if r.ok else "fail"
        reasons = "".join(f"<li>{_e(x)}</li>" for x in r.reasons)
        notes = "".join(f"<li>{_e(x)}</li>" for x in r.notes)
        rows.append(
            f'<tr id="drill-{_e(r.id)}"><td>{_e(when(r.started_at))}<br>'
            f'<code>{_e(r.id)}</code></td><td>{_e(r.source)}<br>'
            f'<span class="meta">{_e(r.tenant)} · {_e(r.kind)}</span></td><td>{_e(r.tier)}</td>'
            f"<td>{_e(r.region)}</td><td><code>{_e(r.snapshot_id or '—')}</code><br>"
            f'<span class="meta">consistent {_e(when(r.consistency_time))}</span><br>'
            f'sha256 <code class="sha256">{_e(r.sha256 or "—")}</code></td>'
            f'<td class="{cls}">{"PASS" if r.ok else "FAIL"}'
            f"{'' if r.ok or not r.verified else '<br>(copy verified)'}</td>"
            f"<td>{_e(against(r.rto_seconds, r.rto_target_seconds))}</td>"
            f"<td>{_e(against(r.rpo_seconds, r.rpo_target_seconds))}</td>"
            f"<td>{_e(size(r.stored_bytes))} stored<br>{_e(size(r.plaintext_bytes))} plain<br>"
            f"{_e(rate(r.throughput_bytes_per_second))}</td>"
            f'<td>{_e(timings_text(r))}</td><td class="evidence">{_e(evidence_text(r))}</td>'
            f'<td class="reasons"><ul class="reasons">{reasons or "<li>none</li>"}</ul>'
            + (f'<ul class="reasons meta">{notes}</ul>' if notes else "") + "</td></tr>")
    if not rows:
        rows.append('<tr><td colspan="12">No drill in this period.</td></tr>')
    return ('<table id="drills-table"><thead><tr><th>Started</th><th>Source</th><th>Tier</th>'
            "<th>Region</th><th>Snapshot (sha256 of the stored object)</th><th>Result</th>"
            "<th>RTO / target</th><th>RPO / target</th><th>Bytes, rate</th><th>Timings</th>"
            "<th>Evidence</th><th>Failure reasons</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


# -- SVG charts ---------------------------------------------------------------------------

_W, _H = 900, 300
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 150, 16, 44
_TICKS = (0.001, 0.01, 0.1, 1, 10, 60, 600, 3600, 6 * 3600, 86400, 2 * 86400, 7 * 86400, 30 * 86400,
          365 * 86400)


def _figure(metric: str, caption: str, records: Sequence[DrillRecord]) -> str:
    tiers = sorted({r.tier for r in records})
    colours = {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(tiers)}
    legend = "".join(f'<span class="swatch" style="background:{colours[t]}"></span>{_e(t)}'
                     for t in tiers)
    return (f'<figure id="chart-{metric}">{svg_chart(metric, records, colours)}'
            f"<figcaption>{_e(caption)}. Tiers:{legend}; dashed lines: targets; a red ring: "
            "failed drill; a red triangle on the axis: not measured (no verified copy)."
            "</figcaption></figure>")


def svg_chart(metric: str, records: Sequence[DrillRecord], colours: dict[str, str]) -> str:
    """Measured `metric` ("rto" or "rpo") per drill over time, log scale, with target lines."""
    title = "RTO" if metric == "rto" else "RPO"

    def value(r: DrillRecord) -> float | None:
        return r.rto_seconds if metric == "rto" else r.rpo_seconds

    def target(r: DrillRecord) -> float:
        return r.rto_target_seconds if metric == "rto" else r.rpo_target_seconds

    head = (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {_H}" width="{_W}" '
            f'height="{_H}" role="img" aria-labelledby="svg-{metric}-title" class="chart">'
            f'<title id="svg-{metric}-title">{title} per drill over time</title>')
    if not records:
        return (head + f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle">No drill in '
                "this period</text></svg>")
    times = [_time(r.started_at) for r in records]
    t0, t1 = min(times), max(times)
    if t1 - t0 < 3600:
        t0, t1 = t0 - 1800, t1 + 1800
    values = [v for r in records if (v := value(r)) is not None and v > 0]
    values += [target(r) for r in records if target(r) > 0]
    lo = max(min(values, default=1.0) / 2, 0.001)
    hi = max(max(values, default=10.0) * 2, lo * 10)
    pw, ph = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def x(t: float) -> float:
        return _LEFT + (t - t0) / (t1 - t0) * pw

    def y(v: float) -> float:
        v = max(v, lo)
        return _TOP + ph - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * ph

    out = [head, f'<rect x="{_LEFT}" y="{_TOP}" width="{pw}" height="{ph}" fill="#fff" '
                 'stroke="#d0d7de"/>']
    for tick in (t for t in _TICKS if lo <= t <= hi):
        ty = y(tick)
        out.append(f'<line x1="{_LEFT}" x2="{_LEFT + pw}" y1="{ty:.1f}" y2="{ty:.1f}" '
                   f'stroke="#eaeef2"/><text x="{_LEFT - 6}" y="{ty + 4:.1f}" '
                   f'text-anchor="end">{_e(_short(tick))}</text>')
    span = t1 - t0
    for i in range(5):
        tx = t0 + span * i / 4
        label = datetime.fromtimestamp(tx, UTC).strftime(
            "%Y-%m-%d" if span > 2 * 86400 else "%m-%d %H:%M")
        out.append(f'<text x="{x(tx):.1f}" y="{_TOP + ph + 16}" text-anchor="middle">'
                   f"{_e(label)}</text>")
    out.append(f'<text x="{_LEFT + pw / 2}" y="{_H - 6}" text-anchor="middle">drill start '
               f'(UTC)</text><text x="14" y="{_TOP + ph / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {_TOP + ph / 2})">{title} (log scale)</text>')
    labels: list[float] = []  # y of each target label, so that equal targets stay legible
    for tier in sorted({r.tier for r in records}):
        out.append(_target_line(tier, [(x(t), y(target(r))) for r, t in zip(records, times,
                                strict=True) if r.tier == tier], colours[tier],
                                duration(target([r for r in records if r.tier == tier][-1])),
                                labels))
    for r, t in zip(records, times, strict=True):
        v = value(r)
        tip = (f"{r.source} ({r.tier}) {when(r.started_at)}: {title} {duration(v)}, target "
               f"{duration(target(r))}, {'PASS' if r.ok else 'FAIL'}"
               + (f" — {'; '.join(r.reasons)}" if r.reasons else ""))
        colour = colours[r.tier]
        if v is None:
            px, py = x(t), _TOP + ph
            out.append(f'<path class="drill-point missing" d="M{px - 6:.1f},{py:.1f} '
                       f'L{px + 6:.1f},{py:.1f} L{px:.1f},{py - 10:.1f} Z" fill="{FAIL_COLOUR}">'
                       f"<title>{_e(tip)}</title></path>")
            continue
        stroke = (f'stroke="{FAIL_COLOUR}" stroke-width="3"' if not r.ok
                  else 'stroke="#fff" stroke-width="1"')
        out.append(f'<circle class="drill-point {"pass" if r.ok else "fail"}" cx="{x(t):.1f}" '
                   f'cy="{y(v):.1f}" r="5" fill="{colour}" {stroke}><title>{_e(tip)}</title>'
                   "</circle>")
    out.append("</svg>")
    return "".join(out)


def _target_line(tier: str, points: list[tuple[float, float]], colour: str, label: str,
                 used: list[float]) -> str:
    """A stepped dashed line through each drill's target (targets may change over time)."""
    steps = [(float(_LEFT), points[0][1])]
    for px, py in points:
        steps += [(px, steps[-1][1]), (px, py)]
    steps.append((float(_W - _RIGHT), points[-1][1]))
    path = " ".join(f"{px:.1f},{py:.1f}" for px, py in steps)
    end_y = points[-1][1]
    while any(abs(end_y - u) < 12 for u in used):
        end_y += 12
    used.append(end_y)
    return (f'<polyline class="target" points="{path}" fill="none" stroke="{colour}" '
            f'stroke-width="1.5" stroke-dasharray="6 4"/><text x="{_W - _RIGHT + 6}" '
            f'y="{end_y + 4:.1f}" fill="{colour}">{_e(tier)} target {_e(label)}</text>')


def _short(seconds: float) -> str:
    """An axis label: 0.1s, 1s, 10m, 6h, 2d."""
    if seconds < 1:
        return f"{seconds:g}s"
    return format_duration(timedelta(seconds=seconds)).replace(" ", "")


def _time(iso: str) -> float:
    return parse_iso_time(iso).timestamp()
