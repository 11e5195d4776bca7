"""The pubsub channel against a Pub/Sub REST + OAuth2 token server checking Google's reference."""

from __future__ import annotations

import base64
import gzip
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from firehosed.channels.base import Batch
from firehosed.channels.pubsub import CONCURRENT_REQUESTS, PubSubChannel, PubSubConfig
from firehosed.errors import DeliveryError
from firehosed.units import dec_hook
from tests.servers.pubsub import TOPIC, PubSubServer, publish_problems, pubsub_server, rsa_key

__all__ = ["pubsub_server"]


def config(**values: Any) -> PubSubConfig:
    return msgspec.convert({"type": "pubsub", **values}, PubSubConfig, dec_hook=dec_hook)


@pytest.fixture
async def make_channel(pubsub_server: PubSubServer) -> AsyncIterator[Any]:
    """Builds channels aimed at the test server (with its credentials unless overridden)."""
    channels: list[PubSubChannel] = []

    def make(**values: Any) -> PubSubChannel:
        values = {
            "topic": TOPIC,
            "endpoint": pubsub_server.url,
            "credentials": pubsub_server.credentials(),
            **values,
        }
        channel = PubSubChannel(
            "events", config(**{k: v for k, v in values.items() if v is not None})
        )
        channels.append(channel)
        return channel

    yield make
    for channel in channels:
        await channel.close()


def record(n: int) -> bytes:
    return b'{"type":"pd","n":%d,"text":"caf\xc3\xa9 \\"q\\""}' % n


def make_batch(
    tmp_path: Path,
    records: list[bytes],
    sessions: list[str | None],
    batch_id: str = "b-1",
    compress: bool = False,
) -> Batch:
    body = b"".join(r + b"\n" for r in records)
    path = tmp_path / f"{batch_id}.ndjson"
    path.write_bytes(gzip.compress(body) if compress else body)
    return Batch(
        id=batch_id,
        firehose="acme_stream",
        account="acme",
        name=path.name,
        path=path,
        size=path.stat().st_size,
        records=len(records),
        content_type="application/x-ndjson",
        content_encoding="gzip" if compress else None,
        keys=tuple((f"id-{batch_id}-{i}", s) for i, s in enumerate(sessions)),
    )


def by_key(server: PubSubServer) -> dict[str | None, list[bytes]]:
    lanes: dict[str | None, list[bytes]] = defaultdict(list)
    for message in server.messages():
        lanes[message.ordering_key].append(message.data)
    return dict(lanes)


async def test_2500_records_go_in_three_valid_requests_keyed_by_session(
    pubsub_server: PubSubServer, make_channel: Any, tmp_path: Path
) -> None:
    records = [record(i) for i in range(2500)]
    sessions: list[str | None] = ["B" if i % 5 == 0 else "A" for i in range(2500)]
    batch = make_batch(tmp_path, records, sessions)
    await make_channel().put(batch)

    assert pubsub_server.violations == []
    calls = pubsub_server.calls
    assert sorted(len(c.messages) for c in calls) == [500, 1000, 1000]
    assert all(len({m.ordering_key for m in c.messages}) == 1 for c in calls)
    # Per session, the messages arrived in file order with exactly the records' bytes.
    assert by_key(pubsub_server) == {
        "A": [r for r, s in zip(records, sessions, strict=True) if s == "A"],
        "B": [r for r, s in zip(records, sessions, strict=True) if s == "B"],
    }
    ids = {m.attributes["id"]: m for m in pubsub_server.messages()}
    assert ids["id-b-1-7"].data == records[7]
    assert ids["id-b-1-7"].attributes == {
        "id": "id-b-1-7",
        "firehose": "acme_stream",
        "account": "acme",
    }
    assert len(ids) == 2500
    # One token, fetched once, on every request.
    assert pubsub_server.token_requests == 1
    assert len({c.authorization for c in calls}) == 1


async def test_without_ordering_messages_are_packed_with_no_key(
    pubsub_server: PubSubServer, make_channel: Any, tmp_path: Path
) -> None:
    records = [record(i) for i in range(2500)]
    sessions = [None if i % 7 == 0 else f"s{i % 9}" for i in range(2500)]
    await make_channel(ordering=False).put(make_batch(tmp_path, records, sessions))

    assert pubsub_server.violations == []
    assert [len(c.messages) for c in pubsub_server.calls] == [1000, 1000, 500]
    assert by_key(pubsub_server) == {None: records}


async def test_records_without_session_have_no_ordering_key(
    pubsub_server: PubSubServer, make_channel: Any, tmp_path: Path
) -> None:
    records = [record(i) for i in range(6)]
    sessions = ["s1", None, "s2", None, "s1", "s2"]
    await make_channel().put(make_batch(tmp_path, records, sessions))
    assert pubsub_server.violations == []
    assert by_key(pubsub_server) == {
        "s1": [records[0], records[4]],
        None: [records[1], records[3]],
        "s2": [records[2], records[5]],
    }


