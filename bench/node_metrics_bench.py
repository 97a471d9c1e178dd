"""Node-wide metrics, the two candidates measured: prometheus-client's multiprocess mode or snapshots.

    python bench/node_metrics_bench.py

Per request, the edge counts answered requests with one dict update
(core/metrics.py). prometheus-client's multiprocess mode would make every
counter an mmap-backed value (a file per process, summed at scrape) and
leaves out custom collectors, which is how the edge exports pool, guard, DoS,
cache and passthrough state. The snapshot scheme (edge/front/node.py) keeps
the per-request dict update and pays once a second per worker. Prints the
per-increment cost of each (best of 5 runs, in this process and in a child
started with PROMETHEUS_MULTIPROC_DIR), the cost of one snapshot publish, and
the cost of a node scrape with 4 workers in each scheme.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path

N = 200_000

MULTIPROCESS = """
import os, timeit
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client import multiprocess
c = Counter("req", "requests", ["route", "status"])
child = c.labels("app", "200")
n = {n}
print(min(timeit.repeat(child.inc, number=n, repeat=5)) / n * 1e9)
# A scrape over 4 workers' files (this process writes one; copies stand for the others).
d = os.environ["PROMETHEUS_MULTIPROC_DIR"]
for name in os.listdir(d):
    for i in range(1, 4):
        other = name.split("_")[0] + f"_{{999990 + i}}.db"  # type_pid.db, as the library names them
        with open(os.path.join(d, name), "rb") as src, open(os.path.join(d, other), "wb") as dst:
            dst.write(src.read())
reg = CollectorRegistry()
multiprocess.MultiProcessCollector(reg)
print(min(timeit.repeat(lambda: generate_latest(reg), number=50, repeat=5)) / 50 * 1e3)
"""


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    from edge.core.node import Node
    from edge.front.node import NodeWorker
    from edge.front.server import Edge
    from edge.main import from_dict

    counts: dict[tuple[str, int], int] = {}
    key = ("app", 200)

    def dict_count() -> None:
        counts[key] = counts.get(key, 0) + 1

    plain = Counter("req", "requests", ["route", "status"], registry=CollectorRegistry()).labels("app", "200")
    d = min(timeit.repeat(dict_count, number=N, repeat=5)) / N * 1e9
    p = min(timeit.repeat(plain.inc, number=N, repeat=5)) / N * 1e9
    with tempfile.TemporaryDirectory() as mp:
        out = subprocess.run(
            [sys.executable, "-c", MULTIPROCESS.format(n=N)],
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": mp},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    m, m_scrape = float(out[0]), float(out[1])

    cfg = from_dict(
        {
            "edge": {"port": 18555, "workers": 4, "access_log": False},
            "admin": {"port": 0},
            "cache": {"enabled": True, "cluster_purge": False},
            "dos": {"enabled": True, "cluster": False},
            "pool": {"ap": {"members": [{"address": "127.0.0.1:9"}]}},
            "route": [{"path": "/", "pool": "ap"}],
        }
    )
    node = Node(4, 1024)
    edges = []
    for w in range(4):
        node.enter(w)
        edge = Edge(cfg, worker=w, node=node)
        assert edge.node_worker is not None
        edge.node_worker.publish()
        edges.append(edge)
    node.enter(0)
    nw: NodeWorker = edges[0].node_worker  # type: ignore[assignment]
    publish = min(timeit.repeat(nw.publish, number=50, repeat=5)) / 50 * 1e3
    scrape = min(timeit.repeat(lambda: generate_latest(nw.registry), number=50, repeat=5)) / 50 * 1e3
    print(f"load average {os.getloadavg()[0]:.1f}")
    print(f"per increment: dict {d:.0f} ns, prometheus Counter {p:.0f} ns, multiprocess Counter {m:.0f} ns")
    print(f"snapshot publish (one worker, once a second): {publish:.2f} ms")
    print(f"node scrape, 4 workers: snapshots {scrape:.2f} ms, multiprocess files {m_scrape:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
