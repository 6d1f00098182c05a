"""Snapshot manifests: the record that commits a snapshot.

Pure functions only. A manifest is canonical JSON authenticated with an
HMAC-SHA256 over its body, keyed by a secret that never goes to the buckets:
anyone holding a public recipient can write a valid age file, so neither the
data object nor an unauthenticated manifest is trusted on restore.
See docs/format.md for the schema; object names and ids are in layout.py.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .errors import IntegrityError
from .keys import ManifestKey
from .layout import KEY_ID_RE, is_snapshot_id
from .sources import is_kind
from .units import parse_iso_time

FORMAT = "drdaemon.manifest"
# Version 2 adds `facts_object`: the facts too large for a manifest (postgres:
# per-table row counts) in their own object. Written only when there is one;
# version 1 (facts inline) stays readable everywhere.
VERSION = 1
FACTS_OBJECT_VERSION = 2
# Version 3 names the tenant key the snapshot is encrypted to (`encryption.tenant_key`,
# tenant_keys.py); it may or may not have a facts object. Versions 1 and 2, encrypted
# to the global [keys] recipients, stay readable everywhere.
TENANT_KEY_VERSION = 3
VERSIONS = (VERSION, FACTS_OBJECT_VERSION, TENANT_KEY_VERSION)
# Shared by the writer (backup.py refuses to commit a larger one) and every reader.
MAX_MANIFEST_BYTES = 1 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")


@dataclass(frozen=True)
class FactsRef:
    """The facts object a version-2 manifest authenticates (see facts.py)."""

    name: str
    sha256: str
    size: int  # bytes stored (compressed)
    plaintext_size: int  # bytes of its JSON

    def body(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "size": self.size,
                "plaintext_size": self.plaintext_size, "compression": "zstd"}


@dataclass(frozen=True)
class TenantKeyRef:
    """The tenant key a version-3 snapshot is encrypted to (see tenant_keys.py)."""

    tenant: str
    key_id: str

    def body(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "key_id": self.key_id}


@dataclass(frozen=True)
class Manifest:
    """One committed snapshot. Times are aware UTC datetimes."""

    id: str
    source: str
    tenant: str
    tier: str
    kind: str
    consistency_time: datetime
    started_at: datetime
    finished_at: datetime
    data_name: str  # object name below the region's prefix, the same in every region
    sha256: str
    size: int  # bytes of the stored (encrypted) object
    compressed_size: int
    plaintext_size: int
    zstd_level: int
    recipients: tuple[str, ...]  # fingerprints, see keys.fingerprint
    facts: dict[str, Any] = field(default_factory=dict)
    drdaemon_version: str = ""
    facts_object: FactsRef | None = None  # version 2, and version 3 where there is one
    tenant_key: TenantKeyRef | None = None  # version 3 only

    @property
    def version(self) -> int:
        if self.tenant_key is not None:
            return TENANT_KEY_VERSION
        return VERSION if self.facts_object is None else FACTS_OBJECT_VERSION

    def object_names(self) -> tuple[str, ...]:
        """Every object of the snapshot besides the manifest: the data, then any facts object."""
        if self.facts_object is None:
            return (self.data_name,)
        return (self.data_name, self.facts_object.name)

    def body(self) -> dict[str, Any]:
        """The JSON body (without the MAC)."""
        extra = {} if self.facts_object is None else {"facts_object": self.facts_object.body()}
        encryption: dict[str, Any] = {"algorithm": "age-x25519",
                                      "recipients": list(self.recipients)}
        if self.tenant_key is not None:
            encryption["tenant_key"] = self.tenant_key.body()
        return {
            **extra,
            "format": FORMAT,
            "version": self.version,
            "id": self.id,
            "source": self.source,
            "tenant": self.tenant,
            "tier": self.tier,
            "kind": self.kind,
            "consistency_time": _ts(self.consistency_time),
            "started_at": _ts(self.started_at),
            "finished_at": _ts(self.finished_at),
            "data": {
                "name": self.data_name,
                "sha256": self.sha256,
                "size": self.size,
                "compressed_size": self.compressed_size,
                "plaintext_size": self.plaintext_size,
                "compression": {"algorithm": "zstd", "level": self.zstd_level},
                "encryption": encryption,
            },
            "facts": self.facts,
            "drdaemon_version": self.drdaemon_version,
        }


def _ts(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _mac(body: dict[str, Any], key: ManifestKey) -> str:
    return hmac.new(key.secret, _canonical(body), hashlib.sha256).hexdigest()


def signed(body: dict[str, Any], key: ManifestKey) -> dict[str, Any]:
    """`body` with its `mac` field: how manifests, and records kept beside them (a
    tenant key's public record), are authenticated."""
    return dict(body, mac={"algorithm": "hmac-sha256", "key_id": key.key_id,
                           "value": _mac(body, key)})


def authenticated_body(doc: dict[str, Any], key: ManifestKey, what: str) -> dict[str, Any]:
    """The body of an untrusted signed document `doc` (its `mac` removed), or
    IntegrityError naming `what` if `key` did not sign exactly this body. For a
    keys.ManifestKeySet, any key of the set (current or retired) that the MAC
    names by id; a key id not in the set is refused."""
    body = dict(doc)
    mac = body.pop("mac", None)
    if not isinstance(mac, dict) or mac.get("algorithm") != "hmac-sha256":
        raise IntegrityError(f"{what} carries no hmac-sha256 authentication")
    signer = key.for_id(mac.get("key_id"))
    if signer is None:
        ours = ", ".join(repr(k.key_id) for k in key.verifying_keys)
        raise IntegrityError(f"{what} was signed with another manifest key "
                             f"(key id {str(mac.get('key_id'))[:16]!r}, ours {ours})")
    value = mac.get("value")
    try:
        expected = _mac(body, signer)
    except (UnicodeEncodeError, RecursionError):
        # Lone surrogates or absurd nesting: nothing we wrote, so not authentic.
        raise IntegrityError(f"{what} authentication failed: it was altered or forged") from None
    if not isinstance(value, str) or not _HEX64.match(value) or \
            not hmac.compare_digest(value, expected):
        raise IntegrityError(f"{what} authentication failed: it was altered or forged")
    return body


def serialize(manifest: Manifest, key: ManifestKey) -> bytes:
    """Canonical JSON of the manifest with its MAC, ready to store."""
    doc = signed(manifest.body(), key)
    return json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=False).encode() + b"\n"


