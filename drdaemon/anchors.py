"""Anchors: the audit log's head, kept where whoever runs drdaemon cannot rewrite it.

An operator holding every key can rebuild a sound chain without a record; what
he cannot do is change what was written elsewhere before. Periodically (the
daemon's anchor job, `[audit] anchor_every`) the head of the log - its last
record's seq and line hash - becomes an anchor document, time-stamped by an
RFC 3161 authority (`[audit] tsa_url`: tsa.py) and/or written to a witness
bucket under Object Lock (`[audit.witness]`), kept in the state folder
(`<state>/audit-anchors/`) and in every region (`audit/anchors/<host>/<chain>/`).
`check_extends` proves that a log extends every anchored head: a log that does
not was rewritten (or cut, or replaced), and is named so. The layout is in
docs/format.md ("Audit log", "Anchors").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from . import layout, statefs, tsa
from .audit import AuditContext, chain_label, read_lines, verify
from .audit_chain import canonical, line_hash
from .storage import ObjectStore, open_store
from .storage.base import read_bounded

log = logging.getLogger(__name__)

FORMAT = "drdaemon.audit-anchor"
VERSION = 1
FOLDER = "audit-anchors"  # in the state folder
MAX_ANCHOR = 4096  # an anchor document is a few hundred bytes


class AnchorContext(AuditContext, Protocol):
    """What anchoring needs of a runtime besides the local log (runtime.Runtime is one)."""

    @property
    def stores(self) -> list[ObjectStore]: ...


@dataclass(frozen=True)
class Anchor:
    """One anchored head: record `seq` of a chain had the line hash `head` at `time`.

    `raw` is the anchor document exactly as time-stamped and stored; `token`
    the TSA's reply (`<seq>.tsr`) if there is one, `tsa_time` the time it
    states; `where` says where this copy was found or written.
    """

    seq: int
    head: str
    time: str
    tsa_time: str | None
    where: list[str]
    raw: bytes
    token: bytes | None
    chain: str = ""
    host: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "head": self.head, "time": self.time,
                "tsa_time": self.tsa_time, "where": list(self.where), "chain": self.chain,
                "host": self.host, "token": self.token is not None}


def document(host: str, chain: str, seq: int, head: str, at: datetime) -> bytes:
    """The anchor document's bytes (what is time-stamped and stored)."""
    return canonical({"format": FORMAT, "version": VERSION, "host": layout.host_label(host),
                      "chain": chain, "seq": seq, "head": head, "time": at.isoformat()})


def parse(raw: bytes, token: bytes | None, where: Sequence[str]) -> Anchor:
    """An anchor read back (untrusted bytes); ValueError if it is not one."""
    if len(raw) > MAX_ANCHOR:
        raise ValueError("longer than an anchor")
    doc = json.loads(raw)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise ValueError(f"not a {FORMAT} version {VERSION} document")
    seq, head = doc.get("seq"), doc.get("head")
    if type(seq) is not int or seq < 0 or not isinstance(head, str) or len(head) != 64:
        raise ValueError("no valid seq and head")
    fields = [doc.get(k) for k in ("time", "chain", "host")]
    if not all(isinstance(v, str) for v in fields):
        raise ValueError("no time, chain or host")
    return Anchor(seq, head, str(fields[0]), tsa.stamp_time(token) if token else None,
                  list(where), raw, token, str(fields[1]), str(fields[2]))


def chain_of(lines: Sequence[bytes]) -> str | None:
    """The chain id of a log (the 16 hex its mirror folder is named by); None if empty."""
    return line_hash(lines[0])[:16] if lines else None


# -- in the state folder ---------------------------------------------------------------

def _state_name(seq: int, suffix: str) -> str:
    return f"{FOLDER}/{seq:012d}.{suffix}"


def load_all(state_dir: Path) -> list[Anchor]:
    """Every anchor kept in the state folder, oldest first; one that cannot be read is
    logged and left out (the copies in the regions and the witness remain)."""
    found = []
    for name in sorted(statefs.list_names(state_dir, FOLDER)):
        if not name.endswith(".json"):
            continue
        stem = name.removesuffix(".json")
        try:
            raw = statefs.read_bytes(state_dir, f"{FOLDER}/{name}")
            try:
                token: bytes | None = statefs.read_bytes(state_dir, f"{FOLDER}/{stem}.tsr")
            except FileNotFoundError:
                token = None
            found.append(parse(raw, token, ["state"]))
        except (OSError, ValueError) as exc:
            log.warning("anchor %s/%s not read: %s", FOLDER, name, exc)
    return found


