"""The storage layout (drdaemon/layout.py): every name drdaemon writes parses back to what it
was made from, and nothing named otherwise parses as one of ours (prune deletes only those)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drdaemon import layout, orphans, prune_plan
from drdaemon.config import NAME_RE
from drdaemon.layout import DATA, FACTS, MANIFESTS, TRASH, SnapshotObject

PROPERTY = settings(max_examples=300, deadline=None)

sources = st.from_regex(NAME_RE, fullmatch=True)
times = st.datetimes(min_value=datetime(1000, 1, 1), max_value=datetime(9999, 12, 31),
                     timezones=st.just(UTC))
ids = st.one_of(times.map(layout.new_snapshot_id),
                st.from_regex(layout.ID_RE, fullmatch=True).filter(
                    lambda i: i.isascii() and "\n" not in i))
kinds = st.sampled_from(sorted(layout.KINDS))
# What a stray object's name adds to one of ours: none of it may still parse.
damage = st.sampled_from(["\n", " ", ".tmp", "/", "/x", ".json", "x", "-0"])


def real_date(snap_id: str) -> bool:
    """Whether an id of the right form also names a second that exists."""
    try:
        layout.id_time(snap_id)
    except ValueError:
        return False
    return True


def names_of(source: str, snap_id: str, kind: str, at: datetime) -> dict[str, SnapshotObject]:
    """Every name of one snapshot, with what it must parse back to."""
    return {
        layout.data_object_name(source, snap_id, kind): SnapshotObject(source, snap_id, DATA,
                                                                        kind=kind),
        layout.facts_object_name(source, snap_id): SnapshotObject(source, snap_id, FACTS),
        layout.manifest_object_name(source, snap_id): SnapshotObject(source, snap_id, MANIFESTS),
        layout.trash_name(source, snap_id, at): SnapshotObject(
            source, snap_id, TRASH, trashed_at=at.replace(microsecond=0)),
    }


@PROPERTY
@given(times)
def test_snapshot_ids_match_the_pattern_and_hold_their_second(at: datetime) -> None:
    snap_id = layout.new_snapshot_id(at)
    assert layout.is_snapshot_id(snap_id) and layout.ID_RE.fullmatch(snap_id)
    assert layout.id_time(snap_id) == at.replace(microsecond=0)
    assert layout.parse_stamp(layout.stamp(at)) == at.replace(microsecond=0)


@PROPERTY
@given(sources, ids, kinds, times)
def test_every_name_parses_back_to_its_source_id_and_kind(source: str, snap_id: str, kind: str,
                                                          at: datetime) -> None:
    made = names_of(source, snap_id, kind, at)
    for name, expected in made.items():
        assert name.startswith(layout.source_prefix(source))
        assert layout.parse_object_name(name) == expected
    manifest_name = layout.manifest_object_name(source, snap_id)
    trash_name = layout.trash_name(source, snap_id, at)
    assert manifest_name.startswith(layout.manifests_prefix(source))
    assert trash_name.startswith(layout.trash_prefix(source))
    assert layout.snapshot_id_from_manifest_name(manifest_name) == snap_id
    assert layout.parse_trash_name(trash_name) == (snap_id, at.replace(microsecond=0))
    assert layout.referenced_id(source, manifest_name) == snap_id
    assert layout.referenced_id(source, trash_name) == snap_id
    # The readers built on the layout agree with it.
    for name in (layout.data_object_name(source, snap_id, kind),
                 layout.facts_object_name(source, snap_id)):
        assert orphans.data_snapshot_id(source, name) == (snap_id if real_date(snap_id)
                                                          else None)
    entry = prune_plan.trash_entry(source, "eu", trash_name)
    assert entry is not None and (entry.source, entry.region, entry.snapshot_id,
                                  entry.trashed_at, entry.name) == (
        source, "eu", snap_id, at.replace(microsecond=0), trash_name)


@PROPERTY
@given(sources, ids, kinds, times, damage)
def test_a_name_with_anything_more_is_not_ours(source: str, snap_id: str, kind: str,
                                               at: datetime, extra: str) -> None:
    for name in names_of(source, snap_id, kind, at):
        assert layout.parse_object_name(name + extra) is None
        assert layout.parse_object_name(extra + name) is None
    assert layout.snapshot_id_from_manifest_name(
        layout.manifest_object_name(source, snap_id) + extra) is None
    assert layout.parse_trash_name(layout.trash_name(source, snap_id, at) + extra) is None


@PROPERTY
@given(sources, sources, ids, kinds)
def test_names_of_one_source_are_never_another_sources(a: str, b: str, snap_id: str,
                                                       kind: str) -> None:
    name = layout.data_object_name(a, snap_id, kind)
    assert (orphans.data_snapshot_id(b, name) is None) == (a != b or not real_date(snap_id))
    assert (layout.referenced_id(b, layout.manifest_object_name(a, snap_id)) is None) == (a != b)


@pytest.mark.parametrize("name", [
    "sources/s/trash/20261123T020000Z-1a2b3c4d.20261399T999999Z.json",  # no such time
    "sources/s/trash/20261123T020000Z-1a2b3c4d.20261123T020000Z.json\n",
    "sources/s/trash/20261123T020000Z-1a2b3c4d.json",
    "sources/s/trash/notes.txt",
])
def test_a_stray_trash_object_is_no_trash_entry(name: str) -> None:
    # A stray name whose stamp is no time made prune and replicate fail with a traceback.
    assert layout.parse_trash_name(name) is None
    assert layout.parse_object_name(name) is None
    assert prune_plan.trash_entry("s", "eu", name) is None


@pytest.mark.parametrize("name", [
    "sources/s/data/20261123T020000Z-1a2b3c4d.zip.zst.age",
    "sources/s/data/20261123T020000Z-1a2b3c4d.tar.zst",
    "sources/s/other/20261123T020000Z-1a2b3c4d.json",
    "sources/s/data/sub/20261123T020000Z-1a2b3c4d.tar.zst.age",
    "sources//data/20261123T020000Z-1a2b3c4d.tar.zst.age",
    "x/sources/s/data/20261123T020000Z-1a2b3c4d.tar.zst.age",
    "sources/s/manifests/20261123T020000Z-1A2B3C4D.json",
    "audit/host/0123456789abcdef/000000000000.jsonl",
])
def test_names_drdaemon_never_writes_do_not_parse(name: str) -> None:
    assert layout.parse_object_name(name) is None


def test_audit_mirror_names() -> None:
    assert layout.host_label("Web-01.Example.org") == "web-01.example.org"
    folder = layout.audit_mirror_folder("Web-01", "0123456789abcdef")
    assert folder == "audit/web-01/0123456789abcdef"
    assert layout.audit_segment_name(folder, 200) == f"{folder}/000000000200.jsonl"
