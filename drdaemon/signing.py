"""Ed25519 signing keys: what makes evidence checkable by someone who holds no secret.

The manifest key is symmetric: whoever can check a manifest MAC can also forge
one. Evidence for auditors (the audit log, drill records, reports, bundles) is
signed with a separate Ed25519 key instead; its public half is published, and
anyone can verify with it, with drctl or with stock `openssl`:

    openssl pkeyutl -verify -pubin -inkey signing.pub -rawin -in FILE -sigfile FILE.sig

Files are PEM (PKCS#8 private, SubjectPublicKeyInfo public) so that the same
tools read them. The private file is kept like the manifest key (0600,
refused otherwise, never on the buckets).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .errors import UsageError
from .filetrust import read_trusted
from .keys import write_private_file

ALGORITHM = "ed25519"
SIGNATURE_BYTES = 64
MAX_PUBLIC_FILE = 4096


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key and its fingerprint (`ed25519:` + 32 hex of its sha256)."""

    raw: bytes  # the 32-byte key

    @property
    def fingerprint(self) -> str:
        return f"{ALGORITHM}:" + hashlib.sha256(self.raw).hexdigest()[:32]

    def pem(self) -> bytes:
        """The SubjectPublicKeyInfo PEM that `openssl pkeyutl -pubin` reads."""
        return Ed25519PublicKey.from_public_bytes(self.raw).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def verify(self, data: bytes, signature: bytes) -> bool:
        """True when `signature` is this key's signature over `data`."""
        if len(signature) != SIGNATURE_BYTES:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def verify_b64(self, data: bytes, signature: object) -> bool:
        """`verify` for a signature as stored in JSON (standard base64); False for junk."""
        if not isinstance(signature, str):
            return False
        try:
            sig = base64.b64decode(signature.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            return False
        return self.verify(data, sig)

    def __repr__(self) -> str:
        return f"PublicKey({self.fingerprint})"


class SigningKey:
    """An Ed25519 private key. Never printed, logged or stored outside its 0600 file."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        raw = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                serialization.PublicFormat.Raw)
        self.public = PublicKey(raw)

    @property
    def fingerprint(self) -> str:
        return self.public.fingerprint

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature over `data`."""
        return self._private.sign(data)

    def sign_b64(self, data: bytes) -> str:
        """`sign`, as standard base64 for JSON documents."""
        return base64.b64encode(self.sign(data)).decode("ascii")

    def __repr__(self) -> str:
        return f"SigningKey({self.fingerprint})"


def public_path(private_path: Path) -> Path:
    """Where the public half of a signing key file is written: beside it, `.pub` added."""
    return private_path.with_name(private_path.name + ".pub")


def generate_signing_key(path: Path) -> SigningKey:
    """Write a new signing key to `path` (0600, never overwritten) and its public key to
    `public_path(path)` (0644); return the key."""
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode("ascii")
    write_private_file(path, pem)
    key = SigningKey(private)
    pub = public_path(path)
    pub.write_bytes(key.public.pem())
    pub.chmod(0o644)
    return key


def load_signing_key(path: Path) -> SigningKey:
    """Load a private signing key file (0600, trusted folders: filetrust rules): its
    first (current) key."""
    return load_signing_keys(path)[0]


_PEM_END = b"-----END PRIVATE KEY-----"


def load_signing_keys(path: Path) -> list[SigningKey]:
    """Every key of a private signing key file, the current one first.

    After changing the signing key, the file holds the new key's PEM block,
    then the old one's: the old key then signs the audit log's handover to the
    new one (audit.append), and may be dropped from the file after that.
    """
    try:
        data = read_trusted(path, "signing key file", private=True)
    except FileNotFoundError:
        raise UsageError(f"signing key file {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read signing key file {path}: "
                         f"{exc.__class__.__name__}") from None
    blocks = [b + _PEM_END for b in data.split(_PEM_END)[:-1]] or [data]
    keys = []
    for block in blocks:
        try:
            private = serialization.load_pem_private_key(block.strip(), password=None)
        except (ValueError, TypeError):
            # Never echo the content: it is a private key.
            raise UsageError(f"signing key file {path} does not hold a PEM private "
                             "key") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise UsageError(f"signing key file {path} does not hold an Ed25519 key")
        keys.append(SigningKey(private))
    return keys


def parse_public_key(data: bytes, what: str) -> PublicKey:
    """An Ed25519 public key from PEM bytes (untrusted: UsageError naming `what`)."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise UsageError(f"{what} does not hold a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UsageError(f"{what} does not hold an Ed25519 public key")
    return PublicKey(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def load_public_key(path: Path) -> PublicKey:
    """Load a public key file (PEM); anyone may hand us one, so it is read as untrusted."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_PUBLIC_FILE + 1)
    except FileNotFoundError:
        raise UsageError(f"public key file {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read public key file {path}: "
                         f"{exc.__class__.__name__}") from None
    if len(data) > MAX_PUBLIC_FILE:
        raise UsageError(f"public key file {path} is too large to be a public key")
    return parse_public_key(data, f"public key file {path}")
