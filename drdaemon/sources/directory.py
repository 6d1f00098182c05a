"""Directory trees: backed up as a pax tar stream, restored without following links.

The backup (tree_write) walks the tree once (tree_walk), writing each entry
with its metadata (tree_meta) and adding it to the tree's digest; the restore
(tree_extract) writes every entry relative to its parent folder's descriptor,
then reads the tree back (tree_walk.scan_tree) so that a drill proves it
identical to the manifest's facts without trusting the tar it came from.

Snapshots of earlier versions carry the version 1 digest ("sha256:...": type,
path, size and content of each entry, in sorted order); `tree_facts` reads a
restored tree with the digest its manifest has (`scan`, `summarize` below).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import DrError, IntegrityError, SourceError, UsageError
from ..streams import ThreadPipe
from . import tree_extract
from .tree_meta import short_name, shorten
from .tree_walk import DIGEST_PREFIX, scan_tree
from .tree_write import TreeWriter

_READ = 1 << 20


@dataclass(frozen=True)
class Entry:
    """One tree entry as the digest sees it. `ref` is a content sha256 or link target."""

    kind: str  # "d", "f" or "l"
    path: str
    size: int
    ref: str


def tree_digest(entries: Iterable[Entry]) -> str:
    """The content digest of a tree, independent of traversal order."""
    sha = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e.path):
        sha.update(json.dumps([e.kind, e.path, e.size, e.ref]).encode() + b"\n")
    return "sha256:" + sha.hexdigest()


def summarize(entries: list[Entry]) -> dict[str, Any]:
    """The facts a drill checks, with the version 1 digest: counts, bytes and digest."""
    return {
        "files": sum(e.kind == "f" for e in entries),
        "directories": sum(e.kind == "d" for e in entries),
        "symlinks": sum(e.kind == "l" for e in entries),
        "bytes": sum(e.size for e in entries if e.kind == "f"),
        "digest": tree_digest(entries),
    }


def _walk(root: Path) -> Iterator[tuple[str, Path, os.stat_result]]:
    """(relative path, path, lstat) for every entry below root, sorted, without following links."""
    for dirpath, dirs, files in os.walk(root, onerror=_raise):
        dirs.sort()
        base = Path(dirpath)
        for name in sorted(dirs + files):
            path = base / name
            yield path.relative_to(root).as_posix(), path, path.lstat()


def _raise(exc: OSError) -> None:
    raise exc


def scan(root: Path) -> list[Entry]:
    """Entries of an on-disk tree, hashing file contents (used to verify restores)."""
    entries = []
    for rel, path, st in _walk(root):
        if stat.S_ISDIR(st.st_mode):
            entries.append(Entry("d", rel, 0, ""))
        elif stat.S_ISLNK(st.st_mode):
            entries.append(Entry("l", rel, 0, os.readlink(path)))
        elif stat.S_ISREG(st.st_mode):
            sha = hashlib.sha256()
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(_READ), b""):
                    sha.update(chunk)
            entries.append(Entry("f", rel, st.st_size, sha.hexdigest()))
    return entries


@contextmanager
def dump(path: Path, now: datetime | None = None,
         on_unreadable: str = "fail") -> Iterator[Any]:
    """Stream a pax tar of the tree at `path` (see sources.base.Dump).

    `now` is the consistency time to record (the caller's clock, so that
    snapshot ids and consistency times follow one injected clock); default:
    the wall clock. `on_unreadable`: "fail" or "skip" (and list) an entry that
    cannot be read.
    """
    from .base import Dump

    if not path.is_dir():
        raise SourceError(f"directory {path} does not exist")
    started = now if now is not None else datetime.now(UTC)
    pipe = ThreadPipe(lambda out: TreeWriter(str(path), out, on_unreadable).run(),
                      thread_writes=True, name="tar")

    def finish() -> dict[str, Any]:
        try:
            facts: dict[str, Any] = pipe.join()
        except DrError:
            raise
        except OSError as exc:
            where = f" ({short_name(os.fsdecode(exc.filename))})" if exc.filename else ""
            raise SourceError(f"cannot read {path}: {exc.strerror or exc}{where}") from None
        except Exception as exc:  # never an "internal error" without a snapshot.failed
            raise SourceError(f"cannot back up {path}: {exc.__class__.__name__}: "
                              f"{short_name(str(exc), 200)}") from None
        return facts

    try:
        # A tree has no transaction: its state is that of the moment we began.
        yield Dump(pipe.reader, started, finish)
    finally:
        pipe.reader.close()


_LISTS = (("changed_during_backup", "changed while read (cut or zero-padded)"),
          ("vanished_during_backup", "vanished or replaced during the walk (skipped)"),
          ("skipped_unreadable", "unreadable (skipped: on_unreadable = \"skip\")"),
          ("skipped_special_files", "special files (sockets, FIFOs, devices: skipped)"))


def facts_lines(facts: dict[str, Any], shown: int = 5) -> list[str]:
    """What a directory backup left out or saw change, as lines for people (none when
    nothing did). Names are in the manifest's escaped form."""
    lines = []
    counts = facts.get("counts") or {}
    for key, what in _LISTS:
        names = facts.get(key) or []
        count = counts.get(key, len(names)) if isinstance(counts, dict) else len(names)
        if not count:
            continue
        listed = ", ".join(shorten(str(n), 60) for n in names[:shown])
        more = f", … {count - min(len(names), shown)} more" if count > shown else ""
        lines.append(f"{count} {what}: {listed}{more}")
    return lines


