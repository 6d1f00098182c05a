"""Small local state the daemon keeps between runs: each source's last outcome.

Written atomically (temp file, fsync, rename), one JSON file per source, so a
crash never leaves a half-written record and `drctl status` can tell the last
failure without scanning logs.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from . import statefs


@dataclass(frozen=True)
class Outcome:
    """The last attempt of a source, and the last failure if there was one."""

    last_attempt: str | None = None
    last_success: str | None = None
    last_failure: str | None = None
    last_error: str | None = None


def _path(source: str) -> str:
    return f"sources/{source}.json"


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so readers see the old or the new file, never a mix.

    For files outside the state folder (a report the operator names); state
    files go through statefs.write_atomic, which follows no link.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_outcome(state_dir: Path, source: str) -> Outcome:
    """The recorded outcome of `source` (empty if none or unreadable)."""
    try:
        doc: dict[str, Any] = json.loads(statefs.read_bytes(state_dir, _path(source)))
        return Outcome(**{k: doc.get(k) for k in Outcome.__dataclass_fields__})
    except (OSError, ValueError, TypeError):
        return Outcome()


def record_outcome(state_dir: Path, source: str, at: datetime, ok: bool, error: str) -> None:
    """Record one snapshot attempt of `source`."""
    old = read_outcome(state_dir, source)
    stamp = at.isoformat()
    new = Outcome(stamp, stamp if ok else old.last_success,
                  old.last_failure if ok else stamp,
                  (error or None) if not ok else old.last_error)
    statefs.write_atomic(state_dir, _path(source), json.dumps(asdict(new), indent=1).encode())


INFLIGHT = "inflight"


@contextmanager
def inflight(state_dir: Path, snapshot_id: str) -> Iterator[None]:
    """Mark a snapshot's uploads as in flight by this process for the duration.

    If the process is killed (even with SIGKILL) the marker stays and names a
    dead pid: the next start then knows those uploads are abandoned and aborts
    them at once, instead of waiting for them to age out.
    """
    marker = f"{INFLIGHT}/{snapshot_id}"
    statefs.write_atomic(state_dir, marker, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        statefs.unlink(state_dir, marker)


def abandoned_snapshots(state_dir: Path) -> set[str]:
    """Ids of snapshots whose uploading process died (see `forget_abandoned`)."""
    found = set()
    for name in statefs.list_names(state_dir, INFLIGHT):
        try:
            pid = int(statefs.read_bytes(state_dir, f"{INFLIGHT}/{name}").strip())
        except (OSError, ValueError):
            pid = 0
        if pid <= 0 or not _alive(pid):
            found.add(name)
    return found


def live_inflight(state_dir: Path) -> set[str]:
    """Ids of snapshots a live process on this host is uploading right now."""
    markers = set(statefs.list_names(state_dir, INFLIGHT))
    return markers - abandoned_snapshots(state_dir)


def forget_abandoned(state_dir: Path, snapshot_ids: set[str]) -> None:
    """Drop the markers of abandoned snapshots once their uploads are aborted."""
    for snap_id in snapshot_ids:
        statefs.unlink(state_dir, f"{INFLIGHT}/{snap_id}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True
