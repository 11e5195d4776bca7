"""Recently accepted record ids per account, so a retried request is not stored twice.

Bounded in time (`dedupe_window`) and count (`dedupe_max`, oldest forgotten first).
Invariant: `_ids`/`_times` hold every acceptance in order; an entry whose time differs
from `_seen[id]` is stale (the id was forgotten, or accepted again) and is skipped. The
order is kept in deques, not the dict's own order: popping a dict's first key again and
again rescans the deleted slots before it, quadratic under load.
"""

from __future__ import annotations

from collections import deque


class Dedupe:
    """The ids one account accepted inside its window."""

    def __init__(self, window: float, limit: int) -> None:
        self.window = window
        self.limit = limit
        self._seen: dict[str, float] = {}
        self._ids: deque[str] = deque()
        self._times: deque[float] = deque()

    def seen(self, record_id: str, now: float) -> bool:
        """True if `record_id` was accepted inside the window; else remember it as accepted.

        Call `expire(now)` once per request first (not per record: hot path).
        """
        if record_id in self._seen:
            return True
        self._seen[record_id] = now
        self._ids.append(record_id)
        self._times.append(now)
        if len(self._seen) > self.limit:
            self._drop_oldest()
        return False

    def forget(self, record_id: str) -> None:
        """Undo `seen` for a record whose request was not acknowledged after all."""
        self._seen.pop(record_id, None)

    def expire(self, now: float) -> None:
        """Forget ids accepted before the window."""
        while self._times and now - self._times[0] > self.window:
            self._pop_front()

    def _drop_oldest(self) -> None:
        """Forget the oldest live id (stale entries on the way are discarded)."""
        while self._ids:
            if self._pop_front():
                return

    def _pop_front(self) -> bool:
        """Discard the front entry; True if it was the live acceptance of its id."""
        record_id, accepted = self._ids.popleft(), self._times.popleft()
        if self._seen.get(record_id) == accepted:
            del self._seen[record_id]
            return True
        return False

    def __len__(self) -> int:
        return len(self._seen)
