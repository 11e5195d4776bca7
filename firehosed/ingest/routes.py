"""Path dispatch for the ingest and admin listeners, without aiohttp's router.

Each API is a handful of routes: fixed paths from a dict, and paths with one variable
segment between a prefix and a suffix (`/v1/accounts/{account}/signals`). aiohttp's
Application layer (router, match info) cost a no-op handler a quarter of its throughput
here, and a middleware another seventh (bench/RESULTS-decompose.md). Every answer is
JSON, 404 and 405 included; an unexpected error is a logged 500, never a traceback.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import unquote

import msgspec
import structlog
from aiohttp import web

from firehosed import metrics
from firehosed.ingest.idle import BUSY

log = structlog.get_logger(__name__)

# Every handler gets its API object, the request and the path's variable part ("" if none).
Handler = Callable[[Any, web.BaseRequest, str], Awaitable[web.StreamResponse]]
Methods = dict[str, Handler]


def get(handler: Handler) -> Methods:
    """A GET route; HEAD too (aiohttp sends a HEAD answer without its body)."""
    return {"GET": handler, "HEAD": handler}


def answer(status: int, payload: dict[str, Any], **headers: str) -> web.Response:
    """A JSON response, counted by status."""
    metrics.requests_with(status).inc()
    return web.Response(
        status=status,
        body=msgspec.json.encode(payload),
        content_type="application/json",
        headers=headers,
    )


class Routes:
    """One API's routes: `exact` paths, and `named` (prefix, suffix, methods) ones.

    With `idle` (an `IdleReaper.since`), a connection is noted busy while its handler
    runs, for its listener's idle sweep: here, not in a wrapper of its own, since every
    coroutine layer on the request's path costs the ingest rate (bench/RESULTS-seam-ab.md).
    """

    def __init__(
        self,
        exact: dict[str, Methods],
        named: Sequence[tuple[str, str, Methods]] = (),
        idle: dict[web.RequestHandler, float] | None = None,
        pairs: Sequence[tuple[str, str, Methods]] = (),
    ) -> None:
        self._exact = exact
        self._named = tuple(named)
        self._idle = idle
        # (prefix, middle, methods): two variable segments, `prefix{a}middle{b}`; the
        # handler gets "a/b" (each part decoded; a part holding "/" does not match).
        self._pairs = tuple(pairs)

    async def dispatch(self, api: object, request: web.BaseRequest) -> web.StreamResponse:
        """Answer `request` with the handler its path and method name, given `api`."""
        connection, idle = request.protocol, self._idle
        if idle is not None:
            idle[connection] = BUSY
        try:
            methods, name = self.match(request.rel_url.raw_path)
            if methods is None:
                return answer(404, {"error": "Not Found"})
            handler = methods.get(request.method)
            if handler is None:
                return answer(405, {"error": "Method Not Allowed"}, Allow=",".join(sorted(methods)))
            return await handler(api, request, name)
        except web.HTTPException as exc:
            return answer(exc.status, {"error": exc.reason})
        except Exception:
            log.exception("http.unhandled_error", path=request.path)
            return answer(500, {"error": "internal error"})
        finally:
            if idle is not None:
                idle[connection] = time.monotonic()

    def match(self, path: str) -> tuple[Methods | None, str]:
        """The methods of `path` (percent-encoded, as sent) and its variable part, decoded:
        an encoded "/" stays inside the segment (as a name, it is just unknown)."""
        methods = self._exact.get(path)
        if methods is not None:
            return methods, ""
        for prefix, suffix, named in self._named:
            if path.startswith(prefix) and path.endswith(suffix):
                name = path[len(prefix) : len(path) - len(suffix)]
                if name and "/" not in name:
                    return named, unquote(name)
        for prefix, middle, paired in self._pairs:
            if path.startswith(prefix):
                first, found, second = path[len(prefix) :].partition(middle)
                parts = (unquote(first), unquote(second))
                if (
                    found
                    and first
                    and second
                    and not any("/" in p for p in (first, second, *parts))
                ):
                    return paired, "/".join(parts)
        return None, ""
