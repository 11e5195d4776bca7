"""The project's own exception tree.

Library errors (asyncssh, aioftp, botocore, aiohttp, OSError) are translated into these
at the channel boundary; the delivery worker decides retry from them alone.
"""

from __future__ import annotations


class FirehosedError(Exception):
    """Base of every error firehosed raises on purpose."""


class ConfigError(FirehosedError):
    """The configuration is invalid; `problems` holds one `file:line: key: message` each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class StorageError(FirehosedError):
    """The durable queue could not write or sync (disk full, I/O error)."""


class DeliveryError(FirehosedError):
    """A batch could not be delivered; retried with backoff unless `retryable` is false.

    `retry_after` (seconds) is the destination's own hint (HTTP Retry-After), honoured
    as a lower bound for the next attempt.
    """

    def __init__(
        self, message: str, *, retryable: bool = True, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


class SourceChanged(DeliveryError):
    """A file an import listed changed (or went) at its source before it was fetched
    whole: the run lists it again and takes it as it is now."""


class BatchGone(Exception):
    """A batch this process's queue still held was delivered and retired by another
    process meanwhile (a scaled-out backend whose view was behind): the delivery drops
    it, and the queue reads its state again before the next batch."""


class NotHere(FirehosedError):
    """What an operator asked of a firehose is done by another process of a scaled-out
    backend (the one holding its cut lease): ask that one."""


class DestinationGone(DeliveryError):
    """The destination says it no longer wants deliveries (HTTP 410): the firehose stops."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)
