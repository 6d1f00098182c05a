"""A loopback TCP proxy that resets some connections, standing for flaky storage."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading


class FlakyProxy:
    """Forwards 127.0.0.1:port to `upstream`; every `every`-th connection is reset
    after `after_bytes` of the request have passed (0 = at once)."""

    def __init__(self, upstream: tuple[str, int], every: int, after_bytes: int = 0,
                 throttle: bool = False) -> None:
        self.upstream, self.every, self.after = upstream, every, after_bytes
        # throttle: answer the flaky connections "503 SlowDown" as S3 does under load,
        # instead of resetting them.
        self.throttle = throttle
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.resets = 0
        self._open: set[socket.socket] = set()
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self._open.add(client)
            flaky = self.connections % self.every == 0
            threading.Thread(target=self._serve, args=(client, flaky), daemon=True).start()

    def _serve(self, client: socket.socket, flaky: bool) -> None:
        if flaky and self.throttle:
            self._slow_down(client)
            return
        try:
            upstream = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        budget = [self.after if flaky else -1]

        def pipe(src: socket.socket, dst: socket.socket, count: bool) -> None:
            try:
                while data := src.recv(65536):
                    if count and budget[0] >= 0:
                        budget[0] -= len(data)
                        if budget[0] < 0:
                            self.resets += 1
                            # SO_LINGER 0: close with a TCP reset, as a broken network does
                            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                              struct.pack("ii", 1, 0))
                            client.close()
                            upstream.close()
                            return
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=pipe, args=(upstream, client, False), daemon=True)
        t.start()
        pipe(client, upstream, True)
        t.join(timeout=60)
        for s in (client, upstream):
            with contextlib.suppress(OSError):
                s.close()

    def _slow_down(self, client: socket.socket) -> None:
        self.resets += 1
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                b"<Message>Please reduce your request rate.</Message></Error>")
        with contextlib.suppress(OSError):
            client.settimeout(5)
            client.recv(65536)  # the request line and headers, at least
            client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                           b"Connection: close\r\nContent-Length: " + str(len(body)).encode()
                           + b"\r\n\r\n" + body)
            client.shutdown(socket.SHUT_WR)
        client.close()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()

    def cut(self) -> None:
        """The region goes dark: refuse new connections, reset the open ones."""
        self.close()
        for client in list(self._open):
            with contextlib.suppress(OSError):
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
