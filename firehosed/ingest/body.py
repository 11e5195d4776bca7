"""Request bodies: size limits, gzip, content types, and splitting into records.

Everything here runs before any record is looked at, and every failure is a BodyError
carrying the HTTP status and message the client gets (DESIGN.md §5).
"""

from __future__ import annotations

import asyncio
import zlib

import msgspec
from aiohttp import web

from firehosed.envelope import braced

JSON_TYPES = frozenset({"", "application/json", "text/json"})
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl"})
_BOM = b"\xef\xbb\xbf"
_records = msgspec.json.Decoder(list[msgspec.Raw])
_record = msgspec.json.Decoder(msgspec.Raw)
# A gzip body is inflated in a worker thread above this many bytes (compressed): a big
# one takes milliseconds to seconds of CPU that the event loop owes other clients.
GUNZIP_IN_THREAD = 1 << 14
# At most this many gzip members per body: each costs an inflater, and a body of empty
# 20-byte members is all overhead (10 MiB of them: half a million inflaters).
MAX_GZIP_MEMBERS = 10_000
# A member is fed in pieces from this size, doubling up to the last (bytes).
_FIRST_PIECE = 256
_LAST_PIECE = 1 << 20


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
        return await _inflated(body, max_body) if encoding != "identity" else body
    chunks = []
    size = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > max_body:
            raise BodyError(413, f"body is over max_body ({max_body} bytes)")
        chunks.append(chunk)
    body = b"".join(chunks)
    return await _inflated(body, max_body) if encoding != "identity" else body


async def _inflated(data: bytes, max_body: int) -> bytes:
    """`gunzip(data)`, in a worker thread when the body is big."""
    if len(data) > GUNZIP_IN_THREAD:
        return await asyncio.to_thread(gunzip, data, max_body)
    return gunzip(data, max_body)


def gunzip(data: bytes, max_body: int) -> bytes:
    """Inflate at most `max_body` bytes: a gzip bomb stops there (413).

    A body may be several gzip members one after another (`cat a.gz b.gz`, one member per
    record), at most MAX_GZIP_MEMBERS (400 past it). Time is linear in the body: each
    member is fed from a memoryview in pieces that grow while it lasts, so finishing one
    copies at most its last piece, never the rest of the body (a million empty members
    once cost minutes here).
    """
    view = memoryview(data)
    out = bytearray()
    offset = members = 0
    while True:
        members += 1
        if members > MAX_GZIP_MEMBERS:
            raise BodyError(
                400, f"gzip body has more than {MAX_GZIP_MEMBERS} gzip members: send one stream"
            )
        offset = _inflate_member(view, offset, out, max_body)
        if _only_padding(view[offset:]):
            return bytes(out)


def _only_padding(rest: memoryview) -> bool:
    """Whether `rest` is empty or zero bytes, which gzip readers allow after the last member.

    Copied at most once per body: no member starts with a zero byte, so when this is
    False for a rest that starts with one, the next member fails at once.
    """
    return not rest or (rest[0] == 0 and not rest.tobytes().strip(b"\0"))


def _inflate_member(view: memoryview, offset: int, out: bytearray, max_body: int) -> int:
    """Inflate the gzip member at `offset` onto `out`; the offset just past it."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    piece = _FIRST_PIECE
    while True:
        chunk = view[offset : offset + piece]
        if not chunk:
            raise BodyError(400, "corrupt gzip body: truncated")
        try:
            # Below this limit the whole chunk is consumed (no unconsumed_tail to track).
            inflated = inflater.decompress(chunk, max_body + 1 - len(out))
        except zlib.error as exc:
            raise BodyError(400, f"corrupt gzip body: {exc}") from None
        out += inflated
        if len(out) > max_body:
            raise BodyError(413, f"body inflates past max_body ({max_body} bytes)")
        if inflater.eof:
            return offset + len(chunk) - len(inflater.unused_data)
        offset += len(chunk)
        piece = min(piece * 2, _LAST_PIECE)


def quick_split(body: bytes, kind: str) -> list[bytes] | None:
    """The records of the usual NDJSON body, an object on every line, ASCII, in a few
    C passes (on the event loop: a thread hop costs more); None for any other body,
    which `split` takes (in a thread when it is big)."""
    if kind != "ndjson" or not body.isascii():
        return None
    lines = body.split(b"\n")
    if not lines[-1]:
        lines.pop()
    return lines if lines and braced(lines) else None


def split(body: bytes, kind: str) -> list[bytes]:
    """The body's records as raw JSON bytes; 400 when the body is not parseable at all."""
    if body.startswith(_BOM):
        body = body[len(_BOM) :]
    if not body.strip():
        raise BodyError(400, "empty body: send a JSON object, an array of objects, or NDJSON")
    if not body.isascii():  # (a scan, where decoding would also build a str)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BodyError(400, f"body is not valid UTF-8 (byte {exc.start})") from None
    if kind == "ndjson":
        lines = body.split(b"\n")
        if not lines[-1]:
            lines.pop()  # the newline ending the last line
        if braced(lines):  # no blank line (the usual body): nothing to drop
            return lines
        return [line for line in lines if line and not line.isspace()]
    try:
        if body.lstrip()[:1] == b"[":
            return [bytes(raw) for raw in _records.decode(body)]
        return [bytes(_record.decode(body))]
    except msgspec.DecodeError as exc:
        raise BodyError(400, f"invalid JSON: {exc}") from None
    except RecursionError:
        raise BodyError(400, "invalid JSON: nested too deeply") from None
