"""The tamper-evident audit log: a hash chain of signed JSON lines in the state folder.

Auditors must be able to tell that nobody edited, removed or reordered what
drdaemon recorded: someone who can write the file (or a bucket) but does not
hold the audit key cannot rebuild a consistent chain. This module is the log:
`append` (one appender at a time), `read_lines`, `verify` and `show`; its lines
live in the state folder or, with `[daemon] lock_dsn`, in the cluster's shared
state (shared_state.py: one chain for every host of the cluster).
The records and the chain check are audit_chain.py (pure), the secret sweep
applied to every record audit_secrets.py, and the copies in every region with
the daemon's scheduled check of them audit_mirror.py; the layout is in
docs/format.md ("Audit log").
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from . import layout, shared_state, statefs
from .audit_chain import (
    GENESIS,
    HANDOVER,
    RESERVED,
    AuditVerification,
    ChainKeys,
    audit_key,
    handover_fields,
    line_hash,
    make_line,
    parse_records,
    select,
    signer_of,
    split_lines,
    verify_lines,
)
from .audit_secrets import known_secrets, plain_fields
from .config import Config, DaemonConfig
from .errors import DrError
from .keys import ManifestKey
from .signing import SigningKey

log = logging.getLogger(__name__)


LOG = statefs.AUDIT_LOG


class AuditContext(Protocol):
    """What the local audit log needs of a runtime (runtime.Runtime is one)."""

    @property
    def config(self) -> Config: ...
    @property
    def manifest_key(self) -> ManifestKey: ...
    @property
    def signing_key(self) -> SigningKey | None: ...
    @property
    def retired_signing_keys(self) -> tuple[SigningKey, ...]: ...

    def clock(self) -> datetime: ...


def chain_keys(rt: AuditContext) -> ChainKeys:
    """What this runtime checks its chains with: the audit key of every manifest key it
    holds (retired ones verify records from before a rotation), and the public half of
    its signing keys (the current one, and earlier ones kept after it)."""
    signer = rt.signing_key
    signers = (signer, *rt.retired_signing_keys) if signer is not None else ()
    return ChainKeys(hmac=tuple(audit_key(k) for k in rt.manifest_key.verifying_keys),
                     public=tuple(k.public for k in signers))


def log_path(state_dir: Path) -> Path:
    return state_dir / LOG


def log_where(state_dir: Path) -> str:
    """Where the log lives, for messages: its file, or the cluster state holding it."""
    return shared_state.describe(state_dir, LOG)


def _next_position(last: bytes, count: Callable[[], int]) -> tuple[int, str]:
    """seq and prev of the record to append after the log's `last` line (b"": none);
    `count()` is the number of lines, asked only if the last line is damaged."""
    if not last:
        return 0, GENESIS
    try:
        seq = json.loads(last)["seq"]
        if type(seq) is not int:
            raise TypeError(seq)
    except (ValueError, KeyError, TypeError, RecursionError):
        # The last line is damaged: in a sound log seq is the line number.
        seq = count() - 1
    return seq + 1, line_hash(last)


def _signer_in_force(last: bytes) -> str | None:
    """The fingerprint that must sign the record after `last` (None: a MAC)."""
    try:
        doc = json.loads(last) if last else {}
    except (ValueError, RecursionError):
        return None  # a damaged line: `verify` reports it; nothing to track from it
    if not isinstance(doc, dict):
        return None
    if doc.get("event") == HANDOVER and isinstance(doc.get("fingerprint"), str):
        return str(doc["fingerprint"])
    return signer_of(doc)


def append(rt: AuditContext, event: str, fields: Mapping[str, Any]) -> int:
    """Append one record to the local log, signed with the runtime's signing key (else
    MAC'd with the audit key); return its seq.

    The first record a signing key signs follows the HANDOVER record naming it,
    authenticated by the signer before (`_handed_over_by`). A log signed by a
    key neither configured nor kept after it in the key file, or signed while
    no key is configured, is refused (DrError): the verifier would reject the record.

    The store's lock (an exclusive flock; in PostgreSQL, the key's advisory
    transaction lock) covers reading the last line and writing the new one, so the
    daemon and any drctl process, on any host of a cluster, append one after the
    other and never fork the chain; a record is durable before the caller goes on.
    """
    clash = RESERVED & fields.keys()
    if clash:
        raise ValueError(f"event {event!r} uses reserved field names {sorted(clash)}")
    clean = plain_fields(fields, known_secrets(rt.manifest_key))
    if "withheld" in clean:
        log.warning("audit record %s: withheld %s: it looked like a secret", event,
                    ", ".join(clean["withheld"]))
    mac_key, signer = audit_key(rt.manifest_key), rt.signing_key
    appended: list[int] = []

    def make(last: bytes, count: Callable[[], int]) -> bytes:
        seq, prev = _next_position(last, count)
        at = rt.clock().isoformat()
        in_force = _signer_in_force(last)
        if signer is None:
            if in_force is not None:
                raise DrError(f"the audit log is signed by {in_force}, but no signing key is "
                              "configured: set [keys] signing_key_file to that key (a record "
                              f"with only a MAC would be a downgrade); {event} not recorded")
            appended.append(seq)
            return make_line(seq, at, event, clean, prev, mac_key)
        handover = b""
        if in_force != signer.fingerprint:
            handover = make_line(seq, at, HANDOVER, handover_fields(signer.public), prev,
                                 _handed_over_by(rt, signer, in_force, mac_key if last else None))
            seq, prev = seq + 1, line_hash(handover)
        appended.append(seq)
        return handover + make_line(seq, at, event, clean, prev, signer)

    _store(rt).append(LOG, make)
    return appended[-1]


def _handed_over_by(rt: AuditContext, signer: SigningKey, in_force: str | None,
                    mac_key: bytes | None) -> bytes | SigningKey:
    """Who authenticates the handover to `signer`: the signer in force (the audit key,
    `mac_key`, after MAC'd records; an earlier signing key kept in the key file after
    the current one), or the new key itself opening a new log (`mac_key` None)."""
    if in_force is None:
        return mac_key if mac_key is not None else signer
    previous = next((k for k in rt.retired_signing_keys if k.fingerprint == in_force), None)
    if previous is None:
        raise _cannot_hand_over(in_force, signer)
    return previous


def _cannot_hand_over(in_force: str, signer: SigningKey) -> DrError:
    return DrError(f"the audit log is signed by {in_force}, not by the configured signing "
                   f"key {signer.fingerprint}: only {in_force} can hand the log over; keep "
                   "it in [keys] signing_key_file after the new key (docs/format.md, "
                   "\"Signed records and the crossover\")")


def read_lines(state_dir: Path) -> list[bytes]:
    """The log's lines (none if there is no log yet): the state folder's, or with
    `[daemon] lock_dsn` the cluster's one chain (shared_state.py)."""
    return split_lines(shared_state.at(state_dir).read_log(LOG))


