"""The audit chain's records, pure: their one byte form, their MAC and link, and the check.

Each record carries `prev`, the sha256 of the previous line's bytes, so a
removed or moved line breaks the chain; and either `mac`, an HMAC over its own
content keyed by the audit key, which never leaves the host, or `sig`, an
Ed25519 signature anyone can check with the public key. The log crosses from
one signer to the next with an `audit.signing-key` record (HANDOVER) that the
previous signer authenticates and that names the next one; the verifier tracks
the signer in force, so a downgrade to a MAC, or a key no handover named, is
refused. `make_line` builds a record, `verify_lines` checks a chain,
`verify_public` is an auditor's check with a public key alone, `segments` and
`mirror_folder` say how a chain is cut into the objects mirrored to the regions
(docs/format.md, "Audit log"). No I/O: the local log is audit.py, the regions'
copies audit_mirror.py.
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
from .errors import UsageError
from .keys import ManifestKey
from .signing import ALGORITHM, PublicKey, SigningKey, parse_public_key

GENESIS = "0" * 64  # `prev` of the first record
AUDIT_KEY_LABEL = b"drdaemon audit key v1"
# Written by drdaemon itself; an event's own fields may not take these names.
RESERVED = frozenset({"seq", "time", "event", "prev", "mac", "sig", "withheld"})
MAX_LINE = 1 << 20  # records are small: a longer line is damage, not data
SEGMENT_RECORDS = 100  # records per mirrored object; a full segment is locked
# The record that hands the log over to an Ed25519 signing key (fields
# `fingerprint`, `public_key`), authenticated by the signer before it.
HANDOVER = "audit.signing-key"


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


def handover_fields(key: PublicKey) -> dict[str, Any]:
    """The fields of the HANDOVER record that names `key` as the log's next signer."""
    return {"fingerprint": key.fingerprint, "public_key": key.pem().decode("ascii")}


def handed_over_to(doc: Mapping[str, Any]) -> PublicKey | str:
    """The key a HANDOVER record names, or why it names none (an untrusted record)."""
    pem, named = doc.get("public_key"), doc.get("fingerprint")
    if not isinstance(pem, str) or not pem.isascii():
        return "the audit.signing-key record holds no public key"
    try:
        key = parse_public_key(pem.encode("ascii"), "the audit.signing-key record")
    except UsageError as exc:
        return str(exc)
    if key.fingerprint != named:
        return "the audit.signing-key record's fingerprint is not its public key's"
    return key


def signer_of(doc: Mapping[str, Any]) -> str | None:
    """The fingerprint that signed a parsed record, or None for a MAC'd (or odd) one."""
    sig = doc.get("sig")
    key = sig.get("key") if isinstance(sig, dict) else None
    return key if isinstance(key, str) else None


def public_keys_of(lines: Iterable[bytes]) -> list[PublicKey]:
    """The keys the chain's HANDOVER records name, in log order, unchecked.

    For reading (an evidence bundle ships them, a report names them); trust
    comes from `verify_lines`, which accepts a handed-over key only when the
    handover is authenticated by a key it already trusts.
    """
    out: list[PublicKey] = []
    for doc in parse_records(lines):
        if doc.get("event") == HANDOVER:
            key = handed_over_to(doc)
            if isinstance(key, PublicKey) and key not in out:
                out.append(key)
    return out


