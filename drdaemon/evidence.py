"""The evidence bundle an auditor takes away: `drctl audit export --to DIR [--since 90d]`.

A bundle holds the audit log (whole: only a chain checked from its first record
proves nothing was removed), the signed drill records since `since`, the
manifests of the snapshots they restored (fetched from a region), the anchors
of the log's head, the public signing key, `bundle.json` (what is in it),
`VERIFY.md` (how to check it with stock tools), and `SHA256SUMS` with its
Ed25519 signature `SHA256SUMS.sig`. Layout: docs/format.md ("Evidence bundle");
the check: evidence_check.py. Written into a private staging folder beside DIR,
checked there, and renamed into place: DIR never holds half a bundle.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from . import __version__, anchors, audit, layout, manifest, statefs
from .audit_chain import GENESIS, canonical, line_hash
from .drills.records import DrillRecord, check_line, parsed_lines
from .errors import DrError, UsageError
from .evidence_check import (
    ANCHORS,
    AUDIT_LOG,
    DRILLS,
    FORMAT,
    INFO,
    PUBLIC_KEY,
    README,
    SUMS,
    SUMS_SIG,
    BundleCheck,
    manifest_path,
    verify_bundle,
)
from .export import check_destination
from .export_files import move_into_place, remove_stale_staging, staging_for
from .runtime import Runtime
from .signing import SigningKey

ANCHOR_DIR = anchors.FOLDER  # in the state folder (anchors.py writes it)


@dataclass
class BundleResult:
    """What `export_bundle` wrote, and the bundle's own check (as an auditor will see it)."""

    folder: str
    signing_key: str
    records: int
    head: str
    drills: int
    manifests: int
    anchors: int
    check: BundleCheck
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.check.ok

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), check=self.check.to_dict(), ok=self.ok)


