"""drctl audit: check the tamper-evident audit log, and list it for auditors."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from .. import anchors, audit, audit_mirror, evidence
from ..audit_chain import ChainKeys, verify_public
from ..audit_mirror import CopyAudit
from ..errors import UsageError
from ..evidence_check import BundleCheck, verify_bundle
from ..runtime import Runtime, open_runtime
from ..signing import PublicKey, load_public_key
from ..units import parse_duration
from . import emit_json, get_config, get_runtime, handle_errors, json_option
from .drill import since_from

# Shown in the record's own columns, or only of use to `verify`.
_NOT_FIELDS = ("seq", "time", "event", "prev", "mac", "sig")


@click.group("audit")
def audit_group() -> None:
    """Check and read the tamper-evident audit log."""


@audit_group.command("verify")
@click.option("--region", metavar="NAME",
              help="Check this region's copy of the log (and that it agrees with the local one).")
@click.option("--bundle", type=click.Path(path_type=Path), metavar="DIR",
              help="Check an evidence bundle (drctl audit export) instead; needs --public-key "
                   "and no config or secret.")
@click.option("--public-key", "public_key", metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="Check with this Ed25519 public key alone (an auditor's check): no secret "
                   "is read; records before the first one it proves are counted as unproven.")
@json_option
@click.pass_context
@handle_errors("drctl")
def verify_cmd(ctx: click.Context, region: str | None, bundle: Path | None,
               public_key: Path | None, as_json: bool) -> None:
    """Check every record's signature or MAC, who may sign it, and the hash chain. Exit 1
    naming the first bad record."""
    if bundle is not None:
        if public_key is None or region is not None:
            raise UsageError("--bundle DIR takes --public-key FILE, and no --region")
        if not bundle.is_dir():
            raise UsageError(f"--bundle {bundle}: not a folder")
        show_bundle_check(verify_bundle(bundle, load_public_key(public_key)), as_json)
        return
    if public_key is not None:
        public = load_public_key(public_key)
        # No key file is made or read on this path: the auditor holds no secret.
        rt = open_runtime(get_config(ctx, key_files=False), secrets=False)
        result = _verify(rt, region, public)
    else:
        rt = get_runtime(ctx)
        result = _verify(rt, region, None)
    where = f"region {region}" if region else audit.log_where(rt.config.daemon.state_dir)
    chain, problems = result.chain, result.problems
    if as_json:
        emit_json(dict(result.to_dict(), where=where))
    elif result.ok:
        signer = f", signed by {chain.signer}" if chain.signer else ""
        click.echo(f"OK: {where}: {result.records} records verified (head {result.head}"
                   f"{signer})")
        if chain.unproven:
            click.echo(f"note: the first {chain.unproven} records precede the first record "
                       "the key proves; their chain links were checked", err=True)
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


def show_bundle_check(check: BundleCheck, as_json: bool) -> None:
    """Print a bundle's check; exit 1 unless it verified."""
    if as_json:
        emit_json(check.to_dict())
    else:
        where = f"bundle {check.folder} (key {check.signer})"
        audit_part = f"{check.audit.get('records')} audit records (head {check.audit.get('head')})"
        counts = (f"{check.files} files, {audit_part}, {check.drills} drill records, "
                  f"{check.manifests} manifests, {check.anchors} anchor files")
        click.echo(f"OK: {where}: {counts}" if check.ok else f"FAILED: {where}: {counts}")
        for p in check.problems:
            click.echo(f"! {p}")
        for n in check.notes:
            click.echo(f"- {n}")
    if not check.ok:
        sys.exit(1)


@audit_group.command("export")
@click.option("--to", "dest", required=True, type=click.Path(path_type=Path), metavar="DIR",
              help="A new or empty folder for the bundle.")
@click.option("--since", metavar="WHEN",
              help="Only drill records since then: a duration back (90d) or a date "
                   "(default: all). The audit log is always whole.")
@json_option
@click.pass_context
@handle_errors("drctl")
def export_cmd(ctx: click.Context, dest: Path, since: str | None, as_json: bool) -> None:
    """Write an evidence bundle for auditors: the audit log, signed drill records, the
    manifests they restored, anchors, the public key, SHA256SUMS(.sig) and VERIFY.md.
    Exit 1 if the bundle does not verify with the public key (it is written all the same)."""
    rt = get_runtime(ctx)
    start = since_from(since, rt.clock()) if since else None
    result = evidence.export_bundle(rt, dest, start)
    if as_json:
        emit_json(result.to_dict())
    else:
        click.echo(f"wrote {result.folder}: {result.records} audit records (head "
                   f"{result.head}), {result.drills} drill records, {result.manifests} "
                   f"manifests, {result.anchors} anchor files; signed by {result.signing_key}")
        for n in result.notes:
            click.echo(f"- {n}")
        for p in result.check.problems:
            click.echo(f"! the bundle does not verify: {p}", err=True)
    if not result.ok:
        sys.exit(1)


def _verify(rt: Runtime, region: str | None, public: PublicKey | None) -> CopyAudit:
    """The local log or a region's copy, with what the anchors say, checked with `public`
    alone, else the runtime's keys."""
    if region:
        keys = ChainKeys(public=(public,)) if public is not None else None
        return audit_mirror.verify_mirror(rt, region, keys)
    if public is not None:
        return audit_mirror.verify_local(rt, verify_public(
            audit.read_lines(rt.config.daemon.state_dir), public))
    return audit_mirror.verify_local(rt)


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
