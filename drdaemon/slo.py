"""Recovery objectives, evaluated: pure functions over times, sizes and targets.

The definitions (DESIGN.md, "Time and targets"):

- **RPO at a moment**: that moment minus the consistency time of the snapshot
  one would restore (for a drill: the snapshot it restored).
- **Worst gap**: the largest gap between consecutive consistency times of a
  set of snapshots (the worst-case RPO over the period they cover, as far as
  the snapshots still retained can show it).
- **RTO measured**: wall time from the start of a restore to a verified copy.
- **Projected tier RTO**: the stored bytes of the newest snapshot of every
  source of a tier divided by a measured restore throughput: how long the
  whole tier would take, restored one source after another, if a region
  were lost now.

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
    """A tier's recovery objectives."""

    rpo: timedelta
    rto: timedelta


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


def projected_rto(stored_bytes: Iterable[int], bytes_per_second: float | None) -> timedelta | None:
    """Time to restore every given object at the measured rate, one after another."""
    if not bytes_per_second or bytes_per_second <= 0:
        return None
    return timedelta(seconds=sum(stored_bytes) / bytes_per_second)


def rto_split(*, manifest: float, prepare: float, first_byte: float, stream: float,
              read_wait: float, write_wait: float, restore_finish: float,
              verify: float) -> dict[str, float]:
    """The PHASES of a streaming restore from what a drill measured (seconds).

    Reading, decrypting, decompressing and restoring overlap in one stream, so
    each moment is charged to the stage that held it up: `download` is the
    manifest fetch, the time to the first byte and the time blocked reading
    the object; `restore` is creating the scratch target, the time blocked
    writing into pg_restore/tar and finishing after the stream; what is left
    of the stream is age, zstd and hashing (`decrypt_decompress`); `verify`
    is checking the restored copy. The four add up to the RTO.
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
    if rto is not None and rto > targets.rto:
        reasons.append(f"{RTO_OVER}: restore took {_fmt(rto)}, target {_fmt(targets.rto)}")
    if rpo is not None and rpo > targets.rpo:
        reasons.append(f"{RPO_OVER}: restored data was {_fmt(rpo)} old, "
                       f"target {_fmt(targets.rpo)}")
    if projected is not None and projected > targets.rto:
        reasons.append(f"{PROJECTED_RTO_OVER}: the whole tier would take {_fmt(projected)} "
                       f"at the measured rate, target {_fmt(targets.rto)}")
    return reasons


def _fmt(delta: timedelta) -> str:
    """Whole seconds hide sub-second RTOs; show them with a decimal."""
    seconds = delta.total_seconds()
    return f"{seconds:.1f}s" if seconds < 60 else format_duration(delta)
