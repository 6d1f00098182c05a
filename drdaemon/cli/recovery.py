"""`drctl recovery plan|run`: options -> the recovery service -> the plan, or its execution."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .. import recovery
from ..keys import identities_for
from ..recovery_plan import MAX_PARALLEL, render_json, render_markdown
from ..sources.pg_recreate import Policy
from ..units import duration
from . import emit_json, get_runtime, handle_errors, identity_option, json_option

lost_option = click.option(
    "--lost-region", "lost", multiple=True, metavar="NAME",
    help="A region that is gone (repeatable); regions that cannot be listed count as lost too.")
parallel_option = click.option(
    "--parallel", type=click.IntRange(min=1, max=MAX_PARALLEL), default=1, show_default=True,
    metavar="N",
    help="Restores that run at once.")


@click.group("recovery")
def recovery_group() -> None:
    """The worst day: restore every source, paid tiers first (runbooks/region-lost.md)."""


@recovery_group.command("plan")
@lost_option
@parallel_option
@click.option("--format", "fmt", type=click.Choice(["md", "json"]), default="md",
              show_default=True, help="Markdown table, or JSON (stable).")
@click.pass_context
@handle_errors("drctl")
def plan_cmd(ctx: click.Context, lost: tuple[str, ...], parallel: int, fmt: str) -> None:
    """Which copy of every source to restore, in what order, and when each tier is back.

    Exit 1 if a source has no copy left or a tier's ETA is over its RTO target.
    """
    plan = recovery.make_plan(get_runtime(ctx), lost=lost, parallel=parallel)
    click.echo(render_json(plan) if fmt == "json" else render_markdown(plan))
    if any(i.problem for i in plan.items) or any(t.ok is False for t in plan.tiers):
        sys.exit(1)


@recovery_group.command("run")
@click.option("--to-server", metavar="DSN",
              help="Database server to restore database sources onto (no password: libpq "
                   "finds it); each becomes the database --db-name names.")
@click.option("--db-name", default="{source}", show_default=True, metavar="TEMPLATE",
              help="Name of each restored database; {source} is the source's name.")
@click.option("--to-dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Folder under which each tree source is restored, into DIR/<source>.")
@lost_option
@parallel_option
@click.option("--no-owner", is_flag=True,
              help="postgres: objects belong to the restoring role, no GRANT/REVOKE "
                   "(a new server without the application's roles).")
@click.option("--skip-missing-roles", is_flag=True,
              help="postgres: restore what the target's roles allow and list what was skipped.")
@identity_option
@json_option
@click.pass_context
@handle_errors("drctl")
def run_cmd(ctx: click.Context, to_server: str | None, db_name: str, to_dir: Path | None,
            lost: tuple[str, ...], parallel: int, no_owner: bool, skip_missing_roles: bool,
            identity_file: Path | None, as_json: bool) -> None:
    """Execute the recovery plan: restore and verify every source, paid tiers first.

    Run it again with the same targets after a crash: what finished is skipped.
    Exit 1 if any source failed or has no copy left.
    """
    rt = get_runtime(ctx)
    plan = recovery.make_plan(rt, lost=lost, parallel=parallel)
    targets = recovery.targets_for(rt, plan, to_server, to_dir, db_name)
    identities = identities_for(rt.config, identity_file, "a recovery")
    say = (lambda _: None) if as_json else (lambda text: click.echo(text, err=True))
    run = recovery.run_plan(rt, identities, plan, targets, no_owner=no_owner,
                            policy=Policy(skip_missing_roles, False), say=say)
    if as_json:
        emit_json(run.to_dict())
    else:
        click.echo("| tier | restored | planned | measured | RTO target | verdict |")
        click.echo("| --- | --- | --- | --- | --- | --- |")
        for t in run.summary:
            verdict = ("incomplete" if t["inside_target"] is None
                       else "inside" if t["inside_target"] else "OVER")
            click.echo(f"| {t['tier']} | {t['restored']}/{t['sources']} | "
                       f"{duration(t['planned_seconds'])} | {duration(t['measured_seconds'])} | "
                       f"{duration(t['rto_target_seconds'])} | {verdict} |")
    if not run.ok:
        sys.exit(1)
