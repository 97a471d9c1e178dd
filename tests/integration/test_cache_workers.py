"""A node's workers make one cache: one upstream fill per key, one hit ratio, within one budget."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from carousel.etcdserver import free_port
from edge.features.cache.shared import FillLocks, shm_base
from edge.testing.cache import ScriptedOrigin
from tests.procs import ProcessGroup

pytestmark = pytest.mark.timeout(120)

EDGE_TOML = """
[edge]
host = "127.0.0.1"
port = {port}
workers = {workers}
access_log = false
[admin]
host = "127.0.0.1"
port = {admin}
[log]
level = "warning"
[cache]
enabled = true
cluster_purge = false
memory_size = {memory}
{extra}
[pool.origin]
members = [{{ address = "127.0.0.1:{origin}" }}]
max_tries = 1
[[route]]
path = "/"
pool = "origin"
"""


@asynccontextmanager
async def node(
    procs: ProcessGroup,
    origin: ScriptedOrigin,
    workers: int,
    name: str,
    memory: int = 64 << 20,
    extra: str = "",
) -> AsyncIterator[str]:
    """A `carousel edge` with ``workers`` workers in front of the origin; yields its base URL."""
    port = free_port()
    text = EDGE_TOML.format(
        port=port, admin=free_port(), workers=workers, memory=memory, origin=origin.port, extra=extra
    )
    daemon = procs.daemon("edge", name, text)
    base = f"http://127.0.0.1:{port}"
    origin.reply("/ready", "ok", cache_control="no-store")
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(base + "/ready") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            assert daemon.running(), daemon.output()
            assert time.monotonic() < deadline, "edge did not start"
            await asyncio.sleep(0.1)
    # Every worker is listening once this many fresh connections got answers (SO_REUSEPORT).
    await asyncio.sleep(0.5 if workers > 1 else 0)
    try:
        yield base
    finally:
        daemon.signal(signal.SIGTERM)
        daemon.wait(10)


def worker_pids(supervisor: int) -> list[int]:
    path = Path(f"/proc/{supervisor}/task/{supervisor}/children")
    return [int(p) for p in path.read_text().split()]


@pytest.fixture
async def origin() -> AsyncIterator[ScriptedOrigin]:
    o = ScriptedOrigin()
    await o.start()
    yield o
    await o.stop()


async def burst(base: str, path: str, n: int) -> list[tuple[int, str, bytes]]:
    """``n`` concurrent GETs, each on its own connection (spread over the workers)."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:

        async def one() -> tuple[int, str, bytes]:
            async with s.get(base + path) as r:
                return r.status, r.headers.get("Cache-Status", ""), await r.read()

        return await asyncio.gather(*(one() for _ in range(n)))


def slow(
    origin: ScriptedOrigin, path: str, body: bytes, delay: float, cache_control: str = "max-age=300"
) -> None:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(delay)
        return web.Response(body=body, headers={"Cache-Control": cache_control})

    origin.on(path, handler)


async def test_100_concurrent_cold_requests_on_4_workers_make_one_upstream_fetch(
    procs: ProcessGroup, origin: ScriptedOrigin
) -> None:
    slow(origin, "/cold", b"c" * 5000, 0.5)
    async with node(procs, origin, 4, "edge4") as base:
        answers = await burst(base, "/cold", 100)
        assert {(s, b) for s, _, b in answers} == {(200, b"c" * 5000)}
        fetches = len(origin.seen("/cold"))
        print(f"4 workers, 100 concurrent cold requests: {fetches} upstream fetch(es)")
        assert fetches == 1
        # And afterwards every worker answers it from the node's cache.
        answers = await burst(base, "/cold", 40)
        assert all("hit" in status for _, status, _ in answers)
        assert len(origin.seen("/cold")) == 1
        # Nobody kept the key's fill lock: not the filler, not the workers that waited for it.
        supervisor = procs.daemons[-1].pid
        port = int(base.rpartition(":")[2])
        locks = FillLocks(os.path.join(shm_base(), f"carousel-edge-cache-{os.getuid()}-{supervisor}-{port}"))
        lock = locks.try_acquire("http://127.0.0.1/cold")
        assert lock is not None
        lock.release()


async def test_a_stale_entry_is_revalidated_once_per_node(
    procs: ProcessGroup, origin: ScriptedOrigin
) -> None:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers={"Cache-Control": "max-age=60", "ETag": '"v1"'})
        return web.Response(body=b"r" * 1000, headers={"Cache-Control": "max-age=3", "ETag": '"v1"'})

    origin.on("/rv", handler)
    async with node(procs, origin, 4, "edge4") as base:
        await burst(base, "/rv", 16)  # every worker has it in its memory tier
        first = [r.headers.get("If-None-Match", "") for r in origin.seen("/rv")]
        assert first == [""], first
        await asyncio.sleep(3.5)  # stale everywhere
        before = len(origin.seen("/rv"))
        answers = await burst(base, "/rv", 60)
        assert {(s, b) for s, _, b in answers} == {(200, b"r" * 1000)}
        after = [r.headers.get("If-None-Match", "") for r in origin.seen("/rv")[before:]]
        # One worker revalidates; the others find the freshened copy in the shared tier.
        assert after == ['"v1"'], after


