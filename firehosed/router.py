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
from typing import Any, Protocol

import msgspec

from firehosed import metrics
from firehosed.catchup import CatchUp
from firehosed.envelope import Envelopes
from firehosed.fields import FieldsConfig
from firehosed.firehose import Firehose
from firehosed.mapping import set_path
from firehosed.queue.base import Queue, Ticket
from firehosed.queue.frames import Framed, Unsealed, frame
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

    def begin(self, account: str, ticket: Ticket, *, dry: bool = False) -> Routing:
        """Routing for one request's records, whose commits go on `ticket`. A `dry`
        routing changes catch-up state only, appending nothing (a partition's new owner
        replays what was routed before, to rebuild its rings)."""
        return Routing(self, self.accounts.get(account), account, ticket, dry=dry)


class RequestRouting(Protocol):
    """What the receiver does with one request's records."""

    def route(self, envs: Envelopes, received: float) -> None:
        """Stage the records (durable once the request's ticket is)."""

    def rollback(self) -> None:
        """The request was not kept (503): undo what routing changed."""


class Routes(Protocol):
    """Where the receiver sends requests: the router, or the JetStream partitioner."""

    @property
    def accounts(self) -> dict[str, AccountRoutes]:
        """Each account's firehoses (what the tail says a signal went to)."""

    def begin(self, account: str, ticket: Ticket) -> RequestRouting:
        """Routing for one request's records, whose commits go on `ticket`."""


