"""Directory fidelity, tested the way filesystem QA does (xfstests, Bareos' xattr test):
set every attribute drdaemon claims to keep, back up, restore, compare attribute by
attribute; and the tree digest (what drills compare) changes with each of them."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pwd
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from support import Setup, directory_source, local_region, make_setup

from drdaemon.sources import directory
from drdaemon.sources.tree_walk import scan_tree

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="giving files to other users needs root")
BASE_NS = 1_700_000_000_123_456_789


def acl(entries: list[tuple[int, int, int]]) -> bytes:
    """system.posix_acl_* bytes: (tag, perm, id) sorted; built here, not with drdaemon's code."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i)
                                           for t, p, i in sorted(entries))


NO_ID = 0xFFFFFFFF
# user::rwx user:4242:rw- group::r-x mask::rwx other::r-x
ACCESS = acl([(1, 7, NO_ID), (2, 6, 4242), (4, 5, NO_ID), (0x10, 7, NO_ID), (0x20, 5, NO_ID)])
# user::rwx group::rwx group:4343:r-x mask::rwx other::r-x (inherited by new entries)
DEFAULT = acl([(1, 7, NO_ID), (4, 7, NO_ID), (8, 5, 4343), (0x10, 7, NO_ID), (0x20, 5, NO_ID)])


def make_rich_tree(root: Path, owner: tuple[int, int] | None) -> Path:
    """A tree with every attribute set; `owner` (uid, gid) for some entries (root only)."""
    root.mkdir()
    (root / "private").mkdir()
    (root / "private" / "grades.csv").write_text("alice,A\n")
    (root / "shared").mkdir()
    (root / "shared" / "report.txt").write_bytes(b"report\n")
    (root / "locked").write_bytes(b"nobody reads me\n")
    (root / "sealed").mkdir()
    (root / "sealed" / "inside.txt").write_bytes(b"behind a 0000 folder\n")
    (root / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "link").symlink_to("shared/report.txt")
    os.setxattr(root / "shared" / "report.txt", "user.checksum", b"\x00\xffbinary\n")
    os.setxattr(root / "shared" / "report.txt", "user.mime_type", b"text/plain")
    os.setxattr(root / "shared", "user.course", "Biologie Ü1".encode())
    os.setxattr(root / "shared" / "report.txt", "system.posix_acl_access", ACCESS)
    os.setxattr(root / "shared", "system.posix_acl_default", DEFAULT)
    if owner is not None:
        for p in (root / "private", root / "private" / "grades.csv"):
            os.chown(p, *owner)
        os.chown(root / "shared", 0, owner[1])
        os.chown(root / "link", *owner, follow_symlinks=False)
    modes = {"private": 0o700, "private/grades.csv": 0o640, "shared": 0o2775,
             "shared/report.txt": 0o674, "locked": 0o000, "tool": 0o4755, "": 0o750,
             "sealed/inside.txt": 0o600, "sealed": 0o000}
    for rel, mode in modes.items():
        os.chmod(root / rel, mode)
    for i, p in enumerate(sorted(root.rglob("*"), key=lambda p: -len(p.parts))):
        os.utime(p, ns=(BASE_NS + i, BASE_NS + 1000 * i), follow_symlinks=False)
    os.utime(root, ns=(BASE_NS, BASE_NS + 7))
    return root


def attributes(root: Path) -> dict[str, tuple]:
    """Every attribute of every entry, read with plain os calls (root: "")."""
    out = {}
    for p in [root, *sorted(root.rglob("*"))]:
        rel = p.relative_to(root).as_posix() if p != root else ""
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("l", os.readlink(p), st.st_uid, st.st_gid, st.st_mtime_ns)
            continue
        xattrs = {a: os.getxattr(p, a) for a in sorted(os.listxattr(p))}
        content = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) \
            else ""
        out[rel] = (oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid, st.st_mtime_ns,
                    xattrs, content)
    return out


def without_setuid(attrs: dict[str, tuple]) -> dict[str, tuple]:
    mode = int(attrs["tool"][0], 8) & ~stat.S_ISUID
    return {**attrs, "tool": (oct(mode), *attrs["tool"][1:])}


