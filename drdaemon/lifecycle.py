"""A tenant's lifecycle: offboarding, legal hold and the erasure deadline.

Functional core (pure, an injected `now`): :class:`TenantState` and the
decisions over it: :func:`deadline`, :func:`state_name`, :func:`is_due`,
:func:`is_overdue`, :func:`due_within`, :func:`due_erasures`, :func:`still_scheduled`,
:func:`describe`.

Imperative shell: the state lives in the state folder as
``tenants/<tenant>/lifecycle.json`` (statefs; written atomically) or, with
``[daemon] lock_dsn``, under the same key in the cluster's shared state
(shared_state.py). Every read-modify-write goes through :func:`update`, under
the store's lock (a flock on ``tenants/<tenant>/lifecycle.lock``, or the key's
advisory transaction lock in PostgreSQL), and keeps what it does not own: the
erasure service records its progress under the ``"erasure"`` key of the same
file, and unknown keys there or at the top level survive every save.

Dates: ``end`` is the day the service ends, taken from 00:00 UTC of that day
(the earlier reading, so the deletion promise is never stretched); the erasure
deadline is ``end + erase_after``. The daemon carries an erasure out from
:data:`ERASE_LEAD` before its deadline, so that a daily job meets it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from . import shared_state, statefs, tenancy
from .config import NAME_HINT, NAME_RE, Config, SourceConfig
from .errors import UsageError
from .runtime import Runtime

# The contract's promise: every copy deleted within 4 weeks of the end of service
# (a tenant's own `[[tenants]] erase_after`, at most this, when it has one).
DEFAULT_ERASE_AFTER = tenancy.DEFAULT_ERASE_AFTER
ERASE_LEAD = timedelta(days=1)  # carried out this long before the deadline
DUE_SOON = timedelta(days=3)  # the "erasure due soon" warning window
STATE_VERSION = 1
MAX_STATE_BYTES = 1 << 20

ACTIVE, OFFBOARDED, HELD, ERASED = "active", "offboarded", "held", "erased"
STATES = (ACTIVE, OFFBOARDED, HELD, ERASED)


# -- functional core ---------------------------------------------------------

@dataclass(frozen=True)
class Hold:
    """A legal hold: why, who placed it (user and host), since when."""

    reason: str
    by: str
    host: str
    since: datetime


@dataclass(frozen=True)
class Erasure:
    """The erasure's progress, as the erasure service records it."""

    started: datetime | None = None
    finished: datetime | None = None
    certificate: str | None = None  # the certificate's name (state folder and regions)


@dataclass(frozen=True)
class TenantState:
    """Everything drdaemon keeps about one tenant's end of service."""

    tenant: str
    end: date | None = None
    erase_due: datetime | None = None
    hold: Hold | None = None
    erasure: Erasure | None = None
    final_snapshot_done: bool = False
    offboarded_at: datetime | None = None  # when `drctl tenant offboard` first recorded it

    @property
    def erased(self) -> bool:
        return self.erasure is not None and self.erasure.finished is not None


def end_instant(end: date) -> datetime:
    """The moment the service ends: 00:00 UTC of the end day."""
    return datetime.combine(end, time(0), tzinfo=UTC)


def deadline(end: date, erase_after: timedelta = DEFAULT_ERASE_AFTER) -> datetime:
    """When every copy must be gone: the end of service plus `erase_after`."""
    return end_instant(end) + erase_after


def state_name(s: TenantState) -> str:
    """One of STATES: erased wins, then a hold, then an end of service."""
    if s.erased:
        return ERASED
    if s.hold is not None:
        return HELD
    return OFFBOARDED if s.end is not None else ACTIVE


def _pending(s: TenantState) -> datetime | None:
    """The deadline of an erasure not yet finished, or None."""
    return None if s.erased else s.erase_due


def is_due(s: TenantState, now: datetime) -> bool:
    """The erasure is to be carried out now (held or not): within ERASE_LEAD of its deadline."""
    due = _pending(s)
    return due is not None and now >= due - ERASE_LEAD


def is_overdue(s: TenantState, now: datetime) -> bool:
    """The deadline has passed and the erasure is not finished."""
    due = _pending(s)
    return due is not None and now > due


def due_within(s: TenantState, now: datetime, window: timedelta = DUE_SOON) -> bool:
    """The deadline is at most `window` away (or past) and the erasure is not finished."""
    due = _pending(s)
    return due is not None and due - now <= window


def due_erasures(states: Iterable[TenantState], now: datetime) -> list[str]:
    """Tenants whose erasure is due now and not suspended by a legal hold, sorted."""
    return sorted(s.tenant for s in states if is_due(s, now) and s.hold is None)


def still_scheduled(s: TenantState | None) -> bool:
    """Whether the daemon still snapshots the tenant's sources: not once offboarded."""
    return s is None or (s.end is None and not s.erased)


def describe(s: TenantState) -> dict[str, Any]:
    """The offboarding state as plain data, for `drctl tenant show` and --json output."""
    def iso(t: datetime | date | None) -> str | None:
        return None if t is None else t.isoformat()

    e = s.erasure
    return {
        "tenant": s.tenant, "state": state_name(s), "end": iso(s.end),
        "erase_due": iso(s.erase_due), "offboarded_at": iso(s.offboarded_at),
        "final_snapshot_done": s.final_snapshot_done,
        "hold": None if s.hold is None else {
            "reason": s.hold.reason, "by": s.hold.by, "host": s.hold.host,
            "since": s.hold.since.isoformat()},
        "erasure": None if e is None else {
            "started": iso(e.started), "finished": iso(e.finished),
            "certificate": e.certificate},
    }


# -- the file ----------------------------------------------------------------

