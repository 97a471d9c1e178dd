"""The edge's own CPU per proxied request, without sockets: what interpreted code costs.

    python bench/hotpath_bench.py [--requests 20000] [--connections 8]
                                  [--route proxied|fixed|static|hit]

One Edge runs in this process with in-memory transports on both sides: each
client connection gets a request as soon as its previous response is complete
(keep-alive), and the member's connections (pooled, ``keepalive = "pool"``)
answer every request they are written with a fixed 1 KiB response on the next
loop turn. Nothing goes through the kernel, so the figure is the Python (or
compiled) work per request alone: request parsing, the pipeline, the upstream
client, the response head, the loop's callbacks. It is steady on a loaded
machine (process CPU time, not wall time), which the wrk figures are not, and
it is what the compiled modules and the hot-path work change; the system
calls a real run adds come on top (``bench/proxy_bench.py`` measures both).
``--route static`` serves a 1 KiB file from a temporary directory (one stat per
request, as on a real run), ``--route hit`` a 1 KiB object from the edge's cache
(the member marks it ``max-age=3600``; the first request fills the cache).

``CAROUSEL_PURE_PYTHON=1`` runs the pure-Python modules (edge/_build.py).
Prints microseconds per request (median of ``--repeat`` runs) and exits 0.

Instructions per request, which no load on the machine moves: ``bench/callgrind_hotpath.py``
runs this under ``valgrind --tool=callgrind`` with ``--callgrind``, which zeroes the counts
just before the last measured run and dumps them just after it (Valgrind's client requests,
from a ten-line C helper built with cc), so start-up and warm-up are not in the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# This tree's edge, unless one is imported already (bench/callgrind_hotpath.py --tree).
if "edge" not in sys.modules:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import edge
from edge.core.config import from_dict
from edge.front.connection import ClientConnection
from edge.front.server import Edge
from edge.upstream.client import UpstreamConnection

BODY = (b"carousel benchmark payload 0123456789abcdef\n" * 24)[:1024]
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 06 Dec 2026 16:47:37 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 1024\r\n"
    b"Last-Modified: Sun, 06 Dec 2026 16:47:35 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6b1591a7-400"\r\nAccept-Ranges: bytes\r\n\r\n' + BODY
)
# Fresh for an hour from now: no Date (the edge's receipt time stands in, RFC 9111 4.2.3).
HIT_RESPONSE = RESPONSE.replace(
    b"Accept-Ranges: bytes\r\n", b"Accept-Ranges: bytes\r\nCache-Control: max-age=3600\r\n"
).replace(b"Date: Sun, 06 Dec 2026 16:47:37 GMT\r\n", b"")
REQUEST = b"GET /f1k.txt HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"


STATIC_DIR = tempfile.TemporaryDirectory(prefix="carousel-hotpath-")


class MemberTransport(asyncio.Transport):
    """A member's side: every request written is answered on the next loop turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.conn: UpstreamConnection | None = None
        self.hit = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self.conn is not None
        self.loop.call_soon(self.conn.data_received, HIT_RESPONSE if self.hit else RESPONSE)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def abort(self) -> None:
        raise RuntimeError("the bench's member connection was aborted")

    def close(self) -> None:
        pass


class ClientTransport(asyncio.Transport):
    """A client's side: sends the next request once a whole response came back."""

    def __init__(self, loop: asyncio.AbstractEventLoop, bench: Bench) -> None:
        super().__init__()
        self.loop = loop
        self.bench = bench
        self.conn: ClientConnection | None = None
        self.received = 0

    def _next(self) -> None:
        if self.bench.left > 0:
            self.bench.left -= 1
            assert self.conn is not None
            self.conn.data_received(REQUEST)
        else:
            self.bench.active -= 1
            if not self.bench.active:
                self.bench.finished.set_result(None)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.received += len(data)
        # A response ends with the body; its size is the first one's, give or take the digits
        # of a hit's Age and ttl (a run past 10 s since the object was stored: one more).
        if self.received >= self.bench.response_size - 4 and data[-32:] == BODY[-32:]:
            if abs(self.received - self.bench.response_size) > 4:
                raise RuntimeError(f"unexpected response of {self.received} bytes")
            self.received = 0
            self.loop.call_soon(self._next)

    def writelines(self, items: Any) -> None:
        for item in items:
            self.write(item)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        raise RuntimeError("the edge closed a bench client connection")

    def abort(self) -> None:
        raise RuntimeError("the edge aborted a bench client connection")


