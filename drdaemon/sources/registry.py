"""The source kinds drdaemon knows, by name: a plug-in is an object registered here.

Services, the layout and the config schema look a kind up (`kind_for`) rather
than asking which kind they hold, so a new kind touches `sources/` and the
config schema only. `sources/__init__.py` registers the built-in kinds.
"""

from __future__ import annotations

from .base import SourceKind

_KINDS: dict[str, SourceKind] = {}


def register(kind: SourceKind) -> SourceKind:
    """Make `kind` known by its name (replacing one of that name); returns it."""
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Forget a kind (a test's own); unknown names are ignored."""
    _KINDS.pop(name, None)


def kind_for(name: str) -> SourceKind:
    """The kind called `name` (KeyError if none is registered: check `is_kind` first
    for a name from outside, e.g. a manifest)."""
    return _KINDS[name]


def is_kind(name: str) -> bool:
    return name in _KINDS


def kinds() -> tuple[SourceKind, ...]:
    """Every registered kind, in the order they were registered."""
    return tuple(_KINDS.values())
