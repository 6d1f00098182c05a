"""The directory source kind: a tree, dumped as a POSIX tar and extracted into a
staging folder (directory.py and the tree_* modules do the work); this module is
the plug-in that the services see (sources.kind_for("directory"))."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pyrage import x25519

from .base import (
    COUNT_MISMATCH,
    DIGEST_MISMATCH,
    MANIFEST_INVALID,
    DataPlace,
    DrillPlace,
    DrillScratch,
    Dump,
    LeftoverJudge,
    RestoreOptions,
    Sink,
    Snapshot,
    SourceSettings,
    SourceWhere,
    whole_sizes,
)
from .directory import DirectorySink, dump, owner_problem, tree_facts

TREE_FACTS = ("files", "directories", "symlinks", "bytes", "digest")


def compare_tree(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """Mismatches between the manifest's directory facts and a restored tree."""
    reasons = []
    for key in TREE_FACTS:
        if key not in expected:
            reasons.append(f"{MANIFEST_INVALID}: the manifest records no {key}")
        elif got[key] != expected[key]:
            code = DIGEST_MISMATCH if key == "digest" else COUNT_MISMATCH
            reasons.append(f"{code}: restored {key} is {got[key]}, the manifest says "
                           f"{expected[key]}")
    return reasons


# What a tenant export's MANIFEST.json tells the customer of a tree.
CUSTOMER_FACTS = ("files", "directories", "symlinks", "bytes", "digest")


@dataclass
class DirectoryScratch:
    """A drill's scratch tree: the sink's staging folder inside the drill's folder."""

    sink: DirectorySink
    where: str
    evidence: dict[str, Any]

    def verify(self, facts: dict[str, Any], evidence: dict[str, Any]) -> list[str]:
        tree = tree_facts(self.sink.staging, facts)
        evidence.update({k: tree[k] for k in TREE_FACTS})
        reasons = compare_tree(facts, tree)
        if (problem := owner_problem(facts, tree)) is not None:
            reasons.append(f"{DIGEST_MISMATCH}: {problem}")
        return reasons


class DirectoryKind:
    """A directory tree (`path`, `on_unreadable`)."""

    name = "directory"
    dump_format = "tar"
    config_keys = ("path", "on_unreadable")
    restore_options: frozenset[str] = frozenset()
    takes_sql_checks = False
    detached_facts: tuple[str, ...] = ()
    export_suffix = ".tar"
    target_noun = "folder"

    def plaintext_problem(self, head: bytes) -> str | None:
        if head[257:262] == b"ustar":
            return None
        return "is not a POSIX tar (no ustar header)"

    def customer_facts(self, facts: Mapping[str, Any]) -> dict[str, Any]:
        # The counts and the digest; the rest is drill bookkeeping.
        return {k: facts[k] for k in CUSTOMER_FACTS if k in facts}

    def data_place(self, source: SourceWhere) -> DataPlace | None:
        if source.path is None:
            return None
        return DataPlace(("tree", str(source.path)),
                         tuple(("tree", str(p)) for p in source.path.parents),
                         "overlapping directory trees")

    def load_instructions(self, file: str) -> list[str]:
        return ["a POSIX (pax) tar of the folder; extract it with:",
                f"  mkdir NEWDIR && tar -xpf {file} -C NEWDIR",
                "(GNU tar: add --xattrs --xattrs-include='*' --acls to keep "
                "extended attributes and ACLs)"]

    def dump(self, source: SourceSettings, now: datetime | None,
             cancel: threading.Event | None) -> AbstractContextManager[Dump]:
        assert source.path is not None
        return dump(source.path, now, source.on_unreadable)

    def seal_facts(self, facts: dict[str, Any],
                   recipients: Sequence[x25519.Recipient]) -> dict[str, Any]:
        return facts  # names and sizes: nothing secret beyond what the data object holds

    def detached_summary(self, detached: dict[str, Any]) -> dict[str, Any]:
        return {}

    def measures(self, facts: Mapping[str, Any]) -> dict[str, int]:
        """Regular files and their bytes."""
        return whole_sizes({n: facts.get(n) for n in ("files", "bytes")})

    def check_target(self, source: SourceSettings, target: str) -> None:
        pass  # DirectorySink refuses a target that is not a new or empty folder

    def open_sink(self, source: SourceSettings, snapshot: Snapshot, target: str,
                  options: RestoreOptions) -> Sink:
        return DirectorySink(Path(target), snapshot.id, snapshot.facts)

    def open_scratch(self, source: SourceSettings, snapshot: Snapshot, place: DrillPlace,
                     identities: Sequence[x25519.Identity]) -> DrillScratch:
        folder = place.make_folder()
        # No expected facts for the sink: the drill compares them itself, to
        # report every mismatch and to time verification apart from the restore.
        bound = snapshot.facts.get("bytes")
        sink = DirectorySink(folder / "tree", snapshot.id, {},
                             max_bytes=bound if isinstance(bound, int) else None)
        return DirectoryScratch(sink, str(sink.staging), {})

    def clean_leftovers(self, sources: Sequence[SourceSettings], server_dsn: str | None,
                        judge: LeftoverJudge) -> None:
        pass  # its scratch is a folder in the scratch folder: drills/scratch.py cleans those


DIRECTORY = DirectoryKind()
