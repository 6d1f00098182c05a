"""The audit log signed with Ed25519: the crossover from HMAC, handovers between signing
keys, and an auditor's check with the public key alone.

The pure chains are built by the real record maker (audit_chain.make_line);
the forgeries use every secret the operator holds (the audit key, i.e. the
manifest key) except the signing key, and must be caught with the public key
alone.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from support import Setup, directory_source, local_region, make_setup

from drdaemon import audit, audit_chain, audit_mirror
from drdaemon.audit_chain import ChainKeys, verify_lines, verify_public
from drdaemon.config import load as load_config
from drdaemon.errors import DrError
from drdaemon.keys import load_manifest_key
from drdaemon.runtime import open_runtime
from drdaemon.signing import SigningKey, generate_signing_key, load_public_key
from drdaemon.status import NO_SIGNING_KEY

KEY = b"k" * 32  # an audit key (what the manifest key derives)
_SIGNER = SigningKey(Ed25519PrivateKey.generate())  # for the property test (no fixture there)


class Chain:
    """A chain under construction, record by record, as audit.append writes it."""

    def __init__(self, lines: list[bytes] | None = None) -> None:
        self.lines: list[bytes] = list(lines or [])

    def add(self, event: str, key: bytes | SigningKey, **fields: Any) -> Chain:
        prev = audit_chain.line_hash(self.lines[-1]) if self.lines else audit_chain.GENESIS
        seq = len(self.lines)
        self.lines.append(audit_chain.make_line(seq, f"2031-03-01T02:{seq // 60:02d}:"
                                                f"{seq % 60:02d}+00:00", event, fields, prev,
                                                key))
        return self

    def records(self, n: int, key: bytes | SigningKey) -> Chain:
        for i in range(n):
            self.add("test.event", key, n=i)
        return self

    def handover(self, to: SigningKey, by: bytes | SigningKey) -> Chain:
        return self.add(audit_chain.HANDOVER, by, **audit_chain.handover_fields(to.public))


@pytest.fixture(scope="module")
def signers(tmp_path_factory: pytest.TempPathFactory) -> list[SigningKey]:
    folder = tmp_path_factory.mktemp("signers")
    return [generate_signing_key(folder / f"k{i}.key") for i in range(3)]


def crossing(k: SigningKey) -> Chain:
    """Three MAC'd records, the handover (MAC'd), three records signed by `k`."""
    return Chain().records(3, KEY).handover(k, KEY).records(3, k)


# -- the pure core --------------------------------------------------------------------


def test_a_chain_crossing_from_hmac_verifies_with_the_secret_and_with_the_public_key(
        signers: list[SigningKey]) -> None:
    k = signers[0]
    lines = crossing(k).lines
    head = audit_chain.line_hash(lines[-1])
    for keys in (ChainKeys(hmac=(KEY,)), ChainKeys(hmac=(KEY,), public=(k.public,))):
        assert verify_lines(lines, keys) == audit_chain.AuditVerification(
            True, 7, head=head, signer=k.fingerprint, unproven=0)
    # The auditor: the MAC'd records cannot be checked, but the first signed record's
    # `prev` covers them.
    assert verify_public(lines, k.public) == audit_chain.AuditVerification(
        True, 7, head=head, signer=k.fingerprint, unproven=4)
    assert audit_chain.public_keys_of(lines) == [k.public]
    # Before the crossover the log is HMAC only: no signer, nothing an auditor can prove.
    hmac_only = lines[:3]
    assert verify_lines(hmac_only, KEY).signer is None
    nothing = verify_public(hmac_only, k.public)
    assert not nothing.ok and "no record is proven" in (nothing.reason or "")


def test_forgeries_with_the_audit_key_after_the_crossover_are_caught_with_the_public_key(
        signers: list[SigningKey]) -> None:
    k, mine = signers[0], signers[1]
    honest = crossing(k)
    # 1. A record appended with the audit key (MAC) after signed ones: a downgrade.
    appended = Chain(honest.lines).records(1, KEY)
    result = verify_public(appended.lines, k.public)
    assert (result.ok, result.first_bad, result.records) == (False, 7, 7)
    assert "downgrade" in (result.reason or "")
    # The operator's own check refuses it too, though the MAC is right.
    assert "downgrade" in (verify_lines(appended.lines, KEY).reason or "")
    # 2. A handover to the forger's own key, MAC'd with the audit key: still a downgrade.
    handed = Chain(honest.lines).handover(mine, KEY).records(2, mine)
    assert verify_public(handed.lines, k.public).first_bad == 7
    # 3. Records signed by the forger's key with no handover: not the key in force.
    signed = Chain(honest.lines).records(1, mine)
    result = verify_public(signed.lines, k.public)
    assert result.first_bad == 7 and f"handed over to {k.fingerprint}" in (result.reason or "")
    # 4. The whole log rewritten with the audit key (a failed drill left out):
    # nothing in it is signed by the auditor's key.
    rewritten = Chain().records(3, KEY).add("drill", KEY, outcome="pass")
    assert not verify_public(rewritten.lines, k.public).ok
    # 5. ... or rewritten, handed over to the forger's key: the auditor's key proves nothing.
    assert not verify_public(Chain().records(3, KEY).handover(mine, KEY).records(2, mine).lines,
                             k.public).ok
    # 6. An edited MAC'd record before the crossover: the first signed record's link breaks.
    early = list(honest.lines)
    early[1] = early[1].replace(b'"n":1', b'"n":9')
    result = verify_public(early, k.public)
    assert not result.ok and result.first_bad == 2 and "prev" in (result.reason or "")


def test_an_edited_signed_record_is_caught(signers: list[SigningKey]) -> None:
    k = signers[0]
    lines = crossing(k).lines
    lines[5] = lines[5].replace(b'"n":1', b'"n":7')
    for result in (verify_public(lines, k.public), verify_lines(lines, KEY)):
        assert (result.ok, result.first_bad, result.records) == (False, 5, 5)
        assert "signature does not match" in (result.reason or "")


def test_a_signing_key_hands_over_to_the_next(signers: list[SigningKey]) -> None:
    k1, k2, stranger = signers
    lines = crossing(k1).handover(k2, k1).records(2, k2).lines
    assert verify_lines(lines, KEY).ok and verify_lines(lines, KEY).signer == k2.fingerprint
    # Holding the first key, the auditor trusts the key it handed over to.
    assert verify_public(lines, k1.public).unproven == 4
    # Holding only the second, records before its first signature are unproven.
    second = verify_public(lines, k2.public)
    assert second.ok and second.unproven == 8 and second.records == 10
    assert not verify_public(lines, stranger.public).ok
    assert audit_chain.public_keys_of(lines) == [k1.public, k2.public]
    # After the handover the old key may no longer sign; nor may a MAC.
    for late in (k1, KEY):
        result = verify_lines(Chain(lines).records(1, late).lines, KEY)
        assert result.first_bad == 10, result


def test_a_new_log_opens_with_a_handover_signed_by_its_key(signers: list[SigningKey]) -> None:
    k, stranger = signers[0], signers[2]
    lines = Chain().handover(k, k).records(2, k).lines
    assert verify_public(lines, k.public).ok and verify_public(lines, k.public).unproven == 0
    assert not verify_public(lines, stranger.public).ok
    # Without the handover, a signed record names no key the chain handed over to.
    bare = Chain().records(1, k).lines
    assert "no audit.signing-key record" in (verify_public(bare, k.public).reason or "")
    # A handover whose fingerprint is not its public key's is refused.
    fields = dict(audit_chain.handover_fields(k.public), fingerprint=stranger.fingerprint)
    odd = Chain().add(audit_chain.HANDOVER, KEY, **fields).lines
    assert "fingerprint" in (verify_lines(odd, KEY).reason or "")


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_any_changed_byte_in_a_crossing_chain_fails_the_public_check(
        data: st.DataObject) -> None:
    k = _SIGNER
    lines = crossing(k).lines
    i = data.draw(st.integers(0, len(lines) - 1))
    pos = data.draw(st.integers(0, len(lines[i]) - 2))  # the newline: a cut, seen elsewhere
    new = data.draw(st.integers(0, 255).filter(lambda b: b != lines[i][pos]))
    changed = list(lines)
    changed[i] = lines[i][:pos] + bytes([new]) + lines[i][pos + 1:]
    result = verify_public(audit_chain.split_lines(b"".join(changed)), k.public)
    assert not result.ok
    assert result.first_bad is not None and result.first_bad <= max(i, 4)


# -- through the services and drctl ---------------------------------------------------


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "grades.csv").write_text("student,grade\nada,6\n")
    return make_setup(tmp_path, [local_region("eu-local", tmp_path / "eu", "europe"),
                                 local_region("us-local", tmp_path / "us", "north-america")],
                      [directory_source("files", tree)])


def log_lines(setup: Setup) -> list[bytes]:
    return audit_chain.split_lines((setup.state / "audit" / "audit.jsonl").read_bytes())


def test_drctl_signs_the_log_and_an_auditor_checks_it_with_no_secret(setup: Setup,
                                                                      tmp_path: Path) -> None:
    status = setup.drctl("status", "--json")
    assert json.loads(status.stdout)["warnings"] == [NO_SIGNING_KEY]
    signing = tmp_path / "keys" / "signing.key"
    made = setup.drctl("keys", "signing-key", "--out", str(signing))
    assert made.exit_code == 0, made.output + made.stderr
    public = load_public_key(signing.with_name("signing.key.pub"))
    assert made.stdout.strip() == public.fingerprint
    assert signing.stat().st_mode & 0o777 == 0o600
    assert setup.drctl("backup").exit_code == 0  # MAC'd, as before
    text = setup.config.read_text()
    setup.config.write_text(text.replace("[keys]\n", f'[keys]\nsigning_key_file = "{signing}"\n'))
    assert json.loads(setup.drctl("status", "--json").stdout)["warnings"] == []
    assert setup.drctl("backup").exit_code == 0  # the crossover, then signed records

    lines = log_lines(setup)
    events = [json.loads(line)["event"] for line in lines]
    cross = events.index(audit_chain.HANDOVER)
    assert events[0] == "key.generated" and json.loads(lines[0])["signing_key"] == \
        public.fingerprint
    assert all(b'"mac"' in line for line in lines[:cross + 1])
    assert all(b'"sig"' in line for line in lines[cross + 1:]) and len(lines) > cross + 1
    own = setup.drctl("audit", "verify", "--json")
    assert own.exit_code == 0, own.output
    assert json.loads(own.stdout)["signer"] == public.fingerprint

    # The auditor: no secret at all (the key files the config names are absent).
    secret = setup.manifest_key.read_bytes()
    setup.manifest_key.unlink()
    signing.rename(tmp_path / "away.key")
    pub = str(signing.with_name("signing.key.pub"))
    for where in ((), ("--region", "us-local")):
        checked = setup.drctl("audit", "verify", "--public-key", pub, *where, "--json")
        assert checked.exit_code == 0, checked.output + checked.stderr
        doc = json.loads(checked.stdout)
        assert (doc["ok"], doc["records"], doc["unproven"]) == (True, len(lines), cross + 1)
    assert setup.drctl("audit", "verify").exit_code == 2  # the secret path needs the keys
    setup.manifest_key.write_text("not a key\n")  # present but unreadable as a key: unread
    assert setup.drctl("audit", "verify", "--public-key", pub).exit_code == 0

    # A record forged with the audit key after the crossover: caught with the public key.
    mkey = _manifest_key_from(secret, tmp_path)
    forged = audit_chain.make_line(len(lines), "2031-01-01T00:00:00+00:00", "drill",
                                   {"outcome": "pass"}, audit_chain.line_hash(lines[-1]),
                                   audit_chain.audit_key(mkey))
    (setup.state / "audit" / "audit.jsonl").write_bytes(b"".join(lines) + forged)
    checked = setup.drctl("audit", "verify", "--public-key", pub)
    assert checked.exit_code == 1 and f"record {len(lines)}: " in checked.stdout
    assert "downgrade" in checked.stdout
    # openssl checks a signed record by itself, with the same public key.
    doc = json.loads(lines[-1])
    sig = doc.pop("sig")
    (tmp_path / "rec").write_bytes(audit_chain.canonical(doc))
    (tmp_path / "rec.sig").write_bytes(base64.b64decode(sig["value"]))
    subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", pub, "-rawin",
                    "-in", str(tmp_path / "rec"), "-sigfile", str(tmp_path / "rec.sig")],
                   check=True, capture_output=True)


def _manifest_key_from(text: bytes, tmp_path: Path) -> Any:
    path = tmp_path / "copy.key"
    path.write_bytes(text)
    os.chmod(path, 0o600)
    return load_manifest_key(path)


def test_the_log_refuses_to_downgrade_and_the_demo_config_makes_a_signing_key(
        tmp_path: Path) -> None:
    state = tmp_path / "state"
    text = (f'[daemon]\nstate_dir = "{state}"\n[keys]\ngenerate = true\n'
            f'identity_file = "{state}/keys/id.txt"\n'
            f'manifest_key_file = "{state}/keys/manifest.key"\n'
            f'signing_key_file = "{state}/keys/signing.key"\n'
            + local_region("eu-local", tmp_path / "eu", "europe")
            + local_region("us-local", tmp_path / "us", "north-america"))
    config = tmp_path / "drdaemon.toml"
    config.write_text(text)
    rt = open_runtime(load_config(config))
    assert rt.signing_key is not None and (state / "keys" / "signing.key.pub").exists()
    lines = audit.read_lines(state)
    assert [json.loads(line)["event"] for line in lines] == [audit_chain.HANDOVER,
                                                             "key.generated"]
    assert json.loads(lines[1])["signing_key"] == rt.signing_key.fingerprint
    assert audit.verify(rt).ok and audit.verify(rt).unproven == 0
    assert verify_public(lines, rt.signing_key.public).ok
    assert audit_mirror.verify_mirror(rt, "eu-local").ok

    # The signing key taken out of the config: no record is written with a MAC only.
    config.write_text(text.replace(f'signing_key_file = "{state}/keys/signing.key"\n', ""))
    rt = open_runtime(load_config(config))
    with pytest.raises(DrError, match="downgrade"):
        audit.append(rt, "test.event", {})
    # Nor with another signing key than the one the log was handed over to.
    other = tmp_path / "other.key"
    generate_signing_key(other)
    config.write_text(text.replace(f"{state}/keys/signing.key", str(other)))
    rt = open_runtime(load_config(config))
    with pytest.raises(DrError, match="hand the log over"):
        audit.append(rt, "test.event", {})
    assert len(audit.read_lines(state)) == 2

    # The new key first, the old one kept after it: the old key hands the log over.
    first = load_public_key(state / "keys" / "signing.key.pub")
    both = tmp_path / "both.key"
    both.write_bytes(other.read_bytes() + (state / "keys" / "signing.key").read_bytes())
    both.chmod(0o600)
    config.write_text(text.replace(f"{state}/keys/signing.key", str(both)))
    rt = open_runtime(load_config(config))
    assert rt.signing_key is not None and rt.signing_key.fingerprint != first.fingerprint
    assert audit.append(rt, "test.event", {}) == 3
    lines = audit.read_lines(state)
    handover = json.loads(lines[2])
    assert handover["event"] == audit_chain.HANDOVER and \
        handover["fingerprint"] == rt.signing_key.fingerprint
    assert handover["sig"]["key"] == first.fingerprint
    assert verify_public(lines, first).ok and verify_public(lines, first).unproven == 0
    assert verify_public(lines, rt.signing_key.public).unproven == 3
    assert audit.verify(rt).signer == rt.signing_key.fingerprint
    assert audit.verify(rt).unproven == 0  # the old key, kept in the file, proves its records
