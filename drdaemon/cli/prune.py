"""`drctl prune`: options -> run_prune / undo_prune -> the plan and what was done."""

from __future__ import annotations

import sys

import click

from ..errors import UsageError
from ..orphans import MAX_ORPHAN_GRACE, MIN_ORPHAN_GRACE, ORPHAN_GRACE, OrphanPlan
from ..prune import PruneReport, run_prune
from ..prune_plan import RegionPlan
from ..trash import UndoReport, undo_prune
from ..units import format_bytes, format_duration, parse_duration
from . import emit_json, get_runtime, handle_errors, json_option, require


def render_region(rp: RegionPlan) -> list[str]:
    """One source in one region: a header, then every id with its verdict and reasons."""
    counts = ", ".join(f"{a} {rp.count(a)}" for a in ("keep", "delete", "locked", "blocked")
                       if rp.count(a))
    lines = [f"{rp.source} @ {rp.region}: {len(rp.verdicts)} snapshot(s)"
             + (f" ({counts})" if counts else "")]
    for v in rp.verdicts:
        when = v.created_at.strftime("%Y-%m-%d %H:%M:%S")
        lines.append(f"  {v.action.upper():<8} {v.id}  {when}  {', '.join(v.reasons)}")
    for snap_id, problem in rp.invalid:
        lines.append(f"  {'INVALID':<8} {snap_id}  never touched: {problem}")
    if rp.blocked:
        lines.append(f"  BLOCKED by the safety net: {rp.blocked}")
    if rp.forced:
        lines.append(f"  safety net overridden: {rp.forced}")
    return lines


def render_orphans(op: OrphanPlan) -> list[str]:
    """Data objects of one source in one region that no manifest or trash entry names."""
    counts = ", ".join(f"{a} {op.count(a)}" for a in ("keep", "delete", "locked", "blocked",
                                                       "lost") if op.count(a))
    lines = [f"{op.source} @ {op.region}: {len(op.verdicts)} orphan data object(s) "
             f"({counts}) among {op.data_objects} data objects"]
    for v in op.verdicts:
        lines.append(f"  {v.action.upper():<8} {v.name}  {format_bytes(v.size)}  "
                     f"{', '.join(v.reasons)}")
    if op.blocked:
        lines.append(f"  BLOCKED by the safety net: {op.blocked}")
    if op.forced:
        lines.append(f"  safety net overridden: {op.forced}")
    return lines


def render_changes(report: PruneReport | UndoReport) -> list[str]:
    return [f"{c.status.upper():<8} {c.action:<6} {c.source} @ {c.region} {c.snapshot_id}: "
            f"{c.detail}" for c in report.changes]


def render_prune(report: PruneReport) -> list[str]:
    lines = [line for rp in report.plan.regions for line in render_region(rp)]
    lines += [line for op in report.orphans for line in render_orphans(op)]
    for e in report.region_errors:
        lines.append(f"! {e.source} @ {e.region}: not pruned, region unreadable: {e.error}")
    lines += [f"! {name}: not pruned, its tenant is under a legal hold (drctl tenant release)"
              for name in report.held]
    lines += render_changes(report)
    lost = sum(len(op.lost) for op in report.orphans)
    if lost:
        lines.append(f"! {lost} data object(s) LOST their manifest outside drdaemon: kept; see "
                     "runbooks/orphan-lost.md")
    if report.dry_run:
        lines.append("dry run: nothing was changed")
    elif not report.changes:
        lines.append("nothing to trash, purge or delete")
    elif any(c.action == "trash" and c.status == "done" for c in report.changes):
        lines.append("undo with: drctl prune --undo [--id ID] (until the trash is purged)")
    return lines


@click.command("prune")
@click.option("--source", "sources", multiple=True, metavar="NAME",
              help="Source to prune (repeatable; default: all).")
@click.option("--dry-run", is_flag=True, help="Print the plan and change nothing.")
@click.option("--force", is_flag=True,
              help="Delete even where more than max_delete_fraction would go.")
@click.option("--undo", is_flag=True, help="Put trashed snapshots back instead of pruning.")
@click.option("--id", "snapshot_id", metavar="ID", help="With --undo: only this snapshot.")
@click.option("--orphan-grace", metavar="DURATION",
              help=f"Delete an orphan data object (no manifest or trash entry in any region) "
                   f"only once an earlier prune saw it this long ago (default: each source's "
                   f"[retention] orphan_grace, else {format_duration(ORPHAN_GRACE)}; "
                   f"{format_duration(MIN_ORPHAN_GRACE)} to "
                   f"{format_duration(MAX_ORPHAN_GRACE)}).")
@json_option
@click.pass_context
@handle_errors("drctl")
def prune_cmd(ctx: click.Context, sources: tuple[str, ...], dry_run: bool, force: bool,
              undo: bool, snapshot_id: str | None, orphan_grace: str | None,
              as_json: bool) -> None:
    """Apply retention: move expired snapshots to the trash (undoable for trash_days),
    purge older trash, delete orphan data objects. Exit 1 if a step failed, a
    region was unreadable, the safety net blocked a source or a data object
    lost its manifest."""
    require(snapshot_id is None or undo, "--id needs --undo")
    require(not (undo and (dry_run or force or orphan_grace)), "--undo cannot be combined "
            "with --dry-run, --force or --orphan-grace")
    try:
        grace = parse_duration(orphan_grace) if orphan_grace is not None else None
    except ValueError as exc:
        raise UsageError(f"--orphan-grace: {exc}") from None
    except OverflowError:
        raise UsageError(f"--orphan-grace: expected a duration from "
                         f"{format_duration(MIN_ORPHAN_GRACE)} to "
                         f"{format_duration(MAX_ORPHAN_GRACE)}, got {orphan_grace!r}") from None
    rt = get_runtime(ctx)
    names = list(sources) or None
    report: PruneReport | UndoReport
    if undo:
        report = undo_prune(rt, names, snapshot_id)
        lines = render_changes(report) or ["nothing in the trash"]
        lines += [f"! {e.source} @ {e.region}: region unreadable: {e.error}"
                  for e in report.region_errors]
    else:
        report = run_prune(rt, names, dry_run=dry_run, force=force, orphan_grace=grace)
        lines = render_prune(report)
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo("\n".join(lines))
    if not report.ok:
        sys.exit(1)
