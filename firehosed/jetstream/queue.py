"""The JetStream backend's queues: each firehose's records in one subject of a stream.

`append` publishes a frame's payload (a request's Block, or one Record) to the
firehose's subject, `q.<firehose>`; its commit is the PubAck, which JetStream sends once
a quorum of the stream's replicas stored the message. Any process may append.

One process at a time cuts a firehose's batches: the holder of its `cut.<firehose>`
lease. It follows the subject's headers (records, bytes, time of each message), reads
the messages of a batch when one is due, and fixes the batch before its first attempt:
its bytes in the object store (a stream batch's in its manifest) under its number and
id, its manifest in the state bucket, created only if that number is new: a cutter that
lost its lease cannot overwrite what the new one cut, neither the manifest nor the
bytes it names. A cutter that takes over reads the manifests and sends the same names
and bytes again.

Delivered records leave the stream only after their channel confirmed: `done` purges
the subject up to the batch's end, then moves the cursor (`<firehose>.cursor`, the
manifest of the batch delivered last, updated on the revision the cutter read: a stale
cutter's update fails), then deletes the manifest and the bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats
import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from firehosed import metrics
from firehosed.errors import BatchGone, FirehosedError, NotHere, StorageError
from firehosed.faults import fail_point
from firehosed.fileio import write_durably
from firehosed.jetstream.cluster import Cluster, Lease, Leases, background
from firehosed.queue.base import (
    CutRules,
    Encoded,
    Encoder,
    Manifest,
    Naming,
    QueueFigures,
    unique_name,
)
from firehosed.queue.frames import Framed, Unsealed, scan
from firehosed.record import BLOCKS, Joined, Rows, decoder
from firehosed.tasks import raise_if_cancelled

log = structlog.get_logger(__name__)

RECORDS = "Firehosed-Records"  # header: how many records a message holds
INLINE_MAX = 256 << 10  # a stream batch's bytes up to this live in its manifest
FETCH = 256  # messages asked for at once when a cut reads its records
RETRY = 1.0  # seconds before a cut the cluster failed is tried again
CLOSE_GRACE = 3.0  # seconds a clean stop spends giving leases up, and disconnecting
TAIL_CHECK = 5.0  # seconds between looks at whether the cutter's tail still follows


class Publish:
    """A commit: one message, durable once JetStream acknowledged it."""

    __slots__ = ("_task",)

    def __init__(self, task: asyncio.Task[int]) -> None:
        self._task = task

    async def wait(self) -> None:
        # (shielded: a request cancelled while waiting does not cancel the publish)
        await asyncio.shield(self._task)


async def publish(cluster: Cluster, subject: str, payload: bytes, headers: dict[str, str]) -> int:
    """Publish and wait for the PubAck; its stream sequence. StorageError when the
    cluster did not take it (unreachable, no quorum, timed out)."""
    try:
        fail_point("queue.fsync")
        ack = await cluster.js.publish(subject, payload, headers=headers)
    except (OSError, nats.errors.Error, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        raise StorageError(f"the JetStream cluster did not take the records: {reason}") from exc
    return int(ack.seq)


def payload_of(framed: Framed) -> bytes:
    """What a message holds: the appended frames, as the segments of the local backend
    hold them (their CRCs are checked again when a cut reads them)."""
    return bytes(framed.sealed()) if isinstance(framed, Unsealed) else bytes(framed)


def message_id(subject: str, payload: bytes) -> str:
    """The digest of the payload and its subject: the same records routed to a firehose
    twice (a partition routed again after a takeover) are stored once within the
    duplicate window. The window is the stream's, over every firehose's subject, and two
    firehoses of one account in one format are sent the same bytes: without the subject,
    the second firehose's copy was taken for a duplicate and dropped."""
    digest = hashlib.blake2b(subject.encode(), digest_size=16)
    digest.update(b"\0")
    digest.update(payload)
    return digest.hexdigest()


