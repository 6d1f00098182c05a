"""A thin counting proxy around a real store: instrumentation, not a mock.

Every call goes to the wrapped LocalStore or S3Store unchanged; the proxy only
notes which operation was asked for which object name or prefix, so tests can
count storage requests (manifest GETs, audit mirror LISTs and PUTs).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, cast

from drdaemon.runtime import Runtime
from drdaemon.storage import ObjectStore

COUNTED = ("get_bytes", "open_read", "put_bytes", "begin_upload", "list", "stat", "delete")


class CountingStore:
    """Forwards everything to `inner`; `calls` counts (operation, name or prefix)."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.calls: Counter[tuple[str, str]] = Counter()

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self.inner, attr)
        if attr not in COUNTED:
            return value

        def counted(name: str, *args: Any, **kwargs: Any) -> Any:
            self.calls[(attr, name)] += 1
            return value(name, *args, **kwargs)

        return counted

    def count(self, op: str, contains: str = "") -> int:
        """Calls of `op` whose name or prefix contains `contains`."""
        return sum(n for (o, name), n in self.calls.items() if o == op and contains in name)

    def manifest_reads(self) -> int:
        return sum(self.count(op, "/manifests/") for op in ("get_bytes", "open_read"))


def count_calls(rt: Runtime) -> dict[str, CountingStore]:
    """Put a counting proxy around each of the runtime's stores; return them by region."""
    proxies = {s.name: CountingStore(s) for s in rt.stores}
    rt.stores = cast(list[ObjectStore], list(proxies.values()))
    return proxies


def reset(proxies: dict[str, CountingStore]) -> None:
    for p in proxies.values():
        p.calls.clear()
