"""Where the DoS detector and purges reach: requests that match no route, passthrough streams and
CONNECT tunnels of a banned client, the forward proxy's chain and its cache.

Clients use their own loopback source address (127.0.0.x) and the allowlist is
empty, so loopback traffic is counted like anyone's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trustme

from carousel.config import EtcdConfig
from carousel.etcd import Etcd
from carousel.ops import write_purge
from edge.features.dos import DosDetector
from edge.front.server import Edge
from edge.testing import read_response, running_edge
from sampleapp.main import start_app
from tests.integration.test_dos import Client
from tests.integration.test_forward_proxy import NAMES, curl, forward
from tests.integration.test_passthrough import (  # noqa: F401  (members, member_ca: fixtures)
    TlsMember,
    member_ca,
    members,
    passthrough_config,
)

pytestmark = pytest.mark.timeout(60)

CLIENT = "127.0.0.4"


def dos(**options: Any) -> dict[str, Any]:
    return {
        "enabled": True,
        "cluster": False,
        "allowlist": [],
        "soft_rate": 10,
        "hard_rate": 1000,
        "ban_seconds": 30,
        **options,
    }


def detector(edge: Edge) -> DosDetector:
    found = next(f for f in edge.features if isinstance(f, DosDetector))
    return found


@pytest.fixture
async def origin() -> AsyncIterator[int]:
    runner, port = await start_app("127.0.0.1", 0, "origin")
    yield port
    await runner.cleanup()


async def test_requests_that_match_no_route_are_limited_and_banned() -> None:
    cfg = {
        "route": [{"hosts": ["app.example.test"], "path": "/", "respond": 200, "body": "ok"}],
        "dos": dos(soft_rate=10, hard_rate=30),
    }
    async with running_edge(cfg) as edge:
        client = Client(edge.port, CLIENT)
        statuses: list[int | None] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and 403 not in statuses:
            statuses.append(await client.get("/probe"))  # Host: www.example.test has no route
        client.close()
        assert statuses[0] == 404
        assert 429 in statuses, statuses[:40]
        assert 403 in statuses, "a scanner of unknown hosts is banned like any other flooder"
        assert detector(edge).status()["bans"].keys() == {CLIENT}


async def test_a_ban_cuts_open_connect_tunnels() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(4096):
            writer.write(data)
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = {**forward(connect_ports=[port]), "dos": dos()}
    try:
        async with running_edge(cfg) as edge:
            assert edge.forward is not None
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", edge.forward.port, local_addr=(CLIENT, 0)
            )
            target = f"origin.test:{port}"
            writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            head = await asyncio.wait_for(read_response(reader, head=True), 5)
            assert head.status == 200
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
            started = time.monotonic()
            assert detector(edge).ban(CLIENT, "test")
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                # EOF or a reset: the tunnel is gone, not left open for the ban's 30 s.
                data = await asyncio.wait_for(reader.read(4096), 2)
                if data == b"":
                    raise ConnectionResetError("closed")
            assert time.monotonic() - started < 1
            assert not edge.forward.tunnels
            writer.close()
    finally:
        server.close()


async def test_a_ban_cuts_open_passthrough_streams(
    members: Callable[..., TlsMember],  # noqa: F811
    member_ca: trustme.CA,  # noqa: F811
) -> None:
    import ssl

    member = members("m1")
    cfg = {**passthrough_config({"tls": [member.port]}, default_pool="tls"), "dos": dos()}
    async with running_edge(cfg) as edge:
        listener = edge.passthrough[0]
        ctx = ssl.create_default_context()
        member_ca.configure_trust(ctx)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1",
                listener.port,
                ssl=ctx,
                server_hostname="secure.example.test",
                local_addr=(CLIENT, 0),
            ),
            5,
        )
        writer.write(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        assert len(listener.connections) == 1  # the stream is held open by the member
        assert detector(edge).ban(CLIENT, "test")
        for _ in range(100):
            if not listener.connections:
                break
            await asyncio.sleep(0.01)
        assert not listener.connections, "the banned client's stream is still piped"
        try:
            data = await asyncio.wait_for(reader.read(1), 2)
        except (ConnectionError, ssl.SSLError):
            data = b""
        assert data == b""
        writer.close()


async def test_the_forward_chain_has_dos_protection(origin: int) -> None:
    cfg = {**forward(), "dos": dos(soft_rate=5, hard_rate=1000)}
    async with running_edge(cfg) as edge:
        assert edge.forward is not None
        proxy = edge.forward.port
        client = Client(proxy, CLIENT)
        statuses: list[int | None] = []
        for _ in range(30):
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy, local_addr=(CLIENT, 0))
            except OSError:
                statuses.append(None)
                continue
            writer.write(
                f"GET http://origin.test:{origin}/echo HTTP/1.1\r\nHost: origin.test:{origin}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            resp = await asyncio.wait_for(read_response(reader), 5)
            statuses.append(resp.status)
            writer.close()
        client.close()
        assert statuses[0] == 200
        assert statuses.count(429) >= 15, statuses
        assert detector(edge).counts["rejected"] >= 15


async def test_a_cluster_purge_reaches_the_forward_cache(origin: int, etcd_cfg: EtcdConfig) -> None:
    cfg = {
        **forward(),
        "cache": {"enabled": True, "cluster_purge": True},
        "etcd": {"endpoints": etcd_cfg.endpoints, "prefix": etcd_cfg.prefix},
    }
    etcd = Etcd(etcd_cfg)
    try:
        async with running_edge(cfg) as edge:
            assert edge.forward is not None
            port = edge.forward.port
            url = f"http://origin.test:{origin}/cacheable?max_age=60"
            await curl(port, url)
            assert "hit" in (await curl(port, url)).headers["cache-status"]
            # By path prefix on every host (a purge by URL with the port: the next test).
            await write_purge(etcd, etcd_cfg, "prefix", "/cacheable")
            for _ in range(200):
                if "hit" not in (await curl(port, url)).headers["cache-status"]:
                    break
                await asyncio.sleep(0.02)
            else:
                pytest.fail("the forward cache still answers a purged URL from its store")
    finally:
        await etcd.close()


async def test_a_cluster_url_purge_with_the_origins_port_reaches_the_forward_cache(
    origin: int, etcd_cfg: EtcdConfig
) -> None:
    # The forward proxy keys an origin as host:port unless the port is 80; a URL purge that
    # names the port removes exactly that origin's entry, not one of the same path elsewhere.
    cfg = {
        **forward(),
        "cache": {"enabled": True, "cluster_purge": True},
        "etcd": {"endpoints": etcd_cfg.endpoints, "prefix": etcd_cfg.prefix},
    }
    etcd = Etcd(etcd_cfg)
    try:
        async with running_edge(cfg) as edge:
            assert edge.forward is not None
            port = edge.forward.port
            url = f"http://origin.test:{origin}/cacheable?max_age=60&p=1"
            other = f"http://origin.test:{origin}/cacheable?max_age=60&p=2"
            for u in (url, other):
                await curl(port, u)
                assert "hit" in (await curl(port, u)).headers["cache-status"]
            await write_purge(etcd, etcd_cfg, "url", url.replace("origin.test", "Origin.Test"))
            for _ in range(200):
                if "hit" not in (await curl(port, url)).headers["cache-status"]:
                    break
                await asyncio.sleep(0.02)
            else:
                pytest.fail("the forward cache still answers a URL purged with its port")
            assert "hit" in (await curl(port, other)).headers["cache-status"]
    finally:
        await etcd.close()


assert NAMES  # the forward() helper resolves origin.test through this table