def export_bundle(rt: Runtime, dest: Path, since: datetime | None = None) -> BundleResult:
    """Write the evidence bundle to the new or empty folder `dest` (module docstring).

    Needs `[keys] signing_key_file`: a bundle checkable only with a secret would
    prove nothing to an auditor. Drill records begun before `since` are left out,
    and so are records whose signature does not verify (listed in `notes`).
    """
    key = rt.signing_key
    if key is None:
        raise UsageError("an evidence bundle needs a signing key: set [keys] signing_key_file "
                         "(make one with: drctl keys signing-key --out FILE)")
    dest = dest.absolute()
    check_destination(dest)
    notes = [f"removed {n}: the staging folder of an export that was killed"
             for n in remove_stale_staging(dest)]
    state_dir = rt.config.daemon.state_dir
    lines = audit.read_lines(state_dir)
    files: dict[str, bytes] = {AUDIT_LOG: b"".join(lines), PUBLIC_KEY: key.public.pem()}
    drills = _drill_lines(rt, key, since, notes)
    files[DRILLS] = b"".join(line for _, line in drills)
    for record, _ in drills:
        _add_manifest(rt, record, files, notes)
    anchors = _anchor_files(state_dir)
    files.update(anchors)
    head = line_hash(lines[-1]) if lines else GENESIS  # of the file, verified or not
    files[INFO] = canonical(_info(rt, key, since, lines, head, drills, files)) + b"\n"
    files[README] = verify_doc(key.fingerprint).encode()
    staging = staging_for(dest)
    try:
        _write(staging, files, key)
        check = verify_bundle(staging, key.public)
        move_into_place(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    check.folder = str(dest)
    result = BundleResult(str(dest), key.fingerprint, len(lines), head, len(drills),
                          sum(n.startswith("manifests/") for n in files), len(anchors),
                          check, notes)
    rt.record_event("audit.export", destination=str(dest), records=len(lines), head=head,
                    drills=[r.id for r, _ in drills], since=since.isoformat() if since else None,
                    signing_key=key.fingerprint, ok=check.ok)
    return result


def _drill_lines(rt: Runtime, key: SigningKey, since: datetime | None,
                 notes: list[str]) -> list[tuple[DrillRecord, bytes]]:
    """The signed drill records begun at/after `since`, as their canonical lines."""
    out = []
    for doc, record in parsed_lines(rt.config.daemon.state_dir):
        if since is not None and record.started < since:
            continue
        status, why = check_line(doc, key.public)
        if status != "signed":
            notes.append(f"drill {record.id} left out: {status} ({why})")
            continue
        out.append((record, canonical(doc) + b"\n"))
    return out


def _add_manifest(rt: Runtime, record: DrillRecord, files: dict[str, bytes],
                  notes: list[str]) -> None:
    """The manifest the drill restored, as stored, from its region first, then any other."""
    if not record.snapshot_id:
        return
    name = layout.manifest_object_name(record.source, record.snapshot_id)
    where = manifest_path(record.source, record.snapshot_id)
    if where in files:
        return
    regions = sorted(rt.stores, key=lambda s: s.name != record.region)
    for store in regions:
        try:
            raw = store.get_bytes(name, manifest.MAX_MANIFEST_BYTES)
            manifest.parse(raw, rt.manifest_key, source=record.source,
                           snapshot_id=record.snapshot_id)
        except DrError:  # gone, unreachable or not authentic there: the next region
            continue
        files[where] = raw
        return
    notes.append(f"drill {record.id}: the manifest of {record.snapshot_id} is in no region "
                 "now (pruned?): not in the bundle")


def _anchor_files(state_dir: Path) -> dict[str, bytes]:
    """The anchors of the log's head kept in `<state_dir>/audit-anchors/` (`<seq>.json`
    and its time-stamp token `<seq>.tsr`), by their paths in the bundle.

    Read through statefs (no link followed), as the files are: the bundle carries
    the anchors' exact bytes, which `openssl ts -verify -data` checks.
    """
    return {f"{ANCHORS}/{n}": statefs.read_bytes(state_dir, f"{ANCHOR_DIR}/{n}")
            for n in statefs.list_names(state_dir, ANCHOR_DIR) if n.endswith((".json", ".tsr"))}


def _info(rt: Runtime, key: SigningKey, since: datetime | None, lines: list[bytes], head: str,
          drills: list[tuple[DrillRecord, bytes]], files: dict[str, bytes]) -> dict[str, Any]:
    return {"format": FORMAT, "version": 1, "created": rt.clock().isoformat(),
            "host": socket.gethostname(),
            "drdaemon_version": __version__, "signing_key": key.fingerprint,
            "since": since.isoformat() if since else None,
            "audit": {"records": len(lines), "head": head},
            "drills": [r.id for r, _ in drills],
            "manifests": sorted(n for n in files if n.startswith("manifests/")),
            "anchors": sorted(n for n in files if n.startswith(ANCHORS + "/"))}


def _write(staging: Path, files: dict[str, bytes], key: SigningKey) -> None:
    """Every file, then SHA256SUMS over them (sha256sum's format) and its signature."""
    for name, data in files.items():
        path = staging / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    sums = "".join(f"{hashlib.sha256(files[n]).hexdigest()}  {n}\n" for n in sorted(files))
    (staging / SUMS).write_bytes(sums.encode())
    (staging / SUMS_SIG).write_bytes(key.sign(sums.encode()))


def verify_doc(fingerprint: str) -> str:
    """VERIFY.md: how an auditor checks the bundle, with stock tools and with drctl."""
    return VERIFY_TEMPLATE.replace("{fingerprint}", fingerprint)


VERIFY_TEMPLATE = """\
# Checking this evidence bundle

Made by drdaemon; signed with the Ed25519 key `{fingerprint}`. Everything below
runs in this folder with stock tools (coreutils, OpenSSL 3) and no drdaemon key.

## 1. The public key

Use the public key the operator gave you (or published in the drill reports),
not only the copy in this bundle. Its fingerprint must be `{fingerprint}`:

    openssl pkey -pubin -in signing-key.pub -outform DER | tail -c 32 | sha256sum | cut -c1-32

prints the 32 hex digits after `ed25519:`. Below, `KEY.pub` is your copy.

## 2. The list of files is signed by that key

    openssl pkeyutl -verify -pubin -inkey KEY.pub -rawin -in SHA256SUMS -sigfile SHA256SUMS.sig

must print `Signature Verified Successfully`.

## 3. Every file is the one listed

    sha256sum -c SHA256SUMS

must print `OK` for every file. A file that is not listed was added afterwards.

## 4. Anchors

Each `anchors/<seq>.json` with an `anchors/<seq>.tsr` is a head of the audit
log time-stamped by a time-stamping authority (RFC 3161). With that
authority's certificate chain `TSA-CA.pem`:

    openssl ts -verify -data anchors/<seq>.json -in anchors/<seq>.tsr -CAfile TSA-CA.pem

must print `Verification: OK`. The anchor's `head` must be the sha256 of line
`seq + 1` of `audit/audit.jsonl` (`sed -n "$((seq + 1))p" audit/audit.jsonl | sha256sum`):
otherwise the log was rewritten after it was anchored.

## 5. Every record, with drdaemon

    drctl audit verify --bundle . --public-key KEY.pub

checks all of the above (but the time-stamp tokens) and every record: each
audit record's signature and its link to the one before, from the first
record on (`bundle.json` names the head: the sha256 of the last line); each
drill record's signature and that it matches its `drill` audit record; and that
each manifest in `manifests/` carries the MAC and sha256 the drill recorded.
It needs no config and no secret.
"""
