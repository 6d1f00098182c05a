"""drdaemon: the long-running scheduler."""

from __future__ import annotations

import click

from ..scheduler import run_daemon
from . import config_option, get_runtime, handle_errors


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@click.version_option(package_name="drdaemon")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """The drdaemon scheduler."""
    ctx.ensure_object(dict)["config_path"] = config_path


@cli.command("run")
@click.option("--once", is_flag=True,
              help="Snapshot every source that is due (outside its RPO), then exit.")
@click.pass_context
@handle_errors("drdaemon")
def run_cmd(ctx: click.Context, once: bool) -> None:
    """Run the schedule: snapshot overdue sources now, then each on its cron."""
    run_daemon(get_runtime(ctx), once=once)


def main() -> None:
    """Console-script entry point."""
    cli(obj={})
