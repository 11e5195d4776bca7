"""The receiver: every source of signals (the HTTP API, imports) hands records to it.

It reads each record's envelope (or takes the envelopes a source read itself: an import
makes each signal from its envelope values), drops duplicates, routes the rest to the queues of the
account's firehoses and answers only once they are durable:

- a request is kept only if every commit its records went into is (`Ticket`): a large
  body that yields part-way spans several;
- a duplicate of a record still being committed by another request waits for that
  request's commits and shares their outcome;
- a request that is not kept is answered 503, and what it changed is undone (its ids
  leave dedupe, its catch-up changes are rolled back), so its client's retry is taken.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from firehosed import metrics
from firehosed.config import AccountConfig, ServerConfig
from firehosed.dedupe import Dedupe
from firehosed.envelope import EnvelopeReader, Envelopes
from firehosed.errors import StorageError
from firehosed.faults import crash_point
from firehosed.queue.base import Ticket
from firehosed.router import RequestRouting, Routes
from firehosed.tap import Tap

log = structlog.get_logger(__name__)

MAX_REJECTED_LISTED = 1000
# A body of a million tiny records must not stall the event loop: every YIELD_EVERY
# records (a few ms of work) the receiver pauses briefly. A real pause, not sleep(0):
# the loop must block in its poll for a moment so that worker threads (the committer's
# fsync) can take the GIL; a loop that never blocks starves them (GIL convoy).
YIELD_EVERY = 2000
YIELD_PAUSE = 0.001


class IngestAccount:
    """What the receiver needs of an account: tokens, envelope reader, dedupe memory."""

    def __init__(self, name: str, config: AccountConfig, dedupe: Dedupe | None) -> None:
        self.name = name
        self.tokens = [t.encode() for t in config.tokens]
        self.reader = EnvelopeReader(config.fields)
        self.dedupe = dedupe or Dedupe(
            config.dedupe_window, config.dedupe_max, config.dedupe_max_memory
        )
        self.dedupe.window, self.dedupe.limit = config.dedupe_window, config.dedupe_max
        self.dedupe.max_memory = config.dedupe_max_memory
        self.accepted = metrics.signals_accepted.labels(name)
        self.rejected = metrics.signals_rejected.labels(name)
        self.duplicates = metrics.signals_duplicate.labels(name)


@dataclass(slots=True)
class Answer:
    """What a source tells its client: an HTTP status and a JSON document."""

    status: int
    body: dict[str, Any]


@dataclass(slots=True)
class _Request:
    """One request's records as the receiver sorts them."""

    ticket: Ticket = field(default_factory=Ticket)
    fresh: list[str] = field(default_factory=list)
    duplicates: int = 0
    originals: list[Ticket] = field(default_factory=list)  # of duplicates still in flight
    rejected: list[dict[str, Any]] = field(default_factory=list)
    rejected_total: int = 0
    tapped: list[Envelopes] | None = None  # the fresh records' envelopes, while tailed

    def rejections(self) -> dict[str, Any]:
        """The `rejected` list (at most MAX_REJECTED_LISTED), with the full count when cut."""
        if self.rejected_total <= len(self.rejected):
            return {"rejected": self.rejected}
        return {"rejected": self.rejected, "rejected_total": self.rejected_total}


