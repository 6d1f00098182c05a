"""The stream adapters on their own, against real files and devices."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drdaemon.errors import IntegrityError
from drdaemon.streams import BackgroundWriter, CountingReader, Drain, VerifyingReader, buffered


@settings(max_examples=30, deadline=None)
@given(st.lists(st.binary(max_size=70_000), max_size=40))
def test_background_writer_keeps_every_byte_in_order(tmp_path_factory, chunks) -> None:
    path = tmp_path_factory.mktemp("bg") / "out"
    w = BackgroundWriter(open(path, "wb"), depth=2)  # noqa: SIM115 - closed by the writer
    for c in chunks:
        view = bytearray(c)
        assert w.write(memoryview(view)) == len(c)
        view[:] = b"\0" * len(view)  # the caller reuses its buffer at once
    w.close()
    assert path.read_bytes() == b"".join(chunks)


def test_background_writer_reports_a_full_disk() -> None:
    w = BackgroundWriter(open("/dev/full", "wb", buffering=0), depth=2)  # noqa: SIM115
    with pytest.raises(OSError) as caught:
        for _ in range(100):
            w.write(b"x" * 65536)
        w.close()
    assert caught.value.errno == errno.ENOSPC
    assert w.error is caught.value
    with pytest.raises(OSError):  # close still says the data did not all land
        w.close()
    assert w.closed
    w.close()  # and once closed, closing again is quiet


def test_drain_after_a_failure_drops_everything_and_never_blocks_the_producer() -> None:
    delivered: list[bytes] = []
    failures: list[BaseException] = []

    def deliver(item: bytes) -> None:
        if item == b"bad":
            raise OSError("region gone")
        delivered.append(item)

    d = Drain(deliver, depth=1, name="t", on_error=failures.append)
    producer = threading.Thread(target=lambda: [d.put(x) for x in
                                                [b"a", b"bad", *[b"late"] * 1000]],
                                daemon=True)  # a hang must fail the test, not the run
    producer.start()
    producer.join(timeout=10)
    assert not producer.is_alive()  # a full queue on a failed drain must not hold it up
    d.join()
    d.join()  # idempotent
    assert delivered == [b"a"]
    assert len(failures) == 1 and failures[0] is d.error and str(d.error) == "region gone"


def test_drain_survives_a_failing_clean_up() -> None:
    release = threading.Event()

    def deliver(item: bytes) -> None:
        release.wait(10)
        raise OSError("gone")

    def clean_up(exc: BaseException) -> None:
        raise OSError("abort failed too")

    d = Drain(deliver, depth=1, name="t", on_error=clean_up)
    producer = threading.Thread(target=lambda: [d.put(b"x") for _ in range(5)],
                                daemon=True)  # a hang must fail the test, not the run
    producer.start()
    time.sleep(0.5)  # part 1 being delivered, part 2 queued, part 3 waiting for room
    release.set()
    producer.join(timeout=10)
    assert not producer.is_alive()  # the drain kept draining after its clean-up failed
    d.join()
    assert str(d.error) == "gone"


def test_drain_stop_drops_what_is_still_queued() -> None:
    release = threading.Event()
    delivered: list[bytes] = []

    def deliver(item: bytes) -> None:
        release.wait(10)
        delivered.append(item)

    d = Drain(deliver, depth=4, name="t")
    for x in (b"1", b"2", b"3"):
        d.put(x)
    d.stop(RuntimeError("aborted"))
    release.set()
    d.join()
    assert delivered in ([], [b"1"])  # at most the one already being delivered
    d.put(b"4")  # quietly dropped once stopped
    assert str(d.error) == "aborted"


def test_counting_reader_reads_into_the_callers_buffer(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    (tmp_path / "f").write_bytes(data)
    with open(tmp_path / "f", "rb", buffering=0) as raw:
        reader = CountingReader(raw, hash_it=True)
        assert buffered(reader).read() == data
    assert reader.count == len(data)
    assert reader.sha is not None and reader.sha.hexdigest() == hashlib.sha256(data).hexdigest()


def test_verifying_reader_raises_before_eof_through_a_buffer() -> None:
    data = os.urandom(100_000)
    wrong = VerifyingReader(io.BytesIO(data), len(data), "0" * 64, "object")
    r = buffered(wrong)
    got = b""
    with pytest.raises(IntegrityError, match="sha256"):
        while chunk := r.read(8192):
            got += chunk
    assert not wrong.verified
    right = VerifyingReader(io.BytesIO(data), len(data), hashlib.sha256(data).hexdigest(), "o")
    assert buffered(right).read() == data and right.verified
