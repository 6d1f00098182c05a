"""Extracting an untrusted tar stream into a folder, without ever following a link.

Python's extraction filters decide from path strings (`os.path.realpath`),
which can be fooled (CVE-2025-4517: realpath stops resolving past PATH_MAX).
So this module does not use them. Every entry is written relative to an open
descriptor of its parent folder, and every folder on the way is opened with
O_NOFOLLOW|O_DIRECTORY from the one above it, starting at the staging folder:

- a path component that is a symbolic link (one the archive made, or any
  other) is refused, so nothing is ever written through a link;
- `..` components and absolute names are refused; files are created with
  O_EXCL, so an entry never replaces another (or a link);
- only folders, regular files and symbolic links are extracted; hard links,
  devices and FIFOs are refused (drdaemon never writes them);
- a link is created as a link and never followed: its target may point
  anywhere, as it did in the source tree.

Folders are created 0700 and get their own mode, owner, times and extended
attributes when the stream leaves them (the archive is in depth-first order,
so that is once all their entries are written); only the folders on the
current path are held open, so memory does not grow with the entry count.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import tarfile
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, cast

from ..errors import IntegrityError, SourceError
from .tree_meta import apply_meta, meta_of_member, short_name, split_name

_READ = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_NOTES = 50


# The first releases whose tarfile extraction filters resist CVE-2025-4517 and its
# siblings (CVE-2024-12718, CVE-2025-4138, -4330, -4435; python/cpython#135034).
FILTER_FIXED = {(3, 11): 13, (3, 12): 11, (3, 13): 4}


def interpreter_note(version: tuple[int, int, int] | None = None) -> str | None:
    """A warning when this Python's tarfile filters are the vulnerable ones, else None.

    Only a warning: restores do not use those filters (see the module's
    docstring), so an older Python stays safe here; the note is for whoever
    else extracts archives with this interpreter.
    """
    major, minor, micro = version or sys.version_info[:3]
    fixed = FILTER_FIXED.get((major, minor))
    if fixed is None or micro >= fixed:
        return None
    return (f"Python {major}.{minor}.{micro} has the tarfile filter flaws fixed in "
            f"{major}.{minor}.{fixed} (CVE-2025-4517 and others); drdaemon's restores do "
            "not rely on those filters, but upgrade Python")


class HostileEntry(IntegrityError):
    """An entry that could write outside the target or is not what drdaemon writes."""


@dataclass
class _Open:
    """A folder on the current path: its name, descriptor, and the entry to apply on leaving."""

    name: bytes
    fd: int
    member: tarfile.TarInfo | None


class Extractor:
    """Writes the entries of a tar stream below `root_fd` (see the module's docstring).

    `max_bytes` (the manifest's `bytes`) bounds the files' total size: a sparse
    member costs little to store whatever size it claims.
    """

    def __init__(self, root_fd: int, notes: list[str], max_bytes: int | None = None) -> None:
        self.root_fd = root_fd
        self.notes = notes
        self.max_bytes = max_bytes
        self.total = 0
        self.seen_any = False
        self.deferred: list[tuple[list[bytes], tarfile.TarInfo]] | None = None
        self.stack: list[_Open] = []
        self.root_member: tarfile.TarInfo | None = None
        self.not_applied: set[str] = set()

    # -- the folders on the current path -------------------------------------------

    def _top(self) -> int:
        return self.stack[-1].fd if self.stack else self.root_fd

    def _leave(self) -> None:
        """Close the deepest open folder, applying its entry's metadata first."""
        top = self.stack.pop()
        try:
            if top.member is not None and self.deferred is not None:
                self.deferred.append(([f.name for f in self.stack] + [top.name], top.member))
            elif top.member is not None:
                self._apply(top.member, top.fd, self._top(), top.name)
        finally:
            os.close(top.fd)

    def _apply_deferred(self) -> None:
        """Folders of an archive in the walk order of an earlier version, deepest first
        (a folder's mode may forbid what its entries need)."""
        assert self.deferred is not None
        for comps, member in sorted(self.deferred, key=lambda d: -len(d[0])):
            *parents, name = comps
            parent = self._enter(parents, member.name)
            fd = self._open_dir(name, member.name, create=False)
            try:
                self._apply(member, fd, parent, name)
            finally:
                os.close(fd)
        while self.stack:
            os.close(self.stack.pop().fd)

    def _enter(self, parents: list[bytes], name_for_errors: str) -> int:
        """The descriptor of the folder `parents`, opened component by component."""
        keep = 0
        while keep < len(self.stack) and keep < len(parents) and \
                self.stack[keep].name == parents[keep]:
            keep += 1
        while len(self.stack) > keep:
            self._leave()
        for comp in parents[keep:]:
            fd = self._open_dir(comp, name_for_errors, create=True)
            self.stack.append(_Open(comp, fd, None))
        return self._top()

    def _open_dir(self, comp: bytes, name: str, create: bool) -> int:
        parent = self._top()
        try:
            return os.open(comp, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise self._not_a_folder(parent, comp, name) from None
            raise
        os.mkdir(comp, 0o700, dir_fd=parent)
        return os.open(comp, _DIR_FLAGS, dir_fd=parent)

    @staticmethod
    def _not_a_folder(parent: int, comp: bytes, name: str) -> HostileEntry:
        st = os.stat(comp, dir_fd=parent, follow_symlinks=False)
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a folder"
        return HostileEntry(f"refused a hostile tar entry: {short_name(name)}: its path "
                            f"crosses '{short_name(comp, 40)}', which is {what}")

    # -- entries ------------------------------------------------------------------

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        """Write one entry (its content read from `tar`)."""
        comps = split_name(member.name)
        if self.deferred is None and not self.seen_any and comps:
            # No root entry first: an archive of an earlier version, whose folders
            # are listed before their entries come (os.walk order). Their
            # metadata waits for the end, as tar does (one record per folder).
            self.deferred = []
        self.seen_any = True
        if comps is None:
            raise HostileEntry(f"refused a hostile tar entry: {short_name(member.name)}: "
                               "absolute names and '..' are never written by drdaemon")
        if not comps:
            if not member.isdir():
                raise HostileEntry("refused a hostile tar entry: the archive's root is not "
                                   "a folder")
            self.root_member = member  # applied in finish(), after everything below it
            return
        *parents, name = comps
        parent = self._enter(parents, member.name)
        try:
            if member.isdir():
                self._add_dir(member, name)
            elif member.isreg():
                self._add_file(tar, member, parent, name)
            elif member.issym():
                os.symlink(member.linkname, name, dir_fd=parent)
                self._apply(member, None, parent, name)
            else:
                raise HostileEntry(f"refused a hostile tar entry: {short_name(member.name)}: "
                                   f"{_kind(member)} are never written by drdaemon")
        except FileExistsError:
            raise HostileEntry(f"refused a hostile tar entry: {short_name(member.name)}: "
                               "it is already in the archive") from None

    def _add_dir(self, member: tarfile.TarInfo, name: bytes) -> None:
        parent = self._top()
        # It may exist, made for an entry below it that came first: the open checks it.
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=parent)
        fd = self._open_dir(name, member.name, create=False)
        self.stack.append(_Open(name, fd, member))

    def _add_file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, parent: int,
                  name: bytes) -> None:
        self.total += member.size
        if self.max_bytes is not None and self.total > self.max_bytes:
            raise HostileEntry(f"refused a hostile tar entry: {short_name(member.name)}: the "
                               f"files hold more than the manifest's {self.max_bytes} bytes")
        fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=parent)
        try:
            if cast(Any, member).sparse is not None:
                _copy_sparse(tar, fd, member)
            else:
                src = tar.extractfile(member)
                assert src is not None
                _copy(src, fd)
            self._apply(member, fd, parent, name)
        finally:
            os.close(fd)

    def _apply(self, member: tarfile.TarInfo, fd: int | None, parent: int,
               name: bytes) -> None:
        meta = meta_of_member(member)
        for note in apply_meta(meta, fd, parent, name, self.not_applied, member.isdir()):
            self.note(f"{short_name(member.name)}: {note}")

    def note(self, text: str) -> None:
        if len(self.notes) < MAX_NOTES:
            self.notes.append(text)

    def finish(self) -> None:
        """Leave every open folder (applying its metadata), then the root's."""
        while self.stack:
            self._leave()
        if self.deferred is not None:
            self._apply_deferred()
        if self.root_member is not None:
            meta = meta_of_member(self.root_member)
            for note in apply_meta(meta, self.root_fd, None, b"", self.not_applied, True):
                self.note(f"the tree's root: {note}")
        for what in sorted(self.not_applied):
            self.note(what)

    def abort(self) -> None:
        """Close what is open, applying nothing."""
        while self.stack:
            os.close(self.stack.pop().fd)


