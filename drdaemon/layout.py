"""The storage layout: every object name drdaemon writes in a region, and how to read one back.

Pure functions only; this module is the code behind docs/format.md, "Regions
and names". Every name is relative to the region's prefix and the same in
every region::

    sources/<source>/data/<id>.<pgdump|tar>.zst.age   data object
    sources/<source>/facts/<id>.json.zst              facts object (manifest version 2)
    sources/<source>/manifests/<id>.json              manifest: its presence commits
    sources/<source>/trash/<id>.<when>.json           manifest of a pruned snapshot
    audit/<host>/<chain>/<first>-<last seq>.jsonl     audit log mirror (audit_mirror.py;
                                                      before: <first seq>.jsonl)
    audit/anchors/<host>/<chain>/<seq>.json|.tsr      an anchored head (anchors.py)
    tenants/<tenant>/keys/<key_id>.age|.json          a tenant's wrapped key (never locked)
    tenants/<tenant>/erasure/<stamp>.json             an erasure certificate (erasure.py)

Prune deletes only objects whose names match these patterns exactly, so the
patterns live here once and nowhere else.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from .sources import kind_for, kinds

# A snapshot id: the UTC second it started, then 32 random bits (time-sortable).
STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
STAMP_PATTERN = r"\d{8}T\d{6}Z"
ID_PATTERN = rf"{STAMP_PATTERN}-[0-9a-f]{{8}}"
ID_RE = re.compile(rf"^{ID_PATTERN}\Z")



class _DumpFormats(Mapping[str, str]):
    """Snapshot kind -> the dump format in its data object's name, for every kind
    registered (sources.kind_for: postgres -> pgdump, directory -> tar)."""

    def __getitem__(self, kind: str) -> str:
        return kind_for(kind).dump_format

    def __iter__(self) -> Iterator[str]:
        return iter([k.name for k in kinds()])

    def __len__(self) -> int:
        return len(kinds())


KINDS: Mapping[str, str] = _DumpFormats()

# The folders under a source's prefix: what each object there is.
DATA, FACTS, MANIFESTS, TRASH = "data", "facts", "manifests", "trash"
ROLES = (DATA, FACTS, MANIFESTS, TRASH)

SOURCES = "sources"
AUDIT_MIRROR = "audit"

_OBJECT_RE = re.compile(rf"^{SOURCES}/([^/]+)/({'|'.join(ROLES)})/([^/]+)\Z")
_BASENAME_RE = {
    # The format must also be a registered kind's (parse_object_name).
    DATA: re.compile(rf"^({ID_PATTERN})\.([a-z0-9]+)\.zst\.age\Z"),
    FACTS: re.compile(rf"^({ID_PATTERN})\.json\.zst\Z"),
    MANIFESTS: re.compile(rf"^({ID_PATTERN})\.json\Z"),
    TRASH: re.compile(rf"^({ID_PATTERN})\.({STAMP_PATTERN})\.json\Z"),
}
_REF_RE = re.compile(rf"^({ID_PATTERN})\.")


# -- snapshot ids --------------------------------------------------------------

def new_snapshot_id(at: datetime) -> str:
    """A time-sortable id: UTC second of `at`, then 32 random bits."""
    return stamp(at) + "-" + secrets.token_hex(4)


def id_time(snapshot_id: str) -> datetime:
    """The creation second encoded in a snapshot id (ValueError if it is no time)."""
    return parse_stamp(snapshot_id[:16])


def is_snapshot_id(text: str) -> bool:
    """Whether `text` has the form of a snapshot id (the pattern; not that its date exists)."""
    return ID_RE.match(text) is not None


def stamp(at: datetime) -> str:
    """A UTC second as it appears in names: YYYYmmddTHHMMSSZ."""
    return at.astimezone(UTC).strftime(STAMP_FORMAT)


def parse_stamp(text: str) -> datetime:
    """The aware UTC datetime of a name's stamp (ValueError if it is none)."""
    return datetime.strptime(text, STAMP_FORMAT).replace(tzinfo=UTC)


# -- names ---------------------------------------------------------------------

def source_prefix(source: str) -> str:
    """Object-name prefix under which one source's snapshots live."""
    return f"{SOURCES}/{source}/"


def data_object_name(source: str, snapshot_id: str, kind: str) -> str:
    """Name of the data object: a plain age file of a zstd stream of a dump or tar."""
    return f"{source_prefix(source)}{DATA}/{snapshot_id}.{KINDS[kind]}.zst.age"


def facts_object_name(source: str, snapshot_id: str) -> str:
    """Name of the facts object: zstd-compressed JSON of the facts kept out of the manifest."""
    return f"{source_prefix(source)}{FACTS}/{snapshot_id}.json.zst"


def manifests_prefix(source: str) -> str:
    """Prefix to list to find a source's committed snapshots."""
    return f"{source_prefix(source)}{MANIFESTS}/"


