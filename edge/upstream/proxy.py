"""The upstream terminal handler: buffer the request, pick a member, retry, buffer the response.

Why buffer both ways (the notes' point): the AP holds a heavy worker for as
long as a request is on its socket. So the edge reads the client's body whole
before it contacts a member, and reads the member's response whole (memory up
to a limit, then a temp file) before it writes a byte to the client. The
member's slot and connection are released the moment the response is in, and
a slow client only costs the edge a cheap connection. ``buffering = false``
on a route streams instead (SSE, huge downloads) and holds the slot until the
end.

Retries: a connect error, a timeout or a broken response moves an idempotent
request to the next member, within ``max_tries`` and ``retry_budget``. With
buffering nothing has reached the client before the response is complete, so
a retry is always invisible. Non-idempotent requests (POST, PATCH) are never
replayed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import structlog
from multidict import CIMultiDict

from edge.core.config import Config
from edge.core.errors import error_reply
from edge.core.fields import FRAMING, HOP_BY_HOP, ResponseCleaner
from edge.core.metrics import Metrics
from edge.core.pipeline import Body, BodyWriter, Exchange, Reply, StreamBody
from edge.core.routing import strip_prefix
from edge.core.spool import SpoolBuffer
from edge.http.http1 import CONTENT_LENGTH, EXPECT, HOST, TRANSFER_ENCODING
from edge.upstream.client import (
    ConnectFailed,
    ReadTimeout,
    ResponseParser,
    StreamRelay,
    UpstreamConnection,
    UpstreamProtocolError,
    serialize_request,
)
from edge.upstream.pool import Member, NoMember, QueueFull, QueueTimeout, UpstreamPool
from edge.upstream.websocket import bridge_websocket

log = structlog.get_logger("carousel.edge.proxy")

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# Request headers the edge settles itself before forwarding.
_NOT_FORWARDED = (EXPECT, CONTENT_LENGTH)


class HeadBody(Body):
    """No bytes, but the Content-Length a GET would have had (HEAD responses)."""

    def __init__(self, length: int | None) -> None:
        self.length = length

    async def write_to(self, out: BodyWriter) -> None:
        return None


class ProxyHandler:
    """Terminal handler for `pool = NAME` routes."""

    def __init__(self, config: Config, pools: dict[str, UpstreamPool], metrics: Metrics) -> None:
        self.config = config
        self.pools = pools
        self.metrics = metrics
        self.memory_limit = config.edge.response_memory_limit
        self.temp_dir = config.edge.temp_dir
        self.max_response = config.edge.max_response_size
        self.clean = ResponseCleaner(config)

    def _hash_key(self, ex: Exchange, pool: UpstreamPool) -> str | None:
        if not pool.is_hash:
            return None
        kind, _, name = pool.config.hash_key.partition(":")
        if kind == "client":
            return ex.client_ip
        if kind == "header":
            return ex.request.headers.get(name)
        return ex.request.cookies.get(name)

    def __call__(self, ex: Exchange) -> Awaitable[Reply]:
        """The reply, as the coroutine that fetches it (no coroutine of its own around it)."""
        route = ex.route
        request = ex.request
        assert route.config.pool is not None
        pool = self.pools[route.config.pool]
        if route.config.websocket and request.method == "GET" and request.is_upgrade("websocket"):
            return self._websocket(ex, pool)
        # The connection has read the whole body already (edge/connection.py).
        body = request.body
        headers = ex.upstream_headers
        if headers is None:  # the headers feature was removed by a user's build
            headers = CIMultiDict(request.headers)
            if ex.host:
                headers["Host"] = ex.host  # what the cache key saw, never the raw value
        for name in _NOT_FORWARDED:
            headers.popall(name, None)
        return self._forward(ex, pool, body, headers)

    async def _websocket(self, ex: Exchange, pool: UpstreamPool) -> Reply:
        reply = await bridge_websocket(ex, pool, self._upstream_path(ex))
        if reply.tunnel is None:  # refused: a member response like any other; a 101 is filtered there
            self.clean(reply.headers)
        return reply

    def _upstream_path(self, ex: Exchange) -> str:
        raw = ex.request.raw_path
        if ex.route.config.strip_prefix:
            raw = strip_prefix(raw, ex.route.prefix)
        return raw

    async def _forward(
        self,
        ex: Exchange,
        pool: UpstreamPool,
        body: bytes | None,
        headers: CIMultiDict[str],
    ) -> Reply:
        method = ex.request.method
        idempotent = method in IDEMPOTENT
        c = pool.config
        path = self._upstream_path(ex)
        key = self._hash_key(ex, pool) if pool.is_hash else None
        buffering = ex.route.config.buffering
        close = c.keepalive == "off"
        waited = time.monotonic()
        deadline = waited + c.retry_budget
        tried: set[Member] = set()
        failure_status = 502
        on_interim = _interim_forwarder(ex)
        while True:
            try:
                member = pool.acquire_now(key, tried)
                if member is None:
                    member = await pool.acquire(key, tried)
            except NoMember:
                # Nobody left: 503 if nobody was eligible, else the last failure.
                return error_reply(503 if not tried else failure_status, retry_after=1)
            except (QueueFull, QueueTimeout):
                return error_reply(503, retry_after=max(1, round(c.queue_timeout)))
            started = time.monotonic()
            ex.queue_seconds += started - waited
            ex.tries += 1
            ex.member = member.name
            tried.add(member)
            if not c.preserve_host or HOST not in headers:
                headers[HOST] = member.authority
            request = serialize_request(method, path, headers, body, close)
            conn: UpstreamConnection | None = None
            spool: SpoolBuffer | None = None
            handed_over = False
            stale = False
            not_sent = False
            try:
                # A request that must not be replayed never rides a reused connection
                # (the member may have closed it just as we write).
                if idempotent:
                    conn = member.conns.take()
                if conn is None:
                    conn = await member.conns.connect(c.connect_timeout)
                head_request = method == "HEAD"
                if head_request:
                    relay = None
                elif buffering:
                    spool = SpoolBuffer(self.memory_limit, self.temp_dir, self.max_response)
                    conn.sink = spool.add
                    relay = None
                else:
                    relay = StreamRelay(conn)
                conn.on_interim = on_interim
                conn.start(request, head_request, c.read_timeout, want_head=relay is not None)
                if relay is not None:
                    assert conn.head_ready is not None
                    await conn.head_ready
                else:
                    assert conn.done is not None
                    await conn.done
                parser = conn.parser
                assert parser is not None
                if parser.status < 200:
                    # A 101 nobody asked for (upgrades go through edge.websocket).
                    raise UpstreamProtocolError("unexpected informational response")
                if relay is not None:
                    handed_over = True
                    reply_body: Body = self._stream(pool, member, conn, relay, parser)
                else:
                    if parser.excess:
                        log.warning("member sent more than its framing", pool=pool.name, member=member.name)
                    if spool is None:
                        reply_body = HeadBody(_content_length(parser.headers))
                    else:
                        reply_body = spool.body()
                        spool = None
                    member.conns.put(conn)  # the member is free the moment we have it all
                    conn = None
                # Cleaned before any feature (the cache) sees them; sent as serialised here
                # unless a feature reads or changes them (Reply merges them then).
                stored = self.clean.member_fields(parser.pairs, parser.names)
                if stored is None:
                    headers_in = parser.headers
                    self.clean(headers_in)
                    _hide_member_in_locations(headers_in, member, ex)
                    reply = Reply(parser.status, headers_in, reply_body, parser.reason or None)
                else:
                    reply = Reply(parser.status, None, reply_body, parser.reason or None, stored=stored)
                elapsed = time.monotonic() - started
                ex.upstream_seconds += elapsed
                self.metrics.observe_upstream(pool.name, elapsed)
                return reply
            except ConnectFailed:
                # Refused, unreachable, timed out, or reset before the request was written:
                # nothing reached the member, so any method may go to the next one (as
                # nginx and HAProxy retry connection failures).
                failure_status = 502
                not_sent = True
                stale = conn is not None and conn.reused  # a pooled one the member had closed
            except ReadTimeout:
                failure_status = 504
            except (UpstreamProtocolError, OSError):
                failure_status = 502
                if conn is not None and conn.reused and _nothing_received(conn):
                    # A pooled connection the member had already closed: not the member's
                    # fault, and nothing was processed. Try again on a fresh connection.
                    stale = True
            finally:
                if not handed_over:
                    if conn is not None:
                        conn.abort()
                    if spool is not None:
                        spool.discard()
                    pool.release(member)
            # Only failures reach this point.
            waited = time.monotonic()
            if stale and waited < deadline:
                tried.discard(member)
                continue
            pool.report_failure(member)
            self.metrics.upstream_failure(pool.name, member.name)
            if not (idempotent or not_sent) or len(tried) >= c.max_tries or waited >= deadline:
                return error_reply(failure_status)

    def _stream(
        self,
        pool: UpstreamPool,
        member: Member,
        conn: UpstreamConnection,
        relay: StreamRelay,
        parser: ResponseParser,
    ) -> Body:
        """buffering = false: relay chunks as they come; the slot is held until the end."""

        def done() -> None:
            if conn.done is not None and conn.done.done() and not conn.done.exception():
                member.conns.put(conn)
            else:
                conn.abort()
            pool.release(member)

        length = None if TRANSFER_ENCODING in parser.headers else _content_length(parser.headers)
        return StreamBody(relay.chunks(), length, on_close=done)


def _hide_member_in_locations(headers: CIMultiDict[str], member: Member, ex: Exchange) -> None:
    """Rewrite redirects to the member's own address into the client's view (proxy_redirect)."""
    for name in ("Location", "Content-Location"):
        value = headers.get(name)
        if value is not None and value.startswith(member.url):
            public = f"{ex.scheme}://{ex.host}" if ex.host else ""  # validated, as the key has it
            headers[name] = public + value[len(member.url) :]


def _interim_forwarder(ex: Exchange) -> Callable[[int, str, list[tuple[str, str]]], None] | None:
    """Pass a member's 1xx responses on to the client (RFC 9110 15.2: a proxy MUST forward
    them, 103 Early Hints included), 100 Continue only to a client that asked for it."""
    write = ex.send_interim
    if write is None:
        return None

    def forward(status: int, reason: str, fields: list[tuple[str, str]]) -> None:
        if status == 100 and ex.request.headers.get("Expect", "").lower() != "100-continue":
            return
        drop = HOP_BY_HOP | FRAMING
        listed = [v for k, v in fields if k.lower() == "connection"]
        if listed:
            drop = drop | {t.strip().lower() for v in listed for t in v.split(",")}
        lines = [f"HTTP/1.1 {status} {reason}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in fields if k.lower() not in drop]
        lines.append("\r\n")
        write("".join(lines).encode("latin-1"))

    return forward


def _nothing_received(conn: UpstreamConnection) -> bool:
    return conn.parser is None or conn.parser.received_nothing


def _content_length(headers: CIMultiDict[str]) -> int | None:
    value = headers.get(CONTENT_LENGTH)
    return int(value) if value is not None and value.isdigit() else None
