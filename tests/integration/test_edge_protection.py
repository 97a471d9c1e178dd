"""AP protection (max_conns + FIFO queue) and response buffering against slow clients."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from edge.testing import running_edge
from sampleapp.main import start_app

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def two_aps() -> AsyncIterator[list[tuple[int, object]]]:
    """Two sample APs in this loop: (port, their Stats object)."""
    started = [await start_app("127.0.0.1", 0, f"ap{i}") for i in range(2)]
    yield [(port, runner.app["sample"].stats) for runner, port in started]
    for runner, _ in started:
        await runner.cleanup()


def pool_config(aps: list[tuple[int, object]], **pool: object) -> dict:
    return {
        "pool": {"app": {"members": [{"address": f"127.0.0.1:{p}"} for p, _ in aps], **pool}},
        "route": [{"path": "/", "pool": "app"}],
    }


async def _fire(url: str, n: int) -> list[tuple[int, float, str | None]]:
    """n concurrent GETs, each on its own connection: (status, seconds, Retry-After)."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:

        async def one() -> tuple[int, float, str | None]:
            t0 = time.monotonic()
            async with s.get(url) as r:
                await r.read()
                return r.status, time.monotonic() - t0, r.headers.get("Retry-After")

        return await asyncio.gather(*(one() for _ in range(n)))


async def test_max_conns_queue_and_503_after_queue_timeout(two_aps) -> None:
    """200 clients, 2 members x max_conns 4: APs never see more than 4; nothing is lost."""
    cfg = pool_config(two_aps, max_conns=4, max_queue=1000, queue_timeout=1.0)
    async with running_edge(cfg) as edge:
        results = await _fire(f"http://127.0.0.1:{edge.port}/slow?ms=100", 200)
    statuses = [s for s, _, _ in results]
    assert len(results) == 200
    assert set(statuses) <= {200, 503}, set(statuses)
    served, refused = statuses.count(200), statuses.count(503)
    assert served + refused == 200
    assert served >= 8 and refused > 0  # 8 slots x 100 ms cannot serve 200 within 1 s
    for status, seconds, retry_after in results:
        if status == 503:
            assert retry_after == "1"
            assert seconds >= 0.95  # answered only after waiting queue_timeout
    for _, stats in two_aps:
        assert 1 <= stats.peak_in_flight <= 4, stats.peak_in_flight  # type: ignore[attr-defined]


async def test_queue_serves_everyone_when_the_timeout_allows(two_aps) -> None:
    cfg = pool_config(two_aps, max_conns=4, max_queue=1000, queue_timeout=30.0)
    async with running_edge(cfg) as edge:
        t0 = time.monotonic()
        results = await _fire(f"http://127.0.0.1:{edge.port}/slow?ms=50", 200)
        elapsed = time.monotonic() - t0
    assert [s for s, _, _ in results] == [200] * 200
    peaks = [stats.peak_in_flight for _, stats in two_aps]  # type: ignore[attr-defined]
    assert peaks == [4, 4]
    # 200 x 50 ms over 8 slots is 1.25 s of AP time; freed slots are handed over at once.
    assert elapsed < 1.25 * 3


async def test_full_queue_refuses_at_once(two_aps) -> None:
    cfg = pool_config(two_aps, max_conns=1, max_queue=2, queue_timeout=30.0)
    async with running_edge(cfg) as edge:
        results = await _fire(f"http://127.0.0.1:{edge.port}/slow?ms=300", 10)
    statuses = [s for s, _, _ in results]
    assert statuses.count(200) == 4  # 2 in service + 2 queued
    fast_refusals = [t for s, t, _ in results if s == 503]
    assert len(fast_refusals) == 6 and max(fast_refusals) < 0.3


# --- slow clients ------------------------------------------------------------------------

SIZE = 1024 * 1024
RATE = 64 * 1024  # bytes per second each slow client reads


async def slow_get(port: int, path: str, rate: float | None) -> float:
    """GET with a small receive buffer, reading at ``rate`` bytes/s; returns seconds taken."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=16 * 1024)
    t0 = time.monotonic()
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    received = 0
    chunk = 4096
    while True:
        data = await reader.read(chunk)
        if not data:
            break
        received += len(data)
        if rate is not None:
            # Keep the average at `rate`: sleep until this byte count is due.
            due = t0 + received / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
    writer.close()
    assert received > SIZE, received
    return time.monotonic() - t0


def track_busy(stats: object) -> dict[str, float]:
    """Make the AP's Stats record how long it had requests in flight (exact, no polling)."""
    clock = {"busy": 0.0, "since": 0.0}
    base = type(stats)

    class Tracked(base):  # type: ignore[valid-type, misc]
        @property
        def in_flight(self) -> int:
            return int(self.__dict__.get("_in_flight", 0))

        @in_flight.setter
        def in_flight(self, value: int) -> None:
            old = self.__dict__.get("_in_flight", 0)
            now = time.monotonic()
            if old == 0 and value > 0:
                clock["since"] = now
            elif old > 0 and value == 0:
                clock["busy"] += now - clock["since"]
            self.__dict__["_in_flight"] = value

    current = stats.__dict__.pop("in_flight", 0)
    stats.__class__ = Tracked
    stats.in_flight = current  # type: ignore[attr-defined]
    return clock


async def measure(
    port: int, clock: dict[str, float], rate: float | None, clients: int
) -> tuple[float, float]:
    """(AP busy seconds, mean client seconds) for `clients` concurrent 1 MiB downloads."""
    clock["busy"] = 0.0
    durations = await asyncio.gather(*(slow_get(port, "/big?kb=1024", rate) for _ in range(clients)))
    return clock["busy"], sum(durations) / len(durations)


def shrink_send_buffer(runner: object, size: int) -> None:
    """Give the AP's connections a small kernel send buffer (inherited from the listener).

    On loopback Linux grows a socket's send buffer up to 4 MiB, which swallows a
    1 MiB response whole and hides the AP's wait; over a real network the AP
    waits for the client's window instead. A fixed small buffer restores that.
    """
    for site in runner.sites:  # type: ignore[attr-defined]
        for sock in site._server.sockets:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


@pytest.mark.slow
async def test_slow_clients_do_not_hold_the_ap() -> None:
    """50 clients at 64 KiB/s: via the edge the AP is done in a moment; direct it is held."""
    runner, port = await start_app("127.0.0.1", 0, "slow-ap")
    try:
        shrink_send_buffer(runner, 32 * 1024)
        clock = track_busy(runner.app["sample"].stats)
        cfg = {
            "edge": {"response_memory_limit": 256 * 1024},  # spill to a temp file as well
            "pool": {"app": {"members": [{"address": f"127.0.0.1:{port}"}]}},
            "route": [{"path": "/", "pool": "app"}],
        }
        async with running_edge(cfg) as edge:
            fast_busy, _fast_client = await measure(edge.port, clock, None, 50)
            slow_busy, slow_client = await measure(edge.port, clock, RATE, 50)
        direct_busy, direct_client = await measure(port, clock, RATE, 50)
    finally:
        await runner.cleanup()
    print(
        f"\nslow clients (50 x 1 MiB at 64 KiB/s): AP busy via edge {slow_busy:.2f} s "
        f"(fast clients: {fast_busy:.2f} s), client {slow_client:.1f} s; "
        f"direct to AP: AP busy {direct_busy:.2f} s, client {direct_client:.1f} s"
    )
    assert 14 < slow_client < 24  # the clients really were slow (about 16 s)
    assert slow_busy < 2 * fast_busy
    assert direct_busy > 10  # without the edge the AP is held for the transfer
