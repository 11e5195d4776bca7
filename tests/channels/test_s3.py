"""The `s3` channel against a real moto server, over real aiobotocore HTTP traffic."""

from __future__ import annotations

import base64
import gzip
import hashlib
import itertools
import os
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiobotocore.session import AioSession

import firehosed.units
from firehosed.channels.base import Batch
from firehosed.channels.s3 import S3Channel, S3Config
from firehosed.errors import DeliveryError
from tests.servers.moto import free_port, moto_server

__all__ = ["moto_server"]  # a fixture: imported so pytest finds it

MiB = 1 << 20
CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing"}
_bucket_numbers = itertools.count()


@pytest.fixture
async def s3(moto_server: str) -> AsyncIterator[Any]:
    """A plain aiobotocore client on the moto server, to set up and inspect buckets."""
    async with AioSession().create_client(
        "s3",
        region_name="us-east-1",
        endpoint_url=moto_server,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ) as client:
        yield client


@pytest.fixture
async def bucket(s3: Any) -> str:
    """A fresh, empty bucket for one test."""
    name = f"firehose-{os.getpid()}-{next(_bucket_numbers)}"
    await s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
async def make_channel(moto_server: str) -> AsyncIterator[Callable[..., S3Channel]]:
    """Build S3 channels from config keys (decoded as the config file would be); close
    every one at the end of the test."""
    channels: list[S3Channel] = []

    def make(**keys: Any) -> S3Channel:
        raw = {"type": "s3", "endpoint_url": moto_server, **CREDENTIALS, **keys}
        config = msgspec.convert(raw, S3Config, dec_hook=firehosed.units.dec_hook)
        channel = S3Channel("archive", config)
        channels.append(channel)
        return channel

    yield make
    for channel in channels:
        await channel.close()


def make_batch(
    tmp_path: Path,
    data: bytes,
    *,
    name: str = "firehose-2024-05-01-12-00-00-000000.ndjson",
    size: int | None = None,
    content_type: str = "application/x-ndjson",
    content_encoding: str | None = None,
) -> Batch:
    path = tmp_path / "batch.bin"
    path.write_bytes(data)
    return Batch(
        id="b-1",
        firehose="acme_files",
        account="acme",
        name=name,
        path=path,
        size=len(data) if size is None else size,
        records=data.count(b"\n"),
        content_type=content_type,
        content_encoding=content_encoding,
    )


async def object_bytes(s3: Any, bucket: str, key: str) -> bytes:
    response = await s3.get_object(Bucket=bucket, Key=key)
    async with response["Body"] as body:
        data: bytes = await body.read()
    return data


async def capture_requests(channel: S3Channel, operation: str) -> list[dict[str, str]]:
    """Record the headers of every `operation` request the channel's client sends."""
    sent: list[dict[str, str]] = []

    def before_send(request: Any, **_: Any) -> None:
        headers = request.headers.items()
        sent.append({k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in headers})

    client = await channel._client.get()
    client.meta.events.register(f"before-send.s3.{operation}", before_send)
    return sent


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def crc32_b64(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


# checksum setting -> (request header, expected value for the body)
CHECKSUMS = {"crc32": ("x-amz-checksum-crc32", crc32_b64), "md5": ("content-md5", md5_b64)}


@pytest.mark.parametrize("checksum", ["crc32", "md5"])
async def test_small_put_is_one_object_with_checksum_type_and_encoding(
    tmp_path: Path, s3: Any, bucket: str, make_channel: Callable[..., S3Channel], checksum: str
) -> None:
    data = gzip.compress(b'{"type":"pd","n":1}\n{"type":"c","n":2}\n')
    channel = make_channel(bucket=bucket, checksum=checksum)
    puts = await capture_requests(channel, "PutObject")

    await channel.put(make_batch(tmp_path, data, name="f.ndjson.gz", content_encoding="gzip"))

    assert await object_bytes(s3, bucket, "f.ndjson.gz") == data
    head = await s3.head_object(Bucket=bucket, Key="f.ndjson.gz")
    assert head["ContentType"] == "application/x-ndjson"
    assert head["ContentEncoding"] == "gzip"
    assert head["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'  # a single PUT, not multipart
    header, expected = CHECKSUMS[checksum]
    assert len(puts) == 1
    assert puts[0][header] == expected(data)
    # Exactly one checksum: botocore adds no second (CRC32) one of its own.
    sent = {h for h in puts[0] if h.startswith("x-amz-checksum-") or h == "content-md5"}
    assert sent == {header}


async def test_prefix_account_placeholder(
    tmp_path: Path, s3: Any, bucket: str, make_channel: Callable[..., S3Channel]
) -> None:
    channel = make_channel(bucket=bucket, prefix="exports/{account}/")
    batch = make_batch(tmp_path, b"{}\n", name="Firehose/f.ndjson")

    await channel.put(batch)

    listing = await s3.list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in listing["Contents"]] == ["exports/acme/Firehose/f.ndjson"]
    assert channel.key(batch) == "exports/acme/Firehose/f.ndjson"


async def test_path_addressing_puts_the_bucket_in_the_url(
    tmp_path: Path, s3: Any, bucket: str, make_channel: Callable[..., S3Channel]
) -> None:
    channel = make_channel(bucket=bucket, addressing_style="path")
    urls: list[str] = []
    client = await channel._client.get()
    client.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: urls.append(request.url)
    )

    await channel.put(make_batch(tmp_path, b"{}\n", name="p.ndjson"))

    assert urls == [f"{channel.config.endpoint_url}/{bucket}/p.ndjson"]
    assert await object_bytes(s3, bucket, "p.ndjson") == b"{}\n"


