"""Tenants in the config: parsing, the residency rule, and what `config check` refuses."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import directory_source, drctl, local_region, make_setup, postgres_source

from drdaemon import config, tenancy
from drdaemon.errors import ConfigError
from drdaemon.tenancy import Residency, TenantConfig

TENANTS = (
    '[[tenants]]\nname = "uni-eu"\ntier = "paid"\nresidency = { continents = ["europe"] }\n\n'
    '[[tenants]]\nname = "college-x"\ntier = "free"\nerase_after = 14\n\n'
)


def write(tmp_path: Path, sources: list[str], tenants: str = TENANTS,
          continents: tuple[str, str, str] = ("europe", "Europe", "North America")) -> Path:
    regions = [local_region(n, tmp_path / n, c)
               for n, c in zip(("eu-1", "eu-2", "us-1"), continents, strict=True)]
    home = tmp_path / f"setup-{len(list(tmp_path.glob('setup-*')))}"
    return make_setup(home, regions, sources, extra=tenants).config


def tree(tmp_path: Path, name: str) -> Path:
    p = tmp_path / name
    p.mkdir(parents=True, exist_ok=True)
    return p


def untiered(text: str) -> str:
    """A source table without its `tier` line: the tenant's tier applies."""
    return "\n".join(line for line in text.splitlines() if not line.startswith("tier ="))


def test_tenants_tier_residency_and_erase_after(tmp_path: Path) -> None:
    path = write(tmp_path, [untiered(directory_source("eu-files", tree(tmp_path, "a"),
                                                      tenant="uni-eu")),
                            untiered(directory_source("x-files", tree(tmp_path, "b"),
                                                      tenant="college-x")),
                            directory_source("x-own", tree(tmp_path, "c"), tier="paid",
                                             tenant="college-x")])
    cfg = config.load(path)
    assert [r.continent for r in cfg.regions] == ["europe", "europe", "north-america"]
    assert cfg.tenants["uni-eu"] == TenantConfig("uni-eu", "paid", Residency(("europe",)))
    assert cfg.tenants["college-x"].erase_after == timedelta(days=14)
    assert {s.name: s.tier for s in cfg.sources} == {"eu-files": "paid", "x-files": "free",
                                                     "x-own": "paid"}
    assert tenancy.regions_for(cfg, cfg.source("eu-files")) == ("eu-1", "eu-2")
    assert tenancy.regions_for(cfg, cfg.source("x-files")) == ("eu-1", "eu-2", "us-1")
    assert [s.name for s in tenancy.sources_of(cfg, "college-x")] == ["x-files", "x-own"]
    # An explicit residency silences the two-continents warning; the other has two.
    assert not [w for w in cfg.warnings if "continent" in w]
    out = drctl(["--config", str(path), "config", "check", "--json"])
    assert out.exit_code == 0, out.stderr
    shown = json.loads(out.stdout)["tenants"]
    assert shown["uni-eu"] == {"tier": "paid", "implicit": False,
                               "residency": {"continents": ["europe"]},
                               "regions": ["eu-1", "eu-2"], "erase_after_days": 28,
                               "sources": ["eu-files"]}
    assert shown["college-x"]["erase_after_days"] == 14


def test_old_configs_load_with_implicit_tenants(tmp_path: Path) -> None:
    path = write(tmp_path, [directory_source("files", tree(tmp_path, "a"), tenant="legacy")],
                 tenants="")
    cfg = config.load(path)
    assert cfg.tenants == {"legacy": TenantConfig("legacy", implicit=True)}
    assert cfg.tenants["legacy"].erase_after == timedelta(days=28)
    assert tenancy.regions_for(cfg, cfg.sources[0]) == ("eu-1", "eu-2", "us-1")
    assert tenancy.pick(cfg, "legacy") == list(cfg.sources)