def newest(state_dir: Path) -> Anchor | None:
    """The most recent anchor in the state folder (by its time), or None."""
    return max(load_all(state_dir), key=lambda a: (a.time, a.seq), default=None)


# -- in the regions and the witness ----------------------------------------------------

def load_stored(store: ObjectStore, host: str) -> list[Anchor]:
    """Every anchor of `host` (all its chains) a region or witness bucket holds."""
    prefix = f"{layout.AUDIT_MIRROR}/{layout.AUDIT_ANCHORS}/{layout.host_label(host)}/"
    names = {info.name for info in store.list(prefix)}
    found = []
    for name in sorted(names):
        parsed = layout.parse_audit_anchor(name)
        if parsed is None or parsed[3] != "json":
            continue
        token_name = name.removesuffix(".json") + ".tsr"
        token = read_bounded(store, token_name, tsa.MAX_TOKEN) if token_name in names else None
        try:
            found.append(parse(read_bounded(store, name, MAX_ANCHOR), token, [store.name]))
        except ValueError as exc:
            log.warning("anchor %s in %s not read: %s", name, store.name, exc)
    return found


# -- the check ---------------------------------------------------------------------------

def check_extends(lines: Sequence[bytes], anchors: Iterable[Anchor], tsa_ca: Path | None,
                  tsa_certs: Path | None = None) -> list[str]:
    """What is wrong with `lines` against `anchors`: each anchored head the log does not
    extend is a "rewrite: ..." naming the anchor's seq and its times; with `tsa_ca`,
    each anchor's time-stamp token is checked too (`openssl ts -verify`)."""
    chain = chain_of(lines)
    problems = []
    for a in anchors:
        when = f"anchored {a.time}" + (f", TSA time {a.tsa_time}" if a.tsa_time else "")
        what = f"record {a.seq} (head {a.head[:16]}..., {when}, in {', '.join(a.where)})"
        if a.chain != chain:
            problems.append(f"rewrite: anchored {what} belongs to chain {a.chain}, and this "
                            f"log is {'empty' if chain is None else 'chain ' + chain}: the "
                            "log was wiped or replaced")
        elif a.seq >= len(lines):
            problems.append(f"rewrite: anchored {what} is beyond the log's {len(lines)} "
                            "records: the log was cut or rewritten")
        elif line_hash(lines[a.seq]) != a.head:
            problems.append(f"rewrite: anchored {what} is not record {a.seq} of the log: the "
                            "log was rewritten")
        if tsa_ca is not None and a.token is not None:
            why = tsa.verify(a.raw, a.token, tsa_ca, tsa_certs)
            if why is not None:
                problems.append(f"anchor of record {a.seq} ({', '.join(a.where)}): its "
                                f"time-stamp token does not verify: {why}")
    return problems


def check_local(rt: AnchorContext, lines: Sequence[bytes]) -> list[str]:
    """`check_extends` of the local log against the state folder's anchors."""
    return check_with(rt, lines, load_all(rt.config.daemon.state_dir))


def check_with(rt: AnchorContext, lines: Sequence[bytes], anchors: Iterable[Anchor]) -> list[str]:
    """`check_extends` with the configured TSA certificates."""
    cfg = rt.config.audit
    return check_extends(lines, anchors, cfg.tsa_ca_file, cfg.tsa_certs_file)


def check_witness(rt: AnchorContext, lines: Sequence[bytes]) -> list[str]:
    """`check_extends` of the local log against the witness bucket's anchors of this host
    (none without `[audit.witness]`); StorageError if the witness cannot be read."""
    witness = rt.config.audit.witness
    if witness is None:
        return []
    return check_with(rt, lines, load_stored(open_store(witness), chain_label(rt.config.daemon)))


# -- the daemon's job --------------------------------------------------------------------

