"""Upstream side: keep-alive modes, request buffering before the member, timeouts."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from edge.testing import read_response, running_edge
from sampleapp.main import start_app

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def aps() -> AsyncIterator[list[int]]:
    started = [await start_app("127.0.0.1", 0, "ap0")]
    yield [port for _, port in started]
    for runner, _ in started:
        await runner.cleanup()


def _pool(ports: list[int], **opts: object) -> dict:
    members = [{"address": f"127.0.0.1:{p}"} for p in ports]
    return {"pool": {"app": {"members": members, **opts}}, "route": [{"path": "/", "pool": "app"}]}


async def test_upstream_keepalive_off_and_pool() -> None:
    """keepalive = "off": a connection per request; "pool": idle connections are reused."""
    peers: list[int] = []

    async def who(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", who)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        for mode, expect_distinct in (("off", 5), ("pool", 1)):
            peers.clear()
            async with running_edge(_pool([port], keepalive=mode)) as edge:
                async with aiohttp.ClientSession() as s:
                    for _ in range(5):
                        async with s.get(f"http://127.0.0.1:{edge.port}/") as r:
                            assert await r.text() == "ok"
            distinct = len(set(peers))
            assert distinct == expect_distinct, f"{mode}: {peers}"
    finally:
        await runner.cleanup()


async def test_request_body_is_buffered_before_the_ap_sees_it(aps: list[int]) -> None:
    async with running_edge(_pool(aps[:1])) as edge, aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{aps[0]}/stats") as r:
            before = (await r.json())["requests"]
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234")
        await asyncio.sleep(0.3)
        async with s.get(f"http://127.0.0.1:{aps[0]}/stats") as r:
            assert (await r.json())["requests"] == before  # the AP has not been contacted
        writer.write(b"56789")
        resp = await read_response(reader)
        assert resp.status == 200 and json.loads(resp.body)["body_length"] == 10
        writer.close()


async def test_member_timeout_gives_504(aps: list[int]) -> None:
    cfg = _pool(aps[:1], read_timeout=0.2)
    async with running_edge(cfg) as edge, aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        async with s.get(f"http://127.0.0.1:{edge.port}/slow?ms=2000") as r:
            assert r.status == 504
            assert "127.0.0.1" not in await r.text()
        assert time.monotonic() - t0 < 1.5


async def test_a_pooled_connection_closed_by_the_member_is_retried_quietly() -> None:
    """The member drops a kept-alive connection as the next request arrives (the classic race)."""
    served = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        first = True
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            if not first:
                break  # second request on this connection: close without answering
            first = False
            served += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        cfg = _pool([port], keepalive="pool", eject={"failures": 1})
        async with running_edge(cfg) as edge, aiohttp.ClientSession() as s:
            for _ in range(4):
                async with s.get(f"http://127.0.0.1:{edge.port}/") as r:
                    assert (r.status, await r.text()) == (200, "ok")
            member = edge.pools["app"].status()["members"][0]
            assert member["ejected_for"] == 0  # the races were not counted as failures
        assert served == 4
    finally:
        server.close()
        await server.wait_closed()


async def test_a_buffered_response_over_the_cap_is_refused(aps: list[int]) -> None:
    cfg = _pool(aps[:1])
    cfg["edge"] = {"response_memory_limit": 64 * 1024, "max_response_size": 512 * 1024}
    cfg["route"] = [
        {"path": "/stream/", "pool": "app", "buffering": False, "strip_prefix": True},
        {"path": "/", "pool": "app"},
    ]
    async with running_edge(cfg) as edge, aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{edge.port}/big?kb=256") as r:
            assert r.status == 200 and len(await r.read()) == 256 * 1024  # spilled, served
        async with s.get(f"http://127.0.0.1:{edge.port}/big?kb=1024") as r:
            assert r.status == 502  # over the cap: refused, nothing half-sent
        async with s.get(f"http://127.0.0.1:{edge.port}/stream/big?kb=1024") as r:
            assert r.status == 200 and len(await r.read()) == 1024 * 1024  # streaming has no cap
