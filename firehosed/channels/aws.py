"""What the `s3` and `sqs` channels share: credentials, one aiobotocore client, errors.

Retry policy for AWS errors: retryable unless the request itself can never succeed
(`_NEVER_SUCCEEDS`). A missing bucket or queue, denied access, an unknown key id or a
wrong setting are retryable on purpose: an operator can fix them (and the worker alerts
meanwhile), and nothing accepted may be lost; `retry_for` still bounds the wait before
the dead-letter store. botocore itself retries each request a few times (standard mode)
before an error reaches here, which matters for the parts of a multipart upload.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import msgspec
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    DataNotFoundError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)

from firehosed.errors import DeliveryError
from firehosed.units import Duration

log = structlog.get_logger(__name__)

# Everything an aiobotocore call (or reading the batch file) may raise; `delivery_error`
# turns each into a DeliveryError. OSError covers TimeoutError.
ERRORS: tuple[type[Exception], ...] = (BotoCoreError, ClientError, aiohttp.ClientError, OSError)

# botocore's own attempts per request (1 = no retry); short, the worker retries batches.
REQUEST_ATTEMPTS = 3

_NEVER_SUCCEEDS = frozenset(
    {
        "EntityTooLarge",
        "InvalidMessageContents",
        "BatchRequestTooLong",
        "TooManyEntriesInBatchRequest",
        "BatchEntryIdsNotDistinct",
        "InvalidBatchEntryId",
        "EmptyBatchRequest",
    }
)

# Error codes an operator must act on, with what to tell them.
_HINTS = {
    "NoSuchBucket": "the bucket does not exist",
    "AccessDenied": "access denied: the credentials lack permission",
    "AccessDeniedException": "access denied: the credentials lack permission",
    "AllAccessDisabled": "all access to this bucket is disabled",
    "InvalidAccessKeyId": "the access key id is not known to AWS: check access_key_id",
    "InvalidClientTokenId": "the access key id is not known to AWS: check access_key_id",
    "UnrecognizedClientException": "the access key id is not known to AWS: check access_key_id",
    "SignatureDoesNotMatch": "the secret access key does not match the access key id",
    "ExpiredToken": "the session token has expired",
    "ExpiredTokenException": "the session token has expired",
    "InvalidToken": "the session token is invalid",
    "AWS.SimpleQueueService.NonExistentQueue": "the queue does not exist",
    "QueueDoesNotExist": "the queue does not exist",
    "RequestTimeTooSkewed": "this machine's clock is too far from AWS time",
}


class AwsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Keys common to every AWS channel. Credentials absent: the default AWS chain
    (environment, shared files, instance or container role)."""

    endpoint_url: str = ""
    access_key_id: str | None = None
    access_key_id_env: str | None = None
    access_key_id_file: str | None = None
    secret_access_key: str | None = None
    secret_access_key_env: str | None = None
    secret_access_key_file: str | None = None
    session_token: str | None = None
    session_token_env: str | None = None
    session_token_file: str | None = None
    connect_timeout: Duration = Duration(10.0)
    read_timeout: Duration = Duration(60.0)

    def problems(self) -> list[tuple[str, str]]:
        """Cross-key rules on credentials and timeouts (secrets are resolved by now)."""
        problems: list[tuple[str, str]] = []
        if (self.access_key_id is None) != (self.secret_access_key is None):
            problems.append(
                ("access_key_id", "set both access_key_id and secret_access_key, or neither")
            )
        if self.session_token is not None and self.access_key_id is None:
            problems.append(("session_token", "needs access_key_id and secret_access_key"))
        if self.endpoint_url and not self.endpoint_url.startswith(("http://", "https://")):
            problems.append(("endpoint_url", "must start with http:// or https://"))
        for key in ("connect_timeout", "read_timeout"):
            if getattr(self, key) <= 0:
                problems.append((key, "must be greater than 0"))
        return problems


