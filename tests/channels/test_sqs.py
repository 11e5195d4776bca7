"""The `sqs` channel against a real moto server, over real aiobotocore HTTP traffic.

Partial failures (entries in SendMessageBatch's `Failed`) cannot be caused on cue in
moto, so those tests use a small fake SQS endpoint that fails chosen entries.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiobotocore.session import AioSession
from aiohttp import web

import firehosed.units
from firehosed.channels.base import Batch
from firehosed.channels.sqs import SqsChannel, SqsConfig
from firehosed.errors import DeliveryError
from tests.servers.moto import moto_server

__all__ = ["moto_server"]  # a fixture: imported so pytest finds it

KiB = 1 << 10
CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing"}
_queue_numbers = itertools.count()

Keys = tuple[tuple[str, str | None], ...]


@pytest.fixture
async def sqs(moto_server: str) -> AsyncIterator[Any]:
    """A plain aiobotocore client on the moto server, to set up and read queues."""
    async with AioSession().create_client(
        "sqs",
        region_name="us-east-1",
        endpoint_url=moto_server,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ) as client:
        yield client


async def create_queue(sqs: Any, *, fifo: bool = False) -> str:
    name = f"firehose-{os.getpid()}-{next(_queue_numbers)}" + (".fifo" if fifo else "")
    attributes = {"FifoQueue": "true"} if fifo else {}
    response = await sqs.create_queue(QueueName=name, Attributes=attributes)
    url: str = response["QueueUrl"]
    return url


@pytest.fixture
async def make_channel(moto_server: str) -> AsyncIterator[Callable[..., SqsChannel]]:
    """Build SQS channels from config keys (decoded as the config file would be); close
    every one at the end of the test."""
    channels: list[SqsChannel] = []

    def make(**keys: Any) -> SqsChannel:
        raw = {"type": "sqs", "endpoint_url": moto_server, **CREDENTIALS, **keys}
        config = msgspec.convert(raw, SqsConfig, dec_hook=firehosed.units.dec_hook)
        channel = SqsChannel("queue", config)
        channels.append(channel)
        return channel

    yield make
    for channel in channels:
        await channel.close()


def make_batch(tmp_path: Path, records: list[bytes], keys: Keys | None = None) -> Batch:
    data = b"".join(r + b"\n" for r in records)
    path = tmp_path / f"batch-{hashlib.sha256(data).hexdigest()[:12]}.ndjson"
    path.write_bytes(data)
    return Batch(
        id="b-1",
        firehose="acme_stream",
        account="acme",
        name=path.name,
        path=path,
        size=len(data),
        records=len(records),
        content_type="application/x-ndjson",
        content_encoding=None,
        keys=keys if keys is not None else tuple((f"r{i}", "s") for i in range(len(records))),
    )


def record(n: int, padding: int = 0) -> bytes:
    return json.dumps({"type": "pd", "n": n, "name": "café ✓", "pad": "x" * padding}).encode()


async def receive_all(sqs: Any, url: str, count: int) -> list[dict[str, Any]]:
    """Receive (and delete, which unblocks FIFO groups) until `count` messages arrived."""
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + 20
    while len(messages) < count and time.monotonic() < deadline:
        response = await sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=1,
            MessageSystemAttributeNames=["MessageGroupId", "MessageDeduplicationId"],
            MessageAttributeNames=["All"],
        )
        received = response.get("Messages", [])
        messages += received
        if received:
            entries = [
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(received)
            ]
            await sqs.delete_message_batch(QueueUrl=url, Entries=entries)
    return messages


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def queue_is_empty(sqs: Any, url: str) -> bool:
    response = await sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0)
    return not response.get("Messages")


async def count_requests(channel: SqsChannel) -> list[int]:
    """Record the body size of every SendMessageBatch request the channel sends."""
    sizes: list[int] = []

    def before_send(request: Any, **_: Any) -> None:
        entries = json.loads(request.body)["Entries"]
        sizes.append(sum(len(e["MessageBody"].encode()) for e in entries))

    client = await channel._client.get()
    client.meta.events.register("before-send.sqs.SendMessageBatch", before_send)
    return sizes


async def test_standard_queue_gets_one_message_per_record(
    tmp_path: Path, sqs: Any, make_channel: Callable[..., SqsChannel]
) -> None:
    url = await create_queue(sqs)
    channel = make_channel(queue_url=url, message_attributes={"source": "firehosed"})
    records = [record(n) for n in range(25)]
    requests = await count_requests(channel)

    await channel.put(make_batch(tmp_path, records))

    messages = await receive_all(sqs, url, 25)
    assert sorted(m["Body"].encode() for m in messages) == sorted(records)
    assert len(requests) == 3  # 10 + 10 + 5 entries
    attributes = messages[0]["MessageAttributes"]
    assert attributes == {"source": {"DataType": "String", "StringValue": "firehosed"}}
    assert await queue_is_empty(sqs, url)


async def test_requests_are_split_to_stay_under_256kib(
    tmp_path: Path, sqs: Any, make_channel: Callable[..., SqsChannel]
) -> None:
    url = await create_queue(sqs)
    channel = make_channel(queue_url=url)
    records = [record(n, padding=100 * KiB) for n in range(5)]
    requests = await count_requests(channel)

    await channel.put(make_batch(tmp_path, records))

    messages = await receive_all(sqs, url, 5)
    assert sorted(m["Body"].encode() for m in messages) == sorted(records)
    assert len(requests) == 3  # 2 + 2 + 1 records of ~100 KiB
    assert max(requests) <= 256 * KiB


async def test_fifo_queue_group_is_session_and_dedup_is_record_id(
    tmp_path: Path, sqs: Any, make_channel: Callable[..., SqsChannel]
) -> None:
    url = await create_queue(sqs, fifo=True)
    channel = make_channel(queue_url=url)
    long_id = "x" * 200
    keys: Keys = (
        ("r1", "s1"),
        ("r2", "s2"),
        ("r3", "s1"),
        ("id with space", None),
        (long_id, "s2"),
    )
    records = [record(n) for n in range(len(keys))]
    batch = make_batch(tmp_path, records, keys)

    await channel.put(batch)
    await channel.put(batch)  # a retry: deduplicated by SQS

    messages = await receive_all(sqs, url, len(records))
    seen = {
        m["Body"].encode(): (
            m["Attributes"]["MessageGroupId"],
            m["Attributes"]["MessageDeduplicationId"],
        )
        for m in messages
    }
    assert seen == {
        records[0]: ("s1", "r1"),
        records[1]: ("s2", "r2"),
        records[2]: ("s1", "r3"),
        records[3]: ("no-session", sha256_hex("id with space")),
        records[4]: ("s2", sha256_hex(long_id)),
    }
    s1_order = [m["Body"].encode() for m in messages if m["Attributes"]["MessageGroupId"] == "s1"]
    assert s1_order == [records[0], records[2]]
    assert len(messages) == len(records)
    assert await queue_is_empty(sqs, url)


async def test_oversize_record_is_not_retryable_and_nothing_is_sent(
    tmp_path: Path, sqs: Any, make_channel: Callable[..., SqsChannel]
) -> None:
    url = await create_queue(sqs)
    channel = make_channel(queue_url=url)
    records = [record(0), record(1, padding=300 * KiB), record(2)]

    with pytest.raises(DeliveryError, match=r"record r1 \(line 2 of batch b-1\)") as info:
        await channel.put(make_batch(tmp_path, records))

    assert info.value.retryable is False
    assert await queue_is_empty(sqs, url)


async def test_check_reports_the_queue(sqs: Any, make_channel: Callable[..., SqsChannel]) -> None:
    url = await create_queue(sqs)
    channel = make_channel(queue_url=url)

    summary = await channel.check()

    assert url in summary
    assert "0 messages" in summary


async def test_check_fails_on_missing_queue(
    moto_server: str, make_channel: Callable[..., SqsChannel]
) -> None:
    channel = make_channel(queue_url=f"{moto_server}/123456789012/no-such-queue")

    with pytest.raises(DeliveryError, match="queue does not exist") as info:
        await channel.check()

    assert info.value.retryable is True


async def test_put_to_missing_queue_is_retryable(
    tmp_path: Path, moto_server: str, make_channel: Callable[..., SqsChannel]
) -> None:
    channel = make_channel(queue_url=f"{moto_server}/123456789012/no-such-queue")

    with pytest.raises(DeliveryError, match="queue does not exist") as info:
        await channel.put(make_batch(tmp_path, [record(0)]))

    assert info.value.retryable is True


def test_stream_channel_attributes() -> None:
    config = msgspec.convert(
        {"type": "sqs", "queue_url": "https://sqs.eu-west-1.amazonaws.com/1/q", "max_records": 5},
        SqsConfig,
        dec_hook=firehosed.units.dec_hook,
    )
    channel = SqsChannel("queue", config)

    assert (channel.stream, channel.format) == (True, "ndjson")
    assert (channel.max_records, channel.max_wait) == (5, 0.0)
    assert config.resolved_region() == "eu-west-1"
    assert config.problems() == []


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ({"max_records": 11}, "max_records"),
        ({"queue_url": "sqs.example/q"}, "queue_url"),
        ({"message_attributes": {"AWS.trace": "x"}}, "message_attributes"),
        ({"secret_access_key": None}, "access_key_id"),
    ],
)
def test_config_problems(keys: dict[str, Any], problem: str) -> None:
    raw = {"type": "sqs", "queue_url": "https://sqs.us-east-1.amazonaws.com/1/q", **CREDENTIALS}
    config = msgspec.convert({**raw, **keys}, SqsConfig, dec_hook=firehosed.units.dec_hook)

    assert [key for key, _ in config.problems()] == [problem]


class FlakySqs:
    """A fake SQS endpoint (JSON protocol) whose SendMessageBatch fails chosen entries.

    `failures[n]` maps entry Id -> SenderFault for the n-th request; later requests
    succeed. `requests` records the entry Ids of each request.
    """

    def __init__(self, failures: list[dict[str, bool]]) -> None:
        self.failures = failures
        self.requests: list[list[str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        if request.headers.get("X-Amz-Target") != "AmazonSQS.SendMessageBatch":
            return web.json_response({"__type": "InvalidAction"}, status=400)
        entries = json.loads(await request.read())["Entries"]
        n = len(self.requests)
        self.requests.append([e["Id"] for e in entries])
        failing = self.failures[n] if n < len(self.failures) else {}
        body = {
            "Successful": [
                {"Id": e["Id"], "MessageId": f"m{n}-{e['Id']}", "MD5OfMessageBody": "0" * 32}
                for e in entries
                if e["Id"] not in failing
            ],
            "Failed": [
                {"Id": i, "SenderFault": fault, "Code": "InternalError", "Message": "on cue"}
                for i, fault in failing.items()
            ],
        }
        return web.json_response(body, content_type="application/x-amz-json-1.0")


@pytest.fixture
async def flaky_sqs() -> AsyncIterator[Callable[[list[dict[str, bool]]], Any]]:
    """Start a FlakySqs on a free port; yields a function (failures) -> (url, fake)."""
    runners: list[web.AppRunner] = []

    async def start(failures: list[dict[str, bool]]) -> tuple[str, FlakySqs]:
        fake = FlakySqs(failures)
        app = web.Application()
        app.router.add_post("/", fake.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}", fake

    yield start
    for runner in runners:
        await runner.cleanup()


async def flaky_channel(
    flaky_sqs: Callable[[list[dict[str, bool]]], Any],
    make_channel: Callable[..., SqsChannel],
    failures: list[dict[str, bool]],
) -> tuple[SqsChannel, FlakySqs]:
    url, fake = await flaky_sqs(failures)
    return make_channel(endpoint_url=url, queue_url=f"{url}/123456789012/q"), fake


async def test_failed_entries_are_resent_alone(
    tmp_path: Path, flaky_sqs: Any, make_channel: Callable[..., SqsChannel]
) -> None:
    channel, fake = await flaky_channel(flaky_sqs, make_channel, [{"1": False}, {"1": False}])

    await channel.put(make_batch(tmp_path, [record(n) for n in range(3)]))

    assert fake.requests == [["0", "1", "2"], ["1"], ["1"]]


async def test_entries_still_failing_are_a_retryable_error(
    tmp_path: Path, flaky_sqs: Any, make_channel: Callable[..., SqsChannel]
) -> None:
    channel, fake = await flaky_channel(flaky_sqs, make_channel, [{"0": False, "2": False}] * 3)

    with pytest.raises(DeliveryError, match=r"2 message\(s\) of batch b-1 failed") as info:
        await channel.put(make_batch(tmp_path, [record(n) for n in range(3)]))

    assert info.value.retryable is True
    assert fake.requests == [["0", "1", "2"], ["0", "2"], ["0", "2"]]


async def test_sender_fault_is_not_retryable(
    tmp_path: Path, flaky_sqs: Any, make_channel: Callable[..., SqsChannel]
) -> None:
    channel, fake = await flaky_channel(flaky_sqs, make_channel, [{"2": True}])

    with pytest.raises(DeliveryError, match="first record r2: InternalError") as info:
        await channel.put(make_batch(tmp_path, [record(n) for n in range(3)]))

    assert info.value.retryable is False
    assert fake.requests == [["0", "1", "2"]]
