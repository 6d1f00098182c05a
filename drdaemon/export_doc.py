"""What a tenant export says about itself: the files' names, `MANIFEST.json`,
`README.txt` and `SHA256SUMS` (docs/format.md, "Tenant export"), and the records
of what was exported. Pure: functions over plain data (the source kind answers
for its file suffix, header check, customer facts and load instructions).
The export service is export.py; the files on disk, export_files.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import __version__
from .sources import kind_for

FORMAT = "drdaemon.export"
VERSION = 1
MANIFEST_FILE = "MANIFEST.json"
SUMS_FILE = "SHA256SUMS"
# With a recipient: the checksums of the decrypted files, itself encrypted.
CONTENTS_SUMS_FILE = "CONTENTS.SHA256SUMS"
README_FILE = "README.txt"


@dataclass
class ExportedSource:
    """One source's snapshot as written: the plaintext file and what was stored on disk."""

    source: str
    kind: str
    snapshot_id: str
    consistency_time: datetime
    region: str
    file: str  # the plaintext file's name (after `age -d` when encrypted)
    size: int  # plaintext bytes
    sha256: str  # of the plaintext
    stored_as: str  # the file in DIR (`file` + ".age" when encrypted)
    stored_size: int
    stored_sha256: str
    facts: dict[str, Any] = field(default_factory=dict)  # what MANIFEST.json tells
    failed_regions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "consistency_time": self.consistency_time.isoformat()}


@dataclass
class ExportResult:
    tenant: str
    destination: str
    recipient_fingerprint: str | None
    sources: list[ExportedSource]
    files: dict[str, str]  # every file in the destination -> its sha256
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "destination": self.destination,
                "encrypted": self.recipient_fingerprint is not None,
                "recipient_fingerprint": self.recipient_fingerprint,
                "sources": [s.to_dict() for s in self.sources], "files": self.files,
                "bytes": sum(s.size for s in self.sources), "seconds": self.seconds,
                "notes": self.notes}



# -- the pure core --------------------------------------------------------------------------

def file_name(source: str, kind: str) -> str:
    """The plaintext file a source's snapshot becomes: `<source>.dump`, `<source>.tar`, ..."""
    return source + kind_for(kind).export_suffix


def sha256sums(files: Mapping[str, str]) -> str:
    """`sha256sum` text for {name: sha256}, sorted by name (`sha256sum -c` reads it)."""
    return "".join(f"{sha}  {name}\n" for name, sha in sorted(files.items()))


def check_magic(kind: str, head: bytes) -> str | None:
    """Why the first bytes of a plaintext are not the dump `kind` promises (None if they are)."""
    return kind_for(kind).plaintext_problem(head)


def kept_facts(kind: str, facts: Mapping[str, Any]) -> dict[str, Any]:
    """The facts MANIFEST.json tells: row counts for postgres, counts and digest for trees."""
    return kind_for(kind).customer_facts(facts)


def manifest_doc(tenant: str, sources: Sequence[ExportedSource], created: datetime,
                 recipient_fp: str | None, not_included: Sequence[str] = ()) -> dict[str, Any]:
    """The MANIFEST.json of an export (docs/format.md, "Tenant export")."""
    return {
        "format": FORMAT, "version": VERSION, "tenant": tenant,
        "created": created.astimezone(UTC).isoformat(),
        "drdaemon_version": __version__,
        "encrypted_to": recipient_fp,
        "sources": [{
            "source": s.source, "kind": s.kind, "snapshot_id": s.snapshot_id,
            "consistency_time": s.consistency_time.astimezone(UTC).isoformat(),
            "file": s.file, "size": s.size, "sha256": s.sha256,
            "facts": s.facts,
        } for s in sources],
        "not_included": [{"source": n, "why": "a shared source: its snapshots hold other "
                          "tenants' data"} for n in not_included],
    }


def readme_text(tenant: str, sources: Sequence[ExportedSource], encrypted: bool) -> str:
    """README.txt: what the files are and how to load them with stock tools."""
    lines = [f"Return copy of the data of tenant {tenant}, written by drdaemon {__version__}.",
             ""]
    if encrypted:
        lines += [
            "Every file but this one and SHA256SUMS is encrypted with age to your public key.",
            "SHA256SUMS covers the encrypted files as they are here (and this README):",
            "    sha256sum -c SHA256SUMS",
            "Decrypt each file with your identity (private key), then check the plaintext:",
            "    for f in *.age; do age -d -i KEY -o \"${f%.age}\" \"$f\"; done",
            f"    sha256sum -c {CONTENTS_SUMS_FILE}",
            f"{CONTENTS_SUMS_FILE} covers the decrypted files; {MANIFEST_FILE} says which",
            "snapshot each file holds, its consistency time, sizes and row counts.",
        ]
    else:
        lines += [
            "SHA256SUMS covers every other file here; check them with:",
            "    sha256sum -c SHA256SUMS",
            f"{MANIFEST_FILE} says which snapshot each file holds, its consistency time,",
            "sizes and row counts.",
        ]
    lines += ["", "Files:"]
    for s in sources:
        when = s.consistency_time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        lines.append(f"  {s.file}: source {s.source}, snapshot {s.snapshot_id}, "
                     f"consistent at {when}")
        lines += ["    " + line for line in kind_for(s.kind).load_instructions(s.file)]
    return "\n".join(lines) + "\n"

