"""An HTTP/2 stream as the pipeline sees it (the ``conn`` of its Request), and its reply writer.

``H2Stream.respond`` is what ``Edge._send`` calls for a stream: it frames the reply
(edge/http/h2.py ``response_fields``) and writes it at once while the flow-control
windows allow, else returns the coroutine that finishes it under the windows
(``H2ClientConnection.send``, edge/front/h2conn.py). ``Stats`` and
``register_metrics`` are the HTTP/2 counters on /metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from edge.core.pipeline import BytesBody
from edge.front.framing import http_date
from edge.http.h2 import response_fields
from edge.http.h2wire import ErrorCodes, ServerWire, StreamClosed

if TYPE_CHECKING:
    from edge.core.pipeline import Reply

log = structlog.get_logger("carousel.edge.h2")


class StreamHost(Protocol):
    """What a stream needs from its connection (edge/front/h2conn.py's H2ClientConnection)."""

    peer: str
    scheme: str
    server: str
    paused: bool

    @property
    def transport(self) -> asyncio.Transport | None: ...

    @property
    def wire(self) -> ServerWire: ...

    def push(self, stream: H2Stream, data: bytes, pos: int, end: bool) -> int: ...

    async def send(self, stream: H2Stream, data: bytes, end: bool, pos: int = 0) -> None: ...

    def soon(self) -> None: ...

    def finished(self, stream: H2Stream) -> None: ...

    def drain_gracefully(self) -> None: ...

    def reset_stream(self, stream: H2Stream, code: ErrorCodes) -> None: ...


PAGES = {
    400: b"<html><body><h1>400 Bad Request</h1></body></html>\n",
    405: b"<html><body><h1>405 Method Not Allowed</h1></body></html>\n",
    408: b"<html><body><h1>408 Request Timeout</h1></body></html>\n",
    413: b"<html><body><h1>413 Content Too Large</h1></body></html>\n",
    431: b"<html><body><h1>431 Request Header Fields Too Large</h1></body></html>\n",
    502: b"<html><body><h1>502 Bad Gateway</h1></body></html>\n",
}


class StreamGone(ConnectionError):
    """The stream or its connection went away while its reply was being written."""


class Stats:
    """HTTP/2 counters for /metrics (per worker process)."""

    connections = 0
    streams = 0
    closed: dict[str, int] = {}  # GOAWAY reasons the edge sent: no_error, flood, protocol, stalled, ...

    @classmethod
    def close(cls, reason: str) -> None:
        cls.closed[reason] = cls.closed.get(reason, 0) + 1


class H2Stream:
    """One request's stream: the ``conn`` its Request carries, and its reply writer."""

    __slots__ = ("body", "body_timer", "conn", "head", "reset", "sid", "size", "waiter")

    requests = 1

    def __init__(self, conn: StreamHost, sid: int) -> None:
        self.conn = conn
        self.sid = sid
        self.head: Any = None
        self.body: list[bytes] | None = None
        self.size = 0
        self.reset = False  # reset by either side: nothing more is written
        self.waiter: asyncio.Future[None] | None = None
        self.body_timer: asyncio.TimerHandle | None = None

    @property
    def peer(self) -> str:
        return self.conn.peer

    @property
    def transport(self) -> asyncio.Transport | None:
        return None  # nothing writes raw bytes to a stream (no 1xx, no tunnel)

    @property
    def scheme(self) -> str:
        return self.conn.scheme

    @property
    def closing(self) -> bool:
        return self.reset or self.conn.transport is None

    def respond(
        self, reply: Reply, extra: tuple[tuple[str, str], ...], done: Callable[[], None]
    ) -> Coroutine[Any, Any, None] | None:
        """Write a reply on this stream: at once while the windows allow, else the coroutine
        that finishes it. ``done`` (the edge's count, log and body release) runs once either way."""
        conn = self.conn
        if self.closing:
            conn.finished(self)
            done()
            return None
        method = self.head.method
        body = reply.body
        status = reply.status
        bodiless = method == "HEAD" or status in (204, 304) or status < 200
        try:
            unmerged = reply.unmerged()
            if unmerged is not None:
                # A cache hit nobody looked into: its stored fields go as stored (converted once).
                wire, added = unmerged
                fields = response_fields(
                    status, added.items(), extra, conn.server, http_date(), body.length, wire.data
                )
            else:
                fields = response_fields(
                    status, reply.headers.items(), extra, conn.server, http_date(), body.length
                )
        except ValueError:
            log.warning("response with a forbidden header value", path=self.head.path)
            status, body = 502, BytesBody(PAGES[502])
            fields = response_fields(
                502, [("content-type", "text/html")], (), conn.server, http_date(), len(body.data)
            )
            bodiless = method == "HEAD"
        try:
            conn.wire.send_headers(self.sid, fields, bodiless)
        except StreamClosed:  # the client reset the stream or sent GOAWAY in the meantime
            conn.finished(self)
            done()
            return None
        if reply.close_connection:
            conn.drain_gracefully()  # what HTTP/1.1's Connection: close says, for this connection
        if bodiless:
            conn.soon()
            conn.finished(self)
            done()
            return None
        pos = 0
        if type(body) is BytesBody and not conn.paused:
            data = body.data
            try:
                pos = conn.push(self, data, 0, True)
            except StreamGone:
                conn.finished(self)
                done()
                return None
            conn.soon()
            if pos > len(data):
                conn.finished(self)
                done()
                return None
        return self._write_body(body, pos, done)

    async def _write_body(self, body: Any, pos: int, done: Callable[[], None]) -> None:
        conn = self.conn
        try:
            if type(body) is BytesBody:
                await conn.send(self, body.data, True, pos)
            else:
                async for chunk in body.chunks():
                    if chunk:
                        await conn.send(self, chunk, False)
                await conn.send(self, b"", True)
        except ConnectionError:
            pass  # the client reset the stream or went away; nothing left to tell it
        except Exception as exc:
            log.warning("response aborted mid-body", error=str(exc), path=self.head.path)
            conn.reset_stream(self, ErrorCodes.INTERNAL_ERROR)
        finally:
            conn.finished(self)
            done()


def register_metrics(registry: Any) -> None:
    """Add the HTTP/2 counters to the edge's Prometheus registry."""
    from prometheus_client.core import CounterMetricFamily

    class _Collector:
        def collect(self) -> Any:
            yield CounterMetricFamily(
                "carousel_edge_h2_connections", "HTTP/2 client connections accepted", value=Stats.connections
            )
            yield CounterMetricFamily(
                "carousel_edge_h2_streams", "HTTP/2 requests received", value=Stats.streams
            )
            closed = CounterMetricFamily(
                "carousel_edge_h2_goaway", "HTTP/2 connections the edge closed, by reason", labels=["reason"]
            )
            for reason, n in sorted(Stats.closed.items()):
                closed.add_metric([reason], n)
            yield closed

    registry.register(_Collector())
