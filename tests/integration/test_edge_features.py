"""Balancing, streaming, WebSocket, keep-alive, limits, user features, admin, shutdown, workers."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from carousel.etcdserver import free_port
from edge.core.pipeline import BytesBody, Exchange, Handler, Reply
from edge.testing import raw_request, running_edge
from sampleapp.main import start_app
from tests.procs import ProcessGroup, wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def aps() -> AsyncIterator[list[int]]:
    started = [await start_app("127.0.0.1", 0, f"ap{i}") for i in range(3)]
    yield [port for _, port in started]
    for runner, _ in started:
        await runner.cleanup()


def _pool(ports: list[int], weights: list[int] | None = None, **opts: object) -> dict:
    weights = weights or [1] * len(ports)
    members = [{"address": f"127.0.0.1:{p}", "weight": w} for p, w in zip(ports, weights, strict=True)]
    return {"pool": {"app": {"members": members, **opts}}, "route": [{"path": "/", "pool": "app"}]}


async def _who(s: aiohttp.ClientSession, url: str, **kw: object) -> str:
    async with s.get(url, **kw) as r:  # type: ignore[arg-type]
        return str((await r.json())["ap"])


async def test_weighted_round_robin_spreads_by_weight(aps: list[int]) -> None:
    async with running_edge(_pool(aps, [1, 2, 3])) as edge, aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{edge.port}/echo"
        counts = Counter([await _who(s, url) for _ in range(60)])
    assert counts == {"ap0": 10, "ap1": 20, "ap2": 30}


async def test_consistent_hash_sticks_to_a_member(aps: list[int]) -> None:
    cfg = _pool(aps, balance="hash", hash_key="cookie:session")
    async with running_edge(cfg) as edge, aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{edge.port}/echo"
        homes = {}
        for user in range(12):
            seen = {await _who(s, url, headers={"Cookie": f"session=u{user}"}) for _ in range(4)}
            assert len(seen) == 1
            homes[user] = seen.pop()
        assert len(set(homes.values())) >= 2  # users spread over members
        # Removing one member moves only its own users.
        victim = edge.pools["app"].members[f"127.0.0.1:{aps[0]}"]
        victim.healthy = False
        for user, home in homes.items():
            now = await _who(s, url, headers={"Cookie": f"session=u{user}"})
            if home != "ap0":
                assert now == home


async def test_least_connections_avoids_the_busy_member(aps: list[int]) -> None:
    cfg = _pool(aps[:2], balance="least_conn")
    async with running_edge(cfg) as edge, aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{edge.port}"
        slow = asyncio.create_task(s.get(url + "/slow?ms=800"))
        await asyncio.sleep(0.2)
        busy = next(m for m in edge.pools["app"].members.values() if m.active)
        seen = Counter([await _who(s, url + "/echo") for _ in range(6)])
        (await slow).release()
    assert busy.name.endswith(str(aps[0])) or busy.name.endswith(str(aps[1]))
    idle = "ap1" if busy.name.endswith(str(aps[0])) else "ap0"
    assert seen == {idle: 6}


async def test_unbuffered_route_streams(aps: list[int]) -> None:
    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(0.3)
        return resp

    app = web.Application()
    app.router.add_get("/events", sse)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        cfg = _pool([port])
        cfg["route"] = [{"path": "/", "pool": "app", "buffering": False}]
        async with running_edge(cfg) as edge, aiohttp.ClientSession() as s:
            t0 = time.monotonic()
            async with s.get(f"http://127.0.0.1:{edge.port}/events") as r:
                first = await r.content.readuntil(b"\n\n")
                first_at = time.monotonic() - t0
                rest = await r.read()
        assert first == b"data: 0\n\n" and first_at < 0.25  # not held back until the end
        assert rest == b"data: 1\n\ndata: 2\n\n"
    finally:
        await runner.cleanup()


async def test_websocket_pass_through() -> None:
    async def ws_echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("chat",))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    app = web.Application()
    app.router.add_get("/ws", ws_echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        cfg = _pool([port])
        cfg["route"] = [
            {"path": "/ws", "pool": "app", "websocket": True},
            {"path": "/", "pool": "app"},
        ]
        async with running_edge(cfg) as edge, aiohttp.ClientSession() as s:
            async with s.ws_connect(f"ws://127.0.0.1:{edge.port}/ws", protocols=("chat",)) as ws:
                assert ws.protocol == "chat"
                await ws.send_str("hi")
                assert await ws.receive_str() == "echo:hi"
                await ws.send_bytes(b"abc")
                assert await ws.receive_bytes() == b"cba"
            with pytest.raises(aiohttp.WSServerHandshakeError):  # route without websocket
                await s.ws_connect(f"ws://127.0.0.1:{edge.port}/other")
    finally:
        await runner.cleanup()


async def test_keepalive_limit_and_body_limit(aps: list[int]) -> None:
    cfg = _pool(aps[:1])
    cfg["edge"] = {"max_requests_per_connection": 3, "max_body_size": 1000}
    async with running_edge(cfg) as edge:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        from edge.testing import read_response

        closes = []
        for _ in range(3):
            writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            resp = await read_response(reader)
            closes.append(resp.header("connection"))
        assert closes[:2] == [None, None] and closes[2] == "close"
        assert await reader.read() == b""  # closed by the edge after the 3rd
        writer.close()
        big = await raw_request(
            edge.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000
        )
        assert big is not None and big.status == 413
        chunked = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunked += b"".join(b"1f4\r\n" + b"y" * 500 + b"\r\n" for _ in range(3)) + b"0\r\n\r\n"
        resp2 = await raw_request(edge.port, chunked)
        assert resp2 is not None and resp2.status == 413  # no length announced: counted
        ok = await raw_request(
            edge.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789"
        )
        assert ok is not None and json.loads(ok.body)["body_length"] == 10


async def test_a_stalled_body_gets_408(aps: list[int]) -> None:
    cfg = _pool(aps[:1])
    cfg["edge"] = {"body_timeout": 0.3}
    async with running_edge(cfg) as edge:
        t0 = time.monotonic()
        resp = await raw_request(
            edge.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly-this"
        )
        assert resp is not None and resp.status == 408
        assert time.monotonic() - t0 < 2


class StampFeature:
    """A user feature: vetoes /blocked, stamps every other response."""

    async def __call__(self, ex: Exchange, call_next: Handler) -> Reply:
        if ex.request.path == "/blocked":
            return Reply(403, CIMultiDict({"Content-Type": "text/plain"}), BytesBody(b"no"))
        reply = await call_next(ex)
        reply.headers["X-Stamp"] = ex.route.name
        return reply


def stamp_factory(config: object, ctx: object) -> StampFeature:
    return StampFeature()


async def test_user_feature_by_dotted_path(aps: list[int]) -> None:
    cfg = _pool(aps[:1])
    cfg["edge"] = {"features": ["tests.integration.test_edge_features:stamp_factory"]}
    async with running_edge(cfg) as edge, aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{edge.port}/echo") as r:
            assert r.headers["X-Stamp"] == "route0"
        async with s.get(f"http://127.0.0.1:{edge.port}/blocked") as r:
            assert (r.status, await r.text()) == (403, "no")


async def test_errors_leak_nothing_internal() -> None:
    dead = free_port()
    cfg = {
        "pool": {"app": {"members": [{"address": f"127.0.0.1:{dead}"}]}},
        "route": [{"path": "/", "pool": "app"}],
    }
    async with running_edge(cfg) as edge, aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{edge.port}/") as r:
            body = await r.text()
            assert r.status == 502
            assert str(dead) not in body and "127.0.0.1" not in body
            assert str(dead) not in str(r.headers)
        # After ejection there is no member left: 503.
        for _ in range(3):
            await (await s.get(f"http://127.0.0.1:{edge.port}/")).release()
        async with s.get(f"http://127.0.0.1:{edge.port}/") as r:
            assert r.status == 503 and "Retry-After" in r.headers


async def test_admin_metrics_status_and_access_log(aps: list[int], capsys) -> None:
    cfg = _pool(aps[:1], max_conns=2)
    cfg["edge"] = {"access_log": True}
    async with running_edge(cfg) as edge, aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{edge.port}/echo") as r:
            await r.read()
        admin = f"http://127.0.0.1:{edge.admin_port}"
        async with s.get(admin + "/healthz") as r:
            assert r.status == 200
        async with s.get(admin + "/metrics") as r:
            text = await r.text()
        async with s.get(admin + "/status") as r:
            status = await r.json()
    assert 'carousel_edge_requests_total{route="route0",status="200"} 1.0' in text
    assert "carousel_edge_upstream_seconds_bucket" in text
    assert 'carousel_edge_queue_depth{pool="app"} 0.0' in text
    assert f'carousel_edge_member_up{{member="127.0.0.1:{aps[0]}",pool="app"}} 1.0' in text
    assert "carousel_edge_active_connections" in text
    assert status["pools"]["app"]["members"][0]["requests"] == 1
    out = capsys.readouterr()
    line = next(x for x in (out.out + out.err).splitlines() if "access" in x and "/echo" in x)
    for field in ("route0", "200", f"127.0.0.1:{aps[0]}", "upstream_ms"):
        assert field in line


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read()


@pytest.mark.slow
async def test_graceful_shutdown_finishes_in_flight(procs: ProcessGroup, aps: list[int]) -> None:
    port, admin = free_port(), free_port()
    toml = f"""
