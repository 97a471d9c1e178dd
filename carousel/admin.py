"""The admin listener every daemon runs: /healthz, /metrics (Prometheus), /status (JSON).

Loopback by default. When a token is configured every request but ``GET /healthz``
must carry ``Authorization: Bearer <token>``; config validation refuses a token shorter
than 16 characters, and a listener without one unless its host is a literal
loopback IP address (``127.0.0.1``, ``::1``; a name may resolve anywhere).
Features may mount routes of their own (the edge's cache: ``POST /cache/purge``).

``/healthz`` stays open, as HAProxy's ``monitor-uri``, Vault's ``/v1/sys/health``
and Prometheus' ``/-/healthy`` are: a load balancer, Consul or the node agent
must reach it without a secret, and it tells only "ok", "starting" or
"draining". The token guards what tells more (``/metrics``, ``/status``) or
changes something (purge, bans).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import prometheus_client
from aiohttp import web

from carousel.config import AdminConfig

StatusFn = Callable[[], dict[str, Any]]
HealthFn = Callable[[], tuple[bool, str]]


def bound_port(site: web.TCPSite) -> int:
    """The port a started TCPSite listens on (useful after binding port 0)."""
    server = site._server
    sockets = getattr(server, "sockets", None)
    if not sockets:
        raise RuntimeError("site is not listening")
    return int(sockets[0].getsockname()[1])


class AdminServer:
    """A small aiohttp app on its own port; extra routes can be added before start()."""

    def __init__(
        self,
        config: AdminConfig,
        *,
        status: StatusFn | None = None,
        health: HealthFn | None = None,
        registry: prometheus_client.CollectorRegistry = prometheus_client.REGISTRY,
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        # Awaited before /metrics and /status: a daemon with several workers gathers their figures.
        self._refresh = refresh
        self._status = status
        self._health = health
        self._registry = registry
        self.app = web.Application(middlewares=[self._auth])
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/status", self._status_json)
        self._runner: web.AppRunner | None = None
        self.port = 0

    def add_route(
        self,
        method: str,
        path: str,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> None:
        """Add a route (e.g. the edge's purge API) before start()."""
        self.app.router.add_route(method, path, handler)

    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        token = self.config.token
        if token and not (request.path == "/healthz" and request.method in ("GET", "HEAD")):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return web.json_response({"error": "unauthorized"}, status=401)
        return await handler(request)

    async def _healthz(self, request: web.Request) -> web.Response:
        ok, detail = self._health() if self._health else (True, "ok")
        return web.Response(status=200 if ok else 503, text=detail + "\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        if self._refresh is not None:
            await self._refresh()
        body = prometheus_client.generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    async def _status_json(self, request: web.Request) -> web.Response:
        if self._refresh is not None:
            await self._refresh()
        return web.json_response(self._status() if self._status else {})

    async def start(self) -> int:
        """Bind and serve; returns the bound port (useful with port 0)."""
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, reuse_address=True)
        await site.start()
        self.port = bound_port(site)
        return self.port

    async def stop(self) -> None:
        """Close the listener and its connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
