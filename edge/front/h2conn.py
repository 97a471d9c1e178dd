"""HTTP/2 to clients: one asyncio Protocol per connection, its streams mapped onto the pipeline.

Theory of operation
-------------------
A connection arrives by ALPN ``h2`` on the HTTPS listener (edge/front/tls.py
hands the transport over after the handshake) or, where ``[http2] h2c`` is on,
as cleartext prior knowledge on the plain listener (``H2cSniffingConnection``,
edge/front/h2accept.py,
sees the client preface and hands over). Framing, the stream states and flow
control are the edge's own ``ServerWire`` (edge/http/h2wire.py, HPACK decoding by
the ``hpack`` package), which calls this connection back as its ``WireHandler``.

A request is handed to the pipeline only once it is complete, body included,
as for HTTP/1.1: ``request_head`` turns the header list into the same
``Head`` (same path normalisation), each stream is the ``conn`` of a
``Request`` and ``Edge.answer_now`` routes it (the same ``parse_host``),
runs the same chain and calls back ``H2Stream.respond`` to write the reply, so
static, cache, compression, header hygiene, DoS limits, bans, metrics and
access logs are the same for both protocols. Upstream stays HTTP/1.1.

Buffering and flow control together: a reply reaches ``respond`` whole (the
upstream handler reads the member's response before answering, releasing the
member at once), and is written in DATA frames within the client's stream and
connection windows. A body that has to wait for a window (or for a full socket
to drain) waits at most ``send_timeout``; a client that opens a window of 0 and
never reads is then cut, and by then it held no member slot, only its buffered
reply. Request bodies count against ``max_body_size`` across DATA frames (413,
then RST_STREAM NO_ERROR, RFC 9113 8.1), and against ``body_timeout`` (408).

Limits and attacks (each has a test in tests/integration/test_h2_attacks.py):
requests in flight per connection are capped at ``max_concurrent_streams``
(streams reset by the client still count until their handler ends, so a
rapid reset cannot pile work up), and client resets, SETTINGS, PING, PRIORITY,
empty DATA and WINDOW_UPDATE frames are metered (edge/http/h2.py
``FloodMeter``): past a budget the connection gets GOAWAY ENHANCE_YOUR_CALM
and, with the ``dos`` feature on, the client is banned like any abuser.
Shutdown and drain send GOAWAY (NO_ERROR, the last stream taken) and let the
open streams finish; later streams are refused (REFUSED_STREAM, safe to retry).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, cast

import structlog

from edge.features.dos import DosDetector
from edge.front.connection import ConnectionHost
from edge.front.framing import http_date
from edge.front.h2stream import PAGES, H2Stream, Stats, StreamGone
from edge.front.links import Linked
from edge.http.h2 import FloodMeter, Malformed, request_head, response_fields
from edge.http.h2wire import ErrorCodes, H2Error, ServerWire, StreamClosed
from edge.http.http1 import ParseError
from edge.http.request import Request

log = structlog.get_logger("carousel.edge.h2")

# Frame budgets per FLOOD_WINDOW seconds. A browser sends a handful of SETTINGS and
# PINGs per connection and resets a page's worth of streams when the user navigates
# away; the attacks (CVE-2019-9512/9515/9518, CVE-2023-44487) send thousands a second.
FLOOD_WINDOW = 10.0
CONTROL_BUDGET = 1000  # SETTINGS, PING, PING ACK, PRIORITY, empty DATA
WINDOW_UPDATE_BUDGET = 1000  # plus two per DATA frame the edge sent (stream + connection)
RESETS_PER_STREAM_LIMIT = 2  # resets budget: this many times max_concurrent_streams
LINGER = 2.0  # seconds a closed connection still reads and discards (nginx's lingering close)


class H2ClientConnection(Linked, asyncio.Protocol):
    """One HTTP/2 client connection."""

    def __init__(self, edge: ConnectionHost, scheme: str) -> None:
        super().__init__()
        self.edge = edge
        self.scheme = scheme
        config = edge.config
        c = config.http2
        self.c = c
        self.max_body = config.edge.max_body_size
        self.max_headers = config.edge.max_headers
        self.server = config.edge.server_header
        self.wire = ServerWire(
            self,
            max_concurrent_streams=c.max_concurrent_streams,
            max_header_list_size=c.max_header_list_size,
            initial_window_size=c.initial_window_size,
        )
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.streams: dict[int, H2Stream] = {}  # streams still receiving their request
        self.active: set[H2Stream] = set()  # requests handed to the pipeline, not yet answered
        self.waiting: set[H2Stream] = set()  # replies waiting for a window or a drained socket
        self.paused = False  # the socket's buffer is full (asyncio flow control)
        self.draining = False  # a graceful GOAWAY went out
        self.last_stream = 0  # the last stream it took
        self.closed = False
        self.buffered = 0  # request body bytes held for streams still receiving
        self.data_frames = 0
        self.control = FloodMeter(CONTROL_BUDGET, FLOOD_WINDOW)
        self.updates = FloodMeter(WINDOW_UPDATE_BUDGET, FLOOD_WINDOW)
        self.resets = FloodMeter(RESETS_PER_STREAM_LIMIT * c.max_concurrent_streams, FLOOD_WINDOW)
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._lingering = False
        self._receiving = False  # inside data_received, which flushes at its end
        self._flush_due = False
        self.last_seen = 0  # the last stream handed to the pipeline (or answered by the edge)

    # --- asyncio callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport, admitted: bool = False) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if not admitted:
            peer = transport.get_extra_info("peername")
            self.peer = peer[0] if peer else ""
            if not self.edge.guard.admit(self.peer):
                self.transport = None
                self.closed = True
                transport.close()
                return
        # One set for both protocols: its users need only peer, transport and close_if_idle.
        self.edge.connections.add(self)
        Stats.connections += 1
        self.wire.start()
        self.flush()
        self._deadline(self.edge.config.edge.header_timeout)  # the preface and a first request

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.closed = True
        connections = self.edge.connections
        if self in connections:
            connections.discard(self)
            self.edge.guard.release(self.peer)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for stream in list(self.streams.values()) + list(self.active):
            self._gone(stream)
        self.streams.clear()

    def pause_writing(self) -> None:
        self.paused = True
        # Nothing more is read while the client does not read: the answers to its PINGs and
        # SETTINGS would pile up here otherwise (CVE-2019-9512, 9515).
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None:
            self.transport.resume_reading()
        self._wake_all()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self._receiving = True
        try:
            self._received(data)
        finally:
            self._receiving = False
        self.flush()
        if not self.closed:
            self._rearm()

    def _received(self, data: bytes) -> None:
        try:
            self.wire.receive(data)
        except H2Error as exc:
            self.wire.goaway(exc.code, self.wire.highest)
            if exc.code == ErrorCodes.ENHANCE_YOUR_CALM:
                # An HPACK bomb, an oversized header list, a CONTINUATION flood.
                self._abuse("protocol", str(exc))
                return
            self.flush()
            log.info("HTTP/2 protocol error", client=self.peer, error=str(exc))
            Stats.close("protocol_error")
            self.close()

    # --- what the wire found (edge/http/h2wire.py WireHandler) ---------------------------

    def on_request(self, sid: int, fields: list[tuple[bytes, bytes]], ended: bool) -> None:
        """A request's header list."""
        self._request(sid, fields, ended)

    def on_data(self, sid: int, data: bytes, ended: bool) -> None:
        """Request body bytes (or the end of the request, with its trailers dropped)."""
        if not data and not ended and self.control.hit(asyncio.get_running_loop().time()):
            self._flood("empty_data")  # CVE-2019-9518
            return
        stream = self.streams.get(sid)
        if stream is None or stream.body is None:
            return
        if data:
            stream.size += len(data)
            self.buffered += len(data)
            # Per request max_body_size, as HTTP/1.1; per connection four of them, so
            # max_concurrent_streams uploads in parallel cannot hold a hundred bodies.
            if stream.size > self.max_body or self.buffered > 4 * self.max_body:
                self._drop(stream)
                self._answer_error(sid, 413, False)
                return
            stream.body.append(data)
        if ended:
            self._complete(stream)

    def on_reset(self, sid: int) -> None:
        """The client reset a stream."""
        self._reset_by_client(sid, asyncio.get_running_loop().time())

    def on_stream_error(self, sid: int) -> None:
        """The wire reset a stream for a rule the client broke: metered like a client reset."""
        self._reset_by_client(sid, asyncio.get_running_loop().time())

    def on_window(self, sid: int) -> None:
        """A window opened (0: the connection's, or the client's SETTINGS)."""
        if sid:
            self._wake(sid)
        else:
            self._wake_all()

    def on_control(self, kind: str) -> None:
        """A frame that costs work and answers no request: metered."""
        now = asyncio.get_running_loop().time()
        if kind == "window_update":
            if self.updates.hit(now, allowance=2 * self.data_frames):
                self._flood("window_update")
        elif kind == "reset":
            if self.resets.hit(now):
                self._flood("rapid_reset")
        elif self.control.hit(now):
            self._flood(kind)

    def on_goaway(self, code: int) -> None:
        """The client is leaving: open streams finish (NO_ERROR), or everything stops."""
        if code == ErrorCodes.NO_ERROR:
            self.close_if_idle()
        else:
            self.close()

    # --- requests -----------------------------------------------------------------------

    def _request(self, sid: int, pairs: list[tuple[bytes, bytes]], ended: bool) -> None:
        if self.draining and sid > self.last_stream:
            self.wire.reset(sid, ErrorCodes.REFUSED_STREAM)  # after GOAWAY: safe to retry
            return
        loop_now = asyncio.get_running_loop().time()
        if len(self.active) + len(self.streams) >= self.c.max_concurrent_streams:
            # Reset streams whose handlers still run count: work in flight stays bounded.
            self.wire.reset(sid, ErrorCodes.REFUSED_STREAM)
            if self.resets.hit(loop_now):
                self._flood("rapid_reset")
            return
        self.last_seen = sid
        try:
            head = request_head(pairs, self.max_headers)
        except Malformed as exc:
            log.info("malformed HTTP/2 request", client=self.peer, error=str(exc))
            self.wire.reset(sid, ErrorCodes.PROTOCOL_ERROR)  # RFC 9113 8.1.1
            self.edge.metrics.count_request("-", 400)
            if self.resets.hit(loop_now):
                self._flood("malformed")
            return
        except ParseError as exc:
            self._answer_error(sid, exc.status, ended)
            return
        if head.method == "CONNECT":
            self._answer_error(sid, 405, ended)  # a reverse proxy tunnels nothing (no RFC 8441)
            return
        if head.body_length > self.max_body:
            self._answer_error(sid, 413, ended)
            return
        stream = H2Stream(self, sid)
        stream.head = head
        Stats.streams += 1
        if ended:
            self._dispatch(stream, None)
            return
        stream.body = []
        self.streams[sid] = stream
        stream.body_timer = asyncio.get_running_loop().call_later(
            self.edge.config.edge.body_timeout, self._body_late, stream
        )

    def _complete(self, stream: H2Stream) -> None:
        self._drop(stream)
        head = stream.head
        body = b"".join(stream.body) if stream.body else b""
        if head.headers.get("content-length") is not None and head.body_length != len(body):
            self.reset_stream(stream, ErrorCodes.PROTOCOL_ERROR)  # RFC 9113 8.1.1
            return
        stream.body = None
        self._dispatch(stream, body)

    def _drop(self, stream: H2Stream) -> None:
        """The stream stops receiving: its buffered bytes and its body timer go."""
        if self.streams.pop(stream.sid, None) is not None:
            self.buffered -= stream.size
        if stream.body_timer is not None:
            stream.body_timer.cancel()
            stream.body_timer = None

    def _body_late(self, stream: H2Stream) -> None:
        stream.body_timer = None
        if stream.sid in self.streams and not self.closed:
            self._drop(stream)
            self._answer_error(stream.sid, 408, False)
            self.flush()

    def _dispatch(self, stream: H2Stream, body: bytes | None) -> None:
        """Hand a complete request to the edge: answered here, or in a task."""
        self.active.add(stream)
        self._rearm()
        try:
            rest = self.edge.answer_now(Request(stream.head, stream, body))
        except Exception:
            log.exception("connection failed while answering")
            self.finished(stream)
            self.reset_stream(stream, ErrorCodes.INTERNAL_ERROR)
            return
        if rest is not None:
            self.edge.spawn(self._run(stream, rest))

    async def _run(self, stream: H2Stream, rest: Coroutine[Any, Any, None]) -> None:
        try:
            await rest
        except ConnectionError:
            pass
        except Exception:
            log.exception("stream failed while answering")
            self.reset_stream(stream, ErrorCodes.INTERNAL_ERROR)
        finally:
            self.finished(stream)  # idempotent: respond's done may have done it

    def _answer_error(self, sid: int, status: int, ended: bool) -> None:
        """A small error page on a stream the pipeline never sees (as HTTP/1.1's reject)."""
        page = PAGES[status]
        fields = response_fields(
            status, [("content-type", "text/html; charset=utf-8")], (), self.server, http_date(), len(page)
        )
        wire = self.wire
        try:
            wire.send_headers(sid, fields)
            if wire.window(sid) >= len(page) and len(page) <= wire.frame_size:
                wire.send_data(sid, page, True)
            else:
                wire.send_data(sid, b"", True)
            if not ended:
                # The rest of the request is not wanted (RFC 9113 8.1).
                wire.reset(sid, ErrorCodes.NO_ERROR)
        except StreamClosed:
            pass
        self.edge.metrics.count_request("-", status)

    def _reset_by_client(self, sid: int, now: float) -> None:
        stream = self.streams.get(sid)
        if stream is not None:
            self._drop(stream)
            stream.reset = True
        for s in self.active:
            if s.sid == sid:
                self._gone(s)
        if self.resets.hit(now):
            self._flood("rapid_reset")  # CVE-2023-44487

    # --- writing ------------------------------------------------------------------------

    def push(self, stream: H2Stream, data: bytes, pos: int, end: bool) -> int:
        """Send what the windows allow from ``pos``; the new position, or len(data) + 1 once
        everything (and END_STREAM, if ``end``) went out."""
        wire = self.wire
        sid = stream.sid
        total = len(data)
        try:
            while True:
                if stream.closing:
                    raise StreamGone("stream reset")
                left = total - pos
                if left == 0:
                    if end:
                        wire.send_data(sid, b"", True)
                    return total + 1
                window = wire.window(sid)
                if window <= 0:
                    return pos
                size = min(left, window, wire.frame_size)
                last = end and size == left
                wire.send_data(sid, data if size == total else data[pos : pos + size], last)
                self.data_frames += 1
                pos += size
                if last:
                    return total + 1
        except StreamClosed:
            raise StreamGone("stream closed") from None

    async def send(self, stream: H2Stream, data: bytes, end: bool, pos: int = 0) -> None:
        """Write body bytes from ``pos`` under the stream and connection windows, waiting at
        most ``send_timeout`` each time the client (or a full socket) leaves no room."""
        total = len(data)
        while True:
            if not self.paused:
                pos = self.push(stream, data, pos, end)
                if pos > total:
                    self.soon()
                    return  # queued; a full socket makes the next send wait
                self.flush()
            await self._wait_room(stream)

    async def _wait_room(self, stream: H2Stream) -> None:
        if self.transport is None or stream.closing:
            raise StreamGone("client went away")
        fut = asyncio.get_running_loop().create_future()
        stream.waiter = fut
        self.waiting.add(stream)
        try:
            await asyncio.wait_for(fut, self.c.send_timeout)
        except TimeoutError:
            # A window of 0 (or a socket nobody reads) for send_timeout: cut the client.
            log.info("HTTP/2 client stopped reading", client=self.peer, seconds=self.c.send_timeout)
            self._goaway(ErrorCodes.NO_ERROR, "stalled")
            self.close()
            raise StreamGone("client stopped reading") from None
        finally:
            stream.waiter = None
            self.waiting.discard(stream)

    def _wake(self, sid: int) -> None:
        for stream in self.waiting:
            if stream.sid == sid and stream.waiter is not None and not stream.waiter.done():
                stream.waiter.set_result(None)

    def _wake_all(self) -> None:
        for stream in self.waiting:
            if stream.waiter is not None and not stream.waiter.done():
                stream.waiter.set_result(None)

    def _gone(self, stream: H2Stream) -> None:
        stream.reset = True
        if stream.body_timer is not None:
            stream.body_timer.cancel()
            stream.body_timer = None
        if stream.waiter is not None and not stream.waiter.done():
            stream.waiter.set_exception(StreamGone("stream reset"))

    def reset_stream(self, stream: H2Stream, code: ErrorCodes) -> None:
        """Reset one stream (the others go on)."""
        self._gone(stream)
        if self.transport is not None and not self.closed:
            self.wire.reset(stream.sid, code)  # nothing when already closed on both sides
            self.flush()

    def finished(self, stream: H2Stream) -> None:
        """A stream's reply is out (or abandoned)."""
        self.active.discard(stream)
        if not self.active and not self.streams:
            if self.draining:
                self.close()  # the graceful drain is over
            else:
                self._rearm()

    def soon(self) -> None:
        """Flush at the end of this loop iteration: the replies finished in it go out in one
        write (one syscall, not one per stream); inside data_received its own flush does it."""
        if not self._receiving and not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_due = False
        self.flush()

    def flush(self) -> None:
        """Write what the wire has queued (a new buffer each time: TLS may keep the old one)."""
        wire = self.wire
        data = wire.out
        if data:
            wire.out = bytearray()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(data)

    # --- closing ------------------------------------------------------------------------

    def drain_gracefully(self) -> None:
        """GOAWAY NO_ERROR naming the last stream taken; open streams finish, then close."""
        if self.draining or self.closed:
            return
        self.draining = True
        self.last_stream = self.wire.highest
        # The streams in flight are still answered (RFC 9113 6.8).
        self.wire.goaway(ErrorCodes.NO_ERROR, self.last_stream)
        self.flush()
        Stats.close("no_error")

    def close_if_idle(self) -> bool:
        """Shutdown, drain or a ban: GOAWAY now, close once the open streams are answered."""
        self.drain_gracefully()
        if not self.active and not self.streams:
            self.close()
            return True
        return False

    def close(self) -> None:
        """Close after what was written is flushed, lingering: closing a socket with unread
        bytes sends a reset that can destroy the GOAWAY before the client reads it, so the
        write side is shut first and what still arrives is discarded for LINGER seconds."""
        if self.closed and self._lingering:
            return
        self.flush()  # replies queued for the end of this loop iteration go first
        self.closed = True
        self.wire.stopped = True  # nothing more is parsed
        transport = self.transport
        if transport is not None:
            try:
                if transport.can_write_eof() and not transport.is_closing():
                    self._lingering = True
                    transport.write_eof()
                    asyncio.get_running_loop().call_later(LINGER, transport.close)
                else:
                    transport.close()
            except OSError:  # the client is gone already
                transport.abort()
        for stream in list(self.active):
            self._gone(stream)

    def _goaway(self, code: ErrorCodes, reason: str) -> None:
        self.wire.goaway(code, self.last_seen)
        self.flush()
        Stats.close(reason)

    def _flood(self, kind: str) -> None:
        self._goaway(ErrorCodes.ENHANCE_YOUR_CALM, "flood")
        self._report_abuse(f"HTTP/2 {kind} flood")
        self.close()

    def _abuse(self, kind: str, detail: str) -> None:
        self.flush()  # GOAWAY ENHANCE_YOUR_CALM is queued
        Stats.close("flood")
        self._report_abuse(f"HTTP/2 {kind}: {detail}")
        self.close()

    def _report_abuse(self, reason: str) -> None:
        """Tell the dos feature: the client is banned like any other abuser."""
        log.warning("HTTP/2 client abusive", client=self.peer, reason=reason)
        for feature in getattr(self.edge, "features", ()):
            if isinstance(feature, DosDetector):
                if feature.allowed(self.peer):
                    return
                feature.ban(feature.keys(self.peer), reason)

    # --- timers -------------------------------------------------------------------------

    def _rearm(self) -> None:
        """Idle (no stream open): idle_timeout; a header block half received: header_timeout."""
        if self.active or self.streams:
            self._due = 0.0
            return
        seconds = self.edge.config.edge.header_timeout if self.wire.in_header_block else self.c.idle_timeout
        self._deadline(seconds)

    def _deadline(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + seconds
        self._due = due
        if self._timer is None or self._timer.when() > due:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(due, self._expired)

    def _expired(self) -> None:
        self._timer = None
        if not self._due or self.closed:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._due:
            self._timer = loop.call_at(self._due, self._expired)
            return
        if not self.active and not self.streams:
            self._goaway(ErrorCodes.NO_ERROR, "idle")
            self.close()
