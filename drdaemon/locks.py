"""Typed, exclusive locks in the state folder (after Barman's lockfile).

Each kind of work that must not run twice at once on one state folder has its
own lock file: the daemon itself, and deletions (`deletions_lock`: prune, and
replica repair, which must not race a prune). flock is released by the kernel
when the process dies, so a crash never leaves a stale lock behind; the file
holds the pid of its holder for an operator to read.

With `[daemon] lock_dsn`, hosts sharing one config meet in PostgreSQL too
(advisory locks, sources/pg_lock.py): the daemon's cluster lock, which makes
one daemon active and the others standbys (:class:`ClusterLock`, with the
fencing check a commit makes), and `<lock_name>:deletions`, held by whoever
deletes (prune, replica repair, erasure, daemon jobs and drctl alike) so that
two hosts never delete at once (:func:`deletions_lock`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from . import statefs
from .errors import DrError, Fenced

if TYPE_CHECKING:
    from .config import DaemonConfig
    from .sources.pg_lock import LockSession

log = logging.getLogger("drdaemon")

# How long a deleting command waits for another host's deletions to end.
DELETIONS_WAIT = timedelta(minutes=1)

# lock name -> what holds it, for the message a second taker sees
LOCKS = {
    "daemon": "another drdaemon is already running",
    "deletions": "a prune or a replica repair is running",
}


class Locked(DrError):
    """The lock is held by another process."""


@contextmanager
def hold(state_dir: Path, name: str) -> Iterator[Path]:
    """Hold the exclusive lock `name` for the duration of the block, or raise Locked."""
    rel = statefs.lock_file(name)
    path = state_dir / rel
    fd = statefs.open_file(state_dir, rel, os.O_RDWR | os.O_CREAT)  # never through a link
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Locked(f"{LOCKS[name]} with state folder {state_dir} (it holds {path}); "
                         "try again when it has finished") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        os.close(fd)


@contextmanager
def deletions_lock(state_dir: Path, lock_dsn: str | None = None, lock_name: str = "drdaemon",
                   wait: timedelta = DELETIONS_WAIT) -> Iterator[Path]:
    """The deletions lock: one prune, replica repair or erasure at a time on a state
    folder and, with `lock_dsn`, on every host (`<lock_name>:deletions`, waited for up
    to `wait`, then Locked naming who holds it)."""
    with hold(state_dir, "deletions") as path:
        if lock_dsn is None:
            yield path
            return
        from .sources.pg_lock import LockSession

        name = f"{lock_name}:deletions"
        session = LockSession(lock_dsn, name, role="deletions")
        try:
            if not session.take(wait):
                raise Locked(f"another host is deleting: the lock {name!r} is held by "
                             f"{session.holder()} (waited {int(wait.total_seconds())}s); "
                             "try again when it has finished")
            yield path
        finally:
            session.close()


def deletions_for(daemon: DaemonConfig) -> AbstractContextManager[Path]:
    """The deletions lock as the `[daemon]` table configures it."""
    return deletions_lock(daemon.state_dir, daemon.lock_dsn, daemon.lock_name,
                          daemon.deletions_lock_wait)


class ClusterLock:
    """The daemon's cluster lock (`[daemon] lock_dsn` + `lock_name`): the active daemon
    holds it on one session for its whole life; a standby waits for it.

    Thread-safe: the watch, the commits' fencing checks and the scheduler's jobs share
    the one session (sources/pg_lock.LockSession serialises its queries).
    """

    def __init__(self, dsn: str, name: str, interval: timedelta) -> None:
        self.dsn, self.name, self.interval = dsn, name, interval
        self.lost = threading.Event()
        self._session: LockSession | None = None

    def _open(self) -> LockSession:
        from .sources.pg_lock import LockSession

        if self._session is None:
            self._session = LockSession(self.dsn, self.name, check_every=self.interval)
        return self._session

    def wait_until_taken(self, stop: threading.Event,
                         on_waiting: Callable[[str], None]) -> bool:
        """Try every `interval` until the lock is taken (True) or `stop` is set (False);
        `on_waiting(holder)` once, when the first try fails. An unreachable lock
        database is logged and tried again: a standby outlives a lock server restart."""
        told = unreachable = False
        while not stop.is_set():
            try:
                session = self._open()
                if session.try_take():
                    return True
                if not told:
                    on_waiting(session.holder())
                    told = True
                unreachable = False
            except DrError as exc:
                if not unreachable:
                    log.warning("standby: %s; trying again every %ds", exc,
                                int(self.interval.total_seconds()), extra={"job": "lock"})
                    unreachable = True
                self.close()
            stop.wait(self.interval.total_seconds())
        return False

    def still_held(self) -> bool:
        """Whether this daemon still holds the lock: one query on its session. Once lost,
        lost for good (a new holder may be active; this process must not resume)."""
        if self.lost.is_set() or self._session is None:
            return False
        if not self._session.holds():
            self.lost.set()
            return False
        return True

    def fence(self, what: str) -> None:
        """Raise Fenced unless this daemon still holds the lock, right before `what`
        (a manifest commit, a deletion) is done."""
        if not self.still_held():
            raise Fenced(f"{what} refused: this daemon no longer holds the cluster lock "
                         f"{self.name!r} (another host may be active now)")

    def close(self) -> None:
        """End the session (releasing the lock if held)."""
        if self._session is not None:
            session, self._session = self._session, None
            session.close()


@contextmanager
def hold_in_postgres(dsn: str, name: str) -> Iterator[None]:
    """Hold a PostgreSQL advisory lock named `name` for the block, or raise Locked at once
    (`drdaemon run --once`; the long-running daemon waits instead, see ClusterLock).

    The state-folder lock only sees one host; daemons started on two hosts with
    the same config meet here. The session lock ends with the connection, so a
    crashed daemon never leaves it held.
    """
    from .sources.pg_lock import LockSession
    from .sources.pg_session import describe

    session = LockSession(dsn, name)
    try:
        if not session.try_take():
            raise Locked(f"another drdaemon holds the lock {name!r} in {describe(dsn)}: "
                         f"{session.holder()}")
        yield
    finally:
        session.close()
