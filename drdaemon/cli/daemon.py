"""drdaemon: the long-running scheduler."""

from __future__ import annotations

import click

from ..scheduler import run_daemon
from . import get_runtime, handle_errors, root_group

cli = root_group("The drdaemon scheduler.")


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
