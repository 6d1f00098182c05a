"""CLI fuzzing: whatever argv an operator types, drctl ends cleanly, never in a traceback."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import directory_source, drctl, local_region, make_setup

WORDS = ["backup", "restore", "snapshots", "list", "show", "status", "prune", "replicate",
         "verify", "config", "check", "keys", "generate", "prove", "latest", "--source", "--to",
         "--region", "--force", "--json", "--dry-run", "--undo", "--id", "--deep",
         "--identity", "files", "nope", "eu", "../../etc", "20261123T000000Z-00000000", "",
         "--out", "-x", "\x00", "é"]


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.lists(st.one_of(st.sampled_from(WORDS), st.text(max_size=12)), max_size=6))
def test_any_argv_ends_cleanly(tmp_path: Path, argv: list[str]) -> None:
    cfg = tmp_path / "drdaemon.toml"
    if not cfg.exists():
        (tmp_path / "tree").mkdir()
        make_setup(tmp_path, [local_region("eu", tmp_path / "r-eu", "europe"),
                              local_region("us", tmp_path / "r-us", "north-america")],
                   [directory_source("files", tmp_path / "tree")])
    if argv[:2] == ["keys", "generate"] or "--out" in argv:
        return  # writes files wherever told: covered by its own tests
    # catch_exceptions=False: any exception escaping drctl fails the test.
    result = drctl(["--config", str(cfg), *argv])
    assert result.exit_code in (0, 1, 2), (argv, result.exit_code)
    assert "Traceback" not in result.stderr + result.stdout
    if result.exit_code == 2 and result.stderr.startswith("drctl: error:"):
        assert result.stderr.count("\n") == 1, result.stderr
