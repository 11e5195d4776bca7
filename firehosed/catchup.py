"""Per-session catch-up rings: the latest anonymous signals of each session, in memory.

When a session is identified, its ring is handed back (oldest first) so firehoses with
`catch_up` get those signals again with the person attached. A session then stays
identified for `session_ttl`. Memory is bounded by `max_memory` in bytes: each session
is charged its key and person strings and its ring's records, not a fixed size, so long
sessions and persons count for what they hold. The least recently seen sessions are
evicted first, and counted.

Invariants: `_sessions` is ordered by last activity (a touched session is moved to the
end), so expiry and eviction only ever look at its front; and `memory` is the sum of
`session.size(key)` over `_sessions`: every change to a key, person or ring adjusts it
by the same amount that `size` would, so removing a session subtracts exactly its charge.
"""

from __future__ import annotations

from collections.abc import Callable
from sys import getsizeof

import msgspec

from firehosed import metrics
from firehosed.config import CatchUpConfig

# Bookkeeping cost of one session beyond its strings (Session 48 bytes, its `seen`
# float 32 unless shared by a request's sessions, its dict slot with the table's spare
# room under eviction churn), of a ring (the tuple's header, while it holds records) and
# of one buffered record beyond its bytes (bytes header, tuple slot), measured with
# tracemalloc at 4 MiB to 32 MiB of sessions (98 to 131, 40 and 41 bytes). The key
# (account, NUL, session) and the person are charged `sys.getsizeof`, their exact
# allocation: max_memory is real memory, whatever the strings' lengths.
SESSION_OVERHEAD = 120
RING_OVERHEAD = 40
ENTRY_OVERHEAD = 41
# Sessions are re-ordered (moved to the end) at most every session_ttl / REFRESH.
REFRESH = 64


class Session(msgspec.Struct, gc=False):
    """One session's state: its person once identified, else its ring of encoded records.

    A million sessions are held at once, so: three fields, and invisible to the cyclic
    garbage collector (it holds no containers that could form a cycle; the ring is a
    tuple of bytes), or every full collection would walk them all, a pause of a second.
    """

    seen: float
    person: str | None = None
    ring: tuple[bytes, ...] = ()

    def size(self, key: str) -> int:
        """What this session, held under `key`, costs in `max_memory` terms."""
        cost = SESSION_OVERHEAD + getsizeof(key) + _ring_cost(self.ring)
        return cost if self.person is None else cost + getsizeof(self.person)


def _ring_cost(ring: tuple[bytes, ...]) -> int:
    return RING_OVERHEAD + sum(len(r) + ENTRY_OVERHEAD for r in ring) if ring else 0


