"""Human durations ("90m", "24h", "14d"), sizes ("16MiB") and ISO times: parsing, and
the text people read (commands, reports, reasons), so every command writes them alike."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)\s*$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|TiB|kB|MB|GB|TB)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1,
    "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
    "kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
}


def parse_duration(text: str) -> timedelta:
    """Parse a duration such as ``"90m"``, ``"24h"`` or ``"14d"``.

    Raises ValueError with the accepted form in the message.
    """
    match = _DURATION.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"expected a duration like 90m, 24h or 14d, got {text!r}")
    return timedelta(seconds=int(match.group(1)) * _DURATION_UNITS[match.group(2)])


def parse_size(text: str | int) -> int:
    """Parse a byte size such as ``"16MiB"`` or a plain integer of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"expected a non-negative size, got {text}")
        return text
    match = _SIZE.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"expected a size like 16MiB or 64MB, got {text!r}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def format_duration(delta: timedelta) -> str:
    """Render a duration compactly for people: ``1d 2h``, ``5m 3s``, ``0s``."""
    seconds = int(delta.total_seconds())
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return sign + (" ".join(parts[:2]) if parts else "0s")


def format_bytes(n: float) -> str:
    """Render a byte count with binary units: ``1.5 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_iso_time(text: str) -> datetime:
    """An ISO 8601 date or time as written by drdaemon or a person, a final ``Z`` read as
    UTC (``+00:00``); naive if `text` names no zone. ValueError if it is none."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def format_utc(t: datetime) -> str:
    """A time for messages, to the second in UTC: ``2026-11-23T02:00:00Z``."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- values that may be unknown, for reports and command output ("—" when None) ----


def duration(seconds: float | None) -> str:
    """Seconds for people: sub-minute values keep a decimal (drills can be fast)."""
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds:.3f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    return format_duration(timedelta(seconds=seconds))


def rate(bps: float | None) -> str:
    """A throughput in bytes per second: ``12.3 MiB/s``."""
    return "—" if bps is None else f"{format_bytes(bps)}/s"


def size(n: int | None) -> str:
    """A byte count with binary units: ``1.5 MiB``."""
    return "—" if n is None else format_bytes(n)


def when(iso: str | None) -> str:
    """An ISO time as ``2026-11-23 02:00:00 UTC``; text that is no time is shown as it is."""
    if not iso:
        return "—"
    try:
        t = parse_iso_time(iso)
    except ValueError:
        return iso
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def against(value: float | None, target: float) -> str:
    """A measured value and its target in seconds, marked ✔ within it or ✘ over it."""
    mark = "" if value is None else (" ✔" if value <= target else " ✘ over")
    return f"{duration(value)} / {duration(target)}{mark}"
