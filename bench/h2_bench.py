"""HTTP/2 throughput: the edge against nginx, and against its own HTTP/1.1, in the same run.

    python bench/h2_bench.py [--duration 10] [--rounds 2]

What it does:

* starts an AP (nginx, core 1) serving a cacheable 1 KiB file
  (``Cache-Control: public, max-age=3600``);
* starts nginx as the proxy (core 0): ``listen ... http2`` cleartext (prior
  knowledge; Debian 12's nginx 1.22 predates the ``http2 on`` directive) on one
  port and plain HTTP/1.1 on another, a static location and a ``proxy_cache``
  location; and ``carousel edge`` (core 0) with ``[http2] h2c = true``, a
  static route and a cached pool route (the same file);
* runs h2load (core 1) with ``-c 50 -m 10`` over HTTP/2 and ``--h1 -c 50 -m 1``
  over HTTP/1.1 against each route of each proxy, alternating, for a few rounds,
  and keeps each cell's best round (the machine may be shared);
* prints requests/s per cell, the edge's h2/nginx h2 ratio and the edge's own
  h2/h1 ratio (target: h2 >= 0.5x the edge's HTTP/1.1 per core);
* and, for the edge, requests per CPU-second of its process (user + system time
  from /proc during the same h2load run): on a machine shared with other work the
  edge does not get its whole core, and this figure counts only what it did get.

Cleartext on purpose: both protocols and both servers then pay no TLS, so the
figures compare the HTTP layers. Needs nginx, h2load (nghttp2-client), taskset.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from edge_bench import free_port, nginx_conf, start, stop, wait_http

H2_TARGET = 0.5


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def h2load(url: str, duration: int, h1: bool) -> tuple[float, int]:
    """Requests/s and requests done, from h2load pinned to core 1 (HTTP/2 -c 50 -m 10, or
    HTTP/1.1 -c 50 -m 1)."""
    # No --warm-up-time: h2load 1.52 with --h1 can hang in it; the first round warms up instead.
    argv = ["taskset", "-c", "1", "h2load", "-c", "50", "-t", "1", "-D", str(duration)]
    argv += ["--h1", "-m", "1"] if h1 else ["-m", "10"]
    out = subprocess.run(
        [*argv, url], capture_output=True, text=True, check=True, timeout=duration + 60
    ).stdout
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    assert done is not None, out
    if int(done.group(3)):
        print(f"  warning: h2load saw failures against {url}:\n{out}", file=sys.stderr)
    rps = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out)
    assert rps is not None, out
    return float(rps.group(1)), int(done.group(2))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    for tool in ("nginx", "h2load", "taskset"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"h2_bench: {tool} not found (apt-get install nginx-light nghttp2-client util-linux)")
            return 2
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    work = Path(tempfile.mkdtemp(prefix="carousel-h2bench-"))
    work.chmod(0o755)
    www = work / "www"
    www.mkdir()
    (www / "f1k.txt").write_bytes((b"carousel benchmark payload 0123456789abcdef\n" * 24)[:1024])
    ap, ng2, ng1, edge_port, admin = (free_port() for _ in range(5))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ap_conf = nginx_conf(
            work,
            "ap",
            f"server {{ listen 127.0.0.1:{ap}; root {www};"
            ' add_header Cache-Control "public, max-age=3600"; }',
        )
        procs.append(start([nginx, "-c", str(ap_conf), "-p", str(work)], 1, work / "ap.log"))
        wait_http(f"http://127.0.0.1:{ap}/f1k.txt")
        locations = (
            f"    location /static/ {{ alias {www}/; }}\n"
            f"    location / {{ proxy_pass http://127.0.0.1:{ap};"
            " proxy_cache c; proxy_cache_valid 200 1h; }\n"
        )
        px_conf = nginx_conf(
            work,
            "proxy",
            f"proxy_cache_path {work}/nginx-cache keys_zone=c:10m;\n"
            f"  http2_max_concurrent_streams 100;\n"
            # As many requests per HTTP/2 connection as the edge allows (no cap): nginx's GOAWAY
            # after 1000 would otherwise count against it.
            f"  server {{ listen 127.0.0.1:{ng2} http2; keepalive_requests 1000000;\n{locations}  }}\n"
            f"  server {{ listen 127.0.0.1:{ng1};\n{locations}  }}",
        )
        procs.append(start([nginx, "-c", str(px_conf), "-p", str(work)], 0, work / "proxy.log"))
        wait_http(f"http://127.0.0.1:{ng1}/f1k.txt")
        edge_conf = work / "edge.toml"
        edge_conf.write_text(
            f"""
