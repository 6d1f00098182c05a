"""The facts object: a snapshot's facts too large for its manifest, stored beside it.

A PostgreSQL manifest used to list every table's row count inline, ~100
bytes a table: past ~10,000 tables it outgrew the 1 MiB every reader accepts
(docs/format.md). Since manifest version 2 the per-table counts go to
``sources/<source>/facts/<id>.json.zst`` (zstd-compressed canonical JSON),
whose sha256 and sizes the HMAC-authenticated manifest records, and the
manifest keeps small summaries (`table_count`, `row_total`). Only drills and
`drctl snapshots show` read the object.

Pure core: :func:`split`, :func:`encode`, :func:`decode`, :func:`check_storable`.
Shell: :func:`fetch`, :func:`full_facts`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import zstandard

from . import layout, manifest
from .errors import IntegrityError, SourceError
from .manifest import FactsRef, Manifest
from .sources import is_kind, kind_for
from .storage import ObjectStore

FORMAT = "drdaemon.facts"
VERSION = 1
# Bounds every reader enforces and the writer refuses to exceed (docs/format.md):
# 100,000 tables take about 8 MiB of JSON and well under 1 MiB compressed.
MAX_FACTS_BYTES = 64 << 20  # stored (compressed)
MAX_FACTS_PLAINTEXT = 256 << 20  # its JSON
ZSTD_LEVEL = 9


class FactsTooLarge(SourceError):
    """The snapshot's facts cannot be stored within the bounds readers enforce."""


@dataclass(frozen=True)
class Encoded:
    """A facts object ready to store, and the reference its manifest carries."""

    blob: bytes
    ref: FactsRef


def split(kind: str, facts: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(inline facts for the manifest, facts for the facts object or None). Pure.

    The kind names the facts that leave the manifest (`detached_facts`) and what
    stays in their place (postgres: `tables` leaves, `table_count` and
    `row_total` stay; the shrink guard and status compare those).
    """
    source_kind = kind_for(kind) if is_kind(kind) else None
    keys = [k for k in source_kind.detached_facts if k in facts] if source_kind else []
    if source_kind is None or not keys:
        return dict(facts), None
    detached = {k: facts[k] for k in keys}
    inline = {k: v for k, v in facts.items() if k not in keys}
    inline.update(source_kind.detached_summary(detached))
    return inline, detached


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def encode(source: str, snapshot_id: str, detached: dict[str, Any]) -> Encoded:
    """The facts object of snapshot `snapshot_id`; FactsTooLarge past the readers' bounds."""
    plain = _canonical({"format": FORMAT, "version": VERSION, "source": source,
                        "id": snapshot_id, "facts": detached})
    if len(plain) > MAX_FACTS_PLAINTEXT:
        raise FactsTooLarge(f"the snapshot's facts are {len(plain)} bytes of JSON; readers "
                            f"accept at most {MAX_FACTS_PLAINTEXT} (docs/format.md)")
    blob = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True,
                                    write_checksum=True).compress(plain)
    if len(blob) > MAX_FACTS_BYTES:
        raise FactsTooLarge(f"the snapshot's facts compress to {len(blob)} bytes; readers "
                            f"accept at most {MAX_FACTS_BYTES} (docs/format.md)")
    ref = FactsRef(layout.facts_object_name(source, snapshot_id),
                   hashlib.sha256(blob).hexdigest(), len(blob), len(plain))
    return Encoded(blob, ref)


def check_storable(blob: bytes) -> None:
    """Refuse, before anything is committed, a manifest that no reader would accept."""
    if len(blob) > manifest.MAX_MANIFEST_BYTES:
        raise FactsTooLarge(f"the manifest would be {len(blob)} bytes; readers accept at most "
                            f"{manifest.MAX_MANIFEST_BYTES} (docs/format.md): its facts cannot "
                            "be stored")


def decode(raw: bytes, m: Manifest) -> dict[str, Any]:
    """The detached facts of `m` from its untrusted facts object; IntegrityError if not its own."""
    ref = m.facts_object
    assert ref is not None
    what = f"facts object of snapshot {m.id}"
    if ref.name != layout.facts_object_name(m.source, m.id):
        raise IntegrityError(f"manifest names facts object {ref.name!r}, expected "
                             f"{layout.facts_object_name(m.source, m.id)!r}")
    if len(raw) != ref.size or hashlib.sha256(raw).hexdigest() != ref.sha256:
        raise IntegrityError(f"{what} does not match its manifest (size or sha256)")
    plain = _decompress(raw, min(ref.plaintext_size, MAX_FACTS_PLAINTEXT), what)
    if len(plain) > ref.plaintext_size:
        raise IntegrityError(f"{what} decompresses to more than the {ref.plaintext_size} "
                             f"bytes its manifest says (readers stop at {MAX_FACTS_PLAINTEXT})")
    if len(plain) < ref.plaintext_size:
        raise IntegrityError(f"{what} decompressed to {len(plain)} bytes, its manifest says "
                             f"{ref.plaintext_size}")
    try:
        doc = json.loads(plain)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise IntegrityError(f"{what} is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise IntegrityError(f"{what} is not a version {VERSION} drdaemon facts object")
    if doc.get("source") != m.source or doc.get("id") != m.id:
        raise IntegrityError(f"{what} belongs to another snapshot")
    detached = doc.get("facts")
    if not isinstance(detached, dict):
        raise IntegrityError(f"{what} holds no facts")
    return detached


def _decompress(raw: bytes, limit: int, what: str) -> bytes:
    """Decompress at most `limit` + 1 bytes, whatever the frame header claims."""
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(raw) as reader:
            while len(out) <= limit:
                chunk = reader.read(min(1 << 20, limit + 1 - len(out)))
                if not chunk:
                    break
                out += chunk
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{what} cannot be decompressed: {exc}") from None
    return bytes(out)


def fetch(store: ObjectStore, m: Manifest) -> dict[str, Any]:
    """Read and check one region's facts object of `m` ({} if it has none).

    Raises NotFound, StorageError or IntegrityError.
    """
    if m.facts_object is None:
        return {}
    return decode(store.get_bytes(m.facts_object.name, MAX_FACTS_BYTES), m)


def full_facts(store: ObjectStore, m: Manifest) -> dict[str, Any]:
    """Every fact of `m`, version 1 (all inline) or 2 (inline and the facts object)."""
    return {**m.facts, **fetch(store, m)}
