"""Configuration validation: every mistake is one clear line and exit code 2."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import drctl, local_region, make_setup, run_cli

from drdaemon import config
from drdaemon.errors import ConfigError
from drdaemon.units import parse_duration


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "tree").mkdir()
    setup = make_setup(
        tmp_path,
        [local_region("eu", tmp_path / "r-eu", "europe"),
         local_region("us", tmp_path / "r-us", "north-america")],
        ['[[sources]]\nname = "files"\nkind = "directory"\ntenant = "uni-a"\ntier = "paid"\n'
         f'path = "{tmp_path / "tree"}"\nschedule = "30 1 * * *"\n'])
    return setup.config


def test_valid_config_loads(base: Path) -> None:
    cfg = config.load(base)
    assert [r.name for r in cfg.regions] == ["eu", "us"]
    assert cfg.tiers["paid"].rto.total_seconds() == 24 * 3600
    assert cfg.tiers["free"].rto.total_seconds() == 48 * 3600
    assert cfg.sources[0].schedule == "30 1 * * *"
    assert cfg.warnings == ()
    result = drctl(["--config", str(base), "config", "check"])
    assert result.exit_code == 0 and "OK" in result.stdout


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


BAD = [
    # (old, new, words the one-line message must contain)
    ('tier = "paid"', 'tier = "gold"', ["sources[0].tier", "one of the tiers", "'gold'"]),
    ('tier = "paid"', "tier = 3", ["sources[0].tier", "a string", "3"]),
    ('schedule = "30 1 * * *"', 'schedule = "every day"', ["sources[0].schedule", "cron"]),
    ('schedule = "30 1 * * *"', 'schedule = "61 1 * * *"', ["sources[0].schedule", "cron"]),
    ('kind = "directory"', 'kind = "mysql"', ["sources[0].kind", "'postgres' or 'directory'"]),
    ('name = "files"', 'name = "Files/../x"', ["sources[0].name", "lowercase"]),
    ('tenant = "uni-a"', 'tenant = "uni-a"\ncolour = "blue"', ["sources[0].colour",
                                                               "unknown key"]),
    ('[daemon]', '[daemon]\ntimezone = "Mars/Olympus"', ["daemon.timezone", "time zone"]),
    ('[daemon]', '[daemon]\nmetrics_address = "nowhere"', ["daemon.metrics_address",
                                                           "host:port"]),
    ('[pipeline]', '[tiers.paid]\nrpo = "1 day"\n[pipeline]', ["tiers.paid.rpo", "duration"]),
    ('[pipeline]', '[tiers.paid]\nrpo = 24\n[pipeline]', ["tiers.paid.rpo", "duration"]),
    ('[pipeline]', '[tiers.gold]\nrpo = "1h"\n[pipeline]', ["tiers.gold.rto", "required"]),
    ("zstd_level = 3", "zstd_level = 30", ["pipeline.zstd_level", "1 to 19"]),
    ('part_size = "5MiB"', 'part_size = "1MiB"', ["pipeline.part_size", "5MiB"]),
    ('name = "us"', 'name = "eu"', ["regions[1].name", "duplicate 'eu'"]),
    ('kind = "local"', 'kind = "ftp"', ["regions[0].kind", "'s3' or 'local'"]),
    ('recipients = [', 'recipients = ["age1nope", ', ["keys.recipients[0]", "age"]),
    ('[daemon]', '[daemon]\nprove_schedule = "daily"', ["daemon.prove_schedule", "cron"]),
    ('manifest_key_file = "', 'proof_max_age = "0s"\nmanifest_key_file = "',
     ["keys.proof_max_age", "positive"]),
    ('recipients = [', 'recipients = [] #', ["keys.recipients", "at least one"]),
    ('manifest_key_file = "', 'manifest_key_file = "/nonexistent', ["keys.manifest_key_file",
                                                                    "existing file"]),
    ('identity_file = "', 'identity_file = "/nonexistent', ["keys.identity_file",
                                                            "existing file"]),
    ('[[sources]]', 'oops = [\n[[sources]]', ["not valid TOML"]),
]


@pytest.mark.parametrize(("old", "new", "words"), BAD, ids=[b[2][0] for b in BAD])
def test_bad_config_is_one_clear_line(base: Path, old: str, new: str, words: list[str]) -> None:
    edit(base, old, new)
    with pytest.raises(ConfigError):
        config.load(base)
    result = drctl(["--config", str(base), "config", "check"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert str(base) in result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


def test_fewer_than_two_regions(base: Path) -> None:
    text = base.read_text()
    start = text.index("[[regions]]", text.index("[[regions]]") + 1)
    base.write_text(text[:start] + text[text.index("[[sources]]"):])
    result = drctl(["--config", str(base), "config", "check"])
    assert result.exit_code == 2
    assert "at least two [[regions]]" in result.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    result = drctl(["--config", str(tmp_path / "nope.toml"), "config", "check"])
    assert result.exit_code == 2
    assert "config file not found" in result.stderr


def test_one_continent_is_a_loud_warning(base: Path) -> None:
    edit(base, 'continent = "north-america"', 'continent = "europe"')
    result = drctl(["--config", str(base), "config", "check"])
    assert result.exit_code == 0
    assert "WARNING" in result.stderr and "two continents" in result.stderr


def test_password_in_dsn_is_refused_and_never_echoed(base: Path) -> None:
    edit(base, "[[sources]]", '[[sources]]\nname = "db"\nkind = "postgres"\ntenant = "t"\n'
         'tier = "free"\ndsn = "postgresql://app:hunter2@db.example/lms"\n\n[[sources]]')
    result = drctl(["--config", str(base), "config", "check"])
    assert result.exit_code == 2
    assert "password" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


def test_env_var_names_the_config(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRDAEMON_CONFIG", str(base))
    result = drctl(["config", "check", "--json"])
    assert result.exit_code == 0
    assert '"config": "' + str(base) in result.stdout


def test_real_process_exit_code_and_no_traceback(base: Path) -> None:
    edit(base, 'tier = "paid"', 'tier = "gold"')
    for cmd in (["drctl", "--config", str(base), "config", "check"],
                ["drctl", "--config", str(base), "backup"],
                ["drdaemon", "--config", str(base), "run", "--once"]):
        proc = run_cli(*cmd)
        assert proc.returncode == 2, proc
        assert "Traceback" not in proc.stderr
        assert proc.stderr.startswith(cmd[0] + ": error: ")


toml_scalars = st.one_of(st.text(max_size=20), st.integers(), st.booleans(),
                         st.lists(st.text(max_size=5), max_size=3))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["state_dir", "metrics_address", "timezone", "zstd_level",
                            "part_size", "rpo", "name", "kind", "tier", "schedule", "path",
                            "continent", "recipients"]),
       value=toml_scalars)
def test_fuzzed_values_fail_cleanly(base: Path, key: str, value: object) -> None:
    """Whatever value lands on a key, loading either succeeds or raises ConfigError."""
    import json

    text = base.read_text()
    line = f"{key} = {json.dumps(value, ensure_ascii=False)}\n"
    fuzzed = base.with_name("fuzzed.toml")
    # Put the key in each table that may own it; duplicates give a TOML error, also fine.
    for anchor in ("[daemon]\n", "[pipeline]\n", "[[regions]]\n", "[[sources]]\n"):
        fuzzed.write_text(text.replace(anchor, anchor + line, 1))
        try:
            config.load(fuzzed)
        except ConfigError as exc:
            assert "\n" not in str(exc)


def test_shipped_example_config_is_valid(tmp_path: Path) -> None:
    """config/example.toml stays true to the code (key files pointed at real ones)."""
    from drdaemon.keys import generate_identity, generate_manifest_key
    from drdaemon.signing import generate_signing_key

    example = Path(__file__).parent.parent / "config" / "example.toml"
    generate_identity(tmp_path / "identity.txt")
    generate_manifest_key(tmp_path / "manifest.key")
    generate_signing_key(tmp_path / "signing.key")
    copy = tmp_path / "example.toml"
    copy.write_text(example.read_text().replace("/etc/drdaemon/", f"{tmp_path}/"))
    cfg = config.load(copy)
    assert {r.continent for r in cfg.regions} == {"europe", "north-america"}
    assert {s.tier for s in cfg.sources} == {"paid", "free"}
    # Only the directory that does not exist on a test machine is warned about.
    assert len(cfg.warnings) == 1 and "moodledata" in cfg.warnings[0]


def test_embedded_default_config_is_valid() -> None:
    cfg = config.load(config.default_config_path())
    assert cfg.keys.generate and len(cfg.regions) == 2 and cfg.warnings == ()
    assert (Path(__file__).parent.parent / "config" / "drdaemon.toml").resolve() == \
        config.default_config_path().resolve()


def test_retention_defaults_and_per_source_override(base: Path) -> None:
    edit(base, "[pipeline]", "[retention]\ndaily = 10\nmin_age = \"2h\"\n\n[pipeline]")
    edit(base, 'tenant = "uni-a"', 'tenant = "uni-a"\nretention = { monthly = 6 }')
    cfg = config.load(base)
    assert cfg.retention.daily == 10
    own = cfg.sources[0].retention
    assert (own.daily, own.weekly, own.monthly, own.min_age.total_seconds()) == (10, 4, 6, 7200)


def test_orphan_grace_default_global_and_per_source(base: Path) -> None:
    cfg = config.load(base)
    assert cfg.retention.orphan_grace == cfg.sources[0].retention.orphan_grace == timedelta(days=1)
    edit(base, "[pipeline]", '[retention]\norphan_grace = "6h"\n\n[pipeline]')
    edit(base, "[[sources]]", '[[sources]]\nname = "slow"\nkind = "directory"\n'
         f'tenant = "uni-a"\ntier = "free"\npath = "{base.parent / "tree"}"\n'
         'retention = { orphan_grace = "3d" }\n\n[[sources]]')
    cfg = config.load(base)
    assert cfg.retention.orphan_grace == timedelta(hours=6)
    grace = {s.name: s.retention.orphan_grace for s in cfg.sources}
    assert grace == {"slow": timedelta(days=3), "files": timedelta(hours=6)}
    for edge in ("1h", "28d", "4w"):
        edit(base, 'orphan_grace = "3d"', f'orphan_grace = "{edge}"')
        assert config.load(base).source("slow").retention.orphan_grace == parse_duration(edge)
        edit(base, f'orphan_grace = "{edge}"', 'orphan_grace = "3d"')


@pytest.mark.parametrize("value", ['"59m"', '"3599s"', '"29d"', '"5w"', '"0s"', '"1 day"',
                                   '"-1h"', "3600", "true", '"999999999999999d"'])
@pytest.mark.parametrize("where", ["global", "source"])
def test_bad_orphan_grace_is_one_line_and_exit_2(base: Path, value: str, where: str) -> None:
    if where == "global":
        edit(base, "[pipeline]", f"[retention]\norphan_grace = {value}\n\n[pipeline]")
        key = "retention.orphan_grace"
    else:
        edit(base, 'tenant = "uni-a"',
             f'tenant = "uni-a"\nretention = {{ orphan_grace = {value} }}')
        key = "sources[0].retention.orphan_grace"
    with pytest.raises(ConfigError):
        config.load(base)
    result = drctl(["--config", str(base), "config", "check"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert key in result.stderr and "a duration from 1h to 28d" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["daily", "weekly", "monthly", "trash_days", "min_age",
                            "min_retention", "max_delete_fraction", "orphan_grace"]),
       value=st.one_of(toml_scalars, st.floats(allow_nan=False),
                       st.from_regex(r"\A-?\d{1,16}(s|m|h|d|w)\Z")),
       per_source=st.booleans())
def test_fuzzed_retention_values_fail_cleanly(base: Path, key: str, value: object,
                                              per_source: bool) -> None:
    """[retention] and a source's `retention = {...}`: a value loads or is one clear line."""
    import json

    text = base.read_text()
    shown = json.dumps(value, ensure_ascii=False)
    fuzzed = base.with_name("fuzzed.toml")
    if per_source:
        fuzzed.write_text(text.replace('tenant = "uni-a"\n',
                                       f'tenant = "uni-a"\nretention = {{ {key} = {shown} }}\n'))
    else:
        fuzzed.write_text(text.replace("[pipeline]\n", f"[retention]\n{key} = {shown}\n\n"
                                       "[pipeline]\n", 1))
    try:
        cfg = config.load(fuzzed)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    grace = cfg.sources[0].retention.orphan_grace
    assert timedelta(hours=1) <= grace <= timedelta(days=28)


