"""RPO/RTO evaluation: golden examples and properties (pure, no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from drdaemon import slo

T0 = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
PAID = slo.Targets(rpo=timedelta(hours=24), rto=timedelta(hours=24))

times = st.lists(st.integers(min_value=0, max_value=400 * 86400), max_size=40).map(
    lambda secs: [T0 + timedelta(seconds=s) for s in secs])
durations = st.integers(min_value=0, max_value=30 * 86400).map(lambda s: timedelta(seconds=s))
maybe = st.none() | durations


def codes(reasons: list[str]) -> list[str]:
    return [r.split(":", 1)[0] for r in reasons]


def test_golden_examples() -> None:
    daily = [T0 + timedelta(days=d) for d in range(7)]
    assert slo.worst_gap(daily) == timedelta(days=1)
    assert slo.worst_gap(daily[:3] + daily[5:]) == timedelta(days=3)
    assert slo.worst_gap([T0]) is None and slo.worst_gap([]) is None
    assert slo.rpo_at(T0, T0 + timedelta(hours=4)) == timedelta(hours=4)
    assert slo.rpo_at(T0 + timedelta(seconds=2), T0) == timedelta(0)  # source clock ahead
    assert slo.throughput(1000, 2.0) == 500.0
    assert slo.throughput(0, 2.0) is None and slo.throughput(10, 0.0) is None
    one = slo.fit_restore_model([(1000, 10.0)])
    assert slo.projected_tier_rto([1000, 3000], one) == timedelta(seconds=40)
    assert slo.projected_tier_rto([1000], None) is None
    assert slo.fit_restore_model([]) is None and slo.fit_restore_model([(0, 1.0)]) is None
    assert slo.evaluate(PAID, rto=timedelta(hours=24), rpo=timedelta(hours=24),
                        projected=timedelta(hours=24)) == []
    over = slo.evaluate(PAID, rto=timedelta(hours=25), rpo=timedelta(hours=30),
                        projected=timedelta(days=3))
    assert codes(over) == [slo.RTO_OVER, slo.RPO_OVER, slo.PROJECTED_RTO_OVER]
    assert "1d 1h" in over[0] and "target 1d" in over[0]
    assert "0.5s" in slo.evaluate(slo.Targets(timedelta(0), timedelta(0)),
                                  rto=timedelta(seconds=0.5), rpo=None, projected=None)[0]


@given(times)
def test_worst_gap_bounds_every_consecutive_gap(ts: list[datetime]) -> None:
    gap = slo.worst_gap(ts)
    ordered = sorted(set(ts))
    if len(ordered) < 2:
        assert gap is None
        return
    assert gap is not None
    gaps = [later - earlier for earlier, later in pairwise(ordered)]
    assert gap in gaps and all(g <= gap for g in gaps)
    assert gap <= ordered[-1] - ordered[0]
    assert slo.worst_gap(reversed(ts)) == gap  # order of the input does not matter


@given(times, st.integers(min_value=0, max_value=400 * 86400))
def test_adding_a_snapshot_never_widens_the_worst_gap(ts: list[datetime], extra: int) -> None:
    before = slo.worst_gap(ts)
    new = T0 + timedelta(seconds=extra)
    after = slo.worst_gap([*ts, new])
    if before is not None and min(ts) <= new <= max(ts):
        assert after is not None and after <= before


@given(maybe, maybe, maybe, durations, durations)
def test_evaluate_fails_exactly_what_is_over(rto: timedelta | None, rpo: timedelta | None,
                                             projected: timedelta | None, rpo_t: timedelta,
                                             rto_t: timedelta) -> None:
    got = codes(slo.evaluate(slo.Targets(rpo_t, rto_t), rto=rto, rpo=rpo, projected=projected))
    assert (slo.RTO_OVER in got) == (rto is not None and rto > rto_t)
    assert (slo.RPO_OVER in got) == (rpo is not None and rpo > rpo_t)
    assert (slo.PROJECTED_RTO_OVER in got) == (projected is not None and projected > rto_t)


@given(st.lists(st.integers(min_value=0, max_value=1 << 40), max_size=20),
       st.lists(st.tuples(st.integers(1, 1 << 40), st.floats(0.001, 1e6)), min_size=1,
                max_size=10))
def test_projection_grows_with_every_source_and_is_never_negative(
        sizes: list[int], drills: list[tuple[int, float]]) -> None:
    model = slo.fit_restore_model(drills)
    assert model is not None and model.fixed_seconds >= 0 and model.seconds_per_byte >= 0
    assert model.fixed_seconds <= min(s for _, s in drills) + 1e-9
    got = slo.projected_tier_rto(sizes, model)
    assert got is not None and got >= timedelta(0)
    more = slo.projected_tier_rto([*sizes, 1], model)
    assert more is not None and more >= got


@given(st.floats(0.0, 60.0), st.floats(1e3, 1e9),
       st.lists(st.integers(1, 1 << 34), min_size=2, max_size=8, unique=True))
def test_model_recovers_fixed_cost_and_throughput(fixed: float, bps: float,
                                                  sizes: list[int]) -> None:
    model = slo.fit_restore_model([(b, fixed + b / bps) for b in sizes])
    assert model is not None
    for b in (1, 1 << 20, 1 << 40):
        want = fixed + b / bps
        assert abs(model.seconds(b) - want) <= 1e-6 * want + 1e-6


def test_tiny_database_does_not_decide_the_tier() -> None:
    # The case: a 917-byte database restored at 8.7 KiB/s (all set-up
    # time) and a 128 MiB one in 5 s. Bytes over the tiny one's rate projected
    # over 5 h; a fixed cost plus a throughput fitted to both projects ~5 s.
    drills = [(917, 917 / (8.7 * 1024)), (128 << 20, 5.0)]
    model = slo.fit_restore_model(drills)
    projected = slo.projected_tier_rto([917, 128 << 20], model)
    assert projected is not None and projected < timedelta(seconds=6)


@given(st.integers(min_value=-10**6, max_value=10**8))
def test_rpo_is_never_negative(offset: int) -> None:
    assert slo.rpo_at(T0, T0 + timedelta(seconds=offset)) >= timedelta(0)
