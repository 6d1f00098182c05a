"""Writing a directory tree as a pax tar stream, with its digest, as it is walked.

One pass over the tree (tree_walk.Walk): each entry's header carries its
metadata (tree_meta), each file's content is read once, and the digest line of
each entry is added in the same order. Entries that vanish or are replaced
during the walk are skipped and listed, like tar does; an unreadable entry
fails the backup or, with `on_unreadable = "skip"`, is skipped and listed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

from .tree_meta import name_text, read_meta, to_member
from .tree_walk import (
    FILE_FLAGS,
    MAX_LISTED,
    VANISHED,
    Found,
    TreeDigest,
    Walk,
    data_regions,
    describe,
    hash_zeros,
    raise_problem,
)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = 1 << 20


class _FileReader:
    """Reads exactly `size` bytes of a file that may change while we read it.

    tar needs the size up front; a file that grows is cut at that size and one
    that shrinks is padded with zeros, and either is reported in the facts.
    """

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.left = fd, size
        self.sha = hashlib.sha256()
        self.changed = False

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = os.read(self.fd, n) if n else b""
        while data and len(data) < n:  # os.read may return less than asked
            more = os.read(self.fd, n - len(data))
            if not more:
                break
            data += more
        if len(data) < n:
            self.changed = True
            data += b"\0" * (n - len(data))
        self.left -= len(data)
        if self.left == 0 and not self.changed and os.read(self.fd, 1):
            self.changed = True
        self.sha.update(data)
        return data


class _SparseReader:
    """The data of a GNU sparse 1.0 member: its map (the data runs, in decimal lines,
    padded to a 512-byte block), then the bytes of each run. Hashes the whole
    content, holes as zeros, without reading them; a file that shrinks while read
    is padded with zeros and reported, like _FileReader."""

    def __init__(self, fd: int, size: int, regions: list[tuple[int, int]]) -> None:
        runs = list(regions)
        if not runs or sum(runs[-1]) < size:
            runs.append((size, 0))  # GNU tar's mark of a hole at the end
        text = f"{len(runs)}\n" + "".join(f"{o}\n{n}\n" for o, n in runs)
        self.map = text.encode().ljust(-(-len(text) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE,
                                       b"\0")
        self.data_size = sum(n for _, n in runs)
        self.fd, self.size, self.runs = fd, size, runs
        self.sha = hashlib.sha256()
        self.changed = False
        self._parts = self._generate()
        self._buf = b""

    def _generate(self) -> Iterator[bytes]:
        yield self.map
        pos = 0
        for start, length in self.runs:
            hash_zeros(self.sha, start - pos)
            off, end = start, start + length
            while off < end:
                data = os.pread(self.fd, min(_READ, end - off), off)
                if not data:
                    self.changed = True
                    data = bytes(min(_READ, end - off))
                self.sha.update(data)
                off += len(data)
                yield data
            pos = end
        hash_zeros(self.sha, self.size - pos)
        if os.fstat(self.fd).st_size != self.size:
            self.changed = True

    def drain(self) -> None:
        """Hash the hole at the end and look at the size again, once the data was read."""
        for _ in self._parts:
            pass

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            part = next(self._parts, None)
            if part is None:
                break
            self._buf += part
        if n < 0:
            n = len(self._buf)
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


@dataclass
class _Lists:
    changed: list[str] = field(default_factory=list)
    special: list[str] = field(default_factory=list)
    changed_count: int = 0
    special_count: int = 0


class TreeWriter:
    """Writes the tree at `root` to `out` (see the module's docstring)."""

    def __init__(self, root: str, out: BinaryIO, on_unreadable: str = "fail") -> None:
        self.out = out
        self.walk = Walk(root, raise_problem if on_unreadable == "fail" else _skip)
        self.digest = TreeDigest()
        self.lists = _Lists()
        self.sparse = 0  # files stored with their holes

    def run(self) -> dict[str, Any]:
        with tarfile.open(fileobj=self.out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for found in self.walk:
                self._entry(tar, found)
                cast(Any, tar).members.clear()  # no index of what was written: flat memory
        return self.facts()

    def facts(self) -> dict[str, Any]:
        facts = self.digest.facts()
        facts["changed_during_backup"] = self.lists.changed
        facts["skipped_special_files"] = self.lists.special
        skipped = self.walk.skipped
        facts["vanished_during_backup"] = skipped.lists.get("vanished_during_backup", [])
        facts["skipped_unreadable"] = skipped.lists.get("unreadable", [])
        facts["sparse_files"] = self.sparse
        facts["counts"] = {
            "changed_during_backup": self.lists.changed_count,
            "skipped_special_files": self.lists.special_count,
            "vanished_during_backup": skipped.counts.get("vanished_during_backup", 0),
            "skipped_unreadable": skipped.counts.get("unreadable", 0),
        }
        return facts

    def _entry(self, tar: tarfile.TarFile, found: Found) -> None:
        st = found.st
        if stat.S_ISDIR(st.st_mode):
            self._dir(tar, found)
        elif stat.S_ISLNK(st.st_mode):
            self._link(tar, found)
        elif stat.S_ISREG(st.st_mode):
            self._file(tar, found)
        else:  # sockets, FIFOs, devices: not data
            self.lists.special_count += 1
            if len(self.lists.special) < MAX_LISTED:
                self.lists.special.append(name_text(found.rel))

    def _open(self, found: Found, flags: int) -> int | None:
        """The entry opened without following links; None if it is to be skipped."""
        try:
            fd = os.open(found.name, flags, dir_fd=found.dir_fd)
        except OSError as exc:
            if exc.errno in VANISHED:
                self.walk.skipped.add("vanished_during_backup", found.rel)
            else:
                self.walk.on_problem(found.rel, exc)
                self.walk.skipped.add("unreadable", found.rel)
            return None
        return fd

    def _dir(self, tar: tarfile.TarFile, found: Found) -> None:
        fd = self._open(found, _DIR_FLAGS)
        if fd is None:
            self.walk.skip_children()
            return
        try:
            meta = read_meta(found.st, fd)
        finally:
            os.close(fd)
        info = tarfile.TarInfo(found.rel or ".")
        info.type = tarfile.DIRTYPE
        to_member(info, meta)
        tar.addfile(info)
        self.digest.add("d", found.rel, meta)

    def _link(self, tar: tarfile.TarFile, found: Found) -> None:
        try:
            target = os.readlink(found.name, dir_fd=found.dir_fd)
        except OSError as exc:
            if exc.errno in (*VANISHED, errno.EINVAL):  # EINVAL: no longer a link
                self.walk.skipped.add("vanished_during_backup", found.rel)
            else:
                self.walk.on_problem(found.rel, exc)
                self.walk.skipped.add("unreadable", found.rel)
            return
        meta = read_meta(found.st, None)
        info = tarfile.TarInfo(found.rel)
        info.type, info.linkname = tarfile.SYMTYPE, target
        to_member(info, meta)
        tar.addfile(info)
        self.digest.add("l", found.rel, meta, ref=name_text(target))

    def _file(self, tar: tarfile.TarFile, found: Found) -> None:
        fd = self._open(found, FILE_FLAGS)
        if fd is None:
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # replaced since the walk saw it
                self.walk.skipped.add("vanished_during_backup", found.rel)
                return
            meta = read_meta(st, fd)
            info = tarfile.TarInfo(found.rel)
            info.type, info.size = tarfile.REGTYPE, st.st_size
            to_member(info, meta)
            reader = self._reader(info, fd, st)
            try:
                tar.addfile(info, cast(BinaryIO, reader))
                if isinstance(reader, _SparseReader):
                    reader.drain()
            except OSError as exc:
                # A read error mid-file cannot be skipped: the header is written.
                raise OSError(exc.errno, describe(found.rel, exc)) from None
        finally:
            os.close(fd)
        self.digest.add("f", found.rel, meta, st.st_size, reader.sha.hexdigest())
        if reader.changed:
            self.lists.changed_count += 1
            if len(self.lists.changed) < MAX_LISTED:
                self.lists.changed.append(name_text(found.rel))


    def _reader(self, info: tarfile.TarInfo, fd: int,
                st: os.stat_result) -> _FileReader | _SparseReader:
        """A plain reader, or for a file with holes a GNU sparse 1.0 member (docs/format.md)."""
        if st.st_blocks * 512 >= st.st_size:
            return _FileReader(fd, st.st_size)
        regions = data_regions(fd, st.st_size)
        if regions is None or sum(n for _, n in regions) >= st.st_size:
            return _FileReader(fd, st.st_size)
        reader = _SparseReader(fd, st.st_size, regions)
        self.sparse += 1
        # The header names a stand-in (short and ASCII, so that no pax `path`
        # overrides the real name) that tools without sparse support extract.
        info.pax_headers = {**info.pax_headers, "GNU.sparse.major": "1",
                            "GNU.sparse.minor": "0", "GNU.sparse.name": info.name,
                            "GNU.sparse.realsize": str(st.st_size)}
        info.name = f"GNUSparseFile.0/{self.sparse}"
        info.size = len(reader.map) + reader.data_size
        return reader


def _skip(rel: str, exc: OSError) -> None:
    """`on_problem` of `on_unreadable = "skip"`: the walk lists the entry."""

