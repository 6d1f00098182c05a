"""Tests for drdaemon.retention: golden examples, a steady-state simulation of
the platform promise, and Hypothesis-driven daemon simulations."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from drdaemon.retention import (
    REASON_EXPIRED,
    REASON_NEWEST,
    REASON_YOUNG,
    Dated,
    RetentionPlan,
    RetentionPolicy,
    plan,
)

DAY = timedelta(days=1)


@dataclass(frozen=True)
class Snap:
    id: str
    created_at: datetime


def at(iso: str) -> datetime:
    """Parse an ISO timestamp and treat it as UTC (the tests read easier this way)."""
    return datetime.fromisoformat(iso).replace(tzinfo=UTC)


def reasons_by_id(result: RetentionPlan) -> dict[str, tuple[str, ...]]:
    return {d.id: d.reasons for d in (*result.keep, *result.delete)}


# --------------------------------------------------------------------------- golden


def test_golden_cascade_with_reasons() -> None:
    policy = RetentionPolicy(daily=2, weekly=2, monthly=2, min_age=timedelta(hours=1))
    now = at("2026-11-20T12:00")  # a Friday in 2026-W47
    snaps = [
        Snap("q7", at("2026-11-20T11:30")),  # 30 min old
        Snap("b2", at("2026-11-20T02:00")),
        # Same instant: the larger id counts as newer.
        Snap("a1", at("2026-11-19T23:00")),
        Snap("x9", at("2026-11-19T23:00")),
        Snap("m4", at("2026-11-19T01:00")),
        # W47 holds the oldest daily keep, so the weekly tier skips it. A literal
        # cascade would keep this as "weekly 2026-W47".
        Snap("k3", at("2026-11-17T10:00")),
        Snap("f5", at("2026-11-15T20:00")),  # Sunday, W46
        Snap("g6", at("2026-11-12T08:00")),  # W46
        Snap("h8", at("2026-11-05T08:00")),  # W45, oldest weekly -> November is skipped
        Snap("c0", at("2026-11-01T08:00")),  # W44 but November: skipped by monthly
        Snap("j2", at("2026-10-20T08:00")),
        Snap("e1", at("2026-10-03T08:00")),
        Snap("l5", at("2026-08-15T08:00")),  # no September snapshot: months are those present
        Snap("z0", at("2026-07-01T08:00")),
    ]
    result = plan(reversed(snaps), policy, now)  # input order must not matter

    assert result.keep_ids == ("q7", "x9", "f5", "h8", "j2", "l5")
    assert result.delete_ids == ("b2", "a1", "m4", "k3", "g6", "c0", "e1", "z0")
    assert reasons_by_id(result) == {
        "q7": (REASON_NEWEST, "daily 2026-11-20", REASON_YOUNG),
        "x9": ("daily 2026-11-19",),
        "f5": ("weekly 2026-W46",),
        "h8": ("weekly 2026-W45",),
        "j2": ("monthly 2026-10",),
        "l5": ("monthly 2026-08",),
        **{i: (REASON_EXPIRED,) for i in result.delete_ids},
    }
    assert all(d.keep for d in result.keep)
    assert not any(d.keep for d in result.delete)
    assert result.keep[0].created_at == at("2026-11-20T11:30")


def test_clock_went_backwards_keeps_future_snapshots() -> None:
    now = at("2026-03-10T08:00")
    snaps = [
        Snap("fut", at("2026-03-10T09:30")),  # written before the clock jumped back
        Snap("cur", at("2026-03-10T07:59:30")),
        Snap("old", at("2026-03-10T06:00")),
        Snap("prev", at("2026-03-09T06:00")),
    ]
    assert reasons_by_id(plan(snaps, RetentionPolicy(), now)) == {
        "fut": (REASON_NEWEST, "daily 2026-03-10", REASON_YOUNG),
        "cur": (REASON_YOUNG,),
        "old": (REASON_EXPIRED,),
        "prev": ("daily 2026-03-09",),
    }


def test_future_snapshot_kept_even_with_zero_min_age() -> None:
    policy = RetentionPolicy(daily=1, weekly=0, monthly=0, min_age=timedelta(0))
    now = at("2026-03-10T23:00")
    snaps = [
        Snap("fut", at("2026-03-11T01:00")),
        Snap("now", now),
        Snap("a", at("2026-03-10T01:00")),
    ]
    assert reasons_by_id(plan(snaps, policy, now)) == {
        "fut": (REASON_NEWEST, "daily 2026-03-11", REASON_YOUNG),
        # min_age=0: a snapshot taken exactly now is not protected by age.
        "now": (REASON_EXPIRED,),
        "a": (REASON_EXPIRED,),
    }


def test_several_runs_within_min_age_are_all_kept() -> None:
    now = at("2026-05-05T12:00")
    snaps = [Snap(f"s{m}", at(f"2026-05-05T11:{m}")) for m in ("10", "30", "50")]
    assert reasons_by_id(plan(snaps, RetentionPolicy(), now)) == {
        "s50": (REASON_NEWEST, "daily 2026-05-05", REASON_YOUNG),
        "s30": (REASON_YOUNG,),
        "s10": (REASON_YOUNG,),
    }


def test_timezone_moves_day_boundaries() -> None:
    policy = RetentionPolicy(daily=2, weekly=0, monthly=0)
    now = at("2026-11-22T12:00")
    snaps = [Snap("late", at("2026-11-20T23:30")), Snap("early", at("2026-11-21T00:30"))]
    assert plan(snaps, policy, now).keep_ids == ("early", "late")
    # At UTC+2 both fall on 2026-11-21 local time.
    plus2 = plan(snaps, policy, now, tz=timezone(timedelta(hours=2)))
    assert reasons_by_id(plus2) == {
        "early": (REASON_NEWEST, "daily 2026-11-21"),
        "late": (REASON_EXPIRED,),
    }


def test_iso_week_year_and_zero_daily_slots() -> None:
    # With no daily tier, the weekly tier sees everything and skips nothing.
    # 2027-01-01 (a Friday) belongs to ISO week 2026-W53.
    policy = RetentionPolicy(daily=0, weekly=2, monthly=0)
    snaps = [
        Snap("sun", at("2027-01-03T12:00")),
        Snap("fri", at("2027-01-01T12:00")),
        Snap("w52", at("2026-12-27T12:00")),
    ]
    assert reasons_by_id(plan(snaps, policy, at("2027-02-01T00:00"))) == {
        "sun": (REASON_NEWEST, "weekly 2026-W53"),
        "fri": (REASON_EXPIRED,),
        "w52": ("weekly 2026-W52",),
    }


def test_newest_always_kept_and_empty_input() -> None:
    policy = RetentionPolicy(daily=0, weekly=0, monthly=1)
    only = plan([Snap("x", at("2001-01-01T00:00"))], policy, at("2026-01-01T00:00"))
    assert reasons_by_id(only) == {"x": (REASON_NEWEST, "monthly 2001-01")}
    empty = plan([], policy, at("2026-01-01T00:00"))
    assert empty == RetentionPlan(keep=(), delete=())
    assert empty.keep_ids == () and empty.delete_ids == ()


def test_aware_non_utc_inputs_compare_by_instant() -> None:
    # Same instant written in two offsets: a tie on created_at, broken by id.
    est = timezone(timedelta(hours=-5))
    snaps = [
        Snap("b", datetime(2026, 1, 1, 7, 0, tzinfo=est)),
        Snap("a", at("2026-01-01T12:00")),
    ]
    result = plan(snaps, RetentionPolicy(daily=1, weekly=0, monthly=0), at("2026-02-01T00:00"))
    assert result.keep_ids == ("b",)
    assert result.delete_ids == ("a",)


# ----------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"daily": -1}, "daily must be >= 0"),
        ({"weekly": -2}, "weekly must be >= 0"),
        ({"monthly": -3}, "monthly must be >= 0"),
        ({"daily": 0, "weekly": 0, "monthly": 0}, "at least one"),
        ({"min_age": timedelta(seconds=-1)}, "min_age must be >= 0"),
        ({"daily": 1.5}, "daily must be an int"),
        ({"weekly": True}, "weekly must be an int"),
        ({"monthly": "3"}, "monthly must be an int"),
        ({"min_age": 3600}, "min_age must be a timedelta"),
    ],
)
def test_policy_rejects_bad_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetentionPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_defaults() -> None:
    policy = RetentionPolicy()
    assert (policy.daily, policy.weekly, policy.monthly) == (7, 4, 3)
    assert policy.min_age == timedelta(hours=1)
    assert policy.slots == 14


def test_naive_now_rejected() -> None:
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        plan([], RetentionPolicy(), datetime(2026, 1, 1))


def test_naive_created_at_rejected() -> None:
    snaps = [Snap("ok", at("2026-01-01T00:00")), Snap("bad", datetime(2026, 1, 1))]
    with pytest.raises(ValueError, match="'bad' must be timezone-aware"):
        plan(snaps, RetentionPolicy(), at("2026-01-02T00:00"))


def test_duplicate_ids_rejected() -> None:
    snaps = [Snap("dup", at("2026-01-01T00:00")), Snap("dup", at("2026-01-02T00:00"))]
    with pytest.raises(ValueError, match="duplicate snapshot id 'dup'"):
        plan(snaps, RetentionPolicy(), at("2026-01-03T00:00"))


# --------------------------------------------------------------------- steady state

# Starting from nothing, 7/4/3 with daily snapshots needs up to 125 days
# (depending on the start date) before all 14 slots are filled and the oldest
# is 90 days old. After that both must hold every single day.
WARM_UP_DAYS = 126


@pytest.mark.parametrize(
    "start",
    [
        at("2025-01-01T03:00"),
        at("2025-12-20T23:45"),  # start in the week of the ISO year change
        at("2026-02-14T12:00"),  # Feb+Mar: the tightest pair of months
        at("2027-06-30T00:00"),
    ],
)
def test_steady_state_keeps_14_spanning_90_days(start: datetime) -> None:
    policy = RetentionPolicy()
    held: list[Snap] = []
    for day in range(500):
        now = start + day * DAY
        held.append(Snap(f"snap-{day:04d}", now))  # the daemon took a backup...
        result = plan(held, policy, now)  # ...then prunes
        kept = set(result.keep_ids)
        held = [s for s in held if s.id in kept]

        oldest_age = now - min(s.created_at for s in held)
        assert len(held) <= policy.slots, f"day {day}"
        if day >= WARM_UP_DAYS:
            assert len(held) == 14, f"day {day}: kept {len(held)}"
            assert oldest_age >= timedelta(days=90), f"day {day}: oldest {oldest_age}"
            # The cost side of the rule: retention stays under ~4.5 months.
            assert oldest_age <= timedelta(days=135), f"day {day}: oldest {oldest_age}"


# ------------------------------------------------------------------ property tests

policies = st.builds(
    lambda s, min_age: RetentionPolicy(daily=s[0], weekly=s[1], monthly=s[2], min_age=min_age),
    # Filter before building: an all-zero policy is rejected by the constructor.
    st.tuples(st.integers(0, 10), st.integers(0, 6), st.integers(0, 6)).filter(any),
    st.sampled_from([timedelta(0), timedelta(minutes=5), timedelta(hours=1), timedelta(hours=30)]),
)


def check_plan(snaps: list[Snap], policy: RetentionPolicy, now: datetime) -> RetentionPlan:
    """Plan and assert every per-run invariant. Returns the plan."""
    result = plan(snaps, policy, now)
    decisions = (*result.keep, *result.delete)
    by_id = {s.id: s for s in snaps}

    # Every input id gets exactly one decision, consistent with the input.
    assert sorted(d.id for d in decisions) == sorted(by_id)
    for d in decisions:
        assert d.created_at == by_id[d.id].created_at
        assert d.reasons, d
    for d in result.keep:
        assert d.keep and REASON_EXPIRED not in d.reasons
    for d in result.delete:
        assert not d.keep and d.reasons == (REASON_EXPIRED,)

    # Reasons are truthful. Labels are computed in UTC by default.
    for d in result.keep:
        for r in d.reasons:
            if r in (REASON_NEWEST, REASON_YOUNG):
                continue
            tier, label = r.split(" ")
            c = d.created_at.astimezone(UTC)
            iso = c.isocalendar()
            assert (
                label
                == {
                    "daily": c.date().isoformat(),
                    "weekly": f"{iso.year}-W{iso.week:02d}",
                    "monthly": f"{c.year:04d}-{c.month:02d}",
                }[tier]
            ), (d, r)
    tier_counts = {"daily": 0, "weekly": 0, "monthly": 0}
    for d in result.keep:
        for r in d.reasons:
            tier = r.split(" ")[0]
            if tier in tier_counts:
                tier_counts[tier] += 1
    assert tier_counts["daily"] <= policy.daily
    assert tier_counts["weekly"] <= policy.weekly
    assert tier_counts["monthly"] <= policy.monthly

    if snaps:
        # The newest is kept, and deleting never removes everything.
        newest = max(snaps, key=lambda s: (s.created_at, s.id))
        assert result.keep and result.keep[0].id == newest.id
        assert REASON_NEWEST in result.keep[0].reasons
        assert sum(REASON_NEWEST in d.reasons for d in decisions) == 1

    # Nothing younger than min_age (or from the future) is deleted.
    young = {s.id for s in snaps if now - s.created_at < policy.min_age}
    assert young <= set(result.keep_ids)
    assert {d.id for d in result.keep if REASON_YOUNG in d.reasons} == young

    # Bounded: calendar slots + the young ones + the newest.
    assert len(result.keep) <= policy.slots + len(young) + 1

    # Deterministic: input order does not matter.
    shuffled = snaps[:]
    random.Random(len(snaps)).shuffle(shuffled)
    assert plan(shuffled, policy, now) == result

    # Idempotent: planning again on the survivors deletes nothing.
    kept_ids = set(result.keep_ids)
    again = plan([s for s in snaps if s.id in kept_ids], policy, now)
    assert again.delete == ()
    assert again.keep == result.keep
    return result


SIM_DAYS = 420


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    policy=policies,
    start=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2090, 1, 1), timezones=st.just(UTC)
    ),
    seed=st.integers(0, 2**32 - 1),
    miss_rate=st.sampled_from([0.0, 0.1, 0.4]),
    multi_rate=st.sampled_from([0.0, 0.2, 0.6]),
    jump_rate=st.sampled_from([0.0, 0.05, 0.3]),
)
@example(
    policy=RetentionPolicy(),
    start=at("2026-01-01T00:00"),
    seed=0,
    miss_rate=0.0,
    multi_rate=0.0,
    jump_rate=0.0,
)
def test_daemon_simulation_invariants(
    policy: RetentionPolicy,
    start: datetime,
    seed: int,
    miss_rate: float,
    multi_rate: float,
    jump_rate: float,
) -> None:
    """Simulate a daemon for 420 days with missed backups, several runs on one
    day, random times and clock jumps. Check every invariant on every run."""
    # Hypothesis picks the knobs and a seed. The day-by-day schedule comes from
    # that seed because 420 days of drawn data would overflow Hypothesis's buffer.
    rng = random.Random(seed)
    held: list[Snap] = []
    serial = 0
    for day in range(SIM_DAYS):
        day_start = start + day * DAY
        runs = 0 if rng.random() < miss_rate else 1
        if runs and rng.random() < multi_rate:
            runs += rng.randint(1, 3)
        offsets = sorted(rng.uniform(0, 86_400) for _ in range(max(runs, 1)))
        for n, offset in enumerate(offsets):
            now = day_start + timedelta(seconds=offset)
            if rng.random() < jump_rate:
                # The clock jumps back (NTP fix, VM restore) or forward a few hours.
                now += timedelta(hours=rng.uniform(-8, 8))
            if n < runs:
                serial += 1
                # Ids are deliberately not time-sortable.
                sid = f"{rng.getrandbits(32):08x}-{serial}"
                created = now
                if held and rng.random() < 0.05:
                    created = held[-1].created_at  # exact tie on created_at
                held.append(Snap(sid, created))
            # A missed day still prunes, so the invariants are checked every day.
            plan_now = now + timedelta(seconds=rng.uniform(0, 900))
            result = check_plan(held, policy, plan_now)
            kept = set(result.keep_ids)
            held = [s for s in held if s.id in kept]
    assert held  # the daemon never ends up with nothing


def test_dated_protocol_accepts_plain_objects() -> None:
    # Structural typing: any object with .id and .created_at works.
    class Row:
        def __init__(self, id: str, created_at: datetime) -> None:
            self.id = id
            self.created_at = created_at

    rows: list[Dated] = [Row("r1", at("2026-01-01T00:00")), Row("r2", at("2026-01-02T00:00"))]
    assert plan(rows, RetentionPolicy(), at("2026-01-03T00:00")).keep_ids == ("r2", "r1")


def test_thousands_of_snapshots_is_cheap() -> None:
    # Five years of hourly snapshots: one sort and linear passes.
    start = at("2021-01-01T00:00")
    snaps = [Snap(f"h{i}", start + timedelta(hours=i)) for i in range(5 * 365 * 24)]
    result = plan(snaps, RetentionPolicy(), snaps[-1].created_at)
    assert len(result.keep) == 14
    assert len(result.keep) + len(result.delete) == len(snaps)
