"""The /metrics HTTP server, with limits: a fixed number of threads, a deadline per request.

prometheus-client's own server starts a thread per connection and never times a
connection out, so idle or half-sent requests pile up threads without bound. Here
one thread accepts connections and reads request headers without blocking (a
selector), each connection with a deadline (HEADER_TIMEOUT from accept to the end
of its headers); only a complete request is handed to one of WORKERS threads,
which renders it with prometheus-client's WSGI app into memory, sends it within
SEND_TIMEOUT in all and closes the connection (no keep-alive). Connections
waiting for their headers are capped (MAX_PENDING): over the cap the oldest
waiting one is closed, so a flood of idle connections never locks out a scrape;
complete requests beyond MAX_QUEUED waiting for a worker get a 503 at once.

It speaks plain HTTP with no authentication: bind it to loopback or a private
network, or put a TLS proxy with authentication in front of it (docs/reference.md,
"Metrics beyond loopback").
"""

from __future__ import annotations

import contextlib
import io
import logging
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.client import HTTPMessage, parse_headers
from typing import Any
from urllib.parse import unquote
from wsgiref.handlers import SimpleHandler

from prometheus_client import CollectorRegistry, make_wsgi_app

log = logging.getLogger("drdaemon")

WORKERS = 4  # threads that render responses; a scrape takes milliseconds
MAX_PENDING = 64  # connections still sending their headers
HEADER_TIMEOUT = 5.0  # seconds from accept to the end of the request headers
SEND_TIMEOUT = 10.0  # seconds to send a whole response
MAX_QUEUED = 16  # complete requests answered or waiting for a worker
MAX_HEADER_BYTES = 16 << 10
_TICK = 0.25  # how often deadlines are checked


@dataclass
class _Pending:
    sock: socket.socket
    peer: Any
    deadline: float
    data: bytearray = field(default_factory=bytearray)


