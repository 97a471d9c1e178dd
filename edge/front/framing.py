"""HTTP/1.1 response framing: the status line and fields of a reply, and writing it out.

Sans-I/O but for the two writers at the end: ``response_head`` turns a Reply into the
bytes of its head (the edge frames every response itself: Content-Length when the body's
length is known, chunked otherwise, nothing for HEAD/204/304/1xx; a feature's framing
fields are dropped, a stored reply's fields go out as they were serialised), and
``write_whole``/``write_reply_body`` send a head with its body. Used by the client
connection (edge/front/connection.py), the Edge (edge/front/server.py) and the forward
proxy's listener.
"""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from multidict import CIMultiDict, istr

from edge.core.pipeline import Body, BytesBody
from edge.http.http1 import field_lines

if TYPE_CHECKING:
    from edge.core.pipeline import Reply

log = structlog.get_logger("carousel.edge.connection")

_FRAMING = tuple(istr(n) for n in ("Content-Length", "Transfer-Encoding", "Connection", "Keep-Alive"))
_SERVER = istr("Server")
_DATE = istr("Date")
REASONS = {s.value: s.phrase for s in HTTPStatus}
_STATUS_LINES: dict[tuple[int, str], bytes] = {}  # "HTTP/1.1 200 OK\r\n", ...: bounded, reasons vary
# The status line of a reply with no reason of its own, by status: no key tuple to make per answer.
_DEFAULT_STATUS_LINES: dict[int, bytes] = {}
# "Content-Length: N\r\n" by N, made once per length: formatting it per answer (bytes %) was
# about 1.5 % of a cache hit's instructions (callgrind). Bounded: lengths vary without end.
_LENGTH_LINES: dict[int, bytes] = {}
MAX_LENGTH_LINES = 4096
_date_cache: list[Any] = [0, ""]
_date_line: list[Any] = [0, b""]  # the whole "Date: ...\r\n" line, as bytes, for response_head


def http_date() -> str:
    """The Date header value, formatted once per second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = formatdate(now, usegmt=True)
    return str(_date_cache[1])


class BodyWriter(Protocol):
    """The client connection as a body's writer sees it (flow control included)."""

    @property
    def transport(self) -> asyncio.Transport | None: ...

    async def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


def write_whole(transport: asyncio.Transport, head: bytes, data: bytes) -> None:
    """A head and a body in memory: one write when small (no waiting: flow control is the
    caller's, before its next write)."""
    if len(data) < 16384:
        transport.write(head + data)
    else:
        transport.writelines((head, data))


async def write_reply_body(conn: BodyWriter, head: bytes, body: Body, **context: Any) -> None:
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


def response_head(
    reply: Reply,
    method: str,
    version: str,
    length: int | None,
    keep_alive: bool,
    extra: tuple[tuple[str, str], ...],
    server_line: bytes = b"",
) -> bytes:
    """The serialised status line and headers of a reply to a ``method`` request in ``version``.

    ``server_line`` (b"Server: ...\\r\\n", checked by its maker): the edge's own, in place
    of any Server field. Stored fields that nobody merged (a cache hit) go out as stored.
    Raises ValueError when a field would smuggle a line in (CR or LF).
    """
    status = reply.status
    unmerged = reply.wire_parts()
    if unmerged is not None and server_line and unmerged[0].server:
        unmerged = None  # a stored Server field the edge replaces: merge, then drop it
    added = b""
    headers: CIMultiDict[str] | None
    if unmerged is None:
        stored = b""
        headers = reply.headers
        if status != 101:
            # The edge frames every response itself, whatever a feature left behind.
            for name in _FRAMING:
                if name in headers:
                    headers.popall(name)
        if server_line and _SERVER in headers:
            headers.popall(_SERVER)
        dated = _DATE in headers
    else:
        # The edge's own added lines (a hit's Age, Cache-Status) need no check: it made them.
        wire, added, headers = unmerged
        stored = wire.data
        dated = wire.date or (headers is not None and _DATE in headers)
    reason = reply.reason
    if reason is None:
        first = _DEFAULT_STATUS_LINES.get(status)
        if first is None:
            first = f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n".encode("latin-1", "replace")
            if len(_DEFAULT_STATUS_LINES) < 256:  # statuses are three digits, from members too
                _DEFAULT_STATUS_LINES[status] = first
    else:
        if "\r" in reason or "\n" in reason:
            raise ValueError("CR or LF inside a reason phrase")
        first = _STATUS_LINES.get((status, reason))
        if first is None:
            first = f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1", "replace")
            if len(_STATUS_LINES) < 256:
                _STATUS_LINES[(status, reason)] = first
    # Built as bytes: the edge's own lines below are constants or made once a second, and a
    # stored reply (a hit, a static file, a fixed answer) often adds no field, so most heads
    # are a join of ready pieces with nothing encoded (the str lines and their encode were
    # 10 % of a fixed answer's in-process CPU, cProfile of bench/hotpath_bench.py).
    parts = [first, stored, added] if added else [first, stored]
    # Fields from features or members are checked (field_lines); the edge's own are not.
    if headers:
        fields = field_lines(headers.items())
        parts.append((fields + field_lines(extra) if extra else fields).encode("latin-1", "replace"))
    elif extra:
        parts.append(field_lines(extra).encode("latin-1", "replace"))
    if server_line:
        parts.append(server_line)
    if not dated:
        now = int(time.time())
        if _date_line[0] != now:
            _date_line[0] = now
            _date_line[1] = b"Date: %s\r\n" % http_date().encode("latin-1")
        parts.append(_date_line[1])
    if status == 101 or status == 204 or status == 304 or 100 <= status < 200:
        pass
    elif length is not None:
        line = _LENGTH_LINES.get(length)
        if line is None:
            line = b"Content-Length: %d\r\n" % length
            if len(_LENGTH_LINES) >= MAX_LENGTH_LINES:
                _LENGTH_LINES.clear()
            _LENGTH_LINES[length] = line
        parts.append(line)
    elif method != "HEAD":
        parts.append(b"Transfer-Encoding: chunked\r\n")
    if not keep_alive:
        parts.append(b"Connection: close\r\n")
    elif version == "HTTP/1.0":
        parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)
