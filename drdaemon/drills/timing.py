"""Where a drill's restore spends its time: the stored object's reads, the restore
consumer's writes and its finish, timed around restore.stream_into (slo.rto_split)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

from ..sources.base import Sink
from ..storage import ObjectStore


@dataclass
class StreamClock:
    """Where a streaming restore spent its time (seconds, monotonic)."""

    t0: float = 0.0
    first_byte: float | None = None
    read_wait: float = 0.0
    write_wait: float = 0.0
    finish: float = 0.0


class TimedReader:
    """The stored object's stream, timing each read (network and storage waits)."""

    def __init__(self, inner: BinaryIO, clock: StreamClock) -> None:
        self.inner, self.clock = inner, clock

    def read(self, n: int = -1) -> bytes:
        start = time.monotonic()
        data = self.inner.read(n)
        end = time.monotonic()
        if self.clock.first_byte is None and data:
            self.clock.first_byte = end - self.clock.t0
        else:
            self.clock.read_wait += end - start
        return data

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> TimedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TimedStore:
    """The slice of a store that `stream_into` uses (name, open_read), with reads timed."""

    def __init__(self, store: ObjectStore, clock: StreamClock) -> None:
        self.name, self.store, self.clock = store.name, store, clock

    def open_read(self, name: str) -> BinaryIO:
        return cast(BinaryIO, TimedReader(self.store.open_read(name), self.clock))


class TimedWriter:
    """The sink's writer, timing how long the restore consumer held the stream up."""

    def __init__(self, inner: BinaryIO, clock: StreamClock) -> None:
        self.inner, self.clock = inner, clock

    def write(self, data: Any) -> int:
        start = time.monotonic()
        try:
            return self.inner.write(data)
        finally:
            self.clock.write_wait += time.monotonic() - start


class TimedSink:
    """A sink whose writes and completion are timed."""

    def __init__(self, sink: Sink, clock: StreamClock) -> None:
        self.sink, self.clock = sink, clock
        self.writer = cast(BinaryIO, TimedWriter(sink.writer, clock))
        self.notes = sink.notes

    def complete(self) -> None:
        start = time.monotonic()
        try:
            self.sink.complete()
        finally:
            self.clock.finish += time.monotonic() - start

    def commit(self) -> str:
        return self.sink.commit()

    def discard(self) -> None:
        self.sink.discard()
