"""Checking an evidence bundle with nothing but a public key (`drctl audit verify --bundle`).

The bundle (written by evidence.py; layout in docs/format.md, "Evidence bundle")
is untrusted input from the auditor's point of view: every name in SHA256SUMS is
checked before a file is opened, and nothing in the bundle is taken as a key.
The checks, in order: SHA256SUMS is signed by the key given; every file is
listed with its sha256 and nothing else is there; the audit log verifies with
the key from its first record (audit_chain.verify_public) and ends at the head
bundle.json names; every drill record is signed and matches its `drill` audit
record; every manifest a drill names carries the MAC the drill recorded; the
anchors are checked by `anchor_problems`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import anchors as anchor_docs
from .audit_chain import GENESIS, line_hash, parse_records, split_lines, verify_public
from .drills.records import DrillRecord, check_line, matches_audit
from .signing import PublicKey
from .units import parse_iso_time

SUMS = "SHA256SUMS"
SUMS_SIG = "SHA256SUMS.sig"
INFO = "bundle.json"
README = "VERIFY.md"
PUBLIC_KEY = "signing-key.pub"
AUDIT_LOG = "audit/audit.jsonl"
DRILLS = "drills/drills.jsonl"
MANIFESTS = "manifests"
ANCHORS = "anchors"
FORMAT = "drdaemon.evidence-bundle"
MAX_FILE = 1 << 30  # a bundle is evidence, not data: a larger file is refused unread

_SUM_LINE = re.compile(r"^([0-9a-f]{64})  ([A-Za-z0-9._@+-]+(?:/[A-Za-z0-9._@+-]+)*)$")


@dataclass
class BundleCheck:
    """The outcome of checking a bundle: `ok` when `problems` is empty."""

    folder: str
    signer: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: int = 0
    audit: dict[str, Any] = field(default_factory=dict)  # AuditVerification.to_dict()
    drills: int = 0
    manifests: int = 0
    anchors: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), ok=self.ok)


def manifest_path(source: str, snapshot_id: str) -> str:
    """Where a drilled snapshot's manifest is kept in a bundle (relative path)."""
    return f"{MANIFESTS}/{source}/{snapshot_id}.json"


def parse_sums(text: str) -> tuple[dict[str, str], list[str]]:
    """Pure: SHA256SUMS (`sha256sum` format) as {path: hex}, and what is wrong with it.

    Only plain relative names are accepted: no `..`, no absolute path, no
    escapes, so that a hostile bundle cannot point the check outside itself.
    """
    sums: dict[str, str] = {}
    problems = []
    for n, line in enumerate(text.splitlines(), 1):
        m = _SUM_LINE.match(line)
        if m is None or ".." in m.group(2).split("/"):
            problems.append(f"{SUMS} line {n} is not '<sha256>  <relative path>'")
        elif m.group(2) in sums:
            problems.append(f"{SUMS} lists {m.group(2)} twice")
        else:
            sums[m.group(2)] = m.group(1)
    return sums, problems


def _files(folder: Path) -> list[str]:
    """Every entry under `folder` as a relative path (links and odd entries included)."""
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_symlink() or not p.is_dir():
            out.append(p.relative_to(folder).as_posix())
    return out


def _read(path: Path) -> bytes:
    if path.is_symlink() or not path.is_file():
        raise OSError(f"{path.name} is not a regular file")
    if path.stat().st_size > MAX_FILE:
        raise OSError(f"{path.name} is larger than {MAX_FILE} bytes")
    return path.read_bytes()


def verify_bundle(folder: Path, public: PublicKey) -> BundleCheck:
    """Check the bundle in `folder` with `public` alone (see the module's docstring)."""
    check = BundleCheck(str(folder), public.fingerprint)
    try:
        sums_raw, sig = _read(folder / SUMS), _read(folder / SUMS_SIG)
    except OSError as exc:
        check.problems.append(f"cannot read {SUMS} and {SUMS_SIG}: {exc}")
        return check
    if not public.verify(sums_raw, sig):
        check.problems.append(f"{SUMS_SIG} is not {public.fingerprint}'s signature of {SUMS}: "
                              "the list was changed, or another key signed it")
    sums, bad = parse_sums(sums_raw.decode("utf-8", "replace"))
    check.problems += bad
    contents: dict[str, bytes] = {}
    for name in _files(folder):
        if name in (SUMS, SUMS_SIG):
            continue
        if name not in sums:
            check.problems.append(f"{name} is not listed in {SUMS}: added after the bundle "
                                  "was made")
            continue
        try:
            contents[name] = _read(folder / name)
        except OSError as exc:
            check.problems.append(f"cannot read {name}: {exc}")
            continue
        if hashlib.sha256(contents[name]).hexdigest() != sums[name]:
            check.problems.append(f"{name}: sha256 does not match {SUMS}: the file was changed")
    check.problems += [f"{name} is listed in {SUMS} but missing" for name in sums
                       if name not in contents and not (folder / name).exists()]
    check.files = len(contents)
    _check_contents(check, contents, public)
    return check