def _kind(member: tarfile.TarInfo) -> str:
    if member.islnk():
        return "hard links"
    if member.ischr() or member.isblk():
        return "device nodes"
    if member.isfifo():
        return "FIFOs"
    return "entries of this type"


def _copy(src: IO[bytes], fd: int) -> None:
    while chunk := src.read(_READ):
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]


def _copy_sparse(tar: tarfile.TarFile, fd: int, member: tarfile.TarInfo) -> None:
    """Write only the data runs of a GNU sparse member: the holes stay holes.

    The runs follow each other in the archive; they are read from the stream
    itself (tarfile's reader of a member cannot seek in a stream)."""
    runs: list[tuple[int, int]] = list(cast(Any, member).sparse or ())
    raw = cast(Any, tar).fileobj
    raw.seek(member.offset_data)
    end = 0
    for offset, length in runs:
        if offset < end or offset + length > member.size:
            raise HostileEntry(f"refused a hostile tar entry: {short_name(member.name)}: "
                               "its sparse map is out of order or reaches past its size")
        end = offset + length
        os.lseek(fd, offset, os.SEEK_SET)
        left = length
        while left > 0:
            chunk = raw.read(min(left, _READ))
            if not chunk:
                raise tarfile.ReadError("unexpected end of data")
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
            left -= len(chunk)
    os.ftruncate(fd, member.size)


def extract(stream: BinaryIO, root: str, notes: list[str],
            max_bytes: int | None = None) -> bool:
    """Extract the tar `stream` into the (empty, private) folder `root`; True when the
    archive had an entry for its root (whose mode was then applied to `root`).

    Raises HostileEntry for an entry that is refused, IntegrityError for a
    damaged stream, SourceError when the target cannot be written.
    """
    root_fd = os.open(root, _DIR_FLAGS)
    ex = Extractor(root_fd, notes, max_bytes)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            while (member := tar.next()) is not None:
                cast(Any, tar).members.clear()  # a stream needs no index: keep memory flat
                ex.add(tar, member)
            ex.finish()
        # Drain any trailing padding so the writer never sees a broken pipe.
        while stream.read(_READ):
            pass
        return ex.root_member is not None
    except HostileEntry:
        ex.abort()
        raise
    except tarfile.TarError as exc:
        ex.abort()
        raise IntegrityError(f"the tar stream is damaged: {exc}") from None
    except OSError as exc:
        ex.abort()
        where = f" ({short_name(os.fsdecode(exc.filename))})" if exc.filename else ""
        raise SourceError(f"cannot write the restore: {exc.strerror or exc}{where}") from None
    finally:
        os.close(root_fd)
