"""`drctl restore`: one snapshot, or the latest of each of a tenant's sources."""

from __future__ import annotations

from pathlib import Path

import click

from .. import restore as restore_service
from ..errors import UsageError
from ..keys import identities_for
from ..progress import ProgressLine
from ..runtime import Runtime
from ..sources import kind_for
from ..sources.base import DATADIR
from ..sources.pg_recreate import Policy
from ..units import format_bytes
from . import emit_json, get_runtime, handle_errors, identity_option, json_option
from .tenant import restore_tenant, tenant_targets

# -- restore ----------------------------------------------------------------

@click.command("restore")
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
