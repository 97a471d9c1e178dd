"""The edge against its peers on every route, in one run: req/s and server CPU per request.

    python bench/proxy_bench.py [--duration 5] [--rounds 3] [--routes ka,nk,static,fixed,...]
                                [--peers nginx,haproxy,aiohttp,uvicorn] [--pure]

* one AP: nginx (Debian's) serving 1 KiB and 100 KiB files, pinned to core 1, with wrk;
* the servers under test, each pinned to core 0, each one process (one worker):
  - ``edge``: `carousel edge` (``edge-pure`` too with ``--pure``: CAROUSEL_PURE_PYTHON=1);
  - ``nginx``: ``proxy_pass`` with ``keepalive 16`` (HTTP/1.1) to the AP for ``/ka/``, its
    default HTTP/1.0 (a connection per request) for ``/nk/``, ``sendfile on`` for ``/static/``;
  - ``haproxy`` (if installed): ``http-reuse always`` for ``/ka/``, ``option http-server-close``
    for ``/nk/`` (it serves no files);
  - ``aiohttp``: a minimal aiohttp reverse proxy on uvloop (a pooled ClientSession, a
    force-close one for ``/nk/``, ``add_static``), the floor a Python proxy should beat;
  - ``uvicorn``: uvicorn + httptools (+ uvloop) answering a fixed 1 KiB response, the
    ceiling of a Python HTTP server (``fixed`` route only; skipped if not installed);
* routes: ``ka`` proxied with keep-alive to the AP (1 KiB), ``nk`` proxied with a new AP
  connection per request, ``ka100k`` (100 KiB through the proxy), ``static`` (1 KiB file),
  ``static100k``, ``fixed`` (a fixed 1 KiB answer: the edge's ``respond`` route);
* wrk -t1 -c50 on core 1, every (route, server) cell once per round, the server order
  reversed every round; each run reads the server's CPU time (utime + stime of its process
  tree) around it, so CPU per request = CPU seconds / requests.

On a shared machine the req/s move with other people's load; the ratios between servers
measured in the same minutes, and the CPU per request, move much less: the table gives the
median of each, and the ratio edge/peer as the median of per-round ratios.
Needs nginx, wrk, taskset; everything else is optional. Exits 0.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edge_bench import free_port, nginx_conf, stop, wait_http

ROOT = Path(__file__).resolve().parents[1]
ROUTES = {
    "ka": "/ka/f1k.txt",
    "nk": "/nk/f1k.txt",
    "ka100k": "/ka/f100k.bin",
    "static": "/static/f1k.txt",
    "static100k": "/static/f100k.bin",
    "fixed": "/fixed",
}
# Which server answers which route.
SERVES = {
    "edge": set(ROUTES),
    "edge-pure": set(ROUTES),
    "edge-before": set(ROUTES),
    "nginx": set(ROUTES) - {"fixed"},
    "haproxy": {"ka", "nk", "ka100k"},
    "aiohttp": {"ka", "nk", "ka100k", "static", "static100k"},
    "uvicorn": {"fixed"},
}
PAYLOAD = (b"carousel benchmark payload 0123456789abcdef\n" * 24)[:1024]
FIXED_BODY = ("carousel benchmark payload 0123456789abcdef " * 24)[:1024]

EDGE_TOML = """
[edge]
host = "127.0.0.1"
port = {port}
access_log = false
max_requests_per_connection = 1000000
[admin]
port = {admin}
[log]
level = "warning"
[pool.ka]
members = [{{ address = "127.0.0.1:{ap}" }}]
keepalive = "pool"
[pool.nk]
members = [{{ address = "127.0.0.1:{ap}" }}]
keepalive = "off"
[[route]]
path = "/ka/"
pool = "ka"
[[route]]
path = "/nk/"
pool = "nk"
[[route]]
path = "/static/"
static = "{www}/static"
[[route]]
path = "/fixed"
respond = 200
body = "{fixed}"
"""

HAPROXY_CFG = """
global
  maxconn 4000
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend fe
  bind 127.0.0.1:{port}
  use_backend nk if {{ path_beg /nk/ }}
  default_backend ka
