"""The tenant lifecycle model: pure decisions (properties) and its file in the state folder."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import directory_source, local_region, make_setup

from drdaemon import config as config_mod
from drdaemon import lifecycle
from drdaemon.config import SourceConfig
from drdaemon.errors import UsageError
from drdaemon.lifecycle import Erasure, Hold, TenantState
from drdaemon.metrics import ERASURE_OUTCOMES, TENANT_STATES
from drdaemon.runtime import Runtime, open_runtime
from drdaemon.scheduler import ERASURE_DONE, ERASURE_FAILED

T0 = datetime(2030, 1, 1, tzinfo=UTC)

ends = st.dates(min_value=date(2025, 1, 1), max_value=date(2035, 1, 1))
offsets = st.timedeltas(min_value=timedelta(days=-60), max_value=timedelta(days=60))
erase_afters = st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=28))
holds = st.none() | st.just(Hold("court order 12/3", "ops", "host-a", T0))


def erasures(end: date) -> st.SearchStrategy[Erasure | None]:
    start = lifecycle.end_instant(end)
    return st.none() | st.builds(
        Erasure, st.just(start), st.none() | st.just(start + timedelta(days=2)),
        st.none() | st.just("20300101T000000Z.json"))


@st.composite
def offboarded(draw: st.DrawFn) -> TenantState:
    end = draw(ends)
    return TenantState("uni-a", end, lifecycle.deadline(end, draw(erase_afters)),
                       draw(holds), draw(erasures(end)), draw(st.booleans()),
                       lifecycle.end_instant(end))


@given(ends, erase_afters)
def test_the_deadline_is_the_end_plus_erase_after(end: date, after: timedelta) -> None:
    due = lifecycle.deadline(end, after)
    assert due - after == datetime(end.year, end.month, end.day, tzinfo=UTC)
    assert lifecycle.deadline(end) - lifecycle.end_instant(end) == timedelta(days=28)


@given(offboarded(), offsets)
def test_overdue_and_due_soon_are_exactly_the_windows_around_the_deadline(
        s: TenantState, offset: timedelta) -> None:
    assert s.erase_due is not None
    now = s.erase_due + offset
    pending = not s.erased
    assert lifecycle.is_overdue(s, now) == (pending and offset > timedelta(0))
    assert lifecycle.due_within(s, now) == (pending and offset >= -timedelta(days=3))
    assert lifecycle.is_due(s, now) == (pending and offset >= -lifecycle.ERASE_LEAD)
    # Carried out before the deadline, inside the warning window.
    assert not lifecycle.is_due(s, now) or lifecycle.due_within(s, now)


@given(st.lists(offboarded(), max_size=6), offsets)
def test_a_hold_suspends_and_an_erasure_done_is_never_due_again(
        states: list[TenantState], offset: timedelta) -> None:
    states = [TenantState(f"t{i}", s.end, s.erase_due, s.hold, s.erasure,
                          s.final_snapshot_done) for i, s in enumerate(states)]
    now = T0 + offset
    due = lifecycle.due_erasures(states, now)
    for s in states:
        assert (s.tenant in due) == (lifecycle.is_due(s, now) and s.hold is None
                                     and not s.erased)
        if s.erased:
            assert lifecycle.state_name(s) == lifecycle.ERASED
            assert not lifecycle.is_overdue(s, now) and not lifecycle.due_within(s, now)
    assert due == sorted(due)


@given(offboarded())
def test_state_names_and_scheduling(s: TenantState) -> None:
    name = lifecycle.state_name(s)
    assert name == (lifecycle.ERASED if s.erased else lifecycle.HELD if s.hold
                    else lifecycle.OFFBOARDED)
    assert not lifecycle.still_scheduled(s)
    assert lifecycle.still_scheduled(None)
    assert lifecycle.still_scheduled(TenantState("uni-a"))
    assert lifecycle.state_name(TenantState("uni-a")) == lifecycle.ACTIVE


@given(st.lists(st.sampled_from(["uni-a", "uni-b", "uni-c"]), max_size=8),
       st.dictionaries(st.sampled_from(["uni-a", "uni-b", "uni-c"]), offboarded()))
def test_only_sources_of_tenants_not_offboarded_are_scheduled(
        tenants: list[str], states: dict[str, TenantState]) -> None:
    sources = [SourceConfig(f"s{i}", "directory", t, "paid", "0 2 * * *")
               for i, t in enumerate(tenants)]
    kept = lifecycle.scheduled(sources, states)
    assert kept == [s for s in sources if s.tenant not in states]
    active = {t: TenantState(t) for t in states}
    assert lifecycle.scheduled(sources, active) == sources


@given(offboarded())
def test_the_file_round_trips_and_keeps_what_others_wrote(s: TenantState) -> None:
    theirs = {"erasure": {"step": "keys destroyed"}, "shared": ["db"]}
    d = json.loads(json.dumps(lifecycle.to_dict(s, theirs)))
    assert lifecycle.from_dict("uni-a", d) == s
    assert d["shared"] == ["db"]
    if s.erasure is not None:
        assert d["erasure"]["step"] == "keys destroyed"
    assert lifecycle.describe(s)["state"] == lifecycle.state_name(s)


def test_metrics_know_every_state_and_outcome() -> None:
    assert TENANT_STATES == lifecycle.STATES
    assert set(ERASURE_OUTCOMES) == {ERASURE_DONE, ERASURE_FAILED}


# -- the file in the state folder ------------------------------------------------

def runtime(tmp_path: Path) -> Runtime:
    """A runtime over the config in `tmp_path` (written on first use)."""
    if (tmp_path / "drdaemon.toml").exists():
        return open_runtime(config_mod.load(tmp_path / "drdaemon.toml"))
    tree = tmp_path / "tree"
    tree.mkdir()
    setup = make_setup(tmp_path, [local_region("eu", tmp_path / "eu", "europe"),
                        local_region("us", tmp_path / "us", "north-america")],
                       [directory_source("files", tree)])
    return open_runtime(config_mod.load(setup.config))


def test_state_survives_a_new_runtime_and_keeps_the_erasure_key(tmp_path: Path) -> None:
    rt = runtime(tmp_path)
    assert lifecycle.load(rt, "uni-a") == TenantState("uni-a")
    end = date(2030, 1, 31)
    lifecycle.update(rt, "uni-a", lambda s: TenantState(
        "uni-a", end, lifecycle.deadline(end), final_snapshot_done=True))
    path = rt.config.daemon.state_dir / "tenants" / "uni-a" / "lifecycle.json"
    # The erasure service records its progress in the same file, its own way.
    raw = json.loads(path.read_text())
    raw["erasure"] = {"started": "2030-02-27T00:15:00+00:00", "deleted": 12}
    path.write_text(json.dumps(raw))
    lifecycle.save(rt, lifecycle.with_hold(lifecycle.load(rt, "uni-a"),
                                           Hold("audit", "ops", "h", T0)))

    again = runtime(tmp_path)
    s = lifecycle.load(again, "uni-a")
    assert s.end == end and s.erase_due == datetime(2030, 2, 28, tzinfo=UTC)
    assert s.hold is not None and s.final_snapshot_done
    assert s.erasure == Erasure(datetime(2030, 2, 27, 0, 15, tzinfo=UTC))
    assert json.loads(path.read_text())["erasure"]["deleted"] == 12
    assert path.stat().st_mode & 0o777 == 0o600
    assert lifecycle.recorded_tenants(again) == ["uni-a"]
    assert lifecycle.is_held(again, "uni-a")


def test_a_refused_change_writes_nothing_and_bad_files_are_named(tmp_path: Path) -> None:
    rt = runtime(tmp_path)

    def refuse(_s: TenantState) -> TenantState:
        raise UsageError("no")

    with pytest.raises(UsageError):
        lifecycle.update(rt, "uni-a", refuse)
    assert lifecycle.recorded_tenants(rt) == []
    path = rt.config.daemon.state_dir / "tenants" / "uni-a" / "lifecycle.json"
    path.write_text('{"end": "not a date"}')
    with pytest.raises(UsageError, match=r"tenants/uni-a/lifecycle\.json is malformed"):
        lifecycle.load(rt, "uni-a")
    with pytest.raises(UsageError, match="invalid tenant name"):
        lifecycle.load(rt, "../x")
