"""`drctl tenant ...`: a tenant's data as a whole — where it is and who touched it
(list, show, access), the return copy (export); `restore --tenant` too. One click group,
each subcommand in its own function; the lifecycle commands (offboard, hold, release,
erase) join it from cli/tenant_lifecycle.py."""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from .. import export as export_service
from .. import inventory, tenancy
from ..errors import DrError, UsageError
from ..keys import identities_for
from ..progress import ProgressLine
from ..restore import RestoreResult
from ..runtime import Runtime
from ..sources import kind_for
from ..units import format_bytes, format_duration, parse_duration
from . import emit_json, get_runtime, handle_errors, identity_option, json_option


@click.group("tenant")
def tenant_group() -> None:
    """A tenant's data as a whole: where it is, who touched it, the return copy,
    offboarding, legal hold, erasure."""


@tenant_group.command("export")
@click.argument("tenant", metavar="NAME")
@click.option("--to", "dest", required=True, metavar="DIR",
              type=click.Path(path_type=Path),
              help="A new or empty folder (no entries at all) to write the copy to.")
@click.option("--recipient", metavar="age1...",
              help="The customer's age public key: every file holding the tenant's data is "
                   "encrypted to it and no plaintext touches the disk.")
@click.option("--snapshot", "snapshot_ids", multiple=True, metavar="ID",
              help="Export this snapshot of its source instead of the newest complete one "
                   "(repeatable, one per source; it must belong to one of the tenant's "
                   "sources).")
@click.option("--without-shared", is_flag=True,
              help="Leave out the shared sources (several tenants' data, never exported) "
                   "instead of refusing.")
@identity_option
@json_option
@click.pass_context
@handle_errors("drctl")
def tenant_export(ctx: click.Context, tenant: str, dest: Path, recipient: str | None,
                  snapshot_ids: tuple[str, ...], without_shared: bool,
                  identity_file: Path | None, as_json: bool) -> None:
    """Write the tenant's return copy: each source's snapshot (pg_dump archive or tar),
    decrypted and verified, with MANIFEST.json, SHA256SUMS and README.txt."""
    rt = get_runtime(ctx)
    identities = identities_for(rt.config, identity_file, "tenant export")
    line = ProgressLine(f"export {tenant}")
    try:
        result = export_service.export(rt, identities, tenant, dest, recipient=recipient,
                                       snapshot_ids=snapshot_ids, without_shared=without_shared,
                                       on_progress=line.update)
    finally:
        line.close()
    if as_json:
        emit_json(result.to_dict())
        return
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    for s in result.sources:
        click.echo(f"{s.source}: snapshot {s.snapshot_id} from region {s.region} -> "
                   f"{s.stored_as} ({format_bytes(s.size)})")
    enc = (f", encrypted to {result.recipient_fingerprint}"
           if result.recipient_fingerprint else "")
    click.echo(f"exported tenant {result.tenant} to {result.destination} "
               f"({len(result.files)} files{enc}; check: cd {result.destination} && "
               "sha256sum -c SHA256SUMS)")


@tenant_group.command("list")
@json_option
@click.pass_context
@handle_errors("drctl")
def tenant_list_cmd(ctx: click.Context, as_json: bool) -> None:
    """Tenants and their sources, and what storage holds that the config no longer names
    (unmanaged sources, with bytes and age). Exit 1 if a region cannot be listed."""
    rt = get_runtime(ctx)
    inv = inventory.take(rt)
    out = inventory.tenant_list(rt, inv)
    if as_json:
        emit_json(out)
    else:
        for t in out["tenants"]:
            where = (f"residency {_residency(t['residency'])}" if t["residency"]
                     else "every region")
            click.echo(f"{t['tenant']} (tier {t['tier'] or 'per source'}, {where}"
                       f"{', implicit' if t['implicit'] else ''}): "
                       f"{', '.join(t['sources']) or 'no source'}; {format_bytes(t['bytes'])}")
        for h in out["unmanaged"]:
            age = (format_duration_s(h["age_seconds"]) if h["age_seconds"] is not None
                   else "unknown age")
            click.echo(f"UNMANAGED {h['source']} (tenant {h['tenant'] or 'unknown'}): "
                       f"{format_bytes(h['bytes'])} in {', '.join(h['bytes_by_region'])}, "
                       f"{h['snapshots']} snapshot(s), newest {age} old")
        for r, why in out["region_errors"].items():
            click.echo(f"! region {r} could not be listed: {why}", err=True)
    if out["region_errors"]:
        sys.exit(1)


def _residency(res: dict[str, list[str]]) -> str:
    """A residency's `to_dict` as one phrase: its continents or its regions."""
    return ", ".join(name for names in res.values() for name in names)


def format_duration_s(seconds: float) -> str:
    return format_duration(timedelta(seconds=seconds))


@tenant_group.command("show")
@click.argument("name")
@json_option
@click.pass_context
@handle_errors("drctl")
def tenant_show_cmd(ctx: click.Context, name: str, as_json: bool) -> None:
    """One tenant: tier, residency, sources, the regions and continents holding its
    copies, snapshot count and span, and the sections other commands add (keys,
    offboarding). Exit 1 if a region cannot be listed."""
    rt = get_runtime(ctx)
    out = inventory.tenant_show(rt, name, inventory.take(rt))
    if as_json:
        emit_json(out)
    else:
        for line in show_lines(out):
            click.echo(line)
    if out["region_errors"]:
        sys.exit(1)


