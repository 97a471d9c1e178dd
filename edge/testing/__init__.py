"""Helpers for tests and benchmarks: an in-process edge, and raw HTTP over a socket.

Raw requests matter for the edge: smuggling and traversal probes must reach
the server byte for byte, which no HTTP client library allows.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from edge.core.config import from_dict
from edge.front.server import Edge


@asynccontextmanager
async def running_edge(data: dict[str, Any]) -> AsyncIterator[Edge]:
    """Start an Edge from a config mapping on free ports; stop it afterwards."""
    data = dict(data)
    data.setdefault("edge", {})
    data["edge"] = {"host": "127.0.0.1", "port": 0, "access_log": False, **data["edge"]}
    data.setdefault("admin", {"port": 0})
    edge = Edge(from_dict(data, "<test>"))
    await edge.start()
    try:
        yield edge
    finally:
        await edge.stop()


class RawResponse:
    """A response read off a raw socket: status, headers (lower-case names), body."""

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    def names(self) -> set[str]:
        return {k for k, _ in self.headers}


async def read_response(reader: asyncio.StreamReader, head: bool = False) -> RawResponse:
    """Read one HTTP/1.1 response (Content-Length, chunked, or until close)."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed before a response")
    status = int(status_line.split()[1])
    headers: list[tuple[str, str]] = []
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip().lower(), value.strip()))
    hmap = dict(headers)
    if head or status in (204, 304) or 100 <= status < 200:
        return RawResponse(status, headers, b"")
    if hmap.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            body += await reader.readexactly(size)
            await reader.readline()
        return RawResponse(status, headers, bytes(body))
    if "content-length" in hmap:
        return RawResponse(status, headers, await reader.readexactly(int(hmap["content-length"])))
    return RawResponse(status, headers, await reader.read())


async def raw_request(port: int, data: bytes, *, head: bool = False, wait: float = 5.0) -> RawResponse | None:
    """Send bytes as they are; return the first response, or None if the edge just closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        try:
            return await asyncio.wait_for(read_response(reader, head), wait)
        except (ConnectionError, asyncio.IncompleteReadError):
            return None
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
