"""A test-only source kind, "notes": the regular files at the top of one folder.

It proves that a kind is a plug-in (issue 13, item 3): written against
drdaemon.sources.base only, registered with drdaemon.sources.register, it is
backed up, restored and drilled by the unchanged services. Its dump is a JSON
object {name: base64 content}; its facts the file count, bytes and a digest.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from pyrage import x25519

from drdaemon.errors import IntegrityError, SourceError, UsageError
from drdaemon.sources.base import (
    COUNT_MISMATCH,
    DIGEST_MISMATCH,
    DrillPlace,
    DrillScratch,
    Dump,
    LeftoverJudge,
    RestoreOptions,
    Sink,
    Snapshot,
    SourceSettings,
    whole_sizes,
)


def read_notes(folder: Path) -> dict[str, bytes]:
    """The regular files directly in `folder`, by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def notes_facts(notes: Mapping[str, bytes]) -> dict[str, Any]:
    digest = hashlib.sha256()
    for name in sorted(notes):
        digest.update(name.encode() + b"\0" + hashlib.sha256(notes[name]).digest())
    return {"files": len(notes), "bytes": sum(len(v) for v in notes.values()),
            "digest": digest.hexdigest()}


def verify_notes(expected: Mapping[str, Any], folder: Path) -> list[str]:
    got = notes_facts(read_notes(folder))
    reasons = []
    if got["files"] != expected.get("files"):
        reasons.append(f"{COUNT_MISMATCH}: restored files is {got['files']}, the manifest "
                       f"says {expected.get('files')}")
    if got["digest"] != expected.get("digest"):
        reasons.append(f"{DIGEST_MISMATCH}: restored digest is {got['digest']}, the manifest "
                       f"says {expected.get('digest')}")
    return reasons


class NotesSink:
    """Receives the dump into a staging folder; writes the files on `complete`."""

    def __init__(self, target: Path, snapshot_id: str, expected: Mapping[str, Any]) -> None:
        if target.exists():
            raise UsageError(f"restore target {target} exists")
        self.target, self.expected = target, expected
        self.staging = target.parent / f".{target.name}.{snapshot_id}.partial"
        self.staging.mkdir(parents=True, mode=0o700)
        self.notes: list[str] = []
        self.writer: BinaryIO = open(self.staging / ".incoming", "wb")  # noqa: SIM115

    def complete(self) -> None:
        self.writer.close()
        incoming = self.staging / ".incoming"
        try:
            doc = json.loads(incoming.read_bytes())
            for name, text in doc.items():
                (self.staging / Path(name).name).write_bytes(base64.b64decode(text))
        except ValueError as exc:
            raise SourceError(f"not a notes dump: {exc}") from None
        incoming.unlink()
        reasons = verify_notes(self.expected, self.staging) if self.expected else []
        if reasons:
            raise IntegrityError("; ".join(reasons))

    def commit(self) -> str:
        os.replace(self.staging, self.target)
        return str(self.target)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.writer.close()
        shutil.rmtree(self.staging, ignore_errors=True)


@dataclass
class NotesScratch:
    sink: NotesSink
    where: str
    evidence: dict[str, Any]

    def verify(self, facts: dict[str, Any], evidence: dict[str, Any]) -> list[str]:
        evidence.update(notes_facts(read_notes(self.sink.staging)))
        return verify_notes(facts, self.sink.staging)


class NotesKind:
    name = "notes"
    dump_format = "notes"
    config_keys = ("path",)
    restore_options: frozenset[str] = frozenset()
    takes_sql_checks = False
    detached_facts = ("names",)  # the file names leave the manifest for the facts object
    export_suffix = ".notes"
    target_noun = "folder"

    def plaintext_problem(self, head: bytes) -> str | None:
        return None

    def customer_facts(self, facts: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in facts.items() if k != "names"}

    def load_instructions(self, file: str) -> list[str]:
        return [f"notes, one per line: cat {file}"]

    def data_place(self, source: Any) -> None:
        return None

    @contextlib.contextmanager
    def _dump(self, folder: Path) -> Iterator[Dump]:
        notes = read_notes(folder)
        blob = json.dumps({k: base64.b64encode(v).decode() for k, v in notes.items()}).encode()
        facts = {**notes_facts(notes), "names": sorted(notes)}
        yield Dump(io.BytesIO(blob), datetime.now(UTC), lambda: facts)

    def dump(self, source: SourceSettings, now: datetime | None,
             cancel: threading.Event | None) -> contextlib.AbstractContextManager[Dump]:
        assert source.path is not None
        return self._dump(source.path)

    def seal_facts(self, facts: dict[str, Any],
                   recipients: Sequence[x25519.Recipient]) -> dict[str, Any]:
        return facts

    def detached_summary(self, detached: dict[str, Any]) -> dict[str, Any]:
        return {"name_count": len(detached["names"])}

    def measures(self, facts: Mapping[str, Any]) -> dict[str, int]:
        return whole_sizes({"files": facts.get("files")})

    def check_target(self, source: SourceSettings, target: str) -> None:
        if not target.startswith("/"):
            raise UsageError(f"a notes target is an absolute path, not {target!r}")

    def open_sink(self, source: SourceSettings, snapshot: Snapshot, target: str,
                  options: RestoreOptions) -> Sink:
        return NotesSink(Path(target), snapshot.id, snapshot.facts)

    def open_scratch(self, source: SourceSettings, snapshot: Snapshot, place: DrillPlace,
                     identities: Sequence[x25519.Identity]) -> DrillScratch:
        sink = NotesSink(place.make_folder() / "copy", snapshot.id, {})
        return NotesScratch(sink, str(sink.staging), {})

    def clean_leftovers(self, sources: Sequence[SourceSettings], server_dsn: str | None,
                        judge: LeftoverJudge) -> None:
        pass  # a folder in the scratch folder: drills/scratch.py removes those


NOTES = NotesKind()
