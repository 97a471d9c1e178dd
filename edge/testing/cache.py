"""Helpers for cache tests and benchmarks: a scripted origin and an edge in front of it.

``ScriptedOrigin`` is a real aiohttp server on a free loopback port; a test
says what each path answers (``on(path, handler)``) and reads what reached it
(``seen(path)``: the requests, with their headers, in order).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDictProxy

from edge.front.server import Edge
from edge.testing import running_edge

OriginHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class SeenRequest:
    """A request as the origin received it."""

    method: str
    path_qs: str
    headers: CIMultiDictProxy[str]


class ScriptedOrigin:
    """An origin whose answers each test scripts, and which remembers every request."""

    def __init__(self) -> None:
        self.handlers: dict[str, OriginHandler] = {}
        self.requests: list[SeenRequest] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    def on(self, path: str, handler: OriginHandler) -> None:
        self.handlers[path] = handler

    def reply(self, path: str, body: bytes | str = b"ok", status: int = 200, **headers: str) -> None:
        """A fixed answer; header names use '_' for '-' (cache_control=...)."""
        payload = body.encode() if isinstance(body, str) else body
        fixed = {k.replace("_", "-"): v for k, v in headers.items()}

        async def handler(request: web.Request) -> web.Response:
            return web.Response(body=payload, status=status, headers=fixed)

        self.on(path, handler)

    def seen(self, path: str) -> list[SeenRequest]:
        return [r for r in self.requests if r.path_qs.partition("?")[0] == path]

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(SeenRequest(request.method, request.path_qs, request.headers))
        handler = self.handlers.get(request.path)
        if handler is None:
            return web.Response(status=404, text="no script for this path\n")
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1

    async def start(self) -> int:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def edge_config(origin_port: int, cache: dict[str, Any] | None = None, **route: Any) -> dict[str, Any]:
    """An edge config: one pool route to the origin, the cache on (no cluster purge)."""
    return {
        "pool": {"origin": {"members": [{"address": f"127.0.0.1:{origin_port}"}], "max_tries": 1}},
        "route": [{"path": "/", "pool": "origin", **route}],
        "cache": {"enabled": True, "cluster_purge": False, **(cache or {})},
    }


@asynccontextmanager
async def origin_and_edge(
    cache: dict[str, Any] | None = None, extra: dict[str, Any] | None = None, **route: Any
) -> AsyncIterator[tuple[ScriptedOrigin, Edge]]:
    """A scripted origin and a caching edge in front of it, both stopped afterwards."""
    origin = ScriptedOrigin()
    port = await origin.start()
    try:
        config = edge_config(port, cache, **route)
        config.update(extra or {})
        async with running_edge(config) as edge:
            yield origin, edge
    finally:
        await origin.stop()
