"""Walking a directory tree, and the tree's digest.

The walk is depth first, each folder's entries sorted by their bytes, the root
first (as ""). It goes from folder descriptor to folder descriptor (`openat`
style, never following a link): paths longer than PATH_MAX are no problem, and
a folder swapped for a link during the walk is never entered. Only the folders
on the current path are open, and only their listings are held: memory is
flat in the number of entries (it grows with the largest single folder).

The digest (docs/format.md) is computed in walk order, one line per entry, as
the walk goes: nothing is kept per entry.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import SourceError
from .tree_meta import Meta, name_text, read_meta, restorable_mode, short_name

DIGEST_PREFIX = "tree2:sha256:"  # the digest of docs/format.md; "sha256:" is version 1
MAX_LISTED = 50
_READ = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in for a file must not block the open.
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
VANISHED = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


@dataclass
class Found:
    """One entry of the walk: its path below the root ('/'-joined, "" for the root),
    its name in the folder `dir_fd` (the root: "." in its own descriptor), and lstat."""

    rel: str
    dir_fd: int
    name: str
    st: os.stat_result


@dataclass
class Skipped:
    """Paths the walk left out, by reason, as name_text (at most MAX_LISTED each), and counts."""

    lists: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, why: str, rel: str) -> None:
        self.counts[why] = self.counts.get(why, 0) + 1
        listed = self.lists.setdefault(why, [])
        if len(listed) < MAX_LISTED:
            listed.append(name_text(rel))


def describe(rel: str, exc: OSError) -> str:
    """One short line for a path's error: its start and end, never 4 KB of name."""
    return f"{short_name(rel or '.')}: {exc.strerror or exc}"


@dataclass
class _Frame:
    rel: str
    fd: int
    names: Iterator[str]
    restore_mode: int | None = None  # a folder opened up for reading, closed again on leaving


class Walk:
    """The entries below `root` (see the module's docstring).

    `on_problem(rel, exc)` decides about an entry that cannot be read (not one
    that vanished): raise to stop, return to skip it. `force_read` (a restored
    tree, owned by this user) opens up 0000 folders and files for reading and
    sets their mode back afterwards.
    """

    def __init__(self, root: str, on_problem: Callable[[str, OSError], None],
                 force_read: bool = False) -> None:
        self.root = root
        self.on_problem = on_problem
        self.force_read = force_read
        self.skipped = Skipped()
        self.stack: list[_Frame] = []
        self._skip_children = False

    def skip_children(self) -> None:
        """Do not enter the folder just yielded (its consumer could not read it)."""
        self._skip_children = True

    def __iter__(self) -> Iterator[Found]:
        root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            st = os.fstat(root_fd)
            yield Found("", root_fd, ".", st)
            self._push("", root_fd, st, own_fd=False)
            while self.stack:
                frame = self.stack[-1]
                name = next(frame.names, None)
                if name is None:
                    self._pop()
                    continue
                rel = f"{frame.rel}/{name}" if frame.rel else name
                try:
                    st = os.stat(name, dir_fd=frame.fd, follow_symlinks=False)
                except OSError as exc:
                    self._problem(rel, exc)
                    continue
                self._skip_children = False
                yield Found(rel, frame.fd, name, st)
                if stat.S_ISDIR(st.st_mode) and not self._skip_children:
                    self._enter(frame.fd, name, rel, st)
        finally:
            while self.stack:
                self._pop()
            os.close(root_fd)

    def _problem(self, rel: str, exc: OSError) -> None:
        if exc.errno in VANISHED:
            self.skipped.add("vanished_during_backup", rel)
        else:
            self.on_problem(rel, exc)
            self.skipped.add("unreadable", rel)

    def _enter(self, parent: int, name: str, rel: str, st: os.stat_result) -> None:
        try:
            fd, old_mode = self.open_entry(parent, name, st, _DIR_FLAGS)
        except OSError as exc:
            self._problem(rel, exc)
            return
        self._push(rel, fd, st, own_fd=True, restore_mode=old_mode)

    def _push(self, rel: str, fd: int, st: os.stat_result, own_fd: bool,
              restore_mode: int | None = None) -> None:
        try:
            if self.force_read and restore_mode is None and not st.st_mode & stat.S_IXUSR:
                restore_mode = stat.S_IMODE(st.st_mode)
                os.fchmod(fd, restore_mode | 0o700)
            names = sorted(os.listdir(fd), key=os.fsencode)
        except OSError as exc:
            if own_fd:
                os.close(fd)
            self._problem(rel, exc)
            return
        self.stack.append(_Frame(rel, fd if own_fd else os.dup(fd), iter(names), restore_mode))

    def _pop(self) -> None:
        frame = self.stack.pop()
        try:
            if frame.restore_mode is not None:
                os.fchmod(frame.fd, frame.restore_mode)
        finally:
            os.close(frame.fd)

    def open_entry(self, parent: int, name: str, st: os.stat_result,
                   flags: int) -> tuple[int, int | None]:
        """Open an entry of the walk without following links; with `force_read`, a
        file or folder this user owns but cannot read is opened up for it (the old
        mode is returned, to be set back when done)."""
        try:
            return os.open(name, flags, dir_fd=parent), None
        except PermissionError:
            if not self.force_read or st.st_uid != os.geteuid():
                raise
        old = stat.S_IMODE(st.st_mode)
        os.chmod(name, old | (0o700 if stat.S_ISDIR(st.st_mode) else 0o400), dir_fd=parent,
                 follow_symlinks=False)
        try:
            return os.open(name, flags, dir_fd=parent), old
        except OSError:
            os.chmod(name, old, dir_fd=parent, follow_symlinks=False)
            raise


