"""The tamper-evident audit log: a hash chain of HMAC-signed JSON lines in the state folder.

Auditors must be able to tell that nobody edited, removed or reordered what
drdaemon recorded: someone who can write the file (or a bucket) but does not
hold the audit key cannot rebuild a consistent chain. This module is the local
log: `append` (under an exclusive flock), `read_lines`, `verify` and `show`.
The records and the chain check are audit_chain.py (pure), the secret sweep
applied to every record audit_secrets.py, and the copies in every region with
the daemon's scheduled check of them audit_mirror.py; the layout is in
docs/format.md ("Audit log").
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from . import statefs
from .audit_chain import (
    GENESIS,
    RESERVED,
    AuditVerification,
    audit_key,
    line_hash,
    make_line,
    parse_records,
    select,
    split_lines,
    verify_lines,
)
from .audit_secrets import known_secrets, plain_fields
from .config import Config
from .keys import ManifestKey

log = logging.getLogger(__name__)


LOG = statefs.AUDIT_LOG


class AuditContext(Protocol):
    """What the local audit log needs of a runtime (runtime.Runtime is one)."""

    @property
    def config(self) -> Config: ...
    @property
    def manifest_key(self) -> ManifestKey: ...

    def clock(self) -> datetime: ...


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
