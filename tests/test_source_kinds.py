"""Source kinds are plug-ins (issue 13, item 3): a kind defined in the test suite
(tests/kinds/notes.py) is backed up, restored and drilled by the unchanged
services, and no module outside sources/ switches on a kind's name."""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from kinds.notes import NOTES
from support import Setup, local_region, make_setup

from drdaemon import layout, sources
from drdaemon.sources.base import SourceKind

PACKAGE = Path(__file__).resolve().parent.parent / "drdaemon"


@pytest.fixture
def notes_kind() -> Iterator[SourceKind]:
    kind = sources.register(NOTES)
    yield kind
    sources.unregister(NOTES.name)


def notes_setup(tmp_path: Path, folder: Path) -> Setup:
    regions = [local_region("eu-local", tmp_path / "eu", "europe"),
               local_region("us-local", tmp_path / "us", "north-america")]
    source = (f'[[sources]]\nname = "memos"\nkind = "notes"\ntenant = "uni-a"\n'
              f'tier = "paid"\npath = "{folder}"\n')
    return make_setup(tmp_path, regions, [source])


@pytest.fixture
def memos(tmp_path: Path) -> Path:
    folder = tmp_path / "memos"
    folder.mkdir()
    (folder / "a.txt").write_text("first memo\n" * 50)
    (folder / "b.bin").write_bytes(bytes(range(256)) * 40)
    return folder


def test_a_registered_kind_round_trips_through_backup_restore_and_drill(
        notes_kind: SourceKind, memos: Path, tmp_path: Path) -> None:
    setup = notes_setup(tmp_path, memos)
    [snap] = setup.drctl_json("backup")
    assert snap["ok"] and snap["regions"] == ["eu-local", "us-local"], snap
    data = list((tmp_path / "eu").rglob("*.notes.zst.age"))
    assert [p.name for p in data] == [f"{snap['snapshot_id']}.notes.zst.age"]
    assert layout.parse_object_name(
        layout.data_object_name("memos", snap["snapshot_id"], "notes")).kind == "notes"
    shown = setup.drctl_json("snapshots", "show", snap["snapshot_id"])
    # The kind's detached facts went to the facts object, its summary stayed inline.
    assert shown["facts"]["files"] == 2 and shown["facts"]["name_count"] == 2

    target = tmp_path / "restored"
    out = setup.drctl_json("restore", "latest", "--source", "memos", "--to", str(target))
    assert out["target"] == str(target)
    assert sorted(p.name for p in target.iterdir()) == ["a.txt", "b.bin"]
    assert (target / "b.bin").read_bytes() == (memos / "b.bin").read_bytes()
    # Restore options the kind does not take are refused, naming the kinds that do.
    refused = setup.drctl("restore", "latest", "--source", "memos", "--to",
                          str(tmp_path / "again"), "--jobs", "2")
    assert refused.exit_code == 2
    assert "--jobs applies to postgres sources only; memos is a notes source" in refused.stderr
    refused = setup.drctl("restore", "latest", "--source", "memos", "--to", "relative")
    assert refused.exit_code == 2 and "absolute path" in refused.stderr

    result = setup.drctl("drill", "run", "--json")
    [record] = json.loads(result.stdout)["drills"]
    assert result.exit_code == 0 and record["ok"] and record["verified"], record["reasons"]
    assert record["kind"] == "notes" and record["region"] == "us-local"
    assert record["evidence"]["files"] == 2
    assert record["evidence"]["digest"] == shown["facts"]["digest"]
    scratch = setup.state / "drills" / "scratch"
    assert not scratch.exists() or list(scratch.iterdir()) == []


def test_an_unregistered_kind_is_refused_by_the_config(memos: Path, tmp_path: Path) -> None:
    setup = notes_setup(tmp_path, memos)
    result = setup.drctl("backup")
    assert result.exit_code == 2
    assert "'postgres' or 'directory'" in result.stderr and "'notes'" in result.stderr


# -- no kind name is switched on outside sources/ -------------------------------------


def kind_switches(root: Path, names: frozenset[str]) -> list[str]:
    """Where a module outside `root/sources` compares with a kind's name, or keys a
    table by one: the places a new kind would have to be added to."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if "sources" in path.relative_to(root).parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare):
                consts = [node.left, *node.comparators]
            elif isinstance(node, ast.Dict):
                consts = [k for k in node.keys if k is not None]
            elif isinstance(node, ast.MatchValue):
                consts = [node.value]
            else:
                continue
            # `kind in ("postgres", ...)`: the names inside a literal container too
            consts = [e for c in consts for e in
                      (c.elts if isinstance(c, ast.Tuple | ast.List | ast.Set) else [c])]
            if any(isinstance(c, ast.Constant) and c.value in names for c in consts):
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


BUILT_IN = frozenset({"postgres", "directory", "postgres-cluster"})


def test_no_module_outside_sources_switches_on_a_kind() -> None:
    assert {k.name for k in sources.kinds()} == BUILT_IN
    assert kind_switches(PACKAGE, BUILT_IN) == []


@pytest.mark.parametrize("line", [
    'if source.kind == "postgres":\n    pass',
    'ok = m.kind != "directory"',
    'x = s.kind in ("postgres",)',
    'DETACHED = {"postgres": ("tables",)}',
    'match kind:\n    case "directory":\n        pass',
])
def test_the_check_sees_each_form_of_switch(tmp_path: Path, line: str) -> None:
    (tmp_path / "mod.py").write_text(line + "\n")
    (tmp_path / "sources").mkdir()
    (tmp_path / "sources" / "kind.py").write_text(line + "\n")  # allowed there
    assert [f.split(":")[0] for f in kind_switches(tmp_path, BUILT_IN)] == ["mod.py"]


def database_drivers_outside_sources(root: Path) -> list[str]:
    """Modules outside `root/sources` that import psycopg (the kinds' business)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        if "sources" in path.relative_to(root).parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "psycopg" or n.startswith("psycopg.") for n in names):
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_only_sources_import_the_database_driver(tmp_path: Path) -> None:
    assert database_drivers_outside_sources(PACKAGE) == []
    (tmp_path / "mod.py").write_text("def f():\n    from psycopg.conninfo import make_conninfo\n")
    assert database_drivers_outside_sources(tmp_path) == ["mod.py:2"]