def manifest_object_name(source: str, snapshot_id: str) -> str:
    """Name of the manifest object, written last: its presence commits the snapshot."""
    return f"{manifests_prefix(source)}{snapshot_id}.json"


def trash_prefix(source: str) -> str:
    """Prefix to list to find a source's pruned (trashed) manifests."""
    return f"{source_prefix(source)}{TRASH}/"


def trash_name(source: str, snapshot_id: str, at: datetime) -> str:
    """Where a pruned manifest waits; the deletion time is in the name."""
    return f"{trash_prefix(source)}{snapshot_id}.{stamp(at)}.json"


# -- parsing names back ----------------------------------------------------------

@dataclass(frozen=True)
class SnapshotObject:
    """What an object name under ``sources/`` stands for."""

    source: str
    snapshot_id: str
    role: str  # DATA, FACTS, MANIFESTS or TRASH: the folder it is in
    kind: str | None = None  # DATA: the snapshot kind its name says (postgres, directory)
    trashed_at: datetime | None = None  # TRASH: the deletion time in its name


def parse_object_name(name: str) -> SnapshotObject | None:
    """The snapshot object `name` stands for, or None for anything not named exactly
    as drdaemon names it (never deleted as one of ours)."""
    m = _OBJECT_RE.match(name)
    if m is None:
        return None
    source, role, base = m.groups()
    parts = _BASENAME_RE[role].match(base)
    if parts is None:
        return None
    snap_id = parts.group(1)
    if role == DATA:
        kind = {k.dump_format: k.name for k in kinds()}.get(parts.group(2))
        if kind is None:
            return None
        return SnapshotObject(source, snap_id, role, kind=kind)
    if role == TRASH:
        try:
            at = parse_stamp(parts.group(2))
        except ValueError:  # 20261399T999999Z matches the pattern, is no time
            return None
        return SnapshotObject(source, snap_id, role, trashed_at=at)
    return SnapshotObject(source, snap_id, role)


def snapshot_id_from_manifest_name(name: str) -> str | None:
    """The snapshot id of a listed manifest object (by its last part), or None for a
    stray object."""
    m = _BASENAME_RE[MANIFESTS].match(name.rsplit("/", 1)[-1])
    return m.group(1) if m else None


def parse_trash_name(name: str) -> tuple[str, datetime] | None:
    """(snapshot id, deletion time) of a listed trash object (by its last part), or
    None for a stray object."""
    m = _BASENAME_RE[TRASH].match(name.rsplit("/", 1)[-1])
    if m is None:
        return None
    try:
        return m.group(1), parse_stamp(m.group(2))
    except ValueError:
        return None


def referenced_id(source: str, name: str) -> str | None:
    """The id an object anywhere under the source's ``manifests/`` or ``trash/`` is
    named after (its last part begins with ``<id>.``), valid manifest or not.

    Loose on purpose: such an id's data is never an orphan, and being wrong here
    only costs storage.
    """
    base = source_prefix(source)
    if not name.startswith(base) or name[len(base):].split("/", 1)[0] not in (MANIFESTS,
                                                                             TRASH):
        return None
    m = _REF_RE.match(name.rsplit("/", 1)[-1])
    return m.group(1) if m else None


# -- the audit log's mirror (audit_mirror.py) ----------------------------------------

def host_label(name: str) -> str:
    """A host name as one safe object-name part."""
    label = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip(".-")[:63]
    return label or "host"


def audit_mirror_folder(host: str, chain: str) -> str:
    """Where one host's chain is mirrored; `chain` names the chain (audit_chain.mirror_folder)."""
    return f"{AUDIT_MIRROR}/{host_label(host)}/{chain}"


def audit_segment_name(folder: str, first: int) -> str:
    """The older layout's segment (up to 100 records, grown in place) that begins with
    record `first`: still read, no longer written."""
    return f"{folder}/{first:012d}.jsonl"


def audit_span_name(folder: str, first: int, last: int) -> str:
    """The segment holding records `first` to `last` (inclusive), written once."""
    return f"{folder}/{first:012d}-{last:012d}.jsonl"


_AUDIT_SEGMENT_RE = re.compile(r"^([a-z0-9._-]+)/([0-9a-f]{16})/(\d{12})(?:-(\d{12}))?\.jsonl\Z")


@dataclass(frozen=True)
class AuditSegmentName:
    """A mirrored segment's name, read back: whose chain, which records.

    `last` is None for the older layout, whose name gives only the first record.
    """

    host: str
    chain: str
    first: int
    last: int | None

    @property
    def folder(self) -> str:
        return f"{AUDIT_MIRROR}/{self.host}/{self.chain}"


def parse_audit_segment(name: str) -> AuditSegmentName | None:
    """`name` (relative to the region's prefix) as a mirrored segment; None if it is not one
    (anchors under audit/anchors/ are not: they are one folder deeper)."""
    if not name.startswith(AUDIT_MIRROR + "/"):
        return None
    m = _AUDIT_SEGMENT_RE.match(name[len(AUDIT_MIRROR) + 1:])
    if m is None:
        return None
    first = int(m.group(3))
    last = int(m.group(4)) if m.group(4) is not None else None
    if last is not None and last < first:
        return None
    return AuditSegmentName(m.group(1), m.group(2), first, last)


