"""Directory trees: backed up as a POSIX tar stream, restored with a safe filter.

The content digest recorded in the manifest covers every entry's type, path,
size and content hash (or link target), in sorted order, so a drill can prove a
restored tree identical without trusting the tar it came from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import stat
import tarfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, cast

from ..errors import IntegrityError, SourceError, UsageError
from ..streams import ThreadPipe
from . import tree_extract

_READ = 1 << 20
MAX_REPORTED = 50


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
    """The facts a drill checks: counts, bytes and digest."""
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


class _FileReader:
    """Reads exactly `size` bytes of a file that may change while we read it.

    tar needs the size up front; a file that grows is cut at that size and one
    that shrinks is padded with zeros, and either is reported in the facts.
    """

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self.fh, self.left = fh, size
        self.sha = hashlib.sha256()
        self.changed = False

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.fh.read(n) if n else b""
        if len(data) < n:
            self.changed = True
            data += b"\0" * (n - len(data))
        self.left -= len(data)
        if self.left == 0 and not self.changed and self.fh.read(1):
            self.changed = True
        self.sha.update(data)
        return data


def _write_tar(root: Path, out: BinaryIO) -> dict[str, Any]:
    entries: list[Entry] = []
    changed: list[str] = []
    skipped: list[str] = []
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for rel, path, st in _walk(root):
            info = tarfile.TarInfo(rel)
            info.mtime, info.mode = int(st.st_mtime), stat.S_IMODE(st.st_mode)
            info.uid, info.gid = st.st_uid, st.st_gid
            if stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                entries.append(Entry("d", rel, 0, ""))
            elif stat.S_ISLNK(st.st_mode):
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
                tar.addfile(info)
                entries.append(Entry("l", rel, 0, info.linkname))
            elif stat.S_ISREG(st.st_mode):
                # Hard links are stored as separate regular files: simpler to
                # restore safely, and the digest stays a function of content.
                info.type, info.size = tarfile.REGTYPE, st.st_size
                with open(path, "rb") as fh:
                    reader = _FileReader(fh, st.st_size)
                    tar.addfile(info, cast(BinaryIO, reader))
                entries.append(Entry("f", rel, st.st_size, reader.sha.hexdigest()))
                if reader.changed:
                    changed.append(rel)
            else:
                skipped.append(rel)  # sockets, fifos, devices: not data
    facts = summarize(entries)
    facts["changed_during_backup"] = changed[:MAX_REPORTED]
    facts["skipped_special_files"] = skipped[:MAX_REPORTED]
    return facts


@contextmanager
def dump(path: Path, now: datetime | None = None) -> Iterator[Any]:
    """Stream a POSIX tar of the tree at `path` (see sources.base.Dump).

    `now` is the consistency time to record (the caller's clock, so that
    snapshot ids and consistency times follow one injected clock); default:
    the wall clock.
    """
    from .base import Dump

    if not path.is_dir():
        raise SourceError(f"directory {path} does not exist")
    started = now if now is not None else datetime.now(UTC)
    pipe = ThreadPipe(lambda out: _write_tar(path, out), thread_writes=True, name="tar")

    def finish() -> dict[str, Any]:
        try:
            facts: dict[str, Any] = pipe.join()
        except OSError as exc:
            raise SourceError(f"cannot read {path}: {exc.strerror or exc} "
                              f"({getattr(exc, 'filename', '') or ''})") from None
        return facts

    try:
        # A tree has no transaction: its state is that of the moment we began.
        yield Dump(pipe.reader, started, finish)
    finally:
        pipe.reader.close()


class DirectorySink:
    """Extracts into a private staging folder beside the target, renamed on commit."""

    def __init__(self, target: Path, snapshot_id: str, expected: dict[str, Any]) -> None:
        self.target = target.absolute()
        self.expected = expected
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
        self.root_applied = tree_extract.extract(stream, str(self.staging), self.notes)

    def complete(self) -> None:
        self._pipe.join()
        got = summarize(scan(self.staging))
        for key in ("files", "directories", "symlinks", "bytes", "digest"):
            if key in self.expected and got[key] != self.expected[key]:
                raise IntegrityError(f"restored tree differs from the manifest: {key} is "
                                     f"{got[key]}, expected {self.expected[key]}")

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
        shutil.rmtree(self.staging, ignore_errors=True)