class MetricsServer:
    """Serves a WSGI app on (host, port) within the limits above; stop with shutdown()."""

    def __init__(self, host: str, port: int, app: Callable[..., Any],
                 header_timeout: float = HEADER_TIMEOUT) -> None:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(sockaddr)
            self.socket.listen(128)
        except OSError:
            self.socket.close()
            raise
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()[:2]
        self.app = app
        self.header_timeout = header_timeout
        self.pending: dict[int, _Pending] = {}  # by fd, oldest first
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.socket, selectors.EVENT_READ)
        self.workers = ThreadPoolExecutor(WORKERS, thread_name_prefix="drdaemon-metrics")
        self.queued = 0  # requests handed to the workers and not yet answered
        self.queued_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="drdaemon-metrics-accept",
                                        daemon=True)
        self._thread.start()

    # -- the selector thread ---------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            for key, _ in self.selector.select(_TICK):
                if key.fileobj is self.socket:
                    self._accept()
                else:
                    self._read(key.fd)
            self._expire(time.monotonic())
        for p in list(self.pending.values()):
            self._drop(p)
        self.selector.close()

    def _accept(self) -> None:
        try:
            sock, peer = self.socket.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:  # e.g. out of file descriptors: try again later
            log.warning("metrics: cannot accept a connection: %s", exc)
            return
        if len(self.pending) >= MAX_PENDING:
            self._drop(next(iter(self.pending.values())))  # the oldest waits longest
        sock.setblocking(False)
        p = _Pending(sock, peer, time.monotonic() + self.header_timeout)
        self.pending[sock.fileno()] = p
        self.selector.register(sock, selectors.EVENT_READ)

    def _read(self, fd: int) -> None:
        p = self.pending.get(fd)
        if p is None:
            return
        try:
            chunk = p.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk or len(p.data) + len(chunk) > MAX_HEADER_BYTES:
            self._drop(p)
            return
        p.data += chunk
        if b"\r\n\r\n" in p.data or b"\n\n" in p.data:
            self._unregister(p)
            with self.queued_lock:
                busy = self.queued >= MAX_QUEUED
                self.queued += 0 if busy else 1
            if busy:
                with contextlib.suppress(OSError):
                    p.sock.send(_reply(503, b"busy: try again\n"))
                p.sock.close()
                return
            self.workers.submit(self._respond, p)

    def _expire(self, now: float) -> None:
        for p in [p for p in self.pending.values() if p.deadline <= now]:
            self._drop(p)

    def _unregister(self, p: _Pending) -> None:
        self.pending.pop(p.sock.fileno(), None)
        self.selector.unregister(p.sock)

    def _drop(self, p: _Pending) -> None:
        self._unregister(p)
        p.sock.close()

    # -- the worker threads ----------------------------------------------------

    def _respond(self, p: _Pending) -> None:
        try:
            environ = self._environ(p)
            if environ is None:
                response = _reply(400, b"bad request\n")
            else:
                out = io.BytesIO()
                SimpleHandler(io.BytesIO(), out, sys.stderr, environ,
                              multithread=True).run(self.app)
                response = out.getvalue()
            _send_within(p.sock, response, time.monotonic() + SEND_TIMEOUT)
        except OSError:
            pass  # the client went away or was too slow to read
        except Exception:
            log.exception("metrics: cannot answer a request")
        finally:
            p.sock.close()
            with self.queued_lock:
                self.queued -= 1

    def _environ(self, p: _Pending) -> dict[str, Any] | None:
        head = bytes(p.data)
        line, _, rest = head.partition(b"\n")
        parts = line.decode("latin-1").strip().split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return None
        method, target, protocol = parts
        headers: HTTPMessage = parse_headers(io.BytesIO(rest))
        path, _, query = target.partition("?")
        env: dict[str, Any] = {
            "REQUEST_METHOD": method, "PATH_INFO": unquote(path, "latin-1"),
            "QUERY_STRING": query, "SERVER_PROTOCOL": protocol, "SCRIPT_NAME": "",
            "SERVER_NAME": str(self.server_address[0]), "SERVER_PORT": str(self.server_address[1]),
            "REMOTE_ADDR": str(p.peer[0]) if isinstance(p.peer, tuple) else "",
            "CONTENT_LENGTH": "", "CONTENT_TYPE": headers.get("content-type", ""),
        }
        for name, value in headers.items():
            key = "HTTP_" + name.upper().replace("-", "_")
            if key not in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
                env[key] = value
        return env

    # -- the interface the daemon uses -----------------------------------------

    def shutdown(self) -> None:
        """Stop accepting, close waiting connections, let answers in progress finish."""
        self._stop.set()
        self._thread.join()
        self.workers.shutdown(wait=True)

    def server_close(self) -> None:
        self.socket.close()


def _reply(status: int, body: bytes) -> bytes:
    reason = {400: "Bad Request", 503: "Service Unavailable"}[status]
    return (f"HTTP/1.0 {status} {reason}\r\nConnection: close\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _send_within(sock: socket.socket, data: bytes, deadline: float) -> None:
    """Send all of `data` before `deadline` (monotonic), or raise TimeoutError."""
    view = memoryview(data)
    while view:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the client reads too slowly")
        sock.settimeout(left)
        view = view[sock.send(view):]


def serve_registry(host: str, port: int, registry: CollectorRegistry) -> MetricsServer:
    """Serve `registry` at /metrics (and /) on host:port in the background."""
    return MetricsServer(host, port, make_wsgi_app(registry))


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` from `[daemon] metrics_address`; an empty host means every interface."""
    host, _, port = address.rpartition(":")
    return host or "0.0.0.0", int(port)


# The name the scheduler knows the server by.
WSGIServer = MetricsServer


def serve(address: str, registry: CollectorRegistry | Callable[..., Any]) -> MetricsServer:
    """Serve /metrics on `address` with bounded threads and timeouts, from a registry or
    a WSGI app (exposition.wsgi_app); stop with :func:`shutdown`."""
    host, port = parse_address(address)
    if isinstance(registry, CollectorRegistry):
        return serve_registry(host, port, registry)
    return MetricsServer(host, port, registry)


def shutdown(server: MetricsServer) -> None:
    """Stop `server` and close its socket."""
    server.shutdown()
    server.server_close()