class Receiver:
    """Accepts records for the accounts of the running config."""

    def __init__(
        self,
        router: Routes,
        server: ServerConfig,
        refusal: Callable[[str | None], str | None],
        tap: Tap | None = None,
    ) -> None:
        self.router = router
        self.tap = tap or Tap()  # what `firehosed tail` follows
        self.server = server  # body limits, read per request
        self.accounts: dict[str, IngestAccount] = {}
        # Why records (for an account, or for any: None) must be refused (503) now, or
        # None: the daemon's own check, called directly (once per request).
        self.refusal = refusal
        self._settling: set[asyncio.Future[None]] = set()  # cancelled requests' outcomes

    def configure(self, server: ServerConfig, accounts: dict[str, AccountConfig]) -> None:
        """Apply a (re)loaded config's limits and accounts; dedupe memory carries over."""
        self.server = server
        self.accounts = {
            name: IngestAccount(
                name, account, self.accounts[name].dedupe if name in self.accounts else None
            )
            for name, account in accounts.items()
        }

    async def accept(self, account: IngestAccount, records: list[bytes] | Envelopes) -> Answer:
        """Take one request's records (raw, or with the envelopes their source read):
        202 once durable, 400 if all were rejected, 503 if they could not be kept."""
        received = time.time()
        request = _Request(tapped=[] if self.tap.listening else None)
        account.dedupe.expire(received)
        routing = self.router.begin(account.name, request.ticket)
        # Records in runs of YIELD_EVERY, pausing between runs (the loop stays free). A
        # run is routed whole or not at all, so a request cancelled at a pause has its
        # routed runs settled below.
        for start in range(0, len(records), YIELD_EVERY):
            if start:
                await asyncio.sleep(YIELD_PAUSE)
            self._sort(account, records, received, request, routing, start=start)
        if request.rejected_total:
            account.rejected.inc(request.rejected_total)
        if request.duplicates:
            account.duplicates.inc(request.duplicates)
        if not request.fresh and not request.duplicates:
            body = {"error": "every record was rejected", **request.rejections()}
            return Answer(400, body)
        try:
            await self._kept(request)
        except StorageError as exc:
            self._settle(account, routing, request, kept=False)
            return Answer(503, {"error": str(exc)})
        except asyncio.CancelledError:
            settling = asyncio.ensure_future(self._settle_later(account, routing, request))
            self._settling.add(settling)
            settling.add_done_callback(self._settling.discard)
            raise
        self._settle(account, routing, request, kept=True)
        if request.fresh:
            crash_point("ingest.after_fsync")
            account.accepted.inc(len(request.fresh))
        if request.tapped:
            self._publish(account.name, request.tapped, received)
        body = {"accepted": len(request.fresh), "duplicates": request.duplicates}
        body.update(request.rejections())
        return Answer(202, body)

    @staticmethod
    def _sort(
        account: IngestAccount,
        records: list[bytes] | Envelopes,
        received: float,
        request: _Request,
        routing: RequestRouting,
        *,
        start: int,
    ) -> None:
        """Read, dedupe and route the records from `start`, YIELD_EVERY at most (the hot
        path: whole-run operations, per record only what routing needs)."""
        stop = start + YIELD_EVERY
        rejected: list[tuple[int, str]] = []
        if isinstance(records, Envelopes):
            envs = records.part(start, stop)
        else:
            envs, rejected = account.reader.read_all(records[start:stop], received)
        if rejected:
            request.rejected_total += len(rejected)
            room = MAX_REJECTED_LISTED - len(request.rejected)  # answer and memory bounded
            request.rejected += [
                {"index": start + index, "error": error} for index, error in rejected[:room]
            ]
        duplicates = Receiver._duplicates(account.dedupe, envs, received, request)
        if duplicates:
            envs = envs.without(duplicates)
        routing.route(envs, received)
        request.fresh += envs.ids
        if request.tapped is not None:
            request.tapped.append(envs)

    @staticmethod
    def _duplicates(
        dedupe: Dedupe, envs: Envelopes, received: float, request: _Request
    ) -> list[int]:
        """The indexes of the records dedupe has seen (the rest it now remembers as this
        request's); a duplicate of a record still in flight waits for its request."""
        if envs.assigned is None:
            found = dedupe.admit(envs.ids, received, request.ticket)
        else:  # records that brought no id are never duplicates
            found = [
                index
                for index, (ident, assigned) in enumerate(zip(envs.ids, envs.assigned, strict=True))
                if not assigned and dedupe.seen(ident, received, request.ticket)
            ]
        ticket, originals = request.ticket, request.originals
        for index in found:
            original = dedupe.original(envs.ids[index])
            if original is not None and original is not ticket and original not in originals:
                originals.append(original)
        request.duplicates += len(found)
        return found

    def _publish(self, account: str, runs: list[Envelopes], received: float) -> None:
        """Tell the tail what was accepted (only while someone follows it)."""
        routes = self.router.accounts.get(account)
        for envs in runs:
            for kind, ident, person in zip(envs.types, envs.ids, envs.persons, strict=True):
                queues = routes.targets(kind, person is None) if routes else ()
                self.tap.publish(
                    {
                        "event": "accepted",
                        "time": received,
                        "account": account,
                        "type": kind,
                        "id": ident,
                        "firehoses": [q.name for q in queues],
                    }
                )

    @staticmethod
    def _kept(request: _Request) -> Awaitable[None]:
        """Wait for the request's commits, then for those of the originals of its
        duplicates; StorageError if any failed."""
        if request.fresh and request.ticket and not request.originals:  # the common one
            crash_point("ingest.after_append")
            return request.ticket.wait()
        return Receiver._kept_all(request)

    @staticmethod
    async def _kept_all(request: _Request) -> None:
        if request.fresh:
            crash_point("ingest.after_append")
            await request.ticket.wait()
        for original in request.originals:
            await original.wait()
        if not request.ticket and not request.originals:
            # Nothing to wait for (no firehose took a record, or only settled duplicates):
            # answer on the next loop turn all the same, with the other answers of this
            # one. Answering at once, between the reads of one turn, cost a third of the
            # throughput of such requests (bench/RESULTS.md, decompose: "no firehose").
            await asyncio.sleep(0)

    @staticmethod
    def _settle(
        account: IngestAccount, routing: RequestRouting, request: _Request, kept: bool
    ) -> None:
        account.dedupe.settled(request.ticket, request.fresh, kept)
        if not kept:
            routing.rollback()

    async def _settle_later(
        self, account: IngestAccount, routing: RequestRouting, request: _Request
    ) -> None:
        """A cancelled request (shutdown): settle it once its commits are done."""
        try:
            await request.ticket.wait()
        except StorageError:
            self._settle(account, routing, request, kept=False)
        else:
            self._settle(account, routing, request, kept=True)
