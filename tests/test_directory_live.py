"""Directory backups of live, odd trees: entries that vanish or appear mid-walk, special
files with names that are not UTF-8, unreadable entries, paths longer than PATH_MAX."""

from __future__ import annotations

import io
import json
import os
import pwd
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
from support import Setup, directory_source, local_region, make_setup

from drdaemon.sources import directory
from drdaemon.sources.tree_walk import Walk, raise_problem

ROOT = os.geteuid() == 0


def make(tmp_path: Path, tree: Path, extra: str = "") -> Setup:
    return make_setup(tmp_path, [local_region("eu", tmp_path / "r-eu", "europe"),
                                 local_region("us", tmp_path / "r-us", "north-america")],
                      [directory_source("files", tree) + extra])


def test_special_file_with_a_non_utf8_name_commits_and_is_shown(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "notes.txt").write_text("hello")
    os.mkfifo(os.path.join(os.fsencode(tree), b"upload-\xe9t\xe9.fifo"))
    setup = make(tmp_path, tree)
    result = setup.drctl("backup")
    assert result.exit_code == 0, result.output
    assert "1 special files (sockets, FIFOs, devices: skipped): upload-\\xe9t\\xe9.fifo" \
        in result.stdout, result.stdout
    [snap] = setup.drctl_json("snapshots", "list")["snapshots"]
    shown = setup.drctl("snapshots", "show", snap["id"])
    assert "upload-\\xe9t\\xe9.fifo" in shown.stdout, shown.stdout
    facts = setup.drctl_json("snapshots", "show", snap["id"])["facts"]
    assert facts["skipped_special_files"] == ["upload-\\xe9t\\xe9.fifo"]
    assert facts["counts"]["skipped_special_files"] == 1


def test_a_folder_that_vanishes_between_listing_and_entering_is_skipped_and_listed(
        tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "tmp" / "unzip_0" / "deep").mkdir(parents=True)
    (tree / "tmp" / "unzip_0" / "deep" / "a.txt").write_text("a")
    (tree / "tmp" / "unzip_1").mkdir()
    (tree / "z.txt").write_text("z")
    walk = Walk(str(tree), raise_problem)
    seen = []
    for found in walk:
        seen.append(found.rel)
        if found.rel == "tmp/unzip_0":  # seen by lstat, gone before the walk enters it
            shutil.rmtree(tree / "tmp" / "unzip_0")
        if found.rel == "tmp/unzip_1":  # a file seen, then replaced by a folder
            pass
    assert seen == ["", "tmp", "tmp/unzip_0", "tmp/unzip_1", "z.txt"]
    assert walk.skipped.lists == {"vanished_during_backup": ["tmp/unzip_0"]}


def test_a_tree_churning_during_backups_commits_every_time(tmp_path: Path) -> None:
    """An LMS unpacking uploads in a temp folder: folders appear and vanish mid-walk."""
    tree = tmp_path / "tree"
    for i in range(40):
        (tree / "courses" / f"c{i:02d}").mkdir(parents=True)
        for j in range(40):
            (tree / "courses" / f"c{i:02d}" / f"f{j}.txt").write_text("x" * 100)
    (tree / "tmp").mkdir()
    setup = make(tmp_path, tree)
    stop = threading.Event()

    def churn() -> None:
        n = 0
        while not stop.is_set():
            d = tree / "tmp" / f"unzip_{n % 3}"
            (d / "a" / "b").mkdir(parents=True, exist_ok=True)
            for k in range(20):
                (d / "a" / "b" / f"{k}.bin").write_bytes(b"y" * 10)
            shutil.rmtree(d, ignore_errors=True)
            n += 1

    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    try:
        results = [setup.drctl("backup", "--json") for _ in range(4)]
    finally:
        stop.set()
        churner.join()
    for result in results:
        assert result.exit_code == 0, result.output
        [snap] = json.loads(result.stdout)
        assert snap["ok"], snap
    listed = setup.drctl_json("snapshots", "list")["snapshots"]
    assert len(listed) == 4


