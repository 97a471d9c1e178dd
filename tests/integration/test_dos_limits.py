"""Hard limits: connections per address and in total, request head and body sizes, member response heads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from edge.testing import raw_request, read_response, running_edge

pytestmark = pytest.mark.timeout(60)

CFG = {"route": [{"path": "/", "respond": 200, "body": "ok"}]}


async def _connect(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def _served(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Is this connection answered (True) or closed without an answer (False)?"""
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        return (await asyncio.wait_for(read_response(reader), 3)).status == 200
    except (ConnectionError, asyncio.IncompleteReadError):
        return False


async def test_connections_per_address_are_capped() -> None:
    async with running_edge({**CFG, "edge": {"max_connections_per_ip": 3}}) as edge:
        held = [await _connect(edge.port, "127.0.0.2") for _ in range(3)]
        extra = await _connect(edge.port, "127.0.0.2")
        assert not await _served(*extra)
        assert await _served(*await _connect(edge.port, "127.0.0.3"))  # another address is fine
        for r, w in held:
            assert await _served(r, w)
        held[0][1].close()
        await asyncio.sleep(0.05)
        assert await _served(*await _connect(edge.port, "127.0.0.2"))  # a freed place is usable
        assert edge.guard.refused["per_ip"] == 1


async def test_connections_in_total_are_capped() -> None:
    async with running_edge({**CFG, "edge": {"max_connections": 4}}) as edge:
        held = [await _connect(edge.port, f"127.0.0.{10 + i}") for i in range(4)]
        assert not await _served(*await _connect(edge.port, "127.0.0.20"))
        assert all([await _served(r, w) for r, w in held])
        assert edge.guard.refused["total"] == 1 and edge.guard.total == 4


async def test_oversized_request_heads_and_bodies() -> None:
    async with running_edge(
        {**CFG, "edge": {"max_header_size": 1024, "max_headers": 20, "max_body_size": 100}}
    ) as e:
        big_header = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n"
        many = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(30)) + b"\r\n"
        long_target = b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        endless = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: 1\r\n" * 9000  # 64 KiB+ without an end
        body = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n" + b"b" * 101
        chunked = (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n80\r\n"
            + b"c" * 128
            + b"\r\n0\r\n\r\n"
        )
        results = {}
        for name, data in (
            ("header", big_header),
            ("count", many),
            ("target", long_target),
            ("endless", endless),
            ("body", body),
            ("chunked", chunked),
        ):
            resp = await raw_request(e.port, data)
            results[name] = None if resp is None else resp.status
            if resp is not None:
                assert resp.header("connection") == "close", name
    assert results == {
        "header": 431,
        "count": 431,
        "target": 414,
        "endless": 431,
        "body": 413,
        "chunked": 413,
    }


@pytest.fixture
async def rude_member() -> AsyncIterator[int]:
    """A member whose response heads are too big or have too many fields."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        if b"GET /big" in request:
            head = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000 + b"\r\nContent-Length: 2\r\n\r\nok"
        elif b"GET /many" in request:
            head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150))
            head += b"Content-Length: 2\r\n\r\nok"
        else:
            head = b"HTTP/1.1 200 OK\r\nX-Fine: 1\r\nContent-Length: 2\r\n\r\nok"
        writer.write(head)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def _fetch(rude_member: int, path: str) -> tuple[int, bytes]:
    cfg = {
        "pool": {"app": {"members": [{"address": f"127.0.0.1:{rude_member}"}], "max_tries": 1}},
        "route": [{"path": "/", "pool": "app"}],
    }
    async with running_edge(cfg) as edge:
        resp = await raw_request(edge.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert resp is not None
    return resp.status, b"".join(f"{k}: {v}".encode() for k, v in resp.headers) + resp.body


async def test_member_response_with_too_many_header_fields_is_502(rude_member: int) -> None:
    assert (await _fetch(rude_member, "/fine"))[0] == 200
    status, seen = await _fetch(rude_member, "/many")
    assert status == 502 and b"x-149" not in seen


async def test_member_response_head_over_64k_is_502(rude_member: int) -> None:
    status, seen = await _fetch(rude_member, "/big")
    assert status == 502 and b"a" * 100 not in seen
