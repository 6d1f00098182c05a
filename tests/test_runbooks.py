"""The runbooks stay true to the CLI and to the alert rules.

Every `drctl` (and `drdaemon`) line in a ```sh block of runbooks/*.md must name a real
command, use only its real options and parse; every alert rule's runbook_url must open an
existing runbook; every runbook has the sections on-call relies on at 3 a.m.
"""

from __future__ import annotations

import functools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from drdaemon.cli.daemon import cli as drdaemon_cli
from drdaemon.cli.drctl import cli as drctl_cli

ROOT = Path(__file__).resolve().parent.parent
RUNBOOKS = ROOT / "runbooks"
ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"

# alert name -> runbook file (the Prometheus rules' runbook_url ends in runbooks/<file>)
ALERT_RUNBOOKS = {
    "DrdaemonSnapshotOverdue": "snapshot-overdue.md",
    "DrdaemonRPOBreached": "rpo-breached.md",
    "DrdaemonRegionMissingSnapshot": "region-missing-snapshot.md",
    "DrdaemonSnapshotFailing": "snapshot-failing.md",
    "DrdaemonSourceShrank": "source-shrank.md",
    "DrdaemonManifestUnreadable": "manifest-unreadable.md",
    "DrdaemonRetentionBelowPolicy": "retention-below-policy.md",
    "DrdaemonVerifyFailed": "verify-failed.md",
    "DrdaemonOrphanLost": "orphan-lost.md",
    "DrdaemonOrphanStuck": "orphan-stuck.md",
    "DrdaemonUnmanagedDataPastErasure": "unmanaged-data.md",
    "DrdaemonDrillFailed": "drill-failed.md",
    "DrdaemonDrillMissing": "drill-missing.md",
    "DrdaemonDrillRTOOverTarget": "drill-rto-over-target.md",
    "DrdaemonDrillRPOOverTarget": "drill-rpo-over-target.md",
    "DrdaemonProjectedRTOOverTarget": "projected-rto-over-target.md",
    "DrdaemonAuditChainBroken": "audit-chain-broken.md",
    "DrdaemonAuditVerifyMissing": "audit-verify-missing.md",
    "DrdaemonAuditAnchorMissing": "audit-anchor-missing.md",
    "DrdaemonTenantErasureDueSoon": "tenant-erasure-due.md",
    "DrdaemonTenantErasureOverdue": "tenant-erasure-overdue.md",
    "DrdaemonStandbyMissing": "standby-lag.md",
    "DrdaemonStandbyLagging": "standby-lag.md",
    "DrdaemonStandbyNotReplaying": "standby-lag.md",
    "DrdaemonRecipientUnproven": "escrow-drill.md",
    "DrdaemonTenantKeyMissingRecipient": "escrow-drill.md",
    "DrdaemonQueueBacklog": "queue-backlog.md",
    "DrdaemonQueueJobsFailed": "queue-backlog.md",
    "DrdaemonDown": "daemon-down.md",
    "DrdaemonNoActive": "failover.md",
    "DrdaemonAbsent": "daemon-absent.md",
}
DISASTER_RUNBOOKS = [
    "restore-one-database.md", "restore-one-institution.md", "region-lost.md",
    "ops-identity-lost.md", "corrupt-or-missing-snapshot.md", "break-glass-restore.md",
]
REQUIRED_HEADINGS = ("Symptoms", "Impact", "Diagnose", "Fix", "Confirm recovery", "Whom to tell")
PROGRAMS: dict[str, click.Group] = {"drctl": drctl_cli, "drdaemon": drdaemon_cli}


def runbook_files() -> list[Path]:
    return sorted(p for p in RUNBOOKS.glob("*.md") if p.name != "README.md")


@dataclass(frozen=True)
class Line:
    file: str
    lineno: int
    text: str

    def __str__(self) -> str:
        return f"{self.file}:{self.lineno}: {self.text}"


def sh_lines(path: Path) -> list[Line]:
    """Lines inside ```sh fences, `\\` continuations joined, leading blanks stripped."""
    out: list[Line] = []
    in_sh = False
    pending: tuple[int, str] | None = None
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        fence = raw.strip()
        if fence.startswith("```"):
            in_sh = fence == "```sh"
            continue
        if not in_sh:
            continue
        start, text = pending if pending else (n, "")
        text += raw.strip()
        if text.endswith("\\"):
            pending = (start, text[:-1] + " ")
            continue
        pending = None
        out.append(Line(path.name, start, text))
    return out


def command_lines() -> list[Line]:
    return [line for p in sorted(RUNBOOKS.glob("*.md")) for line in sh_lines(p)
            if line.text.split(maxsplit=1)[:1] and line.text.split()[0] in PROGRAMS]