@pytest.mark.parametrize(("tenants", "needle"), [
    ('[[tenants]]\nname = "t"\nresidency = { continents = ["asia"] }\n',
     "allows 0 configured region(s)"),
    ('[[tenants]]\nname = "t"\nresidency = { regions = ["eu-1"] }\n',
     "allows 1 configured region(s) (eu-1); at least 2 needed"),
    ('[[tenants]]\nname = "t"\nresidency = { regions = ["mars"] }\n', "tenants[0].residency"),
    ('[[tenants]]\nname = "t"\nresidency = { continents = ["atlantis"] }\n', "continents"),
    ('[[tenants]]\nname = "t"\nresidency = {}\n', "exactly one of"),
    ('[[tenants]]\nname = "t"\nerase_after = 29\n', "at most 28 days"),
    ('[[tenants]]\nname = "t"\nerase_after = "5w"\n', "tenants[0].erase_after"),
    ('[[tenants]]\nname = "t"\ntier = "gold"\n', "tenants[0].tier"),
    ('[[tenants]]\nname = "t"\n[[tenants]]\nname = "t"\n', "duplicate"),
    ('[[tenants]]\nname = "a+b"\n', "tenants[0].name"),
])
def test_bad_tenants_are_refused_in_one_line(tmp_path: Path, tenants: str,
                                             needle: str) -> None:
    path = write(tmp_path, [directory_source("files", tree(tmp_path, "a"), tenant="t")],
                 tenants=tenants)
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_an_old_spelling_of_a_continent_still_loads(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, [], continents=("europe", "europe", "America")))
    assert cfg.regions[2].continent == "north-america"


def test_unknown_continent_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, [], continents=("europe", "europa", "north-america"))
    with pytest.raises(ConfigError, match=r"regions\[1\]\.continent: expected one of africa"):
        config.load(path)


def test_two_tenants_on_one_database_are_refused_unless_shared(tmp_path: Path) -> None:
    dsn = "host=db.internal port=5432 dbname=lms user=backup"
    same = "host=DB.internal dbname=lms user=other"  # port 5432 by default
    refused = write(tmp_path, [postgres_source("a-db", dsn, tenant="uni-eu"),
                               postgres_source("x-db", same, tenant="college-x")])
    with pytest.raises(ConfigError, match=r"a-db .* and x-db .* hold the same database"):
        config.load(refused)
    other_db = write(tmp_path, [postgres_source("a-db", dsn, tenant="uni-eu"),
                                postgres_source("x-db", dsn.replace("lms", "x"),
                                                tenant="college-x")])
    assert len(config.load(other_db).sources) == 2
    shared = ('[[sources]]\nname = "lms"\nkind = "postgres"\ntenants = ["uni-eu", "college-x"]'
              f'\ntier = "paid"\ndsn = "{dsn}"\n')
    cfg = config.load(write(tmp_path, [shared]))
    src = cfg.source("lms")
    assert src.tenants == ("uni-eu", "college-x") and src.tenant == "uni-eu+college-x"
    # Shared: the regions both allow; and an up-front warning about erasure.
    assert tenancy.regions_for(cfg, src) == ("eu-1", "eu-2")
    assert [s.name for s in tenancy.sources_of(cfg, "college-x")] == ["lms"]
    warned = [w for w in cfg.warnings if "shared source" in w]
    assert len(warned) == 2 and "erasure promise cannot be kept" in warned[0]


def test_overlapping_trees_of_two_tenants_are_refused(tmp_path: Path) -> None:
    top = tree(tmp_path, "srv")
    inner = tree(tmp_path, "srv/x")
    path = write(tmp_path, [directory_source("a", top, tenant="uni-eu"),
                            directory_source("x", inner, tenant="college-x", tier="free")])
    with pytest.raises(ConfigError, match="overlapping directory trees"):
        config.load(path)
    # The same tenant's sources may overlap; that is no tenant's data under another name.
    path = write(tmp_path, [directory_source("a", top, tenant="uni-eu"),
                            directory_source("a2", inner, tenant="uni-eu")])
    assert len(config.load(path).sources) == 2


def test_shared_source_with_too_few_common_regions_is_refused(tmp_path: Path) -> None:
    tenants = ('[[tenants]]\nname = "a"\nresidency = { regions = ["eu-1", "eu-2"] }\n'
               '[[tenants]]\nname = "b"\nresidency = { regions = ["eu-2", "us-1"] }\n')
    shared = ('[[sources]]\nname = "lms"\nkind = "directory"\ntenants = ["a", "b"]\n'
              f'tier = "paid"\npath = "{tree(tmp_path, "t")}"\n')
    with pytest.raises(ConfigError, match="shared by a, b, whose residencies have 1 region"):
        config.load(write(tmp_path, [shared], tenants=tenants))


