"""`drctl keys`: make, rotate and rewrap key material (`keys prove` is cli/keys_prove.py)."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from pathlib import Path

import click

from .. import key_rotation
from ..errors import DrError
from ..keys import (
    describe_recipients,
    fingerprint,
    generate_identity,
    generate_manifest_key,
    identities_for,
    load_identities,
    note_unrecorded,
    unrecorded_path,
)
from ..progress import ProgressLine
from ..runtime import Runtime, record_key_generation, rotate_manifest_key, utcnow, whoami
from ..signing import generate_signing_key, public_path
from . import emit_json, get_runtime, handle_errors, json_option, require
from .keys_prove import keys_prove

# -- keys -------------------------------------------------------------------

@click.group("keys")
def keys_group() -> None:
    """Make, prove and rewrap key material."""


@keys_group.command("generate")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="Where to write the new identity (created 0600, never overwritten).")
@click.pass_context
@handle_errors("drctl")
def keys_generate(ctx: click.Context, out: str) -> None:
    """Write a new age identity and print its public recipient for [keys] recipients.

    With a config (--config or $DRDAEMON_CONFIG), the recipient and the path are
    recorded in its audit log.
    """
    path = Path(out)
    recipient = generate_identity(path)
    click.echo(recipient)
    # stdout stays the bare recipient (scripts capture it); people also need the
    # fingerprint, which manifests and "no identity" errors name the key by.
    click.echo(f"fingerprint {fingerprint(recipient)} (manifests and errors name this key "
               "by it; in the config: { recipient = \"age1...\", name = \"ops\" })", err=True)
    _audit_new_key(ctx, path, lambda rt: record_key_generation(rt, "identity", path,
                                                         recipient=recipient))


@keys_group.group("manifest-key", invoke_without_command=True)
@click.option("--out", "out", type=click.Path(dir_okay=False),
              help="Where to write the manifest key (created 0600, never overwritten).")
@click.pass_context
@handle_errors("drctl")
def keys_manifest_key(ctx: click.Context, out: str | None) -> None:
    """Write a new manifest authentication key and print its key id (`rotate`: replace
    the configured one, keeping it to verify what it signed).

    With a config (--config or $DRDAEMON_CONFIG), the key id and the path are
    recorded in its audit log.
    """
    if ctx.invoked_subcommand is not None:
        require(out is None, "--out goes after the subcommand: drctl keys manifest-key "
                             f"{ctx.invoked_subcommand} --out FILE")
        return
    require(out is not None, "drctl keys manifest-key needs --out FILE")
    path = Path(out or "")
    key_id = generate_manifest_key(path).key_id
    click.echo(key_id)
    _audit_new_key(ctx, path, lambda rt: record_key_generation(rt, "manifest-key", path,
                                                         manifest_key_id=key_id))


@keys_manifest_key.command("rotate")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the new key set (created 0600, never overwritten).")
@click.pass_context
@handle_errors("drctl")
def keys_manifest_key_rotate(ctx: click.Context, out: Path) -> None:
    """Write a new manifest key set: a new current key, and every key of [keys]
    manifest_key_file retired (they still verify what they signed). Records
    `key.rotated`; then point manifest_key_file at FILE and restart the daemon.
    Prints the new key id.
    """
    keys = rotate_manifest_key(get_runtime(ctx), out)
    click.echo(keys.key_id)
    click.echo(f"next: set [keys] manifest_key_file = \"{out.absolute()}\" and restart the "
               f"daemon; retired: {', '.join(k.key_id for k in keys.retired)}", err=True)


@keys_group.command("signing-key")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="Where to write the Ed25519 signing key (created 0600, never overwritten); "
                   "its public key goes to FILE.pub.")
@click.pass_context
@handle_errors("drctl")
def keys_signing_key(ctx: click.Context, out: str) -> None:
    """Write a new Ed25519 key for signing the audit log (set [keys] signing_key_file to it)
    and its public key (FILE.pub, for auditors); print its fingerprint.

    With a config (--config or $DRDAEMON_CONFIG), the fingerprint and the path are
    recorded in its audit log.
    """
    path = Path(out)
    key = generate_signing_key(path)
    click.echo(key.fingerprint)
    click.echo(f"public key {public_path(path)} (give it to auditors: drctl audit verify "
               "--public-key FILE)", err=True)
    _audit_new_key(ctx, path, lambda rt: record_key_generation(rt, "signing-key", path,
                                                         signing_key=key.fingerprint))


@keys_group.command("rewrap")
@click.option("--identity", "identity_files", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="age identity file (repeatable; default: [keys] identity_file): one that "
                   "opens the keys as wrapped now, and one of today's recipients.")
@json_option
@click.pass_context
@handle_errors("drctl")
def keys_rewrap(ctx: click.Context, identity_files: tuple[Path, ...], as_json: bool) -> None:
    """Wrap every tenant key again to today's [keys] recipients (after adding or removing
    an operator recipient); no snapshot is touched. Resumable: run it again after any
    interruption. Exit 1 naming each key that failed."""
    rt = get_runtime(ctx)
    identities = [i for f in identity_files for i in load_identities(f)] \
        or identities_for(rt.config, None, "rewrapping tenant keys")
    line = ProgressLine("rewrap")
    report = key_rotation.rewrap(rt, identities, lambda n, total, tenant: line.note(
        f"rewrap: tenant {n}/{total} {tenant}"))
    line.close()
    if as_json:
        emit_json(report.to_dict())
    else:
        for text in rewrap_lines(report, rt.recipient_labels()):
            click.echo(text)
    if not report.ok:
        sys.exit(1)


def rewrap_lines(report: key_rotation.RewrapReport, labels: dict[str, str]) -> list[str]:
    """The human summary of a rewrap: one line per key changed or failed, then totals."""
    lines = []
    for k in report.keys:
        if k.outcome == "rewrapped":
            lines.append(f"{k.tenant} key {k.key_id}: rewrapped in {', '.join(k.places)} "
                         f"(was: {describe_recipients(k.old_wrapped_to, labels)})")
        elif k.outcome == "failed":
            lines.append(f"{k.tenant} key {k.key_id}: FAILED: {'; '.join(k.errors)}")
    lines += [f"! {e}" for e in report.errors]
    lines += [f"{t}: passed over: {why}" for t, why in report.skipped.items()]
    lines.append(f"{report.count('rewrapped')} key(s) rewrapped, {report.count('unchanged')} "
                 f"already wrapped to today's recipients, {report.count('failed')} failed; "
                 f"recipients: {describe_recipients(report.wrapped_to, labels)}")
    return lines


def _audit_new_key(ctx: click.Context, path: Path, record: Callable[[Runtime], None]) -> None:
    """Record a key just written in the config's audit log, or say in one line why not
    and leave a note beside the key: the first config that uses it records it.

    The key exists either way, so this never changes the exit code: keys are
    often made before there is a config (or on the offline machine that keeps them).
    """
    why = "no config given (--config or $DRDAEMON_CONFIG)"
    if ctx.ensure_object(dict).get("config_path"):
        try:
            record(get_runtime(ctx))
            return
        except (DrError, OSError) as exc:
            why = str(exc)
    try:
        note_unrecorded(path, utcnow(), whoami(), socket.gethostname())
    except (DrError, OSError) as exc:  # e.g. a stale note of a key removed since
        click.echo(f"note: not recorded in an audit log: {why}; nor noted beside the key: "
                   f"{exc}", err=True)
        return
    click.echo(f"note: not recorded in an audit log yet: {why}; the first config that uses "
               f"this key records it ({unrecorded_path(path).name} beside it until then)",
               err=True)


keys_group.add_command(keys_prove)
