"""Recovery objectives, evaluated: pure functions over times, sizes and targets.

The definitions (README, "Drills"; docs/architecture.md):

- **RPO at a moment**: that moment minus the consistency time of the snapshot
  one would restore (for a drill: the snapshot it restored).
- **Worst gap**: the largest gap between consecutive consistency times of a
  set of snapshots (the worst-case RPO over the period they cover, as far as
  the snapshots still retained can show it).
- **RTO measured**: wall time from the start of a restore to a verified copy.
- **Projected tier RTO**: when the tier's last restore would end if a region
  were lost now and every source were restored in the recovery plan's order,
  paid tiers first (recovery_plan.py, which schedules with the model below):
  for the first tier, the sum over its sources of the model's time for their
  newest snapshot's stored bytes (`projected_tier_rto`). The model
  (:class:`RestoreModel`) is a fixed cost per restore plus bytes over a
  throughput, fitted to the latest drill of every source of the tier
  together, so neither a tiny database (all set-up overhead) nor the newest
  drill alone decides the tier's figure.

A value over its target is a failure; equal to it is still inside it (an
RPO of "24h" promises at most 24 hours of lost data). Nothing here reads a
clock: `now` is always passed in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import pairwise

from .units import format_duration

# Stable reason codes: each failure reason is "<code>: <detail>".
# The RTO split of a drill: these phases add up to the measured RTO.
PHASES = ("download", "decrypt_decompress", "restore", "verify")

RTO_OVER = "rto-over-target"
RPO_OVER = "rpo-over-target"
PROJECTED_RTO_OVER = "projected-rto-over-target"


@dataclass(frozen=True)
class Targets:
    """A tier's recovery objectives: the one shape they have, from the config
    (config.TierConfig is a Targets with a name) to every judgement here."""

    rpo: timedelta
    rto: timedelta


def over(value: timedelta, target: timedelta) -> bool:
    """The one boundary rule for every objective: over its target fails, equal is inside.

    Drills, `drctl status`, the daemon's catch-up and the alert rules (`>` in
    PromQL) all judge with it, so a source is never "overdue" to one and "OK"
    to another.
    """
    return value > target


def rpo_at(consistency_time: datetime, now: datetime) -> timedelta:
    """How much data a restore of a snapshot consistent at `consistency_time` loses at `now`.

    Never negative: a source clock slightly ahead of ours is not data from the future.
    """
    return max(now - consistency_time, timedelta(0))


def worst_gap(times: Iterable[datetime]) -> timedelta | None:
    """The largest gap between consecutive consistency times (None for fewer than two)."""
    ordered = sorted(set(times))
    if len(ordered) < 2:
        return None
    return max(b - a for a, b in pairwise(ordered))


def throughput(nbytes: int, seconds: float) -> float | None:
    """Bytes per second, or None when nothing was measured."""
    if seconds <= 0 or nbytes <= 0:
        return None
    return nbytes / seconds


MAX_SECONDS = timedelta.max.total_seconds() - 86400


@dataclass(frozen=True)
class RestoreModel:
    """A restore takes `fixed_seconds` plus `seconds_per_byte` for each stored byte."""

    fixed_seconds: float
    seconds_per_byte: float
    samples: int  # drills it was fitted to

    def seconds(self, stored_bytes: int) -> float:
        return self.fixed_seconds + stored_bytes * self.seconds_per_byte

    def to_dict(self) -> dict[str, float | int | None]:
        rate = 1 / self.seconds_per_byte if self.seconds_per_byte > 0 else None
        return {"fixed_seconds": self.fixed_seconds, "bytes_per_second": rate,
                "samples": self.samples}


def fit_restore_model(samples: Iterable[tuple[int, float]]) -> RestoreModel | None:
    """The restore model of measured (stored bytes, RTO seconds) pairs; None without any.

    Least squares over the drills together. The fixed cost is held between
    zero and the fastest drill (no restore is quicker than its overhead), and
    the per-byte cost is never negative. With a single size measured the two
    cannot be told apart, and the whole time is charged to the bytes: the
    cautious choice, since it projects a larger source as slower.
    """
    points = [(float(b), float(s)) for b, s in samples if b > 0 and s > 0]
    if not points:
        return None
    if len({b for b, _ in points}) < 2:
        return RestoreModel(0.0, sum(s for _, s in points) / sum(b for b, _ in points),
                            len(points))
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_s = sum(s for _, s in points) / n
    slope = (sum((b - mean_b) * (s - mean_s) for b, s in points)
             / sum((b - mean_b) ** 2 for b, _ in points))
    fixed = min(max(mean_s - slope * mean_b, 0.0), min(s for _, s in points))
    # With the fixed cost clamped, the best slope through it.
    per_byte = max(sum(b * (s - fixed) for b, s in points) / sum(b * b for b, _ in points), 0.0)
    return RestoreModel(fixed, per_byte, n)


def projected_tier_rto(stored_bytes: Iterable[int], model: RestoreModel | None
                       ) -> timedelta | None:
    """Time to restore every given object one after another under `model`."""
    if model is None:
        return None
    total = sum(model.seconds(b) for b in stored_bytes)
    # Absurd inputs (a byte drilled in minutes, terabytes projected) must not crash.
    return timedelta(seconds=min(total, MAX_SECONDS))


def rto_split(*, manifest: float, prepare: float, first_byte: float, stream: float,
              read_wait: float, write_wait: float, restore_finish: float,
              verify: float) -> dict[str, float]:
    """The PHASES of a streaming restore from what a drill measured (seconds).

    Reading, decrypting, decompressing and restoring overlap in one stream, so
    each moment is charged to the stage that held it up: `download` is
    fetching the manifest (and the tenant key that opens it), the time to the
    first byte and the time blocked reading the object; `restore` is creating
    the scratch target, the time blocked writing into pg_restore/tar and
    finishing after the stream; what is left of the stream is age, zstd and
    hashing (`decrypt_decompress`); `verify` is checking the restored copy.
    The four add up to the RTO.
    """
    decrypt = max(stream - first_byte - read_wait - write_wait - restore_finish, 0.0)
    return {"download": manifest + first_byte + read_wait, "decrypt_decompress": decrypt,
            "restore": prepare + write_wait + restore_finish, "verify": verify}


def evaluate(targets: Targets, *, rto: timedelta | None, rpo: timedelta | None,
             projected: timedelta | None) -> list[str]:
    """Failure reasons of measured values against a tier's targets (empty: all inside).

    A value that was not measured (None) is not judged here: whatever stopped
    the measurement is a failure reason of its own.
    """
    reasons = []
    if rto is not None and over(rto, targets.rto):
        reasons.append(f"{RTO_OVER}: restore took {_fmt(rto)}, target {_fmt(targets.rto)}")
    if rpo is not None and over(rpo, targets.rpo):
        reasons.append(f"{RPO_OVER}: restored data was {_fmt(rpo)} old, "
                       f"target {_fmt(targets.rpo)}")
    if projected is not None and over(projected, targets.rto):
        reasons.append(f"{PROJECTED_RTO_OVER}: the whole tier would take {_fmt(projected)} "
                       f"at the measured rate, target {_fmt(targets.rto)}")
    return reasons


def _fmt(delta: timedelta) -> str:
    """Whole seconds hide sub-second RTOs; show them with a decimal."""
    seconds = delta.total_seconds()
    return f"{seconds:.1f}s" if seconds < 60 else format_duration(delta)