class Client:
    """One aiobotocore client for a channel, created on first use and reused.

    Creation is serialized by a lock so concurrent puts share one client (and its
    connection pool). `close` releases it; a later `get` creates a new one.
    """

    def __init__(
        self,
        channel: str,
        service: str,
        config: AwsConfig,
        region: str,
        *,
        max_connections: int,
        options: dict[str, Any] | None = None,
    ) -> None:
        """`options`: more botocore Config keywords for this service (e.g. `s3={...}`)."""
        self.channel = channel
        self.service = service
        self.config = config
        self.region = region
        self.max_connections = max_connections
        self.options = options or {}
        self._client: Any = None
        self._stack = contextlib.AsyncExitStack()
        self._lock = asyncio.Lock()

    async def get(self) -> Any:
        """The client, created now if this is the first call (or the first after close)."""
        async with self._lock:
            if self._client is None:
                session = AioSession()
                # botocore reads its JSON models while creating a client: a tenth of a
                # second of the event loop, unless they are read (and cached) here first.
                await asyncio.to_thread(_load_models, session, self.service)
                self._client = await self._stack.enter_async_context(self._create(session))
                log.info(
                    "channel.client_created",
                    channel=self.channel,
                    service=self.service,
                    region=self.region,
                    endpoint=self.config.endpoint_url or None,
                )
            return self._client

    def _create(self, session: AioSession) -> Any:
        config = self.config
        botocore_config = AioConfig(
            connect_timeout=float(config.connect_timeout),
            read_timeout=float(config.read_timeout),
            max_pool_connections=self.max_connections,
            retries={"mode": "standard", "total_max_attempts": REQUEST_ATTEMPTS},
            # The channels send their own checksum, computed in a thread; botocore would
            # otherwise add one more, computed on the event loop.
            request_checksum_calculation="when_required",
            **self.options,
        )
        return session.create_client(
            self.service,
            region_name=self.region,
            endpoint_url=config.endpoint_url or None,
            aws_access_key_id=config.access_key_id,
            aws_secret_access_key=config.secret_access_key,
            aws_session_token=config.session_token,
            config=botocore_config,
        )

    async def close(self) -> None:
        """Close the client and its connections (no-op when none was created)."""
        async with self._lock:
            self._client = None
            await self._stack.aclose()


def _load_models(session: AioSession, service: str) -> None:
    """Read what creating a `service` client reads, into the session's loader cache
    (blocking: a worker thread)."""
    loader = session.get_component("data_loader")
    for model in ("service-2", "endpoint-rule-set-1", "paginators-1"):
        with contextlib.suppress(DataNotFoundError):
            loader.load_service_model(service, model)
    for name in ("endpoints", "partitions", "sdk-default-configuration", "_retry"):
        with contextlib.suppress(DataNotFoundError):
            loader.load_data(name)


def delivery_error(
    exc: Exception, target: str, aliases: dict[str, str] | None = None
) -> DeliveryError:
    """Translate an exception from `ERRORS` into a DeliveryError about `target`.

    `aliases` renames bare status codes for operations without an error body (S3
    HeadBucket answers a plain 404 or 403).
    """
    if isinstance(exc, ClientError):
        return _client_error(exc, target, aliases or {})
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return DeliveryError(
            f"{target}: no usable AWS credentials ({exc}): set access_key_id and "
            "secret_access_key, or configure the default credential chain"
        )
    if isinstance(exc, ParamValidationError):
        return DeliveryError(f"{target}: invalid request: {exc}", retryable=False)
    return DeliveryError(f"{target}: {type(exc).__name__}: {exc}")


def status(exc: Exception) -> int | None:
    """The HTTP status an AWS service answered with, if `exc` is its error answer."""
    if not isinstance(exc, ClientError):
        return None
    found = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(found) if found is not None else None


def _client_error(exc: ClientError, target: str, aliases: dict[str, str]) -> DeliveryError:
    error = exc.response.get("Error", {})
    metadata = exc.response.get("ResponseMetadata", {})
    status = metadata.get("HTTPStatusCode")
    code = str(error.get("Code") or status or "Unknown")
    code = aliases.get(code, code)
    detail = _HINTS.get(code) or error.get("Message") or "no message"
    return DeliveryError(
        f"{target}: {code} (HTTP {status}): {detail}",
        retryable=code not in _NEVER_SUCCEEDS,
        retry_after=_retry_after(metadata.get("HTTPHeaders", {})),
    )


def _retry_after(headers: dict[str, str]) -> float | None:
    """The server's hint: `Retry-After` (seconds) or `x-amz-retry-after` (milliseconds)."""
    for name, scale in (("retry-after", 1.0), ("x-amz-retry-after", 0.001)):
        value = headers.get(name)
        if value is not None:
            with contextlib.suppress(ValueError):
                return max(0.0, float(value) * scale)
    return None
