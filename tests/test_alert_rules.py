"""The alert rules, their unit tests and the Alertmanager routing, checked by the real tools.

promtool (Debian's `prometheus`) checks and unit-tests config/prometheus/alerts.yml
(alerts_test.yml shows every alert firing and not firing); amtool (Debian's
`prometheus-alertmanager`) checks config/alertmanager/alertmanager.yml and resolves its
routes. scripts/test installs both.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "config" / "prometheus"
ALERTMANAGER = ROOT / "config" / "alertmanager" / "alertmanager.yml"
RUNBOOK_BASE = "https://runbooks.example.org/drdaemon/"

# The agreed alert set (issue 5) and the runbook each opens.
ALERTS = {
    "DrdaemonSnapshotOverdue": "snapshot-overdue",
    "DrdaemonRPOBreached": "rpo-breached",
    "DrdaemonRegionMissingSnapshot": "region-missing-snapshot",
    "DrdaemonSnapshotFailing": "snapshot-failing",
    "DrdaemonSourceShrank": "source-shrank",
    "DrdaemonManifestUnreadable": "manifest-unreadable",
    "DrdaemonRetentionBelowPolicy": "retention-below-policy",
    "DrdaemonVerifyFailed": "verify-failed",
    "DrdaemonOrphanLost": "orphan-lost",
    "DrdaemonOrphanStuck": "orphan-stuck",
    "DrdaemonUnmanagedDataPastErasure": "unmanaged-data",
    "DrdaemonDrillFailed": "drill-failed",
    "DrdaemonDrillMissing": "drill-missing",
    "DrdaemonDrillRTOOverTarget": "drill-rto-over-target",
    "DrdaemonDrillRPOOverTarget": "drill-rpo-over-target",
    "DrdaemonProjectedRTOOverTarget": "projected-rto-over-target",
    "DrdaemonAuditChainBroken": "audit-chain-broken",
    "DrdaemonAuditVerifyMissing": "audit-verify-missing",
    "DrdaemonAuditAnchorMissing": "audit-anchor-missing",
    "DrdaemonTenantErasureDueSoon": "tenant-erasure-due",
    "DrdaemonTenantErasureOverdue": "tenant-erasure-overdue",
    "DrdaemonStandbyMissing": "standby-lag",
    "DrdaemonStandbyLagging": "standby-lag",
    "DrdaemonStandbyNotReplaying": "standby-lag",
    "DrdaemonRecipientUnproven": "escrow-drill",
    "DrdaemonTenantKeyMissingRecipient": "escrow-drill",
    "DrdaemonDown": "daemon-down",
    "DrdaemonNoActive": "failover",
    "DrdaemonQueueBacklog": "queue-backlog",
    "DrdaemonQueueJobsFailed": "queue-backlog",
    "DrdaemonAbsent": "daemon-absent",
}


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (Debian: apt-get install {package}; "
                    "scripts/test does it)")
    return path


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False,
                          cwd=ROOT, stdin=subprocess.DEVNULL)
    return proc


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROM / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_checks_the_rules_and_the_example_config() -> None:
    promtool = tool("promtool", "prometheus")
    for args in (("check", "rules", "config/prometheus/alerts.yml"),
                 ("check", "config", "config/prometheus/prometheus.yml")):
        proc = run(promtool, *args)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_unit_tests_pass() -> None:
    proc = run(tool("promtool", "prometheus"), "test", "rules",
               "config/prometheus/alerts_test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    doc = yaml.safe_load((PROM / "alerts_test.yml").read_text())
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in doc["tests"]:
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert firing == set(ALERTS), f"never shown firing: {set(ALERTS) - firing}"
    assert quiet == set(ALERTS), f"never shown quiet: {set(ALERTS) - quiet}"


def test_exactly_the_agreed_alerts_each_with_severity_summary_and_runbook() -> None:
    found = rules()
    assert {r["alert"] for r in found} == set(ALERTS)
    for r in found:
        name, labels, notes = r["alert"], r.get("labels", {}), r.get("annotations", {})
        assert labels.get("severity") in ("critical", "warning"), name
        assert notes.get("summary") and notes.get("description"), name
        # Alerts about a source or a tier say which; the daemon alerts say which host
        # (but the two about every host: none scraped, none active).
        assert re.search(r"\$labels\.(source|tier|tenant|instance)", notes["summary"]) or (
            name in ("DrdaemonAbsent", "DrdaemonNoActive")), \
            f"{name}: summary names no source or tier"
        url = notes.get("runbook_url", "")
        assert url == f"{RUNBOOK_BASE}runbooks/{ALERTS[name]}.md", f"{name}: {url}"
        # The tail resolves to a runbook in this repository.
        tail = url.removeprefix(RUNBOOK_BASE)
        assert (ROOT / tail).is_file(), f"{name}: {tail} does not exist"


def test_the_rules_read_only_metrics_the_daemon_exports() -> None:
    """A typo in a metric name makes an alert silently never fire."""
    from drdaemon import metrics

    exported = metrics_names(metrics)
    for r in rules():
        for name in re.findall(r"\b(drdaemon_[a-z_]+)", r["expr"]):
            assert name in exported, f"{r['alert']}: {name} is not exported"


def metrics_names(module: Any) -> set[str]:
    """Every family name `families` renders for a state with every kind of data."""
    from datetime import UTC, datetime

    st = module.MetricsState(sources={}, regions=("eu",), tiers={"paid": (1.0, 1.0)})
    st.queue = module.QueueRead((), 0, 1, 3600.0, 0.0)  # [cluster]: the job queue's families
    names = set()
    for fam in module.families(st, datetime.now(UTC)):
        names.add(fam.name + ("_total" if fam.type == "counter" else ""))
    # drdaemon_active: both an active daemon's registry and a standby's render it.
    names |= {fam.name for fam in module.standby_registry().collect()}
    return names


def test_amtool_checks_the_routing() -> None:
    amtool = tool("amtool", "prometheus-alertmanager")
    proc = run(amtool, "check-config", str(ALERTMANAGER))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for severity, receiver in (("critical", "pager"), ("warning", "ticket")):
        proc = run(amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER}",
                   f"--verify.receivers={receiver}", f"severity={severity}",
                   "alertname=DrdaemonRPOBreached")
        assert proc.returncode == 0, f"{severity}: {proc.stdout}{proc.stderr}"
