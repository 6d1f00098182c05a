"""The files of a tenant export on disk: the sink a snapshot is streamed into
(plaintext, or age of it), the small side files, the private staging folder,
reading everything back, and the rename into place. The export service is
export.py; what the files say, export_doc.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, cast

import pyrage
from pyrage import x25519

from .errors import DrError
from .export_doc import (
    CONTENTS_SUMS_FILE,
    MANIFEST_FILE,
    README_FILE,
    SUMS_FILE,
    ExportedSource,
    manifest_doc,
    readme_text,
    sha256sums,
)
from .streams import ThreadPipe

_READ = 1 << 20


# -- checked files --------------------------------------------------------------------

class _Hashing(io.RawIOBase):
    """Writes through to `inner`, counting and hashing, keeping the first 512 bytes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.sha = hashlib.sha256()
        self.count = 0
        self.head = b""

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        if len(self.head) < 512:
            self.head += chunk[:512 - len(self.head)]
        self.inner.write(chunk)
        self.sha.update(chunk)
        self.count += len(chunk)
        return len(chunk)


class FileSink:
    """A restore.Sink that writes one export file (0600): the plaintext, or age of it.

    With a recipient, the plaintext goes through a pipe to age's encryptor in a
    thread and only ciphertext reaches the file.
    """

    def __init__(self, path: Path, recipient: x25519.Recipient | None) -> None:
        self.path = path
        self.notes: list[str] = []
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file = os.fdopen(fd, "wb", buffering=_READ)
        self.stored = _Hashing(self._file)
        self._pipe: ThreadPipe | None = None
        if recipient is None:
            self.plain = _Hashing(self.stored)
        else:
            stored = self.stored
            self._pipe = ThreadPipe(lambda r: pyrage.encrypt_io(r, stored, [recipient]),
                                    thread_writes=False, name="export-age")
            self.plain = _Hashing(self._pipe.theirs)
        self.writer = cast(BinaryIO, self.plain)

    def complete(self) -> None:
        """End the stream; raise if the encryptor or the disk failed."""
        if self._pipe is not None:
            self._pipe.join()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def commit(self) -> str:
        return str(self.path)

    def discard(self) -> None:
        if self._pipe is not None:
            with contextlib.suppress(Exception):
                self._pipe.join()
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def hash_file(path: Path) -> tuple[str, int]:
    """(sha256, size) of a file as it is on disk."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_READ), b""):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def write_small(path: Path, data: bytes, recipient: x25519.Recipient | None) -> str:
    """Write a small file (age-encrypted in memory when there is a recipient); its sha256."""
    stored = data if recipient is None else pyrage.encrypt(data, [recipient])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(stored)
        fh.flush()
        os.fsync(fh.fileno())
    return hashlib.sha256(stored).hexdigest()


def verify_written(staging: Path, expected: Mapping[str, str]) -> None:
    """Read every written file back and compare its sha256 with what was written."""
    present = sorted(p.name for p in staging.iterdir())
    if present != sorted(expected):
        raise DrError(f"the export folder holds {present}, expected {sorted(expected)}")
    for name, sha in expected.items():
        got, _ = hash_file(staging / name)
        if got != sha:
            raise DrError(f"{name} read back does not match what was written (sha256 "
                          f"{got[:16]}..., wrote {sha[:16]}...): the disk lost data")


def write_side_files(staging: Path, tenant: str, exported: Sequence[ExportedSource],
                      recipient: x25519.Recipient | None, recipient_fp: str | None,
                      now: datetime, not_included: Sequence[str] = ()) -> dict[str, str]:
    """MANIFEST.json, README.txt, SHA256SUMS (and CONTENTS.SHA256SUMS); every file's sha256."""
    enc = ".age" if recipient is not None else ""
    doc = manifest_doc(tenant, exported, now, recipient_fp, not_included)
    body = json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False).encode() + b"\n"
    stored = {s.stored_as: s.stored_sha256 for s in exported}
    plain = {s.file: s.sha256 for s in exported}
    plain[MANIFEST_FILE] = hashlib.sha256(body).hexdigest()
    stored[MANIFEST_FILE + enc] = write_small(staging / (MANIFEST_FILE + enc), body, recipient)
    if recipient is not None:
        stored[CONTENTS_SUMS_FILE + enc] = write_small(
            staging / (CONTENTS_SUMS_FILE + enc), sha256sums(plain).encode(), recipient)
    readme = readme_text(tenant, exported, recipient is not None).encode()
    stored[README_FILE] = write_small(staging / README_FILE, readme, None)
    stored[SUMS_FILE] = write_small(staging / SUMS_FILE, sha256sums(stored).encode(), None)
    return stored


def staging_for(dest: Path) -> Path:
    """A private staging folder beside `dest`; its name carries this process's id so that
    a later export can tell the leftovers of a killed one (remove_stale_staging)."""
    staging = dest.parent / (f".{dest.name}.drdaemon-export-{os.getpid()}-"
                             f"{secrets.token_hex(4)}.partial")
    staging.mkdir(mode=0o700)
    return staging


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_staging(dest: Path) -> list[str]:
    """Remove the staging folders beside `dest` that a killed export left (kill -9 gives
    it no chance; they may hold plaintext): ours, not links, their process gone.
    Returns the names removed."""
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.drdaemon-export-(\d+)-[0-9a-f]{{8}}"
                         r"\.partial\Z")
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(dest.parent):
            m = pattern.match(entry.name)
            if m is None or _alive(int(m.group(1))):
                continue
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                continue
            shutil.rmtree(entry.path)
            removed.append(entry.name)
    return removed


def move_into_place(staging: Path, dest: Path) -> None:
    """Rename the verified staging folder to `dest` (rename(2) replaces an empty folder)."""
    try:
        os.rename(staging, dest)
    except OSError as exc:
        raise DrError(f"cannot move the export into {dest}: {exc.strerror or exc} (is it "
                      "still an empty folder?)") from None
    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