backend ka
  http-reuse always
  server ap 127.0.0.1:{ap}
backend nk
  option http-server-close
  server ap 127.0.0.1:{ap}
"""

AIOHTTP_PROXY = """
import asyncio, sys
import aiohttp, uvloop
from aiohttp import web

port, ap, static = int(sys.argv[1]), sys.argv[2], sys.argv[3]

async def main():
    ka = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
    nk = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))

    async def proxy(request):
        session = nk if request.path.startswith("/nk/") else ka
        async with session.get(ap + request.path_qs) as r:
            body = await r.read()
            return web.Response(body=body, status=r.status,
                                headers={"Content-Type": r.headers.get("Content-Type", "")})

    app = web.Application()
    app.router.add_static("/static/", static)
    app.router.add_route("GET", "/{tail:.*}", proxy)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()

uvloop.run(main())
"""

UVICORN_FIXED = """
import sys
import uvicorn

BODY = (b"carousel benchmark payload 0123456789abcdef\\n" * 24)[:1024]
HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"1024")]

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop="uvloop", http="httptools",
            log_level="warning", access_log=False)
"""


def start(
    argv: list[str], log: Path, core: int, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            ["taskset", "-c", str(core), *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=cwd,
            env=env,
        )


def tree_cpu(pid: int) -> float:
    """utime + stime of a process and its descendants now alive (nginx's worker), seconds."""
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in Path(f"/proc/{p}/task").iterdir():
                children = task / "children"
                todo += [int(c) for c in children.read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def wrk(url: str, duration: int, connections: int, pid: int) -> tuple[float, float]:
    """(requests/s, server CPU microseconds per request)."""
    before = tree_cpu(pid)
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{duration}s", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    used = tree_cpu(pid) - before
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    if "Non-2xx" in out or "Socket errors" in out:
        print(f"  warning: wrk saw errors against {url}:\n{out}", file=sys.stderr)
    return rps, used * 1e6 / max(requests, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--routes", default=",".join(ROUTES))
    parser.add_argument("--peers", default="nginx,haproxy,aiohttp,uvicorn")
    parser.add_argument("--pure", action="store_true", help="also an edge on the pure-Python modules")
    parser.add_argument("--before", help="also an edge run from this source tree (edge-before)")
    args = parser.parse_args()
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            print(f"proxy_bench: {tool} not found (apt-get install wrk util-linux)")
            return 2
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        print("proxy_bench: nginx not found (apt-get install nginx-light)")
        return 2
    routes = [r for r in args.routes.split(",") if r]
    servers = ["edge", *(["edge-pure"] if args.pure else []), *(["edge-before"] if args.before else [])]
    servers += [p for p in args.peers.split(",") if p]
    if "haproxy" in servers and shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists():
        print("proxy_bench: haproxy not installed, skipped (apt-get install haproxy)")
        servers.remove("haproxy")
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        if "uvicorn" in servers:
            print("proxy_bench: uvicorn not installed, skipped (pip install uvicorn httptools)")
            servers.remove("uvicorn")

    work = Path(tempfile.mkdtemp(prefix="carousel-peers-"))
    work.chmod(0o755)
    www = work / "www"
    for sub in ("ka", "nk", "static"):
        (www / sub).mkdir(parents=True)
        (www / sub / "f1k.txt").write_bytes(PAYLOAD)
        (www / sub / "f100k.bin").write_bytes(os.urandom(100 * 1024))
    procs: list[subprocess.Popen[bytes]] = []
    pids: dict[str, int] = {}
    ports: dict[str, int] = {}
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        ap = free_port()
        ap_conf = nginx_conf(work, "ap", f"server {{ listen 127.0.0.1:{ap}; root {www}; }}")
        procs.append(start([nginx, "-c", str(ap_conf), "-p", str(work)], work / "ap.log", 1))
        wait_http(f"http://127.0.0.1:{ap}/ka/f1k.txt")
        for server in servers:
            port = ports[server] = free_port()
            env = None
            if server.startswith("edge"):
                conf = work / f"{server}.toml"
                conf.write_text(
                    EDGE_TOML.format(port=port, admin=free_port(), ap=ap, www=www, fixed=FIXED_BODY)
                )
                if server == "edge-pure":
                    env = {**os.environ, "CAROUSEL_PURE_PYTHON": "1"}
                elif server == "edge-before":
                    env = {**os.environ, "PYTHONPATH": str(Path(args.before).resolve())}
                argv = [sys.executable, "-m", "carousel.cli", "edge", "--config", str(conf)]
            elif server == "nginx":
                conf = nginx_conf(
                    work,
                    "proxy",
                    f"upstream ka {{ server 127.0.0.1:{ap}; keepalive 16; }}\n"
                    f"  upstream nk {{ server 127.0.0.1:{ap}; }}\n"
                    f"  server {{ listen 127.0.0.1:{port};\n"
                    f"    location /static/ {{ alias {www}/static/; }}\n"
                    f"    location /ka/ {{ proxy_pass http://ka; proxy_http_version 1.1;\n"
                    f'      proxy_set_header Connection ""; }}\n'
                    f"    location /nk/ {{ proxy_pass http://nk; }} }}",
                )
                argv = [nginx, "-c", str(conf), "-p", str(work)]
            elif server == "haproxy":
                conf = work / "haproxy.cfg"
                conf.write_text(HAPROXY_CFG.format(port=port, ap=ap))
                argv = [shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", str(conf)]
            elif server == "aiohttp":
                script = work / "aiohttp_proxy.py"
                script.write_text(AIOHTTP_PROXY)
                argv = [sys.executable, str(script), str(port), f"http://127.0.0.1:{ap}", str(www / "static")]
            else:
                script = work / "uvicorn_fixed.py"
                script.write_text(UVICORN_FIXED)
                argv = [sys.executable, str(script), str(port)]
            cwd = Path(args.before).resolve() if server == "edge-before" else ROOT
            proc = start(argv, work / f"{server}.log", 0, env, cwd)
            procs.append(proc)
            pids[server] = proc.pid
            probe = next(r for r in ("ka", "fixed") if r in SERVES[server])
            try:
                wait_http(f"http://127.0.0.1:{port}{ROUTES[probe]}", timeout=60)
            except RuntimeError:
                print((work / f"{server}.log").read_text()[-2000:], file=sys.stderr)
                raise
        print(
            f"servers on core 0, AP and wrk on core 1; {args.rounds} rounds of {args.duration}s per cell, "
            f"server order reversed every round; load average {os.getloadavg()[0]:.1f} at start"
        )
        for r in range(args.rounds):
            for route in routes:
                order = [s for s in servers if route in SERVES[s]]
                for server in order if r % 2 == 0 else reversed(order):
                    url = f"http://127.0.0.1:{ports[server]}{ROUTES[route]}"
                    runs.setdefault((route, server), []).append(
                        wrk(url, args.duration, args.connections, pids[server])
                    )
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
    finally:
        for p in procs:
            stop(p)
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'route':11} {'server':10} {'req/s':>8} {'CPU us/req':>11} {'edge/server req/s':>18} {'CPU':>7}")
    for route in routes:
        edge_runs = runs.get((route, "edge"))
        for server in servers:
            mine = runs.get((route, server))
            if not mine:
                continue
            rps = statistics.median(m[0] for m in mine)
            cpu = statistics.median(m[1] for m in mine)
            ratio = cpu_ratio = ""
            if edge_runs and server != "edge":
                ratio = f"{statistics.median(e[0] / m[0] for e, m in zip(edge_runs, mine, strict=True)):.2f}x"
                cpu_ratio = (
                    f"{statistics.median(e[1] / m[1] for e, m in zip(edge_runs, mine, strict=True)):.2f}x"
                )
            print(f"{route:11} {server:10} {rps:8.0f} {cpu:11.1f} {ratio:>18} {cpu_ratio:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
