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
from firehosed.queue.commit import Committer
from firehosed.queue.frames import frame
from firehosed.record import Record, decoder, encode


class AccountRoutes:
    """One account's firehoses and field paths, as routing needs them."""

    def __init__(self, fields: FieldsConfig, firehoses: Iterable[Firehose]) -> None:
        self.fields = fields
        self.firehoses = list(firehoses)
        self.wants_catch_up = any(f.config.catch_up for f in self.firehoses)
        self.wants_pi = any(f.config.send_person_identified for f in self.firehoses)


class Router:
    """Appends each accepted signal to the queues of the firehoses that get it."""

    def __init__(self, catch_up: CatchUp, committer: Committer) -> None:
        self.catch_up = catch_up
        self.committer = committer
        self.accounts: dict[str, AccountRoutes] = {}

    def route(self, account: str, env: Envelope, raw: bytes, received: float) -> None:
        """Stage one signal (and any catch-up it triggers) on its firehoses' queues."""
        routes = self.accounts.get(account)
        if routes is None or not routes.firehoses:
            return
        person, session = env.person, env.session
        if person is None and session is not None:
            person = self.catch_up.person_of(account, session, received)
            if person is not None:
                raw = _with_person(raw, routes.fields.person, person, catch_up=False)
        record = Record(env.type, env.id, session, person, env.time, received, raw)
        encoded = encode(record)
        framed = frame(encoded)  # once, whatever the number of firehoses
        if person is None:
            if session is not None and routes.wants_catch_up:
                self.catch_up.buffer(account, session, encoded, received)
            self._append(routes.firehoses, framed, env.type, anonymous=True)
            return
        if session is not None and env.person is not None:
            ring = self.catch_up.identify(account, session, person, received)
            if ring or (ring is not None and routes.wants_pi):
                self._replay(routes, ring, record)
        self._append(routes.firehoses, framed, env.type, anonymous=False)

    def _append(
        self, firehoses: list[Firehose], framed: bytes, signal_type: str, *, anonymous: bool
    ) -> None:
        for firehose in firehoses:
            if firehose.admits(signal_type) and (
                not anonymous or firehose.config.include_anonymous
            ):
                self._stage(firehose, framed)

    def _stage(self, firehose: Firehose, framed: bytes) -> None:
        if firehose.queue.append(framed):
            self.committer.mark(firehose.queue)

    def _replay(self, routes: AccountRoutes, ring: list[bytes], identifying: Record) -> None:
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
                    self._stage(firehose, framed)
                    metrics.catchup_replayed.labels(firehose.name).inc()
        if not routes.wants_pi:
            return
        pi = frame(_person_identified(identifying))
        for firehose in routes.firehoses:
            if firehose.config.send_person_identified:
                self._stage(firehose, pi)


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
