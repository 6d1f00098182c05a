"""`drctl snapshots list|show`: the committed snapshots, the regions that hold each,
and one snapshot's manifest and facts."""

from __future__ import annotations

import sys

import click

from .. import catalog, tenancy
from .. import facts as facts_object
from ..errors import DrError, UsageError
from ..manifest import Manifest
from ..runtime import Runtime
from ..sources.directory import facts_lines
from ..units import format_bytes, format_duration
from . import chosen_sources, emit_json, get_runtime, handle_errors, json_option, tenant_option


@click.group("snapshots")
def snapshots_group() -> None:
    """List and inspect snapshots."""


@snapshots_group.command("list")
@click.option("--source", metavar="NAME", help="Only this source.")
@tenant_option
@click.option("--region", metavar="NAME", help="Only this region.")
@json_option
@click.pass_context
@handle_errors("drctl")
def snapshots_list(ctx: click.Context, source: str | None, tenant: str | None,
                   region: str | None, as_json: bool) -> None:
    """List committed snapshots and the regions that hold each."""
    rt = get_runtime(ctx)
    names = chosen_sources(rt.config, [source] if source else [], tenant)
    listing = catalog.list_snapshots(rt, names[0] if names and len(names) == 1 else None,
                                     region)
    if names is not None:
        listing.snapshots = [e for e in listing.snapshots if e.source in names]
    all_regions = [region] if region else [r.name for r in rt.config.regions]
    known = tenancy.homes(rt.config)

    def home(e: catalog.SnapshotEntry) -> list[str]:
        """The regions the entry belongs in: its tenant's residency (tenancy.py)."""
        allowed = tenancy.regions_for_name(rt.config, e.source,
                                           e.manifest.tenant if e.manifest else None, known)
        return [r for r in all_regions if r in allowed]

    if as_json:
        emit_json({"snapshots": [e.to_dict(home(e)) for e in listing.snapshots],
                   "region_errors": listing.region_errors})
    else:
        click.echo(f"{'SOURCE':<20} {'ID':<26} {'CONSISTENT AT (UTC)':<20} {'SIZE':>10}  REGIONS")
        for e in listing.snapshots:
            m = e.manifest
            when = m.consistency_time.strftime("%Y-%m-%d %H:%M:%S") if m else "UNREADABLE"
            size = format_bytes(m.size) if m else "?"
            missing = [r for r in home(e) if r not in e.regions]
            where = ", ".join(e.regions) + (f"  (missing: {', '.join(missing)})"
                                            if missing else "")
            click.echo(f"{e.source:<20} {e.id:<26} {when:<20} {size:>10}  {where}")
            for r, why in e.problems.items():
                click.echo(f"  ! {r}: {why}")
        for r, why in listing.region_errors.items():
            click.echo(f"! region {r} could not be listed: {why}", err=True)
        for e in listing.unreadable:
            click.echo(f"! snapshot {e.id} of {e.source} cannot be read in any region",
                       err=True)
    if listing.region_errors or listing.unreadable:
        sys.exit(1)


@snapshots_group.command("show")
@click.argument("snapshot_id")
@click.option("--source", metavar="NAME", help="Source of the snapshot (default: search all).")
@json_option
@click.pass_context
@handle_errors("drctl")
def snapshots_show(ctx: click.Context, snapshot_id: str, source: str | None,
                   as_json: bool) -> None:
    """Show one snapshot's manifest (SNAPSHOT_ID may be 'latest' with --source)."""
    rt = get_runtime(ctx)
    if snapshot_id == "latest" and not source:
        raise UsageError("'latest' needs --source")
    names = [source] if source else [s.name for s in rt.config.sources]
    entry = None
    for name in names:
        try:
            entry = catalog.resolve(rt, name, snapshot_id)
            break
        except UsageError:
            if len(names) == 1:
                raise
    if entry is None or entry.manifest is None:
        raise UsageError(f"no snapshot {snapshot_id} of any source in any region")
    m = entry.manifest
    regions = tenancy.regions_for_name(rt.config, m.source, m.tenant)
    body = m.body()
    body["regions"] = entry.regions
    body["missing_regions"] = [r for r in regions if r not in entry.regions]
    # Version 2 keeps per-table facts in their own object: shown as if inline.
    body["facts"] = _full_facts(rt, entry.regions, m)
    if as_json:
        emit_json(body)
        return
    click.echo(f"snapshot   {m.id}\nsource     {m.source} ({m.kind}, tenant {m.tenant}, "
               f"tier {m.tier})\nconsistent {m.consistency_time.isoformat()}\n"
               f"took       {format_duration(m.finished_at - m.started_at)}\n"
               f"sizes      {format_bytes(m.plaintext_size)} plain, "
               f"{format_bytes(m.compressed_size)} zstd-{m.zstd_level}, "
               f"{format_bytes(m.size)} stored\nsha256     {m.sha256}\n"
               f"object     {m.data_name}\nrecipients {', '.join(m.recipients)}\n"
               f"regions    {', '.join(entry.regions)}"
               + (f" (missing: {', '.join(body['missing_regions'])})"
                  if body["missing_regions"] else ""))
    tables = body["facts"].get("tables")
    if isinstance(tables, list):
        rows = sum(int(t.get("rows", 0)) for t in tables if isinstance(t, dict))
        click.echo(f"tables     {len(tables)} ({rows} rows)")
    for said in facts_lines(m.facts, shown=50):
        click.echo(f"           {said}")


def _full_facts(rt: Runtime, regions: list[str], m: Manifest) -> dict[str, object]:
    """Every fact of `m`, its facts object read from the first region that has a good one."""
    problems = []
    for name in regions:
        try:
            return facts_object.full_facts(rt.store(name), m)
        except DrError as exc:
            problems.append(str(exc))
    raise DrError(f"facts object of snapshot {m.id} cannot be read: " + "; ".join(problems))
