"""Protocol corners a shared cache must get right, through a real edge against a raw origin
on loopback: interim responses (RFC 9110 15.2), a Content-Length smaller than the body
(RFC 9112 6.3), Set-Cookie storing (RFC 9111 7.3), Content-Range on a 200 (RFC 9110 14.4)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from edge.front.server import Edge
from edge.testing import RawResponse, read_response, running_edge
from edge.testing.cache import edge_config, origin_and_edge

pytestmark = pytest.mark.timeout(60)


class RawOrigin:
    """An origin that answers each request with the bytes a script returns for its path."""

    def __init__(self, script: Callable[[str, bytes], bytes]) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                path = head.split(b" ", 2)[1].decode()
                writer.write(self.script(path, head))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def raw_origin_and_edge(
    script: Callable[[str, bytes], bytes], **route: object
) -> AsyncIterator[tuple[RawOrigin, Edge]]:
    origin = RawOrigin(script)
    server = await asyncio.start_server(origin.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = edge_config(port, **route)
    config["pool"]["origin"]["keepalive"] = "pool"
    try:
        async with running_edge(config) as edge:
            yield origin, edge
    finally:
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def origin_with_cache(
    script: Callable[[str, bytes], bytes], **cache: object
) -> AsyncIterator[tuple[RawOrigin, Edge]]:
    """A raw origin and an edge whose [cache] section gets ``cache``."""
    origin = RawOrigin(script)
    server = await asyncio.start_server(origin.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with running_edge(edge_config(port, dict(cache))) as edge:
            yield origin, edge
    finally:
        server.close()
        await server.wait_closed()


async def exchange(port: int, request: bytes, count: int = 1) -> list[RawResponse]:
    """Send one request; read ``count`` responses (interim ones first) off the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        out = []
        for _ in range(count):
            out.append(await asyncio.wait_for(read_response(reader), 10))
        return out
    finally:
        writer.close()


