"""Benchmark the edge against nginx, in the same run, with the same routes and the same AP.

    python bench/edge_bench.py [--duration 10] [--connections 50] [--idle 10000]

What it does:

* starts an AP: nginx (Debian's) serving a 1 KiB file, pinned to core 1;
* starts nginx as a proxy (``location /static/`` served from disk, ``/`` to the
  AP with nginx's default HTTP/1.0 upstream, i.e. one connection per request)
  and `carousel edge` with the equivalent config (static route, pool with
  ``keepalive = "off"``), both pinned to core 0;
* runs wrk (core 1) against each route of each proxy, alternating, for a few
  rounds, and keeps each cell's best round (the machine may be shared: the
  best round is the one least disturbed by others);
* opens N idle keep-alive client connections to the edge and reports its RSS
  growth per connection (same for nginx, for reference).

Everything runs unprivileged, on loopback, on free ports, in a temp dir.
Needs: nginx, wrk, taskset. Prints a table; exits non-zero if a tool is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"proxied": 0.20, "static": 0.25}
RSS_TARGET_KIB = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                r.read()
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


NGINX_COMMON = """
worker_processes 1;
daemon off;
error_log {dir}/{name}-error.log warn;
pid {dir}/{name}.pid;
worker_rlimit_nofile 20000;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  client_body_temp_path {dir}/{name}-body;
  proxy_temp_path {dir}/{name}-proxy;
  fastcgi_temp_path {dir}/{name}-fcgi;
  uwsgi_temp_path {dir}/{name}-uwsgi;
  scgi_temp_path {dir}/{name}-scgi;
  sendfile on;
  keepalive_timeout 75s;
  keepalive_requests 1000;
  {body}
}}
"""


def nginx_conf(workdir: Path, name: str, body: str) -> Path:
    path = workdir / f"{name}.conf"
    path.write_text(NGINX_COMMON.format(dir=workdir, name=name, body=body))
    return path


def start(argv: list[str], core: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            ["taskset", "-c", str(core), *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def wrk(url: str, duration: int, connections: int) -> tuple[float, float]:
    """(requests/s, p99 ms) from wrk pinned to core 1."""
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"99%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    p99 = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors or "Socket errors" in out:
        print(f"  warning: wrk saw errors against {url}:\n{out}", file=sys.stderr)
    return rps, p99


def rss_kib(pid: int) -> int:
    """Resident memory of a process and its children (workers), in KiB."""
    total = 0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


async def hold_idle(port: int, count: int) -> list[asyncio.StreamWriter]:
    """Open `count` keep-alive connections, one request each, then leave them idle."""
    request = b"GET /static/f1k.txt HTTP/1.1\r\nHost: bench\r\n\r\n"
    writers: list[asyncio.StreamWriter] = []
    sem = asyncio.Semaphore(500)

    async def one() -> None:
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            writers.append(writer)

    await asyncio.gather(*(one() for _ in range(count)))
    return writers


def idle_rss_per_connection(pid: int, port: int, count: int) -> float:
    """RSS growth of `pid` per idle keep-alive connection, in KiB."""

    async def run() -> float:
        # Warm up: the first requests allocate caches that are not per connection.
        for w in await hold_idle(port, 200):
            w.close()
        await asyncio.sleep(1.0)
        before = rss_kib(pid)
        writers = await hold_idle(port, count)
        await asyncio.sleep(2.0)
        after = rss_kib(pid)
        for w in writers:
            w.close()
        return (after - before) / count

    return asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections")
    parser.add_argument("--idle", type=int, default=10000, help="idle connections to hold")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per cell")
    parser.add_argument(
        "--upstream-keepalive",
        action="store_true",
        help="pool AP connections on both proxies (nginx keepalive 16, edge keepalive=pool)",
    )
    args = parser.parse_args()
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"edge_bench: {tool} not found (apt-get install nginx-light wrk util-linux)")
            return 2
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.idle + 1000:
        print(f"edge_bench: open-file limit {hard} is too low for --idle {args.idle}")
        return 2

    work = Path(tempfile.mkdtemp(prefix="carousel-bench-"))
    work.chmod(0o755)  # nginx started as root serves files as an unprivileged worker
    www = work / "www"
    www.mkdir()
    (www / "f1k.txt").write_bytes((b"carousel benchmark payload 0123456789abcdef\n" * 24)[:1024])
    ap_port, nginx_port, edge_port, admin_port = (free_port() for _ in range(4))
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[tuple[str, str], tuple[float, float]] = {}
    rss: dict[str, float] = {}
    try:
        ap_conf = nginx_conf(work, "ap", f"server {{ listen 127.0.0.1:{ap_port}; root {www}; }}")
        procs.append(start([nginx, "-c", str(ap_conf), "-p", str(work)], 1, work / "ap.log"))
        wait_http(f"http://127.0.0.1:{ap_port}/f1k.txt")

        keepalive = "keepalive 16;" if args.upstream_keepalive else ""
        proxy_opts = (
            'proxy_http_version 1.1; proxy_set_header Connection "";' if args.upstream_keepalive else ""
        )
        px_conf = nginx_conf(
            work,
            "proxy",
            f"upstream ap {{ server 127.0.0.1:{ap_port}; {keepalive} }}\n"
            f"  server {{ listen 127.0.0.1:{nginx_port};\n"
            f"    location /static/ {{ alias {www}/; }}\n"
            f"    location / {{ proxy_pass http://ap; {proxy_opts} }} }}",
        )
        px = start([nginx, "-c", str(px_conf), "-p", str(work)], 0, work / "proxy.log")
        procs.append(px)
        wait_http(f"http://127.0.0.1:{nginx_port}/f1k.txt")

        edge_conf = work / "edge.toml"
        edge_conf.write_text(
            f"""
