"""Schedules mean what crontab means: day 0 and 7 are Sunday."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drdaemon import cron

START = datetime(2026, 11, 23, tzinfo=UTC)  # a Monday


def fire_days(expr: str, n: int = 14) -> set[int]:
    """Crontab weekday numbers (Sunday = 0) of the next `n` fire times."""
    t = cron.trigger(expr, UTC)
    days, prev, now = set(), None, START
    for _ in range(n):
        nxt = t.get_next_fire_time(prev, now)
        assert nxt is not None
        days.add((nxt.weekday() + 1) % 7)
        prev, now = nxt, nxt + timedelta(seconds=1)
    return days


@pytest.mark.parametrize(("dow", "days"), [
    ("0", {0}), ("7", {0}), ("1", {1}), ("6", {6}), ("1-5", {1, 2, 3, 4, 5}),
    ("0,6", {0, 6}), ("*/2", {0, 2, 4, 6}), ("sun", {0}), ("mon-fri", {1, 2, 3, 4, 5}),
    ("*", set(range(7))),
])
def test_day_of_week_has_crontab_meaning(dow: str, days: set[int]) -> None:
    assert fire_days(f"0 5 * * {dow}") == days


@given(lo=st.integers(0, 7), span=st.integers(0, 7), step=st.integers(1, 4))
def test_numeric_ranges_match_crontab(lo: int, span: int, step: int) -> None:
    hi = min(7, lo + span)
    expected = {d % 7 for d in range(lo, hi + 1, step)}
    assert fire_days(f"0 5 * * {lo}-{hi}/{step}", n=21) == expected


@pytest.mark.parametrize("expr", ["0 5 * *", "0 5 * * 8", "0 5 * * 3-1", "61 * * * *"])
def test_invalid_expressions_are_refused(expr: str) -> None:
    with pytest.raises(ValueError):
        cron.trigger(expr, UTC)