def parse(raw: bytes, key: ManifestKey, *, source: str | None = None,
          snapshot_id: str | None = None) -> Manifest:
    """Parse and authenticate an untrusted manifest.

    Raises IntegrityError if it is too large, malformed, not signed by `key`,
    or names another source or id than where it was found (a swapped manifest).
    """
    if len(raw) > MAX_MANIFEST_BYTES:
        raise IntegrityError(f"manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise IntegrityError("manifest is not valid JSON") from None
    if not isinstance(doc, dict):
        raise IntegrityError("manifest is not a JSON object")
    manifest = _from_body(authenticated_body(doc, key, "manifest"))
    if source is not None and manifest.source != source:
        raise IntegrityError(f"manifest belongs to source {manifest.source!r}, "
                             f"found under {source!r}")
    if snapshot_id is not None and manifest.id != snapshot_id:
        raise IntegrityError(f"manifest is for snapshot {manifest.id!r}, "
                             f"found as {snapshot_id!r}")
    return manifest


def _from_body(doc: dict[str, Any]) -> Manifest:
    if doc.get("format") != FORMAT:
        raise IntegrityError("not a drdaemon manifest")
    version = doc.get("version")
    if type(version) is not int or version not in VERSIONS:
        raise IntegrityError(f"manifest version {version!r} is not supported "
                             f"(this drdaemon reads versions {', '.join(map(str, VERSIONS))})")
    if version != TENANT_KEY_VERSION and \
            (version == FACTS_OBJECT_VERSION) != ("facts_object" in doc):
        need = "needs" if version == FACTS_OBJECT_VERSION else "cannot have"
        raise IntegrityError(f"malformed manifest: a version {version} manifest {need} "
                             "facts_object")
    try:
        data = _get(doc, "data", dict)
        kind = _get(doc, "kind", str)
        if not is_kind(kind):
            raise IntegrityError(f"unknown snapshot kind {kind!r}")
        snap_id = _get(doc, "id", str)
        if not is_snapshot_id(snap_id):
            raise IntegrityError("malformed snapshot id in manifest")
        sha = _get(data, "sha256", str)
        if not _HEX64.match(sha):
            raise IntegrityError("malformed sha256 in manifest")
        enc = _get(data, "encryption", dict)
        recipients = _get(enc, "recipients", list)
        tenant = _get(doc, "tenant", str)
        tenant_key = _tenant_key(enc, version, tenant)
        return Manifest(
            id=snap_id,
            source=_get(doc, "source", str),
            tenant=tenant,
            tier=_get(doc, "tier", str),
            kind=kind,
            consistency_time=_time(_get(doc, "consistency_time", str)),
            started_at=_time(_get(doc, "started_at", str)),
            finished_at=_time(_get(doc, "finished_at", str)),
            data_name=_get(data, "name", str),
            sha256=sha,
            size=_count(data, "size"),
            compressed_size=_count(data, "compressed_size"),
            plaintext_size=_count(data, "plaintext_size"),
            zstd_level=_get(_get(data, "compression", dict), "level", int),
            recipients=tuple(str(r) for r in recipients),
            facts=_get(doc, "facts", dict),
            drdaemon_version=_get(doc, "drdaemon_version", str),
            facts_object=_facts_ref(doc) if "facts_object" in doc else None,
            tenant_key=tenant_key,
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise IntegrityError(f"malformed manifest: {exc}") from None


def _facts_ref(doc: dict[str, Any]) -> FactsRef:
    ref = _get(doc, "facts_object", dict)
    sha = _get(ref, "sha256", str)
    if not _HEX64.match(sha):
        raise IntegrityError("malformed facts_object sha256 in manifest")
    if _get(ref, "compression", str) != "zstd":
        raise IntegrityError("unknown facts_object compression in manifest")
    return FactsRef(name=_get(ref, "name", str), sha256=sha, size=_count(ref, "size"),
                    plaintext_size=_count(ref, "plaintext_size"))


def _tenant_key(enc: dict[str, Any], version: int, tenant: str) -> TenantKeyRef | None:
    """The tenant key of a version-3 manifest's `encryption`; none before version 3."""
    if version != TENANT_KEY_VERSION:
        if "tenant_key" in enc:
            raise IntegrityError(f"malformed manifest: a version {version} manifest cannot "
                                 "have encryption.tenant_key")
        return None
    if "tenant_key" not in enc:
        raise IntegrityError("malformed manifest: a version 3 manifest needs "
                             "encryption.tenant_key")
    ref = _get(enc, "tenant_key", dict)
    key_id = _get(ref, "key_id", str)
    if not KEY_ID_RE.match(key_id):
        raise IntegrityError("malformed tenant key id in manifest")
    if _get(ref, "tenant", str) != tenant:
        raise IntegrityError("manifest names the key of another tenant than its own")
    return TenantKeyRef(tenant=tenant, key_id=key_id)


def _get(doc: dict[str, Any], key: str, kind: type) -> Any:
    value = doc[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{key} should be {kind.__name__}")
    return value


def _count(doc: dict[str, Any], key: str) -> int:
    value = _get(doc, key, int)
    if value < 0:
        raise ValueError(f"{key} is negative")
    return int(value)


def _time(text: str) -> datetime:
    t = parse_iso_time(text)
    if t.tzinfo is None:
        raise ValueError("time without zone")
    return t.astimezone(UTC)
