"""Days of a daily archive firehose: which day a signal belongs to, when a day ends.

A signal belongs to the day, in the firehose's IANA time zone, on which the daemon
received it (receive time: a day once ended never gets another signal). Days are
calendar dates; their bounds are local midnights converted to UTC, so a day on which
daylight saving time starts or ends is 23 or 25 hours long and still whole.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo


class Days:
    """The calendar of one archive firehose."""

    def __init__(self, timezone: str) -> None:
        self.zone = ZoneInfo(timezone)

    def of(self, received: float) -> date:
        """The local day of a unix time."""
        return datetime.fromtimestamp(received, self.zone).date()

    def start(self, day: date) -> float:
        """Unix time of `day`'s first instant (its local midnight)."""
        return datetime.combine(day, time(), self.zone).timestamp()

    def end(self, day: date) -> float:
        """Unix time `day` ends: the next day's local midnight."""
        return self.start(day + timedelta(days=1))

    def at(self, day: date, local: time) -> float:
        """Unix time of local `local` o'clock on `day` (`deliver_by` is the next day's)."""
        return datetime.combine(day, local, self.zone).timestamp()

    def ended(self, first: date, now: float) -> list[date]:
        """The days from `first` that have ended by `now`, oldest first (a daemon down
        over several midnights builds each of them)."""
        today = self.of(now)
        return [first + timedelta(days=n) for n in range((today - first).days)]