def test_paths_longer_than_path_max_back_up_and_restore(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    deep = os.fsencode(tree)
    fd = os.open(deep, os.O_RDONLY)
    for _ in range(24):  # 24 * 250 characters: well past PATH_MAX (4096)
        os.mkdir(b"d" * 249, dir_fd=fd)
        nxt = os.open(b"d" * 249, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    out = os.open(b"bottom.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(out, b"at the bottom\n")
    os.close(out)
    os.close(fd)
    setup = make(tmp_path, tree)
    [snap] = setup.drctl_json("backup")
    assert snap["ok"]
    target = tmp_path / "out"
    result = setup.drctl("restore", "latest", "--source", "files", "--to", str(target))
    assert result.exit_code == 0, result.stderr
    facts = setup.drctl_json("snapshots", "show", snap["snapshot_id"])["facts"]
    assert facts["files"] == 1 and facts["directories"] == 24


UNPRIVILEGED = r"""
import io, json, shutil, sys
from pathlib import Path
from drdaemon.errors import SourceError
from drdaemon.sources import directory
try:
    with directory.dump(Path(sys.argv[1]), on_unreadable=sys.argv[2]) as d:
        data = d.stream.read()
        facts = d.finish()
except SourceError as exc:
    print(json.dumps({"error": str(exc)}))
else:
    Path(sys.argv[3]).write_bytes(data)
    print(json.dumps({"facts": facts}))
"""


@pytest.mark.skipif(not ROOT, reason="runs the backup as another user through setpriv")
def test_on_unreadable_fail_says_one_short_line_and_skip_lists(tmp_path: Path) -> None:
    user = pwd.getpwnam("nobody")
    work = Path("/tmp") / f"drdaemon-unreadable-{os.getpid()}"
    tree = work / "tree"
    long_name = "L" * 200
    (tree / "ok").mkdir(parents=True)
    (tree / "ok" / "a.txt").write_text("a")
    (tree / "secret").mkdir()
    (tree / "secret" / "inside.txt").write_text("s")
    (tree / long_name).write_text("0000")
    try:
        for p in [work, *work.rglob("*")]:
            os.chown(p, user.pw_uid, user.pw_gid)
        os.chmod(tree / "secret", 0)
        os.chmod(tree / long_name, 0)

        def run(mode: str) -> dict:
            proc = subprocess.run(
                ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                 "--clear-groups", "--", sys.executable, "-c", UNPRIVILEGED, str(tree), mode,
                 str(work / "out.tar")], capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr
            return json.loads(proc.stdout)

        failed = run("fail")["error"]
        assert "Permission denied" in failed and len(failed) < 200, failed
        assert "LLLL…LLLL" in failed or "secret" in failed, failed
        facts = run("skip")["facts"]
        assert facts["skipped_unreadable"] == [long_name, "secret"]
        assert facts["counts"]["skipped_unreadable"] == 2
        with tarfile.open(work / "out.tar") as tar:
            names = tar.getnames()
        assert "ok/a.txt" in names and long_name not in names
        assert "secret/inside.txt" not in names
    finally:
        os.chmod(tree / "secret", 0o700)
        shutil.rmtree(work)


def test_on_unreadable_is_checked_in_the_config(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    setup = make(tmp_path, tree, 'on_unreadable = "ignore"\n')
    result = setup.drctl("config", "check")
    assert result.exit_code == 2
    assert "on_unreadable" in result.stderr and "'fail' or 'skip'" in result.stderr


def test_backup_output_lists_what_changed_while_read(tmp_path: Path) -> None:
    """changed_during_backup is said in the plain output, not only in --json."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_text("a")
    with directory.dump(tree) as d:
        shutil.copyfileobj(d.stream, io.BytesIO())
        facts = d.finish()
    facts["changed_during_backup"] = ["growing.log"]
    facts["counts"]["changed_during_backup"] = 7
    lines = directory.facts_lines(facts, shown=5)
    assert lines == ["7 changed while read (cut or zero-padded): growing.log, … 6 more"]
    assert directory.facts_lines({"files": 1}) == []
