"""The Edge: wires config -> route table, pools, pipeline; serves clients; shuts down gracefully.

Per request: normalise the host, look the route up in the precompiled table,
build an Exchange, run the pipeline chain (built once at startup), and write
the Reply with the framing the edge chooses (Content-Length when the length is
known, chunked otherwise). Nothing is parsed or configured per request.
The client protocol itself lives in edge/front/connection.py.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Coroutine
from typing import Any

import structlog
from multidict import CIMultiDict

from carousel.admin import AdminServer
from carousel.config import ConfigError
from carousel.etcd import Etcd, EtcdAuthError, EtcdError
from carousel.registry import Keys
from edge.core.config import Config
from edge.core.errors import error_reply
from edge.core.limits import ConnectionGuard
from edge.core.metrics import Metrics, access_log
from edge.core.node import Node
from edge.core.pipeline import (
    Body,
    BytesBody,
    Exchange,
    FileBody,
    FixedFields,
    Handler,
    NowHandler,
    Reply,
    chain,
    chain_now,
    load_factory,
)
from edge.core.routing import Route, RouteTable, parse_host
from edge.features import build_features
from edge.features.dos import DosDetector
from edge.features.static import StaticFiles, not_found
from edge.front.connection import ClientConnection
from edge.front.forward import ForwardProxy
from edge.front.forward.auth import check_stored
from edge.front.framing import response_head, write_reply_body
from edge.front.h2accept import H2cSniffingConnection
from edge.front.h2stream import H2Stream
from edge.front.h2stream import register_metrics as register_h2_metrics
from edge.front.links import ConnectionList
from edge.front.node import AdminActions, NodeWorker, cut_banned
from edge.front.passthrough import PassthroughListener
from edge.front.passthrough import register_metrics as register_passthrough_metrics
from edge.front.tls import CertificateStore, check_certificate, start_https
from edge.http.http1 import HOST, ParserPool, field_lines
from edge.http.request import Request
from edge.upstream.pool import UpstreamPool
from edge.upstream.proxy import ProxyHandler

log = structlog.get_logger("carousel.edge")

_NO_BODY_STATUS = frozenset({204, 304})
_PAGE_502 = b"<html><body><h1>502 Bad Gateway</h1></body></html>\n"


async def _ready(reply: Reply | None) -> Reply:
    """An answer made at once (a fixed one, a redirect), as the async chain's terminal gives it."""
    assert reply is not None
    return reply


def check_config(config: Config, file: str = "<config>") -> Config:
    """The config checks that need the parts the edge builds, as file/key errors: each
    certificate loads and matches its key (front/tls.py), each proxy user's stored password
    parses (front/forward/auth.py), each user feature imports (core/pipeline.py)."""
    for i, cert in enumerate(config.tls.certificate):
        problem = check_certificate(cert.cert_file, cert.key_file)
        if problem:
            sub, _, message = problem.partition(": ") if ": " in problem else ("", "", problem)
            raise ConfigError(file, ".".join(p for p in (f"tls.certificate[{i}]", sub) if p), message)
    for name, stored in config.forward.users.items():
        problem = check_stored(stored)
        if problem:
            raise ConfigError(file, "forward.users", f"{name}: {problem}")
    for i, spec in enumerate(config.edge.features):
        try:
            load_factory(spec)
        except ValueError as exc:
            raise ConfigError(file, f"edge.features[{i}]", str(exc)) from None
    return config


