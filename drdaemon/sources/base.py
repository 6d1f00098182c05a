"""What every source kind provides: a dump to back up, a sink to restore into."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO, Protocol


@dataclass
class Dump:
    """A running dump of a source.

    `stream` yields the plaintext of a standard dump (pg_dump custom format,
    POSIX tar). `finish()` is called after the stream is drained: it waits for
    the producer and returns the facts drills need, or raises SourceError.
    """

    stream: BinaryIO
    consistency_time: datetime
    finish: Callable[[], dict[str, Any]]


class Sink(Protocol):
    """A staged restore target: written, then verified, then committed.

    Nothing appears at the final target before `commit`; `discard` removes
    everything staged, whatever state it is in.
    """

    writer: BinaryIO
    notes: list[str]  # what was neutralised on the way in, for the operator

    def complete(self) -> None:
        """Close the writer and wait for the consumer; raise if it failed."""

    def commit(self) -> str:
        """Move the staged copy into place; return where it went."""

    def discard(self) -> None:
        """Remove the staged copy."""
