"""The shrink guard: a source that suddenly holds far less is not blessed as a good snapshot.

An unmounted volume leaves an empty folder; a dropped schema or a truncated
table leaves a small database. Committed as normal snapshots, they would pass
drills, be protected from prune, and push the last good copies out of
retention within weeks. So before the commit, the new snapshot's measures are
compared with the newest committed snapshot's: a drop of more than the
source's `max_shrink` fraction (default 0.5) in any of them refuses the
snapshot, with every drop named. An operator who knows the shrink is real
confirms it with `drctl backup --source S --accept-shrink`. Pure functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .sources import is_kind, kind_for

DEFAULT_MAX_SHRINK = 0.5


@dataclass(frozen=True)
class Drop:
    """One measure that fell by more than allowed."""

    measure: str
    before: int
    after: int

    def __str__(self) -> str:
        pct = 100 * (self.before - self.after) / self.before
        return f"{self.measure} {self.before} -> {self.after} (-{pct:.0f}%)"


def measures(kind: str, facts: Mapping[str, Any]) -> dict[str, int]:
    """The sizes of a snapshot's content that must not collapse, from its manifest facts.

    Each kind names its own (`SourceKind.measures`). Directories: regular files
    and their bytes. PostgreSQL: the rows of every table (`row_total`, or the sum
    of the per-table counts of manifests that carry them inline) and the
    database's size. A measure a manifest does not carry is not compared.
    """
    return kind_for(kind).measures(facts) if is_kind(kind) else {}


def sharp_drops(kind: str, before: Mapping[str, Any], after: Mapping[str, Any],
                max_shrink: float) -> list[Drop]:
    """Measures that fell by more than `max_shrink` (a fraction; 1 never refuses)."""
    if max_shrink >= 1:
        return []
    old, new = measures(kind, before), measures(kind, after)
    drops = []
    for name, was in old.items():
        now = new.get(name)
        if now is None or was <= 0:
            continue
        if (was - now) / was > max_shrink:
            drops.append(Drop(name, was, now))
    return drops
