"""The queue contract (firehosed/queue/base.py): what every backend must do.

Parametrised over the backends; a new one (NATS JetStream) joins `BACKENDS` with a
fixture that starts its real servers, and must pass every test here unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import msgspec
import pytest

from firehosed import faults
from firehosed.config import JetStreamConfig
from firehosed.errors import StorageError
from firehosed.jetstream.cluster import Cluster, process_id
from firehosed.jetstream.queue import JetStreamBackend
from firehosed.queue.base import Backend, CutRules, Encoded, Queue, Ticket
from firehosed.queue.frames import frame
from firehosed.queue.local import LocalBackend
from firehosed.record import Record, encode
from firehosed.units import Duration
from tests.servers.nats import NatsCluster

FILES = CutRules(stream=False, max_records=1 << 62, max_bytes=1 << 30, interval=3600.0)
STREAM = CutRules(stream=True, max_records=50, max_bytes=1 << 20, interval=0.0)


def encoder(records: Sequence[Record]) -> Encoded:
    """NDJSON of the raw records, named after the first record's id (deterministic)."""
    data = b"".join(r.raw + b"\n" for r in records)
    return Encoded(data, f"b-{records[0].id}", "p/", ".ndjson", "application/x-ndjson", None)


def framed(numbers: range) -> bytes:
    return b"".join(
        frame(encode(Record("pd", f"id{n}", "s", None, 0.0, 1000.0 + n, b'{"n":%d}' % n)))
        for n in numbers
    )


def numbers(data: bytes) -> list[int]:
    return [msgspec.json.decode(line)["n"] for line in data.splitlines()]


class Harness:
    """One backend on `root`: open it, crash it (drop everything in memory), open again."""

    def __init__(self, make: Callable[[], Backend]) -> None:
        self.make = make
        self.backend: Backend | None = None
        self.task: asyncio.Task[None] | None = None
        self.queues: list[Queue] = []

    async def open(self, name: str = "fh", rules: CutRules = FILES) -> Queue:
        if self.backend is None:
            self.backend = self.make()
            self.task = asyncio.create_task(self.backend.run())
        queue = await self.backend.open_queue(name)
        queue.configure(rules, encoder)
        self.queues.append(queue)
        return queue

    async def crash(self) -> None:
        """Like kill -9 after every commit returned: nothing more is written or synced."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        for queue in self.queues:
            queue.close()
        self.backend, self.task, self.queues = None, None, []

    def fail_next_commit(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Make the next commit's durable write fail (the group commit's sync: one)."""
        monkeypatch.setattr(faults, "_FAILS", faults._parse("queue.fsync:1:1"))
        monkeypatch.setattr(faults, "_calls", {"queue.fsync": itertools.count(1)})