def tree_facts(root: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """The facts of a restored tree, with the digest version `expected` (a manifest's
    facts) has: counts, `digest` and (version 2) `owner_digest`."""
    digest = str(expected.get("digest", DIGEST_PREFIX))
    if digest.startswith(DIGEST_PREFIX):
        return scan_tree(str(root), force_read=True)
    return summarize(scan(root))  # version 1: a snapshot of an earlier drdaemon


def owner_problem(expected: dict[str, Any], got: dict[str, Any]) -> str | None:
    """Why the owners of a restored tree differ from the manifest's, or None.

    Only root can give files away: restored by another user, every entry is
    that user's, which is said in the restore's notes, not counted against it.
    """
    if "owner_digest" not in expected or os.geteuid() != 0:
        return None
    if got.get("owner_digest") != expected["owner_digest"]:
        return "the owners or groups of some entries differ (owner_digest)"
    return None


class DirectorySink:
    """Extracts into a private staging folder beside the target, renamed on commit."""

    def __init__(self, target: Path, snapshot_id: str, expected: dict[str, Any],
                 max_bytes: int | None = None) -> None:
        """`expected`: the facts to verify on `complete`; `max_bytes` bounds the files'
        total size while extracting (default: `expected`'s `bytes`)."""
        self.target = target.absolute()
        self.expected = expected
        bound = max_bytes if max_bytes is not None else expected.get("bytes")
        self.max_bytes = bound if isinstance(bound, int) else None
        if self.target.exists() and (not self.target.is_dir() or any(self.target.iterdir())):
            raise UsageError(f"restore target {self.target} exists and is not an empty folder; "
                             "choose a new or empty folder")
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.staging = self.target.parent / (
                f".{self.target.name}.drdaemon-{snapshot_id}-{secrets.token_hex(3)}.partial")
            self.staging.mkdir(mode=0o700)
        except OSError as exc:
            raise UsageError(f"cannot create restore target next to {self.target}: "
                             f"{exc.strerror}") from None
        self.notes: list[str] = []
        self.root_applied = False
        self._pipe = ThreadPipe(self._extract, thread_writes=False, name="untar")
        self.writer = self._pipe.writer

    def _extract(self, stream: BinaryIO) -> None:
        # Never through tarfile's extraction filters: see tree_extract.
        self.root_applied = tree_extract.extract(stream, str(self.staging), self.notes,
                                                 self.max_bytes)

    def complete(self) -> None:
        self._pipe.join()
        got = tree_facts(self.staging, self.expected)
        for key in ("files", "directories", "symlinks", "bytes", "digest"):
            if key in self.expected and got[key] != self.expected[key]:
                raise IntegrityError(f"restored tree differs from the manifest: {key} is "
                                     f"{got[key]}, expected {self.expected[key]}")
        problem = owner_problem(self.expected, got)
        if problem is not None:
            raise IntegrityError(f"restored tree differs from the manifest: {problem}")

    def commit(self) -> str:
        if self.target.exists():
            self.target.rmdir()  # empty, checked before we began
        if not self.root_applied:
            self.staging.chmod(0o755)  # a snapshot of an earlier version: no root entry
        os.replace(self.staging, self.target)
        return str(self.target)

    def discard(self) -> None:
        # The extractor's own error, if any, was already reported by whoever failed.
        with contextlib.suppress(Exception):
            self._pipe.join()
        with contextlib.suppress(OSError):
            remove_tree(self.staging)


def remove_tree(path: Path) -> None:
    """rmtree, once more after making every folder writable (a restore may hold 0000
    or 0500 folders, which only root could otherwise delete from)."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except OSError:
        _make_writable(path)
        shutil.rmtree(path)


def _make_writable(folder: Path) -> None:
    try:
        os.chmod(folder, 0o700)
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            _make_writable(Path(entry.path))
