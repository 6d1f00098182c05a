"""The tamper-evident audit log: a hash chain of HMAC-signed JSON lines.

Auditors must be able to tell that nobody edited, removed or reordered what
drdaemon recorded. Each record carries `prev`, the sha256 of the previous
line's bytes, so a removed or moved line breaks the chain; and `mac`, an HMAC
over its own content keyed by the audit key, which never leaves the host, so
someone who can write the file (or a bucket) but does not hold the key cannot
rebuild a consistent chain. The log lives in the state folder and is mirrored
to every region, where Object Lock keeps finished segments beyond the reach of
whoever controls this host; the layout is in docs/format.md ("Audit log").

The pure core builds records (`make_line`), withholds values that look like
secrets (`scrub`) and checks a chain (`verify_lines`); the shell appends under
an exclusive flock (`append`), mirrors (`mirror`) and verifies the local log
or a region's copy (`verify`, `verify_mirror`; both at once for the daemon's
scheduled check: `verify_everywhere`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from . import layout, statefs
from .config import Config
from .errors import DrError, UsageError
from .keys import ManifestKey
from .storage import ObjectStore, StorageError

log = logging.getLogger(__name__)

GENESIS = "0" * 64  # `prev` of the first record
AUDIT_KEY_LABEL = b"drdaemon audit key v1"
# Written by drdaemon itself; an event's own fields may not take these names.
RESERVED = frozenset({"seq", "time", "event", "prev", "mac", "withheld"})
MAX_LINE = 1 << 20  # records are small: a longer line is damage, not data
SEGMENT_RECORDS = 100  # records per mirrored object; a full segment is locked
RETRY_REGION_AFTER = 300.0  # seconds a region whose mirror failed is left alone
WITHHELD = "[withheld: looks like a secret]"


_SECRET_PATTERNS = (
    re.compile(r"AGE-SECRET-KEY-", re.IGNORECASE),  # an age identity
    re.compile(r"\bpassword\s*[=:]\s*[^\s,;]", re.IGNORECASE),  # libpq keyword DSN
    re.compile(r"[a-z][a-z0-9+.-]*://[^/@\s:]*:[^/@\s]+@", re.IGNORECASE),  # user:password@
)


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


def make_line(seq: int, at: str, event: str, fields: Mapping[str, Any], prev: str,
              key: bytes) -> bytes:
    """One signed record as the line to append (plain JSON values in `fields`)."""
    clash = RESERVED & (fields.keys() - {"withheld"})
    if clash:
        raise ValueError(f"event {event!r} uses reserved field names {sorted(clash)}")
    body = {**fields, "seq": seq, "time": at, "event": event, "prev": prev}
    return canonical({**body, "mac": sign(body, key)}) + b"\n"


# -- secrets ------------------------------------------------------------------

def looks_secret(text: str, known: Sequence[str] = ()) -> bool:
    """True for an age identity, a DSN or URL with a password, or a known key's hex."""
    lowered = text.lower()
    return (any(p.search(text) for p in _SECRET_PATTERNS)
            or any(k and k.lower() in lowered for k in known))


def scrub(value: Any, known: Sequence[str] = (), where: str = "") -> tuple[Any, list[str]]:
    """`value` with every string that looks like a secret withheld, and the paths withheld.

    The whole string goes, not just the part that matched: a pattern that
    finds a password has not proven it found all of it.
    """
    if isinstance(value, str):
        return (WITHHELD, [where or "value"]) if looks_secret(value, known) else (value, [])
    found: list[str] = []
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for n, (k, v) in enumerate(value.items()):
            name = str(k)
            path = f"{where}.{name}" if where else name
            if looks_secret(name, known):
                name, path = f"{WITHHELD} #{n}", f"{where}.#{n}" if where else f"#{n}"
                found.append(path)
            out[name], inner = scrub(v, known, path)
            found += inner
        return out, found
    if isinstance(value, list):
        items = []
        for n, v in enumerate(value):
            clean, inner = scrub(v, known, f"{where}[{n}]")
            items.append(clean)
            found += inner
        return items, found
    return value, []


