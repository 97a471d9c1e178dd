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
The wheel (``_Deadlines``) is one loop timer for all connections, in 20 ms
slots: a timer per connection was 0.55 KiB of each idle connection's 1.7 KiB.
Admission (bans, connection caps) happens in ``connection_made`` through the
edge's ConnectionGuard (edge/core/limits.py).

Responses are framed here: Content-Length when the body's length is known,
chunked otherwise, nothing for HEAD/204/304. A 101 reply carrying a tunnel
(WebSocket) turns the connection into a byte pipe to the member.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import sys
import time
from collections import deque
from collections.abc import Coroutine
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from edge.core.pipeline import Body, BytesBody
from edge.front.links import ConnectionList, Linked
from edge.http.http1 import END, BodyChunk, EndOfMessage, Head, ParserPool, RequestParser, field_lines
from edge.http.request import Request

if TYPE_CHECKING:
    from edge.core.config import Config
    from edge.core.limits import ConnectionGuard
    from edge.core.pipeline import Reply

log = structlog.get_logger("carousel.edge.connection")

MAX_PIPELINED = 16
_FRAMING = ("Content-Length", "Transfer-Encoding", "Connection", "Keep-Alive")
_REASONS = {s.value: s.phrase for s in HTTPStatus}
_STATUS_LINES: dict[tuple[int, str], bytes] = {}  # "HTTP/1.1 200 OK\r\n", ...: bounded, reasons vary
_date_cache: list[Any] = [0, ""]