async def test_uncacheable_responses_do_not_queue_across_workers(
    procs: ProcessGroup, origin: ScriptedOrigin
) -> None:
    slow(origin, "/private", b"p", 0.3, cache_control="private")
    async with node(procs, origin, 4, "edge4") as base:
        await burst(base, "/private", 1)  # marks it hit-for-miss for the node
        started = time.monotonic()
        answers = await burst(base, "/private", 20)
        elapsed = time.monotonic() - started
        assert {s for s, _, _ in answers} == {200}
        # 20 in parallel take about one origin delay; queued one by one they would take 6 s.
        assert elapsed < 2.5, elapsed
        assert origin.peak_in_flight > 1


def zipf_keys(n_keys: int, n_requests: int, s: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    weights = [1 / (k**s) for k in range(1, n_keys + 1)]
    return rng.choices(range(n_keys), weights=weights, k=n_requests)


async def hit_ratio(base: str, origin: ScriptedOrigin, keys: list[int], concurrency: int) -> float:
    before = len(origin.requests)
    queue = iter(keys)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:

        async def client() -> None:
            for k in queue:
                async with s.get(f"{base}/z/{k}") as r:
                    assert r.status == 200
                    await r.read()

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return 1 - (len(origin.requests) - before) / len(keys)


async def test_a_zipf_workload_hits_as_often_on_4_workers_as_on_1(
    procs: ProcessGroup, origin: ScriptedOrigin
) -> None:
    async def page(request: web.Request) -> web.Response:
        return web.Response(body=b"z" * 2048, headers={"Cache-Control": "max-age=300"})

    keys = zipf_keys(1000, 2000, 1.0, seed=7)
    for k in set(keys):
        origin.on(f"/z/{k}", page)
    ratios = {}
    for workers in (1, 4):
        async with node(procs, origin, workers, f"edge{workers}") as base:
            ratios[workers] = await hit_ratio(base, origin, keys, 16)
    print(f"zipf hit ratio: workers=1 {ratios[1]:.4f}, workers=4 {ratios[4]:.4f}")
    assert abs(ratios[1] - ratios[4]) <= 0.02, ratios


async def test_a_worker_killed_mid_fill_leaves_no_stuck_lock_and_no_torn_object(
    procs: ProcessGroup, origin: ScriptedOrigin
) -> None:
    release = asyncio.Event()
    first: list[int] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        if not first:
            # The first fill: hold it until the test has killed the worker doing it.
            first.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
            await release.wait()
        return web.Response(body=b"k" * 3000, headers={"Cache-Control": "max-age=300"})

    origin.on("/killed", handler)
    async with node(procs, origin, 2, "edge2") as base:
        daemon = procs.daemons[-1]
        lead = asyncio.ensure_future(burst(base, "/killed", 1))
        deadline = time.monotonic() + 5
        while not first:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        victim = owner_of_port(first[0], worker_pids(daemon.pid))
        # Others arrive while the fill is in progress: some on the victim, some on the other worker.
        others = asyncio.ensure_future(burst_tolerant(base, "/killed", 20))
        await asyncio.sleep(0.3)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        release.set()
        answers = await asyncio.wait_for(others, 10)
        served = [b for s, b in answers if s == 200]
        assert served and all(b == b"k" * 3000 for b in served)
        # The lock died with its holder: the other worker fetched at once, not after a timeout.
        assert time.monotonic() - killed < 3
        lead.cancel()
        await asyncio.gather(lead, return_exceptions=True)
        after = await burst(base, "/killed", 10)
        assert {(s, b) for s, _, b in after} == {(200, b"k" * 3000)}
        assert len(origin.seen("/killed")) == 2


async def burst_tolerant(base: str, path: str, n: int) -> list[tuple[int, bytes]]:
    """Like burst, but a request whose worker died counts as (0, b"")."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:

        async def one() -> tuple[int, bytes]:
            try:
                async with s.get(base + path) as r:
                    return r.status, await r.read()
            except aiohttp.ClientError:
                return 0, b""

        return await asyncio.gather(*(one() for _ in range(n)))


def owner_of_port(port: int, pids: list[int]) -> int:
    """The process holding the local TCP socket on ``port`` (by socket inode, from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rpartition(":")[2], 16) == port:
                inodes.add(fields[9])
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return pid
    raise AssertionError(f"no worker holds local port {port}")
