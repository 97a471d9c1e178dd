"""TLS passthrough end to end: the member terminates TLS with a certificate the edge never sees."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import trustme

from carousel.config import EtcdConfig
from carousel.etcd import Etcd
from carousel.registry import Keys, ServiceRecord
from edge.testing import running_edge

pytestmark = pytest.mark.timeout(90)


class TlsMember:
    """A tiny TLS server standing in for an AP that terminates TLS itself.

    It reads an optional PROXY protocol header byte-exactly (so the ClientHello
    behind it is untouched), then does the TLS handshake with its own
    certificate and answers one request with JSON: who it is, the SNI it saw,
    and the client address from the PROXY header. ``GET /hold`` keeps the
    stream open until the client closes it.
    """

    def __init__(self, name: str, cert: trustme.LeafCert, proxy: str = "off") -> None:
        self.name = name
        self.proxy = proxy
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(self.ctx)
        self.ctx.sni_callback = self._sni
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.names: list[str | None] = []
        self.clients: list[tuple[str, int] | None] = []
        self.active = 0
        self.peak = 0
        self.streams = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _sni(self, sslobj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        self.names.append(name)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _recv_exactly(self, conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def _proxy_client(self, conn: socket.socket) -> tuple[str, int] | None:
        if self.proxy == "v1":
            line = b""
            while not line.endswith(b"\r\n"):
                line += self._recv_exactly(conn, 1)
            parts = line.decode().split()
            assert parts[0] == "PROXY" and parts[1] in ("TCP4", "TCP6"), line
            return parts[2], int(parts[4])
        if self.proxy == "v2":
            head = self._recv_exactly(conn, 16)
            assert head[:12] == b"\r\n\r\n\x00\r\nQUIT\n" and head[12] == 0x21, head
            body = self._recv_exactly(conn, struct.unpack("!H", head[14:16])[0])
            size = 4 if head[13] == 0x11 else 16
            return str(ipaddress.ip_address(body[:size])), struct.unpack("!H", body[2 * size : 2 * size + 2])[
                0
            ]
        return None

    def _handle(self, conn: socket.socket) -> None:
        with self._lock:
            self.active += 1
            self.streams += 1
            self.peak = max(self.peak, self.active)
        left = False

        def leave() -> None:
            # Counted out before the socket closes, or the edge could see the close first.
            nonlocal left
            if not left:
                left = True
                with self._lock:
                    self.active -= 1

        try:
            conn.settimeout(10)
            client = self._proxy_client(conn)
            self.clients.append(client)
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = tls.recv(4096)
                    if not chunk:
                        return
                    request += chunk
                body = json.dumps({"member": self.name, "sni": self.names[-1], "client": client}).encode()
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                if request.startswith(b"GET /hold"):
                    tls.recv(1)  # until the client closes
                leave()
        except (OSError, ConnectionError, ssl.SSLError):
            pass
        finally:
            leave()
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(2)


@pytest.fixture(scope="module")
def member_ca() -> trustme.CA:
    """The members' own CA: the edge has neither it nor any member key."""
    return trustme.CA()


@pytest.fixture
def members(member_ca: trustme.CA) -> Iterator[Callable[..., TlsMember]]:
    cert = member_ca.issue_cert("secure.example.test", "*.apps.example.test", "default.example.test")
    made: dict[str, TlsMember] = {}

    def make(name: str, proxy: str = "off") -> TlsMember:
        made[name] = TlsMember(name, cert, proxy)
        return made[name]

    yield make
    for m in made.values():
        m.close()


def passthrough_config(pools: dict[str, list[int]], **listener: Any) -> dict[str, Any]:
    return {
        "pool": {
            name: {"members": [{"address": f"127.0.0.1:{p}"} for p in ports], "connect_timeout": 0.5}
            for name, ports in pools.items()
        },
        "route": [{"path": "/", "respond": 404}],
        "passthrough": [{"port": 0, **listener}],
    }