class Routing:
    """Stages one request's records: each run of records bound for the same queues goes
    to each of them as one Block (one frame), not a frame per record and queue.

    Catch-up state changed for the request is noted, so that `rollback` can undo it
    when the request is not acknowledged: its client will send the records again.
    """

    def __init__(
        self,
        router: Router,
        routes: AccountRoutes | None,
        account: str,
        ticket: Ticket,
        *,
        dry: bool = False,
    ) -> None:
        self.router = router
        self.dry = dry
        self.routes = routes
        self.account = account
        self.ticket = ticket
        self._buffered: list[tuple[str, bytes]] = []  # (session, ring entry)
        self._identified: list[tuple[str, tuple[bytes, ...]]] = []  # (session, its ring)
        self._known: dict[tuple[str, str], None] = {}  # (session, person) identified here

    def route(self, envs: Envelopes, received: float) -> None:
        """Append the records (and any catch-up they trigger) to their queues (durable
        after the next group commit).

        The hot path: per record only what catch-up needs and a lookup of its queues.
        A record whose session was identified gets the person (its entries in `envs`
        change); catch-up replays go in before the identifying record.
        """
        routes = self.routes
        if routes is None or not routes.firehoses:
            return
        if len(envs) == 1:  # a single signal: the common request, kept short
            session, person, ring = envs.sessions[0], envs.persons[0], None
            if session is not None:
                person, ring = self._session(routes, envs, 0, session, received)
            if ring is not None:
                self._replay(routes, ring, _record(envs, 0, received))
            self._append(routes.targets(envs.types[0], person is None), envs, received, 0, 1)
            return
        replays = None
        if None not in envs.persons:  # every record names its person
            replays = self._identify_all(routes, envs, received)
            # (the same queues for every type: one tuple, `targets` interns them)
            targets = {routes.targets(kind, False) for kind in set(envs.types)}
            if not replays and len(targets) == 1:  # the usual request: one run
                self._append(targets.pop(), envs, received, 0, len(envs))
                return
        self._route_each(routes, envs, received, replays)

    def _identify_all(
        self, routes: AccountRoutes, envs: Envelopes, received: float
    ) -> dict[int, tuple[bytes, ...]]:
        """Identify the sessions of records that all name their person, once per
        (session, person), in order; the rings to replay, by the index of the record
        they go before."""
        known = self._known
        replays: dict[int, tuple[bytes, ...]] = {}
        pairs = list(zip(envs.sessions, envs.persons, strict=True))
        new = [
            (session, person)
            for session, person in dict.fromkeys(pairs)
            if session is not None and person is not None and (session, person) not in known
        ]
        known.update(dict.fromkeys(new))
        firsts = self.router.catch_up.identify_many(self.account, new, received)
        for at, ring in firsts:
            pair = new[at]
            self._identified.append((pair[0], ring))
            if ring or routes.wants_pi:
                replays[pairs.index(pair)] = ring
        return replays

    def _route_each(
        self,
        routes: AccountRoutes,
        envs: Envelopes,
        received: float,
        replays: dict[int, tuple[bytes, ...]] | None,
    ) -> None:
        """`route` record by record: anonymous records, several types, or replays. With
        `replays`, the sessions were identified already (`_identify_all`)."""
        types, sessions, persons = envs.types, envs.sessions, envs.persons
        targets: dict[tuple[str, bool], tuple[Queue, ...]] = {}
        queues: tuple[Queue, ...] = ()
        start = 0
        for index, session in enumerate(sessions):
            if replays is not None:
                person, ring = persons[index], replays.get(index)
            elif session is None:
                person, ring = persons[index], None
            else:
                person, ring = self._session(routes, envs, index, session, received)
            if ring is not None:
                self._append(queues, envs, received, start, index)
                start = index  # the replayed ring goes before the identifying signal
                self._replay(routes, ring, _record(envs, index, received))
            key = (types[index], person is None)
            found = targets.get(key)
            if found is None:
                found = targets[key] = routes.targets(*key)
            if found is not queues:
                self._append(queues, envs, received, start, index)
                queues, start = found, index
        self._append(queues, envs, received, start, len(sessions))

    def _session(
        self, routes: AccountRoutes, envs: Envelopes, index: int, session: str, received: float
    ) -> tuple[str | None, tuple[bytes, ...] | None]:
        """Catch-up for record `index`, of `session`: its person (an anonymous signal of
        an identified session gets it), and the ring to replay before it, if any."""
        catch_up, account = self.router.catch_up, self.account
        person = envs.persons[index]
        if person is None:
            person = catch_up.person_of(account, session, received)
            if person is not None:
                self._adopt(envs, index, person)
            elif routes.wants_catch_up:
                entry = encode(_record(envs, index, received))
                catch_up.buffer(account, session, entry, received)
                self._buffered.append((session, entry))
            return person, None
        if (session, person) in self._known:
            return person, None
        self._known[(session, person)] = None
        ring = catch_up.identify(account, session, person, received)
        if ring is None:
            return person, None
        self._identified.append((session, ring))
        return person, ring if ring or routes.wants_pi else None

    def _append(
        self, queues: tuple[Queue, ...], envs: Envelopes, received: float, start: int, stop: int
    ) -> None:
        """Records `start` to `stop` of `envs` into each of `queues`, as one frame."""
        if stop <= start or not queues or self.dry:
            return
        if stop - start == 1:  # (a single signal: a Record frame is smaller and quicker)
            framed: Framed = frame(encode(_record(envs, start, received)))
        else:
            framed = Unsealed(envs.block(received, start, stop))
        add = self.ticket.add
        for queue in queues:
            add(queue.append(framed, stop - start))

    def _adopt(self, envs: Envelopes, index: int, person: str) -> None:
        """Record `index` belongs to an identified session: it gets the person."""
        assert self.routes is not None
        envs.persons[index] = person
        envs.raws[index] = _with_person(
            envs.raws[index], self.routes.fields.person, person, catch_up=False
        )

    def rollback(self) -> None:
        """Undo the request's catch-up changes, newest first (it was answered 503)."""
        catch_up, account = self.router.catch_up, self.account
        for session, ring in reversed(self._identified):
            catch_up.restore(account, session, ring)
        for session, entry in reversed(self._buffered):
            catch_up.unbuffer(account, session, entry)

    def _stage(self, queue: Queue, framed: bytes) -> None:
        if not self.dry:
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
                    if not self.dry:
                        metrics.catchup_replayed.labels(firehose.name).inc()
        if not routes.wants_pi:
            return
        pi = frame(_person_identified(identifying))
        for firehose in routes.firehoses:
            if firehose.config.send_person_identified:
                self._stage(firehose.queue, pi)


def _record(envs: Envelopes, index: int, received: float) -> Record:
    return Record(
        envs.types[index],
        envs.ids[index],
        envs.sessions[index],
        envs.persons[index],
        envs.times[index],
        received,
        envs.raws[index],
    )


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