def http_date() -> str:
    """The Date header value, formatted once per second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = formatdate(now, usegmt=True)
    return str(_date_cache[1])


# Seconds: how late a connection's deadline may be noticed, at most. Short enough that
# connections opened together (500 slowloris clients) are not closed in bursts of hundreds
# in one callback, which cost other clients' latency (test_slowloris.py: p99 over 0.1 s
# with 0.1 s slots on a loaded machine); long enough that 10,000 idle connections opened
# within seconds share a few hundred slots.
DEADLINE_SLOT = 0.02


class _Slot:
    """One slot of the deadline wheel: a ring of connections linked through their
    ``_wheel_next``/``_wheel_prev`` slots. A set per slot cost 40-70 bytes of each idle
    connection (tables sized for growth); the links cost 16 and unlink in O(1)."""

    __slots__ = ("_wheel_next", "_wheel_prev", "number")

    def __init__(self, number: int) -> None:
        # Every member keeps this int as its ``_slot``: one object, not one each (32 bytes).
        self.number = number
        self._wheel_next: _Slot | ClientConnection = self
        self._wheel_prev: _Slot | ClientConnection = self

    def link(self, conn: ClientConnection) -> None:
        """Put ``conn`` at the end of this slot."""
        last = self._wheel_prev
        conn._wheel_prev = last
        conn._wheel_next = self
        last._wheel_next = conn
        self._wheel_prev = conn

    def members(self) -> list[ClientConnection]:
        """The connections filed here, in order (left linked)."""
        found = []
        node = self._wheel_next
        while node is not self:
            assert isinstance(node, ClientConnection) and node._wheel_next is not None
            found.append(node)
            node = node._wheel_next
        return found

    def take_all(self) -> list[ClientConnection]:
        """Unlink every member and return them, in the order they were filed."""
        members = []
        node = self._wheel_next
        while node is not self:
            assert isinstance(node, ClientConnection)
            members.append(node)
            after = node._wheel_next
            node._wheel_next = node._wheel_prev = None
            assert after is not None
            node = after
        self._wheel_next = self._wheel_prev = self
        return members


def _unlink_from_wheel(conn: ClientConnection) -> None:
    after, before = conn._wheel_next, conn._wheel_prev
    if after is None or before is None:
        return
    before._wheel_next = after
    after._wheel_prev = before
    conn._wheel_next = conn._wheel_prev = None


class _Deadlines:
    """Every client connection's deadline on one loop timer, in DEADLINE_SLOT slots.

    A connection sits in the slot of its deadline (rounded up); when the slot's time
    comes, each connection in it checks its own deadline, which may have moved later
    meanwhile (a request came), and files itself again if so. The timer runs only
    while some slot is filled; the wheel forgets its loop when it empties.
    """

    __slots__ = ("heap", "loop", "slots", "timer", "timer_slot")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.slots: dict[int, _Slot] = {}
        self.heap: list[int] = []  # the filled slots' numbers
        self.timer: asyncio.TimerHandle | None = None
        self.timer_slot = 0

    def add(self, conn: ClientConnection, due: float) -> int:
        """File ``conn`` for ``due`` (loop time); returns its slot."""
        slot = math.ceil(due / DEADLINE_SLOT)
        members = self.slots.get(slot)
        if members is None:
            members = self.slots[slot] = _Slot(slot)
            heapq.heappush(self.heap, slot)
        _unlink_from_wheel(conn)
        members.link(conn)
        if self.timer is None or slot < self.timer_slot:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_at(slot * DEADLINE_SLOT, self._tick)
            self.timer_slot = slot
        return members.number

    def _tick(self) -> None:
        self.timer = None
        now = self.loop.time()
        heap, slots = self.heap, self.slots
        due: list[ClientConnection] = []
        while heap and heap[0] * DEADLINE_SLOT <= now:
            members = slots.pop(heapq.heappop(heap), None)
            if members is not None:
                due.extend(members.take_all())
        for conn in due:
            conn._deadline_reached()
        while heap and (heap[0] not in slots or slots[heap[0]]._wheel_next is slots[heap[0]]):
            slots.pop(heapq.heappop(heap), None)  # slots emptied by discard
        if heap:
            if self.timer is None or heap[0] < self.timer_slot:
                if self.timer is not None:
                    self.timer.cancel()
                self.timer = self.loop.call_at(heap[0] * DEADLINE_SLOT, self._tick)
                self.timer_slot = heap[0]
        elif self.timer is None and _wheels.get(self.loop) is self:
            del _wheels[self.loop]


_wheels: dict[asyncio.AbstractEventLoop, _Deadlines] = {}


def _wheel() -> _Deadlines:
    loop = asyncio.get_running_loop()
    wheel = _wheels.get(loop)
    if wheel is None:
        for old in [old for old in _wheels if old.is_closed()]:
            del _wheels[old]  # a loop closed with connections still filed (tests)
        wheel = _wheels[loop] = _Deadlines(loop)
    return wheel


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

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...

    def answer_now(self, request: Request) -> Coroutine[Any, Any, None] | None: ...


def write_whole(transport: asyncio.Transport, head: bytes, data: bytes) -> None:
    """A head and a body in memory: one write when small (no waiting: flow control is the
    caller's, before its next write)."""
    if len(data) < 16384:
        transport.write(head + data)
    else:
        transport.writelines((head, data))


async def write_reply_body(conn: ClientConnection, head: bytes, body: Body, **context: Any) -> None:
    """Send a response head and its body: one write for small bodies, framed chunks when the
    length is unknown. A body that fails after the head went out aborts the connection: the
    only honest signal left to the client."""
    transport = conn.transport
    if transport is None:
        return
    if type(body) is BytesBody:
        write_whole(transport, head, body.data)
        await conn.drain()
        return
    await conn.write(head)
    try:
        if body.length is not None:
            await body.write_to(conn)
        else:
            async for chunk in body.chunks():
                if chunk:
                    await conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            await conn.write(b"0\r\n\r\n")
    except ConnectionError:
        raise
    except Exception as exc:
        log.warning("response aborted mid-body", error=str(exc), **context)
        if conn.transport is not None:
            conn.transport.abort()


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
        self._wheel_next: _Slot | ClientConnection | None = None  # its neighbours there
        self._wheel_prev: _Slot | ClientConnection | None = None
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
            and "Upgrade" not in head.headers
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
        if "Upgrade" in head.headers:
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
        server_line: str = "",
    ) -> bytes:
        """The serialised status line and headers for a reply.

        ``server_line`` ("Server: ...\\r\\n"): the edge's own, in place of any Server
        field. Stored fields that nobody merged (a cache hit) go out as stored.
        Raises ValueError when a field would smuggle a line in (CR or LF).
        """
        status = reply.status
        unmerged = reply.unmerged()
        if unmerged is not None and server_line and unmerged[0].server:
            unmerged = None  # a stored Server field the edge replaces: merge, then drop it
        if unmerged is None:
            stored = b""
            headers = reply.headers
            if status != 101:
                # The edge frames every response itself, whatever a feature left behind.
                for name in _FRAMING:
                    if name in headers:
                        headers.popall(name)
            if server_line and "Server" in headers:
                headers.popall("Server")
            dated = "Date" in headers
        else:
            wire, headers = unmerged
            stored = wire.data
            dated = wire.date or "Date" in headers
        reason = reply.reason
        if reason is None:
            reason = _REASONS.get(status, "Unknown")
        elif "\r" in reason or "\n" in reason:
            raise ValueError("CR or LF inside a reason phrase")
        # Fields from features or members are checked (field_lines); the edge's own below are not.
        # A stored reply (a hit, a static file, a fixed answer) often adds none.
        lines = [field_lines(headers.items())] if headers else []
        if extra:
            lines.append(field_lines(extra))
        if server_line:
            lines.append(server_line)
        if not dated:
            lines.append(f"Date: {http_date()}\r\n")
        if status == 101 or status == 204 or status == 304 or 100 <= status < 200:
            pass
        elif length is not None:
            lines.append(f"Content-Length: {length}\r\n")
        elif request.head.method != "HEAD":
            lines.append("Transfer-Encoding: chunked\r\n")
        if not keep_alive:
            lines.append("Connection: close\r\n")
        elif request.head.version == "HTTP/1.0":
            lines.append("Connection: keep-alive\r\n")
        text = "".join(lines)
        first = _STATUS_LINES.get((status, reason))
        if first is None:
            first = f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1", "replace")
            if len(_STATUS_LINES) < 256:
                _STATUS_LINES[(status, reason)] = first
        return first + stored + text.encode("latin-1", "replace") + b"\r\n"

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
        body = f"<html><body><h1>{status} {_REASONS.get(status, '')}</h1></body></html>\n"
        self.transport.write(
            (
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Bad Request')}\r\n"
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
        if parser is not None:
            if not self.edge.parsers.give(parser):
                self._arm_head_deadline()  # a head has begun (or the stream went bad)
                return
            self.parser = None
        self._set_deadline(self.edge.config.edge.keepalive_timeout, False)

    def _arm_head_deadline(self) -> None:
        self._set_deadline(self.edge.config.edge.header_timeout, True)

    def _set_deadline(self, seconds: float, head: bool) -> None:
        """Filed in the deadline wheel lazily: a later deadline keeps the slot, which files the
        connection again when it comes early; only an earlier one costs a new filing."""
        loop = asyncio.get_running_loop()
        due = loop.time() + seconds
        self._due = due
        self._head_deadline = head
        slot = self._slot
        if not slot or slot > math.ceil(due / DEADLINE_SLOT):
            self._slot = _wheel().add(self, due)  # out of the later slot, into this one

    def _cancel_deadline(self) -> None:
        self._due = 0.0
        if self._slot:
            _unlink_from_wheel(self)
            self._slot = 0

    def _deadline_reached(self) -> None:
        self._slot = 0
        due = self._due
        if not due:
            return  # a request came in the meantime
        loop = asyncio.get_running_loop()
        if loop.time() < due:
            self._slot = _wheel().add(self, due)
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