def add_records(rows: Rows, data: bytes, skip: int = 0, stop: int = -1) -> int:
    """Add records `skip` to `stop` (-1: to the end) of a message's frames to `rows`;
    how many records the message holds. A corrupt frame is a StorageError: JetStream
    stored what we sent, so it is a bug, not a disk, and must not pass silently."""
    count = 0
    for span in scan(data):
        if span.payload is None:
            raise StorageError(f"corrupt frame at byte {span.start} of a JetStream message")
        payload = span.payload
        if payload[0] in BLOCKS:
            block = Joined.read(payload)
            size = len(block)
        else:
            block, size = None, 1
        start = min(max(skip - count, 0), size)
        end = size if stop < 0 else min(max(stop - count, 0), size)
        if start < end:
            if block is not None:
                rows.add_block(block, start, end)
            else:
                rows.append(decoder.decode(payload))
        count += size
    return count


@dataclass(slots=True)
class _Message:
    """A message of the subject not yet cut, as its headers tell."""

    seq: int
    records: int
    size: int
    time: float


def _no_encoder(records: object) -> Encoded:
    raise RuntimeError("queue used before configure()")


class JetStreamQueue:
    """One firehose's queue in the cluster (see the module's docstring)."""

    def __init__(self, backend: JetStreamBackend, name: str) -> None:
        self.name = name
        self._backend = backend
        self._cluster = backend.cluster
        self._subject = backend.cluster.names.queue_subject(name)
        self._lease: Lease = backend.leases.want("cut", f"cut.{name}")
        self._spool = backend.spool / name
        self._rules = CutRules(stream=False, max_records=1 << 62, max_bytes=1 << 62, interval=0)
        self._encoder: Encoder = _no_encoder
        self._news = asyncio.Event()
        self._interrupted = False
        # The cutter's state, loaded when the lease is taken (None: not loaded).
        self._loaded: asyncio.Task[None] | None = None
        self._loaded_under = 0  # the lease's take it was loaded under
        self._batches: list[Manifest] = []
        self._last: Manifest | None = None  # the newest cut (naming, numbering)
        self._cursor_revision = 0
        self._next: tuple[int, int] = (1, 0)  # (seq, skip) where the next cut starts
        self._pending: deque[_Message] = deque()
        self._pending_records = 0
        self._pending_bytes = 0
        self._tail: Any = None
        self._watch: asyncio.Future[None] | None = None
        self._dead_bytes = 0

    def configure(self, rules: CutRules, encoder: Encoder) -> None:
        self._rules, self._encoder = rules, encoder
        self._news.set()

    # -- appending (any process) -----------------------------------------------------

    def append(self, framed: Framed, records: int) -> Publish:
        payload = payload_of(framed)
        headers = {"Nats-Msg-Id": message_id(self._subject, payload), RECORDS: str(records)}
        task = asyncio.ensure_future(publish(self._cluster, self._subject, payload, headers))
        return Publish(task)

    # -- the cutter's state ------------------------------------------------------------

    async def _owned(self) -> bool:
        """Wait for the cut lease and this queue's state; False when interrupted first."""
        while not self._interrupted:
            if self._loaded is not None and self._loaded_under != self._lease.taken:
                # The lease went and came back unseen (mid-cut): another process may have
                # cut and delivered meanwhile, so what was read then is stale.
                self._unload()
            if self._lease.held.is_set() and self._loaded is not None and self._loaded.done():
                if self._loaded.exception() is None:
                    return True
                self._loaded = None
                await asyncio.sleep(RETRY)
                continue
            if self._lease.held.is_set():
                if self._loaded is None:
                    self._loaded = asyncio.ensure_future(self._load())
                    self._loaded_under = self._lease.taken
                await self._wait_for(self._loaded)
            else:
                self._unload()
                await self._wait_for(asyncio.ensure_future(self._lease.held.wait()))
        return False

    async def _own_for(self, what: str) -> None:
        """Hold the cut lease and this queue's state for an operator's `what`, waiting
        for them one lease TTL at most (a restarted process takes its own lease back in
        its first round); NotHere when another process holds the lease."""
        try:
            owned = await asyncio.wait_for(self._owned(), self._cluster.config.lease_ttl)
        except TimeoutError:
            holder = self._backend.leases.holders.get(self._lease.key)
            by = f"process {holder}" if holder else "no process yet"
            raise NotHere(
                f"firehose {self.name} is cut by {by}, not by this one ({self._cluster.me}):"
                f" ask that one to {what}"
            ) from None
        if not owned:
            raise FirehosedError(f"firehose {self.name} is stopping or reloading: ask again")

    async def _wait_for(self, future: asyncio.Future[Any]) -> None:
        news = asyncio.ensure_future(self._news.wait())
        try:
            await asyncio.wait({future, news}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            news.cancel()
        self._news.clear()

    async def _load(self) -> None:
        """Read the manifests and cursor, and follow the subject from the cursor."""
        state = self._cluster.state
        batches = await self._manifests("m")
        self._dead_bytes = sum(m.size for m in await self._manifests("d"))
        cursor: Manifest | None = None
        self._cursor_revision = 0
        with contextlib.suppress(KeyNotFoundError):
            entry = await state.get(f"{self.name}.cursor")
            cursor = msgspec.json.decode(entry.value or b"", type=Manifest)
            self._cursor_revision = entry.revision or 0
        newest = max([*batches, *([cursor] if cursor else [])], key=lambda m: m.no, default=None)
        self._batches, self._last = batches, newest
        self._next = (newest.end[0], newest.end[2]) if newest is not None else (1, 0)
        self._pending.clear()
        self._pending_records = self._pending_bytes = 0
        await self._follow(self._next[0])
        self._watch = asyncio.ensure_future(self._watch_tail())
        log.info(
            "jetstream.cutter_ready",
            firehose=self.name,
            batches=len(batches),
            next=self._next[0],
        )

    async def _manifests(self, kind: str) -> list[Manifest]:
        """The batches cut ("m") or dead-lettered ("d"), in their order."""
        found = await self._cluster.entries(self._cluster.names.state, f"{self.name}.{kind}.*")
        manifests = (msgspec.json.decode(e.value or b"", type=Manifest) for e in found)
        return sorted(manifests, key=lambda m: m.no)

    async def _follow(self, start: int) -> None:
        """Subscribe to the headers of the subject's messages from `start` on."""
        if self._tail is not None:
            await _unsubscribe(self._tail)
        self._tail = await self._cluster.js.subscribe(
            self._subject,
            ordered_consumer=True,
            cb=self._heard,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=start,
                headers_only=True,
            ),
        )

    def _heard_up_to(self) -> int:
        return self._pending[-1].seq if self._pending else self._next[0] - 1

    async def _watch_tail(self) -> None:
        """Follow the subject again when the tail stalls: nats-py's ordered consumer
        stops for good when re-creating it fails (its server died, a leader was being
        elected), and says nothing. Stalled: messages stored past what was heard, and
        nothing heard since the last look."""
        before = -1
        while True:
            raise_if_cancelled()
            await asyncio.sleep(TAIL_CHECK)
            heard = self._heard_up_to()
            try:
                stored = await self._last_stored()
                if stored > heard == before:
                    log.warning("jetstream.tail_stalled", firehose=self.name, heard=heard)
                    await self._follow(heard + 1)
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("jetstream.tail_check_failed", firehose=self.name, error=repr(exc))
            before = heard

    async def _last_stored(self) -> int:
        """The sequence of the subject's newest message (0: none)."""
        try:
            last = await self._cluster.js.get_last_msg(self._cluster.names.queues, self._subject)
        except nats.js.errors.NotFoundError:
            return 0
        return int(last.seq or 0)

    async def _heard(self, msg: Any) -> None:
        """One message's headers (records, size, time): it waits to be cut."""
        meta = msg.metadata
        seq = int(meta.sequence.stream)
        if seq < self._next[0] or (self._pending and seq <= self._pending[-1].seq):
            return
        headers = msg.headers or {}
        records = int(headers.get(RECORDS, "1"))
        if seq == self._next[0]:
            records -= self._next[1]
        size = int(headers.get("Nats-Msg-Size", "0"))
        self._pending.append(_Message(seq, records, size, meta.timestamp.timestamp()))
        self._pending_records += records
        self._pending_bytes += size
        # A waiting consumer wakes for what changes its wait: a stream cuts at once; a
        # file's clock starts with its first record, or it is full.
        rules = self._rules
        if rules.stream or len(self._pending) == 1 or self._pending_bytes >= rules.max_bytes:
            self._news.set()

    def _unload(self) -> None:
        if self._loaded is None:
            return
        self._loaded = None
        self._batches, self._last = [], None
        self._pending.clear()
        self._pending_records = self._pending_bytes = 0
        tail, self._tail = self._tail, None
        if tail is not None:
            background(_unsubscribe(tail))
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()

    # -- cutting ---------------------------------------------------------------------

    async def next_batch(self, *, flush: bool = False) -> Manifest | None:
        if flush and not self._lease.held.is_set() and self._backend.leases.rounds:
            return None  # (a drain: another process cuts this firehose)
        try:
            while await self._owned():
                if self._batches:
                    return self._batches[0]
                if self._pending and (flush or self._due()):
                    if await self._cut_logged() is None:
                        await self._wait(RETRY)
                elif flush and await self._caught_up():
                    if not self._pending:  # (the tail may have heard more meanwhile)
                        return None
                else:
                    await self._wait(0.05 if flush else self._next_cut_in())
            return None
        finally:
            self._interrupted = False

    async def keep(self) -> None:
        try:
            while await self._owned():
                if self._pending and self._due():
                    if await self._cut_logged() is None:
                        await self._wait(RETRY)
                else:
                    await self._wait(self._next_cut_in())
        finally:
            self._interrupted = False

    def interrupt(self) -> None:
        self._interrupted = True
        self._news.set()

    async def seal(self) -> None:
        if not self._lease.held.is_set() or self._loaded is None or not self._loaded.done():
            return
        while self._pending:
            if await self._cut_logged() is None:
                return

    def _due(self) -> bool:
        rules = self._rules
        if self._pending_records >= rules.max_records or self._pending_bytes >= rules.max_bytes:
            return True
        due_in = self._next_cut_in()
        return (due_in is None and rules.stream) or (due_in is not None and due_in <= 0)

    def _next_cut_in(self) -> float | None:
        if not self._pending or (self._rules.stream and self._rules.interval <= 0):
            return None
        return self._pending[0].time + self._rules.interval - time.time()

    async def _wait(self, seconds: float | None) -> None:
        self._news.clear()
        if seconds is not None and seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._news.wait(), seconds)

    async def _caught_up(self) -> bool:
        """Every message the subject holds has been heard (a flush is complete)."""
        return await self._last_stored() <= self._heard_up_to()

    async def _cut_logged(self) -> Manifest | None:
        try:
            return await self._cut()
        except (StorageError, nats.errors.Error, TimeoutError, OSError) as exc:
            log.exception(
                "batch.cut_failed", firehose=self.name, error=str(exc) or type(exc).__name__
            )
            return None

    async def _cut(self) -> Manifest | None:
        """Read the next batch's records, encode them, fix the batch in the cluster."""
        taken, end = self._take()
        if not taken:
            return None
        rows = await self._read(taken, end)
        expected = self._count(taken, end)
        if len(rows) != expected:
            if await self._purged(taken[0].seq):
                if not len(rows):
                    self._consume(taken, end)  # a stale cutter delivered them: skip them
                    return None
                # Another cutter cut and delivered part of them: this state is stale.
                log.warning("jetstream.cut_stale", firehose=self.name, first=taken[0].seq)
                self._unload()
                return None
            raise StorageError(f"read {len(rows)} of the batch's {expected} records")
        encoded = await asyncio.to_thread(self._encoder, rows)
        manifest = self._manifest(rows, encoded, taken[0].seq, end)
        if not await self._fix(manifest, bytes(encoded.data)):
            return None
        self._consume(taken, end)
        self._batches.append(manifest)
        self._last = manifest
        log.info(
            "batch.cut",
            firehose=self.name,
            batch=manifest.name,
            records=manifest.records,
            bytes=manifest.size,
        )
        return manifest

    def _take(self) -> tuple[list[_Message], tuple[int, int]]:
        """The messages of the next batch, and where the cut after it starts."""
        rules = self._rules
        taken: list[_Message] = []
        records = size = 0
        for message in self._pending:
            if taken and size + message.size > rules.max_bytes:
                return taken, (message.seq, self._skip(message))
            room = rules.max_records - records
            if message.records > room:  # the cut ends inside this message
                taken.append(message)
                return taken, (message.seq, self._skip(message) + room)
            taken.append(message)
            records += message.records
            size += message.size
        return taken, (taken[-1].seq + 1, 0) if taken else self._next

    def _count(self, taken: list[_Message], end: tuple[int, int]) -> int:
        """How many records a cut of `taken` up to `end` holds."""
        last = taken[-1]
        tail = end[1] - self._skip(last) if end[0] == last.seq else last.records
        return sum(m.records for m in taken[:-1]) + tail

    async def _purged(self, seq: int) -> bool:
        try:
            await self._cluster.js.get_msg(self._cluster.names.queues, seq)
        except nats.js.errors.NotFoundError:
            return True
        return False

    def _skip(self, message: _Message) -> int:
        return self._next[1] if message.seq == self._next[0] else 0

    async def _read(self, taken: list[_Message], end: tuple[int, int]) -> Rows:
        """The records of `taken`, from `self._next` to `end`."""
        rows = Rows()
        first, last = taken[0].seq, taken[-1].seq
        consumer = await self._cluster.js.pull_subscribe(
            self._subject,
            durable=None,
            stream=self._cluster.names.queues,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=first,
                ack_policy=AckPolicy.NONE,
                inactive_threshold=30.0,
                mem_storage=True,
                num_replicas=1,
            ),
        )
        try:
            reading = True
            while reading:
                try:
                    msgs = await consumer.fetch(batch=FETCH, timeout=self._cluster.config.timeout)
                except TimeoutError:  # (what was read is counted by the caller)
                    break
                for msg in msgs:
                    seq = int(msg.metadata.sequence.stream)
                    if seq > last:
                        reading = False
                        break
                    skip = self._next[1] if seq == self._next[0] else 0
                    add_records(rows, msg.data, skip, end[1] if seq == end[0] else -1)
                    if seq == last or msg.metadata.num_pending == 0:
                        reading = False
                        break
        finally:
            await _unsubscribe(consumer)
        return rows

    def _manifest(self, rows: Rows, encoded: Encoded, first: int, end: tuple[int, int]) -> Manifest:
        last = self._last
        naming = Naming(last.base, last.suffix, last.named) if last is not None else Naming()
        unique, naming = unique_name(encoded.base, rows[0].received, naming)
        stream = self._rules.stream
        inline = stream and len(encoded.data) <= INLINE_MAX
        return Manifest(
            no=last.no + 1 if last is not None else 1,
            id=f"msg_{uuid.uuid4().hex}",
            name=encoded.prefix + unique + encoded.extension,
            records=len(rows),
            size=len(encoded.data),
            opened=rows[0].received,
            cut=time.time(),
            end=(end[0], 0, end[1]),
            start=(first, 0, self._next[1] if first == self._next[0] else 0),
            content_type=encoded.content_type,
            content_encoding=encoded.content_encoding,
            keys=rows.keys() if stream else [],
            base=naming.base,
            suffix=naming.suffix,
            named=naming.named,
            data=bytes(encoded.data) if inline else None,
        )

    async def _fix(self, manifest: Manifest, data: bytes) -> bool:
        """Store the batch's bytes, then create its manifest; False when another
        cutter numbered a batch so first (this process lost the lease)."""
        objects = self._cluster.objects
        if manifest.data is None:
            await objects.put(self._object(manifest), data)
        try:
            await self._cluster.state.create(
                f"{self.name}.m.{manifest.no}", msgspec.json.encode(manifest)
            )
        except KeyWrongLastSequenceError:
            log.warning("jetstream.cut_lost", firehose=self.name, batch=manifest.no)
            self._lease.set_lost()
            self._unload()
            if manifest.data is None:  # (bytes no manifest names)
                with contextlib.suppress(nats.errors.Error):
                    await objects.delete(self._object(manifest))
            return False
        return True

    def _consume(self, taken: list[_Message], end: tuple[int, int]) -> None:
        """The messages of a cut leave the pending list (the last one may stay, in part)."""
        for message in taken:
            if message.seq == end[0]:  # cut inside it: the rest stays pending
                done = end[1] - self._skip(message)
                message.records -= done
                self._pending_records -= done
                break
            self._pending.popleft()
            self._pending_records -= message.records
            self._pending_bytes -= message.size
        self._next = end

    def _object(self, batch: Manifest) -> str:
        """Where a batch's bytes are kept. Its id is in the name: a cutter that lost its
        lease puts the bytes of the batch it numbered the same before its manifest is
        refused, and with the number alone those replaced the bytes the new cutter's
        manifest names (records lost, in a fault test of two firehoses)."""
        return f"{self.name}/{batch.no}-{batch.id}"

    def _old_object(self, batch: Manifest) -> str:
        """Where a version before kept a batch's bytes: by number alone."""
        return f"{self.name}/{batch.no}"

    async def _bytes(self, batch: Manifest) -> bytes:
        """A batch's bytes from the object store; those of a batch cut by a version
        that named them by number alone, under that name."""
        objects = self._cluster.objects
        try:
            return (await objects.get(self._object(batch))).data or b""
        except nats.js.errors.ObjectNotFoundError:
            return (await objects.get(self._old_object(batch))).data or b""

    async def _drop_bytes(self, batch: Manifest) -> None:
        for name in (self._object(batch), self._old_object(batch)):
            with contextlib.suppress(
                nats.js.errors.NotFoundError, nats.js.errors.ObjectNotFoundError
            ):
                await self._cluster.objects.delete(name)

    # -- after delivery ----------------------------------------------------------------

    async def local_file(self, batch: Manifest, *, write: bool) -> Path:
        path = self._spool / f"{batch.no}-{batch.id}.data"
        if not path.exists():
            data = batch.data
            if data is None:
                data = await self._stored(batch)
            await asyncio.to_thread(_spool, path, data)
        return path

    async def _stored(self, batch: Manifest) -> bytes:
        """The batch's bytes from the object store. Gone with its manifest: a process
        that held the cut lease before this one delivered and retired it after this one
        read the manifests (BatchGone; the state is read again). Gone alone: an error."""
        try:
            return await self._bytes(batch)
        except nats.js.errors.ObjectNotFoundError:
            try:
                await self._cluster.state.get(f"{self.name}.m.{batch.no}")
            except KeyNotFoundError:
                log.warning("jetstream.batch_retired_elsewhere", firehose=self.name, batch=batch.no)
                self._unload()
                raise BatchGone(f"batch {batch.name} was delivered by another process") from None
            raise

    async def done(self, batch: Manifest) -> None:
        """Purge the batch's records, move the cursor, forget the batch."""
        await self._retire(batch)
        if batch.data is None:
            await self._drop_bytes(batch)

    async def _retire(self, batch: Manifest) -> None:
        state = self._cluster.state
        await self._purge_until(batch.end[0])
        cursor = msgspec.structs.replace(batch, data=None, keys=[])
        try:
            if self._cursor_revision:
                self._cursor_revision = await state.update(
                    f"{self.name}.cursor", msgspec.json.encode(cursor), last=self._cursor_revision
                )
            else:
                self._cursor_revision = await state.create(
                    f"{self.name}.cursor", msgspec.json.encode(cursor)
                )
        except KeyWrongLastSequenceError:  # another cutter moved it: ours is stale
            log.warning("jetstream.cursor_lost", firehose=self.name, batch=batch.no)
        with contextlib.suppress(KeyNotFoundError):
            await state.delete(f"{self.name}.m.{batch.no}")
        if self._batches and self._batches[0].no == batch.no:
            self._batches.pop(0)
        (self._spool / f"{batch.no}-{batch.id}.data").unlink(missing_ok=True)

    async def _purge_until(self, seq: int) -> None:
        """Remove the subject's messages before `seq` (delivered)."""
        await self._cluster.js.purge_stream(
            self._cluster.names.queues, subject=self._subject, seq=seq
        )

    async def dead_letter(self, batch: Manifest) -> Path:
        """Keep the batch in the dead-letter keys (its bytes stay where they are); a
        copy of its bytes in `storage.dir/dead/<firehose>/` for the operator."""
        spooled = await self.local_file(batch, write=True)
        path = self._backend.dead / self.name / f"{batch.no}.data"
        await asyncio.to_thread(_move, spooled, path)
        await self._cluster.state.put(f"{self.name}.d.{batch.no}", msgspec.json.encode(batch))
        await self._retire(batch)
        self._dead_bytes += batch.size
        metrics.batches_dead_lettered.labels(self.name).inc()
        return path

    async def replay(self) -> AsyncIterator[Manifest]:
        await self._own_for("replay")
        try:
            dead = await self._manifests("d")
        except (nats.errors.Error, TimeoutError) as exc:
            raise StorageError(f"the cluster did not list the dead letters: {_said(exc)}") from exc
        for old in dead:
            try:
                new = await self._bring_back(old)
            except (nats.errors.Error, TimeoutError) as exc:
                raise StorageError(
                    f"batch {old.name} was not brought back, the cluster did not answer:"
                    f" {_said(exc)}; ask again"
                ) from exc
            yield new

    async def _bring_back(self, old: Manifest) -> Manifest:
        """A dead-lettered batch as the newest cut: the same name and bytes, numbered
        after the last batch, ending where it ends."""
        state, objects = self._cluster.state, self._cluster.objects
        last = self._last
        new = msgspec.structs.replace(
            old,
            no=last.no + 1 if last is not None else 1,
            cut=time.time(),
            base=last.base if last is not None else "",
            suffix=last.suffix if last is not None else 0,
            named=last.named if last is not None else 0.0,
            end=last.end if last is not None else self._next_position(),
            start=None,
        )
        if new.data is None:
            await objects.put(self._object(new), await self._bytes(old))
        await state.create(f"{self.name}.m.{new.no}", msgspec.json.encode(new))
        await state.delete(f"{self.name}.d.{old.no}")
        if old.data is None:
            await self._drop_bytes(old)
        self._batches.append(new)
        self._last = new
        self._dead_bytes = max(0, self._dead_bytes - new.size)
        self._news.set()
        return new

    def _next_position(self) -> tuple[int, int, int]:
        return (self._next[0], 0, self._next[1])

    # -- figures and end ---------------------------------------------------------------

    def figures(self, now: float) -> QueueFigures:
        batches = self._batches
        oldest = [m.time for m in list(self._pending)[:1]] + [b.opened for b in batches[:1]]
        return QueueFigures(
            records=self._pending_records + sum(b.records for b in batches),
            bytes=self._pending_bytes + sum(b.size for b in batches),
            oldest_age=max(0.0, now - min(oldest)) if oldest else 0.0,
            batches=len(batches),
            disk_bytes=0,
            dead_bytes=self._dead_bytes,
        )

    def recovered_ids(self) -> list[tuple[str, float]]:
        return []  # JetStream's duplicate window and the partitions' dedupe do this

    async def recount(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def close(self) -> None:
        """Stop cutting (the firehose left the config, or the process stops)."""
        self._unload()
        self._backend.leases.drop("cut", self._lease.key)


def _said(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _spool(path: Path, data: bytes) -> None:
    """A batch's bytes in a local file for a channel that reads files (a copy: what
    counts is in the cluster)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(path, data, sync=False)


def _move(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    source.replace(target)


async def _unsubscribe(subscription: Any) -> None:
    with contextlib.suppress(Exception):
        await subscription.unsubscribe()


class JetStreamBackend:
    """Queues in the cluster's QUEUES stream; the process's leases are renewed in `run`."""

    def __init__(self, cluster: Cluster, storage: Path) -> None:
        self.cluster = cluster
        self.leases = Leases(cluster)
        self.spool = storage / "spool"
        self.dead = storage / "dead"
        self._connecting = asyncio.Lock()

    async def connect(self) -> None:
        async with self._connecting:
            if self.cluster.nc is None:
                await self.cluster.connect()

    async def open_queue(self, name: str) -> JetStreamQueue:
        await self.connect()
        return JetStreamQueue(self, name)

    async def run(self) -> None:
        """Keep this process's leases, until cancelled."""
        await self.connect()
        await self.leases.run()

    async def flush(self) -> None:
        """Publishes are waited for by the requests that made them: nothing is pending."""

    async def close(self) -> None:
        """A clean stop: give the leases up (others take over at once; those not given
        up within CLOSE_GRACE age out), disconnect."""
        if self.cluster.nc is not None and self.cluster.connected.is_set():
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await asyncio.wait_for(self.leases.release_all(), CLOSE_GRACE)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.cluster.close(), CLOSE_GRACE)
