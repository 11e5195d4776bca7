"""Sessions in partitions: ingest publishes by partition, each partition's owner routes.

    POST ─► any process ─► SIGNALS in.<p> (one message per request and partition) ─► 202
    owner of p ─► router (catch-up rings, firehose targets) ─► QUEUES q.<firehose>

A session always hashes to the same partition, and a partition has one owner at a
time (its `part.<p>` lease), so a session's catch-up ring lives in one process. The
owner routes a partition's messages in order and notes in the state bucket how far it
routed (`part.<p>`, updated on the revision it read: a stale owner's update fails).

A new owner first replays what was routed within `session_ttl` without appending
anything (a dry routing), which rebuilds the rings and identities; then it routes
from where the last owner stopped. A message routed twice (the old owner died between
its PubAcks and its note) publishes the same payloads again: the stream's duplicate
window, keyed by the digest of the payload and its firehose, stores them once.

The SIGNALS stream keeps what the rebuild needs: each owner purges its partition up to
the older of "routed" and "session_ttl ago", once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import zlib
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import msgspec
import nats
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from firehosed.catchup import CatchUp
from firehosed.envelope import Envelopes
from firehosed.errors import StorageError
from firehosed.jetstream.cluster import Cluster, Lease, Leases
from firehosed.jetstream.queue import RECORDS, Publish, add_records, publish
from firehosed.queue.base import Ticket
from firehosed.queue.frames import Unsealed
from firehosed.record import Block, Rows
from firehosed.router import AccountRoutes, Router
from firehosed.tasks import raise_if_cancelled

log = structlog.get_logger(__name__)

ACCOUNT = "Firehosed-Account"  # header: whose signals a message holds
FETCH = 256  # messages an owner routes at once (one note of how far it routed)
PURGE_EVERY = 60.0  # seconds between purges of a partition's routed, expired signals
RETRY = 1.0  # seconds before routing the cluster failed is tried again


def partition_of(key: str, partitions: int) -> int:
    """The partition of a session (or, for a record without one, of its id)."""
    return zlib.crc32(key.encode()) % partitions


class Partitioner:
    """The receiver's router with the JetStream backend (see the module docstring)."""

    def __init__(self, cluster: Cluster, router: Router) -> None:
        self.cluster = cluster
        self.router = router

    @property
    def accounts(self) -> dict[str, AccountRoutes]:
        return self.router.accounts

    def begin(self, account: str, ticket: Ticket) -> Partitioning:
        return Partitioning(self.cluster, account, ticket)


class Partitioning:
    """One request's records, published by partition."""

    def __init__(self, cluster: Cluster, account: str, ticket: Ticket) -> None:
        self.cluster = cluster
        self.account = account
        self.ticket = ticket

    def route(self, envs: Envelopes, received: float) -> None:
        """Publish the records, one message per partition they fall in (in order)."""
        if not len(envs):
            return
        partitions = self.cluster.config.partitions
        groups: dict[int, list[int]] = {}
        for index, (session, ident) in enumerate(zip(envs.sessions, envs.ids, strict=True)):
            groups.setdefault(partition_of(session or ident, partitions), []).append(index)
        for partition, indexes in groups.items():
            block = _block(envs, indexes, received)
            self._publish(partition, block)

    def _publish(self, partition: int, block: Block) -> None:
        cluster = self.cluster
        payload = bytes(Unsealed(block).sealed())
        digest = hashlib.blake2b(digest_size=16)
        digest.update(self.account.encode())
        for ident in block.ids:  # a retried request is the same message (the same ids)
            digest.update(b"\0" + ident.encode())
        headers = {
            "Nats-Msg-Id": digest.hexdigest(),
            ACCOUNT: self.account,
            RECORDS: str(len(block.ids)),
        }
        subject = cluster.names.signal_subject(partition)
        task = asyncio.ensure_future(publish(cluster, subject, payload, headers))
        self.ticket.add(Publish(task))

    def rollback(self) -> None:
        """Nothing here changes before the PubAck: nothing to undo."""