class JetStreamHarness(Harness):
    """A crash drops the process's connection too (what it had not published is gone)."""

    async def crash(self) -> None:
        backend = self.backend
        await super().crash()
        if isinstance(backend, JetStreamBackend):
            await backend.cluster.close()

    def fail_next_commit(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Each append is a publish of its own: the two of the next commit fail."""
        monkeypatch.setattr(faults, "_FAILS", faults._parse("queue.fsync:1:2"))
        monkeypatch.setattr(faults, "_calls", {"queue.fsync": itertools.count(1)})


async def local(request: pytest.FixtureRequest, root: Path) -> AsyncIterator[Harness]:
    yield Harness(lambda: LocalBackend(root, 1 << 16, "fsync"))


_prefixes = itertools.count()


async def jetstream(request: pytest.FixtureRequest, root: Path) -> AsyncIterator[Harness]:
    """A deployment of its own (a fresh prefix) on the session's three-server cluster,
    three replicas per stream as in production."""
    cluster: NatsCluster = request.getfixturevalue("nats_cluster")
    config = JetStreamConfig(
        servers=cluster.urls, prefix=f"contract{next(_prefixes)}", lease_ttl=Duration(3.0)
    )
    yield JetStreamHarness(lambda: JetStreamBackend(Cluster(config, process_id(root)), root))


BACKENDS = {"local": local, "jetstream": jetstream}


@pytest.fixture(params=sorted(BACKENDS))
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    async for made in BACKENDS[request.param](request, tmp_path):
        yield made
        await made.crash()


async def commit(queue: Queue, numbers_: range) -> None:
    await queue.append(framed(numbers_), len(numbers_)).wait()


async def test_a_commit_that_returned_survives_a_crash(harness: Harness) -> None:
    queue = await harness.open()
    await commit(queue, range(10))
    await harness.crash()
    queue = await harness.open()
    batch = await queue.next_batch(flush=True)
    assert batch is not None and batch.records == 10
    assert numbers(await read(queue, batch)) == list(range(10))


async def read(queue: Queue, batch: object) -> bytes:
    path = await queue.local_file(batch, write=True)  # type: ignore[arg-type]
    return path.read_bytes()


async def test_a_cut_batch_comes_back_after_a_crash_with_its_name_and_bytes(
    harness: Harness,
) -> None:
    queue = await harness.open()
    await commit(queue, range(5))
    first = await queue.next_batch(flush=True)
    assert first is not None
    data = await read(queue, first)
    await harness.crash()  # cut, maybe put, never confirmed
    queue = await harness.open()
    again = await queue.next_batch(flush=True)
    assert again is not None
    assert (again.id, again.name, await read(queue, again)) == (first.id, first.name, data)
    assert first.name == "p/b-id0.ndjson"


async def test_records_keep_their_order_in_a_batch_across_commits(harness: Harness) -> None:
    queue = await harness.open()
    for start in range(0, 300, 30):
        await commit(queue, range(start, start + 30))
    batch = await queue.next_batch(flush=True)
    assert batch is not None
    assert numbers(await read(queue, batch)) == list(range(300))


async def test_a_done_batch_never_comes_back(harness: Harness) -> None:
    queue = await harness.open()
    await commit(queue, range(3))
    batch = await queue.next_batch(flush=True)
    assert batch is not None
    await queue.done(batch)
    await commit(queue, range(3, 5))
    await harness.crash()
    queue = await harness.open()
    batch = await queue.next_batch(flush=True)
    assert batch is not None and numbers(await read(queue, batch)) == [3, 4]
    await queue.done(batch)
    assert await queue.next_batch(flush=True) is None
    assert queue.figures(0.0).records == 0


async def test_a_stream_batch_is_cut_as_its_commit_returns(harness: Harness) -> None:
    queue = await harness.open(rules=STREAM)
    waiting = asyncio.create_task(queue.next_batch())
    await asyncio.sleep(0)  # the consumer waits before the records come
    await commit(queue, range(7))
    batch = await asyncio.wait_for(waiting, 5)
    assert batch is not None and batch.data is not None and numbers(batch.data) == list(range(7))
    await harness.crash()
    queue = await harness.open(rules=STREAM)
    again = await queue.next_batch(flush=True)
    assert again is not None and (again.id, again.data) == (batch.id, batch.data)


async def test_a_dead_letter_leaves_delivery_and_replay_brings_the_same_bytes(
    harness: Harness,
) -> None:
    queue = await harness.open()
    await commit(queue, range(4))
    batch = await queue.next_batch(flush=True)
    assert batch is not None
    data = await read(queue, batch)
    dead = await queue.dead_letter(batch)
    assert dead.read_bytes() == data
    assert await queue.next_batch(flush=True) is None
    await harness.crash()
    queue = await harness.open()
    assert await queue.next_batch(flush=True) is None  # still dead after a restart
    assert queue.figures(time.time()).dead_bytes >= len(data)  # and counted as such
    replayed = [b async for b in queue.replay()]
    assert [b.name for b in replayed] == [batch.name]
    again = await queue.next_batch(flush=True)
    assert again is not None and await read(queue, again) == data


async def test_a_batch_whose_first_record_is_older_than_the_last_name_never_takes_an_earlier_name(
    harness: Harness,
) -> None:
    """A catch-up copy keeps the time its signal was received: a batch it opens would be
    named like the earlier batch that signal opened, and its upload would replace that
    batch's file (records lost). It takes the last batch's name and the next suffix,
    after a restart too."""
    queue = await harness.open()
    names = []
    for numbers_ in (range(2), range(5, 6), range(1)):  # (the last: id0 again, older)
        await commit(queue, numbers_)
        batch = await queue.next_batch(flush=True)
        assert batch is not None
        names.append(batch.name)
        await queue.done(batch)
    await queue.stop()  # (the last removal ends: a crash in it would race the reopening)
    await harness.crash()
    queue = await harness.open()
    await commit(queue, range(1, 2))  # (other bytes: JetStream would take the same for a retry)
    batch = await queue.next_batch(flush=True)
    while batch is not None and batch.name in names:  # (its removal was not durable yet)
        await queue.done(batch)
        batch = await queue.next_batch(flush=True)
    assert batch is not None
    names.append(batch.name)
    assert names == ["p/b-id0.ndjson", "p/b-id5.ndjson", "p/b-id5-1.ndjson", "p/b-id5-2.ndjson"]


async def test_two_queues_given_the_same_records_each_keep_them(harness: Harness) -> None:
    """Two firehoses of one account in one format are given the same bytes (JetStream's
    duplicate window, over the whole stream, had dropped the second firehose's)."""
    first, second = await harness.open("a"), await harness.open("b")
    await commit(first, range(3))
    await commit(second, range(3))
    for queue in (first, second):
        batch = await queue.next_batch(flush=True)
        assert batch is not None and numbers(await read(queue, batch)) == [0, 1, 2]


async def test_a_failed_commit_raises_for_every_request_in_it_and_keeps_nothing(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request whose records span two commits is kept only if both are."""
    queue = await harness.open()
    ticket = Ticket()
    ticket.add(queue.append(framed(range(3)), 3))
    await ticket.wait()  # the first part is durable
    harness.fail_next_commit(monkeypatch)
    ticket.add(queue.append(framed(range(3, 6)), 3))
    other = queue.append(framed(range(6, 8)), 2)  # another request in the same commit
    with pytest.raises(StorageError):
        await ticket.wait()
    with pytest.raises(StorageError):
        await other.wait()
    await commit(queue, range(8, 9))  # the disk is back
    batch = await queue.next_batch(flush=True)
    assert batch is not None and numbers(await read(queue, batch)) == [0, 1, 2, 8]
