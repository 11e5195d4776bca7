"""The webhook channel against a real aiohttp receiver that verifies signatures."""

from __future__ import annotations

import email.utils
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trustme

from firehosed.channels.base import Batch
from firehosed.channels.http import parse_retry_after
from firehosed.channels.webhook import WebhookChannel, WebhookConfig, decode_secret, sign
from firehosed.errors import DeliveryError, DestinationGone
from firehosed.units import dec_hook
from tests.servers.webhook import (
    Reply,
    WebhookReceiver,
    tls_ca,
    verify,
    webhook_receiver,
    webhook_tls_receiver,
)

__all__ = ["tls_ca", "webhook_receiver", "webhook_tls_receiver"]

BODY = b'[{"type":"pd","did":"s1","signal_id":{"$oid":"a1"}},{"type":"c","did":"s2"}]'


def config(**values: Any) -> WebhookConfig:
    return msgspec.convert({"type": "webhook", **values}, WebhookConfig, dec_hook=dec_hook)


@pytest.fixture
async def make_channel() -> AsyncIterator[Any]:
    """Builds channels and closes every one of them at teardown."""
    channels: list[WebhookChannel] = []

    def make(**values: Any) -> WebhookChannel:
        channel = WebhookChannel("hook", config(**values))
        channels.append(channel)
        return channel

    yield make
    for channel in channels:
        await channel.close()


def batch(tmp_path: Path, body: bytes = BODY, batch_id: str = "b-0001") -> Batch:
    path = tmp_path / f"{batch_id}.json"
    path.write_bytes(body)
    return Batch(
        id=batch_id,
        firehose="acme_hook",
        account="acme",
        name=path.name,
        path=path,
        size=len(body),
        records=2,
        content_type="application/json",
        content_encoding=None,
    )


