"""A lean HTTP/1.1 client for talking to members: one request per connection at a time.

Why not aiohttp's client: per request it builds URL objects, resolves, runs
happy-eyeballs, tracing and cookie hooks, and costs more than the whole rest
of the proxy. Members are known addresses and the edge re-frames everything,
so a small client does: uvloop's ``create_connection``, one write of the
serialised request, and a sans-I/O response parser (``ResponseParser``, h11's
"bytes in, events out") that feeds the body straight into the edge's buffer.

Theory of operation of ``ResponseParser``: it is fed bytes and keeps state
``head`` -> ``body`` -> ``done``. The head is parsed once ``\\r\\n\\r\\n`` is
seen; 1xx interim responses are set aside in ``interim`` (the connection
hands them to ``on_interim``, which forwards them to the client). Framing follows RFC 9112 6.3:
no body for HEAD/1xx/204/304; Transfer-Encoding chunked wins over
Content-Length (and the CL is ignored); otherwise Content-Length; otherwise
the body runs to EOF. Anything ambiguous or malformed raises
``UpstreamProtocolError`` and the edge answers 502. Bytes past a complete
response end it there and close the connection (``excess``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable

from multidict import CIMultiDict

from edge.core.spool import SpoolFull
from edge.http.http1 import chunk_size, split_fields

MAX_HEAD = 64 * 1024
MAX_HEADERS = 100

# A 1xx interim response: status, reason phrase, header fields.
Interim = tuple[int, str, list[tuple[str, str]]]


class UpstreamError(Exception):
    """Base of the failures the proxy classifies."""


class ConnectFailed(UpstreamError):
    """Could not connect (refused, unreachable, connect timeout): nothing was sent."""


class ReadTimeout(UpstreamError):
    """The member went quiet for longer than read_timeout."""


class UpstreamProtocolError(UpstreamError):
    """A broken response or a connection lost before the response was complete."""


class NotSent(ConnectFailed, UpstreamProtocolError):
    """The connection was reset or closed before a byte of the request went out: as safe
    to retry as a refused connect, whatever the method."""


class ResponseParser:
    """Sans-I/O HTTP/1.1 response parser; ``feed()`` returns body chunks as they arrive."""

    __slots__ = (
        "_buf",
        "_chunk_left",
        "_chunk_state",
        "_headers",
        "_length",
        "_mode",
        "excess",
        "head_request",
        "interim",
        "keep_alive",
        "names",
        "pairs",
        "reason",
        "state",
        "status",
        "tail",
    )

    def __init__(self, head_request: bool = False) -> None:
        self.head_request = head_request
        self.state = "head"
        self.status = 0
        self.reason = ""
        # The final response's fields as received (OWS stripped) and their names in lower
        # case; the CIMultiDict is built only if someone asks for ``headers`` (a proxied
        # response goes out from the pairs: edge/core/fields.py ``ResponseCleaner.member_fields``).
        self.pairs: list[tuple[str, str]] = []
        self.names: list[str] = []
        self._headers: CIMultiDict[str] | None = None
        self.keep_alive = True
        self._buf = b""
        self._mode = ""  # "length", "chunked", "eof", "none"
        self._length = 0
        self._chunk_left = 0
        self._chunk_state = "size"  # "size", "data", "crlf", "trailer"
        self.tail = b""  # bytes after a 101 head: the new protocol's, not ours
        self.excess = False  # bytes came after the framed end: the member is out of step
        self.interim: list[Interim] = []  # 1xx responses not yet handed on

    def feed(self, data: bytes) -> list[bytes]:
        """Consume bytes; return the body chunks they completed."""
        out: list[bytes] = []
        buf = self._buf + data if self._buf else data
        self._buf = b""
        while buf:
            if self.state == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise UpstreamProtocolError("response head too large")
                    self._buf = buf
                    return out
                if end > MAX_HEAD:  # the head may arrive whole in one read
                    raise UpstreamProtocolError("response head too large")
                self._parse_head(buf[:end])
                buf = buf[end + 4 :]
                if self.state == "head":  # a 1xx interim response: skip it
                    continue
            elif self.state == "body":
                buf = self._body(buf, out)
            else:
                if self.status == 101:
                    self.tail += buf
                elif buf.strip():
                    # More bytes than the framing said (a Content-Length smaller than the
                    # body): RFC 9112 6.3 lets the rest be discarded and forbids taking it
                    # for a separate response (cache poisoning); the connection is closed.
                    self.keep_alive = False
                    self.excess = True
                break
        return out

    @property
    def headers(self) -> CIMultiDict[str]:
        """The final response's fields (built on first use)."""
        headers = self._headers
        if headers is None:
            headers = self._headers = CIMultiDict(self.pairs)
        return headers

    @property
    def received_nothing(self) -> bool:
        """Not one byte of a response yet."""
        return self.state == "head" and not self._buf and not self.status

    def feed_eof(self) -> None:
        """The connection closed; fine only for an EOF-delimited body."""
        if self.state == "body" and self._mode == "eof":
            self.state = "done"
        elif self.state != "done":
            raise UpstreamProtocolError("connection closed before the response was complete")

    def _parse_head(self, head: bytes) -> None:
        text = head.decode("latin-1")
        parsed = _parse_head_fast(text)
        if parsed is None:
            # Refused by the fast path: the line-by-line parser names the fault (or takes
            # what the fast path leaves to it, as the grammar's edges).
            version, status, reason, pairs = _parse_head_lines(text)
            names = [name.lower() for name, _ in pairs]
        else:
            version, status, reason, pairs, names = parsed
        if 100 <= status < 200 and status != 101:
            # An interim response (RFC 9110 15.2): kept for the proxy to forward, never
            # part of the final response; the real one follows.
            self.interim.append((status, reason, pairs))
            return
        self.status = status
        self.reason = reason
        self.pairs = pairs
        self.names = names
        self._headers = None
        connection, te, lengths = _framing_fields(pairs, names)
        self.keep_alive = version == "HTTP/1.1" and (connection is None or "close" not in connection.lower())
        if self.head_request or status in (204, 304) or status == 101:
            self._mode = "none"
        elif te is not None:
            if te.replace(" ", "").lower().split(",")[-1] != "chunked":
                self._mode = "eof"  # RFC 9112 6.3.6: read until close
                self.keep_alive = False
            else:
                self._mode = "chunked"
        elif len(lengths) == 1 and len(value := lengths[0]) <= 18 and value.isdigit() and value.isascii():
            # The usual case, one plain length (its OWS stripped by the parser): what the
            # general rule below decides for it, without the join, split and set.
            self._mode = "length"
            self._length = int(value)
        elif lengths:
            values = {v.strip(" \t") for v in ",".join(lengths).split(",")}
            value = next(iter(values))
            if len(values) != 1 or not (value.isascii() and value.isdigit()) or len(value) > 18:
                raise UpstreamProtocolError("invalid Content-Length")
            self._mode = "length"
            self._length = int(value)
        else:
            self._mode = "eof"
            self.keep_alive = False
        self.state = "body"
        if self._mode == "none" or (self._mode == "length" and self._length == 0):
            self.state = "done"

    def _body(self, buf: bytes, out: list[bytes]) -> bytes:
        mode = self._mode
        if mode == "length":
            take = buf[: self._length]
            self._length -= len(take)
            out.append(take)
            if self._length == 0:
                self.state = "done"
            return buf[len(take) :]
        if mode == "eof":
            out.append(buf)
            return b""
        # chunked
        while buf:
            cs = self._chunk_state
            if cs == "size":
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        raise UpstreamProtocolError("bad chunk size line")
                    self._buf = buf
                    return b""
                size = chunk_size(buf[:end])
                if size is None:
                    raise UpstreamProtocolError("bad chunk size")
                buf = buf[end + 2 :]
                if size == 0:
                    self._chunk_state = "trailer"
                else:
                    self._chunk_left = size
                    self._chunk_state = "data"
            elif cs == "data":
                take = buf[: self._chunk_left]
                self._chunk_left -= len(take)
                out.append(take)
                buf = buf[len(take) :]
                if self._chunk_left == 0:
                    self._chunk_state = "crlf"
            elif cs == "crlf":
                if len(buf) < 2:
                    self._buf = buf
                    return b""
                if buf[:2] != b"\r\n":
                    raise UpstreamProtocolError("bad chunk terminator")
                buf = buf[2:]
                self._chunk_state = "size"
            else:  # trailer section: skip fields until the empty line
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise UpstreamProtocolError("response trailer too large")
                    self._buf = buf
                    return b""
                line, buf = buf[:end], buf[end + 2 :]
                if not line:
                    self.state = "done"
                    return buf
        return b""


