"""drctl replicate and drctl verify: is every copy there and intact; repair those that are not."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import UsageError
from ..keys import identities_for
from ..replicate import ReplicationReport, run_replicate
from ..units import format_bytes
from ..verify import VerifyReport, run_verify
from . import (
    chosen_sources,
    emit_json,
    get_runtime,
    handle_errors,
    identity_option,
    json_option,
    tenant_option,
)

source_option = click.option("--source", "sources", multiple=True, metavar="NAME",
                             help="Only this source (repeatable; default: all).")


@click.command("replicate")
@source_option
@tenant_option
@click.option("--repair", is_flag=True,
              help="Copy each missing or broken copy from a region whose copy verifies.")
@click.option("--verify", "verify_data", is_flag=True,
              help="Also stream and hash every copy, to find same-size corruption "
                   "(reads every object; without it only manifests and sizes are checked).")
@json_option
@click.pass_context
@handle_errors("drctl")
def replicate_cmd(ctx: click.Context, sources: tuple[str, ...], tenant: str | None,
                  repair: bool, verify_data: bool, as_json: bool) -> None:
    """Check that every snapshot is complete in every region; with --repair, fix it.

    Without --repair nothing is changed: the plan is printed. Exit 1 when any
    copy is still missing or broken after the run.
    """
    rt = get_runtime(ctx)
    report = run_replicate(rt, chosen_sources(rt.config, sources, tenant), repair=repair,
                           verify=verify_data)
    if as_json:
        emit_json(report.to_dict())
    else:
        for line in replication_lines(report):
            click.echo(line)
    if not report.ok:
        sys.exit(1)


def replication_lines(report: ReplicationReport) -> list[str]:
    """One line per copy that was not complete, then a summary."""
    outcomes = {o.repair.key: o for o in report.outcomes}
    planned = {r.key: r for r in report.plan.repairs}
    lines = []
    for s in report.plan.snapshots:
        for region, why in s.problems.items():
            key = (s.source, s.snapshot_id, region)
            head = f"{s.source} {s.snapshot_id} in {region}: {why}"
            out, plan = outcomes.get(key), planned.get(key)
            if out is not None and out.ok:
                lines.append(f"{head} -> repaired from {out.from_region}")
            elif out is not None:
                lines.append(f"{head} -> REPAIR FAILED: {out.error}")
            elif plan is not None and plan.sources:
                lines.append(f"{head} (--repair copies it from {plan.sources[0]})")
            elif plan is not None:
                lines.append(f"{head} (no healthy copy to repair from)")
            else:
                lines.append(head)
    for region, why in report.plan.region_errors.items():
        lines.append(f"! region {region} could not be listed: {why}")
    total = report.summary()
    state = "OK" if report.ok else "PROBLEMS"
    lines.append(f"replicate: {state}: {total['snapshots']} snapshot(s) in "
                 f"{len(report.plan.regions)} region(s); {total['complete']} of "
                 f"{total['copies']} copies complete"
                 + (f" ({total['pruned']} pruned by retention)" if total["pruned"] else "")
                 + ("" if not report.repair else
                    f"; repaired {total['repaired']}, failed {total['repair_failed']}")
                 + (f"; {total['remaining']} still missing or broken" if total['remaining']
                    else ""))
    return lines


@click.command("verify")
@source_option
@tenant_option
@click.option("--region", metavar="NAME", help="Only this region (default: all).")
@click.option("--deep", is_flag=True,
              help="Also decrypt and decompress each copy end to end (needs the identity).")
@identity_option
@json_option
@click.pass_context
@handle_errors("drctl")
def verify_cmd(ctx: click.Context, sources: tuple[str, ...], tenant: str | None,
               region: str | None, deep: bool, identity_file: Path | None,
               as_json: bool) -> None:
    """Stream every copy and check its size and sha256 against its manifest.

    Exit 1 on any missing, corrupt or unreadable copy.
    """
    rt = get_runtime(ctx)
    identities = None
    if identity_file and not deep:
        raise UsageError("--identity is only used with --deep")
    if deep:
        identities = identities_for(rt.config, identity_file, "--deep")
    report = run_verify(rt, chosen_sources(rt.config, sources, tenant), region, deep=deep,
                        identities=identities)
    if as_json:
        emit_json(report.to_dict())
    else:
        for line in verify_lines(report):
            click.echo(line)
    if not report.ok:
        sys.exit(1)


def verify_lines(report: VerifyReport) -> list[str]:
    """One line per failed copy, then a summary."""
    lines = [f"FAILED {c.source} {c.snapshot_id} in {c.region}: {c.status}: {c.reason}"
             for c in report.failures]
    lines += [f"! region {r} could not be listed: {why}"
              for r, why in report.region_errors.items()]
    what = "sha256, decrypt and decompress" if report.deep else "size and sha256"
    good = len(report.checks) - len(report.failures)
    snaps = len({(c.source, c.snapshot_id) for c in report.checks})
    lines.append(f"verify: {'OK' if report.ok else 'PROBLEMS'}: {len(report.checks)} "
                 f"copies of {snaps} snapshot(s) checked ({what}): {good} ok, "
                 f"{len(report.failures)} failed; "
                 f"{format_bytes(sum(c.bytes for c in report.checks))} verified")
    return lines
