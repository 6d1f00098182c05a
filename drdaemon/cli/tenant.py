"""`drctl tenant ...`: a tenant's data as a whole — where it is and who touched it
(list, show, access), the return copy (export), the end of service (offboard), legal
holds (hold, release) and erasure (erase); `restore --tenant` too. One click group,
each subcommand in its own function."""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import click

from .. import export as export_service
from .. import inventory, offboarding, tenancy
from ..erasure import erase
from ..erasure_cert import ErasureCertificate
from ..errors import DrError, UsageError
from ..keys import identities_for
from ..lifecycle import TenantState, state_name
from ..progress import ProgressLine
from ..restore import RestoreResult
from ..runtime import Runtime
from ..sources import kind_for
from ..statefs import erasure_folder
from ..units import format_bytes, format_duration, format_utc, parse_duration
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


def _parse_end(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--end {text!r}: expected a date like 2026-12-31") from None


def _return_copy(ctx: click.Context, to: Path | None, recipient: str | None,
                 identity_file: Path | None) -> offboarding.ReturnCopy | None:
    if to is None:
        if recipient:
            raise UsageError("--recipient needs --return-to DIR (the return copy it encrypts)")
        return None
    rt = get_runtime(ctx)
    identities = identities_for(rt.config, identity_file, "the return copy")
    return offboarding.ReturnCopy(to, recipient, identities)


def _show_state(s: TenantState) -> list[str]:
    lines = [f"tenant {s.tenant}: {state_name(s)}"]
    if s.end is not None and s.erase_due is not None:
        lines.append(f"  end of service {s.end.isoformat()}; erasure due "
                     f"{format_utc(s.erase_due)}")
    if s.hold is not None:
        h = s.hold
        lines.append(f"  legal hold since {format_utc(h.since)} by {h.by}@{h.host}: {h.reason}")
    return lines


@tenant_group.command("offboard")
@click.argument("tenant", metavar="NAME")
@click.option("--end", "end_text", required=True, metavar="DATE",
              help="The day the service ends (YYYY-MM-DD, from 00:00 UTC); erasure is due "
                   "28 days later.")
@click.option("--return-to", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Write the tenant's return copy there (tenant export).")
@click.option("--recipient", metavar="age1...",
              help="The customer's age public key: the return copy is encrypted to it and "
                   "no plaintext touches the disk.")
@click.option("--force", is_flag=True, help="Replace an end of service recorded before.")
@identity_option
@json_option
@click.pass_context
@handle_errors("drctl")
def tenant_offboard(ctx: click.Context, tenant: str, end_text: str, return_to: Path | None,
                    recipient: str | None, force: bool, identity_file: Path | None,
                    as_json: bool) -> None:
    """Record the end of a tenant's service: a final snapshot of each of its sources, no
    more scheduled snapshots, erasure due at the end plus 28 days. Exit 1 if a final
    snapshot failed (run it again: it finishes what failed)."""
    end = _parse_end(end_text)
    copy = _return_copy(ctx, return_to, recipient, identity_file)
    rt = get_runtime(ctx)
    lines: list[ProgressLine] = []

    def progress(source: str) -> Any:
        if as_json:
            return None
        if lines:
            lines[-1].close()
        lines.append(ProgressLine(f"final snapshot {source}"))
        return lines[-1].update

    report = offboarding.offboard(rt, tenant, end, force=force, return_copy=copy,
                                  progress=progress)
    if lines:
        lines[-1].close()
    if as_json:
        emit_json(report.to_dict())
    else:
        for out in _show_state(report.state):
            click.echo(out)
        if report.unchanged:
            click.echo("  (recorded before; unchanged)")
        for f in report.finals:
            what = ("FAILED: " + (f.error or "")) if f.error else (
                f"final snapshot {f.snapshot_id}" if f.taken
                else f"snapshot {f.snapshot_id} is newer than the end; none taken")
            click.echo(f"  {f.source}: {what}")
        click.echo("  its sources are no longer scheduled")
        if report.return_copy is not None:
            rc = report.return_copy
            click.echo(f"  return copy: {len(rc.files)} files in {rc.destination} (check: cd "
                       f"{rc.destination} && sha256sum -c SHA256SUMS)")
    if not report.ok:
        sys.exit(1)


def _output_hold(report: offboarding.HoldReport, as_json: bool) -> None:
    """Print what a hold or release did; exit 1 if a region failed."""
    if as_json:
        emit_json(report.to_dict())
    else:
        _echo_hold(report)
    if not report.ok:
        sys.exit(1)


def _echo_hold(report: offboarding.HoldReport) -> None:
    for out in _show_state(report.state):
        click.echo(out)
    verb = "held" if report.on else "released"
    for r in report.regions:
        if r.error:
            click.echo(f"  region {r.region}: FAILED: {r.error}")
        elif not r.supported:
            click.echo(f"  region {r.region}: legal hold not supported (no Object Lock); "
                       f"hold {'recorded' if report.on else 'lifted'} only in drdaemon")
        else:
            click.echo(f"  region {r.region}: {r.objects} object(s) {verb}")


@tenant_group.command("hold")
@click.argument("tenant", metavar="NAME")
@click.option("--reason", required=True, help="Why (the case, the authority): audit-logged.")
@json_option
@click.pass_context
@handle_errors("drctl")
def tenant_hold(ctx: click.Context, tenant: str, reason: str, as_json: bool) -> None:
    """Put a legal hold on a tenant: S3 legal holds on its objects in every region, prune and
    erasure suspended. Exit 1 if a region failed (the hold is recorded; run it again)."""
    _output_hold(offboarding.hold(get_runtime(ctx), tenant, reason), as_json)


@tenant_group.command("release")
@click.argument("tenant", metavar="NAME")
@json_option
@click.pass_context
@handle_errors("drctl")
def tenant_release(ctx: click.Context, tenant: str, as_json: bool) -> None:
    """Lift a tenant's legal hold in every region, then resume prune and erasure. Exit 1 if a
    region failed (the tenant stays held; run it again)."""
    _output_hold(offboarding.release(get_runtime(ctx), tenant), as_json)


def _version(v: str) -> str:
    return f" (version {v})" if v else ""


def render_erasure(cert: ErasureCertificate, state_dir: str) -> list[str]:
    """The certificate as an operator reads it; a dry run says what would happen."""
    would = cert.dry_run
    lines = [f"tenant {cert.tenant}: {'dry run, nothing changed' if would else 'erasure'} "
             f"begun {format_utc(cert.started_at)}, sources: {', '.join(cert.sources)}"]
    for k in cert.keys:
        lines.append(f"  key {k.key_id}  {k.fingerprint or 'fingerprint unknown'}"
                     + ("" if k.verified else "  (record does not match the key id)"))
    verb = "WOULD DESTROY" if would else "DESTROYED"
    lines += [f"  {verb} key copy {o.where}: {o.name}{_version(o.version_id)}"
              for o in cert.key_copies]
    verb = "WOULD DELETE" if would else "DELETED"
    lines += [f"  {verb} {o.where}: {o.name}{_version(o.version_id)} {format_bytes(o.size)}"
              for o in cert.deleted]
    lines += [f"  LOCKED {o.where}: {o.name}{_version(o.version_id)} until "
              f"{format_utc(o.retain_until)} (prune deletes it then)" for o in cert.locked]
    lines += [f"! {e}" for e in cert.errors]
    total = sum(o.size for o in cert.deleted)
    lines.append(f"{len(cert.key_copies)} key copies, {len(cert.deleted)} object versions "
                 f"({format_bytes(total)}){' would go' if would else ' gone'}, "
                 f"{len(cert.locked)} locked")
    if would:
        lines.append("dry run: nothing was changed")
        return lines
    lines.append(f"check {cert.check.summary()}")
    lines.append(f"certificate: {cert.name} in every region; JSON and HTML in "
                 f"{state_dir}/{erasure_folder(cert.tenant)}/{cert.stamp}.json|.html")
    if not cert.ok:
        lines.append(f"! erasure NOT complete: run drctl tenant erase {cert.tenant} again")
    return lines


@tenant_group.command("erase")
@click.argument("name")
@click.option("--dry-run", is_flag=True, help="List what would be destroyed, deleted or left "
              "locked; change nothing.")
@json_option
@click.pass_context
@handle_errors("drctl")
def erase_cmd(ctx: click.Context, name: str, dry_run: bool, as_json: bool) -> None:
    """Crypto-shred tenant NAME: destroy every copy of its keys (every region, every
    object version, the state folder), delete its unlocked snapshot objects, check,
    and write an erasure certificate. Resumes an interrupted erasure. Exit 1 if the
    erasure is not complete; 2 for a shared source or an unknown tenant."""
    rt = get_runtime(ctx)
    cert = erase(rt, name, dry_run=dry_run)
    if as_json:
        emit_json(cert.body())
    else:
        click.echo("\n".join(render_erasure(cert, str(rt.config.daemon.state_dir))))
    if not dry_run and not cert.ok:
        sys.exit(1)


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
        lines.append(f"{section:<10} {body if body is not None else '-'}")
    for r, why in out["region_errors"].items():
        lines.append(f"! region {r} could not be listed: {why}")
    return lines


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
