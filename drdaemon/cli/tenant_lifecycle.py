"""`drctl tenant offboard|hold|release|erase`: a tenant's lifecycle - the end of
service (with its return copy), legal holds and erasure. These commands join the
`tenant` click group of cli/tenant.py."""

from __future__ import annotations

import sys
from datetime import date
from pathlib import Path
from typing import Any

import click

from .. import key_rotation, offboarding
from ..erasure import erase
from ..erasure_cert import ErasureCertificate
from ..errors import UsageError
from ..keys import identities_for
from ..lifecycle import TenantState, state_name
from ..progress import ProgressLine
from ..statefs import erasure_folder
from ..units import format_bytes, format_utc
from . import emit_json, get_runtime, handle_errors, identity_option, json_option
from .tenant import tenant_group


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


@tenant_group.command("rotate-key")
@click.argument("tenant", metavar="NAME")
@json_option
@click.pass_context
@handle_errors("drctl")
def tenant_rotate_key(ctx: click.Context, tenant: str, as_json: bool) -> None:
    """Start a new key for the tenant's future snapshots (after a suspected exposure).
    Older snapshots keep opening with their own key until they are pruned; erasure
    destroys every key. Audit-logged."""
    r = key_rotation.rotate_key(get_runtime(ctx), tenant)
    if as_json:
        emit_json(r.to_dict())
        return
    click.echo(f"tenant {r.tenant}: new key {r.key_id} (fingerprint {r.fingerprint}) is used "
               f"from the next backup on; kept for older snapshots: {', '.join(r.old_key_ids)}")


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