def _check_contents(check: BundleCheck, contents: dict[str, bytes], public: PublicKey) -> None:
    """The evidence itself: the chain, the drill records, the manifests, the anchors."""
    try:
        info = json.loads(contents.get(INFO, b"{}"))
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise ValueError("not a drdaemon evidence bundle description")
    except ValueError as exc:
        check.problems.append(f"{INFO}: {exc}")
        info = {}
    lines = split_lines(contents.get(AUDIT_LOG, b""))
    result = verify_public(lines, public)
    check.audit = result.to_dict()
    if not result.ok:
        check.problems.append(f"{AUDIT_LOG}: record {result.first_bad}: {result.reason}")
    named, head = (info.get("audit") or {}).get("head"), line_hash(lines[-1]) if lines else GENESIS
    if named != head:
        check.problems.append(f"{AUDIT_LOG} ends at {head}, but {INFO} names head "
                              f"{named}: records were added or removed")
    good = lines if result.first_bad is None else lines[:result.first_bad]
    events = {e.get("id"): e for e in parse_records(good) if e.get("event") == "drill"}
    seen: set[str] = set()
    for n, line in enumerate(split_lines(contents.get(DRILLS, b"")), 1):
        seen |= _check_drill(check, n, line, public, events, contents)
    for i, e in events.items():
        if i not in seen and _after(e.get("started_at"), info.get("since")):
            check.notes.append(f"{'FAILED ' if e.get('ok') is False else ''}drill {i} (audit "
                               f"record {e.get('seq')}) has no signed record in {DRILLS}")
    anchors = sorted(n for n in contents if n.startswith(ANCHORS + "/"))
    check.anchors = len(anchors)
    check.problems += anchor_problems(good, {n: contents[n] for n in anchors})
    if not anchors:
        check.notes.append("no anchor in the bundle: nothing outside the operator's reach "
                           "proves that the log was not rewritten")


def _after(at: object, since: object) -> bool:
    """Whether the time `at` is at/after `since` (no `since`, or a bad time: True)."""
    try:
        return not since or parse_iso_time(str(at)) >= parse_iso_time(str(since))
    except (ValueError, TypeError):
        return True


def _check_drill(check: BundleCheck, n: int, line: bytes, public: PublicKey,
                 events: dict[Any, dict[str, Any]], contents: dict[str, bytes]) -> set[str]:
    """Check one drill record line; the ids it accounts for (none if unreadable)."""
    where = f"{DRILLS} line {n}"
    try:
        doc = json.loads(line)
        record = DrillRecord.from_dict(doc)
        record.to_dict()  # fields of the wrong type (reasons not a list) fail here
    except (ValueError, TypeError, AttributeError) as exc:
        check.problems.append(f"{where} is not a drill record: {exc}")
        return set()
    status, why = check_line(doc, public)
    if status != "signed":
        check.problems.append(f"{where} ({record.id}) is {status}: {why}")
        return {record.id}
    if not matches_audit(record, events.get(record.id)):
        check.problems.append(f"{where} ({record.id}) does not match its drill record in "
                              f"{AUDIT_LOG} (or has none)")
        return {record.id}
    check.drills += 1
    if not (record.snapshot_id and record.manifest_mac):
        return {record.id}
    name = manifest_path(record.source, record.snapshot_id)
    if name not in contents:
        check.notes.append(f"{record.id}: no manifest {name} in the bundle (pruned since?)")
        return {record.id}
    try:
        m = json.loads(contents[name])
        mac, sha = m["mac"], m["data"]["sha256"]
        same = (mac["key_id"], mac["value"], m["id"], sha) == (
            record.manifest_key_id, record.manifest_mac, record.snapshot_id, record.sha256)
    except (ValueError, KeyError, TypeError):
        same = False
    if same:
        check.manifests += 1
    else:
        check.problems.append(f"{name} is not the manifest drill {record.id} read (its id, "
                              "sha256 or MAC differs)")
    return {record.id}


def anchor_problems(lines: list[bytes], anchors: dict[str, bytes]) -> list[str]:
    """What the bundle's anchors say is wrong with the log `lines` ("rewrite: ..."), by
    `anchors.check_extends`: the log must extend every anchored head. The tokens' own
    signatures are the TSA's, checked against the TSA's CA certificate, which the
    auditor holds and drctl does not: VERIFY.md runs `openssl ts -verify` for that.
    """
    found, problems = [], []
    for name in sorted(n for n in anchors if n.endswith(".json")):
        token = anchors.get(name.removesuffix(".json") + ".tsr")
        try:
            found.append(anchor_docs.parse(anchors[name], token, ["bundle"]))
        except ValueError as exc:
            problems.append(f"{name} is not an anchor: {exc}")
    return problems + anchor_docs.check_extends(lines, found, None)
