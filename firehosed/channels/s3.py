"""`s3`: each batch becomes one object `prefix + batch.name` in a bucket.

Atomic and idempotent by S3's own semantics: an object appears whole or not at all
(one PutObject, or a multipart upload that only exists once completed), and a retry
of the same batch overwrites the object with the same bytes. Every body (object or
part) carries its checksum, so S3 rejects bytes damaged on the way: CRC32 by default
(what AWS SDKs send; S3 keeps it with the object), or Content-MD5 with
`checksum = "md5"` for S3-compatible stores that predate flexible checksums.

As an import source it lists one "directory" of keys with ListObjectsV2 (Delimiter "/",
1000 keys a page, the glob's literal start in the Prefix) and streams a GetObject body
into the target in 1 MiB writes made in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Literal

import structlog

from firehosed.channels import aws
from firehosed.channels.base import (
    Batch,
    Channel,
    RemoteFile,
    glob_start,
    gone,
    joined,
    relative_name,
    selected,
    source_pattern,
    sync_file,
)
from firehosed.errors import DeliveryError, SourceChanged
from firehosed.fileio import Paced
from firehosed.names import control_character
from firehosed.units import Size

log = structlog.get_logger(__name__)

MiB = 1 << 20
MIN_PART = 5 * MiB  # S3's smallest part (except the last)
MAX_PUT = 5 * 1024 * MiB  # S3's largest single PUT and largest part
MAX_PARTS = 10_000
PROBE_NAME = ".firehosed-check"
PRECONDITION_FAILED = 412  # GetObject If-Match: the object is no longer the version listed
NOT_FOUND = 404  # GetObject of a key deleted since it was listed

StorageClass = Literal[
    "STANDARD",
    "REDUCED_REDUNDANCY",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER",
    "DEEP_ARCHIVE",
    "GLACIER_IR",
    "OUTPOSTS",
    "SNOW",
    "EXPRESS_ONEZONE",
]

# HeadBucket answers with a bare status and no error body.
_HEAD_BUCKET_CODES = {"404": "NoSuchBucket", "403": "AccessDenied", "NotFound": "NoSuchBucket"}


class S3Config(aws.AwsConfig, tag="s3", tag_field="type", forbid_unknown_fields=True, kw_only=True):
    """`type = "s3"`: objects go to `bucket` under `prefix` (`{account}` is replaced).

    `sse` ("AES256" or "aws:kms", with `kms_key_id`) and `storage_class` are set on
    every object. Batches of `multipart_threshold` bytes or more are uploaded in parts
    of `part_size`, `max_concurrency` at a time. `endpoint_url` and `addressing_style`
    serve S3-compatible stores; credentials and timeouts are in `AwsConfig`.
    """

    bucket: str
    prefix: str = ""
    region: str = "us-east-1"
    sse: Literal["AES256", "aws:kms"] | None = None
    kms_key_id: str | None = None
    storage_class: StorageClass | None = None
    multipart_threshold: Size = Size(16 * MiB)
    part_size: Size = Size(8 * MiB)
    max_concurrency: int = 4
    checksum: Literal["crc32", "md5"] = "crc32"
    # "path" (bucket in the URL path) is what many S3-compatible stores expect.
    addressing_style: Literal["auto", "virtual", "path"] = "auto"

    def problems(self) -> list[tuple[str, str]]:
        """Cross-key rules: credentials, SSE, part sizes, concurrency, prefix placeholders."""
        problems = super().problems()
        if not self.bucket:
            problems.append(("bucket", "must not be empty"))
        if self.kms_key_id is not None and self.sse != "aws:kms":
            problems.append(("kms_key_id", 'only used with sse = "aws:kms"'))
        if not MIN_PART <= self.part_size <= MAX_PUT:
            problems.append(("part_size", "must be between 5MiB and 5GiB (S3's part limits)"))
        if not MIN_PART <= self.multipart_threshold <= MAX_PUT:
            problems.append(("multipart_threshold", "must be between 5MiB and 5GiB"))
        if self.max_concurrency < 1:
            problems.append(("max_concurrency", "must be at least 1"))
        if "{" in self.prefix.replace("{account}", ""):
            problems.append(("prefix", "the only placeholder is {account}"))
        if (bad := control_character(self.prefix)) is not None:
            problems.append(("prefix", f"contains a control character ({bad!r})"))
        return problems


class S3Channel(Channel):
    """PutObject below `multipart_threshold`, else a multipart upload with up to
    `max_concurrency` parts in flight (and as many part buffers in memory). As an
    import source, it fetches the ETag it listed, its body written as it comes."""

    streams = True

    def __init__(self, name: str, config: S3Config) -> None:
        super().__init__(name)
        self.config = config
        self.bucket = config.bucket
        self._client = aws.Client(
            name,
            "s3",
            config,
            config.region,
            max_connections=max(10, config.max_concurrency),
            options={"s3": {"addressing_style": config.addressing_style}},
        )

    def key(self, batch: Batch) -> str:
        """The object key for `batch`: the prefix (with its account) plus the batch name."""
        return self.prefix(batch.account) + batch.name

    def prefix(self, account: str) -> str:
        """The configured prefix, `{account}` replaced by `account`."""
        return self.config.prefix.replace("{account}", account)

    async def put(self, batch: Batch) -> None:
        key = self.key(batch)
        try:
            client = await self._client.get()
            if batch.size < self.config.multipart_threshold:
                await self._put_object(client, batch, key)
            else:
                await self._put_multipart(client, batch, key)
        except aws.ERRORS as exc:
            raise aws.delivery_error(exc, f"s3://{self.bucket}/{key}") from exc

    def _object_args(self, batch: Batch | None) -> dict[str, Any]:
        """Headers set on the object itself (with a batch) or on the check probe (None)."""
        args: dict[str, Any] = {}
        if batch is not None:
            args["ContentType"] = batch.content_type
            if batch.content_encoding:
                args["ContentEncoding"] = batch.content_encoding
            if self.config.storage_class:
                args["StorageClass"] = self.config.storage_class
        if self.config.sse:
            args["ServerSideEncryption"] = self.config.sse
        if self.config.kms_key_id:
            args["SSEKMSKeyId"] = self.config.kms_key_id
        return args

    async def _read(self, path: Path, offset: int, length: int) -> tuple[bytes, dict[str, str]]:
        """Read `length` bytes at `offset` and checksum them, off the event loop."""
        return await asyncio.to_thread(_read, path, offset, length, self.config.checksum)

    async def _put_object(self, client: Any, batch: Batch, key: str) -> None:
        body, checksum = await self._read(batch.path, 0, batch.size)
        await client.put_object(
            Bucket=self.bucket, Key=key, Body=body, **checksum, **self._object_args(batch)
        )

    async def _put_multipart(self, client: Any, batch: Batch, key: str) -> None:
        args = self._object_args(batch)
        if self.config.checksum == "crc32":
            args["ChecksumAlgorithm"] = "CRC32"
        upload = await client.create_multipart_upload(Bucket=self.bucket, Key=key, **args)
        upload_id = upload["UploadId"]
        try:
            parts = await self._upload_parts(client, batch, key, upload_id)
            await client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            # An unfinished upload is invisible but billed until aborted.
            await self._abort(client, key, upload_id)
            raise

    async def _upload_parts(
        self, client: Any, batch: Batch, key: str, upload_id: str
    ) -> list[dict[str, str | int]]:
        part_size = max(self.config.part_size, math.ceil(batch.size / MAX_PARTS))
        # One shared iterator: each uploader takes the next part when it is free, so at
        # most `max_concurrency` parts are read into memory at once.
        pending = iter(enumerate(range(0, batch.size, part_size), start=1))
        parts: dict[int, dict[str, str | int]] = {}

        async def uploader() -> None:
            for number, offset in pending:
                length = min(part_size, batch.size - offset)
                body, checksum = await self._read(batch.path, offset, length)
                response = await client.upload_part(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                    **checksum,
                )
                parts[number] = {"PartNumber": number, "ETag": response["ETag"]}
                # An upload created with a checksum algorithm must repeat each part's.
                if "ChecksumCRC32" in checksum:
                    parts[number]["ChecksumCRC32"] = checksum["ChecksumCRC32"]

        count = min(self.config.max_concurrency, math.ceil(batch.size / part_size))
        await _gather_or_cancel([uploader() for _ in range(count)])
        return [parts[n] for n in sorted(parts)]

    async def _abort(self, client: Any, key: str, upload_id: str) -> None:
        try:
            await client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except aws.ERRORS as exc:
            # The bucket's lifecycle rule (AbortIncompleteMultipartUpload) is the backstop.
            log.warning(
                "s3.abort_failed", channel=self.name, bucket=self.bucket, key=key, error=str(exc)
            )

    async def check(self) -> str:
        probe = self.config.prefix.split("{account}", 1)[0] + PROBE_NAME
        try:
            client = await self._client.get()
            await client.head_bucket(Bucket=self.bucket)
            await client.put_object(
                Bucket=self.bucket,
                Key=probe,
                Body=b"",
                **_checksum(b"", self.config.checksum),
                **self._object_args(None),
            )
            await client.delete_object(Bucket=self.bucket, Key=probe)
        except aws.ERRORS as exc:
            target = f"s3://{self.bucket}/{probe}"
            raise aws.delivery_error(exc, target, aliases=_HEAD_BUCKET_CODES) from exc
        return f"s3 bucket {self.bucket} is writable (probe {probe} put and deleted)"

    async def list_files(self, pattern: str, *, account: str) -> list[RemoteFile]:
        """Objects directly in the pattern's "directory" under the prefix (not in deeper
        ones: Delimiter "/"), every page of them; version: the ETag, without its quotes."""
        prefix = self._source_prefix(account)
        directory, glob = source_pattern(pattern, f"s3://{self.bucket}/{prefix}")
        folder = prefix + (f"{directory}/" if directory else "")
        found: list[RemoteFile] = []
        try:
            client = await self._client.get()
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=folder + glob_start(glob), Delimiter="/"
            )
            async for page in pages:
                for item in page.get("Contents", ()):
                    filename = item["Key"][len(folder) :]
                    if selected(filename, glob):
                        name = joined(directory, filename)
                        found.append(RemoteFile(name, item["Size"], item["ETag"].strip('"')))
        except aws.ERRORS as exc:
            raise aws.delivery_error(exc, f"s3://{self.bucket}/{folder}") from exc
        return sorted(found, key=lambda file: file.name)

    async def fetch(
        self, name: str, target: Path, *, account: str, version: str | None = None
    ) -> int:
        """GetObject `prefix + name` (only as `version`, its listed ETag, if given), its
        body streamed into `target`, then fsync it."""
        key = self._source_prefix(account) + relative_name(name, "file name")
        condition = {} if version is None else {"IfMatch": f'"{version}"'}
        try:
            client = await self._client.get()
            response = await client.get_object(Bucket=self.bucket, Key=key, **condition)
            async with response["Body"] as body:
                with await asyncio.to_thread(target.open, "wb") as file:
                    received = await _stream(body, file)
        except aws.ERRORS as exc:
            status = aws.status(exc)
            if version is not None and status == PRECONDITION_FAILED:
                raise SourceChanged(
                    f"s3://{self.bucket}/{key}: changed since it was listed (ETag {version})"
                ) from exc
            if status == NOT_FOUND:
                raise gone(f"s3://{self.bucket}/{key}") from exc
            raise aws.delivery_error(exc, f"s3://{self.bucket}/{key}") from exc
        return received

    def _source_prefix(self, account: str) -> str:
        if "{account}" in self.config.prefix and not account:
            raise DeliveryError(
                f"s3 bucket {self.bucket}: prefix {self.config.prefix!r} names an account, "
                "and none was given",
                retryable=False,
            )
        return self.prefix(account)

    async def close(self) -> None:
        await self._client.close()


async def _gather_or_cancel(coroutines: list[Any]) -> None:
    """Run `coroutines` concurrently; on the first error cancel the rest, then re-raise."""
    tasks = [asyncio.create_task(c) for c in coroutines]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _stream(body: Any, file: BinaryIO) -> int:
    """Copy a GetObject body into `file` in writes of up to 1 MiB, made in a thread
    (written out as they go: fileio.PACE), and fsync it; the bytes copied."""
    copied = 0
    paced = Paced(file)
    while True:
        block = bytearray()
        while len(block) < MiB and (chunk := await body.read(MiB - len(block))):
            block += chunk
        if not block:
            break
        await asyncio.to_thread(paced.write, block)
        copied += len(block)
    await asyncio.to_thread(sync_file, file)
    return copied


def _read(path: Path, offset: int, length: int, algorithm: str) -> tuple[bytes, dict[str, str]]:
    """`length` bytes of `path` from `offset`, and their checksum argument (in a thread)."""
    with open(path, "rb") as file:
        file.seek(offset)
        body = file.read(length)
    if len(body) != length:
        # The batch file is fixed before the first attempt: a retry would read the same.
        raise DeliveryError(
            f"{path}: expected {length} bytes at {offset}, read {len(body)}", retryable=False
        )
    return body, _checksum(body, algorithm)


def _checksum(body: bytes, algorithm: str) -> dict[str, str]:
    """The PutObject/UploadPart argument carrying `body`'s checksum (both hashes release
    the GIL on large buffers, so parts are checksummed in parallel)."""
    if algorithm == "md5":
        digest = hashlib.md5(body, usedforsecurity=False).digest()
        return {"ContentMD5": base64.b64encode(digest).decode("ascii")}
    crc = zlib.crc32(body).to_bytes(4, "big")
    return {"ChecksumCRC32": base64.b64encode(crc).decode("ascii")}