@pytest.mark.parametrize(("table", "line", "key"), [
    ("[retention]", "max_delete_fraction = 1.5", "retention.max_delete_fraction"),
    ("[retention]", "daily = -1", "retention.daily"),
    ("[retention]", "daily = 0\nweekly = 0\nmonthly = 0", "retention.daily"),
    ("[daemon]", 'prune_schedule = "whenever"', "daemon.prune_schedule"),
    ("[daemon]", "max_concurrent_snapshots = 0", "daemon.max_concurrent_snapshots"),
    ("[daemon]", 'takeover_interval = "0s"', "daemon.takeover_interval"),
    ("[daemon]", 'takeover_interval = "1h"', "daemon.takeover_interval"),
    ("[daemon]", 'deletions_lock_wait = "soon"', "daemon.deletions_lock_wait"),
])
def test_bad_retention_and_schedules(base: Path, table: str, line: str, key: str) -> None:
    anchor = "[daemon]" if table == "[daemon]" else "[pipeline]"
    edit(base, anchor, f"{table}\n{line}\n\n{anchor}" if table != "[daemon]"
         else f"[daemon]\n{line}")
    result = drctl(["--config", str(base), "config", "check"])
    assert result.exit_code == 2 and key in result.stderr, result.stderr


def test_config_with_a_byte_order_mark_loads(base: Path) -> None:
    # Windows editors (Notepad) save UTF-8 with a BOM; tomllib calls it an invalid statement.
    base.write_bytes(b"\xef\xbb\xbf" + base.read_bytes())
    cfg = config.load(base)
    assert [r.name for r in cfg.regions] == ["eu", "us"]
