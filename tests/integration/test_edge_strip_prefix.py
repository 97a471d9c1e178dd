"""strip_prefix through a running edge: the member sees the path without the decoded prefix."""

from __future__ import annotations

import asyncio

import pytest

from edge.testing import raw_request, running_edge

pytestmark = pytest.mark.timeout(30)


async def test_a_percent_encoded_prefix_is_stripped_and_an_encoded_slash_is_refused() -> None:
    seen: list[str] = []

    async def member(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A member that records each request target and answers 204."""
        while line := await reader.readline():
            seen.append(line.split(b" ")[1].decode())
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(member, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = {
        "pool": {"m": {"members": [{"address": f"127.0.0.1:{port}"}]}},
        "route": [
            {"path": "/a b/", "pool": "m", "strip_prefix": True},
            {"path": "/café", "pool": "m", "strip_prefix": True},
            {"path": "/", "respond": 404},
        ],
    }
    try:
        async with running_edge(cfg) as edge:

            async def get(target: str) -> int:
                r = await raw_request(edge.port, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert r is not None
                return r.status

            assert await get("/a%20b/x?q=1") == 204
            assert await get("/caf%C3%A9/menu%20du%20jour") == 204
            assert await get("/caf%c3%a9") == 204
            assert await get("/a%20b%2Fx") == 400  # an encoded slash never reaches a member
    finally:
        server.close()
    assert seen == ["/x?q=1", "/menu%20du%20jour", "/"]
