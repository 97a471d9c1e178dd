"""The Edge: wires config -> route table, pools, pipeline; serves clients; shuts down gracefully.

Per request: normalise the host, look the route up in the precompiled table,
build an Exchange, run the pipeline chain (built once at startup), and write
the Reply with the framing the edge chooses (Content-Length when the length is
known, chunked otherwise). Nothing is parsed or configured per request.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any, cast

import structlog
from aiohttp import web
from multidict import CIMultiDict

from carousel.admin import AdminServer
from carousel.etcd import Etcd
from carousel.registry import Keys
from edge.config import Config
from edge.errors import error_reply
from edge.metrics import Metrics, access_log
from edge.pipeline import BytesBody, Exchange, Handler, Reply, build_features, chain
from edge.pool import UpstreamPool
from edge.proxy import ProxyHandler
from edge.routing import RouteTable, normalize_host
from edge.static import StaticFiles, not_found

log = structlog.get_logger("carousel.edge")


def _forget_exchange(response: web.StreamResponse, request: web.BaseRequest | None) -> None:
    """Drop what a finished request/response pair holds.

    aiohttp's connection loop keeps its last request and response in local
    variables while the connection idles, so without this every idle
    keep-alive connection would also pin its last headers and body (kilobytes
    each, times 10,000 idle clients). Nothing reads them after write_eof.
    """
    response._headers.clear()
    if isinstance(response, web.Response):
        response._body = None
    if request is not None:
        request._cache.clear()
        request._message = request._headers = request._rel_url = None  # type: ignore[assignment]


class _LeanResponse(web.Response):
    """A web.Response that lets go of its contents once sent."""

    async def write_eof(self, data: bytes = b"") -> None:
        request = self._req
        await super().write_eof(data)
        _forget_exchange(self, request)


class _LeanStreamResponse(web.StreamResponse):
    """A web.StreamResponse that lets go of its contents once sent."""

    async def write_eof(self, data: bytes = b"") -> None:
        request = self._req
        await super().write_eof(data)
        _forget_exchange(self, request)


class Edge:
    """One edge server process (one worker)."""

    def __init__(self, config: Config, *, worker: int = 0) -> None:
        self.config = config
        self.worker = worker
        self.routes = RouteTable(config.route)
        self.etcd: Etcd | None = None
        if any(p.service for p in config.pool.values()):
            self.etcd = Etcd(config.etcd)
        keys = Keys(config.etcd.prefix)
        self.pools = {name: UpstreamPool(name, pc, self.etcd, keys) for name, pc in config.pool.items()}
        self.metrics = Metrics(self._metric_state)
        self.static = StaticFiles()
        self.proxy = ProxyHandler(config, self.pools, self.metrics)
        self.features = build_features(config, self)
        self.handle: Handler = chain(self.features, self._terminal)
        self.draining = False
        self.port = 0
        self.admin_port = 0
        self._server: web.Server | None = None
        self._runner: web.ServerRunner | None = None
        self._sites: list[web.BaseSite] = []
        self._admin: AdminServer | None = None
        self._started = time.time()
        self._max_requests = config.edge.max_requests_per_connection
        self._server_header = config.edge.server_header
        self._access_log = config.edge.access_log
        self._hosts: dict[str, str] = {}

    # --- serving ------------------------------------------------------------------------

    async def _terminal(self, ex: Exchange) -> Reply:
        kind = ex.route.kind
        if kind == "pool":
            return await self.proxy(ex)
        if kind == "static":
            return await self.static(ex)
        cfg = ex.route.config
        if kind == "redirect":
            assert cfg.redirect is not None
            location = cfg.redirect.replace("{host}", ex.host).replace("{path}", ex.request.raw_path)
            return Reply(cfg.redirect_status, CIMultiDict({"Location": location}))
        assert cfg.respond is not None
        return Reply(
            cfg.respond,
            CIMultiDict({"Content-Type": cfg.content_type}),
            BytesBody(cfg.body.encode()),
        )

    async def _handle_request(self, request: web.BaseRequest) -> web.StreamResponse:
        raw_host = request.host
        host = self._hosts.get(raw_host)
        if host is None:
            host = normalize_host(raw_host)
            if len(self._hosts) < 1024:  # bounded: Host values are client-chosen
                self._hosts[raw_host] = host
        route = self.routes.find(host, request.path, request.method)
        if route is None:
            reply = not_found()
            ex = None
        else:
            # The peer address is only looked up where something uses it.
            peer = request.remote or "" if route.kind == "pool" or self._access_log else ""
            ex = Exchange(request, route, host, peer, "http")
            try:
                reply = await self.handle(ex)
            except Exception:
                log.exception("request failed", route=route.name, path=request.path)
                reply = error_reply(500)
        resp = await self._write(request, reply, route.extra_headers if route else ())
        protocol = request.protocol
        if reply.close_connection:
            # Send it now and close: waiting for the rest of an unwanted body (aiohttp's
            # lingering close) would let a stalled client hold the connection.
            resp.force_close()
            await resp.prepare(request)
            await resp.write_eof()
            protocol.force_close()
        elif getattr(protocol, "_request_count", 0) >= self._max_requests or self.draining:
            resp.force_close()
        route_name = route.name if route is not None else "-"
        self.metrics.count_request(route_name, reply.status)
        if self._access_log:
            self._log_access(request, reply, ex, route_name)
        return resp

    async def _write(
        self,
        request: web.BaseRequest,
        reply: Reply,
        extra: tuple[tuple[str, str], ...],
    ) -> web.StreamResponse:
        """Turn a Reply into an aiohttp response, re-framed by the edge."""
        if reply.raw is not None:
            return reply.raw
        headers = reply.headers
        headers["Server"] = self._server_header
        for name, value in extra:
            headers[name] = value
        body = reply.body
        if type(body) is BytesBody:
            return web.Response(status=reply.status, reason=reply.reason, headers=headers, body=body.data)
        resp = web.StreamResponse(status=reply.status, reason=reply.reason, headers=headers)
        if body.length is not None:
            resp.content_length = body.length
        prepared = False
        try:
            await resp.prepare(request)
            prepared = True
            # HEAD, 204 and 304 carry no body, whatever the body object says.
            if request.method != "HEAD" and reply.status not in (204, 304):
                await body.write_to(resp, request)
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:
            if not prepared:
                raise
            # Headers are gone: the only honest signal left is an aborted connection.
            log.warning("response aborted mid-body", path=request.path, error=str(exc))
            if request.transport is not None:
                request.transport.abort()
        finally:
            body.close()
        return resp

    def _log_access(self, request: web.BaseRequest, reply: Reply, ex: Exchange | None, route: str) -> None:
        now = time.monotonic()
        length = reply.body.length
        fields: dict[str, Any] = {
            "method": request.method,
            "host": request.host,
            "path": request.path,
            "status": reply.status,
            "bytes": length if length is not None else -1,
            "route": route,
            "client": request.remote,
        }
        if ex is not None:
            fields.update(
                client=ex.client_ip,
                member=ex.member or None,
                ms=round((now - ex.started) * 1000, 2),
                upstream_ms=round(ex.upstream_seconds * 1000, 2),
                queue_ms=round(ex.queue_seconds * 1000, 2),
                tries=ex.tries,
                cache=ex.cache_status or None,
            )
        access_log.info("access", **fields)

    # --- admin --------------------------------------------------------------------------

    def _metric_state(self) -> dict[str, Any]:
        return {
            "connections": len(self._server.connections) if self._server else 0,
            "pools": self.pools,
        }

    def status(self) -> dict[str, Any]:
        """/status: listener, routes, pools and members."""
        return {
            "daemon": "edge",
            "worker": self.worker,
            "port": self.port,
            "draining": self.draining,
            "uptime": round(time.time() - self._started, 1),
            "connections": len(self._server.connections) if self._server else 0,
            "routes": [
                {"name": r.name, "kind": r.kind, "hosts": r.config.hosts, "path": r.prefix}
                for r in self.routes.routes
            ],
            "pools": {name: pool.status() for name, pool in self.pools.items()},
        }

    def health(self) -> tuple[bool, str]:
        """/healthz: 200 while serving, 503 once shutdown has begun."""
        if self.draining:
            return False, "draining"
        if self._server is None:
            return False, "starting"
        return True, "ok"

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self, sock: socket.socket | None = None) -> int:
        """Start pools, the client listener and the admin listener; returns the client port."""
        for pool in self.pools.values():
            await pool.start()
        c = self.config.edge
        self._server = web.Server(
            self._handle_request,
            access_log=None,
            keepalive_timeout=c.keepalive_timeout,
            max_line_size=c.max_header_size,
            max_field_size=c.max_header_size,
            max_headers=c.max_headers,
        )
        self._runner = web.ServerRunner(self._server, handle_signals=False)
        await self._runner.setup()
        site: web.BaseSite
        if sock is not None:
            site = web.SockSite(self._runner, sock)
        else:
            site = web.TCPSite(self._runner, c.host, c.port, reuse_address=True, reuse_port=c.workers > 1)
        await site.start()
        self._sites.append(site)
        server = cast(asyncio.Server, site._server)
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]
        if self.worker == 0:
            self._admin = AdminServer(
                self.config.admin,
                status=self.status,
                health=self.health,
                registry=self.metrics.registry,
            )
            self.admin_port = await self._admin.start()
        log.info("edge listening", port=self.port, admin_port=self.admin_port, worker=self.worker)
        return self.port

    async def stop(self) -> None:
        """Graceful shutdown, step by step."""
        # 1. Report "draining" on /healthz at once, so the node agent takes this
        #    edge out of DNS while we finish what is in flight.
        self.draining = True
        # 2. Stop accepting: close the listening sockets. New connections are
        #    refused by the kernel; established ones keep going.
        for site in self._sites:
            await site.stop()
        self._sites.clear()
        server = self._server
        if server is not None:
            # 3. Ask every connection to close after its current response. Idle
            #    keep-alive connections close now; busy ones answer with
            #    "Connection: close" and then close.
            server.pre_shutdown()
            # 4. Wait for in-flight requests up to the deadline; past it the
            #    remaining handlers are cancelled and their connections closed.
            await server.shutdown(self.config.edge.shutdown_timeout)
        if self._runner is not None:
            await self._runner.cleanup()
        # 5. Background work last: health checks, registry watches, upstream
        #    connection pools, etcd, and the admin listener.
        for pool in self.pools.values():
            await pool.stop()
        if self.etcd is not None:
            await self.etcd.close()
        if self._admin is not None:
            await self._admin.stop()
        log.info("edge stopped", worker=self.worker)