def test_the_two_continents_warning_is_per_tenant(tmp_path: Path) -> None:
    tenants = ('[[tenants]]\nname = "only-eu"\nresidency = { regions = ["eu-1", "eu-2"] }\n'
               '[[tenants]]\nname = "wide"\n')
    path = write(tmp_path, [directory_source("a", tree(tmp_path, "a"), tenant="only-eu"),
                            directory_source("b", tree(tmp_path, "b"), tenant="wide")],
                 tenants=tenants, continents=("europe", "europe", "europe"))
    warned = [w for w in config.load(path).warnings if "two continents" in w]
    assert len(warned) == 1 and "tenant wide" in warned[0]


@pytest.mark.parametrize(("body", "needle"), [
    ('tenant = "a"\ntenants = ["a", "b"]', "one of the two"),
    ('tenants = ["a"]', "two or more tenants"),
    ("", "tenant"),
])
def test_a_source_names_its_tenant_once(tmp_path: Path, body: str, needle: str) -> None:
    src = f'[[sources]]\nname = "s"\nkind = "directory"\n{body}\ntier = "paid"\npath = "/tmp"\n'
    with pytest.raises(ConfigError, match=needle):
        config.load(write(tmp_path, [src], tenants=""))


def test_a_source_without_tier_needs_its_tenant_to_give_one(tmp_path: Path) -> None:
    src = untiered(directory_source("s", tree(tmp_path, "a"), tenant="nobody"))
    with pytest.raises(ConfigError, match=r"sources\[0\]\.tier"):
        config.load(write(tmp_path, [src]))


@given(st.sampled_from(["Europe", " europe ", "NORTH AMERICA", "north_america",
                        "South-America", "oceania", "Antarctica", "asia", "africa"]))
def test_continent_spellings_normalise(text: str) -> None:
    assert tenancy.continent(text) in tenancy.CONTINENTS
    assert tenancy.continent(tenancy.continent(text)) == tenancy.continent(text)


@st.composite
def configs(draw: st.DrawFn) -> tuple[object, list[str]]:
    from types import SimpleNamespace as NS
    regions = [NS(name=f"r{i}", continent=draw(st.sampled_from(tenancy.CONTINENTS[:3])))
               for i in range(draw(st.integers(2, 5)))]
    names = ["t0", "t1", "t2"]
    tenants = {}
    for n in names:
        kind = draw(st.sampled_from(["none", "continents", "regions"]))
        res = (None if kind == "none" else
               Residency(continents=tuple(draw(st.sets(st.sampled_from(
                   tenancy.CONTINENTS[:3]), min_size=1)))) if kind == "continents" else
               Residency(regions=tuple(draw(st.sets(st.sampled_from(
                   [r.name for r in regions]), min_size=1)))))
        tenants[n] = TenantConfig(n, residency=res)
    sources = [NS(name=f"s{i}", kind="directory", dsn=None, path=None,
                  tenants=tuple(draw(st.sets(st.sampled_from(names), min_size=1))),
                  tenant="") for i in range(3)]
    return NS(regions=regions, sources=sources, tenants=tenants), [r.name for r in regions]


@given(configs())
def test_uploads_pass_the_gate_exactly_in_the_regions_a_source_is_written_to(
        drawn: tuple[object, list[str]]) -> None:
    cfg, regions = drawn
    for src in cfg.sources:  # type: ignore[attr-defined]
        home = tenancy.regions_for(cfg, src)  # type: ignore[arg-type]
        for owner in src.tenants:
            assert set(home) <= set(tenancy.allowed_regions(cfg, owner))  # type: ignore[arg-type]
        for region in regions:
            if region in home:
                tenancy.check_upload(cfg, src.name, region)  # type: ignore[arg-type]
            else:
                with pytest.raises(tenancy.ResidencyError, match="outside the residency"):
                    tenancy.check_upload(cfg, src.name, region)  # type: ignore[arg-type]