# Field names seen in members' heads -> their lower case, each checked once as a token: a
# member sends the same few names on every response, so one dict lookup per field checks
# and folds it (a regular expression over the whole head, then a findall for its pairs,
# were two thirds of a member head's parse: 3.8 of 5.8 us for nginx's 8 fields). Bounded by
# http1.split_fields (MAX_FIELD_NAMES): names are the member's choice.
_NAMES: dict[str, str] = {}


def _parse_head_fast(text: str) -> tuple[str, int, str, list[tuple[str, str]], list[str]] | None:
    """A member's head (no final CRLF) as (version, status, reason, pairs, lower-case names),
    or None when it is not plainly valid: the line-by-line parser then decides.

    Takes exactly what ``HTTP/1.[0-9] SP 3DIGIT [SP reason] CRLF *(token ":" value CRLF)``
    takes, values free of CR, LF and NUL, with OWS stripped from each value. Typed for the
    compiled build by edge/upstream/client.pxd (the status line's characters compared as C
    characters; http1.split_fields says why).
    """
    lines = text.split("\r\n")
    n = len(lines) - 1
    # Each CR and LF is part of a line break (and no NUL anywhere): checked once for the head.
    if text.count("\r") != n or text.count("\n") != n or "\x00" in text or n > MAX_HEADERS:
        return None
    first = lines[0]
    if len(first) < 12 or not first.startswith("HTTP/1.") or first[8] != " ":
        return None
    minor = first[7]
    d1 = first[9]
    d2 = first[10]
    d3 = first[11]
    if (
        not ("0" <= minor <= "9")
        or not ("0" <= d1 <= "9")
        or not ("0" <= d2 <= "9")
        or not ("0" <= d3 <= "9")
        or (len(first) > 12 and first[12] != " ")
    ):
        return None
    fields = split_fields(lines, _NAMES)
    if fields is None:
        return None
    status = (ord(d1) - 48) * 100 + (ord(d2) - 48) * 10 + (ord(d3) - 48)
    return first[:8], status, first[13:], fields[0], fields[1]


