"""Recently accepted record ids per account, so a retried request is not stored twice.

Bounded in time (`dedupe_window`), count (`dedupe_max`) and bytes (`dedupe_max_memory`,
each id charged its length plus its bookkeeping), oldest forgotten first.

Invariant: `_ids`/`_times` from `_head` on hold every acceptance in order; an entry
whose time differs from `_seen[id]` is stale (the id was forgotten, or accepted again)
and is skipped. The order is kept in lists with a moving head, not the dict's own order:
popping a dict's first key again and again rescans the deleted slots before it, quadratic
under load. Lists, not deques, so that the oldest entries are dropped a slice at a time
(a bulk import drops as many ids as it adds: one by one, that was a third of dedupe's
time). `memory` counts the live and the stale entries alike (a stale entry still holds
its string until dropped).

An id accepted by a request that is not yet answered is *in flight*: `_inflight` holds,
per unanswered request's ticket, the set of ids it accepted, so a duplicate arriving
meanwhile waits for the same commits and shares their outcome instead of being
acknowledged before the original is kept. (Per request, not per id: the set of a
request's ids is built anyway to find repeats within it, and settling drops it whole;
only a duplicate looks through the few requests in flight.)
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import repeat

from firehosed.queue.base import Ticket

# Bookkeeping of one remembered id beyond its characters: the str header, a dict slot
# and two list slots (measured with tracemalloc: 49 + ~40 + 16 + 24 bytes).
ID_OVERHEAD = 130
BULK = 8  # `admit` takes at least this many ids in bulk (fewer: one by one is faster)
DROP_STEP = 256  # oldest entries dropped at a time, at most, until within the limits
COMPACT = 4096  # dropped entries before the lists' dropped front is freed (past a quarter)
_RECOVERED = Ticket()  # `remember`'s ids pass through `seen` under this, then settle


class Dedupe:
    """The ids one account accepted inside its window."""

    def __init__(self, window: float, limit: int, max_memory: int) -> None:
        self.window = window
        self.limit = limit
        self.max_memory = max_memory
        self.memory = 0
        self._seen: dict[str, float] = {}
        self._ids: list[str] = []
        self._times: list[float] = []
        self._head = 0  # entries before it were dropped
        self._inflight: dict[Ticket, set[str]] = {}

    def seen(self, record_id: str, now: float, ticket: Ticket) -> bool:
        """True if `record_id` was accepted inside the window; else remember it as
        accepted by the request holding `ticket` (in flight until `settled`).

        Call `expire(now)` once per request first (not per record: hot path).
        """
        if record_id in self._seen:
            return True
        self._seen[record_id] = now
        flying = self._inflight.get(ticket)
        if flying is None:
            self._inflight[ticket] = {record_id}
        else:
            flying.add(record_id)
        self._ids.append(record_id)
        self._times.append(now)
        self.memory += len(record_id) + ID_OVERHEAD
        if len(self._seen) > self.limit or self.memory > self.max_memory:
            self._drop_oldest()
        return False

    def admit(self, record_ids: list[str], now: float, ticket: Ticket) -> list[int]:
        """`seen` for a request's ids, in order: the indexes of the duplicates (a repeat
        within `record_ids` included). A request of new ids (the usual one) is
        remembered in a few bulk operations, not id by id."""
        if len(record_ids) == 1:  # a single signal: the common request, kept short
            return [0] if self.seen(record_ids[0], now, ticket) else []
        seen = self._seen
        unique = set(record_ids) if len(record_ids) >= BULK else None
        if unique is None or len(unique) != len(record_ids) or not seen.keys().isdisjoint(unique):
            return [i for i, one in enumerate(record_ids) if self.seen(one, now, ticket)]
        seen.update(zip(record_ids, repeat(now)))
        flying = self._inflight.get(ticket)
        if flying is None:
            self._inflight[ticket] = unique
        else:
            flying |= unique
        self._ids.extend(record_ids)
        self._times.extend(repeat(now, len(record_ids)))
        self.memory += sum(map(len, record_ids)) + ID_OVERHEAD * len(record_ids)
        if len(seen) > self.limit or self.memory > self.max_memory:
            self._drop_oldest()
        return []

    def remember(self, record_id: str, accepted: float) -> None:
        """Note `record_id` as kept, accepted at `accepted` (a record found in a queue
        at start: its request's answer may never have reached the client)."""
        self.seen(record_id, accepted, _RECOVERED)
        self._inflight.pop(_RECOVERED, None)

    def original(self, record_id: str) -> Ticket | None:
        """The ticket of the request still committing `record_id`, if any."""
        for ticket, ids in self._inflight.items():
            if record_id in ids:
                return ticket
        return None

    def settled(self, ticket: Ticket, record_ids: Iterable[str], kept: bool) -> None:
        """The request holding `ticket`, that accepted `record_ids`, was answered: 202
        (`kept`) or not, in which case the ids are forgotten, so that the client's retry
        is accepted."""
        self._inflight.pop(ticket, None)
        if not kept:
            seen = self._seen
            for record_id in record_ids:
                seen.pop(record_id, None)

    def expire(self, now: float) -> None:
        """Forget ids accepted before the window."""
        times, window = self._times, self.window
        stop = self._head
        while stop < len(times) and now - times[stop] > window:
            stop += 1
        self._drop(stop - self._head)

    def _drop_oldest(self) -> None:
        """Forget the oldest ids (stale entries on the way are discarded) until within
        both limits: a step at a time, each as many entries as the excess (in bytes: as
        ids the length of the oldest)."""
        seen, ids = self._seen, self._ids
        while self._head < len(ids):
            over = len(seen) - self.limit
            excess = self.memory - self.max_memory
            if over <= 0 and excess <= 0:
                return
            each = len(ids[self._head]) + ID_OVERHEAD
            self._drop(min(DROP_STEP, max(1, over, -(-excess // each))))

    def _drop(self, count: int) -> None:
        """Discard the `count` oldest entries; an id is forgotten only if its entry is
        its live acceptance (not stale)."""
        if count <= 0:
            return
        head = self._head
        stop = head + count
        ids, times = self._ids[head:stop], self._times[head:stop]
        seen = self._seen
        for record_id, accepted in zip(ids, times, strict=True):
            if seen.get(record_id) == accepted:
                del seen[record_id]
        self.memory -= sum(map(len, ids)) + ID_OVERHEAD * len(ids)
        # The dropped slots let go of their strings now, not at the next compaction: the
        # lists' front never holds more than pointers to one empty string and one zero.
        self._ids[head:stop] = repeat("", count)
        self._times[head:stop] = repeat(0.0, count)
        self._head = stop
        if stop >= COMPACT and stop * 4 >= len(self._ids):
            del self._ids[:stop], self._times[:stop]
            self._head = 0

    def __len__(self) -> int:
        return len(self._seen)
