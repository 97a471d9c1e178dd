"""CONNECT tunnels over real sockets: TLS end to end (curl and Python ssl), ports, auth, byte-pipe details.

The TLS origin presents a certificate from a test CA (trustme) that the proxy
never sees: it only pipes bytes. Every origin listens on loopback.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from edge.core.config import from_dict
from edge.front.server import Edge
from edge.testing import read_response, running_edge
from tests.integration.test_forward_proxy import curl, forward, metrics

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_origin(ca: trustme.CA) -> AsyncIterator[tuple[int, list[dict[str, str]]]]:
    """An HTTPS server on loopback; yields its port and the request headers it saw."""
    seen: list[dict[str, str]] = []

    async def hello(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(text="hello over TLS\n")

    app = web.Application()
    app.router.add_get("/", hello)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    assert site._server is not None
    yield site._server.sockets[0].getsockname()[1], seen  # type: ignore[union-attr]
    await runner.cleanup()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def tcp_origin(handler: Handler) -> tuple[asyncio.Server, int]:
    """A raw TCP server on loopback."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def open_tunnel(proxy: int, target: str, extra: bytes = b"") -> tuple[Any, asyncio.StreamReader, Any]:
    """Send CONNECT (plus ``extra`` bytes at once); returns (response head, reader, writer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy)
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode() + extra)
    head = await asyncio.wait_for(read_response(reader, head=True), 5)
    return head, reader, writer


async def test_connect_to_a_local_tls_server_with_curl(
    tls_origin: tuple[int, list[dict[str, str]]], ca: trustme.CA, tmp_path: Path
) -> None:
    port, seen = tls_origin
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with running_edge(forward(connect_ports=[port])) as edge:
        assert edge.forward is not None
        r = await curl(edge.forward.port, f"https://localhost:{port}/", "--cacert", str(ca_file))
        assert (r.exit, r.status, r.body) == (0, 200, b"hello over TLS\n"), r.stderr
        # The origin saw only what curl sent inside TLS: nothing of the proxy, nothing of the client.
        assert {k.lower() for k in seen[0]} == {"host", "user-agent", "accept"}
        # Counted and logged when the tunnel closes.
        for _ in range(50):
            if not edge.forward.tunnels:
                break
            await asyncio.sleep(0.02)
        text = await metrics(edge)
        assert 'carousel_edge_forward_requests_total{kind="connect",status="200"} 1.0' in text
        assert "carousel_edge_forward_tunnels_open 0.0" in text
        up = next(line for line in text.splitlines() if 'tunnel_bytes_total{direction="up"}' in line)
        assert float(up.split()[-1]) > 200  # at least a ClientHello and a request went up


async def test_connect_to_a_local_tls_server_with_python_ssl(
    tls_origin: tuple[int, list[dict[str, str]]], ca: trustme.CA
) -> None:
    port, _ = tls_origin
    async with running_edge(forward(connect_ports=[port])) as edge:
        assert edge.forward is not None
        head, reader, writer = await open_tunnel(edge.forward.port, f"localhost:{port}")
        try:
            assert head.status == 200 and head.header("content-length") is None
            context = ssl.create_default_context()
            ca.configure_trust(context)
            await writer.start_tls(context, server_hostname="localhost")
            writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            response = await asyncio.wait_for(read_response(reader), 5)
            assert (response.status, response.body) == (200, b"hello over TLS\n")
            cert = writer.get_extra_info("peercert")
            assert ("DNS", "localhost") in cert["subjectAltName"]  # the origin's certificate, end to end
        finally:
            writer.close()


async def test_connect_to_a_port_that_is_not_allowed_gets_403(
    tls_origin: tuple[int, list[dict[str, str]]],
) -> None:
    port, seen = tls_origin
    async with running_edge(forward()) as edge:  # connect_ports: [443] only
        assert edge.forward is not None
        head, reader, writer = await open_tunnel(edge.forward.port, f"localhost:{port}")
        try:
            body = await reader.readexactly(int(head.header("content-length")))
            assert head.status == 403 and b"this port are not allowed" in body
            # The connection stays usable for plain requests (the bytes held back for the
            # tunnel are read as HTTP again).
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            follow = await asyncio.wait_for(read_response(reader), 5)
            assert follow.status == 400  # origin-form: not a proxy request, but answered
        finally:
            writer.close()
        r = await curl(edge.forward.port, f"https://localhost:{port}/", "-k")
        assert r.exit != 0 and "403" in r.stderr
        assert 'carousel_edge_forward_refused_total{reason="port"} 2.0' in await metrics(edge)
    assert seen == []


async def test_connect_needs_credentials_when_users_are_set(
    tls_origin: tuple[int, list[dict[str, str]]],
) -> None:
    port, _ = tls_origin
    async with running_edge(forward(connect_ports=[port], users={"alice": "pw"})) as edge:
        assert edge.forward is not None
        r = await curl(edge.forward.port, f"https://localhost:{port}/", "-k")
        assert r.exit != 0 and "407" in r.stderr
        r = await curl(edge.forward.port, f"https://localhost:{port}/", "-k", "--proxy-user", "alice:nope")
        assert r.exit != 0 and "407" in r.stderr
        r = await curl(edge.forward.port, f"https://localhost:{port}/", "-k", "--proxy-user", "alice:pw")
        assert (r.exit, r.status) == (0, 200), r.stderr


async def test_bytes_sent_with_the_connect_and_a_server_speaking_first() -> None:
    received: list[bytes] = []

    async def banner_then_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 banner\r\n")  # the origin speaks before the client
        received.append(await reader.readexactly(5))
        writer.write(b"echo " + received[-1])
        await writer.drain()
        writer.close()

    server, port = await tcp_origin(banner_then_echo)
    try:
        async with running_edge(forward(connect_ports=[port])) as edge:
            assert edge.forward is not None
            head, reader, writer = await open_tunnel(edge.forward.port, f"127.0.0.1:{port}", extra=b"early")
            try:
                assert head.status == 200  # the head came before the banner
                assert await asyncio.wait_for(reader.readexactly(12), 5) == b"220 banner\r\n"
                assert await asyncio.wait_for(reader.read(), 5) == b"echo early"
            finally:
                writer.close()
    finally:
        server.close()
    assert received == [b"early"]


async def test_half_close_is_passed_through() -> None:
    async def count_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's EOF arrives through the tunnel
        writer.write(b"got %d bytes" % len(data))
        await writer.drain()
        writer.close()

    server, port = await tcp_origin(count_until_eof)
    try:
        async with running_edge(forward(connect_ports=[port])) as edge:
            assert edge.forward is not None
            _head, reader, writer = await open_tunnel(edge.forward.port, f"127.0.0.1:{port}")
            try:
                writer.write(b"x" * 70000)
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(), 5) == b"got 70000 bytes"
            finally:
                writer.close()
    finally:
        server.close()


async def test_megabytes_both_ways_arrive_intact() -> None:
    size = 8 * 1024 * 1024
    payload = bytes(range(256)) * (size // 256)

    async def sha_then_send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.readexactly(size)
        writer.write(hashlib.sha256(data).digest() + payload)
        await writer.drain()
        writer.close()

    server, port = await tcp_origin(sha_then_send)
    try:
        async with running_edge(forward(connect_ports=[port])) as edge:
            assert edge.forward is not None
            _head, reader, writer = await open_tunnel(edge.forward.port, f"127.0.0.1:{port}")
            try:
                writer.write(payload)
                assert await asyncio.wait_for(reader.readexactly(32), 20) == hashlib.sha256(payload).digest()
                back = await asyncio.wait_for(reader.readexactly(size), 20)
                assert back == payload
            finally:
                writer.close()
    finally:
        server.close()


async def test_idle_tunnels_close_and_max_tunnels_holds() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server, port = await tcp_origin(silent)
    try:
        cfg = forward(connect_ports=[port], tunnel_idle_timeout=0.5, max_tunnels=1)
        async with running_edge(cfg) as edge:
            assert edge.forward is not None
            head, reader, writer = await open_tunnel(edge.forward.port, f"127.0.0.1:{port}")
            assert head.status == 200
            second, _reader2, writer2 = await open_tunnel(edge.forward.port, f"127.0.0.1:{port}")
            assert second.status == 503 and second.header("retry-after") == "1"
            writer2.close()
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the proxy
            assert 0.3 < loop.time() - started < 2.0
            writer.close()
            assert "carousel_edge_forward_tunnel_idle_closes_total 1.0" in await metrics(edge)
    finally:
        server.close()


async def test_shutdown_lets_a_tunnel_finish_within_the_deadline() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
        writer.close()

    server, port = await tcp_origin(echo)
    edge_config = {"host": "127.0.0.1", "port": 0, "access_log": False, "shutdown_timeout": 5}
    edge = Edge(from_dict({**forward(connect_ports=[port]), "edge": edge_config, "admin": {"port": 0}}))
    await edge.start()
    stopping: asyncio.Task[None] | None = None
    try:
        assert edge.forward is not None
        _head, reader, writer = await open_tunnel(edge.forward.port, f"127.0.0.1:{port}")
        stopping = asyncio.create_task(edge.stop())
        await asyncio.sleep(0.2)
        writer.write(b"still there?")
        assert await asyncio.wait_for(reader.readexactly(12), 5) == b"still there?"
        assert not stopping.done()  # waiting for the tunnel
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", edge.forward.port)  # no longer accepting
        writer.close()
        await asyncio.wait_for(asyncio.shield(stopping), 3)  # done as soon as the tunnel is
    finally:
        await (stopping if stopping is not None else edge.stop())
        server.close()