class Edge:
    """One edge server process (one worker)."""

    def __init__(self, config: Config, *, worker: int = 0, node: Node | None = None) -> None:
        self.config = config
        self.worker = worker
        # workers > 1: what the node's workers share (edge/core/node.py); None for one worker.
        self.node = node
        self.routes = RouteTable(config.route)
        self.etcd: Etcd | None = None
        # etcd holds the registry (pools with a service) and the cluster's DoS bans.
        cluster_bans = config.dos.enabled and config.dos.cluster
        if any(p.service for p in config.pool.values()) or cluster_bans:
            self.etcd = Etcd(config.etcd)
        keys = Keys(config.etcd.prefix)
        self.pools = {
            name: UpstreamPool(name, pc, self.etcd, keys, config.snapshot) for name, pc in config.pool.items()
        }
        self.metrics = Metrics(self._metric_state)
        self.guard = ConnectionGuard(
            config.edge.max_connections,
            config.edge.max_connections_per_ip,
            node.clients if node is not None else None,
        )
        self.guard.register_metrics(self.metrics.registry)
        self.static = StaticFiles()
        self.proxy = ProxyHandler(config, self.pools, self.metrics)
        self.features = build_features(config, self)
        self.handle: Handler = chain(self.features, self._terminal)
        self.handle_now: NowHandler = chain_now(self.features, self._terminal_now)
        # TLS termination (edge/front/tls.py) and passthrough (edge/front/passthrough.py) listeners.
        self.certificates = (
            CertificateStore(config.tls, h2=config.http2.enabled) if config.tls.certificate else None
        )
        self.passthrough = [PassthroughListener(self, pc) for pc in config.passthrough]
        register_passthrough_metrics(self.metrics.registry, self.passthrough)
        register_h2_metrics(self.metrics.registry)
        self.tls_port = 0
        self._tls_listener: asyncio.Server | None = None
        self._background: set[asyncio.Task[None]] = set()
        # Set by main: called when the edge cannot go on (etcd refused its credentials).
        self.on_fatal: Any = None
        self.fatal: str | None = None
        self.connections: ConnectionList[Any] = ConnectionList()  # HTTP/1.1 and HTTP/2
        self.parsers = ParserPool(max_headers=config.edge.max_headers, max_field=config.edge.max_header_size)
        self.draining = False
        # Set by start(): asyncio.get_running_loop() is a getpid(2) per call (CPython 3.11).
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port = 0
        self.admin_port = 0
        self._listener: asyncio.Server | None = None
        self._admin: AdminServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = time.time()
        self._max_requests = config.edge.max_requests_per_connection
        # The Server line on every response (checked for CR/LF once, here).
        self._server = field_lines([("Server", config.edge.server_header)]).encode("latin-1", "replace")
        self._access_log = config.edge.access_log
        self._hosts: dict[str, str] = {}
        self._fixed: dict[int, tuple[BytesBody, FixedFields]] = {}  # respond routes, by id
        # The forward proxy (edge/front/forward/): a listener of its own with its own chain.
        self.forward = ForwardProxy(self) if config.forward.enabled else None
        # --- one node, one view (edge/front/node.py) ---
        self._dos = next((f for f in self.features if isinstance(f, DosDetector)), None)
        if self._dos is not None:
            self._dos.on_cut.append(cut_banned(self, self._dos))
        self.node_worker = NodeWorker(self, node) if node is not None else None

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a coroutine as a tracked task (shutdown waits for these)."""
        task = (self.loop or asyncio.get_running_loop()).create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- serving ------------------------------------------------------------------------

    def _terminal_now(self, ex: Exchange) -> Reply | None:
        """Fixed responses, redirects and static answers from memory need no waiting; pools
        and static files sent from a descriptor do (None)."""
        kind = ex.route.kind
        if kind == "pool":
            return None
        if kind == "static":
            return self.static.answer(ex, False)  # Static.now, without its call
        cfg = ex.route.config
        if kind == "redirect":
            assert cfg.redirect is not None
            location = cfg.redirect.replace("{host}", ex.host).replace("{path}", ex.request.raw_path)
            return Reply(cfg.redirect_status, CIMultiDict({"Location": location}))
        assert cfg.respond is not None
        fixed = self._fixed.get(id(ex.route))
        if fixed is None:
            fixed = self._fixed[id(ex.route)] = (
                BytesBody(cfg.body.encode()),
                FixedFields((("Content-Type", cfg.content_type),)),
            )
        # The body and the serialised Content-Type are made once per route: nothing per request
        # but the Reply (a feature that reads its headers gets them merged, as for a cache hit).
        return Reply(cfg.respond, None, fixed[0], stored=fixed[1])

    def _terminal(self, ex: Exchange) -> Awaitable[Reply]:
        # The terminal's own awaitable, with no coroutine of the Edge's around it.
        kind = ex.route.kind
        if kind == "pool":
            return self.proxy(ex)
        if kind == "static":
            return self.static(ex)
        return _ready(self._terminal_now(ex))

    def answer_now(self, request: Request) -> Coroutine[Any, Any, None] | None:
        """Answer a complete request; None when done, or what is left to await.

        Called from the connection's data_received: when the pipeline can answer
        without waiting (``now``, see edge/core/pipeline.py) the reply is written here,
        with no task; otherwise the rest becomes a coroutine for the connection.
        """
        head = request.head
        raw_host = head.headers.get(HOST, "")
        host = self._hosts.get(raw_host)
        if host is None:
            host = parse_host(raw_host)
            if host is None:
                # RFC 9110 7.2: a Host that is not a host[:port] is answered 400; the edge
                # never routes, keys or forwards on a value it cannot normalise.
                bad = error_reply(400)
                bad.close_connection = True
                return self._send(request, None, None, bad)
            if len(self._hosts) < 1024:  # bounded: Host values are client-chosen
                self._hosts[raw_host] = host
        route = self.routes.find(host, head.path, head.method)
        if route is None:
            # Counted by the DoS detector too: a flood of unknown hosts is still a flood.
            refused = self._dos.unrouted(request) if self._dos is not None else None
            return self._send(request, None, None, refused or not_found())
        ex = Exchange(request, route, host, request.remote, request.conn.scheme)
        try:
            reply = self.handle_now(ex)
        except Exception:
            log.exception("request failed", route=route.name, path=request.path)
            reply = error_reply(500)
        if reply is None:
            return self._answer_later(request, route, ex)
        return self._send(request, route, ex, reply)

    async def _answer_later(self, request: Request, route: Route, ex: Exchange) -> None:
        if request.version == "HTTP/1.1":  # HTTP/1.0 has no 1xx (RFC 9110 15.2)
            ex.send_interim = request.send_interim
        try:
            reply = await self.handle(ex)
        except Exception:
            log.exception("request failed", route=route.name, path=request.path)
            reply = error_reply(500)
        rest = self._send(request, route, ex, reply)
        if rest is not None:
            await rest

    def _send(
        self, request: Request, route: Route | None, ex: Exchange | None, reply: Reply
    ) -> Coroutine[Any, Any, None] | None:
        """Frame and write a reply; a body that must be streamed comes back as a coroutine."""
        conn = request.conn
        if type(conn) is H2Stream:
            # An HTTP/2 stream frames its reply itself (edge/front/h2stream.py); the rest is shared.
            return conn.respond(
                reply,
                route.extra_headers if route else (),
                lambda: self._done(request, route, ex, reply, True),
            )
        keep_alive = (
            request.head.keep_alive
            and not reply.close_connection
            and not self.draining
            and conn.requests < self._max_requests
        )
        transport = conn.transport
        if transport is not None:
            body = reply.body
            method = request.head.method
            try:
                head = response_head(
                    reply,
                    method,
                    request.head.version,
                    body.length,
                    keep_alive,
                    route.extra_headers if route else (),
                    self._server,
                )
            except ValueError:
                log.warning("response with a forbidden header value", path=request.path)
                error = Reply(502, CIMultiDict({"Content-Type": "text/html"}))
                head = conn.send_head(request, error, len(_PAGE_502), False, (), self._server)
                transport.write(head + _PAGE_502)
                keep_alive = False
            else:
                if reply.tunnel is not None:
                    conn.become_tunnel(reply.tunnel, head, reply.tunnel_head)
                elif method == "HEAD" or reply.status in _NO_BODY_STATUS:
                    transport.write(head)
                elif type(body) is BytesBody:
                    data = body.data
                    # One write when small (write_whole, inlined: the usual answer's path).
                    if len(data) < 16384:
                        transport.write(head + data)
                    else:
                        transport.writelines((head, data))
                elif type(body) is FileBody and body.length:
                    # A file (a static one past the in-memory size): the head, then sendfile(2)
                    # for what the socket takes now; a task only for a rest that must wait
                    # (a task per answer was most of a 100 KiB static file's CPU over a 1 KiB one's).
                    transport.write(head)
                    sent = body.send_now(transport)
                    if sent < body.length:
                        rest = body.rest(sent) if sent >= 0 else body
                        return self._stream(request, route, ex, reply, b"", keep_alive, rest)
                else:
                    return self._stream(request, route, ex, reply, head, keep_alive)
        self._done(request, route, ex, reply, keep_alive)
        return None

    async def _stream(
        self,
        request: Request,
        route: Route | None,
        ex: Exchange | None,
        reply: Reply,
        head: bytes,
        keep_alive: bool,
        body: Body | None = None,
    ) -> None:
        """Write the body that must wait (``body``: what is left of it, the head already out)."""
        try:
            await write_reply_body(request.conn, head, body or reply.body, path=request.path)
        finally:
            self._done(request, route, ex, reply, keep_alive)

    def _done(
        self, request: Request, route: Route | None, ex: Exchange | None, reply: Reply, keep_alive: bool
    ) -> None:
        """After the reply went out (or failed): free its body, count it, log it."""
        body = reply.body
        if type(body) is not BytesBody:  # bytes in memory hold nothing to free
            body.close()
        if not keep_alive and reply.tunnel is None:
            request.conn.close()
        route_name = route.name if route is not None else "-"
        # metrics.count_request, inlined: one call less per answer.
        counts = self.metrics.request_counts
        key = (route_name, reply.status)
        counts[key] = counts.get(key, 0) + 1
        if self._access_log:
            self._log_access(request, reply, ex, route_name)

    def _log_access(self, request: Request, reply: Reply, ex: Exchange | None, route: str) -> None:
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
        return {"connections": len(self.connections), "pools": self.pools}

    def status(self) -> dict[str, Any]:
        """/status: this edge's, or with workers > 1 the node's (edge/front/node.py)."""
        if self.node_worker is not None:
            return self.node_worker.status()
        return self.local_status()

    def local_status(self) -> dict[str, Any]:
        """This worker's listener, routes, pools and members."""
        return {
            "daemon": "edge",
            "worker": self.worker,
            "port": self.port,
            "draining": self.draining,
            "uptime": round(time.time() - self._started, 1),
            "connections": len(self.connections),
            "routes": [
                {"name": r.name, "kind": r.kind, "hosts": r.config.hosts, "path": r.prefix}
                for r in self.routes.routes
            ],
            "pools": {name: pool.status() for name, pool in self.pools.items()},
            "security": self._security_status(),
            "forward": self.forward.status() if self.forward is not None else None,
            "cache": next(
                (f.status() for f in self.features if hasattr(f, "admin_routes") and hasattr(f, "status")),
                None,
            ),
        }

    def _security_status(self) -> dict[str, Any]:
        dos = next((f for f in self.features if isinstance(f, DosDetector)), None)
        certs = self.certificates
        g = self.guard
        return {
            "tls": None if certs is None else {"port": self.tls_port, **certs.status()},
            "passthrough": [p.status() for p in self.passthrough],
            "dos": None if dos is None else dos.status(),
            "refused_connections": dict(g.refused),
            "header_timeouts": g.header_timeouts,
        }

    def health(self) -> tuple[bool, str]:
        """/healthz: 200 while serving, 503 once shutdown has begun."""
        if self.draining:
            return False, "draining"
        if self._listener is None:
            return False, "starting"
        return True, "ok"

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self, sock: socket.socket | None = None) -> int:
        """Start pools, features, the client listeners and the admin listener; returns the client port."""
        self.loop = asyncio.get_running_loop()
        if self.etcd is not None:
            self._background_task(self._check_etcd_credentials())
        for pool in self.pools.values():
            await pool.start()
        # Features with background work (the DoS ban mirror) define start() and stop().
        for feature in self.features:
            start = getattr(feature, "start", None)
            if start is not None:
                await start()
        c = self.config.edge
        loop = asyncio.get_running_loop()
        # [http2] h2c: the plain listener also takes HTTP/2 with prior knowledge (RFC 9113 3.3).
        plain = H2cSniffingConnection if self.config.http2.h2c else ClientConnection
        if sock is not None:
            self._listener = await loop.create_server(lambda: plain(self), sock=sock, backlog=4096)
        else:
            self._listener = await loop.create_server(
                lambda: plain(self),
                c.host,
                c.port,
                reuse_address=True,
                reuse_port=c.workers > 1,
                backlog=4096,
            )
        self.port = self._listener.sockets[0].getsockname()[1]
        if self.certificates is not None:
            self._tls_listener = await start_https(self, self.certificates)
            self.tls_port = self._tls_listener.sockets[0].getsockname()[1]
            self._background_task(self.certificates.watch())
        for listener in self.passthrough:
            await listener.start()
        if self.forward is not None:
            await self.forward.start()
        nw = self.node_worker
        if nw is not None:
            nw.start()
        if self.worker == 0:
            self._admin = AdminServer(
                self.config.admin,
                status=self.status,
                health=self.health,
                registry=self.metrics.registry if nw is None else nw.registry,
                refresh=None if nw is None else nw.refresh,
            )
            # Features may serve admin routes of their own (the cache's purge API); bans,
            # unbans and reloads exist with any number of workers (edge/front/node.py).
            for feature in self.features:
                for method, path, handler in getattr(feature, "admin_routes", list)():
                    self._admin.add_route(method, path, handler)
            for method, path, handler in AdminActions(self, nw).routes():
                self._admin.add_route(method, path, handler)
            self.admin_port = await self._admin.start()
        log.info(
            "edge listening",
            port=self.port,
            tls_port=self.tls_port or None,
            passthrough_ports=[p.port for p in self.passthrough] or None,
            forward_port=self.forward.port if self.forward is not None else None,
            admin_port=self.admin_port,
            worker=self.worker,
        )
        return self.port

    def _background_task(self, coro: Coroutine[Any, Any, None]) -> None:
        # Not in _tasks: shutdown cancels these instead of waiting for them.
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _check_etcd_credentials(self) -> None:
        """Stop the edge if etcd refuses its credentials; an unreachable etcd is only reported."""
        assert self.etcd is not None
        try:
            await self.etcd.revision()
        except EtcdAuthError as exc:
            self.fatal = f"etcd refused the edge's credentials: {exc}"
            log.error("etcd refused the edge's credentials", error=str(exc))
            if self.on_fatal is not None:
                self.on_fatal()
        except EtcdError as exc:
            log.warning("etcd unreachable at startup; retrying in the background", error=str(exc))

    def reload_certificates(self, reason: str = "SIGHUP") -> None:
        """SIGHUP: reload the TLS certificates (live connections keep theirs)."""
        if self.certificates is not None:
            self.certificates.reload(reason)
        if self.node_worker is not None and reason == "SIGHUP":
            self.node_worker.noted("reload", 0.0)  # the supervisor sent SIGHUP to every worker

    async def stop(self) -> None:
        """Graceful shutdown, step by step."""
        # 1. Report "draining" on /healthz at once, so the node agent takes this
        #    edge out of DNS while we finish what is in flight. From now on every
        #    response carries "Connection: close".
        self.draining = True
        # 2. Stop accepting: close the listening socket. New connections are
        #    refused by the kernel; established ones keep going.
        if self._listener is not None:
            self._listener.close()
        if self._tls_listener is not None:
            self._tls_listener.close()
        for listener in self.passthrough:
            listener.close()
        if self.forward is not None:
            self.forward.close()
        # 3. Close idle keep-alive connections now; busy ones close after their
        #    current response (step 1 made sure of that).
        for conn in list(self.connections):
            conn.close_if_idle()
        # 4. Wait for in-flight requests up to the deadline, then cancel what is
        #    left and drop those connections.
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=self.config.edge.shutdown_timeout)
            for task in late:
                task.cancel()
            if late:
                log.warning("requests cut off at the shutdown deadline", count=len(late))
                await asyncio.gather(*late, return_exceptions=True)
        if self.forward is not None:
            await self.forward.drain()  # CONNECT tunnels get the same deadline, then are cut
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        for listener in self.passthrough:
            await listener.abort()  # TLS streams we cannot finish for the client
        if self.forward is not None:
            await self.forward.stop()
        # 5. Background work last: features' own tasks (ban mirror), certificate
        #    watch, health checks, registry watches, upstream connection pools,
        #    etcd, and the admin listener.
        for feature in self.features:
            stop = getattr(feature, "stop", None)
            if stop is not None:
                await stop()
        if self.node_worker is not None:
            await self.node_worker.stop()  # the last snapshot: this life's totals
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for pool in self.pools.values():
            await pool.stop()
        if self.etcd is not None:
            await self.etcd.close()
        if self._admin is not None:
            await self._admin.stop()
        log.info("edge stopped", worker=self.worker)
