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

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from multidict import CIMultiDict

from edge.core.config import Config
from edge.core.errors import error_reply
from edge.core.fields import FRAMING, HOP_BY_HOP, ResponseCleaner
from edge.core.metrics import Metrics
from edge.core.pipeline import Body, BodyWriter, Deferred, Exchange, Reply, StreamBody
from edge.core.routing import strip_prefix
from edge.core.spool import SpoolBuffer
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
_NOT_FORWARDED = ("Expect", "Content-Length")


class HeadBody(Body):
    """No bytes, but the Content-Length a GET would have had (HEAD responses)."""

    def __init__(self, length: int | None) -> None:
        self.length = length

    async def write_to(self, out: BodyWriter) -> None:
        return None


class _Tries:
    """One request's tries across members: what the retry rules read."""

    __slots__ = (
        "close",
        "deadline",
        "failure_status",
        "headers",
        "idempotent",
        "key",
        "method",
        "path",
        "preserve_host",
        "tried",
        "waited",
    )

    def __init__(self, ex: Exchange, pool: UpstreamPool, key: str | None) -> None:
        c = pool.config
        self.method = method = ex.request.method
        self.idempotent = method in IDEMPOTENT
        self.key = key
        self.close = c.keepalive == "off"
        self.preserve_host = c.preserve_host
        raw = ex.request.raw_path
        self.path = strip_prefix(raw, ex.route.prefix) if ex.route.config.strip_prefix else raw
        self.headers = _upstream_headers(ex)
        self.waited = now = time.monotonic()
        self.deadline = now + c.retry_budget
        self.tried: set[Member] = set()
        self.failure_status = 502


class _Attempt:
    """One try on one member: what must be released after it."""

    __slots__ = ("conn", "handed_over", "member", "request", "spool", "started")

    def __init__(self, member: Member, started: float, request: bytes) -> None:
        self.member: Member | None = member
        self.started = started
        self.request = request
        self.conn: UpstreamConnection | None = None
        self.spool: SpoolBuffer | None = None
        self.handed_over = False


def _upstream_headers(ex: Exchange) -> CIMultiDict[str]:
    """What goes upstream: the headers feature's fields, built now if it left a builder."""
    headers = ex.upstream_headers
    if headers is None:
        make = ex.make_upstream_headers
        if make is not None:
            headers = ex.upstream_headers = make(ex)
        else:  # the headers feature was removed by a user's build
            headers = CIMultiDict(ex.request.headers)
            if ex.host:
                headers["Host"] = ex.host  # what the cache key saw, never the raw value
    for name in _NOT_FORWARDED:
        headers.popall(name, None)
    return headers


