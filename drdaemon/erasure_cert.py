"""The erasure certificate: what a crypto-shred of one tenant did, as data, JSON and HTML.

Pure functions only (erasure.py does the work and the I/O). The JSON is
canonical and authenticated with the manifest key (HMAC-SHA256 under its own
label, so no manifest or audit MAC can be replayed as a certificate); the HTML
page is rendered from templates/erasure.html.j2 by the drill report's Jinja2
environment, with autoescape: object names and error messages come from storage
and servers, so nothing is escaped by hand. docs/format.md, "Erasure
certificates", describes the fields.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import layout
from .errors import IntegrityError
from .keys import ManifestKey
from .pages import render_template
from .units import format_utc, parse_iso_time

VERSION = 1
MAX_CERTIFICATE_BYTES = 64 << 20
STATE_FOLDER = "state folder"  # where= of a key copy kept in the state folder
_MAC_LABEL = b"drdaemon-erasure-certificate\0"


@dataclass(frozen=True)
class StoredObject:
    """One version of one object (`where`: a region, or STATE_FOLDER; version "" if none)."""

    where: str
    name: str
    version_id: str = ""
    size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"where": self.where, "name": self.name, "version_id": self.version_id,
                "size": self.size}


@dataclass(frozen=True)
class LockedObject:
    """A version left in place under Object Lock, deleted by prune from `retain_until` on."""

    where: str
    name: str
    version_id: str
    retain_until: datetime

    def to_dict(self) -> dict[str, Any]:
        return {"where": self.where, "name": self.name, "version_id": self.version_id,
                "retain_until": format_utc(self.retain_until)}


@dataclass(frozen=True)
class DestroyedKey:
    """A tenant key whose wrapped copies were destroyed.

    `fingerprint` (keys.fingerprint of its recipient) is None when no readable
    public record named the recipient; `verified` says whether the recipient
    really derives `key_id` (a planted record would not).
    """

    key_id: str
    fingerprint: str | None
    verified: bool

    def to_dict(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "fingerprint": self.fingerprint,
                "verified": self.verified}


@dataclass(frozen=True)
class Check:
    """Step 3: every region (all versions) and the state folder listed for key copies."""

    ok: bool
    places: tuple[str, ...]  # listed completely
    remaining: tuple[StoredObject, ...] = ()  # key copies still there
    unreadable: tuple[tuple[str, str], ...] = ()  # (where, why): could not be listed

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "places": list(self.places),
                "remaining": [o.to_dict() for o in self.remaining],
                "unreadable": [{"where": w, "error": e} for w, e in self.unreadable]}

    def summary(self) -> str:
        if self.ok:
            return (f"passed: no copy of a key of this tenant in {', '.join(self.places)} "
                    "(every object version listed)")
        parts = [f"{o.where}: {o.name}" + (f" (version {o.version_id})" if o.version_id else "")
                 for o in self.remaining]
        parts += [f"{w} could not be listed: {e}" for w, e in self.unreadable]
        return "FAILED: " + "; ".join(parts)


@dataclass
class ErasureCertificate:
    tenant: str
    started_at: datetime
    finished_at: datetime
    sources: tuple[str, ...]
    places: tuple[str, ...]  # the regions, then STATE_FOLDER
    keys: tuple[DestroyedKey, ...]
    key_copies: tuple[StoredObject, ...]  # destroyed
    deleted: tuple[StoredObject, ...]  # snapshot objects deleted
    locked: tuple[LockedObject, ...]  # left under Object Lock
    check: Check
    errors: tuple[str, ...] = ()
    dry_run: bool = False
    version: int = field(default=VERSION)

    @property
    def stamp(self) -> str:
        """The certificate's name part: when the erasure began."""
        return layout.stamp(self.started_at)

    @property
    def name(self) -> str:
        return layout.erasure_certificate_object(self.tenant, self.stamp)

    @property
    def ok(self) -> bool:
        """Complete: every key copy gone (checked), every unlocked object deleted."""
        return self.check.ok and not self.errors

    def body(self) -> dict[str, Any]:
        return {
            "version": self.version, "kind": "erasure-certificate", "tenant": self.tenant,
            "started_at": format_utc(self.started_at),
            "finished_at": format_utc(self.finished_at),
            "sources": list(self.sources), "places": list(self.places),
            "keys": [k.to_dict() for k in self.keys],
            "key_copies": [o.to_dict() for o in self.key_copies],
            "deleted": [o.to_dict() for o in self.deleted],
            "locked": [o.to_dict() for o in self.locked],
            "check": self.check.to_dict(), "errors": list(self.errors),
            "dry_run": self.dry_run, "ok": self.ok,
        }


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _mac(body: dict[str, Any], key: ManifestKey) -> str:
    return hmac.new(key.secret, _MAC_LABEL + _canonical(body), hashlib.sha256).hexdigest()


