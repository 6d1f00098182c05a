"""A region on a local (or mounted) filesystem: temp file, fsync, rename."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from .base import (
    AbortRule,
    NotFound,
    ObjectInfo,
    ObjectVersion,
    StorageError,
    check_name,
    read_bounded,
)

_TMP_MARK = ".drdaemon-tmp-"
# Data is flushed to disk as it streams in, every this many bytes. Otherwise the
# kernel holds it all as dirty pages (its background writeback starts only at a
# share of RAM) and the fsync at commit writes the whole object while the
# backup waits; flushed on the way, the disk works while the stream is busy.
FLUSH_AFTER = 64 << 20


def _info(name: str, st: os.stat_result) -> ObjectInfo:
    # Every write is a new file renamed into place: a new inode and mtime.
    return ObjectInfo(name, st.st_size, f"{st.st_mtime_ns}-{st.st_ino}")


class LocalUpload:
    def __init__(self, final: Path) -> None:
        self.final = final
        self.tmp = final.with_name(f"{_TMP_MARK}{final.name}.{secrets.token_hex(4)}")
        _make_private_dirs(final.parent)
        # Owner-only whatever the umask: snapshots are ciphertext, but names,
        # sizes and the audit mirror are nobody else's business (0600 like the
        # local audit log).
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.fh: BinaryIO | None = os.fdopen(fd, "wb")
        self.unflushed = 0

    def write_part(self, data: bytes) -> None:
        assert self.fh is not None, "upload already finished"
        self.fh.write(data)
        self.unflushed += len(data)
        if self.unflushed >= FLUSH_AFTER:
            self.fh.flush()
            os.fdatasync(self.fh.fileno())
            self.unflushed = 0

    def commit(self) -> None:
        assert self.fh is not None, "upload already finished"
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        self.fh = None
        os.replace(self.tmp, self.final)
        _fsync_dir(self.final.parent)

    def abort(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        self.tmp.unlink(missing_ok=True)


class LocalStore:
    """Objects as files under `root/prefix`; uploads are atomic renames."""

    def __init__(self, name: str, root: Path, prefix: str = "") -> None:
        self.name = name
        self.root = root / prefix if prefix else root

    def describe(self) -> str:
        return f"local:{self.root}"

    def _path(self, name: str) -> Path:
        return self.root / check_name(name)

    def begin_upload(self, name: str, retain_until: datetime | None = None) -> LocalUpload:
        # A filesystem has no retention lock: `retain_until` is ignored.
        try:
            return LocalUpload(self._path(name))
        except OSError as exc:
            raise StorageError(f"region {self.name}: cannot write {name}: {exc.strerror}") from None

    def put_bytes(self, name: str, data: bytes, retain_until: datetime | None = None) -> None:
        up = self.begin_upload(name)
        try:
            up.write_part(data)
            up.commit()
        except OSError as exc:
            up.abort()
            raise StorageError(f"region {self.name}: cannot write {name}: {exc.strerror}") from None

    def _object(self, name: str) -> Path:
        """The file behind an object; a folder or a path through a file is not one."""
        path = self._path(name)
        try:
            is_file = path.is_file()
        except OSError:
            is_file = False
        if not is_file:
            raise NotFound(f"region {self.name}: {name} not found")
        return path

    def open_read(self, name: str, length: int | None = None) -> BinaryIO:
        # A file's first bytes are read as cheaply as any: `length` needs nothing here.
        path = self._object(name)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise NotFound(f"region {self.name}: {name} not found") from None
        except OSError as exc:
            raise StorageError(f"region {self.name}: cannot read {name}: {exc.strerror}") from None

    def get_bytes(self, name: str, max_size: int) -> bytes:
        return read_bounded(self, name, max_size)

    def stat(self, name: str) -> ObjectInfo:
        try:
            return _info(name, self._object(name).stat())
        except FileNotFoundError:
            raise NotFound(f"region {self.name}: {name} not found") from None

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self.root / prefix.rstrip("/") if prefix else self.root
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            for fname in sorted(files):
                if fname.startswith(_TMP_MARK):
                    continue
                full = Path(dirpath) / fname
                yield _info(full.relative_to(self.root).as_posix(), full.stat())

    def delete(self, name: str) -> None:
        # Deleting what is not there is not an error, as on S3.
        with contextlib.suppress(NotFound):
            self._object(name).unlink(missing_ok=True)

    def list_versions(self, prefix: str) -> Iterator[ObjectVersion]:
        # A filesystem keeps no versions: each file is its own only version.
        for info in self.list(prefix):
            yield ObjectVersion(info.name, "", info.size)

    def delete_version(self, name: str, version_id: str) -> None:
        if version_id:
            raise StorageError(f"region {self.name}: {name} has no version {version_id!r} "
                               "(a local region keeps no versions)")
        self.delete(name)

    def version_retained_until(self, name: str, version_id: str) -> datetime | None:
        return self.retained_until(name)

    def retained_until(self, name: str) -> datetime | None:
        check_name(name)
        return None  # a filesystem has no retention lock

    def set_legal_hold(self, name: str, on: bool) -> bool:
        check_name(name)
        return False  # nor legal holds

    def cleanup_incomplete(self, should_abort: AbortRule) -> int:
        if not self.root.is_dir():
            return 0
        removed = 0
        for tmp in self.root.rglob(f"{_TMP_MARK}*"):
            # ".drdaemon-tmp-<final name>.<random>" -> the object it would become
            final = tmp.with_name(tmp.name[len(_TMP_MARK):].rsplit(".", 1)[0])
            begun = datetime.fromtimestamp(tmp.stat().st_mtime, UTC)
            if tmp.is_file() and should_abort(final.relative_to(self.root).as_posix(), begun):
                tmp.unlink(missing_ok=True)
                removed += 1
        return removed


def _make_private_dirs(folder: Path) -> None:
    """Make `folder` and every missing folder above it 0700 (os.makedirs would give
    the folders above the umask's mode)."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
