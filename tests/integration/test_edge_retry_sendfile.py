"""Retries of requests that never reached a member, and static files sent with sendfile on uvloop."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
from pathlib import Path

import pytest
import uvloop

from carousel.etcdserver import free_port
from edge.testing import read_response, running_edge

pytestmark = pytest.mark.timeout(60)


class CountingAP:
    """A loopback member that answers every request 200 and counts them by method."""

    def __init__(self) -> None:
        self.methods: list[str] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                self.methods.append(head.split(b" ", 1)[0].decode())
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def _request(port: int, data: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return (await read_response(reader)).status
    finally:
        writer.close()


POST = b"POST /orders HTTP/1.1\r\nHost: shop\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"


async def test_a_post_to_a_member_that_refuses_goes_to_the_next_member() -> None:
    """Connection refused: nothing reached the member, so even a POST moves on (once)."""
    good = CountingAP()
    await good.start()
    refused = free_port()  # nothing listens there: the connect is refused
    cfg = {
        "pool": {
            "app": {
                "members": [{"address": f"127.0.0.1:{refused}"}, {"address": f"127.0.0.1:{good.port}"}],
                "eject": {"failures": 1000},  # every other request keeps meeting the refusing member
            }
        },
        "route": [{"path": "/", "pool": "app"}],
    }
    try:
        async with running_edge(cfg) as edge:
            statuses = [await _request(edge.port, POST) for _ in range(6)]
            refusing = next(m for m in edge.pools["app"].status()["members"] if str(refused) in m["address"])
        assert statuses == [200] * 6
        assert good.methods == ["POST"] * 6  # each POST reached a member exactly once
        assert refusing["requests"] >= 3  # the refusing member was tried, and skipped
    finally:
        await good.stop()


async def test_a_post_that_reached_a_member_is_not_replayed() -> None:
    """The member read the POST and reset without answering: 502, never a second delivery."""
    received: list[bytes] = []

    async def read_then_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readuntil(b"\r\n\r\n"))
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST

    bad = await asyncio.start_server(read_then_reset, "127.0.0.1", 0)
    good = CountingAP()
    await good.start()
    bad_port = bad.sockets[0].getsockname()[1]
    cfg = {
        "pool": {
            "app": {
                "members": [{"address": f"127.0.0.1:{bad_port}"}, {"address": f"127.0.0.1:{good.port}"}],
                "eject": {"failures": 1000},
            }
        },
        "route": [{"path": "/", "pool": "app"}],
    }
    try:
        async with running_edge(cfg) as edge:
            statuses = [await _request(edge.port, POST) for _ in range(6)]
        assert received, "no POST met the resetting member"
        assert statuses.count(502) == len(received)
        assert len(good.methods) == statuses.count(200)  # none of the reset ones was replayed
        # A GET is idempotent: the same reset moves it to the next member.
        async with running_edge(cfg) as edge:
            get = b"GET / HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n"
            assert [await _request(edge.port, get) for _ in range(4)] == [200] * 4
    finally:
        bad.close()
        await bad.wait_closed()
        await good.stop()


def test_static_files_go_out_with_sendfile_on_uvloop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under uvloop (the edge's loop in production) a file past the in-memory size is sent by
    sendfile(2), head first, whole and byte for byte, for a 200 and for a 206."""
    data = os.urandom(300 * 1024)  # past the static feature's in-memory files (64 KiB)
    (tmp_path / "big.bin").write_bytes(data)
    calls: list[tuple[int, int]] = []
    real = os.sendfile

    def counting(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        sent = real(out_fd, in_fd, offset, count)
        calls.append((offset or 0, sent))
        return sent

    monkeypatch.setattr(os, "sendfile", counting)
    cfg = {"route": [{"path": "/files/", "static": str(tmp_path)}]}

    async def run() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        async with running_edge(cfg) as edge:
            reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
            writer.write(b"GET /files/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            whole = await read_response(reader)
            writer.write(b"GET /files/big.bin HTTP/1.1\r\nHost: x\r\nRange: bytes=1000-199999\r\n\r\n")
            part = await read_response(reader)
            writer.close()
        assert whole.status == 200
        assert hashlib.sha256(whole.body).digest() == hashlib.sha256(data).digest()
        assert part.status == 206 and part.body == data[1000:200000]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())
    assert calls, "sendfile(2) was never called"
    assert calls[0][0] == 0 and calls[0][1] > 0  # the 200 started with sendfile at offset 0
    assert any(offset == 1000 for offset, _ in calls)  # and so did the 206


def test_a_file_the_socket_takes_at_once_is_answered_without_a_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A static file past the in-memory size goes out from data_received: the head, then
    sendfile(2) for what the socket takes at once; a task only for a rest that must wait for
    the client. Byte for byte either way."""
    data = os.urandom(100 * 1024)
    (tmp_path / "f100k.bin").write_bytes(data)
    sent: list[int] = []
    real = os.sendfile

    def counting(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        n = real(out_fd, in_fd, offset, count)
        sent.append(n)
        return n

    monkeypatch.setattr(os, "sendfile", counting)
    cfg = {"route": [{"path": "/files/", "static": str(tmp_path)}]}
    tasks: list[object] = []

    async def run() -> None:
        async with running_edge(cfg) as edge:
            spawn = edge.spawn

            def counted(coro: object) -> None:
                tasks.append(coro)
                spawn(coro)  # type: ignore[arg-type]

            monkeypatch.setattr(edge, "spawn", counted)
            reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
            for _ in range(3):
                writer.write(b"GET /files/f100k.bin HTTP/1.1\r\nHost: x\r\n\r\n")
                response = await read_response(reader)
                assert response.status == 200 and response.body == data
            writer.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())
    whole = sum(1 for n in sent if n == len(data))
    assert whole, f"the socket never took the whole file at once (sendfile sent {sent}): nothing shown"
    # Every answer the socket took whole at once was written without a task.
    assert len(tasks) <= 3 - whole, (sent, len(tasks))
