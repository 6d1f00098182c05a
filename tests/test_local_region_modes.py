"""Local regions are owner-only under any umask (issue 22, item 6): manifests, data
objects and the audit mirror are 0600 in 0700 folders. Real backups through drctl under
umask 022, then every path in both regions is checked."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import directory_source, local_region, make_setup


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[path.relative_to(root).as_posix()] = stat.S_IMODE(path.lstat().st_mode)
    return found


@pytest.mark.usefixtures("umask_022")
def test_every_object_and_folder_of_a_local_region_is_owner_only(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "grades.csv").write_text("alice,1\n")
    setup = make_setup(tmp_path, [local_region("eu", tmp_path / "r" / "eu", "europe"),
                                  local_region("us", tmp_path / "r" / "us", "north-america")],
                       [directory_source("files", tree)])
    for _ in range(2):
        assert setup.drctl("backup").exit_code == 0
    for region in ("eu", "us"):
        modes = _modes(tmp_path / "r" / region)
        assert any(name.startswith("audit/") and name.endswith(".jsonl") for name in modes)
        assert any(name.endswith(".age") for name in modes), sorted(modes)
        for name, mode in modes.items():
            is_dir = (tmp_path / "r" / region / name).is_dir()
            assert mode == (0o700 if is_dir else 0o600), (region, name, oct(mode))
    assert stat.S_IMODE((tmp_path / "r").stat().st_mode) == 0o700
