"""Import uploads on the ingest listener (DESIGN.md §5): a file of past events, streamed
to disk, then processed like a pulled file (imports/importer.py).

    POST /v1/accounts/{account}/imports?columns=TASK   202 {"run": id} once durable
    GET  /v1/accounts/{account}/imports/{run}          the run's statuses and errors

The account's bearer token, as for signals; another account's token gets 401.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web

from firehosed.imports.importer import UploadError
from firehosed.ingest import auth
from firehosed.ingest.body import NDJSON_TYPES
from firehosed.ingest.routes import answer

if TYPE_CHECKING:
    from firehosed.ingest.app import Api

CHUNK = 1 << 20  # bytes read from the request at a time
FORMATS = {
    "text/csv": "csv",
    "application/csv": "csv",
    "application/json": "json",
    "application/avro": "avro",
    "avro/binary": "avro",
    **{mime: "ndjson" for mime in NDJSON_TYPES},
}
RETRY_AFTER = "5"


async def post_upload(api: Api, request: web.BaseRequest, name: str) -> web.Response:
    """POST /v1/accounts/{account}/imports?columns=TASK: take a file for TASK."""
    account = api.receiver.accounts.get(name)
    given = auth.bearer(request.headers.get("Authorization"))
    if not auth.authorized(account.tokens if account else None, given):
        return auth.unauthorized()
    assert api.importer is not None
    task_name = request.query.get("columns", "")
    limit = api.receiver.server.max_upload
    try:
        task = api.importer.upload_task(name, task_name)
        mime = request.content_type if "Content-Type" in request.headers else ""
        if mime and FORMATS.get(mime) != task.format:
            raise UploadError(
                415, f"import task {task_name} reads {task.format}: send its content type"
            )
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("identity", "gzip", "x-gzip"):
            raise UploadError(415, f"unsupported content encoding {encoding!r}: use gzip or none")
        if request.content_length is not None and request.content_length > limit:
            raise UploadError(413, f"upload over server.max_upload ({limit} bytes)")
        if refusal := api.receiver.refusal(name):
            return answer(503, {"error": refusal}, **{"Retry-After": RETRY_AFTER})
        idle = api.receiver.server.body_timeout
        run = await api.importer.upload(
            task_name, _chunks(request, idle), gzip=encoding != "identity", limit=limit
        )
    except UploadError as exc:
        return answer(exc.status, {"error": exc.message})
    except TimeoutError:
        return answer(408, {"error": f"no upload bytes for body_timeout ({idle:g}s)"})
    return answer(202, {"run": run.id})


async def get_run(api: Api, request: web.BaseRequest, name: str) -> web.Response:
    """GET /v1/accounts/{account}/imports/{run}: the run's statuses, counts, errors."""
    account_name, _, run = name.partition("/")
    account = api.receiver.accounts.get(account_name)
    given = auth.bearer(request.headers.get("Authorization"))
    if not auth.authorized(account.tokens if account else None, given):
        return auth.unauthorized()
    assert api.importer is not None
    document = await asyncio.to_thread(api.importer.run_document, account_name, run)
    if document is None:
        return answer(404, {"error": f"account {account_name} has no import run {run!r}"})
    return answer(200, document)


async def _chunks(request: web.BaseRequest, idle: float) -> AsyncIterator[bytes]:
    """The request body in pieces; TimeoutError when none arrives for `idle` seconds."""
    while True:
        async with asyncio.timeout(idle):
            data = await request.content.read(CHUNK)
        if not data:
            return
        yield data