def show_lines(out: dict[str, Any]) -> list[str]:
    res = out["residency"]
    lines = [f"tenant     {out['tenant']}"
             + ("" if out["configured"] else " (not in [[tenants]])"),
             f"tier       {out['tier'] or 'per source'}",
             f"residency  {_residency(res) if res else 'none (every region)'}"
             f"; allowed regions {', '.join(out['allowed_regions']) or '-'}",
             f"sources    {', '.join(out['sources']) or '-'}"
             + (f" (shared: {', '.join(out['shared_sources'])})" if out["shared_sources"]
                else ""),
             f"copies in  {', '.join(out['regions']) or 'no region'} "
             f"({', '.join(out['continents']) or '-'})",
             f"snapshots  {out['snapshots']} from {out['oldest'] or '-'} to "
             f"{out['newest'] or '-'}; {format_bytes(out['bytes'])}"]
    if out["unmanaged_sources"]:
        lines.append(f"UNMANAGED  {', '.join(out['unmanaged_sources'])} (in storage, not in "
                     "the config)")
    for section, body in out["sections"].items():
        if section == "keys" and body:
            lines += _key_lines(body)
        else:
            lines.append(f"{section:<10} {body if body is not None else '-'}")
    for r, why in out["region_errors"].items():
        lines.append(f"! region {r} could not be listed: {why}")
    return lines


def _key_lines(body: dict[str, Any]) -> list[str]:
    """One line per tenant key; the current one (new snapshots use it) marked."""
    return [f"{'key':<10} {k['key_id']} {'current' if k.get('current') else 'older  '} "
            f"created {k['created'] or '?'}; wrapped to {', '.join(k['wrapped_to']) or '?'}; "
            f"copies in {', '.join(k['wrapped_copies']) or 'none'}" for k in body["keys"]] \
        + [f"! keys in region {r} could not be read: {why}"
           for r, why in body.get("unreachable", {}).items()]


@tenant_group.command("access")
@click.argument("name")
@click.option("--since", default="30d", show_default=True, metavar="DURATION",
              help="Only records newer than this (e.g. 72h, 30d).")
@json_option
@click.pass_context
@handle_errors("drctl")
def tenant_access_cmd(ctx: click.Context, name: str, since: str, as_json: bool) -> None:
    """Every audit record that touched the tenant's data (backups, restores, exports,
    drills, verifies, key unwraps, erasure) with time, user and host, oldest first.
    Exit 1 if the audit log does not verify."""
    try:
        age = parse_duration(since)
    except ValueError as exc:
        raise UsageError(f"--since: {exc}") from None
    rt = get_runtime(ctx)
    records, check = inventory.tenant_access(rt, name, age)
    if as_json:
        emit_json({"tenant": name, "since": since, "records": records,
                   "log_verified": check.ok, "log": check.to_dict()})
    else:
        for r in records:
            what = " ".join(f"{k}={r[k]}" for k in ("source", "snapshot_id", "region", "target")
                            if r.get(k) is not None)
            click.echo(f"{r.get('time')}  {r.get('event'):<22} {r.get('user') or '?'}@"
                       f"{r.get('host') or '?'}  {what}")
        if not check.ok:
            click.echo(f"! the audit log does not verify: record {check.first_bad}: "
                       f"{check.reason}", err=True)
    if not check.ok:
        sys.exit(1)


# -- restore --tenant (the restore command itself is in drctl.py) --------------------

def tenant_targets(rt: Runtime, tenant: str, snapshot: str, target: str,
                   db_target: str | None) -> dict[str, str]:
    """Each of the tenant's sources -> its restore target, from the --to (and, for
    postgres sources, --to-db) template with {source}."""
    if snapshot != "latest":
        raise UsageError("with --tenant, restore takes 'latest' (each source has its own "
                         "snapshot ids; restore one with --source)")
    sources = tenancy.pick(rt.config, tenant)
    if not sources:
        raise UsageError(f"tenant {tenant!r} has no configured source")
    out: dict[str, str] = {}
    for src in sources:
        database = kind_for(src.kind).target_noun == "database"
        template = db_target if database and db_target else target
        if "{source}" not in template:
            raise UsageError(f"with --tenant, the target must hold {{source}} (got "
                             f"{template!r}), e.g. '/srv/restore/{{source}}' or "
                             "'{source}_restored'")
        if database and "/" in template and "=" not in template:
            raise UsageError(f"{template!r} looks like a folder, and source {src.name} is a "
                             "database: give --to-db TEMPLATE (e.g. '{source}_restored')")
        out[src.name] = template.replace("{source}", src.name)
    if len(set(out.values())) < len(out):
        raise UsageError("the target template gives two sources the same target")
    return out


def restore_tenant(targets: dict[str, str], one: Callable[[str], RestoreResult],
                   as_json: bool) -> None:
    """Restore each source into its target; one failure never stops the others."""
    results: list[dict[str, Any]] = []
    for name, target in targets.items():
        try:
            r = one(name)
        except DrError as exc:
            results.append({"source": name, "target": target, "ok": False, "error": str(exc)})
            if not as_json:
                click.echo(f"{name}: FAILED: {exc}", err=True)
            continue
        results.append(dict(r.to_dict(), ok=True))
        if not as_json:
            for note in r.notes:
                click.echo(f"note: {note}", err=True)
            click.echo(f"restored {r.snapshot_id} of {r.source} from region {r.region} to "
                       f"{r.target} ({format_bytes(r.bytes)} in {r.seconds:.1f}s)")
    if as_json:
        emit_json(results)
    if not all(r["ok"] for r in results):
        sys.exit(1)
