"""The HTTP API (DESIGN.md §5): signal ingest, health, readiness, metrics, status.

Served by aiohttp's low-level server through one handler, `Api`, that dispatches on the
path itself. aiohttp's Application layer (router, match info) cost a no-op handler a
quarter of its throughput here, and a middleware another seventh
(bench/RESULTS-decompose.md); the API is six fixed routes, so a dict and two prefixes do.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from ipaddress import ip_address
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

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
MAX_REJECTED_LISTED = 1000
BIG_BODY = 1 << 16  # bytes: above this, splitting into records runs in a thread
# A body of a million tiny records must not stall the event loop: every YIELD_EVERY
# records (a few ms of work) the handler pauses briefly. A real pause, not sleep(0): the
# loop must block in its poll for a moment so that worker threads (the committer's
# fsync) can take the GIL; a loop that never blocks starves them (GIL convoy).
YIELD_EVERY = 2000
YIELD_PAUSE = 0.001
RETRY_AFTER = "5"

# Every handler gets the daemon, the request and the path's variable part ("" if none).
Handler = Callable[["Daemon", web.BaseRequest, str], Awaitable[web.StreamResponse]]
Methods = dict[str, Handler]


class Api:
    """The aiohttp low-level handler serving `daemon`: every answer is JSON (404 and 405
    included), and an unexpected error is a logged 500, never a traceback to the client."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._exact: dict[str, Methods] = {
            "/healthz": _get(healthz),
            "/readyz": _get(readyz),
            "/metrics": _get(get_metrics),
            "/v1/status": _get(get_status),
        }
        # (prefix, suffix, methods): the path is prefix + one non-empty segment + suffix
        self._named: tuple[tuple[str, str, Methods], ...] = (
            ("/v1/accounts/", "/signals", {"POST": post_signals}),
            ("/v1/firehoses/", "/replay", {"POST": post_replay}),
        )

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            methods, name = self._match(request.rel_url.raw_path)
            if methods is None:
                return answer(404, {"error": "Not Found"})
            handler = methods.get(request.method)
            if handler is None:
                return answer(405, {"error": "Method Not Allowed"}, Allow=",".join(sorted(methods)))
            return await handler(self.daemon, request, name)
        except web.HTTPException as exc:
            return answer(exc.status, {"error": exc.reason})
        except Exception:
            log.exception("http.unhandled_error", path=request.path)
            return answer(500, {"error": "internal error"})

    def _match(self, path: str) -> tuple[Methods | None, str]:
        """The methods of `path` (percent-encoded, as sent) and its variable part, decoded:
        an encoded "/" stays inside the segment, as an account name it is just unknown."""
        methods = self._exact.get(path)
        if methods is not None:
            return methods, ""
        for prefix, suffix, named in self._named:
            if path.startswith(prefix) and path.endswith(suffix):
                name = path[len(prefix) : len(path) - len(suffix)]
                if name and "/" not in name:
                    return named, unquote(name)
        return None, ""


def _get(handler: Handler) -> Methods:
    """A GET route; HEAD too (aiohttp sends a HEAD answer without its body)."""
    return {"GET": handler, "HEAD": handler}


def build_server(daemon: Daemon, **kwargs: Any) -> web.Server:
    """aiohttp's low-level server for `daemon` (`kwargs`: its connection settings)."""
    return web.Server(Api(daemon), **kwargs)


def answer(status: int, payload: dict[str, Any], **headers: str) -> web.Response:
    """A JSON response, counted by status."""
    metrics.requests_with(status).inc()
    return web.Response(
        status=status,
        body=msgspec.json.encode(payload),
        content_type="application/json",
        headers=headers,
    )


async def post_signals(daemon: Daemon, request: web.BaseRequest, name: str) -> web.Response:
    """POST /v1/accounts/{account}/signals: accept records, durable before 202."""
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


async def _answer_and_close(request: web.BaseRequest, response: web.Response) -> web.Response:
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


async def healthz(daemon: Daemon, request: web.BaseRequest, name: str) -> web.Response:
    """Alive: the event loop answers."""
    return answer(200, {"status": "ok"})


async def readyz(daemon: Daemon, request: web.BaseRequest, name: str) -> web.Response:
    """Ready to accept signals: started, not draining, storage under max_disk."""
    if refusal := daemon.refusal():
        return answer(
            503, {"status": "not ready", "error": refusal}, **{"Retry-After": RETRY_AFTER}
        )
    return answer(200, {"status": "ready"})


async def get_metrics(daemon: Daemon, request: web.BaseRequest, name: str) -> web.Response:
    """Prometheus text exposition."""
    daemon.update_metrics()
    return web.Response(
        body=metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"}
    )


async def get_status(daemon: Daemon, request: web.BaseRequest, name: str) -> web.Response:
    """Per firehose: queued records and bytes, oldest age, last delivery and error, paused."""
    return answer(200, daemon.status())


async def post_replay(daemon: Daemon, request: web.BaseRequest, name: str) -> web.StreamResponse:
    """POST /v1/firehoses/{firehose}/replay: dead batches back to delivery, NDJSON progress.

    Answered only to loopback or unix-socket peers: it changes what gets delivered.
    """
    if not _local_peer(request):
        return answer(403, {"error": "replay is only answered to local clients"})
    worker = daemon.workers.get(name)
    if worker is None:
        return answer(404, {"error": "no running firehose of that name"})
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    async for manifest in worker.replay():
        await response.write(msgspec.json.encode(replay.progress(manifest)) + b"\n")
    await response.write_eof()
    return response


def _local_peer(request: web.BaseRequest) -> bool:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not isinstance(peer, tuple):  # a unix socket: guarded by its file permissions
        return True
    return ip_address(peer[0]).is_loopback
