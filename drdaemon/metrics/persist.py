"""Persistence: the orphan gauges of the last prune run, kept in the state folder.

Prune runs daily, and a LOST orphan's alert must not clear because the daemon
restarted in between, so these gauges outlive the process (statefs.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .. import statefs
from .state import MetricsState
from .views import OrphanView

log = logging.getLogger("drdaemon")

ORPHANS_FILE = statefs.ORPHAN_METRICS


def orphans_path(state_dir: Path) -> Path:
    """Where the daemon keeps the orphan gauges of its last prune run."""
    return state_dir / ORPHANS_FILE


def save_orphans(state_dir: Path, st: MetricsState) -> None:
    """Keep the orphan gauges across restarts: prune runs daily, and a LOST
    orphan's alert must not clear because the daemon restarted in between."""
    with st.lock:
        rows = [{"source": s, "region": r, "verdict": v, "objects": o.objects,
                 "bytes": o.bytes, "first_seen": o.first_seen}
                for (s, r, v), o in sorted(st.orphans.items())]
    statefs.write_atomic(state_dir, ORPHANS_FILE,
                         json.dumps({"version": 1, "orphans": rows}, indent=1).encode())


def load_orphans(state_dir: Path, st: MetricsState) -> None:
    """The gauges `save_orphans` kept, for configured sources and regions; a
    missing or unreadable file leaves them empty until the next prune."""
    try:
        rows = json.loads(statefs.read_bytes(state_dir, ORPHANS_FILE))["orphans"]
        found = {(str(row["source"]), str(row["region"]), str(row["verdict"])):
                 OrphanView(int(row["objects"]), int(row["bytes"]), float(row["first_seen"]))
                 for row in rows}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if not isinstance(exc, FileNotFoundError):
            log.warning("orphan gauges not restored from %s: %s", orphans_path(state_dir), exc)
        return
    with st.lock:
        st.orphans = {k: v for k, v in found.items()
                      if k[0] in st.sources and k[1] in st.regions}
