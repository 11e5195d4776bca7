"""A loop that goes on after an error must not go on after its task was cancelled.

Python 3.11's `asyncio.wait_for`, which nats-py's requests and watches use (and this
code's waits too), can lose a cancellation that arrives as its wait ends: it returns the
result, or raises TimeoutError in its place. A loop that catches TimeoutError (or a
nats error, or any Exception) and goes round again then runs on for good, and whoever
cancelled it (a stop, a test's crash) waits for it for ever. The task still counts the
cancellation (`Task.cancelling()`): each such loop calls `raise_if_cancelled` as it goes
round.
"""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """Raise CancelledError if the running task was cancelled and the cancellation was
    lost on the way (see above)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
