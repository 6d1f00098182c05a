"""A terminal progress line (bytes, rate, ETA) for long transfers; silent off a TTY."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .units import format_bytes, format_duration, rate


class ProgressLine:
    """Redraws one stderr line at most ten times a second."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.done = 0
        self.started = time.monotonic()
        self.drawn = 0.0

    def update(self, n: int, total: int | None = None) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self.drawn >= 0.1:
            self.drawn = now
            self._draw(total, now)

    def _draw(self, total: int | None, now: float) -> None:
        from datetime import timedelta

        elapsed = max(now - self.started, 1e-6)
        speed = self.done / elapsed
        text = f"{self.label}  {format_bytes(self.done)}"
        if total:
            pct = min(100.0, 100.0 * self.done / total)
            text += f" / {format_bytes(total)} ({pct:.0f}%)"
        text += f"  {rate(speed)}"
        if total and speed > 0:
            eta = max(0.0, (total - self.done) / speed)
            text += f"  ETA {format_duration(timedelta(seconds=eta))}"
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()

    def note(self, text: str) -> None:
        """Redraw the line as `text` (counts rather than bytes: tenants, keys)."""
        now = time.monotonic()
        if self.enabled and now - self.drawn >= 0.1:
            self.drawn = now
            self.stream.write("\r\x1b[K" + text)
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