[edge]
host = "127.0.0.1"
port = {edge_port}
access_log = false
[admin]
port = {admin}
[log]
level = "warning"
[http2]
h2c = true
[cache]
enabled = true
cluster_purge = false
[pool.ap]
members = [{{ address = "127.0.0.1:{ap}" }}]
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
            [sys.executable, "-m", "carousel.cli", "edge", "--config", str(edge_conf)], 0, work / "edge.log"
        )
        procs.append(edge)
        wait_http(f"http://127.0.0.1:{edge_port}/f1k.txt")
        wait_http(f"http://127.0.0.1:{ng1}/f1k.txt")  # both caches warm
        urls = {
            ("nginx", "h2", "cache-hit"): f"http://127.0.0.1:{ng2}/f1k.txt",
            ("nginx", "h2", "static"): f"http://127.0.0.1:{ng2}/static/f1k.txt",
            ("nginx", "h1", "cache-hit"): f"http://127.0.0.1:{ng1}/f1k.txt",
            ("nginx", "h1", "static"): f"http://127.0.0.1:{ng1}/static/f1k.txt",
            ("edge", "h2", "cache-hit"): f"http://127.0.0.1:{edge_port}/f1k.txt",
            ("edge", "h2", "static"): f"http://127.0.0.1:{edge_port}/static/f1k.txt",
            ("edge", "h1", "cache-hit"): f"http://127.0.0.1:{edge_port}/f1k.txt",
            ("edge", "h1", "static"): f"http://127.0.0.1:{edge_port}/static/f1k.txt",
        }
        print(
            "nginx proxy and carousel edge on core 0, AP and h2load on core 1; best of", args.rounds, "rounds"
        )
        best: dict[tuple[str, str, str], float] = {}
        per_cpu: dict[tuple[str, str, str], float] = {}  # the edge's requests per CPU-second
        for _ in range(args.rounds):
            for key, url in urls.items():
                used = cpu_seconds(edge.pid) if key[0] == "edge" else 0.0
                rps, done = h2load(url, args.duration, key[1] == "h1")
                best[key] = max(best.get(key, 0.0), rps)
                line = f"  {key[0]:5} {key[1]} {key[2]:9} {rps:10.0f} req/s"
                if key[0] == "edge":
                    used = cpu_seconds(edge.pid) - used
                    per_cpu[key] = max(per_cpu.get(key, 0.0), done / used if used else 0.0)
                    line += f" {done / used if used else 0.0:10.0f} req per CPU-second ({used:.1f} s CPU)"
                print(line, flush=True)
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        f"{'route':10} {'nginx h2':>10} {'edge h2':>10} {'edge/nginx':>10} {'edge h1':>10} {'edge h2/h1':>10}"
    )
    ok = True
    for route in ("cache-hit", "static"):
        n2, e2, e1 = best[("nginx", "h2", route)], best[("edge", "h2", route)], best[("edge", "h1", route)]
        print(f"{route:10} {n2:10.0f} {e2:10.0f} {e2 / n2:10.2f} {e1:10.0f} {e2 / e1:10.2f}")
        ok &= e2 / e1 >= H2_TARGET
    print(
        f"(nginx h1 for reference: cache-hit {best[('nginx', 'h1', 'cache-hit')]:.0f}, "
        f"static {best[('nginx', 'h1', 'static')]:.0f} req/s)"
    )
    print(f"{'route':10} {'edge h2 req/CPU-s':>18} {'edge h1 req/CPU-s':>18} {'h2/h1':>6}")
    for route in ("cache-hit", "static"):
        c2, c1 = per_cpu[("edge", "h2", route)], per_cpu[("edge", "h1", route)]
        print(f"{route:10} {c2:18.0f} {c1:18.0f} {c2 / c1 if c1 else 0.0:6.2f}")
    print(f"target edge h2 >= {H2_TARGET}x edge h1 per core: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
