"""The HTTP API (DESIGN.md §5): signal ingest, health, readiness, metrics, status."""

from __future__ import annotations

import asyncio
import time
from ipaddress import ip_address
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from aiohttp import web

from firehosed import metrics, replay
from firehosed.envelope import RecordError
from firehosed.errors import StorageError
from firehosed.faults import crash_point
from firehosed.ingest import auth, body

if TYPE_CHECKING:
    from firehosed.daemon import Daemon

log = structlog.get_logger(__name__)
DAEMON: web.AppKey[Daemon] = web.AppKey("daemon")
MAX_REJECTED_LISTED = 1000
BIG_BODY = 1 << 16  # bytes: above this, splitting into records runs in a thread
# A body of a million tiny records must not stall the event loop: every YIELD_EVERY
# records (a few ms of work) the handler pauses briefly. A real pause, not sleep(0): the
# loop must block in its poll for a moment so that worker threads (the committer's
# fsync) can take the GIL; a loop that never blocks starves them (GIL convoy).
YIELD_EVERY = 2000
YIELD_PAUSE = 0.001
RETRY_AFTER = "5"


def build_app(daemon: Daemon) -> web.Application:
    """The aiohttp application serving `daemon`."""
    app = web.Application(client_max_size=1 << 20, middlewares=[_errors])
    app[DAEMON] = daemon
    app.router.add_post("/v1/accounts/{account}/signals", post_signals)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/v1/status", get_status)
    app.router.add_post("/v1/firehoses/{firehose}/replay", post_replay)
    return app


def answer(status: int, payload: dict[str, Any], **headers: str) -> web.Response:
    """A JSON response, counted by status."""
    metrics.requests_with(status).inc()
    return web.Response(
        status=status,
        body=msgspec.json.encode(payload),
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """JSON bodies for aiohttp's own errors (404, 405…); an unexpected error is a logged 500."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as exc:
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
        return answer(exc.status, {"error": exc.reason}, **allow)
    except Exception:
        log.exception("http.unhandled_error", path=request.path)
        return answer(500, {"error": "internal error"})


async def post_signals(request: web.Request) -> web.Response:
    """POST /v1/accounts/{account}/signals: accept records, durable before 202."""
    daemon: Daemon = request.app[DAEMON]
    name = request.match_info["account"]
    account = daemon.accounts.get(name)
    if not auth.authorized(
        account.tokens if account else None, auth.bearer(request.headers.get("Authorization"))
    ):
        return answer(
            401,
            {"error": "missing or invalid bearer token for this account"},
            **{"WWW-Authenticate": 'Bearer realm="firehosed"'},
        )
    assert account is not None
    if refusal := daemon.refusal():
        return answer(503, {"error": refusal}, **{"Retry-After": RETRY_AFTER})
    server = daemon.config.server
    try:
        kind = body.content_kind(request)
        if request.content.is_eof():  # the whole body is already here: nothing to wait for
            data = await body.read(request, server.max_body)
        else:
            async with asyncio.timeout(server.body_timeout):
                data = await body.read(request, server.max_body)
        if len(data) > BIG_BODY:  # millions of tiny records take a while to split
            raws = await asyncio.to_thread(body.split, data, kind)
        else:
            raws = body.split(data, kind)
    except body.BodyError as exc:
        return answer(exc.status, {"error": exc.message})
    except TimeoutError:
        late = f"body not received within body_timeout ({server.body_timeout:g}s)"
        return await _answer_and_close(request, answer(408, {"error": late}))
    return await _accept(daemon, account, raws)


async def _answer_and_close(request: web.Request, response: web.Response) -> web.Response:
    """Send `response`, then close: the rest of a trickled body is not worth waiting for
    (aiohttp would otherwise linger up to 10 s reading it)."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    if request.transport is not None:
        request.transport.close()
    return response


async def _accept(daemon: Daemon, account: Any, raws: list[bytes]) -> web.Response:
    received = time.time()
    rejected: list[dict[str, Any]] = []
    rejected_total = 0
    fresh: list[str] = []
    duplicates = 0
    account.dedupe.expire(received)
    routing = daemon.router.begin(account.name)
    try:
        for index, raw in enumerate(raws):
            if index % YIELD_EVERY == YIELD_EVERY - 1:
                routing.flush()
                await asyncio.sleep(YIELD_PAUSE)
            try:
                env = account.reader.read(raw, received)
            except RecordError as exc:
                rejected_total += 1
                if len(rejected) < MAX_REJECTED_LISTED:  # keep the answer, and memory, bounded
                    rejected.append({"index": index, "error": str(exc)})
                continue
            if not env.id_assigned and account.dedupe.seen(env.id, received):
                duplicates += 1
                continue
            routing.route(env, raw, received)
            fresh.append(env.id)
    finally:
        # Even when the request is cancelled part-way: dedupe has seen these ids, so a
        # retry would be answered "duplicate"; they must reach the queue.
        routing.flush()
    if rejected_total:
        account.rejected.inc(rejected_total)
    if duplicates:
        account.duplicates.inc(duplicates)
    if not fresh and not duplicates:
        return answer(
            400, {"error": "every record was rejected", **_rejections(rejected, rejected_total)}
        )
    if fresh:
        crash_point("ingest.after_append")
        try:
            await daemon.committer.commit()
        except StorageError as exc:
            for record_id in fresh:
                account.dedupe.forget(record_id)
            return answer(503, {"error": str(exc)}, **{"Retry-After": RETRY_AFTER})
        crash_point("ingest.after_fsync")
        account.accepted.inc(len(fresh))
    listed = _rejections(rejected, rejected_total)
    return answer(202, {"accepted": len(fresh), "duplicates": duplicates, **listed})


def _rejections(rejected: list[dict[str, Any]], total: int) -> dict[str, Any]:
    """The `rejected` list (at most MAX_REJECTED_LISTED), with the full count when cut."""
    if total <= len(rejected):
        return {"rejected": rejected}
    return {"rejected": rejected, "rejected_total": total}


async def healthz(request: web.Request) -> web.Response:
    """Alive: the event loop answers."""
    return answer(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready to accept signals: started, not draining, storage under max_disk."""
    daemon: Daemon = request.app[DAEMON]
    if refusal := daemon.refusal():
        return answer(
            503, {"status": "not ready", "error": refusal}, **{"Retry-After": RETRY_AFTER}
        )
    return answer(200, {"status": "ready"})


async def get_metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    daemon: Daemon = request.app[DAEMON]
    daemon.update_metrics()
    return web.Response(
        body=metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"}
    )


async def get_status(request: web.Request) -> web.Response:
    """Per firehose: queued records and bytes, oldest age, last delivery and error, paused."""
    daemon: Daemon = request.app[DAEMON]
    return answer(200, daemon.status())


async def post_replay(request: web.Request) -> web.StreamResponse:
    """POST /v1/firehoses/{firehose}/replay: dead batches back to delivery, NDJSON progress.

    Answered only to loopback or unix-socket peers: it changes what gets delivered.
    """
    if not _local_peer(request):
        return answer(403, {"error": "replay is only answered to local clients"})
    worker = request.app[DAEMON].workers.get(request.match_info["firehose"])
    if worker is None:
        return answer(404, {"error": "no running firehose of that name"})
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    async for manifest in worker.replay():
        await response.write(msgspec.json.encode(replay.progress(manifest)) + b"\n")
    await response.write_eof()
    return response


def _local_peer(request: web.Request) -> bool:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not isinstance(peer, tuple):  # a unix socket: guarded by its file permissions
        return True
    return ip_address(peer[0]).is_loopback