def plain_fields(fields: Mapping[str, Any], known: Sequence[str] = ()) -> dict[str, Any]:
    """An event's fields as plain JSON values, secrets withheld (and listed in `withheld`)."""
    plain: dict[str, Any] = json.loads(json.dumps(dict(fields), default=str))
    clean, withheld = scrub(plain, known)
    if withheld:
        clean["withheld"] = withheld
    return dict(clean)


# -- verification (pure) ------------------------------------------------------

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


def check_line(line: bytes, seq: int, prev: str, key: bytes) -> str | None:
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
    mac = doc.pop("mac", None)
    if not isinstance(mac, str) or not hmac.compare_digest(mac, sign(doc, key)):
        return "MAC does not match: the record was edited, or written without the audit key"
    got = doc.get("seq")
    if type(got) is not int or got != seq:
        return f"seq is {got!r}, expected {seq}: a record was removed, inserted or moved"
    if doc.get("prev") != prev:
        before = "the genesis value" if seq == 0 else f"the sha256 of record {seq - 1}"
        return f"prev is not {before}: a record was removed, replaced or moved"
    if not isinstance(doc.get("event"), str) or not isinstance(doc.get("time"), str):
        return "the record has no event name or time"
    return None


def verify_lines(lines: Iterable[bytes], key: bytes) -> AuditVerification:
    """Check a chain: each line canonical, signed with `key`, numbered and linked in order.

    `lines` are the log's lines with their trailing b"\\n", as `split_lines`
    or iterating a file opened in binary mode gives them. A cut after a
    complete line cannot be seen from the lines alone: compare `head` with an
    earlier report or `records` with a region's mirror.
    """
    prev, count = GENESIS, 0
    for seq, line in enumerate(lines):
        why = check_line(line, seq, prev, key)
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


# -- the local log (shell) ----------------------------------------------------

LOG = statefs.AUDIT_LOG


class AuditContext(Protocol):
    """What the audit log needs of a runtime (runtime.Runtime is one)."""

    @property
    def config(self) -> Config: ...
    @property
    def stores(self) -> list[ObjectStore]: ...
    @property
    def manifest_key(self) -> ManifestKey: ...
    @property
    def audit_mirror(self) -> MirrorState: ...

    def clock(self) -> datetime: ...

    def store(self, region: str) -> ObjectStore: ...


def log_path(state_dir: Path) -> Path:
    return state_dir / LOG


def _last_line(fd: int, size: int) -> bytes:
    """The file's last line (with its newline, if it has one), read from the end."""
    start, step, buf = size, 4096, b""
    while start > 0:
        n = min(step, start)
        start -= n
        buf = os.pread(fd, n, start) + buf
        cut = buf.rfind(b"\n", 0, len(buf) - 1)
        if cut >= 0:
            return buf[cut + 1:]
        step *= 2
    return buf


def _next_position(fd: int) -> tuple[int, str]:
    """seq and prev of the record to append to the open, locked log."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0, GENESIS
    last = _last_line(fd, size)
    if not last.endswith(b"\n"):
        # A write was cut short (crash, full disk). End the damaged line so it
        # stays where it is, for `verify` to report, and the chain goes on after it.
        log.warning("audit log ends with an incomplete record; it is kept and will be "
                    "reported by `drctl audit verify`")
        statefs.write_all(fd, b"\n")
        last += b"\n"
    try:
        seq = json.loads(last)["seq"]
        if type(seq) is not int:
            raise TypeError(seq)
    except (ValueError, KeyError, TypeError, RecursionError):
        # The last line is damaged: in a sound log seq is the line number.
        seq = statefs.read_all(fd).count(b"\n") - 1
    return seq + 1, line_hash(last)


def known_secrets(manifest_key: ManifestKey) -> tuple[str, ...]:
    """Key material the runtime holds, which must never be written into a record."""
    return (manifest_key.secret.hex(), audit_key(manifest_key).hex())


def append(rt: AuditContext, event: str, fields: Mapping[str, Any]) -> int:
    """Append one signed record to the local log; return its seq.

    The exclusive flock covers reading the last line and writing the new one,
    so the daemon and any drctl process append one after the other and never
    fork the chain; fsync makes a record durable before the caller goes on.
    """
    clash = RESERVED & fields.keys()
    if clash:
        raise ValueError(f"event {event!r} uses reserved field names {sorted(clash)}")
    clean = plain_fields(fields, known_secrets(rt.manifest_key))
    if "withheld" in clean:
        log.warning("audit record %s: withheld %s: it looked like a secret", event,
                    ", ".join(clean["withheld"]))
    key = audit_key(rt.manifest_key)
    with statefs.appending(rt.config.daemon.state_dir, LOG) as fd:
        seq, prev = _next_position(fd)
        statefs.write_all(fd, make_line(seq, rt.clock().isoformat(), event, clean, prev, key))
    return seq


def read_lines(state_dir: Path) -> list[bytes]:
    """The local log's lines (none if there is no log yet)."""
    try:
        return split_lines(statefs.read_shared(state_dir, LOG))
    except FileNotFoundError:
        return []


