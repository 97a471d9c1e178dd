"""The forward-proxy listener: clients reach origins through it, never the other way round.

Theory of operation
-------------------
``ForwardProxy`` owns a listener of its own (``[forward] host/port``). Its
connections are the reverse side's ``ClientConnection`` with a parser that
accepts CONNECT's authority-form (``ForwardConnection``), so keep-alive,
pipelining, request buffering, 408/413/431, the header deadline and the
connection caps and bans at accept (the edge's ConnectionGuard) are the same
code as on the reverse side. The limits come from ``[edge]`` unless
``[forward]`` sets its own: the listener hands the connection a copy of the
config whose ``edge`` table carries them.

Per request, ``answer`` works out the destination (absolute-form ``http://``
or CONNECT ``host:port``; anything else is a 400 that says so), runs the
forward chain (edge/front/forward/chain.py: auth, destination, headers, cache) and
writes the reply: a buffered response, or for CONNECT the 200 head after
which the connection is a tunnel (edge/front/forward/tunnel.py).

The edge starts and stops this listener with its own (edge/server.py); its
connections sit in the edge's connection set, so graceful shutdown treats
them like any other: idle ones close at once, busy ones after their answer,
tunnels are cut at the deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import structlog

from edge.core.config import ForwardConfig, RouteConfig, ServerConfig
from edge.core.pipeline import BytesBody, Exchange, Handler, Reply, chain
from edge.core.routing import Route
from edge.features.dos import DosDetector
from edge.front.connection import ClientConnection
from edge.front.forward.chain import build_chain
from edge.front.forward.metrics import ForwardMetrics
from edge.front.forward.origin import OriginFetch
from edge.front.forward.pages import bad_target, page
from edge.front.forward.policy import BadTarget, DestinationPolicy, format_authority, parse_authority
from edge.front.forward.tunnel import OriginTunnel, TunnelOpen
from edge.front.framing import write_reply_body
from edge.front.links import ConnectionList
from edge.http.http1 import ParserPool
from edge.http.request import Request

if TYPE_CHECKING:
    from edge.core.config import Config
    from edge.core.limits import ConnectionGuard
    from edge.core.metrics import Metrics

log = structlog.get_logger("carousel.edge.forward")
access_log = structlog.get_logger("carousel.edge.forward.access")

_NO_BODY_STATUS = frozenset({204, 304})
_ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"


@dataclass(slots=True)
class ForwardTarget:
    """Where a request wants to go; kept in ``Exchange.notes["forward"]``."""

    host: str
    port: int
    # host[:port] as it goes in Host and on pages (brackets for IPv6; no :80 for http).
    authority: str
    tunnel: bool
    user: str = ""
    # Why the chain refused it (auth, port, denied, not-allowed, network), for metrics and the log.
    refused: str = ""


class ForwardHost(Protocol):
    """What the forward proxy needs from the edge (front/server.py): admission, the
    connection set and task tracking its shutdown waits on, the metrics registry."""

    @property
    def config(self) -> Config: ...

    @property
    def guard(self) -> ConnectionGuard: ...

    @property
    def connections(self) -> ConnectionList[Any]: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def draining(self) -> bool: ...

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...


class ForwardConnection(ClientConnection):
    """A client connection of the forward listener: CONNECT allowed, and tunnel accounting."""

    __slots__ = ("origin",)
    inline = False  # _complete below holds what follows a CONNECT

    def __init__(self, proxy: ForwardProxy) -> None:
        super().__init__(proxy)
        self.origin: OriginTunnel | None = None

    def _complete(self) -> None:
        head = self._current
        super()._complete()
        if head is not None and head.method == "CONNECT":
            # What follows belongs to the tunnel if it opens: hold it, as for an Upgrade,
            # starting with what came in the same packet as the head (a client that does
            # not wait for the 200 before its TLS ClientHello).
            self._upgrading = True
            assert self.parser is not None
            self._held += self.parser.rest
            self.parser.rest = b""

    def data_received(self, data: bytes) -> None:
        origin = self.origin
        if origin is not None and self.tunnel is not None:
            origin.client_sent(len(data))
        super().data_received(data)

    def become_tunnel(self, upstream: asyncio.Transport, head: bytes, early: bytes) -> None:
        if self.origin is not None:
            self.origin.client_sent(len(self._held))  # sent with the CONNECT, flushed now
        super().become_tunnel(upstream, head, early)

    def eof_received(self) -> bool | None:
        if self.origin is not None and self.tunnel is not None:
            return self.origin.client_eof()
        return None


def _limits(edge: ServerConfig, forward: ForwardConfig) -> ServerConfig:
    """The [edge] limits with the [forward] overrides applied."""
    names = (
        "keepalive_timeout",
        "max_requests_per_connection",
        "max_body_size",
        "body_timeout",
        "header_timeout",
    )
    changes = {n: getattr(forward, n) for n in names if getattr(forward, n) is not None}
    return dataclasses.replace(edge, **changes)


class ForwardProxy:
    """The forward-proxy listener and its chain (one per edge worker)."""

    def __init__(self, edge: ForwardHost) -> None:
        self.edge = edge
        f = edge.config.forward
        # What ForwardConnection reads as "the edge's" config: [forward] limits in place of [edge]'s.
        self.config = dataclasses.replace(edge.config, edge=_limits(edge.config.edge, f))
        self.guard = edge.guard
        self.connections = edge.connections
        # CONNECT's authority-form allowed, under the [forward] limits.
        c = self.config.edge
        self.parsers = ParserPool(max_headers=c.max_headers, max_field=c.max_header_size, proxy=True)
        self.policy = DestinationPolicy(f)
        self.tunnels: set[OriginTunnel] = set()
        self.tunnel_idle_timeout = f.tunnel_idle_timeout
        self.max_tunnels = f.max_tunnels
        self.metrics = ForwardMetrics(edge.metrics.registry, lambda: len(self.tunnels))
        # One synthetic route: what the cache and the access log key on.
        self.route = Route(
            name="forward",
            kind="pool",
            config=RouteConfig(name="forward", pool="forward", cache=f.cache),
            prefix="/",
            regex=None,
            methods=None,
        )
        self.fetch = OriginFetch(self.config, self.policy.networks, self.metrics)
        # The reverse side's DoS detector, shared (edge/front/forward/chain.py), when [dos] is on.
        self.dos = next((f for f in getattr(edge, "features", ()) if isinstance(f, DosDetector)), None)
        self.open_tunnel = TunnelOpen(self)
        steps = build_chain(self)
        self.features = list(steps.values())
        cache = steps.get("cache")
        if cache is not None:
            self.metrics.cache_counts = lambda: cache.counts
        self.handle: Handler = chain(self.features, self._terminal)
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None  # set by start() (ConnectionHost)
        self._listener: asyncio.Server | None = None
        self._closed_at = 0.0  # when shutdown began (monotonic); 0 while serving
        self._no_tunnels = asyncio.Event()
        self._max_requests = self.config.edge.max_requests_per_connection
        self._access_log = f.access_log

    def spawn(self, coro: Any) -> None:
        """Answer tasks are the edge's: its shutdown waits for them."""
        self.edge.spawn(coro)

    # --- serving ------------------------------------------------------------------------

    async def _terminal(self, ex: Exchange) -> Reply:
        if ex.notes["forward"].tunnel:
            return await self.open_tunnel(ex)
        return await self.fetch(ex)

    @staticmethod
    def target_of(request: Request) -> ForwardTarget:
        """The destination of a proxy request; BadTarget when it names none we can use."""
        head = request.head
        try:
            if head.method == "CONNECT":
                host, port = parse_authority(head.raw_path, None)
                return ForwardTarget(host, port, format_authority(host, port), True)
            if head.scheme == "http":
                host, port = parse_authority(request.host, 80)
                return ForwardTarget(host, port, format_authority(host, port, 80), False)
        except BadTarget as exc:
            raise BadTarget(f"The request names no usable destination ({exc})") from None
        if head.scheme == "https":
            raise BadTarget(
                "Addresses starting with https:// go through CONNECT (set this proxy as the HTTPS proxy)"
            )
        raise BadTarget("This is a forward proxy: ask for an absolute http:// address or CONNECT host:port")

    def answer_now(self, request: Request) -> Coroutine[Any, Any, None]:
        """For the connection (edge/connection.py): forward requests always take the async chain."""
        return self.answer(request)

    async def answer(self, request: Request) -> None:
        """Run one request through the forward chain and write the reply."""
        conn = request.conn
        ex: Exchange | None = None
        try:
            target = self.target_of(request)
        except BadTarget as exc:
            kind = "connect" if request.method == "CONNECT" else "http"
            reply = bad_target(str(exc))
        else:
            kind = "connect" if target.tunnel else "http"
            ex = Exchange(request, self.route, target.authority, request.remote, "http")
            ex.notes["forward"] = target
            try:
                reply = await self.handle(ex)
            except Exception:
                log.exception("forward request failed", target=target.authority)
                reply = page(500, "The proxy failed while handling this request")
            if target.refused:
                self.metrics.count_refused(target.refused)
        head = request.head
        keep_alive = (
            head.keep_alive
            and not reply.close_connection
            and not self.edge.draining
            and conn.requests < self._max_requests
        )
        if head.method == "CONNECT" and reply.tunnel is None:
            # The parser kept the connection for the tunnel; with no tunnel, honour what was asked.
            connection = head.headers.get("Connection", "").lower()
            if "close" in connection or (head.version == "HTTP/1.0" and "keep-alive" not in connection):
                keep_alive = False
        try:
            await self._write(request, reply, keep_alive, ex)
        finally:
            reply.body.close()
        if reply.tunnel is not None:
            self.metrics.tunnels_opened += 1
            return  # counted and logged when it closes
        if not keep_alive:
            conn.close()
        self.metrics.count_request(kind, reply.status)
        if self._access_log:
            self._log_access(request, reply, ex)

    async def _write(self, request: Request, reply: Reply, keep_alive: bool, ex: Exchange | None) -> None:
        """Frame and send a reply; for a tunnel, the 200 head and then the pipe."""
        conn = request.conn
        transport = conn.transport
        if reply.tunnel is not None:
            tunnel = cast(OriginTunnel, reply.tunnel.get_protocol())
            if transport is None or conn.closing or ex is None:
                reply.tunnel.abort()  # the client left while we connected
                return
            assert isinstance(conn, ForwardConnection)
            conn.origin = tunnel
            tunnel.attach(conn, ex)
            conn.become_tunnel(reply.tunnel, _ESTABLISHED, b"")
            return
        if transport is None:
            return
        body = reply.body
        try:
            head = conn.send_head(request, reply, body.length, keep_alive, ())
        except ValueError:
            log.warning("origin response with a forbidden header value", target=request.host)
            error = page(502, "The destination sent a broken response")
            head = conn.send_head(request, error, error.body.length, False, ())
            transport.write(head + cast(BytesBody, error.body).data)
            conn.close()
            return
        if request.method == "HEAD" or reply.status in _NO_BODY_STATUS:
            transport.write(head)
            return
        await write_reply_body(conn, head, body, target=request.host)

    def _log_access(self, request: Request, reply: Reply, ex: Exchange | None) -> None:
        length = reply.body.length
        fields: dict[str, Any] = {
            "method": request.method,
            "target": request.host,
            "path": request.path if request.method != "CONNECT" else None,
            "status": reply.status,
            "bytes": length if length is not None else -1,
            "client": request.remote,
        }
        if ex is not None:
            target = ex.notes["forward"]
            fields.update(
                user=target.user or None,
                refused=target.refused or None,
                origin=ex.member or None,
                ms=round((time.monotonic() - ex.started) * 1000, 2),
                origin_ms=round(ex.upstream_seconds * 1000, 2),
                cache=ex.cache_status or None,
            )
        access_log.info("forward", **fields)

    def tunnel_closed(self, tunnel: OriginTunnel) -> None:
        """Called once per tunnel when it ends: count and log it."""
        self.tunnels.discard(tunnel)
        if not self.tunnels:
            self._no_tunnels.set()
        m = self.metrics
        m.tunnel_bytes["up"] += tunnel.bytes_up
        m.tunnel_bytes["down"] += tunnel.bytes_down
        ex = tunnel.exchange
        if ex is None:
            return  # the client never got its 200: answer() counted nothing either
        m.count_request("connect", 200)
        if self._access_log:
            target = ex.notes["forward"]
            access_log.info(
                "forward",
                method="CONNECT",
                target=target.authority,
                status=200,
                client=ex.client_ip,
                user=target.user or None,
                origin=ex.member or None,
                bytes_up=tunnel.bytes_up,
                bytes_down=tunnel.bytes_down,
                seconds=round(time.monotonic() - tunnel.opened, 3),
            )

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> int:
        """Start the chain's background work and the listener; returns the bound port."""
        self.loop = asyncio.get_running_loop()
        for feature in self.features:
            start = getattr(feature, "start", None)
            if start is not None:
                started = start()
                if asyncio.iscoroutine(started):
                    await started
        f = self.config.forward
        self._listener = await asyncio.get_running_loop().create_server(
            lambda: ForwardConnection(self),
            f.host,
            f.port,
            reuse_address=True,
            reuse_port=self.config.edge.workers > 1,
            backlog=4096,
        )
        self.port = self._listener.sockets[0].getsockname()[1]
        log.info("forward proxy listening", host=f.host, port=self.port)
        return self.port

    def close(self) -> None:
        """Stop accepting (shutdown step 2); established connections go on."""
        self._closed_at = time.monotonic()
        if self._listener is not None:
            self._listener.close()

    async def drain(self) -> None:
        """Shutdown: wait for open tunnels until shutdown_timeout after close()."""
        if not self.tunnels:
            return
        self._no_tunnels.clear()
        left = self._closed_at + self.config.edge.shutdown_timeout - time.monotonic()
        if left > 0:
            try:
                await asyncio.wait_for(self._no_tunnels.wait(), left)
            except TimeoutError:
                pass
        if self.tunnels:
            log.warning("tunnels cut off at the shutdown deadline", count=len(self.tunnels))

    async def stop(self) -> None:
        """Cut the tunnels still open and stop the chain's background work (after the deadline)."""
        for tunnel in list(self.tunnels):
            tunnel.abort()
        for feature in self.features:
            stop = getattr(feature, "stop", None)
            if stop is not None:
                await stop()

    def status(self) -> dict[str, Any]:
        """For the edge's /status."""
        return {
            "port": self.port,
            "tunnels_open": len(self.tunnels),
            "authentication": bool(self.config.forward.users),
            "cache": self.metrics.cache_counts is not None,
        }
