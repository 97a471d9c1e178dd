"""Benchmark the edge's cache against nginx proxy_cache, in the same run, one core each.

    python bench/cache_bench.py [--duration 10] [--connections 50] [--rounds 3] [--objects 20000]

Same method as bench/edge_bench.py (whose helpers it uses):

* an AP: nginx (Debian's) serving a 1 KiB file with ``Cache-Control: max-age=3600``, core 1;
* nginx as a caching proxy (``proxy_cache``, in-memory keys, the cached file in
  the page cache) and `carousel edge` with ``[cache] enabled``, both on core 0;
* both caches warmed and checked to answer hits (``X-Cache-Status: HIT`` /
  ``Cache-Status: ...; hit``), then wrk (core 1) against each, alternating for a
  few rounds; each cell keeps its best round (the machine may be shared);
* the node-shared cache (``workers = 2``, both workers on core 0 as well, so
  the same CPU): a hit in a worker's own memory tier ("edge 2w"), and a hit
  that only the node's shared tmpfs tier can answer ("edge 2w shared": the
  memory tiers are made too small to hold the object), which is what a worker
  pays for an object another worker fetched, before its own memory tier has it;
* the lookup alone, in this process: a memory-tier lookup vs a shared-tier
  lookup and body read (listdir, meta, body on tmpfs), in microseconds;
* for reference, the same edge answering a fixed 1 KiB ``respond`` route: no
  pipeline feature, no upstream, just the edge's request/response path, so the
  ceiling any cache hit path could reach in this process;
* memory per cached 1 KiB object: a fresh edge is filled with ``--objects``
  distinct URLs and its RSS growth divided by their number.

Prints a table; exits non-zero if the hit ratio misses 0.5 x nginx or a tool is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edge_bench import free_port, nginx_conf, rss_kib, start, stop, wait_http, wrk

TARGET = 0.5
FIXED_BODY = ("carousel benchmark payload 0123456789abcdef " * 24)[:1024]

EDGE_TOML = """
[edge]
host = "127.0.0.1"
port = {port}
access_log = false
workers = {workers}
[admin]
port = {admin}
[log]
level = "warning"
[cache]
enabled = true
cluster_purge = false
memory_size = {memory}
max_object_size = {max_object}
[pool.ap]
members = [{{ address = "127.0.0.1:{ap}" }}]
keepalive = "pool"
[[route]]
path = "/"
pool = "ap"
[[route]]
path = "/fixed"
respond = 200
body = "{fixed}"
"""


def edge_toml(
    port: int, admin: int, ap: int, memory: int, workers: int = 1, max_object: int = 1 << 20
) -> str:
    """The edge's config for one cell."""
    return EDGE_TOML.format(
        port=port, admin=admin, ap=ap, memory=memory, fixed=FIXED_BODY, workers=workers, max_object=max_object
    )


def lookup_cost(count: int = 20000) -> tuple[float, float]:
    """(µs per memory-tier lookup, µs per shared-tier lookup with its body read), 1 KiB object."""
    from multidict import CIMultiDict

    from edge.features.cache.disk import DiskStore
    from edge.features.cache.shared import shm_base
    from edge.features.cache.store import Entry, MemoryStore

    key = "http://127.0.0.1/f1k.txt"
    entry = Entry(key, "", 200, None)
    entry.set_headers([("Content-Type", "text/plain"), ("Cache-Control", "max-age=3600")])
    entry.body = b"x" * 1024
    entry.length = 1024
    entry.lifetime = 3600
    entry.response_time = entry.stored_at = time.time()
    store = MemoryStore(1 << 20)
    store.put(entry)
    root = tempfile.mkdtemp(prefix="carousel-lookup-", dir=shm_base())
    disk = DiskStore(root, 1 << 20, 1 << 20)
    try:
        disk.store_bytes(entry, entry.body)  # no loop running: written now
        headers: CIMultiDict[str] = CIMultiDict()
        index = store.index
        started = time.perf_counter()
        for _ in range(count):
            index.get(key)
        memory = (time.perf_counter() - started) / count * 1e6
        started = time.perf_counter()
        for _ in range(count):
            found = disk.lookup(key, "", headers)
            assert found is not None and disk.read_body(found) is not None
        shared = (time.perf_counter() - started) / count * 1e6
    finally:
        disk.close()
        shutil.rmtree(root, ignore_errors=True)
    return memory, shared


