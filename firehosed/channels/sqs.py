"""`sqs`: each record of a batch becomes one SQS message, sent with SendMessageBatch.

A stream channel: the queue cuts small NDJSON batches (one record per line, at most
`max_records`) as soon as records are durable, and `batch.keys` gives each line's record
id and session. On a FIFO queue (URL ending in `.fifo`) the session is the MessageGroupId, so
a session's records stay in order, and the record id is the MessageDeduplicationId, so
a retried batch is not delivered twice within SQS's five-minute deduplication window.
On a standard queue a retried batch may deliver some records twice (at least once).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Iterator
from typing import Any

import msgspec
import structlog

from firehosed.channels import aws
from firehosed.channels.base import Batch, Channel
from firehosed.errors import DeliveryError
from firehosed.units import Duration

log = structlog.get_logger(__name__)

MAX_ENTRIES = 10  # SendMessageBatch entries per request
MAX_REQUEST_BYTES = 256 * 1024  # per message, and for all messages of one request
# Failed entries are resent alone this many times, quickly, before the put gives up.
ENTRY_ATTEMPTS = 3
ENTRY_RETRY_DELAY = 0.1
# MessageGroupId for records without a session: they share one ordered group.
NO_SESSION_GROUP = "no-session"
# SQS ids (group, deduplication): 1..128 printable ASCII characters, no space.
_SQS_ID = re.compile(r"[!-~]{1,128}")
_ATTRIBUTE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,256}")
_REGION_IN_URL = re.compile(r"https://(?:sqs\.([a-z0-9-]+)|([a-z0-9-]+)\.queue)\.amazonaws\.com")


class SqsConfig(
    aws.AwsConfig, tag="sqs", tag_field="type", forbid_unknown_fields=True, kw_only=True
):
    """`type = "sqs"`: one message per record to `queue_url`.

    `region` defaults to the one in an AWS queue URL, else us-east-1. Each message gets
    the string `message_attributes` (at most 10, SQS's limit).
    """

    queue_url: str
    region: str | None = None
    max_records: int = MAX_ENTRIES
    max_wait: Duration = Duration(0.0)
    message_attributes: dict[str, str] = msgspec.field(default_factory=dict)

    def problems(self) -> list[tuple[str, str]]:
        """Cross-key rules: credentials, URL, batching and message attributes."""
        problems = super().problems()
        if not self.queue_url.startswith(("http://", "https://")):
            problems.append(("queue_url", "must start with https:// (or http://)"))
        if not 1 <= self.max_records <= MAX_ENTRIES:
            problems.append(("max_records", "must be between 1 and 10 (SQS's batch limit)"))
        if len(self.message_attributes) > 10:
            problems.append(("message_attributes", "at most 10 attributes per message"))
        for name in self.message_attributes:
            if not _valid_attribute_name(name):
                problems.append(("message_attributes", f"invalid attribute name {name!r}"))
        return problems

    def resolved_region(self) -> str:
        """`region`, else the region named in an AWS queue URL, else us-east-1."""
        if self.region:
            return self.region
        match = _REGION_IN_URL.match(self.queue_url)
        return (match.group(1) or match.group(2)) if match else "us-east-1"


def _valid_attribute_name(name: str) -> bool:
    reserved = name.lower().startswith(("aws.", "amazon."))
    dots = name.startswith(".") or name.endswith(".") or ".." in name
    return bool(_ATTRIBUTE_NAME.fullmatch(name)) and not reserved and not dots


class SqsChannel(Channel):
    """Sends a batch's records in order, in as few SendMessageBatch requests as SQS allows."""

    stream = True
    format = "ndjson"

    def __init__(self, name: str, config: SqsConfig) -> None:
        super().__init__(name)
        self.queue_url = config.queue_url
        self.fifo = config.queue_url.endswith(".fifo")
        self.max_records = config.max_records
        self.max_wait = float(config.max_wait)
        self._attributes = {
            k: {"DataType": "String", "StringValue": v}
            for k, v in config.message_attributes.items()
        }
        # SQS counts attribute names, types and values towards a message's size.
        self._attributes_size = sum(
            len(k.encode()) + len("String") + len(v.encode())
            for k, v in config.message_attributes.items()
        )
        self._client = aws.Client(name, "sqs", config, config.resolved_region(), max_connections=10)

    async def put(self, batch: Batch) -> None:
        try:
            data = await batch.read()
            entries = self._entries(batch, data)
            client = await self._client.get()
            # One request at a time, in file order: FIFO groups keep the records' order.
            for request in _requests(entries):
                await self._send(client, batch, request)
        except aws.ERRORS as exc:
            raise aws.delivery_error(exc, f"sqs queue {self.queue_url}") from exc

    def _entries(self, batch: Batch, data: bytes) -> list[tuple[dict[str, Any], int]]:
        """One (SendMessageBatch entry, size in bytes) per line; `Id` is the line index."""
        lines = data.removesuffix(b"\n").split(b"\n") if data else []
        if batch.keys and len(batch.keys) != len(lines):
            raise DeliveryError(
                f"batch {batch.id}: {len(lines)} lines but {len(batch.keys)} record keys",
                retryable=False,
            )
        entries = []
        for index, line in enumerate(lines):
            record_id, session = _record_key(batch, index)
            size = len(line) + self._attributes_size
            if size > MAX_REQUEST_BYTES:
                raise DeliveryError(
                    f"record {record_id} (line {index + 1} of batch {batch.id}) is {size} "
                    f"bytes, over SQS's {MAX_REQUEST_BYTES}-byte message limit",
                    retryable=False,
                )
            entries.append((self._entry(index, line, record_id, session, batch), size))
        return entries

    def _entry(
        self, index: int, line: bytes, record_id: str, session: str | None, batch: Batch
    ) -> dict[str, Any]:
        try:
            body = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DeliveryError(
                f"record {record_id} (line {index + 1} of batch {batch.id}) is not UTF-8",
                retryable=False,
            ) from exc
        entry: dict[str, Any] = {"Id": str(index), "MessageBody": body}
        if self._attributes:
            entry["MessageAttributes"] = self._attributes
        if self.fifo:
            entry["MessageGroupId"] = _sqs_id(session or NO_SESSION_GROUP)
            entry["MessageDeduplicationId"] = _sqs_id(record_id)
        return entry

    async def _send(self, client: Any, batch: Batch, entries: list[dict[str, Any]]) -> None:
        """Send `entries`, resending only the failed ones a few times; raise if any remain."""
        for attempt in range(ENTRY_ATTEMPTS):
            if attempt:
                await asyncio.sleep(ENTRY_RETRY_DELAY * attempt)
            response = await client.send_message_batch(QueueUrl=self.queue_url, Entries=entries)
            failed = response.get("Failed") or []
            if not failed:
                return
            log.warning(
                "sqs.entries_failed",
                channel=self.name,
                batch=batch.id,
                attempt=attempt + 1,
                failed=len(failed),
                codes=sorted({f.get("Code", "") for f in failed}),
            )
            sender_fault = any(f.get("SenderFault") for f in failed)
            if sender_fault or attempt + 1 == ENTRY_ATTEMPTS:
                raise DeliveryError(self._failure(batch, failed), retryable=not sender_fault)
            by_id = {entry["Id"]: entry for entry in entries}
            entries = [by_id[f["Id"]] for f in failed]

    def _failure(self, batch: Batch, failed: list[dict[str, Any]]) -> str:
        first = failed[0]
        record_id, _ = _record_key(batch, int(first["Id"]))
        return (
            f"sqs queue {self.queue_url}: {len(failed)} message(s) of batch {batch.id} "
            f"failed, first record {record_id}: {first.get('Code')}: {first.get('Message')}"
        )

    async def check(self) -> str:
        try:
            client = await self._client.get()
            response = await client.get_queue_attributes(
                QueueUrl=self.queue_url, AttributeNames=["ApproximateNumberOfMessages"]
            )
        except aws.ERRORS as exc:
            raise aws.delivery_error(exc, f"sqs queue {self.queue_url}") from exc
        waiting = response.get("Attributes", {}).get("ApproximateNumberOfMessages", "?")
        return f"sqs queue {self.queue_url} is reachable ({waiting} messages waiting)"

    async def close(self) -> None:
        await self._client.close()


def _record_key(batch: Batch, index: int) -> tuple[str, str | None]:
    """(record id, session) of line `index`; without keys, an id stable across retries."""
    if index < len(batch.keys):
        return batch.keys[index]
    return f"{batch.id}.{index}", None


def _sqs_id(value: str) -> str:
    """`value` if SQS accepts it as a group or deduplication id, else its SHA-256 (hex)."""
    if _SQS_ID.fullmatch(value):
        return value
    return hashlib.sha256(value.encode()).hexdigest()


def _requests(entries: list[tuple[dict[str, Any], int]]) -> Iterator[list[dict[str, Any]]]:
    """Split entries, in order, into requests within SQS's entry count and size limits."""
    request: list[dict[str, Any]] = []
    total = 0
    for entry, size in entries:
        if request and (len(request) == MAX_ENTRIES or total + size > MAX_REQUEST_BYTES):
            yield request
            request, total = [], 0
        request.append(entry)
        total += size
    if request:
        yield request
