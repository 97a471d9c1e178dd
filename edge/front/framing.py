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

from edge.core.pipeline import Body, BytesBody
from edge.http.http1 import field_lines

if TYPE_CHECKING:
    from edge.core.pipeline import Reply

log = structlog.get_logger("carousel.edge.connection")

_FRAMING = ("Content-Length", "Transfer-Encoding", "Connection", "Keep-Alive")
REASONS = {s.value: s.phrase for s in HTTPStatus}
_STATUS_LINES: dict[tuple[int, str], bytes] = {}  # "HTTP/1.1 200 OK\r\n", ...: bounded, reasons vary
_date_cache: list[Any] = [0, ""]


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
    server_line: str = "",
) -> bytes:
    """The serialised status line and headers of a reply to a ``method`` request in ``version``.

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
        reason = REASONS.get(status, "Unknown")
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
    elif method != "HEAD":
        lines.append("Transfer-Encoding: chunked\r\n")
    if not keep_alive:
        lines.append("Connection: close\r\n")
    elif version == "HTTP/1.0":
        lines.append("Connection: keep-alive\r\n")
    text = "".join(lines)
    first = _STATUS_LINES.get((status, reason))
    if first is None:
        first = f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1", "replace")
        if len(_STATUS_LINES) < 256:
            _STATUS_LINES[(status, reason)] = first
    return first + stored + text.encode("latin-1", "replace") + b"\r\n"
