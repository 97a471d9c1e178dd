"""WebSocket pass-through on routes with `websocket = true`: a byte tunnel after the handshake.

The edge forwards the client's upgrade request (cleaned like any request, with
Connection/Upgrade put back) to a member on a fresh connection. If the member
answers 101, the edge relays that head and from then on pipes bytes both ways
without looking at them (flow control follows the slower side), so every
WebSocket feature the two ends agree on passes through. Any other answer is
returned to the client as a normal response. The member's slot is held only
for the handshake: a long-lived socket must not eat the `max_conns` budget
meant for heavy AP requests.
"""

from __future__ import annotations

from multidict import CIMultiDict

from edge.core.errors import error_reply
from edge.core.fields import BACKEND_IDENTITY
from edge.core.pipeline import Exchange, Reply
from edge.core.spool import SpoolBuffer
from edge.upstream.client import ConnectFailed, ReadTimeout, UpstreamProtocolError, serialize_request
from edge.upstream.pool import Member, NoMember, QueueFull, QueueTimeout, UpstreamPool

# What a 101 may carry back to the client: the handshake and nothing hop-by-hop else.
_HANDSHAKE_REPLY = frozenset(
    {
        "upgrade",
        "connection",
        "sec-websocket-accept",
        "sec-websocket-protocol",
        "sec-websocket-extensions",
    }
)


async def bridge_websocket(ex: Exchange, pool: UpstreamPool, path: str) -> Reply:
    """Hand the client's upgrade to a member; on 101 the connection becomes a tunnel."""
    headers: CIMultiDict[str] = CIMultiDict(ex.upstream_headers or ex.request.headers)
    headers.popall("Content-Length", None)
    headers["Connection"] = "Upgrade"
    headers["Upgrade"] = "websocket"
    c = pool.config
    tried: set[Member] = set()
    while True:
        try:
            member = await pool.acquire(None, tried)
        except NoMember:
            return error_reply(502 if tried else 503)
        except (QueueFull, QueueTimeout):
            return error_reply(503, retry_after=1)
        tried.add(member)
        ex.member = member.name
        if not c.preserve_host or "Host" not in headers:
            headers["Host"] = f"{member.host}:{member.port}"
        conn = None
        try:
            conn = await member.conns.get(c.connect_timeout, fresh=True)
            spool = SpoolBuffer(64 * 1024, None)
            conn.sink = spool.add
            conn.start(serialize_request("GET", path, headers, None, False), False, c.read_timeout)
            assert conn.done is not None and conn.parser is not None
            await conn.done
        except (ConnectFailed, ReadTimeout, UpstreamProtocolError, OSError):
            if conn is not None:
                conn.abort()
            pool.release(member)
            pool.report_failure(member)
            if len(tried) >= c.max_tries:
                return error_reply(502)
            continue
        pool.release(member)
        parser = conn.parser
        if parser.status != 101:
            conn.abort()
            return Reply(parser.status, parser.headers, spool.body(), parser.reason or None)
        transport = conn.transport
        client = ex.request.transport
        if transport is None or client is None:
            conn.abort()
            return error_reply(502)
        # Hold the member's bytes until the client has the 101 head (the connection
        # resumes reading once it is written).
        transport.pause_reading()
        early = parser.tail
        conn.parser = None
        conn.sink = None
        conn.tunnel = client
        reply_headers: CIMultiDict[str] = CIMultiDict(
            (k, v)
            for k, v in parser.headers.items()
            if k.lower() in _HANDSHAKE_REPLY and k.lower() not in BACKEND_IDENTITY
        )
        return Reply(101, reply_headers, tunnel=transport, tunnel_head=early, reason="Switching Protocols")