@pytest.mark.parametrize("checksum", ["crc32", "md5"])
async def test_multipart_upload_sends_parts_concurrently_with_checksums(
    tmp_path: Path, s3: Any, bucket: str, make_channel: Callable[..., S3Channel], checksum: str
) -> None:
    data = os.urandom(12 * MiB)
    channel = make_channel(
        bucket=bucket, multipart_threshold="5MiB", part_size="5MiB", checksum=checksum
    )
    parts = await capture_requests(channel, "UploadPart")
    in_flight = {"now": 0, "max": 0}

    def started(**_: Any) -> None:
        in_flight["now"] += 1
        in_flight["max"] = max(in_flight["max"], in_flight["now"])

    def finished(**_: Any) -> None:
        in_flight["now"] -= 1

    client = await channel._client.get()
    client.meta.events.register("before-send.s3.UploadPart", started)
    client.meta.events.register("after-call.s3.UploadPart", finished)

    await channel.put(make_batch(tmp_path, data, name="big.ndjson"))

    assert await object_bytes(s3, bucket, "big.ndjson") == data
    head = await s3.head_object(Bucket=bucket, Key="big.ndjson")
    assert head["ETag"].endswith('-3"')  # 5 + 5 + 2 MiB
    header, checksum_of = CHECKSUMS[checksum]
    expected = [checksum_of(data[i : i + 5 * MiB]) for i in range(0, len(data), 5 * MiB)]
    assert sorted(p[header] for p in parts) == sorted(expected)
    assert in_flight["max"] >= 2
    assert (await s3.list_multipart_uploads(Bucket=bucket)).get("Uploads", []) == []


async def test_failed_multipart_upload_is_aborted(
    tmp_path: Path, s3: Any, bucket: str, make_channel: Callable[..., S3Channel]
) -> None:
    channel = make_channel(
        bucket=bucket, multipart_threshold="5MiB", part_size="5MiB", max_concurrency=1
    )
    # The file is 1 MiB shorter than the batch says: the third part cannot be read.
    batch = make_batch(tmp_path, os.urandom(11 * MiB), size=12 * MiB, name="cut.ndjson")

    with pytest.raises(DeliveryError, match="expected 2097152 bytes") as info:
        await channel.put(batch)

    assert info.value.retryable is False
    assert (await s3.list_multipart_uploads(Bucket=bucket)).get("Uploads", []) == []
    assert "Contents" not in await s3.list_objects_v2(Bucket=bucket)


