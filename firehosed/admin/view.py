"""How a firehose's `/v1/status` entry reads to a person: its state in words, sizes,
ages and times. Shared by `firehosed status` and the status page, so both say the same."""

from __future__ import annotations

import enum
import time
from datetime import UTC, datetime
from typing import Any


class Level(enum.Enum):
    """How much a state should catch the eye."""

    OK = "ok"
    WARN = "warn"
    BAD = "bad"


def state(firehose: dict[str, Any], now: float) -> tuple[str, Level]:
    """The state of one firehose: stopped, paused, retrying since…, dead letters or
    delivering (the first that applies), and how much it should catch the eye."""
    if firehose.get("stopped"):
        return f"stopped: {firehose['stopped']}", Level.BAD
    if firehose.get("paused"):
        return "paused", Level.WARN
    if since := firehose.get("failing_since"):
        return f"retrying since {clock(since)} ({age(now - _epoch(since))})", Level.BAD
    if late := (firehose.get("archive") or {}).get("late_days"):
        return f"archive late: {', '.join(late)} not delivered by deliver_by", Level.BAD
    if firehose.get("dead_letter_bytes"):
        return f"dead letters ({size(firehose['dead_letter_bytes'])})", Level.WARN
    return "delivering", Level.OK


def archive(firehose: dict[str, Any]) -> str | None:
    """A daily archive firehose's days in words (None for another firehose): the open
    day and its records so far, the last day delivered and when."""
    days = firehose.get("archive")
    if days is None:
        return None
    line = f"open day {days['open_day']}: {days['open_records']:,} records so far"
    if days["last_day_delivered"] is None:
        return line + "; no day delivered yet"
    at = datetime.fromisoformat(days["delivered_at"]).astimezone(UTC)
    return f"{line}; {days['last_day_delivered']} delivered at {at:%Y-%m-%d %H:%M:%S} UTC"


def size(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number at or above 1."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def age(seconds: float) -> str:
    """A duration as a person says it: 42s, 3m 05s, 2h 10m, 3d 4h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def clock(iso: str) -> str:
    """An ISO time as `YYYY-MM-DD HH:MM:SS` UTC."""
    return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")


def ago(outcome: dict[str, Any] | None, now: float) -> str:
    """When a last delivery or error happened, relative to `now` ("-" if never)."""
    if outcome is None:
        return "-"
    return f"{age(now - _epoch(outcome['time']))} ago"


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def clock_epoch(at: float) -> str:
    """An epoch time as `YYYY-MM-DD HH:MM:SS` UTC."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))