def _framing_fields(
    pairs: list[tuple[str, str]], names: list[str]
) -> tuple[str | None, str | None, list[str]]:
    """The framing fields of a member's head, found by their lower-case names: the first
    Connection and Transfer-Encoding values and every Content-Length (as the CIMultiDict
    lookups they replace found them)."""
    connection: str | None = None
    te: str | None = None
    lengths: list[str] = []
    if "connection" in names or "transfer-encoding" in names or "content-length" in names:
        for i in range(len(names)):
            name = names[i]
            if name == "content-length":
                lengths.append(pairs[i][1])
            elif name == "connection":
                if connection is None:
                    connection = pairs[i][1]
            elif name == "transfer-encoding" and te is None:
                te = pairs[i][1]
    return connection, te, lengths


def _parse_head_lines(text: str) -> tuple[str, int, str, list[tuple[str, str]]]:
    """A response head line by line: (version, status, reason, fields); names the fault."""
    crlf = text.count("\r\n")
    if text.count("\n") != crlf or text.count("\r") != crlf or "\x00" in text:
        raise UpstreamProtocolError("bare CR/LF or NUL in the response head")
    lines = text.split("\r\n")
    parts = lines[0].split(" ", 2)
    # RFC 9112 4: status-code = 3DIGIT. str.isdigit() alone also takes "²" (latin-1 0xB2),
    # which int() then refuses with a ValueError the caller does not expect.
    code = parts[1] if len(parts) > 1 else ""
    if not parts[0].startswith("HTTP/1.") or len(code) != 3 or not (code.isascii() and code.isdigit()):
        raise UpstreamProtocolError("bad status line")
    if len(lines) > MAX_HEADERS + 1:
        raise UpstreamProtocolError("too many response headers")
    pairs = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name[-1] in " \t" or " " in name:
            raise UpstreamProtocolError("bad header line")
        pairs.append((name, value.strip(" \t")))
    return parts[0], int(code), parts[2] if len(parts) > 2 else "", pairs


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to a member; a request/response at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.parser: ResponseParser | None = None
        self.sink: Callable[[bytes], None] | None = None
        self.head_ready: asyncio.Future[None] | None = None
        self.done: asyncio.Future[None] | None = None
        self.read_timeout = 30.0
        self.last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False
        self.idle_handle: asyncio.TimerHandle | None = None
        self.idle_since = 0.0  # loop time it went back to its pool; 0.0 while in use
        # After a 101, the client's transport: bytes are piped, not parsed.
        self.tunnel: asyncio.Transport | None = None
        # Taken from the idle pool: the member may have closed it just before we wrote.
        self.reused = False
        # Called with each 1xx interim response of the current request (forwarding).
        self.on_interim: Callable[[int, str, list[tuple[str, str]]], None] | None = None

    # --- asyncio callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        parser = self.parser
        if parser is None:
            self.abort()  # bytes on an idle connection: it cannot be reused
            return
        self.last_data = self.loop.time()
        try:
            chunks = parser.feed(data)
        except UpstreamProtocolError as exc:
            self._fail(exc)
            return
        if parser.interim:
            interim, parser.interim = parser.interim, []
            if self.on_interim is not None:
                for status, reason, fields in interim:
                    self.on_interim(status, reason, fields)
        head = self.head_ready
        if head is not None and parser.state != "head" and not head.done():
            head.set_result(None)
        sink = self.sink
        if sink is not None:
            try:
                for chunk in chunks:
                    if chunk:
                        sink(chunk)
            except (UpstreamError, SpoolFull, OSError) as exc:  # over the cap, or the temp disk is full
                self._fail(exc if isinstance(exc, UpstreamError) else UpstreamProtocolError(str(exc)))
                return
        if parser.state == "done":
            self._finish()

    def pause_writing(self) -> None:
        if self.tunnel is not None:
            self.tunnel.pause_reading()

    def resume_writing(self) -> None:
        if self.tunnel is not None:
            self.tunnel.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        parser = self.parser
        if parser is None or parser.state == "done":
            return
        try:
            parser.feed_eof()
        except UpstreamProtocolError as err:
            self._fail(err)
            return
        self._finish()

    # --- request cycle ------------------------------------------------------------------

    def start(
        self, request: bytes, head_request: bool, read_timeout: float, *, want_head: bool = False
    ) -> None:
        """Send a serialised request (head and body in one write) and begin parsing its
        response; ``done`` resolves when it is complete, ``head_ready`` (``want_head``, for
        streaming) when its head is in."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise NotSent("connection closed before the request was sent")
        loop = self.loop
        self.parser = ResponseParser(head_request)
        self.head_ready = loop.create_future() if want_head else None
        self.done = loop.create_future()
        self.read_timeout = read_timeout
        self.last_data = now = loop.time()
        # One read timer per connection, moved lazily: a timer still armed from an earlier
        # request fires, finds a later last_data and re-arms itself, so a pooled connection
        # costs no timer churn per request.
        if self._timer is None:
            self._timer = loop.call_at(now + read_timeout, self._check_timeout)
        transport.write(request)
        if transport.is_closing():
            # The first write failed outright (reset, broken pipe): the transport only goes
            # on after a partial write, so not one byte of the request left.
            raise NotSent("connection reset before the request was sent")

    def _check_timeout(self) -> None:
        self._timer = None
        if self.done is None or self.done.done():
            return  # between requests: the next start() arms a timer again
        due = self.last_data + self.read_timeout
        if self.loop.time() < due:
            self._timer = self.loop.call_at(due, self._check_timeout)
            return
        self._fail(ReadTimeout("member timed out"))

    def _fail(self, exc: Exception) -> None:
        for fut in (self.head_ready, self.done):
            if fut is not None and not fut.done():
                fut.set_exception(exc)
                # Callers await one of the two, whichever stage they reached; the
                # other is never read, which is fine: do not log it as lost.
                fut.exception()
        self.abort()

    def _finish(self) -> None:
        # The read timer stays (see start): it finds the request done when it fires.
        head, done = self.head_ready, self.done
        if head is not None and not head.done():
            head.set_result(None)
        if done is not None and not done.done():
            done.set_result(None)

    def pause(self) -> None:
        """Stop reading (streaming consumer is behind)."""
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def reusable(self) -> bool:
        """Can this connection carry another request?"""
        p = self.parser
        return (
            not self.closed
            and self.transport is not None
            and p is not None
            and p.state == "done"
            and p.keep_alive
        )

    def reset(self) -> None:
        """Back to idle after a completed response."""
        self.parser = None
        self.sink = None
        self.on_interim = None
        self.head_ready = None
        self.done = None
        self.resume()

    def abort(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.abort()
            self.transport = None
        self.closed = True


class MemberConnections:
    """Connections to one member: new ones, or reused idle ones (keepalive = "pool")."""

    __slots__ = ("_loop", "host", "idle", "idle_timeout", "keepalive", "port")

    def __init__(self, host: str, port: int, keepalive: bool, idle_timeout: float) -> None:
        self.host = host
        self.port = port
        self.keepalive = keepalive
        self.idle_timeout = idle_timeout
        self.idle: deque[UpstreamConnection] = deque()
        # The loop its connections live on (their transports are that loop's), asked for once.
        self._loop: asyncio.AbstractEventLoop | None = None

    def take(self) -> UpstreamConnection | None:
        """An idle connection that is still open, or None (no waiting)."""
        idle = self.idle
        while idle:
            conn = idle.pop()  # most recently used: least likely closed by the member
            conn.idle_since = 0.0  # its idle timer stays armed and finds it in use (_expire)
            if not conn.closed:
                conn.reused = True
                return conn
        return None

    async def get(self, connect_timeout: float, fresh: bool) -> UpstreamConnection:
        """An idle connection if one is alive (and ``fresh`` is not asked), else a new one."""
        if not fresh:
            conn = self.take()
            if conn is not None:
                return conn
        return await self.connect(connect_timeout)

    async def connect(self, connect_timeout: float) -> UpstreamConnection:
        """A new connection; ConnectFailed when it cannot be made (nothing was sent).

        The deadline is ``asyncio.timeout``'s, written out: one timer that cancels this task,
        and that cancellation (and only that one) turned into ConnectFailed. asyncio.timeout
        asked for the running loop three times per connection (a getpid(2) each on CPython
        3.11: strace counts 3 per use) and ran a dozen Python calls around one timer.
        """
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None
        cancelling = task.cancelling()
        fired = [False]
        timer = loop.call_at(loop.time() + connect_timeout, _time_out, task, fired)
        try:
            _, conn = await loop.create_connection(lambda: UpstreamConnection(loop), self.host, self.port)
        except asyncio.CancelledError:
            # Ours if the timer fired and no one else asked for a cancellation meanwhile.
            if fired[0] and task.uncancel() <= cancelling:
                raise ConnectFailed("connect timeout") from None
            raise
        except OSError as exc:
            if fired[0]:
                task.uncancel()
            raise ConnectFailed(exc.strerror or str(exc)) from None
        finally:
            timer.cancel()
        if fired[0]:
            task.uncancel()  # connected as the timer fired: as asyncio.timeout, the count goes back
        return conn

    def put(self, conn: UpstreamConnection) -> None:
        """Keep a finished connection for reuse, or close it."""
        if self.keepalive and conn.reusable():
            conn.reset()
            loop = conn.loop
            conn.idle_since = now = loop.time()
            # One idle timer per connection, moved lazily (as the read timer in start()): a
            # timer made on every put and cancelled on every take was 2-3 % of a pooled
            # proxied request's CPU (py-spy, bench/proxy_bench.py --routes ka).
            if conn.idle_handle is None:
                conn.idle_handle = loop.call_at(now + self.idle_timeout, self._expire, conn)
            self.idle.append(conn)
        else:
            conn.abort() if not conn.reusable() else _close(conn)

    def _expire(self, conn: UpstreamConnection) -> None:
        conn.idle_handle = None
        since = conn.idle_since
        if not since or conn.closed:
            return  # in use again (its next put arms a timer), or gone
        due = since + self.idle_timeout
        if conn.loop.time() < due:
            conn.idle_handle = conn.loop.call_at(due, self._expire, conn)  # used meanwhile
            return
        try:
            self.idle.remove(conn)
        except ValueError:
            return
        _close(conn)

    def close(self) -> None:
        while self.idle:
            _close(self.idle.pop())


def _time_out(task: asyncio.Task[object], fired: list[bool]) -> None:
    """A connect's deadline: mark it, then cancel the task waiting for the connection."""
    fired[0] = True
    task.cancel()


