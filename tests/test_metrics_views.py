"""The metrics' pure views over observations (drdaemon/metrics/views.py): properties."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from drdaemon.metrics import (
    ListedSnapshot,
    OrphanSeen,
    SourceListing,
    orphan_views,
    source_view,
)

REGIONS = ("eu", "us", "ap")
regions = st.lists(st.sampled_from(REGIONS), unique=True).map(tuple)
orphans = st.lists(st.builds(OrphanSeen, st.sampled_from(("db", "files")), st.sampled_from(REGIONS),
                             st.sampled_from(("keep", "delete", "lost")),
                             st.integers(0, 1 << 40), st.floats(0, 2e9)))
snapshots = st.lists(st.builds(ListedSnapshot, st.uuids().map(str), st.floats(0, 2e9), regions,
                               st.floats(0, 1e5), st.integers(0, 1 << 40),
                               st.integers(0, 1 << 40), st.integers(0, 1 << 40)),
                     unique_by=lambda s: s.id)


@given(orphans)
def test_orphan_views_sum_each_verdict_and_keep_its_oldest_sighting(seen: list[OrphanSeen]) -> None:
    views = orphan_views(seen)
    assert sum(v.objects for v in views.values()) == len(seen)
    for (source, region, verdict), v in views.items():
        mine = [o for o in seen if (o.source, o.region, o.verdict) == (source, region, verdict)]
        assert v.objects == len(mine)
        assert v.bytes == sum(o.size for o in mine)
        assert v.first_seen == min(o.first_seen for o in mine)


@given(snapshots, st.lists(st.sampled_from(REGIONS)).map(tuple), regions, st.booleans(),
       st.booleans(), st.data())
def test_source_view_counts_what_the_listing_holds(
        snaps: list[ListedSnapshot], unreadable: tuple[str, ...], reachable: tuple[str, ...],
        attempted: bool, pending: bool, data: st.DataObject) -> None:
    top = data.draw(st.sampled_from([None, *snaps]))
    listing = SourceListing("db", tuple(snaps), unreadable, top.id if top else None,
                            top.regions if top else (), attempted, pending)
    v = source_view(listing, reachable)
    for r in {*REGIONS, *reachable}:
        held = [s.consistency_time for s in snaps if r in s.regions]
        assert v.retained.get(r, 0) == len(held)
        assert (r in v.retained) == (r in reachable or bool(held))  # a reachable region: 0
        assert v.newest.get(r) == (max(held) if held else None)
        assert v.oldest.get(r) == (min(held) if held else None)
        assert v.unreadable.get(r, 0) == unreadable.count(r)
    assert v.holding_newest == listing.holding_newest
    assert v.stored_bytes == (top.stored_bytes if top else None)
    assert v.duration == (top.duration if top else None)
    assert v.last_attempt_ok == ((not pending) if attempted else None)