def verify(rt: AuditContext) -> AuditVerification:
    """Verify the local audit log of this runtime's state folder."""
    return verify_lines(read_lines(rt.config.daemon.state_dir), audit_key(rt.manifest_key))


def show(rt: AuditContext, since: timedelta | None = None,
         prefix: str | None = None) -> tuple[list[dict[str, Any]], AuditVerification]:
    """The local log's records (newer than `since`, events starting with `prefix`), and
    whether the log verifies, from one read."""
    lines = read_lines(rt.config.daemon.state_dir)
    check = verify_lines(lines, audit_key(rt.manifest_key))
    cutoff = rt.clock() - since if since is not None else None
    return select(parse_records(lines), cutoff, prefix), check


# -- the mirror (shell) -------------------------------------------------------

@dataclass
class MirrorState:
    """Per runtime: when each region whose mirror failed may be tried again."""

    retry_at: dict[str, float] = field(default_factory=dict)


def mirror(rt: AuditContext) -> dict[str, str]:
    """Copy the local log to every region, best effort; return the regions that failed.

    Only segments that grew are written; a full segment is written once more
    with the Object Lock horizon where the bucket has Object Lock. A region that
    fails is logged and left alone for RETRY_REGION_AFTER seconds: this never
    raises for a region, so recording an event never fails because of one.
    """
    state_dir = rt.config.daemon.state_dir
    failed: dict[str, str] = {}
    # Serialised so that a slower mirror never replaces a newer copy with an older one.
    with statefs.locked(state_dir, statefs.AUDIT_MIRROR_LOCK, os.O_RDWR):
        lines = read_lines(state_dir)
        if not lines:
            return failed
        folder = mirror_folder(socket.gethostname(), lines[0])
        parts = list(segments(lines))
        lock_until = rt.config.retention.lock_until(rt.clock())
        for store in rt.stores:
            now = time.monotonic()
            if rt.audit_mirror.retry_at.get(store.name, 0.0) > now:
                continue
            try:
                _mirror_to(store, folder, parts, lock_until)
            except Exception as exc:  # any failure of one region: see the docstring
                why = str(exc) or exc.__class__.__name__
                failed[store.name] = why
                rt.audit_mirror.retry_at[store.name] = now + RETRY_REGION_AFTER
                log.warning("audit log not mirrored to region %s (retried in %d min): %s",
                            store.name, RETRY_REGION_AFTER // 60, why)
    return failed


def _mirror_to(store: ObjectStore, folder: str, parts: list[tuple[int, bytes, bool]],
               lock_until: datetime | None) -> None:
    held = {info.name: info.size for info in store.list(folder + "/")}
    for first, data, full in parts:
        name = layout.audit_segment_name(folder, first)
        size = held.get(name)
        if size == len(data):
            continue
        if size is not None and size > len(data):
            # The region holds more of this chain than the local log: the local
            # log was cut. A shorter copy must never replace the longer one.
            raise DrError(f"{name} holds {size} bytes but the local log only {len(data)}; "
                          "the local log was cut: run drctl audit verify --region "
                          f"{store.name}")
        store.put_bytes(name, data, retain_until=lock_until if full else None)


def read_mirror(store: ObjectStore, folder: str) -> list[bytes]:
    """A region's copy of a chain, segment after segment."""
    lines: list[bytes] = []
    for info in sorted(store.list(folder + "/"), key=lambda i: i.name):
        lines += split_lines(store.get_bytes(info.name, SEGMENT_RECORDS * MAX_LINE))
    return lines


def verify_mirror(rt: AuditContext, region: str) -> AuditVerification:
    """Verify a region's copy of this host's log, and that it agrees with the local log.

    A copy behind the local log is fine (the mirror is best effort); a copy
    that differs, or holds records the local log lost, is not.
    """
    store = rt.store(region)
    state_dir = rt.config.daemon.state_dir
    local = read_lines(state_dir)
    if not local:
        raise UsageError(f"no audit log in {log_path(state_dir)}: nothing to compare "
                         f"region {region} with")
    folder = mirror_folder(socket.gethostname(), local[0])
    mirrored = read_mirror(store, folder)
    local = read_lines(state_dir)  # read after the mirror: it can only have grown since
    if not mirrored:
        return AuditVerification(False, 0, 0, f"region {region} holds no copy of this log "
                                              f"({folder}/)")
    result = verify_lines(mirrored, audit_key(rt.manifest_key))
    upto = result.records if result.ok else (result.first_bad or 0)
    for seq in range(min(upto, len(local))):
        if mirrored[seq] != local[seq]:
            return AuditVerification(False, seq, seq, "differs from the local log: one of the "
                                     "two copies was rewritten", _head(mirrored, seq))
    if result.ok and len(mirrored) > len(local):
        return AuditVerification(False, len(local), len(local),
                                 f"region {region} holds {len(mirrored)} records but the local "
                                 f"log only {len(local)}: the local log was cut",
                                 _head(mirrored, len(local)))
    return result


def _head(lines: Sequence[bytes], count: int) -> str:
    return line_hash(lines[count - 1]) if count else GENESIS


# -- the scheduled check (shell) ----------------------------------------------

@dataclass(frozen=True)
class AuditCheck:
    """The local log and every region's copy of it, checked at `checked_at`.

    What the daemon's `audit` job reports and metrics export. `regions` holds
    the regions whose copy was read and compared with the local log;
    `unreachable` the regions that could not be read, which says nothing about
    the log (metrics keep their last result, so a long outage shows as a stale
    check). With no local log there is no chain to compare, so no region either.
    """

    checked_at: datetime
    local: AuditVerification
    regions: dict[str, AuditVerification] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.local.ok and all(r.ok for r in self.regions.values())

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked_at": self.checked_at.isoformat(),
                "local": self.local.to_dict(),
                "regions": {name: r.to_dict() for name, r in self.regions.items()},
                "unreachable": dict(self.unreachable)}


def verify_everywhere(rt: AuditContext) -> AuditCheck:
    """`drctl audit verify`, then `drctl audit verify --region R` for every region.

    The same service functions the CLI calls, one report; never raises for a
    region that cannot be read. A local log that verifies is mirrored first, so
    that a region added since the last record, or one that was down when it was
    recorded, is compared with all of it instead of reported as holding no copy;
    a log that does not verify is never copied over the regions' evidence.
    """
    checked_at = rt.clock()
    local = verify(rt)
    regions: dict[str, AuditVerification] = {}
    unreachable: dict[str, str] = {}
    if local.records or not local.ok:  # there is a log: lines verified, or a bad one
        if local.ok:
            mirror(rt)  # best effort; a cut local log never replaces a longer copy
        for store in rt.stores:
            try:
                regions[store.name] = verify_mirror(rt, store.name)
            except StorageError as exc:
                unreachable[store.name] = str(exc) or exc.__class__.__name__
    return AuditCheck(checked_at, local, regions, unreachable)
