"""Small stream adapters shared by the backup and restore paths.

Everything streams: these wrap file-like objects to count, hash, bound, or
bridge a push-style producer (tarfile writing) to a pull-style consumer.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import queue
import subprocess
import threading
from collections.abc import Callable
from typing import Any, BinaryIO

from .errors import IntegrityError


class Remembering:
    """Keeps the first exception raised through it.

    pyrage turns exceptions raised by our readers and writers into a bare
    EncryptError/DecryptError string; the adapters remember the original so
    the caller can report the real cause (see `first_error`).
    """

    error: BaseException | None = None

    def remember(self, exc: BaseException) -> BaseException:
        if self.error is None:
            self.error = exc
        return exc


def first_error(*parts: Remembering) -> BaseException | None:
    """The first remembered exception among stream adapters, if any."""
    return next((p.error for p in parts if p.error is not None), None)


def buffered(reader: io.RawIOBase) -> io.BufferedReader:
    """`reader` behind a 1 MiB buffer, for pyrage.

    pyrage reads 8 KiB at a time; through the buffer those reads are served
    in C and our Python readers are called once per MiB instead.
    """
    return io.BufferedReader(reader, buffer_size=1 << 20)


class CountingReader(io.RawIOBase, Remembering):
    """Reads through `inner`, counting bytes and optionally hashing them."""

    def __init__(self, inner: Any, *, hash_it: bool = False,
                 on_read: Callable[[int], None] | None = None) -> None:
        self.inner = inner
        self.count = 0
        self.sha = hashlib.sha256() if hash_it else None
        self.on_read = on_read

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        try:
            return self._readinto(buf)
        except BaseException as exc:
            raise self.remember(exc)  # noqa: B904 - re-raising the same exception

    def _readinto(self, buf: Any) -> int:
        readinto = getattr(self.inner, "readinto", None)
        if readinto is not None:  # straight into the caller's buffer: one copy fewer
            n = readinto(buf) or 0
            data = memoryview(buf)[:n]
        else:
            data = self.inner.read(len(buf))
            n = len(data)
            buf[:n] = data
        self.count += n
        if self.sha is not None:
            self.sha.update(data)
        if self.on_read is not None and n:
            self.on_read(n)
        return n


class VerifyingReader(CountingReader):
    """A reader of an untrusted stored object, checked against its manifest.

    Refuses to read past the expected size (a planted huge object cannot make
    us stream forever) and, at the end of the stream, raises IntegrityError
    instead of EOF if size or sha256 differ. Raising before EOF matters: age
    releases the last chunk only after seeing EOF, so a mismatching object
    never completes the consumer's stream.
    """

    def __init__(self, inner: Any, size: int, sha256: str, what: str,
                 on_read: Callable[[int], None] | None = None) -> None:
        super().__init__(inner, hash_it=True, on_read=on_read)
        self.expected_size = size
        self.expected_sha = sha256
        self.what = what
        self.verified = False

    def _readinto(self, buf: Any) -> int:
        n = super()._readinto(buf)
        if self.count > self.expected_size:
            raise IntegrityError(f"{self.what} is larger than its manifest says "
                                 f"({self.expected_size} bytes)")
        if n == 0:
            self.check()
        return n

    def check(self) -> None:
        """Raise IntegrityError unless everything was read and matches."""
        if self.count != self.expected_size:
            raise IntegrityError(f"{self.what} is truncated: {self.count} of "
                                 f"{self.expected_size} bytes")
        assert self.sha is not None
        if self.sha.hexdigest() != self.expected_sha:
            raise IntegrityError(f"{self.what} does not match its manifest's sha256 "
                                 "(corrupt or replaced)")
        self.verified = True


class LimitWriter(io.RawIOBase, Remembering):
    """Writes through to `inner`, refusing more than `limit` bytes in total.

    Bounds decompression: the authenticated manifest says how large the
    plaintext is, so a decompression bomb stops at that size.
    """

    def __init__(self, inner: Any, limit: int, what: str) -> None:
        self.inner = inner
        self.limit = limit
        self.what = what
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = len(data)
        self.count += n
        try:
            if self.count > self.limit:
                raise IntegrityError(f"{self.what} decompresses to more than the "
                                     f"{self.limit} bytes its manifest records")
            self.inner.write(data)
        except BaseException as exc:
            raise self.remember(exc)  # noqa: B904 - re-raising the same exception
        return n


class Drain(Remembering):
    """A bounded queue emptied by its own thread, which hands each item to `deliver`.

    At most `depth` items wait, so a slow consumer slows the producer rather
    than filling memory. The first exception `deliver` raises is kept in
    `error` and passed to `on_error` (in the thread); from then on queued
    and new items are dropped, never delivered, so the producer never blocks
    on a consumer that is gone. `stop` does the same from outside.
    """

    def __init__(self, deliver: Callable[[bytes], Any], *, depth: int, name: str,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self._deliver = deliver
        self._on_error = on_error
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.error is not None:
                continue  # dropped: keep draining so put() never blocks
            try:
                self._deliver(item)
            except BaseException as exc:  # kept for the producer
                self.remember(exc)
                if self._on_error is not None:
                    # A failing clean-up must not end the thread: put() would
                    # then block for good on a full queue.
                    with contextlib.suppress(Exception):
                        self._on_error(exc)

    def put(self, item: bytes) -> None:
        """Queue `item`, waiting while the queue is full; dropped once failed."""
        if self.error is None:
            self._queue.put(item)

    def stop(self, reason: BaseException) -> None:
        """Fail the drain from outside: what is still queued is dropped."""
        self.remember(reason)

    def join(self) -> None:
        """Deliver (or drop) what is queued and end the thread; idempotent."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class BackgroundWriter(io.RawIOBase):
    """Writes through to `inner` from its own thread, `depth` chunks at most in flight.

    For a sink on disk or a child's stdin: the producer decrypts and
    decompresses the next chunk while the kernel takes the last one, instead
    of taking turns. A write error (a full disk) is raised by the next write
    or by close.
    """

    def __init__(self, inner: BinaryIO, depth: int = 8, name: str = "writer") -> None:
        self.inner = inner
        self._drain = Drain(inner.write, depth=depth, name=name)

    @property
    def error(self) -> BaseException | None:
        return self._drain.error

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.error is not None:
            raise self.error
        chunk = bytes(data)  # the caller may reuse its buffer
        self._drain.put(chunk)
        return len(chunk)

    def close(self) -> None:
        if self.closed:
            return
        self._drain.join()
        super().close()
        try:
            self.inner.close()
        except OSError as exc:
            self._drain.remember(exc)
        if self.error is not None:
            raise self.error