[edge]
host = "127.0.0.1"
port = {edge_port}
access_log = false
[admin]
port = {admin_port}
[log]
level = "warning"
[pool.ap]
members = [{{ address = "127.0.0.1:{ap_port}" }}]
keepalive = "{"pool" if args.upstream_keepalive else "off"}"
[[route]]
name = "static"
path = "/static/"
static = "{www}"
[[route]]
name = "app"
path = "/"
pool = "ap"
"""
        )
        edge = start(
            [sys.executable, "-m", "carousel.cli", "edge", "--config", str(edge_conf)],
            0,
            work / "edge.log",
        )
        procs.append(edge)
        wait_http(f"http://127.0.0.1:{edge_port}/f1k.txt")
        print(
            f"nginx proxy and carousel edge on core 0, AP and wrk on core 1; "
            f"{args.rounds} alternating rounds of {args.duration}s, best round kept"
        )
        urls = {
            ("nginx", "proxied"): f"http://127.0.0.1:{nginx_port}/f1k.txt",
            ("nginx", "static"): f"http://127.0.0.1:{nginx_port}/static/f1k.txt",
            ("edge", "proxied"): f"http://127.0.0.1:{edge_port}/f1k.txt",
            ("edge", "static"): f"http://127.0.0.1:{edge_port}/static/f1k.txt",
        }
        for _ in range(args.rounds):
            for route in TARGETS:
                for server in ("nginx", "edge"):
                    rps, p99 = wrk(urls[(server, route)], args.duration, args.connections)
                    if rps > results.get((server, route), (0.0, 0.0))[0]:
                        results[(server, route)] = (rps, p99)
        if args.idle:
            rss["nginx"] = idle_rss_per_connection(px.pid, nginx_port, args.idle)
            rss["edge"] = idle_rss_per_connection(edge.pid, edge_port, args.idle)
    finally:
        for p in procs:
            stop(p)
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'route':10} {'nginx req/s':>12} {'p99 ms':>8} {'edge req/s':>12} {'p99 ms':>8} "
          f"{'ratio':>7} {'target':>7}")  # fmt: skip
    ok = True
    for route, target in TARGETS.items():
        n_rps, n_p99 = results[("nginx", route)]
        e_rps, e_p99 = results[("edge", route)]
        ratio = e_rps / n_rps
        ok &= ratio >= target
        print(
            f"{route:10} {n_rps:12.0f} {n_p99:8.2f} {e_rps:12.0f} {e_p99:8.2f} "
            f"{ratio:6.2f}x {target:6.2f}x {'ok' if ratio >= target else 'MISSED'}"
        )
    if rss:
        print(
            f"\n{args.idle} idle keep-alive connections: edge {rss['edge']:.2f} KiB each "
            f"(target <= {RSS_TARGET_KIB:.0f}), nginx {rss['nginx']:.2f} KiB each"
        )
        ok &= rss["edge"] <= RSS_TARGET_KIB
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
