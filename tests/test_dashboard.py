"""The Grafana dashboard (config/grafana/): every query reads a metric drdaemon exports, and parses.

A typo in a metric name gives an empty panel that looks like "nothing wrong" on the
worst day. The names are those the metrics render (test_alert_rules.metrics_names); each
query is checked by the real promtool as the expression of a recording rule.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from test_alert_rules import ROOT, metrics_names, tool

DASHBOARD = ROOT / "config" / "grafana" / "drdaemon-worst-day.json"
# The hot-standby watch's lag, which the dashboard must show too.
STANDBY_LAG = {"drdaemon_standby_lag_seconds", "drdaemon_standby_lag_bytes"}
# Grafana's variables, as a value a query may take.
VARIABLES = {"$tier": ".*", "$source": ".*", "$__rate_interval": "5m", "$__range": "1d",
             "$__interval": "1m"}


def queries(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target."""
    out = []
    for p in doc["panels"]:
        out += [(p["title"], t["expr"]) for t in p.get("targets", [])]
    return out


def variable_queries(doc: dict[str, Any]) -> list[str]:
    """The series selectors inside the variables' label_values(...) queries."""
    found = []
    for v in doc["templating"]["list"]:
        m = re.fullmatch(r"label_values\((.+), *\w+\)", v.get("definition", ""))
        if m:
            found.append(m.group(1))
    return found


def filled(expr: str) -> str:
    for var, value in VARIABLES.items():
        expr = expr.replace(var, value)
    return expr


def test_every_query_reads_an_exported_metric() -> None:
    from drdaemon import metrics

    doc = json.loads(DASHBOARD.read_text())
    exported = metrics_names(metrics)
    used = set()
    for title, expr in queries(doc) + [("variables", q) for q in variable_queries(doc)]:
        for name in re.findall(r"\b(drdaemon_[a-z_]+)", expr):
            assert name in exported, f"panel {title!r}: {name} is not exported"
            used.add(name)
    # What the issue asks the dashboard to show, each from its metric.
    for wanted in ("drdaemon_recovery_plan_tier_eta_seconds",
                   "drdaemon_recovery_plan_source_eta_seconds",
                   "drdaemon_projected_tier_rto_seconds",
                   "drdaemon_last_snapshot_timestamp_seconds",
                   "drdaemon_tier_rpo_target_seconds", "drdaemon_newest_snapshot_regions",
                   "drdaemon_last_drill_rto_seconds", "drdaemon_last_drill_rpo_seconds",
                   "drdaemon_snapshot_failures_total", *STANDBY_LAG):
        assert wanted in used, f"the dashboard shows no {wanted}"


def test_every_query_parses(tmp_path: Path) -> None:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [filled(e) for _, e in queries(doc)] + [filled(q) for q in variable_queries(doc)]
    assert len(exprs) > 15
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{n}", "expr": e} for n, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run([tool("promtool", "prometheus"), "check", "rules", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_variables_and_every_panel_use_the_dashboards_datasource() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert {v["name"] for v in doc["templating"]["list"]} >= {"datasource", "tier", "source"}
    for p in doc["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p.get("description"), p["title"]
