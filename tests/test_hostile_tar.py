"""Hostile snapshot content: restore never writes outside the target.

The tar is what a compromised or malicious tree could produce, wrapped in a
correctly signed manifest (the worst case: authentication cannot help), so
only the extraction (sources/tree_extract.py) and the size bounds stand between it and the host.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import zstandard
from pyrage import encrypt, x25519
from support import Setup, directory_source, local_region, make_setup

from drdaemon import layout, manifest
from drdaemon.keys import fingerprint, load_manifest_key


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    (tmp_path / "tree").mkdir()
    return make_setup(tmp_path, [local_region("eu", tmp_path / "r-eu", "europe"),
                                 local_region("us", tmp_path / "r-us", "north-america")],
                      [directory_source("files", tmp_path / "tree")])


def plant(setup: Setup, tar_bytes: bytes, *, plaintext_size: int | None = None,
          facts: dict | None = None) -> str:
    """Store `tar_bytes` as a correctly signed snapshot of source `files` in both regions."""
    now = datetime.now(UTC)
    snap_id = layout.new_snapshot_id(now)
    data = encrypt(zstandard.ZstdCompressor().compress(tar_bytes),
                   [x25519.Recipient.from_str(setup.recipient)])
    m = manifest.Manifest(
        id=snap_id, source="files", tenant="uni-a", tier="paid", kind="directory",
        consistency_time=now, started_at=now, finished_at=now,
        data_name=layout.data_object_name("files", snap_id, "directory"),
        sha256=hashlib.sha256(data).hexdigest(), size=len(data),
        compressed_size=0, plaintext_size=len(tar_bytes) if plaintext_size is None
        else plaintext_size, zstd_level=3, recipients=(fingerprint(setup.recipient),),
        facts=facts or {})
    blob = manifest.serialize(m, load_manifest_key(setup.manifest_key))
    for region in ("r-eu", "r-us"):
        root = setup.config.parent / region
        for name, content in ((m.data_name, data),
                              (layout.manifest_object_name("files", snap_id), blob)):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(content)
    return snap_id


def make_tar(add: Callable[[tarfile.TarFile], None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add(tar)
    return buf.getvalue()


def file_entry(tar: tarfile.TarFile, name: str, content: bytes = b"pwned", mode: int = 0o644,
               kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, link
    info.size = len(content) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(content) if kind == tarfile.REGTYPE else None)


def restore(setup: Setup, target: Path):
    return setup.drctl("restore", "latest", "--source", "files", "--to", str(target))


def nothing_left(tmp_path: Path, target: Path) -> None:
    assert not target.exists()
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".partial")]


HOSTILE = {
    "dotdot": lambda t: file_entry(t, "../escaped.txt"),
    "absolute": lambda t: file_entry(t, "/tmp/drdaemon-escaped-abs.txt"),
    "symlink-then-write-through": lambda t: (
        file_entry(t, "link", kind=tarfile.SYMTYPE, link=".."),
        file_entry(t, "link/escaped.txt")),
    "absolute-symlink-write-through": lambda t: (
        file_entry(t, "etc", kind=tarfile.SYMTYPE, link="/tmp"),
        file_entry(t, "etc/drdaemon-escaped-link.txt")),
    "hardlink-out": lambda t: file_entry(t, "hl", kind=tarfile.LNKTYPE,
                                         link="../../../../etc/passwd"),
    "device-node": lambda t: file_entry(t, "dev-null", kind=tarfile.CHRTYPE),
    "hardlink-inside": lambda t: (file_entry(t, "a"),
                                  file_entry(t, "b", kind=tarfile.LNKTYPE, link="a")),
    "fifo": lambda t: file_entry(t, "pipe", kind=tarfile.FIFOTYPE),
    "file-over-symlink": lambda t: (
        file_entry(t, "passwd", kind=tarfile.SYMTYPE, link="/tmp/drdaemon-escaped-abs.txt"),
        file_entry(t, "passwd")),
    "symlinked-folder-then-dir-entry": lambda t: (
        file_entry(t, "d", kind=tarfile.SYMTYPE, link="/tmp"),
        file_entry(t, "d", kind=tarfile.DIRTYPE, mode=0o777)),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_entries_are_refused_and_nothing_escapes(setup: Setup, tmp_path: Path,
                                                         case: str) -> None:
    plant(setup, make_tar(HOSTILE[case]))
    work = tmp_path / "work"
    work.mkdir()
    target = work / "out"
    result = restore(setup, target)
    assert result.exit_code == 1, result.stdout
    assert "hostile tar entry" in result.stderr, result.stderr
    nothing_left(tmp_path, target)
    assert not (work / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/drdaemon-escaped-abs.txt").exists()
    assert not Path("/tmp/drdaemon-escaped-link.txt").exists()


def test_setuid_bits_are_stripped_and_outward_symlink_kept_as_link(setup: Setup,
                                                                   tmp_path: Path) -> None:
    def add(t: tarfile.TarFile) -> None:
        file_entry(t, "tool", b"#!/bin/sh\n", mode=0o4755)
        file_entry(t, "shared", kind=tarfile.SYMTYPE, link="/srv/shared")

    plant(setup, make_tar(add))
    target = tmp_path / "out"
    result = restore(setup, target)
    assert result.exit_code == 0, result.stderr
    assert "note: tool: setuid/setgid bits removed" in result.stderr
    assert not (target / "tool").stat().st_mode & 0o7000
    assert os.readlink(target / "shared") == "/srv/shared"


def test_decompression_bomb_stops_at_the_manifest_size(setup: Setup, tmp_path: Path) -> None:
    # 200 MiB of zeros compresses to almost nothing; the manifest says 1 MiB.
    bomb = make_tar(lambda t: file_entry(t, "zeros", b"\0" * (200 << 20)))
    plant(setup, bomb, plaintext_size=1 << 20)
    target = tmp_path / "out"
    result = restore(setup, target)
    assert result.exit_code == 1
    assert "decompresses to more than" in result.stderr
    nothing_left(tmp_path, target)


def test_tree_that_differs_from_its_facts_is_refused(setup: Setup, tmp_path: Path) -> None:
    tar = make_tar(lambda t: file_entry(t, "a.txt", b"hello"))
    plant(setup, tar, facts={"files": 2, "directories": 0, "symlinks": 0, "bytes": 5,
                             "digest": "sha256:" + "0" * 64})
    target = tmp_path / "out"
    result = restore(setup, target)
    assert result.exit_code == 1 and "differs from the manifest" in result.stderr
    nothing_left(tmp_path, target)


def realpath_overflow_tar(dest_len: int, outside: str) -> bytes:
    """The CVE-2025-4517 archive: folders long enough that, reached through short links,
    `os.path.realpath` gives up past PATH_MAX and takes a link to `outside` (relative to
    the extraction folder) for one inside; then a file written through it."""
    steps = "abcdefghijklmnop"
    component = "d" * ((os.pathconf("/", "PC_PATH_MAX") - dest_len - 1) // (len(steps) + 1))

    def add(t: tarfile.TarFile) -> None:
        path = ""
        for step in steps:
            file_entry(t, os.path.join(path, component), kind=tarfile.DIRTYPE, mode=0o777)
            file_entry(t, os.path.join(path, step), kind=tarfile.SYMTYPE, link=component)
            path = os.path.join(path, component)
        linkpath = os.path.join(*steps, "l" * 254)
        file_entry(t, linkpath, kind=tarfile.SYMTYPE, link=os.path.join(*[".."] * len(steps)))
        file_entry(t, "escape", kind=tarfile.SYMTYPE, link=os.path.join(linkpath, outside))
        file_entry(t, "escape/drdaemon-escaped.txt")

    return make_tar(add)


def staging_len(parent: Path, target_name: str, snap_id: str) -> int:
    """Length of DirectorySink's staging path for a target `parent/target_name`."""
    return len(str(parent / f".{target_name}.drdaemon-{snap_id}-abcdef.partial"))