async def test_requests_are_split_at_10_mb(
    pubsub_server: PubSubServer, make_channel: Any, tmp_path: Path
) -> None:
    # Six 2 MB records: five would make a PublishRequest just over 10 MB.
    records = [b'"' + bytes([65 + i]) * 1_999_998 + b'"' for i in range(6)]
    await make_channel().put(make_batch(tmp_path, records, ["s"] * 6))
    assert pubsub_server.violations == []
    assert [len(c.messages) for c in pubsub_server.calls] == [4, 2]
    assert by_key(pubsub_server) == {"s": records}


async def test_oversize_message_fails_without_retry_and_publishes_nothing(
    pubsub_server: PubSubServer, make_channel: Any, tmp_path: Path
) -> None:
    records = [record(0), b'"' + b"x" * 10_000_000 + b'"']
    with pytest.raises(DeliveryError, match="10 MB") as failed:
        await make_channel().put(make_batch(tmp_path, records, ["s", "s"]))
    assert not failed.value.retryable
    assert "record 1" in str(failed.value)
    assert pubsub_server.calls == []


async def test_token_is_reused_across_batches(
    pubsub_server: PubSubServer, make_channel: Any, tmp_path: Path
) -> None:
    channel = make_channel()
    await channel.put(make_batch(tmp_path, [record(1)], ["s"], batch_id="b-1"))
    await channel.put(make_batch(tmp_path, [record(2)], ["s"], batch_id="b-2"))
    assert pubsub_server.token_requests == 1
    first, second = pubsub_server.calls
    assert first.authorization == second.authorization
    assert first.authorization is not None and first.authorization.startswith("Bearer ya29.")


async def test_token_is_refreshed_a_minute_before_it_expires(
    pubsub_server: PubSubServer, make_channel: Any, tmp_path: Path
) -> None:
    channel = make_channel()
    assert channel.tokens is not None
    now = [1000.0]
    channel.tokens.clock = lambda: now[0]
    for number, age in enumerate([0, 3600 - 61, 3600 - 59]):
        now[0] = 1000.0 + age
        await channel.put(make_batch(tmp_path, [record(number)], ["s"], batch_id=f"b-{number}"))
    assert pubsub_server.token_requests == 2
    first, second, third = (call.authorization for call in pubsub_server.calls)
    assert first == second != third


async def test_refused_token_is_dropped_and_fetched_again(
    pubsub_server: PubSubServer, make_channel: Any, tmp_path: Path
) -> None:
    channel = make_channel()
    batch = make_batch(tmp_path, [record(1)], ["s"])
    await channel.check()
    pubsub_server.tokens.clear()  # revoked server-side
    with pytest.raises(DeliveryError, match=r"HTTP 401.*UNAUTHENTICATED") as failed:
        await channel.put(batch)
    assert failed.value.retryable
    await channel.put(batch)
    assert pubsub_server.token_requests == 2
    assert len(pubsub_server.messages()) == 1


async def test_a_key_google_does_not_know_is_a_delivery_error(
    pubsub_server: PubSubServer, make_channel: Any, tmp_path: Path
) -> None:
    channel = make_channel(credentials=pubsub_server.credentials(rsa_key("stranger")))
    with pytest.raises(DeliveryError, match="invalid_grant Invalid JWT Signature") as failed:
        await channel.put(make_batch(tmp_path, [record(1)], ["s"]))
    assert failed.value.retryable
    assert pubsub_server.email in str(failed.value)
    assert "PRIVATE KEY" not in str(failed.value)
    assert pubsub_server.calls == []
    with pytest.raises(DeliveryError, match="invalid_grant"):
        await channel.check()


async def test_retry_after_partial_failure_publishes_the_rest_once_in_order(
    pubsub_server: PubSubServer, make_channel: Any, tmp_path: Path
) -> None:
    records = [record(i) for i in range(2300)]
    sessions: list[str | None] = ["A" if i < 2100 else "B" for i in range(2300)]
    batch = make_batch(tmp_path, records, sessions)
    # A's second request fails once; A's third must then wait for it.
    pubsub_server.fail(503, headers={"Retry-After": "3"}, ordering_key="A", after=1)
    channel = make_channel()

    with pytest.raises(DeliveryError, match="HTTP 503") as failed:
        await channel.put(batch)
    assert failed.value.retryable
    assert failed.value.retry_after == 3
    assert sorted(len(c.messages) for c in pubsub_server.calls) == [200, 1000]
    await channel.put(batch)

    assert pubsub_server.violations == []
    assert by_key(pubsub_server) == {"A": records[:2100], "B": records[2100:]}


async def test_an_outage_costs_a_few_requests_not_one_per_session(
    pubsub_server: PubSubServer, make_channel: Any, tmp_path: Path
) -> None:
    records = [record(i) for i in range(400)]
    sessions: list[str | None] = [f"s{i}" for i in range(400)]
    pubsub_server.fail(503, times=1000)
    channel = make_channel()
    with pytest.raises(DeliveryError, match="400 publish requests not accepted"):
        await channel.put(make_batch(tmp_path, records, sessions))
    assert 1 <= pubsub_server.failed_requests <= CONCURRENT_REQUESTS
    pubsub_server.failures.clear()
    await channel.put(make_batch(tmp_path, records, sessions))
    assert pubsub_server.violations == []
    assert sorted(m.data for m in pubsub_server.messages()) == sorted(records)
    assert len(pubsub_server.calls) == 400


