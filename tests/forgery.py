"""What an operator holding every key can write: a chain rebuilt without a record."""

from __future__ import annotations

import json

from drdaemon import audit_chain
from drdaemon.signing import SigningKey


def rechain(lines: list[bytes], signer: bytes | SigningKey, drop: int,
            first_time: str | None = None) -> list[bytes]:
    """The chain without record `drop`, every later record renumbered, re-linked and signed
    again (audit key or signing key) with its original time (record 0's: `first_time`)."""
    out: list[bytes] = []
    prev = audit_chain.GENESIS
    for i, line in enumerate(lines):
        if i == drop:
            continue
        doc = json.loads(line)
        fields = {k: v for k, v in doc.items() if k not in audit_chain.RESERVED}
        at = first_time if (first_time and not out) else doc["time"]
        new = audit_chain.make_line(len(out), at, doc["event"], fields, prev, signer)
        out.append(new)
        prev = audit_chain.line_hash(new)
    return out
