"""TLS passthrough: route encrypted streams by the ClientHello's SNI, never decrypting a byte.

Theory of operation
-------------------
A passthrough listener accepts a TCP connection (through the edge's
ConnectionGuard: bans and connection caps apply) and buffers what the client
sends until ``parse_client_hello`` (sans-I/O, below) has the whole ClientHello,
which may span several TLS records. The server_name extension picks the pool
(exact names, then ``*.example.test`` wildcards, then ``default_pool``); no
match, a non-TLS first byte, a malformed hello or ``hello_timeout`` close the
connection.

The pool gives a member the way it does for HTTP: registry state, health,
passive ejection, the balancer (``hash`` uses the client address) and
``max_conns`` + the FIFO queue, where a slot is held for the stream's whole
life. Nothing has reached a member before its connect succeeds, so a connect
failure is always retried on the next member (``max_tries``) and reported for
passive ejection. Once connected, the optional PROXY protocol header (v1 text
or v2 binary) and the buffered ClientHello go out in one write, then bytes are
piped both ways with flow control (a slow reader pauses the other side) until
either side closes or nothing moves for ``idle_timeout``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import time
from collections.abc import Iterator
from types import EllipsisType
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from edge.core.config import PassthroughConfig
from edge.upstream.pool import Member, NoMember, QueueFull, QueueTimeout, UpstreamPool

if TYPE_CHECKING:
    from edge.core.config import Config
    from edge.core.limits import ConnectionGuard

log = structlog.get_logger("carousel.edge.passthrough")

# A ClientHello with post-quantum key shares is ~2 KiB; RFC 8446 allows up to 2^24, nobody sends that.
MAX_HELLO = 16 * 1024
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._")


class PassthroughHost(Protocol):
    """What a passthrough listener needs from the edge (front/server.py): admission and the pools."""

    @property
    def config(self) -> Config: ...

    @property
    def guard(self) -> ConnectionGuard: ...

    @property
    def pools(self) -> dict[str, UpstreamPool]: ...


class NotClientHello(Exception):
    """The first bytes are not a TLS ClientHello we can route."""


def parse_client_hello(data: bytes) -> str | EllipsisType | None:
    """The SNI host name of a ClientHello at the start of ``data``.

    Returns the lower-case name, None when the hello has no server_name, or
    ``...`` when more bytes are needed. Raises NotClientHello otherwise.
    """
    # Reassemble the handshake message from as many records as it spans.
    handshake = bytearray()
    pos = 0
    need = -1
    while need < 0 or len(handshake) < need:
        if len(data) < pos + 5:
            return ...
        content_type, major, _minor, length = struct.unpack_from("!BBBH", data, pos)
        if content_type != 22 or major != 3:
            raise NotClientHello("not a TLS handshake record")
        if length == 0 or length > 16384:
            raise NotClientHello("bad TLS record length")
        if len(data) < pos + 5 + length:
            return ...
        handshake += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if need < 0 and len(handshake) >= 4:
            if handshake[0] != 1:
                raise NotClientHello("first handshake message is not a ClientHello")
            need = 4 + int.from_bytes(handshake[1:4], "big")
            if need > MAX_HELLO:
                raise NotClientHello("ClientHello too large")
    return _server_name(bytes(handshake[4:need]))


def _server_name(body: bytes) -> str | None:
    try:
        p = 2 + 32  # legacy_version, random
        p += 1 + body[p]  # session id
        p += 2 + int.from_bytes(body[p : p + 2], "big")  # cipher suites
        p += 1 + body[p]  # compression methods
        if p == len(body):
            return None  # no extensions at all
        end = p + 2 + int.from_bytes(body[p : p + 2], "big")
        p += 2
        if end > len(body):
            raise NotClientHello("extensions overrun the ClientHello")
        while p + 4 <= end:
            ext_type, ext_len = struct.unpack_from("!HH", body, p)
            p += 4
            if p + ext_len > end:
                raise NotClientHello("extension overruns the ClientHello")
            if ext_type == 0:
                return _host_name(body[p : p + ext_len])
            p += ext_len
    except IndexError:
        raise NotClientHello("truncated ClientHello") from None
    return None


def _host_name(ext: bytes) -> str | None:
    if len(ext) < 2:
        raise NotClientHello("bad server_name extension")
    p, end = 2, 2 + int.from_bytes(ext[:2], "big")
    while p + 3 <= min(end, len(ext)):
        name_type, size = ext[p], int.from_bytes(ext[p + 1 : p + 3], "big")
        p += 3
        name = ext[p : p + size]
        p += size
        if name_type == 0:
            host = name.decode("ascii", "replace").lower().rstrip(".")
            if not host or len(host) > 253 or not set(host) <= _HOST_CHARS:
                raise NotClientHello("invalid server name")
            return host
    return None


def _plain(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def proxy_header(version: str, client: tuple[str, int], local: tuple[str, int]) -> bytes:
    """A PROXY protocol header (v1 text or v2 binary) for a TCP stream from client to local."""
    src, dst = _plain(client[0]), _plain(local[0])
    if src.version != dst.version:  # an IPv4 client on an IPv6 socket: speak IPv6 for both
        src = ipaddress.IPv6Address(f"::ffff:{src}") if src.version == 4 else src
        dst = ipaddress.IPv6Address(f"::ffff:{dst}") if dst.version == 4 else dst
    if version == "v1":
        proto = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {proto} {src} {dst} {client[1]} {local[1]}\r\n".encode()
    family = 0x11 if src.version == 4 else 0x21  # TCP over IPv4 / IPv6
    addresses = src.packed + dst.packed + struct.pack("!HH", client[1], local[1])
    return PROXY_V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(addresses)) + addresses


class _MemberSide(asyncio.Protocol):
    """The member's end of a tunnel: bytes go back to the client."""

    def __init__(self, tunnel: PassthroughConnection) -> None:
        self.tunnel = tunnel
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.tunnel.from_member(data)

    def eof_received(self) -> bool:
        return self.tunnel.member_eof()

    def pause_writing(self) -> None:
        self.tunnel.pause_client()

    def resume_writing(self) -> None:
        self.tunnel.resume_client()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.tunnel.finish()


