"""Observations: what the jobs hand the metrics, as plain data.

The daemon builds one of these per outcome from a service's report (or from a
storage listing, metrics_feed.py) and hands it to :class:`~.state.MetricsState`.
They name no service type, so the metrics package imports no service: the
dependency points from the jobs to the metrics. Times are Unix seconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class SnapshotAttempt:
    """One snapshot attempt of one source; `reason` is the failure's bounded label."""

    source: str
    ok: bool
    reason: str = "other"  # one of views.FAILURE_REASONS; read only when not ok


@dataclass(frozen=True)
class StandbySeen:
    """One hot standby as the last poll judged it (standby.py); None: unknown."""

    standby: str
    source: str  # the postgres source on its primary; "" if none is named
    up: bool
    state: str  # one of views.STANDBY_STATES
    lag_bytes: int | None
    lag_seconds: float | None
    paused: bool
    stalled_seconds: float
    max_lag_bytes: int
    max_lag_seconds: float
    polled_at: float


@dataclass(frozen=True)
class QueueKind:
    """The cluster's job queue, jobs of one kind (snapshot, drill, verify) as last read."""

    kind: str
    waiting: int  # runnable now, not taken yet
    scheduled: int  # a retry waiting for its time
    running: int
    failed: int  # failed in the last day
    oldest_wait: float  # seconds the oldest waiting job has waited (0: none waits)


@dataclass(frozen=True)
class QueueRead:
    """One read of the cluster's job queue by the scheduler (cluster/queue.py)."""

    kinds: tuple[QueueKind, ...]
    workers: int  # workers with a recent heartbeat
    capacity: int  # jobs one worker runs at once ([cluster] max_concurrent_snapshots)
    max_wait: float  # [cluster] max_queue_wait, seconds
    read_at: float


@dataclass(frozen=True)
class TenantLifecycle:
    """One tenant's lifecycle state, as the refresh read it from the state folder."""

    tenant: str
    state: str  # one of views.TENANT_STATES
    erase_due: float | None  # the erasure deadline; None before offboarding
    held: bool


@dataclass(frozen=True)
class OrphanSeen:
    """One orphan data object a prune run left where it was (not deleted)."""

    source: str
    region: str
    verdict: str  # prune's: keep, delete, locked, blocked or lost
    size: int
    first_seen: float


@dataclass(frozen=True)
class PruneRun:
    """What one prune run did and found."""

    trashed: tuple[tuple[str, str], ...] = ()  # (source, region) per snapshot moved to trash
    orphans_deleted: tuple[tuple[str, str], ...] = ()  # (source, region) per orphan deleted
    # (source, region) pairs the run read: their orphans are replaced by `orphans`;
    # a pair that could not be read keeps its last known orphans.
    observed: frozenset[tuple[str, str]] = frozenset()
    orphans: tuple[OrphanSeen, ...] = ()


@dataclass(frozen=True)
class UnmanagedSeen:
    """A source found in storage but not in the config (inventory.py), as last listed."""

    source: str
    tenant: str  # its newest manifest's tenant label; "" if none could be read
    bytes: int  # in every region together
    newest: float | None  # creation time of its newest snapshot; None: no manifest seen
    erase_after: float  # seconds: its tenant's erasure window (28 days if not configured)


@dataclass(frozen=True)
class InventoryRun:
    """What one listing of every region's `sources/` found unmanaged; complete: every
    region could be listed (else the last known unmanaged sources are kept)."""

    unmanaged: tuple[UnmanagedSeen, ...] = ()
    complete: bool = True


@dataclass(frozen=True)
class RepairDone:
    """One replica repair into `region`."""

    source: str
    region: str
    ok: bool


@dataclass(frozen=True)
class ReplicateRun:
    repairs: tuple[RepairDone, ...] = ()


@dataclass(frozen=True)
class CopyVerified:
    """One copy (a snapshot in a region) checked by a verify run."""

    source: str
    region: str
    ok: bool
    status: str  # verify's status constant


@dataclass(frozen=True)
class VerifyRun:
    copies: tuple[CopyVerified, ...] = ()


@dataclass(frozen=True)
class AuditCopy:
    """One copy of the audit log as a check found it."""

    ok: bool  # the chain verified (and, for a region, agreed with the local log)
    records: int  # records that verified, up to the first bad one
    other_chains: int = 0  # a region: this host's chains there other than the local log's


@dataclass(frozen=True)
class AnchorRun:
    """An anchoring run: when, the newest anchor's own time, and where it failed."""

    checked_at: float
    anchored: bool  # the log's head is anchored everywhere configured (or there is no log)
    newest: float | None  # the time of the anchor covering the head, if any
    failures: tuple[str, ...] = ()  # places not written or stamped: tsa, state, a region, ...


@dataclass(frozen=True)
class AuditRun:
    """An audit check: the local log and each region whose copy could be read."""

    checked_at: float
    local: AuditCopy
    regions: Mapping[str, AuditCopy] = field(default_factory=dict)


@dataclass(frozen=True)
class RecipientSeen:
    """A configured operator recipient and its newest successful proof (None: never)."""

    name: str
    fingerprint: str
    last_proven: float | None


@dataclass(frozen=True)
class KeysRun:
    """The daemon's keys check (proof_log.py): every configured recipient, and per
    (tenant, recipient fingerprint) how many of the tenant's keys are not wrapped to it."""

    recipients: tuple[RecipientSeen, ...]
    missing: Mapping[tuple[str, str], int] = field(default_factory=dict)


@dataclass(frozen=True)
class ListedSnapshot:
    """One snapshot with a readable manifest, as a storage listing found it."""

    id: str
    consistency_time: float
    regions: tuple[str, ...]  # regions holding an authenticated manifest
    duration: float  # from its start to its manifest
    plaintext_bytes: int
    compressed_bytes: int
    stored_bytes: int


@dataclass(frozen=True)
class SourceListing:
    """One source as a storage refresh found it, with the status judgement of it."""

    source: str
    snapshots: tuple[ListedSnapshot, ...] = ()
    unreadable: tuple[str, ...] = ()  # a region per manifest listed there that cannot be read
    newest_id: str | None = None  # the newest snapshot, as `drctl status` judges it
    holding_newest: tuple[str, ...] = ()  # the regions holding it
    attempted: bool = False  # an attempt is recorded, finished or cut off
    pending_retry: bool = False  # the newest attempt failed or never finished


class DrillRecordLike(Protocol):
    """The fields of a drill record that metrics read (drills.records.DrillRecord)."""

    source: str
    tier: str
    ok: bool  # verified *and* inside every target
    verified: bool  # the restore produced a copy that matched the manifest's facts
    rto_seconds: float | None
    rpo_seconds: float | None
    rto_target_seconds: float
    rpo_target_seconds: float
    projected_tier_rto_seconds: float | None
    finished_at: str


@dataclass(frozen=True)
class StorageRefresh:
    """What a refresh read from storage, the state folder and the drill records."""

    at: float
    reachable: tuple[str, ...]  # regions that could be listed
    sources: tuple[SourceListing, ...]
    # The drill records of configured sources: a full refresh only (None: one source).
    drills: Sequence[DrillRecordLike] | None = None
    # The recovery plan's ETA (seconds after a recovery would begin) per tier and per
    # source, from recovery_plan.py (a full refresh only; empty without any drill).
    plan_tier_eta: Mapping[str, float] | None = None
    plan_source_eta: Mapping[str, float] | None = None
