"""Hostile snapshot content: restore never writes outside the target.

The tar is what a compromised or malicious tree could produce, wrapped in a
correctly signed manifest (the worst case: authentication cannot help), so
only the extraction filter and the size bounds stand between it and the host.
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
    assert "note: tool: setuid/setgid/sticky bits removed" in result.stderr
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
