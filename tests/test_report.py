"""Drill reports: rendered from fixture records (pure), then loaded by a real headless Chromium."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from drdaemon.drills.records import DrillRecord
from drdaemon.drills.report import ReportData, render, render_html, summarize

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
HOSTILE = "<script>alert('x')</script> & \"quotes\" | pipes"


def record(n: int, *, tier: str = "paid", ok: bool = True, rto: float | None = 42.0,
           rpo: float | None = 4 * 3600.0, reasons: list[str] | None = None,
           source: str = "lms-db", **kw: Any) -> DrillRecord:
    started = NOW - timedelta(days=7 * (10 - n))
    return DrillRecord(
        id=f"{started:%Y%m%dT%H%M%SZ}-0000000{n % 10}", source=source, tenant="uni-a",
        tier=tier, region="us-virginia", snapshot_id=f"{started:%Y%m%dT}020000Z-abcdef0{n % 10}",
        sha256=f"{n:064x}", started_at=started.isoformat(),
        finished_at=(started + timedelta(seconds=rto or 5)).isoformat(), ok=ok,
        reasons=reasons or [], rto_seconds=rto, rpo_seconds=rpo,
        worst_gap_seconds=86400.0 + 300, throughput_bytes_per_second=5e6 if rto else None,
        stored_bytes=210_000_000, plaintext_bytes=900_000_000,
        rto_target_seconds=86400.0 if tier == "paid" else 172800.0,
        rpo_target_seconds=86400.0, projected_tier_rto_seconds=120.0 if rto else None,
        timings={"download": 10.0, "decrypt_decompress": 8.0, "restore": 20.0,
                 "verify": 4.0} if rto else {"download": 1.0},
        kind="postgres", verified=rto is not None,
        evidence={"tables": 5, "rows": 12345,
                  "checks": [{"sql": "SELECT count(*) FROM users", "min": 1, "value": 200,
                              "ok": True}]}, **kw)


def records() -> list[DrillRecord]:
    return [
        record(1), record(2, rto=90.0), record(3, tier="free", source="cc-files"),
        record(4, ok=False, rto=None, reasons=["corrupt: snapshot X in region us-virginia "
                                                 "does not match its manifest's sha256"]),
        record(5, ok=False, rto=100_000.0, reasons=["rto-over-target: restore took 1d 3h",
                                                    HOSTILE], notes=[HOSTILE]),
        record(6, tier="free", source=HOSTILE),
    ]


AUDIT_OK = {"ok": True, "records": 17, "first_bad": None, "reason": None,
            "drills_checked": 6, "drills_unattested": []}


class Tags(HTMLParser):
    """Every start tag with its attributes, and the text, of an HTML document."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def count(self, tag: str, **attrs: str) -> int:
        return sum(t == tag and all(a.get(k) == v for k, v in attrs.items())
                   for t, a in self.tags)

    def ids(self) -> set[str]:
        return {a["id"] or "" for _, a in self.tags if "id" in a}


def parse(html: str) -> Tags:
    tags = Tags()
    tags.feed(html)
    tags.close()
    return tags


def test_summary_per_tier() -> None:
    by_tier = {s.tier: s for s in summarize(records())}
    paid, free = by_tier["paid"], by_tier["free"]
    assert (paid.drills, paid.passed, paid.verified) == (4, 2, 3)
    assert paid.worst_rto == 100_000.0 and paid.rto_target == 86400.0 and not paid.ok
    assert paid.projected == 120.0  # the newest projection
    assert (free.drills, free.passed, free.rto_target) == (2, 2, 172800.0) and free.ok


def test_html_structure_and_escaping() -> None:
    html = render_html(ReportData(NOW, NOW - timedelta(days=90), records(), AUDIT_OK,
                                  "/var/lib/drdaemon/drills/drills.jsonl"))
    doc = parse(html)
    assert html.startswith("<!DOCTYPE html>")
    assert {"audit", "summary", "charts", "drills", "summary-table", "drills-table",
            "chart-rto", "chart-rpo", "audit-result", "evidence-table"} <= doc.ids()
    assert doc.count("svg") == 2
    assert doc.count("table") == 3
    assert doc.count("tr") == 1 + 2 + 1 + 6 + 1 + 6  # headers, tiers, drills, evidence
    # One mark per drill in each chart; the unmeasured RTO is a triangle on the axis.
    assert doc.count("circle") == 6 + 5 and doc.count("path") == 1
    assert doc.count("polyline") == 2 * 2  # a target line per tier and chart
    # Self-contained: no script, no stylesheet or image link, nothing fetched.
    assert doc.count("script") == 0 and doc.count("link") == 0 and doc.count("img") == 0
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in html and "@import" not in html and "url(" not in html
    assert "@media print" in html
    # Hostile text from records is shown, as text.
    assert "<script>" not in html and "&lt;script&gt;alert(&#39;x&#39;)" in html  # Jinja2's escape
    assert HOSTILE in "".join(doc.text)
    text = " ".join(doc.text)
    assert "Audit chain verified: 17 record(s)" in text and "6 of 6 drill record(s)" in text
    assert "rto-over-target" in text and "corrupt:" in text
    assert f"{5:064x}" in text  # the evidence: sha256 of each drill's object


