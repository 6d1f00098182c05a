"""drctl: the operator's command line. Each command maps options to a service call."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import click

from .. import backup as backup_service
from .. import key_rotation, tenancy
from .. import restore as restore_service
from ..errors import DrError, UsageError
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
from ..sources import kind_for, pg_roles
from ..sources.base import DATADIR
from ..sources.directory import facts_lines
from ..sources.pg_recreate import Policy
from ..sources.tree_extract import interpreter_note
from ..units import format_bytes
from . import (
    chosen_sources,
    emit_json,
    get_config,
    get_runtime,
    handle_errors,
    identity_option,
    json_option,
    require,
    root_group,
    tenant_option,
)
from .tenant import restore_tenant, tenant_group, tenant_targets

cli = root_group("Operate drdaemon: back up, list, restore and check snapshots.")


# -- config -----------------------------------------------------------------

@cli.group("config")
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


# -- keys -------------------------------------------------------------------

@cli.group("keys")
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


# -- backup -----------------------------------------------------------------

@cli.command("backup")
@click.option("--source", "sources", multiple=True, metavar="NAME",
              help="Source to snapshot (repeatable; default: all).")
@tenant_option
@click.option("--accept-shrink", is_flag=True,
              help="Commit even if a source shrank sharply against its newest snapshot "
                   "(max_shrink); only once you know the shrink is real. Needs --source.")
@json_option
@click.pass_context
@handle_errors("drctl")
def backup_cmd(ctx: click.Context, sources: tuple[str, ...], tenant: str | None,
               accept_shrink: bool, as_json: bool) -> None:
    """Take a snapshot now. Exit 1 if any source failed or is degraded."""
    rt = get_runtime(ctx)
    chosen = rt.config.pick_sources(chosen_sources(rt.config, sources, tenant))
    if not chosen:
        raise UsageError(f"{rt.config.path} configures no sources")
    if accept_shrink and not sources:
        # Confirming a shrink is a decision about one source, never a blanket switch.
        raise UsageError("--accept-shrink needs --source NAME: confirm each source's shrink")
    results = []
    # Several sources: one audit mirror per region for the run (and one a minute in a
    # long run), not a LIST and a PUT per region after every snapshot (Runtime.audit_batch).
    # One source: each record is mirrored as it is made, as always.
    with rt.audit_batch() if len(chosen) > 1 else contextlib.nullcontext():
        for src in chosen:
            line = ProgressLine(f"backup {src.name}")
            results.append(backup_service.snapshot(rt, src, line.update,
                                                   accept_shrink=accept_shrink))
            line.close()
    if as_json:
        emit_json([r.to_dict() for r in results])
    else:
        for r in results:
            if r.ok and r.manifest is not None:
                state = "DEGRADED" if r.degraded else "ok"
                click.echo(f"{r.source}: {state} snapshot {r.snapshot_id} "
                           f"({format_bytes(r.manifest.plaintext_size)} -> "
                           f"{format_bytes(r.manifest.size)}) in {', '.join(r.regions)}")
                for said in facts_lines(r.manifest.facts):
                    click.echo(f"  {said}")
            else:
                click.echo(f"{r.source}: FAILED: {r.error}")
            for region, why in r.failed_regions.items():
                click.echo(f"  region {region} failed: {why}")
    if not all(r.ok and not r.degraded for r in results):
        sys.exit(1)


# -- restore ----------------------------------------------------------------

@cli.command("restore")
@click.argument("snapshot", metavar="ID|latest")
@click.option("--source", metavar="NAME",
              help="Source the snapshot belongs to (or --tenant).")
@click.option("--tenant", metavar="NAME",
              help="Restore 'latest' of each of the tenant's sources; --to is then a template "
                   "with {source} (e.g. '/srv/restore/{source}', '{source}_restored').")
@click.option("--to", "target", metavar="TARGET",
              help="postgres: a new database name on the source's server, or a DSN; "
                   "directory: a new or empty folder. With --tenant: a template with {source}.")
@click.option("--to-datadir", "datadir", metavar="DIR",
              help="postgres-cluster: a new or empty folder for the restored data directory "
                   "(made 0700, given to the server's OS user).")
@click.option("--start", "start", is_flag=True,
              help="postgres-cluster: start the restored cluster with pg_ctl on 127.0.0.1 "
                   "at --port.")
@click.option("--port", type=click.IntRange(1, 65535), metavar="N",
              help="postgres-cluster: the port for --start.")
@click.option("--owner", metavar="USER",
              help="postgres-cluster, as root: the unprivileged OS user that owns and runs "
                   "the restored cluster (default: the source's os_user, else postgres).")
@click.option("--to-db", "db_target", metavar="TEMPLATE",
              help="With --tenant: the template for its postgres sources (default: --to), "
                   "e.g. '{source}_restored' beside --to '/srv/restore/{source}'.")
@click.option("--region", metavar="NAME",
              help="Restore from this region only (default: each region in turn).")
@click.option("--force", is_flag=True, help="Replace a non-empty existing database.")
@click.option("--no-owner", is_flag=True,
              help="postgres: for a target without the snapshot's roles: pg_restore "
                   "--no-owner --no-privileges (objects belong to the restoring role, no "
                   "GRANT/REVOKE). List the roles a snapshot needs: "
                   "runbooks/restore-one-database.md.")
@click.option("--with-roles", is_flag=True,
              help="postgres: first create the roles the snapshot names that the target "
                   "server lacks (with their password hashes and memberships; existing roles "
                   "are left alone), then restore with owners and privileges.")
@click.option("--allow-older", is_flag=True,
              help="With 'latest': if the newest snapshot cannot be read in any region, "
                   "restore the newest readable one (and say which) instead of refusing.")
@identity_option
@click.option("--jobs", type=click.IntRange(min=1), metavar="N",
              help="postgres: pg_restore with N parallel jobs from a verified, private "
                   "scratch copy of the dump (needs its plaintext size of free disk).")
@click.option("--scratch-dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Folder for the --jobs scratch copy (default: <state_dir>/restore).")
@click.option("--skip-missing-roles", is_flag=True,
              help="postgres: where the target lacks a role the database's owner, privileges "
                   "or settings name, restore the rest and list what was skipped.")
@click.option("--skip-missing-locale", is_flag=True,
              help="postgres: where the target cannot create the recorded encoding/locale, "
                   "use the server's defaults and say so.")
@json_option
@click.pass_context
@handle_errors("drctl")
def restore_cmd(ctx: click.Context, snapshot: str, source: str | None, tenant: str | None,
                target: str | None, datadir: str | None, start: bool, port: int | None,
                owner: str | None, db_target: str | None, region: str | None, force: bool,
                allow_older: bool, no_owner: bool, with_roles: bool,
                identity_file: Path | None,
                jobs: int | None, scratch_dir: Path | None, skip_missing_roles: bool,
                skip_missing_locale: bool, as_json: bool) -> None:
    """Restore a snapshot, verified end to end, falling back to other regions.

    With --tenant: the latest snapshot of each of the tenant's sources, each into
    the target its --to (or, for postgres, --to-db) template names; one failing
    source never stops the others, exit 1 if any failed.
    """
    rt = get_runtime(ctx)
    if (source is None) == (tenant is None):
        raise UsageError("give --source NAME or --tenant NAME (one of the two)")
    if start != (port is not None):
        raise UsageError("--start and --port N go together")
    if source is not None:
        target = datadir_target(rt, source, target, datadir)
    elif datadir is not None or target is None:
        raise UsageError("with --tenant give --to TEMPLATE (--to-datadir is for one source)")
    targets = ({source: target} if source is not None else
               tenant_targets(rt, tenant or "", snapshot, target, db_target))
    identities = identities_for(rt.config, identity_file, "restore")

    def one(name: str) -> restore_service.RestoreResult:
        line = ProgressLine(f"restore {name}")
        try:
            return restore_service.restore(rt, identities, name, snapshot, targets[name],
                                           region=region, force=force, no_owner=no_owner,
                                           with_roles=with_roles,
                                           jobs=jobs, scratch_dir=scratch_dir,
                                           on_progress=line.update, allow_older=allow_older,
                                           policy=Policy(skip_missing_roles,
                                                         skip_missing_locale),
                                           start_port=port, owner=owner)
        finally:
            line.close()

    if tenant is not None:
        restore_tenant(targets, one, as_json)
        return
    result = one(source or "")
    if as_json:
        emit_json(result.to_dict())
        return
    for r, why in result.failed_regions.items():
        click.echo(f"region {r} skipped: {why}", err=True)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"restored {result.snapshot_id} of {result.source} from region {result.region} "
               f"to {result.target} ({format_bytes(result.bytes)} in {result.seconds:.1f}s)")


def datadir_target(rt: Runtime, source: str, target: str | None, datadir: str | None) -> str:
    """The target of one source's restore: --to, or --to-datadir for a kind whose target
    is a data directory (and only for one)."""
    wants_datadir = kind_for(rt.config.source(source).kind).target_noun == DATADIR
    if (target is None) == (datadir is None):
        raise UsageError("give --to-datadir DIR" if wants_datadir else "give --to TARGET")
    if wants_datadir != (datadir is not None):
        raise UsageError(f"source {source}: give --to-datadir DIR" if wants_datadir else
                         "--to-datadir applies to data directory sources only; give --to")
    return datadir or target or ""


from .status import status_cmd  # noqa: E402 - registered after the group exists

cli.add_command(status_cmd)


def _interrupted(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Console-script entry point."""
    # SIGTERM ends drctl as Ctrl-C does: what it started is cleaned up on the
    # way out (uploads aborted, staging removed, pg_dump and its sessions ended).
    signal.signal(signal.SIGTERM, _interrupted)
    cli(obj={})


from .replicate import replicate_cmd, verify_cmd  # noqa: E402 - registered after the group exists

cli.add_command(replicate_cmd)
cli.add_command(verify_cmd)

from .prune import prune_cmd  # noqa: E402 - registered after the group exists

cli.add_command(prune_cmd)

from .audit import audit_group  # noqa: E402 - registered after the group exists

cli.add_command(audit_group)

from .drill import drill_group  # noqa: E402 - registered after the group exists

cli.add_command(drill_group)

from .snapshots import snapshots_group  # noqa: E402 - registered after the group exists

cli.add_command(snapshots_group)

# The tenant commands (cli/tenant.py): list, show, access, export; offboard, hold,
# release, erase join the group from cli/tenant_lifecycle.py. tenant_group is imported
# at the top (restore --tenant uses the module).
from . import tenant_lifecycle  # noqa: E402,F401 - registers its commands on tenant_group

cli.add_command(tenant_group)

from .keys_prove import keys_prove  # noqa: E402 - registered after the group exists
from .recovery import recovery_group  # noqa: E402 - registered after the group exists

cli.add_command(recovery_group)
keys_group.add_command(keys_prove)
