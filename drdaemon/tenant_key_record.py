"""A tenant key's public record, pure: the key and its record (docs/format.md,
"Tenant keys"), encoding and parsing the record (authenticated with the manifest
key), which key every process uses when several exist (the newest: :func:`choose`),
and the identity in an unwrapped key. The keyring as stored and unwrapping are
tenant_keys.py; rewrapping and rotation, key_rotation.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pyrage import x25519

from . import layout
from .errors import IntegrityError
from .keys import ManifestKey, fingerprint
from .manifest import authenticated_body, signed

RECORD_FORMAT = "drdaemon.tenant-key"
RECORD_VERSION = 1


@dataclass(frozen=True)
class TenantKey:
    """A tenant's public key: what backups encrypt to."""

    tenant: str
    key_id: str
    recipient: str  # age1...

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.recipient)


@dataclass(frozen=True)
class KeyRecord:
    """An authenticated public record of a tenant key."""

    key: TenantKey
    created: str
    wrapped_to: tuple[str, ...]  # fingerprints of the recipients the identity is wrapped to
    raw: bytes  # as stored: repairs copy these bytes


@dataclass(frozen=True)
class KnownKey:
    """A tenant's key as one process last found it (tenant_keys.ensure_key): stored
    everywhere it belongs, with the state folder's keyring names `state_names` then,
    at `at` (time.monotonic)."""

    record: KeyRecord
    state_names: frozenset[tuple[str, str]]
    at: float



# -- pure ------------------------------------------------------------------------

def key_id_of(recipient: str) -> str:
    """The key id of a tenant recipient (layout.tenant_key_id, the one home of the rule)."""
    return layout.tenant_key_id(recipient)


def key_objects(tenant: str) -> str:
    """The prefix to list for every keyring object of `tenant` (regions and state folder)."""
    return layout.tenant_keys_prefix(tenant)


def created_stamp(at: datetime) -> str:
    """A key's creation time as its record holds it (UTC, whole seconds)."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def encode_record(key: TenantKey, created: str, wrapped_to: Sequence[str],
                  mkey: ManifestKey) -> bytes:
    """The public record of `key`, signed with the manifest key (`created`: created_stamp)."""
    body = {"format": RECORD_FORMAT, "version": RECORD_VERSION, "tenant": key.tenant,
            "key_id": key.key_id, "recipient": key.recipient,
            "created": created, "wrapped_to": list(wrapped_to)}
    return json.dumps(signed(body, mkey), sort_keys=True, indent=1).encode() + b"\n"


def parse_record(raw: bytes, mkey: ManifestKey, tenant: str, key_id: str) -> KeyRecord:
    """An untrusted record found as `tenant`'s key `key_id`; IntegrityError unless the
    manifest key signed it and it names exactly that tenant, key id and a recipient
    whose key id that is."""
    what = f"key record {key_id} of tenant {tenant}"
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise IntegrityError(f"{what} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise IntegrityError(f"{what} is not a JSON object")
    body = authenticated_body(doc, mkey, what)
    recipient, created, wrapped = body.get("recipient"), body.get("created"), \
        body.get("wrapped_to")
    if body.get("format") != RECORD_FORMAT or body.get("version") != RECORD_VERSION \
            or not isinstance(recipient, str) or not isinstance(created, str) \
            or not isinstance(wrapped, list) or not all(isinstance(w, str) for w in wrapped):
        raise IntegrityError(f"{what} is malformed")
    if body.get("tenant") != tenant or body.get("key_id") != key_id \
            or key_id_of(recipient) != key_id:
        raise IntegrityError(f"{what} names another tenant or key")
    try:
        x25519.Recipient.from_str(recipient)
    except Exception:
        raise IntegrityError(f"{what} holds no age recipient") from None
    return KeyRecord(TenantKey(tenant, key_id, recipient), created, tuple(wrapped), raw)


def choose(records: Sequence[KeyRecord]) -> KeyRecord | None:
    """The key every process uses when several exist: the newest `created`, then the
    largest key id. Deterministic (the records are authenticated and the same on every
    host), so all converge on one: after `drctl tenant rotate-key` the new key (whose
    stamp :func:`rotation_stamp` puts after every other), and after two hosts made a
    first key at once, the later of the two. Every other key stays stored: older
    snapshots name theirs and keep opening."""
    return max(records, key=lambda r: (r.created, r.key.key_id), default=None)


def rotation_stamp(now: datetime, records: Sequence[KeyRecord]) -> str:
    """The `created` of a key made by a rotation: now, but at least one second after
    every existing key's, so :func:`choose` picks it even on a host whose clock is behind
    the one that made the current key (or within the second that made it)."""
    stamp = created_stamp(now)
    newest = max((r.created for r in records), default=None)
    if newest is None or stamp > newest:
        return stamp
    try:
        after = datetime.strptime(newest, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:  # authenticated but not ours to parse: fall back to now
        return stamp
    return created_stamp(after + timedelta(seconds=1))


def identity_from(plaintext: bytes) -> x25519.Identity | None:
    """The identity in an unwrapped key's plaintext, or None if it holds none."""
    try:
        lines = [ln.strip() for ln in plaintext.decode().splitlines()]
        found = [ln for ln in lines if ln and not ln.startswith("#")]
        return x25519.Identity.from_str(found[0]) if len(found) == 1 else None
    except Exception:
        return None
