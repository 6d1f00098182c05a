"""drctl imports a command group's module only when one of its commands runs (cli.LazyGroup):
`drctl backup` must not load restore, drills, audit... before it starts pg_dump."""

from __future__ import annotations

import subprocess
import sys

import click
from click.testing import CliRunner

from drdaemon.cli.drctl import LAZY_COMMANDS
from drdaemon.cli.drctl import cli as drctl_cli

# Modules only other commands need; each was imported by `import drdaemon.cli.drctl`.
OTHER_COMMANDS = ["boto3", "drdaemon.restore", "drdaemon.drills.report", "drdaemon.key_rotation",
                  "drdaemon.cli.audit", "drdaemon.cli.prune", "drdaemon.cli.drill",
                  "drdaemon.cli.tenant", "drdaemon.cli.recovery", "drdaemon.cli.status"]


def loaded_after(code: str) -> list[str]:
    """Which of OTHER_COMMANDS a fresh interpreter has imported after running `code`."""
    probe = (f"import sys\n{code}\n"
             f"print(' '.join(m for m in {OTHER_COMMANDS!r} if m in sys.modules))")
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.split()


def test_backup_loads_no_other_command_group() -> None:
    assert loaded_after("import drdaemon.cli.drctl") == []
    # Resolving `backup` (what running it does first) loads nothing more; `restore` loads its own.
    resolve = ("import click, drdaemon.cli.drctl as d\n"
               "d.cli.get_command(click.Context(d.cli), {!r})")
    assert loaded_after(resolve.format("backup")) == []
    assert "drdaemon.restore" in loaded_after(resolve.format("restore"))


def test_help_lists_every_command_and_each_lazy_name_is_its_command() -> None:
    out = CliRunner().invoke(drctl_cli, ["--help"], obj={})
    assert out.exit_code == 0, out.output
    listed = out.output.split("Commands:", 1)[1]
    for name in ["backup", *LAZY_COMMANDS]:
        assert f"\n  {name} " in listed, f"drctl --help does not list {name}"
    ctx = click.Context(drctl_cli)
    for name in LAZY_COMMANDS:
        command = drctl_cli.get_command(ctx, name)
        assert command is not None and command.name == name, name
    keys = drctl_cli.get_command(ctx, "keys")
    assert isinstance(keys, click.Group) and "prove" in keys.list_commands(ctx)
    tenant = drctl_cli.get_command(ctx, "tenant")
    assert isinstance(tenant, click.Group) and "erase" in tenant.list_commands(ctx)
