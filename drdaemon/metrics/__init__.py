"""Prometheus metrics: a collector that renders cached state and never touches storage.

A scrape must stay fast with a thousand sources however slow a bucket is, so
nothing here lists a bucket when Prometheus asks. The daemon keeps a
:class:`MetricsState` (plain data) up to date by handing it observations:
after each job one built from the job's report, after each snapshot a listing
of that one source, after each maintenance job and every few minutes a listing
of everything (drdaemon/metrics_feed.py builds them); a scrape only renders the
cache (:func:`families`), and only what changed since it was last rendered
(exposition.py: the state's part is kept in memory until an observation changes it).

The package imports no service (backup, prune, catalog, status, ...): jobs
depend on the metrics, never the other way round (tests/test_metrics_imports.py).

- observations.py: the plain data jobs hand in, one type per kind of outcome
  (InventoryRun: data in storage that no configured source owns any more; StandbySeen:
  a hot standby as the last poll judged it; KeysRun: when each operator recipient was
  last proven, tenant keys lacking one);
- views.py: pure views (:func:`source_view`, :func:`failure_reason`,
  :func:`drill_views`, :func:`schedule_view`, :func:`audit_views`, :func:`orphan_views`);
- state.py: :class:`MetricsState` and how each observation changes it;
- render.py: :func:`families`, :class:`StateCollector`, :func:`build_registry`,
  :func:`standby_registry` (`drdaemon_active`);
- exposition.py: :class:`Exposition`, what a scrape is served: the state rendered once
  per change (:func:`wsgi_app`);
- persist.py: the orphan gauges kept in the state folder across restarts;
- server.py: the bounded /metrics HTTP server (:func:`serve`, :func:`shutdown`).

Conventions: names start with ``drdaemon_``, values are in seconds and bytes,
timestamps are Unix seconds. Labels are bounded by the config (source, tenant,
tier, region, job_name) or by a fixed set (reason, outcome, status, verdict);
never a snapshot id. ``job_name`` rather than ``job`` because Prometheus owns ``job``.
"""

from __future__ import annotations

from .. import __version__
from .exposition import Exposition, wsgi_app
from .observations import (
    AnchorRun,
    AuditCopy,
    AuditRun,
    CopyVerified,
    DrillRecordLike,
    InventoryRun,
    KeysRun,
    ListedSnapshot,
    OrphanSeen,
    PruneRun,
    QueueKind,
    QueueRead,
    RecipientSeen,
    RepairDone,
    ReplicateRun,
    SnapshotAttempt,
    SourceListing,
    StandbySeen,
    StorageRefresh,
    TenantLifecycle,
    UnmanagedSeen,
    VerifyRun,
)
from .persist import ORPHANS_FILE, load_orphans, orphans_path, save_orphans
from .render import (
    REGION_LABELS,
    SOURCE_LABELS,
    StateCollector,
    build_registry,
    families,
    live_registry,
    standby_registry,
)
from .server import MetricsServer, WSGIServer, parse_address, serve, shutdown
from .state import MetricsState
from .views import (
    ERASURE_OUTCOMES,
    FAILURE_REASONS,
    PROMISED_SPAN,
    STANDBY_STATES,
    TENANT_STATES,
    AuditView,
    DrillView,
    OrphanView,
    SourceInfo,
    SourceView,
    audit_views,
    drill_views,
    failure_reason,
    orphan_views,
    retention_span_target,
    schedule_view,
    source_view,
)

__all__ = [
    "ERASURE_OUTCOMES", "FAILURE_REASONS", "ORPHANS_FILE", "PROMISED_SPAN", "REGION_LABELS",
    "SOURCE_LABELS", "STANDBY_STATES", "TENANT_STATES",
    "AnchorRun", "AuditCopy", "AuditRun", "AuditView", "CopyVerified", "DrillRecordLike",
    "DrillView", "Exposition",
    "InventoryRun", "KeysRun",
    "ListedSnapshot", "MetricsServer", "MetricsState", "OrphanSeen", "OrphanView", "PruneRun",
    "QueueKind", "QueueRead",
    "RecipientSeen", "RepairDone", "ReplicateRun", "SnapshotAttempt", "SourceInfo",
    "SourceListing", "SourceView", "StandbySeen", "StateCollector", "StorageRefresh",
    "TenantLifecycle",
    "UnmanagedSeen",
    "VerifyRun", "WSGIServer", "__version__",
    "audit_views", "build_registry", "drill_views", "failure_reason", "families",
    "live_registry", "load_orphans", "orphan_views", "orphans_path", "parse_address",
    "retention_span_target",
    "save_orphans", "schedule_view", "serve", "shutdown", "source_view", "standby_registry",
    "wsgi_app",
]