def header(url: str, name: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as r:
        r.read()
        return r.headers.get(name, "")


async def fill(port: int, count: int, connections: int = 20) -> None:
    """GET `count` distinct URLs over keep-alive connections (each a miss, then stored)."""
    queue = iter(range(count))

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in queue:
                writer.write(f"GET /f1k.txt?o={i} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
                if re.search(rb"Connection: close", head, re.I):  # max_requests_per_connection
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(connections)))


def memory_per_object(edge_conf: Path, port: int, workdir: Path, count: int) -> tuple[float, int]:
    """(KiB of RSS per cached 1 KiB object, objects stored) for a fresh edge filled with `count`."""
    proc = start(
        [sys.executable, "-m", "carousel.cli", "edge", "--config", str(edge_conf)], 0, workdir / "fill.log"
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/f1k.txt?warm")
        asyncio.run(fill(port, 200))  # first requests allocate what is not per object
        time.sleep(0.5)
        before = rss_kib(proc.pid)
        asyncio.run(fill(port, count))
        time.sleep(1.0)
        after = rss_kib(proc.pid)
        hit = header(f"http://127.0.0.1:{port}/f1k.txt?o={count - 1}", "Cache-Status")
        if "hit" not in hit:
            print(f"  warning: the last object is not a hit ({hit!r}): the memory budget is too small")
    finally:
        stop(proc)
    return (after - before) / count, count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per cell")
    parser.add_argument("--objects", type=int, default=20000, help="objects for the memory figure (0: skip)")
    parser.add_argument(
        "--no-shared", action="store_true", help="skip the shared-tier cell (code without a shared tier)"
    )
    args = parser.parse_args()
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"cache_bench: {tool} not found (apt-get install nginx-light wrk util-linux)")
            return 2
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"

    work = Path(tempfile.mkdtemp(prefix="carousel-cache-bench-"))
    work.chmod(0o755)
    www = work / "www"
    www.mkdir()
    (www / "f1k.txt").write_bytes((b"carousel benchmark payload 0123456789abcdef\n" * 24)[:1024])
    ap_port, nginx_port, edge_port, admin_port = (free_port() for _ in range(4))
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, tuple[float, float]] = {}
    try:
        ap_conf = nginx_conf(
            work,
            "ap",
            f"server {{ listen 127.0.0.1:{ap_port}; root {www};"
            f' location / {{ add_header Cache-Control "max-age=3600"; }} }}',
        )
        procs.append(start([nginx, "-c", str(ap_conf), "-p", str(work)], 1, work / "ap.log"))
        wait_http(f"http://127.0.0.1:{ap_port}/f1k.txt")

        px_conf = nginx_conf(
            work,
            "proxy",
            f"proxy_cache_path {work}/nginx-cache keys_zone=hot:10m;\n"
            f"  upstream ap {{ server 127.0.0.1:{ap_port}; keepalive 16; }}\n"
            f"  server {{ listen 127.0.0.1:{nginx_port};\n"
            f"    location / {{ proxy_pass http://ap; proxy_cache hot;\n"
            f'      proxy_http_version 1.1; proxy_set_header Connection "";\n'
            f"      add_header X-Cache-Status $upstream_cache_status; }} }}",
        )
        procs.append(start([nginx, "-c", str(px_conf), "-p", str(work)], 0, work / "proxy.log"))
        edge_conf = work / "edge.toml"
        edge_conf.write_text(edge_toml(edge_port, admin_port, ap_port, 256 << 20))
        # Two workers; and two whose memory tiers cannot hold the object (a 64 KiB budget gives
        # each 8 KiB, whose 10% probation queue is smaller than one entry): shared-tier hits only.
        edge2_port, edge2s_port = free_port(), free_port()
        edge2_conf = work / "edge2.toml"
        edge2_conf.write_text(edge_toml(edge2_port, free_port(), ap_port, 256 << 20, workers=2))
        edge2s_conf = work / "edge2s.toml"
        edge2s_conf.write_text(
            edge_toml(edge2s_port, free_port(), ap_port, 64 << 10, workers=2, max_object=4096)
        )
        for name, conf in (("edge", edge_conf), ("edge2", edge2_conf), ("edge2s", edge2s_conf)):
            procs.append(
                start(
                    [sys.executable, "-m", "carousel.cli", "edge", "--config", str(conf)],
                    0,
                    work / f"{name}.log",
                )
            )
        urls = {
            "nginx": f"http://127.0.0.1:{nginx_port}/f1k.txt",
            "edge": f"http://127.0.0.1:{edge_port}/f1k.txt",
            "edge 2w": f"http://127.0.0.1:{edge2_port}/f1k.txt",
            "edge 2w shared": f"http://127.0.0.1:{edge2s_port}/f1k.txt",
            "fixed": f"http://127.0.0.1:{edge_port}/fixed",
        }
        if args.no_shared:
            del urls["edge 2w shared"]
        for url in urls.values():
            wait_http(url)
        time.sleep(1.0)  # every worker listening
        nginx_status = header(urls["nginx"], "X-Cache-Status")
        statuses = [header(u, "Cache-Status") for k, u in urls.items() if k.startswith("edge")]
        if nginx_status != "HIT" or not all("; hit" in st for st in statuses):
            print(f"cache_bench: caches not warm (nginx {nginx_status!r}, edges {statuses!r})")
            return 1
        print(
            f"cache hits of a 1 KiB object: nginx proxy_cache and carousel edge on core 0, wrk on core 1; "
            f"{args.rounds} alternating rounds of {args.duration}s, best round kept"
        )
        for _ in range(args.rounds):
            for server, url in urls.items():
                rps, p99 = wrk(url, args.duration, args.connections)
                if rps > results.get(server, (0.0, 0.0))[0]:
                    results[server] = (rps, p99)
        for p in procs[1:]:
            stop(p)
        memory = None
        if args.objects:
            fill_conf = work / "fill.toml"
            fill_port = free_port()
            budget = max(256 << 20, args.objects * 8192)
            fill_conf.write_text(edge_toml(fill_port, free_port(), ap_port, budget))
            memory = memory_per_object(fill_conf, fill_port, work, args.objects)
    finally:
        for p in procs:
            stop(p)
        shutil.rmtree(work, ignore_errors=True)

    n_rps, n_p99 = results["nginx"]
    e_rps, e_p99 = results["edge"]
    f_rps, f_p99 = results["fixed"]
    ratio = e_rps / n_rps
    print()
    print(f"{'':16} {'nginx req/s':>12} {'p99 ms':>8} {'edge req/s':>12} {'p99 ms':>8} "
          f"{'ratio':>7} {'target':>7}")  # fmt: skip
    print(
        f"{'cache hit':16} {n_rps:12.0f} {n_p99:8.2f} {e_rps:12.0f} {e_p99:8.2f} "
        f"{ratio:6.2f}x {TARGET:6.2f}x {'ok' if ratio >= TARGET else 'MISSED'}"
    )
    for cell, what in (
        ("edge 2w", "2 workers, a hit in the worker's memory tier"),
        ("edge 2w shared", "2 workers, a hit only the node's shared tier holds"),
    ):
        if cell not in results:
            continue
        rps, p99 = results[cell]
        print(
            f"{'(' + cell + ')':16} {'':12} {'':8} {rps:12.0f} {p99:8.2f} {rps / n_rps:6.2f}x          {what}"
        )
    print(
        f"{'(fixed)':16} {'':12} {'':8} {f_rps:12.0f} {f_p99:8.2f} {f_rps / n_rps:6.2f}x"
        "          the edge's fixed-response route: the ceiling for any hit path"
    )
    memory_us, shared_us = lookup_cost() if not args.no_shared else (0.0, 0.0)
    print(f"\nlookup: memory tier {memory_us:.3f} µs, shared tier (tmpfs, with the body) {shared_us:.1f} µs")
    if memory is not None:
        per_object, count = memory
        print(f"\nmemory: {per_object:.2f} KiB of RSS per cached 1 KiB object ({count} objects)")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