@pytest.fixture
def owner() -> tuple[int, int] | None:
    if not ROOT:
        return None
    www = pwd.getpwnam("www-data")
    return www.pw_uid, www.pw_gid


@pytest.fixture
def setup(tmp_path: Path, owner: tuple[int, int] | None) -> Setup:
    make_rich_tree(tmp_path / "tree", owner)
    return make_setup(tmp_path, [local_region("eu", tmp_path / "r-eu", "europe"),
                                 local_region("us", tmp_path / "r-us", "north-america")],
                      [directory_source("files", tmp_path / "tree")])


@needs_root
def test_every_attribute_round_trips_and_the_drill_passes(setup: Setup, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    before = attributes(tree)
    [snap] = setup.drctl_json("backup")
    assert snap["ok"]
    target = tmp_path / "restored"
    result = setup.drctl("restore", "latest", "--source", "files", "--to", str(target))
    assert result.exit_code == 0, result.stderr
    after = attributes(target)
    expected = without_setuid(before)
    for rel in sorted(expected):
        assert after.get(rel) == expected[rel], rel
    assert after.keys() == expected.keys()
    assert "tool: setuid/setgid bits removed" in result.stderr
    drill = setup.drctl("drill", "run", "--source", "files", "--json")
    [record] = json.loads(drill.stdout)["drills"]
    assert drill.exit_code == 0 and record["ok"], record["reasons"]


@needs_root
def test_stock_tar_reads_the_xattrs_acls_and_nanoseconds(setup: Setup, tmp_path: Path) -> None:
    """Break-glass keeps them too: GNU tar --xattrs --acls reads drdaemon's pax headers."""
    tree = tmp_path / "tree"
    setup.drctl_json("backup")
    [obj] = (tmp_path / "r-us").rglob("*.tar.zst.age")
    [wrapped] = (tmp_path / "r-us").rglob("tenants/*/keys/*.age")  # the tenant's key
    tenant_key = tmp_path / "tenant.key"
    subprocess.run(f"(umask 077 && age -d -i {setup.identity} {wrapped} > {tenant_key})",
                   shell=True, check=True)
    out = tmp_path / "glass"
    out.mkdir()
    subprocess.run(f"age -d -i {tenant_key} {obj} | zstd -d | "
                   f"tar --xattrs --xattrs-include='*' --acls -xpf - -C {out}",
                   shell=True, check=True)
    report = out / "shared" / "report.txt"
    assert os.getxattr(report, "user.checksum") == b"\x00\xffbinary\n"
    for rel, acl_name in (("shared/report.txt", "system.posix_acl_access"),
                          ("shared", "system.posix_acl_default")):
        assert os.getxattr(out / rel, acl_name) == os.getxattr(tree / rel, acl_name)
    assert report.stat().st_mtime_ns == (tree / "shared" / "report.txt").stat().st_mtime_ns
    assert (out / "private").stat().st_uid == (tree / "private").stat().st_uid


def test_the_digest_sees_each_attribute(tmp_path: Path) -> None:
    """What drills compare: a change to any kept attribute changes the digest."""
    tree = make_rich_tree(tmp_path / "tree", None)
    report = tree / "shared" / "report.txt"
    changes = [
        lambda: os.chmod(tree / "private", 0o755),
        lambda: os.chmod(tree, 0o755),
        lambda: os.utime(report, ns=(BASE_NS, report.stat().st_mtime_ns + 1)),
        lambda: os.setxattr(report, "user.checksum", b"other"),
        lambda: os.setxattr(report, "system.posix_acl_access", acl(
            [(1, 7, NO_ID), (2, 4, 4242), (4, 5, NO_ID), (0x10, 7, NO_ID), (0x20, 5, NO_ID)])),
        lambda: os.utime(tree / "link", ns=(1, 2), follow_symlinks=False),
    ]
    seen = {scan_tree(str(tree))["digest"]}
    for change in changes:
        change()
        seen.add(scan_tree(str(tree))["digest"])
    assert len(seen) == len(changes) + 1
    owners = scan_tree(str(tree))["owner_digest"]
    if ROOT:
        os.chown(tree / "locked", 1, 1)
        assert scan_tree(str(tree))["owner_digest"] != owners


def test_names_in_the_manifest_carry_any_bytes(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    bad = os.fsdecode(b"caf\xe9-\\x41")
    os.mkfifo(tree / bad)
    (tree / "ok.txt").write_text("x")
    with directory.dump(tree) as d:
        shutil.copyfileobj(d.stream, io.BytesIO())
        facts = d.finish()
    assert facts["skipped_special_files"] == ["caf\\xe9-\\\\x41"]
    json.dumps(facts).encode("utf-8")  # no lone surrogates


UNPRIVILEGED = r"""
import io, json, os, shutil, sys
from pathlib import Path
from drdaemon.sources import directory
tar, facts, target = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
data, facts = tar.read_bytes(), json.loads(facts.read_text())
# A restore that fails verification leaves nothing, 0000 folders included.
bad = directory.DirectorySink(target, "20260101T000000Z-00000001", {**facts, "files": -1})
bad.writer.write(data)
bad.writer.close()
try:
    bad.complete()
except Exception:
    bad.discard()
left = [p.name for p in target.parent.iterdir() if p.name.endswith(".partial")]
sink = directory.DirectorySink(target, "20260101T000000Z-00000000", facts)
sink.writer.write(data)
sink.writer.close()
sink.complete()
print(json.dumps({"target": sink.commit(), "notes": sink.notes, "left": left}))
"""


@needs_root
def test_an_unprivileged_restore_keeps_all_it_can_and_says_what_not(tmp_path: Path) -> None:
    """As a user who cannot give files away: modes (also 0000), xattrs, ACLs and times are
    kept, the digest verifies, and the notes say owners were not applied."""
    user = pwd.getpwnam("nobody")
    work = Path("/tmp") / f"drdaemon-unpriv-{os.getpid()}"
    work.mkdir(mode=0o700)
    try:
        make_rich_tree(work / "tree", None)
        os.chmod(work / "tree" / "tool", 0o755)
        for p in [work, *work.rglob("*")]:
            os.chown(p, user.pw_uid, user.pw_gid, follow_symlinks=False)
        # One entry of another user, as in a real tree: its owner cannot be applied.
        os.chown(work / "tree" / "private" / "grades.csv", 0, 0)
        os.chmod(work / "tree" / "private" / "grades.csv", 0o644)
        before = attributes(work / "tree")
        with directory.dump(work / "tree") as d:  # as root: it reads the 0000 file
            (work / "tree.tar").write_bytes(d.stream.read())
            (work / "facts.json").write_text(json.dumps(d.finish()))
        proc = subprocess.run(
            ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
             "--", sys.executable, "-c", UNPRIVILEGED, str(work / "tree.tar"),
             str(work / "facts.json"), str(work / "out")],
            capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        notes = json.loads(proc.stdout)["notes"]
        assert json.loads(proc.stdout)["left"] == []
        assert any("owners and groups: not applied" in n for n in notes), notes
        after = attributes(work / "out")
        grades = "private/grades.csv"
        assert after[grades][1:3] == (user.pw_uid, user.pw_gid)
        assert {k: v for k, v in after.items() if k != grades} == \
            {k: v for k, v in before.items() if k != grades}
        assert after[grades][0] == before[grades][0] and after[grades][3:] == before[grades][3:]
    finally:
        shutil.rmtree(work)


def make_sparse(path: Path, size: int, data_at: list[int]) -> None:
    with open(path, "wb") as fh:
        fh.truncate(size)
        for off in data_at:
            fh.seek(off)
            fh.write(b"data" * 1024)


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_sparse_files_are_stored_as_holes_and_restored_sparse(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    big = 1 << 30  # 1 GiB apparent, 12 KiB of data
    make_sparse(tree / "disk.img", big, [0, 300 << 20, big - 4096])
    make_sparse(tree / "holes-only.img", 64 << 20, [])
    (tree / "dense.txt").write_bytes(b"dense" * 1000)
    if allocated(tree / "disk.img") > 1 << 20:
        pytest.skip("this file system does not keep holes")
    setup = make_setup(tmp_path, [local_region("eu", tmp_path / "r-eu", "europe"),
                                  local_region("us", tmp_path / "r-us", "north-america")],
                       [directory_source("files", tree)])
    [snap] = setup.drctl_json("backup")
    assert snap["plaintext_size"] < 1 << 20, snap  # holes are not in the tar
    target = tmp_path / "out"
    result = setup.drctl("restore", "latest", "--source", "files", "--to", str(target))
    assert result.exit_code == 0, result.stderr
    assert (target / "disk.img").stat().st_size == big
    assert allocated(target / "disk.img") < 1 << 20
    assert allocated(target / "holes-only.img") == 0
    for name in ("disk.img", "holes-only.img", "dense.txt"):
        assert filecmp_same(tree / name, target / name), name
    # The drill's scratch copy is sparse too, and verifies.
    drill = setup.drctl("drill", "run", "--source", "files", "--json")
    [record] = json.loads(drill.stdout)["drills"]
    assert drill.exit_code == 0 and record["ok"], record["reasons"]


def test_stock_tar_and_tarfile_read_the_sparse_members(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    make_sparse(tree / "disk.img", 8 << 20, [4 << 20])
    with directory.dump(tree) as d:
        data = d.stream.read()
        facts = d.finish()
    assert facts["sparse_files"] == 1
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.getmember("disk.img")
        assert member.size == 8 << 20
        body = tar.extractfile(member).read()
    assert body == (tree / "disk.img").read_bytes()
    (tmp_path / "t.tar").write_bytes(data)
    out = tmp_path / "glass"
    out.mkdir()
    subprocess.run(["tar", "-xf", str(tmp_path / "t.tar"), "-C", str(out)], check=True)
    assert (out / "disk.img").read_bytes() == body


def filecmp_same(a: Path, b: Path) -> bool:
    """Equal content, compared in 1 MiB chunks."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


OLD_ORDER_RESTORE = r"""
import io, json, sys
from pathlib import Path
from drdaemon.sources import directory
data, target = Path(sys.argv[1]).read_bytes(), Path(sys.argv[2])
sink = directory.DirectorySink(target, "20260101T000000Z-00000000", {})
sink.writer.write(data)
sink.writer.close()
sink.complete()
print(sink.commit())
"""


@needs_root
def test_an_archive_of_the_earlier_walk_order_restores_unprivileged(tmp_path: Path) -> None:
    """Earlier versions listed a folder's entries after its siblings (os.walk order) and
    wrote no root entry: a read-only folder's mode must wait until its entries are in."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, mode, body in (("ro", 0o555, None), ("z.txt", 0o644, b"z"),
                                 ("ro/inner", 0o500, None), ("ro/a.txt", 0o444, b"a"),
                                 ("ro/inner/b.txt", 0o400, b"b")):
            info = tarfile.TarInfo(name)
            info.mode = mode
            if body is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    user = pwd.getpwnam("nobody")
    work = Path("/tmp") / f"drdaemon-oldorder-{os.getpid()}"
    work.mkdir(mode=0o700)
    try:
        (work / "old.tar").write_bytes(buf.getvalue())
        os.chown(work, user.pw_uid, user.pw_gid)
        os.chown(work / "old.tar", user.pw_uid, user.pw_gid)
        proc = subprocess.run(
            ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
             "--", sys.executable, "-c", OLD_ORDER_RESTORE, str(work / "old.tar"),
             str(work / "out")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        out = work / "out"
        assert stat.S_IMODE((out / "ro").stat().st_mode) == 0o555
        assert stat.S_IMODE((out / "ro" / "inner").stat().st_mode) == 0o500
        assert (out / "ro" / "inner" / "b.txt").read_bytes() == b"b"
    finally:
        for p in (work / "out" / "ro", work / "out" / "ro" / "inner"):
            if p.exists():
                p.chmod(0o700)
        shutil.rmtree(work)
