"""Crontab expressions with crontab's meaning, as APScheduler triggers.

APScheduler numbers days of the week from Monday = 0, crontab from Sunday = 0
(and 7), and `CronTrigger.from_crontab` passes the numbers through unchanged:
"0 5 * * 0" would fire on Mondays. Numeric day-of-week fields are translated
to day names here, the one place every schedule goes through.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, tzinfo
from itertools import pairwise

from apscheduler.triggers.cron import CronTrigger

_DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
_NUMERIC = re.compile(r"^(\*|\d)(?:-(\d))?(?:/(\d+))?$")


def crontab_day_of_week(field: str) -> str:
    """A crontab day-of-week field (0 or 7 = Sunday) in APScheduler's day names."""
    if field == "*":
        return field
    names: list[str] = []
    for part in field.split(","):
        m = _NUMERIC.match(part)
        if not m:
            names.append(part)  # already names (mon-fri): same meaning in both
            continue
        first, last, step = m.group(1), m.group(2), int(m.group(3) or 1)
        lo, hi = (0, 6) if first == "*" else (int(first), int(last or first))
        if not (0 <= lo <= 7 and 0 <= hi <= 7 and lo <= hi and step >= 1):
            raise ValueError(f"invalid day of week {part!r}")
        for day in range(lo, hi + 1, step):
            if _DAYS[day % 7] not in names:
                names.append(_DAYS[day % 7])
    return ",".join(names)


def trigger(expr: str, tz: tzinfo, jitter: timedelta | None = None) -> CronTrigger:
    """A five-field crontab expression as a trigger (ValueError if invalid)."""
    fields = expr.split()
    if len(fields) != 5:
        raise ValueError(f"expected 5 fields, got {len(fields)}")
    minute, hour, day, month, dow = fields
    seconds = int(jitter.total_seconds()) if jitter else 0
    return CronTrigger(minute=minute, hour=hour, day=day, month=month,
                       day_of_week=crontab_day_of_week(dow), timezone=tz,
                       jitter=seconds or None)


def longest_gap(expr: str, tz: tzinfo, start: datetime, fires: int = 60) -> timedelta:
    """The longest time between consecutive runs of `expr` over its next `fires` runs.

    What "on schedule" allows: a monthly schedule's gap is 31 days, a weekly one's 7.
    """
    trig = trigger(expr, tz)
    times: list[datetime] = []
    prev: datetime | None = None
    now = start
    for _ in range(fires):
        fire = trig.get_next_fire_time(prev, now)
        if fire is None:
            break
        times.append(fire)
        prev, now = fire, fire + timedelta(seconds=1)
    gaps = [b - a for a, b in pairwise(times)]
    return max(gaps) if gaps else timedelta(0)
