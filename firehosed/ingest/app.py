"""The ingest HTTP API (DESIGN.md §5): signal ingest, import uploads, health, readiness.

Served by aiohttp's low-level server through one handler, `Api`, that dispatches on the
path itself (routes.py). Records go to the `Receiver` (receiver.py). What operators ask
(status, metrics, replay, reload) is not answered here but on the admin listener
(`firehosed/admin/`): sources reach this one, and it answers 404 for those paths.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from aiohttp import web

from firehosed.imports.importer import Importer
from firehosed.ingest import auth, body, uploads
from firehosed.ingest.receiver import Receiver
from firehosed.ingest.routes import Methods, Routes, answer, get

BIG_BODY = 1 << 16  # bytes: above this, splitting into records runs in a thread
RETRY_AFTER = "5"


class Api:
    """The ingest listener's handlers share this; `handle` is aiohttp's handler."""

    def __init__(
        self,
        receiver: Receiver,
        idle: dict[web.RequestHandler, float] | None = None,
        importer: Importer | None = None,
    ) -> None:
        self.receiver = receiver
        self.importer = importer
        named: list[tuple[str, str, Methods]] = [
            ("/v1/accounts/", "/signals", {"POST": post_signals})
        ]
        pairs: list[tuple[str, str, Methods]] = []
        if importer is not None:
            named.append(("/v1/accounts/", "/imports", {"POST": uploads.post_upload}))
            pairs.append(("/v1/accounts/", "/imports/", get(uploads.get_run)))
        routes = Routes({"/healthz": get(healthz), "/readyz": get(readyz)}, named, idle, pairs)
        # The dispatcher itself, bound to this API: no coroutine of ours in between.
        self.handle = functools.partial(routes.dispatch, self)


def build_server(
    receiver: Receiver,
    idle: dict[web.RequestHandler, float] | None = None,
    importer: Importer | None = None,
    **kwargs: Any,
) -> web.Server:
    """aiohttp's low-level server for the API, noting busy connections in `idle` (an
    `IdleReaper.since`), taking import uploads when given an `importer`; `kwargs`: its
    connection settings."""
    return web.Server(Api(receiver, idle, importer).handle, **kwargs)


async def post_signals(api: Api, request: web.BaseRequest, name: str) -> web.Response:
    """POST /v1/accounts/{account}/signals: accept records, durable before 202."""
    receiver = api.receiver
    account = receiver.accounts.get(name)
    if not auth.authorized(
        account.tokens if account else None, auth.bearer(request.headers.get("Authorization"))
    ):
        return auth.unauthorized()
    assert account is not None
    if refusal := receiver.refusal(name):
        return answer(503, {"error": refusal}, **{"Retry-After": RETRY_AFTER})
    limits = receiver.server
    try:  # the body's records, read within body_timeout and max_body (inline: hot path)
        kind = body.content_kind(request)
        if request.content.is_eof():  # the whole body is already here: nothing to wait for
            data = await body.read(request, limits.max_body)
        else:
            async with asyncio.timeout(limits.body_timeout):
                data = await body.read(request, limits.max_body)
        raws = body.quick_split(data, kind)
        if raws is None and len(data) > BIG_BODY:  # millions of tiny records: a while
            raws = await asyncio.to_thread(body.split, data, kind)
        elif raws is None:
            raws = body.split(data, kind)
    except body.BodyError as exc:
        return answer(exc.status, {"error": exc.message})
    except TimeoutError:
        late = f"body not received within body_timeout ({limits.body_timeout:g}s)"
        return await _answer_and_close(request, answer(408, {"error": late}))
    result = await receiver.accept(account, raws)
    if result.status == 503:
        return answer(503, result.body, **{"Retry-After": RETRY_AFTER})
    return answer(result.status, result.body)


async def _answer_and_close(request: web.BaseRequest, response: web.Response) -> web.Response:
    """Send `response`, then close: the rest of a trickled body is not worth waiting for
    (aiohttp would otherwise linger up to 10 s reading it)."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    if request.transport is not None:
        request.transport.close()
    return response


async def healthz(api: Api, request: web.BaseRequest, name: str) -> web.Response:
    """Alive: the event loop answers."""
    return answer(200, {"status": "ok"})


async def readyz(api: Api, request: web.BaseRequest, name: str) -> web.Response:
    """Ready to accept signals: started, not draining, storage under max_disk."""
    if refusal := api.receiver.refusal(None):
        return answer(
            503, {"status": "not ready", "error": refusal}, **{"Retry-After": RETRY_AFTER}
        )
    return answer(200, {"status": "ready"})
