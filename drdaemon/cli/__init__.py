"""Command-line entry points; thin shells over the services."""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from .. import tenancy
from ..config import Config
from ..errors import DrError, UsageError
from ..runtime import Runtime, load_config, open_runtime

F = TypeVar("F", bound=Callable[..., Any])

config_option = click.option(
    "--config", "config_path", metavar="PATH", envvar="DRDAEMON_CONFIG",
    help="Config file (default: $DRDAEMON_CONFIG, else the embedded demo config).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
tenant_option = click.option(
    "--tenant", metavar="NAME",
    help="Only this tenant's sources (its own and the shared ones holding its data).")
identity_option = click.option(
    "--identity", "identity_file", type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE", help="age identity file (default: [keys] identity_file).")


def emit_json(data: Any) -> None:
    """JSON output is the stable interface for scripts."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def handle_errors(prog: str) -> Callable[[F], F]:
    """Map our errors to one stderr line and exit codes: 2 usage/config, 1 failure."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except UsageError as exc:
                click.echo(f"{prog}: error: {exc}", err=True)
                sys.exit(2)
            except DrError as exc:
                click.echo(f"{prog}: error: {exc}", err=True)
                sys.exit(1)
            except KeyboardInterrupt:
                click.echo(f"{prog}: interrupted", err=True)
                sys.exit(130)
            except Exception as exc:
                if os.environ.get("DRDAEMON_DEBUG"):
                    raise
                click.echo(f"{prog}: internal error: {exc.__class__.__name__}: {exc} "
                           "(set DRDAEMON_DEBUG=1 for a traceback)", err=True)
                sys.exit(1)

        return run  # type: ignore[return-value]

    return wrap


def get_config(ctx: click.Context, *, key_files: bool = True) -> Config:
    """Load (once per invocation) and validate the config; print its warnings.
    `key_files=False`: the key files need not exist (a check that reads no secret)."""
    obj = ctx.ensure_object(dict)
    if "config" not in obj:
        cfg = load_config(obj.get("config_path"), key_files=key_files)
        for warning in cfg.warnings:
            click.echo(warning, err=True)
        obj["config"] = cfg
    config: Config = obj["config"]
    return config


def get_runtime(ctx: click.Context) -> Runtime:
    """The opened runtime (stores, manifest key) for this invocation."""
    obj = ctx.ensure_object(dict)
    if "runtime" not in obj:
        obj["runtime"] = open_runtime(get_config(ctx))
    runtime: Runtime = obj["runtime"]
    return runtime


def chosen_sources(cfg: Config, sources: Sequence[str], tenant: str | None) -> list[str] | None:
    """--source NAME... and --tenant NAME as source names (None: every source).

    An unknown tenant, a tenant with no source, or a --source of another tenant
    is a one-line UsageError (exit 2), never a silent run over fewer sources.
    """
    if tenant is None:
        return [s.name for s in cfg.pick_sources(sources)] if sources else None
    own = [s.name for s in tenancy.pick(cfg, tenant)]
    if not own:
        raise UsageError(f"tenant {tenant!r} has no configured source")
    if not sources:
        return own
    other = [n for n in (s.name for s in cfg.pick_sources(sources)) if n not in own]
    if other:
        raise UsageError(f"source(s) {', '.join(other)} hold no data of tenant {tenant!r} "
                         f"(its sources: {', '.join(own)})")
    return list(dict.fromkeys(sources))


def require(condition: bool, message: str) -> None:
    """Raise a UsageError unless `condition` holds."""
    if not condition:
        raise UsageError(message)


class LazyGroup(click.Group):
    """A group whose commands defined elsewhere are imported when one of them is asked for.

    `lazy` maps a command name to "module:attribute" (module relative to this package).
    Running one command imports its module only, so e.g. `drctl backup` does not load
    what restore, drills or audit need before pg_dump starts; `--help` (which asks for
    every command) still lists them all.
    """

    def __init__(self, *args: Any, lazy: Mapping[str, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            module, attribute = self.lazy[cmd_name].split(":")
            command = getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
            if not isinstance(command, click.Command):
                raise TypeError(f"{self.lazy[cmd_name]} is not a click command")
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)


def root_group(help_text: str, lazy: Mapping[str, str] | None = None) -> click.Group:
    """A command's top-level group: --config, --version and -h, shared by drctl and drdaemon.
    `lazy`: commands imported only when asked for (LazyGroup)."""

    @click.group(cls=LazyGroup, lazy=lazy,
                 context_settings={"help_option_names": ["-h", "--help"]}, help=help_text)
    @config_option
    @click.version_option(package_name="drdaemon")
    @click.pass_context
    def cli(ctx: click.Context, config_path: str | None) -> None:
        ctx.ensure_object(dict)["config_path"] = config_path

    return cli
