"""Where the state that must survive a failover is kept: one interface, two places.

The modules that own a piece of state (state.py: each source's outcome;
drills/records.py: drill records; orphans.py: orphan sightings; lifecycle.py:
a tenant's offboarding and erasure state; tenant_keys.py: each tenant's keyring
copies; erasure.py: the erasure journal and certificates; audit.py: the audit
log) say what their bytes mean; a
`StateStore` only keeps bytes by key (a value, replaced whole or changed under
a lock) and logs by key (lines appended in one order under a lock). Keys are
the state folder's relative paths (statefs.py), so:

- `FolderStore` (the embedded default) is today's state folder, unchanged on disk;
- with `[daemon] lock_dsn`, `sources/pg_state.PgStateStore` keeps the same keys
  in that PostgreSQL database, under the cluster's name (`lock_name`), so the
  host that takes over continues where the old active stopped, and the audit log
  is one chain for the cluster (docs/format.md, "Shared state in PostgreSQL").

The runtime opens the store once (`open_for`) and attaches it to its state
folder; the owning modules, which are given a state folder, find it with `at`.
On the first use of an empty cluster state the host's state folder is imported
into it once (`importable`); a host joining a cluster state that is not empty
keeps its own files where they are, unused, and says so once (a warning).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import statefs

if TYPE_CHECKING:
    from .config import DaemonConfig

log = logging.getLogger("drdaemon")
_HOST = socket.gethostname()

# The appended-to logs among the keys (everything else is a value replaced whole).
AUDIT_LOG = statefs.AUDIT_LOG
DRILL_RECORDS = statefs.DRILL_RECORDS

# `make(last, count)` builds what to append from the log's last line (b"" when
# empty) and, if it needs it, the number of lines (count()): run under the lock.
MakeAppend = Callable[[bytes, Callable[[], int]], bytes]
# `change(old)` returns the new value (None: write nothing); old is None if absent.
Change = Callable[[bytes | None], bytes | None]


class StateStore(Protocol):
    """Bytes by key, and logs by key; keys are relative paths like "prune/orphans.json"."""

    @property
    def where(self) -> str:
        """Where the state lives, for messages (no secret)."""
        ...

    def read(self, key: str) -> bytes | None:
        """The value at `key`, or None."""
        ...

    def write(self, key: str, data: bytes) -> None:
        """Replace the value at `key` (readers see the old or the new one)."""
        ...

    def update(self, key: str, change: Change) -> bytes | None:
        """Read, change and write the value at `key` with no other update in between
        (on any host); returns what was written (None: nothing)."""
        ...

    def delete(self, key: str) -> None:
        """Remove the value at `key` (missing is fine)."""
        ...

    def read_log(self, key: str) -> bytes:
        """Every line of the log at `key`, in order (b"" if none)."""
        ...

    def append(self, key: str, make: MakeAppend) -> None:
        """Append `make(last line, count)` to the log at `key`: one appender at a time
        (on any host), so every reader sees one order."""
        ...

    def children(self, folder: str) -> list[str]:
        """The names directly under `folder` (values, logs or folders), sorted."""
        ...

    def begin(self) -> tuple[dict[str, int] | None, dict[str, Any]] | None:
        """Use the store for the first time in this process (see `begin` below): None
        for a store with nothing to begin, else (what this process imported, or None if
        the state was begun before; who began it)."""
        ...


def last_line(fd: int, size: int) -> bytes:
    """The file's last line (with its newline, if it has one), read from the end."""
    start, step, buf = size, 4096, b""
    while start > 0:
        n = min(step, start)
        start -= n
        buf = os.pread(fd, n, start) + buf
        cut = buf.rfind(b"\n", 0, len(buf) - 1)
        if cut >= 0:
            return buf[cut + 1:]
        step *= 2
    return buf


def lock_of(key: str) -> str:
    """The flock file of a value's read-modify-writes (`tenants/t/lifecycle.json` ->
    `tenants/t/lifecycle.lock`, the name lifecycle.py always used)."""
    stem = key[:-5] if key.endswith(".json") else key
    return f"{stem}.lock"