def test_timedelta_default_is_the_contract() -> None:
    assert tenancy.DEFAULT_ERASE_AFTER == tenancy.MAX_ERASE_AFTER == timedelta(days=28)


# -- the pure readers that route "every region" through the residency ------------------

def test_the_replication_plan_expects_and_repairs_only_home_regions() -> None:
    from test_replicate import SNAP, make_manifest

    from drdaemon.catalog import SnapshotEntry
    from drdaemon.replicate import DataStat, ReplicationReport, plan_replication

    m = make_manifest()
    # Held in eu (home) and in ap (a copy from before the residency); missing in us (home).
    entry = SnapshotEntry(SNAP, "lms", m, ["eu", "ap"])
    stats = {("lms", SNAP, "eu"): DataStat(m.size), ("lms", SNAP, "us"): DataStat(None),
             ("lms", SNAP, "ap"): DataStat(None)}
    plan = plan_replication([entry], ["eu", "us", "ap"], {}, stats, homes={"lms": ["eu", "us"]})
    assert [(r.region, r.sources) for r in plan.repairs] == [("us", ("eu",))]
    [snap] = plan.snapshots
    assert snap.expected == ["eu", "us"] and snap.outside == ["ap"]
    assert ReplicationReport(plan).summary()["copies"] == 2
    everywhere = plan_replication([entry], ["eu", "us", "ap"], {}, stats)
    assert {r.region for r in everywhere.repairs} == {"us", "ap"}


def test_holdings_count_bytes_snapshots_and_age_per_source() -> None:
    from datetime import UTC, datetime

    from drdaemon import inventory, layout

    old, new = "20261101T020000Z-00000001", "20261120T020000Z-00000002"
    listed = {
        "eu": [(layout.data_object_name("gone", old, "directory"), 100),
               (layout.manifest_object_name("gone", old), 10),
               (layout.data_object_name("gone", new, "directory"), 200),
               (layout.manifest_object_name("gone", new), 10),
               (layout.manifest_object_name("kept", new), 10),
               ("sources/gone/data/not-ours.bin", 999)],
        "us": [(layout.data_object_name("gone", new, "directory"), 200),
               (layout.manifest_object_name("gone", new), 10)],
    }
    found = inventory.holdings(listed, {"kept": "uni-a"})
    gone = found["gone"]
    assert not gone.managed and gone.tenant is None and found["kept"].managed
    assert gone.bytes == {"eu": 320, "us": 210} and gone.objects == 6
    assert gone.snapshot_ids() == {old, new}
    assert gone.oldest == datetime(2026, 11, 1, 2, tzinfo=UTC)
    assert gone.age(datetime(2026, 11, 21, 2, tzinfo=UTC)) == timedelta(days=1)


@pytest.mark.parametrize(("record", "expected"), [
    ({"event": "restore", "tenant": "uni-a", "source": "x"}, True),
    ({"event": "snapshot.committed", "tenant": "uni-a+uni-b", "source": "lms"}, True),
    ({"event": "verify.finished", "tenants": ["uni-a"], "sources": ["db"]}, True),
    ({"event": "restore", "source": "db"}, True),  # written before records named tenants
    ({"event": "verify.finished", "sources": ["db", "other"]}, True),
    ({"event": "restore", "tenant": "uni-b", "source": "db"}, False),  # db was uni-b's then
    ({"event": "prune.trash", "source": "other"}, False),
    ({"event": "key.generated"}, False),
])
def test_which_audit_records_touch_a_tenant(record: dict[str, object], expected: bool) -> None:
    from drdaemon import inventory

    assert inventory.touches(record, "uni-a", ["db"]) is expected