def _block(envs: Envelopes, indexes: list[int], received: float) -> Block:
    if len(indexes) == len(envs):
        return envs.block(received, 0, len(envs))
    return Block(
        received,
        [envs.types[i] for i in indexes],
        [envs.ids[i] for i in indexes],
        [envs.sessions[i] for i in indexes],
        [envs.persons[i] for i in indexes],
        [envs.times[i] for i in indexes],
        [envs.raws[i] for i in indexes],
        envs.plain,
    )


class Routed(msgspec.Struct):
    """How far a partition is routed (the state bucket's `part.<p>`)."""

    seq: int
    owner: str
    at: float


class Owners:
    """This process's partitions: it wants every partition's lease (the lease keeper
    gives it a fair share) and routes those it holds."""

    def __init__(self, cluster: Cluster, leases: Leases, router: Router) -> None:
        self.cluster = cluster
        self.router = router
        self.partitions = [
            Partition(cluster, leases.want("part", f"part.{p}"), p, router)
            for p in range(cluster.config.partitions)
        ]

    async def run(self) -> None:
        await asyncio.gather(*(p.run() for p in self.partitions))


class Partition:
    """Routes one partition while this process holds its lease."""

    def __init__(self, cluster: Cluster, lease: Lease, number: int, router: Router) -> None:
        self.cluster = cluster
        self.lease = lease
        self.number = number
        self.router = router
        self.subject = cluster.names.signal_subject(number)
        self.key = f"part.{number}"
        self.routed = 0
        self._revision = 0
        self._purged_at = 0.0

    async def run(self) -> None:
        while True:
            raise_if_cancelled()
            await self.lease.held.wait()
            try:
                await self._own()
            except (StorageError, nats.errors.Error, TimeoutError) as exc:
                log.warning(
                    "jetstream.partition_failed",
                    partition=self.number,
                    error=str(exc) or type(exc).__name__,
                )
                await asyncio.sleep(RETRY)
            except Exception:  # a bug: said loudly, and the partition taken up again
                log.exception("jetstream.partition_crashed", partition=self.number)
                await asyncio.sleep(RETRY)
            finally:
                self._forget()

    async def _own(self) -> None:
        """Rebuild, then route until the lease goes."""
        await self._read_routed()
        rebuilt = await self._rebuild()
        log.info(
            "jetstream.partition_owned", partition=self.number, routed=self.routed, replayed=rebuilt
        )
        consumer = await self._consumer(
            DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.routed + 1
        )
        try:
            while self.lease.held.is_set():
                try:
                    msgs = await consumer.fetch(batch=FETCH, timeout=1.0)
                except TimeoutError:
                    msgs = []
                if not msgs:
                    if await self._stored_past(self.routed):
                        # Nothing came though there is more: the consumer is gone (its
                        # server died); a new one starts where routing stands.
                        await _unsubscribe(consumer)
                        consumer = await self._consumer(
                            DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.routed + 1
                        )
                    else:
                        await self._purge()
                    continue
                await self._route(msgs)
                if not await self._note(int(msgs[-1].metadata.sequence.stream)):
                    return
        finally:
            with contextlib.suppress(Exception):
                await consumer.unsubscribe()

    async def _stored_past(self, seq: int) -> bool:
        try:
            last = await self.cluster.js.get_last_msg(self.cluster.names.signals, self.subject)
        except nats.js.errors.NotFoundError:
            return False
        return int(last.seq or 0) > seq

    async def _read_routed(self) -> None:
        self.routed, self._revision = 0, 0
        with contextlib.suppress(KeyNotFoundError):
            entry = await self.cluster.state.get(self.key)
            self.routed = msgspec.json.decode(entry.value or b"", type=Routed).seq
            self._revision = entry.revision or 0

    async def _note(self, seq: int) -> bool:
        """Note how far the partition is routed; False when another owner took it."""
        state = self.cluster.state
        value = msgspec.json.encode(Routed(seq, self.cluster.me, time.time()))
        try:
            if self._revision:
                self._revision = await state.update(self.key, value, last=self._revision)
            else:
                self._revision = await state.create(self.key, value)
        except KeyWrongLastSequenceError:
            log.warning("jetstream.partition_lost", partition=self.number)
            self.lease.set_lost()
            return False
        self.routed = seq
        return True

    async def _route(self, msgs: Iterable[Any]) -> None:
        """Route each message's records; wait until every append is durable. Retried
        (catch-up changes undone first) until it is, or the lease goes."""
        msgs = list(msgs)
        while True:
            routings, ticket = [], Ticket()
            for msg in msgs:
                account, rows = _decode(msg)
                routing = self.router.begin(account, ticket)
                routing.route(_envelopes(rows), rows.received[0] if len(rows) else time.time())
                routings.append(routing)
            try:
                if ticket:
                    await ticket.wait()
                return
            except StorageError as exc:
                for routing in reversed(routings):
                    routing.rollback()
                log.warning("jetstream.route_failed", partition=self.number, error=str(exc))
                if not self.lease.held.is_set():
                    raise
                await asyncio.sleep(RETRY)

    async def _rebuild(self) -> int:
        """Replay what was routed within session_ttl, dry: the rings and identities."""
        if self.routed == 0:
            return 0
        since = time.time() - self.router.catch_up.config.session_ttl
        consumer = await self._consumer(
            DeliverPolicy.BY_START_TIME,
            opt_start_time=datetime.fromtimestamp(since, UTC).isoformat(),
        )
        replayed = 0
        try:
            while True:
                try:
                    msgs = await consumer.fetch(batch=FETCH, timeout=1.0)
                except TimeoutError:
                    return replayed
                for msg in msgs:
                    if int(msg.metadata.sequence.stream) > self.routed:
                        return replayed
                    account, rows = _decode(msg)
                    routing = self.router.begin(account, Ticket(), dry=True)
                    routing.route(_envelopes(rows), rows.received[0])
                    replayed += len(rows)
                    if msg.metadata.num_pending == 0:
                        return replayed
        finally:
            with contextlib.suppress(Exception):
                await consumer.unsubscribe()

    async def _consumer(self, policy: DeliverPolicy, **start: Any) -> Any:
        return await self.cluster.js.pull_subscribe(
            self.subject,
            durable=None,
            stream=self.cluster.names.signals,
            config=ConsumerConfig(
                deliver_policy=policy,
                ack_policy=AckPolicy.NONE,
                inactive_threshold=30.0,
                mem_storage=True,
                num_replicas=1,
                **start,
            ),
        )

    async def _purge(self) -> None:
        """Drop the partition's signals both routed and older than session_ttl."""
        now = time.time()
        if now - self._purged_at < PURGE_EVERY or not self.routed:
            return
        self._purged_at = now
        since = now - self.router.catch_up.config.session_ttl
        consumer = await self._consumer(
            DeliverPolicy.BY_START_TIME,
            opt_start_time=datetime.fromtimestamp(since, UTC).isoformat(),
        )
        try:
            msgs = await consumer.fetch(batch=1, timeout=1.0)
            keep_from = int(msgs[0].metadata.sequence.stream)
        except TimeoutError:
            keep_from = self.routed + 1  # nothing that young: all routed ones may go
        finally:
            with contextlib.suppress(Exception):
                await consumer.unsubscribe()
        await self.cluster.js.purge_stream(
            self.cluster.names.signals, subject=self.subject, seq=min(keep_from, self.routed + 1)
        )

    def _forget(self) -> None:
        """The lease went: this process's rings of the partition are not its to keep."""
        partitions, number = self.cluster.config.partitions, self.number
        catch_up: CatchUp = self.router.catch_up
        catch_up.forget(lambda session: partition_of(session, partitions) == number)


async def _unsubscribe(consumer: Any) -> None:
    with contextlib.suppress(Exception):
        await consumer.unsubscribe()


def _decode(msg: Any) -> tuple[str, Rows]:
    rows = Rows()
    add_records(rows, msg.data)
    return (msg.headers or {}).get(ACCOUNT, ""), rows


def _envelopes(rows: Rows) -> Envelopes:
    return Envelopes(
        rows.types, rows.ids, rows.sessions, rows.persons, rows.times, rows.raws, None, rows.plain
    )