def serialize(cert: ErasureCertificate, key: ManifestKey) -> bytes:
    """The certificate as JSON with its MAC, ready to store."""
    body = cert.body()
    doc = dict(body, mac={"algorithm": "hmac-sha256", "key_id": key.key_id,
                          "value": _mac(body, key)})
    return json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=False).encode() + b"\n"


def _obj(d: Any) -> StoredObject:
    return StoredObject(str(d["where"]), str(d["name"]), str(d["version_id"]), int(d["size"]))


def parse(raw: bytes, key: ManifestKey, tenant: str | None = None) -> ErasureCertificate:
    """Parse and authenticate an untrusted certificate; IntegrityError if it is not ours."""
    if len(raw) > MAX_CERTIFICATE_BYTES:
        raise IntegrityError(f"erasure certificate is larger than {MAX_CERTIFICATE_BYTES} bytes")
    try:
        doc = json.loads(raw)
        mac = doc.pop("mac")
        # Any key of a key set that the MAC names by id: a retired key still
        # verifies the certificates it signed.
        signer = key.for_id(mac.get("key_id")) if isinstance(mac, dict) else None
        if (signer is None or not isinstance(mac.get("value"), str)
                or not hmac.compare_digest(mac["value"], _mac(doc, signer))):
            raise IntegrityError("erasure certificate authentication failed: altered, forged "
                                 "or signed with another manifest key")
        check = doc["check"]
        cert = ErasureCertificate(
            tenant=str(doc["tenant"]), started_at=parse_iso_time(doc["started_at"]),
            finished_at=parse_iso_time(doc["finished_at"]),
            sources=tuple(map(str, doc["sources"])), places=tuple(map(str, doc["places"])),
            keys=tuple(DestroyedKey(str(k["key_id"]), k["fingerprint"], bool(k["verified"]))
                       for k in doc["keys"]),
            key_copies=tuple(_obj(o) for o in doc["key_copies"]),
            deleted=tuple(_obj(o) for o in doc["deleted"]),
            locked=tuple(LockedObject(str(o["where"]), str(o["name"]), str(o["version_id"]),
                                      parse_iso_time(o["retain_until"]))
                         for o in doc["locked"]),
            check=Check(bool(check["ok"]), tuple(map(str, check["places"])),
                        tuple(_obj(o) for o in check["remaining"]),
                        tuple((str(u["where"]), str(u["error"])) for u in check["unreadable"])),
            errors=tuple(map(str, doc["errors"])), dry_run=bool(doc["dry_run"]),
            version=int(doc["version"]))
    except IntegrityError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise IntegrityError("erasure certificate is malformed") from None
    if tenant is not None and cert.tenant != tenant:
        raise IntegrityError(f"erasure certificate is for tenant {cert.tenant!r}, "
                             f"found under {tenant!r}")
    return cert


def _when(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def render_html(cert: ErasureCertificate) -> str:
    """A self-contained page (inline CSS, no script) for people and auditors."""
    return render_template(
        "erasure.html.j2", tenant=cert.tenant, started=_when(cert.started_at),
        finished=_when(cert.finished_at), name=cert.name, ok=cert.ok,
        dry_run=cert.dry_run, sources=cert.sources, places=cert.places,
        keys=[k.to_dict() for k in cert.keys],
        key_copies=[o.to_dict() for o in cert.key_copies],
        deleted=[o.to_dict() for o in cert.deleted],
        locked=[dict(o.to_dict(), retain_until=_when(o.retain_until)) for o in cert.locked],
        check_ok=cert.check.ok, check_text=cert.check.summary(), errors=cert.errors)
