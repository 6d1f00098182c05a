"""`drctl drill run|list|report`: options -> the drills service -> records and reports."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import click

from .. import shared_state
from ..drills import attest
from ..drills import records as drill_records
from ..drills import run as drills
from ..drills.report import FORMATS, render
from ..errors import UsageError
from ..keys import identities_for
from ..runtime import utcnow
from ..state import write_atomic
from ..units import against, duration, parse_duration, parse_iso_time, rate, size, when
from . import (
    chosen_sources,
    emit_json,
    get_config,
    get_runtime,
    handle_errors,
    identity_option,
    json_option,
    tenant_option,
)


@click.group("drill")
def drill_group() -> None:
    """Restore drills: prove snapshots restore within the tiers' RPO and RTO."""


def since_from(text: str, now: datetime) -> datetime:
    """`--since`: a duration back from now ("90d", "12h") or an ISO date or time."""
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        t = parse_iso_time(text)
    except ValueError:
        raise UsageError(f"--since {text!r}: expected a duration like 90d or a date like "
                         "2026-01-31") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


@drill_group.command("run")
@click.option("--source", "sources", multiple=True, metavar="NAME",
              help="Source to drill (repeatable; default: all).")
@tenant_option
@click.option("--region", metavar="NAME",
              help="Region to restore from (default: the first one that is not the primary, "
                   "among those the source's tenant's residency allows).")
@identity_option
@json_option
@click.pass_context
@handle_errors("drctl")
def drill_run(ctx: click.Context, sources: tuple[str, ...], tenant: str | None,
              region: str | None, identity_file: Path | None, as_json: bool) -> None:
    """Restore each source's newest snapshot into scratch space, verify it, measure
    RTO and RPO against its tier, record the drill and remove the scratch copy.
    Exit 1 if any drill failed."""
    rt = get_runtime(ctx)
    names = chosen_sources(rt.config, sources, tenant)
    identities = identities_for(rt.config, identity_file, "a drill")
    run = drills.run_drills(rt, identities, names, region=region)
    if as_json:
        emit_json(run.to_dict())
    else:
        for x in run.scratch.removed:
            click.echo(f"removed scratch {x.scratch} left by {x.owner}: {x.reason}")
        for error in run.scratch.errors:
            click.echo(f"! {error}")
        for r in run.records:
            click.echo(drill_line(r))
            for reason in r.reasons:
                click.echo(f"     ! {reason}")
            for note in r.notes:
                click.echo(f"     - {note}")
    if not run.ok:
        sys.exit(1)


def drill_line(r: drill_records.DrillRecord) -> str:
    """One drill in one line, for people."""
    mark = "PASS" if r.ok else "FAIL"
    return (f"{mark} {r.source} ({r.tier}) {r.snapshot_id or '-'} from {r.region}: "
            f"RTO {against(r.rto_seconds, r.rto_target_seconds)}, "
            f"RPO {against(r.rpo_seconds, r.rpo_target_seconds)}, "
            f"{size(r.stored_bytes)} at {rate(r.throughput_bytes_per_second)}; "
            f"projected tier RTO {duration(r.projected_tier_rto_seconds)} [{r.id}]")


@drill_group.command("list")
@click.option("--source", metavar="NAME", help="Only this source.")
@click.option("--since", metavar="WHEN",
              help="Only drills since then: a duration back (90d) or a date (2026-01-31).")
@json_option
@click.pass_context
@handle_errors("drctl")
def drill_list(ctx: click.Context, source: str | None, since: str | None,
               as_json: bool) -> None:
    """Recorded drills, oldest first."""
    cfg = get_config(ctx)
    if source is not None:
        cfg.source(source)
    start = since_from(since, utcnow()) if since else None
    shared_state.begin(cfg.daemon)  # with lock_dsn, the cluster's records
    records = drill_records.load_records(cfg.daemon.state_dir, start, source)
    if as_json:
        emit_json({"drills": [r.to_dict() for r in records]})
        return
    for r in records:
        click.echo(f"{when(r.started_at)}  {drill_line(r)}")
    if not records:
        click.echo("no drill recorded" + (" in this period" if since else ""))


@drill_group.command("report")
@click.argument("drill_id", required=False, metavar="[DRILL_ID]")
@click.option("--since", default="90d", show_default=True, metavar="WHEN",
              help="Drills since then: a duration back (90d) or a date (2026-01-31).")
@click.option("--source", "sources", multiple=True, metavar="NAME",
              help="Only this source (repeatable; default: all).")
@click.option("--format", "fmt", type=click.Choice(FORMATS),
              help="html (default with -o FILE), md (default on standard output) or json.")
@click.option("-o", "--output", "--out", metavar="FILE", default="-", show_default=True,
              help="Where to write the report ('-': standard output). With a signing key, "
                   "FILE.sig is its detached Ed25519 signature.")
@click.pass_context
@handle_errors("drctl")
def drill_report(ctx: click.Context, drill_id: str | None, since: str, sources: tuple[str, ...],
                 fmt: str | None, output: str) -> None:
    """One self-contained report for auditors: a summary per tier, RTO and RPO charts
    against the targets, every drill with its evidence, and the audit chain's verification.
    With [keys] signing_key_file, only signed drill records count, and -o FILE also writes
    FILE.sig (check: openssl pkeyutl -verify -pubin -inkey KEY.pub -rawin -in FILE
    -sigfile FILE.sig)."""
    rt = get_runtime(ctx)
    start = None if drill_id else since_from(since, rt.clock())
    fmt = fmt or ("md" if output == "-" else "html")
    text = render(attest.report_data(rt, start, sources, drill_id), fmt)
    if output == "-":
        click.echo(text, nl=False)
        return
    path = Path(output)
    if path.is_dir():
        raise UsageError(f"-o {output}: is a folder; name a file")
    data = text.encode()
    sig = attest.sign_report(rt, data)
    sig_path = path.with_name(path.name + ".sig")
    if sig is None:
        # A signature left from an earlier report would no longer match: remove it.
        sig_path.unlink(missing_ok=True)
    write_atomic(path, data)
    if sig is not None:
        write_atomic(sig_path, sig)
    click.echo(f"wrote {path}" + (f" and its signature {sig_path}" if sig else
                                  " (not signed: no [keys] signing_key_file)"), err=True)
