"""WebSocket pass-through on routes with `websocket = true`.

The edge completes the upstream handshake first (so a dead member still gets
a clean 502 and a retry), then accepts the client's upgrade with the
subprotocol the member chose, and relays messages both ways until either side
closes. The member's slot is held only for the handshake: a long-lived socket
must not eat the `max_conns` budget meant for heavy AP requests.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from edge.errors import error_reply
from edge.pipeline import Exchange, Reply
from edge.pool import NoMember, QueueFull, QueueTimeout, UpstreamPool

# Handshake headers that aiohttp's client generates itself.
_HANDSHAKE = (
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Protocol",
    "Host",
    "Content-Length",
)


def is_websocket_upgrade(request: web.BaseRequest) -> bool:
    """A GET asking to upgrade to websocket."""
    return (
        request.method == "GET"
        and request.headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in request.headers.get("Connection", "").lower()
    )


async def _pump(source: aiohttp.ClientWebSocketResponse | web.WebSocketResponse, sink: object) -> None:
    async for msg in source:
        if msg.type == WSMsgType.TEXT:
            await sink.send_str(msg.data)  # type: ignore[attr-defined]
        elif msg.type == WSMsgType.BINARY:
            await sink.send_bytes(msg.data)  # type: ignore[attr-defined]
        elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            break


async def bridge_websocket(ex: Exchange, pool: UpstreamPool, path: str) -> Reply:
    """Relay one WebSocket between the client and a member."""
    request = ex.request
    headers: CIMultiDict[str] = CIMultiDict(ex.upstream_headers or {})
    for name in _HANDSHAKE:
        headers.popall(name, None)
    if pool.config.preserve_host and "Host" in request.headers:
        headers["Host"] = request.headers["Host"]
    protocols = tuple(
        p.strip()
        for v in request.headers.getall("Sec-WebSocket-Protocol", ())
        for p in v.split(",")
        if p.strip()
    )
    assert pool.session is not None
    tried: set = set()
    while True:
        try:
            member = await pool.acquire(None, tried)
        except NoMember:
            return error_reply(502 if tried else 503)
        except (QueueFull, QueueTimeout):
            return error_reply(503, retry_after=1)
        tried.add(member)
        ex.member = member.name
        try:
            upstream = await pool.session.ws_connect(
                URL(member.url.replace("http", "ws", 1) + path, encoded=True),
                headers=headers,
                protocols=protocols,
                autoclose=False,
                autoping=True,
                timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
            )
        except aiohttp.WSServerHandshakeError as exc:
            pool.release(member)
            return error_reply(502 if exc.status < 400 else exc.status)
        except (aiohttp.ClientError, OSError, TimeoutError):
            pool.release(member)
            pool.report_failure(member)
            if len(tried) >= pool.config.max_tries:
                return error_reply(502)
            continue
        pool.release(member)
        break
    client = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (), autoclose=False
    )
    try:
        await client.prepare(request)
        to_member = asyncio.create_task(_pump(client, upstream))
        to_client = asyncio.create_task(_pump(upstream, client))
        await asyncio.wait({to_member, to_client}, return_when=asyncio.FIRST_COMPLETED)
        for t in (to_member, to_client):
            t.cancel()
        await asyncio.gather(to_member, to_client, return_exceptions=True)
    finally:
        code = upstream.close_code or client.close_code or 1000
        await upstream.close()
        await client.close(code=code)
    return Reply(101, CIMultiDict(), raw=client)
