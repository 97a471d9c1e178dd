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
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from carousel.config import AdminConfig

if TYPE_CHECKING:  # aiohttp (~0.2 s of CPU) and prometheus_client load when the listener starts
    import prometheus_client
    from aiohttp import web

StatusFn = Callable[[], dict[str, Any]]
HealthFn = Callable[[], tuple[bool, str]]
Handler = Callable[["web.Request"], Awaitable["web.StreamResponse"]]


def bound_port(site: web.TCPSite) -> int:
    """The port a started TCPSite listens on (useful after binding port 0)."""
    server = site._server
    sockets = getattr(server, "sockets", None)
    if not sockets:
        raise RuntimeError("site is not listening")
    return int(sockets[0].getsockname()[1])


class AdminServer:
    """A small aiohttp app on its own port; extra routes can be added before start().

    ``bind()`` takes the port at once (a taken port is an error at start-up, and
    the port is known); ``start()`` imports aiohttp and serves. dnsd binds
    first and serves once its first answer table is ready: start-up to the
    first full answer does not wait for aiohttp's import, and a health check
    that connects in between waits in the listen backlog.
    """

    def __init__(
        self,
        config: AdminConfig,
        *,
        status: StatusFn | None = None,
        health: HealthFn | None = None,
        registry: prometheus_client.CollectorRegistry | None = None,
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        # Awaited before /metrics and /status: a daemon with several workers gathers their figures.
        self._refresh = refresh
        self._status = status
        self._health = health
        self._registry = registry
        self._routes: list[tuple[str, str, Handler]] = []
        self._sock: socket.socket | None = None
        self._runner: web.AppRunner | None = None
        self.app: web.Application | None = None
        self.port = 0

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """Add a route (e.g. the edge's purge API) before start()."""
        self._routes.append((method, path, handler))

    def bind(self) -> int:
        """Take the listen port now (OSError when it is taken); returns it."""
        if self._sock is None:
            infos = socket.getaddrinfo(
                self.config.host, self.config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, kind, proto, _, address = infos[0]
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:  # as asyncio's create_server: "::" is IPv6 only
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(128)
            except OSError:
                sock.close()
                raise
            sock.setblocking(False)
            self._sock = sock
            self.port = int(sock.getsockname()[1])
        return self.port

    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        from aiohttp import web

        token = self.config.token
        if token and not (request.path == "/healthz" and request.method in ("GET", "HEAD")):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return web.json_response({"error": "unauthorized"}, status=401)
        return await handler(request)

    async def _healthz(self, request: web.Request) -> web.Response:
        from aiohttp import web

        ok, detail = self._health() if self._health else (True, "ok")
        return web.Response(status=200 if ok else 503, text=detail + "\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        import prometheus_client
        from aiohttp import web

        if self._refresh is not None:
            await self._refresh()
        body = prometheus_client.generate_latest(self._registry or prometheus_client.REGISTRY)
        return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    async def _status_json(self, request: web.Request) -> web.Response:
        from aiohttp import web

        if self._refresh is not None:
            await self._refresh()
        return web.json_response(self._status() if self._status else {})

    async def start(self) -> int:
        """Bind (unless bound) and serve; returns the bound port (useful with port 0)."""
        from aiohttp import web

        self.bind()
        assert self._sock is not None

        @web.middleware
        async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
            return await self._auth(request, handler)

        self.app = web.Application(middlewares=[auth])
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/status", self._status_json)
        for method, path, handler in self._routes:
            self.app.router.add_route(method, path, handler)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.SockSite(self._runner, self._sock)
        await site.start()
        return self.port

    async def stop(self) -> None:
        """Close the listener and its connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