@dataclass(frozen=True)
class AuditVerification:
    """The outcome of checking a chain of audit records.

    `records` counts the records that verified, from the first on; `first_bad`
    is the line number (0-based, equal to the seq it should carry) of the first
    record that did not, with `reason`. `head` is the sha256 of the last line
    that verified (GENESIS for none): write it down in a report, and a later
    cut of the log shows as a head that is no longer in it. `signer` is the
    fingerprint of the Ed25519 key that signed the head (None: a MAC).
    `unproven` counts the records at the start of the log whose authors could
    not be checked with the keys given (HMAC records, for an auditor holding
    only the public key); their links are checked, and the first proven
    record's signature covers them through its `prev`.
    """

    ok: bool
    records: int
    first_bad: int | None = None
    reason: str | None = None
    head: str = GENESIS
    signer: str | None = None
    unproven: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Signers:
    """Who may authenticate the next record, as a chain is walked (see verify_lines)."""

    keys: ChainKeys
    trusted: set[str]  # fingerprints the checker trusts: given, or handed over by a proven record
    current: PublicKey | None = None  # the Ed25519 signer in force; None: MACs
    handed: PublicKey | None = None  # named by the previous record: it signs the next one
    handed_proven: bool = False

    def check(self, doc: dict[str, Any], seq: int) -> tuple[str | None, bool]:
        """(why `doc` is not authentic here, None if it is; whether it is proven).

        `doc` is the parsed record; its `mac`/`sig` are removed.
        """
        mac, sig = doc.pop("mac", None), doc.pop("sig", None)
        if sig is not None:
            why, proven = self._signed(doc, sig, seq, mac)
        elif self.current is not None or self.handed is not None:
            named = self.handed or self.current
            return (f"a record with a MAC where the log is signed by "
                    f"{named.fingerprint if named else '?'}: a downgrade, refused"), False
        elif not self.keys.hmac:
            why, proven = None, False  # nothing to check it with: unproven, links still checked
        elif not isinstance(mac, str) or not any(hmac.compare_digest(mac, sign(doc, k))
                                                 for k in self.keys.hmac):
            return ("MAC does not match: the record was edited, or written without the audit "
                    "key"), False
        else:
            why, proven = None, True
        if why is None and doc.get("event") == HANDOVER:
            key = handed_over_to(doc)
            if not isinstance(key, PublicKey):
                return key, False
            self.handed, self.handed_proven = key, proven
        return why, proven

    def _signed(self, doc: dict[str, Any], sig: object, seq: int,
                mac: object) -> tuple[str | None, bool]:
        if mac is not None or not isinstance(sig, dict) or sig.get("alg") != ALGORITHM:
            return "the record's signature is not an ed25519 signature", False
        fp = str(sig.get("key"))[:48]
        allowed = self.handed or self.current
        if allowed is None and seq == 0 and doc.get("event") == HANDOVER:
            # A new log begins with a handover signed by the key it names.
            named = handed_over_to(doc)
            allowed = named if isinstance(named, PublicKey) else None
        if allowed is None:
            return (f"signed by {fp!r}, but no audit.signing-key record handed the log over "
                    "to it"), False
        if allowed.fingerprint != fp:
            return (f"signed by {fp!r}, but the log was handed over to "
                    f"{allowed.fingerprint}"), False
        if not allowed.verify_b64(canonical(doc), sig.get("value")):
            return "signature does not match: the record was edited after it was signed", False
        if self.handed is not None and self.handed_proven:
            self.trusted.add(allowed.fingerprint)
        self.current, self.handed = allowed, None
        return None, allowed.fingerprint in self.trusted


def signature_problem(doc: Mapping[str, Any], public: PublicKey) -> str | None:
    """Why the signed document `doc` (a drill record: `sig` over the canonical rest) is
    not signed by `public`; None if it is. For documents outside the chain."""
    body = dict(doc)
    sig = body.pop("sig", None)
    if not isinstance(sig, dict) or sig.get("alg") != ALGORITHM or "mac" in body:
        return "the record's signature is not an ed25519 signature"
    if sig.get("key") != public.fingerprint:
        return f"signed by {str(sig.get('key'))[:48]!r}, not by {public.fingerprint}"
    if not public.verify_b64(canonical(body), sig.get("value")):
        return "signature does not match: the record was edited after it was signed"
    return None


def split_lines(data: bytes) -> list[bytes]:
    """Lines with their b"\\n" (only b"\\n" ends a line); a cut last line stays as is."""
    parts = data.split(b"\n")
    lines = [p + b"\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _parse_line(line: bytes) -> dict[str, Any] | str:
    """The record on `line`, or why it is none (cut, too long, not canonical JSON)."""
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
    return doc


def _check_position(doc: Mapping[str, Any], seq: int, prev: str) -> str | None:
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
    """Check a chain: each line canonical, authenticated, numbered and linked in order.

    `lines` are the log's lines with their trailing b"\\n", as `split_lines`
    or iterating a file opened in binary mode gives them. MAC'd records need
    an audit key of `key`; signed records need the key the chain handed over
    to (HANDOVER), and prove themselves when that key is trusted: one of
    `key.public`, or named by a handover that a trusted key (or an audit key)
    authenticated. Records no given key proves may only open the log
    (`unproven`); a log in which nothing is proven does not verify. A cut after
    a complete line cannot be seen from the lines alone: compare `head` with an
    earlier report or `records` with a region's mirror.
    """
    keys = ChainKeys.of(key)
    signers = _Signers(keys, {k.fingerprint for k in keys.public})
    prev, count, unproven, signer = GENESIS, 0, 0, None
    for seq, line in enumerate(lines):
        doc = _parse_line(line)
        if isinstance(doc, str):
            return AuditVerification(False, count, seq, doc, prev, signer, unproven)
        position = _check_position(doc, seq, prev)
        why, proven = signers.check(doc, seq)
        why = why or position
        if why is not None:
            return AuditVerification(False, count, seq, why, prev, signer, unproven)
        prev, count = line_hash(line), count + 1
        unproven += 0 if proven else 1
        signer = signers.current.fingerprint if signers.current is not None else None
    if count and unproven == count:
        given = ", ".join(k.fingerprint for k in keys.public) or "no public key"
        return AuditVerification(False, 0, 0, f"no record is proven by the keys given ({given}"
                                 f"{', and no audit key' if not keys.hmac else ''}): nothing "
                                 "shows who wrote this log", GENESIS, None, unproven)
    return AuditVerification(True, count, None, None, prev, signer, unproven)


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