def _store(rt: AuditContext) -> shared_state.StateStore:
    return shared_state.at(rt.config.daemon.state_dir)


def chain_label(daemon: DaemonConfig) -> str:
    """Who the log's chain belongs to, as the mirror's and the anchors' folder names it
    (`audit/<label>/<chain>/`): the host name, or with `[daemon] lock_dsn` the cluster's
    (`cluster-<lock_name>`), whichever host of it writes (docs/format.md)."""
    if daemon.lock_dsn is not None:
        return layout.host_label(f"cluster-{daemon.lock_name}")
    return layout.host_label(socket.gethostname())


def verify(rt: AuditContext) -> AuditVerification:
    """Verify the local audit log of this runtime's state folder."""
    return verify_lines(read_lines(rt.config.daemon.state_dir), chain_keys(rt))


def show(rt: AuditContext, since: timedelta | None = None,
         prefix: str | None = None) -> tuple[list[dict[str, Any]], AuditVerification]:
    """The local log's records (newer than `since`, events starting with `prefix`), and
    whether the log verifies, from one read."""
    lines = read_lines(rt.config.daemon.state_dir)
    check = verify_lines(lines, chain_keys(rt))
    cutoff = rt.clock() - since if since is not None else None
    return select(parse_records(lines), cutoff, prefix), check