async def tls_request(
    port: int,
    server_name: str | None,
    ca: trustme.CA,
    path: str = "/",
    source: str = "127.0.0.1",
) -> tuple[dict[str, Any], dict[str, Any], int]:
    """A TLS request through the passthrough: (JSON answer, member certificate, client port)."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if server_name is None:
        ctx.check_hostname = False
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=server_name or "", local_addr=(source, 0)
        ),
        5,
    )
    try:
        local_port = writer.get_extra_info("sockname")[1]
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        body = json.loads(await reader.readexactly(length))
        return body, writer.get_extra_info("peercert"), local_port
    finally:
        writer.close()


@pytest.mark.parametrize("proxy", ["off", "v1", "v2"])
async def test_streams_go_by_sni_untouched_with_the_client_address(members, member_ca, proxy: str) -> None:
    one = members("one", proxy)
    two = members("two", proxy)
    cfg = passthrough_config(
        {"s1": [one.port], "s2": [two.port]},
        proxy_protocol=proxy,
        route=[
            {"names": ["secure.example.test"], "pool": "s1"},
            {"names": ["*.apps.example.test"], "pool": "s2"},
        ],
    )
    async with running_edge(cfg) as edge:
        port = edge.passthrough[0].port
        body, cert, client_port = await tls_request(
            port, "secure.example.test", member_ca, source="127.0.0.7"
        )
        assert (body["member"], body["sni"]) == ("one", "secure.example.test")
        # The certificate is the member's (trusted through the members' CA only).
        assert ("DNS", "secure.example.test") in cert["subjectAltName"]
        body, _, client_port2 = await tls_request(
            port, "shop.apps.example.test", member_ca, source="127.0.0.8"
        )
        assert (body["member"], body["sni"]) == ("two", "shop.apps.example.test")
    if proxy == "off":
        assert body["client"] is None
    else:
        assert one.clients == [("127.0.0.7", client_port)]
        assert two.clients[0] == ("127.0.0.8", client_port2)


async def test_curl_and_openssl_through_the_passthrough(members, member_ca, tmp_path) -> None:
    member = members("m")
    ca_file = tmp_path / "members-ca.pem"
    member_ca.cert_pem.write_to_path(str(ca_file))
    cfg = passthrough_config({"s": [member.port]}, route=[{"names": ["secure.example.test"], "pool": "s"}])
    async with running_edge(cfg) as edge:
        port = edge.passthrough[0].port
        curl = await asyncio.to_thread(
            subprocess.run,
            ["curl", "-sS", "--cacert", str(ca_file), "--resolve", f"secure.example.test:{port}:127.0.0.1",
             f"https://secure.example.test:{port}/"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        s_client = await asyncio.to_thread(
            subprocess.run,
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "secure.example.test",
             "-CAfile", str(ca_file), "-verify_hostname", "secure.example.test"],
            input="", capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    assert curl.returncode == 0, curl.stderr
    assert json.loads(curl.stdout)["member"] == "m"
    assert "Verify return code: 0 (ok)" in s_client.stdout


async def test_unknown_names_plain_http_and_silence_are_closed(members, member_ca) -> None:
    member = members("m")
    cfg = passthrough_config(
        {"s": [member.port]}, route=[{"names": ["secure.example.test"], "pool": "s"}], hello_timeout=0.3
    )
    async with running_edge(cfg) as edge:
        port = edge.passthrough[0].port
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await tls_request(port, "other.example.test", member_ca)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await tls_request(port, None, member_ca)  # no SNI and no default pool
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: secure.example.test\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 3) == b""
        assert 0.25 < time.monotonic() - started < 2.0
        writer.close()
        counts = edge.passthrough[0].counts
    assert counts["no_route"] == 2 and counts["not_tls"] == 1 and counts["hello_timeout"] == 1
    assert member.streams == 0


async def test_default_pool_takes_clients_without_sni(members, member_ca) -> None:
    member = members("fallback")
    cfg = passthrough_config({"d": [member.port]}, default_pool="d")
    async with running_edge(cfg) as edge:
        body, _, _ = await tls_request(edge.passthrough[0].port, None, member_ca)
    assert body == {"member": "fallback", "sni": None, "client": None}


async def test_balancing_and_a_dead_member_is_skipped(members, member_ca) -> None:
    a, b = members("a"), members("b")
    dead = socket.create_server(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # nothing listens there: connects are refused
    cfg = passthrough_config(
        {"s": [a.port, b.port, dead_port]}, route=[{"names": ["*.apps.example.test"], "pool": "s"}]
    )
    async with running_edge(cfg) as edge:
        port = edge.passthrough[0].port
        served = Counter()
        for i in range(12):
            body, _, _ = await tls_request(port, f"n{i}.apps.example.test", member_ca)
            served[body["member"]] += 1
        status = edge.pools["s"].status()
    # Round robin over the live two; every stream that met the dead member went on to a live one.
    assert served == {"a": 6, "b": 6}
    dead_status = next(m for m in status["members"] if m["address"].endswith(f":{dead_port}"))
    assert dead_status["ejected_for"] > 0  # passive ejection after the refused connects


async def test_max_conns_queues_streams_and_frees_the_slot_at_close(members, member_ca) -> None:
    m = members("m")
    cfg = passthrough_config({"s": [m.port]}, route=[{"names": ["secure.example.test"], "pool": "s"}])
    cfg["pool"]["s"].update(max_conns=1, max_queue=1, queue_timeout=5.0)
    ctx = ssl.create_default_context()
    member_ca.configure_trust(ctx)
    async with running_edge(cfg) as edge:
        port = edge.passthrough[0].port
        r1, w1 = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="secure.example.test"
        )
        w1.write(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
        await r1.readuntil(b"\r\n\r\n")
        # The second stream waits in the pool's queue: its handshake cannot even start.
        second = asyncio.create_task(tls_request(port, "secure.example.test", member_ca))
        await asyncio.sleep(0.5)
        assert not second.done() and m.active == 1 and len(edge.pools["s"].queue) == 1
        # A third finds the queue full and is closed at once.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await tls_request(port, "secure.example.test", member_ca)
        w1.close()  # the first stream ends: its slot goes to the waiter
        body, _, _ = await asyncio.wait_for(second, 5)
        assert body["member"] == "m"
    assert m.peak == 1


async def test_registry_members_receive_streams(members, member_ca, etcd_cfg: EtcdConfig) -> None:
    m = members("registered")
    etcd = Etcd(etcd_cfg)
    keys = Keys(etcd_cfg.prefix)
    record = ServiceRecord("tls-ap", "node1", m.port, ("127.0.0.1",))
    await etcd.put(keys.service("tls-ap", "node1"), record.encode())
    cfg = {
        "etcd": {"endpoints": etcd_cfg.endpoints, "prefix": etcd_cfg.prefix},
        "pool": {"s": {"service": "tls-ap"}},
        "route": [{"path": "/", "respond": 404}],
        "passthrough": [{"port": 0, "route": [{"names": ["secure.example.test"], "pool": "s"}]}],
    }
    try:
        async with running_edge(cfg) as edge:
            deadline = time.monotonic() + 5
            while not edge.pools["s"].members:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            body, _, _ = await tls_request(edge.passthrough[0].port, "secure.example.test", member_ca)
            assert body["member"] == "registered"
            # Draining in the registry: no new streams.
            await etcd.put(keys.service("tls-ap", "node1"), record.with_state("draining").encode())
            deadline = time.monotonic() + 5
            while edge.pools["s"].status()["members"][0]["state"] != "draining":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await tls_request(edge.passthrough[0].port, "secure.example.test", member_ca)
    finally:
        await etcd.close()
    assert m.streams == 1


@pytest.fixture
async def big_member(member_ca: trustme.CA) -> AsyncIterator[int]:
    """A TLS member (asyncio) that sends 4 MiB, to check flow control both ways."""
    cert = member_ca.issue_cert("big.example.test")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.readexactly(1024 * 1024)  # 1 MiB up
        writer.write(data * 4)  # 4 MiB down
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def test_large_streams_both_ways(big_member: int, member_ca) -> None:
    cfg = passthrough_config({"s": [big_member]}, route=[{"names": ["big.example.test"], "pool": "s"}])
    ctx = ssl.create_default_context()
    member_ca.configure_trust(ctx)
    async with running_edge(cfg) as edge:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", edge.passthrough[0].port, ssl=ctx, server_hostname="big.example.test"
        )
        payload = bytes(range(256)) * 4096
        writer.write(payload)
        got = await asyncio.wait_for(reader.read(), 20)
        writer.close()
    assert got == payload * 4


async def test_tcp_health_checks_take_a_dead_member_out_before_any_stream(members, member_ca) -> None:
    a = members("a")
    dead = socket.create_server(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    cfg = passthrough_config(
        {"s": [a.port, dead_port]}, route=[{"names": ["*.apps.example.test"], "pool": "s"}]
    )
    cfg["pool"]["s"]["health"] = {"enabled": True, "type": "tcp", "interval": 0.1, "timeout": 0.5, "fall": 1}
    async with running_edge(cfg) as edge:
        pool = edge.pools["s"]
        deadline = asyncio.get_running_loop().time() + 5
        while True:
            states = {m["address"]: m["healthy"] for m in pool.status()["members"]}
            if states == {f"127.0.0.1:{a.port}": True, f"127.0.0.1:{dead_port}": False}:
                break
            assert asyncio.get_running_loop().time() < deadline, states
            await asyncio.sleep(0.05)
        # No stream ever met the dead member: it is out by the check, not by ejection.
        for _ in range(4):
            body, _, _ = await tls_request(edge.passthrough[0].port, "n1.apps.example.test", member_ca)
            assert body["member"] == "a"
        dead_status = next(m for m in pool.status()["members"] if m["address"].endswith(f":{dead_port}"))
        assert dead_status["ejected_for"] == 0
