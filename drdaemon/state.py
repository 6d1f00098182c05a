"""Small state the daemon keeps between runs: each source's last outcome.

One JSON document per source (`sources/<source>.json`), in the state folder or,
with `[daemon] lock_dsn`, in the cluster's shared state (shared_state.py), so the
host that takes over retries what the old active left failed. Each change is a
read-modify-write under the store's lock, so a crash never leaves a half-written
record and `drctl status` can tell the last
failure without scanning logs. The start of every attempt is written too: an
attempt that started and never recorded an end (SIGKILL, power loss, a daemon
that gave up waiting at shutdown) is an unfinished attempt, which the next
daemon retries like a failed one.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from . import shared_state, statefs


@dataclass(frozen=True)
class Outcome:
    """The last attempt of a source, and the last failure if there was one."""

    last_attempt: str | None = None
    last_success: str | None = None
    last_failure: str | None = None
    last_error: str | None = None
    last_started: str | None = None  # start of the newest attempt, finished or not
    failures: int = 0  # consecutive failed attempts since the last success
    started_pid: int | None = None  # the process that began the newest attempt
    started_host: str | None = None  # where it runs (a pid means nothing elsewhere)
    running: bool = False  # not stored: that attempt is still open in a live process

    @property
    def open(self) -> bool:
        """The newest attempt has begun and has recorded no end yet."""
        return self.last_started is not None and (
            self.last_attempt is None or _when(self.last_started) > _when(self.last_attempt))

    @property
    def unfinished(self) -> bool:
        """The newest attempt began and its process ended without recording an outcome."""
        return self.open and not self.running

    @property
    def pending_retry(self) -> bool:
        """The newest attempt failed or never finished, and nothing succeeded since."""
        if self.unfinished:
            return True
        return self.last_attempt is not None and self.last_attempt != self.last_success

    @property
    def failed_attempts(self) -> int:
        """Consecutive failed attempts, an unfinished one included."""
        return self.failures + (1 if self.unfinished else 0)

    @property
    def failed_at(self) -> datetime | None:
        """When the attempt a retry is pending for ended (or, unfinished, began)."""
        if self.unfinished:
            return _when(self.last_started)
        if self.pending_retry and self.last_failure:
            return _when(self.last_failure)
        return None


def _when(stamp: str | None) -> datetime:
    return datetime.fromisoformat(stamp or "")


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


_HOST = socket.gethostname()


def parse_outcome(raw: bytes | None) -> Outcome:
    """Pure: a stored outcome document (empty if none or unreadable), `running` unset."""
    if raw is None:
        return Outcome()
    try:
        doc: dict[str, Any] = json.loads(raw)
        fields = {k: doc[k] for k in Outcome.__dataclass_fields__ if k in doc and k != "running"}
        out = Outcome(**fields)
        for stamp in (out.last_attempt, out.last_started, out.last_failure):
            if stamp is not None:
                _when(stamp)  # an unparseable stamp makes the record unreadable
        if not isinstance(out.failures, int) or not isinstance(out.started_pid, int | None):
            return Outcome()
        return out
    except (ValueError, TypeError, AttributeError):
        return Outcome()


def read_outcome(state_dir: Path, source: str) -> Outcome:
    """The recorded outcome of `source` (empty if none or unreadable); `running` when
    its open attempt's process is alive on this host."""
    try:
        out = parse_outcome(shared_state.at(state_dir).read(statefs.outcome_file(source)))
    except OSError:
        return Outcome()
    here = out.started_host in (None, _HOST)
    if out.open and here and out.started_pid is not None and _alive(out.started_pid):
        return replace(out, running=True)
    return out


def _update(state_dir: Path, source: str, change: Callable[[Outcome], Outcome]) -> None:
    def write(raw: bytes | None) -> bytes:
        doc = asdict(change(parse_outcome(raw)))
        del doc["running"]
        return json.dumps(doc, indent=1).encode()

    shared_state.at(state_dir).update(statefs.outcome_file(source), write)


def record_start(state_dir: Path, source: str, at: datetime) -> None:
    """Record that an attempt of `source` begins now in this process (see Outcome.unfinished)."""
    _update(state_dir, source, lambda old: replace(
        old, last_started=at.isoformat(), started_pid=os.getpid(), started_host=_HOST))


def record_outcome(state_dir: Path, source: str, at: datetime, ok: bool, error: str) -> None:
    """Record the end of one snapshot attempt of `source`."""
    stamp = at.isoformat()

    def ended(old: Outcome) -> Outcome:
        return Outcome(stamp, stamp if ok else old.last_success,
                       old.last_failure if ok else stamp,
                       (error or None) if not ok else old.last_error,
                       # An end stamped before its start (a clock step) must not look
                       # unfinished.
                       min(old.last_started, stamp, key=_when) if old.last_started else None,
                       0 if ok else old.failures + 1, old.started_pid, old.started_host)

    _update(state_dir, source, ended)


@dataclass(frozen=True)
class InflightMarker:
    """Who uploads a snapshot: its process id, and (from this version on) the owner
    token that also names its start time and host (drills/scratch.py) and its source."""

    snapshot_id: str
    pid: int
    owner: str = ""
    source: str = ""


@contextmanager
def inflight(state_dir: Path, snapshot_id: str, owner: str = "",
             source: str = "") -> Iterator[None]:
    """Mark a snapshot's uploads as in flight by this process for the duration.

    If the process is killed (even with SIGKILL) the marker stays and names a
    dead process: the next daemon start, or the next `drctl backup` of the same
    `source` (uploads.py), then knows those uploads are abandoned and aborts them
    at once, instead of waiting for them to age out. Lines: pid, `owner`, `source`.
    """
    marker = statefs.inflight_marker(snapshot_id)
    statefs.write_atomic(state_dir, marker, f"{os.getpid()}\n{owner}\n{source}\n".encode())
    try:
        yield
    finally:
        statefs.unlink(state_dir, marker)


def inflight_markers(state_dir: Path) -> list[InflightMarker]:
    """Every in-flight marker (pid 0 for one that cannot be read: its process is unknown)."""
    found = []
    for name in statefs.list_names(state_dir, statefs.INFLIGHT):
        try:
            lines = statefs.read_bytes(state_dir, statefs.inflight_marker(name)).decode()
            fields = [*lines.splitlines(), "", "", ""]
            found.append(InflightMarker(name, int(fields[0].strip()), fields[1].strip(),
                                        fields[2].strip()))
        except (OSError, ValueError):
            found.append(InflightMarker(name, 0))
    return found


def abandoned_snapshots(state_dir: Path) -> set[str]:
    """Ids of snapshots whose uploading process is gone by its pid (see `forget_abandoned`;
    uploads.py also checks the start time and host the owner token names)."""
    return {m.snapshot_id for m in inflight_markers(state_dir) if m.pid <= 0 or not _alive(m.pid)}


def live_inflight(state_dir: Path) -> set[str]:
    """Ids of snapshots a live process on this host is uploading right now."""
    markers = set(statefs.list_names(state_dir, statefs.INFLIGHT))
    return markers - abandoned_snapshots(state_dir)


def forget_abandoned(state_dir: Path, snapshot_ids: set[str]) -> None:
    """Drop the markers of abandoned snapshots once their uploads are aborted."""
    for snap_id in snapshot_ids:
        statefs.unlink(state_dir, statefs.inflight_marker(snap_id))


def process_alive(pid: int) -> bool:
    """Whether a process with `pid` runs (someone else's included)."""
    return _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True
