"""Routing: which firehoses of an account get a signal, and catch-up on identification.

DESIGN.md §6: an anonymous signal goes to firehoses with `include_anonymous` and into
its session's ring; the first signal with a person identifies the session, and firehoses
with `catch_up` then get the ring again, person set and `"catch_up": true`, oldest
first, before the identifying signal; `send_person_identified` adds a synthetic `pi`
record. Later signals of an identified session get its person set.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import msgspec

from firehosed import metrics
from firehosed.catchup import CatchUp
from firehosed.config import FieldsConfig
from firehosed.envelope import Envelope
from firehosed.firehose import Firehose
from firehosed.mapping import set_path
from firehosed.queue.base import Queue, Ticket
from firehosed.queue.frames import frame
from firehosed.record import Record, decoder, encode


class AccountRoutes:
    """One account's firehoses and field paths, as routing needs them."""

    MAX_CACHED_TYPES = 10_000

    def __init__(self, fields: FieldsConfig, firehoses: Iterable[Firehose]) -> None:
        self.fields = fields
        self.firehoses = list(firehoses)
        self.wants_catch_up = any(f.config.catch_up for f in self.firehoses)
        self.wants_pi = any(f.config.send_person_identified for f in self.firehoses)
        # (type, anonymous) -> the queues such a signal goes to; rebuilt on every reload
        self._targets: dict[tuple[str, bool], tuple[Queue, ...]] = {}
        self._interned: dict[tuple[Queue, ...], tuple[Queue, ...]] = {}

    def targets(self, signal_type: str, anonymous: bool) -> tuple[Queue, ...]:
        """The queues of the firehoses that get a signal of this type (the same tuple
        for the same answer, so a run of records can be recognised by identity)."""
        key = (signal_type, anonymous)
        queues = self._targets.get(key)
        if queues is None:
            queues = tuple(
                f.queue
                for f in self.firehoses
                if f.admits(signal_type) and (not anonymous or f.config.include_anonymous)
            )
            queues = self._interned.setdefault(queues, queues)  # one tuple per answer
            if len(self._targets) < self.MAX_CACHED_TYPES:
                self._targets[key] = queues
        return queues


class Router:
    """Appends each accepted signal to the queues of the firehoses that get it."""

    def __init__(self, catch_up: CatchUp) -> None:
        self.catch_up = catch_up
        self.accounts: dict[str, AccountRoutes] = {}

    def begin(self, account: str, ticket: Ticket) -> Routing:
        """Routing for one request's records, whose commits go on `ticket`; `flush()` it
        before awaiting the ticket."""
        return Routing(self, self.accounts.get(account), account, ticket)


class Routing:
    """Stages one request's records: consecutive records bound for the same queues are
    joined and appended once per queue (`flush`), not once per record and queue.

    Catch-up state changed for the request is noted, so that `rollback` can undo it
    when the request is not acknowledged: its client will send the records again.
    """

    def __init__(
        self, router: Router, routes: AccountRoutes | None, account: str, ticket: Ticket
    ) -> None:
        self.router = router
        self.routes = routes
        self.account = account
        self.ticket = ticket
        self._queues: tuple[Queue, ...] = ()
        self._frames: list[bytes] = []
        self._buffered: list[tuple[str, bytes]] = []  # (session, ring entry)
        self._identified: list[tuple[str, tuple[bytes, ...]]] = []  # (session, its ring)

    def route(self, env: Envelope, raw: bytes, received: float) -> None:
        """Stage one signal (and any catch-up it triggers)."""
        routes = self.routes
        if routes is None or not routes.firehoses:
            return
        catch_up, account = self.router.catch_up, self.account
        person, session = env.person, env.session
        if person is None and session is not None:
            person = catch_up.person_of(account, session, received)
            if person is not None:
                raw = _with_person(raw, routes.fields.person, person, catch_up=False)
        record = Record(env.type, env.id, session, person, env.time, received, raw)
        encoded = encode(record)
        if person is None:
            if session is not None and routes.wants_catch_up:
                catch_up.buffer(account, session, encoded, received)
                self._buffered.append((session, encoded))
        elif session is not None and env.person is not None:
            ring = catch_up.identify(account, session, person, received)
            if ring is not None:
                self._identified.append((session, ring))
            if ring or (ring is not None and routes.wants_pi):
                self.flush()  # the replayed ring goes before the identifying signal
                self._replay(routes, ring, record)
        queues = routes.targets(env.type, person is None)
        if queues is not self._queues:
            self.flush()
            self._queues = queues
        self._frames.append(frame(encoded))  # once, whatever the number of firehoses

    def flush(self) -> None:
        """Append the staged run to its queues (durable after the next group commit)."""
        frames = self._frames
        if not frames:
            return
        chunk = frames[0] if len(frames) == 1 else b"".join(frames)
        add = self.ticket.add
        for queue in self._queues:
            add(queue.append(chunk, len(frames)))
        frames.clear()

    def rollback(self) -> None:
        """Undo the request's catch-up changes, newest first (it was answered 503)."""
        catch_up, account = self.router.catch_up, self.account
        for session, ring in reversed(self._identified):
            catch_up.restore(account, session, ring)
        for session, entry in reversed(self._buffered):
            catch_up.unbuffer(account, session, entry)

    def _stage(self, queue: Queue, framed: bytes) -> None:
        self.ticket.add(queue.append(framed, 1))

    def _replay(self, routes: AccountRoutes, ring: tuple[bytes, ...], identifying: Record) -> None:
        """Re-send a session's buffered signals with the person, then the `pi` record."""
        person = identifying.person
        assert person is not None
        for entry in ring:
            old = decoder.decode(entry)
            raw = _with_person(old.raw, routes.fields.person, person, catch_up=True)
            copy = msgspec.structs.replace(old, person=person, raw=raw)
            framed = frame(encode(copy))
            for firehose in routes.firehoses:
                if firehose.config.catch_up and firehose.admits(old.type):
                    self._stage(firehose.queue, framed)
                    metrics.catchup_replayed.labels(firehose.name).inc()
        if not routes.wants_pi:
            return
        pi = frame(_person_identified(identifying))
        for firehose in routes.firehoses:
            if firehose.config.send_person_identified:
                self._stage(firehose.queue, pi)


def _with_person(raw: bytes, path: str, person: str, *, catch_up: bool) -> bytes:
    record: dict[str, Any] = msgspec.json.decode(raw)
    set_path(record, path, person)
    if catch_up:
        record["catch_up"] = True
    return msgspec.json.encode(record)


def _person_identified(identifying: Record) -> bytes:
    moment = datetime.fromtimestamp(identifying.time, UTC).isoformat().replace("+00:00", "Z")
    raw = msgspec.json.encode(
        {
            "type": "pi",
            "session": identifying.session,
            "person": identifying.person,
            "time": moment,
        }
    )
    record = msgspec.structs.replace(identifying, type="pi", id=f"{identifying.id}-pi", raw=raw)
    return encode(record)