async def test_sse_and_storage_class_are_set_on_the_object(
    tmp_path: Path, s3: Any, bucket: str, make_channel: Callable[..., S3Channel]
) -> None:
    channel = make_channel(bucket=bucket, sse="AES256", storage_class="STANDARD_IA")

    await channel.put(make_batch(tmp_path, b'{"a":1}\n'))

    head = await s3.head_object(Bucket=bucket, Key="firehose-2024-05-01-12-00-00-000000.ndjson")
    assert head["ServerSideEncryption"] == "AES256"
    assert head["StorageClass"] == "STANDARD_IA"


async def test_same_batch_twice_leaves_one_object(
    tmp_path: Path, s3: Any, bucket: str, make_channel: Callable[..., S3Channel]
) -> None:
    data = b'{"type":"t","n":1}\n' * 1000
    channel = make_channel(bucket=bucket)
    batch = make_batch(tmp_path, data)

    await channel.put(batch)
    await channel.put(batch)

    listing = await s3.list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in listing["Contents"]] == [batch.name]
    assert await object_bytes(s3, bucket, batch.name) == data


async def test_missing_bucket_is_a_clear_retryable_error(
    tmp_path: Path, make_channel: Callable[..., S3Channel]
) -> None:
    channel = make_channel(bucket="no-such-bucket-here")

    with pytest.raises(DeliveryError, match=r"NoSuchBucket.*does not exist") as info:
        await channel.put(make_batch(tmp_path, b"{}\n"))

    assert "s3://no-such-bucket-here/" in str(info.value)
    assert info.value.retryable is True


async def test_unreachable_endpoint_is_retryable(tmp_path: Path) -> None:
    raw = {"type": "s3", "bucket": "b-x", "endpoint_url": f"http://127.0.0.1:{free_port()}"}
    config = msgspec.convert({**raw, **CREDENTIALS}, S3Config, dec_hook=firehosed.units.dec_hook)
    channel = S3Channel("archive", config)
    try:
        with pytest.raises(DeliveryError, match="EndpointConnectionError") as info:
            await channel.put(make_batch(tmp_path, b"{}\n"))
    finally:
        await channel.close()
    assert info.value.retryable is True


async def test_check_puts_and_deletes_a_probe(
    s3: Any, bucket: str, make_channel: Callable[..., S3Channel]
) -> None:
    channel = make_channel(bucket=bucket, prefix="in/{account}/", sse="AES256")

    summary = await channel.check()

    assert bucket in summary
    assert "\n" not in summary
    assert "Contents" not in await s3.list_objects_v2(Bucket=bucket)


async def test_check_fails_on_missing_bucket(make_channel: Callable[..., S3Channel]) -> None:
    channel = make_channel(bucket="no-such-bucket-for-check")

    with pytest.raises(DeliveryError, match="NoSuchBucket"):
        await channel.check()


async def test_close_then_put_reopens_the_client(
    tmp_path: Path, s3: Any, bucket: str, make_channel: Callable[..., S3Channel]
) -> None:
    channel = make_channel(bucket=bucket)
    await channel.put(make_batch(tmp_path, b"1\n", name="one"))
    await channel.close()
    await channel.put(make_batch(tmp_path, b"2\n", name="two"))

    assert await object_bytes(s3, bucket, "two") == b"2\n"


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ({"kms_key_id": "k"}, "kms_key_id"),
        ({"part_size": "1MiB"}, "part_size"),
        ({"multipart_threshold": "1KiB"}, "multipart_threshold"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"prefix": "{firehose}/"}, "prefix"),
        ({"access_key_id": "AKIA", "secret_access_key": None}, "access_key_id"),
        ({"session_token": "t", "access_key_id": None, "secret_access_key": None}, "session_token"),
    ],
)
def test_config_problems(keys: dict[str, Any], problem: str) -> None:
    raw = {"type": "s3", "bucket": "b", **CREDENTIALS, **keys}
    config = msgspec.convert(raw, S3Config, dec_hook=firehosed.units.dec_hook)

    assert [key for key, _ in config.problems()] == [problem]


def test_config_defaults_have_no_problems() -> None:
    config = msgspec.convert(
        {"type": "s3", "bucket": "b", "sse": "aws:kms", "kms_key_id": "k"}, S3Config
    )

    assert config.problems() == []
