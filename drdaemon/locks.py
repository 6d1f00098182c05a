"""Typed, exclusive locks in the state folder (after Barman's lockfile).

Each kind of work that must not run twice at once on one state folder has its
own lock file: the daemon itself, and deletions (`deletions_lock`: prune, and
replica repair, which must not race a prune). flock is released by the kernel
when the process dies, so a crash never leaves a stale lock behind; the file
holds the pid of its holder for an operator to read.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from . import statefs
from .errors import DrError

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


def deletions_lock(state_dir: Path) -> AbstractContextManager[Path]:
    """The deletions lock: one prune or replica repair at a time on a state folder."""
    return hold(state_dir, "deletions")


@contextmanager
def hold_in_postgres(dsn: str, name: str) -> Iterator[None]:
    """Hold a PostgreSQL advisory lock named `name` for the block, or raise Locked.

    The state-folder lock only sees one host; daemons started on two hosts with
    the same config meet here. The session lock ends with the connection, so a
    crashed daemon never leaves it held.
    """
    from .sources.pg_session import advisory_lock, describe

    with advisory_lock(dsn, name) as taken:
        if not taken:
            raise Locked(f"another drdaemon holds the lock {name!r} in {describe(dsn)}")
        yield
