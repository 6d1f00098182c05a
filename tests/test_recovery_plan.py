"""The recovery plan (recovery_plan.py): properties of the pure plan, and golden examples."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drdaemon import recovery_plan as rp

DAY = 86400.0


def source(name: str, tier: str = "paid", size: int = 1000, regions: tuple[str, ...] = ("eu", "us"),
           held: tuple[str, ...] = ("eu", "us"), snap: str = "20261101T000000Z-aaaa",
           paid: bool | None = None, rto: float | None = None) -> rp.PlanSource:
    is_paid = tier != "free" if paid is None else paid
    return rp.PlanSource(name, f"t-{name}", tier, "directory", is_paid,
                         rto if rto is not None else (DAY if is_paid else 2 * DAY), regions,
                         (rp.Copy(snap, size, held),) if held else ())


def test_paid_first_then_tighter_target_then_smaller_and_the_free_eta_includes_the_paid() -> None:
    sources = [source("free-big", "free", 3000), source("paid-big", "paid", 2000),
               source("paid-small", "paid", 10), source("gold", "gold", 500, rto=3600.0)]
    # One drill, one size: all charged per byte, 0.01 s per byte, for every tier.
    plan = rp.build_plan(sources, {"paid-big": (2000, 20.0)})
    assert [i.source for i in plan.items] == ["gold", "paid-small", "paid-big", "free-big"]
    assert [i.eta for i in plan.items] == pytest.approx([5.0, 5.1, 25.1, 55.1])
    tiers = {t.tier: t for t in plan.tiers}
    assert [t.tier for t in plan.tiers] == ["gold", "paid", "free"]
    assert tiers["free"].eta == pytest.approx(55.1)  # after every paid restore
    assert tiers["paid"].eta == pytest.approx(25.1) and tiers["paid"].ok
    # Two at once: gold on one lane, both paid on the other; the free restore starts
    # when gold's lane frees up.
    two = rp.build_plan(sources, {"paid-big": (2000, 20.0)}, parallel=2)
    assert [i.lane for i in two.items] == [0, 1, 1, 0]
    assert two.tier_eta("free") == pytest.approx(5.0 + 30.0)


def test_a_lost_region_is_skipped_and_the_newest_copy_left_is_chosen() -> None:
    copies = (rp.Copy("20261102T000000Z-bbbb", 200, ("eu",)),
              rp.Copy("20261101T000000Z-aaaa", 100, ("eu", "us")))
    src = rp.PlanSource("db", "t", "paid", "postgres", True, DAY, ("eu", "us"), copies)
    assert rp.choose_copy(src, []) == (copies[0], "eu")
    assert rp.choose_copy(src, ["eu"]) == (copies[1], "us")
    plan = rp.build_plan([src, source("gone", held=("eu",))], {}, lost=["eu"])
    assert plan.item("db").region == "us" and plan.item("db").eta is None  # no drill yet
    gone = plan.item("gone").problem
    assert gone is not None and gone.startswith(rp.NO_COPY)
    assert plan.tiers[0].unrestorable == ("gone",) and plan.tiers[0].eta is None
    assert plan.tiers[0].ok is False  # the tier cannot be whole
    text = rp.render_markdown(plan)
    assert "unknown (no drill)" in text and "no-copy" in text and "INCOMPLETE" in text


def test_a_tier_over_its_target_is_judged_over() -> None:
    plan = rp.build_plan([source("a", size=100, rto=10.0), source("b", size=100, rto=10.0)],
                         {"a": (100, 6.0)})
    [t] = plan.tiers
    assert t.eta == pytest.approx(12.0) and t.ok is False
    assert "OVER" in rp.render_markdown(plan)


names = st.text("abcdefgh", min_size=1, max_size=6)


@st.composite
def plans(draw: st.DrawFn) -> tuple[list[rp.PlanSource], dict[str, tuple[int, float]], int]:
    chosen = draw(st.lists(names, min_size=1, max_size=12, unique=True))
    sources = [source(n, draw(st.sampled_from(["paid", "free", "gold"])),
                      draw(st.integers(0, 10**9)),
                      held=draw(st.sampled_from([("eu", "us"), ("us",), ("eu",), ()])))
               for n in chosen]
    drilled = draw(st.lists(st.sampled_from(chosen), unique=True))
    restores = {n: (draw(st.integers(1, 10**9)), draw(st.floats(0.001, 10**5))) for n in drilled}
    return sources, restores, draw(st.integers(1, 5))


@settings(max_examples=150, deadline=None)
@given(plans(), st.lists(st.sampled_from(["eu", "us"]), max_size=1))
def test_plan_properties(case: tuple[list[rp.PlanSource], dict[str, tuple[int, float]], int],
                         lost: list[str]) -> None:
    sources, restores, lanes = case
    plan = rp.build_plan(sources, restores, lost=lost, parallel=lanes)
    # Every source is present once, in order 1..n.
    assert sorted(i.source for i in plan.items) == sorted(s.name for s in sources)
    assert [i.order for i in plan.items] == list(range(1, len(sources) + 1))
    scheduled = [i for i in plan.items if i.start is not None]
    # Paid before free: no free restore starts before a paid one.
    paid = [i.start for i in scheduled if i.paid]
    free = [i.start for i in scheduled if not i.paid]
    if paid and free:
        assert max(paid) <= min(free)
    # Never negative; per lane, restores follow one another (monotone ETAs).
    for i in scheduled:
        assert i.start is not None and i.eta is not None and 0 <= i.start <= i.eta
        assert i.region not in lost
    for lane in range(lanes):
        mine = [i for i in scheduled if i.lane == lane]
        for a, b in itertools.pairwise(mine):
            assert a.eta is not None and b.start is not None and a.eta <= b.start
    # A tier ends with its last restore, never before the tiers restored ahead of it.
    for t in plan.tiers:
        if t.eta is not None:
            ends = [i.eta for i in scheduled if i.tier == t.tier]
            assert t.eta == max(ends, default=0.0)
    if restores:  # with any drill every restorable source has an ETA
        assert all(i.eta is not None for i in plan.items if not i.problem)


@given(st.lists(st.floats(0, 1e6), max_size=30), st.integers(1, 6))
def test_list_scheduling_starts_never_decrease_and_no_lane_idles(durations: list[float],
                                                                 lanes: int) -> None:
    slots = rp.schedule(durations, lanes)
    starts = [s for _, s, _ in slots]
    assert starts == sorted(starts)
    # Makespan is within list scheduling's bound: average load plus the longest job.
    if durations:
        assert max(e for _, _, e in slots) <= sum(durations) / lanes + max(durations) + 1e-6


def test_paid_is_a_tier_setting_default_true_but_for_free_and_trial(tmp_path: Path) -> None:
    from support import directory_source, local_region, make_setup

    from drdaemon import config as config_mod
    setup = make_setup(tmp_path, [local_region("eu", tmp_path / "eu", "europe"),
                                  local_region("us", tmp_path / "us", "north-america")],
                       [directory_source("a", tmp_path)],
                       extra='[tiers.trial]\nrpo = "24h"\nrto = "72h"\n'
                             '[tiers.gold]\nrto = "4h"\nrpo = "1h"\n'
                             '[tiers.bronze]\nrto = "4h"\nrpo = "1h"\npaid = false\n')
    tiers = config_mod.load(setup.config).tiers
    assert {n: t.paid for n, t in tiers.items()} == {
        "paid": True, "free": False, "trial": False, "gold": True, "bronze": False}
    setup.config.write_text(setup.config.read_text().replace("paid = false", 'paid = "no"'))
    with pytest.raises(config_mod.ConfigError, match=r"tiers\.bronze\.paid"):
        config_mod.load(setup.config)
