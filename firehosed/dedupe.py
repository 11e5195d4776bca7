"""Recently accepted record ids per account, so a retried request is not stored twice.

Bounded in time (`dedupe_window`) and count (`dedupe_max`, oldest forgotten first).
Invariant: `_seen` is in acceptance order, so expiry only ever looks at its front.
"""

from __future__ import annotations


class Dedupe:
    """The ids one account accepted inside its window."""

    def __init__(self, window: float, limit: int) -> None:
        self.window = window
        self.limit = limit
        self._seen: dict[str, float] = {}

    def seen(self, record_id: str, now: float) -> bool:
        """True if `record_id` was accepted inside the window; else remember it as accepted.

        Call `expire(now)` once per request first (not per record: hot path).
        """
        if record_id in self._seen:
            return True
        self._seen[record_id] = now
        if len(self._seen) > self.limit:
            del self._seen[next(iter(self._seen))]
        return False

    def forget(self, record_id: str) -> None:
        """Undo `seen` for a record whose request was not acknowledged after all."""
        self._seen.pop(record_id, None)

    def expire(self, now: float) -> None:
        """Forget ids accepted before the window."""
        seen = self._seen
        while seen:
            first = next(iter(seen))
            if now - seen[first] <= self.window:
                return
            del seen[first]
