"""Opening the resources every service needs, in one place.

The CLI and the daemon both build a Runtime from a config path and hand it to
the same service functions; nothing else opens stores or reads key files.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import config as config_mod
from .config import Config
from .keys import ManifestKey, ensure_generated_keys, load_manifest_key
from .storage import ObjectStore, open_store


def utcnow() -> datetime:
    """The wall clock, in UTC. Services take a clock so tests can inject one."""
    return datetime.now(UTC)


@dataclass
class Runtime:
    config: Config
    stores: list[ObjectStore]
    manifest_key: ManifestKey
    clock: Callable[[], datetime] = field(default=utcnow)
    # Set when the daemon is asked to stop: streams in flight abort cleanly.
    stopping: threading.Event = field(default_factory=threading.Event)

    def store(self, region: str) -> ObjectStore:
        """The store of one configured region (validated by name)."""
        self.config.region(region)
        return next(s for s in self.stores if s.name == region)

    def ordered_stores(self, first: str | None = None) -> list[ObjectStore]:
        """Stores in config order, with `first` (if given) moved to the front."""
        if first is None:
            return list(self.stores)
        chosen = self.store(first)
        return [chosen] + [s for s in self.stores if s is not chosen]

    def record_event(self, event: str, **fields: Any) -> None:
        """Append one JSON line to the state folder's event log.

        Until the tamper-evident audit log lands, this is the record of what
        drdaemon did; it never holds secrets.
        """
        record = {"time": self.clock().isoformat(), "event": event, **fields}
        path = self.config.daemon.state_dir / "events.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True, default=str) + "\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def load_config(path: str | None) -> Config:
    """Load the config named by --config, $DRDAEMON_CONFIG or the embedded default."""
    return config_mod.load(config_mod.resolve_config_path(path))


def open_runtime(config: Config, clock: Callable[[], datetime] = utcnow) -> Runtime:
    """Generate first-run keys where the config asks for it, then open every region."""
    config = ensure_generated_keys(config)
    config.daemon.state_dir.mkdir(parents=True, exist_ok=True)
    key = load_manifest_key(Path(config.keys.manifest_key_file))
    stores = [open_store(r) for r in config.regions]
    return Runtime(config, stores, key, clock)