def _close(conn: UpstreamConnection) -> None:
    if conn.transport is not None:
        conn.transport.close()
        conn.transport = None
    conn.closed = True


def serialize_request(
    method: str,
    target: str,
    headers: CIMultiDict[str],
    body: bytes | None,
    close: bool,
) -> bytes:
    """The request as bytes, framed by the edge (Content-Length, never chunked)."""
    # The pieces joined once: an f-string per field formatted each piece on its own (three
    # PyObject_Format calls of ~900 instructions a field, callgrind).
    pieces = [method, " ", target, " HTTP/1.1\r\n"]
    for name, value in headers.items():
        pieces += (name, ": ", value, "\r\n")
    if body is not None:
        pieces.append(f"Content-Length: {len(body)}\r\n")
    if close:
        pieces.append("Connection: close\r\n")
    pieces.append("\r\n")
    try:
        # The client's head was read as latin-1 (edge/http/http1.py): each byte one character,
        # so encoding back as latin-1 forwards its obs-text bytes (0x80-0xff in a field value
        # or the target) as they came. As UTF-8 each such byte became two: "caf\xc3\xa9" in a
        # Content-Disposition reached the member as "caf\xc3\x83\xc2\xa9". surrogateescape
        # gives back the byte behind a path percent-decoded that way.
        head = "".join(pieces).encode("latin-1", "surrogateescape")
    except (TypeError, UnicodeEncodeError):
        # A value that is no str (a feature may set one), or a character no byte stands for:
        # line by line, each line formatted and encoded on its own.
        head = b"".join(map(_encode_line, _request_lines(method, target, headers, body, close)))
    return head + body if body else head