def raise_problem(rel: str, exc: OSError) -> None:
    """`on_problem` of a walk that fails on the first unreadable entry."""
    raise SourceError(f"cannot read {describe(rel, exc)}") from None


# -- the digest (docs/format.md, "The tree digest") -------------------------------------


class TreeDigest:
    """Counts and the digest of a tree, fed one entry at a time in walk order."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.owners = hashlib.sha256()
        self.counts = {"files": 0, "directories": 0, "symlinks": 0, "bytes": 0}

    def add(self, kind: str, rel: str, meta: Meta, size: int = 0, ref: str = "") -> None:
        """One entry: kind "d", "f" or "l"; `ref` the content sha256 (files) or the link
        target (links, as name_text); for the root, `rel` is ""."""
        if rel:
            key = {"d": "directories", "f": "files", "l": "symlinks"}[kind]
            self.counts[key] += 1
            self.counts["bytes"] += size
        mode = 0 if kind == "l" else restorable_mode(meta.mode, kind == "d")
        line = [kind, name_text(rel), size, ref, f"{mode:04o}", meta.mtime_ns,
                [[a, base64.b64encode(v).decode()] for a, v in meta.xattrs],
                meta.acl_access, meta.acl_default]
        self.sha.update(json.dumps(line, ensure_ascii=False).encode() + b"\n")
        owner = [name_text(rel), meta.uid, meta.gid]
        self.owners.update(json.dumps(owner, ensure_ascii=False).encode() + b"\n")

    def facts(self) -> dict[str, Any]:
        return {**self.counts, "digest": DIGEST_PREFIX + self.sha.hexdigest(),
                "owner_digest": "sha256:" + self.owners.hexdigest()}


def data_regions(fd: int, size: int, limit: int = 100_000) -> list[tuple[int, int]] | None:
    """The (offset, length) runs of a file that hold data, found with SEEK_DATA/SEEK_HOLE;
    None when the file system cannot tell, or it has more than `limit` runs."""
    regions: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # nothing but a hole to the end
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            regions.append((start, end - start))
            if len(regions) > limit:
                return None
            pos = end
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOTSUP):
            return None
        raise
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    return regions


ZEROS = bytes(_READ)


def hash_zeros(sha: Any, n: int) -> None:
    """Feed `n` zero bytes (a hole) to `sha` without reading them."""
    while n > 0:
        step = min(n, _READ)
        sha.update(memoryview(ZEROS)[:step])
        n -= step


def hash_fd(fd: int) -> tuple[int, str]:
    """(size, sha256 hex) of an open file's content, holes hashed as zeros unread."""
    sha = hashlib.sha256()
    size = os.fstat(fd).st_size
    regions = data_regions(fd, size)
    if regions is None:
        regions = [(0, size)]
    pos = 0
    for start, length in regions:
        hash_zeros(sha, start - pos)
        os.lseek(fd, start, os.SEEK_SET)
        left = length
        while left > 0 and (chunk := os.read(fd, min(left, _READ))):
            sha.update(chunk)
            left -= len(chunk)
        pos = start + length - left
    hash_zeros(sha, size - pos)
    return size, sha.hexdigest()


def scan_tree(root: str, force_read: bool = False) -> dict[str, Any]:
    """The facts (counts, digest, owner digest) of an on-disk tree, read back."""
    walk = Walk(root, raise_problem, force_read)
    digest = TreeDigest()
    for found in walk:
        st = found.st
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(found.name, dir_fd=found.dir_fd)
            digest.add("l", found.rel, read_meta(st, None), ref=name_text(target))
        elif stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
            is_dir = stat.S_ISDIR(st.st_mode)
            flags = _DIR_FLAGS if is_dir else FILE_FLAGS
            fd, old = walk.open_entry(found.dir_fd, found.name, st, flags)
            try:
                meta = read_meta(st, fd)
                size, sha = (0, "") if is_dir else hash_fd(fd)
            finally:
                os.close(fd)
                if old is not None:
                    os.chmod(found.name, old, dir_fd=found.dir_fd, follow_symlinks=False)
            digest.add("d" if is_dir else "f", found.rel, meta, size, sha)
    return digest.facts()
