"""Key material: age identities and recipients, and the manifest MAC key.

Backups need only public recipients. The identity (private key) is needed for
restores and drills, and the manifest key authenticates manifests so that a
valid-looking age file planted in a bucket is not trusted. Both secret files
must be private to their owner (mode 0600); we refuse them otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from pyrage import x25519

from .config import Config
from .errors import UsageError
from .filetrust import read_trusted
from .units import format_utc

MANIFEST_KEY_BYTES = 32


@dataclass(frozen=True)
class ManifestKey:
    """The HMAC key that authenticates manifests, with a public id for it."""

    secret: bytes

    @property
    def key_id(self) -> str:
        # A hash of a 256-bit random key reveals nothing useful and lets a
        # manifest say which key signed it.
        return hashlib.sha256(b"drdaemon-manifest-key\0" + self.secret).hexdigest()[:16]

    @property
    def verifying_keys(self) -> tuple[ManifestKey, ...]:
        """Every key a MAC is checked against: this one (a ManifestKeySet adds its retired keys)."""
        return (self,)

    def for_id(self, key_id: object) -> ManifestKey | None:
        """The key named `key_id` that may verify a MAC, or None if we hold no such key."""
        return next((k for k in self.verifying_keys if k.key_id == key_id), None)

    def __repr__(self) -> str:
        return f"ManifestKey(key_id={self.key_id!r})"


@dataclass(frozen=True, repr=False)
class ManifestKeySet(ManifestKey):
    """The manifest keys in force: the current key (`secret`, `key_id`) signs everything
    new; each retired key still verifies what it signed before a rotation.

    A set is a ManifestKey (its current key) so that every writer signs with the
    current key unchanged; readers look a MAC's key up by id (`for_id`).
    """

    retired: tuple[ManifestKey, ...] = ()

    @property
    def current(self) -> ManifestKey:
        return ManifestKey(self.secret)

    @property
    def verifying_keys(self) -> tuple[ManifestKey, ...]:
        return (self.current, *self.retired)

    def rotated(self, new: ManifestKey) -> ManifestKeySet:
        """This set with `new` as the current key, and the current one retired."""
        return ManifestKeySet(new.secret, (self.current, *self.retired))

    def __repr__(self) -> str:
        return (f"ManifestKeySet(key_id={self.key_id!r}, "
                f"retired={[k.key_id for k in self.retired]!r})")


def fingerprint(recipient: str) -> str:
    """A short, stable fingerprint of a public recipient, as stored in manifests."""
    return "sha256:" + hashlib.sha256(recipient.encode()).hexdigest()[:16]


def recipient_labels(recipients: Sequence[str], names: Mapping[str, str]) -> dict[str, str]:
    """Fingerprint -> how messages name each configured recipient ("ops (sha256:...)")."""
    labels = {}
    for i, rec in enumerate(recipients):
        name = names.get(rec) or f"recipients[{i}]"
        labels[fingerprint(rec)] = f"{name} ({fingerprint(rec)}, {rec[:12]}...)"
    return labels


def describe_recipients(fingerprints: Sequence[str], labels: Mapping[str, str]) -> str:
    """The recipients of a snapshot, by their configured names where known."""
    return ", ".join(labels.get(f, f"{f} (not in [keys] recipients)") for f in fingerprints)


def write_private_file(path: Path, content: str) -> None:
    """Create `path` with mode 0600, refusing to overwrite an existing file (or a link)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{path} already exists; refusing to overwrite a key") from None
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(content)
        fh.flush()
        os.fsync(fh.fileno())


# Beside a key file `drctl keys` could not record in an audit log (no loadable
# config): who made it, where and when, until the first runtime using the key
# records it (runtime.record_first_use) and removes the note.
UNRECORDED_SUFFIX = ".unrecorded"
_NOTE_FIELDS = ("made_at", "user", "host")
MAX_NOTE_BYTES = 4096


def unrecorded_path(key_path: Path) -> Path:
    """Where the note of an unrecorded key file is kept: beside it."""
    return key_path.with_name(key_path.name + UNRECORDED_SUFFIX)


def note_unrecorded(key_path: Path, made_at: datetime, user: str, host: str) -> None:
    """Leave the note that `key_path` was made but not yet recorded (public facts only)."""
    note = {"made_at": format_utc(made_at), "user": user, "host": host}
    write_private_file(unrecorded_path(key_path), json.dumps(note, sort_keys=True) + "\n")


def read_unrecorded(key_path: Path) -> dict[str, str] | None:
    """The note beside `key_path` (its string facts; {} if it is damaged), or None if none."""
    try:
        with unrecorded_path(key_path).open("rb") as fh:
            raw = fh.read(MAX_NOTE_BYTES + 1)
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw) if len(raw) <= MAX_NOTE_BYTES else {}
    except (ValueError, UnicodeDecodeError, RecursionError):
        doc = {}
    if not isinstance(doc, dict):
        return {}
    return {k: v[:200] for k, v in doc.items() if k in _NOTE_FIELDS and isinstance(v, str)}


