"""`drctl config check`: validate the config (and with --connect, the roles' privileges)."""

from __future__ import annotations

import sys

import click

from .. import tenancy
from ..sources import pg_roles
from ..sources.tree_extract import interpreter_note
from . import emit_json, get_config, handle_errors, json_option

# -- config -----------------------------------------------------------------

@click.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("check")
@click.option("--connect", is_flag=True,
              help="Also connect to every postgres source (and the drill server) and say what "
                   "the backup, restore and drill roles lack (docs/postgres-roles.md); exit 1 "
                   "if anything is missing.")
@json_option
@click.pass_context
@handle_errors("drctl")
def config_check(ctx: click.Context, connect: bool, as_json: bool) -> None:
    """Validate the config file; exit 2 with one line naming the problem."""
    cfg = get_config(ctx)
    checks = pg_roles.check_config(cfg) if connect else []
    ok = all(c.ok for c in checks)
    summary = {
        "config": cfg.path, "ok": ok, "warnings": list(cfg.warnings),
        "sources": [s.name for s in cfg.sources], "regions": [r.name for r in cfg.regions],
        "tiers": {t.name: {"rpo_seconds": t.rpo.total_seconds(),
                           "rto_seconds": t.rto.total_seconds()} for t in cfg.tiers.values()},
        "python_note": interpreter_note(),
        "tenants": {n: {"tier": t.tier, "implicit": t.implicit,
                        "residency": t.residency.to_dict() if t.residency else None,
                        "regions": list(tenancy.allowed_regions(cfg, n)),
                        "erase_after_days": t.erase_after.days,
                        "sources": [s.name for s in tenancy.sources_of(cfg, n)]}
                    for n, t in sorted(cfg.tenants.items())},
    }
    if connect:
        summary["privileges"] = [c.to_dict() for c in checks]
    if as_json:
        emit_json(summary)
        sys.exit(0 if ok else 1)
    if summary["python_note"]:
        click.echo(f"WARNING: {summary['python_note']}", err=True)
    click.echo(f"{cfg.path}: OK — {len(cfg.sources)} source(s), {len(cfg.regions)} region(s) "
               f"({', '.join(f'{r.name} [{r.continent}]' for r in cfg.regions)})")
    for c in checks:
        click.echo(f"{c.source} ({c.server}): {'OK' if c.ok else 'MISSING'}")
        if c.error:
            click.echo(f"  error: {c.error}")
        for job in ("backup", "restore", "drill"):
            for missing in getattr(c, job):
                click.echo(f"  {job} role lacks {missing}")
    if not ok:
        sys.exit(1)
