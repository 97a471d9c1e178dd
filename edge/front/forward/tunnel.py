"""CONNECT tunnels: a TCP connection to the origin, then bytes piped both ways, unread.

Theory of operation
-------------------
``TunnelOpen`` (the terminal handler for CONNECT) connects to the origin with
``connect_origin`` (same resolution and address checks as plain HTTP) and
answers 200 with the origin transport as ``Reply.tunnel``. The origin side is
an ``OriginTunnel`` protocol that does not read until the client has the 200
head: a server that speaks first (SMTP banners, SSH) must not have its bytes
land before the head. The listener then writes the head and turns the client
connection into a pipe (``ClientConnection.become_tunnel``); from there:

* client -> origin: ``ClientConnection.data_received`` writes to the origin
  transport (``ForwardConnection`` counts the bytes);
* origin -> client: ``OriginTunnel.data_received`` writes to the client;
* flow control: each side pauses reading the other when its own write buffer
  is full (``pause_writing``), so a slow reader never makes the edge buffer;
* half-close: an EOF from one side is passed on as an EOF to the other
  (TLS close_notify and HTTP/1.0 bodies depend on it); the tunnel closes
  when both have ended, or either side resets;
* idle: no byte either way for ``tunnel_idle_timeout`` closes both.

Whoever closes first, ``finish`` runs once: it counts, and logs the access line
with the bytes each way and the tunnel's lifetime.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Protocol

from multidict import CIMultiDict

from edge.core.pipeline import Exchange, Reply
from edge.front.forward.origin import OriginFailure, connect_origin
from edge.front.forward.pages import page

if TYPE_CHECKING:
    from edge.core.config import Config
    from edge.front.forward.metrics import ForwardMetrics
    from edge.front.forward.policy import DestinationPolicy


class TunnelClient(Protocol):
    """The client side of a tunnel: the forward listener's connection."""

    @property
    def transport(self) -> asyncio.Transport | None: ...

    def close(self) -> None: ...


class TunnelOwner(Protocol):
    """What tunnels need from the forward proxy (front/forward/listener.py): limits, the
    open-tunnel set, metrics, and a word when one ends."""

    @property
    def config(self) -> Config: ...

    @property
    def policy(self) -> DestinationPolicy: ...

    @property
    def metrics(self) -> ForwardMetrics: ...

    @property
    def tunnels(self) -> set[OriginTunnel]: ...

    @property
    def max_tunnels(self) -> int: ...

    @property
    def tunnel_idle_timeout(self) -> float: ...

    def tunnel_closed(self, tunnel: OriginTunnel) -> None: ...


class OriginTunnel(asyncio.Protocol):
    """The origin side of one CONNECT tunnel, and the tunnel's bookkeeping."""

    def __init__(self, proxy: TunnelOwner) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.client: TunnelClient | None = None
        self.exchange: Exchange | None = None
        self.opened = time.monotonic()
        self.last_active = self.opened
        self.bytes_up = 0  # client -> origin
        self.bytes_down = 0  # origin -> client
        self.client_ended = False
        self.origin_ended = False
        self.finished = False
        self._idle: asyncio.TimerHandle | None = None

    # --- origin side (asyncio callbacks) ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.pause_reading()  # type: ignore[attr-defined]  # until the client has the 200 head

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None or client.transport is None:
            return
        self.bytes_down += len(data)
        self.last_active = time.monotonic()
        client.transport.write(data)

    def eof_received(self) -> bool:
        self.origin_ended = True
        client = self.client
        if client is not None and client.transport is not None and client.transport.can_write_eof():
            client.transport.write_eof()
        if self.client_ended:
            self.close()
            return False
        return True  # keep the origin transport open: the client may still be sending

    def pause_writing(self) -> None:
        if self.client is not None and self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None and self.client.transport is not None:
            self.client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.client is not None:
            self.client.close()
        self.finish()

    # --- client side (called by ForwardConnection) --------------------------------------

    def attach(self, client: TunnelClient, ex: Exchange) -> None:
        """The client connection is becoming the other end of this tunnel."""
        self.client = client
        self.exchange = ex
        self.last_active = time.monotonic()
        self._arm_idle(self.proxy.tunnel_idle_timeout)

    def client_sent(self, size: int) -> None:
        self.bytes_up += size
        self.last_active = time.monotonic()

    def client_eof(self) -> bool:
        """The client half-closed: pass it on; True keeps the client transport open."""
        self.client_ended = True
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()
        if self.origin_ended:
            self.close()
            return False
        return True

    def close(self) -> None:
        """Close both ends (after flushing what was written)."""
        if self.transport is not None:
            self.transport.close()
        if self.client is not None:
            self.client.close()

    def abort(self) -> None:
        """Drop both ends now (shutdown)."""
        if self.transport is not None:
            self.transport.abort()
        if self.client is not None and self.client.transport is not None:
            self.client.transport.abort()

    # --- bookkeeping --------------------------------------------------------------------

    def _arm_idle(self, delay: float) -> None:
        self._idle = asyncio.get_running_loop().call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        self._idle = None
        if self.finished:
            return
        timeout = self.proxy.tunnel_idle_timeout
        quiet = time.monotonic() - self.last_active
        if quiet >= timeout:
            self.proxy.metrics.tunnel_idle_closes += 1
            self.close()
            return
        self._arm_idle(timeout - quiet)

    def finish(self) -> None:
        """Once, when either end has gone: stop the timer, count, log."""
        if self.finished:
            return
        self.finished = True
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self.proxy.tunnel_closed(self)


class TunnelOpen:
    """Terminal handler for CONNECT: open the origin connection, answer 200 with the tunnel."""

    def __init__(self, proxy: TunnelOwner) -> None:
        self.proxy = proxy

    async def __call__(self, ex: Exchange) -> Reply:
        proxy = self.proxy
        if proxy.max_tunnels and len(proxy.tunnels) >= proxy.max_tunnels:
            reply = page(503, "Too many tunnels are open; try again soon")
            reply.headers["Retry-After"] = "1"
            return reply
        target = ex.notes["forward"]
        f = proxy.config.forward
        started = time.monotonic()
        try:
            transport, tunnel, address = await connect_origin(
                lambda: OriginTunnel(proxy),
                target.host,
                target.port,
                hosts=f.hosts,
                networks=proxy.policy.networks,
                timeout=f.connect_timeout,
            )
        except OriginFailure as failure:
            proxy.metrics.origin_failure(failure.kind)
            return page(failure.status, failure.reason, target.authority)
        ex.member = address
        ex.upstream_seconds = time.monotonic() - started
        proxy.tunnels.add(tunnel)
        return Reply(200, CIMultiDict(), tunnel=transport, reason="Connection Established")
