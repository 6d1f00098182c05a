"""drdaemon: the long-running scheduler, and with [cluster] the queue's worker."""

from __future__ import annotations

import click

from ..scheduler import end_stray_threads, run_daemon
from . import get_runtime, handle_errors, root_group

cli = root_group("The drdaemon scheduler.")


@cli.command("run")
@click.option("--once", is_flag=True,
              help="Snapshot every source that is due (outside its RPO), then exit.")
@click.pass_context
@handle_errors("drdaemon")
def run_cmd(ctx: click.Context, once: bool) -> None:
    """Run the schedule: snapshot overdue sources now, then each on its cron.

    With a [cluster] table, the one active scheduler of the cluster defers the jobs to
    the job queue (and this process works on them too); --once still snapshots here."""
    rt = get_runtime(ctx)
    if rt.config.cluster is not None and not once:
        from ..cluster.daemon import run_scheduler

        run_scheduler(rt)
    else:
        run_daemon(rt, once=once)
    end_stray_threads()


@cli.command("worker")
@click.pass_context
@handle_errors("drdaemon")
def worker_cmd(ctx: click.Context) -> None:
    """Take snapshot, drill and verify jobs from the [cluster] job queue until stopped."""
    from ..cluster.daemon import run_worker

    run_worker(get_runtime(ctx))
    end_stray_threads()


def main() -> None:
    """Console-script entry point."""
    cli(obj={})
