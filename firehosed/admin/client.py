"""The command line's side of the admin API: one session to the running daemon's admin
listener (`[admin] listen`), with its bearer token when one is set."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp

from firehosed.config import Config


@dataclass(frozen=True, slots=True)
class Admin:
    """An open session to the admin listener: `url(path)` for a route's URL."""

    session: aiohttp.ClientSession
    base: str

    def url(self, path: str) -> str:
        return f"{self.base}{path}"


@asynccontextmanager
async def connect(config: Config, seconds: float | None = 30.0) -> AsyncIterator[Admin]:
    """A session to `config`'s admin listener (`seconds`: the limit per request, None: none)."""
    listen = config.admin.listen
    unix = listen.removeprefix("unix:") if listen.startswith("unix:") else None
    base = "http://localhost" if unix else f"http://{listen}"
    connector = aiohttp.UnixConnector(path=unix) if unix else aiohttp.TCPConnector()
    headers = {"Authorization": f"Bearer {config.admin.token}"} if config.admin.token else {}
    async with aiohttp.ClientSession(
        connector=connector,
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=seconds),
    ) as session:
        yield Admin(session, base)
