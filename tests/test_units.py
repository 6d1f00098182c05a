"""The text people read for durations, sizes, rates and times: one home, units.py.

`drctl drill`, the auditor's report and other commands render these values the
same way because they call the same functions; these tests pin the forms.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drdaemon.units import (
    against,
    duration,
    format_bytes,
    format_duration,
    format_utc,
    rate,
    size,
    when,
)


@pytest.mark.parametrize(("seconds", "text"), [
    (None, "—"), (0.0, "0.000s"), (0.0123, "0.012s"), (5.5, "5.5s"), (59.0, "59.0s"),
    (60.0, "1m"), (3661.0, "1h 1m"), (90061.0, "1d 1h"),
])
def test_duration_keeps_a_decimal_below_a_minute(seconds: float | None, text: str) -> None:
    assert duration(seconds) == text


@given(st.floats(min_value=60, max_value=10**9, allow_nan=False))
def test_a_minute_or_more_reads_as_format_duration(seconds: float) -> None:
    assert duration(seconds) == format_duration(timedelta(seconds=seconds))


@pytest.mark.parametrize(("value", "target", "text"), [
    (30.0, 60.0, "30.0s / 1m ✔"), (60.0, 60.0, "1m / 1m ✔"), (120.0, 60.0, "2m / 1m ✘ over"),
    (None, 60.0, "— / 1m"),
])
def test_against_marks_a_value_over_its_target(value: float | None, target: float,
                                               text: str) -> None:
    assert against(value, target) == text


@given(st.floats(min_value=0, max_value=10**7), st.floats(min_value=0, max_value=10**7))
def test_against_is_marked_over_exactly_when_the_value_exceeds_the_target(
        value: float, target: float) -> None:
    text = against(value, target)
    assert text.startswith(f"{duration(value)} / {duration(target)}")
    assert text.endswith(" ✘ over") == (value > target)
    assert text.endswith(" ✔") == (value <= target)


def test_sizes_and_rates_use_binary_units_and_a_dash_when_unknown() -> None:
    assert size(512) == "512 B" and size(1536) == "1.5 KiB" and size(None) == "—"
    assert rate(3 * 1024 * 1024) == "3.0 MiB/s" and rate(None) == "—"
    assert size(5 << 40) == format_bytes(5 << 40) == "5.0 TiB"


@pytest.mark.parametrize(("iso", "text"), [
    ("2026-11-23T02:00:00Z", "2026-11-23 02:00:00 UTC"),
    ("2026-11-23T03:00:00+01:00", "2026-11-23 02:00:00 UTC"),
    ("2026-11-23T02:00:00.123456+00:00", "2026-11-23 02:00:00 UTC"),
    ("not a time", "not a time"), ("", "—"), (None, "—"),
])
def test_when_reads_any_iso_time_in_utc_and_keeps_other_text(iso: str | None,
                                                             text: str) -> None:
    assert when(iso) == text


@given(st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 1, 1),
                    timezones=st.sampled_from([UTC, timezone(timedelta(hours=-7)),
                                               timezone(timedelta(hours=5, minutes=30))])))
def test_when_and_format_utc_name_the_same_second(t: datetime) -> None:
    assert when(t.isoformat()) == format_utc(t).replace("T", " ").replace("Z", " UTC")