def state_file(tenant: str) -> str:
    """The tenant's lifecycle state, relative to the state folder."""
    return statefs.tenant_lifecycle_file(check_tenant(tenant))


def check_tenant(tenant: str) -> str:
    """A tenant name as the config allows it (it names a folder), else UsageError."""
    if not NAME_RE.match(tenant):
        raise UsageError(f"invalid tenant name {tenant!r}: {NAME_HINT}")
    return tenant


def _time(v: Any) -> datetime | None:
    if v is None:
        return None
    t = datetime.fromisoformat(v)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _since(v: Any) -> datetime:
    t = _time(v)
    if t is None:
        raise ValueError("a hold without its date")
    return t


def from_dict(tenant: str, d: dict[str, Any]) -> TenantState:
    """Parse the file's content; raises ValueError/KeyError/TypeError when malformed."""
    hold = d.get("hold")
    erasure = d.get("erasure")
    return TenantState(
        tenant=tenant,
        end=date.fromisoformat(d["end"]) if d.get("end") else None,
        erase_due=_time(d.get("erase_due")),
        hold=None if not hold else Hold(str(hold["reason"]), str(hold["by"]),
                                        str(hold.get("host", "")), _since(hold["since"])),
        erasure=None if not erasure else Erasure(_time(erasure.get("started")),
                                                 _time(erasure.get("finished")),
                                                 erasure.get("certificate")),
        final_snapshot_done=bool(d.get("final_snapshot_done", False)),
        offboarded_at=_time(d.get("offboarded_at")))


def to_dict(s: TenantState, keep: dict[str, Any] | None = None) -> dict[str, Any]:
    """The file's content: `keep` (what was read) with the keys this module owns replaced;
    unknown keys, also inside "erasure", survive."""
    out = dict(keep or {})
    desc = describe(s)
    out.update({k: desc[k] for k in ("tenant", "end", "erase_due", "offboarded_at",
                                     "final_snapshot_done", "hold")})
    out["version"] = STATE_VERSION
    if desc["erasure"] is None:
        out.pop("erasure", None)
    else:
        old = out.get("erasure")
        out["erasure"] = {**(old if isinstance(old, dict) else {}), **desc["erasure"]}
    return out


def _parse_raw(tenant: str, raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        return {}
    if len(raw) > MAX_STATE_BYTES:
        raise UsageError(f"state folder: {state_file(tenant)} is larger than "
                         f"{MAX_STATE_BYTES} bytes; it is not drdaemon's")
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        from_dict(tenant, data)  # fail here, with the file named, not later
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"state folder: {state_file(tenant)} is malformed ({exc}); "
                         "restore it from a backup of the state folder") from None
    return data


def load(rt: Runtime, tenant: str) -> TenantState:
    """The tenant's state (a fresh, active one if nothing was recorded)."""
    return from_dict(tenant, _parse_raw(tenant, rt.state.read(state_file(tenant))))


def save(rt: Runtime, state: TenantState) -> None:
    """Write `state`, keeping the keys of the file this module does not own."""
    update(rt, state.tenant, lambda _old: state)


def update(rt: Runtime, tenant: str,
           change: Callable[[TenantState], TenantState]) -> TenantState:
    """Read, change and write the tenant's state under its flock; returns the new state.

    `change` may raise (a refusal): then nothing is written.
    """
    done: list[TenantState] = []

    def write(old: bytes | None) -> bytes:
        raw = _parse_raw(tenant, old)
        new = change(from_dict(tenant, raw))
        if new.tenant != tenant:
            raise ValueError(f"state of {new.tenant} saved as {tenant}")
        done.append(new)
        return (json.dumps(to_dict(new, raw), indent=2, sort_keys=True) + "\n").encode()

    rt.state.update(state_file(tenant), write)
    return done[-1]


def recorded_tenants(rt: Runtime) -> list[str]:
    """Tenants with a lifecycle file in the state folder (configured or not)."""
    store = rt.state
    return [t for t in store.children(statefs.TENANTS)
            if NAME_RE.match(t) and _recorded(store, t)]


def _recorded(store: shared_state.StateStore, tenant: str) -> bool:
    folder, name = state_file(tenant).rsplit("/", 1)
    return name in store.children(folder)


def configured_tenants(cfg: Config) -> list[str]:
    """Tenants named by the config's sources, sorted."""
    return sorted({s.tenant for s in cfg.sources})


def load_all(rt: Runtime) -> list[TenantState]:
    """The state of every configured or recorded tenant, by name."""
    names = sorted(set(configured_tenants(rt.config)) | set(recorded_tenants(rt)))
    return [load(rt, t) for t in names]


def is_held(rt: Runtime, tenant: str) -> bool:
    """Whether a legal hold suspends prune and erasure for the tenant."""
    return load(rt, tenant).hold is not None


def with_hold(s: TenantState, hold: Hold | None) -> TenantState:
    """Pure: `s` with its hold placed (keeping the first `since`) or lifted."""
    if hold is not None and s.hold is not None:
        hold = replace(hold, since=s.hold.since)
    return replace(s, hold=hold)


def scheduled(sources: Iterable[SourceConfig],
              states: Mapping[str, TenantState]) -> list[SourceConfig]:
    """Pure: the sources the daemon still snapshots, given their tenants' states."""
    return [s for s in sources if still_scheduled(states.get(s.tenant))]


def source_scheduled(rt: Runtime, source: SourceConfig) -> bool:
    """Whether the daemon still snapshots `source` (its tenant is not offboarded)."""
    return still_scheduled(load(rt, source.tenant))


def states_by_tenant(rt: Runtime) -> dict[str, TenantState]:
    """:func:`load_all`, by tenant name."""
    return {s.tenant: s for s in load_all(rt)}