class ProxyHandler:
    """Terminal handler for `pool = NAME` routes."""

    #: Runs a coroutine as a tracked task (the Edge's, so shutdown waits for it).
    spawn: Callable[[Coroutine[Any, Any, None]], None]

    def __init__(self, config: Config, pools: dict[str, UpstreamPool], metrics: Metrics) -> None:
        self.config = config
        self.pools = pools
        self.metrics = metrics
        self.memory_limit = config.edge.response_memory_limit
        self.temp_dir = config.edge.temp_dir
        self.max_response = config.edge.max_response_size
        self.clean = ResponseCleaner(config)
        self._tasks: set[asyncio.Task[None]] = set()
        self.spawn = self._spawn

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _hash_key(self, ex: Exchange, pool: UpstreamPool) -> str | None:
        if not pool.is_hash:
            return None
        kind, _, name = pool.config.hash_key.partition(":")
        if kind == "client":
            return ex.client_ip
        if kind == "header":
            return ex.request.headers.get(name)
        return ex.request.cookies.get(name)

    async def __call__(self, ex: Exchange) -> Reply:
        route = ex.route
        request = ex.request
        assert route.config.pool is not None
        pool = self.pools[route.config.pool]
        if route.config.websocket and request.method == "GET" and request.is_upgrade("websocket"):
            reply = await bridge_websocket(ex, pool, self._upstream_path(ex))
            if reply.tunnel is None:  # refused: a member response like any other; a 101 is filtered there
                self.clean(reply.headers)
            return reply
        # The connection has read the whole body already (edge/connection.py).
        return await self._forward(ex, pool, _Tries(ex, pool, self._hash_key(ex, pool)))

    def now(self, ex: Exchange) -> Reply | None:
        """Start the request at once and answer by callback (a Deferred, see DEFERRED REPLIES
        in edge/core/pipeline.py): no task and no await while a member has a free slot and an
        idle pooled connection, and the route buffers. Needing to connect continues in a task
        from here; needing to queue (or a WebSocket) is the async chain's (None)."""
        route = ex.route
        request = ex.request
        assert route.config.pool is not None
        pool = self.pools[route.config.pool]
        if route.config.websocket and request.method == "GET" and request.is_upgrade("websocket"):
            return None
        tries = _Tries(ex, pool, self._hash_key(ex, pool) if pool.is_hash else None)
        try:
            member = pool.acquire_now(tries.key, tries.tried)
        except NoMember:
            return error_reply(503, retry_after=1)
        if member is None:
            return None  # every member is full: the queue is the async chain's
        deferred = Deferred()
        fast = tries.idempotent and route.config.buffering and request.method != "HEAD"
        conn = member.conns.take() if fast else None
        if conn is None:  # a new connection to make (or a stream): the rest waits in a task
            self.spawn(self._later(deferred, ex, pool, tries, member))
            return deferred
        att = self._attempt(ex, tries, member)
        att.conn = conn
        try:
            self._start(ex, pool, att, lambda exc: self._answered(exc, deferred, ex, pool, tries, att))
        except (ConnectFailed, UpstreamProtocolError, OSError) as exc:
            self._answered(exc, deferred, ex, pool, tries, att)
        return deferred

    def _answered(
        self,
        exc: Exception | None,
        deferred: Deferred,
        ex: Exchange,
        pool: UpstreamPool,
        tries: _Tries,
        att: _Attempt,
    ) -> None:
        """A try started by ``now`` ended: resolve the Deferred, or go on with the next try."""
        member = att.member
        assert member is not None
        reply: Reply | None = None
        failure: tuple[bool, bool] | None = None
        try:
            if exc is None:
                try:
                    reply = self._complete(ex, pool, att, None)
                except (UpstreamProtocolError, OSError) as err:
                    exc = err
            if exc is not None:
                failure = self._classify(exc, tries, att)
        except Exception:
            log.exception("request failed", route=ex.route.name, path=ex.request.path)
            reply = error_reply(500)
        finally:
            self._settle(pool, att)
        if failure is not None:
            if self._again(ex, pool, tries, member, *failure):
                self.spawn(self._later(deferred, ex, pool, tries, None))  # the async loop goes on
                return
            reply = error_reply(tries.failure_status)
        assert reply is not None
        deferred.resolve(reply)

    async def _later(
        self, deferred: Deferred, ex: Exchange, pool: UpstreamPool, tries: _Tries, member: Member | None
    ) -> None:
        try:
            reply = await self._forward(ex, pool, tries, member)
        except Exception:
            log.exception("request failed", route=ex.route.name, path=ex.request.path)
            reply = error_reply(500)
        deferred.resolve(reply)

    def _upstream_path(self, ex: Exchange) -> str:
        raw = ex.request.raw_path
        if ex.route.config.strip_prefix:
            raw = strip_prefix(raw, ex.route.prefix)
        return raw

    def _attempt(self, ex: Exchange, tries: _Tries, member: Member) -> _Attempt:
        """Book a try on ``member`` (which holds a slot for it) and serialise the request."""
        started = time.monotonic()
        ex.queue_seconds += started - tries.waited
        ex.tries += 1
        ex.member = member.name
        tries.tried.add(member)
        headers = tries.headers
        if not tries.preserve_host or "Host" not in headers:
            headers["Host"] = member.authority
        request = serialize_request(tries.method, tries.path, headers, ex.request.body, tries.close)
        return _Attempt(member, started, request)

    def _start(
        self,
        ex: Exchange,
        pool: UpstreamPool,
        att: _Attempt,
        on_done: Callable[[Exception | None], None] | None,
    ) -> StreamRelay | None:
        """Write the request on ``att.conn``; the relay when the route streams."""
        conn = att.conn
        assert conn is not None
        head_request = ex.request.method == "HEAD"
        if head_request:
            relay = None
        elif ex.route.config.buffering:
            att.spool = spool = SpoolBuffer(self.memory_limit, self.temp_dir, self.max_response)
            conn.sink = spool.add
            relay = None
        else:
            relay = StreamRelay(conn)
        conn.on_interim = _interim_forwarder(ex)
        conn.start(
            att.request, head_request, pool.config.read_timeout, want_head=relay is not None, on_done=on_done
        )
        return relay

    def _complete(self, ex: Exchange, pool: UpstreamPool, att: _Attempt, relay: StreamRelay | None) -> Reply:
        """The member's response (its head, when streaming) is in: the Reply."""
        conn = att.conn
        member = att.member
        assert conn is not None and member is not None
        parser = conn.parser
        assert parser is not None
        if parser.status < 200:
            # A 101 nobody asked for (upgrades go through edge.websocket).
            raise UpstreamProtocolError("unexpected informational response")
        if relay is not None:
            att.handed_over = True
            reply_body: Body = self._stream(pool, member, conn, relay, parser)
        else:
            if parser.excess:
                log.warning("member sent more than its framing", pool=pool.name, member=member.name)
            spool = att.spool
            if spool is None:
                reply_body = HeadBody(_content_length(parser.headers))
            else:
                reply_body = spool.body()
                att.spool = None
            member.conns.put(conn)  # the member is free the moment we have it all
            att.conn = None
        headers_in = parser.headers
        self.clean(headers_in)  # before any feature (the cache) sees them
        if "Location" in headers_in or "Content-Location" in headers_in:
            _hide_member_in_locations(headers_in, member, ex)
        elapsed = time.monotonic() - att.started
        ex.upstream_seconds += elapsed
        self.metrics.observe_upstream(pool.name, elapsed)
        return Reply(parser.status, headers_in, reply_body, parser.reason or None)

    def _classify(self, exc: Exception, tries: _Tries, att: _Attempt) -> tuple[bool, bool]:
        """A failed try, before ``_settle``: (stale, not sent); sets the status to answer with."""
        conn = att.conn
        stale = not_sent = False
        if isinstance(exc, ConnectFailed):
            # Refused, unreachable, timed out, or reset before the request was written:
            # nothing reached the member, so any method may go to the next one (as
            # nginx and HAProxy retry connection failures).
            tries.failure_status = 502
            not_sent = True
            stale = conn is not None and conn.reused  # a pooled one the member had closed
        elif isinstance(exc, ReadTimeout):
            tries.failure_status = 504
        else:
            tries.failure_status = 502
            if conn is not None and conn.reused and _nothing_received(conn):
                # A pooled connection the member had already closed: not the member's
                # fault, and nothing was processed. Try again on a fresh connection.
                stale = True
        return stale, not_sent

    def _again(
        self, ex: Exchange, pool: UpstreamPool, tries: _Tries, member: Member, stale: bool, not_sent: bool
    ) -> bool:
        """After a failed try was settled: may another follow?"""
        tries.waited = waited = time.monotonic()
        if stale and waited < tries.deadline:
            tries.tried.discard(member)
            return True
        pool.report_failure(member)
        self.metrics.upstream_failure(pool.name, member.name)
        return (
            (tries.idempotent or not_sent)
            and len(tries.tried) < pool.config.max_tries
            and waited < tries.deadline
        )

    def _settle(self, pool: UpstreamPool, att: _Attempt) -> None:
        """After a try, unless its connection streams on: drop what is left, free the slot."""
        if not att.handed_over:
            if att.conn is not None:
                att.conn.abort()
                att.conn = None
            if att.spool is not None:
                att.spool.discard()
                att.spool = None
            if att.member is not None:
                pool.release(att.member)
                att.member = None

    async def _forward(
        self, ex: Exchange, pool: UpstreamPool, tries: _Tries, member: Member | None = None
    ) -> Reply:
        """Try members until one answers, within ``max_tries`` and ``retry_budget``;
        ``member``: one already acquired for the first try."""
        c = pool.config
        while True:
            if member is None:
                try:
                    member = pool.acquire_now(tries.key, tries.tried)
                    if member is None:
                        member = await pool.acquire(tries.key, tries.tried)
                except NoMember:
                    # Nobody left: 503 if nobody was eligible, else the last failure.
                    return error_reply(503 if not tries.tried else tries.failure_status, retry_after=1)
                except (QueueFull, QueueTimeout):
                    return error_reply(503, retry_after=max(1, round(c.queue_timeout)))
            att = self._attempt(ex, tries, member)
            failure: tuple[bool, bool] | None = None
            try:
                # A request that must not be replayed never rides a reused connection
                # (the member may have closed it just as we write).
                if tries.idempotent:
                    att.conn = member.conns.take()
                if att.conn is None:
                    att.conn = await member.conns.connect(c.connect_timeout)
                relay = self._start(ex, pool, att, None)
                conn = att.conn
                if relay is not None:
                    assert conn.head_ready is not None
                    await conn.head_ready
                else:
                    assert conn.done is not None
                    await conn.done
                return self._complete(ex, pool, att, relay)
            except (ConnectFailed, ReadTimeout, UpstreamProtocolError, OSError) as exc:
                failure = self._classify(exc, tries, att)
            finally:
                self._settle(pool, att)
            # Only failures reach this point.
            assert failure is not None
            if not self._again(ex, pool, tries, member, *failure):
                return error_reply(tries.failure_status)
            member = None

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

        length = None if "Transfer-Encoding" in parser.headers else _content_length(parser.headers)
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
    value = headers.get("Content-Length")
    return int(value) if value is not None and value.isdigit() else None
