"""When to try a failed snapshot again: pure decisions shared by the daemon and `status`."""

from __future__ import annotations

from datetime import datetime, timedelta

from .state import Outcome

MAX_BACKOFF = timedelta(hours=1)


def retry_delay(attempt: int, base: timedelta) -> timedelta:
    """Pure: exponential backoff, `base` doubling per attempt, capped at an hour."""
    return min(base * (2 ** min(attempt, 16)), MAX_BACKOFF)


def resume_at(outcome: Outcome, base: timedelta, now: datetime) -> datetime | None:
    """Pure: when a daemon starting at `now` retries an attempt left failed or unfinished.

    The usual backoff counted from when that attempt ended (or, if it never
    ended, began), and never in the past; None when no retry is pending.
    """
    failed_at = outcome.failed_at
    if failed_at is None:
        return None
    delay = retry_delay(max(outcome.failed_attempts - 1, 0), base)
    return max(failed_at + delay, now)
