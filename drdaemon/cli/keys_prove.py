"""`drctl keys prove`: show that an identity (ops or escrow) opens what it must."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .. import key_proof
from ..keys import identities_for
from . import emit_json, get_runtime, handle_errors, identity_option, json_option


@click.command("prove")
@identity_option
@json_option
@click.pass_context
@handle_errors("drctl")
def keys_prove(ctx: click.Context, identity_file: Path | None, as_json: bool) -> None:
    """Show that the identity unwraps every tenant key in every region and opens the age
    header of each source's newest single-key snapshot (no download); record the result
    per recipient in the audit log. Exit 1 naming everything it cannot open.

    The escrow custodian runs this on the offline machine against a read-only copy of the
    config; the record reaches the daemon through the audit log's copies in the regions.
    """
    rt = get_runtime(ctx)
    identities = identities_for(rt.config, identity_file, "proving a recipient")
    proof = key_proof.prove(rt, identities)
    if as_json:
        emit_json(proof.to_dict())
    else:
        for r in proof.recipients:
            state = "OK" if r.ok else "FAILED"
            click.echo(f"{r.name} ({r.fingerprint}): {state} — opened {r.keys_opened} "
                       f"wrapped tenant key(s) and {r.snapshots_opened} snapshot header(s)")
            for failure in r.failures:
                click.echo(f"  cannot open {failure}")
    if not proof.ok:
        sys.exit(1)