def generate_identity(path: Path) -> str:
    """Write a new age identity to `path` (0600) and return its recipient."""
    ident = x25519.Identity.generate()
    recipient = str(ident.to_public())
    created = format_utc(datetime.now(UTC))
    write_private_file(path, f"# created: {created}\n# public key: {recipient}\n{ident}\n")
    return recipient


_KEY_FILE_HEAD = ("# drdaemon manifest key: keep it off the buckets, "
                  "and a copy with the escrow identity\n")
_RETIRED = "retired "


def generate_manifest_key(path: Path) -> ManifestKey:
    """Write a new random manifest key to `path` (0600)."""
    key = secrets.token_bytes(MANIFEST_KEY_BYTES)
    write_private_file(path, _KEY_FILE_HEAD + key.hex() + "\n")
    return ManifestKey(key)


def manifest_key_file_text(keys: ManifestKeySet, when: datetime) -> str:
    """A key set as its file: the current key's hex first, then one `retired <hex>` line
    per retired key (docs/format.md, "Manifest key set")."""
    lines = [_KEY_FILE_HEAD, f"# current key {keys.key_id}, made {format_utc(when)}\n",
             keys.secret.hex() + "\n"]
    for old in keys.retired:
        lines += [f"# retired key {old.key_id}: verifies what it signed before a rotation\n",
                  f"{_RETIRED}{old.secret.hex()}\n"]
    return "".join(lines)


def rotate_manifest_key(current: ManifestKeySet, out: Path, when: datetime) -> ManifestKeySet:
    """Write to `out` (0600, never overwritten) a key set with a new random current key
    and every key of `current` retired; return it."""
    keys = current.rotated(ManifestKey(secrets.token_bytes(MANIFEST_KEY_BYTES)))
    write_private_file(out, manifest_key_file_text(keys, when))
    return keys


def _read_private(path: Path, what: str) -> list[str]:
    """The meaningful lines of a private key file, once filetrust accepts it: 0600, owned
    by the running user or root, in folders nobody else can change."""
    try:
        text = read_trusted(path, what, private=True).decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.__class__.__name__}") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def load_identities(path: Path) -> list[x25519.Identity]:
    """Load the age identities from a private identity file."""
    lines = _read_private(path, "identity file")
    identities = []
    for n, line in enumerate(lines, 1):
        try:
            identities.append(x25519.Identity.from_str(line))
        except Exception:
            # Never echo the line: it is a private key.
            raise UsageError(f"identity file {path}: entry {n} is not an age identity") from None
    if not identities:
        raise UsageError(f"identity file {path} holds no identity")
    return identities


def load_manifest_key(path: Path) -> ManifestKeySet:
    """Load the manifest MAC keys from a private key file: its current key (the first
    line) and any retired keys (`retired <hex>` lines after it)."""
    lines = _read_private(path, "manifest key file")
    if not lines:
        raise UsageError(f"manifest key file {path} does not hold a {MANIFEST_KEY_BYTES}-byte "
                         "hex key")
    current = _hex_key(lines[0], path, 1)
    retired = []
    for n, line in enumerate(lines[1:], 2):
        if not line.startswith(_RETIRED):
            raise UsageError(f"manifest key file {path}: entry {n} is neither the current key "
                             "(the first) nor a 'retired <hex>' line")
        retired.append(ManifestKey(_hex_key(line[len(_RETIRED):].strip(), path, n)))
    ids = [current.hex()] + [k.secret.hex() for k in retired]
    if len(set(ids)) != len(ids):
        raise UsageError(f"manifest key file {path} names one key twice")
    return ManifestKeySet(current, tuple(retired))


def _hex_key(text: str, path: Path, n: int) -> bytes:
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) != MANIFEST_KEY_BYTES:
        # Never echo the line: it is (meant to be) a key.
        raise UsageError(f"manifest key file {path} does not hold a {MANIFEST_KEY_BYTES}-byte "
                         f"hex key" + (f" (entry {n})" if n > 1 else ""))
    return secret


def ensure_generated_keys(config: Config) -> Config:
    """For configs with `[keys] generate = true`, make missing keys on first run.

    Returns the config with the generated identity's recipient added.
    """
    keys = config.keys
    if not keys.generate:
        return config
    recipients = list(keys.recipients)
    if keys.identity_file is None:
        raise UsageError(f"{config.path}: keys.generate needs keys.identity_file")
    if not keys.identity_file.exists():
        generate_identity(keys.identity_file)
    if not keys.manifest_key_file.exists():
        generate_manifest_key(keys.manifest_key_file)
    for ident in load_identities(keys.identity_file):
        rec = str(ident.to_public())
        if rec not in recipients:
            recipients.append(rec)
    return replace(config, keys=replace(keys, recipients=tuple(recipients)))


def identities_for(config: Config, explicit: Path | None, why: str) -> list[x25519.Identity]:
    """The identities to decrypt with: `explicit` (--identity), else [keys] identity_file."""
    path = explicit or config.keys.identity_file
    if path is None:
        raise UsageError(f"{why} needs a private key: pass --identity FILE or set "
                         "[keys] identity_file")
    return load_identities(path)