def test_realpath_overflow_archive_writes_nothing_outside_on_restore(
        setup: Setup, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    target = work / "out"
    snap_id = layout.new_snapshot_id(datetime.now(UTC))
    plant(setup, realpath_overflow_tar(staging_len(work, "out", snap_id), "../.."))
    result = restore(setup, target)
    assert not list(tmp_path.rglob("drdaemon-escaped.txt"))
    assert result.exit_code == 1, result.stdout
    assert "hostile tar entry" in result.stderr and "symbolic link" in result.stderr
    assert len(result.stderr) < 400, result.stderr  # one short line, not 4 KB of name
    nothing_left(tmp_path, target)


def test_realpath_overflow_archive_writes_nothing_outside_in_a_drill(
        setup: Setup, tmp_path: Path) -> None:
    import json

    from drdaemon.drills import scratch as drill_scratch

    scratch = setup.state / "drills" / "scratch"
    snap_id = layout.new_snapshot_id(datetime.now(UTC))
    # The drill's folder: <scratch>/<prefix><8 random>/.tree.drdaemon-<id>-<6 hex>.partial
    owner = drill_scratch.this_process(datetime.now(UTC))
    folder = scratch / (drill_scratch.folder_prefix(owner, "files") + "x" * 8)
    plant(setup, realpath_overflow_tar(staging_len(folder, "tree", snap_id), "../.."))
    result = setup.drctl("drill", "run", "--source", "files", "--json")
    assert not list(tmp_path.rglob("drdaemon-escaped.txt"))
    assert result.exit_code == 1, result.output
    [record] = json.loads(result.stdout)["drills"]
    assert not record["ok"]
    assert any("hostile tar entry" in r for r in record["reasons"]), record["reasons"]
    assert not list(tmp_path.rglob("drdaemon-escaped.txt"))
    assert not list(scratch.iterdir())


def test_a_sparse_member_larger_than_the_manifest_says_is_refused(setup: Setup,
                                                                  tmp_path: Path) -> None:
    """A GNU sparse member costs a few bytes whatever size it claims: bounded by facts."""
    def add(t: tarfile.TarFile) -> None:
        realsize = 1 << 40  # 1 TiB of holes
        body = f"1\n{realsize - 5}\n5\n".encode().ljust(512, b"\0") + b"pwned"
        info = tarfile.TarInfo("GNUSparseFile.0/1")
        info.size = len(body)
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                            "GNU.sparse.name": "huge.img",
                            "GNU.sparse.realsize": str(realsize)}
        t.addfile(info, io.BytesIO(body))

    plant(setup, make_tar(add), facts={"bytes": 5})
    target = tmp_path / "out"
    result = restore(setup, target)
    assert result.exit_code == 1, result.stdout
    assert "hostile tar entry" in result.stderr and "manifest's 5 bytes" in result.stderr
    nothing_left(tmp_path, target)


def test_the_python_check_names_the_fixed_release_and_only_warns() -> None:
    from drdaemon.sources.tree_extract import interpreter_note

    for old, fixed in (((3, 11, 7), "3.11.13"), ((3, 12, 10), "3.12.11"),
                       ((3, 13, 3), "3.13.4")):
        note = interpreter_note(old)
        assert note is not None and fixed in note and "CVE-2025-4517" in note
    for new in ((3, 11, 13), (3, 12, 11), (3, 13, 4), (3, 14, 0)):
        assert interpreter_note(new) is None
