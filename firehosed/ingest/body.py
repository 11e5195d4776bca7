"""Request bodies: size limits, gzip, content types, and splitting into records.

Everything here runs before any record is looked at, and every failure is a BodyError
carrying the HTTP status and message the client gets (DESIGN.md §5).
"""

from __future__ import annotations

import asyncio
import zlib

import msgspec
from aiohttp import web

JSON_TYPES = frozenset({"", "application/json", "text/json"})
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl"})
_BOM = b"\xef\xbb\xbf"
_records = msgspec.json.Decoder(list[msgspec.Raw])
_record = msgspec.json.Decoder(msgspec.Raw)


class BodyError(Exception):
    """The request body cannot be taken; `status` and `message` go back to the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def content_kind(request: web.BaseRequest) -> str:
    """ "json" or "ndjson" from Content-Type; 415 for anything else."""
    mime = request.content_type if "Content-Type" in request.headers else ""
    charset = request.charset
    if charset and charset.lower() not in ("utf-8", "utf8"):
        raise BodyError(415, f"unsupported charset {charset!r}: send UTF-8")
    if mime in JSON_TYPES:
        return "json"
    if mime in NDJSON_TYPES:
        return "ndjson"
    raise BodyError(
        415, f"unsupported content type {mime!r}: use application/json or application/x-ndjson"
    )


async def read(request: web.BaseRequest, max_body: int) -> bytes:
    """The body, gunzipped if needed, never more than `max_body` bytes (413)."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", "x-gzip"):
        raise BodyError(415, f"unsupported content encoding {encoding!r}: use gzip or none")
    if request.content_length is not None and request.content_length > max_body:
        raise BodyError(
            413, f"body of {request.content_length} bytes is over max_body ({max_body})"
        )
    if request.content_length is not None:  # the usual case: one read, no chunk loop
        try:
            body = await request.content.readexactly(request.content_length)
        except asyncio.IncompleteReadError:
            raise BodyError(400, "body shorter than its Content-Length") from None
        return gunzip(body, max_body) if encoding != "identity" else body
    chunks = []
    size = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > max_body:
            raise BodyError(413, f"body is over max_body ({max_body} bytes)")
        chunks.append(chunk)
    body = b"".join(chunks)
    if encoding != "identity":
        body = gunzip(body, max_body)
    return body


def gunzip(data: bytes, max_body: int) -> bytes:
    """Inflate at most `max_body` bytes: a gzip bomb stops there (413).

    A body may be several gzip members one after another (`cat a.gz b.gz`, pigz).
    """
    out = bytearray()
    while True:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out += inflater.decompress(data, max_body + 1 - len(out))
        except zlib.error as exc:
            raise BodyError(400, f"corrupt gzip body: {exc}") from None
        if len(out) > max_body:
            raise BodyError(413, f"body inflates past max_body ({max_body} bytes)")
        if not inflater.eof:
            raise BodyError(400, "corrupt gzip body: truncated")
        data = inflater.unused_data
        if not data.strip(b"\0"):  # trailing zero padding is allowed by gzip readers
            return bytes(out)


def split(body: bytes, kind: str) -> list[bytes]:
    """The body's records as raw JSON bytes; 400 when the body is not parseable at all."""
    if body.startswith(_BOM):
        body = body[len(_BOM) :]
    if not body.strip():
        raise BodyError(400, "empty body: send a JSON object, an array of objects, or NDJSON")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(400, f"body is not valid UTF-8 (byte {exc.start})") from None
    if kind == "ndjson":
        return [line for line in body.split(b"\n") if line.strip()]
    try:
        if body.lstrip()[:1] == b"[":
            return [bytes(raw) for raw in _records.decode(body)]
        return [bytes(_record.decode(body))]
    except msgspec.DecodeError as exc:
        raise BodyError(400, f"invalid JSON: {exc}") from None
    except RecursionError:
        raise BodyError(400, "invalid JSON: nested too deeply") from None