async def test_unknown_topic_is_retryable_not_found(
    pubsub_server: PubSubServer, make_channel: Any, tmp_path: Path
) -> None:
    channel = make_channel(topic="projects/test-project/topics/missing")
    with pytest.raises(DeliveryError, match=r"HTTP 404.*NOT_FOUND") as failed:
        await channel.put(make_batch(tmp_path, [record(1)], ["s"]))
    assert failed.value.retryable
    with pytest.raises(DeliveryError, match="NOT_FOUND"):
        await channel.check()


async def test_emulator_mode_sends_no_authorization(
    pubsub_server: PubSubServer, make_channel: Any, tmp_path: Path
) -> None:
    pubsub_server.require_auth = False
    channel = make_channel(credentials=None)
    await channel.put(make_batch(tmp_path, [record(1), record(2)], ["s", "s"]))
    summary = await channel.check()
    assert "exists" in summary
    assert [m.data for m in pubsub_server.messages()] == [record(1), record(2)]
    assert pubsub_server.requests_seen
    assert all(seen["authorization"] is None for seen in pubsub_server.requests_seen)
    assert pubsub_server.token_requests == 0


async def test_gzipped_batch_is_published_record_by_record(
    pubsub_server: PubSubServer, make_channel: Any, tmp_path: Path
) -> None:
    records = [record(i) for i in range(3)]
    await make_channel().put(make_batch(tmp_path, records, ["s"] * 3, compress=True))
    assert [m.data for m in pubsub_server.messages()] == records


async def test_keys_must_match_the_records(make_channel: Any, tmp_path: Path) -> None:
    batch = make_batch(tmp_path, [record(1), record(2)], ["s"])
    with pytest.raises(DeliveryError, match="2 records but 1 keys") as failed:
        await make_channel().put(batch)
    assert not failed.value.retryable


async def test_check_asks_for_the_publish_permission(
    pubsub_server: PubSubServer, make_channel: Any
) -> None:
    channel = make_channel()
    summary = await channel.check()
    assert f"{pubsub_server.email} may publish" in summary
    assert pubsub_server.calls == []
    pubsub_server.granted = set()
    with pytest.raises(DeliveryError, match=r"lacks pubsub\.topics\.publish"):
        await channel.check()


def test_config_defaults_and_channel_shape() -> None:
    cfg = config(topic=TOPIC, endpoint="http://127.0.0.1:8085")
    assert (cfg.max_records, cfg.max_wait, cfg.timeout, cfg.ordering) == (1000, 0.0, 10.0, True)
    assert cfg.problems() == []
    channel = PubSubChannel("events", cfg)
    assert channel.stream and channel.format == "ndjson"
    assert (channel.max_records, channel.max_wait) == (1000, 0.0)


def test_config_problems_never_show_the_key(pubsub_server: PubSubServer) -> None:
    assert config(topic="signals").problems()[0][0] == "topic"
    google = config(topic=TOPIC).problems()
    assert [key for key, _ in google] == ["credentials"]
    assert "service-account key" in google[0][1]

    info = json.loads(pubsub_server.credentials())
    for broken, expected in [
        ("{not json", "not a service-account key file"),
        (json.dumps({**info, "type": "authorized_user"}), '"service_account"'),
        (json.dumps({**info, "private_key": info["private_key"][:200]}), "not a PEM private key"),
        (json.dumps({k: v for k, v in info.items() if k != "client_email"}), "client_email"),
    ]:
        [(key, message)] = config(topic=TOPIC, credentials=broken).problems()
        assert key == "credentials"
        assert expected in message
        assert "MII" not in message


def test_the_test_server_rejects_what_the_reference_forbids() -> None:
    ok = {"data": base64.b64encode(b"x").decode(), "attributes": {"id": "1"}, "orderingKey": "k"}
    assert publish_problems(TOPIC, {"messages": [ok, ok]}) == []
    forbidden = [
        {"messages": []},
        {"messages": [ok] * 1001},
        {"messages": [ok, {**ok, "orderingKey": "other"}]},
        {"messages": [{**ok, "messageId": "1"}]},
        {"messages": [{**ok, "data": "not base64!"}]},
        {"messages": [{"attributes": {}}]},
        {"messages": [{**ok, "attributes": {"goog-x": "1"}}]},
        {"messages": [{**ok, "attributes": {"id": 1}}]},
        {"messages": [{**ok, "attributes": {"id": "x" * 1025}}]},
        {"messages": [{**ok, "orderingKey": "k" * 1025}]},
        {"messages": [{**ok, "data": base64.b64encode(b"x" * 10_000_000).decode()}]},
        {"messages": [ok], "topic": TOPIC},
    ]
    for body in forbidden:
        assert publish_problems(TOPIC, body), body
