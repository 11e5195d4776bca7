"""The admin HTTP API (DESIGN.md §5), on its own listener (`[admin] listen`).

What operators ask (status, metrics, replay, reload, the status page, the live tail) is
answered here and only here: the ingest listener, which sources reach, answers 404 for
it. With `[admin] token` set, every route needs `Authorization: Bearer <token>`,
compared in constant time. Like the ingest API it is one low-level aiohttp handler that
dispatches on the path itself; it asks the daemon through `Operations` and never
imports it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import date
from ipaddress import ip_address
from typing import Any, Protocol

import msgspec
import structlog
from aiohttp import web

from firehosed import metrics, replay
from firehosed.admin import page, tail
from firehosed.admin.history import History
from firehosed.errors import FirehosedError
from firehosed.ingest import auth
from firehosed.ingest.app import RETRY_AFTER
from firehosed.ingest.routes import Routes, answer, get
from firehosed.queue.base import Manifest
from firehosed.tap import Tap

log = structlog.get_logger(__name__)


class Operations(Protocol):
    """What the operators' endpoints ask of the running daemon."""

    def admin_token(self) -> str | None:
        """The bearer token every admin route needs, or None."""

    def refusal(self, account: str | None = None) -> str | None:
        """Why ingest must answer 503 now, or None (readiness)."""

    def status(self) -> dict[str, Any]:
        """The `/v1/status` document."""

    def update_metrics(self) -> None:
        """Refresh the gauges read at scrape time."""

    def replay(self, firehose: str) -> AsyncIterator[Manifest] | None:
        """Dead batches of `firehose` back into delivery; None if no such firehose runs."""

    async def reload(self) -> list[str]:
        """Re-read the config file; the problems that kept it from loading (none: done)."""

    def archive_day(
        self, firehose: str, day: date, *, force: bool
    ) -> AsyncIterator[dict[str, Any]] | None:
        """Build and deliver an archive firehose's `day` now, step by step; None if no
        such firehose runs."""

    def import_run(self, run: str) -> dict[str, Any] | None:
        """An import run's statuses, counts and first errored rows; None if unknown."""


class AdminApi:
    """The admin listener's handler: token first, then the route; errors are JSON."""

    def __init__(
        self,
        operations: Operations,
        tap: Tap,
        history: History,
        idle: dict[web.RequestHandler, float] | None = None,
    ) -> None:
        self.operations = operations
        self.tap = tap
        self.page = page.Page(operations.status, history)
        self._routes = Routes(
            {
                "/": get(page.get_page),
                "/healthz": get(healthz),
                "/readyz": get(readyz),
                "/metrics": get(get_metrics),
                "/v1/status": get(get_status),
                "/v1/reload": {"POST": post_reload},
                "/v1/replay": {"POST": post_replay_all},
                "/v1/tail": {"GET": tail.get_tail},
            },
            [
                ("/v1/firehoses/", "/replay", {"POST": post_replay}),
                ("/v1/firehoses/", "/archive", {"POST": post_archive}),
                ("/v1/imports/", "", get(get_import_run)),
            ],
            idle,
        )

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        if not self._authorized(request):
            return answer(
                401,
                {"error": "missing or invalid admin bearer token"},
                **{"WWW-Authenticate": 'Bearer realm="firehosed-admin"'},
            )
        return await self._routes.dispatch(self, request)

    def _authorized(self, request: web.BaseRequest) -> bool:
        token = self.operations.admin_token()
        if token is None:
            return True
        given = auth.bearer(request.headers.get("Authorization"))
        return auth.authorized([token.encode()], given)


async def healthz(api: AdminApi, request: web.BaseRequest, name: str) -> web.Response:
    """Alive: the event loop answers."""
    return answer(200, {"status": "ok"})


async def readyz(api: AdminApi, request: web.BaseRequest, name: str) -> web.Response:
    """Ready to accept signals: started, not draining, storage under max_disk."""
    if refusal := api.operations.refusal():
        return answer(
            503, {"status": "not ready", "error": refusal}, **{"Retry-After": RETRY_AFTER}
        )
    return answer(200, {"status": "ready"})


async def get_metrics(api: AdminApi, request: web.BaseRequest, name: str) -> web.Response:
    """Prometheus text exposition."""
    api.operations.update_metrics()
    return web.Response(
        body=metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"}
    )


