"""Rotating the manifest key: a key set whose retired keys keep verifying.

Real backups and restores through drctl on either side of a rotation; the audit
log (HMAC only, or signed with an Ed25519 key) must verify across it.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import Setup, directory_source, drctl, local_region, make_setup

from drdaemon import erasure_cert, keys, layout, manifest
from drdaemon.errors import IntegrityError, UsageError
from drdaemon.keys import ManifestKey, ManifestKeySet, load_manifest_key
from drdaemon.signing import generate_signing_key


@pytest.fixture(params=["hmac", "signed"])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Setup:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "grades.csv").write_text("student,grade\nada,6\n")
    s = make_setup(tmp_path, [local_region("eu-local", tmp_path / "eu", "europe"),
                              local_region("us-local", tmp_path / "us", "north-america")],
                   [directory_source("files", tree)])
    if request.param == "signed":
        generate_signing_key(tmp_path / "keys" / "signing.key")
        s.config.write_text(s.config.read_text().replace(
            "[keys]\n", f'[keys]\nsigning_key_file = "{tmp_path / "keys" / "signing.key"}"\n'))
    return s


def use_key_file(setup: Setup, path: Path) -> None:
    text = setup.config.read_text()
    old = next(line for line in text.splitlines() if line.startswith("manifest_key_file"))
    setup.config.write_text(text.replace(old, f'manifest_key_file = "{path}"'))


def backup(setup: Setup, tmp_path: Path, content: str) -> str:
    (tmp_path / "tree" / "grades.csv").write_text(content)
    result = setup.drctl_json("backup")
    snapshot_id: str = result[0]["snapshot_id"]
    return snapshot_id


def test_snapshots_from_before_and_after_a_rotation_restore_and_the_log_verifies(
        setup: Setup, tmp_path: Path) -> None:
    before = backup(setup, tmp_path, "before\n")
    old_id = load_manifest_key(setup.manifest_key).key_id
    rotated = tmp_path / "keys" / "manifest-2.key"
    out = setup.drctl("keys", "manifest-key", "rotate", "--out", str(rotated))
    assert out.exit_code == 0, out.output + out.stderr
    new = load_manifest_key(rotated)
    assert out.stdout.strip() == new.key_id != old_id
    assert [k.key_id for k in new.retired] == [old_id]
    assert rotated.stat().st_mode & 0o777 == 0o600
    use_key_file(setup, rotated)
    after = backup(setup, tmp_path, "after\n")

    signed_by = {i: json.loads((tmp_path / "eu" / layout.manifest_object_name("files", i))
                               .read_bytes())["mac"]["key_id"] for i in (before, after)}
    assert signed_by == {before: old_id, after: new.key_id}
    for snap, content in ((before, "before\n"), (after, "after\n")):
        target = tmp_path / f"restored-{snap}"
        done = setup.drctl("restore", snap, "--source", "files", "--to", str(target))
        assert done.exit_code == 0, done.output + done.stderr
        assert (target / "grades.csv").read_text() == content

    records = setup.drctl_json("audit", "show")["records"]
    rotation = next(r for r in records if r["event"] == "key.rotated")
    assert (rotation["old_key_id"], rotation["new_key_id"]) == (old_id, new.key_id)
    verified = setup.drctl("audit", "verify", "--json")
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.stdout)["records"] == len(records)

    # A key set without the key that signed a manifest refuses it, as before.
    stranger = tmp_path / "keys" / "stranger.key"
    keys.generate_manifest_key(stranger)
    use_key_file(setup, stranger)
    refused = setup.drctl("restore", before, "--source", "files", "--to",
                          str(tmp_path / "refused"))
    assert refused.exit_code != 0
    assert "another manifest key" in refused.output + refused.stderr


def test_rotate_needs_a_config_and_never_overwrites(setup: Setup, tmp_path: Path) -> None:
    taken = tmp_path / "taken.key"
    taken.write_text("x")
    out = setup.drctl("keys", "manifest-key", "rotate", "--out", str(taken))
    assert out.exit_code == 2 and "already exists" in out.stderr
    assert setup.drctl("keys", "manifest-key", "--out", str(tmp_path / "a"), "rotate",
                       "--out", str(tmp_path / "b")).exit_code == 2
    made = setup.drctl("keys", "manifest-key", "--out", str(tmp_path / "plain.key"))
    assert made.exit_code == 0 and made.stdout.strip() == \
        load_manifest_key(tmp_path / "plain.key").key_id


# -- the key set, pure -----------------------------------------------------------------


STRANGER = ManifestKey(b"s" * 32)


@given(st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=4, unique=True)
       .filter(lambda secrets: STRANGER.secret not in secrets))
def test_a_key_set_file_round_trips_and_verifies_with_every_key(secrets: list[bytes]) -> None:
    keyset = ManifestKeySet(secrets[0], tuple(ManifestKey(s) for s in secrets[1:]))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "set.key"
        path.write_text(keys.manifest_key_file_text(keyset, datetime(2031, 1, 1, tzinfo=UTC)))
        os.chmod(path, 0o600)
        assert load_manifest_key(path) == keyset
    body = {"format": "x", "n": 1}
    for signer in keyset.verifying_keys:
        assert manifest.authenticated_body(manifest.signed(body, signer), keyset, "x") == body
        assert keyset.for_id(signer.key_id) == signer
    # New documents are signed with the current key.
    assert manifest.signed(body, keyset)["mac"]["key_id"] == keyset.key_id == \
        ManifestKey(secrets[0]).key_id
    with pytest.raises(IntegrityError, match="another manifest key"):
        manifest.authenticated_body(manifest.signed(body, STRANGER), keyset, "x")


def test_a_retired_key_still_verifies_an_erasure_certificate() -> None:
    old, new = ManifestKey(b"o" * 32), ManifestKey(b"n" * 32)
    at = datetime(2031, 1, 1, tzinfo=UTC)
    cert = erasure_cert.ErasureCertificate(
        tenant="uni-a", started_at=at, finished_at=at, sources=("files",),
        places=("eu-local",), keys=(), key_copies=(), deleted=(), locked=(),
        check=erasure_cert.Check(True, ("eu-local",)))
    raw = erasure_cert.serialize(cert, old)
    assert erasure_cert.parse(raw, ManifestKeySet(old.secret).rotated(new)) == cert
    with pytest.raises(IntegrityError):
        erasure_cert.parse(raw, ManifestKeySet(new.secret))


def test_a_damaged_key_set_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = tmp_path / "set.key"
    for text in ("aa" * 32 + "\nbb" * 32 + "\n", "aa" * 32 + "\nretired " + "aa" * 32 + "\n",
                 "aa" * 32 + "\nretired zz\n"):
        path.unlink(missing_ok=True)
        path.write_text(text)
        os.chmod(path, 0o600)
        with pytest.raises(UsageError) as err:
            load_manifest_key(path)
        assert "bb" * 8 not in str(err.value) and "aa" * 8 not in str(err.value)


def test_a_key_made_without_a_config_is_noted_and_a_stale_note_never_fails_it(
        tmp_path: Path) -> None:
    made = drctl(["keys", "manifest-key", "--out", str(tmp_path / "m.key")])
    assert made.exit_code == 0 and "m.key.unrecorded beside it" in made.stderr
    assert set(keys.read_unrecorded(tmp_path / "m.key") or {}) == {"made_at", "user", "host"}
    (tmp_path / "s.key.unrecorded").write_text("stale")
    made = drctl(["keys", "signing-key", "--out", str(tmp_path / "s.key")])
    assert made.exit_code == 0 and "nor noted beside the key" in made.stderr
    assert (tmp_path / "s.key.pub").exists()
