"""What an edge holds in memory per idle keep-alive connection and per cached 1 KiB object.

Measured on a real `carousel edge` process (uvloop, compiled modules when built), as
bench/proxy_bench.py --memory does. RSS growth does not depend on CPU time, so it is
steady on a loaded machine: the bounds hold whatever the load.

* Idle connection: the target, 1.5 KiB (nginx holds about 0.5). 10,000 connections, as
  the bench (tables are sized by the count): 1.38 KiB measured, 1.74 before the parser
  pool, the linked connection list and wheel, and the interned peer address.
* Cached object: the RSS beyond the 1 KiB body, at most 1.25 KiB (the target is 1.5 KiB
  of overhead): 1.0-1.05 KiB measured, 1.51 before flat stored fields and the shared
  floats. Measured after 2,000 objects, so that the heap the edge freed after its start
  is spent first (reused, it made bench/proxy_bench.py's 20,000 objects look 0.5 KiB
  cheaper each than they are).
"""

from __future__ import annotations

import asyncio
import re
import resource
import time
import urllib.request
from pathlib import Path

import pytest

from carousel.etcdserver import free_port
from edge.testing.cache import ScriptedOrigin
from tests.procs import ProcessGroup, wait_for

pytestmark = pytest.mark.timeout(180)

IDLE_KIB = 1.5
OBJECT_OVERHEAD_KIB = 1.25
WARM = 2000
BODY = (b"carousel memory payload 0123456789abcdef\n" * 25)[:1023] + b"\n"  # 1 KiB


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as r:
            return r.status == 200
    except OSError:
        return False


def _start_edge(procs: ProcessGroup, www: Path, origin_port: int) -> tuple[int, int]:
    port, admin = free_port(), free_port()
    edge = procs.daemon(
        "edge",
        "edge",
        f"""
[edge]
host = "127.0.0.1"
port = {port}
access_log = false
max_requests_per_connection = 1000000
[admin]
port = {admin}
[log]
level = "warning"
[cache]
enabled = true
cluster_purge = false
[pool.origin]
members = [{{ address = "127.0.0.1:{origin_port}" }}]
keepalive = "pool"
[[route]]
path = "/c/"
pool = "origin"
[[route]]
path = "/static/"
static = "{www}"
""",
    )
    wait_for(lambda: _ok(f"http://127.0.0.1:{admin}/healthz"), 30)
    return edge.pid, port


async def _hold_idle(port: int, count: int) -> list[asyncio.StreamWriter]:
    """``count`` keep-alive connections, one request each, then left idle."""
    request = b"GET /static/f1k.txt HTTP/1.1\r\nHost: memory.test\r\n\r\n"
    writers: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(200)

    async def one() -> None:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"Content-Length: (\d+)", head, re.I)
            assert head.startswith(b"HTTP/1.1 200") and length is not None
            await reader.readexactly(int(length.group(1)))
            writers.append(writer)

    await asyncio.gather(*(one() for _ in range(count)))
    return writers


async def _fill(port: int, first: int, last: int) -> None:
    """Request /c/f1k.txt?o=first..last-1 (each a distinct cached object) over 20 connections."""
    numbers = iter(range(first, last))

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in numbers:
            writer.write(f"GET /c/f1k.txt?o={i} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"Content-Length: (\d+)", head, re.I)
            assert head.startswith(b"HTTP/1.1 200") and length is not None
            await reader.readexactly(int(length.group(1)))
        writer.close()

    await asyncio.gather(*(worker() for _ in range(20)))


@pytest.fixture
def origin_and_www(tmp_path: Path):  # type: ignore[no-untyped-def]
    www = tmp_path / "www"
    www.mkdir()
    (www / "f1k.txt").write_bytes(BODY)
    return www


async def test_an_idle_keep_alive_connection_costs_at_most_1_5_kib_of_rss(
    procs: ProcessGroup, origin_and_www: Path
) -> None:
    count = 10000  # as many as bench/proxy_bench.py --memory: tables are sized by it
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < count + 500:
        pytest.skip(f"open-file limit {hard} is below {count + 500}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the edge inherits it
    pid, port = await asyncio.to_thread(_start_edge, procs, origin_and_www, free_port())
    # Warm up: what the first connections allocate once (tables, caches) is not per connection.
    for writer in await _hold_idle(port, 300):
        writer.close()
    await asyncio.sleep(1.0)
    before = _rss_kib(pid)
    writers = await _hold_idle(port, count)
    await asyncio.sleep(1.0)
    per = (_rss_kib(pid) - before) / count
    for writer in writers:
        writer.close()
    print(f"\nFIGURE memory: {per:.2f} KiB of RSS per idle keep-alive connection ({count})")
    assert per <= IDLE_KIB


async def test_a_cached_1_kib_object_costs_at_most_1_25_kib_of_rss_beyond_its_body(
    procs: ProcessGroup, origin_and_www: Path
) -> None:
    origin = ScriptedOrigin()
    # The fields nginx sends with a static file, plus a lifetime: what bench/proxy_bench.py caches.
    origin.reply(
        "/c/f1k.txt",
        BODY,
        content_type="text/plain",
        last_modified="Sun, 06 Dec 2026 16:47:35 GMT",
        etag='"6b1591a7-400"',
        accept_ranges="bytes",
        cache_control="max-age=3600",
    )
    count = 6000
    await origin.start()
    try:
        pid, port = await asyncio.to_thread(_start_edge, procs, origin_and_www, origin.port)
        # What the first objects allocate once (tables, caches) is not per object, and the
        # heap the edge freed after its start would be reused for free: both are spent here.
        await _fill(port, 0, WARM)
        await asyncio.sleep(0.5)
        before = _rss_kib(pid)
        started = time.monotonic()
        await _fill(port, WARM, WARM + count)
        await asyncio.sleep(1.0)
        per = (_rss_kib(pid) - before) / count
        # Every object is still in the cache (the default memory budget holds them all).
        url = f"http://127.0.0.1:{port}/c/f1k.txt?o={WARM}"
        with await asyncio.to_thread(urllib.request.urlopen, url, timeout=5) as r:
            assert "hit" in r.headers.get("Cache-Status", "")
        assert len(origin.requests) == WARM + count
    finally:
        await origin.stop()
    print(
        f"\nFIGURE memory: {per:.2f} KiB of RSS per cached 1 KiB object ({count},"
        f" filled in {time.monotonic() - started:.1f} s)"
    )
    assert per - len(BODY) / 1024 <= OBJECT_OVERHEAD_KIB