AUDIT_ANCHORS = "anchors"


def audit_anchor_folder(host: str, chain: str) -> str:
    """Where the anchors of one host's chain are kept in a region or a witness bucket."""
    return f"{AUDIT_MIRROR}/{AUDIT_ANCHORS}/{host_label(host)}/{chain}"


def audit_anchor_name(folder: str, seq: int, suffix: str) -> str:
    """An anchor of record `seq` (`suffix` "json": the anchor, "tsr": its time-stamp token)."""
    return f"{folder}/{seq:012d}.{suffix}"


_AUDIT_ANCHOR_RE = re.compile(
    rf"^{AUDIT_MIRROR}/{AUDIT_ANCHORS}/([a-z0-9._-]+)/([0-9a-f]{{16}})/(\d{{12}})\.(json|tsr)\Z")


def parse_audit_anchor(name: str) -> tuple[str, str, int, str] | None:
    """(host, chain, seq, suffix) of an anchor's object name; None if it is not one."""
    m = _AUDIT_ANCHOR_RE.match(name)
    return (m.group(1), m.group(2), int(m.group(3)), m.group(4)) if m else None


# -- tenants: their keyrings (tenant_keys.py) and erasure certificates (erasure.py) ---

TENANTS = "tenants"
KEYS, ERASURE = "keys", "erasure"
# A tenant key id: 16 hex of a hash of the tenant's public recipient (tenant_key_record.key_id_of).
KEY_ID_RE = re.compile(r"^[0-9a-f]{16}\Z")
_CERTIFICATE_RE = re.compile(rf"^({STAMP_PATTERN})\.json\Z")
_CERTIFICATE_NAME_RE = re.compile(rf"^{TENANTS}/([^/]+)/{ERASURE}/({STAMP_PATTERN})\.json\Z")


def tenant_prefix(tenant: str) -> str:
    """Object-name prefix of everything drdaemon keeps about one tenant (not its snapshots)."""
    return f"{TENANTS}/{tenant}/"


def tenant_keys_prefix(tenant: str) -> str:
    """Prefix to list to find a tenant's keyring: wrapped keys and their public records."""
    return f"{tenant_prefix(tenant)}{KEYS}/"


def tenant_key_object(tenant: str, key_id: str) -> str:
    """The tenant's wrapped age identity: an age file encrypted to [keys] recipients."""
    return f"{tenant_keys_prefix(tenant)}{key_id}.age"


def tenant_key_record(tenant: str, key_id: str) -> str:
    """The public record of a tenant key (recipient, creation), authenticated by the
    manifest key."""
    return f"{tenant_keys_prefix(tenant)}{key_id}.json"


def tenant_key_id(recipient: str) -> str:
    """A tenant key's id: 16 hex of sha256("drdaemon-tenant-key\\0" + its recipient), so a
    key object whose identity does not derive its name is detected."""
    return hashlib.sha256(b"drdaemon-tenant-key\0" + recipient.encode()).hexdigest()[:16]


def tenant_key_staged(tenant: str, key_id: str) -> str:
    """A rewrap's new wrapped copy, written and verified before it replaces
    :func:`tenant_key_object` (key_rotation.py; docs/format.md "Tenant keys")."""
    return f"{tenant_keys_prefix(tenant)}{key_id}.{REWRAP}.age"


REWRAP = "rewrap"


def parse_tenant_key_name(name: str) -> tuple[str, str] | None:
    """(key id, "age", "json" or "rewrap") of a listed keyring object (by its last part),
    or None."""
    base = name.rsplit("/", 1)[-1]
    stem, dot, ext = base.rpartition(".")
    if dot and ext == "age" and stem.endswith(f".{REWRAP}"):
        stem, ext = stem[:-len(REWRAP) - 1], REWRAP
    if not dot or ext not in ("age", "json", REWRAP) or not KEY_ID_RE.match(stem):
        return None
    return stem, ext


def erasure_prefix(tenant: str) -> str:
    """Prefix to list to find a tenant's erasure certificates."""
    return f"{tenant_prefix(tenant)}{ERASURE}/"


def erasure_certificate_object(tenant: str, stamp: str) -> str:
    """An erasure certificate; `stamp` (layout.stamp) is when the erasure began."""
    return f"{erasure_prefix(tenant)}{stamp}.json"


def certificate_stamp(name: str) -> str | None:
    """The stamp of a listed certificate name (by its last part), or None for a stray."""
    m = _CERTIFICATE_RE.match(name.rsplit("/", 1)[-1])
    return m.group(1) if m else None


def parse_certificate_name(name: str) -> tuple[str, str] | None:
    """(tenant, stamp) of an erasure certificate's full object name, or None."""
    m = _CERTIFICATE_NAME_RE.match(name)
    return (m.group(1), m.group(2)) if m else None