class ThreadPipe:
    """Runs `work(writer)` or `work(reader)` in a thread, joined through an OS pipe.

    The pipe's kernel buffer bounds memory. Whichever side stops first closes
    its end, so the other gets EOF or BrokenPipeError instead of blocking.
    """

    def __init__(self, work: Callable[[BinaryIO], Any], *, thread_writes: bool,
                 name: str) -> None:
        r, w = os.pipe()
        self.reader: BinaryIO = os.fdopen(r, "rb", buffering=1 << 16)
        self.writer: BinaryIO = os.fdopen(w, "wb", buffering=1 << 16)
        self.error: BaseException | None = None
        self.result: Any = None
        self._work = work
        self._mine = self.writer if thread_writes else self.reader
        self.theirs = self.reader if thread_writes else self.writer
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self._work(self._mine)
        except BaseException as exc:  # reported to the joining thread
            self.error = exc
        finally:
            try:
                self._mine.close()
            except OSError as exc:  # e.g. BrokenPipe on the final flush
                if self.error is None:
                    self.error = exc

    def join(self) -> Any:
        """Close our end, wait for the thread, re-raise its error, return its result."""
        with contextlib.suppress(OSError):
            self.theirs.close()
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.result


class StderrTail:
    """Collects the last few KiB of a child's stderr in a thread, for error messages."""

    def __init__(self, proc: subprocess.Popen[bytes], limit: int = 4096) -> None:
        self.limit = limit
        self.buf = b""
        assert proc.stderr is not None
        self._stream = proc.stderr
        self._thread = threading.Thread(target=self._run, daemon=True, name="stderr")
        self._thread.start()

    def _run(self) -> None:
        for chunk in iter(lambda: self._stream.read(4096), b""):
            self.buf = (self.buf + chunk)[-self.limit:]

    def text(self) -> str:
        """The tail, joined to one line."""
        self._thread.join(timeout=5)
        lines = self.buf.decode("utf-8", "replace").strip().splitlines()
        return " | ".join(ln.strip() for ln in lines[-3:])
