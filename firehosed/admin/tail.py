"""`GET /v1/tail[?firehose=NAME]`: accepted signals and delivered batches as they
happen, as server-sent events (one `data:` line of JSON each).

Events come from the daemon's `Tap`. A reader that falls behind loses events rather than
holding the daemon back; the stream says so with `{"event": "dropped", "dropped": n}`
where they went missing. A comment line every KEEPALIVE seconds keeps proxies from
closing a quiet stream and finds readers that left.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import msgspec
from aiohttp import web

from firehosed.tap import Tap

if TYPE_CHECKING:
    from firehosed.admin.app import AdminApi

KEEPALIVE = 15.0  # seconds


async def get_tail(api: AdminApi, request: web.BaseRequest, name: str) -> web.StreamResponse:
    """Stream the tap's events until the client leaves or the daemon stops."""
    return await stream(api.tap, request, request.query.get("firehose") or None)


async def stream(tap: Tap, request: web.BaseRequest, firehose: str | None) -> web.StreamResponse:
    # Subscribed before the answer's head goes out: a client that has the head misses
    # nothing published after it.
    subscriber = tap.subscribe(firehose)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: pass events on at once
        }
    )
    try:
        with contextlib.suppress(ConnectionError):  # the reader left
            await response.prepare(request)
            await response.write(b": following\n\n")
            while (event := await subscriber.next(KEEPALIVE)) is not None:
                if event:
                    await response.write(b"data: " + msgspec.json.encode(event) + b"\n\n")
                else:
                    await response.write(b": keepalive\n\n")
    finally:
        subscriber.close()
    return response
