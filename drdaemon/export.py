"""The tenant export service: the return copy of a tenant's data (drctl tenant export).

For each of the tenant's sources one snapshot (default: the newest complete
one) is streamed from a region through `restore.stream_into`, the one place
snapshot data is decrypted and checked (data object sha256 and size, age
authentication, zstd bounded by the manifest's plaintext size), into a file:
the `pg_dump` custom archive or the tar exactly as it was dumped, or that
file age-encrypted to the customer's recipient on its way to disk. Beside them
go `MANIFEST.json` (what each file holds: snapshot, consistency time, sizes,
row counts), `SHA256SUMS` and `README.txt`; the layout is in docs/format.md
("Tenant export").

Everything is written into a private staging folder next to the destination,
read back and hashed again, and only then renamed into place: a failure
leaves nothing behind. With a recipient no plaintext of the tenant's data
touches the disk: the small files are encrypted in memory, the data files
through a pipe. Memory stays flat whatever the snapshot's size.

Pure core: `file_name`, `sha256sums`, `manifest_doc`, `readme_text`,
`check_magic`. Shell: `export`.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import io
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, cast

import pyrage
from pyrage import x25519

from . import __version__, catalog, layout, tenancy, tenant_keys
from . import facts as facts_object
from .catalog import SnapshotEntry
from .config import SourceConfig
from .erasure_records import refuse_if_erased
from .errors import DrError, UsageError
from .keys import fingerprint
from .manifest import Manifest
from .restore import TargetError, stream_into
from .runtime import Runtime
from .sources import kind_for
from .storage import NotFound, ObjectStore
from .streams import ThreadPipe

Progress = Callable[[int, int], None]  # (bytes just read, total bytes of the whole export)

FORMAT = "drdaemon.export"
VERSION = 1
MANIFEST_FILE = "MANIFEST.json"
SUMS_FILE = "SHA256SUMS"
# With a recipient: the checksums of the decrypted files, itself encrypted.
CONTENTS_SUMS_FILE = "CONTENTS.SHA256SUMS"
README_FILE = "README.txt"
_READ = 1 << 20


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


# -- pure core --------------------------------------------------------------------------

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


# -- checked files --------------------------------------------------------------------

class _Hashing(io.RawIOBase):
    """Writes through to `inner`, counting and hashing, keeping the first 512 bytes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.sha = hashlib.sha256()
        self.count = 0
        self.head = b""

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        if len(self.head) < 512:
            self.head += chunk[:512 - len(self.head)]
        self.inner.write(chunk)
        self.sha.update(chunk)
        self.count += len(chunk)
        return len(chunk)