class CatchUp:
    """All sessions' rings and identities for one daemon.

    Expiry and eviction walk `_sessions` from its front in one pass, at most once a
    second (expiry) or down to a margin below `max_memory` (eviction): taking a dict's
    first key again and again would rescan its deleted slots each time.
    """

    def __init__(self, config: CatchUpConfig) -> None:
        self.config = config
        self._sessions: dict[str, Session] = {}
        self._next_expiry = 0.0
        self.memory = 0

    def reconfigure(self, config: CatchUpConfig) -> None:
        """Apply new limits (SIGHUP); shrinking limits evict at the next touch."""
        self.config = config

    def _touch(self, key: str, now: float) -> Session:
        session = self._sessions.get(key)
        if session is not None and now - session.seen < self.config.session_ttl / REFRESH:
            # Moved to the end moments ago: skip the reorder (hot path). A session's TTL
            # thereby counts from its last move, at most ttl/REFRESH early.
            return session
        if now >= self._next_expiry:
            self._expire(now)
            self._next_expiry = now + 1.0
        session = self._sessions.pop(key, None)
        if session is None:
            session = Session(seen=now)
            self.memory += SESSION_OVERHEAD + getsizeof(key)
        session.seen = now
        self._sessions[key] = session
        return session

    def person_of(self, account: str, session: str, now: float) -> str | None:
        """The person a live session was identified as, if any."""
        state = self._sessions.get(f"{account}\0{session}")
        if state is None or state.person is None or now - state.seen > self.config.session_ttl:
            return None
        self._touch(f"{account}\0{session}", now)
        return state.person

    def buffer(self, account: str, session: str, record: bytes, now: float) -> None:
        """Keep an anonymous signal (an encoded Record) in its session's ring."""
        state = self._touch(f"{account}\0{session}", now)
        ring = (*state.ring, record)
        added = len(record) + ENTRY_OVERHEAD
        if len(ring) > self.config.signals_per_session:
            added -= len(ring[0]) + ENTRY_OVERHEAD
            ring = ring[1:]
        elif len(ring) == 1:
            added += RING_OVERHEAD  # the session's first record: a ring tuple now exists
        state.ring = ring
        self.memory += added
        if self.memory > self.config.max_memory:
            self._evict()

    def identify(
        self, account: str, session: str, person: str, now: float
    ) -> tuple[bytes, ...] | None:
        """Mark the session identified; its ring if this is its first identification."""
        state = self._touch(f"{account}\0{session}", now)
        known = state.person
        ring, state.ring = state.ring, ()
        if ring:
            self.memory -= _ring_cost(ring)
        if person != known:  # first identified, or as someone else: charge the new string
            state.person = person
            self.memory += getsizeof(person) - (0 if known is None else getsizeof(known))
            if self.memory > self.config.max_memory:
                self._evict()
        return ring if known is None else None

    def identify_many(
        self, account: str, pairs: list[tuple[str, str]], now: float
    ) -> list[tuple[int, tuple[bytes, ...]]]:
        """`identify` each (session, person) of `pairs` in order, in one loop (a batch's
        or an import piece's sessions): the index in `pairs` and the ring of each first
        identification. Memory is checked once, after the batch (over by its persons at
        most, until then)."""
        sessions, fresh = self._sessions, self.config.session_ttl / REFRESH
        first: list[tuple[int, tuple[bytes, ...]]] = []
        for at, (session, person) in enumerate(pairs):
            key = f"{account}\0{session}"
            state = sessions.get(key)
            if state is None or now - state.seen >= fresh:
                state = self._touch(key, now)
            known, ring = state.person, state.ring
            if ring:
                state.ring = ()
                self.memory -= _ring_cost(ring)
            if person != known:
                state.person = person
                self.memory += getsizeof(person) - (0 if known is None else getsizeof(known))
            if known is None:
                first.append((at, ring))
        if self.memory > self.config.max_memory:
            self._evict()
        return first

    def restore(self, account: str, session: str, ring: tuple[bytes, ...]) -> None:
        """Undo a first `identify` whose request was not acknowledged: the session is
        anonymous again, with its ring, so the client's retry replays it."""
        key = f"{account}\0{session}"
        state = self._sessions.get(key)
        if state is None:  # expired or evicted since: nothing left to give back to
            return
        self.memory -= state.size(key)
        state.person = None
        state.ring = (*ring, *state.ring)[-self.config.signals_per_session :]
        self.memory += state.size(key)

    def unbuffer(self, account: str, session: str, record: bytes) -> None:
        """Undo `buffer` of a signal whose request was not acknowledged (its client sends
        it again)."""
        key = f"{account}\0{session}"
        state = self._sessions.get(key)
        if state is None or not any(entry is record for entry in state.ring):
            return
        self.memory -= state.size(key)
        state.ring = tuple(entry for entry in state.ring if entry is not record)
        self.memory += state.size(key)

    def _expire(self, now: float) -> None:
        ttl = self.config.session_ttl
        expired: list[str] = []
        for key, session in self._sessions.items():
            if now - session.seen <= ttl:
                break
            expired.append(key)
        for key in expired:
            self.memory -= self._sessions.pop(key).size(key)

    def _evict(self) -> None:
        """Evict least recently seen sessions down to 98% of max_memory, in one pass."""
        target = self.config.max_memory * 0.98
        evicted: list[str] = []
        freed = 0
        for key, session in self._sessions.items():
            if self.memory - freed <= target or len(evicted) == len(self._sessions) - 1:
                break
            evicted.append(key)
            freed += session.size(key)
        for key in evicted:
            del self._sessions[key]
        self.memory -= freed
        metrics.catchup_evictions.inc(len(evicted))

    def forget(self, gone: Callable[[str], bool]) -> None:
        """Drop the sessions for which `gone(session)` holds (a partition this process
        no longer owns: another process keeps them now)."""
        for key in [k for k in self._sessions if gone(k.partition("\0")[2])]:
            self.memory -= self._sessions.pop(key).size(key)

    def __len__(self) -> int:
        return len(self._sessions)

    def update_metrics(self) -> None:
        """Publish session count and memory (called at scrape time)."""
        metrics.catchup_sessions.set(len(self._sessions))
        metrics.catchup_bytes.set(self.memory)
