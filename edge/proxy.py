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
import os
import tempfile
import time
from collections.abc import AsyncIterator

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from edge.config import Config
from edge.errors import error_reply
from edge.metrics import Metrics
from edge.pipeline import Body, BytesBody, Exchange, FileBody, Reply, StreamBody
from edge.pool import Member, NoMember, QueueFull, QueueTimeout, UpstreamPool
from edge.websocket import bridge_websocket, is_websocket_upgrade

log = structlog.get_logger("carousel.edge.proxy")

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# Request headers the edge settles itself before forwarding.
_NOT_FORWARDED = ("Expect", "Content-Length")
_CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
_TIMEOUTS = (aiohttp.ServerTimeoutError, asyncio.TimeoutError, TimeoutError)
_BROKEN = (aiohttp.ClientError, OSError)


class BodyTooLarge(Exception):
    """The request body exceeds max_body_size."""


class HeadBody(Body):
    """No bytes, but the Content-Length a GET would have had (HEAD responses)."""

    def __init__(self, length: int | None) -> None:
        self.length = length

    async def write_to(self, response: web.StreamResponse, request: web.BaseRequest) -> None:
        return None


async def read_request_body(request: web.BaseRequest, limit: int) -> bytes | None:
    """The whole request body (None if there is none); BodyTooLarge past ``limit``."""
    if not request.body_exists:
        return None
    declared = request.content_length
    if declared is not None and declared > limit:
        raise BodyTooLarge()
    parts: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge()
        parts.append(chunk)
    return b"".join(parts)


async def buffer_response(resp: aiohttp.ClientResponse, memory_limit: int, temp_dir: str | None) -> Body:
    """Read a response body whole: in memory up to ``memory_limit``, then in a temp file."""
    parts: list[bytes] = []
    size = 0
    spill = None
    try:
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if spill is None:
                parts.append(chunk)
                if size > memory_limit:
                    spill = tempfile.TemporaryFile(dir=temp_dir)
                    spill.write(b"".join(parts))
                    parts = []
            else:
                spill.write(chunk)
        if spill is None:
            return BytesBody(parts[0] if len(parts) == 1 else b"".join(parts))
        spill.flush()
        return FileBody(os.dup(spill.fileno()), 0, size)
    finally:
        if spill is not None:
            spill.close()  # the unlinked file lives on through the dup'ed descriptor


class ProxyHandler:
    """Terminal handler for `pool = NAME` routes."""

    def __init__(self, config: Config, pools: dict[str, UpstreamPool], metrics: Metrics) -> None:
        self.config = config
        self.pools = pools
        self.metrics = metrics
        self.max_body = config.edge.max_body_size
        self.memory_limit = config.edge.response_memory_limit
        self.temp_dir = config.edge.temp_dir

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
        if route.config.websocket and is_websocket_upgrade(request):
            return await bridge_websocket(ex, pool, self._upstream_path(ex))
        try:
            body = await read_request_body(request, self.max_body)
        except BodyTooLarge:
            reply = error_reply(413)
            reply.headers["Connection"] = "close"
            return reply
        headers = ex.upstream_headers
        if headers is None:  # the headers feature was removed by a user's build
            headers = CIMultiDict(request.headers)
        for name in _NOT_FORWARDED:
            headers.popall(name, None)
        return await self._forward(ex, pool, body, headers)

    def _upstream_path(self, ex: Exchange) -> str:
        raw = ex.request.raw_path
        if ex.route.config.strip_prefix:
            prefix = ex.route.prefix.rstrip("/")
            if raw.startswith(prefix):
                raw = raw[len(prefix) :]
                if not raw.startswith("/"):
                    raw = "/" + raw
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
        session = pool.session
        assert session is not None
        path = self._upstream_path(ex)
        key = self._hash_key(ex, pool)
        deadline = time.monotonic() + pool.config.retry_budget
        tried: set[Member] = set()
        failure_status = 502
        while True:
            waited = time.monotonic()
            try:
                member = await pool.acquire(key, tried)
            except NoMember:
                # Nobody left: 503 if nobody was eligible, else the last failure.
                return error_reply(503 if not tried else failure_status, retry_after=1)
            except (QueueFull, QueueTimeout):
                retry = max(1, round(pool.config.queue_timeout))
                return error_reply(503, retry_after=retry)
            ex.queue_seconds += time.monotonic() - waited
            ex.tries += 1
            ex.member = member.name
            tried.add(member)
            if not pool.config.preserve_host:
                headers["Host"] = f"{member.host}:{member.port}"
            started = time.monotonic()
            resp: aiohttp.ClientResponse | None = None
            handed_over = False
            try:
                resp = await session.request(
                    method,
                    URL(member.url + path, encoded=True),
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    compress=None,
                )
                reply_headers = CIMultiDict(resp.headers)
                if method == "HEAD":
                    reply_body: Body = HeadBody(resp.content_length)
                elif not ex.route.config.buffering:
                    handed_over = True
                    reply_body = self._stream(pool, member, resp)
                else:
                    reply_body = await buffer_response(resp, self.memory_limit, self.temp_dir)
                ex.upstream_seconds += time.monotonic() - started
                self.metrics.observe_upstream(pool.name, time.monotonic() - started)
                return Reply(resp.status, reply_headers, reply_body, resp.reason)
            except _CONNECT_ERRORS:
                failure_status = 502
            except _TIMEOUTS:
                failure_status = 504
            except _BROKEN:
                failure_status = 502
            finally:
                if not handed_over:
                    if resp is not None:
                        resp.release()
                    pool.release(member)
            # Only failures reach this point.
            pool.report_failure(member)
            self.metrics.upstream_failure(pool.name, member.name)
            if not idempotent or len(tried) >= pool.config.max_tries or time.monotonic() >= deadline:
                return error_reply(failure_status)

    def _stream(self, pool: UpstreamPool, member: Member, resp: aiohttp.ClientResponse) -> Body:
        """buffering = false: relay chunks as they come; the slot is held until the end."""

        async def relay() -> AsyncIterator[bytes]:
            async for chunk in resp.content.iter_any():
                yield chunk

        def done() -> None:
            resp.release()
            pool.release(member)

        length = resp.content_length if "Transfer-Encoding" not in resp.headers else None
        return StreamBody(relay(), length, on_close=done)