class FileSink:
    """A restore.Sink that writes one export file (0600): the plaintext, or age of it.

    With a recipient, the plaintext goes through a pipe to age's encryptor in a
    thread and only ciphertext reaches the file.
    """

    def __init__(self, path: Path, recipient: x25519.Recipient | None) -> None:
        self.path = path
        self.notes: list[str] = []
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file = os.fdopen(fd, "wb", buffering=_READ)
        self.stored = _Hashing(self._file)
        self._pipe: ThreadPipe | None = None
        if recipient is None:
            self.plain = _Hashing(self.stored)
        else:
            stored = self.stored
            self._pipe = ThreadPipe(lambda r: pyrage.encrypt_io(r, stored, [recipient]),
                                    thread_writes=False, name="export-age")
            self.plain = _Hashing(self._pipe.theirs)
        self.writer = cast(BinaryIO, self.plain)

    def complete(self) -> None:
        """End the stream; raise if the encryptor or the disk failed."""
        if self._pipe is not None:
            self._pipe.join()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def commit(self) -> str:
        return str(self.path)

    def discard(self) -> None:
        if self._pipe is not None:
            with contextlib.suppress(Exception):
                self._pipe.join()
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _hash_file(path: Path) -> tuple[str, int]:
    """(sha256, size) of a file as it is on disk."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_READ), b""):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def _write_small(path: Path, data: bytes, recipient: x25519.Recipient | None) -> str:
    """Write a small file (age-encrypted in memory when there is a recipient); its sha256."""
    stored = data if recipient is None else pyrage.encrypt(data, [recipient])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(stored)
        fh.flush()
        os.fsync(fh.fileno())
    return hashlib.sha256(stored).hexdigest()


# -- choosing snapshots -----------------------------------------------------------------

def _owner_of(rt: Runtime, snapshot_id: str, others: Sequence[SourceConfig]) -> str | None:
    """The source among `others` that lists `snapshot_id` in some region (names only)."""
    for store in rt.stores:
        for src in others:
            try:
                names = store.list(layout.manifests_prefix(src.name))
                if any(layout.snapshot_id_from_manifest_name(i.name) == snapshot_id
                       for i in names):
                    return src.name
            except DrError:
                continue
    return None


def choose(rt: Runtime, tenant: str, sources: Sequence[SourceConfig],
           snapshot_ids: Sequence[str]) -> list[tuple[SourceConfig, SnapshotEntry]]:
    """The snapshot to export of each of `sources`: the one named in `snapshot_ids`, else
    the newest complete one. UsageError for an id none of them holds."""
    for sid in snapshot_ids:
        if not layout.is_snapshot_id(sid):
            raise UsageError(f"invalid snapshot id {sid!r}: expected an id like "
                             "20261123T020000Z-1a2b3c4d")
    listings = {s.name: catalog.list_snapshots(rt, s.name) for s in sources}
    picked: dict[str, SnapshotEntry] = {}
    for sid in snapshot_ids:
        hits = [e for s in sources for e in listings[s.name].snapshots if e.id == sid]
        if not hits:
            others = [s for s in rt.config.sources if s.tenant != tenant]
            owner = _owner_of(rt, sid, others)
            if owner is not None:
                raise UsageError(f"snapshot {sid} belongs to source {owner} of tenant "
                                 f"{rt.config.source(owner).tenant}, not to tenant {tenant}")
            raise UsageError(f"no snapshot {sid} of tenant {tenant}'s sources "
                             f"({', '.join(s.name for s in sources)}) in any region")
        entry = hits[0]
        if entry.source in picked:
            raise UsageError(f"--snapshot names two snapshots of source {entry.source} "
                             f"({picked[entry.source].id}, {sid}): give one per source")
        if entry.manifest is None:
            raise DrError(f"snapshot {sid} of source {entry.source} cannot be read in any "
                          f"region ({entry.why_unreadable()})")
        picked[entry.source] = entry
    chosen = []
    for src in sources:
        listing = listings[src.name]
        entry = picked.get(src.name) or _latest(tenant, src.name, listing)
        entry.unreachable.update(listing.region_errors)
        chosen.append((src, entry))
    return chosen


def _latest(tenant: str, source: str, listing: catalog.Listing) -> SnapshotEntry:
    """The newest complete snapshot of `source` (never silently an older one)."""
    found = catalog.choose_latest(listing.snapshots, allow_older=False)
    if found is None:
        errors = "".join(f"; region {k} unreadable: {v}" for k, v in
                         listing.region_errors.items())
        raise DrError(f"source {source} of tenant {tenant} has no snapshot in any "
                      f"region{errors}: nothing to export for it")
    return found.entry


# -- the shell ------------------------------------------------------------------------

def check_destination(dest: Path) -> None:
    """Refuse a destination that exists and is not an empty folder (no entries at all)."""
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise UsageError(f"export destination {dest} exists and is not an empty folder; "
                         "choose a new or empty folder")
    if not dest.parent.is_dir():
        raise UsageError(f"export destination {dest}: folder {dest.parent} does not exist")


def parse_recipient(text: str) -> x25519.Recipient:
    """The customer's age X25519 recipient; UsageError naming what is wrong."""
    try:
        return x25519.Recipient.from_str(text.strip())
    except Exception:
        raise UsageError(f"--recipient {text[:16]!r}... is not an age X25519 public key "
                         "(age1...)") from None


def _full_facts(store: ObjectStore, m: Manifest) -> dict[str, Any]:
    try:
        return facts_object.full_facts(store, m)
    except NotFound:
        raise DrError(f"facts object of snapshot {m.id} is missing in region "
                      f"{store.name}") from None


