"""drctl: the operator's command line. Each command maps options to a service call.

A command group's module is imported only when one of its commands runs (or `--help`
lists them): `drctl backup` starts pg_dump without first loading restore, drills,
audit, prune... (cli.LazyGroup).
"""

from __future__ import annotations

import contextlib
import signal
import sys
from types import FrameType

import click

from .. import backup as backup_service
from ..errors import UsageError
from ..progress import ProgressLine
from ..sources.directory import facts_lines
from ..units import format_bytes
from . import (
    chosen_sources,
    emit_json,
    get_runtime,
    handle_errors,
    json_option,
    root_group,
    tenant_option,
)

# name -> "module:attribute" of each command defined outside this module (cli.LazyGroup).
LAZY_COMMANDS = {
    "audit": "audit:audit_group",
    "config": "config_check:config_group",
    "drill": "drill:drill_group",
    "keys": "keys_group:keys_group",
    "prune": "prune:prune_cmd",
    "recovery": "recovery:recovery_group",
    "replicate": "replicate:replicate_cmd",
    "restore": "restore_cmd:restore_cmd",
    "snapshots": "snapshots:snapshots_group",
    "status": "status:status_cmd",
    # cli/tenant.py's group, with cli/tenant_lifecycle.py's commands registered on it.
    "tenant": "tenant_lifecycle:tenant_group",
    "verify": "replicate:verify_cmd",
}

cli = root_group("Operate drdaemon: back up, list, restore and check snapshots.", LAZY_COMMANDS)


# -- backup -----------------------------------------------------------------

@cli.command("backup")
@click.option("--source", "sources", multiple=True, metavar="NAME",
              help="Source to snapshot (repeatable; default: all).")
@tenant_option
@click.option("--accept-shrink", is_flag=True,
              help="Commit even if a source shrank sharply against its newest snapshot "
                   "(max_shrink); only once you know the shrink is real. Needs --source.")
@json_option
@click.pass_context
@handle_errors("drctl")
def backup_cmd(ctx: click.Context, sources: tuple[str, ...], tenant: str | None,
               accept_shrink: bool, as_json: bool) -> None:
    """Take a snapshot now. Exit 1 if any source failed or is degraded."""
    rt = get_runtime(ctx)
    chosen = rt.config.pick_sources(chosen_sources(rt.config, sources, tenant))
    if not chosen:
        raise UsageError(f"{rt.config.path} configures no sources")
    if accept_shrink and not sources:
        # Confirming a shrink is a decision about one source, never a blanket switch.
        raise UsageError("--accept-shrink needs --source NAME: confirm each source's shrink")
    results = []
    # Several sources: one audit mirror per region for the run (and one a minute in a
    # long run), not a LIST and a PUT per region after every snapshot (Runtime.audit_batch).
    # One source: each record is mirrored as it is made, as always.
    with rt.audit_batch() if len(chosen) > 1 else contextlib.nullcontext():
        for src in chosen:
            line = ProgressLine(f"backup {src.name}")
            results.append(backup_service.snapshot(rt, src, line.update,
                                                   accept_shrink=accept_shrink))
            line.close()
    if as_json:
        emit_json([r.to_dict() for r in results])
    else:
        for r in results:
            if r.ok and r.manifest is not None:
                state = "DEGRADED" if r.degraded else "ok"
                click.echo(f"{r.source}: {state} snapshot {r.snapshot_id} "
                           f"({format_bytes(r.manifest.plaintext_size)} -> "
                           f"{format_bytes(r.manifest.size)}) in {', '.join(r.regions)}")
                for said in facts_lines(r.manifest.facts):
                    click.echo(f"  {said}")
            else:
                click.echo(f"{r.source}: FAILED: {r.error}")
            for region, why in r.failed_regions.items():
                click.echo(f"  region {region} failed: {why}")
    if not all(r.ok and not r.degraded for r in results):
        sys.exit(1)



def _interrupted(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Console-script entry point."""
    # SIGTERM ends drctl as Ctrl-C does: what it started is cleaned up on the
    # way out (uploads aborted, staging removed, pg_dump and its sessions ended).
    signal.signal(signal.SIGTERM, _interrupted)
    cli(obj={})
