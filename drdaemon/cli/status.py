"""drctl status: every source against its RPO, for people and for cron/scripts."""

from __future__ import annotations

import sys
from datetime import timedelta

import click

from ..standby import poll as poll_standbys
from ..status import source_statuses, warnings
from ..units import format_duration
from . import chosen_sources, emit_json, get_runtime, handle_errors, json_option, tenant_option


@click.command("status")
@tenant_option
@json_option
@click.pass_context
@handle_errors("drctl")
def status_cmd(ctx: click.Context, tenant: str | None, as_json: bool) -> None:
    """Per source: newest snapshot and its age against the RPO, regions, retention.

    Exit 1 when any source is outside its RPO or missing a region (a region its
    tenant's residency allows).
    """
    rt = get_runtime(ctx)
    statuses, region_errors = source_statuses(rt, chosen_sources(rt.config, [], tenant))
    warned = warnings(rt.config)
    # Hot standbys (standby.py): all of them, or those of the tenant's sources.
    names = {s.source for s in statuses}
    standbys = [s for s in poll_standbys(rt.config, {}, rt.clock())
                if tenant is None or s.source in names]
    ok = all(s.ok for s in statuses) and not region_errors and not any(
        s.problems for s in standbys)
    if as_json:
        emit_json({"sources": [s.to_dict() for s in statuses], "region_errors": region_errors,
                   "standbys": [s.to_dict() for s in standbys], "warnings": warned, "ok": ok})
    else:
        for s in statuses:
            mark = "OK  " if s.ok else "FAIL"
            age = format_duration(s.age) if s.age is not None else "never"
            span = format_duration(s.span) if s.span is not None else "-"
            click.echo(f"{mark} {s.source} (tenant {s.tenant}, tier {s.tier}): newest "
                       f"{s.newest_id or '-'} age {age} / RPO {format_duration(s.rpo)}; "
                       f"in {', '.join(s.regions) or 'no region'}; {s.retained} retained "
                       f"over {span}; next run "
                       f"{s.next_run.isoformat() if s.next_run else '-'}")
            for p in s.problems:
                click.echo(f"     ! {p}")
            if s.last_failure:
                click.echo(f"     last failure {s.last_failure}: {s.last_error}")
        for r, why in region_errors.items():
            click.echo(f"! region {r} could not be listed: {why}")
        for b in standbys:
            lag = (f"{b.lag_bytes} bytes" if b.lag_bytes is not None else "? bytes") + (
                f", {format_duration(timedelta(seconds=b.lag_seconds))}"
                if b.lag_seconds is not None else "")
            click.echo(f"{'FAIL' if b.problems else 'OK  '} standby {b.name}: {b.state}, "
                       f"{'up' if b.up else 'down'}, lag {lag}")
            for p in b.problems:
                click.echo(f"     ! {p}")
        for w in warned:
            click.echo(f"WARNING: {w}", err=True)
    if not ok:
        sys.exit(1)