[edge]
port = {port}
shutdown_timeout = 5.0
[admin]
port = {admin}
[pool.app]
members = [{{ address = "127.0.0.1:{aps[0]}" }}]
[[route]]
path = "/"
pool = "app"
"""
    d = procs.daemon("edge", "edge", toml)
    await asyncio.to_thread(wait_for, lambda: _ok(f"http://127.0.0.1:{admin}/healthz"), 15, what="edge up")
    in_flight = asyncio.create_task(asyncio.to_thread(_get, f"http://127.0.0.1:{port}/slow?ms=1500"))
    await asyncio.sleep(0.5)
    d.signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    with pytest.raises(OSError):  # no longer accepting
        _get(f"http://127.0.0.1:{port}/echo")
    status, body = await in_flight
    assert status == 200 and body.startswith(b"slept 1500 ms")
    assert await asyncio.to_thread(d.wait, 10) == 0


def _ok(url: str) -> bool:
    try:
        return _get(url)[0] == 200
    except OSError:
        return False


@pytest.mark.slow
async def test_workers_share_the_port(procs: ProcessGroup, aps: list[int]) -> None:
    port, admin = free_port(), free_port()
    toml = f"""
[edge]
port = {port}
workers = 2
[admin]
port = {admin}
[pool.app]
members = [{{ address = "127.0.0.1:{aps[0]}" }}]
[[route]]
path = "/"
pool = "app"
"""
    d = procs.daemon("edge", "edge-workers", toml)
    await asyncio.to_thread(wait_for, lambda: _ok(f"http://127.0.0.1:{admin}/healthz"), 15, what="edge up")
    await asyncio.to_thread(wait_for, lambda: d.output().count("edge listening") == 2, 15)
    results = await asyncio.gather(
        *(asyncio.to_thread(_get, f"http://127.0.0.1:{port}/echo") for _ in range(20))
    )
    assert all(status == 200 for status, _ in results)
    d.signal(signal.SIGTERM)
    assert await asyncio.to_thread(d.wait, 15) == 0


async def test_pipelining_expect_continue_and_a_bad_request_in_line(aps: list[int]) -> None:
    from edge.testing import read_response

    async with running_edge(_pool(aps[:1])) as edge:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(
            b"GET /slow?ms=200 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /echo?second HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /echo HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n"
        )
        first = await read_response(reader)
        second = await read_response(reader)
        third = await read_response(reader)
        assert first.status == 200 and first.body.startswith(b"slept 200")
        assert second.status == 200 and json.loads(second.body)["query"] == "second"
        assert third.status == 400 and third.header("connection") == "close"
        assert await reader.read() == b""
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        interim = await reader.readuntil(b"\r\n\r\n")
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"body")
        final = await read_response(reader)
        assert final.status == 200 and json.loads(final.body)["body_length"] == 4
        writer.close()
