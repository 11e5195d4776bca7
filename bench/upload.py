"""Upload ceilings, run as a process pinned to the server CPU (where the daemon runs).

    python -m bench.upload sftp-raw HOST PORT USER KEY_FILE KNOWN_HOSTS FILE REMOTE [CIPHER]
    python -m bench.upload s3-raw ENDPOINT BUCKET FILE KEY [SOURCE_KEY]
    python -m bench.upload s3-channel ENDPOINT BUCKET FILE KEY

Each connects and uploads FILE once untimed (the daemon's channel keeps its connection
between batches, and a fresh SSH channel is measurably slower on its first transfer),
then times one more upload of FILE and prints `{"seconds": …}`.

- `sftp-raw`: asyncssh with its defaults, `sftp.put(FILE, REMOTE)`; with CIPHER, that
  encryption algorithm only (the harness takes the faster of defaults and AES-GCM).
- `s3-raw`: aiobotocore with its defaults, read FILE + one `put_object`. With
  SOURCE_KEY, FILE is first filled from that object (not timed): the daemon's batch.
- `s3-channel`: firehosed's own `S3Channel.put` of FILE as a batch (used when the `s3`
  type is not in the channel registry yet, so the daemon cannot be configured with it).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path

import asyncssh
import msgspec
from aiobotocore.session import AioSession

from firehosed.channels.base import Batch
from firehosed.channels.s3 import S3Channel, S3Config
from firehosed.units import dec_hook

CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
REGION = "us-east-1"


async def sftp_raw(args: list[str]) -> float:
    """args: HOST PORT USER KEY_FILE KNOWN_HOSTS FILE REMOTE [CIPHER]."""
    host, port, user, key, known, file, remote, *cipher = args
    options = {"encryption_algs": cipher} if cipher and cipher[0] else {}
    async with (
        asyncssh.connect(
            host, int(port), username=user, client_keys=[key], known_hosts=known, **options
        ) as conn,
        conn.start_sftp_client() as sftp,
    ):
        await sftp.put(file, remote + ".warmup")
        started = time.perf_counter()
        await sftp.put(file, remote)
        return time.perf_counter() - started


async def s3_raw(args: list[str]) -> float:
    """args: ENDPOINT BUCKET FILE KEY [SOURCE_KEY]."""
    endpoint, bucket, file, key, *source = args
    path = Path(file)
    session = AioSession()
    async with session.create_client(
        "s3", endpoint_url=endpoint, region_name=REGION, **CREDENTIALS
    ) as client:
        if source:
            response = await client.get_object(Bucket=bucket, Key=source[0])
            async with response["Body"] as stream:
                await asyncio.to_thread(path.write_bytes, await stream.read())
        warmup = await asyncio.to_thread(path.read_bytes)
        await client.put_object(Bucket=bucket, Key=key + ".warmup", Body=warmup)
        del warmup
        started = time.perf_counter()
        body = await asyncio.to_thread(path.read_bytes)
        await client.put_object(Bucket=bucket, Key=key, Body=body)
        return time.perf_counter() - started


async def s3_channel(args: list[str]) -> float:
    """args: ENDPOINT BUCKET FILE KEY."""
    endpoint, bucket, file, key = args
    config = msgspec.convert(
        {
            "type": "s3",
            "bucket": bucket,
            "endpoint_url": endpoint,
            "access_key_id": "testing",
            "secret_access_key": "testing",
        },
        S3Config,
        dec_hook=dec_hook,
    )
    channel = S3Channel("bench", config)
    path = Path(file)
    size = (await asyncio.to_thread(path.stat)).st_size

    def batch(name: str) -> Batch:
        return Batch(
            id=f"msg_{name}",
            firehose="bench",
            account="bench",
            name=name,
            path=path,
            size=size,
            records=0,
            content_type="application/x-ndjson",
            content_encoding=None,
        )

    try:
        await channel.put(batch(key + ".warmup"))
        started = time.perf_counter()
        await channel.put(batch(key))
        return time.perf_counter() - started
    finally:
        await channel.close()


MODES: dict[str, Callable[[list[str]], Coroutine[None, None, float]]] = {
    "sftp-raw": sftp_raw,
    "s3-raw": s3_raw,
    "s3-channel": s3_channel,
}


def main() -> None:
    mode, *args = sys.argv[1:]
    seconds = asyncio.run(MODES[mode](args))
    print(json.dumps({"seconds": seconds}))


if __name__ == "__main__":
    main()
