"""The audit chain's records, pure: their one byte form, their MAC and link, and the check.

Each record carries `prev`, the sha256 of the previous line's bytes, so a
removed or moved line breaks the chain; and `mac`, an HMAC over its own content
keyed by the audit key, which never leaves the host. `make_line` builds a
record, `verify_lines` checks a chain, `segments` and `mirror_folder` say how a
chain is cut into the objects mirrored to the regions (docs/format.md, "Audit
log"). No I/O: the local log is audit.py, the regions' copies audit_mirror.py.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from . import layout
from .keys import ManifestKey
from .signing import ALGORITHM, PublicKey, SigningKey

GENESIS = "0" * 64  # `prev` of the first record
AUDIT_KEY_LABEL = b"drdaemon audit key v1"
# Written by drdaemon itself; an event's own fields may not take these names.
RESERVED = frozenset({"seq", "time", "event", "prev", "mac", "sig", "withheld"})
MAX_LINE = 1 << 20  # records are small: a longer line is damage, not data
SEGMENT_RECORDS = 100  # records per mirrored object; a full segment is locked


def audit_key(manifest_key: ManifestKey) -> bytes:
    """The audit MAC key, derived from the manifest key so operators keep no extra file.

    A separate derived key means an audit MAC can never be mistaken for (or
    replayed as) a manifest MAC.
    """
    return hmac.new(manifest_key.secret, AUDIT_KEY_LABEL, hashlib.sha256).digest()


def canonical(doc: Mapping[str, Any]) -> bytes:
    """The one byte form of a record: sorted keys, no spaces, ASCII only.

    ASCII (\\u escapes) keeps lone surrogates from odd file names encodable and
    the bytes the same whatever the checker's locale.
    """
    return json.dumps(doc, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode("ascii")


def line_hash(line: bytes) -> str:
    """sha256 hex of a line's exact bytes, newline included (`sed -n Np | sha256sum`)."""
    return hashlib.sha256(line).hexdigest()


