"""What /metrics serves is the state rendered once per change of it (issue 16, "Listing at
scale": one scrape under 200 ms with 1,000 sources): a scrape between two changes reuses
the bytes, the ages are still taken at the scrape, and the body is the one a fresh render
of the same state gives, in both formats Prometheus asks for, gzipped or not."""

from __future__ import annotations

import gzip
import urllib.request
from collections.abc import Callable
from datetime import datetime, timedelta

from prometheus_client import generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from test_metrics import NOW, T, registry_of, sample_state

from drdaemon import metrics
from drdaemon.metrics import MetricsState, SourceListing, StorageRefresh

OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
AGE = "drdaemon_oldest_retained_snapshot_age_seconds"


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def samples(text: str, parse: Callable[[str], object] = text_string_to_metric_families
            ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """drdaemon's samples of an exposition body (the process's own left out)."""
    out = {}
    for fam in parse(text):  # type: ignore[attr-defined]
        for s in fam.samples:
            if s.name.startswith("drdaemon_") and s.name != "drdaemon_active":
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def exposition(st: MetricsState, clock: Clock) -> metrics.Exposition:
    return metrics.Exposition(st, clock, metrics.live_registry())


def test_a_scrape_between_changes_reuses_the_render_and_ages_move_with_the_clock() -> None:
    st, clock = sample_state(), Clock()
    ex = exposition(st, clock)
    first = samples(ex.body(None)[0].decode())
    assert first == samples(generate_latest(registry_of(st)).decode())
    age = (AGE, (("region", "eu"), ("source", "db"), ("tenant", "uni-a"), ("tier", "paid")))
    assert first[age] == 86400 * 100
    clock.now = NOW + timedelta(seconds=30)
    second = samples(ex.body(None)[0].decode())
    assert ex.renders == 1  # nothing changed: the state was not rendered again
    assert second[age] == 86400 * 100 + 30  # but the age is the scrape's
    assert {k: v for k, v in second.items() if k[0] != AGE} == \
        {k: v for k, v in first.items() if k[0] != AGE}
    st.record_snapshot(metrics.SnapshotAttempt("db", ok=True))
    third = samples(ex.body(None)[0].decode())
    assert ex.renders == 2
    attempts = ("drdaemon_snapshot_attempts_total",
                (("source", "db"), ("tenant", "uni-a"), ("tier", "paid")))
    assert (first[attempts], third[attempts]) == (3, 4)


def test_openmetrics_and_gzip_bodies_are_whole_and_end_once() -> None:
    st, clock = sample_state(), Clock()
    ex = exposition(st, clock)
    want = samples(generate_latest(registry_of(st)).decode())
    for _ in range(2):  # rendered, then from memory
        body, headers = ex.body(OPENMETRICS, "gzip, deflate")
        assert dict(headers)["Content-Encoding"] == "gzip"
        assert dict(headers)["Content-Type"].startswith("application/openmetrics-text")
        text = gzip.decompress(body).decode()  # several gzip members: one body
        assert text.count("# EOF") == 1 and text.endswith("# EOF\n")
        got = samples(text, openmetrics_families)
        # OpenMetrics names a counter's samples as text does (…_total); values agree.
        assert got == want
    plain, headers = ex.body(None, "gzip")
    assert samples(gzip.decompress(plain).decode()) == want
    assert ex.renders == 2  # once per format


def test_state_complete_is_0_until_a_full_refresh_even_from_memory() -> None:
    st, clock = sample_state(), Clock()
    st.refreshed_at = None
    ex = exposition(st, clock)
    complete = ("drdaemon_state_complete", ())
    assert samples(ex.body(None)[0].decode())[complete] == 0
    one = SourceListing("db", (), (), None, (), False, False)
    st.record_refresh(StorageRefresh(T, ("eu", "us"), (one,), None))  # one source only
    ex.prime()
    assert samples(ex.body(None)[0].decode())[complete] == 0
    st.record_refresh(StorageRefresh(T, ("eu", "us"), (one,), ()))  # everything
    assert samples(ex.body(None)[0].decode())[complete] == 1


def test_the_daemons_endpoint_serves_the_exposition(free_port: Callable[[], int]) -> None:
    st, clock = sample_state(), Clock()
    ex = exposition(st, clock)
    port = free_port()
    server = metrics.serve(f"127.0.0.1:{port}",
                           metrics.wsgi_app(ex, metrics.build_registry(st, clock)))
    try:
        for _ in range(2):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                text = r.read().decode()
            assert "drdaemon_active 1.0" in text and "process_cpu_seconds_total" in text
            assert samples(text) == samples(generate_latest(registry_of(st)).decode())
        assert ex.renders == 1
        # ?name[]= filters are prometheus-client's, from the registry read afresh.
        url = f"http://127.0.0.1:{port}/metrics?name[]=drdaemon_state_complete"
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200
    finally:
        metrics.shutdown(server)


def test_a_queue_read_is_served_at_once_without_rendering_everything_again() -> None:
    """The scheduler reads the cluster's queue every heartbeat: its series are taken at
    each scrape, and a read does not throw away the render of the rest."""
    st, clock = sample_state(), Clock()
    ex = exposition(st, clock)
    ex.body(None)
    for waiting in (3, 7):
        st.record_queue(metrics.QueueRead((metrics.QueueKind("snapshot", waiting, 0, 1, 0,
                                                             12.0),),
                                          workers=3, capacity=2, max_wait=3600.0,
                                          read_at=NOW.timestamp()))
        got = samples(ex.body(None)[0].decode())
        key = ("drdaemon_queue_jobs", (("kind", "snapshot"), ("state", "waiting")))
        assert got[key] == waiting
    assert ex.renders == 1
    clock.now = NOW + timedelta(seconds=9)
    assert samples(ex.body(None)[0].decode())[("drdaemon_queue_read_age_seconds", ())] == 9
