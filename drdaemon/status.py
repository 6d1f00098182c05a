"""Is every source inside its RPO, in every region? Pure evaluation plus a thin reader."""

from __future__ import annotations

import functools
import zoneinfo
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from . import catalog, cron, slo, state, tenancy
from .config import Config, SourceConfig
from .manifest import Manifest
from .retry import resume_at
from .runtime import Runtime
from .units import format_duration


@dataclass(frozen=True)
class SourceStatus:
    """What `drctl status` says about one source."""

    source: str
    tenant: str
    tier: str
    rpo: timedelta
    newest_id: str | None
    newest_consistency: datetime | None
    age: timedelta | None
    regions: tuple[str, ...]  # regions holding the newest snapshot
    missing_regions: tuple[str, ...]
    retained: int
    span: timedelta | None  # newest minus oldest consistency time
    last_failure: str | None
    last_error: str | None
    next_run: datetime | None
    problems: tuple[str, ...] = field(default=())
    # (id, reason) of listed snapshots whose manifest no region can read
    unreadable: tuple[tuple[str, str], ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, object]:
        return {
            "source": self.source, "tenant": self.tenant, "tier": self.tier, "ok": self.ok,
            "rpo_seconds": self.rpo.total_seconds(), "newest_id": self.newest_id,
            "newest_consistency_time": _iso(self.newest_consistency),
            "age_seconds": self.age.total_seconds() if self.age is not None else None,
            "regions": list(self.regions), "missing_regions": list(self.missing_regions),
            "retained": self.retained,
            "span_seconds": self.span.total_seconds() if self.span is not None else None,
            "last_failure": self.last_failure, "last_error": self.last_error,
            "next_run": _iso(self.next_run), "problems": list(self.problems),
            "unreadable_snapshots": [{"id": i, "reason": why} for i, why in self.unreadable],
        }


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def next_run(source: SourceConfig, tz: str, now: datetime) -> datetime | None:
    """When the source's cron fires next after `now`."""
    return _next_fire(source.schedule, tz, now)


@functools.lru_cache(maxsize=256)
def _next_fire(schedule: str, tz: str, now: datetime) -> datetime | None:
    # A thousand sources share a handful of schedules, and one reading shares `now`:
    # building a trigger and stepping it costs ~0.3 ms, once per schedule is enough.
    trigger = cron.trigger(schedule, zoneinfo.ZoneInfo(tz))
    fire: datetime | None = trigger.get_next_fire_time(None, now)
    return fire


def evaluate(config: Config, source: SourceConfig, snapshots: list[tuple[Manifest, list[str]]],
             outcome: state.Outcome, now: datetime,
             unreadable: Sequence[tuple[str, str]] = ()) -> SourceStatus:
    """Pure: the status of one source from its committed snapshots (manifest, regions)
    and the (id, reason) of those listed whose manifest no region can read."""
    rpo = config.tiers[source.tier].rpo
    all_regions = tenancy.regions_for(config, source)  # its tenant's residency
    ordered = sorted(snapshots, key=lambda s: catalog.newness(s[0]))
    problems = []
    newest, regions = ordered[-1] if ordered else (None, [])
    missing = tuple(r for r in all_regions if r not in regions) if newest else ()
    age = now - newest.consistency_time if newest else None
    if newest is None:
        problems.append("no snapshot yet")
    elif age is not None and slo.over(age, rpo):
        problems.append(f"newest snapshot is {format_duration(age)} old, over the "
                        f"{format_duration(rpo)} RPO")
    if missing:
        problems.append(f"newest snapshot missing in {', '.join(missing)}")
    problems.extend(f"snapshot {i} cannot be read in any region: {why}" for i, why in unreadable)
    if outcome.unfinished:
        problems.append(f"last attempt, begun {outcome.last_started}, never finished "
                        "(the process ended mid-way); a retry is pending")
    elif outcome.pending_retry:
        problems.append(f"last attempt failed at {outcome.last_failure}: "
                        f"{outcome.last_error or 'no message'}")
    fire = next_run(source, config.daemon.timezone, now)
    retry = resume_at(outcome, config.daemon.retry_backoff, now)
    if retry is not None and (fire is None or retry < fire):
        fire = retry  # what the daemon does: retry before the next cron run
    span = ordered[-1][0].consistency_time - ordered[0][0].consistency_time if ordered else None
    return SourceStatus(
        source.name, source.tenant, source.tier, rpo, newest.id if newest else None,
        newest.consistency_time if newest else None, age, tuple(regions), missing,
        len(ordered), span, outcome.last_failure, outcome.last_error, fire, tuple(problems),
        tuple(unreadable))


NO_SIGNING_KEY = ("evidence is not publicly verifiable: set [keys] signing_key_file "
                  "(make one with: drctl keys signing-key --out FILE)")


def warnings(config: Config) -> list[str]:
    """What is wrong with the setup as a whole, though every source may be fine."""
    return [] if config.keys.signing_key_file is not None else [NO_SIGNING_KEY]


def source_statuses(rt: Runtime, names: Sequence[str] | None = None
                    ) -> tuple[list[SourceStatus], dict[str, str]]:
    """Every configured source's status (or those `names`), and the regions that could
    not be listed."""
    picked = rt.config.pick_sources(names)
    with ThreadPoolExecutor(1, thread_name_prefix="status-list") as pool:
        # The recorded outcomes are read while the regions answer the listing.
        listed = pool.submit(catalog.list_snapshots, rt,
                             names[0] if names and len(names) == 1 else None)
        outcomes = {src.name: state.read_outcome(rt.config.daemon.state_dir, src.name)
                    for src in picked}
        listing = listed.result()
    now = rt.clock()
    snaps: dict[str, list[tuple[Manifest, list[str]]]] = {}
    bad: dict[str, list[tuple[str, str]]] = {}
    for e in listing.snapshots:  # once, not once per source: a thousand sources
        if e.manifest is not None:
            snaps.setdefault(e.source, []).append((e.manifest, e.regions))
        else:
            bad.setdefault(e.source, []).append((e.id, e.why_unreadable()))
    result = [evaluate(rt.config, src, snaps.get(src.name, []), outcomes[src.name], now,
                       bad.get(src.name, [])) for src in picked]
    return result, listing.region_errors