class PassthroughConnection(asyncio.Protocol):
    """One client stream: read the ClientHello, pick a member, then pipe bytes both ways."""

    def __init__(self, listener: PassthroughListener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.member_transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] = ("", 0)
        self.local: tuple[str, int] = ("", 0)
        self.buffer = b""
        self.member: Member | None = None
        self.pool: UpstreamPool | None = None
        self.admitted = False
        self.connecting = False
        self.client_eof = False
        self.member_eof_seen = False
        self.last_activity = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.done = False

    # --- client side --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        self.peer, self.local = (peer[0], peer[1]), (local[0], local[1])
        edge = self.listener.edge
        if not edge.guard.admit(self.peer[0]):
            self.done = True
            self.transport = None
            transport.close()
            return
        self.admitted = True
        self.listener.connections.add(self)
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.listener.config.hello_timeout, self._hello_expired)

    def data_received(self, data: bytes) -> None:
        member = self.member_transport
        if member is not None:
            self.last_activity = time.monotonic()
            member.write(data)
            return
        self.buffer += data
        if self.connecting:
            return
        try:
            name = parse_client_hello(self.buffer)
        except NotClientHello as exc:
            self._refuse("not_tls", str(exc))
            return
        if name is ...:
            if len(self.buffer) > MAX_HELLO + 1024:
                self._refuse("not_tls", "ClientHello too large")
            return
        pool = self.listener.pool_for(name)
        if pool is None:
            self._refuse("no_route", f"no passthrough route for {name!r}")
            return
        assert self.transport is not None
        self.transport.pause_reading()
        self.connecting = True
        self.pool = pool
        self.listener.spawn(self._connect(pool, name))

    def eof_received(self) -> bool:
        self.client_eof = True
        member = self.member_transport
        if member is not None and member.can_write_eof() and not self.member_eof_seen:
            member.write_eof()  # half-close: the member may still answer
            return True
        self.finish()
        return False

    def pause_writing(self) -> None:
        if self.member_transport is not None:
            self.member_transport.pause_reading()

    def resume_writing(self) -> None:
        if self.member_transport is not None:
            self.member_transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.finish()

    # --- connecting ---------------------------------------------------------------------

    async def _connect(self, pool: UpstreamPool, name: str | None) -> None:
        """Take a member slot and connect, trying the next member on a connect failure."""
        c = pool.config
        loop = asyncio.get_running_loop()
        tried: set[Member] = set()
        for _ in range(c.max_tries):
            try:
                member = await pool.acquire(self.peer[0], tried)
            except (NoMember, QueueFull, QueueTimeout) as exc:
                self._refuse("no_member", f"pool {pool.name}: {type(exc).__name__}")
                return
            if self.done:  # the client left while we queued
                pool.release(member)
                return
            try:
                async with asyncio.timeout(c.connect_timeout):
                    transport, _ = await loop.create_connection(
                        lambda: _MemberSide(self), member.host, member.port
                    )
            except (OSError, TimeoutError):
                pool.release(member)
                pool.report_failure(member)
                tried.add(member)
                continue
            if self.done:
                pool.release(member)
                transport.abort()
                return
            self.member = member
            self._begin(transport)
            return
        self._refuse("no_member", f"pool {pool.name}: every try failed to connect")

    def _begin(self, member_transport: asyncio.BaseTransport) -> None:
        self.member_transport = member_transport  # type: ignore[assignment]
        assert self.member_transport is not None and self.transport is not None
        mode = self.listener.config.proxy_protocol
        head = proxy_header(mode, self.peer, self.local) if mode != "off" else b""
        self.member_transport.write(head + self.buffer)
        self.buffer = b""
        self.connecting = False
        self.listener.counts["forwarded"] += 1
        if self.timer is not None:
            self.timer.cancel()
        self.last_activity = time.monotonic()
        idle = self.listener.config.idle_timeout
        self.timer = asyncio.get_running_loop().call_later(idle, self._check_idle)
        self.transport.resume_reading()

    # --- piping -------------------------------------------------------------------------

    def from_member(self, data: bytes) -> None:
        if self.transport is not None:
            self.last_activity = time.monotonic()
            self.transport.write(data)

    def member_eof(self) -> bool:
        self.member_eof_seen = True
        if self.transport is not None and self.transport.can_write_eof() and not self.client_eof:
            self.transport.write_eof()
            return True
        self.finish()
        return False

    def pause_client(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_client(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def _check_idle(self) -> None:
        self.timer = None
        if self.done:
            return
        idle = self.listener.config.idle_timeout
        due = self.last_activity + idle
        now = time.monotonic()
        if now >= due:
            self.listener.counts["idle_timeouts"] += 1
            self.finish()
            return
        self.timer = asyncio.get_running_loop().call_later(due - now, self._check_idle)

    def _hello_expired(self) -> None:
        self.timer = None
        if self.member_transport is None and not self.connecting:
            self._refuse("hello_timeout", "no complete ClientHello in time")

    def _refuse(self, reason: str, detail: str) -> None:
        self.listener.counts[reason] += 1
        log.debug("passthrough connection refused", reason=reason, detail=detail, client=self.peer[0])
        self.finish(abort=True)

    def finish(self, abort: bool = False) -> None:
        """Close both sides (flushing what was written unless aborting); free the member slot once."""
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for transport in (self.transport, self.member_transport):
            if transport is not None:
                transport.abort() if abort else transport.close()
        if self.member is not None and self.pool is not None:
            self.pool.release(self.member)
            self.member = None
        if self.admitted:
            self.admitted = False
            self.listener.connections.discard(self)
            self.listener.edge.guard.release(self.peer[0])


class PassthroughListener:
    """One `[[passthrough]]` listener."""

    def __init__(self, edge: PassthroughHost, config: PassthroughConfig) -> None:
        self.edge = edge
        self.config = config
        self.exact: dict[str, UpstreamPool] = {}
        self.wildcard: dict[str, UpstreamPool] = {}
        for route in config.route:
            pool = edge.pools[route.pool]
            for name in route.names:
                name = name.lower().rstrip(".")
                if name.startswith("*."):
                    self.wildcard.setdefault(name[2:], pool)
                else:
                    self.exact.setdefault(name, pool)
        self.default = edge.pools[config.default_pool] if config.default_pool else None
        self.connections: set[PassthroughConnection] = set()
        self.counts = dict.fromkeys(
            ("forwarded", "not_tls", "no_route", "no_member", "hello_timeout", "idle_timeouts"), 0
        )
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def pool_for(self, name: str | None) -> UpstreamPool | None:
        """The pool serving a server name (exact, wildcard, then the default)."""
        if name:
            pool = self.exact.get(name) or self.wildcard.get(name.partition(".")[2])
            if pool is not None:
                return pool
        return self.default

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> int:
        """Listen; returns the bound port."""
        c = self.config
        self._server = await asyncio.get_running_loop().create_server(
            lambda: PassthroughConnection(self),
            c.host,
            c.port,
            reuse_address=True,
            reuse_port=self.edge.config.edge.workers > 1,
            backlog=4096,
        )
        sock: socket.socket = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        log.info("passthrough listening", host=c.host, port=self.port, proxy_protocol=c.proxy_protocol)
        return self.port

    def close(self) -> None:
        """Stop accepting; streams in progress go on."""
        if self._server is not None:
            self._server.close()

    async def abort(self) -> None:
        """Cut every stream and pending connect (the end of shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in list(self.connections):
            conn.finish(abort=True)

    def status(self) -> dict[str, Any]:
        """What /status shows for this listener."""
        return {"port": self.port, "streams": len(self.connections), **self.counts}


def register_metrics(registry: CollectorRegistry, listeners: list[PassthroughListener]) -> None:
    """Export passthrough counts (read at scrape time)."""
    if listeners:
        registry.register(_PassthroughCollector(listeners))


class _PassthroughCollector(Collector):
    def __init__(self, listeners: list[PassthroughListener]) -> None:
        self.listeners = listeners

    def collect(self) -> Iterator[Any]:
        streams = GaugeMetricFamily(
            "carousel_edge_passthrough_streams", "Open passthrough streams", labels=["port"]
        )
        events = CounterMetricFamily(
            "carousel_edge_passthrough_connections",
            "Passthrough connections by outcome (forwarded, not_tls, no_route, no_member, hello_timeout)",
            labels=["port", "outcome"],
        )
        for lst in self.listeners:
            port = str(lst.port)
            streams.add_metric([port], len(lst.connections))
            for outcome, count in lst.counts.items():
                events.add_metric([port, outcome], count)
        yield streams
        yield events
