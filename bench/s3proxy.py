"""A counting HTTP proxy for one moto S3 server, with optional added latency (bench/scale.py).

moto in server mode keeps no request counter, so bench/scale.py puts one of these on
loopback in front of each moto server and points drdaemon's region at it. Every S3
request is counted by kind (LIST, GET, PUT, HEAD, POST, DELETE, other) and, when
latency is set, delayed by that many milliseconds before it is forwarded — what a
real network's round trip adds to each request.

Control requests (never counted, never delayed):

    GET  /__proxy/counts          -> {"LIST": n, "GET": n, ...}
    POST /__proxy/reset           -> counts back to zero
    POST /__proxy/latency?ms=20   -> set the added latency

    python bench/s3proxy.py LISTEN_PORT UPSTREAM_PORT     # prints "ok" when listening
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

UPSTREAM = ("127.0.0.1", 0)
COUNTS: Counter[str] = Counter()
LOCK = threading.Lock()
LATENCY = [0.0]  # seconds
HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


def kind(method: str, path: str) -> str:
    """What an S3 request is, for the counts: LIST (bucket listing of objects or uploads)."""
    parts = urlsplit(path)
    query = parse_qs(parts.query, keep_blank_values=True)
    key = parts.path.lstrip("/").partition("/")[2]
    if method == "GET" and not key and ("list-type" in query or "uploads" in query
                                         or "prefix" in query or not query):
        return "LIST"
    return method if method in ("GET", "PUT", "HEAD", "POST", "DELETE") else "other"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    _local = threading.local()

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _control(self) -> bool:
        if not self.path.startswith("/__proxy/"):
            return False
        if self.path.startswith("/__proxy/reset"):
            with LOCK:
                COUNTS.clear()
        elif self.path.startswith("/__proxy/latency"):
            LATENCY[0] = float(parse_qs(urlsplit(self.path).query)["ms"][0]) / 1000
        with LOCK:
            body = json.dumps(dict(COUNTS)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return True

    def _upstream(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(*UPSTREAM, timeout=600)
            self._local.conn = conn
        return conn

    def _forward(self) -> None:
        body = self._body()
        if self._control():
            return
        with LOCK:
            COUNTS[kind(self.command, self.path)] += 1
        if LATENCY[0]:
            time.sleep(LATENCY[0])
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        for attempt in (0, 1):
            conn = self._upstream()
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (http.client.HTTPException, OSError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in HOP and k.lower() != "content-length":
                self.send_header(k, v)
        # A HEAD's length is the object's, not the (empty) body's.
        length = resp.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


def main() -> None:
    global UPSTREAM
    listen, upstream = int(sys.argv[1]), int(sys.argv[2])
    UPSTREAM = ("127.0.0.1", upstream)
    server = ThreadingHTTPServer(("127.0.0.1", listen), Handler)
    server.daemon_threads = True
    print("ok", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
