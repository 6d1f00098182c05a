"""`drctl tenant`: a tenant's lifecycle. `erase` -> erasure.erase -> the certificate."""

from __future__ import annotations

import sys

import click

from ..erasure import erase
from ..erasure_cert import ErasureCertificate
from ..statefs import erasure_folder
from ..units import format_bytes, format_utc
from . import emit_json, get_runtime, handle_errors, json_option


@click.group("tenant")
def tenant_group() -> None:
    """A tenant's data: erase it (crypto-shred)."""


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