def _export_one(rt: Runtime, identities: Sequence[x25519.Identity], source: SourceConfig,
                entry: SnapshotEntry, staging: Path, recipient: x25519.Recipient | None,
                progress: Callable[[int, int], None] | None) -> ExportedSource:
    """Stream one snapshot into `staging`, trying each region that holds it in turn."""
    failed: dict[str, str] = {}
    name = file_name(source.name, source.kind)
    stored_as = name + (".age" if recipient is not None else "")
    for store in rt.stores:
        if store.name not in entry.regions:
            failed[store.name] = entry.problems.get(store.name) or (
                f"unreachable: {entry.unreachable[store.name]}"
                if store.name in entry.unreachable else "does not hold this snapshot")
            continue
        try:
            m = catalog.read_manifest(rt, store, source.name, entry.id)
            facts = _full_facts(store, m)
        except DrError as exc:
            failed[store.name] = str(exc)
            continue
        if m.kind != source.kind:
            raise DrError(f"snapshot {m.id} is a {m.kind} snapshot, source {source.name} "
                          f"is {source.kind}")
        sink = FileSink(staging / stored_as, recipient)
        try:
            opening = tenant_keys.snapshot_identities(rt, m, identities)  # a tenant key
            stream_into(store, m, opening, sink, progress, rt.recipient_labels())
            problem = check_magic(m.kind, sink.plain.head)
            if problem:
                raise DrError(f"snapshot {m.id} in region {store.name} {problem}")
        except BaseException as exc:  # nothing half-written stays, whatever happened
            sink.discard()
            if isinstance(exc, TargetError):  # the copy was authentic: the destination failed
                raise DrError(f"writing {stored_as} to the export folder failed: "
                              f"{exc}") from None
            if isinstance(exc, UsageError) or not isinstance(exc, DrError | OSError):
                raise
            failed[store.name] = str(exc) or exc.__class__.__name__
            continue
        return ExportedSource(
            source.name, m.kind, m.id, m.consistency_time, store.name, name,
            sink.plain.count, sink.plain.sha.hexdigest(), stored_as, sink.stored.count,
            sink.stored.sha.hexdigest(), kept_facts(m.kind, facts),
            {k: v for k, v in failed.items() if k in entry.regions})
    reasons = "; ".join(f"{k}: {v}" for k, v in failed.items())
    raise DrError(f"export of snapshot {entry.id} of source {source.name} failed in every "
                  f"region: {reasons}")


def verify_written(staging: Path, expected: Mapping[str, str]) -> None:
    """Read every written file back and compare its sha256 with what was written."""
    present = sorted(p.name for p in staging.iterdir())
    if present != sorted(expected):
        raise DrError(f"the export folder holds {present}, expected {sorted(expected)}")
    for name, sha in expected.items():
        got, _ = _hash_file(staging / name)
        if got != sha:
            raise DrError(f"{name} read back does not match what was written (sha256 "
                          f"{got[:16]}..., wrote {sha[:16]}...): the disk lost data")


def _write_side_files(staging: Path, tenant: str, exported: Sequence[ExportedSource],
                      recipient: x25519.Recipient | None, recipient_fp: str | None,
                      now: datetime, not_included: Sequence[str] = ()) -> dict[str, str]:
    """MANIFEST.json, README.txt, SHA256SUMS (and CONTENTS.SHA256SUMS); every file's sha256."""
    enc = ".age" if recipient is not None else ""
    doc = manifest_doc(tenant, exported, now, recipient_fp, not_included)
    body = json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False).encode() + b"\n"
    stored = {s.stored_as: s.stored_sha256 for s in exported}
    plain = {s.file: s.sha256 for s in exported}
    plain[MANIFEST_FILE] = hashlib.sha256(body).hexdigest()
    stored[MANIFEST_FILE + enc] = _write_small(staging / (MANIFEST_FILE + enc), body, recipient)
    if recipient is not None:
        stored[CONTENTS_SUMS_FILE + enc] = _write_small(
            staging / (CONTENTS_SUMS_FILE + enc), sha256sums(plain).encode(), recipient)
    readme = readme_text(tenant, exported, recipient is not None).encode()
    stored[README_FILE] = _write_small(staging / README_FILE, readme, None)
    stored[SUMS_FILE] = _write_small(staging / SUMS_FILE, sha256sums(stored).encode(), None)
    return stored