async def get_status(api: AdminApi, request: web.BaseRequest, name: str) -> web.Response:
    """Per firehose: queued records and bytes, oldest age, last delivery and error, paused."""
    return answer(200, api.operations.status())


async def post_reload(api: AdminApi, request: web.BaseRequest, name: str) -> web.Response:
    """POST /v1/reload: re-read the config file now; 200, or 422 with every problem."""
    problems = await api.operations.reload()
    if problems:
        return answer(422, {"reloaded": False, "errors": problems})
    return answer(200, {"reloaded": True})


async def post_replay(api: AdminApi, request: web.BaseRequest, name: str) -> web.StreamResponse:
    """POST /v1/firehoses/{firehose}/replay: dead batches back to delivery, NDJSON progress.

    Without an admin token, answered only to loopback or unix-socket peers: it changes
    what gets delivered.
    """
    if api.operations.admin_token() is None and not _local_peer(request):
        return answer(403, {"error": "replay is only answered to local clients"})
    batches = api.operations.replay(name)
    if batches is None:
        return answer(404, {"error": "no running firehose of that name"})
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    async for line in _replayed(batches):
        await response.write(msgspec.json.encode(line) + b"\n")
    await response.write_eof()
    return response


async def _replayed(batches: AsyncIterator[Manifest]) -> AsyncIterator[dict[str, Any]]:
    """A replay's progress lines: one per batch back in delivery, then an `error` line
    if it cannot go on (another process cuts the firehose; it is stopping)."""
    try:
        async for manifest in batches:
            yield replay.progress(manifest)
    except FirehosedError as exc:
        log.warning("replay.refused", error=str(exc))
        yield {"error": str(exc)}


async def get_import_run(api: AdminApi, request: web.BaseRequest, name: str) -> web.Response:
    """GET /v1/imports/{run}: any account's import run (`firehosed imports --run`)."""
    document = await asyncio.to_thread(api.operations.import_run, name)
    if document is None:
        return answer(404, {"error": f"no import run {name!r}"})
    return answer(200, document)


async def post_archive(api: AdminApi, request: web.BaseRequest, name: str) -> web.StreamResponse:
    """POST /v1/firehoses/{firehose}/archive?day=YYYY-MM-DD[&force=1]: build and deliver
    that day's archive now; NDJSON progress, an `error` line if it cannot."""
    if api.operations.admin_token() is None and not _local_peer(request):
        return answer(403, {"error": "archive is only answered to local clients"})
    try:
        day = date.fromisoformat(request.query.get("day", ""))
    except ValueError:
        return answer(400, {"error": "day must be a date, YYYY-MM-DD"})
    steps = api.operations.archive_day(name, day, force=request.query.get("force") == "1")
    if steps is None:
        return answer(404, {"error": "no running firehose of that name"})
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    async for step in steps:
        await response.write(msgspec.json.encode(step) + b"\n")
    await response.write_eof()
    return response


async def post_replay_all(api: AdminApi, request: web.BaseRequest, name: str) -> web.StreamResponse:
    """POST /v1/replay[?firehose=NAME]: every running firehose's dead batches (or one's)
    back to delivery; NDJSON progress, each line naming its firehose."""
    if api.operations.admin_token() is None and not _local_peer(request):
        return answer(403, {"error": "replay is only answered to local clients"})
    only = request.query.get("firehose")
    names = [only] if only else list(api.operations.status()["firehoses"])
    replays = [(n, api.operations.replay(n)) for n in names]
    if any(batches is None for _, batches in replays):
        return answer(404, {"error": "no running firehose of that name"})
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    for firehose, batches in replays:
        assert batches is not None
        async for line in _replayed(batches):
            await response.write(msgspec.json.encode({"firehose": firehose, **line}) + b"\n")
    await response.write_eof()
    return response


def _local_peer(request: web.BaseRequest) -> bool:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not isinstance(peer, tuple):  # a unix socket: guarded by its file permissions
        return True
    return ip_address(peer[0]).is_loopback


def build_server(
    operations: Operations,
    tap: Tap,
    history: History,
    idle: dict[web.RequestHandler, float] | None = None,
    **kwargs: Any,
) -> web.Server:
    """aiohttp's low-level server for the admin API, noting busy connections in `idle`
    (an `IdleReaper.since`); `kwargs`: its connection settings."""
    return web.Server(AdminApi(operations, tap, history, idle), **kwargs)
