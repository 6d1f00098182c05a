"""The pure parts of erasure: which object versions step 2 deletes (plan_objects), the
certificate (authenticated JSON round trip, HTML escaping), and the shared-source rule of
tenancy.py."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drdaemon import layout
from drdaemon.config import Config, SourceConfig
from drdaemon.erasure import plan_objects, snapshot_versions
from drdaemon.erasure_cert import (
    STATE_FOLDER,
    Check,
    DestroyedKey,
    ErasureCertificate,
    LockedObject,
    StoredObject,
    parse,
    render_html,
    serialize,
)
from drdaemon.errors import IntegrityError
from drdaemon.keys import ManifestKey
from drdaemon.storage import ObjectVersion
from drdaemon.tenancy import ages_out_by, shared_sources, sources_of

KEY = ManifestKey(b"k" * 32)
T0 = datetime(2031, 3, 1, 2, 0, tzinfo=UTC)
HOSTILE = "<script>alert('x')</script>&"


def cert(**over: object) -> ErasureCertificate:
    base = ErasureCertificate(
        tenant="uni-a", started_at=T0, finished_at=T0 + timedelta(minutes=3),
        sources=("a-files",), places=("eu", "us", STATE_FOLDER),
        keys=(DestroyedKey("0123456789abcdef", "sha256:00112233aabbccdd", True),),
        key_copies=(StoredObject("eu", "tenants/uni-a/keys/0123456789abcdef.age", "v1", 300),
                    StoredObject(STATE_FOLDER, "tenants/uni-a/keys/0123456789abcdef.age")),
        deleted=(StoredObject("us", "sources/a-files/manifests/x.json", "v2", 900),),
        locked=(LockedObject("eu", "sources/a-files/data/x.tar.zst.age", "v3",
                             T0 + timedelta(days=80)),),
        check=Check(True, ("eu", "us", STATE_FOLDER)))
    return dataclasses.replace(base, **over)  # type: ignore[arg-type]


def test_json_round_trips_authenticated_and_names_itself() -> None:
    c = cert()
    assert c.ok and c.name == "tenants/uni-a/erasure/20310301T020000Z.json"
    back = parse(serialize(c, KEY), KEY, "uni-a")
    assert back.body() == c.body()
    assert back.locked[0].retain_until == T0 + timedelta(days=80)


def test_an_altered_forged_or_misplaced_certificate_is_refused() -> None:
    raw = serialize(cert(), KEY)
    doc = json.loads(raw)
    doc["locked"] = []
    with pytest.raises(IntegrityError, match="authentication failed"):
        parse(json.dumps(doc).encode(), KEY)
    with pytest.raises(IntegrityError, match="authentication failed"):
        parse(raw, ManifestKey(b"o" * 32))
    with pytest.raises(IntegrityError, match="for tenant 'uni-a', found under 'uni-b'"):
        parse(raw, KEY, "uni-b")
    for junk in (b"", b"[]", b'{"mac": {}}', b"\xff"):
        with pytest.raises(IntegrityError):
            parse(junk, KEY)


def test_a_failed_check_makes_it_not_ok_and_says_what_is_left() -> None:
    left = StoredObject("us", "tenants/uni-a/keys/k.age", "v9")
    c = cert(check=Check(False, ("eu", STATE_FOLDER), (left,), (("us", "timed out"),)))
    assert not c.ok and json.loads(serialize(c, KEY))["ok"] is False
    assert c.check.summary() == ("FAILED: us: tenants/uni-a/keys/k.age (version v9); "
                                 "us could not be listed: timed out")
    assert not cert(errors=("eu: cannot delete x",)).ok


def test_html_is_self_contained_and_escapes_everything_from_storage() -> None:
    c = cert(errors=(HOSTILE,), sources=(HOSTILE,),
             locked=(LockedObject("eu", HOSTILE, "v<1>", T0),))
    html = render_html(c)
    assert "<script>" not in html and "&lt;script&gt;" in html and "v&lt;1&gt;" in html
    assert "default-src 'none'" in html and "http" not in html.replace("http-equiv", "")
    assert "2031-03-01 02:00:00 UTC" in html and "NOT COMPLETE" in html
    assert "0123456789abcdef" in render_html(cert()) and "Complete:" in render_html(cert())


def src(name: str, tenant: str, *, dsn: str | None = None, path: str | None = None,
        tenants: tuple[str, ...] = ()) -> SourceConfig:
    return SourceConfig(name, "postgres" if dsn else "directory", tenant, "paid", "@daily",
                        dsn=dsn, path=Path(path) if path else None, tenants=tenants)


def config(*sources: SourceConfig) -> Config:
    return Config("t.toml", None, None, None, {}, (), sources)  # type: ignore[arg-type]


def test_shared_sources_are_the_declared_ones_with_their_other_tenants() -> None:
    # Undeclared overlaps never load (config check refuses them: tests/test_tenancy.py).
    cfg = config(src("a-db", "a", dsn="host=db1 port=5432 dbname=lms user=x"),
                 src("lms", "a+b+e", dsn="postgresql://y@db1:5432/lms2", tenants=("a", "b", "e")),
                 src("c-db", "c", dsn="postgresql://y@db1:5432/other"),
                 src("files", "d+e", path="/srv/files", tenants=("d", "e")))
    assert [s.name for s in sources_of(cfg, "a")] == ["a-db", "lms"]
    shared = {s.source: s.others for s in shared_sources(cfg, "a")}
    assert shared == {"lms": ("b", "e")}
    assert {s.source: s.others for s in shared_sources(cfg, "e")} == {
        "lms": ("a", "b"), "files": ("d",)}
    assert shared_sources(cfg, "c") == []


@given(st.integers(0, 30), st.integers(0, 10), st.integers(0, 12), st.integers(0, 200),
       st.integers(0, 30))
def test_the_age_out_date_covers_every_tier_the_lock_and_the_trash(
        daily: int, weekly: int, monthly: int, lock_days: int, trash: int) -> None:
    s = src("a", "a", path="/x")
    r = dataclasses.replace(s.retention, daily=daily, weekly=weekly, monthly=monthly,
                            min_retention=timedelta(days=lock_days), trash_days=trash)
    by = ages_out_by(dataclasses.replace(s, retention=r), T0)
    assert by >= T0 + timedelta(days=daily + 7 * weekly + 28 * monthly + trash)
    assert by >= T0 + timedelta(days=lock_days + trash)


# -- step 2's plan -------------------------------------------------------------------------

IDS = ("20310301T020000Z-00000001", "20310302T020000Z-00000002")
NAMES = [layout.manifest_object_name("src", i) for i in IDS] + [
    layout.data_object_name("src", i, "directory") for i in IDS] + [
    layout.facts_object_name("src", IDS[0]), layout.trash_name("src", IDS[1], T0),
    layout.manifest_object_name("src2", IDS[0]),  # another source: never ours
    "sources/src/notes.txt", "sources/src/data/x.age", "sources/src/manifests/a/b.json"]
LOCK = st.one_of(st.none(), st.just("AccessDenied"),
                 st.integers(-5, 5).map(lambda d: T0 + timedelta(days=d)))
VERSIONS = st.lists(st.builds(ObjectVersion, st.sampled_from(NAMES),
                              st.sampled_from(("v1", "v2", "null")),
                              delete_marker=st.booleans()),
                    unique_by=lambda v: (v.name, v.version_id), max_size=25)


@given(VERSIONS, st.data())
def test_step_2_deletes_exactly_the_unlocked_versions_of_the_sources_own_names(
        versions: list[ObjectVersion], data: st.DataObject) -> None:
    asked = snapshot_versions("src", versions)
    locks = {(v.name, v.version_id): data.draw(LOCK) for v in asked}
    plan = plan_objects("src", versions, locks, T0)

    def ours(v: ObjectVersion) -> bool:
        p = layout.parse_object_name(v.name)
        return p is not None and p.source == "src"

    assert all(ours(v) for v in asked) and not any(v.delete_marker for v in asked)
    touched = [*plan.delete, *(v for v, _ in plan.locked), *(v for v, _ in plan.unknown)]
    assert all(ours(v) for v in touched)
    expired = [v for v in asked if locks[(v.name, v.version_id)] is None
               or (isinstance(locks[(v.name, v.version_id)], datetime)
                   and locks[(v.name, v.version_id)] <= T0)]  # type: ignore[operator]
    real = [v for v in plan.delete if not v.delete_marker]
    assert sorted(real, key=str) == sorted(expired, key=str)
    assert all(until > T0 for _, until in plan.locked)
    kept = {v.name for v, _ in plan.locked} | {v.name for v, _ in plan.unknown}
    markers = [v for v in plan.delete if v.delete_marker]
    assert {v.name for v in markers}.isdisjoint(kept)
    assert sorted(markers, key=str) == sorted(
        (v for v in versions if v.delete_marker and ours(v) and v.name not in kept), key=str)
    # versions before markers; within a snapshot, the manifest before its data
    assert plan.delete[: len(real)] == tuple(real)
    order = [layout.parse_object_name(v.name) for v in real]
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            assert a is not None and b is not None
            assert not (a.snapshot_id == b.snapshot_id and a.role == layout.DATA
                        and b.role == layout.MANIFESTS)