@dataclass(frozen=True)
class FolderStore:
    """The state folder (statefs.py): files replaced atomically, logs appended under a
    flock and fsynced, read-modify-writes under a flock beside the file."""

    state_dir: Path

    @property
    def where(self) -> str:
        return f"state folder {self.state_dir}"

    def read(self, key: str) -> bytes | None:
        try:
            return statefs.read_bytes(self.state_dir, key)
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        statefs.write_atomic(self.state_dir, key, data)

    def update(self, key: str, change: Change) -> bytes | None:
        with statefs.locked(self.state_dir, lock_of(key), os.O_RDWR):
            new = change(self.read(key))
            if new is not None:
                self.write(key, new)
        return new

    def delete(self, key: str) -> None:
        statefs.unlink(self.state_dir, key)

    def read_log(self, key: str) -> bytes:
        try:
            return statefs.read_shared(self.state_dir, key)
        except FileNotFoundError:
            return b""

    def append(self, key: str, make: MakeAppend) -> None:
        with statefs.appending(self.state_dir, key) as fd:
            size = os.fstat(fd).st_size
            last = last_line(fd, size) if size else b""
            if last and not last.endswith(b"\n"):
                # A write was cut short (crash, full disk): end the damaged line so it
                # stays where it is (the log's reader reports it) and go on after it.
                log.warning("%s ends with an incomplete line (an interrupted write); it is "
                            "kept and new lines follow it", key)
                statefs.write_all(fd, b"\n")
                last += b"\n"
            statefs.write_all(fd, make(last, lambda: statefs.read_all(fd).count(b"\n")))

    def children(self, folder: str) -> list[str]:
        return statefs.list_names(self.state_dir, folder)

    def begin(self) -> None:
        return None  # statefs.prepare made the folder


# -- the first use of a cluster state: what a host's state folder holds -----------

