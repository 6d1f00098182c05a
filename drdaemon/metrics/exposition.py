"""What a scrape is served: the state rendered once per change, kept in memory.

With a thousand sources the state renders to ~2.7 MiB (~28,000 series), and
rendering it with prometheus-client costs a few tenths of a second of CPU (more
on a loaded host), which every scrape paid. The state changes when the daemon
hands it an observation (a refresh every few minutes, a job that starts or
ends), not when Prometheus asks; so :class:`Exposition` keeps the bytes it
rendered, per format (text, OpenMetrics) and gzipped, until the state's lock
has counted a change (state.StateLock). What depends on the clock (the ages,
render.timed_families) and the process's own collectors are rendered at every
scrape, and appended: a gzip member of their own when the client takes gzip
(RFC 1952 allows a series of members; Prometheus reads them as one body).
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector, Metric

from .render import state_families, timed_families
from .state import MetricsState

_EOF = b"# EOF\n"  # OpenMetrics' end of a body: only the last part keeps it
MAX_FORMATS = 4  # formats kept rendered at once (a client chooses one by its Accept header)


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


@dataclass
class _Rendered:
    changes: int  # the state's change count it was rendered at
    raw: bytes
    encoder: Callable[[Collector], bytes]
    gzipped: bytes | None = None


class Exposition:
    """The /metrics body of `state` and the `live` collectors, the state's part rendered
    once per change of the state and format."""

    def __init__(self, state: MetricsState, clock: Callable[[], datetime],
                 live: CollectorRegistry) -> None:
        self.state = state
        self.clock = clock
        self.live = live
        self.renders = 0  # how often the state's families were rendered (tests, bench)
        self._cache: dict[str, _Rendered] = {}  # by content type, oldest first
        self._lock = threading.Lock()  # one render at a time; the others reuse it

    def body(self, accept: str | None, accept_encoding: str | None = None
             ) -> tuple[bytes, list[tuple[str, str]]]:
        """The body for a request's Accept and Accept-Encoding headers, and its headers."""
        encoder, ctype = choose_encoder(accept or "")
        zipped = gzip_accepted(accept_encoding or "")
        rendered, timed = self._state_part(encoder, ctype, zipped)
        rest = _open(encoder(_Families(timed)), ctype) + encoder(self.live)
        headers = [("Content-Type", ctype)]
        if not zipped:
            return rendered.raw + rest, headers
        assert rendered.gzipped is not None
        return (rendered.gzipped + gzip.compress(rest, 1),
                [*headers, ("Content-Encoding", "gzip")])

    def prime(self) -> None:
        """Render the state now in every format served so far (plain text if none), so
        that the next scrape finds it ready: what the daemon does after a refresh."""
        with self._lock:
            kinds = [(r.encoder, ctype) for ctype, r in self._cache.items()] or \
                [choose_encoder("")]
        for encoder, ctype in kinds:
            self._state_part(encoder, ctype, zipped=False)

    def _state_part(self, encoder: Callable[[Collector], bytes], ctype: str,
                    zipped: bool) -> tuple[_Rendered, list[Metric]]:
        """The state's part in this format (rendered again only if the state changed
        since), without OpenMetrics' end, and the timed families at this moment."""
        with self._lock:
            with self.state.lock.reading():
                changes = self.state.lock.changes
                cached = self._cache.get(ctype)
                fresh = None if cached is not None and cached.changes == changes else \
                    state_families(self.state)
                timed = timed_families(self.state, self.clock())
            if fresh is not None:  # encoded outside the state's lock: jobs need not wait
                self.renders += 1
                self._cache.pop(ctype, None)
                cached = self._cache[ctype] = _Rendered(
                    changes, _open(encoder(_Families(fresh)), ctype), encoder)
                while len(self._cache) > MAX_FORMATS:
                    self._cache.pop(next(iter(self._cache)))
            assert cached is not None
            if zipped and cached.gzipped is None:
                cached.gzipped = gzip.compress(cached.raw, 1)
            return cached, timed


def _open(body: bytes, ctype: str) -> bytes:
    """`body` without OpenMetrics' end marker (only the last part keeps it)."""
    return body.removesuffix(_EOF) if ctype.startswith("application/openmetrics-text") \
        else body


def wsgi_app(exposition: Exposition, full: CollectorRegistry
             ) -> Callable[[dict[str, object], Callable[..., object]], list[bytes]]:
    """A WSGI app like prometheus-client's make_wsgi_app, serving `exposition`; a request
    for some families only (``?name[]=...``) is rendered from `full`, the same collectors
    read afresh."""
    from prometheus_client import make_wsgi_app

    filtered = make_wsgi_app(full)

    def app(environ: dict[str, object], start_response: Callable[..., object]) -> list[bytes]:
        params = parse_qs(str(environ.get("QUERY_STRING", "")))
        if (environ.get("REQUEST_METHOD") != "GET" or "name[]" in params
                or environ.get("PATH_INFO") == "/favicon.ico"):
            out: list[bytes] = filtered(environ, start_response)
            return out
        body, headers = exposition.body(_header(environ, "HTTP_ACCEPT"),
                                        _header(environ, "HTTP_ACCEPT_ENCODING"))
        start_response("200 OK", headers)
        return [body]
    return app


def _header(environ: dict[str, object], key: str) -> str | None:
    value = environ.get(key)
    return value if isinstance(value, str) else None
