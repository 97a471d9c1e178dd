"""Compare the edge of two or more source trees in the same run: cache hits, proxied, static.

    python bench/ab_bench.py --tree before=/tmp/base --tree after=. [--duration 5] [--rounds 4]

For a change that must not cost throughput (a refactor, a new layer) on a
machine whose load varies: the figures of one tree alone mean little, the
ratio between trees measured in turn within the same minutes does.

* one AP (nginx, a 1 KiB file with ``Cache-Control: max-age=3600``) on core 1;
* per tree, two edges on core 0, started from that tree's sources
  (``python -m carousel.cli edge`` with the tree as working directory and
  PYTHONPATH): one with ``[cache]`` on (``hit``: a warmed 1 KiB object;
  ``fixed``: a ``respond`` route, the request path with no feature and no
  upstream), one as bench/edge_bench.py runs it (``proxied``: a pool route
  without keep-alive to the AP; ``static``: a 1 KiB static file);
* wrk (core 1) against every cell of every tree, the tree order reversed every
  round so that drift in the machine's load falls on each tree alike;
* two figures per run: requests/s, and the edge's own CPU time per request
  (utime + stime from /proc around the run, divided by wrk's request count).
  On a shared machine the second is the steadier one: other processes steal
  wall time from the edge, much less its cycles per request.

Each cell prints, per tree, the medians of both figures and the median of the
per-round ratios to the first tree (each ratio taken between runs minutes
apart at most). Only idle edges share core 0 with the one being measured.
Prints a table; exits 0.
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
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edge_bench import free_port, nginx_conf, stop, wait_http

CACHE_TOML = """
[edge]
host = "127.0.0.1"
port = {port}
access_log = false
[admin]
port = {admin}
[log]
level = "warning"
[cache]
enabled = true
cluster_purge = false
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

PLAIN_TOML = """
[edge]
host = "127.0.0.1"
port = {port}
access_log = false
[admin]
port = {admin}
[log]
level = "warning"
[pool.ap]
members = [{{ address = "127.0.0.1:{ap}" }}]
keepalive = "off"
[[route]]
name = "static"
path = "/static/"
static = "{www}"
[[route]]
name = "app"
path = "/"
pool = "ap"
"""

CELLS = ("hit", "fixed", "proxied", "static")
FIXED_BODY = ("carousel benchmark payload 0123456789abcdef " * 24)[:1024]


def start_edge(tree: Path, conf: Path, log: Path) -> subprocess.Popen[bytes]:
    """`carousel edge` from the sources in `tree`, pinned to core 0."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with open(log, "ab") as out:
        return subprocess.Popen(
            ["taskset", "-c", "0", sys.executable, "-m", "carousel.cli", "edge", "--config", str(conf)],
            cwd=tree,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk_run(url: str, duration: int, connections: int, pid: int) -> tuple[float, float]:
    """(requests/s, edge CPU microseconds per request) from one wrk run pinned to core 1."""
    before = cpu_seconds(pid)
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{duration}s", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    used = cpu_seconds(pid) - before
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    if "Non-2xx" in out or "Socket errors" in out:
        print(f"  warning: wrk saw errors against {url}:\n{out}", file=sys.stderr)
    return rps, used * 1e6 / max(requests, 1)


def cache_status(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as r:
        r.read()
        return r.headers.get("Cache-Status", "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections")
    parser.add_argument("--rounds", type=int, default=4, help="rounds (tree order reversed each round)")
    parser.add_argument("--cells", default=",".join(CELLS), help=f"which of {', '.join(CELLS)}")
    args = parser.parse_args()
    trees = {name: Path(path).resolve() for name, _, path in (t.partition("=") for t in args.tree)}
    cells = [c for c in args.cells.split(",") if c]
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"ab_bench: {tool} not found (apt-get install nginx-light wrk util-linux)")
            return 2
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"

    work = Path(tempfile.mkdtemp(prefix="carousel-ab-"))
    work.chmod(0o755)  # nginx started as root serves files as an unprivileged worker
    www = work / "www"
    www.mkdir()
    (www / "f1k.txt").write_bytes((b"carousel benchmark payload 0123456789abcdef\n" * 24)[:1024])
    procs: list[subprocess.Popen[bytes]] = []
    urls: dict[tuple[str, str], str] = {}
    pids: dict[tuple[str, str], int] = {}
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        ap = free_port()
        ap_conf = nginx_conf(
            work,
            "ap",
            f'server {{ listen 127.0.0.1:{ap}; root {www}; add_header Cache-Control "max-age=3600"; }}',
        )
        procs.append(
            subprocess.Popen(
                ["taskset", "-c", "1", nginx, "-c", str(ap_conf), "-p", str(work)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        wait_http(f"http://127.0.0.1:{ap}/f1k.txt")
        for name, tree in trees.items():
            cport, cadmin, pport, padmin = (free_port() for _ in range(4))
            cconf, pconf = work / f"{name}-cache.toml", work / f"{name}-plain.toml"
            cconf.write_text(CACHE_TOML.format(port=cport, admin=cadmin, ap=ap, fixed=FIXED_BODY))
            pconf.write_text(PLAIN_TOML.format(port=pport, admin=padmin, ap=ap, www=www))
            cached = start_edge(tree, cconf, work / f"{name}-cache.log")
            plain = start_edge(tree, pconf, work / f"{name}-plain.log")
            procs += [cached, plain]
            for cell in CELLS:
                pids[(name, cell)] = (cached if cell in ("hit", "fixed") else plain).pid
            urls[(name, "hit")] = f"http://127.0.0.1:{cport}/f1k.txt"
            urls[(name, "fixed")] = f"http://127.0.0.1:{cport}/fixed"
            urls[(name, "proxied")] = f"http://127.0.0.1:{pport}/f1k.txt"
            urls[(name, "static")] = f"http://127.0.0.1:{pport}/static/f1k.txt"
            for cell in CELLS:
                wait_http(urls[(name, cell)])
            status = cache_status(urls[(name, "hit")])
            if "hit" not in status:
                print(f"ab_bench: {name}: the warmed object is not a hit ({status!r})")
                return 1
        names = list(trees)
        print(
            f"trees: {', '.join(f'{n}={p}' for n, p in trees.items())}\n"
            f"edges on core 0, AP and wrk on core 1; {args.rounds} rounds of {args.duration}s per cell "
            f"and tree, tree order reversed every round; load average {os.getloadavg()[0]:.1f} at start"
        )
        for r in range(args.rounds):
            for cell in cells:
                for name in names if r % 2 == 0 else reversed(names):
                    run = wrk_run(urls[(name, cell)], args.duration, args.connections, pids[(name, cell)])
                    runs.setdefault((name, cell), []).append(run)
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
    finally:
        for p in procs:
            stop(p)
        shutil.rmtree(work, ignore_errors=True)

    first = next(iter(trees))
    print()
    print(
        f"{'cell':8} {'tree':10} {'req/s':>8} {'ratio':>7} {'CPU us/req':>11} {'ratio':>7}"
        f"   (medians; ratios: median of per-round ratios to {first})"
    )
    for cell in cells:
        base = runs[(first, cell)]
        for name in trees:
            mine = runs[(name, cell)]
            rps_ratio = statistics.median(m[0] / b[0] for m, b in zip(mine, base, strict=True))
            cpu_ratio = statistics.median(m[1] / b[1] for m, b in zip(mine, base, strict=True))
            print(
                f"{cell:8} {name:10} {statistics.median(m[0] for m in mine):8.0f} {rps_ratio:6.3f}x"
                f" {statistics.median(m[1] for m in mine):11.1f} {cpu_ratio:6.3f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
