"""Bearer-token authentication per account, in constant time.

Every configured token of the account is compared (no early exit), and an unknown
account is compared against a dummy token, so timing tells nothing about which
accounts or tokens exist.
"""

from __future__ import annotations

import hmac

from aiohttp import web

from firehosed.ingest.routes import answer

_DUMMY = [b"\0" * 32]


def bearer(header: str | None) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode("utf-8", "surrogateescape")


def authorized(tokens: list[bytes] | None, given: bytes | None) -> bool:
    """Whether `given` is one of `tokens` (None: unknown account, always False)."""
    ok = False
    for token in tokens or _DUMMY:
        ok |= hmac.compare_digest(token, given or b"")
    return ok and tokens is not None and given is not None


def unauthorized() -> web.Response:
    """401: the token is missing, wrong, or for another (or no) account."""
    return answer(
        401,
        {"error": "missing or invalid bearer token for this account"},
        **{"WWW-Authenticate": 'Bearer realm="firehosed"'},
    )