def test_audit_states_are_shown() -> None:
    broken = {"ok": False, "records": 9, "first_bad": 4, "reason": "mac mismatch"}
    html = render_html(ReportData(NOW, None, records(), broken))
    assert "Audit chain BROKEN at record 4: mac mismatch" in html
    assert 'class="fail" id="audit-result"' in html
    edited = dict(AUDIT_OK, drills_unattested=["20261012T120000Z-00000004"])
    html = render_html(ReportData(NOW, None, records(), edited))
    assert "5 of 6 drill record(s) match" in html and "20261012T120000Z-00000004" in html
    assert 'class="fail" id="audit-result"' in html
    html = render_html(ReportData(NOW, None, [], None))
    assert "No audit log" in html and "No drill in this period" in html
    assert parse(html).count("svg") == 2


def test_markdown_and_json() -> None:
    tree = dataclasses.replace(record(7, tier="free", source="cc-files"), kind="directory",
                               evidence={"files": 1, "directories": 2, "symlinks": 1,
                                         "bytes": 10, "digest": "ab"})
    data = ReportData(NOW, NOW - timedelta(days=90), [*records(), tree], AUDIT_OK)
    md = render(data, "md")
    assert "| paid | 4 | 2 |" in md
    assert "<script>" not in md and "\\|" in md  # pipes in data cannot break the table
    # Plain-text readable: no HTML entities; and counts agree with their nouns.
    assert "&#x27;" not in md and "&quot;" not in md and "'x'" in md
    assert "1 link," in md and "1 links" not in md
    assert len([line for line in md.splitlines() if line.startswith("| 2026")]) == 7
    assert "1 file, 2 folders, 1 link," in md
    doc = json.loads(render(data, "json"))
    assert doc["audit"] == AUDIT_OK and len(doc["drills"]) == 7
    assert {s["tier"] for s in doc["summary"]} == {"paid", "free"}
    assert doc["drills"][3]["reason_codes"] == ["corrupt"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed and could not be: scripts/test installs it "
                    "(apt-get install chromium)")
    return path


def test_chromium_renders_the_report(tmp_path: Path) -> None:
    """A real browser loads the page offline: DOM has the charts and tables, no console error."""
    browser = chromium()
    page = tmp_path / "report.html"
    page.write_text(render_html(ReportData(NOW, NOW - timedelta(days=90), records(),
                                           AUDIT_OK)), encoding="utf-8")
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu",
              "--disable-background-networking", "--no-first-run",
              f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
              "--window-size=1280,2000"]
    dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=60, check=True)
    shot = subprocess.run([*common, f"--screenshot={tmp_path / 'r.png'}", page.as_uri()],
                          capture_output=True, text=True, timeout=60, check=True)
    for log in (dom.stderr, shot.stderr):
        assert "Uncaught" not in log and "ERROR:CONSOLE" not in log, log
        assert "Refused to" not in log, log  # the CSP blocked nothing: nothing external
    doc = parse(dom.stdout)
    assert doc.count("svg") == 2 and doc.count("circle") == 11
    assert doc.count("table", id="summary-table") == 1
    assert doc.count("table", id="drills-table") == 1
    assert "Audit chain verified" in dom.stdout
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unattested_and_unsigned_records_never_pass() -> None:
    """A drill its audit record does not back is UNATTESTED, not PASS, and not counted;
    records left out for a bad signature are named; the evidence is printed."""
    shown = [record(1), record(2)]
    audit = dict(AUDIT_OK, head="ab" * 32, drills_checked=2,
                 drills_unattested=[shown[1].id],
                 drill_records={shown[0].id: {"seq": 41, "hash": "cd" * 32}})
    shown[0].user, shown[0].host, shown[0].tool_version = "ops", "db-1", "9.9.9"
    shown[0].manifest_key_id, shown[0].manifest_mac = "k" * 16, "ee" * 32
    shown[0].config_sha256 = "f0" * 32
    rejected = [{"id": "20261001T000000Z-00000009", "source": "lms-db", "status": "forged",
                 "started_at": "2026-10-01T00:00:00+00:00",
                 "why": "signature does not match: the record was edited after it was signed"},
                {"id": "20261002T000000Z-00000008", "source": "lms-db", "status": "missing",
                 "started_at": "2026-10-02T00:00:00+00:00", "why": "removed"}]
    data = ReportData(NOW, None, shown, audit, signing_key="ed25519:" + "1" * 32,
                      rejected=rejected)
    [paid] = summarize(shown, data.untrusted)
    assert (paid.drills, paid.passed, paid.ok) == (2, 1, False)
    md = render(data, "md")
    assert "| UNATTESTED |" in md and md.count("| PASS |") == 1
    assert "FORGED drill record 20261001T000000Z-00000009" in md and "not counted" in md
    assert "MISSING drill record 20261002T000000Z-00000008" in md
    assert "ab" * 32 in md and "ed25519:" + "1" * 32 in md and "Newest anchor: none" in md
    assert f"| `{shown[0].id}` | 41 | {'cd' * 32} | ops | db-1 | {'k' * 16}:{'ee' * 32} | " \
           f"9.9.9 | {'f0' * 32} |" in md
    doc = json.loads(render(data, "json"))
    assert [d["result"] for d in doc["drills"]] == ["PASS", "UNATTESTED"]
    assert doc["drills"][0]["audit_record"] == {"seq": 41, "hash": "cd" * 32}
    assert doc["rejected"] == rejected and doc["signing_key"] == "ed25519:" + "1" * 32
    html = render_html(data)
    assert 'id="evidence" class="fail"' in html and ">UNATTESTED<" in html
    assert html.count("UNATTESTED</title>") == 2  # its mark in both charts is no pass either
    unsigned = render(ReportData(NOW, None, shown, AUDIT_OK), "md")
    assert "Drill records are NOT signed" in unsigned