def test_signature_matches_the_spec_test_vector() -> None:
    # The vector published with the Standard Webhooks reference libraries.
    key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    body = b'{"test": 2432232314}'
    signature = sign([key], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    headers = {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": signature,
    }
    # The test receiver's verifier agrees with the spec, and rejects a changed body.
    assert verify("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", headers, body, now=1614265330)
    assert not verify("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", headers, b"{}", now=1614265330)


async def test_delivery_is_signed_with_every_secret_during_rotation(
    webhook_receiver: WebhookReceiver, make_channel: Any, tmp_path: Path
) -> None:
    channel = make_channel(
        url=webhook_receiver.url + "/hooks/firehose",
        secret=" ".join(webhook_receiver.secrets),
        headers={"Authorization": "Bearer partner-token", "X-Tenant": "acme"},
    )
    await channel.put(batch(tmp_path))

    [delivery] = webhook_receiver.deliveries
    assert delivery.method == "POST"
    assert delivery.path == "/hooks/firehose"
    assert delivery.body == BODY
    assert delivery.headers["content-type"] == "application/json"
    assert delivery.headers["content-length"] == str(len(BODY))
    assert delivery.headers["webhook-id"] == "b-0001"
    assert abs(int(delivery.headers["webhook-timestamp"]) - time.time()) < 5
    assert len(delivery.headers["webhook-signature"].split(" ")) == 2
    assert delivery.verified == [True, True]
    assert delivery.headers["authorization"] == "Bearer partner-token"
    assert delivery.headers["x-tenant"] == "acme"
    assert not verify("whsec_" + "QUFB" * 8, delivery.headers, delivery.body)


async def test_one_session_is_reused(
    webhook_receiver: WebhookReceiver, make_channel: Any, tmp_path: Path
) -> None:
    channel = make_channel(url=webhook_receiver.url)
    await channel.put(batch(tmp_path, batch_id="b-1"))
    await channel.put(batch(tmp_path, batch_id="b-2"))
    first, second = webhook_receiver.deliveries
    assert "webhook-signature" not in first.headers
    # Same client port: the second POST went over the kept-alive connection.
    assert first.client_port == second.client_port != 0


async def test_server_error_is_retryable_and_the_retry_keeps_the_id(
    webhook_receiver: WebhookReceiver, make_channel: Any, tmp_path: Path
) -> None:
    webhook_receiver.script(Reply(500), Reply(200))
    channel = make_channel(url=webhook_receiver.url, secret=webhook_receiver.secrets[0])
    the_batch = batch(tmp_path)

    with pytest.raises(DeliveryError) as failed:
        await channel.put(the_batch)
    assert failed.value.retryable
    assert failed.value.retry_after is None
    assert "HTTP 500" in str(failed.value)
    await channel.put(the_batch)

    first, second = webhook_receiver.deliveries
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == "b-0001"
    assert first.body == second.body == BODY
    assert first.verified[0] and second.verified[0]


async def test_429_carries_retry_after(
    webhook_receiver: WebhookReceiver, make_channel: Any, tmp_path: Path
) -> None:
    webhook_receiver.script(Reply(429, {"Retry-After": "7"}))
    channel = make_channel(url=webhook_receiver.url)
    with pytest.raises(DeliveryError) as failed:
        await channel.put(batch(tmp_path))
    assert failed.value.retryable
    assert failed.value.retry_after == 7


async def test_retry_after_as_http_date(
    webhook_receiver: WebhookReceiver, make_channel: Any, tmp_path: Path
) -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    webhook_receiver.script(Reply(503, {"Retry-After": when}))
    channel = make_channel(url=webhook_receiver.url)
    with pytest.raises(DeliveryError) as failed:
        await channel.put(batch(tmp_path))
    assert failed.value.retry_after is not None
    assert 110 <= failed.value.retry_after <= 121


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7", 7.0),
        (" 0 ", 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 60.0),
        ("Wed, 21 Oct 2015 07:26:00 GMT", 0.0),  # in the past: no wait
        ("-5", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    now = email.utils.parsedate_to_datetime("Wed, 21 Oct 2015 07:27:00 GMT").timestamp()
    assert parse_retry_after(value, now=now) == expected


async def test_410_means_destination_gone(
    webhook_receiver: WebhookReceiver, make_channel: Any, tmp_path: Path
) -> None:
    webhook_receiver.script(Reply(410))
    channel = make_channel(url=webhook_receiver.url)
    with pytest.raises(DestinationGone) as failed:
        await channel.put(batch(tmp_path))
    assert not failed.value.retryable


async def test_other_statuses_are_retryable(
    webhook_receiver: WebhookReceiver, make_channel: Any, tmp_path: Path
) -> None:
    webhook_receiver.script(Reply(400), Reply(404))
    channel = make_channel(url=webhook_receiver.url)
    for status in (400, 404):
        with pytest.raises(DeliveryError) as failed:
            await channel.put(batch(tmp_path))
        assert failed.value.retryable
        assert type(failed.value) is DeliveryError
        assert f"HTTP {status}" in str(failed.value)


async def test_redirect_is_not_followed(
    webhook_receiver: WebhookReceiver, make_channel: Any, tmp_path: Path
) -> None:
    # Following it would turn the POST into a GET of the new place and count as delivered.
    webhook_receiver.script(Reply(302, {"Location": "/moved?sig=abc"}))
    channel = make_channel(url=webhook_receiver.url + "/old")
    with pytest.raises(DeliveryError, match="redirects are not followed") as failed:
        await channel.put(batch(tmp_path))
    assert failed.value.retryable
    assert "sig=abc" not in str(failed.value)
    assert [d.path for d in webhook_receiver.deliveries] == ["/old"]


async def test_hanging_server_fails_after_timeout(
    webhook_receiver: WebhookReceiver, make_channel: Any, tmp_path: Path
) -> None:
    webhook_receiver.script(Reply(hang=True))
    channel = make_channel(url=webhook_receiver.url, timeout="300ms")
    started = time.monotonic()
    with pytest.raises(DeliveryError, match="no answer") as failed:
        await channel.put(batch(tmp_path))
    elapsed = time.monotonic() - started
    assert failed.value.retryable
    assert 0.25 <= elapsed < 3
    assert len(webhook_receiver.deliveries) == 1


async def test_connection_refused_is_retryable(make_channel: Any, tmp_path: Path) -> None:
    channel = make_channel(url="http://127.0.0.1:9/firehose")
    with pytest.raises(DeliveryError) as failed:
        await channel.put(batch(tmp_path))
    assert failed.value.retryable


async def test_secret_query_is_kept_out_of_errors(
    webhook_receiver: WebhookReceiver, make_channel: Any, tmp_path: Path
) -> None:
    webhook_receiver.script(Reply(503))
    channel = make_channel(url=webhook_receiver.url + "/in?token=hunter2")
    with pytest.raises(DeliveryError) as failed:
        await channel.put(batch(tmp_path))
    assert "hunter2" not in str(failed.value)
    assert webhook_receiver.deliveries[0].path == "/in?token=hunter2"


async def test_https_verified_with_the_configured_ca(
    webhook_tls_receiver: WebhookReceiver, tls_ca: trustme.CA, make_channel: Any, tmp_path: Path
) -> None:
    assert webhook_tls_receiver.url.startswith("https://")
    channel = make_channel(url=webhook_tls_receiver.url, ca=tls_ca.cert_pem.bytes().decode())
    await channel.put(batch(tmp_path))
    assert [d.body for d in webhook_tls_receiver.deliveries] == [BODY]


async def test_https_refused_without_the_ca(
    webhook_tls_receiver: WebhookReceiver, make_channel: Any, tmp_path: Path
) -> None:
    channel = make_channel(url=webhook_tls_receiver.url)
    with pytest.raises(DeliveryError, match=r"certificate .* is not trusted") as failed:
        await channel.put(batch(tmp_path))
    assert "set ca or ca_file" in str(failed.value)
    assert webhook_tls_receiver.deliveries == []


async def test_check_posts_a_signed_empty_batch(
    webhook_receiver: WebhookReceiver, make_channel: Any
) -> None:
    channel = make_channel(url=webhook_receiver.url, secret=webhook_receiver.secrets[1])
    summary = await channel.check()
    assert "accepted a signed empty batch (HTTP 200)" in summary
    [delivery] = webhook_receiver.deliveries
    assert delivery.body == b"[]"
    assert delivery.headers["webhook-id"].startswith("check-")
    assert delivery.verified == [False, True]


async def test_check_fails_on_refusal(webhook_receiver: WebhookReceiver, make_channel: Any) -> None:
    webhook_receiver.script(Reply(401))
    channel = make_channel(url=webhook_receiver.url)
    with pytest.raises(DeliveryError, match="HTTP 401"):
        await channel.check()
    unreachable = make_channel(url="http://127.0.0.1:9/")
    with pytest.raises(DeliveryError):
        await unreachable.check()


async def test_close_is_idempotent_and_put_reopens(
    webhook_receiver: WebhookReceiver, tmp_path: Path
) -> None:
    channel = WebhookChannel("hook", config(url=webhook_receiver.url))
    await channel.close()
    await channel.put(batch(tmp_path))
    await channel.close()
    await channel.close()
    assert len(webhook_receiver.deliveries) == 1


def test_config_defaults_and_channel_shape() -> None:
    cfg = config(url="https://hooks.example.com/firehose")
    assert (cfg.max_records, cfg.max_wait, cfg.timeout) == (500, 0.0, 10.0)
    assert cfg.problems() == []
    channel = WebhookChannel("hook", cfg)
    assert channel.stream and channel.format == "json"
    assert (channel.max_records, channel.max_wait) == (500, 0.0)


def test_config_problems_name_the_key_and_never_the_secret() -> None:
    cfg = config(
        url="ftp://hooks.example.com/",
        secret="whsec_not*base64 ok-raw-secret",
        headers={"webhook-id": "x", "X-Bad": "a\r\nb", "bad name": "v"},
        max_records=0,
        timeout=0,
        ca="not a certificate",
    )
    problems = cfg.problems()
    keys = [key for key, _ in problems]
    assert keys == [
        "url",
        "secret",
        "headers",
        "headers",
        "headers",
        "max_records",
        "timeout",
        "ca",
    ]
    assert "secret 1 of 2" in problems[1][1]
    assert not any("not*base64" in message for _, message in problems)


def test_decode_secret() -> None:
    assert decode_secret("whsec_a2V5") == b"key"
    assert decode_secret("whsec_a2V5MQ") == b"key1"  # unpadded base64 is accepted
    assert decode_secret("plain") == b"plain"
    with pytest.raises(ValueError, match="empty"):
        decode_secret("whsec_")
