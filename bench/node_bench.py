"""The cost of node-wide state with ``workers = 2``: two source trees in the same run, CPU per request.

    python bench/node_bench.py --tree before=/tmp/base --tree after=. [--duration 5] [--rounds 4]

Per tree, one edge with ``workers = 2`` and ``[dos]`` on (limits far above the
load, an empty allowlist so wrk's loopback requests are counted), ``[cache]``
on with a warmed 1 KiB object from an nginx AP. Cells: ``hit`` (a cache hit)
and ``fixed`` (a ``respond`` route: the request path with the DoS count and
nothing else). wrk runs against every cell of every tree, the tree order
reversed every round. The figure is the edge's CPU time per request: utime +
stime of the supervisor and all its workers from /proc around each run,
divided by wrk's request count (on a shared machine, steadier than req/s),
and the median of per-round ratios to the first tree. Exits 0.
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
from ab_bench import cache_status
from edge_bench import free_port, nginx_conf, stop, wait_http

TOML = """
[edge]
host = "127.0.0.1"
port = {port}
workers = 2
access_log = false
[admin]
port = {admin}
[log]
level = "warning"
[cache]
enabled = true
cluster_purge = false
[dos]
enabled = true
cluster = false
allowlist = []
soft_rate = 1000000000
hard_rate = 1000000000
soft_connections = 100000
hard_connections = 100000
[pool.ap]
members = [{{ address = "127.0.0.1:{ap}" }}]
keepalive = "pool"
[[route]]
path = "/"
pool = "ap"
[[route]]
path = "/fixed"
respond = 200
body = "fixed"
"""
CELLS = ("hit", "fixed")


def tree_cpu(pid: int) -> float:
    """utime + stime of a process and its children alive now (the workers)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def wrk_run(url: str, duration: int, connections: int, pid: int) -> tuple[float, float]:
    """(requests/s, edge CPU microseconds per request)."""
    before = tree_cpu(pid)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", url], capture_output=True, text=True, check=True
    ).stdout
    used = tree_cpu(pid) - before
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    if "Non-2xx" in out or "Socket errors" in out:
        print(f"  warning: wrk saw errors against {url}:\n{out}", file=sys.stderr)
    return rps, used * 1e6 / max(requests, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree")
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    trees = {name: Path(path).resolve() for name, _, path in (t.partition("=") for t in args.tree)}
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    work = Path(tempfile.mkdtemp(prefix="carousel-node-"))
    work.chmod(0o755)
    www = work / "www"
    www.mkdir()
    (www / "f1k.txt").write_bytes((b"carousel benchmark payload 0123456789abcdef\n" * 24)[:1024])
    procs: list[subprocess.Popen[bytes]] = []
    urls: dict[tuple[str, str], str] = {}
    pids: dict[str, int] = {}
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
                [nginx, "-c", str(ap_conf), "-p", str(work)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
        wait_http(f"http://127.0.0.1:{ap}/f1k.txt")
        for name, tree in trees.items():
            port, admin = free_port(), free_port()
            conf = work / f"{name}.toml"
            conf.write_text(TOML.format(port=port, admin=admin, ap=ap))
            with open(work / f"{name}.log", "ab") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "carousel.cli", "edge", "--config", str(conf)],
                    cwd=tree,
                    env={**os.environ, "PYTHONPATH": str(tree)},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            procs.append(proc)
            pids[name] = proc.pid
            urls[(name, "hit")] = f"http://127.0.0.1:{port}/f1k.txt"
            urls[(name, "fixed")] = f"http://127.0.0.1:{port}/fixed"
            for cell in CELLS:
                wait_http(urls[(name, cell)])
            for _ in range(20):  # both workers warm their copy
                cache_status(urls[(name, "hit")])
        names = list(trees)
        print(
            f"trees: {', '.join(f'{n}={p}' for n, p in trees.items())}; workers = 2, [dos] and [cache] on; "
            f"{args.rounds} rounds of {args.duration}s; load average {os.getloadavg()[0]:.1f} at start"
        )
        for r in range(args.rounds):
            for cell in CELLS:
                for name in names if r % 2 == 0 else reversed(names):
                    runs.setdefault((name, cell), []).append(
                        wrk_run(urls[(name, cell)], args.duration, args.connections, pids[name])
                    )
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
    finally:
        for p in procs:
            stop(p)
        shutil.rmtree(work, ignore_errors=True)
    first = names[0]
    print(f"\n{'cell':6} {'tree':8} {'req/s':>8} {'ratio':>7} {'CPU us/req':>11} {'ratio':>7}")
    for cell in CELLS:
        base = runs[(first, cell)]
        for name in names:
            mine = runs[(name, cell)]
            rps_ratio = statistics.median(m[0] / b[0] for m, b in zip(mine, base, strict=True))
            cpu_ratio = statistics.median(m[1] / b[1] for m, b in zip(mine, base, strict=True))
            print(
                f"{cell:6} {name:8} {statistics.median(m[0] for m in mine):8.0f} {rps_ratio:6.3f}x"
                f" {statistics.median(m[1] for m in mine):11.1f} {cpu_ratio:6.3f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
