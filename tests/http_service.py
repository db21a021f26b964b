"""A real HTTP service on 127.0.0.1 for the tests of FORWARD_URL: it records every request it receives, as received,
and answers each path as a test tells it.

    service = await HttpService().start()          # a free port; service.url is http://127.0.0.1:<port>
    service.answer("/v1/items/1", lambda request: web.json_response({"id": 1}))
    ...
    service.requests                                 # every request that reached it, in order
    await service.close()

Paths no test told it about are answered 200 `{"ok": true}`. A handler may be a plain function or a coroutine
function of the aiohttp request; `service.release` lets handlers that wait on it go (close() sets it).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDict


@dataclass
class Seen:
    """One request as it reached the service."""

    method: str
    target: str  # the path and query as they came on the request line, percent-encoding and all
    headers: CIMultiDict[str]
    body: bytes


Handler = Callable[[web.Request], Any]


class HttpService:
    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.handlers: dict[str, Handler] = {}
        self.release = asyncio.Event()  # handlers that hang wait on it
        self.changed = asyncio.Event()  # set on every request
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, port: int = 0) -> HttpService:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_route("*", r"/{tail:[\s\S]*}", self._serve)  # any path, a decoded newline too
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answer(self, path: str, handler: Handler) -> None:
        """Answer requests for `path` (the path alone, without the query) with `handler(request)`."""
        self.handlers[path] = handler

    async def close(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Seen(request.method, request.raw_path, CIMultiDict(request.headers), body))
        self.changed.set()
        handler = self.handlers.get(request.path)
        if handler is None:
            return web.json_response({"ok": True})
        answer = handler(request)
        return await answer if inspect.isawaitable(answer) else answer