def test_the_daemons_tenants_job_feeds_the_unmanaged_metrics(tmp_path: Path) -> None:
    from drdaemon import layout, metrics
    from drdaemon.runtime import open_runtime
    from drdaemon.scheduler import Daemon

    path = write(tmp_path, [directory_source("kept", tree(tmp_path, "a"), tenant="uni-eu")])
    rt = open_runtime(config.load(path))
    snap = "20261101T020000Z-00000001"
    for region in ("eu-1", "us-1"):  # a departed source's data; its manifest is not ours
        obj = rt.store(region).root / layout.manifest_object_name("gone", snap)  # type: ignore[attr-defined]
        obj.parent.mkdir(parents=True)
        obj.write_bytes(b"{}")
    daemon = Daemon(rt)
    jobs = {name: expr for name, expr, _ in daemon._maintenance()}
    assert jobs["tenants"] == rt.config.daemon.replicate_schedule
    inv = daemon.take_inventory()
    assert [h.source for h in inv.unmanaged()] == ["gone"]
    get = metrics.build_registry(daemon.metrics, rt.clock).get_sample_value
    labels = {"source": "gone", "tenant": ""}
    assert get("drdaemon_unmanaged_bytes", labels) == 4
    assert get("drdaemon_unmanaged_newest_snapshot_timestamp_seconds", labels) == \
        layout.id_time(snap).timestamp()
    assert get("drdaemon_unmanaged_erase_after_seconds", labels) == 28 * 86400


def test_a_shared_source_goes_where_all_its_tenants_allow_and_is_theirs(
        tmp_path: Path) -> None:
    files = tree(tmp_path, "shared")
    (files / "f.txt").write_text("both tenants' data " * 100)
    shared = ('[[sources]]\nname = "lms-files"\nkind = "directory"\n'
              f'tenants = ["uni-eu", "college-x"]\ntier = "paid"\npath = "{files}"\n')
    path = write(tmp_path, [shared])
    result = drctl(["--config", str(path), "backup", "--tenant", "college-x", "--json"])
    assert result.exit_code == 0, result.stderr
    [done] = json.loads(result.stdout)
    assert done["regions"] == ["eu-1", "eu-2"]
    assert not (tmp_path / "us-1" / "sources").exists()
    for tenant in ("uni-eu", "college-x"):
        out = drctl(["--config", str(path), "tenant", "show", tenant, "--json"])
        shown = json.loads(out.stdout)
        assert shown["shared_sources"] == ["lms-files"] and shown["regions"] == ["eu-1", "eu-2"]
        access = drctl(["--config", str(path), "tenant", "access", tenant, "--json"])
        # the shared source's own key (made by its first backup), then the snapshot
        made, record = json.loads(access.stdout)["records"]
        assert made["event"] == "tenant_key.created" and record["event"] == "snapshot.committed"
        assert made["tenant"] == record["tenant"] == "uni-eu+college-x"


@given(st.lists(st.tuples(st.sampled_from(["directory", "postgres"]),
                          st.lists(st.sampled_from(["a", "b", "c"]), max_size=3)),
                max_size=8))
def test_overlaps_are_exactly_the_pairs_holding_the_same_data(
        drawn: list[tuple[str, list[str]]]) -> None:
    from types import SimpleNamespace as NS

    sources = [NS(name=f"s{i}", kind=kind, tenant="t", tenants=(),
                  path=Path("/srv", *parts) if kind == "directory" else None,
                  dsn=f"host=db port=5432 dbname={'_'.join(parts) or 'x'}"
                  if kind == "postgres" else None)
               for i, (kind, parts) in enumerate(drawn)]
    brute = set()
    for i, a in enumerate(sources):
        for j in range(i + 1, len(sources)):
            b = sources[j]
            if a.kind == b.kind == "directory" and (
                    a.path == b.path or a.path in b.path.parents or b.path in a.path.parents):
                brute.add((i, j, "overlapping directory trees"))
            if a.kind == b.kind == "postgres" and a.dsn == b.dsn:
                brute.add((i, j, "the same database"))
    assert set(tenancy.overlaps(sources)) == brute  # type: ignore[arg-type]


def test_a_thousand_separate_sources_overlap_nowhere() -> None:
    from types import SimpleNamespace as NS

    sources = [NS(name=f"s{i}", kind="directory", tenant=f"t{i}", tenants=(), dsn=None,
                  path=Path("/srv/moodledata", f"tenant-{i}")) for i in range(1000)]
    sources += [NS(name=f"d{i}", kind="postgres", tenant=f"t{i}", tenants=(), path=None,
                   dsn=f"host=db dbname=lms_{i}") for i in range(1000)]
    assert tenancy.overlaps(sources) == []  # type: ignore[arg-type]
