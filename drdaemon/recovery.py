"""The recovery service: plan the restore of every source (recovery_plan.py), and run it.

`make_plan` lists what the regions hold and what the drills measured, and
hands them to the pure plan. `run_plan` restores each source of a plan with
the service `drctl restore` uses (restore.restore: verified end to end), up to
`parallel` at once, in the plan's order, into targets `targets_for` derives
from one database server and one folder. Each finished restore is a JSON line
in `<state_dir>/recovery/<key>.jsonl`, `key` naming the targets: a run that
died (kill -9, a lost host) is run again with the same targets and skips what
is recorded there. The run is audit-logged (`recovery.started`,
`recovery.source_failed`, `recovery.finished`, and each `restore`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyrage import x25519

from . import catalog, recovery_plan, statefs
from .drills.records import latest_restores, load_records
from .errors import DrError, UsageError
from .recovery_plan import RecoveryPlan
from .restore import restore
from .runtime import Runtime
from .sources import kind_for
from .sources.pg_recreate import Policy
from .sources.pg_sink import database_on

log = logging.getLogger("drdaemon")

Say = Callable[[str], None]


def make_plan(rt: Runtime, *, lost: Sequence[str] = (), parallel: int = 1) -> RecoveryPlan:
    """The plan for restoring every source now. A region that cannot be listed counts as
    lost too (the plan names it), so a plan made during the outage needs no flag."""
    if not 1 <= parallel <= recovery_plan.MAX_PARALLEL:
        raise UsageError(f"--parallel must be 1 to {recovery_plan.MAX_PARALLEL}")
    names = {r.name for r in rt.config.regions}
    unknown = [r for r in lost if r not in names]
    if unknown:
        raise UsageError(f"no region named {', '.join(map(repr, unknown))} (regions: "
                         f"{', '.join(sorted(names))})")
    # A region named lost is not waited for (a stopped endpoint takes retries to fail).
    listing = catalog.list_snapshots(without(rt, lost))
    listed: dict[str, list[catalog.SnapshotEntry]] = {}
    for e in listing.snapshots:
        listed.setdefault(e.source, []).append(e)
    sources = recovery_plan.plan_sources(rt.config, listed)
    restores = latest_restores(load_records(rt.config.daemon.state_dir),
                               [s.name for s in rt.config.sources])
    return recovery_plan.build_plan(sources, restores, parallel=parallel,
                                    lost=[*lost, *listing.region_errors])


def without(rt: Runtime, lost: Sequence[str]) -> Runtime:
    """`rt` with the stores of the `lost` regions left out: nothing reads from, lists or
    mirrors the audit log to a region that is gone (each attempt would wait for retries)."""
    if not lost:
        return rt
    return dataclasses.replace(rt, stores=[s for s in rt.stores if s.name not in lost])


# -- targets ----------------------------------------------------------------------


def targets_for(rt: Runtime, plan: RecoveryPlan, to_server: str | None, to_dir: Path | None,
                db_name: str = "{source}") -> dict[str, str]:
    """Each restorable source's target: a database named `db_name` ({source} replaced)
    on `to_server`, or the folder `to_dir/<source>`, as its kind restores into."""
    if "{source}" not in db_name:
        raise UsageError(f"--db-name must hold {{source}} (got {db_name!r})")
    out: dict[str, str] = {}
    for item in plan.items:
        if item.problem:
            continue
        source = rt.config.source(item.source)
        kind = kind_for(source.kind)
        if kind.target_noun == "database":
            if to_server is None:
                raise UsageError(f"source {item.source} restores into a database: give "
                                 "--to-server DSN")
            target = database_on(to_server, db_name.replace("{source}", item.source))
        else:
            if to_dir is None:
                raise UsageError(f"source {item.source} restores into a folder: give "
                                 "--to-dir DIR (each source goes to DIR/<source>)")
            target = str(to_dir / item.source)
        kind.check_target(source, target)  # a password in the DSN fails here, unechoed
        out[item.source] = target
    return out


def run_key(targets: dict[str, str]) -> str:
    """Pure: the name of a run's record of what finished: the same targets, the same run."""
    text = json.dumps(sorted(targets.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- the run -----------------------------------------------------------------------


@dataclass
class Done:
    """One finished restore of a recovery run (a line of its record)."""

    source: str
    tier: str
    order: int
    snapshot_id: str
    region: str
    target: str
    started: float  # seconds after the run (the first attempt) began
    finished: float
    seconds: float
    planned_eta: float | None


@dataclass
class RecoveryRun:
    plan: RecoveryPlan
    key: str
    done: list[Done] = field(default_factory=list)  # by this run, in the order they ended
    skipped: list[str] = field(default_factory=list)  # finished by an earlier attempt
    failed: dict[str, str] = field(default_factory=dict)
    summary: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not any(i.problem for i in self.plan.items)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "key": self.key, "plan": self.plan.to_dict(),
                "done": [asdict(d) for d in self.done], "skipped": self.skipped,
                "failed": self.failed, "summary": self.summary}


def record_name(key: str) -> str:
    return f"{statefs.RECOVERY}/{key}.jsonl"


def finished(state_dir: Path, key: str) -> dict[str, Done]:
    """What earlier attempts of run `key` finished, by source (a torn last line is skipped)."""
    try:
        raw = statefs.read_shared(state_dir, record_name(key))
    except FileNotFoundError:
        return {}
    out = {}
    for line in raw.splitlines():
        try:
            d = Done(**json.loads(line))
        except (ValueError, TypeError):
            continue
        out[d.source] = d
    return out


def _append(state_dir: Path, key: str, d: Done) -> None:
    line = (json.dumps(asdict(d), sort_keys=True) + "\n").encode()
    with statefs.appending(state_dir, record_name(key)) as fd:
        statefs.write_all(fd, line)


def run_plan(rt: Runtime, identities: Sequence[x25519.Identity], plan: RecoveryPlan,
             targets: dict[str, str], *, no_owner: bool = False, policy: Policy | None = None,
             say: Say = lambda _: None) -> RecoveryRun:
    """Restore every source of `plan` into `targets`, `plan.parallel` at once, in order.

    One failing source never stops the others. What an earlier attempt with the
    same targets finished is skipped. Never raises for a failed restore (see
    `failed`); UsageError for a wrong identity stops the run.
    """
    rt = without(rt, plan.lost_regions)
    state_dir = rt.config.daemon.state_dir
    key = run_key(targets)
    earlier = finished(state_dir, key)
    run = RecoveryRun(plan, key)
    todo = []
    for item in plan.items:
        if item.problem:
            say(f"{item.source}: CANNOT RESTORE: {item.problem}")
        elif item.source in earlier:
            run.skipped.append(item.source)
            say(f"{item.source}: already restored by an earlier attempt "
                f"({earlier[item.source].snapshot_id}), skipped")
        else:
            todo.append(item)
    # The run's clock: an earlier attempt's start, so resumed times stay comparable.
    offset = max((d.finished for d in earlier.values()), default=0.0)
    began = time.monotonic() - offset
    lock = threading.Lock()

    def one(item: recovery_plan.PlanItem) -> None:
        start = time.monotonic() - began
        say(f"{item.source}: restoring {item.snapshot_id} from {item.region} "
            f"(#{item.order}, tier {item.tier})")
        try:
            result = restore(rt, identities, item.source, item.snapshot_id or "latest",
                             targets[item.source], region=item.region, no_owner=no_owner,
                             policy=policy)
        except UsageError:
            raise
        except DrError as exc:
            with lock:
                run.failed[item.source] = str(exc)
            rt.record_event("recovery.source_failed", key=key, source=item.source,
                            error=str(exc))
            say(f"{item.source}: FAILED: {exc}")
            return
        end = time.monotonic() - began
        d = Done(item.source, item.tier, item.order, result.snapshot_id, result.region,
                 result.target, round(start, 3), round(end, 3), round(result.seconds, 3),
                 item.eta)
        with lock:
            _append(state_dir, key, d)
            run.done.append(d)
        say(f"{item.source}: restored in {result.seconds:.1f}s "
            f"(planned to end at {_secs(item.eta)}, ended at {end:.1f}s)")

    with rt.audit_batch():
        rt.record_event("recovery.started", key=key, parallel=plan.parallel,
                        lost_regions=list(plan.lost_regions),
                        sources=[i.source for i in todo], skipped=run.skipped)
        with ThreadPoolExecutor(max_workers=plan.parallel,
                                thread_name_prefix="recovery") as pool:
            # Submitted in plan order: the pool's queue is the plan's list scheduling.
            for f in [pool.submit(one, item) for item in todo]:
                f.result()
        run.summary = summary(plan, {**earlier, **{d.source: d for d in run.done}})
        rt.record_event("recovery.finished", key=key, ok=run.ok, failed=run.failed,
                        summary=run.summary)
    return run


def _secs(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}s"


def summary(plan: RecoveryPlan, done: dict[str, Done]) -> list[dict[str, Any]]:
    """Pure: per tier, the planned ETA against the measured end of its last restore."""
    out = []
    for t in plan.tiers:
        mine = [done[i.source] for i in plan.items if i.tier == t.tier and i.source in done]
        measured = max((d.finished for d in mine), default=None)
        out.append({"tier": t.tier, "sources": t.sources, "restored": len(mine),
                    "planned_seconds": t.eta, "measured_seconds": measured,
                    "rto_target_seconds": t.rto_target,
                    "inside_target": None if measured is None or len(mine) < t.sources
                    else measured <= t.rto_target})
    return out