class Bench:
    """N client connections in a closed loop through one in-process edge."""

    def __init__(self, loop: asyncio.AbstractEventLoop, route: str, connections: int) -> None:
        self.loop = loop
        self.left = 0
        self.active = 0
        self.finished: asyncio.Future[None] = loop.create_future()
        routes: list[dict[str, Any]]
        if route == "fixed":
            routes = [{"path": "/", "respond": 200, "body": BODY.decode()}]
        elif route == "static":
            routes = [{"path": "/", "static": STATIC_DIR.name}]
        else:
            routes = [{"path": "/", "pool": "ap"}]
        config = from_dict(
            {
                "edge": {
                    "host": "127.0.0.1",
                    "port": 0,
                    "access_log": False,
                    "max_requests_per_connection": 1 << 30,
                },
                "admin": {"port": 0},
                "pool": {
                    "ap": {
                        "members": [{"address": "127.0.0.1:9"}],
                        "keepalive": "pool",
                        "keepalive_idle": 600,
                    }
                },
                "route": routes,
                "cache": {"enabled": route == "hit", "cluster_purge": False},
            },
            "<bench>",
        )
        self.edge = Edge(config)
        # What Edge.start() sets on a real server: without it every answer asked
        # asyncio.get_running_loop() for the loop (a getpid(2) each on CPython 3.11).
        if hasattr(self.edge, "loop"):
            self.edge.loop = loop
        member = next(iter(self.edge.pools["ap"].members.values()))
        for _ in range(connections):
            conn = UpstreamConnection(loop)
            transport = MemberTransport(loop)
            transport.conn = conn
            transport.hit = route == "hit"
            conn.connection_made(transport)
            conn.parser = None
            member.conns.idle.append(conn)
        self.clients = []
        for _ in range(connections):
            client = ClientConnection(self.edge)
            ct = ClientTransport(loop, self)
            ct.conn = client
            client.connection_made(ct)
            self.clients.append(ct)
        # The size of one response, from a first request.
        self.response_size = 1 << 62

    async def measure(self, requests: int) -> float:
        """CPU microseconds per request over ``requests`` requests."""
        self.left = requests
        self.active = len(self.clients)
        self.finished = self.loop.create_future()
        started = time.process_time()
        for ct in self.clients:
            self.left -= 1
            ct._next_first()
        await self.finished
        return (time.process_time() - started) * 1e6 / requests


def _first(self: ClientTransport) -> None:
    assert self.conn is not None
    self.conn.data_received(REQUEST)


ClientTransport._next_first = _first  # type: ignore[attr-defined]


async def response_size(bench: Bench) -> int:
    """One response's size on the wire, through the bench's own edge (for ``hit``, the first
    hit: the cache admits an object on its second miss)."""
    ct = bench.clients[0]
    for _ in range(5):
        got = bytearray()
        ct.write = got.extend  # type: ignore[assignment,method-assign]
        assert ct.conn is not None
        ct.conn.data_received(REQUEST)
        for _ in range(100):
            await asyncio.sleep(0)
            if got.endswith(BODY):
                break
        if not bench.edge.config.cache.enabled or b"; hit" in got:
            break
    del ct.write  # back to the class's write
    return len(got)


CALLGRIND_HELPER = r"""
#include <valgrind/callgrind.h>
void carousel_zero(void) { CALLGRIND_ZERO_STATS; }
void carousel_dump(void) { CALLGRIND_DUMP_STATS_AT("measured"); }
"""


def callgrind_marks() -> tuple[Any, Any]:
    """(zero, dump): Valgrind client requests for the measured part (no-ops outside Valgrind)."""
    import ctypes
    import subprocess

    source = Path(STATIC_DIR.name) / "marks.c"
    library = Path(STATIC_DIR.name) / "marks.so"
    source.write_text(CALLGRIND_HELPER)
    subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    marks = ctypes.CDLL(str(library))
    return marks.carousel_zero, marks.carousel_dump


async def run(args: argparse.Namespace) -> list[float]:
    loop = asyncio.get_running_loop()
    zero = dump = None
    if args.callgrind:
        zero, dump = callgrind_marks()
    results = []
    for _ in range(args.repeat):
        bench = Bench(loop, args.route, args.connections)
        bench.response_size = await response_size(bench)
        await bench.measure(min(2000, args.requests))  # warm up
        if zero is not None:
            zero()
        results.append(await bench.measure(args.requests))
        if dump is not None:
            dump()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--route", choices=("proxied", "fixed", "static", "hit"), default="proxied")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument(
        "--callgrind", action="store_true", help="zero and dump Valgrind's counts around each measured run"
    )
    args = parser.parse_args()
    (Path(STATIC_DIR.name) / "f1k.txt").write_bytes(BODY)
    try:
        if args.loop == "uvloop":
            import uvloop

            results = uvloop.run(run(args))
        else:
            results = asyncio.run(run(args))
    finally:
        STATIC_DIR.cleanup()
    # A tree from before the compiled modules has no compiled_modules(): all pure.
    mods = edge.compiled_modules() if hasattr(edge, "compiled_modules") else []
    print(
        f"{args.route}: {statistics.median(results):.2f} us of CPU per request "
        f"(median of {len(results)}: {', '.join(f'{r:.2f}' for r in results)}); "
        f"compiled modules: {len(mods)} ({', '.join(sorted(mods)) or 'none, pure Python'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