@dataclass(frozen=True)
class AnchorReport:
    """An anchoring run: the anchor that now covers the head (None: no log yet), whether it
    was made by this run, and where it could not be written or stamped (`failures`)."""

    checked_at: datetime
    anchor: Anchor | None = None
    made: bool = False
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked_at": self.checked_at.isoformat(), "made": self.made,
                "anchor": self.anchor.to_dict() if self.anchor else None,
                "failures": dict(self.failures)}


def anchor(rt: AnchorContext) -> AnchorReport:
    """Anchor the local log's head (the daemon's anchor job, `drctl audit anchor`).

    A head already anchored is left as it is; a log that does not verify is
    never anchored (that would vouch for the damage). The time-stamp, the state
    folder, every region and the witness are each tried: one failing never stops
    the others, and is reported.
    """
    now = rt.clock()
    state_dir = rt.config.daemon.state_dir
    lines = read_lines(state_dir)
    if not lines:
        return AnchorReport(now)
    check = verify(rt)
    if not check.ok:
        return AnchorReport(now, failures={"log": f"the audit log does not verify from record "
                                                  f"{check.first_bad}: not anchored"})
    seq, head, chain = len(lines) - 1, line_hash(lines[-1]), chain_of(lines) or ""
    last = newest(state_dir)
    if last is not None and (last.chain, last.seq, last.head) == (chain, seq, head):
        return AnchorReport(now, last)
    host = chain_label(rt.config.daemon)
    raw = document(host, chain, seq, head, now)
    failures: dict[str, str] = {}
    token = _stamp(rt, raw, failures)
    where = _store_all(rt, host, chain, seq, raw, token, failures)
    made = parse(raw, token, where)
    log.info("audit log anchored at record %d (%s)", seq, ", ".join(where) or "nowhere")
    return AnchorReport(now, made, True, failures)


def _stamp(rt: AnchorContext, raw: bytes, failures: dict[str, str]) -> bytes | None:
    cfg = rt.config.audit
    if cfg.tsa_url is None:
        return None
    try:
        token = tsa.request(cfg.tsa_url, raw)
        why = tsa.verify(raw, token, cfg.tsa_ca_file, cfg.tsa_certs_file) \
            if cfg.tsa_ca_file is not None else None
    except tsa.TsaError as exc:
        why = str(exc)
    if why is not None:
        failures["tsa"] = why
        log.warning("audit anchor not time-stamped: %s", why)
        return None
    return token


def _store_all(rt: AnchorContext, host: str, chain: str, seq: int, raw: bytes,
               token: bytes | None, failures: dict[str, str]) -> list[str]:
    where = ["tsa"] if token is not None else []
    files = [("json", raw)] + ([("tsr", token)] if token is not None else [])
    state_dir = rt.config.daemon.state_dir
    try:
        try:
            held = statefs.read_bytes(state_dir, _state_name(seq, "json"))
        except FileNotFoundError:
            held = None
        if held is not None and held != raw:
            # An anchor of an earlier chain at the same seq: evidence, never replaced
            # (this one is kept in the regions and the witness).
            raise OSError(f"{_state_name(seq, 'json')} holds an anchor of another chain")
        for suffix, data in files:
            statefs.write_atomic(state_dir, _state_name(seq, suffix), data)
        where.append("state")
    except OSError as exc:
        failures["state"] = str(exc)
    folder = layout.audit_anchor_folder(host, chain)
    lock_until = rt.config.retention.lock_until(rt.clock())
    stores = list(rt.stores)
    witness = rt.config.audit.witness
    try:
        if witness is not None:
            stores.append(open_store(witness))
    except Exception as exc:  # a witness that cannot even be opened is one failure
        failures["witness"] = str(exc) or exc.__class__.__name__
    for store in stores:
        try:
            for suffix, data in files:
                store.put_bytes(layout.audit_anchor_name(folder, seq, suffix), data,
                                retain_until=lock_until)
            where.append(store.name)
        except Exception as exc:  # any failure of one place: see `anchor`
            failures[store.name] = str(exc) or exc.__class__.__name__
            log.warning("audit anchor not written to %s: %s", store.name, failures[store.name])
    return where
