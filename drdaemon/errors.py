"""Error types shared across drdaemon.

The CLI maps these to exit codes: `UsageError` (bad config or input) is 2,
every other `DrError` is 1. Messages are one line and never contain secrets.
"""

from __future__ import annotations


class DrError(Exception):
    """An operational failure that is reported to the operator as one line."""


class UsageError(DrError):
    """Bad configuration or bad input from the operator (exit code 2)."""


class ConfigError(UsageError):
    """The configuration file is invalid; the message names the file and key."""


class IntegrityError(DrError):
    """Stored data does not match what its manifest promises."""


class SourceError(DrError):
    """A source (database, directory) could not be dumped or restored."""


class ShrinkError(SourceError):
    """A snapshot was refused because its source shrank sharply (see shrink.py)."""


class Cancelled(DrError):
    """The daemon is shutting down: the stream was stopped and every upload aborted."""


class Fenced(Cancelled):
    """This daemon no longer holds the cluster lock (`[daemon] lock_dsn`): a commit or a
    deletion it was about to make is refused, since another host may be active now."""


def first_line(exc: BaseException, empty: str | None = None) -> str:
    """The first line of an error's message, for a one-line report; `empty` (default:
    the exception's class name) when it has no message."""
    return (str(exc).strip().splitlines() or [empty or exc.__class__.__name__])[0]
