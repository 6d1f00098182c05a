"""Config and key files are trusted only if nobody but the running user or root can change
them (issue 22, item 3): owner, mode, the folders above, and symbolic links checked to the
real file. Real files, real links, a real other user; drctl run as a real process, as root
and as an unprivileged user."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import _unprivileged_user
from support import Setup, directory_source, local_region, make_setup, run_cli

from drdaemon import config as config_mod
from drdaemon.errors import UsageError
from drdaemon.filetrust import UntrustedFile
from drdaemon.keys import load_identities, load_manifest_key


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_text("a\n")
    return make_setup(tmp_path, [local_region("eu", tmp_path / "eu", "europe"),
                                 local_region("us", tmp_path / "us", "north-america")],
                      [directory_source("files", tree)])


def _one_line_exit_2(setup: Setup, *words: str) -> str:
    proc = run_cli("drctl", "--config", str(setup.config), "status")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("mode", [0o666, 0o664, 0o646])
def test_a_config_writable_by_others_is_refused(setup: Setup, mode: int) -> None:
    sound = run_cli("drctl", "--config", str(setup.config), "status")
    # 1: no snapshot yet, as it says; nothing on stderr but the warning that this
    # test config signs no evidence (it has no [keys] signing_key_file).
    assert sound.returncode == 1
    assert [ln for ln in sound.stderr.splitlines()
            if not ln.startswith("WARNING: evidence is not publicly verifiable")] == []
    setup.config.chmod(mode)
    _one_line_exit_2(setup, "config file", str(setup.config), f"mode {mode:04o}")


def test_a_config_owned_by_another_user_is_refused(setup: Setup) -> None:
    other = _unprivileged_user()
    os.chown(setup.config, other.pw_uid, other.pw_gid)
    _one_line_exit_2(setup, str(setup.config), f"owned by user id {other.pw_uid}")


def test_a_config_in_a_folder_writable_by_others_is_refused(setup: Setup) -> None:
    setup.config.parent.chmod(0o777)
    _one_line_exit_2(setup, f"folder {setup.config.parent}", "mode 0777")


def test_a_config_in_a_root_owned_sticky_folder_is_accepted(tmp_path: Path) -> None:
    sticky = tmp_path / "shared"
    sticky.mkdir()
    sticky.chmod(0o1777)  # like /tmp
    setup = make_setup(sticky, [local_region("eu", tmp_path / "eu", "europe"),
                                local_region("us", tmp_path / "us", "north-america")], [])
    config_mod.load(setup.config)
    # ... but in a sticky folder an entry of another user (who may replace it) is not.
    other = _unprivileged_user()
    os.chown(setup.config.parent / "keys", other.pw_uid, other.pw_gid)
    with pytest.raises(UntrustedFile, match=f"entry {sticky}/keys is owned by user id"):
        load_manifest_key(setup.manifest_key)


@pytest.mark.parametrize("which", ["identity", "manifest_key"])
def test_a_key_file_owned_by_another_user_is_refused(setup: Setup, which: str) -> None:
    other = _unprivileged_user()
    path = getattr(setup, which)
    os.chown(path, other.pw_uid, other.pw_gid)
    with pytest.raises(UntrustedFile, match=f"{path} is owned by user id {other.pw_uid}"):
        load_identities(path) if which == "identity" else load_manifest_key(path)


def test_a_linked_identity_is_checked_at_its_real_file(setup: Setup, tmp_path: Path) -> None:
    other = _unprivileged_user()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    real = elsewhere / "identity.txt"
    shutil.copy(setup.identity, real)
    real.chmod(0o600)
    link = tmp_path / "keys" / "linked.txt"
    link.symlink_to(real)
    assert load_identities(link)  # a link to a sound file in a sound folder is fine
    os.chown(real, other.pw_uid, other.pw_gid)  # the real file: 0600 but another user's
    with pytest.raises(UntrustedFile, match=f"{link} is owned by user id {other.pw_uid}"):
        load_identities(link)
    os.chown(real, 0, 0)
    elsewhere.chmod(0o777)  # the real file's folder: anyone may swap the file
    with pytest.raises(UntrustedFile, match=f"folder {elsewhere} is writable"):
        load_identities(link)
    elsewhere.chmod(0o700)
    os.lchown(link, other.pw_uid, other.pw_gid)  # the link itself: another user's
    with pytest.raises(UntrustedFile, match=f"symbolic link {link} is owned by user id"):
        load_identities(link)


def test_a_key_that_is_not_a_regular_file_is_refused(setup: Setup, tmp_path: Path) -> None:
    fifo = tmp_path / "keys" / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(UsageError, match="not a regular file"):
        load_identities(fifo)  # and does not hang on the FIFO


@pytest.fixture
def user_home() -> Iterator[tuple[pwd.struct_passwd, Path]]:
    """A folder owned by the unprivileged test user, outside pytest's root-only tmp."""
    user = _unprivileged_user()
    home = Path(tempfile.mkdtemp(prefix="drdaemon-user-"))
    os.chown(home, user.pw_uid, user.pw_gid)
    yield user, home
    shutil.rmtree(home, ignore_errors=True)


def _as_user(user: pwd.struct_passwd, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8"}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    cmd = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
           "--", str(Path(sys.executable).parent / "drctl"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def test_as_an_unprivileged_user_only_its_own_or_roots_files_are_trusted(
        user_home: tuple[pwd.struct_passwd, Path]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as two users")
    user, home = user_home
    setup = make_setup(home, [local_region("eu", home / "eu", "europe"),
                              local_region("us", home / "us", "north-america")], [])
    for path in (home / "keys", setup.identity, setup.manifest_key, setup.config):
        os.chown(path, user.pw_uid, user.pw_gid)
    ok = _as_user(user, home, "--config", str(setup.config), "status")
    assert ok.returncode == 0, ok.stderr
    os.chown(setup.config, 0, 0)  # root's config: trusted
    assert _as_user(user, home, "--config", str(setup.config), "status").returncode == 0
    nobody = pwd.getpwnam("nobody")
    os.chown(setup.config, nobody.pw_uid, nobody.pw_gid)  # a third user's: refused
    bad = _as_user(user, home, "--config", str(setup.config), "status")
    assert bad.returncode == 2
    assert bad.stderr.strip() == (f"drctl: error: config file {setup.config} is "
                                  f"owned by user id {nobody.pw_uid}, not by the running "
                                  f"user (id {user.pw_uid}) or root")
    os.chown(setup.config, user.pw_uid, user.pw_gid)
    os.chown(setup.manifest_key, nobody.pw_uid, nobody.pw_gid)
    assert _as_user(user, home, "--config", str(setup.config), "status").returncode == 2
