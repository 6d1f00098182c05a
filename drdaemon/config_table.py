"""A TOML table consumed key by key, for the config parsers (config.py, config_tenants.py).

Each key is taken once with its expected type; whatever is left over is an
unknown key, reported as one line naming the file and the key.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NoReturn, Protocol, TypeVar, cast

T = TypeVar("T")

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}\Z")
NAME_HINT = "a name of 1-63 characters: lowercase letters, digits, '.', '_' or '-'"


class Failer(Protocol):
    """The parser that reports a problem as one line (config._Parser)."""

    def fail(self, key: str, expected: str, got: Any, detail: str = "") -> NoReturn: ...


class Table:
    """A TOML table being consumed key by key, so leftovers can be reported."""

    def __init__(self, parser: Failer, where: str, data: Any) -> None:
        self.parser = parser
        self.where = where
        if not isinstance(data, dict):
            parser.fail(where, "a table", data)
        self.data: dict[str, Any] = dict(data)

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def take(self, name: str, kind: type[T], default: Any = ..., *, what: str = "") -> T:
        if name not in self.data:
            if default is ...:
                self.parser.fail(self.key(name), what or type_name(kind),
                                 Said("nothing (required)"))
            return cast(T, default)
        value = self.data.pop(name)
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            self.parser.fail(self.key(name), what or type_name(kind), value)
        return cast(T, value)

    def convert(self, name: str, fn: Callable[[Any], T], default: Any = ..., *, what: str,
                echo: bool = True) -> T:
        raw: Any = self.take(name, object, default, what=what)
        if raw is default and default is not ...:
            return cast(T, default)
        try:
            return fn(raw)
        except (ValueError, TypeError, KeyError, OverflowError) as exc:
            # A DSN may hold a password: such values are described, never echoed.
            shown = raw if echo else Said("a value not shown here (it may hold a secret)")
            self.parser.fail(self.key(name), what, shown, detail=str(exc))

    def done(self) -> None:
        for name in self.data:
            self.parser.fail(self.key(name), "no such key (unknown)", self.data[name])


class Said(str):
    """Text to show as-is in an error instead of the repr of a value."""


def type_name(kind: type) -> str:
    return {str: "a string", int: "an integer", bool: "true or false", list: "a list",
            dict: "a table", float: "a number"}.get(kind, kind.__name__)
