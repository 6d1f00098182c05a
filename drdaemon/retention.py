"""Retention planner: decide which snapshots to keep and which to delete.

This module is a pure functional core. It does no I/O and never reads the
clock: the caller passes ``now`` in, and gets back a :class:`RetentionPlan`
that explains every decision. Deleting anything is the caller's job.

Rules (grandfather-father-son, *cascading*)
-------------------------------------------
Snapshots are ordered newest first by ``created_at``. If two have the same
``created_at``, the one with the larger ``id`` counts as newer. Ids are never
used as a proxy for time.

1. **daily**: keep the newest snapshot of each of the ``daily`` most recent
   distinct calendar days.
2. **weekly**: look only at snapshots older than the oldest daily keep, and
   skip the ISO week that contains that oldest daily keep. Keep the newest
   snapshot of each of the ``weekly`` most recent distinct ISO weeks left.
3. **monthly**: look only at snapshots older than the oldest weekly keep, and
   skip the calendar month that contains that oldest weekly keep. Keep the
   newest snapshot of each of the ``monthly`` most recent distinct months left.
4. The newest snapshot is always kept (``"newest"``), so a non-empty input
   never loses everything.
5. Anything with ``now - created_at < min_age`` is always kept
   (``"younger than min_age"``). A snapshot dated *after* ``now`` (the clock
   went backwards) has a negative age, so this rule keeps it too.
6. Everything else is ``"expired"``.

If a tier has 0 slots, or finds nothing to keep, it is skipped: the next tier
uses the previous tier's boundary.

These are not restic's independent buckets. Each tier only looks at
snapshots older than everything the finer tier kept, so the tiers never
overlap. With one snapshot a day the steady state keeps exactly
``daily + weekly + monthly`` snapshots.

Day, week and month boundaries are computed in UTC by default. Pass
``tz=...`` to :func:`plan` to use another zone, for example the operator's
local midnight. Ages (``min_age``) are exact time differences and do not
depend on ``tz``.

Why a tier skips the period of the finer tier's oldest keep
------------------------------------------------------------
The platform promises "14 full backups retained across at least 3 months".
With daily snapshots and the default 7/4/3 policy, that means exactly 14 kept
and the oldest at least 90 days old, every day. Simulating a daemon (one
snapshot a day, plan, delete; 2000 days from several start dates) gives
these oldest-kept ages in steady state:

=========================================================  ==========
variant                                                    oldest age
=========================================================  ==========
literal cascade (newest of each month)                     64-98 d
monthly keeps the OLDEST of each month                     85-126 d
monthly skips the oldest weekly's month (only)             85-126 d
weekly skips the oldest daily's week AND monthly skips     91-132 d
the oldest weekly's month (this module)
=========================================================  ==========

No rule that changes only the monthly tier can reach 90 days. The reason is
what survives in a running daemon. A snapshot that is not kept is deleted and
cannot come back later. Between about 7 and 29 days old, only the newest
snapshot of each ISO week (the Sunday) stays alive. So every monthly keep
is a Sunday that enters the monthly tier about 29 days old. Some pairs of
consecutive calendar months (4 Sundays each) put only 8 weeks between their
representatives. On the day a new month enters and the oldest of the three
monthly keeps is dropped, the oldest survivor can therefore be 29 + 56 = 85
days old. This happens whether the representative is the first or the last
Sunday of its month. In general, 3 monthly slots need their representatives
spaced 4.5 weeks apart on average, and calendar months are only ~4.35 weeks.

Skipping the week of the oldest daily keep fixes the entry age instead. That
week is already represented by a daily keep, so the ``weekly`` slots cover
``weekly`` whole weeks before it. Sundays now leave the weekly tier at 35
days rather than 29, and 35 + 56 = 91 >= 90. The same "already represented"
argument applies one level up, so the monthly tier skips the month of the
oldest weekly keep. In a daemon that gives the same keeps as "oldest of each
month", and both tiers follow one rule. The cost is retention up to ~132
days (about 4.3 months). Starting from nothing, the steady state is
reached after 90-125 days, depending on the start date. The tests simulate
500 days and check both promises every day after that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Protocol

__all__ = [
    "REASON_EXPIRED",
    "REASON_NEWEST",
    "REASON_YOUNG",
    "Dated",
    "Decision",
    "RetentionPlan",
    "RetentionPolicy",
    "plan",
]

REASON_NEWEST = "newest"
REASON_YOUNG = "younger than min_age"
REASON_EXPIRED = "expired"


class Dated(Protocol):
    """Anything the planner can reason about: a unique id and an aware timestamp."""

    # Read-only properties so that frozen dataclasses and NamedTuples match too.
    @property
    def id(self) -> str: ...

    @property
    def created_at(self) -> datetime: ...


@dataclass(frozen=True)
class RetentionPolicy:
    """How many daily/weekly/monthly slots to keep, and the minimum age to delete.

    Raises:
        ValueError: a slot count is not a non-negative int, every slot count is 0,
            or ``min_age`` is not a non-negative ``timedelta``.
    """

    daily: int = 7
    weekly: int = 4
    monthly: int = 3
    min_age: timedelta = timedelta(hours=1)

    def __post_init__(self) -> None:
        for name in ("daily", "weekly", "monthly"):
            value = getattr(self, name)
            # bool is an int subclass; `daily = true` in a config is a bug, not 1.
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(
                    f"RetentionPolicy.{name} must be an int, got {type(value).__name__} {value!r}"
                )
            if value < 0:
                raise ValueError(f"RetentionPolicy.{name} must be >= 0, got {value}")
        if self.daily == self.weekly == self.monthly == 0:
            # With no slots, only "newest" and min_age would survive, which is
            # almost certainly a misconfiguration, not an intent.
            raise ValueError(
                "RetentionPolicy needs at least one of daily/weekly/monthly > 0, got all 0"
            )
        if not isinstance(self.min_age, timedelta):
            raise ValueError(
                f"RetentionPolicy.min_age must be a timedelta, got {type(self.min_age).__name__}"
            )
        if self.min_age < timedelta(0):
            raise ValueError(f"RetentionPolicy.min_age must be >= 0, got {self.min_age}")

    @property
    def slots(self) -> int:
        """Total number of calendar slots (daily + weekly + monthly)."""
        return self.daily + self.weekly + self.monthly


@dataclass(frozen=True)
class Decision:
    """The verdict for one snapshot, with every reason that applies.

    A kept snapshot has one or more reasons, in this order: ``"newest"``, the
    tier reason (``"daily 2026-11-20"``, ``"weekly 2026-W45"`` or ``"monthly
    2026-08"``), then ``"younger than min_age"``. A deleted snapshot has
    exactly ``("expired",)``.
    """

    id: str
    created_at: datetime
    keep: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class RetentionPlan:
    """Result of :func:`plan`. Both tuples are ordered newest first."""

    keep: tuple[Decision, ...]
    delete: tuple[Decision, ...]

    @property
    def keep_ids(self) -> tuple[str, ...]:
        """Ids to keep, newest first."""
        return tuple(d.id for d in self.keep)

    @property
    def delete_ids(self) -> tuple[str, ...]:
        """Ids to delete, newest first."""
        return tuple(d.id for d in self.delete)


def _day_label(local: datetime) -> str:
    return local.date().isoformat()


def _week_label(local: datetime) -> str:
    # ISO week-numbering year: 2027-01-01 (a Friday) belongs to 2026-W53.
    iso = local.isocalendar()
    return f"{iso.year}-W{iso.week:02d}"


def _month_label(local: datetime) -> str:
    return f"{local.year:04d}-{local.month:02d}"


def _require_aware(value: datetime, what: str) -> None:
    if not isinstance(value, datetime):
        raise ValueError(f"{what} must be a datetime, got {type(value).__name__}")
    # The same check as the datetime docs use for "aware".
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got naive {value.isoformat()}")


@dataclass(frozen=True)
class _Entry:
    id: str
    created_at: datetime
    local: datetime  # created_at in the planning timezone, for period labels


def plan(
    snapshots: Iterable[Dated],
    policy: RetentionPolicy,
    now: datetime,
    tz: tzinfo = UTC,
) -> RetentionPlan:
    """Decide which snapshots to keep and which to delete under ``policy``.

    See the module docstring for the rules. The result depends only on the
    arguments, not on input order or the wall clock. Running ``plan`` again
    on the kept snapshots with the same ``now`` deletes nothing. Cost is one
    sort plus linear passes.

    Args:
        snapshots: records with ``.id`` (unique str) and ``.created_at``
            (timezone-aware datetime).
        policy: slot counts and ``min_age``.
        now: the current time (aware). Injected so the planner stays pure.
        tz: timezone for day, week and month boundaries. Defaults to UTC.

    Returns:
        A :class:`RetentionPlan` with one :class:`Decision` per input snapshot.

    Raises:
        ValueError: ``now`` or any ``created_at`` is naive, or ids repeat.
    """
    _require_aware(now, "now")
    if not isinstance(tz, tzinfo):
        raise ValueError(f"tz must be a tzinfo, got {type(tz).__name__}")

    entries: list[_Entry] = []
    seen_ids: set[str] = set()
    for snap in snapshots:
        _require_aware(snap.created_at, f"created_at of snapshot {snap.id!r}")
        if snap.id in seen_ids:
            # A repeated id could end up both kept and deleted. The input is
            # wrong, so refuse to plan rather than guess.
            raise ValueError(f"duplicate snapshot id {snap.id!r}")
        seen_ids.add(snap.id)
        entries.append(_Entry(snap.id, snap.created_at, snap.created_at.astimezone(tz)))

    # Newest first. The id tie-break keeps the order total, so the result
    # does not depend on input order.
    entries.sort(key=lambda e: (e.created_at, e.id), reverse=True)

    tier_reason: dict[int, str] = {}
    tiers: tuple[tuple[str, int, Callable[[datetime], str]], ...] = (
        ("daily", policy.daily, _day_label),
        ("weekly", policy.weekly, _week_label),
        ("monthly", policy.monthly, _month_label),
    )
    start = 0  # candidates for the current tier are entries[start:]
    boundary: _Entry | None = None  # oldest keep of the last tier that kept anything
    for name, slots, label in tiers:
        if slots == 0:
            continue
        # Skip the period that contains the finer tier's oldest keep: that
        # keep already represents it. This is what makes the 7/4/3 default
        # reach 90 days (see the module docstring).
        skipped = label(boundary.local) if boundary is not None else None
        filled: set[str] = set()
        last_kept: int | None = None
        for i in range(start, len(entries)):
            period = label(entries[i].local)
            # Newest first, so the first entry seen in a period is its newest.
            if period == skipped or period in filled:
                continue
            filled.add(period)
            tier_reason[i] = f"{name} {period}"
            last_kept = i
            if len(filled) == slots:
                break
        if last_kept is not None:
            boundary = entries[last_kept]
            start = last_kept + 1  # the next tier only sees strictly older snapshots

    keep: list[Decision] = []
    delete: list[Decision] = []
    for i, entry in enumerate(entries):
        reasons: list[str] = []
        if i == 0:
            reasons.append(REASON_NEWEST)
        if i in tier_reason:
            reasons.append(tier_reason[i])
        # A snapshot from the future (the clock went backwards) has a negative
        # age, so it counts as too young to delete.
        if now - entry.created_at < policy.min_age:
            reasons.append(REASON_YOUNG)
        if reasons:
            keep.append(Decision(entry.id, entry.created_at, True, tuple(reasons)))
        else:
            delete.append(Decision(entry.id, entry.created_at, False, (REASON_EXPIRED,)))
    return RetentionPlan(keep=tuple(keep), delete=tuple(delete))


def delete_guard(deletes: int, total: int, fraction: float, force: bool,
                 what: str) -> tuple[str | None, str | None]:
    """The safety net over one region's deletions: the (blocked, forced) reasons.

    Both are None while `deletes` stays within `fraction` of `total`; past it
    the deletions are blocked, unless `force` lets them through (and says so).
    """
    if not deletes or deletes <= fraction * total:
        return None, None
    why = (f"would delete {deletes} of {total} {what} ({deletes / total:.0%}), "
           f"more than max_delete_fraction {fraction:.0%}")
    if force:
        return None, why + "; allowed by --force"
    return why + "; nothing deleted here (re-run with --force if this is intended)", None
