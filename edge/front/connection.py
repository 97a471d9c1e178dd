"""The client side of the edge: one asyncio Protocol per connection, HTTP/1.1 keep-alive.

Theory of operation
-------------------
Bytes from the client go through ``RequestParser`` (edge/http/http1.py). A request
is handed to the pipeline only once it is complete, body included: the edge
buffers request bodies by design, so a handler never waits on a slow client.
A body over ``max_body_size`` is answered 413 at once, a body slower than
``body_timeout`` gets 408; both close the connection. Pipelined requests are
answered in order, one at a time; reading pauses when too many are waiting.

An idle connection costs this object, the transport and one entry in the loop's
deadline wheel (no task, no buffers, no timer of its own, no parser: it takes one
from the edge's ``ParserPool`` when bytes come, and gives it back once idle; it is
linked into the edge's ``ConnectionList`` through two slots of its own, not a set
entry): that is what lets an edge hold 10,000 keep-alive clients cheaply. The deadline is the
keep-alive idle timeout between requests and the header deadline
(``header_timeout``) from the moment a connection opens or a later head starts,
so a client trickling a head byte by byte (slowloris) is closed at that deadline.
The wheel (``DeadlineWheel``, edge/front/deadlines.py) is one loop timer for all connections, in 20 ms
slots: a timer per connection was 0.55 KiB of each idle connection's 1.7 KiB.
Admission (bans, connection caps) happens in ``connection_made`` through the
edge's ConnectionGuard (edge/core/limits.py).

Responses are framed by edge/front/framing.py: Content-Length when the body's length
is known, chunked otherwise, nothing for HEAD/204/304. A 101 reply carrying a tunnel
(WebSocket) turns the connection into a byte pipe to the member.
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from edge.front.deadlines import DEADLINE_SLOT, Filed, Slot, unlink, wheel
from edge.front.framing import REASONS, http_date, response_head
from edge.front.links import ConnectionList, Linked
from edge.http.http1 import (
    END,
    SEEN_UPGRADE,
    UPGRADE,
    BodyChunk,
    EndOfMessage,
    Head,
    ParserPool,
    RequestParser,
)
from edge.http.request import Request

if TYPE_CHECKING:
    from edge.core.config import Config
    from edge.core.limits import ConnectionGuard
    from edge.core.pipeline import Reply

log = structlog.get_logger("carousel.edge.connection")

MAX_PIPELINED = 16


class RequestCounter(Protocol):
    """Counts answers by route (or kind) and status."""

    def count_request(self, route: str, status: int, /) -> None: ...


class ConnectionHost(Protocol):
    """What a client connection needs from the server that accepted it: the Edge
    (front/server.py), or the forward proxy (front/forward/listener.py)."""

    @property
    def config(self) -> Config: ...

    @property
    def guard(self) -> ConnectionGuard: ...

    @property
    def connections(self) -> ConnectionList[Any]: ...

    @property
    def parsers(self) -> ParserPool: ...

    @property
    def metrics(self) -> RequestCounter: ...

    #: The loop it serves on, once started (None before: connections then ask asyncio).
    #: asyncio.get_running_loop() makes a getpid(2) system call on every call (CPython 3.11
    #: checks for a fork), which was one system call per answered request.
    @property
    def loop(self) -> asyncio.AbstractEventLoop | None: ...

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...

    def answer_now(self, request: Request) -> Coroutine[Any, Any, None] | None: ...


class ClientConnection(Linked, asyncio.Protocol):
    """One client connection."""

    __slots__ = (
        "_body",
        "_body_size",
        "_body_timer",
        "_current",
        "_drain",
        "_due",
        "_head_deadline",
        "_held",
        "_paused_reading",
        "_paused_writing",
        "_pending_reject",
        "_slot",
        "_upgrading",
        "_wheel_next",
        "_wheel_prev",
        "closing",
        "edge",
        "handling",
        "parser",
        "peer",
        "queue",
        "requests",
        "transport",
        "tunnel",
    )

    #: "https" on TLS listeners (edge/front/tls.py subclasses this); every Exchange carries it.
    scheme = "http"
    #: A lone bodiless request skips the queue (data_received); off for subclasses that
    #: hook request assembly (the forward listener's CONNECT).
    inline = True

    def __init__(self, edge: ConnectionHost) -> None:
        self._link_next = self._link_prev = None
        self.edge = edge
        self.transport: asyncio.Transport | None = None
        self.parser: RequestParser | None = None  # while a request is coming or in hand
        self.peer = ""
        self.queue: deque[Request] | None = None
        self.handling = False
        self.requests = 0
        self.closing = False
        self.tunnel: asyncio.Transport | None = None
        self._current: Head | None = None
        self._body: list[bytes] | None = None
        self._body_size = 0
        self._body_timer: asyncio.TimerHandle | None = None
        # The keep-alive idle timeout or the header deadline (slowloris), whichever applies.
        self._slot = 0  # the deadline wheel's slot this connection is filed in (0: none)
        self._wheel_next: Slot | Filed | None = None  # its neighbours there
        self._wheel_prev: Slot | Filed | None = None
        self._due = 0.0  # the deadline in force (loop time); 0: none (a request is in hand)
        self._head_deadline = False  # _due is the header deadline, not the idle timeout
        self._drain: asyncio.Future[None] | None = None
        self._paused_reading = False
        self._paused_writing = False
        self._held: bytes = b""  # client bytes received while an upgrade is pending
        self._upgrading = False
        self._pending_reject = 0  # a status to send once the responses in progress are out

    # --- asyncio callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        # Interned: the connections of one client share one string (58 bytes each otherwise).
        self.peer = sys.intern(peer[0]) if peer else ""
        if not self.edge.guard.admit(self.peer):  # banned, or over a connection cap
            self.closing = True
            self.transport = None
            transport.close()  # nothing was read or written: closing is as cheap as a reset
            return
        self.edge.connections.add(self)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.closing = True
        if self in self.edge.connections:
            self.edge.connections.discard(self)
            self.edge.guard.release(self.peer)
        self._cancel_deadline()
        if self._body_timer is not None:
            self._body_timer.cancel()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("client went away"))
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None

    def pause_writing(self) -> None:
        self._paused_writing = True
        if self.tunnel is not None:
            self.tunnel.pause_reading()

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self.tunnel is not None:
            self.tunnel.resume_reading()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        if self.closing or self._pending_reject:
            return
        if self._upgrading:
            self._held += data  # not HTTP any more if the upgrade goes through
            return
        parser = self.parser
        if parser is None:
            parser = self.parser = self.edge.parsers.take()
        events = parser.feed(data)
        if (
            self.inline
            and len(events) == 2
            and events[1] is END
            and type(head := events[0]) is Head
            and not self.handling
            and not self.queue
            and not self._paused_writing  # a client slow to read waits (flow control): _serve
            and parser.error is None
            and (not head.seen & SEEN_UPGRADE or UPGRADE not in head.headers)
        ):
            # The usual case, one whole request with no body and nothing else in hand: what
            # _start, _complete and _serve would do for it, without the queue.
            self._due = 0.0
            self.handling = True
            rest = self._answer(Request(head, self, None))
            if rest is not None:
                self.edge.spawn(self._run(rest))
            else:
                self._served()
            return
        reject = 0
        for ev in events:
            if type(ev) is BodyChunk:
                self._body_size += len(ev.data)
                if self._body_size > self.edge.config.edge.max_body_size:
                    reject = 413
                    break
                assert self._body is not None
                self._body.append(ev.data)
            elif type(ev) is EndOfMessage:
                self._complete()
            else:
                assert isinstance(ev, Head)
                if ev.body_length > self.edge.config.edge.max_body_size:
                    reject = 413
                    break
                self._start(ev)
        if self.queue and not self.handling:
            self._serve()
        if not reject and parser.error is not None:
            reject = parser.error.status
        if reject:
            self.reject(reject)  # after the requests that came before it
        elif self.queue is not None and len(self.queue) >= MAX_PIPELINED:
            self._pause_reading()
        elif self._due and not self._head_deadline and not parser.idle:
            # The first bytes of a head after a keep-alive pause: the rest is due in header_timeout.
            self._arm_head_deadline()

    # --- request assembly ---------------------------------------------------------------

    def _start(self, head: Head) -> None:
        self._due = 0.0  # no idle or header deadline while a request is in hand
        self._current = head
        self._body_size = 0
        if head.body_length or head.chunked:
            self._body = []
            # Only when nothing is being answered: a 100 must not land inside a response.
            if head.expect_continue and not self.handling and not self.queue:
                assert self.transport is not None
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            loop = asyncio.get_running_loop()
            self._body_timer = loop.call_later(self.edge.config.edge.body_timeout, self.reject, 408)
        else:
            self._body = None

    def _complete(self) -> None:
        head = self._current
        if head is None:
            return
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        body = b"".join(self._body) if self._body is not None else None
        self._current = None
        self._body = None
        if self.queue is None:
            self.queue = deque()
        self.queue.append(Request(head, self, body))
        if UPGRADE in head.headers:
            # Whatever follows may be another protocol: hold it until this is answered.
            self._upgrading = True

    # --- answering ----------------------------------------------------------------------

    def _serve(self) -> None:
        """Answer queued requests in order: here while the pipeline can answer at once,
        in a task from the first request that has to wait (or a client that is slow to read)."""
        self.handling = True
        queue = self.queue
        while queue and not self.closing and self.tunnel is None:
            if self._paused_writing:
                self.edge.spawn(self._run(None))
                return
            rest = self._answer(self._next_request())
            if rest is not None:
                self.edge.spawn(self._run(rest))
                return
        self._served()

    def _next_request(self) -> Request:
        assert self.queue
        request = self.queue.popleft()
        if self._paused_reading and len(self.queue) < MAX_PIPELINED // 2:
            self._resume_reading()
        return request

    def _answer(self, request: Request) -> Coroutine[Any, Any, None] | None:
        """Answer one request at once where the pipeline can; what is left to await, if any.
        A failure here is the edge's own: logged, and the connection is dropped."""
        self.requests += 1
        try:
            return self.edge.answer_now(request)
        except Exception:
            log.exception("connection failed while answering")
            self.closing = True
            if self.transport is not None:
                self.transport.abort()
            return None

    async def _run(self, rest: Coroutine[Any, Any, None] | None) -> None:
        """The rest of a request that had to wait, then the queue behind it; ends when it is empty."""
        try:
            if rest is not None:
                await rest
            while self.queue and not self.closing and self.tunnel is None:
                await self.drain()
                rest = self._answer(self._next_request())
                if rest is not None:
                    await rest
        except ConnectionError:
            self.close()
        except Exception:
            log.exception("connection failed while answering")
            if self.transport is not None:
                self.transport.abort()
        self._served()

    def _served(self) -> None:
        """The queue is answered: a reject held back, an upgrade that did not happen, or idle."""
        self.handling = False
        if self._pending_reject:
            status, self._pending_reject = self._pending_reject, 0
            self.reject(status)
            return
        if not self.closing and self.tunnel is None:
            self._upgrading = False
            held, self._held = self._held, b""
            if held:
                self.data_received(held)  # an upgrade that did not happen: parse what followed
            else:
                self._arm_idle()

    async def write(self, data: bytes) -> None:
        """Write body bytes, waiting while the client is slow (flow control)."""
        transport = self.transport
        if transport is None:
            raise ConnectionResetError("client went away")
        transport.write(data)
        if self._paused_writing:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    async def drain(self) -> None:
        """Wait until the client has taken what was written (flow control)."""
        if self._paused_writing and self.transport is not None:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    def become_tunnel(self, upstream: asyncio.Transport, head: bytes, early: bytes) -> None:
        """After a 101: write the head and any early member bytes, then pipe both ways."""
        assert self.transport is not None
        self.transport.write(head + early)
        self.tunnel = upstream
        self._cancel_deadline()
        held, self._held = self._held, b""
        if held:
            upstream.write(held)
        upstream.resume_reading()

    def send_head(
        self,
        request: Request,
        reply: Reply,
        length: int | None,
        keep_alive: bool,
        extra: tuple[tuple[str, str], ...],
        server_line: bytes = b"",
    ) -> bytes:
        """The serialised status line and headers for a reply (``response_head``).

        Raises ValueError when a field would smuggle a line in (CR or LF).
        """
        head = request.head
        return response_head(reply, head.method, head.version, length, keep_alive, extra, server_line)

    def close(self) -> None:
        """Close after what has been written is flushed."""
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def reject(self, status: int) -> None:
        """Answer a framing failure and close; nothing more is read from this client."""
        if self.closing or self.transport is None:
            return
        if self.handling:
            # Never cut into a response being written: answer after the queue is done.
            self._pending_reject = status
            self._pause_reading()
            return
        body = f"<html><body><h1>{status} {REASONS.get(status, '')}</h1></body></html>\n"
        self.transport.write(
            (
                f"HTTP/1.1 {status} {REASONS.get(status, 'Bad Request')}\r\n"
                f"Date: {http_date()}\r\nServer: {self.edge.config.edge.server_header}\r\n"
                f"Content-Type: text/html; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n" + body
            ).encode()
        )
        self.edge.metrics.count_request("-", status)
        self.close()

    # --- timers and reading -------------------------------------------------------------

    def _arm_idle(self) -> None:
        """Between requests: the keep-alive timeout, or the header deadline once a head has begun."""
        if self._current is not None:
            return  # a body is on its way: body_timeout governs
        parser = self.parser
        edge = self.edge
        if parser is not None:
            if not edge.parsers.give(parser):
                self._arm_head_deadline()  # a head has begun (or the stream went bad)
                return
            self.parser = None
        # _set_deadline(keepalive_timeout, False), inlined: this runs after every answer.
        due = (edge.loop or asyncio.get_running_loop()).time() + edge.config.edge.keepalive_timeout
        self._due = due
        self._head_deadline = False
        slot = self._slot
        if not slot or slot > math.ceil(due / DEADLINE_SLOT):
            self._slot = wheel().add(self, due)

    def _arm_head_deadline(self) -> None:
        self._set_deadline(self.edge.config.edge.header_timeout, True)

    def _set_deadline(self, seconds: float, head: bool) -> None:
        """Filed in the deadline wheel lazily: a later deadline keeps the slot, which files the
        connection again when it comes early; only an earlier one costs a new filing."""
        loop = self.edge.loop or asyncio.get_running_loop()
        due = loop.time() + seconds
        self._due = due
        self._head_deadline = head
        slot = self._slot
        if not slot or slot > math.ceil(due / DEADLINE_SLOT):
            self._slot = wheel().add(self, due)  # out of the later slot, into this one

    def _cancel_deadline(self) -> None:
        self._due = 0.0
        if self._slot:
            unlink(self)
            self._slot = 0

    def _deadline_reached(self) -> None:
        self._slot = 0
        due = self._due
        if not due:
            return  # a request came in the meantime
        loop = self.edge.loop or asyncio.get_running_loop()
        if loop.time() < due:
            self._slot = wheel().add(self, due)
            return
        self._due = 0.0
        if self._head_deadline:
            self._head_expired()
        else:
            self._idle_expired()

    def _idle_expired(self) -> None:
        if not self.handling and not self.queue:
            self.close()

    def _head_expired(self) -> None:
        if not self.handling and not self.queue and self._current is None:
            self.edge.guard.header_timeouts += 1
            self.close()

    def close_if_idle(self) -> bool:
        """For shutdown: close now if no request is being answered."""
        if not self.handling and not self.queue and self.tunnel is None:
            self.close()
            return True
        return False

    def _pause_reading(self) -> None:
        if not self._paused_reading and self.transport is not None:
            self._paused_reading = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._paused_reading and self.transport is not None:
            self._paused_reading = False
            self.transport.resume_reading()
