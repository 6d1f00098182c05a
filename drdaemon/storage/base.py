"""The storage protocol every region backend implements.

Deliberately small (after restic's backend and borgstore): streamed uploads
that are invisible until committed, streamed reads, stat, list and delete;
for erasure, the object versions of a versioned bucket (list, lock, delete).
Object names are relative to the region's prefix and validated here, once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import BinaryIO, Protocol

from ..errors import DrError, UsageError


class StorageError(DrError):
    """A region could not complete an operation (unreachable, denied, ...)."""


class NotFound(StorageError):
    """The named object does not exist in this region."""


class TooLarge(StorageError):
    """The object is larger than the reader accepts (read_bounded)."""


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int
    # Changes whenever the object is written again (S3: its ETag; local: mtime
    # and inode), "" where unknown. Not part of equality: listings of one
    # object at different moments describe the same object.
    version: str = field(default="", compare=False)


@dataclass(frozen=True)
class ObjectVersion:
    """One stored version of an object, or a delete marker (versioned S3 buckets).

    Stores without versions report each object once, as its only, latest
    version with `version_id` "".
    """

    name: str
    version_id: str
    size: int = 0
    delete_marker: bool = False
    latest: bool = True


def check_name(name: str) -> str:
    """Validate an object name: relative, no empty, '.' or '..' parts."""
    if not name or name.startswith("/") or "\\" in name or "\0" in name:
        raise UsageError(f"invalid object name {name!r}")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise UsageError(f"invalid object name {name!r}")
    return name


def read_bounded(store: ObjectStore, name: str, max_size: int) -> bytes:
    """A whole small object, refusing one larger than `max_size` (untrusted storage)."""
    with store.open_read(name) as fh:
        data = fh.read(max_size + 1)
    if len(data) > max_size:
        raise TooLarge(f"region {store.name}: {name} is larger than {max_size} bytes")
    return data


def read_head(store: ObjectStore, name: str, size: int) -> bytes:
    """At most the first `size` bytes of an object, fetched as such (an S3 ranged GET):
    for reading an age header without downloading the snapshot behind it."""
    with store.open_read(name, length=size) as fh:
        return fh.read(size)


# (object name the upload would create, when it began) -> abort it?
AbortRule = Callable[[str, datetime], bool]


class Upload(Protocol):
    """A streamed upload: parts in order, then commit or abort. Nothing is
    visible under the name before `commit` returns."""

    def write_part(self, data: bytes) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class ObjectStore(Protocol):
    """One region's object storage."""

    name: str

    # `retain_until`: where the region supports it (S3 Object Lock), the object
    # is stored in COMPLIANCE mode until then, so that nobody - not even this
    # daemon with its own credentials - can delete it earlier. Stores without
    # such a lock ignore it.
    def begin_upload(self, name: str, retain_until: datetime | None = None) -> Upload: ...

    def put_bytes(self, name: str, data: bytes, retain_until: datetime | None = None) -> None: ...

    # `length`: the reader wants at most that many bytes from the start (read_head);
    # a store may then fetch only those (S3: a ranged GET).
    def open_read(self, name: str, length: int | None = None) -> BinaryIO: ...

    def get_bytes(self, name: str, max_size: int) -> bytes: ...

    def stat(self, name: str) -> ObjectInfo: ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...

    def delete(self, name: str) -> None: ...

    # Every version of every object under `prefix`, delete markers included
    # (erasure must reach noncurrent versions, which `list` does not show).
    def list_versions(self, prefix: str) -> Iterator[ObjectVersion]: ...

    def delete_version(self, name: str, version_id: str) -> None:
        """Remove one version (or delete marker) for good; missing is fine.

        Unlike `delete`, which in a versioned bucket only adds a delete marker.
        A version under Object Lock is refused by the store (StorageError).
        """
        ...

    def version_retained_until(self, name: str, version_id: str) -> datetime | None:
        """The lock retain-until date of one version (aware, UTC), as `retained_until`."""
        ...

    def retained_until(self, name: str) -> datetime | None:
        """The object's lock retain-until date (aware, UTC).

        None if the object has no lock, does not exist, or the store has no locks.
        """
        ...

    def set_legal_hold(self, name: str, on: bool) -> bool:
        """Put (or lift) an S3 legal hold on the object; False where the store has none.

        A legal hold keeps the object from deletion, whatever its retention,
        until it is lifted; only buckets with Object Lock have them.
        """
        ...

    def cleanup_incomplete(self, should_abort: AbortRule) -> int:
        """Abort the incomplete uploads for which `should_abort(name, begun)` holds."""
        ...

    def describe(self) -> str: ...
