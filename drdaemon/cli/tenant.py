"""`drctl tenant ...`: a tenant's data as a whole (the return copy: `tenant export`)."""

from __future__ import annotations

from pathlib import Path

import click

from .. import export as export_service
from ..keys import identities_for
from ..progress import ProgressLine
from ..units import format_bytes
from . import emit_json, get_runtime, handle_errors, identity_option, json_option


@click.group("tenant")
def tenant_group() -> None:
    """A tenant's data as a whole: the return copy."""


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
@identity_option
@json_option
@click.pass_context
@handle_errors("drctl")
def tenant_export(ctx: click.Context, tenant: str, dest: Path, recipient: str | None,
                  snapshot_ids: tuple[str, ...], identity_file: Path | None,
                  as_json: bool) -> None:
    """Write the tenant's return copy: each source's snapshot (pg_dump archive or tar),
    decrypted and verified, with MANIFEST.json, SHA256SUMS and README.txt."""
    rt = get_runtime(ctx)
    identities = identities_for(rt.config, identity_file, "tenant export")
    line = ProgressLine(f"export {tenant}")
    try:
        result = export_service.export(rt, identities, tenant, dest, recipient=recipient,
                                       snapshot_ids=snapshot_ids, on_progress=line.update)
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