def _request_lines(
    method: str, target: str, headers: CIMultiDict[str], body: bytes | None, close: bool
) -> list[str]:
    """The request head's lines, each formatted as a str."""
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    for name, value in headers.items():
        lines.append(f"{name}: {value}\r\n")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}\r\n")
    if close:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    return lines


def _encode_line(line: str) -> bytes:
    """One line of a head holding a character no byte stands for: that line alone as UTF-8.

    Such a character comes from a configured value (TOML is Unicode), so its field goes
    out as UTF-8 while the client's own fields keep their bytes.
    """
    try:
        return line.encode("latin-1", "surrogateescape")
    except UnicodeEncodeError:
        return line.encode("utf-8", "surrogateescape")


class StreamRelay:
    """Relays a response body as it arrives (buffering = false), with backpressure.

    Installed before the request is sent, so no early chunk is missed.
    """

    def __init__(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        self.queue: deque[bytes] = deque()
        self.wake: asyncio.Future[None] | None = None
        conn.sink = self._add

    def _add(self, chunk: bytes) -> None:
        self.queue.append(chunk)
        if len(self.queue) > 16:
            self.conn.pause()
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body chunks; raises the member's failure if it breaks mid-body."""
        conn, queue = self.conn, self.queue
        done = conn.done
        assert done is not None
        while True:
            while queue:
                yield queue.popleft()
                if len(queue) < 4:
                    conn.resume()
            if done.done():
                done.result()
                if not queue:
                    return
                continue
            self.wake = conn.loop.create_future()
            await asyncio.wait((self.wake, done), return_when=asyncio.FIRST_COMPLETED)