def sign(body: Mapping[str, Any], key: bytes) -> str:
    """HMAC-SHA256 hex over the canonical form of a record without its `mac`."""
    return hmac.new(key, canonical(body), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class ChainKeys:
    """What a chain's records may be checked with.

    `hmac`: audit keys (`audit_key` of each manifest key in use; only the
    operator holds them). `public`: Ed25519 public keys; anyone may hold them,
    and a record signed with one of them proves itself without any secret.
    """

    hmac: tuple[bytes, ...] = ()
    public: tuple[PublicKey, ...] = ()

    @classmethod
    def of(cls, keys: ChainKeys | bytes) -> ChainKeys:
        """`keys` as ChainKeys (a bare bytes value is one audit key, as older callers pass)."""
        return keys if isinstance(keys, ChainKeys) else cls(hmac=(keys,))


def seal(body: Mapping[str, Any], signer: bytes | SigningKey) -> dict[str, Any]:
    """`body` with its authentication: `sig` (Ed25519) for a signing key, else `mac`."""
    if isinstance(signer, SigningKey):
        return {**body, "sig": {"alg": ALGORITHM, "key": signer.fingerprint,
                                "value": signer.sign_b64(canonical(body))}}
    return {**body, "mac": sign(body, signer)}


def make_line(seq: int, at: str, event: str, fields: Mapping[str, Any], prev: str,
              key: bytes | SigningKey) -> bytes:
    """One signed record as the line to append (plain JSON values in `fields`)."""
    clash = RESERVED & (fields.keys() - {"withheld"})
    if clash:
        raise ValueError(f"event {event!r} uses reserved field names {sorted(clash)}")
    body = {**fields, "seq": seq, "time": at, "event": event, "prev": prev}
    return canonical(seal(body, key)) + b"\n"


def authentic(doc: dict[str, Any], keys: ChainKeys) -> str | None:
    """Why the record `doc` (parsed; its `mac`/`sig` are removed) is not authenticated
    by `keys`; None when it is."""
    mac, sig = doc.pop("mac", None), doc.pop("sig", None)
    if sig is not None:
        if mac is not None or not isinstance(sig, dict) or sig.get("alg") != ALGORITHM:
            return "the record's signature is not an ed25519 signature"
        key = next((k for k in keys.public if k.fingerprint == sig.get("key")), None)
        if key is None:
            return f"signed by {str(sig.get('key'))[:48]!r}, which is not a trusted public key"
        if not key.verify_b64(canonical(doc), sig.get("value")):
            return "signature does not match: the record was edited after it was signed"
        return None
    if not isinstance(mac, str) or not any(hmac.compare_digest(mac, sign(doc, k))
                                           for k in keys.hmac):
        return "MAC does not match: the record was edited, or written without the audit key"
    return None


@dataclass(frozen=True)
class AuditVerification:
    """The outcome of checking a chain of audit records.

    `records` counts the records that verified, from the first on; `first_bad`
    is the line number (0-based, equal to the seq it should carry) of the first
    record that did not, with `reason`. `head` is the sha256 of the last line
    that verified (GENESIS for none): write it down in a report, and a later
    cut of the log shows as a head that is no longer in it.
    """

    ok: bool
    records: int
    first_bad: int | None = None
    reason: str | None = None
    head: str = GENESIS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_lines(data: bytes) -> list[bytes]:
    """Lines with their b"\\n" (only b"\\n" ends a line); a cut last line stays as is."""
    parts = data.split(b"\n")
    lines = [p + b"\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def check_line(line: bytes, seq: int, prev: str, key: ChainKeys | bytes) -> str | None:
    """Why `line` is not record `seq` following a line hashing to `prev`; None if it is."""
    if not line.endswith(b"\n"):
        return "the line is incomplete: the log was cut short or a write was interrupted"
    if len(line) > MAX_LINE:
        return f"the line is longer than {MAX_LINE} bytes"
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):
        return "not a JSON record"
    if not isinstance(doc, dict):
        return "not a JSON record"
    if canonical(doc) + b"\n" != line:
        return "not in canonical form: the line was edited"
    why = authentic(doc, ChainKeys.of(key))
    if why is not None:
        return why
    got = doc.get("seq")
    if type(got) is not int or got != seq:
        return f"seq is {got!r}, expected {seq}: a record was removed, inserted or moved"
    if doc.get("prev") != prev:
        before = "the genesis value" if seq == 0 else f"the sha256 of record {seq - 1}"
        return f"prev is not {before}: a record was removed, replaced or moved"
    if not isinstance(doc.get("event"), str) or not isinstance(doc.get("time"), str):
        return "the record has no event name or time"
    return None


def verify_lines(lines: Iterable[bytes], key: ChainKeys | bytes) -> AuditVerification:
    """Check a chain: each line canonical, authenticated by `key`, numbered and linked in order.

    `lines` are the log's lines with their trailing b"\\n", as `split_lines`
    or iterating a file opened in binary mode gives them. A cut after a
    complete line cannot be seen from the lines alone: compare `head` with an
    earlier report or `records` with a region's mirror.
    """
    prev, count, keys = GENESIS, 0, ChainKeys.of(key)
    for seq, line in enumerate(lines):
        why = check_line(line, seq, prev, keys)
        if why is not None:
            return AuditVerification(False, count, seq, why, prev)
        prev, count = line_hash(line), count + 1
    return AuditVerification(True, count, None, None, prev)


def parse_records(lines: Iterable[bytes]) -> list[dict[str, Any]]:
    """The records that parse as JSON objects, in log order (for reading, not trust)."""
    out = []
    for line in lines:
        try:
            doc = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def select(records: Iterable[dict[str, Any]], since: datetime | None = None,
           prefix: str | None = None) -> list[dict[str, Any]]:
    """Records at or after `since` whose event name starts with `prefix`."""
    out = []
    for r in records:
        if prefix and not str(r.get("event", "")).startswith(prefix):
            continue
        if since is not None:
            try:
                at = datetime.fromisoformat(str(r.get("time")))
            except ValueError:
                continue
            if at.tzinfo is None or at < since:
                continue
        out.append(r)
    return out


def segments(lines: Sequence[bytes]) -> Iterator[tuple[int, bytes, bool]]:
    """(first seq, bytes, full?) of each mirrored segment of SEGMENT_RECORDS lines."""
    for first in range(0, len(lines), SEGMENT_RECORDS):
        chunk = lines[first:first + SEGMENT_RECORDS]
        yield first, b"".join(chunk), len(chunk) == SEGMENT_RECORDS


def mirror_folder(host: str, first_line: bytes) -> str:
    """Where a chain is mirrored: per host, then per chain (a new log is a new chain)."""
    return layout.audit_mirror_folder(host, line_hash(first_line)[:16])


def verify_public(lines: Sequence[bytes], public: PublicKey) -> AuditVerification:
    """Check a chain with nothing but a public key (what an auditor holds)."""
    return verify_lines(lines, ChainKeys(public=(public,)))
