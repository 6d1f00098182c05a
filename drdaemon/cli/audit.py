"""drctl audit: check the tamper-evident audit log, and list it for auditors."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from .. import anchors, audit, audit_mirror
from ..errors import UsageError
from ..units import parse_duration
from . import emit_json, get_runtime, handle_errors, json_option

# Shown in the record's own columns, or only of use to `verify`.
_NOT_FIELDS = ("seq", "time", "event", "prev", "mac")


@click.group("audit")
def audit_group() -> None:
    """Check and read the tamper-evident audit log."""


@audit_group.command("verify")
@click.option("--region", metavar="NAME",
              help="Check this region's copy of the log (and that it agrees with the local one).")
@json_option
@click.pass_context
@handle_errors("drctl")
def verify_cmd(ctx: click.Context, region: str | None, as_json: bool) -> None:
    """Check every record's MAC and the hash chain. Exit 1 naming the first bad record."""
    rt = get_runtime(ctx)
    result = audit_mirror.verify_mirror(rt, region) if region else audit_mirror.verify_local(rt)
    where = f"region {region}" if region else str(audit.log_path(rt.config.daemon.state_dir))
    chain, problems = result.chain, result.problems
    if as_json:
        emit_json(dict(result.to_dict(), where=where))
    elif result.ok:
        click.echo(f"OK: {where}: {result.records} records verified (head {result.head})")
    elif not chain.ok:
        click.echo(f"FAILED: {where}: record {chain.first_bad}: {chain.reason} "
                   f"({chain.records} records before it verified)")
    else:
        click.echo(f"FAILED: {where}: {chain.records} records verified (head {chain.head}), "
                   "but:")
    if not as_json:
        for problem in problems:
            click.echo(f"  - {problem}")
    if not result.ok:
        sys.exit(1)


@audit_group.command("accept-chain")
@click.argument("folder")
@click.option("--region", required=True, metavar="NAME", help="The region holding the chain.")
@click.option("--reason", required=True, help="The incident that lost the log: audit-logged.")
@json_option
@click.pass_context
@handle_errors("drctl")
def accept_chain_cmd(ctx: click.Context, folder: str, region: str, reason: str,
                     as_json: bool) -> None:
    """Accept FOLDER (audit/HOST/CHAIN, as `audit verify --region` names it), an earlier
    chain of this host, as lost rather than rewritten: recorded in the log; reported again
    if the chain changes."""
    fields = audit_mirror.accept_chain(get_runtime(ctx), region, folder.rstrip("/"), reason)
    if as_json:
        emit_json(fields)
    else:
        click.echo(f"accepted: {fields['folder']}/ in region {region}: {fields['records']} "
                   f"records, head {fields['head']}")


@audit_group.command("anchor")
@json_option
@click.pass_context
@handle_errors("drctl")
def anchor_cmd(ctx: click.Context, as_json: bool) -> None:
    """Anchor the log's head now ([audit] tsa_url, [audit.witness], every region), as the
    daemon does every [audit] anchor_every. Exit 1 if a place could not be written."""
    rt = get_runtime(ctx)
    if not rt.config.audit.anchoring:
        raise UsageError("no anchor configured: set [audit] tsa_url or [audit.witness]")
    report = anchors.anchor(rt)
    if as_json:
        emit_json(report.to_dict())
    elif report.anchor is None:
        click.echo("nothing to anchor: the audit log is empty")
    else:
        a = report.anchor
        click.echo(f"{'anchored' if report.made else 'already anchored'}: record {a.seq} "
                   f"(head {a.head}) in {', '.join(a.where)}"
                   + (f"; TSA time {a.tsa_time}" if a.tsa_time else ""))
    for place, why in sorted(report.failures.items()):
        click.echo(f"FAILED: {place}: {why}", err=True)
    if not report.ok:
        sys.exit(1)


@audit_group.command("show")
@click.option("--since", metavar="DURATION", help="Only records newer than this (e.g. 7d, 24h).")
@click.option("--event", "prefix", metavar="PREFIX",
              help="Only events whose name starts with PREFIX (e.g. restore, prune.).")
@json_option
@click.pass_context
@handle_errors("drctl")
def show_cmd(ctx: click.Context, since: str | None, prefix: str | None, as_json: bool) -> None:
    """List audit records, oldest first. Exit 1 if the log does not verify."""
    try:
        age = parse_duration(since) if since is not None else None
    except ValueError as exc:
        raise UsageError(f"--since: {exc}") from None
    rt = get_runtime(ctx)
    records, check = audit.show(rt, age, prefix)
    if as_json:
        emit_json({"records": records, "verification": check.to_dict()})
    else:
        for r in records:
            click.echo(format_record(r))
        if not check.ok:
            click.echo(f"! the audit log does not verify from record {check.first_bad}: "
                       f"{check.reason}", err=True)
    if not check.ok:
        sys.exit(1)


def format_record(r: dict[str, Any]) -> str:
    """One line per record: seq, time, event, then its fields as key=value."""
    fields = " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v, sort_keys=True)}"
                      for k, v in sorted(r.items()) if k not in _NOT_FIELDS)
    return f"{r.get('seq', '?'):>6}  {r.get('time', '?')}  {r.get('event', '?'):<20} {fields}"