def words(text: str) -> list[str]:
    """Shell words of one command, without comments, up to the first |, ;, &&, > ..."""
    lex = shlex.shlex(text, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    result = []
    for token in lex:
        if token and set(token) <= set("();<>|&"):
            break
        result.append(token)
    return result


@dataclass
class Parsed:
    program: str
    path: list[str]  # subcommand path, e.g. ["snapshots", "list"]
    options: dict[tuple[str, ...], list[str]]  # subcommand path prefix -> --options used there
    leaf_args: list[str]  # everything after the subcommand path


def parse(line: Line) -> Parsed:
    """Split a line into the subcommand path and the options given at each level."""
    program, *rest = words(line.text)
    cmd: click.Command | None = PROGRAMS[program]
    path: list[str] = []
    options: dict[tuple[str, ...], list[str]] = {}
    i = 0
    while isinstance(cmd, click.Group) and i < len(rest):
        word = rest[i]
        i += 1
        if word.startswith("-"):
            name = word.split("=", 1)[0]
            options.setdefault(tuple(path), []).append(name)
            param = next((p for p in cmd.params if name in getattr(p, "opts", ())), None)
            takes_value = isinstance(param, click.Option) and not (param.is_flag or param.count)
            if takes_value and "=" not in word:
                i += 1
            continue
        path.append(word)
        cmd = cmd.get_command(click.Context(cmd), word)
    leaf_args = rest[i:]
    options.setdefault(tuple(path), []).extend(
        w.split("=", 1)[0] for w in leaf_args if w.startswith("--"))
    return Parsed(program, path, options, leaf_args)


@functools.cache
def help_text(program: str, path: tuple[str, ...]) -> tuple[int, str]:
    result = CliRunner().invoke(PROGRAMS[program], [*path, "--help"], obj={})
    return result.exit_code, result.output


def mentions_option(help_output: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", help_output) is not None


LINES = command_lines()


def test_runbooks_quote_commands() -> None:
    assert len(LINES) >= 40, "the runbooks lost their drctl commands?"
    files = {line.file for line in LINES}
    for name in [*ALERT_RUNBOOKS.values(), *DISASTER_RUNBOOKS]:
        assert name in files, f"{name} quotes no drctl command in a ```sh block"


@pytest.mark.parametrize("line", LINES, ids=str)
def test_command_line_is_real(line: Line) -> None:
    p = parse(line)
    assert p.path, f"{line}: no subcommand"
    group = PROGRAMS[p.program]
    # Options before the subcommand (e.g. --config) first, then the subcommand's own.
    for prefix in sorted(p.options, key=len):
        name = " ".join((p.program, *prefix))
        code, out = help_text(p.program, prefix)
        assert code == 0, f"{line}\n`{name} --help` failed:\n{out}"
        for option in p.options[prefix]:
            assert mentions_option(out, option), f"{line}\n{option} is not an option of `{name}`"
    # The whole line parses as the command would (required options, arguments, values).
    leaf = group
    for name in p.path:
        assert isinstance(leaf, click.Group)
        leaf = leaf.get_command(click.Context(leaf), name)
    try:
        leaf.make_context(" ".join([p.program, *p.path]), list(p.leaf_args), obj={})
    except click.ClickException as exc:
        pytest.fail(f"{line}\ndoes not parse: {exc.format_message()}")


def alert_rules() -> list[tuple[str, str | None]]:
    """(alert, runbook_url) for every alerting rule in config/prometheus/alerts.yml."""
    text = ALERTS.read_text()
    try:
        import yaml
    except ImportError:  # PyYAML comes with moto[server]; fall back to the simple lines
        alerts = re.findall(r"^\s*-?\s*alert:\s*['\"]?([\w:]+)", text, re.M)
        urls = re.findall(r"^\s*runbook_url:\s*['\"]?([^'\"\s]+)", text, re.M)
        assert len(alerts) == len(urls), "every alert needs exactly one runbook_url"
        return list(zip(alerts, urls, strict=True))
    doc = yaml.safe_load(text) or {}
    return [(rule["alert"], (rule.get("annotations") or {}).get("runbook_url"))
            for group in doc.get("groups") or [] for rule in group.get("rules") or []
            if "alert" in rule]


def test_alert_rules_point_at_existing_runbooks() -> None:
    if not ALERTS.exists():
        pytest.skip(f"{ALERTS.relative_to(ROOT)} does not exist yet")
    rules = alert_rules()
    assert rules, f"{ALERTS} holds no alerting rule"
    for alert, url in rules:
        assert url, f"alert {alert} has no runbook_url annotation"
        m = re.search(r"(?:^|/)runbooks/([\w.-]+\.md)$", url)
        assert m, f"alert {alert}: runbook_url {url!r} does not end in runbooks/<file>.md"
        assert (RUNBOOKS / m.group(1)).is_file(), f"alert {alert}: {url} names no runbook"
        if alert in ALERT_RUNBOOKS:
            assert m.group(1) == ALERT_RUNBOOKS[alert], f"alert {alert}: {url}"


def test_every_alert_and_disaster_has_its_runbook() -> None:
    for alert, name in ALERT_RUNBOOKS.items():
        path = RUNBOOKS / name
        assert path.is_file(), f"{alert}: runbooks/{name} is missing"
        assert alert in path.read_text(), f"runbooks/{name} never names {alert}"
    for name in DISASTER_RUNBOOKS:
        assert (RUNBOOKS / name).is_file(), f"runbooks/{name} is missing"


@pytest.mark.parametrize("path", runbook_files(), ids=lambda p: p.name)
def test_runbook_has_required_sections(path: Path) -> None:
    text = path.read_text()
    headings = re.findall(r"^## +(.+?)\s*$", text, re.M)
    for required in REQUIRED_HEADINGS:
        assert any(h.startswith(required) for h in headings), (
            f"{path.name}: no '## {required}' section (has {headings})")
    tell = " ".join(text.split("## Whom to tell", 1)[1].split("\n## ", 1)[0].lower().split())
    for who in ("incident lead", "data protection officer"):
        assert who in tell, f"{path.name}: 'Whom to tell' does not mention the {who}"


@pytest.mark.parametrize("path", sorted(RUNBOOKS.glob("*.md")), ids=lambda p: p.name)
def test_runbook_links_resolve(path: Path) -> None:
    for link in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", path.read_text()):
        assert (path.parent / link).is_file(), f"{path.name} links missing {link}"


def test_index_links_every_runbook() -> None:
    index = (RUNBOOKS / "README.md").read_text()
    links = set(re.findall(r"\]\(([^)#]+\.md)\)", index))
    for path in runbook_files():
        assert path.name in links, f"runbooks/README.md does not link {path.name}"
    for link in links:
        assert (RUNBOOKS / link).is_file(), f"runbooks/README.md links missing {link}"