def get(path: str, version: str = "HTTP/1.1", *extra: str) -> bytes:
    lines = [f"GET {path} {version}", "Host: a.test", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload; as=style\r\nX-Hint: 1\r\n\r\n"
FINAL = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 2\r\n\r\nok"


async def test_103_early_hints_reach_the_client_first_and_are_never_stored() -> None:
    async with raw_origin_and_edge(lambda path, head: EARLY_HINTS + FINAL) as (origin, edge):
        hint, final = await exchange(edge.port, get("/p"), 2)
        assert hint.status == 103
        assert hint.header("link") == "</s.css>; rel=preload; as=style" and hint.header("x-hint") == "1"
        assert (final.status, final.body) == (200, b"ok")
        assert final.header("link") is None  # an interim response's fields are its own
        # The stored response is the final one only: a hit carries no hint and no Link.
        (hit,) = await exchange(edge.port, get("/p"))
        assert (hit.status, hit.body, hit.header("link")) == (200, b"ok", None)
        assert "hit" in (hit.header("cache-status") or "")
        assert len(origin.requests) == 1


async def test_interim_responses_are_not_sent_to_http10_clients() -> None:
    # RFC 9110 15.2: a server must not send a 1xx response to an HTTP/1.0 client.
    async with raw_origin_and_edge(lambda path, head: EARLY_HINTS + FINAL) as (_, edge):
        (first,) = await exchange(edge.port, get("/p", "HTTP/1.0"))
        assert (first.status, first.body) == (200, b"ok")


async def test_100_continue_from_the_origin_only_reaches_a_client_that_asked() -> None:
    cont = b"HTTP/1.1 100 Continue\r\n\r\n"
    nostore = b"HTTP/1.1 200 OK\r\nCache-Control: no-store\r\nContent-Length: 2\r\n\r\nok"
    async with raw_origin_and_edge(lambda path, head: cont + nostore) as (_, edge):
        (first,) = await exchange(edge.port, get("/c"))
        assert first.status == 200
        interim, final = await exchange(edge.port, get("/c", "HTTP/1.1", "Expect: 100-continue"), 2)
        assert (interim.status, final.status) == (100, 200)


async def test_a_content_length_shorter_than_the_body_ends_the_response_there() -> None:
    # RFC 9112 6.3: extra bytes after a complete response are discarded, never taken for a
    # response of their own; the member connection is not reused.
    forged = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 5\r\n\r\nforged"
    short = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 2\r\n\r\nok-and-more"

    def script(path: str, head: bytes) -> bytes:
        return short + forged if path == "/short" else FINAL

    async with raw_origin_and_edge(script) as (origin, edge):
        (first,) = await exchange(edge.port, get("/short"))
        assert (first.status, first.body, first.header("content-length")) == (200, b"ok", "2")
        (hit,) = await exchange(edge.port, get("/short"))
        assert (hit.status, hit.body) == (200, b"ok")
        (other,) = await exchange(edge.port, get("/other"))
        assert (other.status, other.body) == (200, b"ok")  # not the forged response
        assert origin.connections == 2  # the out-of-step connection was closed


async def test_set_cookie_is_stored_and_updated_by_a_304_when_the_route_says_store() -> None:
    calls = 0

    def script(path: str, head: bytes) -> bytes:
        nonlocal calls
        calls += 1
        if b"if-none-match" in head.lower():
            return (
                b'HTTP/1.1 304 Not Modified\r\nETag: "v"\r\nSet-Cookie: a=2\r\n'
                b"Cache-Control: max-age=600\r\n\r\n"
            )
        return (
            b'HTTP/1.1 200 OK\r\nCache-Control: max-age=0\r\nETag: "v"\r\nSet-Cookie: a=1\r\n'
            b"Content-Length: 2\r\n\r\nok"
        )

    async with raw_origin_and_edge(script, cache_set_cookie="store") as (_, edge):
        (first,) = await exchange(edge.port, get("/sc"))
        assert first.header("set-cookie") == "a=1"
        (second,) = await exchange(edge.port, get("/sc"))  # stale: revalidated, 304 updates
        assert (second.status, second.body, second.header("set-cookie")) == (200, b"ok", "a=2")
        (third,) = await exchange(edge.port, get("/sc"))  # fresh now: a hit with the cookie
        assert (third.body, third.header("set-cookie")) == (b"ok", "a=2")
        assert calls == 2


async def test_a_200_with_content_range_is_stored_as_a_complete_response() -> None:
    async with origin_and_edge() as (origin, edge):
        origin.reply("/cr", "whole", cache_control="max-age=60", content_range="bytes 0-4/5")
        (first,) = await exchange(edge.port, get("/cr"))
        assert (first.status, first.body) == (200, b"whole")
        (second,) = await exchange(edge.port, get("/cr"))
        assert (second.status, second.body, second.header("content-range")) == (200, b"whole", "bytes 0-4/5")
        assert len(origin.seen("/cr")) == 1


async def test_surrogate_control_when_configured_is_announced_and_honoured() -> None:
    # Edge Architecture 1.0: the edge announces itself in Surrogate-Capability; directives
    # targeted at it (or at nobody) govern, others are ignored; Cache-Control is not used.
    def script(path: str, head: bytes) -> bytes:
        control = {"/ours": "no-store;carousel", "/theirs": "no-store;other", "/all": "max-age=600"}[path]
        return (
            f"HTTP/1.1 200 OK\r\nCache-Control: {'max-age=600' if path != '/all' else 'no-store'}\r\n"
            f"Surrogate-Control: {control}\r\nContent-Length: 2\r\n\r\nok"
        ).encode()

    async with origin_with_cache(script, targeted_fields=["CDN-Cache-Control", "Surrogate-Control"]) as (
        origin,
        edge,
    ):
        for path in ("/ours", "/theirs", "/all", "/ours", "/theirs", "/all"):
            (reply,) = await exchange(edge.port, get(path))
            assert (reply.status, reply.body) == (200, b"ok")
        seen = [h.split(b" ", 2)[1] for h in origin.requests]
        assert seen.count(b"/ours") == 2  # no-store aimed at this edge
        assert seen.count(b"/theirs") == 1 and seen.count(b"/all") == 1
        assert all(b'surrogate-capability: carousel="surrogate/1.0"' in h.lower() for h in origin.requests)
