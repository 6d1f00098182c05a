"""The metrics endpoint has limits (issue 22, item 5): half-open connections cost no thread,
an idle connection is closed within the header timeout, and a scrape is answered meanwhile.
Real sockets on loopback against the server the daemon runs (metrics.serve)."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from drdaemon import metrics
from drdaemon.metrics import server as metrics_server


@pytest.fixture
def served(free_port: Callable[[], int]) -> Iterator[tuple[int, int]]:
    """A running metrics server on loopback: (port, threads before it started)."""
    registry = CollectorRegistry()
    Gauge("drdaemon_test_value", "a value to scrape", registry=registry).set(42)
    before = threading.active_count()
    port = free_port()
    server = metrics.serve(f"127.0.0.1:{port}", registry)
    yield port, before
    metrics.shutdown(server)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return str(resp.read().decode())


def test_half_open_connections_cost_no_thread_and_a_scrape_is_answered(
        served: tuple[int, int]) -> None:
    port, before = served
    assert "drdaemon_test_value 42.0" in _scrape(port)
    conns = []
    try:
        for _ in range(150):  # more than MAX_PENDING, as a flood would
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never ends its headers
            conns.append(c)
        time.sleep(0.5)
        # The accepting thread and at most WORKERS answering ones, however many connect.
        assert threading.active_count() <= before + 1 + metrics_server.WORKERS
        assert "drdaemon_test_value 42.0" in _scrape(port)
        assert threading.active_count() <= before + 1 + metrics_server.WORKERS
    finally:
        for c in conns:
            c.close()


def test_an_idle_connection_is_closed_within_the_timeout(served: tuple[int, int]) -> None:
    port, _ = served
    with socket.create_connection(("127.0.0.1", port)) as idle:
        idle.settimeout(metrics_server.HEADER_TIMEOUT + 5)
        started = time.monotonic()
        idle.sendall(b"GET /metr")  # and then nothing
        assert idle.recv(1) == b""  # closed by the server (a timeout here raises)
        waited = time.monotonic() - started
    assert metrics_server.HEADER_TIMEOUT - 0.5 <= waited <= metrics_server.HEADER_TIMEOUT + 2


def test_a_bad_request_is_refused_and_a_raw_request_answered_once(served: tuple[int, int]) -> None:
    port, _ = served
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"NONSENSE\r\n\r\n")
        assert c.recv(100).startswith(b"HTTP/1.0 400")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: identity\r\n\r\n")
        reply = b""
        while chunk := c.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"drdaemon_test_value 42.0" in body


def test_a_client_that_does_not_read_is_dropped_after_the_send_timeout(
        monkeypatch: pytest.MonkeyPatch, free_port: Callable[[], int]) -> None:
    monkeypatch.setattr(metrics_server, "SEND_TIMEOUT", 2.0)
    registry = CollectorRegistry()
    big = Gauge("drdaemon_test_big", "many series", ["n"], registry=registry)
    for i in range(20_000):  # some 10 MB: more than the socket buffers hold
        big.labels(f"{i:0500d}").set(i)
    full = len(generate_latest(registry))
    port = free_port()
    server = metrics.serve(f"127.0.0.1:{port}", registry)
    try:
        with socket.socket() as c:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            c.connect(("127.0.0.1", port))
            c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: identity\r\n\r\n")
            c.settimeout(60)
            got = len(c.recv(1))  # the answer has begun: stop reading for a while
            time.sleep(metrics_server.SEND_TIMEOUT + 2)
            try:
                while chunk := c.recv(1 << 20):
                    got += len(chunk)
            except ConnectionResetError:
                pass
        assert got < full  # the server gave up on this client and closed the connection
    finally:
        metrics.shutdown(server)