@dataclass
class Seed:
    """What a state folder holds that the cluster state takes over: values and logs by key."""

    values: dict[str, bytes] = field(default_factory=dict)
    logs: dict[str, list[bytes]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.values and not any(self.logs.values())

    def parts(self) -> tuple[dict[str, bytes], dict[str, list[bytes]]]:
        """(values, logs), as sources/pg_state.py imports them."""
        return self.values, self.logs


def importable(state_dir: Path) -> Seed:
    """What of `state_dir` moves to an empty cluster state: the audit log and the drill
    records (their lines as they are, so the chain stays intact), each source's outcome,
    the orphan sightings, every tenant's lifecycle, keyring copies (tenant_keys.py) and
    erasure journal and certificates."""
    local = FolderStore(state_dir)
    seed = Seed()
    for key in (AUDIT_LOG, DRILL_RECORDS):
        lines = local.read_log(key).splitlines(keepends=True)
        if lines:
            seed.logs[key] = lines
    wanted = [statefs.ORPHAN_SIGHTINGS]
    wanted += [statefs.outcome_file(n[:-5]) for n in local.children(statefs.OUTCOMES)
               if n.endswith(".json") and not n.startswith(".")]
    for tenant in local.children(statefs.TENANTS):
        if tenant.startswith("."):
            continue
        wanted.append(statefs.tenant_lifecycle_file(tenant))
        keys = statefs.tenant_keys_folder(tenant)
        wanted += [f"{keys}/{n}" for n in local.children(keys) if not n.startswith(".")]
        erasure = statefs.erasure_folder(tenant)
        for name in local.children(erasure):
            if name == statefs.ERASURE_JOURNAL:
                seed.logs[f"{erasure}/{name}"] = \
                    local.read_log(f"{erasure}/{name}").splitlines(keepends=True)
            elif not name.startswith("."):
                wanted.append(f"{erasure}/{name}")
    for key in wanted:
        try:
            data = local.read(key)
        except (IsADirectoryError, NotADirectoryError, statefs.UnsafeState):
            continue
        if data is not None:
            seed.values[key] = data
    return seed


def describe(state_dir: Path, key: str) -> str:
    """Where `key` of `state_dir`'s store lives, for messages: the file's path, or the
    cluster state and the key."""
    store = at(state_dir)
    if isinstance(store, FolderStore):
        return str(state_dir / key)
    return f"{store.where}, {key}"


# -- which store a state folder uses ------------------------------------------------

# state folder -> (what opened it: lock_dsn and lock_name, or None; the store)
_attached: dict[Path, tuple[tuple[str, str] | None, StateStore]] = {}
_attached_lock = threading.Lock()


def at(state_dir: Path) -> StateStore:
    """The store the runtime opened for `state_dir` (open_for), else the folder itself."""
    with _attached_lock:
        found = _attached.get(state_dir)
    return found[1] if found is not None else FolderStore(state_dir)


def with_own_folder(state_dir: Path) -> list[StateStore]:
    """`state_dir`'s store, then (if that is a cluster state) the folder itself: where a
    host may still hold state it kept before it moved to lock_dsn (a tenant's keyring
    copies, which an erasure must destroy too)."""
    store = at(state_dir)
    return [store] if isinstance(store, FolderStore) else [store, FolderStore(state_dir)]


def open_for(daemon: DaemonConfig) -> StateStore:
    """The store of this `[daemon]` table, opened once per process and attached to its
    state folder: PostgreSQL in `lock_dsn` under `lock_name` if set, else the folder."""
    ident = None if daemon.lock_dsn is None else (daemon.lock_dsn, daemon.lock_name)
    with _attached_lock:
        found = _attached.get(daemon.state_dir)
        if found is not None and found[0] == ident:
            return found[1]
        if found is not None:
            _close(found[1])
        store: StateStore
        if daemon.lock_dsn is None:
            store = FolderStore(daemon.state_dir)
        else:
            from .sources.pg_state import PgStateStore

            store = PgStateStore(daemon.lock_dsn, daemon.lock_name, str(daemon.state_dir),
                                 seed=lambda: importable(daemon.state_dir).parts())
        _attached[daemon.state_dir] = (ident, store)
        return store


@dataclass(frozen=True)
class Begun:
    """The cluster state as this process found it on first use (shared_state.begin)."""

    where: str
    imported: dict[str, int] | None  # what this process imported; None: begun before
    by: dict[str, Any]  # who began it: host, state folder, time, what it imported


def begin(daemon: DaemonConfig) -> Begun | None:
    """Open this `[daemon]` table's store and, for a cluster state, use it once: its
    tables are made, and an empty one takes this host's state folder (logged here,
    audited by the runtime). A host whose state folder holds state and that finds the
    cluster state begun from another folder keeps its own files unused and is warned:
    its history is not the cluster's (docs/reliability.md, "Moving to a cluster").
    None without `lock_dsn`."""
    store = open_for(daemon)
    begun = store.begin()
    if begun is None:
        return None
    got = Begun(store.where, *begun)
    if got.imported is not None and not any(got.imported.values()):
        log.info("%s begun (this host's state folder held nothing to import)", got.where)
    elif got.imported is not None:
        log.warning("%s was empty: imported this host's state folder %s into it (%s)",
                    got.where, daemon.state_dir,
                    ", ".join(f"{k}: {v}" for k, v in sorted(got.imported.items())))
    elif (got.by.get("host"), got.by.get("state_dir")) != (_HOST, str(daemon.state_dir)) \
            and not importable(daemon.state_dir).empty:
        log.warning("the state in this host's state folder %s is not used: the %s was begun "
                    "from %s on %s; the local files are left as they are",
                    daemon.state_dir, got.where, got.by.get("state_dir"), got.by.get("host"))
    return got


def detach(state_dir: Path) -> None:
    """Forget the store attached to `state_dir` (closing a PostgreSQL one)."""
    with _attached_lock:
        found = _attached.pop(state_dir, None)
    if found is not None:
        _close(found[1])


def _close(store: StateStore) -> None:
    close = getattr(store, "close", None)
    if close is not None:
        close()
