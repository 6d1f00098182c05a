"""Source kinds as plug-ins: `kind_for(name)` is the one object per kind that dumps,
restores, drills and describes a source (base.SourceKind); `register` adds a kind.

The built-in kinds, postgres, directory and postgres-cluster, are registered here.
"""

from __future__ import annotations

from .directory_kind import DIRECTORY
from .pg_cluster_kind import CLUSTER
from .postgres_kind import POSTGRES
from .registry import is_kind, kind_for, kinds, register, unregister

__all__ = ["is_kind", "kind_for", "kinds", "register", "unregister"]

register(POSTGRES)
register(DIRECTORY)
register(CLUSTER)