def _staging_for(dest: Path) -> Path:
    staging = dest.parent / f".{dest.name}.drdaemon-export-{secrets.token_hex(4)}.partial"
    staging.mkdir(mode=0o700)
    return staging


def _move_into_place(staging: Path, dest: Path) -> None:
    """Rename the verified staging folder to `dest` (rename(2) replaces an empty folder)."""
    try:
        os.rename(staging, dest)
    except OSError as exc:
        raise DrError(f"cannot move the export into {dest}: {exc.strerror or exc} (is it "
                      "still an empty folder?)") from None
    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export(rt: Runtime, identities: Sequence[x25519.Identity], tenant: str, dest: Path, *,
           recipient: str | None = None, snapshot_ids: Sequence[str] = (),
           without_shared: bool = False,
           on_progress: Progress | None = None) -> ExportResult:
    """Write the return copy of `tenant`'s data to the new or empty folder `dest`.

    `recipient`: the customer's age public key; every file holding the tenant's
    data is encrypted to it and no plaintext reaches the disk. `snapshot_ids`:
    the snapshot to export for their sources (at most one per source); the
    tenant's other sources give their newest complete snapshot. A shared source
    (several tenants' data) is refused, or left out with `without_shared`. Raises
    UsageError (unknown tenant, an id of another tenant, a bad destination or
    recipient) or DrError (no region could supply a verified copy, the disk
    failed); either way nothing is left at `dest`. Audit-logged either way.
    """
    started = time.monotonic()
    refuse_if_erased(rt, tenant)  # the keys are gone: say so, whatever identity was given
    sources = tenancy.sources_of(rt.config, tenant)
    if not sources:
        known = sorted({s.tenant for s in rt.config.sources})
        raise UsageError(f"no tenant {tenant!r} in {rt.config.path} (tenants: "
                         f"{', '.join(known) or 'none'})")
    # A shared source's snapshot holds other tenants' data too: it is never handed to
    # one customer, and the copy is only incomplete when the operator says so.
    shared = [s.name for s in sources if tenancy.is_shared(s)]
    if shared and not without_shared:
        raise UsageError(f"tenant {tenant}'s data is also in shared source(s) "
                         f"{', '.join(shared)}, whose snapshots hold other tenants' data and "
                         "are never exported; --without-shared exports the rest and lists "
                         "them as not included")
    sources = [s for s in sources if not tenancy.is_shared(s)]
    if not sources:
        raise UsageError(f"tenant {tenant} has no source of its own, only shared ones "
                         f"({', '.join(shared)}): there is nothing to export")
    customer = parse_recipient(recipient) if recipient is not None else None
    recipient_fp = fingerprint(str(customer)) if customer is not None else None
    dest = dest.absolute()
    check_destination(dest)
    chosen = choose(rt, tenant, sources, snapshot_ids)
    total = sum(e.manifest.size for _, e in chosen if e.manifest is not None)
    progress = (lambda n, _t: on_progress(n, total)) if on_progress else None
    who = {"tenant": tenant, "destination": str(dest), "recipient_fingerprint": recipient_fp,
           "sources": [s.name for s, _ in chosen],
           "snapshot_ids": [e.id for _, e in chosen],
           "user": getpass.getuser(), "host": socket.gethostname()}
    staging = _staging_for(dest)
    try:
        exported = [_export_one(rt, identities, src, entry, staging, customer, progress)
                    for src, entry in chosen]
        files = _write_side_files(staging, tenant, exported, customer, recipient_fp,
                                  rt.clock(), shared)
        verify_written(staging, files)
        _move_into_place(staging, dest)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, Exception):
            rt.record_event("tenant.export.failed", **who, error=str(exc))
        raise
    result = ExportResult(tenant, str(dest), recipient_fp, exported, files,
                          time.monotonic() - started)
    for s in exported:
        for region, why in s.failed_regions.items():
            result.notes.append(f"{s.source}: region {region} skipped: {why}")
    result.notes += [f"{n}: NOT INCLUDED: a shared source (its snapshots hold other tenants' "
                     "data)" for n in shared]
    rt.record_event("tenant.export", **who, files=files, not_included=shared,
                    regions={s.source: s.region for s in exported},
                    bytes=sum(s.size for s in exported))
    return result

